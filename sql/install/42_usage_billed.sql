-- What will be billed through Stripe Billing Meters so far this period (the
-- sending: 94_meters.sql); GET /usage shows it beside the limits.

-- What will be billed so far this period, per billable metric: used, the
-- included quantity, the billable units and their amount at the price.
CREATE FUNCTION billing.usage_billable(p_tenant text)
  RETURNS TABLE (metric text, period_start timestamptz, used bigint, included bigint, billable bigint,
                 unit_amount_decimal numeric, amount numeric, currency text, sent bigint)
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
BEGIN
  -- most tenants are billed by usage for nothing: answer without the
  -- usage_current call (GET /usage asks for every tenant)
  IF NOT EXISTS (SELECT 1 FROM billing.subscriptions s
                   LEFT JOIN billing.prices pr ON pr.stripe_price_id = s.stripe_price_id
                   JOIN billing.metered_prices mp ON mp.plan_id = s.plan_id AND mp.billing_interval = s.billing_interval
                                                 AND mp.currency = coalesce(pr.currency, 'usd') AND mp.active
                  WHERE s.tenant_id = p_tenant AND s.stripe_subscription_id IS NOT NULL
                    AND s.status IN ('trialing', 'active', 'past_due')) THEN
    RETURN;
  END IF;
  RETURN QUERY
  SELECT c.metric, c.period_start, c.used, mp.included, greatest(c.used - mp.included, 0),
         mp.unit_amount_decimal, round(greatest(c.used - mp.included, 0) * mp.unit_amount_decimal, 6), mp.currency,
         (SELECT CASE WHEN m.kind = 'gauge'
                      THEN (SELECT e.value FROM billing.meter_events e
                             WHERE e.tenant_id = p_tenant AND e.metric = c.metric AND e.period_start = c.period_start
                               AND e.state = 'delivered' ORDER BY e.event_at DESC LIMIT 1)
                      ELSE (SELECT sum(e.value)::bigint FROM billing.meter_events e
                             WHERE e.tenant_id = p_tenant AND e.metric = c.metric AND e.period_start = c.period_start
                               AND e.state = 'delivered') END
            FROM billing.metrics m WHERE m.metric = c.metric)
    FROM billing.usage_current(p_tenant) c
    JOIN billing.subscriptions s ON s.tenant_id = p_tenant AND s.stripe_subscription_id IS NOT NULL
                                AND s.status IN ('trialing', 'active', 'past_due')
    -- the metered price in the subscription's currency (that of its licensed
    -- price; usd, the one subscriptions are made in, when it is not known
    -- here), as the meter pass picks it (billing.meter_unsent, 94_meters.sql)
    LEFT JOIN billing.prices pr ON pr.stripe_price_id = s.stripe_price_id
    JOIN billing.metered_prices mp ON mp.plan_id = s.plan_id AND mp.billing_interval = s.billing_interval
                                  AND mp.metric = c.metric AND mp.currency = coalesce(pr.currency, 'usd') AND mp.active
   ORDER BY c.metric;
END
$$;
COMMENT ON FUNCTION billing.usage_billable(text) IS
  'What will be billed through meters so far this period, per billable metric: used, included, billable units, their amount (smallest currency unit) and what Stripe has been sent.';

CREATE FUNCTION billing.my_usage_billable()
  RETURNS TABLE (metric text, period_start timestamptz, used bigint, included bigint, billable bigint,
                 unit_amount_decimal numeric, amount numeric, currency text, sent bigint)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$ SELECT * FROM billing.usage_billable(billing.jwt_tenant_id()) $$;
COMMENT ON FUNCTION billing.my_usage_billable() IS 'usage_billable() for the tenant named by the request''s JWT.';
