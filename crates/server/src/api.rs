//! The native REST API, `/v1` (PRODUCT.md §2.2), and its OpenAPI document, generated from
//! these handlers (utoipa) and committed as `openapi.json` at the repository root.
//!
//! Invariants: every error is an [`ApiError`] JSON body with a stable code, including the
//! rejections of the JSON, path and query extractors; a session of another tenant answers
//! 404 exactly like a missing one; executions run in their own task, so a client that goes
//! away mid-execution never leaves a session half-way. Each handler is one command of the
//! core ([`ampoule_core::service`]); an execution's result and every event of its stream
//! carry the core's execution id (`execution_id`), the one its audit record and log lines
//! have.

use ampoule_core::{AuditQuery as CoreAuditQuery, CreateSession as CoreCreate, ExecuteCommand};
use ampoule_core::{SessionInfo as CoreSession, Target};
use ampoule_types::{ExecutionEvent, ExecutionResult, ExecutionStatus, Language};
use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::files;

pub mod approvals;
pub mod sandboxes;

/// A JSON body whose rejections are [`ApiError`]s.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Clients differ in the Content-Type they send; the body decides.
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                // Above axum's body limit: as documented, a 413, not a malformed request.
                let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ErrorCode::PayloadTooLarge
                } else {
                    ErrorCode::InvalidRequest
                };
                ApiError::new(code, format!("reading the body: {}", e.body_text()))
            })?;
        // An empty body means "all defaults" (`curl -X POST .../v1/sessions`).
        let bytes = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => axum::body::Bytes::from_static(b"{}"),
            // serde reads a struct from an array too (`[null, null]`); every body of this
            // API is an object, as documented.
            Some(b'{') => bytes,
            Some(_) => return Err(ApiError::invalid("the body must be a JSON object")),
        };
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

/// Path parameters whose rejections are [`ApiError`]s.
pub struct PathParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParams(p.0))
            .map_err(|e| ApiError::invalid(format!("invalid path: {}", e.body_text())))
    }
}

/// Query parameters whose rejections are [`ApiError`]s.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e| ApiError::invalid(format!("invalid query: {}", e.body_text())))
    }
}

/// Answers a known path called with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this method is not allowed on this path",
    )
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ampoule",
        description = "Run untrusted code in Linux sandboxes: sessions, executions and files. \
                       The ACA dynamic-sessions compatible API is served on every other path \
                       and documented in the README.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody, ExecutionEvent, StreamEvent, AuditKind, Language, ExecutionStatus))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from the server's config"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "traffic_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Access-Token",
                "A sandbox's traffic token (answered by `POST /v1/sandboxes`): grants its ports",
            ))),
        );
    }
}

/// The responses every operation shares, added to the document so that no handler can forget
/// one: 401 `unauthorized` on each operation that needs a key (the key is checked before
/// anything else), and 400 `invalid_request` on each with path parameters (a path segment
/// that is not UTF-8 is refused before the handler runs).
struct SharedResponses;

impl Modify for SharedResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{Ref, ResponseBuilder, content::ContentBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                // `security(())` (an empty requirement) marks the operations open to all.
                let open = op
                    .security
                    .as_ref()
                    .is_some_and(|s| s.iter().all(|r| r == &Default::default()));
                if !open {
                    op.responses
                        .responses
                        .entry("401".into())
                        .or_insert_with(|| {
                            error("no API key, or an unknown one (`unauthorized`)").into()
                        });
                }
                let has_path_params = op.parameters.as_ref().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| matches!(p.parameter_in, ParameterIn::Path))
                });
                if has_path_params {
                    op.responses
                        .responses
                        .entry("400".into())
                        .or_insert_with(|| {
                            error("a path segment that is not UTF-8 (`invalid_request`)").into()
                        });
                }
            }
        }
    }
}

/// utoipa documents an optional body (`request_body = Option<T>`) as `null` or `T`; this API
/// means "absent or `T`" (no body is all defaults), and refuses a `null` body. Keeps `T`.
struct AbsentBodies;

impl Modify for AbsentBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{Schema, SchemaType, Type};
        use utoipa::openapi::{RefOr, Required};
        for item in openapi.paths.paths.values_mut() {
            let ops = [&mut item.put, &mut item.post, &mut item.patch];
            for op in ops.into_iter().flatten() {
                let Some(body) = op.request_body.as_mut() else {
                    continue;
                };
                if body.required == Some(Required::True) {
                    continue;
                }
                for content in body.content.values_mut() {
                    let Some(RefOr::T(Schema::OneOf(one))) = content.schema.as_ref() else {
                        continue;
                    };
                    let is_null = |s: &RefOr<Schema>| {
                        matches!(s, RefOr::T(Schema::Object(o))
                            if o.schema_type == SchemaType::Type(Type::Null))
                    };
                    let rest: Vec<_> = one.items.iter().filter(|s| !is_null(s)).collect();
                    if let [only] = rest[..] {
                        content.schema = Some(only.clone());
                    }
                }
                body.required = Some(Required::False);
            }
        }
    }
}

/// The `/v1` routes and `/healthz`, and their OpenAPI document.
pub fn routes() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = router().split_for_parts();
    // axum spells a catch-all `{*path}`; OpenAPI path templates know only `{path}`.
    let paths = std::mem::take(&mut doc.paths.paths);
    doc.paths.paths = paths
        .into_iter()
        .map(|(k, v)| (k.replace("{*", "{"), v))
        .collect();
    // After the routes: `#[openapi(modifiers)]` run before there are any paths.
    SharedResponses.modify(&mut doc);
    AbsentBodies.modify(&mut doc);
    (router, doc)
}

fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(list_pools))
        .routes(routes!(create_session, list_sessions))
        .routes(routes!(get_session, delete_session))
        .routes(routes!(execute))
        .routes(routes!(execute_stream))
        .routes(routes!(list_files, upload_files))
        .routes(routes!(get_file, put_file, delete_file))
        .routes(routes!(list_audit))
        .routes(routes!(verify_audit))
        .routes(routes!(get_usage))
        .merge(sandboxes::router())
        .merge(approvals::router())
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` while the server answers.
    pub status: String,
}

/// Liveness: answers while the server runs (no key needed).
#[utoipa::path(get, path = "/healthz", tag = "server", security(()),
    responses((status = 200, body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
    })
}

/// `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, `warming` (a pool's warm stock was never filled yet) or `draining` (stopping:
    /// no new session starts here).
    pub status: String,
    /// The pools still warming (with `warming`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warming: Vec<String>,
    /// Warm sessions waiting now, by pool.
    pub ready: std::collections::BTreeMap<String, usize>,
}

/// Readiness, for a load balancer or Kubernetes' readiness probe (no key needed): 200 once
/// every pool's warm stock was filled, 503 before and from the moment a graceful stop
/// (SIGTERM) begins. A 503 is not an error of the server: liveness is `/healthz`.
#[utoipa::path(get, path = "/readyz", tag = "server", security(()),
    responses((status = 200, description = "Ready for new sessions", body = Readiness),
        (status = 503, description = "Warming up or draining", body = Readiness)))]
async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> (axum::http::StatusCode, axum::Json<Readiness>) {
    let ready = state
        .manager
        .pools()
        .into_iter()
        .map(|p| (p.name, p.ready))
        .collect();
    let (code, status, warming) = match state.manager.readiness() {
        ampoule_core::Readiness::Ready => (axum::http::StatusCode::OK, "ready", Vec::new()),
        ampoule_core::Readiness::Warming(pools) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "warming",
            pools,
        ),
        ampoule_core::Readiness::Draining => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            Vec::new(),
        ),
    };
    (
        code,
        axum::Json(Readiness {
            status: status.into(),
            warming,
            ready,
        }),
    )
}

/// What `GET /v1/pools` reports about a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PoolStatus {
    /// The pool's name.
    pub name: String,
    /// Its language.
    pub language: String,
    /// Warm sessions waiting to be assigned.
    pub ready: usize,
    /// Sessions running an execution or file call now.
    pub busy: usize,
    /// Sessions assigned to identifiers.
    pub sessions: usize,
    /// Most sessions the pool holds.
    pub max_sessions: usize,
    /// Warm sessions the pool keeps.
    pub warm: usize,
}

impl From<ampoule_core::PoolStatus> for PoolStatus {
    fn from(p: ampoule_core::PoolStatus) -> Self {
        Self {
            name: p.name,
            language: p.language,
            ready: p.ready,
            busy: p.busy,
            sessions: p.sessions,
            max_sessions: p.max_sessions,
            warm: p.warm,
        }
    }
}

/// `GET /v1/pools`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolList {
    /// Every pool.
    pub pools: Vec<PoolStatus>,
}

/// The pools the caller may use, with their ready, busy and maximum session counts.
#[utoipa::path(get, path = "/v1/pools", tag = "pools",
    responses((status = 200, body = PoolList), (status = 401, body = ErrorBody)))]
async fn list_pools(State(state): State<AppState>, Caller(caller): Caller) -> axum::Json<PoolList> {
    let pools = state
        .manager
        .list_pools(&caller)
        .into_iter()
        .map(PoolStatus::from)
        .collect();
    axum::Json(PoolList { pools })
}

/// `POST /v1/sessions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The pool (default: the server's default pool).
    pub pool: Option<String>,
    /// The caller's name for the session (1-256 characters, no control characters); when a
    /// session of this name exists in the pool, it is returned instead of a new one.
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub identifier: Option<String>,
    /// Why the caller runs this (`prompt`, `run_id`, `agent`, `step`, …): a JSON object of
    /// at most 4 KiB kept in the audit records it causes (it replaces an
    /// `X-Ampoule-Context` header). Records of one `run_id` are found with
    /// `GET /v1/audit?run_id=`; the same code again in a run counts as a retry.
    #[schema(value_type = Option<Object>)]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A session.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionInfo {
    /// The session's id, for the `/v1/sessions/{id}` paths.
    pub id: String,
    /// Its pool.
    pub pool: String,
    /// The caller's name for it (the ACA `identifier`).
    pub identifier: String,
    /// The language of its interpreter.
    pub language: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it was last used (RFC 3339).
    pub last_used_at: String,
    /// When it expires if left idle (RFC 3339).
    pub expires_at: String,
    /// Executions so far.
    pub executions: u64,
    /// Whether a call is running in it now.
    pub busy: bool,
}

fn session_info(s: &CoreSession) -> SessionInfo {
    SessionInfo {
        id: s.id.clone(),
        pool: s.pool.clone(),
        identifier: s.identifier.clone(),
        language: s.language.as_str().to_owned(),
        created_at: files::rfc3339(s.created_at),
        last_used_at: files::rfc3339(s.last_used_at),
        expires_at: files::expires(s),
        executions: s.executions,
        busy: s.busy,
    }
}

/// Creates a session (or returns the existing one of the same identifier).
#[utoipa::path(post, path = "/v1/sessions", tag = "sessions",
    // Optional: no body means all defaults (`curl -X POST …/v1/sessions`).
    request_body = Option<CreateSession>,
    responses(
        (status = 201, description = "created", body = SessionInfo),
        (status = 200, description = "a session of this identifier existed", body = SessionInfo),
        (status = 400, description = "a body that is not JSON, an unknown field, a value of \
            the wrong type or out of bounds (`invalid_request`)", body = ErrorBody),
        (status = 403, description = "the tenant may not use this pool or its language \
            (`pool_not_allowed`, `language_not_allowed`)", body = ErrorBody),
        (status = 404, description = "no such pool", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 429, description = "the pool or the tenant is full (`pool_full`, \
            `tenant_full`)", body = ErrorBody),
        (status = 503, description = "no sandbox could be started, or the server is shutting \
            down (`sandbox_unavailable`, `shutting_down`)", body = ErrorBody)))]
async fn create_session(
    State(state): State<AppState>,
    Caller(caller): Caller,
    JsonBody(req): JsonBody<CreateSession>,
) -> Result<Response, ApiError> {
    let caller = caller.with_context(req.context)?;
    let cmd = CoreCreate {
        pool: req.pool,
        identifier: req.identifier,
    };
    let (s, created) = state.manager.create_session(&caller, cmd).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(session_info(&s))).into_response())
}

/// `GET /v1/sessions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// The caller's sessions, oldest first.
    pub sessions: Vec<SessionInfo>,
}

/// The caller's sessions.
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions",
    responses((status = 200, body = SessionList), (status = 401, body = ErrorBody)))]
async fn list_sessions(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Result<axum::Json<SessionList>, ApiError> {
    let sessions = state
        .manager
        .list_sessions(&caller, None)?
        .iter()
        .map(session_info)
        .collect();
    Ok(axum::Json(SessionList { sessions }))
}

/// One session.
#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = SessionInfo),
        (status = 404, description = "no such session (`session_not_found`)", body = ErrorBody)))]
async fn get_session(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
) -> Result<axum::Json<SessionInfo>, ApiError> {
    let s = state.manager.get_session(&caller, &Target::Id(id))?;
    Ok(axum::Json(session_info(&s)))
}

/// Destroys a session and everything in it.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "session id")),
    responses((status = 204, description = "deleted"),
        (status = 404, description = "no such session (`session_not_found`)", body = ErrorBody)))]
async fn delete_session(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    state
        .manager
        .delete_session(&caller, &Target::Id(id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/sessions/{id}/executions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    /// The code.
    pub code: String,
    /// The language; must be the session's (default: the session's): another one answers
    /// 409 `language_mismatch`.
    #[schema(value_type = Option<Language>)]
    pub language: Option<String>,
    /// Wall-clock limit in seconds (default: the pool's; at most the pool's maximum).
    #[schema(exclusive_minimum = 0.0)]
    pub timeout_s: Option<f64>,
    /// A JSON object available to the code as `inputs`.
    #[schema(value_type = Option<Object>)]
    pub inputs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Why the caller runs this (`prompt`, `run_id`, `agent`, `step`, …): a JSON object of
    /// at most 4 KiB kept in the audit records it causes (it replaces an
    /// `X-Ampoule-Context` header). Records of one `run_id` are found with
    /// `GET /v1/audit?run_id=`; the same code again in a run counts as a retry.
    #[schema(value_type = Option<Object>)]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ExecuteRequest {
    /// The core's command for session `id`.
    fn command(self, id: String) -> ExecuteCommand {
        ExecuteCommand {
            target: Target::Id(id),
            code: self.code,
            language: self.language,
            timeout_s: self.timeout_s,
            inputs: self.inputs,
            context: None,
        }
    }
}

/// An execution's result and its id.
#[derive(Debug, Serialize, ToSchema)]
pub struct Execution {
    /// The execution's id (`exe_…`): `GET /v1/audit?execution=` finds its record, and its
    /// log lines carry it.
    pub execution_id: String,
    /// How it went.
    #[serde(flatten)]
    pub result: ExecutionResult,
}

/// Runs code in a session and returns the result when it is over.
#[utoipa::path(post, path = "/v1/sessions/{id}/executions", tag = "executions",
    params(("id" = String, Path, description = "session id")),
    request_body = ExecuteRequest,
    responses((status = 200, body = Execution),
        (status = 400, description = "a body that is not JSON, a missing `code`, an unknown \
            field, a value of the wrong type or out of bounds (`invalid_request`)",
            body = ErrorBody),
        (status = 403, description = "the timeout is above the tenant's maximum, or the tenant \
            may not use the session's pool or language (`timeout_not_allowed`, \
            `pool_not_allowed`, `language_not_allowed`)", body = ErrorBody),
        (status = 404, description = "no such session (`session_not_found`)", body = ErrorBody),
        (status = 409, description = "`language` is not the session's (`language_mismatch`)",
            body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 429, description = "the tenant's executions per minute are used up \
            (`rate_limited`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds until an execution may start"))),
        (status = 503, description = "the session's interpreter stopped answering \
            (`sandbox_unavailable`)", body = ErrorBody)))]
async fn execute(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
    JsonBody(mut req): JsonBody<ExecuteRequest>,
) -> Result<axum::Json<Execution>, ApiError> {
    let caller = caller.with_context(req.context.take())?;
    let done = state.manager.execute(&caller, req.command(id)).await?;
    Ok(axum::Json(Execution {
        execution_id: done.execution_id,
        result: done.result,
    }))
}

/// One output line of the streaming form: an `ExecutionEvent` and the execution's id.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamEvent {
    /// The execution's id (`exe_…`).
    pub execution_id: String,
    /// The output.
    #[serde(flatten)]
    pub event: ExecutionEvent,
}

/// The last line of the streaming form: the result (or an error), with the execution's id.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamEnd {
    /// The execution's id (`exe_…`).
    pub execution_id: String,
    /// How it ended.
    #[serde(flatten)]
    pub end: StreamOutcome,
}

/// How a streamed execution ended.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamOutcome {
    /// The execution is over.
    Result {
        /// Its result.
        result: Box<ExecutionResult>,
    },
    /// The execution could not run.
    Error {
        /// The error.
        error: crate::error::ErrorDetail,
    },
}

/// Runs code and streams its output as it happens: NDJSON (`application/x-ndjson`, the
/// default) or server-sent events (`Accept: text/event-stream`). Each line or event is a
/// `StreamEvent` (`stdout`, `stderr`, `display`); the last one is a `StreamEnd` (`result`
/// or `error`). Every one carries the execution's `execution_id`.
#[utoipa::path(post, path = "/v1/sessions/{id}/executions/stream", tag = "executions",
    params(("id" = String, Path, description = "session id")),
    request_body = ExecuteRequest,
    responses(
        (status = 200, description = "NDJSON lines or SSE events: StreamEvent..., then StreamEnd",
            content((StreamEnd = "application/x-ndjson"), (String = "text/event-stream"))),
        (status = 400, description = "a body that is not JSON, a missing `code`, an unknown \
            field, a value of the wrong type or out of bounds (`invalid_request`)",
            body = ErrorBody),
        (status = 403, description = "the timeout is above the tenant's maximum, or the tenant \
            may not use the session's pool or language (`timeout_not_allowed`, \
            `pool_not_allowed`, `language_not_allowed`)", body = ErrorBody),
        (status = 404, description = "no such session (`session_not_found`)", body = ErrorBody),
        (status = 409, description = "`language` is not the session's (`language_mismatch`)",
            body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 429, description = "the tenant's executions per minute are used up \
            (`rate_limited`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds until an execution may start"))),
        (status = 503, description = "the session's interpreter stopped answering \
            (`sandbox_unavailable`)", body = ErrorBody)))]
async fn execute_stream(
    State(state): State<AppState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    PathParams(id): PathParams<String>,
    JsonBody(mut req): JsonBody<ExecuteRequest>,
) -> Result<Response, ApiError> {
    // Refusals (the rate limit) are answered as errors, before the stream starts.
    let run = state
        .manager
        .execute_streaming(&caller.with_context(req.context.take())?, req.command(id))
        .await?;
    Ok(stream_execution(run, wants_sse(&headers)))
}

/// Whether the client asked for server-sent events (else NDJSON).
fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
}

/// A streaming response's headers: its media type, and no caching or proxy buffering.
fn streaming_headers(resp: &mut Response, sse: bool) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if sse {
            "text/event-stream"
        } else {
            "application/x-ndjson"
        }),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// One NDJSON line, or one SSE event of `kind`.
fn frame(sse: bool, kind: &str, json: String) -> axum::body::Bytes {
    if sse {
        format!("event: {kind}\ndata: {json}\n\n").into()
    } else {
        format!("{json}\n").into()
    }
}

/// An admitted execution as a stream: its events, then its end (see [`execute_stream`]).
fn stream_execution(run: ampoule_core::Streaming, sse: bool) -> Response {
    let execution_id = run.execution_id;

    enum St {
        Events(
            tokio::sync::mpsc::UnboundedReceiver<ExecutionEvent>,
            ampoule_core::Outcome,
        ),
        Done,
    }
    let stream = futures_util::stream::unfold(St::Events(run.events, run.outcome), move |st| {
        let execution_id = execution_id.clone();
        async move {
            match st {
                St::Events(mut rx, run) => match rx.recv().await {
                    Some(ev) => {
                        let kind = match &ev {
                            ExecutionEvent::Stdout { .. } => "stdout",
                            ExecutionEvent::Stderr { .. } => "stderr",
                            ExecutionEvent::Display { .. } => "display",
                        };
                        let line = StreamEvent {
                            execution_id,
                            event: ev,
                        };
                        let json = serde_json::to_string(&line).unwrap_or_default();
                        Some((
                            Ok::<_, std::convert::Infallible>(frame(sse, kind, json)),
                            St::Events(rx, run),
                        ))
                    }
                    None => {
                        let end = match run.await {
                            Ok(result) => StreamOutcome::Result {
                                result: Box::new(result),
                            },
                            Err(e) => StreamOutcome::Error {
                                error: crate::error::ErrorDetail {
                                    code: e.code().as_str().to_owned(),
                                    message: e.to_string(),
                                },
                            },
                        };
                        let kind = match end {
                            StreamOutcome::Result { .. } => "result",
                            StreamOutcome::Error { .. } => "error",
                        };
                        let end = StreamEnd { execution_id, end };
                        let json = serde_json::to_string(&end).unwrap_or_default();
                        Some((Ok(frame(sse, kind, json)), St::Done))
                    }
                },
                St::Done => None,
            }
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    streaming_headers(&mut resp, sse);
    resp
}

/// A file in a session.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileItem {
    /// Path relative to `/mnt/data`.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification (RFC 3339).
    pub modified_at: String,
}

impl From<&ampoule_core::FileInfo> for FileItem {
    fn from(f: &ampoule_core::FileInfo) -> Self {
        Self {
            path: f.path.clone(),
            size: f.size,
            modified_at: files::rfc3339(f.modified),
        }
    }
}

/// The multipart body of an upload: every part with a file name is stored under that name.
// Documents the body; `files::upload_multipart` reads it as a stream.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadForm {
    /// A file (the part's file name is where it goes). Inline, not a reference: a fuzzer
    /// then knows that a part's bytes are a string whatever they hold.
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
}

/// A file's bytes.
#[derive(Deserialize, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct FileContent(pub Vec<u8>);

/// A list of files.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    /// The files, by path.
    pub files: Vec<FileItem>,
}

/// `?path=` of the file list and multipart upload. The patterns of this and of the file path
/// parameters are the rules of `ampoule_core::files::data_dir` and `scratch::normalize`:
/// below /mnt/data (relative, or under `/mnt/data/`), no `..` segment, no NUL.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DirQuery {
    /// A directory below `/mnt/data` (list: only files below it; upload: where parts go).
    #[param(
        pattern = r"^(?:/mnt/data|/mnt/data/(?:(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)|\.)?(?:/(?:(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)|\.)?)*|(?:(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)|\.)(?:/(?:(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)|\.)?)*)?$"
    )]
    pub path: Option<String>,
}

/// The regular files in the session's `/mnt/data`, recursively.
#[utoipa::path(get, path = "/v1/sessions/{id}/files", tag = "files",
    params(("id" = String, Path, description = "session id"), DirQuery),
    responses((status = 200, body = FileList),
        (status = 400, description = "`path` is not a directory below /mnt/data, or an \
            unknown query parameter (`invalid_path`, `invalid_request`)", body = ErrorBody),
        (status = 404, description = "no such session (`session_not_found`)", body = ErrorBody)))]
async fn list_files(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
    QueryParams(q): QueryParams<DirQuery>,
) -> Result<axum::Json<FileList>, ApiError> {
    let (_, all) = state.manager.list_files(&caller, &Target::Id(id)).await?;
    let prefix = match q.path.as_deref().map(files::data_dir_param).transpose()? {
        Some(p) if !p.is_empty() => format!("{p}/"),
        _ => String::new(),
    };
    Ok(axum::Json(FileList {
        files: all
            .iter()
            .filter(|f| f.path.starts_with(&prefix))
            .map(FileItem::from)
            .collect(),
    }))
}

/// Uploads files as `multipart/form-data`: every part with a file name is stored under that
/// name (below `?path=` when given).
#[utoipa::path(post, path = "/v1/sessions/{id}/files", tag = "files",
    params(("id" = String, Path, description = "session id"), DirQuery),
    request_body(content_type = "multipart/form-data", content = UploadForm),
    responses((status = 201, body = FileList),
        (status = 400, description = "a malformed multipart body, one without a file part, a \
            file name or `path` that is not below /mnt/data (`invalid_request`, \
            `invalid_path`, `link_refused`)", body = ErrorBody),
        (status = 409, description = "a directory stands where the path needs a file, or a \
            file where it needs a directory (`not_a_file`)", body = ErrorBody),
        (status = 404, description = "no such session (`session_not_found`)", body = ErrorBody),
        (status = 413, description = "above the server's upload limit (`payload_too_large`)",
            body = ErrorBody),
        (status = 415, description = "not a multipart/form-data body \
            (`unsupported_media_type`)", body = ErrorBody),
        (status = 507, description = "the session's disk is full (`no_space`)",
            body = ErrorBody)))]
async fn upload_files(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
    QueryParams(q): QueryParams<DirQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, axum::Json<FileList>), ApiError> {
    files::check_content_length(&headers, state.max_upload)?;
    // An unknown session answers 404 before the body is read.
    let target = Target::Id(id);
    state.manager.get_session(&caller, &target)?;
    let stored = files::upload_multipart(
        &state.manager,
        &caller,
        target,
        q.path.as_deref(),
        &headers,
        body,
        state.max_upload,
        files::FormFields::Refuse,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(FileList {
            files: stored.iter().map(FileItem::from).collect(),
        }),
    ))
}

/// `…/files/{path}`: metadata, or the content when the path ends in `/content`.
#[utoipa::path(get, path = "/v1/sessions/{id}/files/{*path}", tag = "files",
    params(("id" = String, Path, description = "session id"),
        ("path" = String, Path, pattern = r"^(?:/mnt/data/)?(?:\./+)*(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)(?:/+(?:\.|(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)))*/*$", description = "file path below /mnt/data; append `/content` for the bytes")),
    responses((status = 200, description = "the file's metadata (FileItem), or its bytes for `…/content`",
            content((FileItem = "application/json"), (FileContent = "*/*"))),
        (status = 400, description = "a path that is not below /mnt/data or leads through a \
            link (`invalid_path`, `link_refused`)", body = ErrorBody),
        (status = 409, description = "a directory stands where the path needs a file, or a \
            file where it needs a directory (`not_a_file`)", body = ErrorBody),
        (status = 404, description = "no such session or file (`session_not_found`, \
            `file_not_found`)", body = ErrorBody)))]
async fn get_file(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams((id, path)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    let target = Target::Id(id);
    match path.strip_suffix("/content") {
        Some(file) => Ok(files::download(
            state.manager.get_file(&caller, &target, file).await?,
        )),
        None => {
            let info = state.manager.stat_file(&caller, &target, &path).await?;
            if !info.regular {
                return Err(ApiError::new(ErrorCode::NotAFile, "not a regular file"));
            }
            Ok(axum::Json(FileItem::from(&info)).into_response())
        }
    }
}

/// Writes the raw request body to a file (parents created, an existing file replaced).
#[utoipa::path(put, path = "/v1/sessions/{id}/files/{*path}", tag = "files",
    params(("id" = String, Path, description = "session id"),
        ("path" = String, Path, pattern = r"^(?:/mnt/data/)?(?:\./+)*(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)(?:/+(?:\.|(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)))*/*$", description = "file path below /mnt/data")),
    // Optional: no body writes an empty file.
    request_body(content_type = "application/octet-stream", content = Option<FileContent>),
    responses((status = 201, body = FileItem),
        (status = 400, description = "a path that is not below /mnt/data or leads through a \
            link (`invalid_path`, `link_refused`)", body = ErrorBody),
        (status = 409, description = "a directory stands where the path needs a file, or a \
            file where it needs a directory (`not_a_file`)", body = ErrorBody),
        (status = 404, description = "no such session (`session_not_found`)", body = ErrorBody),
        (status = 413, description = "above the server's upload limit (`payload_too_large`)",
            body = ErrorBody),
        (status = 507, description = "the session's disk is full (`no_space`)",
            body = ErrorBody)))]
async fn put_file(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams((id, path)): PathParams<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, axum::Json<FileItem>), ApiError> {
    files::check_content_length(&headers, state.max_upload)?;
    let info = files::upload_raw(
        &state.manager,
        &caller,
        Target::Id(id),
        &path,
        body,
        state.max_upload,
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(FileItem::from(&info))))
}

/// Deletes a file (a link itself, never what it points to).
#[utoipa::path(delete, path = "/v1/sessions/{id}/files/{*path}", tag = "files",
    params(("id" = String, Path, description = "session id"),
        ("path" = String, Path, pattern = r"^(?:/mnt/data/)?(?:\./+)*(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)(?:/+(?:\.|(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)))*/*$", description = "file path below /mnt/data")),
    responses((status = 204, description = "deleted"),
        (status = 400, description = "a path that is not below /mnt/data \
            (`invalid_path`)", body = ErrorBody),
        (status = 409, description = "a directory stands where the path needs a file, or a \
            file where it needs a directory (`not_a_file`)", body = ErrorBody),
        (status = 404, description = "no such session or file (`session_not_found`, \
            `file_not_found`)", body = ErrorBody)))]
async fn delete_file(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams((id, path)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state
        .manager
        .delete_file(&caller, &Target::Id(id), &path)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/audit` filters; times are milliseconds since the Unix epoch.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only this session id.
    pub session: Option<String>,
    /// Only this pool.
    pub pool: Option<String>,
    /// Only this identifier (the caller's name for a session: the ACA `identifier`, the MCP
    /// `session`).
    pub identifier: Option<String>,
    /// Only this execution id (`exe_…`, the `execution_id` of a result).
    pub execution: Option<String>,
    /// From this time on (inclusive).
    pub since: Option<i64>,
    /// Before this time.
    pub until: Option<i64>,
    /// Only this status.
    pub status: Option<ExecutionStatus>,
    /// Only this language.
    pub language: Option<Language>,
    /// Only this kind.
    pub kind: Option<AuditKind>,
    /// The previous page's `next`.
    pub after: Option<i64>,
    /// Records per page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only records of this run: the `run_id` of the context the caller sent with its calls
    /// (`context` body field, `X-Ampoule-Context` header, MCP `context` argument).
    pub run_id: Option<String>,
}

/// What an audit record is about (the `kind` filter).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// One execution of code.
    Execution,
    /// A session was created.
    SessionCreated,
    /// A session expired (idle timeout or lifetime).
    SessionExpired,
    /// A session was deleted by its tenant.
    SessionDeleted,
    /// A session's sandbox was killed by a limit.
    SessionKilled,
    /// A request refused by a quota or policy.
    Refused,
    /// A process (a command) ran in a sandbox.
    Process,
    /// A sandbox was paused.
    SandboxPaused,
    /// A sandbox was hibernated.
    SandboxHibernated,
    /// A sandbox runs again after a pause or hibernation.
    SandboxResumed,
    /// An execution waits for an approver.
    ApprovalRequested,
    /// An approval was decided (approved, denied, timed out).
    ApprovalDecided,
}

impl AuditKind {
    fn as_str(self) -> &'static str {
        match self {
            AuditKind::Execution => "execution",
            AuditKind::SessionCreated => "session_created",
            AuditKind::SessionExpired => "session_expired",
            AuditKind::SessionDeleted => "session_deleted",
            AuditKind::SessionKilled => "session_killed",
            AuditKind::Refused => "refused",
            AuditKind::Process => "process",
            AuditKind::SandboxPaused => "sandbox_paused",
            AuditKind::SandboxHibernated => "sandbox_hibernated",
            AuditKind::SandboxResumed => "sandbox_resumed",
            AuditKind::ApprovalRequested => "approval_requested",
            AuditKind::ApprovalDecided => "approval_decided",
        }
    }
}

/// `GET /v1/audit`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    /// The tenant's records, oldest first: time, pool, session, language, code and its
    /// SHA-256, status, duration, CPU time, peak memory, trimmed output, files, egress, the
    /// limit that decided, and the record's place in the hash chain.
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<ampoule_audit::StoredRecord>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<i64>,
}

/// The calling tenant's audit records: one per execution, session event and refusal. Each
/// record carries the session's identifier and the request id that caused it.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditList),
        (status = 400, description = "an unknown parameter, or a value of the wrong type or \
            out of bounds (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "this server keeps no audit log (`not_found`)",
            body = ErrorBody)))]
async fn list_audit(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(q): QueryParams<AuditQuery>,
) -> Result<axum::Json<AuditList>, ApiError> {
    // As documented: out of bounds is refused, not silently clamped by the store.
    if q.limit.is_some_and(|n| !(1..=1000).contains(&n)) {
        return Err(ApiError::invalid("`limit` must be 1-1000"));
    }
    let query = CoreAuditQuery {
        session: q.session,
        pool: q.pool,
        identifier: q.identifier,
        execution: q.execution,
        since: q.since,
        until: q.until,
        status: q.status.map(|s| s.as_str().to_owned()),
        language: q.language.map(|l| l.as_str().to_owned()),
        kind: q.kind.map(|k| k.as_str().to_owned()),
        after: q.after,
        limit: q.limit,
        run_id: q.run_id,
    };
    let page = state.manager.query_audit(&caller, query).await?;
    Ok(axum::Json(AuditList {
        records: page.records,
        next: page.next,
    }))
}

/// `GET /v1/audit/verify`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditVerification {
    /// Whether every record links to the one before it and hashes to what is stored.
    pub ok: bool,
    /// Records checked: the whole log, every tenant's (the chain is one), so a tenant learns
    /// only that count, never another tenant's records.
    pub checked: u64,
    /// Where the chain first breaks (a record edited, inserted or removed), when it does.
    pub broken: Option<String>,
}

/// Walks the audit log's hash chain (what `ampoule audit verify` does): answers whether
/// any record was edited, inserted or removed since it was written.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit",
    responses((status = 200, body = AuditVerification),
        (status = 404, description = "this server keeps no audit log (`not_found`)",
            body = ErrorBody)))]
async fn verify_audit(
    State(state): State<AppState>,
    Caller(_caller): Caller,
) -> Result<axum::Json<AuditVerification>, ApiError> {
    // A read of the store, not a command: the core has no verify command yet, and this one
    // changes nothing and shows no record.
    let audit = state
        .manager
        .audit()
        .ok_or(ampoule_core::Error::NoAuditLog)?;
    let v = audit.store.verify().await.map_err(ApiError::internal)?;
    Ok(axum::Json(AuditVerification {
        ok: v.ok(),
        checked: v.checked,
        broken: v.broken,
    }))
}

/// `GET /v1/usage` period; milliseconds since the Unix epoch.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// From (default: the beginning).
    pub since: Option<i64>,
    /// Until (default: now).
    pub until: Option<i64>,
}

/// `GET /v1/usage`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageBody {
    /// The tenant.
    pub tenant: String,
    /// Executions.
    pub executions: i64,
    /// Summed wall-clock time of executions.
    pub execution_seconds: f64,
    /// Summed lifetime of the sessions that ended.
    pub session_seconds: f64,
    /// Summed CPU time.
    pub cpu_seconds: f64,
    /// Highest peak memory of one execution.
    pub peak_memory_bytes: i64,
    /// Sessions created.
    pub sessions_created: i64,
    /// The tenant's cost budgets (`[quotas]`, `[tenants.NAME]`) and what it spent of them
    /// in the last hour, whatever the period asked.
    pub budget: BudgetBody,
}

/// The tenant's cost budgets; over one: 429 `quota_exhausted`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetBody {
    /// CPU seconds its executions used in the last hour (0 without a budget: not tracked).
    pub cpu_seconds_last_hour: f64,
    /// Its budget (`cpu_seconds_per_hour`), when it has one.
    pub cpu_seconds_per_hour: Option<f64>,
    /// Peak GiB × seconds of its executions in the last hour.
    pub memory_gib_seconds_last_hour: f64,
    /// Its budget (`memory_gib_seconds_per_hour`), when it has one.
    pub memory_gib_seconds_per_hour: Option<f64>,
}

/// The calling tenant's metered usage over a period.
#[utoipa::path(get, path = "/v1/usage", tag = "audit", params(UsageQuery),
    responses((status = 200, body = UsageBody),
        (status = 400, description = "an unknown parameter or a value of the wrong type \
            (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "this server keeps no audit log (`not_found`)",
            body = ErrorBody)))]
async fn get_usage(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(q): QueryParams<UsageQuery>,
) -> Result<axum::Json<UsageBody>, ApiError> {
    let u = state
        .manager
        .usage(&caller, q.since.unwrap_or(0), q.until.unwrap_or(i64::MAX))
        .await?;
    let b = state.manager.budget(&caller);
    Ok(axum::Json(UsageBody {
        budget: BudgetBody {
            cpu_seconds_last_hour: b.spent.cpu_seconds,
            cpu_seconds_per_hour: b.cpu_seconds_per_hour,
            memory_gib_seconds_last_hour: b.spent.memory_gib_seconds,
            memory_gib_seconds_per_hour: b.memory_gib_seconds_per_hour,
        },
        tenant: caller.tenant,
        executions: u.executions,
        execution_seconds: u.execution_seconds,
        session_seconds: u.session_seconds,
        cpu_seconds: u.cpu_seconds,
        peak_memory_bytes: u.peak_memory_bytes,
        sessions_created: u.sessions_created,
    }))
}
