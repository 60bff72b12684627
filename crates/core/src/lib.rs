//! The ampoule core service: what every front door calls.
//!
//! A door (the native `/v1` API, the ACA-compatible API, MCP; all in `ampoule-server`)
//! authenticates a request to a [`Caller`], parses it into one command of [`service`]
//! (`execute`, `create_session`, `put_file`, …) and translates the answer or the [`Error`]
//! into its own dialect. The core owns the order of the policy checks (identifier, pool,
//! language, timeout, rate limit, admission, then creation), the session table and its warm
//! stock ([`manager`]), the tenants' quotas ([`quota`]) and the audit records; it knows no
//! HTTP and imports no door. Sessions come from an [`engine::Engine`]: the real one (in
//! `ampoule-server`) runs interpreters in sandboxes; the [`fake`] one (feature `fake`) runs a
//! toy language on a temporary directory so the core and the doors are tested without root.
//! What the core does is reported to an [`observer::Observer`] (the server's metrics).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod approval;
pub mod caller;
mod durable;
#[cfg(test)]
mod durable_tests;
pub mod engine;
pub mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod files;
pub mod lifecycle;
pub mod manager;
pub mod observer;
pub mod quota;
pub mod sandbox;
#[cfg(test)]
mod sandbox_tests;
pub mod service;
pub mod settings;
#[cfg(test)]
mod tests;

pub use ampoule_runtime::scratch::FileInfo;
pub use caller::Caller;
pub use durable::SandboxCounts;
pub use engine::{
    Engine, LiveContext, LiveProcess, LiveSession, PoolImage, PoolNetwork, PoolSpec, ProcessExit,
    ProcessRequest, ZygoteHealth,
};
pub use error::{Error, ErrorCode};
pub use files::ByteStream;
pub use manager::{Manager, PoolStatus, Readiness};
pub use observer::{NoObserver, Observer};
pub use sandbox::{
    Command, ContextInfo, CreateContext, CreateSandbox, ProcessEnd, ProcessEvent, ProcessInfo,
    ProcessSelector, ProcessStream, SandboxInfo, SandboxTokens, StartProcess,
};
pub use service::{
    AuditQuery, Budget, CreateSession, Download, ExecuteCommand, Executed, Outcome, PutFile,
    SessionInfo, Streaming, Target, check_identifier,
};
pub use settings::{Audit, AuditPolicy, PoolSettings, TenantLimits};
