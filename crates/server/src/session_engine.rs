//! The real [`Engine`]: interpreter sessions of `ampoule-session`, each in its own sandbox.
//!
//! One [`ampoule_session::Session`] needs `&mut` to execute, so it lives behind an async
//! mutex; the session's files are served through a second handle on its scratch space, so
//! uploads and downloads never wait for a running execution. Closing a session while an
//! execution runs (delete, lifetime, shutdown) cancels the execution first, then kills the
//! sandbox.
//!
//! Pools with a network ([`PoolSpec::network`]) get sessions wired to their own egress gateway
//! ([`Session::start_with`]); the engine holds the server's one [`Egress`] (pins, CA) for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ampoule_egress::Egress;
use ampoule_runtime::{Host, Scratch};
use ampoule_session::{ExecuteRequest, Session, SessionOptions};
use ampoule_types::{ExecutionEvent, ExecutionResult, SessionState};
use async_trait::async_trait;
use tokio::sync::{Mutex, Notify};

use crate::engine::{Engine, EngineError, EventSender, ExecRequest, LiveSession, PoolSpec};

/// Starts interpreter sessions in sandboxes on `host`.
#[derive(Debug)]
pub struct SessionEngine {
    host: Arc<Host>,
    egress: Option<Egress>,
}

impl SessionEngine {
    /// An engine on a detected host.
    pub fn new(host: Arc<Host>) -> Self {
        Self { host, egress: None }
    }

    /// The egress service that serves the sessions of pools with a network (see
    /// [`crate::Config::egress`]); without one such pools cannot start sessions.
    pub fn with_egress(mut self, egress: Option<Egress>) -> Self {
        self.egress = egress;
        self
    }
}

/// The error with its causes, for the log (never sent to clients).
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[async_trait]
impl Engine for SessionEngine {
    async fn start(&self, spec: &PoolSpec) -> Result<Box<dyn LiveSession>, EngineError> {
        let session = match &spec.network {
            None => {
                Session::start_language(&self.host, spec.language.as_str(), spec.limits.clone())
                    .await
                    .map_err(|e| EngineError::Start(chain(&e)))?
            }
            Some(network) => {
                let egress = self.egress.clone().ok_or_else(|| {
                    EngineError::Start(format!(
                        "pool {} has a network policy but the server has no egress gateway",
                        spec.name
                    ))
                })?;
                let kernel = ampoule_session::language::find(spec.language.as_str())
                    .and_then(|k| k.locate(&spec.limits))
                    .map_err(|e| EngineError::Start(chain(&e)))?;
                let options = SessionOptions::with_network(egress, network.policy.clone());
                Session::start_with(&self.host, kernel, spec.limits.clone(), options)
                    .await
                    .map_err(|e| EngineError::Start(chain(&e)))?
            }
        };
        let scratch = session
            .scratch()
            .try_clone()
            .map_err(|e| EngineError::Start(chain(&e)))?;
        tracing::debug!(pool = %spec.name, runtime = session.runtime(), "session started");
        Ok(Box::new(LiveInterpreter {
            session: Mutex::new(Some(session)),
            scratch: std::sync::Mutex::new(Some(Arc::new(scratch))),
            alive: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            closing: Notify::new(),
        }))
    }
}

/// One interpreter session.
struct LiveInterpreter {
    session: Mutex<Option<Session>>,
    scratch: std::sync::Mutex<Option<Arc<Scratch>>>,
    alive: AtomicBool,
    closed: AtomicBool,
    closing: Notify,
}

#[async_trait]
impl LiveSession for LiveInterpreter {
    async fn execute(
        &self,
        req: ExecRequest,
        events: Option<EventSender>,
    ) -> Result<ExecutionResult, EngineError> {
        let mut guard = self.session.lock().await;
        let Some(session) = guard.as_mut() else {
            return Err(EngineError::Closed);
        };
        let mut request = ExecuteRequest::new(req.code).timeout(req.timeout_s);
        request.inputs = req.inputs;
        let on_output = |ev: ExecutionEvent| {
            if let Some(tx) = &events {
                let _ = tx.send(ev);
            }
        };
        // Registered before the check, so a close between the two is never missed.
        let closing = self.closing.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        let outcome = tokio::select! {
            r = session.execute_streaming(request, on_output) => r,
            () = closing => return Err(EngineError::Closed),
        };
        match outcome {
            Ok(result) => {
                if result.session_state == SessionState::Lost {
                    self.alive.store(false, Ordering::SeqCst);
                }
                Ok(result)
            }
            Err(e) => {
                self.alive.store(session.is_alive(), Ordering::SeqCst);
                Err(EngineError::Execute(chain(&e)))
            }
        }
    }

    fn scratch(&self) -> Result<Arc<Scratch>, EngineError> {
        self.scratch
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or(EngineError::Closed)
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn label(&self, session: &str, execution: &str) {
        // Called between executions, so the lock is free (unless the session is closing).
        if let Ok(guard) = self.session.try_lock()
            && let Some(gateway) = guard.as_ref().and_then(Session::egress)
        {
            gateway.set_context(session, execution);
        }
    }

    async fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut s) = self.scratch.lock() {
            s.take();
        }
        // Ends a running execution (its future is dropped), which releases the lock.
        self.closing.notify_waiters();
        let session = self.session.lock().await.take();
        if let Some(session) = session {
            session.close().await;
        }
    }
}
