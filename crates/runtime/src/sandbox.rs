//! The supervisor side of one sandbox: spawn, hand over inputs, wait, kill, tear down.
//!
//! [`Sandbox::spawn`] starts the init process (see [`crate::init`]), sends it the spec, lets the
//! caller write inputs into the scratch space, then starts the program. The sandbox is killed
//! through its cgroup (and through its outer init, our direct child, whose death takes the pid
//! namespace down with it). [`Sandbox::finish`] reaps, reads the cgroup's figures and removes
//! it; dropping a `Sandbox` (or the `spawn` future) at any point still kills and removes
//! everything.
//!
//! In allowlist network mode ([`Network::Allowlist`], root only) the supervisor also wires the
//! sandbox's veth pair once the outer init has unshared its network namespace, and hands the
//! link's addresses to the `prepare` hook ([`Prepare::network`]), where the caller starts the
//! egress gateway before the program can open its first connection.
//!
//! Note: the outer init asks for `SIGKILL` when its parent *thread* exits, so sandboxes must be
//! spawned from threads that live as long as the sandbox (tokio worker threads or the main
//! thread; never from `spawn_blocking`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use ampoule_types::Limits;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::cgroup::{Cgroup, CgroupStats, CgroupVersion};
use crate::channel::{self, FromInit, HostChannel, InitSpec, ToInit};
use crate::enter::{Entrance, Target};
use crate::error::{Error, Result};
use crate::host::{Host, Slot};
use crate::init::INIT_ARG;
use crate::network::{self, GatewayAddrs, InitNetwork, Network};
use crate::scratch::Scratch;

/// `RLIMIT_CPU` of a sandbox: a generous backstop; the wall clock and the cgroup's CPU quota do
/// the real work.
pub(crate) fn cpu_backstop_s(limits: &Limits) -> u64 {
    (limits.timeout_s * limits.cpus.max(1.0) * 2.0).ceil() as u64 + 10
}

/// Open files a zygote may have (and so the most any of its children may get).
const ZYGOTE_NOFILE: u64 = 65_536;

/// Uid and gid of the sandbox user as the code sees them.
pub const SANDBOX_UID: u32 = 1000;
/// The host name inside every sandbox (also in its generated `/etc/hostname` and `/etc/hosts`).
pub(crate) const HOSTNAME: &str = "sandbox";

/// What to run and with which limits.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Program and arguments; `argv[0]` is an absolute path inside the sandbox.
    pub argv: Vec<String>,
    /// The complete environment of the program.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// Resource limits.
    pub limits: Limits,
    /// Extra host paths bound read-only at the same place (runtimes outside `/usr`).
    pub ro_binds: Vec<PathBuf>,
    /// Give the program a stdin pipe (otherwise `/dev/null`).
    pub stdin: bool,
    /// Network access: none (loopback only, the default) or only through the egress gateway.
    pub network: Network,
    /// A disk image (see [`crate::disk`]) holding the scratch instead of a tmpfs: the
    /// sandbox's files outlive it. Root only; never for a zygote.
    pub disk: Option<PathBuf>,
    /// An OCI image's unpacked root (`ampoule_image`), shared read-only by every sandbox of
    /// the image: the sandbox's `/` is an overlay of it whose upper layer lives in the scratch
    /// (so it counts against the disk limit and vanishes with the sandbox), instead of the
    /// host's `/usr` and generated `/etc`. Root only.
    pub image_root: Option<PathBuf>,
    /// With `image_root`: `/` is writable, the image's files seen as the sandbox user's
    /// (through an idmapped lower layer), every change copied up into the sandbox's own layer.
    /// Not for a zygote (its children would share one layer).
    pub writable_root: bool,
    /// Which tier runs the sandbox (see [`crate::gvisor`]).
    pub isolation: crate::gvisor::Isolation,
    /// gVisor tier only: start the sandbox from this checkpoint image (made by
    /// [`Sandbox::checkpoint`]) instead of running `argv`: its processes come back with their
    /// memory, on this config's scratch and stdio pipes.
    pub restore_image: Option<PathBuf>,
}

impl SandboxConfig {
    /// A config with the default limits, cwd `/mnt/data` and the base environment.
    pub fn new(argv: Vec<String>) -> Self {
        Self {
            argv,
            env: crate::language::base_env(),
            cwd: "/mnt/data".into(),
            limits: Limits::default(),
            ro_binds: Vec::new(),
            stdin: false,
            network: Network::None,
            disk: None,
            image_root: None,
            writable_root: false,
            isolation: crate::gvisor::Isolation::Namespaces,
            restore_image: None,
        }
    }
}

/// How the program ended, as the sandbox's init reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramExit {
    /// Exited with this code.
    Exited(i32),
    /// Ended by this signal.
    Signaled(i32),
    /// The sandbox was torn down before the program's end could be reported (a kill).
    Killed,
}

/// What [`Sandbox::finish`] measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Finished {
    /// Cgroup figures, when cgroups are in use.
    pub stats: Option<CgroupStats>,
}

/// The files generated for the sandbox's `/etc`.
fn etc_files() -> Vec<(String, String)> {
    [
        (
            "passwd",
            "root:x:0:0:root:/root:/usr/sbin/nologin\n\
             sandbox:x:1000:1000:sandbox:/mnt/data:/bin/bash\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        ),
        ("group", "root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n"),
        (
            "hosts",
            "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        ),
        ("hostname", "sandbox\n"),
        ("resolv.conf", "# no network\n"),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Public, secret-free host files the runtimes need (certificates, linker cache, fonts).
const ETC_BINDS: &[&str] = &[
    // Certificates and OpenSSL's configuration only: /etc/ssl/private holds host keys.
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates",
    "ca-certificates.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    // Mono's configuration (dllmap of its native libraries), for the C# kernel.
    "mono",
    "fonts",
    "mime.types",
    "matplotlibrc",
    "protocols",
    "services",
    "os-release",
];

/// What the `prepare` hook of [`Sandbox::spawn_with`] gets: the sandbox as it stands after its
/// root is built and before its program starts.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Prepare<'a> {
    /// The scratch space: write code and inputs here.
    pub scratch: &'a Scratch,
    /// In allowlist mode, the link's addresses: the egress gateway must listen on
    /// [`GatewayAddrs::proxy`] and [`GatewayAddrs::dns`] before the hook returns.
    pub network: Option<&'a GatewayAddrs>,
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    // Field order matters for drop: the init is killed before the cgroup is emptied and removed.
    child: Proc,
    cgroup: Option<OwnedCgroup>,
    /// The gVisor tier's state, mounts and directory: removed once the cgroup is gone.
    gvisor: Option<Box<crate::gvisor::RunDir>>,
    /// The channel to the init (default tier); `None` on the gVisor tier.
    chan: Option<HostChannel>,
    scratch: Scratch,
    _slot: Slot,
    network: Option<GatewayAddrs>,
    /// What [`Sandbox::entrance`] hands out, once the program runs.
    entry: Option<Arc<Target>>,
    landlock: String,
    started: Instant,
    exit: Option<ProgramExit>,
    /// The program's stdin, when [`SandboxConfig::stdin`] asked for one.
    pub stdin: Option<ChildStdin>,
    /// The program's stdout.
    pub stdout: Option<ChildStdout>,
    /// The program's stderr.
    pub stderr: Option<ChildStderr>,
}

impl Sandbox {
    /// Builds a sandbox and starts `cfg.argv` in it. `prepare` runs after the scratch space
    /// exists and before the program starts: that is where inputs and code are written.
    pub async fn spawn(
        host: &Host,
        cfg: &SandboxConfig,
        prepare: impl FnOnce(&Scratch) -> Result<()>,
    ) -> Result<Self> {
        Self::spawn_with(host, cfg, |p| prepare(p.scratch)).await
    }

    /// [`Sandbox::spawn`] with a hook that also sees the network addresses (allowlist mode):
    /// start the egress gateway there.
    pub async fn spawn_with(
        host: &Host,
        cfg: &SandboxConfig,
        prepare: impl FnOnce(Prepare<'_>) -> Result<()>,
    ) -> Result<Self> {
        Self::spawn_inner(host, cfg, None, prepare).await
    }

    /// The common path; `zygote` is the zygote's end of its control socket, which becomes the
    /// program's stdin, and makes the program a zygote (see [`crate::zygote`]), with whether its
    /// children may trust the egress gateway's CA (`/etc/ampoule` made as their mount point).
    pub(crate) async fn spawn_inner(
        host: &Host,
        cfg: &SandboxConfig,
        zygote: Option<(std::os::fd::OwnedFd, bool)>,
        prepare: impl FnOnce(Prepare<'_>) -> Result<()>,
    ) -> Result<Self> {
        let is_zygote = zygote.is_some();
        let ca_mount_point = zygote.as_ref().is_some_and(|(_, ca)| *ca);
        if let Some((bind, area)) = hidden_bind(&cfg.ro_binds) {
            return Err(Error::Invalid(format!(
                "{} cannot be bound into a sandbox: it lies under {area}, which every sandbox \
                 mounts afresh over it (the program would not find it)\n\
                 hint: keep runtimes and the data directory (AMPOULE_DATA_DIR) outside {}",
                bind.display(),
                crate::init::LANDLOCK_RW_DIRS.join(", ")
            )));
        }
        if cfg.isolation == crate::gvisor::Isolation::Gvisor {
            if is_zygote {
                return Err(Error::Invalid(
                    "zygotes run on the namespaces tier only".into(),
                ));
            }
            return crate::gvisor::spawn(host, cfg, etc_files(), ETC_BINDS, prepare).await;
        }
        if cfg.restore_image.is_some() {
            return Err(Error::Invalid(
                "only sandboxes of the gvisor tier can be restored from a checkpoint".into(),
            ));
        }
        if cfg.argv.is_empty() {
            return Err(Error::Invalid("nothing to run".into()));
        }
        // `Some(ca)` in allowlist mode.
        let allowlist: Option<&Option<String>> = match &cfg.network {
            Network::None => None,
            Network::Allowlist { trusted_ca_pem } => {
                if !host.privileged {
                    return Err(Error::Invalid(
                        "network allowlists need ampoule to run as root: the sandbox's veth \
                         pair and the nftables rules that confine it can only be made by real \
                         root; unprivileged sandboxes have loopback only\n\
                         hint: run as root, or drop the allowed hosts"
                            .into(),
                    ));
                }
                network::ensure_table(host)?;
                Some(trusted_ca_pem)
            }
        };
        if let Some(disk) = &cfg.disk {
            if !host.privileged || is_zygote {
                return Err(Error::Invalid(
                    "a sandbox on a disk image needs root (loop devices), and no zygote".into(),
                ));
            }
            // The previous sandbox on this image must be gone before its next mount.
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            while crate::disk::in_use(disk) {
                if Instant::now() >= deadline {
                    return Err(Error::Invalid(format!(
                        "the disk {} is still held by a previous sandbox",
                        disk.display()
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
        if let Some(root) = &cfg.image_root {
            if !host.privileged {
                return Err(Error::Invalid(
                    "a sandbox from an image needs ampoule to run as root (its root is an \
                     overlay mounted by real root)"
                        .into(),
                ));
            }
            if allowlist.is_some_and(Option::is_some) {
                return Err(Error::Invalid(
                    "credential injection into a sandbox from an image is not supported yet".into(),
                ));
            }
            let usable = root.is_absolute()
                && root.is_dir()
                && !root.to_string_lossy().contains([',', ':', '\\']);
            if !usable {
                return Err(Error::Invalid(format!(
                    "the image root {} is not a directory usable as an overlay layer",
                    root.display()
                )));
            }
        }
        let slot = host.acquire_slot()?;
        let addrs = allowlist.map(|_| GatewayAddrs::for_slot(slot.index()));
        let trusted_ca_pem = allowlist.cloned().flatten();
        let mut env = cfg.env.clone();
        let mut etc = etc_files();
        if let Some(a) = &addrs {
            for (name, contents) in &mut etc {
                if name == "resolv.conf" {
                    *contents = network::resolv_conf(a);
                }
            }
        }
        if trusted_ca_pem.is_some() {
            for (k, v) in network::ca_env() {
                env.retain(|(name, _)| name != k);
                env.push((k.to_owned(), v.to_owned()));
            }
        }
        let (host_uid, host_gid) = host.ids_for(&slot);
        let limits = &cfg.limits;
        let disk_bytes = limits.disk_mib.saturating_mul(1024 * 1024);
        let spec = InitSpec {
            argv: cfg.argv.clone(),
            env,
            cwd: cfg.cwd.clone(),
            hostname: HOSTNAME.into(),
            privileged: host.privileged,
            host_uid,
            host_gid,
            // A zygote is root of its user namespace (it keeps its capabilities across exec);
            // its children become SANDBOX_UID in user namespaces of their own.
            sandbox_uid: if is_zygote { 0 } else { SANDBOX_UID },
            sandbox_gid: if is_zygote { 0 } else { SANDBOX_UID },
            stage_dir: host.stage_dir(),
            scratch_dir: host.scratch_mount_dir(),
            ro_binds: cfg.ro_binds.clone(),
            etc_files: etc,
            etc_binds: ETC_BINDS.iter().map(|s| (*s).to_owned()).collect(),
            scratch_bytes: disk_bytes,
            scratch_inodes: limits.disk_inodes,
            // A zygote's hard limits bound its children's (raising one needs real root): it
            // gets generous ones, each child sets its own.
            rlimit_nofile: if is_zygote {
                // Not above ours: raising a hard limit needs CAP_SYS_RESOURCE, which root in
                // a container may lack.
                let ours =
                    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                        .map(|(_, hard)| hard)
                        .unwrap_or(limits.open_files);
                limits.open_files.max(ZYGOTE_NOFILE.min(ours))
            } else {
                limits.open_files
            },
            rlimit_fsize: if is_zygote {
                libc::RLIM_INFINITY
            } else {
                disk_bytes.max(1)
            },
            // CPU seconds backstop: generous, the wall clock and cgroup quota do the real work.
            rlimit_cpu_s: if is_zygote {
                libc::RLIM_INFINITY - 1
            } else {
                cpu_backstop_s(limits)
            },
            // A unique host uid makes RLIMIT_NPROC a per-sandbox process limit; without one
            // (unprivileged mode) it would count the user's own processes too. With a cgroup it
            // is only a backstop, set above pids.max so the cgroup (which reports the event)
            // refuses first.
            // A zygote's children count against its namespace's limit (the supervisor's),
            // each against its own backstop too (set by the child).
            rlimit_nproc: (host.privileged && !is_zygote).then(|| nproc_backstop(host, limits)),
            rlimit_user: is_zygote.then(crate::ucounts::UserRlimits::for_zygote),
            // Every slot's ids, for the children to take theirs (root only, as zygotes).
            id_map: if is_zygote && host.privileged {
                host.zygote_id_map(&slot)
            } else {
                Vec::new()
            },
            userns_limits: if is_zygote && host.privileged {
                crate::ucounts::ZYGOTE_USERNS_LIMITS
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), *value))
                    .collect()
            } else {
                Vec::new()
            },
            network: addrs.as_ref().map(|a| InitNetwork {
                address: a.sandbox,
                gateway: a.gateway,
                prefix: network::LINK_PREFIX,
            }),
            trusted_ca_pem,
            zygote: is_zygote,
            ca_mount_point,
            scratch_image: cfg.disk.clone(),
            image_root: cfg.image_root.clone(),
            writable_root: cfg.writable_root && cfg.image_root.is_some() && !is_zygote,
            early_pid1: host
                .cgroups
                .as_ref()
                .is_none_or(|root| root.version() == CgroupVersion::V1),
            ignored_signals: crate::sys::ignored_signals(),
        };

        let preforked = if is_zygote || cfg.stdin {
            None
        } else {
            host.take_preforked_init()
        };
        let started = Instant::now();
        let (child, ours, stdin, stdout, stderr) = match preforked {
            Some(init) => {
                let (child, chan, stdout, stderr) = init.into_parts()?;
                let (stdin, stdout, stderr) = async_stdio(None, stdout, stderr)?;
                (Proc::Preforked(child), chan, stdin, stdout, stderr)
            }
            None => {
                let (ours, theirs) = channel::pair()?;
                let mut cmd = tokio::process::Command::new(&host.init_exe);
                cmd.arg(INIT_ARG)
                    .env_clear()
                    .stdin(match zygote {
                        Some((fd, _)) => Stdio::from(fd),
                        None if cfg.stdin => Stdio::piped(),
                        None => Stdio::null(),
                    })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true);
                {
                    use std::os::fd::AsRawFd;
                    crate::sys::pass_fd(&mut cmd, theirs.as_raw_fd(), 3);
                }
                let spawned = cmd.spawn();
                drop(theirs);
                let mut child = spawned.map_err(|e| Error::io("starting the sandbox init", e))?;
                let (stdin, stdout, stderr) =
                    (child.stdin.take(), child.stdout.take(), child.stderr.take());
                (Proc::Init(child), ours, stdin, stdout, stderr)
            }
        };
        let chan = HostChannel::new(ours)?;
        // From here on, an error (or the caller dropping this future) drops `child`, which kills
        // the init and with it the pid namespace, and `cgroup`, which kills and removes it.
        let rlimits = crate::init::Rlimits::of(&spec);
        chan.send(&ToInit::Spec(Box::new(spec))).await?;
        // The cgroup is made while the init builds the root (nothing of the sandbox's may run
        // before `Start`, which waits for it). On v1 the init moves itself when `Start` brings
        // it the `tasks` files (see init.rs). On v2, move it now: moving a process waits for an
        // RCU grace period, meanwhile the init works on.
        let cgroup = match &host.cgroups {
            Some(root) => Some(OwnedCgroup(root.create(&slot.cgroup_name(), &cfg.limits)?)),
            None => None,
        };
        let mut cgroup_tasks = Vec::new();
        if let Some(cg) = &cgroup {
            for path in cg.0.self_join_files() {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                cgroup_tasks.push(std::os::fd::OwnedFd::from(file));
            }
        }
        let attach = match (&cgroup, child.id()) {
            (Some(cg), _) if cg.0.version() == CgroupVersion::V1 => None,
            (Some(cg), Some(pid)) => {
                let files = cg.0.procs_files();
                Some(tokio::task::spawn_blocking(move || {
                    crate::cgroup::attach_files(&files, pid)
                }))
            }
            (Some(_), None) => {
                return Err(Error::Channel("the sandbox init exited at once".into()));
            }
            (None, _) => None,
        };
        // Root mode: the init's first mount namespace comes with the scratch directory (see
        // `init::outer`), and its last reference goes here, after `Start`: freeing its mounts
        // then overlaps the init's own steps instead of preceding them.
        let (fd, first_mount_ns) = match chan.recv_with_fds().await? {
            Some((FromInit::Scratch, fds)) => {
                tracing::debug!(elapsed = ?started.elapsed(), "sandbox root built");
                let mut fds = fds.into_iter();
                let scratch = fds
                    .next()
                    .ok_or_else(|| Error::Channel("no scratch directory".into()))?;
                (scratch, fds.collect::<Vec<_>>())
            }
            Some((FromInit::Failed { stage, message }, _)) => {
                return Err(Error::Setup { stage, message });
            }
            other => {
                return Err(Error::Channel(format!(
                    "expected the scratch directory, got {other:?}"
                )));
            }
        };
        let scratch = Scratch::new(fd, host.privileged.then_some((host_uid, host_gid)));
        if let Some(a) = &addrs {
            let pid = child
                .id()
                .ok_or_else(|| Error::Channel("the sandbox init exited early".into()))?;
            network::wire_host_side(a, pid)?;
            tracing::debug!(elapsed = ?started.elapsed(), interface = %a.interface, "network wired");
        }
        prepare(Prepare {
            scratch: &scratch,
            network: addrs.as_ref(),
        })?;
        if let Some(attach) = attach {
            attach
                .await
                .map_err(|e| Error::Channel(format!("cgroup attach task: {e}")))??;
            tracing::debug!(elapsed = ?started.elapsed(), "init moved into its cgroup");
        }
        {
            use std::os::fd::AsRawFd;
            let fds: Vec<_> = cgroup_tasks.iter().map(AsRawFd::as_raw_fd).collect();
            chan.send_with_fds(&ToInit::Start, &fds).await?;
        }
        crate::cpus::rejoin();
        drop(cgroup_tasks);
        if !first_mount_ns.is_empty() {
            // Freeing mounts waits for an RCU grace period; nothing awaits it.
            drop(drop_off_workers(first_mount_ns));
        }
        let (landlock, pid1) = match chan.recv().await? {
            Some((FromInit::Ready { landlock }, pid1)) => {
                tracing::debug!(elapsed = ?started.elapsed(), "sandbox ready, program starting");
                (landlock, pid1)
            }
            Some((FromInit::Failed { stage, message }, _)) => {
                return Err(Error::Setup { stage, message });
            }
            other => return Err(Error::Channel(format!("expected ready, got {other:?}"))),
        };
        // The zygote's own sandbox is not for entering (its program is root of its namespace).
        let entry = match pid1 {
            Some(pidfd) if !is_zygote => Some(Arc::new(Target {
                pidfd,
                exe: host.init_exe.clone(),
                cgroup: cgroup
                    .as_ref()
                    .map(|c| c.0.join_files())
                    .unwrap_or_default(),
                rlimits,
                host_gid,
                privileged: host.privileged,
                scratch: scratch.try_clone().ok(),
                over: Default::default(),
            })),
            _ => None,
        };
        Ok(Self {
            child,
            cgroup,
            gvisor: None,
            chan: Some(chan),
            scratch,
            _slot: slot,
            network: addrs,
            entry,
            landlock,
            started,
            exit: None,
            stdin,
            stdout,
            stderr,
        })
    }

    /// Whether dropping this sandbox would only close descriptors (its scratch, its slot's
    /// lock, its channel): it is finished (no cgroup left) and holds no gVisor run directory
    /// to unmount. A process about to exit may then leave it to the kernel.
    pub fn only_descriptors_left(&self) -> bool {
        self.cgroup.is_none() && self.gvisor.is_none()
    }

    /// The addresses of the sandbox's link to the egress gateway (allowlist mode).
    pub fn network(&self) -> Option<&GatewayAddrs> {
        self.network.as_ref()
    }

    /// The scratch space (inputs, outputs).
    pub fn scratch(&self) -> &Scratch {
        &self.scratch
    }

    /// Landlock's status inside this sandbox (`fully_enforced`, `partially_enforced`,
    /// `not_enforced`).
    pub fn landlock(&self) -> &str {
        &self.landlock
    }

    /// When the init process was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The host pid of the outer init (for diagnostics).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits until the program ends (or the sandbox is killed). Cancel-safe.
    pub async fn wait(&mut self) -> Result<ProgramExit> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        if let Proc::Forked(f) = &self.child {
            let exit = f.wait().await;
            self.exit = Some(exit);
            return Ok(exit);
        }
        if let Proc::Runsc(child) = &mut self.child {
            let status = child
                .wait()
                .await
                .map_err(|e| Error::io("waiting for runsc", e))?;
            let exit = crate::gvisor::program_exit(status);
            self.exit = Some(exit);
            return Ok(exit);
        }
        let Some(chan) = &self.chan else {
            return Ok(ProgramExit::Killed);
        };
        loop {
            let exit = match chan.recv().await? {
                Some((FromInit::Exited { code }, _)) => ProgramExit::Exited(code),
                Some((FromInit::Signaled { signal }, _)) => ProgramExit::Signaled(signal),
                Some((FromInit::InitKilled { .. }, _)) | None => ProgramExit::Killed,
                Some((FromInit::Failed { stage, message }, _)) => {
                    // The program could not be executed.
                    self.exit = Some(ProgramExit::Exited(127));
                    return Err(Error::Setup { stage, message });
                }
                Some(_) => continue,
            };
            self.exit = Some(exit);
            return Ok(exit);
        }
    }

    /// Its cgroup, to freeze and thaw it (pause and resume); `None` without cgroups.
    pub fn freezer(&self) -> Option<Cgroup> {
        self.cgroup.as_ref().map(|c| c.0.clone())
    }

    /// A handle to start more processes in the sandbox and to connect to its ports (see
    /// [`crate::enter`]); `None` once the sandbox is over.
    pub fn entrance(&self) -> Option<Entrance> {
        let target = self.entry.as_ref()?;
        let entrance = Entrance::new(target.clone());
        (self.exit.is_none() && entrance.alive()).then_some(entrance)
    }

    /// Kills every process of the sandbox. Idempotent.
    pub fn kill(&mut self) {
        self.mark_over();
        if let Some(cg) = &self.cgroup {
            cg.0.kill();
        }
        self.kill_first();
    }

    /// Nothing may enter the sandbox any more (see [`crate::enter`]).
    fn mark_over(&self) {
        if let Some(t) = &self.entry {
            t.over.store(true, Ordering::Relaxed);
        }
    }

    /// Kills the sandbox's first process on the host. Everything else dies with it: the
    /// pid namespace's init has a parent-death signal (or, forked from a zygote, the zygote
    /// kills the namespace's reaper when its program ends), and pid 1's end kills the whole
    /// namespace. The cgroup is the backstop.
    fn kill_first(&mut self) {
        self.mark_over();
        match &mut self.child {
            Proc::Init(child) | Proc::Runsc(child) => {
                let _ = child.start_kill();
            }
            Proc::Forked(f) => f.kill(),
            Proc::Preforked(c) => c.start_kill(),
        }
    }

    /// Current cgroup figures (while running).
    pub fn stats(&self) -> Option<CgroupStats> {
        self.cgroup.as_ref().map(|c| c.0.stats())
    }

    /// Makes sure nothing of the sandbox runs any more, reaps it, reads the final figures and
    /// removes the cgroup. The scratch space stays readable until `self` is dropped.
    pub async fn finish(&mut self) -> Finished {
        self.mark_over();
        if self.exit.is_none() {
            self.kill_first();
        }
        // `ampoule run`'s init, forked ahead, on cgroup v1: the outer init is outside the
        // sandbox's cgroup (pid 1 joined it, see `init::outer`), so once pid 1 is gone — and
        // with it every process of its namespace — nothing of the sandbox runs and the cgroup
        // can go. The outer init is still freeing its namespaces (its mount table first, an
        // RCU grace period); that is its own business, not a step of this run: it is killed
        // and left to exit (the process that forked it runs this one sandbox and exits soon).
        if let Proc::Preforked(c) = &mut self.child
            && self
                .cgroup
                .as_ref()
                .is_some_and(|c| c.0.version() == CgroupVersion::V1)
            && let Some(target) = &self.entry
            && wait_gone(&target.pidfd, std::time::Duration::from_secs(2)).await
        {
            c.release();
        }
        // Otherwise the outer init exits right after pid 1; make sure, then reap it.
        match &mut self.child {
            Proc::Init(child) | Proc::Runsc(child) => {
                if tokio::time::timeout(std::time::Duration::from_secs(2), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
            Proc::Forked(f) => {
                if tokio::time::timeout(std::time::Duration::from_secs(2), f.wait())
                    .await
                    .is_err()
                {
                    f.kill();
                    let _ = f.wait().await;
                }
            }
            Proc::Preforked(c) if c.released() => {}
            Proc::Preforked(c) => {
                if tokio::time::timeout(std::time::Duration::from_secs(2), c.wait())
                    .await
                    .is_err()
                {
                    c.start_kill();
                    c.wait().await;
                }
            }
        }
        tracing::debug!(elapsed = ?self.started.elapsed(), "first process reaped");
        let cgroup = self.cgroup.take();
        let stats = cgroup.as_ref().map(|cg| cg.0.stats());
        // Dropping the cgroup kills whatever is left and removes it: on the blocking pool,
        // since that may wait (a freeze to settle, processes to end, `rmdir` to succeed),
        // and a runtime worker waiting there stalls every request it serves (a burst of
        // deleted sessions kept both workers asleep for 0.8 s of 2 s).
        if let Some(cg) = cgroup
            && let Some(dropping) = drop_off_workers(cg)
        {
            let _ = dropping.await;
        }
        Finished { stats }
    }
}

/// Waits until the process of `pidfd` has exited, for at most `patience`; false if it has not
/// (or its pidfd cannot be waited on).
async fn wait_gone(pidfd: &std::os::fd::OwnedFd, patience: std::time::Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    // Usually gone already (pid 1 reports the program's end, then exits): asked with one
    // `poll`, not by registering a duplicate with the runtime (five system calls more).
    let mut now = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    if poll(&mut now, PollTimeout::ZERO).is_ok_and(|n| n == 1)
        && now[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
    {
        return true;
    }
    let Ok(fd) = pidfd.try_clone() else {
        return false;
    };
    let Ok(fd) = crate::sys::register_async(fd) else {
        return false;
    };
    // A pidfd turns readable when its process has exited (and, for a pid namespace's init,
    // after the kernel has killed and reaped the rest of the namespace).
    tokio::time::timeout(patience, fd.readable())
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Drops `value`, whose drop may wait, where no other request waits behind it: on the blocking
/// pool (the returned task, to await if the caller must know it is done), or at once on a
/// current-thread runtime (the CLI's one sandbox), which serves nothing else meanwhile and
/// starts no thread for it.
fn drop_off_workers<T: Send + 'static>(value: T) -> Option<tokio::task::JoinHandle<()>> {
    let flavor = tokio::runtime::Handle::current().runtime_flavor();
    if flavor == tokio::runtime::RuntimeFlavor::CurrentThread {
        drop(value);
        None
    } else {
        Some(tokio::task::spawn_blocking(move || drop(value)))
    }
}

/// `RLIMIT_NPROC` of a sandbox with a unique host uid (root mode): a per-sandbox process limit.
/// With a cgroup it is only a backstop, set above `pids.max` so that the cgroup (which reports
/// the event) refuses first.
pub(crate) fn nproc_backstop(host: &Host, limits: &Limits) -> u64 {
    if host.cgroups.is_some() {
        limits.pids.saturating_add(16)
    } else {
        limits.pids
    }
}

/// The program's stdio as the supervisor holds it (its stdin's write end, if a pipe; the read
/// ends of stdout and stderr), made asynchronous.
pub(crate) type Stdio3 = (Option<ChildStdin>, Option<ChildStdout>, Option<ChildStderr>);

/// [`Stdio3`] from the pipe ends of a process we did not start with `Command`.
pub(crate) fn async_stdio(
    stdin: Option<std::os::fd::OwnedFd>,
    stdout: std::os::fd::OwnedFd,
    stderr: std::os::fd::OwnedFd,
) -> Result<Stdio3> {
    let stdin = match stdin {
        Some(fd) => Some(
            ChildStdin::from_std(std::process::ChildStdin::from(fd))
                .map_err(|e| Error::io("stdin pipe", e))?,
        ),
        None => None,
    };
    let stdout = ChildStdout::from_std(std::process::ChildStdout::from(stdout))
        .map_err(|e| Error::io("stdout pipe", e))?;
    let stderr = ChildStderr::from_std(std::process::ChildStderr::from(stderr))
        .map_err(|e| Error::io("stderr pipe", e))?;
    Ok((stdin, Some(stdout), Some(stderr)))
}

/// The sandbox's first process on the host: the outer init (our child), or a zygote's child.
#[derive(Debug)]
enum Proc {
    Init(Child),
    /// `runsc run` (gVisor tier): it lives as long as the sandbox and exits with its program.
    Runsc(Child),
    Forked(crate::zygote::Forked),
    /// An outer init forked ahead by the supervisor (see [`crate::prefork`]).
    Preforked(crate::prefork::InitChild),
}

impl Proc {
    fn id(&self) -> Option<u32> {
        match self {
            Proc::Init(child) | Proc::Runsc(child) => child.id(),
            Proc::Forked(f) => Some(f.pid),
            Proc::Preforked(c) => c.id(),
        }
    }
}

impl Sandbox {
    /// A sandbox whose program a zygote forked (see [`crate::zygote::Zygote::spawn`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_fork(
        forked: crate::zygote::Forked,
        cgroup: Option<Cgroup>,
        chan: HostChannel,
        scratch: Scratch,
        slot: Slot,
        network: Option<GatewayAddrs>,
        landlock: String,
        started: Instant,
        stdio: Stdio3,
        entry: Option<Arc<Target>>,
    ) -> Self {
        Self {
            child: Proc::Forked(forked),
            cgroup: cgroup.map(OwnedCgroup),
            gvisor: None,
            chan: Some(chan),
            scratch,
            _slot: slot,
            network,
            entry,
            landlock,
            started,
            exit: None,
            stdin: stdio.0,
            stdout: stdio.1,
            stderr: stdio.2,
        }
    }
}

impl Sandbox {
    /// A sandbox run by `runsc` (see [`crate::gvisor::spawn`]).
    pub(crate) fn from_runsc(
        child: Child,
        cgroup: OwnedCgroup,
        run: crate::gvisor::RunDir,
        scratch: Scratch,
        slot: Slot,
        started: Instant,
        stdio: Stdio3,
    ) -> Self {
        Self {
            child: Proc::Runsc(child),
            cgroup: Some(cgroup),
            network: run.network().cloned(),
            gvisor: Some(Box::new(run)),
            chan: None,
            scratch,
            _slot: slot,
            entry: None,
            landlock: "gvisor".into(),
            started,
            exit: None,
            stdin: stdio.0,
            stdout: stdio.1,
            stderr: stdio.2,
        }
    }

    /// Writes the sandbox's memory and processes to a checkpoint image in `image` (a
    /// directory, made 0700 if missing) and stops it: gVisor tier only (see
    /// [`crate::gvisor::checkpoint`]). Afterwards the program has exited; start it again with
    /// [`SandboxConfig::restore_image`].
    pub async fn checkpoint(&mut self, image: &Path) -> Result<()> {
        let Some(run) = &self.gvisor else {
            return Err(Error::Invalid(
                "only sandboxes of the gvisor tier can be checkpointed".into(),
            ));
        };
        if self.exit.is_some() {
            return Err(Error::Gvisor("the sandbox is not running".into()));
        }
        crate::gvisor::checkpoint(run, image).await
    }

    /// The isolation tier running this sandbox.
    pub fn isolation(&self) -> crate::gvisor::Isolation {
        if self.gvisor.is_some() {
            crate::gvisor::Isolation::Gvisor
        } else {
            crate::gvisor::Isolation::Namespaces
        }
    }
}

/// A sandbox cgroup that kills its processes and removes itself when dropped.
#[derive(Debug)]
pub(crate) struct OwnedCgroup(pub(crate) Cgroup);

impl Drop for OwnedCgroup {
    fn drop(&mut self) {
        self.0.kill_and_remove();
    }
}

/// The first of `binds` that a sandbox's own writable areas (`/tmp`, `/mnt/data`…) would hide,
/// with that area: a runtime or environment there is invisible to the program.
fn hidden_bind(binds: &[PathBuf]) -> Option<(&Path, &'static str)> {
    binds.iter().find_map(|bind| {
        crate::init::LANDLOCK_RW_DIRS
            .iter()
            .find(|area| bind.starts_with(area))
            .map(|area| (bind.as_path(), *area))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_under_a_writable_area_are_found() {
        let binds = [
            PathBuf::from("/opt/python"),
            PathBuf::from("/tmp/data/python"),
        ];
        assert_eq!(
            hidden_bind(&binds),
            Some((Path::new("/tmp/data/python"), "/tmp"))
        );
        assert_eq!(hidden_bind(&[PathBuf::from("/tmpfoo/python")]), None);
        assert_eq!(
            hidden_bind(&[PathBuf::from("/var/lib/ampoule/python")]),
            None
        );
    }
}
