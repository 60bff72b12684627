//! The gateway's own HTTP client, for what it fetches on the host's behalf: OAuth tokens
//! (`mint.rs`) and the package index (`packages.rs`).
//!
//! These requests are the operator's, not the sandbox's: they go to URLs from the server's
//! configuration (or links a configured index gave), from the supervisor's network namespace,
//! and never through a sandbox's link or its policy. Names are resolved like the gateway's
//! (the operator's pins, then the system resolver); HTTPS is verified against the same trust
//! as intercepted TLS (the system store plus the operator's extra CAs). One request per
//! connection, no redirects followed, bodies read whole only up to a cap.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

use crate::Shared;
use crate::policy::Target;

/// How long connecting, sending and receiving the head of a response may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long reading a whole (capped) body may take.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) https: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path and query, at least `/`.
    pub(crate) path: String,
}

impl Endpoint {
    /// Parses an absolute `http` or `https` URL.
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{url:?} is not an http or https URL")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("{url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if Target::parse(&host).is_none() {
            return Err(format!("{url:?}: {host:?} is not a valid host"));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!("{url:?}: credentials in a URL are not supported"));
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        Ok(Self {
            https,
            host,
            port,
            path,
        })
    }

    /// The `Host` header's value.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.https, self.port) {
            (true, 443) | (false, 80) => host,
            _ => format!("{host}:{}", self.port),
        }
    }

    /// The URL again.
    pub(crate) fn url(&self) -> String {
        format!(
            "{}://{}{}",
            if self.https { "https" } else { "http" },
            self.authority(),
            self.path
        )
    }

    /// `path` (absolute, or relative to this URL's path) on the same scheme and host, or an
    /// absolute URL.
    pub(crate) fn join(&self, reference: &str) -> Result<Self, String> {
        if reference.starts_with("http://") || reference.starts_with("https://") {
            return Self::parse(reference);
        }
        if let Some(rest) = reference.strip_prefix("//") {
            return Self::parse(&format!(
                "{}://{rest}",
                if self.https { "https" } else { "http" }
            ));
        }
        let path = if reference.starts_with('/') {
            reference.to_owned()
        } else {
            let base = self.path.split(['?', '#']).next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            let full = format!("{dir}{reference}");
            let mut parts: Vec<&str> = Vec::new();
            for seg in full.split('/') {
                match seg {
                    ".." => {
                        parts.pop();
                    }
                    "." => {}
                    s => parts.push(s),
                }
            }
            let joined = parts.join("/");
            if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        };
        Self::parse(&format!(
            "{}://{}{}",
            if self.https { "https" } else { "http" },
            self.authority(),
            path
        ))
    }
}

/// Sends one request and answers the response with its body unread. `body` is sent with
/// `Content-Type: content_type` when given.
pub(crate) async fn send(
    shared: &Shared,
    method: Method,
    to: &Endpoint,
    headers: HeaderMap,
    body: Option<(&'static str, Bytes)>,
) -> Result<Response<Incoming>, String> {
    tokio::time::timeout(HEAD_TIMEOUT, send_inner(shared, method, to, headers, body))
        .await
        .map_err(|_| format!("{} did not answer within {HEAD_TIMEOUT:?}", to.url()))?
}

async fn send_inner(
    shared: &Shared,
    method: Method,
    to: &Endpoint,
    headers: HeaderMap,
    body: Option<(&'static str, Bytes)>,
) -> Result<Response<Incoming>, String> {
    let target = Target::parse(&to.host).ok_or_else(|| format!("bad host {:?}", to.host))?;
    let resolved = shared
        .resolver
        .resolve(&target)
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", to.host))?;
    let (tcp, _) = crate::proxy::connect(&resolved.addrs, to.port)
        .await
        .map_err(|e| format!("connecting to {}: {e}", to.authority()))?;
    let _ = tcp.set_nodelay(true);
    let mut req = Request::builder()
        .method(method)
        .uri(to.path.as_str())
        .header(http::header::HOST, to.authority())
        .header(http::header::USER_AGENT, "ampoule-egress");
    if let Some(h) = req.headers_mut() {
        h.extend(headers);
    }
    let (content_type, bytes) = body.unwrap_or(("", Bytes::new()));
    if !content_type.is_empty() {
        req = req.header(http::header::CONTENT_TYPE, content_type);
    }
    let req = req
        .body(Full::new(bytes))
        .map_err(|e| format!("building the request: {e}"))?;
    if to.https {
        let name = ServerName::try_from(to.host.clone())
            .map_err(|e| format!("bad server name {:?}: {e}", to.host))?;
        let cfg = shared.upstream.config().map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", to.authority()))?;
        exchange(tls, req).await
    } else {
        exchange(tcp, req).await
    }
}

async fn exchange<S>(stream: S, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "host-side HTTP connection ended");
        }
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP request: {e}"))
}

/// Reads a whole body, refusing more than `max` bytes.
pub(crate) async fn read_body(resp: Response<Incoming>, max: usize) -> Result<Bytes, String> {
    let collect = Limited::new(resp.into_body(), max).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) => Err(format!("reading the response: {e}")),
        Err(_) => Err("reading the response took too long".into()),
    }
}

/// A short, printable excerpt of an error body (never more than 200 characters).
pub(crate) fn excerpt(status: StatusCode, body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control() || *c == ' ')
        .take(200)
        .collect();
    format!("{status} {}", text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_join() {
        let e = Endpoint::parse("https://PyPI.org/simple").unwrap();
        assert_eq!(
            e,
            Endpoint {
                https: true,
                host: "pypi.org".into(),
                port: 443,
                path: "/simple".into()
            }
        );
        assert_eq!(e.url(), "https://pypi.org/simple");
        let e = Endpoint::parse("http://index.test:8080/simple/").unwrap();
        assert_eq!(e.port, 8080);
        assert_eq!(e.url(), "http://index.test:8080/simple/");
        let page = e.join("tinyok/").unwrap();
        assert_eq!(page.path, "/simple/tinyok/");
        let file = page.join("../../packages/t/tinyok-1.0.whl").unwrap();
        assert_eq!(
            file.url(),
            "http://index.test:8080/packages/t/tinyok-1.0.whl"
        );
        assert_eq!(
            page.join("/p/x.whl").unwrap().url(),
            "http://index.test:8080/p/x.whl"
        );
        assert_eq!(
            page.join("https://files.example/p/x.whl").unwrap().url(),
            "https://files.example/p/x.whl"
        );
        assert_eq!(
            page.join("//files.example/p/x.whl").unwrap().url(),
            "http://files.example/p/x.whl"
        );
        for bad in [
            "ftp://x.test/",
            "/relative",
            "http://user:pw@x.test/",
            "http://bad host/",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
