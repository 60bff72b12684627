//! Durable sandboxes: the lifecycle policy (what idleness, time and the sandbox's end do to
//! it), its states, and what is written down of it under the server's data directory so that
//! it outlives idleness, a restart and a crash of the server (PRODUCT.md §7).
//!
//! States: `running` → `paused` (its processes frozen by the engine, memory kept, no CPU) →
//! `hibernated` (nothing of it runs: its files are on its disk image, its record in
//! `sandbox.json`; its memory is kept only when the engine can checkpoint it, the gVisor tier
//! without network, into `checkpoint/` beside the disk; every door reports which as
//! `session_state: "kept" | "lost"`) → running again when any call names it.
//!
//! Invariants: a durable sandbox's files live on a disk image under
//! `<data_dir>/sandboxes/<id>/` from its creation, so a crash of the server loses no file;
//! its record is written (atomically, mode 0600, its directory 0700) at creation and at every
//! transition, so the server started again lists it as hibernated. Ids read back from disk are
//! checked before they name a path.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What an idle sandbox becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    /// Frozen in memory.
    Pause,
    /// Written to disk, nothing running.
    Hibernate,
    /// Destroyed.
    Delete,
}

impl OnIdle {
    /// From its config name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pause" => Some(OnIdle::Pause),
            "hibernate" => Some(OnIdle::Hibernate),
            "delete" => Some(OnIdle::Delete),
            _ => None,
        }
    }
}

/// What a sandbox becomes at the end of its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Destroyed (the default).
    Delete,
    /// Hibernated (E2B's `autoPause`).
    Hibernate,
}

/// A lifecycle policy, per pool (`[pools.X.lifecycle]`) and per sandbox (its fields override
/// the pool's). Durations in seconds, as in the config and the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lifecycle {
    /// What idleness does (none: a session is deleted after the pool's idle timeout, a
    /// sandbox lives until its timeout however idle).
    pub on_idle: Option<OnIdle>,
    /// Idle time before `on_idle` (default: the pool's idle timeout).
    pub idle_timeout_s: Option<u64>,
    /// Paused time before a paused sandbox is hibernated.
    pub hibernate_after_s: Option<u64>,
    /// Paused or hibernated time before it is deleted.
    pub delete_after_s: Option<u64>,
    /// Age (from its creation, whatever its states since) at which it is deleted.
    pub max_lifetime_s: Option<u64>,
    /// What the end of its timeout does.
    pub on_timeout: Option<OnTimeout>,
    /// Whether its files live on a disk image (default: when the policy can hibernate or
    /// pause it).
    pub durable: Option<bool>,
}

impl Lifecycle {
    /// `over`'s fields where it has them, else ours.
    pub fn merged(&self, over: &Lifecycle) -> Lifecycle {
        Lifecycle {
            on_idle: over.on_idle.or(self.on_idle),
            idle_timeout_s: over.idle_timeout_s.or(self.idle_timeout_s),
            hibernate_after_s: over.hibernate_after_s.or(self.hibernate_after_s),
            delete_after_s: over.delete_after_s.or(self.delete_after_s),
            max_lifetime_s: over.max_lifetime_s.or(self.max_lifetime_s),
            on_timeout: over.on_timeout.or(self.on_timeout),
            durable: over.durable.or(self.durable),
        }
    }

    /// Whether the sandbox keeps its files on disk: asked for, or implied by a policy that
    /// pauses or hibernates it (a paused sandbox must survive a crash of the server too).
    pub fn is_durable(&self) -> bool {
        self.durable.unwrap_or(
            matches!(self.on_idle, Some(OnIdle::Pause | OnIdle::Hibernate))
                || self.hibernate_after_s.is_some()
                || self.on_timeout == Some(OnTimeout::Hibernate),
        )
    }

    /// Checks the values (zero durations are refused: they would act at once).
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("idle_timeout_s", self.idle_timeout_s),
            ("hibernate_after_s", self.hibernate_after_s),
            ("delete_after_s", self.delete_after_s),
            ("max_lifetime_s", self.max_lifetime_s),
        ] {
            if v == Some(0) {
                return Err(format!("lifecycle.{name} must be at least 1 second"));
            }
        }
        if self.durable == Some(false)
            && (matches!(self.on_idle, Some(OnIdle::Hibernate))
                || self.hibernate_after_s.is_some()
                || self.on_timeout == Some(OnTimeout::Hibernate))
        {
            return Err(
                "lifecycle: a sandbox that is not durable cannot be hibernated (drop \
                 `durable = false`)"
                    .into(),
            );
        }
        Ok(())
    }

    pub(crate) fn secs(v: Option<u64>) -> Option<Duration> {
        v.map(Duration::from_secs)
    }
}

/// A sandbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Its processes run.
    Running,
    /// Frozen, memory kept.
    Paused,
    /// On disk, nothing running.
    Hibernated,
}

impl State {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Hibernated => "hibernated",
        }
    }

    /// From its wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(State::Running),
            "paused" => Some(State::Paused),
            "hibernated" => Some(State::Hibernated),
            _ => None,
        }
    }
}

/// What is written down of a durable sandbox (`sandbox.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) version: u32,
    pub(crate) id: String,
    pub(crate) tenant: String,
    pub(crate) pool: String,
    pub(crate) identifier: String,
    pub(crate) is_sandbox: bool,
    pub(crate) created_at_ms: i64,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) envs: BTreeMap<String, String>,
    pub(crate) access_token: String,
    pub(crate) traffic_token: String,
    /// Milliseconds of its timeout left when it stopped running (`None`: a session).
    pub(crate) life_left_ms: Option<u64>,
    pub(crate) lifecycle: Lifecycle,
    /// When it was hibernated (`None` while it runs: read back after a crash, it is
    /// hibernated from the moment the server starts again).
    pub(crate) hibernated_at_ms: Option<i64>,
    /// Hibernated with its memory: the engine checkpointed it into [`Store::checkpoint`]
    /// (gVisor tier), and it is restored from there. `false` for a running sandbox's record.
    #[serde(default)]
    pub(crate) memory_kept: bool,
}

pub(crate) const RECORD_VERSION: u32 = 1;

/// Whether `id` may name a directory: a sandbox's or session's id as the manager makes them.
pub(crate) fn valid_id(id: &str) -> bool {
    let rest = id.strip_prefix("sbx_").or_else(|| id.strip_prefix("ses_"));
    // `<hex>`, or `<hex>_<replica>` in a cluster (the replica: letters and digits).
    rest.is_some_and(|r| {
        let (hex, replica) = r.split_once('_').unwrap_or((r, "x"));
        !hex.is_empty()
            && r.len() <= 64
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
            && !replica.is_empty()
            && replica.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// The durable sandboxes' directory, `<data_dir>/sandboxes`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Why the store could not do something (logged; the commands answer an internal error).
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct StoreError {
    what: &'static str,
    path: String,
    #[source]
    source: std::io::Error,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.display().to_string();
    move |source| StoreError { what, path, source }
}

impl Store {
    /// The store under `dir` (made, mode 0700, when missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io("creating", &dir))?;
        Ok(Self { dir })
    }

    /// Where it lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The disk image of a sandbox (made by the engine on first start).
    pub fn disk(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("disk.img")
    }

    /// Where a sandbox hibernated with its memory keeps its checkpoint image (a directory,
    /// mode 0700, beside its disk; removed with the sandbox's directory, and as soon as the
    /// sandbox runs again).
    pub fn checkpoint(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("checkpoint")
    }

    /// Removes a sandbox's checkpoint image, if it has one.
    pub(crate) fn remove_checkpoint(&self, id: &str) {
        if !valid_id(id) {
            return;
        }
        let dir = self.checkpoint(id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %dir.display(), error = %e, "removing a checkpoint image");
        }
    }

    /// Bytes a sandbox's disk really takes (its allocated blocks).
    pub fn allocated(&self, id: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.disk(id))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }

    /// Writes a sandbox's record: a temporary file, mode 0600, synced and renamed.
    pub(crate) fn save(&self, r: &Record) -> Result<(), StoreError> {
        let dir = self.sandbox_dir(&r.id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io("creating", &dir))?;
        // Its own temporary file: two saves of one sandbox never write the same file.
        let tmp = dir.join(format!(
            "sandbox.json.{}.tmp",
            crate::manager::random_hex(6)
        ));
        let path = dir.join("sandbox.json");
        let json = serde_json::to_vec_pretty(r).map_err(|e| StoreError {
            what: "encoding",
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("writing", &tmp))?;
        f.write_all(&json).map_err(io("writing", &tmp))?;
        let done = f
            .sync_all()
            .map_err(io("syncing", &tmp))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp)));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done?;
        Ok(())
    }

    /// Every record on disk; unreadable ones are logged and skipped (their files are left
    /// for an operator to look at).
    pub(crate) fn load_all(&self) -> Vec<Record> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !valid_id(&name) {
                continue;
            }
            let path = e.path().join("sandbox.json");
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(r) if r.id == name && r.version == RECORD_VERSION => out.push(r),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "a sandbox record that does not match its directory; left alone")
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), error, "an unreadable sandbox record; left alone")
                }
            }
        }
        out
    }

    /// Deletes a sandbox's record and disk.
    pub(crate) fn remove(&self, id: &str) {
        if !valid_id(id) {
            return;
        }
        let dir = self.sandbox_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %dir.display(), error = %e, "removing a sandbox's files");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_overrides_its_pools_policy_field_by_field() {
        let pool = Lifecycle {
            on_idle: Some(OnIdle::Hibernate),
            idle_timeout_s: Some(300),
            delete_after_s: Some(86400),
            ..Lifecycle::default()
        };
        let mine = Lifecycle {
            idle_timeout_s: Some(5),
            ..Lifecycle::default()
        };
        let m = pool.merged(&mine);
        assert_eq!(m.on_idle, Some(OnIdle::Hibernate));
        assert_eq!(m.idle_timeout_s, Some(5));
        assert_eq!(m.delete_after_s, Some(86400));
        assert!(m.is_durable());
        assert!(!Lifecycle::default().is_durable());
        let autopause = Lifecycle {
            on_timeout: Some(OnTimeout::Hibernate),
            ..Lifecycle::default()
        };
        assert!(autopause.is_durable());
    }

    #[test]
    fn bad_policies_are_refused() {
        let zero = Lifecycle {
            idle_timeout_s: Some(0),
            ..Lifecycle::default()
        };
        assert!(zero.check().is_err());
        let contradiction = Lifecycle {
            on_idle: Some(OnIdle::Hibernate),
            durable: Some(false),
            ..Lifecycle::default()
        };
        assert!(contradiction.check().is_err());
    }

    #[test]
    fn only_the_managers_ids_name_directories() {
        assert!(valid_id("sbx_0123abcd"));
        assert!(valid_id("sbx_0123abcd_ampoule0"));
        assert!(valid_id("ses_ff"));
        for bad in [
            "sbx_",
            "../etc",
            "sbx_../x",
            "sbx_zz",
            "other",
            "sbx_ab/cd",
            "sbx_ab_",
            "sbx_ab_../x",
            "sbx_ab_c_d",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn records_round_trip_with_private_modes() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("sandboxes")).unwrap();
        let r = Record {
            version: RECORD_VERSION,
            id: "sbx_00ff".into(),
            tenant: "t".into(),
            pool: "python".into(),
            identifier: "sbx_00ff".into(),
            is_sandbox: true,
            created_at_ms: 1,
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            envs: BTreeMap::new(),
            access_token: "ea_1".into(),
            traffic_token: "et_1".into(),
            life_left_ms: Some(1000),
            lifecycle: Lifecycle::default(),
            hibernated_at_ms: None,
            memory_kept: false,
        };
        store.save(&r).unwrap();
        std::fs::create_dir(tmp.path().join("sandboxes/junk")).unwrap();
        assert_eq!(store.load_all(), vec![r]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode(&tmp.path().join("sandboxes/sbx_00ff/sandbox.json")),
            0o600
        );
        assert_eq!(mode(&tmp.path().join("sandboxes/sbx_00ff")), 0o700);
        assert_eq!(mode(&tmp.path().join("sandboxes")), 0o700);
        store.remove("sbx_00ff");
        assert!(store.load_all().is_empty());
    }
}
