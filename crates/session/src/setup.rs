//! The Python environment sessions run in, and `ampoule setup`, which builds it.
//!
//! The environment is a virtual environment of the host's Python 3 at
//! [`crate::paths::python_env_dir`], holding exactly the pinned packages of
//! `kernels/python/requirements.txt` (embedded here as [`REQUIREMENTS`]). Building it is
//! idempotent: when every pin is installed nothing runs. Everything in it is created with
//! umask 022, because sandboxes bind it read-only and run as another user.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The pinned requirements (`kernels/python/requirements.txt`).
pub const REQUIREMENTS: &str = include_str!("../../../kernels/python/requirements.txt");

/// One pinned requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Normalized name (PEP 503).
    pub name: String,
    /// The pinned version.
    pub version: String,
}

/// The pins of [`REQUIREMENTS`].
pub fn requirements() -> Vec<Requirement> {
    REQUIREMENTS
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter_map(|l| l.split_once("=="))
        .map(|(name, version)| Requirement {
            name: normalize(name),
            version: version.trim().to_owned(),
        })
        .collect()
}

/// PEP 503 name normalization: lowercase, runs of `-`, `_`, `.` become one `-`.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.trim().chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// An installed distribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Normalized name.
    pub name: String,
    /// Installed version.
    pub version: String,
}

/// A Python virtual environment for sessions.
#[derive(Debug, Clone)]
pub struct PythonEnv {
    dir: PathBuf,
}

/// Lists installed distributions as JSON (run by the environment's own interpreter).
const LIST_PACKAGES: &str = "import json, importlib.metadata as m\n\
print(json.dumps(sorted({(d.metadata['Name'] or '', d.version) for d in m.distributions()})))";

impl PythonEnv {
    /// The environment at `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The environment sessions use ([`crate::paths::python_env_dir`]).
    pub fn default_location() -> Self {
        Self::at(crate::paths::python_env_dir())
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its interpreter.
    pub fn python(&self) -> PathBuf {
        self.dir.join("bin/python3")
    }

    /// The interpreter the environment was built with (`executable` in its `pyvenv.cfg`), if
    /// it says.
    pub fn base_interpreter(&self) -> Option<PathBuf> {
        self.pyvenv_value(&["executable"]).map(PathBuf::from)
    }

    /// The version of its interpreter (`version` or `version_info` in its `pyvenv.cfg`:
    /// `(3, 12)`), if it says.
    pub fn python_version(&self) -> Option<(u32, u32)> {
        let value = self.pyvenv_value(&["version", "version_info"])?;
        let mut parts = value.split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    /// The value of the first `key = value` line of its `pyvenv.cfg` whose key is one of `keys`.
    fn pyvenv_value(&self, keys: &[&str]) -> Option<String> {
        let cfg = std::fs::read_to_string(self.dir.join("pyvenv.cfg")).ok()?;
        cfg.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            keys.contains(&key.trim()).then(|| value.trim().to_owned())
        })
    }

    /// Whether the environment has been created.
    pub fn exists(&self) -> bool {
        crate::language::is_executable(&self.python())
    }

    /// The installed distributions, sorted by name.
    pub fn packages(&self) -> Result<Vec<Package>> {
        let out = Command::new(self.python())
            .args(["-I", "-c", LIST_PACKAGES])
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io(format!("running {}", self.python().display()), e))?;
        if !out.status.success() {
            return Err(Error::Setup {
                step: "listing packages".into(),
                detail: tail(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        let pairs: Vec<(String, String)> =
            serde_json::from_slice(&out.stdout).map_err(|e| Error::Setup {
                step: "listing packages".into(),
                detail: e.to_string(),
            })?;
        let mut packages: Vec<Package> = pairs
            .into_iter()
            .map(|(name, version)| Package {
                name: normalize(&name),
                version,
            })
            .collect();
        packages.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(packages)
    }

    /// A cheap fingerprint of what is installed (a handful of `stat` calls, no interpreter):
    /// it differs whenever a distribution was installed, upgraded, downgraded or removed, by
    /// `ampoule setup` or by a plain `pip install` into the environment, and when the
    /// environment was created, recreated or its interpreter replaced.
    ///
    /// It covers the device, inode, mtime and ctime of the interpreter (followed through the
    /// venv's symlink), of `pyvenv.cfg`, of `lib/` and of every `lib/python*/site-packages`,
    /// plus a hash of the names in each `site-packages`. That is enough because pip never
    /// updates a distribution in place: it moves the old files away (its `*.dist-info` and
    /// top-level entries leave `site-packages`) and installs new ones under a new
    /// `NAME-VERSION.dist-info`, so every change adds, removes or replaces an entry of
    /// `site-packages`. The names catch additions and removals even within one tick of the
    /// kernel's coarse file clock; the times catch a reinstall under the same names. A stamp
    /// file written by `ampoule setup` would miss plain pip. Not seen: a module file edited in
    /// place, and code outside the environment (the targets of `.pth` files, the system's
    /// site-packages).
    ///
    /// A path that does not exist is part of the fingerprint (as absent), so an environment
    /// that does not exist yet has one too.
    pub fn fingerprint(&self) -> Result<EnvFingerprint> {
        let mut stamps = Vec::new();
        for path in [
            self.python(),
            self.dir.join("pyvenv.cfg"),
            self.dir.join("lib"),
        ] {
            let stamp = Stamp::of(&path)?;
            stamps.push((path, stamp));
        }
        let lib = self.dir.join("lib");
        let mut site_dirs = Vec::new();
        match std::fs::read_dir(&lib) {
            Ok(entries) => {
                for entry in entries {
                    let entry =
                        entry.map_err(|e| Error::io(format!("reading {}", lib.display()), e))?;
                    if entry.file_name().to_string_lossy().starts_with("python") {
                        site_dirs.push(entry.path().join("site-packages"));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("reading {}", lib.display()), e)),
        }
        site_dirs.sort();
        let mut names = Vec::with_capacity(site_dirs.len());
        for path in site_dirs {
            names.push(entry_names_hash(&path)?);
            let stamp = Stamp::of(&path)?;
            stamps.push((path, stamp));
        }
        Ok(EnvFingerprint { stamps, names })
    }

    /// The pins that are not installed as pinned (`name==version (installed: …)`); empty when
    /// the environment is complete.
    pub fn outdated(&self) -> Result<Vec<String>> {
        if !self.exists() {
            return Ok(requirements()
                .into_iter()
                .map(|r| format!("{}=={} (missing)", r.name, r.version))
                .collect());
        }
        let installed = self.packages()?;
        Ok(requirements()
            .into_iter()
            .filter_map(|r| match installed.iter().find(|p| p.name == r.name) {
                Some(p) if p.version == r.version => None,
                Some(p) => Some(format!(
                    "{}=={} (installed: {})",
                    r.name, r.version, p.version
                )),
                None => Some(format!("{}=={} (missing)", r.name, r.version)),
            })
            .collect())
    }
}

/// What [`PythonEnv::fingerprint`] saw: compare two to know whether the environment changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFingerprint {
    stamps: Vec<(PathBuf, Option<Stamp>)>,
    /// Per `site-packages`, in the order of `stamps`: a hash of its sorted entry names.
    names: Vec<u64>,
}

/// A hash of the names in `dir` (sorted, so independent of the directory's order); 0 when
/// `dir` does not exist.
fn entry_names_hash(dir: &Path) -> Result<u64> {
    use std::hash::{Hash, Hasher};
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    };
    let mut names = entries
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    names.sort();
    // Fixed keys: the same names hash the same for the life of the process.
    let mut hasher = std::hash::DefaultHasher::new();
    names.hash(&mut hasher);
    Ok(hasher.finish())
}

/// Identity and times of one path (`None` in a fingerprint when it does not exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Result<Option<Self>> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(Self {
                dev: m.dev(),
                ino: m.ino(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
}

/// What [`setup_python`] is doing, for a progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetupEvent {
    /// Creating the virtual environment.
    CreatingEnv,
    /// pip starts resolving `total` pinned packages.
    Resolving {
        /// Number of pins.
        total: usize,
    },
    /// pip reached one package (downloaded or found it already satisfied).
    Collected {
        /// Its name.
        name: String,
    },
    /// pip is installing the downloaded packages.
    Installing {
        /// How many.
        count: usize,
    },
    /// Checking the result against the pins.
    Verifying,
}

/// Whether two paths name the same file once links are followed (`/usr/bin/python3` and
/// `/usr/bin/python3.11`); the paths themselves when either cannot be resolved.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// How [`setup_python`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupOutcome {
    /// Every pin was installed already; nothing ran.
    UpToDate,
    /// The environment was created or brought up to date.
    Installed,
}

/// Builds or refreshes the environment with `base_python` (`/usr/bin/python3`, or another
/// CPython: a newer one gives denser zygote pools, see `immortalize` in
/// kernels/python/zygote.py), reporting progress to `on_event`. An environment built from
/// another interpreter is refused ([`Error::OtherInterpreter`]), never rebuilt behind the
/// user's back. Needs network access to the package index unless the wheels are cached.
pub fn setup_python(
    env: &PythonEnv,
    base_python: &Path,
    on_event: &mut dyn FnMut(SetupEvent),
) -> Result<SetupOutcome> {
    if env.exists()
        && let Some(built_with) = env.base_interpreter()
        && !same_file(&built_with, base_python)
    {
        return Err(Error::OtherInterpreter {
            env: env.dir().to_owned(),
            built_with,
            asked: base_python.to_owned(),
        });
    }
    if env.exists() && env.outdated()?.is_empty() {
        return Ok(SetupOutcome::UpToDate);
    }
    // One setup at a time per environment; a second one waits, then finds it up to date.
    let _lock = lock(env)?;
    if env.exists() && env.outdated()?.is_empty() {
        return Ok(SetupOutcome::UpToDate);
    }
    if !env.exists() {
        on_event(SetupEvent::CreatingEnv);
        let usable = Command::new(base_python)
            .args(["-c", "import venv, ensurepip"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| Error::io(format!("running {}", base_python.display()), e))?;
        if !usable.success() {
            return Err(Error::VenvUnavailable {
                python: base_python.to_owned(),
            });
        }
        create_world_readable(env.dir().parent())?;
        run_quiet(
            "creating the virtual environment",
            umask_022(base_python).args(["-m", "venv"]).arg(env.dir()),
        )?;
    }
    let req_file = env.dir().join("ampoule-requirements.txt");
    std::fs::write(&req_file, REQUIREMENTS)
        .map_err(|e| Error::io(format!("writing {}", req_file.display()), e))?;
    on_event(SetupEvent::Resolving {
        total: requirements().len(),
    });
    pip_install(env, &req_file, on_event)?;
    on_event(SetupEvent::Verifying);
    let outdated = env.outdated()?;
    if !outdated.is_empty() {
        return Err(Error::Setup {
            step: "pip install".into(),
            detail: format!("still not as pinned: {}", outdated.join(", ")),
        });
    }
    Ok(SetupOutcome::Installed)
}

/// An exclusive lock on `<env>.lock`, held while the environment is built.
fn lock(env: &PythonEnv) -> Result<nix::fcntl::Flock<std::fs::File>> {
    create_world_readable(env.dir().parent())?;
    let mut name = env.dir().as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| Error::io(format!("locking {}", path.display()), errno.into()))
}

fn pip_install(
    env: &PythonEnv,
    req_file: &Path,
    on_event: &mut dyn FnMut(SetupEvent),
) -> Result<()> {
    let mut cmd = umask_022(&env.python());
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--only-binary=:all:",
        "--progress-bar",
        "off",
        "-r",
    ])
    .arg(req_file)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Error::io("starting pip", e))?;
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            let _ = s.read_to_string(&mut text);
        }
        text
    });
    let mut log = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(event) = pip_event(&line) {
                on_event(event);
            }
            log.push_str(&line);
            log.push('\n');
        }
    }
    let status = child.wait().map_err(|e| Error::io("waiting for pip", e))?;
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        return Err(Error::Setup {
            step: "pip install".into(),
            detail: tail(&format!("{log}{err}")),
        });
    }
    Ok(())
}

/// Turns one line of pip's output into a progress event.
fn pip_event(line: &str) -> Option<SetupEvent> {
    let name_of = |spec: &str| {
        let end = spec
            .find(['=', '<', '>', '!', '~', ' ', '[', ';'])
            .unwrap_or(spec.len());
        normalize(&spec[..end])
    };
    if let Some(rest) = line.strip_prefix("Collecting ") {
        return Some(SetupEvent::Collected {
            name: name_of(rest),
        });
    }
    if let Some(rest) = line.strip_prefix("Requirement already satisfied: ") {
        return Some(SetupEvent::Collected {
            name: name_of(rest),
        });
    }
    if let Some(rest) = line.strip_prefix("Installing collected packages: ") {
        return Some(SetupEvent::Installing {
            count: rest.split(',').count(),
        });
    }
    None
}

/// A command that runs `program` with umask 022 (the sandbox user must read what it creates).
fn umask_022(program: &Path) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "umask 022 && exec \"$@\"", "sh"])
        .arg(program);
    cmd
}

fn run_quiet(step: &str, cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(step.to_owned(), e))?;
    if !out.status.success() {
        return Err(Error::Setup {
            step: step.to_owned(),
            detail: tail(&format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        });
    }
    Ok(())
}

fn create_world_readable(dir: Option<&Path>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Some(dir) = dir else { return Ok(()) };
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(format!("setting permissions of {}", dir.display()), e))
}

/// The last lines of a command's output, for an error message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_cover_the_promised_packages() {
        let reqs = requirements();
        for name in [
            "numpy",
            "pandas",
            "matplotlib",
            "scipy",
            "scikit-learn",
            "openpyxl",
            "pyarrow",
            "requests",
            "setuptools",
        ] {
            assert!(reqs.iter().any(|r| r.name == name), "{name} is not pinned");
        }
        let setuptools = reqs.iter().find(|r| r.name == "setuptools").unwrap();
        let major: u32 = setuptools
            .version
            .split('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            major < 81,
            "setuptools {} has no pkg_resources",
            setuptools.version
        );
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize("Charset_Normalizer"), "charset-normalizer");
        assert_eq!(normalize("et_xmlfile"), "et-xmlfile");
        assert_eq!(normalize("zope..interface"), "zope-interface");
    }

    #[test]
    fn pip_lines_become_progress() {
        assert_eq!(
            pip_event("Collecting numpy==2.4.6 (from -r req.txt (line 4))"),
            Some(SetupEvent::Collected {
                name: "numpy".into()
            })
        );
        assert_eq!(
            pip_event("Requirement already satisfied: Pillow==13.0.0 in ./lib"),
            Some(SetupEvent::Collected {
                name: "pillow".into()
            })
        );
        assert_eq!(
            pip_event("Installing collected packages: a, b, c"),
            Some(SetupEvent::Installing { count: 3 })
        );
        assert_eq!(pip_event("  Downloading x.whl"), None);
    }

    #[test]
    fn the_setup_lock_is_exclusive_and_released() {
        let dir = std::env::temp_dir().join(format!("ampoule-lock-{}", std::process::id()));
        let env = PythonEnv::at(dir.join("python"));
        let held = lock(&env).unwrap();
        let second = std::fs::File::open(dir.join("python.lock")).unwrap();
        assert!(
            nix::fcntl::Flock::lock(second, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
        );
        drop(held);
        drop(lock(&env).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_environment_of_another_interpreter_is_refused_and_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("python3.11"), dir.path().join("python3.12"));
        for p in [&old, &new] {
            std::fs::write(p, "").unwrap();
        }
        let env = PythonEnv::at(dir.path().join("python"));
        std::fs::create_dir_all(env.dir().join("bin")).unwrap();
        std::fs::write(env.python(), "").unwrap();
        std::fs::set_permissions(env.python(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = format!(
            "home = {}\nversion = 3.11.2\nexecutable = {}\n",
            dir.path().display(),
            old.display()
        );
        std::fs::write(env.dir().join("pyvenv.cfg"), &cfg).unwrap();
        assert_eq!(env.base_interpreter(), Some(old.clone()));
        assert_eq!(env.python_version(), Some((3, 11)));

        let err = setup_python(&env, &new, &mut |_| {}).unwrap_err();
        assert!(
            matches!(&err, Error::OtherInterpreter { built_with, asked, .. }
                if *built_with == old && *asked == new),
            "{err}"
        );
        assert!(err.to_string().contains("rm -rf"), "{err}");
        assert_eq!(
            std::fs::read_to_string(env.dir().join("pyvenv.cfg")).unwrap(),
            cfg
        );
    }

    /// A fake venv at `dir`: the layout `python3 -m venv` makes, with one distribution.
    fn fake_env(dir: &Path) -> PythonEnv {
        let env = PythonEnv::at(dir);
        let site = env.dir().join("lib/python3.11/site-packages");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::create_dir_all(env.dir().join("bin")).unwrap();
        std::fs::write(env.python(), "").unwrap();
        std::fs::write(env.dir().join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        std::fs::create_dir(site.join("numpy-2.4.5.dist-info")).unwrap();
        env
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("ampoule-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn the_fingerprint_changes_when_packages_change() {
        let root = scratch_dir("fingerprint");
        let env = fake_env(&root.join("python"));
        let site = env.dir().join("lib/python3.11/site-packages");
        let before = env.fingerprint().unwrap();
        assert_eq!(
            env.fingerprint().unwrap(),
            before,
            "stable while nothing changes"
        );
        // What `pip install fakepkg` leaves behind.
        std::fs::write(site.join("fakepkg.py"), "VERSION = 1\n").unwrap();
        std::fs::create_dir(site.join("fakepkg-1.0.dist-info")).unwrap();
        let installed = env.fingerprint().unwrap();
        assert_ne!(installed, before, "a package was added");
        // An upgrade: pip moves the old distribution away and installs the new one.
        std::fs::rename(
            site.join("numpy-2.4.5.dist-info"),
            root.join("numpy-2.4.5.dist-info"),
        )
        .unwrap();
        std::fs::create_dir(site.join("numpy-2.4.6.dist-info")).unwrap();
        let upgraded = env.fingerprint().unwrap();
        assert_ne!(upgraded, installed, "a package was upgraded");
        // A removal.
        std::fs::remove_dir(site.join("fakepkg-1.0.dist-info")).unwrap();
        std::fs::remove_file(site.join("fakepkg.py")).unwrap();
        assert_ne!(
            env.fingerprint().unwrap(),
            upgraded,
            "a package was removed"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_fingerprint_changes_when_the_environment_is_created_or_rebuilt() {
        let root = scratch_dir("fingerprint-rebuilt");
        let env = PythonEnv::at(root.join("python"));
        let absent = env.fingerprint().unwrap();
        assert_eq!(env.fingerprint().unwrap(), absent);
        fake_env(env.dir());
        let built = env.fingerprint().unwrap();
        assert_ne!(built, absent, "the environment appeared");
        // Recreated under the same names: other inodes (unless reused) and later times, once
        // the kernel's coarse file clock has ticked (it does every few milliseconds).
        std::fs::remove_dir_all(env.dir()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        fake_env(env.dir());
        assert_ne!(
            env.fingerprint().unwrap(),
            built,
            "the environment was rebuilt"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_missing_environment_is_all_outdated() {
        let env = PythonEnv::at("/nonexistent/ampoule-env");
        assert!(!env.exists());
        assert_eq!(env.outdated().unwrap().len(), requirements().len());
    }
}
