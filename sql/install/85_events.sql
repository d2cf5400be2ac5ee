-- Applying Stripe events (the inbox) to local state.  The worker calls
-- billing.process_inbox() every loop.  Each event is applied in its own
-- subtransaction together with its state change, so a crash or an error
-- leaves it to be applied again, never half-applied; handlers are
-- idempotent and order-tolerant: every mirrored row remembers the Stripe
-- time of the state it holds (stripe_state_at) and an older event never
-- overwrites a newer state.

-- Which tenant an object belongs to: metadata.tenant_id, else its customer.
CREATE FUNCTION billing.event_tenant(obj jsonb) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(
    (SELECT t.tenant_id FROM billing.tenants t WHERE t.tenant_id = obj -> 'metadata' ->> 'tenant_id'),
    (SELECT t.tenant_id FROM billing.tenants t
      WHERE t.stripe_customer_id = coalesce(obj ->> 'customer',
                                            CASE WHEN obj ->> 'object' = 'customer' THEN obj ->> 'id' END)))
$$;
COMMENT ON FUNCTION billing.event_tenant(jsonb) IS
  'The tenant a Stripe object belongs to: its metadata.tenant_id, or the tenant of its customer.';

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

-- Subscriptions: status, plan and interval from the price, period, cancel_at_period_end, trial.
CREATE FUNCTION billing.apply_subscription(p_tenant text, o jsonb, p_at timestamptz, p_deleted boolean)
  RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_price   jsonb := o -> 'items' -> 'data' -> 0 -> 'price';
  v_plan    text;
  v_int     text;
  v_status  text := CASE WHEN p_deleted THEN 'canceled' ELSE o ->> 'status' END;
  v_sub     billing.subscriptions;
  v_pstart  timestamptz := to_timestamp((coalesce(o ->> 'current_period_start',
                                                   o -> 'items' -> 'data' -> 0 ->> 'current_period_start'))::bigint);
  v_pend    timestamptz := to_timestamp((coalesce(o ->> 'current_period_end',
                                                   o -> 'items' -> 'data' -> 0 ->> 'current_period_end'))::bigint);
BEGIN
  SELECT pr.plan_id, pr.billing_interval INTO v_plan, v_int FROM billing.prices pr
   WHERE pr.stripe_price_id = v_price ->> 'id' OR pr.price_key = v_price ->> 'lookup_key'
   ORDER BY pr.stripe_price_id = v_price ->> 'id' DESC NULLS LAST LIMIT 1;
  IF v_plan IS NULL THEN
    RAISE EXCEPTION 'subscription % has price % which is in no plan of the catalog', o ->> 'id', v_price ->> 'id'
      USING ERRCODE = 'foreign_key_violation', HINT = 'Run qes_billing_setup --setup-products, or set billing.prices.stripe_price_id.';
  END IF;
  v_int := coalesce(v_price -> 'recurring' ->> 'interval', v_int);

  SELECT * INTO v_sub FROM billing.subscriptions s WHERE s.stripe_subscription_id = o ->> 'id' FOR UPDATE;
  IF NOT FOUND THEN
    -- the tenant's current local subscription (Free, or one waiting for Stripe) becomes this one
    SELECT * INTO v_sub FROM billing.subscriptions s
     WHERE s.tenant_id = p_tenant AND s.stripe_subscription_id IS NULL
       AND s.status NOT IN ('canceled', 'incomplete_expired') FOR UPDATE;
  END IF;
  IF FOUND AND v_sub.stripe_state_at IS NOT NULL
     AND (v_sub.stripe_state_at > p_at
          OR (v_sub.stripe_state_at = p_at
              AND (v_sub.current_period_end, billing.status_rank('subscription', v_sub.status))
                  > (v_pend, billing.status_rank('subscription', v_status)))) THEN
    RETURN;   -- an older event: the newer state stays
  END IF;
  IF FOUND THEN
    UPDATE billing.subscriptions SET
      stripe_subscription_id = o ->> 'id', plan_id = v_plan, billing_interval = v_int, status = v_status,
      stripe_price_id = v_price ->> 'id', current_period_start = v_pstart, current_period_end = v_pend,
      cancel_at_period_end = coalesce((o ->> 'cancel_at_period_end')::boolean, false),
      trial_end = to_timestamp((o ->> 'trial_end')::bigint),
      grace_until = CASE WHEN v_status = 'past_due' THEN grace_until END,
      stripe_state_at = p_at, updated_at = now()
     WHERE tenant_id = v_sub.tenant_id AND subscription_id = v_sub.subscription_id;
  ELSE
    INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, stripe_subscription_id,
                                       stripe_price_id, current_period_start, current_period_end,
                                       cancel_at_period_end, trial_end, stripe_state_at)
    VALUES (p_tenant, v_plan, v_int, v_status, o ->> 'id', v_price ->> 'id', v_pstart, v_pend,
            coalesce((o ->> 'cancel_at_period_end')::boolean, false), to_timestamp((o ->> 'trial_end')::bigint), p_at);
  END IF;
END
$$;

-- An invoice's subscription: top level before API 2025-03-31, under parent since.
CREATE FUNCTION billing.invoice_subscription(o jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN coalesce(o ->> 'subscription', o -> 'parent' -> 'subscription_details' ->> 'subscription');

CREATE FUNCTION billing.apply_invoice(p_tenant text, o jsonb, p_at timestamptz) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_old billing.invoices;
  v_sub bigint;
BEGIN
  SELECT s.subscription_id INTO v_sub FROM billing.subscriptions s
   WHERE s.tenant_id = p_tenant AND s.stripe_subscription_id = billing.invoice_subscription(o);
  SELECT * INTO v_old FROM billing.invoices i WHERE i.stripe_invoice_id = o ->> 'id' FOR UPDATE;
  IF FOUND AND (v_old.stripe_state_at > p_at
                OR (v_old.stripe_state_at = p_at
                    AND billing.status_rank('invoice', v_old.status) > billing.status_rank('invoice', o ->> 'status'))) THEN
    RETURN;
  END IF;
  INSERT INTO billing.invoices AS i (tenant_id, stripe_invoice_id, subscription_id, number, status, amount_due,
                                     amount_paid, amount_remaining, currency, period_start, period_end,
                                     hosted_invoice_url, invoice_pdf, stripe_created, stripe_state_at)
  VALUES (p_tenant, o ->> 'id', v_sub, o ->> 'number', o ->> 'status',
          coalesce((o ->> 'amount_due')::bigint, 0), coalesce((o ->> 'amount_paid')::bigint, 0),
          coalesce((o ->> 'amount_remaining')::bigint, 0), o ->> 'currency',
          to_timestamp((o ->> 'period_start')::bigint), to_timestamp((o ->> 'period_end')::bigint),
          o ->> 'hosted_invoice_url', o ->> 'invoice_pdf', to_timestamp((o ->> 'created')::bigint), p_at)
  ON CONFLICT (stripe_invoice_id) DO UPDATE SET
    subscription_id = coalesce(EXCLUDED.subscription_id, i.subscription_id), number = EXCLUDED.number,
    status = EXCLUDED.status, amount_due = EXCLUDED.amount_due, amount_paid = EXCLUDED.amount_paid,
    amount_remaining = EXCLUDED.amount_remaining, hosted_invoice_url = EXCLUDED.hosted_invoice_url,
    invoice_pdf = EXCLUDED.invoice_pdf, stripe_state_at = EXCLUDED.stripe_state_at, updated_at = now();
END
$$;

CREATE FUNCTION billing.apply_payment(p_tenant text, o jsonb, p_at timestamptz, p_kind text) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_pi     text := CASE WHEN o ->> 'object' = 'payment_intent' THEN o ->> 'id' ELSE o ->> 'payment_intent' END;
  v_charge text := CASE WHEN o ->> 'object' = 'charge' THEN o ->> 'id' ELSE o ->> 'latest_charge' END;
  v_status text := CASE o ->> 'object' WHEN 'charge' THEN CASE o ->> 'status' WHEN 'succeeded' THEN 'succeeded'
                                                                               WHEN 'failed' THEN 'failed' ELSE 'processing' END
                                       ELSE CASE WHEN p_kind = 'failed' THEN 'failed' ELSE o ->> 'status' END END;
  v_err    jsonb := coalesce(o -> 'last_payment_error', jsonb_build_object('code', o ->> 'failure_code',
                                                                             'message', o ->> 'failure_message'));
  v_old    billing.payments;
BEGIN
  IF v_pi IS NULL THEN
    RETURN;   -- a charge without a payment intent: nothing of ours
  END IF;
  SELECT * INTO v_old FROM billing.payments p WHERE p.stripe_payment_intent_id = v_pi FOR UPDATE;
  IF FOUND AND (v_old.stripe_state_at > p_at
                OR (v_old.stripe_state_at = p_at
                    AND billing.status_rank('payment', v_old.status) > billing.status_rank('payment', v_status))) THEN
    -- older state, but what it reveals still counts: the charge, and that it pays an invoice
    UPDATE billing.payments SET stripe_charge_id = coalesce(stripe_charge_id, v_charge),
           kind = CASE WHEN o ->> 'invoice' IS NOT NULL THEN 'subscription' ELSE kind END
     WHERE tenant_id = v_old.tenant_id AND payment_id = v_old.payment_id;
    RETURN;
  END IF;
  IF FOUND THEN
    UPDATE billing.payments SET status = v_status, stripe_charge_id = coalesce(v_charge, stripe_charge_id),
           kind = CASE WHEN o ->> 'invoice' IS NOT NULL THEN 'subscription' ELSE kind END,
           failure_code = CASE WHEN v_status = 'failed' THEN coalesce(v_err ->> 'decline_code', v_err ->> 'code') END,
           failure_message = CASE WHEN v_status = 'failed' THEN v_err ->> 'message' END,
           stripe_state_at = p_at, updated_at = now()
     WHERE tenant_id = v_old.tenant_id AND payment_id = v_old.payment_id;
  ELSE
    INSERT INTO billing.payments (tenant_id, kind, amount, currency, description, status, stripe_payment_intent_id,
                                  stripe_charge_id, failure_code, failure_message, stripe_state_at)
    VALUES (p_tenant, CASE WHEN o ->> 'invoice' IS NOT NULL THEN 'subscription' ELSE 'one_time' END,
            greatest(coalesce((o ->> 'amount')::bigint, 0), 1), o ->> 'currency', o ->> 'description', v_status, v_pi,
            v_charge,
            CASE WHEN v_status = 'failed' THEN coalesce(v_err ->> 'decline_code', v_err ->> 'code') END,
            CASE WHEN v_status = 'failed' THEN v_err ->> 'message' END, p_at);
  END IF;
END
$$;

-- Ask Stripe, through the outbox, for a subscription as it is now (the
-- answer is applied like an event: billing.outbox_apply); at most one such
-- request per subscription is queued at a time.
CREATE FUNCTION billing.refresh_subscription(p_tenant text, p_stripe_subscription_id text) RETURNS bigint
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
AS $$
  -- only an id that can go into a path
  SELECT CASE WHEN p_stripe_subscription_id ~ '^sub_[A-Za-z0-9_]+$' THEN
    billing.outbox_enqueue_once(p_tenant, 'subscription.refresh', 'GET', '/v1/subscriptions/' || p_stripe_subscription_id)
  END
$$;
COMMENT ON FUNCTION billing.refresh_subscription(text, text) IS
  'Queue a GET of the subscription from Stripe (once at a time); its answer is mirrored like an event.';

-- One event.  Returns the tenant it concerned ('' when it is not ours).
CREATE FUNCTION billing.apply_event(e jsonb) RETURNS text
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  o      jsonb := e -> 'data' -> 'object';
  v_type text := e ->> 'type';
  v_at   timestamptz := to_timestamp((e ->> 'created')::bigint);
  v_t    text := billing.event_tenant(o);
  v_sub  billing.subscriptions;
BEGIN
  IF v_type = 'charge.dispute.created' THEN
    SELECT p.tenant_id INTO v_t FROM billing.payments p
     WHERE p.stripe_charge_id = o ->> 'charge' OR p.stripe_payment_intent_id = o ->> 'payment_intent' LIMIT 1;
    IF v_t IS NULL THEN
      -- the charge's own events may not have arrived yet: fail, to be retried
      RAISE EXCEPTION 'dispute % is for charge %, which no payment mirrors yet', o ->> 'id', o ->> 'charge'
        USING ERRCODE = 'foreign_key_violation',
              HINT = 'It is retried with backoff; if it is parked, the charge is not one of ours.';
    END IF;
  END IF;
  IF v_t IS NULL THEN
    RETURN '';   -- not one of our tenants' objects
  END IF;

  CASE
  WHEN v_type IN ('customer.created', 'customer.updated') THEN
    UPDATE billing.tenants SET stripe_customer_id = o ->> 'id', updated_at = now()
     WHERE tenant_id = v_t AND stripe_customer_id IS DISTINCT FROM o ->> 'id';
  WHEN v_type = 'customer.deleted' THEN
    UPDATE billing.tenants SET stripe_customer_id = NULL, updated_at = now()
     WHERE tenant_id = v_t AND stripe_customer_id = o ->> 'id';
  WHEN v_type IN ('customer.subscription.created', 'customer.subscription.updated') THEN
    PERFORM billing.apply_subscription(v_t, o, v_at, false);
  WHEN v_type = 'customer.subscription.deleted' THEN
    PERFORM billing.apply_subscription(v_t, o, v_at, true);
  WHEN v_type = 'customer.subscription.trial_will_end' THEN
    INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
    VALUES (v_t, 'subscription.trial_will_end', 'trial_will_end:' || (o ->> 'id') || ':' || coalesce(o ->> 'trial_end', ''),
            jsonb_build_object('subscription', o ->> 'id', 'trial_end', to_timestamp((o ->> 'trial_end')::bigint)))
    ON CONFLICT (tenant_id, dedup_key) DO NOTHING;
  WHEN v_type IN ('invoice.created', 'invoice.finalized', 'invoice.paid', 'invoice.payment_failed') THEN
    PERFORM billing.apply_invoice(v_t, o, v_at);
    IF v_type = 'invoice.payment_failed' THEN
      -- the fact, whatever order events arrive in (once per invoice); whoever
      -- delivers notifications skips it if the invoice is paid by then
      INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
      VALUES (v_t, 'payment.failed', 'payment_failed:' || (o ->> 'id'),
              jsonb_build_object('invoice', o ->> 'id', 'amount_due', (o ->> 'amount_due')::bigint,
                                 'hosted_invoice_url', o ->> 'hosted_invoice_url'))
      ON CONFLICT (tenant_id, dedup_key) DO NOTHING;
    END IF;
    SELECT * INTO v_sub FROM billing.subscriptions s WHERE s.stripe_subscription_id = billing.invoice_subscription(o) FOR UPDATE;
    IF NOT FOUND AND billing.invoice_subscription(o) IS NOT NULL THEN
      -- an invoice of a subscription we do not mirror (its events are late
      -- or lost): ask Stripe for the subscription as it is now, once
      PERFORM billing.refresh_subscription(v_t, billing.invoice_subscription(o));
    END IF;
    -- (a first payment that fails is not dunning: the subscription stays incomplete, on Free limits)
    IF FOUND AND v_type = 'invoice.payment_failed' AND v_sub.status IN ('active', 'trialing', 'past_due', 'unpaid')
       AND (v_sub.stripe_state_at IS NULL OR v_sub.stripe_state_at <= v_at) THEN
      -- dunning: past due, paid limits kept for the grace period
      UPDATE billing.subscriptions
         SET status = CASE WHEN status IN ('active', 'trialing', 'past_due') THEN 'past_due' ELSE status END,
             grace_until = coalesce(grace_until, billing.now() + current_setting('qes_billing.grace_period')::interval),
             stripe_state_at = v_at, updated_at = now()
       WHERE tenant_id = v_sub.tenant_id AND subscription_id = v_sub.subscription_id;
      PERFORM billing.audit('dunning.started', v_t, jsonb_build_object('invoice', o ->> 'id', 'subscription', v_sub.stripe_subscription_id));
    ELSIF FOUND AND v_type = 'invoice.paid' AND v_sub.status IN ('past_due', 'unpaid')
       AND (v_sub.stripe_state_at IS NULL OR v_sub.stripe_state_at <= v_at) THEN
      UPDATE billing.subscriptions SET status = 'active', grace_until = NULL, stripe_state_at = v_at, updated_at = now()
       WHERE tenant_id = v_sub.tenant_id AND subscription_id = v_sub.subscription_id;
      PERFORM billing.audit('dunning.recovered', v_t, jsonb_build_object('invoice', o ->> 'id', 'subscription', v_sub.stripe_subscription_id));
    END IF;
  WHEN v_type IN ('payment_intent.succeeded', 'charge.succeeded') THEN
    PERFORM billing.apply_payment(v_t, o, v_at, 'succeeded');
  WHEN v_type IN ('payment_intent.payment_failed', 'charge.failed') THEN
    PERFORM billing.apply_payment(v_t, o, v_at, 'failed');
  WHEN v_type = 'charge.dispute.created' THEN
    INSERT INTO billing.disputes (tenant_id, stripe_dispute_id, stripe_charge_id, amount, currency, reason, status, stripe_created)
    VALUES (v_t, o ->> 'id', o ->> 'charge', coalesce((o ->> 'amount')::bigint, 0), o ->> 'currency', o ->> 'reason',
            o ->> 'status', to_timestamp((o ->> 'created')::bigint))
    ON CONFLICT (stripe_dispute_id) DO NOTHING;
    IF FOUND THEN
      UPDATE billing.tenants SET disputed = true, updated_at = now() WHERE tenant_id = v_t;
      INSERT INTO billing.notifications (tenant_id, kind, audience, dedup_key, payload)
      VALUES (v_t, 'dispute.created', 'operator', 'dispute:' || (o ->> 'id'),
              jsonb_build_object('dispute', o ->> 'id', 'charge', o ->> 'charge', 'amount', (o ->> 'amount')::bigint,
                                 'currency', o ->> 'currency', 'reason', o ->> 'reason'))
      ON CONFLICT (tenant_id, dedup_key) DO NOTHING;
      PERFORM billing.audit('dispute.created', v_t, jsonb_build_object('dispute', o ->> 'id', 'charge', o ->> 'charge',
                                                                       'amount', (o ->> 'amount')::bigint, 'reason', o ->> 'reason'));
    END IF;
  ELSE
    RETURN NULL;   -- a type we do not handle
  END CASE;
  RETURN v_t;
END
$$;
COMMENT ON FUNCTION billing.apply_event(jsonb) IS
  'Apply one Stripe event to local state. Idempotent; an older event never overwrites newer state. Returns the tenant, '''' when not ours, NULL for a type not handled.';

-- The worker's step: apply due events, oldest first.
CREATE FUNCTION billing.process_inbox(p_limit integer DEFAULT 200) RETURNS integer
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  ev      record;
  v_t     text;
  v_err   text;
  v_n     integer := 0;
  v_max   integer := current_setting('qes_billing.webhook_max_attempts')::integer;
  v_base  double precision := extract(epoch FROM current_setting('qes_billing.retry_base_delay')::interval);
  v_cap   double precision := extract(epoch FROM current_setting('qes_billing.retry_max_delay')::interval);
BEGIN
  FOR ev IN
    SELECT w.stripe_event_id, w.payload, w.attempts FROM billing.webhook_events w
     WHERE w.state = 'received' AND w.next_attempt_at <= now()
     ORDER BY w.stripe_created, w.received_at
     LIMIT p_limit
       FOR UPDATE SKIP LOCKED
  LOOP
    v_n := v_n + 1;
    BEGIN
      v_t := billing.apply_event(ev.payload::jsonb);
      UPDATE billing.webhook_events
         SET state = CASE WHEN v_t IS NULL OR v_t = '' THEN 'ignored' ELSE 'applied' END,
             tenant_id = nullif(v_t, ''), attempts = attempts + 1, applied_at = clock_timestamp(), last_error = NULL
       WHERE stripe_event_id = ev.stripe_event_id;
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT;
      UPDATE billing.webhook_events
         SET attempts = attempts + 1, last_error = v_err,
             state = CASE WHEN attempts + 1 >= v_max THEN 'needs_review' ELSE 'received' END,
             next_attempt_at = now() + make_interval(secs => least(v_cap, v_base * 2 ^ attempts) * (0.5 + random() / 2))
       WHERE stripe_event_id = ev.stripe_event_id;
      IF ev.attempts + 1 >= v_max THEN
        PERFORM billing.audit('webhook.parked', NULL, jsonb_build_object('event_id', ev.stripe_event_id, 'error', v_err));
      END IF;
    END;
  END LOOP;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.process_inbox(integer) IS
  'Apply due inbox events (run by the worker). A failing event is retried with exponential backoff and jitter; after qes_billing.webhook_max_attempts it is parked as needs_review.';

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
         + (SELECT coalesce(sum(p.deliveries), 0) FROM billing.webhook_rejections_pending() p) AS rejected_last_hour;
COMMENT ON VIEW billing.webhook_metrics IS
  'Webhook processing: latency received -> applied (p50, p95, p99 over the last hour), throughput, retries, parked and rejected deliveries.';
