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
//! `replica_unavailable`.
//!
//! Session names (ACA's `?identifier=`, a `/v1` session's `identifier`, an MCP tool's
//! `session` or `sandbox_id`, the session of an MCP file resource's URI) are the client's: the replica that holds one is the one the
//! name ends in (`…_<token>`: the names a replica generates, and ids), else the one chosen by
//! rendezvous hashing of the name over the replicas ([`Cluster::owner_of_name`]), so every
//! replica sends a name to the same one. MCP's HTTP transport is stateless (each POST stands
//! alone), so a tool call naming a session is forwarded whole to its holder.
//!
//! New sessions and sandboxes naming nothing (`POST /v1/sessions` without an identifier,
//! `POST /v1/sandboxes`, E2B's `POST /sandboxes`, an MCP `execute_code` or `upload_file`
//! without a session) are placed by load: every replica reports its free slots per pool
//! ([`Capacity`], `GET` [`CAPACITY_PATH`] with the secret), each asks its peers every
//! [`LOAD_INTERVAL`] ([`Cluster::poll_loads`]), and a new session goes to the replica with
//! the most free slots in its pool — this one when it has as many as any, when no peer's
//! report is fresh, or when the chosen peers do not accept a connection. A placement counts
//! against the chosen peer's last report until its next one, so a burst spreads. Lists are
//! served by the replica they reach (each lists what it holds).
//!
//! Peers: `[cluster] peers` (`name = "http://host:port"`), or, as a StatefulSet names its
//! pods, `[cluster] replicas`, `peer_dns` and `peer_port`: `<stem><i>` for every ordinal
//! `i` below `replicas`, at `http://<stem><i>.<peer_dns>:<peer_port>`, where `<stem>` is the
//! replica's own name without its ordinal (`AMPOULE_REPLICA=ampoule-2` → `ampoule-0`,
//! `ampoule-1`, `ampoule-2`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ApiError, Error, ErrorCode};
use crate::manager::Manager;

/// The header that marks a forwarded request; its value is the cluster secret.
pub const FORWARDED: &str = "x-ampoule-forwarded";

/// How long a peer may take to accept a connection before it counts as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a replica reports its [`Capacity`] to its peers (with the cluster secret in
/// [`FORWARDED`]; 401 without).
pub const CAPACITY_PATH: &str = "/cluster/v1/capacity";

/// How often each replica asks its peers for their capacity.
pub const LOAD_INTERVAL: Duration = Duration::from_millis(500);

/// A peer's report older than this (it stopped answering) is not used: the peer gets no new
/// sessions until it answers again.
const LOAD_STALE: Duration = Duration::from_secs(3);

/// Largest body of a new `/v1` session or sandbox, or of an E2B create, read to place it.
const CREATE_BODY: usize = 1 << 20;

/// Largest `/mcp` body read to place a tool call, unless [`Cluster::with_manager`] says.
const DEFAULT_MCP_BODY: usize = 64 << 20;

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
    /// This replica's core, whose free capacity placement compares with the peers' (none:
    /// every new session stays here).
    manager: Option<Manager>,
    /// The peers' last reported capacity, by token ([`Cluster::poll_loads`]).
    loads: Arc<Mutex<BTreeMap<String, Load>>>,
    /// Largest body read to place an `/mcp` call (its uploads ride in it).
    mcp_body: usize,
}

/// A peer's capacity and when it reported it.
#[derive(Debug, Clone)]
struct Load {
    at: Instant,
    capacity: Capacity,
}

/// What a replica reports at [`CAPACITY_PATH`]: its free session slots per pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// The replica's name.
    pub replica: String,
    /// Whether it is draining (it takes no new sessions; every pool reports 0 free).
    pub draining: bool,
    /// Free session slots (`max_sessions` less the sessions held) by pool.
    pub free: BTreeMap<String, usize>,
}

impl Capacity {
    /// `manager`'s capacity now.
    pub fn of(replica: &str, manager: &Manager) -> Self {
        let draining = manager.is_draining();
        let free = manager
            .pools()
            .into_iter()
            .map(|p| {
                let free = if draining {
                    0
                } else {
                    p.max_sessions.saturating_sub(p.sessions)
                };
                (p.name, free)
            })
            .collect();
        Self {
            replica: replica.to_owned(),
            draining,
            free,
        }
    }
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
            manager: None,
            loads: Arc::default(),
            mcp_body: DEFAULT_MCP_BODY,
        })
    }

    /// Places new sessions by load: `manager` is this replica's core (its capacity is
    /// reported to the peers and compared with theirs), `mcp_body` the largest `/mcp` body
    /// read to find the session a tool call names.
    #[must_use]
    pub fn with_manager(mut self, manager: Manager, mcp_body: usize) -> Self {
        self.manager = Some(manager);
        self.mcp_body = mcp_body;
        self
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
    pub async fn forward(&self, peer: &Peer, req: Request) -> Response {
        match self.send(peer, req).await {
            Ok(resp) => resp,
            Err(Unreached::Connect(why) | Unreached::Request(why)) => unavailable(peer, &why),
        }
    }

    /// A connection to `peer` (HTTP/1.1, one request).
    async fn connect(
        &self,
        peer: &Peer,
    ) -> Result<hyper::client::conn::http1::SendRequest<Body>, String> {
        let tcp = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&peer.authority),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(format!("connecting: {e}")),
            Err(_) => return Err("connecting: timed out".into()),
        };
        let _ = tcp.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "a connection to a peer ended");
            }
        });
        Ok(send)
    }

    /// Sends `req` to `peer`, marked as forwarded: its answer, streamed, or why not.
    async fn send(&self, peer: &Peer, mut req: Request) -> Result<Response, Unreached> {
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
                return Ok(
                    ApiError::new(ErrorCode::InvalidRequest, "a malformed request target")
                        .into_response(),
                );
            }
        }
        let headers = req.headers_mut();
        headers.remove(header::CONNECTION);
        headers.remove("keep-alive");
        let secret = HeaderValue::from_str(&self.secret)
            .map_err(|_| Unreached::Connect("the cluster secret is not a header value".into()))?;
        headers.insert(FORWARDED, secret);
        let mut send = self.connect(peer).await.map_err(Unreached::Connect)?;
        match send.send_request(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                parts.headers.remove(header::CONNECTION);
                parts.headers.remove("keep-alive");
                Ok(Response::from_parts(parts, Body::new(body)))
            }
            Err(e) => Err(Unreached::Request(format!("request: {e}"))),
        }
    }

    /// Asks `peer` for its [`Capacity`].
    async fn capacity_of(&self, peer: &Peer) -> Result<Capacity, String> {
        let ask = async {
            let mut send = self.connect(peer).await?;
            let req = axum::http::Request::get(CAPACITY_PATH)
                .header(header::HOST, &peer.authority)
                .header(FORWARDED, &*self.secret)
                .body(Body::empty())
                .map_err(|e| format!("building the request: {e}"))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("answered {}", resp.status()));
            }
            let body = axum::body::to_bytes(Body::new(resp.into_body()), 64 * 1024)
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            serde_json::from_slice(&body).map_err(|e| format!("the answer: {e}"))
        };
        tokio::time::timeout(LOAD_INTERVAL * 2, ask)
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    /// Asks every peer for its capacity every [`LOAD_INTERVAL`], for ever (spawn it).
    pub async fn poll_loads(self: Arc<Self>) {
        let mut tick = tokio::time::interval(LOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh_loads().await;
        }
    }

    /// Asks every peer for its capacity once; a peer that does not answer keeps its last
    /// report until that is stale.
    pub async fn refresh_loads(&self) {
        let asks = self
            .peers
            .iter()
            .filter(|(t, _)| **t != self.token)
            .map(|(t, p)| async move { (t.clone(), self.capacity_of(p).await) });
        for (t, got) in futures_util::future::join_all(asks).await {
            match got {
                Ok(capacity) => {
                    if let Ok(mut loads) = self.loads.lock() {
                        loads.insert(
                            t,
                            Load {
                                at: Instant::now(),
                                capacity,
                            },
                        );
                    }
                }
                Err(e) => tracing::debug!(peer = %t, error = %e, "no capacity report"),
            }
        }
    }

    /// The peer a new session of `pool` (`None`: the default pool) should start on: the
    /// replica with the most free slots for it, this one when it has as many as any (or no
    /// fresh report says otherwise). `None`: here.
    fn place(&self, pool: Option<&str>) -> Option<Peer> {
        let manager = self.manager.as_ref()?;
        let here = Capacity::of(&self.replica, manager);
        let pool = pool
            .map(|p| p.split_once(':').map_or(p, |(name, _)| name))
            .filter(|p| here.free.contains_key(*p))
            .unwrap_or(manager.default_pool());
        let mine = here.free.get(pool).copied().unwrap_or(0);
        let loads = self.loads.lock().ok()?;
        let (token, _) = loads
            .iter()
            .filter(|(t, l)| l.at.elapsed() < LOAD_STALE && self.peers.contains_key(*t))
            .filter_map(|(t, l)| Some((t, l.capacity.free.get(pool).copied()?)))
            .filter(|(_, free)| *free > mine)
            .max_by_key(|(t, free)| (*free, std::cmp::Reverse(*t)))?;
        self.peers.get(token).cloned()
    }

    /// Counts a session just started on `peer` against its last report, so the calls placed
    /// before its next report do not all go to it.
    fn took_one(&self, peer: &Peer, pool: Option<&str>) {
        if let Ok(mut loads) = self.loads.lock()
            && let Some(l) = loads.get_mut(&token(&peer.name))
        {
            let pool = pool
                .map(|p| p.split_once(':').map_or(p, |(name, _)| name))
                .filter(|p| l.capacity.free.contains_key(*p))
                .or_else(|| self.manager.as_ref().map(Manager::default_pool));
            if let Some(free) = pool.and_then(|p| l.capacity.free.get_mut(p)) {
                *free = free.saturating_sub(1);
            }
        }
    }

    /// Forgets `peer`'s report (it did not answer): no new sessions go to it until it
    /// reports again.
    fn lost(&self, peer: &Peer) {
        if let Ok(mut loads) = self.loads.lock() {
            loads.remove(&token(&peer.name));
        }
    }
}

/// Why a request did not reach a peer.
enum Unreached {
    /// Before the request went out (nothing happened there).
    Connect(String),
    /// After (the peer may have acted on it).
    Request(String),
}

/// 503 `replica_unavailable` for `peer`, logged.
fn unavailable(peer: &Peer, why: &str) -> Response {
    tracing::warn!(peer = %peer.name, error = %why, "replica unavailable");
    ApiError::new(
        ErrorCode::ReplicaUnavailable,
        format!(
            "replica {} holds this session and does not answer; try again later",
            peer.name
        ),
    )
    .into_response()
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
    /// The replica (token) that holds a session name (an ACA `identifier`, an MCP
    /// `session`, a `/v1` session's `identifier`): the replica a name ends in
    /// (`…_<token>`, as the names this replica generates do), else the one chosen by
    /// rendezvous hashing over every replica, so each one finds the same owner without
    /// asking, and a replica that joins or leaves moves only its own share of names.
    pub fn owner_of_name<'a>(&'a self, name: &'a str) -> &'a str {
        if let Some((_, t)) = name.rsplit_once('_')
            && (t == self.token || self.peers.contains_key(t))
        {
            return t;
        }
        self.owner_of_identifier(name)
    }

    /// The replica (token) chosen for `identifier` by rendezvous hashing over every
    /// replica.
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

/// A request that may start a session or sandbox, placed by [`create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Creation {
    /// `POST /v1/sessions`.
    Session,
    /// `POST /v1/sandboxes`.
    Sandbox,
    /// E2B's `POST /sandboxes`.
    E2b,
    /// `POST /mcp` (a tool call may start a session).
    Mcp,
}

fn creation(req: &Request) -> Option<Creation> {
    if req.method() != axum::http::Method::POST {
        return None;
    }
    match req.uri().path().trim_end_matches('/') {
        "/v1/sessions" => Some(Creation::Session),
        "/v1/sandboxes" => Some(Creation::Sandbox),
        "/sandboxes" => Some(Creation::E2b),
        "/mcp" => Some(Creation::Mcp),
        _ => None,
    }
}

/// Where a [`Creation`] goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    /// Served here (nothing is started, or it names nothing).
    Here,
    /// The owner of this session name.
    Named(String),
    /// A new session of this pool (`None`: the default), on the replica with most room.
    Load(Option<String>),
}

impl Creation {
    fn placement(self, body: &Value) -> Placement {
        let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        match self {
            Creation::Session => match str_of(body, "identifier") {
                Some(name) => Placement::Named(name),
                None => Placement::Load(str_of(body, "pool")),
            },
            Creation::Sandbox => Placement::Load(str_of(body, "pool")),
            Creation::E2b => Placement::Load(str_of(body, "templateID")),
            Creation::Mcp => {
                let params = body.get("params").unwrap_or(&Value::Null);
                match body.get("method").and_then(Value::as_str) {
                    Some("tools/call") => {}
                    // A session's file, by its resource URI.
                    Some("resources/read") => {
                        return params
                            .get("uri")
                            .and_then(Value::as_str)
                            .and_then(ampoule_mcp::tools::parse_file_uri)
                            .map_or(Placement::Here, |(session, _)| Placement::Named(session));
                    }
                    _ => return Placement::Here,
                }
                let args = params.get("arguments").unwrap_or(&Value::Null);
                if let Some(name) = str_of(args, "session").or_else(|| str_of(args, "sandbox_id")) {
                    return Placement::Named(name);
                }
                match params.get("name").and_then(Value::as_str) {
                    Some("execute_code" | "upload_file") => Placement::Load(None),
                    _ => Placement::Here,
                }
            }
        }
    }
}

/// A copy of a request (extensions aside) with `body`.
fn copy_of(parts: &axum::http::request::Parts, body: Bytes) -> Request {
    let mut req = Request::new(Body::from(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// Places a request that may start a session (see [`Creation`]): its body is read (up to a
/// limit) for the pool or name it gives, then it goes to the owner of the name, or to the
/// replica with the most free slots in the pool, or stays here.
async fn create(cluster: Arc<Cluster>, kind: Creation, req: Request, next: Next) -> Response {
    let limit = if kind == Creation::Mcp {
        cluster.mcp_body
    } else {
        CREATE_BODY
    };
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is unreadable or larger than {limit} bytes"),
        )
        .into_response();
    };
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let here = |parts, bytes| next.run(Request::from_parts(parts, Body::from(bytes)));
    match kind.placement(&json) {
        Placement::Here => here(parts, bytes).await,
        Placement::Named(name) => {
            let owner = cluster.owner_of_name(&name).to_owned();
            match cluster.peer(&owner).cloned() {
                Some(peer) => {
                    cluster
                        .forward(&peer, Request::from_parts(parts, Body::from(bytes)))
                        .await
                }
                None => here(parts, bytes).await,
            }
        }
        Placement::Load(pool) => {
            // A peer that does not answer is forgotten and the next best one asked; none
            // left with more room: here.
            while let Some(peer) = cluster.place(pool.as_deref()) {
                match cluster.send(&peer, copy_of(&parts, bytes.clone())).await {
                    Ok(resp) => {
                        if resp.status().is_success() {
                            cluster.took_one(&peer, pool.as_deref());
                        }
                        return resp;
                    }
                    Err(Unreached::Connect(why)) => {
                        // Nothing started there.
                        tracing::warn!(peer = %peer.name, error = %why,
                            "the replica chosen for a new session does not answer");
                        cluster.lost(&peer);
                    }
                    Err(Unreached::Request(why)) => return unavailable(&peer, &why),
                }
            }
            here(parts, bytes).await
        }
    }
}

/// The routing layer (see the module docs).
pub async fn route(State(cluster): State<Arc<Cluster>>, req: Request, next: Next) -> Response {
    let forwarded = req.headers().get(FORWARDED);
    if let Some(v) = forwarded
        && !cluster.is_secret(v)
    {
        return ApiError::new(
            ErrorCode::Unauthorized,
            "a forwarded request without the cluster secret",
        )
        .into_response();
    }
    if req.uri().path() == CAPACITY_PATH {
        return match (forwarded, &cluster.manager) {
            (Some(_), Some(m)) => axum::Json(Capacity::of(&cluster.replica, m)).into_response(),
            (Some(_), None) => ApiError::new(
                ErrorCode::NotFound,
                "this replica places no sessions by load",
            )
            .into_response(),
            (None, _) => ApiError::new(
                ErrorCode::Unauthorized,
                "a replica's capacity is for its peers (the cluster secret)",
            )
            .into_response(),
        };
    }
    if forwarded.is_some() {
        // Served here, never forwarded again.
        return next.run(req).await;
    }
    let token = match named_id(&req) {
        Some(id) => Manager::replica_of(&id).map(str::to_owned),
        None => aca_identifier(&req).map(|i| cluster.owner_of_name(&i).to_owned()),
    };
    if let Some(peer) = token.and_then(|t| cluster.peer(&t).cloned()) {
        return cluster.forward(&peer, req).await;
    }
    match creation(&req) {
        Some(kind) => create(cluster, kind, req, next).await,
        None => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn cluster() -> Cluster {
        let peers: BTreeMap<String, String> = (0..3)
            .map(|i| (format!("ampoule-{i}"), format!("http://10.0.0.{i}:8080")))
            .collect();
        Cluster::new("ampoule-0", &peers, "a-secret-of-16-chars").unwrap()
    }

    #[test]
    fn a_name_ending_in_a_replica_token_is_that_replicas_else_hashed() {
        let c = cluster();
        assert_eq!(c.owner_of_name("0123abcd_ampoule2"), "ampoule2");
        assert_eq!(c.owner_of_name("ses_0123_ampoule1"), "ampoule1");
        for name in ["conversation-1", "x_notareplica", "plain"] {
            assert_eq!(c.owner_of_name(name), c.owner_of_identifier(name), "{name}");
        }
        // Rendezvous spreads names over every replica.
        let owners: std::collections::BTreeSet<String> = (0..64)
            .map(|i| c.owner_of_name(&format!("n{i}")).to_owned())
            .collect();
        assert_eq!(owners.len(), 3, "{owners:?}");
        // Without a manager nothing is placed elsewhere by load.
        assert!(c.place(None).is_none());
    }

    #[test]
    fn what_a_new_session_request_names_decides_its_placement() {
        let load = |p: Option<&str>| Placement::Load(p.map(str::to_owned));
        let named = |n: &str| Placement::Named(n.to_owned());
        assert_eq!(Creation::Session.placement(&json!({})), load(None));
        assert_eq!(
            Creation::Session.placement(&json!({"pool": "py", "identifier": "c"})),
            named("c")
        );
        assert_eq!(
            Creation::Sandbox.placement(&json!({"pool": "py"})),
            load(Some("py"))
        );
        assert_eq!(
            Creation::E2b.placement(&json!({"templateID": "base:1"})),
            load(Some("base:1"))
        );
        let call = |name: &str, args: Value| {
            Creation::Mcp.placement(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": name, "arguments": args}}))
        };
        assert_eq!(
            call("execute_code", json!({"code": "1", "session": "s"})),
            named("s")
        );
        assert_eq!(call("execute_code", json!({"code": "1"})), load(None));
        assert_eq!(call("upload_file", json!({"path": "a"})), load(None));
        assert_eq!(
            call("pause_sandbox", json!({"sandbox_id": "sbx_1_ampoule1"})),
            named("sbx_1_ampoule1")
        );
        assert_eq!(call("list_sessions", json!({})), Placement::Here);
        let read = json!({"jsonrpc": "2.0", "id": 2, "method": "resources/read",
            "params": {"uri": ampoule_mcp::tools::file_uri("s2", "out/a.txt")}});
        assert_eq!(Creation::Mcp.placement(&read), named("s2"));
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}});
        assert_eq!(Creation::Mcp.placement(&init), Placement::Here);
        assert_eq!(Creation::Mcp.placement(&Value::Null), Placement::Here);
    }
}
