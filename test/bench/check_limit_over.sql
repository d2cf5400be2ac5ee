SELECT billing.check_limit('bench_over', 'api_calls', 1);
