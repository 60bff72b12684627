//! An init forked ahead of time: the cold path of `ampoule run`.
//!
//! A sandbox's outer init is normally the ampoule binary started again (`ampoule
//! __sandbox-init`): a fresh, single-threaded process. A process that will run exactly one
//! sandbox can have that process for less: [`prefork`] forks it at the very start of `main`,
//! while the process is still single-threaded (no runtime, no logging thread), and the child
//! waits on its control channel exactly as an exec'd init would. [`Sandbox::spawn`] takes it
//! from the [`Host`] instead of starting the binary. That saves an `exec` of the 20+ MB binary
//! (loading, relocation, page faults: ~1.4 ms of CPU), the fork of a supervisor that has grown
//! an async runtime by then, and it overlaps the init's start with the supervisor's own
//! preparations. What the init then does, and the protocol it speaks, are the same.
//!
//! [`Sandbox::spawn`]: crate::Sandbox::spawn
//! [`Host`]: crate::Host

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};
use crate::sys::{self, Fork};

/// Ends the process that ran its one sandbox, at once (`_exit(2)`), once it has flushed what
/// it prints: no libc exit handlers, no destructors, no joining of threads.
pub fn exit_now(code: i32) -> ! {
    sys::exit_now(code)
}

/// An outer init forked by [`prefork`], waiting for its spec; consumed by the first sandbox
/// spawned on the host it is given to.
#[derive(Debug)]
pub struct PreforkedInit {
    /// Our own child, not reaped before `parts` are taken: its pid cannot be reused meanwhile.
    pid: Pid,
    /// `None` once handed to a sandbox.
    parts: Option<Parts>,
}

#[derive(Debug)]
struct Parts {
    pidfd: OwnedFd,
    chan: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// What a sandbox takes of a [`PreforkedInit`]: the process handle, the control channel,
/// stdout and stderr.
pub(crate) type InitParts = (InitChild, OwnedFd, OwnedFd, OwnedFd);

/// Forks an outer init that waits for its spec on a control channel, with stdin on `/dev/null`
/// and stdout and stderr on pipes (it serves a sandbox whose program reads no stdin).
///
/// Call it first thing in `main`: the process must be single-threaded, which is checked. The
/// child is a copy of the caller's memory at this point (its environment is wiped, the rest
/// stays until the program's `exec` replaces it): call it before anything secret is read.
///
/// `network_ahead`: the sandbox will have no network, so the init may make its network
/// namespace while it waits for the spec (see `init::network_ahead`); a sandbox with allowed
/// hosts makes its own, and one made ahead would be thrown away.
pub fn prefork(network_ahead: bool) -> Result<PreforkedInit> {
    if !single_threaded() {
        return Err(Error::Invalid(
            "an init can only be forked ahead by a single-threaded process".into(),
        ));
    }
    let (chan, theirs) = crate::channel::pair()?;
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::io("pipe", e.into()));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // Read before the fork, so that the child knows the whole set without asking after the
    // parent may have narrowed it.
    let split = crate::cpus::CpuSplit::plan();
    match sys::fork().map_err(|e| Error::io("forking the sandbox init", e))? {
        Fork::Child => {
            if let Some(split) = &split {
                split.apply_child();
            }
            sys::scrub_environ();
            let Ok(null) = std::fs::File::open("/dev/null") else {
                std::process::exit(111)
            };
            let wanted = [null.as_fd(), out_w.as_fd(), err_w.as_fd(), theirs.as_fd()];
            if place_fds(&wanted).is_err() {
                std::process::exit(111);
            }
            crate::init::main_forked(network_ahead)
        }
        Fork::Parent(pid) => {
            drop((theirs, out_w, err_w));
            if let Some(split) = &split {
                split.apply(pid);
            }
            let pidfd = match sys::pidfd_open(pid.as_raw()) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = waitpid(pid, None);
                    return Err(Error::io("pidfd of the sandbox init", e));
                }
            };
            Ok(PreforkedInit {
                pid,
                parts: Some(Parts {
                    pidfd,
                    chan,
                    stdout: out_r,
                    stderr: err_r,
                }),
            })
        }
    }
}

impl PreforkedInit {
    /// Hands the process and its descriptors to a sandbox.
    pub(crate) fn into_parts(mut self) -> Result<InitParts> {
        let Some(p) = self.parts.take() else {
            return Err(Error::Invalid(
                "the forked init was handed out already".into(),
            ));
        };
        let pidfd = match sys::register_async(p.pidfd) {
            Ok(fd) => fd,
            Err(e) => {
                self.end();
                return Err(Error::io("pidfd of the sandbox init", e));
            }
        };
        let child = InitChild {
            pid: self.pid,
            pidfd,
            reaped: false,
            released: false,
        };
        Ok((child, p.chan, p.stdout, p.stderr))
    }

    /// Kills and reaps the child (it dies at once: it only waits for its spec).
    fn end(&self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}

impl Drop for PreforkedInit {
    /// Never handed to a sandbox (the CLI refused its arguments, say): it goes too.
    fn drop(&mut self) {
        if self.parts.is_some() {
            self.end();
            crate::cpus::rejoin();
        }
    }
}

/// The supervisor's handle on a preforked init, its own child: wait for it, kill it.
#[derive(Debug)]
pub(crate) struct InitChild {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
    released: bool,
}

impl InitChild {
    pub(crate) fn id(&self) -> Option<u32> {
        (!self.reaped).then(|| self.pid.as_raw().unsigned_abs())
    }

    pub(crate) fn start_kill(&self) {
        if !self.reaped {
            let _ = sys::pidfd_kill(self.pidfd.get_ref().as_raw_fd());
        }
    }

    /// Kills it and lets it go unreaped: it has no more to do for the sandbox than exit (see
    /// [`crate::Sandbox::finish`]), and the process that forked it ahead runs one sandbox and
    /// exits soon, its children re-parented and reaped by whoever reaps orphans.
    pub(crate) fn release(&mut self) {
        self.start_kill();
        self.try_reap();
        self.released = true;
    }

    /// Whether [`InitChild::release`] let it go.
    pub(crate) fn released(&self) -> bool {
        self.released
    }

    /// Waits until it has exited, and reaps it. Cancel-safe.
    pub(crate) async fn wait(&mut self) {
        while !self.reaped {
            // A pidfd turns readable when its process has exited.
            if let Ok(mut guard) = self.pidfd.readable().await {
                guard.clear_ready();
            }
            self.try_reap();
        }
    }

    fn try_reap(&mut self) {
        match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
            // Exited, or not our child any more (reaped elsewhere): either way it is gone.
            _ => self.reaped = true,
        }
    }
}

impl Drop for InitChild {
    fn drop(&mut self) {
        if self.reaped || self.released {
            return;
        }
        self.start_kill();
        self.try_reap();
        if !self.reaped {
            // Dying, not yet dead: reap it off this thread rather than leave a zombie.
            let pid = self.pid;
            let _ = std::thread::Builder::new()
                .name("reap-init".into())
                .spawn(move || waitpid(pid, None));
        }
    }
}

/// Whether this process has one thread.
fn single_threaded() -> bool {
    crate::cgroup::read_proc("/proc/self/status").is_ok_and(|s| {
        crate::sys::note_ignored_signals(&s);
        s.lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .is_some_and(|n| n.trim() == "1")
    })
}

/// Makes `wanted[i]` descriptor `i`, whatever their current numbers (they may collide with
/// 0..wanted.len()): every one is first copied above the range, then into place.
fn place_fds(wanted: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    // Copies at 10 and up are clear of 0..=3; the init closes them (everything above 3).
    let mut high = Vec::with_capacity(wanted.len());
    for fd in wanted {
        high.push(nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD(10))?);
    }
    for (target, fd) in high.into_iter().enumerate() {
        let target = RawFd::try_from(target).unwrap_or(RawFd::MAX);
        sys::dup2_raw(fd, target)?;
    }
    Ok(())
}
