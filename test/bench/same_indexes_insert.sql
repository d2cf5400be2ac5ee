\set t random(1, 100)
\set k random(1, 9000000000000000000)
INSERT INTO bench_same_usage (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at, metadata, total_after)
VALUES (CAST(:t AS text), 'k' || :client_id || '-' || :k, 'api_calls', 1, date_trunc('month', now()), now(), NULL, 0);
