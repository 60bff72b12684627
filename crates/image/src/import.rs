//! Import from an OCI image layout directory or a `docker save` archive (which, since Docker
//! 25, holds an OCI layout too; older archives only their `manifest.json`).
//!
//! Every blob is copied into the store through its digest check: a layout or archive that lies
//! about its content is refused. An archive's own entries are never unpacked to disk by path:
//! each regular file is streamed into the store and looked up by name afterwards.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::name::ImageName;
use crate::oci::{
    Compression, Descriptor, Document, Index, MEDIA_OCI_CONFIG, MEDIA_OCI_LAYER,
    MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_ZSTD, MEDIA_OCI_MANIFEST, Manifest, pick_manifest,
};
use crate::store::{Image, Lock, Store};
use crate::unpack::Report;

/// What an import produced.
#[derive(Debug)]
pub struct Imported {
    /// The named image.
    pub image: Image,
    /// The unpacking report (none when an image with the same manifest was unpacked before).
    pub report: Option<Report>,
}

/// Imports `path` (a layout directory or an archive) as `name`.
pub fn import(store: &Store, lock: &Lock, path: &Path, name: &ImageName) -> Result<Imported> {
    let meta =
        fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let manifest = if meta.is_dir() {
        from_layout(store, path)?
    } else {
        let f =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        from_archive(store, f)?
    };
    let (image, report) = store.tag(lock, name, &manifest)?;
    if !meta.is_dir() {
        // The archive's other files (its JSON, old-style layer metadata) were stored too.
        store.collect(lock)?;
    }
    Ok(Imported { image, report })
}

/// Where blobs come from while an image is resolved.
trait Source {
    /// Makes sure the blob `d` is in the store (verified).
    fn fetch(&mut self, store: &Store, d: &Descriptor) -> Result<()>;
}

/// Resolves the image of an index (descending into nested indexes) or a manifest, storing
/// every blob it needs; returns the manifest's digest.
fn resolve(store: &Store, src: &mut dyn Source, top: &Index) -> Result<Digest> {
    let mut index = top.clone();
    for _depth in 0..4 {
        let d = pick_manifest(&index)?.clone();
        src.fetch(store, &d)?;
        match Document::parse(&store.read_blob(&d.digest)?, Some(&d.media_type))? {
            Document::Index(i) => index = i,
            Document::Manifest(m) => {
                fetch_manifest_blobs(store, src, &m)?;
                return Ok(d.digest);
            }
        }
    }
    Err(Error::format("image indexes nested more than 4 deep"))
}

fn fetch_manifest_blobs(store: &Store, src: &mut dyn Source, m: &Manifest) -> Result<()> {
    src.fetch(store, &m.config)?;
    for l in &m.layers {
        src.fetch(store, l)?;
    }
    Ok(())
}

struct LayoutDir(PathBuf);

impl Source for LayoutDir {
    fn fetch(&mut self, store: &Store, d: &Descriptor) -> Result<()> {
        if store.has_blob(&d.digest) {
            return Ok(());
        }
        let p = self.0.join("blobs/sha256").join(d.digest.hex());
        let f = File::open(&p).map_err(|e| Error::io(format!("opening {}", p.display()), e))?;
        store.put_blob(Some(&d.digest), f.take(d.size.saturating_add(1)))?;
        Ok(())
    }
}

fn read_index(bytes: &[u8], what: &str) -> Result<Index> {
    match Document::parse(bytes, None)? {
        Document::Index(i) => Ok(i),
        Document::Manifest(_) => Err(Error::format(format!("{what} is not an image index"))),
    }
}

fn from_layout(store: &Store, dir: &Path) -> Result<Digest> {
    let layout = fs::read(dir.join("oci-layout")).map_err(|e| {
        Error::io(
            format!(
                "{} is not an OCI image layout (no oci-layout file)",
                dir.display()
            ),
            e,
        )
    })?;
    #[derive(Deserialize)]
    struct Layout {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    let l: Layout = serde_json::from_slice(&layout)
        .map_err(|e| Error::format(format!("bad oci-layout: {e}")))?;
    if !l.version.starts_with("1.") {
        return Err(Error::format(format!(
            "unsupported OCI layout version {}",
            l.version
        )));
    }
    let index = fs::read(dir.join("index.json"))
        .map_err(|e| Error::io(format!("reading {}/index.json", dir.display()), e))?;
    let index = read_index(&index, "index.json")?;
    resolve(store, &mut LayoutDir(dir.to_owned()), &index)
}

/// The archive's files, streamed into the store: path → (digest, size), small ones kept.
struct Archive {
    files: HashMap<String, (Digest, u64)>,
    links: HashMap<String, String>,
}

impl Archive {
    fn lookup(&self, path: &str) -> Option<&(Digest, u64)> {
        let mut p = normalize(path)?;
        for _ in 0..8 {
            if let Some(f) = self.files.get(&p) {
                return Some(f);
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }
}

impl Source for Archive {
    fn fetch(&mut self, store: &Store, d: &Descriptor) -> Result<()> {
        if store.has_blob(&d.digest) {
            Ok(())
        } else {
            Err(Error::format(format!(
                "the archive does not hold blob {}",
                d.digest
            )))
        }
    }
}

/// A path inside the archive, relative and without `.`/`..`; `None` when it climbs out.
fn normalize(p: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(n) => out.push(n.to_str()?),
            Component::ParentDir => {
                out.pop()?;
            }
            _ => {}
        }
    }
    Some(out.join("/"))
}

fn from_archive(store: &Store, f: File) -> Result<Digest> {
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let mut archive = Archive {
        files: HashMap::new(),
        links: HashMap::new(),
    };
    let read = |e: std::io::Error| Error::io("reading the archive", e);
    for entry in ar.entries().map_err(read)? {
        let entry = entry.map_err(read)?;
        let path = entry.path().map_err(read)?.to_string_lossy().into_owned();
        let Some(path) = normalize(&path) else {
            continue;
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                let (digest, _) = store.put_blob(None, entry)?;
                archive.files.insert(path, (digest, size));
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                if let Some(target) = entry.link_name().map_err(read)? {
                    let target = target.to_string_lossy().into_owned();
                    // Symlinks are relative to their directory, hard links to the archive.
                    let full = if entry.header().entry_type() == tar::EntryType::Symlink {
                        let dir = Path::new(&path)
                            .parent()
                            .map(Path::to_path_buf)
                            .unwrap_or_default();
                        dir.join(&target).to_string_lossy().into_owned()
                    } else {
                        target
                    };
                    if let Some(t) = normalize(&full) {
                        archive.links.insert(path, t);
                    }
                }
            }
            _ => {}
        }
    }
    // A blob file must be what its name says (the store hashed it).
    for (path, (digest, _)) in &archive.files {
        if let Some(hex) = path.strip_prefix("blobs/sha256/")
            && hex != digest.hex()
        {
            return Err(Error::DigestMismatch {
                what: path.clone(),
                expected: format!("sha256:{hex}"),
                actual: digest.to_string(),
            });
        }
    }
    if archive.lookup("oci-layout").is_some()
        && let Some((d, _)) = archive.lookup("index.json")
    {
        let index = read_index(&store.read_blob(d)?, "the archive's index.json")?;
        return resolve(store, &mut archive, &index);
    }
    let (d, _) = archive
        .lookup("manifest.json")
        .ok_or_else(|| {
            Error::format("neither an OCI layout nor a `docker save` archive (no manifest.json)")
        })?
        .clone();
    #[derive(Deserialize)]
    struct SaveEntry {
        #[serde(rename = "Config")]
        config: String,
        #[serde(rename = "Layers")]
        layers: Vec<String>,
    }
    let entries: Vec<SaveEntry> = serde_json::from_slice(&store.read_blob(&d)?)
        .map_err(|e| Error::format(format!("bad manifest.json: {e}")))?;
    let [entry] = entries.as_slice() else {
        return Err(Error::format(format!(
            "the archive holds {} images; save one image per archive",
            entries.len()
        )));
    };
    let blob = |p: &str| {
        archive
            .lookup(p)
            .cloned()
            .ok_or_else(|| Error::format(format!("manifest.json names {p:?}, not in the archive")))
    };
    let (config, config_size) = blob(&entry.config)?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let (digest, size) = blob(l)?;
        let mut head = [0u8; 4];
        let n = store.open_blob(&digest)?.read(&mut head).unwrap_or(0);
        let media = match Compression::detect("", &head[..n])? {
            Compression::Gzip => MEDIA_OCI_LAYER_GZIP,
            Compression::Zstd => MEDIA_OCI_LAYER_ZSTD,
            Compression::None => MEDIA_OCI_LAYER,
        };
        layers.push(Descriptor {
            media_type: media.into(),
            digest,
            size,
            platform: None,
            annotations: Default::default(),
        });
    }
    // An OCI manifest of our own for it: deterministic, so the same archive imports to the
    // same digest.
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_OCI_MANIFEST.into()),
        config: Descriptor {
            media_type: MEDIA_OCI_CONFIG.into(),
            digest: config,
            size: config_size,
            platform: None,
            annotations: Default::default(),
        },
        layers,
    };
    let bytes = serde_json::to_vec(&manifest)
        .map_err(|e| Error::format(format!("serializing a manifest: {e}")))?;
    store.put_bytes(&bytes)
}
