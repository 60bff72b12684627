//! One live session: a sandbox running a language kernel, driven over the protocol.
//!
//! [`Session::start`] builds the sandbox, writes the kernel's files, and waits for the kernel's
//! `hello`. [`Session::execute`] (or [`Session::execute_streaming`], which also hands every
//! piece of output to a callback as it arrives) sends one `execute` request and collects the
//! events of that execution into an [`ExecutionResult`].
//!
//! Invariants:
//! * The kernel is untrusted: frames are size-limited, a malformed frame ends the session, and
//!   every wait on the kernel has a deadline.
//! * Output is capped per stream and execution at `Limits::output_bytes`; reaching the cap
//!   stops the execution like a timeout does (status `killed`, limit `output`).
//! * On a timeout the kernel is asked to interrupt the code; if it has not finished after
//!   [`Session::set_interrupt_grace`] the sandbox is killed. The outcome always says whether the
//!   session's state survived (`session_state`), and a lost session refuses further work.
//! * Sandboxes die with the thread that spawned them (see `ampoule_runtime::sandbox`): start
//!   sessions on threads that outlive them (tokio worker threads, a current-thread runtime on
//!   the main thread).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ampoule_protocol::{
    DoneStatus, Event, Execute, FrameDecoder, MAX_FRAME_BYTES, PROTOCOL_VERSION, Request,
    StreamName,
};
use ampoule_runtime::scratch::CODE;
use ampoule_runtime::{Host, ProgramExit, Sandbox, SandboxConfig, Scratch};
use ampoule_types::{
    ExecutionError, ExecutionEvent, ExecutionResult, ExecutionStatus, LimitKind, Limits,
    MimeBundle, SessionState,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::language::{self, LanguageSpec};

/// How long a kernel may take to say hello (Mono compiles its evaluator first).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a kernel gets to stop interrupted code before its sandbox is killed.
const DEFAULT_GRACE: Duration = Duration::from_secs(3);
/// The runtime derives a lifetime CPU-seconds backstop (`RLIMIT_CPU`) from
/// `Limits::timeout_s`; a session's kernel lives across many executions, so the sandbox gets
/// a day's worth and the per-execution timeout is enforced here.
const SESSION_CPU_BACKSTOP_S: f64 = 86_400.0;
/// Rich outputs kept per execution, in bytes of JSON; beyond it they are dropped.
const MAX_DISPLAY_BYTES: usize = 64 * 1024 * 1024;
/// Bytes of the kernel's own stderr kept for diagnostics.
const LOG_TAIL_BYTES: usize = 8 * 1024;

/// One piece of code to run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecuteRequest {
    /// Source code.
    pub code: String,
    /// A JSON object the code sees as `inputs` (shell: `$AMPOULE_INPUTS`).
    pub inputs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Wall-clock limit in seconds; `Limits::timeout_s` of the session when absent.
    pub timeout_s: Option<f64>,
}

impl ExecuteRequest {
    /// A request for `code` with the session's default timeout and no inputs.
    pub fn new(code: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            ..Self::default()
        }
    }

    /// Sets the wall-clock limit.
    pub fn timeout(mut self, seconds: f64) -> Self {
        self.timeout_s = Some(seconds);
        self
    }

    /// Sets the inputs object.
    pub fn inputs(mut self, inputs: serde_json::Map<String, serde_json::Value>) -> Self {
        self.inputs = Some(inputs);
        self
    }
}

/// What the event reader hands to the session.
#[derive(Debug)]
enum Incoming {
    Event(Event),
    /// The kernel broke the protocol; the reader has stopped.
    Broken(String),
}

/// Why the host stopped an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    Output,
}

impl Stop {
    fn status(self) -> (ExecutionStatus, LimitKind) {
        match self {
            Stop::Timeout => (ExecutionStatus::TimedOut, LimitKind::Time),
            Stop::Output => (ExecutionStatus::Killed, LimitKind::Output),
        }
    }
}

/// How the wait for an execution ended.
enum End {
    Done {
        status: DoneStatus,
        execution_count: u64,
        exit_code: Option<i32>,
    },
    /// The event stream ended: the kernel is gone.
    Died,
    Broken(String),
    /// An interrupt went unanswered for the grace period.
    Unresponsive,
}

/// A live interpreter in a sandbox.
#[derive(Debug)]
pub struct Session {
    language: &'static str,
    runtime: String,
    sandbox: Body,
    requests: ChildStdin,
    events: mpsc::Receiver<Incoming>,
    log: Arc<Mutex<Vec<u8>>>,
    limits: Limits,
    grace: Duration,
    seq: u64,
    execution_count: u64,
    lost: Option<String>,
    /// The sandbox's egress gateway, when it has network (see [`Session::start_with`]); it
    /// lives as long as the session.
    pub(crate) gateway: Option<ampoule_egress::Gateway>,
}

impl Session {
    /// Starts a session of the language called `name` (see [`language::find`]).
    pub async fn start_language(host: &Host, name: &str, limits: Limits) -> Result<Self> {
        let spec = language::find(name)?.locate(&limits)?;
        Self::start(host, spec, limits).await
    }

    /// Starts the kernel described by `spec` in a fresh sandbox with `limits`
    /// (`limits.timeout_s` is the default per-execution timeout).
    pub async fn start(host: &Host, spec: LanguageSpec, limits: Limits) -> Result<Self> {
        let cfg = sandbox_config(&spec, &limits);
        Self::start_config(host, spec, limits, cfg).await
    }

    /// [`Session::start`] with the sandbox's config made by the caller.
    pub(crate) async fn start_config(
        host: &Host,
        spec: LanguageSpec,
        limits: Limits,
        cfg: SandboxConfig,
    ) -> Result<Self> {
        let files = spec.files.clone();
        let restoring = cfg.restore_image.is_some();
        let sandbox = Sandbox::spawn(host, &cfg, |scratch| {
            for f in &files {
                scratch.write(CODE, f.name, f.contents.as_bytes(), 0o644)?;
            }
            Ok(())
        })
        .await?;
        if restoring {
            return Self::adopt(sandbox, spec.language, limits).await;
        }
        Self::handshake(sandbox, spec.language, limits).await
    }

    /// Takes over a sandbox restored from a checkpoint: its kernel said hello long ago and
    /// waits for requests on what are now this sandbox's pipes. An empty execution proves it
    /// answers before the session is handed out.
    async fn adopt(mut sandbox: Sandbox, language: &'static str, limits: Limits) -> Result<Self> {
        let fail = |detail: String| Error::KernelStart {
            language: language.into(),
            detail,
        };
        let (Some(requests), Some(stdout), Some(stderr)) = (
            sandbox.stdin.take(),
            sandbox.stdout.take(),
            sandbox.stderr.take(),
        ) else {
            return Err(fail("the sandbox has no stdio pipes".into()));
        };
        let (tx, events) = mpsc::channel(256);
        tokio::spawn(read_events(stdout, tx));
        let log = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(keep_tail(stderr, log.clone()));
        let mut session = Self {
            language,
            runtime: format!("{language} (restored from a checkpoint)"),
            sandbox: Body::Sandbox(sandbox),
            requests,
            events,
            log,
            limits,
            grace: DEFAULT_GRACE,
            seq: 0,
            execution_count: 0,
            lost: None,
            gateway: None,
        };
        let probe = session
            .execute(ExecuteRequest::new("").timeout(START_TIMEOUT.as_secs_f64()))
            .await;
        match probe {
            Ok(r) if r.status == ExecutionStatus::Succeeded => Ok(session),
            Ok(r) => {
                let why = format!(
                    "the restored kernel did not answer ({:?}): {}",
                    r.status,
                    session.kernel_log()
                );
                session.close().await;
                Err(fail(why))
            }
            Err(e) => {
                let why = format!("the restored kernel did not answer: {e}");
                session.close().await;
                Err(fail(why))
            }
        }
    }

    /// Checkpoints the session's sandbox into the directory `image` (gVisor tier; see
    /// `ampoule_runtime::Sandbox::checkpoint`): the kernel's memory is kept there, and the
    /// session is over (close it). Never while an execution runs (`&mut self`).
    pub async fn checkpoint(&mut self, image: &std::path::Path) -> Result<()> {
        if let Some(why) = &self.lost {
            return Err(Error::Lost(why.clone()));
        }
        match &mut self.sandbox {
            Body::Sandbox(s) => Ok(s.checkpoint(image).await?),
            Body::Entered { .. } => Err(ampoule_runtime::Error::Invalid(
                "a context cannot be checkpointed apart from its sandbox".into(),
            )
            .into()),
        }
    }

    /// Takes over a freshly spawned sandbox whose program is a kernel: wires its stdio to the
    /// protocol and waits for the kernel's `hello`.
    pub async fn handshake(
        mut sandbox: Sandbox,
        language: &'static str,
        limits: Limits,
    ) -> Result<Self> {
        let stdio = (
            sandbox.stdin.take(),
            sandbox.stdout.take(),
            sandbox.stderr.take(),
        );
        Self::handshake_body(Body::Sandbox(sandbox), stdio, language, limits).await
    }

    /// [`Session::handshake`] of a kernel in a sandbox, or of one entered into a sandbox (a
    /// [`crate::Context`]).
    pub(crate) async fn handshake_body(
        mut sandbox: Body,
        stdio: (
            Option<ChildStdin>,
            Option<tokio::process::ChildStdout>,
            Option<tokio::process::ChildStderr>,
        ),
        language: &'static str,
        limits: Limits,
    ) -> Result<Self> {
        let (Some(requests), Some(stdout), Some(stderr)) = stdio else {
            return Err(Error::KernelStart {
                language: language.into(),
                detail: "the sandbox has no stdio pipes".into(),
            });
        };
        let (tx, mut events) = mpsc::channel(256);
        tokio::spawn(read_events(stdout, tx));
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_task = tokio::spawn(keep_tail(stderr, log.clone()));

        let fail = |detail: String| Error::KernelStart {
            language: language.into(),
            detail,
        };
        let runtime = match tokio::time::timeout(START_TIMEOUT, events.recv()).await {
            Ok(Some(Incoming::Event(Event::Hello {
                protocol_version,
                runtime,
                ..
            }))) => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(Error::ProtocolVersion {
                        got: protocol_version,
                        want: PROTOCOL_VERSION,
                    });
                }
                runtime
            }
            Ok(Some(Incoming::Event(other))) => {
                return Err(fail(format!("its first message was not hello: {other:?}")));
            }
            Ok(Some(Incoming::Broken(why))) => return Err(fail(why)),
            Ok(None) => {
                let exit = tokio::time::timeout(Duration::from_secs(2), sandbox.wait()).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), log_task).await;
                let said = tail_text(&log);
                let how = match exit {
                    Ok(Ok(ProgramExit::Exited(code))) => format!("it exited with status {code}"),
                    Ok(Ok(ProgramExit::Signaled(sig))) => format!("it was killed by signal {sig}"),
                    Ok(Ok(ProgramExit::Killed)) | Err(_) => "it was killed".to_owned(),
                    Ok(Err(e)) => format!("it could not be started: {e}"),
                };
                return Err(fail(if said.is_empty() {
                    how
                } else {
                    format!("{how}: {said}")
                }));
            }
            Err(_) => {
                return Err(fail(format!(
                    "no hello within {} s; its stderr: {}",
                    START_TIMEOUT.as_secs(),
                    tail_text(&log)
                )));
            }
        };
        // Every execution reads the cgroup's counters before and after; the first read opens
        // their files (a path walk in cgroupfs each). Done now, while the session waits in a
        // warm stock, rather than on its first request (≈ 60 µs of it).
        let _ = sandbox.stats();
        Ok(Self {
            language,
            runtime,
            sandbox,
            requests,
            events,
            log,
            limits,
            grace: DEFAULT_GRACE,
            seq: 0,
            execution_count: 0,
            lost: None,
            gateway: None,
        })
    }

    /// The plug-in's name.
    pub fn language(&self) -> &'static str {
        self.language
    }

    /// The runtime, as the kernel reported it (`CPython 3.11.2`).
    pub fn runtime(&self) -> &str {
        &self.runtime
    }

    /// Whether the interpreter is alive: `false` once an execution reported `lost`, or once
    /// its output stream ended between executions (it died or exited on its own).
    pub fn is_alive(&self) -> bool {
        self.lost.is_none() && !self.events.is_closed()
    }

    /// The number of executions so far.
    pub fn execution_count(&self) -> u64 {
        self.execution_count
    }

    /// The session's files (`/mnt/data`).
    pub fn scratch(&self) -> &Scratch {
        self.sandbox.scratch()
    }

    /// The cgroup of the session's sandbox, to freeze and thaw it (pause and resume); `None`
    /// without cgroups.
    pub fn freezer(&self) -> Option<ampoule_runtime::cgroup::Cgroup> {
        match &self.sandbox {
            Body::Sandbox(s) => s.freezer(),
            Body::Entered { .. } => None,
        }
    }

    /// A handle to run more processes in the session's sandbox and to connect to its ports;
    /// `None` once the sandbox is over.
    pub fn entrance(&self) -> Option<ampoule_runtime::Entrance> {
        self.sandbox.entrance()
    }

    /// The session's limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How long interrupted code gets to stop before the sandbox is killed.
    pub fn set_interrupt_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Whether the scratch space is (nearly) out of bytes or inodes; asked only of code that
    /// failed, so a successful round trip pays no `statvfs`.
    fn scratch_full(&self) -> bool {
        self.sandbox
            .scratch()
            .free()
            .is_some_and(|(bytes, inodes)| bytes < 64 * 1024 || inodes == 0)
    }

    /// How the kernel's process ended (a lost session), as its sandbox reported it; `None`
    /// while it still runs after a short wait.
    pub async fn program_exit(&mut self) -> Option<ampoule_runtime::ProgramExit> {
        tokio::time::timeout(Duration::from_secs(2), self.sandbox.wait())
            .await
            .ok()?
            .ok()
    }

    /// The tail of the kernel's own diagnostics (its stderr before it took over fd 2).
    pub fn kernel_log(&self) -> String {
        tail_text(&self.log)
    }

    /// Runs one piece of code and collects its outcome.
    pub async fn execute(&mut self, req: ExecuteRequest) -> Result<ExecutionResult> {
        self.execute_streaming(req, |_| {}).await
    }

    /// Runs one piece of code, handing each piece of output to `on_output` as it arrives.
    pub async fn execute_streaming(
        &mut self,
        req: ExecuteRequest,
        mut on_output: impl FnMut(ExecutionEvent),
    ) -> Result<ExecutionResult> {
        if let Some(why) = &self.lost {
            return Err(Error::Lost(why.clone()));
        }
        // Late events of earlier executions.
        loop {
            match self.events.try_recv() {
                Ok(_) => {}
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.mark_lost("the interpreter exited between executions")
                        .await;
                    return Err(Error::Lost(
                        "the interpreter exited between executions".into(),
                    ));
                }
            }
        }
        // Network attempts since the last execution ended (a thread it left running) were
        // logged then; they are no part of this execution's result.
        let _between = self.take_egress_events();
        self.seq += 1;
        let id = format!("x{}", self.seq);
        let timeout = req
            .timeout_s
            .filter(|t| t.is_finite() && *t > 0.0)
            .unwrap_or(self.limits.timeout_s)
            .max(0.001);
        let started = Instant::now();
        let stats_before = self.sandbox.stats();
        let execute = Request::Execute(Execute {
            id: id.clone(),
            code: req.code,
            inputs: req.inputs,
            timeout_s: Some(timeout),
        });
        if let Err(why) = self.send(&execute).await {
            self.mark_lost(&why).await;
            return Err(Error::Lost(why));
        }

        let cap = usize::try_from(self.limits.output_bytes).unwrap_or(usize::MAX);
        let mut acc = Collected::default();
        let mut stop: Option<Stop> = None;
        let mut deadline =
            tokio::time::Instant::from_std(started + Duration::from_secs_f64(timeout));
        let end = loop {
            tokio::select! {
                msg = self.events.recv() => match msg {
                    None => break End::Died,
                    Some(Incoming::Broken(why)) => break End::Broken(why),
                    Some(Incoming::Event(ev)) => {
                        if ev.id() != Some(id.as_str()) {
                            continue;
                        }
                        match ev {
                            Event::Stream { name, text, .. } => {
                                if acc.stream(name, &text, cap, &mut on_output) && stop.is_none() {
                                    stop = Some(Stop::Output);
                                    deadline = tokio::time::Instant::now() + self.grace;
                                    if self.send(&Request::Interrupt).await.is_err() {
                                        break End::Unresponsive;
                                    }
                                }
                            }
                            Event::Display { data, .. } => acc.display(data, &mut on_output),
                            Event::Result { data, execution_count, .. } => {
                                acc.result = Some(data);
                                acc.execution_count = execution_count;
                            }
                            Event::Error { ename, evalue, traceback, .. } => {
                                acc.error = Some(ExecutionError { name: ename, value: evalue, traceback });
                            }
                            Event::Done { status, execution_count, exit_code, .. } => {
                                break End::Done { status, execution_count, exit_code };
                            }
                            Event::Hello { .. } => {}
                        }
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    if stop.is_some() {
                        break End::Unresponsive;
                    }
                    stop = Some(Stop::Timeout);
                    deadline = tokio::time::Instant::now() + self.grace;
                    if self.send(&Request::Interrupt).await.is_err() {
                        break End::Unresponsive;
                    }
                }
            }
        };

        let stats_after = self.sandbox.stats();
        let oom = match (stats_before, stats_after) {
            (Some(b), Some(a)) => a.oom_kills > b.oom_kills,
            (None, Some(a)) => a.oom_kills > 0,
            _ => false,
        };
        // Code that failed after a limit refused it something (a fork past `pids.max`, a write
        // to a full scratch space) was stopped by that limit, as `ampoule run` reports it.
        let pids_refused = matches!(
            (stats_before, stats_after),
            (Some(b), Some(a)) if a.pids_max_hits > b.pids_max_hits
        );
        let (status, session_state, limit, exit_code) = match end {
            End::Done {
                status,
                execution_count,
                exit_code,
            } => {
                acc.execution_count = execution_count;
                let (status, limit) = match (status, stop) {
                    (DoneStatus::Ok, _) => (ExecutionStatus::Succeeded, None),
                    (DoneStatus::Interrupted, Some(stop)) => {
                        let (s, l) = stop.status();
                        (s, Some(l))
                    }
                    (_, _) if oom => (ExecutionStatus::Killed, Some(LimitKind::Memory)),
                    (_, _) if pids_refused => (ExecutionStatus::Killed, Some(LimitKind::Pids)),
                    (DoneStatus::Error | DoneStatus::Interrupted, _) if self.scratch_full() => {
                        (ExecutionStatus::Killed, Some(LimitKind::Disk))
                    }
                    (DoneStatus::Error | DoneStatus::Interrupted, _) => {
                        (ExecutionStatus::Failed, None)
                    }
                };
                (status, SessionState::Kept, limit, exit_code)
            }
            End::Died => {
                let exit = tokio::time::timeout(Duration::from_secs(2), self.sandbox.wait()).await;
                let stats = self.sandbox.stats();
                let oom = oom || stats.is_some_and(|s| s.oom_kills > 0);
                let how = match exit {
                    Ok(Ok(ProgramExit::Exited(code))) => {
                        format!("the interpreter exited with status {code}")
                    }
                    Ok(Ok(ProgramExit::Signaled(sig))) => {
                        format!("the interpreter was killed by signal {sig}")
                    }
                    _ => "the interpreter was killed".to_owned(),
                };
                if acc.error.is_none() {
                    let log = tail_text(&self.log);
                    acc.error = Some(ExecutionError {
                        name: if oom {
                            "MemoryLimit".into()
                        } else {
                            "KernelDied".into()
                        },
                        value: format!("{how}; the session's state is lost"),
                        traceback: log.lines().map(str::to_owned).collect(),
                    });
                }
                self.mark_lost(&how).await;
                let (status, limit) = match stop {
                    Some(stop) => {
                        let (s, l) = stop.status();
                        (s, Some(l))
                    }
                    None if oom => (ExecutionStatus::Killed, Some(LimitKind::Memory)),
                    None if pids_refused => (ExecutionStatus::Killed, Some(LimitKind::Pids)),
                    None if self.scratch_full() => (ExecutionStatus::Killed, Some(LimitKind::Disk)),
                    None => (ExecutionStatus::Failed, None),
                };
                (status, SessionState::Lost, limit, None)
            }
            End::Broken(why) => {
                acc.error = Some(ExecutionError {
                    name: "ProtocolError".into(),
                    value: format!(
                        "the interpreter broke the protocol ({why}); the session's state is lost"
                    ),
                    traceback: Vec::new(),
                });
                self.mark_lost(&format!("the interpreter broke the protocol: {why}"))
                    .await;
                (ExecutionStatus::Failed, SessionState::Lost, None, None)
            }
            End::Unresponsive => {
                let stop = stop.unwrap_or(Stop::Timeout);
                let (status, limit) = stop.status();
                let what = match stop {
                    Stop::Timeout => format!("the code did not stop within {timeout} s and the interpreter did not answer the interrupt"),
                    Stop::Output => "the code exceeded the output limit and the interpreter did not answer the interrupt".to_owned(),
                };
                acc.error.get_or_insert(ExecutionError {
                    name: if stop == Stop::Timeout {
                        "TimeoutError".into()
                    } else {
                        "OutputLimit".into()
                    },
                    value: format!("{what}; the session's state is lost"),
                    traceback: Vec::new(),
                });
                self.mark_lost(&what).await;
                (status, SessionState::Lost, Some(limit), None)
            }
        };
        if acc.execution_count == 0 {
            acc.execution_count = self.execution_count + 1;
        }
        self.execution_count = acc.execution_count;
        // The reading after the end serves unless the sandbox died since (its last figures
        // are read once it is gone).
        let stats = if matches!(session_state, SessionState::Lost) {
            self.sandbox.stats()
        } else {
            stats_after
        };
        let cpu_time_ms = match (
            stats_before.and_then(|s| s.cpu_ns),
            stats.and_then(|s| s.cpu_ns),
        ) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / 1e6),
            _ => None,
        };
        Ok(ExecutionResult {
            status,
            session_state,
            limit,
            stdout: acc.stdout.text,
            stderr: acc.stderr.text,
            stdout_truncated: acc.stdout.truncated,
            stderr_truncated: acc.stderr.truncated,
            result: acc.result,
            outputs: acc.displays,
            error: acc.error,
            exit_code,
            execution_count: Some(acc.execution_count),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            cpu_time_ms,
            peak_memory_bytes: stats.and_then(|s| s.peak_memory),
            egress: self.take_egress_events(),
        })
    }

    /// Stops the interpreter and removes the sandbox.
    pub async fn close(mut self) {
        self.sandbox.finish().await;
    }

    async fn send(&mut self, req: &Request) -> Result<(), String> {
        let frame = ampoule_protocol::encode(req).map_err(|e| e.to_string())?;
        let write = async {
            self.requests.write_all(&frame).await?;
            self.requests.flush().await
        };
        match tokio::time::timeout(self.grace.max(Duration::from_secs(1)), write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("the interpreter stopped reading requests: {e}")),
            Err(_) => Err("the interpreter stopped reading requests".into()),
        }
    }

    async fn mark_lost(&mut self, why: &str) {
        if self.lost.is_none() {
            self.lost = Some(why.to_owned());
        }
        self.sandbox.finish().await;
    }
}

/// What a session's kernel runs in: a sandbox of its own, or a process entered into another
/// session's sandbox (a [`crate::Context`]: its figures are the sandbox's, so none are
/// reported per execution, and killing it kills only its process group).
#[derive(Debug)]
pub(crate) enum Body {
    Sandbox(Sandbox),
    Entered {
        process: ampoule_runtime::Entered,
        scratch: Scratch,
    },
}

impl Body {
    fn stats(&self) -> Option<ampoule_runtime::cgroup::CgroupStats> {
        match self {
            Body::Sandbox(s) => s.stats(),
            Body::Entered { .. } => None,
        }
    }

    fn scratch(&self) -> &Scratch {
        match self {
            Body::Sandbox(s) => s.scratch(),
            Body::Entered { scratch, .. } => scratch,
        }
    }

    fn entrance(&self) -> Option<ampoule_runtime::Entrance> {
        match self {
            Body::Sandbox(s) => s.entrance(),
            Body::Entered { .. } => None,
        }
    }

    async fn wait(&mut self) -> ampoule_runtime::Result<ProgramExit> {
        match self {
            Body::Sandbox(s) => s.wait().await,
            Body::Entered { process, .. } => process.wait().await,
        }
    }

    async fn finish(&mut self) {
        match self {
            Body::Sandbox(s) => {
                s.finish().await;
            }
            Body::Entered { process, .. } => {
                process.kill();
                let _ = tokio::time::timeout(Duration::from_secs(2), process.wait()).await;
            }
        }
    }
}

/// The sandbox of a kernel described by `spec`, with `limits` and a lifetime CPU backstop.
pub(crate) fn sandbox_config(spec: &LanguageSpec, limits: &Limits) -> SandboxConfig {
    let mut cfg = SandboxConfig::new(spec.argv.clone());
    for (key, value) in &spec.env {
        match cfg.env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1.clone_from(value),
            None => cfg.env.push((key.clone(), value.clone())),
        }
    }
    cfg.ro_binds.clone_from(&spec.ro_binds);
    cfg.image_root.clone_from(&spec.image_root);
    cfg.writable_root = spec.writable_root;
    cfg.isolation = spec.isolation;
    cfg.stdin = true;
    cfg.limits = Limits {
        timeout_s: SESSION_CPU_BACKSTOP_S,
        ..limits.clone()
    };
    cfg
}

/// Output of one stream, cut at the cap.
#[derive(Debug, Default)]
struct Capped {
    text: String,
    truncated: bool,
}

impl Capped {
    /// Appends what fits; returns the accepted part and whether the cap was crossed just now.
    fn push<'a>(&mut self, text: &'a str, cap: usize) -> (&'a str, bool) {
        if self.truncated {
            return ("", false);
        }
        let room = cap.saturating_sub(self.text.len());
        if text.len() <= room {
            self.text.push_str(text);
            return (text, false);
        }
        let mut cut = room;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.text.push_str(&text[..cut]);
        self.truncated = true;
        (&text[..cut], true)
    }
}

#[derive(Debug, Default)]
struct Collected {
    stdout: Capped,
    stderr: Capped,
    result: Option<MimeBundle>,
    displays: Vec<MimeBundle>,
    display_bytes: usize,
    error: Option<ExecutionError>,
    execution_count: u64,
}

impl Collected {
    /// Records stream text; returns whether the output cap was crossed just now.
    fn stream(
        &mut self,
        name: StreamName,
        text: &str,
        cap: usize,
        on: &mut impl FnMut(ExecutionEvent),
    ) -> bool {
        let target = match name {
            StreamName::Stdout => &mut self.stdout,
            StreamName::Stderr => &mut self.stderr,
        };
        let (accepted, crossed) = target.push(text, cap);
        if !accepted.is_empty() {
            let text = accepted.to_owned();
            on(match name {
                StreamName::Stdout => ExecutionEvent::Stdout { text },
                StreamName::Stderr => ExecutionEvent::Stderr { text },
            });
        }
        crossed
    }

    fn display(&mut self, data: MimeBundle, on: &mut impl FnMut(ExecutionEvent)) {
        let size = serde_json::to_vec(&data).map_or(usize::MAX, |v| v.len());
        if self.display_bytes.saturating_add(size) > MAX_DISPLAY_BYTES {
            tracing::warn!(size, "rich output dropped: over the per-execution budget");
            return;
        }
        self.display_bytes += size;
        on(ExecutionEvent::Display { data: data.clone() });
        self.displays.push(data);
    }
}

async fn read_events(mut stdout: impl AsyncRead + Unpin, tx: mpsc::Sender<Incoming>) {
    let mut decoder = FrameDecoder::new(MAX_FRAME_BYTES);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        loop {
            let incoming = match decoder.next_frame() {
                Ok(None) => break,
                Ok(Some(payload)) => match ampoule_protocol::decode::<Event>(&payload) {
                    Ok(ev) => Incoming::Event(ev),
                    Err(e) => Incoming::Broken(e.to_string()),
                },
                Err(e) => Incoming::Broken(e.to_string()),
            };
            let broken = matches!(incoming, Incoming::Broken(_));
            if tx.send(incoming).await.is_err() || broken {
                return;
            }
        }
    }
}

async fn keep_tail(mut stderr: impl AsyncRead + Unpin, log: Arc<Mutex<Vec<u8>>>) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Ok(mut tail) = log.lock() {
            tail.extend_from_slice(&buf[..n]);
            let excess = tail.len().saturating_sub(LOG_TAIL_BYTES);
            tail.drain(..excess);
        }
    }
}

fn tail_text(log: &Arc<Mutex<Vec<u8>>>) -> String {
    log.lock()
        .map(|t| String::from_utf8_lossy(&t).trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cut_at_a_char_boundary_once() {
        let mut c = Capped::default();
        assert_eq!(c.push("ab", 5), ("ab", false));
        assert_eq!(c.push("cé€", 5), ("cé", true));
        assert_eq!(c.text, "abcé");
        assert!(c.truncated);
        assert_eq!(c.push("more", 5), ("", false));
    }

    #[test]
    fn streaming_sees_only_what_fits() {
        let mut acc = Collected::default();
        let mut seen = Vec::new();
        assert!(!acc.stream(StreamName::Stdout, "1234", 6, &mut |o| seen.push(o)));
        assert!(acc.stream(StreamName::Stdout, "5678", 6, &mut |o| seen.push(o)));
        assert!(!acc.stream(StreamName::Stderr, "e", 6, &mut |o| seen.push(o)));
        assert_eq!(
            seen,
            vec![
                ExecutionEvent::Stdout {
                    text: "1234".into()
                },
                ExecutionEvent::Stdout { text: "56".into() },
                ExecutionEvent::Stderr { text: "e".into() }
            ]
        );
    }

    #[tokio::test]
    async fn a_hostile_frame_breaks_the_reader_not_the_host() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut wire = ampoule_protocol::encode(&Event::Stream {
            id: "x1".into(),
            name: StreamName::Stdout,
            text: "ok".into(),
        })
        .unwrap();
        wire.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, b'{']);
        read_events(wire.as_slice(), tx).await;
        assert!(matches!(rx.recv().await, Some(Incoming::Event(_))));
        assert!(matches!(rx.recv().await, Some(Incoming::Broken(_))));
        assert!(rx.recv().await.is_none());
    }
}
