//! The audit log through the server: executions and session events written by the manager,
//! `GET /v1/audit` and `GET /v1/usage` scoped to the calling tenant (fake engine, SQLite).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use ampoule_server::config::sha256_hex;
use ampoule_server::fake::FakeEngine;
use ampoule_server::{Config, app};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const A: &str = "key-of-tenant-a";
const B: &str = "key-of-tenant-b";

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {key}"));
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_execution_is_answerable_and_tenants_see_only_their_own() {
    let root = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n[audit]\nkeep_code = false\noutput_bytes = 5\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
         [[auth.keys]]\ntenant = \"b\"\nkey_sha256 = \"{}\"\n[pools.python]\nwarm = 0\n",
        root.path().join("data").display(),
        sha256_hex(A),
        sha256_hex(B)
    );
    let cfg = Config::parse(&text).unwrap();
    let engine = FakeEngine::new(root.path());
    let keys = ampoule_server::serve::keys(&cfg).unwrap();
    let state = ampoule_server::serve::state(&cfg, Arc::new(engine), keys).unwrap();
    let writer = ampoule_server::serve::audit(&cfg, &state.manager)
        .await
        .unwrap();
    let app = app(state.clone());

    let (st, s) = call(&app, "POST", "/v1/sessions", A, Some(json!({}))).await;
    assert_eq!(st, StatusCode::CREATED, "{s}");
    let sid = s["id"].as_str().unwrap().to_owned();
    let codes = [
        ("print('hello world')", "succeeded"),
        ("raise ValueError", "failed"),
        ("sleep 5", "timed_out"),
    ];
    for (code, want) in codes {
        let timeout = if code.starts_with("sleep") { 0.2 } else { 10.0 };
        let (st, r) = call(
            &app,
            "POST",
            &format!("/v1/sessions/{sid}/executions"),
            A,
            Some(json!({"code": code, "timeout_s": timeout})),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{r}");
        assert_eq!(r["status"], want, "{r}");
    }
    let (_, b) = call(&app, "POST", "/v1/sessions", B, Some(json!({}))).await;
    let bsid = b["id"].as_str().unwrap().to_owned();
    call(
        &app,
        "POST",
        &format!("/v1/sessions/{bsid}/executions"),
        B,
        Some(json!({"code": "print(b)"})),
    )
    .await;
    let (st, _) = call(&app, "DELETE", &format!("/v1/sessions/{sid}"), A, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    state.manager.audit().unwrap().writer.flush().await.unwrap();

    let (st, page) = call(&app, "GET", "/v1/audit", A, None).await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let records = page["records"].as_array().unwrap();
    let kinds: Vec<_> = records
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "session_created",
            "execution",
            "execution",
            "execution",
            "session_deleted"
        ]
    );
    assert!(
        records
            .iter()
            .all(|r| r["tenant"] == "a" && r["session"] == sid.as_str())
    );
    let execs: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "execution")
        .collect();
    let statuses: Vec<_> = execs
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["succeeded", "failed", "timed_out"]);
    for (r, (code, _)) in execs.iter().zip(codes) {
        assert_eq!(r["code_sha256"], ampoule_audit::sha256_hex(code.as_bytes()));
        assert_eq!(r["code"], Value::Null, "keep_code = false");
        assert_eq!(r["pool"], "python");
        assert_eq!(r["language"], "python");
        assert!(r["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(r["time_ms"].as_i64().unwrap() > 0);
    }
    assert_eq!(execs[0]["stdout"], "hello", "trimmed to output_bytes");
    assert_eq!(execs[2]["decided_by"], "time");

    let (_, p) = call(&app, "GET", "/v1/audit?status=failed", A, None).await;
    assert_eq!(p["records"].as_array().unwrap().len(), 1);
    let (_, p) = call(&app, "GET", &format!("/v1/audit?session={bsid}"), A, None).await;
    assert!(
        p["records"].as_array().unwrap().is_empty(),
        "tenant b's session leaked: {p}"
    );
    let (_, p) = call(&app, "GET", "/v1/audit?limit=2", A, None).await;
    let next = p["next"].as_i64().unwrap();
    let (_, p2) = call(
        &app,
        "GET",
        &format!("/v1/audit?limit=2&after={next}"),
        A,
        None,
    )
    .await;
    assert_eq!(p2["records"][0]["kind"], "execution");
    let (st, _) = call(&app, "GET", "/v1/audit?kind=nonsense", A, None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    let (_, b) = call(&app, "GET", "/v1/audit", B, None).await;
    let brs = b["records"].as_array().unwrap();
    assert_eq!(brs.len(), 2);
    assert!(brs.iter().all(|r| r["tenant"] == "b"));

    let (st, u) = call(&app, "GET", "/v1/usage", A, None).await;
    assert_eq!(st, StatusCode::OK, "{u}");
    assert_eq!(u["executions"], 3);
    assert_eq!(u["sessions_created"], 1);
    assert!(u["session_seconds"].as_f64().unwrap() > 0.0);

    let v = state.manager.audit().unwrap().store.verify().await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.checked, 7);
    drop(app);
    drop(state);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_filter_by_pool_and_the_chain_is_verified_through_the_api() {
    let root = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n[pools.python]\nwarm = 0\n",
        root.path().join("data").display(),
        sha256_hex(A),
    );
    let cfg = Config::parse(&text).unwrap();
    let engine = FakeEngine::new(root.path());
    let keys = ampoule_server::serve::keys(&cfg).unwrap();
    let state = ampoule_server::serve::state(&cfg, Arc::new(engine), keys).unwrap();
    let writer = ampoule_server::serve::audit(&cfg, &state.manager)
        .await
        .unwrap();
    let app = app(state.clone());
    let (_, s) = call(&app, "POST", "/v1/sessions", A, Some(json!({}))).await;
    let sid = s["id"].as_str().unwrap().to_owned();
    let (st, _) = call(
        &app,
        "POST",
        &format!("/v1/sessions/{sid}/executions"),
        A,
        Some(json!({"code": "print('x')"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    state.manager.audit().unwrap().writer.flush().await.unwrap();

    // The pool filter: this pool's records, and none of a pool the tenant did not use.
    let (st, p) = call(&app, "GET", "/v1/audit?pool=python", A, None).await;
    assert_eq!(st, StatusCode::OK, "{p}");
    assert_eq!(p["records"].as_array().unwrap().len(), 2, "{p}");
    let (_, p) = call(&app, "GET", "/v1/audit?pool=javascript", A, None).await;
    assert!(p["records"].as_array().unwrap().is_empty(), "{p}");

    let (st, _) = call(&app, "GET", "/v1/audit/verify", "not-a-key", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v) = call(&app, "GET", "/v1/audit/verify", A, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["checked"], 2, "{v}");
    assert_eq!(v["broken"], Value::Null);

    // Someone with the database edits the execution's status behind the server's back.
    let store = ampoule_audit::SqlStore::open(&ampoule_server::serve::audit_url(&cfg))
        .await
        .unwrap();
    store
        .raw_execute("UPDATE audit_records SET status = 'failed' WHERE seq = 2")
        .await
        .unwrap();
    let (st, v) = call(&app, "GET", "/v1/audit/verify", A, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["broken"].as_str().is_some_and(|b| !b.is_empty()), "{v}");
    drop(app);
    drop(state);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
}
