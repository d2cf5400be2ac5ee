-- the intake's own table as a ceiling: a plain INSERT of the same event
-- (its id, type, mode, time and payload) into billing.webhook_events, with
-- its indexes, constraints and defaults, without verifying or scanning it
INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, stripe_created, payload)
SELECT 'evt_bench_' || e.n, 'invoice.paid', false, now(), e.body::json
  FROM bench_events e WHERE e.n = (SELECT nextval('bench_plain_seq'));
