//! The sandbox runtime: everything that touches Linux isolation.
//!
//! This is the privileged crate of ampoule and the only one allowed `unsafe` (confined to
//! [`sys`]). It turns a [`SandboxConfig`] into a sealed process tree: user, mount, pid, net,
//! ipc, uts and cgroup namespaces, a fresh read-only root, Landlock, seccomp, a cgroup and
//! rlimits, and tears it all down again. Nothing above this crate knows how isolation works.
//! A sandbox has no network beyond loopback unless its config asks for allowlist mode; then
//! [`network`] wires it to the host's egress gateway (run by the caller, `ampoule-egress`)
//! and nothing else.
//!
//! Entry points: [`Host::detect`] once per process, [`Sandbox::spawn`] for a live sandbox,
//! [`run::run`] for a one-shot execution, [`init::main`] as the in-sandbox side (called by the
//! ampoule binary when started as `ampoule __sandbox-init`), [`doctor::run`] for diagnostics.
// A library prints nothing: the CLI's printer owns stdout and stderr.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod cgroup;
// The compact seccomp compiler: `build.rs` includes it; the library only tests it.
#[cfg(test)]
mod bpf;
mod channel;
mod cpus;
pub mod disk;
pub mod doctor;
pub mod enter;
pub mod error;
pub mod gvisor;
pub mod host;
pub mod init;
pub mod language;
mod netlink;
pub mod network;
pub mod prefork;
mod reaper;
pub mod run;
pub mod sandbox;
pub mod scratch;
pub mod seccomp;
mod sys;
pub mod ucounts;
pub mod undertaker;
pub mod zygote;

pub use enter::{EnterSpec, Entered, Entrance, Signaller};
pub use error::{Error, Result};
pub use gvisor::Isolation;
pub use host::Host;
pub use language::Interpreter;
pub use network::{GatewayAddrs, Network};
pub use sandbox::{Prepare, ProgramExit, Sandbox, SandboxConfig};
pub use scratch::Scratch;
pub use zygote::{Zygote, ZygoteConfig, ZygoteInfo};
