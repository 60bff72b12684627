//! The real engine's side of a sandbox's processes, contexts and ports
//! ([`LiveSession::spawn`](ampoule_core::LiveSession::spawn), `open_context`, `connect`):
//! everything enters the running sandbox through its [`Entrance`] (the runtime joins its
//! namespaces and cgroup and seals the new process exactly as the interpreter was sealed),
//! so a command or a second interpreter is no more trusted, and no less confined, than the
//! code of the default context.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ampoule_core::engine::{EngineError, EventSender, ExecRequest, LiveContext, LiveProcess};
use ampoule_core::{ProcessExit, ProcessRequest};
use ampoule_runtime::{EnterSpec, Entrance, ProgramExit};
use ampoule_session::{Context, ExecuteRequest};
use ampoule_types::{ExecutionEvent, ExecutionResult, Language, Limits};
use async_trait::async_trait;
use tokio::sync::{Mutex, Notify};

use crate::session_engine::chain;

/// Starts a command in the sandbox.
pub(crate) async fn spawn(
    entrance: &Entrance,
    req: ProcessRequest,
) -> Result<LiveProcess, EngineError> {
    let spec = EnterSpec {
        argv: req.argv,
        env: req.env,
        cwd: req.cwd,
        stdin: req.stdin,
    };
    let mut entered = entrance.spawn(&spec).await.map_err(refused)?;
    let (Some(stdout), Some(stderr)) = (entered.stdout.take(), entered.stderr.take()) else {
        entered.kill();
        return Err(EngineError::Execute(
            "the process has no output pipes".into(),
        ));
    };
    let stdin = entered
        .stdin
        .take()
        .map(|w| Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
    let pid = entered.pid;
    let signaller = entered.signaller();
    Ok(LiveProcess {
        pid,
        stdin,
        stdout: Box::new(stdout),
        stderr: Box::new(stderr),
        // The whole group: what a shell command started goes with it, as with a terminal.
        signal: Arc::new(move |sig| {
            signaller
                .signal_group(sig)
                .map_err(|e| EngineError::Execute(chain(&e)))
        }),
        exit: Box::pin(async move {
            match entered.wait().await {
                Ok(ProgramExit::Exited(code)) => ProcessExit::Exited(code),
                Ok(ProgramExit::Signaled(sig)) => ProcessExit::Signaled(sig),
                Ok(ProgramExit::Killed) | Err(_) => ProcessExit::Lost,
            }
        }),
    })
}

/// A start that failed: the request's fault when the working directory could not be entered
/// or the program not executed (a 4xx), the sandbox's otherwise.
fn refused(e: ampoule_runtime::Error) -> EngineError {
    match &e {
        ampoule_runtime::Error::Setup { stage, message } if stage == "cwd" || stage == "exec" => {
            let what = if stage == "cwd" {
                "the working directory cannot be entered"
            } else {
                "the program cannot be executed"
            };
            EngineError::Invalid(format!("{what}: {message}"))
        }
        _ => EngineError::Execute(chain(&e)),
    }
}

/// A connection to a port inside the sandbox.
pub(crate) async fn connect(
    entrance: &Entrance,
    port: u16,
) -> Result<tokio::net::TcpStream, EngineError> {
    entrance.connect_tcp(port).await.map_err(|e| {
        EngineError::Unreachable(format!(
            "nothing answers on port {port} inside the sandbox ({})",
            chain(&e)
        ))
    })
}

/// Starts a context: an interpreter of `language` in the sandbox.
pub(crate) async fn open_context(
    entrance: &Entrance,
    language: Language,
    limits: Limits,
    image: Option<&ampoule_session::language::image::ImageRoot>,
    cwd: Option<String>,
    env: Vec<(String, String)>,
) -> Result<Box<dyn LiveContext>, EngineError> {
    // The interpreter is the image's in a sandbox from an image, else the host's. A language
    // without one is the request's problem, not the sandbox's.
    let spec = match image {
        Some(image) => ampoule_session::language::image::locate(language, image, &limits),
        None => ampoule_session::language::find(language.as_str()).and_then(|k| k.locate(&limits)),
    }
    .map_err(|e| {
        EngineError::NoRuntime(format!("this sandbox cannot run {language}: {}", chain(&e)))
    })?;
    let ctx = Context::start_spec(entrance, spec, limits, cwd.as_deref(), &env)
        .await
        .map_err(|e| match e {
            ampoule_session::Error::Sandbox(e) => refused(e),
            e => EngineError::Start(chain(&e)),
        })?;
    Ok(Box::new(LiveCtx {
        ctx: Mutex::new(Some(ctx)),
        alive: AtomicBool::new(true),
        closed: AtomicBool::new(false),
        closing: Notify::new(),
    }))
}

/// A context's interpreter, as the core holds it.
struct LiveCtx {
    ctx: Mutex<Option<Context>>,
    alive: AtomicBool,
    closed: AtomicBool,
    closing: Notify,
}

#[async_trait]
impl LiveContext for LiveCtx {
    async fn execute(
        &self,
        req: ExecRequest,
        events: Option<EventSender>,
    ) -> Result<ExecutionResult, EngineError> {
        let mut guard = self.ctx.lock().await;
        let Some(ctx) = guard.as_mut() else {
            return Err(EngineError::Closed);
        };
        let mut request = ExecuteRequest::new(req.code).timeout(req.timeout_s);
        request.inputs = req.inputs;
        let on_output = |ev: ExecutionEvent| {
            if let Some(tx) = &events {
                let _ = tx.send(ev);
            }
        };
        let closing = self.closing.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        let outcome = tokio::select! {
            r = ctx.execute_streaming(request, on_output) => r,
            () = closing => return Err(EngineError::Closed),
        };
        self.alive.store(ctx.is_alive(), Ordering::SeqCst);
        outcome.map_err(|e| EngineError::Execute(chain(&e)))
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    async fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.closed.store(true, Ordering::SeqCst);
        self.closing.notify_waiters();
        let ctx = self.ctx.lock().await.take();
        if let Some(ctx) = ctx {
            ctx.close().await;
        }
    }
}
