//! Replicas that route to each other (fake engine, real listeners on loopback): three
//! servers with the routing layer of `[cluster]`. A session made on one is used through the
//! others — state, files and a streamed execution (whose first line arrives before it ends:
//! streamed through, not buffered) —; a forwarded request without the secret is refused, one
//! with it is never forwarded again; when a replica stops, its sessions answer 503
//! `replica_unavailable` through the others while theirs keep working, every call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ampoule_server::Config;
use ampoule_server::cluster::{Cluster, FORWARDED};
use ampoule_server::config::sha256_hex;
use ampoule_server::fake::FakeEngine;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "key-of-tenant-a";
const SECRET: &str = "a-cluster-secret-for-tests";

struct Replica {
    addr: String,
    cluster: Arc<Cluster>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// `n` replicas whose pool holds `max_sessions` each. Their peers' capacity is asked only
/// when a test says ([`Cluster::refresh_loads`]): until then every new session stays where
/// it was asked for.
async fn replicas(n: usize, max_sessions: usize) -> Vec<Replica> {
    let listeners: Vec<tokio::net::TcpListener> = {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        v
    };
    let peers: BTreeMap<String, String> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            (
                format!("ampoule-{i}"),
                format!("http://{}", l.local_addr().unwrap()),
            )
        })
        .collect();
    let mut out = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(&format!(
            "[server]\ndata_dir = \"{}\"\n[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
             [pools.python]\nwarm = 0\nmax_sessions = {max_sessions}\n",
            dir.path().join("data").display(),
            sha256_hex(A),
        ))
        .unwrap();
        let keys = ampoule_server::serve::keys(&cfg).unwrap();
        let state = ampoule_server::serve::state(&cfg, Arc::new(FakeEngine::new(dir.path())), keys)
            .unwrap();
        let cluster = Arc::new(
            Cluster::new(&format!("ampoule-{i}"), &peers, SECRET)
                .unwrap()
                .with_manager(state.manager.clone(), 1 << 20),
        );
        state.manager.set_replica(&cluster.token).unwrap();
        let app = ampoule_server::app(state).layer(axum::middleware::from_fn_with_state(
            cluster.clone(),
            ampoule_server::cluster::route,
        ));
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        out.push(Replica {
            addr,
            cluster,
            task,
            _dir: dir,
        });
    }
    out
}

/// A raw HTTP/1.1 request; the status, the raw response and when each byte arrived.
async fn raw(
    addr: &str,
    method: &str,
    path: &str,
    extra: &str,
    body: &str,
) -> (u16, String, Vec<(Instant, String)>) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {A}\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let mut chunks = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        let s = String::from_utf8_lossy(&buf[..n]).into_owned();
        chunks.push((Instant::now(), s.clone()));
        out.push_str(&s);
    }
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, out, chunks)
}

async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (st, out, _) = raw(addr, method, path, "", body).await;
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (st, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn new_session(addr: &str) -> String {
    let (st, s) = http(addr, "POST", "/v1/sessions", "{}").await;
    assert_eq!(st, 201, "{s}");
    s["id"].as_str().unwrap().to_owned()
}

async fn exec(addr: &str, id: &str, code: &str) -> (u16, Value) {
    let body = serde_json::json!({ "code": code }).to_string();
    http(
        addr,
        "POST",
        &format!("/v1/sessions/{id}/executions"),
        &body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_each_others_sessions_and_a_stopped_one_answers_replica_unavailable() {
    let r = replicas(3, 100).await;
    let (a, b, c) = (&r[0].addr, &r[1].addr, &r[2].addr);

    // A session made on replica 0 names it, and is one session through every replica.
    let s0 = new_session(a).await;
    assert!(s0.ends_with("_ampoule0"), "{s0}");
    assert_eq!(exec(b, &s0, "x = 41").await.0, 200);
    let (st, out) = exec(c, &s0, "x + 1").await;
    assert_eq!(
        (st, out["result"]["text/plain"].clone()),
        (200, Value::from("42")),
        "{out}"
    );
    assert_eq!(exec(c, &s0, "write note.txt hello").await.0, 200);
    let (st, out) = exec(b, &s0, "read note.txt").await;
    assert_eq!(st, 200, "{out}");
    assert!(out["stdout"].as_str().unwrap().contains("hello"), "{out}");
    let (st, files) = http(a, "GET", &format!("/v1/sessions/{s0}/files"), "").await;
    assert_eq!(st, 200);
    assert!(files.to_string().contains("note.txt"), "{files}");
    let (st, got) = http(c, "GET", &format!("/v1/sessions/{s0}"), "").await;
    assert_eq!((st, got["id"].as_str()), (200, Some(s0.as_str())), "{got}");

    // A streamed execution through another replica arrives as it runs.
    let body = serde_json::json!({ "code": "print('first')\nsleep 1\nprint('second')" });
    let (st, out, chunks) = raw(
        b,
        "POST",
        &format!("/v1/sessions/{s0}/executions/stream"),
        "",
        &body.to_string(),
    )
    .await;
    assert_eq!(st, 200, "{out}");
    assert!(out.contains("second"), "{out}");
    let first = chunks.iter().find(|(_, s)| s.contains("first")).unwrap().0;
    let last = chunks.last().unwrap().0;
    assert!(
        last.duration_since(first) >= Duration::from_millis(700),
        "the first line came {:?} before the end: buffered",
        last.duration_since(first)
    );

    // The cluster secret: a forged forward is refused; a real one is served where it lands.
    let (st, out, _) = raw(
        b,
        "GET",
        &format!("/v1/sessions/{s0}"),
        &format!("{FORWARDED}: not-the-secret\r\n"),
        "",
    )
    .await;
    assert_eq!(st, 401, "{out}");
    let (st, out, _) = raw(
        b,
        "GET",
        &format!("/v1/sessions/{s0}"),
        &format!("{FORWARDED}: {SECRET}\r\n"),
        "",
    )
    .await;
    assert_eq!(st, 404, "never forwarded again: {out}");

    // ACA identifiers are the client's: every replica sends one to the same owner, so a
    // conversation keeps its state whichever replica each call reaches.
    for n in 0..6 {
        let ident = format!("conversation-{n}");
        let mut last = Value::Null;
        for (i, via) in [a, b, c].into_iter().enumerate() {
            let code = if i == 0 {
                "x = 5".to_owned()
            } else {
                format!("x = x * 2\nx + {i}")
            };
            let body = serde_json::json!({"properties": {"codeInputType": "inline",
                "executionType": "synchronous", "code": code}});
            let (st, out) = http(
                via,
                "POST",
                &format!("/code/execute?identifier={ident}&api-version=2024-02-02-preview"),
                &body.to_string(),
            )
            .await;
            assert_eq!(st, 200, "{out}");
            last = out["properties"]["result"].clone();
        }
        // 5 → 10 (+1) → 20 (+2): one session, whichever replica each call reached.
        assert_eq!(last, 22, "{ident}");
    }
    // Each conversation is held once, and they are spread over the replicas.
    let mut held = Vec::new();
    for via in [a, b, c] {
        let (st, list) = http(via, "GET", "/v1/sessions", "").await;
        assert_eq!(st, 200, "{list}");
        held.push(list.to_string().matches("conversation-").count());
    }
    assert_eq!(held.iter().sum::<usize>(), 6, "{held:?}");
    assert!(held.iter().filter(|n| **n > 0).count() >= 2, "{held:?}");

    // Replica 0 stops: its sessions answer 503 replica_unavailable through the others, and
    // the others' sessions keep working, every call.
    let s1 = new_session(b).await;
    let s2 = new_session(c).await;
    r[0].task.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for via in [b, c] {
        let (st, e) = exec(via, &s0, "1").await;
        assert_eq!(st, 503, "{e}");
        assert_eq!(e["error"]["code"], "replica_unavailable", "{e}");
    }
    let mut ok = 0;
    for i in 0..20 {
        for (via, s) in [(b, &s2), (c, &s1), (b, &s1), (c, &s2)] {
            let (st, out) = exec(via, s, &format!("{i} + 1")).await;
            assert_eq!(st, 200, "{out}");
            ok += 1;
        }
    }
    assert_eq!(ok, 80);
}

/// Calls an MCP tool on `addr`: the tool result's JSON (its first text content, parsed)
/// and whether it is an error.
async fn mcp_tool(addr: &str, tool: &str, args: Value) -> (Value, bool) {
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": args}});
    let (st, out, _) = raw(
        addr,
        "POST",
        "/mcp",
        "Accept: application/json, text/event-stream\r\n",
        &body.to_string(),
    )
    .await;
    assert_eq!(st, 200, "{out}");
    let json = &out[out.find("\r\n\r\n").unwrap() + 4..];
    let json = &json[json.find('{').unwrap()..=json.rfind('}').unwrap()];
    let reply: Value = serde_json::from_str(json).unwrap();
    let result = &reply["result"];
    let text = result["content"][0]["text"].as_str().unwrap_or_default();
    (
        serde_json::from_str(text).unwrap_or_else(|_| Value::from(text)),
        result["isError"] == true,
    )
}

/// The replica token an id or generated name ends in.
fn holder(id: &str) -> &str {
    id.rsplit_once('_').unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_go_to_the_replica_with_the_most_room() {
    let r = replicas(3, 4).await;
    let (a, b) = (&r[0].addr, &r[1].addr);
    let refresh = || async {
        for x in &r {
            x.cluster.refresh_loads().await;
        }
    };

    // Each replica reports its capacity to its peers only.
    let (st, out, _) = raw(a, "GET", "/cluster/v1/capacity", "", "").await;
    assert_eq!(st, 401, "{out}");
    let (st, out, _) = raw(
        a,
        "GET",
        "/cluster/v1/capacity",
        &format!("{FORWARDED}: {SECRET}\r\n"),
        "",
    )
    .await;
    assert_eq!(st, 200, "{out}");
    assert!(out.contains(r#""free":{"python":4}"#), "{out}");

    // No report from the peers yet: a new session stays where it was asked for. Replica 0
    // fills up so.
    for _ in 0..4 {
        assert_eq!(holder(&new_session(a).await), "ampoule0");
    }
    // As much room as the most elsewhere: it stays too.
    refresh().await;
    assert_eq!(holder(&new_session(b).await), "ampoule1");

    // Replica 0 is full: what is asked of it starts where there is most room (each
    // placement counted against the chosen one's last report, so they spread), through
    // every door that starts one: /v1 sessions, /v1 sandboxes, E2B's create, an MCP tool
    // without a session.
    refresh().await;
    let mut placed = vec![new_session(a).await, new_session(a).await];
    refresh().await;
    let (st, sbx) = http(a, "POST", "/v1/sandboxes", "{}").await;
    assert_eq!(st, 201, "{sbx}");
    placed.push(sbx["id"].as_str().unwrap().to_owned());
    refresh().await;
    let (st, e2b) = http(a, "POST", "/sandboxes", r#"{"templateID": "python"}"#).await;
    assert_eq!(st, 201, "{e2b}");
    placed.push(e2b["sandboxID"].as_str().unwrap().to_owned());
    // An MCP tool without a session starts one on the replica with room; its generated
    // name names that replica, so the next call through replica 0 finds the same session.
    refresh().await;
    let (out, err) = mcp_tool(a, "execute_code", serde_json::json!({"code": "x = 41"})).await;
    assert!(!err, "{out}");
    let session = out["session"].as_str().unwrap().to_owned();
    placed.push(session.clone());
    let (out, err) = mcp_tool(
        a,
        "execute_code",
        serde_json::json!({"code": "x + 1", "session": session}),
    )
    .await;
    assert!(!err, "{out}");
    assert_eq!(out["result"], "42", "{out}");
    // 4 + 1 slots were free on 1 and 2 (replica 1 held one): 1 + 2 + 2 taken, 1 left each.
    let on = |t: &str| placed.iter().filter(|id| holder(id) == t).count();
    assert_eq!(
        (on("ampoule0"), on("ampoule1"), on("ampoule2")),
        (0, 2, 3),
        "{placed:?}"
    );

    // Replica 1 stops before its peers notice: replica 0 asks it first (as much room as
    // replica 2, and named first), gets no answer, and starts the session on replica 2.
    refresh().await;
    r[1].task.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(holder(&new_session(a).await), "ampoule2");
    // No room left anywhere that answers: here, which is full.
    let (st, out) = http(a, "POST", "/v1/sessions", "{}").await;
    assert_eq!(st, 429, "{out}");
    assert_eq!(out["error"]["code"], "pool_full", "{out}");
}
