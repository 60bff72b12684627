//! Kernels in sandboxes started from an OCI image (`[pools.X] image = "NAME:TAG"`): the
//! interpreter is the image's own (Python; bash driven by the image's Python for shell; Node
//! started by the image's bash for JavaScript), found inside its unpacked root; ampoule's
//! kernel files are still written read-only to `/run/ampoule`.
//!
//! The image is untrusted, so its root is searched without following anything out of it:
//! every lookup is `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from the root's
//! descriptor, so `/usr/bin/python3 -> /etc/shadow` resolves to the image's `/etc/shadow`
//! (and is no interpreter), never the host's.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use ampoule_types::{Language, Limits};
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

use super::{KERNEL_PYTHON, KERNELIO, LanguageSpec, in_sandbox};
use crate::error::{Error, Result};

/// What a pool's image gives its sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRoot {
    /// The image's name, for messages (`my-python:1.0`).
    pub name: String,
    /// Its unpacked root on the host.
    pub root: PathBuf,
    /// Its config's `Env`, as `KEY=VALUE`.
    pub env: Vec<String>,
}

/// Variables the image may not set: the sandbox's contract (PRODUCT.md §4) and the
/// interpreter's hooks that would change how the kernel itself runs.
const RESERVED: &[&str] = &[
    "HOME",
    "USER",
    "TMPDIR",
    "TZ",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
];

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ImageRoot {
    /// The image's `PATH`, or the usual default.
    pub fn path(&self) -> String {
        self.vars()
            .find(|(k, _)| *k == "PATH")
            .map_or_else(|| DEFAULT_PATH.to_owned(), |(_, v)| v.to_owned())
    }

    fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().filter_map(|kv| kv.split_once('='))
    }

    /// The first of `names` found as an executable regular file in a directory of the image's
    /// `PATH`: its absolute path inside the image.
    pub fn find(&self, names: &[&str]) -> Option<String> {
        let root = nix::fcntl::open(
            &self.root,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let path = self.path();
        for name in names {
            for dir in path.split(':').filter(|d| d.starts_with('/')) {
                let candidate = format!("{}/{name}", dir.trim_end_matches('/'));
                if executable_in(&root, &candidate) {
                    return Some(candidate);
                }
            }
        }
        None
    }

    /// Which languages have their interpreter in the image, with its path (for the report at
    /// `serve` start).
    pub fn languages(&self) -> Vec<(Language, Option<String>)> {
        Language::EVERY
            .iter()
            .map(|l| {
                (
                    *l,
                    self.programs(*l).ok().and_then(|p| p.into_iter().next()),
                )
            })
            .collect()
    }
}

/// The programs a language's kernel needs from the image, by the names tried for each; the
/// first is the interpreter reported for the language.
fn needs(language: Language) -> Option<&'static [&'static [&'static str]]> {
    const PYTHON: &[&str] = &["python3", "python"];
    const BASH: &[&str] = &["bash"];
    const NODE: &[&str] = &["node", "nodejs"];
    match language {
        Language::Python => Some(&[PYTHON]),
        // The shell kernel is bash driven by a small Python program.
        Language::Shell => Some(&[BASH, PYTHON]),
        // Node started by a bash launcher.
        Language::Javascript => Some(&[NODE, BASH]),
        // PowerShell and C# kernels assume the host's runtimes; reported as absent.
        Language::Powershell | Language::Csharp => None,
    }
}

impl ImageRoot {
    /// Every program `language` needs, found in the image (in the order of [`needs`]), or
    /// what is missing.
    fn programs(&self, language: Language) -> std::result::Result<Vec<String>, String> {
        let Some(needs) = needs(language) else {
            return Err(format!("{} kernels in images", language.as_str()));
        };
        needs
            .iter()
            .map(|names| {
                self.find(names).ok_or_else(|| {
                    format!("{} on the image's PATH ({})", names.join(", "), self.path())
                })
            })
            .collect()
    }
}

fn executable_in(root: &OwnedFd, abs: &str) -> bool {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let Ok(fd) = openat2(root, Path::new(abs.trim_start_matches('/')), how) else {
        return false;
    };
    fstat(&fd).is_ok_and(|st| {
        SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
            && st.st_mode & 0o111 != 0
    })
}

/// How to start `language`'s kernel in a sandbox of `image`.
pub fn locate(language: Language, image: &ImageRoot, limits: &Limits) -> Result<LanguageSpec> {
    let programs = image
        .programs(language)
        .map_err(|looked_for| Error::RuntimeMissing {
            language: language.as_str(),
            looked_for,
            hint: format!(
                "the image {} has no {} interpreter ampoule can drive; install it in the image, \
                 or use a pool without `image`",
                image.name,
                language.as_str()
            ),
        })?;
    let mut env: Vec<(String, String)> = image
        .vars()
        .filter(|(k, _)| !RESERVED.contains(k) && !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let mut set = |k: &str, v: &str| {
        env.retain(|(name, _)| name != k);
        env.push((k.to_owned(), v.to_owned()));
    };
    let (name, argv, files, note) = match (language, programs.as_slice()) {
        (Language::Python, [python]) => {
            for (k, v) in [
                ("PYTHONUNBUFFERED", "1"),
                ("PYTHONDONTWRITEBYTECODE", "1"),
                ("MPLBACKEND", "Agg"),
                ("MPLCONFIGDIR", "/tmp/.config/matplotlib"),
                ("XDG_CACHE_HOME", "/tmp/.cache"),
            ] {
                set(k, v);
            }
            (
                "python",
                vec![python.clone(), in_sandbox(KERNEL_PYTHON.name)],
                vec![KERNEL_PYTHON, KERNELIO],
                python.clone(),
            )
        }
        (Language::Shell, [bash, python]) => {
            set("PYTHONUNBUFFERED", "1");
            set("PYTHONDONTWRITEBYTECODE", "1");
            set("AMPOULE_BASH", bash);
            (
                "shell",
                vec![python.clone(), in_sandbox(super::shell::KERNEL.name)],
                vec![super::shell::KERNEL, KERNELIO],
                format!("{bash} (driven by {python})"),
            )
        }
        (Language::Javascript, [node, bash]) => (
            "javascript",
            vec![
                bash.clone(),
                in_sandbox(super::javascript::LAUNCH.name),
                node.clone(),
                in_sandbox(super::javascript::KERNEL.name),
                format!(
                    "--max-old-space-size={}",
                    super::javascript::heap_mib(limits)
                ),
            ],
            vec![super::javascript::LAUNCH, super::javascript::KERNEL],
            node.clone(),
        ),
        _ => {
            return Err(Error::RuntimeMissing {
                language: language.as_str(),
                looked_for: format!("{} kernels in images", language.as_str()),
                hint: "this language cannot be driven in an image yet".into(),
            });
        }
    };
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    Ok(LanguageSpec {
        language: name,
        argv,
        env,
        ro_binds: Vec::new(),
        files,
        note: Some(format!("{note} of the image {}", image.name)),
        image_root: Some(image.root.clone()),
        isolation: ampoule_runtime::Isolation::Namespaces,
        writable_root: false,
    })
}
