#!/usr/bin/env bash
# make valgrind: run the pg_regress and isolation layers, and the worker's
# Stripe client against the fake, with the server under valgrind memcheck;
# each ends with amcheck of every billing index (zz_amcheck in the
# pg_regress and isolation lists, test/tools/amcheck.sql on the outbox run).
# A private bindir holds a `postgres` wrapper that starts the real server
# under valgrind (every backend and the worker are forked from it, so they
# run under valgrind too); initdb and psql run natively.  Errors in frames
# of qes_billing.so fail the run; reports that only involve PostgreSQL's own
# code are counted but not ours to fix.
# (AddressSanitizer cannot be preloaded into Debian's uninstrumented server:
# glibc's bindtextdomain deadlocks under libasan at start-up.)
set -uo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
. "$src/test/tools/common.sh"
unset_seed_env

real=$(pg_config --bindir)
wrap=${QES_VALGRIND_DIR:-/tmp/qes_billing-valgrind}
rm -rf "$wrap"; mkdir -p "$wrap/bin" "$wrap/logs"; chmod 777 "$wrap/logs"
for f in "$real"/*; do ln -s "$f" "$wrap/bin/$(basename "$f")"; done
rm "$wrap/bin/postgres"
cat > "$wrap/bin/postgres" <<WRAP
#!/bin/sh
case "\$1" in -V|--version|--boot|--single|-C|--describe-config) exec "$real/postgres" "\$@";; esac
exec valgrind --quiet --tool=memcheck --trace-children=no --track-origins=no \\
  --error-limit=no --num-callers=30 --log-file="$wrap/logs/vg.%p" "$real/postgres" "\$@"
WRAP
chmod 755 "$wrap/bin/postgres"

build_and_install "$src" || exit 1
status=0
if [ "$(id -u)" = 0 ]; then
  work=$wrap/work; rm -rf "$work"; mkdir -p "$work"
  tar -C "$src" --exclude=.git --exclude='tmp_check*' -cf - . | tar -C "$work" -xf -
  chown -R "$PGUSER_OS" "$work"
else
  work=$src
fi
# pg_regress finds initdb and postgres through --bindir
(cd "$work" && as_pg make -s installcheck ISOLATION= TAP_TESTS= "REGRESS_OPTS=--temp-instance=./tmp_check_regress --temp-config=test/regress.conf --dbname=contrib_regression --bindir=$wrap/bin") || status=1
(cd "$work" && as_pg make -s installcheck REGRESS= TAP_TESTS= "ISOLATION_OPTS=--temp-instance=./tmp_check_iso --temp-config=test/regress.conf --load-extension=qes_billing --inputdir=test/isolation --outputdir=test/isolation/output --dbname=contrib_regression --bindir=$wrap/bin") || status=1

# The worker's HTTP client (outbox.c, libcurl multi) under valgrind too: a
# server whose worker sends 40 requests to the fake Stripe, 30 % of whose
# answers are faults (5xx, 429 with Retry-After, timeouts, dropped
# connections), so the retry paths run as well.
vdir=$wrap/outbox; vport=${QES_VALGRIND_PORT:-55466}; fport=${QES_VALGRIND_FAKE_PORT:-55467}
mkdir -p "$vdir"; [ "$(id -u)" = 0 ] && chown "$PGUSER_OS" "$vdir"
as_pg initdb -D "$vdir/data" -A trust -U postgres >/dev/null
cat <<CONF | as_pg sh -c "cat >> '$vdir/data/postgresql.conf'"
port = $vport
listen_addresses = ''
unix_socket_directories = '$vdir'
shared_preload_libraries = 'qes_billing'
qes_billing.database = 'postgres'
qes_billing.worker_naptime = '200ms'
qes_billing.stripe_api_base = 'http://127.0.0.1:$fport'
qes_billing.stripe_test_secret_key = 'sk_test_valgrind'
qes_billing.request_timeout = '2s'
qes_billing.retry_base_delay = '50ms'
qes_billing.retry_max_delay = '1s'
qes_billing.max_attempts = 50
CONF
python3 "$src/test/python/fake_stripe.py" --port "$fport" --fault-rate 0.3 >"$vdir/fake.log" 2>&1 &
fake=$!
as_pg sh -c "'$wrap/bin/postgres' -D '$vdir/data' >'$vdir/server.log' 2>&1 &"
vpsql() { as_pg psql -X -qAt -h "$vdir" -p "$vport" -d postgres "$@"; }
for _ in $(seq 1 120); do vpsql -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
vpsql -c "CREATE EXTENSION qes_billing" \
      -c "SELECT count(billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
            jsonb_build_object('name', 'V ' || i, 'metadata', jsonb_build_object('n', i)))) FROM generate_series(1, 30) i" \
      -c "SELECT count(billing.outbox_enqueue(NULL, 'test.balance', 'GET', '/v1/balance', jsonb_build_object('expand', jsonb_build_array('x'))))
            FROM generate_series(1, 10) i" >/dev/null
for _ in $(seq 1 300); do
  [ "$(vpsql -c "SELECT count(*) FROM billing.stripe_requests WHERE state <> 'succeeded'")" = 0 ] && break
  sleep 1
done
sent=$(vpsql -c "SELECT count(*) || ' requests succeeded after ' || sum(attempts) || ' attempts' FROM billing.stripe_requests WHERE state = 'succeeded'")
echo "valgrind outbox: $sent"
[ "$(vpsql -c "SELECT count(*) FROM billing.stripe_requests WHERE state = 'succeeded'")" = 40 ] || { echo "valgrind outbox: not all 40 requests succeeded"; status=1; }
# amcheck (under valgrind too): every billing index holds every row
if ! vpsql -v ON_ERROR_STOP=1 < "$src/test/tools/amcheck.sql"; then
  echo "valgrind outbox: amcheck found a billing index that fails bt_index_check"; status=1
fi
kill -INT "$(as_pg head -1 "$vdir/data/postmaster.pid")" 2>/dev/null
for _ in $(seq 1 60); do [ -f "$vdir/data/postmaster.pid" ] || break; sleep 1; done
kill "$fake" 2>/dev/null

ours=$(grep -l "qes_billing.so" "$wrap"/logs/vg.* 2>/dev/null | wc -l)
total=$(grep -l "ERROR SUMMARY\|Invalid\|uninitialised" "$wrap"/logs/vg.* 2>/dev/null | wc -l)
if [ "$ours" -gt 0 ]; then
  echo "valgrind reports in qes_billing code:"
  grep -l "qes_billing.so" "$wrap"/logs/vg.* | head -3 | xargs head -80
  status=1
fi
echo "valgrind: $ours process logs with errors in qes_billing code, $total logs with any report"
exit $status
