//! Harness code shared by the integration tests of several ampoule crates (a dev-dependency
//! only, never published).
//!
//! - [`host`]: why a test cannot run on this machine (not root, a tool or the Python session
//!   environment missing), and [`host::trial`], which reports such a test as ignored, never as
//!   passed;
//! - [`paths`]: the workspace, the `ampoule` binary, the client-library venv;
//! - [`serve`]: a running `ampoule serve` (its port, its log, SIGTERM);
//! - [`jail`]: the throw-away outer namespace hostile code runs in, and `ampoule serve` inside
//!   one;
//! - [`upstream`]: the fake upstream host of the egress tests (servers, test CA, logs);
//! - [`http`]: a tiny blocking HTTP/1.1 JSON client for `/v1`.
//!
//! Failures are `String`s: a libtest-mimic trial turns them into `Failed` with `?`, and a test
//! body that panics unwraps them with their message.

pub mod host;
pub mod http;
pub mod jail;
pub mod paths;
pub mod serve;
pub mod upstream;
