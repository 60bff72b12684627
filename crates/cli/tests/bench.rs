#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
//! `ampoule bench --quick --json` as a smoke test: every section is present and every
//! measurement succeeded at least once. A correctness check only — nothing here is timed
//! (docs/BENCHMARKS.md records the figures of a full release run).
//!
//! Needs root (the bench starts `ampoule serve` with real sandboxes) and the session Python
//! environment (`ampoule setup`); without root it is reported as ignored, with the reason (and
//! the refusal without root is ignored as root, where there is none to see).

use std::process::Command;

use ampoule_testkit::host::{is_root, trial};
use libtest_mimic::Arguments;
use serde_json::Value;

/// A latency summary that succeeded at least once, with ordered percentiles.
fn check_stat(name: &str, s: &Value) {
    let rate = s["success_rate"]
        .as_f64()
        .unwrap_or_else(|| panic!("{name}: no success_rate in {s}"));
    assert!(rate > 0.0, "{name}: nothing succeeded: {s}");
    assert!(s["n"].as_u64().unwrap() > 0, "{name}: no samples: {s}");
    let p = |k: &str| {
        s[k].as_f64()
            .unwrap_or_else(|| panic!("{name}: no {k}: {s}"))
    };
    assert!(
        p("p50_ms") <= p("p90_ms") && p("p90_ms") <= p("p99_ms"),
        "{name}: percentiles out of order: {s}"
    );
}

fn quick_bench_reports_every_section() {
    let out = Command::new(env!("CARGO_BIN_EXE_ampoule"))
        .args(["bench", "--quick", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ampoule bench failed: {stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(r["quick"], true);

    for config in ["zygote", "warm_pool", "cold"] {
        check_stat(&format!("new_session.{config}"), &r["new_session"][config]);
        check_stat(
            &format!("new_session_burst.{config}"),
            &r["new_session_burst"][config],
        );
    }
    for paced in ["zygote_paced", "zygote_warm_paced"] {
        check_stat(&format!("new_session.{paced}"), &r["new_session"][paced]);
    }
    for big in ["zygote_big", "zygote_big_held"] {
        check_stat(
            &format!("new_session_burst.{big}"),
            &r["new_session_burst"][big],
        );
    }
    check_stat("warm_round_trip", &r["warm_round_trip"]);
    for k in [
        "pause",
        "resume",
        "hibernate_100mib",
        "resume_from_hibernation",
        "first_result_after_resume",
    ] {
        let s = &r["durable"][k];
        if s["skipped"].is_string() {
            eprintln!("durable.{k} skipped: {}", s["skipped"]);
        } else {
            check_stat(&format!("durable.{k}"), s);
        }
    }

    let throughput = r["throughput"].as_array().unwrap();
    let clients: Vec<u64> = throughput
        .iter()
        .map(|t| t["clients"].as_u64().unwrap())
        .collect();
    assert_eq!(clients, [1, 10, 50]);
    for t in throughput {
        assert!(t["success_rate"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["per_second"].as_f64().unwrap() > 0.0, "{t}");
        check_stat("throughput latency", &t["latency"]);
    }

    let density = r["density"].as_array().unwrap();
    // The same sessions without and with the zygote's warm-up, in that order.
    assert_eq!(density.len(), 2, "{density:?}");
    for (d, warmup) in density.iter().zip([false, true]) {
        assert_eq!(d["sessions"], 20);
        assert_eq!(d["warmup"], warmup, "{d}");
        assert!(
            d["first_cell"].as_str().unwrap().contains("DataFrame"),
            "{d}"
        );
        assert!(d["success_rate"].as_f64().unwrap() > 0.0, "{d}");
        assert!(d["alive"].as_u64().unwrap() > 0, "{d}");
        assert!(d["answering"].as_u64().unwrap() > 0, "{d}");
        assert!(d["pss_per_session_mib"].as_f64().unwrap() > 0.0, "{d}");
        assert!(d["processes"].as_u64().unwrap() > 0, "{d}");
    }

    let b = &r["baselines"];
    check_stat("python3_pass", &b["python3_pass"]);
    check_stat(
        "venv_import_numpy_pandas_matplotlib",
        &b["venv_import_numpy_pandas_matplotlib"],
    );
    check_stat("ampoule_run_print", &b["ampoule_run_print"]);
    // bubblewrap is optional on the machine (scripts/deps.sh installs it).
    if b["bwrap_python3_pass"].get("skipped").is_none() {
        check_stat("bwrap_python3_pass", &b["bwrap_python3_pass"]);
    }
}

/// `--cluster-only`: 3 replicas hold 3 × one replica's `max_sessions`, all asked of one
/// replica (placement by load spread them, each replica full), and every held session
/// answered through its holder and through another replica.
fn quick_cluster_bench_holds_three_times_the_sessions() {
    let out = Command::new(env!("CARGO_BIN_EXE_ampoule"))
        .args([
            "bench",
            "--quick",
            "--cluster-only",
            "--cluster-sessions",
            "6",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ampoule bench failed: {stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = r["cluster"].as_array().unwrap();
    let held: Vec<Value> = runs.iter().map(|c| c["held_by_replica"].clone()).collect();
    assert_eq!(held, [serde_json::json!([6]), serde_json::json!([6, 6, 6])]);
    for c in runs {
        assert!(
            c["refused_then"].as_str().unwrap().contains("pool_full"),
            "{c}"
        );
        for k in ["round_trip_via_holder", "round_trip_via_replica_i_mod_n"] {
            check_stat(k, &c[k]);
            assert_eq!(c[k]["success_rate"], 1.0, "{k}: {c}");
        }
    }
}

/// `--gvisor-only`: every figure of the three tiers and of hibernation with memory was taken
/// and succeeded; every hibernation kept the sandbox's memory.
fn quick_gvisor_bench_compares_the_tiers() {
    let out = Command::new(env!("CARGO_BIN_EXE_ampoule"))
        .args(["bench", "--quick", "--gvisor-only"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ampoule bench failed: {stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let g = &r["gvisor"];
    for k in [
        "python3_pass",
        "python3_print_1_plus_1",
        "ampoule_run_pass_namespaces",
        "ampoule_run_pass_gvisor",
    ] {
        check_stat(&format!("start.{k}"), &g["start"][k]);
    }
    for tier in ["gvisor", "namespaces_cold", "namespaces_zygote"] {
        check_stat(&format!("new_session.{tier}"), &g["new_session"][tier]);
        check_stat(
            &format!("warm_round_trip.{tier}"),
            &g["warm_round_trip"][tier],
        );
    }
    let h = &g["hibernation"];
    for k in [
        "hibernate_checkpoint",
        "resume_restore",
        "first_result_after_resume",
    ] {
        check_stat(&format!("hibernation.{k}"), &h[k]);
        assert_eq!(h[k]["success_rate"], 1.0, "{k}: {h}");
    }
    assert_eq!(h["hibernated_with_memory"], 2, "{h}");
    assert!(
        h["checkpoint_image_bytes_median"].as_u64().unwrap() > 0,
        "{h}"
    );
}

/// `--run-only`: bare python3, bwrap (when installed) and `ampoule run print(1)`, every
/// sample's output right, and each overhead taken against the same run's bare interpreter.
fn run_only_compares_the_three_in_one_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_ampoule"))
        .args(["bench", "--run-only"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ampoule bench failed: {stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["failures"], 0, "{r}");
    let bare = r["python3_pass_p50_ms"].as_f64().unwrap();
    let run = r["ampoule_run_print_p50_ms"].as_f64().unwrap();
    let over = r["ampoule_run_overhead_ms"].as_f64().unwrap();
    assert!((run - bare - over).abs() < 0.02, "{r}");
    if std::path::Path::new("/usr/bin/bwrap").exists() {
        assert!(r["bwrap_overhead_ms"].as_f64().is_some(), "{r}");
        // Every round gave a pair (no sample failed), ordered quartiles.
        let p = &r["ampoule_run_minus_bwrap_paired_ms"];
        assert_eq!(p["rounds"].as_u64(), r["samples"].as_u64(), "{r}");
        let (p25, p50, p75) = (
            p["p25_ms"].as_f64().unwrap(),
            p["p50_ms"].as_f64().unwrap(),
            p["p75_ms"].as_f64().unwrap(),
        );
        assert!(p25 <= p50 && p50 <= p75, "{r}");
    }
}

/// `--network-only`: both network pools (forked from a zygote, started cold) answered their new
/// sessions' first cell and reached the allowed test host through their gateways; the zygote
/// pool's sessions were forks (no cold fallback).
fn quick_network_bench_reports_both_pools() {
    let out = Command::new(env!("CARGO_BIN_EXE_ampoule"))
        .args(["bench", "--quick", "--network-only"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ampoule bench failed: {stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let net = &r["network"];
    for pool in ["zygote", "zygote_no_warm", "cold"] {
        check_stat(&format!("{pool}.first_result"), &net[pool]["first_result"]);
        check_stat(&format!("{pool}.then_fetch"), &net[pool]["then_fetch"]);
    }
    assert_eq!(net["zygote"]["zygote_cold_fallbacks"], 0, "{net}");
    assert_eq!(net["zygote_no_warm"]["zygote_cold_fallbacks"], 0, "{net}");
}

/// `--burst-only --quick`: one burst of 20 new sessions deleted and one held, every session
/// answered, and each burst's last answer reported.
fn quick_burst_bench_reports_each_burst() {
    let out = Command::new(env!("CARGO_BIN_EXE_ampoule"))
        .args(["bench", "--quick", "--burst-only"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ampoule bench failed: {stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = &r["burst"];
    assert_eq!(b["sessions_per_burst"], 20, "{b}");
    assert_eq!(b["bursts_with_a_failure"], 0, "{b}");
    for kind in ["deleted", "held"] {
        let last = b[kind]
            .as_array()
            .unwrap_or_else(|| panic!("no {kind}: {b}"));
        assert_eq!(last.len(), 1, "{b}");
        assert!(last[0].as_f64().is_some_and(|ms| ms > 0.0), "{b}");
    }
}

fn bench_refuses_without_root() {
    let out = Command::new(env!("CARGO_BIN_EXE_ampoule"))
        .args(["bench", "--quick"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ampoule bench needs root"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    let args = Arguments::from_args();
    let root = is_root();
    let trials = [
        (
            "quick_bench_reports_every_section",
            quick_bench_reports_every_section as fn(),
            (!root).then_some("ampoule bench needs root"),
        ),
        (
            "quick_cluster_bench_holds_three_times_the_sessions",
            quick_cluster_bench_holds_three_times_the_sessions,
            (!root).then_some("ampoule bench needs root"),
        ),
        (
            "quick_gvisor_bench_compares_the_tiers",
            quick_gvisor_bench_compares_the_tiers,
            if !root {
                Some("ampoule bench needs root")
            } else if ampoule_runtime::gvisor::find().is_none() {
                Some("runsc is not installed (apt-get install runsc)")
            } else {
                None
            },
        ),
        (
            "run_only_compares_the_three_in_one_run",
            run_only_compares_the_three_in_one_run,
            (!root).then_some("ampoule bench needs root"),
        ),
        (
            "quick_network_bench_reports_both_pools",
            quick_network_bench_reports_both_pools,
            (!root).then_some("ampoule bench needs root"),
        ),
        (
            "quick_burst_bench_reports_each_burst",
            quick_burst_bench_reports_each_burst,
            (!root).then_some("ampoule bench needs root"),
        ),
        (
            "bench_refuses_without_root",
            bench_refuses_without_root,
            root.then_some("as root there is no refusal to see"),
        ),
    ]
    .into_iter()
    .map(|(name, body, skip)| trial(name, body, skip))
    .collect();
    libtest_mimic::run(&args, trials).exit();
}
