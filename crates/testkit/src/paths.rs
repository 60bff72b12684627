//! The workspace, the `ampoule` binary and the client-library venv.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `ampoule` binary: `$AMPOULE_BIN`, else the workspace's debug build (built if missing).
/// Tests of the CLI crate itself use `env!("CARGO_BIN_EXE_ampoule")` instead.
///
/// # Panics
/// When the binary is missing and building it fails.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("AMPOULE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let bin = target.join("debug/ampoule");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = Command::new(cargo)
            .args(["build", "-p", "ampoule-cli", "--bin", "ampoule"])
            .current_dir(workspace())
            .status()
            .is_ok_and(|st| st.success());
        assert!(built, "building the ampoule binary failed");
    }
    bin
}

/// The client-library venv: `$AMPOULE_CLIENT_VENV` (`scripts/test.sh` creates it). `None`
/// outside CI when it is unset; when it is set, or in CI, a missing venv fails the test (whose
/// `purpose`, e.g. "the MCP client", is named) instead of skipping it.
///
/// # Panics
/// As said: a set variable without `bin/python`, or CI without the variable.
pub fn client_venv(purpose: &str) -> Option<PathBuf> {
    match std::env::var_os("AMPOULE_CLIENT_VENV") {
        Some(v) => {
            let venv = PathBuf::from(v);
            assert!(
                venv.join("bin/python").exists(),
                "AMPOULE_CLIENT_VENV={} has no bin/python; scripts/test.sh creates it",
                venv.display()
            );
            Some(venv)
        }
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run {purpose}: set AMPOULE_CLIENT_VENV (scripts/test.sh does)"
            );
            None
        }
    }
}
