//! `ampoule bench --network-only` (issue 19): new sessions of a pool with a network, arriving at
//! a steady rate, from a zygote and started cold, in the same run.
//!
//! One `ampoule serve` with three Python pools under the same allowlist (`allowed.test`, pinned
//! to a test host on this machine): `net-zygote` forks its sessions (each child wired to its
//! own gateway when it is handed out) with the default warm stock (forked too), `net-cold`
//! starts them as every network pool did before (a cold interpreter each, same warm stock),
//! and `net-zygote-nowarm` forks each session on its request's path (no warm stock). For each pool in turn,
//! new identifiers arrive open-loop at [`RATE`] per second (a slow answer never delays the next
//! arrival, as with real clients); each one's first ACA call (`1+1`) is timed from request to
//! answer, then a second call fetches the test host through the session's gateway (timed
//! apart, and checked: `200`), then the session is deleted (untimed).
//!
//! The test host is an HTTP server of this process on [`UPSTREAM`], an address of a link made
//! for the run (`abench0`, one end of a veth pair whose both ends stay here, deleted at the
//! end): traffic to it never leaves the machine. A
//! private address is allowed only because the config pins the name to it; a pin never
//! unlocks loopback, hence the link.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Samples, Server, WorkDir, load_average, note, progress, utc_now};

/// New sessions per second.
const RATE: f64 = 20.0;
const ZYGOTE_POOL: &str = "net-zygote";
/// The zygote pool without warm stock: every session forked on its request's path.
const FORK_POOL: &str = "net-zygote-nowarm";
const COLD_POOL: &str = "net-cold";
/// The link that carries [`UPSTREAM`] (one end of a veth pair, [`PEER`] the other); not
/// `amp*` (the egress table's prefix).
const LINK: &str = "abench0";
const PEER: &str = "abench1";
/// Where the test host listens, and what `allowed.test` is pinned to.
const UPSTREAM: &str = "10.203.0.1";
const UPSTREAM_PORT: u16 = 18080;
const IP: &str = "/usr/sbin/ip";

/// The test host's link; deleted (with its peer) when dropped.
struct TestLink;

impl TestLink {
    fn create() -> Result<Self> {
        // A link left by an interrupted run.
        let _ = ip(&["link", "del", LINK]);
        // A veth pair with both ends here (some kernels have no `dummy` links): the address
        // on one end is local, so traffic to it never leaves this host.
        ip(&["link", "add", LINK, "type", "veth", "peer", "name", PEER])?;
        let link = TestLink;
        ip(&["addr", "add", &format!("{UPSTREAM}/32"), "dev", LINK])?;
        ip(&["link", "set", LINK, "up"])?;
        ip(&["link", "set", PEER, "up"])?;
        Ok(link)
    }
}

impl Drop for TestLink {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", LINK]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new(IP)
        .args(args)
        .output()
        .with_context(|| format!("running {IP} (iproute2)"))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The test host: answers every request with `200 ok`, then closes.
async fn serve_upstream(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16_384 {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        });
    }
}

/// The second cell: the test host through the gateway (DNS, then plain HTTP), its status.
fn fetch_code() -> String {
    format!(
        "import socket\ns = socket.create_connection((\"allowed.test\", {UPSTREAM_PORT}), 5)\n\
         s.sendall(b\"GET / HTTP/1.0\\r\\nHost: allowed.test\\r\\n\\r\\n\")\n\
         d = s.recv(100)\ns.close()\nint(d.split()[1])"
    )
}

/// The pools' bodies: the same allowlist and defaults, with or without a zygote, with the
/// default warm stock or none.
fn pool_body(pool: &str, zygote: bool, warm: bool) -> String {
    format!(
        "language = \"python\"\nzygote = {zygote}\nidle_timeout_s = 3600\n{}\
         [pools.{pool}.network]\nallow = [\"allowed.test\"]\n",
        if warm { "" } else { "warm = 0\n" }
    )
}

/// The figures of one pool: `n` arrivals at [`RATE`].
async fn arrivals(server: &Server, pool: &str, n: usize) -> Result<Value> {
    let mut warm = server.client();
    warm.wait_warm(pool, Duration::from_secs(300))
        .await
        .with_context(|| format!("pool {pool}\n{}", server.log_tail()))?;
    // The zygote (and this pool's path to the test host) is up.
    warm.execute(pool, "warm-up", &fetch_code(), Some("200"))
        .await
        .with_context(|| format!("the first session of pool {pool}\n{}", server.log_tail()))?;
    warm.delete(pool, "warm-up").await?;
    warm.wait_warm(pool, Duration::from_secs(300)).await?;
    let fallbacks_before = server
        .cold_fallbacks
        .load(std::sync::atomic::Ordering::Relaxed);
    let pb = progress(n, &format!("{pool}: new sessions at {RATE}/s"));
    let begun = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = server.client();
        let pool = pool.to_owned();
        let pb = pb.clone();
        let at = begun + Duration::from_secs_f64(i as f64 / RATE);
        tasks.push(tokio::spawn(async move {
            // Connected before its arrival: the timed request never includes a handshake.
            let _ = c.ready().await;
            tokio::time::sleep_until(at).await;
            let id = format!("{pool}-{i}");
            let first = c.execute(&pool, &id, "1+1", Some("2")).await;
            let fetch = match &first {
                Ok(_) => c.execute(&pool, &id, &fetch_code(), Some("200")).await,
                Err(_) => Err(anyhow::anyhow!("no session")),
            };
            let _ = c.delete(&pool, &id).await;
            pb.inc(1);
            (first, fetch)
        }));
    }
    let (mut first, mut fetch) = (Samples::default(), Samples::default());
    for t in tasks {
        let (a, b) = t.await.context("an arrival's task")?;
        first.record(a);
        fetch.record(b);
    }
    pb.finish_and_clear();
    let fallbacks = server
        .cold_fallbacks
        .load(std::sync::atomic::Ordering::Relaxed)
        - fallbacks_before;
    Ok(json!({
        "pool": pool,
        "first_result": first.stat(),
        "then_fetch": fetch.stat(),
        "zygote_cold_fallbacks": fallbacks,
    }))
}

/// The `network` section: both pools' figures, and what they ran.
pub(super) async fn network_phase(quick: bool, exe: &Path, work: &WorkDir) -> Result<Value> {
    if !Path::new(IP).exists() {
        bail!("{IP} is missing\nhint: apt-get install iproute2");
    }
    let n = if quick { 20 } else { 200 };
    let link = TestLink::create()?;
    let listener = tokio::net::TcpListener::bind((UPSTREAM, UPSTREAM_PORT))
        .await
        .with_context(|| format!("listening on {UPSTREAM}:{UPSTREAM_PORT}"))?;
    let upstream = tokio::spawn(serve_upstream(listener));
    let pools = [
        (ZYGOTE_POOL, pool_body(ZYGOTE_POOL, true, true)),
        (FORK_POOL, pool_body(FORK_POOL, true, false)),
        (COLD_POOL, pool_body(COLD_POOL, false, true)),
    ];
    let extra = format!("\n[egress.hosts]\n\"allowed.test\" = \"{UPSTREAM}\"\n");
    let server = Server::start_with(
        exe,
        work,
        "network",
        &pools,
        "127.0.0.1:0",
        &extra,
        &super::bench_key(),
    )?;
    note(&format!(
        "network pools: {n} new sessions at {RATE}/s per pool"
    ));
    let started = Instant::now();
    let zygote = arrivals(&server, ZYGOTE_POOL, n).await;
    let forked = arrivals(&server, FORK_POOL, n).await;
    let cold = arrivals(&server, COLD_POOL, n).await;
    server.stop(Duration::from_secs(30));
    upstream.abort();
    drop(link);
    Ok(json!({
        "rate_per_s": RATE,
        "sessions_per_pool": n,
        "first_cell": "1+1",
        "second_cell": "HTTP GET of the allowed test host through the gateway (status 200)",
        "warm_stock": 4,
        "seconds": super::round2(started.elapsed().as_secs_f64()),
        "zygote": zygote?,
        "zygote_no_warm": forked?,
        "cold": cold?,
    }))
}

/// The report of `--network-only`.
pub(super) async fn report(quick: bool, exe: &Path, work: &WorkDir) -> Result<Value> {
    let load_before = load_average();
    let network = network_phase(quick, exe, work).await?;
    Ok(json!({
        "version": 1,
        "date": utc_now(),
        "quick": quick,
        "build": super::build_kind(),
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "load_average_start": load_before,
            "load_average_end": load_average(),
        },
        "network": network,
    }))
}
