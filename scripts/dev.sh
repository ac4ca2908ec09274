#!/usr/bin/env bash
# The local stack in one command: a private PostgreSQL (unless DATABASE_URL is set), the
# control plane with an admin API key, and one `local` droplet: an agent container on this
# Docker engine that enrolls with a one-time token and connects over mutual TLS. State lives
# in .flotilla-dev/ (or FLOTILLA_DEV_DIR), so a second run reuses the database, the CA, the
# key and the droplet. Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/postgres.sh

DEV=$(realpath -m "${FLOTILLA_DEV_DIR:-.flotilla-dev}")
AGENT_LISTEN=${FLOTILLA_AGENT_LISTEN:-127.0.0.1:7443}
ENROLL_LISTEN=${FLOTILLA_ENROLL_LISTEN:-127.0.0.1:7444}
API_LISTEN=${FLOTILLA_API_LISTEN:-127.0.0.1:7080}
mkdir -p "$DEV/control-plane"

echo "dev: building" >&2
cargo build --locked -q -p flotilla-control-plane -p flotilla-cli --bin flotilla-control-plane --bin flotilla
# The agent image the local droplet runs and the test MCP server the printed examples
# deploy (built here: nothing is pulled).
scripts/images.sh
BIN=target/debug

PIDS=()
DROPLET=
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$DROPLET" ]; then
    # The droplet's agent, then what it runs: stopped, kept for the next run.
    docker stop "flotilla-droplet-$DROPLET" >/dev/null 2>&1 || true
    docker ps -q --filter "label=dev.flotilla.droplet=$DROPLET" | xargs -r docker stop >/dev/null 2>&1 || true
  fi
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
# An admin API key, made on the first run and kept (0600) for the next ones.
if [ ! -s "$DEV/admin.key" ]; then
  (umask 077 && "$BIN/flotilla-control-plane" api-key create --account default --scope admin --name dev > "$DEV/admin.key.new")
  mv "$DEV/admin.key.new" "$DEV/admin.key"
fi
chmod 600 "$DEV/admin.key"
KEY=$(cat "$DEV/admin.key")
RUST_LOG=${RUST_LOG:-info} "$BIN/flotilla-control-plane" serve \
  --agent-listen "$AGENT_LISTEN" --enroll-listen "$ENROLL_LISTEN" --api-listen "$API_LISTEN" \
  --heartbeat-interval 5s --flush-interval 5s --reconnect-grace 30s --local-provider &
PIDS+=($!)

for _ in $(seq 1 100); do
  [ -f "$DEV/control-plane/server.crt" ] && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { echo "dev: the control plane exited" >&2; exit 1; }
  sleep 0.1
done

API_PORT=${API_LISTEN##*:}
CA="$DEV/control-plane/ca.crt"
export FLOTILLA_URL=https://localhost:$API_PORT FLOTILLA_API_KEY=$KEY FLOTILLA_CA_CERT=$CA
for _ in $(seq 1 100); do
  "$BIN/flotilla" droplets ls >/dev/null 2>&1 && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { echo "dev: the control plane exited" >&2; exit 1; }
  sleep 0.2
done

# The droplet: an agent container made by the `local` provider on the first run (it
# enrolls with a one-time token, then keeps its certificate in its state volume), started
# again on the next ones.
[ -f "$DEV/droplet-id" ] && DROPLET=$(cat "$DEV/droplet-id")
if [ -n "$DROPLET" ] && docker container inspect "flotilla-droplet-$DROPLET" >/dev/null 2>&1; then
  docker start "flotilla-droplet-$DROPLET" >/dev/null
else
  DROPLET=$("$BIN/flotilla" droplets create --provider local --name dev --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["droplet"]["id"])')
  echo "$DROPLET" > "$DEV/droplet-id"
fi
echo "dev: waiting for droplet $DROPLET to come online" >&2
for _ in $(seq 1 120); do
  "$BIN/flotilla" droplets get "$DROPLET" --json 2>/dev/null | grep -q DROPLET_STATUS_ONLINE && break
  sleep 0.5
done
SPEC='{"image": "flotilla-test/mcp-server:latest", "pullPolicy": "PULL_POLICY_NEVER", "env": [{"name": "PORT", "value": "8080"}], "mcp": {"port": 8080, "path": "/mcp"}, "healthCheck": {"mcp": {}, "interval": "2s"}}'
cat >&2 <<TXT

dev: the stack is up. Droplet $DROPLET ($("$BIN/flotilla" droplets get "$DROPLET" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')) is an agent container
connected over mTLS.
The API (gRPC and HTTP/JSON on one port) serves TLS from the fleet CA; the admin key is
kept in $DEV/admin.key. In another shell:

  export FLOTILLA_URL=https://localhost:$API_PORT
  export FLOTILLA_API_KEY=$KEY
  export FLOTILLA_CA_CERT=$CA

HTTP/JSON (curl):
  curl -sS --cacert "\$FLOTILLA_CA_CERT" -H "authorization: Bearer \$FLOTILLA_API_KEY" \$FLOTILLA_URL/v1/droplets
  curl -sS --cacert "\$FLOTILLA_CA_CERT" -H "authorization: Bearer \$FLOTILLA_API_KEY" -H 'content-type: application/json' \\
    -d '{"name": "echo", "spec": $SPEC, "options": {"idempotencyKey": "dev-echo"}}' \$FLOTILLA_URL/v1/droplets/$DROPLET/deployments
  curl -sS --cacert "\$FLOTILLA_CA_CERT" -H "authorization: Bearer \$FLOTILLA_API_KEY" -H 'content-type: application/json' -d '{"timeout": "120s"}' \$FLOTILLA_URL/v1/commands/<lastCommandId>:wait
  curl -sS --cacert "\$FLOTILLA_CA_CERT" -H "authorization: Bearer \$FLOTILLA_API_KEY" \$FLOTILLA_URL/v1/deployments/<id>
  curl -sS --cacert "\$FLOTILLA_CA_CERT" -H "authorization: Bearer \$FLOTILLA_API_KEY" \$FLOTILLA_URL/v1/deployments/<id>/tools

gRPC (grpcurl):
  grpcurl -cacert "\$FLOTILLA_CA_CERT" localhost:$API_PORT list
  grpcurl -cacert "\$FLOTILLA_CA_CERT" -H "authorization: Bearer \$FLOTILLA_API_KEY" -d '{}' localhost:$API_PORT flotilla.v1.Fleet/ListDroplets
  grpcurl -cacert "\$FLOTILLA_CA_CERT" -H "authorization: Bearer \$FLOTILLA_API_KEY" -d '{"deployment_id": "<id>"}' localhost:$API_PORT flotilla.v1.Fleet/ListTools
  grpcurl -cacert "\$FLOTILLA_CA_CERT" -H "authorization: Bearer \$FLOTILLA_API_KEY" -d '{"follow": true}' localhost:$API_PORT flotilla.v1.Fleet/WatchEvents
The CLI (FLOTILLA_URL, FLOTILLA_API_KEY and FLOTILLA_CA_CERT as above):
  $BIN/flotilla droplets ls
  $BIN/flotilla deploy --droplet $DROPLET --name echo --image flotilla-test/mcp-server:latest --pull never -e PORT=8080 --mcp-port 8080 --mcp-path /mcp
  $BIN/flotilla ps
  $BIN/flotilla tools <id>
  $BIN/flotilla events -f
Ctrl-C stops everything.

TXT
wait -n "${PIDS[@]}"
echo "dev: the control plane exited; stopping the rest" >&2
