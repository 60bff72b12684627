//! The keys file: API keys managed without a restart (`ampoule keys add|list|revoke|rotate`),
//! read by the server whenever it changes.
//!
//! Where: `[auth] keys_file`, by default `keys.toml` in the data directory. What: one
//! `[[keys]]` table per key with its id, tenant, SHA-256, name, and times (seconds since the
//! epoch) of creation, expiry and revocation, and the rotation links (`replaces`,
//! `replaced_by`). The key itself is shown once, when it is minted, and never stored.
//!
//! Invariants: the file is written whole to a private temporary file and renamed over the old
//! one (a reader sees the old file or the new, never half of one); writers hold an exclusive
//! lock on `<file>.lock` from read to rename, so two `ampoule keys` commands never lose each
//! other's change; file and lock are 0600.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{KeyEntry, key_id};
use crate::config::sha256_hex;
use crate::error::Error;

/// The keys file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Every key, revoked and expired ones included (they answer with their own code).
    #[serde(default)]
    pub keys: Vec<StoredKey>,
}

/// One key of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// First 12 hex digits of `key_sha256`.
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// SHA-256 of the key, hex.
    pub key_sha256: String,
    /// A name for people (`ci`, `laptop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it was minted.
    pub created_at: u64,
    /// When it stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// When it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    /// The key it replaced (rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// The key that replaced it (rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// `approver`: it decides approvals and submits no work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl StoredKey {
    /// `active`, `expired`, `revoked`, or `retiring` (rotated, in its grace period), at `now`.
    pub fn state(&self, now: u64) -> &'static str {
        if self.revoked_at.is_some_and(|t| t <= now) {
            "revoked"
        } else if self.expires_at.is_some_and(|t| t <= now) {
            "expired"
        } else if self.replaced_by.is_some() {
            "retiring"
        } else {
            "active"
        }
    }
}

/// A key just minted: the secret (shown once) and its record.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The key itself.
    pub key: String,
    /// What the file keeps of it.
    pub stored: StoredKey,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

/// A new random key: `amp_` and 48 hex digits (192 bits from the kernel's generator).
pub fn mint_key() -> Result<String, Error> {
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(io("reading /dev/urandom"))?;
    let mut key = String::from("amp_");
    for b in raw {
        key.push_str(&format!("{b:02x}"));
    }
    Ok(key)
}

impl KeyFile {
    /// Reads `path`; a missing file holds no keys.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let file: KeyFile =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        file.check()
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(file)
    }

    fn check(&self) -> Result<(), String> {
        let mut ids = std::collections::HashSet::new();
        for k in &self.keys {
            let d = k.key_sha256.to_ascii_lowercase();
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("key {}: key_sha256 must be 64 hex digits", k.id));
            }
            if k.id != key_id(&d) {
                return Err(format!(
                    "key {}: id is not the digest's first 12 digits",
                    k.id
                ));
            }
            if k.tenant.trim().is_empty() {
                return Err(format!("key {}: tenant is empty", k.id));
            }
            if k.role.as_deref().is_some_and(|r| r != "approver") {
                return Err(format!("key {}: role is \"approver\" or absent", k.id));
            }
            if !ids.insert(k.id.clone()) {
                return Err(format!("key {} is listed twice", k.id));
            }
        }
        Ok(())
    }

    /// The keys as the server knows them (digest → key).
    pub fn entries(&self) -> Vec<(String, KeyEntry)> {
        self.keys
            .iter()
            .map(|k| {
                let d = k.key_sha256.to_ascii_lowercase();
                let mut e = KeyEntry::new(&d, k.tenant.clone());
                e.expires_at = k.expires_at;
                e.revoked_at = k.revoked_at;
                e.replaced_by = k.replaced_by.clone();
                e.approver = k.role.as_deref() == Some("approver");
                (d, e)
            })
            .collect()
    }

    /// Writes the file atomically (private temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let text = toml::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("writing the keys file: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let tmp = tmp_path(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(format!("writing {}", tmp.display())))?;
        let written = f
            .write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(format!("writing {}", path.display()), e));
        }
        Ok(())
    }

    /// Reads `path` under its lock, lets `change` edit it, and writes it back (only when
    /// `change` succeeds).
    pub fn edit<T>(
        path: &Path,
        change: impl FnOnce(&mut KeyFile) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let lock_path = path.with_extension("toml.lock");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(format!("opening {}", lock_path.display())))?;
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, errno)| {
                Error::io(
                    format!("locking {}", lock_path.display()),
                    std::io::Error::from(errno),
                )
            },
        )?;
        let mut file = Self::load(path)?;
        let out = change(&mut file)?;
        file.save(path)?;
        Ok(out)
    }

    /// Mints a key for `tenant`, valid until `expires_at` (if given).
    pub fn add(
        &mut self,
        tenant: &str,
        name: Option<String>,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<Minted, Error> {
        if tenant.trim().is_empty() {
            return Err(Error::Config("the tenant is empty".into()));
        }
        let key = mint_key()?;
        let digest = sha256_hex(&key);
        let stored = StoredKey {
            id: key_id(&digest),
            tenant: tenant.to_owned(),
            key_sha256: digest,
            name,
            created_at: now,
            expires_at,
            revoked_at: None,
            replaces: None,
            replaced_by: None,
            role: None,
        };
        if self.keys.iter().any(|k| k.id == stored.id) {
            // 48 random bits of id colliding: mint again rather than shadow a key.
            return self.add(tenant, stored.name, expires_at, now);
        }
        self.keys.push(stored.clone());
        Ok(Minted { key, stored })
    }

    fn find(&mut self, id: &str) -> Result<&mut StoredKey, Error> {
        let id = id.trim().to_ascii_lowercase();
        self.keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| Error::Config(format!("no key {id} in the keys file")))
    }

    /// Revokes key `id` at `now` (it answers 401 `key_revoked` from then on).
    pub fn revoke(&mut self, id: &str, now: u64) -> Result<StoredKey, Error> {
        let k = self.find(id)?;
        if k.revoked_at.is_none() {
            k.revoked_at = Some(now);
        }
        Ok(k.clone())
    }

    /// Replaces key `id` with a new key of the same tenant and name; the old one keeps working
    /// for `grace_s` seconds (never longer than it would have), then answers `key_expired`.
    pub fn rotate(
        &mut self,
        id: &str,
        grace_s: u64,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<Minted, Error> {
        let old = self.find(id)?.clone();
        match old.state(now) {
            "active" => {}
            state => {
                return Err(Error::Config(format!(
                    "key {} is {state}: only an active key can be rotated",
                    old.id
                )));
            }
        }
        let mut minted = self.add(&old.tenant, old.name.clone(), expires_at, now)?;
        minted.stored.replaces = Some(old.id.clone());
        minted.stored.role = old.role.clone();
        let new_id = minted.stored.id.clone();
        for k in &mut self.keys {
            if k.id == new_id {
                k.replaces = Some(old.id.clone());
                k.role = old.role.clone();
            }
            if k.id == old.id {
                let end = now.saturating_add(grace_s);
                k.expires_at = Some(k.expires_at.map_or(end, |e| e.min(end)));
                k.replaced_by = Some(new_id.clone());
            }
        }
        Ok(minted)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// What identifies a version of the file, to notice changes cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    inode: u64,
    len: u64,
    modified_ns: i128,
}

/// The file's stamp now (`None` when it does not exist).
pub fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: m.ino(),
        len: m.len(),
        modified_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_rotate_revoke_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let now = 1_000_000;
        let a = KeyFile::edit(&path, |f| f.add("team-a", Some("ci".into()), None, now)).unwrap();
        assert!(a.key.starts_with("amp_") && a.key.len() == 52);
        assert_eq!(a.stored.key_sha256, sha256_hex(&a.key));
        let b = KeyFile::edit(&path, |f| f.rotate(&a.stored.id, 600, None, now + 10)).unwrap();
        assert_eq!(b.stored.tenant, "team-a");
        assert_eq!(b.stored.replaces.as_deref(), Some(a.stored.id.as_str()));
        let file = KeyFile::load(&path).unwrap();
        let old = file.keys.iter().find(|k| k.id == a.stored.id).unwrap();
        assert_eq!(old.expires_at, Some(now + 610));
        assert_eq!(old.state(now + 20), "retiring");
        assert_eq!(old.state(now + 610), "expired");
        // A retiring key cannot be rotated again; an unknown id is an error.
        assert!(KeyFile::edit(&path, |f| f.rotate(&a.stored.id, 1, None, now + 20)).is_err());
        assert!(KeyFile::edit(&path, |f| f.revoke("000000000000", now)).is_err());
        KeyFile::edit(&path, |f| f.revoke(&b.stored.id, now + 30)).unwrap();
        let file = KeyFile::load(&path).unwrap();
        assert_eq!(file.keys.len(), 2);
        assert_eq!(file.keys[1].state(now + 30), "revoked");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No secret in the file.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&a.key) && !text.contains(&b.key));
    }

    #[test]
    fn a_broken_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(
            &path,
            "[[keys]]\nid = \"abc\"\ntenant = \"a\"\nkey_sha256 = \"00\"\ncreated_at = 1\n",
        )
        .unwrap();
        let e = KeyFile::load(&path).unwrap_err().to_string();
        assert!(e.contains("keys.toml") && e.contains("64 hex"), "{e}");
        assert_eq!(
            KeyFile::load(&dir.path().join("none.toml")).unwrap(),
            KeyFile::default()
        );
    }
}
