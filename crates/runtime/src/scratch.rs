//! Host-side access to a sandbox's scratch space (`/mnt/data` and the handed-over code).
//!
//! The supervisor holds a descriptor of the scratch tmpfs root, received from the sandbox init.
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, one component at a time for directories, so a
//! symlink or `..` planted by sandboxed code can never make the supervisor read or write
//! outside the scratch space. Hard links cannot point outside either: the scratch is its own
//! filesystem. The descriptor keeps the tmpfs alive after the sandbox's processes are gone,
//! which is how outputs are collected after a run.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use ampoule_types::FileEntry;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};

use crate::error::{Error, IoContext, Result};

/// Sub-directory of the scratch root that is `/mnt/data` in the sandbox.
pub const DATA: &str = "data";
/// Sub-directory of the scratch root that is `/run/ampoule` (read-only) in the sandbox.
pub const CODE: &str = ".ampoule";

/// Descriptor-based handle on a scratch space.
#[derive(Debug)]
pub struct Scratch {
    root: OwnedFd,
    owner: Option<(u32, u32)>,
}

fn resolve() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

/// Validates a caller-supplied relative path: no absolute paths, no `..`, no NUL, at most 4096
/// bytes; `.` components and repeated slashes are dropped. Returns the normal components.
pub fn normalize(path: &str) -> Result<Vec<String>> {
    if path.len() > 4096 {
        return Err(Error::Invalid("path is longer than 4096 bytes".into()));
    }
    if path.contains('\0') {
        return Err(Error::Invalid("path contains a NUL byte".into()));
    }
    let trimmed = path.strip_prefix("/mnt/data/").unwrap_or(path);
    let mut out = Vec::new();
    for c in Path::new(trimmed).components() {
        match c {
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(Error::Invalid(format!("path {path:?} contains \"..\"")));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(Error::Invalid(format!(
                    "path {path:?} must be relative to /mnt/data"
                )));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!("path {path:?} names no file")));
    }
    Ok(out)
}

impl Scratch {
    /// Wraps the root descriptor; files created through it are chowned to `owner` (root mode).
    pub(crate) fn new(root: OwnedFd, owner: Option<(u32, u32)>) -> Self {
        Self { root, owner }
    }

    fn open_dir(&self, base: &str, comps: &[String], create: bool) -> Result<OwnedFd> {
        let mut dir = self.open_at(&self.root, base, OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)?;
        for c in comps {
            if create {
                match nix::sys::stat::mkdirat(&dir, c.as_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) => {
                        if let Some((uid, gid)) = self.owner {
                            nix::unistd::fchownat(
                                &dir,
                                c.as_str(),
                                Some(nix::unistd::Uid::from_raw(uid)),
                                Some(nix::unistd::Gid::from_raw(gid)),
                                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                            )
                            .ctx(|| format!("chown {c}"))?;
                        }
                    }
                    Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(Error::io(format!("mkdir {c}"), e.into())),
                }
            }
            dir = self.open_at(&dir, c, OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)?;
        }
        Ok(dir)
    }

    fn open_at(&self, dir: &impl AsFd, name: &str, flags: OFlag, mode: u32) -> Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(resolve());
        openat2(dir, name, how).map_err(|e| match e {
            nix::errno::Errno::ELOOP | nix::errno::Errno::EXDEV => Error::Invalid(format!(
                "{name:?} is a link that leaves the session's files"
            )),
            nix::errno::Errno::ENOENT => Error::Invalid(format!("{name:?} does not exist")),
            nix::errno::Errno::ENOTDIR => Error::Invalid(format!("{name:?} is not a directory")),
            other => Error::io(format!("open {name}"), other.into()),
        })
    }

    /// Writes a file below `base` (one of [`DATA`], [`CODE`]), creating parent directories.
    pub fn write(&self, base: &str, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        let comps = normalize(path)?;
        let (name, parents) = comps
            .split_last()
            .ok_or_else(|| Error::Invalid("empty path".into()))?;
        let dir = self.open_dir(base, parents, true)?;
        let fd = self.open_at(
            &dir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
            mode,
        )?;
        if let Some((uid, gid)) = self.owner {
            nix::unistd::fchown(
                &fd,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .ctx(|| format!("chown {path}"))?;
        }
        let mut file = std::fs::File::from(fd);
        file.write_all(contents).ctx(|| format!("write {path}"))?;
        Ok(())
    }

    /// Reads a regular file below `base`, refusing anything larger than `max` bytes.
    pub fn read(&self, base: &str, path: &str, max: u64) -> Result<Vec<u8>> {
        let comps = normalize(path)?;
        let (name, parents) = comps
            .split_last()
            .ok_or_else(|| Error::Invalid("empty path".into()))?;
        let dir = self.open_dir(base, parents, false)?;
        let fd = self.open_at(&dir, name, OFlag::O_RDONLY, 0)?;
        let st = nix::sys::stat::fstat(&fd).ctx(|| format!("stat {path}"))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(Error::Invalid(format!("{path:?} is not a regular file")));
        }
        if st.st_size as u64 > max {
            return Err(Error::Invalid(format!(
                "{path:?} is {} bytes, over the {max}-byte limit",
                st.st_size
            )));
        }
        let mut buf = Vec::with_capacity(st.st_size as usize);
        std::fs::File::from(fd)
            .take(max)
            .read_to_end(&mut buf)
            .ctx(|| format!("read {path}"))?;
        Ok(buf)
    }

    /// Lists the regular files below `base`, recursively. Symlinks, devices and FIFOs are not
    /// listed (they are never followed).
    pub fn list(&self, base: &str) -> Result<Vec<FileEntry>> {
        let mut out = Vec::new();
        let root = self.open_dir(base, &[], false)?;
        self.walk(root, "", &mut out, 0)?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn walk(&self, dir: OwnedFd, prefix: &str, out: &mut Vec<FileEntry>, depth: u32) -> Result<()> {
        if depth > 64 || out.len() > 100_000 {
            return Ok(());
        }
        let names: Vec<String> = {
            let mut d = nix::dir::Dir::from_fd(dir.try_clone().ctx(|| "dup dir".into())?)
                .ctx(|| "opendir".into())?;
            d.iter()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "." && n != "..")
                .collect()
        };
        for name in names {
            let st: FileStat = match fstatat(
                &dir,
                name.as_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) => st,
                Err(_) => continue,
            };
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if kind == SFlag::S_IFREG {
                out.push(FileEntry {
                    path,
                    size: st.st_size as u64,
                });
            } else if kind == SFlag::S_IFDIR
                && let Ok(sub) = self.open_at(&dir, &name, OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)
            {
                self.walk(sub, &path, out, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Copies every regular file below [`DATA`] into `dest` (created if missing), keeping the
    /// relative layout. Returns the copied entries.
    pub fn copy_out(&self, dest: &Path, max_file: u64) -> Result<Vec<FileEntry>> {
        let files = self.list(DATA)?;
        for f in &files {
            let target: PathBuf = dest.join(&f.path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
            }
            let data = self.read(DATA, &f.path, max_file)?;
            std::fs::write(&target, data).ctx(|| format!("writing {}", target.display()))?;
        }
        Ok(files)
    }

    /// Free bytes and inodes left in the scratch space.
    pub fn free(&self) -> Option<(u64, u64)> {
        let st = nix::sys::statvfs::fstatvfs(&self.root).ok()?;
        Some((
            st.blocks_available() as u64 * st.fragment_size() as u64,
            st.files_available() as u64,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> (tempfile::TempDir, Scratch) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join(DATA)).unwrap();
        let fd: OwnedFd = std::fs::File::open(tmp.path()).unwrap().into();
        (tmp, Scratch::new(fd, None))
    }

    #[test]
    fn normalize_refuses_escapes() {
        assert_eq!(normalize("a//./b").unwrap(), vec!["a", "b"]);
        assert_eq!(normalize("/mnt/data/x.csv").unwrap(), vec!["x.csv"]);
        for bad in ["../x", "a/../../x", "/etc/passwd", "", ".", "a\0b"] {
            assert!(normalize(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn write_read_list_round_trip() {
        let (_tmp, s) = scratch();
        s.write(DATA, "sub/dir/f.txt", b"hello", 0o644).unwrap();
        assert_eq!(s.read(DATA, "sub/dir/f.txt", 100).unwrap(), b"hello");
        assert_eq!(
            s.list(DATA).unwrap(),
            vec![FileEntry {
                path: "sub/dir/f.txt".into(),
                size: 5
            }]
        );
        assert!(s.read(DATA, "sub/dir/f.txt", 2).is_err());
    }

    #[test]
    fn planted_symlinks_are_never_followed() {
        let (tmp, s) = scratch();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s3cret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), tmp.path().join("data/leak"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("data/dirlink")).unwrap();
        assert!(s.read(DATA, "leak", 100).is_err());
        assert!(s.read(DATA, "dirlink/secret", 100).is_err());
        assert!(s.write(DATA, "leak", b"x", 0o644).is_err());
        assert!(s.write(DATA, "dirlink/new", b"x", 0o644).is_err());
        assert_eq!(
            std::fs::read(outside.path().join("secret")).unwrap(),
            b"s3cret"
        );
        assert!(!outside.path().join("new").exists());
        assert!(s.list(DATA).unwrap().is_empty());
    }
}
