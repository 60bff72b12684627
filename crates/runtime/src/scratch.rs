//! Host-side access to a sandbox's scratch space (`/mnt/data` and the handed-over code).
//!
//! The supervisor holds a descriptor of the scratch tmpfs root, received from the sandbox init.
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, one component at a time for directories, so a
//! symlink or `..` planted by sandboxed code can never make the supervisor read or write
//! outside the scratch space. Hard links cannot point outside either: the scratch is its own
//! filesystem. The descriptor keeps the tmpfs alive after the sandbox's processes are gone,
//! which is how outputs are collected after a run.
//!
//! The server's file endpoints use the streaming half ([`Scratch::create`], [`Scratch::open`],
//! [`Scratch::stat`], [`Scratch::remove`]), which reports refusals as [`FileError`] so that a
//! caller can tell "no such file" from "not allowed". Uploads are written to a fresh temporary
//! name and renamed into place on commit, so they never write through an existing inode (a
//! hard link planted by sandboxed code) and an aborted upload leaves nothing behind. Files with
//! more than one hard link are never opened for reading: on a scratch space that is not its
//! own filesystem (a test directory), such a link could name a file outside it.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ampoule_types::FileEntry;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};

use crate::error::{Error, IoContext, Result};

/// Sub-directory of the scratch root that is `/mnt/data` in the sandbox.
pub const DATA: &str = "data";
/// Sub-directory of the scratch root that is `/run/ampoule` (read-only) in the sandbox.
pub const CODE: &str = ".ampoule";

/// Prefix of the temporary names uploads are written to before [`NewFile::commit`]; such
/// files are never listed.
const UPLOAD_PREFIX: &str = ".ampoule-upload-";

/// Why a file operation of the streaming API was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path itself is not acceptable (absolute, `..`, NUL, empty, too long).
    #[error("{0}")]
    Invalid(String),
    /// Nothing exists at the path.
    #[error("{0:?} does not exist")]
    NotFound(String),
    /// A component of the path is a symbolic link, or the file has other hard links: it is
    /// never followed.
    #[error("{0:?} is a link, which is never followed")]
    Link(String),
    /// The path names a directory, device or other non-regular file where a file was needed,
    /// or a component of the path is not a directory.
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
    /// The scratch space is full.
    #[error("no space left in the session's files")]
    NoSpace,
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    fn from_errno(path: &str, e: nix::errno::Errno, what: &str) -> Self {
        use nix::errno::Errno;
        match e {
            Errno::ELOOP | Errno::EXDEV => FileError::Link(path.to_owned()),
            Errno::ENOENT => FileError::NotFound(path.to_owned()),
            Errno::ENOTDIR | Errno::EISDIR => FileError::NotAFile(path.to_owned()),
            Errno::ENOSPC | Errno::EDQUOT => FileError::NoSpace,
            other => FileError::Io {
                what: format!("{what} {path}"),
                source: other.into(),
            },
        }
    }
}

impl From<Error> for FileError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(msg) => FileError::Invalid(msg),
            Error::Io { what, source } => FileError::Io { what, source },
            other => FileError::Io {
                what: other.to_string(),
                source: std::io::Error::other("scratch"),
            },
        }
    }
}

/// What [`Scratch::stat`] and [`Scratch::list_info`] report about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Path relative to the base directory, with `/` separators.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time.
    pub modified: SystemTime,
    /// Whether it is a regular file (otherwise a directory, link, device...).
    pub regular: bool,
}

fn modified_of(st: &FileStat) -> SystemTime {
    let secs = u64::try_from(st.st_mtime).unwrap_or(0);
    let nanos = u32::try_from(st.st_mtime_nsec).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos.min(999_999_999))
}

/// A file being written by [`Scratch::create`]: it lives under a temporary name until
/// [`NewFile::commit`] renames it over the target, and is removed if dropped uncommitted.
#[derive(Debug)]
pub struct NewFile {
    as_owner: Option<(u32, u32)>,
    dir: OwnedFd,
    temp: String,
    name: String,
    path: String,
    file: std::fs::File,
    committed: bool,
}

impl NewFile {
    /// The open file to write the contents to.
    pub fn file(&mut self) -> &mut std::fs::File {
        &mut self.file
    }

    /// Makes the file visible under its name, replacing whatever file or link was there.
    pub fn commit(mut self) -> Result<FileInfo, FileError> {
        self.file.flush().map_err(|e| FileError::Io {
            what: format!("write {}", self.path),
            source: e,
        })?;
        let st = nix::sys::stat::fstat(&self.file)
            .map_err(|e| FileError::from_errno(&self.path, e, "stat"))?;
        // rename(2) replaces a link itself, never its target.
        let as_owner = AsOwner::take(self.as_owner);
        nix::fcntl::renameat(&self.dir, self.temp.as_str(), &self.dir, self.name.as_str())
            .map_err(|e| FileError::from_errno(&self.path, e, "rename"))?;
        drop(as_owner);
        self.committed = true;
        Ok(FileInfo {
            path: self.path.clone(),
            size: st.st_size as u64,
            modified: modified_of(&st),
            regular: true,
        })
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = nix::unistd::unlinkat(
                &self.dir,
                self.temp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// Descriptor-based handle on a scratch space.
#[derive(Debug)]
pub struct Scratch {
    root: OwnedFd,
    owner: Option<(u32, u32)>,
    /// The file system belongs to a user namespace (a zygote-born sandbox mounted it): files
    /// are created with the owner's filesystem ids, the only ones mapped into it.
    in_userns: bool,
}

/// The calling thread's filesystem uid and gid switched to a scratch owner's while it exists.
///
/// The kernel refuses to create a file (`EOVERFLOW`) in a file system mounted in a user
/// namespace unless the creator's fsuid and fsgid are mapped into that namespace; host root is
/// not. `setfsuid` is per thread, and everything here is synchronous, so the switch never
/// leaks to other work on the thread.
struct AsOwner(Option<(nix::unistd::Uid, nix::unistd::Gid)>);

impl AsOwner {
    fn take(owner: Option<(u32, u32)>) -> Self {
        Self(owner.map(|(uid, gid)| {
            let gid = nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
            let uid = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
            (uid, gid)
        }))
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        if let Some((uid, gid)) = self.0 {
            nix::unistd::setfsuid(uid);
            nix::unistd::setfsgid(gid);
        }
    }
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
        Self {
            root,
            owner,
            in_userns: false,
        }
    }

    /// A scratch space whose file system a zygote-born sandbox mounted in its user namespace:
    /// files are created as `owner` (see [`AsOwner`]).
    pub(crate) fn in_user_namespace(root: OwnedFd, owner: Option<(u32, u32)>) -> Self {
        Self {
            root,
            owner,
            in_userns: true,
        }
    }

    /// The owner to create files as, when the file system needs it.
    fn create_as(&self) -> Option<(u32, u32)> {
        self.owner.filter(|_| self.in_userns)
    }

    /// A scratch space on a directory the caller opened (test doubles of a sandbox): `root`
    /// must hold the [`DATA`] directory. Files created through it keep the caller's owner.
    pub fn from_dir(root: OwnedFd) -> Self {
        Self {
            root,
            owner: None,
            in_userns: false,
        }
    }

    /// A second handle on the same scratch space (the root descriptor duplicated), for a
    /// caller that serves files while the owner of the sandbox is busy. The tmpfs lives until
    /// every handle is dropped.
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            root: self
                .root
                .try_clone()
                .ctx(|| "duplicating the scratch descriptor".into())?,
            owner: self.owner,
            in_userns: self.in_userns,
        })
    }

    /// Splits a caller's path into its parent directory (opened, optionally created) and its
    /// final name.
    fn parent_of(
        &self,
        base: &str,
        path: &str,
        create: bool,
    ) -> Result<(OwnedFd, String), FileError> {
        let comps = normalize(path)?;
        let (name, parents) = comps
            .split_last()
            .ok_or_else(|| FileError::Invalid("empty path".into()))?;
        let dir = self.open_dir(base, parents, create).map_err(|e| match e {
            Error::Invalid(msg) if msg.contains("link") => FileError::Link(path.to_owned()),
            Error::Invalid(msg) if msg.contains("does not exist") => {
                FileError::NotFound(path.to_owned())
            }
            Error::Invalid(msg) if msg.contains("not a directory") => {
                FileError::NotAFile(path.to_owned())
            }
            other => other.into(),
        })?;
        Ok((dir, name.clone()))
    }

    /// Starts writing a file below `base`, creating parent directories. Nothing is visible
    /// under `path` until [`NewFile::commit`].
    pub fn create(&self, base: &str, path: &str, mode: u32) -> Result<NewFile, FileError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let as_owner = AsOwner::take(self.create_as());
        let (dir, name) = self.parent_of(base, path, true)?;
        let temp = format!(
            "{UPLOAD_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let how = OpenHow::new()
            .flags(
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_CLOEXEC
                    | OFlag::O_NOFOLLOW,
            )
            .mode(Mode::from_bits_truncate(mode))
            .resolve(resolve());
        let fd = openat2(&dir, temp.as_str(), how)
            .map_err(|e| FileError::from_errno(path, e, "create"))?;
        drop(as_owner);
        if let Some((uid, gid)) = self.owner.filter(|_| !self.in_userns) {
            nix::unistd::fchown(
                &fd,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| FileError::from_errno(path, e, "chown"))?;
        }
        Ok(NewFile {
            as_owner: self.create_as(),
            dir,
            temp,
            name,
            path: normalize(path)?.join("/"),
            file: std::fs::File::from(fd),
            committed: false,
        })
    }

    /// Opens a regular file below `base` for reading. Links (symbolic, or a file with other
    /// hard links) are refused, never followed.
    pub fn open(&self, base: &str, path: &str) -> Result<(std::fs::File, FileInfo), FileError> {
        let (dir, name) = self.parent_of(base, path, false)?;
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK)
            .resolve(resolve());
        let fd = openat2(&dir, name.as_str(), how)
            .map_err(|e| FileError::from_errno(path, e, "open"))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| FileError::from_errno(path, e, "stat"))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(FileError::NotAFile(path.to_owned()));
        }
        if st.st_nlink > 1 {
            return Err(FileError::Link(path.to_owned()));
        }
        let info = FileInfo {
            path: normalize(path)?.join("/"),
            size: st.st_size as u64,
            modified: modified_of(&st),
            regular: true,
        };
        Ok((std::fs::File::from(fd), info))
    }

    /// Describes what is at `path` below `base` without following a final link.
    pub fn stat(&self, base: &str, path: &str) -> Result<FileInfo, FileError> {
        let (dir, name) = self.parent_of(base, path, false)?;
        let st = fstatat(
            &dir,
            name.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| FileError::from_errno(path, e, "stat"))?;
        Ok(FileInfo {
            path: normalize(path)?.join("/"),
            size: st.st_size as u64,
            modified: modified_of(&st),
            regular: SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG,
        })
    }

    /// Removes a file (or a link itself, never its target) below `base`. Directories are
    /// refused.
    pub fn remove(&self, base: &str, path: &str) -> Result<(), FileError> {
        let (dir, name) = self.parent_of(base, path, false)?;
        let st = fstatat(
            &dir,
            name.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| FileError::from_errno(path, e, "stat"))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            return Err(FileError::NotAFile(path.to_owned()));
        }
        nix::unistd::unlinkat(&dir, name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(|e| FileError::from_errno(path, e, "remove"))
    }

    /// Like [`Scratch::list`], with modification times.
    pub fn list_info(&self, base: &str) -> Result<Vec<FileInfo>> {
        let mut out = Vec::new();
        let root = self.open_dir(base, &[], false)?;
        let mut left = usize::MAX;
        self.walk(root, "", &mut out, 0, &mut left)?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// [`Scratch::list_info`] if `base` holds at most `entries` files and directories in all;
    /// `None` (having looked at no more than that) if it holds more. A listing this small is
    /// cheap enough to take on an async worker thread.
    pub fn list_info_small(&self, base: &str, entries: usize) -> Result<Option<Vec<FileInfo>>> {
        let mut out = Vec::new();
        let root = self.open_dir(base, &[], false)?;
        let mut left = entries;
        if !self.walk(root, "", &mut out, 0, &mut left)? {
            return Ok(None);
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Some(out))
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
        let as_owner = AsOwner::take(self.create_as());
        let dir = self.open_dir(base, parents, true)?;
        let fd = self.open_at(
            &dir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
            mode,
        )?;
        drop(as_owner);
        if let Some((uid, gid)) = self.owner.filter(|_| !self.in_userns) {
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
        Ok(self
            .list_info(base)?
            .into_iter()
            .map(|f| FileEntry {
                path: f.path,
                size: f.size,
            })
            .collect())
    }

    /// Adds the regular files below `dir` to `out`; `false` once more than `left` entries were
    /// seen (the listing is then incomplete).
    fn walk(
        &self,
        dir: OwnedFd,
        prefix: &str,
        out: &mut Vec<FileInfo>,
        depth: u32,
        left: &mut usize,
    ) -> Result<bool> {
        if depth > 64 || out.len() > 100_000 {
            return Ok(true);
        }
        let names: Vec<String> = {
            let mut d = nix::dir::Dir::from_fd(dir.try_clone().ctx(|| "dup dir".into())?)
                .ctx(|| "opendir".into())?;
            d.iter()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "." && n != ".." && !n.starts_with(UPLOAD_PREFIX))
                .take(left.saturating_add(1))
                .collect()
        };
        if names.len() > *left {
            return Ok(false);
        }
        *left -= names.len();
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
                out.push(FileInfo {
                    path,
                    size: st.st_size as u64,
                    modified: modified_of(&st),
                    regular: true,
                });
            } else if kind == SFlag::S_IFDIR
                && let Ok(sub) = self.open_at(&dir, &name, OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)
                && !self.walk(sub, &path, out, depth + 1, left)?
            {
                return Ok(false);
            }
        }
        Ok(true)
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
    fn small_listing_is_the_full_listing_or_nothing() {
        let (_tmp, s) = scratch();
        s.write(DATA, "a.txt", b"1", 0o644).unwrap();
        s.write(DATA, "sub/b.txt", b"22", 0o644).unwrap();
        // a.txt, sub, sub/b.txt: three entries.
        let full = s.list_info(DATA).unwrap();
        assert_eq!(s.list_info_small(DATA, 3).unwrap(), Some(full.clone()));
        assert_eq!(s.list_info_small(DATA, 2).unwrap(), None);
        for i in 0..10 {
            s.write(DATA, &format!("sub/many{i}"), b"", 0o644).unwrap();
        }
        assert_eq!(s.list_info_small(DATA, 3).unwrap(), None);
        assert_eq!(
            s.list_info_small(DATA, 32).unwrap().map(|v| v.len()),
            Some(full.len() + 10)
        );
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

    #[test]
    fn streaming_api_never_follows_links() {
        let (tmp, s) = scratch();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s3cret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), tmp.path().join("data/leak"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("data/dirlink")).unwrap();
        // A hard link: same filesystem here, so it could name a file outside the data dir.
        std::fs::write(tmp.path().join("outside-data"), b"hidden").unwrap();
        std::fs::hard_link(
            tmp.path().join("outside-data"),
            tmp.path().join("data/hard"),
        )
        .unwrap();
        assert!(matches!(s.open(DATA, "leak"), Err(FileError::Link(_))));
        assert!(matches!(
            s.open(DATA, "dirlink/secret"),
            Err(FileError::Link(_))
        ));
        assert!(matches!(s.open(DATA, "hard"), Err(FileError::Link(_))));
        assert!(matches!(
            s.open(DATA, "missing"),
            Err(FileError::NotFound(_))
        ));
        assert!(matches!(s.open(DATA, "../x"), Err(FileError::Invalid(_))));
        assert!(s.create(DATA, "dirlink/new", 0o644).is_err());
        // Uploading over a link or a hard link replaces the name, never writes through it.
        for name in ["leak", "hard"] {
            let mut f = s.create(DATA, name, 0o644).unwrap();
            f.file().write_all(b"new").unwrap();
            assert_eq!(f.commit().unwrap().size, 3);
            let (mut file, _) = s.open(DATA, name).unwrap();
            let mut got = Vec::new();
            file.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"new");
        }
        assert_eq!(
            std::fs::read(outside.path().join("secret")).unwrap(),
            b"s3cret"
        );
        assert_eq!(
            std::fs::read(tmp.path().join("outside-data")).unwrap(),
            b"hidden"
        );
        // Removing a link removes the link only.
        std::os::unix::fs::symlink(outside.path().join("secret"), tmp.path().join("data/l2"))
            .unwrap();
        s.remove(DATA, "l2").unwrap();
        assert!(outside.path().join("secret").exists());
        assert!(matches!(
            s.remove(DATA, "dirlink/secret"),
            Err(FileError::Link(_))
        ));
    }

    #[test]
    fn uncommitted_uploads_leave_nothing() {
        let (tmp, s) = scratch();
        let mut f = s.create(DATA, "a/b.txt", 0o644).unwrap();
        f.file().write_all(b"partial").unwrap();
        assert!(s.list(DATA).unwrap().is_empty(), "temporary name listed");
        drop(f);
        assert!(s.list(DATA).unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(tmp.path().join("data/a"))
                .unwrap()
                .count(),
            0
        );
        let info = s.stat(DATA, "a").unwrap();
        assert!(!info.regular);
    }
}
