//! The sandbox API the MCP tools call: [`SandboxApi`], one small trait with two
//! implementations — in process over the server's session manager (`ampoule-server`'s `mcp`
//! module; `ampoule serve` at `/mcp`, and `ampoule mcp` when no server is configured), and
//! over a server's native `/v1` HTTP API ([`crate::client::HttpApi`], `ampoule mcp --url`).
//!
//! Sessions are named by the caller (like the ACA `identifier`): a tool that takes an optional
//! `session` starts one under a generated name when none is given, and one under the given name
//! on its first use. An MCP transport session is never a sandbox session.

use ampoule_types::ExecutionResult;
use async_trait::async_trait;
use serde::Serialize;

use crate::error::ApiFailure;

/// Who is calling: the tenant the front door authenticated (the bearer key's tenant over HTTP,
/// a fixed local tenant over stdio). Over HTTP the server's auth layer puts it in the request's
/// extensions before the MCP service sees the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant.
    pub tenant: String,
    /// The id of the HTTP request carrying the call (`X-Request-Id`), when there is one; the
    /// server writes it into the audit records the call causes.
    pub request_id: Option<String>,
    /// The non-secret id of the API key the call came with, for the audit records.
    pub key_id: Option<String>,
    /// The context the request carried (`X-Ampoule-Context`), checked by the server; a
    /// tool's `context` argument takes its place.
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Caller {
    /// A caller of `tenant`.
    pub fn new(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            request_id: None,
            key_id: None,
            context: None,
        }
    }
}

/// One execution to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Execute {
    /// The session's name; `None` starts a session under a generated name.
    pub session: Option<String>,
    /// The language (`python`, `javascript`, `shell` or an alias); `None` means the session's
    /// own, or the default pool's for a new session.
    pub language: Option<String>,
    /// Source code.
    pub code: String,
    /// Wall-clock limit in seconds (default and maximum: the pool's).
    pub timeout_s: Option<f64>,
    /// Why the agent runs it (`prompt`, `run_id`, `agent`, `step`, …): kept in the
    /// execution's audit record.
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

/// What an execution returned, and in which session it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    /// The session's name (pass it back to keep the state).
    pub session: String,
    /// The execution's id (`exe_…`), which its audit record and log lines carry; `None` from
    /// a server too old to say.
    pub execution_id: Option<String>,
    /// The result.
    pub result: ExecutionResult,
}

/// A session as the tools list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionSummary {
    /// The session's name (the `session` argument of the tools).
    pub session: String,
    /// Its language.
    pub language: String,
    /// Its pool.
    pub pool: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it was last used (RFC 3339).
    pub last_used_at: String,
    /// Executions so far.
    pub executions: u64,
}

/// A file in a session's `/mnt/data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSummary {
    /// Path relative to `/mnt/data`.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
}

/// A change of a sandbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Freeze it, memory kept.
    Pause,
    /// Run it again.
    Resume,
    /// Put it on disk, memory not kept.
    Hibernate,
}

impl Transition {
    /// Its name in the `/v1` paths (`…/pause`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Pause => "pause",
            Transition::Resume => "resume",
            Transition::Hibernate => "hibernate",
        }
    }
}

/// A sandbox's state as the tools report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxState {
    /// Its id (`sbx_…`, or a session's `ses_…`).
    pub sandbox_id: String,
    /// Its name (a session's; a sandbox's is its id).
    pub session: String,
    /// `running`, `paused` or `hibernated`.
    pub state: String,
    /// `kept`, or `lost` once it was hibernated (variables and processes gone, files
    /// intact).
    pub session_state: String,
    /// Whether its files are on disk (it can hibernate).
    pub durable: bool,
}

/// The sandbox operations behind the MCP tools. Every call names its [`Caller`]; a session of
/// another tenant is reported exactly like a missing one.
#[async_trait]
pub trait SandboxApi: Send + Sync + 'static {
    /// Runs code, in the named session (started on first use) or in a new one.
    async fn execute(&self, caller: &Caller, req: Execute) -> Result<Executed, ApiFailure>;

    /// The caller's sessions, oldest first.
    async fn list_sessions(&self, caller: &Caller) -> Result<Vec<SessionSummary>, ApiFailure>;

    /// Destroys a session and its files.
    async fn delete_session(&self, caller: &Caller, session: &str) -> Result<(), ApiFailure>;

    /// Every regular file in a session's `/mnt/data`, recursively.
    async fn list_files(
        &self,
        caller: &Caller,
        session: &str,
    ) -> Result<Vec<FileSummary>, ApiFailure>;

    /// Writes `data` to `path` below `/mnt/data` (parents created, an existing file replaced),
    /// in the named session (started on first use) or in a new one. Returns the session's name
    /// and the file.
    async fn upload(
        &self,
        caller: &Caller,
        session: Option<&str>,
        path: &str,
        data: Vec<u8>,
    ) -> Result<(String, FileSummary), ApiFailure>;

    /// The content of the file at `path` below `/mnt/data`; refused when it is larger than
    /// `max` bytes.
    async fn download(
        &self,
        caller: &Caller,
        session: &str,
        path: &str,
        max: u64,
    ) -> Result<Vec<u8>, ApiFailure>;

    /// Pauses, resumes or hibernates a sandbox, named by its id or its session's name.
    async fn transition(
        &self,
        _caller: &Caller,
        _sandbox: &str,
        _to: Transition,
    ) -> Result<SandboxState, ApiFailure> {
        Err(ApiFailure::new(
            "not_supported",
            "this server cannot pause, resume or hibernate sandboxes",
        ))
    }
}

/// A path as a tool caller writes it (`/mnt/data/x.csv` or `x.csv`), relative to `/mnt/data`.
/// Other absolute paths are refused here; `..` and links are refused by the server.
pub fn data_path(path: &str) -> Result<&str, ApiFailure> {
    let rel = path
        .strip_prefix("/mnt/data/")
        .unwrap_or(path)
        .trim_start_matches("./");
    if rel.is_empty() || rel == "/mnt/data" {
        return Err(ApiFailure::new("invalid_path", "the path names no file"));
    }
    if rel.starts_with('/') {
        return Err(ApiFailure::new(
            "invalid_path",
            format!("{path:?} is not below /mnt/data"),
        ));
    }
    Ok(rel)
}
