-- Stripe's webhooks through the router (docs/scaleout.md, "Webhooks").
-- Stripe sends every event of the account to one endpoint.  The router
-- verifies the signature (so a forged delivery never makes it look
-- anything up), finds the shard whose tenant the event is about and hands
-- the delivery -- body and headers as received -- to that shard's own
-- intake, which verifies and stores it once per event id and answers as
-- one database answers.  A shard that is down answers 503, so Stripe
-- delivers again later (it retries for three days); an event whose owner
-- no shard knows yet goes to every shard: each stores it, the one whose
-- tenant it turns out to be applies it when it learns of the customer, as
-- one database does, and the others never do.

CREATE FUNCTION router.verify_stripe_signature(payload text, header text, secrets text DEFAULT NULL,
                                               tolerance_s integer DEFAULT NULL, at timestamptz DEFAULT NULL)
  RETURNS text
  LANGUAGE c VOLATILE AS '$libdir/qes_billing', 'qes_verify_stripe_signature_fn';
COMMENT ON FUNCTION router.verify_stripe_signature(text, text, text, integer, timestamptz) IS
  'qes_billing''s verifier of a Stripe-Signature header against the raw body: ok, or no_header, no_secret, malformed, no_v1, mismatch, stale. Defaults: the webhook secret(s) configured for this cluster, qes_billing.webhook_tolerance, the real clock.';

-- Stripe customers whose tenant a shard named: a customer belongs to one
-- tenant for good, so the answer is kept.
CREATE TABLE router.customer_tenants (
  stripe_customer_id text PRIMARY KEY CHECK (stripe_customer_id ~ '^cus_'),
  tenant_id          text NOT NULL,
  learned_at         timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE router.customer_tenants IS
  'Which tenant a Stripe customer belongs to, as its shard answered (routing only: the shard keeps the customer).';
SELECT pg_catalog.pg_extension_config_dump('router.customer_tenants', '');

CREATE FUNCTION router.stripe_ref(p jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE SET search_path = pg_catalog
  RETURN CASE pg_catalog.jsonb_typeof(p) WHEN 'string' THEN p #>> '{}' WHEN 'object' THEN p ->> 'id' END;
COMMENT ON FUNCTION router.stripe_ref(jsonb) IS
  'The id a Stripe field refers to: the string itself, or the id of an expanded object.';

-- Where an event goes: its tenant's partition (one element), every shard
-- (the owner is not known anywhere yet), or 503 when a shard that might
-- own it is down.  The tenant comes from the object's metadata (qes_billing
-- sets metadata.tenant_id on everything it creates; an invoice carries its
-- subscription's), else from the customer (kept in router.customer_tenants
-- once a shard named it), else by asking each shard.
CREATE FUNCTION router.event_targets(p_object jsonb) RETURNS integer[]
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_tenant   text := coalesce(p_object -> 'metadata' ->> 'tenant_id',
                              p_object -> 'parent' -> 'subscription_details' -> 'metadata' ->> 'tenant_id',
                              p_object -> 'subscription_details' -> 'metadata' ->> 'tenant_id');
  v_customer text := coalesce(router.stripe_ref(p_object -> 'customer'),
                              CASE WHEN p_object ->> 'object' = 'customer' THEN p_object ->> 'id' END);
  s          record;
  v_down     integer;
  v_state    text;
  v_msg      text;
BEGIN
  IF v_tenant ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$' THEN
    RETURN ARRAY[router.tenant_hash(v_tenant)];
  END IF;
  IF v_customer IS NOT NULL THEN
    SELECT c.tenant_id INTO v_tenant FROM router.customer_tenants c WHERE c.stripe_customer_id = v_customer;
    IF FOUND THEN
      RETURN ARRAY[router.tenant_hash(v_tenant)];
    END IF;
  END IF;
  FOR s IN SELECT * FROM router.shard_partitions LOOP
    BEGIN
      SELECT o INTO v_tenant FROM router.remote_event_owner(s.partition, p_object) o LIMIT 1;
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      IF NOT router.is_unavailable(v_state) THEN
        PERFORM router.call_failed(s.partition, v_state, v_msg, NULL, NULL);
      END IF;
      v_down := s.partition;
      v_tenant := NULL;
      CONTINUE;
    END;
    IF v_tenant IS NOT NULL THEN
      IF v_customer ~ '^cus_' THEN
        INSERT INTO router.customer_tenants (stripe_customer_id, tenant_id) VALUES (v_customer, v_tenant)
        ON CONFLICT (stripe_customer_id) DO NOTHING;
      END IF;
      RETURN ARRAY[router.tenant_hash(v_tenant)];
    END IF;
  END LOOP;
  IF v_down IS NOT NULL THEN
    -- the shard that is down may be the owner: Stripe delivers again later
    PERFORM router.shard_unavailable(v_down, '08006', 'asked whose Stripe object this is');
  END IF;
  RETURN ARRAY(SELECT partition FROM router.shard_partitions);
END
$$;
COMMENT ON FUNCTION router.event_targets(jsonb) IS
  'The partitions a Stripe event goes to: its tenant''s (by metadata, a known customer, or the shard that knows the object), or every shard''s when no shard knows its owner yet; 503 when a shard that might own it is down.';

CREATE FUNCTION api.stripe_webhook(json) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_body    text := $1::text;
  v_sig     text;
  v_event   jsonb;
  v_targets integer[];
  v_answer  text;
  v_first   text;
  v_status  text;
  v_headers text;
  v_new     text;
BEGIN
  IF $1 IS NULL THEN
    RETURN router.invoke_any('stripe_webhook', '{}', NULL)::json;
  END IF;
  v_sig := router.verify_stripe_signature(v_body,
                                          nullif(current_setting('request.headers', true), '')::json ->> 'stripe-signature');
  IF v_sig = 'no_secret' THEN
    -- the router's own configuration: answered here, 500 so that Stripe retries
    PERFORM set_config('response.status', '500', true);
    RETURN '{"error" : "the webhook signing secret is not configured", "reason" : "no_secret"}'::json;
  END IF;
  IF v_sig <> 'ok' THEN
    -- refused: any shard's intake refuses it the same way and counts it
    -- (no write, no lock), so it shows in the operators' refusal counts
    RETURN router.invoke_any('stripe_webhook', '{}', v_body)::json;
  END IF;
  BEGIN
    v_event := v_body::jsonb;
  EXCEPTION WHEN OTHERS THEN
    v_event := NULL;
  END;
  IF v_event IS NULL OR jsonb_typeof(v_event) <> 'object' OR jsonb_typeof(v_event -> 'data' -> 'object') <> 'object' THEN
    -- signed, but no event the intake would store: it answers why
    RETURN router.invoke_any('stripe_webhook', '{}', v_body)::json;
  END IF;
  v_targets := router.event_targets(v_event -> 'data' -> 'object');
  FOR i IN 1 .. cardinality(v_targets) LOOP
    IF router.partition_moving(v_targets[i]) THEN
      -- its tenant's partition is between fence and switch (70_move.sql):
      -- Stripe delivers it again, to the shard that owns it then
      PERFORM router.partition_moving_answer(v_targets[i], 'A Stripe event for a tenant whose partition is being moved.');
    END IF;
    v_answer := router.invoke(v_targets[i], 'stripe_webhook', '{}', v_body);
    IF i = 1 THEN
      v_first := v_answer;
      v_status := current_setting('response.status', true);
      v_headers := current_setting('response.headers', true);
    END IF;
    IF v_new IS NULL AND v_answer::jsonb ->> 'duplicate' = 'false' THEN
      v_new := v_answer;
    END IF;
  END LOOP;
  -- every shard answers alike (same secrets, same checks); stored by any is new
  PERFORM set_config('response.status', coalesce(v_status, ''), true),
          set_config('response.headers', coalesce(v_headers, ''), true);
  RETURN coalesce(v_new, v_first)::json;
END
$$;
COMMENT ON FUNCTION api.stripe_webhook(json) IS
  'Stripe webhook endpoint (POST /rpc/stripe_webhook, the raw event as the body). Verifies the Stripe-Signature header and the mode, stores a new event in the inbox for the worker and answers 200 at once; a repeated event id answers 200 and stores nothing. Refusals answer 400 with the reason (500 when no secret is configured) and are counted, then written and audited once a minute per reason.';

-- Hand events a shard holds but does not own to the shards that own them,
-- once per event: what a reconciling shard found for other shards' tenants
-- (p_moved false: handed over as reconciled), or what a shard could not
-- apply because its tenant's partition had moved away (p_moved true,
-- 70_move.sql: handed over as webhooks).
CREATE FUNCTION router.hand_over_events(p_moved boolean, p_limit integer) RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
DECLARE
  s         record;
  e         record;
  v_targets integer[];
  v_names   text[];
  v_n       integer := 0;
BEGIN
  FOR s IN SELECT * FROM router.shard_partitions LOOP
    FOR e IN SELECT * FROM router.remote_unowned_reconciled(s.partition, p_limit) WHERE NOT p_moved
             UNION ALL
             SELECT * FROM router.remote_moved_events(s.partition, p_limit) WHERE p_moved LOOP
      v_targets := router.event_targets(e.payload::jsonb -> 'data' -> 'object');
      v_names := ARRAY[]::text[];
      FOR i IN 1 .. cardinality(v_targets) LOOP
        IF router.partition_shard(v_targets[i]) IS DISTINCT FROM s.shard_name THEN
          PERFORM router.remote_take_event(v_targets[i], e.payload, CASE WHEN p_moved THEN 'webhook' ELSE 'reconcile' END);
          v_names := v_names || router.partition_shard(v_targets[i]);
        END IF;
      END LOOP;
      PERFORM router.remote_mark_forwarded(s.partition, e.stripe_event_id, v_names);
      v_n := v_n + 1;
    END LOOP;
  END LOOP;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION router.hand_over_events(boolean, integer) IS
  'Hand events a shard holds but does not own to their owners'' shards, once each: found by reconciliation (false) or left by a partition move (true); returns how many.';

-- Reconciliation (docs/operations.md, "Reconciliation: drift found and healed"): one shard per Stripe account
-- runs the periodic pass (the others have qes_billing.reconcile_interval =
-- 0); the events it finds for other shards' tenants are handed to them
-- here.  Run it after each pass, e.g. every minute from cron or a timer:
--   psql -d router -c 'SELECT router.reconcile_forward()'
CREATE FUNCTION router.reconcile_forward(p_limit integer DEFAULT 1000) RETURNS integer
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
  RETURN router.hand_over_events(false, p_limit);
COMMENT ON FUNCTION router.reconcile_forward(integer) IS
  'Hand the events a shard''s reconciliation pass found for other shards'' tenants to those shards (once per event); returns how many were handed over.';
