\set t random(1, 100)
\set k random(1, 9000000000000000000)
SELECT billing.record_usage('bench' || :t, 'api_calls', 1, 'k' || :client_id || '-' || :k);
