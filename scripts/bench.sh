#!/usr/bin/env bash
# Runs the benchmarks (all, or the ones named) against a throwaway PostgreSQL, in release
# mode, and prints their figures. Not part of CI: figures, not pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/postgres.sh
if [ -z "${DATABASE_URL:-}" ]; then
  PG_TMP=$(mktemp -d /tmp/flotilla-bench-pg.XXXXXX)
  trap 'stop_postgres; rm -rf "$PG_TMP"' EXIT
  start_postgres "$PG_TMP"
fi
if [ $# -eq 0 ]; then
  cargo bench --locked --benches
else
  for bench in "$@"; do cargo bench --locked --bench "$bench"; done
fi
