#!/usr/bin/env bash
# Installs the system packages ampoule and its tests need, when they are missing (Debian/Ubuntu).
# Idempotent; does nothing when everything is present.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
[ -x /usr/bin/python3 ] || need+=(python3)
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
[ -x /usr/bin/node ] || need+=(nodejs)
# `npm ci` of the E2B JavaScript SDK for crates/server/tests/e2b.rs (scripts/test.sh)
have npm || need+=(npm)
# the console's browser test (crates/server/tests/console.rs): Debian's Chromium, driven by
# playwright-core from npm
[ -x /usr/bin/chromium ] || need+=(chromium)
have unshare || need+=(util-linux)
have ip || need+=(iproute2)
# the egress firewall of sandboxes with allowed hosts (`nft -f`, root only)
[ -x /usr/sbin/nft ] || [ -x /sbin/nft ] || need+=(nftables)
# the start-up baselines of `ampoule bench` and benches/startup.rs
[ -x /usr/bin/bwrap ] || need+=(bubblewrap)
have gcc || need+=(gcc)
have pkg-config || need+=(pkg-config)
have openssl || need+=(openssl)
[ -x /usr/bin/csharp ] || need+=(mono-complete)
# `ampoule image pull` against a real registry on loopback (crates/cli/tests/images.rs):
# Debian's registry, and skopeo to push the test's image into it
[ -x /usr/bin/docker-registry ] || need+=(docker-registry)
have skopeo || need+=(skopeo)
# the gVisor isolation tier (`isolation = "gvisor"`) and its containment trials
have runsc || [ -x /usr/sbin/runsc ] || need+=(runsc)
# the audit store's PostgreSQL tests (scripts/postgres.sh starts a throw-away cluster)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ampoule needs these packages: ${need[*]}" >&2
  echo "hint: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
