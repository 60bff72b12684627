//! A session's files (`/mnt/data`), as the core's file commands use them.
//!
//! Everything goes through the session's [`ampoule_runtime::Scratch`], which resolves every
//! path beneath the data directory without following links. Scratch calls are blocking
//! system calls, so they run on the blocking pool; that is safe because they never start a
//! sandbox. Uploads are written to a temporary file and committed only once the whole body
//! arrived within the limit: a refused or broken upload leaves nothing behind.

use std::sync::Arc;

use ampoule_runtime::scratch::{DATA, FileError, FileInfo, NewFile};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::engine::LiveSession;
use crate::error::Error;

/// The bytes of an upload, as they arrive.
pub type ByteStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Most files and directories in a listing taken on an async worker thread.
const INLINE_LISTING: usize = 32;

/// Runs a blocking scratch call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(Error::internal)?
}

fn write_error(e: std::io::Error) -> Error {
    // ENOSPC, EDQUOT: the session's disk limit.
    if e.raw_os_error() == Some(28) || e.raw_os_error() == Some(122) {
        Error::NoSpace
    } else {
        Error::internal(format!("writing an upload: {e}"))
    }
}

/// Writes `body` to `path` (parents created, an existing file replaced), refusing more than
/// `max` bytes. A body that breaks off is refused as cut short.
pub(crate) async fn put(
    live: &Arc<dyn LiveSession>,
    path: &str,
    mut body: ByteStream,
    max: u64,
) -> Result<FileInfo, Error> {
    let l = live.clone();
    let p = path.to_owned();
    let mut file: NewFile = blocking(move || Ok(l.scratch()?.create(DATA, &p, 0o644)?)).await?;
    let std_file = file.file().try_clone().map_err(Error::internal)?;
    let mut w = tokio::fs::File::from_std(std_file);
    let mut seen: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|_| Error::invalid("the request body was cut short"))?;
        seen = seen.saturating_add(chunk.len() as u64);
        if seen > max {
            return Err(Error::PayloadTooLarge { max });
        }
        w.write_all(&chunk).await.map_err(write_error)?;
    }
    w.flush().await.map_err(write_error)?;
    drop(w);
    blocking(move || Ok(file.commit()?)).await
}

/// Every regular file in `/mnt/data`, recursively, names relative to it.
pub(crate) async fn list(live: &Arc<dyn LiveSession>) -> Result<Vec<FileInfo>, Error> {
    // Most sessions hold a handful of files: listing them takes a few system calls, less than
    // the two thread hops of the blocking pool. A larger tree goes to the blocking pool.
    if let Ok(Some(files)) = live.scratch().map_err(Error::from).and_then(|s| {
        s.list_info_small(DATA, INLINE_LISTING)
            .map_err(Error::internal)
    }) {
        return Ok(files);
    }
    let live = live.clone();
    blocking(move || {
        live.scratch()?
            .list_info(DATA)
            .map_err(|e| Error::internal(format!("listing files: {e}")))
    })
    .await
}

/// What is at `path` (not following a final link).
pub(crate) async fn stat(live: &Arc<dyn LiveSession>, path: &str) -> Result<FileInfo, Error> {
    let live = live.clone();
    let path = path.to_owned();
    blocking(move || Ok(live.scratch()?.stat(DATA, &path)?)).await
}

/// Removes the file at `path` (a link itself, never its target).
pub(crate) async fn remove(live: &Arc<dyn LiveSession>, path: &str) -> Result<(), Error> {
    let live = live.clone();
    let path = path.to_owned();
    blocking(move || Ok(live.scratch()?.remove(DATA, &path)?)).await
}

/// The regular file at `path`, open for reading, and what it was when opened.
pub(crate) async fn open(
    live: &Arc<dyn LiveSession>,
    path: &str,
) -> Result<(std::fs::File, FileInfo), Error> {
    let live = live.clone();
    let path = path.to_owned();
    blocking(move || Ok(live.scratch()?.open(DATA, &path)?)).await
}

/// Makes the directory `path` and its missing parents. Answers whether it was made (`false`:
/// a directory was already there).
pub(crate) async fn make_dir(live: &Arc<dyn LiveSession>, path: &str) -> Result<bool, Error> {
    let live = live.clone();
    let path = path.to_owned();
    blocking(move || {
        let scratch = live.scratch()?;
        match scratch.stat(DATA, &path) {
            Ok(info) if info.regular => {
                return Err(Error::NotAFile(format!(
                    "{path:?} is a file, not a directory"
                )));
            }
            Ok(_) => return Ok(false),
            Err(FileError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        // The scratch makes a new file's missing parents (beneath the data directory, never
        // through a link); the file itself lives under a temporary name until committed and
        // is removed when dropped, so only the directories remain.
        drop(scratch.create(DATA, &format!("{path}/.ampoule-mkdir"), 0o644)?);
        Ok(true)
    })
    .await
}

/// Moves the regular file `from` to `to` (parents created, an existing file replaced), by
/// copying it through the scratch's descriptors and removing the original: the scratch has
/// no rename, and a copy never writes through a link planted at `to`. Directories are
/// refused.
pub(crate) async fn move_file(
    live: &Arc<dyn LiveSession>,
    from: &str,
    to: &str,
) -> Result<FileInfo, Error> {
    let live = live.clone();
    let (from, to) = (from.to_owned(), to.to_owned());
    blocking(move || {
        let scratch = live.scratch()?;
        let info = scratch.stat(DATA, &from)?;
        if !info.regular {
            return Err(Error::NotSupported(format!(
                "{from:?} is not a regular file: only files can be moved (directories not yet)"
            )));
        }
        if info.path
            == ampoule_runtime::scratch::normalize(&to)
                .map_err(|e| Error::InvalidPath(e.to_string()))?
                .join("/")
        {
            return Ok(info);
        }
        let (src, info) = scratch.open(DATA, &from)?;
        let mut dst = scratch.create(DATA, &to, 0o644)?;
        std::io::copy(&mut std::io::Read::take(src, info.size), dst.file()).map_err(write_error)?;
        let moved = dst.commit()?;
        scratch.remove(DATA, &from)?;
        Ok(moved)
    })
    .await
}

/// Removes what is at `path`: a file (or a link itself), or a directory's files, recursively
/// (the directories themselves stay, empty: the scratch removes no directory).
pub(crate) async fn remove_tree(live: &Arc<dyn LiveSession>, path: &str) -> Result<(), Error> {
    let live = live.clone();
    let path = path.to_owned();
    blocking(move || {
        let scratch = live.scratch()?;
        let info = scratch.stat(DATA, &path)?;
        if info.regular {
            return Ok(scratch.remove(DATA, &path)?);
        }
        let below = format!("{}/", info.path);
        let files = scratch
            .list_info(DATA)
            .map_err(|e| Error::internal(format!("listing files: {e}")))?;
        for f in files.iter().filter(|f| f.path.starts_with(&below)) {
            match scratch.remove(DATA, &f.path) {
                Ok(()) | Err(FileError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // A link (to anything) is removed itself.
        match scratch.remove(DATA, &path) {
            Ok(()) | Err(FileError::NotFound(_)) | Err(FileError::NotAFile(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// A directory named by a client (`?path=`) as a path relative to `/mnt/data` (`""` for
/// `/mnt/data` itself). Absolute paths elsewhere and `..` are refused.
pub fn data_dir(dir: &str) -> Result<String, Error> {
    let rel = if dir == "/mnt/data" {
        ""
    } else if let Some(rest) = dir.strip_prefix("/mnt/data/") {
        rest
    } else if dir.starts_with('/') {
        return Err(Error::InvalidPath(format!(
            "{dir:?} is not below /mnt/data"
        )));
    } else {
        dir
    };
    let parts: Vec<&str> = rel
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") || rel.contains('\0') {
        return Err(Error::InvalidPath(format!("{dir:?} leaves /mnt/data")));
    }
    Ok(parts.join("/"))
}
