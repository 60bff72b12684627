//! The reaper of zygote-born sandboxes (`reaper/reaper.c`, built by build.rs): pid 1 of each
//! session's pid namespace. A small static executable, embedded here and executed from a
//! sealed memfd, so that no host path of ours appears in the sandbox and nothing can change it
//! between two sessions.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::error::{Error, Result};

/// The executable, as build.rs linked it.
const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ampoule-reaper"));

static MEMFD: OnceLock<OwnedFd> = OnceLock::new();

/// A descriptor of the reaper's executable (one sealed memfd per process, made on first use;
/// close-on-exec: the zygote executes it through `/proc/self/fd/N`).
pub(crate) fn executable() -> Result<BorrowedFd<'static>> {
    if let Some(fd) = MEMFD.get() {
        return Ok(fd.as_fd());
    }
    let fd = make().map_err(|e| Error::io("writing the reaper's executable to a memfd", e))?;
    // A concurrent first call may have won: its descriptor is as good as ours.
    Ok(MEMFD.get_or_init(|| fd).as_fd())
}

fn make() -> std::io::Result<OwnedFd> {
    let fd = memfd_create(
        "ampoule-reaper",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(IMAGE)?;
    let fd = OwnedFd::from(file);
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reaper_is_a_static_executable_sealed_against_writes() {
        assert_eq!(&IMAGE[..4], b"\x7fELF");
        let fd = executable().expect("memfd");
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        assert!(
            std::fs::OpenOptions::new().write(true).open(&path).is_err()
                || std::fs::write(&path, b"x").is_err(),
            "a sealed memfd must refuse writes"
        );
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len() as usize, IMAGE.len());
    }
}
