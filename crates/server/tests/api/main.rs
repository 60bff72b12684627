//! API tests: the whole router driven with `oneshot` against the fake engine (no socket, no
//! root). One test binary, one module per area (each module starts with `use super::*;` for
//! the harness below): the ACA door ([`aca`]), the native `/v1` API ([`native`]), file attacks
//! and limits ([`files`]: traversal, symlinks and hard links planted in a session), keys and
//! tenants ([`tenants`]: isolation, limits), session lifecycle ([`lifecycle`]), sandboxes
//! ([`sandboxes`]: contexts, processes, files and ports under `/v1/sandboxes`), durable sandboxes
//! ([`durable`]: pause, hibernate, resume and idle policies through every door) and the E2B door
//! ([`e2b`]: control plane, tokens, Connect framing, NDJSON).
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

mod aca;
mod durable;
mod e2b;
mod files;
mod lifecycle;
mod native;
mod sandboxes;
mod tenants;

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
