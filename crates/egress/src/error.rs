//! Errors of the egress gateway.

use std::io;

/// Result alias for the egress crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while configuring or starting the gateway. Errors while serving one
/// connection never surface here: they end that connection and are recorded as events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An allow or deny rule is not valid.
    #[error("egress rule {rule:?}: {why}")]
    Rule {
        /// The rule as written.
        rule: String,
        /// What is wrong with it.
        why: String,
    },
    /// An injection rule is not valid.
    #[error("injection rule for {host:?}: {why}")]
    Inject {
        /// The rule's host.
        host: String,
        /// What is wrong with it.
        why: String,
    },
    /// The package policy (`[pools.NAME.packages]`) is not valid.
    #[error("package index: {why}")]
    Packages {
        /// What is wrong with it.
        why: String,
    },
    /// A static host pin (`[egress.hosts]`, `--resolve`) is not valid.
    #[error("host pin {name:?}: {why}")]
    Pin {
        /// The pinned name.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The gateway's certificate authority or a certificate could not be made.
    #[error("certificate: {0}")]
    Certificate(String),
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(String),
    /// A socket could not be set up.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
