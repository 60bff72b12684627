//! Errors of the sandbox runtime.

use std::io;
use std::path::PathBuf;

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building, running or tearing down a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system or system call failed on the host side.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The seccomp policy could not be compiled or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// A cgroup operation failed.
    #[error("cgroup {path}: {what}")]
    Cgroup {
        /// The cgroup directory or file.
        path: PathBuf,
        /// What failed.
        what: String,
    },
    /// The sandbox reported that a setup stage failed before the code started.
    #[error("sandbox setup failed at {stage}: {message}")]
    Setup {
        /// The stage (e.g. `mount`, `pivot_root`, `exec`).
        stage: String,
        /// The error as the sandbox saw it.
        message: String,
    },
    /// The host↔init channel broke or carried something unexpected.
    #[error("sandbox channel: {0}")]
    Channel(String),
    /// A request was invalid (bad path, missing runtime...).
    #[error("{0}")]
    Invalid(String),
    /// The sandbox's network (veth pair, firewall table) could not be set up.
    #[error("network: {0}")]
    Network(String),
    /// The gVisor tier is unavailable or `runsc` failed (see [`crate::gvisor`]).
    #[error("gvisor: {0}")]
    Gvisor(String),
    /// Every host uid slot is taken.
    #[error("no free sandbox slot: {0} sandboxes are live")]
    NoSlot(usize),
}

impl Error {
    /// Wraps an I/O error with what we were doing.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Adds context to I/O results.
pub(crate) trait IoContext<T> {
    /// Wraps the error with a description of the operation.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), io::Error::from(e)))
    }
}
