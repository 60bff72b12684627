//! Errors: [`ApiError`], the one error type every HTTP handler answers with, and [`Error`],
//! what can go wrong while the server starts.
//!
//! The core answers its domain error ([`ampoule_core::Error`]); this module maps its stable
//! [`ErrorCode`] to an HTTP status, and to the ACA dialect on the ACA routes ([`status`],
//! [`aca_status`], [`aca_name`]). The doors add the codes only a transport can produce
//! (`unauthorized`, `not_found`, `method_not_allowed`, `unsupported_media_type`).
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

pub use ampoule_core::ErrorCode;

/// The HTTP status of a code on the native API.
pub fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized | ErrorCode::KeyExpired | ErrorCode::KeyRevoked => {
            StatusCode::UNAUTHORIZED
        }
        ErrorCode::AuthThrottled | ErrorCode::QuotaExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Denied | ErrorCode::NotAnApprover | ErrorCode::ApproverCannotSubmit => {
            StatusCode::FORBIDDEN
        }
        ErrorCode::ApprovalTimedOut => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::ApprovalNotFound => StatusCode::NOT_FOUND,
        ErrorCode::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
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
        // Well-formed requests that the session's state refuses: it runs another language, or
        // a directory (or a file) stands where the path needs the other.
        ErrorCode::LanguageMismatch | ErrorCode::NotAFile | ErrorCode::Conflict => {
            StatusCode::CONFLICT
        }
        ErrorCode::ContextNotFound | ErrorCode::ProcessNotFound => StatusCode::NOT_FOUND,
        ErrorCode::PortUnreachable => StatusCode::BAD_GATEWAY,
        ErrorCode::NotSupported => StatusCode::NOT_IMPLEMENTED,
        ErrorCode::InvalidRequest | ErrorCode::InvalidPath | ErrorCode::LinkRefused => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::NoSpace | ErrorCode::DiskQuotaExceeded => StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::SandboxUnavailable | ErrorCode::ShuttingDown | ErrorCode::ReplicaUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The code in the ACA dialect (the `x-ms-error-code` header and body code on the
/// ACA-compatible routes), named like the codes the real service uses.
pub fn aca_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Unauthorized | ErrorCode::KeyExpired | ErrorCode::KeyRevoked => "Unauthorized",
        ErrorCode::AuthThrottled | ErrorCode::QuotaExhausted => "TooManyRequests",
        ErrorCode::Denied | ErrorCode::NotAnApprover | ErrorCode::ApproverCannotSubmit => {
            "Forbidden"
        }
        ErrorCode::ApprovalTimedOut => "RequestTimeout",
        ErrorCode::ApprovalNotFound => "NotFound",
        ErrorCode::TooManyConnections => "ServiceUnavailable",
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
        | ErrorCode::LanguageMismatch
        | ErrorCode::InvalidPath
        | ErrorCode::LinkRefused
        | ErrorCode::NotAFile => "SessionRequestValidationFailed",
        ErrorCode::PayloadTooLarge => "PayloadTooLarge",
        ErrorCode::NoSpace | ErrorCode::DiskQuotaExceeded => "InsufficientStorage",
        ErrorCode::Conflict => "Conflict",
        ErrorCode::UnsupportedMediaType => "UnsupportedMediaType",
        ErrorCode::MethodNotAllowed => "MethodNotAllowed",
        ErrorCode::ContextNotFound | ErrorCode::ProcessNotFound => "NotFound",
        ErrorCode::PortUnreachable => "BadGateway",
        ErrorCode::NotSupported => "NotImplemented",
        ErrorCode::SandboxUnavailable => "SessionUnavailable",
        ErrorCode::ShuttingDown | ErrorCode::ReplicaUnavailable => "ServiceUnavailable",
        ErrorCode::Internal => "InternalServerError",
    }
}

/// The HTTP status on the ACA-compatible API: as ACA, a full pool answers 404.
pub fn aca_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::PoolFull | ErrorCode::TenantFull => StatusCode::NOT_FOUND,
        // ACA validates the request as a whole: these stay 400s there.
        ErrorCode::LanguageMismatch | ErrorCode::NotAFile => StatusCode::BAD_REQUEST,
        other => status(other),
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
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = if self.aca {
            (aca_status(self.code), aca_name(self.code))
        } else {
            (status(self.code), self.code.as_str())
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

impl From<ampoule_core::Error> for ApiError {
    fn from(e: ampoule_core::Error) -> Self {
        let mut out = Self::new(e.code(), e.to_string());
        out.retry_after_s = e.retry_after_s();
        out
    }
}
