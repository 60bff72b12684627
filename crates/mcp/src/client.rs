//! [`HttpApi`]: the [`SandboxApi`] over a running server's native `/v1` API, for
//! `ampoule mcp --url URL`. One HTTP/1.1 connection per call (plain `http://`; put a TLS
//! server behind its `/mcp` endpoint instead, which MCP clients reach directly).

use ampoule_types::ExecutionResult;
use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;

use crate::api::{
    Caller, Execute, Executed, FileSummary, SandboxApi, SandboxState, SessionSummary, Transition,
};
use crate::error::ApiFailure;

/// Largest response body read (a download is capped by its caller below this).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// A server's `/v1` API.
#[derive(Debug, Clone)]
pub struct HttpApi {
    /// `host:port` to connect to.
    authority: String,
    /// Path prefix (no trailing `/`), when the server is mounted below one.
    prefix: String,
    /// The bearer key.
    key: Option<String>,
    /// The URL as given, for messages.
    url: String,
}

#[derive(Deserialize)]
struct SessionInfo {
    id: String,
    pool: String,
    identifier: String,
    language: String,
    created_at: String,
    last_used_at: String,
    executions: u64,
}

#[derive(Deserialize)]
struct SessionList {
    sessions: Vec<SessionInfo>,
}

/// A sandbox as `/v1/sandboxes` answers it (the fields the tools report).
#[derive(Deserialize)]
struct SandboxInfo {
    id: String,
    identifier: String,
    state: String,
    session_state: String,
    durable: bool,
}

impl From<SandboxInfo> for SandboxState {
    fn from(s: SandboxInfo) -> Self {
        Self {
            sandbox_id: s.id,
            session: s.identifier,
            state: s.state,
            session_state: s.session_state,
            durable: s.durable,
        }
    }
}

#[derive(Deserialize)]
struct SandboxList {
    sandboxes: Vec<SandboxInfo>,
}

#[derive(Deserialize)]
struct PoolInfo {
    name: String,
    language: String,
}

#[derive(Deserialize)]
struct PoolList {
    pools: Vec<PoolInfo>,
}

#[derive(Deserialize)]
struct FileItem {
    path: String,
    size: u64,
}

#[derive(Deserialize)]
struct FileList {
    files: Vec<FileItem>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_path(path: &str) -> String {
    path.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

impl HttpApi {
    /// A client of the server at `url` (`http://host:port[/prefix]`) with an API key.
    pub fn new(url: &str, key: Option<String>) -> Result<Self, ApiFailure> {
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err(ApiFailure::invalid(format!(
                "{url}: `ampoule mcp --url` speaks plain http (a server on this host or a \
                 private network); MCP clients reach an https server at its /mcp endpoint \
                 directly"
            )));
        } else {
            return Err(ApiFailure::invalid(format!(
                "{url}: expected http://HOST:PORT"
            )));
        };
        let (authority, prefix) = match rest.split_once('/') {
            Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        let prefix = if prefix == "/" { String::new() } else { prefix };
        if authority.is_empty() {
            return Err(ApiFailure::invalid(format!("{url}: no host")));
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            authority,
            prefix,
            key: key.filter(|k| !k.trim().is_empty()),
            url: url.to_owned(),
        })
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> ApiFailure {
        ApiFailure::new(
            "unavailable",
            format!("cannot reach the ampoule server at {}: {e}", self.url),
        )
    }

    /// One request; the body of a 2xx answer, else the server's error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Bytes, ApiFailure> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| self.unreachable(e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection to the ampoule server");
            }
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(header::HOST, &self.authority);
        if let Some(key) = &self.key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let (ct, payload) = body.unwrap_or(("application/json", Bytes::new()));
        let req = req
            .header(header::CONTENT_TYPE, ct)
            .body(Full::new(payload))
            .map_err(|e| ApiFailure::invalid(format!("building the request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let limited = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| self.unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => ApiFailure::new(b.error.code, b.error.message),
            Err(_) if status == StatusCode::UNAUTHORIZED => {
                ApiFailure::new("unauthorized", "the server refused the API key")
            }
            Err(_) => ApiFailure::new(
                "unavailable",
                format!("the server at {} answered {status}", self.url),
            ),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ApiFailure> {
        let bytes = self.call(Method::GET, path, None).await?;
        self.parse(&bytes)
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, ApiFailure> {
        serde_json::from_slice(bytes).map_err(|e| {
            ApiFailure::new(
                "unavailable",
                format!("unexpected answer from {}: {e}", self.url),
            )
        })
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, ApiFailure> {
        Ok(self.get_json::<SessionList>("/v1/sessions").await?.sessions)
    }

    async fn find(&self, name: &str) -> Result<Option<SessionInfo>, ApiFailure> {
        Ok(self
            .sessions()
            .await?
            .into_iter()
            .find(|s| s.identifier == name))
    }

    async fn existing(&self, name: &str) -> Result<SessionInfo, ApiFailure> {
        self.find(name).await?.ok_or_else(|| no_session(name))
    }

    /// The pool for a new session in `language` (`None`: the server's default pool).
    async fn pool_for(&self, language: Option<&str>) -> Result<Option<String>, ApiFailure> {
        let Some(lang) = language else {
            return Ok(None);
        };
        let wanted = canonical(lang)?;
        let pools = self.get_json::<PoolList>("/v1/pools").await?.pools;
        pools
            .iter()
            .find(|p| p.language == wanted && p.name == wanted)
            .or_else(|| pools.iter().find(|p| p.language == wanted))
            .map(|p| Some(p.name.clone()))
            .ok_or_else(|| no_pool(wanted))
    }

    /// The named session (checked against `language`), else a new one.
    async fn session(
        &self,
        name: Option<&str>,
        language: Option<&str>,
    ) -> Result<SessionInfo, ApiFailure> {
        if let Some(name) = name
            && let Some(s) = self.find(name).await?
        {
            if let Some(lang) = language {
                let wanted = canonical(lang)?;
                if wanted != s.language {
                    return Err(wrong_language(name, &s.language, wanted));
                }
            }
            return Ok(s);
        }
        let pool = self.pool_for(language).await?;
        let body = json!({"pool": pool, "identifier": name}).to_string();
        let bytes = self
            .call(
                Method::POST,
                "/v1/sessions",
                Some(("application/json", Bytes::from(body))),
            )
            .await?;
        self.parse(&bytes)
    }
}

/// The canonical name of a language, or a clear refusal.
pub(crate) fn canonical(lang: &str) -> Result<&'static str, ApiFailure> {
    ampoule_types::Language::parse(lang)
        .map(ampoule_types::Language::as_str)
        .ok_or_else(|| {
            ApiFailure::invalid(format!(
                "unknown language {lang:?}: use one of {}",
                ampoule_types::Language::names()
            ))
        })
}

pub(crate) fn no_session(name: &str) -> ApiFailure {
    ApiFailure::new(
        "session_not_found",
        format!("no session {name:?} (it may have expired; list_sessions shows the live ones)"),
    )
}

pub(crate) fn no_pool(language: &str) -> ApiFailure {
    ApiFailure::new(
        "pool_not_found",
        format!("this server runs no {language} sessions"),
    )
}

pub(crate) fn wrong_language(name: &str, has: &str, wanted: &str) -> ApiFailure {
    ApiFailure::invalid(format!(
        "session {name:?} runs {has}, not {wanted}: use another session name for {wanted}"
    ))
}

#[async_trait]
impl SandboxApi for HttpApi {
    async fn execute(&self, _caller: &Caller, req: Execute) -> Result<Executed, ApiFailure> {
        let s = self
            .session(req.session.as_deref(), req.language.as_deref())
            .await?;
        let body = json!({"code": req.code, "timeout_s": req.timeout_s, "context": req.context})
            .to_string();
        let bytes = self
            .call(
                Method::POST,
                &format!("/v1/sessions/{}/executions", encode_segment(&s.id)),
                Some(("application/json", Bytes::from(body))),
            )
            .await?;
        let result: ExecutionResult = self.parse(&bytes)?;
        // The result's id sits beside its fields (`/v1` flattens them into one object).
        let execution_id = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("execution_id")?.as_str().map(str::to_owned));
        Ok(Executed {
            session: s.identifier,
            execution_id,
            result,
        })
    }

    async fn list_sessions(&self, _caller: &Caller) -> Result<Vec<SessionSummary>, ApiFailure> {
        Ok(self
            .sessions()
            .await?
            .into_iter()
            .map(|s| SessionSummary {
                session: s.identifier,
                language: s.language,
                pool: s.pool,
                created_at: s.created_at,
                last_used_at: s.last_used_at,
                executions: s.executions,
            })
            .collect())
    }

    async fn delete_session(&self, _caller: &Caller, session: &str) -> Result<(), ApiFailure> {
        let s = self.existing(session).await?;
        self.call(
            Method::DELETE,
            &format!("/v1/sessions/{}", encode_segment(&s.id)),
            None,
        )
        .await?;
        Ok(())
    }

    async fn list_files(
        &self,
        _caller: &Caller,
        session: &str,
    ) -> Result<Vec<FileSummary>, ApiFailure> {
        let s = self.existing(session).await?;
        let list: FileList = self
            .get_json(&format!("/v1/sessions/{}/files", encode_segment(&s.id)))
            .await?;
        Ok(list
            .files
            .into_iter()
            .map(|f| FileSummary {
                path: f.path,
                size: f.size,
            })
            .collect())
    }

    async fn upload(
        &self,
        _caller: &Caller,
        session: Option<&str>,
        path: &str,
        data: Vec<u8>,
    ) -> Result<(String, FileSummary), ApiFailure> {
        let s = self.session(session, None).await?;
        let bytes = self
            .call(
                Method::PUT,
                &format!(
                    "/v1/sessions/{}/files/{}",
                    encode_segment(&s.id),
                    encode_path(path)
                ),
                Some(("application/octet-stream", Bytes::from(data))),
            )
            .await?;
        let f: FileItem = self.parse(&bytes)?;
        Ok((
            s.identifier,
            FileSummary {
                path: f.path,
                size: f.size,
            },
        ))
    }

    async fn download(
        &self,
        _caller: &Caller,
        session: &str,
        path: &str,
        max: u64,
    ) -> Result<Vec<u8>, ApiFailure> {
        let s = self.existing(session).await?;
        let base = format!(
            "/v1/sessions/{}/files/{}",
            encode_segment(&s.id),
            encode_path(path)
        );
        let meta: FileItem = self.get_json(&base).await?;
        if meta.size > max {
            return Err(too_big(path, meta.size, max));
        }
        let bytes = self
            .call(Method::GET, &format!("{base}/content"), None)
            .await?;
        if bytes.len() as u64 > max {
            return Err(too_big(path, bytes.len() as u64, max));
        }
        Ok(bytes.to_vec())
    }

    async fn transition(
        &self,
        _caller: &Caller,
        sandbox: &str,
        to: Transition,
    ) -> Result<SandboxState, ApiFailure> {
        // By id, else by a session's name (hibernated ones included).
        let all = self
            .get_json::<SandboxList>("/v1/sandboxes")
            .await?
            .sandboxes;
        let id = all
            .iter()
            .find(|s| s.id == sandbox)
            .or_else(|| all.iter().find(|s| s.identifier == sandbox))
            .map(|s| s.id.clone())
            .ok_or_else(|| no_session(sandbox))?;
        let bytes = self
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{}/{}", encode_segment(&id), to.as_str()),
                None,
            )
            .await?;
        Ok(self.parse::<SandboxInfo>(&bytes)?.into())
    }
}

pub(crate) fn too_big(path: &str, size: u64, max: u64) -> ApiFailure {
    ApiFailure::new(
        "payload_too_large",
        format!(
            "{path} is {size} bytes, more than the {max} bytes an MCP reply carries; read it with \
             code in the session, or through the native API"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_https_is_refused_with_a_reason() {
        let a = HttpApi::new("http://127.0.0.1:8080", Some("k".into())).unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert_eq!(a.authority, "127.0.0.1:8080");
        assert_eq!(a.prefix, "");
        let b = HttpApi::new("http://sandbox.internal/ampoule/", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.authority, "sandbox.internal:80");
        assert_eq!(b.prefix, "/ampoule");
        assert!(HttpApi::new("https://x", None).is_err());
        assert!(HttpApi::new("ftp://x", None).is_err());
    }

    #[test]
    fn file_paths_are_encoded_per_segment() {
        assert_eq!(encode_path("sub dir/a+b.csv"), "sub%20dir/a%2Bb.csv");
    }
}
