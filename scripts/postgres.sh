#!/usr/bin/env bash
# Starts (once) a throw-away PostgreSQL cluster under target/postgres for the audit store's
# tests and prints its URL. Listens on 127.0.0.1 only, trust authentication: test data only.
# initdb refuses to run as root, so as root the cluster belongs to the `postgres` user.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$bin" ]; then
  echo "PostgreSQL is not installed (scripts/deps.sh installs it)" >&2
  exit 1
fi
dir=$PWD/target/postgres
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ ! -f "$dir/data/PG_VERSION" ]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  [ "$(id -u)" -ne 0 ] || chown postgres: "$dir"
  as_owner "$bin/initdb" -D "$dir/data" -A trust -U ampoule --no-sync -E UTF8 >"$dir/initdb.log" 2>&1
fi
if ! as_owner "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1; then
  # The first free port from 54329 (another checkout's cluster may hold one).
  port=54329
  while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
  echo "$port" >"$dir/port"
  as_owner "$bin/pg_ctl" start -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c fsync=off -c max_connections=200" >/dev/null
fi
echo "postgres://ampoule@127.0.0.1:$(cat "$dir/port")/postgres"
