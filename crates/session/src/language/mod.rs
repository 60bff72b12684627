//! Language plug-ins: how to find a runtime, how to start its kernel, which files it needs.
//!
//! A plug-in is a type implementing [`Kernel`] plus its kernel source under `kernels/<name>/`
//! at the repository root, embedded with `include_str!`. [`Kernel::locate`] looks for the
//! runtime on this host and returns a [`LanguageSpec`]: the command line (absolute paths, as
//! the sandbox sees them), extra environment, read-only binds for runtimes outside `/usr`, and
//! the files written to `/run/ampoule` before the kernel starts. When the runtime is missing it
//! returns [`Error::RuntimeMissing`] naming what to install. The kernel speaks the protocol of
//! `ampoule-protocol` on its stdin and stdout; `kernels/common/kernelio.py` does the framing
//! and the capture of fds 1 and 2 for kernels that can be driven from Python.
//!
//! The list of languages is [`ampoule_types::Language`]; [`kernel`] maps each variant to its
//! plug-in with an exhaustive match, so names, aliases and the set of languages live in one
//! place. Adding a language (Ruby, R) is one variant there, one module here, registered in
//! [`kernel`], and one directory in `kernels/`.

mod csharp;
pub mod image;
mod javascript;
mod powershell;
mod python;
mod shell;

use std::path::{Path, PathBuf};

use ampoule_runtime::language::CODE_DIR;
use ampoule_types::{Language, Limits};

use crate::error::{Error, Result};

pub use csharp::CSharp;
pub use javascript::JavaScript;
pub use powershell::PowerShell;
pub(crate) use python::KERNEL as KERNEL_PYTHON;
pub use python::Python;
pub use shell::Shell;

/// The shared Python plumbing of the Python-hosted kernels.
pub(crate) const KERNELIO: KernelFile = KernelFile {
    name: "kernelio.py",
    contents: include_str!("../../../../kernels/common/kernelio.py"),
};

/// One file of a kernel, written read-only to `/run/ampoule/<name>` in the sandbox.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    /// File name in `/run/ampoule`.
    pub name: &'static str,
    /// Its contents.
    pub contents: &'static str,
}

/// How to start one language's kernel on this host.
#[derive(Debug, Clone)]
pub struct LanguageSpec {
    /// The plug-in's name.
    pub language: &'static str,
    /// Command line; `argv[0]` is an absolute path.
    pub argv: Vec<String>,
    /// Environment added to the sandbox's base environment.
    pub env: Vec<(String, String)>,
    /// Host paths the sandbox must bind read-only (runtimes outside `/usr`).
    pub ro_binds: Vec<PathBuf>,
    /// Files written to `/run/ampoule`.
    pub files: Vec<KernelFile>,
    /// What runs, for `doctor` (the runtime in use, what is degraded).
    pub note: Option<String>,
    /// The unpacked root of the OCI image the sandbox starts from (see [`image`]); `None`:
    /// the host's runtimes.
    pub image_root: Option<PathBuf>,
    /// The isolation tier of the kernel's sandbox (the pool's `isolation`).
    pub isolation: ampoule_runtime::Isolation,
    /// With `image_root`: the sandbox's `/` is writable (the pool's `writable_root`; see
    /// `ampoule_runtime::SandboxConfig::writable_root`).
    pub writable_root: bool,
}

/// A language plug-in.
pub trait Kernel: Send + Sync {
    /// The language this plug-in runs.
    fn language(&self) -> Language;
    /// The canonical name (`python`).
    fn name(&self) -> &'static str {
        self.language().as_str()
    }
    /// Finds the runtime and says how to start the kernel under `limits`.
    fn locate(&self, limits: &Limits) -> Result<LanguageSpec>;
}

/// The plug-in of `language`.
pub fn kernel(language: Language) -> &'static dyn Kernel {
    match language {
        Language::Python => &Python,
        Language::Javascript => &JavaScript,
        Language::Shell => &Shell,
        Language::Csharp => &CSharp,
        Language::Powershell => &PowerShell,
    }
}

/// Every plug-in, in the order `doctor` reports them.
pub fn all() -> [&'static dyn Kernel; Language::EVERY.len()] {
    Language::EVERY.map(kernel)
}

/// The plug-in called `name` (or one of its aliases), case-insensitively.
pub fn find(name: &str) -> Result<&'static dyn Kernel> {
    Language::parse(name)
        .map(kernel)
        .ok_or_else(|| Error::UnknownLanguage(name.to_owned()))
}

/// Path of a kernel file inside the sandbox.
pub(crate) fn in_sandbox(file: &str) -> String {
    format!("{CODE_DIR}/{file}")
}

/// The first executable among `candidates`, or the error naming what to install.
pub(crate) fn find_executable(
    language: &'static str,
    candidates: &[&str],
    hint: &str,
) -> Result<PathBuf> {
    candidates
        .iter()
        .map(Path::new)
        .find(|p| is_executable(p))
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::RuntimeMissing {
            language,
            looked_for: candidates.join(", "),
            hint: hint.to_owned(),
        })
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The host's Python 3, which also hosts the drivers of the shell, C# and PowerShell kernels.
pub(crate) fn base_python(language: &'static str) -> Result<PathBuf> {
    find_executable(
        language,
        &["/usr/bin/python3", "/usr/local/bin/python3"],
        "apt-get install python3",
    )
}

/// Binds an interpreter outside `/usr` needs (its prefix, and its real prefix behind a link).
pub(crate) fn binds_for(path: &Path) -> Vec<PathBuf> {
    ampoule_runtime::language::binds_for(path)
}

fn string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_resolve() {
        assert_eq!(find("py").unwrap().name(), "python");
        assert_eq!(find("Node").unwrap().name(), "javascript");
        assert_eq!(find("bash").unwrap().name(), "shell");
        assert_eq!(find("c#").unwrap().name(), "csharp");
        assert_eq!(find("pwsh").unwrap().name(), "powershell");
        let Err(err) = find("cobol") else {
            panic!("cobol found")
        };
        let err = err.to_string();
        assert!(err.contains("cobol") && err.contains("hint"), "{err}");
    }

    #[test]
    fn every_language_has_its_own_plugin() {
        for l in Language::EVERY {
            assert_eq!(kernel(l).language(), l);
            assert_eq!(find(l.as_str()).unwrap().name(), l.as_str());
        }
    }

    #[test]
    fn every_plugin_ships_its_files_or_says_what_is_missing() {
        for k in all() {
            match k.locate(&Limits::default()) {
                Ok(spec) => {
                    assert_eq!(spec.language, k.name());
                    assert!(spec.argv[0].starts_with('/'), "{:?}", spec.argv);
                    assert!(!spec.files.is_empty());
                }
                Err(Error::RuntimeMissing { hint, .. }) => assert!(!hint.is_empty()),
                Err(e) => panic!("{}: {e}", k.name()),
            }
        }
    }

    #[test]
    fn missing_runtimes_name_what_to_install() {
        let err = find_executable("ruby", &["/nonexistent/ruby"], "apt-get install ruby")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ruby") && err.contains("apt-get install ruby"));
    }
}
