//! The MCP server itself: the tools (`execute_code`, `upload_file`, `download_file`,
//! `list_files`, `list_sessions`, `delete_session`, `pause_sandbox`, `resume_sandbox`,
//! `hibernate_sandbox`) and the files of every session as
//! resources (`ampoule://sessions/{session}/files/{path}`).
//!
//! Invariants: every failure of a tool — a refused call, a missing session, bad arguments — is
//! a tool result with `isError: true` and a message saying what to change, never a protocol
//! error (only an unknown tool name is one, as the MCP spec asks). The caller's tenant comes
//! from the HTTP request (put there by the server's auth layer), or is the fixed local tenant
//! over stdio; a request without either is refused.

use std::sync::Arc;

use ampoule_types::{ExecutionResult, MimeBundle};
use base64::Engine as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorCode, ErrorData,
    Implementation, ListResourceTemplatesResult, ListResourcesResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, ResourceTemplate, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler, tool, tool_router};
use serde::Deserialize;

use crate::api::{Caller, Execute, SandboxApi, Transition};
use crate::error::ApiFailure;

/// Largest file `download_file` and resource reads return (MCP messages are JSON; bigger files
/// belong to the native API).
pub const MAX_DOWNLOAD: u64 = 16 * 1024 * 1024;

/// The URI scheme of session files as resources.
const SCHEME: &str = "ampoule://sessions/";

/// `execute_code` arguments.
#[derive(Debug, Deserialize, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ExecuteCodeArgs {
    /// The code to run. The value of the last expression is returned as `result` (Python,
    /// JavaScript); plots shown with matplotlib come back as images.
    pub code: String,
    /// `python` (default), `javascript`, `shell`, `csharp` or `powershell` (the server must
    /// have a pool of that language).
    #[serde(default)]
    pub language: Option<String>,
    /// The session to run in: variables, imports and files in /mnt/data persist between calls
    /// with the same session. Omit it to start a new session; its name is returned.
    #[serde(default)]
    pub session: Option<String>,
    /// Wall-clock limit in seconds (default and maximum: the server's).
    #[serde(default)]
    pub timeout_s: Option<f64>,
    /// Why you run this code, for the audit log: a small JSON object such as
    /// `{"prompt": "...", "run_id": "...", "agent": "...", "step": 3}` (at most 4 KiB).
    /// Executions with the same `run_id` are found together; repeating code in a run counts
    /// as a retry.
    #[serde(default)]
    #[schemars(with = "Option<std::collections::BTreeMap<String, serde_json::Value>>")]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `upload_file` arguments.
#[derive(Debug, Deserialize, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct UploadFileArgs {
    /// Where to write it: a path below /mnt/data (`data.csv` or `/mnt/data/data.csv`).
    pub path: String,
    /// The content: text, or base64 when `encoding` is `base64`.
    pub content: String,
    /// `text` (default) or `base64`.
    #[serde(default)]
    pub encoding: Option<String>,
    /// The session to put it in (started on first use). Omit it to start a new session.
    #[serde(default)]
    pub session: Option<String>,
}

/// `download_file` arguments.
#[derive(Debug, Deserialize, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct DownloadFileArgs {
    /// The session that holds the file.
    pub session: String,
    /// A path below /mnt/data (`out.png` or `/mnt/data/out.png`).
    pub path: String,
}

/// Arguments naming one session.
#[derive(Debug, Deserialize, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct SessionArgs {
    /// The session's name.
    pub session: String,
}

/// Arguments naming one sandbox.
#[derive(Debug, Deserialize, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct SandboxArgs {
    /// The sandbox's id (`sbx_…`), or a session's name (the `session` of `execute_code`).
    pub sandbox_id: String,
}

/// No arguments.
#[derive(Debug, Default, Deserialize, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// The ampoule MCP server: tools and resources over a [`SandboxApi`].
#[derive(Clone)]
pub struct AmpouleMcp {
    api: Arc<dyn SandboxApi>,
    /// The caller when the transport does not say (stdio); `None` over HTTP.
    local: Option<Caller>,
    tool_router: ToolRouter<Self>,
}

impl std::fmt::Debug for AmpouleMcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmpouleMcp")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

fn tool_error(msg: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(msg.into())])
}

fn failure(e: &ApiFailure) -> CallToolResult {
    tool_error(format!("{} ({})", e.message, e.code))
}

fn json_text(value: &serde_json::Value) -> ContentBlock {
    ContentBlock::text(serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()))
}

/// The text form of a MIME bundle (`text/plain`, else JSON).
fn plain(bundle: &MimeBundle) -> Option<String> {
    match bundle.get("text/plain") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
        None => bundle.get("application/json").map(|v| v.to_string()),
    }
}

/// The images of a MIME bundle, as MCP image content.
fn images(bundle: &MimeBundle, out: &mut Vec<ContentBlock>) {
    for mime in ["image/png", "image/jpeg"] {
        if let Some(serde_json::Value::String(data)) = bundle.get(mime) {
            // Kernels may wrap base64 at 76 columns; MCP wants it unbroken.
            let data: String = data.chars().filter(|c| !c.is_whitespace()).collect();
            out.push(ContentBlock::image(data, mime));
            return;
        }
    }
}

/// An execution result as tool content: one JSON text block (session, execution id, status,
/// stdout, stderr, result, error), then every image it produced.
pub fn execution_content(
    session: &str,
    execution_id: Option<&str>,
    r: &ExecutionResult,
) -> Vec<ContentBlock> {
    let error = r.error.as_ref().map(|e| {
        serde_json::json!({"name": e.name, "value": e.value, "traceback": e.traceback.join("\n")})
    });
    let mut summary = serde_json::json!({
        "session": session,
        "execution_id": execution_id,
        "status": r.status.as_str(),
        "stdout": r.stdout,
        "stderr": r.stderr,
        "result": r.result.as_ref().and_then(plain),
        "error": error,
    });
    if let Some(limit) = r.limit
        && let Some(map) = summary.as_object_mut()
    {
        map.insert("limit".into(), limit.as_str().into());
        map.insert(
            "session_state".into(),
            serde_json::to_value(r.session_state).unwrap_or_default(),
        );
    }
    if (r.stdout_truncated || r.stderr_truncated)
        && let Some(map) = summary.as_object_mut()
    {
        map.insert("output_truncated".into(), true.into());
    }
    let mut out = vec![json_text(&summary)];
    for bundle in r.outputs.iter().chain(r.result.iter()) {
        images(bundle, &mut out);
    }
    out
}

fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unpercent(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The resource URI of a session's file.
pub fn file_uri(session: &str, path: &str) -> String {
    let path: Vec<String> = path.split('/').map(percent).collect();
    format!("{SCHEME}{}/files/{}", percent(session), path.join("/"))
}

/// The session and path a resource URI names.
pub fn parse_file_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix(SCHEME)?;
    let (session, path) = rest.split_once("/files/")?;
    let path: Option<Vec<String>> = path.split('/').map(unpercent).collect();
    let path = path?.join("/");
    (!path.is_empty()).then_some(())?;
    Some((unpercent(session)?, path))
}

fn mime_for(path: &str) -> &'static str {
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" => "text/plain",
        "csv" => "text/csv",
        "json" => "application/json",
        "md" => "text/markdown",
        "html" | "htm" => "text/html",
        "py" => "text/x-python",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

/// A file's bytes as resource contents: text when it is UTF-8, else a base64 blob.
fn contents(uri: String, path: &str, data: Vec<u8>) -> ResourceContents {
    let mime = mime_for(path);
    match String::from_utf8(data) {
        Ok(text) if !mime.starts_with("image/") || mime == "image/svg+xml" => {
            let mime = if mime == "application/octet-stream" {
                "text/plain"
            } else {
                mime
            };
            ResourceContents::text(text, uri).with_mime_type(mime)
        }
        Ok(text) => ResourceContents::blob(
            base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
            uri,
        )
        .with_mime_type(mime),
        Err(e) => ResourceContents::blob(
            base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
            uri,
        )
        .with_mime_type(mime),
    }
}

impl AmpouleMcp {
    /// A server over `api`. `local` is the caller of transports that carry no identity
    /// (stdio); over HTTP pass `None`, and the caller comes from each request.
    pub fn new(api: Arc<dyn SandboxApi>, local: Option<Caller>) -> Self {
        Self {
            api,
            local,
            tool_router: Self::tool_router(),
        }
    }

    fn caller(&self, ctx: &RequestContext<RoleServer>) -> Result<Caller, CallToolResult> {
        let from_http = ctx
            .extensions
            .get::<http::request::Parts>()
            .and_then(|p| p.extensions.get::<Caller>())
            .cloned();
        from_http
            .or_else(|| self.local.clone())
            .ok_or_else(|| tool_error("this request carries no API key (unauthorized)"))
    }

    /// One of the state tools: the sandbox's state after it, as JSON.
    async fn transition(
        &self,
        args: SandboxArgs,
        to: Transition,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match self.caller(&ctx) {
            Ok(c) => c,
            Err(e) => return e,
        };
        if args.sandbox_id.is_empty() {
            return tool_error("`sandbox_id` is empty: pass a sandbox id or a session's name");
        }
        match self.api.transition(&caller, &args.sandbox_id, to).await {
            Ok(state) => CallToolResult::success(vec![json_text(
                &serde_json::to_value(&state).unwrap_or_default(),
            )]),
            Err(e) => failure(&e),
        }
    }

    fn resource_caller(&self, ctx: &RequestContext<RoleServer>) -> Result<Caller, ErrorData> {
        self.caller(ctx).map_err(|_| {
            ErrorData::invalid_request("this request carries no API key (unauthorized)", None)
        })
    }
}

#[tool_router]
impl AmpouleMcp {
    /// Runs code in a sandbox.
    #[tool(
        name = "execute_code",
        description = "Run code in an isolated Linux sandbox (no network) and return its stdout, \
                       stderr, the value of the last expression (`result`) and any error with its \
                       traceback; charts (matplotlib) come back as PNG images. Pass the same \
                       `session` to keep variables, imports and files in /mnt/data between calls; \
                       omit it to start a new session (its name is in the reply). Python has \
                       numpy, pandas and matplotlib."
    )]
    async fn execute_code(
        &self,
        Parameters(args): Parameters<ExecuteCodeArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match self.caller(&ctx) {
            Ok(c) => c,
            Err(e) => return e,
        };
        if args.code.trim().is_empty() {
            return tool_error("`code` is empty: pass the code to run");
        }
        let req = Execute {
            session: args.session,
            language: args.language,
            code: args.code,
            timeout_s: args.timeout_s,
            context: args.context,
        };
        match self.api.execute(&caller, req).await {
            Ok(done) => CallToolResult::success(execution_content(
                &done.session,
                done.execution_id.as_deref(),
                &done.result,
            )),
            Err(e) => failure(&e),
        }
    }

    /// Writes a file into a session.
    #[tool(
        name = "upload_file",
        description = "Write a file into a sandbox session's /mnt/data, where code can read it \
                       (e.g. pandas.read_csv('/mnt/data/data.csv')). Text by default; set \
                       `encoding` to `base64` for binary content. Omit `session` to start a new \
                       session (its name is in the reply)."
    )]
    async fn upload_file(
        &self,
        Parameters(args): Parameters<UploadFileArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match self.caller(&ctx) {
            Ok(c) => c,
            Err(e) => return e,
        };
        let data = match args.encoding.as_deref() {
            None | Some("text") | Some("utf-8") | Some("utf8") => args.content.into_bytes(),
            Some("base64") => {
                let compact: String = args
                    .content
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect();
                match base64::engine::general_purpose::STANDARD.decode(compact) {
                    Ok(d) => d,
                    Err(e) => return tool_error(format!("`content` is not valid base64: {e}")),
                }
            }
            Some(other) => {
                return tool_error(format!(
                    "unknown encoding {other:?}: use `text` or `base64`"
                ));
            }
        };
        let path = match crate::api::data_path(&args.path) {
            Ok(p) => p.to_owned(),
            Err(e) => return failure(&e),
        };
        match self
            .api
            .upload(&caller, args.session.as_deref(), &path, data)
            .await
        {
            Ok((session, file)) => CallToolResult::success(vec![json_text(&serde_json::json!({
                "session": session,
                "path": format!("/mnt/data/{}", file.path),
                "size": file.size,
            }))]),
            Err(e) => failure(&e),
        }
    }

    /// Reads a file from a session.
    #[tool(
        name = "download_file",
        description = "Read a file from a sandbox session's /mnt/data: text files come back as \
                       text, others as a base64 blob (embedded resource), at most 16 MiB."
    )]
    async fn download_file(
        &self,
        Parameters(args): Parameters<DownloadFileArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match self.caller(&ctx) {
            Ok(c) => c,
            Err(e) => return e,
        };
        let path = match crate::api::data_path(&args.path) {
            Ok(p) => p.to_owned(),
            Err(e) => return failure(&e),
        };
        match self
            .api
            .download(&caller, &args.session, &path, MAX_DOWNLOAD)
            .await
        {
            Ok(data) => {
                let uri = file_uri(&args.session, &path);
                CallToolResult::success(vec![ContentBlock::resource(contents(uri, &path, data))])
            }
            Err(e) => failure(&e),
        }
    }

    /// Lists a session's files.
    #[tool(
        name = "list_files",
        description = "List the files in a sandbox session's /mnt/data (paths relative to it, \
                       sizes in bytes)."
    )]
    async fn list_files(
        &self,
        Parameters(args): Parameters<SessionArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match self.caller(&ctx) {
            Ok(c) => c,
            Err(e) => return e,
        };
        match self.api.list_files(&caller, &args.session).await {
            Ok(files) => CallToolResult::success(vec![json_text(&serde_json::json!({
                "session": args.session,
                "files": files,
            }))]),
            Err(e) => failure(&e),
        }
    }

    /// Lists the caller's sessions.
    #[tool(
        name = "list_sessions",
        description = "List your live sandbox sessions: name, language, creation and last use, \
                       number of executions. Idle sessions expire after a few minutes."
    )]
    async fn list_sessions(
        &self,
        Parameters(_args): Parameters<NoArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match self.caller(&ctx) {
            Ok(c) => c,
            Err(e) => return e,
        };
        match self.api.list_sessions(&caller).await {
            Ok(sessions) => CallToolResult::success(vec![json_text(
                &serde_json::json!({ "sessions": sessions }),
            )]),
            Err(e) => failure(&e),
        }
    }

    /// Pauses a sandbox.
    #[tool(
        name = "pause_sandbox",
        description = "Pause a sandbox (or a session, by its name): its processes are frozen \
                       where they are and its memory is kept, so it costs no CPU while you do \
                       not need it. Any later call that names it (execute_code, files, \
                       resume_sandbox) runs it again, with its variables intact. Refused while \
                       code runs in it."
    )]
    async fn pause_sandbox(
        &self,
        Parameters(args): Parameters<SandboxArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        self.transition(args, Transition::Pause, ctx).await
    }

    /// Resumes a sandbox.
    #[tool(
        name = "resume_sandbox",
        description = "Run a paused or hibernated sandbox (or session) again. A hibernated one \
                       comes back with its files but not its memory: the reply then says \
                       `session_state: \"lost\"` (variables and imports must be set again)."
    )]
    async fn resume_sandbox(
        &self,
        Parameters(args): Parameters<SandboxArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        self.transition(args, Transition::Resume, ctx).await
    }

    /// Hibernates a sandbox.
    #[tool(
        name = "hibernate_sandbox",
        description = "Hibernate a durable sandbox (or session): nothing of it runs any more and \
                       its files stay on the server's disk; its memory is not kept (variables \
                       are lost, files are not). Any later call that names it runs it again."
    )]
    async fn hibernate_sandbox(
        &self,
        Parameters(args): Parameters<SandboxArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        self.transition(args, Transition::Hibernate, ctx).await
    }

    /// Destroys a session.
    #[tool(
        name = "delete_session",
        description = "Destroy a sandbox session: its interpreter state and its files are gone."
    )]
    async fn delete_session(
        &self,
        Parameters(args): Parameters<SessionArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match self.caller(&ctx) {
            Ok(c) => c,
            Err(e) => return e,
        };
        match self.api.delete_session(&caller, &args.session).await {
            Ok(()) => CallToolResult::success(vec![ContentBlock::text(format!(
                "session {:?} deleted",
                args.session
            ))]),
            Err(e) => failure(&e),
        }
    }
}

impl ServerHandler for AmpouleMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("ampoule", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Run untrusted code in isolated Linux sandboxes. Call execute_code; keep the returned \
             `session` and pass it again to keep state. Files live in /mnt/data: upload_file, \
             list_files, download_file (also readable as resources).",
        )
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let known = self.tool_router.has_route(&request.name);
        let tcc = ToolCallContext::new(self, request, context);
        match self.tool_router.call(tcc).await {
            // Bad arguments to a known tool are the caller's to fix: a tool error, not a
            // protocol error.
            Err(e) if known && e.code == ErrorCode::INVALID_PARAMS => {
                Ok(tool_error(format!("invalid arguments: {}", e.message)).into())
            }
            other => other,
        }
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, ErrorData> {
        Ok(rmcp::model::ListToolsResult::with_all_items(
            self.tool_router.list_all(),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<rmcp::model::Tool> {
        self.tool_router.get(name).cloned()
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let caller = self.resource_caller(&context)?;
        let sessions = self
            .api
            .list_sessions(&caller)
            .await
            .map_err(|e| ErrorData::internal_error(e.message, None))?;
        let mut resources = Vec::new();
        for s in sessions {
            // A session may expire between the two calls: list what is still there.
            let Ok(files) = self.api.list_files(&caller, &s.session).await else {
                continue;
            };
            for f in files {
                resources.push(
                    Resource::new(file_uri(&s.session, &f.path), f.path.clone())
                        .with_description(format!("/mnt/data/{} in session {}", f.path, s.session))
                        .with_mime_type(mime_for(&f.path))
                        .with_size(f.size),
                );
            }
        }
        Ok(ListResourcesResult::with_all_items(resources))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new("ampoule://sessions/{session}/files/{path}", "session file")
                .with_description("A file in a sandbox session's /mnt/data"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let caller = self.resource_caller(&context)?;
        let Some((session, path)) = parse_file_uri(&request.uri) else {
            return Err(ErrorData::resource_not_found(
                format!(
                    "{:?} is not a session file (ampoule://sessions/SESSION/files/PATH)",
                    request.uri
                ),
                None,
            ));
        };
        match self
            .api
            .download(&caller, &session, &path, MAX_DOWNLOAD)
            .await
        {
            Ok(data) => {
                Ok(ReadResourceResult::new(vec![contents(request.uri, &path, data)]).into())
            }
            Err(e) => Err(ErrorData::resource_not_found(e.message, None)),
        }
    }
}
