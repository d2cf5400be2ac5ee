-- webhooks: Stripe (played here by SQL) sends signed events for the demo tenant
\set QUIET on
\pset footer off
CREATE EXTENSION IF NOT EXISTS pgcrypto;
UPDATE billing.tenants SET stripe_customer_id = 'cus_demo' WHERE tenant_id = 'demo';
-- what Stripe does: sign "t.body" with the endpoint secret, POST it; what
-- PostgREST does: set the request headers, call api.stripe_webhook as the anonymous role
CREATE FUNCTION pg_temp.stripe_sends(p_type text, p_object jsonb, p_offset integer DEFAULT 0) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  t bigint := extract(epoch FROM now())::bigint + p_offset;
  body text := json_build_object('id', 'evt_demo_' || md5(random()::text), 'object', 'event', 'type', p_type,
                                 'created', t, 'livemode', false, 'api_version', '2024-06-20',
                                 'data', json_build_object('object', p_object))::text;
  secret text := split_part(current_setting('qes_demo.webhook_secret'), ',', 1);
  r json;
BEGIN
  PERFORM set_config('request.headers', json_build_object('stripe-signature',
            't=' || t || ',v1=' || encode(hmac(t || '.' || body, secret, 'sha256'), 'hex'))::text, true);
  SET LOCAL ROLE qes_anon;
  r := api.stripe_webhook(body::json);
  RESET ROLE;
  RETURN p_type || ' -> ' || coalesce(nullif(current_setting('response.status', true), ''), '200') || ' ' || r::text;
END $$;
\echo 'Stripe delivers: subscribe to Professional, first invoice paid, a one-time payment:'
BEGIN;
SELECT pg_temp.stripe_sends('customer.subscription.created', jsonb_build_object('id', 'sub_demo', 'object', 'subscription',
  'customer', 'cus_demo', 'status', 'active', 'metadata', jsonb_build_object('tenant_id', 'demo'), 'cancel_at_period_end', false,
  'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object('current_period_start', extract(epoch FROM date_trunc('day', now()))::bigint,
    'current_period_end', extract(epoch FROM date_trunc('day', now()) + interval '1 month')::bigint,
    'price', jsonb_build_object('id', 'price_pro_m', 'lookup_key', 'professional_monthly', 'recurring', jsonb_build_object('interval', 'month')))))), 1) AS delivered
UNION ALL
SELECT pg_temp.stripe_sends('invoice.paid', jsonb_build_object('id', 'in_demo_1', 'object', 'invoice', 'customer', 'cus_demo',
  'subscription', 'sub_demo', 'status', 'paid', 'number', 'DEMO-0001', 'currency', 'usd', 'amount_due', 2900, 'amount_paid', 2900,
  'amount_remaining', 0, 'created', extract(epoch FROM now())::bigint, 'hosted_invoice_url', 'https://invoice.stripe.com/i/demo'), 2)
UNION ALL
SELECT pg_temp.stripe_sends('payment_intent.succeeded', jsonb_build_object('id', 'pi_demo_1', 'object', 'payment_intent',
  'customer', 'cus_demo', 'amount', 4900, 'currency', 'usd', 'status', 'succeeded', 'description', 'Qualified timestamp bundle',
  'metadata', jsonb_build_object('tenant_id', 'demo')), 3);
COMMIT;
\echo 'and a forged delivery:'
BEGIN;
SELECT set_config('request.headers', '{"stripe-signature": "t=1,v1=00"}', true) AS forged \gset
SET LOCAL ROLE qes_anon;
SELECT api.stripe_webhook('{"id": "evt_forged", "type": "invoice.paid"}') AS "forged delivery",
       current_setting('response.status', true) AS status;
COMMIT;
SELECT pg_sleep(1.5) AS slept \gset
\echo 'the worker applied them: the subscription, GET /invoices, payments:'
SELECT plan_id, billing_interval, status, current_period_end::date AS renews FROM billing.subscriptions WHERE tenant_id = 'demo' AND status <> 'canceled';
SELECT usage_limit AS "signature limit now" FROM billing.check_limit('demo', 'signatures', 0);
BEGIN;
SELECT set_config('role', 'qes_tenant', true) AS r, set_config('request.jwt.claims', '{"role": "qes_tenant", "tenant_id": "demo"}', true) AS c \gset
SELECT invoice_id, number, status, amount_paid, currency FROM api.invoices;
COMMIT;
SELECT kind, amount, status, description FROM billing.payments WHERE tenant_id = 'demo';
\echo 'a renewal fails: past due, grace period, paid limits kept; then paid: active again'
BEGIN;
SELECT pg_temp.stripe_sends('invoice.payment_failed', jsonb_build_object('id', 'in_demo_2', 'object', 'invoice', 'customer', 'cus_demo',
  'subscription', 'sub_demo', 'status', 'open', 'number', 'DEMO-0002', 'currency', 'usd', 'amount_due', 2900, 'amount_paid', 0,
  'amount_remaining', 2900, 'created', extract(epoch FROM now())::bigint), 10) AS delivered;
COMMIT;
SELECT pg_sleep(1.5) AS slept \gset
SELECT status, grace_until::date AS grace_until, (billing.check_limit('demo', 'signatures', 0)).usage_limit AS limit_during_grace
  FROM billing.subscriptions WHERE tenant_id = 'demo' AND status <> 'canceled';
BEGIN;
SELECT pg_temp.stripe_sends('invoice.paid', jsonb_build_object('id', 'in_demo_2', 'object', 'invoice', 'customer', 'cus_demo',
  'subscription', 'sub_demo', 'status', 'paid', 'number', 'DEMO-0002', 'currency', 'usd', 'amount_due', 2900, 'amount_paid', 2900,
  'amount_remaining', 0, 'created', extract(epoch FROM now())::bigint), 20) AS delivered;
COMMIT;
SELECT pg_sleep(1.5) AS slept \gset
SELECT status, grace_until FROM billing.subscriptions WHERE tenant_id = 'demo' AND status <> 'canceled';
SELECT action, tenant_id, details ->> 'reason' AS reason FROM billing.audit_log
 WHERE action IN ('dunning.started', 'dunning.recovered', 'webhook.rejected') ORDER BY audit_id;
SELECT applied_last_hour, round(latency_p50_s::numeric, 3) AS latency_p50_s, parked, rejected_last_hour FROM billing.webhook_metrics;
