-- Reconciliation: finding and healing drift between the mirror and Stripe
-- (docs/architecture.md, "Reconciliation").  Webhooks can be lost
-- -- an endpoint down for longer than Stripe retries, a wrong secret for a
-- while -- so the mirror is compared with Stripe now and then:
--
--   * the periodic pass (every qes_billing.reconcile_interval) lists the
--     events Stripe created since its cursor (GET /v1/events, the 16 types
--     the endpoint subscribes to; Stripe keeps 30 days) and puts those the
--     inbox never received into it (source 'reconcile'); applying them is
--     what repairs the mirror;
--   * billing.reconcile_tenant(tenant) lists one tenant's objects now --
--     each customer, its subscriptions (all statuses), invoices, payment
--     intents, charges and the disputes of disputed charges -- and mirrors
--     each one as Stripe has it (older drift than the events reach);
--   * every change either makes is a repair: a row in billing.drift_repairs
--     with the mirror's state before and after, and an audit row
--     drift.repaired; billing.drift_report shows them, billing.reconcile_runs
--     what each run listed, found and spent.
--
-- Every request goes through the outbox, so the worker paces them under
-- qes_billing.max_requests_per_second and a pass asks for at most
-- qes_billing.reconcile_pages pages (it goes on at the next pass).  The
-- pass after a finished one is queued due at its time, so an idle worker
-- wakes for it (rule 14: nothing else runs while nothing is due).

-- The mirror's state of one Stripe object (what a repair changes).
CREATE FUNCTION billing.mirror_row(p_object text, p_id text) RETURNS jsonb
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT CASE p_object
    WHEN 'subscription' THEN
      (SELECT jsonb_build_object('status', s.status, 'plan', s.plan_id, 'interval', s.billing_interval,
                                 'cancel_at_period_end', s.cancel_at_period_end,
                                 'current_period_start', s.current_period_start,
                                 'current_period_end', s.current_period_end, 'trial_end', s.trial_end,
                                 'grace_until', s.grace_until, 'ended_at', s.ended_at)
         FROM billing.subscriptions s WHERE s.stripe_subscription_id = p_id)
    WHEN 'invoice' THEN
      (SELECT jsonb_build_object('status', i.status, 'amount_due', i.amount_due, 'amount_paid', i.amount_paid,
                                 'amount_remaining', i.amount_remaining, 'subscription', i.stripe_subscription_id,
                                 'linked', i.subscription_id IS NOT NULL, 'first_failed_at', i.first_failed_at)
         FROM billing.invoices i WHERE i.stripe_invoice_id = p_id)
    WHEN 'customer' THEN
      (SELECT jsonb_build_object('deleted', c.deleted_at IS NOT NULL,
                                 'current', t.stripe_customer_id IS NOT DISTINCT FROM c.stripe_customer_id)
         FROM billing.stripe_customers c JOIN billing.tenants t USING (tenant_id) WHERE c.stripe_customer_id = p_id)
    WHEN 'payment_intent' THEN
      (SELECT jsonb_build_object('status', p.status, 'kind', p.kind, 'amount', p.amount, 'charge', p.stripe_charge_id,
                                 'invoice', p.stripe_invoice_id)
         FROM billing.payments p WHERE p.stripe_payment_intent_id = p_id)
    WHEN 'charge' THEN
      (SELECT jsonb_build_object('status', p.status, 'kind', p.kind, 'amount', p.amount, 'charge', p.stripe_charge_id,
                                 'invoice', p.stripe_invoice_id)
         FROM billing.payments p WHERE p.stripe_charge_id = p_id)
    WHEN 'dispute' THEN
      (SELECT jsonb_build_object('charge', d.stripe_charge_id, 'amount', d.amount)
         FROM billing.disputes d WHERE d.stripe_dispute_id = p_id)
  END
$$;
COMMENT ON FUNCTION billing.mirror_row(text, text) IS
  'The mirror''s state of one Stripe object (subscription, invoice, customer, payment_intent, charge, dispute), as jsonb; NULL when it is not mirrored.';

-- Record a repair: the row, the audit, the run's count.
CREATE FUNCTION billing.drift_repaired(p_tenant text, p_run text, p_source text, p_object text, p_id text,
                                       p_event text, p_before jsonb, p_after jsonb)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  INSERT INTO billing.drift_repairs (tenant_id, run_id, source, object, stripe_id, stripe_event_id, before, after)
  VALUES (p_tenant, p_run, p_source, p_object, p_id, p_event, p_before, p_after);
  UPDATE billing.reconcile_runs SET repairs = repairs + 1 WHERE run_id = p_run;
  PERFORM billing.audit('drift.repaired', p_tenant,
                        jsonb_build_object('object', p_object, 'id', p_id, 'event', p_event, 'run', p_run,
                                           'source', p_source, 'before', p_before, 'after', p_after));
END
$$;

-- Applying an event a pass found missing (from billing.process_inbox): as
-- any event, with the mirror's state of its object before and after.
CREATE FUNCTION billing.reconcile_event(p_event_id text, e jsonb,
                                        OUT out_tenant text, OUT out_state text, OUT out_waits text[])
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  o        jsonb := e -> 'data' -> 'object';
  v_before jsonb := billing.mirror_row(o ->> 'object', o ->> 'id');
  v_after  jsonb;
  v_run    text := (SELECT s.pass_run_id FROM billing.reconcile_state s);
  v_t      text;
BEGIN
  SELECT r.out_tenant, r.out_state, r.out_waits INTO out_tenant, out_state, out_waits
    FROM billing.apply_event_ex(e) r;
  v_after := billing.mirror_row(o ->> 'object', o ->> 'id');
  v_t := coalesce(nullif(out_tenant, ''), billing.event_tenant(o));
  IF v_after IS DISTINCT FROM v_before AND v_t IS NOT NULL
     AND EXISTS (SELECT 1 FROM billing.tenants t WHERE t.tenant_id = v_t) THEN
    PERFORM billing.drift_repaired(v_t, v_run, 'events', o ->> 'object', o ->> 'id', p_event_id, v_before, v_after);
  END IF;
END
$$;
COMMENT ON FUNCTION billing.reconcile_event(text, jsonb) IS
  'Apply an event a reconciliation pass found missing from the inbox; a change it makes to the mirror is recorded as a repair (drift.repaired).';

-- Mirror one object as Stripe lists it now; a change is a repair.
CREATE FUNCTION billing.reconcile_object(p_tenant text, o jsonb, p_at timestamptz, p_run text) RETURNS boolean
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_obj    text := o ->> 'object';
  v_before jsonb := billing.mirror_row(v_obj, o ->> 'id');
  v_after  jsonb;
BEGIN
  BEGIN
    CASE v_obj
    WHEN 'subscription' THEN
      PERFORM billing.apply_subscription(p_tenant, o, p_at, o ->> 'status' = 'canceled');
    WHEN 'invoice' THEN
      PERFORM billing.apply_invoice(p_tenant, o, p_at, false, true);
    WHEN 'customer' THEN
      PERFORM billing.apply_customer(p_tenant, o, p_at, coalesce((o ->> 'deleted')::boolean, false));
    WHEN 'payment_intent', 'charge' THEN
      PERFORM billing.apply_payment(p_tenant, o, p_at, CASE WHEN o ->> 'status' = 'failed' THEN 'failed' END);
    WHEN 'dispute' THEN
      PERFORM billing.apply_dispute(p_tenant, o);
      PERFORM billing.sync_dispute(p_tenant, o, p_at);
    ELSE
      RETURN false;
    END CASE;
  EXCEPTION WHEN OTHERS THEN
    -- this one object is left for the next run; the run counts it
    UPDATE billing.reconcile_runs SET errors = errors + 1 WHERE run_id = p_run;
    RETURN false;
  END;
  v_after := billing.mirror_row(v_obj, o ->> 'id');
  IF v_after IS DISTINCT FROM v_before THEN
    PERFORM billing.drift_repaired(p_tenant, p_run, 'objects', v_obj, o ->> 'id', NULL, v_before, v_after);
    RETURN true;
  END IF;
  RETURN false;
END
$$;
COMMENT ON FUNCTION billing.reconcile_object(text, jsonb, timestamptz, text) IS
  'Mirror one Stripe object as listed now (newest wins: the listing is newer than every event before it); a change is recorded as a repair.';

-- ---- one tenant, now ------------------------------------------------------------

CREATE FUNCTION billing.reconcile_tenant(p_tenant text) RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_run  text;
  v_cus  text;
  v_n    integer := 0;
  v_cust text[];
BEGIN
  IF p_tenant IS NULL OR NOT EXISTS (SELECT 1 FROM billing.tenants WHERE tenant_id = p_tenant) THEN
    RAISE EXCEPTION 'unknown tenant: %', coalesce(quote_literal(p_tenant), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'List tenants with: SELECT tenant_id FROM billing.tenants.';
  END IF;
  SELECT array_agg(DISTINCT c ORDER BY c) INTO v_cust
    FROM (SELECT stripe_customer_id AS c FROM billing.stripe_customers WHERE tenant_id = p_tenant
          UNION SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = p_tenant) x
   WHERE c IS NOT NULL;
  IF v_cust IS NULL THEN
    RAISE EXCEPTION 'tenant % has no Stripe customer', p_tenant
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Nothing of it is in Stripe: it is on Free, or its customer is still being created.';
  END IF;
  v_run := 'rt_' || replace(gen_random_uuid()::text, '-', '');
  INSERT INTO billing.reconcile_runs (run_id, kind, tenant_id) VALUES (v_run, 'tenant', p_tenant);
  FOREACH v_cus IN ARRAY v_cust LOOP
    CONTINUE WHEN v_cus !~ '^cus_[A-Za-z0-9_]+$';
    PERFORM billing.outbox_enqueue(p_tenant, 'reconcile.customer.lookup', 'GET', '/v1/customers/' || v_cus,
                                   '{}', jsonb_build_object('run_id', v_run), p_run_id => v_run);
    PERFORM billing.outbox_enqueue(p_tenant, 'reconcile.subscriptions.list', 'GET', '/v1/subscriptions',
                                   jsonb_build_object('customer', v_cus, 'status', 'all', 'limit', 100),
                                   jsonb_build_object('run_id', v_run), p_run_id => v_run);
    PERFORM billing.outbox_enqueue(p_tenant, 'reconcile.invoices.list', 'GET', '/v1/invoices',
                                   jsonb_build_object('customer', v_cus, 'limit', 100),
                                   jsonb_build_object('run_id', v_run), p_run_id => v_run);
    PERFORM billing.outbox_enqueue(p_tenant, 'reconcile.payment_intents.list', 'GET', '/v1/payment_intents',
                                   jsonb_build_object('customer', v_cus, 'limit', 100),
                                   jsonb_build_object('run_id', v_run), p_run_id => v_run);
    PERFORM billing.outbox_enqueue(p_tenant, 'reconcile.charges.list', 'GET', '/v1/charges',
                                   jsonb_build_object('customer', v_cus, 'limit', 100),
                                   jsonb_build_object('run_id', v_run), p_run_id => v_run);
    v_n := v_n + 5;
  END LOOP;
  PERFORM billing.audit('reconcile.requested', p_tenant,
                        jsonb_build_object('run', v_run, 'customers', to_jsonb(v_cust), 'requests', v_n));
  RETURN v_run;
END
$$;
COMMENT ON FUNCTION billing.reconcile_tenant(text) IS
  'Reconcile one tenant now: list its customers, subscriptions, invoices, payment intents, charges (and the disputes of disputed charges) from Stripe through the outbox and repair what differs (billing.drift_report). Returns the run id (billing.reconcile_runs). Audited.';

-- ---- the periodic pass -------------------------------------------------------------

-- The event types the webhook endpoint subscribes to (billing.setup_webhook's list).
CREATE FUNCTION billing.reconcile_event_types() RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN '["customer.created", "customer.updated", "customer.deleted", "customer.subscription.created",
         "customer.subscription.updated", "customer.subscription.deleted", "customer.subscription.trial_will_end",
         "invoice.created", "invoice.finalized", "invoice.paid", "invoice.payment_failed",
         "payment_intent.succeeded", "payment_intent.payment_failed", "charge.succeeded", "charge.failed",
         "charge.dispute.created", "charge.dispute.updated", "charge.dispute.closed",
         "charge.dispute.funds_withdrawn", "charge.dispute.funds_reinstated",
         "customer.tax_id.created", "customer.tax_id.updated", "customer.tax_id.deleted"]'::jsonb;

-- Queue the next page of the pass's listing, due at p_due.
CREATE FUNCTION billing.reconcile_list_events(p_run text, p_after text, p_due timestamptz) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  st   billing.reconcile_state;
  v_id bigint;
BEGIN
  SELECT * INTO st FROM billing.reconcile_state;
  v_id := billing.outbox_enqueue(NULL, 'reconcile.events.list', 'GET', '/v1/events',
            jsonb_build_object('limit', 100, 'types', billing.reconcile_event_types(),
                               -- Stripe keeps events for 30 days; a minute back for clocks
                               'created', jsonb_build_object('gte', extract(epoch FROM greatest(
                                 coalesce(st.events_cursor, '-infinity'), now() - interval '30 days'
                               ) - interval '1 minute')::bigint))
            || CASE WHEN p_after IS NOT NULL THEN jsonb_build_object('starting_after', p_after) ELSE '{}' END,
            jsonb_build_object('run_id', p_run), p_run_id => p_run, p_not_before => p_due);
  RETURN v_id;
END
$$;

-- Start a pass (its first page due at p_due).
CREATE FUNCTION billing.reconcile_start_pass(p_due timestamptz) RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_run text := 'rp_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
  INSERT INTO billing.reconcile_runs (run_id, kind, started_at) VALUES (v_run, 'pass', greatest(p_due, now()));
  UPDATE billing.reconcile_state SET pass_run_id = v_run, pass_pages = 0, listing_newest = NULL, next_pass_at = p_due;
  PERFORM billing.reconcile_list_events(v_run, NULL, p_due);
  RETURN v_run;
END
$$;

-- From billing.process_inbox, every loop of the worker: start the pass when
-- it is due and none is under way.  A single row read when nothing is due.
CREATE FUNCTION billing.reconcile_tick() RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_interval interval := current_setting('qes_billing.reconcile_interval')::interval;
  st         billing.reconcile_state;
BEGIN
  SELECT * INTO st FROM billing.reconcile_state;
  IF NOT FOUND THEN
    INSERT INTO billing.reconcile_state (next_pass_at) VALUES (now() + v_interval) ON CONFLICT DO NOTHING;
    RETURN;
  END IF;
  IF v_interval = interval '0' OR st.next_pass_at > now() THEN
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM billing.stripe_requests r
              WHERE r.kind = 'reconcile.events.list' AND r.state IN ('waiting', 'pending', 'in_flight')) THEN
    RETURN;   -- under way (or queued, due at its time)
  END IF;
  PERFORM billing.reconcile_start_pass(now());
END
$$;
COMMENT ON FUNCTION billing.reconcile_tick() IS
  'Run by the worker each loop: start the periodic reconciliation pass when qes_billing.reconcile_interval has passed and none is under way.';

-- An operator's pass, now.
CREATE FUNCTION billing.reconcile_now() RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_run text;
BEGIN
  INSERT INTO billing.reconcile_state (next_pass_at) VALUES (now()) ON CONFLICT DO NOTHING;
  UPDATE billing.stripe_requests SET next_attempt_at = now()
   WHERE kind = 'reconcile.events.list' AND state = 'pending' AND next_attempt_at > now()
  RETURNING run_id INTO v_run;
  IF v_run IS NULL THEN
    SELECT r.run_id INTO v_run FROM billing.stripe_requests r
     WHERE r.kind = 'reconcile.events.list' AND r.state IN ('waiting', 'pending', 'in_flight') LIMIT 1;
  END IF;
  IF v_run IS NULL THEN
    v_run := billing.reconcile_start_pass(now());
  END IF;
  PERFORM billing.audit('reconcile.requested', NULL, jsonb_build_object('run', v_run, 'pass', true));
  RETURN v_run;
END
$$;
COMMENT ON FUNCTION billing.reconcile_now() IS
  'Start the periodic reconciliation pass now (or hurry the one queued). Returns its run id. Audited.';

-- ---- the answers --------------------------------------------------------------------

CREATE FUNCTION billing.reconcile_fetched(p_req billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  o       jsonb := p_req.response;
  v_run   text := p_req.subject ->> 'run_id';
  v_at    timestamptz := billing.outbox_state_at(p_req);
  v_live  boolean := billing.environment() = 'production';
  v_data  jsonb := CASE WHEN jsonb_typeof(p_req.response -> 'data') = 'array' THEN p_req.response -> 'data' ELSE '[]' END;
  v_last  text := p_req.response -> 'data' -> -1 ->> 'id';
  v_more  boolean := coalesce((p_req.response ->> 'has_more')::boolean, false);
  v_n     integer := jsonb_array_length(CASE WHEN jsonb_typeof(p_req.response -> 'data') = 'array'
                                             THEN p_req.response -> 'data' ELSE '[]' END);
  v_missed integer := 0;
  v_newest timestamptz;
  e       jsonb;
  st      billing.reconcile_state;
  v_pages integer := current_setting('qes_billing.reconcile_pages')::integer;
  v_int   interval := current_setting('qes_billing.reconcile_interval')::interval;
BEGIN
  UPDATE billing.reconcile_runs SET requests = requests + 1, listed = listed + v_n WHERE run_id = v_run;
  IF p_req.http_status <> 200 THEN
    NULL;   -- a customer Stripe does not have (404): nothing to mirror
  ELSIF p_req.kind = 'reconcile.events.list' THEN
    -- events the inbox never received go into it, to be applied as repairs
    FOR e IN SELECT * FROM jsonb_array_elements(v_data) LOOP
      CONTINUE WHEN e ->> 'object' <> 'event' OR e ->> 'id' !~ '^evt_' OR (e ->> 'livemode')::boolean IS DISTINCT FROM v_live;
      INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, api_version, stripe_created, payload,
                                          source)
      VALUES (e ->> 'id', e ->> 'type', (e ->> 'livemode')::boolean, e ->> 'api_version',
              to_timestamp((e ->> 'created')::bigint), e::text::json, 'reconcile')
      ON CONFLICT (stripe_event_id) DO NOTHING;
      IF FOUND THEN
        v_missed := v_missed + 1;
      END IF;
      v_newest := greatest(v_newest, to_timestamp((e ->> 'created')::bigint));
    END LOOP;
    UPDATE billing.reconcile_runs SET missed_events = missed_events + v_missed WHERE run_id = v_run;
    UPDATE billing.reconcile_state SET listing_newest = greatest(listing_newest, v_newest), pass_pages = pass_pages + 1
     RETURNING * INTO st;
    IF v_more AND v_last IS NOT NULL THEN
      -- the next page: now, or at the next pass when this one used its pages
      PERFORM billing.reconcile_list_events(v_run, v_last,
                                            CASE WHEN st.pass_pages < v_pages THEN now() ELSE now() + v_int END);
      IF st.pass_pages >= v_pages THEN
        UPDATE billing.reconcile_state SET pass_pages = 0, next_pass_at = now() + v_int;
      END IF;
    ELSE
      -- the listing is complete: the cursor moves to its newest event, and
      -- the next pass is queued due at its time (so an idle worker wakes)
      UPDATE billing.reconcile_state
         SET events_cursor = coalesce(listing_newest, events_cursor), listing_newest = NULL
       RETURNING * INTO st;
      UPDATE billing.reconcile_runs SET finished_at = now() WHERE run_id = v_run;
      IF v_int > interval '0' THEN
        PERFORM billing.reconcile_start_pass(now() + v_int);
      END IF;
    END IF;
  ELSE
    -- one tenant's objects as Stripe has them now
    FOR e IN SELECT * FROM jsonb_array_elements(CASE WHEN p_req.kind = 'reconcile.customer.lookup'
                                                     THEN jsonb_build_array(o) ELSE v_data END) LOOP
      PERFORM billing.reconcile_object(p_req.tenant_id, e, v_at, v_run);
      -- a disputed charge: its disputes
      IF e ->> 'object' = 'charge' AND coalesce((e ->> 'disputed')::boolean, false) AND e ->> 'id' ~ '^ch_[A-Za-z0-9_]+$' THEN
        PERFORM billing.outbox_enqueue(p_req.tenant_id, 'reconcile.disputes.list', 'GET', '/v1/disputes',
                                       jsonb_build_object('charge', e ->> 'id', 'limit', 100),
                                       jsonb_build_object('run_id', v_run), p_run_id => v_run);
      END IF;
    END LOOP;
    IF v_more AND v_last IS NOT NULL THEN
      PERFORM billing.outbox_enqueue(p_req.tenant_id, p_req.kind, 'GET', p_req.path,
                                     p_req.params || jsonb_build_object('starting_after', v_last),
                                     p_req.subject, p_run_id => v_run);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.stripe_requests r
                    WHERE r.run_id = v_run AND r.request_id <> p_req.request_id
                      AND r.state IN ('waiting', 'pending', 'in_flight')) THEN
      UPDATE billing.reconcile_runs SET finished_at = now() WHERE run_id = v_run;
      PERFORM billing.audit('reconcile.finished', p_req.tenant_id,
                            (SELECT jsonb_build_object('run', r.run_id, 'requests', r.requests, 'listed', r.listed,
                                                       'repairs', r.repairs, 'errors', r.errors)
                               FROM billing.reconcile_runs r WHERE r.run_id = v_run));
    END IF;
  END IF;
  RETURN;
END
$$;
COMMENT ON FUNCTION billing.reconcile_fetched(billing.stripe_requests) IS
  'Run by billing.request_recorded: a reconciliation answer (reconcile.*) is applied when the worker records it: missed events into the inbox, listed objects mirrored as repairs, the next page or pass queued.';

CREATE VIEW billing.drift_report AS
SELECT d.repaired_at, d.tenant_id, d.object, d.stripe_id, d.source, d.stripe_event_id, d.run_id,
       r.kind AS run_kind, d.before, d.after,
       (SELECT array_agg(k ORDER BY k) FROM (SELECT k FROM jsonb_object_keys(coalesce(d.after, '{}')) k
                                             WHERE d.before -> k IS DISTINCT FROM d.after -> k
                                             UNION SELECT k FROM jsonb_object_keys(coalesce(d.before, '{}')) k
                                             WHERE d.after IS NULL) x) AS changed
  FROM billing.drift_repairs d
  LEFT JOIN billing.reconcile_runs r ON r.run_id = d.run_id;
COMMENT ON VIEW billing.drift_report IS
  'What reconciliation found and fixed: each repaired object with the mirror''s state before and after, what changed, the run (pass or tenant) and the missed event that repaired it.';
