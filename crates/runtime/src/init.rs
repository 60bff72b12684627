//! The sandbox's own processes: what runs between the supervisor's `spawn` and the user's code.
//!
//! The supervisor starts the ampoule binary again (`ampoule __sandbox-init`, a fresh,
//! single-threaded process, so namespaces can be unshared and memory allocated freely) with the
//! control channel on descriptor 3. Three processes follow:
//!
//! * **outer init** (host pid namespace): joins its cgroup (v1; on v2 the supervisor moves it
//!   meanwhile), lowers rlimits, unshares every namespace but the cgroup one, builds the new root on a tmpfs, hands the scratch directory to the supervisor,
//!   waits for `Start`, forks the inner init and reports if that one dies abnormally.
//!   In allowlist network mode it also makes interfaces of the new network namespace default
//!   to no IPv6 right after the unshare (before any but `lo` exists), and after `Start` — by then the
//!   supervisor has moved the sandbox end of the veth pair in — gives `eth0` its address and
//!   the default route to the egress gateway (see [`crate::network`]). Both happen before any
//!   code of the user's exists, with the outer init's capabilities in the new user namespace.
//!   In root mode the root is built *before* the user namespace is created, as real root, so
//!   every mount is owned by the initial namespace and locked: nothing inside can unmount or
//!   remount it, even with every capability of its own user namespace.
//! * **inner init** (pid 1 of the new pid namespace): enters a new cgroup namespace, mounts `/proc`, pivots into the new root,
//!   masks `/proc`, sets the hostname, brings up loopback, applies Landlock, drops every
//!   capability, sets `no_new_privs`, installs seccomp, then forks the program, reaps zombies
//!   and reports the program's exit. When it exits, the kernel kills everything left in the pid
//!   namespace: no daemon outlives a run.
//! * **program**: `setsid`, then `execve` of the interpreter with a clean environment.
//!
//! Any error before `exec` is reported on the channel as `Failed { stage, .. }`.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};

use crate::channel::{FromInit, InitChannel, InitSpec, ToInit};
use crate::seccomp::SeccompPolicy;
use crate::sys::{self, Fork};

/// The argument that makes the ampoule binary act as a sandbox init.
pub const INIT_ARG: &str = "__sandbox-init";

/// Descriptor number of the control channel in the init process.
const CHANNEL_FD: RawFd = 3;

/// A failed stage: its name and the error.
pub(crate) struct StageError {
    pub(crate) stage: &'static str,
    pub(crate) message: String,
}

pub(crate) type Stage<T> = std::result::Result<T, StageError>;

pub(crate) trait StageContext<T> {
    fn stage(self, stage: &'static str) -> Stage<T>;
}

impl<T, E: std::fmt::Display> StageContext<T> for std::result::Result<T, E> {
    fn stage(self, stage: &'static str) -> Stage<T> {
        self.map_err(|e| StageError {
            stage,
            message: e.to_string(),
        })
    }
}

pub(crate) fn fail(stage: &'static str, message: impl Into<String>) -> StageError {
    StageError {
        stage,
        message: message.into(),
    }
}

/// Entry point of `ampoule __sandbox-init`. Never returns.
pub fn main() -> ! {
    match std::env::args_os().nth(2).as_deref() {
        Some(arg) if arg == crate::enter::ENTER_ARG => crate::enter::helper(),
        _ => main_forked(false),
    }
}

/// The outer init's work, in a process that is either a fresh `exec` ([`main`]) or a child
/// forked by a single-threaded supervisor (see [`crate::prefork`]), with stdio and the control
/// channel (descriptor 3) in place. `net_ahead`: forked ahead of its spec, for a sandbox
/// without network, it has time to spare for the network namespace (see [`network_ahead`]).
/// Never returns.
pub(crate) fn main_forked(net_ahead: bool) -> ! {
    // Die with the supervisor. If it already died, stop here.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() == 1 {
        std::process::exit(111);
    }
    // Nothing inherited beyond stdio and the channel may reach the sandbox.
    let _ = sys::close_from(CHANNEL_FD as u32 + 1);
    let chan = InitChannel::new(sys::own_fd(CHANNEL_FD));
    let net_ahead = net_ahead && network_ahead();
    let code = match outer(&chan, net_ahead) {
        Ok(code) => code,
        Err(e) => {
            let _ = chan.send(
                &FromInit::Failed {
                    stage: e.stage.to_owned(),
                    message: e.message,
                },
                None,
            );
            112
        }
    };
    std::process::exit(code)
}

/// A network namespace made while the spec is on its way, by real root, loopback up: the
/// costliest namespace to make (~1 ms of CPU here: every network subsystem's per-namespace
/// set-up), and `ampoule run`'s init forked ahead waits ~0.6 ms for its spec on a CPU of its
/// own (see `crate::cpus`). Whether it is used is the spec's call (see [`outer`]); if it is
/// not, the sandbox makes its own as usual and this one goes with the outer init.
///
/// Owned by the host's user namespace rather than the sandbox's: the sandbox's processes hold
/// no capability in either (pid 1 drops them all before the program), so nothing they may do
/// in it changes; only pid 1 no longer brings loopback up (it could not: that needs
/// `CAP_NET_ADMIN` over the namespace), which is why it is up already.
fn network_ahead() -> bool {
    nix::unistd::geteuid().is_root()
        && unshare(CloneFlags::CLONE_NEWNET).is_ok()
        && sys::loopback_up().is_ok()
}

fn outer(chan: &InitChannel, net_ahead: bool) -> Stage<i32> {
    let spec = match chan.recv().stage("channel")? {
        ToInit::Spec(spec) => *spec,
        ToInit::Start => return Err(fail("channel", "expected the spec first")),
    };
    let seccomp = SeccompPolicy::default_policy().stage("seccomp")?;

    set_rlimits(&spec).stage("rlimit")?;

    // The network namespace made ahead serves a sandbox without network built by real root;
    // one with a network (the gateway's set-up inside needs the namespace owned by the
    // sandbox's user namespace) or built without root makes its own.
    let net_ready = net_ahead && spec.privileged && spec.network.is_none();
    let mut namespaces = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if net_ready {
        namespaces.remove(CloneFlags::CLONE_NEWNET);
    }
    // Root mode's first mount namespace, held open across the second `unshare` and handed to
    // the supervisor with the scratch directory: freeing it (a copy of every host mount, and
    // an RCU grace period) is then the supervisor's work, beside ours, not a step of ours.
    let mut first_mount_ns = None;
    if spec.privileged {
        // Build everything as real root in a private mount namespace first.
        unshare(CloneFlags::CLONE_NEWNS).stage("unshare mount")?;
        first_mount_ns = Some(fs::File::open("/proc/self/ns/mnt").stage("unshare mount")?);
        make_private().stage("mount private")?;
        mount_scratch(&spec)?;
        build_root(&spec)?;
        let gid = Gid::from_raw(spec.host_gid);
        let uid = Uid::from_raw(spec.host_uid);
        // A map of more than our own id must be written by real root: a helper forked now,
        // before we give root up, writes it once we have created the namespace.
        let mapper = if spec.id_map.is_empty() {
            None
        } else {
            Some(IdMapper::fork(&spec.id_map)?)
        };
        // No supplementary group for a zygote: its children set their own.
        let groups: &[Gid] = if mapper.is_some() { &[] } else { &[gid] };
        nix::unistd::setgroups(groups).stage("setgroups")?;
        nix::unistd::setresgid(gid, gid, gid).stage("setresgid")?;
        nix::unistd::setresuid(uid, uid, uid).stage("setresuid")?;
        // setresuid cleared "dumpable", which would make our own uid_map root-owned.
        nix::sys::prctl::set_dumpable(true).stage("dumpable")?;
        unshare(namespaces).stage("unshare")?;
        match mapper {
            Some(mapper) => mapper.map()?,
            None => write_id_maps(&spec).stage("id maps")?,
        }
        for (name, value) in &spec.userns_limits {
            fs::write(format!("/proc/sys/user/{name}"), value.to_string())
                .stage("user namespace limits")?;
        }
    } else {
        unshare(namespaces).stage("unshare")?;
        write_id_maps(&spec).stage("id maps")?;
        make_private().stage("mount private")?;
        mount_scratch(&spec)?;
        build_root(&spec)?;
    }
    // Changing credentials (setresuid, and the id maps) clears the parent-death signal: ask
    // for it again, then make sure the supervisor did not die in between.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() == 0 || nix::unistd::getppid().as_raw() == 1 {
        return Err(fail("supervisor", "the supervisor exited during set-up"));
    }

    if spec.network.is_some() {
        crate::network::disable_ipv6_here().stage("network")?;
    }

    let scratch = fs::File::open(&spec.scratch_dir).stage("scratch")?;
    let mut pass = vec![scratch.as_raw_fd()];
    pass.extend(first_mount_ns.as_ref().map(AsRawFd::as_raw_fd));
    chan.send_with_fds(&FromInit::Scratch, &pass)
        .stage("channel")?;
    drop((scratch, first_mount_ns));
    // While the supervisor writes the code and inputs.
    pivot(&spec.stage_dir)?;
    // Pid 1 is forked now, before `Start`, when it joins the sandbox's cgroup itself (cgroup
    // v1, or no cgroup): the capability bounding set, the Landlock ruleset and the wait for
    // `Start` are then its own steps, on a CPU of its own, beside ours (the old root's
    // detach and the masks of `/proc`) instead of before them. On cgroup v2 the supervisor
    // moves us into the cgroup before `Start`, and pid 1 must be forked after that to inherit
    // it: we wait for `Start` and prepare those parts of pid 1's confinement meanwhile (pid 1
    // inherits the bounding set and only applies the ruleset). Neither for a zygote, whose
    // children apply every layer themselves.
    let started = if spec.early_pid1 {
        None
    } else {
        Some(Started::prepare(&spec, chan)?)
    };

    // Pid 1 and we hand the old root over in two words (a byte each; end of file: no): pid 1's
    // that `/proc` is mounted (the kernel lets a user namespace mount proc only while another
    // proc mount is fully visible in the mount namespace: the old root's), ours that the old
    // root is gone and `/proc` masked (see `mask_proc`: done here, beside pid 1's own steps).
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (proc_r, proc_w) = nix::unistd::pipe2(cloexec).stage("pipe")?;
    let (detached_r, detached_w) = nix::unistd::pipe2(cloexec).stage("pipe")?;
    match sys::fork().stage("fork")? {
        Fork::Child => {
            drop((proc_r, detached_w));
            let handover = Handover {
                started,
                proc_mounted: proc_w,
                old_root_detached: detached_r,
                loopback_up: net_ready,
            };
            let code = match inner(&spec, chan, &seccomp, handover) {
                Ok(code) => code,
                Err(e) => {
                    let _ = chan.send(
                        &FromInit::Failed {
                            stage: e.stage.to_owned(),
                            message: e.message,
                        },
                        None,
                    );
                    112
                }
            };
            // Pid 1's end is a step of the run (the supervisor waits for its pidfd): straight to
            // the kernel, without libc's exit handlers and thread-local destructors (nothing of
            // ours is buffered: the channel is written directly).
            sys::exit_now(code)
        }
        Fork::Parent(child) => {
            drop((proc_w, detached_r, started));
            // End of file: pid 1 failed before (and said why); it is reaped below.
            if read_word(&proc_r) {
                if let Err(e) = detach_old_root().and_then(|()| mask_proc(Path::new("/"))) {
                    // Pid 1 reads end of file and stops; it must not outlive our report either.
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    return Err(e);
                }
                nix::unistd::write(&detached_w, b"1").stage("pivot_root")?;
            }
            drop((proc_r, detached_w));
            detach_stdio();
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => {
                        let _ = chan.send(&FromInit::InitKilled { signal: sig as i32 }, None);
                        return Ok(128 + sig as i32);
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(fail("wait", e.to_string())),
                }
            }
        }
    }
}

/// Points stdin/stdout/stderr at /dev/null, so only the program holds the output pipes and the
/// supervisor sees end-of-file when the program's processes are gone.
pub(crate) fn detach_stdio() {
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            let _ = sys::dup2_raw(null.as_raw_fd(), fd);
        }
    }
}

fn set_rlimits(spec: &InitSpec) -> nix::Result<()> {
    Rlimits::of(spec).apply()
}

/// The rlimits of a sandbox's processes: what the init sets, and what a process entering the
/// sandbox later gets too (see [`crate::enter`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Rlimits {
    pub(crate) nofile: u64,
    pub(crate) fsize: u64,
    pub(crate) cpu_s: u64,
    pub(crate) nproc: Option<u64>,
    pub(crate) user: Option<crate::ucounts::UserRlimits>,
}

impl Rlimits {
    pub(crate) fn of(spec: &InitSpec) -> Self {
        Self {
            nofile: spec.rlimit_nofile,
            fsize: spec.rlimit_fsize,
            cpu_s: spec.rlimit_cpu_s,
            nproc: spec.rlimit_nproc,
            user: spec.rlimit_user,
        }
    }

    pub(crate) fn apply(&self) -> nix::Result<()> {
        setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
        setrlimit(Resource::RLIMIT_NOFILE, self.nofile, self.nofile)?;
        setrlimit(Resource::RLIMIT_FSIZE, self.fsize, self.fsize)?;
        setrlimit(
            Resource::RLIMIT_CPU,
            self.cpu_s,
            self.cpu_s.saturating_add(1),
        )?;
        if let Some(n) = self.nproc {
            setrlimit(Resource::RLIMIT_NPROC, n, n)?;
        }
        if let Some(r) = &self.user {
            setrlimit(Resource::RLIMIT_SIGPENDING, r.sigpending, r.sigpending)?;
            setrlimit(Resource::RLIMIT_MSGQUEUE, r.msgqueue, r.msgqueue)?;
            setrlimit(Resource::RLIMIT_MEMLOCK, r.memlock, r.memlock)?;
        }
        Ok(())
    }
}

/// A child of the outer init that keeps real root while the init gives it up, and writes the
/// init's uid and gid maps once the init has created its user namespace (see
/// `InitSpec::id_map`).
struct IdMapper {
    pid: Pid,
    go: std::os::fd::OwnedFd,
}

impl IdMapper {
    fn fork(map: &[crate::host::IdMapping]) -> Stage<Self> {
        let text: String = map
            .iter()
            .map(|m| format!("{} {} {}\n", m.inside, m.outside, m.count))
            .collect();
        let (wait, go) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).stage("id maps")?;
        match sys::fork().stage("id maps")? {
            Fork::Child => {
                drop(go);
                let mut byte = [0u8; 1];
                let ok = matches!(nix::unistd::read(&wait, &mut byte), Ok(1))
                    && Self::write(nix::unistd::getppid(), &text).is_ok();
                std::process::exit(if ok { 0 } else { 1 })
            }
            Fork::Parent(pid) => Ok(Self { pid, go }),
        }
    }

    fn write(init: Pid, map: &str) -> std::io::Result<()> {
        // setgroups stays allowed in this namespace (real root writes the gid map): its root
        // gives each child its own group, as a cold sandbox has.
        let proc = PathBuf::from(format!("/proc/{init}"));
        fs::write(proc.join("uid_map"), map)?;
        fs::write(proc.join("gid_map"), map)
    }

    /// Tells the helper to write the maps (the caller has created its user namespace) and
    /// waits for it.
    fn map(self) -> Stage<()> {
        nix::unistd::write(&self.go, b"x").stage("id maps")?;
        drop(self.go);
        match waitpid(self.pid, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(()),
            other => Err(fail("id maps", format!("the map writer ended: {other:?}"))),
        }
    }
}

fn make_private() -> nix::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

fn write_id_maps(spec: &InitSpec) -> std::io::Result<()> {
    fs::write(
        "/proc/self/uid_map",
        format!("{} {} 1\n", spec.sandbox_uid, spec.host_uid),
    )?;
    fs::write("/proc/self/setgroups", "deny")?;
    fs::write(
        "/proc/self/gid_map",
        format!("{} {} 1\n", spec.sandbox_gid, spec.host_gid),
    )?;
    Ok(())
}

fn tmpfs(target: &Path, opts: &str, flags: MsFlags) -> Stage<()> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(opts))
        .map_err(|e| fail("mount", format!("tmpfs on {}: {e}", target.display())))
}

/// The scratch tmpfs holds everything the sandbox may write: `/mnt/data`, `/tmp`, `/dev/shm`.
/// One filesystem, so one size and inode limit covers all three.
fn mount_scratch(spec: &InitSpec) -> Stage<()> {
    let dir = &spec.scratch_dir;
    match &spec.scratch_image {
        // A durable sandbox's files: its own disk image, as real root (loop devices).
        Some(image) if spec.privileged => crate::disk::mount(image, dir).stage("disk")?,
        Some(_) => return Err(fail("disk", "a sandbox on a disk image needs root")),
        None => tmpfs(
            dir,
            &format!(
                "size={},nr_inodes={},mode=0755",
                spec.scratch_bytes.max(4096),
                spec.scratch_inodes.max(64)
            ),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        )?,
    }
    for (name, mode) in [
        ("data", 0o755),
        (".ampoule", 0o755),
        ("tmp", 0o1777),
        ("shm", 0o1777),
    ] {
        let p = dir.join(name);
        // A disk image used before has them already.
        match fs::DirBuilder::new().mode(mode).create(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            r => r.stage("scratch")?,
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).stage("scratch")?;
        if spec.privileged && name != ".ampoule" {
            if spec.scratch_image.is_some() {
                // Made for an earlier sandbox's host ids: the files become this one's.
                crate::disk::reown(&p, spec.host_uid, spec.host_gid).stage("disk")?;
            }
            nix::unistd::chown(
                &p,
                Some(Uid::from_raw(spec.host_uid)),
                Some(Gid::from_raw(spec.host_gid)),
            )
            .stage("scratch")?;
        }
    }
    Ok(())
}

/// Mount flags a bind must keep when remounted: in a user namespace the kernel refuses to drop
/// flags that were set on the source mount ("locked" flags).
fn locked_flags(path: &Path) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let Ok(st) = nix::sys::statvfs::statvfs(path) else {
        return MsFlags::empty();
    };
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (from, to) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(from) {
            out |= to;
        }
    }
    out
}

/// Binds `src` onto `dst` (non-recursively: submounts of the host stay invisible). The bind
/// keeps the source mount's flags; [`seal`] makes the read-only ones so.
fn bind(src: &Path, dst: &Path) -> Stage<()> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| {
        fail(
            "mount",
            format!("bind {} on {}: {e}", src.display(), dst.display()),
        )
    })
}

/// Makes the mount at `top` and every mount below it (`below`: those are all there are)
/// read-only, nosuid and nodev, in one `mount_setattr` call: a bind remount per mount took two
/// calls each (a `statfs` for the flags the kernel locked, then the remount).
fn seal(top: &Path, below: &[PathBuf]) -> Stage<()> {
    match sys::mount_setattr(top, true, sys::MOUNT_ATTR_SEALED) {
        Ok(()) => Ok(()),
        // Before Linux 5.12.
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            for p in below.iter().map(PathBuf::as_path).chain([top]) {
                let flags = MsFlags::MS_REMOUNT
                    | MsFlags::MS_BIND
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | locked_flags(p);
                mount(None::<&str>, p, None::<&str>, flags, None::<&str>)
                    .map_err(|e| fail("mount", format!("remount {}: {e}", p.display())))?;
            }
            Ok(())
        }
        Err(e) => Err(fail(
            "mount",
            format!("make {} read-only: {e}", top.display()),
        )),
    }
}

fn mkdir_p(p: &Path) -> Stage<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(p)
        .map_err(|e| fail("rootfs", format!("mkdir {}: {e}", p.display())))
}

/// Copies a small host file (`meta` is its `lstat`): read whole, written with its permission
/// bits. (`fs::copy` tries `copy_file_range`, which fails across file systems, then `sendfile`
/// until end of file, then `fchmod`: ten system calls where this takes six. `fs::read` would
/// `statx` the file again for its size and read once more to see the end of file: a read of
/// a regular file that returns less than asked for has reached it.)
fn copy_small(src: &Path, dst: &Path, meta: &fs::Metadata) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut file = fs::File::open(src)?;
    let mut data = vec![0u8; usize::try_from(meta.len()).unwrap_or(0) + 1];
    let mut len = 0;
    loop {
        let n = match file.read(&mut data[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n;
        // End of file, or a short read of a regular file, which means the same.
        if n == 0 || len < data.len() {
            break;
        }
        // The buffer is full: the file grew since its `lstat`. Read on until the end.
        data.resize(data.len() * 2, 0);
    }
    data.truncate(len);
    drop(file);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(meta.permissions().mode() & 0o777)
        .open(dst)?
        .write_all(&data)
}

fn touch(p: &Path) -> Stage<()> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map(drop)
        .map_err(|e| fail("rootfs", format!("create {}: {e}", p.display())))
}

/// Joins an absolute host path under the stage directory.
fn under(stage: &Path, abs: &Path) -> PathBuf {
    stage.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// Builds the new root at `stage_dir` — on a tmpfs, read-only binds of the host's runtimes and
/// a generated `/etc` ([`host_root`]), or an image's root ([`image_root`]) — then a minimal
/// `/dev` and the scratch parts; then makes the root itself read-only.
fn build_root(spec: &InitSpec) -> Stage<()> {
    let stage = spec.stage_dir.as_path();
    match &spec.image_root {
        Some(image) => image_root(spec, stage, image)?,
        None => host_root(spec, stage)?,
    }
    devices_and_scratch(spec, stage)
}

/// Host `/etc` files up to this size are copied into the root's tmpfs rather than bound
/// (`openssl.cnf`, `services`, `protocols`, `ld.so.conf`, …: about 35 KiB in all on Debian).
const ETC_COPY_MAX: u64 = 16 * 1024;

/// The host's runtimes: a tmpfs with read-only binds of `/usr` (and the merged-`/usr`
/// symlinks), the spec's extra binds, a generated `/etc` with a few public host files.
fn host_root(spec: &InitSpec, stage: &Path) -> Stage<()> {
    tmpfs(
        stage,
        "size=8m,nr_inodes=4096,mode=0755",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    // Directories known to exist in the new root: a mount point or file below one needs no
    // `mkdir` (which would fail with EEXIST and then `stat` it, two system calls each).
    let mut made = std::collections::HashSet::new();
    let mut dir = |p: &Path| -> Stage<()> {
        if made.contains(p) {
            return Ok(());
        }
        mkdir_p(p)?;
        made.extend(p.ancestors().map(Path::to_path_buf));
        Ok(())
    };
    for d in [
        "etc",
        "proc",
        "dev",
        "tmp",
        "mnt/data",
        "usr",
        "run/ampoule",
        "var/tmp",
    ] {
        dir(&stage.join(d))?;
    }

    // Merged-/usr hosts have /bin → usr/bin and friends; keep the same shape.
    let mut binds: Vec<PathBuf> = vec![PathBuf::from("/usr")];
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(top);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&host).stage("rootfs")?;
                std::os::unix::fs::symlink(&target, stage.join(top)).stage("rootfs")?;
            }
            Ok(m) if m.is_dir() => binds.push(host),
            _ => {}
        }
    }
    binds.extend(spec.ro_binds.iter().cloned());
    // Every mount made under the stage, for `seal`.
    let mut mounted = Vec::with_capacity(binds.len() + spec.etc_binds.len());
    for src in &binds {
        let dst = under(stage, src);
        if src.is_dir() {
            dir(&dst)?;
        } else {
            if let Some(parent) = dst.parent() {
                dir(parent)?;
            }
            touch(&dst)?;
        }
        bind(src, &dst)?;
        mounted.push(dst);
    }

    // /etc: generated files, plus a few public host files (CA certificates, linker cache).
    let etc = stage.join("etc");
    for (name, contents) in &spec.etc_files {
        fs::write(etc.join(name), contents)
            .map_err(|e| fail("rootfs", format!("write /etc/{name}: {e}")))?;
    }
    for name in &spec.etc_binds {
        let src = Path::new("/etc").join(name);
        let dst = etc.join(name);
        // Resolve symlinks on the host side (e.g. /etc/alternatives entries stay symlinks).
        match fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&src).stage("rootfs")?;
                std::os::unix::fs::symlink(&target, &dst).stage("rootfs")?;
            }
            Ok(m) if m.is_dir() => {
                dir(&dst)?;
                bind(&src, &dst)?;
                mounted.push(dst);
            }
            Ok(m) => {
                if let Some(parent) = dst.parent() {
                    dir(parent)?;
                }
                // A small file is copied: two mount calls fewer, and one mount fewer for the
                // namespace copies and the tear-down to walk. Read-only all the same (the root
                // is remounted read-only), and a snapshot as a bind of a file is too (the host
                // replaces such files by renaming a new one into place). One we cannot read
                // (a host that made it private), or no regular file (a FIFO would block the
                // read), is bound instead.
                let copied =
                    m.is_file() && m.len() <= ETC_COPY_MAX && copy_small(&src, &dst, &m).is_ok();
                if !copied {
                    touch(&dst)?;
                    bind(&src, &dst)?;
                    mounted.push(dst);
                }
            }
            Err(_) => {}
        }
    }

    if let Some(ca) = &spec.trusted_ca_pem {
        mounted.extend(trust_ca(stage, ca)?);
    }
    if spec.ca_mount_point {
        // Empty in the zygote: each child of a pool whose gateway terminates TLS mounts its
        // own trust files here (kernels/python/zygote.py `network_files`).
        let bundle = under(stage, Path::new(crate::network::CA_BUNDLE));
        if let Some(parent) = bundle.parent() {
            dir(parent)?;
        }
    }
    // The root and all its binds read-only, before `/dev` and the scratch parts are mounted
    // on it (mount points need no write access).
    seal(stage, &mounted)
}

/// An OCI image's root (root mode): an overlay whose lower layer is the image's unpacked root
/// (shared by every sandbox of the image, never written: overlayfs writes only its upper
/// layer) and whose upper layer is `.root/` in this sandbox's scratch, so what it adds counts
/// against the disk limit and vanishes with the scratch.
///
/// The image is untrusted: any of its paths may be a symlink (`/mnt -> /etc`, `/etc ->
/// /host`). Before anything is mounted on or written into it, every component of the path is
/// checked with `lstat` and whatever is not a real directory is replaced by one in the upper
/// layer ([`real_dir`]); the generated `/etc` files replace the image's entries instead of
/// writing through them. Only this process exists in the sandbox yet, so nothing changes the
/// tree between the check and the mount.
fn image_root(spec: &InitSpec, stage: &Path, image: &Path) -> Stage<()> {
    if !spec.privileged {
        return Err(fail("image", "a sandbox from an image needs root"));
    }
    let layer = spec.scratch_dir.join(".root");
    let (upper, work) = (layer.join("upper"), layer.join("work"));
    for d in [&layer, &upper, &work] {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(d)
            .map_err(|e| fail("image", format!("mkdir {}: {e}", d.display())))?;
    }
    // A writable root: the image's files (owned by root on disk: the unpacker ignores owners)
    // are seen through an idmapped copy as the sandbox user's, so the user may change them;
    // overlayfs copies each changed file up into this sandbox's own upper layer, with that
    // owner. The image on disk is never written.
    let lower = if spec.writable_root {
        let lower = layer.join("lower");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&lower)
            .map_err(|e| fail("image", format!("mkdir {}: {e}", lower.display())))?;
        let userns = owner_userns(spec.host_uid, spec.host_gid)?;
        sys::idmapped_bind(image, &lower, userns.as_raw_fd()).map_err(|e| {
            fail(
                "image",
                format!("idmapped copy of {}: {e}", image.display()),
            )
        })?;
        lower
    } else {
        image.to_path_buf()
    };
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        stage,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| fail("image", format!("overlay of {}: {e}", image.display())))?;
    for d in [
        "etc",
        "proc",
        "dev",
        "tmp",
        "mnt/data",
        "run/ampoule",
        "var/tmp",
    ] {
        real_dir(stage, d)?;
    }
    let etc = stage.join("etc");
    for (name, contents) in &spec.etc_files {
        let p = etc.join(name);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
            Ok(_) => fs::remove_file(&p),
            Err(_) => Ok(()),
        }
        .map_err(|e| fail("image", format!("replace /etc/{name}: {e}")))?;
        // O_CREAT | O_EXCL: never through a link the image planted.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, contents.as_bytes()))
            .map_err(|e| fail("image", format!("write /etc/{name}: {e}")))?;
    }
    if spec.writable_root {
        // `/etc` is the user's as the rest of the image is (made here when the image had
        // none); the generated files in it stay root's.
        nix::unistd::chown(
            &etc,
            Some(Uid::from_raw(spec.host_uid)),
            Some(Gid::from_raw(spec.host_gid)),
        )
        .map_err(|e| fail("image", format!("chown /etc: {e}")))?;
    }
    if spec.trusted_ca_pem.is_some() {
        return Err(fail(
            "image",
            "credential injection is not supported in image sandboxes",
        ));
    }
    Ok(())
}

/// A user namespace mapping id 0 to `uid` and `gid` (the sandbox user's host ids), for an
/// idmapped mount: a child unshares it and waits while we, real root, write its maps and open
/// it; the namespace lives on through the descriptor after the child exits.
fn owner_userns(uid: u32, gid: u32) -> Stage<std::os::fd::OwnedFd> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).stage("image")?;
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).stage("image")?;
    match sys::fork().stage("image")? {
        Fork::Child => {
            drop((ready_r, go_w));
            let ok = unshare(CloneFlags::CLONE_NEWUSER).is_ok()
                && nix::unistd::write(&ready_w, b"x").is_ok();
            // Hold the namespace until the parent has opened it (it closes `go`).
            let mut byte = [0u8; 1];
            let _ = nix::unistd::read(&go_r, &mut byte);
            std::process::exit(if ok { 0 } else { 1 })
        }
        Fork::Parent(child) => {
            drop((ready_w, go_r));
            let opened = (|| -> std::io::Result<std::os::fd::OwnedFd> {
                let mut byte = [0u8; 1];
                if nix::unistd::read(&ready_r, &mut byte)? != 1 {
                    return Err(std::io::Error::other("the helper could not unshare"));
                }
                let proc = PathBuf::from(format!("/proc/{child}"));
                fs::write(proc.join("uid_map"), format!("0 {uid} 1\n"))?;
                fs::write(proc.join("gid_map"), format!("0 {gid} 1\n"))?;
                Ok(fs::File::open(proc.join("ns/user"))?.into())
            })();
            drop(go_w);
            let _ = waitpid(child, None);
            opened.map_err(|e| fail("image", format!("owner user namespace: {e}")))
        }
    }
}

/// Makes `rel` under `stage` a real directory, component by component, replacing a symlink
/// or file of the image by a directory (in the overlay's upper layer).
fn real_dir(stage: &Path, rel: &str) -> Stage<PathBuf> {
    let mut p = stage.to_path_buf();
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        p.push(comp);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => fs::remove_file(&p)
                .map_err(|e| fail("image", format!("replace {}: {e}", p.display())))?,
            Err(_) => {}
        }
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&p)
            .map_err(|e| fail("image", format!("mkdir {}: {e}", p.display())))?;
    }
    Ok(p)
}

/// `/dev`, the scratch parts and the read-only remounts, over either kind of root.
fn devices_and_scratch(spec: &InitSpec, stage: &Path) -> Stage<()> {
    // /dev: a small tmpfs with bind-mounted character devices (mknod is impossible in a user
    // namespace, and unnecessary).
    let dev = stage.join("dev");
    tmpfs(
        &dev,
        "size=64k,nr_inodes=64,mode=0755",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    )?;
    for node in ["null", "zero", "full", "random", "urandom"] {
        let dst = dev.join(node);
        touch(&dst)?;
        mount(
            Some(&Path::new("/dev").join(node)),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| fail("mount", format!("bind /dev/{node}: {e}")))?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name)).stage("rootfs")?;
    }
    mkdir_p(&dev.join("shm"))?;

    // The scratch parts: writable, nosuid and nodev as the scratch mount is (`mount_scratch`;
    // a bind keeps its source mount's flags).
    let scratch = spec.scratch_dir.as_path();
    bind(&scratch.join("data"), &stage.join("mnt/data"))?;
    bind(&scratch.join("tmp"), &stage.join("tmp"))?;
    bind(&scratch.join("shm"), &dev.join("shm"))?;
    bind(&scratch.join("tmp"), &stage.join("var/tmp"))?;
    // The code the supervisor hands over lives here, read-only to the sandbox.
    let code = stage.join("run/ampoule");
    bind(&scratch.join(".ampoule"), &code)?;
    seal(&code, &[])?;

    mount(
        None::<&str>,
        &dev,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| fail("mount", format!("remount /dev read-only: {e}")))?;
    // A host root is read-only already (`host_root`); a writable image root stays writable
    // (its writes land in the sandbox's own layer).
    if spec.image_root.is_some() && !spec.writable_root {
        mount(
            None::<&str>,
            stage,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| fail("mount", format!("remount / read-only: {e}")))?;
    }
    Ok(())
}

/// Adds the egress gateway's CA to the sandbox's trust: a combined bundle (the host's bundle
/// plus the CA) at `network::CA_BUNDLE`, the CA alone at `network::EGRESS_CA`, and the combined
/// bundle bound over the host bundle's path for tools that read only the system store (made
/// read-only with the root: the bind's path is returned for [`seal`]).
fn trust_ca(stage: &Path, ca_pem: &str) -> Stage<Option<PathBuf>> {
    use crate::network::{CA_BUNDLE, EGRESS_CA, SYSTEM_BUNDLE};
    let system = Path::new(SYSTEM_BUNDLE);
    let regular = fs::symlink_metadata(system).is_ok_and(|m| m.is_file());
    let mut bundle = if regular {
        fs::read(system).map_err(|e| fail("rootfs", format!("read {SYSTEM_BUNDLE}: {e}")))?
    } else {
        Vec::new()
    };
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca_pem.as_bytes());
    let combined = under(stage, Path::new(CA_BUNDLE));
    if let Some(parent) = combined.parent() {
        mkdir_p(parent)?;
    }
    fs::write(&combined, &bundle).map_err(|e| fail("rootfs", format!("write {CA_BUNDLE}: {e}")))?;
    fs::write(under(stage, Path::new(EGRESS_CA)), ca_pem)
        .map_err(|e| fail("rootfs", format!("write {EGRESS_CA}: {e}")))?;
    let target = under(stage, system);
    // Only over a regular file: binding onto a symlink would follow it out of the stage.
    if regular && fs::symlink_metadata(&target).is_ok_and(|m| m.is_file()) {
        bind(&combined, &target)?;
        return Ok(Some(target));
    }
    Ok(None)
}

/// `/proc` entries that reveal or change host state; masked as runc does.
pub(crate) const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "kmsg",
    "keys",
    "key-users",
    "sysrq-trigger",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "kallsyms",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "config.gz",
    "vmallocinfo",
    "slabinfo",
];
pub(crate) const PROC_MASKED_DIRS: &[&str] =
    &["acpi", "scsi", "irq", "bus", "fs", "driver", "tty", "sys"];

/// Mounts pid 1's namespace's `/proc` (a process in the namespace must: a proc mount shows the
/// mounting process's pid namespace). The masks follow with [`mask_proc`].
fn mount_proc(stage: &Path) -> Stage<()> {
    mount(
        Some("proc"),
        &stage.join("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| fail("proc", format!("mount /proc: {e}")))
}

/// Hides what `/proc` tells of the host: `/dev/null` over each masked file, an empty read-only
/// directory over each masked directory. The outer init does it, in the mount namespace it
/// shares with pid 1, while pid 1 goes on with its own steps; the program starts after both.
fn mask_proc(stage: &Path) -> Stage<()> {
    let proc_dir = stage.join("proc");
    let null = stage.join("dev/null");
    // Absent on this kernel (no `/proc/kcore` without CONFIG_PROC_KCORE, say): nothing to hide.
    let absent = |e: nix::errno::Errno| e == nix::errno::Errno::ENOENT;
    for f in PROC_MASKED_FILES {
        match mount(
            Some(&null),
            &proc_dir.join(f),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            Ok(()) => {}
            Err(e) if absent(e) => {}
            Err(e) => return Err(fail("proc", format!("mask /proc/{f}: {e}"))),
        }
    }
    // One small read-only tmpfs, bound over every masked directory: a bind shares the first
    // mount's superblock (read-only with it), cheaper than a tmpfs instance per directory.
    let mut empty: Option<PathBuf> = None;
    for d in PROC_MASKED_DIRS {
        let p = proc_dir.join(d);
        let done = match &empty {
            None => mount(
                Some("tmpfs"),
                &p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=4k,nr_inodes=4,mode=0555"),
            ),
            Some(first) => mount(
                Some(first),
                &p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
        };
        match done {
            Ok(()) => {
                empty.get_or_insert(p);
            }
            Err(e) if absent(e) => {}
            Err(e) => return Err(fail("proc", format!("mask /proc/{d}: {e}"))),
        }
    }
    Ok(())
}

/// Makes the stage the root of our mount namespace: every process of it (the inner init we
/// fork later too) then resolves `/` in the new tree. `pivot_root(".", ".")` stacks the old root
/// on top of the new one, where `..` of `/` still leads: [`detach_old_root`] must follow
/// before any code of the sandbox runs.
fn pivot(stage: &Path) -> Stage<()> {
    // In root mode the stage is a locked mount (made before the user namespace existed), and
    // pivot_root refuses a locked new root: a bind of it onto itself is a fresh, unlocked mount.
    mount(
        Some(stage),
        stage,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| fail("pivot_root", format!("bind stage: {e}")))?;
    nix::unistd::chdir(stage).stage("pivot_root")?;
    nix::unistd::pivot_root(".", ".").stage("pivot_root")
}

/// Detaches the old root [`pivot`] left stacked on `/`, leaving only the new tree, with no
/// directory for the old root to hide in. The call returns only after an RCU grace period
/// (the kernel frees the detached mounts then): the outer init makes it while pid 1 sets up,
/// and pid 1 waits for its word before it reports ready or starts the program.
fn detach_old_root() -> Stage<()> {
    // Our working directory is the new root's, under the old root: `.` reaches the top one.
    umount2(".", MntFlags::MNT_DETACH).stage("pivot_root")?;
    nix::unistd::chdir("/").stage("pivot_root")
}

/// Where the sandbox may write (everything else is read and execute only): its scratch areas,
/// mounted afresh over whatever the host has there (so nothing may be bound under them).
pub(crate) const LANDLOCK_RW_DIRS: &[&str] = &["/mnt/data", "/tmp", "/dev/shm", "/var/tmp"];
/// Devices the sandbox may open for writing.
pub(crate) const LANDLOCK_RW_DEVS: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// The top-level directories of a writable root (a sandbox from an image with
/// `writable_root`: the only kind whose `/` is not mounted read-only), which Landlock lets the
/// code write; never `/proc`, `/dev`, `/sys`, `/run` or `/mnt`, and nothing for a read-only
/// root. Read from the mount itself, so entered processes find the same set.
fn writable_root_dirs() -> Vec<String> {
    let read_only = nix::sys::statvfs::statvfs("/")
        .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .unwrap_or(true);
    if read_only {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir("/") else {
        return Vec::new();
    };
    let mut dirs: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| !["proc", "dev", "sys", "run", "mnt"].contains(&n.as_str()))
        .map(|n| format!("/{n}"))
        .collect();
    dirs.sort();
    dirs
}

/// Confines this process (and what it forks) with the sandbox's Landlock ruleset; returns
/// the kernel's verdict.
pub(crate) fn landlock() -> Stage<String> {
    landlock_restrict(landlock_ruleset()?)
}

/// The sandbox's Landlock ruleset, not yet applied: read-only below `/`, writable in the
/// scratch areas and a few devices. Its rules name inodes (each path is opened), so any
/// process that sees the sandbox's root may build it for another to apply.
fn landlock_ruleset() -> Stage<landlock::RulesetCreated> {
    use landlock::{
        ABI, Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
        RulesetCreatedAttr, Scope,
    };
    let abi = ABI::V6;
    let (rw_dirs, rw_devs) = (LANDLOCK_RW_DIRS, LANDLOCK_RW_DEVS);
    let root_dirs = writable_root_dirs();
    (|| -> std::result::Result<landlock::RulesetCreated, String> {
        let fd = |p: &str| PathFd::new(p).map_err(|e| format!("{p}: {e}"));
        let e = |e: landlock::RulesetError| e.to_string();
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(abi))
            .map_err(e)?
            .scope(Scope::AbstractUnixSocket | Scope::Signal)
            .map_err(e)?
            .create()
            .map_err(e)?
            .add_rule(PathBeneath::new(fd("/")?, AccessFs::from_read(abi)))
            .map_err(e)?;
        for d in rw_dirs.iter().copied() {
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd(d)?, AccessFs::from_all(abi)))
                .map_err(e)?;
        }
        for d in &root_dirs {
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd(d)?, AccessFs::from_all(abi)))
                .map_err(e)?;
        }
        for d in rw_devs.iter().copied() {
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd(d)?, AccessFs::from_file(abi)))
                .map_err(e)?;
        }
        Ok(ruleset)
    })()
    .stage("landlock")
}

/// Applies a ruleset of [`landlock_ruleset`] to this process.
fn landlock_restrict(ruleset: landlock::RulesetCreated) -> Stage<String> {
    use landlock::RulesetStatus;
    let status = ruleset.restrict_self().stage("landlock")?.ruleset;
    Ok(match status {
        RulesetStatus::FullyEnforced => "fully_enforced",
        RulesetStatus::PartiallyEnforced => "partially_enforced",
        RulesetStatus::NotEnforced => "not_enforced",
    }
    .to_owned())
}

/// Empties the capability bounding set (one system call per capability): what no `execve`
/// below may gain. Inherited across `fork`; it bounds nothing this process holds already, so
/// whichever process waits for `Start` drops it (see [`Started::prepare`]) and keeps its
/// capabilities for the steps that follow.
fn drop_bounding_set() -> Stage<()> {
    for cap in caps::all() {
        caps::drop(None, caps::CapSet::Bounding, cap).stage("capabilities")?;
    }
    Ok(())
}

/// Clears every capability set but the bounding set (emptied before: [`drop_bounding_set`]).
fn drop_capabilities() -> Stage<()> {
    use caps::CapSet;
    caps::clear(None, CapSet::Ambient).stage("capabilities")?;
    caps::clear(None, CapSet::Inheritable).stage("capabilities")?;
    caps::clear(None, CapSet::Effective).stage("capabilities")?;
    caps::clear(None, CapSet::Permitted).stage("capabilities")?;
    Ok(())
}

fn cstrings(items: impl IntoIterator<Item = String>) -> Stage<Vec<CString>> {
    items
        .into_iter()
        .map(|s| CString::new(s).map_err(|_| fail("exec", "argument contains a NUL byte")))
        .collect()
}

/// What pid 1 gets from the outer init: the cgroup to join, and its ends of the two words
/// about the old root (see `outer`).
struct Handover {
    /// What the outer init received and prepared when it forked pid 1 after `Start`; `None`:
    /// pid 1 was forked before it, and waits for `Start` itself (see `outer`).
    started: Option<Started>,
    proc_mounted: std::os::fd::OwnedFd,
    old_root_detached: std::os::fd::OwnedFd,
    /// The network namespace was made ahead, loopback up (see [`network_ahead`]).
    loopback_up: bool,
}

/// `Start`'s part of pid 1's hand-over.
struct Started {
    /// The sandbox cgroup's files pid 1 writes itself into (see [`inner`]).
    cgroup_tasks: Vec<std::os::fd::OwnedFd>,
    /// The Landlock ruleset to apply (none for a zygote).
    landlock: Option<landlock::RulesetCreated>,
}

impl Started {
    /// What comes before pid 1's own steps, by whichever process waits for `Start`: every CPU
    /// the supervisor had back (for pid 1 and the program), the capability bounding set
    /// emptied and the Landlock ruleset built (not for a zygote), `Start` received, and in
    /// allowlist mode the network configured (by then the supervisor has moved the sandbox end
    /// of the veth pair in).
    fn prepare(spec: &InitSpec, chan: &InitChannel) -> Stage<Self> {
        crate::cpus::rejoin();
        let landlock = if spec.zygote {
            None
        } else {
            drop_bounding_set()?;
            Some(landlock_ruleset()?)
        };
        let cgroup_tasks = match chan.recv_with_fds().stage("channel")? {
            (ToInit::Start, fds) => fds,
            (ToInit::Spec(_), _) => return Err(fail("channel", "unexpected second spec")),
        };
        if let Some(net) = &spec.network {
            crate::network::configure_inside(net).stage("network")?;
        }
        Ok(Self {
            cgroup_tasks,
            landlock,
        })
    }
}

/// Whether the other end wrote its byte (rather than closing the pipe).
fn read_word(fd: &std::os::fd::OwnedFd) -> bool {
    let mut word = [0u8; 1];
    loop {
        match nix::unistd::read(fd, &mut word) {
            Ok(n) => return n == 1,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Pid 1 of the sandbox.
fn inner(
    spec: &InitSpec,
    chan: &InitChannel,
    seccomp: &SeccompPolicy,
    handover: Handover,
) -> Stage<i32> {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // The outer init made the stage our root (see `pivot`), and detaches the old one once
    // our `/proc` is mounted, then masks it: our first step, so that its part (the detach's
    // RCU grace period, the masks) starts as early as it can beside ours.
    mount_proc(Path::new("/"))?;
    nix::unistd::write(&handover.proc_mounted, b"1").stage("pivot_root")?;
    drop(handover.proc_mounted);
    // Forked before `Start`: what the outer init otherwise does while it waits for it, here
    // while it detaches the old root and the supervisor writes the inputs.
    let Started {
        cgroup_tasks,
        landlock: ruleset,
    } = match handover.started {
        Some(started) => started,
        None => Started::prepare(spec, chan)?,
    };
    // cgroup v1: pid 1, not the outer init, joins the sandbox's cgroup, so that the cgroup is
    // empty once pid 1's namespace has died, whether or not the outer init has finished
    // exiting (freeing its namespaces, mounts first, takes a while): the supervisor may then
    // remove it without waiting (see `Sandbox::finish`). Moving *ourselves* by thread through
    // `tasks` skips the kernel's global threadgroup lock, whose write side waits for an RCU
    // grace period (~14 ms) when a whole process is moved through `cgroup.procs`. Pid 1 is
    // single-threaded, so this moves the process, and everything it forks inherits the
    // cgroup. The files were opened by the supervisor (real root), whose credentials the
    // kernel checks: we have none left. (v2: the supervisor moved the outer init before
    // `Start`, and we inherited its cgroup.)
    for tasks in &cgroup_tasks {
        nix::unistd::write(tasks, b"0").stage("cgroup")?;
    }
    drop(cgroup_tasks);
    // Only now is the current cgroup the right root for the sandbox's cgroup namespace.
    unshare(CloneFlags::CLONE_NEWCGROUP).stage("unshare cgroup")?;
    let argv = cstrings(spec.argv.iter().cloned())?;
    let env = cstrings(spec.env.iter().map(|(k, v)| format!("{k}={v}")))?;
    let Some(path) = argv.first().cloned() else {
        return Err(fail("exec", "empty argv"));
    };

    nix::unistd::sethostname(&spec.hostname).stage("hostname")?;
    if !handover.loopback_up {
        sys::loopback_up().stage("loopback")?;
    }
    nix::unistd::chdir(spec.cwd.as_str()).stage("cwd")?;
    // A handle on ourselves for the supervisor: the process whose namespaces later processes
    // join (`crate::enter`). Taken before seccomp; close-on-exec, and dropped before the fork.
    let me = sys::pidfd_open(nix::unistd::getpid().as_raw()).ok();
    let landlock = if spec.zygote {
        // A zygote's children build their own mounts (which Landlock would forbid) and then
        // apply every layer below themselves (kernels/python/zygote.py).
        "per_session".to_owned()
    } else {
        let ruleset = ruleset.ok_or_else(|| fail("landlock", "no ruleset"))?;
        let landlock = landlock_restrict(ruleset)?;
        drop_capabilities()?;
        nix::sys::prctl::set_no_new_privs().stage("no_new_privs")?;
        // Speculative store bypass: seccomp no longer turns the mitigation on by itself
        // (5.16+). ENXIO: no per-process control here (the mitigation is global, on or off,
        // or the CPU is not affected); any other failure stops.
        match sys::disable_speculative_store_bypass() {
            Err(e) if e.raw_os_error() != Some(libc::ENXIO) => {
                return Err(fail("speculation", e.to_string()));
            }
            _ => {}
        }
        nix::sys::prctl::set_dumpable(false).stage("dumpable")?;
        seccomp.apply().stage("seccomp")?;
        landlock
    };
    // Nothing of the sandbox may run, nor anything enter it, while the old root is attached.
    if !read_word(&handover.old_root_detached) {
        return Err(fail("pivot_root", "the old root was not detached"));
    }
    drop(handover.old_root_detached);

    // The program first, then the word to the supervisor: that wake-up (a synchronous one,
    // which may run the supervisor on our CPU) is not a step of the program's start. The
    // child has `me` until its `exec` (close-on-exec).
    let program = sys::spawn_program(&path, &argv, &env, spec.ignored_signals).map_err(|e| {
        let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0));
        fail(
            "exec",
            format!(
                "{}: {}",
                spec.argv.first().map(String::as_str).unwrap_or(""),
                errno.desc()
            ),
        )
    })?;
    let ready = chan.send(
        &FromInit::Ready { landlock },
        me.as_ref().map(AsRawFd::as_raw_fd),
    );
    drop(me);
    if let Err(e) = ready {
        let _ = nix::sys::signal::kill(program, Signal::SIGKILL);
        return Err(fail("channel", e.to_string()));
    }
    detach_stdio();
    reap_until(program, chan)
}

/// Reaps every child (orphans are re-parented to pid 1) until the program itself exits, then
/// reports its status. Returning ends pid 1, which makes the kernel kill the rest.
fn reap_until(program: Pid, chan: &InitChannel) -> Stage<i32> {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program => {
                let _ = chan.send(&FromInit::Exited { code }, None);
                return Ok(0);
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == program => {
                let _ = chan.send(&FromInit::Signaled { signal: sig as i32 }, None);
                return Ok(0);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(fail("wait", e.to_string())),
        }
    }
}
