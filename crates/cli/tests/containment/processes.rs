//! Processes: seeing or signalling host processes, daemons that outlive the run.

use ampoule_types::ExecutionStatus;

use crate::jail::Outcome;
use crate::{Probe, expect_blocked, expect_vars, py, sh};

/// Jail commands: a `sleep` in the jail that the sandbox must not be able to reach.
const VICTIM_BEFORE: &str = "sleep 600 & echo $! > /tmp/victim.pid";
/// Reports the victim's state (`S` while it sleeps; a killed one is a zombie or gone), then
/// ends it.
const VICTIM_AFTER: &str = r#"
v=$(cat /tmp/victim.pid)
echo VICTIM_STATE=$(awk '/^State:/ {print $2}' /proc/$v/status 2>/dev/null)
kill $v 2>/dev/null
wait $v 2>/dev/null
"#;

/// For a command entered into a session's sandbox (`command/` variant), where the session's
/// own processes (its kernel; in a zygote-born one also its reaper) share the pid namespace, so
/// `kill(-1, 0)` finds them (the kernel answers it even when every target refuses with EPERM)
/// and some pids above 1 exist: every `ESCAPED` line may name only pids of the sandbox (≤ 64,
/// as `only_own_pids_visible` holds), and the jail's victim must be untouched. The
/// `kill(-1, 0)` line names none and the victim decides it: it is allowed only with the victim
/// asleep.
fn only_sandbox_pids(o: &Outcome) -> Result<(), String> {
    expect_vars(o, &[("VICTIM_STATE", "S")])?;
    let out = o.output();
    for line in out.lines().filter(|l| l.contains("ESCAPED")) {
        if line.contains("kill(-1, 0) still finds processes") {
            continue;
        }
        let Some(list) = line.strip_prefix("ESCAPED foreign processes answer: ") else {
            return Err(format!("the attack succeeded:\n{out}"));
        };
        // [('pid', 2, 'exists'), ...]: the number of every tuple.
        for item in list.split("('").skip(1) {
            let pid: u32 = item
                .split(", ")
                .nth(1)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("unreadable: {line}"))?;
            if pid > 64 {
                return Err(format!("a pid outside the sandbox answers:\n{out}"));
            }
        }
    }
    if !out.contains("still running") && !out.contains("BLOCKED") && !out.contains("ESCAPED") {
        return Err(format!("the probe reported nothing:\n{out}"));
    }
    if o.result.status != ExecutionStatus::Succeeded {
        return Err(format!("the probe did not run to its end:\n{out}"));
    }
    Ok(())
}

/// The run ended on its own, quickly and successfully, after printing `marker`.
fn finished_quickly(o: &Outcome, marker: &str) -> Result<(), String> {
    if o.result.status != ExecutionStatus::Succeeded || !o.result.stdout.contains(marker) {
        return Err(format!(
            "expected a successful run printing {marker:?}, got {} / {:?}:\n{}",
            o.result.status,
            o.result.limit,
            o.output()
        ));
    }
    // The run must end with its main program, not wait for what it left behind.
    if o.result.duration_ms > 30_000.0 {
        return Err(format!(
            "the run waited for its leftovers: {} ms",
            o.result.duration_ms
        ));
    }
    Ok(())
}

pub(crate) fn probes() -> Vec<Probe> {
    vec![
        // A zygote-born session's pid 1 (the reaper) runs as the zygote's uid, the code as its
        // slot's own: nothing of pid 1 is the code's to re-limit, re-prioritise or signal. (In a
        // cold sandbox pid 1 is the sandbox's own init, with the code's uid.)
        py(
            "processes/zygote_pid1_out_of_reach",
            r#"
import errno, os, resource, signal
for what, f in [
    ("prlimit(1, NOFILE, 1)", lambda: resource.prlimit(1, resource.RLIMIT_NOFILE, (1, 1))),
    ("prlimit(1, CPU, 1)", lambda: resource.prlimit(1, resource.RLIMIT_CPU, (1, 1))),
    ("setpriority(pid 1, 19)", lambda: os.setpriority(os.PRIO_PROCESS, 1, 19)),
    ("kill(1, SIGSTOP)", lambda: os.kill(1, signal.SIGSTOP)),
    ("kill(1, SIGKILL)", lambda: os.kill(1, signal.SIGKILL)),
]:
    try:
        f()
        print("ESCAPED", what)
    except OSError as e:
        print("BLOCKED", what, errno.errorcode.get(e.errno))
uid1 = os.stat("/proc/1").st_uid
print("BLOCKED" if uid1 != os.getuid() else "ESCAPED", "pid 1's uid", uid1, "vs ours", os.getuid())
"#,
            expect_blocked,
        )
        .args(&["--zygote"]),
        py(
            "processes/only_own_pids_visible",
            r#"
import os
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
if any(p > 64 for p in pids) or 1 not in pids:
    print("ESCAPED host pids visible:", pids)
else:
    print("BLOCKED sandbox sees only", pids)
"#,
            expect_blocked,
        ),
        py(
            "processes/kill_minus_one",
            r#"
import os, signal, subprocess, time
# kill(-1, SIGKILL) signals every process the caller may signal: it must reach the sandbox's
# own child and nothing of the jail (whose victim sleeper is checked afterwards).
child = subprocess.Popen(["/usr/bin/sleep", "60"])
time.sleep(0.1)
os.kill(-1, signal.SIGKILL)
rc = child.wait()
print("own child ended by", rc)
if rc != -signal.SIGKILL:
    print("INVALID kill(-1) did not reach the sandbox's own child")
try:
    os.kill(-1, 0)
    print("ESCAPED kill(-1, 0) still finds processes to signal")
except ProcessLookupError:
    print("BLOCKED kill(-1) reached only the sandbox")
print("still running")
"#,
            |o| {
                expect_blocked(o)?;
                expect_vars(o, &[("VICTIM_STATE", "S")])
            },
        )
        .around(VICTIM_BEFORE, VICTIM_AFTER)
        .command_check(only_sandbox_pids),
        py(
            "processes/signal_any_pid_and_group",
            r#"
import os
# Try every pid and process group the jail could have: only the sandbox's own may answer.
own = {1, os.getpid()} | {int(t) for t in os.listdir("/proc/self/task")}  # and own threads
found = []
for p in range(1, 70000):
    if p in own:
        continue
    for what, fn in (("pid", os.kill), ("group", os.killpg)):
        try:
            fn(p, 0)
            found.append((what, p, "signalable"))
        except ProcessLookupError:
            pass
        except PermissionError:
            found.append((what, p, "exists"))
for p in range(1, 70000):
    if p in own:
        continue
    try:
        os.close(os.pidfd_open(p))
        found.append(("pidfd", p, "opened"))
    except ProcessLookupError:
        pass
    except OSError as e:
        found.append(("pidfd", p, e.strerror))
print("ESCAPED foreign processes answer:", found[:20]) if found else print("BLOCKED no pid outside the sandbox answers")
"#,
            |o| {
                expect_blocked(o)?;
                expect_vars(o, &[("VICTIM_STATE", "S")])
            },
        )
        .around(VICTIM_BEFORE, VICTIM_AFTER)
        .command_check(only_sandbox_pids),
        py(
            "processes/signal_sandbox_init",
            r#"
import os, signal, time
# Pid 1 of the sandbox is ampoule's init: signals from inside must not stop or kill it (that
# would end the run early, or hang it).
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGSEGV,
            signal.SIGABRT, signal.SIGUSR1, signal.SIGPIPE, signal.SIGSTOP, signal.SIGKILL):
    try:
        os.kill(1, sig)
    except OSError as e:
        print("BLOCKED kill(1, %s): %s" % (sig.name, e.strerror))
try:
    fd = os.pidfd_open(1)
    signal.pidfd_send_signal(fd, signal.SIGKILL)
except OSError as e:
    print("BLOCKED pidfd_send_signal(1, SIGKILL):", e.strerror)
time.sleep(0.5)
state = [l.split()[1] for l in open("/proc/1/status") if l.startswith("State:")][0]
print("BLOCKED init survived every signal, state", state) if state in "SR" else print("ESCAPED init is in state", state)
print("still running")
"#,
            expect_blocked,
        ),
        py(
            "processes/daemon_double_fork",
            r#"
import os, signal, time
# The classic daemon: fork, setsid, fork again, close stdio, ignore hangups and terminations.
# It must not outlive the run (the jail counts leftover processes).
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in range(3):
            os.dup2(null, fd)
        os.chdir("/")
        with open("/mnt/data/daemon.alive", "w") as f:
            f.write(str(os.getpid()))
        os.write(w, b"up")
        time.sleep(600)
        os._exit(0)
    os._exit(0)
os.wait()
os.close(w)
print("DAEMON", os.read(r, 2).decode())
"#,
            |o| {
                finished_quickly(o, "DAEMON up")?;
                if !o.result.files.iter().any(|f| f.path == "daemon.alive") {
                    return Err("the daemon never ran; the probe proves nothing".into());
                }
                Ok(())
            },
        )
        .args(&["--timeout", "60"]),
        sh(
            "processes/nohup_setsid_disown",
            r#"
nohup sleep 600 > /dev/null 2>&1 &
disown
setsid sleep 601 &
disown
( trap '' HUP TERM INT; exec sleep 602 ) &
disown -h
sleep 0.3
n=0
for c in /proc/[0-9]*/comm; do
  read -r name < "$c" 2>/dev/null && [ "$name" = sleep ] && n=$((n + 1))
done
echo "SLEEPERS=$n"
"#,
            |o| finished_quickly(o, "SLEEPERS=3"),
        )
        .args(&["--timeout", "60"]),
        py(
            "processes/ipc_namespace",
            concat!(
                py_prelude!(),
                r#"
# The jail created a message queue, a shared memory segment and a semaphore set (mode 0644);
# they live in the jail's IPC namespace and must be invisible here.
for kind in ("msg", "shm", "sem"):
    rows = open("/proc/sysvipc/" + kind).read().splitlines()[1:]
    print("ESCAPED jail's %s objects visible: %s" % (kind, rows)) if rows else print("BLOCKED no", kind, "objects")
IPC_STAT = 2
buf = ctypes.create_string_buffer(4096)
seen = []
for ident in range(0, 64):
    for name, nr, args in (("msgctl", 71, (ident, IPC_STAT, buf)),
                           ("shmctl", 31, (ident, IPC_STAT, buf)),
                           ("semctl", 66, (ident, 0, IPC_STAT, buf))):
        r, e = raw(nr, *args)
        if r != -1 or e != errno.EINVAL:
            seen.append((name, ident, r, ename(e)))
print("ESCAPED IPC ids answer:", seen) if seen else print("BLOCKED no IPC id answers")
"#
            ),
            |o| {
                expect_blocked(o)?;
                expect_vars(o, &[("IPC_OBJECTS", "3")])
            },
        )
        .around(
            "ipcmk -Q -p 0644 >/dev/null; ipcmk -M 4096 -p 0644 >/dev/null; ipcmk -S 1 -p 0644 >/dev/null",
            "echo IPC_OBJECTS=$(ipcs -a | grep -c '^0x')",
        ),
    ]
}
