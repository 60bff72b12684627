//! The fake "upstream" host of the egress tests: an HTTP, HTTPS, TCP-banner, UDP and DNS
//! listener in a network namespace of its own inside the jail, wired to it by a veth pair, and
//! a service of the jail itself that no sandbox may reach. Everything that reaches them is
//! logged as a JSON line. No address outside this machine is ever used.
//!
//! A case writes [`SERVERS`] to `$T/upstream.py` and [`write_certs`] into `$T`, and puts
//! [`HOST`] in its jail script after [`crate::jail::PRELUDE`].

use std::path::Path;

use serde_json::Value;

/// The upstream host's address (the jail's end of the link is `10.77.0.1`).
pub const ADDR: &str = "10.77.0.2";

/// The upstream servers, in Python: HTTP on 80, HTTPS on 443 (`$T/server.pem`), a
/// server-first TCP banner on 2222, UDP on 5353 and 53, all on [`ADDR`]; with `jail` as
/// second argument, the jail's own HTTP service on `0.0.0.0:8080`. Every request, connection
/// and datagram is logged as a JSON line to `$T/<mode>.log` (`upstream.log`, `jail.log`);
/// `$T/<mode>.ready` appears once they listen.
pub const SERVERS: &str = r#"
import http.server, json, os, socket, ssl, sys, threading
T = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "upstream"
lock = threading.Lock()
LOG = open(os.path.join(T, mode + ".log"), "a", buffering=1)
def log(kind, **kw):
    with lock:
        LOG.write(json.dumps(dict(kind=kind, **kw)) + "\n")

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle's algorithm and the client's
    # delayed ACK add 40 ms to every kept-alive response and swamp what is measured.
    disable_nagle_algorithm = True
    def do_GET(self):
        auth = self.headers.get("Authorization")
        log(self.server.kind, path=self.path, host=self.headers.get("Host"), authorization=auth)
        # Never echo the header: the sandbox must not learn the secret from a response.
        body = ("upstream-%s auth=%s\n" % (self.server.kind, "yes" if auth else "no")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

def serve(srv):
    threading.Thread(target=srv.serve_forever, daemon=True).start()

if mode == "jail":
    s = S(("0.0.0.0", 8080), H); s.kind = "jail"; serve(s)
else:
    s = S(("10.77.0.2", 80), H); s.kind = "http"; serve(s)
    t = S(("10.77.0.2", 443), H); t.kind = "https"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(T, "server.pem"), os.path.join(T, "server.key"))
    t.socket = ctx.wrap_socket(t.socket, server_side=True, do_handshake_on_connect=False)
    serve(t)
    def banner():
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("10.77.0.2", 2222)); l.listen(16)
        while True:
            c, a = l.accept(); log("tcp2222", peer=a[0])
            try: c.sendall(b"SSH-2.0-upstream\r\n")
            except OSError: pass
            c.close()
    def udp(port, kind):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("10.77.0.2", port))
        while True:
            d, a = u.recvfrom(4096); log(kind, size=len(d))
    threading.Thread(target=banner, daemon=True).start()
    threading.Thread(target=udp, args=(5353, "udp5353"), daemon=True).start()
    threading.Thread(target=udp, args=(53, "dns53"), daemon=True).start()
open(os.path.join(T, mode + ".ready"), "w").close()
threading.Event().wait()
"#;

/// Shell for the jail, after [`crate::jail::PRELUDE`]: the upstream host in a namespace of its
/// own (made with `unshare --net`, not `ip netns`, so nothing is created under the host's
/// `/run/netns`; its pid is `$UP`), the jail's service, and a wait until both are ready.
pub const HOST: &str = r#"
unshare --net /bin/sh -c 'while [ ! -e "$0/up.go" ]; do sleep 0.01; done
  ip link set lo up; ip addr add 10.77.0.2/24 dev eth0; ip link set eth0 up
  exec /usr/bin/python3 "$0/upstream.py" "$0"' "$T" &
UP=$!
i=0
while [ "$(readlink /proc/$UP/ns/net)" = "$(readlink /proc/$$/ns/net)" ]; do
  i=$((i+1)); [ $i -lt 500 ] || { echo "upstream namespace never appeared" >&2; exit 90; }; sleep 0.01
done
ip link add up0 type veth peer name eth0 netns $UP
ip addr add 10.77.0.1/24 dev up0
ip link set up0 up
touch "$T/up.go"
/usr/bin/python3 "$T/upstream.py" "$T" jail &
i=0
while [ ! -e "$T/upstream.ready" ] || [ ! -e "$T/jail.ready" ]; do
  i=$((i+1)); [ $i -lt 1000 ] || { echo "upstream never became ready" >&2; exit 91; }; sleep 0.01
done
"#;

/// Python for the end of an egress probe (after its `check`s, with `res` their results):
/// looks for the injected credential's marker (`AMPOULE-SECRET-`, built at run time, or this
/// very text would contain it) in the environment, every readable file under the sandbox's
/// usual directories and its own and pid 1's `environ`/`cmdline`; adds `secret_hits` and
/// `files_scanned` to `res` and prints it as JSON.
pub const SECRET_SCAN: &str = r#"
MARK = ("AMPOULE" + "-SECRET-").encode()
hits, scanned = [], 0
for k, v in os.environ.items():
    if MARK in (k + "=" + v).encode():
        hits.append("env " + k)
for top in ["/etc", "/run", "/mnt/data", "/tmp", "/var", "/dev/shm", "/root", "/home"]:
    for dirpath, dirs, files in os.walk(top):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                with open(p, "rb") as fh:
                    scanned += 1
                    if MARK in fh.read(8 << 20):
                        hits.append(p)
            except OSError:
                pass
for p in ["/proc/self/environ", "/proc/self/cmdline", "/proc/1/environ", "/proc/1/cmdline"]:
    try:
        if MARK in open(p, "rb").read():
            hits.append(p)
    except OSError:
        pass
res["secret_hits"] = hits
res["files_scanned"] = scanned
print(json.dumps(res))
"#;

/// Writes [`SERVERS`] as `dir/upstream.py`, and a test CA (`upstream-ca.pem`) and a server
/// certificate (`server.pem`, `server.key`) for every name the egress cases use and for
/// [`ADDR`] (so an IP-literal HTTPS request fails on policy, not on the certificate).
pub fn prepare(dir: &Path) -> Result<(), String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let io = |e: std::io::Error| e.to_string();
    std::fs::write(dir.join("upstream.py"), SERVERS).map_err(io)?;
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "egress test upstream CA");
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().map_err(e)?;
    let names = [
        "allowed.test",
        "denied.test",
        "private.test",
        "metadata.test",
        "inject.test",
        ADDR,
    ];
    let leaf = CertificateParams::new(names.map(String::from).to_vec())
        .map_err(e)?
        .signed_by(&key, &issuer)
        .map_err(e)?;
    std::fs::write(dir.join("upstream-ca.pem"), ca_cert.pem()).map_err(io)?;
    std::fs::write(dir.join("server.pem"), leaf.pem()).map_err(io)?;
    std::fs::write(dir.join("server.key"), key.serialize_pem()).map_err(io)?;
    Ok(())
}

/// The JSON lines of a log the listeners wrote (missing file: none).
pub fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
