//! A fake [`Engine`] for tests and development: no sandbox, no root.
//!
//! Each session is a directory `<root>/<n>` whose `data` sub-directory is served through a real
//! [`Scratch`] (so file-endpoint attacks are tested against the same descriptor-based code as
//! production), and a toy interpreter with state. Its language, one statement per line or `;`:
//!
//! | statement | effect |
//! |---|---|
//! | `name = expr` | stores an integer |
//! | `print(text)` / `eprint(text)` | writes `text` (quotes stripped) to stdout / stderr |
//! | `raise Name` | fails with error `Name` |
//! | `write NAME TEXT` | writes `TEXT` to the file `NAME` in `/mnt/data` (replacing it) |
//! | `read NAME` | writes the content of the file `NAME` in `/mnt/data` to stdout |
//! | `sleep S` | waits S seconds (a timeout ends the execution as `timed_out`) |
//! | `plot` | displays a PNG |
//! | `exit N` | sets the exit code (non-zero fails) |
//! | `expr` (last line) | the result: integers with `+` and `*`, variable names, `'strings'`, `image` |
//!
//! As a sandbox, a session runs its processes as host processes (`tokio::process`, in a process
//! group of their own, killed with the session) with `/mnt/data` mapped to its data directory in
//! their working directory and variables; its contexts are more toy interpreters with state of
//! their own over the same data directory; its ports are `127.0.0.1` of the host (a test
//! listens there). A command that cannot be started ends at once with status 127 and the
//! reason on stderr, as a shell's would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ampoule_runtime::Scratch;
use ampoule_types::{
    ExecutionError, ExecutionEvent, ExecutionResult, ExecutionStatus, Language, LimitKind,
    MimeBundle, SessionState,
};
use async_trait::async_trait;

use crate::engine::{
    Engine, EngineError, EventSender, ExecRequest, LiveContext, LiveProcess, LiveSession, PoolSpec,
    ProcessExit, ProcessRequest, Signaller,
};

/// A 1×1 transparent PNG, base64.
pub const PNG_1X1: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=";

/// Counters a test can read to see what the manager did.
#[derive(Debug, Default)]
pub struct FakeStats {
    /// Sessions started.
    pub started: AtomicUsize,
    /// Sessions closed.
    pub closed: AtomicUsize,
    /// The tenant each start was made for (`None`: warm stock anyone may get), in order.
    pub tenants: Mutex<Vec<Option<String>>>,
    /// Knob: durable sessions are checkpointed with their variables when they hibernate
    /// (into `checkpoint.img`, JSON) and restored from there, as the gVisor tier does; off,
    /// checkpoints are unsupported (the default tier).
    pub checkpoints: AtomicBool,
    /// Knob: how many of the next checkpoints fail.
    pub fail_checkpoints: AtomicUsize,
    /// Knob: how many of the next restores fail.
    pub fail_restores: AtomicUsize,
}

/// Takes one from a countdown; whether there was one.
fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Starts [`FakeSession`]s below a directory.
#[derive(Debug)]
pub struct FakeEngine {
    root: PathBuf,
    next: AtomicU64,
    /// What happened so far.
    pub stats: Arc<FakeStats>,
    /// Delay of every start (to observe warm pools).
    pub start_delay: Duration,
    /// How many of the next starts fail (a host out of sandboxes).
    pub fail_starts: Arc<AtomicUsize>,
    /// Answer as an engine whose tenants fork from zygotes of their own: no shared warm stock
    /// ([`Engine::keeps_warm_stock`]).
    pub per_tenant: bool,
}

impl FakeEngine {
    /// An engine keeping its sessions below `root` (which must exist).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            next: AtomicU64::new(0),
            stats: Arc::default(),
            start_delay: Duration::ZERO,
            fail_starts: Arc::default(),
            per_tenant: false,
        }
    }
}

#[async_trait]
impl Engine for FakeEngine {
    async fn start(
        &self,
        _spec: &PoolSpec,
        tenant: Option<&str>,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        if let Ok(mut t) = self.stats.tenants.lock() {
            t.push(tenant.map(str::to_owned));
        }
        if !self.start_delay.is_zero() {
            tokio::time::sleep(self.start_delay).await;
        }
        if self
            .fail_starts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(EngineError::Start("no free sandbox slot (fake)".into()));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.session_at(self.root.join(format!("session-{n}")), false)
    }

    fn keeps_warm_stock(&self, _spec: &PoolSpec) -> bool {
        !self.per_tenant
    }

    /// A durable session: its files in a directory next to where the real engine keeps its
    /// disk image (`<disk>.d`), kept when it closes.
    async fn start_durable(
        &self,
        _spec: &PoolSpec,
        _tenant: &str,
        disk: &std::path::Path,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        let mut dir = disk.as_os_str().to_owned();
        dir.push(".d");
        self.session_at(PathBuf::from(dir), true)
    }

    /// A durable session whose variables are read back from the checkpoint `image`.
    async fn restore_durable(
        &self,
        spec: &PoolSpec,
        tenant: &str,
        disk: &std::path::Path,
        image: &std::path::Path,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        if take_one(&self.stats.fail_restores) {
            return Err(EngineError::Start("the restore failed (fake)".into()));
        }
        let text = std::fs::read(image.join("checkpoint.img"))
            .map_err(|e| EngineError::Start(e.to_string()))?;
        let vars: HashMap<String, i64> =
            serde_json::from_slice(&text).map_err(|e| EngineError::Start(e.to_string()))?;
        let _ = (spec, tenant);
        let mut dir = disk.as_os_str().to_owned();
        dir.push(".d");
        let s = self.fake_session_at(PathBuf::from(dir), true)?;
        if let Ok(mut v) = s.toy.vars.lock() {
            *v = vars;
        }
        Ok(Box::new(s))
    }
}

impl FakeEngine {
    fn session_at(&self, dir: PathBuf, keep: bool) -> Result<Box<dyn LiveSession>, EngineError> {
        Ok(Box::new(self.fake_session_at(dir, keep)?))
    }

    fn fake_session_at(&self, dir: PathBuf, keep: bool) -> Result<FakeSession, EngineError> {
        let data = dir.join(ampoule_runtime::scratch::DATA);
        std::fs::create_dir_all(&data).map_err(|e| EngineError::Start(e.to_string()))?;
        let fd: std::os::fd::OwnedFd = std::fs::File::open(&dir)
            .map_err(|e| EngineError::Start(e.to_string()))?
            .into();
        self.stats.started.fetch_add(1, Ordering::SeqCst);
        Ok(FakeSession {
            toy: Toy::new(data),
            dir,
            scratch: Mutex::new(Some(Arc::new(Scratch::from_dir(fd)))),
            closed: Arc::new(AtomicBool::new(false)),
            stats: self.stats.clone(),
            children: Arc::default(),
            next_lost: AtomicU32::new(u32::MAX),
            keep,
            paused: AtomicBool::new(false),
        })
    }
}

/// A process a session started: its process group, and whether it has been reaped (after
/// which its pid may be another process's, so it is never signalled again).
#[derive(Debug)]
struct Child {
    pgid: i32,
    reaped: Arc<AtomicBool>,
}

/// One toy session.
#[derive(Debug)]
pub struct FakeSession {
    dir: PathBuf,
    toy: Toy,
    scratch: Mutex<Option<Arc<Scratch>>>,
    closed: Arc<AtomicBool>,
    stats: Arc<FakeStats>,
    children: Arc<Mutex<Vec<Child>>>,
    /// Pids for commands that could not start (counting down from `u32::MAX`).
    next_lost: AtomicU32,
    /// Its files outlive it (a durable session).
    keep: bool,
    /// Paused: its processes are stopped (`SIGSTOP`).
    paused: AtomicBool,
}

impl FakeSession {
    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn signal_children(&self, sig: i32) {
        if let Ok(c) = self.children.lock() {
            for c in c.iter().filter(|c| !c.reaped.load(Ordering::SeqCst)) {
                let _ = signal_group(c.pgid, sig);
            }
        }
    }
}

/// One toy interpreter: its variables and count, writing to a data directory.
#[derive(Debug)]
struct Toy {
    data: PathBuf,
    vars: Mutex<HashMap<String, i64>>,
    count: AtomicU64,
}

enum Value {
    Int(i64),
    Str(String),
    Image,
}

impl Toy {
    fn new(data: PathBuf) -> Self {
        Self {
            data,
            vars: Mutex::new(HashMap::new()),
            count: AtomicU64::new(0),
        }
    }

    fn eval(&self, expr: &str) -> Result<Value, ExecutionError> {
        let expr = expr.trim();
        if expr == "image" {
            return Ok(Value::Image);
        }
        if let Some(s) = expr
            .strip_prefix('\'')
            .and_then(|s| s.strip_suffix('\''))
            .or_else(|| expr.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
        {
            return Ok(Value::Str(s.to_owned()));
        }
        let vars = self
            .vars
            .lock()
            .map_err(|_| err("SystemError", "poisoned"))?;
        let mut sum: i64 = 0;
        for term in expr.split('+') {
            let mut product: i64 = 1;
            for factor in term.split('*') {
                let f = factor.trim();
                let v = match f.parse::<i64>() {
                    Ok(v) => v,
                    Err(_) => *vars
                        .get(f)
                        .ok_or_else(|| err("NameError", &format!("name '{f}' is not defined")))?,
                };
                product = product.wrapping_mul(v);
            }
            sum = sum.wrapping_add(product);
        }
        Ok(Value::Int(sum))
    }
}

fn err(name: &str, value: &str) -> ExecutionError {
    ExecutionError {
        name: name.to_owned(),
        value: value.to_owned(),
        traceback: vec![format!("{name}: {value}")],
    }
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix(['\'', '"'])
        .and_then(|s| s.strip_suffix(['\'', '"']))
        .unwrap_or(s)
}

impl Toy {
    async fn run(&self, req: ExecRequest, events: Option<EventSender>) -> ExecutionResult {
        let started = Instant::now();
        let count = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let mut out = ExecutionResult {
            status: ExecutionStatus::Succeeded,
            limit: None,
            session_state: SessionState::Kept,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            result: None,
            outputs: Vec::new(),
            error: None,
            execution_count: Some(count),
            exit_code: None,
            duration_ms: 0.0,
            cpu_time_ms: None,
            peak_memory_bytes: None,
            egress: Vec::new(),
        };
        let emit = |ev: ExecutionEvent| {
            if let Some(tx) = &events {
                let _ = tx.send(ev);
            }
        };
        let statements: Vec<&str> = req
            .code
            .split(['\n', ';'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let deadline = started + Duration::from_secs_f64(req.timeout_s.max(0.0));
        for (i, stmt) in statements.iter().enumerate() {
            let last = i + 1 == statements.len();
            if let Some(text) = stmt
                .strip_prefix("print(")
                .and_then(|s| s.strip_suffix(')'))
            {
                let line = format!("{}\n", unquote(text));
                out.stdout.push_str(&line);
                emit(ExecutionEvent::Stdout { text: line });
            } else if let Some(text) = stmt
                .strip_prefix("eprint(")
                .and_then(|s| s.strip_suffix(')'))
            {
                let line = format!("{}\n", unquote(text));
                out.stderr.push_str(&line);
                emit(ExecutionEvent::Stderr { text: line });
            } else if let Some(name) = stmt.strip_prefix("raise ") {
                out.error = Some(err(name.trim(), "raised"));
                break;
            } else if let Some(rest) = stmt.strip_prefix("write ") {
                let (name, text) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    out.error = Some(err("OSError", "a plain file name, please"));
                    break;
                }
                let path = self.data.join(name);
                if let Err(e) = std::fs::write(path, text) {
                    out.error = Some(err("OSError", &e.to_string()));
                    break;
                }
            } else if let Some(name) = stmt.strip_prefix("read ") {
                let name = name.trim();
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    out.error = Some(err("OSError", "a plain file name, please"));
                    break;
                }
                match std::fs::read_to_string(self.data.join(name)) {
                    Ok(text) => {
                        out.stdout.push_str(&text);
                        emit(ExecutionEvent::Stdout { text });
                    }
                    Err(_) => {
                        out.error = Some(err("FileNotFoundError", name));
                        break;
                    }
                }
            } else if let Some(secs) = stmt.strip_prefix("sleep ") {
                let secs: f64 = secs.trim().parse().unwrap_or(0.0);
                let until = Instant::now() + Duration::from_secs_f64(secs.max(0.0));
                if until > deadline {
                    tokio::time::sleep_until(deadline.into()).await;
                    out.status = ExecutionStatus::TimedOut;
                    out.limit = Some(LimitKind::Time);
                    break;
                }
                tokio::time::sleep_until(until.into()).await;
            } else if *stmt == "plot" {
                let mut data = MimeBundle::new();
                data.insert("image/png".into(), PNG_1X1.into());
                data.insert("text/plain".into(), "<Figure>".into());
                emit(ExecutionEvent::Display { data: data.clone() });
                out.outputs.push(data);
            } else if let Some(code) = stmt.strip_prefix("exit ") {
                let code: i32 = code.trim().parse().unwrap_or(1);
                out.exit_code = Some(code);
                if code != 0 {
                    out.error = Some(err("ExitStatus", &code.to_string()));
                }
                break;
            } else if let Some((name, expr)) = stmt.split_once('=') {
                match self.eval(expr) {
                    Ok(Value::Int(v)) => {
                        if let Ok(mut vars) = self.vars.lock() {
                            vars.insert(name.trim().to_owned(), v);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        out.error = Some(e);
                        break;
                    }
                }
            } else if last {
                let mut data = MimeBundle::new();
                match self.eval(stmt) {
                    Ok(Value::Int(v)) => {
                        data.insert("text/plain".into(), v.to_string().into());
                        data.insert("application/json".into(), v.into());
                    }
                    Ok(Value::Str(s)) => {
                        data.insert("text/plain".into(), format!("'{s}'").into());
                        data.insert("application/json".into(), s.into());
                    }
                    Ok(Value::Image) => {
                        data.insert("text/plain".into(), "<Image>".into());
                        data.insert("image/png".into(), PNG_1X1.into());
                    }
                    Err(e) => {
                        out.error = Some(e);
                        break;
                    }
                }
                out.result = Some(data);
            } else if let Err(e) = self.eval(stmt) {
                out.error = Some(e);
                break;
            }
        }
        if let Some(e) = &out.error {
            out.status = ExecutionStatus::Failed;
            out.stderr.push_str(&e.traceback.join("\n"));
        }
        out.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        out
    }
}

/// Where a path of the sandbox is on the host: `/mnt/data` is the session's data directory.
fn host_path(data: &Path, path: &str) -> PathBuf {
    match path.strip_prefix("/mnt/data") {
        Some("") => data.to_path_buf(),
        Some(rest) if rest.starts_with('/') => data.join(rest.trim_start_matches('/')),
        _ => PathBuf::from(path),
    }
}

/// A variable's value as the host sees it (`HOME=/mnt/data` and the like).
fn host_value(data: &Path, value: &str) -> String {
    if value == "/mnt/data" || value.starts_with("/mnt/data/") {
        host_path(data, value).to_string_lossy().into_owned()
    } else {
        value.to_owned()
    }
}

/// A process that could not start: it ends at once with status 127, saying why on stderr.
fn not_started(pid: u32, why: String) -> LiveProcess {
    LiveProcess {
        pid,
        stdin: None,
        stdout: Box::new(tokio::io::empty()),
        stderr: Box::new(std::io::Cursor::new(why.into_bytes())),
        signal: Arc::new(|_| Ok(())),
        exit: Box::pin(async { ProcessExit::Exited(127) }),
    }
}

/// Sends `sig` to a process group (ESRCH: it has just gone, which is no error).
fn signal_group(pgid: i32, sig: i32) -> Result<(), EngineError> {
    use nix::sys::signal::{Signal, killpg};
    let sig = Signal::try_from(sig).map_err(|_| {
        EngineError::Unsupported(format!("the fake engine cannot send signal {sig}"))
    })?;
    match killpg(nix::unistd::Pid::from_raw(pgid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(EngineError::Execute(format!("signalling a process: {e}"))),
    }
}

impl FakeSession {
    fn start_process(&self, req: ProcessRequest) -> LiveProcess {
        let data = &self.toy.data;
        let Some((program, args)) = req.argv.split_first() else {
            let pid = self.next_lost.fetch_sub(1, Ordering::SeqCst);
            return not_started(pid, "nothing to run\n".into());
        };
        let mut cmd = tokio::process::Command::new(host_path(data, program));
        cmd.args(args)
            .env_clear()
            .envs(req.env.iter().map(|(k, v)| (k, host_value(data, v))))
            .current_dir(host_path(data, &req.cwd))
            .stdin(if req.stdin {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let pid = self.next_lost.fetch_sub(1, Ordering::SeqCst);
                return not_started(pid, format!("{program}: {e}\n"));
            }
        };
        let (Some(pid), Some(stdout), Some(stderr)) =
            (child.id(), child.stdout.take(), child.stderr.take())
        else {
            let pid = self.next_lost.fetch_sub(1, Ordering::SeqCst);
            return not_started(pid, format!("{program}: lost at its start\n"));
        };
        let stdin = child
            .stdin
            .take()
            .map(|w| Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
        let pgid = i32::try_from(pid).unwrap_or(i32::MAX);
        let reaped = Arc::new(AtomicBool::new(false));
        if let Ok(mut c) = self.children.lock() {
            c.retain(|c| !c.reaped.load(Ordering::SeqCst));
            c.push(Child {
                pgid,
                reaped: reaped.clone(),
            });
        }
        let gone = reaped.clone();
        let signal: Signaller = Arc::new(move |sig| {
            if gone.load(Ordering::SeqCst) {
                return Ok(());
            }
            signal_group(pgid, sig)
        });
        let exit = Box::pin(async move {
            use std::os::unix::process::ExitStatusExt;
            let status = child.wait().await;
            reaped.store(true, Ordering::SeqCst);
            match status {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(code), _) => ProcessExit::Exited(code),
                    (None, Some(sig)) => ProcessExit::Signaled(sig),
                    (None, None) => ProcessExit::Lost,
                },
                Err(_) => ProcessExit::Lost,
            }
        });
        LiveProcess {
            pid,
            stdin,
            stdout: Box::new(stdout),
            stderr: Box::new(stderr),
            signal,
            exit,
        }
    }
}

/// Another toy interpreter in a session: state of its own, the session's files.
#[derive(Debug)]
pub struct FakeContext {
    toy: Toy,
    closed: AtomicBool,
    /// The session's: a context ends with its sandbox.
    session_closed: Arc<AtomicBool>,
}

#[async_trait]
impl LiveContext for FakeContext {
    async fn execute(
        &self,
        req: ExecRequest,
        events: Option<EventSender>,
    ) -> Result<ExecutionResult, EngineError> {
        if !self.alive() {
            return Err(EngineError::Closed);
        }
        Ok(self.toy.run(req, events).await)
    }

    fn alive(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && !self.session_closed.load(Ordering::SeqCst)
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl LiveSession for FakeSession {
    async fn execute(
        &self,
        req: ExecRequest,
        events: Option<EventSender>,
    ) -> Result<ExecutionResult, EngineError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        Ok(self.toy.run(req, events).await)
    }

    async fn spawn(&self, req: ProcessRequest) -> Result<LiveProcess, EngineError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        Ok(self.start_process(req))
    }

    async fn open_context(
        &self,
        _language: Language,
        _cwd: Option<String>,
        _env: Vec<(String, String)>,
    ) -> Result<Box<dyn LiveContext>, EngineError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        Ok(Box::new(FakeContext {
            toy: Toy::new(self.toy.data.clone()),
            closed: AtomicBool::new(false),
            session_closed: self.closed.clone(),
        }))
    }

    async fn connect(&self, port: u16) -> Result<tokio::net::TcpStream, EngineError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|_| {
                EngineError::Unreachable(format!("nothing listens on port {port} in the sandbox"))
            })
    }

    fn scratch(&self) -> Result<Arc<Scratch>, EngineError> {
        self.scratch
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or(EngineError::Closed)
    }

    fn alive(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }

    fn pause(&self) -> Result<(), EngineError> {
        self.signal_children(nix::sys::signal::Signal::SIGSTOP as i32);
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&self) -> Result<(), EngineError> {
        self.signal_children(nix::sys::signal::Signal::SIGCONT as i32);
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn checkpoint(&self, image: &std::path::Path) -> Result<(), EngineError> {
        if !self.keep || !self.stats.checkpoints.load(Ordering::SeqCst) {
            return Err(EngineError::Unsupported("no checkpoints (fake)".into()));
        }
        if take_one(&self.stats.fail_checkpoints) {
            return Err(EngineError::Execute("the checkpoint failed (fake)".into()));
        }
        let vars = self.toy.vars.lock().map(|v| v.clone()).unwrap_or_default();
        let text = serde_json::to_vec(&vars).map_err(|e| EngineError::Execute(e.to_string()))?;
        std::fs::create_dir_all(image).map_err(|e| EngineError::Execute(e.to_string()))?;
        std::fs::write(image.join("checkpoint.img"), text)
            .map_err(|e| EngineError::Execute(e.to_string()))
    }

    async fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            let children = self
                .children
                .lock()
                .map(|mut c| std::mem::take(&mut *c))
                .unwrap_or_default();
            for c in children {
                if !c.reaped.load(Ordering::SeqCst) {
                    let _ = signal_group(c.pgid, 9);
                }
            }
            if let Ok(mut s) = self.scratch.lock() {
                s.take();
            }
            if !self.keep {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            self.stats.closed.fetch_add(1, Ordering::SeqCst);
        }
    }
}
