//! Whether this machine can run a privileged test, and trials that say why not.
//!
//! A test that cannot run here is reported as ignored with its reason (nextest shows SKIP),
//! never as passed: a skipped containment test that looked green would hide a broken sandbox.

use std::path::{Path, PathBuf};

use libtest_mimic::Trial;

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// Effective uid 0; the text says what root is for.
    Root(&'a str),
    /// A program at this absolute path (or the same path without `/usr`), from this package.
    Tool(&'a str, &'a str),
    /// A program found on `$PATH`, from this package.
    OnPath(&'a str, &'a str),
    /// The Python session environment (`ampoule setup`) in this directory.
    SessionEnv(&'a Path),
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The first of `needs` this machine lacks, as the reason to skip; `None` when all are here.
pub fn missing(needs: &[Need<'_>]) -> Option<String> {
    needs.iter().find_map(|need| match *need {
        Need::Root(what) => (!is_root()).then(|| format!("needs root ({what})")),
        Need::Tool(path, package) => {
            let here = Path::new(path).exists() || PathBuf::from(path.replace("/usr", "")).exists();
            (!here).then(|| format!("{path} is missing (apt-get install {package})"))
        }
        Need::OnPath(tool, package) => {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
                .unwrap_or(false);
            (!found).then(|| format!("`{tool}` is not installed (apt-get install {package})"))
        }
        Need::SessionEnv(dir) => (!dir.join("bin/python").exists())
            .then(|| "no Python session environment (run `ampoule setup`)".to_owned()),
    })
}

/// A trial of a body that panics on failure, ignored (reported as skipped, never as passed)
/// when `skip` names a reason, which is printed.
pub fn trial(name: &'static str, body: fn(), skip: Option<&str>) -> Trial {
    if let Some(why) = skip {
        eprintln!("{name}: ignored: {why}");
    }
    Trial::test(name, move || {
        body();
        Ok(())
    })
    .with_ignored_flag(skip.is_some())
}
