-- Webhooks through the router (docs/scaleout.md, "Webhooks").  The router
-- verifies a delivery, finds the shard whose tenant the event is about and
-- hands it to that shard's own intake (billing_shard.api, call
-- stripe_webhook), which verifies and stores it exactly as on one database.
-- These functions answer the router's questions.

-- A Stripe reference: an id string, or an expanded object's id.
CREATE FUNCTION billing_shard.stripe_ref(p jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE SET search_path = pg_catalog
  RETURN CASE pg_catalog.jsonb_typeof(p) WHEN 'string' THEN p #>> '{}' WHEN 'object' THEN p ->> 'id' END;
COMMENT ON FUNCTION billing_shard.stripe_ref(jsonb) IS
  'The id a Stripe field refers to: the string itself, or the id of an expanded object.';

-- Whose is this Stripe object here?  The tenant, or no row.  First as the
-- mirror attributes events (billing.event_tenant: metadata, customers),
-- then by the mirrored objects it names (a dispute names its charge, a
-- charge its payment intent and invoice).
CREATE FUNCTION billing_shard.event_owner(p_object jsonb) RETURNS SETOF text
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_kind text := p_object ->> 'object';
  v_id   text := p_object ->> 'id';
  v      text;
BEGIN
  IF p_object IS NULL OR jsonb_typeof(p_object) <> 'object' THEN
    RETURN;
  END IF;
  v := billing.event_tenant(p_object);
  IF v IS NULL THEN
    v := coalesce(
      (SELECT p.tenant_id FROM billing.payments p
        WHERE p.stripe_payment_intent_id = coalesce(billing_shard.stripe_ref(p_object -> 'payment_intent'),
                                                    CASE WHEN v_kind = 'payment_intent' THEN v_id END)),
      (SELECT p.tenant_id FROM billing.payments p
        WHERE p.stripe_charge_id = coalesce(billing_shard.stripe_ref(p_object -> 'charge'),
                                            CASE WHEN v_kind = 'charge' THEN v_id END)
        LIMIT 1),
      (SELECT i.tenant_id FROM billing.invoices i
        WHERE i.stripe_invoice_id = coalesce(billing_shard.stripe_ref(p_object -> 'invoice'),
                                             CASE WHEN v_kind = 'invoice' THEN v_id END)),
      (SELECT s.tenant_id FROM billing.subscriptions s
        WHERE s.stripe_subscription_id = coalesce(billing_shard.stripe_ref(p_object -> 'subscription'),
                                                  CASE WHEN v_kind = 'subscription' THEN v_id END)),
      (SELECT d.tenant_id FROM billing.disputes d
        WHERE v_kind = 'dispute' AND d.stripe_dispute_id = v_id));
  END IF;
  IF v IS NOT NULL THEN
    RETURN NEXT v;
  END IF;
END
$$;
COMMENT ON FUNCTION billing_shard.event_owner(jsonb) IS
  'The tenant of this shard a Stripe object (an event''s data.object) belongs to, by metadata, customer or a mirrored object it names; no row when none.';

-- An event the router hands over that did not come through a delivery:
-- one the reconciling shard found for a tenant of this one.  Stored like
-- the intake stores (one row per event id, the trigger wakes the worker).
CREATE FUNCTION billing_shard.take_event(p_payload text, p_source text) RETURNS boolean
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  e jsonb := p_payload::jsonb;
  v_n integer;
BEGIN
  IF p_source NOT IN ('webhook', 'reconcile') THEN
    RAISE EXCEPTION 'unknown event source: %', quote_literal(p_source)
      USING ERRCODE = 'invalid_parameter_value', HINT = 'The source is webhook or reconcile.';
  END IF;
  IF e ->> 'id' !~ '^evt_' OR e ->> 'type' IS NULL OR jsonb_typeof(e -> 'created') <> 'number'
     OR jsonb_typeof(e -> 'data' -> 'object') <> 'object' THEN
    RAISE EXCEPTION 'not a Stripe event'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Hand over the event as Stripe listed it.';
  END IF;
  INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, api_version, stripe_created, payload, source)
  VALUES (e ->> 'id', e ->> 'type', coalesce((e ->> 'livemode')::boolean, false), e ->> 'api_version',
          to_timestamp((e ->> 'created')::double precision), p_payload::json, p_source)
  ON CONFLICT (stripe_event_id) DO NOTHING;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n = 1;
END
$$;
COMMENT ON FUNCTION billing_shard.take_event(text, text) IS
  'Store a Stripe event the router hands over (found by the reconciling shard for a tenant of this one) in the inbox, once per event id; true when it was new.';

-- Reconciliation runs on one shard per Stripe account (the others have
-- qes_billing.reconcile_interval = 0).  The events its pass found that no
-- tenant of this shard owns wait here until the router has handed them to
-- their shard (router.reconcile_forward); then they are marked.
CREATE TABLE billing_shard.forwarded_events (
  stripe_event_id text PRIMARY KEY,
  shards          text[] NOT NULL,
  forwarded_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing_shard.forwarded_events IS
  'Events the reconciliation pass of this shard found for other shards'' tenants, and the shards the router handed them to.';
SELECT pg_catalog.pg_extension_config_dump('billing_shard.forwarded_events', '');

CREATE FUNCTION billing_shard.unowned_reconciled(p_limit integer)
  RETURNS TABLE (stripe_event_id text, payload text)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
  SELECT e.stripe_event_id, e.payload::text
    FROM billing.webhook_events e
   WHERE e.source = 'reconcile' AND e.state = 'ignored'
     AND NOT EXISTS (SELECT FROM billing_shard.forwarded_events f WHERE f.stripe_event_id = e.stripe_event_id)
   ORDER BY e.stripe_created, e.stripe_event_id
   LIMIT p_limit
$$;
COMMENT ON FUNCTION billing_shard.unowned_reconciled(integer) IS
  'Events this shard''s reconciliation pass found that no tenant here owns and that the router has not handed over yet.';

CREATE FUNCTION billing_shard.mark_forwarded(p_event_id text, p_shards text[]) RETURNS void
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
  INSERT INTO billing_shard.forwarded_events (stripe_event_id, shards) VALUES (p_event_id, p_shards)
  ON CONFLICT (stripe_event_id) DO UPDATE SET shards = EXCLUDED.shards, forwarded_at = pg_catalog.now()
$$;
COMMENT ON FUNCTION billing_shard.mark_forwarded(text, text[]) IS
  'Record that the router handed a reconciled event over to these shards.';
