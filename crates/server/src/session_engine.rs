//! The real [`Engine`]: interpreter sessions of `ampoule-session`, each in its own sandbox.
//!
//! One [`ampoule_session::Session`] needs `&mut` to execute, so it lives behind an async
//! mutex; the session's files are served through a second handle on its scratch space, so
//! uploads and downloads never wait for a running execution. Closing a session while an
//! execution runs (delete, lifetime, shutdown) cancels the execution first, then kills the
//! sandbox.
//!
//! Pools with a network ([`PoolSpec::network`]) get sessions wired to their own egress gateway
//! ([`Session::start_with`], or [`Session::start_forked_with`] in a pool with `zygote = true`,
//! whose zygotes have no network themselves); the engine holds the server's one [`Egress`]
//! (pins, CA) for them.
//!
//! Python pools fork their sessions from zygotes, one per pool and tenant: two tenants' sessions
//! never share an interpreter's randomness (CPython's string-hash secret, the address-space
//! layout), which a forked child keeps from its zygote. The zygotes of the pool's configured
//! tenants ([`PoolSpec::tenants`], at most [`MAX_TENANT_ZYGOTES`]) start with the pool; another
//! tenant's starts in the background on its first session (started cold meanwhile). Warm stock
//! is forked only in a pool one tenant alone may use; a shared pool keeps none (a fork from the
//! tenant's zygote is faster to a first result than a cold warm session). A
//! zygote that has forked nothing for [`ZYGOTE_IDLE`] is let go when another tenant's zygote is
//! started (it ends with the last session it forked), and started again on its tenant's next
//! session. Each zygote is replaced in the
//! background, the old one serving until the new one is ready, after [`RECYCLE_FORKS`] forks,
//! after [`RECYCLE_AGE`], or when the Python environment on disk no longer matches the one it
//! started from (packages installed or upgraded since: its imports are stale), which is
//! compared at most every [`ENV_CHECK_EVERY`] per pool, on the way to a new session. In that
//! last case the sessions forked from the old zygote and not handed out yet (warm stock) are
//! [`LiveSession::outdated`] once the new one is ready.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ampoule_egress::Egress;
use ampoule_runtime::{Host, Scratch, Zygote};
use ampoule_session::language::image::ImageRoot;
use ampoule_session::setup::EnvFingerprint;
use ampoule_session::{ExecuteRequest, Session, SessionNetwork, SessionOptions};
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
/// A pool compares the Python environment on disk with its zygote's at most this often (a
/// few `stat` calls; the sessions in between never pay for it).
const ENV_CHECK_EVERY: Duration = Duration::from_secs(1);
/// After a zygote failed to start, sessions start cold for this long before it is retried.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Most zygotes of one pool (one per tenant); a tenant beyond them gets cold sessions.
const MAX_TENANT_ZYGOTES: usize = 8;
/// A zygote that has forked nothing for this long is let go when another tenant's starts.
const ZYGOTE_IDLE: Duration = Duration::from_secs(600);

/// The `reason` of a zygote replaced because its Python environment changed.
const PACKAGES_CHANGED: &str = "packages changed";

/// Why a zygote that has forked `forks` sessions, is `age` old and was started from a Python
/// environment that has since changed (`packages_changed`) must be replaced, if it must: the
/// `reason` of the `zygote recycled` log line.
fn recycle_reason(forks: u64, age: Duration, packages_changed: bool) -> Option<&'static str> {
    if packages_changed {
        Some(PACKAGES_CHANGED)
    } else if forks >= RECYCLE_FORKS {
        Some("forks")
    } else if age >= RECYCLE_AGE {
        Some("age")
    } else {
        None
    }
}

/// The Python environment a zygote is about to start from, `None` (logged) when it cannot be
/// read: such a zygote is then recycled for forks and age only.
fn env_fingerprint(pool: &str) -> Option<EnvFingerprint> {
    ampoule_session::zygote::python_env_fingerprint()
        .map_err(|e| {
            tracing::warn!(pool, error = %chain(&e), "cannot fingerprint the Python environment")
        })
        .ok()
}

/// Starts a zygote for `pool` (logged when ready), with the fingerprint of the Python
/// environment it starts from, read before it starts: a change made while it imports is seen
/// at the next check.
async fn launch(
    host: &Host,
    key: &ZygoteKey,
    preload: &[String],
    warmup: &str,
    max_children: usize,
    image: Option<ImageRoot>,
    trust_gateway_ca: bool,
) -> (ampoule_session::Result<Zygote>, Option<EnvFingerprint>) {
    let pool = key.pool.as_str();
    let env = env_fingerprint(pool);
    let begun = Instant::now();
    let started = ampoule_session::zygote::start_python_with(
        host,
        preload,
        warmup,
        max_children as u64,
        image.as_ref(),
        trust_gateway_ca,
    )
    .await;
    if let Ok(z) = &started {
        let info = z.info();
        tracing::info!(
            pool,
            tenant = %key.tenant,
            runtime = %info.runtime,
            preloaded = ?info.preloaded,
            failed = ?info.failed,
            ms = begun.elapsed().as_millis() as u64,
            huge_mib = info.huge_mib,
            hot_kib = info.hot_kib,
            holes_kib = info.holes_kib,
            immortal = info.immortal,
            "zygote ready"
        );
        if info.threads != 1 {
            // fork() copies only the calling thread: the others' locks stay taken.
            tracing::warn!(
                pool,
                threads = info.threads,
                "the zygote has more than one thread; a package started one"
            );
        }
    }
    (started, env)
}

/// Starts interpreter sessions in sandboxes on `host`.
#[derive(Debug)]
pub struct SessionEngine {
    host: Arc<Host>,
    egress: Option<Egress>,
    zygotes: std::sync::Mutex<HashMap<ZygoteKey, Arc<Mutex<PoolZygote>>>>,
}

/// Whose zygote: a pool's, for one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ZygoteKey {
    pool: String,
    tenant: String,
}

/// Why a session is not forked.
#[derive(Debug)]
enum NoZygote {
    /// The tenant's zygote is starting (in the background); the session starts cold.
    Starting,
    /// The pool already runs its most zygotes, for other tenants.
    Full,
    /// It cannot be had (logged as a warning).
    Failed(String),
}

/// One tenant's zygote of a pool: the current one, and its figures.
#[derive(Debug, Default)]
struct PoolZygote {
    current: Option<Zygote>,
    /// When `current` last forked (or started): what lets an idle one go.
    last_used: Option<Instant>,
    /// Its cgroup's memory (MiB) and process budget.
    budget: (u64, u64),
    /// The Python environment `current` started from.
    env: Option<EnvFingerprint>,
    /// When `env` was last compared with the environment on disk.
    env_checked: Option<Instant>,
    /// Shared with the sessions `current` forks; set when it is replaced because its packages
    /// changed, so that those still waiting in warm stock are not handed out.
    outdated: Arc<AtomicBool>,
    replacing: bool,
    failed_at: Option<Instant>,
    started: u64,
    forks: u64,
    fork_failures: u64,
}

impl PoolZygote {
    /// Makes a freshly started zygote the current one (or notes that it failed).
    fn install(
        &mut self,
        started: ampoule_session::Result<Zygote>,
        env: Option<EnvFingerprint>,
        key: &ZygoteKey,
    ) -> Option<(Zygote, Arc<AtomicBool>)> {
        match started {
            Ok(z) => {
                self.failed_at = None;
                self.started += 1;
                self.current = Some(z.clone());
                self.last_used = Some(Instant::now());
                self.env = env;
                self.outdated = Arc::default();
                Some((z, self.outdated.clone()))
            }
            Err(e) => {
                self.failed_at = Some(Instant::now());
                tracing::warn!(pool = %key.pool, tenant = %key.tenant, error = %chain(&e), "the zygote did not start");
                None
            }
        }
    }

    /// Whether the Python environment on disk (`on_disk`, normally
    /// [`ampoule_session::zygote::python_env_fingerprint`]) differs from the one the current
    /// zygote started from; false without looking when it was compared less than
    /// [`ENV_CHECK_EVERY`] ago, or when either cannot be read.
    fn packages_changed(
        &mut self,
        pool: &str,
        on_disk: impl FnOnce() -> ampoule_session::Result<EnvFingerprint>,
    ) -> bool {
        if self
            .env_checked
            .is_some_and(|t| t.elapsed() < ENV_CHECK_EVERY)
        {
            return false;
        }
        self.env_checked = Some(Instant::now());
        let Some(started_from) = &self.env else {
            return false;
        };
        match on_disk() {
            Ok(now) => now != *started_from,
            Err(e) => {
                tracing::debug!(pool, error = %chain(&e), "cannot fingerprint the Python environment");
                false
            }
        }
    }
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

    /// The entry of `key`'s zygote (made empty when missing), or `None` when the pool has
    /// [`MAX_TENANT_ZYGOTES`] zygotes of other tenants. Idle zygotes of the pool's other
    /// tenants are let go on the way (not the sole tenant's).
    fn pool_zygote(&self, key: &ZygoteKey, sole: Option<&str>) -> Option<Arc<Mutex<PoolZygote>>> {
        let mut map = self
            .zygotes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = map.get(key) {
            return Some(entry.clone());
        }
        let mut running = 0;
        for (k, entry) in map.iter() {
            if k.pool != key.pool {
                continue;
            }
            // A zygote that is starting or forking is busy, not idle.
            let Ok(mut g) = entry.try_lock() else {
                running += 1;
                continue;
            };
            let idle = g.last_used.is_some_and(|t| t.elapsed() >= ZYGOTE_IDLE);
            if idle && !g.replacing && Some(k.tenant.as_str()) != sole {
                // Its sessions keep it alive until they end.
                g.current = None;
                g.last_used = None;
                tracing::info!(pool = %k.pool, tenant = %k.tenant, "idle zygote let go");
            }
            if g.current.is_some() || g.replacing {
                running += 1;
            }
        }
        if running >= MAX_TENANT_ZYGOTES {
            return None;
        }
        Some(map.entry(key.clone()).or_default().clone())
    }

    /// `key`'s running zygote, started when there is none (or it died): here, when
    /// `wait`, else in the background (the caller starts its session cold meanwhile). A zygote
    /// due for recycling keeps serving while its replacement starts in the background.
    /// Returns it with its [`PoolZygote::outdated`] flag and its entry (for the figures).
    async fn zygote(
        &self,
        spec: &PoolSpec,
        key: &ZygoteKey,
        preload: &[String],
        wait: bool,
    ) -> Result<(Zygote, Arc<AtomicBool>, Arc<Mutex<PoolZygote>>), NoZygote> {
        let entry = self
            .pool_zygote(key, spec.sole_tenant())
            .ok_or(NoZygote::Full)?;
        let mut g = entry.lock().await;
        g.last_used = Some(Instant::now());
        g.budget = ampoule_session::zygote::zygote_budget(spec.zygote_children() as u64);
        if let Some(z) = g.current.clone() {
            if z.is_alive() {
                let reason = if g.replacing {
                    None
                } else {
                    let changed = g.packages_changed(
                        &spec.name,
                        ampoule_session::zygote::python_env_fingerprint,
                    );
                    recycle_reason(z.forks(), z.age(), changed)
                };
                if let Some(reason) = reason {
                    g.replacing = true;
                    let (entry, host, preload) =
                        (entry.clone(), self.host.clone(), preload.to_vec());
                    let (key, budget) = (key.clone(), spec.zygote_children());
                    let (image, warmup) = (image_root(spec), spec.warmup.clone());
                    let trust = trusts_gateway_ca(spec);
                    let pool = key.pool.clone();
                    let replaced = z.clone();
                    // A worker thread, which outlives the zygote (see ampoule_runtime::sandbox).
                    tokio::spawn(async move {
                        let (fresh, env) =
                            launch(&host, &key, &preload, &warmup, budget, image, trust).await;
                        let mut g = entry.lock().await;
                        g.replacing = false;
                        match fresh {
                            // The one it replaces died meanwhile and another was started on
                            // a request's way: that one stays, this one goes.
                            Ok(z) if g.current.as_ref().is_some_and(|c| !c.is(&replaced)) => {
                                drop(g);
                                z.close().await;
                            }
                            Ok(z) => {
                                g.started += 1;
                                g.current = Some(z);
                                g.env = env;
                                let old = std::mem::take(&mut g.outdated);
                                if reason == PACKAGES_CHANGED {
                                    old.store(true, Ordering::SeqCst);
                                }
                                tracing::info!(pool, tenant = %key.tenant, reason, "zygote recycled");
                            }
                            Err(e) => {
                                tracing::warn!(pool, reason, error = %chain(&e), "zygote recycling failed")
                            }
                        }
                    });
                }
                let outdated = g.outdated.clone();
                drop(g);
                return Ok((z, outdated, entry));
            }
            tracing::warn!(pool = %spec.name, tenant = %key.tenant, "zygote died; starting another");
            g.current = None;
        }
        if g.replacing {
            return Err(NoZygote::Starting);
        }
        if g.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return Err(NoZygote::Failed(
                "the zygote failed to start recently".into(),
            ));
        }
        if !wait {
            g.replacing = true;
            let (entry, host, preload) = (entry.clone(), self.host.clone(), preload.to_vec());
            let (key, budget) = (key.clone(), spec.zygote_children());
            let (image, warmup) = (image_root(spec), spec.warmup.clone());
            let trust = trusts_gateway_ca(spec);
            // A worker thread, which outlives the zygote (see ampoule_runtime::sandbox).
            tokio::spawn(async move {
                let (started, env) =
                    launch(&host, &key, &preload, &warmup, budget, image, trust).await;
                let mut g = entry.lock().await;
                g.replacing = false;
                g.install(started, env, &key);
            });
            return Err(NoZygote::Starting);
        }
        let (started, env) = launch(
            &self.host,
            key,
            preload,
            &spec.warmup,
            spec.zygote_children(),
            image_root(spec),
            trusts_gateway_ca(spec),
        )
        .await;
        let installed = g.install(started, env, key);
        drop(g);
        installed
            .map(|(z, outdated)| (z, outdated, entry))
            .ok_or_else(|| NoZygote::Failed("the zygote did not start".into()))
    }

    /// A session for `tenant` (`None`: warm stock) forked from its zygote, with the zygote's
    /// `outdated` flag, or `None` (with the reason logged) when it must start cold instead.
    async fn start_forked(
        &self,
        spec: &PoolSpec,
        tenant: Option<&str>,
        preload: &[String],
        network: Option<SessionNetwork>,
    ) -> Option<(Session, Arc<AtomicBool>)> {
        // Warm stock is forked only where it can go to one tenant alone.
        let key = ZygoteKey {
            pool: spec.name.clone(),
            tenant: tenant.or(spec.sole_tenant())?.to_owned(),
        };
        // A configured tenant's zygote started with the pool: wait for it if it is (re)starting
        // on this very call; anyone else's starts in the background.
        let known = spec.tenants.contains(&key.tenant);
        let (zygote, outdated, entry) = match self.zygote(spec, &key, preload, known).await {
            Ok(z) => z,
            Err(NoZygote::Failed(why)) => {
                tracing::warn!(pool = %spec.name, tenant = %key.tenant, %why, "no zygote: starting the session cold");
                return None;
            }
            Err(why) => {
                tracing::debug!(pool = %spec.name, tenant = %key.tenant, ?why, "no zygote yet: starting the session cold");
                return None;
            }
        };
        let image = image_root(spec);
        let outcome = Session::start_forked_with(
            &self.host,
            &zygote,
            spec.limits.clone(),
            image.as_ref(),
            network,
        )
        .await;
        let mut g = entry.lock().await;
        match outcome {
            Ok(session) => {
                g.forks += 1;
                Some((session, outdated))
            }
            Err(e) => {
                g.fork_failures += 1;
                tracing::warn!(pool = %spec.name, error = %chain(&e), "fork failed: starting the session cold");
                None
            }
        }
    }

    /// The egress service for a session of `spec`, a pool with a network.
    fn egress(&self, spec: &PoolSpec) -> Result<Egress, EngineError> {
        self.egress.clone().ok_or_else(|| {
            EngineError::Start(format!(
                "pool {} has a network policy but the server has no egress gateway",
                spec.name
            ))
        })
    }

    /// The egress service that serves the sessions of pools with a network (see
    /// [`crate::Config::egress`]); without one such pools cannot start sessions.
    pub fn with_egress(mut self, egress: Option<Egress>) -> Self {
        self.egress = egress;
        self
    }
}

/// The error with its causes, for the log (never sent to clients).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
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
        // The configured tenants' zygotes now (one at a time: each import takes a core).
        if let Some(preload) = &spec.zygote {
            for tenant in spec.tenants.iter().take(MAX_TENANT_ZYGOTES) {
                let key = ZygoteKey {
                    pool: spec.name.clone(),
                    tenant: tenant.clone(),
                };
                if let Err(why) = self.zygote(spec, &key, preload, true).await {
                    tracing::warn!(pool = %spec.name, %tenant, ?why, "no zygote: sessions start cold");
                }
            }
        }
    }

    fn zygotes(&self) -> Vec<ZygoteHealth> {
        self.health()
    }

    fn keeps_warm_stock(&self, spec: &PoolSpec) -> bool {
        // Warm stock is forked only where one tenant alone may get it (see `start_forked`).
        let forks = self.host.privileged && spec.zygote.is_some();
        !forks || spec.sole_tenant().is_some()
    }

    async fn start_durable(
        &self,
        spec: &PoolSpec,
        tenant: &str,
        disk: &std::path::Path,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        self.durable(spec, tenant, disk, None).await
    }

    async fn restore_durable(
        &self,
        spec: &PoolSpec,
        tenant: &str,
        disk: &std::path::Path,
        image: &std::path::Path,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        if !checkpointable(spec) {
            return Err(EngineError::Unsupported(
                "only sandboxes of the gvisor tier without network are restored from a \
                 checkpoint"
                    .into(),
            ));
        }
        self.durable(spec, tenant, disk, Some(image)).await
    }

    async fn start(
        &self,
        spec: &PoolSpec,
        tenant: Option<&str>,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        self.start_fresh(spec, tenant).await
    }
}

/// Whether the sessions of `spec` can be checkpointed with their memory: the gVisor tier's,
/// without network (see `ampoule_runtime::gvisor::checkpoint`).
fn checkpointable(spec: &PoolSpec) -> bool {
    spec.isolation == ampoule_runtime::Isolation::Gvisor && spec.network.is_none()
}

impl SessionEngine {
    /// A durable session on `disk`, restored from the checkpoint `image` when given.
    async fn durable(
        &self,
        spec: &PoolSpec,
        _tenant: &str,
        disk: &std::path::Path,
        image: Option<&std::path::Path>,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        ampoule_runtime::disk::check(self.host.privileged).map_err(EngineError::Unsupported)?;
        let (path, mib, inodes) = (
            disk.to_path_buf(),
            spec.limits.disk_mib,
            spec.limits.disk_inodes,
        );
        tokio::task::spawn_blocking(move || ampoule_runtime::disk::create(&path, mib, inodes))
            .await
            .map_err(|e| EngineError::Start(e.to_string()))?
            .map_err(|e| EngineError::Start(chain(&e)))?;
        // Always cold: a zygote's children cannot mount a disk of their own.
        let kernel = kernel(spec)?;
        let options = match &spec.network {
            Some(network) => {
                SessionOptions::with_network(self.egress(spec)?, network.policy.clone())
            }
            None => SessionOptions::default(),
        }
        .with_disk(disk);
        let options = match image {
            Some(image) => options.with_restore(image),
            None => options,
        };
        let session = Session::start_with(&self.host, kernel, spec.limits.clone(), options)
            .await
            .map_err(|e| EngineError::Start(chain(&e)))?;
        tracing::debug!(pool = %spec.name, disk = %disk.display(), restored = image.is_some(), "durable session started");
        live(session, spec, None)
    }

    async fn start_fresh(
        &self,
        spec: &PoolSpec,
        tenant: Option<&str>,
    ) -> Result<Box<dyn LiveSession>, EngineError> {
        let forked = match &spec.zygote {
            Some(preload) if self.host.privileged => {
                // A pool with a network: the child is wired to its own gateway, as a cold
                // session is (the zygote itself has none).
                let network = match &spec.network {
                    Some(network) => Some(SessionNetwork {
                        egress: self.egress(spec)?,
                        policy: network.policy.clone(),
                    }),
                    None => None,
                };
                self.start_forked(spec, tenant, preload, network).await
            }
            _ => None,
        };
        let (session, outdated) = match (forked, &spec.network) {
            (Some((session, outdated)), _) => (session, Some(outdated)),
            (None, None) => (
                Session::start(&self.host, kernel(spec)?, spec.limits.clone())
                    .await
                    .map_err(|e| EngineError::Start(chain(&e)))?,
                None,
            ),
            (None, Some(network)) => {
                let kernel = kernel(spec)?;
                let options =
                    SessionOptions::with_network(self.egress(spec)?, network.policy.clone());
                let session = Session::start_with(&self.host, kernel, spec.limits.clone(), options)
                    .await
                    .map_err(|e| EngineError::Start(chain(&e)))?;
                (session, None)
            }
        };
        tracing::debug!(pool = %spec.name, runtime = session.runtime(), "session started");
        live(session, spec, outdated)
    }
}

/// How to start the kernel of `spec`'s sessions: the host's runtime, or the interpreter in the
/// pool's image.
fn kernel(spec: &PoolSpec) -> Result<ampoule_session::LanguageSpec, EngineError> {
    match image_root(spec) {
        Some(image) => {
            ampoule_session::language::image::locate(spec.language, &image, &spec.limits)
        }
        None => ampoule_session::language::find(spec.language.as_str())
            .and_then(|k| k.locate(&spec.limits)),
    }
    .map(|mut kernel| {
        // The tier and the root are the runtime's business: the session only passes them on.
        kernel.isolation = spec.isolation;
        kernel.writable_root = spec.image.as_ref().is_some_and(|i| i.writable_root);
        kernel
    })
    .map_err(|e| EngineError::Start(chain(&e)))
}

/// Whether the children of `spec`'s zygotes trust the egress gateway's CA: its network policy
/// injects credentials, so the gateway terminates TLS (as [`Egress::trusted_ca_pem`] decides
/// for every session).
fn trusts_gateway_ca(spec: &PoolSpec) -> bool {
    spec.network.as_ref().is_some_and(|n| n.policy.injects())
}

/// The image root of a pool from an image.
fn image_root(spec: &PoolSpec) -> Option<ImageRoot> {
    spec.image.as_ref().map(|image| ImageRoot {
        name: image.name.clone(),
        root: image.root.clone(),
        env: image.env.clone(),
    })
}

/// The live session of a started interpreter session.
fn live(
    session: Session,
    spec: &PoolSpec,
    outdated: Option<Arc<AtomicBool>>,
) -> Result<Box<dyn LiveSession>, EngineError> {
    let scratch = session
        .scratch()
        .try_clone()
        .map_err(|e| EngineError::Start(chain(&e)))?;
    let entrance = session.entrance();
    Ok(Box::new(LiveInterpreter {
        entrance: std::sync::Mutex::new(entrance),
        limits: spec.limits.clone(),
        image: image_root(spec),
        freezer: session.freezer(),
        checkpointable: checkpointable(spec),
        session: Mutex::new(Some(session)),
        scratch: std::sync::Mutex::new(Some(Arc::new(scratch))),
        alive: AtomicBool::new(true),
        closed: AtomicBool::new(false),
        closing: Notify::new(),
        outdated,
    }))
}

impl LiveInterpreter {
    fn entrance(&self) -> Result<ampoule_runtime::Entrance, EngineError> {
        self.entrance
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .filter(ampoule_runtime::Entrance::alive)
            .ok_or(EngineError::Closed)
    }
}

impl SessionEngine {
    fn health(&self) -> Vec<ZygoteHealth> {
        let map = self
            .zygotes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // One line per pool, over its tenants' zygotes.
        let mut pools: std::collections::BTreeMap<&str, ZygoteHealth> = Default::default();
        for (key, entry) in map.iter() {
            // Never wait for a zygote that is starting: report it next time.
            let Ok(g) = entry.try_lock() else { continue };
            let h = pools.entry(&key.pool).or_insert_with(|| ZygoteHealth {
                pool: key.pool.clone(),
                ..ZygoteHealth::default()
            });
            let up = g.current.as_ref().is_some_and(Zygote::is_alive);
            h.up |= up;
            h.running += u64::from(up);
            h.memory_budget_bytes = h.memory_budget_bytes.max(g.budget.0 << 20);
            h.pids_budget = h.pids_budget.max(g.budget.1);
            h.forks += g.forks;
            h.fork_failures += g.fork_failures;
            h.restarts += g.started.saturating_sub(1);
        }
        pools.into_values().collect()
    }
}

/// One interpreter session.
struct LiveInterpreter {
    /// The way into its sandbox for processes, contexts and ports (`None` once closed).
    entrance: std::sync::Mutex<Option<ampoule_runtime::Entrance>>,
    /// The pool's limits (a context's execution timeout default).
    limits: ampoule_types::Limits,
    /// The pool's image, whose interpreters the sandbox's contexts run (`None`: the host's).
    image: Option<ImageRoot>,
    /// Its sandbox's cgroup, to pause and resume it (`None` without cgroups).
    freezer: Option<ampoule_runtime::cgroup::Cgroup>,
    /// Whether its memory can be checkpointed (see [`checkpointable`]).
    checkpointable: bool,
    session: Mutex<Option<Session>>,
    scratch: std::sync::Mutex<Option<Arc<Scratch>>>,
    alive: AtomicBool,
    closed: AtomicBool,
    closing: Notify,
    /// The `outdated` flag of the zygote it was forked from (none when started cold).
    outdated: Option<Arc<AtomicBool>>,
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
        if !self.alive.load(Ordering::SeqCst) {
            return false;
        }
        // A kernel that died between executions is noticed here (by the manager's reaper,
        // which then drops the session from its pool), not by the next caller. A session in
        // use is alive as far as this can tell.
        match self.session.try_lock() {
            Ok(guard) => guard.as_ref().is_none_or(Session::is_alive),
            Err(_) => true,
        }
    }

    fn outdated(&self) -> bool {
        self.outdated
            .as_ref()
            .is_some_and(|o| o.load(Ordering::SeqCst))
    }

    fn forked(&self) -> bool {
        self.outdated.is_some()
    }

    fn label(&self, session: &str, execution: &str) {
        // Called between executions, so the lock is free (unless the session is closing).
        if let Ok(guard) = self.session.try_lock()
            && let Some(gateway) = guard.as_ref().and_then(Session::egress)
        {
            gateway.set_context(session, execution);
        }
    }

    async fn spawn(
        &self,
        req: ampoule_core::ProcessRequest,
    ) -> Result<ampoule_core::LiveProcess, EngineError> {
        crate::inside::spawn(&self.entrance()?, req).await
    }

    async fn open_context(
        &self,
        language: ampoule_types::Language,
        cwd: Option<String>,
        env: Vec<(String, String)>,
    ) -> Result<Box<dyn ampoule_core::LiveContext>, EngineError> {
        crate::inside::open_context(
            &self.entrance()?,
            language,
            self.limits.clone(),
            self.image.as_ref(),
            cwd,
            env,
        )
        .await
    }

    async fn connect(&self, port: u16) -> Result<tokio::net::TcpStream, EngineError> {
        crate::inside::connect(&self.entrance()?, port).await
    }

    fn command_env(&self) -> Vec<(String, String)> {
        ampoule_session::command_env(&[])
    }

    fn cpu_ns(&self) -> Option<u64> {
        self.freezer.as_ref().and_then(|f| f.stats().cpu_ns)
    }

    fn pause(&self) -> Result<(), EngineError> {
        let f = self.freezer.as_ref().ok_or_else(|| {
            EngineError::Unsupported("this server cannot pause a sandbox (no cgroups)".into())
        })?;
        f.freeze().map_err(|e| EngineError::Start(chain(&e)))
    }

    fn resume(&self) -> Result<(), EngineError> {
        let f = self.freezer.as_ref().ok_or_else(|| {
            EngineError::Unsupported("this server cannot pause a sandbox (no cgroups)".into())
        })?;
        f.thaw().map_err(|e| EngineError::Start(chain(&e)))
    }

    async fn checkpoint(&self, image: &std::path::Path) -> Result<(), EngineError> {
        if !self.checkpointable {
            return Err(EngineError::Unsupported(
                "only sandboxes of the gvisor tier without network keep their memory when \
                 they hibernate"
                    .into(),
            ));
        }
        let mut guard = self.session.lock().await;
        let Some(session) = guard.as_mut() else {
            return Err(EngineError::Closed);
        };
        let begun = Instant::now();
        session
            .checkpoint(image)
            .await
            .map_err(|e| EngineError::Execute(chain(&e)))?;
        // Its sandbox stopped once its memory was written.
        self.alive.store(false, Ordering::SeqCst);
        tracing::debug!(
            ms = begun.elapsed().as_secs_f64() * 1000.0,
            "sandbox checkpointed"
        );
        Ok(())
    }

    async fn close(&self) {
        // A frozen kernel would never answer its goodbye.
        if let Some(f) = &self.freezer
            && f.frozen()
        {
            let _ = f.thaw();
        }
        self.alive.store(false, Ordering::SeqCst);
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut e) = self.entrance.lock() {
            e.take();
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use ampoule_session::setup::PythonEnv;

    #[test]
    fn zygotes_are_recycled_for_forks_age_and_changed_packages() {
        let young = Duration::from_secs(5);
        assert_eq!(recycle_reason(0, young, false), None);
        assert_eq!(recycle_reason(RECYCLE_FORKS - 1, young, false), None);
        assert_eq!(recycle_reason(RECYCLE_FORKS, young, false), Some("forks"));
        assert_eq!(recycle_reason(3, RECYCLE_AGE, false), Some("age"));
        assert_eq!(recycle_reason(0, young, true), Some("packages changed"));
        // The most telling reason wins.
        assert_eq!(
            recycle_reason(RECYCLE_FORKS, RECYCLE_AGE, true),
            Some("packages changed")
        );
        assert_eq!(
            recycle_reason(RECYCLE_FORKS, RECYCLE_AGE, false),
            Some("forks")
        );
    }

    #[test]
    fn a_pool_notices_new_packages_at_most_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let env = PythonEnv::at(dir.path().join("python"));
        let site = env.dir().join("lib/python3.11/site-packages");
        std::fs::create_dir_all(&site).unwrap();
        let mut pool = PoolZygote {
            env: Some(env.fingerprint().unwrap()),
            ..PoolZygote::default()
        };
        assert!(!pool.packages_changed("p", || env.fingerprint()));
        std::fs::create_dir(site.join("fakepkg-1.0.dist-info")).unwrap();
        // Compared a moment ago: not looked at again yet.
        assert!(!pool.packages_changed("p", || panic!("looked before its time")));
        pool.env_checked = Instant::now().checked_sub(ENV_CHECK_EVERY);
        assert!(pool.packages_changed("p", || env.fingerprint()));
        // Unreadable or unknown environments never recycle a zygote.
        pool.env_checked = None;
        assert!(!pool.packages_changed("p", || {
            Err(ampoule_session::Error::Lost("unreadable".into()))
        }));
        pool.env = None;
        pool.env_checked = None;
        assert!(!pool.packages_changed("p", || env.fingerprint()));
    }
}
