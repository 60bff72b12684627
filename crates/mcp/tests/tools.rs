//! The MCP server over a fake [`SandboxApi`], spoken to in raw JSON-RPC over an in-memory pipe
//! (no root, no sandbox): the tool list and its schemas, results with images, and every kind
//! of bad call answered as a tool error (`isError`), never as a protocol failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use ampoule_mcp::{
    AmpouleMcp, ApiFailure, Caller, Execute, Executed, FileSummary, SandboxApi, SessionSummary,
};
use ampoule_types::{ExecutionResult, ExecutionStatus, MimeBundle, SessionState};
use async_trait::async_trait;
use rmcp::ServiceExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
}

fn result(stdout: &str, value: Option<&str>, outputs: Vec<MimeBundle>) -> ExecutionResult {
    ExecutionResult {
        status: ExecutionStatus::Succeeded,
        limit: None,
        session_state: SessionState::Kept,
        stdout: stdout.into(),
        stderr: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        result: value.map(|v| MimeBundle::from([("text/plain".to_owned(), json!(v))])),
        outputs,
        error: None,
        execution_count: Some(1),
        exit_code: None,
        duration_ms: 1.0,
        cpu_time_ms: None,
        peak_memory_bytes: None,
        egress: Vec::new(),
    }
}

#[async_trait]
impl SandboxApi for Fake {
    async fn execute(&self, caller: &Caller, req: Execute) -> Result<Executed, ApiFailure> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{}:execute:{}", caller.tenant, req.code));
        if req.language.as_deref() == Some("cobol") {
            return Err(ApiFailure::invalid("unknown language \"cobol\""));
        }
        let png = MimeBundle::from([
            ("image/png".to_owned(), json!("iVBORw0K\nGgo=")),
            ("text/plain".to_owned(), json!("<Figure>")),
        ]);
        Ok(Executed {
            session: req.session.unwrap_or_else(|| "generated".into()),
            execution_id: Some("exe_fake".into()),
            result: result("hi\n", Some("42"), vec![png]),
        })
    }
    async fn list_sessions(&self, _: &Caller) -> Result<Vec<SessionSummary>, ApiFailure> {
        Ok(Vec::new())
    }
    async fn delete_session(&self, _: &Caller, session: &str) -> Result<(), ApiFailure> {
        Err(ApiFailure::new(
            "session_not_found",
            format!("no session {session:?}"),
        ))
    }
    async fn list_files(&self, _: &Caller, _: &str) -> Result<Vec<FileSummary>, ApiFailure> {
        Ok(vec![FileSummary {
            path: "a b.txt".into(),
            size: 3,
        }])
    }
    async fn upload(
        &self,
        _: &Caller,
        session: Option<&str>,
        path: &str,
        data: Vec<u8>,
    ) -> Result<(String, FileSummary), ApiFailure> {
        Ok((
            session.unwrap_or("new").to_owned(),
            FileSummary {
                path: path.to_owned(),
                size: data.len() as u64,
            },
        ))
    }
    async fn download(
        &self,
        _: &Caller,
        _: &str,
        path: &str,
        _: u64,
    ) -> Result<Vec<u8>, ApiFailure> {
        match path {
            "a b.txt" => Ok(b"abc".to_vec()),
            "blob.bin" => Ok(vec![0xff, 0x00, 0x01]),
            _ => Err(ApiFailure::new(
                "file_not_found",
                format!("no file {path:?} in the session"),
            )),
        }
    }
}

struct Client {
    lines: tokio::io::Lines<BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>>,
    w: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    next: u64,
}

impl Client {
    async fn start(api: Arc<Fake>) -> Client {
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let s = AmpouleMcp::new(api, Some(Caller::new("local")))
                .serve(a)
                .await
                .unwrap();
            let _ = s.waiting().await;
        });
        let (r, w) = tokio::io::split(b);
        let mut c = Client {
            lines: BufReader::new(r).lines(),
            w,
            next: 0,
        };
        let init = c
            .request(
                "initialize",
                json!({"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "test", "version": "0"}}),
            )
            .await;
        assert_eq!(init["result"]["serverInfo"]["name"], "ampoule", "{init}");
        c.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        c
    }

    async fn send(&mut self, msg: Value) {
        let mut line = msg.to_string();
        line.push('\n');
        self.w.write_all(line.as_bytes()).await.unwrap();
    }

    async fn request(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .unwrap()
                .expect("the server hung up");
            let msg: Value = serde_json::from_str(&line).unwrap();
            if msg["id"] == json!(id) {
                return msg;
            }
        }
    }

    async fn call(&mut self, tool: &str, args: Value) -> Value {
        let resp = self
            .request("tools/call", json!({"name": tool, "arguments": args}))
            .await;
        assert!(resp.get("error").is_none(), "a protocol error: {resp}");
        resp["result"].clone()
    }
}

fn text(result: &Value) -> String {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn tools_are_listed_with_schemas_and_descriptions() {
    let mut c = Client::start(Arc::default()).await;
    let list = c.request("tools/list", json!({})).await;
    let tools = list["result"]["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    for want in [
        "execute_code",
        "upload_file",
        "download_file",
        "list_files",
        "list_sessions",
        "delete_session",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for t in tools {
        assert!(
            t["description"].as_str().unwrap().len() > 30,
            "{} needs a helpful description",
            t["name"]
        );
        assert_eq!(t["inputSchema"]["type"], "object", "{t}");
    }
    let exec = tools.iter().find(|t| t["name"] == "execute_code").unwrap();
    let schema = &exec["inputSchema"];
    assert_eq!(schema["required"], json!(["code"]), "{schema}");
    for p in ["code", "language", "session", "timeout_s"] {
        assert!(
            schema["properties"][p]["description"].is_string(),
            "{p}: {schema}"
        );
    }
}

#[tokio::test]
async fn results_carry_text_and_images() {
    let api = Arc::new(Fake::default());
    let mut c = Client::start(api.clone()).await;
    let r = c
        .call("execute_code", json!({"code": "6 * 7", "session": "s1"}))
        .await;
    assert_eq!(r["isError"], json!(false), "{r}");
    let summary: Value = serde_json::from_str(&text(&r)).unwrap();
    assert_eq!(summary["session"], "s1");
    assert_eq!(summary["stdout"], "hi\n");
    assert_eq!(summary["result"], "42");
    let image = &r["content"][1];
    assert_eq!(image["type"], "image");
    assert_eq!(image["mimeType"], "image/png");
    assert_eq!(image["data"], "iVBORw0KGgo=", "base64 unwrapped");
    assert_eq!(
        api.calls.lock().unwrap().as_slice(),
        ["local:execute:6 * 7"],
        "stdio calls run as the local caller"
    );

    let r = c
        .call(
            "download_file",
            json!({"session": "s1", "path": "/mnt/data/a b.txt"}),
        )
        .await;
    assert_eq!(r["content"][0]["resource"]["text"], "abc", "{r}");
    assert_eq!(
        r["content"][0]["resource"]["uri"],
        "ampoule://sessions/s1/files/a%20b.txt"
    );
    let r = c
        .call(
            "download_file",
            json!({"session": "s1", "path": "blob.bin"}),
        )
        .await;
    assert_eq!(r["content"][0]["resource"]["blob"], "/wAB", "{r}");

    let r = c
        .call(
            "upload_file",
            json!({"path": "x.bin", "content": "AAEC", "encoding": "base64"}),
        )
        .await;
    let up: Value = serde_json::from_str(&text(&r)).unwrap();
    assert_eq!(up["size"], 3, "{r}");
    assert_eq!(up["session"], "new");

    let read = c
        .request(
            "resources/read",
            json!({"uri": "ampoule://sessions/s1/files/a%20b.txt"}),
        )
        .await;
    assert_eq!(read["result"]["contents"][0]["text"], "abc", "{read}");
}

#[tokio::test]
async fn bad_calls_are_tool_errors_with_a_message() {
    let mut c = Client::start(Arc::default()).await;
    let cases = [
        ("execute_code", json!({"session": "s"}), "code"),
        ("execute_code", json!({"code": 1}), "expected a string"),
        ("execute_code", json!({"code": "1", "bogus": true}), "bogus"),
        ("execute_code", json!({"code": "  "}), "empty"),
        (
            "execute_code",
            json!({"code": "1", "language": "cobol"}),
            "cobol",
        ),
        (
            "download_file",
            json!({"session": "s", "path": "nope.txt"}),
            "nope.txt",
        ),
        (
            "download_file",
            json!({"session": "s", "path": "/etc/passwd"}),
            "/mnt/data",
        ),
        (
            "upload_file",
            json!({"path": "a", "content": "%%", "encoding": "base64"}),
            "base64",
        ),
        (
            "upload_file",
            json!({"path": "a", "content": "x", "encoding": "utf-16"}),
            "encoding",
        ),
        ("delete_session", json!({"session": "gone"}), "gone"),
        ("list_files", json!({}), "session"),
    ];
    for (tool, args, needle) in cases {
        let r = c.call(tool, args.clone()).await;
        assert_eq!(r["isError"], json!(true), "{tool} {args}: {r}");
        let msg = text(&r);
        assert!(
            msg.contains(needle),
            "{tool} {args}: {msg:?} lacks {needle:?}"
        );
    }
    // An unknown tool is the one protocol error the spec asks for.
    let resp = c
        .request("tools/call", json!({"name": "rm_rf", "arguments": {}}))
        .await;
    assert!(resp.get("error").is_some(), "{resp}");
}

#[test]
fn file_uris_round_trip() {
    let uri = ampoule_mcp::tools::file_uri("my session/1", "dir/a b%.csv");
    assert_eq!(
        uri,
        "ampoule://sessions/my%20session%2F1/files/dir/a%20b%25.csv"
    );
    assert_eq!(
        ampoule_mcp::tools::parse_file_uri(&uri),
        Some(("my session/1".to_owned(), "dir/a b%.csv".to_owned()))
    );
    assert_eq!(
        ampoule_mcp::tools::parse_file_uri("file:///etc/passwd"),
        None
    );
    assert_eq!(
        ampoule_mcp::tools::parse_file_uri("ampoule://sessions/s/files/"),
        None
    );
}
