//! JSON logs (`--log-format json`): the lines of a request carry its request id, its
//! session id and its execution id, the same execution id as its audit record and its `/v1`
//! result (`execution_id`), by which `GET /v1/audit?execution=` finds the record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use ampoule_server::config::sha256_hex;
use ampoule_server::fake::FakeEngine;
use ampoule_server::logging::{LogFormat, subscriber};
use ampoule_server::{Config, app};
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

const A: &str = "key-of-tenant-a";

/// Where the subscriber writes: a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn post(app: &axum::Router, uri: &str, request_id: &str, body: &str) -> (u16, Value, String) {
    let req = Request::builder()
        .method("POST")
        .uri(uri)
        .header("authorization", format!("Bearer {A}"))
        .header("content-type", "application/json")
        .header("x-request-id", request_id)
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let echoed = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        echoed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_request_session_and_execution_ids() {
    let capture = Capture::default();
    let writer = capture.clone();
    let sub = subscriber(
        LogFormat::Json,
        tracing_subscriber::EnvFilter::new("info"),
        move || writer.clone(),
    );
    // This test binary has one test: the global subscriber is its alone.
    tracing::subscriber::set_global_default(sub).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
         [pools.python]\nwarm = 0\n[tenants.a]\nexecutions_per_minute = 1\n",
        dir.path().join("data").display(),
        sha256_hex(A),
    );
    let cfg = Config::parse(&text).unwrap();
    let keys = ampoule_server::serve::keys(&cfg).unwrap();
    let state =
        ampoule_server::serve::state(&cfg, Arc::new(FakeEngine::new(dir.path())), keys).unwrap();
    ampoule_server::serve::audit(&cfg, &state.manager)
        .await
        .unwrap();
    let app = app(state.clone());

    let (st, s, echoed) = post(&app, "/v1/sessions", "req-create-1", "{}").await;
    assert_eq!((st, echoed.as_str()), (201, "req-create-1"), "{s}");
    let sid = s["id"].as_str().unwrap().to_owned();
    let uri = format!("/v1/sessions/{sid}/executions");
    let (st, r, _) = post(&app, &uri, "req-exec-1", r#"{"code":"print(1)"}"#).await;
    assert_eq!(st, 200, "{r}");
    let (st, _, _) = post(&app, &uri, "req-exec-2", r#"{"code":"print(2)"}"#).await;
    assert_eq!(st, 429);
    // A request without an id gets one.
    let (_, _, generated) = post(&app, "/v1/sessions", "", "{}").await;
    assert!(generated.starts_with("req_"), "{generated}");

    state.manager.audit().unwrap().writer.flush().await.unwrap();
    let page = state
        .manager
        .audit()
        .unwrap()
        .store
        .query(&ampoule_audit::Filter {
            tenant: "a".into(),
            kind: Some(ampoule_audit::Kind::Execution),
            ..Default::default()
        })
        .await
        .unwrap();
    let exe = page.records[0].record.execution.clone().unwrap();
    assert_eq!(r["execution_id"], exe.as_str(), "the /v1 result's id: {r}");
    assert_eq!(
        page.records[0].record.request_id.as_deref(),
        Some("req-exec-1")
    );
    let req = Request::builder()
        .uri(format!("/v1/audit?execution={exe}"))
        .header("authorization", format!("Bearer {A}"))
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let found: Value = serde_json::from_slice(&bytes).unwrap();
    let found = found["records"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["execution"], exe.as_str());
    assert_eq!(found[0]["kind"], "execution");

    let out = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // Every span's fields, merged, for each line.
    let fields = |line: &Value| -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        for span in line["spans"].as_array().into_iter().flatten() {
            m.extend(span.as_object().unwrap().clone());
        }
        m
    };
    let finished = lines
        .iter()
        .find(|l| l["fields"]["message"] == "execution finished")
        .unwrap_or_else(|| panic!("no execution line in:\n{out}"));
    let f = fields(finished);
    assert_eq!(f["request_id"], "req-exec-1", "{finished}");
    assert_eq!(f["session"], sid.as_str(), "{finished}");
    assert_eq!(
        f["execution"],
        exe.as_str(),
        "the audit record's id: {finished}"
    );
    assert_eq!(finished["fields"]["status"], "succeeded");

    let refused = lines
        .iter()
        .find(|l| l["fields"]["message"] == "refused by policy")
        .unwrap_or_else(|| panic!("no refusal line in:\n{out}"));
    let f = fields(refused);
    assert_eq!(f["request_id"], "req-exec-2", "{refused}");
    assert_eq!(f["session"], sid.as_str(), "{refused}");
    assert_eq!(refused["fields"]["code"], "rate_limited");

    let access: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "ampoule::access")
        .collect();
    assert!(
        access
            .iter()
            .any(|l| fields(l)["request_id"] == "req-create-1"
                && fields(l)["session"] == sid.as_str()),
        "{out}"
    );
}
