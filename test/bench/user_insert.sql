\set t random(1, 100)
\set k random(1, 9000000000000000000)
INSERT INTO bench_user_usage (tenant_id, idempotency_key, metric, quantity, period_start)
VALUES (CAST(:t AS text), 'k' || :client_id || '-' || :k, 'api_calls', 1, date_trunc('month', now()))
ON CONFLICT DO NOTHING;
