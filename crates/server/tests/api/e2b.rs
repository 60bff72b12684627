//! The E2B-compatible door: control plane (keys, tenants, templates, error shapes), the data
//! plane's authentication (access token, traffic token for ports), envd's Connect framing
//! (processes and files) and the code interpreter's NDJSON, against the fake engine.

use super::*;

use base64::Engine as _;

const ENVD: &str = "49983";
const JUPYTER: &str = "49999";

/// Creates a sandbox for `key` and answers the create response.
async fn create(h: &Harness, key: &str, body: Value) -> Value {
    let r = e2b_api(h, "POST", "/v2/sandboxes", Some(key), Some(body)).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// A control-plane request with `X-API-KEY`.
async fn e2b_api(
    h: &Harness,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    h.send(req.body(body).unwrap()).await
}

fn assert_e2b_error(r: &Resp, status: StatusCode) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["code"], status.as_u16(), "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

/// A data-plane request as the SDK sends it (routing headers, access token).
fn dp(method: &str, uri: &str, sbx: &Value, port: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("e2b-sandbox-id", sbx["sandboxID"].as_str().unwrap())
        .header("e2b-sandbox-port", port)
        .header("x-access-token", sbx["envdAccessToken"].as_str().unwrap())
}

/// A unary Connect call to envd.
async fn unary(h: &Harness, sbx: &Value, method: &str, msg: Value) -> Resp {
    let req = dp("POST", &format!("/{method}"), sbx, ENVD)
        .header("content-type", "application/json")
        .header("connect-protocol-version", "1")
        .body(Body::from(msg.to_string()))
        .unwrap();
    h.send(req).await
}

fn envelope(msg: &Value) -> Vec<u8> {
    let json = msg.to_string().into_bytes();
    let mut out = vec![0u8];
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// A server-streaming Connect call to envd; answers the HTTP status and the frames.
async fn stream(
    h: &Harness,
    sbx: &Value,
    method: &str,
    msg: Value,
) -> (StatusCode, Vec<(u8, Value)>) {
    let req = dp("POST", &format!("/{method}"), sbx, ENVD)
        .header("content-type", "application/connect+json")
        .header("connect-timeout-ms", "20000")
        .body(Body::from(envelope(&msg)))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(
        r.headers["content-type"],
        "application/connect+json",
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    (r.status, frames(&r.body))
}

fn frames(mut b: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let flags = b[0];
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        out.push((flags, serde_json::from_slice(&b[5..5 + len]).unwrap()));
        b = &b[5 + len..];
    }
    out
}

fn ndjson(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn control_plane_creates_lists_times_connects_and_kills() {
    let h = harness();
    let sbx = create(
        &h,
        A,
        json!({"templateID": "code-interpreter-v1", "timeout": 60, "metadata": {"k": "v w"},
               "envVars": {"GREETING": "hi"}}),
    )
    .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sbx_"), "{sbx}");
    assert_eq!(
        sbx["templateID"], "python",
        "the SDK's default template is the default pool"
    );
    assert_eq!(sbx["envdVersion"], "0.5.7");
    assert_eq!(sbx["domain"], "ampoule.localhost");
    assert!(sbx["envdAccessToken"].as_str().unwrap().len() > 20);
    assert!(sbx["trafficAccessToken"].as_str().unwrap().len() > 20);

    // The Python SDK's metadata filter: `k=v` with each part quoted again.
    let listed = e2b_api(
        &h,
        "GET",
        "/v2/sandboxes?metadata=k%3Dv%2520w&limit=100",
        Some(A),
        None,
    )
    .await;
    assert_eq!(listed.status, StatusCode::OK);
    let l = listed.json();
    assert_eq!(l.as_array().unwrap().len(), 1, "{l}");
    assert_eq!(l[0]["sandboxID"], id.as_str());
    assert_eq!(l[0]["state"], "running");
    assert_eq!(l[0]["metadata"]["k"], "v w");
    let none = e2b_api(&h, "GET", "/v2/sandboxes?metadata=k%3Dother", Some(A), None).await;
    assert_eq!(none.json(), json!([]));
    let paused = e2b_api(&h, "GET", "/v2/sandboxes?state=paused", Some(A), None).await;
    assert_eq!(paused.json(), json!([]));

    let info = e2b_api(&h, "GET", &format!("/sandboxes/{id}"), Some(A), None).await;
    assert_eq!(info.status, StatusCode::OK);
    let i = info.json();
    assert_eq!(i["sandboxID"], id.as_str());
    for field in [
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "envdVersion",
    ] {
        assert!(!i[field].is_null(), "{field}: {i}");
    }

    let t = e2b_api(
        &h,
        "POST",
        &format!("/sandboxes/{id}/timeout"),
        Some(A),
        Some(json!({"timeout": 120})),
    )
    .await;
    assert_eq!(
        t.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&t.body)
    );

    let c = e2b_api(
        &h,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(A),
        Some(json!({"timeout": 100})),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.json()["envdAccessToken"], sbx["envdAccessToken"]);
    assert_eq!(c.json()["trafficAccessToken"], sbx["trafficAccessToken"]);

    // Paused (memory kept), paused again (409: the SDKs answer `false`), listed as paused,
    // and back on `connect` (201: it was woken).
    let p = e2b_api(&h, "POST", &format!("/sandboxes/{id}/pause"), Some(A), None).await;
    assert_eq!(
        p.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&p.body)
    );
    let again = e2b_api(&h, "POST", &format!("/sandboxes/{id}/pause"), Some(A), None).await;
    assert_e2b_error(&again, StatusCode::CONFLICT);
    let paused = e2b_api(&h, "GET", "/v2/sandboxes?state=paused", Some(A), None).await;
    assert_eq!(paused.json()[0]["sandboxID"], id.as_str());
    assert_eq!(paused.json()[0]["state"], "paused");
    let running = e2b_api(&h, "GET", "/v2/sandboxes?state=running", Some(A), None).await;
    assert_eq!(running.json(), json!([]));
    let c = e2b_api(
        &h,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(A),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        c.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&c.body)
    );
    assert_eq!(c.json()["sessionState"], "kept");
    let info = e2b_api(&h, "GET", &format!("/sandboxes/{id}"), Some(A), None).await;
    assert_eq!(info.json()["state"], "running");
    // A filesystem-only pause needs a sandbox whose files are on disk.
    let fs = e2b_api(
        &h,
        "POST",
        &format!("/sandboxes/{id}/pause"),
        Some(A),
        Some(json!({"memory": false})),
    )
    .await;
    assert_e2b_error(&fs, StatusCode::BAD_REQUEST);
    let r = e2b_api(
        &h,
        "POST",
        &format!("/sandboxes/{id}/resume"),
        Some(A),
        None,
    )
    .await;
    assert_e2b_error(&r, StatusCode::CONFLICT);

    let k = e2b_api(&h, "DELETE", &format!("/sandboxes/{id}"), Some(A), None).await;
    assert_eq!(k.status, StatusCode::NO_CONTENT);
    let gone = e2b_api(&h, "GET", &format!("/sandboxes/{id}"), Some(A), None).await;
    assert_e2b_error(&gone, StatusCode::NOT_FOUND);
    let again = e2b_api(&h, "DELETE", &format!("/sandboxes/{id}"), Some(A), None).await;
    assert_e2b_error(&again, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn control_plane_checks_keys_tenants_and_templates() {
    let h = harness();
    let no_key = e2b_api(
        &h,
        "POST",
        "/v2/sandboxes",
        None,
        Some(json!({"templateID": "base"})),
    )
    .await;
    assert_e2b_error(&no_key, StatusCode::UNAUTHORIZED);
    let bad_key = e2b_api(&h, "GET", "/v2/sandboxes", Some("nope"), None).await;
    assert_e2b_error(&bad_key, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.stats.started.load(Ordering::SeqCst),
        0,
        "a refused create starts nothing"
    );

    let unknown = e2b_api(
        &h,
        "POST",
        "/v2/sandboxes",
        Some(A),
        Some(json!({"templateID": "no-such"})),
    )
    .await;
    assert_e2b_error(&unknown, StatusCode::NOT_FOUND);
    let paused = e2b_api(
        &h,
        "POST",
        "/v2/sandboxes",
        Some(A),
        Some(json!({"templateID": "base", "autoPause": true})),
    )
    .await;
    // Durable sandboxes need the server's store (this harness has none: `durable.rs` has).
    assert_e2b_error(&paused, StatusCode::NOT_IMPLEMENTED);

    // A named pool is a template; Bearer keys work too.
    let req = Request::builder()
        .method("POST")
        .uri("/sandboxes")
        .header("authorization", format!("Bearer {A}"))
        .header("content-type", "application/json")
        .body(Body::from(json!({"templateID": "other"}).to_string()))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let sbx = r.json();
    assert_eq!(sbx["templateID"], "other");
    let id = sbx["sandboxID"].as_str().unwrap();

    // Another tenant's sandbox is a 404, for every verb.
    for (method, uri, body) in [
        ("GET", format!("/sandboxes/{id}"), None),
        ("DELETE", format!("/sandboxes/{id}"), None),
        (
            "POST",
            format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 10})),
        ),
        (
            "POST",
            format!("/v2/sandboxes/{id}/connect"),
            Some(json!({})),
        ),
        ("POST", format!("/sandboxes/{id}/pause"), None),
        ("POST", format!("/sandboxes/{id}/resume"), None),
    ] {
        let r = e2b_api(&h, method, &uri, Some(B), body).await;
        assert_e2b_error(&r, StatusCode::NOT_FOUND);
    }
    let listed = e2b_api(&h, "GET", "/v2/sandboxes", Some(B), None).await;
    assert_eq!(listed.json(), json!([]));
    // Still A's.
    let mine = e2b_api(&h, "GET", &format!("/sandboxes/{id}"), Some(A), None).await;
    assert_eq!(mine.status, StatusCode::OK);
    // Other routes are untouched.
    let health = h.call("GET", "/healthz", None, Body::empty()).await;
    assert_eq!(health.status, StatusCode::OK);
}

#[tokio::test]
async fn the_data_plane_takes_the_sandbox_token_only() {
    let h = harness();
    let sbx = create(&h, A, json!({})).await;
    let other = create(&h, B, json!({})).await;
    let id = sbx["sandboxID"].as_str().unwrap();

    let ok = h
        .send(
            dp("GET", "/health", &sbx, ENVD)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);

    let missing = Request::builder()
        .uri("/health")
        .header("e2b-sandbox-id", id)
        .header("e2b-sandbox-port", ENVD)
        .body(Body::empty())
        .unwrap();
    assert_e2b_error(&h.send(missing).await, StatusCode::UNAUTHORIZED);

    // A wrong token (here: another tenant's sandbox's) is answered as a missing sandbox: a
    // 502 that the SDK reads as "not running".
    for token in ["ea_wrong", other["envdAccessToken"].as_str().unwrap()] {
        let req = Request::builder()
            .uri("/health")
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", ENVD)
            .header("x-access-token", token)
            .body(Body::empty())
            .unwrap();
        let r = h.send(req).await;
        assert_e2b_error(&r, StatusCode::BAD_GATEWAY);
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("was not found")
        );
    }
    // The traffic token alone does not open envd.
    let req = Request::builder()
        .uri("/health")
        .header("e2b-sandbox-id", id)
        .header("e2b-sandbox-port", ENVD)
        .header(
            "e2b-traffic-access-token",
            sbx["trafficAccessToken"].as_str().unwrap(),
        )
        .body(Body::empty())
        .unwrap();
    assert_e2b_error(&h.send(req).await, StatusCode::UNAUTHORIZED);
    // The code interpreter takes either (the SDKs send only the traffic token for contexts).
    let req = Request::builder()
        .uri("/contexts")
        .header("e2b-sandbox-id", id)
        .header("e2b-sandbox-port", JUPYTER)
        .header(
            "e2b-traffic-access-token",
            sbx["trafficAccessToken"].as_str().unwrap(),
        )
        .body(Body::empty())
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()[0]["id"], "default");
}

/// A one-shot HTTP server on the host loopback: the fake engine's sandbox ports.
async fn tiny_server() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let leaked = head.to_ascii_lowercase().contains("access-token");
            let body = format!("hello from inside; tokens leaked: {leaked}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    (port, hits)
}

#[tokio::test]
async fn ports_need_the_traffic_token_and_forward_http() {
    let h = harness();
    let sbx = create(&h, A, json!({})).await;
    let id = sbx["sandboxID"].as_str().unwrap();
    let (port, hits) = tiny_server().await;
    let host = format!("{port}-{id}.ampoule.localhost:8080");

    let none = Request::builder()
        .uri("/x")
        .header("host", &host)
        .body(Body::empty())
        .unwrap();
    assert_e2b_error(&h.send(none).await, StatusCode::UNAUTHORIZED);
    // The access token is not the traffic token.
    let wrong = Request::builder()
        .uri("/x")
        .header("host", &host)
        .header(
            "e2b-traffic-access-token",
            sbx["envdAccessToken"].as_str().unwrap(),
        )
        .body(Body::empty())
        .unwrap();
    assert_e2b_error(&h.send(wrong).await, StatusCode::FORBIDDEN);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "nothing reached the sandbox"
    );

    let ok = Request::builder()
        .uri("/x?y=1")
        .header("host", &host)
        .header(
            "e2b-traffic-access-token",
            sbx["trafficAccessToken"].as_str().unwrap(),
        )
        .body(Body::empty())
        .unwrap();
    let r = h.send(ok).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "hello from inside; tokens leaked: false"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // By headers too; a port nothing listens on is a 502 saying so.
    let (dead, _) = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (l.local_addr().unwrap().port(), drop(l))
    };
    let req = Request::builder()
        .uri("/")
        .header("e2b-sandbox-id", id)
        .header("e2b-sandbox-port", dead.to_string())
        .header(
            "e2b-traffic-access-token",
            sbx["trafficAccessToken"].as_str().unwrap(),
        )
        .body(Body::empty())
        .unwrap();
    let r = h.send(req).await;
    assert_e2b_error(&r, StatusCode::BAD_GATEWAY);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("port is not open"),
        "{}",
        r.json()
    );
}

#[tokio::test]
async fn processes_stream_as_connect_frames() {
    let h = harness();
    let sbx = create(&h, A, json!({"envVars": {"GREETING": "hola"}})).await;
    let (status, f) = stream(
        &h,
        &sbx,
        "process.Process/Start",
        json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo $GREETING; echo oops >&2; exit 3"],
                           "envs": {}, "cwd": "/home/user"}, "stdin": false}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(f[0].1["event"]["start"]["pid"].as_u64().is_some(), "{f:?}");
    let mut out = Vec::new();
    let mut err = Vec::new();
    for (_, v) in &f {
        if let Some(s) = v["event"]["data"]["stdout"].as_str() {
            out.extend(base64::engine::general_purpose::STANDARD.decode(s).unwrap());
        }
        if let Some(s) = v["event"]["data"]["stderr"].as_str() {
            err.extend(base64::engine::general_purpose::STANDARD.decode(s).unwrap());
        }
    }
    assert_eq!(String::from_utf8_lossy(&out), "hola\n");
    assert_eq!(String::from_utf8_lossy(&err), "oops\n");
    let n = f.len();
    assert_eq!(f[n - 2].1["event"]["end"]["exitCode"], 3, "{f:?}");
    assert_eq!(f[n - 2].1["event"]["end"]["status"], "exit status 3");
    assert_eq!(f[n - 1], (2, json!({})), "the stream ends cleanly");

    // Errors of a stream are in its end frame, with HTTP 200.
    let (status, f) = stream(
        &h,
        &sbx,
        "process.Process/Start",
        json!({"process": {"cmd": "/bin/bash"}, "pty": {"size": {"cols": 80, "rows": 24}}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].0, 2);
    assert_eq!(f[0].1["error"]["code"], "unimplemented");
    let (_, f) = stream(
        &h,
        &sbx,
        "process.Process/Connect",
        json!({"process": {"pid": 999999}}),
    )
    .await;
    assert_eq!(f[0].1["error"]["code"], "not_found");

    // Unary errors are Connect JSON with the protocol's status.
    let r = unary(
        &h,
        &sbx,
        "process.Process/SendSignal",
        json!({"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["code"], "not_found");
    let r = unary(&h, &sbx, "process.Process/Update", json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(r.json()["code"], "unimplemented");
    let r = unary(&h, &sbx, "process.Process/List", json!({})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json()["processes"].is_array());
    let bad = dp("POST", "/process.Process/List", &sbx, ENVD)
        .header("content-type", "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let r = h.send(bad).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["code"], "invalid_argument");
}

#[tokio::test]
async fn background_processes_take_stdin_and_signals() {
    let h = harness();
    let sbx = create(&h, A, json!({})).await;
    // Started in the background (the stream is read in another task, like the SDK).
    let app = h.app.clone();
    let req = dp("POST", "/process.Process/Start", &sbx, ENVD)
        .header("content-type", "application/connect+json")
        .body(Body::from(envelope(&json!({
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "read line; echo got $line; sleep 30"]},
            "stdin": true, "tag": "bg"}))))
        .unwrap();
    let running = tokio::spawn(async move {
        let resp = app.oneshot(req).await.unwrap();
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    });
    let mut pid = None;
    for _ in 0..100 {
        let r = unary(&h, &sbx, "process.Process/List", json!({})).await;
        if let Some(p) = r.json()["processes"]
            .as_array()
            .and_then(|p| p.first().cloned())
        {
            assert_eq!(p["tag"], "bg");
            assert_eq!(p["config"]["cmd"], "/bin/bash");
            pid = p["pid"].as_u64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = pid.expect("the process is listed");
    let stdin = base64::engine::general_purpose::STANDARD.encode("ping\n");
    let r = unary(
        &h,
        &sbx,
        "process.Process/SendInput",
        json!({"process": {"tag": "bg"}, "input": {"stdin": stdin}}),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = unary(
        &h,
        &sbx,
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let body = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    let f = frames(&body);
    let out: Vec<u8> = f
        .iter()
        .filter_map(|(_, v)| v["event"]["data"]["stdout"].as_str())
        .flat_map(|s| base64::engine::general_purpose::STANDARD.decode(s).unwrap())
        .collect();
    assert_eq!(String::from_utf8_lossy(&out), "got ping\n");
    let end = &f[f.len() - 2].1["event"]["end"];
    assert_eq!(end["status"], "signal: killed", "{f:?}");
    assert_eq!(end["exited"], false);
}

#[tokio::test]
async fn files_map_home_user_onto_mnt_data() {
    let h = harness();
    let sbx = create(&h, A, json!({})).await;
    // Multipart, as the SDK writes one file.
    let req = dp(
        "POST",
        "/files?path=%2Fhome%2Fuser%2Fdir%2Fa.txt",
        &sbx,
        ENVD,
    )
    .header("content-type", "multipart/form-data; boundary=XyZ")
    .body(Body::from(multipart(
        "XyZ",
        "/home/user/dir/a.txt",
        b"alpha",
    )))
    .unwrap();
    let r = h.send(req).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        r.json(),
        json!([{"name": "a.txt", "type": "file", "path": "/home/user/dir/a.txt"}])
    );
    // Octet-stream (envd >= 0.5.7).
    let req = dp("POST", "/files?path=b.bin", &sbx, ENVD)
        .header("content-type", "application/octet-stream")
        .body(Body::from(vec![1u8, 2, 3]))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()[0]["path"], "/home/user/b.bin");
    assert!(
        h.data_dir_with("b.bin").join("dir/a.txt").exists(),
        "it is /mnt/data"
    );

    let get = |path: &str| {
        dp("GET", &format!("/files?path={path}"), &sbx, ENVD)
            .body(Body::empty())
            .unwrap()
    };
    let r = h.send(get("/home/user/dir/a.txt")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, b"alpha");
    let r = h.send(get("/mnt/data/dir/a.txt")).await;
    assert_eq!(r.body, b"alpha");
    assert_e2b_error(
        &h.send(get("/home/user/missing")).await,
        StatusCode::NOT_FOUND,
    );
    let r = h.send(get("/etc/passwd")).await;
    assert_e2b_error(&r, StatusCode::BAD_REQUEST);
    assert!(r.json()["message"].as_str().unwrap().contains("/home/user"));

    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/Stat",
        json!({"path": "/home/user/dir/a.txt"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let e = &r.json()["entry"];
    assert_eq!(e["type"], "FILE_TYPE_FILE");
    assert_eq!(e["size"], 5);
    assert_eq!(e["name"], "a.txt");
    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/Stat",
        json!({"path": "/home/user/nope"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["code"], "not_found");
    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/Stat",
        json!({"path": "/tmp/x"}),
    )
    .await;
    assert_eq!(r.json()["code"], "invalid_argument");

    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/ListDir",
        json!({"path": "/home/user", "depth": 1}),
    )
    .await;
    let mut names: Vec<String> = r.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["name"].as_str().unwrap(),
                e["type"].as_str().unwrap()
            )
        })
        .collect();
    names.sort();
    assert_eq!(names, ["b.bin:FILE_TYPE_FILE", "dir:FILE_TYPE_DIRECTORY"]);

    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/MakeDir",
        json!({"path": "/home/user/new/deep"}),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/MakeDir",
        json!({"path": "/home/user/new/deep"}),
    )
    .await;
    assert_eq!(r.json()["code"], "already_exists");
    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/Stat",
        json!({"path": "/home/user/new/deep"}),
    )
    .await;
    assert_eq!(r.json()["entry"]["type"], "FILE_TYPE_DIRECTORY");

    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/Move",
        json!({"source": "/home/user/dir/a.txt", "destination": "/home/user/new/a2.txt"}),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["entry"]["path"], "/home/user/new/a2.txt");
    assert_e2b_error(
        &h.send(get("/home/user/dir/a.txt")).await,
        StatusCode::NOT_FOUND,
    );
    assert_eq!(h.send(get("/home/user/new/a2.txt")).await.body, b"alpha");

    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/Remove",
        json!({"path": "/home/user/new"}),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_e2b_error(
        &h.send(get("/home/user/new/a2.txt")).await,
        StatusCode::NOT_FOUND,
    );
}

#[tokio::test]
async fn watchers_report_what_changed() {
    let h = harness();
    let sbx = create(&h, A, json!({})).await;
    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/CreateWatcher",
        json!({"path": "/home/user", "recursive": false}),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let wid = r.json()["watcherId"].as_str().unwrap().to_owned();
    let req = dp("POST", "/files?path=w.txt", &sbx, ENVD)
        .header("content-type", "application/octet-stream")
        .body(Body::from("x"))
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::OK);
    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/GetWatcherEvents",
        json!({"watcherId": wid}),
    )
    .await;
    assert_eq!(
        r.json()["events"],
        json!([{"name": "w.txt", "type": "EVENT_TYPE_CREATE"}])
    );
    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/GetWatcherEvents",
        json!({"watcherId": wid}),
    )
    .await;
    assert_eq!(r.json()["events"], json!([]));
    // Another sandbox cannot read it.
    let other = create(&h, A, json!({})).await;
    let r = unary(
        &h,
        &other,
        "filesystem.Filesystem/GetWatcherEvents",
        json!({"watcherId": wid}),
    )
    .await;
    assert_eq!(r.json()["code"], "not_found");
    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/RemoveWatcher",
        json!({"watcherId": wid}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = unary(
        &h,
        &sbx,
        "filesystem.Filesystem/GetWatcherEvents",
        json!({"watcherId": wid}),
    )
    .await;
    assert_eq!(r.json()["code"], "not_found");
}

async fn execute(h: &Harness, sbx: &Value, body: Value) -> Resp {
    let req = dp("POST", "/execute", sbx, JUPYTER)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    h.send(req).await
}

#[tokio::test]
async fn run_code_streams_ndjson_and_contexts_work() {
    let h = harness();
    let sbx = create(&h, A, json!({})).await;
    let r = execute(&h, &sbx, json!({"code": "print(hi)\nplot\n1 + 1", "context_id": null, "language": null, "env_vars": null})).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let lines = ndjson(&r.body);
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "stdout",
            "result",
            "result",
            "number_of_executions",
            "end_of_execution"
        ],
        "{lines:?}"
    );
    assert_eq!(lines[0]["text"], "hi\n");
    assert!(lines[0]["timestamp"].as_u64().is_some());
    assert!(lines[1]["png"].is_string());
    assert_eq!(lines[1]["is_main_result"], false);
    assert_eq!(lines[2]["text"], "2");
    assert_eq!(lines[2]["json"], 2);
    assert_eq!(lines[2]["is_main_result"], true);
    assert_eq!(lines[3]["execution_count"], 1);

    let r = execute(&h, &sbx, json!({"code": "raise ValueError"})).await;
    let lines = ndjson(&r.body);
    let err = lines
        .iter()
        .find(|l| l["type"] == "error")
        .expect("an error line");
    assert_eq!(err["name"], "ValueError");
    assert!(
        err["traceback"].is_string(),
        "E2B's traceback is one string"
    );

    let both = execute(
        &h,
        &sbx,
        json!({"code": "1", "context_id": "default", "language": "python"}),
    )
    .await;
    assert_e2b_error(&both, StatusCode::BAD_REQUEST);

    // Contexts.
    let req = dp("POST", "/contexts", &sbx, JUPYTER)
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"language": "python", "cwd": "/home/user"}).to_string(),
        ))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let ctx = r.json();
    assert_eq!(ctx["language"], "python");
    assert_eq!(ctx["cwd"], "/home/user");
    let cid = ctx["id"].as_str().unwrap();
    let r = execute(
        &h,
        &sbx,
        json!({"code": "x = 41\nx + 1", "context_id": cid}),
    )
    .await;
    let lines = ndjson(&r.body);
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "result" && l["text"] == "42"),
        "{lines:?}"
    );
    let r = execute(&h, &sbx, json!({"code": "x", "context_id": "default"})).await;
    assert!(
        ndjson(&r.body).iter().any(|l| l["type"] == "error"),
        "contexts do not share state"
    );

    let list = h
        .send(
            dp("GET", "/contexts", &sbx, JUPYTER)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(list.json().as_array().unwrap().len(), 2);
    let restart = h
        .send(
            dp("POST", &format!("/contexts/{cid}/restart"), &sbx, JUPYTER)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        restart.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&restart.body)
    );
    let del = h
        .send(
            dp("DELETE", &format!("/contexts/{cid}"), &sbx, JUPYTER)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let r = execute(&h, &sbx, json!({"code": "1", "context_id": cid})).await;
    assert_e2b_error(&r, StatusCode::NOT_FOUND);
}
