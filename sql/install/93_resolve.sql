-- Unknown outcomes (docs/architecture.md, "Unknown outcomes"): a request that creates a customer or
-- a subscription in Stripe and failed
-- without a definite answer (timeouts and dropped connections after Stripe
-- may have acted, 5xx, 409, 429, or an answer that could not be applied)
-- may have created the object anyway.  Before the failure stands, the
-- worker looks the object up in Stripe by what qes_billing put on it (the
-- tenant's email and metadata.tenant_id for a customer, metadata
-- subscription_id among the customer's subscriptions).  (A one-time payment
-- may be made twice on purpose; a payment intent Stripe made but whose
-- answer was lost is never confirmed, so nothing is charged.)  Found: it is linked and mirrored, the local row is no
-- longer failed, and what waited for it (a subscription that waited for its
-- customer) is sent again with its own Idempotency-Key.  Not found: the
-- failure stands.  While a lookup is under way the tenant cannot start the
-- same thing again (a second customer or subscription): 409 with a hint.
-- Every resolution is audited (stripe.request_resolved).

CREATE FUNCTION billing.outcome_unknown(r billing.stripe_requests) RETURNS boolean
  LANGUAGE sql IMMUTABLE
RETURN r.kind IN ('customer.create', 'subscription.create')
   AND r.error ->> 'category' IN ('network', 'server', 'conflict', 'rate_limited', 'apply', 'expired');
COMMENT ON FUNCTION billing.outcome_unknown(billing.stripe_requests) IS
  'Whether a failed customer or subscription request may still have created its object in Stripe (no definite answer: network, 5xx, 409, 429, an answer that could not be applied, or a retry refused because Stripe no longer keeps its Idempotency-Key).';

-- Queue the lookup of a failed request's object.
CREATE FUNCTION billing.resolve_request(r billing.stripe_requests) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  t     billing.tenants;
  v_cus text;
BEGIN
  SELECT * INTO t FROM billing.tenants WHERE tenant_id = r.tenant_id;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  IF r.kind = 'customer.create' THEN
    RETURN billing.outbox_enqueue(r.tenant_id, 'resolve.customer.list', 'GET', '/v1/customers',
                                  -- (by the email the customer was created with)
                                  jsonb_build_object('email', coalesce(r.params ->> 'email', t.billing_email), 'limit', 100),
                                  jsonb_build_object('request_id', r.request_id));
  END IF;
  v_cus := coalesce(r.params ->> 'customer', t.stripe_customer_id);
  IF v_cus IS NULL OR v_cus !~ '^cus_' THEN
    RETURN NULL;   -- no customer: nothing can have been created for it
  END IF;
  RETURN billing.outbox_enqueue(r.tenant_id, 'resolve.subscription.list', 'GET', '/v1/subscriptions',
                                jsonb_build_object('customer', v_cus, 'status', 'all', 'limit', 100),
                                jsonb_build_object('request_id', r.request_id));
END
$$;
COMMENT ON FUNCTION billing.resolve_request(billing.stripe_requests) IS
  'Queue the Stripe lookup that resolves a failed request of unknown outcome (its customer or subscription, found by qes_billing''s metadata).';

-- The lookup's answer: the object qes_billing asked for, or nothing.
CREATE FUNCTION billing.resolve_fetched(p_req billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  r      billing.stripe_requests;
  o      jsonb;
  w      billing.stripe_requests;
  v_at   timestamptz := billing.outbox_state_at(p_req);
  v_sub  bigint;
BEGIN
  SELECT * INTO r FROM billing.stripe_requests WHERE request_id = (p_req.subject ->> 'request_id')::bigint FOR UPDATE;
  IF NOT FOUND OR r.state <> 'failed' THEN
    RETURN;
  END IF;
  v_sub := (r.subject ->> 'subscription_id')::bigint;
  SELECT x INTO o FROM jsonb_array_elements(CASE WHEN jsonb_typeof(p_req.response -> 'data') = 'array'
                                                 THEN p_req.response -> 'data' ELSE '[]' END) x
   WHERE CASE r.kind
           WHEN 'customer.create' THEN x -> 'metadata' ->> 'tenant_id' = r.tenant_id AND NOT coalesce((x ->> 'deleted')::boolean, false)
           ELSE x -> 'metadata' ->> 'subscription_id' = r.subject ->> 'subscription_id'
                AND x -> 'metadata' ->> 'tenant_id' = r.tenant_id
         END
   ORDER BY (x ->> 'created')::bigint LIMIT 1;
  -- the request says what the lookup found (billing.retry_request reads
  -- it): "not found" only from a whole list (one page that says it has no
  -- more); from anything less it found nothing either way
  UPDATE billing.stripe_requests
     SET error = error || jsonb_build_object('resolved', jsonb_build_object(
                   'found', CASE WHEN o IS NOT NULL THEN true
                                 WHEN jsonb_typeof(p_req.response -> 'data') = 'array'
                                      AND p_req.response -> 'has_more' = 'false'::jsonb THEN false END,
                   'object', o ->> 'id'))
   WHERE request_id = r.request_id;
  IF o IS NULL THEN
    PERFORM billing.audit('stripe.request_resolved', r.tenant_id,
                          jsonb_build_object('request_id', r.request_id, 'kind', r.kind, 'found', false));
    RETURN;   -- Stripe never created it: the failure stands
  END IF;

  CASE r.kind
  WHEN 'customer.create' THEN
    UPDATE billing.tenants SET stripe_customer_id = o ->> 'id', updated_at = now()
     WHERE tenant_id = r.tenant_id AND stripe_customer_id IS NULL;
    PERFORM billing.apply_customer(r.tenant_id, o, v_at, false);
    -- what waited for the customer never reached Stripe (unless lost WAL hid
    -- that it did: billing.worker_reclaim then dated it, and the claim fails
    -- it as expired past the window): send it now, with its own key
    FOR w IN SELECT * FROM billing.stripe_requests c
              WHERE c.after_request = r.request_id AND c.state = 'failed' AND c.error ->> 'category' = 'dependency'
                FOR UPDATE LOOP
      UPDATE billing.stripe_requests
         SET state = 'pending', attempts = 0, error = NULL, http_status = NULL, response = NULL,
             next_attempt_at = now(), updated_at = now(),
             params = CASE WHEN w.inherit IS NULL THEN w.params ELSE w.params || jsonb_build_object(w.inherit, o ->> 'id') END
       WHERE request_id = w.request_id;
      UPDATE billing.subscriptions SET status = 'incomplete', last_error = NULL, updated_at = now()
       WHERE tenant_id = w.tenant_id AND subscription_id = (w.subject ->> 'subscription_id')::bigint
         AND status = 'incomplete_expired' AND stripe_subscription_id IS NULL
         AND NOT EXISTS (SELECT 1 FROM billing.subscriptions s WHERE s.tenant_id = w.tenant_id
                            AND s.status NOT IN ('canceled', 'incomplete_expired'));
    END LOOP;
  ELSE
    -- the local row is the Stripe subscription after all
    UPDATE billing.subscriptions SET status = 'incomplete', last_error = NULL, stripe_subscription_id = o ->> 'id',
                                     updated_at = now()
     WHERE tenant_id = r.tenant_id AND subscription_id = v_sub AND stripe_subscription_id IS NULL
       AND NOT EXISTS (SELECT 1 FROM billing.subscriptions s WHERE s.tenant_id = r.tenant_id
                          AND s.status NOT IN ('canceled', 'incomplete_expired'));
    PERFORM billing.apply_subscription(r.tenant_id, o, v_at, o ->> 'status' = 'canceled');
  END CASE;
  PERFORM billing.audit('stripe.request_resolved', r.tenant_id,
                        jsonb_build_object('request_id', r.request_id, 'kind', r.kind, 'found', true, 'object', o ->> 'id'));
  RETURN;
END
$$;
COMMENT ON FUNCTION billing.resolve_fetched(billing.stripe_requests) IS
  'Run by billing.request_recorded: the answer of a lookup for a failed request of unknown outcome; the object found is linked and mirrored (and what waited for it sent again), otherwise the failure stands. Audited.';

-- ---- what recording an answer sets off --------------------------------------------

-- One trigger for every request whose state changed to succeeded or failed
-- and whose answer something waits for, in place of one trigger per kind:
-- PostgreSQL prepares each row trigger's WHEN clause once per statement, and
-- the worker's claims and recordings are one statement each, so five
-- triggers cost five clause preparations per claim and per recording (a
-- tenth of the worker's CPU at low load: README.md, "Performance").  The
-- calls keep the order the separate triggers fired in (by name).
CREATE FUNCTION billing.request_recorded() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF NEW.kind = 'mirror.invoice.lookup' AND (NEW.state = 'failed' OR NEW.http_status <> 200) THEN
    PERFORM billing.invoice_lookup_done(NEW);
  END IF;
  IF NEW.state = 'succeeded' THEN
    IF NEW.kind LIKE 'mirror.%' THEN
      PERFORM billing.mirror_fetched(NEW);
    ELSIF NEW.kind LIKE 'reconcile.%' THEN
      PERFORM billing.reconcile_fetched(NEW);
    ELSIF NEW.kind LIKE 'resolve.%' THEN
      PERFORM billing.resolve_fetched(NEW);
    END IF;
  ELSIF billing.outcome_unknown(NEW) THEN
    -- a request that creates an object and failed without a definite
    -- answer is looked up in Stripe before its failure stands
    PERFORM billing.resolve_request(NEW);
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing.request_recorded() IS
  'Trigger: a Stripe request succeeded or failed; what waits for its answer runs (an invoice lookup''s failure facts, the mirror''s GETs, reconciliation, the lookup of a failed request of unknown outcome).';
CREATE TRIGGER request_recorded AFTER UPDATE OF state ON billing.stripe_requests
  FOR EACH ROW WHEN (OLD.state <> NEW.state
                     AND (NEW.state = 'failed'
                          OR (NEW.state = 'succeeded'
                              AND (NEW.kind LIKE 'mirror.%' OR NEW.kind LIKE 'reconcile.%' OR NEW.kind LIKE 'resolve.%'))))
  EXECUTE FUNCTION billing.request_recorded();

-- While a customer or subscription is looked up, the tenant may not start
-- another subscription (a one-time payment may be made twice on purpose).
CREATE FUNCTION billing.check_no_unknown_outcome(p_tenant text, p_kind text) RETURNS void
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM billing.stripe_requests r
              WHERE r.tenant_id = p_tenant AND r.state IN ('waiting', 'pending', 'in_flight')
                AND r.kind IN ('resolve.customer.list', 'resolve.subscription.list')) THEN
    RAISE EXCEPTION 'an earlier request of tenant % may have reached Stripe; its outcome is being checked', p_tenant
      USING ERRCODE = 'unique_violation',
            HINT = 'Try again in a minute: if Stripe created it, it is linked to you then; if not, you can start again.';
  END IF;
END
$$;
COMMENT ON FUNCTION billing.check_no_unknown_outcome(text, text) IS
  'Refuse (409) to start a subscription while the outcome of an earlier customer or subscription request is being checked with Stripe.';
