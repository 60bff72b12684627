//! Every door over the one core (fake engine): a request the policy refuses (rate limit,
//! forbidden pool, language or timeout) starts no sandbox, whichever door it came through
//! (ACA, `/v1`, the `/v1` stream, MCP); one execution has one id, answered by every door and
//! found in the audit log (`GET /v1/audit?execution=`), tenant-scoped; records carry the
//! caller's identifier and request id (`GET /v1/audit?identifier=`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ampoule_server::config::sha256_hex;
use ampoule_server::fake::{FakeEngine, FakeStats};
use ampoule_server::{AppState, Config, app};
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const A: &str = "key-of-tenant-a";
const B: &str = "key-of-tenant-b";
const V1: &str = "api-version=2024-02-02-preview";
const VB: &str = "api-version=2024-10-02-preview";

/// Tenant `a`: one execution a minute. Tenant `b`: the python pool only, python only,
/// timeouts up to 10 s. Pools `python` and `js`, no warm stock (every start is counted).
const POLICY: &str = "[pools.python]\nwarm = 0\n[pools.js]\nlanguage = \"javascript\"\nwarm = 0\n\
                      [tenants.a]\nexecutions_per_minute = 1\n\
                      [tenants.b]\npools = [\"python\"]\nlanguages = [\"python\"]\n\
                      max_timeout_s = 10\n";

struct Door {
    app: axum::Router,
    state: AppState,
    stats: Arc<FakeStats>,
    _dir: tempfile::TempDir,
}

impl Door {
    fn started(&self) -> usize {
        self.stats.started.load(Ordering::SeqCst)
    }

    /// Sandboxes started and sessions in the table: both must stay put after a refusal.
    fn starts_and_sessions(&self) -> (usize, usize) {
        (self.started(), self.state.manager.session_count())
    }

    async fn flush(&self) {
        self.state
            .manager
            .audit()
            .unwrap()
            .writer
            .flush()
            .await
            .unwrap();
    }
}

async fn door() -> Door {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
         [[auth.keys]]\ntenant = \"b\"\nkey_sha256 = \"{}\"\n{POLICY}",
        dir.path().join("data").display(),
        sha256_hex(A),
        sha256_hex(B)
    );
    let cfg = Config::parse(&text).unwrap();
    let engine = FakeEngine::new(dir.path());
    let stats = engine.stats.clone();
    let keys = ampoule_server::serve::keys(&cfg).unwrap();
    let state = ampoule_server::serve::state(&cfg, Arc::new(engine), keys).unwrap();
    ampoule_server::serve::audit(&cfg, &state.manager)
        .await
        .unwrap();
    Door {
        app: app(state.clone()),
        state,
        stats,
        _dir: dir,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

async fn send(
    d: &Door,
    method: &str,
    uri: &str,
    key: &str,
    request_id: Option<&str>,
    body: Option<Value>,
) -> Reply {
    send_h(d, method, uri, key, request_id, &[], body).await
}

async fn send_h(
    d: &Door,
    method: &str,
    uri: &str,
    key: &str,
    request_id: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {key}"))
        .header("host", "localhost")
        .header("content-type", "application/json");
    if uri == "/mcp" {
        // The streamable HTTP transport wants both.
        req = req.header("accept", "application/json, text/event-stream");
    }
    if let Some(id) = request_id {
        req = req.header("x-request-id", id);
    }
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let resp = d
        .app
        .clone()
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// An MCP `tools/call` of `execute_code`; returns the reply's text (JSON or SSE).
async fn mcp_execute(d: &Door, key: &str, request_id: &str, args: Value) -> String {
    let call = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "execute_code", "arguments": args},
    });
    let r = send(d, "POST", "/mcp", key, Some(request_id), Some(call)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.text
}

/// The first `exe_…` id in a text.
fn execution_id(text: &str) -> String {
    let at = text
        .find("exe_")
        .unwrap_or_else(|| panic!("no execution id in {text}"));
    text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

async fn audit(d: &Door, key: &str, query: &str) -> Vec<Value> {
    d.flush().await;
    let r = send(d, "GET", &format!("/v1/audit?{query}"), key, None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.json()["records"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_refusals_start_no_sandbox() {
    let d = door().await;
    let text = mcp_execute(&d, A, "mcp-1", json!({"code": "1 + 1", "session": "s1"})).await;
    assert!(text.contains(r#""isError":false"#), "{text}");
    assert_eq!(d.starts_and_sessions(), (1, 1));

    // A new session named by a rate-limited tenant: refused before anything starts (the
    // old door created the session first, then was refused).
    let text = mcp_execute(&d, A, "mcp-2", json!({"code": "1", "session": "s2"})).await;
    assert!(text.contains(r#""isError":true"#), "{text}");
    assert!(text.contains("rate_limited"), "{text}");
    assert_eq!(d.starts_and_sessions(), (1, 1));

    // A timeout above the tenant's maximum, a forbidden language: the same.
    let text = mcp_execute(
        &d,
        B,
        "mcp-3",
        json!({"code": "1", "session": "t1", "timeout_s": 60}),
    )
    .await;
    assert!(text.contains("timeout_not_allowed"), "{text}");
    let text = mcp_execute(
        &d,
        B,
        "mcp-4",
        json!({"code": "1", "session": "t2", "language": "javascript"}),
    )
    .await;
    assert!(text.contains("pool_not_allowed"), "{text}");
    assert_eq!(d.starts_and_sessions(), (1, 1));

    // Each refusal is written down under the identifier it named and its request id.
    let refused = audit(&d, B, "identifier=t1").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["kind"], "refused");
    assert_eq!(refused[0]["decided_by"], "timeout_not_allowed");
    assert_eq!(refused[0]["request_id"], "mcp-3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aca_refusals_start_no_sandbox() {
    let d = door().await;
    let exec = |pool: &str, id: &str| format!("/pools/{pool}/code/execute?identifier={id}&{V1}");
    let body = |t: Option<u32>| {
        let mut p = json!({"codeInputType": "inline", "executionType": "synchronous", "code": "1"});
        if let Some(t) = t {
            p["timeoutInSeconds"] = json!(t);
        }
        Some(json!({ "properties": p }))
    };
    let r = send(&d, "POST", &exec("python", "x"), A, None, body(None)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = send(&d, "POST", &exec("python", "y"), A, None, body(None)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    let r = send(&d, "POST", &exec("js", "z"), B, None, body(None)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert_eq!(r.headers["x-ms-error-code"], "Forbidden");
    let r = send(&d, "POST", &exec("python", "z"), B, None, body(Some(60))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    // File calls name a session too: a forbidden pool starts none.
    let r = send(
        &d,
        "GET",
        &format!("/pools/js/files?identifier=z&{V1}"),
        B,
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert_eq!(d.starts_and_sessions(), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_refusals_start_no_sandbox() {
    let d = door().await;
    let r = send(
        &d,
        "POST",
        "/v1/sessions",
        B,
        None,
        Some(json!({"pool": "js"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "pool_not_allowed");
    assert_eq!(d.starts_and_sessions(), (0, 0));

    let r = send(&d, "POST", "/v1/sessions", B, None, Some(json!({}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let sid = r.json()["id"].as_str().unwrap().to_owned();
    let uri = format!("/v1/sessions/{sid}/executions");
    let slow = json!({"code": "1", "timeout_s": 60});
    let r = send(&d, "POST", &uri, B, None, Some(slow)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let js = json!({"code": "1", "language": "javascript"});
    let r = send(&d, "POST", &uri, B, None, Some(js)).await;
    // Not the session's language: a conflict with the session on /v1 (400 on ACA).
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "language_mismatch", "{}", r.text);
    let r = send(&d, "GET", &format!("/v1/sessions/{sid}"), B, None, None).await;
    assert_eq!(r.json()["executions"], 0, "{}", r.text);
    assert_eq!(d.starts_and_sessions(), (1, 1));

    let r = send(&d, "POST", "/v1/sessions", A, None, Some(json!({}))).await;
    let sid = r.json()["id"].as_str().unwrap().to_owned();
    let uri = format!("/v1/sessions/{sid}/executions");
    let r = send(&d, "POST", &uri, A, None, Some(json!({"code": "1"}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = send(&d, "POST", &uri, A, None, Some(json!({"code": "1"}))).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert!(r.headers.contains_key("retry-after"));
    let r = send(&d, "GET", &format!("/v1/sessions/{sid}"), A, None, None).await;
    assert_eq!(r.json()["executions"], 1, "{}", r.text);
    assert_eq!(d.starts_and_sessions(), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_stream_refusals_come_before_the_stream_and_events_carry_the_execution_id() {
    let d = door().await;
    let r = send(&d, "POST", "/v1/sessions", A, None, Some(json!({}))).await;
    let sid = r.json()["id"].as_str().unwrap().to_owned();
    let uri = format!("/v1/sessions/{sid}/executions/stream");
    let code = json!({"code": "print(1)\nprint(2)\n3"});
    let r = send(&d, "POST", &uri, A, Some("req-stream"), Some(code.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let lines: Vec<Value> = r
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 3, "{}", r.text);
    let exe = lines[0]["execution_id"].as_str().unwrap().to_owned();
    assert!(exe.starts_with("exe_"), "{exe}");
    for l in &lines {
        assert_eq!(
            l["execution_id"],
            exe.as_str(),
            "every event carries it: {l}"
        );
    }
    assert_eq!(lines.last().unwrap()["type"], "result");
    let rec = audit(&d, A, &format!("execution={exe}")).await;
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(rec[0]["request_id"], "req-stream");

    // Rate limited: a JSON error, not a stream, and nothing started.
    let r = send(&d, "POST", &uri, A, None, Some(code)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    assert_eq!(d.starts_and_sessions(), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_execution_id_in_every_door_and_its_audit_record() {
    let d = door().await;
    // ACA (family B): the response's id and operation-id are the audit record's.
    let r = send(
        &d,
        "POST",
        &format!("/pools/python/executions?identifier=conv-1&{VB}"),
        B,
        Some("req-aca"),
        Some(json!({"code": "6 * 7"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let exe = r.json()["id"].as_str().unwrap().to_owned();
    assert!(exe.starts_with("exe_"), "{exe}");
    assert_eq!(r.headers["operation-id"], exe.as_str());
    let rec = audit(&d, B, &format!("execution={exe}")).await;
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(rec[0]["identifier"], "conv-1");
    assert_eq!(rec[0]["request_id"], "req-aca");
    // Which key made the call, by its id (never the key).
    assert_eq!(rec[0]["key_id"], &sha256_hex(B)[..12]);
    // Tenant-scoped: another tenant finds nothing under that id.
    assert!(audit(&d, A, &format!("execution={exe}")).await.is_empty());

    // ?identifier= finds the session's creation and its execution.
    let by_name = audit(&d, B, "identifier=conv-1").await;
    let kinds: Vec<&str> = by_name
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["session_created", "execution"], "{by_name:?}");
    assert_eq!(by_name[0]["key_id"], &sha256_hex(B)[..12]);
    assert!(audit(&d, A, "identifier=conv-1").await.is_empty());

    // MCP: the tool result's execution id is the record's, under the MCP session's name.
    let text = mcp_execute(&d, B, "req-mcp", json!({"code": "1", "session": "chat-7"})).await;
    let exe = execution_id(&text);
    let rec = audit(&d, B, "identifier=chat-7&kind=execution").await;
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(rec[0]["execution"], exe.as_str());
    assert_eq!(rec[0]["request_id"], "req-mcp");
    assert_eq!(rec[0]["key_id"], &sha256_hex(B)[..12]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_context_is_written_down_by_every_door_and_finds_its_run() {
    let d = door().await;
    let ctx =
        json!({"run_id": "run-42", "prompt": "sum the column", "agent": "planner", "step": 1});
    // `/v1`: in the body, at creation and with each execution.
    let r = send(
        &d,
        "POST",
        "/v1/sessions",
        B,
        None,
        Some(json!({"context": ctx})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let sid = r.json()["id"].as_str().unwrap().to_owned();
    let uri = format!("/v1/sessions/{sid}/executions");
    for _ in 0..2 {
        let r = send(
            &d,
            "POST",
            &uri,
            B,
            None,
            Some(json!({"code": "6 * 7", "context": ctx})),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    // ACA: in the header (its body has no room for it).
    let aca_ctx = r#"{"run_id": "run-42", "agent": "langchain"}"#;
    let r = send_h(
        &d,
        "POST",
        &format!("/pools/python/executions?identifier=ctx-1&{VB}"),
        B,
        None,
        &[("x-ampoule-context", aca_ctx)],
        Some(json!({"code": "6 * 7"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // MCP: as the tool's argument.
    let text = mcp_execute(
        &d,
        B,
        "req-ctx",
        json!({"code": "1", "session": "chat-ctx", "context": {"run_id": "run-42", "step": 3}}),
    )
    .await;
    assert!(text.contains(r#""isError":false"#), "{text}");

    let run = audit(&d, B, "run_id=run-42").await;
    let execs: Vec<&Value> = run.iter().filter(|r| r["kind"] == "execution").collect();
    assert_eq!(execs.len(), 4, "{run:?}");
    assert!(
        run.iter()
            .any(|r| r["kind"] == "session_created" && r["context"]["prompt"] == "sum the column")
    );
    assert_eq!(execs[0]["context"]["agent"], "planner");
    assert_eq!(execs[2]["context"]["agent"], "langchain");
    assert_eq!(execs[3]["context"]["step"], 3);
    // The same code in the same run: attempts 1, 2, 3 (whichever door); other code: 1.
    let attempts: Vec<&Value> = execs.iter().map(|r| &r["attempt"]).collect();
    assert_eq!(attempts, [&json!(1), &json!(2), &json!(3), &json!(1)]);
    // Another tenant finds nothing of it.
    assert!(audit(&d, A, "run_id=run-42").await.is_empty());
    let m = send(&d, "GET", "/metrics", B, None, None).await;
    assert!(
        m.text
            .contains(r#"ampoule_execution_retries_total{pool="python"} 2"#),
        "{}",
        m.text
    );

    // Contexts that are not small JSON objects are refused, at every door, before anything runs.
    let big = json!({"prompt": "x".repeat(5000)});
    for bad in [json!(["a"]), big, json!({"run_id": 7})] {
        let r = send(
            &d,
            "POST",
            &uri,
            B,
            None,
            Some(json!({"code": "1", "context": bad})),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    }
    let r = send_h(
        &d,
        "POST",
        &format!("/pools/python/executions?identifier=ctx-2&{VB}"),
        B,
        None,
        &[("x-ampoule-context", "not json")],
        Some(json!({"code": "1"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.text.contains("X-Ampoule-Context"), "{}", r.text);
    let r = send_h(
        &d,
        "POST",
        "/mcp",
        B,
        None,
        &[("x-ampoule-context", "[1]")],
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let execs_after = audit(&d, B, "kind=execution").await.len();
    assert_eq!(execs_after, 4);
}
