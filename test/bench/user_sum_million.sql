SELECT sum(quantity) FROM bench_user_usage
 WHERE tenant_id = 'million' AND metric = 'api_calls' AND period_start = date_trunc('month', now());
