-- ---- 3. the data ---------------------------------------------------------------
--
-- 0.2 keeps facts about the mirrored Stripe objects that 0.1 did not
-- (docs/architecture.md, "Mirroring Stripe").  0.1 kept the objects
-- themselves: every event it applied is in the inbox, every answer it got
-- in the outbox.  The facts are taken from there as 0.2's handlers take
-- them (earliest failure, latest attempt count, first finalization and
-- payment, the newest state's cycle anchor), so the mirror is what 0.2 would
-- have built from the same deliveries.

-- Stripe's times are whole seconds since the epoch; anything else in a
-- field 0.1 never read counts as absent rather than stopping the update.
CREATE FUNCTION qes_billing_0_1.ts(v text) RETURNS timestamptz
  LANGUAGE sql IMMUTABLE
  RETURN CASE WHEN v ~ '^[0-9]{1,12}$' THEN pg_catalog.to_timestamp(v::bigint) END;
CREATE FUNCTION qes_billing_0_1.int(v text) RETURNS integer
  LANGUAGE sql IMMUTABLE
  RETURN CASE WHEN v ~ '^[0-9]{1,9}$' THEN v::integer END;

-- The objects, read once from the inbox and the outbox.
CREATE TABLE qes_billing_0_1.objects AS
SELECT x.tenant_id, x.o ->> 'object' AS object, x.o ->> 'id' AS id, x.o, x.source, x.at
  FROM (SELECT e.tenant_id, e.payload::jsonb -> 'data' -> 'object' AS o, e.event_type AS source,
               e.stripe_created AS at
          FROM billing.webhook_events e
         WHERE e.state = 'applied'
        UNION ALL
        SELECT r.tenant_id, r.response, 'answer', r.updated_at
          FROM billing.stripe_requests r
         WHERE r.state = 'succeeded') x
 WHERE jsonb_typeof(x.o) = 'object'
   AND x.o ->> 'object' IN ('customer', 'subscription', 'invoice', 'payment_intent', 'charge');

-- The tables made again: every row with its id, the identity sequence where
-- it was.  A subscription gets its cycle anchor and creation time from its
-- newest state 0.1 saw, and an ended one the time it ended.
INSERT INTO billing.subscriptions (tenant_id, subscription_id, plan_id, billing_interval, status,
                                   stripe_subscription_id, stripe_price_id, client_secret, current_period_start,
                                   current_period_end, cancel_at_period_end, trial_end, grace_until,
                                   stripe_state_at, billing_cycle_anchor, stripe_created, ended_at, created_at,
                                   updated_at, stripe_item_id, pending_change, last_error)
OVERRIDING SYSTEM VALUE
SELECT s.tenant_id, s.subscription_id, s.plan_id, s.billing_interval, s.status, s.stripe_subscription_id,
       s.stripe_price_id, s.client_secret, s.current_period_start, s.current_period_end, s.cancel_at_period_end,
       s.trial_end, s.grace_until, s.stripe_state_at, f.anchor, f.created,
       CASE WHEN s.status IN ('canceled', 'incomplete_expired') AND s.stripe_subscription_id IS NOT NULL
            THEN coalesce(f.ended, s.stripe_state_at) END,
       s.created_at, s.updated_at, s.stripe_item_id, s.pending_change, s.last_error
  FROM qes_billing_0_1.subscriptions s
  LEFT JOIN (SELECT x.id,
                    (array_agg(qes_billing_0_1.ts(x.o ->> 'billing_cycle_anchor') ORDER BY x.at DESC NULLS LAST)
                       FILTER (WHERE qes_billing_0_1.ts(x.o ->> 'billing_cycle_anchor') IS NOT NULL))[1] AS anchor,
                    min(qes_billing_0_1.ts(x.o ->> 'created')) AS created,
                    min(qes_billing_0_1.ts(coalesce(x.o ->> 'ended_at', x.o ->> 'canceled_at'))) AS ended
               FROM qes_billing_0_1.objects x
              WHERE x.object = 'subscription'
              GROUP BY 1) f ON f.id = s.stripe_subscription_id
 ORDER BY s.tenant_id, s.subscription_id;
SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence('billing.subscriptions', 'subscription_id'),
                         s.last_value, s.is_called)
  FROM qes_billing_0_1.subscriptions_subscription_id_seq s;
ALTER TABLE billing.invoices ADD CONSTRAINT invoices_tenant_id_subscription_id_fkey
  FOREIGN KEY (tenant_id, subscription_id) REFERENCES billing.subscriptions;

-- each refusal 0.1 wrote was one delivery
INSERT INTO billing.webhook_rejections (rejection_id, rejected_at, reason, deliveries, stripe_event_id, event_type)
OVERRIDING SYSTEM VALUE
SELECT rejection_id, rejected_at, reason, 1, stripe_event_id, event_type
  FROM qes_billing_0_1.webhook_rejections ORDER BY rejection_id;
SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence('billing.webhook_rejections', 'rejection_id'),
                         s.last_value, s.is_called)
  FROM qes_billing_0_1.webhook_rejections_rejection_id_seq s;

-- Stripe customers: every one a tenant was linked to or Stripe told about,
-- deleted ones with the time of their deletion (never linked again).
INSERT INTO billing.stripe_customers (tenant_id, stripe_customer_id, stripe_created, deleted_at)
SELECT DISTINCT ON (c.id) c.tenant_id, c.id, c.created, c.deleted_at
  FROM (SELECT x.tenant_id, x.id, min(qes_billing_0_1.ts(x.o ->> 'created')) AS created,
               min(x.at) FILTER (WHERE x.source = 'customer.deleted' OR x.o ->> 'deleted' = 'true') AS deleted_at
          FROM qes_billing_0_1.objects x
         WHERE x.object = 'customer' AND x.id ~ '^cus_' AND x.tenant_id IS NOT NULL
         GROUP BY 1, 2
        UNION ALL
        SELECT t.tenant_id, t.stripe_customer_id, NULL, NULL
          FROM billing.tenants t WHERE t.stripe_customer_id IS NOT NULL) c
 WHERE EXISTS (SELECT 1 FROM billing.tenants t WHERE t.tenant_id = c.tenant_id)
 ORDER BY c.id, c.created IS NULL, c.tenant_id;

-- The failures 0.1 knew of were decided by 0.1: the tenant was told when it
-- queued a payment.failed notice.  Recorded before the invoices get their
-- first failed attempt below, so that the upgrade neither tells anyone
-- again nor asks Stripe about them (billing.sync_invoice_failure).
INSERT INTO billing.invoice_failures (tenant_id, stripe_invoice_id, told, decided_at)
SELECT i.tenant_id, i.stripe_invoice_id,
       EXISTS (SELECT FROM billing.notifications n
                WHERE n.tenant_id = i.tenant_id AND n.dedup_key = 'payment_failed:' || i.stripe_invoice_id),
       now()
  FROM billing.invoices i
 WHERE EXISTS (SELECT FROM qes_billing_0_1.objects x
                WHERE x.object = 'invoice' AND x.id = i.stripe_invoice_id AND x.source = 'invoice.payment_failed')
    OR EXISTS (SELECT FROM billing.notifications n
                WHERE n.tenant_id = i.tenant_id AND n.dedup_key = 'payment_failed:' || i.stripe_invoice_id)
ON CONFLICT DO NOTHING;

-- Invoices: their subscription by Stripe id, the first failed attempt (the
-- earliest invoice.payment_failed), the attempt count, status transitions.
UPDATE billing.invoices i
   SET stripe_subscription_id = coalesce(f.subscription, s.stripe_subscription_id),
       first_failed_at = f.first_failed_at, attempt_count = coalesce(f.attempt_count, 0),
       finalized_at = f.finalized_at, paid_at = f.paid_at, billing_reason = f.billing_reason
  FROM billing.invoices i2
  LEFT JOIN billing.subscriptions s ON s.tenant_id = i2.tenant_id AND s.subscription_id = i2.subscription_id
  LEFT JOIN (SELECT x.id,
                    min(billing.invoice_subscription(x.o)) AS subscription,
                    min(x.at) FILTER (WHERE x.source = 'invoice.payment_failed') AS first_failed_at,
                    max(qes_billing_0_1.int(x.o ->> 'attempt_count')) AS attempt_count,
                    min(qes_billing_0_1.ts(x.o -> 'status_transitions' ->> 'finalized_at')) AS finalized_at,
                    min(qes_billing_0_1.ts(x.o -> 'status_transitions' ->> 'paid_at')) AS paid_at,
                    max(x.o ->> 'billing_reason') AS billing_reason
               FROM qes_billing_0_1.objects x
              WHERE x.object = 'invoice'
              GROUP BY 1) f ON f.id = i2.stripe_invoice_id
 WHERE i.tenant_id = i2.tenant_id AND i.stripe_invoice_id = i2.stripe_invoice_id;
ALTER TABLE billing.invoices ALTER COLUMN attempt_count SET DEFAULT 0, ALTER COLUMN attempt_count SET NOT NULL;

-- Which payment intent pays which invoice, from either side; a payment a
-- link names is a subscription payment (billing.link_invoice_payment).
INSERT INTO billing.invoice_payments (tenant_id, stripe_payment_intent_id, stripe_invoice_id)
SELECT DISTINCT l.tenant_id, l.pi, l.inv
  FROM (SELECT x.tenant_id, billing.stripe_ref(x.o -> 'payment_intent') AS pi, x.id AS inv
          FROM qes_billing_0_1.objects x WHERE x.object = 'invoice'
        UNION ALL
        SELECT x.tenant_id, billing.stripe_ref(p -> 'payment' -> 'payment_intent'), x.id
          FROM qes_billing_0_1.objects x
          CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(x.o -> 'payments' -> 'data') = 'array'
                                                       THEN x.o -> 'payments' -> 'data' ELSE '[]' END) p
         WHERE x.object = 'invoice'
        UNION ALL
        SELECT x.tenant_id, CASE WHEN x.object = 'payment_intent' THEN x.id
                                 ELSE billing.stripe_ref(x.o -> 'payment_intent') END,
               billing.stripe_ref(x.o -> 'invoice')
          FROM qes_billing_0_1.objects x WHERE x.object IN ('payment_intent', 'charge')) l
 WHERE l.pi ~ '^pi_' AND l.inv ~ '^in_'
   AND EXISTS (SELECT 1 FROM billing.tenants t WHERE t.tenant_id = l.tenant_id)
ON CONFLICT DO NOTHING;
UPDATE billing.payments p SET kind = 'subscription', stripe_invoice_id = l.stripe_invoice_id
  FROM (SELECT DISTINCT ON (tenant_id, stripe_payment_intent_id) tenant_id, stripe_payment_intent_id, stripe_invoice_id
          FROM billing.invoice_payments ORDER BY tenant_id, stripe_payment_intent_id, stripe_invoice_id) l
 WHERE p.tenant_id = l.tenant_id AND p.stripe_payment_intent_id = l.stripe_payment_intent_id;

-- Events 0.1 ignored because they named a customer that was not one of our
-- tenants' wait for it, as 0.2's do; those whose customer is ours by now
-- are applied again.
UPDATE billing.webhook_events e
   SET waits_for = ARRAY[billing.object_customer(e.payload::jsonb -> 'data' -> 'object')]
 WHERE e.state = 'ignored' AND billing.object_customer(e.payload::jsonb -> 'data' -> 'object') IS NOT NULL;
INSERT INTO billing.webhook_waits (stripe_id, stripe_event_id)
SELECT w.stripe_id, e.stripe_event_id
  FROM billing.webhook_events e CROSS JOIN LATERAL unnest(e.waits_for) w(stripe_id)
 WHERE e.state = 'ignored'
ON CONFLICT DO NOTHING;
SELECT billing.inbox_requeue(array_agg(c.stripe_customer_id))
  FROM billing.stripe_customers c WHERE c.deleted_at IS NULL;

-- Grace periods as 0.2 derives them: from the first failed attempt of the
-- oldest unpaid invoice (0.1 started them when it applied the event).
-- Audited where that changes one (dunning.*).
SELECT billing.sync_dunning(s.tenant_id, s.subscription_id)
  FROM billing.subscriptions s
 WHERE s.stripe_subscription_id IS NOT NULL
 ORDER BY s.tenant_id, s.subscription_id;

-- Secrets 0.1 stored in clear (docs/architecture.md, "Secrets"): Stripe's
-- answers and errors, an event's error.  The audit log is append-only and
-- hash-chained: its rows stay as 0.1 wrote them.
UPDATE billing.stripe_requests SET response = billing.redact(response)
 WHERE response IS DISTINCT FROM billing.redact(response);
UPDATE billing.stripe_requests SET error = billing.redact(error)
 WHERE error IS DISTINCT FROM billing.redact(error);
UPDATE billing.subscriptions SET last_error = billing.redact(last_error)
 WHERE last_error IS DISTINCT FROM billing.redact(last_error);
UPDATE billing.webhook_events SET last_error = billing.redact_text(last_error)
 WHERE last_error IS DISTINCT FROM billing.redact_text(last_error);

-- When a request may first have reached Stripe (0.2 keeps it to know how
-- long Stripe keeps its key): 0.1 did not record it, so a request it sent is
-- taken as sent when it was made, the earliest it can have been (a retry of
-- it is then refused sooner, never later, than Stripe forgets the key).
-- (0.1's retry_request reset attempts and kept the key: its error tells)
UPDATE billing.stripe_requests SET first_sent_at = created_at
 WHERE (attempts > 0 OR error IS NOT NULL) AND first_sent_at IS NULL;

-- The 0.1 tables made again: out of the extension's pg_dump marks, then gone
-- with the scratch schema.
ALTER EXTENSION qes_billing DROP TABLE qes_billing_0_1.subscriptions;
ALTER EXTENSION qes_billing DROP TABLE qes_billing_0_1.webhook_rejections;
DROP SCHEMA qes_billing_0_1 CASCADE;
