//! `ampoule run --as-command`: the code runs as a command entered into a live Python session's
//! sandbox (`Entrance::spawn`) — the way `/v1/sandboxes/{id}/processes` and E2B's
//! `commands.run` run processes — instead of as the sandbox's program. The containment suite
//! runs its probes this way too, so that an entered process is held to the same walls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ampoule_runtime::cgroup::Cgroup;
use ampoule_runtime::scratch::DATA;
use ampoule_runtime::{EnterSpec, Host, ProgramExit};
use ampoule_session::Session;
use ampoule_types::{Language, LimitKind, Limits, RunResult};
use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;

/// How long the output pipes are read after the command ended.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// The name the code is written under in `/mnt/data` (left out of the result's file list).
const FILE_STEM: &str = ".ampoule-command";

/// Runs `code` (Python or shell) as a command in a fresh Python session — forked from a zygote
/// when `zygote`, a cold one otherwise — and returns the result the way `ampoule run` builds
/// it. The session and the zygote are gone when this returns.
pub(crate) async fn run(
    language: Language,
    zygote: bool,
    limits: &Limits,
    code: &[u8],
    inputs: &[(String, Vec<u8>)],
) -> Result<RunResult> {
    let env = ampoule_session::command_env(&[]);
    // Python is the `python3` a command finds on its PATH (the session's environment, bound at
    // its host path, else the system's), and reads the code on stdin: nothing of the run is
    // left in /mnt/data or on the command line for the code to see. Shell reads a file in
    // /mnt/data (a script on stdin would be read by what it starts).
    let (interpreter, file) = match language {
        Language::Python => (python3(&env), None),
        Language::Shell => ("/bin/bash".to_owned(), Some(format!("{FILE_STEM}.sh"))),
        other => bail!("--as-command runs python or shell, not {other}"),
    };
    let host = Host::detect().context("preparing the host")?;
    host.sweep_orphans();
    let (session, zygote) = if zygote {
        let preload: Vec<String> = ampoule_session::zygote::DEFAULT_PRELOAD
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let z = ampoule_session::zygote::start_python(&host, &preload, 1)
            .await
            .context("starting the zygote")?;
        let s = Session::start_forked(&host, &z, limits.clone())
            .await
            .context("forking a session")?;
        (s, Some(z))
    } else {
        let s = Session::start_language(&host, "python", limits.clone())
            .await
            .context("starting a Python session")?;
        (s, None)
    };
    let result = enter(
        &host,
        &session,
        (interpreter, file.as_deref(), env),
        limits,
        code,
        inputs,
    )
    .await;
    session.close().await;
    if let Some(z) = zygote {
        z.close().await;
    }
    result
}

async fn enter(
    host: &Host,
    session: &Session,
    (interpreter, file, env): (String, Option<&str>, Vec<(String, String)>),
    limits: &Limits,
    code: &[u8],
    inputs: &[(String, Vec<u8>)],
) -> Result<RunResult> {
    let scratch = session.scratch();
    for (name, data) in inputs {
        scratch.write(DATA, name, data, 0o644)?;
    }
    if let Some(file) = file {
        scratch.write(DATA, file, code, 0o644)?;
    }
    let entrance = session
        .entrance()
        .context("the session's sandbox is already over")?;
    let spec = EnterSpec {
        argv: match file {
            Some(file) => vec![interpreter, format!("/mnt/data/{file}")],
            None => vec![interpreter, "-".into()],
        },
        env,
        cwd: "/mnt/data".into(),
        stdin: file.is_none(),
    };
    let started = Instant::now();
    let mut cmd = entrance
        .spawn(&spec)
        .await
        .context("starting the command")?;
    // The sandbox's cgroup, found through the command's host pid while it surely lives, and
    // its counters now: the limit events of this run are the difference at the end.
    let cgroup = sandbox_cgroup(host, cmd.host_pid());
    if let Some(mut stdin) = cmd.stdin.take() {
        let code = code.to_vec();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&code).await;
        });
    }
    let before = cgroup.as_ref().map(Cgroup::stats).unwrap_or_default();

    let cap = usize::try_from(limits.output_bytes).unwrap_or(usize::MAX);
    let over = Arc::new(AtomicBool::new(false));
    let notify = Arc::new(Notify::new());
    let start = |r| {
        let kept = Kept::default();
        let task = tokio::spawn(capture(r, cap, over.clone(), notify.clone(), kept.clone()));
        (task, kept)
    };
    let stdout = cmd.stdout.take().map(|r| start(Box::pin(r) as Reader));
    let stderr = cmd.stderr.take().map(|r| start(Box::pin(r) as Reader));
    let deadline = tokio::time::Instant::from_std(started)
        + Duration::from_secs_f64(limits.timeout_s.max(0.001));
    let mut timed_out = false;
    let exit = tokio::select! {
        exit = cmd.wait() => exit,
        () = tokio::time::sleep_until(deadline) => {
            timed_out = true;
            cmd.kill();
            cmd.wait().await
        }
        () = notify.notified() => {
            cmd.kill();
            cmd.wait().await
        }
    }
    .context("waiting for the command")?;
    let duration = started.elapsed();
    let output_killed = over.load(Ordering::SeqCst) && !timed_out;
    // The pipes end when their last writer does: what the command left running in the
    // background (a daemon, its own session) may hold them for as long as the sandbox lives.
    // The command's end is the run's end, as for a program: what was written by then is read
    // within a short grace, then the readers are left and the rest dies with the session.
    let grace = tokio::time::Instant::now() + DRAIN_GRACE;
    let (out, out_cut) = drained(stdout, grace).await;
    let (err, err_cut) = drained(stderr, grace).await;
    let after = cgroup.as_ref().map(Cgroup::stats).unwrap_or_default();

    let signal = match exit {
        ProgramExit::Signaled(s) => Some(s),
        ProgramExit::Killed => Some(nix::libc::SIGKILL),
        ProgramExit::Exited(_) => None,
    };
    let disk_full = session
        .scratch()
        .free()
        .is_some_and(|(bytes, inodes)| bytes < 64 * 1024 || inodes == 0);
    // Limit events come from the sandbox's cgroup counters (memory OOM kills, refused forks),
    // as `ampoule run` classifies a program. They count for the whole sandbox, the session's
    // kernel included; it sits idle meanwhile, so an event during the command is the
    // command's. Without a cgroup (not found), limits are told by signal only.
    let mut limits_hit = Vec::new();
    if timed_out {
        limits_hit.push(LimitKind::Time);
    }
    if output_killed {
        limits_hit.push(LimitKind::Output);
    }
    if after.oom_kills > before.oom_kills {
        limits_hit.push(LimitKind::Memory);
    }
    if after.pids_max_hits > before.pids_max_hits {
        limits_hit.push(LimitKind::Pids);
    }
    if disk_full || signal == Some(nix::libc::SIGXFSZ) {
        limits_hit.push(LimitKind::Disk);
    }
    if signal == Some(nix::libc::SIGXCPU) {
        limits_hit.push(LimitKind::Cpu);
    }
    let (status, limit, exit_code) =
        ampoule_runtime::run::classify(exit, timed_out, output_killed, &limits_hit);
    let files = session
        .scratch()
        .list(DATA)
        .unwrap_or_default()
        .into_iter()
        .filter(|f| Some(f.path.as_str()) != file)
        .collect();
    let cpu = after
        .cpu_ns
        .zip(before.cpu_ns)
        .map(|(a, b)| a.saturating_sub(b) as f64 / 1e6);
    Ok(RunResult {
        status,
        exit_code,
        signal,
        limit,
        limits_hit,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        stdout_truncated: out_cut,
        stderr_truncated: err_cut,
        duration_ms: duration.as_secs_f64() * 1000.0,
        cpu_time_ms: cpu,
        peak_memory_bytes: after.peak_memory,
        files,
        egress: Vec::new(),
    })
}

/// What a capture task kept, once it ends or `until` comes (then it is stopped).
async fn drained(
    task: Option<(tokio::task::JoinHandle<()>, Kept)>,
    until: tokio::time::Instant,
) -> (Vec<u8>, bool) {
    let Some((mut task, kept)) = task else {
        return Default::default();
    };
    if tokio::time::timeout_at(until, &mut task).await.is_err() {
        task.abort();
    }
    let mut k = kept
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::mem::take(&mut *k)
}

/// The `python3` on the command environment's PATH, by the host's file system (the sandbox
/// binds the session's environment and /usr at their host paths).
fn python3(env: &[(String, String)]) -> String {
    env.iter()
        .find(|(k, _)| k == "PATH")
        .into_iter()
        .flat_map(|(_, v)| v.split(':'))
        .map(|d| format!("{d}/python3"))
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| "/usr/bin/python3".into())
}

/// The cgroup of the sandbox that holds host process `pid`, among this host's sandbox cgroups.
fn sandbox_cgroup(host: &Host, pid: u32) -> Option<Cgroup> {
    let root = host.cgroups.as_ref()?;
    let pid = i32::try_from(pid).ok()?;
    root.children()
        .into_iter()
        .map(|name| root.open(&name))
        .find(|cg| cg.pids().contains(&pid))
}

/// One of the command's output pipes.
type Reader = std::pin::Pin<Box<dyn AsyncRead + Send>>;

/// Output read so far from one stream, and whether some was cut.
type Kept = Arc<std::sync::Mutex<(Vec<u8>, bool)>>;

/// Reads `reader` to its end into `kept`, keeping at most `cap` bytes; on the first byte over,
/// marks it cut, sets `over` and wakes `notify`, then keeps draining.
async fn capture<R: AsyncRead + Unpin>(
    mut reader: R,
    cap: usize,
    over: Arc<AtomicBool>,
    notify: Arc<Notify>,
    kept: Kept,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut k = kept
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let room = cap.saturating_sub(k.0.len());
                k.0.extend_from_slice(&buf[..n.min(room)]);
                if n > room && !k.1 {
                    k.1 = true;
                    over.store(true, Ordering::SeqCst);
                    notify.notify_one();
                }
            }
        }
    }
}
