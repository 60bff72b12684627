//! The one error a [`crate::SandboxApi`] call answers with.
//!
//! It carries the stable code of the server's API (`session_not_found`, `invalid_path`, …) and
//! a message written for the caller; the tools turn it into an MCP tool error (`isError`), never
//! into a protocol or transport failure.

/// Why a sandbox call was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    /// A stable code (the server's error codes, or `unavailable` when the server could not
    /// be reached).
    pub code: String,
    /// What went wrong, for a person (or a model).
    pub message: String,
}

impl ApiFailure {
    /// A failure with a code and a message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The arguments of a call are wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("invalid_request", message)
    }
}
