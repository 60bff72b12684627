//! Dependency controls: the gateway serves a pool's Python package index, filtered by the
//! pool's package policy, in front of the upstream index (`[pools.X.packages]`).
//!
//! The sandbox's `pip` is pointed at `http://packages.ampoule.internal/simple/`
//! ([`INDEX_URL`]); that name exists only inside sandboxes of such a pool: their gateway's DNS
//! answers it with the gateway's own address, and the proxy, seeing it in a request's `Host`,
//! answers the request itself instead of connecting anywhere. It fetches what it needs from
//! the upstream index on the host's side (`fetch.rs`: the operator's URL, not the sandbox's
//! policy, which may allow nothing at all) and serves:
//!
//! - `/simple/`: the projects the policy names;
//! - `/simple/<project>/`: a project page (PEP 503 HTML, or PEP 691 JSON when the client asks
//!   for it), 404 with a reason when the project is not allowed, and otherwise only the files
//!   whose version the policy accepts, each link rewritten to `/files/<project>/<filename>`;
//! - `/files/<project>/<filename>` (and its `.metadata`): exactly a file a project page served
//!   here linked, streamed from where the upstream page said it is.
//!
//! Every page and download is an egress event (`package NAME VERSION allowed`, `package NAME
//! not allowed`), so the execution's audit record lists what was installed. The sandbox never
//! talks to the upstream index or its file host itself: its own policy need not allow them,
//! and where it does not, nothing but this filtered view is reachable.
//!
//! Requirements are `name` or `name<specifiers>` (PEP 440 specifiers, compared with
//! `pep440_rs`). A project is allowed when some `allow` entry names it (or `allow` is empty
//! and `deny` is not) and no `deny` entry without specifiers names it; a version when it
//! matches one of its project's `allow` entries' specifiers (if any) and none of its `deny`
//! entries' specifiers.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use ampoule_types::EgressProtocol;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pep440_rs::{Version, VersionSpecifiers};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Shared;
use crate::events::{Decision, EventLog};
use crate::fetch::{self, Endpoint};

/// The name of the filtered index inside a sandbox.
pub const INDEX_HOST: &str = "packages.ampoule.internal";
/// What the sandbox's `PIP_INDEX_URL` says.
pub const INDEX_URL: &str = "http://packages.ampoule.internal/simple/";
/// Largest upstream project page read (PyPI's biggest are a few MiB).
const MAX_PAGE: usize = 32 * 1024 * 1024;
/// Linked files remembered per pool; beyond it the oldest pages must be read again.
const MAX_LINKS: usize = 200_000;
const JSON_TYPE: &str = "application/vnd.pypi.simple.v1+json";

/// `[pools.NAME.packages]` as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagesConfig {
    /// The upstream simple index, e.g. `https://pypi.org/simple`.
    pub index_url: String,
    /// Requirements a project must match (`pandas`, `requests>=2.31`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Requirements that refuse a project (no specifier) or some of its versions.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// One `allow` or `deny` entry.
#[derive(Debug, Clone)]
struct Requirement {
    /// Normalised (PEP 503).
    name: String,
    specifiers: Option<VersionSpecifiers>,
    text: String,
}

impl FromStr for Requirement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .unwrap_or(text.len());
        let (name, rest) = text.split_at(end);
        if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(format!("{text:?} does not start with a project name"));
        }
        let rest = rest.trim();
        let specifiers = if rest.is_empty() {
            None
        } else {
            if rest.starts_with('[') || rest.contains(';') || rest.contains('@') {
                return Err(format!(
                    "{text:?}: only a name and version specifiers are supported (no extras, \
                     markers or URLs)"
                ));
            }
            Some(
                VersionSpecifiers::from_str(rest)
                    .map_err(|e| format!("{text:?}: bad version specifiers: {e}"))?,
            )
        };
        Ok(Self {
            name: normalize(name),
            specifiers,
            text: text.to_owned(),
        })
    }
}

/// PEP 503 normalisation: runs of `-`, `_`, `.` become `-`, lowercase.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// A file an index page served here linked.
#[derive(Debug, Clone)]
struct Linked {
    url: Endpoint,
    version: String,
    metadata: bool,
}

/// A pool's compiled package policy and the files its pages linked. Shared by the pool's
/// sandboxes (the same policy allows them the same files).
pub struct PackageIndex {
    upstream: Endpoint,
    allow: Vec<Requirement>,
    deny: Vec<Requirement>,
    links: Mutex<HashMap<String, Linked>>,
}

impl std::fmt::Debug for PackageIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageIndex")
            .field("upstream", &self.upstream.url())
            .field(
                "allow",
                &self.allow.iter().map(|r| &r.text).collect::<Vec<_>>(),
            )
            .field(
                "deny",
                &self.deny.iter().map(|r| &r.text).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl PackageIndex {
    /// Checks a configured package policy.
    pub fn compile(cfg: &PackagesConfig) -> Result<Self, String> {
        let upstream =
            Endpoint::parse(cfg.index_url.trim()).map_err(|e| format!("index_url: {e}"))?;
        let parse = |list: &[String], what: &str| {
            list.iter()
                .map(|r| r.parse::<Requirement>().map_err(|e| format!("{what}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        let allow = parse(&cfg.allow, "allow")?;
        let deny = parse(&cfg.deny, "deny")?;
        if allow.is_empty() && deny.is_empty() {
            return Err(
                "give `allow` (the projects code may install) and/or `deny`; an index with \
                 neither would allow everything"
                    .into(),
            );
        }
        Ok(Self {
            upstream,
            allow,
            deny,
            links: Mutex::new(HashMap::new()),
        })
    }

    /// Whether project `name` (normalised) may be installed at all; the reason either way.
    fn project(&self, name: &str) -> Result<String, String> {
        if let Some(d) = self
            .deny
            .iter()
            .find(|d| d.name == name && d.specifiers.is_none())
        {
            return Err(format!(
                "package {name} not allowed (denied by {:?})",
                d.text
            ));
        }
        if self.allow.is_empty() {
            return Ok(format!("package {name} allowed (not denied)"));
        }
        match self.allow.iter().find(|a| a.name == name) {
            Some(a) => Ok(format!("package {name} allowed by {:?}", a.text)),
            None => Err(format!(
                "package {name} not allowed (this pool allows: {})",
                self.allow
                    .iter()
                    .map(|a| a.text.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Whether `version` of allowed project `name` may be installed. A file whose version
    /// cannot be read passes only when no specifier concerns its project.
    fn version_allowed(&self, name: &str, version: Option<&Version>) -> bool {
        let allows: Vec<&Requirement> = self.allow.iter().filter(|a| a.name == name).collect();
        let denies: Vec<&VersionSpecifiers> = self
            .deny
            .iter()
            .filter(|d| d.name == name)
            .filter_map(|d| d.specifiers.as_ref())
            .collect();
        let constrained = allows.iter().any(|a| a.specifiers.is_some()) || !denies.is_empty();
        let Some(v) = version else {
            return !constrained;
        };
        let allowed = allows.is_empty()
            || allows
                .iter()
                .any(|a| a.specifiers.as_ref().is_none_or(|s| s.contains(v)));
        allowed && !denies.iter().any(|s| s.contains(v))
    }

    /// The upstream page of project `name` (normalised): `<index_url>/<name>/`.
    fn page(&self, name: &str) -> Result<Endpoint, String> {
        Endpoint::parse(&format!(
            "{}/{name}/",
            self.upstream.url().trim_end_matches('/')
        ))
    }

    /// The projects the policy names, for `/simple/`.
    fn listed(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.allow.iter().map(|a| a.name.as_str()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn remember(&self, key: String, linked: Linked) {
        if let Ok(mut links) = self.links.lock() {
            if links.len() >= MAX_LINKS {
                links.clear();
            }
            links.insert(key, linked);
        }
    }

    fn linked(&self, key: &str) -> Option<Linked> {
        self.links.lock().ok()?.get(key).cloned()
    }

    /// Variables that point the sandbox's `pip` at this index.
    pub fn sandbox_env() -> Vec<(String, String)> {
        vec![
            ("PIP_INDEX_URL".to_owned(), INDEX_URL.to_owned()),
            ("PIP_TRUSTED_HOST".to_owned(), INDEX_HOST.to_owned()),
        ]
    }
}

/// The version in a distribution's file name, for a project named `project` (normalised).
fn file_version(project: &str, filename: &str) -> Option<Version> {
    let text = if let Some(stem) = filename.strip_suffix(".whl") {
        // name-version(-build)?-python-abi-platform.whl
        stem.split('-').nth(1)?.to_owned()
    } else {
        let stem = [
            ".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".zip", ".tar", ".egg",
        ]
        .iter()
        .find_map(|ext| filename.strip_suffix(ext))?;
        // Sdist names may hold dashes (`python-dateutil-2.8.2`): find where the name ends.
        let mut found = None;
        for (i, _) in stem.match_indices('-') {
            if normalize(&stem[..i]) == project {
                found = Some(stem[i + 1..].split('-').next()?.to_owned());
                break;
            }
        }
        found?
    };
    Version::from_str(&text).ok()
}

/// One file of a project page, in either format.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct File {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: BTreeMap<String, String>,
    #[serde(
        rename = "requires-python",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    requires_python: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    yanked: Option<serde_json::Value>,
    #[serde(
        rename = "core-metadata",
        alias = "dist-info-metadata",
        alias = "data-dist-info-metadata",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    core_metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct JsonPage {
    #[serde(default)]
    files: Vec<File>,
}

/// Decodes the few HTML entities index pages use.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|e| *e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e => e
                .strip_prefix("#x")
                .or_else(|| e.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| e.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The attributes of one start tag's text (after the tag name, before `>`).
fn attributes(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start();
        let end = s
            .find(|c: char| c.is_whitespace() || c == '=' || c == '/')
            .unwrap_or(s.len());
        if end == 0 {
            if s.is_empty() {
                return out;
            }
            s = &s[1..];
            continue;
        }
        let name = s[..end].to_ascii_lowercase();
        s = s[end..].trim_start();
        let value = if let Some(after) = s.strip_prefix('=') {
            let after = after.trim_start();
            let (v, rest) = match after.chars().next() {
                Some(q @ ('"' | '\'')) => {
                    let body = &after[1..];
                    let close = body.find(q).unwrap_or(body.len());
                    (&body[..close], body.get(close + 1..).unwrap_or(""))
                }
                _ => {
                    let close = after.find(char::is_whitespace).unwrap_or(after.len());
                    (&after[..close], &after[close..])
                }
            };
            s = rest;
            unescape(v)
        } else {
            String::new()
        };
        out.push((name, value));
    }
}

/// The `<a>` links of a PEP 503 page, resolved against the page's URL.
fn parse_html(page: &Endpoint, html: &str) -> Vec<File> {
    let mut files = Vec::new();
    let lower = html.to_ascii_lowercase();
    let mut at = 0;
    while let Some(i) = lower[at..].find("<a").map(|i| i + at) {
        at = i + 2;
        if !lower[at..].starts_with(|c: char| c.is_whitespace()) {
            continue;
        }
        let Some(close) = lower[at..].find('>').map(|c| c + at) else {
            break;
        };
        let attrs = attributes(&html[at..close]);
        let text_end = lower[close..].find("</a").map_or(html.len(), |e| e + close);
        let text = unescape(html[close + 1..text_end].trim());
        at = close;
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let Some(href) = get("href") else { continue };
        let (link, fragment) = href.split_once('#').unwrap_or((href.as_str(), ""));
        let Ok(url) = page.join(link) else { continue };
        let mut hashes = BTreeMap::new();
        if let Some((alg, hex)) = fragment.split_once('=') {
            hashes.insert(alg.to_owned(), hex.to_owned());
        }
        let metadata = get("data-core-metadata").or_else(|| get("data-dist-info-metadata"));
        let filename = if text.is_empty() {
            link.rsplit('/').next().unwrap_or_default().to_owned()
        } else {
            text
        };
        files.push(File {
            filename,
            url: url.url(),
            hashes,
            requires_python: get("data-requires-python"),
            yanked: get("data-yanked").map(|r| {
                if r.is_empty() {
                    serde_json::Value::Bool(true)
                } else {
                    serde_json::Value::String(r)
                }
            }),
            core_metadata: metadata.map(|m| match m.split_once('=') {
                Some((alg, hex)) => serde_json::json!({ alg: hex }),
                None => serde_json::Value::Bool(true),
            }),
        });
    }
    files
}

/// The upstream page's files, whatever format it answered in.
fn parse_page(page: &Endpoint, content_type: &str, body: &[u8]) -> Result<Vec<File>, String> {
    if content_type.contains("json") {
        let p: JsonPage =
            serde_json::from_slice(body).map_err(|e| format!("a bad JSON index page: {e}"))?;
        Ok(p.files
            .into_iter()
            .filter_map(|mut f| {
                f.url = page.join(&f.url).ok()?.url();
                Some(f)
            })
            .collect())
    } else {
        Ok(parse_html(page, &String::from_utf8_lossy(body)))
    }
}

fn has_metadata(f: &File) -> bool {
    f.core_metadata
        .as_ref()
        .is_some_and(|m| !matches!(m, serde_json::Value::Bool(false)))
}

fn render_html(project: &str, files: &[File]) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html><head><meta name=\"pypi:repository-version\" content=\"1.0\">\
         <title>Links for {p}</title></head><body><h1>Links for {p}</h1>\n",
        p = escape(project)
    );
    for f in files {
        let mut attrs = String::new();
        if let Some(r) = &f.requires_python {
            let _ = write!(attrs, " data-requires-python=\"{}\"", escape(r));
        }
        match &f.yanked {
            Some(serde_json::Value::String(r)) => {
                let _ = write!(attrs, " data-yanked=\"{}\"", escape(r));
            }
            Some(serde_json::Value::Bool(true)) => attrs.push_str(" data-yanked=\"\""),
            _ => {}
        }
        if has_metadata(f) {
            let v = match &f.core_metadata {
                Some(serde_json::Value::Object(m)) => m
                    .iter()
                    .next()
                    .and_then(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
                    .unwrap_or_else(|| "true".into()),
                _ => "true".into(),
            };
            let _ = write!(attrs, " data-core-metadata=\"{}\"", escape(&v));
        }
        let fragment = f
            .hashes
            .get("sha256")
            .map(|h| format!("#sha256={h}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "<a href=\"{}{}\"{attrs}>{}</a><br/>",
            escape(&f.url),
            escape(&fragment),
            escape(&f.filename)
        );
    }
    out.push_str("</body></html>\n");
    out
}

fn render_json(project: &str, files: &[File]) -> String {
    serde_json::json!({
        "meta": {"api-version": "1.0"},
        "name": project,
        "files": files,
    })
    .to_string()
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn refuse(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = reply(
        status,
        "text/plain; charset=utf-8",
        format!("ampoule package index: {msg}\n"),
    );
    // pip shows the reason phrase (with -v); make it say why.
    if status == StatusCode::NOT_FOUND {
        resp.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(
                b"Not Found (not allowed by the pool's package policy)",
            ));
    }
    resp
}

/// One sandbox's conversation with the index: HTTP/1.1, request by request.
pub(crate) struct Conversation {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: Arc<PackageIndex>,
    pub(crate) log: Arc<EventLog>,
}

impl Conversation {
    pub(crate) async fn serve<C>(self, client: C)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = Arc::new(self);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.answer(req).await) }
        });
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(client), service)
            .await
        {
            tracing::debug!(error = %e, "package index connection ended");
        }
    }

    fn record(&self, to: &Endpoint, allowed: bool, reason: String) {
        self.log.record(Decision {
            host: to.host.clone(),
            port: to.port,
            protocol: if to.https {
                EgressProtocol::Tls
            } else {
                EgressProtocol::Http
            },
            allowed,
            reason,
            injected: false,
            address: None,
        });
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
        }
        let path = req.uri().path().to_owned();
        let json = req
            .headers()
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.contains(JSON_TYPE) || v.contains("application/vnd.pypi.simple.latest+json")
            });
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segments.as_slice() {
            ["simple"] => self.root(json),
            ["simple", project] => self.project(project, json).await,
            ["files", project, filename] => self.file(project, filename).await,
            _ => refuse(
                StatusCode::NOT_FOUND,
                &format!("no such page {path:?}; the index is {INDEX_URL}"),
            ),
        }
    }

    fn root(&self, json: bool) -> Response<Body> {
        let names = self.index.listed();
        if json {
            let projects: Vec<_> = names
                .iter()
                .map(|n| serde_json::json!({"name": n}))
                .collect();
            let body = serde_json::json!({"meta": {"api-version": "1.0"}, "projects": projects});
            return reply(StatusCode::OK, JSON_TYPE, body.to_string());
        }
        let mut out = String::from(
            "<!DOCTYPE html>\n<html><head><meta name=\"pypi:repository-version\" content=\"1.0\">\
             <title>Simple index</title></head><body>\n",
        );
        for n in names {
            let _ = writeln!(out, "<a href=\"/simple/{n}/\">{n}</a><br/>", n = escape(n));
        }
        out.push_str("</body></html>\n");
        reply(StatusCode::OK, "text/html; charset=utf-8", out)
    }

    async fn project(&self, asked: &str, json: bool) -> Response<Body> {
        let name = normalize(asked);
        let upstream = match self.index.page(&name) {
            Ok(u) => u,
            Err(e) => return refuse(StatusCode::BAD_GATEWAY, &e),
        };
        let allowed_by = match self.index.project(&name) {
            Ok(r) => r,
            Err(reason) => {
                self.record(&upstream, false, reason.clone());
                return refuse(StatusCode::NOT_FOUND, &reason);
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::ACCEPT,
            HeaderValue::from_static(
                "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1",
            ),
        );
        let fetched = async {
            let resp = fetch::send(&self.shared, Method::GET, &upstream, headers, None).await?;
            let status = resp.status();
            let content_type = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = fetch::read_body(resp, MAX_PAGE).await?;
            if !status.is_success() {
                return Err(format!(
                    "the upstream index answered {}",
                    fetch::excerpt(status, &body)
                ));
            }
            parse_page(&upstream, &content_type, &body)
        };
        let files = match fetched.await {
            Ok(f) => f,
            Err(e) => {
                let reason = format!("{allowed_by}, but {}: {e}", upstream.url());
                self.record(&upstream, false, reason.clone());
                return refuse(StatusCode::BAD_GATEWAY, &reason);
            }
        };
        let total = files.len();
        let mut kept = Vec::new();
        for mut f in files {
            let version = file_version(&name, &f.filename);
            if !self.index.version_allowed(&name, version.as_ref()) {
                continue;
            }
            // A file name is one path segment: nothing else may be linked from here.
            if f.filename.is_empty()
                || f.filename.contains(['/', '\\'])
                || f.filename.starts_with('.')
            {
                continue;
            }
            let Ok(url) = Endpoint::parse(&f.url) else {
                continue;
            };
            self.index.remember(
                format!("{name}/{}", f.filename),
                Linked {
                    url,
                    version: version.map_or_else(|| "?".to_owned(), |v| v.to_string()),
                    metadata: has_metadata(&f),
                },
            );
            f.url = format!("/files/{name}/{}", percent_path(&f.filename));
            kept.push(f);
        }
        self.record(
            &upstream,
            true,
            format!(
                "{allowed_by}: index page, {} of {total} files allowed",
                kept.len()
            ),
        );
        if json {
            reply(StatusCode::OK, JSON_TYPE, render_json(&name, &kept))
        } else {
            reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                render_html(&name, &kept),
            )
        }
    }

    async fn file(&self, project: &str, filename: &str) -> Response<Body> {
        let name = normalize(project);
        let filename = percent_encoding::percent_decode_str(filename)
            .decode_utf8_lossy()
            .into_owned();
        let (key, metadata) = match filename.strip_suffix(".metadata") {
            Some(dist) => (format!("{name}/{dist}"), true),
            None => (format!("{name}/{filename}"), false),
        };
        let Some(linked) = self.index.linked(&key).filter(|l| !metadata || l.metadata) else {
            return refuse(
                StatusCode::NOT_FOUND,
                &format!(
                    "{filename} was not linked by a page of this index (read /simple/{name}/ first)"
                ),
            );
        };
        let url = if metadata {
            match Endpoint::parse(&format!("{}.metadata", linked.url.url())) {
                Ok(u) => u,
                Err(e) => return refuse(StatusCode::BAD_GATEWAY, &e),
            }
        } else {
            linked.url.clone()
        };
        let what = if metadata {
            format!("package {name} {} metadata ({filename})", linked.version)
        } else {
            format!("package {name} {} allowed ({filename})", linked.version)
        };
        match fetch::send(&self.shared, Method::GET, &url, HeaderMap::new(), None).await {
            Ok(resp) if resp.status().is_success() => {
                self.record(&url, true, what);
                let (parts, body) = resp.into_parts();
                let mut out = Response::new(body.boxed());
                for h in [http::header::CONTENT_TYPE, http::header::CONTENT_LENGTH] {
                    if let Some(v) = parts.headers.get(&h) {
                        out.headers_mut().insert(h, v.clone());
                    }
                }
                out
            }
            Ok(resp) => {
                let status = resp.status();
                let reason = format!("{what}, but the file host answered {status}");
                self.record(&url, false, reason.clone());
                refuse(StatusCode::BAD_GATEWAY, &reason)
            }
            Err(e) => {
                let reason = format!("{what}, but {e}");
                self.record(&url, false, reason.clone());
                refuse(StatusCode::BAD_GATEWAY, &reason)
            }
        }
    }
}

/// Percent-encodes a file name for a path segment.
fn percent_path(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'+')
        .remove(b'!');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(allow: &[&str], deny: &[&str]) -> PackageIndex {
        PackageIndex::compile(&PackagesConfig {
            index_url: "https://pypi.example/simple".into(),
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            deny: deny.iter().map(|s| (*s).to_owned()).collect(),
        })
        .unwrap()
    }

    fn v(s: &str) -> Version {
        Version::from_str(s).unwrap()
    }

    #[test]
    fn names_normalise() {
        assert_eq!(normalize("Foo.Bar__baz-_-Qux"), "foo-bar-baz-qux");
        assert_eq!(normalize("requests"), "requests");
    }

    #[test]
    fn requirements_parse() {
        let r: Requirement = "Requests >= 2.31, <3".parse().unwrap();
        assert_eq!(r.name, "requests");
        assert!(r.specifiers.as_ref().unwrap().contains(&v("2.32.3")));
        assert!(!r.specifiers.as_ref().unwrap().contains(&v("2.30")));
        for bad in [
            "",
            ">=1",
            "pandas[excel]",
            "foo; python_version<'3'",
            "foo @ https://x/y.whl",
            "foo>>1",
        ] {
            assert!(bad.parse::<Requirement>().is_err(), "{bad:?}");
        }
        assert!(
            PackageIndex::compile(&PackagesConfig {
                index_url: "https://pypi.example/simple".into(),
                ..PackagesConfig::default()
            })
            .is_err()
        );
        assert!(
            PackageIndex::compile(&PackagesConfig {
                index_url: "file:///srv/index".into(),
                allow: vec!["x".into()],
                ..PackagesConfig::default()
            })
            .is_err()
        );
    }

    #[test]
    fn projects_and_versions_are_decided() {
        let i = index(
            &["pandas", "requests>=2.31", "Requests==2.0"],
            &["pandas==2.0.0"],
        );
        assert!(i.project("pandas").is_ok());
        let no = i.project("numpy").unwrap_err();
        assert_eq!(
            no,
            "package numpy not allowed (this pool allows: pandas, requests>=2.31, Requests==2.0)"
        );
        assert!(i.version_allowed("pandas", Some(&v("2.2.3"))));
        assert!(!i.version_allowed("pandas", Some(&v("2.0.0"))));
        assert!(i.version_allowed("requests", Some(&v("2.32.3"))));
        assert!(i.version_allowed("requests", Some(&v("2.0"))));
        assert!(!i.version_allowed("requests", Some(&v("2.30"))));
        // An unreadable version passes only where no specifier applies.
        assert!(!i.version_allowed("requests", None));
        let deny_only = index(&[], &["evil", "old<1"]);
        assert!(deny_only.project("anything").is_ok());
        assert!(deny_only.project("evil").is_err());
        assert!(deny_only.project("old").is_ok());
        assert!(!deny_only.version_allowed("old", Some(&v("0.9"))));
        assert!(deny_only.version_allowed("old", Some(&v("1.0"))));
        assert!(deny_only.version_allowed("anything", None));
    }

    #[test]
    fn versions_come_from_file_names() {
        for (project, file, want) in [
            (
                "pandas",
                "pandas-2.2.3-cp312-cp312-manylinux_2_17_x86_64.whl",
                Some("2.2.3"),
            ),
            ("tinyok", "tinyok-1.0-1-py3-none-any.whl", Some("1.0")),
            (
                "python-dateutil",
                "python-dateutil-2.8.2.tar.gz",
                Some("2.8.2"),
            ),
            ("zope-interface", "zope.interface-6.0.zip", Some("6.0")),
            ("foo", "foo-1.0rc1.tar.gz", Some("1.0rc1")),
            ("foo", "foo.txt", None),
            ("foo", "bar-1.0.tar.gz", None),
        ] {
            assert_eq!(
                file_version(project, file).map(|v| v.to_string()),
                want.map(str::to_owned),
                "{file}"
            );
        }
    }

    #[test]
    fn html_pages_parse_and_render() {
        let page = Endpoint::parse("https://pypi.example/simple/tinyok/").unwrap();
        let html = r#"<!DOCTYPE html><html><body><h1>Links for tinyok</h1>
<a href="../../packages/tinyok-1.0-py3-none-any.whl#sha256=abc123" data-requires-python="&gt;=3.8" data-dist-info-metadata="sha256=def">tinyok-1.0-py3-none-any.whl</a><br/>
<A HREF='https://files.example/tinyok-0.9.tar.gz' data-yanked>tinyok-0.9.tar.gz</A>
<a name="no-href">x</a>
</body></html>"#;
        let files = parse_html(&page, html);
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(
            files[0].url,
            "https://pypi.example/packages/tinyok-1.0-py3-none-any.whl"
        );
        assert_eq!(files[0].hashes["sha256"], "abc123");
        assert_eq!(files[0].requires_python.as_deref(), Some(">=3.8"));
        assert!(has_metadata(&files[0]));
        assert_eq!(files[1].yanked, Some(serde_json::Value::Bool(true)));
        let out = render_html("tinyok", &files);
        assert!(out.contains(r#"data-requires-python="&gt;=3.8""#), "{out}");
        assert!(out.contains("#sha256=abc123"), "{out}");
        assert!(out.contains(r#"data-core-metadata="sha256=def""#), "{out}");
        assert_eq!(parse_html(&page, &out).len(), 2);
        let json: serde_json::Value = serde_json::from_str(&render_json("tinyok", &files)).unwrap();
        assert_eq!(json["files"][0]["requires-python"], ">=3.8");
        assert_eq!(json["files"][0]["core-metadata"]["sha256"], "def");
        // The JSON form parses back.
        let back = parse_page(&page, JSON_TYPE, json.to_string().as_bytes()).unwrap();
        assert_eq!(back[1].url, "https://files.example/tinyok-0.9.tar.gz");
    }

    #[test]
    fn entities_decode() {
        assert_eq!(unescape("a&amp;b&lt;&#62;&#x3d;&bogus;&"), "a&b<>=&bogus;&");
    }
}
