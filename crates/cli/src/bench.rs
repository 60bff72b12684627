//! `ampoule bench`: the benchmark suite of issue 5, run against real `ampoule serve` processes
//! on this machine (root).
//!
//! What it measures (docs/BENCHMARKS.md has the method in prose and the recorded figures):
//! 1. a request with a new session identifier to its first result (`import pandas; 1+1`), one
//!    ACA `code/execute` call, in three pools: forked from a zygote, taken from a warm pool of
//!    fresh interpreters, and started on demand; and the same as a burst of simultaneous new
//!    identifiers; and paced at 20 new identifiers/s in the zygote pool and in a zygote pool
//!    that keeps sessions forked and sealed ahead;
//! 2. a warm session's round trip for `1+1`;
//! 3. throughput at 1, 10 and 50 concurrent clients, each with its own session;
//! 4. density: N idle sessions that imported pandas, held at once, then all answering; Σ PSS
//!    of every process the server started (the zygote and every sandbox) and the drop of
//!    `MemAvailable`, per session;
//! 5. baselines in the same run: bare `python3 -c pass`, the venv's cold
//!    `import numpy, pandas, matplotlib`, `bwrap --unshare-all python3 -c pass` (when installed)
//!    and `ampoule run` of `print(1)`;
//! 6. with `--cluster-only`: 1 then 3 replicas of a `[cluster]`, each with the same
//!    `max_sessions`, filled through one replica (placement by load spreads them), then every
//!    held session's `1+1` round trip, through its holder and through replica `i mod n`.
//!
//! The servers are this binary (`ampoule serve`) started as child processes on 127.0.0.1 with
//! a throw-away config, data directory and API key; the client speaks HTTP/1.1 over kept-alive
//! connections (one per simulated client), so a timed request never includes a TCP handshake.
//! Every sample checks its answer: a wrong or failed one counts against the success rate and
//! is not timed. Progress goes to stderr, figures to stdout (a table, or one JSON object).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};

#[path = "bench_network.rs"]
mod network;

/// The ACA API version of every execute call (the 2024-02-02-preview dialect).
const API_VERSION: &str = "2024-02-02-preview";
/// The environment variable that hands the API key to the servers.
const KEY_ENV: &str = "AMPOULE_BENCH_KEY";
/// The code of a new session's first request.
const FIRST_CODE: &str = "import pandas; 1+1";
pub(crate) const PYTHON: &str = "/usr/bin/python3";

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Small sample counts (a minute or two); what the smoke test runs.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
    /// Idle sessions held at once in the density test (repeatable; default 100 and 1000, or
    /// 20 with --quick; 0 skips it).
    #[arg(long = "density", value_name = "N")]
    density: Vec<usize>,
    /// Do not drop the page cache (`/proc/sys/vm/drop_caches`) before memory readings.
    #[arg(long)]
    no_drop_caches: bool,
    /// Only the durable-sandbox figures (pause, resume, hibernate).
    #[arg(long)]
    durable_only: bool,
    /// Only the density figures (with and without the zygote's warm-up, same run), as JSON.
    #[arg(long)]
    density_only: bool,
    /// Also compare new-session-to-first-result (`1+1`) of a pool from this image (an OCI
    /// layout or `docker save` archive holding a Python, imported into the bench's own data
    /// directory) with the host-runtime pool's, both forked from zygotes.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// With --image: only that comparison.
    #[arg(long, requires = "image")]
    image_only: bool,
    /// Only the replicas comparison: 1 then 3 `ampoule serve` replicas of a cluster, filled
    /// through one of them to their `max_sessions`, then every held session's `1+1` round trip.
    #[arg(long)]
    cluster_only: bool,
    /// With --cluster-only: each replica's `max_sessions` (default 100; 20 with --quick).
    #[arg(long, value_name = "N", requires = "cluster_only")]
    cluster_sessions: Option<usize>,
    /// Only the gVisor tier beside the default tier and a bare interpreter (start, new
    /// session → first result, round trip, hibernate/resume with memory), as JSON.
    #[arg(long)]
    gvisor_only: bool,
    /// Only bare python3, bwrap and `ampoule run print(1)`, interleaved (`bench_run.rs`).
    #[arg(long)]
    run_only: bool,
    /// Only the network pools' figures (issue 19): new sessions at 20/s in a pool with an
    /// allowed host, forked from a zygote and started cold, as JSON.
    #[arg(long)]
    network_only: bool,
    /// Only the zygote pool's burst of 100 new sessions at once (20 with --quick), deleted and
    /// held in turn, five times each (once with --quick): each burst's last answer, as JSON.
    #[arg(long)]
    burst_only: bool,
}

mod gvisor;

/// Sample counts and durations of one run.
struct Plan {
    /// `python3 -c pass`, bwrap and `ampoule run` samples.
    baseline: usize,
    /// Samples of the venv's cold import (≈ 0.6 s each).
    baseline_import: usize,
    new_zygote: usize,
    new_warm: usize,
    new_cold: usize,
    /// Simultaneous new identifiers per pool in the burst.
    burst: usize,
    /// Simultaneous new identifiers in the zygote pool's big burst (issue 19: 100 at once).
    big_burst: usize,
    round_trips: usize,
    /// Pause/resume cycles of one sandbox.
    pauses: usize,
    /// Hibernate/resume cycles of a sandbox with 100 MiB of files.
    hibernations: usize,
    throughput_for: Duration,
    clients: Vec<usize>,
    density: Vec<usize>,
    drop_caches: bool,
}

impl Plan {
    fn new(args: &BenchArgs) -> Self {
        let density = if !args.density.is_empty() {
            args.density.clone()
        } else if args.quick {
            vec![20]
        } else {
            vec![100, 1000]
        };
        let mut density = density;
        density.retain(|&n| n > 0);
        let drop_caches = !args.no_drop_caches;
        if args.quick {
            Plan {
                baseline: 20,
                baseline_import: 3,
                new_zygote: 30,
                new_warm: 6,
                new_cold: 4,
                burst: 4,
                big_burst: 20,
                round_trips: 100,
                pauses: 30,
                hibernations: 4,
                throughput_for: Duration::from_secs(3),
                clients: vec![1, 10, 50],
                density,
                drop_caches,
            }
        } else {
            Plan {
                baseline: 100,
                baseline_import: 20,
                new_zygote: 300,
                new_warm: 40,
                new_cold: 30,
                burst: 10,
                big_burst: 100,
                round_trips: 1000,
                pauses: 300,
                hibernations: 20,
                throughput_for: Duration::from_secs(10),
                clients: vec![1, 10, 50],
                density,
                drop_caches,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Samples and their summary

/// Timed samples of one measurement, and what went wrong with the others.
#[derive(Default)]
struct Samples {
    ms: Vec<f64>,
    failures: usize,
    first_error: Option<String>,
}

impl Samples {
    fn record(&mut self, r: Result<f64>) {
        match r {
            Ok(ms) => self.ms.push(ms),
            Err(e) => {
                self.failures += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }

    fn merge(&mut self, other: Samples) {
        self.ms.extend(other.ms);
        self.failures += other.failures;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn stat(&self) -> Stat {
        let mut s = self.ms.clone();
        s.sort_by(f64::total_cmp);
        let n = s.len() + self.failures;
        // Nearest rank: the smallest sample with at least p % of the samples at or below it.
        let pct = |p: f64| -> Option<f64> {
            if s.is_empty() {
                return None;
            }
            let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
            Some(round2(s[rank.clamp(1, s.len()) - 1]))
        };
        Stat {
            n,
            ok: s.len(),
            success_rate: if n == 0 {
                0.0
            } else {
                s.len() as f64 / n as f64
            },
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p99_ms: pct(99.0),
            mean_ms: (!s.is_empty()).then(|| round2(s.iter().sum::<f64>() / s.len() as f64)),
            min_ms: s.first().copied().map(round2),
            max_ms: s.last().copied().map(round2),
            first_error: self.first_error.clone(),
        }
    }
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The summary of one latency measurement.
#[derive(Serialize, Clone)]
struct Stat {
    /// Samples taken.
    n: usize,
    /// Samples that succeeded (and were timed).
    ok: usize,
    /// `ok / n`.
    success_rate: f64,
    p50_ms: Option<f64>,
    p90_ms: Option<f64>,
    p99_ms: Option<f64>,
    mean_ms: Option<f64>,
    min_ms: Option<f64>,
    max_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

#[derive(Serialize)]
struct Throughput {
    clients: usize,
    seconds: f64,
    executions: usize,
    failures: usize,
    per_second: f64,
    success_rate: f64,
    latency: Stat,
}

#[derive(Serialize)]
struct Density {
    /// Sessions asked for.
    sessions: usize,
    /// Servers holding them (more than one only where the open-file limit is too low for one
    /// server to hold them all: see [`density_servers`]).
    servers: usize,
    /// The sessions' interpreter (`Python 3.12.1`).
    runtime: String,
    /// Whether the pool's zygote ran its warm-up (`[pools.X] warmup`, the default) before
    /// freezing its heap; the baseline runs without (`warmup = ""`).
    warmup: bool,
    /// The cell each session ran first ([`DENSITY_CELL`]).
    first_cell: &'static str,
    /// Sessions whose first cell succeeded.
    created: usize,
    /// Seconds to create them all (8 clients).
    create_seconds: f64,
    /// Sessions the pool reported live once all were created.
    alive: usize,
    /// Sessions that then answered `1+1` correctly.
    answering: usize,
    success_rate: f64,
    /// Processes the server had started (zygote, sandbox inits, session kernels).
    processes: usize,
    /// Σ PSS of those processes.
    pss_total_mib: f64,
    /// Σ PSS before the sessions existed (the zygote and its sandbox).
    pss_before_mib: f64,
    /// `pss_total_mib / alive`: the zygote's share included.
    pss_per_session_mib: f64,
    /// `(pss_total_mib - pss_before_mib) / alive`.
    pss_added_per_session_mib: f64,
    /// `MemAvailable` drop from before the sessions to after, per live session.
    mem_available_drop_per_session_mib: f64,
    /// The server processes' own PSS and open descriptors with every session live (summed).
    server_pss_mib: f64,
    server_open_files: usize,
    /// Whether the page cache was dropped before each memory reading.
    drop_caches: bool,
    /// Sessions the server started cold because the zygote could not fork, and zygotes that
    /// died (their sessions die with them).
    zygote_cold_fallbacks: usize,
    zygote_deaths: usize,
    answer_latency: Stat,
}

// ---------------------------------------------------------------------------------------------
// Entry point

pub(crate) async fn run(args: BenchArgs) -> Result<ExitCode> {
    if !is_root() {
        bail!(
            "ampoule bench needs root: it starts `ampoule serve` with real sandboxes (own uids \
             and cgroups) and reads every sandbox's memory\nhint: sudo ampoule bench"
        );
    }
    let plan = Plan::new(&args);
    let exe = std::env::current_exe().context("locating the ampoule binary")?;
    if args.run_only {
        return crate::bench_run::run(&exe, crate::bench_run::SAMPLES);
    }
    let venv = ampoule_session::setup::PythonEnv::default_location();
    if !venv.exists() {
        bail!(
            "the session Python environment is missing ({})\nhint: ampoule setup",
            venv.dir().display()
        );
    }
    let work = WorkDir::new()?;
    let started = Instant::now();
    let load_before = load_average();
    note(&format!(
        "ampoule bench ({} build{}), load average {load_before}",
        build_kind(),
        if args.quick { ", --quick" } else { "" },
    ));

    let image = match &args.image {
        Some(path) => image_phase(&plan, &exe, &work, path).await?,
        None => Value::Null,
    };
    if args.image_only {
        let report =
            json!({"version": 1, "date": utc_now(), "build": build_kind(), "image": image});
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.cluster_only {
        let per_replica = args
            .cluster_sessions
            .unwrap_or(if args.quick { 20 } else { 100 });
        let rounds = if args.quick { 2 } else { 5 };
        let cluster = cluster_phase(&exe, &work, per_replica, rounds).await?;
        return section_report("cluster", cluster, &load_before);
    }
    if args.gvisor_only {
        return gvisor::run(args.quick, &exe, &work).await;
    }
    if args.network_only {
        let report = network::report(args.quick, &exe, &work).await?;
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.burst_only {
        let rounds = if args.quick { 1 } else { 5 };
        let bursts = burst_phase(&plan, &exe, &work, rounds).await?;
        return section_report("burst", bursts, &load_before);
    }
    if args.density_only {
        let density = densities(&plan, &exe, &work).await?;
        let report =
            json!({"version": 1, "date": utc_now(), "build": build_kind(), "density": density});
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let durable = durable_phase(&plan, &exe, &work).await?;
    if args.durable_only {
        let report =
            json!({"version": 1, "date": utc_now(), "build": build_kind(), "durable": durable});
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let baselines = baselines(&plan, &exe, &venv.python())?;
    let (new_session, bursts, round_trip, throughput) = server_phase(&plan, &exe, &work).await?;
    let density = densities(&plan, &exe, &work).await?;

    let report = json!({
        "version": 1,
        "date": utc_now(),
        "quick": args.quick,
        "build": build_kind(),
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned()).unwrap_or_default(),
            "load_average_start": load_before,
            "load_average_end": load_average(),
        },
        "seconds": round2(started.elapsed().as_secs_f64()),
        "new_session": new_session,
        "new_session_burst": bursts,
        "warm_round_trip": round_trip,
        "throughput": throughput,
        "durable": durable,
        "image": image,
        "density": density,
        "baselines": baselines,
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_tables(&mut out, &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the report of a run of one section (`--cluster-only`, `--burst-only`) as one JSON
/// object, with the host's CPUs and load average around it.
fn section_report(name: &str, section: Value, load_before: &str) -> Result<ExitCode> {
    let mut report = json!({
        "version": 1,
        "date": utc_now(),
        "build": build_kind(),
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "load_average_start": load_before,
            "load_average_end": load_average(),
        },
    });
    report[name] = section;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report)?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

fn note(msg: &str) {
    eprintln!("bench: {msg}");
}

/// The build and how it is linked: `ampoule run`'s start depends on both (static: no
/// dynamic loader at each exec, see scripts/build.sh).
pub(crate) fn build_kind() -> &'static str {
    match (cfg!(debug_assertions), cfg!(target_feature = "crt-static")) {
        (true, true) => "debug, static",
        (true, false) => "debug, dynamic",
        (false, true) => "release, static",
        (false, false) => "release, dynamic",
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn progress(len: usize, msg: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg:42} {bar:30} {pos}/{len} {elapsed}") {
        pb.set_style(style);
    }
    pb.set_message(msg.to_owned());
    pb
}

/// A directory for the configs and the servers' data, removed at the end.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ampoule-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Baselines: whole processes from spawn to exit, output checked

fn baselines(plan: &Plan, exe: &Path, venv_python: &Path) -> Result<Value> {
    use crate::bench_run::{Which, ampoule_run, bare as python_pass};
    let bwrap = crate::bench_run::bwrap_binary();
    let venv_import = || {
        let mut c = Command::new(venv_python);
        c.args(["-c", "import numpy, pandas, matplotlib"]);
        c
    };
    // Warm the page cache once.
    let _ = time_process(python_pass(), None, "");
    let _ = time_process(venv_import(), None, "");
    let _ = time_process(ampoule_run(exe), Some(b"print(1)\n"), "1\n");

    let mut bare = Samples::default();
    let mut bw = Samples::default();
    let mut run = Samples::default();
    let mut paired = crate::bench_run::Paired::default();
    let pb = progress(plan.baseline, "baselines: python3, bwrap, ampoule run");
    // Interleaved, in rotating orders, so machine noise hits all alike.
    for i in 0..plan.baseline {
        crate::bench_run::round(i, exe, bwrap, |which, sample| {
            paired.note(which, &sample);
            match which {
                Which::Bare => bare.record(sample),
                Which::Bubblewrap => bw.record(sample),
                Which::AmpouleRun => run.record(sample),
            }
        });
        paired.end_round();
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mut import = Samples::default();
    let pb = progress(
        plan.baseline_import,
        "baselines: venv import numpy, pandas…",
    );
    for _ in 0..plan.baseline_import {
        import.record(time_process(venv_import(), None, ""));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let bwrap_value = match bwrap {
        Some(_) => serde_json::to_value(bw.stat())?,
        None => json!({"skipped": "bubblewrap is not installed (scripts/deps.sh installs it)"}),
    };
    Ok(json!({
        "python3_pass": bare.stat(),
        "venv_import_numpy_pandas_matplotlib": import.stat(),
        "bwrap_python3_pass": bwrap_value,
        "ampoule_run_print": run.stat(),
        "ampoule_run_minus_bwrap_paired": paired.summary(),
    }))
}

/// Runs `cmd` to its end; its wall time in ms when it exits 0 with exactly `expect` on stdout.
pub(crate) fn time_process(mut cmd: Command, stdin: Option<&[u8]>, expect: &str) -> Result<f64> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting the process")?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data).context("writing its stdin")?;
    }
    let out = child.wait_with_output().context("waiting for it")?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || stdout != expect {
        bail!(
            "{}: stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

// ---------------------------------------------------------------------------------------------
// The servers

/// An `ampoule serve` child process with a throw-away config.
/// A fresh API key for the bench's servers.
fn bench_key() -> String {
    format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

/// The variable `[cluster]` reads its secret from (the servers get the bench's key).
const CLUSTER_SECRET_ENV: &str = "AMPOULE_CLUSTER_SECRET";

struct Server {
    child: Child,
    addr: SocketAddr,
    key: String,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Sessions of a zygote pool that the server started cold instead (its `WARN` lines).
    cold_fallbacks: Arc<AtomicUsize>,
    /// Zygotes that died and were replaced.
    zygote_deaths: Arc<AtomicUsize>,
}

impl Server {
    /// Starts `ampoule serve` with `pools` (TOML tables without their `[pools.NAME]` header
    /// lines inside: `(name, body)`).
    fn start(exe: &Path, work: &WorkDir, name: &str, pools: &[(&str, String)]) -> Result<Server> {
        Self::start_with(exe, work, name, pools, "127.0.0.1:0", "", &bench_key())
    }

    /// [`Server::start`] listening on `listen`, with `extra` appended to its config (TOML
    /// tables) and `key` as the bench's API key.
    fn start_with(
        exe: &Path,
        work: &WorkDir,
        name: &str,
        pools: &[(&str, String)],
        listen: &str,
        extra: &str,
        key: &str,
    ) -> Result<Server> {
        let data = work.0.join(format!("{name}-data"));
        std::fs::create_dir_all(&data)?;
        let mut config = format!(
            "[server]\ndata_dir = {data:?}\n\n[[auth.keys]]\ntenant = \"bench\"\n\
             key_env = \"{KEY_ENV}\"\n"
        );
        for (pool, body) in pools {
            config.push_str(&format!("\n[pools.{pool}]\n{body}"));
        }
        config.push_str(extra);
        let path = work.0.join(format!("{name}.toml"));
        std::fs::write(&path, &config).with_context(|| format!("writing {}", path.display()))?;
        let key = key.to_owned();
        let mut child = Command::new(exe)
            .args(["serve", "--listen", listen, "--config"])
            .arg(&path)
            .env(KEY_ENV, &key)
            .env(CLUSTER_SECRET_ENV, &key)
            .env_remove("AMPOULE_CONFIG")
            .env(
                "AMPOULE_LOG",
                std::env::var("AMPOULE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ampoule serve")?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let cold_fallbacks = Arc::new(AtomicUsize::new(0));
        let zygote_deaths = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            let (fallbacks, deaths) = (cold_fallbacks.clone(), zygote_deaths.clone());
            let verbose = std::env::var_os("AMPOULE_BENCH_SERVER_LOG").is_some();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if verbose {
                        eprintln!("serve: {line}");
                    }
                    // The server's own words (session_engine.rs) for a zygote pool that is not
                    // forking: the figures would silently be those of cold starts.
                    if line.contains("starting the session cold") {
                        fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    if line.contains("zygote died") {
                        deaths.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(addr) = line
                        .split("listening on http://")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                    {
                        let _ = tx.send(addr.to_owned());
                    }
                    if let Ok(mut l) = log.lock() {
                        if l.len() >= 40 {
                            l.pop_front();
                        }
                        l.push_back(line);
                    }
                }
            });
        }
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            key,
            log,
            cold_fallbacks,
            zygote_deaths,
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(addr) => {
                    server.addr = addr
                        .parse()
                        .with_context(|| format!("the server's address {addr:?}"))?;
                    return Ok(server);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(st)) = server.child.try_wait() {
                bail!(
                    "ampoule serve exited ({st}) before listening:\n{}",
                    server.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "ampoule serve did not listen within 5 minutes:\n{}",
                    server.log_tail()
                );
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        self.log
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    fn client(&self) -> Client {
        Client {
            addr: self.addr,
            auth: format!("Bearer {}", self.key),
            conn: None,
        }
    }

    /// SIGTERM, then waits (closing a thousand sessions takes a while); SIGKILL after
    /// `patience`.
    fn stop(mut self, patience: Duration) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        note("the server did not stop on SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One simulated client: one kept-alive HTTP/1.1 connection.
struct Client {
    addr: SocketAddr,
    auth: String,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A connection ready for a request (a new one if the last was closed).
    async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        let alive = match &mut self.conn {
            Some(c) => c.ready().await.is_ok(),
            None => false,
        };
        if alive {
            return self.conn.as_mut().context("the connection vanished");
        }
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(self.conn.insert(sender))
    }

    /// One request; the status and body, and the ms from sending to the whole body.
    async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes, f64)> {
        let host = self.addr.to_string();
        let auth = self.auth.clone();
        let sender = self.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .header(header::AUTHORIZATION, auth);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let start = Instant::now();
        let result = async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        }
        .await;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok((status, body)) => Ok((status, body, ms)),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    /// One `/v1` request with a JSON body: the JSON answer and the ms it took; an error unless
    /// the status is a success.
    async fn call(
        &mut self,
        method: Method,
        path: String,
        body: Option<Value>,
    ) -> Result<(Value, f64)> {
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, bytes, ms) = self.request(method, &path, body).await?;
        if !status.is_success() {
            bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&bytes));
        }
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((v, ms))
    }

    /// An ACA execute call in `pool` for `identifier`; the ms it took when the answer is
    /// `Success` (and, with `expect`, that result).
    async fn execute(
        &mut self,
        pool: &str,
        identifier: &str,
        code: &str,
        expect: Option<&str>,
    ) -> Result<f64> {
        let body = json!({"properties": {
            "codeInputType": "inline",
            "executionType": "synchronous",
            "code": code,
        }});
        let path =
            format!("/pools/{pool}/code/execute?identifier={identifier}&api-version={API_VERSION}");
        let (status, body, ms) = self
            .request(Method::POST, &path, Some(body.to_string().into_bytes()))
            .await?;
        let text = || {
            String::from_utf8_lossy(&body)
                .chars()
                .take(400)
                .collect::<String>()
        };
        if status != StatusCode::OK {
            bail!("HTTP {status}: {}", text());
        }
        let v: Value = serde_json::from_slice(&body).with_context(text)?;
        let props = &v["properties"];
        if props["status"] != "Success" {
            bail!("execution failed: {}", text());
        }
        if let Some(want) = expect {
            let got = &props["result"];
            let matches = got.as_str() == Some(want)
                || want.parse::<i64>().is_ok_and(|n| got.as_i64() == Some(n));
            if !matches {
                bail!("result {got} instead of {want}");
            }
        }
        Ok(ms)
    }

    /// `POST /v1/sandboxes` in `pool`, then the first `POST /v1/sandboxes/{id}/executions`:
    /// the ms from the first request to the second answer, when the result is `want`; the
    /// sandbox is deleted afterwards (untimed).
    async fn new_sandbox(&mut self, pool: &str, code: &str, want: &str) -> Result<f64> {
        let create = json!({"pool": pool}).to_string().into_bytes();
        let begun = Instant::now();
        let (status, body, _) = self
            .request(Method::POST, "/v1/sandboxes", Some(create))
            .await?;
        if status != StatusCode::CREATED && status != StatusCode::OK {
            bail!(
                "POST /v1/sandboxes: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let v: Value = serde_json::from_slice(&body)?;
        let id = v["id"]
            .as_str()
            .context("POST /v1/sandboxes answered no id")?
            .to_owned();
        let exec = json!({"code": code}).to_string().into_bytes();
        let path = format!("/v1/sandboxes/{id}/executions");
        let (status, body, _) = self.request(Method::POST, &path, Some(exec)).await?;
        let ms = begun.elapsed().as_secs_f64() * 1000.0;
        let _ = self
            .request(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .await;
        if status != StatusCode::OK {
            bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        let r: Value = serde_json::from_slice(&body)?;
        let got = r["result"]["data"]["text/plain"]
            .as_str()
            .or_else(|| r["result"]["text/plain"].as_str())
            .or_else(|| r["result"].as_str())
            .unwrap_or_default();
        if r["status"] != "succeeded" || got != want {
            bail!(
                "execution in a new sandbox: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(ms)
    }

    /// Deletes the session of `identifier` in `pool` (ACA `DELETE …/session`).
    async fn delete(&mut self, pool: &str, identifier: &str) -> Result<()> {
        let path =
            format!("/pools/{pool}/session?identifier={identifier}&api-version={API_VERSION}");
        let (status, body, _) = self.request(Method::DELETE, &path, None).await?;
        if !status.is_success() {
            bail!(
                "DELETE session: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    /// `GET /v1/pools`: the pool's entry.
    async fn pool(&mut self, pool: &str) -> Result<Value> {
        let (status, body, _) = self.request(Method::GET, "/v1/pools", None).await?;
        if status != StatusCode::OK {
            bail!("GET /v1/pools: HTTP {status}");
        }
        let v: Value = serde_json::from_slice(&body)?;
        v["pools"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == pool))
            .cloned()
            .with_context(|| format!("no pool {pool} in /v1/pools"))
    }

    /// Waits until `pool` has its whole warm stock ready.
    async fn wait_warm(&mut self, pool: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.pool(pool).await?;
            let (ready, warm) = (p["ready"].as_u64(), p["warm"].as_u64());
            if ready.is_some() && ready >= warm {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("pool {pool}: {ready:?} of {warm:?} warm sessions after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Processes on the host now (the entries of `/proc` that are pids).
fn process_count() -> usize {
    std::fs::read_dir("/proc").map_or(0, |d| {
        d.filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .count()
    })
}

/// Waits until the host has at most a few more processes than `baseline` (what sessions
/// deleted a moment ago leave while they exit), or `timeout`; returns the milliseconds waited.
async fn settle(baseline: usize, timeout: Duration) -> f64 {
    let t = Instant::now();
    while process_count() > baseline + 4 && t.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed().as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// 1–3. New sessions, round trips, throughput: one server with four pools

const ZYGOTE_POOL: &str = "bench-zygote";
const WARM_POOL: &str = "bench-warm";
const COLD_POOL: &str = "bench-cold";
/// A zygote pool that also keeps `ZYGOTE_WARM` sessions forked and sealed ahead.
const ZYGOTE_WARM_POOL: &str = "bench-zygote-warm";
const ZYGOTE_WARM: usize = 4;
/// The arrival rate of the paced new-session figures (issue 19: "at 20 new sessions/s").
const PACED_PER_S: f64 = 20.0;

/// The `[pools.NAME]` body of a Python pool.
fn pool_toml(zygote: bool, warm: usize, max_sessions: usize) -> String {
    format!(
        "language = \"python\"\nzygote = {zygote}\nwarm = {warm}\nmax_sessions = {max_sessions}\n\
         idle_timeout_s = 3600\n"
    )
}

/// New identifier → first result (`1+1`) in a pool from the image at `path` and in the
/// host-runtime pool, both forked from a zygote without preloads (the image need not have
/// pandas), samples interleaved so load hits both alike.
async fn image_phase(plan: &Plan, exe: &Path, work: &WorkDir, path: &Path) -> Result<Value> {
    const HOST: &str = "bench-host";
    const IMAGE: &str = "bench-image";
    let data = work.0.join("image-data");
    std::fs::create_dir_all(&data)?;
    let store = ampoule_image::Store::open(&data)?;
    let name = ampoule_image::ImageName::parse("bench-image:1")?;
    let imported = {
        let lock = store.lock()?;
        ampoule_image::import::import(&store, &lock, path, &name)
            .with_context(|| format!("importing {}", path.display()))?
    };
    note(&format!(
        "image {} imported ({} layers)",
        imported.image.manifest.short(),
        imported.image.layers.len()
    ));
    let body = |image: bool| {
        format!(
            "{}preload = []\n{}",
            pool_toml(true, 0, 64),
            if image {
                "image = \"bench-image:1\"\n"
            } else {
                ""
            }
        )
    };
    let server = Server::start(
        exe,
        work,
        "image",
        &[(HOST, body(false)), (IMAGE, body(true))],
    )?;
    let mut c = server.client();
    for pool in [HOST, IMAGE] {
        c.execute(pool, "warm-up", "1+1", Some("2"))
            .await
            .with_context(|| format!("the first session of pool {pool}\n{}", server.log_tail()))?;
        c.delete(pool, "warm-up").await?;
    }
    let n = plan.new_zygote;
    let pb = progress(2 * n, "new session → first result (host, image)");
    let (mut host, mut image) = (Samples::default(), Samples::default());
    for i in 0..n {
        for (pool, s) in [(HOST, &mut host), (IMAGE, &mut image)] {
            let id = format!("img-{pool}-{i}");
            s.record(c.execute(pool, &id, "1+1", Some("2")).await);
            if let Err(e) = c.delete(pool, &id).await {
                s.first_error.get_or_insert(format!("{e:#}"));
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    server.stop(Duration::from_secs(30));
    let (host, image) = (host.stat(), image.stat());
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(round2(a / b)),
        _ => None,
    };
    Ok(json!({
        "digest": imported.image.manifest.to_string(),
        "ratio_p50": ratio(image.p50_ms, host.p50_ms),
        "ratio_p99": ratio(image.p99_ms, host.p99_ms),
        "host_zygote": host,
        "image_zygote": image,
    }))
}

async fn server_phase(
    plan: &Plan,
    exe: &Path,
    work: &WorkDir,
) -> Result<(Value, Value, Stat, Vec<Throughput>)> {
    let max_clients = plan.clients.iter().copied().max().unwrap_or(1);
    // The warm pool holds a fresh interpreter for every sample and for the burst, so it never
    // drains while measured (its refill would otherwise decide the figure).
    let warm_stock = plan.new_warm.max(plan.burst);
    let pools = [
        (
            ZYGOTE_POOL,
            pool_toml(true, 0, max_clients + plan.burst.max(plan.big_burst) + 16),
        ),
        (
            WARM_POOL,
            pool_toml(false, warm_stock, warm_stock + plan.burst + 8),
        ),
        (COLD_POOL, pool_toml(false, 0, plan.burst + 8)),
        (
            ZYGOTE_WARM_POOL,
            pool_toml(true, ZYGOTE_WARM, max_clients + plan.burst + 16),
        ),
    ];
    note(
        "starting ampoule serve with pools bench-zygote, bench-warm, bench-cold, bench-zygote-warm",
    );
    let server = Server::start(exe, work, "latency", &pools)?;
    let mut c = server.client();
    // The first session of each pool pays one-off costs (the zygote's imports, page cache).
    for pool in [ZYGOTE_POOL, COLD_POOL, WARM_POOL, ZYGOTE_WARM_POOL] {
        c.execute(pool, "warm-up", FIRST_CODE, Some("2"))
            .await
            .with_context(|| format!("the first session of pool {pool}\n{}", server.log_tail()))?;
        c.delete(pool, "warm-up").await?;
    }
    c.wait_warm(WARM_POOL, Duration::from_secs(600)).await?;

    // 1. New identifier → first result, one pool after the other: back to back, then paced
    // (arriving at PACED_PER_S) in the zygote pool and in a zygote pool whose warm stock
    // refills between arrivals.
    let mut new_session = serde_json::Map::new();
    let paced = Some(Duration::from_secs_f64(1.0 / PACED_PER_S));
    for (pool, label, n, period) in [
        (ZYGOTE_POOL, "zygote", plan.new_zygote, None),
        (WARM_POOL, "warm_pool", plan.new_warm, None),
        (COLD_POOL, "cold", plan.new_cold, None),
        (ZYGOTE_POOL, "zygote_paced", plan.new_zygote, paced),
        (
            ZYGOTE_WARM_POOL,
            "zygote_warm_paced",
            plan.new_zygote,
            paced,
        ),
    ] {
        if pool == ZYGOTE_WARM_POOL {
            c.wait_warm(pool, Duration::from_secs(600)).await?;
        }
        let pb = progress(n, &format!("new session → first result ({label})"));
        let mut s = Samples::default();
        let begun = tokio::time::Instant::now();
        for i in 0..n {
            if let Some(period) = period {
                let k = u32::try_from(i).unwrap_or(u32::MAX);
                tokio::time::sleep_until(begun + period.saturating_mul(k)).await;
            }
            let id = format!("new-{label}-{i}");
            s.record(c.execute(pool, &id, FIRST_CODE, Some("2")).await);
            if let Err(e) = c.delete(pool, &id).await {
                s.first_error.get_or_insert(format!("{e:#}"));
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        new_session.insert(label.to_owned(), serde_json::to_value(s.stat())?);
        if pool == WARM_POOL {
            c.wait_warm(WARM_POOL, Duration::from_secs(600)).await?;
        }
    }
    new_session.insert("paced_per_s".into(), json!(PACED_PER_S));
    new_session.insert("zygote_warm".into(), json!(ZYGOTE_WARM));

    // 1a. The same through the sandbox API (two requests: create, then the first
    // execution), in the zygote pool.
    {
        let pb = progress(plan.new_zygote, "new sandbox → first result (zygote)");
        let mut s = Samples::default();
        for _ in 0..plan.new_zygote {
            s.record(c.new_sandbox(ZYGOTE_POOL, FIRST_CODE, "2").await);
            pb.inc(1);
        }
        pb.finish_and_clear();
        new_session.insert("sandbox_zygote".to_owned(), serde_json::to_value(s.stat())?);
    }

    // 1b. A burst: `burst` new identifiers at the same instant, on connections opened before.
    let mut bursts = serde_json::Map::new();
    bursts.insert("simultaneous".into(), json!(plan.burst));
    bursts.insert("big".into(), json!(plan.big_burst));
    // `held`: every session is deleted only once all have answered (new agents arriving at
    // once keep their sessions), instead of each right after its own answer, when the
    // tear-down of the first ones (their processes' memory unmapped) competes with the start
    // of the last ones.
    let baseline_procs = process_count();
    for (pool, label, n, held) in [
        (ZYGOTE_POOL, "zygote", plan.burst, false),
        (WARM_POOL, "warm_pool", plan.burst, false),
        (COLD_POOL, "cold", plan.burst, false),
        // Its last answer is its max_ms: every request was sent at the same instant.
        (ZYGOTE_POOL, "zygote_big", plan.big_burst, false),
        (ZYGOTE_POOL, "zygote_big_held", plan.big_burst, true),
    ] {
        let stat = burst(&server, pool, label, n, held, baseline_procs).await?;
        bursts.insert(label.to_owned(), stat);
        if pool == WARM_POOL {
            c.wait_warm(WARM_POOL, Duration::from_secs(600)).await?;
        }
    }

    // 2. A warm session's round trip.
    c.execute(ZYGOTE_POOL, "round-trip", FIRST_CODE, Some("2"))
        .await
        .context("creating the round-trip session")?;
    for _ in 0..10 {
        let _ = c.execute(ZYGOTE_POOL, "round-trip", "1+1", Some("2")).await;
    }
    let pb = progress(plan.round_trips, "warm session round trip (1+1)");
    let mut rt = Samples::default();
    for _ in 0..plan.round_trips {
        rt.record(c.execute(ZYGOTE_POOL, "round-trip", "1+1", Some("2")).await);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let _ = c.delete(ZYGOTE_POOL, "round-trip").await;

    new_session.insert(
        "zygote_cold_fallbacks".into(),
        json!(server.cold_fallbacks.load(Ordering::Relaxed)),
    );

    // 3. Throughput.
    let mut throughput = Vec::new();
    for &n in &plan.clients {
        throughput.push(throughput_run(&server, n, plan.throughput_for).await?);
    }
    drop(c);
    server.stop(Duration::from_secs(120));
    Ok((
        Value::Object(new_session),
        Value::Object(bursts),
        rt.stat(),
        throughput,
    ))
}

/// `n` new identifiers of `pool` at the same instant, each on a connection opened before;
/// `held`: every session is deleted only once all have answered (new agents arriving at once
/// keep their sessions), instead of each right after its own answer, when the tear-down of
/// the first ones (their processes' memory unmapped) competes with the start of the last ones.
async fn burst(
    server: &Server,
    pool: &str,
    label: &str,
    n: usize,
    held: bool,
    baseline_procs: usize,
) -> Result<Value> {
    // The previous burst's sessions are deleted, but their processes may still be exiting
    // (the tear-down is asynchronous): wait until the host's process count is back where
    // it was, so that no burst pays for the one before it.
    let settled_ms = settle(baseline_procs, Duration::from_secs(20)).await;
    let mut clients: Vec<Client> = (0..n).map(|_| server.client()).collect();
    for cl in &mut clients {
        cl.ready().await?;
    }
    let runs = clients.iter_mut().enumerate().map(|(i, cl)| async move {
        let id = format!("burst-{label}-{i}");
        let r = cl.execute(pool, &id, FIRST_CODE, Some("2")).await;
        if !held {
            let _ = cl.delete(pool, &id).await;
        }
        r
    });
    let mut s = Samples::default();
    for r in join_all(runs).await {
        s.record(r);
    }
    if held {
        let deletes = clients.iter_mut().enumerate().map(|(i, cl)| async move {
            let _ = cl.delete(pool, &format!("burst-{label}-{i}")).await;
        });
        join_all(deletes).await;
    }
    let mut stat = serde_json::to_value(s.stat())?;
    if let Some(o) = stat.as_object_mut() {
        o.insert("settled_before_ms".into(), json!(settled_ms));
    }
    Ok(stat)
}

/// `--burst-only`: the zygote pool's burst of `big_burst` new sessions at once, deleted and
/// held in turn, `rounds` times each, in a server of its own: the spread of the figure the
/// full bench takes once of each, and a workload short enough to profile.
async fn burst_phase(plan: &Plan, exe: &Path, work: &WorkDir, rounds: usize) -> Result<Value> {
    let pools = [(ZYGOTE_POOL, pool_toml(true, 0, plan.big_burst + 16))];
    note("starting ampoule serve with pool bench-zygote");
    let server = Server::start(exe, work, "burst", &pools)?;
    let mut c = server.client();
    c.execute(ZYGOTE_POOL, "warm-up", FIRST_CODE, Some("2"))
        .await
        .with_context(|| format!("the first session\n{}", server.log_tail()))?;
    c.delete(ZYGOTE_POOL, "warm-up").await?;
    let baseline_procs = process_count();
    let pb = progress(
        rounds * 2,
        &format!("bursts of {} new sessions", plan.big_burst),
    );
    // Each burst's last answer, by kind.
    let (mut deleted, mut held) = (Vec::new(), Vec::new());
    let mut failures = 0;
    for _ in 0..rounds {
        for (label, keep) in [("deleted", false), ("held", true)] {
            let stat = burst(
                &server,
                ZYGOTE_POOL,
                label,
                plan.big_burst,
                keep,
                baseline_procs,
            )
            .await?;
            if stat["success_rate"].as_f64() != Some(1.0) {
                failures += 1;
            }
            let last = stat["max_ms"].clone();
            if keep {
                held.push(last)
            } else {
                deleted.push(last)
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    drop(c);
    server.stop(Duration::from_secs(120));
    Ok(json!({
        "deleted": deleted,
        "held": held,
        "sessions_per_burst": plan.big_burst,
        "bursts_with_a_failure": failures,
    }))
}

// ---------------------------------------------------------------------------------------------
// Replicas: 1 then 3, each holding `max_sessions`

const CLUSTER_POOL: &str = "bench-cluster";

/// For 1 then 3 replicas (the 3 a `[cluster]` on 127.0.0.1, each its own port): every
/// replica's pool holds `per_replica` sessions (forked from a zygote). New sessions are asked
/// of replica 0 only — as clients behind one address would — until the cluster refuses one
/// (`pool_full`): placement by load spreads them. Then every held session answers `1+1`
/// `rounds` times, one request at a time (so the figure is a session's round trip, not
/// the machine's contention), through the replica holding it and through replica `i mod n`
/// (a Service spreading connections: two in three forwarded once).
async fn cluster_phase(
    exe: &Path,
    work: &WorkDir,
    per_replica: usize,
    rounds: usize,
) -> Result<Value> {
    let mut runs = Vec::new();
    for n in [1usize, 3] {
        let key = bench_key();
        let ports: Vec<u16> = (0..n)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
            })
            .collect::<std::io::Result<_>>()
            .context("choosing ports")?;
        let peers: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("b{i} = \"http://127.0.0.1:{p}\""))
            .collect();
        let pools = [(CLUSTER_POOL, pool_toml(true, 0, per_replica))];
        note(&format!(
            "starting {n} replica(s), max_sessions = {per_replica} each"
        ));
        let mut servers = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let extra = if n > 1 {
                format!(
                    "\n[cluster]\nreplica = \"b{i}\"\npeers = {{ {} }}\n",
                    peers.join(", ")
                )
            } else {
                String::new()
            };
            servers.push(Server::start_with(
                exe,
                work,
                &format!("cluster{n}-{i}"),
                &pools,
                &format!("127.0.0.1:{port}"),
                &extra,
                &key,
            )?);
        }
        let mut clients: Vec<Client> = servers.iter().map(Server::client).collect();
        // Each zygote's one-off start, then the peers' first capacity reports.
        for (i, c) in clients.iter_mut().enumerate() {
            let (v, _) = c
                .call(
                    Method::POST,
                    "/v1/sessions".into(),
                    Some(json!({"pool": CLUSTER_POOL, "identifier": format!("warm-up_b{i}")})),
                )
                .await
                .with_context(|| format!("the first session\n{}", servers[i].log_tail()))?;
            let id = v["id"].as_str().context("no session id")?.to_owned();
            c.call(Method::DELETE, format!("/v1/sessions/{id}"), None)
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let want = n * per_replica;
        let pb = progress(
            want,
            &format!("{n} replica(s): new sessions through replica 0"),
        );
        let mut ids = Vec::new();
        let mut create = Samples::default();
        let refused = loop {
            let body = json!({"pool": CLUSTER_POOL}).to_string().into_bytes();
            let (status, bytes, ms) = clients[0]
                .request(Method::POST, "/v1/sessions", Some(body))
                .await?;
            if status == StatusCode::TOO_MANY_REQUESTS {
                break String::from_utf8_lossy(&bytes).into_owned();
            }
            if status != StatusCode::CREATED {
                bail!(
                    "POST /v1/sessions: HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            let v: Value = serde_json::from_slice(&bytes)?;
            ids.push(v["id"].as_str().context("no session id")?.to_owned());
            create.record(Ok(ms));
            pb.inc(1);
            if ids.len() > want {
                bail!("{} sessions held, more than {n} × {per_replica}", ids.len());
            }
        };
        pb.finish_and_clear();
        let holder = |id: &str| -> usize {
            id.rsplit_once("_b")
                .and_then(|(_, i)| i.parse().ok())
                .unwrap_or(0)
        };
        let mut held = vec![0usize; n];
        for id in &ids {
            if let Some(h) = held.get_mut(holder(id)) {
                *h += 1;
            }
        }

        let pb = progress(
            ids.len() * rounds * 2,
            &format!("{n} replica(s): 1+1 round trips"),
        );
        let (mut direct, mut spread) = (Samples::default(), Samples::default());
        for _ in 0..rounds {
            for (i, id) in ids.iter().enumerate() {
                for (via, samples) in [(holder(id), &mut direct), (i % n, &mut spread)] {
                    let c = &mut clients[via.min(n - 1)];
                    let r = c
                        .call(
                            Method::POST,
                            format!("/v1/sessions/{id}/executions"),
                            Some(json!({"code": "1+1"})),
                        )
                        .await
                        .and_then(|(v, ms)| {
                            if v["status"] == "succeeded" && v["result"]["text/plain"] == "2" {
                                Ok(ms)
                            } else {
                                bail!("unexpected answer {v}")
                            }
                        });
                    samples.record(r);
                    pb.inc(1);
                }
            }
        }
        pb.finish_and_clear();
        for s in servers {
            s.stop(Duration::from_secs(60));
        }
        runs.push(json!({
            "replicas": n,
            "max_sessions_each": per_replica,
            "sessions_held": ids.len(),
            "held_by_replica": held,
            "refused_then": refused.chars().take(200).collect::<String>(),
            "new_session": create.stat(),
            "round_trip_via_holder": direct.stat(),
            "round_trip_via_replica_i_mod_n": spread.stat(),
        }));
    }
    Ok(Value::Array(runs))
}

/// Durable sandboxes (always started cold, on their own disk image): pause and resume of one
/// with a background process, then hibernation and resume of one holding 100 MiB in
/// `/mnt/data` (the resume is the call that brings it back; the first result after it is
/// measured apart). Each timing is one HTTP request, as a client sees it.
async fn durable_phase(plan: &Plan, exe: &Path, work: &WorkDir) -> Result<Value> {
    if let Err(why) = ampoule_runtime::disk::check(is_root()) {
        note(&format!("durable sandboxes skipped: {why}"));
        let skipped = json!({ "skipped": why });
        return Ok(json!({
            "pause": skipped, "resume": skipped, "hibernate_100mib": skipped,
            "resume_from_hibernation": skipped, "first_result_after_resume": skipped,
        }));
    }
    let pools = [(COLD_POOL, pool_toml(false, 0, 8))];
    note("starting ampoule serve for durable sandboxes (pause, hibernate)");
    let server = Server::start(exe, work, "durable", &pools)?;
    let mut c = server.client();
    let mut out = serde_json::Map::new();
    let create = json!({"pool": COLD_POOL, "timeout_s": 3600, "lifecycle": {"durable": true}});
    let sandbox = |v: &Value| v["id"].as_str().map(str::to_owned);
    let (v, _) = c
        .call(
            Method::POST,
            "/v1/sandboxes".to_owned(),
            Some(create.clone()),
        )
        .await
        .with_context(|| {
            format!(
                "creating a durable sandbox
{}",
                server.log_tail()
            )
        })?;
    let id = sandbox(&v).context("no sandbox id")?;
    c.call(
        Method::POST,
        format!("/v1/sandboxes/{id}/processes"),
        Some(json!({"cmd": "while :; do sleep 0.1; done", "background": true})),
    )
    .await?;
    let pb = progress(
        plan.pauses,
        "pause / resume (a sandbox with a background process)",
    );
    let (mut pause, mut resume) = (Samples::default(), Samples::default());
    for _ in 0..plan.pauses {
        let p = c
            .call(Method::POST, format!("/v1/sandboxes/{id}/pause"), None)
            .await;
        pause.record(p.map(|(_, ms)| ms));
        let r = c
            .call(Method::POST, format!("/v1/sandboxes/{id}/resume"), None)
            .await;
        resume.record(r.map(|(_, ms)| ms));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let _ = c
        .call(Method::DELETE, format!("/v1/sandboxes/{id}"), None)
        .await;
    out.insert("pause".into(), serde_json::to_value(pause.stat())?);
    out.insert("resume".into(), serde_json::to_value(resume.stat())?);

    let (v, _) = c
        .call(Method::POST, "/v1/sandboxes".to_owned(), Some(create))
        .await?;
    let id = sandbox(&v).context("no sandbox id")?;
    let fill = "import os\nwith open('/mnt/data/big', 'wb') as f:\n    for _ in range(100):\n        f.write(os.urandom(1 << 20))\nos.path.getsize('/mnt/data/big')";
    c.call(
        Method::POST,
        format!("/v1/sandboxes/{id}/executions"),
        Some(json!({"code": fill})),
    )
    .await
    .and_then(|(v, _)| {
        if v["result"]["text/plain"] != "104857600" {
            bail!("writing 100 MiB failed: {v}");
        }
        Ok(())
    })?;
    let pb = progress(
        plan.hibernations,
        "hibernate / resume (100 MiB in /mnt/data)",
    );
    let (mut hib, mut wake, mut first) =
        (Samples::default(), Samples::default(), Samples::default());
    let check = "import os\nos.path.getsize('/mnt/data/big')";
    for _ in 0..plan.hibernations {
        let h = c
            .call(Method::POST, format!("/v1/sandboxes/{id}/hibernate"), None)
            .await;
        hib.record(h.map(|(_, ms)| ms));
        let r = c
            .call(Method::POST, format!("/v1/sandboxes/{id}/resume"), None)
            .await;
        wake.record(r.map(|(_, ms)| ms));
        let x = c
            .call(
                Method::POST,
                format!("/v1/sandboxes/{id}/executions"),
                Some(json!({"code": check})),
            )
            .await
            .and_then(|(v, ms)| {
                let text = v["result"]["text/plain"].as_str().unwrap_or_default();
                if text != "104857600" {
                    bail!("the file came back as {v}");
                }
                Ok(ms)
            });
        first.record(x);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let _ = c
        .call(Method::DELETE, format!("/v1/sandboxes/{id}"), None)
        .await;
    out.insert("hibernate_100mib".into(), serde_json::to_value(hib.stat())?);
    out.insert(
        "resume_from_hibernation".into(),
        serde_json::to_value(wake.stat())?,
    );
    out.insert(
        "first_result_after_resume".into(),
        serde_json::to_value(first.stat())?,
    );
    out.insert(
        "memory_across_hibernation".into(),
        json!(ampoule_runtime::doctor::criu_version().map_or_else(
            || "no CRIU on this host: files kept, interpreters start afresh".to_owned(),
            |(v, _)| format!("CRIU {v} present, not used: files kept, interpreters start afresh"),
        )),
    );
    drop(c);
    server.stop(Duration::from_secs(60));
    Ok(Value::Object(out))
}

/// `clients` clients, each with its own session (created first, untimed), executing `1+1` as
/// fast as answers come back for `duration`.
async fn throughput_run(server: &Server, clients: usize, duration: Duration) -> Result<Throughput> {
    let mut cs: Vec<Client> = (0..clients).map(|_| server.client()).collect();
    let setup = cs.iter_mut().enumerate().map(|(i, cl)| async move {
        cl.execute(ZYGOTE_POOL, &format!("tp-{clients}-{i}"), "1+1", Some("2"))
            .await
    });
    let mut setup_failures = 0;
    for r in join_all(setup).await {
        if r.is_err() {
            setup_failures += 1;
        }
    }
    let pb = progress(
        duration.as_secs() as usize,
        &format!("throughput, {clients} clients"),
    );
    let start = Instant::now();
    let deadline = start + duration;
    let runs = cs.iter_mut().enumerate().map(|(i, cl)| async move {
        let id = format!("tp-{clients}-{i}");
        let mut s = Samples::default();
        while Instant::now() < deadline {
            s.record(cl.execute(ZYGOTE_POOL, &id, "1+1", Some("2")).await);
        }
        s
    });
    let ticker = async {
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            pb.inc(1);
        }
    };
    let (results, ()) = tokio::join!(join_all(runs), ticker);
    let seconds = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let mut all = Samples::default();
    for s in results {
        all.merge(s);
    }
    // A client whose session could not be created counts as one failed execution.
    all.failures += setup_failures;
    let cleanup = cs.iter_mut().enumerate().map(|(i, cl)| async move {
        let _ = cl.delete(ZYGOTE_POOL, &format!("tp-{clients}-{i}")).await;
    });
    join_all(cleanup).await;
    let latency = all.stat();
    Ok(Throughput {
        clients,
        seconds: round2(seconds),
        executions: all.ms.len(),
        failures: all.failures,
        per_second: round2(all.ms.len() as f64 / seconds),
        success_rate: latency.success_rate,
        latency,
    })
}

// ---------------------------------------------------------------------------------------------
// 4. Density: a server of its own, so nothing else it holds is counted

const DENSITY_POOL: &str = "bench-density";
/// Clients creating and querying the density sessions.
const DENSITY_CLIENTS: usize = 8;

/// Every density figure of the plan, each without and then with the zygote's warm-up.
async fn densities(plan: &Plan, exe: &Path, work: &WorkDir) -> Result<Vec<Density>> {
    let mut out = Vec::new();
    // MemAvailable before any phase started a server: each next phase of a hundred sessions
    // or more waits until memory is back to about it (the smoke test's 20 leave too little
    // behind to matter, and its machine runs other tests meanwhile).
    let baseline = meminfo("MemAvailable");
    for &n in &plan.density {
        for warmup in [false, true] {
            let baseline = baseline.filter(|_| n >= 100);
            out.push(density_phase(n, warmup, plan, exe, work, baseline).await?);
        }
    }
    Ok(out)
}

/// Each density session's first cell: a small DataFrame, as a real first cell would.
const DENSITY_CELL: &str = "import pandas as pd\nint(pd.DataFrame({'a': range(100)}).a.sum())";

/// How many servers hold `n` density sessions: one, unless this process's open-file limit (the
/// servers inherit it and can raise it no further without `CAP_SYS_RESOURCE`) is below what
/// one server needs for all of them ([`ampoule_server::listener::FILES_PER_SESSION`] each,
/// plus room for its own files). The box holds the same sessions either way.
fn density_servers(n: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let per_session = ampoule_server::listener::FILES_PER_SESSION;
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(_, hard)| hard);
    let fits = (limit.saturating_sub(2048) / per_session).max(1);
    (n as u64).div_ceil(fits).max(1) as usize
}

async fn density_phase(
    n: usize,
    warmup: bool,
    plan: &Plan,
    exe: &Path,
    work: &WorkDir,
    baseline_kib: Option<u64>,
) -> Result<Density> {
    let label = if warmup { "warm-up" } else { "no warm-up" };
    // What an earlier phase held is given back before this one's servers start.
    if baseline_kib.is_some() {
        settle_memory(plan.drop_caches, baseline_kib).await;
    }
    let k = density_servers(n);
    note(&format!(
        "density: starting {} for {n} sessions ({label})",
        if k == 1 {
            "a server".to_owned()
        } else {
            format!(
                "{k} servers (the open-file limit holds ~{} sessions per server)",
                n.div_ceil(k)
            )
        }
    ));
    let mut toml = pool_toml(true, 0, n.div_ceil(k) + DENSITY_CLIENTS);
    if !warmup {
        toml.push_str("warmup = \"\"\n");
    }
    let pools = [(DENSITY_POOL, toml)];
    let mut servers = Vec::with_capacity(k);
    for i in 0..k {
        let server = Server::start(
            exe,
            work,
            &format!("density-{n}-{}-{i}", if warmup { "w" } else { "nw" }),
            &pools,
        )?;
        let mut c = server.client();
        c.execute(DENSITY_POOL, "warm-up", FIRST_CODE, Some("2"))
            .await
            .with_context(|| format!("the first density session\n{}", server.log_tail()))?;
        c.delete(DENSITY_POOL, "warm-up").await?;
        servers.push(server);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle_memory(plan.drop_caches, None).await;

    let pids: Vec<u32> = servers.iter().map(Server::pid).collect();
    let before = memory_reading(&pids, plan.drop_caches)?;
    let pb = progress(
        n,
        &format!("density: {n} sessions run a DataFrame cell ({label})"),
    );
    let next = AtomicUsize::new(0);
    let created = AtomicUsize::new(0);
    let start = Instant::now();
    // Session i lives on server i % k.
    let creators = (0..DENSITY_CLIENTS).map(|_| {
        let mut cls: Vec<Client> = servers.iter().map(Server::client).collect();
        let (next, created, pb) = (&next, &created, &pb);
        async move {
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match cls[i % k]
                    .execute(DENSITY_POOL, &format!("d-{i}"), DENSITY_CELL, Some("4950"))
                    .await
                {
                    Ok(_) => {
                        created.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        first_error.get_or_insert(format!("{e:#}"));
                    }
                }
                pb.inc(1);
            }
            first_error
        }
    });
    let errors: Vec<String> = join_all(creators).await.into_iter().flatten().collect();
    let create_seconds = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    if let Some(e) = errors.first() {
        note(&format!("density: a session failed to start: {e}"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = memory_reading(&pids, plan.drop_caches)?;
    let mut alive = 0;
    for server in &servers {
        alive += server.client().pool(DENSITY_POOL).await?["sessions"]
            .as_u64()
            .unwrap_or(0) as usize;
    }

    let pb = progress(n, &format!("density: {n} sessions answer 1+1"));
    let next = AtomicUsize::new(0);
    let answers = (0..DENSITY_CLIENTS).map(|_| {
        let mut cls: Vec<Client> = servers.iter().map(Server::client).collect();
        let (next, pb) = (&next, &pb);
        async move {
            let mut s = Samples::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                s.record(
                    cls[i % k]
                        .execute(DENSITY_POOL, &format!("d-{i}"), "1+1", Some("2"))
                        .await,
                );
                pb.inc(1);
            }
            s
        }
    });
    let mut answered = Samples::default();
    for s in join_all(answers).await {
        answered.merge(s);
    }
    pb.finish_and_clear();
    note(&format!("density: stopping the servers ({n} sessions)"));
    let zygote_cold_fallbacks = servers
        .iter()
        .map(|s| s.cold_fallbacks.load(Ordering::Relaxed))
        .sum();
    let zygote_deaths = servers
        .iter()
        .map(|s| s.zygote_deaths.load(Ordering::Relaxed))
        .sum();
    for server in servers {
        server.stop(Duration::from_secs(300));
    }

    let mib = |kib: u64| round2(kib as f64 / 1024.0);
    // Per session that lived: when some failed to start (a limit reached), the memory is
    // that of the others.
    let per = |kib: f64| round2(kib / 1024.0 / alive.max(1) as f64);
    let answer_latency = answered.stat();
    Ok(Density {
        sessions: n,
        servers: k,
        runtime: python_runtime(),
        warmup,
        first_cell: DENSITY_CELL,
        created: created.load(Ordering::Relaxed),
        create_seconds: round2(create_seconds),
        alive,
        answering: answer_latency.ok,
        success_rate: answer_latency.ok as f64 / n.max(1) as f64,
        processes: after.processes,
        pss_total_mib: mib(after.pss_kib),
        pss_before_mib: mib(before.pss_kib),
        pss_per_session_mib: per(after.pss_kib as f64),
        pss_added_per_session_mib: per(after.pss_kib as f64 - before.pss_kib as f64),
        mem_available_drop_per_session_mib: per(
            before.mem_available_kib as f64 - after.mem_available_kib as f64
        ),
        server_pss_mib: mib(after.server_pss_kib),
        server_open_files: after.server_open_files,
        drop_caches: plan.drop_caches,
        zygote_cold_fallbacks,
        zygote_deaths,
        answer_latency,
    })
}

/// The session environment's interpreter, as `python -V` names it (`Python 3.12.1`):
/// the density depends on it (CPython 3.12+ has immortal objects).
fn python_runtime() -> String {
    let python = ampoule_session::setup::PythonEnv::default_location().python();
    std::process::Command::new(&python)
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| format!("{} (unknown version)", python.display()))
}

struct MemoryReading {
    /// Σ PSS of every descendant of the server.
    pss_kib: u64,
    processes: usize,
    mem_available_kib: u64,
    server_pss_kib: u64,
    server_open_files: usize,
}

/// Waits until `MemAvailable` stops rising: what an earlier phase's server and sandboxes held
/// is still being freed for a while after they exit (thousands of sessions: tens of seconds,
/// in bursts), and a "before" reading taken meanwhile would make the next phase's drop look
/// smaller than it is. Settled, when the first phase's reading is known: less than 4 MiB freed
/// in each of 3 seconds in a row and back within 1 % of that reading (for at most a minute);
/// else one such second. At most 120 s in all.
async fn settle_memory(drop_caches: bool, baseline_kib: Option<u64>) {
    let read = || {
        if drop_caches {
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
        }
        meminfo("MemAvailable").unwrap_or(0)
    };
    let mut last = read();
    let mut quiet = 0;
    for second in 1..=120 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = read();
        quiet = if now < last + 4 * 1024 { quiet + 1 } else { 0 };
        last = now;
        // Not back after a minute of waiting: something else holds it (other work on the
        // machine), not the previous phase.
        let back = second >= 60 || baseline_kib.is_none_or(|b| now + b / 100 >= b);
        // Three quiet seconds where the figures count (a baseline is given); one for the
        // smoke test's few sessions.
        let enough = if baseline_kib.is_some() { 3 } else { 1 };
        if quiet >= enough && back {
            return;
        }
    }
    note("density: MemAvailable did not settle within 120 s; reading it anyway");
}

fn memory_reading(servers: &[u32], drop_caches: bool) -> Result<MemoryReading> {
    if drop_caches {
        std::fs::write("/proc/sys/vm/drop_caches", "1").context("dropping the page cache")?;
    }
    let pids: Vec<u32> = servers.iter().flat_map(|&s| descendants(s)).collect();
    let total: u64 = pids.iter().filter_map(|&p| pss_kib(p)).sum();
    let mem_available_kib = meminfo("MemAvailable").context("reading /proc/meminfo")?;
    Ok(MemoryReading {
        pss_kib: total,
        processes: pids.len(),
        mem_available_kib,
        server_pss_kib: servers.iter().filter_map(|&s| pss_kib(s)).sum(),
        server_open_files: servers
            .iter()
            .map(|s| {
                std::fs::read_dir(format!("/proc/{s}/fd"))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .sum(),
    })
}

/// Every process below `root` in the process tree (not `root` itself).
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&text, "Pss")
}

fn meminfo(field: &str) -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/meminfo").ok()?, field)
}

/// The value of a `Name:   123 kB` line.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Tables

fn print_tables(out: &mut impl Write, r: &Value) -> Result<()> {
    writeln!(
        out,
        "ampoule bench, {} ({} build, {} CPUs, kernel {}), load average {} → {}, {} s",
        r["date"].as_str().unwrap_or(""),
        r["build"].as_str().unwrap_or(""),
        r["host"]["cpus"],
        r["host"]["kernel"].as_str().unwrap_or(""),
        r["host"]["load_average_start"].as_str().unwrap_or(""),
        r["host"]["load_average_end"].as_str().unwrap_or(""),
        r["seconds"],
    )?;
    writeln!(out)?;
    let head = |out: &mut dyn Write| {
        writeln!(
            out,
            "{:<60} {:>9} {:>9} {:>9} {:>6} {:>8}",
            "", "p50 ms", "p90 ms", "p99 ms", "n", "success"
        )
    };
    let row = |out: &mut dyn Write, name: &str, s: &Value| -> std::io::Result<()> {
        if let Some(reason) = s["skipped"].as_str() {
            return writeln!(out, "{name:<60} skipped: {reason}");
        }
        let f = |k: &str| {
            s[k].as_f64()
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
        };
        writeln!(
            out,
            "{name:<60} {:>9} {:>9} {:>9} {:>6} {:>7.1}%",
            f("p50_ms"),
            f("p90_ms"),
            f("p99_ms"),
            s["n"].as_u64().unwrap_or(0),
            100.0 * s["success_rate"].as_f64().unwrap_or(0.0)
        )?;
        if let Some(e) = s["first_error"].as_str() {
            writeln!(out, "    first error: {e}")?;
        }
        Ok(())
    };
    head(out)?;
    let ns = &r["new_session"];
    row(out, "new session → first result, zygote", &ns["zygote"])?;
    row(
        out,
        "new session → first result, warm pool",
        &ns["warm_pool"],
    )?;
    row(out, "new session → first result, cold", &ns["cold"])?;
    let rate = ns["paced_per_s"].as_f64().unwrap_or(0.0);
    row(
        out,
        &format!("new session → first result, zygote, {rate}/s"),
        &ns["zygote_paced"],
    )?;
    row(
        out,
        &format!(
            "new session → first result, zygote + {} warm, {rate}/s",
            ns["zygote_warm"].as_u64().unwrap_or(0)
        ),
        &ns["zygote_warm_paced"],
    )?;
    row(
        out,
        "new sandbox → first result, zygote (/v1/sandboxes)",
        &ns["sandbox_zygote"],
    )?;
    if let Some(n) = ns["zygote_cold_fallbacks"].as_u64().filter(|n| *n > 0) {
        writeln!(
            out,
            "    warning: {n} sessions of the zygote pool were started cold (the server's log \
             says why: AMPOULE_BENCH_SERVER_LOG=1)"
        )?;
    }
    let b = &r["new_session_burst"];
    let k = b["simultaneous"].as_u64().unwrap_or(0);
    row(
        out,
        &format!("{k} new sessions at once, zygote"),
        &b["zygote"],
    )?;
    row(
        out,
        &format!("{k} new sessions at once, warm pool"),
        &b["warm_pool"],
    )?;
    row(out, &format!("{k} new sessions at once, cold"), &b["cold"])?;
    row(
        out,
        &format!(
            "{} new sessions at once, zygote (the last: max)",
            b["big"].as_u64().unwrap_or(0)
        ),
        &b["zygote_big"],
    )?;
    if let Some(last) = b["zygote_big"]["max_ms"].as_f64() {
        writeln!(out, "    the last of them answered after {last:.2} ms")?;
    }
    row(
        out,
        &format!(
            "{} new sessions at once, zygote, held (deleted after all answered)",
            b["big"].as_u64().unwrap_or(0)
        ),
        &b["zygote_big_held"],
    )?;
    if let Some(last) = b["zygote_big_held"]["max_ms"].as_f64() {
        writeln!(out, "    the last of them answered after {last:.2} ms")?;
    }
    row(out, "warm session round trip (1+1)", &r["warm_round_trip"])?;
    let d = &r["durable"];
    row(
        out,
        "pause (a sandbox with a background process)",
        &d["pause"],
    )?;
    row(out, "resume from pause", &d["resume"])?;
    row(
        out,
        "hibernate (100 MiB in /mnt/data)",
        &d["hibernate_100mib"],
    )?;
    row(
        out,
        "resume from hibernation",
        &d["resume_from_hibernation"],
    )?;
    row(
        out,
        "first result after that resume",
        &d["first_result_after_resume"],
    )?;
    if let Some(m) = d["memory_across_hibernation"].as_str() {
        writeln!(out, "    memory across hibernation: {m}")?;
    }
    let bl = &r["baselines"];
    row(out, "baseline: python3 -c pass", &bl["python3_pass"])?;
    row(
        out,
        "baseline: venv python -c 'import numpy, pandas, matplotlib'",
        &bl["venv_import_numpy_pandas_matplotlib"],
    )?;
    row(
        out,
        "baseline: bwrap --unshare-all python3 -c pass",
        &bl["bwrap_python3_pass"],
    )?;
    row(
        out,
        "baseline: ampoule run print(1)",
        &bl["ampoule_run_print"],
    )?;
    let paired = &bl["ampoule_run_minus_bwrap_paired"];
    if let (Some(p25), Some(p50), Some(p75)) = (
        paired["p25_ms"].as_f64(),
        paired["p50_ms"].as_f64(),
        paired["p75_ms"].as_f64(),
    ) {
        writeln!(
            out,
            "ampoule run less bwrap, round by round: p50 {p50:+.2} ms (p25 {p25:+.2}, p75 {p75:+.2})"
        )?;
    }
    if let (Some(z), Some(imp)) = (
        ns["zygote"]["p50_ms"].as_f64(),
        bl["venv_import_numpy_pandas_matplotlib"]["p50_ms"].as_f64(),
    ) && z > 0.0
    {
        writeln!(
            out,
            "zygote new session vs the bare cold import (p50): {:.1}× faster",
            imp / z
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<12} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9}",
        "clients", "exec/s", "executions", "success", "p50 ms", "p90 ms", "p99 ms"
    )?;
    for t in r["throughput"].as_array().into_iter().flatten() {
        let l = &t["latency"];
        writeln!(
            out,
            "{:<12} {:>10.1} {:>12} {:>8.1}% {:>9.2} {:>9.2} {:>9.2}",
            t["clients"].as_u64().unwrap_or(0),
            t["per_second"].as_f64().unwrap_or(0.0),
            t["executions"].as_u64().unwrap_or(0),
            100.0 * t["success_rate"].as_f64().unwrap_or(0.0),
            l["p50_ms"].as_f64().unwrap_or(f64::NAN),
            l["p90_ms"].as_f64().unwrap_or(f64::NAN),
            l["p99_ms"].as_f64().unwrap_or(f64::NAN),
        )?;
    }
    writeln!(out)?;
    for d in r["density"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "density, {} pandas sessions ({}) after a DataFrame cell, zygote {}{}: {} created in \
             {} s, {} alive, {} answering 1+1 ({:.1} %, p50 {} ms); {} processes",
            d["sessions"],
            d["runtime"].as_str().unwrap_or("?"),
            if d["warmup"] == true {
                "warmed up"
            } else {
                "without warm-up"
            },
            match d["servers"].as_u64() {
                Some(k) if k > 1 => format!(", over {k} servers (open-file limit)"),
                _ => String::new(),
            },
            d["created"],
            d["create_seconds"],
            d["alive"],
            d["answering"],
            100.0 * d["success_rate"].as_f64().unwrap_or(0.0),
            d["answer_latency"]["p50_ms"],
            d["processes"],
        )?;
        writeln!(
            out,
            "    Σ PSS {} MiB (zygote alone {} MiB): {} MiB per session ({} MiB added per \
             session); MemAvailable drop {} MiB per session{}; server {} MiB PSS, {} open files",
            d["pss_total_mib"],
            d["pss_before_mib"],
            d["pss_per_session_mib"],
            d["pss_added_per_session_mib"],
            d["mem_available_drop_per_session_mib"],
            if d["drop_caches"] == true {
                " (page cache dropped before each reading)"
            } else {
                ""
            },
            d["server_pss_mib"],
            d["server_open_files"],
        )?;
        let (fallbacks, deaths) = (
            d["zygote_cold_fallbacks"].as_u64().unwrap_or(0),
            d["zygote_deaths"].as_u64().unwrap_or(0),
        );
        if fallbacks + deaths > 0 {
            writeln!(
                out,
                "    warning: the zygote died {deaths} times (its sessions with it); {fallbacks} \
                 sessions were started cold"
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Samples {
            ms: (1..=100).map(f64::from).collect(),
            failures: 0,
            first_error: None,
        };
        let st = s.stat();
        assert_eq!(st.p50_ms, Some(50.0));
        assert_eq!(st.p90_ms, Some(90.0));
        assert_eq!(st.p99_ms, Some(99.0));
        assert_eq!(st.success_rate, 1.0);
        let one = Samples {
            ms: vec![7.0],
            failures: 1,
            first_error: None,
        };
        let st = one.stat();
        assert_eq!((st.p50_ms, st.p99_ms, st.n), (Some(7.0), Some(7.0), 2));
        assert_eq!(st.success_rate, 0.5);
    }

    #[test]
    fn kib_fields() {
        let text = "Rss:    1234 kB\nPss:      56 kB\nPss_Anon: 7 kB\n";
        assert_eq!(kib_field(text, "Pss"), Some(56));
        assert_eq!(kib_field(text, "Pss_Anon"), Some(7));
        assert_eq!(kib_field(text, "Swap"), None);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_now().len(), 20);
    }
}
