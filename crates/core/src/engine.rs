//! The seam between the core and whatever runs code: an [`Engine`] starts
//! [`LiveSession`]s from a [`PoolSpec`].
//!
//! The core never knows how a sandbox is built. The real engine (`SessionEngine`, in
//! `ampoule-server`'s `session_engine.rs`) starts interpreter sessions in sandboxes; the fake
//! one (`fake.rs`, feature `fake`) runs a toy language on a temporary directory so the doors
//! and the session manager are tested without root.
//!
//! Contract for implementations:
//! - [`Engine::start`] is called from a tokio worker thread (never `spawn_blocking`), because a
//!   sandbox dies with the thread that spawned it.
//! - [`LiveSession::execute`] is never called concurrently on one session (the manager holds
//!   the session's execution lock), but [`LiveSession::scratch`] is used while an execution
//!   runs: file access must not need the interpreter.
//! - [`LiveSession::close`] may be called while an execution runs (delete, lifetime,
//!   shutdown): it ends that execution, is idempotent, and leaves nothing of the session on
//!   the host.

use ampoule_runtime::Scratch;
use ampoule_types::{ExecutionEvent, ExecutionResult, Language, Limits};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc::UnboundedSender;

/// What a pool's sessions are made of.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    /// The pool's name.
    pub name: String,
    /// The language of its interpreters.
    pub language: Language,
    /// Resource limits of each session (`timeout_s` is the default per execution).
    pub limits: Limits,
    /// What its sessions may reach through the egress gateway; `None`: no network.
    pub network: Option<PoolNetwork>,
    /// Fork sessions from a zygote that imported these modules (Python pools); `None`: start
    /// every session from scratch.
    pub zygote: Option<Vec<String>>,
    /// Python code its zygotes run after the imports, before they freeze their heap
    /// (`[pools.X] warmup`; empty: none).
    pub warmup: String,
    /// The tenants whose keys may use the pool, as configured (a tenant may still come that
    /// is not listed, e.g. the MCP stdio door's). Each tenant's sessions fork from a zygote of
    /// its own, started with the pool for these; warm stock is forked only when there is one
    /// (it can then go to nobody else), else it starts cold.
    pub tenants: Vec<String>,
    /// Most live sessions of the pool (the budget of its zygotes' cgroups).
    pub max_sessions: usize,
    /// The OCI image its sandboxes start from; `None`: the host's runtimes.
    pub image: Option<PoolImage>,
    /// The isolation tier of its sandboxes (`[pools.X] isolation`).
    pub isolation: ampoule_runtime::Isolation,
}

/// The OCI image a pool's sandboxes start from (`[pools.X] image = "NAME:TAG"`), resolved
/// against the image store when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolImage {
    /// `name:tag`.
    pub name: String,
    /// The manifest's digest.
    pub digest: String,
    /// The unpacked root on the host, shared read-only by the pool's sandboxes.
    pub root: std::path::PathBuf,
    /// The image config's `Env` (`KEY=VALUE`).
    pub env: Vec<String>,
    /// Its sandboxes may write `/` (`[pools.X] writable_root`): each change lands in the
    /// sandbox's own layer.
    pub writable_root: bool,
}

/// At most this many sessions a manager keeps forked and sealed ahead for each tenant of a
/// pool whose tenants fork from zygotes of their own (see [`Engine::keeps_warm_stock`]).
pub const TENANT_WARM_MAX: usize = 2;

impl PoolSpec {
    /// How many live children a tenant's zygote of this pool may have: its sessions and the
    /// tenant's ready stock.
    pub fn zygote_children(&self) -> usize {
        self.max_sessions.saturating_add(TENANT_WARM_MAX)
    }

    /// The one tenant that may use the pool, if only one may.
    pub fn sole_tenant(&self) -> Option<&str> {
        match self.tenants.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// The state of one pool's zygote, for `/metrics` and `/v1/pools`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZygoteHealth {
    /// The pool.
    pub pool: String,
    /// Whether a zygote is running and answering.
    pub up: bool,
    /// Sessions forked (by every zygote of the pool so far).
    pub forks: u64,
    /// Forks that failed (the session was started cold instead).
    pub fork_failures: u64,
    /// Zygotes started after the first (recycled or dead).
    pub restarts: u64,
    /// Zygotes running (one per tenant whose sessions the pool forks).
    pub running: u64,
    /// The memory budget of each zygote's cgroup, in bytes (derived from `max_sessions`).
    pub memory_budget_bytes: u64,
    /// The process budget of each zygote's cgroup.
    pub pids_budget: u64,
}

/// A pool's network policy, as configured and compiled (`[pools.NAME.network]`).
#[derive(Debug, Clone)]
pub struct PoolNetwork {
    /// The rules as written (pools compare equal by these).
    pub config: ampoule_egress::PolicyConfig,
    /// The compiled policy the gateway of each session enforces.
    pub policy: Arc<ampoule_egress::Policy>,
}

impl PartialEq for PoolNetwork {
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config
    }
}

/// One execution to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecRequest {
    /// Source code.
    pub code: String,
    /// Wall-clock limit for this execution, in seconds (already capped by the pool).
    pub timeout_s: f64,
    /// A JSON object made available to the code as `inputs`.
    pub inputs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Where output is sent while an execution runs (the streaming API).
pub type EventSender = UnboundedSender<ExecutionEvent>;

/// Why an engine could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A sandbox could not be started.
    #[error("starting a session: {0}")]
    Start(String),
    /// The interpreter broke down (not an error of the user's code, which is a result).
    #[error("executing: {0}")]
    Execute(String),
    /// The session was closed.
    #[error("the session is closed")]
    Closed,
    /// This engine or pool cannot do that (a process or context in a session whose engine
    /// has no way in).
    #[error("{0}")]
    Unsupported(String),
    /// What the request names is not in the sandbox (a working directory that cannot be
    /// entered, a program that cannot be executed).
    #[error("{0}")]
    Invalid(String),
    /// This host has no runtime for the language asked for (a context of a language no pool
    /// was checked for).
    #[error("{0}")]
    NoRuntime(String),
    /// Nothing answered inside the sandbox (a port nobody listens on).
    #[error("{0}")]
    Unreachable(String),
}

/// A command to start inside a live sandbox (the core has merged the sandbox's variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRequest {
    /// Program and arguments (a shell command is `["/bin/bash", "-l", "-c", CMD]`).
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// Whether the process gets a stdin pipe (else `/dev/null`).
    pub stdin: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this status.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
    /// It is gone without a status (its sandbox was destroyed).
    Lost,
}

/// Sends a signal to a process the engine started.
pub type Signaller = Arc<dyn Fn(i32) -> Result<(), EngineError> + Send + Sync>;

/// A process started in a sandbox: its pid there, its pipes, how to signal it and its end.
pub struct LiveProcess {
    /// Its pid inside the sandbox.
    pub pid: u32,
    /// Its stdin, when asked for.
    pub stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    /// Its stdout.
    pub stdout: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    /// Its stderr.
    pub stderr: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    /// Sends it a signal.
    pub signal: Signaller,
    /// Resolves when it has ended (awaited once).
    pub exit: std::pin::Pin<Box<dyn std::future::Future<Output = ProcessExit> + Send>>,
}

impl std::fmt::Debug for LiveProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveProcess")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// Another interpreter in a live sandbox: a context (its own state, the sandbox's files).
#[async_trait]
pub trait LiveContext: Send + Sync + 'static {
    /// Runs code against the context's state (as [`LiveSession::execute`]; never called
    /// concurrently on one context). A timeout that has to kill kills this context only.
    async fn execute(
        &self,
        req: ExecRequest,
        events: Option<EventSender>,
    ) -> Result<ExecutionResult, EngineError>;
    /// Whether its interpreter still runs.
    fn alive(&self) -> bool;
    /// Stops its interpreter. Idempotent.
    async fn close(&self);
}

/// Starts sessions.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Starts a fresh session for a pool: a sandbox with a live interpreter, ready to execute.
    /// `tenant` is who the session is for, `None` for warm stock that any tenant of the pool
    /// may be handed (an engine must then give it nothing it shares with one tenant only).
    async fn start(
        &self,
        spec: &PoolSpec,
        tenant: Option<&str>,
    ) -> Result<Box<dyn LiveSession>, EngineError>;

    /// Gets a pool ready before its first session is asked for (starts its zygote).
    async fn prepare(&self, _spec: &PoolSpec) {}

    /// The zygotes this engine runs, one per pool that has one (see [`PoolSpec::zygote`]).
    fn zygotes(&self) -> Vec<ZygoteHealth> {
        Vec::new()
    }

    /// Whether the pool's `warm` stock is worth keeping: a session started with no tenant
    /// ([`Engine::start`] with `None`) must be as good as one started for its tenant. An
    /// engine that forks each tenant's sessions from a zygote of its own answers no for a
    /// pool several tenants share (warm stock would start cold: slower to a first result
    /// than a fork); the manager then keeps a small stock per tenant instead, started with
    /// the tenant named ([`TENANT_WARM_MAX`] at most each).
    fn keeps_warm_stock(&self, _spec: &PoolSpec) -> bool {
        true
    }

    /// Starts a session whose files live on the disk image at `disk` (made, with the pool's
    /// disk limit as its size, when it does not exist; else its files are the sandbox's
    /// again): a durable sandbox, whose files outlive it (see [`crate::lifecycle`]). Never
    /// from warm stock. Before starting, waits for a previous sandbox of the same image to
    /// have released it.
    async fn start_durable(
        &self,
        _spec: &PoolSpec,
        _tenant: &str,
        _disk: &std::path::Path,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        Err(EngineError::Unsupported(
            "this server cannot keep a sandbox's files on disk".into(),
        ))
    }

    /// [`Engine::start_durable`] from the checkpoint image at `image` (made by
    /// [`LiveSession::checkpoint`]): the sandbox comes back with its memory. An error leaves
    /// nothing running; the caller then starts it with its files only.
    async fn restore_durable(
        &self,
        _spec: &PoolSpec,
        _tenant: &str,
        _disk: &std::path::Path,
        _image: &std::path::Path,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        Err(EngineError::Unsupported(
            "this server cannot restore a sandbox's memory".into(),
        ))
    }
}

/// One live session: a sandbox with an interpreter and its files.
#[async_trait]
pub trait LiveSession: Send + Sync + 'static {
    /// Runs code against the session's state. Output is also sent to `events` as it happens.
    /// A failure of the user's code (an exception, a timeout, a limit) is a result, not an
    /// error; after a timeout or a kill the result says whether the state survived.
    async fn execute(
        &self,
        req: ExecRequest,
        events: Option<EventSender>,
    ) -> Result<ExecutionResult, EngineError>;

    /// The session's files (`/mnt/data` is [`ampoule_runtime::scratch::DATA`]); refused
    /// once the session is closed. Callers drop the handle when their call is over, so that
    /// nothing of a closed session stays alive.
    fn scratch(&self) -> Result<Arc<Scratch>, EngineError>;

    /// Whether the sandbox is still usable (a warm session whose sandbox died is discarded).
    fn alive(&self) -> bool {
        true
    }

    /// Whether a ready (warm) session must no longer be handed out: what it was started from
    /// has been replaced (its zygote, recycled because the packages changed). The manager
    /// closes such a session instead of using it; sessions in use are not affected.
    fn outdated(&self) -> bool {
        false
    }

    /// Whether the session was forked from a zygote (its start time is then also counted in
    /// `ampoule_zygote_fork_duration_seconds`).
    fn forked(&self) -> bool {
        false
    }

    /// Names the session and the execution about to run, so that what the sandbox does on
    /// its own (its egress decisions, logged as they happen) carries their ids. Called before
    /// each execution; engines without network need not care.
    fn label(&self, _session: &str, _execution: &str) {}

    /// Starts a command inside the sandbox, confined like its interpreter.
    async fn spawn(&self, _req: ProcessRequest) -> Result<LiveProcess, EngineError> {
        Err(EngineError::Unsupported(
            "this engine cannot start processes in a sandbox".into(),
        ))
    }

    /// Starts an interpreter of `language` inside the sandbox, beside the session's own.
    async fn open_context(
        &self,
        _language: Language,
        _cwd: Option<String>,
        _env: Vec<(String, String)>,
    ) -> Result<Box<dyn LiveContext>, EngineError> {
        Err(EngineError::Unsupported(
            "this engine cannot start contexts in a sandbox".into(),
        ))
    }

    /// A TCP connection to `127.0.0.1:port` inside the sandbox's network namespace.
    async fn connect(&self, _port: u16) -> Result<tokio::net::TcpStream, EngineError> {
        Err(EngineError::Unsupported(
            "this engine cannot reach ports in a sandbox".into(),
        ))
    }

    /// The environment a command gets before the sandbox's and the request's variables.
    fn command_env(&self) -> Vec<(String, String)> {
        vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), "/mnt/data".into()),
            ("LANG".into(), "C.UTF-8".into()),
        ]
    }

    /// CPU time everything in the sandbox has used so far, in nanoseconds, when the engine
    /// can tell: work the API does not see (a process started by the code itself) keeps the
    /// sandbox from being idle.
    fn cpu_ns(&self) -> Option<u64> {
        None
    }

    /// Freezes every process of the sandbox (memory kept, no CPU); returns once they are.
    fn pause(&self) -> Result<(), EngineError> {
        Err(EngineError::Unsupported(
            "this server cannot pause a sandbox (no cgroup freezer)".into(),
        ))
    }

    /// Thaws what [`LiveSession::pause`] froze.
    fn resume(&self) -> Result<(), EngineError> {
        Err(EngineError::Unsupported(
            "this server cannot pause a sandbox (no cgroup freezer)".into(),
        ))
    }

    /// Writes the sandbox's memory into a checkpoint image in the directory `image` and stops
    /// it (hibernation that keeps memory; see [`Engine::restore_durable`]); the caller closes
    /// the session afterwards. [`EngineError::Unsupported`] where the sandbox's memory cannot
    /// be kept (the default tier): it is then hibernated with its files only.
    async fn checkpoint(&self, _image: &std::path::Path) -> Result<(), EngineError> {
        Err(EngineError::Unsupported(
            "this sandbox's memory cannot be checkpointed".into(),
        ))
    }

    /// Stops the interpreter and destroys the sandbox. Idempotent.
    async fn close(&self);
}
