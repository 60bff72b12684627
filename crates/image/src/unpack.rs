//! The unpacker: applies image layers (tar, optionally gzip) to a root directory and cannot be
//! made to write outside it.
//!
//! Invariants, each held for every entry of every layer:
//! - an entry's path is cleaned first: a leading `/` or `./` is dropped (an absolute path is
//!   inside the image, as in every runtime), and any `..` component refuses the whole layer;
//! - its parent directory is opened from the root descriptor with `openat2(RESOLVE_IN_ROOT |
//!   RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`: a symlink planted by an earlier entry (`etc ->
//!   /etc`, `x -> ../../..`) resolves as if the root were `/`, so it leads back inside;
//! - the final component is created relative to that descriptor and never followed
//!   (`O_CREAT | O_EXCL | O_NOFOLLOW`, `symlinkat`, `mkdirat`, `linkat` without
//!   `AT_SYMLINK_FOLLOW`); whatever was there is removed first, a directory by a walk that opens
//!   each child with `O_NOFOLLOW`;
//! - a hard link's target is resolved the same way (inside the root, `..` refused) and must be a
//!   regular file of the image;
//! - whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) remove only names in the
//!   directory they sit in, itself resolved inside the root; a whiteout naming `.`, `..` or a
//!   path is refused;
//! - device nodes, FIFOs and sockets are dropped, setuid/setgid bits cleared, ownership and
//!   extended attributes (file capabilities included) ignored: the unpacker needs no privilege
//!   beyond writing files it owns;
//! - every declared size is checked against the image's byte budget before a byte is written,
//!   and bytes are counted as they are written (a GNU sparse entry declares its real size, so a
//!   10 GB sparse file is refused from its header); entries and path lengths are bounded too.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::errno::Errno;

/// The largest zstd window a layer may ask for: 2^27 bytes (128 MiB).
const ZSTD_WINDOW_LOG_MAX: u32 = 27;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstatat, futimens, mkdirat};
use nix::sys::time::TimeSpec;
use nix::unistd::{UnlinkatFlags, linkat, symlinkat, unlinkat};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::oci::Compression;

/// Bounds on what one image may unpack to.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of file content over all layers.
    pub max_bytes: u64,
    /// Entries (files, directories, links, whiteouts) over all layers.
    pub max_entries: u64,
    /// Length of one entry's path or link target.
    pub max_path: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 8 << 30,
            max_entries: 1_000_000,
            max_path: 4096,
        }
    }
}

/// What unpacking did besides writing the image, for the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries applied.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Device nodes, FIFOs and sockets that were not created (their paths, the first 20).
    pub dropped: Vec<String>,
    /// How many were dropped in all.
    pub dropped_count: u64,
    /// Files and directories whose setuid/setgid bits were cleared.
    pub setid_cleared: u64,
}

const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT: &str = ".wh.";

fn dir_how() -> OpenHow {
    OpenHow::new()
        .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        )
}

/// Applies layers, in order, to one root directory.
pub struct Unpacker {
    root: OwnedFd,
    limits: Limits,
    report: Report,
    /// The last parent directory opened, by cleaned path: most entries share their neighbour's.
    cached: Option<(String, OwnedFd)>,
}

impl Unpacker {
    /// An unpacker for the directory `root` (which must exist).
    pub fn new(root: &Path, limits: Limits) -> Result<Self> {
        let root = nix::fcntl::open(
            root,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| Error::nix(format!("opening {}", root.display()), e))?;
        Ok(Self {
            root,
            limits,
            report: Report::default(),
            cached: None,
        })
    }

    /// What has been done so far.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Applies one layer read from `blob` (compressed as `media_type` or its first bytes say).
    pub fn apply_blob(&mut self, layer: &Digest, media_type: &str, blob: File) -> Result<()> {
        let mut reader = io::BufReader::new(blob);
        let head = {
            use std::io::BufRead;
            reader
                .fill_buf()
                .map_err(|e| Error::io(format!("reading layer {layer}"), e))?
                .to_vec()
        };
        match Compression::detect(media_type, &head)? {
            Compression::Gzip => self.apply(layer, flate2::read::MultiGzDecoder::new(reader)),
            Compression::Zstd => {
                let mut z = zstd::stream::read::Decoder::with_buffer(reader)
                    .map_err(|e| Error::io(format!("reading layer {layer}"), e))?;
                // A frame may ask for a window of up to 2 GiB of decoder memory; 128 MiB (the
                // zstd CLI's own default limit) is what every real encoder stays within.
                z.window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(|e| Error::io(format!("reading layer {layer}"), e))?;
                self.apply(layer, z)
            }
            Compression::None => self.apply(layer, reader),
        }
    }

    /// Applies one uncompressed tar stream.
    pub fn apply(&mut self, layer: &Digest, tar: impl Read) -> Result<()> {
        let mut archive = tar::Archive::new(tar);
        let mut this_layer: HashSet<Vec<OsString>> = HashSet::new();
        self.cached = None;
        let entries = archive
            .entries()
            .map_err(|e| Error::io(format!("reading layer {layer}"), e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| Error::io(format!("reading layer {layer}"), e))?;
            self.report.entries += 1;
            if self.report.entries > self.limits.max_entries {
                return Err(Error::TooLarge {
                    layer: layer.to_string(),
                    why: format!("more than {} entries", self.limits.max_entries),
                });
            }
            let raw = entry
                .path()
                .map_err(|e| Error::io(format!("reading layer {layer}"), e))?
                .into_owned();
            let comps = self.clean(layer, &raw)?;
            let Some((name, parent)) = comps.split_last() else {
                // The root itself: its mode is the store's, not the layer's.
                continue;
            };
            let shown = raw.display().to_string();
            let hostile = |why: String| Error::Hostile {
                layer: layer.to_string(),
                why,
            };
            if let Some(target) = name.as_bytes().strip_prefix(WHITEOUT.as_bytes()) {
                let dir = self.parent(layer, parent, &shown)?;
                if name == OPAQUE {
                    self.opaque(&dir, parent, &this_layer, &shown)?;
                } else {
                    let target = OsStr::from_bytes(target);
                    if target.is_empty() || target == "." || target == ".." {
                        return Err(hostile(format!("whiteout {shown:?} names no file")));
                    }
                    self.remove(&dir, target, &shown)?;
                }
                self.cached = None;
                continue;
            }
            let kind = entry.header().entry_type();
            let header_mode = entry.header().mode().unwrap_or(0o644);
            let mode = self.clean_mode(header_mode);
            let dir = self.parent(layer, parent, &shown)?;
            let mut path = parent.to_vec();
            path.push(name.clone());
            match kind {
                tar::EntryType::Directory => {
                    self.directory(&dir, name, mode | 0o700, &shown)?;
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    let size = entry.size();
                    let left = self.limits.max_bytes.saturating_sub(self.report.bytes);
                    if size > left {
                        return Err(Error::TooLarge {
                            layer: layer.to_string(),
                            why: format!(
                                "{shown:?} declares {size} bytes, over the image's limit of {} bytes",
                                self.limits.max_bytes
                            ),
                        });
                    }
                    self.replace(&dir, name, &shown)?;
                    let fd = openat(
                        &dir,
                        name.as_os_str(),
                        OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_WRONLY
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o600),
                    )
                    .map_err(|e| Error::nix(format!("creating {shown:?}"), e))?;
                    let mut file = File::from(fd);
                    let written = io::copy(&mut (&mut entry).take(left + 1), &mut file)
                        .map_err(|e| Error::io(format!("writing {shown:?}"), e))?;
                    if written > left || written != size {
                        return Err(Error::TooLarge {
                            layer: layer.to_string(),
                            why: format!(
                                "{shown:?} holds {written} bytes, not the {size} it declared"
                            ),
                        });
                    }
                    self.report.bytes += written;
                    fchmod(&file, Mode::from_bits_truncate(mode))
                        .map_err(|e| Error::nix(format!("chmod {shown:?}"), e))?;
                    if let Ok(mtime) = entry.header().mtime() {
                        let t = TimeSpec::new(i64::try_from(mtime).unwrap_or(0), 0);
                        let _ = futimens(&file, &t, &t);
                    }
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(|e| Error::io(format!("reading layer {layer}"), e))?
                        .ok_or_else(|| hostile(format!("symlink {shown:?} has no target")))?
                        .into_owned();
                    if target.as_os_str().len() > self.limits.max_path {
                        return Err(hostile(format!("symlink {shown:?}: target too long")));
                    }
                    self.replace(&dir, name, &shown)?;
                    // Stored verbatim: it is data. Every later entry resolves it inside the
                    // root, and the sandbox resolves it inside its own.
                    symlinkat(target.as_os_str(), &dir, name.as_os_str())
                        .map_err(|e| Error::nix(format!("creating symlink {shown:?}"), e))?;
                    self.cached = None;
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .map_err(|e| Error::io(format!("reading layer {layer}"), e))?
                        .ok_or_else(|| hostile(format!("hard link {shown:?} has no target")))?
                        .into_owned();
                    let tcomps = self.clean(layer, &target)?;
                    let Some((tname, tparent)) = tcomps.split_last() else {
                        return Err(hostile(format!("hard link {shown:?} to the root")));
                    };
                    let tshown = target.display().to_string();
                    let tdir = self.parent(layer, tparent, &tshown)?;
                    let st = stat_nofollow(&tdir, tname).map_err(|_| {
                        hostile(format!(
                            "hard link {shown:?} to {tshown:?}, which is not a file of the image"
                        ))
                    })?;
                    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                        return Err(hostile(format!(
                            "hard link {shown:?} to {tshown:?}, which is not a regular file"
                        )));
                    }
                    if tparent == parent && tname == name {
                        continue;
                    }
                    let dir = self.parent(layer, parent, &shown)?;
                    self.replace(&dir, name, &shown)?;
                    linkat(
                        &tdir,
                        tname.as_os_str(),
                        &dir,
                        name.as_os_str(),
                        AtFlags::empty(),
                    )
                    .map_err(|e| Error::nix(format!("creating hard link {shown:?}"), e))?;
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    self.report.dropped_count += 1;
                    if self.report.dropped.len() < 20 {
                        self.report.dropped.push(shown);
                    }
                    continue;
                }
                // PAX and GNU long-name headers are consumed by the tar reader; anything
                // else (volume labels, unknown types) carries nothing a root file system needs.
                _ => continue,
            }
            this_layer.insert(path);
        }
        Ok(())
    }

    /// Path components of an entry: `/` and `.` dropped, `..` refused, lengths bounded.
    fn clean(&self, layer: &Digest, raw: &Path) -> Result<Vec<OsString>> {
        let hostile = |why: String| Error::Hostile {
            layer: layer.to_string(),
            why,
        };
        if raw.as_os_str().len() > self.limits.max_path {
            return Err(Error::TooLarge {
                layer: layer.to_string(),
                why: format!("a path longer than {} bytes", self.limits.max_path),
            });
        }
        let mut out = Vec::new();
        for c in raw.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir => {
                    return Err(hostile(format!(
                        "{:?} climbs out with `..`",
                        raw.display().to_string()
                    )));
                }
                Component::Normal(n) => out.push(n.to_owned()),
                Component::Prefix(_) => {
                    return Err(hostile(format!("{:?} is not a Unix path", raw.display())));
                }
            }
        }
        Ok(out)
    }

    fn clean_mode(&mut self, mode: u32) -> u32 {
        if mode & 0o6000 != 0 {
            self.report.setid_cleared += 1;
        }
        mode & 0o1777
    }

    /// Opens (creating missing directories) the parent `comps` inside the root.
    fn parent(&mut self, layer: &Digest, comps: &[OsString], shown: &str) -> Result<OwnedFd> {
        let key = join(comps);
        if let Some((k, fd)) = &self.cached
            && *k == key
        {
            return fd
                .try_clone()
                .map_err(|e| Error::io("duplicating a descriptor", e));
        }
        let mut fd = self
            .root
            .try_clone()
            .map_err(|e| Error::io("duplicating a descriptor", e))?;
        for i in 0..comps.len() {
            let prefix = join(&comps[..=i]);
            fd = match openat2(&self.root, prefix.as_str(), dir_how()) {
                Ok(next) => next,
                Err(Errno::ENOENT) => {
                    match mkdirat(&fd, comps[i].as_os_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(Error::nix(format!("creating the parent of {shown:?}"), e));
                        }
                    }
                    openat2(&self.root, prefix.as_str(), dir_how())
                        .map_err(|e| Error::nix(format!("opening the parent of {shown:?}"), e))?
                }
                Err(Errno::EXDEV | Errno::ELOOP) => {
                    return Err(Error::Hostile {
                        layer: layer.to_string(),
                        why: format!("the parent of {shown:?} leads out of the image"),
                    });
                }
                Err(e) => {
                    return Err(Error::nix(format!("opening the parent of {shown:?}"), e));
                }
            };
        }
        let keep = fd
            .try_clone()
            .map_err(|e| Error::io("duplicating a descriptor", e))?;
        self.cached = Some((key, keep));
        Ok(fd)
    }

    fn directory(&mut self, dir: &OwnedFd, name: &OsStr, mode: u32, shown: &str) -> Result<()> {
        match stat_nofollow(dir, name) {
            Ok(st) if is_dir(&st) => {}
            Ok(_) => {
                self.remove(dir, name, shown)?;
                mkdir(dir, name, shown)?;
            }
            Err(_) => mkdir(dir, name, shown)?,
        }
        let fd = openat(
            dir,
            name,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::nix(format!("opening {shown:?}"), e))?;
        fchmod(&fd, Mode::from_bits_truncate(mode))
            .map_err(|e| Error::nix(format!("chmod {shown:?}"), e))?;
        Ok(())
    }

    /// Makes room for a new non-directory entry `name` in `dir`.
    fn replace(&mut self, dir: &OwnedFd, name: &OsStr, shown: &str) -> Result<()> {
        if stat_nofollow(dir, name).is_ok() {
            self.remove(dir, name, shown)?;
        }
        Ok(())
    }

    /// Removes `name` from `dir`, a directory with everything under it; a missing name is fine.
    fn remove(&mut self, dir: &OwnedFd, name: &OsStr, shown: &str) -> Result<()> {
        self.cached = None;
        remove_at(dir, name).map_err(|e| Error::nix(format!("removing for {shown:?}"), e))
    }

    /// Empties `dir` of what lower layers put there (an opaque directory).
    fn opaque(
        &mut self,
        dir: &OwnedFd,
        parent: &[OsString],
        this_layer: &HashSet<Vec<OsString>>,
        shown: &str,
    ) -> Result<()> {
        for name in list(dir).map_err(|e| Error::nix(format!("listing for {shown:?}"), e))? {
            let mut p = parent.to_vec();
            p.push(name.clone());
            if !this_layer.contains(&p) {
                self.remove(dir, &name, shown)?;
            }
        }
        Ok(())
    }
}

fn join(comps: &[OsString]) -> String {
    let mut s = String::from(".");
    for c in comps {
        s.push('/');
        s.push_str(&c.to_string_lossy());
    }
    s
}

fn mkdir(dir: &OwnedFd, name: &OsStr, shown: &str) -> Result<()> {
    mkdirat(dir, name, Mode::from_bits_truncate(0o755))
        .map_err(|e| Error::nix(format!("creating directory {shown:?}"), e))
}

fn stat_nofollow(dir: &impl AsFd, name: &OsStr) -> nix::Result<FileStat> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// The names in a directory, `.` and `..` left out.
fn list(dir: &OwnedFd) -> nix::Result<Vec<OsString>> {
    let fd = openat(
        dir,
        ".",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = nix::dir::Dir::from_fd(fd)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(OsStr::from_bytes(n).to_owned());
        }
    }
    Ok(out)
}

/// Removes `name` in `dir` without following any symlink: a directory is opened with
/// `O_NOFOLLOW` and emptied first.
pub(crate) fn remove_at(dir: &OwnedFd, name: &OsStr) -> nix::Result<()> {
    let st = match stat_nofollow(dir, name) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if is_dir(&st) {
        let sub = openat(
            dir,
            name,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // A directory without write permission for its owner (an image may ship one).
        let _ = fchmod(&sub, Mode::from_bits_truncate(0o700));
        for child in list(&sub)? {
            remove_at(&sub, &child)?;
        }
        unlinkat(dir, name, UnlinkatFlags::RemoveDir)
    } else {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
    }
}

/// Removes a whole tree below `path` (the store's own directories) without following links.
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let dir = match nix::fcntl::open(
        parent,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(d) => d,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(Error::nix(format!("opening {}", parent.display()), e)),
    };
    remove_at(&dir, name).map_err(|e| Error::nix(format!("removing {}", path.display()), e))
}
