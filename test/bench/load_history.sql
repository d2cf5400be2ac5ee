-- 1,000,000 usage rows of the current period for the benchmark tenants,
-- written directly (as a bulk import would); the cached counters are then
-- rebuilt from the table.
BEGIN;
INSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at)
SELECT (1 + i % 100)::text, 'hist-' || i, 'api_calls', 1, p.period_start, now()
  FROM (SELECT c.period_start FROM billing.usage_current('1') c LIMIT 1) p,
       generate_series(1, 1000000) i;
SELECT billing.reset_caches();
COMMIT;
VACUUM ANALYZE billing.usage_events;
