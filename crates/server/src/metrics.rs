//! `GET /metrics`: the server's figures in the Prometheus (OpenMetrics) text format.
//!
//! The manager counts as things happen (executions by status, latency histograms, session
//! starts and ends, refusals, egress decisions, warm-start failures, sandbox pauses,
//! hibernations and resumptions); the per-pool session gauges and the sandboxes by state
//! (with what durable sandboxes' disks take) are read from the manager when the page is
//! rendered, so they are never stale.
//!
//! Access: on the main listener `/metrics` needs an API key (any tenant's), like `/v1/pools`,
//! which shows the same pool figures. `[metrics] listen` adds a listener that serves only
//! `/metrics` and needs no key, for a Prometheus on a private network. No metric carries a
//! tenant or session label: one tenant's scrape shows nothing of another's work beyond the
//! shared pools, and the series stay few.
//!
//! The zygote (fork server) families: `up` and the counters catch up with the engine's totals
//! ([`crate::engine::Engine::zygotes`]) at each scrape; the fork-duration histogram is filled
//! by the manager as forked sessions start ([`Metrics::zygote_forked`]).
//!
//! The core reports through [`ampoule_core::Observer`], which [`Metrics`] implements; the
//! page reads the core at scrape time. The dependency points one way: metrics → core.

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use ampoule_core::{ErrorCode, Manager, Observer};

/// The content type of the page.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `pool`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// The pool.
    pub pool: String,
}

/// `pool`, `status`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    pool: String,
    status: String,
}

/// `pool`, `state`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    pool: String,
    state: &'static str,
}

/// `pool`, `source`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    pool: String,
    source: &'static str,
}

/// `pool`, `event`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    pool: String,
    event: &'static str,
}

/// `pool`, `decision`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    pool: String,
    decision: &'static str,
}

/// `state` (a sandbox's: running, paused, hibernated).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxStateLabel {
    state: &'static str,
}

/// `reason`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// `listener`, `reason`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerReasonLabels {
    listener: &'static str,
    reason: &'static str,
}

/// `listener`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// The front door's families: connections and authentications (see [`crate::listener`] and
/// [`crate::auth`]).
#[derive(Debug, Clone, Default)]
pub struct DoorMetrics {
    open: Family<ListenerLabel, Gauge>,
    refused: Family<ListenerReasonLabels, Counter>,
    closed: Family<ListenerReasonLabels, Counter>,
    auth_failures: Family<ReasonLabel, Counter>,
    auth_throttled: Family<ReasonLabel, Counter>,
}

/// One open connection, counted until dropped.
pub struct OpenConnection {
    gauge: Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl DoorMetrics {
    /// A connection opened on `listener`.
    pub fn open(&self, listener: &'static str) -> OpenConnection {
        let gauge = self.open.get_or_create(&ListenerLabel { listener }).clone();
        gauge.inc();
        OpenConnection { gauge }
    }

    /// A connection refused (`total`, `per_address`).
    pub fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&ListenerReasonLabels { listener, reason })
            .inc();
    }

    /// A connection closed by a timeout (`header_timeout`, `idle_timeout`).
    pub fn closed(&self, listener: &'static str, reason: &'static str) {
        self.closed
            .get_or_create(&ListenerReasonLabels { listener, reason })
            .inc();
    }

    /// What the keys said ([`crate::auth::AuthEvent`]).
    pub fn auth(&self, e: &crate::auth::AuthEvent) {
        match e {
            crate::auth::AuthEvent::Failed(code) => {
                self.auth_failures
                    .get_or_create(&ReasonLabel {
                        reason: code.as_str(),
                    })
                    .inc();
            }
            crate::auth::AuthEvent::Throttled { by, .. } => {
                self.auth_throttled
                    .get_or_create(&ReasonLabel { reason: by })
                    .inc();
            }
        }
    }
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn execution_buckets() -> Histogram {
    // 5 ms … about 160 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

fn start_buckets() -> Histogram {
    // 1 ms … about 33 s: a warm session is handed out in microseconds, a cold start takes
    // tens to hundreds of milliseconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The zygote (fork server) families (empty for pools without a zygote).
#[derive(Debug, Clone)]
pub struct ZygoteMetrics {
    /// `ampoule_zygote_up{pool}`: 1 while the pool's zygote answers, else 0.
    pub up: Family<PoolLabel, Gauge>,
    /// `ampoule_zygote_forks_total{pool}`: sessions forked from the zygote.
    pub forks: Family<PoolLabel, Counter>,
    /// `ampoule_zygote_fork_failures_total{pool}`: forks that failed (a cold start was
    /// used instead).
    pub fork_failures: Family<PoolLabel, Counter>,
    /// `ampoule_zygote_restarts_total{pool}`: zygotes started again after dying.
    pub restarts: Family<PoolLabel, Counter>,
    /// `ampoule_zygote_fork_duration_seconds{pool}`: time to a ready forked session.
    pub fork_seconds: Family<PoolLabel, Histogram, fn() -> Histogram>,
    /// `ampoule_zygotes{pool}`: zygotes running (one per tenant the pool forks for).
    pub running: Family<PoolLabel, Gauge>,
    /// `ampoule_zygote_memory_budget_bytes{pool}`: each zygote cgroup's memory limit.
    pub memory_budget: Family<PoolLabel, Gauge>,
    /// `ampoule_zygote_pids_budget{pool}`: each zygote cgroup's process limit.
    pub pids_budget: Family<PoolLabel, Gauge>,
}

/// Every metric of the server (cheap to clone: the families are shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: std::sync::Arc<Registry>,
    executions: Family<StatusLabels, Counter>,
    execution_seconds: Histograms<PoolLabel>,
    session_start_seconds: Histograms<SourceLabels>,
    session_events: Family<EventLabels, Counter>,
    sessions: Family<StateLabels, Gauge>,
    max_sessions: Family<PoolLabel, Gauge>,
    warm_target: Family<PoolLabel, Gauge>,
    warm_start_failures: Family<PoolLabel, Counter>,
    egress: Family<DecisionLabels, Counter>,
    refused: Family<ReasonLabel, Counter>,
    retries: Family<PoolLabel, Counter>,
    cpu_seconds: Family<PoolLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    memory_gib_seconds: Family<PoolLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    sandboxes: Family<SandboxStateLabel, Gauge>,
    sandbox_disk_bytes: Gauge,
    sandbox_transition_seconds: Histograms<EventLabels>,
    zygote: ZygoteMetrics,
    door: DoorMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty families, registered under the `ampoule_` prefix.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("ampoule");
        let executions = Family::<StatusLabels, Counter>::default();
        r.register(
            "executions",
            "Executions by pool and status (succeeded, failed, timed_out, killed; error: the sandbox could not run it)",
            executions.clone(),
        );
        let execution_seconds: Histograms<PoolLabel> =
            Family::new_with_constructor(execution_buckets);
        r.register(
            "execution_duration_seconds",
            "Wall-clock time of executions, as the manager saw it (queueing on the session included)",
            execution_seconds.clone(),
        );
        let session_start_seconds: Histograms<SourceLabels> =
            Family::new_with_constructor(start_buckets);
        r.register(
            "session_start_duration_seconds",
            "Time to hand a new session its sandbox, by source (warm: from the pool's stock; cold: started on demand)",
            session_start_seconds.clone(),
        );
        let session_events = Family::<EventLabels, Counter>::default();
        r.register(
            "session_events",
            "Session lifecycle events (created, expired, deleted, killed)",
            session_events.clone(),
        );
        let sessions = Family::<StateLabels, Gauge>::default();
        r.register(
            "sessions",
            "Sessions per pool and state (ready: warm and waiting; busy: running a call; idle: assigned, not running)",
            sessions.clone(),
        );
        let max_sessions = Family::<PoolLabel, Gauge>::default();
        r.register(
            "pool_max_sessions",
            "Most sessions a pool holds",
            max_sessions.clone(),
        );
        let warm_target = Family::<PoolLabel, Gauge>::default();
        r.register(
            "pool_warm_target",
            "Warm sessions a pool keeps ready (compare with ampoule_sessions{state=\"ready\"})",
            warm_target.clone(),
        );
        let warm_start_failures = Family::<PoolLabel, Counter>::default();
        r.register(
            "warm_start_failures",
            "Warm sessions that could not be started (the filler backs off and retries)",
            warm_start_failures.clone(),
        );
        let egress = Family::<DecisionLabels, Counter>::default();
        r.register(
            "egress_decisions",
            "Network attempts of executions by egress decision (allowed, blocked)",
            egress.clone(),
        );
        let refused = Family::<ReasonLabel, Counter>::default();
        r.register(
            "refused_requests",
            "Requests refused by a quota or policy, by the error code",
            refused.clone(),
        );
        let retries = Family::<PoolLabel, Counter>::default();
        r.register(
            "execution_retries",
            "Executions repeating code already run in the same run (the caller context's run_id)",
            retries.clone(),
        );
        let cpu_seconds =
            Family::<PoolLabel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        r.register(
            "execution_cpu_seconds",
            "CPU time of executions, from their sandboxes' cgroups (what cpu_seconds_per_hour budgets count)",
            cpu_seconds.clone(),
        );
        let memory_gib_seconds =
            Family::<PoolLabel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        r.register(
            "execution_memory_gib_seconds",
            "Peak memory (GiB) times duration (s) of executions (what memory_gib_seconds_per_hour budgets count)",
            memory_gib_seconds.clone(),
        );
        let sandboxes = Family::<SandboxStateLabel, Gauge>::default();
        r.register(
            "sandboxes",
            "Sandboxes and sessions by state (running; paused: frozen, memory kept; hibernated: on disk, nothing running)",
            sandboxes.clone(),
        );
        let sandbox_disk_bytes = Gauge::default();
        r.register(
            "sandbox_disk_bytes",
            "Bytes the disks of durable sandboxes take on the host (allocated blocks)",
            sandbox_disk_bytes.clone(),
        );
        let sandbox_transition_seconds: Histograms<EventLabels> =
            Family::new_with_constructor(start_buckets);
        r.register(
            "sandbox_transition_seconds",
            "Time a sandbox took to change state, by event (pause, resume, hibernate; restore: started again from hibernation)",
            sandbox_transition_seconds.clone(),
        );
        let zygote = ZygoteMetrics {
            up: Family::default(),
            forks: Family::default(),
            fork_failures: Family::default(),
            restarts: Family::default(),
            fork_seconds: Family::new_with_constructor(start_buckets),
            running: Family::default(),
            memory_budget: Family::default(),
            pids_budget: Family::default(),
        };
        r.register(
            "zygotes",
            "Zygotes running (one per tenant the pool forks sessions for)",
            zygote.running.clone(),
        );
        r.register(
            "zygote_memory_budget_bytes",
            "Memory limit of each zygote's cgroup (from the pool's max_sessions)",
            zygote.memory_budget.clone(),
        );
        r.register(
            "zygote_pids_budget",
            "Process limit of each zygote's cgroup (from the pool's max_sessions)",
            zygote.pids_budget.clone(),
        );
        r.register(
            "zygote_up",
            "1 while the pool's zygote (fork server) answers",
            zygote.up.clone(),
        );
        r.register(
            "zygote_forks",
            "Sessions forked from the pool's zygote",
            zygote.forks.clone(),
        );
        r.register(
            "zygote_fork_failures",
            "Zygote forks that failed",
            zygote.fork_failures.clone(),
        );
        r.register(
            "zygote_restarts",
            "Zygotes started again after dying",
            zygote.restarts.clone(),
        );
        r.register(
            "zygote_fork_duration_seconds",
            "Time from a fork request to a ready session",
            zygote.fork_seconds.clone(),
        );
        let door = DoorMetrics::default();
        r.register(
            "connections",
            "Connections open, by listener (api, metrics)",
            door.open.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused at accept by a cap (total: max_connections; per_address: max_connections_per_address)",
            door.refused.clone(),
        );
        r.register(
            "connections_closed",
            "Connections closed by the door (header_timeout: no whole request head in time; idle_timeout: idle between requests)",
            door.closed.clone(),
        );
        r.register(
            "auth_failures",
            "Failed authentications, by code (unauthorized, key_expired, key_revoked)",
            door.auth_failures.clone(),
        );
        r.register(
            "auth_throttled",
            "Requests answered 429 auth_throttled, by what was throttled (address, key_prefix)",
            door.auth_throttled.clone(),
        );
        Self {
            registry: std::sync::Arc::new(r),
            executions,
            execution_seconds,
            session_start_seconds,
            session_events,
            sessions,
            max_sessions,
            warm_target,
            warm_start_failures,
            egress,
            refused,
            retries,
            cpu_seconds,
            memory_gib_seconds,
            sandboxes,
            sandbox_disk_bytes,
            sandbox_transition_seconds,
            zygote,
            door,
        }
    }

    /// The front door's families.
    pub fn door(&self) -> &DoorMetrics {
        &self.door
    }

    /// The zygote families (see [`ZygoteMetrics`]).
    pub fn zygote(&self) -> &ZygoteMetrics {
        &self.zygote
    }

    /// One execution's outcome: `status` is the result's, or `error` when none came back.
    pub fn execution(&self, pool: &str, status: &str, seconds: f64) {
        self.executions
            .get_or_create(&StatusLabels {
                pool: pool.to_owned(),
                status: status.to_owned(),
            })
            .inc();
        self.execution_seconds
            .get_or_create(&PoolLabel {
                pool: pool.to_owned(),
            })
            .observe(seconds);
    }

    /// A session was forked from the pool's zygote in `seconds` (for the warm stock or on
    /// demand).
    pub fn zygote_forked(&self, pool: &str, seconds: f64) {
        self.zygote
            .fork_seconds
            .get_or_create(&PoolLabel {
                pool: pool.to_owned(),
            })
            .observe(seconds);
    }

    /// A session got its sandbox, from the warm stock or started on demand.
    pub fn session_started(&self, pool: &str, warm: bool, seconds: f64) {
        self.session_start_seconds
            .get_or_create(&SourceLabels {
                pool: pool.to_owned(),
                source: if warm { "warm" } else { "cold" },
            })
            .observe(seconds);
    }

    /// A session event (`created`, `expired`, `deleted`, `killed`).
    pub fn session_event(&self, pool: &str, event: &'static str) {
        self.session_events
            .get_or_create(&EventLabels {
                pool: pool.to_owned(),
                event,
            })
            .inc();
    }

    /// A warm session could not be started.
    pub fn warm_start_failed(&self, pool: &str) {
        self.warm_start_failures
            .get_or_create(&PoolLabel {
                pool: pool.to_owned(),
            })
            .inc();
    }

    /// One network attempt and what the egress policy decided.
    pub fn egress(&self, pool: &str, allowed: bool) {
        self.egress
            .get_or_create(&DecisionLabels {
                pool: pool.to_owned(),
                decision: if allowed { "allowed" } else { "blocked" },
            })
            .inc();
    }

    /// A request refused by a quota or policy, by its error code.
    pub fn refused(&self, code: ErrorCode) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: code.as_str(),
            })
            .inc();
    }

    /// A sandbox was paused, resumed, hibernated or started again from hibernation.
    pub fn sandbox_transition(&self, pool: &str, event: &'static str, seconds: f64) {
        self.sandbox_transition_seconds
            .get_or_create(&EventLabels {
                pool: pool.to_owned(),
                event,
            })
            .observe(seconds);
    }

    /// The page: the pool and sandbox gauges read from `manager` now, then every family.
    pub fn render(&self, manager: &Manager) -> String {
        let counts = manager.sandbox_counts();
        for (state, n) in [
            ("running", counts.running),
            ("paused", counts.paused),
            ("hibernated", counts.hibernated),
        ] {
            self.sandboxes
                .get_or_create(&SandboxStateLabel { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.sandbox_disk_bytes
            .set(i64::try_from(counts.disk_bytes).unwrap_or(i64::MAX));
        for p in manager.pools() {
            let gauge = |state| {
                self.sessions.get_or_create(&StateLabels {
                    pool: p.name.clone(),
                    state,
                })
            };
            gauge("ready").set(i64::try_from(p.ready).unwrap_or(i64::MAX));
            gauge("busy").set(i64::try_from(p.busy).unwrap_or(i64::MAX));
            gauge("idle").set(i64::try_from(p.sessions.saturating_sub(p.busy)).unwrap_or(i64::MAX));
            let label = PoolLabel {
                pool: p.name.clone(),
            };
            self.max_sessions
                .get_or_create(&label)
                .set(i64::try_from(p.max_sessions).unwrap_or(i64::MAX));
            self.warm_target
                .get_or_create(&label)
                .set(i64::try_from(p.warm).unwrap_or(i64::MAX));
        }
        // Two scrapes at once must not both add the same difference.
        static CATCH_UP: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = CATCH_UP
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for z in manager.zygotes() {
            let label = PoolLabel { pool: z.pool };
            self.zygote.up.get_or_create(&label).set(i64::from(z.up));
            for (family, value) in [
                (&self.zygote.running, z.running),
                (&self.zygote.memory_budget, z.memory_budget_bytes),
                (&self.zygote.pids_budget, z.pids_budget),
            ] {
                family
                    .get_or_create(&label)
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
            // The engine keeps totals; the counters catch up with them.
            for (family, total) in [
                (&self.zygote.forks, z.forks),
                (&self.zygote.fork_failures, z.fork_failures),
                (&self.zygote.restarts, z.restarts),
            ] {
                let counter = family.get_or_create(&label);
                let seen = counter.get();
                if total > seen {
                    counter.inc_by(total - seen);
                }
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// `GET /metrics` on a router: the page, as [`CONTENT_TYPE`].
pub fn response(metrics: &Metrics, manager: &Manager) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        metrics.render(manager),
    )
        .into_response()
}

impl Observer for Metrics {
    fn spent(&self, pool: &str, spent: ampoule_core::quota::Spent) {
        let label = PoolLabel {
            pool: pool.to_owned(),
        };
        self.cpu_seconds
            .get_or_create(&label)
            .inc_by(spent.cpu_seconds.max(0.0));
        self.memory_gib_seconds
            .get_or_create(&label)
            .inc_by(spent.memory_gib_seconds.max(0.0));
    }
    fn retried(&self, pool: &str) {
        self.retries
            .get_or_create(&PoolLabel {
                pool: pool.to_owned(),
            })
            .inc();
    }
    fn execution(&self, pool: &str, status: &str, seconds: f64) {
        Metrics::execution(self, pool, status, seconds);
    }
    fn session_started(&self, pool: &str, warm: bool, seconds: f64) {
        Metrics::session_started(self, pool, warm, seconds);
    }
    fn zygote_forked(&self, pool: &str, seconds: f64) {
        Metrics::zygote_forked(self, pool, seconds);
    }
    fn session_event(&self, pool: &str, event: &'static str) {
        Metrics::session_event(self, pool, event);
    }
    fn warm_start_failed(&self, pool: &str) {
        Metrics::warm_start_failed(self, pool);
    }
    fn egress(&self, pool: &str, allowed: bool) {
        Metrics::egress(self, pool, allowed);
    }
    fn refused(&self, code: ErrorCode) {
        Metrics::refused(self, code);
    }
    fn sandbox_transition(&self, pool: &str, event: &'static str, seconds: f64) {
        Metrics::sandbox_transition(self, pool, event, seconds);
    }
}
