#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and API tests, privileged end-to-end tests and
# the containment suite. Installs what it needs first. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
echo "== fmt" >&2
cargo fmt --all -- --check
echo "== clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build" >&2
cargo build --workspace --locked
if [ -f crates/cli/src/setup.rs ]; then
  echo "== ampoule setup (python environment for sessions)" >&2
  target/debug/ampoule setup
fi
echo "== doctor" >&2
target/debug/ampoule doctor || true
echo "== client libraries (venv for the server's end-to-end test)" >&2
# The real ACA clients, driven against `ampoule serve` by crates/server/tests/e2e.rs. Created
# once; recreated when the requirements change. The test fails when the venv named here is
# missing.
venv=target/client-venv
reqs=crates/server/tests/clients/requirements.txt
if ! cmp -s "$reqs" "$venv/requirements.txt"; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$reqs"
  cp "$reqs" "$venv/requirements.txt"
fi
export AMPOULE_CLIENT_VENV="$PWD/$venv"
echo "== schemathesis (venv for the server's /v1 contract test)" >&2
# crates/server/tests/contract.rs fuzzes a real `ampoule serve` with it; recreated when the
# pinned requirements change.
venv=target/schemathesis-venv
reqs=crates/server/tests/contract/requirements.txt
if ! cmp -s "$reqs" "$venv/requirements.txt"; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$reqs"
  cp "$reqs" "$venv/requirements.txt"
fi
export AMPOULE_SCHEMATHESIS_VENV="$PWD/$venv"
echo "== postgres (the audit store's tests run on it and on SQLite)" >&2
AMPOULE_TEST_POSTGRES_URL=$(bash scripts/postgres.sh)
export AMPOULE_TEST_POSTGRES_URL
echo "== tests" >&2
# nextest runs each test as a process, with the groups of .config/nextest.toml: the containment
# suite, the privileged end-to-end tests and the measurements each one test at a time; a test
# that cannot run here is reported as skipped with its reason.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
