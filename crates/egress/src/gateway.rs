//! One sandbox's gateway: a TCP listener for the proxy and a UDP socket for DNS, both on the
//! sandbox's own host-side address, and the record of what they decided.
//!
//! The sockets are bound with `IP_FREEBIND` so the gateway can start before the runtime has
//! given the host side of the veth pair its address. Dropping the gateway stops both loops and
//! every connection they serve.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ampoule_types::{EgressEvent, EgressProtocol};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{Error, Result};
use crate::events::{Decision, EventLog};
use crate::policy::Policy;
use crate::{Endpoints, Shared};

/// Connections served at once per sandbox; more are refused, so a sandbox cannot exhaust the
/// supervisor's descriptors.
const MAX_CONNECTIONS: usize = 256;

/// A running gateway for one sandbox.
#[derive(Debug)]
pub struct Gateway {
    log: Arc<EventLog>,
    tasks: Vec<JoinHandle<()>>,
    proxy: SocketAddr,
    dns: SocketAddr,
}

fn bind(addr: SocketAddr, ty: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    socket.set_cloexec(true)?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

impl Gateway {
    pub(crate) fn start(
        shared: Arc<Shared>,
        at: Endpoints,
        policy: Arc<Policy>,
        label: &str,
    ) -> Result<Self> {
        let Endpoints { proxy, dns, peer } = at;
        // Registering sockets outside a runtime would panic: refuse instead.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::io(
                "starting the egress gateway",
                std::io::Error::other("not called within a tokio runtime"),
            ));
        }
        let tcp = bind(proxy, Type::STREAM, Protocol::TCP)
            .and_then(|s| {
                s.listen(1024)?;
                TcpListener::from_std(s.into())
            })
            .map_err(|e| Error::io(format!("binding the egress proxy to {proxy}"), e))?;
        let udp = bind(dns, Type::DGRAM, Protocol::UDP)
            .and_then(|s| UdpSocket::from_std(s.into()))
            .map_err(|e| Error::io(format!("binding the egress DNS responder to {dns}"), e))?;
        // The addresses actually bound (a port 0 asks the kernel to choose, in tests).
        let proxy = tcp.local_addr().unwrap_or(proxy);
        let dns = udp.local_addr().unwrap_or(dns);
        let log = Arc::new(EventLog::new(label));
        let tasks = vec![
            tokio::spawn(accept_loop(
                tcp,
                peer,
                shared.clone(),
                policy.clone(),
                log.clone(),
            )),
            tokio::spawn(crate::dns::serve(udp, peer, shared, policy, log.clone())),
        ];
        Ok(Self {
            log,
            tasks,
            proxy,
            dns,
        })
    }

    /// Every event so far (up to the cap), in order.
    pub fn events(&self) -> Vec<EgressEvent> {
        self.log.snapshot()
    }

    /// Every event since the last call, in order: what one execution of a session did.
    pub fn take_events(&self) -> Vec<EgressEvent> {
        self.log.drain()
    }

    /// Events that were logged but not kept because the cap was reached.
    pub fn dropped_events(&self) -> u64 {
        self.log.dropped()
    }

    /// Names the sandbox (or the current execution) in the logs from now on.
    pub fn set_label(&self, label: &str) {
        self.log.set_label(label);
    }

    /// Names the session and the execution that the decisions from now on belong to: the
    /// `session` and `execution` fields of every logged event (empty strings when unknown).
    pub fn set_context(&self, session: &str, execution: &str) {
        self.log.set_context(session, execution);
    }

    /// Where the proxy listens.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
    }

    /// Where the DNS responder listens.
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Whether `from` may use this gateway.
pub(crate) fn serves(peer: Option<IpAddr>, from: SocketAddr) -> bool {
    peer.is_none_or(|p| p.to_canonical() == from.ip().to_canonical())
}

async fn accept_loop(
    listener: TcpListener,
    peer: Option<IpAddr>,
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    log: Arc<EventLog>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Owning the connection tasks here means aborting this loop aborts them all.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((s, from)) if serves(peer, from) => s,
            Ok((_, from)) => {
                // Not the sandbox: someone on the host. Not the sandbox's event either.
                tracing::warn!(target: "ampoule::egress", %from, "egress proxy: refused a connection that is not from its sandbox");
                continue;
            }
            Err(e) => {
                // Out of descriptors, most likely: let some connections end first.
                tracing::warn!(error = %e, "egress proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            log.record(Decision::blocked(
                "",
                0,
                EgressProtocol::Tcp,
                format!("more than {MAX_CONNECTIONS} connections at once"),
            ));
            drop(stream);
            continue;
        };
        let (shared, policy, log) = (shared.clone(), policy.clone(), log.clone());
        conns.spawn(async move {
            crate::proxy::serve(shared, policy, log, stream).await;
            drop(permit);
        });
    }
}
