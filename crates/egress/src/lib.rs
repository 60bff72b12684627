//! The egress gateway: the only way out of a sandbox that has network access.
//!
//! A sandbox in allowlist mode has one interface, wired by the runtime to the host (see
//! `ampoule_runtime::network`), where the kernel redirects every TCP connection it opens to
//! this gateway's proxy and every DNS query to its DNS responder, and drops everything else.
//! The gateway listens on that sandbox's own host-side address, so each connection is
//! attributable to one sandbox, and it decides, connection by connection:
//!
//! 1. it reads the first bytes the sandbox sends: a TLS ClientHello gives the server name
//!    (SNI), an HTTP/1 request its `Host` header; anything else is refused ([`sniff`]);
//! 2. the [`policy`] decides on the name and the port the sandbox dialled (deny wins, an empty
//!    list allows nothing, IP literals need an IP rule);
//! 3. the name is resolved once ([`resolve`]: the operator's pins, then the system resolver)
//!    and every address is checked (no private, loopback, link-local or metadata address
//!    unless explicitly allowed); the gateway connects to exactly an address it checked, so
//!    whatever the sandbox's own DNS answers said, DNS rebinding gains nothing;
//! 4. TLS is replayed and spliced, never intercepted, except for hosts with a credential rule:
//!    there it terminates TLS with a certificate from its own CA (`ca.rs`, trusted by the
//!    sandbox) and adds the header to every request (`inject.rs`), so the secret never enters
//!    the sandbox. Plain HTTP is always served request by request, so a kept-alive connection
//!    cannot carry a request for another host.
//!
//! Two services the gateway renders itself, fetching from the host (`fetch.rs`), never through
//! the sandbox's link: credentials minted per request from an OAuth 2.0 token endpoint
//! (`mint.rs`, cached per pool's rule), and a package index filtered by the pool's package
//! policy ([`packages`], at `packages.ampoule.internal`).
//!
//! Every decision becomes an [`EgressEvent`](ampoule_types::EgressEvent): logged with
//! `tracing` (target `ampoule::egress`) and kept on the [`Gateway`] for the execution's
//! result.
//!
//! [`Egress`] is made once per process (pins, CA, upstream trust); [`Egress::start`] starts one
//! [`Gateway`] per sandbox with that sandbox's [`Policy`]. This crate is ordinary safe Rust:
//! it runs in the supervisor, never inside a sandbox, and needs no privileges beyond binding to
//! the addresses the runtime gives it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A library prints nothing: the CLI's printer owns stdout and stderr.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

mod ca;
mod dns;
mod error;
mod events;
mod fetch;
mod gateway;
mod inject;
mod io;
mod mint;
pub mod packages;
pub mod policy;
mod proxy;
pub mod resolve;
pub mod sniff;
mod tls;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

pub use error::{Error, Result};
pub use gateway::Gateway;
pub use mint::TokenSource;
pub use packages::{PackageIndex, PackagesConfig};
pub use policy::{
    ClientAuth, Credential, InjectRule, OAuth2Rule, Policy, PolicyConfig, Rule, Target, Verdict,
};

/// Process-wide settings of the gateway (`[egress]` in the server's config).
#[derive(Debug, Clone, Default)]
pub struct EgressSettings {
    /// Static name → address pins (`[egress.hosts]`, `--resolve`), consulted before the system
    /// resolver. A pin counts as the operator's explicit permission for private and CGNAT
    /// addresses (see [`policy`]).
    pub hosts: BTreeMap<String, String>,
    /// Extra PEM files of CA certificates the gateway trusts for upstream servers when it
    /// terminates TLS (on top of the system store).
    pub extra_roots: Vec<PathBuf>,
}

impl EgressSettings {
    /// The CA file named by `SSL_CERT_FILE` in this process's environment, if any: the usual
    /// way to make the gateway trust a private upstream CA.
    pub fn roots_from_env() -> Vec<PathBuf> {
        std::env::var_os("SSL_CERT_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .into_iter()
            .collect()
    }
}

/// Where one sandbox's gateway listens, and whom it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// TCP address of the proxy: the host side of the sandbox's link.
    pub proxy: SocketAddr,
    /// UDP address of the DNS responder.
    pub dns: SocketAddr,
    /// The sandbox's own address. Connections and queries from any other address are refused,
    /// so a local user of the host cannot borrow a sandbox's allowances or credentials by
    /// connecting to its gateway. `None` serves every peer (tests over loopback).
    pub peer: Option<IpAddr>,
}

/// The egress service of one ampoule process: the resolver with its pins, the certificate
/// authority and the upstream TLS trust. Cheap to clone.
#[derive(Clone)]
pub struct Egress {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress").finish_non_exhaustive()
    }
}

/// What every gateway of the process shares.
pub(crate) struct Shared {
    pub(crate) resolver: resolve::Resolver,
    pub(crate) authority: ca::Authority,
    pub(crate) upstream: tls::Upstream,
    /// Who decides the connections a policy's approval rules hold.
    pub(crate) approver: std::sync::OnceLock<Arc<dyn EgressApprover>>,
}

/// Decides the connections that wait for an approver ([`Policy::with_approval`]): the
/// sandbox's session and execution, and the host and port it connects to. `Err` is why not.
pub trait EgressApprover: Send + Sync {
    /// Waits for the decision.
    fn approve(
        &self,
        session: String,
        execution: String,
        host: String,
        port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<(), String>> + Send>>;
}

impl Egress {
    /// Sets the egress service up: parses the pins and generates this process's CA (its
    /// private key never leaves memory).
    pub fn new(settings: &EgressSettings) -> Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                resolver: resolve::Resolver::new(&settings.hosts)?,
                authority: ca::Authority::generate()?,
                upstream: tls::Upstream::new(settings.extra_roots.clone()),
                approver: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Who decides connections held for approval, for every gateway (once). Without one,
    /// such connections are refused.
    pub fn set_approver(&self, approver: Arc<dyn EgressApprover>) {
        let _ = self.shared.approver.set(approver);
    }

    /// The CA certificate (PEM) a sandbox must trust when its policy injects credentials into
    /// HTTPS requests; `None` when `policy` injects nothing, so no sandbox trusts the CA
    /// without need.
    pub fn trusted_ca_pem(&self, policy: &Policy) -> Option<String> {
        policy
            .injects()
            .then(|| self.shared.authority.cert_pem().to_owned())
    }

    /// Starts a gateway for one sandbox: the proxy and the DNS responder on `at`. Both are
    /// bound at once (with `IP_FREEBIND`, so the address need not exist yet); connections are
    /// served until the [`Gateway`] is dropped. Must be called within a tokio runtime (an error
    /// otherwise). `label` names the sandbox or execution in the logs.
    pub fn start(&self, at: Endpoints, policy: Arc<Policy>, label: &str) -> Result<Gateway> {
        gateway::Gateway::start(self.shared.clone(), at, policy, label)
    }
}
