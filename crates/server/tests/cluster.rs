//! A real cluster on one machine: three `ampoule serve` replicas (the real binary, real
//! Python sessions in real sandboxes), each in a network namespace of its own with its own
//! address (10.88.0.1–3, a veth pair to a bridge in a hub namespace the test makes; the test
//! thread and the clients it starts join the hub), one PostgreSQL database for their audit log
//! and shared state (`AMPOULE_TEST_POSTGRES_URL`, a fresh database, reached from the replicas'
//! namespaces through a Unix socket the test relays to it), `[cluster]` peers and a cluster
//! secret. Driven through different replicas: raw HTTP (`/v1`: state, files, a streamed
//! execution whose first line arrives before it ends), and the real clients, one session
//! with each call through another replica: the LangChain ACA client
//! (`tests/clients/cluster_clients.py`, venv `AMPOULE_CLIENT_VENV`), the E2B SDK
//! (`cluster_e2b.py`, venv `AMPOULE_E2B_VENV`: created through one replica, driven through
//! the others) and the MCP SDK (`cluster_mcp.py`: one MCP client per replica driving one
//! session); new sessions placed by load (a replica full, what is asked of it starts on the
//! others); a tenant's `executions_per_minute` holding across the three; one replica killed
//! (SIGKILL): the others serve their sessions at 100 %, the dead one's answer 503
//! `replica_unavailable`; started again, its durable sandbox (hibernated by the crash) is
//! served again with its files.
//!
//! Needs root (real sandboxes, namespaces); otherwise reported as ignored. Binds only
//! addresses inside the namespaces it made.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ampoule_testkit::host::{is_root, trial};
use ampoule_testkit::paths::binary;
use ampoule_testkit::serve::Serve;
use libtest_mimic::Arguments;
use serde_json::{Value, json};

const KEY_A: &str = "cluster-key-tenant-a";
const KEY_B: &str = "cluster-key-tenant-b";
const SECRET: &str = "cluster-secret-of-the-test";
/// The replicas' port (each has an address of its own).
const PORT: u16 = 8080;

/// The address of replica `i`.
fn ip(i: usize) -> String {
    format!("10.88.0.{}", i + 1)
}

/// A network namespace with a bridge (`br0`, 10.88.0.254/24) that replicas plug into: a
/// `sleep` in its own namespace, killed on drop.
struct Hub {
    child: Child,
}

impl Hub {
    fn start() -> Hub {
        let mut child = Command::new("unshare")
            .args([
                "--net",
                "/bin/sh",
                "-c",
                "set -e; ip link set lo up; ip link add br0 type bridge; \
                 ip addr add 10.88.0.254/24 dev br0; ip link set br0 up; echo ready; \
                 exec sleep 100000",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the hub namespace");
        Hub { child }
    }

    /// Moves this thread (and the processes it starts from now on) into the hub.
    fn enter(&self) {
        let ns = std::fs::File::open(format!("/proc/{}/ns/net", self.child.id())).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Relays connections to a Unix socket `dir/.s.PGSQL.5432` to PostgreSQL at `tcp` (from the
/// calling thread's namespace), so replicas in namespaces of their own reach it.
fn relay_postgres(dir: &Path, tcp: String) {
    std::fs::create_dir_all(dir).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.join(".s.PGSQL.5432")).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(a) = conn else { continue };
            let Ok(b) = TcpStream::connect(&tcp) else {
                continue;
            };
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let (mut a, mut b) = (a, b);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut a2, &mut b2);
                let _ = b2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b, &mut a);
                let _ = a.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// A fresh database on the test PostgreSQL (its server's `host:port`, its name), or None
/// (skipped, outside CI).
fn database() -> Option<(String, String)> {
    let Ok(url) = std::env::var("AMPOULE_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "AMPOULE_TEST_POSTGRES_URL is not set under CI (scripts/test.sh sets it)"
        );
        return None;
    };
    let name = format!("ampoule_cluster_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut conn)
            .await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
    });
    let (base, _) = url.rsplit_once('/').unwrap();
    let server = base.rsplit_once('@').map_or(base, |(_, h)| h);
    let server = server.trim_start_matches("postgres://").to_owned();
    Some((server, name))
}

struct Resp {
    status: u16,
    body: Vec<u8>,
    /// When each read of the body arrived, and what it held.
    chunks: Vec<(Instant, String)>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request (`Connection: close`) to `addr` with tenant A's key unless `key`.
fn http(addr: &str, method: &str, path: &str, key: &str, body: Option<Value>) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let mut chunks = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                chunks.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
                raw.extend_from_slice(&buf[..n]);
            }
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
            let len = usize::from_str_radix(String::from_utf8_lossy(&rest[..pos]).trim(), 16)
                .unwrap_or(0);
            if len == 0 || rest.len() < pos + 2 + len {
                break;
            }
            out.extend_from_slice(&rest[pos + 2..pos + 2 + len]);
            rest = &rest[(pos + 2 + len + 2).min(rest.len())..];
        }
        body = out;
    }
    Resp {
        status,
        body,
        chunks,
    }
}

fn exec(addr: &str, key: &str, id: &str, code: &str) -> Resp {
    http(
        addr,
        "POST",
        &format!("/v1/sessions/{id}/executions"),
        key,
        Some(json!({ "code": code })),
    )
}

struct Cluster {
    dir: tempfile::TempDir,
    /// The audit database's URL, as the replicas reach it.
    db: String,
    hub: Hub,
    /// Each replica and the name of its veth end in the hub.
    replicas: Vec<Option<(Serve, String)>>,
    /// Replicas started so far (names each new veth pair: an old one may linger a moment).
    started: usize,
}

impl Cluster {
    fn addr(&self, i: usize) -> String {
        format!("{}:{PORT}", ip(i))
    }

    fn config(&self, i: usize) -> PathBuf {
        let peers: Vec<String> = (0..3)
            .map(|j| format!("r{j} = \"http://{}\"", self.addr(j)))
            .collect();
        let text = format!(
            "[server]\ndata_dir = \"{data}\"\ndrain_timeout_s = 5\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_CLUSTER_KEY_A\"\n\
             [[auth.keys]]\ntenant = \"b\"\nkey_env = \"AMPOULE_CLUSTER_KEY_B\"\n\
             [audit]\nurl = \"{db}\"\n\
             [mcp]\nallowed_hosts = [\"*\"]\n\
             [tenants.b]\nexecutions_per_minute = 6\n\
             [pools.python]\nzygote = false\nwarm = 1\nmax_sessions = 8\n\
             [cluster]\nreplica = \"r{i}\"\npeers = {{ {peers} }}\n",
            data = self.dir.path().join(format!("r{i}")).display(),
            db = self.db,
            peers = peers.join(", "),
        );
        let path = self.dir.path().join(format!("r{i}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts replica `i` in a new network namespace: `eth0` with its address, the other
    /// end of the pair on the hub's bridge.
    fn start(&mut self, i: usize) {
        const WIRE: &str = r#"set -e
ip link set lo up
ip link add eth0 type veth peer name "$1" netns "$2"
ip addr add "$3/24" dev eth0
ip link set eth0 up
nsenter --net="/proc/$2/ns/net" ip link set "$1" master br0 up
shift 3
exec "$@""#;
        self.started += 1;
        let veth = format!("c{}r{i}n{}", std::process::id() % 10_000, self.started);
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "/bin/sh", "-c", WIRE, "wire", &veth])
            .arg(self.hub.child.id().to_string())
            .arg(ip(i))
            .arg(binary())
            .args(["serve", "--listen", &self.addr(i), "--config"])
            .arg(self.config(i))
            .env("AMPOULE_CLUSTER_KEY_A", KEY_A)
            .env("AMPOULE_CLUSTER_KEY_B", KEY_B)
            .env("AMPOULE_CLUSTER_SECRET", SECRET)
            .env("AMPOULE_LOG", "info")
            .env_remove("AMPOULE_REPLICA")
            .stdout(Stdio::null());
        self.replicas[i] = Some((Serve::spawn(cmd, false).unwrap(), veth));
        // Ready: its warm stock is there.
        let t = Instant::now();
        while http(&self.addr(i), "GET", "/readyz", KEY_A, None).status != 200 {
            assert!(t.elapsed() < Duration::from_secs(60), "r{i} never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some((mut s, veth)) = self.replicas[i].take() {
            s.child.kill().unwrap();
            s.child.wait().unwrap();
            // Its namespace may outlive it a moment: unplug it, so the address is free.
            let _ = Command::new("ip")
                .args(["link", "del", &veth])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// The replica holding `id` (the index its `_r<i>` ending names).
    fn holder(id: &str) -> usize {
        let (_, r) = id.rsplit_once("_r").unwrap();
        r.parse().unwrap()
    }

    /// Runs `script` (in `tests/clients/`) with `python` of a venv, the replicas' URLs as
    /// arguments; its stdout, after asserting it succeeded and printed `ok`.
    fn client(&self, python: &Path, script: &str, env: &[(&str, &str)], ok: &str) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/clients")
            .join(script);
        let out = Command::new(python)
            .arg(script)
            .args((0..3).map(|i| format!("http://{}", self.addr(i))))
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && stdout.contains(ok),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// The venv with the E2B Python SDK, if it is there.
fn e2b_venv() -> Option<PathBuf> {
    let dir = std::env::var_os("AMPOULE_E2B_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| ampoule_testkit::paths::workspace().join("target/e2b-venv"));
    let python = dir.join("bin/python");
    let has_sdk = std::fs::read_dir(dir.join("lib"))
        .ok()?
        .flatten()
        .any(|d| d.path().join("site-packages/e2b_code_interpreter").is_dir());
    (python.exists() && has_sdk).then_some(python)
}

fn three_replicas_are_one_service() {
    let Some((pg, name)) = database() else {
        eprintln!("skipped: AMPOULE_TEST_POSTGRES_URL is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Before this thread leaves the host's namespace: the relay connects from there.
    let socket_dir = dir.path().join("pg");
    relay_postgres(&socket_dir, pg);
    let db = format!(
        "postgres://ampoule@localhost/{name}?host={}&port=5432",
        socket_dir.display()
    );
    let hub = Hub::start();
    hub.enter();
    let mut c = Cluster {
        dir,
        db,
        hub,
        replicas: vec![None, None, None],
        started: 0,
    };
    for i in 0..3 {
        c.start(i);
    }
    let (a0, a1, a2) = (c.addr(0), c.addr(1), c.addr(2));

    // One /v1 session, used through every replica: state, files, streaming.
    let r = http(&a0, "POST", "/v1/sessions", KEY_A, Some(json!({})));
    assert_eq!(r.status, 201, "{}", r.text());
    let s0 = r.json()["id"].as_str().unwrap().to_owned();
    assert!(
        s0.ends_with("_r0"),
        "as much room everywhere: it stays; {s0}"
    );
    assert_eq!(exec(&a1, KEY_A, &s0, "x = 41").status, 200);
    let r = exec(
        &a2,
        KEY_A,
        &s0,
        "open('/mnt/data/n.txt', 'w').write('hi'); x + 1",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"]["text/plain"], "42", "{}", r.text());
    let r = http(
        &a1,
        "GET",
        &format!("/v1/sessions/{s0}/files/n.txt/content"),
        KEY_A,
        None,
    );
    assert_eq!((r.status, r.text().as_str()), (200, "hi"));
    let r = http(
        &a2,
        "POST",
        &format!("/v1/sessions/{s0}/executions/stream"),
        KEY_A,
        Some(
            json!({"code": "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')"}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("second"), "{}", r.text());
    let first = r
        .chunks
        .iter()
        .find(|(_, s)| s.contains("first"))
        .unwrap()
        .0;
    let last = r.chunks.last().unwrap().0;
    assert!(
        last.duration_since(first) >= Duration::from_millis(700),
        "streamed through, not buffered: {:?}",
        last.duration_since(first)
    );

    // The real clients, each call of one session through another replica.
    match ampoule_testkit::paths::client_venv("the client libraries") {
        Some(venv) => {
            let python = venv.join("bin/python");
            c.client(
                &python,
                "cluster_clients.py",
                &[("AMPOULE_API_KEY", KEY_A)],
                "cluster langchain OK",
            );
            let out = c.client(
                &python,
                "cluster_mcp.py",
                &[("AMPOULE_API_KEY", KEY_A)],
                "cluster mcp OK",
            );
            // Its session is held once, by one replica.
            let name = out
                .lines()
                .find_map(|l| l.strip_prefix("session "))
                .unwrap()
                .to_owned();
            let held: Vec<usize> = (0..3)
                .filter(|i| {
                    let r = http(&c.addr(*i), "GET", "/v1/sessions", KEY_A, None);
                    r.text().contains(&format!("\"{name}\""))
                })
                .collect();
            assert_eq!(held.len(), 1, "{name} held by {held:?}");
        }
        None => eprintln!("note: no client venv; the ACA and MCP client parts are skipped"),
    }
    match e2b_venv() {
        Some(python) => {
            let out = c.client(
                &python,
                "cluster_e2b.py",
                &[("E2B_API_KEY", KEY_A)],
                "cluster e2b OK",
            );
            let id = out
                .lines()
                .find_map(|l| l.strip_prefix("sandbox "))
                .unwrap()
                .to_owned();
            // Killed through another replica: gone from its holder.
            let r = http(
                &c.addr(Cluster::holder(&id)),
                "GET",
                &format!("/v1/sandboxes/{id}"),
                KEY_A,
                None,
            );
            assert_eq!(r.status, 404, "{}", r.text());
        }
        None => eprintln!("note: no E2B venv; the E2B client part is skipped"),
    }

    // Placement by load: replica 0 filled (names ending in `_r0` are its own, whichever
    // replica is asked); once its peers have heard, new sessions asked of it start on them.
    let mut fillers = Vec::new();
    loop {
        let r = http(
            &a1,
            "POST",
            "/v1/sessions",
            KEY_A,
            Some(json!({"identifier": format!("fill{}_r0", fillers.len())})),
        );
        if r.status == 429 {
            assert_eq!(r.json()["error"]["code"], "pool_full", "{}", r.text());
            break;
        }
        assert_eq!(r.status, 201, "{}", r.text());
        fillers.push(r.json()["id"].as_str().unwrap().to_owned());
        assert!(fillers.len() <= 8, "max_sessions is 8");
    }
    assert!(fillers.iter().all(|f| f.ends_with("_r0")), "{fillers:?}");
    // Three reports later.
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..3 {
        let r = http(&a0, "POST", "/v1/sessions", KEY_A, Some(json!({})));
        assert_eq!(r.status, 201, "placed on a peer, not refused: {}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_owned();
        assert_ne!(Cluster::holder(&id), 0, "{id}");
        assert_eq!(exec(&a0, KEY_A, &id, "1 + 1").status, 200);
        http(&a0, "DELETE", &format!("/v1/sessions/{id}"), KEY_A, None);
    }
    for f in &fillers {
        let r = http(&a2, "DELETE", &format!("/v1/sessions/{f}"), KEY_A, None);
        assert!(r.status < 300, "{}", r.text());
    }

    // Tenant b's executions_per_minute (6) holds across the three replicas together.
    let mut b_sessions = Vec::new();
    for i in 0..3 {
        let r = http(&c.addr(i), "POST", "/v1/sessions", KEY_B, Some(json!({})));
        assert_eq!(r.status, 201, "{}", r.text());
        b_sessions.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    let mut statuses = Vec::new();
    for round in 0..4 {
        for (i, s) in b_sessions.iter().enumerate() {
            statuses.push(exec(&c.addr((i + round) % 3), KEY_B, s, "1").status);
        }
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        6,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        6,
        "{statuses:?}"
    );

    // A durable sandbox, with a file, on the replica placement chose (k).
    let r = http(
        &a2,
        "POST",
        "/v1/sandboxes",
        KEY_A,
        Some(json!({"lifecycle": {"durable": true}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let sbx = r.json()["id"].as_str().unwrap().to_owned();
    let k = Cluster::holder(&sbx);
    let others: Vec<usize> = (0..3).filter(|i| *i != k).collect();
    let r = http(
        &c.addr(others[0]),
        "POST",
        &format!("/v1/sandboxes/{sbx}/executions"),
        KEY_A,
        Some(json!({"code": "open('/mnt/data/keep.txt', 'w').write('kept')"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // A session on each of the others.
    let live: Vec<String> = others
        .iter()
        .map(|o| {
            let r = http(
                &a0,
                "POST",
                "/v1/sessions",
                KEY_A,
                Some(json!({"identifier": format!("live_r{o}")})),
            );
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()["id"].as_str().unwrap().to_owned()
        })
        .collect();

    // Replica k dies: the others serve theirs at 100 %; its sandbox answers 503.
    c.kill(k);
    let vias: Vec<String> = others.iter().map(|o| c.addr(*o)).collect();
    for via in &vias {
        let r = http(via, "GET", &format!("/v1/sandboxes/{sbx}"), KEY_A, None);
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(
            r.json()["error"]["code"],
            "replica_unavailable",
            "{}",
            r.text()
        );
    }
    let mut ok = 0;
    for i in 0..20 {
        for via in &vias {
            for s in &live {
                let r = exec(via, KEY_A, s, &format!("{i} + 1"));
                assert_eq!(r.status, 200, "{}", r.text());
                ok += 1;
            }
        }
    }
    assert_eq!(ok, 80);
    // New sessions asked of the others start on them, not on the dead one.
    for via in &vias {
        let r = http(via, "POST", "/v1/sessions", KEY_A, Some(json!({})));
        assert_eq!(r.status, 201, "{}", r.text());
        assert_ne!(Cluster::holder(r.json()["id"].as_str().unwrap()), k);
    }

    // Back up (same address, a new namespace): its durable sandbox is served again, with
    // its file.
    c.start(k);
    let r = http(
        &vias[0],
        "POST",
        &format!("/v1/sandboxes/{sbx}/executions"),
        KEY_A,
        Some(json!({"code": "open('/mnt/data/keep.txt').read()"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("kept"), "{}", r.text());

    // The audit chain (one, shared) verifies from any replica.
    for i in 0..3 {
        let r = http(&c.addr(i), "GET", "/v1/audit/verify", KEY_A, None);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["ok"], true, "{}", r.text());
    }
    for i in 0..3 {
        if let Some((s, _)) = c.replicas[i].take() {
            assert!(s.stop().unwrap().success());
        }
    }
}

fn main() {
    let args = Arguments::from_args();
    let root = (!is_root()).then_some("needs root (real sandboxes, network namespaces)");
    let trials = vec![trial(
        "three_replicas_are_one_service",
        three_replicas_are_one_service,
        root,
    )];
    libtest_mimic::run(&args, trials).exit();
}
