//! `ampoule bench --gvisor-only`: the gVisor tier beside the default tier and a bare
//! interpreter, in one run, samples interleaved so that machine noise hits all alike:
//!
//! - start: a whole process from spawn to exit: bare `python3 -c pass`, and `ampoule run` of
//!   `pass` with `--isolation namespaces` and `--isolation gvisor`;
//! - a new session to its first result (`1+1`, one ACA `code/execute` call with a new
//!   identifier) in three pools of one server: the gVisor tier's (sessions start cold: it has
//!   no zygotes), the default tier's started cold, and the default tier's forked from a zygote
//!   (its usual configuration); the bare interpreter's counterpart is `python3 -c 'print(1+1)'`;
//! - a live session's round trip (`1+1`) in each pool;
//! - hibernation and resume of a durable gVisor sandbox holding `x = 41`: hibernate (a runsc
//!   checkpoint), the checkpoint image's size, resume (a runsc restore, which the server proves
//!   with an empty execution before it answers) and the first result after it (`x + 1`, checked
//!   to be 42, `session_state` checked to be `kept`).
//!
//! Prints one JSON object, like the other `-only` modes.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper::Method;
use serde_json::{Value, json};

use super::{
    COLD_POOL, PYTHON, Samples, Server, WorkDir, ZYGOTE_POOL, build_kind, load_average, note,
    pool_toml, progress, time_process, utc_now,
};

/// The gVisor pool (cold: the tier has no zygotes).
const GVISOR_POOL: &str = "bench-gvisor";

/// Sample counts of one run.
struct GvisorPlan {
    starts: usize,
    new_sessions: usize,
    round_trips: usize,
    hibernations: usize,
}

impl GvisorPlan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                starts: 3,
                new_sessions: 3,
                round_trips: 20,
                hibernations: 2,
            }
        } else {
            Self {
                starts: 30,
                new_sessions: 30,
                round_trips: 300,
                hibernations: 20,
            }
        }
    }
}

/// Runs the gVisor comparison and prints its JSON report.
pub(super) async fn run(quick: bool, exe: &Path, work: &WorkDir) -> Result<ExitCode> {
    if ampoule_runtime::gvisor::find().is_none() {
        bail!("runsc is not installed\nhint: apt-get install runsc");
    }
    let plan = GvisorPlan::new(quick);
    let load_start = load_average();
    let started = Instant::now();
    let start = starts(&plan, exe)?;
    let (new_session, round_trip, hibernation) = server_phase(&plan, exe, work).await?;
    let report = json!({
        "version": 1,
        "date": utc_now(),
        "quick": quick,
        "build": build_kind(),
        "runsc": ampoule_runtime::gvisor::find().map(|p| runsc_version(&p)),
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned()).unwrap_or_default(),
            "load_average_start": load_start,
            "load_average_end": load_average(),
        },
        "seconds": super::round2(started.elapsed().as_secs_f64()),
        "gvisor": {
            "start": start,
            "new_session": new_session,
            "warm_round_trip": round_trip,
            "hibernation": hibernation,
        },
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report)?;
    std::io::Write::write_all(&mut out, b"\n")?;
    Ok(ExitCode::SUCCESS)
}

fn runsc_version(path: &Path) -> String {
    Command::new(path)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default()
}

/// Whole processes from spawn to exit, output checked.
fn starts(plan: &GvisorPlan, exe: &Path) -> Result<Value> {
    let bare = |code: &str| {
        let mut c = Command::new(PYTHON);
        c.args(["-c", code]);
        c
    };
    let run = |isolation: &str| {
        let mut c = Command::new(exe);
        c.args(["run", "--isolation", isolation, "-"]);
        c
    };
    // The page cache, and the first gVisor run's platform trial (then cached on the host).
    let _ = time_process(bare("pass"), None, "");
    for tier in ["namespaces", "gvisor"] {
        let _ = time_process(run(tier), Some(b"print(1)\n"), "1\n");
    }
    let (mut b, mut b2, mut ns, mut gv) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    let pb = progress(plan.starts, "start: python3, ampoule run (both tiers)");
    for _ in 0..plan.starts {
        Samples::record(&mut b, time_process(bare("pass"), None, ""));
        Samples::record(&mut b2, time_process(bare("print(1+1)"), None, "2\n"));
        Samples::record(
            &mut ns,
            time_process(run("namespaces"), Some(b"pass\n"), ""),
        );
        Samples::record(&mut gv, time_process(run("gvisor"), Some(b"pass\n"), ""));
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(json!({
        "python3_pass": b.stat(),
        "python3_print_1_plus_1": b2.stat(),
        "ampoule_run_pass_namespaces": ns.stat(),
        "ampoule_run_pass_gvisor": gv.stat(),
    }))
}

/// New sessions, round trips and hibernation, on one server with the three pools.
async fn server_phase(
    plan: &GvisorPlan,
    exe: &Path,
    work: &WorkDir,
) -> Result<(Value, Value, Value)> {
    let max = plan.new_sessions + 8;
    let gvisor = format!(
        "language = \"python\"\nisolation = \"gvisor\"\nzygote = false\nwarm = 0\n\
         max_sessions = {max}\nidle_timeout_s = 3600\n"
    );
    let pools = [
        (GVISOR_POOL, gvisor),
        (COLD_POOL, pool_toml(false, 0, max)),
        (ZYGOTE_POOL, pool_toml(true, 0, max)),
    ];
    note("starting ampoule serve with pools bench-gvisor, bench-cold, bench-zygote");
    let server = Server::start(exe, work, "gvisor", &pools)?;
    let mut c = server.client();
    let tiers = [
        (GVISOR_POOL, "gvisor"),
        (COLD_POOL, "namespaces_cold"),
        (ZYGOTE_POOL, "namespaces_zygote"),
    ];
    // The first session of each pool pays one-off costs (the zygote's imports, page cache).
    for (pool, _) in tiers {
        c.execute(pool, "warm-up", "1+1", Some("2"))
            .await
            .with_context(|| format!("the first session of pool {pool}\n{}", server.log_tail()))?;
        c.delete(pool, "warm-up").await?;
    }

    let mut new: Vec<Samples> = tiers.iter().map(|_| Samples::default()).collect();
    let pb = progress(plan.new_sessions, "new session → first result (1+1)");
    for i in 0..plan.new_sessions {
        for ((pool, label), s) in tiers.iter().zip(new.iter_mut()) {
            let id = format!("new-{label}-{i}");
            s.record(c.execute(pool, &id, "1+1", Some("2")).await);
            if let Err(e) = c.delete(pool, &id).await {
                s.first_error.get_or_insert(format!("{e:#}"));
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();

    for (pool, _) in tiers {
        c.execute(pool, "round-trip", "1+1", Some("2")).await?;
        for _ in 0..10 {
            let _ = c.execute(pool, "round-trip", "1+1", Some("2")).await;
        }
    }
    let mut rt: Vec<Samples> = tiers.iter().map(|_| Samples::default()).collect();
    let pb = progress(plan.round_trips, "warm session round trip (1+1)");
    for _ in 0..plan.round_trips {
        for ((pool, _), s) in tiers.iter().zip(rt.iter_mut()) {
            s.record(c.execute(pool, "round-trip", "1+1", Some("2")).await);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    for (pool, _) in tiers {
        let _ = c.delete(pool, "round-trip").await;
    }
    let mut new_session = serde_json::Map::new();
    let mut round_trip = serde_json::Map::new();
    for (((_, label), n), r) in tiers.iter().zip(new).zip(rt) {
        new_session.insert((*label).to_owned(), serde_json::to_value(n.stat())?);
        round_trip.insert((*label).to_owned(), serde_json::to_value(r.stat())?);
    }

    let hibernation = hibernation(plan, &server, work).await?;
    drop(c);
    server.stop(Duration::from_secs(60));
    Ok((
        Value::Object(new_session),
        Value::Object(round_trip),
        hibernation,
    ))
}

/// Hibernate / resume cycles of a durable gVisor sandbox holding `x = 41`.
async fn hibernation(plan: &GvisorPlan, server: &Server, work: &WorkDir) -> Result<Value> {
    if let Err(why) = ampoule_runtime::disk::check(true) {
        note(&format!("hibernation skipped: {why}"));
        return Ok(json!({ "skipped": why }));
    }
    let mut c = server.client();
    let create = json!({"pool": GVISOR_POOL, "timeout_s": 3600, "lifecycle": {"durable": true}});
    let (v, _) = c
        .call(Method::POST, "/v1/sandboxes".to_owned(), Some(create))
        .await
        .with_context(|| format!("creating a durable sandbox\n{}", server.log_tail()))?;
    let id = v["id"].as_str().context("no sandbox id")?.to_owned();
    let exec = |code: &str| Some(json!({ "code": code }));
    c.call(
        Method::POST,
        format!("/v1/sandboxes/{id}/executions"),
        exec("x = 41"),
    )
    .await?;
    let image = work
        .0
        .join("gvisor-data")
        .join("sandboxes")
        .join(&id)
        .join("checkpoint")
        .join("checkpoint.img");
    let (mut hib, mut wake, mut first) =
        (Samples::default(), Samples::default(), Samples::default());
    let mut image_bytes = Vec::new();
    let mut kept = 0;
    let pb = progress(plan.hibernations, "hibernate / resume (gVisor, x = 41)");
    for _ in 0..plan.hibernations {
        let h = c
            .call(Method::POST, format!("/v1/sandboxes/{id}/hibernate"), None)
            .await;
        if let Ok((v, _)) = &h
            && v["session_state"] == "kept"
        {
            kept += 1;
        }
        Samples::record(&mut hib, h.map(|(_, ms)| ms));
        if let Ok(m) = std::fs::metadata(&image) {
            image_bytes.push(m.len());
        }
        let r = c
            .call(Method::POST, format!("/v1/sandboxes/{id}/resume"), None)
            .await
            .and_then(|(v, ms)| {
                if v["session_state"] != "kept" {
                    bail!("resumed without its memory: {v}");
                }
                Ok(ms)
            });
        Samples::record(&mut wake, r);
        let x = c
            .call(
                Method::POST,
                format!("/v1/sandboxes/{id}/executions"),
                exec("x + 1"),
            )
            .await
            .and_then(|(v, ms)| {
                if v["result"]["text/plain"] != "42" {
                    bail!("x + 1 came back as {v}");
                }
                Ok(ms)
            });
        Samples::record(&mut first, x);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let _ = c
        .call(Method::DELETE, format!("/v1/sandboxes/{id}"), None)
        .await;
    image_bytes.sort_unstable();
    Ok(json!({
        "hibernate_checkpoint": hib.stat(),
        "resume_restore": wake.stat(),
        "first_result_after_resume": first.stat(),
        "hibernated_with_memory": kept,
        "checkpoint_image_bytes_median": image_bytes.get(image_bytes.len() / 2),
    }))
}
