-- record_usage for the heavy tenant (standby part: the primary writing)
\set k random(1, 9000000000000000000)
SELECT billing.record_usage('heavy', 'api_calls', 1, 'w' || :client_id || '-' || :k);
