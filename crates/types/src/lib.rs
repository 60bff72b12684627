//! Wire types shared by every ampoule crate.
//!
//! This crate owns the shapes that cross a boundary: what a caller asks for (limits, language)
//! and what comes back (an execution result). It depends on `serde` and `serde_json` only (MIME
//! bundles carry arbitrary JSON), so the CLI client, the server and the sandbox runtime all
//! agree on one definition; the `openapi` feature derives OpenAPI schemas for the
//! server's generated document without making every user pay for `utoipa`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A library prints nothing: the CLI's printer owns stdout and stderr.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

use std::fmt;

use serde::{Deserialize, Serialize};

/// Resource limits for one sandbox. Every field has a safe default (see [`Limits::default`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory including swap, in MiB (cgroup `memory.max` / `memsw`).
    pub memory_mib: u64,
    /// CPU bandwidth in cores (cgroup `cpu.max` / `cfs_quota_us`).
    pub cpus: f64,
    /// Maximum number of live processes and threads (cgroup `pids.max`).
    pub pids: u64,
    /// Size of the writable scratch space (`/mnt/data`, `/tmp` and `/dev/shm` together), in MiB.
    pub disk_mib: u64,
    /// Maximum number of inodes in the scratch space.
    pub disk_inodes: u64,
    /// Wall-clock time limit per execution, in seconds.
    pub timeout_s: f64,
    /// Bytes kept per output stream; beyond it the output is cut and marked truncated.
    pub output_bytes: u64,
    /// Maximum number of open files per process (`RLIMIT_NOFILE`).
    pub open_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: 512,
            cpus: 1.0,
            pids: 256,
            disk_mib: 1024,
            disk_inodes: 65_536,
            timeout_s: 220.0,
            output_bytes: 1_048_576,
            open_files: 1024,
        }
    }
}

/// A language a sandbox can run: the one list of languages. The session crate has one kernel
/// plug-in per variant (an exhaustive match, so a variant without a plug-in does not build);
/// the server's pools, quotas and doors parse names with [`Language::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// CPython 3.
    Python,
    /// Node.js.
    Javascript,
    /// GNU bash.
    Shell,
    /// C#, with Mono's evaluator (sessions only).
    Csharp,
    /// PowerShell 7 (`pwsh`, sessions only).
    Powershell,
}

impl Language {
    /// Every language, in the order `doctor` and `GET /v1/pools` report them.
    pub const EVERY: [Language; 5] = [
        Language::Python,
        Language::Javascript,
        Language::Shell,
        Language::Csharp,
        Language::Powershell,
    ];

    /// The languages the runtime crate also runs as one-shot programs (`ampoule run`), in the
    /// order `doctor` reports their interpreters. C# and PowerShell run only as sessions: their
    /// kernels are driven through the session crate.
    pub const ONE_SHOT: [Language; 3] = [Language::Python, Language::Javascript, Language::Shell];

    /// The canonical name, as used in configs and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Shell => "shell",
            Language::Csharp => "csharp",
            Language::Powershell => "powershell",
        }
    }

    /// Other accepted names, lowercase.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Language::Python => &["python3", "py"],
            Language::Javascript => &["js", "node", "nodejs"],
            Language::Shell => &["bash", "sh"],
            Language::Csharp => &["c#", "cs", "mono"],
            Language::Powershell => &["pwsh", "ps"],
        }
    }

    /// Whether `ampoule run` runs it as a one-shot program (see [`Language::ONE_SHOT`]).
    pub fn one_shot(self) -> bool {
        Language::ONE_SHOT.contains(&self)
    }

    /// Parses a name or an alias ([`Language::aliases`]), case-insensitively.
    pub fn parse(name: &str) -> Option<Language> {
        let name = name.to_ascii_lowercase();
        Language::EVERY
            .into_iter()
            .find(|l| l.as_str() == name || l.aliases().contains(&name.as_str()))
    }

    /// The canonical names, comma-separated (for error messages).
    pub fn names() -> String {
        Language::EVERY.map(Language::as_str).join(", ")
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an execution ended (PRODUCT.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    /// The code ran to completion and exited 0.
    Succeeded,
    /// The code raised or exited non-zero.
    Failed,
    /// The wall-clock limit ran out and the sandbox was stopped.
    TimedOut,
    /// A resource limit (memory, pids, disk, output, cpu) stopped the code.
    Killed,
}

impl ExecutionStatus {
    /// The wire name (`succeeded`, `failed`, `timed_out`, `killed`).
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Succeeded => "succeeded",
            ExecutionStatus::Failed => "failed",
            ExecutionStatus::TimedOut => "timed_out",
            ExecutionStatus::Killed => "killed",
        }
    }
}

impl fmt::Display for ExecutionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resource limit that was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LimitKind {
    /// Wall-clock time.
    Time,
    /// Memory (the cgroup OOM killer fired).
    Memory,
    /// Number of processes (`pids.max` refused a fork).
    Pids,
    /// Scratch space or file size (`ENOSPC`, inode exhaustion, `RLIMIT_FSIZE`).
    Disk,
    /// Output bytes on stdout or stderr.
    Output,
    /// CPU seconds (`RLIMIT_CPU` backstop).
    Cpu,
}

impl LimitKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Time => "time",
            LimitKind::Memory => "memory",
            LimitKind::Pids => "pids",
            LimitKind::Disk => "disk",
            LimitKind::Output => "output",
            LimitKind::Cpu => "cpu",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A file the code left in `/mnt/data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileEntry {
    /// Path relative to `/mnt/data`, with `/` separators.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
}

/// The result of running code once (`ampoule run --json` prints this object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// How it ended.
    pub status: ExecutionStatus,
    /// The exit code `ampoule run` returns: the program's own, 124 on timeout, 137 when a limit
    /// killed it, 128+N when a signal N ended it.
    pub exit_code: i32,
    /// The signal that ended the program, when one did.
    pub signal: Option<i32>,
    /// The limit that decided the outcome, when one did.
    pub limit: Option<LimitKind>,
    /// Every limit that was reached during the run, even when the program survived it.
    pub limits_hit: Vec<LimitKind>,
    /// Standard output (UTF-8, lossy), cut at the output limit.
    pub stdout: String,
    /// Standard error (UTF-8, lossy), cut at the output limit.
    pub stderr: String,
    /// Whether stdout was cut.
    pub stdout_truncated: bool,
    /// Whether stderr was cut.
    pub stderr_truncated: bool,
    /// Wall-clock duration from start to exit, in milliseconds.
    pub duration_ms: f64,
    /// CPU time of every process of the sandbox, in milliseconds, when it could be measured.
    pub cpu_time_ms: Option<f64>,
    /// Peak memory of the sandbox in bytes, when it could be measured.
    pub peak_memory_bytes: Option<u64>,
    /// Files left in `/mnt/data` when the run ended.
    pub files: Vec<FileEntry>,
    /// Every network connection and DNS query the egress gateway allowed or blocked, in order
    /// (empty when the sandbox had no network).
    #[serde(default)]
    pub egress: Vec<EgressEvent>,
}

/// What the egress gateway saw a sandbox try to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum EgressProtocol {
    /// Plain HTTP/1 (the host came from the `Host` header).
    Http,
    /// TLS (the host came from the ClientHello's server name).
    Tls,
    /// A DNS query to the sandbox's resolver.
    Dns,
    /// A TCP connection that was neither HTTP nor TLS.
    Tcp,
}

/// One decision of the egress gateway: a connection or DNS query, allowed or blocked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EgressEvent {
    /// Milliseconds since the Unix epoch when the decision was made.
    pub unix_ms: u64,
    /// The name (or IP literal) the sandbox asked for; empty when it named none.
    pub host: String,
    /// The destination port (53 for DNS).
    pub port: u16,
    /// How the request was recognised.
    pub protocol: EgressProtocol,
    /// Whether it was let through.
    pub allowed: bool,
    /// Why, in a few words (the matching rule, or what refused it).
    pub reason: String,
    /// Whether the gateway added a credential header to it.
    pub injected: bool,
    /// The upstream address the gateway checked and connected to (or answered with, for DNS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// A MIME bundle: MIME type to data. Text types carry a string, `application/json` any JSON
/// value, binary types (`image/png`) a base64 string.
pub type MimeBundle = std::collections::BTreeMap<String, serde_json::Value>;

/// Whether a session's interpreter state (variables, imports, cwd) survived an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// The interpreter is still the same: the next execution sees the state.
    Kept,
    /// The interpreter was restarted (a limit or a timeout killed it): the state is gone.
    Lost,
}

/// The error an execution raised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutionError {
    /// Exception or error name (`ZeroDivisionError`).
    pub name: String,
    /// Its message.
    pub value: String,
    /// Traceback lines, starting at the caller's code.
    pub traceback: Vec<String>,
}

/// The result of one execution in a session (PRODUCT.md §1 and §5); the native API returns it
/// as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutionResult {
    /// How it ended.
    pub status: ExecutionStatus,
    /// The limit that decided the outcome, when one did.
    pub limit: Option<LimitKind>,
    /// Whether the session's state survived (always `kept` after `succeeded`/`failed`).
    pub session_state: SessionState,
    /// Standard output (UTF-8, lossy), cut at the output limit.
    pub stdout: String,
    /// Standard error (UTF-8, lossy), cut at the output limit.
    pub stderr: String,
    /// Whether stdout was cut.
    pub stdout_truncated: bool,
    /// Whether stderr was cut.
    pub stderr_truncated: bool,
    /// The value of the last expression, as a MIME bundle (`text/plain` always; also
    /// `application/json` for plain JSON values and rich types such as `image/png`).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub result: Option<MimeBundle>,
    /// Rich outputs displayed during the execution (plots, tables), in order.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub outputs: Vec<MimeBundle>,
    /// The error the code raised, when it did.
    pub error: Option<ExecutionError>,
    /// The execution's number in its session, when the interpreter counts them.
    pub execution_count: Option<u64>,
    /// The exit status of the code, for languages that have one (shell).
    pub exit_code: Option<i32>,
    /// Wall-clock duration, in milliseconds.
    pub duration_ms: f64,
    /// CPU time used by the session during the execution, when it could be measured.
    pub cpu_time_ms: Option<f64>,
    /// Peak memory of the session in bytes, when it could be measured.
    pub peak_memory_bytes: Option<u64>,
    /// Every network connection and DNS query the egress gateway allowed or blocked during
    /// the execution, in order (absent when the session has no network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressEvent>,
}

/// Output of an execution delivered while it runs (the streaming form of the native API
/// sends these as they happen, then the [`ExecutionResult`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecutionEvent {
    /// Text written to stdout.
    Stdout {
        /// The text.
        text: String,
    },
    /// Text written to stderr.
    Stderr {
        /// The text.
        text: String,
    },
    /// A rich output (plot, table).
    Display {
        /// Its representations.
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        data: MimeBundle,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_limit_names_are_stable() {
        assert_eq!(
            serde_json::to_string(&ExecutionStatus::TimedOut).unwrap(),
            "\"timed_out\""
        );
        assert_eq!(serde_json::to_string(&LimitKind::Pids).unwrap(), "\"pids\"");
        assert_eq!(
            serde_json::to_string(&Language::Javascript).unwrap(),
            "\"javascript\""
        );
    }

    #[test]
    fn language_aliases_parse() {
        assert_eq!(Language::parse("py"), Some(Language::Python));
        assert_eq!(Language::parse("Node"), Some(Language::Javascript));
        assert_eq!(Language::parse("bash"), Some(Language::Shell));
        assert_eq!(Language::parse("C#"), Some(Language::Csharp));
        assert_eq!(Language::parse("pwsh"), Some(Language::Powershell));
        assert_eq!(Language::parse("cobol"), None);
    }

    #[test]
    fn every_language_is_listed_once_and_round_trips() {
        // No wildcard: a new variant fails to build here until it is in `EVERY`.
        let position = |l: Language| match l {
            Language::Python => 0,
            Language::Javascript => 1,
            Language::Shell => 2,
            Language::Csharp => 3,
            Language::Powershell => 4,
        };
        for (i, l) in Language::EVERY.into_iter().enumerate() {
            assert_eq!(position(l), i);
            assert_eq!(Language::parse(l.as_str()), Some(l));
            let wire = serde_json::to_string(&l).unwrap();
            assert_eq!(wire, format!("\"{}\"", l.as_str()));
            for alias in l.aliases() {
                assert_eq!(Language::parse(alias), Some(l), "{alias}");
            }
        }
        assert!(
            Language::ONE_SHOT
                .iter()
                .all(|l| Language::EVERY.contains(l))
        );
        assert!(!Language::Csharp.one_shot());
    }

    #[test]
    fn run_results_without_egress_still_parse() {
        let old = r#"{"status":"succeeded","exit_code":0,"signal":null,"limit":null,
            "limits_hit":[],"stdout":"","stderr":"","stdout_truncated":false,
            "stderr_truncated":false,"duration_ms":1.0,"cpu_time_ms":null,
            "peak_memory_bytes":null,"files":[]}"#;
        let r: RunResult = serde_json::from_str(old).unwrap();
        assert!(r.egress.is_empty());
        let e = EgressEvent {
            unix_ms: 1,
            host: "pypi.org".into(),
            port: 443,
            protocol: EgressProtocol::Tls,
            allowed: true,
            reason: "allowed by pypi.org:443".into(),
            injected: false,
            address: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"unix_ms":1,"host":"pypi.org","port":443,"protocol":"tls","allowed":true,"reason":"allowed by pypi.org:443","injected":false}"#
        );
    }

    #[test]
    fn limits_reject_unknown_fields() {
        let err = serde_json::from_str::<Limits>(r#"{"memory_mb": 5}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let l: Limits = serde_json::from_str(r#"{"memory_mib": 64}"#).unwrap();
        assert_eq!(l.memory_mib, 64);
        assert_eq!(l.pids, Limits::default().pids);
    }
}
