//! Kernels in sandboxes started from an OCI image (`[pools.X] image = "NAME:TAG"`): the
//! interpreter is the image's own, found inside its unpacked root; ampoule's kernel files are
//! still written read-only to `/run/ampoule`.
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
            .map(|l| (*l, interpreter_names(*l).and_then(|n| self.find(n))))
            .collect()
    }
}

fn interpreter_names(language: Language) -> Option<&'static [&'static str]> {
    match language {
        Language::Python => Some(&["python3", "python"]),
        // Kernels of other languages in images are not wired yet (their drivers assume the
        // host's runtimes); they are reported as absent.
        _ => None,
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
pub fn locate(language: Language, image: &ImageRoot, _limits: &Limits) -> Result<LanguageSpec> {
    let missing = |looked_for: String| Error::RuntimeMissing {
        language: language.as_str(),
        looked_for,
        hint: format!(
            "the image {} has no {} interpreter ampoule can drive; install it in the image, or \
             use a pool without `image`",
            image.name,
            language.as_str()
        ),
    };
    let Some(names) = interpreter_names(language) else {
        return Err(missing(format!("{} kernels in images", language.as_str())));
    };
    let python = image.find(names).ok_or_else(|| {
        missing(format!(
            "{} on the image's PATH ({})",
            names.join(", "),
            image.path()
        ))
    })?;
    let mut env: Vec<(String, String)> = image
        .vars()
        .filter(|(k, _)| !RESERVED.contains(k) && !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for (k, v) in [
        ("PYTHONUNBUFFERED", "1"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("MPLBACKEND", "Agg"),
        ("MPLCONFIGDIR", "/tmp/.config/matplotlib"),
        ("XDG_CACHE_HOME", "/tmp/.cache"),
    ] {
        env.retain(|(name, _)| name != k);
        env.push((k.to_owned(), v.to_owned()));
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    Ok(LanguageSpec {
        language: "python",
        argv: vec![python.clone(), in_sandbox(KERNEL_PYTHON.name)],
        env,
        ro_binds: Vec::new(),
        files: vec![KERNEL_PYTHON, KERNELIO],
        note: Some(format!("{python} of the image {}", image.name)),
        image_root: Some(image.root.clone()),
        isolation: ampoule_runtime::Isolation::Namespaces,
    })
}
