//! Durable sandboxes on the real engine: a real `ampoule serve` (in a throw-away jail) with
//! real Python sandboxes on ext4 disk images, driven through `/v1`:
//!
//! - pause and resume, 100 times, with a background process writing a timestamp every 50 ms:
//!   no timestamp falls inside a pause (the freezer stops it before `pause` answers, and it
//!   runs again only on `resume`), the process is the same one after, a Python variable is
//!   still there, the files are byte for byte the same;
//! - hibernation and back, 20 times: listed as hibernated, back with `session_state: "lost"`,
//!   the variable and the process gone, the files byte for byte the same, each transition
//!   audited and counted;
//! - on the gVisor tier, hibernation keeps the memory (a runsc checkpoint): a variable is
//!   back after a resume and after a restart of the server, `session_state` says `kept`;
//! - idle policies with one-second timers: a sandbox with a running process is not idle; an
//!   idle one is paused, hibernated or deleted as its policy says.
//!
//! Needs root, loop devices, `mkfs.ext4` and the Python session environment; otherwise the
//! trial is reported as ignored with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ampoule_testkit::host::{Need, missing, trial};
use ampoule_testkit::http::Client;
use ampoule_testkit::jail::Served;
use libtest_mimic::Arguments;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const KEY: &str = "durable-doors-key";

const TICKER: &str = "while :; do date +%s%N >> /mnt/data/ticks; sleep 0.05; done";

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("ampoule.toml");
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_DURABLE_KEY\"\n\
         [pools.python]\nwarm = 0\nmax_sessions = 8\n",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

struct Api {
    c: Client,
}

impl Api {
    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.c
            .ok(method, path, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn create(&self, lifecycle: Value) -> String {
        let s = self.ok(
            "POST",
            "/v1/sandboxes",
            Some(json!({"lifecycle": lifecycle, "timeout_s": 3600})),
        );
        s["id"].as_str().unwrap().to_owned()
    }

    fn state(&self, id: &str) -> Value {
        self.ok("GET", &format!("/v1/sandboxes/{id}"), None)
    }

    fn verb(&self, id: &str, verb: &str) -> Value {
        self.ok("POST", &format!("/v1/sandboxes/{id}/{verb}"), None)
    }

    fn background(&self, id: &str, cmd: &str) -> u64 {
        let p = self.ok(
            "POST",
            &format!("/v1/sandboxes/{id}/processes"),
            Some(json!({"cmd": cmd, "background": true})),
        );
        p["pid"].as_u64().unwrap()
    }

    fn pids(&self, id: &str) -> Vec<u64> {
        self.ok("GET", &format!("/v1/sandboxes/{id}/processes"), None)["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pid"].as_u64().unwrap())
            .collect()
    }

    /// Python's stdout.
    fn python(&self, id: &str, code: &str) -> Value {
        self.ok(
            "POST",
            &format!("/v1/sandboxes/{id}/executions"),
            Some(json!({"code": code})),
        )
    }

    fn put(&self, id: &str, path: &str, data: &[u8]) {
        let (status, v) = self
            .c
            .call(
                "PUT",
                &format!("/v1/sandboxes/{id}/files/{path}"),
                Some(data),
            )
            .unwrap();
        assert!((200..300).contains(&status), "PUT {path}: {status} {v}");
    }

    /// A file's bytes (through Python: the test client reads JSON bodies only).
    fn digest(&self, id: &str, path: &str) -> String {
        let r = self.python(
            id,
            &format!(
                "import hashlib; print(hashlib.sha256(open('/mnt/data/{path}','rb').read()).hexdigest())"
            ),
        );
        r["stdout"].as_str().unwrap_or_default().trim().to_owned()
    }

    /// The ticks written so far, in nanoseconds since the epoch.
    fn ticks(&self, id: &str) -> Vec<u128> {
        let r = self.python(
            id,
            "print(' '.join(open('/mnt/data/ticks').read().split()))",
        );
        r["stdout"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect()
    }

    fn audit_kinds(&self, id: &str) -> Vec<(String, String)> {
        let r = self.ok("GET", &format!("/v1/audit?session={id}&limit=1000"), None);
        r["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["kind"].as_str().unwrap_or_default().to_owned(),
                    r["decided_by"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

/// Files planted in a sandbox: a text, and a MiB of bytes in a subdirectory.
fn plant(api: &Api, id: &str) -> Vec<(String, String)> {
    let big: Vec<u8> = (0..1_048_576u32).map(|i| (i * 31 % 253) as u8).collect();
    let files = [
        ("notes.txt", b"durable through every door\n".to_vec()),
        ("deep/data.bin", big),
    ];
    let mut out = Vec::new();
    for (path, data) in files {
        api.put(id, path, &data);
        out.push((path.to_owned(), sha256(&data)));
    }
    out
}

fn check(api: &Api, id: &str, files: &[(String, String)], when: &str) {
    for (path, digest) in files {
        assert_eq!(&api.digest(id, path), digest, "{when}: {path} changed");
    }
}

fn pause_and_resume(api: &Api) {
    let id = api.create(json!({"durable": true}));
    let files = plant(api, &id);
    api.python(&id, "x = 41");
    let pid = api.background(&id, TICKER);
    std::thread::sleep(Duration::from_millis(300));
    let mut gaps = Vec::new();
    for cycle in 0..100 {
        let s = api.verb(&id, "pause");
        assert_eq!(s["state"], "paused", "cycle {cycle}: {s}");
        let paused_at = now_ns();
        if cycle % 20 == 0 {
            assert_eq!(api.state(&id)["state"], "paused");
            std::thread::sleep(Duration::from_millis(300));
            gaps.push((paused_at, now_ns()));
        }
        let s = api.verb(&id, "resume");
        assert_eq!(s["state"], "running", "cycle {cycle}: {s}");
        assert_eq!(s["session_state"], "kept", "cycle {cycle}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let ticks = api.ticks(&id);
    assert!(ticks.len() > 10, "{} ticks", ticks.len());
    for (from, to) in &gaps {
        // 10 ms of slack each side: a `date` that read the clock just before the freeze may
        // write its line just after.
        let inside: Vec<&u128> = ticks
            .iter()
            .filter(|t| **t > from + 10_000_000 && **t + 10_000_000 < *to)
            .collect();
        assert!(
            inside.is_empty(),
            "ticks written while paused ({from}..{to}): {inside:?}"
        );
    }
    assert!(
        *ticks.last().unwrap() > gaps.last().unwrap().1,
        "it did not tick after the last resume"
    );
    assert_eq!(api.pids(&id), vec![pid], "the background process changed");
    let r = api.python(&id, "print(x + 1)");
    assert_eq!(r["stdout"], "42\n", "memory was not kept: {r}");
    check(api, &id, &files, "after 100 pauses");
    // Any call names it back: a pause, then an execution.
    api.verb(&id, "pause");
    let r = api.python(&id, "print(x)");
    assert_eq!(r["stdout"], "41\n", "{r}");
    assert_eq!(api.state(&id)["state"], "running");
    let kinds = api.audit_kinds(&id);
    let paused = kinds.iter().filter(|(k, _)| k == "sandbox_paused").count();
    assert!(paused >= 100, "{paused} sandbox_paused records");
    api.ok("DELETE", &format!("/v1/sandboxes/{id}"), None);
}

fn hibernate_and_resume(api: &Api) {
    let id = api.create(json!({"durable": true}));
    let files = plant(api, &id);
    let mut times = Vec::new();
    for cycle in 0..20 {
        api.python(&id, "x = 41");
        api.background(&id, TICKER);
        let t = Instant::now();
        let s = api.verb(&id, "hibernate");
        let hibernate_s = t.elapsed().as_secs_f64();
        assert_eq!(s["state"], "hibernated", "cycle {cycle}: {s}");
        assert_eq!(
            api.state(&id)["state"],
            "hibernated",
            "reading does not wake"
        );
        if cycle == 0 {
            let l = api.ok("GET", "/v1/sandboxes?state=hibernated", None);
            assert_eq!(l["sandboxes"][0]["id"], id.as_str(), "{l}");
        }
        let t = Instant::now();
        let s = api.verb(&id, "resume");
        times.push((hibernate_s, t.elapsed().as_secs_f64()));
        assert_eq!(s["state"], "running", "cycle {cycle}: {s}");
        assert_eq!(s["session_state"], "lost", "cycle {cycle}: never silently");
        assert!(
            api.pids(&id).is_empty(),
            "cycle {cycle}: a process survived"
        );
        let r = api.python(&id, "print('x' in globals())");
        assert_eq!(
            r["stdout"], "False\n",
            "cycle {cycle}: memory came back? {r}"
        );
        check(api, &id, &files, &format!("hibernation {cycle}"));
    }
    eprintln!("hibernate/resume seconds per cycle: {times:?}");
    let kinds = api.audit_kinds(&id);
    let count = |kind: &str, why: &str| {
        kinds
            .iter()
            .filter(|(k, d)| k == kind && (why.is_empty() || d == why))
            .count()
    };
    assert!(count("sandbox_hibernated", "") >= 20, "{kinds:?}");
    assert!(count("sandbox_resumed", "memory_lost") >= 20, "{kinds:?}");
    let (_, page) = api.c.call("GET", "/metrics", None).unwrap();
    let page = page.as_str().unwrap_or_default().to_owned();
    assert!(
        page.contains(
            "ampoule_sandbox_transition_seconds_count{pool=\"python\",event=\"restore\"}"
        ),
        "{page}"
    );
    api.ok("DELETE", &format!("/v1/sandboxes/{id}"), None);
}

fn idle_policies(api: &Api) {
    let busy = api.create(json!({"on_idle": "pause", "idle_timeout_s": 1}));
    api.background(&busy, "sleep 60");
    let idle = api.create(json!({"on_idle": "pause", "idle_timeout_s": 1}));
    let sleepy = api.create(json!({"on_idle": "hibernate", "idle_timeout_s": 1}));
    api.put(&sleepy, "kept.txt", b"still here");
    let doomed = api.create(json!({"on_idle": "delete", "idle_timeout_s": 1}));
    // A job the code started itself, which the API does not know of: its CPU use keeps the
    // sandbox busy.
    let working = api.create(json!({"on_idle": "pause", "idle_timeout_s": 1}));
    let r = api.python(
        &working,
        "import subprocess\n\
         p = subprocess.Popen(['sh', '-c', 'while :; do :; done'])\n\
         p.pid > 0",
    );
    assert_eq!(r["status"], "succeeded", "{r}");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        api.state(&busy)["state"],
        "running",
        "a running process is not idle"
    );
    assert_eq!(
        api.state(&working)["state"],
        "running",
        "a sandbox whose own job uses the CPU is not idle"
    );
    assert_eq!(api.state(&idle)["state"], "paused");
    assert_eq!(api.state(&sleepy)["state"], "hibernated");
    let (status, _) = api
        .c
        .call("GET", &format!("/v1/sandboxes/{doomed}"), None)
        .unwrap();
    assert_eq!(status, 404, "an idle sandbox with on_idle = delete is gone");
    assert_eq!(api.digest(&sleepy, "kept.txt"), sha256(b"still here"));
    for id in [busy, idle, sleepy, working] {
        api.ok("DELETE", &format!("/v1/sandboxes/{id}"), None);
    }
}

fn durable_sandboxes_on_the_real_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path());
    let mut server = Served::start(
        tmp,
        "",
        &config,
        [("AMPOULE_DURABLE_KEY", KEY), ("AMPOULE_LOG", "info")],
    )
    .unwrap();
    server.enter().unwrap();
    let api = Api {
        c: Client::new(server.port, KEY),
    };
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let t = Instant::now();
        pause_and_resume(&api);
        eprintln!("pause/resume: {:.1} s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        hibernate_and_resume(&api);
        eprintln!("hibernate/resume: {:.1} s", t.elapsed().as_secs_f64());
        idle_policies(&api);
    }));
    let log = server.log();
    let stopped = server.stop();
    if let Err(e) = ran {
        let lines: Vec<&str> = log.lines().collect();
        eprintln!(
            "== the server log (last 80 lines):\n{}",
            lines[lines.len().saturating_sub(80)..].join("\n")
        );
        std::panic::resume_unwind(e);
    }
    assert_eq!(stopped.unwrap().rc, 0, "the server did not stop cleanly");
}

/// The `sealed` (gVisor) pool's server, its data in `data` (kept across servers).
fn serve_gvisor(data: &Path) -> Served {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ampoule.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_DURABLE_KEY\"\n\
             [pools.python]\nwarm = 0\nmax_sessions = 2\n\
             [pools.sealed]\nisolation = \"gvisor\"\nwarm = 0\nmax_sessions = 4\n",
            data.display()
        ),
    )
    .unwrap();
    // The jail's root is read-only but for its own directory: the data directory, outside
    // it so that it outlives the jail, is made writable in it.
    std::fs::create_dir_all(data).unwrap();
    let setup = format!(
        "mount --bind '{d}' '{d}'\nmount -o remount,bind,rw '{d}'\n",
        d = data.display()
    );
    let server = Served::start(
        tmp,
        &setup,
        &config,
        [("AMPOULE_DURABLE_KEY", KEY), ("AMPOULE_LOG", "info")],
    )
    .unwrap();
    server.enter().unwrap();
    server
}

/// Runs `f` against `server`; on a panic prints the server's log first.
fn with_log(server: &Served, f: impl FnOnce()) {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    if let Err(e) = ran {
        let log = server.log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!(
            "== the server log (last 80 lines):\n{}",
            lines[lines.len().saturating_sub(80)..].join("\n")
        );
        std::panic::resume_unwind(e);
    }
}

/// The audit records of `kind` for a sandbox: (decided_by, status).
fn audited(api: &Api, id: &str, kind: &str) -> Vec<(String, String)> {
    let r = api.ok("GET", &format!("/v1/audit?session={id}&limit=1000"), None);
    r["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == kind)
        .map(|r| {
            (
                r["decided_by"].as_str().unwrap_or_default().to_owned(),
                r["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A durable sandbox on the gVisor tier hibernates with its memory (a runsc checkpoint in its
/// directory under data_dir) and comes back with it: twice on one server, then once more
/// across a restart of the server, which checkpointed it at shutdown; the image is gone once
/// it runs again and with the sandbox.
fn gvisor_sandboxes_hibernate_with_their_memory() {
    let data_tmp = tempfile::tempdir().unwrap();
    let data = data_tmp.path().join("data");
    let mut server = serve_gvisor(&data);
    let api = Api {
        c: Client::new(server.port, KEY),
    };
    let image = |id: &str| data.join("sandboxes").join(id).join("checkpoint");
    let mut id = String::new();
    with_log(&server, || {
        let s = api.ok(
            "POST",
            "/v1/sandboxes",
            Some(json!({"pool": "sealed", "lifecycle": {"durable": true}, "timeout_s": 3600})),
        );
        id = s["id"].as_str().unwrap().to_owned();
        let r = api.python(&id, "import os\nx = 41\nprint(os.uname().release)");
        assert_eq!(r["stdout"], "4.4.0\n", "not on gVisor: {r}");
        api.put(&id, "notes.txt", b"kept by the disk\n");
        for cycle in 0..2 {
            let s = api.verb(&id, "hibernate");
            assert_eq!(s["state"], "hibernated", "cycle {cycle}: {s}");
            assert_eq!(s["session_state"], "kept", "cycle {cycle}: {s}");
            assert!(
                image(&id).join("checkpoint.img").is_file(),
                "cycle {cycle}: no checkpoint image under {}",
                image(&id).display()
            );
            let s = api.verb(&id, "resume");
            assert_eq!(s["state"], "running", "cycle {cycle}: {s}");
            assert_eq!(s["session_state"], "kept", "cycle {cycle}: {s}");
            assert!(
                !image(&id).exists(),
                "cycle {cycle}: the image outlived the resume"
            );
            let r = api.python(&id, "print(x + 1)");
            assert_eq!(r["stdout"], "42\n", "cycle {cycle}: memory lost: {r}");
            assert_eq!(api.digest(&id, "notes.txt"), sha256(b"kept by the disk\n"));
            api.python(&id, "x = 41");
        }
        let hibernated = audited(&api, &id, "sandbox_hibernated");
        assert!(
            hibernated
                .iter()
                .filter(|(_, st)| st == "memory_kept")
                .count()
                >= 2,
            "{hibernated:?}"
        );
        let resumed = audited(&api, &id, "sandbox_resumed");
        assert!(
            resumed.iter().filter(|(d, _)| d == "memory_kept").count() >= 2,
            "{resumed:?}"
        );
        // Running when the server stops: checkpointed at shutdown.
        assert_eq!(api.state(&id)["state"], "running");
    });
    assert_eq!(
        server.stop().unwrap().rc,
        0,
        "the server did not stop cleanly"
    );
    drop(server);

    let server = serve_gvisor(&data);
    let api = Api {
        c: Client::new(server.port, KEY),
    };
    with_log(&server, || {
        let s = api.state(&id);
        assert_eq!(s["state"], "hibernated", "{s}");
        assert_eq!(s["session_state"], "kept", "{s}");
        let r = api.python(&id, "print(x + 1)");
        assert_eq!(r["stdout"], "42\n", "memory lost across the restart: {r}");
        assert_eq!(api.digest(&id, "notes.txt"), sha256(b"kept by the disk\n"));
        assert_eq!(api.state(&id)["session_state"], "kept");
        // Deleted while hibernated with its memory: the image goes with it.
        api.verb(&id, "hibernate");
        assert!(image(&id).join("checkpoint.img").is_file());
        api.ok("DELETE", &format!("/v1/sandboxes/{id}"), None);
        assert!(
            !data.join("sandboxes").join(&id).exists(),
            "the sandbox's directory outlived it"
        );
    });
    let mut server = server;
    assert_eq!(
        server.stop().unwrap().rc,
        0,
        "the server did not stop cleanly"
    );
}

fn main() {
    let args = Arguments::from_args();
    let env = ampoule_session::paths::python_env_dir();
    let skip = missing(&[
        Need::Root("real sandboxes on loop-mounted disk images, in a jail"),
        Need::Tool("/usr/bin/unshare", "util-linux"),
        Need::Tool("/usr/sbin/mkfs.ext4", "e2fsprogs"),
        Need::Tool("/usr/sbin/losetup", "util-linux"),
        Need::SessionEnv(&env),
    ]);
    let runsc = match (&skip, ampoule_runtime::gvisor::find()) {
        (Some(why), _) => Some(why.clone()),
        (None, Some(_)) => None,
        (None, None) if std::env::var_os("CI").is_some() => {
            panic!("runsc is missing in CI (scripts/deps.sh installs it)")
        }
        (None, None) => Some("runsc is not installed (apt-get install runsc)".to_owned()),
    };
    let trials = vec![
        trial(
            "durable_sandboxes_pause_hibernate_and_resume_on_the_real_engine",
            durable_sandboxes_on_the_real_engine,
            skip.as_deref(),
        ),
        trial(
            "gvisor_sandboxes_hibernate_with_their_memory",
            gvisor_sandboxes_hibernate_with_their_memory,
            runsc.as_deref(),
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}
