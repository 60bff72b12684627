//! Errors of the image store, import, pull and unpacking.

use std::io;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with an image. Messages are lowercase and never repeat their
/// source (the chain is printed once, by the caller).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system call failed.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A name, tag, reference or digest is malformed.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        /// `image name`, `reference`, `digest`…
        what: &'static str,
        /// What was given.
        value: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// No image of that name in the store.
    #[error("no image named {0} (see `ampoule image ls`)")]
    NotFound(String),
    /// Content did not hash to the digest that named it.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The blob (or manifest) concerned.
        what: String,
        /// The digest that named it.
        expected: String,
        /// What its bytes hash to.
        actual: String,
    },
    /// An OCI layout, `docker save` archive, manifest or config is not what it should be.
    #[error("{0}")]
    Format(String),
    /// A layer tried to leave its root, or to plant something the unpacker refuses.
    #[error("hostile layer {layer}: {why}")]
    Hostile {
        /// The layer's digest.
        layer: String,
        /// The offending entry and what it tried.
        why: String,
    },
    /// A bound of the unpacker was crossed (size, entry count, path length).
    #[error(
        "layer {layer} refused: {why} (a decompression bomb, or an image larger than the limit)"
    )]
    TooLarge {
        /// The layer's digest.
        layer: String,
        /// Which bound and its value.
        why: String,
    },
    /// The registry answered something the client cannot use.
    #[error("registry {registry}: {why}")]
    Registry {
        /// The registry's host.
        registry: String,
        /// What went wrong.
        why: String,
    },
    /// The store directory is unusable.
    #[error("image store {}: {why}", path.display())]
    Store {
        /// The store's root.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn nix(what: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Self::io(what, io::Error::from(errno))
    }

    pub(crate) fn format(why: impl Into<String>) -> Self {
        Self::Format(why.into())
    }
}
