//! What the audit log holds and how its queries are asked.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
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
    /// A process (a command) ran in a sandbox; `code` is its command line, `status` how it
    /// ended.
    Process,
    /// A request refused by a quota or policy (rate limit, pool, language, timeout, session
    /// limits); `decided_by` names the rule, `session` may be empty.
    Refused,
    /// A sandbox was paused (frozen); `decided_by` is `request` or the lifecycle rule.
    SandboxPaused,
    /// A sandbox was hibernated (written to disk, nothing running); `duration_ms` is the
    /// running time it had since its creation or last resume.
    SandboxHibernated,
    /// A sandbox runs again; `status` is `memory_kept` (from a pause) or `memory_lost`
    /// (from hibernation: its contexts started afresh, its files intact).
    SandboxResumed,
    /// An execution waits for an approver (`identifier` holds the approval id, `execution`
    /// the execution's, `code` what would run).
    ApprovalRequested,
    /// An approval was decided: `status` is `approved`, `denied` or `timed_out`; `key_id` is
    /// the approver's key (none when it timed out), `decided_by` the reason given.
    ApprovalDecided,
}

impl Kind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Execution => "execution",
            Kind::SessionCreated => "session_created",
            Kind::SessionExpired => "session_expired",
            Kind::SessionDeleted => "session_deleted",
            Kind::SessionKilled => "session_killed",
            Kind::Process => "process",
            Kind::Refused => "refused",
            Kind::SandboxPaused => "sandbox_paused",
            Kind::SandboxHibernated => "sandbox_hibernated",
            Kind::SandboxResumed => "sandbox_resumed",
            Kind::ApprovalRequested => "approval_requested",
            Kind::ApprovalDecided => "approval_decided",
        }
    }
}

/// One network attempt of an execution and what the egress policy decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressDecision {
    /// Host (or address) asked for.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Protocol (`http`, `https`, `tcp`, `udp`, `dns`).
    pub protocol: String,
    /// Whether it was let through.
    pub allowed: bool,
    /// Why.
    pub reason: String,
}

/// One audit record as written. Field order is the canonical order of the hashed body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When, in milliseconds since the epoch.
    pub time_ms: i64,
    /// What it is about.
    pub kind: Kind,
    /// The tenant.
    pub tenant: String,
    /// The pool.
    pub pool: String,
    /// The session id.
    pub session: String,
    /// The execution id (executions only).
    pub execution: Option<String>,
    /// The language.
    pub language: Option<String>,
    /// SHA-256 of the code, hex.
    pub code_sha256: Option<String>,
    /// The code itself, unless the pool says not to keep it.
    pub code: Option<String>,
    /// `succeeded`, `failed`, `timed_out`, `killed`.
    pub status: Option<String>,
    /// Wall-clock duration (executions) or lifetime (session end events), in milliseconds.
    pub duration_ms: Option<f64>,
    /// CPU time, in milliseconds.
    pub cpu_time_ms: Option<f64>,
    /// Peak memory, in bytes.
    pub peak_memory_bytes: Option<i64>,
    /// Standard output, trimmed to the pool's `output_bytes`.
    pub stdout: Option<String>,
    /// Standard error, trimmed to the pool's `output_bytes`.
    pub stderr: Option<String>,
    /// Files created or changed in `/mnt/data`.
    pub files: Vec<String>,
    /// Network attempts, allowed and blocked.
    pub egress: Vec<EgressDecision>,
    /// The limit or policy that decided the outcome (`memory`, `time`, `idle_timeout`, …).
    pub decided_by: Option<String>,
    /// The caller's name for the session (the ACA `identifier`, the MCP `session`), when
    /// known. Left out of the body when absent, so records written before it existed hash
    /// as they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    /// The id of the request that caused the record (its `X-Request-Id`), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The non-secret id of the API key that made the request (the first 12 hex digits of
    /// its SHA-256), when a key did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The client's address, for refusals made at the door (failed authentications).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// What the caller said about why it called (a small JSON object: `prompt`, `run_id`,
    /// `agent`, `step`, …), when it said something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Value>,
    /// The context's `run_id`, as a column to search by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// For an execution with a `run_id`: which attempt at this code in this run it is (1 for
    /// the first; 2 and more are retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

impl Record {
    /// A record of `kind` with every optional field empty.
    pub fn new(kind: Kind, time_ms: i64, tenant: &str, pool: &str, session: &str) -> Self {
        Record {
            time_ms,
            kind,
            tenant: tenant.to_owned(),
            pool: pool.to_owned(),
            session: session.to_owned(),
            execution: None,
            language: None,
            code_sha256: None,
            code: None,
            status: None,
            duration_ms: None,
            cpu_time_ms: None,
            peak_memory_bytes: None,
            stdout: None,
            stderr: None,
            files: Vec::new(),
            egress: Vec::new(),
            decided_by: None,
            identifier: None,
            request_id: None,
            key_id: None,
            client: None,
            context: None,
            run_id: None,
            attempt: None,
        }
    }

    /// The canonical bytes that are hashed and stored.
    pub fn body(&self) -> String {
        // Serializing a struct of strings, numbers and vectors cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn trim(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The chain link: `sha256(prev_hash || body)`, hex.
pub(crate) fn link(prev_hash: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(body.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A record as stored: its place in the chain and its hashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Position in the chain (1, 2, …).
    pub seq: i64,
    /// The record.
    #[serde(flatten)]
    pub record: Record,
    /// The previous record's hash.
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
}

/// What to look for. `tenant` is always applied: a tenant sees only its own records.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The tenant.
    pub tenant: String,
    /// Only this session.
    pub session: Option<String>,
    /// Only this pool.
    pub pool: Option<String>,
    /// Only this identifier (the caller's name for its session).
    pub identifier: Option<String>,
    /// Only this execution.
    pub execution: Option<String>,
    /// From this time on (ms since the epoch, inclusive).
    pub since_ms: Option<i64>,
    /// Before this time (ms since the epoch, exclusive).
    pub until_ms: Option<i64>,
    /// Only this status.
    pub status: Option<String>,
    /// Only this language.
    pub language: Option<String>,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Records after this sequence number (the previous page's `next`).
    pub after: Option<i64>,
    /// Most records per page (capped at 1000; default 100).
    pub limit: Option<u32>,
    /// Only records of this run (the caller context's `run_id`).
    pub run_id: Option<String>,
}

/// One page of records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Page {
    /// The records, oldest first.
    pub records: Vec<StoredRecord>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<i64>,
}

/// A tenant's usage over a period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Executions.
    pub executions: i64,
    /// Summed wall-clock time of executions, seconds.
    pub execution_seconds: f64,
    /// Summed lifetime of sessions that ended in the period, seconds.
    pub session_seconds: f64,
    /// Summed CPU time, seconds.
    pub cpu_seconds: f64,
    /// Highest peak memory of one execution, bytes.
    pub peak_memory_bytes: i64,
    /// Sessions created.
    pub sessions_created: i64,
}

/// What [`crate::AuditStore::verify`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// Records checked.
    pub checked: u64,
    /// The first break, when the chain is broken.
    pub broken: Option<String>,
}

impl Verification {
    /// Whether the chain is intact.
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }
}
