//! Hostile layers against the unpacker: each is refused or neutralised, and nothing outside
//! the root changes. Every test has an `outside` directory beside the root with a victim file
//! in it, and names host paths with a nonce, so even a broken unpacker could not damage the
//! machine. (The CLI's `images` test runs the same attacks through `ampoule image import` in a
//! throw-away namespace.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ampoule_image::unpack::{Limits, Unpacker};
use ampoule_image::{Digest, Error};

struct Case {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    victim: PathBuf,
}

impl Case {
    fn new() -> Case {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        let victim = outside.join("victim");
        fs::write(&victim, "original").unwrap();
        Case {
            _tmp: tmp,
            root,
            outside,
            victim,
        }
    }

    fn unpack(&self, layers: &[Vec<u8>], limits: Limits) -> Result<ampoule_image::Report, Error> {
        let mut u = Unpacker::new(&self.root, limits)?;
        for l in layers {
            u.apply(&Digest::of(l), l.as_slice())?;
        }
        Ok(u.report().clone())
    }

    /// The outside directory holds exactly the victim, unchanged.
    fn outside_unchanged(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("victim")]);
        assert_eq!(fs::read_to_string(&self.victim).unwrap(), "original");
        assert_eq!(fs::metadata(&self.victim).unwrap().nlink(), 1);
    }
}

fn nonce() -> String {
    format!(
        "ampoule-hostile-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A tar layer built from raw headers (the `tar` crate's builder refuses `..`, which is the
/// point of these tests).
#[derive(Default)]
struct Layer(Vec<u8>);

impl Layer {
    fn raw(mut self, path: &str, kind: tar::EntryType, mode: u32, link: &str, data: &[u8]) -> Self {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name.fill(0);
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            old.linkname.fill(0);
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }
    fn file(self, path: &str, data: &str) -> Self {
        self.raw(path, tar::EntryType::Regular, 0o644, "", data.as_bytes())
    }
    fn dir(self, path: &str) -> Self {
        self.raw(path, tar::EntryType::Directory, 0o755, "", b"")
    }
    fn symlink(self, path: &str, target: &str) -> Self {
        self.raw(path, tar::EntryType::Symlink, 0o777, target, b"")
    }
    fn hardlink(self, path: &str, target: &str) -> Self {
        self.raw(path, tar::EntryType::Link, 0o644, target, b"")
    }
    fn done(mut self) -> Vec<u8> {
        self.0.extend(std::iter::repeat_n(0u8, 1024));
        self.0
    }
}

fn hostile(r: Result<ampoule_image::Report, Error>) -> String {
    match r {
        Err(e @ Error::Hostile { .. }) => e.to_string(),
        other => panic!("expected a hostile-layer refusal, got {other:?}"),
    }
}

#[test]
fn dotdot_paths_are_refused() {
    let c = Case::new();
    for path in ["../outside/victim", "a/../../outside/victim", "./../x"] {
        let l = Layer::default().file(path, "pwned").done();
        let msg = hostile(c.unpack(&[l], Limits::default()));
        assert!(msg.contains("`..`"), "{msg}");
    }
    c.outside_unchanged();
}

#[test]
fn absolute_paths_land_inside() {
    let c = Case::new();
    let n = nonce();
    let abs = c.outside.join("victim");
    let l = Layer::default()
        .file(&format!("/{n}"), "inside")
        .file(abs.to_str().unwrap(), "inside too")
        .done();
    c.unpack(&[l], Limits::default()).unwrap();
    assert!(!Path::new("/").join(&n).exists());
    assert_eq!(fs::read_to_string(c.root.join(&n)).unwrap(), "inside");
    let inner = c.root.join(abs.strip_prefix("/").unwrap());
    assert_eq!(fs::read_to_string(inner).unwrap(), "inside too");
    c.outside_unchanged();
}

#[test]
fn a_symlink_out_is_followed_inside_only() {
    let c = Case::new();
    let n = nonce();
    // A symlink to /etc, then a file written through it: it lands in the image's /etc.
    let l = Layer::default()
        .dir("etc/")
        .symlink("etc2", "/etc")
        .file(&format!("etc2/{n}"), "through the link")
        .done();
    c.unpack(&[l], Limits::default()).unwrap();
    assert!(!Path::new("/etc").join(&n).exists());
    assert_eq!(
        fs::read_to_string(c.root.join("etc").join(&n)).unwrap(),
        "through the link"
    );
    // A symlink climbing past the root resolves to the root.
    let l = Layer::default()
        .symlink("up", "../../../../../../..")
        .file(&format!("up/etc/{n}2"), "at the root")
        .done();
    c.unpack(&[l], Limits::default()).unwrap();
    assert!(!Path::new("/etc").join(format!("{n}2")).exists());
    assert!(c.root.join("etc").join(format!("{n}2")).exists());
    // A symlink to the outside directory (absolute, and relative with `..`), then a file
    // through each: the target does not exist inside, so the write is refused.
    let outside = c.outside.to_str().unwrap().to_owned();
    for (link, through) in [
        (outside.as_str(), "out1/victim"),
        ("../outside", "out2/victim"),
    ] {
        let name = through.split('/').next().unwrap();
        let l = Layer::default()
            .symlink(name, link)
            .file(through, "pwned")
            .done();
        assert!(c.unpack(&[l], Limits::default()).is_err(), "{through}");
    }
    // In a later layer too (the link comes from a lower layer).
    let l1 = Layer::default().symlink("later", &outside).done();
    let l2 = Layer::default().file("later/victim", "pwned").done();
    assert!(c.unpack(&[l1, l2], Limits::default()).is_err());
    c.outside_unchanged();
}

#[test]
fn a_symlink_is_replaced_not_written_through() {
    let c = Case::new();
    let victim = c.victim.to_str().unwrap().to_owned();
    let l = Layer::default()
        .symlink("s", &victim)
        .file("s", "replaced the link")
        .symlink("d", c.outside.to_str().unwrap())
        .dir("d/")
        .file("d/victim", "in the new directory")
        .done();
    c.unpack(&[l], Limits::default()).unwrap();
    assert!(fs::symlink_metadata(c.root.join("s")).unwrap().is_file());
    assert!(fs::symlink_metadata(c.root.join("d")).unwrap().is_dir());
    c.outside_unchanged();
}

#[test]
fn hardlinks_out_are_refused() {
    let c = Case::new();
    let victim = c.victim.to_str().unwrap().to_owned();
    for target in [
        "/etc/passwd",
        victim.as_str(),
        "../outside/victim",
        "../../../../../../etc/passwd",
    ] {
        let l = Layer::default().hardlink("h", target).done();
        let msg = hostile(c.unpack(&[l], Limits::default()));
        assert!(msg.contains("hard link") || msg.contains("`..`"), "{msg}");
        assert!(!c.root.join("h").exists());
    }
    // Through a symlinked parent: the link target resolves inside, where there is nothing.
    let l = Layer::default()
        .symlink("o", c.outside.to_str().unwrap())
        .hardlink("h", "o/victim")
        .done();
    assert!(c.unpack(&[l], Limits::default()).is_err());
    // A hard link inside is kept, and writing the name again replaces it instead of writing
    // through it.
    let l = Layer::default()
        .file("f", "first")
        .hardlink("g", "f")
        .file("g", "second")
        .done();
    c.unpack(&[l], Limits::default()).unwrap();
    assert_eq!(fs::read_to_string(c.root.join("f")).unwrap(), "first");
    assert_eq!(fs::read_to_string(c.root.join("g")).unwrap(), "second");
    c.outside_unchanged();
}

#[test]
fn whiteouts_stay_inside() {
    let c = Case::new();
    fs::write(c.root.parent().unwrap().join("x"), "beside the root").unwrap();
    for path in [
        "a/.wh.../../x",
        "../../.wh.x",
        "a/.wh..",
        "a/.wh.",
        ".wh...",
    ] {
        let l = Layer::default()
            .dir("a/")
            .raw(path, tar::EntryType::Regular, 0o644, "", b"")
            .done();
        hostile(c.unpack(&[l], Limits::default()));
    }
    assert!(c.root.parent().unwrap().join("x").exists());
    // A whiteout through a symlinked directory removes inside only.
    let l = Layer::default()
        .symlink("o", c.outside.to_str().unwrap())
        .file(".wh.victim", "")
        .done();
    c.unpack(&[l], Limits::default()).unwrap();
    let l = Layer::default().file("o/.wh.victim", "").done();
    let _ = c.unpack(&[l], Limits::default());
    c.outside_unchanged();
    // Whiteouts and opaque directories, applied as the spec says.
    let base = Layer::default()
        .file("a/x", "1")
        .file("a/y", "2")
        .file("b", "3")
        .file("keep", "4")
        .done();
    let top = Layer::default()
        .file(".wh.b", "")
        .file("a/z", "5")
        .file("a/.wh..wh..opq", "")
        .done();
    c.unpack(&[base, top], Limits::default()).unwrap();
    assert!(!c.root.join("b").exists());
    assert!(c.root.join("keep").exists());
    let mut a: Vec<_> = fs::read_dir(c.root.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    a.sort();
    assert_eq!(a, ["z"]);
}

fn too_large(r: Result<ampoule_image::Report, Error>) -> String {
    match r {
        Err(e @ Error::TooLarge { .. }) => e.to_string(),
        other => panic!("expected a size refusal, got {other:?}"),
    }
}

#[test]
fn bombs_are_refused() {
    let c = Case::new();
    // A 10 GB file declared by its header (the bytes never come).
    let mut h = tar::Header::new_gnu();
    h.set_path("big").unwrap();
    h.set_size(10 << 30);
    h.set_mode(0o644);
    h.set_cksum();
    let mut l = h.as_bytes().to_vec();
    l.extend(std::iter::repeat_n(0u8, 4096));
    let msg = too_large(c.unpack(&[l], Limits::default()));
    assert!(
        msg.contains("decompression bomb") && msg.contains("10737418240"),
        "{msg}"
    );

    // A 10 GB sparse file: 512 bytes of data, a real size of 10 GB.
    let mut h = tar::Header::new_gnu();
    h.set_path("sparse").unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_size(512);
    {
        let g = h.as_gnu_mut().unwrap();
        g.sparse[0].set_offset((10 << 30) - 512);
        g.sparse[0].set_length(512);
        g.set_real_size(10 << 30);
    }
    h.set_cksum();
    let mut l = h.as_bytes().to_vec();
    l.extend(std::iter::repeat_n(b'x', 512));
    l.extend(std::iter::repeat_n(0u8, 1024));
    too_large(c.unpack(&[l], Limits::default()));

    // A gzip bomb: 96 MiB of zeros in ~100 KiB, against a 64 MiB limit.
    let zeros = vec![0u8; 96 << 20];
    let tar = Layer::default()
        .raw("zeros", tar::EntryType::Regular, 0o644, "", &zeros)
        .done();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    assert!(gz.len() < 1 << 20);
    let limits = Limits {
        max_bytes: 64 << 20,
        ..Limits::default()
    };
    let mut u = Unpacker::new(&c.root, limits).unwrap();
    let tmp = c.root.parent().unwrap().join("layer.tar.gz");
    fs::write(&tmp, &gz).unwrap();
    let r = u.apply_blob(&Digest::of(&gz), "", fs::File::open(&tmp).unwrap());
    assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");

    // The same bomb compressed with zstd (~10 KiB): refused the same way.
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    assert!(zst.len() < 1 << 20);
    let mut u = Unpacker::new(&c.root, limits).unwrap();
    let tmp = c.root.parent().unwrap().join("layer.tar.zst");
    fs::write(&tmp, &zst).unwrap();
    let r = u.apply_blob(&Digest::of(&zst), "", fs::File::open(&tmp).unwrap());
    assert!(matches!(r, Err(Error::TooLarge { .. })), "{r:?}");

    // A zstd frame asking for a 1 GiB decoding window (memory, before any output): refused.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    enc.include_contentsize(false).unwrap();
    enc.window_log(30).unwrap();
    enc.long_distance_matching(true).unwrap();
    enc.write_all(&Layer::default().file("small", "x").done())
        .unwrap();
    let zst = enc.finish().unwrap();
    let mut u = Unpacker::new(&c.root, Limits::default()).unwrap();
    fs::write(&tmp, &zst).unwrap();
    let r = u.apply_blob(
        &Digest::of(&zst),
        "application/vnd.oci.image.layer.v1.tar+zstd",
        fs::File::open(&tmp).unwrap(),
    );
    let e = r.expect_err("a 1 GiB window was accepted");
    let msg = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(msg.contains("memory") || msg.contains("window"), "{msg}");
    assert!(!c.root.join("small").exists());

    // Too many entries.
    let mut l = Layer::default();
    for i in 0..200 {
        l = l.file(&format!("f{i}"), "");
    }
    let limits = Limits {
        max_entries: 100,
        ..Limits::default()
    };
    let msg = too_large(c.unpack(&[l.done()], limits));
    assert!(msg.contains("100 entries"), "{msg}");
    c.outside_unchanged();
}

#[test]
fn devices_are_dropped_and_setid_bits_cleared() {
    let c = Case::new();
    let mut dev = tar::Header::new_gnu();
    dev.set_path("dev/sda").unwrap();
    dev.set_entry_type(tar::EntryType::Block);
    dev.set_device_major(8).unwrap();
    dev.set_device_minor(0).unwrap();
    dev.set_mode(0o666);
    dev.set_size(0);
    dev.set_cksum();
    let mut mem = dev.clone();
    mem.set_path("dev/mem").unwrap();
    mem.set_entry_type(tar::EntryType::Char);
    mem.set_cksum();
    let mut l = Layer::default()
        .raw(
            "bin/su",
            tar::EntryType::Regular,
            0o4755,
            "",
            b"#!/bin/sh\n",
        )
        .raw(
            "bin/wall",
            tar::EntryType::Regular,
            0o2755,
            "",
            b"#!/bin/sh\n",
        )
        .raw("shared/", tar::EntryType::Directory, 0o3777, "", b"")
        .raw("fifo", tar::EntryType::Fifo, 0o644, "", b"");
    l.0.extend_from_slice(dev.as_bytes());
    l.0.extend_from_slice(mem.as_bytes());
    let r = c.unpack(&[l.done()], Limits::default()).unwrap();
    assert_eq!(r.dropped_count, 3);
    assert!(!c.root.join("dev/sda").exists());
    assert!(!c.root.join("dev/mem").exists());
    assert!(!c.root.join("fifo").exists());
    assert_eq!(r.setid_cleared, 3);
    let mode = |p: &str| fs::metadata(c.root.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("bin/su"), 0o755);
    assert_eq!(mode("bin/wall"), 0o755);
    assert_eq!(mode("shared"), 0o1777);
    c.outside_unchanged();
}
