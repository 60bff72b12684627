//! One cgroup per sandbox, on cgroup v1 (one hierarchy per controller) or v2 (unified).
//!
//! Why hand-written: the job is a few dozen file writes (limits, `cgroup.procs`, stats, kill),
//! but it must work on both versions and on hybrid hosts; `cgroups-rs` is far heavier than that
//! and hakoniwa only speaks v2 through systemd.
//!
//! Layout: every sandbox cgroup lives in `<our own cgroup>/ampoule/sbx-<slot>` of each hierarchy
//! in use. The slot number ties it to a lock file (see [`crate::slot`]), which is how the orphan
//! sweep tells a live sandbox of another process from a leftover of a dead one.
//!
//! Invariants: a sandbox cgroup is only removed after every process in it is gone; killing goes
//! through the cgroup (v2 `cgroup.kill`, v1 freezer then `SIGKILL` to each listed process), never
//! through guessed pids.

use std::fs;
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ampoule_types::Limits;

use crate::error::{Error, Result};

/// Which cgroup version a host uses for sandbox limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

/// A v1 controller we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Memory,
    Pids,
    Cpu,
    Cpuacct,
    Freezer,
}

impl Controller {
    const ALL: [Controller; 5] = [
        Controller::Memory,
        Controller::Pids,
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Freezer,
    ];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Freezer => "freezer",
        }
    }
}

/// Where sandbox cgroups are created on this host, and what they can limit.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    version: CgroupVersion,
    /// v1: one base directory per controller (several controllers may share a directory when
    /// they are co-mounted). v2: a single entry.
    bases: Vec<(Vec<Controller>, PathBuf)>,
}

/// Reads a small generated file (`/proc`): with room for the whole of it from the first
/// `read`. (`fs::read_to_string` sees a size of 0 and starts at 32 bytes, doubling: 6–9
/// reads of a 1–3 KiB file, each a system call, on every `ampoule run`.)
pub(crate) fn read_proc(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::with_capacity(16 * 1024);
    fs::File::open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// What one line of `/proc/self/mountinfo` says about a cgroup mount.
#[derive(Debug, Clone, PartialEq)]
struct CgroupMount {
    root: String,
    mount_point: PathBuf,
    v2: bool,
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let fstype = r[0];
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        out.push(CgroupMount {
            root: unescape_octal(l[3]),
            mount_point: PathBuf::from(unescape_octal(l[4])),
            v2: fstype == "cgroup2",
            controllers: r[2].split(',').map(str::to_owned).collect(),
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/cgroup` into (controllers, path) pairs; v2 has an empty controller list.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let _id = it.next()?;
            let ctl = it.next()?;
            let path = it.next()?;
            let ctls = if ctl.is_empty() {
                Vec::new()
            } else {
                ctl.split(',').map(str::to_owned).collect()
            };
            Some((ctls, path.to_owned()))
        })
        .collect()
}

/// Joins a mount point and our cgroup path, removing the mount's own root prefix.
fn own_dir(mount: &CgroupMount, own_path: &str) -> PathBuf {
    let rel = own_path
        .strip_prefix(mount.root.as_str())
        .unwrap_or(own_path)
        .trim_start_matches('/');
    if rel.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rel)
    }
}

impl CgroupRoot {
    /// Finds where this process may create sandbox cgroups. Prefers v1 controllers when the
    /// memory controller is bound to v1 (as on this project's CI); otherwise uses v2 when its
    /// hierarchy offers the memory and pids controllers. `None` when neither can limit memory.
    pub fn detect() -> Option<Self> {
        Self::detect_with_leaf("ampoule")
    }

    /// Like [`CgroupRoot::detect`], with another directory name under our own cgroup (the
    /// containment suite gives every test its own).
    pub fn detect_with_leaf(leaf: &str) -> Option<Self> {
        let mountinfo = read_proc("/proc/self/mountinfo").ok()?;
        let own = read_proc("/proc/self/cgroup").ok()?;
        Self::from_tables(&mountinfo, &own, leaf)
    }

    fn from_tables(mountinfo: &str, own: &str, leaf: &str) -> Option<Self> {
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_proc_cgroup(own);
        // v1: a hierarchy per controller.
        let mut bases: Vec<(Vec<Controller>, PathBuf)> = Vec::new();
        for ctl in Controller::ALL {
            let Some(mount) = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctl.name()))
            else {
                continue;
            };
            let Some((_, path)) = own
                .iter()
                .find(|(ctls, _)| ctls.iter().any(|c| c == ctl.name()))
            else {
                continue;
            };
            let dir = own_dir(mount, path).join(leaf);
            if let Some(entry) = bases.iter_mut().find(|(_, d)| *d == dir) {
                entry.0.push(ctl);
            } else {
                bases.push((vec![ctl], dir));
            }
        }
        let has = |c: Controller| bases.iter().any(|(cs, _)| cs.contains(&c));
        if has(Controller::Memory) && has(Controller::Pids) {
            return Some(Self {
                version: CgroupVersion::V1,
                bases,
            });
        }
        // v2: the unified hierarchy, if it has the controllers we need.
        let mount = mounts.iter().find(|m| m.v2)?;
        let (_, path) = own.iter().find(|(ctls, _)| ctls.is_empty())?;
        let dir = own_dir(mount, path);
        let available = fs::read_to_string(mount.mount_point.join("cgroup.controllers")).ok()?;
        let available: Vec<&str> = available.split_whitespace().collect();
        if !available.contains(&"memory") || !available.contains(&"pids") {
            return None;
        }
        Some(Self {
            version: CgroupVersion::V2,
            bases: vec![(
                vec![Controller::Memory, Controller::Pids, Controller::Cpu],
                dir.join(leaf),
            )],
        })
    }

    /// A root that places cgroups under explicit directories (tests, and operators who delegate
    /// a fixed subtree).
    pub fn v2_at(dir: impl Into<PathBuf>) -> Self {
        Self {
            version: CgroupVersion::V2,
            bases: vec![(
                vec![Controller::Memory, Controller::Pids, Controller::Cpu],
                dir.into(),
            )],
        }
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The controllers sandboxes get (for `doctor`).
    pub fn controllers(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self
            .bases
            .iter()
            .flat_map(|(cs, _)| cs.iter().map(|c| c.name()))
            .collect();
        v.sort_unstable();
        v
    }

    /// The base directories (one per v1 hierarchy).
    pub fn base_dirs(&self) -> impl Iterator<Item = &Path> {
        self.bases.iter().map(|(_, d)| d.as_path())
    }

    /// Creates the base directories and, on v2, delegates the controllers down to them; fails
    /// unless this process may create sandbox cgroups under every one of them (as root, or in a
    /// cgroup delegated to the user).
    pub fn prepare(&self) -> Result<()> {
        let writable = |dir: &Path| {
            nix::unistd::access(
                dir,
                nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
            )
        };
        for (_, dir) in &self.bases {
            // Made on the host's first run: after that one `access` each, which both finds the
            // directory and says whether we may make cgroups in it (`create_dir_all` would try
            // `mkdir` first, then check what exists).
            if writable(dir).is_ok() {
                continue;
            }
            fs::create_dir_all(dir).map_err(|e| cg_err(dir, "create", &e))?;
            writable(dir)
                .map_err(|e| cg_err(dir, "may not make cgroups in it", &std::io::Error::from(e)))?;
        }
        if self.version == CgroupVersion::V2 {
            let (_, base) = &self.bases[0];
            if let Some(parent) = base.parent()
                && let Err(e) = enable_v2_controllers(parent)
            {
                // v2's "no internal processes" rule: our own cgroup cannot hand controllers
                // down while it holds processes (us). Move ourselves into a leaf beside the
                // sandboxes, as a delegated service manager would, and try again.
                let leaf = parent.join("supervisor");
                fs::create_dir_all(&leaf).map_err(|e| cg_err(&leaf, "create", &e))?;
                let procs = leaf.join("cgroup.procs");
                fs::write(&procs, std::process::id().to_string())
                    .map_err(|e| cg_err(&procs, "move the supervisor", &e))?;
                enable_v2_controllers(parent).map_err(|_| e)?;
            }
            enable_v2_controllers(base)?;
        }
        Ok(())
    }

    /// Creates the cgroup of one sandbox with its limits applied.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<Cgroup> {
        let mut dirs = Vec::with_capacity(self.bases.len());
        for (ctls, base) in &self.bases {
            let dir = base.join(name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    // A leftover of a crashed run with the same slot: empty it first.
                    let stale = Cgroup {
                        version: self.version,
                        dirs: vec![(ctls.clone(), dir.clone())],
                        counters: Arc::default(),
                    };
                    stale.kill_and_remove();
                    fs::create_dir(&dir).map_err(|e| cg_err(&dir, "create", &e))?;
                }
                Err(e) => return Err(cg_err(&dir, "create", &e)),
            }
            dirs.push((ctls.clone(), dir));
        }
        let cg = Cgroup {
            version: self.version,
            dirs,
            counters: Arc::default(),
        };
        if let Err(e) = cg.apply_limits(limits) {
            cg.kill_and_remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Whether any base directory may hold a sandbox cgroup. A directory's link count is two
    /// plus its subdirectories on cgroupfs (kernfs) as on most filesystems, so one `stat` per
    /// base tells "none" without listing the ~30 control files of each; a count of 1 means the
    /// filesystem does not keep it, and answers "maybe".
    pub fn may_have_children(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.bases
            .iter()
            .any(|(_, base)| fs::metadata(base).is_ok_and(|m| m.nlink() != 2))
    }

    /// Names of the sandbox cgroups that exist under the base directories.
    pub fn children(&self) -> Vec<String> {
        let mut names = Vec::new();
        if !self.may_have_children() {
            return names;
        }
        for (_, base) in &self.bases {
            let Ok(rd) = fs::read_dir(base) else { continue };
            for entry in rd.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with("sbx-") && !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names
    }

    /// Handle on an existing sandbox cgroup, for the orphan sweep.
    pub fn open(&self, name: &str) -> Cgroup {
        Cgroup {
            version: self.version,
            counters: Arc::default(),
            dirs: self
                .bases
                .iter()
                .map(|(c, b)| (c.clone(), b.join(name)))
                .filter(|(_, d)| d.is_dir())
                .collect(),
        }
    }
}

/// Writes `pid` into each `cgroup.procs` file (usable from a blocking thread).
pub fn attach_files(files: &[PathBuf], pid: u32) -> Result<()> {
    for f in files {
        fs::write(f, pid.to_string()).map_err(|e| cg_err(f, "attach", &e))?;
    }
    Ok(())
}

fn enable_v2_controllers(dir: &Path) -> Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&file).unwrap_or_default();
    for ctl in ["memory", "pids", "cpu"] {
        if current.split_whitespace().any(|c| c == ctl) {
            continue;
        }
        if let Err(e) = fs::write(&file, format!("+{ctl}")) {
            // cpu is optional; memory and pids are not.
            if ctl != "cpu" {
                return Err(cg_err(&file, &format!("enable +{ctl}"), &e));
            }
        }
    }
    Ok(())
}

fn cg_err(path: &Path, what: &str, e: &io::Error) -> Error {
    Error::Cgroup {
        path: path.to_owned(),
        what: format!("{what}: {e}"),
    }
}

/// Resource figures read from a sandbox cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CgroupStats {
    /// CPU time of every process that ran in the cgroup, in nanoseconds.
    pub cpu_ns: Option<u64>,
    /// Peak memory usage in bytes.
    pub peak_memory: Option<u64>,
    /// How often the OOM killer fired in the cgroup.
    pub oom_kills: u64,
    /// How often `pids.max` refused a fork.
    pub pids_max_hits: u64,
}

/// The cgroup of one sandbox (one directory per v1 hierarchy, or one v2 directory).
#[derive(Debug, Clone)]
pub struct Cgroup {
    version: CgroupVersion,
    dirs: Vec<(Vec<Controller>, PathBuf)>,
    /// The counter files [`Cgroup::stats`] reads, kept open once read (shared by clones):
    /// every execution reads them twice, and a reopen walks the long cgroup path each time.
    counters: Arc<Mutex<Vec<(&'static str, fs::File)>>>,
}

impl Cgroup {
    fn dir(&self, ctl: Controller) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(cs, _)| cs.contains(&ctl))
            .map(|(_, d)| d.as_path())
    }

    fn write(&self, ctl: Controller, file: &str, value: &str) -> Result<()> {
        let Some(dir) = self.dir(ctl) else {
            return Ok(());
        };
        let path = dir.join(file);
        fs::write(&path, value).map_err(|e| cg_err(&path, &format!("write {value:?}"), &e))
    }

    fn read(&self, ctl: Controller, file: &str) -> Option<String> {
        fs::read_to_string(self.dir(ctl)?.join(file)).ok()
    }

    /// A counter file's text, through a descriptor kept open: a read from offset 0 makes the
    /// kernel render the file afresh.
    fn read_counter(&self, ctl: Controller, file: &'static str) -> Option<String> {
        let mut open = self.counters.lock().ok()?;
        let at = match open.iter().position(|(f, _)| *f == file) {
            Some(i) => i,
            None => {
                open.push((file, fs::File::open(self.dir(ctl)?.join(file)).ok()?));
                open.len() - 1
            }
        };
        let f = &open[at].1;
        let mut buf = [0u8; 4096];
        let mut len = 0;
        while len < buf.len() {
            match f.read_at(&mut buf[len..], len as u64) {
                Ok(0) => break,
                // A short read is the end: the kernel's seq_file fills the buffer while it
                // has more to render. One system call per counter instead of two.
                Ok(n) if len + n < buf.len() => {
                    len += n;
                    break;
                }
                Ok(n) => len += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        String::from_utf8(buf[..len].to_vec()).ok()
    }

    fn apply_limits(&self, limits: &Limits) -> Result<()> {
        let mem = limits.memory_mib.saturating_mul(1024 * 1024).to_string();
        let pids = limits.pids.max(1).to_string();
        let period: u64 = 100_000;
        let quota = ((limits.cpus.max(0.01)) * period as f64) as u64;
        match self.version {
            CgroupVersion::V1 => {
                self.write(Controller::Memory, "memory.limit_in_bytes", &mem)?;
                // memsw exists only with swap accounting; without it there is no swap to limit.
                if self
                    .dir(Controller::Memory)
                    .is_some_and(|d| d.join("memory.memsw.limit_in_bytes").exists())
                {
                    self.write(Controller::Memory, "memory.memsw.limit_in_bytes", &mem)?;
                }
                let _ = self.write(Controller::Memory, "memory.swappiness", "0");
                self.write(Controller::Pids, "pids.max", &pids)?;
                if self.dir(Controller::Cpu).is_some() {
                    self.write(Controller::Cpu, "cpu.cfs_period_us", &period.to_string())?;
                    self.write(Controller::Cpu, "cpu.cfs_quota_us", &quota.to_string())?;
                }
            }
            CgroupVersion::V2 => {
                self.write(Controller::Memory, "memory.max", &mem)?;
                let _ = self.write(Controller::Memory, "memory.swap.max", "0");
                let _ = self.write(Controller::Memory, "memory.oom.group", "1");
                self.write(Controller::Pids, "pids.max", &pids)?;
                let _ = self.write(Controller::Cpu, "cpu.max", &format!("{quota} {period}"));
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files the sandbox init writes its own pid to (one per hierarchy).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// The v1 `tasks` files a single-threaded process writes `0` to, to move itself without the
    /// global threadgroup lock; empty on v2 (use [`Cgroup::attach`]).
    pub fn self_join_files(&self) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V1 => self.dirs.iter().map(|(_, d)| d.join("tasks")).collect(),
            CgroupVersion::V2 => Vec::new(),
        }
    }

    /// The files a single-threaded process writes `0` to, to move itself into this cgroup:
    /// `tasks` on v1 (see [`Cgroup::self_join_files`]), `cgroup.procs` on v2.
    pub(crate) fn join_files(&self) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V1 => self.self_join_files(),
            CgroupVersion::V2 => self.procs_files(),
        }
    }

    /// Moves process `pid` into this cgroup (every hierarchy on v1).
    ///
    /// On cgroup v1 the first move after a quiet period waits for an RCU grace period (the
    /// kernel's threadgroup lock; about 14 ms on a small VM), so callers overlap it with other
    /// work rather than wait for it on the critical path.
    pub fn attach(&self, pid: u32) -> Result<()> {
        attach_files(&self.procs_files(), pid)
    }

    /// Reads usage figures and limit events.
    pub fn stats(&self) -> CgroupStats {
        let kv = |text: Option<String>, key: &str| -> Option<u64> {
            text?.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        };
        match self.version {
            CgroupVersion::V1 => CgroupStats {
                cpu_ns: self
                    .read_counter(Controller::Cpuacct, "cpuacct.usage")
                    .and_then(|s| s.trim().parse().ok()),
                peak_memory: self
                    .read_counter(Controller::Memory, "memory.max_usage_in_bytes")
                    .and_then(|s| s.trim().parse().ok()),
                oom_kills: kv(
                    self.read_counter(Controller::Memory, "memory.oom_control"),
                    "oom_kill",
                )
                .unwrap_or(0),
                pids_max_hits: kv(self.read_counter(Controller::Pids, "pids.events"), "max")
                    .unwrap_or(0),
            },
            CgroupVersion::V2 => CgroupStats {
                cpu_ns: kv(self.read_counter(Controller::Cpu, "cpu.stat"), "usage_usec")
                    .map(|us| us * 1000),
                peak_memory: self
                    .read_counter(Controller::Memory, "memory.peak")
                    .and_then(|s| s.trim().parse().ok()),
                oom_kills: kv(
                    self.read_counter(Controller::Memory, "memory.events"),
                    "oom_kill",
                )
                .unwrap_or(0),
                pids_max_hits: kv(self.read_counter(Controller::Pids, "pids.events"), "max")
                    .unwrap_or(0),
            },
        }
    }

    /// Pids listed in the cgroup (the one authoritative list of the sandbox's processes).
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for (_, d) in &self.dirs {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    if !out.contains(&pid) {
                        out.push(pid);
                    }
                }
            }
        }
        out
    }

    /// Kills every process in the cgroup and waits (briefly) until none is left.
    pub fn kill(&self) {
        match self.version {
            CgroupVersion::V2 => {
                let killed = self
                    .dir(Controller::Memory)
                    .map(|d| fs::write(d.join("cgroup.kill"), "1").is_ok())
                    .unwrap_or(false);
                if !killed {
                    self.kill_listed();
                }
            }
            CgroupVersion::V1 => {
                // Freeze first so a fork bomb cannot outrun the kill loop.
                let frozen = self
                    .write(Controller::Freezer, "freezer.state", "FROZEN")
                    .is_ok()
                    && self.dir(Controller::Freezer).is_some();
                if frozen {
                    let deadline = Instant::now() + Duration::from_millis(500);
                    while Instant::now() < deadline {
                        match self.read(Controller::Freezer, "freezer.state") {
                            Some(s) if s.trim() == "FROZEN" => break,
                            _ => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                }
                self.kill_listed();
                if frozen {
                    let _ = self.write(Controller::Freezer, "freezer.state", "THAWED");
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.pids().is_empty() && Instant::now() < deadline {
            self.kill_listed();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn kill_listed(&self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// One attempt at removing every directory; whether none is left.
    fn remove_once(&self) -> bool {
        let mut gone = true;
        for (_, d) in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(_) => gone = false,
            }
        }
        gone
    }

    /// Removes the cgroup directories. Fails if processes remain.
    pub fn remove(&self) -> Result<()> {
        for (_, d) in &self.dirs {
            let mut tries = 0;
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 200 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(cg_err(d, "remove", &e)),
                }
            }
        }
        Ok(())
    }

    /// Kills what is left and removes the directories, logging (not returning) failures: used
    /// on every exit path, including drops.
    pub fn kill_and_remove(&self) {
        // At the end of a run the cgroup is usually empty already (its pid namespace died with
        // the init, which was reaped): remove it at once, and only list and kill what is left
        // when the kernel refuses (`EBUSY`: processes remain). Saves reading every
        // `cgroup.procs` on the path of each `ampoule run`.
        if self.remove_once() {
            return;
        }
        if !self.pids().is_empty() {
            self.kill();
        }
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "could not remove sandbox cgroup");
        }
    }

    /// Freezes every process in the cgroup (v1 `freezer.state`, v2 `cgroup.freeze`) and waits
    /// until they all are: their memory stays, they get no CPU and see nothing of it.
    pub fn freeze(&self) -> Result<()> {
        self.set_frozen(true)
    }

    /// Thaws what [`Cgroup::freeze`] froze.
    pub fn thaw(&self) -> Result<()> {
        self.set_frozen(false)
    }

    /// Whether the cgroup is frozen.
    pub fn frozen(&self) -> bool {
        match self.version {
            CgroupVersion::V1 => self
                .read(Controller::Freezer, "freezer.state")
                .is_some_and(|s| s.trim() == "FROZEN"),
            CgroupVersion::V2 => self
                .read(Controller::Memory, "cgroup.events")
                .is_some_and(|s| s.lines().any(|l| l.trim() == "frozen 1")),
        }
    }

    fn set_frozen(&self, on: bool) -> Result<()> {
        let (ctl, file, value) = match (self.version, on) {
            (CgroupVersion::V1, true) => (Controller::Freezer, "freezer.state", "FROZEN"),
            (CgroupVersion::V1, false) => (Controller::Freezer, "freezer.state", "THAWED"),
            (CgroupVersion::V2, true) => (Controller::Memory, "cgroup.freeze", "1"),
            (CgroupVersion::V2, false) => (Controller::Memory, "cgroup.freeze", "0"),
        };
        let Some(dir) = self.dir(ctl) else {
            return Err(Error::Cgroup {
                path: PathBuf::new(),
                what: "no freezer hierarchy is mounted".into(),
            });
        };
        self.write(ctl, file, value)?;
        // v1 reports FREEZING until every task is in the refrigerator; v2 `frozen 1` once the
        // whole cgroup is. Thawing is immediate on both.
        //
        // v1 asks each task to freeze once, when FROZEN is written. A task caught between its
        // `vfork` and its sleep waiting for the child (dash runs every command so, and
        // `posix_spawn` too) is asked while running, then sleeps unfrozen, waiting for a child
        // that froze before its `exec`: FREEZING for good. Thawing and asking again gets past
        // it (the child execs meanwhile); v2 counts a `vfork` parent as frozen by itself. The
        // wait before asking again doubles (20, 40, 80 ms…), so a large cgroup that is merely
        // slow to freeze is not thawed over and over.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut patience = Duration::from_millis(20);
        let mut ask_again = Instant::now() + patience;
        while on && !self.frozen() {
            if self.version == CgroupVersion::V1 && Instant::now() >= ask_again {
                self.write(ctl, file, "THAWED")?;
                std::thread::sleep(Duration::from_millis(1));
                self.write(ctl, file, value)?;
                patience = patience.saturating_mul(2);
                ask_again = Instant::now() + patience;
            }
            if Instant::now() >= deadline {
                let _ = self.write(
                    ctl,
                    file,
                    if self.version == CgroupVersion::V1 {
                        "THAWED"
                    } else {
                        "0"
                    },
                );
                return Err(Error::Cgroup {
                    path: dir.to_path_buf(),
                    what: "its processes did not freeze within 5 s".into(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// The cgroup version of this cgroup.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The directories of this cgroup.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d)| d.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
37 33 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
38 33 0:33 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
39 33 0:34 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,cpu,cpuacct
40 33 0:35 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:18 - cgroup cgroup rw,freezer
";
    const PROC_CGROUP_V1: &str = "\
9:freezer:/
8:pids:/user.slice
4:memory:/process_api/abc
2:cpu,cpuacct:/
0::/user.slice/session-1.scope
";

    #[test]
    fn v1_bases_follow_our_own_cgroup_per_hierarchy() {
        let root = CgroupRoot::from_tables(MOUNTINFO_V1, PROC_CGROUP_V1, "ampoule").unwrap();
        assert_eq!(root.version(), CgroupVersion::V1);
        let dirs: Vec<_> = root.base_dirs().map(Path::to_path_buf).collect();
        assert!(dirs.contains(&PathBuf::from(
            "/sys/fs/cgroup/memory/process_api/abc/ampoule"
        )));
        assert!(dirs.contains(&PathBuf::from("/sys/fs/cgroup/pids/user.slice/ampoule")));
        // cpu and cpuacct are co-mounted: one directory serves both.
        assert!(dirs.contains(&PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/ampoule")));
        assert_eq!(dirs.len(), 4);
        assert_eq!(
            root.controllers(),
            vec!["cpu", "cpuacct", "freezer", "memory", "pids"]
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_octal(r"/a\040b"), "/a b");
        assert_eq!(unescape_octal(r"/plain"), "/plain");
    }

    #[test]
    fn children_are_listed_only_when_a_base_has_subdirectories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = CgroupRoot::v2_at(tmp.path());
        fs::write(tmp.path().join("memory.max"), "max\n").unwrap();
        assert!(!root.may_have_children(), "control files are not children");
        assert!(root.children().is_empty());
        fs::create_dir(tmp.path().join("sbx-3")).unwrap();
        assert!(root.may_have_children());
        assert_eq!(root.children(), ["sbx-3"]);
    }

    #[test]
    fn v2_limits_and_stats_use_the_unified_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = CgroupRoot::v2_at(tmp.path());
        let cg = root
            .create(
                "sbx-7",
                &Limits {
                    memory_mib: 64,
                    pids: 10,
                    cpus: 0.5,
                    ..Limits::default()
                },
            )
            .unwrap();
        let dir = tmp.path().join("sbx-7");
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("memory.oom.group"), "1");
        assert_eq!(read("pids.max"), "10");
        assert_eq!(read("cpu.max"), "50000 100000");
        fs::write(dir.join("memory.events"), "low 0\noom 2\noom_kill 1\n").unwrap();
        fs::write(dir.join("pids.events"), "max 3\n").unwrap();
        fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        fs::write(dir.join("memory.peak"), "4096\n").unwrap();
        let s = cg.stats();
        assert_eq!(s.oom_kills, 1);
        assert_eq!(s.pids_max_hits, 3);
        assert_eq!(s.cpu_ns, Some(1_500_000));
        assert_eq!(s.peak_memory, Some(4096));
        // Read again through the descriptors kept open: the new values, not the first ones
        // (the files rewritten in place, as the kernel renders them afresh).
        fs::write(
            dir.join("pids.events"),
            "max 12
",
        )
        .unwrap();
        fs::write(
            dir.join("memory.events"),
            "low 0
oom 3
oom_kill 2
",
        )
        .unwrap();
        let again = cg.clone().stats();
        assert_eq!((again.pids_max_hits, again.oom_kills), (12, 2));
        let kept: Vec<&str> = cg
            .counters
            .lock()
            .unwrap()
            .iter()
            .map(|(f, _)| *f)
            .collect();
        assert_eq!(kept.len(), 4, "kept open once read: {kept:?}");
        assert_eq!(cg.procs_files(), vec![dir.join("cgroup.procs")]);
        assert_eq!(root.children(), vec!["sbx-7".to_owned()]);
    }
}
