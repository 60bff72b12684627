//! The `gvisor/` variant: every Python and shell probe again with `--isolation gvisor`.
//!
//! Each probe's program is prefixed with a line printing the kernel release it runs on
//! (`KERNEL <release>`), and every trial requires gVisor's (`4.4.0`): the attack ran against
//! the sentry, not the host kernel. The host checks (no process, mount or cgroup left, canaries
//! intact, the secret never printed) apply unchanged.
//!
//! Then the probe's own check must pass, except where it encodes the default tier's
//! *mechanism* rather than containment. Those exceptions, each with its reason:
//! * `kernel/` and `privilege/` probes measure which host-kernel system calls the code reaches
//!   (`ESCAPED … reached the kernel`, expected `EPERM` or `SIGSYS` from seccomp). On this tier
//!   every call is answered by the sentry, a user-space kernel whose own host calls are
//!   confined by gVisor's seccomp filter; the code reaches no host-kernel code. These pass on
//!   the kernel line alone.
//! * [`ANSWERED_BY_GVISOR`]: findings in other categories that name gVisor's own objects.
//! * Fork and thread bombs end with `EAGAIN` from `RLIMIT_NPROC`, which the sentry enforces,
//!   instead of a kill by the cgroup's `pids.max` (which here must leave room for the sentry's
//!   threads): the bomb is contained, the run ends, nothing is left behind.

use crate::jail::Outcome;
use crate::{Check, Probe};

/// Findings (substrings of `ESCAPED` lines) that are gVisor's objects, per probe.
const ANSWERED_BY_GVISOR: &[(&str, &[&str], &str)] = &[
    (
        "files/dev_is_minimal",
        &[
            "/dev has extra entries",
            "open /dev/tty failed",
            "open /dev/ptmx",
            "open /dev/pts/0",
            "open /dev/net/tun",
            "open /dev/fuse",
        ],
        "the sentry's own devices (ptmx, pts, tty); /dev/fuse and /dev/net/tun are empty \
         files (binds of /dev/null, checked by gvisor/fuse_masked)",
    ),
    (
        "files/host_directories_absent",
        &["unexpected top-level entries ['sys']", "/sys exists: []"],
        "/sys is an empty read-only tmpfs",
    ),
    (
        "files/mountinfo_shows_only_sandbox_mounts",
        &[
            "not a fresh tmpfs",
            "host device outside the expected binds",
            "unexpected mount",
            "unexpected scratch bind",
            "mount table mentions",
        ],
        "the sentry's mount table: 9p mounts served by the gofer, its own devpts and sysfs",
    ),
    (
        "files/no_inherited_descriptors",
        // The sentry numbers the three host files it was donated in the order it wraps them,
        // which varies (three orders seen so far): any assignment of its objects 1–3 to the
        // descriptors 0–2 is gVisor's own, nothing else is.
        &[
            "unexpected stdio: {0: 'host:[1]', 1: 'host:[2]', 2: 'host:[3]'}",
            "unexpected stdio: {0: 'host:[1]', 1: 'host:[3]', 2: 'host:[2]'}",
            "unexpected stdio: {0: 'host:[2]', 1: 'host:[1]', 2: 'host:[3]'}",
            "unexpected stdio: {0: 'host:[2]', 1: 'host:[3]', 2: 'host:[1]'}",
            "unexpected stdio: {0: 'host:[3]', 1: 'host:[1]', 2: 'host:[2]'}",
            "unexpected stdio: {0: 'host:[3]', 1: 'host:[2]', 2: 'host:[1]'}",
        ],
        "stdio is donated to the sentry and shows as its host-file objects",
    ),
    (
        "files/proc_environ_of_every_process",
        &["init's environment is readable"],
        "there is no ampoule init inside: pid 1 is the program itself",
    ),
    (
        "files/symlink_and_proc_root_tricks",
        &["list /proc/1/root succeeded"],
        "pid 1 is the program itself: /proc/1/root is its own root",
    ),
    (
        "network/outbound_unreachable",
        &["No route to host"],
        "the sentry's netstack has loopback only and answers EHOSTUNREACH",
    ),
    (
        "resources/realtime_priority",
        &["nice -20 granted"],
        "a priority inside the sentry's own scheduler: the sentry's host threads keep theirs",
    ),
    (
        "processes/signal_any_pid_and_group",
        &["'Function not implemented'"],
        "this gVisor has no pidfd_open (ENOSYS)",
    ),
];

/// Probes whose program is pid 1 on this tier or reads files gVisor lacks: the probe itself
/// cannot stage its attack, so they only need the kernel line and the host checks.
const NOT_STAGED: &[(&str, &str)] = &[
    (
        "processes/signal_sandbox_init",
        "pid 1 is the program itself (no ampoule init inside gVisor)",
    ),
    ("processes/ipc_namespace", "gVisor has no /proc/sysvipc"),
];

/// Bombs contained by `RLIMIT_NPROC` (see the module documentation).
const BOMBS: &[&str] = &[
    "resources/fork_bomb",
    "resources/bash_fork_bomb",
    "resources/thread_bomb",
];

/// The probe as the gVisor variant runs it: its program prefixed by the kernel line.
pub(crate) fn variant(p: &Probe) -> Option<Probe> {
    let marker = match p.setup.lang {
        "python" => {
            "import os as _ampoule_os; print('KERNEL', _ampoule_os.uname().release, flush=True)\n"
        }
        "shell" => "echo \"KERNEL $(uname -r)\"\n",
        _ => return None,
    };
    let mut v = p.variant_named("gvisor", &["--isolation", "gvisor"], p.check);
    v.code = Box::leak(format!("{marker}{}", p.code).into_boxed_str());
    Some(v)
}

/// The check of `gvisor/<name>`; `own` is the probe's own check.
pub(crate) fn check(name: &str, own: Check, o: &Outcome) -> Result<(), String> {
    let out = o.output();
    let kernel = out
        .lines()
        .find_map(|l| l.strip_prefix("KERNEL "))
        .map(str::trim);
    if kernel != Some("4.4.0") {
        return Err(format!(
            "the program did not run on gVisor's kernel (release {kernel:?}):\n{out}"
        ));
    }
    if name.starts_with("kernel/") || name.starts_with("privilege/") {
        return Ok(());
    }
    if NOT_STAGED.iter().any(|(n, _)| *n == name) {
        return Ok(());
    }
    if BOMBS.contains(&name) {
        if out.contains("ESCAPED") {
            return Err(format!("the bomb escaped:\n{out}"));
        }
        if own(o).is_ok()
            || out.contains("Resource temporarily unavailable")
            || out.contains("Cannot fork")
            || out.contains("can't start new thread")
        {
            return Ok(());
        }
        return Err(format!(
            "the bomb was not stopped by a process limit:\n{out}"
        ));
    }
    let own_result = own(o);
    if own_result.is_ok() {
        return Ok(());
    }
    let Some((_, allowed, _)) = ANSWERED_BY_GVISOR.iter().find(|(n, _, _)| *n == name) else {
        return own_result;
    };
    let unexplained: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("ESCAPED") && !allowed.iter().any(|a| l.contains(a)))
        .collect();
    if !unexplained.is_empty() || out.contains("INVALID") {
        return Err(format!(
            "contained findings beyond gVisor's own objects:\n{out}"
        ));
    }
    Ok(())
}

/// Tier-specific probes: what the gVisor tier itself promises.
pub(crate) fn probes() -> Vec<Probe> {
    vec![
        crate::py(
            "gvisor/fuse_masked",
            r#"
import os
for dev in ("/dev/fuse", "/dev/net/tun"):
    st = os.stat(dev)
    if st.st_rdev != 0:
        print("ESCAPED", dev, "is a device", os.major(st.st_rdev), os.minor(st.st_rdev))
    else:
        print("BLOCKED", dev, "is an empty file")
print("KERNEL", os.uname().release)
print("BLOCKED /proc/version:", open("/proc/version").read().strip()) if "4.4.0" in open("/proc/version").read() else print("ESCAPED host /proc/version")
"#,
            crate::expect_blocked,
        )
        .args(&["--isolation", "gvisor"]),
    ]
}
