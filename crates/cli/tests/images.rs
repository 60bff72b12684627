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
    libtest_mimic::run(
        &args,
        vec![
            trial(
                "hostile_layers_in_a_jail",
                hostile_layers_in_a_jail,
                jail_skip.as_deref(),
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
