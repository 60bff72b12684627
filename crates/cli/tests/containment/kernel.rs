//! Kernel surface: denied syscalls, /proc/sys, /sys, devices.

use crate::{Probe, expect_blocked, expect_sigsys, py};

/// Runs `code` (which must not return) in a fresh executable page. Used for the i386 entry.
macro_rules! py_machine_code {
    () => {
        r#"
import ctypes, mmap, time
def machine_code(code):
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    fn._page = page
    return fn
# mov eax, 20 (getpid in the i386 table); int 0x80; ret
I386_GETPID = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])
"#
    };
}

pub(crate) fn probes() -> Vec<Probe> {
    vec![
        py(
            "kernel/unshare_user_namespace",
            r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER = 0x10000000
if libc.unshare(CLONE_NEWUSER) == 0:
    print("ESCAPED unshare(CLONE_NEWUSER) succeeded")
else:
    print("BLOCKED unshare:", os.strerror(ctypes.get_errno()))
"#,
            expect_blocked,
        ),
        py(
            "kernel/bpf",
            concat!(
                py_prelude!(),
                r#"
import struct
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_MAP_TYPE_ARRAY, BPF_PROG_TYPE_SOCKET_FILTER = 0, 5, 2, 1
attr = ctypes.create_string_buffer(struct.pack("<4I", BPF_MAP_TYPE_ARRAY, 4, 4, 1), 128)
deny("bpf(MAP_CREATE)", 321, BPF_MAP_CREATE, attr, 128)
# r0 = 0; exit
insns = ctypes.create_string_buffer(bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0]), 16)
lic = ctypes.create_string_buffer(b"GPL")
prog = struct.pack("<IIQQ", BPF_PROG_TYPE_SOCKET_FILTER, 2, ctypes.addressof(insns), ctypes.addressof(lic))
attr = ctypes.create_string_buffer(prog, 128)
deny("bpf(PROG_LOAD)", 321, BPF_PROG_LOAD, attr, 128)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/perf_event_open",
            concat!(
                py_prelude!(),
                r#"
import struct
PERF_TYPE_SOFTWARE, PERF_TYPE_HARDWARE = 1, 0
def attr(kind, config):
    return ctypes.create_string_buffer(struct.pack("<IIQ", kind, 128, config), 128)
deny("perf_event_open(self, cpu-clock)", 298, attr(PERF_TYPE_SOFTWARE, 0), 0, -1, -1, 0)
deny("perf_event_open(all tasks on cpu 0)", 298, attr(PERF_TYPE_SOFTWARE, 0), -1, 0, -1, 0)
deny("perf_event_open(self, cycles)", 298, attr(PERF_TYPE_HARDWARE, 0), 0, -1, -1, 0)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/keyring",
            concat!(
                py_prelude!(),
                r#"
KEY_SPEC_PROCESS_KEYRING, KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING = -2, -3, -4
KEYCTL_GET_KEYRING_ID, KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_READ = 0, 1, 11
deny("add_key(user)", 248, "user", "ampoule", "x", 1, KEY_SPEC_PROCESS_KEYRING)
deny("request_key(user)", 249, "user", "ampoule", 0, KEY_SPEC_SESSION_KEYRING)
deny("keyctl(GET_KEYRING_ID, user)", 250, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0)
deny("keyctl(JOIN_SESSION_KEYRING)", 250, KEYCTL_JOIN_SESSION_KEYRING, 0)
deny("keyctl(READ, session)", 250, KEYCTL_READ, KEY_SPEC_SESSION_KEYRING, 0, 0)
for p in ("/proc/keys", "/proc/key-users"):
    try:
        data = open(p).read()
        print("ESCAPED", p, "shows keys") if data else print("BLOCKED", p, "is empty")
    except OSError as e:
        print("BLOCKED", p, e.strerror)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/userfaultfd",
            concat!(
                py_prelude!(),
                r#"
O_CLOEXEC, O_NONBLOCK, UFFD_USER_MODE_ONLY = 0o2000000, 0o4000, 1
deny("userfaultfd(0)", 323, 0)
deny("userfaultfd(CLOEXEC|NONBLOCK)", 323, O_CLOEXEC | O_NONBLOCK)
deny("userfaultfd(USER_MODE_ONLY)", 323, UFFD_USER_MODE_ONLY)
refused("open /dev/userfaultfd", os.open, "/dev/userfaultfd", os.O_RDWR, want=(errno.ENOENT,))
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/io_uring",
            concat!(
                py_prelude!(),
                r#"
params = ctypes.create_string_buffer(120)
deny("io_uring_setup(8)", 425, 8, params)
deny("io_uring_enter", 426, 0, 1, 0, 0, 0, 0)
deny("io_uring_register", 427, 0, 0, 0, 0)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/modules_and_kexec",
            concat!(
                py_prelude!(),
                r#"
image = ctypes.create_string_buffer(b"\x7fELF" + b"\0" * 60)
deny("init_module", 175, image, 64, "")
fd = os.open("/usr/bin/true", os.O_RDONLY)
deny("finit_module", 313, fd, "", 0)
deny("delete_module(loop)", 176, "loop", os.O_NONBLOCK)
deny("kexec_load", 246, 0, 0, 0, 0)
deny("kexec_file_load", 320, fd, fd, 1, "", 0)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/reboot",
            concat!(
                py_prelude!(),
                r#"
# A wrong magic number: even a successful filter bypass could not reboot anything.
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
deny("reboot(bad magic, POWER_OFF)", 169, 0x0BADF00D, 0x0BADF00D, LINUX_REBOOT_CMD_POWER_OFF, 0)
deny("reboot(real magic, CAD_OFF)", 169, 0xFEE1DEAD, 672274793, 0, 0)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/clock_changes",
            concat!(
                py_prelude!(),
                r#"
# Arguments that change nothing even if the call got through: a NULL time, an invalid clock,
# adjtimex in read-only mode.
deny("settimeofday(NULL, NULL)", 164, 0, 0)
ts = ctypes.create_string_buffer(16)
deny("clock_settime(invalid clock)", 227, 12345, ts)
timex = ctypes.create_string_buffer(208)
deny("adjtimex(read-only)", 159, timex)
deny("clock_adjtime(REALTIME, read-only)", 305, 0, timex)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/swap_acct_iopl_quota",
            concat!(
                py_prelude!(),
                r#"
with open("/tmp/swapfile", "wb") as f:
    f.write(b"\0" * 65536)
deny("swapon", 167, "/tmp/swapfile", 0)
deny("swapoff", 168, "/tmp/swapfile")
deny("acct", 163, "/tmp/acct")
deny("iopl(3)", 172, 3)
deny("ioperm(0x70)", 173, 0x70, 2, 1)
deny("quotactl", 179, 0x800002, "/dev/vda", 0, 0)
deny("vhangup", 153)
deny("lookup_dcookie", 212, 0, 0, 0)
deny("fanotify_init", 300, 0, 0)
deny("kcmp(self, init)", 312, os.getpid(), 1, 0, 0, 0)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/kernel_log",
            concat!(
                py_prelude!(),
                r#"
import subprocess
deny("syslog(READ_ALL)", 103, 3, ctypes.create_string_buffer(4096), 4096)
deny("syslog(SIZE_BUFFER)", 103, 10, 0, 0)
try:
    data = open("/proc/kmsg", "rb").read(1)
    print("ESCAPED read /proc/kmsg:", data) if data else print("BLOCKED /proc/kmsg is masked (empty)")
except OSError as e:
    print("BLOCKED read /proc/kmsg", e.strerror)
refused("read /dev/kmsg", lambda p: open(p, "rb").read(1), "/dev/kmsg", want=(errno.ENOENT,))
r = subprocess.run(["/usr/bin/dmesg"], capture_output=True)
print("ESCAPED dmesg printed the log") if r.returncode == 0 and r.stdout else print("BLOCKED dmesg exit", r.returncode)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/open_by_handle_at",
            concat!(
                py_prelude!(),
                r#"
import struct
# The "shocker" escape: a handle to inode 2 (the root of the host file system behind /usr),
# opened relative to any descriptor on that file system, bypasses the mount namespace.
AT_FDCWD = -100
handle = ctypes.create_string_buffer(struct.pack("<Ii", 128, 0), 8 + 128)
mount_id = ctypes.c_int(0)
deny("name_to_handle_at(/usr)", 303, AT_FDCWD, "/usr", handle, mount_id, 0)
usr = os.open("/usr", os.O_RDONLY | os.O_DIRECTORY)
root_handle = ctypes.create_string_buffer(struct.pack("<IiII", 8, 1, 2, 0), 16)
fd = deny("open_by_handle_at(/usr, ext4 inode 2)", 304, usr, root_handle, os.O_RDONLY | os.O_DIRECTORY)
if fd >= 0:
    print("ESCAPED host root contents:", os.listdir(fd))
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/raw_and_packet_sockets",
            concat!(
                py_prelude!(),
                r#"
# Raw syscalls, so the exact family/type/protocol reach the filter.
AF_INET, AF_INET6, AF_PACKET = 2, 10, 17
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_PACKET = 1, 2, 3, 10
SOCK_CLOEXEC, SOCK_NONBLOCK = 0o2000000, 0o4000
ETH_P_ALL = 0x0300  # htons(3)
for name, args in (("AF_PACKET/SOCK_RAW", (AF_PACKET, SOCK_RAW, ETH_P_ALL)),
                   ("AF_PACKET/SOCK_DGRAM", (AF_PACKET, SOCK_DGRAM, ETH_P_ALL)),
                   ("AF_INET/SOCK_RAW/ICMP", (AF_INET, SOCK_RAW, 1)),
                   ("AF_INET/SOCK_RAW/IPPROTO_RAW", (AF_INET, SOCK_RAW, 255)),
                   ("AF_INET/SOCK_RAW|CLOEXEC|NONBLOCK", (AF_INET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, 1)),
                   ("AF_INET6/SOCK_RAW/ICMPV6", (AF_INET6, SOCK_RAW, 58)),
                   ("AF_INET/SOCK_PACKET", (AF_INET, SOCK_PACKET, ETH_P_ALL)),
                   ("AF_INET/SOCK_SEQPACKET (sctp)", (AF_INET, 5, 132)),
                   ("AF_INET/SOCK_DCCP", (AF_INET, 6, 33))):
    fd = deny("socket(%s)" % name, 41, *args)
    if fd >= 0:
        os.close(fd)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/netlink_sockets",
            concat!(
                py_prelude!(),
                r#"
AF_NETLINK, SOCK_RAW, SOCK_DGRAM = 16, 3, 2
for name, proto in (("ROUTE", 0), ("SOCK_DIAG", 4), ("NETFILTER", 12), ("AUDIT", 9),
                    ("KOBJECT_UEVENT", 15), ("GENERIC", 16), ("XFRM", 6), ("CRYPTO", 21)):
    for tname, t in (("RAW", SOCK_RAW), ("DGRAM", SOCK_DGRAM)):
        fd = deny("socket(AF_NETLINK, %s, NETLINK_%s)" % (tname, name), 41, AF_NETLINK, t, proto)
        if fd >= 0:
            os.close(fd)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/vsock_and_other_families",
            concat!(
                py_prelude!(),
                r#"
# AF_VSOCK talks to the hypervisor (this may be a VM); the others are rarely used protocol
# families with a history of kernel bugs.
FAMILIES = {"AF_VSOCK": 40, "AF_ALG": 38, "AF_KEY": 15, "AF_TIPC": 30, "AF_RDS": 21, "AF_CAN": 29,
            "AF_BLUETOOTH": 31, "AF_XDP": 44, "AF_X25": 9, "AF_AX25": 3, "AF_APPLETALK": 5,
            "AF_LLC": 26, "AF_PPPOX": 24, "AF_NFC": 39, "AF_QIPCRTR": 42, "AF_SMC": 43, "AF_MCTP": 45}
for name, fam in FAMILIES.items():
    for t in (1, 2, 5):
        fd = deny("socket(%s, %d)" % (name, t), 41, fam, t, 0)
        if fd >= 0:
            os.close(fd)
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/socketpair_foreign_families",
            concat!(
                py_prelude!(),
                r#"
# socketpair() creates sockets of the given family just like socket() (the family's create
# code runs, and an unknown family makes the kernel try to load its module) before it finds
# out that the family cannot make pairs. Only AF_UNIX should get that far.
pair = (ctypes.c_int * 2)()
FAMILIES = {"AF_NETLINK": (16, 3), "AF_VSOCK": (40, 1), "AF_PACKET": (17, 3), "AF_ALG": (38, 5),
            "AF_KEY": (15, 3), "AF_TIPC": (30, 5), "AF_RDS": (21, 5), "AF_INET/SOCK_RAW": (2, 3)}
for name, (fam, t) in FAMILIES.items():
    if deny("socketpair(%s)" % name, 53, fam, t, 0, pair) == 0:
        os.close(pair[0]); os.close(pair[1])
r, e = raw(53, 1, 1, 0, pair)
print("control: AF_UNIX pairs work") if r == 0 else print("INVALID socketpair(AF_UNIX) failed:", ename(e))
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/inet_protocols_beyond_tcp_udp",
            concat!(
                py_prelude!(),
                r#"
# The filter admits AF_INET/AF_INET6 stream and datagram sockets, meaning TCP and UDP; the
# protocol argument selects others (SCTP, MPTCP, UDP-Lite), and for one that is not loaded the
# kernel asks modprobe to load it. Only 0 (the default), TCP and UDP should get through.
AF_INET, AF_INET6, SOCK_STREAM, SOCK_DGRAM = 2, 10, 1, 2
for name, args in (("AF_INET/STREAM/SCTP", (AF_INET, SOCK_STREAM, 132)),
                   ("AF_INET6/STREAM/SCTP", (AF_INET6, SOCK_STREAM, 132)),
                   ("AF_INET/STREAM/MPTCP", (AF_INET, SOCK_STREAM, 262)),
                   ("AF_INET6/STREAM/MPTCP", (AF_INET6, SOCK_STREAM, 262)),
                   ("AF_INET/DGRAM/UDPLITE", (AF_INET, SOCK_DGRAM, 136)),
                   ("AF_INET/DGRAM/ICMP (ping)", (AF_INET, SOCK_DGRAM, 1))):
    fd = deny("socket(%s)" % name, 41, *args, want=(errno.EPERM, errno.EACCES))
    if fd >= 0:
        os.close(fd)
for name, args in (("TCP", (AF_INET, SOCK_STREAM, 6)), ("UDP", (AF_INET, SOCK_DGRAM, 17))):
    r, e = raw(41, *args)
    print("control: socket(%s) works" % name) if r >= 0 else print("INVALID socket(%s) failed:" % name, ename(e))
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/tiocsti_and_tioclinux",
            concat!(
                py_prelude!(),
                r#"
# TIOCSTI pushes characters into a terminal's input: the classic sandbox escape to the shell
# that started it. The filter looks at the low 32 bits, as the kernel does.
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
c = ctypes.c_char(b"x")
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2, null):
    deny("ioctl(%d, TIOCSTI)" % fd, 16, fd, TIOCSTI, c)
    deny("ioctl(%d, TIOCSTI | 1<<32)" % fd, 16, fd, TIOCSTI | (1 << 32), c)
    deny("ioctl(%d, TIOCLINUX)" % fd, 16, fd, TIOCLINUX, c)
r, e = raw(16, null, 0x541B, ctypes.c_int(0))  # FIONREAD: ioctl as such still works
print("control: FIONREAD gives", ename(e) if r else "ok") if e != errno.EPERM else print("INVALID every ioctl is refused")
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/personality",
            concat!(
                py_prelude!(),
                r#"
# Only the standard personalities (PER_LINUX, PER_LINUX32, with or without UNAME26) are allowed:
# no disabling ASLR, no executable data, no page 0, no foreign execution domains.
cur, _ = raw(135, 0xFFFFFFFF)
print("current personality", hex(cur))
for name, value in (("ADDR_NO_RANDOMIZE", 0x0040000), ("READ_IMPLIES_EXEC", 0x0400000),
                    ("MMAP_PAGE_ZERO", 0x0100000), ("ADDR_COMPAT_LAYOUT", 0x0200000),
                    ("ADDR_LIMIT_3GB", 0x8000000), ("PER_LINUX32 | ADDR_NO_RANDOMIZE", 0x0040008),
                    ("PER_SVR4", 0x0068 | 0x0100000 | 0x4000000), ("PER_BSD", 0x0006)):
    deny("personality(%s)" % name, 135, value)
after, _ = raw(135, 0xFFFFFFFF)
print("BLOCKED personality still", hex(after)) if after == cur else print("ESCAPED personality now", hex(after))
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/proc_sys_and_sysrq_writes",
            concat!(
                py_prelude!(),
                r#"
c = os.listdir("/proc/sys")
print("ESCAPED /proc/sys is visible:", c) if c else print("BLOCKED /proc/sys is empty")
def write(p, data):
    with open(p, "w") as f:
        f.write(data)
for p, data in (("/proc/sys/kernel/core_pattern", "|/tmp/evil"), ("/proc/sys/kernel/modprobe", "/tmp/evil"),
                ("/proc/sys/vm/drop_caches", "3"), ("/proc/sys/kernel/hostname", "evil"),
                ("/proc/sys/net/ipv4/ip_forward", "1"), ("/proc/sysrq-trigger", "h"),
                ("/proc/self/oom_score_adj", "-1000"), ("/proc/1/oom_score_adj", "1000"),
                ("/proc/1/comm", "evil"),
                ("/proc/sys/fs/binfmt_misc/register", ":evil:E::x::/tmp/evil:")):
    refused("write " + p, write, p, data)
adj = open("/proc/self/oom_score_adj").read().strip()
print("BLOCKED oom_score_adj is", adj) if adj != "-1000" else print("ESCAPED oom_score_adj lowered")
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/sys_and_cgroupfs_absent",
            r#"
import os
for p in ("/sys", "/sys/fs/cgroup", "/sys/kernel/debug", "/sys/kernel/security", "/sys/firmware",
          "/sys/class/net", "/sys/fs/bpf", "/sys/fs/fuse"):
    if os.path.exists(p) and (not os.path.isdir(p) or os.listdir(p)):
        print("ESCAPED", p, "is visible")
    else:
        print("BLOCKED", p, "absent or empty")
# The cgroup namespace: every hierarchy shows the sandbox's cgroup as its root, no host path.
for line in open("/proc/self/cgroup"):
    path = line.strip().split(":", 2)[2]
    print("BLOCKED cgroup", line.strip()) if path == "/" else print("ESCAPED host cgroup path", line.strip())
"#,
            expect_blocked,
        ),
        py(
            "kernel/proc_masked",
            r#"
import os
MASKED = ["kcore", "keys", "key-users", "sysrq-trigger", "timer_list", "sched_debug",
          "latency_stats", "kallsyms", "kpagecount", "kpageflags", "kpagecgroup", "config.gz",
          "vmallocinfo", "slabinfo"]
checked = 0
for f in MASKED:
    p = "/proc/" + f
    try:
        data = open(p, "rb").read(4096)
    except FileNotFoundError:
        print("BLOCKED", p, "absent")
        continue
    except OSError as e:
        print("BLOCKED", p, e.strerror)
        continue
    checked += 1
    print("ESCAPED", p, "has content:", data[:60]) if data else print("BLOCKED", p, "is empty")
for d in ["acpi", "scsi", "irq", "bus", "fs", "driver", "tty", "sys"]:
    p = "/proc/" + d
    c = os.listdir(p) if os.path.isdir(p) else []
    print("ESCAPED", p, "shows", c[:10]) if c else print("BLOCKED", p, "is empty")
for p in ("/proc/kmsg",):
    try:
        data = open(p, "rb").read(1)
        print("ESCAPED", p, "readable:", data) if data else print("BLOCKED", p, "is masked (empty)")
    except OSError as e:
        print("BLOCKED", p, e.strerror)
if checked < 3:
    print("INVALID only %d masked files exist; is /proc what the probe expects?" % checked)
"#,
            expect_blocked,
        ),
        py(
            "kernel/mknod_devices",
            concat!(
                py_prelude!(),
                r#"
import stat
for path, kind, major, minor in (("/tmp/mem", stat.S_IFCHR, 1, 1), ("/mnt/data/kmsg", stat.S_IFCHR, 1, 11),
                                 ("/dev/shm/vda", stat.S_IFBLK, 254, 0), ("/tmp/tty", stat.S_IFCHR, 5, 0),
                                 ("/var/tmp/kvm", stat.S_IFCHR, 10, 232)):
    refused("mknod %s (%d:%d)" % (path, major, minor), os.mknod, path, kind | 0o666, os.makedev(major, minor),
            want=(errno.EPERM, errno.EACCES))
    if os.path.lexists(path):
        print("ESCAPED", path, "exists")
"#
            ),
            expect_blocked,
        ),
        py(
            "kernel/i386_int80_kills",
            concat!(
                py_machine_code!(),
                r#"
getpid32 = machine_code(I386_GETPID)
print("BEFORE", flush=True)
time.sleep(0.3)  # a session kernel forwards output from a thread: let it go out first
r = getpid32()
print("AFTER the i386 entry returned", r, flush=True)
"#
            ),
            expect_sigsys,
        ),
        py(
            "kernel/i386_int80_from_thread_kills_process",
            concat!(
                py_machine_code!(),
                r#"
import threading, time
# The whole process must die, not just the thread that made the call.
getpid32 = machine_code(I386_GETPID)
print("BEFORE", flush=True)
time.sleep(0.3)  # a session kernel forwards output from a thread: let it go out first
t = threading.Thread(target=getpid32)
t.start()
t.join()
time.sleep(1)
print("AFTER the main thread survived", flush=True)
"#
            ),
            expect_sigsys,
        ),
        py(
            "kernel/x32_abi_kills",
            r#"
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
print("BEFORE", flush=True)
time.sleep(0.3)  # a session kernel forwards output from a thread: let it go out first
r = libc.syscall(0x40000000 | 39)  # getpid through the x32 ABI
print("AFTER the x32 entry returned", r, ctypes.get_errno(), flush=True)
"#,
            expect_sigsys,
        ),
    ]
}
