//! `/v1/sandboxes`: sandboxes (metadata, timeout; their states are `durable.rs`'s), contexts,
//! executions, processes (streamed, waited for, in the background, re-attached, stdin and
//! signals), files and ports (a loopback server standing in for one inside), each with its
//! errors, and another tenant's sandbox answering 404 everywhere.

use super::*;
use base64::Engine as _;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Creates a sandbox of tenant A: its body (with the tokens).
async fn create(h: &Harness, body: Value) -> Value {
    let r = h.json("POST", "/v1/sandboxes", A, body).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// The NDJSON lines of a body.
fn lines(r: &Resp) -> Vec<Value> {
    String::from_utf8_lossy(&r.body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The decoded stdout of a process stream, and its end line.
fn stdout_and_end(events: &[Value]) -> (String, Value) {
    let mut out = Vec::new();
    for e in events {
        if e["type"] == "stdout" {
            out.extend(B64.decode(e["data"].as_str().unwrap()).unwrap());
        }
    }
    let end = events.last().unwrap().clone();
    assert_eq!(end["type"], "end", "{events:?}");
    (String::from_utf8(out).unwrap(), end)
}

fn assert_error(r: &Resp, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), code, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_are_created_listed_timed_and_killed() {
    let h = harness();
    let s = create(
        &h,
        json!({"metadata": {"team": "red"}, "envs": {"GREETING": "hi"}, "timeout_s": 120}),
    )
    .await;
    let id = s["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sbx_"), "{s}");
    assert_eq!(s["pool"], "python");
    assert_eq!(s["language"], "python");
    assert_eq!(s["kind"], "sandbox");
    assert_eq!(s["state"], "running");
    assert_eq!(s["metadata"]["team"], "red");
    assert_eq!(s["env_names"], json!(["GREETING"]));
    assert!(s["access_token"].as_str().unwrap().starts_with("ea_"));
    assert!(s["traffic_token"].as_str().unwrap().starts_with("et_"));
    assert!(s.get("envs").is_none(), "values are never answered back");
    let blue = create(&h, json!({"metadata": {"team": "blue"}})).await;
    // An empty body is all defaults.
    let plain = h
        .call("POST", "/v1/sandboxes", Some(A), Body::empty())
        .await;
    assert_eq!(plain.status, StatusCode::CREATED);

    let got = h
        .call(
            "GET",
            &format!("/v1/sandboxes/{id}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["id"], id.as_str());
    assert!(
        got.json().get("access_token").is_none(),
        "tokens only in the create answer"
    );

    let all = h
        .call("GET", "/v1/sandboxes", Some(A), Body::empty())
        .await
        .json();
    assert_eq!(all["sandboxes"].as_array().unwrap().len(), 3);
    for query in [
        "metadata.team=red",
        "metadata%5Bteam%5D=red",
        "metadata.team=red&state=running",
    ] {
        let r = h
            .call(
                "GET",
                &format!("/v1/sandboxes?{query}"),
                Some(A),
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{query}");
        let ids: Vec<String> = r.json()["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, std::slice::from_ref(&id), "{query}");
    }
    let r = h
        .call("GET", "/v1/sandboxes?state=paused", Some(A), Body::empty())
        .await;
    assert!(r.json()["sandboxes"].as_array().unwrap().is_empty());
    let r = h
        .call("GET", "/v1/sandboxes?team=red", Some(A), Body::empty())
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request");

    // A session is a sandbox too.
    let ses = h.json("POST", "/v1/sessions", A, json!({})).await.json();
    let r = h
        .call(
            "GET",
            &format!("/v1/sandboxes/{}", ses["id"].as_str().unwrap()),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["kind"], "session");

    let before = got.json()["end_at"].as_str().unwrap().to_owned();
    let r = h
        .json(
            "POST",
            &format!("/v1/sandboxes/{id}/timeout"),
            A,
            json!({"timeout_s": 3000}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json()["end_at"].as_str().unwrap() > before.as_str());
    for bad in [
        json!({}),
        json!({"timeout_s": 0}),
        json!({"timeout_s": -1}),
        json!({"timeout_s": 1.5}),
        json!({"timeout_s": 3_000_000_000u64}),
    ] {
        let r = h
            .json(
                "POST",
                &format!("/v1/sandboxes/{id}/timeout"),
                A,
                bad.clone(),
            )
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request");
    }

    // Pausing and resuming are `durable.rs`'s; a sandbox whose files are not on disk cannot
    // hibernate.
    let r = h
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/hibernate"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    for verb in ["pause", "resume", "hibernate"] {
        let r = h
            .call(
                "POST",
                &format!("/v1/sandboxes/sbx_nope/{verb}"),
                Some(A),
                Body::empty(),
            )
            .await;
        assert_error(&r, StatusCode::NOT_FOUND, "session_not_found");
    }

    let r = h
        .call(
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = h
        .call(
            "GET",
            &format!("/v1/sandboxes/{id}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "session_not_found");
    let r = h
        .call(
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "session_not_found");
    let r = h
        .call(
            "DELETE",
            &format!("/v1/sandboxes/{}", blue["id"].as_str().unwrap()),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    let started = h.stats.started.load(Ordering::SeqCst);
    for (bad, status, code) in [
        (
            json!({"metadata": {"": "x"}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"metadata": {"k": "x".repeat(1025)}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"envs": {"1A": "x"}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"envs": {"A=B": "x"}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"envs": {"A": "x\u{0}y"}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"timeout_s": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"size": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"pool": "nowhere"}),
            StatusCode::NOT_FOUND,
            "pool_not_found",
        ),
    ] {
        let r = h.json("POST", "/v1/sandboxes", A, bad.clone()).await;
        assert_eq!(
            r.status,
            status,
            "{bad}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), code, "{bad}");
    }
    assert_eq!(
        h.stats.started.load(Ordering::SeqCst),
        started,
        "a refusal started a sandbox"
    );
    let r = h.call("GET", "/v1/sandboxes", None, Body::empty()).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_and_executions_in_a_sandbox() {
    let h = harness();
    let id = create(&h, json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("/v1/sandboxes/{id}");

    let r = h
        .json(
            "POST",
            &format!("{base}/executions"),
            A,
            json!({"code": "write f.txt shared\nx = 6\nx * 7"}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        r.json()["execution_id"]
            .as_str()
            .unwrap()
            .starts_with("exe_")
    );
    assert_eq!(r.json()["result"]["application/json"], 42);

    let r = h
        .json(
            "POST",
            &format!("{base}/contexts"),
            A,
            json!({"language": "javascript", "cwd": "/mnt/data"}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let ctx = r.json();
    let cid = ctx["id"].as_str().unwrap().to_owned();
    assert_eq!(ctx["language"], "javascript");
    let r = h
        .call("POST", &format!("{base}/contexts"), Some(A), Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["language"], "python");

    let list = h
        .call("GET", &format!("{base}/contexts"), Some(A), Body::empty())
        .await
        .json();
    let contexts = list["contexts"].as_array().unwrap();
    assert_eq!(contexts.len(), 3);
    assert_eq!(contexts[0]["id"], "default");
    let r = h
        .call(
            "GET",
            &format!("{base}/contexts/{cid}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["id"], cid.as_str());

    // The context has state of its own and the sandbox's files.
    let r = h
        .json(
            "POST",
            &format!("{base}/executions"),
            A,
            json!({"code": "read f.txt\nx", "context": cid}),
        )
        .await;
    let v = r.json();
    assert_eq!(v["stdout"], "shared", "{v}");
    assert_eq!(v["error"]["name"], "NameError");
    // A language routes to that language's own context.
    let r = h
        .json(
            "POST",
            &format!("{base}/executions"),
            A,
            json!({"code": "y = 1\ny + 1", "language": "javascript"}),
        )
        .await;
    assert_eq!(r.json()["result"]["application/json"], 2);
    let r = h
        .json(
            "POST",
            &format!("{base}/executions"),
            A,
            json!({"code": "y", "language": "javascript"}),
        )
        .await;
    assert_eq!(r.json()["result"]["application/json"], 1);

    let r = h
        .json(
            "POST",
            &format!("{base}/executions/stream"),
            A,
            json!({"code": "print(hi)\n1", "context": "default"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "application/x-ndjson");
    let events = lines(&r);
    assert_eq!(events[0]["type"], "stdout");
    assert_eq!(events.last().unwrap()["type"], "result");

    let r = h
        .call(
            "POST",
            &format!("{base}/contexts/{cid}/restart"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = h
        .call(
            "POST",
            &format!("{base}/contexts/default/restart"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_error(&r, StatusCode::NOT_IMPLEMENTED, "not_supported");
    let r = h
        .call(
            "DELETE",
            &format!("{base}/contexts/default"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request");
    let r = h
        .call(
            "DELETE",
            &format!("{base}/contexts/{cid}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    for (method, uri) in [
        ("GET", format!("{base}/contexts/{cid}")),
        ("DELETE", format!("{base}/contexts/{cid}")),
        ("POST", format!("{base}/contexts/{cid}/restart")),
        ("GET", format!("{base}/contexts/ctx_nope")),
    ] {
        let r = h.call(method, &uri, Some(A), Body::empty()).await;
        assert_error(&r, StatusCode::NOT_FOUND, "context_not_found");
    }
    let r = h
        .json(
            "POST",
            &format!("{base}/executions"),
            A,
            json!({"code": "1", "context": "ctx_nope"}),
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "context_not_found");
    let r = h
        .json(
            "POST",
            &format!("{base}/executions"),
            A,
            json!({"code": "1", "context": "default", "language": "python"}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request");
    for bad in [
        json!({"language": "cobol"}),
        json!({"cwd": "relative"}),
        json!({"cwd": "/mnt/data/../etc"}),
        json!({"cwd": "/tmp/\u{7}"}),
        json!({"cwd": format!("/{}", "a".repeat(1024))}),
        json!({"shell": true}),
    ] {
        let r = h
            .json("POST", &format!("{base}/contexts"), A, bad.clone())
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_stream_wait_run_in_the_background_and_take_stdin_and_signals() {
    let h = harness();
    let id = create(&h, json!({"envs": {"WHO": "sbx"}})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("/v1/sandboxes/{id}");

    // Streamed (the default).
    let r = h
        .json(
            "POST",
            &format!("{base}/processes"),
            A,
            json!({"cmd": "echo out-$WHO-$X; echo err >&2; exit 3", "envs": {"X": "y"}}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.headers["content-type"], "application/x-ndjson");
    let events = lines(&r);
    assert_eq!(events[0]["type"], "start");
    assert!(events[0]["pid"].as_u64().is_some());
    assert!(events.iter().any(|e| e["type"] == "stderr"));
    let (out, end) = stdout_and_end(&events);
    assert_eq!(out, "out-sbx-y\n");
    assert_eq!(end["exit_code"], 3);
    assert_eq!(end["status"], "exit status 3");
    assert_eq!(end["signal"], Value::Null);

    // As server-sent events.
    let req = Request::builder()
        .method("POST")
        .uri(format!("{base}/processes"))
        .header("authorization", format!("Bearer {A}"))
        .header("accept", "text/event-stream")
        .body(Body::from(json!({"argv": ["echo", "sse"]}).to_string()))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.starts_with("event: start\ndata: {"), "{text}");
    assert!(text.contains("event: end\n"), "{text}");

    // Waited for.
    let r = h
        .json(
            "POST",
            &format!("{base}/processes"),
            A,
            json!({"argv": ["printf", "%s|", "a b", "c"], "wait": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(
        (v["stdout"].as_str(), v["exit_code"].as_i64()),
        (Some("a b|c|"), Some(0)),
        "{v}"
    );
    assert_eq!(v["argv"][0], "printf");

    // `cmd` with `argv`: its positional parameters ($0, $1, …), as `bash -c CMD ARGS…`.
    let r = h
        .json(
            "POST",
            &format!("{base}/processes"),
            A,
            json!({"cmd": "echo \"$0|$1\"", "argv": ["a b", "c"], "wait": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["stdout"].as_str(), Some("a b|c\n"), "{v}");

    // In the background, with stdin; listed, re-attached, fed and closed.
    let r = h
        .json(
            "POST",
            &format!("{base}/processes"),
            A,
            json!({"cmd": "cat; echo done", "stdin": true, "tag": "cat", "background": true}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let pid = r.json()["pid"].as_u64().unwrap();
    assert_eq!(r.json()["tag"], "cat");
    let list = h
        .call("GET", &format!("{base}/processes"), Some(A), Body::empty())
        .await
        .json();
    // (The processes above may still be on their way out.)
    let listed = list["processes"].as_array().unwrap();
    assert!(
        listed.iter().any(|p| p["pid"] == pid && p["tag"] == "cat"),
        "{list}"
    );
    let h2 = Harness {
        app: h.app.clone(),
        state: h.state.clone(),
        stats: h.stats.clone(),
        fail_starts: h.fail_starts.clone(),
        root: tempfile::tempdir().unwrap(),
    };
    let attach_uri = format!("{base}/processes/cat/stream");
    let attached =
        tokio::spawn(async move { h2.call("GET", &attach_uri, Some(A), Body::empty()).await });
    // Let the re-attached reader register before the input comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = h
        .json(
            "POST",
            &format!("{base}/processes/{pid}/stdin"),
            A,
            json!({"text": "hello "}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = h
        .json(
            "POST",
            &format!("{base}/processes/cat/stdin"),
            A,
            json!({"data": B64.encode("world\n")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = h
        .call(
            "POST",
            &format!("{base}/processes/{pid}/stdin/close"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = tokio::time::timeout(Duration::from_secs(20), attached)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let events = lines(&r);
    assert_eq!(events[0]["type"], "start");
    assert_eq!(events[0]["pid"], pid);
    let (out, end) = stdout_and_end(&events);
    assert_eq!(out, "hello world\ndone\n");
    assert_eq!(end["exit_code"], 0);

    // Killed by a signal, by name.
    let r = h
        .json(
            "POST",
            &format!("{base}/processes"),
            A,
            json!({"cmd": "sleep 30", "background": true}),
        )
        .await;
    let pid = r.json()["pid"].as_u64().unwrap();
    let h3 = Harness {
        app: h.app.clone(),
        state: h.state.clone(),
        stats: h.stats.clone(),
        fail_starts: h.fail_starts.clone(),
        root: tempfile::tempdir().unwrap(),
    };
    let attach_uri = format!("{base}/processes/{pid}/stream");
    let attached =
        tokio::spawn(async move { h3.call("GET", &attach_uri, Some(A), Body::empty()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for bad in [
        json!({"signal": "SIGFOO"}),
        json!({"signal": 0}),
        json!({"signal": 65}),
        json!({"signal": -9}),
        json!({"signal": 1e20}),
        json!({"signal": "kill"}),
        json!({}),
    ] {
        let r = h
            .json(
                "POST",
                &format!("{base}/processes/{pid}/signal"),
                A,
                bad.clone(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = h
        .json(
            "POST",
            &format!("{base}/processes/{pid}/signal"),
            A,
            json!({"signal": "SIGKILL"}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = tokio::time::timeout(Duration::from_secs(20), attached)
        .await
        .unwrap()
        .unwrap();
    let end = lines(&r).last().unwrap().clone();
    assert_eq!(
        (end["signal"].as_i64(), end["status"].as_str()),
        (Some(9), Some("signal: killed")),
        "{end}"
    );

    // Not there (any more).
    for (method, uri, body) in [
        ("GET", format!("{base}/processes/{pid}/stream"), json!(null)),
        (
            "POST",
            format!("{base}/processes/{pid}/signal"),
            json!({"signal": 9}),
        ),
        (
            "POST",
            format!("{base}/processes/{pid}/stdin"),
            json!({"text": "x"}),
        ),
        (
            "POST",
            format!("{base}/processes/{pid}/stdin/close"),
            json!(null),
        ),
        (
            "GET",
            format!("{base}/processes/no-such-tag/stream"),
            json!(null),
        ),
    ] {
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let r = h.call(method, &uri, Some(A), body).await;
        assert_error(&r, StatusCode::NOT_FOUND, "process_not_found");
    }

    // Refused before anything runs.
    let sleeper = h
        .json(
            "POST",
            &format!("{base}/processes"),
            A,
            json!({"cmd": "sleep 30", "background": true}),
        )
        .await
        .json();
    let sleeper = sleeper["pid"].as_u64().unwrap();
    for bad in [
        json!({"cmd": ""}),
        json!({"argv": []}),
        json!({"cmd": "echo hello", "argv": []}),
        json!({"argv": ["a\u{0}b"]}),
        json!({"argv": vec!["x"; 257]}),
        json!({"argv": ["x".repeat(4097)]}),
        json!({"cmd": "true", "cwd": "relative"}),
        json!({"cmd": "true", "cwd": "/mnt/../etc"}),
        json!({"cmd": "true", "envs": {"A B": "x"}}),
        json!({"cmd": "true", "timeout_s": 0}),
        json!({"cmd": "true", "timeout_s": 1e300}),
        json!({"cmd": "true", "tag": ""}),
        json!({"cmd": "true", "pty": true}),
        json!({"argv": "true"}),
    ] {
        let r = h
            .json("POST", &format!("{base}/processes"), A, bad.clone())
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), "invalid_request", "{bad}");
    }
    for bad in [
        json!({"data": "%%%"}),
        json!({"data": "eA==", "text": "x"}),
        json!({}),
        json!({"bytes": "x"}),
    ] {
        let r = h
            .json(
                "POST",
                &format!("{base}/processes/{sleeper}/stdin"),
                A,
                bad.clone(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // Started without stdin: nothing to write to.
    let r = h
        .json(
            "POST",
            &format!("{base}/processes/{sleeper}/stdin"),
            A,
            json!({"text": "x"}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request");
    let r = h
        .json(
            "POST",
            &format!("{base}/processes/{sleeper}/signal"),
            A,
            json!({"signal": 15}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxes_files_are_the_session_files_api() {
    let h = harness();
    let id = create(&h, json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("/v1/sandboxes/{id}");
    let r = h
        .call(
            "PUT",
            &format!("{base}/files/dir/a.txt"),
            Some(A),
            Body::from("alpha"),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = h
        .upload(
            &format!("{base}/files"),
            A,
            "multipart/form-data; boundary=b",
            multipart("b", "b.txt", b"beta"),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let list = h
        .call("GET", &format!("{base}/files"), Some(A), Body::empty())
        .await
        .json();
    let mut paths: Vec<&str> = list["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    paths.sort();
    assert_eq!(paths, ["b.txt", "dir/a.txt"]);
    let r = h
        .call(
            "GET",
            &format!("{base}/files/dir/a.txt/content"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.body, b"alpha");
    let r = h
        .call(
            "GET",
            &format!("{base}/files/dir/a.txt"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["size"], 5);
    // A process sees them, and what it writes is a file of the sandbox.
    let r = h
        .json(
            "POST",
            &format!("{base}/processes"),
            A,
            json!({"cmd": "cat dir/a.txt b.txt > c.txt", "wait": true}),
        )
        .await;
    assert_eq!(r.json()["exit_code"], 0, "{}", r.json());
    let r = h
        .call(
            "GET",
            &format!("{base}/files/c.txt/content"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.body, b"alphabeta");
    // The session paths reach a sandbox by its id too.
    let r = h
        .call(
            "GET",
            &format!("/v1/sessions/{id}/files/c.txt/content"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.body, b"alphabeta");
    let r = h
        .call(
            "DELETE",
            &format!("{base}/files/c.txt"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = h
        .call(
            "GET",
            &format!("{base}/files/c.txt"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "file_not_found");
    let r = h
        .call("GET", &format!("{base}/files/../x"), Some(A), Body::empty())
        .await;
    assert!(r.status.is_client_error(), "{}", r.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_sandbox_is_not_found_anywhere() {
    let h = harness();
    let s = create(&h, json!({})).await;
    let id = s["id"].as_str().unwrap().to_owned();
    let base = format!("/v1/sandboxes/{id}");
    let cid = h
        .call("POST", &format!("{base}/contexts"), Some(A), Body::empty())
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pid = h
        .json(
            "POST",
            &format!("{base}/processes"),
            A,
            json!({"cmd": "sleep 30", "background": true, "stdin": true}),
        )
        .await
        .json()["pid"]
        .as_u64()
        .unwrap();
    h.call(
        "PUT",
        &format!("{base}/files/a.txt"),
        Some(A),
        Body::from("a"),
    )
    .await;
    let cases: Vec<(&str, String, Value)> = vec![
        ("GET", base.clone(), json!(null)),
        ("DELETE", base.clone(), json!(null)),
        ("POST", format!("{base}/timeout"), json!({"timeout_s": 10})),
        ("POST", format!("{base}/pause"), json!(null)),
        ("POST", format!("{base}/contexts"), json!({})),
        ("GET", format!("{base}/contexts"), json!(null)),
        ("GET", format!("{base}/contexts/{cid}"), json!(null)),
        ("DELETE", format!("{base}/contexts/{cid}"), json!(null)),
        (
            "POST",
            format!("{base}/contexts/{cid}/restart"),
            json!(null),
        ),
        ("POST", format!("{base}/executions"), json!({"code": "1"})),
        (
            "POST",
            format!("{base}/executions/stream"),
            json!({"code": "1"}),
        ),
        ("POST", format!("{base}/processes"), json!({"cmd": "true"})),
        ("GET", format!("{base}/processes"), json!(null)),
        ("GET", format!("{base}/processes/{pid}/stream"), json!(null)),
        (
            "POST",
            format!("{base}/processes/{pid}/stdin"),
            json!({"text": "x"}),
        ),
        (
            "POST",
            format!("{base}/processes/{pid}/stdin/close"),
            json!(null),
        ),
        (
            "POST",
            format!("{base}/processes/{pid}/signal"),
            json!({"signal": 9}),
        ),
        ("GET", format!("{base}/files"), json!(null)),
        ("GET", format!("{base}/files/a.txt/content"), json!(null)),
        ("PUT", format!("{base}/files/b.txt"), json!(null)),
        ("DELETE", format!("{base}/files/a.txt"), json!(null)),
        ("GET", format!("{base}/ports/8080/"), json!(null)),
    ];
    for (method, uri, body) in cases {
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let r = h.call(method, &uri, Some(B), body).await;
        assert_error(&r, StatusCode::NOT_FOUND, "session_not_found");
    }
    let list = h
        .call("GET", "/v1/sandboxes", Some(B), Body::empty())
        .await
        .json();
    assert!(list["sandboxes"].as_array().unwrap().is_empty());
    // Still all there for A.
    let r = h
        .call("GET", &format!("{base}/processes"), Some(A), Body::empty())
        .await;
    assert_eq!(r.json()["processes"][0]["pid"], pid);
    let r = h
        .call(
            "GET",
            &format!("{base}/files/a.txt/content"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.body, b"a");
    let r = h.call("DELETE", &base, Some(A), Body::empty()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

/// A one-request HTTP server on the loopback: answers `hello` and hands back the request
/// head it got.
async fn one_request_server() -> (u16, tokio::task::JoinHandle<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request ended early");
            head.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 418 I'm a teapot\r\ncontent-length: 5\r\nx-inside: yes\r\nconnection: close\r\n\r\nhello")
            .await
            .unwrap();
        String::from_utf8_lossy(&head).into_owned()
    });
    (port, task)
}

async fn with_token(h: &Harness, uri: &str, token: &str) -> Resp {
    let req = Request::builder()
        .method("GET")
        .uri(uri)
        .header("x-access-token", token)
        .body(Body::empty())
        .unwrap();
    h.send(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_reach_a_server_inside_with_the_key_or_the_traffic_token() {
    let h = harness();
    let s = create(&h, json!({})).await;
    let id = s["id"].as_str().unwrap().to_owned();
    let traffic = s["traffic_token"].as_str().unwrap().to_owned();
    let access = s["access_token"].as_str().unwrap().to_owned();

    // With the owner's key: the path after the port and the query go on, the key does not.
    let (port, server) = one_request_server().await;
    let r = h
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/ports/{port}/api/items%20x?q=1&r=2"),
            Some(A),
            Body::from("body"),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::IM_A_TEAPOT,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.body, b"hello");
    assert_eq!(r.headers["x-inside"], "yes");
    let head = server.await.unwrap();
    assert!(
        head.starts_with("POST /api/items%20x?q=1&r=2 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("host: localhost:{port}")),
        "{head}"
    );

    // With the traffic token and no key; and the server's root.
    let (port, server) = one_request_server().await;
    let r = with_token(&h, &format!("/v1/sandboxes/{id}/ports/{port}"), &traffic).await;
    assert_eq!(
        r.status,
        StatusCode::IM_A_TEAPOT,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let head = server.await.unwrap();
    assert!(head.starts_with("GET / HTTP/1.1\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains(&traffic), "{head}");

    // Wrong credentials: the access token is not the traffic token, nor is another sandbox's.
    let other = create(&h, json!({})).await;
    for token in [
        access.as_str(),
        other["traffic_token"].as_str().unwrap(),
        "et_wrong",
        "",
    ] {
        let r = with_token(&h, &format!("/v1/sandboxes/{id}/ports/{port}/"), token).await;
        assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let r = h
        .call(
            "GET",
            &format!("/v1/sandboxes/{id}/ports/{port}/"),
            None,
            Body::empty(),
        )
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
    let r = h
        .call(
            "GET",
            &format!("/v1/sandboxes/{id}/ports/{port}/"),
            Some(B),
            Body::empty(),
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "session_not_found");
    let r = with_token(
        &h,
        &format!("/v1/sandboxes/sbx_nope/ports/{port}/"),
        &traffic,
    )
    .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");

    // Bad ports, and one nobody listens on (the server above is gone).
    for bad in ["0", "65536", "-1", "http", "80.5"] {
        let r = h
            .call(
                "GET",
                &format!("/v1/sandboxes/{id}/ports/{bad}/x"),
                Some(A),
                Body::empty(),
            )
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let r = h
        .call(
            "GET",
            &format!("/v1/sandboxes/{id}/ports/{port}/x"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_error(&r, StatusCode::BAD_GATEWAY, "port_unreachable");
}
