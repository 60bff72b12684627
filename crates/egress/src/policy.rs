//! The egress policy: which names, ports and addresses a sandbox may reach, and which requests
//! get a credential. Pure: no I/O, no clock, so every rule is unit-tested.
//!
//! Rules are written as `host`, `host:port`, `*.domain` or `*.domain:port`, or an IP literal
//! (`10.77.0.5`, `10.77.0.5:443`, `[fd00::5]:443`). A rule without a port allows every port.
//! `*.domain` matches every name below `domain` at any depth, not `domain` itself. Names are
//! compared in lowercase without a trailing dot.
//!
//! Decisions, in order:
//! 1. a deny rule that matches wins;
//! 2. an empty allow list allows nothing;
//! 3. a destination given as an IP literal is refused unless an IP-literal rule allows it;
//! 4. a name needs an allow rule that matches it and the port;
//! 5. every address the name resolves to is checked: public addresses pass; loopback,
//!    private (RFC 1918, ULA), link-local (which holds the cloud metadata services), CGNAT,
//!    unspecified, multicast and reserved addresses are refused unless *explicitly* allowed —
//!    by an IP-literal rule for that address, or, for private and CGNAT addresses only, by the
//!    operator pinning the name to it (`[egress.hosts]`). A pin never unlocks loopback,
//!    link-local or unspecified addresses: those need an IP-literal rule, so a typo in a pin
//!    cannot hand a sandbox the host's own services or the metadata endpoint.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::mint::TokenSource;
pub use crate::mint::{ClientAuth, OAuth2Rule};
use crate::packages::{PackageIndex, PackagesConfig};

/// What a sandbox asked to reach: a DNS name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A name, lowercase, without a trailing dot.
    Name(String),
    /// An IP literal.
    Ip(IpAddr),
}

impl Target {
    /// Parses a host as it appears in a `Host` header (port already removed), a TLS server
    /// name or a DNS question. `None` when it is not a valid name or address.
    pub fn parse(host: &str) -> Option<Self> {
        let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
        let unbracketed = h
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(&h);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Some(Target::Ip(ip));
        }
        valid_name(&h).then_some(Target::Name(h))
    }

    /// The host as text (IPv6 without brackets).
    pub fn as_string(&self) -> String {
        match self {
            Target::Name(n) => n.clone(),
            Target::Ip(ip) => ip.to_string(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name(n) => f.write_str(n),
            Target::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A DNS name we accept: letters, digits, `-` and `_`, labels of 1–63 characters, at most 253
/// characters, at least one character.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The host part of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// Exactly this name.
    Exact(String),
    /// Any name strictly below this domain (`*.domain`).
    Below(String),
    /// Exactly this address.
    Ip(IpAddr),
}

impl HostPattern {
    fn parse(host: &str) -> std::result::Result<Self, String> {
        if let Some(domain) = host.strip_prefix("*.") {
            return match Target::parse(domain) {
                Some(Target::Name(d)) => Ok(HostPattern::Below(d)),
                Some(Target::Ip(_)) => Err("a wildcard needs a domain, not an address".into()),
                None => Err(format!("{domain:?} is not a valid domain")),
            };
        }
        if host.contains('*') {
            return Err("`*` is only allowed as the first label (`*.example.com`)".into());
        }
        match Target::parse(host) {
            Some(Target::Name(n)) => Ok(HostPattern::Exact(n)),
            Some(Target::Ip(ip)) => Ok(HostPattern::Ip(ip)),
            None => Err(format!("{host:?} is not a valid host name or address")),
        }
    }

    fn matches(&self, target: &Target) -> bool {
        match (self, target) {
            (HostPattern::Exact(p), Target::Name(n)) => p == n,
            (HostPattern::Below(d), Target::Name(n)) => n
                .strip_suffix(d.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
            (HostPattern::Ip(p), Target::Ip(ip)) => same_ip(*p, *ip),
            _ => false,
        }
    }
}

/// Compares addresses, treating an IPv4-mapped IPv6 address as its IPv4 address.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// One allow or deny rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: HostPattern,
    port: Option<u16>,
    text: String,
}

impl FromStr for Rule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::Rule {
            rule: s.to_owned(),
            why,
        };
        let text = s.trim().to_ascii_lowercase();
        if text.is_empty() {
            return Err(bad("empty rule".into()));
        }
        // `[v6]`, `[v6]:port`, a bare IPv6 address, `host`, `host:port`.
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (addr, after) = rest
                .split_once(']')
                .ok_or_else(|| bad("unclosed `[`".into()))?;
            match after {
                "" => (format!("[{addr}]"), None),
                p => match p.strip_prefix(':') {
                    Some(p) => (format!("[{addr}]"), Some(p.to_owned())),
                    None => return Err(bad("expected `:port` after `]`".into())),
                },
            }
        } else if text.parse::<Ipv6Addr>().is_ok() {
            (text.clone(), None)
        } else {
            match text.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p.to_owned())),
                None => (text.clone(), None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad(format!("{p:?} is not a port (1–65535)"))),
                Ok(n) => Some(n),
            },
        };
        let host = HostPattern::parse(&host).map_err(bad)?;
        Ok(Rule { host, port, text })
    }
}

impl Rule {
    fn matches(&self, target: &Target, port: Option<u16>) -> bool {
        self.host.matches(target)
            && match (self.port, port) {
                (None, _) | (_, None) => true,
                (Some(want), Some(got)) => want == got,
            }
    }

    fn matches_ip(&self, ip: IpAddr, port: Option<u16>) -> bool {
        self.matches(&Target::Ip(ip), port)
    }

    /// The rule as written (lowercase).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `[[pools.NAME.network.inject]]`: a header the gateway adds to requests for `host`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRule {
    /// The name (or `*.domain`) whose requests get the header.
    pub host: String,
    /// The header, e.g. `Authorization`; an existing header of that name is replaced.
    pub header: String,
    /// The environment variable of the ampoule process that holds the value. Exactly one of
    /// this and `oauth2`.
    #[serde(default)]
    pub value_from_env: Option<String>,
    /// Mint the value instead: `Bearer <token>` from an OAuth 2.0 client-credentials grant,
    /// cached until shortly before it expires (see `mint.rs`).
    #[serde(default)]
    pub oauth2: Option<OAuth2Rule>,
}

/// A pool's network policy as configured (`[pools.NAME.network]`), before it is compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Allow rules; empty allows nothing.
    pub allow: Vec<String>,
    /// Deny rules; a match wins over every allow rule.
    pub deny: Vec<String>,
    /// Credential injection rules.
    pub inject: Vec<InjectRule>,
}

/// Where an injected header's value comes from.
#[derive(Clone)]
pub enum Credential {
    /// A value read from the environment when the policy was compiled (marked sensitive, so
    /// hyper never logs it), and the variable's name.
    Static {
        /// The value.
        value: HeaderValue,
        /// `env:<variable>`, what records name.
        name: String,
    },
    /// A token minted by the gateway, shared by every sandbox of the pool that compiled it.
    Minted(Arc<TokenSource>),
}

/// A compiled injection rule. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct Injection {
    host: HostPattern,
    header: HeaderName,
    credential: Credential,
    text: String,
}

impl Injection {
    /// The header name.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Where the value comes from.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The static value, when the rule has one (a minted one exists only when a request
    /// needs it).
    pub fn value(&self) -> Option<&HeaderValue> {
        match &self.credential {
            Credential::Static { value, .. } => Some(value),
            Credential::Minted(_) => None,
        }
    }

    /// What records say about the credential, never its value: the rule's host and
    /// `env:<variable>` or `oauth2:<client_id_env>`.
    pub fn describe(&self) -> String {
        let name = match &self.credential {
            Credential::Static { name, .. } => name.as_str(),
            Credential::Minted(src) => src.name(),
        };
        format!("credential {name} (rule {})", self.text)
    }
}

impl fmt::Debug for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.credential {
            Credential::Static { name, .. } => name.clone(),
            Credential::Minted(src) => src.name().to_owned(),
        };
        f.debug_struct("Injection")
            .field("rule", &self.text)
            .field("header", &self.header)
            .field("source", &source)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// The outcome of a policy check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; the reason names the rule.
    Allow(String),
    /// Refused, and why.
    Deny(String),
}

impl Verdict {
    /// Whether this is [`Verdict::Allow`].
    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allow(_))
    }

    /// The reason, either way.
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Allow(r) | Verdict::Deny(r) => r,
        }
    }
}

/// What kind of address an IP is, for rule 5 of the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Globally routable.
    Public,
    /// RFC 1918, or IPv6 unique local (`fc00::/7`).
    Private,
    /// Shared address space `100.64.0.0/10` (carrier-grade NAT; also some clouds' metadata).
    Cgnat,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `169.254.0.0/16` (the metadata service `169.254.169.254`), `fe80::/10`.
    LinkLocal,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// Multicast.
    Multicast,
    /// Documentation, benchmarking, broadcast and other reserved ranges.
    Reserved,
}

impl AddressClass {
    /// Classifies `ip`; IPv4 addresses embedded in IPv6 (mapped, NAT64, 6to4) count as the IPv4
    /// address they carry.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => classify_v4(v4),
            IpAddr::V6(v6) => classify_v6(v6),
        }
    }

    fn name(self) -> &'static str {
        match self {
            AddressClass::Public => "public",
            AddressClass::Private => "private",
            AddressClass::Cgnat => "shared (CGNAT)",
            AddressClass::Loopback => "loopback",
            AddressClass::LinkLocal => "link-local (metadata)",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Multicast => "multicast",
            AddressClass::Reserved => "reserved",
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, _, _) => AddressClass::Unspecified,
        (10, _, _) => AddressClass::Private,
        (100, 64..=127, _) => AddressClass::Cgnat,
        (127, _, _) => AddressClass::Loopback,
        (169, 254, _) => AddressClass::LinkLocal,
        (172, 16..=31, _) => AddressClass::Private,
        (192, 168, _) => AddressClass::Private,
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => AddressClass::Reserved,
        (198, 18..=19, _) => AddressClass::Reserved,
        (224..=239, _, _) => AddressClass::Multicast,
        (240..=255, _, _) => AddressClass::Reserved,
        _ => AddressClass::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => AddressClass::Unspecified,
        [0, 0, 0, 0, 0, 0, 0, 1] => AddressClass::Loopback,
        // IPv4-compatible (deprecated) addresses.
        [0, 0, 0, 0, 0, 0, _, _] => AddressClass::Reserved,
        // NAT64 well-known prefix 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => classify_v4(embedded(hi, lo)),
        // 6to4: 2002:AABB:CCDD::/48.
        [0x2002, hi, lo, ..] => classify_v4(embedded(hi, lo)),
        [0x2001, 0x0db8, ..] => AddressClass::Reserved,
        [0x0100, 0, 0, 0, ..] => AddressClass::Reserved,
        [x, ..] if x & 0xfe00 == 0xfc00 => AddressClass::Private,
        [x, ..] if x & 0xffc0 == 0xfe80 => AddressClass::LinkLocal,
        [x, ..] if x & 0xffc0 == 0xfec0 => AddressClass::Private,
        [x, ..] if x & 0xff00 == 0xff00 => AddressClass::Multicast,
        _ => AddressClass::Public,
    }
}

/// A compiled network policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    inject: Vec<Injection>,
    /// The filtered package index the gateway serves, when the pool has one.
    packages: Option<Arc<PackageIndex>>,
    /// Hosts whose first connection from a sandbox waits for an approver.
    approve: Vec<Rule>,
}

impl Policy {
    /// Compiles a configured policy. `env` looks up the injection values (the ampoule
    /// process's environment; a function so tests need not touch it). A missing variable is
    /// an error now, not a silently unauthenticated request later.
    pub fn compile(cfg: &PolicyConfig, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let allow = cfg
            .allow
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<Rule>>>()?;
        let deny = cfg
            .deny
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<Rule>>>()?;
        let mut inject = Vec::new();
        for rule in &cfg.inject {
            let bad = |why: String| Error::Inject {
                host: rule.host.clone(),
                why,
            };
            let host = HostPattern::parse(&rule.host.to_ascii_lowercase()).map_err(bad)?;
            if matches!(host, HostPattern::Ip(_)) {
                return Err(bad("credentials are injected by name, not address".into()));
            }
            let header = HeaderName::from_bytes(rule.header.as_bytes())
                .map_err(|_| bad(format!("{:?} is not a header name", rule.header)))?;
            if is_hop_by_hop(&header) || header == http::header::HOST {
                return Err(bad(format!("{header} cannot be injected")));
            }
            let credential = match (&rule.value_from_env, &rule.oauth2) {
                (Some(var), None) => {
                    let raw = env(var)
                        .ok_or_else(|| bad(format!("the environment variable {var} is not set")))?;
                    let mut value = HeaderValue::from_str(&raw).map_err(|_| {
                        bad(format!(
                            "{var} holds characters a header value cannot carry"
                        ))
                    })?;
                    value.set_sensitive(true);
                    Credential::Static {
                        value,
                        name: format!("env:{var}"),
                    }
                }
                (None, Some(oauth2)) => {
                    if header != http::header::AUTHORIZATION {
                        return Err(bad(format!(
                            "an oauth2 token is a bearer token: the header must be \
                             Authorization, not {header}"
                        )));
                    }
                    Credential::Minted(Arc::new(
                        TokenSource::new(oauth2, &env).map_err(|e| bad(format!("oauth2: {e}")))?,
                    ))
                }
                _ => {
                    return Err(bad(
                        "give exactly one of `value_from_env` and `oauth2`".into()
                    ));
                }
            };
            inject.push(Injection {
                host,
                header,
                credential,
                text: rule.host.to_ascii_lowercase(),
            });
        }
        Ok(Self {
            allow,
            deny,
            inject,
            packages: None,
            approve: Vec::new(),
        })
    }

    /// This policy with approval checkpoints: the first connection of a sandbox to a host of
    /// `rules` (the allow list's syntax) waits for the server's [`crate::EgressApprover`].
    pub fn with_approval<S: AsRef<str>>(mut self, rules: &[S]) -> Result<Self> {
        self.approve = rules
            .iter()
            .map(|r| r.as_ref().parse())
            .collect::<Result<Vec<Rule>>>()?;
        Ok(self)
    }

    /// Whether a connection to `target` on `port` waits for an approver first.
    pub fn needs_approval(&self, target: &Target, port: u16) -> bool {
        self.approve.iter().any(|r| r.matches(target, Some(port)))
    }

    /// This policy with a filtered package index (`[pools.NAME.packages]`), served to the
    /// sandbox at [`crate::packages::INDEX_URL`] whatever the allow list says.
    pub fn with_packages(mut self, cfg: &PackagesConfig) -> Result<Self> {
        let index = PackageIndex::compile(cfg).map_err(|why| Error::Packages { why })?;
        self.packages = Some(Arc::new(index));
        Ok(self)
    }

    /// The package index, when the policy has one.
    pub fn packages(&self) -> Option<&Arc<PackageIndex>> {
        self.packages.as_ref()
    }

    /// Environment variables the sandbox needs for this policy: with a package index,
    /// `PIP_INDEX_URL` and `PIP_TRUSTED_HOST` (the index is plain HTTP inside the sandbox).
    pub fn sandbox_env(&self) -> Vec<(String, String)> {
        if self.packages.is_some() {
            PackageIndex::sandbox_env()
        } else {
            Vec::new()
        }
    }

    /// A policy from allow rules alone.
    pub fn allowing<S: AsRef<str>>(rules: &[S]) -> Result<Self> {
        Self::compile(
            &PolicyConfig {
                allow: rules.iter().map(|r| r.as_ref().to_owned()).collect(),
                ..PolicyConfig::default()
            },
            |_| None,
        )
    }

    /// Whether some request may get a header, so TLS to those hosts is terminated and the
    /// sandbox must trust the gateway's CA.
    pub fn injects(&self) -> bool {
        !self.inject.is_empty()
    }

    /// Rules 1–4: may a connection to `target` on `port` be made at all?
    pub fn check(&self, target: &Target, port: u16) -> Verdict {
        self.check_port(target, Some(port))
    }

    /// The DNS form of [`Policy::check`]: is `target` a name some rule allows on some port?
    /// A deny rule with a port does not deny the name, only that port.
    pub fn check_name(&self, target: &Target) -> Verdict {
        if let Some(d) = self
            .deny
            .iter()
            .find(|d| d.port.is_none() && d.host.matches(target))
        {
            return Verdict::Deny(format!("denied by {d}"));
        }
        self.check_port(target, None)
    }

    fn check_port(&self, target: &Target, port: Option<u16>) -> Verdict {
        let shown = match port {
            Some(p) => format!("{}:{p}", display_host(target)),
            None => display_host(target),
        };
        if port.is_some()
            && let Some(d) = self.deny.iter().find(|d| d.matches(target, port))
        {
            return Verdict::Deny(format!("denied by {d}"));
        }
        if self.allow.is_empty() {
            return Verdict::Deny("the allow list is empty".into());
        }
        match self.allow.iter().find(|r| r.matches(target, port)) {
            Some(r) => Verdict::Allow(format!("allowed by {r}")),
            None if matches!(target, Target::Ip(_)) => Verdict::Deny(format!(
                "{shown} is an IP literal and no rule names that address"
            )),
            None => Verdict::Deny(format!("no rule allows {shown}")),
        }
    }

    /// Rule 5: may the gateway connect to `ip`, which `target` resolved to (or is)? `pinned`
    /// says the operator pinned the name to its addresses. `port` is `None` for a DNS answer.
    pub fn check_address(
        &self,
        target: &Target,
        ip: IpAddr,
        port: Option<u16>,
        pinned: bool,
    ) -> Verdict {
        if let Some(d) = self.deny.iter().find(|d| d.matches_ip(ip, port)) {
            return Verdict::Deny(format!("{ip} is denied by {d}"));
        }
        let class = AddressClass::of(ip);
        if class == AddressClass::Public {
            return Verdict::Allow(format!("{ip} is public"));
        }
        if let Some(r) = self.allow.iter().find(|r| r.matches_ip(ip, port)) {
            return Verdict::Allow(format!("{ip} is allowed by {r}"));
        }
        if pinned && matches!(class, AddressClass::Private | AddressClass::Cgnat) {
            return Verdict::Allow(format!("{ip} is pinned for {target}"));
        }
        Verdict::Deny(format!(
            "{} resolves to {ip}, a {} address",
            display_host(target),
            class.name()
        ))
    }

    /// The injection rule for `target`, if any (the first that matches).
    pub fn injection(&self, target: &Target) -> Option<&Injection> {
        self.inject.iter().find(|i| i.host.matches(target))
    }
}

fn display_host(t: &Target) -> String {
    match t {
        Target::Ip(IpAddr::V6(v6)) => format!("[{v6}]"),
        other => other.to_string(),
    }
}

/// Headers that describe one hop of a connection, never the request; injecting them would
/// change how the gateway itself talks HTTP.
fn is_hop_by_hop(h: &HeaderName) -> bool {
    use http::header::*;
    [
        CONNECTION,
        TRANSFER_ENCODING,
        UPGRADE,
        TE,
        TRAILER,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        CONTENT_LENGTH,
    ]
    .contains(h)
        || h.as_str() == "keep-alive"
}

/// Splits a `Host` header value into host and optional port (`[v6]:port`, `name:port`).
pub fn split_host_port(value: &str) -> Option<(&str, Option<u16>)> {
    let value = value.trim();
    if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            p => Some((host, Some(p.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match value.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((h, _)) if h.contains(':') => Some((value, None)),
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((value, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> Target {
        Target::parse(n).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_every_form() {
        let r: Rule = "PyPI.org:443".parse().unwrap();
        assert_eq!(r.host, HostPattern::Exact("pypi.org".into()));
        assert_eq!(r.port, Some(443));
        let r: Rule = "*.githubusercontent.com".parse().unwrap();
        assert_eq!(r.host, HostPattern::Below("githubusercontent.com".into()));
        assert_eq!(r.port, None);
        let r: Rule = "10.77.0.5:8443".parse().unwrap();
        assert_eq!(r.host, HostPattern::Ip(ip("10.77.0.5")));
        let r: Rule = "[fd00::5]:443".parse().unwrap();
        assert_eq!(r.host, HostPattern::Ip(ip("fd00::5")));
        assert_eq!(r.port, Some(443));
        let r: Rule = "fd00::5".parse().unwrap();
        assert_eq!(r.port, None);
        let r: Rule = "example.com.".parse().unwrap();
        assert_eq!(r.host, HostPattern::Exact("example.com".into()));
        for bad in [
            "",
            "*",
            "*.",
            "a.*.com",
            "ex ample.com",
            "example.com:0",
            "example.com:70000",
            "example.com:http",
            "[fd00::5",
            "*.10.0.0.1",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn wildcards_match_below_the_domain_only() {
        let p = Policy::allowing(&["*.example.com"]).unwrap();
        assert!(p.check(&name("api.example.com"), 443).allowed());
        assert!(p.check(&name("a.b.example.com"), 80).allowed());
        assert!(!p.check(&name("example.com"), 443).allowed());
        assert!(!p.check(&name("badexample.com"), 443).allowed());
        assert!(!p.check(&name("example.com.evil.org"), 443).allowed());
    }

    #[test]
    fn ports_restrict_when_given() {
        let p = Policy::allowing(&["pypi.org:443", "files.example"]).unwrap();
        assert!(p.check(&name("pypi.org"), 443).allowed());
        assert!(!p.check(&name("pypi.org"), 80).allowed());
        assert!(p.check(&name("files.example"), 8080).allowed());
        assert!(p.check_name(&name("pypi.org")).allowed());
    }

    #[test]
    fn deny_wins_and_empty_allows_nothing() {
        let empty = Policy::default();
        assert_eq!(
            empty.check(&name("pypi.org"), 443),
            Verdict::Deny("the allow list is empty".into())
        );
        assert!(!empty.check_name(&name("pypi.org")).allowed());
        let p = Policy::compile(
            &PolicyConfig {
                allow: vec!["*.example.com".into()],
                deny: vec!["secret.example.com".into(), "*.example.com:22".into()],
                ..PolicyConfig::default()
            },
            |_| None,
        )
        .unwrap();
        assert!(p.check(&name("api.example.com"), 443).allowed());
        assert!(!p.check(&name("secret.example.com"), 443).allowed());
        assert!(!p.check(&name("api.example.com"), 22).allowed());
        // A deny rule with a port leaves the name resolvable; one without does not.
        assert!(p.check_name(&name("api.example.com")).allowed());
        assert!(!p.check_name(&name("secret.example.com")).allowed());
    }

    #[test]
    fn ip_literals_need_an_ip_rule() {
        let p = Policy::allowing(&["example.com", "192.0.2.7:443"]).unwrap();
        let v = p.check(&Target::Ip(ip("93.184.216.34")), 80);
        assert!(!v.allowed());
        assert!(v.reason().contains("IP literal"), "{v:?}");
        assert!(p.check(&Target::Ip(ip("192.0.2.7")), 443).allowed());
        assert!(!p.check(&Target::Ip(ip("192.0.2.7")), 80).allowed());
        // The rule also makes the (reserved) address itself acceptable.
        assert!(
            p.check_address(
                &Target::Ip(ip("192.0.2.7")),
                ip("192.0.2.7"),
                Some(443),
                false
            )
            .allowed()
        );
        // A mapped IPv6 literal is the same address.
        assert!(p.check(&Target::Ip(ip("::ffff:192.0.2.7")), 443).allowed());
    }

    #[test]
    fn restricted_addresses_need_explicit_permission() {
        let p = Policy::allowing(&["api.test", "10.77.0.9"]).unwrap();
        let t = name("api.test");
        for (addr, pinned, ok) in [
            ("93.184.216.34", false, true),
            ("10.77.0.2", false, false),
            ("10.77.0.2", true, true),
            ("100.100.100.200", true, true),
            ("100.100.100.200", false, false),
            ("10.77.0.9", false, true),
            ("127.0.0.1", true, false),
            ("169.254.169.254", true, false),
            ("0.0.0.0", true, false),
            ("::1", true, false),
            ("fe80::1", true, false),
            ("fd00:ec2::254", false, false),
            ("::ffff:127.0.0.1", true, false),
            ("::ffff:10.77.0.9", false, true),
            ("64:ff9b::a9fe:a9fe", true, false),
            ("2002:7f00:1::", true, false),
            ("224.0.0.1", true, false),
            ("255.255.255.255", true, false),
            ("2606:4700::1111", false, true),
        ] {
            let v = p.check_address(&t, ip(addr), Some(443), pinned);
            assert_eq!(v.allowed(), ok, "{addr} pinned={pinned}: {v:?}");
        }
    }

    #[test]
    fn address_classes() {
        use AddressClass::*;
        for (a, c) in [
            ("10.0.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("192.168.1.1", Private),
            ("100.64.0.1", Cgnat),
            ("100.128.0.1", Public),
            ("127.8.8.8", Loopback),
            ("169.254.169.254", LinkLocal),
            ("0.1.2.3", Unspecified),
            ("8.8.8.8", Public),
            ("fc00::1", Private),
            ("fd12::1", Private),
            ("fe80::1", LinkLocal),
            ("ff02::1", Multicast),
            ("::", Unspecified),
            ("2001:db8::1", Reserved),
        ] {
            assert_eq!(AddressClass::of(ip(a)), c, "{a}");
        }
    }

    #[test]
    fn deny_rules_apply_to_resolved_addresses() {
        let p = Policy::compile(
            &PolicyConfig {
                allow: vec!["api.test".into()],
                deny: vec!["203.0.114.9".into()],
                ..PolicyConfig::default()
            },
            |_| None,
        )
        .unwrap();
        assert!(
            !p.check_address(&name("api.test"), ip("203.0.114.9"), Some(443), false)
                .allowed()
        );
        assert!(
            p.check_address(&name("api.test"), ip("203.0.114.10"), Some(443), false)
                .allowed()
        );
    }

    #[test]
    fn injection_rules_compile_and_hide_their_value() {
        let cfg = PolicyConfig {
            allow: vec!["api.example.com:443".into()],
            inject: vec![InjectRule {
                host: "api.example.com".into(),
                header: "Authorization".into(),
                value_from_env: Some("EXAMPLE_TOKEN".into()),
                oauth2: None,
            }],
            ..PolicyConfig::default()
        };
        let p = Policy::compile(&cfg, |k| {
            (k == "EXAMPLE_TOKEN").then(|| "Bearer s3cr3t".into())
        })
        .unwrap();
        assert!(p.injects());
        let i = p.injection(&name("api.example.com")).unwrap();
        assert_eq!(i.header(), "authorization");
        assert_eq!(i.value().unwrap(), "Bearer s3cr3t");
        assert!(i.value().unwrap().is_sensitive());
        assert_eq!(
            i.describe(),
            "credential env:EXAMPLE_TOKEN (rule api.example.com)"
        );
        assert!(!format!("{p:?}").contains("s3cr3t"));
        assert!(p.injection(&name("other.example.com")).is_none());

        let missing = Policy::compile(&cfg, |_| None).unwrap_err();
        assert!(missing.to_string().contains("EXAMPLE_TOKEN"), "{missing}");
        let mut hop = cfg.clone();
        hop.inject[0].header = "Connection".into();
        assert!(Policy::compile(&hop, |_| Some("x".into())).is_err());
        let mut by_ip = cfg.clone();
        by_ip.inject[0].host = "10.0.0.1".into();
        assert!(Policy::compile(&by_ip, |_| Some("x".into())).is_err());

        // A minted credential instead of a static one.
        let oauth2 = OAuth2Rule {
            token_url: "https://auth.example.com/token".into(),
            client_id_env: "CLIENT_ID".into(),
            client_secret_env: "CLIENT_SECRET".into(),
            scope: None,
            client_auth: ClientAuth::Basic,
        };
        let mut minted = cfg.clone();
        minted.inject[0].value_from_env = None;
        minted.inject[0].oauth2 = Some(oauth2.clone());
        let p = Policy::compile(&minted, |k| Some(format!("{k}-s3cr3t"))).unwrap();
        let i = p.injection(&name("api.example.com")).unwrap();
        assert!(i.value().is_none());
        assert_eq!(
            i.describe(),
            "credential oauth2:CLIENT_ID (rule api.example.com)"
        );
        assert!(!format!("{p:?}").contains("s3cr3t"));
        let err = Policy::compile(&minted, |k| (k == "CLIENT_ID").then(|| "me".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CLIENT_SECRET"), "{err}");
        // Exactly one source, and a bearer token goes in Authorization.
        let mut both = minted.clone();
        both.inject[0].value_from_env = Some("EXAMPLE_TOKEN".into());
        assert!(Policy::compile(&both, |_| Some("x".into())).is_err());
        let mut neither = minted.clone();
        neither.inject[0].oauth2 = None;
        assert!(Policy::compile(&neither, |_| Some("x".into())).is_err());
        let mut other_header = minted;
        other_header.inject[0].header = "X-Api-Key".into();
        assert!(Policy::compile(&other_header, |_| Some("x".into())).is_err());
        // From TOML, as the server's config spells it.
        let toml_rule: InjectRule = serde_json::from_value(serde_json::json!({
            "host": "api.example.com",
            "header": "Authorization",
            "oauth2": {"token_url": "https://auth.example.com/token", "client_id_env": "CLIENT_ID",
                       "client_secret_env": "CLIENT_SECRET", "scope": "read", "client_auth": "body"}
        }))
        .unwrap();
        assert_eq!(toml_rule.oauth2.unwrap().client_auth, ClientAuth::Body);
    }

    #[test]
    fn targets_and_host_headers_parse() {
        assert_eq!(
            Target::parse("API.Example.COM."),
            Some(name("api.example.com"))
        );
        assert_eq!(Target::parse("[::1]"), Some(Target::Ip(ip("::1"))));
        assert_eq!(Target::parse("10.0.0.1"), Some(Target::Ip(ip("10.0.0.1"))));
        assert_eq!(Target::parse("bad host"), None);
        assert_eq!(Target::parse(""), None);
        assert_eq!(
            split_host_port("example.com:8080"),
            Some(("example.com", Some(8080)))
        );
        assert_eq!(split_host_port("example.com"), Some(("example.com", None)));
        assert_eq!(split_host_port("[::1]:80"), Some(("::1", Some(80))));
        assert_eq!(split_host_port("::1"), Some(("::1", None)));
        assert_eq!(split_host_port("example.com:x"), None);
    }
}
