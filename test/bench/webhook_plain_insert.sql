INSERT INTO bench_plain_events (stripe_event_id, payload)
SELECT 'evt_plain_' || s.v, e.body::json
  FROM (SELECT nextval('bench_plain_seq') AS v) s JOIN bench_events e ON e.n = 1 + s.v % 100000;
