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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ampoule_egress::Egress;
use ampoule_runtime::{Host, Scratch, Zygote};
use ampoule_session::{ExecuteRequest, Session, SessionOptions};
use ampoule_types::{ExecutionEvent, ExecutionResult, SessionState};
use async_trait::async_trait;
use tokio::sync::{Mutex, Notify};

use crate::engine::{
    Engine, EngineError, EventSender, ExecRequest, LiveSession, PoolSpec, ZygoteHealth,
};

/// A zygote is replaced after this many forks (its children share its hash secret and
/// address-space layout; a fresh one limits how many do)…
const RECYCLE_FORKS: u64 = 2_000;
/// …or after this long.
const RECYCLE_AGE: Duration = Duration::from_secs(3_600);
/// After a zygote failed to start, sessions start cold for this long before it is retried.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Starts interpreter sessions in sandboxes on `host`.
#[derive(Debug)]
pub struct SessionEngine {
    host: Arc<Host>,
    egress: Option<Egress>,
    zygotes: std::sync::Mutex<HashMap<String, Arc<Mutex<PoolZygote>>>>,
}

/// One pool's zygote: the current one, and its figures.
#[derive(Debug, Default)]
struct PoolZygote {
    current: Option<Zygote>,
    replacing: bool,
    failed_at: Option<Instant>,
    started: u64,
    forks: u64,
    fork_failures: u64,
}

impl SessionEngine {
    /// An engine on a detected host.
    pub fn new(host: Arc<Host>) -> Self {
        Self {
            host,
            egress: None,
            zygotes: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn pool_zygote(&self, pool: &str) -> Arc<Mutex<PoolZygote>> {
        let mut map = self
            .zygotes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(pool.to_owned()).or_default().clone()
    }

    /// The pool's running zygote, started when there is none (or it died); a zygote due for
    /// recycling keeps serving while its replacement starts in the background.
    async fn zygote(&self, spec: &PoolSpec, preload: &[String]) -> Result<Zygote, String> {
        let entry = self.pool_zygote(&spec.name);
        let mut g = entry.lock().await;
        if let Some(z) = g.current.clone() {
            if z.is_alive() {
                let due = z.forks() >= RECYCLE_FORKS || z.age() >= RECYCLE_AGE;
                if due && !g.replacing {
                    g.replacing = true;
                    let (entry, host, preload) =
                        (entry.clone(), self.host.clone(), preload.to_vec());
                    let pool = spec.name.clone();
                    // A worker thread, which outlives the zygote (see ampoule_runtime::sandbox).
                    tokio::spawn(async move {
                        let fresh = ampoule_session::zygote::start_python(&host, &preload).await;
                        let mut g = entry.lock().await;
                        g.replacing = false;
                        match fresh {
                            Ok(z) => {
                                tracing::info!(pool, "zygote recycled");
                                g.started += 1;
                                g.current = Some(z);
                            }
                            Err(e) => {
                                tracing::warn!(pool, error = %chain(&e), "zygote recycling failed")
                            }
                        }
                    });
                }
                return Ok(z);
            }
            tracing::warn!(pool = %spec.name, "zygote died; starting another");
            g.current = None;
        }
        if g.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return Err("the zygote failed to start recently".into());
        }
        let started = Instant::now();
        match ampoule_session::zygote::start_python(&self.host, preload).await {
            Ok(z) => {
                let info = z.info();
                tracing::info!(
                    pool = %spec.name,
                    runtime = %info.runtime,
                    preloaded = ?info.preloaded,
                    failed = ?info.failed,
                    ms = started.elapsed().as_millis() as u64,
                    "zygote ready"
                );
                g.failed_at = None;
                g.started += 1;
                g.current = Some(z.clone());
                Ok(z)
            }
            Err(e) => {
                g.failed_at = Some(Instant::now());
                Err(chain(&e))
            }
        }
    }

    /// A session forked from the pool's zygote, or `None` (with the reason logged) when the
    /// pool must fall back to a cold start.
    async fn start_forked(&self, spec: &PoolSpec, preload: &[String]) -> Option<Session> {
        let zygote = match self.zygote(spec, preload).await {
            Ok(z) => z,
            Err(why) => {
                tracing::warn!(pool = %spec.name, %why, "no zygote: starting the session cold");
                return None;
            }
        };
        let outcome = Session::start_forked(&self.host, &zygote, spec.limits.clone()).await;
        let entry = self.pool_zygote(&spec.name);
        let mut g = entry.lock().await;
        match outcome {
            Ok(session) => {
                g.forks += 1;
                Some(session)
            }
            Err(e) => {
                g.fork_failures += 1;
                tracing::warn!(pool = %spec.name, error = %chain(&e), "fork failed: starting the session cold");
                None
            }
        }
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
    async fn prepare(&self, spec: &PoolSpec) {
        if spec.zygote.is_some() && !self.host.privileged {
            tracing::info!(pool = %spec.name, "not root: sessions start cold (zygotes need root)");
            return;
        }
        if let (Some(preload), None) = (&spec.zygote, &spec.network)
            && let Err(why) = self.zygote(spec, preload).await
        {
            tracing::warn!(pool = %spec.name, %why, "no zygote: sessions start cold");
        }
    }

    fn zygotes(&self) -> Vec<ZygoteHealth> {
        self.health()
    }

    async fn start(&self, spec: &PoolSpec) -> Result<Box<dyn LiveSession>, EngineError> {
        let forked = match (&spec.zygote, &spec.network) {
            (Some(preload), None) if self.host.privileged => self.start_forked(spec, preload).await,
            _ => None,
        };
        let session = match (forked, &spec.network) {
            (Some(session), _) => session,
            (None, None) => {
                Session::start_language(&self.host, spec.language.as_str(), spec.limits.clone())
                    .await
                    .map_err(|e| EngineError::Start(chain(&e)))?
            }
            (None, Some(network)) => {
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

impl SessionEngine {
    fn health(&self) -> Vec<ZygoteHealth> {
        let map = self
            .zygotes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter()
            .filter_map(|(pool, entry)| {
                // Never wait for a pool that is starting its zygote: report it next time.
                let g = entry.try_lock().ok()?;
                Some(ZygoteHealth {
                    pool: pool.clone(),
                    up: g.current.as_ref().is_some_and(Zygote::is_alive),
                    forks: g.forks,
                    fork_failures: g.fork_failures,
                    restarts: g.started.saturating_sub(1),
                })
            })
            .collect()
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
