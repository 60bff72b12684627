//! E2B's code interpreter (port 49999): `POST /execute` answers the execution as NDJSON
//! (`stdout`, `stderr`, `result` with one key per MIME type, `error`,
//! `number_of_executions`, then `end_of_execution`), and `/contexts` manages the
//! sandbox's contexts. Each request is one call of the core
//! ([`ampoule_core::Manager::execute_streaming`], `create_context`, …).
//!
//! A context with no language runs the sandbox's (the pool's) language, and one naming
//! neither context nor language runs in the sandbox's interpreter — E2B's default context.

use std::time::SystemTime;

use ampoule_core::{Caller, CreateContext, ExecuteCommand, Target};
use ampoule_types::{ExecutionEvent, ExecutionResult, ExecutionStatus, Language, MimeBundle};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{E2bError, map_cwd, read_body};
use crate::AppState;

/// Largest `/execute` body.
const MAX_CODE: usize = 4 << 20;

/// Dispatches a request to the code interpreter of sandbox `id`.
pub async fn handle(state: &AppState, caller: Caller, id: &str, req: Request) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let method = req.method().clone();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["health"]) => Ok(axum::Json(json!({"status": "ok"})).into_response()),
        (&Method::POST, ["execute"]) => execute(state, &caller, id, req.into_body()).await,
        (&Method::POST, ["contexts"]) => create_context(state, &caller, id, req.into_body()).await,
        (&Method::GET, ["contexts"]) => list_contexts(state, &caller, id).await,
        (&Method::DELETE, ["contexts", ctx]) => state
            .manager
            .delete_context(&caller, id, ctx)
            .await
            .map(|()| StatusCode::NO_CONTENT.into_response())
            .map_err(E2bError::from),
        (&Method::POST, ["contexts", ctx, "restart"]) => state
            .manager
            .restart_context(&caller, id, ctx)
            .await
            .map(|_| StatusCode::NO_CONTENT.into_response())
            .map_err(E2bError::from),
        _ => Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!("the code interpreter has no {method} {path}"),
        )),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// E2B's name of a language (`bash` for the shell).
fn language_name(l: Language) -> &'static str {
    match l {
        Language::Shell => "bash",
        other => other.as_str(),
    }
}

/// A language from the client, E2B's names normalized (`js`, `ts`, `bash`).
fn language_in(l: &str) -> String {
    match l.trim().to_ascii_lowercase().as_str() {
        "js" => "javascript".into(),
        "ts" => "typescript".into(),
        "bash" | "sh" => "shell".into(),
        other => other.to_owned(),
    }
}

/// A working directory as E2B shows it (`/mnt/data` is `/home/user`).
fn cwd_out(cwd: &str) -> String {
    if cwd == "/mnt/data" {
        super::HOME.to_owned()
    } else if let Some(rest) = cwd.strip_prefix("/mnt/data/") {
        format!("{}/{rest}", super::HOME)
    } else {
        cwd.to_owned()
    }
}

fn context_json(c: &ampoule_core::ContextInfo) -> Value {
    json!({"id": c.id, "language": language_name(c.language), "cwd": cwd_out(&c.cwd)})
}

#[derive(Debug, Default, Deserialize)]
struct NewContext {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

async fn create_context(
    state: &AppState,
    caller: &Caller,
    id: &str,
    body: Body,
) -> Result<Response, E2bError> {
    let body = read_body(body, 64 * 1024).await?;
    let new: NewContext = if body.iter().all(u8::is_ascii_whitespace) {
        NewContext::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| E2bError::invalid(format!("invalid body: {e}")))?
    };
    let cmd = CreateContext {
        language: new.language.as_deref().map(language_in),
        cwd: map_cwd(new.cwd.as_deref()),
    };
    let ctx = state.manager.create_context(caller, id, cmd).await?;
    Ok(axum::Json(context_json(&ctx)).into_response())
}

async fn list_contexts(state: &AppState, caller: &Caller, id: &str) -> Result<Response, E2bError> {
    let list = state.manager.list_contexts(caller, id).await?;
    Ok(axum::Json(list.iter().map(context_json).collect::<Vec<_>>()).into_response())
}

#[derive(Debug, Deserialize)]
struct Execute {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<Map<String, Value>>,
}

async fn execute(
    state: &AppState,
    caller: &Caller,
    id: &str,
    body: Body,
) -> Result<Response, E2bError> {
    let body = read_body(body, MAX_CODE).await?;
    let req: Execute = serde_json::from_slice(&body)
        .map_err(|e| E2bError::invalid(format!("invalid body (expected {{\"code\": …}}): {e}")))?;
    if req.context_id.is_some() && req.language.is_some() {
        return Err(E2bError::invalid(
            "give either context_id or language, not both",
        ));
    }
    if req.env_vars.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(E2bError::invalid(
            "per-execution env_vars are not supported by ampoule yet: set them on the sandbox \
             (Sandbox.create(envs=…)) or in the code",
        ));
    }
    let mut cmd = ExecuteCommand::new(Target::Id(id.to_owned()), req.code);
    cmd.language = req.language.as_deref().map(language_in);
    cmd.context = req.context_id;
    let run = state.manager.execute_streaming(caller, cmd).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut events = run.events;
        while let Some(ev) = events.recv().await {
            if tx.send(line(&event_json(ev))).await.is_err() {
                // The client left; the execution goes on in the core, unobserved.
                return;
            }
        }
        let tail = match run.outcome.await {
            Ok(result) => tail(&result),
            Err(e) => {
                let e = E2bError::from(e);
                vec![
                    json!({"type": "error", "name": "SandboxError", "value": e.message, "traceback": ""}),
                ]
            }
        };
        for v in tail {
            if tx.send(line(&v)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(line(&json!({"type": "end_of_execution"}))).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn event_json(ev: ExecutionEvent) -> Value {
    match ev {
        ExecutionEvent::Stdout { text } => {
            json!({"type": "stdout", "text": text, "timestamp": now_ns()})
        }
        ExecutionEvent::Stderr { text } => {
            json!({"type": "stderr", "text": text, "timestamp": now_ns()})
        }
        ExecutionEvent::Display { data } => result_json(&data, false),
    }
}

/// A MIME bundle as E2B's `result`: one key per known type, the others under `extra`.
pub fn result_json(data: &MimeBundle, is_main: bool) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), "result".into());
    let mut extra = Map::new();
    for (mime, v) in data {
        let key = match mime.as_str() {
            "text/plain" => "text",
            "text/html" => "html",
            "text/markdown" => "markdown",
            "image/svg+xml" => "svg",
            "image/png" => "png",
            "image/jpeg" => "jpeg",
            "application/pdf" => "pdf",
            "text/latex" => "latex",
            "application/json" => "json",
            "application/javascript" => "javascript",
            "e2b/chart" | "application/vnd.e2b.chart+json" => "chart",
            "e2b/data" | "application/vnd.e2b.data+json" => "data",
            _ => {
                extra.insert(mime.clone(), v.clone());
                continue;
            }
        };
        out.insert(key.into(), v.clone());
    }
    if !extra.is_empty() {
        out.insert("extra".into(), Value::Object(extra));
    }
    out.insert("is_main_result".into(), is_main.into());
    Value::Object(out)
}

/// What follows the streamed output: the main result, the error, the execution count.
fn tail(r: &ExecutionResult) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(data) = &r.result {
        out.push(result_json(data, true));
    }
    if let Some(e) = &r.error {
        out.push(json!({
            "type": "error",
            "name": e.name,
            "value": e.value,
            "traceback": e.traceback.join("\n"),
        }));
    } else {
        match r.status {
            ExecutionStatus::TimedOut => out.push(json!({
                "type": "error",
                "name": "TimeoutError",
                "value": "the execution ran out of time and was stopped (the context's state is lost)",
                "traceback": "",
            })),
            ExecutionStatus::Killed => out.push(json!({
                "type": "error",
                "name": "ResourceLimitError",
                "value": format!(
                    "the execution was stopped by its {} limit",
                    r.limit.map(|l| format!("{l:?}").to_lowercase()).unwrap_or_else(|| "resource".into())
                ),
                "traceback": "",
            })),
            ExecutionStatus::Failed if r.exit_code.is_some_and(|c| c != 0) => out.push(json!({
                "type": "error",
                "name": "ExitCodeError",
                "value": format!("exit code {}", r.exit_code.unwrap_or_default()),
                "traceback": "",
            })),
            _ => {}
        }
    }
    if let Some(n) = r.execution_count {
        out.push(json!({"type": "number_of_executions", "execution_count": n}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_bundles_become_e2b_results() {
        let mut b = MimeBundle::new();
        b.insert("text/plain".into(), "2".into());
        b.insert("image/png".into(), "iVBOR".into());
        b.insert("application/x-custom".into(), "x".into());
        let v = result_json(&b, true);
        assert_eq!(v["text"], "2");
        assert_eq!(v["png"], "iVBOR");
        assert_eq!(v["extra"]["application/x-custom"], "x");
        assert_eq!(v["is_main_result"], true);
        assert_eq!(language_in("js"), "javascript");
        assert_eq!(cwd_out("/mnt/data/x"), "/home/user/x");
    }
}
