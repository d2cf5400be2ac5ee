-- Applying Stripe events (the inbox) to local state.  The worker calls
-- billing.process_inbox() every loop.  Each event is applied in its own
-- subtransaction together with its state change, so a crash or an error
-- leaves it to be applied again, never half-applied.
--
-- The mirror converges to Stripe's truth whatever the order of delivery
-- (docs/architecture.md, rule 12; docs/architecture.md, "Mirroring Stripe"):
--
--   * each mirrored object keeps the Stripe time of the state it holds
--     (stripe_state_at); an older state never overwrites a newer one, an
--     ended subscription or a deleted customer is never revived, and two
--     different states of the same second are ordered by a fixed rule while
--     the object is fetched from Stripe (through the outbox, one GET per
--     object in flight), whose answer is newer than both;
--   * facts accumulate whatever the order: an invoice's first failed
--     attempt is the earliest invoice.payment_failed, its subscription and
--     its payment intents are kept by Stripe id and linked whenever both
--     sides are present;
--   * entitlements are derived, not applied: the grace period of a past_due
--     subscription runs from the first failed attempt of its oldest unpaid
--     invoice (Stripe's time), never from when an event happened to arrive
--     (billing.sync_dunning);
--   * side effects are facts of Stripe's timeline too: each failed invoice's
--     notifications and dunning audit rows are decided once, from Stripe's
--     times, and a failure learnt too late to know whether it still holds
--     is checked with Stripe before the tenant is told of it
--     (billing.sync_invoice_failure);
--   * an event that names what is not mirrored yet waits for it (state
--     'waiting', or 'ignored' for a customer that is not known to be ours)
--     and is applied again as soon as it arrives (billing.inbox_requeue).

CREATE FUNCTION billing.json_items(o jsonb) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN CASE WHEN jsonb_typeof(o -> 'items' -> 'data') = 'array' THEN o -> 'items' -> 'data' ELSE '[]' END;
COMMENT ON FUNCTION billing.json_items(jsonb) IS 'A Stripe subscription''s items as a JSON array (empty when absent).';

-- A subscription's licensed item, the one whose price is the plan: the
-- first item that is not metered (usage billed through meters adds metered
-- items beside it, in any order), else the first.
CREATE FUNCTION billing.base_item(o jsonb) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT i FROM jsonb_array_elements(billing.json_items(o)) WITH ORDINALITY x(i, n)
                  WHERE coalesce(i -> 'price' -> 'recurring' ->> 'usage_type', 'licensed') <> 'metered'
                  ORDER BY n LIMIT 1),
                o -> 'items' -> 'data' -> 0);
COMMENT ON FUNCTION billing.base_item(jsonb) IS
  'A Stripe subscription''s licensed item (its price is the plan''s): the first item that is not metered.';


-- A Stripe reference: an id, or an expanded object's id.
CREATE FUNCTION billing.stripe_ref(v jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN CASE jsonb_typeof(v) WHEN 'string' THEN v #>> '{}' WHEN 'object' THEN v ->> 'id' END;
COMMENT ON FUNCTION billing.stripe_ref(jsonb) IS 'The id a Stripe reference field holds, whether it is an id or an expanded object.';

-- The customer an object belongs to (its own id for a customer).
CREATE FUNCTION billing.object_customer(o jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN CASE WHEN o ->> 'object' = 'customer' THEN o ->> 'id' ELSE billing.stripe_ref(o -> 'customer') END;

-- Which tenant an object belongs to: metadata.tenant_id (on the object, or
-- on the subscription an invoice is for), else any customer the tenant ever
-- had (a deleted one too).
-- (PL/pgSQL: its plan is kept; a SQL function with SET is planned at every
-- call, 220 us of the ~540 us an event took to apply)
CREATE FUNCTION billing.event_tenant(obj jsonb) RETURNS text
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
BEGIN
  RETURN coalesce(
    (SELECT t.tenant_id FROM billing.tenants t
      WHERE t.tenant_id = coalesce(obj -> 'metadata' ->> 'tenant_id',
                                   obj -> 'parent' -> 'subscription_details' -> 'metadata' ->> 'tenant_id',
                                   obj -> 'subscription_details' -> 'metadata' ->> 'tenant_id')),
    (SELECT c.tenant_id FROM billing.stripe_customers c WHERE c.stripe_customer_id = billing.object_customer(obj)),
    (SELECT t.tenant_id FROM billing.tenants t WHERE t.stripe_customer_id = billing.object_customer(obj)));
END
$$;
COMMENT ON FUNCTION billing.event_tenant(jsonb) IS
  'The tenant a Stripe object belongs to: its metadata.tenant_id (or its subscription''s), or the tenant of any of its customers.';

CREATE FUNCTION billing.status_rank(kind text, status text) RETURNS integer
  LANGUAGE sql IMMUTABLE
RETURN CASE kind
  WHEN 'subscription' THEN CASE status WHEN 'incomplete' THEN 1 WHEN 'trialing' THEN 2 WHEN 'active' THEN 3
                                       WHEN 'past_due' THEN 4 WHEN 'unpaid' THEN 5 WHEN 'paused' THEN 6
                                       WHEN 'incomplete_expired' THEN 9 WHEN 'canceled' THEN 9 ELSE 0 END
  WHEN 'invoice' THEN CASE status WHEN 'draft' THEN 1 WHEN 'open' THEN 2 WHEN 'uncollectible' THEN 3
                                  WHEN 'paid' THEN 4 WHEN 'void' THEN 4 ELSE 0 END
  ELSE CASE status WHEN 'pending' THEN 0 WHEN 'requires_payment_method' THEN 1 WHEN 'requires_confirmation' THEN 2
                   WHEN 'requires_action' THEN 3 WHEN 'processing' THEN 4 WHEN 'requires_capture' THEN 5
                   WHEN 'failed' THEN 6 WHEN 'canceled' THEN 7 WHEN 'succeeded' THEN 8 ELSE 0 END
END;
COMMENT ON FUNCTION billing.status_rank(text, text) IS
  'Tie-break for two events of the same second: the status further along its lifecycle wins.';

-- ---- waiting events ---------------------------------------------------------

-- Events that waited for one of these Stripe ids are applied again (at once:
-- the worker is woken when the transaction commits).
CREATE FUNCTION billing.inbox_requeue(p_ids text[]) RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_ids text[] := array_remove(p_ids, NULL);
  v_n   integer;
BEGIN
  IF v_ids IS NULL OR cardinality(v_ids) = 0 THEN
    RETURN 0;
  END IF;
  WITH woken AS (
    DELETE FROM billing.webhook_waits w
     WHERE w.stripe_event_id IN (SELECT x.stripe_event_id FROM billing.webhook_waits x WHERE x.stripe_id = ANY (v_ids))
    RETURNING w.stripe_event_id)
  UPDATE billing.webhook_events e
     SET state = 'received', attempts = 0, next_attempt_at = now(), waits_for = NULL
   WHERE e.stripe_event_id IN (SELECT stripe_event_id FROM woken) AND e.state IN ('ignored', 'waiting');
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n > 0 THEN
    PERFORM billing.wake_worker();
  END IF;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.inbox_requeue(text[]) IS
  'Put the events that wait for any of these Stripe ids (a customer, a charge, a subscription, an invoice) back in the queue.';

-- ---- asking Stripe ----------------------------------------------------------

-- Ask Stripe, through the outbox, for an object as it is now: GET
-- /v1/<objects>/<id> (kind mirror.<object>.lookup).  Its answer is mirrored
-- like an event when the request is recorded (billing.mirror_fetched),
-- stamped with the second the request was sent, so it is newer than every
-- event created before; a 404 is an answer too (Stripe has no such object:
-- nothing to mirror).  At most one GET per object is queued or in flight at
-- a time.  p_next_second: not sent before the next second, so that its
-- answer is newer than every event of this second (which it must decide).
CREATE FUNCTION billing.fetch_object(p_tenant text, p_object text, p_id text, p_next_second boolean DEFAULT false)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_path text := CASE p_object WHEN 'subscription' THEN '/v1/subscriptions/'
                               WHEN 'invoice' THEN '/v1/invoices/'
                               WHEN 'customer' THEN '/v1/customers/'
                               WHEN 'charge' THEN '/v1/charges/'
                               WHEN 'payment_intent' THEN '/v1/payment_intents/' END;
  v_id   bigint;
BEGIN
  IF v_path IS NULL THEN
    RAISE EXCEPTION 'cannot fetch a Stripe % object', coalesce(quote_literal(p_object), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Objects: subscription, invoice, customer, charge, payment_intent.';
  END IF;
  -- only an id that can go into a path
  IF p_id IS NULL OR p_id !~ '^[a-z]{2,4}_[A-Za-z0-9_]+$' THEN
    RETURN NULL;
  END IF;
  v_id := billing.outbox_enqueue_once(p_tenant, 'mirror.' || p_object || '.lookup', 'GET', v_path || p_id,
                                      p_not_before => CASE WHEN p_next_second
                                                           THEN date_trunc('second', clock_timestamp()) + interval '1 second' END);
  -- (one queued before, not sent yet, goes in the next second too)
  IF p_next_second THEN
    UPDATE billing.stripe_requests
       SET next_attempt_at = greatest(next_attempt_at, date_trunc('second', clock_timestamp()) + interval '1 second')
     WHERE request_id = v_id AND state = 'pending' AND attempts = 0;
  END IF;
  RETURN v_id;
END
$$;
COMMENT ON FUNCTION billing.fetch_object(text, text, text, boolean) IS
  'Queue a GET of a Stripe object (subscription, invoice, customer, charge, payment_intent), once at a time; its answer is mirrored like an event (a 404 mirrors nothing). With p_next_second it is sent in the next second at the earliest.';

-- ---- customers --------------------------------------------------------------

-- tenants.stripe_customer_id: the tenant's newest customer that is not
-- deleted.  The one linked now counts as a candidate too, as the newest
-- when Stripe has told nothing about it yet (qes_billing just created it).
-- Audited when it changes.
CREATE FUNCTION billing.sync_customer(p_tenant text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_old text;
  v_new text;
BEGIN
  SELECT t.stripe_customer_id INTO v_old FROM billing.tenants t WHERE t.tenant_id = p_tenant FOR UPDATE;
  SELECT x.id INTO v_new
    FROM (SELECT c.stripe_customer_id AS id, c.stripe_created AS created FROM billing.stripe_customers c
           WHERE c.tenant_id = p_tenant AND c.deleted_at IS NULL
          UNION ALL
          SELECT v_old, NULL WHERE v_old IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM billing.stripe_customers c WHERE c.stripe_customer_id = v_old)) x
   ORDER BY x.created DESC NULLS FIRST, x.id DESC LIMIT 1;
  IF v_new IS DISTINCT FROM v_old THEN
    UPDATE billing.tenants SET stripe_customer_id = v_new, updated_at = now() WHERE tenant_id = p_tenant;
    PERFORM billing.audit('customer.linked', p_tenant, jsonb_build_object('customer', v_new, 'previous', v_old));
  END IF;
END
$$;
COMMENT ON FUNCTION billing.sync_customer(text) IS
  'Link the tenant to its newest Stripe customer that is not deleted (audited as customer.linked when it changes).';

-- A customer linked to a tenant (by the outbox's customer.create, the
-- platform, or the mirror): the events that waited for it are applied.
CREATE FUNCTION billing.customer_linked() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF NEW.stripe_customer_id IS NOT NULL THEN
    PERFORM billing.inbox_requeue(ARRAY[NEW.stripe_customer_id]);
  END IF;
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing.customer_linked() IS
  'Trigger: events that waited for a customer are applied once it is linked to a tenant.';
CREATE TRIGGER customer_linked AFTER INSERT OR UPDATE OF stripe_customer_id ON billing.tenants
  FOR EACH ROW EXECUTE FUNCTION billing.customer_linked();

CREATE FUNCTION billing.apply_customer(p_tenant text, o jsonb, p_at timestamptz, p_deleted boolean) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_deleted boolean := p_deleted OR coalesce((o ->> 'deleted')::boolean, false);
BEGIN
  -- a deleted customer stays deleted: an older created/updated changes nothing
  INSERT INTO billing.stripe_customers AS c (tenant_id, stripe_customer_id, stripe_created, deleted_at)
  VALUES (p_tenant, o ->> 'id', to_timestamp((o ->> 'created')::bigint), CASE WHEN v_deleted THEN p_at END)
  ON CONFLICT (stripe_customer_id) DO UPDATE
    SET stripe_created = coalesce(c.stripe_created, EXCLUDED.stripe_created),
        deleted_at = least(c.deleted_at, EXCLUDED.deleted_at);
  PERFORM billing.sync_customer(t.tenant_id)
     FROM billing.stripe_customers c JOIN billing.tenants t USING (tenant_id)
    WHERE c.stripe_customer_id = o ->> 'id';
  IF NOT v_deleted THEN
    PERFORM billing.inbox_requeue(ARRAY[o ->> 'id']);
  END IF;
END
$$;

-- ---- subscriptions -----------------------------------------------------------

-- The grace period of a past_due subscription runs from the first failed
-- attempt of its oldest unpaid invoice: the created time of the earliest
-- invoice.payment_failed, else (that event late or lost) the invoice's
-- finalization, else (no unpaid invoice mirrored yet) the start of the
-- period the renewal failed for.  All of them Stripe's times.
CREATE FUNCTION billing.dunning_since(s billing.subscriptions) RETURNS timestamptz
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(
    (SELECT min(coalesce(i.first_failed_at, i.finalized_at, i.stripe_created)) FROM billing.invoices i
      WHERE i.tenant_id = s.tenant_id AND i.stripe_subscription_id = s.stripe_subscription_id
        AND i.status IN ('open', 'uncollectible') AND (i.first_failed_at IS NOT NULL OR i.attempt_count > 0)),
    (SELECT min(coalesce(i.finalized_at, i.stripe_created)) FROM billing.invoices i
      WHERE i.tenant_id = s.tenant_id AND i.stripe_subscription_id = s.stripe_subscription_id
        AND i.status IN ('open', 'uncollectible')),
    s.current_period_start, s.stripe_state_at)
$$;
COMMENT ON FUNCTION billing.dunning_since(billing.subscriptions) IS
  'When a past_due subscription''s dunning began, in Stripe''s time: the first failed attempt of its oldest unpaid invoice (else the invoice''s finalization, else its period''s start).';

-- grace_until, derived from the mirrored subscription and its invoices
-- (never from when an event was applied).  It is the entitlement, not a
-- fact: what the tenant is told and what is audited about dunning are the
-- facts of each failed invoice (billing.sync_invoice_failure, below), the
-- same in every delivery order.
CREATE FUNCTION billing.sync_dunning(p_tenant text, p_subscription_id bigint) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  s       billing.subscriptions;
  v_since timestamptz;
  v_grace timestamptz;
BEGIN
  SELECT * INTO s FROM billing.subscriptions
   WHERE tenant_id = p_tenant AND subscription_id = p_subscription_id FOR UPDATE;
  IF NOT FOUND OR s.stripe_subscription_id IS NULL THEN
    RETURN;   -- local (Free, or waiting for Stripe): no dunning
  END IF;
  -- past_due, unless an invoice paid after that state settled every failed
  -- one (Stripe's own update to active follows, or is fetched)
  IF s.status = 'past_due'
     AND (EXISTS (SELECT 1 FROM billing.invoices i
                   WHERE i.tenant_id = s.tenant_id AND i.stripe_subscription_id = s.stripe_subscription_id
                     AND i.status IN ('open', 'uncollectible') AND (i.first_failed_at IS NOT NULL OR i.attempt_count > 0))
          OR NOT EXISTS (SELECT 1 FROM billing.invoices i
                          WHERE i.tenant_id = s.tenant_id AND i.stripe_subscription_id = s.stripe_subscription_id
                            AND i.status = 'paid' AND coalesce(i.paid_at, i.stripe_state_at) >= s.stripe_state_at)) THEN
    v_since := billing.dunning_since(s);
    v_grace := v_since + current_setting('qes_billing.grace_period')::interval;
  END IF;
  IF v_grace IS DISTINCT FROM s.grace_until THEN
    UPDATE billing.subscriptions SET grace_until = v_grace, updated_at = now()
     WHERE tenant_id = s.tenant_id AND subscription_id = s.subscription_id;
  END IF;
  IF s.status IN ('canceled', 'incomplete_expired') THEN
    -- ended: a failed invoice still unpaid ended with it (dunning.ended)
    PERFORM billing.sync_invoice_failure(f.tenant_id, f.stripe_invoice_id)
       FROM billing.invoice_failures f
      WHERE f.tenant_id = s.tenant_id AND f.stripe_subscription_id = s.stripe_subscription_id
        AND f.recovered_at IS NULL AND f.ended_at IS NULL;
  END IF;
END
$$;
COMMENT ON FUNCTION billing.sync_dunning(text, bigint) IS
  'Derive a subscription''s grace period from Stripe''s facts (past_due status, the first failed attempt of its oldest unpaid invoice). The dunning facts are billing.sync_invoice_failure''s.';

-- ---- dunning facts: what the tenant is told, what is audited ---------------
--
-- Side effects follow Stripe's timeline, not the order events arrive in
-- (docs/architecture.md, "Mirroring Stripe"): each is a fact about one
-- failed invoice, decided once and kept here, so every delivery order --
-- repeated, shuffled, days late -- tells and audits the same facts:
--
--   dunning.started    the invoice of a running subscription (any invoice
--                      but its first, subscription_create) failed: since =
--                      its first failed attempt, grace_until = since +
--                      qes_billing.grace_period (Stripe's times)
--   told / not told    whether the tenant is told (payment.failed): only a
--                      failure that still holds when the mirror learns it.
--                      The mirror vouches for that when its view of the
--                      invoice is fresh (billing.fresh_within: Stripe
--                      delivers within seconds); a failure learnt later --
--                      a late or replayed event -- is checked with one GET
--                      of the invoice first.  Paid (or voided) by then: not
--                      told, whatever order the mirror learnt things in.
--   dunning.recovered  the invoice was paid after the tenant was told of
--                      its failure: payment.recovered, about that invoice
--   dunning.recovered_before_known
--                      it was paid before the mirror could tell the tenant
--                      (since, grace_until, recovered_at: Stripe's times;
--                      learnt_at: ours): audited, nobody told
--   dunning.ended      the subscription ended while it was unpaid
--
-- Grace periods that end unpaid are told by a timer (billing.notify_timers,
-- 89_notify.sql), checked the same way before they are.

-- How fresh the mirror's view of an object must be to decide, without
-- asking Stripe, that something still holds.  Stripe delivers an event
-- within seconds; one applied later than this may have been overtaken by
-- events not delivered yet.
CREATE FUNCTION billing.fresh_within() RETURNS interval
  LANGUAGE sql IMMUTABLE
RETURN interval '5 minutes';
COMMENT ON FUNCTION billing.fresh_within() IS
  'How old (in Stripe''s time) the mirror''s view of an object may be for a notification to rely on it; an older view is checked with Stripe first.';

CREATE FUNCTION billing.sync_invoice_failure(p_tenant text, p_invoice text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  i        billing.invoices;
  f        billing.invoice_failures;
  s        billing.subscriptions;
  r        billing.stripe_requests;
  v_sub    text;
  v_dun    boolean;
  v_since  timestamptz;
  v_paid   timestamptz;
  v_told   boolean;
  v_asked  boolean;
  v_facts  jsonb;
BEGIN
  SELECT * INTO i FROM billing.invoices x WHERE x.tenant_id = p_tenant AND x.stripe_invoice_id = p_invoice;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT * INTO f FROM billing.invoice_failures x
   WHERE x.tenant_id = p_tenant AND x.stripe_invoice_id = p_invoice FOR UPDATE;
  IF NOT FOUND THEN
    IF i.first_failed_at IS NOT NULL THEN
      INSERT INTO billing.invoice_failures (tenant_id, stripe_invoice_id) VALUES (p_tenant, p_invoice)
      RETURNING * INTO f;
    ELSIF EXISTS (SELECT FROM billing.notifications n
                   WHERE n.tenant_id = p_tenant AND n.dedup_key = 'payment_failed:' || p_invoice) THEN
      -- a failure notice queued without its facts (by hand, or by 0.1): told
      INSERT INTO billing.invoice_failures (tenant_id, stripe_invoice_id, told, decided_at)
      VALUES (p_tenant, p_invoice, true, now())
      RETURNING * INTO f;
    ELSE
      RETURN;   -- nothing failed
    END IF;
  END IF;

  v_sub := coalesce(i.stripe_subscription_id,
                    (SELECT x.stripe_subscription_id FROM billing.subscriptions x
                      WHERE x.tenant_id = i.tenant_id AND x.subscription_id = i.subscription_id));
  v_dun := v_sub IS NOT NULL AND i.billing_reason IS DISTINCT FROM 'subscription_create';
  v_since := coalesce(i.first_failed_at, i.finalized_at, i.stripe_created);
  v_paid := CASE WHEN i.status = 'paid' THEN coalesce(i.paid_at, i.stripe_state_at, i.updated_at) END;
  v_facts := jsonb_build_object('subscription', v_sub, 'invoice', p_invoice, 'since', v_since,
                                'grace_until', v_since + current_setting('qes_billing.grace_period')::interval);
  IF f.stripe_subscription_id IS DISTINCT FROM v_sub THEN
    UPDATE billing.invoice_failures x SET stripe_subscription_id = v_sub
     WHERE x.tenant_id = p_tenant AND x.stripe_invoice_id = p_invoice;
  END IF;

  -- the episode began: a fact of Stripe's timeline, whatever else is known
  IF v_dun AND f.started_at IS NULL THEN
    UPDATE billing.invoice_failures x SET started_at = v_since
     WHERE x.tenant_id = p_tenant AND x.stripe_invoice_id = p_invoice;
    PERFORM billing.audit('dunning.started', p_tenant, v_facts);
  END IF;

  -- the lookup that checks it, when one was sent and is over (an answer
  -- once it is mirrored: a batch of answers is marked succeeded before each
  -- is applied)
  IF f.lookup_request IS NOT NULL THEN
    SELECT * INTO r FROM billing.stripe_requests x WHERE x.request_id = f.lookup_request;
    v_asked := NOT FOUND OR r.state = 'failed'
               OR (r.state = 'succeeded' AND (r.http_status <> 200 OR i.stripe_state_at >= billing.outbox_state_at(r)));
  END IF;

  -- tell the tenant?  Only what still holds when the mirror learns it
  IF f.told IS NULL THEN
    IF i.status IN ('paid', 'void') THEN
      v_told := false;
    ELSIF i.stripe_state_at >= billing.now() - billing.fresh_within() THEN
      v_told := true;
    ELSIF v_asked THEN
      -- asked: the answer, mirrored, said unpaid; Stripe has no such
      -- invoice (404): nothing to tell; no answer at all: tell
      v_told := NOT coalesce(r.state = 'succeeded' AND r.http_status = 404, false);
    ELSIF f.lookup_request IS NULL THEN
      UPDATE billing.invoice_failures x SET lookup_request = coalesce(billing.fetch_object(p_tenant, 'invoice', p_invoice), 0)
       WHERE x.tenant_id = p_tenant AND x.stripe_invoice_id = p_invoice;
    END IF;
    IF v_told IS NOT NULL THEN
      UPDATE billing.invoice_failures x SET told = v_told, decided_at = now()
       WHERE x.tenant_id = p_tenant AND x.stripe_invoice_id = p_invoice;
      f.told := v_told;
      IF v_told THEN
        INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
        VALUES (p_tenant, 'payment.failed', 'payment_failed:' || p_invoice,
                jsonb_build_object('invoice', p_invoice, 'subscription', v_sub, 'amount_due', i.amount_due,
                                   'hosted_invoice_url', i.hosted_invoice_url))
        ON CONFLICT (tenant_id, dedup_key) DO NOTHING;
      END IF;
    END IF;
  END IF;

  IF NOT v_dun OR f.told IS NULL THEN
    RETURN;
  END IF;

  -- paid: recovered (told) or recovered before it was known (not told)
  IF v_paid IS NOT NULL AND f.recovered_at IS NULL THEN
    UPDATE billing.invoice_failures x SET recovered_at = v_paid
     WHERE x.tenant_id = p_tenant AND x.stripe_invoice_id = p_invoice;
    IF f.told THEN
      PERFORM billing.audit('dunning.recovered', p_tenant, v_facts || jsonb_build_object('recovered_at', v_paid));
      INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
      VALUES (p_tenant, 'payment.recovered', 'payment_recovered:' || p_invoice,
              jsonb_build_object('invoice', p_invoice, 'subscription', v_sub, 'subscription_id', i.subscription_id,
                                 'since', v_since, 'recovered_at', v_paid))
      ON CONFLICT (tenant_id, dedup_key) DO NOTHING;
    ELSE
      PERFORM billing.audit('dunning.recovered_before_known', p_tenant,
                            v_facts || jsonb_build_object('recovered_at', v_paid, 'learnt_at', f.learnt_at));
    END IF;
  END IF;

  -- the subscription ended while the invoice was unpaid (as Stripe had it
  -- when it ended: the mirror's view of the invoice is as of then, or the
  -- invoice was looked up)
  IF f.ended_at IS NULL AND v_paid IS NULL THEN
    SELECT * INTO s FROM billing.subscriptions x WHERE x.stripe_subscription_id = v_sub;
    IF s.status IN ('canceled', 'incomplete_expired') AND s.ended_at IS NOT NULL THEN
      IF i.stripe_state_at >= least(s.ended_at, billing.now() - billing.fresh_within()) OR v_asked THEN
        UPDATE billing.invoice_failures x SET ended_at = s.ended_at
         WHERE x.tenant_id = p_tenant AND x.stripe_invoice_id = p_invoice;
        PERFORM billing.audit('dunning.ended', p_tenant, v_facts || jsonb_build_object('ended_at', s.ended_at));
      ELSIF f.lookup_request IS NULL THEN
        UPDATE billing.invoice_failures x SET lookup_request = coalesce(billing.fetch_object(p_tenant, 'invoice', p_invoice), 0)
         WHERE x.tenant_id = p_tenant AND x.stripe_invoice_id = p_invoice;
      END IF;
    END IF;
  END IF;
END
$$;
COMMENT ON FUNCTION billing.sync_invoice_failure(text, text) IS
  'Decide and record the facts of a failed invoice, once each and from Stripe''s times: dunning.started, whether the tenant is told (payment.failed; a failure learnt late is checked with Stripe first), dunning.recovered (with payment.recovered) or dunning.recovered_before_known, dunning.ended.';

-- Whatever changes an invoice (an event, a GET's answer, reconciliation,
-- an upgrade), its failure's facts follow.
CREATE FUNCTION billing.invoice_failure_changed() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.sync_invoice_failure(NEW.tenant_id, NEW.stripe_invoice_id);
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing.invoice_failure_changed() IS
  'Trigger: a failed (or paid) invoice that changed has its dunning facts decided (billing.sync_invoice_failure).';
-- (an invoice that never failed costs nothing: only one that failed, or
-- becomes paid -- a notice queued without its facts -- is looked at)
CREATE TRIGGER invoice_failure AFTER INSERT ON billing.invoices
  FOR EACH ROW WHEN (NEW.first_failed_at IS NOT NULL)
  EXECUTE FUNCTION billing.invoice_failure_changed();
CREATE TRIGGER invoice_failure_changed AFTER UPDATE ON billing.invoices
  FOR EACH ROW WHEN (NEW.first_failed_at IS NOT NULL OR (NEW.status = 'paid' AND OLD.status IS DISTINCT FROM 'paid'))
  EXECUTE FUNCTION billing.invoice_failure_changed();

-- The answer (or the end) of a lookup a failure waited for: its facts are
-- decided.  (An answer of 200 is mirrored by billing.mirror_fetched, whose
-- change of the invoice decides them.)
CREATE FUNCTION billing.invoice_lookup_done(p_req billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.sync_invoice_failure(f.tenant_id, f.stripe_invoice_id)
     FROM billing.invoice_failures f WHERE f.lookup_request = p_req.request_id;
  RETURN;
END
$$;
COMMENT ON FUNCTION billing.invoice_lookup_done(billing.stripe_requests) IS
  'Run by billing.request_recorded: a lookup of a failed invoice ended without an answer to mirror (404, or failed for good): the failure''s facts are decided with what the mirror has.';

-- Usage is filed under the period it occurred in as the mirror stood when
-- it was recorded.  When the mirror learns of a period late -- a first
-- payment, a renewal, an interval switch, an end or a cancellation whose
-- event came after the usage -- the usage that occurred from p_from on is
-- moved to the period it occurred in as the mirror stands now
-- (billing.usage_period), so that it counts there and nowhere else
-- (docs/architecture.md, "Billing periods").  Usage before p_from keeps its
-- period.  Rows of other tenants are not touched; the usage counters are
-- rebuilt from the table after the commit (the usage_changed trigger).
-- Audited when anything moved.
CREATE FUNCTION billing.rekey_usage_from(p_tenant text, p_from timestamptz) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  IF p_from IS NULL THEN
    RETURN 0;
  END IF;
  -- a row that occurred from p_from on carries a key no more than a year
  -- (the longest period) before it: the usage_events_period index bounds it
  UPDATE billing.usage_events u SET period_start = p.period_start
    FROM (SELECT x.idempotency_key, (billing.usage_period(p_tenant, x.occurred_at)).period_start
            FROM billing.usage_events x
           WHERE x.tenant_id = p_tenant AND x.period_start >= p_from - interval '13 months'
             AND x.occurred_at >= p_from) p
   WHERE u.tenant_id = p_tenant AND u.idempotency_key = p.idempotency_key
     AND u.period_start <> p.period_start;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n > 0 THEN
    PERFORM billing.audit('usage.rekeyed', p_tenant,
                          jsonb_build_object('from', p_from, 'events', v_n));
  END IF;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.rekey_usage_from(text, timestamptz) IS
  'Move the tenant''s usage that occurred from p_from on into the period it occurred in as the mirror stands now (the mirror learnt of a period, an end or a cancellation after the usage). Audited as usage.rekeyed.';

-- One subscription state.  Returns the Stripe ids it waits for when it
-- cannot be applied yet (the tenant has another current subscription whose
-- end is not mirrored: that one is fetched from Stripe meanwhile).
CREATE FUNCTION billing.apply_subscription_state(p_tenant text, o jsonb, p_at timestamptz, p_deleted boolean,
                                                 p_source text DEFAULT 'event', OUT waits_for text[])
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_price    jsonb := billing.base_item(o) -> 'price';
  v_plan     text;
  v_int      text;
  v_status   text := CASE WHEN p_deleted THEN 'canceled' ELSE o ->> 'status' END;
  v_terminal boolean;
  v_sub      billing.subscriptions;
  v_other    billing.subscriptions;
  v_id       bigint;
  v_pstart   timestamptz := to_timestamp((coalesce(o ->> 'current_period_start',
                                                   billing.base_item(o) ->> 'current_period_start'))::bigint);
  v_pend     timestamptz := to_timestamp((coalesce(o ->> 'current_period_end',
                                                   billing.base_item(o) ->> 'current_period_end'))::bigint);
  v_cancel   boolean := coalesce((o ->> 'cancel_at_period_end')::boolean, false);
  v_trial    timestamptz := to_timestamp((o ->> 'trial_end')::bigint);
  v_anchor   timestamptz := to_timestamp((o ->> 'billing_cycle_anchor')::bigint);
  v_ended    timestamptz := to_timestamp((o ->> 'ended_at')::bigint);
BEGIN
  SELECT pr.plan_id, pr.billing_interval INTO v_plan, v_int FROM billing.prices pr
   WHERE pr.stripe_price_id = v_price ->> 'id' OR pr.price_key = v_price ->> 'lookup_key'
   ORDER BY pr.stripe_price_id = v_price ->> 'id' DESC NULLS LAST LIMIT 1;
  IF v_plan IS NULL THEN
    RAISE EXCEPTION 'subscription % has price % which is in no plan of the catalog', o ->> 'id', v_price ->> 'id'
      USING ERRCODE = 'foreign_key_violation', HINT = 'Run qes_billing_setup --setup-products, or set billing.prices.stripe_price_id.';
  END IF;
  v_int := coalesce(v_price -> 'recurring' ->> 'interval', v_int);
  IF v_status IS NULL OR v_status NOT IN ('incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due',
                                          'canceled', 'unpaid', 'paused') THEN
    RAISE EXCEPTION 'subscription % has an unknown status %', o ->> 'id', coalesce(quote_literal(v_status), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Stripe''s subscription statuses: incomplete, incomplete_expired, trialing, active, past_due, canceled, unpaid, paused.';
  END IF;
  v_terminal := v_status IN ('canceled', 'incomplete_expired');
  IF v_terminal THEN
    v_ended := coalesce(v_ended, to_timestamp((o ->> 'canceled_at')::bigint), p_at);
  END IF;

  SELECT * INTO v_sub FROM billing.subscriptions s WHERE s.stripe_subscription_id = o ->> 'id' FOR UPDATE;
  IF NOT FOUND AND NOT v_terminal THEN
    -- the tenant's current local subscription (Free, or one waiting for Stripe) becomes this one
    SELECT * INTO v_sub FROM billing.subscriptions s
     WHERE s.tenant_id = p_tenant AND s.stripe_subscription_id IS NULL
       AND s.status NOT IN ('canceled', 'incomplete_expired') FOR UPDATE;
  END IF;

  IF v_sub.subscription_id IS NOT NULL AND v_sub.stripe_subscription_id IS NOT NULL
     AND v_sub.stripe_state_at IS NOT NULL THEN
    IF v_sub.status IN ('canceled', 'incomplete_expired') AND NOT v_terminal THEN
      RETURN;   -- an ended subscription is never revived (whatever the times say)
    ELSIF v_terminal AND v_sub.status NOT IN ('canceled', 'incomplete_expired') THEN
      NULL;     -- and its end always wins
    ELSIF v_sub.stripe_state_at > p_at THEN
      RETURN;   -- an older state: the newer one stays
    ELSIF v_sub.stripe_state_at = p_at THEN
      IF (v_sub.status, v_sub.plan_id, v_sub.billing_interval, v_sub.current_period_start, v_sub.current_period_end,
          v_sub.cancel_at_period_end, v_sub.trial_end)
         IS NOT DISTINCT FROM (v_status, v_plan, v_int, v_pstart, v_pend, v_cancel, v_trial) THEN
        -- the same state again: only fill in what it adds
        UPDATE billing.subscriptions
           SET billing_cycle_anchor = coalesce(billing_cycle_anchor, v_anchor),
               stripe_created = coalesce(stripe_created, to_timestamp((o ->> 'created')::bigint))
         WHERE tenant_id = v_sub.tenant_id AND subscription_id = v_sub.subscription_id
           AND (billing_cycle_anchor IS NULL OR stripe_created IS NULL);
        RETURN;
      END IF;
      -- two different states of the same second.  Two answers of the
      -- outbox: the one recorded later was asked for later, and wins.
      -- Otherwise Stripe's order is not known: ask Stripe in the next
      -- second (its answer is newer than both) and meanwhile let a fixed
      -- rule decide, the same in every delivery order.
      IF p_source = 'answer' AND v_sub.stripe_state_source = 'answer' THEN
        NULL;
      ELSE
        PERFORM billing.fetch_object(p_tenant, 'subscription', o ->> 'id', true);
        IF (coalesce(v_sub.current_period_end, '-infinity'), billing.status_rank('subscription', v_sub.status),
          v_sub.cancel_at_period_end, coalesce(v_sub.stripe_price_id, ''), coalesce(v_sub.trial_end, '-infinity'))
         >= (coalesce(v_pend, '-infinity'), billing.status_rank('subscription', v_status),
             v_cancel, coalesce(v_price ->> 'id', ''), coalesce(v_trial, '-infinity')) THEN
          RETURN;
        END IF;
      END IF;
    END IF;
  END IF;

  IF NOT v_terminal THEN
    -- one current subscription per tenant: another one whose end is late or lost?
    SELECT * INTO v_other FROM billing.subscriptions s
     WHERE s.tenant_id = p_tenant AND s.stripe_subscription_id IS NOT NULL
       AND s.stripe_subscription_id <> o ->> 'id' AND s.status NOT IN ('canceled', 'incomplete_expired');
    IF FOUND THEN
      PERFORM billing.fetch_object(p_tenant, 'subscription', v_other.stripe_subscription_id);
      waits_for := ARRAY[v_other.stripe_subscription_id, o ->> 'id'];
      RETURN;
    END IF;
  END IF;

  IF v_sub.subscription_id IS NOT NULL THEN
    UPDATE billing.subscriptions SET
      stripe_subscription_id = o ->> 'id', plan_id = v_plan, billing_interval = v_int, status = v_status,
      stripe_price_id = v_price ->> 'id', current_period_start = v_pstart, current_period_end = v_pend,
      cancel_at_period_end = v_cancel, trial_end = v_trial,
      billing_cycle_anchor = coalesce(v_anchor, billing_cycle_anchor),
      stripe_created = coalesce(to_timestamp((o ->> 'created')::bigint), stripe_created),
      ended_at = CASE WHEN v_terminal THEN least(ended_at, v_ended) END,
      stripe_state_at = greatest(stripe_state_at, p_at), stripe_state_source = p_source, updated_at = now()
     WHERE tenant_id = v_sub.tenant_id AND subscription_id = v_sub.subscription_id;
    v_id := v_sub.subscription_id;
    p_tenant := v_sub.tenant_id;
  ELSE
    INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, stripe_subscription_id,
                                       stripe_price_id, current_period_start, current_period_end,
                                       cancel_at_period_end, trial_end, stripe_state_at, billing_cycle_anchor,
                                       stripe_created, ended_at, stripe_state_source)
    VALUES (p_tenant, v_plan, v_int, v_status, o ->> 'id', v_price ->> 'id', v_pstart, v_pend,
            v_cancel, v_trial, p_at, v_anchor, to_timestamp((o ->> 'created')::bigint),
            CASE WHEN v_terminal THEN v_ended END, p_source)
    RETURNING subscription_id INTO v_id;
    PERFORM billing.audit_features(p_tenant, v_id, NULL, NULL, v_plan, v_status);
  END IF;

  -- periods the usage was not filed under (renewed, switched, paid for the
  -- first time, ended or cancelled after the usage was recorded): what
  -- occurred from the start of this state's period on moves to the period
  -- it occurred in; what occurred before keeps its period
  IF v_sub.subscription_id IS NULL
     OR (v_sub.current_period_start, v_sub.current_period_end, v_sub.billing_interval,
         v_sub.status IN ('trialing', 'active', 'past_due', 'unpaid', 'paused'),
         v_sub.status IN ('canceled', 'incomplete_expired'))
        IS DISTINCT FROM
        (v_pstart, v_pend, v_int, v_status IN ('trialing', 'active', 'past_due', 'unpaid', 'paused'), v_terminal)
     OR (v_anchor IS NOT NULL AND v_sub.billing_cycle_anchor IS DISTINCT FROM v_anchor) THEN
    PERFORM billing.rekey_usage_from(p_tenant, v_pstart);
  END IF;

  -- its invoices, whichever arrived first
  UPDATE billing.invoices SET subscription_id = v_id, updated_at = now()
   WHERE tenant_id = p_tenant AND stripe_subscription_id = o ->> 'id' AND subscription_id IS DISTINCT FROM v_id;
  PERFORM billing.sync_dunning(p_tenant, v_id);
  IF v_terminal THEN
    -- a subscription that waited for this one to end
    PERFORM billing.inbox_requeue(ARRAY[o ->> 'id']);
  END IF;
END
$$;
COMMENT ON FUNCTION billing.apply_subscription_state(text, jsonb, timestamptz, boolean, text) IS
  'Mirror one state of a Stripe subscription (newest wins; an ended one is never revived; a same-second conflict is fetched from Stripe). Returns the Stripe ids it must wait for, NULL when applied or older.';

-- For answers of the outbox (billing.outbox_apply): a subscription that
-- cannot be applied yet is an error there, so the answer is asked for again.
-- Its state is Stripe's when the request was sent (source 'answer').
CREATE FUNCTION billing.apply_subscription(p_tenant text, o jsonb, p_at timestamptz, p_deleted boolean)
  RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_waits text[] := billing.apply_subscription_state(p_tenant, o, p_at, p_deleted, 'answer');
BEGIN
  IF v_waits IS NOT NULL THEN
    RAISE EXCEPTION 'subscription % of tenant % waits for the end of subscription %', o ->> 'id', p_tenant, v_waits[1]
      USING ERRCODE = 'unique_violation', HINT = 'The other subscription is being fetched from Stripe; this answer is applied again after it.';
  END IF;
END
$$;
COMMENT ON FUNCTION billing.apply_subscription(text, jsonb, timestamptz, boolean) IS
  'Mirror one state of a Stripe subscription (as billing.apply_subscription_state); an error when it must wait for another subscription''s end.';

-- ---- invoices and payments ---------------------------------------------------

-- An invoice's subscription: top level before API 2025-03-31, under parent since.
CREATE FUNCTION billing.invoice_subscription(o jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN coalesce(billing.stripe_ref(o -> 'subscription'),
                o -> 'parent' -> 'subscription_details' ->> 'subscription');

-- Record that a payment intent pays an invoice (from either side); the
-- payment, when mirrored, becomes a subscription payment.
CREATE FUNCTION billing.link_invoice_payment(p_tenant text, p_invoice text, p_payment_intent text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF p_invoice IS NULL OR p_payment_intent IS NULL OR p_invoice !~ '^in_' OR p_payment_intent !~ '^pi_' THEN
    RETURN;
  END IF;
  INSERT INTO billing.invoice_payments (tenant_id, stripe_payment_intent_id, stripe_invoice_id)
  VALUES (p_tenant, p_payment_intent, p_invoice) ON CONFLICT DO NOTHING;
  IF FOUND THEN
    UPDATE billing.payments SET kind = 'subscription', stripe_invoice_id = coalesce(stripe_invoice_id, p_invoice),
                                updated_at = now()
     WHERE tenant_id = p_tenant AND stripe_payment_intent_id = p_payment_intent
       AND (kind <> 'subscription' OR stripe_invoice_id IS NULL);
  END IF;
END
$$;

CREATE FUNCTION billing.apply_invoice(p_tenant text, o jsonb, p_at timestamptz, p_failed boolean DEFAULT false,
                                      p_fetched boolean DEFAULT false, p_api_version text DEFAULT NULL)
  RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_old    billing.invoices;
  v_sub    billing.subscriptions;
  v_subid  text := billing.invoice_subscription(o);
  v_newer  boolean;
  v_pi     text;
  v_st     jsonb := o -> 'status_transitions';
BEGIN
  IF v_subid IS NOT NULL THEN
    SELECT * INTO v_sub FROM billing.subscriptions s WHERE s.tenant_id = p_tenant AND s.stripe_subscription_id = v_subid;
  END IF;
  SELECT * INTO v_old FROM billing.invoices i WHERE i.stripe_invoice_id = o ->> 'id' FOR UPDATE;
  IF NOT FOUND THEN
    INSERT INTO billing.invoices (tenant_id, stripe_invoice_id, subscription_id, stripe_subscription_id, number, status,
                                  amount_due, amount_paid, amount_remaining, currency, period_start, period_end,
                                  hosted_invoice_url, invoice_pdf, stripe_created, stripe_state_at, first_failed_at,
                                  attempt_count, finalized_at, paid_at, billing_reason)
    VALUES (p_tenant, o ->> 'id', v_sub.subscription_id, v_subid, o ->> 'number', o ->> 'status',
            coalesce((o ->> 'amount_due')::bigint, 0), coalesce((o ->> 'amount_paid')::bigint, 0),
            coalesce((o ->> 'amount_remaining')::bigint, 0), o ->> 'currency',
            to_timestamp((o ->> 'period_start')::bigint), to_timestamp((o ->> 'period_end')::bigint),
            o ->> 'hosted_invoice_url', o ->> 'invoice_pdf', to_timestamp((o ->> 'created')::bigint), p_at,
            CASE WHEN p_failed THEN p_at END, coalesce((o ->> 'attempt_count')::integer, 0),
            to_timestamp((v_st ->> 'finalized_at')::bigint),
            least(to_timestamp((v_st ->> 'paid_at')::bigint), CASE WHEN o ->> 'status' = 'paid' THEN p_at END),
            o ->> 'billing_reason');
    PERFORM billing.inbox_requeue(ARRAY[o ->> 'id']);
  ELSE
    v_newer := v_old.stripe_state_at IS NULL OR v_old.stripe_state_at < p_at
               OR (v_old.stripe_state_at = p_at
                   AND (billing.status_rank('invoice', v_old.status), v_old.status, v_old.amount_paid,
                        v_old.amount_remaining, coalesce(v_old.number, ''))
                       < (billing.status_rank('invoice', o ->> 'status'), o ->> 'status',
                          coalesce((o ->> 'amount_paid')::bigint, 0), coalesce((o ->> 'amount_remaining')::bigint, 0),
                          coalesce(o ->> 'number', '')));
    UPDATE billing.invoices i SET
      -- the newest state
      number = CASE WHEN v_newer THEN coalesce(o ->> 'number', i.number) ELSE i.number END,
      status = CASE WHEN v_newer THEN o ->> 'status' ELSE i.status END,
      amount_due = CASE WHEN v_newer THEN coalesce((o ->> 'amount_due')::bigint, 0) ELSE i.amount_due END,
      amount_paid = CASE WHEN v_newer THEN coalesce((o ->> 'amount_paid')::bigint, 0) ELSE i.amount_paid END,
      amount_remaining = CASE WHEN v_newer THEN coalesce((o ->> 'amount_remaining')::bigint, 0) ELSE i.amount_remaining END,
      hosted_invoice_url = CASE WHEN v_newer THEN coalesce(o ->> 'hosted_invoice_url', i.hosted_invoice_url) ELSE i.hosted_invoice_url END,
      invoice_pdf = CASE WHEN v_newer THEN coalesce(o ->> 'invoice_pdf', i.invoice_pdf) ELSE i.invoice_pdf END,
      stripe_state_at = CASE WHEN v_newer THEN p_at ELSE i.stripe_state_at END,
      -- facts, whatever the order
      subscription_id = coalesce(v_sub.subscription_id, i.subscription_id),
      stripe_subscription_id = coalesce(i.stripe_subscription_id, v_subid),
      first_failed_at = least(i.first_failed_at, CASE WHEN p_failed THEN p_at END),
      attempt_count = greatest(i.attempt_count, coalesce((o ->> 'attempt_count')::integer, 0)),
      finalized_at = coalesce(i.finalized_at, to_timestamp((v_st ->> 'finalized_at')::bigint)),
      -- paid: status_transitions.paid_at, else the earliest state that says paid
      paid_at = least(i.paid_at, to_timestamp((v_st ->> 'paid_at')::bigint),
                      CASE WHEN o ->> 'status' = 'paid' THEN p_at END),
      billing_reason = coalesce(i.billing_reason, o ->> 'billing_reason'),
      updated_at = now()
     WHERE tenant_id = v_old.tenant_id AND stripe_invoice_id = v_old.stripe_invoice_id;
  END IF;

  -- which payment intent pays it: named on the invoice before API
  -- 2025-03-31, in its payments (InvoicePayment) since
  v_pi := billing.stripe_ref(o -> 'payment_intent');
  PERFORM billing.link_invoice_payment(p_tenant, o ->> 'id', v_pi);
  PERFORM billing.link_invoice_payment(p_tenant, o ->> 'id', billing.stripe_ref(p -> 'payment' -> 'payment_intent'))
     FROM jsonb_array_elements(CASE WHEN jsonb_typeof(o -> 'payments' -> 'data') = 'array'
                                    THEN o -> 'payments' -> 'data' ELSE '[]' END) p;
  IF NOT p_fetched AND p_api_version >= '2025-03-31' AND NOT o ? 'payment_intent' AND o -> 'payments' IS NULL
     AND (coalesce((o ->> 'amount_paid')::bigint, 0) > 0 OR coalesce((o ->> 'attempt_count')::integer, 0) > 0) THEN
    -- a newer API shape (2025-03-31 and later): the payment intent is only
    -- on the invoice's payments; the invoice in the pinned version names it
    PERFORM billing.fetch_object(p_tenant, 'invoice', o ->> 'id');
  END IF;

  IF v_sub.subscription_id IS NOT NULL THEN
    PERFORM billing.sync_dunning(v_sub.tenant_id, v_sub.subscription_id);
    -- an invoice that contradicts the mirrored status (the subscription's
    -- own update is late or lost): ask Stripe for the subscription
    IF NOT p_fetched AND p_at >= coalesce(v_sub.stripe_state_at, '-infinity')
       AND ((p_failed AND v_sub.status IN ('active', 'trialing'))
            OR (o ->> 'status' = 'paid' AND v_sub.status IN ('past_due', 'unpaid'))) THEN
      PERFORM billing.fetch_object(p_tenant, 'subscription', v_subid);
    END IF;
  ELSIF v_subid IS NOT NULL AND NOT EXISTS (SELECT 1 FROM billing.subscriptions s WHERE s.stripe_subscription_id = v_subid) THEN
    -- an invoice of a subscription we do not mirror (its events are late
    -- or lost): ask Stripe for the subscription as it is now, once
    PERFORM billing.fetch_object(p_tenant, 'subscription', v_subid);
  END IF;
END
$$;
COMMENT ON FUNCTION billing.apply_invoice(text, jsonb, timestamptz, boolean, boolean, text) IS
  'Mirror one state of a Stripe invoice (newest wins; its subscription, payment intents and first failed attempt are kept whatever the order) and derive its subscription''s dunning.';

CREATE FUNCTION billing.apply_payment(p_tenant text, o jsonb, p_at timestamptz, p_kind text) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_pi     text := CASE WHEN o ->> 'object' = 'payment_intent' THEN o ->> 'id' ELSE billing.stripe_ref(o -> 'payment_intent') END;
  v_charge text := CASE WHEN o ->> 'object' = 'charge' THEN o ->> 'id' ELSE billing.stripe_ref(o -> 'latest_charge') END;
  v_status text := CASE o ->> 'object' WHEN 'charge' THEN CASE o ->> 'status' WHEN 'succeeded' THEN 'succeeded'
                                                                               WHEN 'failed' THEN 'failed' ELSE 'processing' END
                                       ELSE CASE WHEN p_kind = 'failed' THEN 'failed' ELSE o ->> 'status' END END;
  v_err    jsonb := coalesce(o -> 'last_payment_error', jsonb_build_object('code', o ->> 'failure_code',
                                                                             'message', o ->> 'failure_message'));
  v_inv    text := billing.stripe_ref(o -> 'invoice');
  v_link   text;
  v_old    billing.payments;
BEGIN
  IF v_pi IS NULL THEN
    RETURN;   -- a charge without a payment intent: nothing of ours
  END IF;
  -- the invoice it pays, named by the payment (before API 2025-03-31) or by the invoice
  PERFORM billing.link_invoice_payment(p_tenant, v_inv, v_pi);
  SELECT l.stripe_invoice_id INTO v_link FROM billing.invoice_payments l
   WHERE l.tenant_id = p_tenant AND l.stripe_payment_intent_id = v_pi ORDER BY 1 LIMIT 1;
  SELECT * INTO v_old FROM billing.payments p WHERE p.stripe_payment_intent_id = v_pi FOR UPDATE;
  IF FOUND AND (v_old.stripe_state_at > p_at
                OR (v_old.stripe_state_at = p_at
                    AND billing.status_rank('payment', v_old.status) >= billing.status_rank('payment', v_status))) THEN
    -- older state, but what it reveals still counts: the charge, and the invoice it pays
    UPDATE billing.payments SET stripe_charge_id = coalesce(stripe_charge_id, v_charge),
           kind = CASE WHEN v_link IS NOT NULL THEN 'subscription' ELSE kind END,
           stripe_invoice_id = coalesce(stripe_invoice_id, v_link)
     WHERE tenant_id = v_old.tenant_id AND payment_id = v_old.payment_id;
  ELSIF FOUND THEN
    UPDATE billing.payments SET status = v_status, stripe_charge_id = coalesce(v_charge, stripe_charge_id),
           kind = CASE WHEN v_link IS NOT NULL THEN 'subscription' ELSE kind END,
           stripe_invoice_id = coalesce(stripe_invoice_id, v_link),
           failure_code = CASE WHEN v_status = 'failed' THEN coalesce(v_err ->> 'decline_code', v_err ->> 'code') END,
           failure_message = CASE WHEN v_status = 'failed' THEN v_err ->> 'message' END,
           stripe_state_at = p_at, updated_at = now()
     WHERE tenant_id = v_old.tenant_id AND payment_id = v_old.payment_id;
  ELSE
    INSERT INTO billing.payments (tenant_id, kind, amount, currency, description, status, stripe_payment_intent_id,
                                  stripe_charge_id, failure_code, failure_message, stripe_state_at, stripe_invoice_id)
    VALUES (p_tenant, CASE WHEN v_link IS NOT NULL THEN 'subscription' ELSE 'one_time' END,
            greatest(coalesce((o ->> 'amount')::bigint, 0), 1), o ->> 'currency', o ->> 'description', v_status, v_pi,
            v_charge,
            CASE WHEN v_status = 'failed' THEN coalesce(v_err ->> 'decline_code', v_err ->> 'code') END,
            CASE WHEN v_status = 'failed' THEN v_err ->> 'message' END, p_at, v_link);
  END IF;
  -- a dispute that waited for this charge
  PERFORM billing.inbox_requeue(ARRAY[v_charge, v_pi]);
END
$$;

-- A dispute: the tenant is flagged, the operator notified, audited (once).
CREATE FUNCTION billing.apply_dispute(p_tenant text, o jsonb) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  INSERT INTO billing.disputes (tenant_id, stripe_dispute_id, stripe_charge_id, amount, currency, reason, status, stripe_created)
  VALUES (p_tenant, o ->> 'id', billing.stripe_ref(o -> 'charge'), coalesce((o ->> 'amount')::bigint, 0), o ->> 'currency',
          o ->> 'reason', o ->> 'status', to_timestamp((o ->> 'created')::bigint))
  ON CONFLICT (stripe_dispute_id) DO NOTHING;
  IF FOUND THEN
    UPDATE billing.tenants SET disputed = true, updated_at = now() WHERE tenant_id = p_tenant;
    INSERT INTO billing.notifications (tenant_id, kind, audience, dedup_key, payload)
    VALUES (p_tenant, 'dispute.created', 'operator', 'dispute:' || (o ->> 'id'),
            jsonb_build_object('dispute', o ->> 'id', 'charge', billing.stripe_ref(o -> 'charge'),
                               'amount', (o ->> 'amount')::bigint, 'currency', o ->> 'currency', 'reason', o ->> 'reason'))
    ON CONFLICT (tenant_id, dedup_key) DO NOTHING;
    PERFORM billing.audit('dispute.created', p_tenant, jsonb_build_object('dispute', o ->> 'id', 'charge', billing.stripe_ref(o -> 'charge'),
                                                                          'amount', (o ->> 'amount')::bigint, 'reason', o ->> 'reason'));
  END IF;
END
$$;

-- ---- answers of the GETs above (billing.fetch_object) -------------------------

CREATE FUNCTION billing.mirror_fetched(p_req billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  o     jsonb := p_req.response;
  v_t   text := coalesce(billing.event_tenant(p_req.response), p_req.tenant_id);
  v_at  timestamptz := billing.outbox_state_at(p_req);
BEGIN
  IF p_req.http_status <> 200 OR v_t IS NULL OR NOT EXISTS (SELECT 1 FROM billing.tenants t WHERE t.tenant_id = v_t) THEN
    RETURN;   -- Stripe has no such object (404), or it is not ours
  END IF;
  CASE o ->> 'object'
  WHEN 'subscription' THEN
    PERFORM billing.apply_subscription(v_t, o, v_at, o ->> 'status' = 'canceled');
  WHEN 'invoice' THEN
    PERFORM billing.apply_invoice(v_t, o, v_at, false, true);
  WHEN 'customer' THEN
    PERFORM billing.apply_customer(v_t, o, v_at, coalesce((o ->> 'deleted')::boolean, false));
  WHEN 'payment_intent', 'charge' THEN
    PERFORM billing.apply_payment(v_t, o, v_at, CASE WHEN o ->> 'status' = 'failed' THEN 'failed' END);
  ELSE
    NULL;
  END CASE;
  RETURN;
END
$$;
COMMENT ON FUNCTION billing.mirror_fetched(billing.stripe_requests) IS
  'Run by billing.request_recorded: the answer of a GET the mirror asked for (billing.fetch_object) is applied like an event, in the transaction that records it; an error there makes the worker ask again.';

-- ---- one event ----------------------------------------------------------------

-- Apply one event.  tenant_id: the tenant it concerned ('' when it is not
-- known to be ours, NULL for a type not handled); state: applied, ignored
-- or waiting; waits_for: what it waits for.
CREATE FUNCTION billing.apply_event_ex(e jsonb, OUT out_tenant text, OUT out_state text, OUT out_waits text[])
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  o      jsonb := e -> 'data' -> 'object';
  v_type text := e ->> 'type';
  v_at   timestamptz := to_timestamp((e ->> 'created')::bigint);
  v_t    text := billing.event_tenant(o);
  v_ref  text[];
BEGIN
  out_state := 'applied';
  IF v_type LIKE 'charge.dispute.%' THEN
    -- a dispute names no customer: its tenant is its charge's (94_disputes.sql)
    SELECT p.tenant_id INTO v_t FROM billing.payments p
     WHERE p.stripe_charge_id = billing.stripe_ref(o -> 'charge')
        OR p.stripe_payment_intent_id = billing.stripe_ref(o -> 'payment_intent')
     ORDER BY p.stripe_charge_id = billing.stripe_ref(o -> 'charge') DESC NULLS LAST LIMIT 1;
    IF v_t IS NULL THEN
      -- its charge is not mirrored yet: applied when it is
      out_tenant := '';
      out_state := 'waiting';
      out_waits := array_remove(ARRAY[billing.stripe_ref(o -> 'charge'), billing.stripe_ref(o -> 'payment_intent')], NULL);
      RETURN;
    END IF;
  ELSIF v_type = 'invoice_payment.paid' THEN
    SELECT i.tenant_id INTO v_t FROM billing.invoices i WHERE i.stripe_invoice_id = billing.stripe_ref(o -> 'invoice');
    IF v_t IS NULL THEN
      out_tenant := '';
      out_state := 'waiting';
      out_waits := array_remove(ARRAY[billing.stripe_ref(o -> 'invoice')], NULL);
      RETURN;
    END IF;
  END IF;
  IF v_t IS NULL THEN
    -- not (known to be) one of our tenants' objects; applied if its customer becomes ours
    out_tenant := '';
    out_state := 'ignored';
    out_waits := array_remove(ARRAY[billing.object_customer(o)], NULL);
    RETURN;
  END IF;
  out_tenant := v_t;

  CASE
  WHEN v_type IN ('customer.created', 'customer.updated') THEN
    PERFORM billing.apply_customer(v_t, o, v_at, false);
  WHEN v_type = 'customer.deleted' THEN
    PERFORM billing.apply_customer(v_t, o, v_at, true);
  WHEN v_type IN ('customer.subscription.created', 'customer.subscription.updated',
                  'customer.subscription.deleted') THEN
    out_waits := billing.apply_subscription_state(v_t, o, v_at, v_type = 'customer.subscription.deleted');
    IF out_waits IS NOT NULL THEN
      out_state := 'waiting';
    END IF;
  WHEN v_type = 'customer.subscription.trial_will_end' THEN
    INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
    VALUES (v_t, 'subscription.trial_will_end', 'trial_will_end:' || (o ->> 'id') || ':' || coalesce(o ->> 'trial_end', ''),
            jsonb_build_object('subscription', o ->> 'id', 'trial_end', to_timestamp((o ->> 'trial_end')::bigint)))
    ON CONFLICT (tenant_id, dedup_key) DO NOTHING;
  WHEN v_type IN ('invoice.created', 'invoice.finalized', 'invoice.updated', 'invoice.paid', 'invoice.payment_failed',
                  'invoice.voided', 'invoice.marked_uncollectible') THEN
    -- (a failure's notification and audit: billing.sync_invoice_failure,
    -- once per invoice, decided from Stripe's times whatever the order)
    PERFORM billing.apply_invoice(v_t, o, v_at, v_type = 'invoice.payment_failed', false, e ->> 'api_version');
  WHEN v_type = 'invoice_payment.paid' THEN
    PERFORM billing.link_invoice_payment(v_t, billing.stripe_ref(o -> 'invoice'),
                                         billing.stripe_ref(o -> 'payment' -> 'payment_intent'));
  WHEN v_type IN ('payment_intent.succeeded', 'charge.succeeded') THEN
    PERFORM billing.apply_payment(v_t, o, v_at, 'succeeded');
  WHEN v_type IN ('payment_intent.payment_failed', 'charge.failed') THEN
    PERFORM billing.apply_payment(v_t, o, v_at, 'failed');
  WHEN v_type IN ('charge.dispute.created', 'charge.dispute.updated', 'charge.dispute.closed',
                  'charge.dispute.funds_withdrawn', 'charge.dispute.funds_reinstated') THEN
    PERFORM billing.apply_dispute(v_t, o);
    PERFORM billing.sync_dispute(v_t, o, v_at, v_type);
  WHEN v_type IN ('customer.tax_id.created', 'customer.tax_id.updated', 'customer.tax_id.deleted') THEN
    PERFORM billing.sync_tax_id(v_t, o, v_type = 'customer.tax_id.deleted', v_at);   -- 91_tax.sql
  ELSE
    out_tenant := NULL;   -- a type we do not handle
    out_state := 'ignored';
  END CASE;
END
$$;
COMMENT ON FUNCTION billing.apply_event_ex(jsonb) IS
  'Apply one Stripe event to local state: the tenant it concerned, its state (applied, ignored, waiting) and the Stripe ids it waits for. Idempotent and independent of delivery order.';

-- The worker's step: apply due events, oldest first.
CREATE FUNCTION billing.process_inbox(p_limit integer DEFAULT 200) RETURNS integer
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  ev      record;
  r       record;
  v_err   text;
  v_n     integer := 0;
  v_max   integer := current_setting('qes_billing.webhook_max_attempts')::integer;
BEGIN
  FOR ev IN
    SELECT w.stripe_event_id, w.payload, w.attempts, w.source FROM billing.webhook_events w
     WHERE w.state = 'received' AND w.next_attempt_at <= now()
     ORDER BY w.stripe_created, w.received_at
     LIMIT p_limit
       FOR UPDATE SKIP LOCKED
  LOOP
    v_n := v_n + 1;
    BEGIN
      IF ev.source = 'reconcile' THEN
        -- an event the webhooks never brought: what it repairs is drift
        r := billing.reconcile_event(ev.stripe_event_id, ev.payload::jsonb);
      ELSE
        r := billing.apply_event_ex(ev.payload::jsonb);
      END IF;
      DELETE FROM billing.webhook_waits WHERE stripe_event_id = ev.stripe_event_id;
      INSERT INTO billing.webhook_waits (stripe_id, stripe_event_id)
      SELECT DISTINCT x, ev.stripe_event_id FROM unnest(r.out_waits) x WHERE x IS NOT NULL;
      UPDATE billing.webhook_events
         SET state = r.out_state, waits_for = r.out_waits,
             tenant_id = nullif(r.out_tenant, ''), attempts = attempts + 1, applied_at = clock_timestamp(), last_error = NULL
       WHERE stripe_event_id = ev.stripe_event_id;
    EXCEPTION
      WHEN SQLSTATE 'QBMOV' THEN
        -- its tenant's partition is being moved (src/fence.c): not an
        -- attempt; the event moves with the partition's rows, or is
        -- applied here once the move is undone
        UPDATE billing.webhook_events SET next_attempt_at = now() + interval '1 second'
         WHERE stripe_event_id = ev.stripe_event_id;
      WHEN SQLSTATE 'QBMVD' THEN
        -- its tenant's partition lives on another shard now: the router
        -- hands it over there (router.forward_moved_events)
        GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT;
        UPDATE billing.webhook_events SET state = 'ignored', last_error = 'moved: ' || v_err
         WHERE stripe_event_id = ev.stripe_event_id;
      WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT;
      v_err := billing.redact_text(v_err);
      UPDATE billing.webhook_events
         SET attempts = attempts + 1, last_error = v_err,
             state = CASE WHEN attempts + 1 >= v_max THEN 'needs_review' ELSE 'received' END,
             next_attempt_at = now() + billing.backoff(attempts + 1, current_setting('qes_billing.retry_base_delay')::interval,
                                                       current_setting('qes_billing.retry_max_delay')::interval)
       WHERE stripe_event_id = ev.stripe_event_id;
      IF ev.attempts + 1 >= v_max THEN
        PERFORM billing.audit('webhook.parked', NULL, jsonb_build_object('event_id', ev.stripe_event_id, 'error', v_err));
      END IF;
    END;
  END LOOP;
  -- the periodic reconciliation pass, when it is due (sql/install/86_reconcile.sql)
  PERFORM billing.reconcile_tick();
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.process_inbox(integer) IS
  'Apply due inbox events (run by the worker). A failing event is retried with exponential backoff and jitter; after qes_billing.webhook_max_attempts it is parked as needs_review. An event that names what is not mirrored yet waits for it.';

CREATE FUNCTION billing.replay_webhook(p_event_id text DEFAULT NULL) RETURNS integer
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n integer;
BEGIN
  UPDATE billing.webhook_events SET state = 'received', attempts = 0, next_attempt_at = now()
   WHERE state = 'needs_review' AND (p_event_id IS NULL OR stripe_event_id = p_event_id);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF p_event_id IS NOT NULL AND v_n = 0 THEN
    RAISE EXCEPTION 'no parked webhook event %', p_event_id
      USING ERRCODE = 'no_data_found', HINT = 'List parked events with: SELECT * FROM billing.webhook_events WHERE state = ''needs_review''.';
  END IF;
  PERFORM billing.audit('webhook.replayed', NULL, jsonb_build_object('event_id', p_event_id, 'events', v_n));
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.replay_webhook(text) IS
  'Put a parked (needs_review) webhook event back in the queue, or all of them when no id is given. Audited.';

CREATE VIEW billing.webhook_metrics AS
SELECT (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM applied_at - received_at))
          FROM billing.webhook_events WHERE applied_at > now() - interval '1 hour') AS latency_p50_s,
       (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM applied_at - received_at))
          FROM billing.webhook_events WHERE applied_at > now() - interval '1 hour') AS latency_p95_s,
       (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM applied_at - received_at))
          FROM billing.webhook_events WHERE applied_at > now() - interval '1 hour') AS latency_p99_s,
       (SELECT count(*) FROM billing.webhook_events WHERE applied_at > now() - interval '1 hour') AS applied_last_hour,
       (SELECT count(*) FROM billing.webhook_events WHERE state = 'received') AS pending,
       (SELECT count(*) FROM billing.webhook_events WHERE state = 'received' AND attempts > 0) AS retrying,
       (SELECT count(*) FROM billing.webhook_events WHERE state = 'needs_review') AS parked,
       (SELECT coalesce(sum(r.deliveries), 0) FROM billing.webhook_rejections r WHERE r.rejected_at > now() - interval '1 hour')
         + (SELECT coalesce(sum(p.deliveries), 0) FROM billing.webhook_rejections_pending() p) AS rejected_last_hour,
       (SELECT count(*) FROM billing.webhook_events WHERE state = 'waiting') AS waiting;
COMMENT ON VIEW billing.webhook_metrics IS
  'Webhook processing: latency received -> applied (p50, p95, p99 over the last hour), throughput, retries, parked and rejected deliveries, events waiting for an object not mirrored yet.';
