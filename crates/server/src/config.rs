//! The server's TOML configuration (PRODUCT.md §3) and where its defaults come from.
//!
//! Invariants: unknown keys are errors (a typo never silently becomes a default); API keys are
//! only ever held as SHA-256 hex digests, whether they come from the file, from an environment
//! variable, or from the key generated on first start (whose digest is stored in the data
//! directory and whose clear text is printed once and never again).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use ampoule_types::{Language, Limits};
use serde::Deserialize;
use sha2::Digest;

use crate::engine::{PoolNetwork, PoolSpec};
use crate::error::Error;

/// The address the server listens on when neither the config nor `--listen` says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Seconds running executions get to finish at shutdown unless `[server] drain_timeout_s` says.
pub const DEFAULT_DRAIN_TIMEOUT_S: f64 = 30.0;

/// The hosts `/mcp` accepts by default (DNS-rebinding protection): loopback only.
pub const DEFAULT_ALLOWED_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The whole config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[auth]`.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[pools.NAME]`; none configured means one default `python` pool.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    /// `[tenants.NAME]`: per-tenant overrides of `[quotas]`.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// `[quotas]`: the quotas and policy of every tenant, unless `[tenants.NAME]` says
    /// otherwise (field by field).
    #[serde(default)]
    pub quotas: TenantConfig,
    /// `[metrics]`: `GET /metrics`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[egress]`: settings of the egress gateway shared by every pool with a network.
    #[serde(default)]
    pub egress: EgressConfig,
    /// `[audit]` (the audit log is a later issue; accepted so documented configs load).
    #[serde(default)]
    pub audit: AuditConfig,
    /// `[mcp]`: the MCP endpoint `/mcp`.
    #[serde(default)]
    pub mcp: McpConfig,
    /// `[e2b]`: the E2B-compatible door.
    #[serde(default)]
    pub e2b: E2bConfig,
    /// `[cluster]`: replicas that route to each other (none: a single box).
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// `[e2b]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct E2bConfig {
    /// The domain answered to E2B's SDKs: `Sandbox.get_host(port)` is
    /// `{port}-{sandbox id}.{domain}`, which this server routes to the port when the name
    /// reaches it (wildcard DNS). Default `ampoule.localhost` (`*.localhost` resolves to the
    /// loopback address on most systems).
    pub domain: Option<String>,
}

/// `[mcp]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// `Host` header values `/mcp` accepts, as `host` or `host:port` (DNS-rebinding
    /// protection). Default: loopback only; `["*"]` accepts any host.
    pub allowed_hosts: Option<Vec<String>>,
}

/// `[cluster]` (see [`crate::cluster`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This replica's name (`AMPOULE_REPLICA` overrides it). Unset and no `AMPOULE_REPLICA`:
    /// no cluster.
    pub replica: Option<String>,
    /// Every replica's base URL by name (`ampoule-0 = "http://10.0.0.1:8080"`).
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// With `peer_dns`: the StatefulSet's replica count; peers are `<stem><i>` for `i` below
    /// it, `<stem>` being this replica's name without its ordinal.
    pub replicas: Option<u32>,
    /// The headless Service's DNS name (`ampoule-headless.ampoule.svc.cluster.local`):
    /// replica `<name>` is at `http://<name>.<peer_dns>:<peer_port>`.
    pub peer_dns: Option<String>,
    /// The peers' API port (default 8080).
    pub peer_port: Option<u16>,
    /// The environment variable holding the cluster secret (default
    /// `AMPOULE_CLUSTER_SECRET`).
    pub secret_env: Option<String>,
}

/// `[server]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address (`host:port`).
    pub listen: Option<String>,
    /// Where the server keeps its state (the generated key's digest).
    pub data_dir: Option<PathBuf>,
    /// PEM certificate chain: with `tls_key`, the listener speaks HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The pool of the ACA API's bare root and of `/v1` requests that name none (default:
    /// `python` when configured, else the first pool by name).
    pub default_pool: Option<String>,
    /// Largest upload accepted, in MiB (default 128, as ACA); larger answers 413.
    pub max_upload_mib: Option<u64>,
    /// Most live sessions one tenant may hold across pools (default: no limit beyond the
    /// pools' own).
    pub max_sessions_per_tenant: Option<usize>,
    /// Seconds a client has to send a whole request head, from the connection's opening
    /// (TLS handshake included) or from the first byte of a later request (default 10);
    /// then the connection is closed.
    pub header_timeout_s: Option<f64>,
    /// Longest pause, in seconds, while a request body is being read (default 30); then the
    /// request fails and the connection is closed. Responses are never cut: a streaming
    /// execution runs as long as its own timeout allows.
    pub body_timeout_s: Option<f64>,
    /// Seconds an idle keep-alive connection is kept between requests (default 60).
    pub keepalive_timeout_s: Option<f64>,
    /// Most connections open at once on a listener (default 10000, and at most three
    /// quarters of the process's open-file limit); past it new ones are refused at once.
    pub max_connections: Option<usize>,
    /// Most connections open at once from one client address (IPv6: one /64) (default 512).
    pub max_connections_per_address: Option<usize>,
    /// Seconds running executions get to finish once SIGTERM or SIGINT has arrived (default
    /// 30): meanwhile `/readyz` answers 503, no session starts (503 `shutting_down`) and the
    /// sessions held are served; then every session is closed (durable ones hibernated).
    /// Keep it below Kubernetes' `terminationGracePeriodSeconds`.
    pub drain_timeout_s: Option<f64>,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `[[auth.keys]]`.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// The keys file `ampoule keys` manages and the server reads again when it changes
    /// (default: `keys.toml` in the data directory).
    pub keys_file: Option<PathBuf>,
    /// Failed authentications per minute from one address, or with one key prefix, before
    /// further requests are answered 429 `auth_throttled` for the rest of the minute
    /// (default 20; 0: no throttle).
    pub max_failures_per_minute: Option<u32>,
}

/// One API key and its tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The tenant the key belongs to.
    pub tenant: String,
    /// SHA-256 of the key, hex.
    pub key_sha256: Option<String>,
    /// Name of an environment variable holding the key itself.
    pub key_env: Option<String>,
    /// `approver`: the key decides approvals of its tenant (`/v1/approvals`) and submits no
    /// work; absent: an ordinary key.
    pub role: Option<String>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A second listener (`host:port`) serving only `GET /metrics`, without a key, for a
    /// Prometheus on a private network. On the main listener `/metrics` always needs an API
    /// key.
    pub listen: Option<String>,
}

/// What a spent CPU budget does to a running execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetAction {
    /// It runs to its end.
    Finish,
    /// Its timeout is cut to the CPU seconds left.
    Stop,
}

/// `[tenants.NAME]` and `[quotas]`: one tenant's quotas and policy (absent: no limit).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Most live sessions of this tenant.
    pub max_sessions: Option<usize>,
    /// Most executions started in any 60 seconds; over it: 429 `rate_limited` with
    /// `Retry-After`.
    pub executions_per_minute: Option<u32>,
    /// The pools the tenant may use (others: 403 `pool_not_allowed`).
    pub pools: Option<Vec<String>>,
    /// The languages the tenant may use (others: 403 `language_not_allowed`).
    pub languages: Option<Vec<String>>,
    /// Longest timeout the tenant may ask for, in seconds (more: 403 `timeout_not_allowed`;
    /// a pool's longer default is cut to it).
    pub max_timeout_s: Option<f64>,
    /// Most MiB the disks of the tenant's durable sandboxes may take together, each counted
    /// at its pool's disk limit (default 32768); beyond it: 507 `disk_quota_exceeded`.
    pub durable_disk_mib: Option<u64>,
    /// CPU seconds the tenant's executions may use in any hour (from the sandboxes'
    /// cgroups); spent: 429 `quota_exhausted` with `Retry-After`.
    pub cpu_seconds_per_hour: Option<f64>,
    /// Memory-time the tenant's executions may use in any hour: peak GiB × seconds, summed.
    pub memory_gib_seconds_per_hour: Option<f64>,
    /// `finish` (default): an execution that starts within budget runs to its end; `stop`:
    /// its timeout is cut to the CPU seconds left.
    pub budget_action: Option<BudgetAction>,
}

/// `[pools.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// `python`, `javascript` or `shell` (aliases accepted).
    #[serde(default = "default_language")]
    pub language: String,
    /// Ready sessions kept waiting.
    #[serde(default = "default_warm")]
    pub warm: usize,
    /// Most live sessions in the pool.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Seconds without a call after which a session is destroyed.
    #[serde(default = "default_idle")]
    pub idle_timeout_s: u64,
    /// Seconds after which a session is destroyed, busy or not.
    #[serde(default = "default_lifetime")]
    pub max_lifetime_s: u64,
    /// `[pools.NAME.limits]`.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[pools.NAME.network]`.
    #[serde(default)]
    pub network: NetworkConfig,
    /// `[pools.NAME.packages]`: the filtered package index the sandbox's `pip` uses
    /// (`index_url`, `allow`, `deny`; see `ampoule_egress::packages`). Gives the pool a
    /// network even when `[pools.NAME.network]` allows nothing.
    #[serde(default)]
    pub packages: Option<ampoule_egress::PackagesConfig>,
    /// `[pools.NAME.audit]`: overrides `[audit]` for this pool's records.
    #[serde(default)]
    pub audit: PoolAuditConfig,
    /// Fork sessions from a pre-initialised interpreter (Python pools only). Default: on for
    /// Python pools without a network; a pool with a network forks too when it says
    /// `zygote = true` (each child wired to its own gateway, the zygote itself without
    /// network). The server falls back to cold starts when it cannot run a zygote (not root).
    #[serde(default)]
    pub zygote: Option<bool>,
    /// The isolation tier: `namespaces` (default) or `gvisor` (gVisor's `runsc`; root, no
    /// image, no zygote; network rules go through the same egress gateway).
    #[serde(default)]
    pub isolation: ampoule_runtime::Isolation,
    /// Modules the zygote imports once for all its sessions (default: numpy, pandas,
    /// matplotlib, matplotlib.pyplot).
    #[serde(default)]
    pub preload: Option<Vec<String>>,
    /// `[pools.NAME.lifecycle]`: what idleness and time do to its sessions and sandboxes.
    #[serde(default)]
    pub lifecycle: ampoule_core::lifecycle::Lifecycle,
    /// `[pools.NAME.approval]`: whether its executions wait for an approver.
    #[serde(default)]
    pub approval: ampoule_core::approval::ApprovalPolicy,
    /// An image from `ampoule image import|pull` (`NAME[:TAG]`): the pool's sandboxes start
    /// from its root instead of the host's runtimes (root only).
    #[serde(default)]
    pub image: Option<String>,
    /// With `image`: the sandboxes may write `/` (`pip install` into the image's Python, files
    /// in `/etc` or `/usr/local`), each change in its own layer that counts against the disk
    /// limit and vanishes with it. Such a pool starts its sessions cold (warm stock keeps them
    /// ready): a zygote's children would share one layer.
    #[serde(default)]
    pub writable_root: bool,
    /// Python code the pool's zygotes run after `preload`, before they freeze their heap, so
    /// what a session's first cell initialises is shared by all (default: a small DataFrame,
    /// array and chart; `""`: none).
    #[serde(default)]
    pub warmup: Option<String>,
}

/// `[pools.NAME.audit]`: each field overrides the `[audit]` one of the same name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolAuditConfig {
    /// Keep each execution's code (else only its SHA-256).
    pub keep_code: Option<bool>,
    /// Bytes of stdout and of stderr kept per record.
    pub output_bytes: Option<u64>,
    /// Days this pool's records are kept.
    pub retention_days: Option<u64>,
}

// What the config resolves to: the core's typed settings (the core reads no TOML).
pub use ampoule_core::{AuditPolicy, PoolSettings};

fn default_language() -> String {
    "python".into()
}
fn default_warm() -> usize {
    4
}
fn default_max_sessions() -> usize {
    600
}
fn default_idle() -> u64 {
    300
}
fn default_lifetime() -> u64 {
    86_400
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            language: default_language(),
            warm: default_warm(),
            max_sessions: default_max_sessions(),
            idle_timeout_s: default_idle(),
            max_lifetime_s: default_lifetime(),
            limits: LimitsConfig::default(),
            network: NetworkConfig::default(),
            packages: None,
            audit: PoolAuditConfig::default(),
            zygote: None,
            isolation: Default::default(),
            lifecycle: Default::default(),
            approval: Default::default(),
            preload: None,
            image: None,
            writable_root: false,
            warmup: None,
        }
    }
}

/// `[pools.NAME.limits]`: [`Limits`] plus the longest timeout a request may ask for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// CPU cores.
    pub cpus: Option<f64>,
    /// Processes and threads.
    pub pids: Option<u64>,
    /// `/mnt/data` plus `/tmp`, in MiB.
    pub disk_mib: Option<u64>,
    /// Inodes in the scratch space.
    pub disk_inodes: Option<u64>,
    /// Default seconds per execution.
    pub timeout_s: Option<f64>,
    /// Most seconds a request may ask for.
    pub max_timeout_s: Option<f64>,
    /// Bytes kept per output stream.
    pub output_bytes: Option<u64>,
    /// Open files per process.
    pub open_files: Option<u64>,
}

/// `[pools.NAME.network]`: `allow` and `deny` rules (`host`, `host:port`, `*.domain`, IP
/// literals) and `[[pools.NAME.network.inject]]` credential rules (`host`, `header`, and
/// `value_from_env` or `oauth2 = { token_url, client_id_env, client_secret_env, scope }`); see
/// `ampoule_egress::policy`. An empty `allow` means no network (unless the pool has
/// `[pools.NAME.packages]`, whose index alone is then reachable).
pub type NetworkConfig = ampoule_egress::PolicyConfig;

/// `[egress]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// `[egress.hosts]`: static name → address pins (one address, or several separated by
    /// commas), consulted before the system resolver. A pin is the operator's permission for
    /// a private or CGNAT address (never loopback or link-local).
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
}

/// `[audit]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Database URL.
    pub url: Option<String>,
    /// Name of an environment variable holding the database URL (a PostgreSQL password kept
    /// out of the config file, e.g. in a Kubernetes Secret); not with `url`.
    pub url_env: Option<String>,
    /// Keep the code of each execution.
    pub keep_code: Option<bool>,
    /// Output bytes kept per record.
    pub output_bytes: Option<u64>,
    /// Days records are kept.
    pub retention_days: Option<u64>,
}

impl Config {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Self::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses a config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(var) = &cfg.audit.url_env {
            if cfg.audit.url.is_some() {
                return Err("audit.url and audit.url_env: set one of them".into());
            }
            match std::env::var(var) {
                Ok(url) if !url.is_empty() => cfg.audit.url = Some(url),
                _ => return Err(format!("audit.url_env: the variable {var} is not set")),
            }
        }
        let pools = cfg.pool_settings()?;
        cfg.egress_settings()?;
        let tenants = std::iter::once(("quotas".to_owned(), &cfg.quotas))
            .chain(cfg.tenants.iter().map(|(t, c)| (format!("tenants.{t}"), c)));
        for (at, t) in tenants {
            for p in t.pools.iter().flatten() {
                if !pools.contains_key(p) {
                    return Err(format!("{at}.pools: no pool named {p:?}"));
                }
            }
            for l in t.languages.iter().flatten() {
                if Language::parse(l).is_none() {
                    return Err(format!("{at}.languages: unknown language {l:?}"));
                }
            }
            if t.executions_per_minute == Some(0) {
                return Err(format!("{at}.executions_per_minute must be at least 1"));
            }
            if t.max_timeout_s.is_some_and(|s| !(s > 0.0 && s.is_finite())) {
                return Err(format!("{at}.max_timeout_s must be positive"));
            }
        }
        Ok(cfg)
    }

    /// The audit policy of a pool: `[pools.NAME.audit]` over `[audit]` over the defaults
    /// (keep the code, 4096 bytes of output, 90 days).
    pub fn audit_policy(&self, pool: &str) -> AuditPolicy {
        let p = self.pools.get(pool).map(|p| &p.audit);
        let a = &self.audit;
        AuditPolicy {
            keep_code: p.and_then(|p| p.keep_code).or(a.keep_code).unwrap_or(true),
            output_bytes: p
                .and_then(|p| p.output_bytes)
                .or(a.output_bytes)
                .map_or(4096, |b| usize::try_from(b).unwrap_or(usize::MAX)),
            retention_days: p
                .and_then(|p| p.retention_days)
                .or(a.retention_days)
                .unwrap_or(90),
        }
    }

    /// The quotas of every tenant named in `[tenants]`, over the `[quotas]` defaults.
    pub fn quotas(&self) -> crate::quota::Quotas {
        let resolve = |t: &TenantConfig| crate::quota::Policy {
            executions_per_minute: t
                .executions_per_minute
                .or(self.quotas.executions_per_minute),
            pools: t.pools.clone().or_else(|| self.quotas.pools.clone()),
            languages: t
                .languages
                .as_ref()
                .or(self.quotas.languages.as_ref())
                .map(|ls| ls.iter().filter_map(|l| Language::parse(l)).collect()),
            max_timeout_s: t.max_timeout_s.or(self.quotas.max_timeout_s),
            durable_disk_mib: t.durable_disk_mib.or(self.quotas.durable_disk_mib),
            cpu_seconds_per_hour: t.cpu_seconds_per_hour.or(self.quotas.cpu_seconds_per_hour),
            memory_gib_seconds_per_hour: t
                .memory_gib_seconds_per_hour
                .or(self.quotas.memory_gib_seconds_per_hour),
            stop_at_budget: t.budget_action.or(self.quotas.budget_action)
                == Some(BudgetAction::Stop),
        };
        crate::quota::Quotas::new(
            resolve(&TenantConfig::default()),
            self.tenants
                .iter()
                .map(|(name, t)| (name.clone(), resolve(t)))
                .collect(),
        )
    }

    /// The tenants whose keys may use `pool`: those of `[[auth.keys]]` (or the generated
    /// key's) whose policy allows the pool.
    fn pool_tenants(&self, pool: &str) -> Vec<String> {
        let quotas = self.quotas();
        let mut tenants: Vec<&str> = self.auth.keys.iter().map(|k| k.tenant.as_str()).collect();
        if tenants.is_empty() {
            tenants.push(GENERATED_TENANT);
        }
        tenants.sort_unstable();
        tenants.dedup();
        tenants.retain(|t| {
            let allowed = &quotas.policy(t).pools;
            allowed
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| p == pool))
        });
        tenants.into_iter().map(str::to_owned).collect()
    }

    /// The pools, with defaults applied (one `python` pool when none is configured).
    pub fn pool_settings(&self) -> Result<BTreeMap<String, PoolSettings>, String> {
        let mut pools = self.pools.clone();
        if pools.is_empty() {
            pools.insert("python".into(), PoolConfig::default());
        }
        let mut out = BTreeMap::new();
        for (name, p) in pools {
            if name.is_empty() || name.len() > 64 || name.contains(['/', '?', '#', '%']) {
                return Err(format!(
                    "pool name {name:?} must be 1-64 URL-safe characters"
                ));
            }
            let language = Language::parse(&p.language).ok_or_else(|| {
                format!(
                    "pools.{name}.language: unknown language {:?} ({})",
                    p.language,
                    Language::names()
                )
            })?;
            let on_egress = p.approval.mode == ampoule_core::approval::ApprovalMode::OnEgress;
            if on_egress && (p.approval.hosts.is_empty() || p.network.allow.is_empty()) {
                return Err(format!(
                    "pools.{name}.approval: on_egress needs `hosts` and a network \
                     (`[pools.{name}.network] allow`) that allows them"
                ));
            }
            if !on_egress && !p.approval.hosts.is_empty() {
                return Err(format!(
                    "pools.{name}.approval.hosts: only with mode = \"on_egress\""
                ));
            }
            let network = pool_network(&name, &p.network, p.packages.as_ref())?
                .map(|mut n| {
                    if on_egress {
                        let policy = ampoule_egress::Policy::compile(&n.config, |var| {
                            std::env::var(var).ok()
                        })
                        .and_then(|pol| match p.packages.as_ref() {
                            Some(pk) => pol.with_packages(pk),
                            None => Ok(pol),
                        })
                        .and_then(|pol| pol.with_approval(&p.approval.hosts))
                        .map_err(|e| format!("pools.{name}.approval.hosts: {e}"))?;
                        n.policy = std::sync::Arc::new(policy);
                    }
                    Ok::<_, String>(n)
                })
                .transpose()?;
            let d = Limits::default();
            let l = &p.limits;
            let limits = Limits {
                memory_mib: l.memory_mib.unwrap_or(d.memory_mib),
                cpus: l.cpus.unwrap_or(d.cpus),
                pids: l.pids.unwrap_or(d.pids),
                disk_mib: l.disk_mib.unwrap_or(d.disk_mib),
                disk_inodes: l.disk_inodes.unwrap_or(d.disk_inodes),
                timeout_s: l.timeout_s.unwrap_or(d.timeout_s),
                output_bytes: l.output_bytes.unwrap_or(d.output_bytes),
                open_files: l.open_files.unwrap_or(d.open_files),
            };
            let max_timeout_s = l.max_timeout_s.unwrap_or(600.0).max(limits.timeout_s);
            if !(limits.timeout_s > 0.0 && max_timeout_s.is_finite()) {
                return Err(format!("pools.{name}.limits: timeouts must be positive"));
            }
            if !(limits.cpus > 0.0 && limits.cpus.is_finite()) {
                return Err(format!("pools.{name}.limits.cpus must be positive"));
            }
            if p.max_sessions == 0 {
                return Err(format!("pools.{name}.max_sessions must be at least 1"));
            }
            p.lifecycle
                .check()
                .map_err(|e| format!("pools.{name}.{e}"))?;
            let is_python = language == Language::Python;
            if p.zygote == Some(true) && !is_python {
                return Err(format!(
                    "pools.{name}.zygote: only Python pools can fork from a zygote"
                ));
            }
            let gvisor = p.isolation == ampoule_runtime::Isolation::Gvisor;
            if gvisor && p.zygote == Some(true) {
                return Err(format!(
                    "pools.{name}.zygote: gvisor pools start their sessions cold (warm pools \
                     keep them ready); remove `zygote = true`"
                ));
            }
            if gvisor && p.image.is_some() {
                return Err(format!(
                    "pools.{name}.isolation: gvisor pools have no image yet; remove it or use \
                     isolation = \"namespaces\""
                ));
            }
            if p.writable_root && p.image.is_none() {
                return Err(format!(
                    "pools.{name}.writable_root: only a pool from an image has a writable root \
                     (set `image`, or remove `writable_root`)"
                ));
            }
            if p.writable_root && p.zygote == Some(true) {
                return Err(format!(
                    "pools.{name}.zygote: a pool with a writable root starts its sessions cold \
                     (a zygote's children would share one root layer); remove `zygote = true` \
                     or `writable_root`"
                ));
            }
            let image = match &p.image {
                Some(reference) => Some(ampoule_core::PoolImage {
                    writable_root: p.writable_root,
                    ..self.pool_image(&name, reference, language)?
                }),
                None => None,
            };
            // Network pools fork only when asked (`zygote = true`): opt-in while it is new.
            let zygote = p
                .zygote
                .unwrap_or(is_python && network.is_none() && !gvisor && !p.writable_root);
            let preload = p.preload.clone().unwrap_or_else(|| {
                ampoule_session::zygote::DEFAULT_PRELOAD
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect()
            });
            p.approval
                .timeout()
                .map_err(|e| format!("pools.{name}.{e}"))?;
            if let Some(url) = &p.approval.webhook_url
                && !url.starts_with("http://")
            {
                return Err(format!(
                    "pools.{name}.approval.webhook_url: an http:// URL (a hook on the operator's \
                     network; https is not supported yet)"
                ));
            }
            let tenants = self.pool_tenants(&name);
            out.insert(
                name.clone(),
                PoolSettings {
                    spec: PoolSpec {
                        name,
                        language,
                        limits,
                        network,
                        zygote: zygote.then_some(preload),
                        warmup: p
                            .warmup
                            .clone()
                            .unwrap_or_else(|| ampoule_session::zygote::DEFAULT_WARMUP.to_owned()),
                        tenants,
                        max_sessions: p.max_sessions,
                        image,
                        isolation: p.isolation,
                    },
                    warm: p.warm,
                    max_sessions: p.max_sessions,
                    idle_timeout: std::time::Duration::from_secs(p.idle_timeout_s.max(1)),
                    max_lifetime: std::time::Duration::from_secs(p.max_lifetime_s.max(1)),
                    max_timeout_s,
                    lifecycle: p.lifecycle.clone(),
                    approval: p.approval.clone(),
                },
            );
        }
        Ok(out)
    }

    /// Resolves a pool's `image` against the store under the data directory: the image must
    /// be there and hold the pool language's interpreter. Logs what the image offers.
    fn pool_image(
        &self,
        pool: &str,
        reference: &str,
        language: Language,
    ) -> Result<ampoule_core::PoolImage, String> {
        use ampoule_session::language::image::ImageRoot;
        let store = ampoule_image::Store::open(&self.data_dir())
            .map_err(|e| format!("pools.{pool}.image: {}", crate::session_engine::chain(&e)))?;
        let image = store.get(reference).map_err(|e| {
            format!(
                "pools.{pool}.image: {}\nhint: `ampoule image import PATH --name {reference}` or \
                 `ampoule image pull REF --name {reference}` (with the same data directory)",
                crate::session_engine::chain(&e)
            )
        })?;
        let root = ImageRoot {
            name: image.name.clone(),
            root: store.rootfs(&image),
            env: image.run.env.clone(),
        };
        let found = root.languages();
        let have: Vec<String> = found
            .iter()
            .filter_map(|(l, path)| path.as_ref().map(|p| format!("{} ({p})", l.as_str())))
            .collect();
        tracing::info!(
            pool,
            image = %image.name,
            digest = %image.manifest,
            languages = %if have.is_empty() { "none".to_owned() } else { have.join(", ") },
            "pool from an image"
        );
        if !found
            .iter()
            .any(|(l, path)| *l == language && path.is_some())
        {
            return Err(format!(
                "pools.{pool}.image: {} has no {} interpreter on its PATH (languages found: {})",
                image.name,
                language.as_str(),
                if have.is_empty() {
                    "none".to_owned()
                } else {
                    have.join(", ")
                }
            ));
        }
        if !image.run.user.is_empty() {
            tracing::info!(
                pool,
                user = %image.run.user,
                "the image's User is not used: sandboxes run as the unprivileged sandbox user"
            );
        }
        Ok(ampoule_core::PoolImage {
            name: image.name.clone(),
            digest: image.manifest.to_string(),
            root: root.root,
            env: root.env,
            writable_root: false,
        })
    }

    /// The egress gateway's settings: `[egress.hosts]` (checked) and the upstream CAs named
    /// by `SSL_CERT_FILE` in the server's environment.
    pub fn egress_settings(&self) -> Result<ampoule_egress::EgressSettings, String> {
        ampoule_egress::resolve::Resolver::new(&self.egress.hosts)
            .map_err(|e| format!("egress.hosts: {e}"))?;
        Ok(ampoule_egress::EgressSettings {
            hosts: self.egress.hosts.clone(),
            extra_roots: ampoule_egress::EgressSettings::roots_from_env(),
        })
    }

    /// The egress service of this server (its resolver pins and its CA, made now), when some
    /// pool has a network; `None` otherwise, so a server without network makes no CA.
    pub fn egress(&self) -> Result<Option<ampoule_egress::Egress>, Error> {
        let pools = self.pool_settings().map_err(Error::Config)?;
        if pools.values().all(|p| p.spec.network.is_none()) {
            return Ok(None);
        }
        let settings = self.egress_settings().map_err(Error::Config)?;
        ampoule_egress::Egress::new(&settings)
            .map(Some)
            .map_err(|e| Error::Config(format!("egress gateway: {e}")))
    }

    /// The default pool's name.
    pub fn default_pool(&self) -> Result<String, String> {
        let pools = self.pool_settings()?;
        match &self.server.default_pool {
            Some(name) if pools.contains_key(name) => Ok(name.clone()),
            Some(name) => Err(format!("server.default_pool: no pool named {name:?}")),
            None if pools.contains_key("python") => Ok("python".into()),
            None => pools
                .keys()
                .next()
                .cloned()
                .ok_or_else(|| "no pools".to_owned()),
        }
    }

    /// The `Host` values `/mcp` accepts (empty: any).
    pub fn mcp_allowed_hosts(&self) -> Vec<String> {
        match &self.mcp.allowed_hosts {
            None => DEFAULT_ALLOWED_HOSTS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            Some(hosts) if hosts.iter().any(|h| h == "*") => Vec::new(),
            Some(hosts) => hosts.clone(),
        }
    }

    /// Largest upload in bytes.
    pub fn max_upload_bytes(&self) -> u64 {
        self.server
            .max_upload_mib
            .unwrap_or(128)
            .saturating_mul(1024 * 1024)
    }

    /// The keys file (`[auth] keys_file`, else `keys.toml` in the data directory).
    pub fn keys_file(&self) -> PathBuf {
        self.auth
            .keys_file
            .clone()
            .unwrap_or_else(|| self.data_dir().join(KEYS_FILE))
    }

    /// Failed authentications a minute before throttling (0: never).
    pub fn max_auth_failures(&self) -> u32 {
        self.auth
            .max_failures_per_minute
            .unwrap_or(DEFAULT_MAX_AUTH_FAILURES)
    }

    /// The listeners' timeouts and connection caps (`[server]`), checked.
    pub fn door_limits(&self) -> Result<crate::listener::Limits, Error> {
        let secs = |v: Option<f64>, default: f64, name: &str| {
            let v = v.unwrap_or(default);
            if v.is_finite() && v > 0.0 && v <= 86_400.0 {
                Ok(std::time::Duration::from_secs_f64(v))
            } else {
                Err(Error::Config(format!(
                    "server.{name} must be a number of seconds above 0 and at most 86400"
                )))
            }
        };
        let s = &self.server;
        let d = crate::listener::Limits::default();
        let limits = crate::listener::Limits {
            header_timeout: secs(
                s.header_timeout_s,
                d.header_timeout.as_secs_f64(),
                "header_timeout_s",
            )?,
            body_timeout: secs(
                s.body_timeout_s,
                d.body_timeout.as_secs_f64(),
                "body_timeout_s",
            )?,
            keepalive_timeout: secs(
                s.keepalive_timeout_s,
                d.keepalive_timeout.as_secs_f64(),
                "keepalive_timeout_s",
            )?,
            max_connections: s.max_connections.unwrap_or(d.max_connections),
            max_connections_per_address: s
                .max_connections_per_address
                .unwrap_or(d.max_connections_per_address),
        };
        if limits.max_connections == 0 || limits.max_connections_per_address == 0 {
            return Err(Error::Config(
                "server.max_connections and server.max_connections_per_address must be at least 1"
                    .into(),
            ));
        }
        Ok(limits)
    }

    /// The cluster `[cluster]` and `AMPOULE_REPLICA` describe, if any.
    pub fn cluster(&self) -> Result<Option<crate::cluster::Cluster>, Error> {
        let c = &self.cluster;
        let replica = std::env::var("AMPOULE_REPLICA")
            .ok()
            .filter(|r| !r.is_empty())
            .or_else(|| c.replica.clone());
        let Some(replica) = replica else {
            if !c.peers.is_empty() || c.peer_dns.is_some() {
                return Err(Error::Config(
                    "cluster: peers without cluster.replica (or AMPOULE_REPLICA)".into(),
                ));
            }
            return Ok(None);
        };
        let mut peers = c.peers.clone();
        if let Some(dns) = &c.peer_dns {
            let n = c
                .replicas
                .ok_or_else(|| Error::Config("cluster.peer_dns needs cluster.replicas".into()))?;
            let stem = replica.trim_end_matches(|ch: char| ch.is_ascii_digit());
            if stem.len() == replica.len() {
                return Err(Error::Config(format!(
                    "cluster.peer_dns: the replica name {replica:?} ends in no ordinal"
                )));
            }
            let port = c.peer_port.unwrap_or(8080);
            for i in 0..n {
                peers.insert(
                    format!("{stem}{i}"),
                    format!("http://{stem}{i}.{dns}:{port}"),
                );
            }
        }
        let var = c
            .secret_env
            .clone()
            .unwrap_or_else(|| "AMPOULE_CLUSTER_SECRET".to_owned());
        let secret = std::env::var(&var)
            .map_err(|_| Error::Config(format!("cluster: the secret variable {var} is not set")))?;
        crate::cluster::Cluster::new(&replica, &peers, &secret).map(Some)
    }

    /// `[server] drain_timeout_s` (default 30 s; 0 closes every session at once).
    pub fn drain_timeout(&self) -> Result<std::time::Duration, Error> {
        let v = self
            .server
            .drain_timeout_s
            .unwrap_or(DEFAULT_DRAIN_TIMEOUT_S);
        if v.is_finite() && (0.0..=86_400.0).contains(&v) {
            Ok(std::time::Duration::from_secs_f64(v))
        } else {
            Err(Error::Config(
                "server.drain_timeout_s must be a number of seconds from 0 to 86400".into(),
            ))
        }
    }

    /// The data directory: configured, else the one sessions use (`$AMPOULE_DATA_DIR`,
    /// `/var/lib/ampoule` for root, `~/.local/share/ampoule` otherwise).
    pub fn data_dir(&self) -> PathBuf {
        self.server
            .data_dir
            .clone()
            .unwrap_or_else(ampoule_session::paths::data_dir)
    }

    /// The digests of the `[[auth.keys]]` with `role = "approver"`.
    pub fn approver_digests(&self) -> Result<Vec<String>, Error> {
        let digests = self.key_digests()?;
        let mut out = Vec::new();
        for (k, (digest, _)) in self.auth.keys.iter().zip(digests) {
            match k.role.as_deref() {
                None => {}
                Some("approver") => out.push(digest),
                Some(other) => {
                    return Err(Error::Config(format!(
                        "auth.keys: role {other:?} is not a role (the one role is \"approver\")"
                    )));
                }
            }
        }
        Ok(out)
    }

    /// The key digests and their tenants from `[[auth.keys]]` (environment variables read
    /// now). Empty when no key is configured.
    pub fn key_digests(&self) -> Result<Vec<(String, String)>, Error> {
        let mut out = Vec::new();
        for (i, k) in self.auth.keys.iter().enumerate() {
            if k.tenant.is_empty() {
                return Err(Error::Config(format!("auth.keys[{i}].tenant is empty")));
            }
            let digest = match (&k.key_sha256, &k.key_env) {
                (Some(h), None) => {
                    let h = h.trim().to_ascii_lowercase();
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(Error::Config(format!(
                            "auth.keys[{i}].key_sha256 must be 64 hex digits"
                        )));
                    }
                    h
                }
                (None, Some(var)) => {
                    let key = std::env::var(var).map_err(|_| {
                        Error::Config(format!(
                            "auth.keys[{i}].key_env: environment variable {var} is not set"
                        ))
                    })?;
                    if key.trim().is_empty() {
                        return Err(Error::Config(format!(
                            "auth.keys[{i}].key_env: environment variable {var} is empty"
                        )));
                    }
                    sha256_hex(key.trim())
                }
                _ => {
                    return Err(Error::Config(format!(
                        "auth.keys[{i}] needs exactly one of key_sha256 and key_env"
                    )));
                }
            };
            out.push((digest, k.tenant.clone()));
        }
        Ok(out)
    }
}

/// A pool's network policy, compiled (injection values and OAuth client credentials read from
/// the environment now), or `None` when `allow` is empty and there is no package index: no
/// network.
fn pool_network(
    name: &str,
    cfg: &NetworkConfig,
    packages: Option<&ampoule_egress::PackagesConfig>,
) -> Result<Option<PoolNetwork>, String> {
    if cfg.allow.is_empty() {
        if !cfg.deny.is_empty() || !cfg.inject.is_empty() {
            return Err(format!(
                "pools.{name}.network: `deny` and `inject` need an `allow` list (an empty \
                 `allow` means no network at all)"
            ));
        }
        if packages.is_none() {
            return Ok(None);
        }
    }
    let mut policy = ampoule_egress::Policy::compile(cfg, |var| std::env::var(var).ok())
        .map_err(|e| format!("pools.{name}.network: {e}"))?;
    if let Some(packages) = packages {
        policy = policy
            .with_packages(packages)
            .map_err(|e| format!("pools.{name}.packages: {e}"))?;
    }
    Ok(Some(PoolNetwork {
        config: cfg.clone(),
        policy: std::sync::Arc::new(policy),
    }))
}

/// SHA-256 of a key, lowercase hex.
pub fn sha256_hex(key: &str) -> String {
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The tenant of the key generated on first start.
pub const GENERATED_TENANT: &str = "default";

/// Failed authentications a minute before an address or key prefix is throttled.
pub const DEFAULT_MAX_AUTH_FAILURES: u32 = 20;

/// The keys file's name in the data directory.
pub const KEYS_FILE: &str = "keys.toml";

/// Name of the file in the data directory holding the generated key's digest.
pub const GENERATED_KEY_FILE: &str = "api-key.sha256";

/// Loads the digest of the key generated on an earlier start, or generates a key, stores its
/// digest and returns the key itself (to be printed once).
pub fn generated_key(data_dir: &Path) -> Result<(String, Option<String>), Error> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = data_dir.join(GENERATED_KEY_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let digest = text.trim().to_ascii_lowercase();
        if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok((digest, None));
        }
        return Err(Error::Config(format!(
            "{} does not hold a SHA-256 digest; remove it to generate a new key",
            path.display()
        )));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| Error::io(format!("creating {}", data_dir.display()), e))?;
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    let mut key = String::from("amp_");
    for b in raw {
        key.push_str(&format!("{b:02x}"));
    }
    let digest = sha256_hex(&key);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    std::io::Write::write_all(&mut f, format!("{digest}\n").as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok((digest, Some(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
[server]
listen = "127.0.0.1:8080"
data_dir = "/var/lib/ampoule"

[[auth.keys]]
tenant = "team-a"
key_sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"

[pools.python]
language = "python"
warm = 4
max_sessions = 600
idle_timeout_s = 300
max_lifetime_s = 86400
[pools.python.limits]
memory_mib = 512
cpus = 1.0
pids = 256
disk_mib = 1024
timeout_s = 220
max_timeout_s = 600
output_bytes = 1048576
[pools.python.network]
allow = []

[egress.hosts]

[audit]
keep_code = true
output_bytes = 4096
retention_days = 90
"#;
        let cfg = Config::parse(text).unwrap();
        let pools = cfg.pool_settings().unwrap();
        let p = &pools["python"];
        assert_eq!(p.warm, 4);
        assert_eq!(p.spec.limits.memory_mib, 512);
        assert_eq!(p.max_timeout_s, 600.0);
        assert_eq!(cfg.default_pool().unwrap(), "python");
        assert_eq!(
            cfg.key_digests().unwrap(),
            vec![(
                "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae".to_owned(),
                "team-a".to_owned()
            )]
        );
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(Config::parse("[server]\nlisten_addr = \"x\"").is_err());
        assert!(Config::parse("[pools.py]\nlanguage = \"cobol\"").is_err());
        assert!(Config::parse("[pools.py.limits]\nmemory_mb = 5").is_err());
        assert!(Config::parse("[pools.py.network]\nallow = [\"pypi.org:99999\"]").is_err());
        assert!(Config::parse("[pools.py.network]\ninject = []\ndeny = [\"a.test\"]").is_err());
        assert!(Config::parse("[egress.hosts]\n\"a.test\" = \"not-an-ip\"").is_err());
        assert!(Config::parse("[tenants.a]\npools = [\"nope\"]").is_err());
        assert!(Config::parse("[quotas]\nlanguages = [\"cobol\"]").is_err());
        assert!(Config::parse("[quotas]\nexecutions_per_minute = 0").is_err());
        assert!(Config::parse("[tenants.a]\nmax_timeout_s = -1").is_err());
        assert!(Config::parse("[pools.python.audit]\nkeep = true").is_err());
        // Approvals: a known mode, a sane timeout, an http hook, egress hosts only with
        // on_egress and a network that has them; a role that exists.
        for bad in [
            "[pools.py.approval]\nmode = \"sometimes\"",
            "[pools.py.approval]\nmode = \"always\"\ntimeout_s = 0",
            "[pools.py.approval]\nmode = \"always\"\nwebhook_url = \"https://h/x\"",
            "[pools.py.approval]\nmode = \"on_egress\"\nhosts = [\"a.test\"]",
            "[pools.py.network]\nallow = [\"a.test\"]\n[pools.py.approval]\nmode = \"on_egress\"",
            "[pools.py.approval]\nmode = \"always\"\nhosts = [\"a.test\"]",
            "[quotas]\nbudget_action = \"panic\"",
        ] {
            assert!(
                Config::parse(bad).is_err() || Config::parse(bad).unwrap().pool_settings().is_err(),
                "{bad}"
            );
        }
        let cfg = Config::parse("[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nrole = \"admin\"").unwrap();
        assert!(cfg.approver_digests().is_err());
        let cfg = Config::parse("[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"xyz\"").unwrap();
        assert!(cfg.key_digests().is_err());
    }

    #[test]
    fn a_pools_tenants_are_those_whose_keys_may_use_it() {
        let cfg = Config::parse(
            "[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"x\"\n\
             [[auth.keys]]\ntenant = \"b\"\nkey_sha256 = \"y\"\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"z\"\n\
             [tenants.b]\npools = [\"other\"]\n\
             [pools.python]\n[pools.other]\n",
        )
        .unwrap();
        let pools = cfg.pool_settings().unwrap();
        assert_eq!(pools["python"].spec.tenants, ["a"]);
        assert_eq!(pools["python"].spec.sole_tenant(), Some("a"));
        assert_eq!(pools["other"].spec.tenants, ["a", "b"]);
        assert_eq!(pools["other"].spec.sole_tenant(), None);
        // No keys: the generated key's tenant.
        let cfg = Config::parse("").unwrap();
        assert_eq!(
            cfg.pool_settings().unwrap()["python"].spec.tenants,
            [GENERATED_TENANT]
        );
    }

    #[test]
    fn pool_audit_settings_and_tenant_quotas_fall_back_to_the_defaults() {
        let cfg = Config::parse(
            "[audit]\noutput_bytes = 100\nretention_days = 30\n\
             [pools.python]\n[pools.secret]\n[pools.secret.audit]\nkeep_code = false\n\
             retention_days = 1\n\
             [quotas]\nexecutions_per_minute = 60\nmax_timeout_s = 30\n\
             [tenants.a]\nexecutions_per_minute = 5\nlanguages = [\"py\"]\n",
        )
        .unwrap();
        let secret = cfg.audit_policy("secret");
        assert_eq!((secret.keep_code, secret.output_bytes), (false, 100));
        assert_eq!(secret.retention_days, 1);
        let python = cfg.audit_policy("python");
        assert_eq!((python.keep_code, python.retention_days), (true, 30));
        let q = cfg.quotas();
        assert_eq!(q.policy("a").executions_per_minute, Some(5));
        assert_eq!(q.policy("a").max_timeout_s, Some(30.0));
        assert_eq!(q.policy("a").languages, Some(vec![Language::Python]));
        assert_eq!(q.policy("b").executions_per_minute, Some(60));
        assert_eq!(q.policy("b").languages, None);
    }

    #[test]
    fn network_pools_fork_from_a_zygote_when_asked() {
        let cfg = Config::parse(
            "[pools.cold.network]\nallow = [\"a.test\"]\n\
             [pools.forked]\nzygote = true\n[pools.forked.network]\nallow = [\"a.test\"]\n",
        )
        .unwrap();
        let pools = cfg.pool_settings().unwrap();
        // Opt-in: a network pool without `zygote` keeps starting its sessions cold.
        assert!(pools["cold"].spec.zygote.is_none());
        let forked = &pools["forked"].spec;
        assert!(forked.zygote.is_some() && forked.network.is_some());
    }

    #[test]
    fn pool_networks_are_compiled_at_load() {
        let cfg = Config::parse(
            r#"
[pools.python]
[pools.net.network]
allow = ["allowed.test", "*.example.com:443"]
deny = ["bad.example.com"]
[[pools.net.network.inject]]
host = "api.example.com"
header = "Authorization"
value_from_env = "PATH"
[egress.hosts]
"allowed.test" = "10.77.0.2"
"#,
        )
        .unwrap();
        let pools = cfg.pool_settings().unwrap();
        assert!(pools["python"].spec.network.is_none());
        let net = pools["net"].spec.network.as_ref().unwrap();
        assert!(net.policy.injects());
        let name = |n: &str| ampoule_egress::policy::Target::Name(n.into());
        assert!(net.policy.check(&name("api.example.com"), 443).allowed());
        assert!(!net.policy.check(&name("bad.example.com"), 443).allowed());
        assert!(!net.policy.check(&name("other.test"), 80).allowed());
        assert_eq!(cfg.egress_settings().unwrap().hosts.len(), 1);
        // A missing secret is an error at load, not an unauthenticated request later.
        let err = Config::parse(
            "[pools.n.network]\nallow = [\"a.test\"]\n[[pools.n.network.inject]]\n\
             host = \"a.test\"\nheader = \"X-Key\"\nvalue_from_env = \"AMPOULE_SURELY_UNSET_VAR\"",
        )
        .unwrap_err();
        assert!(
            err.contains("pools.n.network") && err.contains("AMPOULE_SURELY_UNSET_VAR"),
            "{err}"
        );
        let err = Config::parse("[pools.n.network]\nallow = [\"*bad*\"]").unwrap_err();
        assert!(
            err.contains("pools.n.network") && err.contains("*bad*"),
            "{err}"
        );
        assert!(Config::default().egress().unwrap().is_none());
    }

    #[test]
    fn package_indexes_and_minted_credentials_are_checked_at_load() {
        let cfg = Config::parse(
            r#"
[pools.pkgs.packages]
index_url = "https://pypi.org/simple"
allow = ["pandas", "requests>=2.31"]
[pools.minted.network]
allow = ["api.example.com"]
[[pools.minted.network.inject]]
host = "api.example.com"
header = "Authorization"
oauth2 = { token_url = "https://auth.example.com/token", client_id_env = "PATH", client_secret_env = "PATH", scope = "read" }
"#,
        )
        .unwrap();
        let pools = cfg.pool_settings().unwrap();
        // A package index alone gives the pool a network, with nothing else allowed.
        let pkgs = pools["pkgs"].spec.network.as_ref().unwrap();
        assert!(pkgs.policy.packages().is_some());
        assert!(
            pkgs.policy
                .sandbox_env()
                .iter()
                .any(|(k, _)| k == "PIP_INDEX_URL")
        );
        let name = |n: &str| ampoule_egress::policy::Target::Name(n.into());
        assert!(!pkgs.policy.check(&name("pypi.org"), 443).allowed());
        let minted = pools["minted"].spec.network.as_ref().unwrap();
        assert!(minted.policy.injects());
        for bad in [
            "[pools.p.packages]\nindex_url = \"https://pypi.org/simple\"",
            "[pools.p.packages]\nindex_url = \"https://pypi.org/simple\"\nallow = [\"pandas[excel]\"]",
            "[pools.p.packages]\nindex_url = \"ftp://x/simple\"\nallow = [\"pandas\"]",
        ] {
            let err = Config::parse(bad).unwrap_err();
            assert!(err.contains("pools.p.packages"), "{err}");
        }
        let err = Config::parse(
            "[pools.n.network]\nallow = [\"a.test\"]\n[[pools.n.network.inject]]\n\
             host = \"a.test\"\nheader = \"Authorization\"\noauth2 = { token_url = \
             \"https://a.test/t\", client_id_env = \"PATH\", client_secret_env = \
             \"AMPOULE_SURELY_UNSET_VAR\" }",
        )
        .unwrap_err();
        assert!(err.contains("AMPOULE_SURELY_UNSET_VAR"), "{err}");
    }

    #[test]
    fn no_config_means_one_python_pool() {
        let cfg = Config::default();
        let pools = cfg.pool_settings().unwrap();
        assert_eq!(pools.keys().collect::<Vec<_>>(), ["python"]);
        assert_eq!(cfg.max_upload_bytes(), 128 * 1024 * 1024);
    }

    #[test]
    fn the_generated_key_is_printed_once_and_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let (digest, key) = generated_key(dir.path()).unwrap();
        let key = key.unwrap();
        assert_eq!(sha256_hex(&key), digest);
        let stored = std::fs::read_to_string(dir.path().join(GENERATED_KEY_FILE)).unwrap();
        assert!(!stored.contains(&key));
        let (again, none) = generated_key(dir.path()).unwrap();
        assert_eq!(again, digest);
        assert!(none.is_none());
    }

    #[test]
    fn the_audit_url_comes_from_the_variable_url_env_names() {
        let missing = "AMPOULE_TEST_AUDIT_URL_NEVER_SET";
        let err = Config::parse(&format!("[audit]\nurl_env = \"{missing}\"\n")).unwrap_err();
        assert!(err.contains(missing), "{err}");
        // (Setting a variable needs `unsafe` in this edition: one that is always set.)
        let cfg = Config::parse("[audit]\nurl_env = \"PATH\"\n").unwrap();
        assert_eq!(cfg.audit.url, std::env::var("PATH").ok());
        let both = "[audit]\nurl = \"sqlite://x\"\nurl_env = \"PATH\"\n";
        assert!(Config::parse(both).unwrap_err().contains("set one"));
    }

    #[test]
    fn a_statefulset_cluster_names_its_peers_by_ordinal() {
        if std::env::var_os("AMPOULE_REPLICA").is_some() {
            return; // the variable would override the config's replica
        }
        // (The secret from a variable that is always set: setting one needs `unsafe`.)
        let cfg = Config::parse(
            "[cluster]\nreplica = \"ampoule-1\"\nreplicas = 3\n\
             peer_dns = \"ampoule-headless.ns.svc\"\nsecret_env = \"PATH\"\n",
        )
        .unwrap();
        let c = cfg.cluster().unwrap().unwrap();
        assert_eq!(
            (c.replica.as_str(), c.token.as_str()),
            ("ampoule-1", "ampoule1")
        );
        assert_eq!(c.peer("ampoule1"), None, "itself");
        let p = c.peer("ampoule2").unwrap();
        assert_eq!(p.authority, "ampoule-2.ampoule-headless.ns.svc:8080");
        assert!(c.peer("ampoule3").is_none());
        // A single box: no cluster; peers without a replica are an error.
        assert!(Config::parse("").unwrap().cluster().unwrap().is_none());
        let bad = Config::parse("[cluster]\npeers = { a = \"http://x:1\" }\n").unwrap();
        assert!(bad.cluster().is_err());
        let bad =
            Config::parse("[cluster]\nreplica = \"r\"\nsecret_env = \"AMPOULE_NEVER_SET_X\"\n")
                .unwrap();
        assert!(
            bad.cluster()
                .unwrap_err()
                .to_string()
                .contains("AMPOULE_NEVER_SET_X")
        );
    }
}
