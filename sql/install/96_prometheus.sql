-- Metrics in Prometheus's shapes, for prometheus-postgres-exporter
-- (docs/monitoring/qes_billing_queries.yaml reads these views; docs/operations.md,
-- "Monitoring").  The operator views of sql/install/95_metrics.sql and the
-- queue views look at the last hour or the last 30 days; Prometheus wants
-- counters that only ever grow (it computes rates and windows itself),
-- gauges for what is there now, and a histogram for latency.  So:
--
--   * counters count facts that never change once they happened: inbox rows
--     by Stripe event type (an event id is stored once), events applied and
--     requests succeeded (final states), and rows of the append-only audit
--     log (a request failed for good, an event parked, a dispute, a drift
--     repair).  A request an operator retries leaves the failed state, but
--     its audit row stays, so the failure counter never goes down (a drop
--     would read as a counter reset and a false spike in rate());
--   * webhook refusals are counted when billing.flush_webhook_rejections()
--     writes them to billing.webhook_rejections; the ones not written yet
--     are a separate gauge, because the sum of the two could go down for a
--     moment while a flush commits;
--   * labels take few values: plan, billing interval, status, kind, metric,
--     event type, refusal reason, failure category -- never a tenant.  The
--     subscribed event types, the refusal reasons and the failure
--     categories are listed even at zero, so that a first occurrence is a
--     rise that rate() and increase() see.
--
-- A view scans a table at most once; the queue gauges read the queues'
-- partial indexes.  Operators (qes_admin) read them; the exporter logs in
-- as a member of qes_monitor, which reads them and nothing else
-- (99_security.sql; docs/operations.md, "Monitoring").

-- Upper bounds (seconds) of the webhook latency histogram's buckets.
CREATE FUNCTION billing.prometheus_latency_buckets() RETURNS double precision[]
  LANGUAGE sql IMMUTABLE
RETURN '{0.05,0.1,0.25,0.5,1,2.5,5,10,30,60,300,900,3600}'::double precision[];
COMMENT ON FUNCTION billing.prometheus_latency_buckets() IS
  'Upper bounds in seconds of the buckets of qes_billing_webhook_latency_seconds (received -> applied).';

-- Per Stripe event type: received and applied (counters), ignored and
-- waiting now (gauges: an ignored or waiting event may still be applied
-- later, once what it names is mirrored), and the histogram of the time
-- from receipt to being applied (cumulative bucket counts in the bounds'
-- order, as the exporter's HISTOGRAM columns want them).  An event enters
-- the histogram once, when it is applied, so the histogram only grows.
-- One pass over the inbox groups events by type and by "ge", the number
-- of bucket bounds at or above the event's latency (width_bucket over the
-- negated bounds; NULL while not applied): bucket i (of n) holds the
-- events with ge > n - i.
CREATE VIEW billing.prometheus_webhook_events AS
WITH b AS MATERIALIZED (
  SELECT billing.prometheus_latency_buckets() AS le,
         ARRAY(SELECT -x FROM unnest(billing.prometheus_latency_buckets()) x ORDER BY 1) AS neg
), g AS MATERIALIZED (
  SELECT e.event_type,
         width_bucket(-l.s, b.neg) AS ge,
         count(*) AS received,
         count(l.s) AS applied,
         count(*) FILTER (WHERE e.state = 'ignored') AS ignored,
         count(*) FILTER (WHERE e.state = 'waiting') AS waiting,
         sum(l.s) AS seconds
    FROM billing.webhook_events e
   CROSS JOIN b
   CROSS JOIN LATERAL (SELECT CASE WHEN e.state = 'applied'
                                   THEN extract(epoch FROM e.applied_at - e.received_at)::double precision
                              END AS s) l
   GROUP BY e.event_type, width_bucket(-l.s, b.neg)
), types AS (
  SELECT t AS event_type FROM unnest(billing.webhook_event_types()) t
  UNION
  SELECT g.event_type FROM g
), totals AS (
  SELECT g.event_type, sum(g.received) AS received, sum(g.applied) AS applied, sum(g.ignored) AS ignored,
         sum(g.waiting) AS waiting, sum(g.seconds) AS seconds
    FROM g GROUP BY g.event_type
), cumulative AS (
  SELECT t.event_type, i.i,
         coalesce(sum(g.applied) FILTER (WHERE g.ge > cardinality(b.le) - i.i), 0)::bigint AS n
    FROM types t
   CROSS JOIN b
   CROSS JOIN generate_series(1, cardinality(b.le)) i
    LEFT JOIN g ON g.event_type = t.event_type
   GROUP BY t.event_type, i.i
), buckets AS (
  SELECT c.event_type, array_agg(c.n ORDER BY c.i) AS counts FROM cumulative c GROUP BY c.event_type
)
SELECT t.event_type AS type,
       coalesce(s.received, 0)::bigint AS events_received_total,
       coalesce(s.applied, 0)::bigint AS events_applied_total,
       coalesce(s.ignored, 0)::bigint AS events_ignored,
       coalesce(s.waiting, 0)::bigint AS events_waiting,
       b.le AS latency_seconds,
       k.counts AS latency_seconds_bucket,
       coalesce(s.seconds, 0)::double precision AS latency_seconds_sum,
       coalesce(s.applied, 0)::bigint AS latency_seconds_count
  FROM types t
 CROSS JOIN b
  JOIN buckets k ON k.event_type = t.event_type
  LEFT JOIN totals s ON s.event_type = t.event_type;
COMMENT ON VIEW billing.prometheus_webhook_events IS
  'Prometheus: per Stripe event type, inbox events received (a repeated delivery is not stored) and applied to a tenant of ours since the inbox began; events ignored (not about a tenant known to be ours) and waiting (for an object not mirrored yet) now; and the histogram of the time from receipt to being applied. The 16 subscribed types are listed even at zero.';

-- The inbox now (partial indexes make these cheap).
CREATE VIEW billing.prometheus_webhook_inbox AS
SELECT (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'received') AS pending,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'processing') AS processing,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'received' AND e.attempts > 0) AS retrying,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'needs_review') AS parked,
       (SELECT coalesce(extract(epoch FROM pg_catalog.now() - min(e.next_attempt_at)), 0)::double precision
          FROM billing.webhook_events e
         WHERE e.state = 'received' AND e.next_attempt_at <= pg_catalog.now()) AS oldest_due_age_seconds;
COMMENT ON VIEW billing.prometheus_webhook_inbox IS
  'Prometheus: inbox events waiting (pending, of which retrying after a failure), being applied, and parked (needs_review, an operator replays them); and for how long the longest-waiting due event has been due (0 when none is).';

-- Refusals by reason: written (a counter) and not yet written (a gauge).
-- The reasons are those of src/guard.c (reason_names); one added there
-- shows here once it occurs, and test/python/test_prometheus.py checks that
-- this list still matches.
CREATE VIEW billing.prometheus_webhook_rejections AS
WITH known(reason) AS (
  VALUES ('no_header'), ('malformed'), ('no_v1'), ('mismatch'), ('stale'), ('no_secret'), ('not_an_event'),
         ('wrong_mode'), ('bad_type'), ('bad_created'), ('bad_encoding'), ('escaped_key')
), written AS (
  SELECT r.reason, sum(r.deliveries) AS n FROM billing.webhook_rejections r GROUP BY r.reason
), pending AS (
  SELECT p.reason, sum(p.deliveries) AS n FROM billing.webhook_rejections_pending() p GROUP BY p.reason
)
SELECT k.reason,
       coalesce(w.n, 0)::bigint AS total,
       coalesce(p.n, 0)::bigint AS unflushed
  FROM (SELECT reason FROM known UNION SELECT reason FROM written UNION SELECT reason FROM pending) k
  LEFT JOIN written w ON w.reason = k.reason
  LEFT JOIN pending p ON p.reason = k.reason;
COMMENT ON VIEW billing.prometheus_webhook_rejections IS
  'Prometheus: webhook deliveries refused at intake, by reason: written to billing.webhook_rejections by billing.flush_webhook_rejections() (a counter) and counted in shared memory but not written yet (a gauge).';

-- The outbox: queue gauges (partial indexes) and two counters.
CREATE VIEW billing.prometheus_outbox AS
SELECT count(*) AS requests_created_total,
       count(*) FILTER (WHERE r.state = 'succeeded') AS requests_succeeded_total,
       count(*) FILTER (WHERE r.state = 'waiting') AS waiting,
       count(*) FILTER (WHERE r.state = 'pending') AS pending,
       count(*) FILTER (WHERE r.state = 'in_flight') AS in_flight,
       count(*) FILTER (WHERE r.state = 'pending' AND r.attempts > 0) AS retrying,
       count(*) FILTER (WHERE r.state = 'failed') AS failed,
       coalesce(extract(epoch FROM pg_catalog.now() - min(r.next_attempt_at)
                                   FILTER (WHERE r.state = 'pending' AND r.next_attempt_at <= pg_catalog.now())),
                0)::double precision AS oldest_due_age_seconds
  FROM billing.stripe_requests r;
COMMENT ON VIEW billing.prometheus_outbox IS
  'Prometheus: Stripe requests queued (all time) and succeeded (counters); now waiting for another request, pending (of which retrying), in flight, failed and not retried; and for how long the longest-waiting due request has been due (0 when none is).';

-- Final failures by category, from the audit log (stripe.request_failed):
-- the categories of billing.outbox_classify() plus apply, dependency and
-- expired (billing.outbox_claim).
CREATE VIEW billing.prometheus_outbox_failures AS
WITH known(category) AS (
  VALUES ('network'), ('conflict'), ('rate_limited'), ('server'), ('card'), ('authentication'), ('permission'),
         ('not_found'), ('invalid_request'), ('apply'), ('dependency'), ('expired')
), seen AS (
  SELECT coalesce(a.details -> 'error' ->> 'category', 'unknown') AS category, count(*) AS n
    FROM billing.audit_log a
   WHERE a.action = 'stripe.request_failed'
   GROUP BY 1
)
SELECT k.category, coalesce(s.n, 0)::bigint AS total
  FROM (SELECT category FROM known UNION SELECT category FROM seen) k
  LEFT JOIN seen s ON s.category = k.category;
COMMENT ON VIEW billing.prometheus_outbox_failures IS
  'Prometheus: Stripe requests that failed for good, by category (card declines are the customer''s; the others are ours or Stripe''s), counted from the append-only audit log so that a retry by an operator never lowers the count.';

-- Other facts from the audit log, one scan.  drift.repaired is written by
-- reconciliation (the drift feature); until it runs, the count is 0.
CREATE VIEW billing.prometheus_audit_counters AS
SELECT count(*) FILTER (WHERE a.action = 'webhook.parked') AS webhook_events_parked_total,
       count(*) FILTER (WHERE a.action = 'webhook.replayed') AS webhook_replays_total,
       count(*) FILTER (WHERE a.action = 'stripe.request_retried') AS outbox_requests_retried_total,
       count(*) FILTER (WHERE a.action = 'dunning.started') AS dunning_started_total,
       -- paid again, whether the tenant had been told of the failure or not
       count(*) FILTER (WHERE a.action IN ('dunning.recovered', 'dunning.recovered_before_known')) AS dunning_recovered_total,
       count(*) FILTER (WHERE a.action = 'dispute.created') AS disputes_total,
       count(*) FILTER (WHERE a.action = 'drift.repaired') AS drift_repairs_total,
       count(*) AS audit_events_total
  FROM billing.audit_log a;
COMMENT ON VIEW billing.prometheus_audit_counters IS
  'Prometheus: counters from the append-only audit log: webhook events parked and replays, outbox requests retried by an operator, dunning started and recovered, disputes, drift repairs made by reconciliation (drift.repaired), and all audit rows.';

-- The worker (billing.worker_status, whose "alive" is "up" here).
CREATE VIEW billing.prometheus_worker AS
SELECT (s.pid IS NOT NULL)::integer AS running,
       coalesce(s.alive, false)::integer AS up,
       extract(epoch FROM s.heartbeat_age)::double precision AS heartbeat_age_seconds,
       coalesce(extract(epoch FROM s.started_at), 0)::double precision AS start_time_seconds,
       coalesce(extract(epoch FROM s.last_loop_at), 0)::double precision AS last_loop_timestamp_seconds,
       w.extension_present::integer AS extension_present,
       s.loops AS loops_total,
       s.wake_requests AS wake_requests_total,
       s.latch_wakeups AS latch_wakeups_total,
       s.timeout_wakeups AS timeout_wakeups_total,
       s.reclaimed AS reclaimed_total,
       s.naptime_ms / 1000.0::double precision AS naptime_seconds,
       coalesce(extract(epoch FROM s.last_error_at), 0)::double precision AS last_error_timestamp_seconds
  FROM billing.worker_status s
 CROSS JOIN billing.worker_state() w;
COMMENT ON VIEW billing.prometheus_worker IS
  'Prometheus: the worker: running (a process), up (billing.worker_status.alive: running and looped lately), heartbeat age, start and last loop times, whether it found the extension, loops, wake-ups, rows reclaimed after a crash, naptime, time of its last error (times are 0 when there is none; the heartbeat age is NULL, NaN in Prometheus, before the first loop).';

-- Current subscriptions (billing.subscription_health), MRR in dollars.
CREATE VIEW billing.prometheus_subscriptions AS
SELECT h.plan_id AS plan, h.billing_interval, h.status,
       h.subscriptions AS current,
       h.cancelling_at_period_end AS cancel_at_period_end,
       h.in_grace_period,
       h.grace_period_over,
       h.mrr / 100.0::double precision AS mrr_usd
  FROM billing.subscription_health h;
COMMENT ON VIEW billing.prometheus_subscriptions IS
  'Prometheus: current subscriptions by plan, interval and status (billing.subscription_health), with monthly recurring revenue in US dollars.';

-- Payments by kind and current status (every payment mirrored).
CREATE VIEW billing.prometheus_payments AS
SELECT p.kind, p.status, count(*) AS current
  FROM billing.payments p
 GROUP BY p.kind, p.status;
COMMENT ON VIEW billing.prometheus_payments IS
  'Prometheus: payments mirrored from Stripe by kind (one_time, subscription) and current status. For success rates use the counters of payment_intent.succeeded and payment_intent.payment_failed events.';

-- Usage in the current periods (billing.usage_patterns).
-- (through a function that runs as the extension's owner: the view's
-- functions would be called with the reader's rights, and the exporter's
-- role may not call usage_current, which gives one tenant's usage)
CREATE FUNCTION billing.usage_patterns_now() RETURNS SETOF billing.usage_patterns
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$ SELECT * FROM billing.usage_patterns $$;
COMMENT ON FUNCTION billing.usage_patterns_now() IS
  'billing.usage_patterns, aggregated over every tenant, for billing.prometheus_usage (whose readers may not read one tenant''s usage).';

CREATE VIEW billing.prometheus_usage AS
SELECT u.metric, u.tenants, u.active_tenants,
       coalesce(u.used, 0)::double precision AS current_period,
       u.used_p50::double precision AS tenant_p50,
       u.used_p95::double precision AS tenant_p95,
       u.used_max::double precision AS tenant_max,
       u.near_limit AS tenants_near_limit,
       u.over_limit AS tenants_over_limit
  FROM billing.usage_patterns_now() u;
COMMENT ON VIEW billing.prometheus_usage IS
  'Prometheus: usage in each tenant''s current period by metric (billing.usage_patterns): tenants, active tenants, the sum, the per-tenant median, p95 and maximum, tenants near (80 %) and over their limit.';

-- Shared-memory usage counters (billing.usage_cache_stats()).
CREATE VIEW billing.prometheus_usage_cache AS
SELECT s.capacity, s.entries,
       s.hits AS hits_total, s.loads AS loads_total, s.uncached AS uncached_total,
       s.dropped AS dropped_total, s.swept AS swept_total, s.evicted AS evicted_total,
       s.bytes_per_counter AS entry_size_bytes
  FROM billing.usage_cache_stats() s;
COMMENT ON VIEW billing.prometheus_usage_cache IS
  'Prometheus: the shared-memory usage counters since the server started: capacity and entries, hits, builds from the table, uncached reads, entries dropped, swept and evicted, and the bytes one entry takes.';

-- Inbound rate limiting (billing.rate_limit_stats()).
CREATE VIEW billing.prometheus_rate_limit AS
SELECT s.allowed AS requests_allowed_total, s.limited AS requests_limited_total,
       s.overflowed AS requests_overflowed_total, s.slots_used AS buckets_used, s.slots AS buckets
  FROM billing.rate_limit_stats() s;
COMMENT ON VIEW billing.prometheus_rate_limit IS
  'Prometheus: inbound rate limiting since the server started: requests allowed, limited (429) and sharing the overflow bucket; token buckets in use and available.';

REVOKE ALL ON FUNCTION billing.prometheus_latency_buckets(), billing.usage_patterns_now() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing.prometheus_latency_buckets(), billing.webhook_event_types(),
                          billing.usage_patterns_now() TO qes_admin;
GRANT SELECT ON billing.prometheus_webhook_events, billing.prometheus_webhook_inbox,
                billing.prometheus_webhook_rejections, billing.prometheus_outbox,
                billing.prometheus_outbox_failures, billing.prometheus_audit_counters,
                billing.prometheus_worker, billing.prometheus_subscriptions, billing.prometheus_payments,
                billing.prometheus_usage, billing.prometheus_usage_cache, billing.prometheus_rate_limit
  TO qes_admin;
