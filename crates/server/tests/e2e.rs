//! End to end: the real `ampoule serve` binary with real Python sessions in real sandboxes,
//! driven with raw HTTP (every ACA quirk, link attacks from inside the sandbox, tenants) and by
//! the real ACA client libraries (`tests/clients/smoke_clients.py`, in the virtual environment
//! named by `AMPOULE_CLIENT_VENV`, which `scripts/test.sh` creates): LangChain, LlamaIndex and
//! AutoGen over HTTP, LangChain and Semantic Kernel (which accepts https only) over HTTPS.
//!
//! Needs root (sandboxes with their own uids and cgroups); as another user every trial that
//! needs it is reported as ignored, with the reason (as are the C# trial without Mono and the
//! PowerShell one where `pwsh` exists). Only 127.0.0.1 is ever bound or contacted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ampoule_testkit::host::{is_root, trial};
use ampoule_testkit::paths::binary;
use ampoule_testkit::serve::Serve;
use libtest_mimic::Arguments;
use serde_json::{Value, json};

const KEY_A: &str = "e2e-key-tenant-a";
const KEY_B: &str = "e2e-key-tenant-b";
const V1: &str = "api-version=2024-02-02-preview";

/// `ampoule serve` with `config`, tenant `a`'s key and these environment variables on top;
/// its stdout is piped (a generated key is printed there).
fn serve_with_env(config: &Path, env: &[(&str, &Path)]) -> Serve {
    let mut cmd = Command::new(binary());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env("AMPOULE_E2E_KEY_A", KEY_A)
        .env("AMPOULE_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::piped());
    Serve::spawn(cmd, false).unwrap()
}

fn serve(config: &Path) -> Serve {
    serve_with_env(config, &[])
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum Payload<'a> {
    None,
    Fixed(&'a [u8]),
    /// Sent with `Transfer-Encoding: chunked`, in pieces of this size.
    Chunked(&'a [u8], usize),
}

/// One HTTP/1.1 request over a fresh connection, byte for byte as given.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], payload: Payload) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(240))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    match &payload {
        Payload::None => req.push_str("Content-Length: 0\r\n\r\n"),
        Payload::Fixed(b) => req.push_str(&format!("Content-Length: {}\r\n\r\n", b.len())),
        Payload::Chunked(..) => req.push_str("Transfer-Encoding: chunked\r\n\r\n"),
    }
    s.write_all(req.as_bytes()).unwrap();
    match payload {
        Payload::None => {}
        Payload::Fixed(b) => s.write_all(b).unwrap(),
        Payload::Chunked(b, n) => {
            for c in b.chunks(n) {
                // The server may answer 413 and close before the whole body is sent.
                if s.write_all(format!("{:x}\r\n", c.len()).as_bytes())
                    .is_err()
                    || s.write_all(c).is_err()
                    || s.write_all(b"\r\n").is_err()
                {
                    break;
                }
            }
            let _ = s.write_all(b"0\r\n\r\n");
        }
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
            let len = usize::from_str_radix(String::from_utf8_lossy(&rest[..pos]).trim(), 16)
                .unwrap_or(0);
            if len == 0 {
                break;
            }
            out.extend_from_slice(&rest[pos + 2..pos + 2 + len]);
            rest = &rest[pos + 2 + len + 2..];
        }
        body = out;
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn exec(port: u16, prefix: &str, id: &str, key: &str, code: &str) -> Value {
    let body = json!({"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}}).to_string();
    let auth = bearer(key);
    let r = http(
        port,
        "POST",
        &format!("{prefix}/code/execute?identifier={id}&{V1}"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Payload::Fixed(body.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["properties"].clone()
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

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("ampoule.toml");
    let text = format!(
        "[server]\ndata_dir = \"{}\"\nmax_upload_mib = 1\n{extra}\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_E2E_KEY_A\"\n\
         [[auth.keys]]\ntenant = \"b\"\nkey_sha256 = \"{}\"\n\
         [pools.python]\nwarm = 1\nmax_sessions = 20\n\
         [pools.tiny]\nwarm = 0\nmax_sessions = 1\n",
        dir.join("data").display(),
        ampoule_server::config::sha256_hex(KEY_B)
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn ampoule_serve_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(&write_config(tmp.path(), ""));
    let port = server.port;
    let a = bearer(KEY_A);
    let b = bearer(KEY_B);

    // Execute and state, under every prefix shape.
    let p = exec(port, "", "e2e-0001", KEY_A, "6 * 7");
    assert_eq!(p["status"], "Success");
    assert_eq!(p["result"], 42);
    assert_eq!(p["executionResult"], 42);
    exec(
        port,
        "/pools/python",
        "e2e-0001",
        KEY_A,
        "import os\nx = 40",
    );
    let p = exec(
        port,
        "/subscriptions/s/resourceGroups/r/sessionPools/python",
        "e2e-0001",
        KEY_A,
        "print(os.getcwd()); x + 2",
    );
    assert_eq!(p["result"], 42);
    assert_eq!(p["stdout"], "/mnt/data\n");
    let p = exec(port, "//", "e2e-0001", KEY_A, "1 / 0");
    assert_eq!(p["status"], "Failure");
    assert!(
        p["stderr"].as_str().unwrap().contains("ZeroDivisionError"),
        "{p}"
    );
    assert_eq!(p["result"], "");
    // An unencoded identifier with characters others would encode.
    let p = exec(port, "", "id|with{odd}chars", KEY_A, "'ok'");
    assert_eq!(p["result"], "ok");
    // A plot comes back as an image result.
    let p = exec(
        port,
        "",
        "e2e-plot",
        KEY_A,
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
    );
    if p["status"] == "Success" {
        assert_eq!(p["result"]["type"], "image", "{p}");
        assert_eq!(p["result"]["format"], "png");
    } else {
        eprintln!("note: matplotlib is not in this host's Python environment: {p}");
    }

    // Bearer None, and no key at all.
    for auth in ["Bearer None", "Bearer "] {
        let r = http(
            port,
            "POST",
            &format!("/code/execute?identifier=e2e-0001&{V1}"),
            &[("Authorization", auth)],
            Payload::Fixed(b"{}"),
        );
        assert_eq!(r.status, 401);
        assert_eq!(r.header("x-ms-error-code"), Some("Unauthorized"));
    }

    // Uploads: multipart with a lying Content-Type, chunked, and over the limit.
    let base = format!("identifier=e2e-0001&{V1}");
    let r = http(
        port,
        "POST",
        &format!("/files/upload?{base}"),
        &[("Authorization", &a), ("Content-Type", "application/json")],
        Payload::Fixed(&multipart(
            "sk-style-boundary",
            "/mnt/data/data.csv",
            b"a,b\n1,2\n",
        )),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["value"][0]["properties"]["filename"], "data.csv");
    let big = vec![b'x'; 300_000];
    let r = http(
        port,
        "POST",
        &format!("/files/upload?{base}"),
        &[
            ("Authorization", &a),
            ("Content-Type", "multipart/form-data; boundary=ag"),
        ],
        Payload::Chunked(&multipart("ag", "chunked.txt", &big), 8192),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["value"][0]["properties"]["size"], 300_000);
    let too_big = vec![b'y'; 2 * 1024 * 1024];
    let r = http(
        port,
        "POST",
        &format!("/files/upload?{base}"),
        &[
            ("Authorization", &a),
            ("Content-Type", "multipart/form-data; boundary=ag"),
        ],
        Payload::Chunked(&multipart("ag", "big.txt", &too_big), 65536),
    );
    assert_eq!(r.status, 413);
    assert_eq!(r.header("x-ms-error-code"), Some("PayloadTooLarge"));
    // The code sees the uploads; the oversized one left nothing.
    let p = exec(
        port,
        "",
        "e2e-0001",
        KEY_A,
        "sorted(os.listdir('/mnt/data'))",
    );
    assert_eq!(p["result"], json!(["chunked.txt", "data.csv"]));
    let r = http(
        port,
        "GET",
        &format!("/files/content/data.csv?{base}"),
        &[("Authorization", &a)],
        Payload::None,
    );
    assert_eq!(r.body, b"a,b\n1,2\n");
    let r = http(
        port,
        "GET",
        &format!("/files?{base}"),
        &[("Authorization", &a)],
        Payload::None,
    );
    assert_eq!(r.json()["value"].as_array().unwrap().len(), 2);

    // Links planted by sandboxed code are never followed by the server.
    exec(
        port,
        "",
        "e2e-0001",
        KEY_A,
        "os.symlink('/etc/shadow', 'leak')\nos.symlink('/', 'root')\nos.symlink('/etc', 'etcdir')",
    );
    for path in [
        "leak",
        "root/etc/shadow",
        "etcdir/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
    ] {
        let r = http(
            port,
            "GET",
            &format!("/files/content/{path}?{base}"),
            &[("Authorization", &a)],
            Payload::None,
        );
        assert_eq!(r.status, 400, "{path}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(!text.contains("root:"), "{path}: {text}");
    }
    let marker = format!("ampoule-e2e-{}", std::process::id());
    for name in [
        format!("root/tmp/{marker}"),
        format!("../../tmp/{marker}"),
        format!("/tmp/{marker}"),
    ] {
        let r = http(
            port,
            "POST",
            &format!("/files/upload?{base}"),
            &[
                ("Authorization", &a),
                ("Content-Type", "multipart/form-data; boundary=m"),
            ],
            Payload::Fixed(&multipart("m", &name, b"planted")),
        );
        assert_eq!(r.status, 400, "{name}");
    }
    assert!(
        !Path::new("/tmp").join(&marker).exists(),
        "an upload escaped the session"
    );
    let r = http(
        port,
        "DELETE",
        &format!("/files/etcdir/passwd?{base}"),
        &[("Authorization", &a)],
        Payload::None,
    );
    assert_eq!(r.status, 400);
    assert!(Path::new("/etc/passwd").exists());

    // Tenants: B cannot see, execute in, read or delete A's session.
    let r = http(
        port,
        "DELETE",
        "/session?identifier=e2e-0001&api-version=2025-10-02-preview",
        &[("Authorization", &b)],
        Payload::None,
    );
    assert_eq!(r.status, 404);
    let p = exec(port, "", "e2e-0001", KEY_B, "'x' in globals()");
    assert_eq!(p["result"], false, "tenant B saw tenant A's state");
    let r = http(
        port,
        "GET",
        &format!("/files/content/data.csv?{base}"),
        &[("Authorization", &b)],
        Payload::None,
    );
    assert_eq!(r.status, 404);
    let p = exec(port, "", "e2e-0001", KEY_A, "x");
    assert_eq!(p["result"], 40, "tenant A's session was disturbed");
    let v1 = http(
        port,
        "GET",
        "/v1/sessions",
        &[("Authorization", &a)],
        Payload::None,
    )
    .json();
    let a_id = v1["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["identifier"] == "e2e-0001")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (m, path) in [
        ("GET", format!("/v1/sessions/{a_id}")),
        ("GET", format!("/v1/sessions/{a_id}/files")),
        ("DELETE", format!("/v1/sessions/{a_id}")),
    ] {
        assert_eq!(
            http(port, m, &path, &[("Authorization", &b)], Payload::None).status,
            404,
            "{m} {path}"
        );
    }
    let r = http(
        port,
        "POST",
        &format!("/v1/sessions/{a_id}/executions"),
        &[("Authorization", &b)],
        Payload::Fixed(br#"{"code":"x"}"#),
    );
    assert_eq!(r.status, 404);

    // Native streaming with a real interpreter.
    let r = http(
        port,
        "POST",
        &format!("/v1/sessions/{a_id}/executions/stream"),
        &[("Authorization", &a), ("Content-Type", "application/json")],
        Payload::Fixed(br#"{"code":"import time\nprint('first', flush=True)\ntime.sleep(0.2)\nprint('second')\nx + 2"}"#),
    );
    assert_eq!(r.status, 200);
    let lines: Vec<Value> = String::from_utf8_lossy(&r.body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "result", "{lines:?}");
    assert_eq!(last["result"]["result"]["application/json"], 42);
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "stdout" && l["text"].as_str().unwrap_or("").contains("first"))
    );

    // A full pool answers 404 (ACA) and 429 (/v1); DELETE session answers 204.
    exec(port, "/pools/tiny", "tiny-1", KEY_A, "1");
    let body = json!({"properties": {"code": "1"}}).to_string();
    let r = http(
        port,
        "POST",
        &format!("/pools/tiny/code/execute?identifier=tiny-2&{V1}"),
        &[("Authorization", &a)],
        Payload::Fixed(body.as_bytes()),
    );
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-ms-error-code"),
        Some("SessionPoolMaxSessionsReached")
    );
    let r = http(
        port,
        "POST",
        "/v1/sessions",
        &[("Authorization", &a)],
        Payload::Fixed(br#"{"pool":"tiny"}"#),
    );
    assert_eq!(r.status, 429);
    let r = http(
        port,
        "DELETE",
        "/pools/tiny/session?identifier=tiny-1&api-version=2025-10-02-preview",
        &[("Authorization", &a)],
        Payload::None,
    );
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    exec(port, "/pools/tiny", "tiny-2", KEY_A, "1");

    // A timeout interrupts the code and keeps the session's state.
    let body = json!({"properties": {"code": "import time\nwhile True: time.sleep(0.05)", "timeoutInSeconds": 1}}).to_string();
    let t = Instant::now();
    let r = http(
        port,
        "POST",
        &format!("/code/execute?identifier=e2e-0001&{V1}"),
        &[("Authorization", &a)],
        Payload::Fixed(body.as_bytes()),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["properties"]["status"],
        "Failure",
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(
        exec(port, "", "e2e-0001", KEY_A, "x")["result"],
        40,
        "state lost after a timeout"
    );
    // Deleting a session while it executes ends the execution at once.
    exec(port, "", "e2e-busy", KEY_A, "import time");
    let waiter = std::thread::spawn(move || {
        let body = json!({"properties": {"code": "time.sleep(60)"}}).to_string();
        let t = Instant::now();
        let r = http(
            port,
            "POST",
            &format!("/code/execute?identifier=e2e-busy&{V1}"),
            &[("Authorization", &bearer(KEY_A))],
            Payload::Fixed(body.as_bytes()),
        );
        (r.status, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = http(
        port,
        "DELETE",
        "/session?identifier=e2e-busy",
        &[("Authorization", &a)],
        Payload::None,
    );
    assert_eq!(r.status, 204);
    let (status, took) = waiter.join().unwrap();
    assert!(
        took < Duration::from_secs(20),
        "the execution outlived its session: {took:?}"
    );
    assert!((400..500).contains(&status), "{status}");

    // The real client libraries.
    run_clients(
        &format!("http://127.0.0.1:{port}"),
        &["langchain", "llamaindex", "autogen"],
    );
    run_clients(
        &format!("http://127.0.0.1:{port}/subscriptions/s/resourceGroups/r/sessionPools/python"),
        &["langchain"],
    );

    // Graceful shutdown destroys every session.
    let sandboxes = server.children();
    assert!(!sandboxes.is_empty(), "no sandbox seen");
    let log = server.log.clone();
    let st = server.stop().unwrap();
    assert!(st.success(), "exit {st:?}: {}", log.text());
    for pid in sandboxes {
        // Gone, or dead and not yet reaped: a child the server killed but had not reaped when
        // it exited is re-parented to the host's init as a zombie, which some inits (this VM's)
        // reap only a while later. A process in any other state is alive and outlived it.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next().map(str::to_owned))
            });
        assert!(
            matches!(state.as_deref(), None | Some("Z") | Some("X")),
            "sandbox {pid} outlived the server (state {state:?})"
        );
    }
    assert!(log.text().contains("closing every session"));
}

/// HTTPS: the listener speaks TLS with a PEM certificate, and a client that refuses plain
/// http (as Semantic Kernel does) works against it.
fn ampoule_serve_over_https() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status();
    if !st.is_ok_and(|s| s.success()) {
        panic!("openssl could not make a test certificate (apt-get install openssl)");
    }
    let extra = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert.display(),
        key.display()
    );
    let server = serve(&write_config(tmp.path(), &extra));
    assert!(server.log.text().contains("https://"));
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    match client_venv() {
        Some(venv) => {
            let out = Command::new(venv.join("bin/python"))
                .arg("-c")
                .arg(
                    "import ssl, sys, urllib.request, json\n\
                     ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
                     print(json.load(urllib.request.urlopen(sys.argv[1] + '/healthz', context=ctx))['status'])",
                )
                .arg(format!("https://127.0.0.1:{}", server.port))
                .arg(&cert)
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "ok",
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            run_clients_with(
                &format!("https://127.0.0.1:{}", server.port),
                &["langchain", "semantickernel"],
                &[
                    ("REQUESTS_CA_BUNDLE", cert.as_path()),
                    ("SSL_CERT_FILE", cert.as_path()),
                ],
            );
        }
        None => eprintln!("note: no client venv; HTTPS checked without the client libraries"),
    }
    assert!(server.stop().unwrap().success());
}

fn client_venv() -> Option<PathBuf> {
    ampoule_testkit::paths::client_venv("the client libraries")
}

fn run_clients(endpoint: &str, clients: &[&str]) {
    run_clients_with(endpoint, clients, &[]);
}

fn run_clients_with(endpoint: &str, clients: &[&str], env: &[(&str, &Path)]) {
    let Some(venv) = client_venv() else {
        eprintln!("skipped the client libraries: set AMPOULE_CLIENT_VENV to a venv with them");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/smoke_clients.py");
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(&script)
        .arg(endpoint)
        .args(clients)
        .env("AMPOULE_API_KEY", KEY_A);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "clients against {endpoint} ({:.1} s):\n{stdout}",
        t.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "the client libraries failed against {endpoint}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in clients {
        let name = match *c {
            "llamaindex" => "llama-index",
            "semantickernel" => "semantic-kernel",
            other => other,
        };
        assert!(
            stdout.contains(&format!("{name} OK")),
            "{c} did not finish: {stdout}"
        );
    }
}

/// A Python pool forks its sessions from a zygote: a new identifier gets an interpreter that
/// already imported pandas, `/metrics` shows the zygote up and counting forks; a pool with
/// `zygote = false` starts its sessions from scratch.
fn python_pools_fork_sessions_from_a_zygote() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(&write_config(
        tmp.path(),
        "[pools.cold]\nwarm = 0\nzygote = false\n",
    ));
    let port = server.port;
    let code = "import sys\nprint('pandas' in sys.modules, 'matplotlib.pyplot' in sys.modules)";
    for id in ["zygote-1", "zygote-2"] {
        let p = exec(port, "/pools/tiny", id, KEY_A, code);
        assert_eq!(p["stdout"], "True True\n", "{p}");
        // The session is usable like any other.
        let p = exec(
            port,
            "/pools/tiny",
            id,
            KEY_A,
            "import pandas as pd\nint(pd.Series([1, 2]).sum())",
        );
        assert_eq!(p["result"], 3, "{p}");
        let auth = bearer(KEY_A);
        // The pool holds one session: end this one for the next.
        let r = http(
            port,
            "DELETE",
            &format!("/pools/tiny/session?identifier={id}&api-version=2025-10-02-preview"),
            &[("Authorization", &auth)],
            Payload::None,
        );
        assert!(r.status < 300, "{}", r.status);
    }
    let p = exec(port, "/pools/cold", "cold-1", KEY_A, code);
    assert_eq!(p["stdout"], "False False\n", "{p}");

    let auth = bearer(KEY_A);
    let r = http(
        port,
        "GET",
        "/metrics",
        &[("Authorization", &auth)],
        Payload::None,
    );
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let value = |name: &str, pool: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{pool=\"{pool}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} for {pool} missing:\n{text}"))
    };
    assert_eq!(value("ampoule_zygote_up", "tiny"), 1.0);
    assert!(value("ampoule_zygote_forks_total", "tiny") >= 2.0);
    // Every fork's time to a ready session is in the histogram.
    assert!(
        value("ampoule_zygote_fork_duration_seconds_count", "tiny") >= 2.0,
        "{text}"
    );
    assert!(!text.contains("ampoule_zygote_up{pool=\"cold\"}"), "{text}");
    server.stop().unwrap();
}

/// A zygote imported a package; the package is upgraded in the pool's Python environment (the
/// way pip does it: the old `*.dist-info` goes, the new one comes): the next new session has
/// the zygote replaced (the log says why), and from then on sessions, warm ones included, have
/// the new version.
fn zygotes_are_recycled_when_packages_change() {
    // Outside /tmp: sandboxes have their own /tmp, and the environment is bound into them.
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let chmod = |p: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod(data.path(), 0o755);
    let venv = data.path().join("python");
    let made = Command::new("/bin/sh")
        .args([
            "-c",
            "umask 022 && exec /usr/bin/python3 -m venv --without-pip \"$1\"",
            "sh",
        ])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(
        made.success(),
        "python3 -m venv does not work here (apt-get install python3-venv)"
    );
    let site = std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir())
        .unwrap();
    let install = |version: u32| {
        let module = site.join("fakepkg.py");
        let staged = site.join(".fakepkg.py.new");
        std::fs::write(&staged, format!("VERSION = {version}\n")).unwrap();
        chmod(&staged, 0o644);
        let old = site.join(format!("fakepkg-{}.0.dist-info", version - 1));
        if old.exists() {
            std::fs::remove_dir_all(old).unwrap();
        }
        std::fs::rename(staged, module).unwrap();
        let info = site.join(format!("fakepkg-{version}.0.dist-info"));
        std::fs::create_dir(&info).unwrap();
        chmod(&info, 0o755);
    };
    install(1);

    let tmp = tempfile::tempdir().unwrap();
    let server = serve_with_env(
        &write_config(
            tmp.path(),
            "[pools.fresh]\nwarm = 2\nmax_sessions = 50\npreload = [\"fakepkg\"]\n",
        ),
        &[("AMPOULE_DATA_DIR", data.path())],
    );
    let port = server.port;
    let code = "import sys\nprint('fakepkg' in sys.modules, sys.modules['fakepkg'].VERSION)";
    let p = exec(port, "/pools/fresh", "fresh-0", KEY_A, code);
    assert_eq!(p["stdout"], "True 1\n", "{p}");

    install(2);
    // The pool looks at the environment at most once a second, when a session starts: this one
    // may still be an old one (from warm stock), but its refill makes the pool look.
    std::thread::sleep(Duration::from_millis(1100));
    let p = exec(port, "/pools/fresh", "fresh-1", KEY_A, code);
    assert!(
        p["stdout"] == "True 1\n" || p["stdout"] == "True 2\n",
        "{p}"
    );
    // Every pool runs from this environment: wait for this pool's zygote.
    let recycled = |log: &str| {
        log.lines().any(|l| {
            l.contains("zygote recycled") && l.contains("fresh") && l.contains("packages changed")
        })
    };
    let t = Instant::now();
    while !recycled(&server.log.text()) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the zygote was not recycled: {}",
            server.log.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Warm sessions forked from the old zygote are not handed out any more.
    for n in 2..6 {
        let p = exec(port, "/pools/fresh", &format!("fresh-{n}"), KEY_A, code);
        assert_eq!(
            p["stdout"],
            "True 2\n",
            "session {n}: {p}\n{}",
            server.log.text()
        );
    }
    server.stop().unwrap();
}

/// A C# pool (Mono) keeps its state across executions through the ACA API and through `/v1`.
fn csharp_pools_answer_through_aca_and_v1() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ampoule.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_E2E_KEY_A\"\n\
             [pools.cs]\nlanguage = \"csharp\"\nwarm = 0\n",
            tmp.path().join("data").display()
        ),
    )
    .unwrap();
    let server = serve(&config);
    let port = server.port;
    let a = bearer(KEY_A);

    let p = exec(port, "", "cs-0001", KEY_A, "var z = 20;");
    assert_eq!(p["status"], "Success", "{p}");
    let p = exec(port, "", "cs-0001", KEY_A, "z + 1");
    assert_eq!(p["status"], "Success", "{p}");
    assert_eq!(p["result"], 21, "{p}");

    let pools = http(
        port,
        "GET",
        "/v1/pools",
        &[("Authorization", &a)],
        Payload::None,
    )
    .json();
    assert_eq!(pools["pools"][0]["language"], "csharp", "{pools}");
    let body = json!({"pool": "cs"}).to_string();
    let post = |path: &str, body: &str| {
        http(
            port,
            "POST",
            path,
            &[("Authorization", &a), ("Content-Type", "application/json")],
            Payload::Fixed(body.as_bytes()),
        )
    };
    let s = post("/v1/sessions", &body);
    assert_eq!(s.status, 201, "{}", String::from_utf8_lossy(&s.body));
    let s = s.json();
    assert_eq!(s["language"], "csharp", "{s}");
    let path = format!("/v1/sessions/{}/executions", s["id"].as_str().unwrap());
    let r = post(&path, &json!({"code": "var z = 20;"}).to_string()).json();
    assert_eq!(r["status"], "succeeded", "{r}");
    let r = post(
        &path,
        &json!({"code": "z + 1", "language": "c#"}).to_string(),
    )
    .json();
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["result"]["text/plain"], "21", "{r}");
    server.stop().unwrap();
}

/// A `gvisor` pool (warm) serves the ACA API and `/v1`: state kept across executions, the
/// code on gVisor's kernel (4.4.0), uploads readable inside; the real ACA client libraries
/// (LangChain, LlamaIndex, AutoGen) work against it.
fn gvisor_pools_answer_through_aca_and_v1() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ampoule.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_E2E_KEY_A\"\n\
             [pools.sealed]\nisolation = \"gvisor\"\nwarm = 1\nmax_sessions = 4\n",
            tmp.path().join("data").display()
        ),
    )
    .unwrap();
    let server = serve(&config);
    let port = server.port;
    let a = bearer(KEY_A);

    let p = exec(
        port,
        "",
        "gv-0001",
        KEY_A,
        "import os\nz = 20\nos.uname().release",
    );
    assert_eq!(p["status"], "Success", "{p}");
    assert_eq!(p["result"], "4.4.0", "{p}");
    let p = exec(port, "", "gv-0001", KEY_A, "z + 1");
    assert_eq!(p["result"], 21, "{p}");

    let post = |path: &str, body: &str| {
        http(
            port,
            "POST",
            path,
            &[("Authorization", &a), ("Content-Type", "application/json")],
            Payload::Fixed(body.as_bytes()),
        )
    };
    let s = post("/v1/sessions", &json!({"pool": "sealed"}).to_string());
    assert_eq!(s.status, 201, "{}", String::from_utf8_lossy(&s.body));
    let s = s.json();
    let path = format!("/v1/sessions/{}/executions", s["id"].as_str().unwrap());
    let r = post(
        &path,
        &json!({"code": "open('/mnt/data/n.txt', 'w').write('7')\nopen('/proc/version').read()[:17]"}).to_string(),
    )
    .json();
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["result"]["text/plain"], "'Linux version 4.4'", "{r}");
    let r = post(
        &path,
        &json!({"code": "int(open('/mnt/data/n.txt').read()) * 6"}).to_string(),
    )
    .json();
    assert_eq!(r["result"]["text/plain"], "42", "{r}");
    // The real ACA client libraries, on the gVisor pool (the server's only pool, so its
    // default: the clients name none).
    run_clients(
        &format!("http://127.0.0.1:{port}"),
        &["langchain", "llamaindex", "autogen"],
    );
    server.stop().unwrap();
}

/// A PowerShell pool on a host without `pwsh` stops `ampoule serve` at start, naming the
/// missing runtime and what to install (it never answers a request with a 500 later).
fn a_powershell_pool_without_pwsh_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ampoule.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_E2E_KEY_A\"\n\
             [pools.python]\n[pools.ps]\nlanguage = \"pwsh\"\n",
            tmp.path().join("data").display()
        ),
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("AMPOULE_E2E_KEY_A", KEY_A)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    for want in [
        "pool ps",
        "no powershell runtime",
        "/usr/bin/pwsh",
        "hint: install PowerShell 7",
    ] {
        assert!(stderr.contains(want), "{want:?} not in {stderr}");
    }
}

/// With no key configured, `ampoule serve` generates one on first start and prints it on
/// stdout, once; it is the key that works, and the next start says it uses it without showing
/// it again.
fn a_generated_key_is_printed_once_and_works() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ampoule.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n[pools.python]\nwarm = 0\n",
            tmp.path().join("data").display()
        ),
    )
    .unwrap();
    let mut first = serve(&config);
    let stdout = first.child.stdout.take().unwrap();
    // On a thread: a server that printed no key would block the read until it stops.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let key = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("no key on stdout")
        .trim()
        .to_owned();
    assert!(!key.is_empty(), "no key on stdout");
    let log = first.log.text();
    assert!(log.contains("generated an API key for tenant"), "{log}");
    assert!(!log.contains(&key), "the key is on stderr: {log}");
    let auth = bearer(&key);
    let r = http(
        first.port,
        "GET",
        "/v1/pools",
        &[("Authorization", &auth)],
        Payload::None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    first.stop().unwrap();

    let mut second = serve(&config);
    let mut stdout = second.child.stdout.take().unwrap();
    let log = second.log.text();
    assert!(
        log.contains("using the API key generated on first start"),
        "{log}"
    );
    let r = http(
        second.port,
        "GET",
        "/v1/pools",
        &[("Authorization", &auth)],
        Payload::None,
    );
    assert_eq!(r.status, 200);
    second.stop().unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "the key was shown again");
}

/// Where PowerShell may be installed (the session crate's plug-in looks in the same places).
const PWSH: [&str; 3] = [
    "/usr/bin/pwsh",
    "/usr/local/bin/pwsh",
    "/opt/microsoft/powershell/7/pwsh",
];

fn main() {
    let args = Arguments::from_args();
    let root = (!is_root()).then_some("needs root (real sandboxes with their own uids)");
    let mono = (!Path::new("/usr/bin/mono").exists())
        .then_some("no Mono here (apt-get install mono-complete)");
    let pwsh = PWSH
        .iter()
        .any(|p| Path::new(p).exists())
        .then_some("pwsh is installed here");
    let runsc = if ampoule_runtime::gvisor::find().is_some() {
        None
    } else if std::env::var_os("CI").is_some() {
        panic!("runsc is missing in CI (scripts/deps.sh installs it)");
    } else {
        Some("runsc is not installed (apt-get install runsc)")
    };
    let trials = vec![
        trial("ampoule_serve_end_to_end", ampoule_serve_end_to_end, root),
        trial("ampoule_serve_over_https", ampoule_serve_over_https, root),
        trial(
            "python_pools_fork_sessions_from_a_zygote",
            python_pools_fork_sessions_from_a_zygote,
            root,
        ),
        trial(
            "zygotes_are_recycled_when_packages_change",
            zygotes_are_recycled_when_packages_change,
            root,
        ),
        trial(
            "a_generated_key_is_printed_once_and_works",
            a_generated_key_is_printed_once_and_works,
            root,
        ),
        trial(
            "csharp_pools_answer_through_aca_and_v1",
            csharp_pools_answer_through_aca_and_v1,
            root.or(mono),
        ),
        trial(
            "gvisor_pools_answer_through_aca_and_v1",
            gvisor_pools_answer_through_aca_and_v1,
            root.or(runsc),
        ),
        trial(
            "a_powershell_pool_without_pwsh_is_refused_at_start",
            a_powershell_pool_without_pwsh_is_refused_at_start,
            pwsh,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}
