//! The `/v1` contract, fuzzed: schemathesis (every check, the stateful phase included) runs
//! over every operation of the OpenAPI document that a real `ampoule serve` serves, with real
//! Python sessions in real sandboxes, and must report no failure. A status code an operation
//! answers but does not document, a schema-valid request refused, a schema-violating one
//! accepted, a response that breaks its schema: each fails this test.
//!
//! Schemathesis comes from the venv `scripts/test.sh` builds from
//! `tests/contract/requirements.txt` (`target/schemathesis-venv`, or `$AMPOULE_SCHEMATHESIS_VENV`).
//! Without it, or without root or the Python session environment, the test is reported as
//! ignored with the reason, never as passed; in CI a missing venv fails it. The run is bounded
//! (examples per operation, a fixed seed) to stay within a minute or two on two cores. The
//! server runs in a throw-away outer namespace (the fuzzed code runs in real sandboxes); only
//! its 127.0.0.1 is bound or contacted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ampoule_testkit::host::{Need, missing, trial};
use ampoule_testkit::jail::Served;
use ampoule_testkit::paths::workspace;
use libtest_mimic::Arguments;

const KEY: &str = "contract-key-tenant-a";

/// Test cases per operation and phase, and the seed: enough to reach every status code the
/// document lists, few enough for CI.
const MAX_EXAMPLES: &str = "50";
const SEED: &str = "1";

/// The paths left out of the fuzzing (see where it is passed).
const EXCLUDED: &str = r"/ports/|/(pause|resume|hibernate)$";

/// How many operations schemathesis must test: every one of the committed document but the
/// excluded.
fn expected_operations() -> usize {
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(workspace().join("openapi.json")).unwrap()).unwrap();
    let excluded = regex_lite(EXCLUDED);
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(path, _)| !excluded(path))
        .map(|(_, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|m| ["get", "post", "put", "delete", "patch"].contains(&m.as_str()))
                .count()
        })
        .sum()
}

/// [`EXCLUDED`] as a predicate (no regex engine for two alternatives).
fn regex_lite(_: &str) -> impl Fn(&str) -> bool {
    |path: &str| {
        path.contains("/ports/")
            || ["/pause", "/resume", "/hibernate"]
                .iter()
                .any(|end| path.ends_with(end))
    }
}

/// The schemathesis venv, if it is there.
fn venv() -> Option<PathBuf> {
    let dir = std::env::var_os("AMPOULE_SCHEMATHESIS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/schemathesis-venv"));
    dir.join("bin/schemathesis").exists().then_some(dir)
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("ampoule.toml");
    // Small limits so that schemathesis meets them: a full pool (429), a 1 MiB upload (413).
    // No failed-auth throttle: schemathesis tries wrong and missing keys on every operation
    // from one address, and expects each to answer 401 (the throttle has tests of its own,
    // tests/door.rs).
    let text = format!(
        "[server]\ndata_dir = \"{}\"\nmax_upload_mib = 1\n\
         [auth]\nmax_failures_per_minute = 0\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_CONTRACT_KEY\"\n\
         [pools.python]\nwarm = 1\nmax_sessions = 8\n",
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn schemathesis_finds_nothing() {
    let venv = venv().expect("checked before the trial");
    // The server runs in a throw-away namespace: the fuzzed code runs in real sandboxes. This
    // thread joins the jail's network namespace, and schemathesis, forked from it, too.
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path());
    let mut server = Served::start(
        tmp,
        "",
        &config,
        [("AMPOULE_CONTRACT_KEY", KEY), ("AMPOULE_LOG", "warn")],
    )
    .unwrap();
    server.enter().unwrap();
    let started = Instant::now();
    let out = Command::new(venv.join("bin/schemathesis"))
        .current_dir(server.t())
        .args([
            "run",
            &format!("http://127.0.0.1:{}/openapi.json", server.port),
        ])
        .args(["--header", &format!("Authorization: Bearer {KEY}")])
        .args(["--checks", "all"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED])
        // Not fuzzed: a port with nothing listening inside answers 502 (the fuzzer never
        // starts a server), which the `not_a_server_error` check refuses whatever the document
        // says. Pause, resume and hibernate: with them in, the fuzzer's context operations all
        // land on one sandbox and meet its 16-context limit (a documented 400 that the
        // "schema-valid request rejected" check still counts). The API tests and
        // `tests/durable.rs` cover them.
        .args(["--exclude-path-regex", EXCLUDED])
        // One worker: the server's sessions are real sandboxes on a two-core machine.
        .args(["--workers", "1", "--no-shrink", "--request-timeout", "90"])
        // A floor on the sandbox lifetimes the fuzzer sends (why: in the hooks file).
        .env(
            "SCHEMATHESIS_HOOKS",
            workspace().join("crates/server/tests/contract/hooks.py"),
        )
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "schemathesis ({} s):\n{stdout}{}",
        started.elapsed().as_secs(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    let log = log_tail(&server.log());
    let stopped = server.stop();
    // The report goes into the failure message itself: CI shows a failed test's message, and
    // the report is what says which check failed on which operation.
    assert!(
        out.status.success(),
        "schemathesis found failures in the /v1 contract:\n{report}\nthe server log:\n{log}"
    );
    let stopped = stopped.unwrap();
    assert_eq!(stopped.rc, 0, "the server did not stop cleanly:\n{log}");
    // A run that tested nothing would also exit 0.
    let want = format!("Tested: {}", expected_operations());
    assert!(
        stdout.contains(&want),
        "schemathesis did not test every operation ({want} expected)"
    );
}

/// The server log's last lines but the "refused by policy" warnings (the fuzzer fills the pool
/// on purpose, and a few hundred of those would hide the rest).
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| !line.contains("refused by policy"))
        .collect();
    let refused = log.lines().count() - lines.len();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    format!("({refused} \"refused by policy\" warnings left out)\n{tail}")
}

fn main() {
    let args = Arguments::from_args();
    let env = ampoule_session::paths::python_env_dir();
    let mut skip = missing(&[
        Need::Root("real sandboxes with their own uids, in a jail"),
        Need::Tool("/usr/bin/unshare", "util-linux"),
        Need::SessionEnv(&env),
    ]);
    if skip.is_none() && venv().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the contract test: scripts/test.sh builds target/schemathesis-venv"
        );
        skip =
            Some("no schemathesis venv (scripts/test.sh builds target/schemathesis-venv)".into());
    }
    let trials = vec![trial(
        "schemathesis_finds_nothing_in_the_v1_contract",
        schemathesis_finds_nothing,
        skip.as_deref(),
    )];
    libtest_mimic::run(&args, trials).exit();
}
