//! Privilege: capabilities, setuid, nested namespaces, mount, chroot, setns, ptrace.

use crate::{Probe, expect_blocked, py};

pub(crate) fn probes() -> Vec<Probe> {
    vec![
        py(
            "privilege/no_capabilities",
            r#"
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
caps = {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
if any(int(v, 16) for v in caps.values()):
    print("ESCAPED capabilities", caps)
else:
    print("BLOCKED no capabilities", caps)
"#,
            expect_blocked,
        ),
        py(
            "privilege/setuid_binaries_do_not_elevate",
            r#"
import os, stat, subprocess
# no_new_privs and nosuid mounts: a setuid-root binary runs with the caller's ids. The dynamic
# loader shows the auxiliary vector (LD_SHOW_AUXV) only for a non-privileged exec, and then
# tells the effective uid the kernel gave the process.
status = open("/proc/self/status").read()
print("BLOCKED no_new_privs set") if "NoNewPrivs:\t1" in status else print("ESCAPED no_new_privs not set")
print("BLOCKED /usr is nosuid") if os.statvfs("/usr").f_flag & os.ST_NOSUID else print("ESCAPED /usr allows setuid")
found = []
for d in ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec", "/usr/local"):
    for top, dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(top, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID) and st.st_mode & 0o111:
                found.append(p)
print("setuid/setgid binaries:", found)
for p in found:
    try:
        r = subprocess.run([p, "--version"], env={"LD_SHOW_AUXV": "1", "PATH": "/usr/bin"},
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=3)
    except subprocess.TimeoutExpired as e:
        r = e
    except OSError as e:
        print("BLOCKED", p, "not executable:", e.strerror)
        continue
    aux = dict(l.split(":", 1) for l in r.stdout.decode(errors="replace").splitlines() if l.startswith("AT_") and ":" in l)
    euid, egid, secure = (aux.get(k, "").strip() for k in ("AT_EUID", "AT_EGID", "AT_SECURE"))
    if not aux:
        print("ESCAPED", p, "ran as a secure (privileged) exec")
    elif euid != "1000" or egid != "1000" or secure != "0":
        print("ESCAPED", p, "euid", euid, "egid", egid, "secure", secure)
    else:
        print("BLOCKED", p, "ran as euid", euid)
# And the obvious uses of the obvious ones.
before = open("/proc/self/mountinfo").read()
os.makedirs("/tmp/m", exist_ok=True)
for argv in (["/usr/bin/mount", "-t", "tmpfs", "tmpfs", "/tmp/m"], ["/usr/bin/umount", "-l", "/usr"],
             ["/usr/bin/su", "-c", "id -u"], ["/usr/bin/newgrp", "root"]):
    if not os.path.exists(argv[0]):
        continue
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    out = r.stdout.decode(errors="replace").strip()
    if r.returncode == 0 or out == "0":
        print("ESCAPED", argv, "succeeded:", out)
    else:
        print("BLOCKED", argv, "exit", r.returncode, r.stderr.decode(errors="replace").strip()[:100])
if open("/proc/self/mountinfo").read() != before:
    print("ESCAPED the mount table changed")
"#,
            expect_blocked,
        ),
        py(
            "privilege/setuid_setgid_root",
            concat!(
                py_prelude!(),
                r#"
# Only uid/gid 1000 is mapped: becoming 0 (or anyone else) must fail.
for name, fn, args in (("setuid(0)", os.setuid, (0,)), ("setgid(0)", os.setgid, (0,)),
                       ("seteuid(0)", os.seteuid, (0,)), ("setegid(0)", os.setegid, (0,)),
                       ("setreuid(0, 0)", os.setreuid, (0, 0)), ("setregid(0, 0)", os.setregid, (0, 0)),
                       ("setresuid(0, 0, 0)", os.setresuid, (0, 0, 0)),
                       ("setresgid(0, 0, 0)", os.setresgid, (0, 0, 0)),
                       ("setuid(65534)", os.setuid, (65534,)), ("setgroups([0])", os.setgroups, ([0],))):
    refused(name, fn, *args, want=(errno.EPERM, errno.EINVAL))
raw(122, 0)  # setfsuid(0) returns the old value either way; a second call shows the current one
raw(123, 0)  # setfsgid(0)
fsuid, _ = raw(122, -1)
fsgid, _ = raw(123, -1)
print("BLOCKED fsuid/fsgid", fsuid, fsgid) if (fsuid, fsgid) == (1000, 1000) else print("ESCAPED fsuid/fsgid", fsuid, fsgid)
open("/tmp/f", "w").close()
refused("chown /tmp/f to root", os.chown, "/tmp/f", 0, 0, want=(errno.EPERM, errno.EINVAL))
for f in ("uid_map", "gid_map", "setgroups"):
    refused("write /proc/self/" + f, lambda p: open(p, "w").write("0 0 4294967295\n"), "/proc/self/" + f)
ids = (os.getresuid(), os.getresgid(), os.getgroups())
print("BLOCKED ids", ids) if ids == ((1000,) * 3, (1000,) * 3, [1000]) else print("ESCAPED ids", ids)
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/nested_namespaces_unshare",
            concat!(
                py_prelude!(),
                r#"
FLAGS = {"CLONE_NEWUSER": 0x10000000, "CLONE_NEWNS": 0x00020000, "CLONE_NEWPID": 0x20000000,
         "CLONE_NEWNET": 0x40000000, "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUTS": 0x04000000,
         "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWTIME": 0x00000080}
for name, flag in FLAGS.items():
    deny("unshare(%s)" % name, 272, flag)
deny("unshare(all)", 272, sum(FLAGS.values()))
deny("unshare(CLONE_NEWUSER|CLONE_NEWNS)", 272, FLAGS["CLONE_NEWUSER"] | FLAGS["CLONE_NEWNS"])
import subprocess
r = subprocess.run(["/usr/bin/unshare", "-Ur", "id", "-u"], capture_output=True, stdin=subprocess.DEVNULL)
print("ESCAPED unshare -Ur:", r.stdout) if r.returncode == 0 else print("BLOCKED unshare -Ur exit", r.returncode)
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/clone_with_namespace_flags",
            concat!(
                py_prelude!(),
                r#"
import struct
SIGCHLD = 17
# A fork-like raw clone copies only the calling thread: it must hold the GIL while it clones
# (PyDLL), or a child of a threaded process (a session kernel) can wait forever for a GIL that
# another thread held at that moment.
_gil_libc = ctypes.PyDLL(None, use_errno=True)
_gil_libc.syscall.restype = ctypes.c_long
def raw(nr, *args):
    ctypes.set_errno(0)
    r = _gil_libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    return r, (ctypes.get_errno() if r == -1 else 0)
FLAGS = {"CLONE_NEWUSER": 0x10000000, "CLONE_NEWNS": 0x00020000, "CLONE_NEWPID": 0x20000000,
         "CLONE_NEWNET": 0x40000000, "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUTS": 0x04000000,
         "CLONE_NEWCGROUP": 0x02000000}
def try_clone(name, flags):
    r, e = raw(56, flags | SIGCHLD, 0, 0, 0, 0)   # clone(flags, stack=0: fork-like)
    if r == 0:
        os._exit(0)                                 # the child of a successful clone
    if r > 0:
        os.waitpid(r, 0)
        print("ESCAPED clone(%s) created a child" % name)
    elif e == errno.EPERM:
        print("BLOCKED clone(%s)" % name, ename(e))
    else:
        print("ESCAPED clone(%s) reached the kernel: %s" % (name, ename(e)))
for name, flag in FLAGS.items():
    try_clone(name, flag)
try_clone("all", sum(FLAGS.values()))
# Positive control: clone without namespace flags (a fork) works, so the refusals above are
# about the flags.
r, e = raw(56, SIGCHLD, 0, 0, 0, 0)
if r == 0:
    os._exit(0)
if r > 0:
    os.waitpid(r, 0)
else:
    print("INVALID plain clone failed:", ename(e))
# clone3 keeps its flags in memory where seccomp cannot read them: it must be ENOSYS.
args = struct.pack("<11Q", 0x10000000 | 0x20000000, 0, 0, 0, SIGCHLD, 0, 0, 0, 0, 0, 0)
buf = ctypes.create_string_buffer(args, len(args))
r, e = raw(435, buf, len(args))
if r == 0:
    os._exit(0)
if r > 0:
    os.waitpid(r, 0)
deny_ok = r == -1 and e == errno.ENOSYS
print("BLOCKED clone3(CLONE_NEWUSER|CLONE_NEWPID)", ename(e)) if deny_ok else print("ESCAPED clone3 returned", r, ename(e))
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/mount_and_umount",
            concat!(
                py_prelude!(),
                r#"
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
MNT_DETACH = 2
os.makedirs("/tmp/m", exist_ok=True)
before = open("/proc/self/mountinfo").read()
deny("mount tmpfs on /tmp/m", 165, "tmpfs", "/tmp/m", "tmpfs", 0, 0)
deny("mount proc on /tmp/m", 165, "proc", "/tmp/m", "proc", 0, 0)
deny("mount sysfs on /tmp/m", 165, "sysfs", "/tmp/m", "sysfs", 0, 0)
deny("mount cgroup2 on /tmp/m", 165, "cgroup2", "/tmp/m", "cgroup2", 0, 0)
deny("bind /proc/1/root on /tmp/m", 165, "/proc/1/root", "/tmp/m", 0, MS_BIND | MS_REC, 0)
deny("remount / read-write", 165, 0, "/", 0, MS_REMOUNT | MS_BIND, 0)
deny("remount /usr read-write", 165, 0, "/usr", 0, MS_REMOUNT | MS_BIND, 0)
for target in ("/proc/kallsyms", "/proc/keys", "/proc/sys", "/usr", "/dev", "/"):
    deny("umount " + target, 166, target, MNT_DETACH)
after = open("/proc/self/mountinfo").read()
print("BLOCKED mount table unchanged") if after == before else print("ESCAPED mount table changed")
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/new_mount_api",
            concat!(
                py_prelude!(),
                r#"
AT_FDCWD = -100
OPEN_TREE_CLONE = 1
deny("fsopen(tmpfs)", 430, "tmpfs", 0)
deny("fspick(/)", 433, AT_FDCWD, "/", 0)
deny("open_tree(/usr, CLONE)", 428, AT_FDCWD, "/usr", OPEN_TREE_CLONE)
deny("move_mount", 429, AT_FDCWD, "/usr", AT_FDCWD, "/tmp", 0)
deny("fsconfig", 431, -1, 0, 0, 0, 0)
deny("fsmount", 432, -1, 0, 0)
attr = ctypes.create_string_buffer(32)
deny("mount_setattr(/, clear RDONLY)", 442, AT_FDCWD, "/", 0, attr, 32)
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/chroot_and_pivot_root",
            concat!(
                py_prelude!(),
                r#"
os.makedirs("/tmp/new/old", exist_ok=True)
refused("chroot(/tmp)", os.chroot, "/tmp", want=(errno.EPERM,))
deny("chroot(/proc/1/root)", 161, "/proc/1/root", want=(errno.EPERM, errno.EACCES))
deny("pivot_root(/tmp/new, /tmp/new/old)", 155, "/tmp/new", "/tmp/new/old")
print("BLOCKED root unchanged") if sorted(os.listdir("/")) == sorted(os.listdir("/proc/self/root")) else print("ESCAPED root moved")
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/setns",
            concat!(
                py_prelude!(),
                r#"
# Entering a namespace by descriptor: the sandbox's own (pointless but must be refused), and
# pid 1's (the init's descriptors are not even openable).
for ns in sorted(os.listdir("/proc/self/ns")):
    fd = os.open("/proc/self/ns/" + ns, os.O_RDONLY)
    deny("setns(own %s)" % ns, 308, fd, 0)
    os.close(fd)
    refused("open /proc/1/ns/" + ns, os.open, "/proc/1/ns/" + ns, os.O_RDONLY, want=(errno.EACCES, errno.EPERM))
pidfd = os.pidfd_open(1)
deny("setns(pidfd of init, all)", 308, pidfd, 0x7E020080)
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/ptrace",
            concat!(
                py_prelude!(),
                r#"
import signal, time
PTRACE_TRACEME, PTRACE_PEEKDATA, PTRACE_ATTACH, PTRACE_SEIZE = 0, 2, 16, 0x4206
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
deny("ptrace(TRACEME)", 101, PTRACE_TRACEME, 0, 0, 0)
deny("ptrace(ATTACH, init)", 101, PTRACE_ATTACH, 1, 0, 0)
deny("ptrace(SEIZE, init)", 101, PTRACE_SEIZE, 1, 0, 0)
deny("ptrace(ATTACH, own child)", 101, PTRACE_ATTACH, child, 0, 0)
deny("ptrace(PEEKDATA, init)", 101, PTRACE_PEEKDATA, 1, 0x400000, 0, want=(errno.EPERM, errno.ESRCH))
st = open("/proc/%d/status" % child).read()
print("ESCAPED child is traced") if "TracerPid:\t0" not in st else print("BLOCKED child untraced")
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/process_vm_readv_writev",
            concat!(
                py_prelude!(),
                r#"
import signal, time
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
secret = ctypes.create_string_buffer(b"sandbox-memory", 64)
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
local = ctypes.create_string_buffer(64)
liov = iovec(ctypes.addressof(local), 64)
riov = iovec(ctypes.addressof(secret), 64)   # the same address is valid in the forked child
deny("process_vm_readv(own child)", 310, child, liov, 1, riov, 1, 0)
deny("process_vm_writev(own child)", 311, child, liov, 1, riov, 1, 0)
deny("process_vm_readv(init)", 310, 1, liov, 1, riov, 1, 0)
if local.raw[:14] == b"sandbox-memory":
    print("ESCAPED memory was read")
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/init_process_internals",
            concat!(
                py_prelude!(),
                r#"
# Pid 1 runs ampoule's code and holds the control channel to the supervisor (descriptor 3): its
# memory, descriptors and root must be out of reach.
for f in ("mem", "maps", "smaps", "environ", "auxv", "pagemap", "stack", "syscall", "io",
          "fd/3", "fdinfo/3", "task/1/mem", "task/1/fd/3", "map_files", "timers", "personality"):
    p = "/proc/1/" + f
    refused("read " + p, lambda q: open(q, "rb").read(64), p, want=(errno.EACCES, errno.EPERM))
for d in ("fd", "fdinfo", "root", "cwd", "map_files", "ns"):
    p = "/proc/1/" + d
    if d == "ns":
        refused("open " + p + "/mnt", os.open, p + "/mnt", os.O_RDONLY, want=(errno.EACCES, errno.EPERM))
    else:
        refused("list " + p, os.listdir, p, want=(errno.EACCES, errno.EPERM))
refused("readlink /proc/1/exe", os.readlink, "/proc/1/exe", want=(errno.EACCES, errno.EPERM))
fd = os.pidfd_open(1)
deny("pidfd_getfd(init, 3)", 438, fd, 3, 0)
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/file_capabilities",
            concat!(
                py_prelude!(),
                r#"
import shutil, struct, subprocess
# A file capability (security.capability xattr) would raise privileges at exec.
shutil.copy("/usr/bin/id", "/tmp/id")
os.chmod("/tmp/id", 0o755)
VFS_CAP_REVISION_2, EFFECTIVE = 0x02000000, 1
CAP_SYS_ADMIN, CAP_SETUID = 21, 7
caps = struct.pack("<5I", VFS_CAP_REVISION_2 | EFFECTIVE, (1 << CAP_SYS_ADMIN) | (1 << CAP_SETUID), 0, 0, 0)
refused("setxattr security.capability", os.setxattr, "/tmp/id", "security.capability", caps,
        want=(errno.EPERM, errno.EACCES, errno.EOPNOTSUPP))
refused("setxattr trusted.x", os.setxattr, "/tmp/id", "trusted.x", b"1",
        want=(errno.EPERM, errno.EACCES, errno.EOPNOTSUPP))
r = subprocess.run(["/tmp/id", "-u"], capture_output=True)
print("BLOCKED copied binary runs as", r.stdout.strip()) if r.stdout.strip() == b"1000" else print("ESCAPED copy runs as", r.stdout)
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/prctl_and_capset",
            concat!(
                py_prelude!(),
                r#"
import struct
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
PR_SET_SECUREBITS, PR_SET_MM, PR_SET_MM_START_CODE, PR_SET_MM_EXE_FILE = 28, 35, 1, 13
PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE = 38, 4
CAP_SYS_ADMIN = 21
deny("prctl(CAP_AMBIENT_RAISE, SYS_ADMIN)", 157, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_SYS_ADMIN, 0, 0)
deny("prctl(SET_SECUREBITS)", 157, PR_SET_SECUREBITS, 0x2f, 0, 0, 0)
deny("prctl(SET_MM, START_CODE)", 157, PR_SET_MM, PR_SET_MM_START_CODE, 0x400000, 0, 0)
deny("prctl(SET_MM, EXE_FILE)", 157, PR_SET_MM, PR_SET_MM_EXE_FILE, 0, 0, 0, want=(errno.EPERM, errno.EBADF))
deny("prctl(SET_NO_NEW_PRIVS, 0)", 157, PR_SET_NO_NEW_PRIVS, 0, 0, 0, 0, want=(errno.EINVAL, errno.EPERM))
# capset: every capability in every set.
hdr = ctypes.create_string_buffer(struct.pack("<Ii", 0x20080522, 0), 8)
data = ctypes.create_string_buffer(struct.pack("<6I", *([0xffffffff] * 6)), 24)
deny("capset(all)", 126, hdr, data)
status = open("/proc/self/status").read()
for k, v in (("NoNewPrivs", "1"), ("Seccomp", "2"), ("CapEff", "0000000000000000"),
             ("CapPrm", "0000000000000000"), ("CapAmb", "0000000000000000")):
    print("BLOCKED", k, v) if "%s:\t%s\n" % (k, v) in status else print("ESCAPED", k, "changed")
"#
            ),
            expect_blocked,
        ),
        py(
            "privilege/hostname_and_domainname",
            concat!(
                py_prelude!(),
                r#"
deny("sethostname", 170, "evil", 4)
deny("setdomainname", 171, "evil", 4)
refused("write /proc/sys/kernel/hostname", lambda p: open(p, "w").write("evil"), "/proc/sys/kernel/hostname")
n = os.uname().nodename
print("BLOCKED hostname is", n) if n == "sandbox" else print("ESCAPED hostname is", n)
"#
            ),
            expect_blocked,
        ),
    ]
}
