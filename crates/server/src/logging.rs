//! Logs: human-readable text (the default) or one JSON object per line (`--log-format json`,
//! `AMPOULE_LOG_FORMAT=json`), on stderr, filtered by `AMPOULE_LOG` (default `warn`;
//! `info` adds one line per request and per execution).
//!
//! Every HTTP request runs in a `request` span carrying `request_id` (the caller's
//! `X-Request-Id` when it is short and printable, else a generated `req_…`, echoed in the
//! response), `method`, `path` and, once the manager knows it, `session`; every execution in
//! an `execution` span carrying `execution` (the id its audit record has) and `session`. In
//! JSON each line carries its spans' fields (`span` and `spans`), so a log line, an audit
//! record and a client's request can be matched by id.

use std::str::FromStr;

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line, span fields included.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (text, json)")),
        }
    }
}

/// A subscriber writing `format` lines that pass `filter` to `writer`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    }
}

/// Installs the process's subscriber: `format` on stderr, filtered by `AMPOULE_LOG`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("AMPOULE_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    // Only fails when a subscriber is already installed, which then stays.
    let _ = tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr));
}

/// The request id of a request: the caller's `X-Request-Id` when it is 1–128 printable
/// ASCII characters, else a fresh `req_…`.
pub fn request_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(
            || format!("req_{}", crate::manager::random_hex(12)),
            str::to_owned,
        )
}
