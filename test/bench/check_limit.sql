\set t random(1, 100)
SELECT billing.check_limit(:t, 'api_calls', 1);
