#!/usr/bin/env bash
# Builds the `ampoule` binary, statically linked where the toolchain can, into
# target/{debug,release}/ampoule, and prints the path of the build itself (which a later plain
# `cargo build`, replacing target/{debug,release}/ampoule with a dynamic one, leaves alone).
#
#     bash scripts/build.sh [--release]
#
# Why static: every `ampoule run` execs the binary, and on a machine where page faults and
# CPUID traps are dear (the benchmark VM: see docs/BENCHMARKS.md, issue 19 round ten) the
# dynamic loader's work for libc, libm and libgcc_s costs ~0.4 ms of each start. A static
# glibc binary has none of it (and no PIE: see crates/cli/build.rs). Name resolution keeps
# working: this glibc's `files` and `dns` lookups are built into libc.a; other NSS modules
# (mdns, myhostname, sss) are not loaded by a static binary.
#
# Cargo cannot link one binary of a workspace statically with a plain `cargo build` (the flag
# would reach the proc-macro crates too, which must be shared libraries), so this builds for
# the host's target triple explicitly, where the flags reach target crates only, and copies
# the result to target/{debug,release}/ampoule, the path everything else uses. Without a
# static libc (libc6-dev), off glibc, or with AMPOULE_DYNAMIC=1, it is the usual dynamic build
# (docs/threat-model.md weighs the two).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
flags=(--locked -p ampoule-cli --bin ampoule)
if [ "${1:-}" = "--release" ]; then
  profile=release
  flags+=(--release)
fi
host=$(rustc -vV | sed -n 's/^host: //p')
libc_a=$(cc -print-file-name=libc.a 2>/dev/null || true)
if [[ "$host" == *-linux-gnu && "$libc_a" == /* && -f "$libc_a" && "${AMPOULE_DYNAMIC:-}" != 1 ]]; then
  var="CARGO_TARGET_$(echo "$host" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
  # At a fixed address (crates/cli/build.rs says why) unless AMPOULE_PIE=1: then static-pie.
  if [ "${AMPOULE_PIE:-}" = 1 ]; then
    export "$var=-C target-feature=+crt-static"
  else
    export "$var=-C target-feature=+crt-static -C relocation-model=static"
  fi
  cargo build "${flags[@]}" --target "$host" >&2
  mkdir -p "target/$profile"
  # A copy, replaced in one step (a later plain `cargo build` puts its own dynamic build there).
  cp -f "target/$host/$profile/ampoule" "target/$profile/ampoule.static"
  mv -f "target/$profile/ampoule.static" "target/$profile/ampoule"
  echo "target/$host/$profile/ampoule"
else
  cargo build "${flags[@]}" >&2
  echo "target/$profile/ampoule"
fi
