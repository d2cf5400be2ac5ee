-- usage: the demo tenant signs past its Free limit (10 signatures a month)
\set QUIET on
\pset footer off
SELECT 'signature ' || i AS "recorded in the signing transaction", r.total, r.usage_limit, r.status
  FROM generate_series(1, 12) i,
       LATERAL billing.record_usage('demo', 'signatures', 1, 'demo-signature-' || to_char(now(), 'YYYYMM') || '-' || i) r;
\echo 'check_limit before the 13th signature (soft limit: allowed, with a warning and the upgrade):'
SELECT allowed, status, current, usage_limit, remaining, jsonb_pretty(upgrade) AS upgrade
  FROM billing.check_limit('demo', 'signatures');
\echo 'notifications queued (one per threshold):'
SELECT kind, payload ->> 'metric' AS metric, payload ->> 'threshold_percent' AS threshold FROM billing.notifications WHERE tenant_id = 'demo';
\echo 'GET /usage as the demo tenant:'
BEGIN;
SELECT set_config('role', 'qes_tenant', true) AS role,
       set_config('request.jwt.claims', '{"role": "qes_tenant", "tenant_id": "demo"}', true) AS claims \gset
SELECT metric, used, usage_limit, percent, status FROM api.usage WHERE is_current ORDER BY metric;
COMMIT;
