//! Pulling from a registry: the read side of the OCI distribution protocol.
//!
//! `GET /v2/<repo>/manifests/<tag|digest>` (index → this host's manifest), then each blob not
//! stored yet with `GET /v2/<repo>/blobs/<digest>` (following redirects, without credentials
//! to another host), every one streamed through its digest check into the store. Auth: none,
//! the `Bearer` token dance (anonymous, or Basic credentials to the token realm), or `Basic`.
//! HTTPS with the system's CA bundle (plus `SSL_CERT_FILE`); plain HTTP only when asked and
//! only to a loopback registry.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::import::Imported;
use crate::name::{ImageName, Reference, Target};
use crate::oci::{Descriptor, Document, MANIFEST_ACCEPT, pick_manifest};
use crate::store::{Lock, Store};

/// A user name and password (or token) for a registry.
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, ***)", self.username)
    }
}

/// Reads the credentials for `registry` from a Docker-style `config.json`
/// (`{"auths": {"HOST": {"auth": base64("user:password")}}}`, or `username`/`password`
/// fields); `None` when the file names no entry for it.
pub fn credentials_from_file(path: &Path, registry: &str) -> Result<Option<Credentials>> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let file: File = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
    let entry = file.auths.into_iter().find(|(k, _)| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next() == Some(registry)
    });
    let Some((_, e)) = entry else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (e.username, e.password) {
        return Ok(Some(Credentials {
            username: u,
            password: p,
        }));
    }
    let Some(auth) = e.auth else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| Error::format(format!("{}: `auth` is not base64", path.display())))?;
    let decoded = String::from_utf8(decoded)
        .map_err(|_| Error::format(format!("{}: `auth` is not UTF-8", path.display())))?;
    let (u, p) = decoded
        .split_once(':')
        .ok_or_else(|| Error::format(format!("{}: `auth` is not user:password", path.display())))?;
    Ok(Some(Credentials {
        username: u.to_owned(),
        password: p.to_owned(),
    }))
}

/// How to pull.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Plain HTTP (loopback registries only).
    pub insecure: bool,
    /// Credentials for the registry.
    pub credentials: Option<Credentials>,
}

/// What a pull reports as it goes, for a progress bar.
#[derive(Clone, Debug)]
pub enum Event {
    /// The manifest is known: this many blobs, this many bytes in all.
    Manifest {
        /// The manifest's digest.
        digest: Digest,
        /// Bytes of config and layers.
        total: u64,
    },
    /// A blob was already stored (its bytes count as done).
    Cached(u64),
    /// Bytes of a blob arrived.
    Bytes(u64),
    /// Every blob is stored; the root is being unpacked.
    Unpacking,
}

/// Whether `host` (`name[:port]`) is a loopback address.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
}

struct Client {
    registry: String,
    scheme: &'static str,
    credentials: Option<Credentials>,
    /// The `Authorization` value that worked, reused for every later request.
    auth: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: hyper::body::Incoming,
}

impl Client {
    fn err(&self, why: impl Into<String>) -> Error {
        Error::Registry {
            registry: self.registry.clone(),
            why: why.into(),
        }
    }

    /// One request on a fresh connection to `uri`'s host.
    async fn send(&self, uri: &Uri, accept: Option<&str>, auth: Option<&str>) -> Result<Response> {
        let host = uri
            .host()
            .ok_or_else(|| self.err(format!("no host in {uri}")))?;
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)),
        )
        .await
        .map_err(|_| self.err(format!("connecting to {host}:{port} timed out")))?
        .map_err(|e| self.err(format!("connecting to {host}:{port}: {e}")))?;
        let authority = uri.authority().map_or(host, |a| a.as_str()).to_owned();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(header::HOST, &authority)
            .header(
                header::USER_AGENT,
                concat!("ampoule/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.err(format!("building a request: {e}")))?;
        macro_rules! exchange {
            ($io:expr) => {{
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new($io))
                    .await
                    .map_err(|e| self.err(format!("HTTP handshake: {e}")))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
                    .send_request(req)
                    .await
                    .map_err(|e| self.err(format!("GET {uri}: {e}")))?
            }};
        }
        let resp = if https {
            let tls = self
                .tls
                .clone()
                .ok_or_else(|| self.err("no TLS configuration"))?;
            let name = rustls_pki_types::ServerName::try_from(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            )
            .map_err(|e| self.err(format!("server name {host}: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| self.err(format!("TLS with {host}: {e}")))?;
            exchange!(stream)
        } else {
            exchange!(tcp)
        };
        let (parts, body) = resp.into_parts();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    fn url(&self, path: &str) -> Result<Uri> {
        format!("{}://{}{path}", self.scheme, self.registry)
            .parse()
            .map_err(|e| self.err(format!("bad URL for {path}: {e}")))
    }

    /// GET a registry path, authenticating on a 401 and following redirects (credentials go
    /// only to the registry itself).
    async fn get(&mut self, path: &str, accept: Option<&str>) -> Result<Response> {
        let mut uri = self.url(path)?;
        let mut tried_auth = false;
        for _ in 0..6 {
            let own = uri.authority().map(|a| a.as_str()) == Some(self.registry.as_str());
            let auth = if own { self.auth.clone() } else { None };
            let resp = self.send(&uri, accept, auth.as_deref()).await?;
            match resp.status {
                StatusCode::UNAUTHORIZED if own && !tried_auth => {
                    tried_auth = true;
                    let challenge = resp
                        .headers
                        .get(header::WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    self.authenticate(&challenge).await?;
                }
                s if s.is_redirection() => {
                    let loc = resp
                        .headers
                        .get(header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .ok_or_else(|| self.err("a redirect without Location"))?;
                    uri = if loc.starts_with('/') {
                        self.url(loc)?
                    } else {
                        loc.parse()
                            .map_err(|e| self.err(format!("bad redirect {loc:?}: {e}")))?
                    };
                    if uri.scheme_str() == Some("http")
                        && !is_loopback(uri.authority().map_or("", |a| a.as_str()))
                    {
                        return Err(self.err(format!("refusing a redirect to plain HTTP: {loc}")));
                    }
                }
                _ => return Ok(resp),
            }
        }
        Err(self.err(format!("too many redirects or auth rounds for {path}")))
    }

    async fn authenticate(&mut self, challenge: &str) -> Result<()> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let basic = self.credentials.as_ref().map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )
        });
        if scheme.eq_ignore_ascii_case("basic") {
            self.auth = Some(basic.ok_or_else(|| {
                self.err("the registry wants a user name and password (--credentials FILE)")
            })?);
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(self.err(format!("unsupported authentication {challenge:?}")));
        }
        let p = parse_params(params);
        let realm = p
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| self.err("a Bearer challenge without a realm"))?;
        let mut query = Vec::new();
        for key in ["service", "scope"] {
            if let Some((_, v)) = p.iter().find(|(k, _)| k == key) {
                query.push(format!(
                    "{key}={}",
                    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                ));
            }
        }
        let sep = if realm.contains('?') { '&' } else { '?' };
        let url = format!("{realm}{sep}{}", query.join("&"));
        let uri: Uri = url
            .parse()
            .map_err(|e| self.err(format!("bad token realm {realm:?}: {e}")))?;
        if uri.scheme_str() != Some("https")
            && !is_loopback(uri.authority().map_or("", |a| a.as_str()))
        {
            return Err(self.err(format!("refusing a token realm over plain HTTP: {realm}")));
        }
        let resp = self.send(&uri, None, basic.as_deref()).await?;
        if !resp.status.is_success() {
            return Err(self.err(format!("the token service answered {}", resp.status)));
        }
        let body = read_body(resp.body, 1 << 20)
            .await
            .map_err(|e| self.err(format!("reading the token: {e}")))?;
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| self.err(format!("bad token answer: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .ok_or_else(|| self.err("the token answer has no token"))?;
        self.auth = Some(format!("Bearer {token}"));
        Ok(())
    }

    /// A manifest or index by tag or digest: its bytes (bounded), verified digest and type.
    async fn manifest(
        &mut self,
        repo: &str,
        target: &str,
    ) -> Result<(Vec<u8>, Digest, Option<String>)> {
        let resp = self
            .get(
                &format!("/v2/{repo}/manifests/{target}"),
                Some(MANIFEST_ACCEPT),
            )
            .await?;
        if !resp.status.is_success() {
            return Err(self.err(format!("manifest {repo}:{target}: {}", resp.status)));
        }
        let ctype = resp
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let said = resp
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_body(resp.body, 4 << 20)
            .await
            .map_err(|e| self.err(format!("reading manifest {repo}:{target}: {e}")))?;
        let digest = Digest::of(&body);
        let expect = target
            .parse::<Digest>()
            .ok()
            .or_else(|| said.and_then(|s| s.parse().ok()));
        if let Some(want) = expect
            && want != digest
        {
            return Err(Error::DigestMismatch {
                what: format!("manifest {repo}:{target}"),
                expected: want.to_string(),
                actual: digest.to_string(),
            });
        }
        Ok((body, digest, ctype))
    }
}

async fn read_body(
    mut body: hyper::body::Incoming,
    max: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(format!("more than {max} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// `k="v", k2=v2` of a challenge.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while let Some((k, after)) = rest.split_once('=') {
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.push((k, v.to_owned()));
        rest = next.trim_start_matches([',', ' ']);
    }
    out
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let mut files: Vec<std::path::PathBuf> = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .filter(|p| p.exists())
    .take(1)
    .collect();
    if let Some(extra) = std::env::var_os("SSL_CERT_FILE") {
        files.push(extra.into());
    }
    for f in files {
        if let Ok(iter) = CertificateDer::pem_file_iter(&f) {
            roots.add_parsable_certificates(iter.filter_map(std::result::Result::ok));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::format(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Pulls `reference` into the store as `name`, reporting progress to `progress`.
pub async fn pull(
    store: &Store,
    lock: &Lock,
    reference: &Reference,
    name: &ImageName,
    options: &PullOptions,
    progress: &mut (dyn FnMut(Event) + Send),
) -> Result<Imported> {
    if options.insecure && !is_loopback(&reference.registry) {
        return Err(Error::Registry {
            registry: reference.registry.clone(),
            why: "--insecure (plain HTTP) is allowed only for a registry on loopback".into(),
        });
    }
    let mut client = Client {
        registry: reference.registry.clone(),
        scheme: if options.insecure { "http" } else { "https" },
        credentials: options.credentials.clone(),
        auth: None,
        tls: if options.insecure {
            None
        } else {
            Some(tls_config()?)
        },
    };
    let repo = reference.repo.as_str();
    let (mut bytes, mut digest, mut ctype) = client.manifest(repo, &reference.target_str()).await?;
    let manifest = loop {
        match Document::parse(&bytes, ctype.as_deref())? {
            Document::Manifest(m) => break m,
            Document::Index(i) => {
                store.put_bytes(&bytes)?;
                let d = pick_manifest(&i)?.digest.to_string();
                (bytes, digest, ctype) = client.manifest(repo, &d).await?;
            }
        }
    };
    if let Target::Digest(want) = &reference.target {
        // A digest reference names the index or the manifest; both were checked on arrival.
        tracing::debug!(%want, manifest = %digest, "pulled by digest");
    }
    let stored = store.put_bytes(&bytes)?;
    debug_assert_eq!(stored, digest);
    let blobs: Vec<&Descriptor> = std::iter::once(&manifest.config)
        .chain(manifest.layers.iter())
        .collect();
    // A manifest may declare any size: what it declares is downloaded, so it is bounded like
    // what it would unpack to.
    let declared: u64 = blobs.iter().map(|d| d.size).fold(0, u64::saturating_add);
    let budget = store.limits().max_bytes;
    if declared > budget {
        return Err(client.err(format!(
            "the image's blobs declare {declared} bytes, over the limit of {budget} bytes"
        )));
    }
    progress(Event::Manifest {
        digest: digest.clone(),
        total: blobs.iter().map(|d| d.size).sum(),
    });
    for d in blobs {
        if store.has_blob(&d.digest) {
            progress(Event::Cached(d.size));
            continue;
        }
        let resp = client
            .get(&format!("/v2/{repo}/blobs/{}", d.digest), None)
            .await?;
        if !resp.status.is_success() {
            return Err(client.err(format!("blob {}: {}", d.digest, resp.status)));
        }
        let mut w = store.blob_writer()?;
        let mut body = resp.body;
        let mut got: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| client.err(format!("reading blob {}: {e}", d.digest)))?;
            if let Ok(data) = frame.into_data() {
                got += data.len() as u64;
                if got > d.size {
                    return Err(client.err(format!(
                        "blob {} is larger than the {} bytes its manifest says",
                        d.digest, d.size
                    )));
                }
                w.write_all(&data)
                    .map_err(|e| Error::io(format!("writing blob {}", d.digest), e))?;
                progress(Event::Bytes(data.len() as u64));
            }
        }
        w.commit(Some(&d.digest))?;
    }
    progress(Event::Unpacking);
    let (image, report) = store.tag(lock, name, &digest)?;
    Ok(Imported { image, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_params() {
        let p = parse_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(p.len(), 3);
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull".into()));
    }

    #[test]
    fn credentials_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths": {"https://reg.example:5000": {"auth": "dXNlcjpwYTpzcw=="},
                          "other.example": {"username": "u", "password": "p"}}}"#,
        )
        .unwrap();
        let c = credentials_from_file(&path, "reg.example:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        assert!(!format!("{c:?}").contains("pa:ss"));
        let c = credentials_from_file(&path, "other.example")
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "u");
        assert!(
            credentials_from_file(&path, "missing.example")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn loopback_only() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("10.0.0.1"));
    }
}
