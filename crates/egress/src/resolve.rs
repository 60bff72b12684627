//! Name resolution for the gateway: the operator's pins first, then the system resolver.
//!
//! The gateway resolves a name once per connection (or DNS question), checks every address,
//! and connects to one it checked; what the sandbox itself was told by DNS does not matter.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::policy::Target;

/// How long the system resolver may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Addresses of a name, and where they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The addresses, in the resolver's order, without duplicates.
    pub addrs: Vec<IpAddr>,
    /// Whether they came from an operator's pin.
    pub pinned: bool,
}

/// Pins plus the system resolver.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    pins: HashMap<String, Vec<IpAddr>>,
}

impl Resolver {
    /// A resolver with these pins: name → one address, or several separated by commas.
    pub fn new(pins: &BTreeMap<String, String>) -> Result<Self> {
        let mut out = HashMap::new();
        for (name, value) in pins {
            let bad = |why: String| Error::Pin {
                name: name.clone(),
                why,
            };
            let key = match Target::parse(name) {
                Some(Target::Name(n)) => n,
                Some(Target::Ip(_)) => return Err(bad("only names can be pinned".into())),
                None => return Err(bad("not a valid host name".into())),
            };
            let addrs = value
                .split(',')
                .map(|a| {
                    let a = a.trim();
                    a.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .map_err(|_| bad(format!("{a:?} is not an IP address")))
                })
                .collect::<Result<Vec<_>>>()?;
            out.insert(key, addrs);
        }
        Ok(Self { pins: out })
    }

    /// Whether `name` is pinned.
    pub fn is_pinned(&self, name: &str) -> bool {
        self.pins.contains_key(name)
    }

    /// Resolves `target`: an IP literal is itself, a pinned name its pins, anything else what
    /// the system resolver says.
    pub async fn resolve(&self, target: &Target) -> io::Result<Resolved> {
        let name = match target {
            Target::Ip(ip) => {
                return Ok(Resolved {
                    addrs: vec![*ip],
                    pinned: false,
                });
            }
            Target::Name(n) => n,
        };
        if let Some(addrs) = self.pins.get(name) {
            return Ok(Resolved {
                addrs: addrs.clone(),
                pinned: true,
            });
        }
        let found =
            tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name.as_str(), 0)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the resolver timed out"))??;
        let mut addrs: Vec<IpAddr> = Vec::new();
        for a in found {
            let ip = a.ip().to_canonical();
            if !addrs.contains(&ip) {
                addrs.push(ip);
            }
        }
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
        }
        Ok(Resolved {
            addrs,
            pinned: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pins_come_first_and_literals_resolve_to_themselves() {
        let pins = BTreeMap::from([
            ("API.Test".to_owned(), "10.77.0.2".to_owned()),
            ("multi.test".to_owned(), "10.77.0.3, [fd00::3]".to_owned()),
        ]);
        let r = Resolver::new(&pins).unwrap();
        let got = r
            .resolve(&Target::parse("api.test").unwrap())
            .await
            .unwrap();
        assert_eq!(got.addrs, vec!["10.77.0.2".parse::<IpAddr>().unwrap()]);
        assert!(got.pinned);
        let got = r
            .resolve(&Target::parse("multi.test").unwrap())
            .await
            .unwrap();
        assert_eq!(got.addrs.len(), 2);
        let lit = r
            .resolve(&Target::parse("192.0.2.1").unwrap())
            .await
            .unwrap();
        assert!(!lit.pinned);
        assert_eq!(lit.addrs, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        let local = r
            .resolve(&Target::parse("localhost").unwrap())
            .await
            .unwrap();
        assert!(local.addrs.iter().all(|a| a.is_loopback()), "{local:?}");
    }

    #[test]
    fn bad_pins_are_refused() {
        for (k, v) in [
            ("10.0.0.1", "10.0.0.2"),
            ("bad name", "10.0.0.1"),
            ("ok.test", "nope"),
        ] {
            let pins = BTreeMap::from([(k.to_owned(), v.to_owned())]);
            assert!(Resolver::new(&pins).is_err(), "{k} = {v}");
        }
    }
}
