//! The undertaker: a small process `ampoule serve` starts beside itself, which waits for the
//! server to end — however it ends, `SIGKILL` included — and then takes down what the server
//! could not: sandboxes left frozen (a paused sandbox's processes do not die of their
//! parent-death signal while the v1 freezer holds them) and the cgroups of every sandbox the
//! server held. Without it those would wait for the next `serve`'s orphan sweep.
//!
//! It runs the same sweep as `serve` at start ([`Host::sweep_orphans`]): only cgroups whose
//! slot lock nobody holds are touched, so sandboxes of another live server are never.

use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::host::Host;

/// The hidden first argument that makes the ampoule binary the undertaker.
pub const ARG: &str = "__undertaker";

/// Starts the undertaker of this process: `exe __undertaker <our pid>`, in a process group of
/// its own (a terminal's Ctrl-C reaches the server, not it). A server that ends cleanly kills
/// it (nothing is left to take down).
pub fn spawn(exe: &Path) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    Command::new(exe)
        .arg(ARG)
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
}

/// The undertaker's body: waits for `pid` to end, then sweeps. Returns the exit code.
pub fn main(pid: &str) -> i32 {
    let Ok(pid) = pid.parse::<i32>() else {
        return 2;
    };
    let Ok(fd) = crate::sys::pidfd_open(pid) else {
        // Already gone: sweep now.
        return sweep();
    };
    loop {
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(n) if n > 0 => break,
            Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
            Err(_) => return 1,
        }
    }
    // The sandboxes' inits got their parent-death signal with the server's end: give the
    // kernel a moment to deliver it before sweeping what is left.
    std::thread::sleep(Duration::from_millis(100));
    sweep()
}

fn sweep() -> i32 {
    match Host::detect() {
        Ok(host) => {
            let n = host.sweep_orphans();
            if n > 0 {
                tracing::info!(swept = n, "the server ended: removed its sandboxes");
            }
            0
        }
        Err(e) => {
            tracing::warn!(error = %e, "the undertaker could not look at the host");
            1
        }
    }
}
