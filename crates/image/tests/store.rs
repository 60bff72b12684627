//! The store: OCI layouts and `docker save` archives imported, digests verified, layers shared,
//! names removed with what only they used.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;

use ampoule_image::oci::{ImageConfig, RunConfig, write_layout};
use ampoule_image::{Digest, Error, ImageName, Store, import};

fn layer(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn config(env: &str) -> ImageConfig {
    ImageConfig {
        architecture: ampoule_image::oci::host_arch().into(),
        os: "linux".into(),
        created: None,
        config: RunConfig {
            env: vec![env.into()],
            working_dir: "/work".into(),
            user: "1000".into(),
        },
    }
}

fn name(s: &str) -> ImageName {
    ImageName::parse(s).unwrap()
}

fn blob_count(store: &Store) -> usize {
    fs::read_dir(store.path().join("blobs/sha256"))
        .unwrap()
        .count()
}

#[test]
fn layouts_share_layers_and_rm_collects() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    let base = layer(&[
        ("etc/os-release", "base\n"),
        ("usr/bin/tool", "#!/bin/sh\n"),
    ]);
    let a_dir = tmp.path().join("a");
    let b_dir = tmp.path().join("b");
    let a_digest = write_layout(
        &a_dir,
        &[base.clone(), layer(&[("app/a", "A")])],
        &config("A=1"),
        "a",
    )
    .unwrap();
    write_layout(
        &b_dir,
        &[base.clone(), layer(&[("app/b", "B")])],
        &config("B=1"),
        "b",
    )
    .unwrap();

    let lock = store.lock().unwrap();
    let a = import::import(&store, &lock, &a_dir, &name("team/a:1.0")).unwrap();
    assert_eq!(a.image.manifest, a_digest);
    assert_eq!(a.image.run.env, ["A=1"]);
    assert_eq!(a.image.run.working_dir, "/work");
    assert!(a.report.is_some());
    let root = store.rootfs(&a.image);
    assert_eq!(
        fs::read_to_string(root.join("etc/os-release")).unwrap(),
        "base\n"
    );
    assert_eq!(fs::read_to_string(root.join("app/a")).unwrap(), "A");
    assert_eq!(blob_count(&store), 4); // manifest, config, base, top

    let b = import::import(&store, &lock, &b_dir, &name("team/b")).unwrap();
    assert_eq!(b.image.layers[0], a.image.layers[0]);
    assert_eq!(b.image.layers[0], Digest::of(&base));
    // The shared base layer is stored once: 4 + manifest, config, top of b.
    assert_eq!(blob_count(&store), 7);

    // Importing the same layout again under another name unpacks nothing new.
    let again = import::import(&store, &lock, &a_dir, &name("alias")).unwrap();
    assert!(again.report.is_none());
    assert_eq!(blob_count(&store), 7);

    let names: Vec<String> = store.list().unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["alias:latest", "team/a:1.0", "team/b:latest"]);
    assert_eq!(store.get("team/b").unwrap().manifest, b.image.manifest);

    // Removing a name keeps what others use.
    let r = store.remove(&lock, "alias").unwrap();
    assert_eq!((r.blobs, r.roots), (0, 0));
    let r = store.remove(&lock, "team/a:1.0").unwrap();
    assert_eq!((r.blobs, r.roots), (3, 1));
    assert!(store.has_blob(&Digest::of(&base)));
    let r = store.remove(&lock, "team/b").unwrap();
    assert_eq!((r.blobs, r.roots), (4, 1));
    assert_eq!(blob_count(&store), 0);
    assert!(matches!(
        store.remove(&lock, "team/b"),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn zstd_layers_unpack_like_gzip_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    let base = layer(&[("etc/os-release", "base\n")]);
    let mut top = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("app/z").unwrap();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_cksum();
    top.append(&h, &b"zstd"[..]).unwrap();
    let top = zstd::encode_all(&top.into_inner().unwrap()[..], 3).unwrap();
    let dir = tmp.path().join("z");
    write_layout(&dir, &[base, top.clone()], &config("Z=1"), "z").unwrap();
    let manifest: serde_json::Value = {
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        let m = index["manifests"][0]["digest"].as_str().unwrap();
        let hex = m.strip_prefix("sha256:").unwrap();
        serde_json::from_slice(&fs::read(dir.join("blobs/sha256").join(hex)).unwrap()).unwrap()
    };
    assert_eq!(
        manifest["layers"][1]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );

    let lock = store.lock().unwrap();
    let z = import::import(&store, &lock, &dir, &name("zstd:1")).unwrap();
    assert_eq!(z.image.layers[1], Digest::of(&top));
    let root = store.rootfs(&z.image);
    assert_eq!(fs::read_to_string(root.join("app/z")).unwrap(), "zstd");
    assert_eq!(
        fs::read_to_string(root.join("etc/os-release")).unwrap(),
        "base\n"
    );
}

#[test]
fn a_lying_layout_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    let dir = tmp.path().join("l");
    let l = layer(&[("f", "good")]);
    write_layout(&dir, std::slice::from_ref(&l), &config("X=1"), "x").unwrap();
    // Replace the layer's bytes: its name no longer matches.
    let p = dir.join("blobs/sha256").join(Digest::of(&l).hex());
    fs::write(&p, layer(&[("f", "evil")])).unwrap();
    let lock = store.lock().unwrap();
    let e = import::import(&store, &lock, &dir, &name("x")).unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn docker_save_archives() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    // The classic shape: <id>/layer.tar (uncompressed), <id>.json config, manifest.json.
    let mut plain = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("hello").unwrap();
    h.set_size(2);
    h.set_mode(0o755);
    h.set_cksum();
    plain.append(&h, &b"hi"[..]).unwrap();
    let layer_tar = plain.into_inner().unwrap();
    let cfg = serde_json::to_vec(&config("D=1")).unwrap();
    let manifest =
        br#"[{"Config":"abc.json","RepoTags":["x:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#;
    let mut ar = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("abc.json", cfg.as_slice()),
        ("l1/layer.tar", layer_tar.as_slice()),
        ("manifest.json", manifest.as_slice()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        ar.append(&h, data).unwrap();
    }
    // A duplicate layer as a symlink, as `docker save` writes them.
    let mut h = tar::Header::new_gnu();
    h.set_path("l2/layer.tar").unwrap();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_link_name("../l1/layer.tar").unwrap();
    h.set_size(0);
    h.set_cksum();
    ar.append(&h, &[][..]).unwrap();
    let archive = tmp.path().join("saved.tar");
    fs::write(&archive, ar.into_inner().unwrap()).unwrap();

    let lock = store.lock().unwrap();
    let i = import::import(&store, &lock, &archive, &name("saved:1")).unwrap();
    assert_eq!(
        i.image.layers,
        vec![Digest::of(&layer_tar), Digest::of(&layer_tar)]
    );
    assert_eq!(i.image.run.env, ["D=1"]);
    assert_eq!(
        fs::read_to_string(store.rootfs(&i.image).join("hello")).unwrap(),
        "hi"
    );
    // The same archive imports to the same manifest.
    let j = import::import(&store, &lock, &archive, &name("saved:2")).unwrap();
    assert_eq!(i.image.manifest, j.image.manifest);
    // A docker save of Docker 25+ holds an OCI layout: that one is used.
    let oci = tmp.path().join("oci");
    let d = write_layout(&oci, &[layer(&[("f", "oci")])], &config("O=1"), "o").unwrap();
    let mut ar = tar::Builder::new(Vec::new());
    ar.append_dir_all(".", &oci).unwrap();
    let archive = tmp.path().join("oci.tar");
    fs::write(&archive, ar.into_inner().unwrap()).unwrap();
    let k = import::import(&store, &lock, &archive, &name("oci-in-tar")).unwrap();
    assert_eq!(k.image.manifest, d);
}
