-- Schema api: what PostgREST exposes.  Every object has a COMMENT (it
-- becomes the OpenAPI description).

CREATE VIEW api.plans AS
SELECT p.plan_id,
       p.name,
       p.tier,
       p.description,
       p.features,
       (SELECT pr.unit_amount FROM billing.prices pr
         WHERE pr.plan_id = p.plan_id AND pr.billing_interval = 'month' AND pr.active AND pr.currency = 'usd') AS monthly_price,
       (SELECT pr.unit_amount FROM billing.prices pr
         WHERE pr.plan_id = p.plan_id AND pr.billing_interval = 'year' AND pr.active AND pr.currency = 'usd') AS yearly_price,
       'usd'::text AS currency,
       (SELECT jsonb_object_agg(l.metric, l.soft_limit) FROM billing.plan_limits l
         WHERE l.plan_id = p.plan_id) AS limits
  FROM billing.plans p
 WHERE p.active;
COMMENT ON VIEW api.plans IS
  'The plan catalog: prices in the smallest currency unit (cents) per month and per year, and per-period limits by metric (null = unlimited; storage in bytes).';

CREATE VIEW api.tenant WITH (security_invoker = true) AS
SELECT t.tenant_id,
       t.name,
       t.billing_email,
       t.stripe_customer_id IS NOT NULL AS has_stripe_customer,
       t.disputed,
       t.created_at
  FROM billing.tenants t;
COMMENT ON VIEW api.tenant IS 'The calling tenant (row-level security on the JWT''s tenant_id claim).';

CREATE VIEW api.usage WITH (security_invoker = true) AS
SELECT u.period_start, u.period_end, u.is_current, u.metric, u.used, u.usage_limit, u.percent, u.status,
       b.included AS billed_beyond, b.billable, b.amount AS billable_amount, b.currency AS billable_currency,
       b.sent AS sent_to_stripe
  FROM billing.my_usage() u
  LEFT JOIN billing.my_usage_billable() b ON u.is_current AND b.metric = u.metric;
COMMENT ON VIEW api.usage IS
  'The calling tenant''s usage: the current billing period per metric (used, usage_limit (null = unlimited), percent, status: ok, warning, over_soft_limit, blocked) and the totals of earlier periods (is_current = false). A metric billed by usage (Stripe Billing Meters) also shows what will be billed so far this period: the units included (billed_beyond), the billable units, their amount (smallest currency unit, billable_currency) and how many Stripe has been sent; null when not billed by usage.';

CREATE VIEW api.invoices WITH (security_invoker = true) AS
SELECT i.stripe_invoice_id AS invoice_id, i.number, i.status, i.amount_due, i.amount_paid, i.amount_remaining,
       i.currency, i.period_start, i.period_end, i.hosted_invoice_url, i.invoice_pdf, i.stripe_created AS created,
       (SELECT jsonb_agg(jsonb_build_object('metric', l.metric, 'description', l.description, 'quantity', l.quantity,
                                            'amount', l.amount, 'period_start', l.period_start, 'period_end', l.period_end)
                         ORDER BY l.period_start, l.line_id)
          FROM billing.invoice_lines l
         WHERE l.tenant_id = i.tenant_id AND l.stripe_invoice_id = i.stripe_invoice_id AND l.metered) AS usage_lines,
       x.subtotal, x.tax, x.total, x.automatic_tax_status,
       CASE WHEN x.finalized_without_tax THEN x.automatic_tax_disabled_reason END AS tax_missing_reason,
       x.tax_lines
  FROM billing.invoices i
  LEFT JOIN billing.invoice_taxes x ON x.tenant_id = i.tenant_id AND x.stripe_invoice_id = i.stripe_invoice_id
 ORDER BY i.stripe_created DESC, i.stripe_invoice_id DESC;
COMMENT ON VIEW api.invoices IS
  'The calling tenant''s invoices, mirrored from Stripe, newest first (amounts in the smallest currency unit). usage_lines: the usage Stripe billed on it through meters (metric, quantity, amount, period), as its newest event showed. subtotal, tax, total and per line the tax amounts with their rate or taxability reason (tax_lines); automatic_tax_status (complete, failed, requires_location_inputs); tax_missing_reason when Stripe finalized it without tax (finalization_requires_location_inputs: the billing address was missing). Page with limit and offset.';

CREATE FUNCTION api.config() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_base text := rtrim(billing.base_url(), '/');
BEGIN
  RETURN json_build_object(
    'environment', billing.environment(),
    'stripe_mode', billing.stripe_mode(),
    'publishable_key', billing.publishable_key(),
    'base_url', v_base,
    'webhook_url', v_base || '/api/v1/billing/webhooks/stripe',
    'stripe_api_version', current_setting('qes_billing.stripe_api_version'),
    'plans', (SELECT json_agg(p ORDER BY p.tier) FROM api.plans p));
END
$$;
COMMENT ON FUNCTION api.config() IS
  'Public billing configuration: environment, Stripe mode, publishable key, base and webhook URLs, plans. Never a secret.';

CREATE FUNCTION api.health() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  w billing.worker_status;
  v_problem text := billing.stripe_key_problem('secret');
  v_healthy boolean;
BEGIN
  SELECT * INTO w FROM billing.worker_status;
  v_healthy := coalesce(w.alive, false) AND v_problem IS NULL;
  IF NOT v_healthy THEN
    PERFORM set_config('response.status', '503', true);
  END IF;
  RETURN json_build_object(
    'status', CASE WHEN v_healthy THEN 'ok' ELSE 'unhealthy' END,
    'database', true,
    'worker', json_build_object(
      'alive', coalesce(w.alive, false),
      'heartbeat_age_seconds', round(extract(epoch FROM w.heartbeat_age)::numeric, 3),
      'last_error', w.last_error),
    'stripe', json_build_object(
      'configured', v_problem IS NULL,
      'mode', billing.stripe_mode(),
      'problem', v_problem),
    'outbox_backlog', w.outbox_pending + w.outbox_in_flight,
    'inbox_backlog', w.inbox_pending,
    'webhooks_parked', w.inbox_parked);
END
$$;
COMMENT ON FUNCTION api.health() IS
  'Health: database, worker heartbeat, Stripe configuration and queue backlogs. HTTP 503 when unhealthy, 200 otherwise.';
