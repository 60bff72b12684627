//! Graceful drain (fake engine, a real listener): `/readyz` answers 503 `warming` until the
//! warm stock is filled, then 200; on the stop signal it answers 503 `draining` at once, new
//! sessions and sandboxes are refused with 503 `shutting_down`, the sessions held keep being
//! served and a running execution finishes with its output; then the server stops, a durable
//! sandbox hibernated (the next start lists it). And a drain timeout ends an execution that
//! would outlive it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ampoule_server::Config;
use ampoule_server::config::sha256_hex;
use ampoule_server::fake::FakeEngine;
use serde_json::Value;

const A: &str = "key-of-tenant-a";

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn config(data: &std::path::Path, warm: usize, drain_s: f64) -> Config {
    Config::parse(&format!(
        "[server]\ndata_dir = \"{}\"\ndrain_timeout_s = {drain_s}\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n[pools.python]\nwarm = {warm}\n",
        data.display(),
        sha256_hex(A),
    ))
    .unwrap()
}

/// A server on `listen` over the fake engine in `root`, stopped when `stop` is sent.
fn start(
    cfg: &Config,
    root: &std::path::Path,
    listen: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), ampoule_server::Error>>,
) {
    let keys = ampoule_server::serve::keys(cfg).unwrap();
    let state = ampoule_server::serve::state(cfg, Arc::new(FakeEngine::new(root)), keys).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (cfg, listen) = (cfg.clone(), listen.to_owned());
    let task = tokio::spawn(async move {
        ampoule_server::serve::serve_with(&cfg, Some(&listen), state, async {
            let _ = rx.await;
        })
        .await
    });
    (tx, task)
}

/// A raw HTTP/1.1 request (`Connection: close`); the status and the body as JSON (`Null`
/// when not JSON); status 0 when the connection closed without an answer.
async fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {A}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    let Some(status) = out.get(9..12).and_then(|s| s.parse().ok()) else {
        return (0, Value::Null);
    };
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn wait_listening(addr: &str) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never listened on {addr}");
}

/// Polls `/readyz` until it answers `want` (at most 10 s); the last body.
async fn readyz_until(addr: &str, want: u16) -> Value {
    let mut last = Value::Null;
    for _ in 0..1000 {
        let (st, body) = http(addr, "GET", "/readyz", None).await;
        if st == want {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("/readyz never answered {want}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_drains_running_executions_refuses_new_sessions_and_hibernates() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let cfg = config(&data, 1, 30.0);
    let listen = free_port();
    let (stop, served) = start(&cfg, root.path(), &listen);
    wait_listening(&listen).await;

    // Ready once the warm stock is there.
    let body = readyz_until(&listen, 200).await;
    assert_eq!(body["status"], "ready");
    assert_eq!(body["ready"]["python"], 1, "{body}");

    let (st, s) = http(&listen, "POST", "/v1/sessions", Some("{}")).await;
    assert_eq!(st, 201, "{s}");
    let session = s["id"].as_str().unwrap().to_owned();
    let (st, sb) = http(
        &listen,
        "POST",
        "/v1/sandboxes",
        Some(r#"{"lifecycle": {"durable": true}}"#),
    )
    .await;
    assert_eq!(st, 201, "{sb}");
    let sandbox = sb["id"].as_str().unwrap().to_owned();
    let (st, r) = http(
        &listen,
        "POST",
        &format!("/v1/sandboxes/{sandbox}/executions"),
        Some(r#"{"code": "write kept.txt survived"}"#),
    )
    .await;
    assert_eq!(st, 200, "{r}");

    // An execution that is running when the stop comes.
    let running = {
        let (listen, session) = (listen.clone(), session.clone());
        tokio::spawn(async move {
            http(
                &listen,
                "POST",
                &format!("/v1/sessions/{session}/executions"),
                Some(r#"{"code": "sleep 2\nprint('finished')"}"#),
            )
            .await
        })
    };
    let begun = Instant::now();
    let mut busy = false;
    for _ in 0..500 {
        let (_, pools) = http(&listen, "GET", "/v1/pools", None).await;
        if pools.to_string().contains("\"busy\":1") {
            busy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(busy, "the execution never ran");
    stop.send(()).unwrap();

    // Readiness goes false at once; new sessions and sandboxes are refused, clearly.
    let body = readyz_until(&listen, 503).await;
    assert_eq!(body["status"], "draining", "{body}");
    let (st, e) = http(&listen, "POST", "/v1/sessions", Some("{}")).await;
    assert_eq!(st, 503, "{e}");
    assert_eq!(e["error"]["code"], "shutting_down", "{e}");
    let (st, e) = http(&listen, "POST", "/v1/sandboxes", Some("{}")).await;
    assert_eq!(st, 503, "{e}");
    assert_eq!(e["error"]["code"], "shutting_down", "{e}");
    // The sessions held are still served while draining.
    let (st, g) = http(&listen, "GET", &format!("/v1/sessions/{session}"), None).await;
    assert_eq!(st, 200, "{g}");

    // The running execution finishes, with its output.
    let (st, r) = running.await.unwrap();
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(r["stdout"].as_str().unwrap().contains("finished"), "{r}");
    assert!(begun.elapsed() >= Duration::from_secs(2));
    served.await.unwrap().unwrap();

    // The durable sandbox was hibernated: the next start lists it and brings it back.
    let listen = free_port();
    let (stop, served) = start(&cfg, root.path(), &listen);
    wait_listening(&listen).await;
    let (st, g) = http(&listen, "GET", &format!("/v1/sandboxes/{sandbox}"), None).await;
    assert_eq!(st, 200, "{g}");
    assert_eq!(g["state"], "hibernated", "{g}");
    let (st, r) = http(
        &listen,
        "POST",
        &format!("/v1/sandboxes/{sandbox}/executions"),
        Some(r#"{"code": "read kept.txt"}"#),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert!(r["stdout"].as_str().unwrap().contains("survived"), "{r}");
    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_timeout_ends_an_execution_that_would_outlive_it() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(&root.path().join("data"), 0, 0.5);
    let listen = free_port();
    let (stop, served) = start(&cfg, root.path(), &listen);
    wait_listening(&listen).await;
    // A pool that keeps no warm stock is ready at once.
    readyz_until(&listen, 200).await;
    let (st, s) = http(&listen, "POST", "/v1/sessions", Some("{}")).await;
    assert_eq!(st, 201, "{s}");
    let session = s["id"].as_str().unwrap().to_owned();
    let running = {
        let listen = listen.clone();
        tokio::spawn(async move {
            http(
                &listen,
                "POST",
                &format!("/v1/sessions/{session}/executions"),
                Some(r#"{"code": "sleep 20"}"#),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let begun = Instant::now();
    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
    // Stopped after the drain timeout, well before the execution's own end.
    assert!(begun.elapsed() >= Duration::from_millis(500));
    assert!(
        begun.elapsed() < Duration::from_secs(20),
        "{:?}",
        begun.elapsed()
    );
    // Its session was closed under it: no result (the fake engine's `sleep` outlives the
    // close, so the connection is cut after the shutdown grace; a real sandbox dies at once).
    let (st, r) = running.await.unwrap();
    assert_ne!(st, 200, "{r}");
}
