//! Network: loopback listeners of the host, abstract unix sockets, interfaces.
//!
//! The jail stands in for the host: it has its own loopback, on which the `before` hooks start
//! listeners that log every connection or datagram. After the run, the `after` hooks report
//! what arrived, then prove the listener worked by reaching it themselves. Outbound attempts
//! only ever target TEST-NET-1 (192.0.2.0/24) and 10.0.0.0/8, never a real address.

use crate::jail::Outcome;
use crate::{Probe, expect_blocked, expect_vars, py};

/// A TCP listener on the jail's 127.0.0.1:47001 that logs each accepted connection.
const TCP_BEFORE: &str = r#"
/usr/bin/python3 -c '
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 47001))
s.listen(64)
open("/tmp/listener.ready", "w").close()
while True:
    c, a = s.accept()
    with open("/tmp/listener.log", "a") as f:
        f.write("%s\n" % (a,))
    c.close()
' &
echo $! > /tmp/listener.pid
i=0; while [ ! -e /tmp/listener.ready ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
"#;

/// Counts what reached the listener, then connects once itself (the listener must count it).
const TCP_AFTER: &str = r#"
echo LISTENER=$(cat /tmp/listener.log 2>/dev/null | wc -l)
/usr/bin/python3 -c 'import socket; socket.create_connection(("127.0.0.1", 47001), 2).close()' && echo SELFCHECK=ok
sleep 0.2
echo LISTENER_AFTER_SELFCHECK=$(cat /tmp/listener.log 2>/dev/null | wc -l)
kill $(cat /tmp/listener.pid); wait $(cat /tmp/listener.pid) 2>/dev/null
"#;

/// An abstract unix socket `@ampoule-jail-probe` in the jail, logging each connection.
const ABSTRACT_BEFORE: &str = r#"
/usr/bin/python3 -c '
import socket
s = socket.socket(socket.AF_UNIX)
s.bind("\0ampoule-jail-probe")
s.listen(64)
open("/tmp/abstract.ready", "w").close()
while True:
    c, _ = s.accept()
    with open("/tmp/abstract.log", "a") as f:
        f.write("connection\n")
    c.close()
' &
echo $! > /tmp/abstract.pid
i=0; while [ ! -e /tmp/abstract.ready ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
"#;

const ABSTRACT_AFTER: &str = r#"
echo ABSTRACT=$(cat /tmp/abstract.log 2>/dev/null | wc -l)
/usr/bin/python3 -c '
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("\0ampoule-jail-probe")
s.close()' && echo SELFCHECK=ok
sleep 0.2
echo ABSTRACT_AFTER_SELFCHECK=$(cat /tmp/abstract.log 2>/dev/null | wc -l)
kill $(cat /tmp/abstract.pid); wait $(cat /tmp/abstract.pid) 2>/dev/null
"#;

/// A UDP receiver on the jail's 127.0.0.1:47002 (and [::1]:47002 when the jail has IPv6).
const UDP_BEFORE: &str = r#"
/usr/bin/python3 -c '
import socket, threading
def serve(fam, addr):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind(addr)
    while True:
        data, a = s.recvfrom(2048)
        with open("/tmp/udp.log", "a") as f:
            f.write("%r\n" % (data,))
socks = [(socket.AF_INET, ("127.0.0.1", 47002))]
try:
    socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).bind(("::1", 0))
    socks.append((socket.AF_INET6, ("::1", 47002)))
except OSError:
    pass
for fam, addr in socks:
    threading.Thread(target=serve, args=(fam, addr)).start()
open("/tmp/udp.ready", "w").close()
' &
echo $! > /tmp/udp.pid
i=0; while [ ! -e /tmp/udp.ready ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
"#;

const UDP_AFTER: &str = r#"
sleep 0.3
echo UDP=$(cat /tmp/udp.log 2>/dev/null | wc -l)
/usr/bin/python3 -c '
import socket
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"selfcheck", ("127.0.0.1", 47002))' && echo SELFCHECK=ok
sleep 0.3
echo UDP_AFTER_SELFCHECK=$(cat /tmp/udp.log 2>/dev/null | wc -l)
kill $(cat /tmp/udp.pid); wait $(cat /tmp/udp.pid) 2>/dev/null
"#;

fn listener_untouched(o: &Outcome, count: &str, after: &str) -> Result<(), String> {
    expect_blocked(o)?;
    expect_vars(o, &[(count, "0"), ("SELFCHECK", "ok"), (after, "1")])
}

pub(crate) fn probes() -> Vec<Probe> {
    vec![
        py(
            "network/only_loopback_interface",
            r#"
lines = open("/proc/net/dev").read().splitlines()[2:]
names = [l.split(":")[0].strip() for l in lines]
if names != ["lo"]:
    print("ESCAPED interfaces", names)
else:
    print("BLOCKED only", names)
"#,
            expect_blocked,
        ),
        py(
            // `ampoule run` makes the network namespace ahead, as real root (owned by the
            // host's user namespace, loopback up): loopback must work for the program, and
            // the namespace must not be reconfigurable from inside, either way.
            "network/loopback_works_and_cannot_be_reconfigured",
            r#"
import errno, fcntl, socket, struct
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
try:
    socket.create_connection(srv.getsockname(), 2).close()
except OSError as e:
    print("INVALID loopback does not work:", e)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
SIOCSIFFLAGS, SIOCSIFADDR = 0x8914, 0x8916
attempts = {
    "lo down": (SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", 0, bytes(14))),
    "address on lo": (SIOCSIFADDR, struct.pack("16sHH4s8s", b"lo", socket.AF_INET, 0,
                                               socket.inet_aton("10.9.9.9"), bytes(8))),
}
for what, (req, ifr) in attempts.items():
    try:
        fcntl.ioctl(s, req, ifr)
        print("ESCAPED", what)
    except OSError as e:
        print("BLOCKED", what, errno.errorcode.get(e.errno, e.errno))
"#,
            expect_blocked,
        ),
        py(
            "network/no_routes_or_neighbours",
            r#"
routes = open("/proc/net/route").read().splitlines()[1:]
print("ESCAPED IPv4 routes", routes) if routes else print("BLOCKED no IPv4 route")
v6 = [l.split() for l in open("/proc/net/ipv6_route").read().splitlines()]
foreign = [l for l in v6 if l[-1] != "lo"]
print("ESCAPED IPv6 routes off loopback", foreign) if foreign else print("BLOCKED IPv6 routes only on lo")
arp = open("/proc/net/arp").read().splitlines()[1:]
print("ESCAPED ARP neighbours", arp) if arp else print("BLOCKED no ARP neighbours")
"#,
            expect_blocked,
        ),
        py(
            "network/host_tcp_listener_unreachable",
            r#"
import errno, socket
# The jail listens on its 127.0.0.1:47001. The sandbox's loopback is its own: every way of
# spelling "this machine" must be refused, none may land on the jail's listener.
for host in ("127.0.0.1", "127.0.0.2", "localhost", "0.0.0.0", "::1", "::ffff:127.0.0.1"):
    try:
        socket.create_connection((host, 47001), timeout=2).close()
        print("ESCAPED connected to", host)
    except ConnectionRefusedError:
        print("BLOCKED", host, "refused")
    except OSError as e:
        print("BLOCKED", host, e)
"#,
            |o| listener_untouched(o, "LISTENER", "LISTENER_AFTER_SELFCHECK"),
        )
        .around(TCP_BEFORE, TCP_AFTER),
        py(
            "network/host_abstract_unix_socket_unreachable",
            r#"
import socket
# Abstract unix sockets belong to the network namespace (and Landlock scopes them as well).
for name in ("\0ampoule-jail-probe",):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(name)
        print("ESCAPED connected to the jail's abstract socket")
    except OSError as e:
        print("BLOCKED", repr(name), e)
    finally:
        s.close()
# The server's own sockets (if any) are not reachable by path either.
for path in ("/run/ampoule/ampoule.sock", "/run/ampoule.sock", "/tmp/.X11-unix/X0", "/run/dbus/system_bus_socket"):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        print("ESCAPED connected to", path)
    except OSError as e:
        print("BLOCKED", path, e.strerror)
    finally:
        s.close()
"#,
            |o| listener_untouched(o, "ABSTRACT", "ABSTRACT_AFTER_SELFCHECK"),
        )
        .around(ABSTRACT_BEFORE, ABSTRACT_AFTER),
        py(
            "network/host_udp_unreachable",
            r#"
import socket
# Datagrams to the jail's loopback receiver must not arrive (the jail counts them).
sent = 0
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    for i in range(10):
        try:
            s.sendto(b"from-the-sandbox", (host, 47002))
            sent += 1
        except OSError as e:
            pass
    s.close()
print("sent", sent, "datagrams")
print("BLOCKED delivery is judged by the jail") if sent else print("INVALID nothing could be sent")
"#,
            |o| listener_untouched(o, "UDP", "UDP_AFTER_SELFCHECK"),
        )
        .around(UDP_BEFORE, UDP_AFTER),
        py(
            "network/outbound_unreachable",
            r#"
import errno, socket
# Documentation and private addresses only. There is no route, so each attempt must fail at
# once with ENETUNREACH; a timeout would mean packets left the sandbox.
for host, port in (("192.0.2.1", 80), ("192.0.2.53", 443), ("10.0.0.1", 80), ("10.255.255.1", 22)):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        print("ESCAPED connected to", host)
    except socket.timeout:
        print("ESCAPED connect to", host, "timed out: there is a route")
    except OSError as e:
        print("BLOCKED tcp", host, e.strerror) if e.errno == errno.ENETUNREACH else print("ESCAPED tcp", host, "failed late:", e)
    finally:
        s.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"x", (host, 53))
        print("ESCAPED udp datagram to", host, "was sent")
    except OSError as e:
        print("BLOCKED udp", host, e.strerror) if e.errno == errno.ENETUNREACH else print("ESCAPED udp", host, e)
    finally:
        u.close()
"#,
            expect_blocked,
        ),
        py(
            "network/dns_resolution_fails",
            r#"
import socket, time
conf = open("/etc/resolv.conf").read()
servers = [l for l in conf.splitlines() if l.strip().startswith("nameserver")]
print("ESCAPED resolv.conf names servers", servers) if servers else print("BLOCKED resolv.conf has no nameserver")
for name in ("example.com", "pypi.org", "github.com", "ampoule.invalid"):
    t = time.monotonic()
    try:
        print("ESCAPED resolved", name, socket.getaddrinfo(name, 443)[0][4])
    except socket.gaierror as e:
        print("BLOCKED", name, e, "in %.1fs" % (time.monotonic() - t))
"#,
            expect_blocked,
        ),
    ]
}
