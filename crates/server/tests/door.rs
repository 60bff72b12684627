//! The front door under hostile clients, over real sockets on loopback (the fake engine
//! behind it): slow-header clients are closed within the header timeout while honest clients
//! keep being served; a connection flood past the caps is refused at once; wrong keys are
//! throttled per address while a good key from elsewhere is not; keys added, rotated, revoked
//! and expiring through the keys file apply without a restart, each refusal with its code.
//!
//! Clients pick their source address in 127.0.0.0/8 (all loopback on Linux) to play several
//! hosts. The figures printed (descriptors and memory per held connection, latencies) go to
//! docs/BENCHMARKS.md; nothing here asserts a speed, only closures, counts and codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ampoule_server::auth::keyfile::KeyFile;
use ampoule_server::auth::unix_now;
use ampoule_server::config::sha256_hex;
use ampoule_server::fake::FakeEngine;
use ampoule_server::serve::{self, Notice};
use ampoule_server::{AppState, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const KEY: &str = "amp_0123456789abcdef0123456789abcdef0123456789abcdef";

struct Server {
    addr: SocketAddr,
    state: AppState,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(server: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\ndata_dir = \"{}\"\n{server}\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
             [pools.python]\nwarm = 0\n",
            dir.path().display(),
            sha256_hex(KEY)
        );
        let cfg = Config::parse(&text).unwrap();
        let engine = FakeEngine::new(dir.path());
        let keys = serve::keys(&cfg).unwrap();
        let state = serve::state(&cfg, Arc::new(engine), keys).unwrap();
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let notify: serve::Notify = Arc::new(move |n| {
            if let Notice::Listening { url, .. } = n {
                let _ = url_tx.send(url);
            }
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let stop = async move {
                let _ = stop_rx.await;
            };
            serve::serve_noting(&cfg, Some("127.0.0.1:0"), st, stop, notify)
                .await
                .unwrap();
        });
        let url = tokio::task::spawn_blocking(move || {
            url_rx.recv_timeout(Duration::from_secs(30)).unwrap()
        })
        .await
        .unwrap();
        let addr = url.trim_start_matches("http://").parse().unwrap();
        Server {
            addr,
            state,
            dir,
            stop: Some(stop_tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
    }

    fn metric(&self, text: &str, name: &str, labels: &str) -> f64 {
        let prefix = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

/// A TCP connection to `to` from `from` (a loopback address).
async fn connect(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{from}:0").parse().unwrap())?;
    s.connect(to).await
}

/// One HTTP/1.1 response: status, headers (lower-case names), body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn code(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// Sends one request on `s` (keep-alive) and reads its response.
async fn request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Resp {
    let auth = key.map_or(String::new(), |k| format!("authorization: Bearer {k}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: ampoule\r\n{auth}content-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    read_response(s).await.expect("a response")
}

async fn read_response(s: &mut TcpStream) -> Option<Resp> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    })
}

/// Latencies of `n` requests, each on a new connection from `from`: all must succeed.
async fn honest(addr: SocketAddr, from: &str, n: usize) -> Vec<f64> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = connect(from, addr).await.unwrap();
        let r = request(&mut s, "GET", "/v1/pools", Some(KEY), "").await;
        assert_eq!(r.status, 200, "{}", r.body);
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    ms
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// As many open files as the hard limit allows; how many that is.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

async fn metrics(server: &Server) -> String {
    let mut s = connect("127.0.0.1", server.addr).await.unwrap();
    request(&mut s, "GET", "/metrics", Some(KEY), "").await.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_are_closed_in_time_and_honest_clients_keep_their_speed() {
    let hard = raise_nofile();
    // Each slow connection takes two descriptors in this process (client and server side).
    let slow = 5_000usize.min(usize::try_from(hard.saturating_sub(2_000) / 2).unwrap());
    let header_timeout = 2.0;
    let server = Server::start(&format!(
        "header_timeout_s = {header_timeout}\nmax_connections = 20000\n\
         max_connections_per_address = 20000"
    ))
    .await;
    let before = honest(server.addr, "127.0.0.1", 200).await;

    let (fds0, rss0) = (open_fds(), rss_kib());
    let mut held = Vec::with_capacity(slow);
    let opened = Instant::now();
    for _ in 0..slow {
        let mut s = connect("127.0.0.2", server.addr).await.unwrap();
        // Half a request head, never finished.
        s.write_all(b"GET /v1/pools HTTP/1.1\r\nhost: amp")
            .await
            .unwrap();
        held.push((Instant::now(), s));
    }
    let open_for = opened.elapsed();
    // The server's clock starts at accept, which on a busy machine lags the clients' connects
    // (the kernel's backlog holds the rest): wait until it has accepted them all.
    let accepted = loop {
        let text = metrics(&server).await;
        let open = server.metric(&text, "ampoule_connections", "listener=\"api\"");
        let timed_out = server.metric(
            &text,
            "ampoule_connections_closed_total",
            "listener=\"api\",reason=\"header_timeout\"",
        );
        // The connection asking for the figures is open too.
        if open + timed_out > slow as f64 {
            break Instant::now();
        }
        assert!(
            opened.elapsed() < Duration::from_secs(60),
            "the server accepted {open} + {timed_out} of {slow} connections in a minute"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let accept_lag = accepted.duration_since(opened) - open_for;
    let (fds1, rss1) = (open_fds(), rss_kib());
    let during = honest(server.addr, "127.0.0.1", 200).await;

    // Every slow connection is closed by the server within the header timeout (plus
    // scheduling slack), and none got a response.
    let mut waits = Vec::new();
    for (t, mut s) in held {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("the server never closed a slow connection");
        assert!(matches!(r, Ok(0) | Err(_)), "a slow client got {r:?}");
        waits.push(t.elapsed().as_secs_f64().max(0.0));
    }
    // All were accepted by `accepted`, so the last must be closed one timeout after it.
    let last_after_accepted = accepted.elapsed().as_secs_f64();
    waits.sort_by(f64::total_cmp);
    let text = metrics(&server).await;
    let closed = server.metric(
        &text,
        "ampoule_connections_closed_total",
        "listener=\"api\",reason=\"header_timeout\"",
    );
    println!(
        "door: {slow} slow connections opened in {:.2} s; process (server and test client) \
         +{} descriptors ({:.2} per connection), +{} KiB RSS ({:.1} KiB per connection)",
        open_for.as_secs_f64(),
        fds1 - fds0,
        (fds1 - fds0) as f64 / slow as f64,
        rss1.saturating_sub(rss0),
        rss1.saturating_sub(rss0) as f64 / slow as f64
    );
    println!(
        "door: honest GET /v1/pools on a new connection, p50/p99 ms: before {:.2}/{:.2}, \
         with {slow} slow connections held {:.2}/{:.2} (200 each, 100 % success)",
        pct(&before, 0.5),
        pct(&before, 0.99),
        pct(&during, 0.5),
        pct(&during, 0.99)
    );
    println!(
        "door: slow connections closed after {:.2} s (first) to {:.2} s (last) from the \
         client's connect with header_timeout_s = {header_timeout}; the server accepted the \
         last {:.2} s after the clients' last connect and closed every one {:.2} s after \
         that; {} counted header_timeout",
        waits[0],
        waits[waits.len() - 1],
        accept_lag.as_secs_f64(),
        last_after_accepted,
        closed
    );
    assert!(
        last_after_accepted <= header_timeout + 1.5,
        "a slow connection lived {last_after_accepted:.2} s after the server had accepted all"
    );
    assert!(
        waits[0] >= header_timeout - 0.1,
        "a slow connection was closed early ({:.2} s)",
        waits[0]
    );
    assert!(
        closed >= slow as f64,
        "{closed} closures counted for {slow}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_caps_is_refused_at_once_and_counted() {
    raise_nofile();
    let server = Server::start("max_connections = 300\nmax_connections_per_address = 100").await;
    // 1,000 silent connections from one address: 100 held, the rest refused at accept.
    let t = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..1_000 {
        flood.push(connect("127.0.0.2", server.addr).await.unwrap());
    }
    // Read every connection at once: a refused one has its answer waiting, a held one has
    // nothing to say (and is closed only after the header timeout, 10 s).
    let mut reads = tokio::task::JoinSet::new();
    for mut s in flood {
        reads.spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(1), read_response(&mut s)).await;
            (r, s)
        });
    }
    let mut refused = 0;
    let mut held = Vec::new();
    while let Some(done) = reads.join_next().await {
        match done.unwrap() {
            (Ok(Some(r)), _) => {
                assert_eq!(r.status, 503);
                assert_eq!(r.code(), "too_many_connections", "{}", r.body);
                assert!(r.body.contains("from this address"), "{}", r.body);
                refused += 1;
            }
            (Ok(None), _) => refused += 1,
            (Err(_), s) => held.push(s),
        }
    }
    let flood_s = t.elapsed().as_secs_f64();
    assert_eq!(held.len(), 100, "{refused} refused");
    // Another client is served meanwhile.
    honest(server.addr, "127.0.0.1", 20).await;
    let text = metrics(&server).await;
    let per_address = server.metric(
        &text,
        "ampoule_connections_refused_total",
        "listener=\"api\",reason=\"per_address\"",
    );
    assert_eq!(per_address, 900.0);
    let open = server.metric(&text, "ampoule_connections", "listener=\"api\"");
    assert!((100.0..=102.0).contains(&open), "{open} open");
    println!(
        "door: flood of 1000 connections from one address with max_connections_per_address \
         = 100: {refused} refused at accept, 100 held; all answered within {flood_s:.2} s"
    );
    // The total cap: 200 more from two other addresses fill it; the next is refused whoever
    // makes it.
    for from in ["127.0.0.3", "127.0.0.4"] {
        for _ in 0..100 {
            held.push(connect(from, server.addr).await.unwrap());
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = connect("127.0.0.1", server.addr).await.unwrap();
    let r = read_response(&mut s).await.expect("a refusal");
    assert_eq!((r.status, r.code().as_str()), (503, "too_many_connections"));
    assert!(r.body.contains("in total"), "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(held);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_are_throttled_per_address_and_a_good_key_elsewhere_is_not() {
    let server = Server::start("[auth]\nmax_failures_per_minute = 20").await;
    // 10,000 wrong keys from one address, on 10 keep-alive connections at once.
    let mut tasks = Vec::new();
    for c in 0..10 {
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = connect("127.0.0.2", addr).await.unwrap();
            let (mut unauthorized, mut throttled) = (0, 0);
            for i in 0..1_000 {
                let key = format!("wrong{c:02}{i:05}-not-a-key");
                let r = request(&mut s, "GET", "/v1/pools", Some(&key), "").await;
                match r.status {
                    401 => unauthorized += 1,
                    429 => {
                        assert_eq!(r.code(), "auth_throttled", "{}", r.body);
                        let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
                        assert!((1..=60).contains(&wait), "{wait}");
                        throttled += 1;
                    }
                    other => panic!("{other}: {}", r.body),
                }
            }
            (unauthorized, throttled)
        }));
    }
    let (mut unauthorized, mut throttled) = (0, 0);
    for t in tasks {
        let (u, th) = t.await.unwrap();
        unauthorized += u;
        throttled += th;
    }
    // Twenty failures are counted; requests racing the twentieth may add one each.
    assert!(
        (20..=30).contains(&unauthorized),
        "{unauthorized} answered 401"
    );
    assert_eq!(unauthorized + throttled, 10_000);
    // The right key from that address waits too; from another address it is served.
    let mut s = connect("127.0.0.2", server.addr).await.unwrap();
    assert_eq!(
        request(&mut s, "GET", "/v1/pools", Some(KEY), "")
            .await
            .status,
        429
    );
    let mut s = connect("127.0.0.3", server.addr).await.unwrap();
    assert_eq!(
        request(&mut s, "GET", "/v1/pools", Some(KEY), "")
            .await
            .status,
        200
    );
    // The throttle is written down once, with the address.
    let audit = server.state.manager.audit().unwrap();
    audit.writer.flush().await.unwrap();
    let page = audit
        .store
        .query(&ampoule_audit::Filter {
            tenant: String::new(),
            kind: Some(ampoule_audit::Kind::Refused),
            ..Default::default()
        })
        .await
        .unwrap();
    let records: Vec<_> = page
        .records
        .iter()
        .filter(|r| r.record.decided_by.as_deref() == Some("auth_throttled"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].record.client.as_deref(), Some("127.0.0.2"));
    assert_eq!(records[0].record.status.as_deref(), Some("address"));
    let text = metrics(&server).await;
    assert_eq!(
        server.metric(&text, "ampoule_auth_throttled_total", "reason=\"address\""),
        (throttled + 1) as f64
    );
    println!(
        "door: 10000 wrong keys from one address: {unauthorized} answered 401, {throttled} \
         answered 429 auth_throttled; a good key from another address served"
    );
    server.stop().await;
}

/// Polls until `key` gets `status` (the server reads the keys file once a second).
async fn until(server: &Server, key: &str, status: u16) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = connect("127.0.0.1", server.addr).await.unwrap();
        let r = request(&mut s, "GET", "/v1/pools", Some(key), "").await;
        if r.status == status || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_added_rotated_revoked_and_expire_without_a_restart() {
    // Polling with keys not yet (or no longer) valid would trip the throttle.
    let server = Server::start("[auth]\nmax_failures_per_minute = 0").await;
    let file = server.dir.path().join("keys.toml");
    let now = unix_now();
    let first = KeyFile::edit(&file, |f| f.add("b", Some("ci".into()), None, now)).unwrap();
    assert_eq!(until(&server, &first.key, 200).await.status, 200);

    // Its calls are audited under its id.
    let mut s = connect("127.0.0.1", server.addr).await.unwrap();
    let r = request(&mut s, "POST", "/v1/sessions", Some(&first.key), "{}").await;
    assert_eq!(r.status, 201, "{}", r.body);
    let sid: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let sid = sid["id"].as_str().unwrap().to_owned();
    let r = request(
        &mut s,
        "POST",
        &format!("/v1/sessions/{sid}/executions"),
        Some(&first.key),
        r#"{"code": "print(1)"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let exe: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let exe = exe["execution_id"].as_str().unwrap().to_owned();
    // The audit writer batches: the record is there within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let r = request(
            &mut s,
            "GET",
            &format!("/v1/audit?execution={exe}"),
            Some(&first.key),
            "",
        )
        .await;
        let page: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        if page["records"][0].is_object() || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        page["records"][0]["key_id"],
        first.stored.id.as_str(),
        "{page}"
    );

    // Rotation: the new key works at once, the old one for its grace period, then not.
    let t = Instant::now();
    let second = KeyFile::edit(&file, |f| f.rotate(&first.stored.id, 5, None, unix_now())).unwrap();
    assert_eq!(until(&server, &second.key, 200).await.status, 200);
    let mut s = connect("127.0.0.1", server.addr).await.unwrap();
    assert_eq!(
        request(&mut s, "GET", "/v1/pools", Some(&first.key), "")
            .await
            .status,
        200
    );
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "too slow to see the grace period"
    );
    let r = until(&server, &first.key, 401).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "key_expired"),
        "{}",
        r.body
    );
    assert!(r.body.contains("rotated"), "{}", r.body);

    // Revocation: at the server's next look.
    KeyFile::edit(&file, |f| f.revoke(&second.stored.id, unix_now())).unwrap();
    let r = until(&server, &second.key, 401).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "key_revoked"),
        "{}",
        r.body
    );

    // Expiry. The key lives for whole seconds (at least four, less the fraction already gone)
    // and the server looks at the file every second: a busy machine still sees it valid first.
    let third = KeyFile::edit(&file, |f| {
        f.add("b", None, Some(unix_now() + 5), unix_now())
    })
    .unwrap();
    assert_eq!(until(&server, &third.key, 200).await.status, 200);
    let r = until(&server, &third.key, 401).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "key_expired"),
        "{}",
        r.body
    );

    // A broken file keeps the keys in use.
    let fourth = KeyFile::edit(&file, |f| f.add("b", None, None, unix_now())).unwrap();
    assert_eq!(until(&server, &fourth.key, 200).await.status, 200);
    std::fs::write(&file, "this is not toml [[[").unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut s = connect("127.0.0.1", server.addr).await.unwrap();
    assert_eq!(
        request(&mut s, "GET", "/v1/pools", Some(&fourth.key), "")
            .await
            .status,
        200
    );
    // The config's key never depended on the file.
    assert_eq!(
        request(&mut s, "GET", "/v1/pools", Some(KEY), "")
            .await
            .status,
        200
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_and_a_slow_body_fails() {
    let server =
        Server::start("header_timeout_s = 5\nkeepalive_timeout_s = 1\nbody_timeout_s = 1").await;
    // Idle after a response: closed after the keep-alive timeout, not the header timeout.
    let mut s = connect("127.0.0.1", server.addr).await.unwrap();
    assert_eq!(
        request(&mut s, "GET", "/v1/pools", Some(KEY), "")
            .await
            .status,
        200
    );
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let idle = t.elapsed().as_secs_f64();
    assert!((0.9..3.0).contains(&idle), "closed after {idle:.2} s");
    // A body that stops halfway fails instead of holding the connection.
    let mut s = connect("127.0.0.1", server.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /v1/sessions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {KEY}\r\n\
             content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"code\":"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), read_response(&mut s))
        .await
        .expect("the stalled body was never given up");
    if let Some(r) = r {
        assert!((400..500).contains(&r.status), "{} {}", r.status, r.body);
    }
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    text_contains_keepalive_metric(&server).await;
    server.stop().await;
}

async fn text_contains_keepalive_metric(server: &Server) {
    let text = metrics(server).await;
    assert!(
        server.metric(
            &text,
            "ampoule_connections_closed_total",
            "listener=\"api\",reason=\"idle_timeout\""
        ) >= 1.0,
        "{text}"
    );
}
