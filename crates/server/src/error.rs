//! Errors: [`ApiError`], the one error type every handler answers with, and [`Error`], what can
//! go wrong while the server starts.
//!
//! Invariants: every refusal carries a stable, documented [`ErrorCode`] and a message written
//! for the client; internal details (paths on the host, errno values, engine messages) are
//! logged, never sent. Bad input is always a 4xx: a 500 means a bug or a broken host.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read or parsed, or is inconsistent.
    #[error("config: {0}")]
    Config(String),
    /// Reading or writing a file of the server's own (data dir, keys, TLS material).
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// The sandbox host could not be prepared.
    #[error("preparing the host")]
    Host(#[source] ampoule_runtime::Error),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// The stable error codes of both APIs (the `code` field of an error body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
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
    /// The tenant has used its executions for this minute (`[tenants.NAME]
    /// executions_per_minute`); the `Retry-After` header says when to try again.
    RateLimited,
    /// The tenant may not use this pool (`[tenants.NAME] pools`).
    PoolNotAllowed,
    /// The tenant may not use this language (`[tenants.NAME] languages`).
    LanguageNotAllowed,
    /// The requested timeout is above the tenant's maximum (`[tenants.NAME] max_timeout_s`).
    TimeoutNotAllowed,
    /// The request is malformed (bad JSON, missing field, bad identifier).
    InvalidRequest,
    /// A file path is absolute, contains `..`, or is otherwise not a path below `/mnt/data`.
    InvalidPath,
    /// The path leads through a link (symbolic, or a file with other hard links), which is
    /// never followed.
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
    /// A sandbox could not be started, or its interpreter stopped answering.
    SandboxUnavailable,
    /// The server is shutting down.
    ShuttingDown,
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
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidPath => "invalid_path",
            ErrorCode::LinkRefused => "link_refused",
            ErrorCode::NotAFile => "not_a_file",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::SandboxUnavailable => "sandbox_unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code in the ACA dialect (the `x-ms-error-code` header and body code on the
    /// ACA-compatible routes), named like the codes the real service uses.
    pub fn aca_name(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::SessionNotFound => "SessionWithIdentifierNotFound",
            ErrorCode::PoolNotFound => "SessionPoolNotFound",
            ErrorCode::FileNotFound => "FileNotFound",
            ErrorCode::PoolFull | ErrorCode::TenantFull => "SessionPoolMaxSessionsReached",
            ErrorCode::RateLimited => "TooManyRequests",
            ErrorCode::PoolNotAllowed
            | ErrorCode::LanguageNotAllowed
            | ErrorCode::TimeoutNotAllowed => "Forbidden",
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidPath
            | ErrorCode::LinkRefused
            | ErrorCode::NotAFile => "SessionRequestValidationFailed",
            ErrorCode::PayloadTooLarge => "PayloadTooLarge",
            ErrorCode::NoSpace => "InsufficientStorage",
            ErrorCode::UnsupportedMediaType => "UnsupportedMediaType",
            ErrorCode::MethodNotAllowed => "MethodNotAllowed",
            ErrorCode::SandboxUnavailable => "SessionUnavailable",
            ErrorCode::ShuttingDown => "ServiceUnavailable",
            ErrorCode::Internal => "InternalServerError",
        }
    }

    /// The HTTP status on the native API.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NotFound
            | ErrorCode::SessionNotFound
            | ErrorCode::PoolNotFound
            | ErrorCode::FileNotFound => StatusCode::NOT_FOUND,
            ErrorCode::PoolFull | ErrorCode::TenantFull | ErrorCode::RateLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ErrorCode::PoolNotAllowed
            | ErrorCode::LanguageNotAllowed
            | ErrorCode::TimeoutNotAllowed => StatusCode::FORBIDDEN,
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidPath
            | ErrorCode::LinkRefused
            | ErrorCode::NotAFile => StatusCode::BAD_REQUEST,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::SandboxUnavailable | ErrorCode::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The HTTP status on the ACA-compatible API: as ACA, a full pool answers 404.
    pub fn aca_status(self) -> StatusCode {
        match self {
            ErrorCode::PoolFull | ErrorCode::TenantFull => StatusCode::NOT_FOUND,
            other => other.status(),
        }
    }
}

/// An error answered to a client: `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The stable code.
    pub code: ErrorCode,
    /// A message for the client.
    pub message: String,
    /// Answer in the ACA dialect (status mapping, code names, `x-ms-error-code`).
    pub aca: bool,
    /// Seconds after which the request may succeed (the `Retry-After` header).
    pub retry_after_s: Option<u64>,
}

/// The error body (schema for the OpenAPI document).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code.
    #[schema(value_type = String, example = "session_not_found")]
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// An error with a code and a message for the client.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            aca: false,
            retry_after_s: None,
        }
    }

    /// The same error, with a `Retry-After` header of `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_s = Some(secs);
        self
    }

    /// The same error, answered in the ACA dialect.
    pub fn in_aca(mut self) -> Self {
        self.aca = true;
        self
    }

    /// Logs `detail` (which may hold internals) and answers a bare internal error.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(ErrorCode::Internal, "internal error (see the server log)")
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub(crate) fn session_not_found() -> Self {
        Self::new(ErrorCode::SessionNotFound, "no such session")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = if self.aca {
            (self.code.aca_status(), self.code.aca_name())
        } else {
            (self.code.status(), self.code.as_str())
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: self.message,
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if self.aca {
            resp.headers_mut()
                .insert("x-ms-error-code", HeaderValue::from_static(code));
        }
        if let Some(secs) = self.retry_after_s {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<crate::engine::EngineError> for ApiError {
    fn from(e: crate::engine::EngineError) -> Self {
        use crate::engine::EngineError;
        match e {
            EngineError::Closed => Self::new(
                ErrorCode::SessionNotFound,
                "the session ended while the request was running",
            ),
            other => {
                tracing::warn!(error = %other, "sandbox engine");
                Self::new(
                    ErrorCode::SandboxUnavailable,
                    "the sandbox could not run the request; try again",
                )
            }
        }
    }
}

impl From<ampoule_runtime::scratch::FileError> for ApiError {
    fn from(e: ampoule_runtime::scratch::FileError) -> Self {
        use ampoule_runtime::scratch::FileError;
        match e {
            FileError::Invalid(msg) => Self::new(ErrorCode::InvalidPath, msg),
            FileError::NotFound(p) => Self::new(
                ErrorCode::FileNotFound,
                format!("no file {p:?} in the session"),
            ),
            e @ FileError::Link(_) => Self::new(ErrorCode::LinkRefused, e.to_string()),
            e @ FileError::NotAFile(_) => Self::new(ErrorCode::NotAFile, e.to_string()),
            e @ FileError::NoSpace => Self::new(ErrorCode::NoSpace, e.to_string()),
            e @ FileError::Io { .. } => Self::internal(e),
        }
    }
}
