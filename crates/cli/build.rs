//! Links the `ampoule` binary at a fixed address (`-no-pie`) unless `AMPOULE_PIE=1`.
//!
//! Why: a position-independent `ampoule` carries about 35,000 relative relocations, most of
//! them pointers in read-only-after-relocation data (vtables, string tables, panic
//! locations of every dependency). The dynamic loader writes each one at start, which copies
//! about 140 pages of the file: 0.6 ms of every `ampoule run` on the benchmark machine,
//! where a page fault is dear. Linked at a fixed address those pointers are final in the
//! file and never written. The cost is that `ampoule`'s own code and static data are not
//! randomised (its libraries, heap, stacks and mappings still are); docs/threat-model.md
//! weighs it. Packagers who want the usual PIE build set `AMPOULE_PIE=1`.
fn main() {
    println!("cargo:rerun-if-env-changed=AMPOULE_PIE");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let pie = std::env::var("AMPOULE_PIE").is_ok_and(|v| v == "1");
    if linux && !pie {
        println!("cargo:rustc-link-arg-bin=ampoule=-no-pie");
    }
}
