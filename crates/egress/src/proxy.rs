//! One proxied connection, from the sandbox's first byte to the end of the splice.
//!
//! The order is what makes the gateway safe: decide on the name before resolving it, check
//! every resolved address before connecting, connect to exactly a checked address, and only
//! then let a byte of the sandbox's through. Each connection produces exactly one event.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ampoule_types::EgressProtocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Shared;
use crate::events::{Decision, EventLog};
use crate::io::Prefixed;
use crate::policy::{Policy, Target, Verdict, split_host_port};
use crate::sniff::{MAX_PREFIX, Sniff, sniff};

/// How long the sandbox has to send its ClientHello or request head. Server-first protocols
/// (SSH, SMTP) send nothing and are refused when it runs out.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to one upstream address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many checked addresses are tried.
const MAX_ATTEMPTS: usize = 3;

/// What the first bytes said.
enum First {
    Sniffed(Sniff),
    Closed,
    TimedOut,
    Failed(std::io::Error),
}

async fn read_first(stream: &mut TcpStream, buf: &mut Vec<u8>) -> First {
    let mut chunk = [0u8; 4096];
    loop {
        match sniff(buf) {
            Sniff::NeedMore => {}
            other => return First::Sniffed(other),
        }
        if buf.len() >= MAX_PREFIX {
            return First::Sniffed(Sniff::Other("a request head that is too large"));
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return First::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return First::Failed(e),
        }
    }
}

/// The destination port the sandbox dialled, from the redirect's conntrack entry; `None` when
/// the connection was not redirected (its original destination is the gateway itself).
fn original_port(stream: &TcpStream) -> Option<u16> {
    let sock = socket2::SockRef::from(stream);
    let addr = sock
        .original_dst_v4()
        .or_else(|_| sock.original_dst_v6())
        .ok()?
        .as_socket()?;
    (Some(addr) != stream.local_addr().ok()).then_some(addr.port())
}

/// A refusal the sandbox can read: for plain HTTP a short 403 response, for anything else the
/// connection is simply closed (a TLS client would not understand text).
async fn refuse(client: &mut TcpStream, protocol: EgressProtocol, reason: &str) {
    if protocol == EgressProtocol::Http {
        let body = format!("ampoule egress gateway: blocked: {reason}\n");
        let resp = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\nX-Ampoule-Egress: blocked\r\n\r\n{body}",
            body.len()
        );
        let _ = client.write_all(resp.as_bytes()).await;
    }
    let _ = client.shutdown().await;
}

/// Serves one connection the kernel redirected from a sandbox to this gateway.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    log: Arc<EventLog>,
    mut client: TcpStream,
) {
    let dialled = original_port(&client);
    let mut buf = Vec::with_capacity(4096);
    let first =
        match tokio::time::timeout(FIRST_BYTES_TIMEOUT, read_first(&mut client, &mut buf)).await {
            Ok(f) => f,
            Err(_) => First::TimedOut,
        };
    // Every connection from a sandbox is redirected, so the kernel knows the port it dialled.
    // A connection made straight to the gateway (tests, development) has none: then the
    // `Host` header's port or the protocol's default stands in.
    let port = dialled.unwrap_or(match &first {
        First::Sniffed(Sniff::Http { host: Some(h), .. }) => {
            split_host_port(h).and_then(|(_, p)| p).unwrap_or(80)
        }
        First::Sniffed(Sniff::Tls(_)) => 443,
        _ => 0,
    });
    let tcp = EgressProtocol::Tcp;
    let (protocol, host) = match first {
        First::Sniffed(Sniff::Tls(Some(sni))) => (EgressProtocol::Tls, sni),
        First::Sniffed(Sniff::Tls(None)) => {
            log.record(Decision::blocked(
                "",
                port,
                EgressProtocol::Tls,
                "TLS without a server name (SNI)",
            ));
            return refuse(&mut client, EgressProtocol::Tls, "").await;
        }
        First::Sniffed(Sniff::Http { method, .. }) if method.eq_ignore_ascii_case("CONNECT") => {
            let reason = "CONNECT is not supported: connect directly, the gateway is transparent";
            log.record(Decision::blocked("", port, EgressProtocol::Http, reason));
            return refuse(&mut client, EgressProtocol::Http, reason).await;
        }
        First::Sniffed(Sniff::Http { host: Some(h), .. }) => (EgressProtocol::Http, h),
        First::Sniffed(Sniff::Http { host: None, .. }) => {
            let reason = "an HTTP request without exactly one Host header";
            log.record(Decision::blocked("", port, EgressProtocol::Http, reason));
            return refuse(&mut client, EgressProtocol::Http, reason).await;
        }
        First::Sniffed(Sniff::Other(why)) => {
            log.record(Decision::blocked("", port, tcp, why));
            return refuse(&mut client, tcp, why).await;
        }
        First::Sniffed(Sniff::NeedMore) | First::Closed => {
            log.record(Decision::blocked(
                "",
                port,
                tcp,
                "closed before sending a request",
            ));
            return;
        }
        First::TimedOut => {
            log.record(Decision::blocked(
                "",
                port,
                tcp,
                "sent no HTTP request or TLS ClientHello within 10 s",
            ));
            return refuse(&mut client, tcp, "").await;
        }
        First::Failed(e) => {
            log.record(Decision::blocked(
                "",
                port,
                tcp,
                format!("read failed: {e}"),
            ));
            return;
        }
    };
    let host_only = match protocol {
        EgressProtocol::Http => split_host_port(&host).map(|(h, _)| h.to_owned()),
        _ => Some(host.clone()),
    };
    let Some(target) = host_only.as_deref().and_then(Target::parse) else {
        let reason = format!("{host:?} is not a valid host");
        log.record(Decision::blocked(host, port, protocol, &reason));
        return refuse(&mut client, protocol, &reason).await;
    };
    let shown = target.as_string();
    if let Some(index) = policy.packages()
        && shown == crate::packages::INDEX_HOST
    {
        // The filtered package index is the gateway itself: nothing is connected to here.
        if protocol != EgressProtocol::Http {
            let reason = format!(
                "the package index is plain HTTP inside the sandbox: {}",
                crate::packages::INDEX_URL
            );
            log.record(Decision::blocked(&shown, port, protocol, &reason));
            return refuse(&mut client, protocol, &reason).await;
        }
        let conversation = crate::packages::Conversation {
            shared,
            index: index.clone(),
            log,
        };
        return conversation.serve(Prefixed::new(buf, client)).await;
    }
    let rule = match policy.check(&target, port) {
        Verdict::Allow(r) => r,
        Verdict::Deny(reason) => {
            log.record(Decision::blocked(&shown, port, protocol, &reason));
            return refuse(&mut client, protocol, &reason).await;
        }
    };
    let key = format!("{shown}:{port}");
    let rule = if policy.needs_approval(&target, port) && !log.is_approved(&key) {
        let verdict = match shared.approver.get() {
            None => Err("this connection needs an approver and none decides here".to_owned()),
            Some(a) => {
                let (session, execution) = log.context();
                a.approve(session, execution, shown.clone(), port).await
            }
        };
        match verdict {
            Ok(()) => {
                log.mark_approved(key);
                format!("{rule}, approved by an approver")
            }
            Err(reason) => {
                let reason = format!("held for approval: {reason}");
                log.record(Decision::blocked(&shown, port, protocol, &reason));
                return refuse(&mut client, protocol, &reason).await;
            }
        }
    } else {
        rule
    };
    let addrs = match checked_addresses(&shared, &policy, &target, port).await {
        Ok(a) => a,
        Err(reason) => {
            log.record(Decision::blocked(&shown, port, protocol, &reason));
            return refuse(&mut client, protocol, &reason).await;
        }
    };
    let (upstream, addr) = match connect(&addrs, port).await {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("{rule}, but connecting failed: {e}");
            log.record(Decision::blocked(&shown, port, protocol, &reason));
            return refuse(&mut client, protocol, &reason).await;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);

    let injection = policy.injection(&target).cloned();
    if protocol == EgressProtocol::Http || injection.is_some() {
        let io = crate::inject::Conversation {
            shared,
            log,
            target,
            port,
            addr,
            rule,
            injection,
            protocol,
        };
        let client = Prefixed::new(buf, client);
        match protocol {
            EgressProtocol::Tls => io.https(client, upstream).await,
            _ => io.http(client, upstream).await,
        }
        return;
    }

    log.record(Decision {
        host: shown,
        port,
        protocol,
        allowed: true,
        reason: rule,
        injected: false,
        address: Some(addr.to_string()),
    });
    splice(client, upstream, buf).await;
}

/// Resolves `target` once and keeps the addresses the policy accepts, in order.
pub(crate) async fn checked_addresses(
    shared: &Shared,
    policy: &Policy,
    target: &Target,
    port: u16,
) -> Result<Vec<IpAddr>, String> {
    let resolved = shared
        .resolver
        .resolve(target)
        .await
        .map_err(|e| format!("cannot resolve {target}: {e}"))?;
    let mut ok = Vec::new();
    let mut first_refusal = None;
    for ip in resolved.addrs {
        match policy.check_address(target, ip, Some(port), resolved.pinned) {
            Verdict::Allow(_) => ok.push(ip),
            Verdict::Deny(r) => {
                first_refusal.get_or_insert(r);
            }
        }
    }
    if ok.is_empty() {
        return Err(first_refusal.unwrap_or_else(|| format!("{target} has no addresses")));
    }
    Ok(ok)
}

/// Connects to the first checked address that answers.
pub(crate) async fn connect(
    addrs: &[IpAddr],
    port: u16,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    let mut last = std::io::Error::other("no address to connect to");
    for ip in addrs.iter().take(MAX_ATTEMPTS) {
        let addr = SocketAddr::new(*ip, port);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok((s, addr)),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last =
                    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{addr} timed out"))
            }
        }
    }
    Err(last)
}

/// Sends what the sandbox already sent, then copies both ways until either side is done.
async fn splice(mut client: TcpStream, mut upstream: TcpStream, first: Vec<u8>) {
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
