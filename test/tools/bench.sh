#!/usr/bin/env bash
# make bench: pgbench measurements, each beside its ceiling in the same run
# on the same cluster, printed as
#   <name> tps=<n> ceiling=<ceiling name> ceiling_tps=<n> ratio=<r>
# BENCH_SECONDS (default 10) per measurement, BENCH_CLIENTS (default 8).
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
. "$src/test/tools/common.sh"
unset_seed_env

SECONDS_EACH=${BENCH_SECONDS:-10}
CLIENTS=${BENCH_CLIENTS:-8}
DIR=${QES_BENCH_DIR:-/tmp/qes_billing-bench}
PORT=${QES_BENCH_PORT:-55433}
DB=bench

bash "$src/test/tools/deps.sh" >/dev/null
build_and_install "$src"

as_pg pg_ctl -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown -R "$PGUSER_OS" "$DIR"
cp "$src"/test/bench/*.sql "$DIR/"
[ "$(id -u)" = 0 ] && chown -R "$PGUSER_OS" "$DIR"
as_pg initdb -D "$DIR/data" -A trust -U postgres >/dev/null
as_pg sh -c "cat >> '$DIR/data/postgresql.conf'" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'qes_billing'
qes_billing.database = '$DB'
shared_buffers = '512MB'
max_wal_size = '4GB'
synchronous_commit = '${BENCH_SYNC_COMMIT:-on}'
CONF
as_pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
trap 'as_pg pg_ctl -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true' EXIT
as_pg createdb -h "$DIR" -p "$PORT" "$DB"
as_pg psql -X -q -h "$DIR" -p "$PORT" -d "$DB" -v ON_ERROR_STOP=1 -f "$DIR/setup.sql" >/dev/null

tps() {
  as_pg pgbench -n -M prepared -h "$DIR" -p "$PORT" -c "$CLIENTS" -j 2 -T "$SECONDS_EACH" \
    -f "$DIR/$1.sql" "$DB" 2>&1 | awk '/^tps = / { printf "%d", $3 }'
}

line() {   # name tps ceiling ceiling_tps
  awk -v n="$1" -v t="$2" -v c="$3" -v ct="$4" \
    'BEGIN { printf "%s tps=%d ceiling=%s ceiling_tps=%d ratio=%.2f\n", n, t, c, ct, (ct > 0 ? t / ct : 0) }'
}

echo "qes_billing benchmark: $CLIENTS clients, ${SECONDS_EACH}s each, synchronous_commit=${BENCH_SYNC_COMMIT:-on}, $(nproc) cores"
warm=$(tps check_limit)        # warm the caches and the counters
s1=$(tps select_1)
cl=$(tps check_limit)
line check_limit "$cl" select_1 "$s1"
pi=$(tps plain_insert)
ru=$(tps record_usage)
line record_usage "$ru" plain_insert "$pi"

as_pg psql -X -q -h "$DIR" -p "$PORT" -d "$DB" -v ON_ERROR_STOP=1 -f "$DIR/load_history.sql" >/dev/null
rows=$(as_pg psql -X -qAt -h "$DIR" -p "$PORT" -d "$DB" -c "SELECT count(*) FROM billing.usage_events")
warm=$(tps check_limit)
s1b=$(tps select_1)
clh=$(tps check_limit)
line check_limit_1m_history "$clh" select_1 "$s1b"
echo "history rows: $rows; check_limit ratio with history / without: $(awk -v a="$clh" -v b="$s1b" -v c="$cl" -v d="$s1" 'BEGIN { printf "%.2f", (a / b) / (c / d) }')"
as_pg psql -X -qAt -h "$DIR" -p "$PORT" -d "$DB" -c "SELECT 'counter cache: ' || entries || ' entries, ' || hits || ' hits, ' || loads || ' builds, ' || uncached || ' uncached' FROM billing.usage_cache_stats()"
