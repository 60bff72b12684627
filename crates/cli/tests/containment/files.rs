//! Files and secrets: host files, the server's environment, other sessions' files.

use crate::{Probe, expect_blocked, expect_vars, py};

pub(crate) fn probes() -> Vec<Probe> {
    vec![
        py(
            "files/read_etc_shadow",
            r#"
import os
# /etc/shadow and friends are not in the generated /etc; /etc/ssl is bound from the host, and
# its private directory must stay closed.
for p in ["/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh/ssh_host_ed25519_key",
          "/etc/ssl/private/ssl-cert-snakeoil.key", "/etc/machine-id"]:
    try:
        open(p, "rb").read()
        print("ESCAPED", p, "readable")
    except OSError as e:
        print("BLOCKED", p, e.strerror)
for d in ["/etc/ssl/private"]:
    try:
        print("ESCAPED", d, "listable:", os.listdir(d))
    except OSError as e:
        print("BLOCKED", d, e.strerror)
"#,
            expect_blocked,
        ),
        py(
            "files/server_environment",
            r#"
import os
leaked = [k for k, v in os.environ.items() if "CANARY" in v or k.startswith(("JAIL_", "AMPOULE_"))]
if leaked:
    print("ESCAPED", leaked)
else:
    print("BLOCKED environment is clean:", sorted(os.environ))
"#,
            expect_blocked,
        ),
        py(
            "files/proc_environ_of_every_process",
            concat!(
                py_prelude!(),
                r#"
import subprocess
# The server's environment holds AMPOULE_SECRET_TOKEN; no process of the sandbox may show it,
# and the init (which runs ampoule's own code) must not be readable at all.
BAD = (b"AMPOULE_", b"JAIL_", b"CANARY")
child = subprocess.Popen(["/usr/bin/sleep", "30"])
pids = sorted({p for p in os.listdir("/proc") if p.isdigit()} | {"self", "thread-self", str(child.pid)})
for p in pids:
    for f in ("environ", "cmdline"):
        path = f"/proc/{p}/{f}"
        try:
            data = open(path, "rb").read()
        except OSError as e:
            print("BLOCKED", path, ename(e.errno))
            continue
        if p == "1" and f == "environ":
            print("ESCAPED init's environment is readable")
        elif any(b in data for b in BAD):
            print("ESCAPED", path, "holds a server variable")
        else:
            print("BLOCKED", path, "is clean")
child.kill()
child.wait()
"#
            ),
            expect_blocked,
        ),
        py(
            "files/root_home_and_canary",
            r#"
import os
# The jail wrote the canary to /root/secret.txt and /tmp/canary/secret.txt.
for p in ["/root/secret.txt", "/tmp/canary/secret.txt", "/root/.ssh/id_rsa", "/root/.bash_history"]:
    try:
        print("ESCAPED", p, "readable:", open(p).read())
    except OSError as e:
        print("BLOCKED", p, e.strerror)
for d in ["/root", "/tmp/canary"]:
    try:
        print("ESCAPED", d, "exists:", os.listdir(d))
    except OSError as e:
        print("BLOCKED", d, e.strerror)
"#,
            expect_blocked,
        ),
        py(
            "files/host_directories_absent",
            r#"
import os
# The root holds only what the sandbox needs; the host's home, project, service and log
# directories must not exist at all.
allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "proc", "dev",
           "tmp", "mnt", "run", "var"}
top = set(os.listdir("/"))
extra = sorted(top - allowed)
print("ESCAPED unexpected top-level entries", extra) if extra else print("BLOCKED / holds only", sorted(top))
# A session's Python environment (`ampoule setup`'s venv) is bound read-only at its host path:
# the directories on the way to it hold nothing else.
import sys
venv = os.path.realpath(sys.prefix)
for d in ["/home", "/work", "/root", "/srv", "/opt", "/boot", "/media", "/snap", "/var/lib",
          "/var/log", "/var/run", "/run/user", "/run/systemd", "/run/ampoule/stage",
          "/run/ampoule/scratch", "/run/ampoule/slots", "/sys", "/lost+found"]:
    if venv.startswith(d + "/"):
        inside = os.listdir(d)
        want = [venv[len(d) + 1:].split("/")[0]]
        print("BLOCKED", d, "holds only the Python environment") if inside == want else print("ESCAPED", d, "holds", inside)
    elif os.path.lexists(d):
        print("ESCAPED", d, "exists:", os.listdir(d) if os.path.isdir(d) else "")
    else:
        print("BLOCKED", d, "absent")
print("BLOCKED /run holds only", os.listdir("/run")) if os.listdir("/run") == ["ampoule"] else print("ESCAPED /run holds", os.listdir("/run"))
var_ok = ["tmp"] + (["lib"] if venv.startswith("/var/lib/") else [])
print("BLOCKED /var holds only", os.listdir("/var")) if sorted(os.listdir("/var")) == sorted(var_ok) else print("ESCAPED /var holds", os.listdir("/var"))
"#,
            expect_blocked,
        ),
        py(
            "files/host_tmp_invisible",
            r#"
import os
# The jail's /tmp holds the canary, ampoule's result file and its stderr; the sandbox's /tmp,
# /var/tmp and /dev/shm are its own, empty, scratch.
for d in ["/tmp", "/var/tmp", "/dev/shm", "/mnt/data"]:
    c = os.listdir(d)
    print("ESCAPED", d, "is not empty:", c) if c else print("BLOCKED", d, "is empty")
for p in ["/tmp/.result.json", "/tmp/.ampoule.err", "/tmp/canary"]:
    print("ESCAPED", p, "exists") if os.path.lexists(p) else print("BLOCKED", p, "absent")
"#,
            expect_blocked,
        ),
        py(
            "files/write_read_only_root",
            concat!(
                py_prelude!(),
                r#"
WRITE_ERRS = (errno.EROFS, errno.EACCES, errno.EPERM)
for p in ["/evil", "/usr/evil", "/usr/bin/evil", "/bin/evil", "/usr/lib/evil.so", "/var/evil",
          "/mnt/evil", "/run/evil", "/run/ampoule/evil", "/dev/evil", "/proc/evil"]:
    # procfs has no way to create files: ENOENT is its refusal.
    errs = WRITE_ERRS + ((errno.ENOENT,) if p.startswith("/proc/") else ())
    fd = refused("create " + p, os.open, p, os.O_CREAT | os.O_WRONLY, 0o755, want=errs)
    if fd is not None:
        os.close(fd)
    if os.path.lexists(p):
        print("ESCAPED", p, "now exists")
# The code ampoule handed over (`main.py` of a run, the kernel's files in a session).
for name in os.listdir("/run/ampoule"):
    refused("overwrite /run/ampoule/" + name, os.open, "/run/ampoule/" + name, os.O_WRONLY | os.O_TRUNC, want=WRITE_ERRS)
refused("overwrite /usr/bin/python3", os.open, "/usr/bin/python3", os.O_WRONLY, want=WRITE_ERRS)
refused("chmod /usr/bin/python3", os.chmod, "/usr/bin/python3", 0o777, want=WRITE_ERRS)
refused("utime /usr/bin/python3", os.utime, "/usr/bin/python3", (0, 0), want=WRITE_ERRS)
refused("unlink /usr/bin/env", os.unlink, "/usr/bin/env", want=WRITE_ERRS)
refused("rename /usr/bin/env", os.rename, "/usr/bin/env", "/usr/bin/env2", want=WRITE_ERRS)
refused("mkdir /usr/local/evil", os.mkdir, "/usr/local/evil", want=WRITE_ERRS)
refused("rmdir /mnt/data", os.rmdir, "/mnt/data", want=WRITE_ERRS + (errno.EBUSY,))
refused("symlink /evil-link", os.symlink, "/tmp", "/evil-link", want=WRITE_ERRS)
"#
            ),
            expect_blocked,
        ),
        py(
            "files/write_etc",
            concat!(
                py_prelude!(),
                r#"
WRITE_ERRS = (errno.EROFS, errno.EACCES, errno.EPERM)
before = open("/etc/passwd").read()
refused("append /etc/passwd", os.open, "/etc/passwd", os.O_WRONLY | os.O_APPEND, want=WRITE_ERRS)
refused("create /etc/evil", os.open, "/etc/evil", os.O_CREAT | os.O_WRONLY, 0o644, want=WRITE_ERRS)
# /etc/ld.so.preload would load a library into every later process.
refused("symlink /etc/ld.so.preload", os.symlink, "/tmp/evil.so", "/etc/ld.so.preload", want=WRITE_ERRS)
refused("rename /etc/hosts", os.rename, "/etc/hosts", "/etc/hosts.bak", want=WRITE_ERRS)
refused("unlink /etc/resolv.conf", os.unlink, "/etc/resolv.conf", want=WRITE_ERRS)
refused("write into bound /etc/ssl/certs", os.open, "/etc/ssl/certs/evil.pem", os.O_CREAT | os.O_WRONLY, 0o644, want=WRITE_ERRS)
refused("overwrite bound /etc/ld.so.cache", os.open, "/etc/ld.so.cache", os.O_WRONLY, want=WRITE_ERRS)
if open("/etc/passwd").read() != before or os.path.lexists("/etc/ld.so.preload") or os.path.lexists("/etc/evil"):
    print("ESCAPED /etc changed")
"#
            ),
            expect_blocked,
        ),
        py(
            "files/symlink_and_proc_root_tricks",
            concat!(
                py_prelude!(),
                r#"
# /proc/self/root is the sandbox's own root, not the host's.
if sorted(os.listdir("/proc/self/root")) != sorted(os.listdir("/")):
    print("ESCAPED /proc/self/root differs from /:", os.listdir("/proc/self/root"))
else:
    print("BLOCKED /proc/self/root is the sandbox root")
for p in ["/proc/self/root/root/secret.txt", "/proc/self/root/../../../root/secret.txt",
          "/proc/self/cwd/../../root/secret.txt", "/proc/thread-self/root/tmp/canary/secret.txt",
          "/dev/fd/../../../root/secret.txt", "/proc/1/root/root/secret.txt",
          "/proc/1/root/tmp/canary/secret.txt", "/proc/1/cwd/../../root/secret.txt"]:
    refused("read " + p, lambda q: open(q).read(), p)
refused("list /proc/1/root", os.listdir, "/proc/1/root")
# Links planted in the scratch space resolve inside the sandbox.
for name, target in [("l1", "/root/secret.txt"), ("l2", "/proc/1/root/root/secret.txt"),
                     ("l3", "../../../../root/secret.txt"), ("l4", "/tmp/canary/secret.txt")]:
    os.symlink(target, "/mnt/data/" + name)
    refused("follow link to " + target, lambda q: open(q).read(), "/mnt/data/" + name)
# Dot-dot from a descriptor of / stays at /.
root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
refused("openat(/, ../../root/secret.txt)", lambda p: os.open(p, os.O_RDONLY, dir_fd=root), "../../root/secret.txt")
if sorted(os.listdir(os.open("../../..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root))) != sorted(os.listdir("/")):
    print("ESCAPED .. above / leads elsewhere")
else:
    print("BLOCKED .. above / is /")
# A hard link to a setuid binary would survive in the scratch space.
refused("hard link /usr/bin/su into /tmp", os.link, "/usr/bin/su", "/tmp/su")
"#
            ),
            expect_blocked,
        ),
        py(
            "files/mountinfo_shows_only_sandbox_mounts",
            r#"
import os, sys
# Every mount must be one the sandbox builds, and its root (what part of its file system it
# shows) must be the expected one: binds of host paths show the same path, scratch binds show
# their directory of the scratch tmpfs, device binds their node. Nothing may name the host's
# runtime, project or home directories.
DEV = {"null", "zero", "full", "random", "urandom"}
ETC = {"ssl/certs", "ssl/openssl.cnf", "mono", "ca-certificates", "ca-certificates.conf", "ld.so.cache", "ld.so.conf",
       "ld.so.conf.d", "alternatives", "fonts", "mime.types", "matplotlibrc", "protocols",
       "services", "os-release"}
PROC_FILES = {"kcore", "kmsg", "keys", "key-users", "sysrq-trigger", "timer_list", "sched_debug",
              "latency_stats", "kallsyms", "kpagecount", "kpageflags", "kpagecgroup",
              "config.gz", "vmallocinfo", "slabinfo"}
PROC_DIRS = {"acpi", "scsi", "irq", "bus", "fs", "driver", "tty", "sys"}
SCRATCH = {"/mnt/data": "/data", "/tmp": "/tmp", "/var/tmp": "/tmp", "/dev/shm": "/shm",
           "/run/ampoule": "/.ampoule"}
host_binds = {"/usr"} | {"/etc/" + e for e in ETC}
exe = os.path.realpath(sys.executable)
# A session's Python environment (`ampoule setup`'s venv) is bound read-only at its host path.
venv = os.path.realpath(sys.prefix)
if venv != "/usr":
    host_binds.add(venv)

problems, seen = [], set()
text = open("/proc/self/mountinfo").read()
for line in text.splitlines():
    left, right = line.split(" - ", 1)
    f = left.split()
    root, point = f[3], f[4]
    fstype, source = right.split()[:2]
    seen.add(point)
    def want(ok, why):
        if not ok:
            problems.append(why + ": " + line)
    if point in ("/", "/dev") or point in {"/proc/" + d for d in PROC_DIRS}:
        want(fstype == "tmpfs" and source == "tmpfs" and root == "/", "not a fresh tmpfs")
    elif point == "/proc":
        want(fstype == "proc" and root == "/", "not a proc mount")
    elif point.startswith("/dev/") and point[5:] in DEV:
        want(fstype == "devtmpfs" and root == point[4:], "unexpected device bind")
    elif point.startswith("/proc/") and point[6:] in PROC_FILES:
        want(fstype == "devtmpfs" and root == "/null", "unexpected /proc mask")
    elif point in SCRATCH:
        want(fstype == "tmpfs" and source == "tmpfs" and root == SCRATCH[point], "unexpected scratch bind")
    elif point in host_binds or (point != "/" and exe.startswith(point + "/")):
        want(root in (point, "/"), "host bind shows another host directory")
    else:
        problems.append("unexpected mount: " + line)
    if fstype not in ("tmpfs", "devtmpfs", "proc"):
        want(point in host_binds or exe.startswith(point + "/"), "host device outside the expected binds")
def mentions(text, where):
    for field in set(text.split()):
        if field == venv:
            continue
        if field.startswith(("/work", "/home", "/root", "/sys", "/var/lib", "/run/ampoule/")) or any(
                w in field for w in ("stage", "scratch", "ampoule-test", "overlay", "docker")):
            problems.append(where + " mentions " + field)
mentions(text, "mount table")
need = {"/", "/usr", "/proc", "/dev", "/mnt/data", "/tmp", "/dev/shm", "/run/ampoule"}
if not need <= seen:
    problems.append("mount table incomplete: missing %s" % sorted(need - seen))
for other in ["/proc/self/mounts", "/proc/1/mountinfo", "/proc/thread-self/mountinfo"]:
    try:
        content = open(other).read()
    except OSError as e:
        continue
    n = len(content.splitlines())
    if other == "/proc/1/mountinfo" and os.getpid() != 1:
        # A zygote-born session's pid 1 (the reaper) lives in the zygote's mount namespace:
        # its table differs, and must not reveal the host either.
        mentions(content, other)
    elif n != len(text.splitlines()):
        problems.append("%s has %d lines, mountinfo %d" % (other, n, len(text.splitlines())))
for p in problems:
    print("ESCAPED", p)
if not problems:
    print("BLOCKED %d mounts, all expected" % len(text.splitlines()))
"#,
            expect_blocked,
        ),
        py(
            "files/dev_is_minimal",
            concat!(
                py_prelude!(),
                r#"
import stat
CHR = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}
LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
         "stderr": "/proc/self/fd/2"}
entries = set(os.listdir("/dev"))
extra = entries - set(CHR) - set(LINKS) - {"shm"}
missing = (set(CHR) | set(LINKS) | {"shm"}) - entries
print("ESCAPED /dev has extra entries", sorted(extra)) if extra else print("BLOCKED /dev holds only", sorted(entries))
if missing:
    print("NOTE /dev misses", sorted(missing))
for n, (ma, mi) in CHR.items():
    st = os.lstat("/dev/" + n)
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (ma, mi):
        print("ESCAPED /dev/%s is not the %d:%d device" % (n, ma, mi))
for n, target in LINKS.items():
    if os.readlink("/dev/" + n) != target:
        print("ESCAPED /dev/%s points to %s" % (n, os.readlink("/dev/" + n)))
if not stat.S_ISDIR(os.lstat("/dev/shm").st_mode):
    print("ESCAPED /dev/shm is not a directory")
for p in ["/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/vda", "/dev/sda", "/dev/tty",
          "/dev/console", "/dev/ptmx", "/dev/pts/0", "/dev/net/tun", "/dev/kvm", "/dev/vsock",
          "/dev/vhost-vsock", "/dev/fuse", "/dev/userfaultfd", "/dev/loop-control", "/dev/loop0",
          "/dev/cpu/0/msr", "/dev/mqueue", "/dev/hugepages", "/dev/dri"]:
    refused("open " + p, os.open, p, os.O_RDONLY, want=(errno.ENOENT,))
# /dev/shm is scratch, so creating a device node there is the way to a host device.
refused("mknod /dev/shm/vda", os.mknod, "/dev/shm/vda", stat.S_IFBLK | 0o666, os.makedev(254, 0))
refused("create /dev/evil", os.open, "/dev/evil", os.O_CREAT | os.O_WRONLY, 0o666)
"#
            ),
            expect_blocked,
        ),
        py(
            "files/no_inherited_descriptors",
            r#"
import os, fcntl, sys
# Nothing but stdio may reach the program: a descriptor of the control channel, the scratch
# directory or a host file would be a way out. In a session, the kernel's own descriptors (its
# protocol streams, output pipes and event loop) are named by the objects that own them.
own = set()
kernel = sys.modules.get("kernel")
if kernel is not None and getattr(kernel, "chan", None) is not None:
    ch, lp = kernel.chan, kernel.loop
    own = {ch._in, ch._out, ch.log_fd, *ch._pipes, lp._selector.fileno(), lp._ssock.fileno(), lp._csock.fileno()}
    print("BLOCKED the kernel's own descriptors:", sorted((fd, os.readlink("/proc/self/fd/%d" % fd).split("[")[0]) for fd in own))
open_fds = []
for fd in range(3, 4096):
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        if fd not in own:
            open_fds.append(fd)
    except OSError:
        pass
if open_fds:
    print("ESCAPED inherited descriptors", open_fds)
else:
    print("BLOCKED only stdio is open")
links = {fd: os.readlink("/proc/self/fd/%d" % fd) for fd in range(3)}
ok = links[0] == "/dev/null" and links[1].startswith("pipe:") and links[2].startswith("pipe:")
print("BLOCKED stdio:", links) if ok else print("ESCAPED unexpected stdio:", links)
"#,
            expect_blocked,
        )
        .command_check(stdio_pipes),
        py(
            "files/other_sandbox_files_invisible",
            r#"
import os
# The jail ran one sandbox to its end and keeps another running while this one runs; both wrote
# a marker into every scratch directory. None may be visible here.
NAME = "ampoule-other-sandbox-marker"
hits = []
for top, dirs, files in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "usr")]
    hits += [os.path.join(top, n) for n in files + dirs if NAME in n]
print("ESCAPED another sandbox's files:", hits) if hits else print("BLOCKED no marker anywhere")
for d in ["/mnt/data", "/tmp", "/var/tmp", "/dev/shm"]:
    c = os.listdir(d)
    print("ESCAPED", d, "holds", c) if c else print("BLOCKED", d, "is empty")
"#,
            |o| {
                expect_blocked(o)?;
                expect_vars(
                    o,
                    &[
                        ("SEQ_WROTE", "1"),
                        ("LIVE_WROTE", "1"),
                        ("LIVE_DURING", "yes"),
                    ],
                )
            },
        )
        .around(
            r#"
cat > /tmp/writer.py <<'EOF'
import os, time
for d in ("/mnt/data", "/tmp", "/var/tmp", "/dev/shm"):
    with open(os.path.join(d, "ampoule-other-sandbox-marker"), "w") as f:
        f.write("marker")
print("WROTE", flush=True)
EOF
cp /tmp/writer.py /tmp/live.py
# Once its markers are written, the live sandbox becomes a process the jail can recognise.
echo 'os.execv("/usr/bin/python3", ["ampoule-live-marker", "-c", "import time; time.sleep(6)"])' >> /tmp/live.py
"$1" run --lang python /tmp/writer.py > /tmp/seq.out 2>&1 || true
"$1" run --lang python --timeout 30 /tmp/live.py > /tmp/live.out 2>&1 &
echo $! > /tmp/live.pid
i=0
while ! grep -qs 'ampoule-live-[m]arker' /proc/[0-9]*/cmdline && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
"#,
            r#"
grep -qs 'ampoule-live-[m]arker' /proc/[0-9]*/cmdline && echo LIVE_DURING=yes
wait "$(cat /tmp/live.pid)"
echo SEQ_WROTE=$(grep -c WROTE /tmp/seq.out)
echo LIVE_WROTE=$(grep -c WROTE /tmp/live.out)
"#,
        ),
    ]
}

/// `no_inherited_descriptors` for a command entered into a session's sandbox (`command/`
/// variant): `ampoule run --as-command` hands Python its code on a stdin pipe (so nothing of
/// the run is left in /mnt/data), so descriptor 0 is that pipe, not `/dev/null`. Only that
/// differs: nothing beyond stdio may be open, and stdio must be pipes.
fn stdio_pipes(o: &crate::jail::Outcome) -> Result<(), String> {
    let out = o.output();
    let pipes = |l: &str| {
        l.strip_prefix("ESCAPED unexpected stdio: ")
            .is_some_and(|m| m.matches("'pipe:[").count() == 3 && m.matches(": '").count() == 3)
    };
    if !out.contains("BLOCKED only stdio is open")
        || out.lines().any(|l| l.contains("ESCAPED") && !pipes(l))
        || o.result.status != ampoule_types::ExecutionStatus::Succeeded
    {
        return Err(format!("the attack succeeded or the probe failed:\n{out}"));
    }
    Ok(())
}
