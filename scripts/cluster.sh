#!/usr/bin/env bash
# Starts a local Switchboard cluster on loopback from Debian's packages:
# a Redis Cluster of 3 masters and 3 replicas, a PostgreSQL, and N
# switchboard nodes (default 3), each in its own directory under DIR.
# Runs in the foreground; Ctrl-C (or SIGTERM) stops everything it started.
#
#   scripts/cluster.sh [--dir DIR] [--nodes N] [--base-port P] [--appendfsync always|everysec]
#
# Ports (P = 17000 by default): Redis P..P+5 (cluster bus +10000),
# PostgreSQL P+10, node i (1..N) TCP P+100+i, HTTP P+200+i.
# Needs: apt-get install -y redis-server postgresql; a built
# target/release/switchboard (built here if missing).
set -euo pipefail

DIR=./cluster-data
NODES=3
BASE=17000
FSYNC=always
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --nodes) NODES=$2; shift 2 ;;
        --base-port) BASE=$2; shift 2 ;;
        --appendfsync) FSYNC=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/switchboard
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PIDS=()

stop_all() {
    trap - EXIT INT TERM
    echo "stopping..."
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    # PostgreSQL's postmaster is the child of runuser when run as root.
    [ -f "$DIR/pg/data/postmaster.pid" ] && kill -INT "$(head -1 "$DIR/pg/data/postmaster.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap stop_all EXIT INT TERM

need() { command -v "$1" >/dev/null || { echo "$1 not found: $2" >&2; exit 1; }; }
need redis-server "apt-get install -y redis-server"
need redis-cli "apt-get install -y redis-server"
# Debian's full set of PostgreSQL programs first (initdb alone may be on PATH).
PGBIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)")
[ -x "$PGBIN/pg_isready" ] || PGBIN=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
[ -x "$PGBIN/initdb" ] && [ -x "$PGBIN/pg_isready" ] || { echo "initdb or pg_isready not found: apt-get install -y postgresql" >&2; exit 1; }

if [ ! -x "$BIN" ]; then
    echo "building switchboard (release)..."
    (cd "$ROOT" && cargo build --release --bin switchboard)
fi

# --- Redis Cluster: 3 masters + 3 replicas, AOF fsync always.
ADDRS=()
for i in 0 1 2 3 4 5; do
    port=$((BASE + i))
    mkdir -p "$DIR/redis/$port"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
        --cluster-node-timeout 2000 --appendonly yes --appendfsync "$FSYNC" \
        --save "" --dir "$DIR/redis/$port" --logfile redis.log &
    PIDS+=($!)
    ADDRS+=("127.0.0.1:$port")
done
for a in "${ADDRS[@]}"; do
    until redis-cli -p "${a#*:}" ping >/dev/null 2>&1; do sleep 0.1; done
done
if ! redis-cli -p "$BASE" cluster info | grep -q cluster_state:ok; then
    redis-cli --cluster create "${ADDRS[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
fi
until redis-cli -p "$BASE" cluster info | grep -q cluster_state:ok; do sleep 0.2; done
REDIS_URL=$(printf 'redis://%s,' "${ADDRS[@]}"); REDIS_URL=${REDIS_URL%,}
echo "redis cluster: $REDIS_URL"

# --- PostgreSQL (as the postgres user when run as root).
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
PGPORT=$((BASE + 10))
mkdir -p "$DIR/pg"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$DIR/pg"
if [ ! -f "$DIR/pg/data/PG_VERSION" ]; then
    as_pg "$PGBIN/initdb" -D "$DIR/pg/data" -U sb --auth=trust -E UTF8 >/dev/null
fi
as_pg "$PGBIN/postgres" -D "$DIR/pg/data" -p "$PGPORT" -k "$DIR/pg" \
    -c listen_addresses=127.0.0.1 >"$DIR/pg/postgres.log" 2>&1 &
PIDS+=($!)
PG_URL="host=127.0.0.1 port=$PGPORT user=sb dbname=postgres"
until "$PGBIN/pg_isready" -h 127.0.0.1 -p "$PGPORT" >/dev/null 2>&1; do sleep 0.2; done
echo "postgresql: $PG_URL"

# --- The nodes. One serves; the others forward their clients' requests to
# it, and one of them takes over if it dies.
for i in $(seq 1 "$NODES"); do
    mkdir -p "$DIR/node$i"
    SWITCHBOARD_REDIS_URL=$REDIS_URL SWITCHBOARD_POSTGRES_URL=$PG_URL \
        "$BIN" serve --node-id "node$i" --data-dir "$DIR/node$i" \
        --tcp-listen "127.0.0.1:$((BASE + 100 + i))" \
        --http-listen "127.0.0.1:$((BASE + 200 + i))" \
        >"$DIR/node$i/stdout" 2>"$DIR/node$i/log" &
    PIDS+=($!)
    echo "node$i: tcp 127.0.0.1:$((BASE + 100 + i)), http 127.0.0.1:$((BASE + 200 + i)), logs $DIR/node$i/log"
done
if [ "$NODES" -gt 0 ]; then
    for _ in $(seq 1 150); do
        grep -l "switchboard ready" "$DIR"/node*/stdout 2>/dev/null && break
        sleep 0.2
    done
    echo "ready (the node listed above serves; the others forward to it: connect to any; each node writes the dev codes it sends into its data dir, dev-codes/). Ctrl-C stops all."
else
    echo "engines ready (no nodes: --nodes 0). Ctrl-C stops them."
fi
echo "SWITCHBOARD_REDIS_URL='$REDIS_URL' SWITCHBOARD_POSTGRES_URL='$PG_URL'"
wait
