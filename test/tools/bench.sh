#!/usr/bin/env bash
# make bench: pgbench measurements, each beside its ceiling in the same run
# on the same cluster, printed as
#   <name> tps=<n> ceiling=<ceiling name> ceiling_tps=<n> ratio=<r>
# Each figure is the mean of BENCH_ROUNDS (2) runs of BENCH_SECONDS (10),
# measurement and ceiling alternating; BENCH_CLIENTS (8) clients.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
. "$src/test/tools/common.sh"
unset_seed_env

SECONDS_EACH=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-2}
CLIENTS=${BENCH_CLIENTS:-8}
DIR=${QES_BENCH_DIR:-/tmp/qes_billing-bench}
PORT=${QES_BENCH_PORT:-55433}
DB=bench

bash "$src/test/tools/deps.sh" >/dev/null
build_and_install "$src"

as_pg pg_ctl -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$DIR"
cp "$src"/test/bench/*.sql "$DIR/"
[ "$(id -u)" = 0 ] && chown -R "$PGUSER_OS" "$DIR"
init_cluster "$DIR" "$PORT" "$DB" '' <<CONF
shared_buffers = '512MB'
max_wal_size = '4GB'
CONF
as_pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
trap 'as_pg pg_ctl -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true' EXIT
as_pg createdb -h "$DIR" -p "$PORT" "$DB"
sql() { as_pg psql -X -qAt -h "$DIR" -p "$PORT" -d "$DB" -v ON_ERROR_STOP=1 "$@"; }
sql -f "$DIR/setup.sql" >/dev/null

tps() {
  as_pg pgbench -n -M prepared -h "$DIR" -p "$PORT" -c "$CLIENTS" -j 2 -T "$SECONDS_EACH" \
    -f "$DIR/$1.sql" "$DB" 2>&1 | awk '/^tps = / { printf "%d", $3 }'
}

# pair NAME SCRIPT CEILING_NAME CEILING_SCRIPT: alternate, average, print
pair() {
  local t=0 c=0
  for _ in $(seq 1 "$ROUNDS"); do
    c=$((c + $(tps "$4"))); t=$((t + $(tps "$2")))
  done
  awk -v n="$1" -v t="$((t / ROUNDS))" -v cn="$3" -v ct="$((c / ROUNDS))" \
    'BEGIN { printf "%s tps=%d ceiling=%s ceiling_tps=%d ratio=%.2f\n", n, t, cn, ct, (ct > 0 ? t / ct : 0) }'
}

echo "qes_billing benchmark: $CLIENTS clients, $ROUNDS x ${SECONDS_EACH}s per figure, $(nproc) cores, PostgreSQL $(pg_config --version | awk '{print $2}')"
part=${BENCH_PART:-all}          # all, usage, webhooks, outbox or guard
wants() { [ "$part" = all ] || [ "$part" = "$1" ]; }
if wants usage; then
tps check_limit >/dev/null       # warm caches and counters
pair record_usage record_usage plain_insert plain_insert
pair check_limit check_limit select_1 select_1
pair check_limit_over_limit check_limit_over select_1 select_1
base=$(pair check_limit check_limit select_1 select_1 | sed 's/.*ratio=//')

sql -f "$DIR/load_history.sql" >/dev/null
echo "history: $(sql -c 'SELECT count(*) FROM billing.usage_events') usage rows"
tps check_limit >/dev/null
hist=$(pair check_limit_1m_history check_limit select_1 select_1)
echo "$hist"
awk -v a="${hist##*ratio=}" -v b="$base" 'BEGIN { printf "check_limit ratio with history / without: %.2f\n", a / b }'

# a heavy tenant (100,000 rows this period) cached, then again after the
# counter table has been filled by other tenants (evicting it: it must come
# back and stay, not be summed from the table on every call)
sql -c "SELECT billing.upsert_tenant('heavy', 'Heavy', 'h@bench.example')" \
    -c "INSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at)
        SELECT 'heavy', 'h' || i, 'api_calls', 1,
               (SELECT period_start FROM billing.usage_current('heavy') WHERE metric = 'api_calls'), now()
          FROM generate_series(1, 100000) i" >/dev/null
cached=$(tps check_limit_heavy)
cap=$(sql -c "SELECT capacity FROM billing.usage_cache_stats()")
sql -c "SELECT count(billing.upsert_tenant('fill' || i, 'Fill', 'f@bench.example')) FROM generate_series(1, $cap / 4 + 100) i" \
    -c "SELECT count(*) FROM generate_series(1, $cap / 4 + 100) i, LATERAL billing.usage_current('fill' || i)" >/dev/null
full=$(tps check_limit_heavy)
awk -v t="$full" -v c="$cached" -v s="$(sql -c "SELECT entries || '/' || capacity || ' entries, ' || evicted || ' evicted, hit rate ' || round(hit_rate::numeric, 3) || ', ' || bytes_per_counter || ' bytes per counter' FROM billing.usage_cache_stats()")" \
  'BEGIN { printf "check_limit_heavy_table_full tps=%d ceiling=check_limit_heavy_cached ceiling_tps=%d ratio=%.2f (%s)\n", t, c, (c > 0 ? t / c : 0), s }'
fi

if wants webhooks; then

# webhooks: intake beside a plain INSERT of the same payload, with the
# worker paused so that only intake is measured; then processing
sql -c "ALTER SYSTEM SET qes_billing.stripe_test_webhook_secret = 'whsec_bench_secret'" -c "SELECT pg_reload_conf()" >/dev/null
sql -f "$DIR/webhook_setup.sql" >/dev/null
sql -c "ALTER SYSTEM SET qes_billing.worker_paused = on" -c "SELECT pg_reload_conf()" >/dev/null
# each run starts from an empty inbox (and ceiling table) and the same
# 100,000 signed events, after a checkpoint, so that runs are alike
reset_intake() {
  sql -c "TRUNCATE billing.webhook_events, bench_plain_events" -c "SELECT setval('bench_intake_seq', 1), setval('bench_plain_seq', 1)" \
      -c "CHECKPOINT" >/dev/null
}
t=0; c=0
for _ in $(seq 1 "$ROUNDS"); do
  reset_intake; c=$((c + $(tps webhook_plain_insert)))
  reset_intake; t=$((t + $(tps webhook_intake)))
done
awk -v t="$((t / ROUNDS))" -v c="$((c / ROUNDS))" \
  'BEGIN { printf "webhook_intake tps=%d ceiling=webhook_plain_insert ceiling_tps=%d ratio=%.2f\n", t, c, (c > 0 ? t / c : 0) }'
reset_intake
sql -c "SELECT count(api_stripe_webhook_bench) FROM (SELECT set_config('request.headers', json_build_object('stripe-signature', e.header)::text, true),
               api.stripe_webhook(e.body::json) AS api_stripe_webhook_bench FROM bench_events e WHERE n <= 40000) x" >/dev/null
sql -c "ALTER SYSTEM SET qes_billing.worker_paused = off" -c "SELECT pg_reload_conf()" >/dev/null
sql -c "SELECT 'webhook intake: ' || count(*) || ' events stored' FROM billing.webhook_events"
sql -c "SELECT count(billing.upsert_tenant('wb' || i, 'WB', 'wb' || i || '@bench.example')) FROM generate_series(1, 100) i" \
    -c "UPDATE billing.tenants SET stripe_customer_id = 'cus_bench_' || substr(tenant_id, 3) WHERE tenant_id LIKE 'wb%'" >/dev/null
# processing: 20,000 events for known tenants (each mirrors an invoice), queued at once
until [ "$(sql -c "SELECT count(*) FROM billing.webhook_events WHERE state = 'received'")" = 0 ]; do sleep 0.2; done
start=$(date +%s.%N)
sql -c "UPDATE billing.webhook_events SET state = 'received', attempts = 0, next_attempt_at = now(), received_at = now()
         WHERE stripe_event_id IN (SELECT 'evt_bench_' || n FROM generate_series(1, 20000) n)" >/dev/null
until [ "$(sql -c "SELECT count(*) FROM billing.webhook_events WHERE state = 'received'")" = 0 ]; do sleep 0.05; done
end=$(date +%s.%N)
awk -v s="$start" -v e="$end" -v n="$(sql -c "SELECT count(*) FROM billing.invoices WHERE tenant_id LIKE 'wb%'")" \
  'BEGIN { printf "webhook_processing events=20000 seconds=%.2f events_per_s=%d invoices_mirrored=%d\n", e - s, 20000 / (e - s), n }'
sql -c "SELECT 'webhook latency in that burst of 20,000 (received -> applied): p50=' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY l)::numeric, 3)
               || 's p95=' || round(percentile_cont(0.95) WITHIN GROUP (ORDER BY l)::numeric, 3) || 's p99=' || round(percentile_cont(0.99) WITHIN GROUP (ORDER BY l)::numeric, 3) || 's'
          FROM (SELECT extract(epoch FROM applied_at - received_at) AS l FROM billing.webhook_events
                 WHERE stripe_event_id IN (SELECT 'evt_bench_' || n FROM generate_series(1, 20000) n)) x"

fi

if wants outbox; then
# the outbox: requests per second the worker sends through libcurl to a
# local endpoint that answers after 20 ms, at several concurrency settings;
# the ceiling is the same endpoint driven at the same concurrency by a
# client without the database
EP_PORT=${QES_BENCH_ENDPOINT_PORT:-55499}
N=${BENCH_OUTBOX_REQUESTS:-6000}
python3 "$src/test/bench/slow_endpoint.py" serve "$EP_PORT" 20 >"$DIR/endpoint.log" 2>&1 &
ep=$!
trap 'kill $ep 2>/dev/null; as_pg pg_ctl -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true' EXIT
until grep -q listening "$DIR/endpoint.log"; do sleep 0.1; done
sql -c "ALTER SYSTEM SET qes_billing.stripe_api_base = 'http://127.0.0.1:$EP_PORT'" \
    -c "ALTER SYSTEM SET qes_billing.stripe_test_secret_key = 'sk_test_bench_outbox'" -c "SELECT pg_reload_conf()" >/dev/null
for c in ${BENCH_OUTBOX_CONCURRENCY:-8 32 64}; do
  sql -c "ALTER SYSTEM SET qes_billing.max_concurrent_requests = $c" -c "ALTER SYSTEM SET qes_billing.worker_paused = on" \
      -c "SELECT pg_reload_conf()" >/dev/null
  sleep 1
  sql -c "DELETE FROM billing.stripe_requests WHERE kind = 'bench.request'" \
      -c "SELECT count(billing.outbox_enqueue(NULL, 'bench.request', 'POST', '/v1/customers',
                jsonb_build_object('name', 'Bench', 'metadata', jsonb_build_object('n', i)))) FROM generate_series(1, $N) i" >/dev/null
  start=$(date +%s.%N)
  sql -c "ALTER SYSTEM SET qes_billing.worker_paused = off" -c "SELECT pg_reload_conf()" >/dev/null
  until [ "$(sql -c "SELECT count(*) FROM billing.stripe_requests WHERE kind = 'bench.request' AND state <> 'succeeded'")" = 0 ]; do
    sleep 0.05
  done
  end=$(date +%s.%N)
  ceiling=$(python3 "$src/test/bench/slow_endpoint.py" load "$EP_PORT" "$c" 5)
  awk -v c="$c" -v n="$N" -v s="$start" -v e="$end" -v cr="$ceiling" \
    'BEGIN { r = n / (e - s); printf "outbox_c%d rps=%d ceiling=endpoint_20ms_c%d ceiling_rps=%d ratio=%.2f\n", c, r, c, cr, (cr > 0 ? r / cr : 0) }'
done
sql -c "ALTER SYSTEM RESET qes_billing.stripe_api_base" -c "ALTER SYSTEM RESET qes_billing.stripe_test_secret_key" \
    -c "ALTER SYSTEM RESET qes_billing.max_concurrent_requests" -c "SELECT pg_reload_conf()" >/dev/null
fi

if wants guard; then
# inbound rate limiting: a request with db-pre-request = api.pre_request
# beside the same request without it (the per-request cost of the bucket)
pair pre_request pre_request no_pre_request no_pre_request
awk -v a="$(sql -c "SELECT allowed FROM billing.rate_limit_stats()")" -v l="$(sql -c "SELECT limited FROM billing.rate_limit_stats()")" \
  'BEGIN { printf "pre_request: %d allowed, %d limited\n", a, l }'
fi

if wants usage; then
sql -c "ALTER SYSTEM SET synchronous_commit = off" -c "SELECT pg_reload_conf()" >/dev/null
pair record_usage_async_commit record_usage plain_insert_async_commit plain_insert
sql -c "SELECT 'counter cache: ' || entries || ' entries, ' || hits || ' hits, ' || loads || ' builds, ' || uncached || ' uncached' FROM billing.usage_cache_stats()"
fi
