//! The gVisor isolation tier: the program runs under `runsc`, gVisor's OCI runtime, whose
//! sentry is a user-space kernel: the code's system calls never reach the host kernel.
//!
//! The tier is chosen per sandbox by [`SandboxConfig::isolation`] and is invisible above this
//! crate: [`crate::Sandbox::spawn_with`] returns the same [`crate::Sandbox`] (stdio pipes for
//! the kernel protocol, a [`Scratch`] for the file API, a cgroup for limits, figures, freeze
//! and kill) whichever tier runs it.
//!
//! Layout of one gVisor sandbox, all under `<runtime_dir>/gvisor/sbx-<slot>/` (mode 0700):
//! * `scratch/`: a tmpfs (or the durable sandbox's disk image) mounted *on the host*, sized by
//!   the disk limit, holding `data` (`/mnt/data`), `tmp` (`/tmp`, `/var/tmp`) and `.ampoule`
//!   (`/run/ampoule`, read-only inside): the same scratch the default tier has, so the file
//!   API is unchanged. runsc's gofer serves these binds to the sentry.
//! * `bundle/rootfs/`: the mount points and the generated `/etc` files; the root is read-only
//!   and the host's `/usr` (and its `/bin`, `/lib`… shape), public `/etc` files and runtimes
//!   outside `/usr` are read-only binds, exactly as in the default tier's root.
//! * `bundle/config.json`: the OCI spec (args, env, cwd, uid 1000, rlimits, no capabilities,
//!   `noNewPrivileges`, `/dev/fuse` and `/dev/net/tun` masked, an empty `/sys`).
//! * `state/`: runsc's `--root` (its container state), removed with the sandbox.
//!
//! Cgroups: runsc runs with `--ignore-cgroups` and is moved into the sandbox's own cgroup
//! *before* it executes (`cgroup.procs` written between fork and exec), so its sentry and
//! gofer, and everything the code does, are charged to and killed with that cgroup. Letting
//! runsc create cgroups itself (`cgroupsPath`) makes it create a directory in every v1
//! hierarchy, including ones ampoule does not manage, and a failed or killed runsc leaves
//! them behind; without `cgroupsPath` it creates `runsc-*` at the root of each hierarchy. The
//! cgroup's `pids.max` must leave room for the sentry's own threads (a tight one crashed the
//! sentry), so it gets [`SENTRY_PIDS`] more; the code's own process limit is `RLIMIT_NPROC`,
//! which the sentry enforces inside. Its memory limit gets [`SENTRY_MEMORY_MIB`] more for the
//! sentry and gofer.
//!
//! Network: without an allowlist the sandbox runs `--network=none` (the sentry's loopback
//! only). With one, the supervisor makes the sandbox's network namespace itself, wired exactly
//! as the default tier's (`lo`, `eth0` with its `/30` and a default route to the gateway,
//! `amp<slot>` on the host; [`crate::network::pinned_namespace`]), pins it on `netns` in the
//! sandbox's directory and names that path in the spec's `linux.namespaces`; runsc, with
//! `--network=sandbox`, joins it and hands its interfaces and routes to gVisor's netstack, so
//! the code's packets leave through the same veth, nftables table and gateway. runsc runs in a
//! private mount namespace whose `/proc/sys` hides `net` (see
//! [`crate::sys::hide_net_sysctls_before_exec`] for the runsc bug this works around).
//!
//! Checkpoints: [`checkpoint`] writes a running sandbox (without network) to an image, and
//! [`SandboxConfig::restore_image`] starts one from it (`runsc restore` instead of `runsc run`,
//! same bundle, same disk): durable sandboxes hibernate with their memory this way.
//!
//! Not (yet) on this tier: sandboxes from OCI images, entering a running sandbox, zygotes. `--oci-seccomp` is
//! not used: the sentry implements every system call itself and runs under gVisor's own
//! host seccomp filter, so a filter inside would only narrow the sentry's emulated surface.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ampoule_types::Limits;
use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, IoContext, Result};
use crate::host::Host;
use crate::network::{GatewayAddrs, Network};
use crate::sandbox::{Prepare, SANDBOX_UID, Sandbox, SandboxConfig};
use crate::scratch::Scratch;

/// The file in a sandbox's directory on which its network namespace is bind-mounted.
const NETNS_PIN: &str = "netns";
/// The empty directory through which runsc's private `/proc/sys` is built (see
/// [`crate::sys::hide_net_sysctls_before_exec`]).
const SYSCTL_KEEP: &str = "sysctl";

/// Extra pids the sandbox cgroup allows for the sentry's and gofer's own threads.
pub const SENTRY_PIDS: u64 = 512;
/// Extra memory the sandbox cgroup allows for the sentry and gofer.
pub const SENTRY_MEMORY_MIB: u64 = 64;
/// How long one platform trial may take before the platform counts as unusable.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(4);

/// Which isolation tier runs a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Linux namespaces, seccomp, Landlock and cgroups on the host kernel (the default).
    #[default]
    Namespaces,
    /// gVisor's user-space kernel (`runsc`), inside the same cgroup and scratch.
    Gvisor,
}

impl Isolation {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespaces => "namespaces",
            Self::Gvisor => "gvisor",
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "namespaces" => Ok(Self::Namespaces),
            "gvisor" => Ok(Self::Gvisor),
            other => Err(format!(
                "unknown isolation {other:?}: expected \"namespaces\" or \"gvisor\""
            )),
        }
    }
}

/// The `runsc` found on this host and the platform chosen for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runsc {
    /// The executable.
    pub path: PathBuf,
    /// Its version line (`runsc version …`).
    pub version: String,
    /// The platform that passed its trial: `systrap`, `kvm` or `ptrace`.
    pub platform: String,
}

/// Platforms in order of preference.
pub const PLATFORMS: [&str; 3] = ["systrap", "kvm", "ptrace"];

/// Finds `runsc` (`AMPOULE_RUNSC`, else `PATH`).
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AMPOULE_RUNSC") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("runsc"))
        .find(|p| p.is_file())
}

/// `runsc` and its platform, detected once per process (see [`detect`]).
pub fn runsc(host: &Host) -> Result<Runsc> {
    static CACHE: OnceLock<std::result::Result<Runsc, String>> = OnceLock::new();
    CACHE
        .get_or_init(|| detect(host))
        .clone()
        .map_err(Error::Gvisor)
}

/// Finds `runsc`, reads its version and picks the best platform by a bounded trial run of
/// each (`systrap` > `kvm` > `ptrace`): the presence of `/dev/kvm` proves nothing (on a PVM
/// host runsc's kvm platform spins forever). `AMPOULE_RUNSC_PLATFORM` skips the trial. The
/// choice is remembered in `<runtime_dir>/runsc-platform` for this runsc version, so only the
/// first process on a host pays for the trials.
pub fn detect(host: &Host) -> std::result::Result<Runsc, String> {
    if !host.privileged {
        return Err(
            "the gvisor tier needs ampoule to run as root (runsc's sandbox and gofer \
                    set up namespaces and mounts as real root)"
                .into(),
        );
    }
    let path = find().ok_or_else(|| {
        "runsc is not installed\nhint: `apt-get install runsc` (Debian, Ubuntu), or install \
         gVisor's release binary (https://gvisor.dev/docs/user_guide/install/)"
            .to_owned()
    })?;
    let out = std::process::Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {} --version: {e}", path.display()))?;
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("runsc (unknown version)")
        .trim()
        .to_owned();
    if let Some(p) = std::env::var("AMPOULE_RUNSC_PLATFORM")
        .ok()
        .filter(|p| !p.is_empty())
    {
        return Ok(Runsc {
            path,
            version,
            platform: p,
        });
    }
    let cache = host.runtime_dir.join("runsc-platform");
    if let Ok(text) = fs::read_to_string(&cache)
        && let Some((v, p)) = text.trim_end().split_once('\t')
        && v == version
        && PLATFORMS.contains(&p)
    {
        return Ok(Runsc {
            path,
            version,
            platform: p.to_owned(),
        });
    }
    let mut failures = Vec::new();
    for platform in PLATFORMS {
        match trial(host, &path, platform) {
            Ok(()) => {
                let _ = fs::write(&cache, format!("{version}\t{platform}\n"));
                return Ok(Runsc {
                    path,
                    version,
                    platform: platform.to_owned(),
                });
            }
            Err(e) => failures.push(format!("{platform}: {e}")),
        }
    }
    Err(format!(
        "no runsc platform works here ({})",
        failures.join("; ")
    ))
}

/// Runs `/bin/true` under `platform` in a throw-away cgroup and state directory, killed after
/// [`TRIAL_TIMEOUT`]; leaves nothing behind either way.
fn trial(host: &Host, runsc: &Path, platform: &str) -> std::result::Result<(), String> {
    let dir = host
        .runtime_dir
        .join("gvisor")
        .join(format!("trial-{}-{platform}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let cgroup = host.cgroups.as_ref().and_then(|root| {
        let limits = Limits {
            memory_mib: 512,
            pids: SENTRY_PIDS,
            cpus: 1.0,
            ..Limits::default()
        };
        root.create(&format!("gvisor-trial-{}", std::process::id()), &limits)
            .ok()
    });
    let mut cmd = std::process::Command::new(runsc);
    cmd.arg("--root")
        .arg(&dir)
        .arg(format!("--platform={platform}"))
        .args(["--network=none", "--ignore-cgroups", "do", "/bin/true"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let procs = cgroup.as_ref().map(open_procs).transpose();
    let result = match procs {
        Err(e) => Err(e.to_string()),
        Ok(procs) => {
            let mut tokio_like = cmd;
            if let Some(fds) = procs {
                crate::sys::join_cgroup_before_exec_std(&mut tokio_like, fds);
            }
            run_bounded(tokio_like, TRIAL_TIMEOUT)
        }
    };
    if let Some(cg) = &cgroup {
        cg.kill_and_remove();
    }
    let _ = fs::remove_dir_all(&dir);
    result
}

/// Runs `cmd` to its end or kills its process group after `timeout`.
fn run_bounded(
    mut cmd: std::process::Command,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let mut child = cmd.spawn().map_err(|e| format!("starting runsc: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                let last = err.lines().last().unwrap_or("").trim().to_owned();
                return Err(format!("{status}: {last}"));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => {
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no result within {}s", timeout.as_secs()));
            }
        }
    }
}

fn open_procs(cg: &crate::cgroup::Cgroup) -> Result<Vec<OwnedFd>> {
    cg.procs_files()
        .iter()
        .map(|f| {
            fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(f)
                .map(OwnedFd::from)
                .ctx(|| format!("opening {}", f.display()))
        })
        .collect()
}

/// What a gVisor sandbox leaves on the host, removed when dropped: runsc's state (after
/// `runsc delete --force`, which also kills a sandbox still running), the scratch mount and
/// the directory.
#[derive(Debug)]
pub(crate) struct RunDir {
    dir: PathBuf,
    runsc: PathBuf,
    id: String,
    /// In allowlist mode: the link to the egress gateway, deleted with the sandbox.
    network: Option<GatewayAddrs>,
}

impl RunDir {
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub(crate) fn scratch(&self) -> PathBuf {
        self.dir.join("scratch")
    }

    /// runsc with this sandbox's `--root`.
    pub(crate) fn runsc(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.runsc);
        cmd.arg("--root").arg(self.state());
        cmd.stdin(Stdio::null());
        cmd
    }

    /// The container's id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The link to the egress gateway (allowlist mode).
    pub(crate) fn network(&self) -> Option<&GatewayAddrs> {
        self.network.as_ref()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.state().join(&self.id).exists()
            || fs::read_dir(self.state()).is_ok_and(|mut d| d.next().is_some())
        {
            let _ = self
                .runsc()
                .args(["delete", "--force", &self.id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        clean_dir(&self.dir);
        // Synchronous, as for the default tier's one-shot runs: once the sandbox is dropped no
        // `amp*` link of it is left (the namespace's last holders are gone, but the kernel
        // would remove the pair only later).
        if let Some(addrs) = &self.network
            && let Err(e) = crate::network::remove_host_side(addrs)
        {
            tracing::warn!(interface = %addrs.interface, error = %e, "could not remove a gvisor sandbox's veth");
        }
    }
}

/// Where the run directories of gVisor sandboxes live (`sbx-<slot>` each).
pub(crate) fn runs_dir(host: &Host) -> PathBuf {
    host.runtime_dir.join("gvisor")
}

/// Removes every run directory whose slot no live process holds: what a supervisor killed
/// mid-run left behind (a tmpfs mounted on the host, maybe a runsc sandbox still running),
/// removed as a new run on the same slot would remove it (see [`spawn`]), which might be
/// long in coming among 16,384 slots. Returns how many.
pub(crate) fn sweep_orphans(host: &Host) -> usize {
    let Ok(entries) = fs::read_dir(runs_dir(host)) else {
        return 0;
    };
    let mut swept = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(_slot) = host.orphan_slot(&name) else {
            continue;
        };
        drop(RunDir {
            dir: entry.path(),
            runsc: find().unwrap_or_else(|| PathBuf::from("runsc")),
            id: format!("ampoule-{name}"),
            network: None,
        });
        tracing::info!(dir = %name, "swept an orphaned gvisor sandbox directory");
        swept += 1;
    }
    swept
}

/// Unmounts what a sandbox directory may hold and removes it.
fn clean_dir(dir: &Path) {
    let scratch = dir.join("scratch");
    let _ = nix::mount::umount2(&scratch, MntFlags::MNT_DETACH);
    // The network namespace's pin (allowlist mode): unmounted, the namespace goes with its
    // last process.
    let _ = nix::mount::umount2(&dir.join(NETNS_PIN), MntFlags::MNT_DETACH);
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove a gvisor sandbox directory");
    }
}

fn mkdir(p: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
        .ctx(|| format!("creating {}", p.display()))
}

fn touch(p: &Path) -> Result<()> {
    if let Some(parent) = p.parent() {
        mkdir(parent, 0o755)?;
    }
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map(drop)
        .ctx(|| format!("creating {}", p.display()))
}

/// `abs` (an absolute host path) under `root`.
fn under(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// A read-only bind of `src` at `dst` in the spec, with its mount point made in `rootfs`.
fn ro_bind(rootfs: &Path, src: &Path, dst: &Path, mounts: &mut Vec<Value>) -> Result<()> {
    let point = under(rootfs, dst);
    if src.is_dir() {
        mkdir(&point, 0o755)?;
    } else {
        touch(&point)?;
    }
    mounts.push(json!({
        "destination": dst,
        "type": "bind",
        "source": src,
        "options": ["rbind", "ro", "nosuid", "nodev"],
    }));
    Ok(())
}

fn rw_bind(src: &Path, dst: &str, mounts: &mut Vec<Value>) {
    mounts.push(json!({
        "destination": dst,
        "type": "bind",
        "source": src,
        "options": ["rbind", "rw", "nosuid", "nodev"],
    }));
}

/// Builds the root file system view (mount points, generated `/etc`) and returns the spec's
/// mounts: the same view as the default tier's `host_root` and `devices_and_scratch`.
fn build_root(
    rootfs: &Path,
    scratch: &Path,
    cfg: &SandboxConfig,
    etc_files: &[(String, String)],
    etc_binds: &[&str],
) -> Result<Vec<Value>> {
    for d in [
        "etc",
        "proc",
        "dev",
        "tmp",
        "mnt/data",
        "usr",
        "run/ampoule",
        "var/tmp",
        "sys",
    ] {
        mkdir(&rootfs.join(d), 0o755)?;
    }
    let mut mounts = vec![json!({"destination": "/proc", "type": "proc", "source": "proc"})];
    let mut binds: Vec<PathBuf> = vec![PathBuf::from("/usr")];
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(top);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&host).ctx(|| format!("reading {}", host.display()))?;
                std::os::unix::fs::symlink(&target, rootfs.join(top))
                    .ctx(|| format!("linking /{top}"))?;
            }
            Ok(m) if m.is_dir() => binds.push(host),
            _ => {}
        }
    }
    binds.extend(cfg.ro_binds.iter().cloned());
    for src in &binds {
        if !src.is_absolute() {
            return Err(Error::Invalid(format!(
                "a read-only bind must be an absolute path: {}",
                src.display()
            )));
        }
        ro_bind(rootfs, src, src, &mut mounts)?;
    }
    let etc = rootfs.join("etc");
    for (name, contents) in etc_files {
        fs::write(etc.join(name), contents).ctx(|| format!("writing /etc/{name}"))?;
    }
    for name in etc_binds {
        let src = Path::new("/etc").join(name);
        match fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&src).ctx(|| format!("reading {}", src.display()))?;
                let dst = etc.join(name);
                if let Some(parent) = dst.parent() {
                    mkdir(parent, 0o755)?;
                }
                std::os::unix::fs::symlink(&target, &dst).ctx(|| format!("linking /etc/{name}"))?;
            }
            Ok(_) => ro_bind(rootfs, &src, &src, &mut mounts)?,
            Err(_) => {}
        }
    }
    rw_bind(&scratch.join("data"), "/mnt/data", &mut mounts);
    rw_bind(&scratch.join("tmp"), "/tmp", &mut mounts);
    rw_bind(&scratch.join("tmp"), "/var/tmp", &mut mounts);
    // /dev/shm counts against the disk limit, as in the default tier.
    rw_bind(&scratch.join("shm"), "/dev/shm", &mut mounts);
    // gVisor's own sysfs (virtual, but a map of the sandbox's "hardware"): an empty one.
    mounts.push(json!({
        "destination": "/sys",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["ro", "nosuid", "nodev", "noexec", "size=4k"],
    }));
    // The sentry's FUSE server and TUN device: this runsc ignores `maskedPaths` for device
    // files, so a read-only bind of the host's /dev/null (served by the gofer as an empty
    // file, device 0:0) hides them.
    for dev in ["/dev/fuse", "/dev/net/tun"] {
        mounts.push(json!({
            "destination": dev,
            "type": "bind",
            "source": "/dev/null",
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
        }));
    }
    mounts.push(json!({
        "destination": "/run/ampoule",
        "type": "bind",
        "source": scratch.join(".ampoule"),
        "options": ["rbind", "ro", "nosuid", "nodev"],
    }));
    Ok(mounts)
}

/// Adds the egress gateway's CA to the sandbox's trust, as the default tier's init does: the
/// host's bundle plus the CA at [`crate::network::CA_BUNDLE`], the CA alone at
/// [`crate::network::EGRESS_CA`] (both in a read-only `/etc/ampoule`), and the combined bundle
/// bound over the host bundle's path for tools that read only the system store.
fn trust_ca(bundle: &Path, ca_pem: &str, mounts: &mut Vec<Value>) -> Result<()> {
    use crate::network::{CA_BUNDLE, EGRESS_CA, SYSTEM_BUNDLE};
    let system = Path::new(SYSTEM_BUNDLE);
    let regular = fs::symlink_metadata(system).is_ok_and(|m| m.is_file());
    let mut combined = if regular {
        fs::read(system).ctx(|| format!("reading {SYSTEM_BUNDLE}"))?
    } else {
        Vec::new()
    };
    if !combined.is_empty() && !combined.ends_with(b"\n") {
        combined.push(b'\n');
    }
    combined.extend_from_slice(ca_pem.as_bytes());
    let dir = bundle.join("trust");
    mkdir(&dir, 0o755)?;
    let (bundle_file, ca_file) = (dir.join("ca-certificates.crt"), dir.join("egress-ca.crt"));
    fs::write(&bundle_file, &combined).ctx(|| format!("writing {}", bundle_file.display()))?;
    fs::write(&ca_file, ca_pem).ctx(|| format!("writing {}", ca_file.display()))?;
    let etc_ampoule = Path::new(CA_BUNDLE)
        .parent()
        .unwrap_or(Path::new("/etc/ampoule"));
    debug_assert_eq!(Path::new(EGRESS_CA).parent(), Some(etc_ampoule));
    // The mount point, in the (read-only) root.
    mkdir(&under(&bundle.join("rootfs"), etc_ampoule), 0o755)?;
    mounts.push(json!({
        "destination": etc_ampoule,
        "type": "bind",
        "source": dir,
        "options": ["rbind", "ro", "nosuid", "nodev"],
    }));
    if regular {
        mounts.push(json!({
            "destination": SYSTEM_BUNDLE,
            "type": "bind",
            "source": bundle_file,
            "options": ["rbind", "ro", "nosuid", "nodev"],
        }));
    }
    Ok(())
}

/// The OCI spec of the sandbox. `netns`: the network namespace runsc's netstack takes its
/// interfaces and routes from (allowlist mode); without it the sandbox has loopback only.
fn spec(
    cfg: &SandboxConfig,
    env: &[(String, String)],
    mounts: Vec<Value>,
    netns: Option<&Path>,
) -> Value {
    let l = &cfg.limits;
    let disk_bytes = l.disk_mib.saturating_mul(1024 * 1024).max(1);
    let rlimit = |kind: &str, v: u64| json!({"type": kind, "soft": v, "hard": v});
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let network = match netns {
        Some(path) => json!({"type": "network", "path": path}),
        None => json!({"type": "network"}),
    };
    json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID},
            "args": cfg.argv,
            "env": env,
            "cwd": cfg.cwd,
            "capabilities": {
                "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []
            },
            "rlimits": [
                rlimit("RLIMIT_NOFILE", l.open_files.max(16)),
                // Enforced by the sentry: the code's own process limit.
                rlimit("RLIMIT_NPROC", l.pids.max(1)),
                rlimit("RLIMIT_FSIZE", disk_bytes),
                rlimit("RLIMIT_CPU", crate::sandbox::cpu_backstop_s(l)),
                rlimit("RLIMIT_CORE", 0),
            ],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": crate::sandbox::HOSTNAME,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"}, network, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"],
        },
    })
}

/// Starts `cfg` under runsc (see the module documentation). `prepare` runs once the scratch
/// exists, before the program starts.
pub(crate) async fn spawn(
    host: &Host,
    cfg: &SandboxConfig,
    etc_files: Vec<(String, String)>,
    etc_binds: &[&str],
    prepare: impl FnOnce(Prepare<'_>) -> Result<()>,
) -> Result<Sandbox> {
    if cfg.argv.is_empty() {
        return Err(Error::Invalid("nothing to run".into()));
    }
    if cfg.image_root.is_some() {
        return Err(Error::Invalid(
            "sandboxes from OCI images are not supported on the gvisor tier yet".into(),
        ));
    }
    if cfg.restore_image.is_some() && !matches!(cfg.network, Network::None) {
        return Err(Error::Invalid(
            "a sandbox with network cannot be restored from a checkpoint".into(),
        ));
    }
    let Some(cgroups) = &host.cgroups else {
        return Err(Error::Gvisor(
            "the gvisor tier needs usable cgroups (its sentry is limited and killed through \
             the sandbox's cgroup)"
                .into(),
        ));
    };
    let runsc = runsc(host)?;
    // `Some(ca)` in allowlist mode.
    let allowlist = match &cfg.network {
        Network::None => None,
        Network::Allowlist { trusted_ca_pem } => {
            crate::network::ensure_table(host)?;
            Some(trusted_ca_pem.clone())
        }
    };
    let slot = host.acquire_slot()?;
    let addrs = allowlist
        .as_ref()
        .map(|_| GatewayAddrs::for_slot(slot.index()));
    let dir = host.runtime_dir.join("gvisor").join(slot.cgroup_name());
    // A leftover of a crashed run with the same slot.
    if dir.exists() {
        let stale = RunDir {
            dir: dir.clone(),
            runsc: runsc.path.clone(),
            id: format!("ampoule-{}", slot.cgroup_name()),
            network: None,
        };
        drop(stale);
    }
    mkdir(&host.runtime_dir.join("gvisor"), 0o700)?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .ctx(|| format!("creating {}", dir.display()))?;
    let run = RunDir {
        dir: dir.clone(),
        runsc: runsc.path.clone(),
        id: format!("ampoule-{}", slot.cgroup_name()),
        network: addrs.clone(),
    };
    let started = Instant::now();

    // The scratch, mounted on the host (the gofer serves it).
    let scratch_dir = run.scratch();
    mkdir(&scratch_dir, 0o755)?;
    let limits = &cfg.limits;
    let disk_bytes = limits.disk_mib.saturating_mul(1024 * 1024);
    match &cfg.disk {
        Some(image) => crate::disk::mount(image, &scratch_dir)?,
        None => nix::mount::mount(
            Some("tmpfs"),
            &scratch_dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(
                format!(
                    "size={},nr_inodes={},mode=0755",
                    disk_bytes.max(4096),
                    limits.disk_inodes.max(64)
                )
                .as_str(),
            ),
        )
        .ctx(|| format!("mounting the scratch tmpfs on {}", scratch_dir.display()))?,
    }
    for (name, mode) in [
        ("data", 0o755),
        (".ampoule", 0o755),
        ("tmp", 0o1777),
        ("shm", 0o1777),
    ] {
        let p = scratch_dir.join(name);
        match fs::DirBuilder::new().mode(mode).create(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            r => r.ctx(|| format!("creating {}", p.display()))?,
        }
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .ctx(|| format!("chmod {}", p.display()))?;
        }
        if name != ".ampoule" {
            if cfg.disk.is_some() {
                crate::disk::reown(&p, SANDBOX_UID, SANDBOX_UID)?;
            }
            std::os::unix::fs::chown(&p, Some(SANDBOX_UID), Some(SANDBOX_UID))
                .ctx(|| format!("chown {}", p.display()))?;
        }
    }

    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    mkdir(&rootfs, 0o755)?;
    let mut etc_files = etc_files;
    let mut env = cfg.env.clone();
    if let Some(a) = &addrs {
        for (name, contents) in &mut etc_files {
            if name == "resolv.conf" {
                *contents = crate::network::resolv_conf(a);
            }
        }
    }
    let mut mounts = build_root(&rootfs, &scratch_dir, cfg, &etc_files, etc_binds)?;
    if let Some(Some(ca)) = &allowlist {
        trust_ca(&bundle, ca, &mut mounts)?;
        for (k, v) in crate::network::ca_env() {
            env.retain(|(name, _)| name != k);
            env.push((k.to_owned(), v.to_owned()));
        }
    }

    // The sentry and gofer live in the sandbox's cgroup: room for their threads and memory.
    let cg_limits = Limits {
        memory_mib: limits.memory_mib.saturating_add(SENTRY_MEMORY_MIB),
        pids: limits.pids.saturating_add(SENTRY_PIDS),
        ..limits.clone()
    };
    let cgroup = cgroups.create(&slot.cgroup_name(), &cg_limits)?;
    let cgroup = crate::sandbox::OwnedCgroup(cgroup);

    let root_fd = open(
        &scratch_dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| format!("opening {}", scratch_dir.display()))?;
    let scratch = Scratch::new(root_fd, Some((SANDBOX_UID, SANDBOX_UID)));
    let netns = match &addrs {
        Some(a) => {
            let pin = dir.join(NETNS_PIN);
            crate::network::pinned_namespace(a, &pin)?;
            tracing::debug!(elapsed = ?started.elapsed(), interface = %a.interface, "network wired");
            Some(pin)
        }
        None => None,
    };
    prepare(Prepare {
        scratch: &scratch,
        network: addrs.as_ref(),
    })?;

    let mut f =
        fs::File::create(bundle.join("config.json")).ctx(|| "writing config.json".into())?;
    f.write_all(
        spec(cfg, &env, mounts, netns.as_deref())
            .to_string()
            .as_bytes(),
    )
    .ctx(|| "writing config.json".into())?;
    drop(f);
    mkdir(&run.state(), 0o700)?;

    let mut cmd = tokio::process::Command::new(&runsc.path);
    cmd.arg("--root")
        .arg(run.state())
        .arg(format!("--platform={}", runsc.platform))
        // `sandbox`: gVisor's netstack takes over the interfaces and routes of the namespace
        // in the spec (only the link to the gateway); `none`: the sentry's loopback only.
        .arg(if netns.is_some() {
            "--network=sandbox"
        } else {
            "--network=none"
        })
        .arg("--ignore-cgroups");
    // A restore runs the sandbox from its image instead of the spec's process; its stdio are
    // still this command's (see `checkpoint`).
    match &cfg.restore_image {
        Some(image) => cmd.arg("restore").arg("--image-path").arg(image),
        None => cmd.arg("run"),
    };
    cmd.arg("--bundle")
        .arg(&bundle)
        .arg(run.id())
        .current_dir(&bundle)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(if cfg.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if netns.is_some() {
        let keep = dir.join(SYSCTL_KEEP);
        mkdir(&keep, 0o700)?;
        crate::sys::hide_net_sysctls_before_exec(&mut cmd, &keep)
            .ctx(|| "preparing runsc's view of /proc/sys".into())?;
    }
    let procs = open_procs(&cgroup.0)?;
    crate::sys::join_cgroup_before_exec(&mut cmd, procs);
    let mut child = cmd
        .spawn()
        .ctx(|| format!("starting {}", runsc.path.display()))?;
    let stdio = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    tracing::debug!(elapsed = ?started.elapsed(), platform = %runsc.platform, "gvisor sandbox starting");
    Ok(Sandbox::from_runsc(
        child, cgroup, run, scratch, slot, started, stdio,
    ))
}

/// Checkpoints a running gVisor sandbox into the directory `image` (`runsc checkpoint`):
/// the sentry writes the whole kernel state (every process's memory, open files, pipes) as
/// one file, then the sandbox stops and `runsc run` exits.
///
/// What comes back on [`SandboxConfig::restore_image`] and what does not:
/// * The kernel protocol survives: it is the program's stdio, host pipes the sentry imported
///   as host files. runsc saves them by their number in the sentry's own file table, and
///   `runsc restore` hands the new sandbox its own stdio under the same numbers, so the
///   restored program reads and writes the pipes of the restoring command. Bytes the
///   program had not read yet are saved with the image (gVisor drains readable pipes first).
/// * The scratch is served by the new gofer from the new spec's binds, by path inside the
///   sandbox: the same files when the scratch is on the same disk image.
/// * Not with network: gVisor's netstack is saved with the link's addresses, and the
///   supervisor gives a restored sandbox a new slot, hence a new link and gateway, and
///   runsc strips the addresses of the namespace it restores into. Refused here, so the
///   caller falls back to keeping files only.
pub(crate) async fn checkpoint(run: &RunDir, image: &Path) -> Result<()> {
    if run.network().is_some() {
        return Err(Error::Gvisor(
            "sandboxes with network cannot be checkpointed (their link and gateway change \
             when they are restored)"
                .into(),
        ));
    }
    let _ = fs::remove_dir_all(image);
    mkdir(image, 0o700)?;
    let mut cmd = tokio::process::Command::from(run.runsc());
    cmd.arg("checkpoint")
        .arg("--image-path")
        .arg(image)
        .arg(run.id())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = cmd
        .output()
        .await
        .ctx(|| "running runsc checkpoint".into())?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(image);
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim();
        return Err(Error::Gvisor(format!(
            "runsc checkpoint failed ({}): {last}",
            out.status
        )));
    }
    Ok(())
}

/// Maps `runsc run`'s exit status to the program's: runsc exits with the container's code,
/// or 128 + the signal that ended it.
pub(crate) fn program_exit(status: std::process::ExitStatus) -> crate::sandbox::ProgramExit {
    use crate::sandbox::ProgramExit;
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) if (129..=159).contains(&c) => ProgramExit::Signaled(c - 128),
        (Some(c), _) => ProgramExit::Exited(c),
        (None, Some(_)) => ProgramExit::Killed,
        (None, None) => ProgramExit::Killed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory left by a killed supervisor (its scratch tmpfs still mounted) is
    /// swept, mount and all; one whose slot is held (a live sandbox's) is not touched.
    #[test]
    fn orphaned_run_directories_are_swept_and_live_ones_kept() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        // This test's own mount namespace: a failure leaves no mount on the host.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare");
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("private mounts");
        let tmp = tempfile::tempdir().expect("tempdir");
        let host = Host::with(true, tmp.path().to_path_buf(), None).expect("host");
        let scratch = |slot: u32| runs_dir(&host).join(format!("sbx-{slot}")).join("scratch");
        for slot in [7, 8] {
            fs::create_dir_all(scratch(slot)).expect("mkdir");
            nix::mount::mount(
                Some("tmpfs"),
                &scratch(slot),
                Some("tmpfs"),
                MsFlags::empty(),
                Some("size=1m"),
            )
            .expect("mount tmpfs");
            fs::write(scratch(slot).join("left.txt"), "x").expect("write");
        }
        let live = host.orphan_slot("sbx-8").expect("slot 8 free");
        assert!(host.may_have_orphans(), "the run directories count");
        assert_eq!(sweep_orphans(&host), 1);
        assert!(!runs_dir(&host).join("sbx-7").exists());
        assert!(
            scratch(8).join("left.txt").exists(),
            "a held slot's directory stays"
        );
        let mounts = fs::read_to_string("/proc/self/mounts").expect("mounts");
        let gone = scratch(7).to_string_lossy().into_owned();
        assert!(!mounts.contains(&gone), "the orphan's tmpfs is unmounted");
        drop(live);
        assert_eq!(sweep_orphans(&host), 1);
        assert!(!runs_dir(&host).join("sbx-8").exists());
    }

    #[test]
    fn isolation_parses_and_prints() {
        assert_eq!("gvisor".parse::<Isolation>(), Ok(Isolation::Gvisor));
        assert_eq!("namespaces".parse::<Isolation>(), Ok(Isolation::Namespaces));
        assert!("kvm".parse::<Isolation>().is_err());
        assert_eq!(Isolation::default().to_string(), "namespaces");
    }

    #[test]
    fn exit_statuses_map_to_program_exits() {
        use crate::sandbox::ProgramExit;
        use std::os::unix::process::ExitStatusExt;
        let st = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        assert_eq!(program_exit(st(0)), ProgramExit::Exited(0));
        assert_eq!(program_exit(st(3)), ProgramExit::Exited(3));
        assert_eq!(program_exit(st(137)), ProgramExit::Signaled(9));
        assert_eq!(
            program_exit(std::process::ExitStatus::from_raw(9)),
            ProgramExit::Killed
        );
    }
}
