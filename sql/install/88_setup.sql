-- Setup of the Stripe account through the outbox: the products and prices
-- of the paid plans, and the webhook endpoint.  The qes_billing_setup
-- command (src/qes_billing_setup) calls billing.setup_*() and waits for the
-- run's requests.  Everything is found again before it is created (stable
-- product ids qes_<plan>, price lookup_keys, the endpoint's URL), so a
-- second run creates nothing.

CREATE FUNCTION billing.webhook_event_types() RETURNS text[]
  LANGUAGE sql IMMUTABLE
RETURN ARRAY['customer.created', 'customer.updated', 'customer.deleted',
             'customer.subscription.created', 'customer.subscription.updated',
             'customer.subscription.deleted', 'customer.subscription.trial_will_end',
             'invoice.created', 'invoice.finalized', 'invoice.paid', 'invoice.payment_failed',
             'payment_intent.succeeded', 'payment_intent.payment_failed',
             'charge.succeeded', 'charge.failed', 'charge.dispute.created',
             'charge.dispute.updated', 'charge.dispute.closed',
             'charge.dispute.funds_withdrawn', 'charge.dispute.funds_reinstated',
             'customer.tax_id.created', 'customer.tax_id.updated', 'customer.tax_id.deleted'];
COMMENT ON FUNCTION billing.webhook_event_types() IS 'The 23 Stripe events the webhook endpoint subscribes to (all handled).';

CREATE FUNCTION billing.webhook_endpoint_url() RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
RETURN rtrim(billing.base_url(), '/') || '/api/v1/billing/webhooks/stripe';

CREATE FUNCTION billing.require_secret_key() RETURNS void
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_problem text := billing.stripe_key_problem('secret');
BEGIN
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'Stripe cannot be called: %', v_problem
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Set the secret key of the ' || billing.stripe_mode() || ' mode in the server''s environment (STRIPE_'
                   || upper(billing.stripe_mode()) || '_SECRET_KEY) or in qes_billing.stripe_'
                   || billing.stripe_mode() || '_secret_key.';
  END IF;
END
$$;
COMMENT ON FUNCTION billing.require_secret_key() IS 'Raise an error naming the problem unless the secret key of the current mode is usable.';

-- --test-config: is the key accepted?  (Local checks are in setup_config.)
CREATE FUNCTION billing.setup_check(p_run text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.require_secret_key();
  PERFORM billing.audit('setup.requested', NULL, jsonb_build_object('run', p_run, 'step', 'test-config'));
  RETURN billing.outbox_enqueue(NULL, 'setup.check', 'GET', '/v1/balance', p_run_id => p_run);
END
$$;
COMMENT ON FUNCTION billing.setup_check(text) IS 'Queue a request that proves Stripe is reachable and accepts the secret key.';

CREATE FUNCTION billing.setup_config() RETURNS TABLE (item text, value text, ok boolean)
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  VALUES ('environment', billing.environment(), true),
         ('stripe mode', billing.stripe_mode(), true),
         ('secret key', coalesce(billing.stripe_key_problem('secret'), 'present, ' || billing.stripe_mode() || ' mode'),
          billing.stripe_key_problem('secret') IS NULL),
         ('publishable key', coalesce(billing.stripe_key_problem('publishable'), 'present, ' || billing.stripe_mode() || ' mode'),
          billing.stripe_key_problem('publishable') IS NULL),
         ('webhook secret', coalesce(CASE WHEN billing.stripe_key_problem('webhook') IS NULL THEN 'present (setting)' END,
                                     CASE WHEN EXISTS (SELECT 1 FROM billing.stripe_secrets s
                                                        WHERE s.mode = billing.stripe_mode() AND s.kind = 'webhook')
                                          THEN 'present (stored by --setup-webhook)' END,
                                     'missing: run --setup-webhook or set the ' || upper(billing.stripe_mode()) || ' webhook secret'),
          true),
         ('base url', billing.base_url(), billing.base_url() ~ '^https?://'),
         ('stripe api', current_setting('qes_billing.stripe_api_base'), true),
         ('stripe api version', current_setting('qes_billing.stripe_api_version'),
          current_setting('qes_billing.stripe_api_version') ~ '^\d{4}-\d{2}-\d{2}'),
         ('worker', CASE WHEN (SELECT alive FROM billing.worker_status) THEN 'alive' ELSE 'not running' END,
          coalesce((SELECT alive FROM billing.worker_status), false))
$$;
COMMENT ON FUNCTION billing.setup_config() IS 'What qes_billing_setup --test-config checks locally; never shows a key.';

-- --setup-products
CREATE FUNCTION billing.setup_products(p_run text) RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  p billing.plans;
  n integer := 0;
BEGIN
  PERFORM billing.require_secret_key();
  PERFORM billing.audit('setup.requested', NULL, jsonb_build_object('run', p_run, 'step', 'products'));
  FOR p IN SELECT * FROM billing.plans pl
            WHERE pl.active AND EXISTS (SELECT 1 FROM billing.prices pr
                                         WHERE pr.plan_id = pl.plan_id AND pr.active AND pr.unit_amount > 0)
            ORDER BY pl.tier LOOP
    PERFORM billing.outbox_enqueue(NULL, 'setup.product.lookup', 'GET', '/v1/products/qes_' || p.plan_id,
                                   p_subject => jsonb_build_object('plan', p.plan_id), p_run_id => p_run);
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;
COMMENT ON FUNCTION billing.setup_products(text) IS
  'Queue the lookups that find or create a Stripe product (id qes_<plan>) and its prices (by lookup_key) for each paid plan.';

-- --setup-webhook, and --setup-backup-webhook URL: a second endpoint (for
-- instance a second PostgREST in another zone) subscribed to the same
-- events, with its own signing secret kept beside the first's.  Stripe
-- delivers every event to both; the inbox stores it once (its Stripe id).
CREATE FUNCTION billing.setup_webhook(p_run text, p_url text DEFAULT NULL) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_url text := coalesce(p_url, billing.webhook_endpoint_url());
BEGIN
  PERFORM billing.require_secret_key();
  IF p_url IS NULL AND billing.base_url() !~ '^https?://[^/]+' THEN
    RAISE EXCEPTION 'QES_BASE_URL is not an http(s) URL: %', billing.base_url()
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Set QES_BASE_URL (or qes_billing.base_url) to the public URL of the platform.';
  END IF;
  IF p_url IS NOT NULL AND (p_url !~ '^https://[^/[:space:]]+/[^[:space:]]*$' OR length(p_url) > 2048) THEN
    RAISE EXCEPTION 'the backup webhook endpoint''s URL is not an https URL: %', p_url
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Give the full https URL Stripe is to deliver to, e.g. https://zone-b.example.com/api/v1/billing/webhooks/stripe.';
  END IF;
  IF p_url IS NOT NULL AND p_url = billing.webhook_endpoint_url() THEN
    RAISE EXCEPTION 'the backup webhook endpoint''s URL is the primary''s: %', p_url
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A backup endpoint has another URL (another PostgREST); the primary is made by --setup-webhook.';
  END IF;
  PERFORM billing.audit('setup.requested', NULL,
                        jsonb_build_object('run', p_run, 'step', CASE WHEN p_url IS NULL THEN 'webhook' ELSE 'backup-webhook' END,
                                           'url', v_url));
  RETURN billing.outbox_enqueue(NULL, 'setup.webhook.list', 'GET', '/v1/webhook_endpoints',
                                jsonb_build_object('limit', 100), jsonb_build_object('url', v_url), p_run_id => p_run);
END
$$;
COMMENT ON FUNCTION billing.setup_webhook(text, text) IS
  'Queue the lookup that finds, updates or creates a webhook endpoint for the events handled: at QES_BASE_URL/api/v1/billing/webhooks/stripe, or at p_url (a backup endpoint, https). Each endpoint''s signing secret is kept in billing.stripe_secrets.';

-- The answers of setup requests: each finds what exists and queues only what is missing.
CREATE FUNCTION billing.setup_apply(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  o       jsonb := r.response;
  v_plan  text := r.subject ->> 'plan';
  pl      billing.plans;
  pr      billing.prices;
  v_found jsonb;
  v_req   bigint;
  v_mode  text := billing.stripe_mode();
BEGIN
  CASE r.kind
  WHEN 'setup.product.lookup' THEN
    SELECT * INTO pl FROM billing.plans WHERE plan_id = v_plan;
    IF r.http_status = 404 THEN
      v_req := billing.outbox_enqueue(NULL, 'setup.product.create', 'POST', '/v1/products',
                 jsonb_build_object('id', 'qes_' || v_plan, 'name', 'QES ' || pl.name,
                                    'description', nullif(pl.description, ''),
                                    'metadata', jsonb_build_object('qes_plan', v_plan)),
                 r.subject, p_run_id => r.run_id);
    ELSE
      UPDATE billing.plans SET stripe_product_id = o ->> 'id' WHERE plan_id = v_plan;
      v_req := NULL;
    END IF;
    PERFORM billing.outbox_enqueue(NULL, 'setup.prices.list', 'GET', '/v1/prices',
              jsonb_build_object('lookup_keys', (SELECT jsonb_agg(p.price_key ORDER BY p.price_key) FROM billing.prices p
                                                  WHERE p.plan_id = v_plan AND p.active AND p.unit_amount > 0),
                                 'limit', 100),
              r.subject, p_after => v_req, p_run_id => r.run_id);
  WHEN 'setup.product.create' THEN
    UPDATE billing.plans SET stripe_product_id = o ->> 'id' WHERE plan_id = v_plan;
    PERFORM billing.audit('setup.product_created', NULL, jsonb_build_object('plan', v_plan, 'product', o ->> 'id'));
  WHEN 'setup.prices.list' THEN
    SELECT * INTO pl FROM billing.plans WHERE plan_id = v_plan;
    FOR pr IN SELECT * FROM billing.prices p WHERE p.plan_id = v_plan AND p.active AND p.unit_amount > 0
               ORDER BY p.price_key LOOP
      SELECT x INTO v_found FROM jsonb_array_elements(o -> 'data') x
       WHERE x ->> 'lookup_key' = pr.price_key LIMIT 1;
      IF v_found IS NOT NULL AND (v_found ->> 'unit_amount')::bigint = pr.unit_amount
         AND v_found ->> 'currency' = pr.currency AND v_found -> 'recurring' ->> 'interval' = pr.billing_interval
         AND coalesce((v_found ->> 'active')::boolean, true)
         -- a price's tax_behavior is fixed once set: another one takes the lookup key over
         AND coalesce(v_found ->> 'tax_behavior', 'unspecified') = current_setting('qes_billing.tax_behavior') THEN
        UPDATE billing.prices SET stripe_price_id = v_found ->> 'id' WHERE price_key = pr.price_key;
      ELSE
        -- missing, or the catalog's amount changed: a new price takes the lookup key over
        PERFORM billing.outbox_enqueue(NULL, 'setup.price.create', 'POST', '/v1/prices',
                  jsonb_build_object('product', coalesce(pl.stripe_product_id, 'qes_' || v_plan),
                                     'unit_amount', pr.unit_amount, 'currency', pr.currency,
                                     'recurring', jsonb_build_object('interval', pr.billing_interval),
                                     'tax_behavior', current_setting('qes_billing.tax_behavior'),
                                     'lookup_key', pr.price_key, 'transfer_lookup_key', v_found IS NOT NULL,
                                     'metadata', jsonb_build_object('qes_plan', v_plan, 'qes_price', pr.price_key)),
                  jsonb_build_object('plan', v_plan, 'price_key', pr.price_key), p_run_id => r.run_id);
      END IF;
    END LOOP;
  WHEN 'setup.price.create' THEN
    UPDATE billing.prices SET stripe_price_id = o ->> 'id' WHERE price_key = r.subject ->> 'price_key';
    PERFORM billing.audit('setup.price_created', NULL,
                          jsonb_build_object('price_key', r.subject ->> 'price_key', 'price', o ->> 'id'));
  WHEN 'setup.webhook.list' THEN
    SELECT x INTO v_found FROM jsonb_array_elements(o -> 'data') x
     WHERE x ->> 'url' = coalesce(r.subject ->> 'url', billing.webhook_endpoint_url()) LIMIT 1;
    IF v_found IS NOT NULL THEN
      IF v_found ->> 'status' IS DISTINCT FROM 'enabled'
         OR NOT (SELECT array_agg(e ORDER BY e) FROM jsonb_array_elements_text(v_found -> 'enabled_events') e)
                IS NOT DISTINCT FROM (SELECT array_agg(e ORDER BY e) FROM unnest(billing.webhook_event_types()) e) THEN
        PERFORM billing.outbox_enqueue(NULL, 'setup.webhook.update', 'POST', '/v1/webhook_endpoints/' || (v_found ->> 'id'),
                  jsonb_build_object('enabled_events', to_jsonb(billing.webhook_event_types()), 'disabled', false),
                  r.subject || jsonb_build_object('endpoint', v_found ->> 'id'), p_run_id => r.run_id);
      END IF;
    ELSIF (o ->> 'has_more')::boolean THEN
      PERFORM billing.outbox_enqueue(NULL, 'setup.webhook.list', 'GET', '/v1/webhook_endpoints',
                jsonb_build_object('limit', 100, 'starting_after', o -> 'data' -> -1 ->> 'id'), r.subject,
                p_run_id => r.run_id);
    ELSE
      PERFORM billing.outbox_enqueue(NULL, 'setup.webhook.create', 'POST', '/v1/webhook_endpoints',
                jsonb_build_object('url', coalesce(r.subject ->> 'url', billing.webhook_endpoint_url()),
                                   'enabled_events', to_jsonb(billing.webhook_event_types()),
                                   'api_version', current_setting('qes_billing.stripe_api_version'),
                                   'description', 'qes_billing (' || billing.environment() || ')',
                                   'metadata', jsonb_build_object('qes_environment', billing.environment())),
                r.subject, p_run_id => r.run_id);
    END IF;
  WHEN 'setup.webhook.create' THEN
    IF o ->> 'secret' ~ '^whsec_' THEN
      INSERT INTO billing.stripe_secrets (mode, kind, endpoint, secret, url)
      VALUES (v_mode, 'webhook', o ->> 'id', o ->> 'secret', o ->> 'url')
      ON CONFLICT (mode, kind, endpoint) DO UPDATE SET secret = EXCLUDED.secret, url = EXCLUDED.url, created_at = now();
    END IF;
    PERFORM billing.audit('setup.webhook_created', NULL, jsonb_build_object('endpoint', o ->> 'id', 'url', o ->> 'url'));
  ELSE
    NULL;   -- setup.check, setup.webhook.update: the answer is the result
  END CASE;
END
$$;
COMMENT ON FUNCTION billing.setup_apply(billing.stripe_requests) IS
  'Apply the answer of a setup request: record what exists, queue only what is missing.';

-- Waiting for a run: true when none of its requests is still queued.
CREATE FUNCTION billing.setup_wait(p_run text, p_timeout_s double precision DEFAULT 60) RETURNS boolean
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_deadline timestamptz := clock_timestamp() + make_interval(secs => p_timeout_s);
BEGIN
  LOOP
    IF NOT EXISTS (SELECT 1 FROM billing.stripe_requests
                    WHERE run_id = p_run AND state IN ('waiting', 'pending', 'in_flight')) THEN
      RETURN true;
    END IF;
    IF clock_timestamp() > v_deadline THEN
      RETURN false;
    END IF;
    PERFORM pg_sleep(0.05);
  END LOOP;
END
$$;
COMMENT ON FUNCTION billing.setup_wait(text, double precision) IS
  'Wait until every request of a setup run has succeeded or failed (each statement sees the worker''s commits). False on timeout.';

CREATE FUNCTION billing.setup_report(p_run text)
  RETURNS TABLE (request_id bigint, kind text, state text, result text)
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT r.request_id, r.kind, r.state,
         CASE WHEN r.state = 'failed' THEN coalesce(r.error ->> 'category', '?') || ': ' || coalesce(r.error ->> 'message', '')
              WHEN r.state <> 'succeeded' THEN 'still ' || r.state
                   || coalesce(' (last error: ' || (r.error ->> 'message') || ')', '')
              ELSE CASE r.kind
                WHEN 'setup.check' THEN 'Stripe answered and accepted the key (' || coalesce(r.response ->> 'object', '?') || ')'
                WHEN 'setup.product.lookup' THEN CASE WHEN r.http_status = 404 THEN 'no product ' || (r.subject ->> 'plan') || ' yet'
                                                      ELSE 'found product ' || (r.response ->> 'id') END
                WHEN 'setup.product.create' THEN 'created product ' || (r.response ->> 'id')
                WHEN 'setup.prices.list' THEN 'found ' || jsonb_array_length(r.response -> 'data') || ' price(s) of ' || (r.subject ->> 'plan')
                WHEN 'setup.price.create' THEN 'created price ' || (r.response ->> 'id') || ' (' || (r.subject ->> 'price_key') || ')'
                WHEN 'setup.webhook.list' THEN 'found ' || jsonb_array_length(r.response -> 'data') || ' webhook endpoint(s)'
                WHEN 'setup.webhook.create' THEN 'created webhook endpoint ' || (r.response ->> 'id') || ' for ' || (r.response ->> 'url')
                                                 || CASE WHEN r.response ->> 'secret' IS NOT NULL THEN '; signing secret stored' ELSE '' END
                WHEN 'setup.webhook.update' THEN 'updated webhook endpoint ' || (r.response ->> 'id')
                ELSE 'ok' END
         END
    FROM billing.stripe_requests r
   WHERE r.run_id = p_run
   ORDER BY r.request_id
$$;
COMMENT ON FUNCTION billing.setup_report(text) IS 'What each request of a setup run found, created or why it failed.';

-- The webhook secrets to verify with: the configured setting(s) when set,
-- else what --setup-webhook stored for this mode.
CREATE FUNCTION billing.stored_webhook_secrets() RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT string_agg(s.secret, ',' ORDER BY s.created_at DESC)
    FROM billing.stripe_secrets s
   WHERE s.mode = billing.stripe_mode() AND s.kind = 'webhook'
$$;
COMMENT ON FUNCTION billing.stored_webhook_secrets() IS
  'Webhook signing secrets stored by qes_billing_setup --setup-webhook for the current mode (superuser-only table).';
