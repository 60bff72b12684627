//! The network of a sandbox: none at all (loopback only, the default), or a single veth pair to
//! an egress gateway on the host that decides, connection by connection, what may leave.
//!
//! In allowlist mode (root only) the sandbox in slot `n` gets the `/30` at `10.201.0.0 + 4n`:
//! the host side `amp<n>` has `.1`, the sandbox's `eth0` has `.2` and a default route through
//! `.1`, and the sandbox's `/etc/resolv.conf` names `.1`. Nothing routes further: one nftables
//! table, `inet ampoule` (`policies/nftables/egress.nft`), shared by every sandbox and the same
//! for all of them, redirects every TCP connection that arrives on an `amp*` interface to the
//! gateway's proxy port and every UDP datagram to port 53 to its DNS port (on the address of
//! the interface it came in on, so the connection is attributable to its sandbox), accepts
//! nothing else from `amp*` on the host, lets nothing but `amp*` reach the link network (the
//! gateways serve sandboxes only) and forwards nothing to or from `amp*`. As a second layer that does not depend on the table, the
//! host side of every pair has IPv4 forwarding and IPv6 switched off, and the sandbox side is
//! created without IPv6.
//!
//! When the sandbox's network namespace dies, the kernel destroys both ends of the pair, but
//! asynchronously (and only once nothing holds the namespace), so a one-shot run deletes its
//! pair itself before it returns (`remove_host_side`): whoever looks at the host's links after
//! `ampoule run` exits sees none of it. Nothing needs sweeping. A pair left by the previous
//! sandbox of the same slot while its namespace is still being torn down is deleted before the
//! new one is made (the slot lock says nobody else owns it).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::host::Host;
use crate::netlink::{Netlink, PeerNs};

/// TCP port of the egress proxy on the host side of every sandbox's veth pair.
pub const PROXY_PORT: u16 = 15001;
/// UDP port of the egress DNS responder on the host side of every sandbox's veth pair.
pub const DNS_PORT: u16 = 15053;
/// The network every sandbox's `/30` is taken from.
pub const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 0);
/// Prefix length of each sandbox's link network.
pub const LINK_PREFIX: u8 = 30;
/// Name of the interface inside the sandbox.
pub const SANDBOX_INTERFACE: &str = "eth0";
/// The nftables table (family `inet`) that confines every `amp*` interface.
pub const NFT_TABLE: &str = "ampoule";

/// Marker kept in the table's comment: a table with another marker (an older ampoule, other
/// ports) is replaced.
const NFT_MARKER: &str = "ampoule egress v2 tcp 15001 dns 15053";

/// Where the sandbox finds the certificate bundle it trusts when the gateway may terminate
/// TLS (the host's bundle plus the gateway's CA).
pub const CA_BUNDLE: &str = "/etc/ampoule/ca-certificates.crt";
/// The gateway's CA alone (for `NODE_EXTRA_CA_CERTS`, which adds to Node's own roots).
pub const EGRESS_CA: &str = "/etc/ampoule/egress-ca.crt";
/// The host's bundle (Debian's path), which the sandbox sees replaced by [`CA_BUNDLE`].
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How a sandbox reaches the network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Network {
    /// Loopback only: the sandbox has its own network namespace with `lo` and nothing else.
    #[default]
    None,
    /// Wired only to the egress gateway (see the module docs). The caller runs the gateway on
    /// the addresses [`crate::Prepare::network`] gives it, before the program starts.
    Allowlist {
        /// A CA certificate (PEM) the sandbox trusts on top of the host's store: the gateway's,
        /// when it terminates TLS to inject credentials. Only the public certificate enters the
        /// sandbox.
        trusted_ca_pem: Option<String>,
    },
}

/// The addresses of one sandbox's link to the egress gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayAddrs {
    /// Host-side interface name (`amp<slot>`).
    pub interface: String,
    /// Host-side address: where the gateway listens and the sandbox's default route points.
    pub gateway: Ipv4Addr,
    /// The sandbox's own address on `eth0`.
    pub sandbox: Ipv4Addr,
    /// TCP port of the proxy on `gateway`.
    pub proxy_port: u16,
    /// UDP port of the DNS responder on `gateway`.
    pub dns_port: u16,
}

impl GatewayAddrs {
    /// The addresses of the sandbox in slot `index` (`0..SLOTS`).
    pub fn for_slot(index: u32) -> Self {
        let base = u32::from(SUBNET) + (index % crate::host::SLOTS) * 4;
        Self {
            interface: format!("amp{index}"),
            gateway: Ipv4Addr::from(base + 1),
            sandbox: Ipv4Addr::from(base + 2),
            proxy_port: PROXY_PORT,
            dns_port: DNS_PORT,
        }
    }

    /// Where the proxy listens.
    pub fn proxy(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.gateway, self.proxy_port))
    }

    /// Where the DNS responder listens.
    pub fn dns(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.gateway, self.dns_port))
    }
}

/// What the sandbox's init needs to configure its side of the link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InitNetwork {
    pub(crate) address: Ipv4Addr,
    pub(crate) gateway: Ipv4Addr,
    pub(crate) prefix: u8,
}

/// The table, as data a reviewer can read: `policies/nftables/egress.nft`, embedded at build
/// time. Its ports and marker must match the constants above (a unit test checks).
pub const NFT_RULESET: &str = include_str!("../../../policies/nftables/egress.nft");

/// The ruleset as loaded: in one transaction that creates the table if it is missing, deletes
/// it, and adds the current one, so an older version is replaced atomically and a live sandbox
/// is never without its rules.
fn nft_script() -> String {
    format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{NFT_RULESET}")
}

/// Whether the current table is ours and current (a netlink query, well under a millisecond).
fn table_is_current() -> io::Result<bool> {
    let marker = NFT_MARKER.as_bytes();
    Ok(Netlink::netfilter()?
        .inet_table(NFT_TABLE)?
        .is_some_and(|reply| reply.windows(marker.len()).any(|w| w == marker)))
}

/// Whether the nftables table is installed and current in this network namespace (`doctor`).
pub fn table_installed() -> io::Result<bool> {
    table_is_current()
}

/// Makes sure the `inet ampoule` table is in place and current. Checked on every allowlist
/// spawn, because anything (a firewall reload) may have flushed it; loaded with `nft` under a
/// lock in the runtime directory when it is missing or stale.
pub(crate) fn ensure_table(host: &Host) -> Result<()> {
    if table_is_current().ctx(|| "querying nftables".into())? {
        return Ok(());
    }
    let lock_path = host.runtime_dir.join("nftables.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ctx(|| format!("opening {}", lock_path.display()))?;
    let _lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io(format!("locking {}", lock_path.display()), e.into()))?;
    if table_is_current().ctx(|| "querying nftables".into())? {
        return Ok(());
    }
    load_table()?;
    if !table_is_current().ctx(|| "querying nftables".into())? {
        return Err(Error::Network(
            "the nftables table was loaded but is not visible".into(),
        ));
    }
    tracing::info!(table = NFT_TABLE, "installed the egress nftables table");
    Ok(())
}

/// The `nft` executable, by absolute path (never whatever `PATH` says).
pub(crate) fn nft_binary() -> Option<&'static str> {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

fn load_table() -> Result<()> {
    use std::io::Write;
    let nft = nft_binary().ok_or_else(|| {
        Error::Network(
            "nft is not installed, so the egress firewall cannot be set up; \
                 hint: apt-get install nftables"
                .into(),
        )
    })?;
    let mut child = std::process::Command::new(nft)
        .args(["-f", "-"])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("starting {nft}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(nft_script().as_bytes())
            .ctx(|| "writing the nftables ruleset".into())?;
    }
    let out = child
        .wait_with_output()
        .ctx(|| "loading the nftables ruleset".into())?;
    if !out.status.success() {
        return Err(Error::Network(format!(
            "nft refused the egress ruleset: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn write_sysctl(path: &str, value: &str) -> io::Result<()> {
    match std::fs::write(path, value) {
        // No IPv6 in this kernel: nothing to switch off.
        Err(e) if e.kind() == io::ErrorKind::NotFound && path.contains("/ipv6/") => Ok(()),
        other => other,
    }
}

/// Creates the veth pair of a sandbox whose outer init (`pid`) has already unshared its network
/// namespace, and configures the host side: no IPv6, no forwarding, the gateway address, up.
pub(crate) fn wire_host_side(addrs: &GatewayAddrs, pid: u32) -> Result<()> {
    wire_host_side_to(addrs, PeerNs::Pid(pid))
}

/// [`wire_host_side`] with the sandbox's namespace named by `peer`.
fn wire_host_side_to(addrs: &GatewayAddrs, peer: PeerNs) -> Result<()> {
    let name = addrs.interface.as_str();
    let mut nl = Netlink::route().ctx(|| "opening a netlink socket".into())?;
    let mut tries = 0;
    loop {
        match nl.add_veth(name, SANDBOX_INTERFACE, peer) {
            Ok(()) => break,
            // The pair of this slot's previous sandbox, whose namespace the kernel is still
            // tearing down: the slot is ours, so it is stale.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && tries < 5 => {
                tries += 1;
                if let Ok(index) = nl.index_of(name) {
                    let _ = nl.delete_link(index);
                }
                tracing::debug!(interface = name, "removed a stale veth");
                std::thread::sleep(Duration::from_millis(tries));
            }
            Err(e) => return Err(Error::io(format!("creating veth {name}"), e)),
        }
    }
    let index = nl.index_of(name).ctx(|| format!("looking up {name}"))?;
    write_sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1")
        .ctx(|| format!("disabling IPv6 on {name}"))?;
    write_sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/forwarding"), "0")
        .ctx(|| format!("disabling forwarding on {name}"))?;
    nl.add_address(index, addrs.gateway, LINK_PREFIX)
        .ctx(|| format!("adding {}/{LINK_PREFIX} to {name}", addrs.gateway))?;
    nl.link_up(index).ctx(|| format!("bringing {name} up"))?;
    Ok(())
}

/// Deletes the host side of a sandbox's pair, which takes the sandbox side with it, once the
/// sandbox has ended. Synchronous: when it returns the link is gone. A pair the kernel has
/// already destroyed is not an error.
pub(crate) fn remove_host_side(addrs: &GatewayAddrs) -> Result<()> {
    let name = addrs.interface.as_str();
    let mut nl = Netlink::route().ctx(|| "opening a netlink socket".into())?;
    match nl.delete_link_named(name) {
        Err(e) if e.raw_os_error() != Some(libc::ENODEV) => {
            Err(Error::io(format!("deleting veth {name}"), e))
        }
        _ => Ok(()),
    }
}

/// Switches IPv6 off for interfaces created from now on in the calling process's (fresh)
/// network namespace, so the sandbox's `eth0` is born without it (no link-local address, no
/// route). `lo` keeps `::1`: loopback-only IPv6 reaches nothing, and programs that listen on
/// `localhost` keep working as in a sandbox without network. Runs in the outer init.
pub(crate) fn disable_ipv6_here() -> io::Result<()> {
    write_sysctl("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
}

/// Configures the sandbox side of the link (address, up, default route). Runs in the outer
/// init, inside the sandbox's network namespace, after the supervisor made the pair.
pub(crate) fn configure_inside(net: &InitNetwork) -> io::Result<()> {
    configure_link(&mut Netlink::route()?, net)
}

/// [`configure_inside`] through a routing socket of the sandbox's namespace.
fn configure_link(nl: &mut Netlink, net: &InitNetwork) -> io::Result<()> {
    let index = nl.index_of(SANDBOX_INTERFACE)?;
    nl.add_address(index, net.address, net.prefix)?;
    nl.link_up(index)?;
    nl.add_default_route(index, net.gateway)
}

/// Makes a network namespace for a sandbox that is not started by ampoule's own init (the
/// gVisor tier), wired like the default tier's: `lo` up, `eth0` (born without IPv6) with the
/// sandbox's address and a default route through the gateway, whose host side is configured
/// as [`wire_host_side`] does. The namespace is kept alive by a bind mount of it on
/// `pin` (an empty file, created here), which runsc joins by that path; unmount `pin` to let
/// it go. Runs the namespace's own set-up on a short-lived thread of its own (`unshare` acts
/// on the calling thread only), so no other thread of the process ever changes namespace.
pub(crate) fn pinned_namespace(addrs: &GatewayAddrs, pin: &std::path::Path) -> Result<()> {
    std::fs::File::create(pin).ctx(|| format!("creating {}", pin.display()))?;
    let made = in_namespace(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            pin,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(true)
    })?;
    wire_namespace(addrs, made)
}

/// Wires the network namespace of a zygote's child (`pidfd`, a process that made its namespace
/// itself, with `lo` up: see `crate::zygote`) as [`pinned_namespace`] wires one of its own:
/// `eth0` born without IPv6, its address and default route, the host side as
/// [`wire_host_side`] does. The namespace is owned by the zygote's user namespace; real root
/// enters it all the same. Entered through the pidfd, not `/proc/<pid>`, so a recycled pid can
/// never name another process's namespace.
pub(crate) fn wire_forked(addrs: &GatewayAddrs, pidfd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    let made = in_namespace(|| {
        nix::sched::setns(pidfd, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(false)
    })?;
    wire_namespace(addrs, made)
}

/// A network namespace being wired from the supervisor: a descriptor of it and a routing
/// socket bound to it for good.
struct Made {
    ns: std::os::fd::OwnedFd,
    inside: Netlink,
    /// Whether `lo` must be brought up here (a namespace just made; a zygote's child did it).
    lo_down: bool,
}

/// Runs `enter` (which moves the calling thread into the namespace to wire, returning whether
/// that namespace is brand new) on a short-lived thread of its own, then, still there, makes
/// interfaces created from now on start without IPv6 and opens a routing socket: no other
/// thread of the process ever changes namespace.
fn in_namespace(enter: impl FnOnce() -> nix::Result<bool> + Send) -> Result<Made> {
    let made = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<Made> {
            let lo_down = enter()?;
            disable_ipv6_here()?;
            let ns = nix::fcntl::open(
                "/proc/thread-self/ns/net",
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            // Bound to this namespace for its whole life, whichever thread uses it.
            let inside = Netlink::route()?;
            Ok(Made {
                ns,
                inside,
                lo_down,
            })
        })
        .join()
    });
    match made {
        Ok(r) => r.ctx(|| "entering the sandbox's network namespace".into()),
        Err(_) => Err(Error::Network(
            "the thread entering the sandbox's network namespace panicked".into(),
        )),
    }
}

/// The common part of [`pinned_namespace`] and [`wire_forked`]: `lo` up (if needed), the pair,
/// the sandbox side's address and route.
fn wire_namespace(addrs: &GatewayAddrs, made: Made) -> Result<()> {
    let Made {
        ns,
        mut inside,
        lo_down,
    } = made;
    if lo_down {
        let lo = inside.index_of("lo").ctx(|| "looking up lo".into())?;
        inside.link_up(lo).ctx(|| "bringing lo up".into())?;
    }
    {
        use std::os::fd::AsRawFd;
        wire_host_side_to(addrs, PeerNs::Fd(ns.as_raw_fd()))?;
    }
    configure_link(
        &mut inside,
        &InitNetwork {
            address: addrs.sandbox,
            gateway: addrs.gateway,
            prefix: LINK_PREFIX,
        },
    )
    .ctx(|| format!("configuring {SANDBOX_INTERFACE} of the sandbox"))
}

/// The sandbox's `/etc/resolv.conf`.
pub(crate) fn resolv_conf(addrs: &GatewayAddrs) -> String {
    format!(
        "# the ampoule egress gateway answers only for allowed names\nnameserver {}\noptions timeout:2 attempts:2\n",
        addrs.gateway
    )
}

/// Environment variables that make common TLS stacks trust [`CA_BUNDLE`].
pub(crate) fn ca_env() -> [(&'static str, &'static str); 5] {
    [
        ("SSL_CERT_FILE", CA_BUNDLE),
        ("REQUESTS_CA_BUNDLE", CA_BUNDLE),
        ("CURL_CA_BUNDLE", CA_BUNDLE),
        ("PIP_CERT", CA_BUNDLE),
        ("NODE_EXTRA_CA_CERTS", EGRESS_CA),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_gets_its_own_link_network() {
        let a = GatewayAddrs::for_slot(0);
        assert_eq!(a.gateway, Ipv4Addr::new(10, 201, 0, 1));
        assert_eq!(a.sandbox, Ipv4Addr::new(10, 201, 0, 2));
        assert_eq!(a.interface, "amp0");
        let last = GatewayAddrs::for_slot(crate::host::SLOTS - 1);
        assert_eq!(last.gateway, Ipv4Addr::new(10, 201, 255, 253));
        assert_eq!(last.sandbox, Ipv4Addr::new(10, 201, 255, 254));
        assert!(last.interface.len() < 16, "IFNAMSIZ");
        let b = GatewayAddrs::for_slot(1);
        assert_eq!(b.gateway, Ipv4Addr::new(10, 201, 0, 5));
        assert_eq!(b.proxy(), "10.201.0.5:15001".parse().unwrap());
    }

    #[test]
    fn the_ruleset_carries_its_marker_and_ports() {
        let s = nft_script();
        assert!(s.contains(&format!("comment \"{NFT_MARKER}\"")));
        assert!(s.contains(&format!("table inet {NFT_TABLE} {{")));
        assert!(s.contains(&format!("ip daddr {SUBNET}/16 counter drop")));
        assert!(NFT_MARKER.contains(&PROXY_PORT.to_string()));
        assert!(NFT_MARKER.contains(&DNS_PORT.to_string()));
        assert!(s.contains(&format!("redirect to :{PROXY_PORT}")));
        assert!(s.contains(&format!("redirect to :{DNS_PORT}")));
    }
}
