-- Operator metrics: subscription health, payment success and usage
-- patterns (webhook and outbox metrics are next to their queues:
-- billing.webhook_metrics, billing.outbox_metrics).  Views over the
-- mirrored tables; qes_admin may read them.

CREATE VIEW billing.subscription_health AS
SELECT s.plan_id,
       s.billing_interval,
       s.status,
       count(*) AS subscriptions,
       count(*) FILTER (WHERE s.cancel_at_period_end) AS cancelling_at_period_end,
       count(*) FILTER (WHERE s.status = 'past_due' AND s.grace_until > billing.now()) AS in_grace_period,
       count(*) FILTER (WHERE s.status = 'past_due' AND s.grace_until <= billing.now()) AS grace_period_over,
       -- monthly recurring revenue in the smallest currency unit (yearly prices / 12)
       coalesce(sum(CASE WHEN s.status IN ('active', 'trialing', 'past_due')
                         THEN pr.unit_amount / CASE s.billing_interval WHEN 'year' THEN 12.0 ELSE 1 END END), 0)::bigint AS mrr
  FROM billing.subscriptions s
  LEFT JOIN billing.prices pr
         ON pr.plan_id = s.plan_id AND pr.billing_interval = s.billing_interval AND pr.active AND pr.currency = 'usd'
 WHERE s.status NOT IN ('canceled', 'incomplete_expired')
 GROUP BY s.plan_id, s.billing_interval, s.status;
COMMENT ON VIEW billing.subscription_health IS
  'Current subscriptions by plan, interval and Stripe status: how many, cancelling at period end, past due within and after the grace period, and monthly recurring revenue (cents; yearly prices / 12).';

CREATE VIEW billing.payment_metrics AS
SELECT p.kind,
       count(*) AS payments,
       count(*) FILTER (WHERE p.status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE p.status = 'failed') AS failed,
       round(count(*) FILTER (WHERE p.status = 'succeeded')::numeric
             / nullif(count(*) FILTER (WHERE p.status IN ('succeeded', 'failed')), 0), 3) AS success_rate,
       coalesce(sum(p.amount) FILTER (WHERE p.status = 'succeeded'), 0) AS amount_collected,
       mode() WITHIN GROUP (ORDER BY p.failure_code) FILTER (WHERE p.status = 'failed') AS commonest_failure,
       (SELECT count(*) FROM billing.disputes d WHERE d.recorded_at > pg_catalog.now() - interval '30 days') AS disputes
  FROM billing.payments p
 WHERE p.created_at > pg_catalog.now() - interval '30 days'
 GROUP BY p.kind;
COMMENT ON VIEW billing.payment_metrics IS
  'Payments of the last 30 days by kind (one_time, subscription): succeeded, failed, success rate of those decided, amount collected (smallest unit, mixed currencies summed as is), the commonest failure code, and disputes recorded.';

CREATE VIEW billing.usage_patterns AS
SELECT u.metric,
       count(*) AS tenants,
       count(*) FILTER (WHERE u.used > 0) AS active_tenants,
       sum(u.used) AS used,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY u.used) AS used_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY u.used) AS used_p95,
       max(u.used) AS used_max,
       count(*) FILTER (WHERE u.status = 'warning') AS near_limit,
       count(*) FILTER (WHERE u.status IN ('over_soft_limit', 'blocked')) AS over_limit
  FROM billing.tenants t
 CROSS JOIN LATERAL billing.usage_current(t.tenant_id) u
 GROUP BY u.metric;
COMMENT ON VIEW billing.usage_patterns IS
  'Usage in each tenant''s current billing period, by metric: tenants, active tenants, total, per-tenant p50/p95/max, and how many are near (80 %) or over their limit (the upgrade candidates).';
