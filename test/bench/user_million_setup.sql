-- one tenant with 1,000,000 usage rows this period, in billing.usage_events
-- and in the user's own table alike (there in the period its query asks
-- for: the calendar month)
SELECT billing.upsert_tenant('million', 'Million', 'm@bench.example');
INSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at)
SELECT 'million', 'm' || i, 'api_calls', 1, p.period_start, now()
  FROM (SELECT period_start FROM billing.usage_current('million') WHERE metric = 'api_calls') p,
       generate_series(1, 1000000) i;
INSERT INTO bench_user_usage (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at)
SELECT tenant_id, idempotency_key, metric, quantity, date_trunc('month', now()), occurred_at
  FROM billing.usage_events WHERE tenant_id = 'million';
VACUUM ANALYZE billing.usage_events;
VACUUM ANALYZE bench_user_usage;
