//! Disk images for durable sandboxes: a sparse file holding an ext4 filesystem, mounted (through
//! a loop device) as the sandbox's scratch instead of a tmpfs, so that its `/mnt/data`, `/tmp`
//! and `/dev/shm` outlive the sandbox, the server and a crash of the server.
//!
//! Why ext4 on a loop device: its size is the sandbox's disk limit (ENOSPC is the limit, as on
//! the tmpfs), its inode count the inode limit, it needs no daemon, and the kernel flushes and
//! unmounts it cleanly when the sandbox's mount namespace dies, however the server ended.
//! Why hand-written loop set-up: the loop ioctls are two calls; `loopdev` needs bindgen.
//!
//! Invariants:
//! - the image is made once (`mkfs.ext4`, mode 0600) and never by the sandbox's code: only the
//!   kernel's ext4 driver writes it, through a loop device the sandbox cannot see;
//! - the loop device is set to clear itself: it is detached when the mount goes, which is when
//!   the sandbox's last process and the supervisor's scratch handle are gone — nothing to undo
//!   after a crash;
//! - an image is mounted by one sandbox at a time: [`wait_released`] before the next.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// Where `mkfs.ext4` is, if anywhere.
pub fn mkfs() -> Option<PathBuf> {
    [
        "/usr/sbin/mkfs.ext4",
        "/sbin/mkfs.ext4",
        "/usr/bin/mkfs.ext4",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Whether this host can keep sandboxes on disk images, and why not.
pub fn check(privileged: bool) -> std::result::Result<(), String> {
    if !privileged {
        return Err("durable sandboxes need root (loop devices and mounts)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control (load the `loop` module)".into());
    }
    if mkfs().is_none() {
        return Err("no mkfs.ext4 (install e2fsprogs)".into());
    }
    Ok(())
}

/// Makes the image at `path` (`size_mib` large, `inodes` inodes) unless it exists. Returns
/// whether it made it.
pub fn create(path: &Path, size_mib: u64, inodes: u64) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let mkfs = mkfs().ok_or_else(|| Error::Invalid("no mkfs.ext4 (install e2fsprogs)".into()))?;
    let tmp = path.with_extension("img.new");
    let made = (|| {
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .ctx(|| format!("creating {}", tmp.display()))?;
        f.set_len(size_mib.max(8) * 1024 * 1024)
            .ctx(|| format!("sizing {}", tmp.display()))?;
        drop(f);
        let out = Command::new(&mkfs)
            .args(["-q", "-F", "-m", "0", "-N"])
            .arg(inodes.max(128).to_string())
            // Lazy init and no discard: the image stays sparse and mkfs takes milliseconds.
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
            .args(["-L", "ampoule"])
            .arg(&tmp)
            .env_clear()
            .output()
            .ctx(|| format!("running {}", mkfs.display()))?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "mkfs.ext4 {}: {}",
                tmp.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        fs::rename(&tmp, path).ctx(|| format!("renaming {}", tmp.display()))
    })();
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made.map(|()| true)
}

/// Whether a loop device still holds the image (a previous sandbox of it is still going).
pub fn in_use(path: &Path) -> bool {
    let Ok(want) = fs::canonicalize(path) else {
        return false;
    };
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with("loop")
            && fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim_end()) == want)
    })
}

/// Waits until no loop device holds the image (the last sandbox on it is fully gone).
pub fn wait_released(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while in_use(path) {
        if Instant::now() >= deadline {
            return Err(Error::Invalid(format!(
                "the disk {} is still held by a previous sandbox",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Attaches the image to a free loop device and mounts it at `target` (`nosuid`, `nodev`).
/// Called by the sandbox's init as real root, in its own mount namespace.
pub(crate) fn mount(image: &Path, target: &Path) -> Result<()> {
    let backing = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
        .ctx(|| format!("opening {}", image.display()))?;
    let control = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .ctx(|| "opening /dev/loop-control".into())?;
    // Another sandbox may take the free device between the two calls: then take the next.
    let mut last = None;
    for _ in 0..64 {
        let n = crate::sys::loop_get_free(control.as_raw_fd())
            .ctx(|| "asking for a free loop device".into())?;
        let dev_path = format!("/dev/loop{n}");
        let dev = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&dev_path)
            .ctx(|| format!("opening {dev_path}"))?;
        match crate::sys::loop_configure(dev.as_raw_fd(), backing.as_raw_fd()) {
            Ok(()) => {
                let mounted = nix::mount::mount(
                    Some(dev_path.as_str()),
                    target,
                    Some("ext4"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    Some("errors=remount-ro"),
                )
                .ctx(|| {
                    format!(
                        "mounting {dev_path} ({}) on {}",
                        image.display(),
                        target.display()
                    )
                });
                // Closing our handle now leaves the mount as the device's only user: it is
                // detached (autoclear) once the mount goes, or now if the mount failed.
                drop(dev);
                return mounted;
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
            Err(e) => {
                return Err(Error::io(
                    format!("binding {dev_path} to {}", image.display()),
                    e,
                ));
            }
        }
    }
    Err(Error::io(
        "no free loop device",
        last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
    ))
}

/// Gives every file under `dir` (not following links) to `uid`:`gid` when its top is not
/// theirs already: an image made for one sandbox's host ids, mounted for another's.
pub(crate) fn reown(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(dir).ctx(|| format!("reading {}", dir.display()))?;
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = fs::symlink_metadata(&p).ctx(|| format!("reading {}", p.display()))?;
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .ctx(|| format!("chown {}", p.display()))?;
        if meta.is_dir() {
            for e in fs::read_dir(&p).ctx(|| format!("listing {}", p.display()))? {
                stack.push(e.ctx(|| format!("listing {}", p.display()))?.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_made_once_sparse_and_private() {
        if mkfs().is_none() {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        assert!(create(&img, 64, 1024).unwrap());
        assert!(!create(&img, 64, 1024).unwrap(), "made twice");
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&img).unwrap();
        assert_eq!(m.len(), 64 * 1024 * 1024);
        assert_eq!(m.mode() & 0o777, 0o600);
        assert!(
            m.blocks() * 512 < 16 * 1024 * 1024,
            "not sparse: {}",
            m.blocks() * 512
        );
        assert!(!in_use(&img));
    }
}
