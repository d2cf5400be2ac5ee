\set t random(1, 100)
\set k random(1, 9000000000000000000)
SELECT billing.record_usage(CAST(:t AS text), 'api_calls', 1, 'k' || :client_id || '-' || :k);
