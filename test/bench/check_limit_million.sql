-- the tenant with 1,000,000 usage rows this period
SELECT billing.check_limit('million', 'api_calls', 1);
