//! `ampoule bench --run-only`: issue 19's comparison alone, in a few seconds — a bare
//! `python3 -c pass`, the same under bubblewrap, and `ampoule run` of `print(1)`, interleaved
//! sample by sample, in rotating orders (see [`round`]), so the machine's noise hits all three
//! alike. What counts is each one's
//! overhead over the bare interpreter *in the same run* (the goal: `ampoule run`'s at most
//! bubblewrap's + 1 ms), and, steadier on a noisy machine, the median of `ampoule run`'s time
//! less bubblewrap's round by round (see [`Paired`]). The full `ampoule bench` measures the
//! same three among its baselines.

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Result;
use serde_json::json;

use crate::bench::{PYTHON, load_average, round2, time_process as time};

/// Samples of each of the three: enough for the paired differences' quartiles to settle
/// (their spread here is ~3 ms), in about ten seconds.
pub(crate) const SAMPLES: usize = 100;

/// `ampoule run`'s time less bubblewrap's, round by round (each pair from one [`round`]): a
/// slow spell of the machine moves both samples of a round alike, so the median of these
/// differences holds steadier than the difference of the two medians (docs/BENCHMARKS.md,
/// issue 19, rounds four and eleven, where `scripts/bench-ab-run.py` does the same).
#[derive(Default)]
pub(crate) struct Paired {
    bwrap: Option<f64>,
    run: Option<f64>,
    diffs: Vec<f64>,
}

impl Paired {
    /// Notes one sample of the current round.
    pub(crate) fn note(&mut self, which: Which, sample: &Result<f64>) {
        let Ok(ms) = sample else { return };
        match which {
            Which::Bubblewrap => self.bwrap = Some(*ms),
            Which::AmpouleRun => self.run = Some(*ms),
            Which::Bare => {}
        }
    }

    /// Ends the round: its difference counts when both samples succeeded.
    pub(crate) fn end_round(&mut self) {
        if let (Some(b), Some(r)) = (self.bwrap.take(), self.run.take()) {
            self.diffs.push(r - b);
        }
    }

    /// Quartiles and median of the differences, with how many rounds gave one; `null` without
    /// bubblewrap.
    pub(crate) fn summary(&self) -> serde_json::Value {
        let mut d = self.diffs.clone();
        d.sort_by(f64::total_cmp);
        if d.is_empty() {
            return serde_json::Value::Null;
        }
        let at = |q: f64| round2(d[((d.len() - 1) as f64 * q).round() as usize]);
        json!({
            "rounds": d.len(),
            "p25_ms": at(0.25),
            "p50_ms": median(&d).map(round2),
            "p75_ms": at(0.75),
        })
    }
}

/// The three commands of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Bare,
    Bubblewrap,
    AmpouleRun,
}

/// Round `i` of the comparison: each of the three once (bubblewrap only when `bwrap` names
/// it), back to back, in the `i`-th of their six orders. What a run leaves the kernel to finish
/// after it has answered (its network namespace's clean-up; `ampoule run`'s outer init, still
/// exiting) lands on whichever sample comes next: over every six rounds each command follows
/// each other equally often, so that falls on all alike.
pub(crate) fn round(
    i: usize,
    exe: &Path,
    bwrap: Option<&str>,
    mut record: impl FnMut(Which, Result<f64>),
) {
    use Which::{AmpouleRun as R, Bare as P, Bubblewrap as B};
    const ORDERS: [[Which; 3]; 6] = [
        [P, B, R],
        [P, R, B],
        [B, P, R],
        [B, R, P],
        [R, P, B],
        [R, B, P],
    ];
    for which in ORDERS[i % ORDERS.len()] {
        let sample = match which {
            P => time(bare(), None, ""),
            B => match bwrap {
                Some(b) => time(bubblewrap(b), None, ""),
                None => continue,
            },
            R => time(ampoule_run(exe), Some(b"print(1)\n"), "1\n"),
        };
        record(which, sample);
    }
}

/// Runs the comparison and prints one JSON object on stdout.
pub(crate) fn run(exe: &Path, samples: usize) -> Result<ExitCode> {
    let bwrap = bwrap_binary();
    let load_start = load_average();
    // Warm the page cache once.
    let _ = time(bare(), None, "");
    if let Some(b) = bwrap {
        let _ = time(bubblewrap(b), None, "");
    }
    let _ = time(ampoule_run(exe), Some(b"print(1)\n"), "1\n");
    let (mut bare_ms, mut bwrap_ms, mut run_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors = Vec::new();
    let mut paired = Paired::default();
    for i in 0..samples {
        round(i, exe, bwrap, |which, sample| {
            paired.note(which, &sample);
            let into = match which {
                Which::Bare => &mut bare_ms,
                Which::Bubblewrap => &mut bwrap_ms,
                Which::AmpouleRun => &mut run_ms,
            };
            keep(sample, into, &mut errors);
        });
        paired.end_round();
    }
    let bare_p50 = median(&bare_ms);
    let over = |v: &[f64]| match (median(v), bare_p50) {
        (Some(m), Some(b)) => Some(round2(m - b)),
        _ => None,
    };
    let report = json!({
        "build": crate::bench::build_kind(),
        "samples": samples,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "python3_pass_p50_ms": bare_p50.map(round2),
        "bwrap_python3_pass_p50_ms": median(&bwrap_ms).map(round2),
        "ampoule_run_print_p50_ms": median(&run_ms).map(round2),
        "bwrap_overhead_ms": over(&bwrap_ms),
        "ampoule_run_overhead_ms": over(&run_ms),
        "ampoule_run_minus_bwrap_paired_ms": paired.summary(),
        "failures": errors.len(),
        "first_error": errors.first(),
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report)?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// `python3 -c pass`.
pub(crate) fn bare() -> Command {
    let mut c = Command::new(PYTHON);
    c.args(["-c", "pass"]);
    c
}

/// `python3 -c pass` under bubblewrap (`bin`), every namespace unshared.
pub(crate) fn bubblewrap(bin: &str) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/bin",
        "/bin",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        PYTHON,
        "-c",
        "pass",
    ]);
    c
}

/// `ampoule run -` (the code on stdin).
pub(crate) fn ampoule_run(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    c.args(["run", "-"]);
    c
}

fn keep(r: Result<f64>, into: &mut Vec<f64>, errors: &mut Vec<String>) {
    match r {
        Ok(ms) => into.push(ms),
        Err(e) => errors.push(format!("{e:#}")),
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

/// Where bubblewrap is installed, if it is.
pub(crate) fn bwrap_binary() -> Option<&'static str> {
    ["/usr/bin/bwrap", "/bin/bwrap"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}
