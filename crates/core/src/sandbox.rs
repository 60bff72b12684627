//! Sandboxes: a session seen as an environment with several contexts (interpreters of any
//! language, sharing its files), processes (commands with streamed output, stdin and
//! signals) and ports (a server inside, reached through the server only), living until its
//! timeout (PRODUCT.md §7).
//!
//! Every session is a sandbox: its interpreter is the *default context* of its pool's
//! language. A sandbox made by [`Manager::create_sandbox`] differs only in its id (`sbx_…`),
//! its metadata and variables, and its end: it lives until `timeout_s` after its creation
//! (or its last [`Manager::set_sandbox_timeout`]), never ended by idleness, where a session
//! expires when idle. Everything here goes through the same tenant lookup as sessions
//! (another tenant's sandbox, context, process or port is a 404) and the engine
//! ([`crate::LiveSession::spawn`], [`crate::LiveSession::open_context`],
//! [`crate::LiveSession::connect`]) confines
//! what it starts exactly as the sandbox's interpreter.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ampoule_types::Language;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::caller::Caller;
use crate::engine::{LiveContext, ProcessExit, ProcessRequest, Signaller};
use crate::error::Error;
use crate::lifecycle::{Lifecycle, Record, State};
use crate::manager::{Manager, Session, random_hex};

/// The id of a sandbox's first context, its interpreter.
pub const DEFAULT_CONTEXT: &str = "default";

/// Default life of a sandbox, in seconds (E2B's).
pub const DEFAULT_TIMEOUT_S: u64 = 300;

/// Events buffered for one attached reader of a process before the process waits for it.
const PROCESS_QUEUE: usize = 256;

/// How long a process waits for a reader that does not read before dropping it.
const SLOW_READER: Duration = Duration::from_secs(30);

/// `create_sandbox`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSandbox {
    /// The pool, the sandbox's template (default: the default pool).
    pub pool: Option<String>,
    /// Seconds until it is destroyed (default [`DEFAULT_TIMEOUT_S`]; never beyond the pool's
    /// lifetime).
    pub timeout_s: Option<u64>,
    /// The caller's labels, answered back and filtered on.
    pub metadata: BTreeMap<String, String>,
    /// Variables every process and new context of the sandbox gets.
    pub envs: BTreeMap<String, String>,
    /// Its lifecycle policy (over the pool's).
    pub lifecycle: Lifecycle,
}

/// A sandbox as the commands report it (a snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxInfo {
    /// Its id (`sbx_…`; a session's `ses_…`).
    pub id: String,
    /// Its pool (template).
    pub pool: String,
    /// The language of its default context.
    pub language: Language,
    /// The caller's name for it (a sandbox's is its id).
    pub identifier: String,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it will be destroyed, as things stand (idle expiry for a session).
    pub end_at: SystemTime,
    /// Its metadata.
    pub metadata: BTreeMap<String, String>,
    /// The names of its variables (their values are never answered back).
    pub env_names: Vec<String>,
    /// `running`, `paused` or `hibernated` ([`State`]).
    pub state: &'static str,
    /// Whether it was made as a sandbox (else: a session).
    pub is_sandbox: bool,
    /// Memory limit in bytes, for reports.
    pub memory_bytes: u64,
    /// CPU limit in cores, for reports.
    pub cpus: f64,
    /// Whether its files live on disk (it can hibernate and outlives the server).
    pub durable: bool,
    /// `kept`, or `lost` once it was hibernated without its memory: its contexts then start
    /// afresh, its files are intact. Only the gVisor tier (without network) is hibernated with
    /// its memory (a checkpoint), and says `kept` while hibernated and once resumed.
    pub session_state: &'static str,
    /// Its lifecycle policy.
    pub lifecycle: Lifecycle,
}

/// The secrets of a sandbox, answered to its creator only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxTokens {
    /// Grants the sandbox's own API (processes, files, code) without an API key.
    pub access: String,
    /// Grants its ports.
    pub traffic: String,
}

/// `create_context`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateContext {
    /// Its language (default: the sandbox's).
    pub language: Option<String>,
    /// Its working directory (default `/mnt/data`).
    pub cwd: Option<String>,
}

/// A context as the commands report it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextInfo {
    /// Its id ([`DEFAULT_CONTEXT`] for the sandbox's interpreter, else `ctx_…`).
    pub id: String,
    /// Its language.
    pub language: Language,
    /// Its working directory.
    pub cwd: String,
}

/// What to run as a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A line for `bash -l -c`.
    Shell(String),
    /// Program and arguments.
    Argv(Vec<String>),
}

/// `start_process`.
#[derive(Debug, Clone, PartialEq)]
pub struct StartProcess {
    /// What to run.
    pub command: Command,
    /// Variables over the sandbox's.
    pub envs: BTreeMap<String, String>,
    /// Working directory (default `/mnt/data`).
    pub cwd: Option<String>,
    /// Whether it reads stdin (else `/dev/null`).
    pub stdin: bool,
    /// A name to find it by (E2B's tag).
    pub tag: Option<String>,
    /// Seconds after which it is killed (`None`: it runs until it ends or the sandbox does).
    pub timeout_s: Option<f64>,
}

impl StartProcess {
    /// `command` with the defaults.
    pub fn new(command: Command) -> Self {
        Self {
            command,
            envs: BTreeMap::new(),
            cwd: None,
            stdin: false,
            tag: None,
            timeout_s: None,
        }
    }
}

/// A process as the commands report it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessInfo {
    /// Its pid inside the sandbox.
    pub pid: u32,
    /// Its tag.
    pub tag: Option<String>,
    /// What runs.
    pub argv: Vec<String>,
    /// The variables the request added.
    pub envs: BTreeMap<String, String>,
    /// Its working directory.
    pub cwd: String,
    /// When it started.
    pub started_at: SystemTime,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessEnd {
    /// Its exit status (`-1` when a signal ended it or it was lost).
    pub exit_code: i32,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Whether it was killed because of its `timeout_s`.
    pub timed_out: bool,
}

impl ProcessEnd {
    /// E2B's status text: `exit status N` or `signal: killed`.
    pub fn status(&self) -> String {
        match self.signal {
            Some(9) => "signal: killed".into(),
            Some(s) => format!("signal: {s}"),
            None => format!("exit status {}", self.exit_code),
        }
    }
}

/// What a process does, as an attached reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// Bytes it wrote to stdout.
    Stdout(Bytes),
    /// Bytes it wrote to stderr.
    Stderr(Bytes),
    /// It ended; nothing follows.
    End(ProcessEnd),
}

/// A started or re-attached process: what it is, and its events from now on.
#[derive(Debug)]
pub struct ProcessStream {
    /// The process.
    pub info: ProcessInfo,
    /// Its output and its end; closes after [`ProcessEvent::End`].
    pub events: mpsc::Receiver<ProcessEvent>,
}

/// Which process a command is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessSelector {
    /// By pid inside the sandbox.
    Pid(u32),
    /// By tag.
    Tag(String),
}

/// A context's interpreter, replaceable (restart) while executions hold it.
pub(crate) struct Ctx {
    pub(crate) id: String,
    pub(crate) language: Language,
    pub(crate) cwd: String,
    /// Opened for an execution naming only its language.
    pub(crate) default_for_language: bool,
    pub(crate) live: Mutex<Arc<dyn LiveContext>>,
    pub(crate) turn: tokio::sync::Mutex<()>,
}

impl Ctx {
    pub(crate) fn current(&self) -> Option<Arc<dyn LiveContext>> {
        self.live.lock().ok().map(|l| l.clone())
    }

    fn info(&self) -> ContextInfo {
        ContextInfo {
            id: self.id.clone(),
            language: self.language,
            cwd: self.cwd.clone(),
        }
    }
}

struct Proc {
    info: ProcessInfo,
    stdin: tokio::sync::Mutex<Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>>,
    signal: Signaller,
    readers: Mutex<Vec<mpsc::Sender<ProcessEvent>>>,
    end: watch::Receiver<Option<ProcessEnd>>,
}

impl Proc {
    fn attach(&self) -> mpsc::Receiver<ProcessEvent> {
        let (tx, rx) = mpsc::channel(PROCESS_QUEUE);
        if let Some(end) = *self.end.borrow() {
            let _ = tx.try_send(ProcessEvent::End(end));
        } else if let Ok(mut r) = self.readers.lock() {
            r.push(tx);
        }
        rx
    }
}

/// What a session has as a sandbox.
pub(crate) struct Extras {
    pub(crate) is_sandbox: bool,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) envs: BTreeMap<String, String>,
    pub(crate) tokens: SandboxTokens,
    end: Mutex<Option<(Instant, SystemTime)>>,
    contexts: Mutex<BTreeMap<String, Arc<Ctx>>>,
    processes: Mutex<BTreeMap<u32, Arc<Proc>>>,
    /// Its lifecycle policy (the pool's, overridden by the sandbox's own).
    pub(crate) lifecycle: Lifecycle,
    /// Its disk image, when it is durable.
    pub(crate) disk: Option<std::path::PathBuf>,
    /// When it was first created, for one resumed from hibernation.
    pub(crate) created_at: Option<SystemTime>,
    /// The checkpoint image to restore it from (a durable sandbox hibernated with its
    /// memory); used once, by its start.
    pub(crate) restore_image: Option<std::path::PathBuf>,
    /// Pauses, open port connections, whether its memory was lost.
    pub(crate) life: Mutex<Life>,
}

/// What changes as a sandbox is paused, resumed and reached.
#[derive(Debug, Default)]
pub(crate) struct Life {
    /// Since when it is paused.
    pub(crate) paused: Option<Instant>,
    /// Time paused so far (not metered as running time).
    pub(crate) paused_total: Duration,
    /// Connections to its ports now open (it is not idle while one is).
    pub(crate) ports_open: usize,
    /// Resumed from hibernation without its memory: its contexts started afresh.
    pub(crate) memory_lost: bool,
    /// CPU time of the sandbox when the reaper last looked (see [`Extras::used_cpu`]).
    pub(crate) last_cpu_ns: Option<u64>,
}

/// Held while a connection to a sandbox's port is open: the sandbox is not idle meanwhile.
#[derive(Debug)]
pub struct PortLease {
    session: std::sync::Weak<Session>,
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Some(s) = self.session.upgrade() {
            if let Ok(mut l) = s.sandbox.life.lock() {
                l.ports_open = l.ports_open.saturating_sub(1);
            }
            s.touch();
        }
    }
}

impl Extras {
    /// A session's: no metadata, no variables, ends when idle.
    pub(crate) fn session() -> Self {
        Self::new(false, BTreeMap::new(), BTreeMap::new(), None)
    }

    fn new(
        is_sandbox: bool,
        metadata: BTreeMap<String, String>,
        envs: BTreeMap<String, String>,
        life: Option<Duration>,
    ) -> Self {
        Self {
            is_sandbox,
            metadata,
            envs,
            tokens: SandboxTokens {
                access: format!("ea_{}", random_hex(24)),
                traffic: format!("et_{}", random_hex(24)),
            },
            end: Mutex::new(life.map(|d| (Instant::now() + d, SystemTime::now() + d))),
            contexts: Mutex::new(BTreeMap::new()),
            processes: Mutex::new(BTreeMap::new()),
            lifecycle: Lifecycle::default(),
            disk: None,
            created_at: None,
            restore_image: None,
            life: Mutex::new(Life::default()),
        }
    }

    /// A durable sandbox's, read back from its record.
    pub(crate) fn restored(r: &Record, disk: std::path::PathBuf) -> Self {
        let mut x = Self::new(
            r.is_sandbox,
            r.metadata.clone(),
            r.envs.clone(),
            r.life_left_ms.map(Duration::from_millis),
        );
        x.tokens = SandboxTokens {
            access: r.access_token.clone(),
            traffic: r.traffic_token.clone(),
        };
        x.lifecycle = r.lifecycle.clone();
        x.disk = Some(disk);
        x.created_at =
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(r.created_at_ms.max(0) as u64));
        if let Ok(mut l) = x.life.lock() {
            l.memory_lost = true;
        }
        x
    }

    /// Since when it is paused.
    pub(crate) fn paused_since(&self) -> Option<Instant> {
        self.life.lock().ok().and_then(|l| l.paused)
    }

    /// Whether a port connection is open.
    pub(crate) fn ports_open(&self) -> bool {
        self.life.lock().is_ok_and(|l| l.ports_open > 0)
    }

    /// Time it spent paused.
    pub(crate) fn paused_total(&self) -> Duration {
        self.life
            .lock()
            .map(|l| l.paused_total + l.paused.map(|p| p.elapsed()).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Whether the sandbox used at least `min_ns` of CPU since the last call (the first call
    /// only takes the reading): work the API does not see, such as a process the code
    /// started itself.
    pub(crate) fn used_cpu(&self, now_ns: u64, min_ns: u64) -> bool {
        let Ok(mut l) = self.life.lock() else {
            return false;
        };
        let before = l.last_cpu_ns.replace(now_ns);
        before.is_some_and(|b| now_ns.saturating_sub(b) >= min_ns)
    }

    /// Whether its memory was lost (resumed from hibernation).
    pub(crate) fn memory_lost(&self) -> bool {
        self.life.lock().is_ok_and(|l| l.memory_lost)
    }

    /// Moves its end later by `d` (the time it spent paused: a paused sandbox's timeout does
    /// not run).
    pub(crate) fn extend_end(&self, d: Duration) {
        if let Ok(mut e) = self.end.lock()
            && let Some((at, sys)) = *e
        {
            *e = Some((at + d, sys + d));
        }
    }

    /// Milliseconds of its timeout left.
    pub(crate) fn life_left_ms(&self) -> Option<u64> {
        self.end()
            .map(|(at, _)| at.saturating_duration_since(Instant::now()).as_millis() as u64)
    }

    /// When the sandbox must end regardless of use (`None`: a session, ended when idle).
    pub(crate) fn end(&self) -> Option<(Instant, SystemTime)> {
        self.end.lock().ok().and_then(|e| *e)
    }

    /// Whether its timeout has passed (never while it is paused: its clock stops).
    pub(crate) fn past_end(&self) -> bool {
        self.paused_since().is_none() && self.end().is_some_and(|(at, _)| Instant::now() >= at)
    }

    /// Processes still running.
    pub(crate) fn running(&self) -> usize {
        self.processes.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Its contexts' interpreters, to close with the sandbox.
    pub(crate) fn take_contexts(&self) -> Vec<Arc<dyn LiveContext>> {
        let taken = match self.contexts.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(_) => return Vec::new(),
        };
        taken.values().filter_map(|c| c.current()).collect()
    }
}

fn parse_language(lang: &str) -> Result<Language, Error> {
    Language::parse(lang).ok_or_else(|| Error::invalid(format!("unknown language {lang:?}")))
}

/// Checks a working directory: absolute, no `..`, no control characters.
fn check_cwd(cwd: &str) -> Result<(), Error> {
    if !cwd.starts_with('/')
        || cwd.split('/').any(|c| c == "..")
        || cwd.chars().any(char::is_control)
        || cwd.len() > 4096
    {
        return Err(Error::invalid(format!(
            "the working directory must be an absolute path without `..`: {cwd:?}"
        )));
    }
    Ok(())
}

fn check_envs(envs: &BTreeMap<String, String>) -> Result<(), Error> {
    for (k, v) in envs {
        let bad_name = k.is_empty()
            || k.contains('=')
            || k.contains('\0')
            || k.chars().any(char::is_control)
            || k.len() > 256;
        if bad_name || v.contains('\0') || v.len() > 65536 {
            return Err(Error::invalid(format!(
                "environment variable {k:?}: names are 1-256 characters without `=`, values \
                 at most 64 KiB, neither with NUL"
            )));
        }
    }
    if envs.len() > 256 {
        return Err(Error::invalid("at most 256 environment variables"));
    }
    Ok(())
}

impl Manager {
    pub(crate) fn sandbox_info(&self, s: &Session) -> SandboxInfo {
        let pool = self.pool(&s.pool).ok();
        let end_at = match s.sandbox.end() {
            Some((_, at)) => at,
            None => s.last_used_at() + pool.map(|p| p.idle_timeout).unwrap_or_default(),
        };
        let limits = pool.map(|p| p.spec.limits.clone()).unwrap_or_default();
        SandboxInfo {
            id: s.id.clone(),
            pool: s.pool.clone(),
            language: pool.map_or(Language::Python, |p| p.spec.language),
            identifier: s.identifier.clone(),
            created_at: s.created_at,
            end_at,
            metadata: s.sandbox.metadata.clone(),
            env_names: s.sandbox.envs.keys().cloned().collect(),
            state: if s.sandbox.paused_since().is_some() {
                "paused"
            } else {
                "running"
            },
            is_sandbox: s.sandbox.is_sandbox,
            memory_bytes: limits.memory_mib * 1024 * 1024,
            cpus: limits.cpus,
            durable: s.sandbox.disk.is_some(),
            session_state: if s.sandbox.memory_lost() {
                "lost"
            } else {
                "kept"
            },
            lifecycle: s.sandbox.lifecycle.clone(),
        }
    }

    /// A hibernated sandbox as the commands report it.
    pub(crate) fn record_info(&self, r: &Record) -> SandboxInfo {
        let pool = self.pool(&r.pool).ok();
        let limits = pool.map(|p| p.spec.limits.clone()).unwrap_or_default();
        let created_at =
            SystemTime::UNIX_EPOCH + Duration::from_millis(r.created_at_ms.max(0) as u64);
        // Its timeout does not run while it sleeps: it would end this long after a resume.
        let end_at = SystemTime::now()
            + r.life_left_ms
                .map(Duration::from_millis)
                .unwrap_or_else(|| pool.map(|p| p.idle_timeout).unwrap_or_default());
        SandboxInfo {
            id: r.id.clone(),
            pool: r.pool.clone(),
            language: pool.map_or(Language::Python, |p| p.spec.language),
            identifier: r.identifier.clone(),
            created_at,
            end_at,
            metadata: r.metadata.clone(),
            env_names: r.envs.keys().cloned().collect(),
            state: "hibernated",
            is_sandbox: r.is_sandbox,
            memory_bytes: limits.memory_mib * 1024 * 1024,
            cpus: limits.cpus,
            durable: true,
            session_state: if self.checkpointed(r) { "kept" } else { "lost" },
            lifecycle: r.lifecycle.clone(),
        }
    }

    fn life(&self, pool: &str, timeout_s: Option<u64>) -> Result<Duration, Error> {
        let p = self.pool(pool)?;
        let want = timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
        if want == 0 {
            return Err(Error::invalid("the timeout must be at least one second"));
        }
        Ok(Duration::from_secs(want).min(p.max_lifetime))
    }

    /// Creates a sandbox from a pool: answers it and its tokens.
    pub async fn create_sandbox(
        &self,
        caller: &Caller,
        cmd: CreateSandbox,
    ) -> Result<(SandboxInfo, SandboxTokens), Error> {
        check_envs(&cmd.envs)?;
        if cmd.metadata.len() > 64
            || cmd
                .metadata
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 256 || v.len() > 4096)
        {
            return Err(Error::invalid(
                "metadata: at most 64 entries, keys of 1-256 bytes, values up to 4 KiB",
            ));
        }
        let pool = cmd
            .pool
            .clone()
            .unwrap_or_else(|| self.default_pool().to_owned());
        let p = self.pool(&pool)?;
        if let Err(e) = self
            .quotas()
            .check_pool(&caller.tenant, &pool, p.spec.language)
        {
            return Err(self.refuse(caller, &pool, "", None, e).await);
        }
        let life = self.life(&pool, cmd.timeout_s)?;
        let lifecycle = p.lifecycle.merged(&cmd.lifecycle);
        lifecycle.check().map_err(Error::Invalid)?;
        let id = self.new_id("sbx");
        let envs = cmd.envs.clone();
        let mut extras = Extras::new(true, cmd.metadata, cmd.envs, Some(life));
        if lifecycle.is_durable() {
            extras.disk = Some(self.durable_disk(caller, &pool, &id).await?);
        }
        extras.lifecycle = lifecycle;
        let session = match self
            .create_with(caller, &pool, &id, Some(id.clone()), extras)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                self.forget_disk(&id);
                return Err(e);
            }
        };
        self.save_record(&session);
        if !envs.is_empty() {
            self.set_default_env(&session, &envs).await;
        }
        Ok((self.sandbox_info(&session), session.sandbox.tokens.clone()))
    }

    /// Makes the variables visible to the default context's code, where its language
    /// allows (Python and JavaScript: the process environment; contexts and processes
    /// started later get them at their start).
    pub(crate) async fn set_default_env(
        &self,
        session: &Arc<Session>,
        envs: &BTreeMap<String, String>,
    ) {
        let Ok(json) = serde_json::to_string(envs) else {
            return;
        };
        let code = match self.pool(&session.pool).map(|p| p.spec.language) {
            Ok(Language::Python) => format!(
                "__import__('os').environ.update(__import__('json').loads({}))",
                serde_json::Value::String(json)
            ),
            Ok(Language::Javascript) => format!("Object.assign(process.env, {json}); undefined"),
            _ => return,
        };
        let req = crate::engine::ExecRequest {
            code,
            timeout_s: 10.0,
            inputs: None,
        };
        let _turn = session.exec_lock.lock().await;
        if let Err(e) = session.live.execute(req, None).await {
            tracing::warn!(error = %e, session = %session.id, "setting a sandbox's variables");
        }
    }

    /// One of the caller's sandboxes (sessions included), hibernated ones too. Reading it
    /// does not resume it.
    pub fn get_sandbox(&self, caller: &Caller, id: &str) -> Result<SandboxInfo, Error> {
        match self.get(&caller.tenant, id) {
            Ok(s) => Ok(self.sandbox_info(&s)),
            Err(e) => self.dormant_info(&caller.tenant, id).ok_or(e),
        }
    }

    /// The caller's sandboxes (sessions included, hibernated ones too) whose metadata has
    /// every pair of `filter` and, when given, in `state`.
    pub fn list_sandboxes(
        &self,
        caller: &Caller,
        filter: &BTreeMap<String, String>,
        state: Option<State>,
    ) -> Vec<SandboxInfo> {
        let mut out: Vec<SandboxInfo> = self
            .list(&caller.tenant)
            .iter()
            .map(|s| self.sandbox_info(s))
            .chain(self.dormant_infos(&caller.tenant))
            .filter(|i| filter.iter().all(|(k, v)| i.metadata.get(k) == Some(v)))
            .filter(|i| state.is_none_or(|st| i.state == st.as_str()))
            .collect();
        out.sort_by_key(|i| i.created_at);
        out
    }

    /// Destroys a sandbox and everything in it, its files on disk included.
    pub async fn kill_sandbox(&self, caller: &Caller, id: &str) -> Result<(), Error> {
        match self.get(&caller.tenant, id) {
            Ok(s) => {
                self.delete(caller, &s).await;
                Ok(())
            }
            Err(e) => {
                if self
                    .delete_dormant(&caller.tenant, id, None, Some(caller))
                    .await
                {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Sets the sandbox to end `timeout_s` from now (a session becomes timed like a sandbox).
    pub async fn set_sandbox_timeout(
        &self,
        caller: &Caller,
        id: &str,
        timeout_s: u64,
    ) -> Result<SandboxInfo, Error> {
        let s = self.awake(caller, id).await?;
        let life = self.life(&s.pool, Some(timeout_s))?;
        let left = self
            .pool(&s.pool)?
            .max_lifetime
            .saturating_sub(s.age())
            .min(life);
        if let Ok(mut e) = s.sandbox.end.lock() {
            *e = Some((Instant::now() + left, SystemTime::now() + left));
        }
        self.save_record(&s);
        Ok(self.sandbox_info(&s))
    }

    /// The caller, acting with a sandbox's access token: the sandbox's tenant, for this
    /// sandbox only (the E2B data plane carries no API key). A wrong token and an unknown
    /// sandbox are answered alike.
    pub fn caller_for_token(
        &self,
        id: &str,
        token: &str,
        traffic: bool,
        request_id: Option<String>,
    ) -> Result<Caller, Error> {
        // A hibernated sandbox's tokens are its record's: they outlive its sleep.
        let (tenant, want) = match self.get_any_tenant(id) {
            Some(s) => {
                let t = &s.sandbox.tokens;
                let want = if traffic { &t.traffic } else { &t.access };
                (s.tenant.clone(), want.clone())
            }
            None => {
                let r = self
                    .dormant_record(id)
                    .ok_or_else(Error::session_not_found)?;
                let want = if traffic {
                    r.traffic_token
                } else {
                    r.access_token
                };
                (r.tenant, want)
            }
        };
        if want.is_empty() || !constant_time_eq(want.as_bytes(), token.as_bytes()) {
            return Err(Error::session_not_found());
        }
        let mut caller = Caller::new(tenant);
        caller.key_id = Some("sandbox-token".into());
        caller.request_id = request_id;
        Ok(caller)
    }

    // ---- contexts ----

    fn find_context(&self, s: &Session, id: &str) -> Result<Option<Arc<Ctx>>, Error> {
        if id == DEFAULT_CONTEXT || id == s.id {
            return Ok(None);
        }
        s.sandbox
            .contexts
            .lock()
            .ok()
            .and_then(|c| c.get(id).cloned())
            .map(Some)
            .ok_or_else(|| Error::ContextNotFound(format!("no context {id:?} in this sandbox")))
    }

    async fn open_ctx(
        &self,
        caller: &Caller,
        s: &Arc<Session>,
        language: Language,
        cwd: Option<String>,
        default_for_language: bool,
    ) -> Result<Arc<Ctx>, Error> {
        if let Err(e) = self.quotas().check_pool(&caller.tenant, &s.pool, language) {
            return Err(self
                .refuse(caller, &s.pool, &s.id, Some(&s.identifier), e)
                .await);
        }
        if let Some(c) = &cwd {
            check_cwd(c)?;
        }
        let env = self.process_env(s, &BTreeMap::new());
        let live = s
            .live
            .open_context(language, cwd.clone(), env)
            .await
            .map_err(Error::from)?;
        let ctx = Arc::new(Ctx {
            id: format!("ctx_{}", random_hex(12)),
            language,
            cwd: cwd.unwrap_or_else(|| "/mnt/data".into()),
            default_for_language,
            live: Mutex::new(Arc::from(live)),
            turn: tokio::sync::Mutex::new(()),
        });
        let added = match s.sandbox.contexts.lock() {
            Ok(mut contexts) if contexts.len() < 16 => {
                contexts.insert(ctx.id.clone(), ctx.clone());
                true
            }
            _ => false,
        };
        if !added {
            if let Some(l) = ctx.current() {
                l.close().await;
            }
            return Err(Error::invalid("a sandbox holds at most 16 contexts"));
        }
        Ok(ctx)
    }

    /// The context an execution runs in: `None` is the sandbox's interpreter. A language
    /// other than the sandbox's, without a context, runs in that language's default context
    /// (opened on first use) — in a sandbox; a session answers `language_mismatch` instead.
    pub(crate) async fn route_execution(
        &self,
        caller: &Caller,
        s: &Arc<Session>,
        context: Option<&str>,
        language: Option<&str>,
    ) -> Result<Option<Arc<Ctx>>, Error> {
        if let Some(id) = context {
            if language.is_some() {
                return Err(Error::invalid(
                    "name either a context or a language, not both",
                ));
            }
            return self.find_context(s, id);
        }
        let Some(lang) = language else {
            return Ok(None);
        };
        let wanted = parse_language(lang)?;
        let has = self.pool(&s.pool)?.spec.language;
        if wanted == has {
            return Ok(None);
        }
        if !s.sandbox.is_sandbox {
            return Err(Error::LanguageMismatch(format!(
                "session {:?} runs {has}, not {wanted}: use another session for {wanted}",
                s.identifier
            )));
        }
        let existing = s.sandbox.contexts.lock().ok().and_then(|c| {
            c.values()
                .find(|c| c.default_for_language && c.language == wanted)
                .cloned()
        });
        match existing {
            Some(c) => Ok(Some(c)),
            None => Ok(Some(self.open_ctx(caller, s, wanted, None, true).await?)),
        }
    }

    /// Opens a context in the sandbox.
    pub async fn create_context(
        &self,
        caller: &Caller,
        sandbox: &str,
        cmd: CreateContext,
    ) -> Result<ContextInfo, Error> {
        let s = self.awake(caller, sandbox).await?;
        let has = self.pool(&s.pool)?.spec.language;
        let language = match cmd.language.as_deref() {
            Some(l) => parse_language(l)?,
            None => has,
        };
        s.touch();
        Ok(self
            .open_ctx(caller, &s, language, cmd.cwd, false)
            .await?
            .info())
    }

    /// The sandbox's contexts, its interpreter first.
    pub async fn list_contexts(
        &self,
        caller: &Caller,
        sandbox: &str,
    ) -> Result<Vec<ContextInfo>, Error> {
        let s = self.awake(caller, sandbox).await?;
        let mut out = vec![ContextInfo {
            id: DEFAULT_CONTEXT.into(),
            language: self.pool(&s.pool)?.spec.language,
            cwd: "/mnt/data".into(),
        }];
        if let Ok(c) = s.sandbox.contexts.lock() {
            out.extend(c.values().map(|c| c.info()));
        }
        Ok(out)
    }

    /// One context.
    pub async fn get_context(
        &self,
        caller: &Caller,
        sandbox: &str,
        context: &str,
    ) -> Result<ContextInfo, Error> {
        self.list_contexts(caller, sandbox)
            .await?
            .into_iter()
            .find(|c| c.id == context)
            .ok_or_else(|| {
                Error::ContextNotFound(format!("no context {context:?} in this sandbox"))
            })
    }

    /// Closes a context (not the sandbox's interpreter: delete the sandbox for that).
    pub async fn delete_context(
        &self,
        caller: &Caller,
        sandbox: &str,
        context: &str,
    ) -> Result<(), Error> {
        let s = self.awake(caller, sandbox).await?;
        let Some(ctx) = self.find_context(&s, context)? else {
            return Err(Error::invalid(
                "the default context is the sandbox's interpreter; delete the sandbox instead",
            ));
        };
        if let Ok(mut c) = s.sandbox.contexts.lock() {
            c.remove(&ctx.id);
        }
        if let Some(l) = ctx.current() {
            l.close().await;
        }
        Ok(())
    }

    /// Replaces a context's interpreter with a fresh one (its state is lost; a running
    /// execution ends).
    pub async fn restart_context(
        &self,
        caller: &Caller,
        sandbox: &str,
        context: &str,
    ) -> Result<ContextInfo, Error> {
        let s = self.awake(caller, sandbox).await?;
        let Some(ctx) = self.find_context(&s, context)? else {
            return Err(Error::NotSupported(
                "the default context is the sandbox's interpreter and cannot be restarted; \
                 open another context"
                    .into(),
            ));
        };
        if let Some(old) = ctx.current() {
            old.close().await;
        }
        let env = self.process_env(&s, &BTreeMap::new());
        let cwd = Some(ctx.cwd.clone());
        let fresh = s
            .live
            .open_context(ctx.language, cwd, env)
            .await
            .map_err(Error::from)?;
        if let Ok(mut l) = ctx.live.lock() {
            *l = Arc::from(fresh);
        }
        Ok(ctx.info())
    }

    // ---- processes ----

    fn process_env(&self, s: &Session, extra: &BTreeMap<String, String>) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = s.live.command_env().into_iter().collect();
        env.extend(s.sandbox.envs.clone());
        env.extend(extra.clone());
        env.into_iter().collect()
    }

    fn find_process(&self, s: &Session, sel: &ProcessSelector) -> Result<Arc<Proc>, Error> {
        let procs = s
            .sandbox
            .processes
            .lock()
            .map_err(|_| Error::internal("processes poisoned"))?;
        let found = match sel {
            ProcessSelector::Pid(pid) => procs.get(pid).cloned(),
            ProcessSelector::Tag(tag) => procs
                .values()
                .find(|p| p.info.tag.as_deref() == Some(tag.as_str()))
                .cloned(),
        };
        found.ok_or_else(|| {
            Error::ProcessNotFound(match sel {
                ProcessSelector::Pid(pid) => format!("no process {pid} runs in this sandbox"),
                ProcessSelector::Tag(tag) => format!("no process tagged {tag:?} runs here"),
            })
        })
    }

    /// Starts a process in the sandbox and answers it with its events from the start.
    pub async fn start_process(
        &self,
        caller: &Caller,
        sandbox: &str,
        cmd: StartProcess,
    ) -> Result<ProcessStream, Error> {
        let s = self.awake(caller, sandbox).await?;
        check_envs(&cmd.envs)?;
        let cwd = cmd.cwd.clone().unwrap_or_else(|| "/mnt/data".into());
        check_cwd(&cwd)?;
        let argv = match &cmd.command {
            Command::Shell(line) => {
                if line.contains('\0') {
                    return Err(Error::invalid("the command contains NUL"));
                }
                vec!["/bin/bash".into(), "-l".into(), "-c".into(), line.clone()]
            }
            Command::Argv(argv) => {
                if argv.is_empty() || argv.iter().any(|a| a.contains('\0')) {
                    return Err(Error::invalid(
                        "argv must name a program, and no argument may contain NUL",
                    ));
                }
                argv.clone()
            }
        };
        if let Some(t) = cmd.timeout_s
            && !(t > 0.0 && t.is_finite())
        {
            return Err(Error::invalid("the timeout must be a positive number"));
        }
        if s.sandbox.running() >= 64 {
            return Err(Error::invalid(
                "a sandbox runs at most 64 processes at once",
            ));
        }
        if let Err(e) = self.admit_execution_rate(&caller.tenant).await {
            return Err(self
                .refuse(caller, &s.pool, &s.id, Some(&s.identifier), e)
                .await);
        }
        let req = ProcessRequest {
            argv: argv.clone(),
            env: self.process_env(&s, &cmd.envs),
            cwd: cwd.clone(),
            stdin: cmd.stdin,
        };
        s.touch();
        let live = s.live.spawn(req).await.map_err(Error::from)?;
        let info = ProcessInfo {
            pid: live.pid,
            tag: cmd.tag.clone(),
            argv,
            envs: cmd.envs.clone(),
            cwd,
            started_at: SystemTime::now(),
        };
        let (end_tx, end_rx) = watch::channel(None);
        let proc = Arc::new(Proc {
            info: info.clone(),
            stdin: tokio::sync::Mutex::new(live.stdin),
            signal: live.signal.clone(),
            readers: Mutex::new(Vec::new()),
            end: end_rx,
        });
        let events = proc.attach();
        if let Ok(mut p) = s.sandbox.processes.lock() {
            p.insert(info.pid, proc.clone());
        }
        s.in_flight_add();
        tracing::info!(session = %s.id, pid = info.pid, "process started");
        let me = self.clone();
        let session = s.clone();
        let started = crate::manager::now_ms();
        let code = match &cmd.command {
            Command::Shell(line) => line.clone(),
            Command::Argv(a) => a.join(" "),
        };
        let by = caller.clone();
        tokio::spawn(async move {
            let end = pump(
                &proc,
                live.stdout,
                live.stderr,
                live.exit,
                live.signal,
                cmd.timeout_s,
                end_tx,
            )
            .await;
            if let Ok(mut p) = session.sandbox.processes.lock()
                && p.get(&proc.info.pid).is_some_and(|x| Arc::ptr_eq(x, &proc))
            {
                p.remove(&proc.info.pid);
            }
            session.in_flight_sub();
            session.touch();
            me.audit_process(&session, started, code, by, end).await;
        });
        Ok(ProcessStream { info, events })
    }

    /// The processes running in the sandbox.
    pub async fn list_processes(
        &self,
        caller: &Caller,
        sandbox: &str,
    ) -> Result<Vec<ProcessInfo>, Error> {
        let s = self.awake(caller, sandbox).await?;
        let procs = s
            .sandbox
            .processes
            .lock()
            .map_err(|_| Error::internal("processes poisoned"))?;
        Ok(procs.values().map(|p| p.info.clone()).collect())
    }

    /// Attaches to a running process: its events from now on.
    pub async fn attach_process(
        &self,
        caller: &Caller,
        sandbox: &str,
        sel: &ProcessSelector,
    ) -> Result<ProcessStream, Error> {
        let s = self.awake(caller, sandbox).await?;
        let p = self.find_process(&s, sel)?;
        s.touch();
        Ok(ProcessStream {
            info: p.info.clone(),
            events: p.attach(),
        })
    }

    /// Writes to a process's stdin.
    pub async fn write_stdin(
        &self,
        caller: &Caller,
        sandbox: &str,
        sel: &ProcessSelector,
        data: &[u8],
    ) -> Result<(), Error> {
        let s = self.awake(caller, sandbox).await?;
        let p = self.find_process(&s, sel)?;
        s.touch();
        let mut stdin = p.stdin.lock().await;
        let Some(w) = stdin.as_mut() else {
            return Err(Error::invalid(
                "this process has no stdin (start it with stdin) or it was closed",
            ));
        };
        let wrote = tokio::time::timeout(Duration::from_secs(10), async {
            w.write_all(data).await?;
            w.flush().await
        })
        .await;
        match wrote {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::invalid("the process no longer reads its stdin")),
            Err(_) => Err(Error::invalid("the process does not read its stdin")),
        }
    }

    /// Closes a process's stdin (it reads end-of-file).
    pub async fn close_stdin(
        &self,
        caller: &Caller,
        sandbox: &str,
        sel: &ProcessSelector,
    ) -> Result<(), Error> {
        let s = self.awake(caller, sandbox).await?;
        let p = self.find_process(&s, sel)?;
        if let Some(mut w) = p.stdin.lock().await.take() {
            let _ = w.shutdown().await;
        }
        Ok(())
    }

    /// Sends a signal to a process (`9` kills it).
    pub async fn signal_process(
        &self,
        caller: &Caller,
        sandbox: &str,
        sel: &ProcessSelector,
        signal: i32,
    ) -> Result<(), Error> {
        if !(1..=64).contains(&signal) {
            return Err(Error::invalid(format!("no signal {signal}")));
        }
        let s = self.awake(caller, sandbox).await?;
        let p = self.find_process(&s, sel)?;
        (p.signal)(signal).map_err(Error::from)
    }

    // ---- ports ----

    /// A connection to a server listening on `port` inside the sandbox.
    pub async fn connect_port(
        &self,
        caller: &Caller,
        sandbox: &str,
        port: u16,
    ) -> Result<(tokio::net::TcpStream, PortLease), Error> {
        let s = self.awake(caller, sandbox).await?;
        s.touch();
        let stream = s.live.connect(port).await.map_err(Error::from)?;
        if let Ok(mut l) = s.sandbox.life.lock() {
            l.ports_open += 1;
        }
        Ok((
            stream,
            PortLease {
                session: Arc::downgrade(&s),
            },
        ))
    }

    async fn audit_process(
        &self,
        s: &Session,
        started: i64,
        code: String,
        by: Caller,
        end: ProcessEnd,
    ) {
        let Some(a) = self.audit() else {
            return;
        };
        let (keep_code, _) = a.policy(&s.pool);
        let mut rec = ampoule_audit::Record::new(
            ampoule_audit::Kind::Process,
            started,
            &s.tenant,
            &s.pool,
            &s.id,
        );
        rec.identifier = Some(s.identifier.clone());
        by.stamp(&mut rec);
        rec.language = Some("shell".into());
        rec.code_sha256 = Some(ampoule_audit::sha256_hex(code.as_bytes()));
        rec.code = keep_code.then_some(code);
        rec.status = Some(if end.timed_out {
            "timed_out".into()
        } else if end.exit_code == 0 {
            "success".into()
        } else {
            "error".into()
        });
        rec.duration_ms = Some((crate::manager::now_ms() - started).max(0) as f64);
        rec.decided_by = end.timed_out.then(|| "time".into());
        self.write_audit_record(rec).await;
    }
}

/// Reads a process's output until it ends, handing each piece to its readers, and answers
/// how it ended.
async fn pump(
    proc: &Proc,
    mut stdout: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    mut stderr: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    exit: std::pin::Pin<Box<dyn std::future::Future<Output = ProcessExit> + Send>>,
    signal: Signaller,
    timeout_s: Option<f64>,
    end_tx: watch::Sender<Option<ProcessEnd>>,
) -> ProcessEnd {
    // A timeout too large for a clock (`1e300`) is no timeout, never a panic that would
    // leave the process without its end.
    let deadline = timeout_s
        .and_then(|t| Duration::try_from_secs_f64(t).ok())
        .and_then(|d| tokio::time::Instant::now().checked_add(d));
    let mut out_buf = vec![0u8; 16 * 1024];
    let mut err_buf = vec![0u8; 16 * 1024];
    let (mut out_open, mut err_open) = (true, true);
    let mut timed_out = false;
    let mut exit = exit;
    let mut status: Option<ProcessExit> = None;
    loop {
        if !out_open && !err_open && status.is_some() {
            break;
        }
        let sleep = async {
            match deadline {
                Some(d) if !timed_out => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            n = stdout.read(&mut out_buf), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => fan_out(proc, ProcessEvent::Stdout(Bytes::copy_from_slice(&out_buf[..n]))).await,
            },
            n = stderr.read(&mut err_buf), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => fan_out(proc, ProcessEvent::Stderr(Bytes::copy_from_slice(&err_buf[..n]))).await,
            },
            st = &mut exit, if status.is_none() => {
                status = Some(st);
                // Children that kept the pipes open must not hold the end back for long.
                let grace = tokio::time::sleep(Duration::from_millis(200));
                tokio::pin!(grace);
                while out_open || err_open {
                    tokio::select! {
                        n = stdout.read(&mut out_buf), if out_open => match n {
                            Ok(0) | Err(_) => out_open = false,
                            Ok(n) => fan_out(proc, ProcessEvent::Stdout(Bytes::copy_from_slice(&out_buf[..n]))).await,
                        },
                        n = stderr.read(&mut err_buf), if err_open => match n {
                            Ok(0) | Err(_) => err_open = false,
                            Ok(n) => fan_out(proc, ProcessEvent::Stderr(Bytes::copy_from_slice(&err_buf[..n]))).await,
                        },
                        () = &mut grace => break,
                    }
                }
                break;
            }
            () = sleep => {
                timed_out = true;
                let _ = signal(9);
            }
        }
    }
    let end = match status {
        Some(ProcessExit::Exited(code)) => ProcessEnd {
            exit_code: code,
            signal: None,
            timed_out,
        },
        Some(ProcessExit::Signaled(sig)) => ProcessEnd {
            exit_code: -1,
            signal: Some(sig),
            timed_out,
        },
        Some(ProcessExit::Lost) | None => ProcessEnd {
            exit_code: -1,
            signal: Some(9),
            timed_out,
        },
    };
    let _ = end_tx.send(Some(end));
    let readers = proc
        .readers
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default();
    for r in readers {
        let _ = tokio::time::timeout(SLOW_READER, r.send(ProcessEvent::End(end))).await;
    }
    end
}

/// Hands an event to every reader; a reader that has gone or has not read for
/// [`SLOW_READER`] is dropped (the process never waits on it longer).
async fn fan_out(proc: &Proc, ev: ProcessEvent) {
    let readers: Vec<mpsc::Sender<ProcessEvent>> =
        proc.readers.lock().map(|r| r.clone()).unwrap_or_default();
    if readers.is_empty() {
        return;
    }
    let mut gone = Vec::new();
    for r in &readers {
        match r.try_send(ev.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => gone.push(r.clone()),
            Err(mpsc::error::TrySendError::Full(ev)) => {
                if tokio::time::timeout(SLOW_READER, r.send(ev)).await.is_err() {
                    gone.push(r.clone());
                }
            }
        }
    }
    if !gone.is_empty()
        && let Ok(mut r) = proc.readers.lock()
    {
        r.retain(|x| !gone.iter().any(|g| g.same_channel(x)));
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Session {
    pub(crate) fn in_flight_add(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn in_flight_sub(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
