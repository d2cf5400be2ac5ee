-- 1,000,000 usage rows of the current period for the benchmark tenants,
-- written directly (as a bulk import would); the cached counters are then
-- rebuilt from the table.
BEGIN;
INSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at)
SELECT 'bench' || (1 + i % 100), 'hist-' || i, 'api_calls', 1, p.period_start, now()
  FROM (SELECT (billing.check_limit('bench1', 'api_calls', 0)).period_start) p,
       generate_series(1, 1000000) i;
SELECT billing.reset_caches();
COMMIT;
VACUUM ANALYZE billing.usage_events;
