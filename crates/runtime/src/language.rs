//! Which interpreter runs a language, and what the sandbox must contain for it.
//!
//! Interpreters are always named by absolute path: `python3` on `PATH` may be a pyenv shim that
//! costs 150 ms and reads the caller's home directory.

use std::path::{Path, PathBuf};

use ampoule_types::Language;

use crate::error::{Error, Result};

/// An interpreter found on this host.
#[derive(Debug, Clone)]
pub struct Interpreter {
    /// The language.
    pub language: Language,
    /// Absolute path of the executable, as seen inside the sandbox (same as on the host).
    pub path: PathBuf,
    /// Arguments placed before the program file.
    pub args: Vec<String>,
    /// File name the program is stored under in `/run/ampoule`.
    pub file_name: &'static str,
    /// Extra read-only binds the interpreter needs (its prefix when outside `/usr`).
    pub binds: Vec<PathBuf>,
    /// Extra environment for this language.
    pub env: Vec<(String, String)>,
}

/// Where the program file appears inside the sandbox.
pub const CODE_DIR: &str = "/run/ampoule";

fn candidates(language: Language) -> &'static [&'static str] {
    match language {
        Language::Python => &["/usr/bin/python3", "/usr/local/bin/python3"],
        Language::Javascript => &["/usr/bin/node", "/usr/local/bin/node", "/usr/bin/nodejs"],
        Language::Shell => &["/usr/bin/bash", "/bin/bash"],
        // Sessions only: their kernels are the session crate's plug-ins.
        Language::Csharp | Language::Powershell => &[],
    }
}

/// One-line fix shown when a language's runtime is missing.
pub fn install_hint(language: Language) -> &'static str {
    match language {
        Language::Python => "apt-get install python3",
        Language::Javascript => "apt-get install nodejs",
        Language::Shell => "apt-get install bash",
        Language::Csharp | Language::Powershell => {
            "run it as a session (a pool of `ampoule serve` with this language)"
        }
    }
}

impl Interpreter {
    /// Finds the interpreter for `language`, or says what to install.
    pub fn find(language: Language) -> Result<Self> {
        if !language.one_shot() {
            return Err(Error::Invalid(format!(
                "{language} runs only as a session, not as a one-shot program; hint: {}",
                install_hint(language)
            )));
        }
        let path = candidates(language)
            .iter()
            .map(Path::new)
            .find(|p| is_executable(p))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no {language} runtime on this host (looked for {}); hint: {}",
                    candidates(language).join(", "),
                    install_hint(language)
                ))
            })?;
        Ok(Self::at(language, path.to_owned()))
    }

    /// An interpreter at an explicit path (a virtual environment's python, say).
    pub fn at(language: Language, path: PathBuf) -> Self {
        let binds = binds_for(&path);
        let (args, file_name, env): (Vec<String>, _, Vec<(String, String)>) = match language {
            Language::Python => (
                vec![],
                "main.py",
                vec![
                    ("PYTHONUNBUFFERED".into(), "1".into()),
                    ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
                    ("MPLBACKEND".into(), "Agg".into()),
                ],
            ),
            Language::Javascript => (vec![], "main.js", vec![]),
            Language::Shell => (
                vec!["--noprofile".into(), "--norc".into()],
                "main.sh",
                vec![],
            ),
            Language::Csharp => (vec![], "main.cs", vec![]),
            Language::Powershell => (
                vec![
                    "-NoProfile".into(),
                    "-NonInteractive".into(),
                    "-File".into(),
                ],
                "main.ps1",
                vec![],
            ),
        };
        Self {
            language,
            path,
            args,
            file_name,
            binds,
            env,
        }
    }

    /// The command line that runs the program file.
    pub fn argv(&self) -> Vec<String> {
        let mut v = vec![self.path.to_string_lossy().into_owned()];
        v.extend(self.args.iter().cloned());
        v.push(format!("{CODE_DIR}/{}", self.file_name));
        v
    }

    /// The interpreter's version, as it reports it (for `doctor`), run directly on the host.
    pub fn version(&self) -> Option<String> {
        let out = std::process::Command::new(&self.path)
            .arg("--version")
            .env_clear()
            .output()
            .ok()?;
        let text = if out.stdout.is_empty() {
            out.stderr
        } else {
            out.stdout
        };
        String::from_utf8_lossy(&text)
            .lines()
            .next()
            .map(|l| l.trim().to_owned())
    }
}

/// Read-only binds an executable outside `/usr` needs inside the sandbox: its installation
/// prefix (`…/bin/python` → `…`) and, when it is a link, the prefix of its real target.
pub fn binds_for(path: &Path) -> Vec<PathBuf> {
    let mut binds: Vec<PathBuf> = Vec::new();
    if !path.starts_with("/usr")
        && let Some(prefix) = path.parent().and_then(Path::parent)
    {
        binds.push(prefix.to_owned());
    }
    if let Ok(real) = std::fs::canonicalize(path)
        && !real.starts_with("/usr")
        && let Some(prefix) = real.parent().and_then(Path::parent)
        && !binds.iter().any(|b| real.starts_with(b))
    {
        binds.push(prefix.to_owned());
    }
    binds
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The environment every sandboxed program starts with (PRODUCT.md §4): never the server's.
pub fn base_env() -> Vec<(String, String)> {
    [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", "/mnt/data"),
        ("LANG", "C.UTF-8"),
        ("TZ", "UTC"),
        ("TMPDIR", "/tmp"),
        ("USER", "sandbox"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}
