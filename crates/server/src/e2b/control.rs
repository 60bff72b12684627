//! E2B's control plane: create, connect, list, inspect, time and kill sandboxes — REST with
//! the API key in `X-API-KEY` (or `Authorization: Bearer`), errors `{code, message}`.
//!
//! A template is a pool. The SDKs' default templates (`code-interpreter-v1` for the code
//! interpreter, `base` for the plain SDK) and none at all land in the default pool, unless a
//! pool has that name. Another tenant's sandbox is a 404, as a missing one.
//!
//! Pausing: E2B's `pause` is the core's pause (frozen, memory kept), or its hibernation when
//! the SDK asks for a filesystem-only snapshot (`memory: false`); `autoPause` at create is a
//! lifecycle that hibernates the sandbox at the end of its timeout. `connect` and `resume`
//! run it again. E2B knows two states, so a hibernated sandbox is `paused` here, and one
//! whose memory did not survive says so in `sessionState: "lost"` (never silently).

use std::collections::BTreeMap;
use std::time::SystemTime;

use ampoule_core::lifecycle::{Lifecycle, OnTimeout, State as SandboxState};
use ampoule_core::{Caller, CreateSandbox, SandboxInfo, SandboxTokens};
use axum::Router;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{E2bError, ENVD_VERSION, read_body};
use crate::AppState;

/// Templates the SDKs name by default: the default pool, unless a pool has the name.
const DEFAULT_TEMPLATES: [&str; 4] = ["", "base", "code-interpreter-v1", "code-interpreter"];

/// The control-plane routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(info).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/snapshots", post(not_yet))
        .route("/sandboxes/{id}/fork", post(not_yet))
        .route("/sandboxes/{id}/metrics", get(not_yet))
        .route("/sandboxes/{id}/network", axum::routing::put(not_yet))
}

/// The caller of a control-plane request: its API key from `X-API-KEY` (what the SDKs
/// send) or `Authorization: Bearer`.
fn caller(
    state: &AppState,
    req_headers: &HeaderMap,
    ext: &axum::http::Extensions,
) -> Result<Caller, E2bError> {
    let mut headers = HeaderMap::new();
    if let Some(key) = req_headers.get("x-api-key") {
        let bearer = format!("Bearer {}", key.to_str().unwrap_or_default().trim());
        let v = HeaderValue::from_str(&bearer)
            .map_err(|_| E2bError::unauthorized("the X-API-KEY header is not text"))?;
        headers.insert(header::AUTHORIZATION, v);
    } else if let Some(v) = req_headers.get(header::AUTHORIZATION) {
        headers.insert(header::AUTHORIZATION, v.clone());
    } else {
        return Err(E2bError::unauthorized(
            "missing `X-API-KEY: <ampoule api key>` header (E2B_API_KEY)",
        ));
    }
    let key = state.keys.identify(&headers, ext).map_err(|e| {
        E2bError::new(
            super::status_of(e.code),
            e.message.replace("bearer token", "API key"),
        )
    })?;
    crate::auth::caller(key, ext, req_headers).map_err(|e| E2bError::invalid(e.message))
}

fn request_caller(state: &AppState, req: &Request) -> Result<Caller, E2bError> {
    caller(state, req.headers(), req.extensions())
}

/// `NewSandbox` (v1 and v2): the fields ampoule acts on; the rest is refused when it asks
/// for something ampoule does not do, else ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID", default)]
    template_id: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    /// Hibernated at the end of its timeout. (`autoPauseMemory` is ignored: an auto-pause
    /// keeps memory only on a gVisor pool without network, and the sandbox says
    /// `sessionState: "lost"` or `"kept"` once back.)
    #[serde(default)]
    auto_pause: Option<bool>,
    #[serde(default)]
    volume_mounts: Option<Vec<Value>>,
    #[serde(default)]
    mcp: Option<Value>,
}

fn parse_json<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, E2bError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| E2bError::invalid(format!("invalid request body: {e}")))
}

/// The pool a template names (`None`: the default pool).
fn pool_of(state: &AppState, template: Option<&str>) -> Option<String> {
    let t = template.map(str::trim).unwrap_or_default();
    // A template name may carry a tag (`name:tag`), which pools do not have.
    let t = t.split_once(':').map_or(t, |(name, _)| name);
    if DEFAULT_TEMPLATES.contains(&t) && state.manager.pool_language(Some(t)).is_err() {
        None
    } else {
        Some(t.to_owned())
    }
}

fn rfc3339(t: SystemTime) -> String {
    crate::files::rfc3339(t)
}

/// `Sandbox`: what create, connect and resume answer (with `sessionState`, ampoule's).
fn sandbox_json(state: &AppState, s: &SandboxInfo, tokens: &SandboxTokens) -> Value {
    json!({
        "templateID": s.pool,
        "alias": s.pool,
        "sandboxID": s.id,
        "clientID": "ampoule",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": tokens.access,
        "trafficAccessToken": tokens.traffic,
        "domain": state.e2b.domain,
        "sessionState": s.session_state,
    })
}

/// The state as E2B says it: `running`, or `paused` (a hibernated sandbox too).
fn e2b_state(s: &SandboxInfo) -> &'static str {
    if s.state == SandboxState::Running.as_str() {
        "running"
    } else {
        "paused"
    }
}

/// `ListedSandbox`, and with `detail` the fields of `SandboxDetail`.
fn listed_json(s: &SandboxInfo) -> Value {
    json!({
        "templateID": s.pool,
        "alias": s.pool,
        "sandboxID": s.id,
        "clientID": "ampoule",
        "startedAt": rfc3339(s.created_at),
        "endAt": rfc3339(s.end_at),
        "cpuCount": s.cpus.ceil().max(1.0) as u64,
        "memoryMB": s.memory_bytes / (1024 * 1024),
        "diskSizeMB": 0,
        "state": e2b_state(s),
        "envdVersion": ENVD_VERSION,
        "metadata": s.metadata,
        "sessionState": s.session_state,
    })
}

async fn create(State(state): State<AppState>, req: Request) -> Response {
    let result = async move {
        let caller = request_caller(&state, &req)?;
        let body = read_body(req.into_body(), 1 << 20).await?;
        let new: NewSandbox = parse_json(&body)?;
        if new.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(E2bError::invalid(
                "volume mounts are not supported by ampoule",
            ));
        }
        if new.mcp.as_ref().is_some_and(|m| !m.is_null()) {
            return Err(E2bError::invalid(
                "the MCP gateway is not supported by ampoule (ampoule serves MCP at /mcp)",
            ));
        }
        let template = new.template_id.clone();
        let cmd = CreateSandbox {
            pool: pool_of(&state, template.as_deref()),
            timeout_s: new.timeout,
            metadata: new.metadata.unwrap_or_default(),
            envs: new.env_vars.unwrap_or_default(),
            // `autoPause`: hibernated at the end of its timeout (memory is not kept), running
            // again on `connect` or any call that names it.
            lifecycle: Lifecycle {
                on_timeout: (new.auto_pause == Some(true)).then_some(OnTimeout::Hibernate),
                ..Lifecycle::default()
            },
        };
        let (info, tokens) = state
            .manager
            .create_sandbox(&caller, cmd)
            .await
            .map_err(|e| template_error(e, template.as_deref()))?;
        Ok::<_, E2bError>((
            StatusCode::CREATED,
            axum::Json(sandbox_json(&state, &info, &tokens)),
        ))
    }
    .await;
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

/// An unknown pool, said as E2B says an unknown template.
fn template_error(e: ampoule_core::Error, template: Option<&str>) -> E2bError {
    if e.code() == ampoule_core::ErrorCode::PoolNotFound {
        E2bError::new(
            StatusCode::NOT_FOUND,
            format!(
                "template {:?} not found: an ampoule template is one of the server's pools",
                template.unwrap_or_default()
            ),
        )
    } else {
        e.into()
    }
}

/// Parses E2B's metadata filter: `k=v&k2=v2`, each key and value percent-encoded once more.
fn metadata_filter(raw: &str) -> BTreeMap<String, String> {
    fn decode(s: &str) -> String {
        let once = percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned();
        percent_encoding::percent_decode_str(&once)
            .decode_utf8_lossy()
            .into_owned()
    }
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

async fn list(State(state): State<AppState>, RawQuery(query): RawQuery, req: Request) -> Response {
    let caller = match request_caller(&state, &req) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let mut filter = BTreeMap::new();
    // E2B's states asked for (none: both).
    let mut states: Option<Vec<&'static str>> = None;
    for pair in query.as_deref().unwrap_or_default().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned();
        match k {
            "metadata" => filter.extend(metadata_filter(&v)),
            "state" => {
                for st in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let st = match st {
                        "running" => "running",
                        "paused" => "paused",
                        other => {
                            return E2bError::invalid(format!(
                                "unknown sandbox state {other:?} (`running` or `paused`)"
                            ))
                            .into_response();
                        }
                    };
                    states.get_or_insert_with(Vec::new).push(st);
                }
            }
            _ => {}
        }
    }
    let sandboxes: Vec<Value> = state
        .manager
        .list_sandboxes(&caller, &filter, None)
        .iter()
        .filter(|s| s.is_sandbox)
        .filter(|s| states.as_ref().is_none_or(|w| w.contains(&e2b_state(s))))
        .map(listed_json)
        .collect();
    axum::Json(sandboxes).into_response()
}

async fn info(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let result = (|| {
        let caller = request_caller(&state, &req)?;
        let s = state.manager.get_sandbox(&caller, &id)?;
        let tokens = state.manager.sandbox_tokens(&caller, &id)?;
        let mut v = listed_json(&s);
        if let Some(o) = v.as_object_mut() {
            o.insert("envdAccessToken".into(), tokens.access.into());
            o.insert("domain".into(), state.e2b.domain.clone().into());
        }
        Ok::<_, E2bError>(axum::Json(v))
    })();
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn kill(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let result = async move {
        let caller = request_caller(&state, &req)?;
        state.manager.kill_sandbox(&caller, &id).await?;
        Ok::<_, E2bError>(StatusCode::NO_CONTENT)
    }
    .await;
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct Timeout {
    #[serde(default)]
    timeout: Option<u64>,
}

/// `ConnectSandbox` (v1 and v2) and `ResumedSandbox`: `memory: false` asks for a sandbox
/// that comes back from its disk alone (the SDK's `on_resume="reboot"`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wake {
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    memory: Option<bool>,
    #[serde(default)]
    auto_pause: Option<bool>,
}

/// `SandboxPauseRequest`: `memory: false` is a filesystem-only snapshot (the SDK's
/// `mode="filesystem"`), which is ampoule's hibernation. (`requireHealthyGuest` is ignored:
/// the sandbox's interpreter need not answer for it to be frozen.)
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Pause {
    #[serde(default)]
    memory: Option<bool>,
}

async fn set_timeout(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let result = async move {
        let caller = request_caller(&state, &req)?;
        let body = read_body(req.into_body(), 64 * 1024).await?;
        let t: Timeout = parse_json(&body)?;
        let timeout = t
            .timeout
            .ok_or_else(|| E2bError::invalid("`timeout` (seconds) is required"))?;
        state
            .manager
            .set_sandbox_timeout(&caller, &id, timeout)
            .await?;
        Ok::<_, E2bError>(StatusCode::NO_CONTENT)
    }
    .await;
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Runs a sandbox again, whatever its state (`connect`, and `resume` once it is known not
/// to run): a paused one is thawed, a hibernated one started on its disk. With
/// `memory: false` a paused one drops its memory first (hibernated, then started again),
/// as E2B's reboot; with `timeout`, it then ends that long from now. Answers it, and
/// whether it was not running.
async fn wake(
    state: &AppState,
    caller: &Caller,
    id: &str,
    w: &Wake,
) -> Result<(SandboxInfo, bool), E2bError> {
    let before = state.manager.get_sandbox(caller, id)?;
    let asleep = before.state != SandboxState::Running.as_str();
    if w.auto_pause == Some(true) && before.lifecycle.on_timeout != Some(OnTimeout::Hibernate) {
        return Err(E2bError::invalid(
            "autoPause is set when the sandbox is created, not when it is resumed",
        ));
    }
    if w.memory == Some(false) && before.state == SandboxState::Paused.as_str() {
        if !before.durable {
            return Err(E2bError::invalid(
                "this sandbox cannot come back without its memory: its files are not on disk \
                 (create it with autoPause, or resume it with its memory)",
            ));
        }
        state.manager.hibernate_sandbox(caller, id).await?;
    }
    let info = state
        .manager
        .resume_sandbox(caller, id, w.timeout)
        .await
        .map_err(busy_is_invalid)?;
    Ok((info, asleep))
}

/// A request the sandbox's state refuses (an execution running in it) is a 400 for the
/// SDKs (`InvalidArgumentException`): a 409 means "already paused" (or "already running")
/// to them, which would hide the refusal.
fn busy_is_invalid(e: ampoule_core::Error) -> E2bError {
    if e.code() == ampoule_core::ErrorCode::Conflict {
        E2bError::invalid(e.to_string())
    } else {
        e.into()
    }
}

/// `connect`: the sandbox with its tokens, running (201 when it had to be woken, 200 when it
/// ran already, as E2B).
async fn connect(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let result = async move {
        let caller = request_caller(&state, &req)?;
        let body = read_body(req.into_body(), 64 * 1024).await?;
        let w: Wake = parse_json(&body)?;
        let (info, woken) = wake(&state, &caller, &id, &w).await?;
        let tokens = state.manager.sandbox_tokens(&caller, &id)?;
        let status = if woken {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok::<_, E2bError>((status, axum::Json(sandbox_json(&state, &info, &tokens))))
    }
    .await;
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

/// `resume` (the SDKs' older way back): as `connect`, but a running sandbox is a 409.
async fn resume(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let result = async move {
        let caller = request_caller(&state, &req)?;
        let body = read_body(req.into_body(), 64 * 1024).await?;
        let w: Wake = parse_json(&body)?;
        let s = state.manager.get_sandbox(&caller, &id)?;
        if s.state == SandboxState::Running.as_str() {
            return Err(E2bError::new(
                StatusCode::CONFLICT,
                format!("sandbox {id} is already running"),
            ));
        }
        let (info, _) = wake(&state, &caller, &id, &w).await?;
        let tokens = state.manager.sandbox_tokens(&caller, &id)?;
        Ok::<_, E2bError>((
            StatusCode::CREATED,
            axum::Json(sandbox_json(&state, &info, &tokens)),
        ))
    }
    .await;
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

/// `pause` (`beta_pause`, `pause`): 204 once paused (memory kept), or hibernated when the SDK
/// asks for a filesystem-only snapshot; 409 when it is paused already (the SDKs answer
/// `false`).
async fn pause(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let result = async move {
        let caller = request_caller(&state, &req)?;
        let body = read_body(req.into_body(), 64 * 1024).await?;
        let p: Pause = parse_json(&body)?;
        let s = state.manager.get_sandbox(&caller, &id)?;
        if s.state != SandboxState::Running.as_str() {
            return Err(E2bError::new(
                StatusCode::CONFLICT,
                format!("sandbox {id} is already paused"),
            ));
        }
        if p.memory == Some(false) {
            if !s.durable {
                return Err(E2bError::invalid(
                    "a filesystem-only pause needs a sandbox whose files are on disk (create \
                     it with autoPause); pause it with its memory instead",
                ));
            }
            state
                .manager
                .hibernate_sandbox(&caller, &id)
                .await
                .map_err(busy_is_invalid)?;
        } else {
            state
                .manager
                .pause_sandbox(&caller, &id)
                .await
                .map_err(busy_is_invalid)?;
        }
        Ok::<_, E2bError>(StatusCode::NO_CONTENT)
    }
    .await;
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

/// `refreshes` (keep-alive): the sandbox must exist; its end is its timeout's business.
async fn refresh(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let result = (|| {
        let caller = request_caller(&state, &req)?;
        state.manager.get_sandbox(&caller, &id)?;
        Ok::<_, E2bError>(StatusCode::NO_CONTENT)
    })();
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Snapshots, fork, metrics, network rules: not yet. The key is still
/// checked first, and a missing sandbox is still a 404.
async fn not_yet(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    let what = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let result = (|| {
        let caller = request_caller(&state, &req)?;
        state.manager.get_sandbox(&caller, &id)?;
        Err::<Response, _>(E2bError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("`{what}` is not supported by ampoule yet (see docs/E2B.md)"),
        ))
    })();
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_are_decoded_twice() {
        // What the Python SDK sends once the query string is decoded.
        let f = metadata_filter("user%20id=a%2Fb&k=v");
        assert_eq!(f.get("user id").map(String::as_str), Some("a/b"));
        assert_eq!(f.get("k").map(String::as_str), Some("v"));
    }
}
