\set t random(1, 100)
SELECT billing.check_limit('bench' || :t, 'api_calls', 1);
