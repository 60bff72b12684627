//! Approval checkpoints through the server (fake engine): an `always` pool holds an execution
//! until an approver key of the same tenant approves it (then it runs) or denies it (then
//! `denied`, its code never run: the file it would have written is not there), or nobody
//! decides in time (`approval_timed_out`); the submitting key cannot approve, an approver key
//! submits nothing, another tenant's approver sees and decides nothing; the webhook is told;
//! every request and decision is in the audit chain, which verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ampoule_server::config::sha256_hex;
use ampoule_server::fake::FakeEngine;
use ampoule_server::{AppState, Config, app};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const SUBMITTER: &str = "key-submitter-a";
const APPROVER: &str = "key-approver-a";
const OTHER_APPROVER: &str = "key-approver-b";
const VB: &str = "api-version=2024-10-02-preview";

struct Server {
    app: axum::Router,
    state: AppState,
    _dir: tempfile::TempDir,
}

async fn server(webhook: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\nrole = \"approver\"\n\
         [[auth.keys]]\ntenant = \"b\"\nkey_sha256 = \"{}\"\nrole = \"approver\"\n\
         [pools.python]\nwarm = 0\n\
         [pools.python.approval]\nmode = \"always\"\ntimeout_s = 60\nwebhook_url = \"{webhook}\"\n\
         [pools.quick]\nwarm = 0\n\
         [pools.quick.approval]\nmode = \"always\"\ntimeout_s = 1\n",
        dir.path().join("data").display(),
        sha256_hex(SUBMITTER),
        sha256_hex(APPROVER),
        sha256_hex(OTHER_APPROVER),
    );
    let cfg = Config::parse(&text).unwrap();
    let engine = FakeEngine::new(dir.path());
    let keys = ampoule_server::serve::keys(&cfg).unwrap();
    let state = ampoule_server::serve::state(&cfg, Arc::new(engine), keys).unwrap();
    ampoule_server::serve::audit(&cfg, &state.manager)
        .await
        .unwrap();
    Server {
        app: app(state.clone()),
        state,
        _dir: dir,
    }
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes))),
    )
}

/// The pending approvals, once there are `n`.
async fn pending(app: &axum::Router, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = call(app, "GET", "/v1/approvals", APPROVER, &[], None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let list = body["approvals"].as_array().unwrap().clone();
        if list.len() >= n || Instant::now() > deadline {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A webhook receiver on loopback: the bodies it was sent.
async fn webhook() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/approvals", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read until the JSON body is complete (it ends the request).
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some(i) = text.find("\r\n\r\n")
                        && serde_json::from_str::<Value>(&text[i + 4..]).is_ok()
                    {
                        break;
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_wait_for_an_approver_of_their_tenant() {
    let (url, mut hooks) = webhook().await;
    let s = server(&url).await;

    // An execution through ACA, with the agent's context: it waits.
    let app = s.app.clone();
    let waiting = tokio::spawn(async move {
        call(
            &app,
            "POST",
            &format!("/pools/python/executions?identifier=w1&{VB}"),
            SUBMITTER,
            &[(
                "x-ampoule-context",
                r#"{"run_id": "r1", "prompt": "save it"}"#,
            )],
            Some(json!({"code": "write out.txt approved\n6 * 7"})),
        )
        .await
    });
    let list = pending(&s.app, 1).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let a = &list[0];
    let id = a["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("apr_"), "{id}");
    assert_eq!(a["code"], "write out.txt approved\n6 * 7");
    assert_eq!(a["context"]["prompt"], "save it");
    assert_eq!(a["requested_by"], &sha256_hex(SUBMITTER)[..12]);
    assert!(!waiting.is_finished(), "the execution did not wait");

    // The webhook was told.
    let hook = tokio::time::timeout(Duration::from_secs(10), hooks.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(hook.starts_with("POST /hooks/approvals"), "{hook}");
    assert!(hook.contains(&id), "{hook}");

    // The submitter cannot see or decide approvals; an approver key submits nothing; another
    // tenant's approver sees nothing and cannot decide this one.
    let approve = format!("/v1/approvals/{id}/approve");
    let (st, body) = call(&s.app, "GET", "/v1/approvals", SUBMITTER, &[], None).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("not_an_approver"))
    );
    let (st, _) = call(&s.app, "POST", &approve, SUBMITTER, &[], None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, body) = call(
        &s.app,
        "POST",
        "/v1/sessions",
        APPROVER,
        &[],
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("approver_cannot_submit"))
    );
    let (st, body) = call(&s.app, "GET", "/v1/approvals", OTHER_APPROVER, &[], None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["approvals"], json!([]));
    let (st, body) = call(&s.app, "POST", &approve, OTHER_APPROVER, &[], None).await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("approval_not_found"))
    );
    assert!(!waiting.is_finished());

    // The approver approves: the code runs and its caller gets the result.
    let (st, body) = call(
        &s.app,
        "POST",
        &approve,
        APPROVER,
        &[],
        Some(json!({"reason": "fine"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, result) = waiting.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{result}");
    assert_eq!(result["id"], a["execution_id"], "{result}");
    // Decided once.
    let (st, _) = call(&s.app, "POST", &approve, APPROVER, &[], None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // A denied execution never runs: the session it names is never even started.
    let app = s.app.clone();
    let waiting = tokio::spawn(async move {
        call(
            &app,
            "POST",
            &format!("/pools/python/executions?identifier=w2&{VB}"),
            SUBMITTER,
            &[],
            Some(json!({"code": "write denied.txt ran"})),
        )
        .await
    });
    let list = pending(&s.app, 1).await;
    let id2 = list[0]["id"].as_str().unwrap().to_owned();
    let (st, _) = call(
        &s.app,
        "POST",
        &format!("/v1/approvals/{id2}/deny"),
        APPROVER,
        &[],
        Some(json!({"reason": "writes where it should not"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, body) = waiting.await.unwrap();
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.to_string().contains("writes where it should not"),
        "{body}"
    );
    let (_, sessions) = call(&s.app, "GET", "/v1/sessions", SUBMITTER, &[], None).await;
    let names: Vec<&str> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["identifier"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["w1"], "{sessions}");
    // The approved one wrote its file.
    let sid = sessions["sessions"][0]["id"].as_str().unwrap();
    let resp = s
        .app
        .clone()
        .oneshot(
            Request::get(format!("/v1/sessions/{sid}/files/out.txt/content"))
                .header("authorization", format!("Bearer {SUBMITTER}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let content = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&content[..], b"approved");

    // Nobody decides: refused when the pool's timeout passes.
    let (st, body) = call(
        &s.app,
        "POST",
        &format!("/pools/quick/executions?identifier=w3&{VB}"),
        SUBMITTER,
        &[],
        Some(json!({"code": "1"})),
    )
    .await;
    assert_eq!(st, StatusCode::REQUEST_TIMEOUT, "{body}");
    assert_eq!(pending(&s.app, 0).await, Vec::<Value>::new());

    // The chain holds each request and decision, with who decided.
    let audit = s.state.manager.audit().unwrap();
    audit.writer.flush().await.unwrap();
    let (_, page) = call(
        &s.app,
        "GET",
        &format!(
            "/v1/audit?execution={}",
            a["execution_id"].as_str().unwrap()
        ),
        SUBMITTER,
        &[],
        None,
    )
    .await;
    let kinds: Vec<&str> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["approval_requested", "approval_decided", "execution"],
        "{page}"
    );
    let decided = &page["records"][1];
    assert_eq!(decided["status"], "approved");
    assert_eq!(decided["key_id"], &sha256_hex(APPROVER)[..12]);
    assert_eq!(decided["identifier"], id.as_str());
    let (_, page) = call(
        &s.app,
        "GET",
        "/v1/audit?kind=approval_decided",
        SUBMITTER,
        &[],
        None,
    )
    .await;
    let statuses: Vec<&str> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["approved", "denied", "timed_out"], "{page}");
    assert_eq!(
        page["records"][1]["decided_by"],
        "writes where it should not"
    );
    let (st, v) = call(&s.app, "GET", "/v1/audit/verify", SUBMITTER, &[], None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["ok"], true, "{v}");
}
