//! The throw-away outer namespace ("jail") every test that runs hostile code, or builds network
//! namespaces, nftables tables and veth pairs, works in.
//!
//! [`command`] runs a shell script inside `unshare --mount --pid --net --ipc --uts` as real
//! root: if a sandbox layer had a bug, the hostile program would land in the jail, not on the
//! machine (it could not write the host's file system, which [`PRELUDE`] remounts read-only,
//! reach the real network, or see or signal the machine's processes), and everything the test
//! builds dies with the jail. [`Served`] is `ampoule serve` in such a jail, reached from a test
//! thread that joins the jail's network namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::serve::{Log, listening};

/// The jail's first steps, for scripts run by [`command`] with `$JAIL_T` set to the case's
/// directory: `$T` is that directory, bound to itself so it stays writable under the read-only
/// root; `/root` is a private tmpfs; `$T/hosts`, when the case wrote one, is the jail's
/// `/etc/hosts` (the system resolver's answers); loopback is up.
pub const PRELUDE: &str = r#"
set -e
T="$JAIL_T"
mkdir -p /run/ampoule
mount --bind /run/ampoule /run/ampoule
mount --bind "$T" "$T"
mount -o remount,bind,ro /
mount -t tmpfs -o size=1m,mode=0700 tmpfs /root
if [ -f "$T/hosts" ]; then mount --bind "$T/hosts" /etc/hosts; fi
ip link set lo up
"#;

/// `script` run by `/bin/sh` in a fresh jail (pid 1 of its pid namespace is `unshare`'s child,
/// and `--kill-child` takes the whole jail down with it). Arguments added to the command are
/// the script's `"$@"`.
pub fn command(script: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--net",
        "--ipc",
        "--uts",
        "--",
        "/bin/sh",
        "-c",
        script,
        "jail",
    ]);
    cmd
}

/// After [`PRELUDE`] and the case's own setup: `ampoule serve` ("$@") until `$T/stop` appears;
/// then SIGTERM, its exit status in `$T/server.rc` and the number of `amp*` links left in the
/// jail in `$T/leftover_links`.
const SERVE: &str = r#"
set +e
"$@" &
SRV=$!
while [ ! -e "$T/stop" ] && kill -0 $SRV 2>/dev/null; do sleep 0.1; done
kill -TERM $SRV 2>/dev/null
wait $SRV
echo $? > "$T/server.rc"
# The kernel destroys a dead namespace's veth pairs asynchronously (its cleanup work queue):
# give it a moment before counting what is left.
i=0
while [ "$(ip -o link show | grep -c ': amp')" -gt 0 ] && [ $i -lt 200 ]; do i=$((i+1)); sleep 0.05; done
ip -o link show | grep -c ': amp' > "$T/leftover_links"
"#;

/// How a [`Served`] server ended.
#[derive(Debug)]
pub struct Stopped {
    /// `ampoule serve`'s exit status after SIGTERM (-1 when unknown).
    pub rc: i32,
    /// How many `amp*` links were left in the jail, as the jail counted them.
    pub leftover_links: String,
}

/// `ampoule serve` running in a jail of its own. The jail is killed on drop if still running.
#[derive(Debug)]
pub struct Served {
    child: Child,
    dir: tempfile::TempDir,
    /// The server's port on the jail's 127.0.0.1.
    pub port: u16,
    netns: File,
    log: Log,
}

impl Served {
    /// Starts `ampoule serve --config <config>` in a jail whose directory (`$T`) is `dir`,
    /// after [`PRELUDE`] and `setup` (shell), with `envs` on top of `AMPOULE_LOG=info`; waits
    /// up to 120 s for it to listen.
    pub fn start<K, V>(
        dir: tempfile::TempDir,
        setup: &str,
        config: &Path,
        envs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Served, String>
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let mut child = command(&format!("{PRELUDE}{setup}{SERVE}"))
            .arg(crate::paths::binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .env("JAIL_T", dir.path())
            .env("AMPOULE_LOG", "info")
            .envs(envs)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting unshare: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (log, port) = listening(stderr, false, Duration::from_secs(120))
            .map_err(|e| format!("in the jail: {e}"))?;
        // `unshare` made the namespaces itself before forking: its network namespace is the
        // jail's.
        let netns = File::open(format!("/proc/{}/ns/net", child.id()))
            .map_err(|e| format!("opening the jail's network namespace: {e}"))?;
        Ok(Served {
            child,
            dir,
            port,
            netns,
            log,
        })
    }

    /// The jail's directory (`$T`).
    pub fn t(&self) -> &Path {
        self.dir.path()
    }

    /// Puts the calling thread into the jail's network namespace (where the server listens).
    /// Only this thread moves; the jail's namespace stays alive while it is in it.
    pub fn enter(&self) -> Result<(), String> {
        nix::sched::setns(&self.netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns into the jail: {e}"))
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Stops the server (SIGTERM through the jail) and waits up to 60 s for the jail to end.
    pub fn stop(&mut self) -> Result<Stopped, String> {
        std::fs::write(self.t().join("stop"), "").map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        while self.child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if t0.elapsed() > Duration::from_secs(60) {
                return Err("the jail did not end after the server was told to stop".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let read = |f: &str| {
            std::fs::read_to_string(self.t().join(f))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        Ok(Stopped {
            rc: read("server.rc").parse().unwrap_or(-1),
            leftover_links: read("leftover_links"),
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // Normally stopped already; otherwise --kill-child takes the whole jail down.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
