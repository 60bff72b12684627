//! Connect RPC with the JSON codec, the little of it envd's clients use: unary calls
//! (`POST /<pkg.Service>/<Method>`, `application/json` in and out, errors as
//! `{"code","message"}` with the status the Connect protocol gives each code) and server
//! streams (`application/connect+json`: enveloped messages — one flag byte, a 4-byte
//! big-endian length, the JSON — ending with an end-of-stream envelope, flag `0x02`, holding
//! `{}` or `{"error":{…}}`; always HTTP 200, errors included).
//!
//! Written by hand: the Rust Connect implementations (connectrpc for tonic/axum) want
//! generated protobuf types and the binary codec, where E2B's SDKs speak the JSON codec
//! with messages this door builds with `serde_json`. The framing is twenty lines; a
//! generated stack for eight messages is not worth its weight.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Value, json};

use crate::error::ErrorCode;

/// Flag of the end-of-stream envelope.
const END_STREAM: u8 = 0x02;

/// A Connect error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// `invalid_argument`.
    InvalidArgument,
    /// `not_found`.
    NotFound,
    /// `already_exists`.
    AlreadyExists,
    /// `permission_denied`.
    PermissionDenied,
    /// `resource_exhausted`.
    ResourceExhausted,
    /// `failed_precondition`.
    FailedPrecondition,
    /// `deadline_exceeded`.
    DeadlineExceeded,
    /// `unimplemented`.
    Unimplemented,
    /// `internal`.
    Internal,
    /// `unavailable`.
    Unavailable,
    /// `unauthenticated`.
    Unauthenticated,
}

impl Code {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code (the Connect protocol's table).
    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A Connect error.
#[derive(Debug, Clone)]
pub struct RpcError {
    /// Its code.
    pub code: Code,
    /// For a person.
    pub message: String,
}

impl RpcError {
    /// An error with a code and a message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// The error as its JSON object.
    pub fn to_json(&self) -> Value {
        json!({"code": self.code.as_str(), "message": self.message})
    }
}

/// The Connect code of each of the core's codes.
pub fn code_of(code: ErrorCode) -> Code {
    match code {
        ErrorCode::Unauthorized | ErrorCode::KeyExpired | ErrorCode::KeyRevoked => {
            Code::Unauthenticated
        }
        ErrorCode::NotFound
        | ErrorCode::SessionNotFound
        | ErrorCode::PoolNotFound
        | ErrorCode::FileNotFound
        | ErrorCode::ContextNotFound
        | ErrorCode::ProcessNotFound => Code::NotFound,
        ErrorCode::PoolFull
        | ErrorCode::TenantFull
        | ErrorCode::RateLimited
        | ErrorCode::AuthThrottled
        | ErrorCode::QuotaExhausted
        | ErrorCode::PayloadTooLarge
        | ErrorCode::NoSpace
        | ErrorCode::DiskQuotaExceeded => Code::ResourceExhausted,
        ErrorCode::Conflict => Code::FailedPrecondition,
        ErrorCode::PoolNotAllowed
        | ErrorCode::LanguageNotAllowed
        | ErrorCode::TimeoutNotAllowed
        | ErrorCode::Denied
        | ErrorCode::NotAnApprover
        | ErrorCode::ApproverCannotSubmit => Code::PermissionDenied,
        ErrorCode::ApprovalTimedOut => Code::DeadlineExceeded,
        ErrorCode::ApprovalNotFound => Code::NotFound,
        ErrorCode::LanguageMismatch
        | ErrorCode::InvalidRequest
        | ErrorCode::InvalidPath
        | ErrorCode::LinkRefused
        | ErrorCode::NotAFile
        | ErrorCode::UnsupportedMediaType
        | ErrorCode::MethodNotAllowed => Code::InvalidArgument,
        ErrorCode::NotSupported => Code::Unimplemented,
        ErrorCode::PortUnreachable
        | ErrorCode::SandboxUnavailable
        | ErrorCode::ShuttingDown
        | ErrorCode::ReplicaUnavailable
        | ErrorCode::TooManyConnections => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
    }
}

impl From<ampoule_core::Error> for RpcError {
    fn from(e: ampoule_core::Error) -> Self {
        let api = crate::ApiError::from(e);
        Self::new(code_of(api.code), api.message)
    }
}

impl From<super::E2bError> for RpcError {
    fn from(e: super::E2bError) -> Self {
        let code = match e.status {
            StatusCode::NOT_FOUND => Code::NotFound,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::FORBIDDEN => Code::PermissionDenied,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => {
                Code::ResourceExhausted
            }
            StatusCode::NOT_IMPLEMENTED => Code::Unimplemented,
            s if s.is_server_error() => Code::Internal,
            _ => Code::InvalidArgument,
        };
        Self::new(code, e.message)
    }
}

impl IntoResponse for RpcError {
    /// A unary error response.
    fn into_response(self) -> Response {
        (self.code.status(), axum::Json(self.to_json())).into_response()
    }
}

/// A unary answer: the message, or the error.
pub fn unary(result: Result<Value, RpcError>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// One enveloped message.
pub fn envelope(flags: u8, msg: &Value) -> Bytes {
    let json = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = BytesMut::with_capacity(5 + json.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(json.len()).unwrap_or(u32::MAX));
    out.put_slice(&json);
    out.freeze()
}

/// A stream message.
pub fn message(msg: &Value) -> Bytes {
    envelope(0, msg)
}

/// The end of a stream: `{}`, or the error that ended it.
pub fn end(error: Option<&RpcError>) -> Bytes {
    match error {
        None => envelope(END_STREAM, &json!({})),
        Some(e) => envelope(END_STREAM, &json!({"error": e.to_json()})),
    }
}

/// A server-stream response whose body is `frames`.
pub fn stream_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/connect+json"),
    );
    resp
}

/// A server stream that ends at once with an error (before any message).
pub fn stream_error(e: &RpcError) -> Response {
    stream_response(Body::from(end(Some(e))))
}

/// Whether a request is a streaming call (`application/connect+json`).
pub fn is_streaming(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim()
                .to_ascii_lowercase()
                .starts_with("application/connect+")
        })
}

/// The request message of a call: the JSON body of a unary call, or the single enveloped
/// message of a server-streaming call. An empty body is `{}`.
pub fn request_message(body: &[u8], streaming: bool) -> Result<Value, RpcError> {
    let json = if streaming {
        let Some((&flags, rest)) = body.split_first() else {
            return Ok(json!({}));
        };
        if flags & 0x01 != 0 {
            return Err(RpcError::new(
                Code::Unimplemented,
                "compressed messages are not supported (send them uncompressed)",
            ));
        }
        let len = rest
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| RpcError::invalid("truncated envelope"))?;
        rest.get(4..4 + len)
            .ok_or_else(|| RpcError::invalid("truncated envelope"))?
    } else {
        body
    };
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(json)
        .map_err(|e| RpcError::invalid(format!("the request is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(RpcError::invalid("the request must be a JSON object"));
    }
    Ok(v)
}

/// The client's deadline (`Connect-Timeout-Ms`), in seconds.
pub fn timeout_s(headers: &HeaderMap) -> Option<f64> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(|ms| ms as f64 / 1000.0)
}

/// How often to send keep-alive messages on a stream: what the client asks
/// (`Keepalive-Ping-Interval`, seconds), at most every 50 s and at least every 1 s.
pub fn keepalive(headers: &HeaderMap) -> std::time::Duration {
    let secs = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(50)
        .clamp(1, 50);
    std::time::Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let m = message(&json!({"a": 1}));
        assert_eq!(m[0], 0);
        assert_eq!(&m[1..5], &7u32.to_be_bytes());
        assert_eq!(request_message(&m, true).unwrap(), json!({"a": 1}));
        let e = end(Some(&RpcError::new(Code::NotFound, "gone")));
        assert_eq!(e[0], 2);
        let v: Value = serde_json::from_slice(&e[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(request_message(b"", true).unwrap(), json!({}));
        assert!(request_message(&[0, 0, 0, 0, 9, b'{'], true).is_err());
        assert!(request_message(b"[1]", false).is_err());
    }
}
