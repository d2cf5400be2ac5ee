\set t random(1, 100)
SELECT sum(quantity) FROM bench_user_usage
 WHERE tenant_id = CAST(:t AS text) AND metric = 'api_calls' AND period_start = date_trunc('month', now());
