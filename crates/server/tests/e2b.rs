//! The real E2B SDKs against a real `ampoule serve`: scripts written as a user of E2B's cloud
//! writes them (`tests/e2b/`), run unmodified with only `E2B_API_URL` and `E2B_SANDBOX_URL`
//! (both the server's root URL) and `E2B_API_KEY` (an ampoule key) set:
//!
//! - `smoke.py` (`e2b-code-interpreter` from PyPI) and `smoke.mjs` (`@e2b/code-interpreter`
//!   from npm): create, `run_code` with pandas and a chart, `commands.run("pip list | head")`, a
//!   background `python -m http.server` reached through `get_host`, files written and read,
//!   bytes uploaded and downloaded, `Sandbox.list` with metadata, `pause` (twice: the second
//!   answers `False`) then `connect` with a variable and the files kept, `set_timeout`, `kill`;
//! - `sandbox.py`: a JavaScript and a Python context sharing files, a background process alive
//!   between `run_code` calls, stdin, process kill, exit codes, errors, callbacks, `!`/`%`
//!   lines, environment variables; a port refused without its traffic token; and tenant B
//!   (`E2B_API_KEY_B`) reaching none of tenant A's sandbox, processes, files, contexts or port.
//!
//! The SDKs are pinned (`tests/e2b/requirements.txt`, `tests/e2b/package-lock.json`);
//! `scripts/test.sh` installs them into `target/e2b-venv` and `target/e2b-node`
//! (`$AMPOULE_E2B_VENV`, `$AMPOULE_E2B_NODE`). One server, in a throw-away namespace (the
//! scripts' code runs in real sandboxes), serves all three scripts (run one after the other
//! from this test's thread, which joined the jail's network namespace, so they reach its
//! 127.0.0.1): one trial, since nextest runs each trial as a process of its own. Without root,
//! the Python session environment, `node` or the SDKs the trial is reported as ignored with the
//! reason, never as passed; in CI a missing SDK directory fails it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ampoule_testkit::host::{Need, missing, trial};
use ampoule_testkit::jail::Served;
use ampoule_testkit::paths::workspace;
use libtest_mimic::Arguments;

const KEY_A: &str = "e2b-key-tenant-a";
const KEY_B: &str = "e2b-key-tenant-b";

/// Longest one script may take (sandboxes, a chart, pip, a web server, two tenants).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

/// The venv with the E2B Python SDK, if it is there.
fn venv() -> Option<PathBuf> {
    let dir = std::env::var_os("AMPOULE_E2B_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/e2b-venv"));
    dir.join("bin/python")
        .exists()
        .then(|| python_has_sdk(&dir))
        .flatten()
}

fn python_has_sdk(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.flatten()
        .any(|d| d.path().join("site-packages/e2b_code_interpreter").is_dir())
        .then(|| venv.to_path_buf())
}

/// The directory `npm ci` installed the E2B JavaScript SDK into, if it is there.
fn node_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("AMPOULE_E2B_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/e2b-node"));
    dir.join("node_modules/@e2b/code-interpreter/package.json")
        .exists()
        .then_some(dir)
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b")
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("ampoule.toml");
    // Two tenants; a Python pool forking from a zygote (the default for Python pools without a
    // network; said here so that a changed default does not change what this test covers) and
    // a JavaScript pool that keeps nothing warm.
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_E2B_KEY_A\"\n\
         [[auth.keys]]\ntenant = \"b\"\nkey_env = \"AMPOULE_E2B_KEY_B\"\n\
         [pools.python]\nwarm = 1\nmax_sessions = 8\nzygote = true\n\
         [pools.javascript]\nlanguage = \"javascript\"\nwarm = 0\nmax_sessions = 4\n",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// How one script ended.
struct Ran {
    name: &'static str,
    ok: bool,
    secs: f64,
    output: String,
}

/// Runs `program script` in `cwd` with a clean environment: `PATH`, a `HOME` of its own, the
/// three E2B variables pointing at the server, and `extra`; stdout and stderr go to files (no
/// pipe to fill), and the script is killed after [`SCRIPT_TIMEOUT`].
fn run_script(
    name: &'static str,
    program: &Path,
    script: &Path,
    cwd: &Path,
    url: &str,
    extra: &[(&str, &str)],
) -> Ran {
    let out_path = cwd.join(format!("{name}.out"));
    let out = File::create(&out_path).unwrap();
    let home = cwd.join(format!("{name}.home"));
    std::fs::create_dir_all(&home).unwrap();
    let started = Instant::now();
    let mut child = Command::new(program)
        .arg(script)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("LANG", "C.UTF-8")
        .env("NO_COLOR", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("E2B_API_URL", url)
        .env("E2B_SANDBOX_URL", url)
        .env("E2B_API_KEY", KEY_A)
        .envs(extra.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
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
    let mut output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let secs = started.elapsed().as_secs_f64();
    match status {
        None => output.push_str(&format!(
            "\n[killed after {} s]\n",
            SCRIPT_TIMEOUT.as_secs()
        )),
        Some(st) if !st.success() => output.push_str(&format!("\n[{st}]\n")),
        Some(_) => {}
    }
    let ok = status.is_some_and(|st| st.success());
    eprintln!(
        "== {name} ({secs:.1} s, {}):\n{output}",
        if ok { "passed" } else { "FAILED" }
    );
    Ran {
        name,
        ok,
        secs,
        output,
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn e2b_sdks_against_ampoule_serve() {
    let venv = venv().expect("checked before the trial");
    let node_dir = node_dir().expect("checked before the trial");
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path());
    let mut server = Served::start(
        tmp,
        "",
        &config,
        [
            ("AMPOULE_E2B_KEY_A", KEY_A),
            ("AMPOULE_E2B_KEY_B", KEY_B),
            ("AMPOULE_LOG", "info"),
            ("NO_COLOR", "1"),
        ],
    )
    .unwrap();
    // This thread, and the scripts forked from it, join the jail's network namespace.
    server.enter().unwrap();
    let url = format!("http://127.0.0.1:{}", server.port);
    let work = tempfile::tempdir().unwrap();
    // An ES module finds its packages next to itself: the script and a link to the installed
    // node_modules, side by side.
    std::fs::copy(scripts().join("smoke.mjs"), work.path().join("smoke.mjs")).unwrap();
    std::os::unix::fs::symlink(
        node_dir.join("node_modules"),
        work.path().join("node_modules"),
    )
    .unwrap();
    let python = venv.join("bin/python");
    let node = PathBuf::from("node");
    let ran = [
        run_script(
            "smoke.py",
            &python,
            &scripts().join("smoke.py"),
            work.path(),
            &url,
            &[],
        ),
        run_script(
            "smoke.mjs",
            &node,
            &work.path().join("smoke.mjs"),
            work.path(),
            &url,
            &[],
        ),
        run_script(
            "sandbox.py",
            &python,
            &scripts().join("sandbox.py"),
            work.path(),
            &url,
            &[("E2B_API_KEY_B", KEY_B)],
        ),
    ];
    let log = server.log();
    let stopped = server.stop();
    for r in &ran {
        eprintln!(
            "{}: {} ({:.1} s)",
            r.name,
            if r.ok { "passed" } else { "FAILED" },
            r.secs
        );
    }
    let failed: Vec<&Ran> = ran.iter().filter(|r| !r.ok).collect();
    assert!(
        failed.is_empty(),
        "{} of 3 E2B scripts failed against ampoule serve:\n{}\n== the server log (last 150 lines):\n{}",
        failed.len(),
        failed
            .iter()
            .map(|r| format!("== {}:\n{}", r.name, r.output))
            .collect::<Vec<_>>()
            .join("\n"),
        tail(&log, 150)
    );
    let stopped = stopped.unwrap();
    assert_eq!(
        stopped.rc,
        0,
        "the server did not stop cleanly:\n{}",
        tail(&log, 150)
    );
}

fn main() {
    let args = Arguments::from_args();
    let env = ampoule_session::paths::python_env_dir();
    let mut skip = missing(&[
        Need::Root("real sandboxes with their own uids, in a jail"),
        Need::Tool("/usr/bin/unshare", "util-linux"),
        Need::Tool("/usr/bin/node", "nodejs"),
        Need::OnPath("node", "nodejs"),
        Need::SessionEnv(&env),
    ]);
    if skip.is_none() {
        let absent = match (venv(), node_dir()) {
            (Some(_), Some(_)) => None,
            (None, _) => Some("no E2B Python SDK venv (scripts/test.sh builds target/e2b-venv)"),
            (_, None) => {
                Some("no E2B JavaScript SDK (scripts/test.sh runs `npm ci` into target/e2b-node)")
            }
        };
        if let Some(why) = absent {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the E2B SDK test: {why}"
            );
            skip = Some(why.into());
        }
    }
    let trials = vec![trial(
        "the_e2b_sdks_run_unmodified_against_ampoule_serve",
        e2b_sdks_against_ampoule_serve,
        skip.as_deref(),
    )];
    libtest_mimic::run(&args, trials).exit();
}
