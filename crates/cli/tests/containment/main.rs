//! The containment suite: hostile programs run through the public path (`ampoule run`), each
//! inside a throw-away outer namespace (see `jail.rs`), each asserting that the attack was
//! stopped and that the host is unchanged afterwards (no process, mount or cgroup left, canary
//! files intact, the canary secret never in the output).
//!
//! Convention for probe programs: print `BLOCKED <what>` for every attempt that failed and
//! `ESCAPED <what>` for every attempt that succeeded, and `INVALID <why>` when the attack could
//! not be staged (so the probe would prove nothing). `expect_blocked` passes only when at least
//! one `BLOCKED` and no `ESCAPED` or `INVALID` line was printed and the program ran to its end,
//! so a probe that crashes before or while trying fails too.
//!
//! Run with `cargo test -p ampoule-cli --test containment` (as root). Without root the suite
//! prints why and reports every probe as ignored, never as passed. `CONTAINMENT_VERBOSE=1`
//! prints each probe's output, passing or not; `CONTAINMENT_DUMP=DIR` writes the programs to
//! `DIR` instead of running them.

/// Python helpers prepended to probes that make raw system calls: `libc`, `raw`, `deny`,
/// `refused` and `ename` (documented in the Python below). Use as `concat!(py_prelude!(), r#"..."#)`.
macro_rules! py_prelude {
    () => {
        r#"
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def ename(e):
    return errno.errorcode.get(e, str(e))

def _arg(a):
    if isinstance(a, str):
        a = a.encode()
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    if isinstance(a, (ctypes.Array, ctypes.Structure, ctypes._SimpleCData)):
        return ctypes.byref(a)
    return ctypes.c_long(a)

def raw(nr, *args):
    """One raw system call: (result, errno)."""
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    return r, (ctypes.get_errno() if r == -1 else 0)

def deny(what, nr, *args, want=(errno.EPERM,)):
    """The call must fail with an errno in `want` (EPERM: refused by seccomp or by the kernel's
    permission check). Success, or any other errno (the call reached kernel code it should
    never reach), is an escape."""
    r, e = raw(nr, *args)
    if r != -1:
        print("ESCAPED", what, "returned", r)
    elif e not in want:
        print("ESCAPED", what, "reached the kernel:", ename(e), "(wanted", "/".join(ename(w) for w in want) + ")")
    else:
        print("BLOCKED", what, ename(e))
    return r

def refused(what, fn, *args, want=None):
    """fn(*args) must raise OSError (with an errno in `want`, when given)."""
    try:
        r = fn(*args)
    except OSError as ex:
        if want is None or ex.errno in want:
            print("BLOCKED", what, ename(ex.errno) if ex.errno else ex)
        else:
            print("ESCAPED", what, "failed with an unexpected error:", ex)
        return None
    print("ESCAPED", what, "succeeded:", repr(r)[:200])
    return r
"#
    };
}

mod files;
mod gvisor;
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
    /// How the probe runs in the `command/` variant.
    pub(crate) command: AsCommand,
}

/// How a probe runs as a command entered into a session's sandbox (`ampoule run
/// --as-command`, the `command/` variant).
#[derive(Clone, Copy)]
pub(crate) enum AsCommand {
    /// Like the program, with the same check.
    Same,
    /// With this check instead: the probe's own encodes what only holds for the sandbox's
    /// program (say so where it is set).
    Check(Check),
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
        command: AsCommand::Same,
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
        command: AsCommand::Same,
    }
}

impl Probe {
    /// Adds `ampoule run` arguments.
    pub(crate) fn args(mut self, args: &[&str]) -> Self {
        self.setup.args = args.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Another check for the `command/` variant (the probe's own assumes the sandbox's
    /// program).
    pub(crate) fn command_check(mut self, check: Check) -> Self {
        self.command = AsCommand::Check(check);
        self
    }

    /// [`Probe::variant`] for the variant modules.
    pub(crate) fn variant_named(&self, prefix: &str, extra: &[&str], check: Check) -> Probe {
        self.variant(prefix, extra, check)
    }

    /// This probe under `prefix/`, with more `ampoule run` arguments and `check`.
    fn variant(&self, prefix: &str, extra: &[&str], check: Check) -> Probe {
        let mut setup = self.setup.clone();
        setup.args.extend(extra.iter().map(|s| (*s).to_owned()));
        Probe {
            name: Box::leak(format!("{prefix}/{}", self.name).into_boxed_str()),
            code: self.code,
            setup,
            check,
            command: self.command,
        }
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
    if out.contains("INVALID") {
        return Err(format!("the probe could not stage its attack:\n{out}"));
    }
    if !out.contains("BLOCKED") {
        return Err(format!(
            "the probe did not report an outcome (status {}):\n{out}",
            o.result.status
        ));
    }
    // A probe that crashed half-way skipped the rest of its attempts.
    if o.result.status != ExecutionStatus::Succeeded {
        return Err(format!(
            "the probe did not run to its end ({} / {:?}):\n{out}",
            o.result.status, o.result.limit
        ));
    }
    Ok(())
}

/// The process was killed by seccomp (`SIGSYS`) after printing `BEFORE` and before `AFTER`.
pub(crate) fn expect_sigsys(o: &Outcome) -> Result<(), String> {
    let out = o.output();
    if !out.contains("BEFORE") {
        return Err(format!("the probe never reached the attempt:\n{out}"));
    }
    if out.contains("AFTER") || out.contains("ESCAPED") {
        return Err(format!("the process survived the attempt:\n{out}"));
    }
    if o.result.signal != Some(SIGSYS) || o.rc != 128 + SIGSYS {
        return Err(format!(
            "expected death by SIGSYS (31), got signal {:?}, rc {} ({}):\n{out}",
            o.result.signal, o.rc, o.result.status
        ));
    }
    Ok(())
}

/// The signal seccomp kills with.
const SIGSYS: i32 = 31;

/// Every `KEY=value` the jail's `after` script printed matches.
pub(crate) fn expect_vars(o: &Outcome, want: &[(&str, &str)]) -> Result<(), String> {
    for (k, v) in want {
        let got = o.vars.get(*k).map(String::as_str);
        if got != Some(*v) {
            return Err(format!(
                "jail variable {k}: expected {v:?}, got {got:?} (all: {:?})\n{}",
                o.vars,
                o.output()
            ));
        }
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
    if !o.mounts_added.is_empty() || !o.mounts_removed.is_empty() {
        return Err(format!(
            "the jail's mounts changed: added {:?}, removed {:?}",
            o.mounts_added, o.mounts_removed
        ));
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

/// Why the `gvisor/` trials cannot run here (no `runsc`), or `None`. In CI (`CI` set) a
/// missing runsc is a failure: `scripts/deps.sh` installs it.
fn gvisor_unavailable() -> Option<String> {
    if ampoule_runtime::gvisor::find().is_some() {
        return None;
    }
    let why = "runsc is not installed (scripts/deps.sh installs it)".to_owned();
    if std::env::var_os("CI").is_some() {
        eprintln!("containment: {why}, and CI is set: failing");
        std::process::exit(1);
    }
    Some(why)
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
    // CONTAINMENT_VERBOSE=1 shows what every probe printed (to review what a passing probe
    // actually tried).
    let verbose = std::env::var_os("CONTAINMENT_VERBOSE").is_some();
    let probes = all_probes();
    // CONTAINMENT_DUMP=DIR writes every probe's program to DIR (to run it outside the sandbox
    // and watch it report ESCAPED) and runs nothing.
    if let Some(dir) = std::env::var_os("CONTAINMENT_DUMP") {
        let dir = std::path::Path::new(&dir);
        for p in &probes {
            let ext = if p.setup.lang == "shell" { "sh" } else { "py" };
            let path = dir.join(format!("{}.{ext}", p.name.replace('/', "__")));
            if let Err(e) =
                std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, p.code))
            {
                eprintln!("{}: {e}", path.display());
                std::process::exit(1);
            }
        }
        eprintln!("{} probes written to {}", probes.len(), dir.display());
        return;
    }
    // Every Python probe again against a session forked from a zygote (`ampoule run --zygote`):
    // those sessions build their layers themselves (kernels/python/zygote.py), so they must
    // stop the same attacks.
    let forked: Vec<Probe> = probes
        .iter()
        .filter(|p| p.setup.lang == "python" && !p.setup.args.iter().any(|a| a == "--zygote"))
        .map(|p| p.variant("zygote", &["--zygote"], p.check))
        .collect();
    // Every Python and shell probe again as a command entered into a live session's sandbox
    // (`ampoule run --as-command`), the way sandbox processes and E2B commands run: an entered
    // process joins the sandbox itself (runtime/src/enter.rs), so it must be held to the same
    // walls. Python runs in a session forked from a zygote (the server's default for Python
    // pools), shell in a cold Python session.
    let commands: Vec<Probe> = probes
        .iter()
        .filter(|p| p.setup.lang == "python" || p.setup.lang == "shell")
        .map(|p| {
            let check = match p.command {
                AsCommand::Same => p.check,
                AsCommand::Check(c) => c,
            };
            let zygote = p.setup.lang == "python" && !p.setup.args.iter().any(|a| a == "--zygote");
            let extra: &[&str] = if zygote {
                &["--as-command", "--zygote"]
            } else {
                &["--as-command"]
            };
            p.variant("command", extra, check)
        })
        .collect();
    // Every Python and shell probe again on the gVisor tier (`ampoule run --isolation
    // gvisor`, see gvisor.rs for the check): the same attacks, with the code on gVisor's
    // kernel instead of the host's. Probes with network access are left out (the tier has
    // loopback only).
    let gvisor_skip = gvisor_unavailable();
    if let Some(why) = &gvisor_skip {
        eprintln!("gvisor trials ignored: {why}");
    }
    let gvisor: Vec<Probe> = probes
        .iter()
        .filter(|p| {
            !p.setup
                .args
                .iter()
                .any(|a| a == "--zygote" || a == "--allow-host" || a == "--as-command")
        })
        .filter_map(gvisor::variant)
        .chain(gvisor::probes())
        .collect();
    let gvisor_names: std::collections::HashSet<&'static str> =
        gvisor.iter().map(|p| p.name).collect();
    let trials = probes
        .into_iter()
        .chain(forked)
        .chain(commands)
        .chain(gvisor)
        .map(|p| {
            let ignored =
                skip.is_some() || (gvisor_skip.is_some() && gvisor_names.contains(p.name));
            Trial::test(p.name, move || {
                let o = jail::run(p.code, &p.setup).map_err(Failed::from)?;
                if verbose {
                    eprintln!(
                        "--- {} ({} / {:?} / signal {:?} / rc {}, {:.0} ms) vars {:?}\n{}",
                        p.name,
                        o.result.status,
                        o.result.limit,
                        o.result.signal,
                        o.rc,
                        o.result.duration_ms,
                        o.vars,
                        o.output().trim_end()
                    );
                }
                host_unchanged(&o).map_err(Failed::from)?;
                match p.name.strip_prefix("gvisor/") {
                    Some(name) => gvisor::check(name, p.check, &o).map_err(Failed::from),
                    None => (p.check)(&o).map_err(Failed::from),
                }
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
