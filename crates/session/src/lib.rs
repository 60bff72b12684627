//! Stateful interpreter sessions: a language kernel in a sandbox, driven over the protocol.
//!
//! This crate owns everything between "run this code in session S" and the sandbox: the
//! language plug-ins ([`language`]), the host side of the kernel protocol ([`Session`]), and
//! the Python environment sessions run in ([`setup`], `ampoule setup`). It uses
//! `ampoule-runtime` for isolation and `ampoule-protocol` for the wire shape, and knows nothing
//! of HTTP.
//!
//! # How a session runs
//!
//! [`Session::start`] spawns a sandbox whose program is the language's kernel (its files are
//! written to `/run/ampoule`, read-only). The kernel moves the protocol to private descriptors,
//! points fds 0/1/2 at `/dev/null` and pipes it reads itself, and says `hello`. Each
//! [`Session::execute`] sends one `execute` request and collects `stream`, `display`, `result`
//! and `error` events until `done`. Timeouts send `interrupt` first and kill the sandbox only
//! when the code does not stop; the outcome's `session_state` says which happened.
//!
//! # Writing a language plug-in
//!
//! A plug-in is a type implementing [`language::Kernel`], registered in [`language::all`],
//! plus its kernel under `kernels/<language>/`:
//!
//! 1. `locate(limits)` finds the runtime by absolute path (never through `PATH`) and returns a
//!    [`language::LanguageSpec`]: the command line, extra environment, read-only binds for
//!    runtimes outside `/usr`, and the kernel files (embedded with `include_str!`). A missing
//!    runtime is [`Error::RuntimeMissing`] with the package to install.
//! 2. The kernel reads framed requests on its stdin and writes framed events on its stdout
//!    (see `ampoule-protocol`). It must: send `hello` first; keep the code's output off the
//!    protocol stream (a Python-hosted driver gets this from `kernels/common/kernelio.py`);
//!    answer every `execute` with `done`, after all of that execution's output; tag events
//!    with the execution's id; on `interrupt` stop the running code and keep its state when
//!    it can.
//! 3. Add the language to the tests in `tests/sessions/` (state across three executions, last
//!    value, stdout/stderr, errors, a timeout that keeps the state).
//!
//! Languages whose runtime has no REPL engine of its own are driven from a small Python
//! program (shell, C#, PowerShell): it owns the protocol and the output pipes, and talks to
//! the runtime over a private pipe.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A library prints nothing: the CLI's printer owns stdout and stderr.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod context;
pub mod doctor;
pub mod error;
pub mod language;
pub mod network;
pub mod paths;
pub mod session;
pub mod setup;
pub mod zygote;

pub use ampoule_types::{ExecutionEvent, ExecutionResult, MimeBundle, SessionState};
pub use context::{Context, command_env};
pub use error::{Error, Result};
pub use language::{Kernel, LanguageSpec};
pub use network::{SessionNetwork, SessionOptions};
pub use session::{ExecuteRequest, Session};
