//! The Azure Container Apps dynamic-sessions compatible API (PRODUCT.md §2.3), byte-compatible
//! with what the real clients send and read (`shared/research/aca-api.md`).
//!
//! Routing is on the path *suffix*: clients glue operation paths onto whatever endpoint they
//! were given, so `/pools/{pool}/…`, ARM-shaped `…/sessionPools/{pool}/…` and any other prefix
//! (the default pool) all work, and empty segments (`//`) are ignored. The response dialect
//! follows `api-version`: family A (`2024-02-02-preview`, `2024-08-02-preview`, or none) wraps
//! in `properties` and uses `filename/size/lastModifiedTime`; family B (`2024-10-02-preview`
//! and later) is flat and uses `name/sizeInBytes/lastModifiedAt`.
//!
//! Invariants: every answer, including errors, is in the ACA dialect (`x-ms-error-code`); a
//! session is found or created under the caller's tenant only; each operation is one
//! command of the core ([`ampoule_core::service`]), whose policy order decides before any
//! sandbox starts; the transport never touches session state. An execution's ACA `id` and
//! `operation-id` are the core's execution id (the audit record's).

use ampoule_core::{Caller, ExecuteCommand, FileInfo, SessionInfo, Target};
use ampoule_types::{ExecutionResult, ExecutionStatus, Language};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ErrorCode};
use crate::files;

/// Largest execute request body (code plus JSON envelope).
const MAX_EXECUTE_BODY: usize = 16 * 1024 * 1024;

/// An operation, after the prefix was taken off the path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// A1 `code/execute`.
    Execute,
    /// L1 legacy `python/execute` (flat response).
    LegacyExecute,
    /// B1 `executions`.
    Executions,
    /// B2 `executions/{id}`.
    Execution(String),
    /// A2 `files/upload`.
    Upload,
    /// A3/B3/B4 `files`.
    Files,
    /// A4 `files/content/{name}` or B6 `files/{name}/content`.
    Content(String),
    /// `files/{name}`: metadata (GET) or delete (DELETE).
    File(String),
    /// S1/B8 `session`.
    Session,
    /// B9 `listSessions`.
    ListSessions,
    /// B10 `metadata`.
    Metadata,
}

fn decode(seg: &str) -> Result<String, ApiError> {
    percent_decode_str(seg)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::invalid("the path is not valid UTF-8 once decoded"))
}

fn join(segs: &[&str]) -> Result<String, ApiError> {
    Ok(segs
        .iter()
        .map(|s| decode(s))
        .collect::<Result<Vec<_>, _>>()?
        .join("/"))
}

/// Matches a whole operation path (segments still percent-encoded).
fn match_op(segs: &[&str], family_b: bool) -> Result<Option<Op>, ApiError> {
    Ok(Some(match segs {
        ["code", "execute"] => Op::Execute,
        ["python", "execute"] => Op::LegacyExecute,
        ["executions"] => Op::Executions,
        ["executions", id] => Op::Execution(decode(id)?),
        ["files", "upload"] => Op::Upload,
        ["files"] => Op::Files,
        ["files", name @ .., "content"] if family_b && !name.is_empty() => Op::Content(join(name)?),
        ["files", "content", name @ ..] if !name.is_empty() => Op::Content(join(name)?),
        ["files", name @ .., "content"] if !name.is_empty() => Op::Content(join(name)?),
        ["files", name @ ..] if !name.is_empty() => Op::File(join(name)?),
        ["session"] => Op::Session,
        ["listSessions"] => Op::ListSessions,
        ["metadata"] => Op::Metadata,
        _ => return Ok(None),
    }))
}

/// Splits a raw path into the pool it names (none: the default pool) and the operation.
fn route(path: &str, family_b: bool) -> Result<Option<(Option<String>, Op)>, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if let ["pools", pool, rest @ ..] = segs.as_slice() {
        return Ok(match_op(rest, family_b)?.map(|op| (Some(pool.to_string()), op)));
    }
    if let Some(i) = segs
        .iter()
        .position(|s| s.eq_ignore_ascii_case("sessionPools"))
        && i + 1 < segs.len()
    {
        let pool = decode(segs[i + 1])?;
        return Ok(match_op(&segs[i + 2..], family_b)?.map(|op| (Some(pool), op)));
    }
    for start in 0..segs.len() {
        if let Some(op) = match_op(&segs[start..], family_b)? {
            return Ok(Some((None, op)));
        }
    }
    Ok(None)
}

/// The query string, leniently: any order, unknown keys kept, values percent-decoded (a `+`
/// stays a `+`: clients that do not encode identifiers send it raw).
fn query(raw: Option<&str>) -> Vec<(String, String)> {
    raw.unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let d = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
            (d(k), d(v))
        })
        .collect()
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Family B is `2024-10-02-preview` and every later version.
fn is_family_b(version: Option<&str>) -> bool {
    version.is_some_and(|v| v.get(..10).is_some_and(|date| date >= "2024-10-02"))
}

/// Everything a handler needs about one request.
struct Call {
    state: AppState,
    caller: Caller,
    pool: String,
    family_b: bool,
    query: Vec<(String, String)>,
}

impl Call {
    fn identifier(&self) -> Result<String, ApiError> {
        let id = param(&self.query, "identifier")
            .ok_or_else(|| ApiError::invalid("the `identifier` query parameter is required"))?;
        Ok(id.to_owned())
    }

    /// The session of the request's identifier in its pool (the core starts it on first
    /// use, once its policy allows).
    fn target(&self) -> Result<Target, ApiError> {
        Ok(Target::Named {
            pool: Some(self.pool.clone()),
            identifier: self.identifier()?,
        })
    }

    fn language(&self) -> Result<Language, ApiError> {
        Ok(self.state.manager.pool_language(Some(&self.pool))?)
    }
}

/// The fallback handler: every path that is not `/v1`, `/healthz` or `/openapi.json`.
pub async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    let path = req.uri().path();
    if path == "/v1" || path.starts_with("/v1/") {
        return ApiError::new(ErrorCode::NotFound, "no such path in the /v1 API").into_response();
    }
    match handle(state, req).await {
        Ok(resp) => resp,
        Err(e) => e.in_aca().into_response(),
    }
}

async fn handle(state: AppState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let q = query(parts.uri.query());
    let family_b = is_family_b(param(&q, "api-version"));
    let Some((pool, op)) = route(parts.uri.path(), family_b)? else {
        return Err(ApiError::new(ErrorCode::NotFound, "no such operation"));
    };
    let key = state.keys.identify(&parts.headers, &parts.extensions)?;
    let caller = crate::auth::caller(key, &parts.extensions, &parts.headers)?;
    // An unknown pool is the command's to refuse (`pool_not_found`), like any other.
    let pool = pool.unwrap_or_else(|| state.manager.default_pool().to_owned());
    let call = Call {
        state,
        caller,
        pool,
        family_b,
        query: q,
    };
    let m = &parts.method;
    match (&op, m) {
        (Op::Execute, &Method::POST) => execute(&call, body, Dialect::A).await,
        (Op::LegacyExecute, &Method::POST) => execute(&call, body, Dialect::Legacy).await,
        (Op::Executions, &Method::POST) => execute(&call, body, Dialect::B).await,
        (Op::Execution(_), &Method::GET) => Err(ApiError::new(
            ErrorCode::NotFound,
            "executions run synchronously; there is no execution to poll",
        )),
        (Op::Upload, &Method::POST) => upload(&call, &parts.headers, body, false).await,
        (Op::Files, &Method::POST) => upload(&call, &parts.headers, body, true).await,
        (Op::Files, &Method::GET) => list(&call).await,
        (Op::Content(name), &Method::GET) => {
            let d = call
                .state
                .manager
                .get_file(&call.caller, &call.target()?, name)
                .await?;
            Ok(files::download(d))
        }
        (Op::File(name), &Method::GET) => file_meta(&call, name).await,
        (Op::File(name), &Method::DELETE) => delete_file(&call, name).await,
        (Op::Session, &Method::DELETE) => {
            call.state
                .manager
                .delete_session(&call.caller, &call.target()?)
                .await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Op::Session, &Method::GET) => {
            let s = call
                .state
                .manager
                .get_session(&call.caller, &call.target()?)?;
            Ok(axum::Json(session_json(&s)).into_response())
        }
        (Op::ListSessions, &Method::GET) => {
            let sessions: Vec<Value> = call
                .state
                .manager
                .list_sessions(&call.caller, Some(&call.pool))?
                .iter()
                .map(session_json)
                .collect();
            Ok(axum::Json(json!({ "sessions": sessions })).into_response())
        }
        (Op::Metadata, &Method::GET) => {
            let lang = call.language()?;
            Ok(axum::Json(json!({
                "runtimes": [{"name": lang.as_str(), "version": ""}],
                "preInstalledPackages": [],
                "jupyterKernel": null,
            }))
            .into_response())
        }
        _ => Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{m} is not allowed here"),
        )),
    }
}

fn session_json(s: &SessionInfo) -> Value {
    json!({
        "identifier": s.identifier,
        "createdAt": files::rfc3339(s.created_at),
        "lastAccessedAt": files::rfc3339(s.last_used_at),
        "expireAt": files::expires(s),
        "etag": format!("\"{}\"", s.id),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    A,
    B,
    Legacy,
}

/// Parses an execute body: `{"properties":{...}}` (family A) or flat (family B), with
/// case-insensitive enums, and `pythonCode` (legacy) or `shellCommand` (shell pools).
fn parse_execute(body: &[u8]) -> Result<(String, Option<f64>, Option<String>), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not JSON: {e}")))?;
    let props = match v.get("properties") {
        Some(p) if p.is_object() => p,
        _ => &v,
    };
    let text = |k: &str| props.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut code = text("code").or_else(|| text("pythonCode"));
    if code.is_none() {
        code = text("shellCommand").or_else(|| {
            props
                .get("execCommandAndArgs")
                .and_then(Value::as_array)
                .map(|args| {
                    args.iter()
                        .filter_map(Value::as_str)
                        .map(shell_quote)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
        });
    }
    let mut code =
        code.ok_or_else(|| ApiError::invalid("`code` field is required in the request"))?;
    let input_type = text("codeInputType")
        .unwrap_or_default()
        .to_ascii_lowercase();
    if input_type == "inlinebase64" {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(code.trim())
            .map_err(|_| {
                ApiError::invalid("codeInputType is InlineBase64 but code is not base64")
            })?;
        code = String::from_utf8(raw)
            .map_err(|_| ApiError::invalid("the decoded code is not UTF-8"))?;
    }
    let timeout = props.get("timeoutInSeconds").and_then(Value::as_f64);
    let identifier = text("identifier");
    Ok((code, timeout, identifier))
}

fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// The `result` value ACA clients read: the last expression's JSON value, its repr, or an
/// image object; `""` when there is none.
fn aca_result(r: &ExecutionResult) -> Value {
    let image = |b: &ampoule_types::MimeBundle| {
        ["png", "jpeg"].into_iter().find_map(|fmt| {
            b.get(&format!("image/{fmt}"))
                .and_then(Value::as_str)
                .map(|data| json!({"type": "image", "format": fmt, "base64_data": data}))
        })
    };
    if let Some(b) = &r.result {
        if let Some(img) = image(b) {
            return img;
        }
        if let Some(v) = b.get("application/json") {
            return v.clone();
        }
    }
    if let Some(img) = r.outputs.iter().find_map(image) {
        return img;
    }
    r.result
        .as_ref()
        .and_then(|b| b.get("text/plain"))
        .cloned()
        .unwrap_or_else(|| Value::String(String::new()))
}

/// stderr as ACA reports it: with the error's traceback when the kernel sent it apart.
fn aca_stderr(r: &ExecutionResult) -> String {
    let mut err = r.stderr.clone();
    if let Some(e) = &r.error {
        let tb = if e.traceback.is_empty() {
            format!("{}: {}", e.name, e.value)
        } else {
            e.traceback.join("\n")
        };
        if !err.contains(&tb) {
            if !err.is_empty() && !err.ends_with('\n') {
                err.push('\n');
            }
            err.push_str(&tb);
        }
    }
    if r.status == ExecutionStatus::TimedOut {
        err.push_str("\nExecution timed out.");
    }
    err
}

async fn execute(call: &Call, body: Body, dialect: Dialect) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_EXECUTE_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is over {MAX_EXECUTE_BODY} bytes"),
            )
        })?;
    let (code, timeout, body_identifier) = parse_execute(&bytes)?;
    let identifier = match (dialect, param(&call.query, "identifier"), body_identifier) {
        // The legacy endpoint carried the identifier in the body.
        (Dialect::Legacy, None, Some(id)) => id,
        _ => call.identifier()?,
    };
    let target = Target::Named {
        pool: Some(call.pool.clone()),
        identifier,
    };
    let mut cmd = ExecuteCommand::new(target, code);
    cmd.timeout_s = timeout;
    // One command: the core checks the policy before it starts a session.
    let done = call.state.manager.execute(&call.caller, cmd).await?;
    let (result, session, exec_id) = (done.result, done.session, done.execution_id);
    let ms = result.duration_ms.round() as u64;
    let value = aca_result(&result);
    let stderr = aca_stderr(&result);
    let ok = result.status == ExecutionStatus::Succeeded;
    let shell = session.language == Language::Shell;
    let mut resp = match dialect {
        Dialect::A => axum::Json(json!({
            "$id": "1",
            "properties": {
                "$id": "2",
                "status": if ok { "Success" } else { "Failure" },
                "stdout": result.stdout,
                "stderr": stderr,
                "result": value,
                "executionResult": value,
                "executionTimeInMilliseconds": ms,
            }
        }))
        .into_response(),
        Dialect::Legacy => axum::Json(json!({
            "status": if ok { "Success" } else { "Failure" },
            "stdout": result.stdout,
            "stderr": stderr,
            "result": value,
            "executionTimeInMilliseconds": ms,
        }))
        .into_response(),
        Dialect::B => {
            let status = if shell {
                // Shell pools report the exit code as the status (LangChain parses int()).
                result
                    .exit_code
                    .unwrap_or(if ok { 0 } else { 1 })
                    .to_string()
            } else if ok {
                "Succeeded".into()
            } else {
                "Failed".into()
            };
            let mut inner = json!({
                "stdout": result.stdout,
                "stderr": stderr,
                "executionTimeInMilliseconds": ms,
            });
            if !shell {
                inner["executionResult"] = value.clone();
                inner["result"] = value;
            }
            let mut body = json!({
                "id": exec_id,
                "identifier": session.identifier,
                "executionType": "Synchronous",
                "status": status,
                "result": inner,
            });
            if let (false, false, Some(e)) = (ok, shell, &result.error) {
                body["error"] = json!({"code": e.name, "message": e.value});
            }
            let mut r = axum::Json(body).into_response();
            if let Ok(v) = HeaderValue::from_str(&exec_id) {
                r.headers_mut().insert("operation-id", v);
            }
            r
        }
    };
    if let Ok(v) = HeaderValue::from_str(&ms.to_string()) {
        resp.headers_mut().insert("x-ms-overall-execution-time", v);
    }
    Ok(resp)
}

/// A family-A file entry with its `$id`s.
fn entry_a(f: &FileInfo, n: usize) -> Value {
    json!({
        "$id": (2 + 2 * n).to_string(),
        "properties": {
            "$id": (3 + 2 * n).to_string(),
            "filename": f.path,
            "size": f.size,
            "lastModifiedTime": files::rfc3339(f.modified),
        }
    })
}

fn envelope_a(list: &[FileInfo]) -> Value {
    json!({
        "$id": "1",
        "value": list.iter().enumerate().map(|(i, f)| entry_a(f, i)).collect::<Vec<_>>(),
    })
}

/// A family-B `SessionResourceFile`.
fn entry_b(name: &str, f: &FileInfo) -> Value {
    if f.regular {
        json!({
            "name": name,
            "type": "File",
            "contentType": files::mime_for(name),
            "sizeInBytes": f.size,
            "lastModifiedAt": files::rfc3339(f.modified),
        })
    } else {
        json!({
            "name": name,
            "type": "Directory",
            "lastModifiedAt": files::rfc3339(f.modified),
        })
    }
}

async fn upload(
    call: &Call,
    headers: &axum::http::HeaderMap,
    body: Body,
    family_b_shape: bool,
) -> Result<Response, ApiError> {
    let max = call.state.max_upload;
    files::check_content_length(headers, max)?;
    let dir = param(&call.query, "path");
    let stored = files::upload_multipart(
        &call.state.manager,
        &call.caller,
        call.target()?,
        dir,
        headers,
        body,
        max,
        files::FormFields::Ignore,
    )
    .await?;
    if family_b_shape {
        // B3 answers one object (the first file; upload_multipart never returns none).
        let f = stored
            .first()
            .ok_or_else(|| ApiError::invalid("the multipart body has no file part"))?;
        let name = f.path.rsplit('/').next().unwrap_or(&f.path);
        Ok(axum::Json(entry_b(name, f)).into_response())
    } else {
        Ok(axum::Json(envelope_a(&stored)).into_response())
    }
}

async fn list(call: &Call) -> Result<Response, ApiError> {
    let target = call.target()?;
    let (_, all) = call.state.manager.list_files(&call.caller, &target).await?;
    if !call.family_b {
        return Ok(axum::Json(envelope_a(&all)).into_response());
    }
    // Family B lists one directory (`path`, default /mnt/data), recursively on request.
    let dir = match param(&call.query, "path") {
        Some(p) => files::data_dir_param(p)?,
        None => String::new(),
    };
    let recursive = param(&call.query, "recursive").is_some_and(|r| r.eq_ignore_ascii_case("true"));
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut value = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for f in &all {
        let Some(rel) = f.path.strip_prefix(&prefix) else {
            continue;
        };
        match rel.split_once('/') {
            Some((top, _)) if !recursive => {
                dirs.insert(top.to_owned());
            }
            _ => value.push(entry_b(rel, f)),
        }
    }
    for d in dirs {
        let path = format!("{prefix}{d}");
        if let Ok(info) = call
            .state
            .manager
            .stat_file(&call.caller, &target, &path)
            .await
        {
            value.push(entry_b(&d, &info));
        }
    }
    Ok(axum::Json(json!({ "value": value, "nextLink": null })).into_response())
}

async fn file_meta(call: &Call, name: &str) -> Result<Response, ApiError> {
    let info = call
        .state
        .manager
        .stat_file(&call.caller, &call.target()?, name)
        .await?;
    if call.family_b {
        let base = info
            .path
            .rsplit('/')
            .next()
            .unwrap_or(&info.path)
            .to_owned();
        Ok(axum::Json(entry_b(&base, &info)).into_response())
    } else {
        if !info.regular {
            return Err(ApiError::new(ErrorCode::NotAFile, "not a regular file"));
        }
        Ok(axum::Json(envelope_a(std::slice::from_ref(&info))).into_response())
    }
}

async fn delete_file(call: &Call, name: &str) -> Result<Response, ApiError> {
    call.state
        .manager
        .delete_file(&call.caller, &call.target()?, name)
        .await?;
    if call.family_b {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Ok(axum::Json(json!({"message": "file deleted successfully"})).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(path: &str) -> Option<(Option<String>, Op)> {
        route(path, false).unwrap()
    }

    #[test]
    fn routes_match_on_the_suffix_under_any_prefix() {
        assert_eq!(r("/code/execute"), Some((None, Op::Execute)));
        assert_eq!(r("//code//execute"), Some((None, Op::Execute)));
        assert_eq!(
            r("/pools/py/files/upload"),
            Some((Some("py".into()), Op::Upload))
        );
        assert_eq!(
            r("/subscriptions/s/resourceGroups/r/providers/Microsoft.App/sessionPools/p/files"),
            Some((Some("p".into()), Op::Files))
        );
        assert_eq!(
            r("/some/prefix/files/content/a%20b/c.txt"),
            Some((None, Op::Content("a b/c.txt".into())))
        );
        assert_eq!(
            route("/files/out.png/content", true).unwrap(),
            Some((None, Op::Content("out.png".into())))
        );
        assert_eq!(r("/files/x.txt"), Some((None, Op::File("x.txt".into()))));
        assert_eq!(r("/session"), Some((None, Op::Session)));
        assert_eq!(r("/"), None);
        assert_eq!(r("/pools/py/nothing"), None);
    }

    #[test]
    fn queries_are_decoded_leniently() {
        let q = query(Some("api-version=2024-02-02-preview&identifier=a%2Fb+c&x"));
        assert_eq!(param(&q, "identifier"), Some("a/b+c"));
        assert_eq!(param(&q, "API-VERSION"), Some("2024-02-02-preview"));
        assert!(!is_family_b(param(&q, "api-version")));
        assert!(is_family_b(Some("2025-10-02-preview")));
        assert!(is_family_b(Some("2024-10-02-preview")));
        assert!(!is_family_b(Some("2024-08-02-preview")));
        assert!(!is_family_b(None));
    }

    #[test]
    fn execute_bodies_of_every_client_parse() {
        let a = br#"{"properties":{"codeInputType":"inline","executionType":"synchronous","code":"6 * 7"}}"#;
        assert_eq!(parse_execute(a).unwrap().0, "6 * 7");
        let sk = br#"{"properties":{"codeInputType":"Inline","executionType":"Synchronous","code":"1","timeoutInSeconds":100}}"#;
        assert_eq!(parse_execute(sk).unwrap().1, Some(100.0));
        let b = br#"{"codeInputType":"Inline","executionType":"Synchronous","code":"x","timeoutInSeconds":5}"#;
        assert_eq!(parse_execute(b).unwrap().0, "x");
        let b64 = br#"{"codeInputType":"InlineBase64","code":"NiAqIDc="}"#;
        assert_eq!(parse_execute(b64).unwrap().0, "6 * 7");
        let shell = br#"{"shellCommand":"echo hi"}"#;
        assert_eq!(parse_execute(shell).unwrap().0, "echo hi");
        let legacy = br#"{"properties":{"identifier":"abc","pythonCode":"1"}}"#;
        assert_eq!(parse_execute(legacy).unwrap().2.as_deref(), Some("abc"));
        assert!(parse_execute(b"{}").is_err());
        assert!(parse_execute(b"not json").is_err());
    }
}
