-- Every table of qes_billing, with its indexes and constraints, in its
-- final form, grouped by concern.  No later file alters a table: a change of
-- shape in a released version is an upgrade script's business
-- (sql/qes_billing--A--B.sql).  The functions and triggers over these
-- tables live in the files of their concern; row-level security and grants
-- in 99_security.sql; what pg_dump keeps in 97_dump.sql.
--
-- Tenant-owned tables lead their primary key with tenant_id, so the schema
-- can be distributed by tenant (docs/architecture.md, "Rules").

-- ---- the billing clock ---------------------------------------------------------

-- The billing clock.  Every time-dependent rule reads billing.now().
CREATE TABLE billing.clock (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  offset_by interval NOT NULL DEFAULT '0'
);
COMMENT ON TABLE billing.clock IS 'Offset of billing.now() from the real clock (ignored in production).';

-- ---- the plan catalog ----------------------------------------------------------
-- The plan catalog (global, not tenant-owned): metrics, plans, their limits
-- and prices.  Operators change it with plain SQL; limits take effect at
-- commit.

CREATE TABLE billing.metrics (
  metric      text PRIMARY KEY CHECK (metric ~ '^[a-z][a-z_]{0,31}$'),
  kind        text NOT NULL CHECK (kind IN ('counter', 'gauge')),
  unit        text NOT NULL,
  description text NOT NULL
);
COMMENT ON TABLE billing.metrics IS
  'What is metered. Counters are summed per billing period; a gauge''s latest value counts.';

CREATE TABLE billing.plans (
  plan_id           text PRIMARY KEY CHECK (plan_id ~ '^[a-z][a-z0-9_]{0,31}$'),
  name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  tier              integer NOT NULL UNIQUE CHECK (tier >= 0),
  description       text NOT NULL DEFAULT '',
  features          text[] NOT NULL DEFAULT '{}' CHECK (array_position(features, NULL) IS NULL),
  stripe_product_id text UNIQUE,
  active            boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE billing.plans IS
  'Plans, ordered by tier (the next tier up is the upgrade a tenant is offered).';

CREATE TABLE billing.plan_limits (
  plan_id        text NOT NULL REFERENCES billing.plans ON UPDATE CASCADE ON DELETE CASCADE,
  metric         text NOT NULL REFERENCES billing.metrics ON UPDATE CASCADE,
  soft_limit     bigint CHECK (soft_limit >= 0),
  hard_limit_pct integer CHECK (hard_limit_pct >= 100),
  PRIMARY KEY (plan_id, metric),
  CHECK (soft_limit IS NOT NULL OR hard_limit_pct IS NULL)
);
COMMENT ON TABLE billing.plan_limits IS
  'Per plan and metric: the soft limit per billing period (NULL = unlimited) and an optional hard ceiling in percent of it.';

CREATE TABLE billing.prices (
  price_key        text PRIMARY KEY CHECK (price_key ~ '^[a-z][a-z0-9_]{0,63}$'),
  plan_id          text NOT NULL REFERENCES billing.plans ON UPDATE CASCADE,
  billing_interval text NOT NULL CHECK (billing_interval IN ('month', 'year')),
  unit_amount      bigint NOT NULL CHECK (unit_amount >= 0),
  currency         text NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{3}$'),
  stripe_price_id  text UNIQUE,
  active           boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE billing.prices IS
  'Prices per plan and interval, in the smallest currency unit. price_key is the Stripe lookup_key.';
CREATE UNIQUE INDEX prices_one_active ON billing.prices (plan_id, billing_interval, currency) WHERE active;

-- ---- tenants and subscriptions -------------------------------------------------
-- Tenants and their subscriptions.  Tenant-owned tables lead their primary
-- key with tenant_id (docs/architecture.md, rule 2).

CREATE TABLE billing.tenants (
  tenant_id          text PRIMARY KEY CHECK (tenant_id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
  name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  billing_email      text NOT NULL CHECK (length(billing_email) <= 254
                                          AND billing_email ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$'),
  stripe_customer_id text UNIQUE CHECK (stripe_customer_id ~ '^cus_'),
  disputed           boolean NOT NULL DEFAULT false,
  created_at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
  updated_at         timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing.tenants IS 'Tenants of the QES platform, registered by the platform with billing.upsert_tenant().';

-- A tenant's billing details for tax (sql/install/91_tax.sql): what the
-- tenant gave, checked here, then by Stripe (state: pending -> valid |
-- refused, refusal naming the field); version counts the times they were
-- given, so an answer about older details changes nothing.  The VAT number's
-- tax ID and its verification as Stripe reports it; reverse_charge: the
-- decision taken from it (audited as tax.reverse_charge).
CREATE TABLE billing.billing_details (
  tenant_id      text PRIMARY KEY REFERENCES billing.tenants,
  legal_name     text NOT NULL CHECK (length(legal_name) BETWEEN 1 AND 200),
  country        text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
  postal_code    text NOT NULL CHECK (length(postal_code) BETWEEN 1 AND 12),
  line1          text CHECK (length(line1) <= 200),
  city           text CHECK (length(city) <= 100),
  vat_number     text CHECK (vat_number ~ '^[A-Z]{2}[A-Z0-9+*]{2,13}$'),
  state          text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'valid', 'refused')),
  refusal        jsonb,
  version        integer NOT NULL DEFAULT 1,
  stripe_request bigint,
  stripe_tax_id  text CHECK (stripe_tax_id ~ '^txi_'),
  tax_id_status  text CHECK (tax_id_status IN ('pending', 'verified', 'unverified', 'unavailable', 'deleted')),
  reverse_charge boolean NOT NULL DEFAULT false,
  validated_at   timestamptz,
  updated_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
  CHECK ((state = 'refused') = (refusal IS NOT NULL))
);
COMMENT ON TABLE billing.billing_details IS
  'Each tenant''s billing details for tax: legal name, address, EU VAT number; Stripe''s validation of the location, the VAT number''s verification and the reverse-charge decision.';

-- The tax of each invoice as Stripe's newest invoice event shows it
-- (sql/install/91_tax.sql): subtotal, tax, total; automatic tax's status
-- (complete, failed, requires_location_inputs) and, when it was switched
-- off, why (finalization_requires_location_inputs: finalized without tax
-- because the location was missing); per line, the tax amounts with the
-- rate or the taxability reason where Stripe gives them.
CREATE TABLE billing.invoice_taxes (
  tenant_id              text NOT NULL REFERENCES billing.tenants,
  stripe_invoice_id      text NOT NULL CHECK (stripe_invoice_id ~ '^in_'),
  currency               text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  subtotal               bigint,
  tax                    bigint,
  total                  bigint,
  automatic_tax_enabled  boolean,
  automatic_tax_status   text,
  automatic_tax_disabled_reason text,
  finalized_without_tax  boolean NOT NULL DEFAULT false,
  tax_lines              jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(tax_lines) = 'array'),
  stripe_state_at        timestamptz NOT NULL,
  PRIMARY KEY (tenant_id, stripe_invoice_id)
);
COMMENT ON TABLE billing.invoice_taxes IS
  'Each invoice''s tax as Stripe''s newest invoice event showed it: subtotal, tax, total, automatic tax''s status and why it was off, and per line the tax amounts with their rate or taxability reason.';
CREATE INDEX invoice_taxes_without_tax ON billing.invoice_taxes (stripe_state_at) WHERE finalized_without_tax;

CREATE TABLE billing.subscriptions (
  tenant_id              text NOT NULL REFERENCES billing.tenants,
  subscription_id        bigint GENERATED ALWAYS AS IDENTITY,
  plan_id                text NOT NULL REFERENCES billing.plans ON UPDATE CASCADE,
  billing_interval       text NOT NULL CHECK (billing_interval IN ('month', 'year')),
  status                 text NOT NULL CHECK (status IN ('incomplete', 'incomplete_expired', 'trialing',
                                                         'active', 'past_due', 'canceled', 'unpaid', 'paused')),
  stripe_subscription_id text UNIQUE CHECK (stripe_subscription_id ~ '^sub_'),
  stripe_price_id        text,
  client_secret          text,
  current_period_start   timestamptz,
  current_period_end     timestamptz,
  cancel_at_period_end   boolean NOT NULL DEFAULT false,
  trial_end              timestamptz,
  grace_until            timestamptz,
  stripe_state_at        timestamptz,
  -- Stripe's own facts the entitlements are computed from (docs/architecture.md,
  -- "Mirroring Stripe"): the cycle anchor the periods step from, when the
  -- subscription was created and when it ended
  billing_cycle_anchor   timestamptz,
  stripe_created         timestamptz,
  ended_at               timestamptz,
  -- where the state came from: an event (Stripe's time, whole seconds) or
  -- an answer of the outbox (stamped with the second its request was sent)
  stripe_state_source    text CHECK (stripe_state_source IN ('event', 'answer')),
  created_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
  updated_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- what the outbox needs: the subscription item upgrades and downgrades
  -- change, a change asked for and not answered yet, the last failure
  stripe_item_id         text,
  pending_change         jsonb,
  last_error             jsonb,
  -- the metered items (usage billed through meters, 94_meters.sql) as
  -- Stripe last answered: [{"id": "si_...", "price": "price_..."}]
  metered_items          jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(metered_items) = 'array'),
  PRIMARY KEY (tenant_id, subscription_id),
  CHECK (current_period_end IS NULL OR current_period_start IS NULL
         OR current_period_end > current_period_start)
);
COMMENT ON TABLE billing.subscriptions IS
  'Subscriptions mirrored from Stripe (Free is local only). stripe_state_at is the Stripe time of the newest state applied, so an older event never overwrites a newer one; grace_until is derived from Stripe''s times (billing.sync_dunning).';
CREATE UNIQUE INDEX subscriptions_one_current ON billing.subscriptions (tenant_id)
  WHERE status NOT IN ('canceled', 'incomplete_expired');
-- the grace periods the notification timers watch
CREATE INDEX subscriptions_grace ON billing.subscriptions (grace_until)
  WHERE status IN ('past_due', 'unpaid') AND grace_until IS NOT NULL;

-- Every Stripe customer of a tenant that Stripe told about, kept by Stripe
-- id: events about any of them (a deleted one too) belong to the tenant, and
-- a deleted customer is never linked again.  tenants.stripe_customer_id is
-- the newest customer that is not deleted (billing.sync_customer).
CREATE TABLE billing.stripe_customers (
  tenant_id          text NOT NULL REFERENCES billing.tenants,
  stripe_customer_id text NOT NULL UNIQUE CHECK (stripe_customer_id ~ '^cus_'),
  stripe_created     timestamptz,
  deleted_at         timestamptz,
  linked_at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (tenant_id, stripe_customer_id)
);
COMMENT ON TABLE billing.stripe_customers IS
  'Every Stripe customer of each tenant that Stripe told about (customer events). deleted_at is the Stripe time of customer.deleted: a deleted customer is never revived by an older event.';

-- ---- usage ---------------------------------------------------------------------
-- Usage events: one row per recorded usage, counted once per
-- (tenant_id, idempotency_key) forever.  The hot paths never read this
-- history (they read the shared counters), so its size only adds B-tree
-- depth to the two index inserts of record_usage.  It is deliberately not
-- partitioned: on PostgreSQL 15 tuple routing costs a single-row INSERT
-- about 17 % (measured, see README), and period partitions could not keep
-- the key unique forever.

CREATE TABLE billing.usage_events (
  tenant_id       text NOT NULL,
  idempotency_key text NOT NULL,
  metric          text NOT NULL,
  quantity        bigint NOT NULL,
  period_start    timestamptz NOT NULL,
  occurred_at     timestamptz NOT NULL,
  recorded_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
  metadata        jsonb,
  total_after     bigint,
  PRIMARY KEY (tenant_id, idempotency_key)
);
COMMENT ON TABLE billing.usage_events IS
  'Recorded usage. Counters: quantity is added to the period total; gauge (storage): the newest row of the period is the value.';


CREATE INDEX usage_events_period ON billing.usage_events (tenant_id, metric, period_start)
  INCLUDE (quantity);

-- ---- invoices, payments, disputes, notifications -------------------------------
-- Mirrors of Stripe objects per tenant, and the notifications queue.

CREATE TABLE billing.invoices (
  tenant_id          text NOT NULL REFERENCES billing.tenants,
  stripe_invoice_id  text NOT NULL UNIQUE CHECK (stripe_invoice_id ~ '^in_'),
  subscription_id    bigint,
  number             text,
  status             text NOT NULL CHECK (status IN ('draft', 'open', 'paid', 'uncollectible', 'void')),
  amount_due         bigint NOT NULL DEFAULT 0 CHECK (amount_due >= 0),
  amount_paid        bigint NOT NULL DEFAULT 0 CHECK (amount_paid >= 0),
  amount_remaining   bigint NOT NULL DEFAULT 0 CHECK (amount_remaining >= 0),
  currency           text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  period_start       timestamptz,
  period_end         timestamptz,
  hosted_invoice_url text,
  invoice_pdf        text,
  stripe_created     timestamptz NOT NULL,
  stripe_state_at    timestamptz,
  updated_at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- kept by Stripe id, so the relation resolves whichever side arrives first
  stripe_subscription_id text,
  -- dunning facts, from Stripe's times: the first failed attempt (the
  -- created time of the earliest invoice.payment_failed), attempts so far,
  -- status_transitions
  first_failed_at    timestamptz,
  attempt_count      integer NOT NULL DEFAULT 0,
  finalized_at       timestamptz,
  paid_at            timestamptz,
  -- subscription_create for a subscription's first invoice (whose failure
  -- is no dunning: the subscription never started)
  billing_reason     text,
  PRIMARY KEY (tenant_id, stripe_invoice_id),
  FOREIGN KEY (tenant_id, subscription_id) REFERENCES billing.subscriptions
);
COMMENT ON TABLE billing.invoices IS 'Invoices mirrored from Stripe.';
CREATE INDEX invoices_newest ON billing.invoices (tenant_id, stripe_created DESC);
CREATE INDEX invoices_subscription ON billing.invoices (stripe_subscription_id) WHERE stripe_subscription_id IS NOT NULL;

-- One row per invoice whose payment failed: what was decided and audited
-- about it, each fact once whatever the order events arrive in
-- (billing.sync_invoice_failure, 85_events.sql).  told: NULL until decided,
-- then whether the tenant was told (payment.failed); lookup_request: the one
-- GET that checks a failure learnt late (0: none could be sent); the Stripe
-- times audited as dunning.started, dunning.recovered (or
-- .recovered_before_known) and dunning.ended; learnt_at: when the mirror
-- learnt of the failure (ours).
CREATE TABLE billing.invoice_failures (
  tenant_id              text NOT NULL REFERENCES billing.tenants,
  stripe_invoice_id      text NOT NULL,
  stripe_subscription_id text,
  told                   boolean,
  lookup_request         bigint,
  started_at             timestamptz,
  recovered_at           timestamptz,
  ended_at               timestamptz,
  learnt_at              timestamptz NOT NULL DEFAULT pg_catalog.now(),
  decided_at             timestamptz,
  PRIMARY KEY (tenant_id, stripe_invoice_id)
);
COMMENT ON TABLE billing.invoice_failures IS
  'One row per invoice whose payment failed: whether the tenant was told, and which dunning facts were audited (each once, whatever the order events arrive in).';
CREATE INDEX invoice_failures_open ON billing.invoice_failures (stripe_subscription_id)
  WHERE recovered_at IS NULL AND ended_at IS NULL;
CREATE INDEX invoice_failures_lookup ON billing.invoice_failures (lookup_request) WHERE lookup_request IS NOT NULL;

CREATE TABLE billing.payments (
  tenant_id                text NOT NULL REFERENCES billing.tenants,
  payment_id               bigint GENERATED ALWAYS AS IDENTITY,
  kind                     text NOT NULL CHECK (kind IN ('one_time', 'subscription')),
  amount                   bigint NOT NULL CHECK (amount > 0),
  currency                 text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  description              text CHECK (length(description) <= 1000),
  status                   text NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'requires_payment_method', 'requires_confirmation',
                                               'requires_action', 'processing', 'requires_capture',
                                               'canceled', 'succeeded', 'failed')),
  stripe_payment_intent_id text UNIQUE CHECK (stripe_payment_intent_id ~ '^pi_'),
  stripe_charge_id         text,
  client_secret            text,
  failure_code             text,
  failure_message          text,
  stripe_state_at          timestamptz,
  created_at               timestamptz NOT NULL DEFAULT pg_catalog.now(),
  updated_at               timestamptz NOT NULL DEFAULT pg_catalog.now(),
  stripe_invoice_id        text,
  PRIMARY KEY (tenant_id, payment_id)
);
CREATE INDEX payments_charge ON billing.payments (stripe_charge_id) WHERE stripe_charge_id IS NOT NULL;

-- Which payment intent pays which invoice, by Stripe id, from whichever side
-- says so: the payment intent's `invoice` and the invoice's `payment_intent`
-- (API versions before 2025-03-31), or the invoice's payments
-- (InvoicePayment objects, since).  A payment is kind 'subscription' when a
-- link names it, whichever arrived first.
CREATE TABLE billing.invoice_payments (
  tenant_id                text NOT NULL REFERENCES billing.tenants,
  stripe_payment_intent_id text NOT NULL CHECK (stripe_payment_intent_id ~ '^pi_'),
  stripe_invoice_id        text NOT NULL CHECK (stripe_invoice_id ~ '^in_'),
  PRIMARY KEY (tenant_id, stripe_payment_intent_id, stripe_invoice_id)
);
COMMENT ON TABLE billing.invoice_payments IS
  'Links between payment intents and the invoices they pay, by Stripe id (from either side, in any API version).';
COMMENT ON TABLE billing.payments IS 'Payments (one-time payment intents and subscription charges) mirrored from Stripe.';

-- The tax of a one-time payment (sql/install/91_tax.sql): Stripe Tax's
-- calculation before the payment intent (its amount is the calculation's
-- total), and the tax transaction recorded once the payment succeeded.
CREATE TABLE billing.payment_taxes (
  tenant_id            text NOT NULL,
  payment_id           bigint NOT NULL,
  amount_subtotal      bigint NOT NULL CHECK (amount_subtotal > 0),
  calculation_request  bigint NOT NULL,
  calculation_id       text CHECK (calculation_id ~ '^taxcalc_'),
  tax                  bigint,
  amount_total         bigint,
  tax_breakdown        jsonb,
  transaction_request  bigint,
  transaction_id       text,
  PRIMARY KEY (tenant_id, payment_id),
  FOREIGN KEY (tenant_id, payment_id) REFERENCES billing.payments
);
COMMENT ON TABLE billing.payment_taxes IS
  'Tax of one-time payments: Stripe Tax''s calculation (tax, total charged, breakdown) and the tax transaction recorded when the payment succeeded.';

CREATE TABLE billing.disputes (
  tenant_id         text NOT NULL REFERENCES billing.tenants,
  stripe_dispute_id text NOT NULL UNIQUE CHECK (stripe_dispute_id ~ '^(dp|du)_'),
  stripe_charge_id  text,
  amount            bigint NOT NULL CHECK (amount >= 0),
  currency          text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  reason            text,
  status            text NOT NULL,
  stripe_created    timestamptz NOT NULL,
  recorded_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- the newest state Stripe told of (sql/install/94_disputes.sql): the
  -- response's deadline (NULL: none possible), whether evidence was given,
  -- and the Stripe times of the funds' movements and of the decision
  stripe_payment_intent_id text,
  evidence_due_by   timestamptz,
  has_evidence      boolean NOT NULL DEFAULT false,
  past_due          boolean NOT NULL DEFAULT false,
  submission_count  integer NOT NULL DEFAULT 0 CHECK (submission_count >= 0),
  funds_withdrawn_at  timestamptz,
  funds_reinstated_at timestamptz,
  closed_at         timestamptz,
  stripe_state_at   timestamptz,
  updated_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (tenant_id, stripe_dispute_id)
);
COMMENT ON TABLE billing.disputes IS
  'Card disputes (chargebacks) mirrored from Stripe: status, the deadline for evidence, funds withdrawn and reinstated, the decision.';
-- the disputes still to be answered, by deadline (the alert, automatic submission)
CREATE INDEX disputes_due ON billing.disputes (evidence_due_by)
  WHERE status IN ('needs_response', 'warning_needs_response');

-- The platform's answer to one dispute (sql/install/94_disputes.sql): the
-- evidence assembled from the tenant's own rows when the dispute arrived,
-- in Stripe's evidence fields; state: staged (sent with submit=false, for
-- an operator to review) -> submitting -> submitted, or failed (the
-- request failed for good; an operator may retry it).  stage_request and
-- submit_request are the outbox rows.
CREATE TABLE billing.dispute_responses (
  tenant_id         text NOT NULL,
  stripe_dispute_id text NOT NULL,
  evidence          jsonb NOT NULL CHECK (jsonb_typeof(evidence) = 'object'),
  period_start      timestamptz NOT NULL,
  period_end        timestamptz NOT NULL,
  state             text NOT NULL DEFAULT 'staging'
                      CHECK (state IN ('staging', 'staged', 'submitting', 'submitted', 'failed')),
  stage_request     bigint,
  submit_request    bigint,
  assembled_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
  submitted_at      timestamptz,
  submitted_by      text,
  auto_submitted    boolean NOT NULL DEFAULT false,
  last_error        jsonb,
  PRIMARY KEY (tenant_id, stripe_dispute_id),
  FOREIGN KEY (tenant_id, stripe_dispute_id) REFERENCES billing.disputes (tenant_id, stripe_dispute_id),
  CHECK (period_end >= period_start)
);
COMMENT ON TABLE billing.dispute_responses IS
  'The evidence answering each dispute, assembled from the tenant''s own usage, subscription, invoices and payments, and where its submission to Stripe stands.';

-- Notifications, delivered by the worker (sql/install/89_notify.sql,
-- src/notify.c).  state: pending -> in_flight -> sent | pending (retry) |
-- failed; or skipped when it no longer applies by its turn
-- (docs/architecture.md, "States").  event_id is what receivers deduplicate
-- by, the same on every attempt.  channels_due: the channels of the attempt
-- in flight not yet recorded; delivered: channel -> when it delivered (a
-- channel that delivered is not sent again); attempt_errors: what failed in
-- this attempt, per channel.
CREATE TABLE billing.notifications (
  tenant_id       text NOT NULL REFERENCES billing.tenants,
  notification_id bigint GENERATED ALWAYS AS IDENTITY,
  kind            text NOT NULL CHECK (kind ~ '^[a-z_]+(\.[a-z_]+)*$'),
  audience        text NOT NULL DEFAULT 'tenant' CHECK (audience IN ('tenant', 'operator')),
  dedup_key       text NOT NULL,
  payload         jsonb NOT NULL DEFAULT '{}',
  state           text NOT NULL DEFAULT 'pending',
  created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
  sent_at         timestamptz,
  event_id        text NOT NULL DEFAULT 'ntf_' || pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '')
                    CHECK (event_id ~ '^ntf_[0-9a-f]{32}$'),
  attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  next_attempt_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  claimed_at      timestamptz,
  channels_due    text[] NOT NULL DEFAULT '{}',
  delivered       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(delivered) = 'object'),
  attempt_errors  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(attempt_errors) = 'object'),
  last_error      text,
  skip_reason     text,
  updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- the GETs that checked what it is about before it went out (one per object)
  verify_requests bigint[] NOT NULL DEFAULT '{}',
  PRIMARY KEY (tenant_id, notification_id),
  UNIQUE (tenant_id, dedup_key),
  CONSTRAINT notifications_state_check CHECK (state IN ('pending', 'in_flight', 'sent', 'failed', 'skipped'))
);
COMMENT ON TABLE billing.notifications IS
  'Notifications to tenants or operators, queued once per dedup_key (e.g. one per tenant, metric, period and threshold).';
COMMENT ON COLUMN billing.notifications.event_id IS
  'The id of the notification on every channel and attempt (webhook "id" and QES-Event-Id, email Message-ID and X-QES-Event-Id): receivers deduplicate by it.';
-- the worker claims by due time
CREATE INDEX notifications_due ON billing.notifications (next_attempt_at) WHERE state = 'pending';
CREATE INDEX notifications_in_flight ON billing.notifications (claimed_at) WHERE state = 'in_flight';
CREATE INDEX notifications_failed ON billing.notifications (updated_at) WHERE state = 'failed';

-- ---- the outbox and the inbox --------------------------------------------------
-- The worker's queues: the outbox of Stripe requests and the inbox of
-- webhook events.  Both are global (not tenant-owned): a request or an event
-- may concern no tenant (setup) or one not yet known (a new event).
-- Inserting into either, or updating it, wakes the worker when the
-- transaction commits: an idle worker runs no transaction of its own
-- (docs/architecture.md, rule 14), so whatever makes a row due must say so.

-- The clusters this data has been in (pg_control's system identifiers):
-- CREATE EXTENSION writes this cluster's, and the worker's reclaim keeps
-- only this cluster's.  Dumped with the data, and with no key: a pg_dump
-- restored into another cluster adds the cluster it came from to the one
-- CREATE EXTENSION wrote, and a table with no row at all (an update from
-- 0.1) is of unknown origin.  Either way the queued requests may have been
-- sent by work the data does not show, and the reclaim dates them
-- (billing.worker_reclaim).
CREATE TABLE billing.cluster_identity (
  system_identifier bigint NOT NULL,
  seen_at           timestamptz NOT NULL DEFAULT pg_catalog.now()
);
-- (no key, so that a dump's row can join the one CREATE EXTENSION made;
-- its rows are told apart whole, also by logical replication)
ALTER TABLE billing.cluster_identity REPLICA IDENTITY FULL;
COMMENT ON TABLE billing.cluster_identity IS
  'The system identifiers of the clusters this data has been in since the worker last reconciled it: one other than this cluster''s (a pg_dump restored here, pg_upgrade), or none, makes the reclaim date the queued requests.';
INSERT INTO billing.cluster_identity (system_identifier)
SELECT c.system_identifier FROM pg_catalog.pg_control_system() c;

CREATE TABLE billing.stripe_requests (
  request_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant_id       text REFERENCES billing.tenants,
  kind            text NOT NULL CHECK (kind ~ '^[a-z_]+(\.[a-z_]+)*$'),
  method          text NOT NULL CHECK (method IN ('GET', 'POST', 'DELETE')),
  path            text NOT NULL CHECK (path ~ '^/v1/[A-Za-z0-9_/.-]+$'),
  params          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
  idempotency_key text NOT NULL UNIQUE DEFAULT 'qes-' || gen_random_uuid(),
  -- 'waiting': sent once after_request has succeeded, with that request's
  -- response id put into params under the name in inherit
  state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('waiting', 'pending', 'in_flight', 'succeeded', 'failed')),
  after_request   bigint REFERENCES billing.stripe_requests,
  inherit         text,
  subject         jsonb NOT NULL DEFAULT '{}',
  run_id          text,
  attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  next_attempt_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  claimed_at      timestamptz,
  http_status     integer,
  response        jsonb,
  error           jsonb,
  created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
  updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- when the request under its current Idempotency-Key may first have
  -- reached Stripe (an attempt that got an answer, or ended without one
  -- after connecting, or was in flight at a crash); NULL: never.  Stripe
  -- keeps a key's result for 24 hours from then (billing.outbox_claim).
  first_sent_at   timestamptz
);
COMMENT ON TABLE billing.stripe_requests IS
  'Outbox of Stripe API requests. idempotency_key is fixed at insert and sent on every attempt.';
-- in the order the worker claims requests (billing.outbox_claim), so a claim needs no sort
CREATE INDEX stripe_requests_due ON billing.stripe_requests (next_attempt_at, request_id) WHERE state = 'pending';
CREATE INDEX stripe_requests_in_flight ON billing.stripe_requests (claimed_at) WHERE state = 'in_flight';
CREATE INDEX stripe_requests_after ON billing.stripe_requests (after_request) WHERE state = 'waiting';
CREATE INDEX stripe_requests_run ON billing.stripe_requests (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX stripe_requests_tenant ON billing.stripe_requests (tenant_id, kind) WHERE tenant_id IS NOT NULL;

CREATE TABLE billing.webhook_events (
  stripe_event_id text PRIMARY KEY CHECK (stripe_event_id ~ '^evt_'),
  event_type      text NOT NULL,
  livemode        boolean NOT NULL,
  api_version     text,
  stripe_created  timestamptz NOT NULL,
  payload         json NOT NULL,
  tenant_id       text,
  -- received -> processing -> applied | ignored | waiting | needs_review
  -- (docs/architecture.md, "States")
  state           text NOT NULL DEFAULT 'received',
  attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  next_attempt_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  last_error      text,
  received_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
  applied_at      timestamptz,
  waits_for       text[],
  source          text NOT NULL DEFAULT 'webhook' CHECK (source IN ('webhook', 'reconcile')),
  CONSTRAINT webhook_events_state_check
    CHECK (state IN ('received', 'processing', 'applied', 'ignored', 'waiting', 'needs_review'))
);
COMMENT ON TABLE billing.webhook_events IS
  'Inbox of verified Stripe webhook events, unique by Stripe event id; applied by the worker.';
-- in the order the worker claims events, so a batch needs no sort
CREATE INDEX webhook_events_due ON billing.webhook_events (stripe_created, received_at) WHERE state = 'received';
CREATE INDEX webhook_events_busy ON billing.webhook_events (received_at) WHERE state IN ('processing', 'needs_review');
-- a tenant's events, for moving its partition to another shard
CREATE INDEX webhook_events_tenant ON billing.webhook_events (tenant_id) WHERE tenant_id IS NOT NULL;
-- The payload (a few kilobytes of JSON, stored compressed) is compressed
-- with lz4 where the server was built with it: pglz, the default, took a
-- tenth of the intake's CPU; lz4 a fraction of that (docs/benchmarks.md).
-- A server without lz4 keeps pglz.  (Standbys and pg_upgrade targets need
-- lz4 too: docs/operations.md, "Installing".)
DO $lz4$
BEGIN
  ALTER TABLE billing.webhook_events ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
  NULL;
END
$lz4$;
COMMENT ON COLUMN billing.webhook_events.waits_for IS
  'The Stripe ids an event waits for (a waiting or ignored event is applied again when one of them is mirrored).';
COMMENT ON COLUMN billing.webhook_events.source IS
  'How the event came: delivered by Stripe (webhook) or found missing by a reconciliation pass (reconcile).';

-- The events waiting for objects, as rows to look up by Stripe id (global
-- like the inbox: an event may not be known to belong to any tenant yet).
CREATE TABLE billing.webhook_waits (
  stripe_id       text NOT NULL,
  stripe_event_id text NOT NULL REFERENCES billing.webhook_events ON DELETE CASCADE,
  PRIMARY KEY (stripe_id, stripe_event_id)
);
COMMENT ON TABLE billing.webhook_waits IS
  'Which waiting or ignored inbox event waits for which Stripe id (applied again when that object is mirrored).';
CREATE INDEX webhook_waits_event ON billing.webhook_waits (stripe_event_id);

-- ---- the audit log -------------------------------------------------------------

CREATE TABLE billing.audit_log (
  audit_id     bigint PRIMARY KEY,
  occurred_at  timestamptz NOT NULL,
  actor_role   text NOT NULL,
  actor_sub    text,
  actor_tenant text,
  tenant_id    text,
  action       text NOT NULL,
  details      jsonb NOT NULL,
  prev_hash    bytea NOT NULL,
  hash         bytea NOT NULL
);
COMMENT ON TABLE billing.audit_log IS
  'Every billing operation: who (database role, JWT subject and tenant), what, for which tenant. Append-only and hash-chained.';
CREATE INDEX audit_log_tenant ON billing.audit_log (tenant_id, audit_id) WHERE tenant_id IS NOT NULL;
-- a shard's record of partition moves (billing_shard.move_audit), which a
-- tenant's history across shards passes through (router.tenant_audit)
CREATE INDEX audit_log_moves ON billing.audit_log (audit_id)
  WHERE action IN ('partition.moved_out', 'partition.moved_in');

CREATE TABLE billing.audit_head (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  last_id   bigint NOT NULL,
  last_hash bytea NOT NULL
);
COMMENT ON TABLE billing.audit_head IS 'The newest link of the audit chain; audit writers lock it.';

-- One row per archival (sql/install/72_audit_export.sql): the audit rows
-- first_id..last_id were exported to a file and removed; last_hash is the
-- hash of row last_id, from which the chain left in audit_log goes on.
CREATE TABLE billing.audit_archives (
  archive_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  first_id      bigint NOT NULL CHECK (first_id >= 1),
  last_id       bigint NOT NULL UNIQUE,
  last_hash     bytea NOT NULL CHECK (octet_length(last_hash) = 32),
  rows_removed  bigint NOT NULL CHECK (rows_removed = last_id - first_id + 1),
  export_sha256 bytea NOT NULL CHECK (octet_length(export_sha256) = 32),
  archived_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
  archived_by   text NOT NULL,
  CHECK (last_id >= first_id)
);
COMMENT ON TABLE billing.audit_archives IS
  'Audit rows exported and removed: which ids, the hash of the last one (the chain in audit_log goes on from it) and the SHA-256 of the export file that holds them.';

-- ---- webhook refusals ----------------------------------------------------------

CREATE TABLE billing.webhook_rejections (
  rejection_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  rejected_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
  reason          text NOT NULL,
  deliveries      bigint NOT NULL DEFAULT 1 CHECK (deliveries > 0),
  stripe_event_id text,
  event_type      text
);
COMMENT ON TABLE billing.webhook_rejections IS
  'Webhook deliveries refused at intake (bad or missing signature, stale, wrong mode, not an event, implausible): an attack or a wrong secret shows here. Refusals are counted in shared memory and written here about once a minute, one row per reason with the number of deliveries (billing.webhook_rejections_pending() shows what is not written yet).';
CREATE INDEX webhook_rejections_recent ON billing.webhook_rejections (rejected_at);

-- ---- reconciliation ------------------------------------------------------------

-- One run: a pass over Stripe's events, or one tenant's objects.  Global
-- like the queues (a pass concerns no one tenant).
CREATE TABLE billing.reconcile_runs (
  run_id        text PRIMARY KEY,
  kind          text NOT NULL CHECK (kind IN ('pass', 'tenant', 'meters')),
  tenant_id     text REFERENCES billing.tenants,
  started_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
  finished_at   timestamptz,
  requests      integer NOT NULL DEFAULT 0,   -- Stripe requests answered
  listed        integer NOT NULL DEFAULT 0,   -- events or objects Stripe listed
  missed_events integer NOT NULL DEFAULT 0,   -- events the inbox never received
  repairs       integer NOT NULL DEFAULT 0,
  errors        integer NOT NULL DEFAULT 0
);
COMMENT ON TABLE billing.reconcile_runs IS
  'Reconciliation runs: a periodic pass over Stripe''s events or one tenant''s objects; what Stripe listed, the events the inbox had missed, the repairs made, the Stripe requests spent.';
CREATE INDEX reconcile_runs_started ON billing.reconcile_runs (started_at);

CREATE TABLE billing.drift_repairs (
  tenant_id       text NOT NULL REFERENCES billing.tenants,
  repair_id       bigint GENERATED ALWAYS AS IDENTITY,
  repaired_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
  run_id          text,
  source          text NOT NULL CHECK (source IN ('events', 'objects', 'meters')),
  object          text NOT NULL,
  stripe_id       text NOT NULL,
  stripe_event_id text,
  before          jsonb,
  after           jsonb,
  PRIMARY KEY (tenant_id, repair_id)
);
COMMENT ON TABLE billing.drift_repairs IS
  'Each repair of the mirror by reconciliation: the object, the mirror''s state of it before and after, the run, and the missed event that repaired it (source events) or Stripe''s object as listed (source objects).';

-- The pass's progress (one row, made by the worker's first loop).
CREATE TABLE billing.reconcile_state (
  singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  events_cursor   timestamptz,   -- the next listing asks for events created at or after it
  listing_newest  timestamptz,   -- the newest event the listing under way saw
  pass_run_id     text,
  pass_pages      integer NOT NULL DEFAULT 0,
  next_pass_at    timestamptz NOT NULL
);
COMMENT ON TABLE billing.reconcile_state IS
  'Where the periodic reconciliation pass stands: its cursor in Stripe''s event list, the listing under way, when the next pass is due.';

-- ---- usage billed through Stripe Billing Meters --------------------------------
-- (sql/install/94_meters.sql; docs/architecture.md, "Usage billed through
-- meters").  Off by default: nothing is billed until an operator adds an
-- active metered price and runs qes_billing_setup --setup-meters.

-- What an operator makes billable, per plan, metric and interval: every
-- unit beyond `included` per period at unit_amount_decimal (the smallest
-- currency unit, fractions allowed); included = 0 bills every unit.  A
-- Stripe price with recurring[meter] (graduated tiers when included > 0).
CREATE TABLE billing.metered_prices (
  price_key           text PRIMARY KEY CHECK (price_key ~ '^[a-z][a-z0-9_]{0,63}$'),
  plan_id             text NOT NULL REFERENCES billing.plans ON UPDATE CASCADE,
  metric              text NOT NULL REFERENCES billing.metrics ON UPDATE CASCADE,
  billing_interval    text NOT NULL CHECK (billing_interval IN ('month', 'year')),
  included            bigint NOT NULL DEFAULT 0 CHECK (included >= 0),
  unit_amount_decimal numeric(20, 6) NOT NULL CHECK (unit_amount_decimal > 0),
  currency            text NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{3}$'),
  stripe_price_id     text UNIQUE CHECK (stripe_price_id ~ '^price_'),
  active              boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE billing.metered_prices IS
  'Usage billed through Stripe Billing Meters, per plan, metric and interval: units beyond `included` per period at unit_amount_decimal (smallest currency unit per unit). None by default (limits stay soft and unbilled). price_key is the Stripe lookup_key.';
CREATE UNIQUE INDEX metered_prices_one_active ON billing.metered_prices (plan_id, metric, billing_interval, currency)
  WHERE active;

-- One Stripe meter per billable metric (made by setup): counters are summed,
-- a gauge (storage) bills its last value.
CREATE TABLE billing.meters (
  metric          text PRIMARY KEY REFERENCES billing.metrics ON UPDATE CASCADE,
  event_name      text NOT NULL UNIQUE CHECK (event_name ~ '^[a-z][a-z0-9_]{0,99}$'),
  aggregation     text NOT NULL CHECK (aggregation IN ('sum', 'last')),
  stripe_meter_id text UNIQUE CHECK (stripe_meter_id ~ '^(mtr|meter)_')
);
COMMENT ON TABLE billing.meters IS
  'The Stripe meter of each billable metric (event_name qes_<metric>; sum for counters, last for the storage gauge).';

-- The meter events: each one aggregates the billable usage rows of one
-- tenant and metric that a pass found unsent, and is sent once, with an
-- identifier derived from those rows (so a retry, a lost answer or a
-- repeated pass sends the same identifier).  state: queued -> delivered |
-- failed; delivered -> cancel_queued -> cancelled (an adjustment).
CREATE TABLE billing.meter_events (
  tenant_id          text NOT NULL REFERENCES billing.tenants,
  meter_event_id     bigint GENERATED ALWAYS AS IDENTITY,
  identifier         text NOT NULL UNIQUE CHECK (identifier ~ '^qes_[0-9a-f]{64}$'),
  metric             text NOT NULL,
  event_name         text NOT NULL,
  stripe_customer_id text NOT NULL,
  value              bigint NOT NULL CHECK (value >= 0),
  event_at           timestamptz NOT NULL,
  period_start       timestamptz NOT NULL,
  usage_rows         integer NOT NULL CHECK (usage_rows > 0),
  state              text NOT NULL DEFAULT 'queued'
                       CHECK (state IN ('queued', 'delivered', 'failed', 'cancel_queued', 'cancelled')),
  request_id         bigint,
  cancel_request_id  bigint,
  created_at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
  delivered_at       timestamptz,
  last_error         jsonb,
  PRIMARY KEY (tenant_id, meter_event_id)
);
COMMENT ON TABLE billing.meter_events IS
  'Meter events sent to Stripe: one per tenant, metric and pass, aggregating the usage rows not sent yet; the identifier (derived from those rows) is Stripe''s dedup key on every attempt.';
-- a tenant and metric with an event under way gets no second one (Stripe:
-- one concurrent call per customer and meter)
CREATE INDEX meter_events_open ON billing.meter_events (tenant_id, metric) WHERE state IN ('queued', 'cancel_queued');
CREATE INDEX meter_events_period ON billing.meter_events (tenant_id, metric, period_start);
CREATE INDEX meter_events_request ON billing.meter_events (request_id) WHERE request_id IS NOT NULL;

-- Which usage row went into which meter event: each row once, forever.
CREATE TABLE billing.meter_event_usage (
  tenant_id       text NOT NULL,
  idempotency_key text NOT NULL,
  meter_event_id  bigint NOT NULL,
  PRIMARY KEY (tenant_id, idempotency_key),
  FOREIGN KEY (tenant_id, meter_event_id) REFERENCES billing.meter_events ON DELETE CASCADE
);
COMMENT ON TABLE billing.meter_event_usage IS
  'Each billable usage row and the meter event that carried it to Stripe (a row is sent in one event, once).';
CREATE INDEX meter_event_usage_event ON billing.meter_event_usage (tenant_id, meter_event_id);

-- The lines of the invoices Stripe billed, as its invoice events last
-- showed them (newest event wins): metered lines are the usage Stripe
-- billed, shown with GET /invoices.
CREATE TABLE billing.invoice_lines (
  tenant_id         text NOT NULL REFERENCES billing.tenants,
  stripe_invoice_id text NOT NULL,
  line_id           text NOT NULL,
  stripe_price_id   text,
  metered           boolean NOT NULL DEFAULT false,
  metric            text,
  description       text,
  quantity          bigint,
  amount            bigint NOT NULL DEFAULT 0,
  currency          text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  period_start      timestamptz,
  period_end        timestamptz,
  stripe_state_at   timestamptz NOT NULL,
  PRIMARY KEY (tenant_id, stripe_invoice_id, line_id)
);
COMMENT ON TABLE billing.invoice_lines IS
  'The lines of tenants'' invoices as Stripe''s newest invoice event showed them; metered lines are usage Stripe billed (GET /invoices, usage_lines).';

-- The sending passes' schedule (one row, made by the first tick).
CREATE TABLE billing.meter_state (
  singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  pass_interval interval NOT NULL DEFAULT '1 minute' CHECK (pass_interval >= interval '1 second'),
  max_events    integer NOT NULL DEFAULT 1000 CHECK (max_events > 0),
  next_pass_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- the comparison of Stripe's event summaries with the local sums
  reconcile_interval interval NOT NULL DEFAULT '1 hour' CHECK (reconcile_interval >= interval '0'),
  next_reconcile_at  timestamptz NOT NULL DEFAULT pg_catalog.now() + interval '1 hour'
);
COMMENT ON TABLE billing.meter_state IS
  'When the next meter pass queues what was recorded since (pass_interval: the aggregation window) and at most how many meter events one pass queues.';

-- ---- Stripe secrets ------------------------------------------------------------
CREATE TABLE billing.stripe_secrets (
  mode       text NOT NULL CHECK (mode IN ('test', 'live')),
  kind       text NOT NULL CHECK (kind IN ('webhook')),
  endpoint   text NOT NULL,
  secret     text NOT NULL CHECK (secret ~ '^whsec_'),
  created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- the endpoint's URL (several endpoints: a primary and a backup, each
  -- with its own secret, all accepted)
  url        text,
  PRIMARY KEY (mode, kind, endpoint)
);
COMMENT ON TABLE billing.stripe_secrets IS
  'Secrets learnt from Stripe (the webhook endpoint''s signing secret, returned once at creation). Superusers only: nothing is granted on it.';


-- ---- partition fences ----------------------------------------------------------
-- A sharded deployment moves a partition's tenants from one shard to another
-- (docs/scaleout.md, "Moving a partition"; sql/install/45_fences.sql,
-- src/fence.c).  One row per partition fenced on this shard: 'moving'
-- while its rows are copied (out of this shard or into it), 'moved' once it
-- lives on another shard.  Writes for a fenced partition's tenants are
-- refused.  partition_count is the router's; partition is
-- billing.tenant_partition(tenant_id, partition_count).
CREATE TABLE billing.partition_fences (
  partition_count integer NOT NULL CHECK (partition_count BETWEEN 1 AND 65536
                                          AND partition_count & (partition_count - 1) = 0),
  partition       integer NOT NULL CHECK (partition >= 0 AND partition < partition_count),
  state           text NOT NULL CHECK (state IN ('copying', 'moving', 'moved')),
  direction       text NOT NULL CHECK (direction IN ('out', 'in')),
  move_id         bigint NOT NULL,
  peer_shard      text NOT NULL,
  set_at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (partition_count, partition),
  CHECK (state = 'moving' OR direction = 'out')
);
COMMENT ON TABLE billing.partition_fences IS
  'Partitions whose tenants this shard does not write for: moving (rows being copied out of or into this shard) or moved (the partition lives on peer_shard now); copying: not fenced yet, the history is being copied and new usage is logged (billing.partition_move_log). Written by the router''s partition moves.';

-- The usage recorded for the tenants of a partition whose history is being
-- copied to another shard while it serves (fence state 'copying'): written
-- by record_usage in the same transaction, so that the copy under the fence
-- takes only what came since.  Emptied when the move ends.
CREATE TABLE billing.partition_move_log (
  tenant_id       text NOT NULL,
  idempotency_key text NOT NULL,
  -- written: recorded (or changed) here while copying, to be copied, or,
  -- on the target, arrived as such; copied: copied while the partition
  -- served (a change makes it written again); history: arrived with the
  -- history
  kind            text NOT NULL DEFAULT 'written' CHECK (kind IN ('written', 'copied', 'history')),
  logged_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (tenant_id, idempotency_key)
);
COMMENT ON TABLE billing.partition_move_log IS
  'Usage keys of a partition move: on the source, recorded or changed while the partition was being copied (fence state copying), what the copy under the fence takes; on the target, what arrived, until the move has compared it.';

-- ---- dump and restore ----------------------------------------------------------
-- The seed rows as this script made them; never dumped (each CREATE
-- EXTENSION makes them again).  An upgrade script that changes a seed row
-- changes it here too.
CREATE TABLE billing.seed_rows (
  relname text NOT NULL CHECK (relname IN ('metrics', 'plans', 'plan_limits', 'prices', 'clock', 'audit_head')),
  "row"   jsonb NOT NULL,
  PRIMARY KEY (relname, "row")
);
COMMENT ON TABLE billing.seed_rows IS
  'The rows CREATE EXTENSION seeds (catalog, clock, audit chain head), as it made them: pg_dump leaves out a row still equal to its seed, and restoring a changed one replaces the seed.';
