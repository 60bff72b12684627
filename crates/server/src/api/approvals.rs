//! `/v1/approvals`: the executions that wait for an approver (pools with
//! `[pools.X.approval] mode = "always"`), and their decisions.
//!
//! Only keys with `role = "approver"` reach these routes (any other key: 403
//! `not_an_approver`), and they see and decide only their own tenant's; approver keys submit no
//! work anywhere else (403 `approver_cannot_submit`), so whoever submits code cannot approve it.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::PathParams;
use crate::AppState;
use crate::error::{ApiError, ErrorBody};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_approvals))
        .routes(routes!(approve))
        .routes(routes!(deny))
}

/// The core's caller of an approvals request: an approver key's tenant and id.
pub struct Approver(pub ampoule_core::Caller);

impl FromRequestParts<AppState> for Approver {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = state.keys.approver(&parts.headers, &parts.extensions)?;
        Ok(Approver(crate::auth::caller(
            key,
            &parts.extensions,
            &parts.headers,
        )?))
    }
}

/// An execution waiting for an approver.
#[derive(Debug, Serialize, ToSchema)]
pub struct Approval {
    /// Its id (`apr_…`).
    pub id: String,
    /// The pool.
    pub pool: String,
    /// The caller's name of the session the code would run in.
    pub identifier: String,
    /// The execution it holds: its audit record will carry this id.
    pub execution_id: String,
    /// The code that would run.
    pub code: String,
    /// The submitter's context (`prompt`, `run_id`, …), when it sent one.
    #[schema(value_type = Option<Object>)]
    pub context: Option<serde_json::Value>,
    /// The submitting key's id.
    pub requested_by: Option<String>,
    /// When it was asked, in milliseconds since the Unix epoch.
    pub requested_at_ms: i64,
    /// When it is refused unanswered (`approval_timed_out`).
    pub expires_at_ms: i64,
    /// For a connection waiting in the egress gateway (`mode = "on_egress"`): `host:port`
    /// (`code` then says what it is; the execution already runs).
    pub egress: Option<String>,
}

impl From<ampoule_core::approval::ApprovalInfo> for Approval {
    fn from(a: ampoule_core::approval::ApprovalInfo) -> Self {
        Self {
            id: a.id,
            pool: a.pool,
            identifier: a.identifier,
            execution_id: a.execution_id,
            code: a.code,
            context: a.context,
            requested_by: a.requested_by,
            requested_at_ms: a.requested_at_ms,
            expires_at_ms: a.expires_at_ms,
            egress: a.egress,
        }
    }
}

/// `GET /v1/approvals`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalList {
    /// The tenant's pending approvals, oldest first.
    pub approvals: Vec<Approval>,
}

/// A decision's optional reason.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Why (written to the audit record; a denial's is told to the submitter).
    #[schema(max_length = 1000)]
    pub reason: Option<String>,
}

/// The pending approvals of the approver's tenant.
#[utoipa::path(get, path = "/v1/approvals", tag = "approvals",
    responses((status = 200, body = ApprovalList),
        (status = 403, description = "the key is not an approver (`not_an_approver`)",
            body = ErrorBody)))]
async fn list_approvals(
    State(state): State<AppState>,
    Approver(caller): Approver,
) -> axum::Json<ApprovalList> {
    axum::Json(ApprovalList {
        approvals: state
            .manager
            .list_approvals(&caller)
            .into_iter()
            .map(Approval::from)
            .collect(),
    })
}

async fn decide(
    state: AppState,
    caller: ampoule_core::Caller,
    id: String,
    approve: bool,
    body: axum::body::Bytes,
) -> Result<axum::Json<Approval>, ApiError> {
    // The body is optional: empty, or `{"reason": "..."}`.
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<Decision>(&body)
            .map_err(|e| ApiError::invalid(format!("the body is not a decision: {e}")))?
            .reason
    };
    if reason.as_ref().is_some_and(|r| r.chars().count() > 1000) {
        return Err(ApiError::invalid("`reason` is at most 1000 characters"));
    }
    let info = state
        .manager
        .decide_approval(&caller, &id, approve, reason)
        .await?;
    Ok(axum::Json(info.into()))
}

/// Approves a pending execution: it runs now, and its caller gets its result.
#[utoipa::path(post, path = "/v1/approvals/{id}/approve", tag = "approvals",
    params(("id" = String, Path, description = "approval id (`apr_…`)")),
    request_body(content = Option<Decision>, description = "an optional reason"),
    responses((status = 200, description = "decided", body = Approval),
        (status = 400, description = "a malformed body (`invalid_request`)", body = ErrorBody),
        (status = 403, description = "the key is not an approver (`not_an_approver`)",
            body = ErrorBody),
        (status = 404, description = "no such pending approval of the tenant \
            (`approval_not_found`)", body = ErrorBody)))]
async fn approve(
    State(state): State<AppState>,
    Approver(caller): Approver,
    PathParams(id): PathParams<String>,
    body: axum::body::Bytes,
) -> Result<axum::Json<Approval>, ApiError> {
    decide(state, caller, id, true, body).await
}

/// Denies a pending execution: its code never runs, and its caller gets 403 `denied`.
#[utoipa::path(post, path = "/v1/approvals/{id}/deny", tag = "approvals",
    params(("id" = String, Path, description = "approval id (`apr_…`)")),
    request_body(content = Option<Decision>, description = "an optional reason"),
    responses((status = 200, description = "decided", body = Approval),
        (status = 400, description = "a malformed body (`invalid_request`)", body = ErrorBody),
        (status = 403, description = "the key is not an approver (`not_an_approver`)",
            body = ErrorBody),
        (status = 404, description = "no such pending approval of the tenant \
            (`approval_not_found`)", body = ErrorBody)))]
async fn deny(
    State(state): State<AppState>,
    Approver(caller): Approver,
    PathParams(id): PathParams<String>,
    body: axum::body::Bytes,
) -> Result<axum::Json<Approval>, ApiError> {
    decide(state, caller, id, false, body).await
}
