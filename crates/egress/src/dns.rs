//! The sandbox's DNS resolver: answers only for names the policy allows.
//!
//! Every UDP datagram a sandbox sends to port 53, whatever address it names, arrives here. An
//! `A` question for an allowed name is answered with the addresses the gateway itself resolved
//! and checked; `AAAA` gets an empty answer (the sandbox has no IPv6), as does any other type;
//! a name the policy does not allow gets `NXDOMAIN`. Nothing is forwarded: a denied name never
//! leaves the host, so DNS cannot be used as a tunnel through names nobody allowed. The answer
//! is a convenience, not a permission: the proxy checks every connection again by name.

use std::net::IpAddr;
use std::sync::Arc;

use ampoule_types::EgressProtocol;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Shared;
use crate::events::{Decision, EventLog};
use crate::policy::{Policy, Target, Verdict};

/// Questions answered at once per sandbox; beyond it datagrams are dropped (UDP may be).
const MAX_IN_FLIGHT: usize = 64;
/// TTL of answers: short, so a changed pin or policy shows soon.
const TTL: u32 = 30;

/// Serves DNS on `socket` until the task is aborted.
pub(crate) async fn serve(
    socket: UdpSocket,
    peer: Option<std::net::IpAddr>,
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    log: Arc<EventLog>,
) {
    // The package index's name is answered with the gateway's own address (every TCP
    // connection of the sandbox reaches the gateway anyway).
    let here = match socket.local_addr().map(|a| a.ip()) {
        Ok(IpAddr::V4(v4)) if !v4.is_unspecified() => v4,
        _ => std::net::Ipv4Addr::LOCALHOST,
    };
    let socket = Arc::new(socket);
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; 4096];
    loop {
        while tasks.try_join_next().is_some() {}
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "dns receive failed");
                continue;
            }
        };
        if !crate::gateway::serves(peer, from) {
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, shared, policy, log) =
            (socket.clone(), shared.clone(), policy.clone(), log.clone());
        tasks.spawn(async move {
            if let Some(reply) = answer(&query, &shared, &policy, &log, here).await {
                let _ = socket.send_to(&reply, from).await;
            }
            drop(permit);
        });
    }
}

/// The reply to one datagram, or `None` when it is not a DNS query worth answering.
pub(crate) async fn answer(
    query: &[u8],
    shared: &Shared,
    policy: &Policy,
    log: &EventLog,
    here: std::net::Ipv4Addr,
) -> Option<Vec<u8>> {
    let Ok(msg) = Message::from_vec(query) else {
        log.record(Decision::blocked(
            "",
            53,
            EgressProtocol::Dns,
            "a datagram that is not a DNS message",
        ));
        return None;
    };
    if msg.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(msg.metadata.id, msg.metadata.op_code);
    resp.metadata.recursion_desired = msg.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    let reply = |mut resp: Message, code: ResponseCode| {
        resp.metadata.response_code = code;
        resp.to_vec().ok()
    };
    if msg.metadata.op_code != OpCode::Query || msg.queries.len() != 1 {
        return reply(resp, ResponseCode::NotImp);
    }
    let q = msg.queries[0].clone();
    resp.add_query(q.clone());
    let raw = q.name().to_ascii();
    let dns = EgressProtocol::Dns;
    let target = match Target::parse(&raw) {
        Some(t @ Target::Name(_)) => t,
        _ => {
            log.record(Decision::blocked(raw, 53, dns, "not a valid host name"));
            return reply(resp, ResponseCode::NXDomain);
        }
    };
    let shown = target.as_string();
    if policy.packages().is_some() && shown == crate::packages::INDEX_HOST {
        if q.query_type() == RecordType::A {
            resp.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(here))));
        }
        return reply(resp, ResponseCode::NoError);
    }
    let rule = match policy.check_name(&target) {
        Verdict::Allow(r) => r,
        Verdict::Deny(reason) => {
            log.record(Decision::blocked(shown, 53, dns, reason));
            return reply(resp, ResponseCode::NXDomain);
        }
    };
    if q.query_type() != RecordType::A {
        // No IPv6 in the sandbox and nothing else to say: an empty, successful answer, so
        // clients fall back to the A record. Not recorded: it carries no decision.
        return reply(resp, ResponseCode::NoError);
    }
    let resolved = match shared.resolver.resolve(&target).await {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("{rule}, but it cannot be resolved: {e}");
            log.record(Decision::blocked(shown, 53, dns, reason));
            return reply(resp, ResponseCode::ServFail);
        }
    };
    let mut answers = Vec::new();
    let mut refusal = None;
    for ip in &resolved.addrs {
        match (
            ip,
            policy.check_address(&target, *ip, None, resolved.pinned),
        ) {
            (IpAddr::V4(v4), Verdict::Allow(_)) => answers.push(*v4),
            (_, Verdict::Deny(r)) => {
                refusal.get_or_insert(r);
            }
            (IpAddr::V6(_), Verdict::Allow(_)) => {}
        }
    }
    if answers.is_empty() {
        let reason = refusal.unwrap_or_else(|| format!("{shown} has no IPv4 address"));
        log.record(Decision::blocked(shown, 53, dns, reason));
        return reply(resp, ResponseCode::NoError);
    }
    log.record(Decision {
        host: shown,
        port: 53,
        protocol: dns,
        allowed: true,
        reason: rule,
        injected: false,
        address: Some(
            answers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
    });
    for v4 in answers {
        resp.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(v4))));
    }
    reply(resp, ResponseCode::NoError)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    fn shared() -> Shared {
        Shared {
            resolver: crate::resolve::Resolver::new(&BTreeMap::from([
                ("api.test".to_owned(), "10.77.0.2".to_owned()),
                ("meta.test".to_owned(), "169.254.169.254".to_owned()),
                ("denied.test".to_owned(), "10.77.0.2".to_owned()),
            ]))
            .unwrap(),
            authority: crate::ca::Authority::generate().unwrap(),
            upstream: crate::tls::Upstream::new(Vec::new()),
            approver: std::sync::OnceLock::new(),
        }
    }

    fn ask(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    async fn reply(name: &str, kind: RecordType, log: &EventLog) -> Message {
        let policy = Policy::allowing(&["api.test:443", "meta.test"]).unwrap();
        let out = answer(
            &ask(name, kind),
            &shared(),
            &policy,
            log,
            std::net::Ipv4Addr::LOCALHOST,
        )
        .await
        .unwrap();
        Message::from_vec(&out).unwrap()
    }

    #[tokio::test]
    async fn only_allowed_names_get_addresses() {
        let log = EventLog::new("test");
        let ok = reply("api.test.", RecordType::A, &log).await;
        assert_eq!(ok.metadata.id, 4242);
        assert_eq!(ok.metadata.response_code, ResponseCode::NoError);
        assert_eq!(ok.answers.len(), 1);
        assert_eq!(
            ok.answers[0].data,
            RData::A(A("10.77.0.2".parse().unwrap()))
        );

        let v6 = reply("api.test.", RecordType::AAAA, &log).await;
        assert_eq!(v6.metadata.response_code, ResponseCode::NoError);
        assert!(v6.answers.is_empty());

        let denied = reply("denied.test.", RecordType::A, &log).await;
        assert_eq!(denied.metadata.response_code, ResponseCode::NXDomain);
        assert!(denied.answers.is_empty());

        // Allowed by name, but pinned to the metadata address: no answer.
        let meta = reply("meta.test.", RecordType::A, &log).await;
        assert!(meta.answers.is_empty());

        let events = log.snapshot();
        let summary: Vec<(&str, bool)> = events
            .iter()
            .map(|e| (e.host.as_str(), e.allowed))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("api.test", true),
                ("denied.test", false),
                ("meta.test", false)
            ]
        );
    }

    #[tokio::test]
    async fn garbage_is_recorded_and_not_answered() {
        let log = EventLog::new("test");
        let policy = Policy::default();
        assert!(
            answer(
                b"\x01\x02",
                &shared(),
                &policy,
                &log,
                std::net::Ipv4Addr::LOCALHOST
            )
            .await
            .is_none()
        );
        assert_eq!(log.snapshot().len(), 1);
    }
}
