#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
//! Network egress end to end: `ampoule run --allow-host ...` against real upstream servers.
//!
//! Every case runs inside a throw-away outer namespace (like the containment suite's jail:
//! `unshare --mount --pid --net ...`, the host's `/` read-only), so the nftables table, the
//! veth pairs and every address live in the jail's own network namespace and never touch the
//! machine's network. Inside the jail the test builds an "upstream" host in a namespace of its
//! own (`10.77.0.2`, wired to the jail's `10.77.0.1`) running HTTP on 80, HTTPS on 443 (a test
//! CA made here), a server-first TCP banner on 2222, UDP on 5353 and a DNS listener on 53, all
//! of which log what reaches them; and a service of the jail itself on `0.0.0.0:8080` that no
//! sandbox may reach. Names get addresses with `--resolve` (the gateway's pins) or the jail's
//! own `/etc/hosts` (the system resolver). No address outside this machine is ever used.
//!
//! Needs root, `unshare`, `ip`, `nft` and `/usr/bin/python3`; without them every case is
//! reported as ignored with the reason, never as passed. `latency` is ignored by default:
//! `cargo test --release -p ampoule-cli --test egress -- --ignored latency --nocapture`.
//! `EGRESS_VERBOSE=1` prints every probe's outcome and what the upstream saw.

use std::path::Path;
use std::process::Command;

use ampoule_testkit::host::{Need, missing};
use ampoule_testkit::jail::{self, PRELUDE};
use ampoule_testkit::upstream;
use ampoule_types::{EgressProtocol, RunResult};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;

/// The rest of the jail, after its prelude and the upstream host (`ampoule_testkit`): the
/// case's `before` shell, then `ampoule run` ("$@") with `$T/code` on stdin, its exit status,
/// the `amp*` links it left, and the case's `after` shell.
const RUN: &str = r#"
eval "$EGRESS_BEFORE"
set +e
"$@" < "$T/code" > "$T/result.json" 2> "$T/ampoule.err"
echo $? > "$T/rc"
ip -o link show | grep -c ': amp' > "$T/leftover_links"
eval "$EGRESS_AFTER"
sleep 0.2
"#;

/// Python helpers the sandboxed probes share: `check(name, fn)` records `ok: ...` or
/// `error: ...` per probe; `raw_http`, `tls`, `banner`, `udp`, `dns_query` make raw attempts.
const PROBE_PRELUDE: &str = r#"
import json, os, socket, ssl, struct, subprocess, sys, time, urllib.request
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
def read_all(s):
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            return data
        data += d
def raw_http(ip, port, host):
    s = socket.create_connection((ip, port), 5)
    s.sendall(b"GET /raw HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
    data = read_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode() + " | " + body.decode().strip()
def fronting(ip, port, first, second):
    s = socket.create_connection((ip, port), 5)
    s.sendall(b"GET /front1 HTTP/1.1\r\nHost: " + first.encode() + b"\r\n\r\n"
              b"GET /front2 HTTP/1.1\r\nHost: " + second.encode() + b"\r\nConnection: close\r\n\r\n")
    import re
    return [m.decode() for m in re.findall(rb"HTTP/1\.1 \d{3} [^\r\n]*", read_all(s))]
def tls(ip, port, sni, ctx):
    s = socket.create_connection((ip, port), 5)
    t = ctx.wrap_socket(s, server_hostname=sni)
    t.sendall(b"GET /tls HTTP/1.1\r\nHost: " + sni.encode() + b"\r\nConnection: close\r\n\r\n")
    return read_all(t).split(b"\r\n")[0].decode()
def banner(ip, port, send=None):
    s = socket.create_connection((ip, port), 5)
    s.settimeout(15)
    if send:
        s.sendall(send)
    return "got %r" % s.recv(100)
def udp(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"ping-udp", (ip, port))
    try:
        return "reply %r" % (s.recvfrom(100)[0],)
    except socket.timeout:
        return "no reply"
def dns_query(server, name):
    q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q, (server, 53))
    r = s.recvfrom(512)[0]
    rcode = r[3] & 0xf
    answers = struct.unpack(">H", r[6:8])[0]
    ip = socket.inet_ntoa(r[-4:]) if answers else "-"
    return "rcode=%d answers=%d %s" % (rcode, answers, ip)
def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[1] == "00000000":
            return socket.inet_ntoa(struct.pack("<I", int(f[2], 16)))
"#;

/// While the sandbox runs, a process of the jail (a local user of the host) tries to use the
/// sandbox's gateway itself; the outcome lands in `$T/host_probe`.
const HOST_PROBE: &str = r#"
( i=0
  while [ $i -lt 400 ]; do
    gw=$(ip -o -4 addr show | awk '$2 ~ /^amp/ { split($4, a, "/"); print a[1]; exit }')
    if [ -n "$gw" ]; then
      sleep 0.5
      /usr/bin/python3 -c '
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 15001), 2)
    s.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    d = s.recv(100)
    print("reached %r" % d[:20] if d else "closed")
except OSError as e:
    print("blocked", type(e).__name__)
' "$gw" > "$T/host_probe"
      break
    fi
    i=$((i+1)); sleep 0.05
  done ) &
"#;

/// Everything the allowlist case tries from inside the sandbox.
const ALLOWLIST_PROBE: &str = r#"
CA = "/mnt/data/upstream-ca.pem"
ctx = ssl.create_default_context(cafile=CA)
check("dns_allowed", lambda: socket.gethostbyname("allowed.test"))
check("http_allowed", lambda: get("http://allowed.test/a"))
check("https_allowed", lambda: get("https://allowed.test/b", ctx))
check("dns_denied", lambda: socket.gethostbyname("denied.test"))
check("http_denied", lambda: get("http://denied.test/c"))
check("https_denied", lambda: get("https://denied.test/d", ctx))
check("http_ip_literal", lambda: get("http://10.77.0.2/e"))
check("https_ip_literal", lambda: get("https://10.77.0.2/f", ctx))
check("dns_private", lambda: socket.gethostbyname("private.test"))
check("http_private", lambda: get("http://private.test/g"))
check("dns_metadata", lambda: socket.gethostbyname("metadata.test"))
# Code that ignores every convention and writes to sockets itself.
check("raw_allowed_host", lambda: raw_http("10.77.0.2", 80, "allowed.test"))
check("raw_denied_host", lambda: raw_http("10.77.0.2", 80, "denied.test"))
check("raw_private_host", lambda: raw_http("10.77.0.2", 80, "private.test"))
check("raw_metadata_host", lambda: raw_http("10.77.0.2", 80, "metadata.test"))
check("raw_fronting", lambda: fronting("10.77.0.2", 80, "allowed.test", "denied.test"))
check("raw_jail_service", lambda: raw_http("10.77.0.1", 8080, "10.77.0.1"))
check("raw_gateway_service", lambda: raw_http(gateway(), 8080, gateway()))
check("tls_denied_sni", lambda: tls("10.77.0.2", 443, "denied.test", ctx))
check("tls_allowed_sni", lambda: tls("10.77.0.2", 443, "allowed.test", ctx))
check("tcp_silent", lambda: banner("10.77.0.2", 2222))
check("tcp_garbage", lambda: banner("10.77.0.2", 2222, b"hello\r\n"))
check("udp", lambda: udp("10.77.0.2", 5353))
check("udp_gateway", lambda: udp(gateway(), 5353))
check("dns_direct_denied", lambda: dns_query("10.77.0.2", "denied.test"))
check("dns_direct_allowed", lambda: dns_query("10.77.0.2", "allowed.test"))
check("ipv6", lambda: socket.create_connection(("fd77::2", 80), 3))
check("ipv6_addresses", lambda: [l.split()[-1] for l in open("/proc/net/if_inet6").read().splitlines()])
check("proxy_env", lambda: sorted(k for k in os.environ if "proxy" in k.lower()))
# No credential rule: the gateway's CA is nowhere in this sandbox.
check("gateway_ca", lambda: os.path.exists("/etc/ampoule") or "SSL_CERT_FILE" in os.environ)
print(json.dumps(res))
"#;

/// The injection case: real clients (urllib, curl, node) with their default trust, then a
/// search of everything the sandbox can read for the secret's marker prefix. The probe never
/// knows the secret itself, only that it starts with `AMPOULE-SECRET-`.
const INJECT_PROBE: &str = r#"
check("https", lambda: get("https://inject.test/https"))
check("http", lambda: get("http://inject.test/http"))
check("https_forged", lambda: get("https://inject.test/forged", headers={"Authorization": "Bearer forged"}))
def run(argv):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    return (p.stdout + p.stderr).strip()
if os.path.exists("/usr/bin/curl"):
    check("curl", lambda: run(["/usr/bin/curl", "-sS", "https://inject.test/curl"]))
if os.path.exists("/usr/bin/node"):
    check("node", lambda: run(["/usr/bin/node", "-e",
        "require('https').get('https://inject.test/node', r => { let b = ''; r.on('data', d => b += d);"
        " r.on('end', () => console.log(r.statusCode, b.trim())) }).on('error', e => console.log('ERR', e.message))"]))
# Tools that read only the system store trust the gateway too.
check("system_store", lambda: open("/etc/ampoule/egress-ca.crt").read().strip() in open("/etc/ssl/certs/ca-certificates.crt").read())
check("trust_env", lambda: {k: os.environ.get(k) for k in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE"]})
"#;

/// Times HTTPS requests to `allowed.test`/`inject.test` at `10.77.0.2`: `n` requests each on a
/// new connection (TCP + TLS handshake + GET + body), then `n` on one kept-alive connection.
const LATENCY_CLIENT: &str = r#"
import json, os, socket, ssl, sys, time
name, n, cafile, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
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
def fresh():
    t0 = time.perf_counter()
    s = socket.create_connection((ip, 443), 10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = ctx.wrap_socket(s, server_hostname=name)
    t.sendall(req); response(t); t.close()
    return (time.perf_counter() - t0) * 1000
for _ in range(10): fresh()
new = [fresh() for _ in range(n)]
s = socket.create_connection((ip, 443), 10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t = ctx.wrap_socket(s, server_hostname=name)
for _ in range(10): t.sendall(req); response(t)
kept = []
for _ in range(n):
    t0 = time.perf_counter(); t.sendall(req); response(t); kept.append((time.perf_counter() - t0) * 1000)
res = json.dumps({"new": new, "kept": kept})
if out == "-": print(res)
else: open(out, "w").write(res)
"#;

/// `{T}` in arguments and environment values stands for the case's directory.
fn expand(s: &str, t: &Path) -> String {
    s.replace("{T}", &t.display().to_string())
}

/// Start-up cost of network mode: `ampoule run` of `print(1)` without and with an allowed host
/// (veth pair, table check, gateway), interleaved, wall time per run in ms.
const STARTUP: &str = r#"
import json, subprocess, sys, time
amp, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
res = {"none": [], "allowlist": []}
for i in range(n + 3):
    for kind, extra in [("none", []), ("allowlist", ["--allow-host", "allowed.test"])]:
        t0 = time.perf_counter()
        p = subprocess.run([amp, "run", *extra, "-"], input=b"print(1)", capture_output=True)
        ms = (time.perf_counter() - t0) * 1000
        if p.stdout != b"1\n":
            raise SystemExit("%s: %r %r" % (kind, p.stdout, p.stderr))
        if i >= 3:
            res[kind].append(ms)
open(out, "w").write(json.dumps(res))
"#;

/// What one jailed run produced.
struct Jailed {
    result: RunResult,
    rc: i32,
    ampoule_stderr: String,
    /// JSON lines the upstream host logged.
    upstream: Vec<Value>,
    /// JSON lines the jail's own service logged.
    jail_service: Vec<Value>,
    leftover_links: String,
    dir: tempfile::TempDir,
}

#[derive(Default)]
struct Case<'a> {
    args: Vec<String>,
    code: String,
    env: Vec<(&'a str, String)>,
    /// The jail's `/etc/hosts` (the system resolver's answers for the gateway).
    hosts: Option<&'a str>,
    before: &'a str,
    after: &'a str,
}

fn jail(case: &Case<'_>) -> Result<Jailed, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let t = dir.path();
    upstream::prepare(t)?;
    std::fs::write(t.join("latency.py"), LATENCY_CLIENT).unwrap();
    std::fs::write(t.join("startup.py"), STARTUP).unwrap();
    std::fs::write(t.join("code"), &case.code).unwrap();
    if let Some(h) = case.hosts {
        std::fs::write(t.join("hosts"), h).unwrap();
    }
    let mut cmd = jail::command(&format!("{PRELUDE}{}{RUN}", upstream::HOST));
    cmd.args([env!("CARGO_BIN_EXE_ampoule"), "run", "--json"])
        .args(case.args.iter().map(|a| expand(a, t)))
        .arg("-")
        .env("JAIL_T", t)
        .env("EGRESS_BEFORE", case.before)
        .env("EGRESS_AFTER", case.after)
        .env_remove("SSL_CERT_FILE");
    for (k, v) in &case.env {
        cmd.env(k, expand(v, t));
    }
    let out = cmd.output().map_err(|e| format!("starting unshare: {e}"))?;
    let ampoule_stderr = std::fs::read_to_string(t.join("ampoule.err")).unwrap_or_default();
    let result_text = std::fs::read_to_string(t.join("result.json")).unwrap_or_default();
    let rc = std::fs::read_to_string(t.join("rc"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            format!(
                "the jail did not run ampoule\n--- jail stderr ---\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let result: RunResult = serde_json::from_str(&result_text).map_err(|e| {
        format!("no result object ({e}); rc {rc}; ampoule stderr:\n{ampoule_stderr}")
    })?;
    Ok(Jailed {
        result,
        rc,
        ampoule_stderr,
        upstream: upstream::read_log(&t.join("upstream.log")),
        jail_service: upstream::read_log(&t.join("jail.log")),
        leftover_links: std::fs::read_to_string(t.join("leftover_links"))
            .unwrap_or_default()
            .trim()
            .to_owned(),
        dir,
    })
}

/// The probe's `check` results.
fn probes(j: &Jailed) -> Result<serde_json::Map<String, Value>, String> {
    let last = j.result.stdout.lines().last().unwrap_or_default();
    match serde_json::from_str::<Value>(last) {
        Ok(Value::Object(m)) => {
            if std::env::var_os("EGRESS_VERBOSE").is_some() {
                for (k, v) in &m {
                    eprintln!("  {k:22} {v}");
                }
                eprintln!("  upstream saw: {:?}", j.upstream);
            }
            Ok(m)
        }
        _ => Err(format!(
            "the probe printed no result\nstdout: {}\nstderr: {}\nampoule: {}",
            j.result.stdout, j.result.stderr, j.ampoule_stderr
        )),
    }
}

fn expect(
    probes: &serde_json::Map<String, Value>,
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

fn pins(args: &mut Vec<String>, pairs: &[(&str, &str)]) {
    for (name, ip) in pairs {
        args.push("--resolve".into());
        args.push(format!("{name}={ip}"));
    }
}

fn allowlist() -> Result<(), Failed> {
    let mut args: Vec<String> = [
        "--allow-host",
        "allowed.test",
        "--allow-host",
        "private.test",
        "--allow-host",
        "metadata.test",
        "--timeout",
        "90",
    ]
    .map(String::from)
    .to_vec();
    pins(
        &mut args,
        &[
            ("allowed.test", "10.77.0.2"),
            ("denied.test", "10.77.0.2"),
            ("metadata.test", "169.254.169.254"),
        ],
    );
    // The upstream's CA, for the sandbox's own verification of the passed-through TLS.
    args.extend(["--file".into(), "{T}/upstream-ca.pem".into()]);
    let case = Case {
        args,
        before: HOST_PROBE,
        code: format!("{PROBE_PRELUDE}{ALLOWLIST_PROBE}"),
        // private.test is *not* pinned: the system resolver (the jail's /etc/hosts) says it is
        // 10.77.0.2, as a rebinding DNS server would say of a public name.
        hosts: Some("127.0.0.1 localhost\n10.77.0.2 private.test\n"),
        ..Case::default()
    };
    check_allowlist(&jail(&case)?)
}

fn check_allowlist(j: &Jailed) -> Result<(), Failed> {
    let p = probes(j)?;
    let ok = |prefix: &'static str| move |s: &str| s.starts_with(prefix);
    let err = |s: &str| s.starts_with("error:");
    let mut errors = Vec::new();
    let e = &mut errors;
    expect(&p, "dns_allowed", |s| s == "ok: 10.77.0.2", e);
    expect(&p, "http_allowed", ok("ok: 200 upstream-http"), e);
    expect(&p, "https_allowed", ok("ok: 200 upstream-https"), e);
    for name in [
        "dns_denied",
        "http_denied",
        "https_denied",
        "https_ip_literal",
        "dns_private",
        "http_private",
        "dns_metadata",
        "tls_denied_sni",
        "ipv6",
    ] {
        expect(&p, name, err, e);
    }
    expect(&p, "http_ip_literal", |s| s.contains("403"), e);
    expect(&p, "raw_allowed_host", ok("ok: HTTP/1.1 200"), e);
    expect(
        &p,
        "raw_denied_host",
        |s| s.contains("403") && s.contains("no rule allows denied.test"),
        e,
    );
    expect(
        &p,
        "raw_private_host",
        |s| s.contains("403") && s.contains("private address"),
        e,
    );
    expect(
        &p,
        "raw_metadata_host",
        |s| s.contains("403") && s.contains("link-local"),
        e,
    );
    // A second request on a kept-alive connection may not name another host.
    expect(
        &p,
        "raw_fronting",
        |s| s == "ok: ['HTTP/1.1 200 OK', 'HTTP/1.1 421 Misdirected Request']",
        e,
    );
    expect(
        &p,
        "raw_jail_service",
        |s| s.contains("403") && s.contains("IP literal"),
        e,
    );
    expect(
        &p,
        "raw_gateway_service",
        |s| s.contains("403") && s.contains("IP literal"),
        e,
    );
    expect(&p, "tls_allowed_sni", ok("ok: HTTP/1.1 200"), e);
    // A server-first protocol never gets its banner through: the gateway waits for a request,
    // then closes; a client that speaks first is cut off at once.
    expect(&p, "tcp_silent", |s| s == "ok: got b''", e);
    expect(&p, "tcp_garbage", |s| s == "ok: got b''", e);
    expect(&p, "udp", |s| s == "ok: no reply", e);
    expect(&p, "udp_gateway", |s| s == "ok: no reply", e);
    // DNS sent straight to the upstream's resolver lands on the gateway's responder instead.
    expect(&p, "dns_direct_denied", ok("ok: rcode=3 answers=0"), e);
    expect(
        &p,
        "dns_direct_allowed",
        |s| s == "ok: rcode=0 answers=1 10.77.0.2",
        e,
    );
    // Only loopback's ::1: the link to the gateway has no IPv6 at all.
    expect(
        &p,
        "ipv6_addresses",
        |s| s == "ok: ['lo']" || s == "ok: []",
        e,
    );
    expect(&p, "proxy_env", |s| s == "ok: []", e);
    expect(&p, "gateway_ca", |s| s == "ok: False", e);

    // What reached the upstream: exactly the allowed requests, nothing else at all.
    let mut arrived: Vec<String> = j
        .upstream
        .iter()
        .map(|l| {
            format!(
                "{} {} {}",
                l["kind"].as_str().unwrap_or(""),
                l["host"].as_str().unwrap_or(""),
                l["path"].as_str().unwrap_or("")
            )
        })
        .collect();
    arrived.sort();
    let want = [
        "http allowed.test /a",
        "http allowed.test /front1",
        "http allowed.test /raw",
        "https allowed.test /b",
        "https allowed.test /tls",
    ];
    if arrived != want {
        errors.push(format!("the upstream saw {arrived:?}, wanted {want:?}"));
    }
    if !j.jail_service.is_empty() {
        errors.push(format!(
            "the jail's own service was reached: {:?}",
            j.jail_service
        ));
    }
    // Every attempt is on record.
    let ev = &j.result.egress;
    let has = |protocol: EgressProtocol, host: &str, allowed: bool| {
        ev.iter()
            .any(|e| e.protocol == protocol && e.host == host && e.allowed == allowed)
    };
    for (protocol, host, allowed) in [
        (EgressProtocol::Dns, "allowed.test", true),
        (EgressProtocol::Http, "allowed.test", true),
        (EgressProtocol::Tls, "allowed.test", true),
        (EgressProtocol::Dns, "denied.test", false),
        (EgressProtocol::Http, "denied.test", false),
        (EgressProtocol::Tls, "denied.test", false),
        (EgressProtocol::Http, "10.77.0.2", false),
        // Clients send no server name for an IP literal: refused for that.
        (EgressProtocol::Tls, "", false),
        (EgressProtocol::Http, "private.test", false),
        (EgressProtocol::Dns, "private.test", false),
        (EgressProtocol::Http, "metadata.test", false),
        (EgressProtocol::Tcp, "", false),
    ] {
        if !has(protocol, host, allowed) {
            errors.push(format!(
                "no event {protocol:?} {host} allowed={allowed} in {ev:#?}"
            ));
        }
    }
    if j.leftover_links != "0" {
        errors.push(format!("veth left in the jail: {}", j.leftover_links));
    }
    let host_probe = std::fs::read_to_string(j.dir.path().join("host_probe")).unwrap_or_default();
    // Dropped by the table (a timeout), not merely refused by the gateway.
    if !host_probe.starts_with("blocked TimeoutError") {
        errors.push(format!(
            "a process of the host used the sandbox's gateway: {host_probe:?}"
        ));
    }
    if j.rc != 0 {
        errors.push(format!("ampoule exited {}: {}", j.rc, j.ampoule_stderr));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n").into())
    }
}

fn injection() -> Result<(), Failed> {
    let secret = format!(
        "AMPOULE-SECRET-{:x}",
        std::process::id() as u64 * 0x9e37_79b9
    );
    let value = format!("Bearer {secret}");
    let mut args: Vec<String> = [
        "--allow-host",
        "inject.test",
        "--inject",
        "inject.test:Authorization=EXAMPLE_TOKEN",
        "--timeout",
        "90",
    ]
    .map(String::from)
    .to_vec();
    pins(&mut args, &[("inject.test", "10.77.0.2")]);
    let case = Case {
        args,
        code: format!("{PROBE_PRELUDE}{INJECT_PROBE}{}", upstream::SECRET_SCAN),
        env: vec![
            ("EXAMPLE_TOKEN", value.clone()),
            // The gateway verifies the upstream against the test CA.
            ("SSL_CERT_FILE", "{T}/upstream-ca.pem".into()),
        ],
        ..Case::default()
    };
    let j = jail(&case)?;
    let p = probes(&j)?;
    let mut errors = Vec::new();
    let e = &mut errors;
    let ok_auth = |s: &str| s.starts_with("ok: 200 upstream-") && s.ends_with("auth=yes");
    expect(&p, "https", ok_auth, e);
    expect(&p, "http", ok_auth, e);
    expect(&p, "https_forged", ok_auth, e);
    if p.contains_key("curl") {
        expect(&p, "curl", |s| s == "ok: upstream-https auth=yes", e);
    }
    if p.contains_key("node") {
        expect(&p, "node", |s| s == "ok: 200 upstream-https auth=yes", e);
    }
    expect(&p, "system_store", |s| s == "ok: True", e);
    expect(
        &p,
        "trust_env",
        |s| {
            s.contains("/etc/ampoule/ca-certificates.crt")
                && s.contains("/etc/ampoule/egress-ca.crt")
        },
        e,
    );
    if p.get("secret_hits") != Some(&Value::Array(vec![])) {
        errors.push(format!(
            "the secret's marker is in the sandbox: {:?}",
            p.get("secret_hits")
        ));
    }
    if p.get("files_scanned").and_then(Value::as_u64).unwrap_or(0) < 10 {
        errors.push("the probe scanned almost no files: it proves nothing".into());
    }
    let everything = format!("{}{}", j.result.stdout, j.result.stderr);
    if everything.contains(&secret) {
        errors.push("the secret is in the sandbox's output".into());
    }
    // The upstream saw the secret on every request, the forged value on none.
    let auths: Vec<&str> = j
        .upstream
        .iter()
        .map(|l| l["authorization"].as_str().unwrap_or("<none>"))
        .collect();
    if auths.len() < 3 || auths.iter().any(|a| *a != value) {
        errors.push(format!("the upstream saw authorizations {auths:?}"));
    }
    if !j
        .result
        .egress
        .iter()
        .any(|e| e.injected && e.protocol == EgressProtocol::Tls)
        || !j
            .result
            .egress
            .iter()
            .any(|e| e.injected && e.protocol == EgressProtocol::Http)
    {
        errors.push(format!("no injected events: {:#?}", j.result.egress));
    }
    if serde_json::to_string(&j.result).unwrap().contains(&secret)
        || j.ampoule_stderr.contains(&secret)
    {
        errors.push("the secret is in ampoule's result or logs".into());
    }
    if j.leftover_links != "0" {
        errors.push(format!("veth left in the jail: {}", j.leftover_links));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n").into())
    }
}

fn unprivileged_refused() -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let bin = dir.path().join("ampoule");
    std::fs::copy(env!("CARGO_BIN_EXE_ampoule"), &bin)?;
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--reset-env",
        ])
        .arg(&bin)
        .args(["run", "--allow-host", "example.test", "/dev/null"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(125)
        || !stderr.contains("network allowlists need ampoule to run as root")
    {
        return Err(format!("rc {:?}, stderr: {stderr}", out.status.code()).into());
    }
    let doctor = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--reset-env",
        ])
        .arg(&bin)
        .args(["doctor", "--json"])
        .output()?;
    let checks: Value = serde_json::from_slice(&doctor.stdout)?;
    let egress = checks
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "egress"))
        .cloned()
        .unwrap_or_default();
    if egress["level"] != "warn" || !egress["detail"].as_str().unwrap_or("").contains("refused") {
        return Err(format!("doctor says {egress}").into());
    }
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn latency() -> Result<(), Failed> {
    let n: usize = std::env::var("EGRESS_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    // One jail: the direct figures are taken from the jail's own namespace, which reaches the
    // upstream over one veth, as the gateway does; the sandbox's go through its veth, the
    // redirect and the gateway as well.
    let sandbox_code = format!(
        "import subprocess, sys\n\
         for name, ca, out in [('allowed.test', '/mnt/data/upstream-ca.pem', '-'), ('inject.test', '-', '-')]:\n\
         \x20   p = subprocess.run(['/usr/bin/python3', '/mnt/data/latency.py', name, '{n}', ca, out], capture_output=True, text=True)\n\
         \x20   print(p.stdout.strip() or ('ERR ' + p.stderr))\n"
    );
    let mut args: Vec<String> = [
        "--allow-host",
        "allowed.test:443",
        "--allow-host",
        "inject.test:443",
        "--inject",
        "inject.test:Authorization=EXAMPLE_TOKEN",
        "--timeout",
        "600",
        "--file",
    ]
    .map(String::from)
    .to_vec();
    args.push("{T}/upstream-ca.pem".into());
    args.push("--file".into());
    args.push("{T}/latency.py".into());
    pins(
        &mut args,
        &[("allowed.test", "10.77.0.2"), ("inject.test", "10.77.0.2")],
    );
    let after = format!(
        "/usr/bin/python3 \"$T/latency.py\" allowed.test {n} \"$T/upstream-ca.pem\" \"$T/direct.json\"\n\
         /usr/bin/python3 \"$T/startup.py\" \"$1\" {} \"$T/startup.json\"",
        (n / 4).max(10)
    );
    let case = Case {
        args,
        code: sandbox_code,
        env: vec![
            ("EXAMPLE_TOKEN", "Bearer bench".into()),
            ("SSL_CERT_FILE", "{T}/upstream-ca.pem".into()),
        ],
        after: &after,
        ..Case::default()
    };
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_before = load();
    let j = jail(&case)?;
    let load_after = load();
    let direct: Value = serde_json::from_str(
        &std::fs::read_to_string(j.dir.path().join("direct.json"))
            .map_err(|e| format!("no direct figures: {e}"))?,
    )?;
    let mut lines = j.result.stdout.lines();
    let mut parse = |what: &str| -> Result<Value, Failed> {
        let l = lines.next().unwrap_or_default();
        serde_json::from_str(l)
            .map_err(|e| format!("{what}: {e}: {l}\n{}", j.ampoule_stderr).into())
    };
    let through = parse("through the gateway")?;
    let injected = parse("with injection")?;
    let series = |v: &Value, k: &str| -> Vec<f64> {
        v[k].as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    println!(
        "\nHTTPS request latency, n = {n} each (ms); load average before: {} after: {}\n",
        load_before.trim(),
        load_after.trim()
    );
    println!("| path | connection | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    for (label, v) in [
        ("direct (jail → upstream)", &direct),
        ("sandbox → gateway (TLS passed through)", &through),
        (
            "sandbox → gateway (TLS terminated, header injected)",
            &injected,
        ),
    ] {
        for conn in ["new", "kept"] {
            let mut s = series(v, conn);
            if s.len() != n {
                return Err(format!("{label} {conn}: {} samples, wanted {n}", s.len()).into());
            }
            println!(
                "| {label} | {} | {:.2} | {:.2} | {:.2} |",
                if conn == "new" {
                    "new per request"
                } else {
                    "kept alive"
                },
                percentile(&mut s, 0.5),
                percentile(&mut s, 0.9),
                percentile(&mut s, 0.99)
            );
        }
    }
    let startup: Value = serde_json::from_str(
        &std::fs::read_to_string(j.dir.path().join("startup.json"))
            .map_err(|e| format!("no start-up figures: {e}"))?,
    )?;
    println!("\n`ampoule run` of `print(1)`, wall time (ms)\n");
    println!("| network | p50 | p90 | n |");
    println!("|---|---|---|---|");
    for kind in ["none", "allowlist"] {
        let mut s = series(&startup, kind);
        println!(
            "| {kind} | {:.2} | {:.2} | {} |",
            percentile(&mut s, 0.5),
            percentile(&mut s, 0.9),
            s.len()
        );
    }
    Ok(())
}

/// Why this machine cannot run the cases, if it cannot.
fn unavailable() -> Option<String> {
    missing(&[
        Need::Root("it builds network namespaces"),
        Need::Tool("/usr/bin/unshare", "util-linux"),
        Need::Tool("/usr/sbin/ip", "iproute2"),
        Need::Tool("/usr/sbin/nft", "nftables"),
        Need::Tool("/usr/bin/python3", "python3"),
        Need::Tool("/usr/bin/setpriv", "util-linux"),
    ])
}

/// Runs in the jail before `ampoule run`: as soon as the sandbox's veth appears, opens the
/// sandbox's network namespace and keeps it open, as anything still holding the namespace
/// would (a slow teardown under load, a process that entered it). The kernel then cannot
/// destroy the pair when the sandbox ends; only `ampoule run` deleting it does.
const HOLD_NAMESPACE: &str = r#"
(
  jail_ns=$(readlink /proc/$$/ns/net); up_ns=$(readlink /proc/$UP/ns/net)
  i=0
  while ! ip -o link show | grep -q ': amp'; do
    i=$((i+1)); [ $i -lt 1000 ] || exit 0; sleep 0.01
  done
  for p in /proc/[0-9]*; do
    ns=$(readlink $p/ns/net 2>/dev/null) || continue
    [ "$ns" != "$jail_ns" ] && [ "$ns" != "$up_ns" ] || continue
    exec nsenter --net=$p/ns/net /bin/sh -c 'echo "$1" > "$0/held"; exec sleep 30' "$T" "$ns"
  done
) &
"#;

/// `ampoule run` deletes its veth pair before it exits, even while something still holds the
/// sandbox's network namespace (the kernel's own teardown is asynchronous: counting links right
/// after the run raced with it on a loaded machine).
fn veth_removed_before_exit() -> Result<(), Failed> {
    let case = Case {
        args: ["--allow-host", "allowed.test", "--timeout", "30"]
            .map(String::from)
            .to_vec(),
        // Long enough for the holder to find the sandbox's namespace.
        code: "import time; time.sleep(1.5); print('done')".into(),
        before: HOLD_NAMESPACE,
        ..Case::default()
    };
    let j = jail(&case)?;
    if j.result.stdout.trim() != "done" {
        return Err(format!("the run failed: {:?}\n{}", j.result, j.ampoule_stderr).into());
    }
    if !j.dir.path().join("held").exists() {
        return Err("the holder never found the sandbox's network namespace".into());
    }
    if j.leftover_links != "0" {
        return Err(format!("veth left in the jail: {}", j.leftover_links).into());
    }
    Ok(())
}

/// A trial: its name, its body, and whether it is a measurement (ignored unless asked for).
type Entry = (&'static str, fn() -> Result<(), Failed>, bool);

fn main() {
    let args = Arguments::from_args();
    let why = unavailable();
    let cases: [Entry; 5] = [
        ("allowlist", allowlist, false),
        ("veth_removed_before_exit", veth_removed_before_exit, false),
        ("injection", injection, false),
        ("unprivileged_refused", unprivileged_refused, false),
        ("latency", latency, true),
    ];
    let trials = cases
        .into_iter()
        .map(|(name, f, bench)| {
            let ignored = bench || why.is_some();
            Trial::test(name, move || {
                if let Some(why) = unavailable() {
                    eprintln!("{name}: {why}");
                }
                f()
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    if let Some(why) = &why {
        eprintln!("egress tests ignored: {why}");
    }
    libtest_mimic::run(&args, trials).exit();
}
