# Sourced by the other scripts: a throwaway PostgreSQL cluster.
#
#   start_postgres DIR   installs PostgreSQL from Debian's packages if `initdb` is missing,
#                        initialises a cluster in DIR on a free loopback port, starts it and
#                        exports DATABASE_URL. PostgreSQL refuses to run as root, so as root
#                        the cluster belongs to the `postgres` user (created if missing).
#   stop_postgres        stops it (safe to call twice).

find_pg_bin() {
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return
  fi
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

install_postgres() {
  echo "postgres: initdb not found; installing PostgreSQL from Debian's packages" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "postgres: not root: install the 'postgresql' package, or set DATABASE_URL" >&2
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_postgres() {
  PG_DIR=$1
  PG_BIN=$(find_pg_bin) || true
  if [ -z "$PG_BIN" ]; then
    install_postgres || return 1
    PG_BIN=$(find_pg_bin) || { echo "postgres: still no initdb after installing" >&2; return 1; }
  fi
  PG_RUN=()
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    PG_RUN=(runuser -u postgres --)
  fi
  mkdir -p "$PG_DIR"
  [ "$(id -u)" -eq 0 ] && chown postgres "$PG_DIR"
  chmod 700 "$PG_DIR"
  PG_PORT=${PG_PORT:-$(free_port)}
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    "${PG_RUN[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U flotilla --auth=trust -E UTF8 --no-sync >/dev/null
  fi
  "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=500 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all" \
    start >/dev/null || { cat "$PG_DIR/postgres.log" >&2; return 1; }
  export DATABASE_URL="postgres://flotilla@127.0.0.1:$PG_PORT/postgres"
  echo "postgres: throwaway cluster in $PG_DIR on 127.0.0.1:$PG_PORT" >&2
}

stop_postgres() {
  if [ -n "${PG_DIR:-}" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
    "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}
