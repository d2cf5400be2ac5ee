SELECT set_config('request.headers', json_build_object('stripe-signature', e.header)::text, true),
       api.stripe_webhook(e.body::json)
  FROM bench_events e WHERE e.n = (SELECT nextval('bench_intake_seq'));
