//! The throw-away outer namespace every hostile program runs in.
//!
//! `ampoule run` is started inside `unshare --mount --pid --net --ipc --uts` as real root, with
//! the host's `/` remounted read-only, private tmpfs over `/tmp` and `/root`, its own network
//! namespace (loopback only) and its own cgroup subtree. If a sandbox layer had a bug, the
//! hostile program would land in this jail, not on the CI machine: it could not write the host
//! file system, reach the real network, or see or signal the machine's processes.
//!
//! The jail also measures what the run left behind: processes in the jail's pid namespace,
//! mounts added to or removed from its mount namespace, and sandbox cgroups in its own cgroup subtree.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use ampoule_runtime::cgroup::CgroupRoot;
use ampoule_testkit::host::{Need, missing};
use ampoule_types::RunResult;

/// A value planted in the server's environment and in host files; it must never reach output.
pub(crate) const CANARY: &str = "AMPOULE-CANARY-7f3a9c1e5b";

/// Extra work for the jail around one run.
#[derive(Default, Clone)]
pub(crate) struct Setup {
    /// Shell commands run in the jail before `ampoule run` (e.g. start a listener with `&`).
    pub(crate) before: String,
    /// Shell commands run after `ampoule run`, before leftovers are counted (stop the listener).
    pub(crate) after: String,
    /// Extra `ampoule run` arguments.
    pub(crate) args: Vec<String>,
    /// Language (`--lang`).
    pub(crate) lang: &'static str,
}

/// What one hostile run produced.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The result object (`ampoule run --json`).
    pub(crate) result: RunResult,
    /// Exit code of `ampoule run`.
    pub(crate) rc: i32,
    /// ampoule's own stderr.
    pub(crate) ampoule_stderr: String,
    /// Processes left in the jail's pid namespace after the run (pid, name).
    pub(crate) leftover_procs: Vec<String>,
    /// Mounts (id and mount point) the run added to the jail's mount namespace.
    pub(crate) mounts_added: Vec<String>,
    /// Mounts the run removed from the jail's mount namespace (those whose mount point a
    /// concurrent test deleted on the host excepted).
    pub(crate) mounts_removed: Vec<String>,
    /// Sandbox cgroups left in the jail's cgroup subtree.
    pub(crate) leftover_cgroups: Vec<String>,
    /// Whether the canary files in the jail are unchanged.
    pub(crate) canaries_intact: bool,
    /// Named values the `after` script printed as `KEY=value` lines.
    pub(crate) vars: BTreeMap<String, String>,
}

impl Outcome {
    /// Everything the sandboxed program printed.
    pub(crate) fn output(&self) -> String {
        format!("{}\n{}", self.result.stdout, self.result.stderr)
    }
}

const SCRIPT: &str = r#"
set -e
mkdir -p /run/ampoule
mount --bind /run/ampoule /run/ampoule
mount -o remount,bind,ro /
mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp
mount -t tmpfs -o size=1m,mode=0700 tmpfs /root
ip link set lo up
for f in $JAIL_CGROUP_PROCS; do echo $$ > "$f"; done
mkdir -p /tmp/canary
echo "$JAIL_CANARY" > /tmp/canary/secret.txt
echo "$JAIL_CANARY" > /root/secret.txt
eval "$JAIL_BEFORE"
mounts() { cut -d' ' -f1,5 /proc/self/mountinfo | sort; }
mounts > /tmp/.mounts.before
set +e
"$@" > /tmp/.result.json 2> /tmp/.ampoule.err
rc=$?
eval "$JAIL_AFTER"
mounts > /tmp/.mounts.after
echo "RC=$rc"
comm -13 /tmp/.mounts.before /tmp/.mounts.after | while read -r id mp; do
  echo "MOUNT_ADDED=$id $mp"
done
# A mount copied from the host vanishes from the jail when a concurrent test on the host deletes
# its mount point (the kernel detaches mounts on a removed directory in every namespace): that
# is not the sandbox's doing, and the directory is then gone here too.
comm -23 /tmp/.mounts.before /tmp/.mounts.after | while read -r id mp; do
  [ -e "$mp" ] && echo "MOUNT_REMOVED=$id $mp"
done
intact=yes
read line < /tmp/canary/secret.txt || intact=no
[ "$line" = "$JAIL_CANARY" ] || intact=no
read line < /root/secret.txt || intact=no
[ "$line" = "$JAIL_CANARY" ] || intact=no
echo "CANARIES=$intact"
# `ampoule run` answers once pid 1 of its sandbox is gone; the outer init may still be freeing
# its namespaces then (see `Sandbox::finish`). What is still here after two seconds stayed.
i=0
while [ $i -lt 200 ]; do
  set -- /proc/[0-9]*
  [ $# -le 1 ] && break
  sleep 0.01
  i=$((i + 1))
done
for d in /proc/[0-9]*; do
  p=${d#/proc/}
  [ "$p" = "$$" ] && continue
  read comm < "$d/comm" 2>/dev/null || continue
  echo "PROC=$p $comm"
done
echo "---AMPOULE-STDERR---"
cat /tmp/.ampoule.err
echo "---RESULT---"
cat /tmp/.result.json
"#;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn ampoule() -> &'static str {
    env!("CARGO_BIN_EXE_ampoule")
}

/// Runs `code` with `ampoule run --json` inside a fresh jail.
pub(crate) fn run(code: &str, setup: &Setup) -> Result<Outcome, String> {
    let leaf = format!(
        "ampoule-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    );
    let cg = CgroupRoot::detect_with_leaf(&leaf);
    if let Some(cg) = &cg {
        cg.prepare().map_err(|e| format!("test cgroup: {e}"))?;
    }
    let procs: Vec<String> = cg
        .as_ref()
        .map(|c| {
            c.base_dirs()
                .map(|d| d.join("cgroup.procs").display().to_string())
                .collect()
        })
        .unwrap_or_default();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let code_path = dir.path().join("code");
    std::fs::write(&code_path, code).map_err(|e| e.to_string())?;
    let lang = if setup.lang.is_empty() {
        "python"
    } else {
        setup.lang
    };
    let out = ampoule_testkit::jail::command(SCRIPT)
        .args([ampoule(), "run", "--json", "--lang", lang])
        .args(&setup.args)
        .arg("-")
        .stdin(std::fs::File::open(&code_path).map_err(|e| e.to_string())?)
        .env("JAIL_CGROUP_PROCS", procs.join(" "))
        .env("JAIL_CANARY", CANARY)
        .env("JAIL_BEFORE", &setup.before)
        .env("JAIL_AFTER", &setup.after)
        .env("AMPOULE_SECRET_TOKEN", CANARY)
        .output()
        .map_err(|e| format!("starting unshare: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let leftover_cgroups = cg
        .as_ref()
        .map(|c| {
            let inner = CgroupRoot::detect_with_leaf(&format!("{leaf}/ampoule"));
            let left = inner.map(|i| i.children()).unwrap_or_default();
            // Remove the test subtree (only empty directories can go).
            for base in c.base_dirs() {
                let _ = std::fs::remove_dir(base.join("ampoule"));
                let _ = std::fs::remove_dir(base);
            }
            left
        })
        .unwrap_or_default();
    parse(&stdout, leftover_cgroups).map_err(|e| {
        format!(
            "{e}\n--- jail stdout ---\n{stdout}\n--- jail stderr ---\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn parse(stdout: &str, leftover_cgroups: Vec<String>) -> Result<Outcome, String> {
    let (head, result) = stdout
        .split_once("---RESULT---\n")
        .ok_or("the jail printed no result")?;
    let (head, ampoule_stderr) = head
        .split_once("---AMPOULE-STDERR---\n")
        .ok_or("the jail printed no stderr section")?;
    let mut vars = BTreeMap::new();
    let (mut procs, mut mounts_added, mut mounts_removed) = (Vec::new(), Vec::new(), Vec::new());
    for line in head.lines() {
        if let Some((k, v)) = line.split_once('=') {
            match k {
                "PROC" => procs.push(v.to_owned()),
                "MOUNT_ADDED" => mounts_added.push(v.to_owned()),
                "MOUNT_REMOVED" => mounts_removed.push(v.to_owned()),
                _ => {
                    vars.insert(k.to_owned(), v.to_owned());
                }
            }
        }
    }
    let rc = vars
        .get("RC")
        .and_then(|v| v.parse().ok())
        .ok_or("no RC line")?;
    let result: RunResult = serde_json::from_str(result)
        .map_err(|e| format!("ampoule printed no result object ({e}); stderr: {ampoule_stderr}"))?;
    Ok(Outcome {
        result,
        rc,
        ampoule_stderr: ampoule_stderr.to_owned(),
        leftover_procs: procs,
        mounts_added,
        mounts_removed,
        leftover_cgroups,
        canaries_intact: vars.get("CANARIES").map(String::as_str) == Some("yes"),
        vars,
    })
}

/// Whether this machine can run the suite, and if not, why.
pub(crate) fn unavailable() -> Option<String> {
    missing(&[
        Need::Root("the containment suite builds an outer namespace"),
        Need::OnPath("unshare", "util-linux"),
        Need::OnPath("ip", "iproute2"),
    ])
}
