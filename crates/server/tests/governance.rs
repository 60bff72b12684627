//! Governance through the server (fake engine): `/metrics` read with a Prometheus text-format
//! parser, per-tenant quotas and policy (429 with `Retry-After`, refused pools, languages and
//! timeouts, each written down), per-pool audit settings, the files an execution changed,
//! retention pruning that keeps the chain verifiable (SQLite, and PostgreSQL when
//! `AMPOULE_TEST_POSTGRES_URL` is set), and `serve_with` auditing on its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ampoule_server::config::sha256_hex;
use ampoule_server::fake::FakeEngine;
use ampoule_server::{AppState, Config, app};
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::Connection;
use tower::ServiceExt;

const A: &str = "key-of-tenant-a";
const B: &str = "key-of-tenant-b";

struct Server {
    app: axum::Router,
    state: AppState,
    cfg: Config,
    _dir: tempfile::TempDir,
}

/// A server over the fake engine with tenants `a` and `b`, `extra` appended to the config;
/// the audit store at `audit_url` (default: SQLite in the data directory).
async fn server(extra: &str, audit_url: Option<&str>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (url, extra) = match audit_url {
        None => (String::new(), extra.to_owned()),
        Some(u) if extra.contains("[audit]\n") => (
            String::new(),
            extra.replacen("[audit]\n", &format!("[audit]\nurl = \"{u}\"\n"), 1),
        ),
        Some(u) => (format!("[audit]\nurl = \"{u}\"\n"), extra.to_owned()),
    };
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
         [[auth.keys]]\ntenant = \"b\"\nkey_sha256 = \"{}\"\n{url}{extra}",
        dir.path().join("data").display(),
        sha256_hex(A),
        sha256_hex(B)
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
        cfg,
        _dir: dir,
    }
}

/// The audit stores to run on: SQLite (None), and a fresh PostgreSQL database when
/// `AMPOULE_TEST_POSTGRES_URL` is set (required under CI, as in the audit crate's suite).
async fn backends() -> Vec<Option<String>> {
    let mut out = vec![None];
    let Ok(url) = std::env::var("AMPOULE_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "AMPOULE_TEST_POSTGRES_URL is not set under CI (scripts/test.sh sets it)"
        );
        eprintln!("PostgreSQL skipped: AMPOULE_TEST_POSTGRES_URL is not set");
        return out;
    };
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "ampoule_gov_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (base, _) = url.rsplit_once('/').unwrap();
    out.push(Some(format!("{base}/{name}")));
    out
}

async fn call_h(
    app: &axum::Router,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Value, String) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text,
    )
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (st, _, v, _) = call_h(app, method, uri, Some(key), body).await;
    (st, v)
}

async fn session(app: &axum::Router, key: &str, pool: Option<&str>) -> String {
    let body = match pool {
        Some(p) => json!({ "pool": p }),
        None => json!({}),
    };
    let (st, s) = call(app, "POST", "/v1/sessions", key, Some(body)).await;
    assert_eq!(st, StatusCode::CREATED, "{s}");
    s["id"].as_str().unwrap().to_owned()
}

async fn exec(app: &axum::Router, key: &str, sid: &str, code: &str) -> (StatusCode, Value) {
    call(
        app,
        "POST",
        &format!("/v1/sessions/{sid}/executions"),
        key,
        Some(json!({ "code": code })),
    )
    .await
}

async fn records(s: &Server, tenant: &str) -> Vec<Value> {
    s.state
        .manager
        .audit()
        .unwrap()
        .writer
        .flush()
        .await
        .unwrap();
    let page = s
        .state
        .manager
        .audit()
        .unwrap()
        .store
        .query(&ampoule_audit::Filter {
            tenant: tenant.to_owned(),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    page.records
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect()
}

/// Parses `/metrics` with a Prometheus text-format parser.
async fn scrape(app: &axum::Router) -> prometheus_parse::Scrape {
    let (st, headers, _, text) = call_h(app, "GET", "/metrics", Some(A), None).await;
    assert_eq!(st, StatusCode::OK, "{text}");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{headers:?}"
    );
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of `metric` with these labels (a histogram: its observation count); 0 when
/// there is no such sample.
fn value(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus_parse::Value as V;
    s.samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            V::Counter(v) | V::Gauge(v) | V::Untyped(v) => *v,
            V::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            V::Summary(_) => panic!("no summaries here"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_executions_and_need_a_key() {
    let s = server(
        "[pools.python]\nwarm = 0\n[tenants.a]\nexecutions_per_minute = 4\n",
        None,
    )
    .await;
    let (st, _, body, _) = call_h(&s.app, "GET", "/metrics", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");

    let before = scrape(&s.app).await;
    let ok = [("pool", "python"), ("status", "succeeded")];
    assert_eq!(value(&before, "ampoule_executions_total", &ok), 0.0);
    assert_eq!(
        value(&before, "ampoule_pool_max_sessions", &[("pool", "python")]),
        600.0
    );
    // The zygote families are there for the zygote to fill (empty until then).
    assert!(!before.docs.contains_key("ampoule_zygote_up"));
    let pool = ampoule_server::metrics::PoolLabel {
        pool: "python".into(),
    };
    let zygote = s.state.metrics.zygote();
    zygote.up.get_or_create(&pool).set(1);
    zygote.forks.get_or_create(&pool).inc();
    let filled = scrape(&s.app).await;
    assert_eq!(
        value(&filled, "ampoule_zygote_up", &[("pool", "python")]),
        1.0
    );
    assert_eq!(
        value(&filled, "ampoule_zygote_forks_total", &[("pool", "python")]),
        1.0
    );

    let sid = session(&s.app, A, None).await;
    for code in ["print(1)", "print(2)", "raise ValueError"] {
        exec(&s.app, A, &sid, code).await;
    }
    let after = scrape(&s.app).await;
    assert_eq!(value(&after, "ampoule_executions_total", &ok), 2.0);
    assert_eq!(
        value(
            &after,
            "ampoule_executions_total",
            &[("pool", "python"), ("status", "failed")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "ampoule_execution_duration_seconds",
            &[("pool", "python")]
        ),
        3.0,
        "three observations"
    );
    assert_eq!(
        value(
            &after,
            "ampoule_session_start_duration_seconds",
            &[("pool", "python"), ("source", "cold")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "ampoule_sessions",
            &[("pool", "python"), ("state", "idle")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "ampoule_session_events_total",
            &[("pool", "python"), ("event", "created")]
        ),
        1.0
    );

    // The fifth execution of the minute is refused, and counted.
    exec(&s.app, A, &sid, "print(4)").await;
    let (st, _) = exec(&s.app, A, &sid, "print(5)").await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    let (st, _) = call(&s.app, "DELETE", &format!("/v1/sessions/{sid}"), A, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let last = scrape(&s.app).await;
    assert_eq!(
        value(
            &last,
            "ampoule_refused_requests_total",
            &[("reason", "rate_limited")]
        ),
        1.0
    );
    assert_eq!(value(&last, "ampoule_executions_total", &ok), 3.0);
    assert_eq!(
        value(
            &last,
            "ampoule_session_events_total",
            &[("pool", "python"), ("event", "deleted")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &last,
            "ampoule_sessions",
            &[("pool", "python"), ("state", "idle")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_and_policy_refuse_with_stable_codes_and_are_written_down() {
    let s = server(
        "[pools.python]\nwarm = 0\n[pools.js]\nlanguage = \"javascript\"\nwarm = 0\n\
         [pools.other]\nwarm = 0\n\
         [quotas]\nexecutions_per_minute = 3\nmax_timeout_s = 30\n\
         [tenants.a]\npools = [\"python\", \"js\"]\nlanguages = [\"python\"]\n\
         [tenants.b]\nexecutions_per_minute = 100\n",
        None,
    )
    .await;
    let sid = session(&s.app, A, None).await;
    // ACA calls refused by policy (a pool, a language) take none of the minute's budget.
    for pool in ["other", "js"] {
        let (st, _, body, _) = call_h(
            &s.app,
            "POST",
            &format!("/pools/{pool}/code/execute?api-version=2024-02-02-preview&identifier=p"),
            Some(A),
            Some(
                json!({"properties": {"codeInputType": "inline", "executionType": "synchronous",
                                       "code": "1"}}),
            ),
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{pool}: {body}");
    }
    for i in 0..3 {
        let (st, r) = exec(&s.app, A, &sid, &format!("print({i})")).await;
        assert_eq!(st, StatusCode::OK, "{r}");
    }
    // The fourth in the minute: 429, Retry-After, the stable code; streaming and ACA too.
    let (st, headers, body, _) = call_h(
        &s.app,
        "POST",
        &format!("/v1/sessions/{sid}/executions"),
        Some(A),
        Some(json!({"code": "print(3)"})),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    let after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "{after}");
    let (st, headers, body, _) = call_h(
        &s.app,
        "POST",
        &format!("/v1/sessions/{sid}/executions/stream"),
        Some(A),
        Some(json!({"code": "print(3)"})),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(headers.contains_key("retry-after"));
    let (st, headers, _, _) = call_h(
        &s.app,
        "POST",
        "/pools/python/code/execute?api-version=2024-02-02-preview&identifier=x",
        Some(A),
        Some(
            json!({"properties": {"codeInputType": "inline", "executionType": "synchronous",
                                   "code": "print(3)"}}),
        ),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"));
    // The refused ACA call created no session (it would hold a sandbox until its idle timeout).
    let (st, list) = call(&s.app, "GET", "/v1/sessions", A, None).await;
    assert_eq!(st, StatusCode::OK, "{list}");
    let ids: Vec<&str> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["id"].as_str())
        .collect();
    assert_eq!(ids, [sid.as_str()], "{list}");
    // Another tenant has its own window.
    let bsid = session(&s.app, B, None).await;
    for i in 0..5 {
        let (st, r) = exec(&s.app, B, &bsid, &format!("print({i})")).await;
        assert_eq!(st, StatusCode::OK, "{r}");
    }

    // Pools and languages: `other` is not in a's list; `js` is, but its language is not.
    let (st, r) = call(
        &s.app,
        "POST",
        "/v1/sessions",
        A,
        Some(json!({"pool": "other"})),
    )
    .await;
    assert_eq!(
        (st, r["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("pool_not_allowed"))
    );
    let (st, r) = call(
        &s.app,
        "POST",
        "/v1/sessions",
        A,
        Some(json!({"pool": "js"})),
    )
    .await;
    assert_eq!(
        (st, r["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("language_not_allowed"))
    );
    let (st, _) = call(
        &s.app,
        "POST",
        "/v1/sessions",
        B,
        Some(json!({"pool": "other"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    // `GET /v1/pools` lists the pools a tenant may use.
    let names = |v: Value| -> Vec<String> {
        v["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, pools) = call(&s.app, "GET", "/v1/pools", A, None).await;
    assert_eq!(names(pools), ["python"]);
    let (_, pools) = call(&s.app, "GET", "/v1/pools", B, None).await;
    assert_eq!(names(pools), ["js", "other", "python"]);
    // Timeouts: above the tenant's maximum is refused; the pool's longer default is cut.
    let (st, r) = call(
        &s.app,
        "POST",
        &format!("/v1/sessions/{bsid}/executions"),
        B,
        Some(json!({"code": "print(1)", "timeout_s": 31})),
    )
    .await;
    assert_eq!(
        (st, r["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("timeout_not_allowed")),
        "{r}"
    );
    // A default above the tenant's maximum is cut to it: the core's unit test
    // `timeouts_are_cut_to_the_tenant_maximum` (the step is not a command).

    // Every refusal is in the tenant's audit log.
    let refused: Vec<String> = records(&s, "a")
        .await
        .iter()
        .filter(|r| r["kind"] == "refused")
        .map(|r| r["decided_by"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        refused,
        [
            "pool_not_allowed",
            "language_not_allowed",
            "rate_limited",
            "rate_limited",
            "rate_limited",
            "pool_not_allowed",
            "language_not_allowed"
        ]
    );
    let b_refused: Vec<Value> = records(&s, "b")
        .await
        .into_iter()
        .filter(|r| r["kind"] == "refused")
        .collect();
    assert_eq!(b_refused.len(), 1, "{b_refused:?}");
    assert!(
        b_refused
            .iter()
            .all(|r| r["decided_by"] == "timeout_not_allowed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_pool_audit_settings_and_changed_files_are_honoured() {
    for url in backends().await {
        let s = server(
            "[audit]\noutput_bytes = 8\n\
             [pools.python]\nwarm = 0\n\
             [pools.secret]\nwarm = 0\n[pools.secret.audit]\nkeep_code = false\noutput_bytes = 3\n",
            url.as_deref(),
        )
        .await;
        let open = session(&s.app, A, Some("python")).await;
        let secret = session(&s.app, A, Some("secret")).await;
        let code = "print('hello world'); write out.txt 42";
        for sid in [&open, &secret] {
            let (st, r) = exec(&s.app, A, sid, code).await;
            assert_eq!(st, StatusCode::OK, "{r}");
        }
        // A second run changes nothing new, then one changes the file again.
        exec(&s.app, A, &open, "print(1)").await;
        exec(&s.app, A, &open, "write out.txt 4242; write more.txt x").await;

        let execs: Vec<Value> = records(&s, "a")
            .await
            .into_iter()
            .filter(|r| r["kind"] == "execution")
            .collect();
        assert_eq!(execs.len(), 4, "{url:?}");
        let sha = ampoule_audit::sha256_hex(code.as_bytes());
        let (o, x) = (&execs[0], &execs[1]);
        assert_eq!(o["pool"], "python");
        assert_eq!(o["code"], code, "the global default keeps the code");
        assert_eq!(o["code_sha256"], sha.as_str());
        assert_eq!(o["stdout"], "hello wo", "[audit] output_bytes = 8");
        assert_eq!(x["pool"], "secret");
        assert_eq!(x["code"], Value::Null, "the pool keeps only the hash");
        assert_eq!(x["code_sha256"], sha.as_str());
        assert_eq!(x["stdout"], "hel", "[pools.secret.audit] output_bytes = 3");
        assert_eq!(o["files"], json!(["out.txt"]));
        assert_eq!(x["files"], json!(["out.txt"]));
        assert_eq!(execs[2]["files"], json!([]));
        assert_eq!(execs[3]["files"], json!(["more.txt", "out.txt"]));
        let v = s
            .state
            .manager
            .audit()
            .unwrap()
            .store
            .verify()
            .await
            .unwrap();
        assert!(v.ok(), "{v:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_pruning_per_pool_keeps_the_chain_verifiable() {
    for url in backends().await {
        let s = server(
            "[audit]\nretention_days = 30\n\
             [pools.short]\nwarm = 0\n[pools.short.audit]\nretention_days = 1\n\
             [pools.python]\nwarm = 0\n",
            url.as_deref(),
        )
        .await;
        let short = session(&s.app, A, Some("short")).await;
        exec(&s.app, A, &short, "print(1)").await;
        let long = session(&s.app, A, Some("python")).await;
        exec(&s.app, A, &long, "print(2)").await;
        records(&s, "a").await;
        let audit = s.state.manager.audit().unwrap();
        let store = audit.store.as_ref();
        let day = Duration::from_secs(86_400);
        let prune = |days: u32| {
            ampoule_server::serve::prune_audit(&s.cfg, store, SystemTime::now() + day * days)
        };
        // Nothing is due today.
        assert_eq!(prune(0).await.unwrap(), 0);
        // In two days `short` is past its retention, `python` (30 days) is not.
        assert_eq!(prune(2).await.unwrap(), 2, "{url:?}");
        let left = records(&s, "a").await;
        assert!(left.iter().all(|r| r["pool"] == "python"), "{left:?}");
        assert_eq!(left.len(), 2);
        let v = store.verify().await.unwrap();
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.checked, 2);
        // In 31 days everything is; the chain continues after it.
        assert_eq!(prune(31).await.unwrap(), 2);
        exec(&s.app, A, &long, "print(3)").await;
        records(&s, "a").await;
        let v = store.verify().await.unwrap();
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.checked, 1);
    }
}

/// A raw HTTP/1.1 request to `addr`; the status code and the body.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    (status, body)
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_audits_on_its_own_and_serves_metrics_on_their_own_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, metrics) = (free_port(), free_port());
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n[metrics]\nlisten = \"{metrics}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n[pools.python]\nwarm = 0\n",
        dir.path().join("data").display(),
        sha256_hex(A),
    );
    let cfg = Config::parse(&text).unwrap();
    let keys = ampoule_server::serve::keys(&cfg).unwrap();
    let state =
        ampoule_server::serve::state(&cfg, Arc::new(FakeEngine::new(dir.path())), keys).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn({
        let (cfg, listen) = (cfg.clone(), listen.clone());
        async move {
            ampoule_server::serve::serve_with(&cfg, Some(&listen), state, async {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    // Wait until it answers (no timed assertion: connection attempts until it listens).
    let mut up = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(&listen).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(up, "the server never listened");
    let (st, body) = http(&listen, "POST", "/v1/sessions", Some(A), "{}").await;
    assert_eq!(st, 201, "{body}");
    let sid = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (st, body) = http(
        &listen,
        "POST",
        &format!("/v1/sessions/{sid}/executions"),
        Some(A),
        r#"{"code":"print(7)"}"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // The metrics listener needs no key; the main one does.
    let (st, page) = http(&metrics, "GET", "/metrics", None, "").await;
    assert_eq!(st, 200);
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert_eq!(
        value(
            &scrape,
            "ampoule_executions_total",
            &[("pool", "python"), ("status", "succeeded")]
        ),
        1.0
    );
    let (st, _) = http(&listen, "GET", "/metrics", None, "").await;
    assert_eq!(st, 401);
    stop_tx.send(()).unwrap();
    served.await.unwrap().unwrap();

    // It holds every tenant's code: only its owner may read it.
    use std::os::unix::fs::PermissionsExt;
    for f in ["audit.db", "audit.db-wal", "audit.db-shm"] {
        let path = dir.path().join("data").join(f);
        match std::fs::metadata(&path) {
            Ok(m) => assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}"),
            Err(_) => assert_ne!(f, "audit.db", "the database is missing"),
        }
    }
    // The store serve_with opened by itself holds the session's whole life, its end at the
    // shutdown included.
    let store = ampoule_audit::SqlStore::sqlite(&dir.path().join("data").join("audit.db"))
        .await
        .unwrap();
    use ampoule_audit::AuditStore;
    let page = store
        .query(&ampoule_audit::Filter {
            tenant: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let kinds: Vec<&str> = page
        .records
        .iter()
        .map(|r| r.record.kind.as_str())
        .collect();
    assert_eq!(kinds, ["session_created", "execution", "session_expired"]);
    assert_eq!(
        page.records[2].record.decided_by.as_deref(),
        Some("shutdown")
    );
    assert!(store.verify().await.unwrap().ok());
}

/// Three servers on one PostgreSQL audit database (as replicas are): a tenant's
/// `executions_per_minute` holds across them together — 4 per minute in all, however the
/// executions are spread — with 429 `rate_limited` and `Retry-After` on the others; another
/// tenant's window is its own. On SQLite (one server) each counts alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_per_minute_holds_across_servers_sharing_a_postgresql_database() {
    let Some(Some(url)) = backends().await.pop() else {
        return;
    };
    let extra = "[pools.python]\nwarm = 0\n[tenants.a]\nexecutions_per_minute = 4\n\
                 [tenants.b]\nexecutions_per_minute = 2\n";
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(server(extra, Some(&url)).await);
    }
    let mut sessions = Vec::new();
    for s in &servers {
        sessions.push(session(&s.app, A, None).await);
    }
    let (mut ok, mut limited) = (0, 0);
    for round in 0..3 {
        for (s, sid) in servers.iter().zip(&sessions) {
            let (st, h, body, text) = call_h(
                &s.app,
                "POST",
                &format!("/v1/sessions/{sid}/executions"),
                Some(A),
                Some(json!({ "code": format!("{round} + 1") })),
            )
            .await;
            match st {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    limited += 1;
                    assert_eq!(body["error"]["code"], "rate_limited", "{text}");
                    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
                    assert!((1..=60).contains(&wait), "{wait}");
                }
                other => panic!("{other}: {text}"),
            }
        }
    }
    assert_eq!(
        (ok, limited),
        (4, 5),
        "9 executions over 3 servers, 4 per minute"
    );
    // Tenant b's window is its own: 2 admitted across the servers, then refused.
    let mut b = Vec::new();
    for s in &servers {
        let sid = session(&s.app, B, None).await;
        b.push(exec(&s.app, B, &sid, "1").await.0);
    }
    assert_eq!(
        b,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
}
