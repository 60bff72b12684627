//! Replicas that route to each other (`[cluster]`).
//!
//! In a cluster every session and sandbox id ends in `_<token>`, the token of the replica
//! that holds it (its name without the characters ids cannot hold: `ampoule-1` →
//! `ampoule1`; see [`Manager::set_replica`]). [`route`] runs before every door: a request
//! naming an id held by another replica — `/v1/sessions/{id}…`, `/v1/sandboxes/{id}…`, E2B's
//! `/sandboxes/{id}…` and its data plane (`E2b-Sandbox-Id`, `{port}-{id}.…` hosts) — is
//! forwarded to that replica as it came (method, path, query, headers — the caller's key
//! included, so the owner authenticates the tenant and writes the audit record — and body),
//! marked with the cluster secret in [`FORWARDED`]; the answer is streamed back as it comes
//! (SSE, NDJSON, chunked downloads are never buffered). A request carrying [`FORWARDED`] is
//! served where it lands, never forwarded again, and refused (401) unless it carries the
//! secret. A replica that does not answer makes its sessions answer 503
//! `replica_unavailable`. ACA's session identifiers are the client's: the replica that holds
//! one is chosen by rendezvous hashing of the identifier over the replicas
//! ([`Cluster::owner_of_identifier`]), so every replica forwards ACA calls (`?identifier=`)
//! to the same one. Requests naming neither (new `/v1` sessions and sandboxes, lists,
//! `/mcp`) are served by the replica they reach.
//!
//! Peers: `[cluster] peers` (`name = "http://host:port"`), or, as a StatefulSet names its
//! pods, `[cluster] replicas`, `peer_dns` and `peer_port`: `<stem><i>` for every ordinal
//! `i` below `replicas`, at `http://<stem><i>.<peer_dns>:<peer_port>`, where `<stem>` is the
//! replica's own name without its ordinal (`AMPOULE_REPLICA=ampoule-2` → `ampoule-0`,
//! `ampoule-1`, `ampoule-2`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, Error, ErrorCode};
use crate::manager::Manager;

/// The header that marks a forwarded request; its value is the cluster secret.
pub const FORWARDED: &str = "x-ampoule-forwarded";

/// How long a peer may take to accept a connection before it counts as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One peer: its name and base URL (`http://host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its replica name (`ampoule-1`).
    pub name: String,
    /// `host:port` to connect to.
    pub authority: String,
}

/// This replica and its peers.
#[derive(Clone)]
pub struct Cluster {
    /// This replica's name.
    pub replica: String,
    /// Its id token (the name's ASCII letters and digits).
    pub token: String,
    /// Every replica by token (this one included).
    peers: BTreeMap<String, Peer>,
    secret: Arc<str>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("replica", &self.replica)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// A replica name's id token: its ASCII letters and digits.
pub fn token(name: &str) -> String {
    name.chars().filter(char::is_ascii_alphanumeric).collect()
}

impl Cluster {
    /// A cluster of `replica` (its name) and `peers` (name → `http://host:port`, this
    /// replica may be among them), authenticated by `secret`.
    pub fn new(
        replica: &str,
        peers: &BTreeMap<String, String>,
        secret: &str,
    ) -> Result<Self, Error> {
        if secret.len() < 16 {
            return Err(Error::Config(
                "cluster: the cluster secret must be at least 16 characters".into(),
            ));
        }
        let mut by_token = BTreeMap::new();
        for (name, url) in peers {
            let authority = url
                .strip_prefix("http://")
                .map(|r| r.trim_end_matches('/'))
                .filter(|a| !a.is_empty() && !a.contains('/'))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "cluster.peers.{name}: expected http://host:port, got {url:?}"
                    ))
                })?;
            let t = token(name);
            if t.is_empty() || t.len() > 32 {
                return Err(Error::Config(format!(
                    "cluster.peers.{name}: a replica name needs 1 to 32 ASCII letters or digits"
                )));
            }
            let peer = Peer {
                name: name.clone(),
                authority: authority.to_owned(),
            };
            if let Some(other) = by_token.insert(t.clone(), peer) {
                return Err(Error::Config(format!(
                    "cluster.peers: {name} and {} make the same id token {t}",
                    other.name
                )));
            }
        }
        let t = token(replica);
        if t.is_empty() || t.len() > 32 {
            return Err(Error::Config(format!(
                "cluster.replica {replica:?}: needs 1 to 32 ASCII letters or digits"
            )));
        }
        if by_token.get(&t).is_some_and(|p| p.name != replica) {
            return Err(Error::Config(format!(
                "cluster.replica {replica:?} makes the id token of another peer"
            )));
        }
        Ok(Self {
            replica: replica.to_owned(),
            token: t,
            peers: by_token,
            secret: secret.into(),
        })
    }

    /// The peer holding ids of `token`, unless it is this replica.
    pub fn peer(&self, token: &str) -> Option<&Peer> {
        if token == self.token {
            return None;
        }
        self.peers.get(token)
    }

    /// Whether `v` is the cluster secret (compared in constant time).
    fn is_secret(&self, v: &HeaderValue) -> bool {
        let (a, b) = (v.as_bytes(), self.secret.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Sends `req` to `peer`, marked as forwarded, and streams its answer back; 503
    /// `replica_unavailable` when the peer does not answer.
    pub async fn forward(&self, peer: &Peer, mut req: Request) -> Response {
        let unavailable = |why: String| {
            tracing::warn!(peer = %peer.name, error = %why, "replica unavailable");
            ApiError::new(
                ErrorCode::ReplicaUnavailable,
                format!(
                    "replica {} holds this session and does not answer; try again later",
                    peer.name
                ),
            )
            .into_response()
        };
        let tcp = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&peer.authority),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return unavailable(format!("connecting: {e}")),
            Err(_) => return unavailable("connecting: timed out".into()),
        };
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) =
            match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await {
                Ok(x) => x,
                Err(e) => return unavailable(format!("handshake: {e}")),
            };
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "a forwarded connection ended");
            }
        });
        // The path and query only (the connection says where); the Host header stays the
        // caller's (E2B's data plane routes by it).
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        match path.parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => {
                return ApiError::new(ErrorCode::InvalidRequest, "a malformed request target")
                    .into_response();
            }
        }
        let headers = req.headers_mut();
        headers.remove(header::CONNECTION);
        headers.remove("keep-alive");
        match HeaderValue::from_str(&self.secret) {
            Ok(v) => {
                headers.insert(FORWARDED, v);
            }
            Err(_) => return unavailable("the cluster secret is not a header value".into()),
        }
        match send.send_request(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                parts.headers.remove(header::CONNECTION);
                parts.headers.remove("keep-alive");
                Response::from_parts(parts, Body::new(body))
            }
            Err(e) => unavailable(format!("request: {e}")),
        }
    }
}

/// The session or sandbox id a request names, where the path or E2B's routing says it.
fn named_id(req: &Request) -> Option<String> {
    if let Some(Ok(route)) = crate::e2b::route_of(req) {
        return Some(route.sandbox);
    }
    let mut seg = req.uri().path().trim_start_matches('/').split('/');
    let id = match (seg.next(), seg.next(), seg.next()) {
        (Some("v1"), Some("sessions" | "sandboxes"), Some(id)) => id,
        (Some("sandboxes"), Some(id), _) => id,
        (Some("v2"), Some("sandboxes"), Some(id)) => id,
        _ => return None,
    };
    Some(id.to_owned())
}

/// The ACA `identifier` of a request on ACA's paths (the query parameter, percent-decoded;
/// the key matched without regard to case, as the ACA door does).
fn aca_identifier(req: &Request) -> Option<String> {
    let path = req.uri().path();
    let other_door = ["/v1", "/v2", "/sandboxes", "/mcp", "/console"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
        || ["/healthz", "/readyz", "/metrics", "/openapi.json"].contains(&path);
    if other_door {
        return None;
    }
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        k.eq_ignore_ascii_case("identifier").then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

impl Cluster {
    /// The replica (token) that holds an ACA `identifier`: chosen by rendezvous hashing over
    /// every replica, so each one finds the same owner without asking, and a replica that
    /// joins or leaves moves only its own share of identifiers.
    pub fn owner_of_identifier(&self, identifier: &str) -> &str {
        use sha2::{Digest, Sha256};
        let score = |t: &str| {
            let d = Sha256::new()
                .chain_update(t.as_bytes())
                .chain_update([0u8])
                .chain_update(identifier.as_bytes())
                .finalize();
            let mut b = [0u8; 8];
            b.copy_from_slice(&d[..8]);
            u64::from_be_bytes(b)
        };
        self.peers
            .keys()
            .map(String::as_str)
            .chain(std::iter::once(self.token.as_str()))
            .max_by_key(|t| (score(t), *t))
            .unwrap_or(self.token.as_str())
    }
}

/// The routing layer (see the module docs).
pub async fn route(State(cluster): State<Arc<Cluster>>, req: Request, next: Next) -> Response {
    if let Some(v) = req.headers().get(FORWARDED) {
        if !cluster.is_secret(v) {
            return ApiError::new(
                ErrorCode::Unauthorized,
                "a forwarded request without the cluster secret",
            )
            .into_response();
        }
        // Served here, never forwarded again.
        return next.run(req).await;
    }
    let token = match named_id(&req) {
        Some(id) => Manager::replica_of(&id).map(str::to_owned),
        None => aca_identifier(&req).map(|i| cluster.owner_of_identifier(&i).to_owned()),
    };
    let owner = token.and_then(|t| cluster.peer(&t).cloned());
    match owner {
        Some(peer) => cluster.forward(&peer, req).await,
        None => next.run(req).await,
    }
}
