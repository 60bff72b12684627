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

/// The upstream servers, in Python: HTTP on 80 (also an OAuth token endpoint, `POST /token`,
/// and, for `Host: index.test`, the static package index [`BUILD_INDEX`] writes), HTTPS on 443
/// (`$T/server.pem`), a
/// server-first TCP banner on 2222, UDP on 5353 and 53, all on [`ADDR`]; with `jail` as
/// second argument, the jail's own HTTP service on `0.0.0.0:8080`. Every request, connection
/// and datagram is logged as a JSON line to `$T/<mode>.log` (`upstream.log`, `jail.log`);
/// `$T/<mode>.ready` appears once they listen.
pub const SERVERS: &str = r#"
import base64, http.server, json, os, socket, ssl, sys, threading
T = sys.argv[1]
# The token endpoint's client (id:secret) and how long its tokens live.
TOKEN_CLIENT = "ampoule-e2e-client:client-s3cret"
TOKEN_LIFETIME = 2
issued = 0
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
    def do_POST(self):
        # An OAuth 2.0 token endpoint (client credentials, HTTP Basic): a new token per
        # request, living TOKEN_LIFETIME seconds. Its value carries the secret marker (built
        # here, so this file does not hold it) so that a sandbox's secret search finds it.
        global issued
        length = int(self.headers.get("Content-Length") or 0)
        form = self.rfile.read(length).decode()
        auth = self.headers.get("Authorization") or ""
        good = self.path == "/token" and auth == "Basic " + base64.b64encode(TOKEN_CLIENT.encode()).decode() \
            and "grant_type=client_credentials" in form.split("&")
        with lock:
            issued += 1
            token = "AMPOULE" + "-SECRET-tok-%d-%d" % (issued, os.getpid())
        log("token", path=self.path, form=form, good=good, token=token if good else None)
        if good:
            body = json.dumps({"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME}).encode()
            self.send_response(200)
        else:
            body = b'{"error": "invalid_client"}'
            self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if (self.headers.get("Host") or "").split(":")[0] == "index.test":
            return self.index()
        auth = self.headers.get("Authorization")
        log(self.server.kind, path=self.path, host=self.headers.get("Host"), authorization=auth)
        # Never echo the header: the sandbox must not learn the secret from a response.
        body = ("upstream-%s auth=%s\n" % (self.server.kind, "yes" if auth else "no")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def index(self):
        # A static package index: files under $T/index, a directory's index.html.
        path = os.path.normpath(self.path.split("?")[0]).lstrip("/")
        full = os.path.join(T, "index", path)
        if os.path.isdir(full):
            full = os.path.join(full, "index.html")
        log("index", path=self.path)
        try:
            body = open(full, "rb").read()
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if full.endswith(".html") else "application/octet-stream")
        except OSError:
            body = b"not found"
            self.send_response(404)
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

/// The client id and secret the upstream's token endpoint (`POST /token`) accepts.
pub const TOKEN_CLIENT: (&str, &str) = ("ampoule-e2e-client", "client-s3cret");

/// Python that builds a static package index under `$1/index` (the upstream serves it for
/// `Host: index.test`): a pure-Python wheel for each project named in the other arguments
/// (`name==version`), `index/simple/<name>/index.html` (PEP 503, with `#sha256=`) and
/// `index/simple/index.html`. Each package's `__init__.py` says `VALUE = "<name> <version>"`.
pub const BUILD_INDEX: &str = r#"
import base64, hashlib, os, sys, zipfile
NL = chr(10)
root = os.path.join(sys.argv[1], "index")
os.makedirs(os.path.join(root, "packages"), exist_ok=True)
names = []
for spec in sys.argv[2:]:
    name, version = spec.split("==")
    names.append(name)
    dist = "%s-%s.dist-info" % (name, version)
    files = {
        "%s/__init__.py" % name: 'VALUE = "%s %s"' % (name, version) + NL,
        dist + "/METADATA": NL.join(["Metadata-Version: 2.1", "Name: " + name, "Version: " + version, ""]),
        dist + "/WHEEL": NL.join(["Wheel-Version: 1.0", "Generator: ampoule-test", "Root-Is-Purelib: true", "Tag: py3-none-any", ""]),
    }
    record = ""
    for p, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record += "%s,sha256=%s,%d" % (p, digest, len(text.encode())) + NL
    files[dist + "/RECORD"] = record + dist + "/RECORD,," + NL
    wheel = "%s-%s-py3-none-any.whl" % (name, version)
    path = os.path.join(root, "packages", wheel)
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    page = os.path.join(root, "simple", name)
    os.makedirs(page, exist_ok=True)
    with open(os.path.join(page, "index.html"), "w") as f:
        f.write('<!DOCTYPE html><html><body><a href="../../packages/%s#sha256=%s">%s</a></body></html>' % (wheel, sha, wheel))
with open(os.path.join(root, "simple", "index.html"), "w") as f:
    f.write("".join('<a href="%s/">%s</a>' % (n, n) for n in names))
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
        "oauth.test",
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
