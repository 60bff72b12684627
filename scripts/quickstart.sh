#!/usr/bin/env bash
# Sets ampoule up on this machine and runs a first Python snippet in a sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found" >&2
  echo "hint: install Rust with rustup (https://rustup.rs), then re-run this script" >&2
  exit 1
fi
bash scripts/deps.sh
# Statically linked where the toolchain can (scripts/build.sh says why).
bash scripts/build.sh --release >/dev/null
bin=target/release/ampoule
# The Python environment sessions use (numpy, pandas, matplotlib, ...): idempotent.
"$bin" setup
"$bin" doctor
echo
echo '$ echo '"'"'print("hello from a sandbox")'"'"' | ampoule run -'
echo 'import platform, os; print("hello from a sandbox:", platform.node(), "uid", os.getuid())' | "$bin" run -
echo
echo "next: start the service with   $bin serve   (it prints an API key on first start)"
