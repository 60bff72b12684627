//! [`Observer`]: what the core reports as it happens, for whoever counts it (the server's
//! Prometheus metrics).
//!
//! Why a trait and not the metrics registry itself: the registry, its label sets and the
//! text format are the `/metrics` door's business, and the gauges it renders are read from
//! the core at scrape time ([`crate::Manager::pools`], [`crate::Manager::zygotes`]). With the
//! registry in the server and this trait in the core, the dependency points one way (server
//! → core) and the core's own tests run with [`NoObserver`].

use crate::error::ErrorCode;

/// Events of the core, each reported once when it happens. Implementations must be cheap and
/// must not block (they are called on the request path).
pub trait Observer: Send + Sync + 'static {
    /// One execution's outcome: `status` is the result's, or `error` when none came back.
    fn execution(&self, _pool: &str, _status: &str, _seconds: f64) {}
    /// A session got its sandbox, from the warm stock or started on demand.
    fn session_started(&self, _pool: &str, _warm: bool, _seconds: f64) {}
    /// A session was forked from the pool's zygote in `seconds`.
    fn zygote_forked(&self, _pool: &str, _seconds: f64) {}
    /// A session event (`created`, `expired`, `deleted`, `killed`).
    fn session_event(&self, _pool: &str, _event: &'static str) {}
    /// A warm session could not be started.
    fn warm_start_failed(&self, _pool: &str) {}
    /// One network attempt and what the egress policy decided.
    fn egress(&self, _pool: &str, _allowed: bool) {}
    /// A request refused by a quota or policy, by its error code.
    fn refused(&self, _code: ErrorCode) {}
    /// An execution that repeats code already run in the same run (the caller context's
    /// `run_id`): a retry.
    fn retried(&self, _pool: &str) {}
    /// What one execution cost (CPU seconds, memory GiB-seconds).
    fn spent(&self, _pool: &str, _spent: crate::quota::Spent) {}
    /// A sandbox was paused, resumed, hibernated or started again from hibernation
    /// (`pause`, `resume`, `hibernate`, `restore`), in `seconds`.
    fn sandbox_transition(&self, _pool: &str, _event: &'static str, _seconds: f64) {}
}

/// Counts nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}
