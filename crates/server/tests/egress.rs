#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed unwrap is a failed test"
)]
//! Pools with a network, end to end: the real `ampoule serve` with `[pools.X.network]`, driven
//! through its HTTP API, against real upstream servers.
//!
//! Everything runs inside one throw-away outer namespace (a jail: `unshare --mount --pid --net
//! ...`, the host's `/` read-only), so the nftables table, the veth pairs and every address
//! live in the jail's own network namespace and never touch the machine's network. Inside it,
//! an "upstream" host in a namespace of its own (`10.77.0.2`, wired to the jail's `10.77.0.1`)
//! serves HTTP on 80 and HTTPS on 443 (a test CA made here) and UDP on 5353, logging what
//! reaches it; the jail itself runs a service on `0.0.0.0:8080` no sandbox may reach, and
//! `ampoule serve` with three pools: `net` (an allowlist, one warm session), `inject` (a
//! credential rule) and `python` (no network). The test talks to the server from a thread that
//! has joined the jail's network namespace (`setns`). Names get addresses from the server's
//! `[egress.hosts]` pins or the jail's own `/etc/hosts` (the system resolver). No address
//! outside this machine is ever used.
//!
//! Needs root, `unshare`, `ip`, `nft`, `/usr/bin/python3` and the Python session environment
//! (`ampoule setup`); without them every trial is reported as ignored with the reason, never as
//! passed. `EGRESS_VERBOSE=1` prints every probe's outcome and the server's log. `latency` is a
//! measurement, ignored by default:
//! `EGRESS_BENCH_N=1000 cargo test -p ampoule-server --test egress -- --ignored latency --nocapture`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ampoule_testkit::host::{Need, missing};
use ampoule_testkit::http::Client;
use ampoule_testkit::jail::{Served, Stopped};
use ampoule_testkit::upstream;
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Map, Value, json};

const KEY: &str = "egress-e2e-key";
const APPROVER: &str = "egress-e2e-approver-key";
/// Built at run time in the probes, so no file of the sandbox holds it by accident.
const SECRET_MARK: &str = "AMPOULE-SECRET-";

/// Probe helpers: `check(name, fn)` records `ok: ...` or `error: ...`.
const PRELUDE: &str = r#"
import json, os, socket, ssl, subprocess, urllib.request
res = {}
def check(name, fn):
    try:
        res[name] = "ok: " + str(fn())[:300]
    except BaseException as e:
        res[name] = "error: %s: %s" % (type(e).__name__, e)
def get(url, ctx=None, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=8, context=ctx) as r:
        return "%d %s" % (r.status, r.read().decode().strip())
def raw_http(ip, port, host):
    s = socket.create_connection((ip, port), 5)
    s.sendall(b"GET /raw HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    return data.split(b"\r\n")[0].decode()
def tls(ip, port, sni, ctx):
    s = socket.create_connection((ip, port), 5)
    t = ctx.wrap_socket(s, server_hostname=sni)
    t.sendall(b"GET /tls HTTP/1.1\r\nHost: " + sni.encode() + b"\r\nConnection: close\r\n\r\n")
    return t.recv(100).split(b"\r\n")[0].decode()
def udp(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"ping-udp", (ip, port))
    try:
        return "reply %r" % (s.recvfrom(100)[0],)
    except socket.timeout:
        return "no reply"
"#;

/// What the `net` pool's first execution tries.
const ALLOWLIST_PROBE: &str = r#"
CA = "/mnt/data/upstream-ca.pem"
ctx = ssl.create_default_context(cafile=CA)
check("dns_allowed", lambda: socket.gethostbyname("allowed.test"))
check("http_allowed", lambda: get("http://allowed.test/a"))
check("https_allowed", lambda: get("https://allowed.test/b", ctx))
import requests
check("requests_allowed", lambda: requests.get("https://allowed.test/c", verify=CA, timeout=8).text.strip())
check("dns_denied", lambda: socket.gethostbyname("denied.test"))
check("http_denied", lambda: get("http://denied.test/d"))
check("https_denied", lambda: get("https://denied.test/e", ctx))
check("http_ip_literal", lambda: get("http://10.77.0.2/f"))
check("dns_private", lambda: socket.gethostbyname("private.test"))
check("dns_metadata", lambda: socket.gethostbyname("metadata.test"))
# Code that ignores every convention and writes to sockets itself.
check("raw_denied_host", lambda: raw_http("10.77.0.2", 80, "denied.test"))
check("raw_private_host", lambda: raw_http("10.77.0.2", 80, "private.test"))
check("raw_metadata_host", lambda: raw_http("10.77.0.2", 80, "metadata.test"))
check("tls_denied_sni", lambda: tls("10.77.0.2", 443, "denied.test", ctx))
check("tls_allowed_sni", lambda: tls("10.77.0.2", 443, "allowed.test", ctx))
check("raw_jail_service", lambda: raw_http("10.77.0.1", 8080, "10.77.0.1"))
check("udp", lambda: udp("10.77.0.2", 5353))
check("proxy_env", lambda: sorted(k for k in os.environ if "proxy" in k.lower()))
check("gateway_ca", lambda: os.path.exists("/etc/ampoule") or "SSL_CERT_FILE" in os.environ)
print(json.dumps(res))
"#;

/// What the `inject` pool's execution tries: real clients with their default trust, then a
/// search of everything the sandbox can read for the secret's marker.
const INJECT_PROBE: &str = r#"
check("https", lambda: get("https://inject.test/https"))
check("http", lambda: get("http://inject.test/http"))
import requests
check("requests", lambda: requests.get("https://inject.test/requests", timeout=8).text.strip())
check("forged", lambda: get("https://inject.test/forged", headers={"Authorization": "Bearer forged"}))
check("trust_env", lambda: {k: os.environ.get(k) for k in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"]})
"#;

/// What a session of the pool without network tries.
const NONE_PROBE: &str = r#"
check("connect", lambda: socket.create_connection(("10.77.0.2", 80), 3))
check("dns", lambda: socket.gethostbyname("allowed.test"))
check("interfaces", lambda: sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]))
print(json.dumps(res))
"#;

/// Times HTTPS requests to `NAME` at `10.77.0.2`: `n` requests each on a new connection (TCP +
/// TLS handshake + GET + body), then `n` on one kept-alive connection; prints JSON.
const LATENCY_CLIENT: &str = r#"
import json, socket, ssl, sys, time
name, n, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ip = "10.77.0.2"
ctx = ssl.create_default_context(cafile=cafile) if cafile != "-" else ssl.create_default_context()
req = ("GET /lat HTTP/1.1\r\nHost: %s\r\n\r\n" % name).encode()
def response(t):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = t.recv(65536)
        if not d: raise EOFError("closed")
        buf += d
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += t.recv(65536)
    if not head.startswith(b"HTTP/1.1 200"): raise RuntimeError(head[:40])
def connect():
    s = socket.create_connection((ip, 443), 10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(s, server_hostname=name)
def fresh():
    t0 = time.perf_counter()
    t = connect(); t.sendall(req); response(t); t.close()
    return (time.perf_counter() - t0) * 1000
for _ in range(10): fresh()
new = [fresh() for _ in range(n)]
t = connect()
for _ in range(10): t.sendall(req); response(t)
kept = []
for _ in range(n):
    t0 = time.perf_counter(); t.sendall(req); response(t); kept.append((time.perf_counter() - t0) * 1000)
print(json.dumps({"new": new, "kept": kept}))
"#;

/// The zygote twins of the `net` and `inject` pools: the same rules, sessions forked from a
/// zygote (one per pool and tenant, without network itself), each child wired to its own
/// gateway. No warm stock: every session of the trials is a fork made on request.
const ZYGOTE_POOLS: &str = r#"
[pools.netzygote]
zygote = true
warm = 0
[pools.netzygote.network]
allow = ["allowed.test", "denied.test", "private.test", "metadata.test"]
deny = ["denied.test"]

[pools.injectzygote]
zygote = true
warm = 0
[pools.injectzygote.network]
allow = ["inject.test"]
[[pools.injectzygote.network.inject]]
host = "inject.test"
header = "Authorization"
value_from_env = "EGRESS_E2E_SECRET"
"#;

/// Whether the session was forked from a zygote: a zygote's child has the zygote's preloads
/// (pandas) imported before its first cell; a cold interpreter imports nothing of the kind
/// by itself.
const BORN_PROBE: &str = r#"
import sys
check("forked", lambda: "pandas" in sys.modules)
"#;

/// Whether `pool` forks its sessions from a zygote (the [`ZYGOTE_POOLS`]).
fn forks(pool: &str) -> bool {
    pool.ends_with("zygote")
}

/// The `gvisor` twins of the `net` and `inject` pools: the same rules on the gVisor tier.
const GVISOR_POOLS: &str = r#"
[pools.netgv]
isolation = "gvisor"
warm = 0
[pools.netgv.network]
allow = ["allowed.test", "denied.test", "private.test", "metadata.test"]
deny = ["denied.test"]

[pools.injectgv]
isolation = "gvisor"
warm = 0
[pools.injectgv.network]
allow = ["inject.test"]
[[pools.injectgv.network.inject]]
host = "inject.test"
header = "Authorization"
value_from_env = "EGRESS_E2E_SECRET"
"#;

/// Whether `runsc` is here for the gVisor trials (in CI it must be: `scripts/deps.sh`).
fn runsc_here() -> bool {
    ampoule_runtime::gvisor::find().is_some()
}

/// The server's config: the pools (with their zygote twins, and their gVisor twins when runsc
/// is here), the pins, the audit log in the case's directory.
fn config(t: &Path) -> String {
    let gvisor = if runsc_here() { GVISOR_POOLS } else { "" };
    format!(
        r#"
[server]
data_dir = "{data}"
[[auth.keys]]
tenant = "a"
key_env = "EGRESS_E2E_KEY"
[[auth.keys]]
tenant = "a"
key_env = "EGRESS_E2E_APPROVER"
role = "approver"

[pools.python]
warm = 0

[pools.net]
warm = 1
[pools.net.network]
allow = ["allowed.test", "denied.test", "private.test", "metadata.test"]
deny = ["denied.test"]

[pools.inject]
warm = 0
[pools.inject.network]
allow = ["inject.test"]
[[pools.inject.network.inject]]
host = "inject.test"
header = "Authorization"
value_from_env = "EGRESS_E2E_SECRET"

[pools.oauth]
warm = 0
[pools.oauth.network]
allow = ["oauth.test"]
[[pools.oauth.network.inject]]
host = "oauth.test"
header = "Authorization"
oauth2 = {{ token_url = "http://token.test/token", client_id_env = "EGRESS_E2E_CLIENT_ID", client_secret_env = "EGRESS_E2E_CLIENT_SECRET", scope = "api" }}

[pools.held]
warm = 0
[pools.held.network]
allow = ["allowed.test"]
[pools.held.approval]
mode = "on_egress"
hosts = ["allowed.test"]
timeout_s = 60

[pools.pkgs]
warm = 0
[pools.pkgs.packages]
index_url = "http://index.test/simple"
allow = ["tinyok"]

[egress.hosts]
"oauth.test" = "10.77.0.2"
"token.test" = "10.77.0.2"
"index.test" = "10.77.0.2"
"allowed.test" = "10.77.0.2"
"denied.test" = "10.77.0.2"
"inject.test" = "10.77.0.2"
{ZYGOTE_POOLS}{gvisor}"#,
        data = t.join("data").display()
    )
}

/// The running jail with the server in it.
struct Jail {
    served: Served,
    /// The server's port in the jail.
    port: u16,
    /// The credential the `inject` pool's rule adds.
    secret: String,
}

impl Jail {
    /// The jail's setup before the server: `/etc/hosts` names for the system resolver, then
    /// the upstream host and the jail's own service.
    fn start() -> Result<Jail, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let t = dir.path();
        upstream::prepare(t)?;
        let write =
            |f: &str, text: &str| std::fs::write(t.join(f), text).map_err(|e| e.to_string());
        write(
            "hosts",
            "127.0.0.1 localhost\n10.77.0.2 private.test\n169.254.169.254 metadata.test\n",
        )?;
        let cfg = t.join("ampoule.toml");
        write("ampoule.toml", &config(t))?;
        // The `pkgs` pool's upstream index: two tiny wheels, one of them allowed.
        write("build_index.py", upstream::BUILD_INDEX)?;
        let built = Command::new("/usr/bin/python3")
            .arg(t.join("build_index.py"))
            .arg(t)
            .args(["tinyok==1.0", "tinybad==1.0"])
            .output()
            .map_err(|e| e.to_string())?;
        if !built.status.success() {
            return Err(format!("building the index: {}", lossy(&built.stderr)));
        }
        let secret = format!("Bearer {SECRET_MARK}{}", std::process::id());
        // The gateway trusts the test upstream when it terminates TLS to inject.
        let ca = t.join("upstream-ca.pem");
        let served = Served::start(
            dir,
            upstream::HOST,
            &cfg,
            [
                ("EGRESS_E2E_KEY", KEY.as_ref()),
                ("EGRESS_E2E_APPROVER", APPROVER.as_ref()),
                ("EGRESS_E2E_SECRET", secret.as_ref()),
                ("EGRESS_E2E_CLIENT_ID", upstream::TOKEN_CLIENT.0.as_ref()),
                (
                    "EGRESS_E2E_CLIENT_SECRET",
                    upstream::TOKEN_CLIENT.1.as_ref(),
                ),
                ("SSL_CERT_FILE", ca.as_os_str()),
            ],
        )?;
        Ok(Jail {
            port: served.port,
            served,
            secret,
        })
    }

    fn t(&self) -> &Path {
        self.served.t()
    }

    fn log(&self) -> String {
        self.served.log()
    }

    /// Lines the upstream host logged.
    fn upstream(&self) -> Vec<Value> {
        upstream::read_log(&self.t().join("upstream.log"))
    }
}

/// One request to the server with the test's key; the status and the JSON body.
fn call(port: u16, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Value), Failed> {
    Ok(Client::new(port, KEY).call(method, path, body)?)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The body of a 2xx answer, else an error naming the request.
fn ok(port: u16, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failed> {
    Ok(Client::new(port, KEY).ok(method, path, body)?)
}

fn new_session(port: u16, pool: &str) -> Result<String, Failed> {
    let s = ok(port, "POST", "/v1/sessions", Some(json!({ "pool": pool })))?;
    Ok(s["id"].as_str().ok_or("no session id")?.to_owned())
}

/// Runs `code` in a session; returns the execution result.
fn execute(port: u16, session: &str, code: &str) -> Result<Value, Failed> {
    ok(
        port,
        "POST",
        &format!("/v1/sessions/{session}/executions"),
        Some(json!({ "code": code, "timeout_s": 120 })),
    )
}

/// The probe's `check` results: the last line of stdout.
fn probes(result: &Value) -> Result<Map<String, Value>, Failed> {
    let stdout = result["stdout"].as_str().unwrap_or_default();
    match serde_json::from_str::<Value>(stdout.lines().last().unwrap_or_default()) {
        Ok(Value::Object(m)) => {
            if std::env::var_os("EGRESS_VERBOSE").is_some() {
                for (k, v) in &m {
                    eprintln!("  {k:20} {v}");
                }
            }
            Ok(m)
        }
        _ => Err(format!("the probe printed no result: {result}").into()),
    }
}

fn expect(
    probes: &Map<String, Value>,
    name: &str,
    pred: impl Fn(&str) -> bool,
    errors: &mut Vec<String>,
) {
    let got = probes
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or("<missing>");
    if !pred(got) {
        errors.push(format!("{name}: unexpected {got:?}"));
    }
}

/// The events of an execution result's (or audit record's) `egress` list for `host`.
fn events<'a>(list: &'a Value, host: &str) -> Vec<&'a Value> {
    list.as_array()
        .map(|a| a.iter().filter(|e| e["host"] == host).collect())
        .unwrap_or_default()
}

fn has(list: &Value, host: &str, protocol: &str, allowed: bool) -> bool {
    events(list, host)
        .iter()
        .any(|e| e["protocol"] == protocol && e["allowed"] == allowed)
}

/// The audit record of `session`'s executions, oldest first, once the writer has them.
fn audit_executions(port: u16, session: &str, n: usize) -> Result<Vec<Value>, Failed> {
    let t0 = Instant::now();
    loop {
        let page = ok(
            port,
            "GET",
            &format!("/v1/audit?session={session}&kind=execution"),
            None,
        )?;
        let records: Vec<Value> = page["records"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["kind"] == "execution")
            .collect();
        if records.len() >= n {
            return Ok(records);
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(format!("{} audit records of {session}, wanted {n}", records.len()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn finish(errors: Vec<String>, context: impl FnOnce() -> String) -> Result<(), Failed> {
    if errors.is_empty() {
        return Ok(());
    }
    Err(format!("{}\n--- context ---\n{}", errors.join("\n"), context()).into())
}

/// The `net` pool (its session is the warm one, started with its gateway before anyone
/// asked): allowed names over HTTP and HTTPS work; a denied name, an IP literal, names that
/// resolve to private and metadata addresses, raw sockets and UDP fail; each execution's
/// result, audit record and log lines list exactly its own attempts.
fn allowlist(jail: &Jail) -> Result<(), Failed> {
    allowlist_in(jail, "net")
}

/// [`allowlist`] on the `netgv` pool: the same rules and outcomes on the gVisor tier (its
/// netstack sends through the same veth, table and gateway), from code that runs on gVisor's
/// kernel; a cold session.
fn allowlist_gvisor(jail: &Jail) -> Result<(), Failed> {
    allowlist_in(jail, "netgv")
}

/// [`allowlist`] on the `netzygote` pool: the same rules and outcomes from a session forked
/// from a zygote on request (its network namespace made by the zygote's spare, wired by the
/// supervisor when it was handed out).
fn allowlist_zygote(jail: &Jail) -> Result<(), Failed> {
    allowlist_in(jail, "netzygote")
}

/// The checks of [`allowlist`] in `pool` (`net`: warm, namespaces; `netgv`: cold, gvisor;
/// `netzygote`: forked from a zygote).
fn allowlist_in(jail: &Jail, pool: &str) -> Result<(), Failed> {
    let port = jail.port;
    let gvisor = pool == "netgv";
    // The warm session is up: it was started with its gateway.
    let t0 = Instant::now();
    while pool == "net"
        && ok(port, "GET", "/v1/pools", None)?["pools"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "net"))
            .is_none_or(|p| p["ready"] != 1)
    {
        if t0.elapsed() > Duration::from_secs(90) {
            return Err(format!("no warm session in pool net:\n{}", jail.log()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let sid = new_session(port, pool)?;
    let ca = std::fs::read(jail.t().join("upstream-ca.pem"))?;
    let (status, v) = call(
        port,
        "PUT",
        &format!("/v1/sessions/{sid}/files/upstream-ca.pem"),
        Some(&ca),
    )?;
    if !(200..300).contains(&status) {
        return Err(format!("upload: {status} {v}").into());
    }
    let first = execute(
        port,
        &sid,
        &format!(
            "{PRELUDE}check('kernel', lambda: os.uname().release)\n{BORN_PROBE}{ALLOWLIST_PROBE}"
        ),
    )?;
    let p = probes(&first)?;
    let mut errors = Vec::new();
    let e = &mut errors;
    // The tier is the one asked for: gVisor's kernel says 4.4.0.
    expect(&p, "kernel", |s| (s == "ok: 4.4.0") == gvisor, e);
    // Forked from the zygote, or not, as the pool says (no silent fallback to a cold start).
    expect(
        &p,
        "forked",
        |s| s == format!("ok: {}", if forks(pool) { "True" } else { "False" }),
        e,
    );
    expect(&p, "dns_allowed", |s| s == "ok: 10.77.0.2", e);
    expect(
        &p,
        "http_allowed",
        |s| s == "ok: 200 upstream-http auth=no",
        e,
    );
    expect(
        &p,
        "https_allowed",
        |s| s == "ok: 200 upstream-https auth=no",
        e,
    );
    expect(
        &p,
        "requests_allowed",
        |s| s == "ok: upstream-https auth=no",
        e,
    );
    // Names the policy refuses do not resolve; their connections are refused by the gateway.
    for name in [
        "dns_denied",
        "http_denied",
        "https_denied",
        "dns_private",
        "dns_metadata",
    ] {
        // EAI_NONAME (-2) or EAI_NODATA (-5), through urllib's URLError or not.
        expect(
            &p,
            name,
            |s| s.starts_with("error:") && s.contains("[Errno -"),
            e,
        );
    }
    expect(&p, "http_ip_literal", |s| s.contains("403"), e);
    expect(&p, "raw_denied_host", |s| s.contains("403"), e);
    expect(&p, "raw_private_host", |s| s.contains("403"), e);
    expect(&p, "raw_metadata_host", |s| s.contains("403"), e);
    expect(&p, "raw_jail_service", |s| s.contains("403"), e);
    expect(&p, "tls_denied_sni", |s| s.starts_with("error"), e);
    expect(&p, "tls_allowed_sni", |s| s == "ok: HTTP/1.1 200 OK", e);
    expect(&p, "udp", |s| s == "ok: no reply", e);
    expect(&p, "proxy_env", |s| s == "ok: []", e);
    expect(&p, "gateway_ca", |s| s == "ok: False", e);

    // The upstream saw the allowed requests and nothing else.
    let up = jail.upstream();
    let paths: Vec<&str> = up.iter().filter_map(|l| l["path"].as_str()).collect();
    for want in ["/a", "/b", "/c"] {
        if !paths.contains(&want) {
            errors.push(format!("the upstream never saw {want}: {up:?}"));
        }
    }
    for never in ["/d", "/e", "/f", "/raw"] {
        if paths.contains(&never) {
            errors.push(format!("the upstream saw {never}: {up:?}"));
        }
    }
    if up.iter().any(|l| l["kind"] == "udp5353") {
        errors.push("a UDP datagram reached the upstream".into());
    }
    if std::fs::read_to_string(jail.t().join("jail.log")).is_ok_and(|s| !s.is_empty()) {
        errors.push("the jail's own service was reached".into());
    }

    // The result lists every attempt, allowed and blocked.
    let eg = &first["egress"];
    for (host, protocol, allowed) in [
        ("allowed.test", "dns", true),
        ("allowed.test", "http", true),
        ("allowed.test", "tls", true),
        ("denied.test", "dns", false),
        ("denied.test", "http", false),
        ("denied.test", "tls", false),
        ("10.77.0.2", "http", false),
        ("private.test", "http", false),
        ("metadata.test", "http", false),
        ("10.77.0.1", "http", false),
    ] {
        if !has(eg, host, protocol, allowed) {
            errors.push(format!(
                "the result's egress has no {protocol} {host} allowed={allowed}: {eg}"
            ));
        }
    }
    if events(eg, "allowed.test").iter().any(|e| {
        e["allowed"] == true
            && e["address"] != "10.77.0.2"
            && e["address"] != "10.77.0.2:80"
            && e["address"] != "10.77.0.2:443"
    }) {
        errors.push(format!("an allowed connection went elsewhere: {eg}"));
    }

    // A second execution has its own attempts only.
    let second = execute(
        port,
        &sid,
        &format!(
            "{PRELUDE}check('again', lambda: get('http://allowed.test/again'))\nprint(json.dumps(res))"
        ),
    )?;
    expect(
        &probes(&second)?,
        "again",
        |s| s == "ok: 200 upstream-http auth=no",
        &mut errors,
    );
    let eg2 = second["egress"].as_array().cloned().unwrap_or_default();
    if eg2.is_empty() || eg2.iter().any(|e| e["host"] != "allowed.test") {
        errors.push(format!("the second execution's egress: {eg2:?}"));
    }

    // The audit records say the same, per execution.
    let records = audit_executions(port, &sid, 2)?;
    let (r1, r2) = (&records[0], &records[1]);
    for (host, protocol, allowed) in [
        ("allowed.test", "tls", true),
        ("denied.test", "tls", false),
        ("10.77.0.2", "http", false),
        ("private.test", "http", false),
        ("metadata.test", "http", false),
    ] {
        if !has(&r1["egress"], host, protocol, allowed) {
            errors.push(format!(
                "audit record 1 has no {protocol} {host} allowed={allowed}: {}",
                r1["egress"]
            ));
        }
    }
    if r1["egress"].as_array().map(Vec::len) != first["egress"].as_array().map(Vec::len) {
        errors.push("audit record 1 and the result list different attempts".into());
    }
    if r2["egress"].as_array().map(Vec::len) != Some(eg2.len()) {
        errors.push(format!("audit record 2: {}", r2["egress"]));
    }

    // Each decision was logged with the session and the execution it belongs to.
    let log = jail.log();
    let exe1 = r1["execution"].as_str().unwrap_or("?");
    let blocked_line = log
        .lines()
        .any(|l| l.contains("egress blocked") && l.contains(&sid) && l.contains(exe1));
    if !blocked_line {
        errors.push(format!(
            "no `egress blocked` log line names {sid} and {exe1}"
        ));
    }
    if std::env::var_os("EGRESS_VERBOSE").is_some() {
        eprintln!("{log}");
    }
    finish(errors, || format!("result: {first}\nserver log:\n{log}"))
}

/// The `inject` pool: the upstream sees the header on HTTPS and HTTP, a forged header is
/// replaced, and the secret is nowhere in the sandbox.
fn injection(jail: &Jail) -> Result<(), Failed> {
    injection_in(jail, "inject")
}

/// [`injection`] on the `injectgv` pool (gVisor): the gateway's CA reaches the sandbox's trust
/// store through the OCI bundle, and the secret stays out of it.
fn injection_gvisor(jail: &Jail) -> Result<(), Failed> {
    injection_in(jail, "injectgv")
}

/// [`injection`] on the `injectzygote` pool: a zygote's child trusts the gateway's CA through
/// the same files and variables as a cold session, and the secret stays out of it.
fn injection_zygote(jail: &Jail) -> Result<(), Failed> {
    injection_in(jail, "injectzygote")
}

/// The checks of [`injection`] in `pool`.
fn injection_in(jail: &Jail, pool: &str) -> Result<(), Failed> {
    let port = jail.port;
    let sid = new_session(port, pool)?;
    let result = execute(
        port,
        &sid,
        &format!(
            "{PRELUDE}{BORN_PROBE}{INJECT_PROBE}{}",
            upstream::SECRET_SCAN
        ),
    )?;
    let p = probes(&result)?;
    let mut errors = Vec::new();
    let e = &mut errors;
    expect(&p, "https", |s| s == "ok: 200 upstream-https auth=yes", e);
    expect(&p, "http", |s| s == "ok: 200 upstream-http auth=yes", e);
    expect(&p, "requests", |s| s == "ok: upstream-https auth=yes", e);
    expect(&p, "forged", |s| s == "ok: 200 upstream-https auth=yes", e);
    expect(&p, "trust_env", |s| s.contains("/etc/ampoule/"), e);
    expect(
        &p,
        "forked",
        |s| s == format!("ok: {}", if forks(pool) { "True" } else { "False" }),
        e,
    );
    if p.get("secret_hits") != Some(&json!([])) {
        errors.push(format!(
            "the secret is in the sandbox: {:?}",
            p.get("secret_hits")
        ));
    }
    if p.get("files_scanned")
        .and_then(Value::as_u64)
        .is_none_or(|n| n < 10)
    {
        errors.push("the secret search read almost nothing".into());
    }
    for l in jail.upstream() {
        let path = l["path"].as_str().unwrap_or_default();
        if ["/https", "/http", "/requests", "/forged"].contains(&path)
            && l["authorization"] != jail.secret.as_str()
        {
            errors.push(format!("the upstream got {path} without the secret: {l}"));
        }
    }
    if !events(&result["egress"], "inject.test")
        .iter()
        .any(|e| e["injected"] == true && e["allowed"] == true)
    {
        errors.push(format!(
            "no injected attempt in the result: {}",
            result["egress"]
        ));
    }
    if jail.log().contains(&jail.secret) || result.to_string().contains(SECRET_MARK) {
        errors.push("the secret appears in the server's log or the result".into());
    }
    let records = audit_executions(port, &sid, 1)?;
    if records[0].to_string().contains(SECRET_MARK) {
        errors.push("the secret appears in the audit record".into());
    }
    if !records[0]["egress"]
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["host"] == "inject.test"))
    {
        errors.push(format!("audit record: {}", records[0]["egress"]));
    }
    finish(errors, || format!("result: {result}"))
}

/// What the `oauth` pool's execution tries: the API twice, the second time after the first
/// token expired (the endpoint's tokens live 2 s), and the token endpoint itself.
const OAUTH_PROBE: &str = r#"
import time
check("first", lambda: get("https://oauth.test/first"))
check("cached", lambda: get("https://oauth.test/cached"))
time.sleep(3)
check("refreshed", lambda: get("https://oauth.test/refreshed"))
check("token_endpoint", lambda: raw_http("10.77.0.2", 80, "token.test"))
"#;

/// The `oauth` pool: a token minted by the gateway reaches the API, is reused while fresh and
/// replaced once expired; the sandbox cannot reach the token endpoint and never sees a token;
/// the audit record names the credential for each request that carried it.
fn oauth(jail: &Jail) -> Result<(), Failed> {
    let port = jail.port;
    let sid = new_session(port, "oauth")?;
    let result = execute(
        port,
        &sid,
        &format!("{PRELUDE}{OAUTH_PROBE}{}", upstream::SECRET_SCAN),
    )?;
    let p = probes(&result)?;
    let mut errors = Vec::new();
    let e = &mut errors;
    for k in ["first", "cached", "refreshed"] {
        expect(&p, k, |s| s == "ok: 200 upstream-https auth=yes", e);
    }
    expect(&p, "token_endpoint", |s| s.contains("403"), e);
    if p.get("secret_hits") != Some(&json!([])) {
        errors.push(format!(
            "a token is in the sandbox: {:?}",
            p.get("secret_hits")
        ));
    }
    if p.get("files_scanned")
        .and_then(Value::as_u64)
        .is_none_or(|n| n < 10)
    {
        errors.push("the secret search read almost nothing".into());
    }
    let log = jail.upstream();
    let issued: Vec<String> = log
        .iter()
        .filter(|l| l["kind"] == "token" && l["good"] == true)
        .filter_map(|l| l["token"].as_str().map(|t| format!("Bearer {t}")))
        .collect();
    let seen = |path: &str| {
        log.iter()
            .find(|l| l["kind"] == "https" && l["path"] == path)
            .and_then(|l| l["authorization"].as_str().map(str::to_owned))
    };
    let (first, cached, refreshed) = (seen("/first"), seen("/cached"), seen("/refreshed"));
    if issued.len() != 2
        || first.as_deref() != Some(issued[0].as_str())
        || cached != first
        || refreshed.as_deref() != Some(issued[1].as_str())
    {
        errors.push(format!(
            "tokens issued {issued:?}; the API saw {first:?}, {cached:?}, {refreshed:?}"
        ));
    }
    if !log
        .iter()
        .any(|l| l["kind"] == "token" && l["form"] == "grant_type=client_credentials&scope=api")
    {
        errors.push(format!("the token requests: {log:?}"));
    }
    if jail.log().contains(SECRET_MARK) || result.to_string().contains(SECRET_MARK) {
        errors.push("a token appears in the server's log or the result".into());
    }
    let records = audit_executions(port, &sid, 1)?;
    let record = records[0].to_string();
    if record.contains(SECRET_MARK) {
        errors.push("a token appears in the audit record".into());
    }
    let carried = records[0]["egress"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| {
                    e["host"] == "oauth.test"
                        && e["reason"].as_str().is_some_and(|r| {
                            r.contains(
                                "carried credential oauth2:EGRESS_E2E_CLIENT_ID (rule oauth.test)",
                            )
                        })
                })
                .count()
        })
        .unwrap_or_default();
    if carried != 3 {
        errors.push(format!(
            "the audit record names the credential {carried} times, not 3: {}",
            records[0]["egress"]
        ));
    }
    finish(errors, || format!("result: {result}"))
}

/// What the `pkgs` pool's execution tries: `pip install` of the allowed and of another
/// project, with nothing but the environment the sandbox was given.
const PIP_PROBE: &str = r#"
import sys
def pip(name):
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir",
                        "--disable-pip-version-check", "--target", "/mnt/data/site", name],
                       capture_output=True, text=True, timeout=120)
    return "rc=%d %s" % (p.returncode, " | ".join((p.stdout + p.stderr).splitlines())[-600:])
check("index_env", lambda: (os.environ.get("PIP_INDEX_URL"), os.environ.get("PIP_TRUSTED_HOST")))
check("allowed", lambda: pip("tinyok"))
check("import", lambda: subprocess.run([sys.executable, "-c", "import tinyok; print(tinyok.VALUE)"],
      env=dict(os.environ, PYTHONPATH="/mnt/data/site"), capture_output=True, text=True).stdout.strip())
check("other", lambda: pip("tinybad"))
check("direct_index", lambda: raw_http("10.77.0.2", 80, "index.test"))
check("unlinked_file", lambda: get("http://packages.ampoule.internal/files/tinybad/tinybad-1.0-py3-none-any.whl"))
print(json.dumps(res))
"#;

/// The `pkgs` pool: `pip install` of the listed project works through the gateway's filtered
/// index, of another fails; the sandbox cannot reach the upstream index itself; the audit
/// record lists both decisions.
fn packages(jail: &Jail) -> Result<(), Failed> {
    let port = jail.port;
    let sid = new_session(port, "pkgs")?;
    let result = execute(port, &sid, &format!("{PRELUDE}{PIP_PROBE}"))?;
    let p = probes(&result)?;
    let mut errors = Vec::new();
    let e = &mut errors;
    expect(
        &p,
        "index_env",
        |s| s == "ok: ('http://packages.ampoule.internal/simple/', 'packages.ampoule.internal')",
        e,
    );
    expect(
        &p,
        "allowed",
        |s| s.starts_with("ok: rc=0") && s.contains("Successfully installed tinyok-1.0"),
        e,
    );
    expect(&p, "import", |s| s == "ok: tinyok 1.0", e);
    expect(
        &p,
        "other",
        |s| s.starts_with("ok: rc=1") && s.contains("No matching distribution found for tinybad"),
        e,
    );
    expect(&p, "direct_index", |s| s.contains("403"), e);
    expect(&p, "unlinked_file", |s| s.contains("404"), e);
    // The upstream never served anything of the other project.
    let served: Vec<String> = jail
        .upstream()
        .iter()
        .filter(|l| l["kind"] == "index")
        .filter_map(|l| l["path"].as_str().map(str::to_owned))
        .collect();
    if served.iter().any(|p| p.contains("tinybad"))
        || !served.contains(&"/packages/tinyok-1.0-py3-none-any.whl".to_owned())
    {
        errors.push(format!("the upstream index served {served:?}"));
    }
    let records = audit_executions(port, &sid, 1)?;
    let reasons: Vec<(bool, String)> = records[0]["egress"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["allowed"] == true,
                        e["reason"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if !reasons
        .iter()
        .any(|(ok, r)| *ok && r == "package tinyok 1.0 allowed (tinyok-1.0-py3-none-any.whl)")
        || !reasons
            .iter()
            .any(|(ok, r)| !*ok && r.starts_with("package tinybad not allowed"))
    {
        errors.push(format!("the audit record's egress: {reasons:?}"));
    }
    finish(errors, || {
        format!(
            "result: {result}
server log:
{}",
            jail.log()
        )
    })
}

/// What the `held` pool's executions try: the same host twice.
const HELD_PROBE: &str = r#"
check("first", lambda: get("http://allowed.test/held-1"))
check("second", lambda: get("http://allowed.test/held-2"))
print(json.dumps(res))
"#;

const HELD_ONCE_PROBE: &str = r#"
check("first", lambda: get("http://allowed.test/held-3"))
print(json.dumps(res))
"#;

/// The approval waiting in the gateway for `session`'s connection, once there is one.
fn held_approval(port: u16) -> Result<Value, Failed> {
    let t0 = Instant::now();
    loop {
        let list = Client::new(port, APPROVER).ok("GET", "/v1/approvals", None)?;
        if let Some(a) = list["approvals"].as_array().and_then(|l| l.first()) {
            return Ok(a.clone());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err("no connection waited for an approver".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `[pools.held.approval] mode = "on_egress"`: the sandbox's first connection to
/// `allowed.test` waits in the gateway (nothing reaches the upstream meanwhile) until an
/// approver decides; approved, that sandbox reaches the host from then on without asking
/// again; denied, the connection is refused and the upstream never sees it.
fn egress_approval(jail: &Jail) -> Result<(), Failed> {
    let port = jail.port;
    let mut errors = Vec::new();
    for (approve, tag) in [(true, "approved"), (false, "denied")] {
        let sid = new_session(port, "held")?;
        let run = {
            let sid = sid.clone();
            // Denied, one attempt (a denial is not remembered: a second would ask again).
            let probe = if approve { HELD_PROBE } else { HELD_ONCE_PROBE };
            std::thread::spawn(move || execute(port, &sid, &format!("{PRELUDE}{probe}")))
        };
        let a = held_approval(port)?;
        if a["egress"] != "allowed.test:80" || a["code"] != "connect to allowed.test:80" {
            errors.push(format!("{tag}: the approval says {a}"));
        }
        let reached = |path: &str| jail.upstream().iter().any(|l| l["path"] == path);
        let first = if approve { "/held-1" } else { "/held-3" };
        if reached(first) {
            errors.push(format!(
                "{tag}: the upstream was reached before the decision"
            ));
        }
        let id = a["id"].as_str().ok_or("no approval id")?;
        let verb = if approve { "approve" } else { "deny" };
        Client::new(port, APPROVER).ok("POST", &format!("/v1/approvals/{id}/{verb}"), None)?;
        let result = run.join().map_err(|_| "the execution thread panicked")??;
        let p = probes(&result)?;
        if approve {
            expect(&p, "first", |s| s.starts_with("ok: 200"), &mut errors);
            expect(&p, "second", |s| s.starts_with("ok: 200"), &mut errors);
            // One approval for the sandbox's host: the second connection asked nobody.
            let left = Client::new(port, APPROVER).ok("GET", "/v1/approvals", None)?;
            if left["approvals"] != json!([]) {
                errors.push(format!("a second approval was asked: {left}"));
            }
            if !reached("/held-1") || !reached("/held-2") {
                errors.push("approved, but the upstream saw nothing".into());
            }
        } else {
            expect(&p, "first", |s| s.contains("403"), &mut errors);
            if reached("/held-3") {
                errors.push("denied, yet the upstream was reached".into());
            }
        }
    }
    finish(errors, || format!("server log:\n{}", jail.log()))
}

/// The `python` pool has no `[network]`: loopback only, no egress list.
fn no_network(jail: &Jail) -> Result<(), Failed> {
    let port = jail.port;
    let sid = new_session(port, "python")?;
    let result = execute(port, &sid, &format!("{PRELUDE}{NONE_PROBE}"))?;
    let p = probes(&result)?;
    let mut errors = Vec::new();
    let e = &mut errors;
    expect(&p, "connect", |s| s.starts_with("error: OSError"), e);
    expect(&p, "dns", |s| s.starts_with("error: gaierror"), e);
    expect(&p, "interfaces", |s| s == "ok: ['lo']", e);
    if result.get("egress").is_some() {
        errors.push(format!("a result without network lists egress: {result}"));
    }
    finish(errors, || format!("result: {result}"))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

/// Not a check, a measurement (ignored unless asked for): the latency of HTTPS requests from a
/// server session through its gateway (TLS passed through, and terminated to inject), against
/// the same requests made from the jail itself. `EGRESS_BENCH_N` requests per series.
fn latency(jail: &Jail) -> Result<(), Failed> {
    let n: usize = std::env::var("EGRESS_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let port = jail.port;
    let client = jail.t().join("latency.py");
    std::fs::write(&client, LATENCY_CLIENT)?;
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_before = load();
    // This thread is in the jail's network namespace, and so are its children.
    let out = Command::new("/usr/bin/python3")
        .arg(&client)
        .args(["allowed.test", &n.to_string()])
        .arg(jail.t().join("upstream-ca.pem"))
        .output()?;
    let direct: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("direct: {e}: {}", lossy(&out.stderr)))?;
    let through = |pool: &str, name: &str, ca: &str| -> Result<Value, Failed> {
        let sid = new_session(port, pool)?;
        for (file, contents) in [
            ("latency.py", LATENCY_CLIENT.as_bytes().to_vec()),
            (
                "upstream-ca.pem",
                std::fs::read(jail.t().join("upstream-ca.pem"))?,
            ),
        ] {
            let (status, v) = call(
                port,
                "PUT",
                &format!("/v1/sessions/{sid}/files/{file}"),
                Some(&contents),
            )?;
            if !(200..300).contains(&status) {
                return Err(format!("upload {file}: {status} {v}").into());
            }
        }
        let code = format!(
            "import subprocess\n\
             p = subprocess.run(['/usr/bin/python3', '/mnt/data/latency.py', '{name}', '{n}', \
             '{ca}'], capture_output=True, text=True)\n\
             print(p.stdout.strip() or ('ERR ' + p.stderr))"
        );
        let r = ok(
            port,
            "POST",
            &format!("/v1/sessions/{sid}/executions"),
            Some(json!({ "code": code, "timeout_s": 600 })),
        )?;
        let stdout = r["stdout"].as_str().unwrap_or_default().trim().to_owned();
        serde_json::from_str(&stdout).map_err(|e| format!("{pool}: {e}: {stdout}").into())
    };
    let passed = through("net", "allowed.test", "/mnt/data/upstream-ca.pem")?;
    let injected = through("inject", "inject.test", "-")?;
    println!(
        "\nHTTPS request latency through ampoule serve, n = {n} each (ms); load average before: \
         {} after: {}\n",
        load_before.trim(),
        load().trim()
    );
    println!("| path | connection | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    for (label, v) in [
        ("direct (jail → upstream)", &direct),
        ("server session → gateway, TLS passed through", &passed),
        (
            "server session → gateway, TLS terminated + header",
            &injected,
        ),
    ] {
        for conn in ["new", "kept"] {
            let mut s: Vec<f64> = v[conn]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            if s.len() != n {
                return Err(format!("{label} {conn}: {} samples, wanted {n}", s.len()).into());
            }
            println!(
                "| {label} | {conn} | {:.2} | {:.2} | {:.2} |",
                percentile(&mut s, 0.5),
                percentile(&mut s, 0.9),
                percentile(&mut s, 0.99)
            );
        }
    }
    Ok(())
}

/// Why the trials cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    missing(&[
        Need::Root("it builds network namespaces and sandboxes"),
        Need::Tool("/usr/bin/unshare", "util-linux"),
        Need::Tool("/usr/sbin/ip", "iproute2"),
        Need::Tool("/usr/sbin/nft", "nftables"),
        Need::Tool("/usr/bin/python3", "python3"),
        Need::SessionEnv(&ampoule_session::paths::python_env_dir()),
    ])
}

/// What a trial checks, given its running jail.
type Body = fn(&Jail) -> Result<(), Failed>;

/// A trial: its own jail and server, the body, then the server stopped on SIGTERM with no
/// `amp*` link left behind.
fn trial(body: Body) -> Result<(), Failed> {
    let mut jail = Jail::start()?;
    jail.served.enter()?;
    let outcome = body(&jail);
    let Stopped {
        rc,
        leftover_links: links,
    } = jail.served.stop()?;
    outcome?;
    if rc != 0 || links != "0" {
        return Err(format!(
            "server exit status {rc}, amp* links left: {links}\n{}",
            jail.log()
        )
        .into());
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let why = unavailable();
    // (name, body, is a measurement: ignored unless asked for)
    let gvisor_why = if runsc_here() {
        None
    } else if std::env::var_os("CI").is_some() {
        panic!("runsc is missing in CI (scripts/deps.sh installs it)");
    } else {
        Some("runsc is not installed (apt-get install runsc)".to_owned())
    };
    // The same checks on pools of the gVisor tier.
    let gvisor_cases: [(&str, Body); 2] = [
        ("allowlist_gvisor", allowlist_gvisor),
        ("injection_gvisor", injection_gvisor),
    ];
    let cases: [(&str, Body, bool); 9] = [
        ("allowlist", allowlist, false),
        ("allowlist_zygote", allowlist_zygote, false),
        ("injection_zygote", injection_zygote, false),
        ("egress_approval", egress_approval, false),
        ("injection", injection, false),
        ("oauth", oauth, false),
        ("packages", packages, false),
        ("no_network", no_network, false),
        ("latency", latency, true),
    ];
    let mut trials: Vec<Trial> = cases
        .into_iter()
        .map(|(name, f, bench)| {
            Trial::test(name, move || trial(f)).with_ignored_flag(bench || why.is_some())
        })
        .collect();
    if let (None, Some(gv)) = (&why, &gvisor_why) {
        eprintln!("server egress tests on gvisor ignored: {gv}");
    }
    trials.extend(gvisor_cases.into_iter().map(|(name, f)| {
        Trial::test(name, move || trial(f)).with_ignored_flag(why.is_some() || gvisor_why.is_some())
    }));
    if let Some(why) = &why {
        eprintln!("server egress tests ignored: {why}");
    }
    libtest_mimic::run(&args, trials).exit();
}
