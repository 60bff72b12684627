//! [`Error`]: why the core refused or could not do a command, and [`ErrorCode`], the stable
//! machine code of each refusal that every door answers (as a JSON `code`, an ACA
//! `x-ms-error-code`, an MCP tool error).
//!
//! Invariants: every variant has one stable [`ErrorCode`] and a lowercase message written for
//! the client; internal details (host paths, errno values, engine messages) are logged when
//! the error is made and never carried in it. How a code becomes an HTTP status, or an ACA
//! name, is the doors' business: nothing here knows HTTP.

use ampoule_types::Language;

/// The stable error codes of every door (the `code` field of an error body). The first few
/// are only ever made by a door (authentication, routing, body parsing); the core makes the
/// rest through [`Error::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No API key, an unknown one, or `Bearer None`.
    Unauthorized,
    /// The path names no operation.
    NotFound,
    /// No session with this id or identifier exists for the caller's tenant.
    SessionNotFound,
    /// No such pool.
    PoolNotFound,
    /// No such file in the session.
    FileNotFound,
    /// The pool has reached its maximum number of sessions.
    PoolFull,
    /// The tenant has reached its maximum number of sessions.
    TenantFull,
    /// The tenant has used its executions for this minute.
    RateLimited,
    /// The tenant may not use this pool.
    PoolNotAllowed,
    /// The tenant may not use this language.
    LanguageNotAllowed,
    /// The requested timeout is above the tenant's maximum.
    TimeoutNotAllowed,
    /// The language asked for is a known one, but not the session's (or the pool's): the
    /// request conflicts with what the session is, not with the API's schema.
    LanguageMismatch,
    /// The request is malformed (bad JSON, missing field, bad identifier).
    InvalidRequest,
    /// A file path is absolute, contains `..`, or is otherwise not a path below `/mnt/data`.
    InvalidPath,
    /// The path leads through a link, which is never followed.
    LinkRefused,
    /// The path names a directory or another non-regular file.
    NotAFile,
    /// The upload is larger than the server accepts.
    PayloadTooLarge,
    /// The session's disk space is full.
    NoSpace,
    /// The body is neither of the accepted media types.
    UnsupportedMediaType,
    /// The operation exists, with another method.
    MethodNotAllowed,
    /// No such context in the sandbox.
    ContextNotFound,
    /// No such process running in the sandbox.
    ProcessNotFound,
    /// Nothing listens on that port inside the sandbox.
    PortUnreachable,
    /// The sandbox (its pool's engine) cannot do that.
    NotSupported,
    /// A sandbox could not be started, or its interpreter stopped answering.
    SandboxUnavailable,
    /// The request conflicts with the sandbox's state (busy, not durable).
    Conflict,
    /// The tenant's durable sandboxes would take more disk than its quota.
    DiskQuotaExceeded,
    /// The server is shutting down.
    ShuttingDown,
    /// The replica that holds the session or sandbox does not answer (a cluster of
    /// replicas: ids name their replica).
    ReplicaUnavailable,
    /// The API key's expiry has passed (a rotated key's grace period included).
    KeyExpired,
    /// The API key was revoked.
    KeyRevoked,
    /// Too many failed authentications from the client's address (or with the key's
    /// prefix) in the last minute: nothing is checked until `Retry-After` has passed.
    AuthThrottled,
    /// The listener holds as many connections as it allows (in total or from the client's
    /// address).
    TooManyConnections,
    /// An approver denied the execution (its code never ran).
    Denied,
    /// No approver decided in the pool's `approval.timeout_s` (the code never ran).
    ApprovalTimedOut,
    /// No such pending approval for the caller's tenant.
    ApprovalNotFound,
    /// The key may not decide approvals (it lacks `role = "approver"`).
    NotAnApprover,
    /// An approver key submitted work: approver keys only decide.
    ApproverCannotSubmit,
    /// The tenant has spent its CPU-time or memory-time budget for the hour.
    QuotaExhausted,
    /// Something broke inside the server (logged; the message says no more).
    Internal,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::SessionNotFound => "session_not_found",
            ErrorCode::PoolNotFound => "pool_not_found",
            ErrorCode::FileNotFound => "file_not_found",
            ErrorCode::PoolFull => "pool_full",
            ErrorCode::TenantFull => "tenant_full",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::PoolNotAllowed => "pool_not_allowed",
            ErrorCode::LanguageNotAllowed => "language_not_allowed",
            ErrorCode::TimeoutNotAllowed => "timeout_not_allowed",
            ErrorCode::LanguageMismatch => "language_mismatch",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidPath => "invalid_path",
            ErrorCode::LinkRefused => "link_refused",
            ErrorCode::NotAFile => "not_a_file",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::ContextNotFound => "context_not_found",
            ErrorCode::ProcessNotFound => "process_not_found",
            ErrorCode::PortUnreachable => "port_unreachable",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::SandboxUnavailable => "sandbox_unavailable",
            ErrorCode::Conflict => "conflict",
            ErrorCode::DiskQuotaExceeded => "disk_quota_exceeded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::ReplicaUnavailable => "replica_unavailable",
            ErrorCode::KeyExpired => "key_expired",
            ErrorCode::KeyRevoked => "key_revoked",
            ErrorCode::AuthThrottled => "auth_throttled",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Denied => "denied",
            ErrorCode::ApprovalTimedOut => "approval_timed_out",
            ErrorCode::ApprovalNotFound => "approval_not_found",
            ErrorCode::NotAnApprover => "not_an_approver",
            ErrorCode::ApproverCannotSubmit => "approver_cannot_submit",
            ErrorCode::QuotaExhausted => "quota_exhausted",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a command was refused or failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// No such session for the caller (another tenant's is reported the same way).
    #[error("{0}")]
    SessionNotFound(String),
    /// No such pool.
    #[error("no pool {0:?}")]
    PoolNotFound(String),
    /// No pool runs the language asked for.
    #[error("this server runs no {0} sessions")]
    NoPoolFor(Language),
    /// No such file in the session.
    #[error("no file {0:?} in the session")]
    FileNotFound(String),
    /// A working directory or program the request names is not in the sandbox (or cannot be
    /// used there).
    #[error("{0}")]
    MissingInSandbox(String),
    /// The pool holds its maximum of sessions.
    #[error("pool {pool:?} is at its maximum of {max} sessions")]
    PoolFull {
        /// The pool.
        pool: String,
        /// Its maximum.
        max: usize,
    },
    /// The tenant holds its maximum of sessions.
    #[error("this tenant is at its maximum of {max} sessions")]
    TenantFull {
        /// The tenant's maximum.
        max: usize,
    },
    /// The tenant started its executions of the minute.
    #[error("this tenant may start {max} executions per minute")]
    RateLimited {
        /// Executions per minute.
        max: u32,
        /// Seconds until one more may start.
        retry_after_s: u64,
    },
    /// The tenant may not use the pool.
    #[error("this tenant may not use pool {0:?}")]
    PoolNotAllowed(String),
    /// The tenant may not use the language.
    #[error("this tenant may not use {0}")]
    LanguageNotAllowed(Language),
    /// The requested timeout is above the tenant's maximum.
    #[error("this tenant may ask for at most {max} seconds")]
    TimeoutNotAllowed {
        /// The tenant's maximum, in seconds.
        max: f64,
    },
    /// The language asked for is not the session's (or the pool's); the message says which
    /// it runs.
    #[error("{0}")]
    LanguageMismatch(String),
    /// The request is malformed (an identifier, a timeout, a language, a body).
    #[error("{0}")]
    Invalid(String),
    /// A file path that is not below `/mnt/data`.
    #[error("{0}")]
    InvalidPath(String),
    /// A path through a link.
    #[error("{0}")]
    LinkRefused(String),
    /// A path that names no regular file.
    #[error("{0}")]
    NotAFile(String),
    /// A file larger than allowed.
    #[error("the upload is larger than the {max}-byte limit")]
    PayloadTooLarge {
        /// The limit, in bytes.
        max: u64,
    },
    /// The session's disk is full.
    #[error("no space left in the session's files")]
    NoSpace,
    /// No such context in the sandbox.
    #[error("{0}")]
    ContextNotFound(String),
    /// No such process running in the sandbox.
    #[error("{0}")]
    ProcessNotFound(String),
    /// Nothing answered on the port inside the sandbox.
    #[error("{0}")]
    PortUnreachable(String),
    /// The sandbox cannot do that.
    #[error("{0}")]
    NotSupported(String),
    /// The sandbox could not be started or stopped answering.
    #[error("{0}")]
    SandboxUnavailable(String),
    /// The request conflicts with the sandbox's state.
    #[error("{0}")]
    Conflict(String),
    /// The tenant's durable sandboxes would take more disk than its quota.
    #[error(
        "the disks of your durable sandboxes would take more than {max_mib} MiB (your quota); \
         delete some"
    )]
    DiskQuota {
        /// The quota.
        max_mib: u64,
    },
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The server keeps no audit log, so there is nothing to query.
    #[error("this server keeps no audit log")]
    NoAuditLog,
    /// An approver denied the execution.
    #[error("an approver denied this execution{0}; its code did not run")]
    Denied(String),
    /// Nobody decided in time.
    #[error("no approver decided within {0} s; the code did not run")]
    ApprovalTimedOut(f64),
    /// No such pending approval.
    #[error("no pending approval {0:?}")]
    ApprovalNotFound(String),
    /// The caller may not decide approvals.
    #[error("this key may not decide approvals (it needs role = \"approver\")")]
    NotAnApprover,
    /// The caller is an approver and submitted work.
    #[error("approver keys decide approvals and submit no work; use another key")]
    ApproverCannotSubmit,
    /// A cost budget is spent.
    #[error(
        "this tenant has spent its {what} budget for the hour ({used:.1} of {max:.1}); try again in {retry_after_s} s"
    )]
    QuotaExhausted {
        /// `cpu_seconds_per_hour` or `memory_gib_seconds_per_hour`.
        what: &'static str,
        /// Spent in the last hour.
        used: f64,
        /// The budget.
        max: f64,
        /// When enough of the window has passed.
        retry_after_s: u64,
    },
    /// A bug or a broken host; the detail was logged when the error was made.
    #[error("internal error (see the server log)")]
    Internal,
}

impl Error {
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::SessionNotFound(_) => ErrorCode::SessionNotFound,
            Error::PoolNotFound(_) | Error::NoPoolFor(_) => ErrorCode::PoolNotFound,
            Error::FileNotFound(_) | Error::MissingInSandbox(_) => ErrorCode::FileNotFound,
            Error::PoolFull { .. } => ErrorCode::PoolFull,
            Error::TenantFull { .. } => ErrorCode::TenantFull,
            Error::RateLimited { .. } => ErrorCode::RateLimited,
            Error::PoolNotAllowed(_) => ErrorCode::PoolNotAllowed,
            Error::LanguageNotAllowed(_) => ErrorCode::LanguageNotAllowed,
            Error::TimeoutNotAllowed { .. } => ErrorCode::TimeoutNotAllowed,
            Error::LanguageMismatch(_) => ErrorCode::LanguageMismatch,
            Error::Invalid(_) => ErrorCode::InvalidRequest,
            Error::InvalidPath(_) => ErrorCode::InvalidPath,
            Error::LinkRefused(_) => ErrorCode::LinkRefused,
            Error::NotAFile(_) => ErrorCode::NotAFile,
            Error::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Error::NoSpace => ErrorCode::NoSpace,
            Error::ContextNotFound(_) => ErrorCode::ContextNotFound,
            Error::ProcessNotFound(_) => ErrorCode::ProcessNotFound,
            Error::PortUnreachable(_) => ErrorCode::PortUnreachable,
            Error::NotSupported(_) => ErrorCode::NotSupported,
            Error::SandboxUnavailable(_) => ErrorCode::SandboxUnavailable,
            Error::Conflict(_) => ErrorCode::Conflict,
            Error::DiskQuota { .. } => ErrorCode::DiskQuotaExceeded,
            Error::ShuttingDown => ErrorCode::ShuttingDown,
            Error::NoAuditLog => ErrorCode::NotFound,
            Error::Denied(_) => ErrorCode::Denied,
            Error::ApprovalTimedOut(_) => ErrorCode::ApprovalTimedOut,
            Error::ApprovalNotFound(_) => ErrorCode::ApprovalNotFound,
            Error::NotAnApprover => ErrorCode::NotAnApprover,
            Error::ApproverCannotSubmit => ErrorCode::ApproverCannotSubmit,
            Error::QuotaExhausted { .. } => ErrorCode::QuotaExhausted,
            Error::Internal => ErrorCode::Internal,
        }
    }

    /// Seconds after which the command may succeed, when the refusal says.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            Error::RateLimited { retry_after_s, .. }
            | Error::QuotaExhausted { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        }
    }

    /// Whether this is a refusal by a quota or policy (counted, logged and audited as
    /// `refused`), rather than a missing thing or a failure.
    pub fn is_policy(&self) -> bool {
        matches!(
            self,
            Error::PoolFull { .. }
                | Error::TenantFull { .. }
                | Error::RateLimited { .. }
                | Error::PoolNotAllowed(_)
                | Error::LanguageNotAllowed(_)
                | Error::TimeoutNotAllowed { .. }
                | Error::DiskQuota { .. }
                | Error::QuotaExhausted { .. }
        )
    }

    /// Logs `detail` (which may hold internals) and answers a bare internal error.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Error::Internal
    }

    /// A malformed request.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }

    /// No such session.
    pub fn session_not_found() -> Self {
        Error::SessionNotFound("no such session".into())
    }
}

impl From<crate::engine::EngineError> for Error {
    fn from(e: crate::engine::EngineError) -> Self {
        use crate::engine::EngineError;
        match e {
            EngineError::Closed => {
                Error::SessionNotFound("the session ended while the request was running".into())
            }
            EngineError::Unsupported(m) => Error::NotSupported(m),
            // The request conflicts with what this sandbox can be (409), like a language a
            // session does not run.
            EngineError::NoRuntime(m) => Error::LanguageMismatch(m),
            EngineError::Invalid(m) => Error::MissingInSandbox(m),
            EngineError::Unreachable(m) => Error::PortUnreachable(m),
            other => {
                tracing::warn!(error = %other, "sandbox engine");
                Error::SandboxUnavailable("the sandbox could not run the request; try again".into())
            }
        }
    }
}

impl From<ampoule_runtime::scratch::FileError> for Error {
    fn from(e: ampoule_runtime::scratch::FileError) -> Self {
        use ampoule_runtime::scratch::FileError;
        match e {
            FileError::Invalid(msg) => Error::InvalidPath(msg),
            FileError::NotFound(p) => Error::FileNotFound(p),
            e @ FileError::Link(_) => Error::LinkRefused(e.to_string()),
            e @ FileError::NotAFile(_) => Error::NotAFile(e.to_string()),
            FileError::NoSpace => Error::NoSpace,
            e @ FileError::Io { .. } => Error::internal(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_code_and_retry_after() {
        let e = Error::RateLimited {
            max: 3,
            retry_after_s: 7,
        };
        assert_eq!(e.code().as_str(), "rate_limited");
        assert_eq!(e.retry_after_s(), Some(7));
        assert!(e.is_policy());
        assert_eq!(
            e.to_string(),
            "this tenant may start 3 executions per minute"
        );
        assert_eq!(
            Error::PoolNotAllowed("x".into()).code(),
            ErrorCode::PoolNotAllowed
        );
        assert!(!Error::session_not_found().is_policy());
    }
}
