-- Disputes answered with the platform's own evidence.
--
-- When Stripe reports a dispute that needs a response, the evidence the
-- platform holds about the tenant is assembled from the tenant's own rows
-- -- what it used in the disputed period (usage_events, with times), its
-- subscription and the changes to it (audit_log), its invoices and payments,
-- its name and billing email, the plan's description -- into Stripe's
-- evidence fields, each within Stripe's length limit, and staged in Stripe
-- with submit=false (billing.dispute_responses, shown by the view
-- billing.dispute_evidence).  An operator submits it
-- (billing.submit_dispute_evidence, api.submit_dispute_evidence), or the
-- worker does before evidence_details.due_by when
-- qes_billing.dispute_auto_submit is on.  Every dispute event is mirrored
-- (billing.sync_dispute); what a lost dispute does to the tenant's
-- subscription is qes_billing.dispute_lost_action, audited.
--
-- Nothing of another tenant is read: every query below is keyed on the
-- dispute's tenant.  No secret is read: no metadata, client secret or
-- request body; the evidence is run through billing.redact as well.

SELECT pg_catalog.pg_extension_config_dump('billing.dispute_responses', '');

-- Stripe's limits on the text evidence fields used here (characters), and
-- on all of them together.
CREATE FUNCTION billing.dispute_evidence_limits() RETURNS jsonb
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN '{"access_activity_log": 20000, "uncategorized_text": 20000, "product_description": 5000,
         "service_date": 5000, "customer_name": 5000, "customer_email_address": 5000,
         "_total": 150000}'::jsonb;
COMMENT ON FUNCTION billing.dispute_evidence_limits() IS
  'The most characters Stripe takes in each evidence field qes_billing fills, and in all of them together (_total).';

-- A text cut to fit a limit, saying so.
CREATE FUNCTION billing.dispute_fit(p_text text, p_limit integer) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN length(p_text) <= p_limit THEN p_text
            ELSE left(p_text, p_limit - 40) || E'\n[... shortened to fit Stripe''s limit]' END;

CREATE FUNCTION billing.dispute_money(p_amount bigint, p_currency text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_char(p_amount / 100.0, 'FM999999999990.00') || ' ' || upper(p_currency);

CREATE FUNCTION billing.dispute_utc(p_at timestamptz) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"');

-- The evidence for one dispute, from the tenant's own rows.
CREATE FUNCTION billing.dispute_assemble(p_tenant text, p_dispute text,
                                         OUT evidence jsonb, OUT period_start timestamptz, OUT period_end timestamptz)
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  lim      jsonb := billing.dispute_evidence_limits();
  d        billing.disputes;
  t        billing.tenants;
  p        billing.payments;
  i        billing.invoices;
  s        billing.subscriptions;
  pl       billing.plans;
  v_price  billing.prices;
  v_log    text;
  v_text   text;
  v_lines  text[];
  v_total  bigint;
  v_shown  integer;
  r        record;
  v_from   timestamptz;
  v_to     timestamptz;
BEGIN
  SELECT * INTO d FROM billing.disputes x WHERE x.tenant_id = p_tenant AND x.stripe_dispute_id = p_dispute;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'dispute % of tenant % is not mirrored', p_dispute, p_tenant
      USING ERRCODE = 'no_data_found', HINT = 'Disputes are mirrored from Stripe''s charge.dispute.* events.';
  END IF;
  SELECT * INTO t FROM billing.tenants x WHERE x.tenant_id = p_tenant;
  SELECT * INTO p FROM billing.payments x
   WHERE x.tenant_id = p_tenant
     AND (x.stripe_charge_id = d.stripe_charge_id OR x.stripe_payment_intent_id = d.stripe_payment_intent_id)
   ORDER BY x.stripe_charge_id = d.stripe_charge_id DESC NULLS LAST LIMIT 1;
  SELECT * INTO i FROM billing.invoices x
   WHERE x.tenant_id = p_tenant
     AND x.stripe_invoice_id = coalesce(p.stripe_invoice_id,
                                        (SELECT l.stripe_invoice_id FROM billing.invoice_payments l
                                          WHERE l.tenant_id = p_tenant
                                            AND l.stripe_payment_intent_id = p.stripe_payment_intent_id
                                          ORDER BY 1 LIMIT 1));
  SELECT * INTO s FROM billing.subscriptions x
   WHERE x.tenant_id = p_tenant
     AND (x.stripe_subscription_id = i.stripe_subscription_id OR i.stripe_subscription_id IS NULL)
   ORDER BY x.stripe_subscription_id = i.stripe_subscription_id DESC NULLS LAST,
            x.status NOT IN ('canceled', 'incomplete_expired') DESC, x.subscription_id DESC
   LIMIT 1;
  SELECT * INTO pl FROM billing.plans x WHERE x.plan_id = coalesce(s.plan_id, 'free');
  SELECT * INTO v_price FROM billing.prices x
   WHERE x.plan_id = pl.plan_id AND x.billing_interval = coalesce(s.billing_interval, 'month')
     AND (x.stripe_price_id = s.stripe_price_id OR x.active)
   ORDER BY x.stripe_price_id = s.stripe_price_id DESC NULLS LAST LIMIT 1;

  -- The disputed period: from the start of what the charge paid for (the
  -- invoice's period, or the charge itself) to the dispute.  With neither
  -- invoice nor charge known, the month before the dispute.
  v_to := d.stripe_created;
  v_from := least(i.period_start, p.created_at, s.current_period_start, v_to);
  IF i.stripe_invoice_id IS NULL AND p.payment_id IS NULL THEN
    v_from := v_to - interval '1 month';
  END IF;

  -- access_activity_log: totals, then day by day, then the events themselves
  v_lines := ARRAY[format('Use of the QES signing platform by %s (account %s), %s to %s.',
                          t.name, t.tenant_id, billing.dispute_utc(v_from), billing.dispute_utc(v_to)),
                   'Every use is recorded by the platform when it happens (time of use in UTC, what was used, quantity).'];
  SELECT string_agg(format('%s %s', x.total, m.description), ', ' ORDER BY m.metric)
    INTO v_text
    FROM (SELECT u.metric, CASE WHEN min(mm.kind) = 'gauge' THEN max(u.quantity) ELSE sum(u.quantity) END AS total
            FROM billing.usage_events u JOIN billing.metrics mm ON mm.metric = u.metric
           WHERE u.tenant_id = p_tenant AND u.occurred_at >= v_from AND u.occurred_at < v_to
           GROUP BY u.metric) x
    JOIN billing.metrics m ON m.metric = x.metric;
  v_lines := v_lines || ('Totals in the period: ' || coalesce(v_text, 'no recorded use') || '.');
  SELECT count(*) INTO v_total FROM billing.usage_events u
   WHERE u.tenant_id = p_tenant AND u.occurred_at >= v_from AND u.occurred_at < v_to;
  IF v_total > 0 THEN
    v_lines := v_lines || 'By day (UTC):'::text;
    FOR r IN
      SELECT to_char(x.d, 'YYYY-MM-DD') AS day,
             string_agg(format('%s %s', x.q, x.metric), ', ' ORDER BY x.metric) AS what,
             min(x.first_at) AS first_at, max(x.last_at) AS last_at
        FROM (SELECT date_trunc('day', u.occurred_at AT TIME ZONE 'UTC') AS d, u.metric,
                     sum(u.quantity) AS q, min(u.occurred_at) AS first_at, max(u.occurred_at) AS last_at
                FROM billing.usage_events u
               WHERE u.tenant_id = p_tenant AND u.occurred_at >= v_from AND u.occurred_at < v_to
               GROUP BY 1, 2) x
       GROUP BY x.d ORDER BY x.d
    LOOP
      v_lines := v_lines || format('  %s: %s (first %s, last %s)', r.day, r.what,
                                   to_char(r.first_at AT TIME ZONE 'UTC', 'HH24:MI:SS'),
                                   to_char(r.last_at AT TIME ZONE 'UTC', 'HH24:MI:SS'));
    END LOOP;
    v_lines := v_lines || format('Each recorded use (%s in all; the newest %s):', v_total, least(v_total, 200));
    FOR r IN
      SELECT u.occurred_at, u.metric, u.quantity FROM billing.usage_events u
       WHERE u.tenant_id = p_tenant AND u.occurred_at >= v_from AND u.occurred_at < v_to
       ORDER BY u.occurred_at DESC, u.idempotency_key DESC LIMIT 200
    LOOP
      v_lines := v_lines || format('  %s  %s x %s', billing.dispute_utc(r.occurred_at), r.metric, r.quantity);
    END LOOP;
  END IF;
  v_log := array_to_string(v_lines, E'\n');

  -- uncategorized_text: the charge, the subscription and its changes, invoices, payments
  v_lines := ARRAY[format('Disputed charge: %s on %s%s.', billing.dispute_money(d.amount, d.currency),
                          coalesce(billing.dispute_utc(p.created_at), 'a date Stripe holds'),
                          CASE WHEN i.number IS NOT NULL THEN ', paying invoice ' || i.number ELSE '' END)];
  IF s.subscription_id IS NOT NULL THEN
    v_lines := v_lines || format('Subscription: plan %s, billed %s, status %s; started %s; current period %s to %s%s.',
                                 pl.name, CASE s.billing_interval WHEN 'year' THEN 'yearly' ELSE 'monthly' END,
                                 s.status, coalesce(billing.dispute_utc(coalesce(s.stripe_created, s.created_at)), '-'),
                                 coalesce(billing.dispute_utc(s.current_period_start), '-'),
                                 coalesce(billing.dispute_utc(s.current_period_end), '-'),
                                 CASE WHEN s.cancel_at_period_end THEN ', cancelling at period end (not cancelled before the charge)'
                                      ELSE ', not cancelled by the customer' END);
  END IF;
  v_shown := 0;
  FOR r IN
    SELECT a.occurred_at, a.action, a.actor_tenant,
           concat_ws(', ',
             'plan ' || coalesce(a.details ->> 'plan', a.details ->> 'from_plan'),
             'interval ' || (a.details ->> 'interval'),
             'status ' || (a.details ->> 'status'),
             'cancel at period end ' || (a.details ->> 'cancel_at_period_end')) AS what
      FROM billing.audit_log a
     WHERE a.tenant_id = p_tenant
       AND (a.action LIKE 'subscription.%' OR a.action LIKE 'dunning.%' OR a.action IN ('tenant.created', 'tenant.updated'))
       AND a.occurred_at < v_to
     ORDER BY a.audit_id DESC LIMIT 40
  LOOP
    IF v_shown = 0 THEN
      v_lines := v_lines || 'Subscription history (newest first; the platform''s audit trail):'::text;
    END IF;
    v_lines := v_lines || format('  %s  %s%s%s', billing.dispute_utc(r.occurred_at), r.action,
                                 CASE WHEN r.what <> '' THEN ' (' || r.what || ')' ELSE '' END,
                                 -- who, without naming anyone: the evidence goes to the card
                                 -- network, and staff identities are not the customer's business
                                 CASE WHEN r.actor_tenant = p_tenant THEN ' by the customer'
                                      ELSE ' by the platform' END);
    v_shown := v_shown + 1;
  END LOOP;
  v_shown := 0;
  FOR r IN
    SELECT x.number, x.status, x.amount_due, x.amount_paid, x.currency, x.period_start, x.period_end, x.paid_at,
           x.stripe_created
      FROM billing.invoices x
     WHERE x.tenant_id = p_tenant AND x.stripe_created <= v_to
     ORDER BY x.stripe_created DESC LIMIT 24
  LOOP
    IF v_shown = 0 THEN
      v_lines := v_lines || 'Invoices (newest first):'::text;
    END IF;
    v_lines := v_lines || format('  %s  %s, %s due, %s paid%s, period %s to %s',
                                 coalesce(r.number, '(draft)'), r.status,
                                 billing.dispute_money(r.amount_due, r.currency),
                                 billing.dispute_money(r.amount_paid, r.currency),
                                 CASE WHEN r.paid_at IS NOT NULL THEN ' on ' || billing.dispute_utc(r.paid_at) ELSE '' END,
                                 coalesce(to_char(r.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD'), '-'),
                                 coalesce(to_char(r.period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD'), '-'));
    v_shown := v_shown + 1;
  END LOOP;
  v_shown := 0;
  FOR r IN
    SELECT x.kind, x.amount, x.currency, x.status, x.created_at
      FROM billing.payments x
     WHERE x.tenant_id = p_tenant AND x.created_at <= v_to
     ORDER BY x.created_at DESC LIMIT 24
  LOOP
    IF v_shown = 0 THEN
      v_lines := v_lines || 'Payments (newest first):'::text;
    END IF;
    v_lines := v_lines || format('  %s  %s payment of %s, %s', billing.dispute_utc(r.created_at),
                                 replace(r.kind, '_', '-'), billing.dispute_money(r.amount, r.currency), r.status);
    v_shown := v_shown + 1;
  END LOOP;

  evidence := jsonb_build_object(
    'customer_name', billing.dispute_fit(t.name, (lim ->> 'customer_name')::integer),
    'customer_email_address', billing.dispute_fit(t.billing_email, (lim ->> 'customer_email_address')::integer),
    'product_description', billing.dispute_fit(
       format('%s plan of the QES platform (qualified electronic signatures, online service): %s.%s%s%s',
              pl.name, nullif(pl.description, ''),
              CASE WHEN v_price.price_key IS NOT NULL
                   THEN format(' Billed %s at %s.', CASE v_price.billing_interval WHEN 'year' THEN 'yearly' ELSE 'monthly' END,
                               billing.dispute_money(v_price.unit_amount, v_price.currency)) ELSE '' END,
              (SELECT ' Included per billing period: ' || string_agg(
                        CASE WHEN l.soft_limit IS NULL THEN 'unlimited ' || m.description
                             ELSE l.soft_limit || ' ' || m.unit || 's (' || m.description || ')' END, '; ' ORDER BY l.metric) || '.'
                 FROM billing.plan_limits l JOIN billing.metrics m ON m.metric = l.metric
                WHERE l.plan_id = pl.plan_id),
              CASE WHEN cardinality(pl.features) > 0
                   THEN ' Features: ' || array_to_string(pl.features, ', ') || '.' ELSE '' END),
       (lim ->> 'product_description')::integer),
    'service_date', billing.dispute_fit(
       format('%s to %s (the service was provided throughout; see access_activity_log)',
              to_char(v_from AT TIME ZONE 'UTC', 'YYYY-MM-DD'), to_char(v_to AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
       (lim ->> 'service_date')::integer),
    'access_activity_log', billing.dispute_fit(v_log, (lim ->> 'access_activity_log')::integer),
    'uncategorized_text', billing.dispute_fit(array_to_string(v_lines, E'\n'), (lim ->> 'uncategorized_text')::integer));
  evidence := billing.redact(jsonb_strip_nulls(evidence));
  period_start := v_from;
  period_end := v_to;
END
$$;
COMMENT ON FUNCTION billing.dispute_assemble(text, text) IS
  'The evidence for one dispute, from the disputing tenant''s own rows only, as Stripe''s evidence fields within their limits; and the disputed period.';

-- Mirror a dispute as Stripe tells of it (an event of type p_type, or an
-- answer; newer state wins), stage its evidence when it needs one, and act
-- on its close.
CREATE FUNCTION billing.sync_dispute(p_tenant text, o jsonb, p_at timestamptz, p_type text DEFAULT NULL)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  d        billing.disputes;
  v_due    timestamptz := to_timestamp(nullif((o -> 'evidence_details' ->> 'due_by')::bigint, 0));
  v_closed boolean := o ->> 'status' IN ('won', 'lost', 'warning_closed', 'prevented');
BEGIN
  SELECT * INTO d FROM billing.disputes x WHERE x.tenant_id = p_tenant AND x.stripe_dispute_id = o ->> 'id' FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- facts that accumulate, whatever the order events arrive in
  UPDATE billing.disputes x
     SET funds_withdrawn_at = CASE WHEN p_type = 'charge.dispute.funds_withdrawn'
                                   THEN least(x.funds_withdrawn_at, p_at) ELSE x.funds_withdrawn_at END,
         funds_reinstated_at = CASE WHEN p_type = 'charge.dispute.funds_reinstated'
                                    THEN least(x.funds_reinstated_at, p_at) ELSE x.funds_reinstated_at END,
         stripe_payment_intent_id = coalesce(x.stripe_payment_intent_id, billing.stripe_ref(o -> 'payment_intent')),
         updated_at = now()
   WHERE x.tenant_id = d.tenant_id AND x.stripe_dispute_id = d.stripe_dispute_id;
  -- the state: a newer one wins; within the same second (Stripe's times
  -- are whole seconds), the one further along: closed, then submitted more
  -- often, then holding evidence
  IF d.stripe_state_at IS NULL OR d.stripe_state_at < p_at
     OR (d.stripe_state_at = p_at
         AND ROW(v_closed, coalesce((o -> 'evidence_details' ->> 'submission_count')::integer, 0),
                 coalesce((o -> 'evidence_details' ->> 'has_evidence')::boolean, false))
             >= ROW(d.status IN ('won', 'lost', 'warning_closed', 'prevented'), d.submission_count, d.has_evidence)) THEN
    UPDATE billing.disputes x
       SET status = coalesce(o ->> 'status', x.status),
           reason = coalesce(o ->> 'reason', x.reason),
           amount = coalesce((o ->> 'amount')::bigint, x.amount),
           evidence_due_by = v_due,
           has_evidence = coalesce((o -> 'evidence_details' ->> 'has_evidence')::boolean, x.has_evidence),
           past_due = coalesce((o -> 'evidence_details' ->> 'past_due')::boolean, x.past_due),
           submission_count = greatest(x.submission_count,
                                       coalesce((o -> 'evidence_details' ->> 'submission_count')::integer, 0)),
           closed_at = CASE WHEN v_closed THEN coalesce(x.closed_at, p_at) ELSE x.closed_at END,
           stripe_state_at = p_at
     WHERE x.tenant_id = d.tenant_id AND x.stripe_dispute_id = d.stripe_dispute_id;
  END IF;
  IF d.funds_withdrawn_at IS NULL AND p_type = 'charge.dispute.funds_withdrawn' THEN
    PERFORM billing.audit('dispute.funds_withdrawn', p_tenant,
                          jsonb_build_object('dispute', o ->> 'id', 'amount', (o ->> 'amount')::bigint));
  ELSIF d.funds_reinstated_at IS NULL AND p_type = 'charge.dispute.funds_reinstated' THEN
    PERFORM billing.audit('dispute.funds_reinstated', p_tenant,
                          jsonb_build_object('dispute', o ->> 'id', 'amount', (o ->> 'amount')::bigint));
  END IF;
  SELECT * INTO d FROM billing.disputes x WHERE x.tenant_id = p_tenant AND x.stripe_dispute_id = o ->> 'id';
  IF d.closed_at IS NOT NULL AND d.status IN ('won', 'lost', 'warning_closed', 'prevented')
     AND NOT EXISTS (SELECT FROM billing.audit_log a
                      WHERE a.tenant_id = p_tenant AND a.action = 'dispute.closed'
                        AND a.details ->> 'dispute' = d.stripe_dispute_id) THEN
    PERFORM billing.dispute_closed(d);
  ELSIF d.status IN ('needs_response', 'warning_needs_response') THEN
    PERFORM billing.dispute_stage(d);
  END IF;
END
$$;
COMMENT ON FUNCTION billing.sync_dispute(text, jsonb, timestamptz, text) IS
  'Mirror a dispute from an event or answer (the newer state wins; funds movements and the close accumulate), stage its evidence when it needs a response, act on its close once.';

-- Assemble the evidence and stage it in Stripe (submit=false), once.
CREATE FUNCTION billing.dispute_stage(d billing.disputes) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v   record;
  v_req bigint;
BEGIN
  IF EXISTS (SELECT FROM billing.dispute_responses x
              WHERE x.tenant_id = d.tenant_id AND x.stripe_dispute_id = d.stripe_dispute_id)
     OR (d.evidence_due_by IS NOT NULL AND d.evidence_due_by <= billing.now()) THEN
    RETURN;
  END IF;
  SELECT * INTO v FROM billing.dispute_assemble(d.tenant_id, d.stripe_dispute_id);
  v_req := billing.outbox_enqueue(d.tenant_id, 'dispute.stage', 'POST', '/v1/disputes/' || d.stripe_dispute_id,
                                  jsonb_build_object('evidence', v.evidence, 'submit', false,
                                                     'metadata', jsonb_build_object('tenant_id', d.tenant_id)),
                                  jsonb_build_object('dispute', d.stripe_dispute_id));
  INSERT INTO billing.dispute_responses (tenant_id, stripe_dispute_id, evidence, period_start, period_end, stage_request)
  VALUES (d.tenant_id, d.stripe_dispute_id, v.evidence, v.period_start, v.period_end, v_req);
  PERFORM billing.audit('dispute.evidence_staged', d.tenant_id,
    jsonb_build_object('dispute', d.stripe_dispute_id, 'request_id', v_req,
                       'period_start', v.period_start, 'period_end', v.period_end,
                       'fields', (SELECT jsonb_object_agg(k, length(val)) FROM jsonb_each_text(v.evidence) AS e(k, val))));
END
$$;
COMMENT ON FUNCTION billing.dispute_stage(billing.disputes) IS
  'Assemble a dispute''s evidence and send it to Stripe with submit=false, once per dispute (not when its deadline has passed). Audited with the fields'' sizes.';

-- Queue the submission (submit=true) of a dispute's staged evidence.
CREATE FUNCTION billing.dispute_submit(p_tenant text, p_dispute text, p_auto boolean) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  d     billing.disputes;
  x     billing.dispute_responses;
  v_req bigint;
  v_by  text := coalesce(billing.jwt_claims() ->> 'sub', billing.outer_role());
BEGIN
  SELECT * INTO d FROM billing.disputes z WHERE z.tenant_id = p_tenant AND z.stripe_dispute_id = p_dispute;
  SELECT * INTO x FROM billing.dispute_responses z
   WHERE z.tenant_id = p_tenant AND z.stripe_dispute_id = p_dispute FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'dispute % has no evidence staged', p_dispute
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = format('The dispute is %s.', coalesce(d.status, 'unknown')),
            HINT = 'Evidence is staged when a dispute needs a response: see billing.dispute_evidence.';
  END IF;
  IF x.state IN ('submitting', 'submitted') THEN
    RAISE EXCEPTION 'the evidence of dispute % is already %', p_dispute, x.state
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Stripe takes evidence once; see billing.dispute_evidence for its state.';
  END IF;
  IF d.status NOT IN ('needs_response', 'warning_needs_response') THEN
    RAISE EXCEPTION 'dispute % is %, it takes no evidence now', p_dispute, d.status
      USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Only a dispute that needs a response takes evidence.';
  END IF;
  IF d.evidence_due_by IS NOT NULL AND d.evidence_due_by <= billing.now() THEN
    RAISE EXCEPTION 'the deadline of dispute % passed at %', p_dispute, d.evidence_due_by
      USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Stripe no longer takes evidence for it.';
  END IF;
  v_req := billing.outbox_enqueue(p_tenant, 'dispute.submit', 'POST', '/v1/disputes/' || p_dispute,
                                  jsonb_build_object('evidence', x.evidence, 'submit', true),
                                  jsonb_build_object('dispute', p_dispute),
                                  CASE WHEN x.state = 'staging' THEN x.stage_request END);
  UPDATE billing.dispute_responses z
     SET state = 'submitting', submit_request = v_req, submitted_by = v_by, auto_submitted = p_auto, last_error = NULL
   WHERE z.tenant_id = p_tenant AND z.stripe_dispute_id = p_dispute;
  PERFORM billing.audit('dispute.evidence_submit_requested', p_tenant,
                        jsonb_build_object('dispute', p_dispute, 'request_id', v_req, 'auto', p_auto,
                                           'due_by', d.evidence_due_by));
  RETURN v_req;
END
$$;
COMMENT ON FUNCTION billing.dispute_submit(text, text, boolean) IS
  'Queue the submission of a dispute''s staged evidence to Stripe (submit=true), by an operator or automatically. Audited.';

CREATE FUNCTION billing.submit_dispute_evidence(p_dispute text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_tenant text;
BEGIN
  IF p_dispute IS NULL OR p_dispute !~ '^(dp|du)_[A-Za-z0-9_]+$' THEN
    RAISE EXCEPTION 'not a Stripe dispute id: %', coalesce(quote_literal(p_dispute), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Dispute ids look like dp_1Q...; see billing.dispute_evidence.';
  END IF;
  SELECT d.tenant_id INTO v_tenant FROM billing.disputes d WHERE d.stripe_dispute_id = p_dispute;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'dispute % is not known', p_dispute
      USING ERRCODE = 'no_data_found', HINT = 'See billing.dispute_evidence for the disputes mirrored.';
  END IF;
  RETURN billing.dispute_submit(v_tenant, p_dispute, false);
END
$$;
COMMENT ON FUNCTION billing.submit_dispute_evidence(text) IS
  'An operator submits the staged evidence of a dispute to Stripe (after reviewing billing.dispute_evidence). Returns the outbox request. Audited.';

CREATE FUNCTION api.submit_dispute_evidence(dispute text) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_req bigint := billing.submit_dispute_evidence(dispute);
BEGIN
  RETURN json_build_object('dispute', dispute, 'state', 'submitting', 'request_id', v_req);
END
$$;
COMMENT ON FUNCTION api.submit_dispute_evidence(text) IS
  'Operators (qes_admin): submit the staged evidence of a dispute to Stripe after review. Stripe takes it once. Audited.';

-- The answers of dispute.stage and dispute.submit (billing.outbox_apply).
CREATE FUNCTION billing.dispute_apply_answer(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_dispute text := r.subject ->> 'dispute';
BEGIN
  IF r.response ->> 'object' = 'dispute' THEN
    PERFORM billing.sync_dispute(r.tenant_id, r.response, billing.outbox_state_at(r), NULL);
  END IF;
  IF r.kind = 'dispute.stage' THEN
    UPDATE billing.dispute_responses x SET state = 'staged'
     WHERE x.tenant_id = r.tenant_id AND x.stripe_dispute_id = v_dispute AND x.state IN ('staging', 'failed')
       AND x.stage_request = r.request_id;
  ELSIF r.kind = 'dispute.submit' THEN
    UPDATE billing.dispute_responses x SET state = 'submitted', submitted_at = now()
     WHERE x.tenant_id = r.tenant_id AND x.stripe_dispute_id = v_dispute AND x.submit_request = r.request_id;
    PERFORM billing.audit('dispute.evidence_submitted', r.tenant_id,
                          jsonb_build_object('dispute', v_dispute, 'request_id', r.request_id,
                                             'status', r.response ->> 'status'));
  END IF;
END
$$;
COMMENT ON FUNCTION billing.dispute_apply_answer(billing.stripe_requests) IS
  'Stripe''s answer to staging or submitting evidence: the dispute mirrored from it, the response''s state moved on (submission audited).';

CREATE FUNCTION billing.dispute_apply_failure(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  UPDATE billing.dispute_responses x SET state = 'failed', last_error = r.error
   WHERE x.tenant_id = r.tenant_id AND x.stripe_dispute_id = r.subject ->> 'dispute'
     AND (x.stage_request = r.request_id OR x.submit_request = r.request_id);
  PERFORM billing.audit('dispute.evidence_failed', r.tenant_id,
                        jsonb_build_object('dispute', r.subject ->> 'dispute', 'request_id', r.request_id,
                                           'kind', r.kind, 'error', r.error));
END
$$;
COMMENT ON FUNCTION billing.dispute_apply_failure(billing.stripe_requests) IS
  'A request staging or submitting evidence failed for good: the response is failed (an operator may submit again), audited.';

-- What a closed dispute does: audited once; a lost one acts on the tenant's
-- subscription as qes_billing.dispute_lost_action says.
CREATE FUNCTION billing.dispute_closed(d billing.disputes) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_action text := current_setting('qes_billing.dispute_lost_action');
  cur      billing.subscriptions := billing.current_subscription(d.tenant_id);
  v_req    bigint;
  v_done   text := 'none';
BEGIN
  IF d.status = 'lost' AND v_action <> 'none' THEN
    IF cur.stripe_subscription_id IS NULL OR cur.status NOT IN ('active', 'trialing', 'past_due', 'unpaid') THEN
      v_done := 'none: no paid subscription';
    ELSIF v_action = 'cancel_at_period_end' THEN
      v_req := billing.outbox_enqueue(d.tenant_id, 'subscription.update', 'POST',
                                      '/v1/subscriptions/' || cur.stripe_subscription_id,
                                      jsonb_build_object('cancel_at_period_end', true),
                                      jsonb_build_object('subscription_id', cur.subscription_id));
      v_done := 'cancel_at_period_end';
    ELSE   -- cancel_now
      -- Stripe's cancel ends the subscription at once and, by default,
      -- bills nothing more: invoice_now=true issues the final invoice with
      -- the metered usage not yet invoiced (docs/architecture.md, "Usage
      -- billed through meters"); prorate=false credits no unused time (the
      -- chargeback already took back the period's payment).
      v_req := billing.outbox_enqueue(d.tenant_id, 'subscription.update', 'DELETE',
                                      '/v1/subscriptions/' || cur.stripe_subscription_id,
                                      jsonb_build_object('invoice_now', true, 'prorate', false),
                                      jsonb_build_object('subscription_id', cur.subscription_id));
      v_done := 'cancel_now';
    END IF;
  END IF;
  PERFORM billing.audit('dispute.closed', d.tenant_id,
    jsonb_strip_nulls(jsonb_build_object(
      'dispute', d.stripe_dispute_id, 'status', d.status, 'amount', d.amount, 'currency', d.currency,
      'lost_action_setting', CASE WHEN d.status = 'lost' THEN v_action END,
      'entitlements', CASE WHEN d.status = 'lost' THEN v_done END,
      'subscription', CASE WHEN v_req IS NOT NULL THEN cur.stripe_subscription_id END,
      'request_id', v_req)));
END
$$;
COMMENT ON FUNCTION billing.dispute_closed(billing.disputes) IS
  'A dispute closed (won, lost, warning closed): audited once; when lost, qes_billing.dispute_lost_action (none, cancel_at_period_end, cancel_now) is applied to the tenant''s paid subscription through Stripe and the decision audited.';

-- The worker's timer: submit staged evidence automatically before the deadline.
CREATE FUNCTION billing.dispute_timers() RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  r   record;
  v_n integer := 0;
BEGIN
  IF NOT current_setting('qes_billing.dispute_auto_submit')::boolean THEN
    RETURN 0;
  END IF;
  FOR r IN
    SELECT x.tenant_id, x.stripe_dispute_id
      FROM billing.disputes d
      JOIN billing.dispute_responses x ON x.tenant_id = d.tenant_id AND x.stripe_dispute_id = d.stripe_dispute_id
     WHERE d.status IN ('needs_response', 'warning_needs_response')
       AND d.evidence_due_by > billing.now()
       AND d.evidence_due_by <= billing.now() + current_setting('qes_billing.dispute_auto_submit_before')::interval
       AND x.state IN ('staging', 'staged')
     ORDER BY d.evidence_due_by
       FOR UPDATE OF x SKIP LOCKED
  LOOP
    PERFORM billing.dispute_submit(r.tenant_id, r.stripe_dispute_id, true);
    v_n := v_n + 1;
  END LOOP;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.dispute_timers() IS
  'Run by the worker''s tick: with qes_billing.dispute_auto_submit on, submit the staged evidence of every dispute whose deadline is within qes_billing.dispute_auto_submit_before.';

-- For operators: each dispute with its evidence, sizes and state.
CREATE VIEW billing.dispute_evidence AS
SELECT d.tenant_id, d.stripe_dispute_id, d.stripe_charge_id, d.amount, d.currency, d.reason, d.status,
       d.evidence_due_by, d.evidence_due_by - billing.now() AS time_left,
       d.has_evidence, d.submission_count, d.funds_withdrawn_at, d.funds_reinstated_at, d.closed_at,
       x.state AS evidence_state, x.period_start, x.period_end,
       x.evidence,
       (SELECT jsonb_object_agg(k, length(v)) FROM jsonb_each_text(x.evidence) AS e(k, v)) AS field_lengths,
       (SELECT sum(length(v)) FROM jsonb_each_text(x.evidence) AS e(k, v))::integer AS total_length,
       x.assembled_at, x.submitted_at, x.submitted_by, x.auto_submitted, x.last_error,
       x.stage_request, x.submit_request
  FROM billing.disputes d
  LEFT JOIN billing.dispute_responses x ON x.tenant_id = d.tenant_id AND x.stripe_dispute_id = d.stripe_dispute_id;
COMMENT ON VIEW billing.dispute_evidence IS
  'Operators: every dispute with the evidence assembled for it (Stripe''s fields), the length of each field and of all, its state (staging, staged, submitting, submitted, failed), the deadline and time left.';

-- Prometheus: disputes that need a response, and those due within 72 hours
-- whose evidence is not submitted (the alert QesBillingDisputeDueSoon):
-- evidence staged is not an answer, and a dispute answered in Stripe's
-- Dashboard leaves needs_response.
CREATE VIEW billing.prometheus_disputes AS
SELECT count(*) FILTER (WHERE d.status IN ('needs_response', 'warning_needs_response')) AS needs_response,
       count(*) FILTER (WHERE d.status IN ('needs_response', 'warning_needs_response')
                          AND d.evidence_due_by <= billing.now() + interval '72 hours'
                          AND d.evidence_due_by > billing.now()
                          AND coalesce(x.state, 'none') NOT IN ('submitting', 'submitted')) AS due_soon_unsubmitted,
       coalesce(extract(epoch FROM min(d.evidence_due_by) FILTER (
         WHERE d.status IN ('needs_response', 'warning_needs_response') AND d.evidence_due_by > billing.now()
           AND coalesce(x.state, 'none') NOT IN ('submitting', 'submitted'))), 0)::double precision
         AS next_due_timestamp_seconds
  FROM billing.disputes d
  LEFT JOIN billing.dispute_responses x ON x.tenant_id = d.tenant_id AND x.stripe_dispute_id = d.stripe_dispute_id;
COMMENT ON VIEW billing.prometheus_disputes IS
  'Prometheus: disputes that need a response; those due within 72 hours whose evidence is not submitted; the earliest deadline of those not submitted (0: none).';
