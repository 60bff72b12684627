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
            .timeout_for(&s.pool, req.timeout_s)
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
