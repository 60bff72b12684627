//! The web console in a real browser: Debian's `chromium`, driven by Playwright
//! (`playwright-core` from npm, pinned in `tests/console/package-lock.json`, launched with
//! `executablePath` = the system browser) runs `tests/console/console.mjs` against a real
//! `ampoule serve` with real sandboxes in a throw-away namespace. The script signs in with an
//! API key (after a wrong one), runs a matplotlib chart and sees the image, uploads a CSV and
//! reads it from code, finds that execution on the audit page by its id and verifies the
//! chain, opens and deletes the session; it checks that hostile stdout and HTML results are
//! shown as text, that no page works without a key, that tenant B's sessions and records
//! never show, that the CSP is enforced, keyboard navigation, and a 375 px window.
//!
//! Screenshots of each page go to `target/console-screenshots/` (CI keeps them as artifacts);
//! their paths are printed. `scripts/test.sh` installs the npm package into
//! `target/console-node` (`$AMPOULE_CONSOLE_NODE`). Without root, the Python session
//! environment, `node`, `chromium` or the package the trial is reported as ignored with the
//! reason; in CI a missing package fails it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ampoule_testkit::host::{Need, missing, trial};
use ampoule_testkit::jail::Served;
use ampoule_testkit::paths::workspace;
use libtest_mimic::Arguments;

const KEY_A: &str = "console-key-tenant-a";
const KEY_B: &str = "console-key-tenant-b";
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest the browser script may take (a cold chart, pandas, a dozen pages).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// The directory `npm ci` installed playwright-core into, if it is there.
fn node_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("AMPOULE_CONSOLE_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/console-node"));
    dir.join("node_modules/playwright-core/package.json")
        .exists()
        .then_some(dir)
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("ampoule.toml");
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_CONSOLE_KEY_A\"\n\
         [[auth.keys]]\ntenant = \"b\"\nkey_env = \"AMPOULE_CONSOLE_KEY_B\"\n\
         [pools.python]\nwarm = 1\nmax_sessions = 6\n",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn the_console_in_a_browser() {
    let node_dir = node_dir().expect("checked before the trial");
    let shots = workspace().join("target/console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path());
    let mut server = Served::start(
        tmp,
        "",
        &config,
        [
            ("AMPOULE_CONSOLE_KEY_A", KEY_A),
            ("AMPOULE_CONSOLE_KEY_B", KEY_B),
            ("AMPOULE_LOG", "info"),
            ("NO_COLOR", "1"),
        ],
    )
    .unwrap();
    // This thread, and node and chromium forked from it, join the jail's network namespace:
    // the browser reaches the server on the jail's 127.0.0.1 and nothing else.
    server.enter().unwrap();
    let url = format!("http://127.0.0.1:{}", server.port);
    let work = tempfile::tempdir().unwrap();
    // An ES module finds its packages next to itself.
    let script = work.path().join("console.mjs");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/console.mjs"),
        &script,
    )
    .unwrap();
    std::os::unix::fs::symlink(
        node_dir.join("node_modules"),
        work.path().join("node_modules"),
    )
    .unwrap();
    let out_path = work.path().join("console.out");
    let out = File::create(&out_path).unwrap();
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let started = Instant::now();
    let mut child = Command::new("node")
        .arg(&script)
        .current_dir(work.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("LANG", "C.UTF-8")
        .env("CONSOLE_URL", &url)
        .env("KEY_A", KEY_A)
        .env("KEY_B", KEY_B)
        .env("CHROMIUM", CHROMIUM)
        .env("SHOTS", &shots)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("starting node");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    eprintln!(
        "== console.mjs ({:.1} s):\n{output}",
        started.elapsed().as_secs_f64()
    );
    let log = server.log();
    let stopped = server.stop();
    assert!(
        status.is_some_and(|st| st.success()),
        "the browser test failed ({}):\n{output}\n== the server log (last 100 lines):\n{}",
        status.map_or("killed after the timeout".into(), |st| st.to_string()),
        tail(&log, 100)
    );
    // Every page was photographed (the script lists what it saved).
    let index = std::fs::read_to_string(shots.join("index.txt")).unwrap();
    let saved: Vec<&str> = index.lines().collect();
    assert!(saved.len() >= 10, "screenshots: {saved:?}");
    for s in &saved {
        assert!(
            std::fs::metadata(s).is_ok_and(|m| m.len() > 1000),
            "{s} is missing or empty"
        );
        println!("console screenshot: {s}");
    }
    assert_eq!(stopped.unwrap().rc, 0, "the server did not stop cleanly");
}

fn main() {
    let args = Arguments::from_args();
    let env = ampoule_session::paths::python_env_dir();
    let mut skip = missing(&[
        Need::Root("real sandboxes with their own uids, in a jail"),
        Need::Tool("/usr/bin/unshare", "util-linux"),
        Need::OnPath("node", "nodejs"),
        Need::Tool(CHROMIUM, "chromium"),
        Need::SessionEnv(&env),
    ]);
    if skip.is_none() && node_dir().is_none() {
        let why = "no playwright-core (scripts/test.sh runs `npm ci` into target/console-node)";
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the console's browser test: {why}"
        );
        skip = Some(why.into());
    }
    let trials = vec![trial(
        "the_console_works_in_a_real_browser",
        the_console_in_a_browser,
        skip.as_deref(),
    )];
    libtest_mimic::run(&args, trials).exit();
}
