#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed unwrap is a failed test"
)]
//! Tenants of one server cannot starve each other through the kernel's per-user quotas, and do
//! not share interpreter randomness: the real `ampoule serve`, two tenants (`a`, `b`) on one
//! Python pool whose sessions fork from zygotes (the default), driven over `/v1`.
//!
//! Linux counts some kernel objects per user, not per cgroup: inotify instances and watches,
//! pipe buffer pages, pending signals, POSIX message queue bytes. Every attack runs in tenant
//! `a`'s session `a1` (forked from a zygote) and exhausts its own share; then `a1`'s sibling
//! `a2` (forked from the same zygote), tenant `b`'s running session and a brand-new one of `b`
//! must still get theirs. Each attack also checks, from `a1`, that it really exhausted
//! something (or the test would prove nothing); message queues cannot be created in a sandbox
//! at all (Landlock refuses them), which counts as exhausted. User namespaces (refused by
//! seccomp) are the containment suite's. Before per-session uids, all of these were shared by
//! every session of a zygote (crates/runtime/src/ucounts.rs explains the kernel's accounting).
//!
//! Everything runs inside one throw-away outer namespace (a jail: `unshare --mount --pid --net
//! ...`), so a sandbox bug cannot hurt the machine; the test talks to the server from a thread
//! that joined the jail's network namespace. Needs root, `unshare`, `/usr/bin/python3` and the
//! Python session environment (`ampoule setup`); without them every trial is reported as
//! ignored with the reason, never as passed.

use std::path::Path;
use std::time::{Duration, Instant};

use ampoule_testkit::host::{Need, missing};
use ampoule_testkit::http::Client;
use ampoule_testkit::jail::Served;
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};

const KEY_A: &str = "tenants-e2e-key-a";
const KEY_B: &str = "tenants-e2e-key-b";
const KEY_C: &str = "tenants-e2e-key-c";

fn config(t: &Path) -> String {
    format!(
        r#"
[server]
data_dir = "{data}"
[[auth.keys]]
tenant = "a"
key_env = "TENANTS_KEY_A"
[[auth.keys]]
tenant = "b"
key_env = "TENANTS_KEY_B"
[[auth.keys]]
tenant = "c"
key_env = "TENANTS_KEY_C"
[tenants.c]
cpu_seconds_per_hour = 2

[pools.python]
warm = 0
max_sessions = 16
"#,
        data = t.join("data").display()
    )
}

/// The server in its jail: tenants `a` and `b` on one Python pool.
type Jail = Served;

fn start() -> Result<Jail, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cfg = dir.path().join("ampoule.toml");
    std::fs::write(&cfg, config(dir.path())).map_err(|e| e.to_string())?;
    Served::start(
        dir,
        "",
        &cfg,
        [
            ("TENANTS_KEY_A", KEY_A),
            ("TENANTS_KEY_B", KEY_B),
            ("TENANTS_KEY_C", KEY_C),
        ],
    )
}

/// A session of `key`'s tenant.
struct Sess<'a> {
    port: u16,
    key: &'a str,
    id: String,
}

impl Sess<'_> {
    /// Runs `code`; the last line of its stdout, parsed as JSON.
    fn run(&self, code: &str) -> Result<Value, Failed> {
        let r = Client::new(self.port, self.key).ok(
            "POST",
            &format!("/v1/sessions/{}/executions", self.id),
            Some(json!({ "code": code, "timeout_s": 120 })),
        )?;
        let stdout = r["stdout"].as_str().unwrap_or_default();
        serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .map_err(|_| format!("no JSON line from the session: {r}").into())
    }
}

/// A session of `key`'s tenant forked from a zygote. A tenant's zygote starts in the
/// background on its first session (which starts cold), so cold ones are deleted until a
/// forked one comes: one that finds pandas imported at its start.
fn forked<'a>(port: u16, key: &'a str) -> Result<Sess<'a>, Failed> {
    let t0 = Instant::now();
    loop {
        let s = Client::new(port, key).ok("POST", "/v1/sessions", Some(json!({})))?;
        let sess = Sess {
            port,
            key,
            id: s["id"].as_str().ok_or("no session id")?.to_owned(),
        };
        let v = sess.run("import sys, json\nprint(json.dumps('pandas' in sys.modules))")?;
        if v == json!(true) {
            return Ok(sess);
        }
        Client::new(port, key).ok("DELETE", &format!("/v1/sessions/{}", sess.id), None)?;
        if t0.elapsed() > Duration::from_secs(120) {
            return Err("no session forked from a zygote within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Python run in every victim: what it can still get of each quota, as JSON.
const VICTIM: &str = r#"
import ctypes, errno, fcntl, json, os, signal, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
fds = []
for _ in range(8):
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    fds.append(fd)
out["inotify"] = len(fds)
out["watch"] = bool(fds) and libc.inotify_add_watch(fds[0], b"/usr/bin", 0x2) >= 0
for fd in fds:
    os.close(fd)
r, w = os.pipe()
out["pipe_size"] = fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
try:
    fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
    out["pipe_grow"] = True
except OSError as e:
    out["pipe_grow"] = errno.errorcode[e.errno]
os.close(r); os.close(w)
child = subprocess.run([sys.executable, "-c", SIGNALS, "100"], capture_output=True, text=True)
out["signals"] = int(child.stdout.strip() or -1)
libc.mq_open.restype = ctypes.c_int
class mq_attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long), ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
q = libc.mq_open(b"/victim", os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(mq_attr(0, 1, 64, 0)))
out["mqueue"] = q >= 0 or errno.errorcode.get(ctypes.get_errno())
if q >= 0:
    os.close(q)
    libc.mq_unlink(b"/victim")
print(json.dumps(out))
"#;

/// Queues up to argv[1] real-time signals to itself (blocked); prints how many it could, then
/// holds them for argv[2] seconds.
const SIGNALS: &str = r#"
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
n, want = 0, int(sys.argv[1])
class sigval(ctypes.Union):
    _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]
while n < want and libc.sigqueue(os.getpid(), signal.SIGRTMIN, sigval(0)) == 0:
    n += 1
print(n, flush=True)
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
"#;

/// The attacks, in the attacker's session; each keeps what it took (globals, a child) and
/// reports how much it took and whether its own next attempt is refused.
const ATTACK: &str = r#"
import ctypes, errno, fcntl, json, os, signal, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
HELD_INOTIFY = []
while len(HELD_INOTIFY) < 4096:
    fd = libc.inotify_init1(0)
    if fd < 0:
        out["inotify_stop"] = errno.errorcode[ctypes.get_errno()]
        break
    HELD_INOTIFY.append(fd)
out["inotify"] = len(HELD_INOTIFY)
# Watches: one per file of the (read-only) root, until refused.
watches, stop = 0, None
for top in ("/usr", "/lib", "/etc", "/opt", "/var"):
    for d, dirs, files in os.walk(top):
        for f in files + dirs:
            if libc.inotify_add_watch(HELD_INOTIFY[0], os.path.join(d, f).encode(), 0x2) >= 0:
                watches += 1
            elif ctypes.get_errno() == errno.ENOSPC:
                stop = "ENOSPC"
                break
        if stop:
            break
    if stop:
        break
# A host with fewer files than that: files of our own in /tmp (its inodes are limited too).
if stop is None:
    os.makedirs("/tmp/w", exist_ok=True)
    for i in range(70000):
        path = f"/tmp/w/{i}".encode()
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError:
            break
        if libc.inotify_add_watch(HELD_INOTIFY[0], path, 0x2) >= 0:
            watches += 1
        elif ctypes.get_errno() == errno.ENOSPC:
            stop = "ENOSPC"
            break
out["watches"], out["watches_stop"] = watches, stop
HELD_PIPES = []
while len(HELD_PIPES) < 400:
    r, w = os.pipe()
    HELD_PIPES += [r, w]
    try:
        fcntl.fcntl(w, 1031, 1 << 20)
    except OSError:
        break
out["big_pipes"] = len(HELD_PIPES) // 2
for _ in range(300):
    r, w = os.pipe()
    HELD_PIPES += [r, w]
r, w = os.pipe()
out["own_pipe_size"] = fcntl.fcntl(w, 1032)
os.close(r); os.close(w)
SIGNALER = subprocess.Popen([sys.executable, "-c", SIGNALS, "1000000", "3600"], stdout=subprocess.PIPE, text=True)
out["signals"] = int(SIGNALER.stdout.readline().strip() or -1)
libc.mq_open.restype = ctypes.c_int
class mq_attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long), ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
HELD_MQ = []
while len(HELD_MQ) < 256:
    q = libc.mq_open(f"/hog{len(HELD_MQ)}".encode(), os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(mq_attr(0, 1, 1024, 0)))
    if q < 0:
        out["mqueue_stop"] = errno.errorcode[ctypes.get_errno()]
        break
    HELD_MQ.append(q)
out["mqueues"] = len(HELD_MQ)
print(json.dumps(out))
"#;

/// Checks a victim's report: it got everything it asked for, and a message queue exactly as
/// before the attack (`mqueue_before`; sandboxes cannot create any: Landlock refuses them).
fn unaffected(who: &str, v: &Value, mqueue_before: &Value) -> Result<(), String> {
    let want = json!({
        "inotify": 8, "watch": true, "pipe_size": 65536, "pipe_grow": true, "signals": 100,
        "mqueue": mqueue_before,
    });
    if *v != want {
        return Err(format!(
            "{who} was affected by the attack: got {v}, want {want}"
        ));
    }
    Ok(())
}

/// Tenant `a`'s session exhausts its per-user quotas; its sibling, tenant `b`'s running session
/// and a new one of `b` keep theirs.
fn per_user_quotas(jail: &Jail) -> Result<(), Failed> {
    let port = jail.port;
    let a1 = forked(port, KEY_A)?;
    let a2 = forked(port, KEY_A)?;
    let b1 = forked(port, KEY_B)?;
    let victim = format!("SIGNALS = {SIGNALS:?}\n{VICTIM}");
    // Before: everyone gets everything (or the checks below prove nothing).
    let mqueue = a1.run(&victim)?["mqueue"].clone();
    for (who, s) in [("a1", &a1), ("a2", &a2), ("b1", &b1)] {
        unaffected(
            &format!("{who} before the attack"),
            &s.run(&victim)?,
            &mqueue,
        )?;
    }
    let took = a1.run(&format!("SIGNALS = {SIGNALS:?}\n{ATTACK}"))?;
    if std::env::var_os("TENANTS_VERBOSE").is_some() {
        eprintln!("the attack took: {took}");
    }
    // The attack really exhausted each quota for itself.
    let num = |k: &str| took[k].as_i64().unwrap_or(0);
    let mut staged = Vec::new();
    if !(num("inotify") >= 64 && took["inotify_stop"] == json!("EMFILE")) {
        staged.push("inotify instances");
    }
    if took["watches_stop"] != json!("ENOSPC") {
        staged.push("inotify watches");
    }
    if !(num("big_pipes") >= 16 && num("own_pipe_size") <= 8192) {
        staged.push("pipe buffers");
    }
    if num("signals") < 1000 || num("signals") >= 1_000_000 {
        staged.push("pending signals");
    }
    // Taken until refused, or refused outright (Landlock: then there is nothing to take).
    let refused_outright = num("mqueues") == 0 && took["mqueue_stop"] == json!("EACCES");
    if !((num("mqueues") >= 1 && took.get("mqueue_stop").is_some()) || refused_outright) {
        staged.push("message queues");
    }
    if !staged.is_empty() {
        return Err(format!("the attack did not exhaust {staged:?}: {took}").into());
    }
    let b2 = forked(port, KEY_B)?;
    let mut errors = Vec::new();
    for (who, s) in [("a2 (same zygote)", &a2), ("b1", &b1), ("b2 (new)", &b2)] {
        if let Err(e) = unaffected(who, &s.run(&victim)?, &mqueue) {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        return Err(format!("attack {took}\n{}", errors.join("\n")).into());
    }
    Ok(())
}

/// Fresh sessions of two tenants differ in CPython's hash secret and in where libc is mapped;
/// pid 1 (the reaper) cannot be re-limited, re-prioritised or signalled by the code.
fn no_shared_randomness(jail: &Jail) -> Result<(), Failed> {
    let port = jail.port;
    let code = "import ctypes, json\nlibc = ctypes.CDLL(None)\n\
                print(json.dumps([hash('x'), ctypes.cast(libc.printf, ctypes.c_void_p).value]))";
    let a = forked(port, KEY_A)?.run(code)?;
    let b = forked(port, KEY_B)?.run(code)?;
    if a[0] == b[0] || a[1] == b[1] {
        return Err(format!("tenants share randomness: a {a}, b {b}").into());
    }
    let pid1 = forked(port, KEY_A)?.run(
        r#"
import errno, json, os, resource, signal
out = {}
for what, f in [
    ("prlimit", lambda: resource.prlimit(1, resource.RLIMIT_NOFILE, (1, 1))),
    ("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, 1, 19)),
    ("kill", lambda: os.kill(1, signal.SIGKILL)),
]:
    try:
        f()
        out[what] = "done"
    except OSError as e:
        out[what] = errno.errorcode[e.errno]
out["uid_differs"] = os.stat("/proc/1").st_uid != os.getuid()
print(json.dumps(out))
"#,
    )?;
    let want =
        json!({"prlimit": "EPERM", "setpriority": "EPERM", "kill": "EPERM", "uid_differs": true});
    if pid1 != want {
        return Err(format!("pid 1 within the code's reach: {pid1}, want {want}").into());
    }
    Ok(())
}

/// Tenant `c` has 2 CPU seconds an hour: a CPU-bound loop spends them (measured by its
/// sandbox's cgroup), its next execution is refused with `quota_exhausted` and a wait,
/// `/v1/usage` shows the spending; tenant `b`, without a budget, is unaffected.
fn cost_budget(jail: &Jail) -> Result<(), Failed> {
    let port = jail.port;
    let c = Client::new(port, KEY_C).ok("POST", "/v1/sessions", Some(json!({})))?;
    let sess = Sess {
        port,
        key: KEY_C,
        id: c["id"].as_str().ok_or("no session id")?.to_owned(),
    };
    let spent = sess.run(
        "import json, time\nt = time.process_time()\nwhile time.process_time() - t < 2.5:\n    pass\nprint(json.dumps(time.process_time() - t))",
    )?;
    if spent.as_f64().is_none_or(|s| s < 2.5) {
        return Err(format!("the loop did not spend its CPU: {spent}").into());
    }
    let body = json!({"code": "print(1)"}).to_string();
    let (status, r) = Client::new(port, KEY_C).call(
        "POST",
        &format!("/v1/sessions/{}/executions", sess.id),
        Some(body.as_bytes()),
    )?;
    if status != 429 || r["error"]["code"] != "quota_exhausted" {
        return Err(format!("after the budget: {status} {r}").into());
    }
    let usage = Client::new(port, KEY_C).ok("GET", "/v1/usage", None)?;
    let b = &usage["budget"];
    if b["cpu_seconds_per_hour"] != json!(2.0) || b["cpu_seconds_last_hour"].as_f64() < Some(2.5) {
        return Err(format!("usage does not show the budget: {usage}").into());
    }
    // Another tenant runs as ever.
    let other = Client::new(port, KEY_B).ok("POST", "/v1/sessions", Some(json!({})))?;
    let v = Sess {
        port,
        key: KEY_B,
        id: other["id"].as_str().ok_or("no session id")?.to_owned(),
    }
    .run("print(6 * 7)")?;
    if v != json!(42) {
        return Err(format!("tenant b got {v}").into());
    }
    Ok(())
}

fn unavailable() -> Option<String> {
    missing(&[
        Need::Root("it starts sandboxes in a jail"),
        Need::Tool("/usr/bin/unshare", "util-linux"),
        Need::Tool("/usr/bin/python3", "python3"),
        Need::SessionEnv(&ampoule_session::paths::python_env_dir()),
    ])
}

type Body = fn(&Jail) -> Result<(), Failed>;

fn trial(body: Body) -> Result<(), Failed> {
    let mut jail = start()?;
    jail.enter()?;
    let outcome = body(&jail);
    let _ = jail.stop();
    outcome.inspect_err(|_| {
        if std::env::var_os("TENANTS_VERBOSE").is_some() {
            eprintln!("{}", jail.log());
        }
    })
}

fn main() {
    let args = Arguments::from_args();
    let why = unavailable();
    let cases: [(&str, Body); 3] = [
        ("per_user_quotas", per_user_quotas),
        ("no_shared_randomness", no_shared_randomness),
        ("cost_budget", cost_budget),
    ];
    let trials: Vec<Trial> = cases
        .into_iter()
        .map(|(name, f)| Trial::test(name, move || trial(f)).with_ignored_flag(why.is_some()))
        .collect();
    if let Some(why) = &why {
        eprintln!("tenant isolation tests ignored: {why}");
    }
    libtest_mimic::run(&args, trials).exit();
}
