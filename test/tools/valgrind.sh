#!/usr/bin/env bash
# make valgrind: run the pg_regress and isolation layers, and the worker's
# Stripe client against the fake, with the server under valgrind memcheck;
# each ends with amcheck of every billing index (zz_amcheck in the
# pg_regress and isolation lists, test/tools/amcheck.sql on the outbox run).
# A private bindir holds a `postgres` wrapper that starts the real server
# under valgrind (every backend and the worker are forked from it, so they
# run under valgrind too, each with its own log); initdb and psql run
# natively.  PostgreSQL's own false positives are suppressed by
# test/tools/valgrind-postgres.supp; test/tools/valgrind_classify.py reads
# the logs and fails the run on any other report that has a frame in
# qes_billing's sources (src/*.c) in any of its stacks, printing them all.
# Reports with no qes_billing frame are counted and listed, not failed.
#
# The self-test runs first: a server under valgrind with the test-only
# qes_billing.debug_fault planting an invalid read and a branch on
# uninitialised memory in billing.environment(); the layer fails unless the
# classifier finds both as qes_billing's (and nothing else of ours).  Its
# logs are kept apart from the real run's.
# `bash test/tools/valgrind.sh selftest` runs the self-test alone.
# (AddressSanitizer cannot be preloaded into Debian's uninstrumented server:
# glibc's bindtextdomain deadlocks under libasan at start-up.)
set -uo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
. "$src/test/tools/common.sh"
unset_seed_env
SECONDS=0

real=$(pg_config --bindir)
wrap=${QES_VALGRIND_DIR:-/tmp/qes_billing-valgrind}
rm -rf "$wrap"; mkdir -p "$wrap"
cp "$src/test/tools/valgrind-postgres.supp" "$wrap/"
classify() { python3 "$src/test/tools/valgrind_classify.py" "$@"; }

# make_bindir DIR LOGDIR: DIR/bin with every server program, `postgres`
# starting the server under memcheck with its logs in LOGDIR
make_bindir() {
  local dir=$1 logs=$2 f
  mkdir -p "$dir/bin" "$logs"; chmod 777 "$logs"
  for f in "$real"/*; do ln -s "$f" "$dir/bin/$(basename "$f")"; done
  rm "$dir/bin/postgres"
  cat > "$dir/bin/postgres" <<WRAP
#!/bin/sh
case "\$1" in -V|--version|--boot|--single|-C|--describe-config) exec "$real/postgres" "\$@";; esac
exec valgrind --tool=memcheck --trace-children=no --track-origins=no --leak-check=no \\
  --error-limit=no --num-callers=30 --fullpath-after= --show-error-list=yes \\
  --suppressions="$wrap/valgrind-postgres.supp" --log-file="$logs/vg.%p.log" "$real/postgres" "\$@"
WRAP
  chmod 755 "$dir/bin/postgres"
}
make_bindir "$wrap" "$wrap/logs"

# start_server DIR PORT BINDIR [postgresql.conf lines on stdin]: a cluster in
# DIR/data under valgrind, its socket in DIR; waits until it answers
start_server() {
  local dir=$1 port=$2 bindir=$3
  mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown "$PGUSER_OS" "$dir"
  as_pg initdb -D "$dir/data" -A trust -U postgres >/dev/null
  { printf "port = %s\nlisten_addresses = ''\nunix_socket_directories = '%s'\nshared_preload_libraries = 'qes_billing'\n" "$port" "$dir"
    cat; } | as_pg sh -c "cat >> '$dir/data/postgresql.conf'"
  as_pg sh -c "'$bindir/postgres' -D '$dir/data' >'$dir/server.log' 2>&1 &"
  for _ in $(seq 1 120); do
    as_pg psql -X -qAt -h "$dir" -p "$port" -d postgres -c 'SELECT 1' >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "valgrind: the server in $dir did not start"; tail -20 "$dir/server.log"; return 1
}

stop_server() {
  local dir=$1
  [ -f "$dir/data/postmaster.pid" ] || return 0
  kill -INT "$(as_pg head -1 "$dir/data/postmaster.pid")" 2>/dev/null
  for _ in $(seq 1 60); do [ -f "$dir/data/postmaster.pid" ] || break; sleep 1; done
}

# ---- the self-test: does the classifier catch an error in our code? --------
echo "valgrind self-test: planting an invalid read and a branch on uninitialised memory (qes_billing.debug_fault)"
build_and_install "$src" || exit 1
status=0
sdir=$wrap/selftest; sport=${QES_VALGRIND_SELFTEST_PORT:-55468}
make_bindir "$sdir" "$sdir/logs"
selftest_ok=0
if start_server "$sdir" "$sport" "$sdir/bin" <<CONF
qes_billing.database = 'postgres'
CONF
then
  spsql() { as_pg psql -X -qAt -v ON_ERROR_STOP=1 -h "$sdir" -p "$sport" -d postgres "$@"; }
  # the setting is refused in production (and ignored there if set before)
  if spsql -c "SET qes_billing.environment = 'production'" -c "SET qes_billing.debug_fault = 'invalid_read'" >/dev/null 2>&1; then
    echo "valgrind self-test: qes_billing.debug_fault was accepted in production"; status=1
  fi
  spsql -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION qes_billing' \
        -c "SET qes_billing.debug_fault = 'invalid_read'" -c 'SELECT billing.environment()' \
        -c "SET qes_billing.debug_fault = 'uninitialised'" -c 'SELECT billing.environment()' >/dev/null \
    && selftest_ok=1
  # this cluster ends with amcheck too, like every cluster a test starts
  if ! spsql < "$src/test/tools/amcheck.sql"; then
    echo "valgrind self-test: amcheck found a billing index that fails bt_index_check"; status=1
  fi
  stop_server "$sdir"
fi
if [ $selftest_ok = 1 ] && classify "$sdir/logs" --label "valgrind self-test" --planted; then
  echo "valgrind self-test: ok, the planted errors were found and classified as qes_billing's"
else
  echo "valgrind self-test: FAILED, the classifier missed an error planted in qes_billing (or the self-test did not run)"
  status=1
fi
if [ "${1:-}" = selftest ]; then
  echo "valgrind: self-test took ${SECONDS} s"
  exit $status
fi

# ---- the real run ---------------------------------------------------------
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
mkdir -p "$vdir"
python3 "$src/test/python/fake_stripe.py" --port "$fport" --fault-rate 0.3 >"$vdir/fake.log" 2>&1 &
fake=$!
start_server "$vdir" "$vport" "$wrap/bin" <<CONF || status=1
qes_billing.database = 'postgres'
qes_billing.worker_naptime = '200ms'
qes_billing.stripe_api_base = 'http://127.0.0.1:$fport'
qes_billing.stripe_test_secret_key = 'sk_test_valgrind'
qes_billing.request_timeout = '2s'
qes_billing.retry_base_delay = '50ms'
qes_billing.retry_max_delay = '1s'
qes_billing.max_attempts = 50
CONF
vpsql() { as_pg psql -X -qAt -h "$vdir" -p "$vport" -d postgres "$@"; }
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
stop_server "$vdir"
kill "$fake" 2>/dev/null

# the verdict: every report with a qes_billing frame fails the run
classify "$wrap/logs" --label valgrind || status=1
echo "valgrind: layer took ${SECONDS} s (logs: $wrap/logs; self-test's: $sdir/logs)"
exit $status
