//! `ampoule image` as an operator uses it:
//! - hostile layers imported inside a throw-away namespace (the jail of the containment suite:
//!   the machine's file system is read-only there), each refused or neutralised, the canaries
//!   beside the store unchanged;
//! - an image written by the test as an OCI layout, imported, then pushed (skopeo) to a real
//!   registry (Debian's `docker-registry`) on loopback and pulled back: the same digest, the
//!   layers stored once, `ls` and `rm`.
//!
//! Needs root and `unshare` for the first, `docker-registry` and `skopeo` for the second; each
//! is reported as skipped with its reason otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ampoule_image::oci::{ImageConfig, RunConfig, write_layout};
use ampoule_testkit::host::{Need, missing, trial};
use ampoule_testkit::jail;
use libtest_mimic::Arguments;

fn ampoule() -> &'static str {
    env!("CARGO_BIN_EXE_ampoule")
}

fn config() -> ImageConfig {
    ImageConfig {
        architecture: ampoule_image::oci::host_arch().into(),
        os: "linux".into(),
        created: Some("2026-12-05T00:00:00Z".into()),
        config: RunConfig {
            env: vec!["PATH=/usr/bin:/bin".into()],
            working_dir: "/".into(),
            user: String::new(),
        },
    }
}

/// A tar layer from raw headers (paths are written as given, `..` included).
#[derive(Default)]
struct Layer(Vec<u8>);

impl Layer {
    fn raw(mut self, path: &str, kind: tar::EntryType, mode: u32, link: &str, data: &[u8]) -> Self {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0
            .extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
        self
    }
    fn file(self, path: &str, data: &str) -> Self {
        self.raw(path, tar::EntryType::Regular, 0o644, "", data.as_bytes())
    }
    fn header(mut self, h: &tar::Header, data: &[u8]) -> Self {
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self
    }
    fn gz(mut self) -> Vec<u8> {
        self.0.extend(std::iter::repeat_n(0u8, 1024));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&self.0).unwrap();
        gz.finish().unwrap()
    }
}

fn hostile_layers(t: &Path) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let victim = t.join("outside/victim");
    let victim = victim.to_str().unwrap();
    let outside = t.join("outside");
    let outside = outside.to_str().unwrap();
    let mut sparse = tar::Header::new_gnu();
    sparse.set_path("sparse").unwrap();
    sparse.set_entry_type(tar::EntryType::GNUSparse);
    sparse.set_mode(0o644);
    sparse.set_size(512);
    {
        let g = sparse.as_gnu_mut().unwrap();
        g.sparse[0].set_offset((10 << 30) - 512);
        g.sparse[0].set_length(512);
        g.set_real_size(10 << 30);
    }
    sparse.set_cksum();
    let mut dev = tar::Header::new_gnu();
    dev.set_path("dev/sda").unwrap();
    dev.set_entry_type(tar::EntryType::Block);
    dev.set_mode(0o666);
    dev.set_size(0);
    dev.set_device_major(8).unwrap();
    dev.set_device_minor(0).unwrap();
    dev.set_cksum();
    // (case, layer, expected: "refused: <text>" or "ok")
    vec![
        (
            "dotdot",
            Layer::default().file("../outside/victim", "pwned").gz(),
            "refused: climbs out",
        ),
        (
            "absolute",
            Layer::default().file(victim, "inside").gz(),
            "ok",
        ),
        (
            "symlink_to_etc",
            Layer::default()
                .raw("etc2", tar::EntryType::Symlink, 0o777, "/etc", b"")
                .file("etc2/ampoule-image-probe", "through the link")
                .gz(),
            "refused: opening the parent",
        ),
        (
            "symlink_out",
            Layer::default()
                .raw("o", tar::EntryType::Symlink, 0o777, outside, b"")
                .file("o/victim", "pwned")
                .gz(),
            "refused: opening the parent",
        ),
        (
            "hardlink_host_file",
            Layer::default()
                .raw("h", tar::EntryType::Link, 0o644, "/etc/passwd", b"")
                .gz(),
            "refused: not a file of the image",
        ),
        (
            "whiteout_dotdot",
            Layer::default().file("a/.wh.../../x", "").gz(),
            "refused: climbs out",
        ),
        (
            "sparse_10g",
            Layer::default().header(&sparse, &[b'x'; 512]).gz(),
            "refused: decompression bomb",
        ),
        (
            "device_node",
            Layer::default().header(&dev, &[]).file("ok", "1").gz(),
            "ok",
        ),
        (
            "setuid",
            Layer::default()
                .raw(
                    "bin/su",
                    tar::EntryType::Regular,
                    0o4755,
                    "",
                    b"#!/bin/sh\n",
                )
                .gz(),
            "ok",
        ),
    ]
}

/// Each hostile image imported by `ampoule image import` in a jail.
fn hostile_layers_in_a_jail() {
    let tmp = tempfile::Builder::new()
        .prefix("ampoule-images-")
        .tempdir_in("/tmp")
        .unwrap();
    let t = tmp.path();
    fs::create_dir(t.join("outside")).unwrap();
    fs::write(t.join("outside/victim"), "original").unwrap();
    fs::write(t.join("x"), "beside the store").unwrap();
    let passwd = fs::read("/etc/passwd").unwrap();
    let cases = hostile_layers(t);
    let mut script = String::from(jail::PRELUDE);
    script.push_str("set +e\n");
    for (name, layer, _) in &cases {
        let dir = t.join(format!("layouts/{name}"));
        write_layout(&dir, std::slice::from_ref(layer), &config(), name).unwrap();
        script.push_str(&format!(
            "\"$1\" image --data-dir \"$T/data\" import \"$T/layouts/{name}\" --name {name} > \"$T/{name}.out\" 2> \"$T/{name}.err\"; echo $? > \"$T/{name}.rc\"\n",
            name = name.replace('_', "-")
        ));
    }
    // Rename layouts to the names the script uses (image names take no underscores).
    for (name, _, _) in &cases {
        fs::rename(
            t.join(format!("layouts/{name}")),
            t.join(format!("layouts/{}", name.replace('_', "-"))),
        )
        .unwrap();
    }
    // Inside the jail as well: the probe is absent from the jail's /etc.
    script
        .push_str("test -e /etc/ampoule-image-probe && echo ESCAPED > \"$T/etc.probe\"\nexit 0\n");
    let out = jail::command(&script)
        .env("JAIL_T", t)
        .arg(ampoule())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "jail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut failures = Vec::new();
    for (name, _, expect) in &cases {
        let n = name.replace('_', "-");
        let rc = fs::read_to_string(t.join(format!("{n}.rc"))).unwrap_or_default();
        let err = fs::read_to_string(t.join(format!("{n}.err"))).unwrap_or_default();
        let ok = match expect.strip_prefix("refused: ") {
            Some(text) => rc.trim() != "0" && err.contains(text),
            None => rc.trim() == "0",
        };
        if !ok {
            failures.push(format!(
                "{name}: expected {expect}, rc {} and {err}",
                rc.trim()
            ));
        }
    }
    let root = |name: &str| {
        let store = t.join("data/images/index.json");
        let index: serde_json::Value = serde_json::from_slice(&fs::read(store).unwrap()).unwrap();
        let digest = index["images"][format!("{name}:latest")]["manifest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_owned();
        t.join("data/images/rootfs").join(digest)
    };
    // Neutralised: inside the image, not outside it.
    let inner = root("absolute").join(t.join("outside/victim").strip_prefix("/").unwrap());
    assert_eq!(fs::read_to_string(inner).unwrap(), "inside");
    assert!(!root("device-node").join("dev/sda").exists());
    assert!(
        fs::read_to_string(t.join("device-node.err"))
            .unwrap()
            .contains("dropped 1 device")
    );
    use std::os::unix::fs::PermissionsExt;
    let su = fs::metadata(root("setuid").join("bin/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o755);
    // The host: unchanged.
    assert_eq!(
        fs::read_to_string(t.join("outside/victim")).unwrap(),
        "original"
    );
    assert_eq!(fs::read_dir(t.join("outside")).unwrap().count(), 1);
    assert_eq!(fs::read_to_string(t.join("x")).unwrap(), "beside the store");
    assert!(!Path::new("/etc/ampoule-image-probe").exists());
    assert!(!t.join("etc.probe").exists());
    assert_eq!(fs::read("/etc/passwd").unwrap(), passwd);
    // Nothing half-unpacked is left behind by the refused ones.
    assert_eq!(fs::read_dir(t.join("data/images/tmp")).unwrap().count(), 0);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("config.yml");
    fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "docker-registry did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry {
        child,
        port,
        _dir: dir,
    }
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(ampoule()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ampoule {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Import a layout, push it to a loopback registry, pull it back into another store.
fn import_push_pull_same_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let base = Layer::default()
        .file("etc/os-release", "ID=test\n")
        .file("usr/bin/hello", "#!/bin/sh\necho hello\n")
        .gz();
    let top = Layer::default().file("app/main.py", "print('hi')\n").gz();
    let layout = t.join("layout");
    let digest = write_layout(&layout, &[base.clone(), top], &config(), "1.0").unwrap();
    let a = t.join("a").to_str().unwrap().to_owned();
    let imported = run(&[
        "image",
        "--data-dir",
        &a,
        "import",
        layout.to_str().unwrap(),
        "--name",
        "test/app:1.0",
    ]);
    assert_eq!(stdout(&imported), digest.to_string());

    let reg = start_registry();
    let dest = format!("docker://127.0.0.1:{}/test/app:1.0", reg.port);
    let pushed = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false", "--preserve-digests"])
        .arg(format!("oci:{}:1.0", layout.display()))
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&pushed.stderr)
    );

    let b = t.join("b").to_str().unwrap().to_owned();
    let reference = format!("127.0.0.1:{}/test/app:1.0", reg.port);
    // Plain HTTP is refused unless asked for.
    let refused = Command::new(ampoule())
        .args(["image", "--data-dir", &b, "pull", &reference])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let pulled = run(&[
        "image",
        "--data-dir",
        &b,
        "pull",
        "--insecure",
        &reference,
        "--name",
        "app:1.0",
    ]);
    assert_eq!(
        stdout(&pulled),
        digest.to_string(),
        "the pulled digest differs from the imported one"
    );
    // Pulled again by digest: nothing new is fetched, the same root.
    let by_digest = format!("127.0.0.1:{}/test/app@{digest}", reg.port);
    let again = run(&[
        "image",
        "--data-dir",
        &b,
        "pull",
        "--insecure",
        &by_digest,
        "--name",
        "app:pinned",
    ]);
    assert_eq!(stdout(&again), digest.to_string());
    let blobs = |d: &str| {
        fs::read_dir(Path::new(d).join("images/blobs/sha256"))
            .unwrap()
            .count()
    };
    assert_eq!(blobs(&b), blobs(&a));
    let ls = run(&["image", "--data-dir", &b, "ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let rootfs = PathBuf::from(list[0]["rootfs"].as_str().unwrap());
    assert_eq!(
        fs::read_to_string(rootfs.join("app/main.py")).unwrap(),
        "print('hi')\n"
    );
    // A digest the registry does not have.
    let bogus = format!("127.0.0.1:{}/test/app@sha256:{}", reg.port, "0".repeat(64));
    let missing = Command::new(ampoule())
        .args(["image", "--data-dir", &b, "pull", "--insecure", &bogus])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    run(&["image", "--data-dir", &b, "rm", "app:1.0", "app:pinned"]);
    assert_eq!(blobs(&b), 0);
}

/// The host's CPython as the base layer of an image: the interpreter, its standard library
/// (without tests), and every shared library they load, at their paths on a merged-`/usr`
/// Debian. Uncompressed (unpacking is then the only cost).
fn python_base_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Complete);
    let sym = |b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, path, target).unwrap();
    };
    for (link, target) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        sym(&mut b, link, target);
    }
    b.append_path_with_name(PYTHON, "usr/bin/python3.11")
        .unwrap();
    sym(&mut b, "usr/bin/python3", "python3.11");
    let stdlib = Path::new("/usr/lib/python3.11");
    let mut libs: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
    let mut stack = vec![stdlib.to_path_buf()];
    let skip = [
        "test",
        "idlelib",
        "tkinter",
        "ensurepip",
        "lib2to3",
        "turtledemo",
        "dist-packages",
        "config-3.11-x86_64-linux-gnu",
    ];
    let mut files = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                if !(dir == stdlib && skip.contains(&e.file_name().to_str().unwrap_or(""))) {
                    stack.push(p);
                }
            } else if ft.is_file() {
                if p.extension().is_some_and(|x| x == "so") {
                    libs.insert(p.clone());
                }
                files.push(p);
            }
        }
    }
    files.sort();
    for p in &files {
        b.append_path_with_name(p, p.strip_prefix("/").unwrap())
            .unwrap();
    }
    // The shared libraries of the interpreter and of its extension modules.
    append_libs(&mut b, std::iter::once(PathBuf::from(PYTHON)).chain(libs));
    let mut tar = b.into_inner().unwrap();
    tar.extend(std::iter::repeat_n(0u8, 1024));
    tar
}

/// Appends the shared libraries `objs` need (ldd's answer), stored under the names the loader
/// asks for (/lib/... and /lib64/... are /usr/lib... on this layout).
fn append_libs(b: &mut tar::Builder<Vec<u8>>, objs: impl IntoIterator<Item = PathBuf>) {
    let mut needed = std::collections::BTreeSet::new();
    for obj in objs {
        let out = Command::new("ldd").arg(&obj).output().unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = line
                .split("=>")
                .nth(1)
                .unwrap_or(line)
                .split_whitespace()
                .next()
                .unwrap_or("");
            if path.starts_with('/') {
                needed.insert(path.to_owned());
            }
        }
    }
    for lib in needed {
        let inside = match lib.strip_prefix("/usr/") {
            Some(rest) => format!("usr/{rest}"),
            None => format!("usr{lib}"),
        };
        b.append_path_with_name(&lib, inside).unwrap();
    }
}

/// bash, Node.js and the two programs the JavaScript launcher uses, with their libraries, as
/// a zstd-compressed layer: with it, the image has shell and JavaScript kernels of its own.
fn tools_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Complete);
    for tool in TOOLS {
        b.append_path_with_name(tool, tool.trim_start_matches('/'))
            .unwrap();
    }
    append_libs(&mut b, TOOLS.iter().map(PathBuf::from));
    let tar = b.into_inner().unwrap();
    zstd::encode_all(&tar[..], 1).unwrap()
}

const TOOLS: [&str; 4] = [BASH, NODE, "/usr/bin/mktemp", "/usr/bin/mkfifo"];
const BASH: &str = "/usr/bin/bash";
const NODE: &str = "/usr/bin/node";
const PYTHON: &str = "/usr/bin/python3.11";
const KEY: &str = "image-test-key-0123456789";
const ACA: &str = "api-version=2024-02-02-preview";

/// A package the host's environment lacks, as the top layer of an image.
fn probe_layer(value: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let code = format!("VALUE = {value:?}\n");
    let mut h = tar::Header::new_gnu();
    h.set_size(code.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    b.append_data(
        &mut h,
        "usr/local/lib/python3.11/dist-packages/ampoule_image_probe/__init__.py",
        code.as_bytes(),
    )
    .unwrap();
    b.into_inner().unwrap()
}

fn python_config() -> ImageConfig {
    ImageConfig {
        architecture: ampoule_image::oci::host_arch().into(),
        os: "linux".into(),
        created: None,
        config: RunConfig {
            env: vec![
                "PATH=/usr/local/bin:/usr/bin:/bin".into(),
                "IMAGE_GREETING=from the image".into(),
                "HOME=/root".into(),
            ],
            working_dir: "/srv".into(),
            user: "root".into(),
        },
    }
}

/// Two images sharing the Python base layer, imported; pools from each and from the host
/// behind one `ampoule serve`: the image's own package through ACA and /v1, the image's Env,
/// never root, the base layer stored once.
fn python_image_pools_serve() {
    let tmp = tempfile::Builder::new()
        .prefix("ampoule-img-serve-")
        .tempdir_in("/tmp")
        .unwrap();
    let t = tmp.path();
    let base = python_base_layer();
    let a = t.join("a");
    let b = t.join("b");
    let tools = tools_layer();
    write_layout(
        &a,
        &[base.clone(), probe_layer("image a"), tools],
        &python_config(),
        "1.0",
    )
    .unwrap();
    write_layout(
        &b,
        &[base.clone(), probe_layer("image b")],
        &python_config(),
        "1.0",
    )
    .unwrap();
    // Images whose paths lead out: symlinks where the sandbox mounts and writes. Their
    // targets are canaries on the host, which must stay empty and unchanged.
    let canary = t.join("canary");
    fs::create_dir(&canary).unwrap();
    for d in ["mnt", "tmp", "run", "proc", "dev", "vartmp", "etc"] {
        fs::create_dir(canary.join(d)).unwrap();
    }
    fs::write(canary.join("file"), "canary").unwrap();
    let c = |p: &str| canary.join(p).to_str().unwrap().to_owned();
    let symlinks = |links: &[(&str, String)]| {
        let mut b = tar::Builder::new(Vec::new());
        for (path, target) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(&mut h, path, target).unwrap();
        }
        b.into_inner().unwrap()
    };
    let hostile_a = symlinks(&[
        ("mnt", c("mnt")),
        ("tmp", c("tmp")),
        ("run", c("run")),
        ("proc", c("proc")),
        ("dev", c("dev")),
        ("var/tmp", c("vartmp")),
        ("etc/hostname", c("file")),
        ("etc/passwd", c("file")),
        ("etc/resolv.conf", c("file")),
        ("etc/hosts", format!("../../../../../../../..{}", c("file"))),
    ]);
    let hostile_b = symlinks(&[("etc", c("etc"))]);
    let ha = t.join("ha");
    let hb = t.join("hb");
    write_layout(&ha, &[base.clone(), hostile_a], &python_config(), "1").unwrap();
    write_layout(&hb, &[base.clone(), hostile_b], &python_config(), "1").unwrap();
    let data = t.join("data");
    let d = data.to_str().unwrap();
    for (dir, name) in [(&ha, "hostile-a"), (&hb, "hostile-b")] {
        run(&[
            "image",
            "--data-dir",
            d,
            "import",
            dir.to_str().unwrap(),
            "--name",
            name,
        ]);
    }
    run(&[
        "image",
        "--data-dir",
        d,
        "import",
        a.to_str().unwrap(),
        "--name",
        "my-python:1.0",
    ]);
    run(&[
        "image",
        "--data-dir",
        d,
        "import",
        b.to_str().unwrap(),
        "--name",
        "other-python:1.0",
    ]);
    // Eleven blobs: four manifests, four top layers, the tools layer, and the config and the
    // base layer they share, once each.
    let blobs = data.join("images/blobs/sha256");
    assert_eq!(fs::read_dir(&blobs).unwrap().count(), 11);
    let base_digest = ampoule_image::Digest::of(&base);
    assert!(blobs.join(base_digest.hex()).is_file());

    let config = t.join("ampoule.toml");
    fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{d}\"\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
             [pools.python]\nwarm = 0\nzygote = false\n\
             [pools.img]\nimage = \"my-python:1.0\"\nwarm = 0\n\
             [pools.img-js]\nimage = \"my-python:1.0\"\nlanguage = \"javascript\"\nwarm = 0\n\
             [pools.img-shell]\nimage = \"my-python:1.0\"\nlanguage = \"shell\"\nwarm = 0\n\
             [pools.img-rw]\nimage = \"my-python:1.0\"\nwritable_root = true\nwarm = 0\n\
             [pools.img-rw.limits]\ndisk_mib = 16\n\
             [pools.other]\nimage = \"other-python:1.0\"\nwarm = 0\n\
             [pools.ha]\nimage = \"hostile-a\"\nwarm = 0\n\
             [pools.hb]\nimage = \"hostile-b\"\nwarm = 0\n",
            ampoule_server::config::sha256_hex(KEY)
        ),
    )
    .unwrap();
    let mut cmd = Command::new(ampoule());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config);
    cmd.env("AMPOULE_LOG", "info")
        .env("AMPOULE_LOG_FORMAT", "json");
    let server = ampoule_testkit::serve::Serve::spawn(cmd, false).unwrap();
    let log = server.log.text();
    assert!(
        log.contains("pool from an image") && log.contains("/usr/bin/python3"),
        "{log}"
    );
    let client = ampoule_testkit::http::Client::new(server.port, KEY);
    let aca = |pool: &str, id: &str, code: &str| {
        let body = serde_json::json!({"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}});
        client
            .ok(
                "POST",
                &format!("/pools/{pool}/code/execute?identifier={id}&{ACA}"),
                Some(body),
            )
            .unwrap()["properties"]
            .clone()
    };
    // ACA: the image's package, its interpreter, its Env; not root; / read-only.
    let p = aca(
        "img",
        "s1",
        "import ampoule_image_probe, sys, os\nprint(sys.executable, os.environ['IMAGE_GREETING'], os.environ['HOME'], os.getuid())\nampoule_image_probe.VALUE",
    );
    assert_eq!(p["status"], "Success", "{p}");
    assert_eq!(p["result"], "image a", "{p}");
    assert_eq!(
        p["stdout"], "/usr/bin/python3 from the image /mnt/data 1000\n",
        "{p}"
    );
    let p = aca(
        "img",
        "s1",
        "import os\ntry:\n    open('/usr/x', 'w')\nexcept OSError as e:\n    print(type(e).__name__)\nos.path.exists('/etc/ampoule-image-probe') or os.path.exists('/root/.pyenv')",
    );
    assert_eq!(p["result"], false, "{p}");
    let p = aca(
        "other",
        "s2",
        "import ampoule_image_probe\nampoule_image_probe.VALUE",
    );
    assert_eq!(p["result"], "image b", "{p}");
    // The hostile images' links were replaced, not followed: the sandbox has its own
    // /mnt/data, /tmp, /proc and generated /etc files; the canaries saw nothing.
    let check = "import os\nopen('/mnt/data/x', 'w').write('1')\nopen('/tmp/y', 'w').write('2')\n\
                 [open('/etc/hostname').read(), os.path.islink('/mnt'), len(os.listdir('/proc')) > 3, \
                 open('/etc/hosts').read().split()[0]]";
    for pool in ["ha", "hb"] {
        let p = aca(pool, &format!("h-{pool}"), check);
        assert_eq!(p["status"], "Success", "{pool}: {p}");
        assert_eq!(
            p["result"],
            serde_json::json!(["sandbox\n", false, true, "127.0.0.1"]),
            "{pool}: {p}"
        );
    }
    for d in ["mnt", "tmp", "run", "proc", "dev", "vartmp", "etc"] {
        assert_eq!(
            fs::read_dir(canary.join(d)).unwrap().count(),
            0,
            "canary/{d} was written"
        );
    }
    assert_eq!(fs::read_to_string(canary.join("file")).unwrap(), "canary");
    // The host's pool does not have the package.
    let p = aca(
        "python",
        "s3",
        "import importlib.util\nimportlib.util.find_spec('ampoule_image_probe') is None",
    );
    assert_eq!(p["result"], true, "{p}");
    // /v1: a session of the image pool, its files, an execution.
    let s = client
        .ok(
            "POST",
            "/v1/sessions",
            Some(serde_json::json!({"pool": "img"})),
        )
        .unwrap();
    let id = s["id"].as_str().unwrap().to_owned();
    let r = client
        .ok("POST", &format!("/v1/sessions/{id}/executions"), Some(serde_json::json!({"code": "import ampoule_image_probe\nopen('out.txt','w').write(ampoule_image_probe.VALUE)\nampoule_image_probe.VALUE"})))
        .unwrap();
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["result"]["text/plain"], "'image a'", "{r}");
    let files = client
        .ok("GET", &format!("/v1/sessions/{id}/files"), None)
        .unwrap();
    assert!(files.to_string().contains("out.txt"), "{files}");
    client
        .ok("DELETE", &format!("/v1/sessions/{id}"), None)
        .unwrap();
    // Shell and JavaScript kernels of the image's own bash and Node (zstd layer), as pools
    // and as contexts in a Python sandbox of the image; the host's pool has no such layer.
    let run_v1 = |pool: &str, code: &str| {
        let s = client
            .ok(
                "POST",
                "/v1/sessions",
                Some(serde_json::json!({"pool": pool})),
            )
            .unwrap();
        let id = s["id"].as_str().unwrap().to_owned();
        let r = client
            .ok(
                "POST",
                &format!("/v1/sessions/{id}/executions"),
                Some(serde_json::json!({"code": code})),
            )
            .unwrap();
        client
            .ok("DELETE", &format!("/v1/sessions/{id}"), None)
            .unwrap();
        r
    };
    let r = run_v1(
        "img-shell",
        "echo \"$BASH $IMAGE_GREETING $EUID\"; test -e /root/.pyenv || echo no-host",
    );
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(
        r["stdout"], "/usr/bin/bash from the image 1000\nno-host\n",
        "{r}"
    );
    let r = run_v1(
        "img-js",
        "process.execPath + ' ' + process.env.IMAGE_GREETING",
    );
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(
        r["result"]["text/plain"], "'/usr/bin/node from the image'",
        "{r}"
    );
    let sb = client
        .ok(
            "POST",
            "/v1/sandboxes",
            Some(serde_json::json!({"pool": "img"})),
        )
        .unwrap();
    let sid = sb["id"].as_str().unwrap().to_owned();
    let exec = |body: serde_json::Value| {
        client
            .ok(
                "POST",
                &format!("/v1/sandboxes/{sid}/executions"),
                Some(body),
            )
            .unwrap()
    };
    let r = exec(serde_json::json!({"code": "open('/mnt/data/n.txt','w').write('41')\n1"}));
    assert_eq!(r["status"], "succeeded", "{r}");
    let r = exec(serde_json::json!({"language": "javascript",
        "code": "Number(require('fs').readFileSync('/mnt/data/n.txt', 'utf8')) + 1"}));
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["result"]["text/plain"], "42", "{r}");
    let r = exec(
        serde_json::json!({"language": "shell", "code": "echo \"$(< /mnt/data/n.txt) $BASH\""}),
    );
    assert_eq!(r["stdout"], "41 /usr/bin/bash\n", "{r}");
    client
        .ok("DELETE", &format!("/v1/sandboxes/{sid}"), None)
        .unwrap();
    let log = server.log.text();
    assert!(
        log.contains("javascript (/usr/bin/node)") && log.contains("shell (/usr/bin/bash)"),
        "the image's languages were not reported:\n{log}"
    );

    // A writable root: the sandbox user changes the image's files and adds its own, in its
    // own layer (counted against its 16 MiB disk limit); another session and the image on
    // the host see none of it; /proc and /dev stay closed.
    let site = "/usr/local/lib/python3.11/dist-packages";
    let p = aca(
        "img-rw",
        "rw1",
        &format!(
            "import os, importlib, ampoule_image_probe\n\
             open('{site}/ampoule_image_probe/__init__.py', 'w').write('VALUE = \"changed\"')\n\
             open('{site}/rw_added.py', 'w').write('VALUE = 7')\n\
             os.makedirs('/usr/local/tool', exist_ok=True)\n\
             open('/etc/ampoule-rw', 'w').write('x')\n\
             importlib.reload(ampoule_image_probe)\n\
             import rw_added\n\
             blocked = []\n\
             for path in ['/proc/sys/kernel/hostname', '/dev/ampoule-x', '/run/ampoule/x']:\n\
             \x20   try:\n\
             \x20       open(path, 'w').write('x')\n\
             \x20   except OSError:\n\
             \x20       blocked.append(path)\n\
             [ampoule_image_probe.VALUE, rw_added.VALUE, os.stat('{site}').st_uid, os.getuid(), len(blocked)]"
        ),
    );
    assert_eq!(p["status"], "Success", "{p}");
    assert_eq!(
        p["result"],
        serde_json::json!(["changed", 7, 1000, 1000, 3]),
        "{p}"
    );
    let p = aca(
        "img-rw",
        "rw1",
        "try:\n    open('/usr/local/big', 'wb').write(b'x' * (32 << 20))\n    r = 'written'\nexcept OSError as e:\n    r = e.errno\nimport os\nos.path.exists('/usr/local/big') and os.remove('/usr/local/big')\nr",
    );
    assert_eq!(p["result"], 28, "no ENOSPC past the disk limit: {p}");
    let p = aca(
        "img-rw",
        "rw2",
        "import os, ampoule_image_probe, importlib.util\n\
         [ampoule_image_probe.VALUE, importlib.util.find_spec('rw_added') is None, os.path.exists('/etc/ampoule-rw'), os.path.exists('/usr/local/tool')]",
    );
    assert_eq!(
        p["result"],
        serde_json::json!(["image a", true, false, false]),
        "another session saw the first one's root: {p}"
    );
    // The default image pool's root stays read-only.
    let p = aca(
        "img",
        "s1",
        &format!(
            "import os\ntry:\n    open('{site}/x.py', 'w')\n    r = 0\nexcept OSError as e:\n    r = e.errno\nr"
        ),
    );
    assert_eq!(p["result"], 30, "EROFS expected: {p}");

    // The image's root was not written by its sandboxes.
    let root = data.join("images/rootfs");
    for e in fs::read_dir(&root).unwrap().flatten() {
        assert!(
            !e.path().join("mnt/data").exists(),
            "a sandbox wrote into the shared root"
        );
        assert!(!e.path().join("etc/ampoule-rw").exists());
        assert!(
            !e.path()
                .join("usr/local/lib/python3.11/dist-packages/rw_added.py")
                .exists()
        );
        let probe = e
            .path()
            .join("usr/local/lib/python3.11/dist-packages/ampoule_image_probe/__init__.py");
        if let Ok(text) = fs::read_to_string(&probe) {
            assert!(!text.contains("changed"), "the image's file was written");
        }
    }
    // Each image pool forked its sessions from a zygote of the image's own interpreter.
    let log = server.log.text();
    for pool in ["img", "other"] {
        assert!(
            log.lines()
                .any(|l| l.contains("zygote ready") && l.contains(&format!("\"pool\":\"{pool}\""))),
            "no zygote for {pool}:\n{log}"
        );
    }
    assert!(!log.contains("fork failed"), "{log}");
    let st = server.stop().unwrap();
    assert!(st.success(), "{st:?}");
}

fn main() {
    let args = Arguments::from_args();
    let jail_skip = missing(&[
        Need::Root("the jail: mount and pid namespaces"),
        Need::OnPath("unshare", "util-linux"),
    ]);
    let registry_skip = missing(&[
        Need::OnPath("docker-registry", "docker-registry"),
        Need::OnPath("skopeo", "skopeo"),
    ]);
    let serve_skip = missing(&[
        Need::Root("sandboxes from an image: an overlay mounted by real root"),
        Need::Tool(PYTHON, "python3.11"),
        Need::Tool(NODE, "nodejs"),
        Need::Tool(BASH, "bash"),
        Need::OnPath("ldd", "libc-bin"),
    ]);
    libtest_mimic::run(
        &args,
        vec![
            trial(
                "hostile_layers_in_a_jail",
                hostile_layers_in_a_jail,
                jail_skip.as_deref(),
            ),
            trial(
                "python_image_pools_serve",
                python_image_pools_serve,
                serve_skip.as_deref(),
            ),
            trial(
                "import_push_pull_same_digest",
                import_push_pull_same_digest,
                registry_skip.as_deref(),
            ),
        ],
    )
    .exit();
}
