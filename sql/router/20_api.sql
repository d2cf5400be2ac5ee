-- The api schema through the router: the same functions (names, arguments,
-- defaults, results, volatility, grants, comments) and the same views
-- (columns, types, grants, comments) as one database's, so that PostgREST
-- pointed at the router serves the same paths with the same answers
-- (test/python/test_router_contract.py compares the two catalogs).  Each
-- request goes to the shard of the caller's tenant (the JWT's tenant_id),
-- runs there as the same role with the same claims, and its answer or
-- error comes back unchanged.

-- One API call on a partition's shard: its body, with response.status and
-- response.headers set here as the shard set them, or its error raised
-- again with the same SQLSTATE, message, detail and hint.
CREATE FUNCTION router.invoke(p_partition integer, p_call text, p_args json DEFAULT '{}', p_body text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_role   text := router.caller_role();
  r        record;
  v_state  text;
  v_msg    text;
  v_detail text;
  v_hint   text;
BEGIN
  BEGIN
    SELECT * INTO r
      FROM router.remote_api(p_partition, v_role, current_setting('request.jwt.claims', true),
                             current_setting('request.headers', true), current_setting('request.method', true),
                             current_setting('request.path', true), current_setting('transaction_read_only')::boolean,
                             p_call, p_args, p_body);
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
                            v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
    PERFORM router.call_failed(p_partition, v_state, v_msg, v_detail, v_hint);
  END;
  IF r.status IS NOT NULL THEN
    PERFORM set_config('response.status', r.status, true);
  END IF;
  IF r.headers IS NOT NULL THEN
    PERFORM set_config('response.headers', r.headers, true);
  END IF;
  IF NOT r.ok THEN
    PERFORM router.reraise(r.err_state, r.err_message, nullif(r.err_detail, ''), nullif(r.err_hint, ''));
  END IF;
  RETURN r.body;
END
$$;
COMMENT ON FUNCTION router.invoke(integer, text, json, text) IS
  'Run one API call on a partition''s shard as the caller''s role with the request''s claims and headers; returns its body, sets response.status and response.headers, raises its error unchanged, or 503 when the shard is down.';

-- A call that any shard answers alike (config, the plan catalog, an
-- anonymous refusal): the first shard that answers, from a different one
-- each time, so one shard that is down costs nothing but a retry.
CREATE FUNCTION router.invoke_any(p_call text, p_args json DEFAULT '{}', p_body text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_parts integer[] := ARRAY(SELECT partition FROM router.shard_partitions);
  v_n     integer := cardinality(v_parts);
  v_start integer;
  v_state text;
  v_msg   text;
BEGIN
  IF v_n = 0 THEN
    RAISE EXCEPTION 'the billing router has no shards'
      USING ERRCODE = 'PGRST',
            MESSAGE = '{"code": "QB503", "message": "the billing router has no shards", "details": null, "hint": "An operator registers shards with router.add_shard and router.set_partitions."}',
            DETAIL = '{"status": 503, "headers": {"Retry-After": "5"}}';
  END IF;
  v_start := floor(random() * v_n)::integer;
  FOR i IN 0 .. v_n - 1 LOOP
    BEGIN
      RETURN router.invoke(v_parts[1 + (v_start + i) % v_n], p_call, p_args, p_body);
    EXCEPTION WHEN SQLSTATE 'PGRST' THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      -- a shard that is down: the next one; any other answer stands
      IF v_msg NOT LIKE '{"code" : "QB503"%' OR i = v_n - 1 THEN
        RAISE;
      END IF;
    END;
  END LOOP;
END
$$;
COMMENT ON FUNCTION router.invoke_any(text, json, text) IS
  'Run an API call that every shard answers alike on one shard that answers (another one when a shard is down).';

-- The rows of an api view: a tenant's own on its shard; everyone's (staff:
-- row-level security lets qes_admin and qes_app see all tenants) from every
-- shard; the plan catalog from any one.
CREATE FUNCTION router.api_rows(p_view text) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_tenant text := nullif(current_setting('request.jwt.claims', true), '')::json ->> 'tenant_id';
  v_rows   json;
BEGIN
  IF p_view = 'plans' THEN
    RETURN router.invoke_any(p_view)::json;
  END IF;
  IF router.caller_role() = 'qes_tenant' THEN
    IF v_tenant IS NULL THEN
      RETURN router.invoke_any(p_view)::json;
    END IF;
    RETURN router.invoke(router.tenant_hash(v_tenant), p_view)::json;
  END IF;
  SELECT coalesce(json_agg(e ORDER BY s.partition, x.n), '[]') INTO v_rows
    FROM router.shard_partitions s
   CROSS JOIN LATERAL json_array_elements(router.invoke(s.partition, p_view)::json) WITH ORDINALITY x(e, n);
  RETURN v_rows;
END
$$;
COMMENT ON FUNCTION router.api_rows(text) IS
  'The rows of an api view as the caller would read them on one database: a tenant''s from its shard, staff''s from every shard, the plan catalog from any one.';

-- ---- functions ------------------------------------------------------------

CREATE FUNCTION api.config() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
BEGIN
  RETURN router.invoke_any('config')::json;
END
$$;
COMMENT ON FUNCTION api.config() IS
  'Public billing configuration: environment, Stripe mode, publishable key, base and webhook URLs, plans. Never a secret.';

CREATE FUNCTION router.claims_partition() RETURNS integer
  LANGUAGE sql STABLE SET search_path = pg_catalog
  RETURN router.tenant_hash(nullif(current_setting('request.jwt.claims', true), '')::json ->> 'tenant_id');
COMMENT ON FUNCTION router.claims_partition() IS
  'The hash of the tenant named by the request''s JWT (NULL without one).';

-- A tenant's call: on its shard; without a tenant the shard refuses it as
-- one database does (no tenant in the request), so any shard answers.
CREATE FUNCTION router.invoke_tenant(p_call text, p_args json) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_hash integer := router.claims_partition();
BEGIN
  IF v_hash IS NULL THEN
    RETURN router.invoke_any(p_call, p_args)::json;
  END IF;
  RETURN router.invoke(v_hash, p_call, p_args)::json;
END
$$;
COMMENT ON FUNCTION router.invoke_tenant(text, json) IS
  'Run a tenant''s API call on the shard of the JWT''s tenant.';

CREATE FUNCTION api.create_subscription(plan text, "interval" text DEFAULT 'month') RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
BEGIN
  RETURN router.invoke_tenant('create_subscription', json_build_object('plan', plan, 'interval', "interval"));
END
$$;
COMMENT ON FUNCTION api.create_subscription(text, text) IS
  'Subscribe the calling tenant to a plan (free, professional, enterprise), interval month or year. Free is local. A paid plan returns at once with status incomplete; GET /subscription shows the client_secret to confirm the first payment once Stripe has answered. Audited.';

CREATE FUNCTION api.update_subscription(plan text DEFAULT NULL, "interval" text DEFAULT NULL,
                                        cancel_at_period_end boolean DEFAULT NULL, proration text DEFAULT NULL)
  RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
BEGIN
  RETURN router.invoke_tenant('update_subscription',
                              json_build_object('plan', plan, 'interval', "interval",
                                                'cancel_at_period_end', cancel_at_period_end, 'proration', proration));
END
$$;
COMMENT ON FUNCTION api.update_subscription(text, text, boolean, text) IS
  'Change the calling tenant''s paid subscription: plan (up or down; free = cancel at period end), interval (month, year), cancel_at_period_end (true cancels at period end, false resumes), proration (create_prorations, always_invoice, none; default: always_invoice for upgrades, create_prorations otherwise). The plan and its limits change only when Stripe confirms. Audited.';

CREATE FUNCTION api.create_payment_intent(amount bigint, currency text DEFAULT 'usd', description text DEFAULT NULL)
  RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
BEGIN
  RETURN router.invoke_tenant('create_payment_intent',
                              json_build_object('amount', amount, 'currency', currency, 'description', description));
END
$$;
COMMENT ON FUNCTION api.create_payment_intent(bigint, text, text) IS
  'A one-time payment by the calling tenant: amount in the smallest currency unit (50 to 99999999), currency (usd, eur, gbp, chf), description. Returns the payment id at once; GET /payments shows its client_secret when Stripe has answered. Audited.';

CREATE FUNCTION api.has_feature(feature text) RETURNS boolean
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
BEGIN
  RETURN router.invoke_tenant('has_feature', json_build_object('feature', feature))::text::boolean;
END
$$;
COMMENT ON FUNCTION api.has_feature(text) IS
  'May the calling tenant use the feature now? Same rules as billing.has_feature; an unknown feature is an error (22023).';

-- An operator's call about one dispute: on the shard that has it (every
-- shard is asked; one that has none answers as one database does).
CREATE FUNCTION api.submit_dispute_evidence(dispute text) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_targets integer[];
BEGIN
  IF dispute ~ '^(dp|du)_[A-Za-z0-9_]+$' THEN
    v_targets := router.event_targets(jsonb_build_object('object', 'dispute', 'id', dispute));
  END IF;
  IF cardinality(v_targets) = 1 THEN
    RETURN router.invoke(v_targets[1], 'submit_dispute_evidence', json_build_object('dispute', dispute))::json;
  END IF;
  RETURN router.invoke_any('submit_dispute_evidence', json_build_object('dispute', dispute))::json;
END
$$;
COMMENT ON FUNCTION api.submit_dispute_evidence(text) IS
  'Operators (qes_admin): submit the staged evidence of a dispute to Stripe after review. Stripe takes it once. Audited.';

-- Inbound rate limiting, as on one database: qes_billing's token buckets in
-- this cluster's shared memory (the library is preloaded here too).
CREATE FUNCTION api.pre_request() RETURNS void
  LANGUAGE c VOLATILE AS '$libdir/qes_billing', 'qes_pre_request';
COMMENT ON FUNCTION api.pre_request() IS
  'PostgREST db-pre-request: token buckets per client address (last X-Forwarded-For entry; never for Stripe webhook deliveries), per tenant (JWT tenant_id) and per staff role; over the limit the request is answered 429 with Retry-After.';

CREATE FUNCTION router.rate_limit_stats(OUT allowed bigint, OUT limited bigint, OUT overflowed bigint,
                                        OUT slots_used bigint, OUT slots integer)
  LANGUAGE c VOLATILE AS '$libdir/qes_billing', 'qes_rate_limit_stats';
COMMENT ON FUNCTION router.rate_limit_stats() IS
  'Inbound rate limiting on the router since start: requests allowed and limited (429), requests that shared an overflow bucket, buckets in use of those available.';

-- ---- views ------------------------------------------------------------------

CREATE VIEW api.plans AS
SELECT x.plan_id, x.name, x.tier, x.description, x.features, x.monthly_price, x.yearly_price, x.currency, x.limits
  FROM json_to_recordset(router.api_rows('plans'))
       AS x(plan_id text, name text, tier integer, description text, features text[], monthly_price bigint,
            yearly_price bigint, currency text, limits jsonb);
COMMENT ON VIEW api.plans IS
  'The plan catalog: prices in the smallest currency unit (cents) per month and per year, and per-period limits by metric (null = unlimited; storage in bytes).';

CREATE VIEW api.tenant WITH (security_invoker = true) AS
SELECT x.tenant_id, x.name, x.billing_email, x.has_stripe_customer, x.disputed, x.created_at
  FROM json_to_recordset(router.api_rows('tenant'))
       AS x(tenant_id text, name text, billing_email text, has_stripe_customer boolean, disputed boolean,
            created_at timestamptz);
COMMENT ON VIEW api.tenant IS 'The calling tenant (row-level security on the JWT''s tenant_id claim).';

CREATE VIEW api.usage WITH (security_invoker = true) AS
SELECT x.period_start, x.period_end, x.is_current, x.metric, x.used, x.usage_limit, x.percent, x.status,
       x.billed_beyond, x.billable, x.billable_amount, x.billable_currency, x.sent_to_stripe
  FROM json_to_recordset(router.api_rows('usage'))
       AS x(period_start timestamptz, period_end timestamptz, is_current boolean, metric text, used bigint,
            usage_limit bigint, percent double precision, status text, billed_beyond bigint, billable bigint,
            billable_amount numeric, billable_currency text, sent_to_stripe bigint);
COMMENT ON VIEW api.usage IS
  'The calling tenant''s usage: the current billing period per metric (used, usage_limit (null = unlimited), percent, status: ok, warning, over_soft_limit, blocked) and the totals of earlier periods (is_current = false). A metric billed by usage (Stripe Billing Meters) also shows what will be billed so far this period: the units included (billed_beyond), the billable units, their amount (smallest currency unit, billable_currency) and how many Stripe has been sent; null when not billed by usage.';

CREATE VIEW api.invoices WITH (security_invoker = true) AS
SELECT x.invoice_id, x.number, x.status, x.amount_due, x.amount_paid, x.amount_remaining, x.currency,
       x.period_start, x.period_end, x.hosted_invoice_url, x.invoice_pdf, x.created, x.usage_lines
  FROM json_to_recordset(router.api_rows('invoices'))
       AS x(invoice_id text, number text, status text, amount_due bigint, amount_paid bigint, amount_remaining bigint,
            currency text, period_start timestamptz, period_end timestamptz, hosted_invoice_url text,
            invoice_pdf text, created timestamptz, usage_lines jsonb)
 ORDER BY x.created DESC, x.invoice_id DESC;
COMMENT ON VIEW api.invoices IS
  'The calling tenant''s invoices, mirrored from Stripe, newest first (amounts in the smallest currency unit). usage_lines: the usage Stripe billed on it through meters (metric, quantity, amount, period), as its newest event showed. Page with limit and offset.';

CREATE VIEW api.subscription WITH (security_invoker = true) AS
SELECT x.subscription_id, x.plan, x."interval", x.status, x.limits_plan, x.client_secret, x.current_period_start,
       x.current_period_end, x.cancel_at_period_end, x.trial_end, x.grace_until, x.pending_change, x.last_error,
       x.decline_code, x.stripe_subscription_id, x.updated_at
  FROM json_to_recordset(router.api_rows('subscription'))
       AS x(subscription_id bigint, plan text, "interval" text, status text, limits_plan text, client_secret text,
            current_period_start timestamptz, current_period_end timestamptz, cancel_at_period_end boolean,
            trial_end timestamptz, grace_until timestamptz, pending_change jsonb, last_error text,
            decline_code text, stripe_subscription_id text, updated_at timestamptz);
COMMENT ON VIEW api.subscription IS
  'The calling tenant''s subscription (the latest): plan, interval, Stripe status, limits_plan (whose limits apply now), client_secret while the first payment is awaited, current period, cancel_at_period_end, a change in progress and the last error. No row: the tenant is on Free.';

CREATE VIEW api.features WITH (security_invoker = true) AS
SELECT x.feature, x.enabled, x.plan_id, x.reason, x.available_in
  FROM json_to_recordset(router.api_rows('features'))
       AS x(feature text, enabled boolean, plan_id text, reason text, available_in text);
COMMENT ON VIEW api.features IS
  'The calling tenant''s features now: enabled, the plan whose features apply (the one Stripe''s state implies: trials and grace periods keep the plan), why it is not the subscribed plan, and the lowest plan that has the feature.';

CREATE VIEW api.payments WITH (security_invoker = true) AS
SELECT x.payment_id, x.kind, x.amount, x.currency, x.description, x.status, x.client_secret, x.failure_code,
       x.failure_message, x.payment_intent_id, x.created_at, x.updated_at
  FROM json_to_recordset(router.api_rows('payments'))
       AS x(payment_id bigint, kind text, amount bigint, currency text, description text, status text,
            client_secret text, failure_code text, failure_message text, payment_intent_id text,
            created_at timestamptz, updated_at timestamptz)
 ORDER BY x.created_at DESC, x.payment_id DESC;
COMMENT ON VIEW api.payments IS
  'The calling tenant''s payments (one-time and subscription charges), newest first; client_secret while a payment awaits confirmation.';
