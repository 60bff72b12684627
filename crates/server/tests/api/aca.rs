//! The ACA-compatible door: execution results in ACA shape, both API-version families
//! (their file round trips with every client quirk), lenient identifiers, session delete.

use super::*;

#[tokio::test]
async fn execute_returns_typed_results_and_keeps_state() {
    let h = harness();
    let r = h.exec("", "s-0001", A, "6 * 7").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["$id"], "1");
    let p = &v["properties"];
    assert_eq!(p["$id"], "2");
    assert_eq!(p["status"], "Success");
    assert_eq!(p["result"], 42);
    assert_eq!(p["executionResult"], 42);
    assert_eq!(p["stdout"], "");
    assert_eq!(p["stderr"], "");
    assert!(p["executionTimeInMilliseconds"].is_u64());

    // State survives, whatever prefix the client glued the path onto.
    assert_eq!(
        h.exec("", "s-0001", A, "x = 5").await.json()["properties"]["result"],
        ""
    );
    for prefix in [
        "/pools/python",
        "/subscriptions/s/resourceGroups/r/providers/Microsoft.App/sessionPools/python",
        "/some/arbitrary/prefix",
        "/pools/python/",
    ] {
        let r = h.exec(prefix, "s-0001", A, "x * 2").await;
        assert_eq!(r.json()["properties"]["result"], 10, "{prefix}");
    }
    let r = h
        .json(
            "POST",
            &format!("//code//execute?{V1}&identifier=s-0001"),
            A,
            json!({"properties": {"code": "x + 1"}}),
        )
        .await;
    assert_eq!(r.json()["properties"]["result"], 6);
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 1);

    // Another pool is another session.
    let r = h.exec("/pools/other", "s-0001", A, "x").await;
    assert_eq!(r.json()["properties"]["status"], "Failure");
}

#[tokio::test]
async fn failures_strings_prints_and_images_in_aca_shape() {
    let h = harness();
    let p = h.exec("", "f-0001", A, "raise ValueError").await.json()["properties"].clone();
    assert_eq!(p["status"], "Failure");
    assert_eq!(p["result"], "");
    assert!(p["stderr"].as_str().unwrap().contains("ValueError"), "{p}");

    let p = h.exec("", "f-0001", A, "print('hi')\n'text'").await.json()["properties"].clone();
    assert_eq!(p["stdout"], "hi\n");
    assert_eq!(p["result"], "text");

    let p = h.exec("", "f-0001", A, "plot").await.json()["properties"].clone();
    assert_eq!(
        p["result"],
        json!({"type": "image", "format": "png", "base64_data": PNG_1X1})
    );
    let p = h.exec("", "f-0001", A, "image").await.json()["properties"].clone();
    assert_eq!(p["result"]["format"], "png");

    // The legacy endpoint answers flat, with the identifier in the body.
    let r = h
        .json(
            "POST",
            "/python/execute",
            A,
            json!({"properties": {"identifier": "f-0001", "pythonCode": "6 * 7"}}),
        )
        .await;
    assert_eq!(r.json()["result"], 42);
    assert_eq!(r.json()["status"], "Success");
}

#[tokio::test]
async fn family_b_executions_and_files() {
    let h = harness();
    let r = h
        .json(
            "POST",
            &format!("/executions?identifier=b-0001&{V2}"),
            A,
            json!({"codeInputType": "Inline", "executionType": "Synchronous", "code": "6 * 7", "timeoutInSeconds": 100}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["status"], "Succeeded");
    assert_eq!(v["identifier"], "b-0001");
    assert_eq!(v["executionType"], "Synchronous");
    assert_eq!(v["result"]["executionResult"], 42);
    for k in ["stdout", "stderr", "executionTimeInMilliseconds"] {
        assert!(!v["result"][k].is_null(), "{k} missing: {v}");
    }
    assert!(r.headers.contains_key("operation-id"));

    let up = h
        .upload(
            &format!("/files?identifier=b-0001&{V2}&path=/mnt/data"),
            A,
            "multipart/form-data; boundary=xyz",
            multipart("xyz", "notes.txt", b"hello"),
        )
        .await;
    assert_eq!(
        up.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&up.body)
    );
    let f = up.json();
    assert_eq!(f["name"], "notes.txt");
    assert_eq!(f["sizeInBytes"], 5);
    assert_eq!(f["type"], "File");
    assert!(f["lastModifiedAt"].is_string());

    let list = h
        .call(
            "GET",
            &format!("/files?identifier=b-0001&{V2}"),
            Some(A),
            Body::empty(),
        )
        .await
        .json();
    assert_eq!(list["nextLink"], Value::Null);
    assert_eq!(list["value"][0]["name"], "notes.txt");
    let got = h
        .call(
            "GET",
            &format!("/files/notes.txt/content?identifier=b-0001&{V2}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(got.body, b"hello");
    let meta = h
        .call(
            "GET",
            &format!("/files/notes.txt?identifier=b-0001&{V2}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(meta.json()["sizeInBytes"], 5);
    let del = h
        .call(
            "DELETE",
            &format!("/files/notes.txt?identifier=b-0001&{V2}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let list = h
        .call(
            "GET",
            &format!("/files?identifier=b-0001&{V2}"),
            Some(A),
            Body::empty(),
        )
        .await
        .json();
    assert_eq!(list["value"], json!([]));

    let s = h
        .call(
            "GET",
            "/session?identifier=b-0001&api-version=2025-02-02-preview",
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(s.json()["identifier"], "b-0001");
    let l = h
        .call(
            "GET",
            "/listSessions?api-version=2025-02-02-preview",
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(l.json()["sessions"][0]["identifier"], "b-0001");
}

#[tokio::test]
async fn family_a_file_round_trip_with_every_client_quirk() {
    let h = harness();
    let base = format!("identifier=files-0001&{V1}");
    // LangChain: a plain name.
    let r = h
        .upload(
            &format!("/files/upload?{base}"),
            A,
            "multipart/form-data; boundary=b1",
            multipart("b1", "test1.txt", b"hello world!!!!!"),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    assert_eq!(v["$id"], "1");
    assert_eq!(v["value"][0]["$id"], "2");
    let props = &v["value"][0]["properties"];
    assert_eq!(props["$id"], "3");
    assert_eq!(props["filename"], "test1.txt");
    assert_eq!(props["size"], 16);
    let t = props["lastModifiedTime"].as_str().unwrap();
    assert!(t.ends_with('Z') && t.len() == 28, "{t}");

    // llama-index and SK: `/mnt/data/` in the part's file name; SK: Content-Type lies.
    let r = h
        .upload(
            &format!("/files/upload?{base}"),
            A,
            "application/json",
            multipart("sk-boundary-123", "/mnt/data/data.csv", b"a,b\n1,2\n"),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["value"][0]["properties"]["filename"], "data.csv");

    // autogen: chunked, no Content-Length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        multipart("ag", "sub/chunked.bin", &[7u8; 200_000])
            .chunks(1000)
            .map(|c| Ok(c.to_vec()))
            .collect();
    let req = Request::builder()
        .method("POST")
        .uri(format!("/files/upload?{base}"))
        .header("authorization", format!("Bearer {A}"))
        .header("content-type", "multipart/form-data; boundary=ag")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["value"][0]["properties"]["size"], 200_000);

    let list = h
        .call("GET", &format!("/files?{base}"), Some(A), Body::empty())
        .await
        .json();
    let names: Vec<&str> = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["properties"]["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data.csv", "sub/chunked.bin", "test1.txt"]);

    let got = h
        .call(
            "GET",
            &format!("/files/content/test1.txt?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, b"hello world!!!!!");
    assert_eq!(got.headers["content-type"], "text/plain; charset=utf-8");
    let got = h
        .call(
            "GET",
            &format!("/files/content/sub%2Fchunked.bin?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(got.body.len(), 200_000);
    let got = h
        .call(
            "GET",
            &format!("/files/content/sub/chunked.bin?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(got.body.len(), 200_000);
    let got = h
        .call(
            "GET",
            &format!("/files/content/%2Fmnt%2Fdata%2Fdata.csv?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(got.body, b"a,b\n1,2\n");

    let one = h
        .call(
            "GET",
            &format!("/files/test1.txt?{base}"),
            Some(A),
            Body::empty(),
        )
        .await
        .json();
    assert_eq!(one["value"][0]["properties"]["size"], 16);

    let del = h
        .call(
            "DELETE",
            &format!("/files/test1.txt?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(del.status, StatusCode::OK);
    assert_eq!(del.json()["message"], "file deleted successfully");
    let missing = h
        .call(
            "GET",
            &format!("/files/content/test1.txt?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_aca_error(&missing, StatusCode::NOT_FOUND, "FileNotFound");

    // A multipart body without any boundary at all is refused, not guessed.
    let r = h
        .upload(
            &format!("/files/upload?{base}"),
            A,
            "application/json",
            b"{\"not\": \"multipart\"}".to_vec(),
        )
        .await;
    assert_aca_error(
        &r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
    );
}

#[tokio::test]
async fn identifiers_are_parsed_leniently_and_checked() {
    let h = harness();
    // Fully encoded (langchain-azure-compute) and raw (SK, autogen) name the same session.
    h.exec("", "a%7Cb%2Bc", A, "y = 3").await;
    assert_eq!(
        h.exec("", "a|b+c", A, "y").await.json()["properties"]["result"],
        3
    );
    let r = h.exec("", "", A, "1").await;
    assert_aca_error(
        &r,
        StatusCode::BAD_REQUEST,
        "SessionRequestValidationFailed",
    );
    let long = "x".repeat(257);
    let r = h.exec("", &long, A, "1").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = h
        .json(
            "POST",
            &format!("/code/execute?{V1}"),
            A,
            json!({"properties": {"code": "1"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Bad bodies are 400s, never 500s.
    for body in [
        "",
        "not json",
        "{\"properties\": {}}",
        "[]",
        "{\"properties\": {\"code\": 5}}",
    ] {
        let r = h
            .call(
                "POST",
                &format!("/code/execute?identifier=id-0001&{V1}"),
                Some(A),
                Body::from(body),
            )
            .await;
        assert_aca_error(
            &r,
            StatusCode::BAD_REQUEST,
            "SessionRequestValidationFailed",
        );
    }
    let r = h
        .call("GET", "/code/execute?identifier=x", Some(A), Body::empty())
        .await;
    assert_aca_error(&r, StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed");
    let r = h.call("GET", "/nothing/here", Some(A), Body::empty()).await;
    assert_aca_error(&r, StatusCode::NOT_FOUND, "NotFound");
    let r = h.exec("/pools/nope", "id-0001", A, "1").await;
    assert_aca_error(&r, StatusCode::NOT_FOUND, "SessionPoolNotFound");
}

#[tokio::test]
async fn delete_session_answers_204_and_forgets_state() {
    let h = harness();
    h.exec("", "del-0001", A, "x = 1").await;
    let uri = "/session?identifier=del-0001&api-version=2025-10-02-preview";
    let r = h.call("DELETE", uri, Some(A), Body::empty()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
    assert_eq!(h.stats.closed.load(Ordering::SeqCst), 1);
    let r = h.call("DELETE", uri, Some(A), Body::empty()).await;
    assert_aca_error(&r, StatusCode::NOT_FOUND, "SessionWithIdentifierNotFound");
    // The same identifier later is a fresh session.
    let p = h.exec("", "del-0001", A, "x").await.json()["properties"].clone();
    assert_eq!(p["status"], "Failure");
}
