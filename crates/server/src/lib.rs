//! The ampoule server: session pools behind a native REST API (`/v1`) and an Azure Container
//! Apps dynamic-sessions compatible API.
//!
//! How a request flows: a front door ([`api`] for `/v1`, [`aca`] for every other path,
//! [`mcp`] for `/mcp`) authenticates the bearer key to an [`ampoule_core::Caller`] ([`auth`]),
//! parses the request into one command of the core ([`ampoule_core::service`]) and translates
//! its answer, or its [`ampoule_core::Error`], into the door's dialect ([`error`]). No door
//! imports another, and the core imports none. The core's sessions come from an
//! [`engine::Engine`]: the real one ([`session_engine`]) runs interpreters in sandboxes, the
//! [`fake`] one runs a toy language on a temporary directory so this crate's tests need no
//! root. [`metrics`] counts what the core reports (it implements the core's observer).
//!
//! [`app`] builds the router (tested with `oneshot`, no socket); [`serve`] runs it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A library prints nothing: the CLI's printer owns stdout and stderr.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod aca;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod console;
pub mod e2b;
pub mod error;
pub mod files;
mod inside;
pub mod listener;
pub mod logging;
pub mod mcp;
pub mod metrics;
pub mod ports;
pub mod serve;
pub mod session_engine;
pub mod tls;

// The core's modules, under the paths the server's files (and its tests) name them by.
pub use ampoule_core::{engine, fake, manager, quota};

use std::sync::Arc;

use axum::Router;

pub use config::Config;
pub use engine::{Engine, LiveSession, PoolSpec};
pub use error::{ApiError, Error, ErrorCode};
pub use manager::Manager;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The core service.
    pub manager: Manager,
    /// The Prometheus metrics the core reports to.
    pub metrics: metrics::Metrics,
    /// API keys.
    pub keys: Arc<auth::Keys>,
    /// Largest upload, in bytes.
    pub max_upload: u64,
    /// `Host` values `/mcp` accepts (`[mcp] allowed_hosts`; empty: any).
    pub mcp_allowed_hosts: Vec<String>,
    /// The E2B-compatible door's state (its domain, its directory watchers).
    pub e2b: Arc<e2b::Door>,
}

/// The whole HTTP application: `/healthz`, `/openapi.json`, `/metrics` (with an API key),
/// `/v1/...`, the MCP endpoint `/mcp`, E2B's control plane (`/sandboxes`, `/v2/sandboxes`)
/// and data plane (requests naming a sandbox by `E2b-Sandbox-Id` or host, see [`e2b`]), and
/// the ACA-compatible API on every other path.
pub fn app(state: AppState) -> Router {
    let (router, openapi) = api::routes();
    let openapi = Arc::new(openapi);
    let mcp = mcp::service(&state);
    router
        .nest_service("/mcp", mcp)
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(state): axum::extract::State<AppState>,
                 _tenant: auth::Tenant| async move {
                    metrics::response(&state.metrics, &state.manager)
                },
            ),
        )
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = openapi.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .merge(e2b::control::routes())
        .merge(console::routes())
        .method_not_allowed_fallback(api::method_not_allowed)
        .fallback(aca::dispatch)
        // E2B's data plane is routed by headers or host name, whatever the path: before
        // any route (and the ACA fallback) sees the request.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            e2b::intercept,
        ))
        .layer(axum::middleware::from_fn(access_log))
        .with_state(state)
}

/// Runs each request in a `request` span (`request_id`, `method`, `path`, and `session` once
/// the manager knows it; see [`logging`]), answers its id in `X-Request-Id`, and logs one
/// line per request at `info` (`AMPOULE_LOG=info`): method, path, status, duration. The
/// query is left out: it carries session identifiers, which are the caller's business.
async fn access_log(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let request_id = logging::request_id(req.headers());
    let mut req = req;
    // The doors put it in their caller, so that audit records carry it too.
    req.extensions_mut()
        .insert(auth::RequestId(request_id.clone()));
    // At `warn`, so that with the default filter the refusals and failures logged inside a
    // request still carry its ids.
    let span = tracing::warn_span!(
        "request",
        request_id = request_id.as_str(),
        %method,
        path = path.as_str(),
        session = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    span.in_scope(|| {
        tracing::info!(
            target: "ampoule::access",
            status = resp.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
        )
    });
    resp
}

/// The OpenAPI document of the native API (what `/openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api::routes().1
}
