//! `/v1/sandboxes` (PRODUCT.md §7): sandboxes and their contexts, executions, processes, files
//! and ports, each handler one command of the core ([`ampoule_core::sandbox`]).
//!
//! Conventions are the rest of `/v1`'s: the API key names the tenant (another tenant's
//! sandbox, context or process is a 404 like a missing one), errors are `ApiError` bodies,
//! streams are NDJSON or, with `Accept: text/event-stream`, server-sent events. A session is
//! a sandbox too (`ses_…` ids work here; `sbx_…` ids work on the session file paths). The
//! bodies are checked here against exactly what their schemas in `openapi.json` say, so that
//! a schema-valid request is never refused by a rule the document does not state.
//!
//! Ports are the one place without an API key: a sandbox's traffic token
//! (`X-Access-Token`, answered once, by `POST /v1/sandboxes`) grants that sandbox's ports.

use std::collections::BTreeMap;

use ampoule_core::{
    Command, ContextInfo, CreateContext as CoreCreateContext, CreateSandbox as CoreCreateSandbox,
    ExecuteCommand, ProcessEnd, ProcessEvent, ProcessInfo, ProcessSelector, ProcessStream,
    SandboxInfo, StartProcess, Target,
};
use ampoule_types::Language;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{
    DirQuery, Execution, FileContent, FileItem, FileList, JsonBody, PathParams, QueryParams,
    StreamEnd, UploadForm, frame, stream_execution, streaming_headers, wants_sse,
};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, ErrorCode, ErrorDetail};
use crate::files;

/// Most seconds a sandbox may be given to live at once (its pool's lifetime still caps it).
const MAX_TIMEOUT_S: u64 = 2_147_483_647;
/// Most seconds a process may be given.
const MAX_PROCESS_TIMEOUT_S: f64 = 31_536_000.0;
/// Bytes of output `wait` keeps of each stream.
const WAIT_KEEP: usize = 1 << 20;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_sandbox, list_sandboxes))
        .routes(routes!(get_sandbox, kill_sandbox))
        .routes(routes!(set_timeout))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(hibernate))
        .routes(routes!(create_context, list_contexts))
        .routes(routes!(get_context, delete_context))
        .routes(routes!(restart_context))
        .routes(routes!(execute))
        .routes(routes!(execute_stream))
        .routes(routes!(start_process, list_processes))
        .routes(routes!(attach_process))
        .routes(routes!(write_stdin))
        .routes(routes!(close_stdin))
        .routes(routes!(signal_process))
        .routes(routes!(list_files, upload_files))
        .routes(routes!(get_file, put_file, delete_file))
        .routes(routes!(proxy_port))
        // The server's root (`…/ports/8080` or `…/ports/8080/`, which `{*path}` does not
        // match): the same, undocumented.
        .route(
            "/v1/sandboxes/{id}/ports/{port}",
            axum::routing::any(proxy_port_root),
        )
        .route(
            "/v1/sandboxes/{id}/ports/{port}/",
            axum::routing::any(proxy_port_root),
        )
}

// ---- shapes ----

/// `POST /v1/sandboxes`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// The pool, the sandbox's template (default: the server's default pool).
    pub pool: Option<String>,
    /// Seconds until it is destroyed, however busy (default 300; never beyond the pool's
    /// session lifetime).
    #[schema(minimum = 1, maximum = 2_147_483_647)]
    #[serde(default, deserialize_with = "whole_seconds_opt")]
    pub timeout_s: Option<u64>,
    /// Labels answered back and filtered on (`GET /v1/sandboxes?metadata.K=V`).
    #[schema(schema_with = metadata_schema)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Variables every process and context of the sandbox gets (their values are never
    /// answered back).
    #[schema(schema_with = envs_schema)]
    pub envs: Option<BTreeMap<String, String>>,
    /// Its lifecycle policy, field by field over its pool's (`[pools.NAME.lifecycle]`).
    #[schema(schema_with = lifecycle_request_schema)]
    pub lifecycle: Option<Lifecycle>,
    /// Why the caller does this (`prompt`, `run_id`, `agent`, `step`, …): a JSON object of
    /// at most 4 KiB kept in the audit records it causes, as `context` on `/v1/sessions`
    /// (named so here because `context` names the language context to run in).
    #[schema(value_type = Option<Object>)]
    pub caller_context: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The lifecycle a create request may ask for: [`Lifecycle`]'s fields, in two alternatives
/// so that the document states the one rule across fields (a sandbox that is not durable
/// cannot hibernate): `durable` true or left to the policy, or `durable: false` with no
/// hibernation in the policy.
fn lifecycle_request_schema() -> utoipa::openapi::schema::Schema {
    use serde_json::Value;
    use utoipa::PartialSchema;
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
    let null = || ObjectBuilder::new().schema_type(Type::Null).build();
    let RefOr::T(Schema::Object(base)) = <Lifecycle as PartialSchema>::schema() else {
        return OneOfBuilder::new().item(null()).build().into();
    };
    let choice = |ty: Type, values: Vec<Value>| {
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([ty, Type::Null]))
            .enum_values(Some(values))
            .build()
    };
    let mut durable = base.clone();
    durable.properties.insert(
        "durable".into(),
        choice(Type::Boolean, vec![Value::Bool(true), Value::Null]).into(),
    );
    let mut not_durable = base;
    not_durable.properties.insert(
        "durable".into(),
        ObjectBuilder::new()
            .schema_type(Type::Boolean)
            .enum_values(Some([false]))
            .build()
            .into(),
    );
    not_durable.required.push("durable".into());
    not_durable.properties.insert(
        "on_idle".into(),
        choice(
            Type::String,
            vec!["pause".into(), "delete".into(), Value::Null],
        )
        .into(),
    );
    not_durable.properties.insert(
        "on_timeout".into(),
        choice(Type::String, vec!["delete".into(), Value::Null]).into(),
    );
    not_durable
        .properties
        .insert("hibernate_after_s".into(), null().into());
    OneOfBuilder::new()
        .item(null())
        .item(durable)
        .item(not_durable)
        .description(Some(
            "Its lifecycle policy, field by field over its pool's (`[pools.NAME.lifecycle]`). \
             A sandbox with `durable: false` cannot hibernate (no `on_idle: hibernate`, \
             `on_timeout: hibernate` or `hibernate_after_s`).",
        ))
        .build()
        .into()
}

/// What idleness does to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    /// Freeze it: its processes stop, its memory is kept.
    Pause,
    /// Put it on disk: nothing of it runs, its files are kept, its memory is not.
    Hibernate,
    /// Destroy it.
    Delete,
}

/// What the end of a sandbox's timeout does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Destroy it (the default).
    Delete,
    /// Hibernate it (E2B's `autoPause`).
    Hibernate,
}

/// A lifecycle policy: what idleness and time do to a sandbox. Each field left out (or
/// `null`) is the pool's. Idle means no execution, no running process and no open port
/// connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    /// What idleness does (none: the sandbox lives until its timeout however idle).
    pub on_idle: Option<OnIdle>,
    /// Idle seconds before `on_idle` acts (default: the pool's idle timeout).
    #[schema(minimum = 1, maximum = 2_147_483_647)]
    #[serde(default, deserialize_with = "whole_seconds_opt")]
    pub idle_timeout_s: Option<u64>,
    /// Paused seconds before a paused sandbox is hibernated.
    #[schema(minimum = 1, maximum = 2_147_483_647)]
    #[serde(default, deserialize_with = "whole_seconds_opt")]
    pub hibernate_after_s: Option<u64>,
    /// Paused or hibernated seconds before it is deleted.
    #[schema(minimum = 1, maximum = 2_147_483_647)]
    #[serde(default, deserialize_with = "whole_seconds_opt")]
    pub delete_after_s: Option<u64>,
    /// Age in seconds (from its creation, whatever its states since) at which it is deleted.
    #[schema(minimum = 1, maximum = 2_147_483_647)]
    #[serde(default, deserialize_with = "whole_seconds_opt")]
    pub max_lifetime_s: Option<u64>,
    /// What the end of its timeout does.
    pub on_timeout: Option<OnTimeout>,
    /// Whether its files live on a disk image under the server's data directory, so that it
    /// can hibernate and outlives a restart of the server (default: when the policy pauses or
    /// hibernates it). `false` with a policy that hibernates is refused.
    pub durable: Option<bool>,
}

impl Lifecycle {
    /// The core's policy, checked: a duration of 0 or above 2147483647 seconds, or a policy
    /// that hibernates a sandbox that is not durable, is a 400.
    fn to_core(&self) -> Result<ampoule_core::lifecycle::Lifecycle, ApiError> {
        use ampoule_core::lifecycle as core;
        let durations = [
            ("idle_timeout_s", self.idle_timeout_s),
            ("hibernate_after_s", self.hibernate_after_s),
            ("delete_after_s", self.delete_after_s),
            ("max_lifetime_s", self.max_lifetime_s),
        ];
        for (name, v) in durations {
            if v.is_some_and(|v| v == 0 || v > MAX_TIMEOUT_S) {
                return Err(ApiError::invalid(format!(
                    "`lifecycle.{name}` is 1-2147483647"
                )));
            }
        }
        let out = core::Lifecycle {
            on_idle: self.on_idle.map(|o| match o {
                OnIdle::Pause => core::OnIdle::Pause,
                OnIdle::Hibernate => core::OnIdle::Hibernate,
                OnIdle::Delete => core::OnIdle::Delete,
            }),
            idle_timeout_s: self.idle_timeout_s,
            hibernate_after_s: self.hibernate_after_s,
            delete_after_s: self.delete_after_s,
            max_lifetime_s: self.max_lifetime_s,
            on_timeout: self.on_timeout.map(|o| match o {
                OnTimeout::Delete => core::OnTimeout::Delete,
                OnTimeout::Hibernate => core::OnTimeout::Hibernate,
            }),
            durable: self.durable,
        };
        out.check().map_err(ApiError::invalid)?;
        Ok(out)
    }
}

impl From<&ampoule_core::lifecycle::Lifecycle> for Lifecycle {
    fn from(l: &ampoule_core::lifecycle::Lifecycle) -> Self {
        use ampoule_core::lifecycle as core;
        Self {
            on_idle: l.on_idle.map(|o| match o {
                core::OnIdle::Pause => OnIdle::Pause,
                core::OnIdle::Hibernate => OnIdle::Hibernate,
                core::OnIdle::Delete => OnIdle::Delete,
            }),
            idle_timeout_s: l.idle_timeout_s,
            hibernate_after_s: l.hibernate_after_s,
            delete_after_s: l.delete_after_s,
            max_lifetime_s: l.max_lifetime_s,
            on_timeout: l.on_timeout.map(|o| match o {
                core::OnTimeout::Delete => OnTimeout::Delete,
                core::OnTimeout::Hibernate => OnTimeout::Hibernate,
            }),
            // What it is, not only what was asked.
            durable: Some(l.is_durable()),
        }
    }
}

fn string_schema(min: usize, max: usize, pattern: Option<&str>) -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .min_length(Some(min))
        .max_length(Some(max))
        .pattern(pattern)
        .build()
}

fn map_schema(
    description: &str,
    max: usize,
    names: utoipa::openapi::Object,
    values: utoipa::openapi::Object,
) -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{SchemaType, Type};
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .description(Some(description))
        .max_properties(Some(max))
        .property_names(Some(names))
        .additional_properties(Some(utoipa::openapi::schema::AdditionalProperties::RefOr(
            utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(values)),
        )))
        .build()
}

/// Metadata: at most 64 pairs, keys of 1-64 characters, values of up to 1024.
fn metadata_schema() -> utoipa::openapi::Object {
    map_schema(
        "at most 64 pairs; keys of 1-64 characters, values of up to 1024",
        64,
        string_schema(1, 64, None),
        string_schema(0, 1024, None),
    )
}

const ENV_NAME: &str = "^[A-Za-z_][A-Za-z0-9_]*$";
const NO_NUL: &str = "^[^\\x00]*$";

/// Variables: at most 256, names as a shell's, values without NUL of up to 16384 characters.
fn envs_schema() -> utoipa::openapi::Object {
    map_schema(
        "at most 256 variables; names of letters, digits and `_` (not first a digit), values \
         without NUL of up to 16384 characters",
        256,
        string_schema(1, 256, Some(ENV_NAME)),
        string_schema(0, 16384, Some(NO_NUL)),
    )
}

fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let bad = m.len() > 64
        || m.iter().any(|(k, v)| {
            let n = k.chars().count();
            n == 0 || n > 64 || v.chars().count() > 1024
        });
    if bad {
        return Err(ApiError::invalid(
            "metadata: at most 64 pairs, keys of 1-64 characters, values of up to 1024",
        ));
    }
    Ok(())
}

fn is_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && k.len() <= 256
}

fn check_envs(envs: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let bad = envs.len() > 256
        || envs
            .iter()
            .any(|(k, v)| !is_env_name(k) || v.contains('\0') || v.chars().count() > 16384);
    if bad {
        return Err(ApiError::invalid(
            "envs: at most 256 variables; names of letters, digits and `_` (not first a \
             digit), values without NUL of up to 16384 characters",
        ));
    }
    Ok(())
}

/// A sandbox (or a session, seen as one).
#[derive(Debug, Serialize, ToSchema)]
pub struct Sandbox {
    /// Its id (`sbx_…`; a session's is `ses_…`), for the `/v1/sandboxes/{id}` paths.
    pub id: String,
    /// Its pool (template).
    pub pool: String,
    /// The language of its default context.
    #[schema(value_type = Language)]
    pub language: String,
    /// `sandbox`, or `session` for one made by `/v1/sessions` or the ACA API (which ends
    /// when idle rather than at a fixed time).
    #[schema(example = "sandbox")]
    pub kind: String,
    /// The caller's name for it: a session's identifier (ACA, `/v1/sessions`, MCP); a
    /// sandbox's is its id.
    pub identifier: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it will be destroyed as things stand (RFC 3339; a session's moves with use).
    pub end_at: String,
    /// Its metadata.
    pub metadata: BTreeMap<String, String>,
    /// The names of its variables.
    pub env_names: Vec<String>,
    /// `running`, `paused` (frozen, its memory kept) or `hibernated` (on disk, nothing of
    /// it runs). Any call that names a paused or hibernated sandbox runs it again.
    #[schema(value_type = SandboxState)]
    pub state: String,
    /// Its memory limit, in bytes.
    pub memory_bytes: u64,
    /// Its CPU limit, in cores.
    pub cpus: f64,
    /// Whether its files live on disk: it can hibernate, and it outlives a restart of the
    /// server (which lists it as hibernated).
    pub durable: bool,
    /// `kept`, or `lost` once it was hibernated without its memory: its contexts then
    /// started afresh (no variable, no running process survived); its files are intact. A
    /// sandbox of the gVisor tier without network is hibernated with its memory (a
    /// checkpoint) and says `kept` while hibernated and after.
    #[schema(value_type = SessionState)]
    pub session_state: String,
    /// Its lifecycle policy (the pool's, with the sandbox's own fields over it).
    pub lifecycle: Lifecycle,
}

/// A sandbox's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Its processes run.
    Running,
    /// Frozen, its memory kept.
    Paused,
    /// On disk, nothing of it running.
    Hibernated,
}

/// Whether a sandbox's memory (its contexts' variables, its processes) is still there.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Everything is as it was.
    Kept,
    /// It was hibernated: its contexts started afresh, its processes are gone, its files
    /// are intact.
    Lost,
}

impl From<&SandboxInfo> for Sandbox {
    fn from(s: &SandboxInfo) -> Self {
        Self {
            id: s.id.clone(),
            pool: s.pool.clone(),
            language: s.language.as_str().to_owned(),
            kind: if s.is_sandbox { "sandbox" } else { "session" }.into(),
            identifier: s.identifier.clone(),
            created_at: files::rfc3339(s.created_at),
            end_at: files::rfc3339(s.end_at),
            metadata: s.metadata.clone(),
            env_names: s.env_names.clone(),
            state: s.state.to_owned(),
            memory_bytes: s.memory_bytes,
            cpus: s.cpus,
            durable: s.durable,
            session_state: s.session_state.to_owned(),
            lifecycle: Lifecycle::from(&s.lifecycle),
        }
    }
}

/// A new sandbox and its tokens (answered only here: keep them).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedSandbox {
    /// The sandbox.
    #[serde(flatten)]
    pub sandbox: Sandbox,
    /// Grants the sandbox's own API (the E2B data plane) without an API key.
    pub access_token: String,
    /// Grants the sandbox's ports (`X-Access-Token` on `…/ports/{port}/…`).
    pub traffic_token: String,
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxList {
    /// The caller's sandboxes and sessions, oldest first.
    pub sandboxes: Vec<Sandbox>,
}

/// `POST /v1/sandboxes/{id}/timeout`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds from now until the sandbox is destroyed (never beyond its pool's lifetime).
    #[schema(minimum = 1, maximum = 2_147_483_647)]
    #[serde(deserialize_with = "whole_seconds")]
    pub timeout_s: u64,
}

/// A count of seconds: a JSON integer, which JSON may also write `612.0`.
fn whole_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = f64::deserialize(d)?;
    if n.fract() != 0.0 || !(0.0..=u64::MAX as f64).contains(&n) {
        return Err(serde::de::Error::custom(
            "expected a whole, non-negative number of seconds",
        ));
    }
    Ok(n as u64)
}

fn whole_seconds_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<f64>::deserialize(d)? {
        None => Ok(None),
        Some(n) => whole_seconds(serde::de::value::F64Deserializer::<D::Error>::new(n)).map(Some),
    }
}

/// `POST /v1/sandboxes/{id}/contexts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateContext {
    /// Its language (default: the sandbox's).
    #[schema(value_type = Option<Language>)]
    pub language: Option<String>,
    /// Its working directory: absolute, no `..` segment, no control character (default
    /// `/mnt/data`).
    #[schema(
        max_length = 1024,
        pattern = r"^/(?:[^/\x00-\x1f\x7f-\x9f.][^/\x00-\x1f\x7f-\x9f]*|\.[^/\x00-\x1f\x7f-\x9f.][^/\x00-\x1f\x7f-\x9f]*|\.\.[^/\x00-\x1f\x7f-\x9f]+|\.|/)*$"
    )]
    pub cwd: Option<String>,
}

/// Checks a working directory as its schema says.
fn check_cwd(cwd: &str) -> Result<(), ApiError> {
    let ok = cwd.starts_with('/')
        && cwd.chars().count() <= 1024
        && !cwd.split('/').any(|c| c == "..")
        && !cwd.chars().any(char::is_control);
    if !ok {
        return Err(ApiError::invalid(format!(
            "the working directory must be an absolute path of up to 1024 characters without \
             `..` or control characters: {cwd:?}"
        )));
    }
    Ok(())
}

/// A context: an interpreter of its own in the sandbox, sharing its files.
#[derive(Debug, Serialize, ToSchema)]
pub struct Context {
    /// Its id (`default` for the sandbox's own interpreter, else `ctx_…`).
    pub id: String,
    /// Its language.
    #[schema(value_type = Language)]
    pub language: String,
    /// Its working directory.
    pub cwd: String,
}

impl From<&ContextInfo> for Context {
    fn from(c: &ContextInfo) -> Self {
        Self {
            id: c.id.clone(),
            language: c.language.as_str().to_owned(),
            cwd: c.cwd.clone(),
        }
    }
}

/// `GET /v1/sandboxes/{id}/contexts`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContextList {
    /// The sandbox's contexts, `default` first.
    pub contexts: Vec<Context>,
}

/// `POST /v1/sandboxes/{id}/executions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxExecute {
    /// The code.
    pub code: String,
    /// The language: another than the sandbox's runs in that language's own context, opened
    /// on first use. Not with `context`.
    #[schema(value_type = Option<Language>)]
    pub language: Option<String>,
    /// The context to run in (`default`: the sandbox's interpreter). Not with `language`.
    pub context: Option<String>,
    /// Wall-clock limit in seconds (default: the pool's; at most the pool's maximum).
    #[schema(exclusive_minimum = 0.0)]
    pub timeout_s: Option<f64>,
    /// A JSON object available to the code as `inputs`.
    #[schema(value_type = Option<Object>)]
    pub inputs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Why the caller does this (`prompt`, `run_id`, `agent`, `step`, …): a JSON object of
    /// at most 4 KiB kept in the audit records it causes, as `context` on `/v1/sessions`
    /// (named so here because `context` names the language context to run in).
    #[schema(value_type = Option<Object>)]
    pub caller_context: Option<serde_json::Map<String, serde_json::Value>>,
}

impl SandboxExecute {
    fn command(self, id: String) -> ExecuteCommand {
        ExecuteCommand {
            target: Target::Id(id),
            code: self.code,
            language: self.language,
            timeout_s: self.timeout_s,
            inputs: self.inputs,
            context: self.context,
        }
    }
}

/// `POST /v1/sandboxes/{id}/processes`: `cmd` or `argv`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProcessRequest {
    /// A command line for `bash -l -c`. Give this or `argv`.
    #[schema(
        min_length = 1,
        max_length = 32768,
        pattern = r"^[^\x00]*$",
        example = "echo hello"
    )]
    pub cmd: Option<String>,
    /// The program and its arguments. Give this or `cmd`; with `cmd`, the command's
    /// positional parameters (`$0`, `$1`, …); with neither, a login shell reading stdin.
    #[schema(min_items = 1, max_items = 256, inline, value_type = Option<Vec<ArgvItem>>)]
    pub argv: Option<Vec<String>>,
    /// Variables over the sandbox's.
    #[schema(schema_with = envs_schema)]
    pub envs: Option<BTreeMap<String, String>>,
    /// Its working directory (default `/mnt/data`).
    #[schema(
        max_length = 1024,
        pattern = r"^/(?:[^/\x00-\x1f\x7f-\x9f.][^/\x00-\x1f\x7f-\x9f]*|\.[^/\x00-\x1f\x7f-\x9f.][^/\x00-\x1f\x7f-\x9f]*|\.\.[^/\x00-\x1f\x7f-\x9f]+|\.|/)*$"
    )]
    pub cwd: Option<String>,
    /// Whether it reads stdin (`…/stdin`; else it reads nothing).
    pub stdin: Option<bool>,
    /// A name to find it by in place of its pid.
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub tag: Option<String>,
    /// Seconds after which it is killed (default: 60 for a streamed or awaited process; a
    /// background one runs until it ends or the sandbox does).
    #[schema(exclusive_minimum = 0.0, maximum = 31_536_000.0)]
    pub timeout_s: Option<f64>,
    /// Answer 201 with the process at once, and let it run (re-attach with
    /// `…/processes/{pid}/stream`). `wait` overrides it.
    pub background: Option<bool>,
    /// Answer once it has ended, with its whole output as one `ProcessResult` instead of a
    /// stream. Overrides `background`.
    pub wait: Option<bool>,
}

/// The default `timeout_s` of a process that is not in the background.
const FOREGROUND_TIMEOUT_S: f64 = 60.0;

/// One argument: no NUL, up to 4096 characters.
pub struct ArgvItem;

impl utoipa::PartialSchema for ArgvItem {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(0, 4096, Some(NO_NUL)).into()
    }
}

impl ToSchema for ArgvItem {}

impl StartProcessRequest {
    fn command(self) -> Result<(StartProcess, bool, bool), ApiError> {
        let command = match (self.cmd, self.argv) {
            (Some(cmd), None) => {
                if cmd.is_empty() || cmd.chars().count() > 32768 || cmd.contains('\0') {
                    return Err(ApiError::invalid("`cmd` is 1-32768 characters without NUL"));
                }
                Command::Shell(cmd)
            }
            (None, Some(argv)) => {
                let bad = argv.is_empty()
                    || argv.len() > 256
                    || argv
                        .iter()
                        .any(|a| a.contains('\0') || a.chars().count() > 4096);
                if bad {
                    return Err(ApiError::invalid(
                        "`argv` is 1-256 arguments of up to 4096 characters without NUL",
                    ));
                }
                Command::Argv(argv)
            }
            // Both: `argv` are the command's positional parameters (`$0`, `$1`, …), as with
            // `bash -c CMD ARG0 ARG1…`.
            (Some(cmd), Some(argv)) => {
                let bad = cmd.is_empty()
                    || cmd.chars().count() > 32768
                    || cmd.contains('\0')
                    || argv.is_empty()
                    || argv.len() > 256
                    || argv
                        .iter()
                        .any(|a| a.contains('\0') || a.chars().count() > 4096);
                if bad {
                    return Err(ApiError::invalid(
                        "`cmd` is 1-32768 characters and `argv` 1-256 arguments of up to 4096, \
                         without NUL",
                    ));
                }
                let mut line = vec!["/bin/bash".into(), "-l".into(), "-c".into(), cmd];
                line.extend(argv);
                Command::Argv(line)
            }
            // Neither: a login shell, which reads its commands from stdin (as a terminal's).
            (None, None) => Command::Argv(vec!["/bin/bash".into(), "-l".into()]),
        };
        let envs = self.envs.unwrap_or_default();
        check_envs(&envs)?;
        if let Some(cwd) = &self.cwd {
            check_cwd(cwd)?;
        }
        if let Some(tag) = &self.tag {
            let n = tag.chars().count();
            if n == 0 || n > 256 || tag.chars().any(char::is_control) {
                return Err(ApiError::invalid(
                    "`tag` is 1-256 characters without control characters",
                ));
            }
        }
        if let Some(t) = self.timeout_s
            && !(t > 0.0 && t <= MAX_PROCESS_TIMEOUT_S)
        {
            return Err(ApiError::invalid(
                "`timeout_s` is above 0 and at most 31536000",
            ));
        }
        let (background, wait) = (self.background.unwrap_or(false), self.wait.unwrap_or(false));
        // With both, `wait` wins: the answer comes once it has ended.
        let background = background && !wait;
        let cmd = StartProcess {
            command,
            envs,
            cwd: self.cwd,
            stdin: self.stdin.unwrap_or(false),
            tag: self.tag,
            // A process streamed to (or awaited by) the caller ends within a minute unless
            // asked otherwise, as E2B's `commands.run`; a background one runs until it ends.
            timeout_s: self
                .timeout_s
                .or((!background).then_some(FOREGROUND_TIMEOUT_S)),
        };
        Ok((cmd, background, wait))
    }
}

/// A process.
#[derive(Debug, Serialize, ToSchema)]
pub struct Process {
    /// Its pid in the sandbox.
    pub pid: u32,
    /// Its tag.
    pub tag: Option<String>,
    /// What runs (a `cmd` is `["/bin/bash", "-l", "-c", CMD]`).
    pub argv: Vec<String>,
    /// The variables its request added.
    pub envs: BTreeMap<String, String>,
    /// Its working directory.
    pub cwd: String,
    /// When it started (RFC 3339).
    pub started_at: String,
}

impl From<&ProcessInfo> for Process {
    fn from(p: &ProcessInfo) -> Self {
        Self {
            pid: p.pid,
            tag: p.tag.clone(),
            argv: p.argv.clone(),
            envs: p.envs.clone(),
            cwd: p.cwd.clone(),
            started_at: files::rfc3339(p.started_at),
        }
    }
}

/// `GET /v1/sandboxes/{id}/processes`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessList {
    /// The processes running now.
    pub processes: Vec<Process>,
}

/// One line (or SSE event) of a process's stream: `start`, then `stdout`/`stderr`, then
/// `end` (or `error` when the reader fell too far behind and was let go).
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProcessStreamEvent {
    /// The process (first line).
    Start {
        /// Its pid.
        pid: u32,
        /// Its tag.
        tag: Option<String>,
    },
    /// Bytes it wrote to stdout.
    Stdout {
        /// The bytes, base64.
        #[schema(format = Byte)]
        data: String,
    },
    /// Bytes it wrote to stderr.
    Stderr {
        /// The bytes, base64.
        #[schema(format = Byte)]
        data: String,
    },
    /// It ended (last line).
    End(ProcessEndBody),
    /// The stream broke off before the end (last line).
    Error {
        /// Why.
        error: ErrorDetail,
    },
}

/// How a process ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessEndBody {
    /// Its exit status (`-1` when a signal ended it).
    pub exit_code: i32,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// `exit status N` or `signal: killed` (E2B's wording).
    pub status: String,
    /// Whether its `timeout_s` killed it.
    pub timed_out: bool,
}

impl From<ProcessEnd> for ProcessEndBody {
    fn from(e: ProcessEnd) -> Self {
        Self {
            exit_code: e.exit_code,
            signal: e.signal,
            status: e.status(),
            timed_out: e.timed_out,
        }
    }
}

/// A process's whole run (`wait`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessResult {
    /// The process.
    #[serde(flatten)]
    pub process: Process,
    /// Its stdout (UTF-8, invalid bytes replaced; the first MiB).
    pub stdout: String,
    /// Its stderr (likewise).
    pub stderr: String,
    /// Whether stdout was cut at a MiB.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at a MiB.
    pub stderr_truncated: bool,
    /// How it ended.
    #[serde(flatten)]
    pub end: ProcessEndBody,
}

/// `POST …/processes/{pid}/stdin`: `data` (base64) or `text`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StdinBody {
    /// Bytes.
    Data(StdinData),
    /// Text (written as UTF-8).
    Text(StdinText),
}

/// Bytes for stdin.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinData {
    /// The bytes, base64.
    #[schema(format = Byte)]
    pub data: String,
}

/// Text for stdin.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinText {
    /// The text.
    pub text: String,
}

/// `POST …/processes/{pid}/signal`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// A signal number (1-64) or name (`SIGKILL` or `KILL`, …).
    pub signal: SignalValue,
}

/// A signal, by number (1-64) or by name (`SIGKILL` or `KILL`, …).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SignalValue {
    /// Its number (JSON may write it `9.0`).
    Number(f64),
    /// Its name, with or without `SIG`.
    Name(SignalName),
}

impl utoipa::PartialSchema for SignalValue {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let number = utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Integer)
            .minimum(Some(1))
            .maximum(Some(64));
        utoipa::openapi::OneOfBuilder::new()
            .item(number)
            .item(SignalName::schema())
            .into()
    }
}

impl ToSchema for SignalValue {}

/// The signals known by name (Linux numbering).
const SIGNALS: [(&str, i32); 31] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// A signal's name: `SIGKILL` or `KILL`, and so on.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct SignalName(String);

impl utoipa::PartialSchema for SignalName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let names = SIGNALS
            .iter()
            .flat_map(|(n, _)| [format!("SIG{n}"), (*n).to_owned()]);
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(names))
            .into()
    }
}

impl ToSchema for SignalName {}

impl SignalValue {
    fn number(&self) -> Result<i32, ApiError> {
        match self {
            SignalValue::Number(n) if n.fract() == 0.0 && (1.0..=64.0).contains(n) => Ok(*n as i32),
            SignalValue::Number(_) => Err(ApiError::invalid("a signal number is 1-64")),
            SignalValue::Name(SignalName(name)) => {
                let bare = name.strip_prefix("SIG").unwrap_or(name);
                SIGNALS
                    .iter()
                    .find(|(n, _)| *n == bare)
                    .map(|(_, s)| *s)
                    .ok_or_else(|| ApiError::invalid(format!("no signal named {name:?}")))
            }
        }
    }
}

/// A process path segment: its pid, or else its tag.
fn selector(pid: String) -> ProcessSelector {
    match pid.parse::<u32>() {
        Ok(n) => ProcessSelector::Pid(n),
        Err(_) => ProcessSelector::Tag(pid),
    }
}

// ---- sandboxes ----

/// Creates a sandbox: answers it and its tokens (the only time they are answered).
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes",
    request_body = Option<CreateSandbox>,
    responses((status = 201, description = "created", body = CreatedSandbox),
        (status = 400, description = "a body that is not JSON, an unknown field, a value of \
            the wrong type or out of bounds (`invalid_request`)", body = ErrorBody),
        (status = 403, description = "the tenant may not use this pool or its language \
            (`pool_not_allowed`, `language_not_allowed`)", body = ErrorBody),
        (status = 404, description = "no such pool (`pool_not_found`)", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 429, description = "the pool or the tenant is full (`pool_full`, \
            `tenant_full`)", body = ErrorBody),
        (status = 501, description = "a durable sandbox on a server without a data directory, \
            or whose engine cannot keep one (`not_supported`)", body = ErrorBody),
        (status = 503, description = "no sandbox could be started, or the server is shutting \
            down (`sandbox_unavailable`, `shutting_down`)", body = ErrorBody),
        (status = 507, description = "a durable sandbox's disk would take the tenant past its \
            `durable_disk_mib` (`disk_quota_exceeded`)", body = ErrorBody)))]
async fn create_sandbox(
    State(state): State<AppState>,
    Caller(caller): Caller,
    JsonBody(req): JsonBody<CreateSandbox>,
) -> Result<(StatusCode, axum::Json<CreatedSandbox>), ApiError> {
    let caller = caller.with_context(req.caller_context.clone())?;
    let metadata = req.metadata.unwrap_or_default();
    let envs = req.envs.unwrap_or_default();
    check_metadata(&metadata)?;
    check_envs(&envs)?;
    if req.timeout_s.is_some_and(|t| t == 0 || t > MAX_TIMEOUT_S) {
        return Err(ApiError::invalid("`timeout_s` is 1-2147483647"));
    }
    let lifecycle = match &req.lifecycle {
        Some(l) => l.to_core()?,
        None => Default::default(),
    };
    let cmd = CoreCreateSandbox {
        pool: req.pool,
        timeout_s: req.timeout_s,
        metadata,
        envs,
        lifecycle,
    };
    let (info, tokens) = state.manager.create_sandbox(&caller, cmd).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedSandbox {
            sandbox: Sandbox::from(&info),
            access_token: tokens.access,
            traffic_token: tokens.traffic,
        }),
    ))
}

/// The caller's sandboxes (and sessions), oldest first; `metadata.K=V` (or `metadata[K]=V`)
/// keeps those whose metadata has every such pair.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    params(("metadata" = Option<String>, Query,
            description = "pairs the metadata must have, E2B's form: `K1=V1&K2=V2`, URL-encoded \
            as one value (`metadata.K=V` and `metadata[K]=V` are accepted too); a pair \
            without `=` asks for an empty value"),
        ("state" = Option<SandboxState>, Query, description = "only sandboxes in this state")),
    responses((status = 200, body = SandboxList),
        (status = 400, description = "an unknown query parameter or state \
            (`invalid_request`)", body = ErrorBody)))]
async fn list_sandboxes(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(q): QueryParams<Vec<(String, String)>>,
) -> Result<axum::Json<SandboxList>, ApiError> {
    let mut filter = BTreeMap::new();
    let mut wanted_state = None;
    for (k, v) in q {
        let key = k
            .strip_prefix("metadata.")
            .or_else(|| {
                k.strip_prefix("metadata[")
                    .and_then(|k| k.strip_suffix(']'))
            })
            .map(str::to_owned);
        if k == "metadata" {
            for pair in v.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                filter.insert(key.to_owned(), value.to_owned());
            }
            continue;
        }
        match key {
            // A deepObject key names one level: `metadata[a][b]` would be a nested object,
            // which metadata never holds.
            Some(key) if key.contains(['[', ']']) => {
                return Err(ApiError::invalid(format!(
                    "metadata filters are flat: `metadata[KEY]=VALUE`, not {k:?}"
                )));
            }
            Some(key) => {
                filter.insert(key, v);
            }
            None if k == "state" => {
                let st = ampoule_core::lifecycle::State::parse(&v).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "`state` is `running`, `paused` or `hibernated`, not {v:?}"
                    ))
                })?;
                wanted_state = Some(st);
            }
            None => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {k:?} (filter with `metadata.KEY=VALUE` or `state`)"
                )));
            }
        }
    }
    let sandboxes = state
        .manager
        .list_sandboxes(&caller, &filter, wanted_state)
        .iter()
        .map(Sandbox::from)
        .collect();
    Ok(axum::Json(SandboxList { sandboxes }))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, body = Sandbox),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody)))]
async fn get_sandbox(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    let s = state.manager.get_sandbox(&caller, &id)?;
    Ok(axum::Json(Sandbox::from(&s)))
}

/// Destroys a sandbox and everything in it (contexts, processes, files).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    responses((status = 204, description = "destroyed"),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody)))]
async fn kill_sandbox(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    state.manager.kill_sandbox(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets the sandbox to be destroyed `timeout_s` from now (a session becomes timed like a
/// sandbox).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = SetTimeout,
    responses((status = 200, body = Sandbox),
        (status = 400, description = "a missing or out-of-bounds `timeout_s` \
            (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody)))]
async fn set_timeout(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
    JsonBody(req): JsonBody<SetTimeout>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    if req.timeout_s == 0 || req.timeout_s > MAX_TIMEOUT_S {
        return Err(ApiError::invalid("`timeout_s` is 1-2147483647"));
    }
    let s = state
        .manager
        .set_sandbox_timeout(&caller, &id, req.timeout_s)
        .await?;
    Ok(axum::Json(Sandbox::from(&s)))
}

/// `POST /v1/sandboxes/{id}/resume`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// Seconds from now until the sandbox is destroyed (default: what was left of its
    /// timeout when it stopped; never beyond its pool's lifetime).
    #[schema(minimum = 1, maximum = 2_147_483_647)]
    #[serde(default, deserialize_with = "whole_seconds_opt")]
    pub timeout_s: Option<u64>,
}

/// Freezes a sandbox: its processes stop where they are, its memory is kept, its timeout
/// stops running. Any call that names it (or `…/resume`) thaws it. A paused or hibernated
/// sandbox is answered as it is.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, description = "paused", body = Sandbox),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody),
        (status = 409, description = "an execution is running in it (`conflict`)",
            body = ErrorBody),
        (status = 501, description = "its engine cannot freeze it (`not_supported`)",
            body = ErrorBody)))]
async fn pause(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    let s = state.manager.pause_sandbox(&caller, &id).await?;
    Ok(axum::Json(Sandbox::from(&s)))
}

/// Runs a paused or hibernated sandbox again (a running one is answered as it is). A
/// hibernated one comes back with its files; with its memory too (`session_state: "kept"`)
/// when it was hibernated with it (the gVisor tier without network), else with
/// `session_state: "lost"`, as also when restoring its memory failed. With `timeout_s`, it is
/// then destroyed that long from now.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = Option<Resume>,
    responses((status = 200, description = "running", body = Sandbox),
        (status = 400, description = "an out-of-bounds `timeout_s`, or a body that is not \
            JSON (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 429, description = "a hibernated sandbox cannot come back while its pool or \
            tenant is full (`pool_full`, `tenant_full`)", body = ErrorBody),
        (status = 503, description = "a hibernated sandbox could not be started again, or the \
            server is shutting down (`sandbox_unavailable`, `shutting_down`)",
            body = ErrorBody),
        (status = 501, description = "its engine cannot thaw it (`not_supported`)",
            body = ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
    JsonBody(req): JsonBody<Resume>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    if req.timeout_s.is_some_and(|t| t == 0 || t > MAX_TIMEOUT_S) {
        return Err(ApiError::invalid("`timeout_s` is 1-2147483647"));
    }
    let s = state
        .manager
        .resume_sandbox(&caller, &id, req.timeout_s)
        .await?;
    Ok(axum::Json(Sandbox::from(&s)))
}

/// Hibernates a durable sandbox now: nothing of it runs any more, its files stay on its
/// disk. Its memory is kept (a checkpoint under the server's data directory) only on the
/// gVisor tier without network: the answer's `session_state` says `kept`; elsewhere, or when
/// the checkpoint failed, it says `lost` and the sandbox comes back with its files only. A
/// hibernated sandbox is answered as it is.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/hibernate", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, description = "hibernated", body = Sandbox),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody),
        (status = 409, description = "it is not durable, or an execution is running in it \
            (`conflict`)", body = ErrorBody)))]
async fn hibernate(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    let s = state.manager.hibernate_sandbox(&caller, &id).await?;
    Ok(axum::Json(Sandbox::from(&s)))
}

// ---- contexts ----

/// Opens a context: an interpreter of its own (state apart) over the sandbox's files.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/contexts", tag = "contexts",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = Option<CreateContext>,
    responses((status = 201, body = Context),
        (status = 400, description = "an unknown language, a bad working directory, a body \
            that is not JSON, or the sandbox's 16 contexts are open (`invalid_request`)",
            body = ErrorBody),
        (status = 403, description = "the tenant may not use this language \
            (`language_not_allowed`)", body = ErrorBody),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody),
        (status = 409, description = "this host has no runtime for the language \
            (`language_mismatch`)", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 501, description = "the sandbox's engine cannot open contexts of this \
            language (`not_supported`)", body = ErrorBody),
        (status = 503, description = "the interpreter could not start \
            (`sandbox_unavailable`)", body = ErrorBody)))]
async fn create_context(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
    JsonBody(req): JsonBody<CreateContext>,
) -> Result<(StatusCode, axum::Json<Context>), ApiError> {
    if let Some(cwd) = &req.cwd {
        check_cwd(cwd)?;
    }
    let cmd = CoreCreateContext {
        language: req.language,
        cwd: req.cwd,
    };
    let c = state.manager.create_context(&caller, &id, cmd).await?;
    Ok((StatusCode::CREATED, axum::Json(Context::from(&c))))
}

/// The sandbox's contexts, its own interpreter (`default`) first.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/contexts", tag = "contexts",
    params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, body = ContextList),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody)))]
async fn list_contexts(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
) -> Result<axum::Json<ContextList>, ApiError> {
    let contexts = state
        .manager
        .list_contexts(&caller, &id)
        .await?
        .iter()
        .map(Context::from)
        .collect();
    Ok(axum::Json(ContextList { contexts }))
}

/// One context.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/contexts/{cid}", tag = "contexts",
    params(("id" = String, Path, description = "sandbox id"),
        ("cid" = String, Path, description = "context id")),
    responses((status = 200, body = Context),
        (status = 404, description = "no such sandbox or context (`session_not_found`, \
            `context_not_found`)", body = ErrorBody)))]
async fn get_context(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams((id, cid)): PathParams<(String, String)>,
) -> Result<axum::Json<Context>, ApiError> {
    let c = state.manager.get_context(&caller, &id, &cid).await?;
    Ok(axum::Json(Context::from(&c)))
}

/// Closes a context (not `default`: delete the sandbox for that).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/contexts/{cid}", tag = "contexts",
    params(("id" = String, Path, description = "sandbox id"),
        ("cid" = String, Path, description = "context id")),
    responses((status = 204, description = "closed"),
        (status = 400, description = "`default`, the sandbox's own interpreter \
            (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "no such sandbox or context (`session_not_found`, \
            `context_not_found`)", body = ErrorBody)))]
async fn delete_context(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams((id, cid)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.manager.delete_context(&caller, &id, &cid).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces a context's interpreter with a fresh one (its state is lost).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/contexts/{cid}/restart", tag = "contexts",
    params(("id" = String, Path, description = "sandbox id"),
        ("cid" = String, Path, description = "context id")),
    responses((status = 200, body = Context),
        (status = 404, description = "no such sandbox or context (`session_not_found`, \
            `context_not_found`)", body = ErrorBody),
        (status = 501, description = "`default`, the sandbox's own interpreter, cannot be \
            restarted (`not_supported`)", body = ErrorBody),
        (status = 503, description = "the interpreter could not start \
            (`sandbox_unavailable`)", body = ErrorBody)))]
async fn restart_context(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams((id, cid)): PathParams<(String, String)>,
) -> Result<axum::Json<Context>, ApiError> {
    let c = state.manager.restart_context(&caller, &id, &cid).await?;
    Ok(axum::Json(Context::from(&c)))
}

// ---- executions ----

/// Runs code in a context of the sandbox and returns the result when it is over.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/executions", tag = "executions",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = SandboxExecute,
    responses((status = 200, body = Execution),
        (status = 400, description = "a body that is not JSON, a missing `code`, an unknown \
            field or language, both `language` and `context`, a value of the wrong type or \
            out of bounds (`invalid_request`)", body = ErrorBody),
        (status = 403, description = "the timeout is above the tenant's maximum, or the tenant \
            may not use the pool or language (`timeout_not_allowed`, `pool_not_allowed`, \
            `language_not_allowed`)", body = ErrorBody),
        (status = 404, description = "no such sandbox or context (`session_not_found`, \
            `context_not_found`)", body = ErrorBody),
        (status = 409, description = "a session (not a sandbox) asked for another language \
            (`language_mismatch`)", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 429, description = "the tenant's executions per minute are used up \
            (`rate_limited`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds until an execution may start"))),
        (status = 501, description = "the engine cannot open a context of this language \
            (`not_supported`)", body = ErrorBody),
        (status = 503, description = "the interpreter stopped answering \
            (`sandbox_unavailable`)", body = ErrorBody)))]
async fn execute(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
    JsonBody(mut req): JsonBody<SandboxExecute>,
) -> Result<axum::Json<Execution>, ApiError> {
    let caller = caller.with_context(req.caller_context.take())?;
    let done = state.manager.execute(&caller, req.command(id)).await?;
    Ok(axum::Json(Execution {
        execution_id: done.execution_id,
        result: done.result,
    }))
}

/// Runs code and streams its output as `/v1/sessions/{id}/executions/stream` does.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/executions/stream", tag = "executions",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = SandboxExecute,
    responses(
        (status = 200, description = "NDJSON lines or SSE events: StreamEvent..., then StreamEnd",
            content((StreamEnd = "application/x-ndjson"), (String = "text/event-stream"))),
        (status = 400, description = "a body that is not JSON, a missing `code`, an unknown \
            field or language, both `language` and `context`, a value of the wrong type or \
            out of bounds (`invalid_request`)", body = ErrorBody),
        (status = 403, description = "the timeout is above the tenant's maximum, or the tenant \
            may not use the pool or language (`timeout_not_allowed`, `pool_not_allowed`, \
            `language_not_allowed`)", body = ErrorBody),
        (status = 404, description = "no such sandbox or context (`session_not_found`, \
            `context_not_found`)", body = ErrorBody),
        (status = 409, description = "a session (not a sandbox) asked for another language \
            (`language_mismatch`)", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 429, description = "the tenant's executions per minute are used up \
            (`rate_limited`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds until an execution may start"))),
        (status = 501, description = "the engine cannot open a context of this language \
            (`not_supported`)", body = ErrorBody),
        (status = 503, description = "the interpreter stopped answering \
            (`sandbox_unavailable`)", body = ErrorBody)))]
async fn execute_stream(
    State(state): State<AppState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    PathParams(id): PathParams<String>,
    JsonBody(mut req): JsonBody<SandboxExecute>,
) -> Result<Response, ApiError> {
    let caller = caller.with_context(req.caller_context.take())?;
    let run = state
        .manager
        .execute_streaming(&caller, req.command(id))
        .await?;
    Ok(stream_execution(run, wants_sse(&headers)))
}

// ---- processes ----

/// A process's events as NDJSON lines or SSE events: `start`, output, `end`.
fn stream_process(p: ProcessStream, sse: bool) -> Response {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let start = ProcessStreamEvent::Start {
        pid: p.info.pid,
        tag: p.info.tag.clone(),
    };
    enum St {
        Start(
            ProcessStreamEvent,
            tokio::sync::mpsc::Receiver<ProcessEvent>,
        ),
        Events(tokio::sync::mpsc::Receiver<ProcessEvent>),
        Done,
    }
    let render = move |ev: &ProcessStreamEvent| {
        let kind = match ev {
            ProcessStreamEvent::Start { .. } => "start",
            ProcessStreamEvent::Stdout { .. } => "stdout",
            ProcessStreamEvent::Stderr { .. } => "stderr",
            ProcessStreamEvent::End(_) => "end",
            ProcessStreamEvent::Error { .. } => "error",
        };
        let json = serde_json::to_string(ev).unwrap_or_default();
        Ok::<_, std::convert::Infallible>(frame(sse, kind, json))
    };
    let stream = futures_util::stream::unfold(St::Start(start, p.events), move |st| async move {
        match st {
            St::Start(ev, rx) => Some((render(&ev), St::Events(rx))),
            St::Events(mut rx) => {
                let (ev, next) = match rx.recv().await {
                    Some(ProcessEvent::Stdout(b)) => {
                        (ProcessStreamEvent::Stdout { data: b64(&b) }, St::Events(rx))
                    }
                    Some(ProcessEvent::Stderr(b)) => {
                        (ProcessStreamEvent::Stderr { data: b64(&b) }, St::Events(rx))
                    }
                    Some(ProcessEvent::End(end)) => (ProcessStreamEvent::End(end.into()), St::Done),
                    None => (
                        ProcessStreamEvent::Error {
                            error: ErrorDetail {
                                code: ErrorCode::Internal.as_str().to_owned(),
                                message: "the stream fell too far behind the process and was \
                                          let go; re-attach to follow it"
                                    .into(),
                            },
                        },
                        St::Done,
                    ),
                };
                Some((render(&ev), next))
            }
            St::Done => None,
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    streaming_headers(&mut resp, sse);
    resp
}

/// Collects a process's whole run.
async fn wait_process(mut p: ProcessStream) -> ProcessResult {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_cut, mut err_cut) = (false, false);
    let keep = |buf: &mut Vec<u8>, cut: &mut bool, b: &[u8]| {
        let room = WAIT_KEEP.saturating_sub(buf.len());
        *cut |= b.len() > room;
        buf.extend_from_slice(&b[..b.len().min(room)]);
    };
    let mut end = None;
    while let Some(ev) = p.events.recv().await {
        match ev {
            ProcessEvent::Stdout(b) => keep(&mut out, &mut out_cut, &b),
            ProcessEvent::Stderr(b) => keep(&mut err, &mut err_cut, &b),
            ProcessEvent::End(e) => {
                end = Some(e);
                break;
            }
        }
    }
    let end = end.unwrap_or(ProcessEnd {
        exit_code: -1,
        signal: None,
        timed_out: false,
    });
    ProcessResult {
        process: Process::from(&p.info),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        stdout_truncated: out_cut,
        stderr_truncated: err_cut,
        end: end.into(),
    }
}

/// Starts a process in the sandbox. By default the answer is its stream (NDJSON, or SSE
/// with `Accept: text/event-stream`): a `start` line with its pid, its output as `stdout`
/// and `stderr` lines (base64), an `end` line with its exit. With `background` the answer is
/// the process at once (201); with `wait`, its whole run once it has ended.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes", tag = "processes",
    params(("id" = String, Path, description = "sandbox id")),
    request_body(content = Option<StartProcessRequest>, description = "none: a login shell \
        with no stdin, as `{}`"),
    responses(
        (status = 200, description = "the stream (ProcessStreamEvent lines), or with `wait` \
            its whole run", content((ProcessStreamEvent = "application/x-ndjson"),
            (String = "text/event-stream"), (ProcessResult = "application/json"))),
        (status = 201, description = "`background`: started", body = Process),
        (status = 400, description = "a bad `cmd` or `argv`, a bad working \
            directory, variable, tag or timeout, both `background` and `wait`, 64 processes \
            running already, a body that is not JSON (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 429, description = "the tenant's executions per minute are used up (a \
            process counts as one) (`rate_limited`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds until one may start"))),
        (status = 501, description = "the sandbox's engine cannot start processes \
            (`not_supported`)", body = ErrorBody),
        (status = 503, description = "the sandbox could not start it \
            (`sandbox_unavailable`)", body = ErrorBody)))]
async fn start_process(
    State(state): State<AppState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    PathParams(id): PathParams<String>,
    JsonBody(req): JsonBody<StartProcessRequest>,
) -> Result<Response, ApiError> {
    let (cmd, background, wait) = req.command()?;
    let p = state.manager.start_process(&caller, &id, cmd).await?;
    if background {
        let info = Process::from(&p.info);
        return Ok((StatusCode::CREATED, axum::Json(info)).into_response());
    }
    if wait {
        return Ok(axum::Json(wait_process(p).await).into_response());
    }
    Ok(stream_process(p, wants_sse(&headers)))
}

/// The processes running in the sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", tag = "processes",
    params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, body = ProcessList),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody)))]
async fn list_processes(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams(id): PathParams<String>,
) -> Result<axum::Json<ProcessList>, ApiError> {
    let processes = state
        .manager
        .list_processes(&caller, &id)
        .await?
        .iter()
        .map(Process::from)
        .collect();
    Ok(axum::Json(ProcessList { processes }))
}

/// Re-attaches to a running process: a `start` line, then its output from now on and its
/// `end`, as `POST …/processes` streams them.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}/stream", tag = "processes",
    params(("id" = String, Path, description = "sandbox id"),
        ("pid" = String, Path, description = "the process's pid, or its tag")),
    responses(
        (status = 200, description = "ProcessStreamEvent lines",
            content((ProcessStreamEvent = "application/x-ndjson"), (String = "text/event-stream"))),
        (status = 404, description = "no such sandbox, or no such process running \
            (`session_not_found`, `process_not_found`)", body = ErrorBody)))]
async fn attach_process(
    State(state): State<AppState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    PathParams((id, pid)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    let p = state
        .manager
        .attach_process(&caller, &id, &selector(pid))
        .await?;
    Ok(stream_process(p, wants_sse(&headers)))
}

/// Writes to a process's stdin (it was started with `stdin: true`).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin", tag = "processes",
    params(("id" = String, Path, description = "sandbox id"),
        ("pid" = String, Path, description = "the process's pid, or its tag")),
    request_body = StdinBody,
    responses((status = 204, description = "written"),
        (status = 400, description = "neither or both of `data` and `text`, `data` that is \
            not base64, or a process without stdin or that does not read it \
            (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such process running \
            (`session_not_found`, `process_not_found`)", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody)))]
async fn write_stdin(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams((id, pid)): PathParams<(String, String)>,
    JsonBody(req): JsonBody<StdinBody>,
) -> Result<StatusCode, ApiError> {
    let bytes = match req {
        StdinBody::Data(StdinData { data }) => base64::engine::general_purpose::STANDARD
            .decode(data.as_bytes())
            .map_err(|_| ApiError::invalid("`data` is not base64"))?,
        StdinBody::Text(StdinText { text }) => text.into_bytes(),
    };
    state
        .manager
        .write_stdin(&caller, &id, &selector(pid), &bytes)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Closes a process's stdin: it reads end-of-file.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin/close", tag = "processes",
    params(("id" = String, Path, description = "sandbox id"),
        ("pid" = String, Path, description = "the process's pid, or its tag")),
    responses((status = 204, description = "closed"),
        (status = 404, description = "no such sandbox, or no such process running \
            (`session_not_found`, `process_not_found`)", body = ErrorBody)))]
async fn close_stdin(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams((id, pid)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state
        .manager
        .close_stdin(&caller, &id, &selector(pid))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a signal to a process (`9` or `SIGKILL` kills it).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/signal", tag = "processes",
    params(("id" = String, Path, description = "sandbox id"),
        ("pid" = String, Path, description = "the process's pid, or its tag")),
    request_body = SignalBody,
    responses((status = 204, description = "sent"),
        (status = 400, description = "no such signal (`invalid_request`)", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such process running \
            (`session_not_found`, `process_not_found`)", body = ErrorBody),
        (status = 413, description = "the body is above the server's limit", body = ErrorBody),
        (status = 501, description = "the engine cannot send this signal (`not_supported`)",
            body = ErrorBody)))]
async fn signal_process(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PathParams((id, pid)): PathParams<(String, String)>,
    JsonBody(req): JsonBody<SignalBody>,
) -> Result<StatusCode, ApiError> {
    let signal = req.signal.number()?;
    state
        .manager
        .signal_process(&caller, &id, &selector(pid), signal)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- files: the session handlers under the sandbox's path ----

/// The regular files in the sandbox's `/mnt/data`, recursively.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "sandbox id"), DirQuery),
    responses((status = 200, body = FileList),
        (status = 400, description = "`path` is not a directory below /mnt/data, or an \
            unknown query parameter (`invalid_path`, `invalid_request`)", body = ErrorBody),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody)))]
async fn list_files(
    state: State<AppState>,
    caller: Caller,
    id: PathParams<String>,
    q: QueryParams<DirQuery>,
) -> Result<axum::Json<FileList>, ApiError> {
    super::list_files(state, caller, id, q).await
}

/// Uploads files as `multipart/form-data` (as `POST /v1/sessions/{id}/files`).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "sandbox id"), DirQuery),
    request_body(content_type = "multipart/form-data", content = UploadForm),
    responses((status = 201, body = FileList),
        (status = 400, description = "a malformed multipart body, one without a file part, a \
            file name or `path` that is not below /mnt/data (`invalid_request`, \
            `invalid_path`, `link_refused`)", body = ErrorBody),
        (status = 409, description = "a directory stands where the path needs a file, or a \
            file where it needs a directory (`not_a_file`)", body = ErrorBody),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody),
        (status = 413, description = "above the server's upload limit (`payload_too_large`)",
            body = ErrorBody),
        (status = 415, description = "not a multipart/form-data body \
            (`unsupported_media_type`)", body = ErrorBody),
        (status = 507, description = "the sandbox's disk is full (`no_space`)",
            body = ErrorBody)))]
async fn upload_files(
    state: State<AppState>,
    caller: Caller,
    id: PathParams<String>,
    q: QueryParams<DirQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, axum::Json<FileList>), ApiError> {
    super::upload_files(state, caller, id, q, headers, body).await
}

/// `…/files/{path}`: metadata, or the content when the path ends in `/content`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/{*path}", tag = "files",
    params(("id" = String, Path, description = "sandbox id"),
        ("path" = String, Path, pattern = r"^(?:/mnt/data/)?(?:\./+)*(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)(?:/+(?:\.|(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)))*/*$", description = "file path below /mnt/data; append `/content` for the bytes")),
    responses((status = 200, description = "the file's metadata (FileItem), or its bytes for `…/content`",
            content((FileItem = "application/json"), (FileContent = "*/*"))),
        (status = 400, description = "a path that is not below /mnt/data or leads through a \
            link (`invalid_path`, `link_refused`)", body = ErrorBody),
        (status = 409, description = "a directory stands where the path needs a file, or a \
            file where it needs a directory (`not_a_file`)", body = ErrorBody),
        (status = 404, description = "no such sandbox or file (`session_not_found`, \
            `file_not_found`)", body = ErrorBody)))]
async fn get_file(
    state: State<AppState>,
    caller: Caller,
    p: PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    super::get_file(state, caller, p).await
}

/// Writes the raw request body to a file (parents created, an existing file replaced).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files/{*path}", tag = "files",
    params(("id" = String, Path, description = "sandbox id"),
        ("path" = String, Path, pattern = r"^(?:/mnt/data/)?(?:\./+)*(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)(?:/+(?:\.|(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)))*/*$", description = "file path below /mnt/data")),
    request_body(content_type = "application/octet-stream", content = Option<FileContent>),
    responses((status = 201, body = FileItem),
        (status = 400, description = "a path that is not below /mnt/data or leads through a \
            link (`invalid_path`, `link_refused`)", body = ErrorBody),
        (status = 409, description = "a directory stands where the path needs a file, or a \
            file where it needs a directory (`not_a_file`)", body = ErrorBody),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody),
        (status = 413, description = "above the server's upload limit (`payload_too_large`)",
            body = ErrorBody),
        (status = 507, description = "the sandbox's disk is full (`no_space`)",
            body = ErrorBody)))]
async fn put_file(
    state: State<AppState>,
    caller: Caller,
    p: PathParams<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, axum::Json<FileItem>), ApiError> {
    super::put_file(state, caller, p, headers, body).await
}

/// Deletes a file (a link itself, never what it points to).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files/{*path}", tag = "files",
    params(("id" = String, Path, description = "sandbox id"),
        ("path" = String, Path, pattern = r"^(?:/mnt/data/)?(?:\./+)*(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)(?:/+(?:\.|(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)))*/*$", description = "file path below /mnt/data")),
    responses((status = 204, description = "deleted"),
        (status = 400, description = "a path that is not below /mnt/data \
            (`invalid_path`)", body = ErrorBody),
        (status = 409, description = "a directory stands where the path needs a file, or a \
            file where it needs a directory (`not_a_file`)", body = ErrorBody),
        (status = 404, description = "no such sandbox or file (`session_not_found`, \
            `file_not_found`)", body = ErrorBody)))]
async fn delete_file(
    state: State<AppState>,
    caller: Caller,
    p: PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    super::delete_file(state, caller, p).await
}

// ---- ports ----

/// The caller of a port request: the API key's tenant, else the sandbox's traffic token's
/// (`X-Access-Token`), which grants that sandbox's ports and nothing else.
fn port_caller(
    state: &AppState,
    id: &str,
    req: &Request,
) -> Result<ampoule_core::Caller, ApiError> {
    let by_key = state.keys.identify(req.headers(), req.extensions());
    let token = req
        .headers()
        .get("x-access-token")
        .and_then(|v| v.to_str().ok());
    match (by_key, token) {
        (Ok(key), _) => crate::auth::caller(key, req.extensions(), req.headers()),
        (Err(e), None) => Err(e),
        (Err(_), Some(token)) => {
            let request_id = req
                .extensions()
                .get::<crate::auth::RequestId>()
                .map(|r| r.0.clone());
            state
                .manager
                .caller_for_token(id, token, true, request_id)
                .map_err(|_| {
                    ApiError::new(
                        ErrorCode::Unauthorized,
                        "unknown API key, and the X-Access-Token is not this sandbox's \
                         traffic token",
                    )
                })
        }
    }
}

/// Sends the request on to the sandbox's server: the path after `…/ports/{port}`, the
/// query, the body; neither the API key nor the traffic token goes along.
async fn proxy(
    state: AppState,
    id: String,
    port: String,
    mut req: Request,
) -> Result<Response, ApiError> {
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::invalid(format!("a port is 1-65535, not {port:?}")))?;
    let caller = port_caller(&state, &id, &req)?;
    // The raw path (still percent-encoded) after `/v1/sandboxes/{id}/ports/{port}`.
    let rest = req.uri().path().splitn(7, '/').nth(6).unwrap_or("");
    let target = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    *req.uri_mut() = target
        .parse()
        .map_err(|_| ApiError::invalid("a path the server cannot forward"))?;
    let headers = req.headers_mut();
    headers.remove(axum::http::header::AUTHORIZATION);
    headers.remove("x-access-token");
    Ok(crate::ports::forward(&state.manager, &caller, &id, port, req).await?)
}

/// Proxies HTTP (WebSocket upgrades included) to a server listening on `port` inside the
/// sandbox: `…/ports/8080/a/b?c` reaches `http://localhost:8080/a/b?c` there, and its
/// answer, whatever it is, comes back. The API key of the sandbox's owner, or the sandbox's
/// traffic token in `X-Access-Token`, grants it; neither is passed on.
#[utoipa::path(method(get, post, put, delete, patch),
    path = "/v1/sandboxes/{id}/ports/{port}/{*path}", tag = "ports",
    params(("id" = String, Path, description = "sandbox id"),
        ("port" = u16, Path, minimum = 1, maximum = 65535, description = "the port inside"),
        ("path" = String, Path, description = "the path on the server inside")),
    security(("bearer" = []), ("traffic_token" = [])),
    responses(
        (status = "default", description = "the answer of the server inside, as it is"),
        (status = 400, description = "a port out of 1-65535 (`invalid_request`)",
            body = ErrorBody),
        (status = 404, description = "no such sandbox (`session_not_found`)", body = ErrorBody),
        (status = 502, description = "nothing answers HTTP on the port inside \
            (`port_unreachable`)", body = ErrorBody)))]
async fn proxy_port(
    State(state): State<AppState>,
    PathParams((id, port, _path)): PathParams<(String, String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    proxy(state, id, port, req).await
}

async fn proxy_port_root(
    State(state): State<AppState>,
    PathParams((id, port)): PathParams<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    proxy(state, id, port, req).await
}
