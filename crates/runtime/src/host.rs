//! What the host offers to sandboxes, decided once per process: privilege mode, the runtime
//! directory, cgroups, and the pool of unique host uids (slots).
//!
//! A slot is a lock file `<runtime dir>/slots/<n>.lock` held with `flock` for as long as a
//! sandbox lives. It gives the sandbox a host uid nobody else uses (`uid_base + n`, root mode
//! only) and names its cgroup `sbx-<n>`. Because the kernel drops the lock when its holder dies,
//! a cgroup whose slot lock can be taken belongs to nobody: that is an orphan, and
//! [`Host::sweep_orphans`] kills and removes it.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::cgroup::CgroupRoot;
use crate::error::{Error, IoContext, Result};

/// Number of slots, hence of sandboxes that can live at once on one host.
pub const SLOTS: u32 = 16_384;

/// First host uid (and gid) given to sandboxes in root mode; far above any uid a distribution
/// hands out and above the ranges of `/etc/subuid` defaults.
pub const UID_BASE: u32 = 1_100_000_000;

/// Inside a zygote's user namespace, the uid (and gid) that stands for the host uid of slot `n`
/// is `ZYGOTE_SLOT_IDS + n` (see [`Host::zygote_id_map`]): each child of a zygote switches to
/// its slot's before it builds its own user namespace, so that it is charged, like a cold
/// sandbox, to a host uid of its own.
pub const ZYGOTE_SLOT_IDS: u32 = 100_000;

/// One line of a user namespace's uid or gid map: `count` ids from `inside` stand for the host
/// ids from `outside`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMapping {
    /// First id inside the namespace.
    pub inside: u32,
    /// First id outside (on the host).
    pub outside: u32,
    /// How many.
    pub count: u32,
}

/// How this process runs sandboxes.
#[derive(Debug, Clone)]
pub struct Host {
    /// Root in the initial user namespace: unique uid per sandbox, cgroups, privileged mounts.
    pub privileged: bool,
    /// Where slot locks and mount staging directories live.
    pub runtime_dir: PathBuf,
    /// Where sandbox cgroups go, when cgroups are usable.
    pub cgroups: Option<CgroupRoot>,
    /// The executable started as the sandbox init: the ampoule binary itself
    /// (`/proc/self/exe`, which keeps working when the file is replaced during an upgrade), or
    /// `AMPOULE_INIT_EXE` for test binaries and embedders that are not the ampoule binary.
    pub init_exe: PathBuf,
    /// An init forked ahead (see [`crate::prefork`]), for the first sandbox spawned here.
    preforked: std::sync::Arc<std::sync::Mutex<Option<crate::prefork::PreforkedInit>>>,
}

/// A reserved slot. Dropping it releases the lock.
#[derive(Debug)]
pub struct Slot {
    index: u32,
    _lock: Flock<File>,
}

impl Slot {
    /// The slot number.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The cgroup name of the sandbox in this slot.
    pub fn cgroup_name(&self) -> String {
        format!("sbx-{}", self.index)
    }
}

impl Host {
    /// Detects the mode from the effective uid and prepares the runtime directory and cgroups.
    pub fn detect() -> Result<Self> {
        let privileged = nix::unistd::geteuid().is_root();
        let runtime_dir = if privileged {
            PathBuf::from("/run/ampoule")
        } else if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR") {
            PathBuf::from(xdg).join("ampoule")
        } else {
            PathBuf::from(format!("/tmp/ampoule-{}", nix::unistd::geteuid()))
        };
        let cgroups = CgroupRoot::detect().filter(|root| root.prepare().is_ok());
        Self::with(privileged, runtime_dir, cgroups)
    }

    /// A host with explicit settings (tests).
    pub fn with(
        privileged: bool,
        runtime_dir: PathBuf,
        cgroups: Option<CgroupRoot>,
    ) -> Result<Self> {
        let host = Self {
            privileged,
            runtime_dir,
            cgroups,
            init_exe: std::env::var_os("AMPOULE_INIT_EXE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/proc/self/exe")),
            preforked: Default::default(),
        };
        for dir in [
            host.runtime_dir.clone(),
            host.slots_dir(),
            host.stage_dir(),
            host.scratch_mount_dir(),
        ] {
            // They exist but on a host's first run: one `stat` each, not `mkdir` and `stat`.
            let meta = match fs::metadata(&dir) {
                Ok(m) if m.is_dir() => m,
                _ => {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(&dir)
                        .ctx(|| format!("creating {}", dir.display()))?;
                    fs::metadata(&dir).ctx(|| format!("reading {}", dir.display()))?
                }
            };
            // The slots directory holds lock files only the supervisor should touch (set
            // again whenever someone changed it).
            if dir == host.slots_dir() && meta.permissions().mode() & 0o7777 != 0o700 {
                let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
            }
        }
        Ok(host)
    }

    fn slots_dir(&self) -> PathBuf {
        self.runtime_dir.join("slots")
    }

    /// The empty directory a sandbox mounts its new root on, inside its private mount
    /// namespace (so concurrent sandboxes never see each other's mounts).
    pub fn stage_dir(&self) -> PathBuf {
        self.runtime_dir.join("stage")
    }

    /// The empty directory a sandbox mounts its scratch tmpfs on before binding its parts.
    pub fn scratch_mount_dir(&self) -> PathBuf {
        self.runtime_dir.join("scratch")
    }

    /// Reserves a free slot.
    pub fn acquire_slot(&self) -> Result<Slot> {
        // Start at a pseudo-random place so concurrent processes rarely contend.
        let start = (std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0))
            % SLOTS;
        for i in 0..SLOTS {
            let index = (start + i) % SLOTS;
            if let Some(slot) = self.try_slot(index)? {
                return Ok(slot);
            }
        }
        Err(Error::NoSlot(SLOTS as usize))
    }

    fn try_slot(&self, index: u32) -> Result<Option<Slot>> {
        let path = self.slots_dir().join(format!("{index}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Slot { index, _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(Error::io(
                format!("locking {}", path.display()),
                std::io::Error::from(e),
            )),
        }
    }

    /// The host uid and gid of the sandbox in `slot`.
    pub fn ids_for(&self, slot: &Slot) -> (u32, u32) {
        if self.privileged {
            (UID_BASE + slot.index, UID_BASE + slot.index)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        }
    }

    /// The uid (= gid) map of a zygote's user namespace, the zygote holding `slot`: its own
    /// host id as root (0), and the host id of every other slot `n` as
    /// [`ZYGOTE_SLOT_IDS`]` + n`, so that a child can take the ids of the slot its request
    /// reserved. Privileged mode only (the map is written by real root). Mapping ranges may not
    /// overlap on either side, hence the gap at the zygote's own slot.
    pub fn zygote_id_map(&self, slot: &Slot) -> Vec<IdMapping> {
        let (own, _) = self.ids_for(slot);
        let n = slot.index;
        let mut map = vec![IdMapping {
            inside: 0,
            outside: own,
            count: 1,
        }];
        if n > 0 {
            map.push(IdMapping {
                inside: ZYGOTE_SLOT_IDS,
                outside: UID_BASE,
                count: n,
            });
        }
        if n + 1 < SLOTS {
            map.push(IdMapping {
                inside: ZYGOTE_SLOT_IDS + n + 1,
                outside: UID_BASE + n + 1,
                count: SLOTS - n - 1,
            });
        }
        map
    }

    /// The ids, inside a zygote's user namespace (see [`Host::zygote_id_map`]), of the sandbox
    /// in `slot`.
    pub fn zygote_ids_for(&self, slot: &Slot) -> (u32, u32) {
        (ZYGOTE_SLOT_IDS + slot.index, ZYGOTE_SLOT_IDS + slot.index)
    }

    /// Hands this host an init forked ahead: the next sandbox spawned on it (of the default
    /// tier, not a zygote, whose program reads no stdin) uses it instead of starting one.
    pub fn give_preforked_init(&self, init: crate::prefork::PreforkedInit) {
        *self
            .preforked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(init);
    }

    /// The init forked ahead, if one is waiting.
    pub(crate) fn take_preforked_init(&self) -> Option<crate::prefork::PreforkedInit> {
        self.preforked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Whether a sandbox cgroup or gVisor run directory (a live sandbox's, or a leftover) may
    /// exist: when not, [`Host::sweep_orphans`] has nothing to do. One `stat` per cgroup
    /// hierarchy and one of the gVisor runs' directory (its link count: two plus its
    /// subdirectories).
    pub fn may_have_orphans(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.cgroups
            .as_ref()
            .is_some_and(crate::cgroup::CgroupRoot::may_have_children)
            || fs::metadata(crate::gvisor::runs_dir(self)).is_ok_and(|m| m.nlink() != 2)
    }

    /// Kills and removes every sandbox cgroup, and every gVisor run directory, whose slot no
    /// live process holds: the leftovers of a supervisor that was killed mid-run. Returns how
    /// many were swept.
    pub fn sweep_orphans(&self) -> usize {
        let mut swept = crate::gvisor::sweep_orphans(self);
        let Some(root) = &self.cgroups else {
            return swept;
        };
        for name in root.children() {
            let Some(_slot) = self.orphan_slot(&name) else {
                continue;
            };
            let cg = root.open(&name);
            cg.kill_and_remove();
            tracing::info!(cgroup = %name, "swept orphaned sandbox");
            swept += 1;
        }
        swept
    }

    /// The slot of the sandbox named `name` (`sbx-<n>`: its cgroup, its gVisor run directory),
    /// locked, when no live process holds it: then the name is an orphan's. Holding the lock
    /// while sweeping keeps a new sandbox from taking the slot meanwhile.
    pub(crate) fn orphan_slot(&self, name: &str) -> Option<Slot> {
        let index = name.strip_prefix("sbx-")?.parse::<u32>().ok()?;
        self.try_slot(index).ok().flatten()
    }

    /// Whether `path` is inside the runtime directory (used to refuse binding it).
    pub fn owns(&self, path: &Path) -> bool {
        path.starts_with(&self.runtime_dir)
    }
}
