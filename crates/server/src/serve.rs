//! `ampoule serve`: builds the state from the config, listens (HTTP or HTTPS), and shuts
//! down gracefully.
//!
//! Start: orphaned sandboxes of an earlier run are swept, warm pools start filling, and when
//! no key is configured a key is generated on first start and shown once. What the operator
//! must see (that key, the address, the shutdown) goes out as a [`Notice`]: this library
//! prints nothing, the CLI's printer does. Stop (SIGTERM or
//! SIGINT): a drain first (`/readyz` answers 503 at once, no session or sandbox starts — 503
//! `shutting_down` — while the sessions held are served and their running executions get up
//! to `[server] drain_timeout_s` to finish), then new connections are refused, every session
//! is closed (durable sandboxes hibernated; running executions end), in-flight responses get
//! a short grace period, and nothing of any session is left on the host.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Keys;
use crate::auth::keyfile::{self, KeyFile};
use crate::config::{self, Config};
use crate::engine::Engine;
use crate::error::Error;
use crate::listener::Door;
use crate::{AppState, app};
use ampoule_core::{Manager, TenantLimits};

/// How long in-flight responses may take once shutdown has begun.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What `ampoule serve` has to tell its operator, in the order it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// No key is configured, so one was generated: the operator must keep it, as it is shown
    /// only this once (its SHA-256 is in `digest_file`).
    GeneratedKey {
        /// The key itself.
        key: String,
        /// The tenant it belongs to.
        tenant: &'static str,
        /// Where its digest is kept.
        digest_file: PathBuf,
    },
    /// No key is configured; the one generated on an earlier start is in use.
    UsingGeneratedKey {
        /// Where its digest is kept.
        digest_file: PathBuf,
    },
    /// `/metrics` is served, without a key, on its own listener.
    Metrics {
        /// Its address.
        addr: String,
    },
    /// The API is served.
    Listening {
        /// `http://…` or `https://…`, with the port actually bound.
        url: String,
        /// Every pool's name.
        pools: Vec<String>,
        /// The pool used when a request names none.
        default_pool: String,
    },
    /// SIGTERM or SIGINT arrived: draining (no new session), then every session is closed.
    ShuttingDown,
}

/// Where [`Notice`]s go (the CLI prints them).
pub type Notify = Arc<dyn Fn(Notice) + Send + Sync>;

/// The API keys the config names. Refuses a config that names none: a key generated then
/// would never be shown ([`keys_noting`] generates and announces one).
pub fn keys(cfg: &Config) -> Result<Keys, Error> {
    if cfg.key_digests()?.is_empty() {
        return Err(Error::Config(
            "no [[auth.keys]] configured (keys_noting generates one)".into(),
        ));
    }
    keys_noting(cfg, &|_| {})
}

/// Resolves the API keys: the configured ones, else the generated one, announced to `notify`;
/// and the keys file's.
pub fn keys_noting(cfg: &Config, notify: &dyn Fn(Notice)) -> Result<Keys, Error> {
    let mut pairs = cfg.key_digests()?;
    if pairs.is_empty() {
        let dir = cfg.data_dir();
        let (digest, new_key) = config::generated_key(&dir)?;
        let digest_file = dir.join(config::GENERATED_KEY_FILE);
        notify(match new_key {
            Some(key) => Notice::GeneratedKey {
                key,
                tenant: config::GENERATED_TENANT,
                digest_file,
            },
            None => Notice::UsingGeneratedKey { digest_file },
        });
        pairs.push((digest, config::GENERATED_TENANT.to_owned()));
    }
    let mut keys = Keys::with_throttle(pairs, cfg.max_auth_failures());
    keys.set_approvers(&cfg.approver_digests()?);
    keys.reload(KeyFile::load(&cfg.keys_file())?.entries());
    Ok(keys)
}

/// Reads the keys file again whenever it changes (checked every second), so that keys added,
/// rotated or revoked by `ampoule keys` apply without a restart. A file that cannot be read
/// keeps the keys in use (and says why in the log).
pub fn watch_keys(path: PathBuf, keys: Arc<Keys>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = keyfile::stamp(&path);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = keyfile::stamp(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match KeyFile::load(&path) {
                Ok(file) => {
                    keys.reload(file.entries());
                    tracing::info!(keys = keys.len(), file = %path.display(), "keys file read again");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the keys file was not read; the keys in use stay")
                }
            }
        }
    })
}

/// Builds the manager and state for a config and an engine.
pub fn state(cfg: &Config, engine: Arc<dyn Engine>, keys: Keys) -> Result<AppState, Error> {
    let pools = cfg.pool_settings().map_err(Error::Config)?;
    let default_pool = cfg.default_pool().map_err(Error::Config)?;
    let tenants = TenantLimits {
        default: cfg
            .quotas
            .max_sessions
            .or(cfg.server.max_sessions_per_tenant),
        quotas: Arc::new(cfg.quotas()),
        per_tenant: cfg
            .tenants
            .iter()
            .filter_map(|(t, c)| c.max_sessions.map(|m| (t.clone(), m)))
            .collect(),
    };
    let metrics = crate::metrics::Metrics::new();
    let manager = Manager::new(
        engine,
        pools,
        default_pool,
        tenants,
        Arc::new(metrics.clone()),
    );
    {
        let door = metrics.door().clone();
        let manager = manager.clone();
        keys.on_event(move |e| {
            door.auth(&e);
            if let crate::auth::AuthEvent::Throttled {
                by,
                client,
                first: true,
                request_id,
                ..
            } = e
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                let manager = manager.clone();
                rt.spawn(async move {
                    manager
                        .refused_at_door(
                            ampoule_core::ErrorCode::AuthThrottled,
                            by,
                            client.map(|c| c.to_string()),
                            request_id,
                        )
                        .await;
                });
            }
        });
    }
    manager.set_approval_hook(Arc::new(|url: &str, body: serde_json::Value| {
        let url = url.to_owned();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = post_json(&url, &body).await {
                    tracing::warn!(url = %url, error = %e, "the approval webhook was not told");
                }
            });
        }
    }));
    Ok(AppState {
        manager,
        metrics,
        keys: Arc::new(keys),
        max_upload: cfg.max_upload_bytes(),
        mcp_allowed_hosts: cfg.mcp_allowed_hosts(),
        e2b: crate::e2b::door(cfg.e2b.domain.as_deref()),
    })
}

/// `ampoule serve`: sweeps orphaned sandboxes, starts the real engine, serves until SIGTERM
/// or SIGINT. Must run on a multi-thread runtime (sandboxes die with the thread that spawned
/// them; worker threads live as long as the runtime).
pub async fn serve(cfg: Config, listen: Option<String>, notify: Notify) -> Result<(), Error> {
    let pools = cfg.pool_settings().map_err(Error::Config)?;
    // A pool whose runtime is missing would fail every session: say so now. (An image
    // pool's interpreter is the image's, checked when the config resolved the image.)
    for (name, p) in pools.iter().filter(|(_, p)| p.spec.image.is_none()) {
        ampoule_session::language::find(p.spec.language.as_str())
            .and_then(|k| k.locate(&p.spec.limits))
            .map_err(|e| Error::Config(format!("pool {name}: {e}")))?;
    }
    let keys = keys_noting(&cfg, notify.as_ref())?;
    let host = ampoule_runtime::Host::detect().map_err(Error::Host)?;
    let swept = host.sweep_orphans();
    if swept > 0 {
        tracing::info!(swept, "removed orphaned sandboxes of an earlier run");
    }
    // Pools with a network need the veth pairs and firewall table only real root can make.
    if let Some((name, _)) = pools.iter().find(|(_, p)| p.spec.network.is_some())
        && !host.privileged
    {
        return Err(Error::Config(format!(
            "pools.{name}.network: network allowlists need ampoule to run as root (unprivileged \
             sandboxes have loopback only); run as root, or remove `allow`"
        )));
    }
    let egress = cfg.egress()?;
    let engine = Arc::new(
        crate::session_engine::SessionEngine::new(Arc::new(host)).with_egress(egress.clone()),
    );
    let state = state(&cfg, engine, keys)?;
    if let Some(egress) = &egress {
        // Connections held by `on_egress` approval rules wait for the manager's approvers.
        // (The gateway and the manager then hold each other for the life of the process.)
        egress.set_approver(Arc::new(EgressApprovals(state.manager.clone())));
    }
    serve_noting(&cfg, listen.as_deref(), state, signal(), notify).await
}

/// An error and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(&format!(": {s}"));
        next = s.source();
    }
    out
}

/// The audit store's URL: `[audit] url`, else SQLite in the data directory.
pub fn audit_url(cfg: &Config) -> String {
    cfg.audit
        .url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", cfg.data_dir().join("audit.db").display()))
}

/// Opens the audit store, hands its writer to the manager (with each pool's `[audit]` /
/// `[pools.NAME.audit]` policy) and starts pruning past the retention once an hour (see
/// [`prune_audit`]). Returns the writer task, which ends when the manager is gone.
pub async fn audit(cfg: &Config, manager: &Manager) -> Result<tokio::task::JoinHandle<()>, Error> {
    let url = audit_url(cfg);
    if cfg.audit.url.is_none() {
        std::fs::create_dir_all(cfg.data_dir())
            .map_err(|e| Error::io("creating the data directory", e))?;
        private_db(&cfg.data_dir().join("audit.db"))?;
    }
    let store = ampoule_audit::SqlStore::open(&url)
        .await
        .map_err(|e| Error::Config(format!("opening the audit store: {}", chain(&e))))?;
    let store: Arc<dyn ampoule_audit::AuditStore> = Arc::new(store);
    let (writer, task) = ampoule_audit::Writer::spawn(store.clone(), 16_384);
    let defaults = cfg.audit_policy("");
    let pools = cfg.pool_settings().map_err(Error::Config)?;
    manager.set_audit(ampoule_core::Audit {
        writer,
        store: store.clone(),
        keep_code: defaults.keep_code,
        output_bytes: defaults.output_bytes,
        per_pool: pools
            .keys()
            .map(|p| (p.clone(), cfg.audit_policy(p)))
            .collect(),
    });
    let cfg = cfg.clone();
    // Lives as long as the runtime, holding only the store (not the manager).
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            match prune_audit(&cfg, store.as_ref(), std::time::SystemTime::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "pruned audit records past retention"),
                Err(e) => tracing::warn!(error = %e, "audit pruning failed"),
            }
        }
    });
    Ok(task)
}

/// Opens the durable sandboxes' store, `<data_dir>/sandboxes` (made, mode 0700, when
/// missing), and hands it to the manager, which reads back the sandboxes recorded there as
/// hibernated. Returns how many (0 when the manager had a store already).
pub fn durable_store(cfg: &Config, manager: &Manager) -> Result<usize, Error> {
    let dir = cfg.data_dir().join("sandboxes");
    let store = ampoule_core::lifecycle::Store::open(&dir).map_err(|e| {
        Error::io(
            format!("opening {}", dir.display()),
            std::io::Error::other(e),
        )
    })?;
    Ok(manager.set_store(store))
}

/// Makes the SQLite audit database readable by its owner only (it holds every tenant's code
/// and output): created empty with mode 0600 when missing, tightened when it exists. SQLite
/// gives its `-wal` and `-shm` files the database's mode.
fn private_db(path: &std::path::Path) -> Result<(), Error> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    for suffix in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(format!("restricting {}", p.display()), e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes the audit records past their retention at `now`: each pool's
/// `[pools.NAME.audit] retention_days`, else `[audit] retention_days` (default 90). Only a
/// prefix of the hash chain can go (so `ampoule audit verify` keeps passing): a record is
/// never removed before its retention, and may be kept longer while an older record of a
/// pool with a longer retention is still there.
pub async fn prune_audit(
    cfg: &Config,
    store: &dyn ampoule_audit::AuditStore,
    now: std::time::SystemTime,
) -> Result<u64, ampoule_audit::Error> {
    let cutoff = |days: u64| {
        now.checked_sub(Duration::from_secs(days.saturating_mul(86_400)))
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    };
    let default = cutoff(cfg.audit_policy("").retention_days);
    let per_pool: Vec<(String, i64)> = cfg
        .pools
        .keys()
        .map(|p| (p.clone(), cutoff(cfg.audit_policy(p).retention_days)))
        .filter(|(_, c)| *c != default)
        .collect();
    store.prune_retention(default, &per_pool).await
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Serves `state` on `listen` until `stop` resolves, then closes every session.
pub async fn serve_with(
    cfg: &Config,
    listen: Option<&str>,
    state: AppState,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    serve_noting(cfg, listen, state, stop, Arc::new(|_| {})).await
}

/// [`serve_with`], telling `notify` where it listens and when it shuts down.
pub async fn serve_noting(
    cfg: &Config,
    listen: Option<&str>,
    state: AppState,
    stop: impl Future<Output = ()> + Send + 'static,
    notify: Notify,
) -> Result<(), Error> {
    let addr = listen
        .map(str::to_owned)
        .or_else(|| cfg.server.listen.clone())
        .unwrap_or_else(|| config::DEFAULT_LISTEN.to_owned());
    // Every session a pool may hold, every connection the door may take, and room for the
    // audit store, the egress gateways and the runtime.
    let sessions: u64 = cfg.pools.values().map(|p| p.max_sessions as u64).sum();
    let connections = cfg.door_limits()?.max_connections as u64;
    crate::listener::raise_open_files(
        sessions * crate::listener::FILES_PER_SESSION + connections + 1024,
    );
    let tcp = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::io(format!("listening on {addr}"), e))?;
    let local = tcp
        .local_addr()
        .map_err(|e| Error::io("reading the listen address", e))?;
    let manager = state.manager.clone();
    // Every embedding audits: open the store unless the caller has already.
    if manager.audit().is_none() {
        audit(cfg, &manager).await?;
    }
    // Durable sandboxes live under the data directory; those of an earlier run are listed
    // (hibernated) before the first request. A later call is a no-op.
    let read_back = durable_store(cfg, &manager)?;
    if read_back > 0 {
        tracing::info!(
            sandboxes = read_back,
            "hibernated sandboxes of an earlier run read back"
        );
    }
    let limits = cfg.door_limits()?.within_open_files();
    let drain_timeout = cfg.drain_timeout()?;
    // Base64 makes an MCP upload a third larger; JSON-RPC adds a little.
    let mcp_body =
        usize::try_from(state.max_upload.saturating_mul(4) / 3 + 64 * 1024).unwrap_or(usize::MAX);
    let cluster = cfg
        .cluster()?
        .map(|c| Arc::new(c.with_manager(state.manager.clone(), mcp_body)));
    if let Some(c) = &cluster {
        state
            .manager
            .set_replica(&c.token)
            .map_err(|e| Error::Config(format!("cluster.replica: {e}")))?;
        tracing::info!(replica = %c.replica, "a replica of a cluster");
        tokio::spawn(c.clone().poll_loads());
    }
    let door_metrics = state.metrics.door().clone();
    let keys_watcher = watch_keys(cfg.keys_file(), state.keys.clone());
    let metrics_listener = match &cfg.metrics.listen {
        Some(addr) => {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("listening on {addr} ([metrics] listen)"), e))?;
            let door = Door::new("metrics", limits.clone(), door_metrics.clone());
            let m = manager.clone();
            let metrics = state.metrics.clone();
            let router = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let m = m.clone();
                    let metrics = metrics.clone();
                    async move { crate::metrics::response(&metrics, &m) }
                }),
            );
            notify(Notice::Metrics { addr: addr.clone() });
            Some(tokio::spawn(door.serve(
                tcp,
                None,
                router,
                std::future::pending(),
            )))
        }
        None => None,
    };
    manager.start_background();
    let pools: Vec<String> = manager.pools().into_iter().map(|p| p.name).collect();
    let router = match cluster {
        Some(c) => app(state).layer(axum::middleware::from_fn_with_state(
            c,
            crate::cluster::route,
        )),
        None => app(state),
    };
    let signalled = Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let manager = manager.clone();
        let signalled = signalled.clone();
        let notify = notify.clone();
        async move {
            stop.await;
            notify(Notice::ShuttingDown);
            // Drain: readiness false at once, no session starts, the held ones are served
            // (connections stay open) while their running executions finish.
            manager.drain();
            let busy = manager.busy_sessions();
            if busy > 0 {
                tracing::info!(busy, timeout_s = drain_timeout.as_secs_f64(), "draining");
                if !manager.wait_idle(drain_timeout).await {
                    tracing::warn!(
                        busy = manager.busy_sessions(),
                        "executions still running at the drain timeout are ended"
                    );
                }
            }
            signalled.notify_one();
            manager.shutdown().await;
        }
    };
    let grace = {
        let signalled = signalled.clone();
        async move {
            signalled.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    };
    let tls = match (&cfg.server.tls_cert, &cfg.server.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::load(cert, key)?),
        (None, None) => None,
        _ => {
            return Err(Error::Config(
                "server.tls_cert and server.tls_key go together".into(),
            ));
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    notify(Notice::Listening {
        url: format!("{scheme}://{local}"),
        pools,
        default_pool: manager.default_pool().to_owned(),
    });
    let door = Door::new("api", limits, door_metrics);
    tokio::select! {
        () = door.serve(tcp, tls, router, shutdown) => {}
        () = grace => {}
    }
    keys_watcher.abort();
    // Sessions started while the last responses were written are closed too.
    manager.shutdown().await;
    if let Some(task) = metrics_listener {
        task.abort();
    }
    // The session events of the shutdown are written before we return.
    if let Some(a) = manager.audit()
        && tokio::time::timeout(SHUTDOWN_GRACE, a.writer.flush())
            .await
            .is_err()
    {
        tracing::warn!("the audit writer did not finish in time");
    }
    Ok(())
}

/// POSTs `body` as JSON to an `http://` URL (approval webhooks), within ten seconds.
/// Hand-written over hyper's connection API: one request, no pool, no TLS, and no client
/// crate to pull in for it.
pub async fn post_json(url: &str, body: &serde_json::Value) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let work = async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = axum::http::Request::post(path)
            .header(axum::http::header::HOST, authority)
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// The manager as the egress gateways' approver (`[pools.X.approval] mode = "on_egress"`).
struct EgressApprovals(Manager);

impl ampoule_egress::EgressApprover for EgressApprovals {
    fn approve(
        &self,
        session: String,
        execution: String,
        host: String,
        port: u16,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
        let manager = self.0.clone();
        Box::pin(async move {
            manager
                .approve_egress(&session, &execution, &host, port)
                .await
        })
    }
}
