-- Operator metrics over what the earlier tests left: subscriptions
-- (sql/outbox.sql), payments, usage (sql/usage.sql).  Usage counts in the
-- current period: the billing clock reads sql/usage.sql's date (an hour on).
SELECT billing.set_clock('2028-03-01 22:00:00+00' - now()) IS NOT NULL AS clock_set;
SELECT plan_id, billing_interval, status, subscriptions, cancelling_at_period_end, in_grace_period, mrr
  FROM billing.subscription_health ORDER BY plan_id, billing_interval, status;
SELECT kind, payments, succeeded, failed, success_rate, amount_collected, commonest_failure
  FROM billing.payment_metrics ORDER BY kind;
SELECT metric, tenants >= active_tenants AS consistent, active_tenants > 0 AS some_active, used_max >= used_p50 AS ordered
  FROM billing.usage_patterns ORDER BY metric;
-- a past-due subscription counts in its grace period, and its revenue stays
BEGIN;
UPDATE billing.subscriptions SET status = 'past_due', grace_until = billing.now() + interval '7 days'
 WHERE tenant_id = 'acme' AND status = 'active';
SELECT plan_id, status, in_grace_period, grace_period_over, mrr FROM billing.subscription_health WHERE status = 'past_due';
ROLLBACK;
-- operators read them; tenants do not
SELECT has_table_privilege('qes_admin', 'billing.subscription_health', 'SELECT') AS admin,
       has_table_privilege('qes_tenant', 'billing.payment_metrics', 'SELECT') AS tenant;
SELECT billing.set_clock('0') IS NOT NULL AS clock_reset;
