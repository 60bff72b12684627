//! Link-time layout of the `ampoule` binary.
//!
//! **At a fixed address** (`-no-pie`) unless `AMPOULE_PIE=1`. Why: a position-independent
//! `ampoule` carries about 35,000 relative relocations, most of them pointers in
//! read-only-after-relocation data (vtables, string tables, panic locations of every
//! dependency). The dynamic loader writes each one at start, which copies about 140 pages of
//! the file: 0.6 ms of every `ampoule run` on the benchmark machine, where a page fault is
//! dear. Linked at a fixed address those pointers are final in the file and never written.
//! The cost is that `ampoule`'s own code and static data are not randomised (its libraries,
//! heap, stacks and mappings still are); docs/threat-model.md weighs it. Packagers who want
//! the usual PIE build set `AMPOULE_PIE=1`.
//!
//! **Hot code first** (`hot-code.txt`, unless `AMPOULE_HOT_CODE=0`). The binary holds 24 MB
//! of code, of which `ampoule run` and the sandbox's init run about 1 MB, spread over the
//! whole of it: each process faults in every 64 KiB window of it that it touches (the kernel
//! maps the window's pages together), about 140 windows per `ampoule run`. The list names
//! the functions that path runs (scripts/hot-code.py measures and writes it); the linker
//! puts them first, so the path touches about 30 windows. On the benchmark VM that is
//! 0.2–0.3 ms of CPU per `ampoule run` with the binary's page cache as an install leaves it
//! and 0.6–1 ms with the cache refilled by the binary's own faults (docs/BENCHMARKS.md,
//! issue 19 round twelve).
//! Only lld reads the list (`--symbol-ordering-file`): rustc links with its own lld on
//! x86_64 Linux since 1.90, so it is passed only there and when the build does not choose
//! another linker. Names the binary does not have (another rustc, another Cargo.lock: the
//! list's Rust names carry their crates' hashes) are ignored, so a stale list costs speed,
//! never the build.
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=AMPOULE_PIE");
    println!("cargo:rerun-if-env-changed=AMPOULE_HOT_CODE");
    println!("cargo:rerun-if-changed=hot-code.txt");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let linux = env("CARGO_CFG_TARGET_OS") == "linux";
    if linux && env("AMPOULE_PIE") != "1" {
        println!("cargo:rustc-link-arg-bin=ampoule=-no-pie");
    }
    let list = Path::new(&env("CARGO_MANIFEST_DIR")).join("hot-code.txt");
    let rustc = rustc_version();
    if env("AMPOULE_HOT_CODE") != "0" && links_with_rust_lld(&env("TARGET"), &rustc) {
        let Ok(names) = std::fs::read_to_string(&list) else {
            return;
        };
        // The list's header names the rustc it was measured with ("… with rustc 1.95.0
        // (59807616e 2026-04-14); …"): another one hashes the Rust names differently, and only
        // the C library's names still match. Said, not fatal.
        let first = rustc.lines().next().unwrap_or_default();
        if !first.is_empty() && !names.lines().take(5).any(|l| l.contains(first)) {
            println!(
                "cargo:warning=crates/cli/hot-code.txt was measured with another rustc than \
                 {first}: most of its names will not match this build, and `ampoule run` \
                 starts ~0.3-1 ms slower than it could; scripts/hot-code.py measures it anew"
            );
        }
        let list = list.display();
        println!("cargo:rustc-link-arg-bin=ampoule=-Wl,--symbol-ordering-file={list}");
        println!("cargo:rustc-link-arg-bin=ampoule=-Wl,--no-warn-symbol-ordering");
    }
}

/// `rustc -vV` of the compiler building us, or nothing.
fn rustc_version() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Command::new(rustc)
        .arg("-vV")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether rustc links this target with its own lld: x86_64 GNU/Linux from rustc 1.90 on,
/// unless the flags pick a linker or turn lld off.
fn links_with_rust_lld(target: &str, rustc_vv: &str) -> bool {
    if target != "x86_64-unknown-linux-gnu" || std::env::var_os("RUSTC_LINKER").is_some() {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags
        .split('\x1f')
        .any(|f| f.contains("linker") || f.contains("link-self-contained") || f.contains("fuse-ld"))
    {
        return false;
    }
    // "release: 1.95.0" (or "1.96.0-nightly"): the minor version decides.
    let minor = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("release: 1."))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
