//! One-shot execution: a fresh sandbox runs a program to completion under every limit, and the
//! outcome is classified into a [`RunResult`] (PRODUCT.md §5).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ampoule_types::{ExecutionStatus, LimitKind, RunResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::error::Result;
use crate::host::Host;
use crate::sandbox::{Prepare, ProgramExit, Sandbox, SandboxConfig};
use crate::scratch::Scratch;

/// Output read so far from one stream.
#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

/// Reads `reader` to its end, keeping at most `cap` bytes, and copies what it keeps to `echo`
/// as it arrives. On the first byte over the cap it sets `over` and wakes `notify`, then keeps
/// draining (so the writer never blocks on a full pipe while the sandbox is being killed).
async fn capture<R: AsyncRead + Unpin>(
    mut reader: R,
    mut echo: Option<Live>,
    cap: usize,
    over: Arc<AtomicBool>,
    notify: Arc<Notify>,
) -> Captured {
    let mut out = Captured::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(out.bytes.len());
                let keep = n.min(room);
                out.bytes.extend_from_slice(&buf[..keep]);
                if let Some(w) = echo.as_mut()
                    && keep > 0
                    && w.write_all(&buf[..keep]).await.is_err()
                {
                    // The reader of our own output went away; keep capturing.
                    echo = None;
                }
                if n > room && !out.truncated {
                    out.truncated = true;
                    over.store(true, Ordering::SeqCst);
                    notify.notify_one();
                }
            }
        }
    }
    out
}

/// This process's stdout or stderr, as the program's live output goes to it: written
/// directly while a write does not block (a pipe with room, `/dev/null`, a socket), else, and
/// from then on to keep the order, through tokio's writer, which writes on a thread of the
/// blocking pool. That thread (started, woken, then joined when the runtime ends) cost a
/// one-shot run 0.4-0.6 ms at its end; a terminal or a regular file still takes that path.
struct Live {
    stdout: bool,
    slow: Option<Box<dyn AsyncWrite + Unpin + Send>>,
}

impl Live {
    fn stdout() -> Self {
        Self {
            stdout: true,
            slow: None,
        }
    }

    fn stderr() -> Self {
        Self {
            stdout: false,
            slow: None,
        }
    }

    /// What of `buf` goes out now without blocking: the rest.
    fn write_now<'b>(&self, mut buf: &'b [u8]) -> &'b [u8] {
        use std::os::fd::AsFd;
        let (out, err) = (std::io::stdout(), std::io::stderr());
        let fd = if self.stdout {
            out.as_fd()
        } else {
            err.as_fd()
        };
        while !buf.is_empty() {
            match crate::sys::write_nowait(fd, buf) {
                Ok(0) => break,
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        buf
    }

    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let rest = if self.slow.is_none() {
            self.write_now(buf)
        } else {
            buf
        };
        if rest.is_empty() {
            return Ok(());
        }
        let w = self.slow.get_or_insert_with(|| {
            if self.stdout {
                Box::new(tokio::io::stdout())
            } else {
                Box::new(tokio::io::stderr())
            }
        });
        w.write_all(rest).await?;
        w.flush().await
    }
}

/// Whether [`run`] copies the program's output to this process's stdout and stderr while it
/// runs (the CLI's live output), on top of capturing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Capture only.
    Off,
    /// Capture and copy, up to the output limit.
    On,
}

/// Runs `cfg` once in a fresh sandbox under every limit. `prepare` writes code and inputs into
/// the scratch space before the program starts. Returns the result and the finished sandbox,
/// whose scratch space is still readable (outputs).
pub async fn run(
    host: &Host,
    cfg: &SandboxConfig,
    echo: Echo,
    prepare: impl FnOnce(&Scratch) -> Result<()>,
) -> Result<(RunResult, Sandbox)> {
    let (mut result, sb) = run_with(host, cfg, echo, |p| prepare(p.scratch)).await?;
    result.files = sb.scratch().list(crate::scratch::DATA).unwrap_or_default();
    Ok((result, sb))
}

/// [`run`] with the hook of [`Sandbox::spawn_with`], which also sees the network addresses
/// (start the egress gateway there). The result's `egress` and `files` lists are left empty:
/// the caller owns the gateway and fills the first in, and lists the scratch's files (from
/// the returned sandbox) if it reports them; `ampoule run` without `--json` does not (ten
/// system calls off the run's tail).
pub async fn run_with(
    host: &Host,
    cfg: &SandboxConfig,
    echo: Echo,
    prepare: impl FnOnce(Prepare<'_>) -> Result<()>,
) -> Result<(RunResult, Sandbox)> {
    let mut sb = Sandbox::spawn_with(host, cfg, prepare).await?;
    // The cgroup's counter files opened while the program runs, not read from scratch after
    // it has exited (four opens, ~50 µs, off the run's tail).
    let _ = sb.stats();
    let cap = usize::try_from(cfg.limits.output_bytes).unwrap_or(usize::MAX);
    let over = Arc::new(AtomicBool::new(false));
    let notify = Arc::new(Notify::new());
    let on = echo == Echo::On;
    let stdout = sb.stdout.take().map(|r| {
        let w = on.then(Live::stdout);
        tokio::spawn(capture(r, w, cap, over.clone(), notify.clone()))
    });
    let stderr = sb.stderr.take().map(|r| {
        let w = on.then(Live::stderr);
        tokio::spawn(capture(r, w, cap, over.clone(), notify.clone()))
    });

    let timeout = Duration::from_secs_f64(cfg.limits.timeout_s.max(0.001));
    let deadline = tokio::time::Instant::from_std(sb.started()) + timeout;
    let mut timed_out = false;
    let exit = tokio::select! {
        exit = sb.wait() => exit,
        () = tokio::time::sleep_until(deadline) => {
            timed_out = true;
            sb.kill();
            sb.wait().await
        }
        () = notify.notified() => {
            sb.kill();
            sb.wait().await
        }
    };
    let duration = sb.started().elapsed();
    let output_killed = over.load(Ordering::SeqCst) && !timed_out;
    // An exec failure surfaces here as an error; everything else is an exit.
    let exit = match exit {
        Ok(e) => e,
        Err(e) => {
            end(&mut sb).await;
            return Err(e);
        }
    };
    tracing::debug!(elapsed = ?sb.started().elapsed(), "program ended");
    let finished = end(&mut sb).await;
    tracing::debug!(elapsed = ?sb.started().elapsed(), "sandbox torn down");
    let out = match stdout {
        Some(h) => h.await.unwrap_or_default(),
        None => Captured::default(),
    };
    let err = match stderr {
        Some(h) => h.await.unwrap_or_default(),
        None => Captured::default(),
    };

    let stats = finished.stats.unwrap_or_default();
    let disk_full = sb
        .scratch()
        .free()
        .is_some_and(|(bytes, inodes)| bytes < 64 * 1024 || inodes == 0);
    let signal = match exit {
        ProgramExit::Signaled(s) => Some(s),
        ProgramExit::Killed => Some(libc::SIGKILL),
        ProgramExit::Exited(_) => None,
    };
    let mut limits_hit = Vec::new();
    if timed_out {
        limits_hit.push(LimitKind::Time);
    }
    if output_killed {
        limits_hit.push(LimitKind::Output);
    }
    if stats.oom_kills > 0 {
        limits_hit.push(LimitKind::Memory);
    }
    if stats.pids_max_hits > 0 {
        limits_hit.push(LimitKind::Pids);
    }
    if disk_full || signal == Some(libc::SIGXFSZ) {
        limits_hit.push(LimitKind::Disk);
    }
    if signal == Some(libc::SIGXCPU) {
        limits_hit.push(LimitKind::Cpu);
    }
    let (status, limit, exit_code) = classify(exit, timed_out, output_killed, &limits_hit);
    let result = RunResult {
        status,
        exit_code,
        signal,
        limit,
        limits_hit,
        stdout: String::from_utf8_lossy(&out.bytes).into_owned(),
        stderr: String::from_utf8_lossy(&err.bytes).into_owned(),
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        duration_ms: duration.as_secs_f64() * 1000.0,
        cpu_time_ms: stats_opt(finished.stats.map(|s| s.cpu_ns)).map(|ns| ns as f64 / 1e6),
        peak_memory_bytes: stats_opt(finished.stats.map(|s| s.peak_memory)),
        files: Vec::new(),
        egress: Vec::new(),
    };
    Ok((result, sb))
}

/// Ends the sandbox and removes its link to the egress gateway. The kernel would remove the
/// link when the sandbox's network namespace dies, but asynchronously: without this, a caller
/// that lists the host's links once we return may still see it.
async fn end(sb: &mut Sandbox) -> crate::sandbox::Finished {
    let finished = sb.finish().await;
    if let Some(addrs) = sb.network()
        && let Err(e) = crate::network::remove_host_side(addrs)
    {
        tracing::warn!(error = %e, interface = %addrs.interface, "the veth pair outlived its sandbox");
    }
    finished
}

fn stats_opt(v: Option<Option<u64>>) -> Option<u64> {
    v.flatten()
}

/// Decides status, deciding limit and exit code (`ampoule run`'s contract: the program's own
/// code, 124 on timeout, 137 when a limit killed it, 128+N for a signal N). Public so a
/// command entered into a sandbox (`ampoule run --as-command`) is classified the same way.
pub fn classify(
    exit: ProgramExit,
    timed_out: bool,
    output_killed: bool,
    hit: &[LimitKind],
) -> (ExecutionStatus, Option<LimitKind>, i32) {
    let killed = |l| (ExecutionStatus::Killed, Some(l), 137);
    if timed_out {
        return (ExecutionStatus::TimedOut, Some(LimitKind::Time), 124);
    }
    if output_killed {
        return killed(LimitKind::Output);
    }
    if hit.contains(&LimitKind::Memory) && exit != ProgramExit::Exited(0) {
        return killed(LimitKind::Memory);
    }
    match exit {
        ProgramExit::Signaled(s) if s == libc::SIGXFSZ => return killed(LimitKind::Disk),
        ProgramExit::Signaled(s) if s == libc::SIGXCPU => return killed(LimitKind::Cpu),
        ProgramExit::Exited(0) => return (ExecutionStatus::Succeeded, None, 0),
        _ => {}
    }
    // The program failed after a limit refused it something: that limit decided the outcome.
    for l in [LimitKind::Pids, LimitKind::Disk] {
        if hit.contains(&l) {
            return killed(l);
        }
    }
    match exit {
        ProgramExit::Exited(code) => (ExecutionStatus::Failed, None, code),
        ProgramExit::Signaled(s) => (ExecutionStatus::Failed, None, 128 + s),
        ProgramExit::Killed => (ExecutionStatus::Failed, None, 137),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_cli_contract() {
        use ExecutionStatus::*;
        assert_eq!(
            classify(ProgramExit::Exited(0), false, false, &[]),
            (Succeeded, None, 0)
        );
        assert_eq!(
            classify(ProgramExit::Exited(3), false, false, &[]),
            (Failed, None, 3)
        );
        assert_eq!(
            classify(ProgramExit::Killed, true, false, &[LimitKind::Time]),
            (TimedOut, Some(LimitKind::Time), 124)
        );
        assert_eq!(
            classify(ProgramExit::Signaled(9), false, false, &[LimitKind::Memory]),
            (Killed, Some(LimitKind::Memory), 137)
        );
        assert_eq!(
            classify(ProgramExit::Killed, false, true, &[LimitKind::Output]),
            (Killed, Some(LimitKind::Output), 137)
        );
        assert_eq!(
            classify(ProgramExit::Exited(1), false, false, &[LimitKind::Pids]),
            (Killed, Some(LimitKind::Pids), 137)
        );
        assert_eq!(
            classify(ProgramExit::Exited(1), false, false, &[LimitKind::Disk]),
            (Killed, Some(LimitKind::Disk), 137)
        );
        // A program that survives a refused fork and exits 0 succeeded.
        assert_eq!(
            classify(ProgramExit::Exited(0), false, false, &[LimitKind::Pids]),
            (Succeeded, None, 0)
        );
        assert_eq!(
            classify(ProgramExit::Signaled(15), false, false, &[]),
            (Failed, None, 143)
        );
    }
}
