//! Durable sandboxes survive the server: `ampoule serve` (the real binary, in a throw-away
//! jail, port 18080 of the jail's own network namespace) with 20 durable sandboxes — running,
//! paused and hibernated, each with files and a background process — is killed with SIGKILL.
//! While it is down nothing of theirs is left on the host (no process, no loop device holding
//! a disk image, no cgroup); started again it lists all 20 as hibernated, and each resumes on
//! the next call with its files byte for byte (their memory is lost, and said so).
//!
//! Needs root, loop devices and mkfs.ext4; otherwise ignored with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ampoule_testkit::host::{is_root, trial};
use ampoule_testkit::http::Client;
use ampoule_testkit::jail;
use libtest_mimic::Arguments;
use serde_json::{Value, json};

const KEY: &str = "durable-test-key";
const PORT: u16 = 18080;
const SANDBOXES: usize = 20;

/// Serves until `$T/kill`, kills the server with SIGKILL, says `$T/killed`; serves again on
/// `$T/restart` until `$T/stop`.
const SCRIPT: &str = r#"
BIN="$1"; CONFIG="$2"
wait_for() { while [ ! -f "$T/$1" ]; do sleep 0.05; done; }
"$BIN" serve --listen 127.0.0.1:18080 --config "$CONFIG" 2>"$T/serve1.log" &
echo $! > "$T/serve1.pid"
wait_for kill
kill -9 "$(cat "$T/serve1.pid")"
wait "$(cat "$T/serve1.pid")" || true
touch "$T/killed"
wait_for restart
"$BIN" serve --listen 127.0.0.1:18080 --config "$CONFIG" 2>"$T/serve2.log" &
echo $! > "$T/serve2.pid"
wait_for stop
kill -TERM "$(cat "$T/serve2.pid")"
wait "$(cat "$T/serve2.pid")" || true
"#;

fn wait_file(t: &Path, name: &str, within: Duration) {
    let t0 = Instant::now();
    while !t.join(name).exists() {
        assert!(t0.elapsed() < within, "no {name} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_listening(c: &Client, t: &Path, log: &str) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", c.port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the server did not listen: {}",
            std::fs::read_to_string(t.join(log)).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ok(c: &Client, method: &str, path: &str, body: Option<Value>) -> Value {
    c.ok(method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Runs Python in the sandbox; its stdout.
fn python(c: &Client, id: &str, code: &str) -> String {
    let r = ok(
        c,
        "POST",
        &format!("/v1/sandboxes/{id}/executions"),
        Some(json!({ "code": code })),
    );
    assert_eq!(r["status"], "succeeded", "{r}");
    r["stdout"].as_str().unwrap_or_default().trim().to_owned()
}

const DIGEST: &str = "import hashlib\n\
    print(hashlib.sha256(open('/mnt/data/blob','rb').read() + open('/tmp/t','rb').read()).hexdigest())";

/// The direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().nth(1))
                        .and_then(|x| x.parse::<u32>().ok())
                })
                == Some(pid)
        })
        .collect();
    out.sort_unstable();
    out
}

/// Every process below `pid` (not itself).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent: BTreeMap<u32, u32> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
            && let Some(pp) = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|x| x.parse().ok())
        {
            parent.insert(p, pp);
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (&c, &pp) in &parent {
            if pp == p {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// The sandbox cgroup directories these processes are in, with their inode numbers (a
/// directory of the same name made later for another sandbox has another).
fn sandbox_cgroups(pids: &[u32]) -> BTreeMap<PathBuf, u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    for p in pids {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{p}/cgroup")) else {
            continue;
        };
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, ctl, path) = (parts.next(), parts.next(), parts.next());
            let (Some(ctl), Some(path)) = (ctl, path) else {
                continue;
            };
            if !path.contains("/ampoule/sbx-") {
                continue;
            }
            let ctl = ctl.split(',').next().unwrap_or_default();
            let base = if ctl.is_empty() {
                PathBuf::from("/sys/fs/cgroup")
            } else if Path::new("/sys/fs/cgroup").join(ctl).exists() {
                Path::new("/sys/fs/cgroup").join(ctl)
            } else {
                continue;
            };
            let dir = base.join(path.trim_start_matches('/'));
            if let Ok(m) = std::fs::metadata(&dir) {
                out.insert(dir, m.ino());
            }
        }
    }
    out
}

/// The jail, killed (with everything in it) when the test ends, even by a panic.
struct Jail(std::process::Child);

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn a_killed_server_leaves_nothing_and_its_sandboxes_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().to_path_buf();
    let data = t.join("data");
    let config = t.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_DURABLE_KEY\"\n\
             [pools.python]\nwarm = 0\nmax_sessions = 40\n\
             [pools.python.limits]\ndisk_mib = 64\ndisk_inodes = 4096\n",
            data.display()
        ),
    )
    .unwrap();
    let jail = jail::command(&format!("{}{SCRIPT}", jail::PRELUDE))
        .arg(ampoule_testkit::paths::binary())
        .arg(&config)
        .env("JAIL_T", &t)
        .env("AMPOULE_DURABLE_KEY", KEY)
        .env("AMPOULE_LOG", "info")
        .spawn()
        .unwrap();
    let mut jail = Jail(jail);
    // `unshare` makes its namespaces right after it starts: wait until it has.
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let t0 = Instant::now();
    while std::fs::read_link(format!("/proc/{}/ns/net", jail.0.id())).ok() == Some(ours.clone()) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the jail has no network namespace"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let netns = std::fs::File::open(format!("/proc/{}/ns/net", jail.0.id())).unwrap();
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let c = Client::new(PORT, KEY);
    eprintln!("durable: in the jail's network; waiting for the server");
    wait_listening(&c, &t, "serve1.log");
    eprintln!("durable: creating {SANDBOXES} sandboxes");

    let mut ids = Vec::new();
    let mut digests = BTreeMap::new();
    for n in 0..SANDBOXES {
        let s = ok(
            &c,
            "POST",
            "/v1/sandboxes",
            Some(json!({ "timeout_s": 3600, "lifecycle": { "durable": true } })),
        );
        let id = s["id"].as_str().unwrap().to_owned();
        assert_eq!(s["durable"], true, "{s}");
        let digest = python(
            &c,
            &id,
            &format!(
                "import os\nopen('/mnt/data/blob','wb').write(os.urandom(1 << 20))\n\
                 open('/tmp/t','w').write('sandbox {n}')\n{DIGEST}"
            ),
        );
        ok(
            &c,
            "POST",
            &format!("/v1/sandboxes/{id}/processes"),
            Some(json!({ "cmd": "sleep 1000", "background": true })),
        );
        digests.insert(id.clone(), digest);
        ids.push(id);
    }
    for id in &ids[..5] {
        let s = ok(&c, "POST", &format!("/v1/sandboxes/{id}/pause"), None);
        assert_eq!(s["state"], "paused", "{s}");
    }
    for id in &ids[5..10] {
        let s = ok(&c, "POST", &format!("/v1/sandboxes/{id}/hibernate"), None);
        assert_eq!(s["state"], "hibernated", "{s}");
    }

    // What the server and its sandboxes are on the host, before the kill.
    // Everything below the jail's shell (which lives on): the server, its undertaker, the
    // sandboxes and their processes.
    let jail_sh = children(jail.0.id())[0];
    let before: Vec<u32> = children(jail_sh)
        .into_iter()
        .flat_map(|p| std::iter::once(p).chain(descendants(p)))
        .collect();
    assert!(before.len() > SANDBOXES, "too few processes: {before:?}");
    let cgroups = sandbox_cgroups(&before);
    assert!(
        cgroups.len() >= 15,
        "sandbox cgroups not found: {cgroups:?}"
    );
    eprintln!("durable: killing the server");
    std::fs::write(t.join("kill"), "").unwrap();
    wait_file(&t, "killed", Duration::from_secs(30));

    // While it is down: no process, loop device or cgroup of theirs.
    let t0 = Instant::now();
    loop {
        let alive: Vec<u32> = before
            .iter()
            .copied()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        let cg_left: Vec<&PathBuf> = cgroups
            .iter()
            .filter(|(d, ino)| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(d).is_ok_and(|m| m.ino() == **ino)
            })
            .map(|(d, _)| d)
            .collect();
        let loops: Vec<&String> = ids
            .iter()
            .filter(|id| {
                ampoule_runtime::disk::in_use(&data.join("sandboxes").join(id).join("disk.img"))
            })
            .collect();
        if alive.is_empty() && cg_left.is_empty() && loops.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "left on the host while the server was down: processes {alive:?}, cgroups \
             {cg_left:?}, disks held by loop devices {loops:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for id in &ids {
        let dir = data.join("sandboxes").join(id);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        assert_eq!(mode(&dir.join("disk.img")), 0o600);
        assert_eq!(mode(&dir.join("sandbox.json")), 0o600);
    }

    eprintln!("durable: nothing left; starting the server again");
    std::fs::write(t.join("restart"), "").unwrap();
    wait_listening(&c, &t, "serve2.log");
    let listed = ok(&c, "GET", "/v1/sandboxes", None);
    let listed = listed
        .as_array()
        .or_else(|| listed["sandboxes"].as_array())
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed.len(), SANDBOXES, "{listed:?}");
    assert!(
        listed.iter().all(|s| s["state"] == "hibernated"),
        "{listed:?}"
    );
    for id in &ids {
        assert_eq!(&python(&c, id, DIGEST), &digests[id], "{id}: files changed");
        let s = ok(&c, "GET", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(s["session_state"], "lost", "{s}");
    }
    std::fs::write(t.join("stop"), "").unwrap();
    let t0 = Instant::now();
    while jail.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the jail did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    let args = Arguments::from_args();
    let skip = if !is_root() {
        Some("needs root".to_owned())
    } else {
        ampoule_runtime::disk::check(true).err()
    };
    libtest_mimic::run(
        &args,
        vec![trial(
            "a_killed_server_leaves_nothing_and_its_sandboxes_come_back",
            a_killed_server_leaves_nothing_and_its_sandboxes_come_back,
            skip.as_deref(),
        )],
    )
    .exit();
}
