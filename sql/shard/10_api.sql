-- The api schema, called by the router as PostgREST calls it on one
-- database.  The router passes what PostgREST set on its side (the role the
-- JWT named, the claims, method, path and headers, whether the transaction
-- is read-only); this function sets the same here, runs the same api
-- function or view as that role, and answers the result with
-- response.status and response.headers -- or the error, as a value, with
-- its SQLSTATE, message, detail and hint, which the router raises again
-- unchanged.  An error rolls back everything the call did (a
-- subtransaction), as the rolled-back request does on one database.

CREATE FUNCTION billing_shard.api(
  p_role text, p_claims text, p_headers text, p_method text, p_path text, p_read_only boolean,
  p_call text, p_args json, p_body text,
  OUT ok boolean, OUT body text, OUT status text, OUT headers text,
  OUT err_state text, OUT err_message text, OUT err_detail text, OUT err_hint text)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog
AS $$
BEGIN
  IF p_role IS NULL OR p_role NOT IN ('qes_anon', 'qes_tenant', 'qes_admin', 'qes_app') THEN
    RAISE EXCEPTION 'the router may act as qes_anon, qes_tenant, qes_admin or qes_app, not as %',
                    coalesce(quote_ident(p_role), 'NULL')
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Call the router as one of the four roles (PostgREST does), or as a member of one of them.';
  END IF;
  IF p_read_only THEN
    PERFORM set_config('transaction_read_only', 'on', true);
  END IF;
  PERFORM set_config('request.jwt.claims', coalesce(p_claims, ''), true),
          set_config('request.method', coalesce(p_method, ''), true),
          set_config('request.path', coalesce(p_path, ''), true),
          set_config('request.headers', coalesce(p_headers, ''), true),
          set_config('request.cookies', '{}', true),
          set_config('response.status', '', true),
          set_config('response.headers', '', true);
  BEGIN
    PERFORM set_config('role', p_role, true);
    CASE p_call
      WHEN 'config' THEN
        body := api.config()::text;
      WHEN 'health' THEN
        body := api.health()::text;
      WHEN 'create_subscription' THEN
        body := api.create_subscription(plan => p_args ->> 'plan', "interval" => p_args ->> 'interval')::text;
      WHEN 'update_subscription' THEN
        body := api.update_subscription(plan => p_args ->> 'plan', "interval" => p_args ->> 'interval',
                                        cancel_at_period_end => (p_args ->> 'cancel_at_period_end')::boolean,
                                        proration => p_args ->> 'proration')::text;
      WHEN 'create_payment_intent' THEN
        body := api.create_payment_intent(amount => (p_args ->> 'amount')::bigint,
                                          currency => p_args ->> 'currency',
                                          description => p_args ->> 'description')::text;
      WHEN 'stripe_webhook' THEN
        -- json keeps the bytes Stripe signed; the intake verifies them again
        body := api.stripe_webhook(p_body::json)::text;
      WHEN 'has_feature' THEN
        body := api.has_feature(feature => p_args ->> 'feature')::text;
      WHEN 'features' THEN
        body := (SELECT coalesce(json_agg(v), '[]')::text FROM api.features v);
      WHEN 'submit_dispute_evidence' THEN
        body := api.submit_dispute_evidence(dispute => p_args ->> 'dispute')::text;
      WHEN 'plans' THEN
        body := (SELECT coalesce(json_agg(v), '[]')::text FROM api.plans v);
      WHEN 'tenant' THEN
        body := (SELECT coalesce(json_agg(v), '[]')::text FROM api.tenant v);
      WHEN 'usage' THEN
        body := (SELECT coalesce(json_agg(v), '[]')::text FROM api.usage v);
      WHEN 'invoices' THEN
        body := (SELECT coalesce(json_agg(v), '[]')::text FROM api.invoices v);
      WHEN 'subscription' THEN
        body := (SELECT coalesce(json_agg(v), '[]')::text FROM api.subscription v);
      WHEN 'payments' THEN
        body := (SELECT coalesce(json_agg(v), '[]')::text FROM api.payments v);
      ELSE
        -- any other api function or view, by name: a function with the
        -- arguments the router sent (named, each cast to its parameter's
        -- type; one left out takes its default), a view's rows as JSON
        body := billing_shard.api_dynamic(p_call, p_args);
    END CASE;
    ok := true;
    status := nullif(current_setting('response.status', true), '');
    headers := nullif(current_setting('response.headers', true), '');
  EXCEPTION WHEN OTHERS THEN
    ok := false;
    GET STACKED DIAGNOSTICS err_state = RETURNED_SQLSTATE, err_message = MESSAGE_TEXT,
                            err_detail = PG_EXCEPTION_DETAIL, err_hint = PG_EXCEPTION_HINT;
    body := NULL;
  END;
END
$$;
CREATE FUNCTION billing_shard.api_dynamic(p_call text, p_args json) RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog
AS $$
DECLARE
  v_fn   oid;
  v_args text;
  v_out  text;
BEGIN
  IF p_call IS NOT NULL AND to_regclass('api.' || quote_ident(p_call)) IS NOT NULL THEN
    EXECUTE format('SELECT coalesce(json_agg(v), ''[]'')::text FROM api.%I v', p_call) INTO v_out;
    RETURN v_out;
  END IF;
  SELECT p.oid INTO v_fn FROM pg_proc p WHERE p.pronamespace = 'api'::regnamespace AND p.proname = p_call;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'the router asked for an unknown api call: %', coalesce(quote_literal(p_call), 'NULL')
      USING ERRCODE = 'undefined_function',
            HINT = 'The router and the shard run different versions of the api schema (test/tools/router_api.py).';
  END IF;
  SELECT string_agg(format('%I => ($1 ->> %L)::%s', a.name, a.name, format_type(a.type, NULL)), ', ' ORDER BY a.n)
    INTO v_args
    FROM pg_proc p, unnest(p.proargnames, p.proargtypes::oid[]) WITH ORDINALITY AS a(name, type, n)
   WHERE p.oid = v_fn AND p_args::jsonb ? a.name;
  EXECUTE format('SELECT api.%I(%s)::text', p_call, coalesce(v_args, '')) INTO v_out USING p_args;
  RETURN v_out;
END
$$;
COMMENT ON FUNCTION billing_shard.api_dynamic(text, json) IS
  'An api function called by name with the router''s arguments (named, cast to the parameters'' types; absent ones take their defaults), or an api view''s rows as JSON.';

COMMENT ON FUNCTION billing_shard.api(text, text, text, text, text, boolean, text, json, text) IS
  'One routed API request: run an api function or read an api view as the given role, with the request''s claims, method, path and headers set as PostgREST sets them; answers the JSON body with response.status and response.headers, or the error (SQLSTATE, message, detail, hint) as a value.';

-- The platform's calls (README, "Usage metering and limits") routed to the
-- tenant's shard.  They run as the role the caller has on the router; an
-- error propagates (the router strips PL/Proxy's prefix): these are the
-- hot paths, and their errors are the caller's mistakes.  A routed
-- record_usage commits on its own: it is idempotent by its key, but it is
-- not in the caller's transaction (docs/scaleout.md, "Exactly once").
CREATE FUNCTION billing_shard.check_limit(p_role text, tenant_id text, metric text, quantity bigint)
  RETURNS billing.limit_check
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog
AS $$
BEGIN
  PERFORM billing_shard.act_as(p_role);
  RETURN billing.check_limit(tenant_id, metric, quantity);
END
$$;
COMMENT ON FUNCTION billing_shard.check_limit(text, text, text, bigint) IS
  'billing.check_limit for the router, as the caller''s role.';

CREATE FUNCTION billing_shard.record_usage(p_role text, tenant_id text, metric text, quantity bigint,
                                           idempotency_key text, metadata jsonb, occurred_at timestamptz)
  RETURNS billing.usage_result
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog
AS $$
BEGIN
  PERFORM billing_shard.act_as(p_role);
  RETURN billing.record_usage(tenant_id, metric, quantity, idempotency_key, metadata, occurred_at);
END
$$;
COMMENT ON FUNCTION billing_shard.record_usage(text, text, text, bigint, text, jsonb, timestamptz) IS
  'billing.record_usage for the router, as the caller''s role, committed by itself (idempotent by its key).';

CREATE FUNCTION billing_shard.upsert_tenant(p_role text, p_tenant_id text, p_name text, p_billing_email text)
  RETURNS SETOF billing.tenants
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog
AS $$
BEGIN
  PERFORM billing_shard.act_as(p_role);
  RETURN NEXT billing.upsert_tenant(p_tenant_id, p_name, p_billing_email);
END
$$;
COMMENT ON FUNCTION billing_shard.upsert_tenant(text, text, text, text) IS
  'billing.upsert_tenant for the router, as the caller''s role.';

CREATE FUNCTION billing_shard.usage_report(p_role text, p_tenant_id text)
  RETURNS TABLE (period_start timestamptz, period_end timestamptz, is_current boolean, metric text,
                 used bigint, usage_limit bigint, percent double precision, status text)
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog
AS $$
BEGIN
  PERFORM billing_shard.act_as(p_role);
  RETURN QUERY SELECT * FROM billing.usage_report(p_tenant_id);
END
$$;
COMMENT ON FUNCTION billing_shard.usage_report(text, text) IS
  'billing.usage_report for the router, as the caller''s role.';

CREATE FUNCTION billing_shard.act_as(p_role text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog
AS $$
BEGIN
  IF p_role IS NULL OR p_role NOT IN ('qes_anon', 'qes_tenant', 'qes_admin', 'qes_app') THEN
    RAISE EXCEPTION 'the router may act as qes_anon, qes_tenant, qes_admin or qes_app, not as %',
                    coalesce(quote_ident(p_role), 'NULL')
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Call the router as one of the four roles, or as a member of one of them.';
  END IF;
  -- local to the call's transaction: PL/Proxy's call is one statement, and
  -- the connection (or PgBouncer's server connection) goes back as it came
  PERFORM set_config('role', p_role, true);
END
$$;
COMMENT ON FUNCTION billing_shard.act_as(text) IS
  'Switch to one of the four request roles for the rest of the routed call''s transaction.';
