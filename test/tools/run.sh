#!/usr/bin/env bash
# make run / make stop: a local PostgreSQL cluster of its own with
# qes_billing preloaded, its worker running, and a short demonstration.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
. "$src/test/tools/common.sh"

RUN_DIR=${QES_RUN_DIR:-/tmp/qes_billing-run}
PORT=${QES_RUN_PORT:-55432}
DB=${QES_RUN_DB:-qes}
DATA=$RUN_DIR/data

psql_run() { as_pg psql -X -q -h "$RUN_DIR" -p "$PORT" -d "$DB" -v ON_ERROR_STOP=1 "$@"; }

running() { [ -f "$DATA/postmaster.pid" ] && as_pg pg_ctl -D "$DATA" status >/dev/null 2>&1; }

FAKE_PORT=${QES_FAKE_STRIPE_PORT:-12112}
stop_fake() {
  if [ -f "$RUN_DIR/fake_stripe.pid" ]; then
    kill "$(cat "$RUN_DIR/fake_stripe.pid")" 2>/dev/null || true
    rm -f "$RUN_DIR/fake_stripe.pid"
  fi
}

case "${1:-start}" in
stop)
  stop_fake
  if running; then as_pg pg_ctl -D "$DATA" -m fast -w stop; else echo "not running"; fi
  exit 0 ;;
start) ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

bash "$src/test/tools/deps.sh"
echo "== building and installing qes_billing"
build_and_install "$src"

export QES_ENVIRONMENT=${QES_ENVIRONMENT:-development}
export QES_BASE_URL=${QES_BASE_URL:-http://localhost:3000}

if running; then
  echo "== restarting the cluster in $DATA (port $PORT) to load the new build"
  as_pg pg_ctl -D "$DATA" -m fast -w restart >/dev/null
else
  echo "== creating a cluster in $DATA (port $PORT)"
  mkdir -p "$RUN_DIR"
  [ "$(id -u)" = 0 ] && chown "$PGUSER_OS" "$RUN_DIR"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    init_cluster "$RUN_DIR" "$PORT" "$DB" localhost <<CONF
qes_billing.worker_naptime = '1s'
CONF
  fi
  as_pg pg_ctl -D "$DATA" -l "$RUN_DIR/server.log" -w start >/dev/null
fi

# Stripe: Stripe's test mode when STRIPE_TEST_SECRET_KEY is set, else the
# project's local stateful fake (no network needed)
stop_fake
sys_set() { as_pg psql -X -q -h "$RUN_DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@" -c "SELECT pg_reload_conf()" >/dev/null; }
if [ -z "${STRIPE_TEST_SECRET_KEY:-}" ] && [ "$QES_ENVIRONMENT" != production ]; then
  python3 "$src/test/python/fake_stripe.py" --port "$FAKE_PORT" >"$RUN_DIR/fake_stripe.log" 2>&1 &
  echo $! >"$RUN_DIR/fake_stripe.pid"
  for _ in $(seq 1 50); do grep -q http "$RUN_DIR/fake_stripe.log" && break; sleep 0.1; done
  sys_set -c "ALTER SYSTEM SET qes_billing.stripe_api_base = 'http://127.0.0.1:$FAKE_PORT'" \
          -c "ALTER SYSTEM SET qes_billing.stripe_test_secret_key = 'sk_test_local_fake'" \
          -c "ALTER SYSTEM SET qes_billing.stripe_test_publishable_key = 'pk_test_local_fake'" \
          -c "ALTER SYSTEM RESET qes_billing.stripe_test_webhook_secret"
  export QES_DEMO_FAKE="http://127.0.0.1:$FAKE_PORT"
  stripe_used="the local Stripe fake (test/python/fake_stripe.py) on port $FAKE_PORT; set STRIPE_TEST_SECRET_KEY (and friends) to use Stripe's test mode"
else
  sys_set -c "ALTER SYSTEM RESET qes_billing.stripe_api_base" -c "ALTER SYSTEM RESET qes_billing.stripe_test_secret_key" \
          -c "ALTER SYSTEM RESET qes_billing.stripe_test_publishable_key" -c "ALTER SYSTEM RESET qes_billing.stripe_test_webhook_secret"
  unset QES_DEMO_FAKE
  stripe_used="Stripe's test mode (api.stripe.com) with STRIPE_TEST_SECRET_KEY; unset it to use the local fake"
fi

as_pg psql -X -q -h "$RUN_DIR" -p "$PORT" -d postgres -tc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1 \
  || as_pg createdb -h "$RUN_DIR" -p "$PORT" "$DB"
# the demo database is disposable: start from a fresh extension every time
psql_run -c "DROP EXTENSION IF EXISTS qes_billing" -c "CREATE EXTENSION qes_billing"

echo "== waiting for the worker"
for _ in $(seq 1 100); do
  [ "$(psql_run -tAc 'SELECT coalesce(alive, false) FROM billing.worker_status')" = t ] && break
  sleep 0.1
done
psql_run -c "SELECT pid, started_at, alive, loops, outbox_pending, inbox_pending FROM billing.worker_status"

echo "== GET /rpc/config"
psql_run -tAc "SELECT jsonb_pretty(api.config()::jsonb - 'plans')"
echo "== GET /rpc/health"
psql_run -tAc "SELECT jsonb_pretty(api.health()::jsonb)"
if [ "$(psql_run -tAc "SELECT api.health() ->> 'status'")" != ok ]; then
  echo "   (unhealthy: set STRIPE_TEST_SECRET_KEY and friends in the environment of 'make run' to configure Stripe)"
fi
echo "== GET /plans"
psql_run -c "SELECT plan_id, name, monthly_price, yearly_price, limits FROM api.plans ORDER BY tier"

echo "== a tenant registers, and the audit chain records it"
psql_run -c "SELECT tenant_id, name, billing_email FROM billing.upsert_tenant('demo', 'Demo Signing GmbH', 'billing@demo.example')"
psql_run -c "SELECT audit_id, action, tenant_id, encode(hash, 'hex') AS hash FROM billing.audit_log ORDER BY audit_id DESC LIMIT 3"
psql_run -c "SELECT * FROM billing.verify_audit_chain()"

echo "== Stripe: $stripe_used"
echo "== qes_billing_setup --all (products, prices and the webhook endpoint, through the worker)"
as_pg env PGHOST="$RUN_DIR" PGPORT="$PORT" PGDATABASE="$DB" PGUSER=postgres \
  "$(pg_config --bindir)/qes_billing_setup" --all --timeout 30 || echo "   (setup failed: see above)"

# the webhook demos sign as Stripe would, with the configured signing
# secret, else the one --setup-webhook stored, else a local one
if [ -n "${STRIPE_TEST_WEBHOOK_SECRET:-}" ]; then
  demo_secret=$STRIPE_TEST_WEBHOOK_SECRET
else
  demo_secret=$(psql_run -tAc "SELECT split_part(billing.stored_webhook_secrets(), ',', 1)")
  if [ -z "$demo_secret" ]; then
    psql_run -c "ALTER SYSTEM SET qes_billing.stripe_test_webhook_secret = 'whsec_local_demo_only'" -c "SELECT pg_reload_conf()" >/dev/null
    demo_secret=whsec_local_demo_only
  fi
fi

for demo in "$src"/test/tools/demo.d/*; do
  case "$demo" in
    *.sql) echo "== $(head -1 "$demo" | sed 's/^-- *//')"
           PGOPTIONS="-c qes_demo.webhook_secret=$demo_secret" psql_run -f "$demo" ;;
    *.py)  echo "== $(head -1 "$demo" | sed 's/^# *//')"
           PGHOST="$RUN_DIR" PGPORT="$PORT" PGDATABASE="$DB" python3 "$demo" ;;
  esac
done

cat <<MSG

qes_billing is running.
  connect:  psql -h $RUN_DIR -p $PORT -U postgres $DB
  log:      $RUN_DIR/server.log
  Stripe:   $stripe_used
  stop:     make stop
MSG
