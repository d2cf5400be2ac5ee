-- Subscriptions and one-time payments for the calling tenant (PostgREST:
-- POST /rpc/create_subscription, GET /subscription, POST
-- /rpc/update_subscription, POST /rpc/create_payment_intent, GET /payments).
-- Each call validates everything before it writes anything, queues its
-- Stripe requests in the caller's transaction (the worker sends them after
-- COMMIT) and writes one audit row.  Local plan and limits change only when
-- Stripe confirms (billing.outbox_apply, or the webhook).

-- The calling tenant, from the JWT, or an error.
CREATE FUNCTION billing.calling_tenant() RETURNS billing.tenants
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_id text := billing.jwt_tenant_id();
  t billing.tenants;
BEGIN
  IF v_id IS NULL THEN
    RAISE EXCEPTION 'no tenant in the request'
      USING ERRCODE = 'insufficient_privilege', HINT = 'Call with a JWT that carries a tenant_id claim.';
  END IF;
  SELECT * INTO t FROM billing.tenants WHERE tenant_id = v_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'tenant % is not registered for billing', v_id
      USING ERRCODE = 'insufficient_privilege', HINT = 'The platform registers tenants with billing.upsert_tenant().';
  END IF;
  RETURN t;
END
$$;

CREATE FUNCTION billing.current_subscription(p_tenant text) RETURNS billing.subscriptions
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT * FROM billing.subscriptions s
   WHERE s.tenant_id = p_tenant AND s.status NOT IN ('canceled', 'incomplete_expired')
   ORDER BY s.subscription_id DESC LIMIT 1
$$;

CREATE FUNCTION billing.check_plan_interval(p_plan text, p_interval text) RETURNS billing.prices
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  pr billing.prices;
BEGIN
  IF p_plan IS NULL OR NOT EXISTS (SELECT 1 FROM billing.plans WHERE plan_id = p_plan AND active) THEN
    RAISE EXCEPTION 'unknown plan: %', coalesce(quote_literal(p_plan), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Plans: ' || (SELECT string_agg(plan_id, ', ' ORDER BY tier) FROM billing.plans WHERE active) || '.';
  END IF;
  IF p_interval IS NULL OR p_interval NOT IN ('month', 'year') THEN
    RAISE EXCEPTION 'unknown billing interval: %', coalesce(quote_literal(p_interval), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'The interval is month or year.';
  END IF;
  SELECT * INTO pr FROM billing.prices
   WHERE plan_id = p_plan AND billing_interval = p_interval AND active AND currency = 'usd';
  IF NOT FOUND THEN
    RAISE EXCEPTION 'plan % has no % price', p_plan, p_interval USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF pr.unit_amount > 0 AND pr.stripe_price_id IS NULL THEN
    RAISE EXCEPTION 'plan % (%) is not set up in Stripe yet', p_plan, p_interval
      USING ERRCODE = 'invalid_parameter_value', HINT = 'An operator runs: qes_billing_setup --setup-products.';
  END IF;
  RETURN pr;
END
$$;

-- The tenant's Stripe customer, or the queued request that creates it.
CREATE FUNCTION billing.customer_request(t billing.tenants) RETURNS bigint
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
AS $$
  SELECT CASE WHEN t.stripe_customer_id IS NULL THEN
    billing.outbox_enqueue_once(t.tenant_id, 'customer.create', 'POST', '/v1/customers',
                                jsonb_build_object('name', t.name, 'email', t.billing_email,
                                                   'metadata', jsonb_build_object('tenant_id', t.tenant_id)))
  END
$$;

CREATE FUNCTION api.create_subscription(plan text, "interval" text DEFAULT 'month') RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  t      billing.tenants := billing.calling_tenant();
  pr     billing.prices := billing.check_plan_interval(plan, "interval");
  cur    billing.subscriptions := billing.current_subscription(t.tenant_id);
  v_sub  billing.subscriptions;
  v_cust bigint;
  v_req  bigint;
BEGIN
  -- an earlier attempt may have created it in Stripe: not a second one while that is checked
  PERFORM billing.check_no_unknown_outcome(t.tenant_id, 'subscription.create');
  IF cur.subscription_id IS NOT NULL AND (cur.stripe_subscription_id IS NOT NULL OR cur.plan_id <> 'free') THEN
    RAISE EXCEPTION 'tenant % already has a subscription (plan %, status %)', t.tenant_id, cur.plan_id, cur.status
      USING ERRCODE = 'unique_violation', HINT = 'Change it with POST /rpc/update_subscription.';
  END IF;
  IF pr.unit_amount = 0 THEN
    IF cur.subscription_id IS NOT NULL THEN
      RAISE EXCEPTION 'tenant % is already on the % plan', t.tenant_id, cur.plan_id
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Choose a paid plan to upgrade.';
    END IF;
    INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status)
    VALUES (t.tenant_id, pr.plan_id, pr.billing_interval, 'active') RETURNING * INTO v_sub;
    PERFORM billing.audit_features(t.tenant_id, v_sub.subscription_id, NULL, NULL, v_sub.plan_id, v_sub.status);
    PERFORM billing.audit('subscription.created', t.tenant_id,
                          jsonb_build_object('subscription_id', v_sub.subscription_id, 'plan', pr.plan_id,
                                             'interval', pr.billing_interval, 'local', true));
  ELSE
    -- the local Free subscription ends; the paid one waits for its first payment
    UPDATE billing.subscriptions SET status = 'canceled', updated_at = now()
     WHERE tenant_id = t.tenant_id AND subscription_id = cur.subscription_id;
    INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status)
    VALUES (t.tenant_id, pr.plan_id, pr.billing_interval, 'incomplete') RETURNING * INTO v_sub;
    PERFORM billing.audit_features(t.tenant_id, v_sub.subscription_id, NULL, NULL, v_sub.plan_id, v_sub.status);
    v_cust := billing.customer_request(t);
    v_req := billing.outbox_enqueue(t.tenant_id, 'subscription.create', 'POST', '/v1/subscriptions',
               jsonb_build_object('items', jsonb_build_array(jsonb_build_object('price', pr.stripe_price_id))
                                           || billing.metered_items_for(pr.plan_id, pr.billing_interval),
                                  'payment_behavior', 'default_incomplete',
                                  'payment_settings', jsonb_build_object('save_default_payment_method', 'on_subscription'),
                                  'expand', jsonb_build_array('latest_invoice.payment_intent'),
                                  'metadata', jsonb_build_object('tenant_id', t.tenant_id,
                                                                 'subscription_id', v_sub.subscription_id))
               -- VAT through Stripe Tax (sql/install/91_tax.sql)
               || CASE WHEN current_setting('qes_billing.automatic_tax')::boolean
                       THEN '{"automatic_tax": {"enabled": true}}'::jsonb ELSE '{}' END
               || CASE WHEN v_cust IS NULL THEN jsonb_build_object('customer', t.stripe_customer_id) ELSE '{}' END,
               jsonb_build_object('subscription_id', v_sub.subscription_id),
               p_after => v_cust, p_inherit => CASE WHEN v_cust IS NOT NULL THEN 'customer' END);
    PERFORM billing.audit('subscription.create_requested', t.tenant_id,
                          jsonb_build_object('subscription_id', v_sub.subscription_id, 'plan', pr.plan_id,
                                             'interval', pr.billing_interval, 'request_id', v_req,
                                             'customer_request_id', v_cust));
  END IF;
  RETURN json_build_object('subscription_id', v_sub.subscription_id, 'plan', v_sub.plan_id,
                           'interval', v_sub.billing_interval, 'status', v_sub.status);
END
$$;
COMMENT ON FUNCTION api.create_subscription(text, text) IS
  'Subscribe the calling tenant to a plan (free, professional, enterprise), interval month or year. Free is local. A paid plan returns at once with status incomplete; GET /subscription shows the client_secret to confirm the first payment once Stripe has answered. Audited.';

CREATE FUNCTION api.update_subscription(plan text DEFAULT NULL, "interval" text DEFAULT NULL,
                                        cancel_at_period_end boolean DEFAULT NULL, proration text DEFAULT NULL)
  RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  t        billing.tenants := billing.calling_tenant();
  cur      billing.subscriptions := billing.current_subscription(t.tenant_id);
  v_plan   text := coalesce(plan, cur.plan_id);
  v_int    text := coalesce("interval", cur.billing_interval);
  v_cancel boolean := cancel_at_period_end;
  pr       billing.prices;
  v_params jsonb := '{}';
  v_change jsonb;
  v_up     boolean;
  v_req    bigint;
BEGIN
  IF plan IS NULL AND "interval" IS NULL AND cancel_at_period_end IS NULL THEN
    RAISE EXCEPTION 'nothing to change'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give plan, interval or cancel_at_period_end.';
  END IF;
  IF proration IS NOT NULL AND proration NOT IN ('create_prorations', 'always_invoice', 'none') THEN
    RAISE EXCEPTION 'unknown proration behaviour: %', quote_literal(proration)
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Use create_prorations, always_invoice or none.';
  END IF;
  IF cur.subscription_id IS NULL OR cur.stripe_subscription_id IS NULL
     OR cur.status NOT IN ('active', 'trialing', 'past_due') OR cur.stripe_item_id IS NULL THEN
    RAISE EXCEPTION 'tenant % has no active paid subscription to change', t.tenant_id
      USING ERRCODE = 'invalid_parameter_value',
            DETAIL = CASE WHEN cur.subscription_id IS NULL THEN 'The tenant is on Free.'
                          ELSE format('The subscription is %s (plan %s).', cur.status, cur.plan_id) END,
            HINT = 'Subscribe with POST /rpc/create_subscription; a new subscription can be changed once its first payment succeeded.';
  END IF;
  IF cur.pending_change IS NOT NULL THEN
    RAISE EXCEPTION 'a change of this subscription is already in progress'
      USING ERRCODE = 'unique_violation', DETAIL = cur.pending_change::text,
            HINT = 'Wait until GET /subscription shows no pending_change.';
  END IF;

  IF v_plan = 'free' THEN
    -- to Free: the paid subscription ends with its period
    IF v_cancel IS FALSE THEN
      RAISE EXCEPTION 'moving to Free cancels the subscription at period end'
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Omit cancel_at_period_end.';
    END IF;
    v_plan := cur.plan_id;
    v_int := cur.billing_interval;
    v_cancel := true;
  END IF;
  pr := billing.check_plan_interval(v_plan, v_int);
  IF v_plan = cur.plan_id AND v_int = cur.billing_interval
     AND (v_cancel IS NULL OR v_cancel = cur.cancel_at_period_end) THEN
    RAISE EXCEPTION 'the subscription is already on plan % (%)%', v_plan, v_int,
                    CASE WHEN v_cancel THEN ', cancelling at period end' WHEN v_cancel IS FALSE THEN ', renewing' ELSE '' END
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  IF v_plan <> cur.plan_id OR v_int <> cur.billing_interval THEN
    -- an upgrade (higher tier, or monthly to yearly) is charged at once and
    -- refused by Stripe if the payment fails, so a decline changes nothing
    v_up := (SELECT tier FROM billing.plans WHERE plan_id = v_plan) > (SELECT tier FROM billing.plans WHERE plan_id = cur.plan_id)
            OR (v_plan = cur.plan_id AND v_int = 'year');
    proration := coalesce(proration, CASE WHEN v_up THEN 'always_invoice' ELSE 'create_prorations' END);
    v_params := jsonb_build_object(
      'items', jsonb_build_array(jsonb_build_object('id', cur.stripe_item_id, 'price', pr.stripe_price_id))
               || billing.metered_items_change(cur, pr.plan_id, pr.billing_interval),   -- 94_meters.sql
      'proration_behavior', proration,
      'payment_behavior', 'error_if_incomplete',
      'metadata', jsonb_build_object('tenant_id', t.tenant_id, 'subscription_id', cur.subscription_id));
    -- a plan change keeps the subscription renewing unless told otherwise
    v_cancel := coalesce(v_cancel, false);
  END IF;
  IF v_cancel IS NOT NULL THEN
    v_params := v_params || jsonb_build_object('cancel_at_period_end', v_cancel);
  END IF;

  v_req := billing.outbox_enqueue(t.tenant_id, 'subscription.update', 'POST',
                                  '/v1/subscriptions/' || cur.stripe_subscription_id, v_params,
                                  jsonb_build_object('subscription_id', cur.subscription_id));
  v_change := jsonb_strip_nulls(jsonb_build_object('plan', v_plan, 'interval', v_int,
                                                   'cancel_at_period_end', v_cancel, 'proration', proration,
                                                   'request_id', v_req));
  UPDATE billing.subscriptions SET pending_change = v_change, last_error = NULL, updated_at = now()
   WHERE tenant_id = t.tenant_id AND subscription_id = cur.subscription_id;
  PERFORM billing.audit('subscription.change_requested', t.tenant_id,
                        v_change || jsonb_build_object('subscription_id', cur.subscription_id,
                                                       'from_plan', cur.plan_id, 'from_interval', cur.billing_interval));
  RETURN json_build_object('subscription_id', cur.subscription_id, 'plan', cur.plan_id,
                           'interval', cur.billing_interval, 'status', cur.status, 'pending_change', v_change);
END
$$;
COMMENT ON FUNCTION api.update_subscription(text, text, boolean, text) IS
  'Change the calling tenant''s paid subscription: plan (up or down; free = cancel at period end), interval (month, year), cancel_at_period_end (true cancels at period end, false resumes), proration (create_prorations, always_invoice, none; default: always_invoice for upgrades, create_prorations otherwise). The plan and its limits change only when Stripe confirms. Audited.';

CREATE FUNCTION api.create_payment_intent(amount bigint, currency text DEFAULT 'usd', description text DEFAULT NULL)
  RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  t     billing.tenants := billing.calling_tenant();
  v_cur text := lower(currency);
  p     billing.payments;
  v_req bigint;
  v_calc bigint;
BEGIN
  IF amount IS NULL OR amount < 50 OR amount > 99999999 THEN
    RAISE EXCEPTION 'invalid amount: %', coalesce(amount::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The amount is in the smallest currency unit (cents), from 50 to 99999999.';
  END IF;
  IF v_cur IS NULL OR v_cur NOT IN ('usd', 'eur', 'gbp', 'chf') THEN
    RAISE EXCEPTION 'unsupported currency: %', coalesce(quote_literal(currency), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Supported currencies: usd, eur, gbp, chf.';
  END IF;
  IF length(description) > 1000 THEN
    RAISE EXCEPTION 'description is longer than 1000 characters' USING ERRCODE = 'string_data_right_truncation';
  END IF;
  IF t.stripe_customer_id IS NULL THEN
    RAISE EXCEPTION 'tenant % has no Stripe customer yet', t.tenant_id
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A Stripe customer is created with the first paid subscription (POST /rpc/create_subscription).';
  END IF;
  INSERT INTO billing.payments (tenant_id, kind, amount, currency, description, status)
  VALUES (t.tenant_id, 'one_time', amount, v_cur, description, 'pending') RETURNING * INTO p;
  -- VAT through Stripe Tax: the payment intent charges the calculation's total (91_tax.sql)
  IF current_setting('qes_billing.automatic_tax')::boolean THEN
    v_calc := billing.tax_calculation_request(t.tenant_id, t.stripe_customer_id, p.payment_id, amount, v_cur);
  END IF;
  v_req := billing.outbox_enqueue(t.tenant_id, 'payment_intent.create', 'POST', '/v1/payment_intents',
             jsonb_strip_nulls(jsonb_build_object(
               'amount', amount, 'currency', v_cur, 'customer', t.stripe_customer_id, 'description', description,
               'automatic_payment_methods', jsonb_build_object('enabled', true),
               'metadata', jsonb_build_object('tenant_id', t.tenant_id, 'payment_id', p.payment_id))),
             jsonb_build_object('payment_id', p.payment_id), p_after => v_calc);
  PERFORM billing.audit('payment_intent.requested', t.tenant_id,
                        jsonb_build_object('payment_id', p.payment_id, 'amount', amount, 'currency', v_cur,
                                           'request_id', v_req));
  RETURN json_build_object('payment_id', p.payment_id, 'amount', p.amount, 'currency', p.currency, 'status', p.status);
END
$$;
COMMENT ON FUNCTION api.create_payment_intent(bigint, text, text) IS
  'A one-time payment by the calling tenant: amount in the smallest currency unit (50 to 99999999), currency (usd, eur, gbp, chf), description. Returns the payment id at once; GET /payments shows its client_secret when Stripe has answered. Audited.';

CREATE VIEW api.subscription WITH (security_invoker = true) AS
SELECT s.subscription_id,
       s.plan_id AS plan,
       s.billing_interval AS "interval",
       s.status,
       CASE WHEN s.status IN ('active', 'trialing')
                 OR (s.status = 'past_due' AND (s.grace_until IS NULL OR s.grace_until > billing.now()))
            THEN s.plan_id ELSE 'free' END AS limits_plan,
       CASE WHEN s.status = 'incomplete' THEN s.client_secret END AS client_secret,
       s.current_period_start,
       s.current_period_end,
       s.cancel_at_period_end,
       s.trial_end,
       s.grace_until,
       s.pending_change,
       s.last_error ->> 'message' AS last_error,
       s.last_error ->> 'decline_code' AS decline_code,
       s.stripe_subscription_id,
       s.updated_at
  FROM billing.subscriptions s
 WHERE s.subscription_id = (SELECT max(s2.subscription_id) FROM billing.subscriptions s2 WHERE s2.tenant_id = s.tenant_id);
COMMENT ON VIEW api.subscription IS
  'The calling tenant''s subscription (the latest): plan, interval, Stripe status, limits_plan (whose limits apply now), client_secret while the first payment is awaited, current period, cancel_at_period_end, a change in progress and the last error. No row: the tenant is on Free.';

CREATE VIEW api.payments WITH (security_invoker = true) AS
SELECT p.payment_id, p.kind, p.amount, p.currency, p.description, p.status,
       CASE WHEN p.status NOT IN ('succeeded', 'canceled', 'failed') THEN p.client_secret END AS client_secret,
       p.failure_code, p.failure_message, p.stripe_payment_intent_id AS payment_intent_id, p.created_at, p.updated_at
  FROM billing.payments p
 ORDER BY p.created_at DESC, p.payment_id DESC;
COMMENT ON VIEW api.payments IS
  'The calling tenant''s payments (one-time and subscription charges), newest first; client_secret while a payment awaits confirmation.';
