//! A real cluster on one machine: three `ampoule serve` replicas (the real binary, real
//! Python sessions in real sandboxes), each on its own loopback address (127.0.0.2–4), one
//! PostgreSQL database for their audit log and shared state (`AMPOULE_TEST_POSTGRES_URL`, a
//! fresh database), `[cluster]` peers and a cluster secret. Driven through different replicas:
//! raw HTTP (`/v1`: state, files, a streamed execution whose first line arrives before it
//! ends) and the real LangChain ACA client (`tests/clients/cluster_clients.py`, venv
//! `AMPOULE_CLIENT_VENV`), one session id with each call through another replica; a tenant's
//! `executions_per_minute` holding across the three; one replica killed (SIGKILL): the others
//! serve their sessions at 100 %, the dead one's answer 503 `replica_unavailable`; started
//! again, its durable sandbox (hibernated by the crash) is served again with its files.
//!
//! Needs root (real sandboxes); otherwise reported as ignored. Binds only loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ampoule_testkit::host::{is_root, trial};
use ampoule_testkit::paths::binary;
use ampoule_testkit::serve::Serve;
use libtest_mimic::Arguments;
use serde_json::{Value, json};

const KEY_A: &str = "cluster-key-tenant-a";
const KEY_B: &str = "cluster-key-tenant-b";
const SECRET: &str = "cluster-secret-of-the-test";
const IPS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

/// A port free on the three addresses.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if IPS[1..]
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
}

/// A fresh database on the test PostgreSQL, or None (skipped, outside CI).
fn database() -> Option<String> {
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
    Some(format!("{base}/{name}"))
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
    port: u16,
    db: String,
    replicas: Vec<Option<Serve>>,
}

impl Cluster {
    fn addr(&self, i: usize) -> String {
        format!("{}:{}", IPS[i], self.port)
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
             [tenants.b]\nexecutions_per_minute = 6\n\
             [pools.python]\nzygote = false\nwarm = 1\n\
             [cluster]\nreplica = \"r{i}\"\npeers = {{ {peers} }}\n",
            data = self.dir.path().join(format!("r{i}")).display(),
            db = self.db,
            peers = peers.join(", "),
        );
        let path = self.dir.path().join(format!("r{i}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&mut self, i: usize) {
        let mut cmd = Command::new(binary());
        cmd.args(["serve", "--listen", &self.addr(i), "--config"])
            .arg(self.config(i))
            .env("AMPOULE_CLUSTER_KEY_A", KEY_A)
            .env("AMPOULE_CLUSTER_KEY_B", KEY_B)
            .env("AMPOULE_CLUSTER_SECRET", SECRET)
            .env("AMPOULE_LOG", "info")
            .env_remove("AMPOULE_REPLICA")
            .stdout(Stdio::null());
        self.replicas[i] = Some(Serve::spawn(cmd, false).unwrap());
        // Ready: its warm stock is there.
        let t = Instant::now();
        while http(&self.addr(i), "GET", "/readyz", KEY_A, None).status != 200 {
            assert!(t.elapsed() < Duration::from_secs(60), "r{i} never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut s) = self.replicas[i].take() {
            s.child.kill().unwrap();
            s.child.wait().unwrap();
        }
    }
}

fn three_replicas_are_one_service() {
    let Some(db) = database() else {
        eprintln!("skipped: AMPOULE_TEST_POSTGRES_URL is not set");
        return;
    };
    let mut c = Cluster {
        dir: tempfile::tempdir().unwrap(),
        port: free_port(),
        db,
        replicas: vec![None, None, None],
    };
    for i in 0..3 {
        c.start(i);
    }
    let (a0, a1, a2) = (c.addr(0), c.addr(1), c.addr(2));

    // One /v1 session, used through every replica: state, files, streaming.
    let r = http(&a0, "POST", "/v1/sessions", KEY_A, Some(json!({})));
    assert_eq!(r.status, 201, "{}", r.text());
    let s0 = r.json()["id"].as_str().unwrap().to_owned();
    assert!(s0.ends_with("_r0"), "{s0}");
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

    // The real ACA client: one session id, each call through another replica.
    match ampoule_testkit::paths::client_venv("the client libraries") {
        Some(venv) => {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/cluster_clients.py");
            let out = Command::new(venv.join("bin/python"))
                .arg(script)
                .args((0..3).map(|i| format!("http://{}", c.addr(i))))
                .env("AMPOULE_API_KEY", KEY_A)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("cluster langchain OK"),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => eprintln!("note: no client venv; the ACA client part is skipped"),
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

    // A durable sandbox on replica 2, with a file.
    let r = http(
        &a2,
        "POST",
        "/v1/sandboxes",
        KEY_A,
        Some(json!({"lifecycle": {"durable": true}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let sbx = r.json()["id"].as_str().unwrap().to_owned();
    assert!(sbx.ends_with("_r2"), "{sbx}");
    let r = http(
        &a0,
        "POST",
        &format!("/v1/sandboxes/{sbx}/executions"),
        KEY_A,
        Some(json!({"code": "open('/mnt/data/keep.txt', 'w').write('kept')"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = http(&a1, "POST", "/v1/sessions", KEY_A, Some(json!({})));
    let s1 = r.json()["id"].as_str().unwrap().to_owned();

    // Replica 2 dies: the others serve theirs at 100 %; its sandbox answers 503.
    c.kill(2);
    for via in [&a0, &a1] {
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
        for (via, s) in [(&a0, &s1), (&a1, &s0), (&a0, &s0), (&a1, &s1)] {
            let r = exec(via, KEY_A, s, &format!("{i} + 1"));
            assert_eq!(r.status, 200, "{}", r.text());
            ok += 1;
        }
    }
    assert_eq!(ok, 80);

    // Back up: its durable sandbox is served again, with its file.
    c.start(2);
    let r = http(
        &a0,
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
        if let Some(s) = c.replicas[i].take() {
            assert!(s.stop().unwrap().success());
        }
    }
}

fn main() {
    let args = Arguments::from_args();
    let root = (!is_root()).then_some("needs root (real sandboxes with their own uids)");
    let trials = vec![trial(
        "three_replicas_are_one_service",
        three_replicas_are_one_service,
        root,
    )];
    libtest_mimic::run(&args, trials).exit();
}
