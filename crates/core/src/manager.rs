//! The session manager: pools, live sessions, warm sessions, limits, expiry and shutdown.
//!
//! The doors never call these steps: they call the commands (`service.rs`), which
//! arrange them in the one policy order. This module owns:
//! - the session table, keyed by `(tenant, pool, identifier)` and by session id. A session is
//!   pinned to the tenant that created it: every lookup takes the tenant, and another
//!   tenant's session is indistinguishable from a missing one;
//! - per pool, a stock of `warm` pre-started sessions, refilled in the background, so that a
//!   new identifier gets a live interpreter at once; in a pool whose tenants fork their
//!   sessions from zygotes of their own, a stock per tenant instead (sessions forked and sealed
//!   ahead from that tenant's zygote, handed to that tenant only, let go when it is idle);
//! - the limits: `max_sessions` per pool and per tenant, counted when a session is reserved
//!   (before its sandbox exists), so concurrent first calls can never overshoot;
//! - expiry: a reaper destroys sessions idle for longer than their pool's `idle_timeout`
//!   (every call resets it), sessions older than `max_lifetime` and sessions whose interpreter
//!   died between calls (audited as `sandbox_died`);
//! - shutdown: every session and warm sandbox is closed.
//!
//! Invariants: at most one sandbox is ever started for one key (concurrent first calls wait on
//! the same start); executions in one session are serialized by its execution lock; no lock of
//! the table is held across an `.await`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ampoule_audit::{Kind, Record};
use ampoule_types::ExecutionResult;
use tokio::sync::{Notify, OnceCell};

use crate::caller::Caller;
use crate::engine::{Engine, EventSender, ExecRequest, LiveSession, TENANT_WARM_MAX};
use crate::error::Error;
use crate::observer::Observer;
use crate::quota::Quotas;
use crate::settings::{Audit, PoolSettings, TenantLimits};
use tracing::Instrument;

pub(crate) type Key = (String, String, String);

/// A live session as the core knows it. Doors never hold one: they get a
/// [`crate::SessionInfo`] (a snapshot) from the commands.
pub(crate) struct Session {
    /// Server-assigned id (`ses_…`), used by the native API.
    pub(crate) id: String,
    /// The owning tenant.
    pub(crate) tenant: String,
    /// The pool it came from.
    pub(crate) pool: String,
    /// The caller's name for it (ACA `identifier`).
    pub(crate) identifier: String,
    /// When it was assigned to its identifier.
    pub(crate) created_at: SystemTime,
    pub(crate) created: Instant,
    pub(crate) live: Arc<dyn LiveSession>,
    pub(crate) exec_lock: tokio::sync::Mutex<()>,
    last_used: Mutex<(Instant, SystemTime)>,
    pub(crate) in_flight: AtomicUsize,
    executions: AtomicU64,
    /// What it has as a sandbox: contexts, processes, metadata, tokens, its end.
    pub(crate) sandbox: crate::sandbox::Extras,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("pool", &self.pool)
            .field("identifier", &self.identifier)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Resets the idle timer.
    pub(crate) fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = (Instant::now(), SystemTime::now());
        }
    }

    /// When the session was last used.
    pub(crate) fn last_used_at(&self) -> SystemTime {
        self.last_used
            .lock()
            .map(|t| t.1)
            .unwrap_or(self.created_at)
    }

    pub(crate) fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .map(|t| t.0.elapsed())
            .unwrap_or_default()
    }

    /// Whether an execution or file call is running.
    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }

    /// How long ago it was created.
    pub(crate) fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// Executions so far.
    pub(crate) fn executions(&self) -> u64 {
        self.executions.load(Ordering::SeqCst)
    }
}

/// A reserved place in the table: the session starts once, whoever asks first.
pub(crate) struct Slot {
    pub(crate) key: Key,
    pub(crate) id: String,
    pub(crate) cell: OnceCell<Arc<Session>>,
}

#[derive(Default)]
pub(crate) struct Table {
    by_key: HashMap<Key, Arc<Slot>>,
    pub(crate) by_id: HashMap<String, Arc<Slot>>,
    per_pool: HashMap<String, usize>,
    per_tenant: HashMap<String, usize>,
}

struct Pool {
    settings: PoolSettings,
    warm: Mutex<VecDeque<Arc<dyn LiveSession>>>,
    starting: AtomicUsize,
    refill: Notify,
    /// Set once the pool's warm stock was first filled (at once for a pool that keeps none):
    /// readiness ([`Manager::readiness`]) waits for it.
    warmed: AtomicBool,
    /// For a pool whose tenants fork from zygotes of their own (no shared stock): each
    /// tenant's sessions forked and sealed ahead, for that tenant alone.
    tenant_warm: Mutex<HashMap<String, TenantStock>>,
}

/// How long a refill waits after a session was taken while stock is left: the session just
/// handed out runs its first executions without a fork and a seal competing for the CPU.
const REFILL_GRACE: Duration = Duration::from_millis(20);

/// Refills yield to requests: with stock left, a short grace after the take (see
/// [`REFILL_GRACE`]); then, stock or none, sessions being started on demand go first (a
/// bounded wait, so a steady stream of them cannot starve the stock).
async fn yield_to_requests(pool: &Pool, stocked: bool) {
    if stocked {
        tokio::time::sleep(REFILL_GRACE).await;
    }
    for _ in 0..100 {
        if pool.starting.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One tenant's ready sessions in a pool (see [`Pool::tenant_warm`]).
struct TenantStock {
    ready: VecDeque<Arc<dyn LiveSession>>,
    /// A filler task is running for it.
    filling: bool,
    /// When the tenant last took or asked for a session here: an idle tenant's stock is let go.
    used: Instant,
}

pub(crate) struct Inner {
    engine: Arc<dyn Engine>,
    pools: BTreeMap<String, Pool>,
    default_pool: String,
    tenants: TenantLimits,
    pub(crate) table: Mutex<Table>,
    shutting_down: AtomicBool,
    /// Set by [`Manager::drain`]: no new session or sandbox starts.
    draining: AtomicBool,
    /// `_<replica>` appended to every new session and sandbox id in a cluster
    /// ([`Manager::set_replica`]); empty on a single box.
    pub(crate) id_suffix: std::sync::OnceLock<String>,
    shutdown: Notify,
    audit: std::sync::OnceLock<Audit>,
    pub(crate) observer: Arc<dyn Observer>,
    /// Where durable sandboxes live (`<data_dir>/sandboxes`), once set.
    pub(crate) store: std::sync::OnceLock<crate::lifecycle::Store>,
    /// Hibernated sandboxes, by id: nothing of them runs.
    pub(crate) dormant: Mutex<BTreeMap<String, crate::durable::Dormant>>,
    /// Held while a hibernated sandbox is brought back, so that two calls naming it do not
    /// both start it.
    pub(crate) waking: tokio::sync::Mutex<()>,
    /// Executions seen per (tenant, run id, code hash): the attempt number of the next.
    attempts: Mutex<HashMap<(String, String, String), u32>>,
    /// Executions waiting for an approver.
    pub(crate) approvals: crate::approval::PendingTable,
    /// Told of approval requests (webhooks).
    pub(crate) approval_hook: std::sync::OnceLock<crate::approval::ApprovalHook>,
}

/// Most files listed in one execution record's `files`; a record that lists this many
/// says so with a last entry `…`.
const MAX_FILES_PER_RECORD: usize = 100;

/// Files created or changed between two listings of `/mnt/data` (size or modification time
/// differs, or new), by path, at most [`MAX_FILES_PER_RECORD`].
fn changed_files(
    before: &[ampoule_runtime::scratch::FileInfo],
    after: &[ampoule_runtime::scratch::FileInfo],
) -> Vec<String> {
    let old: HashMap<&str, (u64, SystemTime)> = before
        .iter()
        .map(|f| (f.path.as_str(), (f.size, f.modified)))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for f in after {
        if old.get(f.path.as_str()) != Some(&(f.size, f.modified)) {
            if out.len() == MAX_FILES_PER_RECORD {
                out.push("…".to_owned());
                break;
            }
            out.push(f.path.clone());
        }
    }
    out
}

/// The files of a session's `/mnt/data` (none when they cannot be listed).
async fn listing(live: &Arc<dyn LiveSession>) -> Vec<ampoule_runtime::scratch::FileInfo> {
    crate::files::list(live).await.unwrap_or_default()
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What a pool holds now (`GET /v1/pools`, the `/metrics` gauges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The pool's name.
    pub name: String,
    /// Its language.
    pub language: String,
    /// Warm sessions waiting to be assigned.
    pub ready: usize,
    /// Sessions running an execution or file call now.
    pub busy: usize,
    /// Sessions assigned to identifiers.
    pub sessions: usize,
    /// Most sessions the pool holds.
    pub max_sessions: usize,
    /// Warm sessions the pool keeps.
    pub warm: usize,
}

/// Whether a server should receive new sessions ([`Manager::readiness`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Every pool's warm stock was filled; not draining.
    Ready,
    /// These pools' warm stock was never filled yet (their zygote or first warm sessions
    /// are starting).
    Warming(Vec<String>),
    /// Stopping: no new session starts here.
    Draining,
}

/// The core service (cheap to clone): the session manager, whose commands are in
/// `service.rs`.
#[derive(Clone)]
pub struct Manager {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("pools", &self.inner.pools.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// `n` random bytes as hex (ids, generated identifiers).
pub fn random_hex(n: usize) -> String {
    let mut raw = vec![0u8; n];
    if getrandom::fill(&mut raw).is_err() {
        // Ids only need to be unique, not secret: fall back to time and a counter.
        static FALLBACK: AtomicU64 = AtomicU64::new(0);
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let c = FALLBACK.fetch_add(1, Ordering::Relaxed);
        let seed = format!("{t:x}{c:x}");
        raw = seed.bytes().cycle().take(n).collect();
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manager {
    /// A manager over `pools`, reporting to `observer`; call [`Manager::start_background`]
    /// to fill warm pools and reap expired sessions.
    pub fn new(
        engine: Arc<dyn Engine>,
        pools: BTreeMap<String, PoolSettings>,
        default_pool: String,
        tenants: TenantLimits,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let pools = pools
            .into_iter()
            .map(|(name, settings)| {
                (
                    name,
                    Pool {
                        settings,
                        warm: Mutex::new(VecDeque::new()),
                        starting: AtomicUsize::new(0),
                        refill: Notify::new(),
                        warmed: AtomicBool::new(false),
                        tenant_warm: Mutex::new(HashMap::new()),
                    },
                )
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                engine,
                pools,
                default_pool,
                tenants,
                table: Mutex::new(Table::default()),
                shutting_down: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                id_suffix: std::sync::OnceLock::new(),
                shutdown: Notify::new(),
                audit: std::sync::OnceLock::new(),
                observer,
                store: std::sync::OnceLock::new(),
                dormant: Mutex::new(BTreeMap::new()),
                waking: tokio::sync::Mutex::new(()),
                attempts: Mutex::new(HashMap::new()),
                approvals: Mutex::new(HashMap::new()),
                approval_hook: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Writes every execution and session event to `audit` from now on (once).
    pub fn set_audit(&self, audit: Audit) {
        let _ = self.inner.audit.set(audit);
    }

    /// The audit log, when there is one.
    pub fn audit(&self) -> Option<&Audit> {
        self.inner.audit.get()
    }

    /// Counts one execution of the tenant against its `executions_per_minute` (and checks
    /// its cost budgets, [`Quotas::admit_execution`]). With an audit store that keeps shared
    /// windows (PostgreSQL), the window is the one every server on that database shares, so
    /// a tenant's rate holds across replicas; a store error falls back to this server's own
    /// window (logged).
    pub(crate) async fn admit_execution_rate(&self, tenant: &str) -> Result<(), Error> {
        let quotas = self.quotas();
        if let (Some(max), Some(audit)) =
            (quotas.policy(tenant).executions_per_minute, self.audit())
        {
            quotas.check_budget(tenant)?;
            let key = format!("executions:{tenant}");
            match audit.store.admit_rate(&key, max, 60_000, now_ms()).await {
                Ok(ampoule_audit::RateAdmission::Admitted) => return Ok(()),
                Ok(ampoule_audit::RateAdmission::Refused { retry_after_ms }) => {
                    let secs = u64::try_from(retry_after_ms.max(1))
                        .unwrap_or(1)
                        .div_ceil(1000);
                    return Err(Error::RateLimited {
                        max,
                        retry_after_s: secs.max(1),
                    });
                }
                Ok(ampoule_audit::RateAdmission::NotShared) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "the shared rate window did not answer; this server's own counts"
                ),
            }
        }
        quotas.admit_execution(tenant)
    }

    /// The tenants' quotas and policy.
    pub(crate) fn quotas(&self) -> &Quotas {
        &self.inner.tenants.quotas
    }

    /// A request refused by a quota or policy: counted, logged and written down (kind
    /// `refused`, `decided_by` = the error code, with the identifier it named and the
    /// request's id), then returned.
    pub(crate) async fn refuse(
        &self,
        caller: &Caller,
        pool: &str,
        session: &str,
        identifier: Option<&str>,
        e: Error,
    ) -> Error {
        let code = e.code();
        self.inner.observer.refused(code);
        tracing::warn!(
            tenant = caller.tenant.as_str(),
            pool,
            session,
            code = code.as_str(),
            "refused by policy"
        );
        if self.inner.audit.get().is_some() {
            let mut r = Record::new(Kind::Refused, now_ms(), &caller.tenant, pool, session);
            r.language = self
                .inner
                .pools
                .get(pool)
                .map(|p| p.settings.spec.language.as_str().to_owned());
            r.decided_by = Some(code.as_str().to_owned());
            r.identifier = identifier.map(str::to_owned);
            caller.stamp(&mut r);
            self.write_audit_record(r).await;
        }
        e
    }

    /// A refusal at a front door before any tenant is known (failed authentications that
    /// reached a throttle): counted, logged and written down (kind `refused`, no tenant, pool
    /// or session; `decided_by` = the code, `status` = what was throttled (`address`,
    /// `key_prefix`), `client` = the address when known).
    pub async fn refused_at_door(
        &self,
        code: crate::error::ErrorCode,
        by: &str,
        client: Option<String>,
        request_id: Option<String>,
    ) {
        self.inner.observer.refused(code);
        tracing::warn!(
            code = code.as_str(),
            by,
            client = client.as_deref().unwrap_or("-"),
            "refused at the door"
        );
        if self.inner.audit.get().is_some() {
            let mut r = Record::new(Kind::Refused, now_ms(), "", "", "");
            r.decided_by = Some(code.as_str().to_owned());
            r.status = Some(by.to_owned());
            r.client = client;
            r.request_id = request_id;
            self.write_audit_record(r).await;
        }
    }

    /// Queues a record; never fails the caller (a stopped writer is logged).
    pub(crate) async fn write_audit_record(&self, record: Record) {
        if record.kind == Kind::Execution {
            for e in &record.egress {
                self.inner.observer.egress(&record.pool, e.allowed);
            }
        }
        if let Some(a) = self.inner.audit.get()
            && let Err(e) = a.writer.write(record).await
        {
            tracing::error!(error = %e, "audit record not written");
        }
    }

    /// A session event's record; `by` is the caller whose request caused it, if one did.
    pub(crate) async fn audit_session(
        &self,
        s: &Session,
        kind: Kind,
        decided_by: Option<&str>,
        by: Option<&Caller>,
    ) {
        self.audit_session_status(s, kind, decided_by, by, None)
            .await;
    }

    /// [`Manager::audit_session`] with the record's `status`.
    pub(crate) async fn audit_session_status(
        &self,
        s: &Session,
        kind: Kind,
        decided_by: Option<&str>,
        by: Option<&Caller>,
        status: Option<&str>,
    ) {
        let event = match kind {
            Kind::SessionCreated => Some("created"),
            Kind::SessionExpired => Some("expired"),
            Kind::SessionDeleted => Some("deleted"),
            Kind::SessionKilled => Some("killed"),
            _ => None,
        };
        if let Some(event) = event {
            self.inner.observer.session_event(&s.pool, event);
        }
        if self.inner.audit.get().is_none() {
            return;
        }
        let mut r = Record::new(kind, now_ms(), &s.tenant, &s.pool, &s.id);
        r.language = self
            .inner
            .pools
            .get(&s.pool)
            .map(|p| p.settings.spec.language.as_str().to_owned());
        if kind != Kind::SessionCreated {
            // Running time only: paused time is not metered.
            let running = s.created.elapsed().saturating_sub(s.sandbox.paused_total());
            r.duration_ms = Some(running.as_secs_f64() * 1000.0);
        }
        r.decided_by = decided_by.map(str::to_owned);
        r.status = status.map(str::to_owned);
        r.identifier = Some(s.identifier.clone());
        if let Some(c) = by {
            c.stamp(&mut r);
        }
        self.write_audit_record(r).await;
    }

    /// The default pool's name.
    pub fn default_pool(&self) -> &str {
        &self.inner.default_pool
    }

    /// A pool's settings.
    pub(crate) fn pool(&self, name: &str) -> Result<&PoolSettings, Error> {
        self.inner
            .pools
            .get(name)
            .map(|p| &p.settings)
            .ok_or_else(|| Error::PoolNotFound(name.to_owned()))
    }

    /// The engine's zygotes (one per pool that forks its sessions).
    pub fn zygotes(&self) -> Vec<crate::engine::ZygoteHealth> {
        self.inner.engine.zygotes()
    }

    /// Starts the background tasks: one warm-pool filler per pool and the reaper. Must be
    /// called from within a tokio runtime; the tasks end at [`Manager::shutdown`].
    pub fn start_background(&self) {
        for name in self.inner.pools.keys() {
            let me = self.clone();
            let name = name.clone();
            tokio::spawn(async move {
                // The zygote first (a worker thread: sandboxes die with the thread that
                // started them), so the pool's first session is already a fork.
                if let Some(pool) = me.inner.pools.get(&name) {
                    me.inner.engine.prepare(&pool.settings.spec).await;
                }
                me.fill_warm(&name).await
            });
        }
        let me = self.clone();
        tokio::spawn(async move { me.reap_loop().await });
    }

    /// The warm sessions a pool keeps: its `warm`, unless the engine would start them worse
    /// than on demand ([`Engine::keeps_warm_stock`]).
    fn warm_target(&self, settings: &PoolSettings) -> usize {
        if self.inner.engine.keeps_warm_stock(&settings.spec) {
            settings.warm
        } else {
            0
        }
    }

    /// The sessions kept ready for each tenant of a pool that keeps no shared stock because
    /// its tenants fork from zygotes of their own: its `warm`, at most [`TENANT_WARM_MAX`].
    fn tenant_warm_target(&self, settings: &PoolSettings) -> usize {
        if self.inner.engine.keeps_warm_stock(&settings.spec) {
            0
        } else {
            settings.warm.min(TENANT_WARM_MAX)
        }
    }

    /// A ready session of `tenant`'s own stock in the pool, if one is (the stock then refills).
    fn take_tenant_warm(
        &self,
        pool_name: &str,
        pool: &Pool,
        tenant: &str,
    ) -> Option<Arc<dyn LiveSession>> {
        let mut unusable = Vec::new();
        let taken = {
            let mut stocks = pool.tenant_warm.lock().ok()?;
            let stock = stocks.get_mut(tenant)?;
            stock.used = Instant::now();
            let mut taken = None;
            while let Some(live) = stock.ready.pop_front() {
                if live.alive() && !live.outdated() {
                    taken = Some(live);
                    break;
                }
                unusable.push(live);
            }
            taken
        };
        // Closed aside: the caller does not wait for discarded stock.
        for live in unusable {
            tokio::spawn(async move { live.close().await });
        }
        if taken.is_some() {
            self.refill_tenant(pool_name, tenant);
        }
        taken
    }

    /// Starts filling `tenant`'s stock in the pool unless a filler already runs for it.
    fn refill_tenant(&self, pool_name: &str, tenant: &str) {
        let Some(pool) = self.inner.pools.get(pool_name) else {
            return;
        };
        if self.tenant_warm_target(&pool.settings) == 0 || self.is_shutting_down() {
            return;
        }
        {
            let Ok(mut stocks) = pool.tenant_warm.lock() else {
                return;
            };
            let stock = stocks
                .entry(tenant.to_owned())
                .or_insert_with(|| TenantStock {
                    ready: VecDeque::new(),
                    filling: false,
                    used: Instant::now(),
                });
            stock.used = Instant::now();
            if stock.filling {
                return;
            }
            stock.filling = true;
        }
        let me = self.clone();
        let (pool_name, tenant) = (pool_name.to_owned(), tenant.to_owned());
        // A worker thread of the runtime, which lives as long as it: sandboxes die with the
        // thread that started them.
        tokio::spawn(async move { me.fill_tenant_warm(&pool_name, &tenant).await });
    }

    async fn fill_tenant_warm(&self, pool_name: &str, tenant: &str) {
        let Some(pool) = self.inner.pools.get(pool_name) else {
            return;
        };
        let target = self.tenant_warm_target(&pool.settings);
        loop {
            // Checked and cleared under the lock a taker takes: no refill request is lost.
            let stocked = {
                let Ok(mut stocks) = pool.tenant_warm.lock() else {
                    return;
                };
                let Some(stock) = stocks.get_mut(tenant) else {
                    return;
                };
                if stock.ready.len() >= target || self.is_shutting_down() {
                    stock.filling = false;
                    return;
                }
                !stock.ready.is_empty()
            };
            yield_to_requests(pool, stocked).await;
            let begun = Instant::now();
            match self
                .inner
                .engine
                .start(&pool.settings.spec, Some(tenant))
                .await
            {
                Ok(live) => {
                    if live.forked() {
                        self.inner
                            .observer
                            .zygote_forked(pool_name, begun.elapsed().as_secs_f64());
                    }
                    let live: Arc<dyn LiveSession> = Arc::from(live);
                    let kept = match pool.tenant_warm.lock() {
                        Ok(mut stocks) => match stocks.get_mut(tenant) {
                            Some(stock) if !self.is_shutting_down() => {
                                stock.ready.push_back(live.clone());
                                true
                            }
                            _ => false,
                        },
                        Err(_) => false,
                    };
                    if !kept {
                        live.close().await;
                        return;
                    }
                    tracing::debug!(pool = pool_name, %tenant, "tenant's warm session ready");
                }
                Err(e) => {
                    self.inner.observer.warm_start_failed(pool_name);
                    tracing::warn!(pool = pool_name, %tenant, error = %e, "could not start a warm session");
                    if let Ok(mut stocks) = pool.tenant_warm.lock()
                        && let Some(stock) = stocks.get_mut(tenant)
                    {
                        stock.filling = false;
                    }
                    return;
                }
            }
        }
    }

    /// Lets go of the stock of tenants idle in a pool for longer than its idle timeout, and
    /// of stock that died or whose zygote was replaced.
    async fn reap_tenant_warm(&self) {
        let mut gone: Vec<Arc<dyn LiveSession>> = Vec::new();
        for pool in self.inner.pools.values() {
            let Ok(mut stocks) = pool.tenant_warm.lock() else {
                continue;
            };
            for stock in stocks.values_mut() {
                if stock.used.elapsed() >= pool.settings.idle_timeout {
                    gone.extend(stock.ready.drain(..));
                } else {
                    let (keep, drop): (VecDeque<_>, VecDeque<_>) = stock
                        .ready
                        .drain(..)
                        .partition(|l| l.alive() && !l.outdated());
                    stock.ready = keep;
                    gone.extend(drop);
                }
            }
            stocks.retain(|_, s| {
                s.filling || !s.ready.is_empty() || s.used.elapsed() < pool.settings.idle_timeout
            });
        }
        futures_util::future::join_all(gone.iter().map(|l| l.close())).await;
    }

    async fn fill_warm(&self, name: &str) {
        let Some(pool) = self.inner.pools.get(name) else {
            return;
        };
        let target = self.warm_target(&pool.settings);
        if target < pool.settings.warm {
            tracing::info!(
                pool = name,
                "no warm stock: the pool's tenants fork their sessions from zygotes of their own"
            );
        }
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.inner.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            let have = pool.warm.lock().map(|w| w.len()).unwrap_or(target);
            if have >= target {
                // Filled (or keeps none, its zygote prepared): ready for its first sessions.
                pool.warmed.store(true, Ordering::SeqCst);
            }
            if have < target {
                yield_to_requests(pool, have > 0).await;
                // Sandboxes die with the thread that started them: this task runs on a worker
                // thread, which lives as long as the runtime.
                let begun = Instant::now();
                match self.inner.engine.start(&pool.settings.spec, None).await {
                    Ok(live) => {
                        backoff = Duration::from_millis(500);
                        if live.forked() {
                            let seconds = begun.elapsed().as_secs_f64();
                            self.inner.observer.zygote_forked(name, seconds);
                        }
                        let live: Arc<dyn LiveSession> = Arc::from(live);
                        if self.inner.shutting_down.load(Ordering::SeqCst) {
                            live.close().await;
                            return;
                        }
                        match pool.warm.lock() {
                            Ok(mut w) => w.push_back(live),
                            Err(_) => return,
                        }
                        tracing::debug!(pool = name, "warm session ready");
                    }
                    Err(e) => {
                        self.inner.observer.warm_start_failed(name);
                        tracing::warn!(pool = name, error = %e, "could not start a warm session");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = self.inner.shutdown.notified() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
                continue;
            }
            tokio::select! {
                () = pool.refill.notified() => {}
                () = self.inner.shutdown.notified() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    async fn reap_loop(&self) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.shutdown.notified() => return,
            }
            if self.inner.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            self.reap_once().await;
            self.reap_tenant_warm().await;
        }
    }

    /// Applies every session's and sandbox's lifecycle (the reaper's one round): destroys
    /// those past their idle timeout, lifetime or timeout, pauses and hibernates the idle ones
    /// their policy says, deletes hibernated ones past their time. Returns how many it acted
    /// on.
    pub async fn reap_once(&self) -> usize {
        let due: Vec<(Arc<Slot>, crate::durable::Due)> = {
            let Ok(table) = self.inner.table.lock() else {
                return 0;
            };
            table
                .by_id
                .values()
                .filter_map(|slot| {
                    let s = slot.cell.get()?;
                    let due = match self.inner.pools.get(&s.pool) {
                        Some(pool) => self.due(s, &pool.settings),
                        None => Some(crate::durable::Due::Delete("pool_removed")),
                    }?;
                    Some((slot.clone(), due))
                })
                .collect()
        };
        let mut n = 0;
        for (slot, due) in due {
            if self.act(&slot, due).await {
                n += 1;
            }
        }
        n + self.reap_dormant().await
    }

    fn tenant_limit(&self, tenant: &str) -> Option<usize> {
        self.inner
            .tenants
            .per_tenant
            .get(tenant)
            .copied()
            .or(self.inner.tenants.default)
    }

    /// Reserves a slot for a new key, enforcing the limits.
    fn reserve(&self, key: &Key, id: Option<&str>) -> Result<(Arc<Slot>, bool), Error> {
        let mut table = self
            .inner
            .table
            .lock()
            .map_err(|_| Error::internal("session table poisoned"))?;
        if let Some(slot) = table.by_key.get(key) {
            return Ok((slot.clone(), false));
        }
        let (tenant, pool_name, _) = key;
        let pool = self.pool(pool_name)?;
        if table.per_pool.get(pool_name).copied().unwrap_or(0) >= pool.max_sessions {
            return Err(Error::PoolFull {
                pool: pool_name.clone(),
                max: pool.max_sessions,
            });
        }
        if let Some(max) = self.tenant_limit(tenant)
            && table.per_tenant.get(tenant).copied().unwrap_or(0) >= max
        {
            return Err(Error::TenantFull { max });
        }
        let slot = Arc::new(Slot {
            key: key.clone(),
            id: id.map_or_else(|| self.new_id("ses"), str::to_owned),
            cell: OnceCell::new(),
        });
        table.by_key.insert(key.clone(), slot.clone());
        table.by_id.insert(slot.id.clone(), slot.clone());
        *table.per_pool.entry(pool_name.clone()).or_default() += 1;
        *table.per_tenant.entry(tenant.clone()).or_default() += 1;
        Ok((slot, true))
    }

    /// Takes the slot out of the table (if it is still there) and closes its session.
    pub(crate) async fn remove_and_close(&self, slot: &Arc<Slot>) {
        self.unlist(slot);
        if let Some(s) = slot.cell.get() {
            for ctx in s.sandbox.take_contexts() {
                ctx.close().await;
            }
            s.live.close().await;
        }
    }

    pub(crate) fn is_listed(&self, slot: &Arc<Slot>) -> bool {
        self.inner.table.lock().is_ok_and(|t| {
            t.by_key
                .get(&slot.key)
                .is_some_and(|s| Arc::ptr_eq(s, slot))
        })
    }

    fn unlist(&self, slot: &Arc<Slot>) {
        let Ok(mut table) = self.inner.table.lock() else {
            return;
        };
        let listed = table
            .by_key
            .get(&slot.key)
            .is_some_and(|s| Arc::ptr_eq(s, slot));
        if listed {
            table.by_key.remove(&slot.key);
            table.by_id.remove(&slot.id);
            let (tenant, pool, _) = &slot.key;
            if let Some(n) = table.per_pool.get_mut(pool) {
                *n = n.saturating_sub(1);
            }
            if let Some(n) = table.per_tenant.get_mut(tenant) {
                *n = n.saturating_sub(1);
            }
        }
    }

    async fn start_live(
        &self,
        tenant: &str,
        pool_name: &str,
        disk: Option<&std::path::Path>,
        restore_image: Option<&std::path::Path>,
    ) -> Result<(Arc<dyn LiveSession>, bool), Error> {
        let pool = self
            .inner
            .pools
            .get(pool_name)
            .ok_or_else(|| Error::PoolNotFound(pool_name.to_owned()))?;
        let begun = Instant::now();
        if let Some(disk) = disk {
            // A durable sandbox starts on its own disk: never from warm stock.
            pool.starting.fetch_add(1, Ordering::SeqCst);
            let engine = &self.inner.engine;
            let spec = &pool.settings.spec;
            // With its memory when it was checkpointed; with its files only when that fails.
            let restored = match restore_image {
                Some(image) => match engine.restore_durable(spec, tenant, disk, image).await {
                    Ok(live) => Some(live),
                    Err(e) => {
                        tracing::warn!(pool = pool_name, error = %e, "restoring a checkpoint failed: starting with the files only");
                        None
                    }
                },
                None => None,
            };
            let kept = restored.is_some();
            let started = match restored {
                Some(live) => Ok(live),
                None => engine.start_durable(spec, tenant, disk).await,
            };
            pool.starting.fetch_sub(1, Ordering::SeqCst);
            let started = started?;
            self.inner
                .observer
                .session_started(pool_name, false, begun.elapsed().as_secs_f64());
            return Ok((Arc::from(started), kept));
        }
        if self.tenant_warm_target(&pool.settings) > 0
            && let Some(live) = self.take_tenant_warm(pool_name, pool, tenant)
        {
            self.inner
                .observer
                .session_started(pool_name, true, begun.elapsed().as_secs_f64());
            return Ok((live, false));
        }
        loop {
            let warm = pool.warm.lock().ok().and_then(|mut w| w.pop_front());
            match warm {
                Some(live) if live.alive() && !live.outdated() => {
                    pool.refill.notify_one();
                    self.inner.observer.session_started(
                        pool_name,
                        true,
                        begun.elapsed().as_secs_f64(),
                    );
                    return Ok((live, false));
                }
                // Closed aside: the caller does not wait for discarded stock.
                Some(unusable) => {
                    tokio::spawn(async move { unusable.close().await });
                }
                None => break,
            }
        }
        pool.refill.notify_one();
        pool.starting.fetch_add(1, Ordering::SeqCst);
        let started = self
            .inner
            .engine
            .start(&pool.settings.spec, Some(tenant))
            .await;
        pool.starting.fetch_sub(1, Ordering::SeqCst);
        let started = started?;
        // The tenant's next session is forked and sealed now, off its request's path.
        self.refill_tenant(pool_name, tenant);
        let seconds = begun.elapsed().as_secs_f64();
        self.inner
            .observer
            .session_started(pool_name, false, seconds);
        if started.forked() {
            self.inner.observer.zygote_forked(pool_name, seconds);
        }
        Ok((Arc::from(started), false))
    }

    /// The session of `identifier` in `pool` for the caller, started on first use (its
    /// pool's limits are counted here; the tenant's policy was checked by the command).
    /// Returns it and whether this call created it.
    pub(crate) async fn get_or_create(
        &self,
        caller: &Caller,
        pool: &str,
        identifier: &str,
    ) -> Result<(Arc<Session>, bool), Error> {
        self.get_or_create_with(caller, pool, identifier, None, None)
            .await
    }

    /// Creates a sandbox: a session under a fresh identifier with its id and extras.
    pub(crate) async fn create_with(
        &self,
        caller: &Caller,
        pool: &str,
        identifier: &str,
        id: Option<String>,
        extras: crate::sandbox::Extras,
    ) -> Result<Arc<Session>, Error> {
        Ok(self
            .get_or_create_with(caller, pool, identifier, id, Some(extras))
            .await?
            .0)
    }

    pub(crate) async fn get_or_create_with(
        &self,
        caller: &Caller,
        pool: &str,
        identifier: &str,
        id: Option<String>,
        extras: Option<crate::sandbox::Extras>,
    ) -> Result<(Arc<Session>, bool), Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let tenant = caller.tenant.as_str();
        // Draining: the sessions held are served, none is started (nor brought back).
        if self.is_draining() && self.find(tenant, pool, identifier).is_none() {
            return Err(Error::ShuttingDown);
        }
        let key: Key = (tenant.to_owned(), pool.to_owned(), identifier.to_owned());
        // A durable session's disk, made here for a session that may not be ours to start.
        let mut made_disk = None;
        let (extras, id) = match extras {
            Some(x) => (Some(x), id),
            None => {
                // A session under an identifier that was hibernated comes back.
                if let Some(dormant) = self.dormant_for_key(&key) {
                    let s = Box::pin(self.restore(caller, &dormant)).await?;
                    return Ok((s, false));
                }
                match self.find(tenant, pool, identifier) {
                    Some(_) => (None, id),
                    None => match self.durable_session_extras(caller, pool).await? {
                        Some((x, sid)) => {
                            made_disk = Some(sid.clone());
                            (Some(x), Some(sid))
                        }
                        None => (None, id),
                    },
                }
            }
        };
        let restoring = extras.as_ref().is_some_and(|x| x.created_at.is_some());
        let disk = extras.as_ref().and_then(|x| x.disk.clone());
        let (slot, reserved) = match self.reserve(&key, id.as_deref()) {
            Ok(r) => r,
            Err(e) if e.is_policy() => {
                return Err(self.refuse(caller, pool, "", Some(identifier), e).await);
            }
            Err(e) => {
                if let Some(d) = &made_disk {
                    self.forget_disk(d);
                }
                return Err(e);
            }
        };
        if !reserved && let Some(d) = &made_disk {
            self.forget_disk(d);
        }
        let init = slot
            .cell
            .get_or_try_init(|| async {
                let extras = extras.unwrap_or_else(crate::sandbox::Extras::session);
                let (live, memory_kept) = self
                    .start_live(
                        tenant,
                        pool,
                        extras.disk.as_deref(),
                        extras.restore_image.as_deref(),
                    )
                    .await?;
                if memory_kept && let Ok(mut l) = extras.life.lock() {
                    l.memory_lost = false;
                }
                let now = (Instant::now(), SystemTime::now());
                Ok::<_, Error>(Arc::new(Session {
                    id: slot.id.clone(),
                    tenant: tenant.to_owned(),
                    pool: pool.to_owned(),
                    identifier: identifier.to_owned(),
                    created_at: extras.created_at.unwrap_or(now.1),
                    created: now.0,
                    live,
                    exec_lock: tokio::sync::Mutex::new(()),
                    last_used: Mutex::new(now),
                    in_flight: AtomicUsize::new(0),
                    executions: AtomicU64::new(0),
                    sandbox: extras,
                }))
            })
            .await;
        match init {
            Ok(session) => {
                let session = session.clone();
                if !self.is_listed(&slot) {
                    // An earlier start of this slot failed and its caller took the slot out
                    // of the table while we were starting: never hand out a session the
                    // table (limits, reaper, shutdown) does not know.
                    session.live.close().await;
                    return Err(Error::SandboxUnavailable(
                        "the session could not be started; try again".into(),
                    ));
                }
                if self.is_shutting_down() {
                    self.remove_and_close(&slot).await;
                    return Err(Error::ShuttingDown);
                }
                if !reserved {
                    // Named by a call: a paused session runs again.
                    self.wake(&session, Some(caller)).await?;
                }
                session.touch();
                tracing::Span::current().record("session", session.id.as_str());
                if reserved && !restoring {
                    if session.sandbox.disk.is_some() {
                        self.save_record(&session);
                    }
                    self.audit_session(&session, Kind::SessionCreated, None, Some(caller))
                        .await;
                }
                Ok((session, reserved))
            }
            Err(e) => {
                // Nobody else can use a slot whose start failed; the next call tries afresh.
                self.unlist(&slot);
                if reserved && !restoring && disk.is_some() {
                    self.forget_disk(&slot.id);
                }
                Err(e)
            }
        }
    }

    /// The session of `identifier` in `pool`, when it exists for `tenant`.
    pub(crate) fn find(&self, tenant: &str, pool: &str, identifier: &str) -> Option<Arc<Session>> {
        let table = self.inner.table.lock().ok()?;
        let key: Key = (tenant.to_owned(), pool.to_owned(), identifier.to_owned());
        table.by_key.get(&key)?.cell.get().cloned()
    }

    /// The session of `identifier` in whichever of `tenant`'s pools holds it (the oldest when
    /// several do).
    pub(crate) fn find_any(&self, tenant: &str, identifier: &str) -> Option<Arc<Session>> {
        self.list(tenant)
            .into_iter()
            .find(|s| s.identifier == identifier)
    }

    /// The session with this id, when it belongs to `tenant` (else: not found).
    pub(crate) fn get(&self, tenant: &str, id: &str) -> Result<Arc<Session>, Error> {
        let table = self
            .inner
            .table
            .lock()
            .map_err(|_| Error::internal("session table poisoned"))?;
        let s = table
            .by_id
            .get(id)
            .and_then(|slot| slot.cell.get())
            .filter(|s| s.tenant == tenant)
            .cloned()
            .ok_or_else(Error::session_not_found)?;
        Ok(s)
    }

    /// The session with this id, whoever it belongs to (only for a caller that proves a
    /// right to it, e.g. with its token).
    pub(crate) fn get_any_tenant(&self, id: &str) -> Option<Arc<Session>> {
        let table = self.inner.table.lock().ok()?;
        table
            .by_id
            .get(id)
            .and_then(|slot| slot.cell.get())
            .cloned()
    }

    /// The tenant's live sessions, oldest first.
    pub(crate) fn list(&self, tenant: &str) -> Vec<Arc<Session>> {
        let Ok(table) = self.inner.table.lock() else {
            return Vec::new();
        };
        let mut out: Vec<Arc<Session>> = table
            .by_id
            .values()
            .filter_map(|slot| slot.cell.get())
            .filter(|s| s.tenant == tenant)
            .cloned()
            .collect();
        out.sort_by_key(|s| s.created);
        out
    }

    /// Destroys a session (audited as deleted by `caller`).
    pub(crate) async fn delete(&self, caller: &Caller, session: &Session) {
        let slot = self
            .inner
            .table
            .lock()
            .ok()
            .and_then(|t| t.by_id.get(&session.id).cloned());
        let Some(slot) = slot else {
            return;
        };
        if let Some(s) = slot.cell.get() {
            self.audit_session(s, Kind::SessionDeleted, None, Some(caller))
                .await;
        }
        self.remove_and_close(&slot).await;
        // Deleted is deleted: a durable session's files go too.
        if session.sandbox.disk.is_some() {
            self.forget_disk(&session.id);
        }
    }

    /// The timeout of one execution: the request's, else the pool's default, never above
    /// the pool's maximum; a request above the tenant's maximum is refused
    /// (`timeout_not_allowed`), a default above it is cut to it.
    pub(crate) fn timeout_for(
        &self,
        tenant: &str,
        pool: &str,
        requested: Option<f64>,
    ) -> Result<f64, Error> {
        let p = self.pool(pool)?;
        if let Some(t) = requested
            && !(t > 0.0 && t.is_finite())
        {
            return Err(Error::invalid("the timeout must be a positive number"));
        }
        let t = self
            .quotas()
            .timeout(tenant, requested, p.spec.limits.timeout_s)?;
        let t = t.min(p.max_timeout_s);
        // `stop_at_budget`: no longer than the CPU seconds left (exact for one busy thread;
        // code with several threads may overrun by their number).
        Ok(match self.quotas().cpu_left(tenant) {
            Some(left) => t.min(left.max(0.1)),
            None => t,
        })
    }

    /// Runs an admitted execution in its own task, so that a caller that goes away (a client
    /// disconnecting) never cancels it half-way: serialized with the session's other
    /// executions; the idle timer restarts when the call starts and when it ends.
    pub(crate) fn spawn_execution(
        &self,
        caller: &Caller,
        session: &Arc<Session>,
        ctx: Option<Arc<crate::sandbox::Ctx>>,
        req: ExecRequest,
        events: Option<EventSender>,
        execution: String,
    ) -> tokio::task::JoinHandle<Result<ExecutionResult, Error>> {
        let me = self.clone();
        let session = session.clone();
        let by = caller.clone();
        // At `warn`, like the request span (see the server's `logging`).
        let span = tracing::warn_span!(
            "execution",
            execution = execution.as_str(),
            session = session.id.as_str()
        );
        tokio::spawn(
            async move {
                me.execute_here(&session, ctx, req, events, execution, by)
                    .await
            }
            .instrument(span),
        )
    }

    async fn execute_here(
        &self,
        session: &Arc<Session>,
        ctx: Option<Arc<crate::sandbox::Ctx>>,
        req: ExecRequest,
        events: Option<EventSender>,
        execution: String,
        by: Caller,
    ) -> Result<ExecutionResult, Error> {
        session.in_flight.fetch_add(1, Ordering::SeqCst);
        session.touch();
        let started = now_ms();
        let begun = Instant::now();
        let code = self.inner.audit.get().map(|_| req.code.clone());
        let language = match &ctx {
            Some(c) => Some(c.language.as_str().to_owned()),
            None => self
                .inner
                .pools
                .get(&session.pool)
                .map(|p| p.settings.spec.language.as_str().to_owned()),
        };
        let (result, files) = {
            let _turn = match &ctx {
                Some(c) => c.turn.lock().await,
                None => session.exec_lock.lock().await,
            };
            session.executions.fetch_add(1, Ordering::SeqCst);
            // What the execution touched in /mnt/data: the listing before and after (file
            // calls may run meanwhile and are counted too; the record says "changed while
            // this ran").
            let before = match code {
                Some(_) => Some(listing(&session.live).await),
                None => None,
            };
            session.live.label(&session.id, &execution);
            let result = match ctx.as_ref().map(|c| c.current()) {
                None => session.live.execute(req, events).await,
                Some(Some(live)) => live.execute(req, events).await,
                Some(None) => Err(crate::engine::EngineError::Closed),
            };
            let files = match before {
                Some(before) if session.live.alive() => {
                    changed_files(&before, &listing(&session.live).await)
                }
                _ => Vec::new(),
            };
            (result, files)
        };
        session.touch();
        session.in_flight.fetch_sub(1, Ordering::SeqCst);
        let status = result.as_ref().map_or("error", |r| r.status.as_str());
        self.inner
            .observer
            .execution(&session.pool, status, begun.elapsed().as_secs_f64());
        if let Ok(r) = &result {
            // What it cost, from its sandbox's cgroup: CPU time, and peak memory × duration.
            let spent = crate::quota::Spent {
                cpu_seconds: r.cpu_time_ms.unwrap_or(0.0) / 1000.0,
                memory_gib_seconds: r.peak_memory_bytes.unwrap_or(0) as f64 / f64::from(1u32 << 30)
                    * (r.duration_ms / 1000.0),
            };
            self.quotas().charge(&session.tenant, spent);
            self.inner.observer.spent(&session.pool, spent);
        }
        tracing::info!(
            status,
            ms = begun.elapsed().as_millis() as u64,
            "execution finished"
        );
        if let (Some(code), Ok(r)) = (code, &result) {
            let rec = ExecutionRecord {
                started,
                code,
                execution,
                by: by.clone(),
                files,
                language,
            };
            self.audit_execution(session, rec, r).await;
        }
        if !session.live.alive() {
            let limit = result.as_ref().ok().and_then(|r| r.limit);
            self.audit_session(
                session,
                Kind::SessionKilled,
                Some(limit.map_or("sandbox_died", |l| l.as_str())),
                Some(&by),
            )
            .await;
            // The sandbox is gone (a limit killed it): the next call with this identifier
            // starts a fresh session instead of failing forever.
            let slot = self
                .inner
                .table
                .lock()
                .ok()
                .and_then(|t| t.by_id.get(&session.id).cloned());
            if let Some(slot) = slot {
                self.remove_and_close(&slot).await;
            }
        }
        Ok(result?)
    }

    async fn audit_execution(&self, session: &Session, x: ExecutionRecord, r: &ExecutionResult) {
        let Some(a) = self.inner.audit.get() else {
            return;
        };
        let (keep_code, output_bytes) = a.policy(&session.pool);
        let mut rec = Record::new(
            Kind::Execution,
            x.started,
            &session.tenant,
            &session.pool,
            &session.id,
        );
        rec.execution = Some(x.execution);
        rec.identifier = Some(session.identifier.clone());
        x.by.stamp(&mut rec);
        rec.language = x.language;
        let code_sha256 = ampoule_audit::sha256_hex(x.code.as_bytes());
        if let Some(run) = rec.run_id.clone() {
            let n = self.attempt(&session.tenant, &run, &code_sha256);
            if n > 1 {
                self.inner.observer.retried(&session.pool);
            }
            rec.attempt = Some(n);
        }
        rec.code_sha256 = Some(code_sha256);
        rec.code = keep_code.then_some(x.code);
        rec.status = Some(r.status.as_str().to_owned());
        rec.duration_ms = Some(r.duration_ms);
        rec.cpu_time_ms = r.cpu_time_ms;
        rec.peak_memory_bytes = r
            .peak_memory_bytes
            .map(|b| i64::try_from(b).unwrap_or(i64::MAX));
        rec.stdout = Some(ampoule_audit::trim(&r.stdout, output_bytes));
        rec.stderr = Some(ampoule_audit::trim(&r.stderr, output_bytes));
        rec.files = x.files;
        rec.egress = r.egress.iter().map(egress_decision).collect();
        rec.decided_by = r.limit.map(|l| l.as_str().to_owned());
        self.write_audit_record(rec).await;
    }

    /// The attempt number of this code in this run of the tenant's (1 the first time; more
    /// when an agent retries it). Remembers the last [`MAX_RUNS_REMEMBERED`] runs' code.
    fn attempt(&self, tenant: &str, run: &str, code_sha256: &str) -> u32 {
        let Ok(mut seen) = self.inner.attempts.lock() else {
            return 1;
        };
        if seen.len() >= MAX_RUNS_REMEMBERED {
            // Forget everything rather than track ages: a retry after this many other
            // executions with a run id is counted as a first attempt.
            seen.clear();
        }
        let n = seen
            .entry((tenant.to_owned(), run.to_owned(), code_sha256.to_owned()))
            .or_insert(0);
        *n += 1;
        *n
    }

    /// Marks the start and end of a file call, so the reaper leaves a session alone while it
    /// streams a large file.
    pub(crate) fn file_call(&self, session: &Arc<Session>) -> FileCall {
        session.in_flight.fetch_add(1, Ordering::SeqCst);
        session.touch();
        FileCall(session.clone())
    }

    /// Every pool's figures.
    pub fn pools(&self) -> Vec<PoolStatus> {
        let (sessions, busy) = {
            let mut sessions: HashMap<String, usize> = HashMap::new();
            let mut busy: HashMap<String, usize> = HashMap::new();
            if let Ok(table) = self.inner.table.lock() {
                for s in table.by_id.values().filter_map(|slot| slot.cell.get()) {
                    *sessions.entry(s.pool.clone()).or_default() += 1;
                    if s.busy() {
                        *busy.entry(s.pool.clone()).or_default() += 1;
                    }
                }
            }
            (sessions, busy)
        };
        self.inner
            .pools
            .iter()
            .map(|(name, p)| PoolStatus {
                name: name.clone(),
                language: p.settings.spec.language.as_str().to_owned(),
                ready: p.warm.lock().map(|w| w.len()).unwrap_or(0)
                    + p.tenant_warm
                        .lock()
                        .map(|t| t.values().map(|s| s.ready.len()).sum::<usize>())
                        .unwrap_or(0),
                busy: busy.get(name).copied().unwrap_or(0),
                sessions: sessions.get(name).copied().unwrap_or(0),
                max_sessions: p.settings.max_sessions,
                warm: self.warm_target(&p.settings),
            })
            .collect()
    }

    /// Live sessions in every pool and of every tenant (what the table holds).
    pub fn session_count(&self) -> usize {
        self.inner.table.lock().map_or(0, |t| t.by_id.len())
    }

    /// Whether [`Manager::shutdown`] has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Names this server's replica in a cluster (once): every session and sandbox id made
    /// from now on ends in `_<replica>`, so any replica can tell which one holds it.
    /// `replica` must be ASCII letters and digits (ids stay valid E2B sandbox ids and
    /// directory names).
    pub fn set_replica(&self, replica: &str) -> Result<(), Error> {
        if replica.is_empty()
            || replica.len() > 32
            || !replica.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(Error::invalid(
                "a replica's id token is 1 to 32 ASCII letters and digits",
            ));
        }
        let _ = self.inner.id_suffix.set(format!("_{replica}"));
        Ok(())
    }

    /// A new id: `<kind>_<24 hex>`, and `_<replica>` in a cluster.
    pub(crate) fn new_id(&self, kind: &str) -> String {
        let suffix = self.inner.id_suffix.get().map_or("", String::as_str);
        format!("{kind}_{}{suffix}", random_hex(12))
    }

    /// A generated session name (an MCP session started without one): 32 hex digits, and
    /// `_<replica>` in a cluster, so that every replica routes it to the one holding it.
    pub(crate) fn new_name(&self) -> String {
        let suffix = self.inner.id_suffix.get().map_or("", String::as_str);
        format!("{}{suffix}", random_hex(16))
    }

    /// The replica an id names (`<kind>_<hex>_<replica>`), if any.
    pub fn replica_of(id: &str) -> Option<&str> {
        let mut parts = id.splitn(3, '_');
        let (_kind, _hex) = (parts.next()?, parts.next()?);
        parts.next().filter(|r| !r.is_empty())
    }

    /// Begins a graceful stop: from now on no session or sandbox is started or brought back
    /// (`shutting_down`, 503), while the sessions held keep being served. [`Manager::readiness`]
    /// answers [`Readiness::Draining`] at once. [`Manager::wait_idle`] then waits for running
    /// executions, and [`Manager::shutdown`] closes (or hibernates) what is left.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Manager::drain`] (or [`Manager::shutdown`]) has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst) || self.is_shutting_down()
    }

    /// Sessions running an execution or a file call now.
    pub fn busy_sessions(&self) -> usize {
        self.inner.table.lock().map_or(0, |t| {
            t.by_id
                .values()
                .filter_map(|slot| slot.cell.get())
                .filter(|s| s.busy())
                .count()
        })
    }

    /// Waits until no session runs an execution or file call, for at most `limit`. True when
    /// idle; false when `limit` passed first (the executions left end at shutdown).
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            if self.busy_sessions() == 0 {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether this server should receive new sessions (`GET /readyz`): not while draining,
    /// nor before every pool's warm stock was first filled.
    pub fn readiness(&self) -> Readiness {
        if self.is_draining() {
            return Readiness::Draining;
        }
        let warming: Vec<String> = self
            .inner
            .pools
            .iter()
            .filter(|(_, p)| !p.warmed.load(Ordering::SeqCst))
            .map(|(name, _)| name.clone())
            .collect();
        if warming.is_empty() {
            Readiness::Ready
        } else {
            Readiness::Warming(warming)
        }
    }

    /// Stops the background tasks and closes every session and warm sandbox. New sessions are
    /// refused from now on.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.shutdown.notify_waiters();
        let slots: Vec<Arc<Slot>> = match self.inner.table.lock() {
            Ok(mut t) => {
                t.by_key.clear();
                t.per_pool.clear();
                t.per_tenant.clear();
                t.by_id.drain().map(|(_, s)| s).collect()
            }
            Err(_) => Vec::new(),
        };
        let mut lives: Vec<Arc<dyn LiveSession>> = slots
            .iter()
            .filter_map(|slot| slot.cell.get().map(|s| s.live.clone()))
            .collect();
        for pool in self.inner.pools.values() {
            if let Ok(mut w) = pool.warm.lock() {
                lives.extend(w.drain(..));
            }
            if let Ok(mut t) = pool.tenant_warm.lock() {
                lives.extend(t.values_mut().flat_map(|s| s.ready.drain(..)));
            }
        }
        let n = lives.len();
        // Durable sandboxes whose engine can checkpoint them keep their memory across the
        // restart (those running an execution do not: it is not waited for).
        let kept: std::collections::HashSet<String> = futures_util::future::join_all(
            slots
                .iter()
                .filter_map(|slot| slot.cell.get())
                .filter(|s| s.sandbox.disk.is_some())
                .map(|s| async move { (s.id.clone(), self.checkpoint_at_shutdown(s).await) }),
        )
        .await
        .into_iter()
        .filter_map(|(id, kept)| kept.then_some(id))
        .collect();
        futures_util::future::join_all(lives.iter().map(|l| l.close())).await;
        // Every session's life ends in the audit log, so usage counts it.
        // A durable one is written down as hibernated: the server started again lists it.
        for s in slots.iter().filter_map(|slot| slot.cell.get()) {
            if !self.hibernate_at_shutdown(s, kept.contains(&s.id)).await {
                self.audit_session(s, Kind::SessionExpired, Some("shutdown"), None)
                    .await;
            }
        }
        tracing::info!(sessions = n, "closed every session");
    }
}

/// Most (tenant, run, code) triples remembered to number attempts.
const MAX_RUNS_REMEMBERED: usize = 100_000;

/// What an execution's audit record needs besides the session and the result.
struct ExecutionRecord {
    started: i64,
    code: String,
    execution: String,
    by: Caller,
    files: Vec<String>,
    language: Option<String>,
}

/// An egress decision as the audit log keeps it: the checked address and whether a credential
/// was added go into the reason.
fn egress_decision(e: &ampoule_types::EgressEvent) -> ampoule_audit::EgressDecision {
    let mut reason = e.reason.clone();
    if let Some(address) = &e.address {
        reason.push_str(&format!(" (address {address})"));
    }
    if e.injected {
        reason.push_str(" (credential injected)");
    }
    ampoule_audit::EgressDecision {
        host: e.host.clone(),
        port: e.port,
        protocol: serde_json::to_value(e.protocol)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        allowed: e.allowed,
        reason,
    }
}

/// A file call in progress (see [`Manager::file_call`]): the session counts as busy until
/// it is dropped.
pub(crate) struct FileCall(Arc<Session>);

impl FileCall {
    /// The session the call is in.
    pub(crate) fn session(&self) -> &Arc<Session> {
        &self.0
    }
}

impl Drop for FileCall {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
