//! Zygotes: sandboxes born by forking a pre-initialised interpreter.
//!
//! Starting Python and importing numpy, pandas and matplotlib costs ~600 ms and ~67 MiB per
//! sandbox; forking an interpreter that already did costs a few milliseconds and a few MiB of
//! copied pages. A [`Zygote`] is that interpreter: a program started in a sandbox of its own
//! ([`Sandbox`] in zygote mode: every namespace, a read-only root, no network, nothing secret
//! in its memory or environment, root of its user namespace so that it keeps the capabilities
//! its children need to build their namespaces). [`Zygote::spawn`] asks it for a child. The child
//! was forked ahead of the request (the zygote's "spare": pid 2 of a new pid namespace whose
//! pid 1 is a reaper, with its mount, network, ipc and uts namespaces, `/proc`, loopback and
//! scratch tmpfs already made, and the pages a session writes first already copied); given the
//! request it joins its cgroup, sets its rlimits, sizes its scratch space, unshares its cgroup
//! namespace, takes its slot's host uid and gid (the zygote's user namespace maps every slot's:
//! [`crate::Host::zygote_id_map`]), enters a user namespace of its own as
//! [`crate::sandbox::SANDBOX_UID`], applies the same Landlock ruleset,
//! drops every capability, sets `no_new_privs` and installs the same seccomp programs as the
//! runtime's init (the programs are compiled here and handed over; the child's code is
//! `kernels/python/zygote.py`). What comes back is an ordinary [`Sandbox`]: same scratch API,
//! cgroup, limits, kill and teardown.
//!
//! A child may have a network the zygote never has ([`Zygote::spawn_with`] in allowlist mode):
//! the supervisor wires the namespace its spare made, when the spare is handed out (the
//! addresses are the slot's, known only with the request).
//!
//! Differences from an init-born sandbox, by design:
//! * Every child runs as its own slot's host uid, as a cold sandbox does, but its user namespace
//!   lives below the zygote's, where the kernel charges some per-user counters to the zygote's
//!   owner: [`crate::ucounts`] gives each child a share of its own ([`ZygoteConfig::max_children`]
//!   sizes it).
//! * Siblings start from the same memory: the child re-seeds its random generators; CPython's
//!   string-hash secret is per zygote and cannot change in a live interpreter, so zygotes are
//!   recycled ([`Zygote::forks`], [`Zygote::age`]), and a server runs one per tenant.
//! * The session's pid 1 is a reaper (ampoule's init binary, sealed in a user namespace of its
//!   own, still the zygote's uid: out of the code's reach), the program is pid 2; the zygote
//!   reaps the program, reports its status and kills the reaper. The reaper and what the spare allocated before its request (page tables,
//!   namespaces) are charged to the zygote's cgroup, not the session's.
//!
//! Protocol with the zygote (one JSON object per `SOCK_SEQPACKET` datagram, descriptors with
//! `SCM_RIGHTS`): see `kernels/python/zygote.py`.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::MsgFlags;
use serde_json::{Value, json};
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};

use crate::cgroup::CgroupVersion;
use crate::channel::{self, FromInit, HostChannel, ToInit};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::network::{GatewayAddrs, Network};
use crate::sandbox::{ProgramExit, Sandbox, SandboxConfig};
use crate::scratch::Scratch;
use crate::seccomp::SeccompPolicy;

/// How long a zygote may take to import its packages.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// How long one fork may take before the zygote is considered stuck.
const FORK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a zygote runs and preloads.
#[derive(Debug, Clone)]
pub struct ZygoteConfig {
    /// The sandbox of the zygote itself: program (the zygote driver), environment (also the
    /// children's, unless a spawn overrides it), binds and the zygote's own limits.
    pub sandbox: SandboxConfig,
    /// Files written to the code directory (`/run/ampoule`) before the program starts.
    pub files: Vec<(String, Vec<u8>)>,
    /// Modules to import before forking (`numpy`, `pandas`, `matplotlib.pyplot`).
    pub preload: Vec<String>,
    /// Python code run after the imports, before the heap is frozen (empty: none).
    pub warmup: String,
    /// The most children it may have alive at once: the host's per-user limits are raised to
    /// hold that many at their own (see [`crate::ucounts::ensure_host_room`]).
    pub max_children: u64,
    /// Whether its children may trust the egress gateway's CA (a pool with a network whose
    /// gateway terminates TLS to inject credentials): the zygote's root then has an empty
    /// `/etc/ampoule` for each child to mount its trust files on. Not for a zygote of an image.
    pub trust_gateway_ca: bool,
}

/// What the zygote said when it was ready.
#[derive(Debug, Clone, Default)]
pub struct ZygoteInfo {
    /// The interpreter (`CPython 3.11.2`).
    pub runtime: String,
    /// Modules it imported.
    pub preloaded: Vec<String>,
    /// Modules it could not import, with the error.
    pub failed: Vec<String>,
    /// Milliseconds the imports took.
    pub ready_ms: f64,
    /// MiB of its memory mapped with huge pages (what makes a fork cheap).
    pub huge_mib: u64,
    /// KiB of its pages every child copies ahead of its request (see `learn_hot_pages`).
    pub hot_kib: u64,
    /// KiB of free heap chunks it filled before forking, so its children allocate in pages
    /// of their own (`fill_heap_holes` in zygote.py).
    pub holes_kib: u64,
    /// Objects it made immortal before forking, so that its children never write their
    /// reference counts (CPython 3.12+; 0 before: see `immortalize` in zygote.py).
    pub immortal: u64,
    /// Its threads when it got ready (1: a fork copies only the calling thread, so any other
    /// would be missing in the children, with whatever lock it held).
    pub threads: u64,
}

type ForkReply = std::result::Result<(i32, OwnedFd, ExitSlot), String>;
type ExitSlot = watch::Receiver<Option<ProgramExit>>;

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<u64, oneshot::Sender<ForkReply>>>,
    exits: Mutex<HashMap<i32, watch::Sender<Option<ProgramExit>>>>,
    dead: AtomicBool,
}

struct Inner {
    // Drop order: the reader stops before the zygote's sandbox is killed.
    reader: tokio::task::JoinHandle<()>,
    sock: Arc<AsyncFd<OwnedFd>>,
    shared: Arc<Shared>,
    sandbox: Mutex<Option<Sandbox>>,
    /// What each child sets: what a cold sandbox inherits, within its share of the zygote's
    /// (see [`crate::ucounts::UserRlimits::per_child`]).
    user_rlimits: crate::ucounts::UserRlimits,
    info: ZygoteInfo,
    next_id: AtomicU64,
    forks: AtomicU64,
    started: Instant,
    /// [`ZygoteConfig::trust_gateway_ca`].
    trust_gateway_ca: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
        if let Ok(mut sandbox) = self.sandbox.lock()
            && let Some(sb) = sandbox.as_mut()
        {
            sb.kill();
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zygote")
            .field("runtime", &self.info.runtime)
            .field("forks", &self.forks.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A running zygote. Cheap to clone; the zygote (and every session it forked) lives until the
/// last clone and the last of its sessions are dropped.
#[derive(Debug, Clone)]
pub struct Zygote {
    inner: Arc<Inner>,
}

/// The host side of a zygote-born process: a pidfd to signal and watch it, and the exit status
/// the zygote reports.
#[derive(Debug)]
pub(crate) struct Forked {
    pub(crate) pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    exit: ExitSlot,
    _zygote: Arc<Inner>,
}

impl Forked {
    pub(crate) fn kill(&self) {
        let _ = crate::sys::pidfd_kill(self.pidfd.get_ref().as_raw_fd());
    }

    /// Waits for the process to end; its status as the zygote reported it (or `Killed`).
    pub(crate) async fn wait(&self) -> ProgramExit {
        // A pidfd turns readable when the process has exited.
        if let Ok(mut guard) = self.pidfd.readable().await {
            guard.retain_ready();
        }
        let mut exit = self.exit.clone();
        let reported = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                if let Some(e) = *exit.borrow_and_update() {
                    return Some(e);
                }
                if exit.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        reported.ok().flatten().unwrap_or(ProgramExit::Killed)
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Zygote {
    /// Starts a zygote and waits until it has imported its packages. Root only: the children
    /// build their namespaces with the capabilities of the zygote's user namespace, whose
    /// mounts must have been made (and locked) by real root.
    pub async fn start(host: &Host, cfg: &ZygoteConfig) -> Result<Self> {
        if !host.privileged {
            return Err(Error::Invalid(
                "zygotes need ampoule to run as root\nhint: run as root, or turn the pool's \
                 zygote off"
                    .into(),
            ));
        }
        if cfg.trust_gateway_ca && cfg.sandbox.image_root.is_some() {
            return Err(Error::Invalid(
                "credential injection into a sandbox from an image is not supported yet".into(),
            ));
        }
        let policy = SeccompPolicy::default_policy()?;
        // Not fatal (a read-only /proc/sys in a container): each session keeps its own ceiling
        // at the zygote's level, but all of them then share the host's current maximums.
        match crate::ucounts::ensure_host_room(cfg.max_children) {
            Ok(raised) => {
                for r in raised {
                    tracing::info!(
                        sysctl = r.path,
                        from = r.from,
                        to = r.to,
                        "raised a per-user limit of the host for a zygote's sessions"
                    );
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot make room in the host's per-user inotify limits: a zygote's sessions \
                 share what is left of them"
            ),
        }
        let (ours, theirs) = channel::pair()?;
        let files = cfg.files.clone();
        // The children's pid 1 is the reaper (`crate::reaper`): the zygote gets a descriptor of
        // its sealed memfd and executes `/proc/self/fd/N`, so no host path of ours appears in
        // the sandbox.
        let reaper = crate::reaper::executable()?;
        let sandbox = Sandbox::spawn_inner(
            host,
            &cfg.sandbox,
            Some((theirs, cfg.trust_gateway_ca)),
            |p| {
                for (name, contents) in &files {
                    p.scratch
                        .write(crate::scratch::CODE, name, contents, 0o644)?;
                }
                Ok(())
            },
        )
        .await?;
        nix::fcntl::fcntl(
            &ours,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::io("making the zygote socket non-blocking", e.into()))?;
        let sock =
            Arc::new(crate::sys::register_async(ours).map_err(|e| Error::io("zygote socket", e))?);
        let config = json!({"config": {
            "preload": cfg.preload,
            "warmup": cfg.warmup,
            "seccomp": policy.raw_programs(),
            "proc_masked_files": crate::init::PROC_MASKED_FILES,
            "proc_masked_dirs": crate::init::PROC_MASKED_DIRS,
            "landlock_rw_dirs": crate::init::LANDLOCK_RW_DIRS,
            "landlock_rw_devs": crate::init::LANDLOCK_RW_DEVS,
            "sandbox_uid": crate::sandbox::SANDBOX_UID,
            "hostname": crate::sandbox::HOSTNAME,
        }});
        send(&sock, &config, &[reaper.as_raw_fd()]).await?;
        let ready = tokio::time::timeout(READY_TIMEOUT, recv(&sock))
            .await
            .map_err(|_| Error::Channel("the zygote did not get ready in time".into()))??;
        let info = match ready {
            Some((msg, _)) if msg.get("ready").is_some() => {
                let r = &msg["ready"];
                let strings = |v: &Value| -> Vec<String> {
                    v.as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                ZygoteInfo {
                    runtime: r["runtime"].as_str().unwrap_or_default().to_owned(),
                    preloaded: strings(&r["preloaded"]),
                    failed: strings(&r["failed"]),
                    ready_ms: r["ms"].as_f64().unwrap_or_default(),
                    huge_mib: r["huge_mib"].as_u64().unwrap_or_default(),
                    hot_kib: r["hot_kib"].as_u64().unwrap_or_default(),
                    holes_kib: r["holes_kib"].as_u64().unwrap_or_default(),
                    immortal: r["immortal"].as_u64().unwrap_or_default(),
                    threads: r["threads"].as_u64().unwrap_or_default(),
                }
            }
            other => {
                return Err(Error::Channel(format!(
                    "the zygote did not start: {}",
                    other
                        .map(|(m, _)| m.to_string())
                        .unwrap_or_else(|| "it exited".into())
                )));
            }
        };
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read_replies(sock.clone(), shared.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                reader,
                sock,
                shared,
                sandbox: Mutex::new(Some(sandbox)),
                user_rlimits: crate::ucounts::UserRlimits::per_child(
                    crate::ucounts::UserRlimits::for_zygote(),
                    cfg.max_children,
                ),
                info,
                next_id: AtomicU64::new(1),
                forks: AtomicU64::new(0),
                started: Instant::now(),
                trust_gateway_ca: cfg.trust_gateway_ca,
            }),
        })
    }

    /// What the zygote reported when it got ready.
    pub fn info(&self) -> &ZygoteInfo {
        &self.inner.info
    }

    /// Whether `other` is a clone of this zygote (the same process).
    pub fn is(&self, other: &Zygote) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Sessions forked so far.
    pub fn forks(&self) -> u64 {
        self.inner.forks.load(Ordering::Relaxed)
    }

    /// Time since the zygote got ready.
    pub fn age(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Stops the zygote now and waits until its sandbox is gone (every session it forked dies
    /// with it). Dropping the last clone also stops it, without waiting.
    pub async fn close(&self) {
        // End of stream on its socket makes the zygote exit; its pid 1 then ends the namespace
        // with every child in it, and the init processes exit in order. Killing is the
        // fallback.
        let _ = nix::sys::socket::shutdown(
            self.inner.sock.get_ref().as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        );
        let sandbox = lock(&self.inner.sandbox).take();
        if let Some(mut sb) = sandbox {
            let _ = tokio::time::timeout(Duration::from_secs(2), sb.wait()).await;
            sb.finish().await;
        }
    }

    /// Whether the zygote still answers (its process and socket are alive).
    pub fn is_alive(&self) -> bool {
        !self.inner.shared.dead.load(Ordering::Relaxed)
    }

    /// Forks a new sandbox running the zygote's program, with `cfg`'s environment, working
    /// directory, limits and network (`argv` and `ro_binds` are the zygote's). `prepare` runs
    /// with the scratch space before the program continues, as in [`Sandbox::spawn`].
    pub async fn spawn(
        &self,
        host: &Host,
        cfg: &SandboxConfig,
        prepare: impl FnOnce(&Scratch) -> Result<()>,
    ) -> Result<Sandbox> {
        self.spawn_with(host, cfg, |p| prepare(p.scratch)).await
    }

    /// [`Zygote::spawn`] with a hook that also sees the network addresses (allowlist mode), as
    /// in [`Sandbox::spawn_with`]: start the egress gateway there.
    ///
    /// In allowlist mode the child is wired exactly as an init-born sandbox is (see
    /// [`crate::network`]): its spare already made its network namespace (with `lo` up); once
    /// the child has its request and says so (its scratch directory), the supervisor enters
    /// that namespace through the child's pidfd and makes the veth pair, `eth0` without IPv6,
    /// its address and default route; the child bind-mounts the slot's `/etc/resolv.conf` and,
    /// when the gateway terminates TLS, the same trust files as `init` writes, from its own
    /// scratch; the environment gets the same CA variables. The zygote itself has no network.
    pub async fn spawn_with(
        &self,
        host: &Host,
        cfg: &SandboxConfig,
        prepare: impl FnOnce(crate::Prepare<'_>) -> Result<()>,
    ) -> Result<Sandbox> {
        if !self.is_alive() {
            return Err(Error::Channel("the zygote has exited".into()));
        }
        // `Some(ca)` in allowlist mode.
        let allowlist = match &cfg.network {
            Network::None => None,
            Network::Allowlist { trusted_ca_pem } => {
                if trusted_ca_pem.is_some() && !self.inner.trust_gateway_ca {
                    return Err(Error::Invalid(
                        "this zygote's children cannot trust the egress gateway's CA (start it \
                         with `trust_gateway_ca`)"
                            .into(),
                    ));
                }
                crate::network::ensure_table(host)?;
                Some(trusted_ca_pem.clone())
            }
        };
        let started = Instant::now();
        let slot = host.acquire_slot()?;
        let addrs = allowlist
            .as_ref()
            .map(|_| GatewayAddrs::for_slot(slot.index()));
        let trusted_ca_pem = allowlist.flatten();
        let mut env = cfg.env.clone();
        if trusted_ca_pem.is_some() {
            for (k, v) in crate::network::ca_env() {
                env.retain(|(name, _)| name != k);
                env.push((k.to_owned(), v.to_owned()));
            }
        }
        // What the child mounts over its `/etc` (see `network_files` in zygote.py).
        let network = addrs.as_ref().map(|a| {
            json!({
                "resolv_conf": crate::network::resolv_conf(a),
                "ca_pem": trusted_ca_pem,
                "ca_bundle": crate::network::CA_BUNDLE,
                "egress_ca": crate::network::EGRESS_CA,
                "system_bundle": crate::network::SYSTEM_BUNDLE,
            })
        });
        let cgroup = match &host.cgroups {
            Some(root) => Some(root.create(&slot.cgroup_name(), &cfg.limits)?),
            None => None,
        };
        // Dropped (killed and removed) on any error below.
        let cgroup = cgroup.map(|c| CgroupGuard(Some(c)));
        let limits = &cfg.limits;
        let disk_bytes = limits.disk_mib.saturating_mul(1024 * 1024);
        let (ours, theirs) = channel::pair()?;
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| Error::io("creating the sandbox's pipes", e.into()))
        };
        let (stdin_r, stdin_w) = if cfg.stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            let null =
                std::fs::File::open("/dev/null").map_err(|e| Error::io("opening /dev/null", e))?;
            (OwnedFd::from(null), None)
        };
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        let mut tasks = Vec::new();
        if let Some(cg) = cgroup.as_ref().and_then(CgroupGuard::get)
            && cg.version() == CgroupVersion::V1
        {
            for path in cg.self_join_files() {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                tasks.push(OwnedFd::from(f));
            }
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let user = &self.inner.user_rlimits;
        let request = json!({"fork": {
            "id": id,
            "env": env,
            "cwd": cfg.cwd,
            // The slot's ids, as the zygote's namespace maps them: the child runs as its own
            // host uid, like a cold sandbox (see `crate::ucounts`).
            "ids": host.zygote_ids_for(&slot),
            "scratch_bytes": disk_bytes,
            "scratch_inodes": limits.disk_inodes,
            "rlimits": {
                "nofile": limits.open_files,
                "fsize": disk_bytes.max(1),
                "cpu_s": crate::sandbox::cpu_backstop_s(limits),
                "nproc": crate::sandbox::nproc_backstop(host, limits),
                "sigpending": user.sigpending,
                "msgqueue": user.msgqueue,
                "memlock": user.memlock,
            },
            "network": network,
        }});
        let mut fds: Vec<RawFd> = vec![
            theirs.as_raw_fd(),
            stdin_r.as_raw_fd(),
            stdout_w.as_raw_fd(),
            stderr_w.as_raw_fd(),
        ];
        fds.extend(tasks.iter().map(AsRawFd::as_raw_fd));
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.shared.pending).insert(id, tx);
        let sent = send(&self.inner.sock, &request, &fds).await;
        // The child holds its own copies now.
        drop((theirs, stdin_r, stdout_w, stderr_w, tasks));
        if let Err(e) = sent {
            lock(&self.inner.shared.pending).remove(&id);
            return Err(e);
        }
        let reply = match tokio::time::timeout(FORK_TIMEOUT, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(Error::Channel("the zygote has exited".into())),
            Err(_) => {
                lock(&self.inner.shared.pending).remove(&id);
                return Err(Error::Channel("the zygote did not fork in time".into()));
            }
        };
        let (_local_pid, pidfd, exit) =
            reply.map_err(|m| Error::Channel(format!("the zygote could not fork: {m}")))?;
        self.inner.forks.fetch_add(1, Ordering::Relaxed);
        let pid = crate::sys::pidfd_pid(pidfd.as_raw_fd())
            .map_err(|e| Error::io("reading the child's pid", e))?;
        // A second handle on the program: the process every entered one joins.
        let entry_pidfd = pidfd
            .try_clone()
            .map_err(|e| Error::io("duplicating the pidfd", e))?;
        let forked = Forked {
            pid,
            pidfd: crate::sys::register_async(pidfd)
                .map_err(|e| Error::io("registering the pidfd", e))?,
            exit,
            _zygote: self.inner.clone(),
        };
        // From here on dropping `forked` kills the child.
        let chan = HostChannel::new(ours)?;
        let fd = match chan.recv().await? {
            Some((FromInit::Scratch, Some(fd))) => fd,
            Some((FromInit::Failed { stage, message }, _)) => {
                return Err(Error::Setup { stage, message });
            }
            other => {
                return Err(Error::Channel(format!(
                    "expected the scratch directory, got {other:?}"
                )));
            }
        };
        let scratch = Scratch::in_user_namespace(fd, Some(host.ids_for(&slot)));
        // Moving a process into a cgroup waits for an RCU grace period: it runs while the
        // network is wired and the hook runs.
        let attach = match cgroup.as_ref().and_then(CgroupGuard::get) {
            Some(cg) if cg.version() == CgroupVersion::V2 => {
                let files = cg.procs_files();
                Some(tokio::task::spawn_blocking(move || {
                    crate::cgroup::attach_files(&files, pid)
                }))
            }
            _ => None,
        };
        if let Some(a) = &addrs {
            // Before the hook: the gateway listens on the host side's address. Netlink
            // requests block: on a thread of the blocking pool, not on the runtime's workers,
            // alongside the cgroup move.
            let (a, pidfd) = (
                a.clone(),
                forked
                    .pidfd
                    .get_ref()
                    .try_clone()
                    .map_err(|e| Error::io("duplicating the pidfd", e))?,
            );
            let wiring = std::time::Instant::now();
            tokio::task::spawn_blocking(move || crate::network::wire_forked(&a, pidfd.as_fd()))
                .await
                .map_err(|e| Error::Channel(format!("network wiring task: {e}")))??;
            tracing::debug!(
                elapsed = ?started.elapsed(),
                wiring = ?wiring.elapsed(),
                "network wired"
            );
        }
        let prepared = prepare(crate::Prepare {
            scratch: &scratch,
            network: addrs.as_ref(),
        });
        if let Some(attach) = attach {
            attach
                .await
                .map_err(|e| Error::Channel(format!("cgroup attach task: {e}")))??;
        }
        prepared?;
        chan.send(&ToInit::Start).await?;
        let landlock = match chan.recv().await? {
            Some((FromInit::Ready { landlock }, _)) => landlock,
            Some((FromInit::Failed { stage, message }, _)) => {
                return Err(Error::Setup { stage, message });
            }
            other => return Err(Error::Channel(format!("expected ready, got {other:?}"))),
        };
        tracing::debug!(elapsed = ?started.elapsed(), pid, "zygote child ready");
        let (_, host_gid) = host.ids_for(&slot);
        let entry = Arc::new(crate::enter::Target {
            pidfd: entry_pidfd,
            exe: host.init_exe.clone(),
            cgroup: cgroup
                .as_ref()
                .and_then(CgroupGuard::get)
                .map(crate::cgroup::Cgroup::join_files)
                .unwrap_or_default(),
            rlimits: crate::init::Rlimits {
                nofile: limits.open_files,
                fsize: disk_bytes.max(1),
                cpu_s: crate::sandbox::cpu_backstop_s(limits),
                nproc: Some(crate::sandbox::nproc_backstop(host, limits)),
                user: Some(*user),
            },
            host_gid,
            privileged: host.privileged,
            scratch: scratch.try_clone().ok(),
            over: Default::default(),
        });
        let stdio = crate::sandbox::async_stdio(stdin_w, stdout_r, stderr_r)?;
        Ok(Sandbox::from_fork(
            forked,
            cgroup.and_then(CgroupGuard::into_inner),
            chan,
            scratch,
            slot,
            addrs,
            landlock,
            started,
            stdio,
            Some(entry),
        ))
    }
}

/// Kills and removes a cgroup unless handed on.
struct CgroupGuard(Option<crate::cgroup::Cgroup>);

impl CgroupGuard {
    fn get(&self) -> Option<&crate::cgroup::Cgroup> {
        self.0.as_ref()
    }

    fn into_inner(mut self) -> Option<crate::cgroup::Cgroup> {
        self.0.take()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = &self.0 {
            cg.kill_and_remove();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn send(sock: &AsyncFd<OwnedFd>, msg: &Value, fds: &[RawFd]) -> Result<()> {
    let buf = serde_json::to_vec(msg).map_err(|e| Error::Channel(format!("encode: {e}")))?;
    loop {
        let mut guard = sock
            .writable()
            .await
            .map_err(|e| Error::io("zygote socket", e))?;
        match channel::send_fds(
            sock.get_ref().as_raw_fd(),
            &buf,
            fds,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::Channel(format!("zygote send: {e}"))),
        }
    }
}

async fn recv(sock: &AsyncFd<OwnedFd>) -> Result<Option<(Value, Vec<OwnedFd>)>> {
    loop {
        let mut guard = sock
            .readable()
            .await
            .map_err(|e| Error::io("zygote socket", e))?;
        match channel::recv_fds(sock.get_ref().as_raw_fd(), MsgFlags::MSG_DONTWAIT) {
            Ok(Some((buf, fds))) => {
                let msg = serde_json::from_slice(&buf)
                    .map_err(|e| Error::Channel(format!("zygote sent bad JSON: {e}")))?;
                return Ok(Some((msg, fds)));
            }
            Ok(None) => return Ok(None),
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::Channel(format!("zygote recv: {e}"))),
        }
    }
}

/// Routes the zygote's replies to the waiting spawns, and exit reports to the children's
/// watchers, until the zygote goes away.
async fn read_replies(sock: Arc<AsyncFd<OwnedFd>>, shared: Arc<Shared>) {
    loop {
        let Ok(Some((msg, mut fds))) = recv(&sock).await else {
            break;
        };
        if let Some(f) = msg.get("forked") {
            let id = f["id"].as_u64().unwrap_or_default();
            let pid = f["pid"].as_i64().unwrap_or_default() as i32;
            let Some(tx) = lock(&shared.pending).remove(&id) else {
                continue;
            };
            let reply = match fds.pop() {
                Some(pidfd) => {
                    let (etx, erx) = watch::channel(None);
                    lock(&shared.exits).insert(pid, etx);
                    Ok((pid, pidfd, erx))
                }
                None => Err("no pidfd in the reply".to_owned()),
            };
            let _ = tx.send(reply);
        } else if let Some(e) = msg.get("error") {
            let message = e["message"].as_str().unwrap_or("unknown error").to_owned();
            if let Some(id) = e["id"].as_u64()
                && let Some(tx) = lock(&shared.pending).remove(&id)
            {
                let _ = tx.send(Err(message));
            } else {
                tracing::warn!(%message, "zygote error");
            }
        } else if let Some(x) = msg.get("exit") {
            let pid = x["pid"].as_i64().unwrap_or_default() as i32;
            let exit = match (x["code"].as_i64(), x["signal"].as_i64()) {
                (_, Some(sig)) => ProgramExit::Signaled(sig as i32),
                (Some(code), None) => ProgramExit::Exited(code as i32),
                (None, None) => ProgramExit::Killed,
            };
            if let Some(tx) = lock(&shared.exits).remove(&pid) {
                let _ = tx.send(Some(exit));
            }
        }
    }
    shared.dead.store(true, Ordering::Relaxed);
    lock(&shared.pending).clear();
    for (_, tx) in lock(&shared.exits).drain() {
        let _ = tx.send(Some(ProgramExit::Killed));
    }
}
