//! `ampoule doctor`: which isolation layers and runtimes work on this host, each with a fix.
//!
//! The decisive check is end to end: a real sandbox runs a shell that reports its own view
//! (uid, capabilities, seccomp, no_new_privs, pid namespace) from inside. The other checks
//! explain what is missing when that fails, and what is weaker in the current mode.

use ampoule_types::{Language, Limits};
use serde::Serialize;

use crate::cgroup::CgroupVersion;
use crate::host::Host;
use crate::language::{Interpreter, install_hint};
use crate::sandbox::{SANDBOX_UID, SandboxConfig};
use crate::seccomp::SeccompPolicy;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Works.
    Ok,
    /// Works, but weaker than it could be.
    Warn,
    /// Does not work.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// The outcome.
    pub level: Level,
    /// What we saw.
    pub detail: String,
    /// A one-line fix, when something is missing.
    pub fix: Option<String>,
}

fn check(name: &str, level: Level, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check {
        name: name.to_owned(),
        level,
        detail: detail.into(),
        fix: fix.map(str::to_owned),
    }
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Runs every check. Never fails: a failure is a line of the report.
pub async fn run() -> Vec<Check> {
    let mut out = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    out.push(check(
        "mode",
        Level::Ok,
        if root {
            "root: unique host uid per sandbox, cgroup limits, mounts owned by the initial namespace"
        } else {
            "unprivileged: sandboxes share your uid; limits need a delegated cgroup"
        },
        None,
    ));

    // User namespaces.
    let max_userns = read_trim("/proc/sys/user/max_user_namespaces")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    let debian_knob = read_trim("/proc/sys/kernel/unprivileged_userns_clone");
    let apparmor = read_trim("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    if max_userns == 0 {
        out.push(check(
            "user namespaces",
            Level::Fail,
            "user.max_user_namespaces = 0",
            Some("sysctl -w user.max_user_namespaces=65536"),
        ));
    } else if debian_knob.as_deref() == Some("0") {
        out.push(check(
            "user namespaces",
            Level::Fail,
            "kernel.unprivileged_userns_clone = 0",
            Some("sysctl -w kernel.unprivileged_userns_clone=1"),
        ));
    } else if apparmor.as_deref() == Some("1") {
        out.push(check(
            "user namespaces",
            Level::Warn,
            "AppArmor restricts unprivileged user namespaces",
            Some("add an AppArmor profile allowing userns for ampoule, or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
        ));
    } else {
        out.push(check(
            "user namespaces",
            Level::Ok,
            format!("allowed (max {max_userns})"),
            None,
        ));
    }

    // Seccomp.
    match SeccompPolicy::default_policy() {
        Ok(p) => out.push(check(
            "seccomp",
            Level::Ok,
            format!(
                "default policy: {} BPF instructions, compiled at build time",
                p.instructions()
            ),
            None,
        )),
        Err(e) => out.push(check(
            "seccomp",
            Level::Fail,
            e.to_string(),
            Some("rebuild ampoule; the embedded policy is invalid"),
        )),
    }

    // Landlock.
    match crate::sys::landlock_abi() {
        Ok(abi) if abi >= 6 => out.push(check(
            "landlock",
            Level::Ok,
            format!("ABI {abi}: files, TCP, abstract sockets and signals"),
            None,
        )),
        Ok(abi) => out.push(check(
            "landlock",
            Level::Warn,
            format!("ABI {abi}: enforced for what this ABI covers"),
            Some("use a kernel ≥ 6.12 for the full Landlock layer"),
        )),
        Err(e) => out.push(check(
            "landlock",
            Level::Warn,
            format!("not available ({e}); the other layers still apply"),
            Some("boot with lsm=...,landlock (kernel ≥ 5.13)"),
        )),
    }

    // Cgroups.
    let host = Host::detect();
    match &host {
        Ok(h) => match &h.cgroups {
            Some(cg) => out.push(check(
                "cgroups",
                Level::Ok,
                format!(
                    "{} with {} under {}",
                    match cg.version() {
                        CgroupVersion::V1 => "v1",
                        CgroupVersion::V2 => "v2",
                    },
                    cg.controllers().join(", "),
                    cg.base_dirs()
                        .next()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
                None,
            )),
            None if root => out.push(check(
                "cgroups",
                Level::Fail,
                "no usable memory+pids controllers: memory, process and CPU limits are off",
                Some("mount cgroup v2 with the memory and pids controllers enabled"),
            )),
            None => out.push(check(
                "cgroups",
                Level::Warn,
                "no delegated cgroup: memory, process and CPU limits are off (time, disk and output limits still apply)",
                Some("run under `systemd-run --user --scope -p Delegate=yes`, or run as root"),
            )),
        },
        Err(e) => out.push(check(
            "runtime directory",
            Level::Fail,
            e.to_string(),
            Some("make the runtime directory writable (root: /run/ampoule)"),
        )),
    }

    out.push(egress(root));

    // End to end: a real sandbox reports what it sees from inside.
    if let Ok(host) = &host {
        out.push(end_to_end(host).await);
    }

    out.push(per_user_limits(root));
    out.push(durable(root, host.as_ref().ok()));
    out.push(criu());
    out.push(gvisor(host.as_ref().ok()));

    // Language runtimes.
    for lang in Language::ONE_SHOT {
        match Interpreter::find(lang) {
            Ok(i) => out.push(check(
                &format!("runtime {lang}"),
                Level::Ok,
                format!(
                    "{} ({})",
                    i.path.display(),
                    i.version().unwrap_or_else(|| "version unknown".into())
                ),
                None,
            )),
            Err(_) => out.push(check(
                &format!("runtime {lang}"),
                Level::Fail,
                "not installed",
                Some(install_hint(lang)),
            )),
        }
    }
    out
}

/// The host's per-user inotify limits, which a zygote raises to hold its sessions (see
/// [`crate::ucounts`]), and what each zygote-born session gets.
fn per_user_limits(root: bool) -> Check {
    use crate::ucounts::{SESSION_INOTIFY_INSTANCES, SESSION_INOTIFY_WATCHES, host_inotify_limits};
    match host_inotify_limits() {
        Ok((instances, watches)) => {
            let fit = (instances / SESSION_INOTIFY_INSTANCES)
                .min(watches / SESSION_INOTIFY_WATCHES)
                .saturating_sub(1);
            check(
                "per-user limits",
                Level::Ok,
                format!(
                    "each session has its own uid; a zygote-born one may hold \
                     {SESSION_INOTIFY_INSTANCES} inotify instances and {SESSION_INOTIFY_WATCHES} \
                     watches; the host's per-user maximums ({instances}, {watches}) hold {fit} \
                     such sessions per zygote now{}",
                    if root {
                        ", and a zygote raises them to its pool's max_sessions"
                    } else {
                        ""
                    }
                ),
                None,
            )
        }
        Err(e) => check("per-user limits", Level::Warn, e.to_string(), None),
    }
}

/// Whether sandboxes can be given allowlisted network access (the egress gateway).
fn egress(root: bool) -> Check {
    if !root {
        return check(
            "egress",
            Level::Warn,
            "unprivileged: network allowlists are refused (the veth pair and nftables rules need \
             real root); sandboxes have loopback only",
            Some("run ampoule as root to allow sandboxes named hosts"),
        );
    }
    let nft = crate::network::nft_binary().is_some();
    match crate::network::table_installed() {
        Ok(true) => check(
            "egress",
            Level::Ok,
            "nftables table `inet ampoule` in place: allowlisted sandboxes reach only the egress gateway",
            None,
        ),
        Ok(false) if nft => check(
            "egress",
            Level::Ok,
            "nft available; the `inet ampoule` table is installed with the first allowlisted sandbox",
            None,
        ),
        Ok(false) => check(
            "egress",
            Level::Warn,
            "nft is not installed: sandboxes with allowed hosts cannot start",
            Some("apt-get install nftables"),
        ),
        Err(e) => check(
            "egress",
            Level::Warn,
            format!("nftables is not usable ({e}): sandboxes with allowed hosts cannot start"),
            Some("modprobe nf_tables, or use a kernel with nftables"),
        ),
    }
}

async fn end_to_end(host: &Host) -> Check {
    let Ok(sh) = Interpreter::find(Language::Shell) else {
        return check(
            "sandbox",
            Level::Fail,
            "no shell to probe with",
            Some("apt-get install bash"),
        );
    };
    let mut cfg = SandboxConfig::new(vec![
        sh.path.to_string_lossy().into_owned(),
        "-c".into(),
        "id -u; grep -E '^(CapEff|Seccomp|NoNewPrivs):' /proc/self/status; ls /proc | grep -c '^[0-9]'; hostname"
            .into(),
    ]);
    cfg.limits = Limits {
        timeout_s: 10.0,
        ..Limits::default()
    };
    match crate::run::run(host, &cfg, crate::run::Echo::Off, |_| Ok(())).await {
        Ok((r, sb)) => {
            let s = &r.stdout;
            let ok = s.starts_with(&format!("{SANDBOX_UID}\n"))
                && s.contains("CapEff:\t0000000000000000")
                && s.contains("Seccomp:\t2")
                && s.contains("NoNewPrivs:\t1")
                && s.trim_end().ends_with("sandbox");
            if ok && r.status == ampoule_types::ExecutionStatus::Succeeded {
                check(
                    "sandbox",
                    Level::Ok,
                    format!(
                        "uid {SANDBOX_UID}, no capabilities, seccomp on, own pid namespace, landlock {}; {:.1} ms",
                        sb.landlock(),
                        r.duration_ms
                    ),
                    None,
                )
            } else {
                check(
                    "sandbox",
                    Level::Fail,
                    format!("the sandbox ran but its view is wrong: {s:?} {}", r.stderr),
                    Some("report this as a bug with the output of `ampoule doctor --json`"),
                )
            }
        }
        Err(e) => check(
            "sandbox",
            Level::Fail,
            e.to_string(),
            Some(
                "fix the failing layer above (user namespaces, cgroups), then re-run ampoule doctor",
            ),
        ),
    }
}

/// Whether sandboxes can be durable here: disk images (loop devices, mkfs.ext4) and a
/// freezer for pausing.
fn durable(root: bool, host: Option<&Host>) -> Check {
    let freezer = host
        .and_then(|h| h.cgroups.as_ref())
        .is_some_and(|c| c.controllers().contains(&"freezer") || c.version() == CgroupVersion::V2);
    match (crate::disk::check(root), freezer) {
        (Ok(()), true) => check(
            "durable sandboxes",
            Level::Ok,
            "disk images on loop devices, pause through the cgroup freezer",
            None,
        ),
        (Ok(()), false) => check(
            "durable sandboxes",
            Level::Warn,
            "disk images work; no cgroup freezer, so sandboxes cannot be paused",
            Some("mount the cgroup v1 freezer hierarchy, or use cgroup v2"),
        ),
        (Err(why), _) => check(
            "durable sandboxes",
            Level::Warn,
            format!("unavailable: {why}; sandboxes cannot pause, hibernate or outlive the server"),
            Some("run as root with the loop module and e2fsprogs installed"),
        ),
    }
}

/// The CRIU version that restores a process tree on recent kernels.
const CRIU_MIN: (u32, u32) = (4, 1);

/// CRIU's version, from `criu --version` ("Version: 3.17.1").
pub fn criu_version() -> Option<(String, (u32, u32))> {
    let criu = [
        "/usr/sbin/criu",
        "/sbin/criu",
        "/usr/bin/criu",
        "/usr/local/sbin/criu",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())?;
    let out = std::process::Command::new(criu)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim()
        .to_owned();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    Some((v, (major, minor)))
}

/// The gVisor tier: runsc, its version and the platform that passed its trial.
fn gvisor(host: Option<&Host>) -> Check {
    let name = "isolation gvisor";
    let Some(path) = crate::gvisor::find() else {
        return check(
            name,
            Level::Warn,
            "runsc not found: pools with isolation = \"gvisor\" cannot start",
            Some(
                "apt-get install runsc (Debian, Ubuntu; scripts/deps.sh does it), or gVisor's release binary",
            ),
        );
    };
    let Some(host) = host else {
        return check(
            name,
            Level::Warn,
            format!(
                "{} found, but the host could not be prepared",
                path.display()
            ),
            None,
        );
    };
    match crate::gvisor::runsc(host) {
        Ok(r) => check(
            name,
            Level::Ok,
            format!(
                "{} ({}), platform {} (chosen by trial: systrap > kvm > ptrace)",
                r.path.display(),
                r.version,
                r.platform
            ),
            None,
        ),
        Err(e) => check(
            name,
            Level::Warn,
            format!("{}: {e}", path.display()),
            Some("run ampoule as root with cgroups; see the detail for the failing platforms"),
        ),
    }
}

/// Memory across hibernation: CRIU, detected, never assumed.
fn criu() -> Check {
    let lost = "hibernated sandboxes resume with their files but fresh interpreters \
                (every API reports session_state \"lost\")";
    match criu_version() {
        None => check(
            "memory across hibernation",
            Level::Warn,
            format!("no CRIU: {lost}"),
            Some("install CRIU >= 4.1 (Debian 12's 3.17 cannot restore on recent kernels)"),
        ),
        Some((v, n)) if n < CRIU_MIN => check(
            "memory across hibernation",
            Level::Warn,
            format!("CRIU {v} is too old for this kernel (needs >= 4.1): {lost}"),
            Some("install CRIU >= 4.1"),
        ),
        Some((v, _)) => check(
            "memory across hibernation",
            Level::Warn,
            format!("CRIU {v} found, but this ampoule does not checkpoint memory yet: {lost}"),
            Some("nothing to do on this host: memory checkpoints are not built yet"),
        ),
    }
}
