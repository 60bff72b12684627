"""ampoule's Python zygote: an interpreter that has imported the kernel and the pool's packages
once, and forks a new session for every request of the supervisor.

It runs inside its own sandbox (user, mount, pid, net, ipc and uts namespaces, a read-only root,
no network, no secrets in its memory or environment) as root of its user namespace, without
Landlock or seccomp: each child applies those itself, after building its own namespaces. The
steps mirror the runtime's init (crates/runtime/src/init.rs) one for one; the seccomp programs
and the Landlock rules come from the supervisor, so both backends enforce the same policy.

Control socket: descriptor 0, a SOCK_SEQPACKET socket to the supervisor; one JSON object per
datagram, descriptors with SCM_RIGHTS.

  supervisor -> zygote  {"config": {...}}                 once, first
  zygote -> supervisor  {"ready": {"runtime", "preloaded", "failed", "ms", "huge_mib", "hot_kib",
                                   "holes_kib", "immortal", "threads"}}
  supervisor -> zygote  {"fork": {"id", ...}}             fds: ctl, stdin, stdout, stderr, tasks…
  zygote -> supervisor  {"forked": {"id", "pid"}}         fd: a pidfd of the child
                        {"error": {"id", "message"}}        (id null: forking the spare failed)
                        {"exit": {"pid", "code"|"signal"}}   when a child has ended

The zygote keeps one child forked ahead of the next request, its "spare" (pid 2 of a pid
namespace of its own, whose pid 1 is a reaper): the fork, the namespaces, /proc, loopback, the
scratch tmpfs and the copies of the pages a session writes first are done between requests.
A request goes to the spare (its descriptors forwarded), and the zygote forks the next one.
The child then speaks the runtime's init channel protocol on its ctl socket: "Scratch" (+ the
scratch directory), waits for "Start", answers {"Ready": {"landlock": ...}} or
{"Failed": {"stage", "message"}} and becomes the kernel.
"""

import ctypes
import errno
import gc
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
import traceback

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SPECULATION_CTRL = 53
PR_SET_THP_DISABLE = 41
PR_SPEC_STORE_BYPASS = 0
PR_SPEC_FORCE_DISABLE = 1 << 3
SECCOMP_MODE_FILTER = 2

MADV_POPULATE_WRITE = 23
MADV_COLLAPSE = 25
PAGE = os.sysconf("SC_PAGE_SIZE")
PM_PRESENT, PM_EXCLUSIVE = 1 << 63, 1 << 56
MAX_HOT_RUNS = 4096
HUGE_PAGE = 1 << 21

SYS_CAPSET = 126
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446

SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40

SCRATCH_FLAGS = MS_NOSUID | MS_NODEV  # of every scratch mount point
MAX_FDS = 16
MAX_MESSAGE = 256 * 1024


class Stage(Exception):
    def __init__(self, stage, message):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


def check(stage, rc, what=""):
    if rc == -1:
        e = ctypes.get_errno()
        raise Stage(stage, f"{what}: {os.strerror(e)}" if what else os.strerror(e))
    return rc


def mount(stage, src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    rc = libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data))
    check(stage, rc, f"mount {fstype or src} on {target}")


def bind(src, target, extra):
    mount("mount", src, target, None, MS_BIND)
    mount("mount", None, target, None, MS_REMOUNT | MS_BIND | extra)


# -- the control socket ----------------------------------------------------------------------


def send(sock, msg, fds=()):
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv(sock):
    """(message, fds), or (None, []) at end of stream."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data and not fds:
        return None, []
    return json.loads(data), fds


# -- one session -----------------------------------------------------------------------------


def set_rlimits(r):
    """The session's limits. RLIMIT_SIGPENDING, RLIMIT_MSGQUEUE and RLIMIT_MEMLOCK also bound,
    as they are when the session's user namespace is created, what the session may hold of
    the zygote's namespace (the kernel's per-owner counters; crates/runtime/src/ucounts.rs)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (r["nofile"], r["nofile"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (r["fsize"], r["fsize"]))
    resource.setrlimit(resource.RLIMIT_CPU, (r["cpu_s"], r["cpu_s"] + 1))
    for name, limit in (
        ("nproc", resource.RLIMIT_NPROC),
        ("sigpending", resource.RLIMIT_SIGPENDING),
        ("msgqueue", resource.RLIMIT_MSGQUEUE),
        ("memlock", resource.RLIMIT_MEMLOCK),
    ):
        if r.get(name) is not None:
            resource.setrlimit(limit, (r[name], r[name]))


def scratch_options(spec):
    return f"size={max(spec['scratch_bytes'], 4096)},nr_inodes={max(spec['scratch_inodes'], 64)}"


def mount_scratch():
    """The session's own tmpfs for /mnt/data, /tmp, /var/tmp and /dev/shm (one size and inode
    limit for all), staged on /run/ampoule and detached from there once bound; returns a
    descriptor of its root for the supervisor. Its size is the smallest until `size_scratch`
    sets the request's."""
    stage = "/run/ampoule"
    opts = "size=4096,nr_inodes=64,mode=0755"
    mount("mount", "tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    for name, mode in (("data", 0o755), (".ampoule", 0o755), ("tmp", 0o1777), ("shm", 0o1777)):
        p = f"{stage}/{name}"
        os.mkdir(p, mode)
        os.chmod(p, mode)
    rw = SCRATCH_FLAGS
    bind(f"{stage}/data", "/mnt/data", rw)
    bind(f"{stage}/tmp", "/tmp", rw)
    bind(f"{stage}/tmp", "/var/tmp", rw)
    bind(f"{stage}/shm", "/dev/shm", rw)
    root = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    check("mount", libc.umount2(stage.encode(), MNT_DETACH), "detach the scratch stage")
    return root


def size_scratch(spec):
    """The request's size and inode limits on the (empty) scratch tmpfs, through any of its
    mount points."""
    # A non-bind remount resizes the tmpfs and sets /mnt/data's own mount flags to exactly
    # these: the same as when it was bound.
    mount("mount", None, "/mnt/data", None, MS_REMOUNT | SCRATCH_FLAGS, scratch_options(spec))


def mount_proc(cfg):
    mount("proc", "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for f in cfg["proc_masked_files"]:
        p = f"/proc/{f}"
        if os.path.exists(p):
            mount("proc", "/dev/null", p, None, MS_BIND)
    for d in cfg["proc_masked_dirs"]:
        p = f"/proc/{d}"
        if os.path.isdir(p):
            mount(
                "proc", "tmpfs", p, "tmpfs",
                MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=4,mode=0555",
            )


def loopback_up():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        import fcntl

        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))
    finally:
        s.close()


def network_files(spec):
    """A session with a network (the supervisor wires its interface from outside): its
    /etc/resolv.conf names its gateway, and when the gateway terminates TLS it trusts the
    gateway's CA through the same files as a cold sandbox's (init.rs `trust_ca`): the host's
    bundle plus the CA, the CA alone, and the first bound over the host bundle's path. The files
    are written (as the zygote's uid, out of the code's reach) to a small tmpfs staged on
    /run/ampoule, bound read-only where they belong, and the stage is detached (a detached
    mount cannot be the source of a bind, hence not the scratch). Runs after "Start": on
    cgroup v2 the pages are then the session's."""
    net = spec.get("network")
    if not net:
        return
    ro = MS_RDONLY | MS_NOSUID | MS_NODEV
    stage = "/run/ampoule"
    files = {"resolv.conf": net["resolv_conf"].encode()}
    ca = net.get("ca_pem")
    system = net["system_bundle"]
    regular = False
    if ca:
        regular = os.path.isfile(system) and not os.path.islink(system)
        bundle = b""
        if regular:
            try:
                with open(system, "rb") as f:
                    bundle = f.read()
            except OSError as e:
                raise Stage("network", f"reading {system}: {e}")
        if bundle and not bundle.endswith(b"\n"):
            bundle += b"\n"
        files["trust/" + os.path.basename(net["ca_bundle"])] = bundle + ca.encode()
        files["trust/" + os.path.basename(net["egress_ca"])] = ca.encode()
    size = sum(len(d) for d in files.values()) + 64 * 1024
    mount("network", "tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},nr_inodes=16,mode=0755")
    try:
        if ca:
            os.mkdir(f"{stage}/trust", 0o755)
        for name, data in files.items():
            fd = os.open(f"{stage}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
    except OSError as e:
        raise Stage("network", f"writing the network files: {e}")
    bind(f"{stage}/resolv.conf", "/etc/resolv.conf", ro)
    if ca:
        # An empty mount point in the zygote's root (ZygoteConfig::trust_gateway_ca).
        bind(f"{stage}/trust", os.path.dirname(net["ca_bundle"]), ro)
        if regular:
            bind(f"{stage}/trust/{os.path.basename(net['ca_bundle'])}", system, ro)
    check("network", libc.umount2(stage.encode(), MNT_DETACH), "detach the network stage")


def take_slot_ids(ids):
    """Becomes the session's own host uid and gid (its slot's, as the zygote's namespace maps
    them), giving up the zygote's root: the kernel's per-user counters (pipe buffers, epoll
    watches, and through the user namespace created next, inotify, pending signals, message
    queues) are then the session's own, as a cold sandbox's are, and pid 1 (the reaper, still
    the zygote's uid) is out of the code's reach (prlimit, setpriority, signals, ptrace)."""
    uid, gid = ids
    try:
        os.setgroups([gid])  # as a cold sandbox: its own group only
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise Stage("ids", f"taking the slot's ids {uid}/{gid}: {e}")
    # Changing the uid cleared "dumpable", which would make our own uid_map root's.
    check("ids", libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")


def enter_user_namespace(uid, outside):
    """A user namespace of the session's own, owning nothing: the code is `uid` in it (the
    session's slot ids `outside`) and holds no capability over any namespace it lives in."""
    check("unshare", libc.unshare(CLONE_NEWUSER), "user namespace")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {outside[0]} 1\n")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{uid} {outside[1]} 1\n")


class LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class LandlockPathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


# Filesystem rights per Landlock ABI (bit 13 REFER: 2, 14 TRUNCATE: 3, 15 IOCTL_DEV: 5).
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_TRUNCATE, LL_IOCTL_DEV = 1 << 14, 1 << 15


def landlock(cfg):
    """The same ruleset as the runtime's (init.rs `landlock`): read and execute everywhere,
    everything under the scratch directories, file access to a few devices. Best effort, as
    there: what the kernel lacks is left out, and the status says so."""
    abi = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return "not_enforced"
    want = min(abi, 6)
    all_fs = (1 << 13) - 1
    if want >= 2:
        all_fs |= 1 << 13
    if want >= 3:
        all_fs |= LL_TRUNCATE
    if want >= 5:
        all_fs |= LL_IOCTL_DEV
    read = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
    file = (LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV) & all_fs
    attr = LandlockRulesetAttr(all_fs, 0, 3 if want >= 6 else 0)
    size = 24 if want >= 6 else 8
    rs = check("landlock", libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)))
    try:
        rules = [("/", read)]
        rules += [(d, all_fs) for d in cfg["landlock_rw_dirs"]]
        rules += [(d, file) for d in cfg["landlock_rw_devs"]]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = LandlockPathBeneath(access, fd)
                check("landlock", libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(rs), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)), path)
            finally:
                os.close(fd)
        check("landlock", libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(rs), ctypes.c_uint32(0)))
    finally:
        os.close(rs)
    return "fully_enforced" if abi >= 6 else "partially_enforced"


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities():
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    if cap < 38:
        raise Stage("capabilities", f"dropping capability {cap}: {os.strerror(ctypes.get_errno())}")
    header = CapHeader(0x20080522, 0)
    data = (CapData * 2)()
    check("capabilities", libc.syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(header), ctypes.byref(data)))


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_programs(cfg):
    """The supervisor's compiled filters as ready-to-install buffers (built before forking)."""
    out = []
    for prog in cfg["seccomp"]:
        buf = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
        cbuf = ctypes.create_string_buffer(buf, len(buf))
        out.append((SockFprog(len(prog), ctypes.cast(cbuf, ctypes.c_void_p)), cbuf))
    return out


def apply_seccomp(programs):
    for fprog, _keep in programs:
        check("seccomp", libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0))


def disable_speculative_store_bypass():
    """As the runtime's init: ENXIO means the kernel offers no per-process control here (the
    mitigation is global, on or off, or the CPU is not affected: `doctor` says which); any
    other failure stops the session."""
    if libc.prctl(PR_SET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, PR_SPEC_FORCE_DISABLE, 0, 0) == -1:
        e = ctypes.get_errno()
        if e != errno.ENXIO:
            raise Stage("speculation", os.strerror(e))


def wait_for_sealed_reaper():
    """Pid 1 (the reaper) starts as a copy of nothing secret; the code must not run before it
    has re-executed itself in its own user namespace, turned non-dumpable, dropped its
    capabilities and set no_new_privs, which it does last: "NoNewPrivs: 1" in its status means
    sealed (it takes a millisecond or two). Its uid (the zygote's) is not the code's anyway."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with open("/proc/1/status") as f:
                if "NoNewPrivs:\t1" in f.read():
                    return
        except OSError as e:
            raise Stage("reaper", f"pid 1: {e}")
        if time.monotonic() > deadline:
            raise Stage("reaper", "pid 1 did not seal itself")
        time.sleep(0.0005)


def reseed():
    """Siblings share the zygote's memory: give each its own random state (`random`, `tempfile`'s
    name sequence, `numpy.random`)."""
    import random

    random.seed()
    # tempfile makes a new name sequence when the pid changes, but every session is pid 2.
    import tempfile

    tempfile._name_sequence = None
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed()
        except Exception:
            pass


def prepare_spare(cfg):
    """The part of a session's setup that needs nothing of its request, done while the process
    waits as the zygote's spare: namespaces, a private mount tree, `/proc`, the host name,
    loopback and the scratch space (at its smallest size); returns the scratch root."""
    check("unshare", libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "namespaces")
    mount("mount private", None, "/", None, MS_REC | MS_PRIVATE)
    mount_proc(cfg)
    socket.sethostname(cfg["hostname"])
    loopback_up()
    return mount_scratch()


def spare(cfg, programs, sock):
    """The child, forked ahead of its request: prepares what it can, then waits on `sock` for
    the request (or the zygote's end). Never returns."""
    # The zygote's own signal plumbing is not the session's.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The session's own allocations in small pages (and khugepaged never re-collapses what it
    # shares with the zygote into private copies): density over the zygote's fork speed.
    libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    null = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.closerange(3, sock.fileno())
    os.closerange(sock.fileno() + 1, 1 << 20)
    failed = scratch = None
    try:
        scratch = prepare_spare(cfg)
        reseed()
        copy_hot_pages(HOT)
    except Stage as e:
        failed = e
    except BaseException as e:
        failed = Stage("zygote", "".join(traceback.format_exception_only(type(e), e)).strip())
    try:
        msg, fds = recv(sock)
    except OSError:
        os._exit(0)
    if msg is None:
        os._exit(0)  # the zygote is gone, or replaced its spare
    sock.close()
    session(cfg, programs, msg, fds, scratch, failed)


def session(cfg, programs, spec, fds, root, failed):
    """The spare, given its request: from a copy of the zygote to a sealed session. Never
    returns."""
    ctl_fd, stdin, stdout, stderr, *tasks = fds
    ctl = socket.socket(fileno=ctl_fd)
    try:
        if failed is not None:
            raise failed
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        for fd in (stdin, stdout, stderr):
            if fd > 2 and fd != ctl_fd:
                os.close(fd)
        # cgroup v1: moving ourselves through `tasks` avoids the global lock (see init.rs); the
        # supervisor opened the files, so its credentials authorise the write. What we
        # allocated before this point (page tables, namespaces) stays charged to the zygote's
        # cgroup, and so does pid 1, the reaper: moving another process takes that lock (an RCU
        # grace period, 10-15 ms).
        for fd in tasks:
            try:
                os.write(fd, b"0")
            except OSError as e:
                raise Stage("cgroup", str(e))
            os.close(fd)
        try:
            set_rlimits(spec["rlimits"])
        except (OSError, ValueError) as e:
            raise Stage("rlimit", str(e))
        size_scratch(spec)
        # The session's own directories, as a cold sandbox's (init.rs `mount_scratch`); the
        # code directory stays the zygote's.
        for name in ("data", "tmp", "shm"):
            os.chown(name, *spec["ids"], dir_fd=root)
        send(ctl, "Scratch", [root])
        os.close(root)
        msg, _ = recv(ctl)
        if msg != "Start":
            raise Stage("channel", f"expected Start, got {msg!r}")
        network_files(spec)
        # Only now (the supervisor has moved us on cgroup v2) is our cgroup the right root.
        check("unshare", libc.unshare(CLONE_NEWCGROUP), "cgroup namespace")
        take_slot_ids(spec["ids"])
        enter_user_namespace(cfg["sandbox_uid"], spec["ids"])
        os.chdir(spec["cwd"])
        status = landlock(cfg)
        drop_capabilities()
        check("no_new_privs", libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        disable_speculative_store_bypass()
        # Dumpable, as a cold sandbox's program is after its exec: the process was forked, not
        # executed, so its memory belongs to the zygote's namespace, and a non-dumpable one's
        # /proc entries (/proc/self/fd, ns, ...) would belong to the zygote's root, not to it.
        # Its uid is its own: nothing else of that uid exists to read or trace it.
        apply_seccomp(programs)
        wait_for_sealed_reaper()
        send(ctl, {"Ready": {"landlock": status}})
    except BaseException as e:
        if isinstance(e, Stage):
            stage, message = e.stage, e.message
        else:
            stage, message = "zygote", "".join(traceback.format_exception_only(type(e), e)).strip()
        try:
            send(ctl, {"Failed": {"stage": stage, "message": message}})
        finally:
            os._exit(112)
    ctl.close()
    os.setsid()
    os.environ.clear()
    os.environ.update(dict(spec["env"]))
    sys.argv = [KERNEL_PATH]
    try:
        kernel.main()
    finally:
        os._exit(0)


# -- the zygote ------------------------------------------------------------------------------


def rehearse():
    """What every new session does first, in miniature: the kernel's start (event loop, version
    string, random state) and a first cell through the kernel's own parse/run/result path."""
    import asyncio
    import platform

    reseed()
    asyncio.new_event_loop().close()
    platform.python_version()
    import ast

    tree, _ = kernel._parse("import json\n1+1", "<rehearsal>")
    last = tree.body.pop()
    ns = {"__name__": "__main__"}
    exec(compile(ast.Module(body=tree.body, type_ignores=[]), "<rehearsal>", "exec", flags=kernel.FLAGS), ns)
    value = eval(compile(ast.Expression(body=last.value), "<rehearsal>", "eval", flags=kernel.FLAGS), ns)
    json.dumps({"type": "result", "id": "", "data": kernel.mime_bundle(value), "execution_count": 1})


def writable_regions():
    """(start, end, name) of this process's private writable mappings (name: "" when
    anonymous, "[heap]", "[stack]" or the mapped file)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if fields[1].startswith("rw") and fields[1].endswith("p"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end, fields[5] if len(fields) > 5 else ""))
    return out


MAX_HOT_BYTES = 8 << 20
PROBE_TIMEOUT = 20


def exclusive_runs(regions):
    """(address, length) runs of the pages of `regions` that only this process maps: those it
    wrote (copied) or allocated since the fork."""
    runs = []
    with open("/proc/self/pagemap", "rb") as pm:
        for start, end, _ in regions:
            pm.seek(start // PAGE * 8)
            raw = pm.read((end - start) // PAGE * 8)
            run = None
            for i, (entry,) in enumerate(struct.iter_unpack("=Q", raw)):
                addr = start + i * PAGE
                if not (entry & PM_PRESENT and entry & PM_EXCLUSIVE):
                    continue
                if run is not None and run[0] + run[1] == addr:
                    run[1] += PAGE
                else:
                    run = [addr, PAGE]
                    runs.append(run)
    # Bounded: these copies are charged to the zygote's cgroup, once per spare.
    out, total = [], 0
    for addr, length in runs[:MAX_HOT_RUNS]:
        length = min(length, MAX_HOT_BYTES - total)
        if length <= 0:
            break
        out.append([addr, length])
        total += length
    return out


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def probe_code(preloaded):
    """A first cell as sessions of this pool write it: import what the pool preloads, then an
    expression."""
    tops = sorted({name.split(".")[0] for name in preloaded})
    return "".join(f"import {name}\n" for name in tops) + "1+1"


def probe(regions, out, code):
    """The probe child: the real kernel, fed one execution through pipes; once it is done, the
    pages it wrote are reported on `out`. Never returns."""
    import threading

    req_r, req_w = os.pipe()
    ev_r, ev_w = os.pipe()
    null = os.open("/dev/null", os.O_RDWR)
    for fd, target in ((req_r, 0), (ev_w, 1), (null, 2)):
        os.dup2(fd, target)
        os.close(fd)
    payload = json.dumps({"type": "execute", "id": "probe", "code": code}).encode()
    write_all(req_w, struct.pack(">I", len(payload)) + payload)  # req_w stays open

    def watch():
        try:
            buf = b""
            while True:
                chunk = os.read(ev_r, 1 << 16)
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 4:
                    (n,) = struct.unpack(">I", buf[:4])
                    if len(buf) < 4 + n:
                        break
                    msg, buf = json.loads(buf[4 : 4 + n]), buf[4 + n :]
                    if msg.get("type") == "done":
                        write_all(out, json.dumps(exclusive_runs(regions)).encode())
                        return
        finally:
            os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    kernel.main()


def learn_hot_pages(preloaded):
    """The pages a new session writes first, learnt once: a probe child runs the real kernel
    through its start and a first cell (`probe_code`) and reports which of the zygote's pages
    it had to copy (exclusive in its page map). Each spare copies those ahead of its request
    (MADV_POPULATE_WRITE), so the ~1,000 copy-on-write faults of a session's start and first
    execution (~8 us each here) are not paid while a caller waits. Only breaks the sharing of
    pages a session copies anyway; best effort (nothing learnt, nothing copied)."""
    regions = writable_regions()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            probe(regions, w, probe_code(preloaded))
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + PROBE_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            chunks = []
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    try:
        return [tuple(run) for run in json.loads(b"".join(chunks) or b"[]")]
    except ValueError:
        return []


def copy_hot_pages(runs):
    for addr, length in runs:
        libc.madvise(addr, length, MADV_POPULATE_WRITE)  # ENOMEM for what is gone: fine


def fill_heap_holes():
    """Fills the free chunks malloc keeps inside the zygote's heap with blocks that are never
    freed. A child's first allocations would otherwise land in those holes, scattered over
    pages it shares with the zygote, and each 4 KiB page it writes a small object into is
    copied whole; with the holes taken, its allocations are packed at the top of the heap, in
    pages of its own. The blocks cost the zygote's memory once, shared by every child.
    Returns the KiB taken. Only with PYTHONMALLOC=malloc (one heap; pymalloc's arenas are
    not malloc's free lists)."""
    if os.environ.get("PYTHONMALLOC") != "malloc":
        return 0
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    top = libc.sbrk(0) or 0
    taken = 0
    # Large sizes first (a big hole goes in a few calls), then every small-bin size.
    sizes = [1 << 16, 1 << 14, 1 << 12, 1 << 10] + list(range(1016, 0, -16))
    for size in sizes:
        for _ in range(1 << 20):
            p = libc.malloc(size)
            if not p:
                break
            if p >= top:  # past the heap's old end: no hole of this size is left
                libc.free(p)
                break
            taken += size
    return taken // 1024


def immortal_marker():
    """The low 32 bits of an immortal object's reference count (PEP 683), or None where this
    interpreter has no such objects or they could not be made by hand: CPython 3.12 to 3.14
    with the GIL, 64-bit, little-endian. There, `Py_INCREF` and `Py_DECREF` leave an object
    alone when those bits, read as a signed 32-bit number, are negative; the bits above them
    (3.14: flags) are left as they are."""
    import sysconfig

    if not ((3, 12) <= sys.version_info[:2] < (3, 15)):
        return None
    if sys.byteorder != "little" or sys.maxsize <= 2**32:
        return None
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None  # the free-threaded build counts references differently
    marker = ctypes.c_uint32.from_address(id(None)).value
    if marker < 1 << 31:
        return None
    # Proof on an object of our own: once marked, a new reference must leave its count alone.
    probe = [object()]
    ctypes.c_uint32.from_address(id(probe)).value = marker
    held = [probe, probe]
    if ctypes.c_uint32.from_address(id(probe)).value != marker:
        return None
    del held
    return marker


def immortalize():
    """Makes the objects the zygote holds now immortal, on interpreters that have immortal
    objects (CPython >= 3.12; `immortal_marker`). CPython writes the reference count of every
    object a program touches: a session that merely calls a pandas function copies each 4 KiB
    page of the zygote holding the function, its code, its constants and every object passed
    along, although none of them changes. An immortal object's count is never written, so
    those pages stay shared (measured: a first DataFrame cell copied 2.6 MiB of the zygote per
    session without this, 1.4 MiB with it). Immortal objects are never freed: what the zygote
    holds when it forks lives as long as the session anyway, and what a session drops of it
    stays in memory shared with the zygote. Objects holding a resource (files, sockets) are
    left mortal, so that a child dropping one still closes it. Returns how many were marked
    (0 where the interpreter has no immortal objects)."""
    marker = immortal_marker()
    if marker is None:
        return 0
    import io
    import mmap

    # mmap and epoll objects are not tracked by the collector: they are met among referents,
    # and a tuple holding only such objects is untracked too.
    mortal = (io.IOBase, socket.socket, mmap.mmap, select.epoll)
    write = ctypes.c_uint32.from_address
    count = 0

    def mark(obj):
        nonlocal count
        if not isinstance(obj, mortal):
            write(id(obj)).value = marker
            count += 1

    # Every object the collector tracks, and what those refer to that it does not track
    # (strings, numbers, bytes; tuples and dicts of such, followed one level further down):
    # no set of visited objects, which would cost the zygote tens of MiB; marking twice is
    # harmless.
    objects = gc.get_objects()
    for obj in objects:
        if obj is objects:
            continue
        mark(obj)
        for ref in gc.get_referents(obj):
            if gc.is_tracked(ref):
                continue
            mark(ref)
            if isinstance(ref, (tuple, dict, frozenset)):
                for leaf in gc.get_referents(ref):
                    if not gc.is_tracked(leaf):
                        mark(leaf)
    del objects
    return count


def collapse_heap():
    """Maps the interpreter's private memory with 2 MiB pages where it can (MADV_COLLAPSE, Linux
    6.1+; best effort). fork() copies one page-table entry per mapped page of the parent and
    write-protects it: for the ~80 MiB a pandas interpreter holds, that is ~20,000 entries and
    5-10 ms here (more under a hypervisor that shadows page tables), against ~40 entries as huge
    pages. The zygote runs with PYTHONMALLOC=malloc and glibc's `malloc.hugetlb=1` tunable
    (crates/session/src/zygote.rs), so objects live in one contiguous heap that can be
    collapsed, not in pymalloc's scattered 1 MiB arenas. Children split a huge page only where
    they write, copying 4 KiB pages as before. Returns the MiB now in huge pages."""
    try:
        regions = writable_regions()
    except OSError:
        return 0
    for start, end, name in regions:
        if name and name != "[heap]":
            continue  # file mappings and stacks stay as they are
        lo = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        hi = end & ~(HUGE_PAGE - 1)
        if hi > lo:
            libc.madvise(lo, hi - lo, MADV_COLLAPSE)  # EINVAL for stacks and guard areas
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


KERNEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.py")


def preload(names):
    done, failed = [], []
    for name in names:
        try:
            __import__(name)
            done.append(name)
        except Exception as e:  # a missing package is the pool's business, not ours
            failed.append(f"{name}: {e}")
    return done, failed


def reap(sock):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        global SPARE
        if SPARE is not None and pid == SPARE.pid:
            SPARE.discard()  # died waiting; the main loop forks a new one
            SPARE = None
            continue
        reaper = REAPERS.pop(pid, None)
        if reaper is None:
            continue  # a reaper, killed below when its session ended
        # The session's program ended: its pid 1 goes, and the namespace with it.
        try:
            os.kill(reaper, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if os.WIFSIGNALED(status):
            msg = {"exit": {"pid": pid, "signal": os.WTERMSIG(status)}}
        else:
            msg = {"exit": {"pid": pid, "code": os.waitstatus_to_exitcode(status)}}
        try:
            send(sock, msg)
        except OSError:
            pass


REAPERS = {}  # session pid -> its pid 1


class Spare:
    """A child forked ahead of its request, waiting on `sock` (see `spare`)."""

    def __init__(self, pid, reaper, sock):
        self.pid, self.reaper, self.sock = pid, reaper, sock

    def discard(self):
        self.sock.close()
        for pid in (self.pid, self.reaper):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


SPARE = None  # the next session's process
HOT = []  # (address, length) of the pages a new session writes first


def fork_spare(cfg, programs, own_pid_ns):
    """Forks the next session's process in a pid namespace of its own. After
    unshare(CLONE_NEWPID) our next children go into a new namespace: first its pid 1, a small
    reaper (a small static executable, spawned with vfork: no copy of this process), then the spare
    (pid 2). setns back to our own namespace re-arms it. The fork (a copy of this process's
    page tables, the costly part) and the setup that needs no request happen here, between
    requests, not while a caller waits."""
    check("unshare", libc.unshare(CLONE_NEWPID), "pid namespace")
    try:
        # Statically linked: it needs nothing of the image's root (or the host's) to start.
        exe = f"/proc/self/fd/{cfg['reaper_fd']}"
        argv = ["reaper"]
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            reaper = os.posix_spawn(exe, argv, {}, file_actions=actions)
        except OSError:
            ours.close()
            theirs.close()
            raise
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            os.kill(reaper, signal.SIGKILL)
            raise
        if pid == 0:
            # Nothing may unwind from here into the zygote's own loop.
            try:
                ours.close()
                spare(cfg, programs, theirs)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(111)
        theirs.close()
        return Spare(pid, reaper, ours)
    finally:
        check("setns", libc.setns(own_pid_ns, CLONE_NEWPID), "own pid namespace")


def fork(cfg, programs, req, fds, own_pid_ns):
    """Hands the request to the spare (forking one now if there is none) and returns its pid."""
    global SPARE
    for _ in range(2):
        child, SPARE = SPARE or fork_spare(cfg, programs, own_pid_ns), None
        try:
            send(child.sock, req, fds)
        except OSError:
            child.discard()  # it died waiting (the next loop round reaps it)
            continue
        child.sock.close()
        REAPERS[child.pid] = child.reaper
        return child.pid
    raise OSError("the spare died before its request")


LAST_REFILL = [0.0]


def refill(cfg, programs, own_pid_ns, sock, at_most_every=0.0):
    """Forks a spare if there is none (and the last try is `at_most_every` seconds old)."""
    global SPARE
    if SPARE is None and time.monotonic() - LAST_REFILL[0] >= at_most_every:
        LAST_REFILL[0] = time.monotonic()
        try:
            SPARE = fork_spare(cfg, programs, own_pid_ns)
        except Exception as e:  # the next request forks (and reports) instead
            try:
                send(sock, {"error": {"id": None, "message": f"forking a spare: {e}"}})
            except OSError:
                pass


def main():
    sock = socket.socket(fileno=os.dup(0))
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    msg, fds = recv(sock)
    if not isinstance(msg, dict) or "config" not in msg or len(fds) < 1:
        sys.exit("zygote: expected the config and the reaper's executable first")
    cfg = msg["config"]
    cfg["reaper_fd"] = fds[0]  # close-on-exec: the reaper is executed through /proc/self/fd
    started = time.monotonic()
    global kernel
    sys.path.insert(0, os.path.dirname(KERNEL_PATH))
    import kernel  # noqa: F811  (imports kernelio; starts nothing)

    sys.path.pop(0)
    done, failed = preload(cfg.get("preload", []))
    programs = seccomp_programs(cfg)
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    # What a session's start initialises lazily is initialised here once, shared by all.
    try:
        rehearse()
    except Exception:
        pass
    # The pool's warm-up: a first real cell in miniature, so what it initialises lazily is
    # shared by every session (crates/session/src/zygote.rs DEFAULT_WARMUP). Its namespace
    # goes before the freeze; a failure is reported, never fatal.
    if cfg.get("warmup"):
        try:
            exec(compile(cfg["warmup"], "<warmup>", "exec"), {"__name__": "__warmup__"})
        except BaseException as e:  # noqa: BLE001 (SystemExit included: keep serving)
            failed.append(f"warmup: {type(e).__name__}: {e}")
    # Nothing the GC would touch after this point: children share these pages untouched.
    gc.collect()
    immortal = immortalize()
    gc.freeze()
    holes_kib = fill_heap_holes()
    huge_mib = collapse_heap()
    global HOT
    HOT = learn_hot_pages(done)
    import platform

    send(sock, {"ready": {
        "runtime": f"CPython {platform.python_version()}",
        "preloaded": done,
        "failed": failed,
        "ms": round((time.monotonic() - started) * 1000, 1),
        "huge_mib": huge_mib,
        "hot_kib": sum(length for _, length in HOT) // 1024,
        "holes_kib": holes_kib,
        "immortal": immortal,
        "threads": len(os.listdir("/proc/self/task")),
    }})
    # SIGCHLD wakes the loop (through the wakeup pipe) to reap and report at once.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    refill(cfg, programs, own_pid_ns, sock)
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [], 5.0)
        if wake_r in readable:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        reap(sock)
        # A spare that died waiting is replaced now, not by the next request (at most once a
        # second: one that dies at once must not make this loop spin).
        refill(cfg, programs, own_pid_ns, sock, at_most_every=1.0)
        if sock not in readable:
            continue
        msg, fds = recv(sock)
        if msg is None:
            return
        req = msg.get("fork") if isinstance(msg, dict) else None
        if req is None or len(fds) < 4:
            for fd in fds:
                os.close(fd)
            send(sock, {"error": {"id": (req or {}).get("id"), "message": "bad request"}})
            continue
        try:
            pid = fork(cfg, programs, req, fds, own_pid_ns)
            pidfd = os.pidfd_open(pid)
            try:
                send(sock, {"forked": {"id": req["id"], "pid": pid}}, [pidfd])
            finally:
                os.close(pidfd)
        except Exception as e:
            send(sock, {"error": {"id": req["id"], "message": str(e)}})
        finally:
            for fd in fds:
                os.close(fd)
        # The next spare is a copy of this process: nothing of this request may be in it.
        msg = req = fds = None
        refill(cfg, programs, own_pid_ns, sock)


if __name__ == "__main__":
    main()
