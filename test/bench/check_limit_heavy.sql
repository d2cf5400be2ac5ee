-- a heavy tenant: 100,000 usage rows in its current period
SELECT billing.check_limit('heavy', 'api_calls', 1);
