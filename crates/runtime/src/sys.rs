//! The only module of ampoule that may use `unsafe`.
//!
//! Each function wraps one system call (or one `libc` call) that no safe crate offers in the
//! form we need, and documents the invariant that makes it sound. Everything else in the runtime
//! calls these wrappers.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::unistd::Pid;

/// Result of [`fork`].
pub(crate) enum Fork {
    /// We are the parent; the child has this pid.
    Parent(Pid),
    /// We are the child.
    Child,
}

/// Forks the calling process.
///
/// Only called by single-threaded processes — the sandbox init (a fresh `exec` of the ampoule
/// binary that never starts a runtime, or a child of `crate::prefork`) and the CLI before it
/// starts any thread (`crate::prefork`, which checks) — so the child may allocate and take
/// locks.
pub(crate) fn fork() -> io::Result<Fork> {
    // JUSTIFICATION: neither nix nor rustix offers a safe fork; it cannot be safe in general.
    // SAFETY: the caller is single-threaded (see above), so no lock can be held by another
    // thread at the time of the fork, and the child may continue running ordinary Rust code.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Parent { child } => Ok(Fork::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Fork::Child),
    }
}

/// Closes every file descriptor from `first` upwards.
pub(crate) fn close_from(first: u32) -> io::Result<()> {
    // JUSTIFICATION: close_range(2) has no wrapper in nix 0.30.
    // SAFETY: close_range only closes descriptors; callers make sure no Rust object still owns a
    // descriptor at or above `first` that it will use afterwards (init closes before it builds
    // any such object, or forgets them first).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Ends this process at once with `code` (`_exit(2)`): no libc exit handlers, no thread-local
/// destructors, no stdio flush. Hand-written: neither nix nor std has it.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes an integer and does not return; it touches no memory of ours.
    unsafe { libc::_exit(code) }
}

/// Writes what it can of `buf` to `fd` at its current offset without blocking (`pwritev2`
/// with `RWF_NOWAIT`): how many bytes, or `WouldBlock` when none could go now, `Unsupported`
/// where the file does not take the flag (a terminal, a regular file on most filesystems).
///
/// For a descriptor this process shares with others (its stdout, say), whose `O_NONBLOCK` it
/// must not set. Hand-written: neither nix nor std wraps `pwritev2`, and rustix's takes no
/// "current offset".
pub(crate) fn write_nowait(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec describing `buf`, which outlives the call and which the kernel only
    // reads; offset -1 is the file's current offset; `fd` is borrowed, so open.
    let n = unsafe { libc::pwritev2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Makes `fd` become descriptor `target` in a child about to `exec`, for `pre_exec`.
///
/// Async-signal-safe: it only calls dup2(2).
pub(crate) fn dup2_raw(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 takes plain integers and touches no memory; a bad descriptor yields EBADF.
    let rc = unsafe { libc::dup2(fd, target) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Registers a closure that runs in the forked child before `exec` (see
/// [`std::os::unix::process::CommandExt::pre_exec`]) which moves `fd` to descriptor `target`.
pub(crate) fn pass_fd(cmd: &mut tokio::process::Command, fd: RawFd, target: RawFd) {
    // SAFETY: the closure only calls dup2 (async-signal-safe), allocates nothing and takes no
    // lock, which is what pre_exec requires of code running between fork and exec in a
    // multi-threaded parent. `fd` stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || dup2_raw(fd, target));
    }
}

/// Brings the loopback interface of the current network namespace up.
pub(crate) fn loopback_up() -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // JUSTIFICATION: no crate wraps SIOCGIFFLAGS/SIOCSIFFLAGS without pulling in netlink.
    // SAFETY: `req` is a properly sized, NUL-terminated ifreq that outlives both calls, and the
    // socket is a valid descriptor owned by `sock`.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Applies a compiled seccomp program to the calling thread.
///
/// A thin wrapper so the sandbox can install several filters in a chosen order.
pub(crate) fn apply_seccomp(prog: &[seccompiler::sock_filter]) -> io::Result<()> {
    seccompiler::apply_filter(prog).map_err(|e| io::Error::other(e.to_string()))
}

/// Wipes the environment this process started with, strings included: a child forked from
/// the supervisor (see `crate::prefork`) must not keep the supervisor's variables where
/// `/proc/<pid>/environ` shows them, as an exec'd init with a cleared environment does not.
///
/// Only in a single-threaded process.
pub(crate) fn scrub_environ() {
    // JUSTIFICATION: neither std nor nix can overwrite the environment's original bytes
    // (`remove_var` only unlinks them from `environ`).
    // SAFETY: single-threaded (the caller's contract), so nothing reads `environ` meanwhile;
    // every entry up to the terminating null is a NUL-terminated string in writable memory
    // (the initial stack, or a `setenv` copy), which we overwrite within its own length, and
    // we keep the array terminated.
    unsafe {
        let mut entry = libc_environ();
        if entry.is_null() {
            return;
        }
        while !(*entry).is_null() {
            let s = *entry;
            let len = libc::strlen(s);
            std::ptr::write_bytes(s, 0, len);
            entry = entry.add(1);
        }
        *libc_environ() = std::ptr::null_mut();
    }
}

unsafe extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// `environ`'s current value.
fn libc_environ() -> *mut *mut libc::c_char {
    // SAFETY: reads the pointer value only (no reference to the mutable static is formed).
    unsafe { std::ptr::addr_of_mut!(environ).read() }
}

/// Takes ownership of a descriptor the kernel just handed us (`SCM_RIGHTS`, or descriptor 3
/// passed to the init process).
pub(crate) fn own_fd(fd: RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: callers pass a descriptor that was just received from the kernel (recvmsg) or
    // that was placed at a fixed number by our own pre_exec, and that no other object owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// The Landlock ABI version the kernel offers, or the errno when it offers none.
pub(crate) fn landlock_abi() -> io::Result<i64> {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // JUSTIFICATION: the landlock crate reports enforcement, not the raw ABI number we show.
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag, the syscall only
    // returns a number and touches no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Registers an owned descriptor with tokio's reactor.
pub(crate) fn register_async(
    fd: std::os::fd::OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor cannot be closed or
    // reused behind the reactor's back while it is registered (the I/O-safety requirement of
    // `register`).
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Forces the speculative-store-bypass mitigation on for this task and its children.
pub(crate) fn disable_speculative_store_bypass() -> io::Result<()> {
    // JUSTIFICATION: nix has no wrapper for PR_SET_SPECULATION_CTRL.
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SPECULATION_CTRL,
            libc::PR_SPEC_STORE_BYPASS,
            libc::PR_SPEC_FORCE_DISABLE,
            0,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `SIGKILL` through a pidfd (no pid-reuse race).
pub(crate) fn pidfd_kill(pidfd: RawFd) -> io::Result<()> {
    pidfd_signal(pidfd, libc::SIGKILL)
}

/// Sends `signal` through a pidfd (no pid-reuse race).
pub(crate) fn pidfd_signal(pidfd: RawFd, signal: i32) -> io::Result<()> {
    // JUSTIFICATION: nix has no pidfd_send_signal wrapper.
    // SAFETY: integer arguments and a null siginfo pointer, which the kernel accepts; a stale
    // or foreign descriptor only makes the call fail.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A pidfd (close-on-exec) for process `pid` of our pid namespace. Race-free only while the
/// caller knows `pid` cannot be reused: its own unreaped child, or itself.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<std::os::fd::OwnedFd> {
    // JUSTIFICATION: nix has no pidfd_open wrapper.
    // SAFETY: integer arguments only; on success the kernel returns a new descriptor that
    // nothing else owns, which we wrap at once.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(rc).map_err(|_| io::Error::other("pidfd out of range"))?;
    Ok(own_fd(fd))
}

/// The pid (in our pid namespace) of the process a pidfd refers to, from its fdinfo.
pub(crate) fn pidfd_pid(pidfd: RawFd) -> io::Result<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{pidfd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|pid| *pid > 0)
        .map(|pid| pid as u32)
        .ok_or_else(|| io::Error::other("the process is gone or not visible from here"))
}

/// `struct loop_info64` of `<linux/loop.h>` (not in the libc crate).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// Asks `/dev/loop-control` (open as `control`) for a free loop device number.
pub(crate) fn loop_get_free(control: RawFd) -> io::Result<u32> {
    // JUSTIFICATION: no crate we depend on wraps the loop ioctls (`loopdev` needs bindgen).
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and touches no memory of ours.
    let rc = unsafe { libc::ioctl(control, LOOP_CTL_GET_FREE as _) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as u32)
    }
}

/// Binds the loop device open as `dev` to the file open as `backing`, read-write, detached
/// automatically once its last user (the mount) lets go of it.
pub(crate) fn loop_configure(dev: RawFd, backing: RawFd) -> io::Result<()> {
    let config = LoopConfig {
        fd: backing as u32,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is (repr(C), the
    // kernel's layout), alive for the duration of the call; the kernel keeps no pointer to it.
    let rc = unsafe { libc::ioctl(dev, LOOP_CONFIGURE as _, &config as *const LoopConfig) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The pre-exec step of [`join_cgroup_before_exec`]: writes `0` (the writer itself) to each
/// open `cgroup.procs` file. Only write(2): async-signal-safe, no allocation, no lock.
fn join_cgroups(procs: &[std::os::fd::OwnedFd]) -> io::Result<()> {
    for fd in procs {
        // SAFETY: `fd` is an open descriptor owned by the caller; the buffer is a static
        // one-byte string.
        let rc = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Registers a closure that runs in the forked child before `exec` and moves the child into a
/// cgroup by writing `0` to each of `procs` (open `cgroup.procs` files). Everything the
/// program then forks (runsc's sentry and gofer) starts inside that cgroup.
pub(crate) fn join_cgroup_before_exec(
    cmd: &mut tokio::process::Command,
    procs: Vec<std::os::fd::OwnedFd>,
) {
    // SAFETY: the closure only calls write(2) (async-signal-safe) on descriptors opened before
    // the fork, allocates nothing and takes no lock, as pre_exec requires in a multi-threaded
    // parent. `procs` moves into the closure, so the descriptors live as long as `cmd`.
    unsafe {
        cmd.pre_exec(move || join_cgroups(&procs));
    }
}

/// [`join_cgroup_before_exec`] for a blocking [`std::process::Command`].
pub(crate) fn join_cgroup_before_exec_std(
    cmd: &mut std::process::Command,
    procs: Vec<std::os::fd::OwnedFd>,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: as in `join_cgroup_before_exec`.
    unsafe {
        cmd.pre_exec(move || join_cgroups(&procs));
    }
}

/// `struct mount_attr` of `<linux/mount.h>` (version 0, 32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
/// `MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV`.
pub(crate) const MOUNT_ATTR_SEALED: u64 = 0x1 | 0x2 | 0x4;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Attaches at `target` an idmapped copy of the tree at `source` (not its submounts): file
/// owners on disk are seen through the id maps of the user namespace `userns`. The caller is
/// real root in a private mount namespace.
pub(crate) fn idmapped_bind(
    source: &std::path::Path,
    target: &std::path::Path,
    userns: RawFd,
) -> io::Result<()> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let cstr = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (source, target) = (cstr(source)?, cstr(target)?);
    // JUSTIFICATION: nix has no open_tree, move_mount or mount_setattr, and rustix no
    // mount_setattr; the three calls are used together, so all three are made here.
    // SAFETY: `source` is a valid NUL-terminated string for the duration of the call; the
    // kernel returns a new descriptor or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let tree = unsafe { std::os::fd::OwnedFd::from_raw_fd(tree as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns as u64,
    };
    // SAFETY: `attr` lives for the duration of the call and its size is passed with it; the
    // empty path with AT_EMPTY_PATH names the detached tree `tree` itself.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both strings are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the mount attributes `set` (`MOUNT_ATTR_*`) on the mount at `path`, and with
/// `recursive` on every mount below it, in one call; other attributes are left as they are
/// (unlike a bind remount, which must repeat the flags the kernel locked, read with a statfs).
pub(crate) fn mount_setattr(path: &std::path::Path, recursive: bool, set: u64) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // JUSTIFICATION: as in `idmapped_bind`, no crate wraps mount_setattr.
    // SAFETY: `path` is a valid NUL-terminated string and `attr` lives for the duration of the
    // call, its size passed with it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Paths the pre-exec step of [`hide_net_sysctls_before_exec`] uses, made before the fork (no
/// allocation may happen after it).
struct SysctlShim {
    keep: std::ffi::CString,
    sys: std::ffi::CString,
    tmpfs: std::ffi::CString,
    options: std::ffi::CString,
    /// `(/proc/sys/X, <keep>/X)` for each subtree that stays visible.
    subtrees: Vec<(std::ffi::CString, std::ffi::CString)>,
}

/// The `/proc/sys` subtrees runsc reads (`vm/mmap_min_addr` at start, `kernel` for its
/// platform, `fs`); `net` is the one hidden.
const SYSCTL_SUBTREES: [&str; 3] = ["vm", "kernel", "fs"];

/// Registers a closure that runs in the forked child before `exec` and gives the program a
/// private mount namespace in which `/proc/sys` has no `net` directory (an empty tmpfs with
/// `vm`, `kernel` and `fs` bound back from the real one, through `keep`, an empty directory).
///
/// Why: runsc before 2023 refuses `--network=sandbox` when `/proc/sys/net/core/rmem_default`
/// exists after it joined the sandbox's network namespace ("cannot run with network enabled in
/// root network namespace"), a test for "this is the host's namespace" that every namespace
/// passes on kernels ≥ 6.x, where that file is per namespace. Only runsc's own view changes:
/// the sandbox (sentry) mounts a fresh procfs in its chroot.
pub(crate) fn hide_net_sysctls_before_exec(
    cmd: &mut tokio::process::Command,
    keep: &std::path::Path,
) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |b: &[u8]| CString::new(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let shim = SysctlShim {
        keep: c(keep.as_os_str().as_bytes())?,
        sys: c(b"/proc/sys")?,
        tmpfs: c(b"tmpfs")?,
        options: c(b"size=4k,mode=0555")?,
        subtrees: SYSCTL_SUBTREES
            .iter()
            .map(|d| {
                Ok((
                    c(format!("/proc/sys/{d}").as_bytes())?,
                    c(keep.join(d).as_os_str().as_bytes())?,
                ))
            })
            .collect::<io::Result<_>>()?,
    };
    // SAFETY: the closure only makes system calls (unshare, mount, mkdir, umount2: all
    // async-signal-safe) on C strings built before the fork, allocates nothing and takes no
    // lock, as pre_exec requires in a multi-threaded parent. `shim` moves into the closure.
    unsafe {
        cmd.pre_exec(move || shim_sysctls(&shim));
    }
    Ok(())
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The pre-exec step of [`hide_net_sysctls_before_exec`].
fn shim_sysctls(s: &SysctlShim) -> io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: plain system calls on NUL-terminated strings owned by `s`, which outlives
    // them, or null pointers where the kernel accepts them (mount's source, type and data).
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            s.sys.as_ptr(),
            s.keep.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            s.tmpfs.as_ptr(),
            s.sys.as_ptr(),
            s.tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            s.options.as_ptr().cast(),
        ))?;
        for (dst, src) in &s.subtrees {
            check(libc::mkdir(dst.as_ptr(), 0o555))?;
            check(libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
        }
        check(libc::umount2(s.keep.as_ptr(), libc::MNT_DETACH))?;
    }
    Ok(())
}

/// What [`spawn_program`] hands its child: everything is read before `execve`, while the
/// parent is suspended, and the child writes only `errno`.
struct SpawnArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Signals to set back to their default action (ignored ones survive `execve`).
    reset: u64,
    /// The `execve` error, 0 until then.
    errno: libc::c_int,
}

/// The child of [`spawn_program`], on its own stack in the parent's memory: a new session,
/// the ignored signals back to default, `execve`. Only system calls (and writes to its own
/// `SpawnArgs`), no allocation, no lock: the parent's memory must be as it left it.
extern "C" fn spawned_child(arg: *mut libc::c_void) -> libc::c_int {
    let args = arg.cast::<SpawnArgs>();
    // SAFETY: `arg` is the `SpawnArgs` of `spawn_program`'s frame, alive and otherwise
    // untouched until we exec or exit (the parent is suspended by CLONE_VFORK). setsid and
    // sigaction take plain values; execve reads the NUL-terminated arrays built from CStrings
    // that outlive the call; _exit does not return.
    unsafe {
        libc::setsid();
        default_signals((*args).reset);
        libc::execve((*args).path, (*args).argv, (*args).envp);
        (*args).errno = *libc::__errno_location();
        libc::_exit(127)
    }
}

/// Starts `path` (`argv`, `env`) as a child in a session of its own, with the signals of
/// `reset` (a `SigIgn`-style mask: bit `n - 1` for signal `n`) back to their default action.
/// The child shares our memory until its `execve` and we wait meanwhile
/// (`clone(CLONE_VM | CLONE_VFORK)`, what `vfork` does, on a stack of its own): no page
/// table is copied, no page of ours is write-protected, where a `fork` copies them all and
/// its `execve` throws the copy away. Returns the child's pid, or the `execve` error (the
/// child, which exited, is reaped).
///
/// Hand-written: nix has no vfork-style spawn but `posix_spawn`, whose glibc child reads and
/// resets the disposition of every signal (120 `rt_sigaction` calls before the `execve`).
pub(crate) fn spawn_program(
    path: &std::ffi::CStr,
    argv: &[std::ffi::CString],
    env: &[std::ffi::CString],
    reset: u64,
) -> io::Result<Pid> {
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let env_ptrs: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut args = SpawnArgs {
        path: path.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: env_ptrs.as_ptr(),
        reset,
        errno: 0,
    };
    // The child's stack: a few system calls deep, no more (16-byte aligned top).
    let mut stack = vec![0u128; 1024];
    let top = stack.as_mut_ptr_range().end.cast::<libc::c_void>();
    // SAFETY: `spawned_child` runs on `stack`, which outlives it (we are suspended until the
    // child execs or exits, CLONE_VFORK); `args` stays in place for the same time. Without
    // CLONE_SIGHAND and CLONE_FILES the child gets its own copies of the signal actions and
    // the descriptor table. The caller is single-threaded (pid 1), so no other thread can
    // change memory the child reads.
    let pid = unsafe {
        libc::clone(
            spawned_child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_mut(&mut args).cast(),
        )
    };
    drop(stack);
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = Pid::from_raw(pid);
    if args.errno != 0 {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(args.errno));
    }
    Ok(pid)
}

/// Sets the signals of `mask` (bit `n - 1` for signal `n`) back to their default action.
/// Allocation-free and async-signal-safe: only rt_sigaction(2), made directly because glibc's
/// `sigaction` refuses its own internal signals (32 and 33), which a caller may ignore too.
pub(crate) fn default_signals(mask: u64) {
    // The kernel's `struct sigaction` (handler, flags, restorer, mask on x86-64 and arm64):
    // all zero is SIG_DFL, no flags, nothing blocked.
    let default = [0u64; 4];
    for sig in 1..=64 {
        if mask & (1u64 << (sig - 1)) != 0 {
            // SAFETY: `default` is a valid kernel sigaction (SIG_DFL installs no handler) that
            // outlives the call, the old action is not asked for, and 8 is the kernel's
            // sigset size; a number that cannot be changed (SIGKILL, SIGSTOP) fails with
            // EINVAL and changes nothing.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    default.as_ptr(),
                    std::ptr::null::<u64>(),
                    8usize,
                )
            };
        }
    }
}

/// This process's ignored signals (`SigIgn` of `/proc/self/status`, bit `n - 1` for signal
/// `n`): the sandbox's processes inherit them across `execve` and set them back to default
/// (see [`spawn_program`]). Read once (or taken from a read of that file made anyway, see
/// [`note_ignored_signals`]); 0 if it cannot be.
pub(crate) fn ignored_signals() -> u64 {
    *IGNORED_SIGNALS.get_or_init(|| {
        crate::cgroup::read_proc("/proc/self/status")
            .ok()
            .and_then(|s| sig_ign(&s))
            .unwrap_or(0)
    })
}

/// Keeps the ignored signals of a `/proc/self/status` just read, for [`ignored_signals`].
pub(crate) fn note_ignored_signals(status: &str) {
    if let Some(mask) = sig_ign(status) {
        let _ = IGNORED_SIGNALS.set(mask);
    }
}

static IGNORED_SIGNALS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn sig_ign(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}
