//! The content store under `<data_dir>/images` (mode 0700):
//!
//! ```text
//! images/
//!   .lock                 flock: one writer (import, pull, rm) at a time
//!   index.json            name:tag → manifest digest, config, layers (replaced atomically)
//!   blobs/sha256/<hex>    manifests, configs and layers, each once, named by its verified digest
//!   rootfs/<hex>/         the unpacked root of the manifest <hex>, shared read-only by sandboxes
//!   tmp/                  blobs and roots being written (renamed into place when complete)
//! ```
//!
//! A blob is renamed into `blobs/` only after its bytes hashed to its name, and a root into
//! `rootfs/` only after every layer applied, so readers (the server) never see half of either
//! and need no lock. Removing a name drops the blobs and roots no other name uses.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, HashingWriter};
use crate::error::{Error, Result};
use crate::name::ImageName;
use crate::oci::{Document, ImageConfig, Manifest, RunConfig};
use crate::unpack::{self, Limits, Report, Unpacker};

/// One named image of the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `name:tag`.
    pub name: String,
    /// The manifest's digest: the image's identity.
    pub manifest: Digest,
    /// The config blob's digest.
    pub config: Digest,
    /// Layer blobs, bottom first.
    pub layers: Vec<Digest>,
    /// Bytes of the layer blobs as stored (compressed where they were).
    pub size: u64,
    /// The config's `created`, when it says.
    #[serde(default)]
    pub created: Option<String>,
    /// `Env`, `WorkingDir`, `User`.
    #[serde(default)]
    pub run: RunConfig,
}

#[derive(Default, Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    images: BTreeMap<String, Image>,
}

/// What removing a name freed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Blobs no other image used.
    pub blobs: usize,
    /// Unpacked roots no other image used.
    pub roots: usize,
}

/// The store. Cheap to open; every writer takes its lock.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    limits: Limits,
}

/// The held write lock.
pub struct Lock(#[allow(dead_code)] Flock<File>);

impl Store {
    /// Opens (creating) the store under `data_dir/images`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let root = data_dir.join("images");
        for d in [
            root.clone(),
            root.join("blobs/sha256"),
            root.join("rootfs"),
            root.join("tmp"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        // A store made by an older umask is tightened; the roots stay readable through it by
        // nobody but this user (and root, which mounts them).
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("chmod {}", root.display()), e))?;
        Ok(Self {
            root,
            limits: Limits::default(),
        })
    }

    /// The same store with other unpacking bounds.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The unpacking bounds (a pull refuses blobs larger than their byte budget too).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// `<data_dir>/images`.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Takes the writers' lock (blocking).
    pub fn lock(&self) -> Result<Lock> {
        let path = self.root.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map(Lock)
            .map_err(|(_, e)| Error::nix(format!("locking {}", path.display()), e))
    }

    /// Where the blob `d` lives (whether or not it is there).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Whether the blob `d` is stored.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Opens a stored blob.
    pub fn open_blob(&self, d: &Digest) -> Result<File> {
        File::open(self.blob_path(d)).map_err(|e| Error::io(format!("opening blob {d}"), e))
    }

    /// Reads a stored blob whole (manifests and configs: bounded to 4 MiB).
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_blob(d)?
            .take(4 << 20)
            .read_to_end(&mut out)
            .map_err(|e| Error::io(format!("reading blob {d}"), e))?;
        Ok(out)
    }

    /// A writer for a new blob; [`BlobWriter::commit`] checks its digest and moves it in.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let tmp = self.root.join("tmp");
        let file = tempfile_in(&tmp)?;
        Ok(BlobWriter {
            store: self.clone(),
            path: file.1,
            inner: HashingWriter::new(file.0),
        })
    }

    /// Stores what `reader` yields; when `expected` is given, the bytes must hash to it.
    pub fn put_blob(
        &self,
        expected: Option<&Digest>,
        mut reader: impl Read,
    ) -> Result<(Digest, u64)> {
        let mut w = self.blob_writer()?;
        io::copy(&mut reader, &mut w).map_err(|e| Error::io("writing a blob", e))?;
        w.commit(expected)
    }

    /// Stores `bytes`.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        self.put_blob(None, bytes).map(|(d, _)| d)
    }

    fn read_index(&self) -> Result<IndexFile> {
        let path = self.root.join("index.json");
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::format(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(IndexFile {
                version: 1,
                images: BTreeMap::new(),
            }),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    fn write_index(&self, index: &IndexFile) -> Result<()> {
        let (mut f, tmp) = tempfile_in(&self.root.join("tmp"))?;
        let bytes = serde_json::to_vec_pretty(index)
            .map_err(|e| Error::format(format!("serializing the index: {e}")))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("writing the index", e))?;
        let path = self.root.join("index.json");
        fs::rename(&tmp, &path).map_err(|e| Error::io(format!("replacing {}", path.display()), e))
    }

    /// Every named image, by name.
    pub fn list(&self) -> Result<Vec<Image>> {
        Ok(self.read_index()?.images.into_values().collect())
    }

    /// The image `name` (`name` or `name:tag`).
    pub fn get(&self, name: &str) -> Result<Image> {
        let key = ImageName::parse(name)?.to_string();
        self.read_index()?
            .images
            .remove(&key)
            .ok_or(Error::NotFound(key))
    }

    /// The unpacked root of an image (present once it was tagged).
    pub fn rootfs(&self, image: &Image) -> PathBuf {
        self.root.join("rootfs").join(image.manifest.hex())
    }

    /// Names `manifest` (whose blobs must all be stored) `name`, unpacking its root unless an
    /// image with the same manifest has it already. Takes the caller's lock as proof.
    pub fn tag(
        &self,
        _lock: &Lock,
        name: &ImageName,
        manifest: &Digest,
    ) -> Result<(Image, Option<Report>)> {
        let bytes = self.read_blob(manifest)?;
        let m = match Document::parse(&bytes, None)? {
            Document::Manifest(m) => m,
            Document::Index(_) => {
                return Err(Error::format(format!(
                    "{manifest} is an index, not a manifest"
                )));
            }
        };
        let config: ImageConfig = serde_json::from_slice(&self.read_blob(&m.config.digest)?)
            .map_err(|e| Error::format(format!("bad image config {}: {e}", m.config.digest)))?;
        if !config.os.is_empty() && config.os != "linux" {
            return Err(Error::format(format!(
                "the image is for {}, not linux",
                config.os
            )));
        }
        for l in &m.layers {
            if !self.has_blob(&l.digest) {
                return Err(Error::format(format!("layer {} is not stored", l.digest)));
            }
        }
        let image = Image {
            name: name.to_string(),
            manifest: manifest.clone(),
            config: m.config.digest.clone(),
            layers: m.layers.iter().map(|l| l.digest.clone()).collect(),
            size: m.layers.iter().map(|l| l.size).sum(),
            created: config.created.clone(),
            run: config.config.clone(),
        };
        let report = if self.rootfs(&image).is_dir() {
            None
        } else {
            Some(self.unpack(&m, &self.rootfs(&image))?)
        };
        let mut index = self.read_index()?;
        index.version = 1;
        index.images.insert(image.name.clone(), image.clone());
        self.write_index(&index)?;
        Ok((image, report))
    }

    fn unpack(&self, m: &Manifest, dest: &Path) -> Result<Report> {
        let tmp = self.root.join("tmp").join(format!(
            "rootfs-{}-{}",
            std::process::id(),
            m.config.digest.short()
        ));
        unpack::remove_tree(&tmp)?;
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        let result = (|| {
            let mut u = Unpacker::new(&tmp, self.limits)?;
            for l in &m.layers {
                u.apply_blob(&l.digest, &l.media_type, self.open_blob(&l.digest)?)?;
            }
            Ok::<_, Error>(u.report().clone())
        })();
        match result {
            Ok(report) => {
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
                    .map_err(|e| Error::io(format!("chmod {}", tmp.display()), e))?;
                fs::rename(&tmp, dest)
                    .map_err(|e| Error::io(format!("moving the root to {}", dest.display()), e))?;
                Ok(report)
            }
            Err(e) => {
                let _ = unpack::remove_tree(&tmp);
                Err(e)
            }
        }
    }

    /// Removes the name, then every blob and root that no remaining image uses.
    pub fn remove(&self, lock: &Lock, name: &str) -> Result<Removed> {
        let key = ImageName::parse(name)?.to_string();
        let mut index = self.read_index()?;
        if index.images.remove(&key).is_none() {
            return Err(Error::NotFound(key));
        }
        self.write_index(&index)?;
        self.collect(lock)
    }

    /// Drops blobs and roots no named image refers to, and leftovers in `tmp/`.
    pub fn collect(&self, _lock: &Lock) -> Result<Removed> {
        let index = self.read_index()?;
        let mut keep = BTreeSet::new();
        let mut roots = BTreeSet::new();
        for i in index.images.values() {
            keep.insert(i.manifest.hex().to_owned());
            keep.insert(i.config.hex().to_owned());
            keep.extend(i.layers.iter().map(|l| l.hex().to_owned()));
            roots.insert(i.manifest.hex().to_owned());
        }
        let mut removed = Removed::default();
        for (dir, keep, count) in [
            ("blobs/sha256", &keep, &mut removed.blobs),
            ("rootfs", &roots, &mut removed.roots),
        ] {
            let dir = self.root.join(dir);
            let entries = fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    unpack::remove_tree(&e.path())?;
                    *count += 1;
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.root.join("tmp")) {
            for e in entries.flatten() {
                let _ = unpack::remove_tree(&e.path());
            }
        }
        Ok(removed)
    }
}

/// A blob being written: hashed as it goes, moved into the store by [`BlobWriter::commit`].
pub struct BlobWriter {
    store: Store,
    path: PathBuf,
    inner: HashingWriter<File>,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn commit(self, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        let (file, digest, len) = self.inner.finish();
        let path = self.path;
        let done = (|| {
            if let Some(want) = expected
                && *want != digest
            {
                return Err(Error::DigestMismatch {
                    what: "blob".into(),
                    expected: want.to_string(),
                    actual: digest.to_string(),
                });
            }
            file.sync_all()
                .map_err(|e| Error::io("writing a blob", e))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io("chmod a blob", e))?;
            let dest = self.store.blob_path(&digest);
            fs::rename(&path, &dest)
                .map_err(|e| Error::io(format!("moving a blob to {}", dest.display()), e))
        })();
        if done.is_err() {
            let _ = fs::remove_file(&path);
        }
        done.map(|()| (digest, len))
    }
}

fn tempfile_in(dir: &Path) -> Result<(File, PathBuf)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("blob-{}-{n}", std::process::id()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::io(
                    format!("creating a file in {}", dir.display()),
                    e,
                ));
            }
        }
    }
}
