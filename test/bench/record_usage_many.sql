-- record_usage for one of 1,000,000 tenants, drawn at random (counters part)
\set t random(1, 1000000)
\set k random(1, 9000000000000000000)
SELECT billing.record_usage('c' || :t, 'api_calls', 1, 'k' || :client_id || '-' || :k);
