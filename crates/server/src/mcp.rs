//! The MCP front door: [`ManagerApi`] implements `ampoule_mcp::SandboxApi` over the session
//! manager, and [`service`] mounts the MCP streamable HTTP transport (`/mcp`) behind the same
//! bearer keys as the other APIs.
//!
//! A tool's `session` is an identifier in the tenant's table (like the ACA `identifier`):
//! found in whichever pool holds it, else started in the pool of the requested language (the
//! default pool when none is named). Files go through the session's scratch space exactly as
//! on the native API; nothing here touches a sandbox.

use std::sync::Arc;

use ampoule_mcp::{ApiFailure, Caller, Execute, Executed, FileSummary, SandboxApi, SessionSummary};
use ampoule_runtime::scratch::DATA;
use async_trait::async_trait;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::engine::ExecRequest;
use crate::error::ApiError;
use crate::manager::{Manager, Session};

/// The hosts `/mcp` accepts by default (DNS-rebinding protection): loopback only.
pub const DEFAULT_ALLOWED_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The sandbox API of the MCP tools, over a [`Manager`].
#[derive(Debug, Clone)]
pub struct ManagerApi {
    manager: Manager,
    max_upload: u64,
}

fn failure(e: ApiError) -> ApiFailure {
    ApiFailure::new(e.code.as_str(), e.message)
}

impl ManagerApi {
    /// Over `manager`, accepting uploads up to `max_upload` bytes.
    pub fn new(manager: Manager, max_upload: u64) -> Self {
        Self {
            manager,
            max_upload,
        }
    }

    fn find(&self, tenant: &str, name: &str) -> Option<Arc<Session>> {
        self.manager
            .list(tenant)
            .into_iter()
            .find(|s| s.identifier == name)
    }

    fn existing(&self, tenant: &str, name: &str) -> Result<Arc<Session>, ApiFailure> {
        self.find(tenant, name).ok_or_else(|| {
            ApiFailure::new(
                "session_not_found",
                format!(
                    "no session {name:?} (it may have expired; list_sessions shows the live ones)"
                ),
            )
        })
    }

    fn language_of(&self, s: &Session) -> String {
        self.manager
            .pool(&s.pool)
            .map(|p| p.spec.language.as_str().to_owned())
            .unwrap_or_default()
    }

    /// The pool for a new session in `language`: the default pool when it runs it, else the
    /// pool named after it, else the first that runs it.
    fn pool_for(&self, language: Option<&str>) -> Result<String, ApiFailure> {
        let default = self.manager.default_pool().to_owned();
        let Some(lang) = language else {
            return Ok(default);
        };
        let wanted = ampoule_types::Language::parse(lang).ok_or_else(|| {
            ApiFailure::invalid(format!(
                "unknown language {lang:?}: use python, javascript or shell"
            ))
        })?;
        let pools = self.manager.pools();
        pools
            .iter()
            .find(|p| p.name == default && p.language == wanted.as_str())
            .or_else(|| {
                pools
                    .iter()
                    .find(|p| p.name == wanted.as_str() && p.language == wanted.as_str())
            })
            .or_else(|| pools.iter().find(|p| p.language == wanted.as_str()))
            .map(|p| p.name.clone())
            .ok_or_else(|| {
                ApiFailure::new(
                    "pool_not_found",
                    format!("this server runs no {wanted} sessions"),
                )
            })
    }

    /// The named session (checked against `language`), started on first use; or a new one.
    async fn session(
        &self,
        tenant: &str,
        name: Option<&str>,
        language: Option<&str>,
    ) -> Result<Arc<Session>, ApiFailure> {
        if let Some(name) = name
            && let Some(s) = self.find(tenant, name)
        {
            if let Some(lang) = language {
                let has = self.language_of(&s);
                let wanted = ampoule_types::Language::parse(lang).map(|l| l.as_str());
                if wanted != Some(has.as_str()) {
                    return Err(ApiFailure::invalid(format!(
                        "session {name:?} runs {has}, not {lang}: use another session name"
                    )));
                }
            }
            return Ok(s);
        }
        if let Some(name) = name {
            crate::aca::check_identifier(name).map_err(failure)?;
        }
        let pool = self.pool_for(language)?;
        let (s, _) = self
            .manager
            .create(tenant, Some(&pool), name)
            .await
            .map_err(failure)?;
        Ok(s)
    }
}

#[async_trait]
impl SandboxApi for ManagerApi {
    async fn execute(&self, caller: &Caller, req: Execute) -> Result<Executed, ApiFailure> {
        let s = self
            .session(
                &caller.tenant,
                req.session.as_deref(),
                req.language.as_deref(),
            )
            .await?;
        let timeout_s = self
            .manager
            .timeout_for(&caller.tenant, &s.pool, req.timeout_s)
            .await
            .map_err(failure)?;
        let exec = ExecRequest {
            code: req.code,
            timeout_s,
            inputs: None,
        };
        let result = self
            .manager
            .execute(&s, exec, None)
            .await
            .map_err(failure)?;
        Ok(Executed {
            session: s.identifier.clone(),
            result,
        })
    }

    async fn list_sessions(&self, caller: &Caller) -> Result<Vec<SessionSummary>, ApiFailure> {
        Ok(self
            .manager
            .list(&caller.tenant)
            .iter()
            .map(|s| SessionSummary {
                session: s.identifier.clone(),
                language: self.language_of(s),
                pool: s.pool.clone(),
                created_at: crate::files::rfc3339(s.created_at),
                last_used_at: crate::files::rfc3339(s.last_used_at()),
                executions: s.executions(),
            })
            .collect())
    }

    async fn delete_session(&self, caller: &Caller, session: &str) -> Result<(), ApiFailure> {
        let s = self.existing(&caller.tenant, session)?;
        self.manager
            .delete(&caller.tenant, &s.id)
            .await
            .map_err(failure)
    }

    async fn list_files(
        &self,
        caller: &Caller,
        session: &str,
    ) -> Result<Vec<FileSummary>, ApiFailure> {
        let s = self.existing(&caller.tenant, session)?;
        let _call = self.manager.file_call(&s);
        let files = crate::files::list(&s.live()).await.map_err(failure)?;
        Ok(files
            .into_iter()
            .map(|f| FileSummary {
                path: f.path,
                size: f.size,
            })
            .collect())
    }

    async fn upload(
        &self,
        caller: &Caller,
        session: Option<&str>,
        path: &str,
        data: Vec<u8>,
    ) -> Result<(String, FileSummary), ApiFailure> {
        if data.len() as u64 > self.max_upload {
            return Err(ApiFailure::new(
                "payload_too_large",
                format!("the file is larger than the {}-byte limit", self.max_upload),
            ));
        }
        let s = self.session(&caller.tenant, session, None).await?;
        let _call = self.manager.file_call(&s);
        let info = crate::files::upload_raw(
            &s.live(),
            path,
            axum::body::Body::from(data),
            self.max_upload,
        )
        .await
        .map_err(failure)?;
        Ok((
            s.identifier.clone(),
            FileSummary {
                path: info.path,
                size: info.size,
            },
        ))
    }

    async fn download(
        &self,
        caller: &Caller,
        session: &str,
        path: &str,
        max: u64,
    ) -> Result<Vec<u8>, ApiFailure> {
        let s = self.existing(&caller.tenant, session)?;
        let _call = self.manager.file_call(&s);
        let live = s.live();
        let p = path.to_owned();
        // A blocking scratch read, never a sandbox start: safe on the blocking pool.
        let read = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiFailure> {
            use std::io::Read;
            let scratch = live.scratch().map_err(|e| failure(e.into()))?;
            let (file, info) = scratch
                .open(DATA, &p)
                .map_err(|e| failure(ApiError::from(e)))?;
            if info.size > max {
                return Err(ApiFailure::new(
                    "payload_too_large",
                    format!(
                        "{p} is {} bytes, more than the {max} bytes an MCP reply carries; read \
                         it with code in the session, or through the native API",
                        info.size
                    ),
                ));
            }
            let mut data = Vec::new();
            // Sandboxed code may grow the file meanwhile: never read more than announced.
            file.take(info.size)
                .read_to_end(&mut data)
                .map_err(|e| failure(ApiError::internal(format!("reading {p}: {e}"))))?;
            Ok(data)
        });
        read.await.map_err(|e| failure(ApiError::internal(e)))?
    }
}

/// Authenticates an `/mcp` request like every other API call and hands the key's tenant to
/// the MCP service as its [`Caller`].
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    match state.keys.tenant(req.headers()) {
        Ok(tenant) => {
            req.extensions_mut().insert(Caller::new(tenant));
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The `/mcp` endpoint: the streamable HTTP transport over the state's manager, behind the
/// bearer keys.
pub fn service(state: &AppState) -> Router {
    let api = Arc::new(ManagerApi::new(state.manager.clone(), state.max_upload));
    // Base64 makes an upload a third larger; JSON-RPC adds a little.
    let max_body =
        usize::try_from(state.max_upload.saturating_mul(4) / 3 + 64 * 1024).unwrap_or(usize::MAX);
    let mcp = ampoule_mcp::http_service(api, state.mcp_allowed_hosts.clone(), max_body);
    Router::new()
        .fallback_service(mcp)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::{Config, sha256_hex};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn mcp_app(extra: &str) -> (Router, tempfile::TempDir) {
        let root = tempfile::tempdir().unwrap();
        let cfg = Config::parse(&format!(
            "[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n[pools.python]\nwarm = 0\n{extra}",
            sha256_hex("k")
        ))
        .unwrap();
        let engine = crate::fake::FakeEngine::new(root.path());
        let keys = crate::serve::keys(&cfg).unwrap();
        let state = crate::serve::state(&cfg, Arc::new(engine), keys).unwrap();
        (crate::app(state), root)
    }

    async fn post(app: &Router, host: &str, key: Option<&str>, body: &str) -> (StatusCode, String) {
        let mut req = Request::post("/mcp")
            .header("host", host)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    const LIST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#;

    #[tokio::test]
    async fn mcp_needs_a_key_and_an_allowed_host() {
        let (app, _root) = mcp_app("");
        let (status, body) = post(&app, "127.0.0.1:8080", None, LIST).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let (status, _) = post(&app, "127.0.0.1:8080", Some("wrong"), LIST).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = post(&app, "evil.example", Some("k"), LIST).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, body) = post(&app, "localhost:8080", Some("k"), LIST).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("execute_code"), "{body}");
        let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"list_files","arguments":{"session":"nope"}}}"#;
        let (status, body) = post(&app, "localhost", Some("k"), call).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains(r#""isError":true"#), "{body}");
        assert!(body.contains("session_not_found"), "{body}");
    }

    #[tokio::test]
    async fn allowed_hosts_come_from_the_config() {
        let (app, _root) = mcp_app("[mcp]\nallowed_hosts = [\"sandbox.example.com\"]\n");
        let (status, _) = post(&app, "sandbox.example.com", Some("k"), LIST).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = post(&app, "127.0.0.1", Some("k"), LIST).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (app, _root) = mcp_app("[mcp]\nallowed_hosts = [\"*\"]\n");
        let (status, _) = post(&app, "anything.example", Some("k"), LIST).await;
        assert_eq!(status, StatusCode::OK);
        assert!(Config::parse("[mcp]\nallowed_host = []").is_err());
    }
}
