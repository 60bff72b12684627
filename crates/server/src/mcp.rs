//! The MCP front door: [`ManagerApi`] implements `ampoule_mcp::SandboxApi` over the core's
//! commands, and [`service`] mounts the MCP streamable HTTP transport (`/mcp`) behind the same
//! bearer keys as the other APIs.
//!
//! A tool's `session` is an identifier in the tenant's table (like the ACA `identifier`):
//! found in whichever pool holds it, else started in the pool of the requested language (the
//! default pool when none is named) — [`ampoule_core::Target::Conversation`]. Each tool is
//! one command of the core, so a refused call (rate limit, policy) starts no sandbox; nothing
//! here touches a sandbox.

use std::sync::Arc;

use ampoule_core::{Caller as CoreCaller, ExecuteCommand, Manager, PutFile, Target};
use ampoule_mcp::{
    ApiFailure, Caller, Execute, Executed, FileSummary, SandboxApi, SandboxState, SessionSummary,
    Transition,
};
use async_trait::async_trait;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// The sandbox API of the MCP tools, over the core's [`Manager`].
#[derive(Debug, Clone)]
pub struct ManagerApi {
    manager: Manager,
    max_upload: u64,
}

fn failure(e: ampoule_core::Error) -> ApiFailure {
    ApiFailure::new(e.code().as_str(), e.to_string())
}

/// The core's caller of an MCP call (with the request's context, checked at the door).
fn caller(c: &Caller) -> CoreCaller {
    let mut out = CoreCaller::new(c.tenant.clone());
    out.request_id = c.request_id.clone();
    out.key_id = c.key_id.clone();
    if let Some(m) = &c.context {
        // Checked when the request came in (`authenticate`).
        out.context =
            ampoule_core::caller::CallerContext::new(serde_json::Value::Object(m.clone()))
                .ok()
                .map(std::sync::Arc::new);
    }
    out
}

impl ManagerApi {
    /// Over `manager`, accepting uploads up to `max_upload` bytes.
    pub fn new(manager: Manager, max_upload: u64) -> Self {
        Self {
            manager,
            max_upload,
        }
    }
}

#[async_trait]
impl SandboxApi for ManagerApi {
    async fn execute(&self, caller: &Caller, req: Execute) -> Result<Executed, ApiFailure> {
        let target = Target::Conversation {
            identifier: req.session,
            language: req.language.clone(),
        };
        let cmd = ExecuteCommand {
            target,
            code: req.code,
            language: req.language,
            timeout_s: req.timeout_s,
            inputs: None,
            context: None,
        };
        let by = self::caller(caller)
            .with_context(req.context)
            .map_err(failure)?;
        let done = self.manager.execute(&by, cmd).await.map_err(failure)?;
        Ok(Executed {
            session: done.session.identifier,
            execution_id: Some(done.execution_id),
            result: done.result,
        })
    }

    async fn list_sessions(&self, caller: &Caller) -> Result<Vec<SessionSummary>, ApiFailure> {
        Ok(self
            .manager
            .list_sessions(&self::caller(caller), None)
            .map_err(failure)?
            .into_iter()
            .map(|s| SessionSummary {
                language: s.language.as_str().to_owned(),
                created_at: crate::files::rfc3339(s.created_at),
                last_used_at: crate::files::rfc3339(s.last_used_at),
                executions: s.executions,
                session: s.identifier,
                pool: s.pool,
            })
            .collect())
    }

    async fn delete_session(&self, caller: &Caller, session: &str) -> Result<(), ApiFailure> {
        self.manager
            .delete_session(&self::caller(caller), &Target::Name(session.to_owned()))
            .await
            .map_err(failure)
    }

    async fn list_files(
        &self,
        caller: &Caller,
        session: &str,
    ) -> Result<Vec<FileSummary>, ApiFailure> {
        let (_, files) = self
            .manager
            .list_files(&self::caller(caller), &Target::Name(session.to_owned()))
            .await
            .map_err(failure)?;
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
        let cmd = PutFile {
            target: Target::Conversation {
                identifier: session.map(str::to_owned),
                language: None,
            },
            path: path.to_owned(),
            body: Box::pin(futures_util::stream::iter([Ok(bytes::Bytes::from(data))])),
            max: self.max_upload,
        };
        let (s, info) = self
            .manager
            .put_file(&self::caller(caller), cmd)
            .await
            .map_err(failure)?;
        Ok((
            s.identifier,
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
        let d = self
            .manager
            .get_file(
                &self::caller(caller),
                &Target::Name(session.to_owned()),
                path,
            )
            .await
            .map_err(failure)?;
        if d.info.size > max {
            return Err(ApiFailure::new(
                "payload_too_large",
                format!(
                    "{path} is {} bytes, more than the {max} bytes an MCP reply carries; read \
                     it with code in the session, or through the native API",
                    d.info.size
                ),
            ));
        }
        let size = d.info.size;
        let file = d.file;
        // A blocking read of an open file, never a sandbox start: safe on the blocking pool.
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut data = Vec::new();
            // Sandboxed code may grow the file meanwhile: never read more than announced.
            file.take(size).read_to_end(&mut data).map(|_| data)
        });
        match read.await {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(e)) => Err(failure(ampoule_core::Error::internal(format!(
                "reading {path}: {e}"
            )))),
            Err(e) => Err(failure(ampoule_core::Error::internal(e))),
        }
    }

    async fn transition(
        &self,
        caller: &Caller,
        sandbox: &str,
        to: Transition,
    ) -> Result<SandboxState, ApiFailure> {
        let caller = self::caller(caller);
        // By id, else by a session's name (hibernated ones included).
        let all = self
            .manager
            .list_sandboxes(&caller, &Default::default(), None);
        let id = all
            .iter()
            .find(|s| s.id == sandbox)
            .or_else(|| all.iter().find(|s| s.identifier == sandbox))
            .map(|s| s.id.clone())
            .ok_or_else(|| failure(ampoule_core::Error::session_not_found()))?;
        let s = match to {
            Transition::Pause => self.manager.pause_sandbox(&caller, &id).await,
            Transition::Resume => self.manager.resume_sandbox(&caller, &id, None).await,
            Transition::Hibernate => self.manager.hibernate_sandbox(&caller, &id).await,
        }
        .map_err(failure)?;
        Ok(SandboxState {
            sandbox_id: s.id,
            session: s.identifier,
            state: s.state.to_owned(),
            session_state: s.session_state.to_owned(),
            durable: s.durable,
        })
    }
}

/// Authenticates an `/mcp` request like every other API call and hands the key's tenant (and
/// the request's id) to the MCP service as its [`Caller`].
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    match state.keys.identify(req.headers(), req.extensions()) {
        Ok((tenant, key_id)) => {
            let mut caller = Caller::new(tenant);
            caller.key_id = Some(key_id);
            match crate::auth::header_context(req.headers()) {
                Ok(c) => caller.context = c,
                Err(e) => return e.into_response(),
            }
            caller.request_id = req
                .extensions()
                .get::<crate::auth::RequestId>()
                .map(|r| r.0.clone());
            req.extensions_mut().insert(caller);
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
