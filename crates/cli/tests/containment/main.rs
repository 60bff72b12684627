//! The containment suite: hostile programs run through the public path (`ampoule run`), each
//! inside a throw-away outer namespace (see `jail.rs`), each asserting that the attack was
//! stopped and that the host is unchanged afterwards (no process, mount or cgroup left, canary
//! files intact, the canary secret never in the output).
//!
//! Convention for probe programs: print `BLOCKED <what>` for every attempt that failed and
//! `ESCAPED <what>` for every attempt that succeeded. `expect_blocked` passes only when at
//! least one `BLOCKED` and no `ESCAPED` line was printed, so a probe that crashes before trying
//! (and prints nothing) fails too.
//!
//! Run with `cargo test -p ampoule-cli --test containment` (as root). Without root the suite
//! prints why and reports every probe as ignored, never as passed.

mod files;
mod jail;
mod kernel;
mod network;
mod privilege;
mod processes;
mod resources;

use ampoule_types::{ExecutionStatus, LimitKind};
use jail::{CANARY, Outcome, Setup};
use libtest_mimic::{Arguments, Failed, Trial};

/// A check on the outcome of one probe.
pub(crate) type Check = fn(&Outcome) -> Result<(), String>;

/// One hostile program.
pub(crate) struct Probe {
    /// `category/name`.
    pub(crate) name: &'static str,
    /// The program.
    pub(crate) code: &'static str,
    /// Jail setup and extra `ampoule run` arguments.
    pub(crate) setup: Setup,
    /// What must be true afterwards (on top of the host checks).
    pub(crate) check: Check,
}

/// A Python probe with the default setup.
pub(crate) fn py(name: &'static str, code: &'static str, check: Check) -> Probe {
    Probe {
        name,
        code,
        setup: Setup {
            lang: "python",
            ..Setup::default()
        },
        check,
    }
}

/// A shell probe with the default setup.
pub(crate) fn sh(name: &'static str, code: &'static str, check: Check) -> Probe {
    Probe {
        name,
        code,
        setup: Setup {
            lang: "shell",
            ..Setup::default()
        },
        check,
    }
}

impl Probe {
    /// Adds `ampoule run` arguments.
    pub(crate) fn args(mut self, args: &[&str]) -> Self {
        self.setup.args = args.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Adds jail commands around the run.
    pub(crate) fn around(mut self, before: &str, after: &str) -> Self {
        self.setup.before = before.to_owned();
        self.setup.after = after.to_owned();
        self
    }
}

/// The attack printed `BLOCKED` and never `ESCAPED`.
pub(crate) fn expect_blocked(o: &Outcome) -> Result<(), String> {
    let out = o.output();
    if out.contains("ESCAPED") {
        return Err(format!("the attack succeeded:\n{out}"));
    }
    if !out.contains("BLOCKED") {
        return Err(format!(
            "the probe did not report an outcome (status {}):\n{out}",
            o.result.status
        ));
    }
    Ok(())
}

/// The run was stopped by `limit`, with the matching status and exit code.
pub(crate) fn expect_limit(o: &Outcome, limit: LimitKind) -> Result<(), String> {
    let want_status = if limit == LimitKind::Time {
        ExecutionStatus::TimedOut
    } else {
        ExecutionStatus::Killed
    };
    let want_rc = if limit == LimitKind::Time { 124 } else { 137 };
    if o.result.status != want_status || o.result.limit != Some(limit) || o.rc != want_rc {
        return Err(format!(
            "expected {want_status} by the {limit} limit (rc {want_rc}), got {} / {:?} / rc {}\n{}",
            o.result.status,
            o.result.limit,
            o.rc,
            o.output()
        ));
    }
    Ok(())
}

/// What every probe must leave behind: nothing.
fn host_unchanged(o: &Outcome) -> Result<(), String> {
    if o.rc == 125 {
        return Err(format!("ampoule itself failed: {}", o.ampoule_stderr));
    }
    if !o.leftover_procs.is_empty() {
        return Err(format!("processes left behind: {:?}", o.leftover_procs));
    }
    if o.mounts.0 != o.mounts.1 {
        return Err(format!("mount count changed: {} → {}", o.mounts.0, o.mounts.1));
    }
    if !o.leftover_cgroups.is_empty() {
        return Err(format!("cgroups left behind: {:?}", o.leftover_cgroups));
    }
    if !o.canaries_intact {
        return Err("a canary file on the host was changed".into());
    }
    if o.output().contains(CANARY) || o.ampoule_stderr.contains(CANARY) {
        return Err(format!("the canary secret leaked:\n{}", o.output()));
    }
    Ok(())
}

fn all_probes() -> Vec<Probe> {
    let mut v = Vec::new();
    v.extend(files::probes());
    v.extend(processes::probes());
    v.extend(privilege::probes());
    v.extend(kernel::probes());
    v.extend(network::probes());
    v.extend(resources::probes());
    v
}

fn main() {
    let mut args = Arguments::from_args();
    // Each probe is heavy (a jail, a sandbox); two at a time suits a 2-core machine.
    if args.test_threads.is_none() {
        args.test_threads = Some(2);
    }
    let skip = jail::unavailable();
    if let Some(why) = &skip {
        eprintln!("containment suite skipped: {why}");
    }
    let probes = all_probes();
    let trials = probes
        .into_iter()
        .map(|p| {
            let ignored = skip.is_some();
            Trial::test(p.name, move || {
                let o = jail::run(p.code, &p.setup).map_err(Failed::from)?;
                host_unchanged(&o).map_err(Failed::from)?;
                (p.check)(&o).map_err(Failed::from)
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
