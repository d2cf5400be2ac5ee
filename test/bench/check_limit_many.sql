-- check_limit for one of 1,000,000 tenants, drawn at random (counters part)
\set t random(1, 1000000)
SELECT billing.check_limit('c' || :t, 'api_calls', 1);
