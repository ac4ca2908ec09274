#!/usr/bin/env bash
# The local stack in one command: a private PostgreSQL (unless DATABASE_URL is set), the
# control plane, and one agent connected over mutual TLS. State lives in .flotilla-dev/
# (or FLOTILLA_DEV_DIR), so a second run reuses the database, the CA and the droplet.
# Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/postgres.sh

DEV=$(realpath -m "${FLOTILLA_DEV_DIR:-.flotilla-dev}")
AGENT_LISTEN=${FLOTILLA_AGENT_LISTEN:-127.0.0.1:7443}
ENROLL_LISTEN=${FLOTILLA_ENROLL_LISTEN:-127.0.0.1:7444}
API_LISTEN=${FLOTILLA_API_LISTEN:-127.0.0.1:7080}
mkdir -p "$DEV/control-plane" "$DEV/agent"

echo "dev: building" >&2
cargo build --locked -q -p flotilla-control-plane -p flotilla-agent
# The test MCP server image the printed examples deploy (built here: nothing is pulled).
scripts/images.sh
BIN=target/debug

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  stop_postgres
  echo "dev: stopped" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${DATABASE_URL:-}" ]; then
  [ -f "$DEV/postgres/port" ] && PG_PORT=$(cat "$DEV/postgres/port")
  if [ -n "${PG_PORT:-}" ] && ! python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$PG_PORT" 2>/dev/null; then
    unset PG_PORT # taken since the last run: pick another
  fi
  start_postgres "$DEV/postgres"
  echo "$PG_PORT" > "$DEV/postgres/port"
fi

export FLOTILLA_DATA_DIR="$DEV/control-plane"
RUST_LOG=${RUST_LOG:-info} "$BIN/flotilla-control-plane" serve \
  --agent-listen "$AGENT_LISTEN" --enroll-listen "$ENROLL_LISTEN" --api-listen "$API_LISTEN" \
  --heartbeat-interval 5s --flush-interval 5s --reconnect-grace 30s &
PIDS+=($!)

for _ in $(seq 1 100); do
  [ -f "$DEV/control-plane/server.crt" ] && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { echo "dev: the control plane exited" >&2; exit 1; }
  sleep 0.1
done

# The droplet enrolls with a one-time token on its first run and keeps its certificate
# (renewing it over the session) after that.
[ -f "$DEV/agent/droplet-id" ] || python3 -c 'import uuid; print(uuid.uuid4())' > "$DEV/agent/droplet-id"
DROPLET=$(cat "$DEV/agent/droplet-id")
TOKEN_ARGS=()
if [ ! -f "$DEV/agent/identity.pem" ]; then
  TOKEN=$("$BIN/flotilla-control-plane" token create --droplet "$DROPLET" --name dev --ttl 10m 2>/dev/null)
  TOKEN_ARGS=(--token "$TOKEN")
fi

"$BIN/flotilla-agent" --control-plane "https://localhost:${AGENT_LISTEN##*:}" \
  --enroll-url "https://localhost:${ENROLL_LISTEN##*:}" --state-dir "$DEV/agent" "${TOKEN_ARGS[@]}" &
PIDS+=($!)

cat >&2 <<TXT

dev: the stack is up. Droplet $DROPLET is connecting over mTLS.
  grpcurl -plaintext $API_LISTEN list
  grpcurl -plaintext -d '{}' $API_LISTEN flotilla.v1.Fleet/ListDroplets
  grpcurl -plaintext -d '{"id": "$DROPLET"}' $API_LISTEN flotilla.v1.Fleet/GetDroplet
  grpcurl -plaintext -d '{"droplet_id": "$DROPLET", "name": "echo", "spec": {"image": "flotilla-test/mcp-server:latest", "pull_policy": "PULL_POLICY_NEVER", "env": [{"name": "PORT", "value": "8080"}], "mcp": {"port": 8080, "path": "/mcp"}, "health_check": {"mcp": {}, "interval": "2s"}}}' $API_LISTEN flotilla.v1.Fleet/CreateDeployment
  grpcurl -plaintext -d '{"id": "<deployment id>"}' $API_LISTEN flotilla.v1.Fleet/GetDeployment
  grpcurl -plaintext -d '{"deployment_id": "<deployment id>"}' $API_LISTEN flotilla.v1.Fleet/ListTools
Ctrl-C stops everything.

TXT
wait -n "${PIDS[@]}"
echo "dev: a process exited; stopping the rest" >&2
