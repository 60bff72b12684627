//! The E2B-compatible door: the unmodified E2B SDKs (`e2b`, `e2b-code-interpreter`, and
//! their JS twins) work against `ampoule serve` with `E2B_API_URL` and `E2B_SANDBOX_URL`
//! both set to the server's root URL and `E2B_API_KEY` set to an ampoule key
//! (`docs/E2B.md` has the conformance table).
//!
//! E2B has two planes, and so has this door:
//! - the control plane ([`control`]): REST under `/sandboxes` and `/v2/sandboxes`,
//!   authenticated by the API key (`X-API-KEY`, or `Authorization: Bearer`);
//! - the data plane: what E2B runs inside each sandbox — envd on port 49983 ([`envd`]:
//!   Connect RPC for processes and the filesystem, REST for `/files`) and the code
//!   interpreter on 49999 ([`interpreter`]) — and any other port, forwarded to the server
//!   listening inside ([`crate::ports`]). The SDK routes it by headers (`E2b-Sandbox-Id`,
//!   `E2b-Sandbox-Port`), or by host (`{port}-{id}.{domain}`, what `get_host` answers);
//!   [`intercept`] sends such requests here before any other route sees them. It carries no
//!   API key, only the sandbox's tokens, which the core checks
//!   ([`ampoule_core::Manager::caller_for_token`]).
//!
//! Like every door, each request becomes one call of the core. The only state held here is
//! transport state: the directory watchers E2B's polling API names by id ([`envd`]).
//!
//! Paths: ampoule sandboxes keep the user's files in `/mnt/data`; E2B's home directory
//! `/home/user` (the SDK's default working directory) is mapped onto it, for working
//! directories and file calls alike ([`SandboxPath`]).

pub mod connect;
pub mod control;
pub mod envd;
pub mod interpreter;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::AppState;
use crate::error::ErrorCode;

/// The version of envd this door answers in `envdVersion`: the SDKs gate features on it.
/// 0.5.7 enables everything implemented here (stdin, `CloseStdin`, recursive watches,
/// octet-stream uploads) and keeps what is not (file metadata from 0.6.2, entries in watch
/// events from 0.6.3) refused by the SDK itself, with its own clear message.
pub const ENVD_VERSION: &str = "0.5.7";

/// envd's port.
pub const ENVD_PORT: u16 = 49983;

/// The code interpreter's port.
pub const INTERPRETER_PORT: u16 = 49999;

/// The default domain answered to the SDK (`{port}-{id}.{domain}` is what `get_host` says).
pub const DEFAULT_DOMAIN: &str = "ampoule.localhost";

/// The door's own state: its domain and the directory watchers of the polling API.
#[derive(Debug)]
pub struct Door {
    /// The domain answered in `domain`.
    pub domain: String,
    pub(crate) watchers: envd::Watchers,
}

impl Door {
    /// A door answering `domain`.
    pub fn new(domain: impl Into<String>) -> Self {
        Self {
            domain: domain.into(),
            watchers: envd::Watchers::default(),
        }
    }
}

impl Default for Door {
    fn default() -> Self {
        Self::new(DEFAULT_DOMAIN)
    }
}

/// An E2B REST error: `{"code": <status>, "message": "..."}` (the SDK's `Error` model).
#[derive(Debug, Clone)]
pub struct E2bError {
    /// The HTTP status.
    pub status: StatusCode,
    /// For a person.
    pub message: String,
}

impl E2bError {
    /// An error with a status and a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A 400.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
}

/// The status E2B's SDKs expect for each of the core's codes: as the native API, except
/// that a request the sandbox's state refuses is a 400 (`InvalidArgumentException`).
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::LanguageMismatch | ErrorCode::NotAFile => StatusCode::BAD_REQUEST,
        other => crate::error::status(other),
    }
}

impl From<ampoule_core::Error> for E2bError {
    fn from(e: ampoule_core::Error) -> Self {
        let api = crate::ApiError::from(e);
        Self::new(status_of(api.code), api.message)
    }
}

impl From<crate::ApiError> for E2bError {
    fn from(e: crate::ApiError) -> Self {
        Self::new(status_of(e.code), e.message)
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"code": self.status.as_u16(), "message": self.message})),
        )
            .into_response()
    }
}

/// Which sandbox and port a data-plane request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The sandbox id.
    pub sandbox: String,
    /// The port inside it.
    pub port: u16,
    /// Whether the route came from the host name (`{port}-{id}.…`), not headers.
    pub by_host: bool,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// A sandbox id as ampoule makes them (`sbx_…`, or a session's `ses_…`).
fn is_sandbox_id(id: &str) -> bool {
    (id.starts_with("sbx_") || id.starts_with("ses_"))
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The data-plane route of a request, if it has one: the `E2b-Sandbox-Id` header (with
/// `E2b-Sandbox-Port`, envd's port when absent), else a host `{port}-{id}.{anything}` whose
/// id is one of ampoule's. `Err` when the request names a sandbox but badly.
pub fn route_of(req: &Request) -> Option<Result<Route, E2bError>> {
    let headers = req.headers();
    if let Some(id) = header(headers, "e2b-sandbox-id") {
        let port = match header(headers, "e2b-sandbox-port") {
            None => Ok(ENVD_PORT),
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| E2bError::invalid(format!("E2b-Sandbox-Port {p:?} is not a port"))),
        };
        return Some(port.map(|port| Route {
            sandbox: id.to_owned(),
            port,
            by_host: false,
        }));
    }
    let host = req.uri().host().or_else(|| header(headers, "host"))?;
    let (first, rest) = host.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    let (port, id) = first.split_once('-')?;
    let port = port.parse::<u16>().ok()?;
    is_sandbox_id(id).then(|| {
        Ok(Route {
            sandbox: id.to_owned(),
            port,
            by_host: true,
        })
    })
}

/// Middleware: sends data-plane requests (see [`route_of`]) to the sandbox's port, and every
/// other request on to the router.
pub async fn intercept(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match route_of(&req) {
        None => next.run(req).await,
        Some(Err(e)) => e.into_response(),
        Some(Ok(route)) => data_plane(state, route, req).await,
    }
}

/// What the sandbox's proxy answers for a sandbox that does not exist, or a token that does
/// not open it (the core answers both alike): a 502 saying it "was not found", which the
/// SDKs read as "the sandbox is not running".
fn sandbox_gone(id: &str) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(json!({
            "code": 502,
            "sandboxId": id,
            "message": format!("The sandbox {id} was not found"),
        })),
    )
        .into_response()
}

async fn data_plane(state: AppState, route: Route, req: Request) -> Response {
    let request_id = req
        .extensions()
        .get::<crate::auth::RequestId>()
        .map(|r| r.0.clone());
    let headers = req.headers();
    let access = header(headers, "x-access-token").filter(|t| !t.is_empty());
    let traffic = header(headers, "e2b-traffic-access-token").filter(|t| !t.is_empty());
    let m = &state.manager;
    let id = route.sandbox.as_str();
    match route.port {
        ENVD_PORT | INTERPRETER_PORT => {
            // envd takes the access token; the code interpreter is a port of the sandbox in
            // E2B, which its SDKs reach with the traffic token alone (contexts) or both.
            let caller = match (access, traffic) {
                (Some(t), _) => m.caller_for_token(id, t, false, request_id),
                (None, Some(t)) if route.port == INTERPRETER_PORT => {
                    m.caller_for_token(id, t, true, request_id)
                }
                _ => {
                    return E2bError::unauthorized(
                        "missing `X-Access-Token: <envdAccessToken>` (the create response's)",
                    )
                    .into_response();
                }
            };
            let Ok(caller) = caller else {
                return sandbox_gone(id);
            };
            if route.port == ENVD_PORT {
                envd::handle(&state, caller, id, req).await
            } else {
                interpreter::handle(&state, caller, id, req).await
            }
        }
        port => {
            // A port of the sandbox: only its traffic token opens it (sent by header, or in
            // `X-Access-Token` by clients that have one header to set).
            let Some(token) = traffic.or(access) else {
                return E2bError::unauthorized(
                    "missing `E2B-Traffic-Access-Token: <trafficAccessToken>` (the create \
                     response's): a sandbox's ports are never open without it",
                )
                .into_response();
            };
            let Ok(caller) = m.caller_for_token(id, token, true, request_id) else {
                return E2bError::new(
                    StatusCode::FORBIDDEN,
                    "this traffic token does not open this sandbox's ports (or there is no \
                     such sandbox)",
                )
                .into_response();
            };
            let req = strip_tokens(req);
            match crate::ports::forward(m, &caller, id, port, req).await {
                Ok(resp) => resp,
                // The SDKs recognize a closed port by these words.
                Err(e) if e.code() == ErrorCode::PortUnreachable => E2bError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("The sandbox is running but the port is not open ({port}): {e}"),
                )
                .into_response(),
                Err(e) => E2bError::from(e).into_response(),
            }
        }
    }
}

/// The request without the sandbox's tokens and routing headers, as the server inside sees
/// it: the tokens are ampoule's business, never the sandboxed code's.
fn strip_tokens(mut req: Request) -> Request {
    for h in [
        "x-access-token",
        "e2b-traffic-access-token",
        "e2b-sandbox-id",
        "e2b-sandbox-port",
    ] {
        req.headers_mut().remove(h);
    }
    req
}

/// A path of the sandbox as the E2B SDK names it, mapped into `/mnt/data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPath {
    /// Relative to `/mnt/data` (`""`: `/mnt/data` itself).
    pub rel: String,
    /// The root the client named (`/home/user` or `/mnt/data`), to answer paths in its terms.
    pub root: &'static str,
}

/// E2B's home directory, mapped onto `/mnt/data`.
pub const HOME: &str = "/home/user";

impl SandboxPath {
    /// Maps a client's path: `/home/user/…` and `/mnt/data/…` (and paths relative to the home
    /// directory) are the sandbox's files; anything else is refused, saying why.
    pub fn parse(path: &str) -> Result<Self, E2bError> {
        let path = path.trim();
        let (root, rest) = if path == HOME || path == "/mnt/data" {
            (if path == HOME { HOME } else { "/mnt/data" }, "")
        } else if let Some(r) = path.strip_prefix("/home/user/") {
            (HOME, r)
        } else if let Some(r) = path.strip_prefix("/mnt/data/") {
            ("/mnt/data", r)
        } else if let Some(r) = path.strip_prefix("~/") {
            (HOME, r)
        } else if path == "~" || path.is_empty() || path == "." {
            (HOME, "")
        } else if path.starts_with('/') {
            return Err(E2bError::invalid(format!(
                "{path:?} is outside the sandbox's files: ampoule sandboxes expose /home/user \
                 (the same directory as /mnt/data) to file calls; run a command to reach other \
                 paths"
            )));
        } else {
            (HOME, path)
        };
        let rel = ampoule_core::files::data_dir(rest)
            .map_err(|e| E2bError::invalid(format!("{path:?}: {e}")))?;
        Ok(Self { rel, root })
    }

    /// The path in the client's terms.
    pub fn display(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.root.to_owned()
        } else {
            format!("{}/{rel}", self.root)
        }
    }
}

/// A working directory from the client: `/home/user` (the SDK's default) is `/mnt/data`;
/// other absolute paths are passed on (the sandbox decides), `None` stays `None`.
pub fn map_cwd(cwd: Option<&str>) -> Option<String> {
    let cwd = cwd.map(str::trim).filter(|c| !c.is_empty())?;
    if cwd == HOME || cwd == "~" {
        Some("/mnt/data".into())
    } else if let Some(rest) = cwd.strip_prefix("/home/user/") {
        Some(format!("/mnt/data/{rest}"))
    } else if cwd.starts_with('/') {
        Some(cwd.to_owned())
    } else {
        Some(format!("/mnt/data/{cwd}"))
    }
}

/// A body read whole, at most `max` bytes.
pub(crate) async fn read_body(body: Body, max: usize) -> Result<bytes::Bytes, E2bError> {
    axum::body::to_bytes(body, max).await.map_err(|_| {
        E2bError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is unreadable or larger than {max} bytes"),
        )
    })
}

/// Makes the door's state for a config's `[e2b]` table.
pub fn door(domain: Option<&str>) -> Arc<Door> {
    Arc::new(Door::new(domain.unwrap_or(DEFAULT_DOMAIN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_home_onto_data_and_refuse_the_rest() {
        let p = SandboxPath::parse("/home/user/a/b.txt").unwrap();
        assert_eq!((p.rel.as_str(), p.root), ("a/b.txt", HOME));
        assert_eq!(p.display("a/b.txt"), "/home/user/a/b.txt");
        assert_eq!(SandboxPath::parse("/home/user").unwrap().rel, "");
        assert_eq!(
            SandboxPath::parse("/mnt/data/x").unwrap().display("x"),
            "/mnt/data/x"
        );
        assert_eq!(SandboxPath::parse("rel/x").unwrap().rel, "rel/x");
        for bad in ["/etc/passwd", "/tmp/x", "/home/user/../x", "/home/userx"] {
            assert!(SandboxPath::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(map_cwd(Some("/home/user")).as_deref(), Some("/mnt/data"));
        assert_eq!(
            map_cwd(Some("/home/user/p")).as_deref(),
            Some("/mnt/data/p")
        );
        assert_eq!(map_cwd(Some("/tmp")).as_deref(), Some("/tmp"));
        assert_eq!(map_cwd(None), None);
    }

    #[test]
    fn routes_come_from_headers_or_the_host() {
        let r = Request::builder()
            .header("e2b-sandbox-id", "sbx_ab")
            .header("e2b-sandbox-port", "49999")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            route_of(&r).unwrap().unwrap(),
            Route {
                sandbox: "sbx_ab".into(),
                port: 49999,
                by_host: false
            }
        );
        let r = Request::builder()
            .header("host", "8000-sbx_ab12.ampoule.localhost:8080")
            .body(Body::empty())
            .unwrap();
        assert_eq!(route_of(&r).unwrap().unwrap().port, 8000);
        for host in [
            "127.0.0.1:8080",
            "my-server.example.com",
            "8000-foo.example.com",
        ] {
            let r = Request::builder()
                .header("host", host)
                .body(Body::empty())
                .unwrap();
            assert!(route_of(&r).is_none(), "{host}");
        }
        let r = Request::builder()
            .header("e2b-sandbox-id", "sbx_ab")
            .header("e2b-sandbox-port", "http")
            .body(Body::empty())
            .unwrap();
        assert!(route_of(&r).unwrap().is_err());
    }
}
