//! The HTTP side of file transfer, shared by the doors: the files themselves are the core's
//! (`put_file`, `get_file`, …, which resolve every path beneath `/mnt/data` without following
//! links); this module adds
//! - upload limits: a body whose `Content-Length` is over the limit is refused before any of it
//!   is read, and a body that grows over it is cut off (413, and nothing is left behind);
//! - multipart bodies, parsed whatever the `Content-Type` says: when it names no boundary,
//!   the boundary is read from the body's first line (Semantic Kernel sends multipart with
//!   `Content-Type: application/json`);
//! - downloads streamed as a response body, never held in memory whole.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use ampoule_core::{Caller, Download, FileInfo, Manager, PutFile, SessionInfo, Target};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncReadExt;

use crate::error::{ApiError, ErrorCode};

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("the upload is larger than the {max}-byte limit"),
    )
}

/// Refuses a body whose announced length is over the limit before reading any of it.
pub fn check_content_length(headers: &HeaderMap, max: u64) -> Result<(), ApiError> {
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match len {
        Some(n) if n > max => Err(too_large(max)),
        _ => Ok(()),
    }
}

/// The body as a stream of chunks that fails once more than `max` bytes went through, and
/// records that it did in `over` (so a caller can tell a limit from a broken connection even
/// through a parser that wraps the error).
fn limited(
    body: Body,
    max: u64,
    over: Arc<AtomicBool>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let mut seen: u64 = 0;
    body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen = seen.saturating_add(chunk.len() as u64);
        if seen > max {
            over.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other("upload over the size limit"));
        }
        Ok(chunk)
    })
}

/// A core refusal of an upload, or 413 when the body went over the limit (which the core
/// sees as a body cut short).
fn upload_error(e: ampoule_core::Error, over: &AtomicBool, max: u64) -> ApiError {
    if over.load(Ordering::SeqCst) {
        too_large(max)
    } else {
        e.into()
    }
}

/// Writes a raw request body to `path` in `target` (the native `PUT .../files/{path}`).
pub async fn upload_raw(
    manager: &Manager,
    caller: &Caller,
    target: Target,
    path: &str,
    body: Body,
    max: u64,
) -> Result<FileInfo, ApiError> {
    let over = Arc::new(AtomicBool::new(false));
    let cmd = PutFile {
        target,
        path: path.to_owned(),
        body: Box::pin(limited(body, max, over.clone())),
        max,
    };
    match manager.put_file(caller, cmd).await {
        Ok((_, info)) => Ok(info),
        Err(e) => Err(upload_error(e, &over, max)),
    }
}

/// Finds the multipart boundary: from the `Content-Type` when it is multipart, else from the
/// body's first line (`--boundary\r\n`). Returns the boundary and the body with what was read
/// put back in front.
async fn sniff_boundary<S>(
    headers: &HeaderMap,
    mut stream: S,
) -> Result<
    (
        String,
        impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ),
    ApiError,
>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + 'static,
{
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/")
        })
        .and_then(|ct| multer::parse_boundary(ct).ok());
    let mut head = Vec::new();
    let boundary = match declared {
        Some(b) => b,
        None => {
            // A boundary is at most 70 characters: its line fits in the first 128 bytes.
            while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 128 {
                match stream.next().await {
                    Some(Ok(chunk)) => head.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        return Err(ApiError::invalid(format!("reading the body: {e}")));
                    }
                    None => break,
                }
            }
            let line_end = head.windows(2).position(|w| w == b"\r\n");
            let boundary = line_end
                .map(|end| &head[..end])
                .and_then(|line| line.strip_prefix(b"--"))
                .map(|b| b.trim_ascii_end())
                .filter(|b| {
                    (1..=70).contains(&b.len())
                        && b.iter().all(|c| c.is_ascii_graphic() || *c == b' ')
                })
                .and_then(|b| std::str::from_utf8(b).ok())
                .map(str::to_owned);
            match boundary {
                Some(b) => b,
                None => {
                    return Err(ApiError::new(
                        ErrorCode::UnsupportedMediaType,
                        "expected a multipart/form-data body with a `file` part",
                    ));
                }
            }
        }
    };
    let head = futures_util::stream::iter(
        (!head.is_empty()).then(|| Ok::<_, std::io::Error>(Bytes::from(head))),
    );
    Ok((boundary, head.chain(stream)))
}

/// A directory named by a client (`?path=`) as a path relative to `/mnt/data` (`""` for
/// `/mnt/data` itself). Absolute paths elsewhere and `..` are refused.
pub fn data_dir_param(dir: &str) -> Result<String, ApiError> {
    Ok(ampoule_core::files::data_dir(dir)?)
}

/// Target path of an uploaded part: its file name (which clients use as the destination,
/// sometimes as `/mnt/data/name`), below `dir` when one is given.
fn part_target(dir: Option<&str>, file_name: &str) -> Result<String, ApiError> {
    // requests/httpx send `"` in a file name as `%22`.
    let name = file_name.replace("%22", "\"");
    match dir
        .map(data_dir_param)
        .transpose()?
        .filter(|d| !d.is_empty())
    {
        Some(d) => Ok(format!("{d}/{}", name.trim_start_matches("/mnt/data/"))),
        None => Ok(name),
    }
}

/// What an upload does with a form field that is not a file (a part without a file name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormFields {
    /// Skips it: ACA clients send such fields.
    Ignore,
    /// Refuses the upload, as `/v1` documents (its form has file parts only).
    Refuse,
}

/// Stores every file part of a multipart body in `target` (ACA `files/upload`, native
/// `POST files`): one core `put_file` per part.
#[allow(clippy::too_many_arguments)]
pub async fn upload_multipart(
    manager: &Manager,
    caller: &Caller,
    target: Target,
    dir: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    max: u64,
    fields: FormFields,
) -> Result<Vec<FileInfo>, ApiError> {
    check_content_length(headers, max)?;
    let over = Arc::new(AtomicBool::new(false));
    let stream = Box::pin(limited(body, max, over.clone()));
    let (boundary, stream) = match sniff_boundary(headers, stream).await {
        Ok(x) => x,
        Err(_) if over.load(Ordering::SeqCst) => return Err(too_large(max)),
        Err(e) => return Err(e),
    };
    let mut parts = multer::Multipart::new(stream, boundary);
    let malformed = |over: &AtomicBool, e: multer::Error| {
        if over.load(Ordering::SeqCst) {
            too_large(max)
        } else {
            ApiError::invalid(format!("malformed multipart body: {e}"))
        }
    };
    let mut stored = Vec::new();
    loop {
        let field = match parts.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(malformed(&over, e)),
        };
        let Some(file_name) = field.file_name().map(str::to_owned) else {
            if fields == FormFields::Refuse {
                return Err(ApiError::invalid(format!(
                    "form field {:?} is not a file (a part with a file name)",
                    field.name().unwrap_or_default()
                )));
            }
            // Form fields without a file name carry nothing to store.
            continue;
        };
        let path = part_target(dir, &file_name)?;
        // A broken part is told apart from a limit by `over`, and from a malformed body
        // by what multer said, kept here.
        let broken: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let seen = broken.clone();
        let part = field.map(move |c| {
            c.map_err(|e| {
                if let Ok(mut b) = seen.lock() {
                    *b = Some(e.to_string());
                }
                std::io::Error::other("malformed part")
            })
        });
        let cmd = PutFile {
            target: target.clone(),
            path,
            body: Box::pin(part),
            max,
        };
        match manager.put_file(caller, cmd).await {
            Ok((_, info)) => stored.push(info),
            Err(_) if over.load(Ordering::SeqCst) => return Err(too_large(max)),
            Err(e) => {
                let why = broken.lock().ok().and_then(|mut b| b.take());
                return Err(match why {
                    Some(why) => ApiError::invalid(format!("malformed multipart body: {why}")),
                    None => e.into(),
                });
            }
        }
    }
    if stored.is_empty() {
        return Err(ApiError::invalid(
            "the multipart body has no file part (a part with a file name, field `file`)",
        ));
    }
    Ok(stored)
}

/// A file the core opened, streamed as the response body.
pub fn download(d: Download) -> Response {
    let Download { file, info, .. } = d;
    let size = info.size;
    // Sandboxed code may grow the file meanwhile: never send more than announced.
    let reader = tokio::fs::File::from_std(file).take(size);
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match r.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), r))
            }
            Err(e) => Some((Err(e), r)),
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(mime_for(&info.path)),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    resp
}

/// When a session expires if left idle, as RFC 3339.
pub fn expires(s: &SessionInfo) -> String {
    rfc3339(s.expires_at)
}

/// A MIME type guessed from the file name.
pub fn mime_for(path: &str) -> &'static str {
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" => "text/plain; charset=utf-8",
        "csv" => "text/csv",
        "tsv" => "text/tab-separated-values",
        "json" => "application/json",
        "html" | "htm" => "text/html",
        "md" => "text/markdown",
        "py" => "text/x-python",
        "js" => "text/javascript",
        "xml" => "application/xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        "zip" | "whl" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "parquet" => "application/vnd.apache.parquet",
        _ => "application/octet-stream",
    }
}

/// RFC 3339 UTC with 7 fractional digits, as ACA writes `lastModifiedTime`
/// (`2024-05-02T07:21:07.9922617Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:07}Z",
        d.subsec_nanos() / 100
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_look_like_aca() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_714_634_467, 992_261_700);
        assert_eq!(rfc3339(t), "2024-05-02T07:21:07.9922617Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.0000000Z"
        );
    }

    #[test]
    fn part_names_become_paths_below_mnt_data() {
        let t = |d, n| part_target(d, n).unwrap();
        assert_eq!(t(None, "/mnt/data/data.csv"), "/mnt/data/data.csv");
        assert_eq!(t(Some("/mnt/data"), "a.txt"), "a.txt");
        assert_eq!(t(Some("/mnt/data/sub"), "/mnt/data/a.txt"), "sub/a.txt");
        assert_eq!(t(Some("sub/"), "a.txt"), "sub/a.txt");
        assert_eq!(t(None, "say %22hi%22.txt"), "say \"hi\".txt");
        for bad in ["/etc", "/mnt/database", "../x", "/mnt/data/../etc"] {
            assert!(part_target(Some(bad), "a").is_err(), "{bad}");
        }
    }
}
