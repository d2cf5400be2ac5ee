-- Usage metering and limit checks (src/usage.c, src/counters.c).
-- Billing periods are computed in UTC; so are this test's expectations.
-- The test runs at a fixed date through the billing clock (the day it runs
-- changes nothing): the evening of Mar 1 2028, the day after Feb 29 of a
-- leap year.
SET TimeZone = 'UTC';
SELECT billing.set_clock('2028-03-01 20:30:00+00' - now()) IS NOT NULL AS clock_set;
SELECT (billing.upsert_tenant('u_free', 'Free Co', 'f@u.example')).tenant_id,
       (billing.upsert_tenant('u_pro', 'Pro Co', 'p@u.example')).tenant_id,
       (billing.upsert_tenant('u_ent', 'Ent Co', 'e@u.example')).tenant_id;

-- a tenant with no subscription is on Free, billed per calendar month (UTC)
SELECT recorded, duplicate, metric, quantity, total, usage_limit, remaining, status, period_start, period_end
  FROM billing.record_usage('u_free', 'signatures', 3, 'sig-1');

-- the same key again: the original result, nothing added
SELECT recorded, duplicate, quantity, total, status FROM billing.record_usage('u_free', 'signatures', 3, 'sig-1');
-- the same key for different usage is refused
SELECT * FROM billing.record_usage('u_free', 'signatures', 4, 'sig-1');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM billing.record_usage('u_free', 'documents', 3, 'sig-1');

-- counters add up; statuses: ok below 80 %, warning from 80 % to 100 %, over the soft limit above
SELECT total, remaining, status FROM billing.record_usage('u_free', 'signatures', 4, 'sig-2');
SELECT total, remaining, status FROM billing.record_usage('u_free', 'signatures', 1, 'sig-3');
SELECT total, remaining, status FROM billing.record_usage('u_free', 'signatures', 2, 'sig-4');
SELECT total, remaining, status FROM billing.record_usage('u_free', 'signatures', 1, 'sig-5');

-- check_limit: soft limits allow, with the status and the upgrade prompt
SELECT allowed, status, current, usage_limit, remaining, plan_id, reason, upgrade
  FROM billing.check_limit('u_free', 'signatures');
SELECT allowed, status, current, upgrade IS NULL AS no_prompt FROM billing.check_limit('u_free', 'documents');
SELECT allowed, status, current FROM billing.check_limit('u_free', 'documents', 40);
SELECT status, upgrade ->> 'plan_id' AS offered, upgrade ->> 'limit' AS offered_limit
  FROM billing.check_limit('u_free', 'documents', 45);
SELECT allowed, status, current FROM billing.check_limit('u_free', 'api_calls', 0);

-- the gauge: the latest value counts, not the sum
SELECT total, status FROM billing.record_usage('u_free', 'storage', 900000000, 'st-1');
SELECT total, status FROM billing.record_usage('u_free', 'storage', 500000000, 'st-2');
SELECT total, status FROM billing.record_usage('u_free', 'storage', 0, 'st-3');
SELECT total, status FROM billing.record_usage('u_free', 'storage', 2000000000, 'st-4');
SELECT current, usage_limit, status FROM billing.check_limit('u_free', 'storage', 0);
-- a late report of an older value does not replace the newer one
SELECT recorded FROM billing.record_usage('u_free', 'storage', 5, 'st-old', NULL, billing.now() - interval '1 minute');
SELECT current FROM billing.check_limit('u_free', 'storage', 0);

-- Professional (a paid subscription): its limits and its own billing period
-- (anchored on Jan 31: Stripe bills on Feb 29, then on Mar 31); a plan change
-- is visible at once after commit
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, billing_cycle_anchor,
                                   current_period_start, current_period_end)
VALUES ('u_pro', 'professional', 'month', 'active', '2028-01-31 00:00+00', '2028-02-29 00:00+00', '2028-03-31 00:00+00');
SELECT plan_id, usage_limit, status FROM billing.check_limit('u_pro', 'signatures', 90);
SELECT period_start, period_end FROM billing.usage_current('u_pro') WHERE metric = 'signatures';
SELECT status, upgrade ->> 'plan_id' AS offered, upgrade -> 'limit' AS offered_limit, upgrade ->> 'monthly_price' AS price
  FROM billing.check_limit('u_pro', 'signatures', 95);
-- a period the subscription rolled over to without an update from Stripe yet:
-- the mirror still has [Jan 31, Feb 29); the period in force is the next one
UPDATE billing.subscriptions SET current_period_start = '2028-01-31 00:00+00', current_period_end = '2028-02-29 00:00+00'
 WHERE tenant_id = 'u_pro';
SELECT period_start AS rolled_forward, period_end FROM billing.usage_current('u_pro') WHERE metric = 'signatures';

-- Enterprise: unlimited counters are never blocked and prompt nothing
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, current_period_start, current_period_end)
VALUES ('u_ent', 'enterprise', 'year', 'active', '2028-02-20 00:00+00', '2029-02-20 00:00+00');
SELECT allowed, status, usage_limit, remaining, upgrade FROM billing.check_limit('u_ent', 'signatures', 1000000000);
SELECT total, usage_limit, status FROM billing.record_usage('u_ent', 'signatures', 1000000, 'ent-1');
SELECT status, upgrade FROM billing.check_limit('u_ent', 'storage', 100000000000);

-- a hard ceiling blocks past its percentage of the soft limit
UPDATE billing.plan_limits SET hard_limit_pct = 150 WHERE plan_id = 'free' AND metric = 'documents';
SELECT allowed, status FROM billing.check_limit('u_free', 'documents', 75);
SELECT allowed, status, upgrade ->> 'plan_id' AS offered FROM billing.check_limit('u_free', 'documents', 76);
UPDATE billing.plan_limits SET hard_limit_pct = NULL WHERE plan_id = 'free' AND metric = 'documents';
SELECT allowed, status FROM billing.check_limit('u_free', 'documents', 76);

-- limits follow the subscription's state
UPDATE billing.subscriptions SET status = 'past_due', grace_until = billing.now() + interval '2 days' WHERE tenant_id = 'u_pro';
SELECT plan_id, usage_limit, reason FROM billing.check_limit('u_pro', 'signatures');
UPDATE billing.subscriptions SET grace_until = billing.now() - interval '1 second' WHERE tenant_id = 'u_pro';
SELECT plan_id, usage_limit, reason FROM billing.check_limit('u_pro', 'signatures');
UPDATE billing.subscriptions SET status = 'incomplete', grace_until = NULL WHERE tenant_id = 'u_pro';
SELECT plan_id, usage_limit, reason FROM billing.check_limit('u_pro', 'signatures');
UPDATE billing.subscriptions SET status = 'active' WHERE tenant_id = 'u_pro';
SELECT plan_id, usage_limit, reason FROM billing.check_limit('u_pro', 'signatures');

-- rollback records nothing; a rolled-back savepoint takes its usage with it
BEGIN;
SELECT total FROM billing.record_usage('u_free', 'api_calls', 10, 'rb-1');
ROLLBACK;
SELECT current FROM billing.check_limit('u_free', 'api_calls', 0);
BEGIN;
SELECT total FROM billing.record_usage('u_free', 'api_calls', 1, 'sp-1');
SAVEPOINT s;
SELECT total FROM billing.record_usage('u_free', 'api_calls', 100, 'sp-2');
ROLLBACK TO SAVEPOINT s;
SELECT total FROM billing.record_usage('u_free', 'api_calls', 2, 'sp-3');
-- check_limit reads committed usage only
SELECT current FROM billing.check_limit('u_free', 'api_calls', 0);
COMMIT;
SELECT current FROM billing.check_limit('u_free', 'api_calls', 0);
SELECT count(*) AS rows_for_rolled_back_keys FROM billing.usage_events WHERE idempotency_key IN ('rb-1', 'sp-2');
-- a prepared transaction cannot carry usage (its commit would bypass the counters)
BEGIN;
SELECT recorded FROM billing.record_usage('u_free', 'api_calls', 1, 'prep-1');
PREPARE TRANSACTION 'with_usage';
SELECT count(*) AS prepared_rows FROM billing.usage_events WHERE idempotency_key = 'prep-1';

-- the billing clock moves the calendar period: a new month starts at zero
SELECT billing.set_clock('2028-04-01 10:00:00+00' - now()) IS NOT NULL AS moved;
SELECT used, period_start AS next_month, period_end
  FROM billing.usage_current('u_free') WHERE metric = 'signatures';
SELECT billing.set_clock('2028-03-01 21:30:00+00' - now()) IS NOT NULL AS back;
SELECT current FROM billing.check_limit('u_free', 'signatures', 0);

-- bad input: a clear error with its SQLSTATE, and nothing recorded
SELECT count(*) AS rows_before FROM billing.usage_events \gset
SELECT * FROM billing.record_usage('u_free', 'pages', 1, 'bad-1');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM billing.record_usage('u_free', 'signatures', 0, 'bad-2');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM billing.record_usage('u_free', 'signatures', -5, 'bad-3');
SELECT * FROM billing.record_usage('u_free', 'storage', -1, 'bad-4');
SELECT * FROM billing.record_usage('nobody', 'signatures', 1, 'bad-5');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM billing.record_usage('u_free', 'signatures', 1, '');
SELECT * FROM billing.record_usage('u_free', 'signatures', 1, repeat('k', 256));
SELECT * FROM billing.record_usage('u_free', 'signatures', 1, 'bad-6', jsonb_build_object('blob', repeat('x', 5000)));
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM billing.record_usage('u_free', 'signatures', 1, 'bad-7', '[1, 2]');
\set VERBOSITY terse
SELECT * FROM billing.record_usage('u_free', 'signatures', 1, 'bad-8', NULL, billing.now() + interval '1 day');
\set VERBOSITY default
SELECT * FROM billing.record_usage(NULL, 'signatures', 1, 'bad-9');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM billing.record_usage('u_free', 'signatures', 1, NULL);
SELECT * FROM billing.check_limit('u_free', 'pages');
SELECT * FROM billing.check_limit('u_free', 'signatures', -1);
SELECT * FROM billing.check_limit('nobody', 'signatures');
SELECT count(*) - :rows_before AS rows_added FROM billing.usage_events;

-- the report's view of the current period: every metric, with percent
SELECT metric, used, usage_limit, percent, status, plan_id, reason FROM billing.usage_current('u_free');
SELECT metric, used, usage_limit, percent, status FROM billing.usage_current('u_ent');
SELECT * FROM billing.usage_current('nobody');

-- batches: the same guarantees per event; duplicates reported, not counted
SELECT * FROM billing.record_usage_batch('u_free', '[
  {"metric": "documents", "quantity": 2, "idempotency_key": "b-1"},
  {"metric": "documents", "quantity": 3, "idempotency_key": "b-2", "metadata": {"doc": "x"}},
  {"metric": "documents", "quantity": 2, "idempotency_key": "b-1"},
  {"metric": "signatures", "quantity": 3, "idempotency_key": "sig-1"}
]');
SELECT * FROM billing.record_usage_batch('u_free', '{"metric": "documents"}');
SELECT * FROM billing.record_usage_batch('u_free', '[{"metric": "documents", "quantity": 1}]');
-- a bad event fails the whole batch
SELECT * FROM billing.record_usage_batch('u_free', '[
  {"metric": "documents", "quantity": 1, "idempotency_key": "b-3"},
  {"metric": "pages", "quantity": 1, "idempotency_key": "b-4"}]');
SELECT count(*) AS batch_rows FROM billing.usage_events WHERE idempotency_key IN ('b-3', 'b-4');

-- one notification per tenant, metric, period and threshold
SELECT tenant_id, kind, payload ->> 'metric' AS metric, payload ->> 'threshold_percent' AS threshold, payload ->> 'total' AS total
  FROM billing.notifications ORDER BY notification_id;

-- the counters agree with the table
SELECT u.tenant_id, u.metric, sum(u.quantity) AS table_total,
       (billing.check_limit(u.tenant_id, u.metric, 0)).current AS counter_total
  FROM billing.usage_events u JOIN billing.metrics m USING (metric)
 WHERE m.kind = 'counter' AND u.period_start = (SELECT c.period_start FROM billing.usage_current(u.tenant_id) c LIMIT 1)
 GROUP BY 1, 2 ORDER BY 1, 2;
-- ... also after they are forgotten and rebuilt from the table
DELETE FROM billing.usage_events WHERE idempotency_key = 'sig-5';
SELECT current FROM billing.check_limit('u_free', 'signatures', 0);
SELECT entries > 0 AS cached, loads > 0 AS built_from_table FROM billing.usage_cache_stats();

-- GET /usage: the calling tenant's periods, nobody else's
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_tenant', true) IS NOT NULL AS r,
       set_config('request.jwt.claims', '{"role":"qes_tenant","tenant_id":"u_free"}', true) IS NOT NULL AS c;
SELECT is_current, metric, used, usage_limit, percent, status FROM api.usage ORDER BY is_current DESC, metric;
COMMIT;
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_tenant', true) IS NOT NULL AS r,
       set_config('request.jwt.claims', '{"role":"qes_tenant","tenant_id":"u_ent"}', true) IS NOT NULL AS c;
SELECT metric, used, usage_limit, status FROM api.usage WHERE is_current ORDER BY metric;
-- tenants cannot record or check usage themselves
SELECT * FROM billing.check_limit('u_ent', 'signatures');
ROLLBACK;
-- back to the real clock for the tests after this one
SELECT billing.set_clock('0') IS NOT NULL AS clock_reset;
