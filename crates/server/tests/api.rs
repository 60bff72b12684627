//! API tests: the whole router driven with `oneshot` against the fake engine (no socket, no
//! root). Covers the ACA quirks, both API-version families, the native API, file attacks
//! (traversal, symlinks and hard links planted in a session), tenant isolation, limits and the
//! error bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ampoule_server::config::sha256_hex;
use ampoule_server::fake::{FakeEngine, FakeStats, PNG_1X1};
use ampoule_server::{AppState, Config, app};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const A: &str = "key-of-tenant-a";
const B: &str = "key-of-tenant-b";
const V1: &str = "api-version=2024-02-02-preview";
const V2: &str = "api-version=2024-10-02-preview";

struct Harness {
    app: Router,
    state: AppState,
    stats: Arc<FakeStats>,
    fail_starts: Arc<std::sync::atomic::AtomicUsize>,
    root: tempfile::TempDir,
}

fn harness_with(extra: &str) -> Harness {
    let root = tempfile::tempdir().unwrap();
    let text = format!(
        "[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
         [[auth.keys]]\ntenant = \"b\"\nkey_sha256 = \"{}\"\n{extra}",
        sha256_hex(A),
        sha256_hex(B)
    );
    let cfg = Config::parse(&text).unwrap();
    let engine = FakeEngine::new(root.path());
    let stats = engine.stats.clone();
    let fail_starts = engine.fail_starts.clone();
    let keys = ampoule_server::serve::keys(&cfg).unwrap();
    let state = ampoule_server::serve::state(&cfg, Arc::new(engine), keys).unwrap();
    Harness {
        app: app(state.clone()),
        state,
        stats,
        fail_starts,
        root,
    }
}

fn harness() -> Harness {
    harness_with("[pools.python]\nwarm = 0\n[pools.other]\nwarm = 0\n")
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

impl Harness {
    async fn send(&self, req: Request<Body>) -> Resp {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: &str, uri: &str, key: Option<&str>, body: Body) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        self.send(req.body(body).unwrap()).await
    }

    async fn json(&self, method: &str, uri: &str, key: &str, body: Value) -> Resp {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        self.send(req).await
    }

    async fn exec(&self, prefix: &str, id: &str, key: &str, code: &str) -> Resp {
        self.json(
            "POST",
            &format!("{prefix}/code/execute?identifier={id}&{V1}"),
            key,
            json!({"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}}),
        )
        .await
    }

    async fn upload(&self, uri: &str, key: &str, content_type: &str, body: Vec<u8>) -> Resp {
        let req = Request::builder()
            .method("POST")
            .uri(uri)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap();
        self.send(req).await
    }

    /// The data directory of the session holding `marker` (found by its contents).
    fn data_dir_with(&self, marker: &str) -> PathBuf {
        for entry in std::fs::read_dir(self.root.path()).unwrap() {
            let data = entry.unwrap().path().join("data");
            if data.join(marker).exists() {
                return data;
            }
        }
        panic!("no session holds {marker}");
    }
}

fn multipart(boundary: &str, filename: &str, contents: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(contents);
    b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    b
}

fn assert_aca_error(r: &Resp, status: StatusCode, aca_code: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["x-ms-error-code"], aca_code);
    assert_eq!(r.code(), aca_code);
    assert!(r.json()["error"]["message"].is_string());
}

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
async fn uploads_over_the_limit_answer_413_and_leave_nothing() {
    let h = harness_with("[server]\nmax_upload_mib = 1\n[pools.python]\nwarm = 0\n");
    let base = format!("identifier=big-0001&{V1}");
    h.exec("", "big-0001", A, "1").await;
    let big = multipart("bb", "big.bin", &vec![1u8; 2 * 1024 * 1024]);
    // Announced length: refused before reading.
    let r = h
        .upload(
            &format!("/files/upload?{base}"),
            A,
            "multipart/form-data; boundary=bb",
            big.clone(),
        )
        .await;
    assert_aca_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    // Chunked: refused while streaming, with the content type lying too.
    let chunks = || -> Vec<Result<Vec<u8>, std::io::Error>> {
        big.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect()
    };
    for ct in ["multipart/form-data; boundary=bb", "application/json"] {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/files/upload?{base}"))
            .header("authorization", format!("Bearer {A}"))
            .header("content-type", ct)
            .body(Body::from_stream(futures_util::stream::iter(chunks())))
            .unwrap();
        let r = h.send(req).await;
        assert_aca_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    }
    // Native raw upload, chunked.
    let s = h
        .json("POST", "/v1/sessions", A, json!({"identifier": "big-0001"}))
        .await
        .json();
    let id = s["id"].as_str().unwrap();
    let req = Request::builder()
        .method("PUT")
        .uri(format!("/v1/sessions/{id}/files/raw.bin"))
        .header("authorization", format!("Bearer {A}"))
        .body(Body::from_stream(futures_util::stream::iter(chunks())))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "payload_too_large");
    let list = h
        .call("GET", &format!("/files?{base}"), Some(A), Body::empty())
        .await
        .json();
    assert_eq!(list["value"], json!([]), "a partial upload was left behind");
    let dir = h.root.path();
    let leftovers: Vec<_> = walk(dir).into_iter().filter(|p| p.is_file()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[tokio::test]
async fn traversal_and_absolute_paths_are_refused() {
    let h = harness();
    let base = format!("identifier=trav-0001&{V1}");
    for name in [
        "../escape.txt",
        "/etc/passwd",
        "a/../../escape.txt",
        "/mnt/data/../../etc/x",
    ] {
        let r = h
            .upload(
                &format!("/files/upload?{base}"),
                A,
                "multipart/form-data; boundary=t",
                multipart("t", name, b"x"),
            )
            .await;
        assert_aca_error(
            &r,
            StatusCode::BAD_REQUEST,
            "SessionRequestValidationFailed",
        );
    }
    for path in [
        "/files/content/..%2F..%2F..%2Fetc%2Fpasswd",
        "/files/content/../../etc/passwd",
        "/files/content/%2Fetc%2Fpasswd",
        "/files/content/a%00b",
    ] {
        let r = h
            .call("GET", &format!("{path}?{base}"), Some(A), Body::empty())
            .await;
        assert!(
            r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::NOT_FOUND,
            "{path}: {}",
            r.status
        );
        assert!(
            !String::from_utf8_lossy(&r.body).contains("root:"),
            "{path}"
        );
    }
    let s = h
        .json(
            "POST",
            "/v1/sessions",
            A,
            json!({"identifier": "trav-0001"}),
        )
        .await
        .json();
    let id = s["id"].as_str().unwrap();
    for path in ["..%2Fx", "%2Fetc%2Fpasswd", "a/..%2F..%2Fx"] {
        let r = h
            .call(
                "PUT",
                &format!("/v1/sessions/{id}/files/{path}"),
                Some(A),
                Body::from("x"),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(r.code(), "invalid_path");
        let r = h
            .call(
                "GET",
                &format!("/v1/sessions/{id}/files/{path}/content"),
                Some(A),
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert!(!h.root.path().join("x").exists());
}

#[tokio::test]
async fn links_planted_by_sandboxed_code_are_never_followed() {
    let h = harness();
    let base = format!("identifier=link-0001&{V1}");
    let marker = "marker-link-0001";
    h.upload(
        &format!("/files/upload?{base}"),
        A,
        "multipart/form-data; boundary=m",
        multipart("m", marker, b"m"),
    )
    .await;
    let data = h.data_dir_with(marker);
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"TOP-SECRET").unwrap();
    // What sandboxed code could plant: links to files and directories outside, and a hard link.
    std::os::unix::fs::symlink(outside.path().join("secret"), data.join("leak")).unwrap();
    std::os::unix::fs::symlink(outside.path(), data.join("dirlink")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", data.join("passwd")).unwrap();
    std::fs::write(data.parent().unwrap().join("beside-data"), b"HIDDEN").unwrap();
    std::fs::hard_link(
        data.parent().unwrap().join("beside-data"),
        data.join("hard"),
    )
    .unwrap();

    for name in ["leak", "dirlink/secret", "passwd", "hard"] {
        let r = h
            .call(
                "GET",
                &format!("/files/content/{name}?{base}"),
                Some(A),
                Body::empty(),
            )
            .await;
        assert_aca_error(
            &r,
            StatusCode::BAD_REQUEST,
            "SessionRequestValidationFailed",
        );
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains("TOP-SECRET") && !text.contains("HIDDEN") && !text.contains("root:"),
            "{name}: {text}"
        );
    }
    // Listing shows regular files only and never descends through a link.
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
    assert!(
        !names.contains(&"leak") && !names.iter().any(|n| n.starts_with("dirlink")),
        "{names:?}"
    );

    // Writing through a directory link is refused; writing over a link replaces the link.
    let r = h
        .upload(
            &format!("/files/upload?{base}"),
            A,
            "multipart/form-data; boundary=m",
            multipart("m", "dirlink/new", b"x"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(!outside.path().join("new").exists());
    for name in ["leak", "hard"] {
        let r = h
            .upload(
                &format!("/files/upload?{base}"),
                A,
                "multipart/form-data; boundary=m",
                multipart("m", name, b"replaced"),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{name}");
    }
    assert_eq!(
        std::fs::read(outside.path().join("secret")).unwrap(),
        b"TOP-SECRET"
    );
    assert_eq!(
        std::fs::read(data.parent().unwrap().join("beside-data")).unwrap(),
        b"HIDDEN"
    );
    // Deleting a link deletes the link, not its target; deleting through one is refused.
    let r = h
        .call(
            "DELETE",
            &format!("/files/passwd?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = h
        .call(
            "DELETE",
            &format!("/files/dirlink/secret?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(outside.path().join("secret").exists());
    assert!(Path::new("/etc/passwd").exists());

    // The native API refuses the same way.
    let s = h
        .json(
            "POST",
            "/v1/sessions",
            A,
            json!({"identifier": "link-0001"}),
        )
        .await
        .json();
    let id = s["id"].as_str().unwrap();
    let r = h
        .call(
            "GET",
            &format!("/v1/sessions/{id}/files/dirlink/secret/content"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "link_refused");
}

#[tokio::test]
async fn auth_quirks() {
    let h = harness();
    let uri = format!("/code/execute?identifier=auth-0001&{V1}");
    let body = || Body::from(json!({"properties": {"code": "1"}}).to_string());
    for auth in [
        None,
        Some("Bearer None"),
        Some("Bearer "),
        Some("Bearer wrong"),
        Some("Basic a2V5"),
    ] {
        let mut req = Request::builder().method("POST").uri(&uri);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = h.send(req.body(body()).unwrap()).await;
        assert_aca_error(&r, StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let r = h
        .call("GET", "/v1/sessions", Some("None"), Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "unauthorized");
    assert!(!r.headers.contains_key("x-ms-error-code"));
    // Health and the OpenAPI document need no key.
    assert_eq!(
        h.call("GET", "/healthz", None, Body::empty()).await.json()["status"],
        "ok"
    );
    assert_eq!(
        h.call("GET", "/openapi.json", None, Body::empty())
            .await
            .json()["openapi"],
        "3.1.0"
    );
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 0);
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

#[tokio::test]
async fn a_full_pool_answers_404_on_aca_and_429_on_v1() {
    let h = harness_with("[pools.python]\nwarm = 0\nmax_sessions = 2\n");
    assert_eq!(h.exec("", "p-1", A, "1").await.status, StatusCode::OK);
    assert_eq!(h.exec("", "p-2", B, "1").await.status, StatusCode::OK);
    let r = h.exec("", "p-3", A, "1").await;
    assert_aca_error(&r, StatusCode::NOT_FOUND, "SessionPoolMaxSessionsReached");
    let r = h.json("POST", "/v1/sessions", A, json!({})).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "pool_full");
    // Existing sessions still work; a delete makes room.
    assert_eq!(h.exec("", "p-1", A, "2").await.status, StatusCode::OK);
    h.call("DELETE", "/session?identifier=p-1", Some(A), Body::empty())
        .await;
    assert_eq!(h.exec("", "p-3", A, "1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_tenant_limit_holds_across_pools() {
    let h = harness_with(
        "[server]\nmax_sessions_per_tenant = 5\n[tenants.a]\nmax_sessions = 1\n\
         [pools.python]\nwarm = 0\n[pools.other]\nwarm = 0\n",
    );
    assert_eq!(h.exec("", "t-1", A, "1").await.status, StatusCode::OK);
    let r = h.exec("/pools/other", "t-2", A, "1").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = h
        .json("POST", "/v1/sessions", A, json!({"pool": "other"}))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "tenant_full");
    // Tenant b is not limited by a's limit.
    assert_eq!(
        h.exec("/pools/other", "t-2", B, "1").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let h = harness();
    // Tenant A: a session with state and a file.
    h.exec("", "shared-name", A, "x = 41").await;
    h.upload(
        &format!("/files/upload?identifier=shared-name&{V1}"),
        A,
        "multipart/form-data; boundary=z",
        multipart("z", "a-secret.txt", b"A's data"),
    )
    .await;
    let a_session = h
        .json(
            "POST",
            "/v1/sessions",
            A,
            json!({"identifier": "shared-name"}),
        )
        .await;
    assert_eq!(a_session.status, StatusCode::OK);
    let a_id = a_session.json()["id"].as_str().unwrap().to_owned();

    // ACA: B cannot delete A's session...
    let r = h
        .call(
            "DELETE",
            "/session?identifier=shared-name",
            Some(B),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = h
        .call(
            "GET",
            "/session?identifier=shared-name&api-version=2025-02-02-preview",
            Some(B),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // ...and the same identifier names B's own, empty session.
    let p = h.exec("", "shared-name", B, "x").await.json()["properties"].clone();
    assert_eq!(p["status"], "Failure", "B saw A's state: {p}");
    let list = h
        .call(
            "GET",
            &format!("/files?identifier=shared-name&{V1}"),
            Some(B),
            Body::empty(),
        )
        .await
        .json();
    assert_eq!(list["value"], json!([]));
    let r = h
        .call(
            "GET",
            &format!("/files/content/a-secret.txt?identifier=shared-name&{V1}"),
            Some(B),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let l = h
        .call("GET", "/listSessions", Some(B), Body::empty())
        .await
        .json();
    assert_eq!(l["sessions"].as_array().unwrap().len(), 1);

    // Native: A's session id is a 404 for B on every path.
    for (method, path) in [
        ("GET", format!("/v1/sessions/{a_id}")),
        ("DELETE", format!("/v1/sessions/{a_id}")),
        ("GET", format!("/v1/sessions/{a_id}/files")),
        (
            "GET",
            format!("/v1/sessions/{a_id}/files/a-secret.txt/content"),
        ),
        ("GET", format!("/v1/sessions/{a_id}/files/a-secret.txt")),
        ("DELETE", format!("/v1/sessions/{a_id}/files/a-secret.txt")),
        ("PUT", format!("/v1/sessions/{a_id}/files/planted.txt")),
    ] {
        let r = h.call(method, &path, Some(B), Body::from("x")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(r.code(), "session_not_found");
    }
    for suffix in ["executions", "executions/stream"] {
        let r = h
            .json(
                "POST",
                &format!("/v1/sessions/{a_id}/{suffix}"),
                B,
                json!({"code": "x"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    let mine = h
        .call("GET", "/v1/sessions", Some(B), Body::empty())
        .await
        .json();
    assert!(
        mine["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["id"] != a_id.as_str())
    );

    // A's session is untouched.
    assert_eq!(
        h.exec("", "shared-name", A, "x + 1").await.json()["properties"]["result"],
        42
    );
    let got = h
        .call(
            "GET",
            &format!("/files/content/a-secret.txt?identifier=shared-name&{V1}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(got.body, b"A's data");
}

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
    assert_eq!(r.code(), "invalid_request");
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

#[tokio::test]
async fn executions_in_one_session_are_serialized_and_first_calls_start_once() {
    let h = harness();
    let t = Instant::now();
    let (a, b) = tokio::join!(
        h.exec("", "ser-1", A, "sleep 0.3\n1"),
        h.exec("", "ser-1", A, "sleep 0.3\n2")
    );
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(b.status, StatusCode::OK);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        h.stats.started.load(Ordering::SeqCst),
        1,
        "two sandboxes for one identifier"
    );
    // Different sessions run side by side.
    let t = Instant::now();
    let _ = tokio::join!(
        h.exec("", "par-1", A, "sleep 0.3"),
        h.exec("", "par-2", A, "sleep 0.3")
    );
    assert!(
        t.elapsed() < Duration::from_millis(550),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn warm_sessions_are_handed_out_and_refilled() {
    let h = harness_with("[pools.python]\nwarm = 2\n");
    h.state.manager.start_background();
    let manager = h.state.manager.clone();
    let wait_for = |n: usize| {
        let manager = manager.clone();
        async move {
            for _ in 0..100 {
                if manager.pools()[0].ready == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("pool never had {n} ready sessions");
        }
    };
    wait_for(2).await;
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 2);
    assert_eq!(
        h.exec("", "warm-1", A, "6 * 7").await.json()["properties"]["result"],
        42
    );
    wait_for(2).await;
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 3);
    h.state.manager.shutdown().await;
    assert_eq!(
        h.stats.closed.load(Ordering::SeqCst),
        3,
        "shutdown left sessions behind"
    );
    let r = h.exec("", "warm-2", A, "1").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn idle_sessions_expire_and_every_call_resets_the_clock() {
    let h = harness_with("[pools.python]\nwarm = 0\nidle_timeout_s = 1\n");
    h.exec("", "idle-1", A, "x = 1").await;
    h.exec("", "idle-2", A, "x = 1").await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        h.call(
            "GET",
            &format!("/files?identifier=idle-1&{V1}"),
            Some(A),
            Body::empty(),
        )
        .await;
        h.state.manager.reap_once().await;
    }
    let ids: Vec<String> = h
        .state
        .manager
        .list_sessions(&ampoule_core::Caller::new("a"), None)
        .unwrap()
        .iter()
        .map(|s| s.identifier.clone())
        .collect();
    assert_eq!(ids, ["idle-1"]);
    assert_eq!(h.stats.closed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn sessions_die_at_their_maximum_lifetime() {
    let h = harness_with("[pools.python]\nwarm = 0\nmax_lifetime_s = 1\n");
    h.exec("", "life-1", A, "x = 1").await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        h.exec("", "life-1", A, "x").await;
        h.state.manager.reap_once().await;
    }
    assert!(h.stats.closed.load(Ordering::SeqCst) >= 1);
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

#[tokio::test]
async fn a_sandbox_that_cannot_start_is_a_503_and_the_next_call_starts_afresh() {
    let h = harness();
    h.fail_starts.store(1, Ordering::SeqCst);
    let r = h.exec("", "fail-1", A, "6 * 7").await;
    assert_aca_error(&r, StatusCode::SERVICE_UNAVAILABLE, "SessionUnavailable");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("fake"),
        "internals leaked"
    );
    h.fail_starts.store(1, Ordering::SeqCst);
    let r = h
        .json("POST", "/v1/sessions", A, json!({"identifier": "fail-2"}))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.code(), "sandbox_unavailable");
    // Nothing was counted against the pool, and the identifiers work now.
    assert_eq!(h.state.manager.pools()[1].sessions, 0);
    assert_eq!(
        h.exec("", "fail-1", A, "6 * 7").await.json()["properties"]["result"],
        42
    );
    assert_eq!(
        h.json("POST", "/v1/sessions", A, json!({"identifier": "fail-2"}))
            .await
            .status,
        StatusCode::CREATED
    );
}
