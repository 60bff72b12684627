//! envd, E2B's agent inside each sandbox (port 49983), answered by the core: the
//! `process.Process` and `filesystem.Filesystem` Connect services ([`super::connect`]) and
//! the REST routes `/files` (download, upload) and `/health`.
//!
//! Processes are the core's ([`ampoule_core::Manager::start_process`] and friends): the SDK's
//! `/bin/bash -l -c CMD` argv is run as given, its working directory mapped
//! (`/home/user` is `/mnt/data`), and its `Connect-Timeout-Ms` becomes the process's
//! timeout (E2B's `timeout` bounds the command). Output is streamed as it comes, with a
//! keep-alive message at the interval the client asks.
//!
//! Files are the core's file commands on `/mnt/data`. Watching is polling: a watcher keeps
//! the listing it last saw and answers the difference (files created, written, removed) —
//! E2B's polling API (`CreateWatcher`, `GetWatcherEvents`) and its stream (`WatchDir`) alike.
//! Watchers are the only state this door keeps; they are bounded and belong to one tenant's
//! sandbox.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use ampoule_core::{
    Caller, Command, FileInfo, ProcessEnd, ProcessEvent, ProcessSelector, StartProcess, Target,
};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::connect::{self, Code, RpcError};
use super::{E2bError, SandboxPath, map_cwd, read_body};
use crate::AppState;

/// How often a watch stream looks at the files again.
const WATCH_POLL: Duration = Duration::from_millis(500);

/// Watchers kept at most, over all sandboxes, and per sandbox.
const MAX_WATCHERS: usize = 1024;
const MAX_WATCHERS_PER_SANDBOX: usize = 16;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Dispatches a request to envd of sandbox `id`.
pub async fn handle(state: &AppState, caller: Caller, id: &str, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/health") => StatusCode::NO_CONTENT.into_response(),
        (&Method::GET, "/files") => download(state, &caller, id, query_param(&req, "path")).await,
        (&Method::POST, "/files") => upload(state, &caller, id, req).await,
        (&Method::POST, p) if p.starts_with("/process.Process/") => {
            rpc(state, caller, id, req, Service::Process).await
        }
        (&Method::POST, p) if p.starts_with("/filesystem.Filesystem/") => {
            rpc(state, caller, id, req, Service::Filesystem).await
        }
        _ => E2bError::new(
            StatusCode::NOT_FOUND,
            format!("envd has no {method} {path} here (see docs/E2B.md)"),
        )
        .into_response(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Service {
    Process,
    Filesystem,
}

/// The query parameter `name`, percent-decoded.
fn query_param(req: &Request, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

async fn download(state: &AppState, caller: &Caller, id: &str, path: Option<String>) -> Response {
    let result = async {
        let path = path.ok_or_else(|| E2bError::invalid("`path` is required"))?;
        let sp = SandboxPath::parse(&path)?;
        if sp.rel.is_empty() {
            return Err(E2bError::invalid(format!("{path:?} is a directory")));
        }
        let d = state
            .manager
            .get_file(caller, &Target::Id(id.to_owned()), &sp.rel)
            .await
            .map_err(file_error)?;
        Ok::<_, E2bError>(crate::files::download(d))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A core file error as envd says it (a missing file is a 404: `FileNotFoundException`).
fn file_error(e: ampoule_core::Error) -> E2bError {
    E2bError::from(e)
}

/// What `/files` answers for a written file.
fn write_info(sp: &SandboxPath, info: &FileInfo) -> Value {
    json!({
        "name": info.path.rsplit('/').next().unwrap_or_default(),
        "type": "file",
        "path": sp.display(&info.path),
    })
}

async fn upload(state: &AppState, caller: &Caller, id: &str, req: Request) -> Response {
    let result = upload_inner(state, caller, id, req).await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn upload_inner(
    state: &AppState,
    caller: &Caller,
    id: &str,
    req: Request,
) -> Result<Value, E2bError> {
    let max = state.max_upload;
    crate::files::check_content_length(req.headers(), max)?;
    if req
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"))
    {
        return Err(E2bError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads (gzip=True) are not supported by ampoule yet: upload \
             uncompressed",
        ));
    }
    let path = query_param(&req, "path");
    let target = Target::Id(id.to_owned());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !content_type.to_ascii_lowercase().starts_with("multipart/") {
        let path = path.ok_or_else(|| E2bError::invalid("`path` is required"))?;
        let sp = SandboxPath::parse(&path)?;
        let info = crate::files::upload_raw(
            &state.manager,
            caller,
            target,
            &sp.rel,
            req.into_body(),
            max,
        )
        .await?;
        return Ok(json!([write_info(&sp, &info)]));
    }
    let boundary = multer::parse_boundary(&content_type)
        .map_err(|e| E2bError::invalid(format!("multipart body without a boundary: {e}")))?;
    let stream = req.into_body().into_data_stream();
    let mut parts = multer::Multipart::new(stream, boundary);
    let mut written = Vec::new();
    loop {
        let field = match parts.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(E2bError::invalid(format!("malformed multipart body: {e}"))),
        };
        // envd's rule: the `path` parameter names the file; without it, the part's file name.
        let Some(name) = path
            .clone()
            .or_else(|| field.file_name().map(str::to_owned))
        else {
            continue;
        };
        let sp = SandboxPath::parse(&name)?;
        let body = field.map(|c| c.map_err(std::io::Error::other));
        let cmd = ampoule_core::PutFile {
            target: target.clone(),
            path: sp.rel.clone(),
            body: Box::pin(body),
            max,
        };
        let (_, info) = state.manager.put_file(caller, cmd).await?;
        written.push(write_info(&sp, &info));
    }
    if written.is_empty() {
        return Err(E2bError::invalid("the multipart body has no file part"));
    }
    Ok(Value::Array(written))
}

async fn rpc(state: &AppState, caller: Caller, id: &str, req: Request, svc: Service) -> Response {
    let method = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let headers = req.headers().clone();
    let streaming = connect::is_streaming(&headers);
    let fail = |e: RpcError| {
        if streaming {
            connect::stream_error(&e)
        } else {
            e.into_response()
        }
    };
    let body = match read_body(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(e) => return fail(e.into()),
    };
    let msg = match connect::request_message(&body, streaming) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let m = &state.manager;
    match (svc, method.as_str()) {
        (Service::Process, "Start") => start(state, caller, id, &msg, &headers).await,
        (Service::Process, "Connect") => {
            let r = match selector(&msg["process"]) {
                Ok(sel) => m
                    .attach_process(&caller, id, &sel)
                    .await
                    .map_err(RpcError::from),
                Err(e) => Err(e),
            };
            match r {
                Ok(p) => stream_process(Some(p.info.pid), p.events, &headers),
                Err(e) => connect::stream_error(&e),
            }
        }
        (Service::Process, "List") => connect::unary(list_processes(state, &caller, id).await),
        (Service::Process, "SendInput") => {
            connect::unary(send_input(state, &caller, id, &msg).await)
        }
        (Service::Process, "SendSignal") => {
            let r = match selector(&msg["process"]).and_then(|sel| {
                let sig = signal(&msg["signal"])?;
                Ok((sel, sig))
            }) {
                Ok((sel, sig)) => m
                    .signal_process(&caller, id, &sel, sig)
                    .await
                    .map(|()| json!({}))
                    .map_err(RpcError::from),
                Err(e) => Err(e),
            };
            connect::unary(r)
        }
        (Service::Process, "CloseStdin") => {
            let r = match selector(&msg["process"]) {
                Ok(sel) => m
                    .close_stdin(&caller, id, &sel)
                    .await
                    .map(|()| json!({}))
                    .map_err(RpcError::from),
                Err(e) => Err(e),
            };
            connect::unary(r)
        }
        (Service::Filesystem, "Stat") => connect::unary(stat(state, &caller, id, &msg).await),
        (Service::Filesystem, "ListDir") => {
            connect::unary(list_dir(state, &caller, id, &msg).await)
        }
        (Service::Filesystem, "MakeDir") => {
            connect::unary(make_dir(state, &caller, id, &msg).await)
        }
        (Service::Filesystem, "Move") => connect::unary(move_entry(state, &caller, id, &msg).await),
        (Service::Filesystem, "Remove") => connect::unary(remove(state, &caller, id, &msg).await),
        (Service::Filesystem, "CreateWatcher") => {
            connect::unary(create_watcher(state, &caller, id, &msg).await)
        }
        (Service::Filesystem, "GetWatcherEvents") => {
            connect::unary(watcher_events(state, &caller, id, &msg).await)
        }
        (Service::Filesystem, "RemoveWatcher") => {
            connect::unary(remove_watcher(state, &caller, id, &msg))
        }
        (Service::Filesystem, "WatchDir") => watch_dir(state, caller, id, &msg, &headers).await,
        (_, other) => fail(RpcError::new(
            Code::Unimplemented,
            format!(
                "{other} is not supported by ampoule yet (PTY and streamed input are not; see \
                 docs/E2B.md)"
            ),
        )),
    }
}

// ---- processes ----

fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

/// A `ProcessSelector`: `{"pid": N}` or `{"tag": "…"}` (a pid may come as a string).
fn selector(v: &Value) -> Result<ProcessSelector, RpcError> {
    if let Some(pid) = v.get("pid") {
        let pid = pid
            .as_u64()
            .or_else(|| pid.as_str().and_then(|s| s.parse().ok()))
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| RpcError::invalid("`process.pid` is not a pid"))?;
        return Ok(ProcessSelector::Pid(pid));
    }
    if let Some(tag) = str_field(v, "tag") {
        return Ok(ProcessSelector::Tag(tag.to_owned()));
    }
    Err(RpcError::invalid("`process` must name a pid or a tag"))
}

/// A `Signal`: its enum name or number; only SIGTERM and SIGKILL exist in envd's API.
fn signal(v: &Value) -> Result<i32, RpcError> {
    match v {
        Value::String(s) if s == "SIGNAL_SIGKILL" => Ok(9),
        Value::String(s) if s == "SIGNAL_SIGTERM" => Ok(15),
        Value::Number(n) if n.as_i64() == Some(9) || n.as_i64() == Some(15) => {
            Ok(n.as_i64().unwrap_or(9) as i32)
        }
        _ => Err(RpcError::invalid(
            "`signal` must be SIGNAL_SIGKILL or SIGNAL_SIGTERM",
        )),
    }
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

async fn start(
    state: &AppState,
    caller: Caller,
    id: &str,
    msg: &Value,
    headers: &HeaderMap,
) -> Response {
    let r = async {
        if msg.get("pty").is_some_and(|p| !p.is_null()) {
            return Err(RpcError::new(
                Code::Unimplemented,
                "PTY sessions are not supported by ampoule yet: run commands without a pty",
            ));
        }
        let p = &msg["process"];
        let cmd = str_field(p, "cmd")
            .filter(|c| !c.is_empty())
            .ok_or_else(|| RpcError::invalid("`process.cmd` is required"))?;
        let mut argv = vec![cmd.to_owned()];
        if let Some(args) = p.get("args").and_then(Value::as_array) {
            for a in args {
                argv.push(
                    a.as_str()
                        .ok_or_else(|| RpcError::invalid("`process.args` must be strings"))?
                        .to_owned(),
                );
            }
        }
        let mut cmd = StartProcess::new(Command::Argv(argv));
        cmd.envs = string_map(&p["envs"]);
        cmd.cwd = map_cwd(str_field(p, "cwd"));
        cmd.stdin = msg.get("stdin").and_then(Value::as_bool).unwrap_or(false);
        cmd.tag = str_field(msg, "tag").map(str::to_owned);
        cmd.timeout_s = connect::timeout_s(headers);
        state
            .manager
            .start_process(&caller, id, cmd)
            .await
            .map_err(RpcError::from)
    }
    .await;
    match r {
        Ok(p) => stream_process(Some(p.info.pid), p.events, headers),
        Err(e) => connect::stream_error(&e),
    }
}

fn process_event(event: Value) -> Bytes {
    connect::message(&json!({"event": event}))
}

fn end_json(end: &ProcessEnd) -> Value {
    let mut e = json!({
        "exitCode": end.exit_code,
        "exited": end.signal.is_none(),
        "status": end.status(),
    });
    if end.timed_out
        && let Some(o) = e.as_object_mut()
    {
        o.insert(
            "error".into(),
            "the command ran out of its timeout and was killed".into(),
        );
    }
    json!({"end": e})
}

/// A process's events as a Connect stream: its start, its output, keep-alives, its end.
fn stream_process(
    pid: Option<u32>,
    mut events: mpsc::Receiver<ProcessEvent>,
    headers: &HeaderMap,
) -> Response {
    let every = connect::keepalive(headers);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if let Some(pid) = pid
            && tx
                .send(process_event(json!({"start": {"pid": pid}})))
                .await
                .is_err()
        {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            let frame = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ProcessEvent::Stdout(b)) => {
                        process_event(json!({"data": {"stdout": b64().encode(&b)}}))
                    }
                    Some(ProcessEvent::Stderr(b)) => {
                        process_event(json!({"data": {"stderr": b64().encode(&b)}}))
                    }
                    Some(ProcessEvent::End(end)) => {
                        let _ = tx.send(process_event(end_json(&end))).await;
                        let error = end.timed_out.then(|| RpcError::new(
                            Code::DeadlineExceeded,
                            "the command ran out of its timeout and was killed",
                        ));
                        let _ = tx.send(connect::end(error.as_ref())).await;
                        return;
                    }
                    None => {
                        // The core dropped this reader (it did not read for too long) or the
                        // sandbox is gone.
                        let e = RpcError::new(
                            Code::Unavailable,
                            "the process's output stream ended before the process did",
                        );
                        let _ = tx.send(connect::end(Some(&e))).await;
                        return;
                    }
                },
                _ = tick.tick() => process_event(json!({"keepalive": {}})),
            };
            if tx.send(frame).await.is_err() {
                // The client left; the process runs on (E2B's background commands).
                return;
            }
        }
    });
    connect::stream_response(Body::from_stream(frames(rx)))
}

fn frames(
    rx: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
    )
}

fn cwd_out(cwd: &str) -> String {
    if cwd == "/mnt/data" {
        super::HOME.to_owned()
    } else if let Some(rest) = cwd.strip_prefix("/mnt/data/") {
        format!("{}/{rest}", super::HOME)
    } else {
        cwd.to_owned()
    }
}

async fn list_processes(state: &AppState, caller: &Caller, id: &str) -> Result<Value, RpcError> {
    let procs = state.manager.list_processes(caller, id).await?;
    let list: Vec<Value> = procs
        .iter()
        .map(|p| {
            let (cmd, args) = p
                .argv
                .split_first()
                .map_or(("", &[][..]), |(c, a)| (c.as_str(), a));
            let mut v = json!({
                "config": {"cmd": cmd, "args": args, "envs": p.envs, "cwd": cwd_out(&p.cwd)},
                "pid": p.pid,
            });
            if let (Some(tag), Some(o)) = (&p.tag, v.as_object_mut()) {
                o.insert("tag".into(), tag.clone().into());
            }
            v
        })
        .collect();
    Ok(json!({"processes": list}))
}

async fn send_input(
    state: &AppState,
    caller: &Caller,
    id: &str,
    msg: &Value,
) -> Result<Value, RpcError> {
    let sel = selector(&msg["process"])?;
    let input = &msg["input"];
    let data = match (str_field(input, "stdin"), str_field(input, "pty")) {
        (Some(d), _) => d,
        (None, Some(_)) => {
            return Err(RpcError::new(
                Code::Unimplemented,
                "PTY input is not supported by ampoule yet",
            ));
        }
        (None, None) => return Err(RpcError::invalid("`input.stdin` (base64) is required")),
    };
    let bytes = b64()
        .decode(data)
        .map_err(|_| RpcError::invalid("`input.stdin` is not base64"))?;
    state.manager.write_stdin(caller, id, &sel, &bytes).await?;
    Ok(json!({}))
}

// ---- files ----

fn rfc3339(t: SystemTime) -> String {
    crate::files::rfc3339(t)
}

/// An `EntryInfo` (JSON names). Directories are reported `drwxr-xr-x`, files `-rw-r--r--`:
/// the scratch does not report modes, and these are what the sandbox user gets.
fn entry(sp: &SandboxPath, rel: &str, size: u64, modified: SystemTime, dir: bool) -> Value {
    let shown = sp.display(rel);
    let name = shown.rsplit('/').next().unwrap_or_default().to_owned();
    json!({
        "name": name,
        "type": if dir { "FILE_TYPE_DIRECTORY" } else { "FILE_TYPE_FILE" },
        "path": shown,
        "size": size,
        "mode": if dir { 0o755 } else { 0o644 },
        "permissions": if dir { "drwxr-xr-x" } else { "-rw-r--r--" },
        "owner": "user",
        "group": "user",
        "modifiedTime": rfc3339(modified),
    })
}

fn path_of(msg: &Value, name: &str) -> Result<SandboxPath, RpcError> {
    let p =
        str_field(msg, name).ok_or_else(|| RpcError::invalid(format!("`{name}` is required")))?;
    SandboxPath::parse(p).map_err(RpcError::from)
}

/// Stat of a path (the root is always a directory).
async fn stat_entry(
    state: &AppState,
    caller: &Caller,
    id: &str,
    sp: &SandboxPath,
) -> Result<Value, RpcError> {
    if sp.rel.is_empty() {
        state.manager.get_sandbox(caller, id)?;
        return Ok(entry(sp, "", 0, SystemTime::now(), true));
    }
    let info = state
        .manager
        .stat_file(caller, &Target::Id(id.to_owned()), &sp.rel)
        .await?;
    Ok(entry(
        sp,
        &info.path,
        info.size,
        info.modified,
        !info.regular,
    ))
}

async fn stat(state: &AppState, caller: &Caller, id: &str, msg: &Value) -> Result<Value, RpcError> {
    let sp = path_of(msg, "path")?;
    Ok(json!({"entry": stat_entry(state, caller, id, &sp).await?}))
}

/// Every regular file below `dir` (relative to `/mnt/data`), with its path relative to `dir`.
async fn files_below(
    state: &AppState,
    caller: &Caller,
    id: &str,
    dir: &str,
) -> Result<Vec<(String, FileInfo)>, RpcError> {
    let (_, files) = state
        .manager
        .list_files(caller, &Target::Id(id.to_owned()))
        .await?;
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    Ok(files
        .into_iter()
        .filter_map(|f| {
            f.path
                .strip_prefix(&prefix)
                .map(str::to_owned)
                .map(|rel| (rel, f))
        })
        .collect())
}

/// The entries of a directory down to `depth` levels: its files, and the directories that
/// hold files (the scratch lists files; an empty directory does not show).
fn entries(sp: &SandboxPath, files: &[(String, FileInfo)], depth: usize) -> Vec<Value> {
    let mut dirs: BTreeMap<String, SystemTime> = BTreeMap::new();
    let mut out = Vec::new();
    for (rel, f) in files {
        let parts: Vec<&str> = rel.split('/').collect();
        for n in 1..parts.len().min(depth + 1) {
            let d = parts[..n].join("/");
            let t = dirs.entry(d).or_insert(f.modified);
            *t = (*t).max(f.modified);
        }
        if parts.len() <= depth {
            out.push(entry(sp, &f.path, f.size, f.modified, false));
        }
    }
    let base = if sp.rel.is_empty() {
        String::new()
    } else {
        format!("{}/", sp.rel)
    };
    for (d, t) in dirs {
        out.push(entry(sp, &format!("{base}{d}"), 0, t, true));
    }
    out
}

async fn list_dir(
    state: &AppState,
    caller: &Caller,
    id: &str,
    msg: &Value,
) -> Result<Value, RpcError> {
    let sp = path_of(msg, "path")?;
    let depth = msg
        .get("depth")
        .and_then(|d| {
            d.as_u64()
                .or_else(|| d.as_str().and_then(|s| s.parse().ok()))
        })
        .unwrap_or(1)
        .clamp(1, 64) as usize;
    let e = stat_entry(state, caller, id, &sp).await?;
    if e["type"] != "FILE_TYPE_DIRECTORY" {
        return Err(RpcError::invalid(format!(
            "{:?} is not a directory",
            sp.display(&sp.rel)
        )));
    }
    let files = files_below(state, caller, id, &sp.rel).await?;
    Ok(json!({"entries": entries(&sp, &files, depth)}))
}

async fn make_dir(
    state: &AppState,
    caller: &Caller,
    id: &str,
    msg: &Value,
) -> Result<Value, RpcError> {
    let sp = path_of(msg, "path")?;
    if sp.rel.is_empty() {
        return Err(RpcError::new(
            Code::AlreadyExists,
            "the home directory exists",
        ));
    }
    let made = state
        .manager
        .make_dir(caller, &Target::Id(id.to_owned()), &sp.rel)
        .await?;
    if !made {
        return Err(RpcError::new(
            Code::AlreadyExists,
            format!("{:?} already exists", sp.display(&sp.rel)),
        ));
    }
    Ok(json!({"entry": entry(&sp, &sp.rel, 0, SystemTime::now(), true)}))
}

async fn move_entry(
    state: &AppState,
    caller: &Caller,
    id: &str,
    msg: &Value,
) -> Result<Value, RpcError> {
    let from = path_of(msg, "source")?;
    let to = path_of(msg, "destination")?;
    if from.rel.is_empty() || to.rel.is_empty() {
        return Err(RpcError::invalid(
            "the home directory itself cannot be moved or replaced",
        ));
    }
    let info = state
        .manager
        .move_file(caller, &Target::Id(id.to_owned()), &from.rel, &to.rel)
        .await?;
    Ok(json!({"entry": entry(&to, &info.path, info.size, info.modified, false)}))
}

async fn remove(
    state: &AppState,
    caller: &Caller,
    id: &str,
    msg: &Value,
) -> Result<Value, RpcError> {
    let sp = path_of(msg, "path")?;
    if sp.rel.is_empty() {
        return Err(RpcError::invalid(
            "the home directory itself cannot be removed",
        ));
    }
    state
        .manager
        .delete_tree(caller, &Target::Id(id.to_owned()), &sp.rel)
        .await?;
    Ok(json!({}))
}

// ---- watching ----

/// What a watcher saw: path relative to the watched directory → (size, modified).
type Snapshot = BTreeMap<String, (u64, SystemTime)>;

#[derive(Debug)]
struct Watcher {
    tenant: String,
    sandbox: String,
    dir: SandboxPath,
    recursive: bool,
    seen: Snapshot,
}

/// The polling API's watchers, by id.
#[derive(Debug, Default)]
pub struct Watchers(Mutex<HashMap<String, Watcher>>);

async fn snapshot(
    state: &AppState,
    caller: &Caller,
    id: &str,
    dir: &SandboxPath,
    recursive: bool,
) -> Result<Snapshot, RpcError> {
    let files = files_below(state, caller, id, &dir.rel).await?;
    let mut out = Snapshot::new();
    for (rel, f) in files {
        match rel.split_once('/') {
            None => {
                out.insert(rel, (f.size, f.modified));
            }
            Some((top, _)) => {
                if recursive {
                    out.insert(rel.clone(), (f.size, f.modified));
                    // Directories on the way, so that a new one shows as created.
                    let parts: Vec<&str> = rel.split('/').collect();
                    for n in 1..parts.len() {
                        out.entry(parts[..n].join("/"))
                            .or_insert((0, SystemTime::UNIX_EPOCH));
                    }
                } else {
                    out.entry(top.to_owned())
                        .or_insert((0, SystemTime::UNIX_EPOCH));
                }
            }
        }
    }
    Ok(out)
}

/// The difference between two snapshots, as `FilesystemEvent`s.
fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, v) in new {
        match old.get(name) {
            None => out.push(json!({"name": name, "type": "EVENT_TYPE_CREATE"})),
            Some(o) if o != v => out.push(json!({"name": name, "type": "EVENT_TYPE_WRITE"})),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|k| !new.contains_key(*k)) {
        out.push(json!({"name": name, "type": "EVENT_TYPE_REMOVE"}));
    }
    out
}

fn watch_request(msg: &Value) -> Result<(SandboxPath, bool), RpcError> {
    if msg
        .get("includeEntry")
        .or(msg.get("include_entry"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        return Err(RpcError::new(
            Code::Unimplemented,
            "entries in watch events are not supported by ampoule yet",
        ));
    }
    let sp = path_of(msg, "path")?;
    let recursive = msg
        .get("recursive")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok((sp, recursive))
}

async fn check_dir(
    state: &AppState,
    caller: &Caller,
    id: &str,
    sp: &SandboxPath,
) -> Result<(), RpcError> {
    let e = stat_entry(state, caller, id, sp).await?;
    if e["type"] != "FILE_TYPE_DIRECTORY" {
        return Err(RpcError::invalid(format!(
            "{:?} is not a directory",
            sp.display(&sp.rel)
        )));
    }
    Ok(())
}

async fn create_watcher(
    state: &AppState,
    caller: &Caller,
    id: &str,
    msg: &Value,
) -> Result<Value, RpcError> {
    let (dir, recursive) = watch_request(msg)?;
    check_dir(state, caller, id, &dir).await?;
    let seen = snapshot(state, caller, id, &dir, recursive).await?;
    let mut w = state
        .e2b
        .watchers
        .0
        .lock()
        .map_err(|_| RpcError::new(Code::Internal, "watchers poisoned"))?;
    // Watchers of sandboxes that are gone go first.
    w.retain(|_, x| {
        state
            .manager
            .get_sandbox(&Caller::new(x.tenant.clone()), &x.sandbox)
            .is_ok()
    });
    let mine = w.values().filter(|x| x.sandbox == id).count();
    if w.len() >= MAX_WATCHERS || mine >= MAX_WATCHERS_PER_SANDBOX {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("at most {MAX_WATCHERS_PER_SANDBOX} watchers per sandbox: stop one first"),
        ));
    }
    let watcher_id = format!("w_{}", random_id());
    w.insert(
        watcher_id.clone(),
        Watcher {
            tenant: caller.tenant.clone(),
            sandbox: id.to_owned(),
            dir,
            recursive,
            seen,
        },
    );
    Ok(json!({"watcherId": watcher_id}))
}

fn random_id() -> String {
    ampoule_core::manager::random_hex(12)
}

fn watcher_id(msg: &Value) -> Result<String, RpcError> {
    str_field(msg, "watcherId")
        .or_else(|| str_field(msg, "watcher_id"))
        .map(str::to_owned)
        .ok_or_else(|| RpcError::invalid("`watcherId` is required"))
}

fn not_my_watcher() -> RpcError {
    RpcError::new(
        Code::NotFound,
        "no such watcher (it was stopped, or the sandbox is gone)",
    )
}

async fn watcher_events(
    state: &AppState,
    caller: &Caller,
    id: &str,
    msg: &Value,
) -> Result<Value, RpcError> {
    let wid = watcher_id(msg)?;
    let (dir, recursive, old) = {
        let w = state
            .e2b
            .watchers
            .0
            .lock()
            .map_err(|_| RpcError::new(Code::Internal, "watchers poisoned"))?;
        let x = w
            .get(&wid)
            .filter(|x| x.sandbox == id && x.tenant == caller.tenant)
            .ok_or_else(not_my_watcher)?;
        (x.dir.clone(), x.recursive, x.seen.clone())
    };
    let new = snapshot(state, caller, id, &dir, recursive).await?;
    let events = diff(&old, &new);
    if let Ok(mut w) = state.e2b.watchers.0.lock()
        && let Some(x) = w.get_mut(&wid)
    {
        x.seen = new;
    }
    Ok(json!({"events": events}))
}

fn remove_watcher(
    state: &AppState,
    caller: &Caller,
    id: &str,
    msg: &Value,
) -> Result<Value, RpcError> {
    let wid = watcher_id(msg)?;
    let mut w = state
        .e2b
        .watchers
        .0
        .lock()
        .map_err(|_| RpcError::new(Code::Internal, "watchers poisoned"))?;
    match w.get(&wid) {
        Some(x) if x.sandbox == id && x.tenant == caller.tenant => {
            w.remove(&wid);
            Ok(json!({}))
        }
        _ => Err(not_my_watcher()),
    }
}

/// `WatchDir`: a stream of the differences, polled every [`WATCH_POLL`], until the client
/// leaves or the sandbox ends. Its messages are the `WatchDirResponse` oneof itself
/// (`{"start":{}}`, `{"filesystem":…}`), not wrapped in `event` as a process's are.
async fn watch_dir(
    state: &AppState,
    caller: Caller,
    id: &str,
    msg: &Value,
    headers: &HeaderMap,
) -> Response {
    let r = async {
        let (dir, recursive) = watch_request(msg)?;
        check_dir(state, &caller, id, &dir).await?;
        let seen = snapshot(state, &caller, id, &dir, recursive).await?;
        Ok::<_, RpcError>((dir, recursive, seen))
    }
    .await;
    let (dir, recursive, mut seen) = match r {
        Ok(x) => x,
        Err(e) => return connect::stream_error(&e),
    };
    let every = connect::keepalive(headers);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let state = state.clone();
    let id = id.to_owned();
    tokio::spawn(async move {
        if tx
            .send(connect::message(&json!({"start": {}})))
            .await
            .is_err()
        {
            return;
        }
        let mut last_sent = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(WATCH_POLL).await;
            if tx.is_closed() {
                return;
            }
            let new = match snapshot(&state, &caller, &id, &dir, recursive).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.send(connect::end(Some(&e))).await;
                    return;
                }
            };
            for ev in diff(&seen, &new) {
                if tx
                    .send(connect::message(&json!({"filesystem": ev})))
                    .await
                    .is_err()
                {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
            seen = new;
            if last_sent.elapsed() >= every {
                if tx
                    .send(connect::message(&json!({"keepalive": {}})))
                    .await
                    .is_err()
                {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
        }
    });
    connect::stream_response(Body::from_stream(frames(rx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str) -> (String, FileInfo) {
        (
            path.to_owned(),
            FileInfo {
                path: path.to_owned(),
                size: 1,
                modified: SystemTime::UNIX_EPOCH,
                regular: true,
            },
        )
    }

    #[test]
    fn listings_show_files_and_the_directories_that_hold_them() {
        let sp = SandboxPath::parse("/home/user").unwrap();
        let files = [f("a.txt"), f("d/b.txt"), f("d/e/c.txt")];
        let names = |v: Vec<Value>| -> Vec<String> {
            let mut n: Vec<String> = v
                .iter()
                .map(|e| e["path"].as_str().unwrap().to_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(entries(&sp, &files, 1)),
            ["/home/user/a.txt", "/home/user/d"]
        );
        assert_eq!(
            names(entries(&sp, &files, 2)),
            [
                "/home/user/a.txt",
                "/home/user/d",
                "/home/user/d/b.txt",
                "/home/user/d/e"
            ]
        );
    }

    #[test]
    fn snapshots_diff_into_events() {
        let mut a = Snapshot::new();
        a.insert("x".into(), (1, SystemTime::UNIX_EPOCH));
        a.insert("y".into(), (1, SystemTime::UNIX_EPOCH));
        let mut b = Snapshot::new();
        b.insert("x".into(), (2, SystemTime::UNIX_EPOCH));
        b.insert("z".into(), (1, SystemTime::UNIX_EPOCH));
        let ev = diff(&a, &b);
        let kinds: Vec<(&str, &str)> = ev
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e["type"].as_str().unwrap()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("x", "EVENT_TYPE_WRITE"),
                ("z", "EVENT_TYPE_CREATE"),
                ("y", "EVENT_TYPE_REMOVE")
            ]
        );
        assert_eq!(signal(&json!("SIGNAL_SIGKILL")).unwrap(), 9);
        assert!(signal(&json!(3)).is_err());
        assert_eq!(
            selector(&json!({"pid": "12"})).unwrap(),
            ProcessSelector::Pid(12)
        );
    }
}
