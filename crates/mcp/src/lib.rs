//! ampoule as an MCP server: a code-execution tool for any MCP client.
//!
//! [`AmpouleMcp`] serves the tools (`execute_code`, `upload_file`, `download_file`,
//! `list_files`, `list_sessions`, `delete_session`, `pause_sandbox`, `resume_sandbox`,
//! `hibernate_sandbox`) and the session files as resources, on top
//! of [`SandboxApi`]: this crate never touches sandboxes. Two transports:
//! - streamable HTTP ([`http_service`]), which `ampoule serve` mounts at `/mcp` behind its
//!   bearer-key auth (the auth layer puts the key's [`Caller`] in the request extensions);
//! - stdio ([`serve_stdio`]), for `ampoule mcp`, over a server's `/v1` API
//!   ([`client::HttpApi`]) or over an in-process session manager.
//!
//! The HTTP transport is stateless (each POST is answered on its own, in JSON): nothing ties a
//! sandbox to an MCP connection, so sessions are named in the tool arguments, and a server
//! restart or a load balancer never loses an MCP client.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A library prints nothing: the CLI's printer owns stdout and stderr.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod api;
pub mod client;
pub mod error;
pub mod tools;

use std::sync::Arc;

use rmcp::ServiceExt;
use rmcp::transport::StreamableHttpService;
use rmcp::transport::streamable_http_server::StreamableHttpServerConfig;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;

pub use api::{
    Caller, Execute, Executed, FileSummary, SandboxApi, SandboxState, SessionSummary, Transition,
};
pub use error::ApiFailure;
pub use tools::AmpouleMcp;

/// The tower service of the streamable HTTP transport, to mount at `/mcp`. `allowed_hosts`
/// are the `Host` values accepted (DNS-rebinding protection; empty: any host);
/// `max_body` bounds a request (uploads arrive base64 inside it).
pub fn http_service(
    api: Arc<dyn SandboxApi>,
    allowed_hosts: Vec<String>,
    max_body: usize,
) -> StreamableHttpService<AmpouleMcp, NeverSessionManager> {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_allowed_hosts(allowed_hosts)
        .with_max_request_body_bytes(max_body);
    StreamableHttpService::new(
        move || Ok(AmpouleMcp::new(api.clone(), None)),
        Arc::new(NeverSessionManager::default()),
        config,
    )
}

/// Why the stdio transport stopped.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The client's first messages were not a valid MCP handshake.
    #[error("starting the MCP session on stdio: {0}")]
    Start(String),
    /// The service task failed.
    #[error("the MCP session on stdio failed: {0}")]
    Run(String),
}

/// Serves MCP on stdin/stdout as `caller` until the client closes stdin.
pub async fn serve_stdio(api: Arc<dyn SandboxApi>, caller: Caller) -> Result<(), StdioError> {
    let server = AmpouleMcp::new(api, Some(caller))
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| StdioError::Start(e.to_string()))?;
    server
        .waiting()
        .await
        .map_err(|e| StdioError::Run(e.to_string()))?;
    Ok(())
}
