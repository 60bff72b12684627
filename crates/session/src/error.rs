//! Errors of the session layer. Messages are lowercase and never repeat their source: the
//! chain is printed once, at the top.

use std::path::PathBuf;

/// Everything that can go wrong starting, driving or setting up a session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No plug-in has this name.
    #[error("unknown language {0:?}; hint: use one of {names}", names = ampoule_types::Language::names())]
    UnknownLanguage(String),
    /// The language's runtime is not installed on this host.
    #[error("no {language} runtime on this host (looked for {looked_for}); hint: {hint}")]
    RuntimeMissing {
        /// The language.
        language: &'static str,
        /// Where we looked.
        looked_for: String,
        /// What to install.
        hint: String,
    },
    /// The sandbox could not be built or driven.
    #[error("sandbox")]
    Sandbox(#[from] ampoule_runtime::Error),
    /// The kernel did not come up.
    #[error("the {language} kernel did not start: {detail}")]
    KernelStart {
        /// The language.
        language: String,
        /// What we saw (the kernel's own last words, when it had any).
        detail: String,
    },
    /// The kernel speaks another protocol version.
    #[error("the kernel speaks protocol version {got}, this ampoule speaks {want}")]
    ProtocolVersion {
        /// The kernel's version.
        got: u32,
        /// Ours.
        want: u32,
    },
    /// The session's interpreter is gone (killed after a timeout, crashed, exited).
    #[error("the session is lost: {0}")]
    Lost(String),
    /// A host-side operation failed.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `python3 -m venv` is not available.
    #[error("{python} cannot create virtual environments; hint: apt-get install python3-venv")]
    VenvUnavailable {
        /// The base interpreter.
        python: PathBuf,
    },
    /// The environment exists, built from another interpreter than the one asked for.
    #[error(
        "{env} was built with {built_with}, not {asked}; hint: remove it (rm -rf {env}) and run the setup again"
    )]
    OtherInterpreter {
        /// The environment's directory.
        env: PathBuf,
        /// The interpreter it was built with (`executable` in its `pyvenv.cfg`).
        built_with: PathBuf,
        /// The interpreter asked for.
        asked: PathBuf,
    },
    /// A setup step failed.
    #[error("{step} failed: {detail}")]
    Setup {
        /// The step.
        step: String,
        /// The tail of its output.
        detail: String,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
