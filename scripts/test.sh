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
# The binary the end-to-end tests start (crates/testkit/src/paths.rs): linked as quickstart.sh
# links it, statically where the toolchain can (scripts/build.sh).
AMPOULE_BIN="$PWD/$(bash scripts/build.sh)"
export AMPOULE_BIN
if [ -f crates/cli/src/setup.rs ]; then
  echo "== ampoule setup (python environment for sessions)" >&2
  "$AMPOULE_BIN" setup
fi
echo "== doctor" >&2
"$AMPOULE_BIN" doctor || true
# A Python venv at $1 with the pinned requirements $2 (with Debian's interpreter: `python3` on
# PATH may be a slow shim). Created once; recreated when the requirements change.
venv() {
  if ! cmp -s "$2" "$1/requirements.txt"; then
    rm -rf "$1"
    /usr/bin/python3 -m venv "$1"
    "$1/bin/pip" install -q --disable-pip-version-check -r "$2"
    cp "$2" "$1/requirements.txt"
  fi
}
echo "== client libraries (venv for the server's end-to-end test)" >&2
# The real ACA clients, driven against `ampoule serve` by crates/server/tests/e2e.rs. The test
# fails when the venv named here is missing.
venv target/client-venv crates/server/tests/clients/requirements.txt
export AMPOULE_CLIENT_VENV="$PWD/target/client-venv"
echo "== schemathesis (venv for the server's /v1 contract test)" >&2
# crates/server/tests/contract.rs fuzzes a real `ampoule serve` with it.
venv target/schemathesis-venv crates/server/tests/contract/requirements.txt
export AMPOULE_SCHEMATHESIS_VENV="$PWD/target/schemathesis-venv"
# npm packages at $1 from the package.json and package-lock.json in $2 (`npm ci`: exactly the
# locked versions). Installed once; reinstalled when the lock file changes.
node_packages() {
  if ! cmp -s "$2/package-lock.json" "$1/installed-package-lock.json"; then
    rm -rf "$1"
    mkdir -p "$1"
    cp "$2/package.json" "$2/package-lock.json" "$1/"
    (cd "$1" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$2/package-lock.json" "$1/installed-package-lock.json"
  fi
}
echo "== E2B SDKs (Python venv and npm packages for the server's E2B test)" >&2
# crates/server/tests/e2b.rs runs the real E2B SDKs, pinned, against `ampoule serve`.
venv target/e2b-venv crates/server/tests/e2b/requirements.txt
export AMPOULE_E2B_VENV="$PWD/target/e2b-venv"
node_packages target/e2b-node crates/server/tests/e2b
export AMPOULE_E2B_NODE="$PWD/target/e2b-node"
echo "== playwright-core (npm package for the console's browser test)" >&2
# crates/server/tests/console.rs drives Debian's chromium with it; screenshots of every page
# land in target/console-screenshots/.
node_packages target/console-node crates/server/tests/console
export AMPOULE_CONSOLE_NODE="$PWD/target/console-node"
echo "== postgres (the audit store's tests run on it and on SQLite)" >&2
AMPOULE_TEST_POSTGRES_URL=$(bash scripts/postgres.sh)
export AMPOULE_TEST_POSTGRES_URL
echo "== deploy (Kubernetes manifests and Helm chart against the Kubernetes schemas)" >&2
# kubernetes-validate in target/deploy-venv; the chart rendered and compared with deploy/kubernetes.
bash scripts/deploy-check.sh
echo "== tests" >&2
# nextest runs each test as a process, with the groups of .config/nextest.toml: the containment
# suite, the privileged end-to-end tests and the measurements each one test at a time; a test
# that cannot run here is reported as skipped with its reason.
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast || status=$?
else
  cargo test --workspace --locked --no-fail-fast || status=$?
fi
# The console's browser test photographs every page (kept by CI as artifacts), pass or fail.
if compgen -G "target/console-screenshots/*.png" >/dev/null; then
  echo "== console screenshots" >&2
  ls -1 "$PWD"/target/console-screenshots/*.png >&2
fi
exit "$status"
