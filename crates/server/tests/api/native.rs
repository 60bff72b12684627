//! The native `/v1` API: sessions, executions and files, streaming, error bodies with stable
//! codes, malformed requests, and the committed OpenAPI document.

use super::*;

#[tokio::test]
async fn native_api_sessions_executions_and_files() {
    let h = harness();
    let r = h
        .json("POST", "/v1/sessions", A, json!({"identifier": "native-1"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let s = r.json();
    let id = s["id"].as_str().unwrap().to_owned();
    assert_eq!(s["pool"], "python");
    assert_eq!(s["language"], "python");
    let r = h
        .json("POST", "/v1/sessions", A, json!({"identifier": "native-1"}))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], id.as_str());
    let empty = h.call("POST", "/v1/sessions", Some(A), Body::empty()).await;
    assert_eq!(
        empty.status,
        StatusCode::CREATED,
        "an empty body means defaults"
    );
    assert_eq!(empty.json()["pool"], "python");
    let empty_id = empty.json()["id"].as_str().unwrap().to_owned();
    h.call(
        "DELETE",
        &format!("/v1/sessions/{empty_id}"),
        Some(A),
        Body::empty(),
    )
    .await;
    let anon = h
        .json("POST", "/v1/sessions", A, json!({"pool": "other"}))
        .await;
    assert_eq!(anon.status, StatusCode::CREATED);
    assert_eq!(anon.json()["pool"], "other");

    let r = h
        .json(
            "POST",
            &format!("/v1/sessions/{id}/executions"),
            A,
            json!({"code": "z = 6\nz * 7"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["session_state"], "kept");
    assert_eq!(v["result"]["application/json"], 42);
    assert_eq!(v["result"]["text/plain"], "42");
    let v = h
        .json(
            "POST",
            &format!("/v1/sessions/{id}/executions"),
            A,
            json!({"code": "raise KeyError", "language": "py"}),
        )
        .await
        .json();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["name"], "KeyError");
    let r = h
        .json(
            "POST",
            &format!("/v1/sessions/{id}/executions"),
            A,
            json!({"code": "1", "language": "javascript"}),
        )
        .await;
    // A known language that is not the session's conflicts with it (409, as documented).
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "language_mismatch");
    let r = h
        .json(
            "POST",
            &format!("/v1/sessions/{id}/executions"),
            A,
            json!({"code": "1", "timeout_s": -1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v = h
        .json(
            "POST",
            &format!("/v1/sessions/{id}/executions"),
            A,
            json!({"code": "sleep 5", "timeout_s": 0.2}),
        )
        .await
        .json();
    assert_eq!(v["status"], "timed_out");

    // Files: raw PUT, metadata, content, multipart POST, list with ?path=, delete.
    let r = h
        .call(
            "PUT",
            &format!("/v1/sessions/{id}/files/dir/a.txt"),
            Some(A),
            Body::from("alpha"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["path"], "dir/a.txt");
    assert_eq!(r.json()["size"], 5);
    let r = h
        .call(
            "GET",
            &format!("/v1/sessions/{id}/files/dir/a.txt"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["size"], 5);
    let r = h
        .call(
            "GET",
            &format!("/v1/sessions/{id}/files/dir/a.txt/content"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.body, b"alpha");
    let r = h
        .upload(
            &format!("/v1/sessions/{id}/files?path=dir"),
            A,
            "multipart/form-data; boundary=q",
            multipart("q", "b.txt", b"beta"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["files"][0]["path"], "dir/b.txt");
    let r = h
        .call(
            "PUT",
            &format!("/v1/sessions/{id}/files/top.txt"),
            Some(A),
            Body::from("t"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let all = h
        .call(
            "GET",
            &format!("/v1/sessions/{id}/files"),
            Some(A),
            Body::empty(),
        )
        .await
        .json();
    assert_eq!(all["files"].as_array().unwrap().len(), 3);
    let sub = h
        .call(
            "GET",
            &format!("/v1/sessions/{id}/files?path=/mnt/data/dir"),
            Some(A),
            Body::empty(),
        )
        .await
        .json();
    let paths: Vec<&str> = sub["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["dir/a.txt", "dir/b.txt"]);
    let r = h
        .call(
            "DELETE",
            &format!("/v1/sessions/{id}/files/dir/a.txt"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = h
        .call(
            "GET",
            &format!("/v1/sessions/{id}/files/dir/a.txt/content"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "file_not_found");
    let r = h
        .call(
            "GET",
            &format!("/v1/sessions/{id}/files/dir"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.code(), "not_a_file");

    let list = h
        .call("GET", "/v1/sessions", Some(A), Body::empty())
        .await
        .json();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 2);
    let got = h
        .call("GET", &format!("/v1/sessions/{id}"), Some(A), Body::empty())
        .await
        .json();
    assert_eq!(got["executions"], 3);
    let pools = h
        .call("GET", "/v1/pools", Some(A), Body::empty())
        .await
        .json();
    assert_eq!(pools["pools"][0]["name"], "other");
    assert_eq!(pools["pools"][1]["sessions"], 1);
    assert_eq!(pools["pools"][1]["max_sessions"], 600);

    let r = h
        .call(
            "DELETE",
            &format!("/v1/sessions/{id}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = h
        .call("GET", &format!("/v1/sessions/{id}"), Some(A), Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn streaming_executions_deliver_events_then_the_result() {
    let h = harness();
    let id = h.json("POST", "/v1/sessions", A, json!({})).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = h
        .json(
            "POST",
            &format!("/v1/sessions/{id}/executions/stream"),
            A,
            json!({"code": "print(one)\nplot\neprint(two)\n6 * 7"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = String::from_utf8(r.body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["stdout", "display", "stderr", "result"]);
    assert_eq!(lines[0]["text"], "one\n");
    assert_eq!(lines[3]["result"]["result"]["application/json"], 42);

    let req = Request::builder()
        .method("POST")
        .uri(format!("/v1/sessions/{id}/executions/stream"))
        .header("authorization", format!("Bearer {A}"))
        .header("accept", "text/event-stream")
        .body(Body::from(json!({"code": "print(x)\n1"}).to_string()))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.starts_with("event: stdout\ndata: {"), "{text}");
    assert!(text.contains("\n\nevent: result\ndata: {"), "{text}");
}

#[tokio::test]
async fn native_errors_are_json_with_stable_codes() {
    let h = harness();
    let cases: Vec<(&str, &str, &str, StatusCode, &str)> = vec![
        (
            "POST",
            "/v1/sessions",
            "{",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sessions",
            "{\"pool\": 5}",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sessions",
            "{\"poool\": \"x\"}",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sessions",
            "{\"pool\": \"nope\"}",
            StatusCode::NOT_FOUND,
            "pool_not_found",
        ),
        (
            "POST",
            "/v1/sessions",
            "{\"identifier\": \"\"}",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "GET",
            "/v1/sessions/ses_missing",
            "",
            StatusCode::NOT_FOUND,
            "session_not_found",
        ),
        (
            "PATCH",
            "/v1/sessions",
            "",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            "GET",
            "/v1/sessions/x/files/%FF/content",
            "",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        ("GET", "/v1/nothing", "", StatusCode::NOT_FOUND, "not_found"),
    ];
    for (method, uri, body, status, code) in cases {
        let r = h.call(method, uri, Some(A), Body::from(body)).await;
        assert_eq!(
            r.status,
            status,
            "{method} {uri} {body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), code, "{method} {uri} {body}");
        assert!(!r.headers.contains_key("x-ms-error-code"));
    }
}

#[test]
fn the_committed_openapi_document_matches_the_code() {
    let doc = serde_json::to_string_pretty(&ampoule_server::openapi()).unwrap() + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json");
    if std::env::var_os("AMPOULE_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &doc).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == doc,
        "openapi.json is out of date with the handlers; regenerate it with\n  \
         AMPOULE_UPDATE_OPENAPI=1 cargo test -p ampoule-server --test api the_committed_openapi\n\
         and commit the result"
    );
}

#[tokio::test]
async fn malformed_requests_are_never_server_errors() {
    let h = harness();
    let sid = h.json("POST", "/v1/sessions", A, json!({})).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let truncated =
        b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nabc".to_vec();
    let no_name = multipart("b", "", b"abc");
    let cases: Vec<(&str, String, Option<&str>, Vec<u8>)> = vec![
        (
            "PUT",
            format!("/code/execute?identifier=g-1&{V1}"),
            None,
            b"{}".to_vec(),
        ),
        (
            "POST",
            format!("/code/execute?identifier=g-1&{V1}"),
            None,
            vec![0xff, 0xfe, 0x00],
        ),
        (
            "POST",
            "/code/execute?identifier=%FF%FE".to_owned(),
            None,
            b"{}".to_vec(),
        ),
        (
            "POST",
            "/code/execute?identifier=a%00b".to_owned(),
            None,
            b"{}".to_vec(),
        ),
        (
            "GET",
            format!("/files/content/%ZZ?identifier=g-1&{V1}"),
            None,
            vec![],
        ),
        (
            "GET",
            format!("/files/content/%FF?identifier=g-1&{V1}"),
            None,
            vec![],
        ),
        (
            "GET",
            format!("/files/content/.?identifier=g-1&{V1}"),
            None,
            vec![],
        ),
        (
            "GET",
            format!("/files/content/a%2F..?identifier=g-1&{V1}"),
            None,
            vec![],
        ),
        (
            "POST",
            format!("/files/upload?identifier=g-1&{V1}"),
            Some("multipart/form-data; boundary=b"),
            truncated.clone(),
        ),
        (
            "POST",
            format!("/files/upload?identifier=g-1&{V1}"),
            Some("application/json"),
            truncated,
        ),
        (
            "POST",
            format!("/files/upload?identifier=g-1&{V1}"),
            Some("multipart/form-data; boundary=b"),
            no_name,
        ),
        (
            "POST",
            format!("/files/upload?identifier=g-1&{V1}"),
            Some("multipart/form-data"),
            vec![],
        ),
        (
            "POST",
            format!("/files/upload?identifier=g-1&{V1}"),
            None,
            vec![],
        ),
        (
            "POST",
            format!("/files?identifier=g-1&{V2}&path=..%2F.."),
            Some("multipart/form-data; boundary=b"),
            multipart("b", "x", b"1"),
        ),
        (
            "GET",
            format!("/files?identifier=g-1&{V2}&path=..%2F.."),
            None,
            vec![],
        ),
        (
            "DELETE",
            format!("/files/sub?identifier=g-1&{V1}"),
            None,
            vec![],
        ),
        (
            "GET",
            format!("/executions/abc?identifier=g-1&{V2}"),
            None,
            vec![],
        ),
        (
            "PUT",
            format!("/v1/sessions/{sid}/files/"),
            None,
            b"x".to_vec(),
        ),
        (
            "PUT",
            format!("/v1/sessions/{sid}/files/a%00b"),
            None,
            b"x".to_vec(),
        ),
        (
            "GET",
            format!("/v1/sessions/{sid}/files/content"),
            None,
            vec![],
        ),
        (
            "GET",
            format!("/v1/sessions/{sid}/files/%2F/content"),
            None,
            vec![],
        ),
        (
            "POST",
            format!("/v1/sessions/{sid}/executions"),
            None,
            b"{\"code\": 1}".to_vec(),
        ),
        (
            "POST",
            format!("/v1/sessions/{sid}/executions"),
            None,
            b"{\"code\": \"1\", \"timeout_s\": 1e400}".to_vec(),
        ),
        (
            "POST",
            format!("/v1/sessions/{sid}/files?path=%2Fetc"),
            Some("multipart/form-data; boundary=b"),
            multipart("b", "x", b"1"),
        ),
        (
            "DELETE",
            format!("/v1/sessions/{sid}/files/nothing"),
            None,
            vec![],
        ),
    ];
    for (method, uri, ct, body) in cases {
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .header("authorization", format!("Bearer {A}"));
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = h.send(req.body(Body::from(body)).unwrap()).await;
        assert!(
            r.status.is_client_error(),
            "{method} {uri}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert!(!r.code().is_empty(), "{method} {uri}: no error code");
    }
}
