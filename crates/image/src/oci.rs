//! The OCI (and Docker v2) JSON documents the store reads: index, manifest, image config. Only
//! the fields ampoule uses; unknown fields are kept out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What `Accept` says when asking a registry for a manifest.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// A pointer to a blob.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Clone, Debug, Deserialize)]
pub struct Index {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// An image manifest (OCI or Docker v2 schema 2).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The image configuration blob: the parts a sandbox uses.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub config: RunConfig,
}

/// `config.config`: how the image wants its process run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunConfig {
    #[serde(rename = "Env", default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(rename = "WorkingDir", default, deserialize_with = "null_as_default")]
    pub working_dir: String,
    #[serde(rename = "User", default, deserialize_with = "null_as_default")]
    pub user: String,
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The manifest or index in `bytes`, told apart by media type (or, when it is absent, shape).
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

impl Document {
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(format!("manifest is not JSON: {e}")))?;
        let kind = probe
            .media_type
            .or_else(|| content_type.map(|c| c.split(';').next().unwrap_or(c).trim().to_owned()));
        let is_index = match kind.as_deref() {
            Some(MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST) => true,
            Some(MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST) => false,
            _ => probe.manifests.is_some(),
        };
        if is_index {
            serde_json::from_slice(bytes)
                .map(Document::Index)
                .map_err(|e| Error::format(format!("bad image index: {e}")))
        } else {
            serde_json::from_slice(bytes)
                .map(Document::Manifest)
                .map_err(|e| Error::format(format!("bad image manifest: {e}")))
        }
    }
}

/// The Go architecture name of this host, as image platforms say it.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// The manifest of an index that fits this host (linux and its architecture).
pub fn pick_manifest(index: &Index) -> Result<&Descriptor> {
    let fits = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_none_or(|p| p.os == "linux" && p.architecture == host_arch())
    };
    index
        .manifests
        .iter()
        .filter(|d| d.media_type != "application/vnd.in-toto+json")
        .find(|d| d.platform.is_some() && fits(d))
        .or_else(|| index.manifests.iter().find(fits))
        .ok_or_else(|| {
            Error::format(format!(
                "the image has no manifest for linux/{} ({} listed)",
                host_arch(),
                index.manifests.len()
            ))
        })
}

/// How a layer is compressed, from its media type; `None` when the type does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// zstd's frame magic number (RFC 8878 §3.1.1), little-endian.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl Compression {
    /// From the layer's media type, or else its first bytes.
    pub fn detect(media_type: &str, head: &[u8]) -> Result<Self> {
        if media_type.ends_with("+zstd") || head.starts_with(&ZSTD_MAGIC) {
            Ok(Self::Zstd)
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Self::Gzip)
        } else {
            Ok(Self::None)
        }
    }
}

/// Writes an OCI image layout at `dir` holding one image: `layers` (each a tar stream, gzip
/// compressed when it starts with the gzip magic, zstd when with zstd's) under `config`, with the tag `ref_name`.
/// Returns the manifest's digest. Tests build their images with it.
pub fn write_layout(
    dir: &std::path::Path,
    layers: &[Vec<u8>],
    config: &ImageConfig,
    ref_name: &str,
) -> Result<Digest> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)
        .map_err(|e| Error::io(format!("creating {}", blobs.display()), e))?;
    let put = |bytes: &[u8]| -> Result<Descriptor> {
        let d = Digest::of(bytes);
        let p = blobs.join(d.hex());
        std::fs::write(&p, bytes).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        Ok(Descriptor {
            media_type: String::new(),
            digest: d,
            size: bytes.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
        })
    };
    let mut layer_descs = Vec::new();
    for l in layers {
        let mut d = put(l)?;
        d.media_type = if l.starts_with(&[0x1f, 0x8b]) {
            MEDIA_OCI_LAYER_GZIP
        } else if l.starts_with(&ZSTD_MAGIC) {
            MEDIA_OCI_LAYER_ZSTD
        } else {
            MEDIA_OCI_LAYER
        }
        .into();
        layer_descs.push(d);
    }
    let mut config_desc = put(&to_json(config)?)?;
    config_desc.media_type = MEDIA_OCI_CONFIG.into();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_OCI_MANIFEST.into()),
        config: config_desc,
        layers: layer_descs,
    };
    let mut mdesc = put(&to_json(&manifest)?)?;
    mdesc.media_type = MEDIA_OCI_MANIFEST.into();
    mdesc
        .annotations
        .insert("org.opencontainers.image.ref.name".into(), ref_name.into());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": [mdesc],
    });
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(dir.join(name), bytes).map_err(|e| Error::io(format!("writing {name}"), e))
    };
    write("index.json", index.to_string().as_bytes())?;
    write("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(mdesc.digest)
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::format(format!("serializing: {e}")))
}
