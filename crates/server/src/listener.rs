//! The listeners (the API's and the metrics'): accepting connections, and holding against
//! clients that would exhaust the server without ever making a valid request.
//!
//! What a connection must do, or be closed:
//! - send a whole request head within `header_timeout` of opening (TLS handshake included),
//!   or of the first byte of a later request (a slow-header client is closed, however
//!   little it trickles);
//! - keep a request body coming: no pause longer than `body_timeout` while the server
//!   reads it (the request fails);
//! - between requests, not stay idle longer than `keepalive_timeout`.
//!
//! While a request is being answered nothing is timed here: a streaming execution's response
//! lasts as long as the execution's own timeout allows, however long it stays silent.
//!
//! Connections are counted per listener, in total and per client address (IPv6 by /64); past
//! either cap a new connection is answered `503 too_many_connections` (on plain HTTP) and
//! closed at once, before it costs a task or a buffer. Each request carries its client's
//! address ([`ClientAddr`]) for the throttle on failed authentications ([`crate::auth`]).
//!
//! Hand-written because hyper's own `header_read_timeout` is one timer for "idle between
//! requests" and "reading the head" together (so it cannot give a long keep-alive and a short
//! head deadline at once), and no crate counts connections per address for a hyper server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tower::Service;

use crate::auth::ClientAddr;
use crate::metrics::DoorMetrics;

/// The listeners' timeouts and caps (`[server]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// To send a whole request head.
    pub header_timeout: Duration,
    /// Longest pause in a request body.
    pub body_timeout: Duration,
    /// Longest idle time between requests.
    pub keepalive_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
    /// Most connections at once from one address.
    pub max_connections_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_connections_per_address: 512,
        }
    }
}

impl Limits {
    /// The same limits, with `max_connections` at most three quarters of the process's
    /// open-file limit (the rest is for sandboxes, the audit store and the egress gateway).
    pub fn within_open_files(mut self) -> Self {
        use nix::sys::resource::{Resource, getrlimit};
        if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let room = usize::try_from(soft.saturating_mul(3) / 4).unwrap_or(usize::MAX);
            self.max_connections = self.max_connections.min(room.max(64));
        }
        self
    }
}

/// Descriptors the server holds for each live session (its control socket, pipes, pidfd,
/// scratch directory and cgroup files: 14 measured, with room).
pub const FILES_PER_SESSION: u64 = 16;

/// Raises the process's open-file limit to what `needed` descriptors take: the soft limit to
/// the hard one, and past the hard one up to `fs.nr_open` when the process may
/// (`CAP_SYS_RESOURCE`, root). Each connection and each live session holds descriptors, and
/// the configured caps, not a default of 1024 or a service manager's 20,000, decide how many
/// (3,000 sessions need ~48,000). Warns when the limit stays below `needed`.
pub fn raise_open_files(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let wanted = hard.max(needed.min(ceiling));
    let set = if wanted > hard {
        setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted)
            .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard, hard))
    } else if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    } else {
        Ok(())
    };
    if let Err(e) = set {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    if let Ok((now, _)) = getrlimit(Resource::RLIMIT_NOFILE)
        && now < needed
    {
        tracing::warn!(
            limit = now,
            needed,
            "the open-file limit is below what the pools' max_sessions and the door's \
             max_connections may hold: sessions past it fail to start (raise LimitNOFILE)"
        );
    }
}

/// Why a connection was closed by the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No whole request head in time.
    HeaderTimeout,
    /// Idle between requests for too long.
    IdleTimeout,
}

impl Closed {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds `max_connections`.
    Total,
    /// The address holds `max_connections_per_address`.
    PerAddress,
}

impl Refused {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerAddress => "per_address",
        }
    }
}

/// A listener's connection counts.
struct Admission {
    limits: Limits,
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it gives its place back.
struct Ticket {
    admission: Arc<Admission>,
    addr: IpAddr,
}

impl Admission {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let addr = group(ip);
        let mut c = self.counts.lock().map_err(|_| Refused::Total)?;
        if c.0 >= self.limits.max_connections {
            return Err(Refused::Total);
        }
        let n = c.1.entry(addr).or_insert(0);
        if *n >= self.limits.max_connections_per_address {
            return Err(Refused::PerAddress);
        }
        *n += 1;
        c.0 += 1;
        Ok(Ticket {
            admission: self.clone(),
            addr,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut c) = self.admission.counts.lock() {
            c.0 = c.0.saturating_sub(1);
            if let Some(n) = c.1.get_mut(&self.addr) {
                *n -= 1;
                if *n == 0 {
                    c.1.remove(&self.addr);
                }
            }
        }
    }
}

/// The address a connection counts against: IPv4 as is, IPv6 by its /64 (one host or one
/// customer usually holds a whole /64).
pub(crate) fn group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// Where a connection is in its life, for its deadlines.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request's first byte (`first`: the connection's first request).
    Waiting { since: Instant, first: bool },
    /// Reading a request head that began at `since`.
    Head { since: Instant },
    /// `n` requests being answered.
    Busy { n: usize },
}

/// A connection's phase, shared by its reader, its service and its watchdog.
struct Clock {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Clock {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Waiting {
                since: Instant::now(),
                first: true,
            }),
            changed: Notify::new(),
        }
    }

    fn set(&self, f: impl FnOnce(Phase) -> Phase) {
        if let Ok(mut p) = self.phase.lock() {
            *p = f(*p);
        }
        self.changed.notify_one();
    }

    /// Bytes arrived. (Bytes of a next request that arrived with the previous one are not
    /// seen here; that request is timed as idle, by the keep-alive timeout.)
    fn read(&self) {
        let Ok(mut p) = self.phase.lock() else {
            return;
        };
        if let Phase::Waiting { since, first } = *p {
            // The first request's head is timed from the opening of the connection.
            let since = if first { since } else { Instant::now() };
            *p = Phase::Head { since };
            drop(p);
            self.changed.notify_one();
        }
    }

    fn started(&self) {
        self.set(|p| match p {
            Phase::Busy { n } => Phase::Busy { n: n + 1 },
            _ => Phase::Busy { n: 1 },
        });
    }

    fn finished(&self) {
        self.set(|p| match p {
            Phase::Busy { n } if n > 1 => Phase::Busy { n: n - 1 },
            _ => Phase::Waiting {
                since: Instant::now(),
                first: false,
            },
        });
    }

    fn deadline(&self, l: &Limits) -> Option<(Instant, Closed)> {
        match *self.phase.lock().ok()? {
            Phase::Waiting { since, first: true } | Phase::Head { since } => {
                Some((since + l.header_timeout, Closed::HeaderTimeout))
            }
            Phase::Waiting {
                since,
                first: false,
            } => Some((since + l.keepalive_timeout, Closed::IdleTimeout)),
            Phase::Busy { .. } => None,
        }
    }

    /// Resolves when the connection has missed a deadline, with which.
    async fn overdue(&self, l: &Limits) -> Closed {
        loop {
            let changed = self.changed.notified();
            match self.deadline(l) {
                None => changed.await,
                Some((at, why)) => {
                    if at <= Instant::now() {
                        return why;
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

/// The connection's stream, telling its clock when bytes arrive.
struct Watched<I> {
    io: I,
    clock: Arc<Clock>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A request being answered; dropped when its response has been written (or abandoned).
struct InFlight(Arc<Clock>);

impl InFlight {
    fn new(clock: Arc<Clock>) -> Self {
        clock.started();
        Self(clock)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished();
    }
}

/// A response body that holds its request's [`InFlight`] until hyper has written it.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that fails when the client pauses longer than `limit` while it is read.
struct Paced {
    body: Incoming,
    limit: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The error of a request body that stalled.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for longer than the server's body timeout")]
pub struct BodyTimeout;

impl hyper::body::Body for Paced {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.deadline = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = this.limit;
        let sleep = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A listener: what it serves, with which limits, counted under which name.
#[derive(Clone)]
pub struct Door {
    name: &'static str,
    limits: Arc<Limits>,
    admission: Arc<Admission>,
    metrics: DoorMetrics,
}

impl Door {
    /// The listener `name` (`api`, `metrics`) with `limits`.
    pub fn new(name: &'static str, limits: Limits, metrics: DoorMetrics) -> Self {
        Self {
            name,
            admission: Arc::new(Admission {
                limits: limits.clone(),
                counts: Mutex::new((0, HashMap::new())),
            }),
            limits: Arc::new(limits),
            metrics,
        }
    }

    /// Serves `router` on `tcp` (through TLS when `tls` is given) until `stop` resolves;
    /// then stops accepting, asks every connection to finish its current response and waits
    /// for them (the caller bounds that wait).
    pub async fn serve(
        self,
        tcp: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        router: Router,
        stop: impl Future<Output = ()> + Send,
    ) {
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut conns = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = tcp.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of descriptors and the like: wait instead of spinning.
                            tracing::warn!(error = %e, listener = self.name, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let ticket = match self.admission.admit(peer.ip()) {
                        Ok(t) => t,
                        Err(why) => {
                            self.metrics.refused(self.name, why.as_str());
                            refuse(stream, tls.is_none(), why);
                            continue;
                        }
                    };
                    let door = self.clone();
                    let router = router.clone();
                    let tls = tls.clone();
                    let drain = drain_rx.clone();
                    conns.spawn(async move {
                        door.connection(stream, peer, tls, router, drain, ticket).await;
                    });
                }
            }
        }
        drop(tcp);
        let _ = drain_tx.send(true);
        while conns.join_next().await.is_some() {}
    }

    async fn connection(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        router: Router,
        drain: watch::Receiver<bool>,
        _ticket: Ticket,
    ) {
        let _ = stream.set_nodelay(true);
        let _open = self.metrics.open(self.name);
        let clock = Arc::new(Clock::new());
        match tls {
            None => {
                let io = Watched {
                    io: stream,
                    clock: clock.clone(),
                };
                self.http(io, peer, router, clock, drain).await;
            }
            Some(acceptor) => {
                // The handshake counts against the first request's head deadline.
                let handshake =
                    tokio::time::timeout(self.limits.header_timeout, acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(tls)) => {
                        let io = Watched {
                            io: tls,
                            clock: clock.clone(),
                        };
                        self.http(io, peer, router, clock, drain).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => {
                        self.metrics
                            .closed(self.name, Closed::HeaderTimeout.as_str());
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            }
        }
    }

    async fn http<I>(
        &self,
        io: Watched<I>,
        peer: SocketAddr,
        router: Router,
        clock: Arc<Clock>,
        mut drain: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let body_timeout = self.limits.body_timeout;
        let svc_clock = clock.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_flight = InFlight::new(svc_clock.clone());
            let mut router = router.clone();
            async move {
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(ClientAddr(peer));
                let body = Body::new(Paced {
                    body,
                    limit: body_timeout,
                    deadline: None,
                });
                let resp = match router.call(Request::from_parts(parts, body)).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                }))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            // The clock times heads; hyper's own timer would also close idle connections.
            .header_read_timeout(None)
            .keep_alive(true);
        let conn = builder
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        tokio::pin!(conn);
        let mut draining = *drain.borrow();
        if draining {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                why = clock.overdue(&self.limits) => {
                    self.metrics.closed(self.name, why.as_str());
                    tracing::debug!(%peer, reason = why.as_str(), "connection closed by the door");
                    return;
                }
                changed = drain.changed(), if !draining => {
                    draining = true;
                    if changed.is_ok() {
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// Answers a refused connection without waiting for it: a 503 when the listener speaks plain
/// HTTP and the socket takes it at once, then the connection is closed.
fn refuse(stream: TcpStream, plain: bool, why: Refused) {
    if plain {
        let body = format!(
            "{{\"error\":{{\"code\":\"too_many_connections\",\"message\":\"the server holds as many \
             connections as it allows ({})\"}}}}",
            match why {
                Refused::Total => "in total",
                Refused::PerAddress => "from this address",
            }
        );
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = stream.try_write(format!("{head}{body}").as_bytes());
    }
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_listener_and_per_address_group() {
        let a = Arc::new(Admission {
            limits: Limits {
                max_connections: 3,
                max_connections_per_address: 2,
                ..Limits::default()
            },
            counts: Mutex::new((0, HashMap::new())),
        });
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t1 = a.admit(ip("10.0.0.1")).unwrap();
        let _t2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::PerAddress));
        // The same /64 is one address; another /64 is not.
        let _t3 = a.admit(ip("2001:db8::1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.2")).err(), Some(Refused::Total));
        drop(t1);
        assert!(a.admit(ip("10.0.0.1")).is_ok());
        assert_eq!(group(ip("2001:db8::1")), group(ip("2001:db8::ffff")));
        assert_ne!(group(ip("2001:db8::1")), group(ip("2001:db8:0:1::1")));
        assert_eq!(group(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_times_heads_idleness_and_never_a_busy_connection() {
        let l = Limits {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let c = Clock::new();
        let t0 = Instant::now();
        // A new connection: its head is due 10 s after opening, whenever bytes come.
        tokio::time::advance(Duration::from_secs(4)).await;
        c.read();
        assert_eq!(
            c.deadline(&l),
            Some((t0 + l.header_timeout, Closed::HeaderTimeout))
        );
        c.started();
        assert_eq!(c.deadline(&l), None);
        // Busy for an hour: never overdue.
        let overdue = tokio::time::timeout(Duration::from_secs(3600), c.overdue(&l)).await;
        assert!(overdue.is_err());
        c.finished();
        let idle_from = Instant::now();
        assert_eq!(
            c.deadline(&l),
            Some((idle_from + l.keepalive_timeout, Closed::IdleTimeout))
        );
        assert_eq!(c.overdue(&l).await, Closed::IdleTimeout);
        assert_eq!(Instant::now(), idle_from + l.keepalive_timeout);
    }
}
