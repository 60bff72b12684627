#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

//! The gateway in-process, without root: real sockets on loopback, real HTTP and TLS upstream
//! servers, connections made straight to the gateway (the kernel redirect of a real sandbox is
//! covered by `crates/cli/tests/egress.rs`). Loopback is restricted by policy, so every test
//! allows `127.0.0.1` explicitly with an IP-literal rule.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ampoule_egress::{
    Egress, EgressSettings, Endpoints, Gateway, InjectRule, Policy, PolicyConfig,
};
use ampoule_types::EgressProtocol;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "Bearer t0k3n-from-the-host";

/// Request heads the upstream received.
type Seen = Arc<Mutex<Vec<String>>>;

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

async fn respond<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, seen: Seen) {
    let head = read_head(&mut s).await;
    seen.lock().unwrap().push(head);
    let _ = s
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nupstream")
        .await;
    let _ = s.shutdown().await;
}

/// A plain HTTP upstream on loopback.
async fn http_upstream() -> (u16, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (c, _) = l.accept().await.unwrap();
            tokio::spawn(respond(c, s.clone()));
        }
    });
    (port, seen)
}

/// A test CA and an HTTPS upstream for `name` signed by it.
struct TlsUpstream {
    port: u16,
    seen: Seen,
    ca_pem: String,
}

/// On port 443: a connection made straight to the gateway carries no dialled port, and for TLS
/// the gateway then assumes 443. `None` when this user may not bind it.
async fn https_upstream(name: &str) -> Option<TlsUpstream> {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:443").await.ok()?;
    let port = l.local_addr().unwrap().port();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (c, _) = l.accept().await.unwrap();
            let (acceptor, s) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(c).await {
                    respond(tls, s).await;
                }
            });
        }
    });
    Some(TlsUpstream {
        port,
        seen,
        ca_pem: ca_cert.pem(),
    })
}

fn gateway(egress: &Egress, policy: Policy) -> Gateway {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let at = Endpoints {
        proxy: any,
        dns: any,
        peer: None,
    };
    egress.start(at, Arc::new(policy), "test").unwrap()
}

fn policy(allow: &[&str], inject: bool) -> Policy {
    Policy::compile(
        &PolicyConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: vec![],
            inject: if inject {
                vec![InjectRule {
                    host: "up.test".into(),
                    header: "Authorization".into(),
                    value_from_env: Some("TEST_TOKEN".into()),
                    oauth2: None,
                }]
            } else {
                vec![]
            },
        },
        |k| (k == "TEST_TOKEN").then(|| TOKEN.to_owned()),
    )
    .unwrap()
}

fn pins() -> BTreeMap<String, String> {
    BTreeMap::from([("up.test".to_owned(), "127.0.0.1".to_owned())])
}

async fn http_get(gw: &Gateway, host: &str, extra: &str) -> String {
    let mut c = TcpStream::connect(gw.proxy_addr()).await.unwrap();
    c.write_all(format!("GET /x HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out).await;
    out
}

async fn https_get(
    gw: &Gateway,
    name: &str,
    port: u16,
    trust_pem: &str,
) -> std::io::Result<String> {
    https_get_at(gw.proxy_addr(), name, port, trust_pem).await
}

async fn https_get_at(
    at: SocketAddr,
    name: &str,
    port: u16,
    trust_pem: &str,
) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(trust_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(at).await?;
    tcp.set_nodelay(true)?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await?;
    tls.write_all(
        format!("GET /s HTTP/1.1\r\nHost: {name}:{port}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out).await;
    Ok(out)
}

#[tokio::test]
async fn http_is_decided_by_host_and_denials_never_reach_upstream() {
    let (port, seen) = http_upstream().await;
    let egress = Egress::new(&EgressSettings {
        hosts: pins(),
        ..EgressSettings::default()
    })
    .unwrap();
    let gw = gateway(&egress, policy(&["up.test", "127.0.0.1"], false));

    let ok = http_get(&gw, &format!("up.test:{port}"), "").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("upstream"));
    let denied = http_get(&gw, &format!("other.test:{port}"), "").await;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(denied.contains("no rule allows other.test"), "{denied}");
    let garbage = {
        let mut c = TcpStream::connect(gw.proxy_addr()).await.unwrap();
        c.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        out
    };
    assert!(garbage.is_empty());

    // Keep-alive cannot carry a second request to another name (domain fronting): the second
    // request is refused by the gateway, the first is answered.
    let fronted = {
        let mut c = TcpStream::connect(gw.proxy_addr()).await.unwrap();
        c.write_all(
            format!(
                "GET /1 HTTP/1.1\r\nHost: up.test:{port}\r\n\r\n\
                 GET /2 HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out).await;
        out
    };
    assert!(fronted.starts_with("HTTP/1.1 200"), "{fronted}");
    let heads = seen.lock().unwrap().clone();
    assert_eq!(
        heads.len(),
        2,
        "only the allowed requests arrived: {heads:?}"
    );
    assert!(heads.iter().all(|h| !h.contains("other.test")), "{heads:?}");
    let events = gw.events();
    let got: Vec<(EgressProtocol, &str, bool)> = events
        .iter()
        .map(|e| (e.protocol, e.host.as_str(), e.allowed))
        .collect();
    assert_eq!(
        got[..3],
        [
            (EgressProtocol::Http, "up.test", true),
            (EgressProtocol::Http, "other.test", false),
            (EgressProtocol::Tcp, "", false),
        ]
    );
    assert_eq!(
        events[0].address.as_deref(),
        Some(&*format!("127.0.0.1:{port}"))
    );
}

#[tokio::test]
async fn only_the_sandbox_may_use_its_gateway() {
    let (port, seen) = http_upstream().await;
    let egress = Egress::new(&EgressSettings {
        hosts: pins(),
        ..EgressSettings::default()
    })
    .unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let at = Endpoints {
        proxy: any,
        dns: any,
        // The sandbox is 127.0.0.2; this test connects from 127.0.0.1, like a local user.
        peer: Some("127.0.0.2".parse().unwrap()),
    };
    let gw = egress
        .start(
            at,
            Arc::new(policy(&["up.test", "127.0.0.1"], true)),
            "test",
        )
        .unwrap();
    let out = http_get(&gw, &format!("up.test:{port}"), "").await;
    assert!(out.is_empty(), "{out}");
    assert!(seen.lock().unwrap().is_empty());
    assert!(gw.events().is_empty());
    // From the sandbox's address it works.
    let from = tokio::net::TcpSocket::new_v4().unwrap();
    from.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut c = from.connect(gw.proxy_addr()).await.unwrap();
    c.write_all(format!("GET / HTTP/1.1\r\nHost: up.test:{port}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn http_injection_replaces_the_header() {
    let (port, seen) = http_upstream().await;
    let egress = Egress::new(&EgressSettings {
        hosts: pins(),
        ..EgressSettings::default()
    })
    .unwrap();
    let gw = gateway(&egress, policy(&["up.test", "127.0.0.1"], true));
    let out = http_get(
        &gw,
        &format!("up.test:{port}"),
        "Authorization: Bearer forged\r\nConnection: close\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    let head = heads[0].to_ascii_lowercase();
    assert!(
        head.contains(&format!("authorization: {}", TOKEN.to_ascii_lowercase())),
        "{head}"
    );
    assert!(!head.contains("forged"), "{head}");
    let ev = &gw.events()[0];
    assert!(ev.allowed && ev.injected, "{ev:?}");
}

#[tokio::test]
async fn https_passes_through_untouched_without_a_rule_and_is_terminated_with_one() {
    let Some(up) = https_upstream("up.test").await else {
        eprintln!("skipped: cannot bind 127.0.0.1:443 (needs root or a free port 443)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("ampoule-egress-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, &up.ca_pem).unwrap();
    let egress = Egress::new(&EgressSettings {
        hosts: pins(),
        extra_roots: vec![ca_file],
    })
    .unwrap();

    // No injection: the client talks TLS with the upstream itself (it trusts the upstream's
    // CA, and the gateway's CA is not offered at all).
    let plain = policy(&["up.test", "127.0.0.1"], false);
    assert!(egress.trusted_ca_pem(&plain).is_none());
    let gw = gateway(&egress, plain);
    let out = https_get(&gw, "up.test", up.port, &up.ca_pem)
        .await
        .unwrap();
    assert!(out.ends_with("upstream"), "{out}");
    assert!(
        !up.seen.lock().unwrap()[0]
            .to_ascii_lowercase()
            .contains("authorization")
    );
    // A name the policy does not allow is cut off before any byte reaches the upstream.
    assert!(
        https_get(&gw, "evil.test", up.port, &up.ca_pem)
            .await
            .is_err()
    );
    assert_eq!(up.seen.lock().unwrap().len(), 1);
    let ev = gw.events();
    assert_eq!(ev.len(), 2);
    assert!(ev[0].allowed && !ev[0].injected && ev[0].protocol == EgressProtocol::Tls);
    assert!(!ev[1].allowed && ev[1].host == "evil.test");
    drop(gw);

    // With injection: the client must trust the gateway's CA, and the upstream sees the token.
    let inject = policy(&["up.test", "127.0.0.1"], true);
    let gateway_ca = egress.trusted_ca_pem(&inject).unwrap();
    let gw = gateway(&egress, inject);
    // Trusting only the upstream's CA, the client refuses the gateway's certificate.
    assert!(
        https_get(&gw, "up.test", up.port, &up.ca_pem)
            .await
            .is_err()
    );
    let out = https_get(&gw, "up.test", up.port, &gateway_ca)
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", gw.events()));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let heads = up.seen.lock().unwrap().clone();
    let last = heads.last().unwrap().to_ascii_lowercase();
    assert!(last.contains(&TOKEN.to_ascii_lowercase()), "{last}");
    let ev = gw.events();
    assert!(!ev[0].allowed, "{:?}", ev[0]);
    assert!(ev[1].allowed && ev[1].injected, "{:?}", ev[1]);
    let _ = std::fs::remove_dir_all(dir);
}

/// What the gateway's code adds to one HTTPS request on a new connection, without the sandbox
/// (no veth, no redirect): direct, through the gateway passed through, and through the gateway
/// with TLS terminated and a header injected, interleaved so machine noise hits all three
/// alike. `cargo test --release -p ampoule-egress --test gateway -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn proxy_overhead() {
    let Some(up) = https_upstream("up.test").await else {
        eprintln!("skipped: cannot bind 127.0.0.1:443");
        return;
    };
    let dir = std::env::temp_dir().join(format!("ampoule-egress-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, &up.ca_pem).unwrap();
    let egress = Egress::new(&EgressSettings {
        hosts: pins(),
        extra_roots: vec![ca_file],
    })
    .unwrap();
    let plain = gateway(&egress, policy(&["up.test", "127.0.0.1"], false));
    let inject_policy = policy(&["up.test", "127.0.0.1"], true);
    let gateway_ca = egress.trusted_ca_pem(&inject_policy).unwrap();
    let inject = gateway(&egress, inject_policy);
    let direct: SocketAddr = "127.0.0.1:443".parse().unwrap();
    let n: usize = std::env::var("EGRESS_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut times: [Vec<f64>; 3] = Default::default();
    for i in 0..n + 20 {
        for (k, (at, trust)) in [
            (direct, up.ca_pem.as_str()),
            (plain.proxy_addr(), up.ca_pem.as_str()),
            (inject.proxy_addr(), gateway_ca.as_str()),
        ]
        .into_iter()
        .enumerate()
        {
            let t0 = std::time::Instant::now();
            let out = https_get_at(at, "up.test", up.port, trust).await.unwrap();
            assert!(out.ends_with("upstream"), "{out}");
            if i >= 20 {
                times[k].push(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    println!("\nHTTPS request on a new connection, in-process over loopback, n = {n} (ms)\n");
    println!("| path | p50 | p90 | p99 |");
    println!("|---|---|---|---|");
    for (label, v) in [
        "direct",
        "gateway, TLS passed through",
        "gateway, TLS terminated + header",
    ]
    .into_iter()
    .zip(times.iter_mut())
    {
        println!(
            "| {label} | {:.3} | {:.3} | {:.3} |",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99)
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A token endpoint on loopback: answers `tok-<n>` (a new one per request) living
/// `expires_in` seconds, after checking the grant and the client's Basic credentials; keeps
/// each request's head and body.
async fn token_endpoint(expires_in: f64) -> (u16, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let head = read_head(&mut c).await;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            c.read_exact(&mut body).await.unwrap();
            let body = String::from_utf8(body).unwrap();
            // base64("the-client:the secret") (the secret form-encoded first: a space is `+`).
            let good = head.contains("authorization: Basic dGhlLWNsaWVudDp0aGUrc2VjcmV0")
                || head.contains("Authorization: Basic dGhlLWNsaWVudDp0aGUrc2VjcmV0");
            s.lock().unwrap().push(format!("{head}{body}"));
            let reply = if good && body.contains("grant_type=client_credentials") {
                n += 1;
                format!(
                    r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":{expires_in}}}"#
                )
            } else {
                r#"{"error":"invalid_client"}"#.to_owned()
            };
            let status = if reply.contains("error") {
                "401 Unauthorized"
            } else {
                "200 OK"
            };
            let _ = c
                .write_all(
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                        reply.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    (port, seen)
}

fn oauth_policy(token_port: u16, secret: &str) -> Policy {
    let secret = secret.to_owned();
    Policy::compile(
        &PolicyConfig {
            allow: vec!["up.test".into(), "127.0.0.1".into()],
            deny: vec![],
            inject: vec![InjectRule {
                host: "up.test".into(),
                header: "Authorization".into(),
                value_from_env: None,
                oauth2: Some(ampoule_egress::OAuth2Rule {
                    token_url: format!("http://127.0.0.1:{token_port}/token"),
                    client_id_env: "TEST_CLIENT_ID".into(),
                    client_secret_env: "TEST_CLIENT_SECRET".into(),
                    scope: Some("api:read".into()),
                    client_auth: ampoule_egress::ClientAuth::Basic,
                }),
            }],
        },
        move |k| match k {
            "TEST_CLIENT_ID" => Some("the-client".into()),
            "TEST_CLIENT_SECRET" => Some(secret.clone()),
            _ => None,
        },
    )
    .unwrap()
}

/// The authorization header of each request the upstream saw.
fn bearer_tokens(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|h| {
            h.lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("authorization:")
                        .then(|| l[14..].trim().to_owned())
                })
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn oauth_tokens_are_minted_cached_and_refreshed() {
    let (port, seen) = http_upstream().await;
    let (token_port, token_requests) = token_endpoint(1.0).await;
    let egress = Egress::new(&EgressSettings {
        hosts: pins(),
        ..EgressSettings::default()
    })
    .unwrap();
    let gw = gateway(&egress, oauth_policy(token_port, "the secret"));
    let host = format!("up.test:{port}");
    let first = http_get(&gw, &host, "Authorization: Bearer forged\r\n").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Within its life (1 s, used for 0.75 s) the token is reused.
    http_get(&gw, &host, "").await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    http_get(&gw, &host, "").await;
    assert_eq!(
        bearer_tokens(&seen),
        ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]
    );
    let asked = token_requests.lock().unwrap().clone();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(asked[0].starts_with("POST /token HTTP/1.1"), "{}", asked[0]);
    assert!(
        asked[0].ends_with("grant_type=client_credentials&scope=api%3Aread"),
        "{}",
        asked[0]
    );
    // Every request that carried the token is an event naming the credential, never its value.
    let events = gw.events();
    let carried: Vec<_> = events
        .iter()
        .filter(|e| {
            e.reason
                .contains("a request carried credential oauth2:TEST_CLIENT_ID (rule up.test)")
        })
        .collect();
    assert_eq!(carried.len(), 3, "{events:?}");
    assert!(
        carried
            .iter()
            .all(|e| e.injected && e.allowed && e.host == "up.test")
    );
    assert!(!format!("{events:?}").contains("tok-"), "{events:?}");
}

#[tokio::test]
async fn a_refused_token_request_fails_the_request_not_the_policy() {
    let (port, seen) = http_upstream().await;
    let (token_port, _) = token_endpoint(60.0).await;
    let egress = Egress::new(&EgressSettings {
        hosts: pins(),
        ..EgressSettings::default()
    })
    .unwrap();
    let gw = gateway(&egress, oauth_policy(token_port, "wrong"));
    let out = http_get(&gw, &format!("up.test:{port}"), "Connection: close\r\n").await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(out.contains("oauth2:TEST_CLIENT_ID"), "{out}");
    assert!(out.contains("invalid_client"), "{out}");
    assert!(seen.lock().unwrap().is_empty(), "nothing reached the API");
    assert!(
        gw.events()
            .iter()
            .any(|e| !e.allowed && e.reason.contains("could not be minted"))
    );
}

/// A static package index on loopback: `/simple/tinyok/` links two versions of `tinyok` and
/// `/simple/tinybad/` one file; the files themselves hold their names.
async fn index_upstream() -> (u16, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                let head = read_head(&mut c).await;
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                s.lock().unwrap().push(head);
                let (status, body) = match path.as_str() {
                    "/simple/tinyok/" => ("200 OK", "<html><body>\
                        <a href=\"../../packages/tinyok-1.0-py3-none-any.whl#sha256=aa\">tinyok-1.0-py3-none-any.whl</a>\
                        <a href=\"/packages/tinyok-0.9-py3-none-any.whl#sha256=bb\">tinyok-0.9-py3-none-any.whl</a>\
                        </body></html>".to_owned()),
                    "/simple/tinybad/" => ("200 OK", "<a href=\"/packages/tinybad-1.0-py3-none-any.whl\">tinybad-1.0-py3-none-any.whl</a>".to_owned()),
                    p if p.starts_with("/packages/") => ("200 OK", format!("file {}", &p[10..])),
                    _ => ("404 Not Found", "no".to_owned()),
                };
                let _ = c
                    .write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                            .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (port, seen)
}

async fn index_get(gw: &Gateway, path: &str, accept: &str) -> String {
    let mut c = TcpStream::connect(gw.proxy_addr()).await.unwrap();
    c.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: packages.ampoule.internal\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out).await;
    out
}

#[tokio::test]
async fn the_package_index_is_filtered_by_the_pools_policy() {
    let (port, seen) = index_upstream().await;
    let egress = Egress::new(&EgressSettings::default()).unwrap();
    // The sandbox's own allow list names nothing the index needs.
    let policy = policy(&["other.test"], false)
        .with_packages(&ampoule_egress::PackagesConfig {
            index_url: format!("http://127.0.0.1:{port}/simple"),
            allow: vec!["TinyOK>=1.0".into()],
            deny: vec![],
        })
        .unwrap();
    assert_eq!(
        policy.sandbox_env(),
        [
            (
                "PIP_INDEX_URL".to_owned(),
                "http://packages.ampoule.internal/simple/".to_owned()
            ),
            (
                "PIP_TRUSTED_HOST".to_owned(),
                "packages.ampoule.internal".to_owned()
            )
        ]
    );
    let gw = gateway(&egress, policy);

    let html = index_get(&gw, "/simple/tinyok/", "text/html").await;
    assert!(html.starts_with("HTTP/1.1 200"), "{html}");
    assert!(
        html.contains("<a href=\"/files/tinyok/tinyok-1.0-py3-none-any.whl#sha256=aa\">"),
        "{html}"
    );
    assert!(!html.contains("tinyok-0.9"), "the version filter: {html}");
    // pip asks for PEP 691 JSON first.
    let json = index_get(
        &gw,
        "/simple/tinyok/",
        "application/vnd.pypi.simple.v1+json, text/html;q=0.01",
    )
    .await;
    assert!(
        json.contains("application/vnd.pypi.simple.v1+json"),
        "{json}"
    );
    let body: serde_json::Value =
        serde_json::from_str(json.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["files"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(
        body["files"][0]["url"],
        "/files/tinyok/tinyok-1.0-py3-none-any.whl"
    );

    let file = index_get(&gw, "/files/tinyok/tinyok-1.0-py3-none-any.whl", "*/*").await;
    assert!(file.starts_with("HTTP/1.1 200"), "{file}");
    assert!(file.ends_with("file tinyok-1.0-py3-none-any.whl"), "{file}");
    // Only what a page linked: not the filtered version, not another project.
    let unlinked = index_get(&gw, "/files/tinyok/tinyok-0.9-py3-none-any.whl", "*/*").await;
    assert!(unlinked.starts_with("HTTP/1.1 404"), "{unlinked}");
    let denied = index_get(&gw, "/simple/tinybad/", "text/html").await;
    assert!(denied.starts_with("HTTP/1.1 404"), "{denied}");
    assert!(
        denied.contains("package tinybad not allowed (this pool allows: TinyOK>=1.0)"),
        "{denied}"
    );
    let root = index_get(&gw, "/simple/", "text/html").await;
    assert!(root.contains("/simple/tinyok/"), "{root}");

    // The upstream saw the allowed page twice and the allowed file once: nothing else.
    let paths: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.split_whitespace().nth(1).unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        paths,
        [
            "/simple/tinyok/",
            "/simple/tinyok/",
            "/packages/tinyok-1.0-py3-none-any.whl"
        ]
    );
    let reasons: Vec<(bool, String)> = gw
        .events()
        .into_iter()
        .map(|e| (e.allowed, e.reason))
        .collect();
    assert!(
        reasons.contains(&(
            true,
            "package tinyok 1.0 allowed (tinyok-1.0-py3-none-any.whl)".into()
        )),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&(
            false,
            "package tinybad not allowed (this pool allows: TinyOK>=1.0)".into()
        )),
        "{reasons:?}"
    );
    // TLS to the index name is refused, and any other name still follows the allow list.
    let other = http_get(&gw, "tinybad.test", "Connection: close\r\n").await;
    assert!(other.starts_with("HTTP/1.1 403"), "{other}");
}
