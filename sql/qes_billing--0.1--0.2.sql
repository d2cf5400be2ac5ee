-- qes_billing 0.1 -> 0.2: ALTER EXTENSION qes_billing UPDATE.
--
-- Released with 0.2 and never edited afterwards (docs/operations.md, "Upgrades");
-- until then it follows sql/install: test/tools/upgrade/draft.sh 0.1 0.2
-- writes it from the two install scripts and the hand-written parts in
-- test/tools/upgrade/0.1--0.2/.
--
-- It brings a 0.1 database to exactly what CREATE EXTENSION qes_billing
-- makes in 0.2 -- the same tables, columns in the same order, constraints,
-- indexes, functions, views, triggers, policies, privileges, comments,
-- extension members and pg_dump marks -- and moves the 0.1 data into it.
-- test/t/011_upgrade.pl compares the two (pg_dump of both schemas, the
-- extension's members, its config marks) and checks the data.
--
-- The library must be the 0.2 one when this runs: the functions it creates
-- name C symbols only the 0.2 library has (docs/operations.md, "Upgrades").
--
--   1. what 0.2 drops, or creates anew because it cannot be changed in place
--   2. the 0.2 install script (sql/install/*.sql) where it differs from 0.1,
--      in its order
--   3. the data: the tables made again, facts 0.1 kept only in the inbox,
--      the seed rows, secrets 0.1 stored in clear
\echo Use "ALTER EXTENSION qes_billing UPDATE TO '0.2'" to load this file. \quit

-- ---- 1. what 0.2 no longer has, or creates again ------------------------------
DROP VIEW api.invoices;
DROP VIEW api.subscription;
DROP VIEW api.usage;
DROP VIEW billing.subscription_health;
DROP VIEW billing.webhook_metrics;
DROP VIEW billing.worker_status;
DROP FUNCTION billing.apply_event(jsonb);
DROP FUNCTION billing.apply_invoice(text,jsonb,timestamp with time zone);
DROP FUNCTION billing.current_subscription(text);
DROP FUNCTION billing.outbox_enqueue(text,text,text,text,jsonb,jsonb,bigint,text,text);
DROP FUNCTION billing.outbox_enqueue_once(text,text,text,text,jsonb);
DROP FUNCTION billing.refresh_subscription(text,text);
DROP FUNCTION billing.retry_request(bigint);
DROP FUNCTION billing.setup_webhook(text);
DROP FUNCTION billing.usage_cache_stats();
DROP FUNCTION billing.webhook_reject(text,text,text);
DROP FUNCTION billing.worker_reclaim();
DROP FUNCTION billing.worker_state();
DROP FUNCTION billing.worker_tick();

-- Two tables get columns in the middle in 0.2 (billing.subscriptions,
-- billing.webhook_rejections): ALTER TABLE can only append, so each is made
-- again, exactly as a fresh 0.2 install makes it.  The 0.1 table moves
-- aside into a schema of its own (with its indexes, identity sequence and
-- row type, so that every name is free), the 0.2 table is created in its
-- place in section 2, and section 3 copies the rows over and drops the old
-- table.  The foreign key from billing.invoices is made again after the copy.
CREATE SCHEMA qes_billing_0_1;
ALTER TABLE billing.invoices DROP CONSTRAINT invoices_tenant_id_subscription_id_fkey;
ALTER TABLE billing.subscriptions SET SCHEMA qes_billing_0_1;
ALTER TABLE billing.webhook_rejections SET SCHEMA qes_billing_0_1;

-- Two tables keep their shape but gain states, and one index goes: the
-- state checks of billing.notifications (in_flight, skipped) and
-- billing.webhook_events (waiting) are made again with their 0.2 states
-- (same names), and notifications_pending gives way to the claim indexes
-- section 2 creates (notifications_due and others).
ALTER TABLE billing.notifications
  DROP CONSTRAINT notifications_state_check,
  ADD CONSTRAINT notifications_state_check CHECK (state IN ('pending', 'in_flight', 'sent', 'failed', 'skipped'));
DROP INDEX billing.notifications_pending;
ALTER TABLE billing.webhook_events
  DROP CONSTRAINT webhook_events_state_check,
  ADD CONSTRAINT webhook_events_state_check
    CHECK (state IN ('received', 'processing', 'applied', 'ignored', 'waiting', 'needs_review'));

-- ---- 2. the 0.2 install script where it differs from 0.1, in its order ----------

-- The roles PostgREST switches to.  Roles are cluster-wide and are not
-- members of the extension: they are created when missing and survive
-- DROP EXTENSION, so that other databases using them keep working.
DO $roles$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['qes_anon', 'qes_tenant', 'qes_admin', 'qes_app', 'qes_monitor'] LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
      EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
    END IF;
  END LOOP;
END
$roles$;

-- (upgrade) what 0.2 adds to billing.plans
ALTER TABLE billing.plans ADD CONSTRAINT plans_features_check CHECK ((array_position(features, NULL::text) IS NULL));

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

-- (upgrade) the new columns of billing.invoices; attempt_count becomes NOT
-- NULL DEFAULT 0 in section 3, once filled
ALTER TABLE billing.invoices
  ADD COLUMN stripe_subscription_id text,
  ADD COLUMN first_failed_at timestamptz,
  ADD COLUMN attempt_count integer,
  ADD COLUMN finalized_at timestamptz,
  ADD COLUMN paid_at timestamptz,
  ADD COLUMN billing_reason text;

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

-- (upgrade) what 0.2 adds to billing.payments
ALTER TABLE billing.payments ADD COLUMN stripe_invoice_id text;

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

-- (upgrade) what 0.2 adds to billing.disputes
ALTER TABLE billing.disputes ADD COLUMN stripe_payment_intent_id text;
ALTER TABLE billing.disputes ADD COLUMN evidence_due_by timestamp with time zone;
ALTER TABLE billing.disputes ADD COLUMN has_evidence boolean;
ALTER TABLE billing.disputes ADD COLUMN past_due boolean;
ALTER TABLE billing.disputes ADD COLUMN submission_count integer;
ALTER TABLE billing.disputes ADD COLUMN funds_withdrawn_at timestamp with time zone;
ALTER TABLE billing.disputes ADD COLUMN funds_reinstated_at timestamp with time zone;
ALTER TABLE billing.disputes ADD COLUMN closed_at timestamp with time zone;
ALTER TABLE billing.disputes ADD COLUMN stripe_state_at timestamp with time zone;
ALTER TABLE billing.disputes ADD COLUMN updated_at timestamp with time zone;
UPDATE billing.disputes SET has_evidence = false;
ALTER TABLE billing.disputes ALTER COLUMN has_evidence SET DEFAULT false;
ALTER TABLE billing.disputes ALTER COLUMN has_evidence SET NOT NULL;
UPDATE billing.disputes SET past_due = false;
ALTER TABLE billing.disputes ALTER COLUMN past_due SET DEFAULT false;
ALTER TABLE billing.disputes ALTER COLUMN past_due SET NOT NULL;
UPDATE billing.disputes SET submission_count = 0;
ALTER TABLE billing.disputes ALTER COLUMN submission_count SET DEFAULT 0;
ALTER TABLE billing.disputes ALTER COLUMN submission_count SET NOT NULL;
UPDATE billing.disputes SET updated_at = now();
ALTER TABLE billing.disputes ALTER COLUMN updated_at SET DEFAULT now();
ALTER TABLE billing.disputes ALTER COLUMN updated_at SET NOT NULL;
ALTER TABLE billing.disputes ADD CONSTRAINT disputes_submission_count_check CHECK ((submission_count >= 0));

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

-- (upgrade) what 0.2 adds to billing.notifications
ALTER TABLE billing.notifications ADD COLUMN event_id text;
ALTER TABLE billing.notifications ADD COLUMN attempts integer;
ALTER TABLE billing.notifications ADD COLUMN next_attempt_at timestamp with time zone;
ALTER TABLE billing.notifications ADD COLUMN claimed_at timestamp with time zone;
ALTER TABLE billing.notifications ADD COLUMN channels_due text[];
ALTER TABLE billing.notifications ADD COLUMN delivered jsonb;
ALTER TABLE billing.notifications ADD COLUMN attempt_errors jsonb;
ALTER TABLE billing.notifications ADD COLUMN last_error text;
ALTER TABLE billing.notifications ADD COLUMN skip_reason text;
ALTER TABLE billing.notifications ADD COLUMN updated_at timestamp with time zone;
ALTER TABLE billing.notifications ADD COLUMN verify_requests bigint[];
UPDATE billing.notifications SET event_id = ('ntf_'::text || replace((gen_random_uuid())::text, '-'::text, ''::text));
ALTER TABLE billing.notifications ALTER COLUMN event_id SET DEFAULT ('ntf_'::text || replace((gen_random_uuid())::text, '-'::text, ''::text));
ALTER TABLE billing.notifications ALTER COLUMN event_id SET NOT NULL;
UPDATE billing.notifications SET attempts = 0;
ALTER TABLE billing.notifications ALTER COLUMN attempts SET DEFAULT 0;
ALTER TABLE billing.notifications ALTER COLUMN attempts SET NOT NULL;
UPDATE billing.notifications SET next_attempt_at = now();
ALTER TABLE billing.notifications ALTER COLUMN next_attempt_at SET DEFAULT now();
ALTER TABLE billing.notifications ALTER COLUMN next_attempt_at SET NOT NULL;
UPDATE billing.notifications SET channels_due = '{}'::text[];
ALTER TABLE billing.notifications ALTER COLUMN channels_due SET DEFAULT '{}'::text[];
ALTER TABLE billing.notifications ALTER COLUMN channels_due SET NOT NULL;
UPDATE billing.notifications SET delivered = '{}'::jsonb;
ALTER TABLE billing.notifications ALTER COLUMN delivered SET DEFAULT '{}'::jsonb;
ALTER TABLE billing.notifications ALTER COLUMN delivered SET NOT NULL;
UPDATE billing.notifications SET attempt_errors = '{}'::jsonb;
ALTER TABLE billing.notifications ALTER COLUMN attempt_errors SET DEFAULT '{}'::jsonb;
ALTER TABLE billing.notifications ALTER COLUMN attempt_errors SET NOT NULL;
UPDATE billing.notifications SET updated_at = now();
ALTER TABLE billing.notifications ALTER COLUMN updated_at SET DEFAULT now();
ALTER TABLE billing.notifications ALTER COLUMN updated_at SET NOT NULL;
UPDATE billing.notifications SET verify_requests = '{}'::bigint[];
ALTER TABLE billing.notifications ALTER COLUMN verify_requests SET DEFAULT '{}'::bigint[];
ALTER TABLE billing.notifications ALTER COLUMN verify_requests SET NOT NULL;
ALTER TABLE billing.notifications ADD CONSTRAINT notifications_attempt_errors_check CHECK ((jsonb_typeof(attempt_errors) = 'object'::text));
ALTER TABLE billing.notifications ADD CONSTRAINT notifications_attempts_check CHECK ((attempts >= 0));
ALTER TABLE billing.notifications ADD CONSTRAINT notifications_delivered_check CHECK ((jsonb_typeof(delivered) = 'object'::text));
ALTER TABLE billing.notifications ADD CONSTRAINT notifications_event_id_check CHECK ((event_id ~ '^ntf_[0-9a-f]{32}$'::text));

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

-- An update from 0.1 leaves billing.cluster_identity empty: whether the
-- data was made in this cluster is not known (it may come from a 0.1 dump
-- restored here), so the worker's first reclaim dates the queued requests.

-- (upgrade) what 0.2 adds to billing.stripe_requests
ALTER TABLE billing.stripe_requests ADD COLUMN first_sent_at timestamp with time zone;

DROP INDEX billing.stripe_requests_due;
-- in the order the worker claims requests (billing.outbox_claim), so a claim needs no sort
CREATE INDEX stripe_requests_due ON billing.stripe_requests (next_attempt_at, request_id) WHERE state = 'pending';

-- (upgrade) what 0.2 adds to billing.webhook_events
ALTER TABLE billing.webhook_events ADD COLUMN waits_for text[];
ALTER TABLE billing.webhook_events ADD COLUMN source text;
UPDATE billing.webhook_events SET source = 'webhook'::text;
ALTER TABLE billing.webhook_events ALTER COLUMN source SET DEFAULT 'webhook'::text;
ALTER TABLE billing.webhook_events ALTER COLUMN source SET NOT NULL;
ALTER TABLE billing.webhook_events ADD CONSTRAINT webhook_events_source_check CHECK ((source = ANY (ARRAY['webhook'::text, 'reconcile'::text])));

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

-- a shard's record of partition moves (billing_shard.move_audit), which a
-- tenant's history across shards passes through (router.tenant_audit)
CREATE INDEX audit_log_moves ON billing.audit_log (audit_id)
  WHERE action IN ('partition.moved_out', 'partition.moved_in');

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

-- (upgrade) what 0.2 adds to billing.stripe_secrets
ALTER TABLE billing.stripe_secrets ADD COLUMN url text;

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

-- Masking secrets before anything is stored or logged (docs/architecture.md, rule 13;
-- src/redact.c).  Secrets live only in the environment, superuser-only
-- settings and billing.stripe_secrets; Stripe's answers, the errors made of
-- them and audit details pass through these before they are written.

CREATE OR REPLACE FUNCTION billing.redact_text(text) RETURNS text
  LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_redact_text_fn';

COMMENT ON FUNCTION billing.redact_text(text) IS
  'The text with every Stripe secret or restricted key (sk_/rk_ live or test), webhook signing secret (whsec_) and Authorization credential (Bearer ..., Basic ...; the scheme name stays) replaced by [redacted].';

CREATE OR REPLACE FUNCTION billing.redact(jsonb) RETURNS jsonb
  LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_redact_jsonb_fn';

COMMENT ON FUNCTION billing.redact(jsonb) IS
  'The document with the value of every "secret" and "authorization" key (at any depth, any case) replaced by [redacted] and every string (keys too) masked as billing.redact_text does. A client_secret is the tenant''s and stays.';

CREATE OR REPLACE FUNCTION billing.usage_period(tenant_id text, at timestamptz,
                                     OUT period_start timestamptz, OUT period_end timestamptz, OUT plan_id text)
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_usage_period';

COMMENT ON FUNCTION billing.usage_period(text, timestamptz) IS
  'The billing period that usage occurring at `at` is counted in, and the plan whose limits apply then, as the mirror of Stripe stands now.';

CREATE OR REPLACE FUNCTION billing.usage_cache_stats(
  OUT capacity integer, OUT entries integer, OUT hits bigint, OUT loads bigint,
  OUT uncached bigint, OUT dropped bigint, OUT swept bigint, OUT evicted bigint,
  OUT hit_rate double precision, OUT bytes_per_counter integer)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_usage_cache_stats';

COMMENT ON FUNCTION billing.usage_cache_stats() IS
  'Shared-memory usage counters: capacity (qes_billing.max_counters), entries, hits, builds from the table, uncached reads (entry being built, eviction running, or a hot standby), entries dropped, swept (period ended) and evicted (least recently used, when full), the hit rate, and the shared memory one counter takes.';

-- Usage per period for a tenant: the current period from the counters,
-- earlier periods from the history.
CREATE OR REPLACE FUNCTION billing.usage_report(p_tenant_id text)
  RETURNS TABLE (period_start timestamptz, period_end timestamptz, is_current boolean, metric text,
                 used bigint, usage_limit bigint, percent double precision, status text)
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_current timestamptz;
BEGIN
  IF NOT EXISTS (SELECT FROM billing.tenants t WHERE t.tenant_id = p_tenant_id) THEN
    RETURN;
  END IF;
  RETURN QUERY
    SELECT c.period_start, c.period_end, true, c.metric, c.used, c.usage_limit, c.percent, c.status
      FROM billing.usage_current(p_tenant_id) c ORDER BY c.metric;
  SELECT c.period_start INTO v_current FROM billing.usage_current(p_tenant_id) c LIMIT 1;
  RETURN QUERY
    SELECT h.period_start, NULL::timestamptz, false, h.metric, h.used, NULL::bigint, NULL::double precision, NULL::text
      FROM (SELECT u.period_start, u.metric, least(sum(u.quantity), 9223372036854775807)::bigint AS used
              FROM billing.usage_events u JOIN billing.metrics x ON x.metric = u.metric AND x.kind = 'counter'
             WHERE u.tenant_id = p_tenant_id AND u.period_start < v_current
             GROUP BY u.period_start, u.metric
            UNION ALL
            (SELECT DISTINCT ON (u.period_start, u.metric) u.period_start, u.metric, u.quantity
               FROM billing.usage_events u JOIN billing.metrics x ON x.metric = u.metric AND x.kind = 'gauge'
              WHERE u.tenant_id = p_tenant_id AND u.period_start < v_current
              ORDER BY u.period_start, u.metric, u.occurred_at DESC, u.recorded_at DESC)) h
     ORDER BY h.period_start DESC, h.metric;
END
$$;

-- (upgrade) the cache trigger of the table made again (the others keep theirs)
CREATE TRIGGER invalidate_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON billing.subscriptions
  FOR EACH STATEMENT EXECUTE FUNCTION billing.invalidate_cache_on_commit();

COMMENT ON FUNCTION billing.usage_changed() IS
  'Trigger: usage rows were added, changed or removed other than by record_usage; cached counters are rebuilt from the table after commit.';

CREATE OR REPLACE TRIGGER usage_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON billing.usage_events
  FOR EACH STATEMENT EXECUTE FUNCTION billing.usage_changed();

CREATE OR REPLACE FUNCTION billing.counter_delta_seen(snap_xmin bigint, snap_xmax bigint, snap_xip bigint[],
                                           committer bigint) RETURNS text
  LANGUAGE c IMMUTABLE AS 'MODULE_PATHNAME', 'qes_counter_seen_fn';

COMMENT ON FUNCTION billing.counter_delta_seen(bigint, bigint, bigint[], bigint) IS
  'The rule a cached counter uses to decide whether a committed delta was already in its build (seen, not_seen, unknown), in 64-bit transaction ids; for tests (src/counters.c).';

-- Plan features as entitlements (src/features.c): "may this tenant use API
-- access now?" answered from the same mirrored state, clock and rules as
-- check_limit (docs/architecture.md, "Plan features").  A feature is a name
-- some plan lists in billing.plans.features.

CREATE OR REPLACE FUNCTION billing.has_feature(tenant_id text, feature text) RETURNS boolean
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_has_feature';

COMMENT ON FUNCTION billing.has_feature(text, text) IS
  'May the tenant use the feature now? The plan whose limits check_limit applies (trials and grace periods keep the plan; a first payment still due, an ended grace period, unpaid, paused or cancelled fall back to Free) decides. An unknown feature is an error (22023) naming the features.';

CREATE OR REPLACE FUNCTION billing.features_current(tenant_id text)
  RETURNS TABLE (feature text, enabled boolean, plan_id text, reason text, available_in text)
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_features_current';

COMMENT ON FUNCTION billing.features_current(text) IS
  'Every feature of the catalog for the tenant now: enabled, the plan whose features apply, why it is not the subscribed plan (as check_limit''s reason), and the lowest active plan that has the feature.';

CREATE OR REPLACE FUNCTION billing.my_features()
  RETURNS TABLE (feature text, enabled boolean, plan_id text, reason text, available_in text)
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_tenant text := billing.jwt_tenant_id();
BEGIN
  -- like GET /usage: no tenant in the JWT, no rows
  IF v_tenant IS NOT NULL AND EXISTS (SELECT 1 FROM billing.tenants t WHERE t.tenant_id = v_tenant) THEN
    RETURN QUERY SELECT * FROM billing.features_current(v_tenant);
  END IF;
END
$$;

COMMENT ON FUNCTION billing.my_features() IS
  'features_current() for the tenant named by the request''s JWT (no rows without a registered tenant, like GET /usage).';

CREATE VIEW api.features WITH (security_invoker = true) AS
SELECT f.feature, f.enabled, f.plan_id, f.reason, f.available_in
  FROM billing.my_features() f;

COMMENT ON VIEW api.features IS
  'The calling tenant''s features now: enabled, the plan whose features apply (the one Stripe''s state implies: trials and grace periods keep the plan), why it is not the subscribed plan, and the lowest plan that has the feature.';

CREATE OR REPLACE FUNCTION api.has_feature(feature text) RETURNS boolean
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$ SELECT billing.has_feature(billing.jwt_tenant_id(), feature) $$;

COMMENT ON FUNCTION api.has_feature(text) IS
  'May the calling tenant use the feature now? Same rules as billing.has_feature; an unknown feature is an error (22023).';

-- The features a subscription row entitles to by its own state (the grace
-- period's end is a moment, not a change of the row: dunning.grace_ended
-- audits it).
CREATE OR REPLACE FUNCTION billing.features_of(p_plan text, p_status text) RETURNS text[]
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(p.features, '{}')
    FROM billing.plans p
   WHERE p.plan_id = CASE WHEN p_status IN ('active', 'trialing', 'past_due') THEN p_plan ELSE 'free' END
$$;

COMMENT ON FUNCTION billing.features_of(text, text) IS
  'The features a subscription of this plan and status entitles to (Free''s outside trialing, active and past_due).';

-- A plan change (Stripe's state mirrored) that changes features writes one
-- audit row with what was gained and lost, beside the subscription's own.
-- Called by the trigger below for an UPDATE, and by the two places that
-- INSERT a subscription (billing.apply_subscription_state, billing.
-- create_subscription) for a new one: a trigger on INSERT would also fire
-- when pg_restore loads the rows, and write audit rows the source never had.
CREATE OR REPLACE FUNCTION billing.audit_features(p_tenant text, p_subscription_id bigint, p_plan_before text,
                                       p_status_before text, p_plan text, p_status text) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_before text[] := billing.features_of(coalesce(p_plan_before, 'free'), coalesce(p_status_before, 'active'));
  v_after  text[] := billing.features_of(p_plan, p_status);
  v_gained text[] := ARRAY(SELECT unnest(v_after) EXCEPT SELECT unnest(v_before) ORDER BY 1);
  v_lost   text[] := ARRAY(SELECT unnest(v_before) EXCEPT SELECT unnest(v_after) ORDER BY 1);
BEGIN
  IF cardinality(v_gained) > 0 OR cardinality(v_lost) > 0 THEN
    PERFORM billing.audit('features.changed', p_tenant,
                          jsonb_build_object('subscription_id', p_subscription_id,
                                             'plan_before', p_plan_before, 'status_before', p_status_before,
                                             'plan', p_plan, 'status', p_status,
                                             'gained', to_jsonb(v_gained), 'lost', to_jsonb(v_lost)));
  END IF;
END
$$;

COMMENT ON FUNCTION billing.audit_features(text, bigint, text, text, text, text) IS
  'Audit features.changed (gained, lost) when a subscription''s plan or status changes what it entitles to (before NULL: a new subscription, from Free).';

CREATE OR REPLACE FUNCTION billing.audit_feature_change() RETURNS trigger
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.audit_features(NEW.tenant_id, NEW.subscription_id, OLD.plan_id, OLD.status, NEW.plan_id, NEW.status);
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.audit_feature_change() IS
  'Trigger: audit features.changed (gained, lost) when an update of a subscription''s plan or status changes what it entitles to.';

CREATE OR REPLACE TRIGGER audit_feature_change AFTER UPDATE OF plan_id, status ON billing.subscriptions
  FOR EACH ROW EXECUTE FUNCTION billing.audit_feature_change();

-- What will be billed through Stripe Billing Meters so far this period (the
-- sending: 94_meters.sql); GET /usage shows it beside the limits.

-- What will be billed so far this period, per billable metric: used, the
-- included quantity, the billable units and their amount at the price.
CREATE OR REPLACE FUNCTION billing.usage_billable(p_tenant text)
  RETURNS TABLE (metric text, period_start timestamptz, used bigint, included bigint, billable bigint,
                 unit_amount_decimal numeric, amount numeric, currency text, sent bigint)
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
BEGIN
  -- most tenants are billed by usage for nothing: answer without the
  -- usage_current call (GET /usage asks for every tenant)
  IF NOT EXISTS (SELECT 1 FROM billing.subscriptions s
                   LEFT JOIN billing.prices pr ON pr.stripe_price_id = s.stripe_price_id
                   JOIN billing.metered_prices mp ON mp.plan_id = s.plan_id AND mp.billing_interval = s.billing_interval
                                                 AND mp.currency = coalesce(pr.currency, 'usd') AND mp.active
                  WHERE s.tenant_id = p_tenant AND s.stripe_subscription_id IS NOT NULL
                    AND s.status IN ('trialing', 'active', 'past_due')) THEN
    RETURN;
  END IF;
  RETURN QUERY
  SELECT c.metric, c.period_start, c.used, mp.included, greatest(c.used - mp.included, 0),
         mp.unit_amount_decimal, round(greatest(c.used - mp.included, 0) * mp.unit_amount_decimal, 6), mp.currency,
         (SELECT CASE WHEN m.kind = 'gauge'
                      THEN (SELECT e.value FROM billing.meter_events e
                             WHERE e.tenant_id = p_tenant AND e.metric = c.metric AND e.period_start = c.period_start
                               AND e.state = 'delivered' ORDER BY e.event_at DESC LIMIT 1)
                      ELSE (SELECT sum(e.value)::bigint FROM billing.meter_events e
                             WHERE e.tenant_id = p_tenant AND e.metric = c.metric AND e.period_start = c.period_start
                               AND e.state = 'delivered') END
            FROM billing.metrics m WHERE m.metric = c.metric)
    FROM billing.usage_current(p_tenant) c
    JOIN billing.subscriptions s ON s.tenant_id = p_tenant AND s.stripe_subscription_id IS NOT NULL
                                AND s.status IN ('trialing', 'active', 'past_due')
    -- the metered price in the subscription's currency (that of its licensed
    -- price; usd, the one subscriptions are made in, when it is not known
    -- here), as the meter pass picks it (billing.meter_unsent, 94_meters.sql)
    LEFT JOIN billing.prices pr ON pr.stripe_price_id = s.stripe_price_id
    JOIN billing.metered_prices mp ON mp.plan_id = s.plan_id AND mp.billing_interval = s.billing_interval
                                  AND mp.metric = c.metric AND mp.currency = coalesce(pr.currency, 'usd') AND mp.active
   ORDER BY c.metric;
END
$$;

COMMENT ON FUNCTION billing.usage_billable(text) IS
  'What will be billed through meters so far this period, per billable metric: used, included, billable units, their amount (smallest currency unit) and what Stripe has been sent.';

CREATE OR REPLACE FUNCTION billing.my_usage_billable()
  RETURNS TABLE (metric text, period_start timestamptz, used bigint, included bigint, billable bigint,
                 unit_amount_decimal numeric, amount numeric, currency text, sent bigint)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$ SELECT * FROM billing.usage_billable(billing.jwt_tenant_id()) $$;

COMMENT ON FUNCTION billing.my_usage_billable() IS 'usage_billable() for the tenant named by the request''s JWT.';

-- Partition fences (src/fence.c; docs/scaleout.md, "Moving a partition").
-- While a partition's tenants move to another shard, and after they have,
-- this shard writes nothing for them: record_usage checks in C, every
-- tenant-owned table has the row trigger below, and the worker's claims
-- skip them.  billing.partition_fences is the truth; the library keeps a
-- copy in shared memory that every write checks.

CREATE OR REPLACE FUNCTION billing.tenant_partition(p_tenant_id text, p_partitions integer) RETURNS integer
  LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_tenant_partition';

COMMENT ON FUNCTION billing.tenant_partition(text, integer) IS
  'The partition of a tenant in a router with p_partitions partitions: the first 32 bits of MD5(tenant_id) & (p_partitions - 1), as router.tenant_partition computes it.';

CREATE OR REPLACE FUNCTION billing.tenant_fenced(p_tenant_id text) RETURNS boolean
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_tenant_fenced';

COMMENT ON FUNCTION billing.tenant_fenced(text) IS
  'Whether writes for this tenant are refused here: its partition is moving or has moved (billing.partition_fences). The worker''s claims skip such tenants.';

CREATE OR REPLACE FUNCTION billing.partition_fences_reload() RETURNS integer
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_partition_fences_reload';

COMMENT ON FUNCTION billing.partition_fences_reload() IS
  'Copy billing.partition_fences, as this transaction sees it, into shared memory, where writes check it; returns the number of fenced partitions. Runs by itself whenever the table changes.';

CREATE OR REPLACE FUNCTION billing.partition_fence_wait() RETURNS integer
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_partition_fence_wait';

COMMENT ON FUNCTION billing.partition_fence_wait() IS
  'Wait until every other transaction that checked a fence before now has ended (after a fence was set, no write it refuses can still commit); returns how many were still running. lock_timeout applies.';

CREATE OR REPLACE FUNCTION billing.partition_untracked_writes() RETURNS bigint
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_partition_untracked_writes';

COMMENT ON FUNCTION billing.partition_untracked_writes() IS
  'How many statements wrote usage_events otherwise than record_usage while a partition was fenced or copied here (since the server started): a move that sees it change copies all of the usage again.';

CREATE OR REPLACE FUNCTION billing.partition_fence_guard() RETURNS trigger
  LANGUAGE c AS 'MODULE_PATHNAME', 'qes_partition_fence_guard';

COMMENT ON FUNCTION billing.partition_fence_guard() IS
  'Row trigger of the tenant-owned tables: refuses a write for a tenant whose partition is moving (SQLSTATE QBMOV) or has moved (QBMVD).';

CREATE OR REPLACE FUNCTION billing.partition_fence_usage() RETURNS trigger
  LANGUAGE c AS 'MODULE_PATHNAME', 'qes_partition_fence_usage';

COMMENT ON FUNCTION billing.partition_fence_usage() IS
  'Row trigger of usage_events for updates and deletes (record_usage''s inserts check in C): refused for a fenced tenant; while its partition is copied, an update is logged for the copy and a delete makes the move copy all of the usage again.';

CREATE OR REPLACE TRIGGER partition_fence BEFORE UPDATE OR DELETE ON billing.usage_events
  FOR EACH ROW EXECUTE FUNCTION billing.partition_fence_usage();

CREATE OR REPLACE FUNCTION billing.partition_fences_changed() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.partition_fences_reload();
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.partition_fences_changed() IS
  'Statement trigger of billing.partition_fences: a change is in force at once (before its commit: a fence is never late).';

CREATE OR REPLACE TRIGGER reload AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON billing.partition_fences
  FOR EACH STATEMENT EXECUTE FUNCTION billing.partition_fences_changed();

-- Every table with a tenant_id except usage_events (record_usage checks in
-- C; a row trigger there would cost the hot path), the audit log (the
-- chain is the shard's, not the tenant's) and the inbox (an event is the
-- tenant's only once applied, and applying it writes guarded tables; the
-- worker's bookkeeping of an event it could not apply must not fail).
DO $fences$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['tenants', 'billing_details', 'invoice_taxes', 'subscriptions', 'stripe_customers',
                           'invoices', 'invoice_failures', 'payments', 'invoice_payments', 'payment_taxes',
                           'disputes', 'dispute_responses', 'notifications', 'stripe_requests',
                           'drift_repairs', 'reconcile_runs', 'meter_events',
                           'meter_event_usage', 'invoice_lines'] LOOP
    EXECUTE format('CREATE TRIGGER partition_fence BEFORE INSERT OR UPDATE OR DELETE ON billing.%I
                      FOR EACH ROW EXECUTE FUNCTION billing.partition_fence_guard()', t);
  END LOOP;
END
$fences$;

-- The worker's queues, the outbox and the inbox (the tables: 01_tables.sql):
-- waking the worker at commit, reclaiming what a crashed worker left in
-- flight, and the worker's status.

-- The delay before attempt n+1 of anything the worker retries (an outbox
-- request, an inbox event, a notification): doubling from base per attempt
-- up to cap, with jitter (50-100 % of it) so that retries of many rows that
-- failed together spread out.  The exponent is capped, so a large attempt
-- count cannot overflow.
CREATE OR REPLACE FUNCTION billing.backoff(p_attempts integer, p_base interval, p_cap interval) RETURNS interval
  LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN pg_catalog.make_interval(secs => least(extract(epoch FROM p_cap),
                                              extract(epoch FROM p_base) * 2 ^ least(greatest(p_attempts - 1, 0), 30))
                                        * (0.5 + pg_catalog.random() / 2));

COMMENT ON FUNCTION billing.backoff(integer, interval, interval) IS
  'The delay before the next attempt after p_attempts attempts: p_base doubled per attempt up to p_cap, with 50-100 % jitter.';

COMMENT ON FUNCTION billing.wake_worker_on_commit() IS
  'Trigger: wake the worker when the inserting (or updating) transaction commits (not before, not on rollback).';

CREATE OR REPLACE TRIGGER wake_worker AFTER INSERT OR UPDATE ON billing.stripe_requests
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();

CREATE OR REPLACE TRIGGER wake_worker AFTER INSERT OR UPDATE ON billing.webhook_events
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();

-- Crash reconciliation: a row still in flight when the worker starts was
-- left by a crash (there is one worker).  Put it back in the queue; an
-- outbox row keeps its idempotency key, so Stripe replays instead of
-- creating twice.
CREATE OR REPLACE FUNCTION billing.worker_reclaim(p_lost_after timestamptz DEFAULT NULL, p_started timestamptz DEFAULT NULL)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_requests bigint;
  v_events bigint;
  v_possibly_sent bigint := 0;
  v_cluster bigint := (SELECT c.system_identifier FROM pg_control_system() c);
  v_others text[];
  v_restored boolean;
  v_unclean boolean := p_lost_after IS NOT NULL;
BEGIN
  -- Data from another cluster (a pg_dump restored here, pg_upgrade), or
  -- of unknown origin (an update from 0.1): the cluster it came from may
  -- have sent any of its queued requests after the dump was taken, so
  -- every one is taken as possibly sent since it was made.  (Restored into
  -- the cluster it was dumped from, it is not known: run this with
  -- '-infinity' by hand, docs/operations.md.)
  SELECT array_agg(DISTINCT i.system_identifier::text) FILTER (WHERE i.system_identifier <> v_cluster),
         count(*) FILTER (WHERE i.system_identifier <> v_cluster) > 0 OR count(*) = 0
    INTO v_others, v_restored
    FROM billing.cluster_identity i;
  IF v_restored THEN
    p_lost_after := '-infinity';
    p_started := NULL;
    DELETE FROM billing.cluster_identity i WHERE i.system_identifier <> v_cluster;
    INSERT INTO billing.cluster_identity (system_identifier)
    SELECT v_cluster WHERE NOT EXISTS (SELECT FROM billing.cluster_identity i WHERE i.system_identifier = v_cluster);
  END IF;
  -- (an attempt in flight at a crash may have reached Stripe)
  UPDATE billing.stripe_requests
     SET state = 'pending', first_sent_at = coalesce(first_sent_at, claimed_at), claimed_at = NULL,
         next_attempt_at = now(), updated_at = now()
   WHERE state = 'in_flight';
  GET DIAGNOSTICS v_requests = ROW_COUNT;
  -- After a start that was not clean (a crash, a restored backup, a
  -- promotion: src/shmem.c) commits made after p_lost_after may be
  -- missing: a claim never waits for its WAL flush (src/outbox.c), and a
  -- promoted standby or a backup may lack any.  A request whose claim (or
  -- release from waiting, or retry) was lost may have gone out though its
  -- row shows no attempt -- after p_lost_after, and after it was created;
  -- one created after this start (p_started) never went out that way.  Its
  -- key's time is taken to run from then: sent again within
  -- qes_billing.idempotency_window, it replays; past it, it fails as
  -- expired instead of going out blind.
  IF p_lost_after IS NOT NULL THEN
    -- these dates must outlive a crash right after this commit: the worker
    -- removes its record of the start once it is in (src/shmem.c), and a
    -- server that runs with synchronous_commit off would otherwise lose
    -- both (the next start's bound would be later than this one's).  The
    -- local flush is what counts ('local', not 'on': a synchronous standby
    -- that is gone, as after a failover, must not hold the worker).
    IF current_setting('synchronous_commit') = 'off' THEN
      PERFORM set_config('synchronous_commit', 'local', true);
    END IF;
    UPDATE billing.stripe_requests
       SET first_sent_at = greatest(created_at, p_lost_after)
     WHERE state IN ('pending', 'waiting') AND method <> 'GET' AND first_sent_at IS NULL
       AND created_at < coalesce(p_started, 'infinity');
    GET DIAGNOSTICS v_possibly_sent = ROW_COUNT;
    IF v_possibly_sent > 0 THEN
      RAISE WARNING 'qes_billing: % Stripe requests may have been sent by work this start lost', v_possibly_sent
        USING DETAIL = CASE WHEN v_restored
                            THEN 'The data comes from another cluster (a pg_dump restored here, pg_upgrade) or from before an update from 0.1; that cluster may have sent them after the dump (the worker.reclaimed audit entry says from which).'
                            ELSE 'The server did not start from a clean shutdown of a primary; commits after the last checkpoint before the start may be lost (the worker.reclaimed audit entry says when).' END,
              HINT = 'Each is sent again within qes_billing.idempotency_window; past it, it fails as expired and customers and subscriptions are looked up.';
    END IF;
  END IF;
  UPDATE billing.webhook_events
     SET state = 'received', next_attempt_at = now()
   WHERE state = 'processing';
  GET DIAGNOSTICS v_events = ROW_COUNT;
  -- (a start that was not clean is audited even when it found nothing)
  IF v_requests + v_events > 0 OR p_lost_after IS NOT NULL THEN
    PERFORM billing.audit('worker.reclaimed', NULL,
                          jsonb_build_object('stripe_requests', v_requests, 'webhook_events', v_events)
                          || CASE WHEN p_lost_after IS NULL THEN '{}'::jsonb
                                  ELSE jsonb_build_object('lost_after', p_lost_after, 'possibly_sent', v_possibly_sent) END
                          || CASE WHEN v_unclean THEN jsonb_build_object('unclean_start', true) ELSE '{}'::jsonb END
                          || CASE WHEN v_restored
                                  THEN jsonb_build_object('other_cluster', true,
                                                          'previous_system_identifiers', to_jsonb(coalesce(v_others, '{}')),
                                                          'system_identifier', v_cluster::text)
                                  ELSE '{}'::jsonb END);
  END IF;
  RETURN v_requests + v_events;
END
$$;

COMMENT ON FUNCTION billing.worker_reclaim(timestamptz, timestamptz) IS
  'Run by the worker at start: put queue rows left in flight by a crash back in the queue; after a start that was not from a clean shutdown of a primary, date the pending and waiting requests other than GETs created before the start (p_started) as possibly sent since p_lost_after (the last checkpoint before it), since lost work may have sent them; data from another cluster or of unknown origin (billing.cluster_identity: a pg_dump restored here, pg_upgrade, an update from 0.1) is dated likewise from each request''s creation. After restoring a dump into the cluster it came from, run it by hand with the dump''s start time, or ''-infinity'' (docs/operations.md).';

-- The worker's tick: apply due webhook events, then timers.  Returns the
-- number of events applied (the worker runs the next tick at once when it
-- was a full batch of p_events), the seconds until the next outbox request
-- is due (NULL: none waits), and the seconds until the tick has work again
-- (NULL: nothing is scheduled; the worker then runs no transaction until a
-- commit wakes it, docs/architecture.md, rule 14).
--
-- Each event is applied in a subtransaction with an xid of its own, and a
-- backend caches 64 of them: p_events stays below that (the worker passes
-- 50), so the batch never overflows the cache and slows every snapshot in
-- the cluster.
CREATE OR REPLACE FUNCTION billing.worker_tick(p_events integer, OUT applied bigint, OUT outbox_due_s double precision,
                                    OUT next_due_s double precision)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_timeout interval := current_setting('qes_billing.request_timeout')::interval;
  v_naptime double precision := extract(epoch FROM current_setting('qes_billing.worker_naptime')::interval);
  v_events  double precision;
  v_stale   double precision;
  v_meters  double precision;
BEGIN
  applied := billing.process_inbox(p_events);
  -- usage billed through meters: the pass when due (NULL: none billed)
  v_meters := billing.meter_tick();
  -- outbox requests whose answer this worker lost
  PERFORM billing.outbox_reclaim_stale(v_timeout);
  -- cached usage counters of periods that ended more than a day ago
  PERFORM billing.usage_cache_sweep(billing.now() - interval '1 day');
  -- dispute evidence submitted before its deadline, when a setting says so
  PERFORM billing.dispute_timers();
  outbox_due_s := billing.outbox_next_due();

  IF applied >= p_events THEN
    next_due_s := 0;   -- more may be due now
    RETURN;
  END IF;
  -- an event retried with backoff; one due now but not applied (locked by
  -- someone else) is looked at again after the naptime
  SELECT extract(epoch FROM min(e.next_attempt_at) FILTER (WHERE e.next_attempt_at > now()) - now()),
         CASE WHEN bool_or(e.next_attempt_at <= now()) THEN v_naptime END
    INTO v_events, v_stale
    FROM billing.webhook_events e WHERE e.state = 'received';
  next_due_s := least(v_events, v_stale, v_meters);
  -- a request in flight whose answer may be lost: stale after twice the timeout
  SELECT extract(epoch FROM min(r.claimed_at) + 2 * v_timeout - now()) INTO v_stale
    FROM billing.stripe_requests r WHERE r.state = 'in_flight';
  next_due_s := least(next_due_s, v_stale);
  -- a prepared transaction may hold queued work, and COMMIT PREPARED wakes
  -- nobody: look again every naptime while one exists
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts) THEN
    next_due_s := least(next_due_s, v_naptime);
  END IF;
  -- (overdue is negative: the worker reads it as now)
END
$$;

COMMENT ON FUNCTION billing.worker_tick(integer) IS
  'Run by the worker: apply up to p_events due webhook events, timers. Returns the events applied, the seconds until the next outbox request is due, and the seconds until the tick has work again (NULL: none scheduled).';

CREATE OR REPLACE FUNCTION billing.worker_state(
  OUT pid integer, OUT started_at timestamptz, OUT last_loop_at timestamptz,
  OUT loops bigint, OUT latch_wakeups bigint, OUT timeout_wakeups bigint,
  OUT naptime_ms integer, OUT reclaimed bigint, OUT extension_present boolean,
  OUT last_error text, OUT last_error_at timestamptz, OUT wake_requests bigint,
  OUT wakes_served bigint, OUT xacts bigint, OUT max_subxids integer, OUT subxid_overflows bigint)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_worker_state_fn';

COMMENT ON FUNCTION billing.worker_state() IS
  'The worker''s state as it publishes it in shared memory: loops and what woke them, transactions run (an idle worker runs none), the most subtransaction xids one of them cached (the PGPROC cache holds 64) and how many overflowed it.';

CREATE VIEW billing.worker_status AS
SELECT w.pid,
       w.started_at,
       w.last_loop_at,
       pg_catalog.clock_timestamp() - w.last_loop_at AS heartbeat_age,
       w.pid IS NOT NULL
         AND pg_catalog.clock_timestamp() - w.last_loop_at
             < make_interval(secs => 3 * w.naptime_ms / 1000.0 + 10) AS alive,
       w.loops,
       w.wake_requests,
       w.latch_wakeups,
       w.timeout_wakeups,
       w.naptime_ms,
       w.reclaimed,
       w.last_error,
       w.last_error_at,
       (SELECT count(*) FROM billing.stripe_requests r WHERE r.state = 'pending') AS outbox_pending,
       (SELECT count(*) FROM billing.stripe_requests r WHERE r.state = 'in_flight') AS outbox_in_flight,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'received') AS inbox_pending,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'needs_review') AS inbox_parked
  FROM billing.worker_state() w;

COMMENT ON VIEW billing.worker_status IS
  'The worker: alive since, last loop, wake-ups, queue depths and its last error.';

CREATE OR REPLACE FUNCTION billing.audit(p_action text, p_tenant_id text DEFAULT NULL, p_details jsonb DEFAULT '{}')
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_head   billing.audit_head;
  v_id     bigint;
  v_at     timestamptz;
  v_role   text := billing.outer_role();
  v_claims jsonb := billing.jwt_claims();
  v_hash   bytea;
BEGIN
  IF p_action IS NULL OR p_action !~ '^[a-z_]+(\.[a-z_]+)+$' THEN
    RAISE EXCEPTION 'invalid audit action: %', coalesce(quote_literal(p_action), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Actions look like "subscription.created".';
  END IF;
  -- no audit row ever holds a secret (docs/architecture.md, rule 13)
  p_details := billing.redact(coalesce(p_details, '{}'));

  SELECT * INTO v_head FROM billing.audit_head FOR UPDATE;
  -- stamped once the chain is ours: times never go back along the chain,
  -- so a period of time is a run of consecutive rows (72_audit_export.sql)
  v_at := clock_timestamp();
  v_id := v_head.last_id + 1;
  v_hash := billing.audit_hash(v_head.last_hash, v_id, v_at, v_role, v_claims ->> 'sub',
                               v_claims ->> 'tenant_id', p_tenant_id, p_action, p_details);
  INSERT INTO billing.audit_log
    VALUES (v_id, v_at, v_role, v_claims ->> 'sub', v_claims ->> 'tenant_id', p_tenant_id,
            p_action, p_details, v_head.last_hash, v_hash);
  UPDATE billing.audit_head SET last_id = v_id, last_hash = v_hash;
  RETURN v_id;
END
$$;

-- Who may write the chain: the owner of the audit tables (and superusers),
-- which is what billing.audit() runs as (SECURITY DEFINER) and what calls
-- billing.audit_archive() (72_audit_export.sql: superusers and the
-- extension's owner).  A role that may write every table but owns none of
-- these -- pg_write_all_data, an ETL or DBA login -- could otherwise append
-- a row with a hash it computed itself and move the chain head to it, or
-- record an archive that "covers" every row and then delete them all, and
-- the chain would still verify (docs/operations.md, "The audit chain does
-- not verify").  The check is on the role the statement runs as, which a
-- caller cannot set to the owner's (set_config can fake a setting, not
-- current_user); a pg_restore, run as a superuser or the owner, passes.
-- (Inline, not a helper function: a trigger's function needs no EXECUTE
-- right of whoever fires it, a function it calls would.)
CREATE OR REPLACE FUNCTION billing.audit_writers_guard() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF NOT pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE') THEN
    RAISE EXCEPTION 'only billing.audit() and billing.audit_archive() write the audit chain: % on %.% is not allowed for role %',
                    TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME, current_user
      USING ERRCODE = 'insufficient_privilege',
            DETAIL = 'Audit rows, the chain head and the archives are written only as the owner of the audit tables.',
            HINT = 'Write audit rows with billing.audit(); archive with the command qes_billing_audit archive.';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

COMMENT ON FUNCTION billing.audit_writers_guard() IS
  'Trigger: refuse writes to audit_log, audit_head and audit_archives by any role without the tables'' owner''s rights (pg_write_all_data too); billing.audit() and billing.audit_archive() run as the owner.';

CREATE OR REPLACE FUNCTION billing.audit_guard() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  -- a row covered by a recorded archive may be removed (billing.audit_archive,
  -- which runs as the owner: nobody else may delete even those)
  IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_log'
     AND pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE')
     AND EXISTS (SELECT FROM billing.audit_archives a
                  WHERE a.last_id >= OLD.audit_id AND a.first_id <= OLD.audit_id) THEN
    RETURN OLD;
  END IF;
  IF current_setting('qes_billing.audit_guard')::boolean THEN
    RAISE EXCEPTION 'the audit log is append-only: % is not allowed', TG_OP
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Audit rows are never changed or removed.';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

COMMENT ON FUNCTION billing.audit_guard() IS
  'Trigger: refuse UPDATE, DELETE and TRUNCATE of the audit log (but the owner''s DELETE of rows an archive covers) and of its archives.';

CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE ON billing.audit_archives
  FOR EACH ROW EXECUTE FUNCTION billing.audit_guard();

CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON billing.audit_archives
  FOR EACH STATEMENT EXECUTE FUNCTION billing.audit_guard();

-- the writers: INSERT into the log and the archives, any change to the head
-- (named to fire before 97_dump.sql's replace_seed on audit_head)
CREATE OR REPLACE TRIGGER chain_writers BEFORE INSERT ON billing.audit_log
  FOR EACH ROW EXECUTE FUNCTION billing.audit_writers_guard();

CREATE OR REPLACE TRIGGER chain_writers BEFORE INSERT ON billing.audit_archives
  FOR EACH ROW EXECUTE FUNCTION billing.audit_writers_guard();

CREATE OR REPLACE TRIGGER chain_writers BEFORE INSERT OR UPDATE OR DELETE ON billing.audit_head
  FOR EACH ROW EXECUTE FUNCTION billing.audit_writers_guard();

CREATE OR REPLACE TRIGGER chain_writers_truncate BEFORE TRUNCATE ON billing.audit_head
  FOR EACH STATEMENT EXECUTE FUNCTION billing.audit_writers_guard();

CREATE OR REPLACE FUNCTION billing.verify_audit_chain(
  OUT ok boolean, OUT rows_checked bigint, OUT first_bad_id bigint, OUT problem text)
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_head billing.audit_head;
  v_last billing.audit_log;
  -- where the chain in audit_log starts: after the newest archive, or at 1
  v_base_id   bigint := 0;
  v_base_hash bytea := '\x0000000000000000000000000000000000000000000000000000000000000000';
BEGIN
  SELECT a.last_id, a.last_hash INTO v_base_id, v_base_hash
    FROM billing.audit_archives a ORDER BY a.last_id DESC LIMIT 1;
  IF NOT FOUND THEN
    v_base_id := 0;
    v_base_hash := '\x0000000000000000000000000000000000000000000000000000000000000000';
  END IF;
  SELECT count(*) INTO rows_checked FROM billing.audit_log;

  -- The archives first: the chain kept starts from the newest one's last
  -- hash, so a forged archive would hide every row it claims to cover
  -- (docs/operations.md, "The audit trail out of the database").  They
  -- follow one another from row 1 without a gap or an overlap ...
  SELECT a.first_id,
         format('archive %s (rows %s to %s) does not follow on from %s', a.archive_id, a.first_id, a.last_id,
                CASE WHEN a.prev_last IS NULL THEN 'the start of the chain (row 1)'
                     ELSE 'the archive before it (rows up to ' || a.prev_last || ')' END)
    INTO first_bad_id, problem
    FROM (SELECT b.*, lag(b.last_id) OVER (ORDER BY b.first_id, b.last_id) AS prev_last
            FROM billing.audit_archives b) a
   WHERE a.first_id <> coalesce(a.prev_last, 0) + 1
   ORDER BY a.first_id, a.last_id
   LIMIT 1;
  -- ... and each is vouched for by the audit.archived row that
  -- billing.audit_archive() chained after it: the newest archive's row is
  -- always kept (its id is past the archive), an older one's may have been
  -- archived in turn; a row that is kept names the same rows, last hash and
  -- export digest.  A superuser who records an archive by hand (triggers
  -- off) has no such row to show.
  IF first_bad_id IS NULL THEN
    SELECT a.first_id,
           CASE WHEN r.audit_id IS NULL
                THEN format('archive %s (rows %s to %s) has no audit.archived row: billing.audit_archive() did not make it',
                            a.archive_id, a.first_id, a.last_id)
                ELSE format('archive %s (rows %s to %s) is not what its audit.archived row (audit_id %s) recorded',
                            a.archive_id, a.first_id, a.last_id, r.audit_id) END
      INTO first_bad_id, problem
      FROM billing.audit_archives a
      LEFT JOIN billing.audit_log r
        ON r.action = 'audit.archived' AND r.details ->> 'last_id' = a.last_id::text
     WHERE (r.audit_id IS NULL AND a.last_id = v_base_id)
        OR (r.audit_id IS NOT NULL
            AND (r.audit_id <= a.last_id
                 OR r.details ->> 'first_id' IS DISTINCT FROM a.first_id::text
                 OR r.details ->> 'last_hash' IS DISTINCT FROM encode(a.last_hash, 'hex')
                 OR r.details ->> 'export_sha256' IS DISTINCT FROM encode(a.export_sha256, 'hex')))
     ORDER BY a.first_id
     LIMIT 1;
  END IF;
  -- every audit.archived row kept has its archive (one removed by hand)
  IF first_bad_id IS NULL THEN
    SELECT r.audit_id,
           format('the archive of rows %s to %s that this audit.archived row records is missing',
                  r.details ->> 'first_id', r.details ->> 'last_id')
      INTO first_bad_id, problem
      FROM billing.audit_log r
     WHERE r.action = 'audit.archived'
       AND NOT EXISTS (SELECT FROM billing.audit_archives a WHERE r.details ->> 'last_id' = a.last_id::text)
     ORDER BY r.audit_id
     LIMIT 1;
  END IF;

  IF first_bad_id IS NULL THEN
    SELECT c.audit_id,
           CASE
             WHEN c.prev_id IS NULL AND c.audit_id <> v_base_id + 1 THEN 'rows before this one are missing'
             WHEN c.prev_id IS NOT NULL AND c.audit_id <> c.prev_id + 1 THEN 'rows before this one are missing'
             WHEN c.prev_hash <> coalesce(c.chain_prev, v_base_hash)
               THEN 'prev_hash does not match the previous row'
             ELSE 'content does not match its hash'
           END
      INTO first_bad_id, problem
      FROM (SELECT a.*,
                   lag(a.hash) OVER w AS chain_prev,
                   lag(a.audit_id) OVER w AS prev_id
              FROM billing.audit_log a
            WINDOW w AS (ORDER BY a.audit_id)) c
     WHERE (c.prev_id IS NULL AND c.audit_id <> v_base_id + 1)
        OR (c.prev_id IS NOT NULL AND c.audit_id <> c.prev_id + 1)
        OR c.prev_hash <> coalesce(c.chain_prev, v_base_hash)
        OR c.hash <> billing.audit_hash(c.prev_hash, c.audit_id, c.occurred_at, c.actor_role, c.actor_sub,
                                        c.actor_tenant, c.tenant_id, c.action, c.details)
     ORDER BY c.audit_id
     LIMIT 1;
  END IF;

  IF first_bad_id IS NULL THEN
    SELECT * INTO v_head FROM billing.audit_head;
    SELECT * INTO v_last FROM billing.audit_log ORDER BY audit_id DESC LIMIT 1;
    IF v_head.last_id IS NULL THEN
      first_bad_id := coalesce(v_last.audit_id, v_base_id) + 1;
      problem := 'the chain head (billing.audit_head) is missing';
    ELSIF v_head.last_id <> coalesce(v_last.audit_id, v_base_id)
       OR v_head.last_hash <> coalesce(v_last.hash, v_head.last_hash) THEN
      first_bad_id := coalesce(v_last.audit_id, v_base_id) + 1;
      problem := 'the newest rows are missing (the chain head is at ' || v_head.last_id || ')';
    END IF;
  END IF;
  ok := first_bad_id IS NULL;
END
$$;

COMMENT ON FUNCTION billing.verify_audit_chain() IS
  'Check that the archives follow one another from row 1, each recorded by its audit.archived row; walk the audit chain from the newest archive''s last hash (or from the start); report the first archive or row whose link or hash does not match, or that newest rows are missing.';

-- The audit trail leaves the database: an export of a period that can be
-- verified without PostgreSQL (src/qes_billing_audit_verify), and archival
-- of the rows older than qes_billing.audit_retention (exported, then
-- removed, the chain going on from the archive's last hash).
--
-- A period [from, to) is a run of consecutive rows of the chain: the rows
-- after the boundary of `from` up to the boundary of `to`, the boundary of
-- a time being the newest row stamped before it (billing.audit_boundary).
-- billing.audit() stamps a row once it holds the chain head, so times never
-- go back along the chain; and consecutive periods [a, b), [b, c) are
-- consecutive runs, so their exports chain together: the second's
-- prev_hash is the first's last_hash.
--
-- An export is JSON Lines (docs/architecture.md, "Audit exports"):
--   {"format": "qes_billing.audit_export", "version": 1, "from", "to",
--    "first_id", "last_id", "rows", "prev_hash", "exported_at"}
--   one line per row: audit_id, occurred_at (UTC, microseconds), actor_role,
--    actor_sub, actor_tenant, tenant_id, action, details (jsonb's canonical
--    text, exactly what was hashed), prev_hash, hash
--   {"end": true, "rows", "last_id", "last_hash"}
-- Hashes are lower-case hex.

SELECT pg_catalog.pg_extension_config_dump('billing.audit_archives', '');

CREATE OR REPLACE FUNCTION billing.audit_chain_base(OUT base_id bigint, OUT base_hash bytea)
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
BEGIN ATOMIC
  SELECT coalesce(max(a.last_id), 0),
         coalesce((SELECT b.last_hash FROM billing.audit_archives b ORDER BY b.last_id DESC LIMIT 1),
                  '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
    FROM billing.audit_archives a;

END;

COMMENT ON FUNCTION billing.audit_chain_base() IS
  'Where the chain kept in audit_log starts: the last id and hash of the newest archive, or 0 and 32 zero bytes.';

CREATE OR REPLACE FUNCTION billing.audit_boundary(p_at timestamptz) RETURNS bigint
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
BEGIN ATOMIC
  SELECT greatest(coalesce((SELECT max(l.audit_id) FROM billing.audit_log l WHERE l.occurred_at < p_at), 0),
                  (SELECT b.base_id FROM billing.audit_chain_base() b));

END;

COMMENT ON FUNCTION billing.audit_boundary(timestamptz) IS
  'The id of the newest audit row stamped before this time (or where the kept chain starts): periods of audit exports end at it.';

CREATE OR REPLACE FUNCTION billing.audit_export(p_from timestamptz, p_to timestamptz) RETURNS SETOF text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_first bigint;
  v_last  bigint;
  v_prev  bytea;
  v_end   bytea;
  v_base  record;
  v_rows  bigint;
BEGIN
  IF p_from IS NULL OR p_to IS NULL THEN
    RAISE EXCEPTION 'audit export: the period needs both ends (from %, to %)',
                    coalesce(p_from::text, 'NULL'), coalesce(p_to::text, 'NULL')
      USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Give a start and an end; ''-infinity'' starts at the oldest row kept.';
  END IF;
  IF p_from > p_to THEN
    RAISE EXCEPTION 'audit export: the period ends (%) before it starts (%)', p_to, p_from
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Swap from and to.';
  END IF;
  IF p_to > clock_timestamp() THEN
    RAISE EXCEPTION 'audit export: the period ends in the future (%)', p_to
      USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Rows may still be added to a period that has not ended, and its export would not chain with the next one.',
            HINT = 'Export periods that have ended; now() is the latest end.';
  END IF;

  -- Wait for a writer that holds the chain head (it may be stamping a row
  -- before p_to) to finish, without keeping writers out while the rows are
  -- read: the share lock is taken in a subtransaction that is rolled back,
  -- which releases it.  Any writer after this stamps its row after p_to.
  BEGIN
    PERFORM FROM billing.audit_head FOR SHARE;
    RAISE EXCEPTION USING ERRCODE = 'QB001';
  EXCEPTION WHEN SQLSTATE 'QB001' THEN
    NULL;
  END;

  SELECT * INTO v_base FROM billing.audit_chain_base();
  v_first := billing.audit_boundary(p_from) + 1;
  v_last := greatest(billing.audit_boundary(p_to), v_first - 1);
  v_prev := CASE WHEN v_first - 1 = v_base.base_id THEN v_base.base_hash
                 ELSE (SELECT l.hash FROM billing.audit_log l WHERE l.audit_id = v_first - 1) END;
  v_end := CASE WHEN v_last = v_first - 1 THEN v_prev
                ELSE (SELECT l.hash FROM billing.audit_log l WHERE l.audit_id = v_last) END;
  SELECT count(*) INTO v_rows FROM billing.audit_log l WHERE l.audit_id BETWEEN v_first AND v_last;

  RETURN NEXT json_build_object(
    'format', 'qes_billing.audit_export', 'version', 1,
    'from', CASE WHEN isfinite(p_from) THEN to_char(p_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END,
    'to', CASE WHEN isfinite(p_to) THEN to_char(p_to AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END,
    'first_id', v_first, 'last_id', v_last, 'rows', v_rows,
    'prev_hash', encode(v_prev, 'hex'),
    'exported_at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text;

  RETURN QUERY
    SELECT json_build_object(
             'audit_id', l.audit_id,
             'occurred_at', to_char(l.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
             'actor_role', l.actor_role, 'actor_sub', l.actor_sub, 'actor_tenant', l.actor_tenant,
             'tenant_id', l.tenant_id, 'action', l.action,
             'details', l.details::text,
             'prev_hash', encode(l.prev_hash, 'hex'), 'hash', encode(l.hash, 'hex'))::text
      FROM billing.audit_log l
     WHERE l.audit_id BETWEEN v_first AND v_last
     ORDER BY l.audit_id;

  RETURN NEXT json_build_object('end', true, 'rows', v_rows, 'last_id', v_last,
                                'last_hash', encode(v_end, 'hex'))::text;
END
$$;

COMMENT ON FUNCTION billing.audit_export(timestamptz, timestamptz) IS
  'The audit rows of the period [from, to) as JSON Lines: a header with the hash of the row before the period, the rows with everything their hashes cover, a trailer with the last hash. src/qes_billing_audit_verify checks it offline; consecutive periods chain.';

CREATE OR REPLACE FUNCTION billing.audit_archive_cutoff() RETURNS timestamptz
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_retention interval := current_setting('qes_billing.audit_retention')::interval;
BEGIN
  IF v_retention = interval '0' THEN
    RETURN NULL;
  END IF;
  RETURN least(billing.now() - v_retention, now());
END
$$;

COMMENT ON FUNCTION billing.audit_archive_cutoff() IS
  'Audit rows stamped before this time are past qes_billing.audit_retention and may be archived; NULL when rows are kept for ever.';

CREATE OR REPLACE FUNCTION billing.audit_archive(p_first_id bigint, p_last_id bigint, p_last_hash bytea,
                                      p_export_sha256 bytea)
  RETURNS billing.audit_archives
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_cutoff timestamptz := billing.audit_archive_cutoff();
  v_base   record;
  v_hash   bytea;
  v_row    billing.audit_archives;
  v_gone   bigint;
BEGIN
  IF v_cutoff IS NULL THEN
    RAISE EXCEPTION 'audit archive: qes_billing.audit_retention is 0, audit rows are kept for ever'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Set qes_billing.audit_retention (e.g. 3650d) to archive older rows.';
  END IF;
  IF p_first_id IS NULL OR p_last_id IS NULL OR p_last_hash IS NULL OR p_export_sha256 IS NULL THEN
    RAISE EXCEPTION 'audit archive: first_id, last_id, last_hash and export_sha256 are all needed'
      USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Archive with the command qes_billing_audit archive, which fills them from the export it wrote.';
  END IF;
  IF octet_length(p_last_hash) <> 32 OR octet_length(p_export_sha256) <> 32 THEN
    RAISE EXCEPTION 'audit archive: last_hash and export_sha256 must be SHA-256 digests (32 bytes)'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass them as decode(<64 hex digits>, ''hex'').';
  END IF;

  LOCK TABLE billing.audit_archives IN SHARE ROW EXCLUSIVE MODE;
  SELECT * INTO v_base FROM billing.audit_chain_base();
  IF p_first_id <> v_base.base_id + 1 THEN
    RAISE EXCEPTION 'audit archive: the export starts at row %, but the rows kept start at row %',
                    p_first_id, v_base.base_id + 1
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Archives follow one another without a gap: export from ''-infinity''.';
  END IF;
  IF p_last_id < p_first_id THEN
    RAISE EXCEPTION 'audit archive: no rows to archive (rows % to %)', p_first_id, p_last_id
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Nothing is older than the retention yet.';
  END IF;
  IF p_last_id > billing.audit_boundary(v_cutoff) THEN
    RAISE EXCEPTION 'audit archive: row % is not older than the retention (rows stamped before % may go)',
                    p_last_id, v_cutoff
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Export up to billing.audit_archive_cutoff() and archive that.';
  END IF;
  SELECT l.hash INTO v_hash FROM billing.audit_log l WHERE l.audit_id = p_last_id;
  IF v_hash IS DISTINCT FROM p_last_hash THEN
    RAISE EXCEPTION 'audit archive: the export''s last hash does not match row % in the database', p_last_id
      USING ERRCODE = 'data_exception',
            HINT = 'The export is not of this database''s chain, or a row changed: verify both before removing anything.';
  END IF;

  INSERT INTO billing.audit_archives (first_id, last_id, last_hash, rows_removed, export_sha256, archived_by)
  VALUES (p_first_id, p_last_id, p_last_hash, p_last_id - p_first_id + 1, p_export_sha256, billing.outer_role())
  RETURNING * INTO v_row;
  DELETE FROM billing.audit_log l WHERE l.audit_id BETWEEN p_first_id AND p_last_id;
  GET DIAGNOSTICS v_gone = ROW_COUNT;
  IF v_gone <> v_row.rows_removed THEN
    RAISE EXCEPTION 'audit archive: % rows were to be removed, % were found', v_row.rows_removed, v_gone
      USING ERRCODE = 'data_exception',
            HINT = 'Rows are missing from the chain: SELECT * FROM billing.verify_audit_chain();';
  END IF;
  PERFORM billing.audit('audit.archived', NULL,
    jsonb_build_object('first_id', p_first_id, 'last_id', p_last_id, 'rows', v_gone,
                       'last_hash', encode(p_last_hash, 'hex'),
                       'export_sha256', encode(p_export_sha256, 'hex'),
                       'retention', current_setting('qes_billing.audit_retention'),
                       'cutoff', v_cutoff));
  RETURN v_row;
END
$$;

COMMENT ON FUNCTION billing.audit_archive(bigint, bigint, bytea, bytea) IS
  'Remove the audit rows first_id..last_id, past the retention and held by a verified export (its last hash and SHA-256 given), and record the archive; the chain in audit_log goes on from its last hash. Audited as audit.archived.';

-- Refused deliveries are counted in shared memory without a write or the
-- audit chain's lock (src/guard.c); the worker writes the counts here and
-- into the audit log about once a minute.
CREATE OR REPLACE FUNCTION billing.flush_webhook_rejections() RETURNS bigint
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_flush_webhook_rejections';

COMMENT ON FUNCTION billing.flush_webhook_rejections() IS
  'Write the webhook refusals counted since the last flush: one webhook_rejections row and one audit row (webhook.rejected) per reason, with the number of deliveries. Returns the deliveries written. The worker runs it about once a minute.';

CREATE OR REPLACE FUNCTION billing.webhook_rejections_pending(OUT reason text, OUT deliveries bigint)
  RETURNS SETOF record
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_webhook_rejections_pending';

COMMENT ON FUNCTION billing.webhook_rejections_pending() IS
  'Webhook refusals counted in shared memory and not yet written to billing.webhook_rejections, by reason.';

COMMENT ON FUNCTION api.stripe_webhook(json) IS
  'Stripe webhook endpoint (POST /rpc/stripe_webhook, the raw event as the body). Verifies the Stripe-Signature header and the mode, stores a new event in the inbox for the worker and answers 200 at once; a repeated event id answers 200 and stores nothing. Refusals answer 400 with the reason (500 when no secret is configured) and are counted, then written and audited once a minute per reason.';

-- Inbound rate limiting (src/guard.c): PostgREST's db-pre-request function.
CREATE OR REPLACE FUNCTION api.pre_request() RETURNS void
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_pre_request';

COMMENT ON FUNCTION api.pre_request() IS
  'PostgREST db-pre-request: token buckets per client address (last X-Forwarded-For entry; never for Stripe webhook deliveries), per tenant (JWT tenant_id) and per staff role; over the limit the request is answered 429 with Retry-After.';

CREATE OR REPLACE FUNCTION billing.rate_limit_stats(OUT allowed bigint, OUT limited bigint, OUT overflowed bigint,
                                         OUT slots_used bigint, OUT slots integer)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_rate_limit_stats';

COMMENT ON FUNCTION billing.rate_limit_stats() IS
  'Inbound rate limiting since start: requests allowed and limited (429), requests that shared an overflow bucket, buckets in use of those available.';

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

CREATE OR REPLACE FUNCTION billing.json_items(o jsonb) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN CASE WHEN jsonb_typeof(o -> 'items' -> 'data') = 'array' THEN o -> 'items' -> 'data' ELSE '[]' END;

COMMENT ON FUNCTION billing.json_items(jsonb) IS 'A Stripe subscription''s items as a JSON array (empty when absent).';

-- A subscription's licensed item, the one whose price is the plan: the
-- first item that is not metered (usage billed through meters adds metered
-- items beside it, in any order), else the first.
CREATE OR REPLACE FUNCTION billing.base_item(o jsonb) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT i FROM jsonb_array_elements(billing.json_items(o)) WITH ORDINALITY x(i, n)
                  WHERE coalesce(i -> 'price' -> 'recurring' ->> 'usage_type', 'licensed') <> 'metered'
                  ORDER BY n LIMIT 1),
                o -> 'items' -> 'data' -> 0);

COMMENT ON FUNCTION billing.base_item(jsonb) IS
  'A Stripe subscription''s licensed item (its price is the plan''s): the first item that is not metered.';

-- A Stripe reference: an id, or an expanded object's id.
CREATE OR REPLACE FUNCTION billing.stripe_ref(v jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN CASE jsonb_typeof(v) WHEN 'string' THEN v #>> '{}' WHEN 'object' THEN v ->> 'id' END;

COMMENT ON FUNCTION billing.stripe_ref(jsonb) IS 'The id a Stripe reference field holds, whether it is an id or an expanded object.';

-- The customer an object belongs to (its own id for a customer).
CREATE OR REPLACE FUNCTION billing.object_customer(o jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN CASE WHEN o ->> 'object' = 'customer' THEN o ->> 'id' ELSE billing.stripe_ref(o -> 'customer') END;

-- Which tenant an object belongs to: metadata.tenant_id (on the object, or
-- on the subscription an invoice is for), else any customer the tenant ever
-- had (a deleted one too).
-- (PL/pgSQL: its plan is kept; a SQL function with SET is planned at every
-- call, 220 us of the ~540 us an event took to apply)
CREATE OR REPLACE FUNCTION billing.event_tenant(obj jsonb) RETURNS text
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

-- ---- waiting events ---------------------------------------------------------

-- Events that waited for one of these Stripe ids are applied again (at once:
-- the worker is woken when the transaction commits).
CREATE OR REPLACE FUNCTION billing.inbox_requeue(p_ids text[]) RETURNS integer
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
CREATE OR REPLACE FUNCTION billing.fetch_object(p_tenant text, p_object text, p_id text, p_next_second boolean DEFAULT false)
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
CREATE OR REPLACE FUNCTION billing.sync_customer(p_tenant text) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.customer_linked() RETURNS trigger
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

CREATE OR REPLACE TRIGGER customer_linked AFTER INSERT OR UPDATE OF stripe_customer_id ON billing.tenants
  FOR EACH ROW EXECUTE FUNCTION billing.customer_linked();

CREATE OR REPLACE FUNCTION billing.apply_customer(p_tenant text, o jsonb, p_at timestamptz, p_deleted boolean) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.dunning_since(s billing.subscriptions) RETURNS timestamptz
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
CREATE OR REPLACE FUNCTION billing.sync_dunning(p_tenant text, p_subscription_id bigint) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.fresh_within() RETURNS interval
  LANGUAGE sql IMMUTABLE
RETURN interval '5 minutes';

COMMENT ON FUNCTION billing.fresh_within() IS
  'How old (in Stripe''s time) the mirror''s view of an object may be for a notification to rely on it; an older view is checked with Stripe first.';

CREATE OR REPLACE FUNCTION billing.sync_invoice_failure(p_tenant text, p_invoice text) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.invoice_failure_changed() RETURNS trigger
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
CREATE OR REPLACE TRIGGER invoice_failure AFTER INSERT ON billing.invoices
  FOR EACH ROW WHEN (NEW.first_failed_at IS NOT NULL)
  EXECUTE FUNCTION billing.invoice_failure_changed();

CREATE OR REPLACE TRIGGER invoice_failure_changed AFTER UPDATE ON billing.invoices
  FOR EACH ROW WHEN (NEW.first_failed_at IS NOT NULL OR (NEW.status = 'paid' AND OLD.status IS DISTINCT FROM 'paid'))
  EXECUTE FUNCTION billing.invoice_failure_changed();

-- The answer (or the end) of a lookup a failure waited for: its facts are
-- decided.  (An answer of 200 is mirrored by billing.mirror_fetched, whose
-- change of the invoice decides them.)
CREATE OR REPLACE FUNCTION billing.invoice_lookup_done(p_req billing.stripe_requests) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.rekey_usage_from(p_tenant text, p_from timestamptz) RETURNS bigint
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
CREATE OR REPLACE FUNCTION billing.apply_subscription_state(p_tenant text, o jsonb, p_at timestamptz, p_deleted boolean,
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
CREATE OR REPLACE FUNCTION billing.apply_subscription(p_tenant text, o jsonb, p_at timestamptz, p_deleted boolean)
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
CREATE OR REPLACE FUNCTION billing.invoice_subscription(o jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN coalesce(billing.stripe_ref(o -> 'subscription'),
                o -> 'parent' -> 'subscription_details' ->> 'subscription');

-- Record that a payment intent pays an invoice (from either side); the
-- payment, when mirrored, becomes a subscription payment.
CREATE OR REPLACE FUNCTION billing.link_invoice_payment(p_tenant text, p_invoice text, p_payment_intent text) RETURNS void
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

CREATE OR REPLACE FUNCTION billing.apply_invoice(p_tenant text, o jsonb, p_at timestamptz, p_failed boolean DEFAULT false,
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

CREATE OR REPLACE FUNCTION billing.apply_payment(p_tenant text, o jsonb, p_at timestamptz, p_kind text) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.apply_dispute(p_tenant text, o jsonb) RETURNS void
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

CREATE OR REPLACE FUNCTION billing.mirror_fetched(p_req billing.stripe_requests) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.apply_event_ex(e jsonb, OUT out_tenant text, OUT out_state text, OUT out_waits text[])
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
CREATE OR REPLACE FUNCTION billing.process_inbox(p_limit integer DEFAULT 200) RETURNS integer
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
CREATE OR REPLACE FUNCTION billing.mirror_row(p_object text, p_id text) RETURNS jsonb
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
CREATE OR REPLACE FUNCTION billing.drift_repaired(p_tenant text, p_run text, p_source text, p_object text, p_id text,
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
CREATE OR REPLACE FUNCTION billing.reconcile_event(p_event_id text, e jsonb,
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
CREATE OR REPLACE FUNCTION billing.reconcile_object(p_tenant text, o jsonb, p_at timestamptz, p_run text) RETURNS boolean
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

CREATE OR REPLACE FUNCTION billing.reconcile_tenant(p_tenant text) RETURNS text
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
CREATE OR REPLACE FUNCTION billing.reconcile_event_types() RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN '["customer.created", "customer.updated", "customer.deleted", "customer.subscription.created",
         "customer.subscription.updated", "customer.subscription.deleted", "customer.subscription.trial_will_end",
         "invoice.created", "invoice.finalized", "invoice.paid", "invoice.payment_failed",
         "payment_intent.succeeded", "payment_intent.payment_failed", "charge.succeeded", "charge.failed",
         "charge.dispute.created", "charge.dispute.updated", "charge.dispute.closed",
         "charge.dispute.funds_withdrawn", "charge.dispute.funds_reinstated",
         "customer.tax_id.created", "customer.tax_id.updated", "customer.tax_id.deleted"]'::jsonb;

-- Queue the next page of the pass's listing, due at p_due.
CREATE OR REPLACE FUNCTION billing.reconcile_list_events(p_run text, p_after text, p_due timestamptz) RETURNS bigint
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
CREATE OR REPLACE FUNCTION billing.reconcile_start_pass(p_due timestamptz) RETURNS text
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
CREATE OR REPLACE FUNCTION billing.reconcile_tick() RETURNS void
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
CREATE OR REPLACE FUNCTION billing.reconcile_now() RETURNS text
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

CREATE OR REPLACE FUNCTION billing.reconcile_fetched(p_req billing.stripe_requests) RETURNS void
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

-- The direct lane (src/outbox_lane.c, docs/architecture.md, "The direct
-- lane"): while the worker would claim a request at once, the transaction
-- that queues it claims it itself -- the row goes in in_flight, attempt 1,
-- as billing.outbox_claim would have left it -- and hands it to the worker
-- through shared memory, which sends it once this transaction has
-- committed, without a transaction of its own.  NULL: the lane is closed or
-- full, or the request too large for it; the request is queued pending.
CREATE OR REPLACE FUNCTION billing.outbox_lane_reserve(p_method text, p_path text, p_params jsonb, p_idempotency_key text)
  RETURNS integer
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_outbox_lane_reserve';

COMMENT ON FUNCTION billing.outbox_lane_reserve(text, text, jsonb, text) IS
  'Run by billing.outbox_enqueue: a slot of the outbox''s direct lane for the request about to be inserted, or NULL.';

CREATE OR REPLACE FUNCTION billing.outbox_lane_fill(p_slot integer, p_request_id bigint) RETURNS void
  LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'qes_outbox_lane_fill';

COMMENT ON FUNCTION billing.outbox_lane_fill(integer, bigint) IS
  'Run by billing.outbox_enqueue: the row of a reserved lane slot is inserted.';

CREATE OR REPLACE FUNCTION billing.outbox_note_waiter() RETURNS void
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_outbox_note_waiter';

COMMENT ON FUNCTION billing.outbox_note_waiter() IS
  'Run by billing.outbox_enqueue: a request now waits for another, so the worker records answers at once (a chain goes at the pace of Stripe''s answers).';

CREATE OR REPLACE FUNCTION billing.outbox_lane_state(OUT open boolean, OUT slots_in_use integer, OUT sent bigint,
                                          OUT released bigint)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_outbox_lane_state';

COMMENT ON FUNCTION billing.outbox_lane_state() IS
  'The outbox''s direct lane: open (the worker would claim a request at once, so the queuing transaction claims it), its slots in use, and since the server started how many requests the worker sent from it and how many it put back in the queue (too old, no key, the rate limit).';

-- Run by the worker: requests of the lane it could not send (no key, the
-- rate limit's bucket empty, a slot older than the request timeout) go back
-- to the queue as if never claimed, to be claimed the ordinary way.
CREATE OR REPLACE FUNCTION billing.outbox_lane_release(p_request_ids bigint[]) RETURNS bigint
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
BEGIN ATOMIC
  WITH r AS (
    UPDATE billing.stripe_requests
       SET state = 'pending', attempts = attempts - 1, claimed_at = NULL, next_attempt_at = now(),
           updated_at = now()
     WHERE request_id = ANY (p_request_ids) AND state = 'in_flight' AND attempts = 1
       AND first_sent_at IS NULL
    RETURNING 1)
  SELECT count(*) FROM r;

END;

COMMENT ON FUNCTION billing.outbox_lane_release(bigint[]) IS
  'Run by the worker: put requests of the direct lane it did not send back in the queue, unclaimed. Returns how many.';

CREATE OR REPLACE FUNCTION billing.outbox_enqueue(p_tenant text, p_kind text, p_method text, p_path text,
                                       p_params jsonb DEFAULT '{}', p_subject jsonb DEFAULT '{}',
                                       p_after bigint DEFAULT NULL, p_inherit text DEFAULT NULL,
                                       p_run_id text DEFAULT NULL, p_not_before timestamptz DEFAULT NULL)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_id    bigint;
  v_after billing.stripe_requests;
  v_key   text := 'qes-' || gen_random_uuid();
  v_slot  integer;
BEGIN
  IF p_after IS NOT NULL THEN
    SELECT * INTO v_after FROM billing.stripe_requests WHERE request_id = p_after;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'outbox request % does not exist', p_after USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF v_after.state = 'failed' THEN
      RAISE EXCEPTION 'outbox request % has failed; nothing can wait for it', p_after
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM billing.outbox_note_waiter();
  ELSIF (p_not_before IS NULL OR p_not_before <= now())
        AND NOT coalesce(billing.tenant_fenced(p_tenant), false)
        AND NOT EXISTS (SELECT FROM billing.stripe_rate_budget) THEN
    -- due now, for a tenant whose partition is not moving, and no share of
    -- a sharded account's rate to take: the direct lane may take it
    v_slot := billing.outbox_lane_reserve(p_method, p_path, p_params, v_key);
  END IF;
  INSERT INTO billing.stripe_requests (tenant_id, kind, method, path, params, subject, after_request, inherit,
                                       run_id, idempotency_key, state, attempts, claimed_at, next_attempt_at)
  VALUES (p_tenant, p_kind, p_method, p_path, p_params, p_subject, p_after, p_inherit, p_run_id, v_key,
          CASE WHEN v_slot IS NOT NULL THEN 'in_flight' WHEN p_after IS NULL THEN 'pending' ELSE 'waiting' END,
          (v_slot IS NOT NULL)::integer, CASE WHEN v_slot IS NOT NULL THEN clock_timestamp() END,
          greatest(now(), p_not_before))
  RETURNING request_id INTO v_id;
  IF v_slot IS NOT NULL THEN
    PERFORM billing.outbox_lane_fill(v_slot, v_id);
  END IF;
  IF v_after.state = 'succeeded' THEN
    PERFORM billing.outbox_release_waiting(v_after);   -- done already: due at once
  END IF;
  RETURN v_id;
END
$$;

COMMENT ON FUNCTION billing.outbox_enqueue(text, text, text, text, jsonb, jsonb, bigint, text, text, timestamptz) IS
  'Queue a Stripe request in the caller''s transaction; the worker sends it after COMMIT (not before p_not_before). With p_after it waits for that request and, with p_inherit, receives its response id as that parameter. While the worker has no backlog the request is claimed here and handed to the worker directly (the direct lane): its row is in_flight from the start.';

-- Queue a request unless the same one (tenant, kind, path) is still
-- queued or in flight; returns the request either way.
CREATE OR REPLACE FUNCTION billing.outbox_enqueue_once(p_tenant text, p_kind text, p_method text, p_path text,
                                            p_params jsonb DEFAULT '{}', p_not_before timestamptz DEFAULT NULL)
  RETURNS bigint
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(
    (SELECT r.request_id FROM billing.stripe_requests r
      WHERE r.tenant_id = p_tenant AND r.kind = p_kind AND r.path = p_path
        AND r.state IN ('waiting', 'pending', 'in_flight')
      ORDER BY r.request_id LIMIT 1),
    billing.outbox_enqueue(p_tenant, p_kind, p_method, p_path, p_params, p_not_before => p_not_before))
$$;

COMMENT ON FUNCTION billing.outbox_enqueue_once(text, text, text, text, jsonb, timestamptz) IS
  'Queue a request unless the same one (tenant, kind, path) is still queued or in flight; returns the request.';

-- Claim due requests for sending: the worker commits this before any byte
-- goes out.  Rows are taken with SKIP LOCKED, so a backend busy with a
-- row (replaying it, say) never blocks the worker.  PL/pgSQL keeps the plan
-- for the worker's session; the due rows are found in the order of the
-- stripe_requests_due index (no sort) and updated through the primary key,
-- so a claim costs the same however many rows the table or the queue holds
-- (a join planned for an unknown LIMIT hashed the whole table per claim).
CREATE OR REPLACE FUNCTION billing.outbox_claim(p_limit integer)
  RETURNS TABLE (request_id bigint, attempt integer, method text, path text, params jsonb, idempotency_key text)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  -- this database's share of the Stripe account's rate (87_outbox_budget.sql),
  -- when a coordinator gave it one (a sharded deployment); else p_limit
  v_budget  boolean := EXISTS (SELECT FROM billing.stripe_rate_budget);
  v_room    integer := CASE WHEN v_budget THEN billing.stripe_budget_take(p_limit) ELSE p_limit END;
  -- A request that changes something in Stripe and may have reached it
  -- (first_sent_at: an attempt that got an answer, or ended without one
  -- after connecting, or was in flight at a crash) is sent again only while
  -- Stripe still keeps its Idempotency-Key's result; after that a resend
  -- could act twice, so it fails instead, as an unknown outcome ("expired").
  v_expiry  timestamptz := now() - current_setting('qes_billing.idempotency_window')::interval;
  v_n       integer := 0;
  v_passes  integer := 0;
  v_expired jsonb[];
  v_msg     text;
  c         record;
  x         jsonb;
BEGIN
  -- One statement claims the due rows.  An expired row is taken in the same
  -- statement (its attempt not counted, claimed_at left NULL to mark it) and
  -- failed below instead of being returned; the room it took is claimed
  -- again, so that a backlog of them (after an outage) does not make the
  -- worker wait a naptime per batch.
  LOOP
    v_expired := NULL;
    FOR c IN
      UPDATE billing.stripe_requests r
         SET state = 'in_flight', updated_at = now(),
             attempts = r.attempts + (NOT coalesce(r.method <> 'GET' AND r.first_sent_at <= v_expiry, false))::integer,
             claimed_at = CASE WHEN r.method <> 'GET' AND r.first_sent_at <= v_expiry THEN NULL ELSE now() END
       WHERE r.request_id = ANY (ARRAY(
               SELECT d.request_id FROM billing.stripe_requests d
                WHERE d.state = 'pending' AND d.next_attempt_at <= now()
                  -- not for a tenant whose partition is moving (src/fence.c)
                  AND NOT billing.tenant_fenced(d.tenant_id)
                ORDER BY d.next_attempt_at, d.request_id
                LIMIT v_room - v_n
                  FOR UPDATE SKIP LOCKED))
      RETURNING r.request_id, r.attempts, r.method, r.path, r.params, r.idempotency_key, r.claimed_at,
                r.first_sent_at, r.http_status, r.error, r.tenant_id, r.kind
    LOOP
      IF c.claimed_at IS NULL THEN
        v_expired := v_expired || jsonb_build_object(
          'request_id', c.request_id, 'tenant_id', c.tenant_id, 'kind', c.kind, 'http_status', c.http_status,
          'error', jsonb_build_object('category', 'expired', 'retryable', false, 'previous_error', c.error,
            'message', format('not sent again: it may have reached Stripe (first at %s, %s attempt(s)) and '
                              'Stripe no longer keeps the result of its Idempotency-Key '
                              '(qes_billing.idempotency_window %s), so a resend could act twice',
                              c.first_sent_at, c.attempts, current_setting('qes_billing.idempotency_window'))));
        CONTINUE;
      END IF;
      request_id := c.request_id; attempt := c.attempts; method := c.method; path := c.path;
      params := c.params; idempotency_key := c.idempotency_key;
      v_n := v_n + 1;
      RETURN NEXT;
    END LOOP;
    EXIT WHEN v_expired IS NULL;
    -- all of them at once, in one subtransaction
    BEGIN
      FOREACH x IN ARRAY v_expired LOOP
        PERFORM billing.outbox_fail((x ->> 'request_id')::bigint, (x ->> 'http_status')::integer, NULL, x -> 'error');
      END LOOP;
    EXCEPTION WHEN OTHERS THEN
      -- what a failure sets off raised: one by one, and one that raises
      -- again is parked (pending, never due), so that the claim goes on
      -- and nothing sends it; once the cause is fixed an operator's
      -- billing.retry_request makes it due, and the next claim fails it
      FOREACH x IN ARRAY v_expired LOOP
        BEGIN
          PERFORM billing.outbox_fail((x ->> 'request_id')::bigint, (x ->> 'http_status')::integer, NULL, x -> 'error');
        EXCEPTION WHEN OTHERS THEN
          GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
          UPDATE billing.stripe_requests s
             SET state = 'pending', claimed_at = NULL, next_attempt_at = 'infinity', updated_at = now(),
                 error = billing.redact(x -> 'error' || jsonb_build_object('parked', v_msg))
           WHERE s.request_id = (x ->> 'request_id')::bigint;
          -- (audited as a failure, so that the failing-requests alert fires)
          PERFORM billing.audit('stripe.request_failed', x ->> 'tenant_id',
            jsonb_build_object('request_id', (x ->> 'request_id')::bigint, 'kind', x ->> 'kind',
                               'error', x -> 'error', 'parked', v_msg,
                               'to_do', format('fix the cause, then SELECT billing.retry_request(%s) (the next claim fails it)',
                                               x ->> 'request_id')));
          RAISE WARNING 'qes_billing: Stripe request % parked: its failure could not be recorded: %',
            x ->> 'request_id', v_msg;
        END;
      END LOOP;
    END;
    -- (a few passes per claim: each takes a subtransaction id, and the
    -- rows already claimed wait for this transaction's commit)
    v_passes := v_passes + 1;
    EXIT WHEN v_n >= v_room OR v_passes >= 4;
  END LOOP;
  IF v_budget AND v_n < v_room THEN
    PERFORM billing.stripe_budget_give_back(v_room - v_n);
  END IF;
END
$$;

COMMENT ON FUNCTION billing.outbox_claim(integer) IS
  'Run by the worker: mark up to p_limit due requests in flight and return them for sending. A request that changes something in Stripe and may have reached it more than qes_billing.idempotency_window ago (first_sent_at) is failed instead (category expired: its outcome is unknown and a resend could act twice).';

-- Seconds until the next request is due (0: now; NULL: none waits), so the
-- worker sleeps exactly as long as it may.  (greatest(0, NULL) is 0, not
-- NULL: an empty queue must not read as "due now".)
CREATE OR REPLACE FUNCTION billing.outbox_next_due() RETURNS double precision
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
BEGIN
  -- and not before this database's share of the account's rate allows one
  -- (a sharded deployment's; none without a coordinator)
  RETURN (SELECT greatest(0, extract(epoch FROM d.at - now()),
                          CASE WHEN EXISTS (SELECT FROM billing.stripe_rate_budget) THEN billing.stripe_budget_wait() END
                         )::double precision
            -- (a request parked by billing.outbox_claim is never due)
            FROM (SELECT min(r.next_attempt_at) AS at FROM billing.stripe_requests r
                   WHERE r.state = 'pending' AND r.next_attempt_at < 'infinity') d
           WHERE d.at IS NOT NULL);
END
$$;

-- A request in flight whose answer can no longer come (the worker lost it:
-- an error while recording, a restart without a crash) goes back to the
-- queue after twice the request timeout.
CREATE OR REPLACE FUNCTION billing.outbox_reclaim_stale(p_timeout interval) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'pending', first_sent_at = coalesce(first_sent_at, claimed_at), claimed_at = NULL,
         next_attempt_at = now(), updated_at = now()
   WHERE state = 'in_flight' AND claimed_at < now() - 2 * p_timeout
     AND NOT billing.tenant_fenced(tenant_id);   -- its partition is moving: the target reclaims it
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n > 0 THEN
    PERFORM billing.audit('worker.reclaimed', NULL, jsonb_build_object('stripe_requests', v_n, 'stale', true));
  END IF;
  RETURN v_n;
END
$$;

-- The delay before attempt n+1.
CREATE OR REPLACE FUNCTION billing.outbox_backoff(p_attempts integer, p_retry_after text DEFAULT NULL) RETURNS interval
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_delay double precision := extract(epoch FROM billing.backoff(p_attempts,
                                                                 current_setting('qes_billing.retry_base_delay')::interval,
                                                                 current_setting('qes_billing.retry_max_delay')::interval));
BEGIN
  IF p_retry_after ~ '^\s*[0-9]{1,6}\s*$' THEN
    v_delay := greatest(v_delay, btrim(p_retry_after)::double precision);
  END IF;
  RETURN make_interval(secs => v_delay);
END
$$;

-- Recording an answer.  billing.outbox_record guards each step: a body
-- that is not JSON is kept as text, and an answer Stripe gave that cannot be
-- applied goes back to the queue (category apply) -- each in a
-- subtransaction.  The worker records a batch of answers with one call of
-- billing.outbox_record_batch, unguarded (no subtransaction per answer);
-- when anything in the batch raises, it rolls the batch back and records
-- each answer with billing.outbox_record instead (src/outbox.c), so one bad
-- answer never undoes the others and the outcome is the same either way.
CREATE OR REPLACE FUNCTION billing.outbox_succeed(r billing.stripe_requests, p_http_status integer, p_body jsonb)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'succeeded', http_status = p_http_status, response = billing.redact(p_body), error = NULL,
         updated_at = now()
   WHERE request_id = r.request_id
   RETURNING * INTO r;
  -- the row keeps the answer redacted (docs/architecture.md, rule 13); applying it
  -- sees all of it (setup stores an endpoint's signing secret in
  -- billing.stripe_secrets, the one place a secret is kept)
  r.response := p_body;
  PERFORM billing.outbox_apply(r);
  PERFORM billing.outbox_release_waiting(r);
  RETURN 'succeeded';
END
$$;

COMMENT ON FUNCTION billing.outbox_succeed(billing.stripe_requests, integer, jsonb) IS
  'A successful answer: stored redacted, applied unredacted, and the requests that waited for it released.';

CREATE OR REPLACE FUNCTION billing.outbox_record_answer(p_request_id bigint, p_attempt integer, p_http_status integer,
                                             p_body text, p_should_retry text, p_retry_after text,
                                             p_transport_error text, p_guarded boolean)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  r       billing.stripe_requests;
  v_body  jsonb;
  v_err   jsonb;
  v_msg   text;
BEGIN
  SELECT * INTO r FROM billing.stripe_requests WHERE request_id = p_request_id FOR UPDATE;
  IF NOT FOUND OR r.state <> 'in_flight' OR r.attempts <> p_attempt THEN
    RETURN NULL;   -- reclaimed meanwhile: a later attempt owns the row
  END IF;
  -- this attempt may have reached Stripe unless the worker says it never
  -- connected (src/outbox.c, QES_NOT_SENT): the key's 24 hours run from the first
  IF r.first_sent_at IS NULL AND (p_transport_error IS NULL OR p_transport_error NOT LIKE 'not sent: %') THEN
    r.first_sent_at := r.claimed_at;
    UPDATE billing.stripe_requests SET first_sent_at = r.claimed_at WHERE request_id = r.request_id;
  END IF;
  IF NOT p_guarded THEN
    v_body := p_body::jsonb;   -- not JSON: raises, and the worker records it guarded
  ELSE
    BEGIN
      v_body := p_body::jsonb;
    EXCEPTION WHEN OTHERS THEN
      v_body := jsonb_build_object('unparsed_body', left(p_body, 2000));
    END;
  END IF;

  IF p_transport_error IS NULL AND billing.outbox_accepts(r.kind, p_http_status) THEN
    IF NOT p_guarded THEN
      RETURN billing.outbox_succeed(r, p_http_status, v_body);
    END IF;
    BEGIN
      RETURN billing.outbox_succeed(r, p_http_status, v_body);
    EXCEPTION WHEN OTHERS THEN
      -- Stripe answered but we could not apply it: ask again (the same
      -- Idempotency-Key replays the same answer) after a backoff
      GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
      v_err := jsonb_build_object('category', 'apply', 'retryable', true, 'http_status', p_http_status,
                                  'message', v_msg);
    END;
  ELSE
    v_err := billing.outbox_classify(p_http_status, v_body, p_should_retry, p_transport_error);
  END IF;

  v_err := billing.redact(v_err);   -- an answer may echo our Authorization header
  -- Retried while attempts remain; and an outcome that is unknown (the
  -- request may have reached Stripe: network, 5xx, 409, an answer we could
  -- not apply) is retried with the same key for as long as Stripe keeps the
  -- key's result (qes_billing.idempotency_window, under its 24 hours), so a
  -- retry replays instead of acting twice.  Only then may it fail (and a
  -- customer or subscription is looked up before that failure stands).
  IF (v_err ->> 'retryable')::boolean
     AND (r.attempts < current_setting('qes_billing.max_attempts')::integer
          OR (v_err ->> 'category' IN ('network', 'server', 'conflict', 'apply')
              AND now() < coalesce(r.first_sent_at, r.created_at) + current_setting('qes_billing.idempotency_window')::interval)) THEN
    UPDATE billing.stripe_requests
       SET state = 'pending', http_status = p_http_status, error = v_err, claimed_at = NULL,
           next_attempt_at = now() + billing.outbox_backoff(r.attempts, p_retry_after), updated_at = now()
     WHERE request_id = r.request_id;
    RETURN 'pending';
  END IF;
  PERFORM billing.outbox_fail(r.request_id, p_http_status, v_body, v_err);
  RETURN 'failed';
END
$$;

COMMENT ON FUNCTION billing.outbox_record_answer(bigint, integer, integer, text, text, text, text, boolean) IS
  'Record one answer: succeeded and applied, back to pending with backoff, or failed. Guarded: a body that is not JSON is kept as text and an answer that cannot be applied is retried; unguarded, either raises. Returns the new state; NULL when the row was reclaimed meanwhile.';

CREATE OR REPLACE FUNCTION billing.outbox_record(p_request_id bigint, p_attempt integer, p_http_status integer,
                                      p_body text, p_should_retry text DEFAULT NULL,
                                      p_retry_after text DEFAULT NULL, p_transport_error text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  RETURN billing.outbox_record_answer(p_request_id, p_attempt, p_http_status, p_body, p_should_retry,
                                      p_retry_after, p_transport_error, true);
END
$$;

-- A batch of answers, element i of each array being one answer (the
-- worker's common path, one call per batch).  The successful answers are
-- stored in one UPDATE (one executor start, one check of the table's
-- constraints and triggers for the batch, not one per answer), then each is
-- applied as billing.outbox_succeed applies one; the others are recorded one
-- by one.  Unguarded: anything that raises undoes the whole batch, which
-- the worker then records answer by answer with billing.outbox_record.
-- Returns how many were recorded (not reclaimed meanwhile).
CREATE OR REPLACE FUNCTION billing.outbox_record_batch(p_request_ids bigint[], p_attempts integer[], p_http_status integer[],
                                            p_bodies text[], p_should_retry text[], p_retry_after text[],
                                            p_transport_errors text[])
  RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  v      record;
  r      billing.stripe_requests;
  v_done boolean[] := array_fill(false, ARRAY[coalesce(cardinality(p_request_ids), 0)]);
  v_n    integer := 0;
  -- does anything wait for one of them?  One look for the batch, taken
  -- after its UPDATE (as a release per answer would be), not a statement per
  -- answer; a request an answer's application queues to wait for one of
  -- them sees it succeeded and is released at once.
  v_waited boolean;
BEGIN
  -- (applied in the order of the arrays, the order the worker sent the
  -- requests in: of two answers about one object, the later wins)
  FOR v IN
    WITH u AS (
      UPDATE billing.stripe_requests s
         SET state = 'succeeded', http_status = a.http_status, response = billing.redact(a.body), error = NULL,
             first_sent_at = coalesce(s.first_sent_at, s.claimed_at), updated_at = now()
        FROM (SELECT x.request_id, x.attempt, x.http_status, x.body::jsonb AS body, x.ord
                FROM unnest(p_request_ids, p_attempts, p_http_status, p_bodies, p_transport_errors)
                       WITH ORDINALITY AS x(request_id, attempt, http_status, body, transport_error, ord)
               WHERE x.transport_error IS NULL) a
       WHERE s.request_id = a.request_id AND s.request_id = ANY (p_request_ids)
         -- (a value the planner does not see: the rows are found by their
         -- primary key, never by a scan of stripe_requests_in_flight, whatever
         -- the statistics say)
         AND s.state = (SELECT 'in_flight'::text)
         AND s.attempts = a.attempt AND billing.outbox_accepts(s.kind, a.http_status)
      RETURNING s AS req, a.body, a.ord)
    SELECT * FROM u ORDER BY u.ord
  LOOP
    -- as billing.outbox_succeed: stored redacted, applied as Stripe sent it
    r := v.req;
    r.response := v.body;
    PERFORM billing.outbox_apply(r);
    IF v_waited IS NULL THEN
      v_waited := EXISTS (SELECT FROM billing.stripe_requests w
                           WHERE w.after_request = ANY (p_request_ids) AND w.state = 'waiting');
    END IF;
    IF v_waited THEN
      PERFORM billing.outbox_release_waiting(r);
    END IF;
    v_done[v.ord] := true;
    v_n := v_n + 1;
  END LOOP;
  FOR i IN 1 .. coalesce(cardinality(p_request_ids), 0) LOOP
    CONTINUE WHEN v_done[i];
    IF billing.outbox_record_answer(p_request_ids[i], p_attempts[i], p_http_status[i], p_bodies[i],
                                    p_should_retry[i], p_retry_after[i], p_transport_errors[i], false) IS NOT NULL THEN
      v_n := v_n + 1;
    END IF;
  END LOOP;
  RETURN v_n;
END
$$;

COMMENT ON FUNCTION billing.outbox_record_batch(bigint[], integer[], integer[], text[], text[], text[], text[]) IS
  'Run by the worker: record a batch of answers in one call, unguarded (an error undoes the batch; the worker then records each with billing.outbox_record). Returns how many were recorded.';

-- A final failure, and everything that waited for it.
CREATE OR REPLACE FUNCTION billing.outbox_fail(p_request_id bigint, p_http_status integer, p_body jsonb, p_err jsonb)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  r      billing.stripe_requests;
  w      bigint;
  v_kind text;
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'failed', http_status = p_http_status, response = billing.redact(p_body),
         error = billing.redact(p_err) || jsonb_build_object('attempts', attempts), claimed_at = NULL, updated_at = now()
   WHERE request_id = p_request_id
   RETURNING * INTO r;
  PERFORM billing.outbox_apply_failure(r);
  PERFORM billing.audit('stripe.request_failed', r.tenant_id,
                        jsonb_build_object('request_id', r.request_id, 'kind', r.kind, 'error', r.error));
  FOR w, v_kind IN SELECT c.request_id, c.kind FROM billing.stripe_requests c
                    WHERE c.after_request = p_request_id AND c.state = 'waiting' LOOP
    IF r.kind = 'tax_exempt.update' AND v_kind = 'tax_exempt.update' THEN
      -- a chain for order only (billing.tax_exempt_send, 91_tax.sql): the
      -- newer decision goes out whatever became of the older one, which
      -- may have reached Stripe before it failed
      UPDATE billing.stripe_requests SET state = 'pending', next_attempt_at = now(), updated_at = now()
       WHERE request_id = w;
      CONTINUE;
    END IF;
    PERFORM billing.outbox_fail(w, NULL, NULL,
                                jsonb_build_object('category', 'dependency', 'retryable', false,
                                                   'message', format('request %s (%s) failed: %s', r.request_id,
                                                                     r.kind, r.error ->> 'message')));
  END LOOP;
END
$$;

COMMENT ON FUNCTION billing.outbox_fail(bigint, integer, jsonb, jsonb) IS
  'Mark a request failed for good, undo what its caller started, audit it, and fail the requests that waited for it (a tax_exempt.update waiting for an older one, for order only, is released instead).';

CREATE OR REPLACE FUNCTION billing.outbox_release_waiting(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  UPDATE billing.stripe_requests c
     SET state = 'pending', next_attempt_at = now(), updated_at = now(),
         params = CASE WHEN c.inherit IS NULL THEN c.params
                       ELSE c.params || jsonb_build_object(c.inherit, r.response ->> 'id') END
   WHERE c.after_request = r.request_id AND c.state = 'waiting';
END
$$;

-- The Stripe time a response speaks for: when we sent the request, on the
-- billing clock (the real clock in production; moved with it in a test or
-- demo, as Stripe's times are there).  A webhook event created later (a
-- later state) still wins; one created before does not.  A POST is answered
-- under its Idempotency-Key with the body of the FIRST attempt that reached
-- Stripe, whenever the retry that gets it goes out: its answer speaks for
-- that first attempt (first_sent_at), never for the retry, or a body lost
-- once and replayed later would overwrite a state a webhook brought in
-- between (docs/architecture.md, "Mirroring Stripe" and "Unknown
-- outcomes").  A GET or a DELETE is not replayed (Stripe ignores their
-- keys): its answer is the state when this attempt was sent (claimed_at).
CREATE OR REPLACE FUNCTION billing.outbox_state_at(r billing.stripe_requests) RETURNS timestamptz
  LANGUAGE sql STABLE
RETURN date_trunc('second', coalesce(CASE WHEN r.method = 'POST' THEN r.first_sent_at END, r.claimed_at, r.updated_at)
                            + (billing.now() - pg_catalog.now()));

COMMENT ON FUNCTION billing.outbox_state_at(billing.stripe_requests) IS
  'The Stripe time an answer speaks for, on the billing clock: a POST''s first attempt that may have reached Stripe (first_sent_at: a retry replays that attempt''s answer), else the attempt answered (claimed_at).';

-- Success: what the answer means for local state.
CREATE OR REPLACE FUNCTION billing.outbox_apply(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  o      jsonb := r.response;
  v_sub  bigint := (r.subject ->> 'subscription_id')::bigint;
  v_secret text;
BEGIN
  CASE
  WHEN r.kind = 'customer.create' THEN
    UPDATE billing.tenants SET stripe_customer_id = o ->> 'id', updated_at = now()
     WHERE tenant_id = r.tenant_id AND stripe_customer_id IS NULL;
    PERFORM billing.audit('customer.created', r.tenant_id, jsonb_build_object('customer', o ->> 'id'));
    PERFORM billing.billing_details_send(r.tenant_id);   -- details given before the customer (91_tax.sql)
  WHEN r.kind IN ('subscription.create', 'subscription.update', 'subscription.refresh') THEN
    IF v_sub IS NOT NULL THEN
      UPDATE billing.subscriptions SET stripe_subscription_id = o ->> 'id'
       WHERE tenant_id = r.tenant_id AND subscription_id = v_sub AND stripe_subscription_id IS NULL;
    END IF;
    PERFORM billing.apply_subscription(r.tenant_id, o, billing.outbox_state_at(r), o ->> 'status' = 'canceled');
    UPDATE billing.subscriptions s
       SET stripe_item_id = coalesce(billing.base_item_of(o), s.stripe_item_id),
           metered_items = billing.metered_items_of(o),
           client_secret = CASE WHEN s.status = 'incomplete'
                                THEN coalesce(o -> 'latest_invoice' -> 'payment_intent' ->> 'client_secret',
                                              o -> 'latest_invoice' -> 'confirmation_secret' ->> 'client_secret',
                                              s.client_secret) END,
           pending_change = CASE WHEN r.kind = 'subscription.update' THEN NULL ELSE s.pending_change END,
           last_error = CASE WHEN r.kind = 'subscription.refresh' THEN s.last_error END,
           updated_at = now()
     WHERE s.stripe_subscription_id = o ->> 'id';
    IF r.kind <> 'subscription.refresh' THEN
      PERFORM billing.audit(CASE r.kind WHEN 'subscription.create' THEN 'subscription.created'
                                        ELSE 'subscription.changed' END, r.tenant_id,
                            jsonb_build_object('subscription', o ->> 'id', 'status', o ->> 'status',
                                               'price', billing.base_item(o) -> 'price' ->> 'id',
                                               'cancel_at_period_end', o -> 'cancel_at_period_end'));
    END IF;
  WHEN r.kind = 'payment_intent.create' THEN
    -- link the row, then mirror the answer as an event would (newer state wins)
    UPDATE billing.payments p SET stripe_payment_intent_id = o ->> 'id', client_secret = o ->> 'client_secret'
     WHERE p.tenant_id = r.tenant_id AND p.payment_id = (r.subject ->> 'payment_id')::bigint;
    PERFORM billing.apply_payment(r.tenant_id, o, billing.outbox_state_at(r), o ->> 'status');
    PERFORM billing.audit('payment_intent.created', r.tenant_id,
                          jsonb_build_object('payment_id', (r.subject ->> 'payment_id')::bigint,
                                             'payment_intent', o ->> 'id', 'status', o ->> 'status'));
  WHEN r.kind LIKE 'setup.%' THEN
    PERFORM billing.setup_apply(r);
  WHEN r.kind LIKE 'dispute.%' THEN
    PERFORM billing.dispute_apply_answer(r);   -- evidence staged or submitted (94_disputes.sql)
  WHEN r.kind IN ('billing_details.update', 'tax_id.create') THEN
    PERFORM billing.billing_details_apply(r);  -- tax (91_tax.sql)
  WHEN r.kind IN ('tax.calculation', 'tax.transaction') THEN
    PERFORM billing.tax_calculation_apply(r);
  WHEN r.kind LIKE 'meter.%' THEN
    PERFORM billing.meter_apply(r);    -- usage billed through meters (94_meters.sql)
  ELSE
    NULL;   -- a request whose answer changes nothing local (it is kept on the row)
  END CASE;
END
$$;

-- Final failure: undo what the caller started, and say why where the tenant sees it.
CREATE OR REPLACE FUNCTION billing.outbox_apply_failure(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_sub bigint := (r.subject ->> 'subscription_id')::bigint;
BEGIN
  CASE
  WHEN r.kind = 'subscription.create' THEN
    UPDATE billing.subscriptions SET status = 'incomplete_expired', last_error = r.error, client_secret = NULL,
                                     updated_at = now()
     WHERE tenant_id = r.tenant_id AND subscription_id = v_sub AND stripe_subscription_id IS NULL;
  WHEN r.kind = 'subscription.update' THEN
    -- the plan and its limits stay where they were
    UPDATE billing.subscriptions SET pending_change = NULL, last_error = r.error, updated_at = now()
     WHERE tenant_id = r.tenant_id AND subscription_id = v_sub;
  WHEN r.kind = 'payment_intent.create' THEN
    UPDATE billing.payments
       SET status = 'failed', failure_code = coalesce(r.error ->> 'decline_code', r.error ->> 'code', r.error ->> 'category'),
           failure_message = r.error ->> 'message', updated_at = now()
     WHERE tenant_id = r.tenant_id AND payment_id = (r.subject ->> 'payment_id')::bigint;
  WHEN r.kind LIKE 'dispute.%' THEN
    PERFORM billing.dispute_apply_failure(r);
  WHEN r.kind IN ('billing_details.update', 'tax_id.create') THEN
    PERFORM billing.billing_details_failure(r);
  WHEN r.kind LIKE 'meter.%' THEN
    PERFORM billing.meter_apply_failure(r);    -- 94_meters.sql
  ELSE
    NULL;
  END CASE;
END
$$;

-- An operator may send a failed request again.  A request whose outcome was
-- unknown keeps its Idempotency-Key (Stripe replays what it did); one that
-- Stripe refused (a card decline, an invalid request) gets a new key, since
-- Stripe would replay the stored refusal for 24 hours.  A request that may
-- have reached Stripe longer ago than Stripe keeps its key could act twice
-- if sent again (a second customer, subscription or charge): refused unless
-- the lookup found that Stripe never made its object, or the operator, who
-- checked in Stripe, says force; then it goes with a new key.  One whose
-- object the lookup found needs nothing.
CREATE OR REPLACE FUNCTION billing.retry_request(p_request_id bigint, force boolean DEFAULT false) RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  r         billing.stripe_requests;
  v_force   boolean := coalesce(force, false);
  v_refused boolean;
  v_stale   boolean;
  v_new_key boolean;
  v_event   billing.meter_events;
BEGIN
  SELECT * INTO r FROM billing.stripe_requests WHERE request_id = p_request_id FOR UPDATE;
  -- parked by billing.outbox_claim (its failure could not be recorded):
  -- made due, so that the next claim fails it now that the cause is fixed
  IF FOUND AND r.state = 'pending' AND r.next_attempt_at = 'infinity' THEN
    UPDATE billing.stripe_requests SET next_attempt_at = now(), updated_at = now() WHERE request_id = p_request_id;
    PERFORM billing.audit('stripe.request_retried', r.tenant_id,
                          jsonb_build_object('request_id', p_request_id, 'parked', true));
    RETURN;
  END IF;
  IF NOT FOUND OR r.state <> 'failed' THEN
    RAISE EXCEPTION 'no failed outbox request %', p_request_id
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'List them with: SELECT request_id, kind, error FROM billing.stripe_requests WHERE state = ''failed''.';
  END IF;
  IF r.error -> 'resolved' ->> 'found' = 'true' THEN
    RAISE EXCEPTION 'outbox request % needs no retry: Stripe made its object (%)', p_request_id,
                    r.error -> 'resolved' ->> 'object'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = 'The lookup after its unknown outcome found the object and linked it (audited as stripe.request_resolved).';
  END IF;
  -- a request that failed because the one it waited for failed is not sent
  -- on its own (it would go without what it inherits, and its caller has
  -- undone what it started: the tenant starts again once the first is fixed)
  IF r.error ->> 'category' = 'dependency' THEN
    RAISE EXCEPTION 'outbox request % is not retried on its own: it failed because request % failed',
                    p_request_id, r.after_request
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = format('Retry request %s; what waited for it is started again by its caller (the tenant''s create_subscription).',
                          r.after_request);
  END IF;
  -- a definite refusal (Stripe did nothing; a 401 or 403 is not one: Stripe
  -- checks the API key before the Idempotency-Key, so an earlier attempt may
  -- have acted) gets a new key; any other outcome may have happened
  v_refused := r.error ->> 'category' IN ('card', 'invalid_request', 'not_found');
  v_stale := coalesce(r.method <> 'GET'
                      AND r.first_sent_at <= now() - current_setting('qes_billing.idempotency_window')::interval, false);
  IF NOT v_refused AND v_stale AND NOT v_force AND r.error -> 'resolved' ->> 'found' IS DISTINCT FROM 'false' THEN
    RAISE EXCEPTION 'outbox request % may have reached Stripe longer ago than Stripe keeps its Idempotency-Key (qes_billing.idempotency_window %)',
                    p_request_id, current_setting('qes_billing.idempotency_window')
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = format('Its %s may have happened in Stripe (the request''s first_sent_at says when it first went out); sent again now, it could happen twice: a second customer, subscription or charge.',
                            r.kind),
            HINT = format('Check in Stripe that it did not happen, then: SELECT billing.retry_request(%s, force => true).',
                          p_request_id);
  END IF;
  -- a meter event goes back to queued with its request (so that void_usage
  -- waits for the answer instead of cancelling it here, and the answer
  -- marks it delivered); one cancelled meanwhile is not sent again
  -- (the event by the request's subject: a re-send by reconciliation
  -- moves meter_events.request_id to a newer request)
  IF r.kind = 'meter.event' THEN
    SELECT * INTO v_event FROM billing.meter_events e
     WHERE e.tenant_id = r.tenant_id AND e.meter_event_id = (r.subject ->> 'meter_event_id')::bigint
       FOR UPDATE;
    IF NOT FOUND OR v_event.state <> 'failed' OR v_event.request_id <> p_request_id
       OR v_event.cancel_request_id IS NOT NULL
       OR (SELECT count(*) FROM billing.meter_event_usage x
            WHERE x.tenant_id = v_event.tenant_id AND x.meter_event_id = v_event.meter_event_id) <> v_event.usage_rows THEN
      RAISE EXCEPTION 'outbox request % sends meter event % as it no longer stands', p_request_id,
                      coalesce(v_event.meter_event_id::text, r.subject ->> 'meter_event_id')
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = format('The event is %s%s: sent again, this request would bill what it held when it was made.',
                              coalesce(v_event.state, 'gone'),
                              CASE WHEN v_event.request_id IS DISTINCT FROM p_request_id
                                   THEN format(', sent since by request %s', v_event.request_id)
                                   WHEN v_event.cancel_request_id IS NOT NULL THEN ', a row of it voided'
                                   ELSE '' END),
              HINT = 'Nothing to retry; reconciliation (billing.meter_reconcile) sends what Stripe lacks.';
    END IF;
    UPDATE billing.meter_events SET state = 'queued', last_error = NULL
     WHERE tenant_id = v_event.tenant_id AND meter_event_id = v_event.meter_event_id;
  ELSIF r.kind = 'meter.cancel' THEN
    -- a cancellation sent again: its answer is applied to the event again
    UPDATE billing.meter_events SET state = 'cancel_queued'
     WHERE cancel_request_id = p_request_id AND state IN ('failed', 'delivered');
  ELSIF r.kind = 'tax_exempt.update' AND EXISTS (
          SELECT 1 FROM billing.stripe_requests x
           WHERE x.tenant_id = r.tenant_id AND x.kind = 'tax_exempt.update' AND x.path = r.path
             AND x.request_id > p_request_id) THEN
    -- a newer decision about the customer's tax_exempt exists: sending this
    -- one again would make Stripe keep the older (91_tax.sql, tax_exempt_send)
    RAISE EXCEPTION 'outbox request % is a tax_exempt decision a newer one replaced', p_request_id
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = 'Sent again, it would go out after the newer decision and Stripe would keep this older one.',
            HINT = format('Look at the newer one: SELECT request_id, params, state FROM billing.stripe_requests WHERE kind = ''tax_exempt.update'' AND path = %L ORDER BY request_id.',
                          r.path);
  END IF;
  -- the same key while Stripe keeps its result; else a new one (first_sent_at starts again)
  v_new_key := v_refused OR v_stale;
  UPDATE billing.stripe_requests
     SET state = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now(),
         idempotency_key = CASE WHEN v_new_key THEN 'qes-' || gen_random_uuid() ELSE idempotency_key END,
         first_sent_at = CASE WHEN v_new_key THEN NULL ELSE first_sent_at END
   WHERE request_id = p_request_id;
  PERFORM billing.audit('stripe.request_retried', r.tenant_id,
                        jsonb_build_object('request_id', p_request_id, 'new_idempotency_key', v_new_key,
                                           'forced', v_force AND NOT v_refused AND v_stale));
END
$$;

COMMENT ON FUNCTION billing.retry_request(bigint, boolean) IS
  'Send a failed outbox request again: with its original Idempotency-Key unless Stripe definitely refused it (a card decline, an invalid request, not found: a new key, since Stripe would replay the refusal); one that failed because the request it waited for failed is not retried on its own. One that may have reached Stripe longer ago than Stripe keeps its key is refused unless the lookup found Stripe never made its object or force is given (the operator checked in Stripe), and then gets a new key; one whose object was found needs no retry. A request parked because its failure could not be recorded is made due (the next claim fails it). Audited.';

-- The Stripe account's rate, shared (docs/scaleout.md, "Stripe's account
-- limits").  Stripe limits requests per account (about 100/s live, 25/s in
-- test mode).  One database alone keeps under it with the worker's token
-- bucket (qes_billing.max_requests_per_second, src/outbox.c).  When several
-- databases send for one account -- the shards of a sharded qes_billing --
-- a coordinator (the router's router.stripe_rebalance) gives each its share
-- of the account's rate, here, and the claim takes no more than the share
-- allows: a token bucket in this row, refilled at `rate` per second, a
-- tenth of a second's worth at most.  No row: no share, the worker's own
-- limit alone.  A share that is not renewed by expires_at falls back to
-- fallback_rate (the share the coordinator would give if every database
-- were busy), so a coordinator that stops never lets the sum pass the
-- account's rate.  slow_until: a 429 seen by any database holds every one
-- back until then.

CREATE TABLE billing.stripe_rate_budget (
  one_row       boolean PRIMARY KEY DEFAULT true CHECK (one_row),
  rate          double precision NOT NULL CHECK (rate >= 0),
  fallback_rate double precision NOT NULL CHECK (fallback_rate >= 0),
  expires_at    timestamptz NOT NULL,
  slow_until    timestamptz,
  tokens        double precision NOT NULL DEFAULT 0,
  refilled_at   timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
  set_by        text,
  updated_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);

COMMENT ON TABLE billing.stripe_rate_budget IS
  'This database''s share of the Stripe account''s request rate, set by a coordinator when several databases send for one account (the shards of a sharded qes_billing): requests per second, until expires_at (then fallback_rate), held back until slow_until after a 429. No row: the worker''s own qes_billing.max_requests_per_second alone.';

-- The rate in force now, or NULL (no share set).
CREATE OR REPLACE FUNCTION billing.stripe_budget_rate(b billing.stripe_rate_budget) RETURNS double precision
  LANGUAGE sql STABLE
  RETURN CASE WHEN b.one_row IS NULL THEN NULL
              WHEN pg_catalog.clock_timestamp() > b.expires_at THEN b.fallback_rate ELSE b.rate END;

COMMENT ON FUNCTION billing.stripe_budget_rate(billing.stripe_rate_budget) IS
  'The share in force: rate, or fallback_rate once expires_at has passed; NULL without a share.';

-- Take up to p_want tokens for a claim (the claim gives back what it did
-- not use).  Without a share, p_want: the row is only read, never locked.
CREATE OR REPLACE FUNCTION billing.stripe_budget_take(p_want integer) RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  b      billing.stripe_rate_budget;
  v_rate double precision;
  v_now  timestamptz := clock_timestamp();
  v_tok  double precision;
  v_n    integer;
BEGIN
  IF NOT EXISTS (SELECT FROM billing.stripe_rate_budget) THEN
    RETURN p_want;
  END IF;
  SELECT * INTO b FROM billing.stripe_rate_budget FOR UPDATE;
  v_rate := billing.stripe_budget_rate(b);
  v_tok := least(greatest(1, v_rate / 10),
                 b.tokens + greatest(extract(epoch FROM v_now - b.refilled_at), 0) * v_rate);
  v_n := CASE WHEN b.slow_until > v_now THEN 0 ELSE least(p_want, floor(v_tok)::integer) END;
  UPDATE billing.stripe_rate_budget SET tokens = v_tok - v_n, refilled_at = v_now;
  RETURN v_n;
END
$$;

COMMENT ON FUNCTION billing.stripe_budget_take(integer) IS
  'Run by the claim: how many of p_want requests this database''s share of the Stripe account''s rate lets it send now (all of them without a share).';

-- (PL/pgSQL: its plan is kept for the worker's session; a SQL function
-- with SET clauses is planned again at every call)
CREATE OR REPLACE FUNCTION billing.stripe_budget_give_back(p_unused integer) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  UPDATE billing.stripe_rate_budget SET tokens = tokens + p_unused WHERE p_unused > 0;
END
$$;

COMMENT ON FUNCTION billing.stripe_budget_give_back(integer) IS
  'Return the tokens a claim took and did not use.';

-- Seconds until the share lets one more request go (0: now or no share).
CREATE OR REPLACE FUNCTION billing.stripe_budget_wait() RETURNS double precision
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  b      billing.stripe_rate_budget;
  v_rate double precision;
  v_now  timestamptz := clock_timestamp();
  v_tok  double precision;
BEGIN
  SELECT * INTO b FROM billing.stripe_rate_budget;
  IF NOT FOUND THEN
    RETURN 0;
  END IF;
  v_rate := billing.stripe_budget_rate(b);
  IF b.slow_until > v_now THEN
    RETURN extract(epoch FROM b.slow_until - v_now);
  END IF;
  v_tok := b.tokens + greatest(extract(epoch FROM v_now - b.refilled_at), 0) * v_rate;
  IF v_tok >= 1 THEN
    RETURN 0;
  END IF;
  -- a share of 0 (a coordinator gave it nothing): look again at its renewal
  RETURN CASE WHEN v_rate > 0 THEN (1 - v_tok) / v_rate
              ELSE greatest(extract(epoch FROM b.expires_at - v_now), 0.1) END;
END
$$;

COMMENT ON FUNCTION billing.stripe_budget_wait() IS
  'Seconds until this database''s share of the Stripe account''s rate lets one more request go (0: now, or no share).';

SELECT pg_catalog.pg_extension_config_dump('billing.stripe_rate_budget', '');

-- Setup of the Stripe account through the outbox: the products and prices
-- of the paid plans, and the webhook endpoint.  The qes_billing_setup
-- command (src/qes_billing_setup) calls billing.setup_*() and waits for the
-- run's requests.  Everything is found again before it is created (stable
-- product ids qes_<plan>, price lookup_keys, the endpoint's URL), so a
-- second run creates nothing.

CREATE OR REPLACE FUNCTION billing.webhook_event_types() RETURNS text[]
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

-- --setup-webhook, and --setup-backup-webhook URL: a second endpoint (for
-- instance a second PostgREST in another zone) subscribed to the same
-- events, with its own signing secret kept beside the first's.  Stripe
-- delivers every event to both; the inbox stores it once (its Stripe id).
CREATE OR REPLACE FUNCTION billing.setup_webhook(p_run text, p_url text DEFAULT NULL) RETURNS bigint
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
CREATE OR REPLACE FUNCTION billing.setup_apply(r billing.stripe_requests) RETURNS void
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

-- Several webhook endpoints (a primary and a backup, e.g. a second
-- PostgREST in another zone): each endpoint's signing secret is kept in
-- billing.stripe_secrets under its Stripe id, and a delivery is accepted when
-- it is signed with any of them (billing.stored_webhook_secrets).  Stripe
-- sends every event to every endpoint; the inbox keeps one row per event id
-- whichever endpoint delivered it first.  Rotating one endpoint's secret
-- replaces that endpoint's row only.

CREATE VIEW billing.webhook_endpoints AS
SELECT s.mode, s.endpoint, s.url, s.created_at AS secret_since,
       s.url IS NOT DISTINCT FROM billing.webhook_endpoint_url() AS is_primary
  FROM billing.stripe_secrets s
 WHERE s.kind = 'webhook';

COMMENT ON VIEW billing.webhook_endpoints IS
  'The webhook endpoints whose signing secrets are kept (never the secret): mode, Stripe id, URL, since when the secret is in use, and whether it is the primary (QES_BASE_URL''s).';

-- An endpoint's secret was rolled (Stripe's Dashboard shows the new one;
-- while the old one has not expired Stripe signs with both, so the new one
-- alone verifies every delivery).  Superusers only, like the table.
CREATE OR REPLACE FUNCTION billing.set_webhook_secret(p_endpoint text, p_secret text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_mode text := billing.stripe_mode();
BEGIN
  IF p_secret IS NULL OR p_secret !~ '^whsec_[A-Za-z0-9]{8,}$' THEN
    RAISE EXCEPTION 'not a webhook signing secret'
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A signing secret starts with whsec_ (Stripe''s Dashboard, the endpoint''s "Signing secret").';
  END IF;
  UPDATE billing.stripe_secrets SET secret = p_secret, created_at = now()
   WHERE mode = v_mode AND kind = 'webhook' AND endpoint = p_endpoint;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no webhook endpoint % is kept in % mode', coalesce(p_endpoint, 'NULL'), v_mode
      USING ERRCODE = 'no_data_found',
            HINT = 'List them with SELECT * FROM billing.webhook_endpoints; qes_billing_setup --setup-webhook or --setup-backup-webhook URL makes one.';
  END IF;
  PERFORM billing.audit('webhook.secret_rotated', NULL, jsonb_build_object('endpoint', p_endpoint, 'mode', v_mode));
END
$$;

COMMENT ON FUNCTION billing.set_webhook_secret(text, text) IS
  'Replace one webhook endpoint''s signing secret (after rolling it in Stripe); the other endpoints'' secrets stay. Audited without the secret. Superusers only.';

-- Delivering billing.notifications: email over SMTP and a signed webhook to
-- the platform, sent by the worker through libcurl (src/notify.c).  The
-- protocol is the outbox's (docs/architecture.md, "One notification"):
--
--   billing.notify_claim()   the worker claims due rows (FOR UPDATE SKIP
--                            LOCKED): each is checked (one that no longer
--                            applies is skipped with its reason), rendered,
--                            marked in_flight; COMMIT; only then is it sent
--   billing.notify_record()  each channel's outcome, in a new transaction:
--                            sent when every channel delivered, else back
--                            to pending with backoff, or failed (audited)
--                            after qes_billing.notify_max_attempts or a
--                            permanent refusal (SMTP 5xx)
--
-- Delivery is at least once: a crash between sending and recording sends
-- again, with the same event_id (the webhook's "id" and QES-Event-Id, the
-- email's Message-ID and X-QES-Event-Id), so receivers can deduplicate.  A
-- channel that delivered is never sent again for the notification.
--
-- Where notifications are queued: usage thresholds (src/usage.c), trial
-- ending and the operator's dispute alert (85_events.sql), payment failed
-- and payment recovered (billing.sync_invoice_failure, 85_events.sql: once
-- per invoice, decided from Stripe's times), grace ended
-- (billing.notify_timers, below).
--
-- What a notification says must hold as Stripe has it when it goes out,
-- not only as the mirror has it (docs/architecture.md, "Mirroring Stripe"):
-- one about a subscription whose mirrored state is older than the moment it
-- is about -- a grace period's end, a trial about to end, learnt from late
-- or replayed events -- waits for one GET of the subscription first
-- (billing.notify_checked, verify_requests), so that events the mirror has
-- not had yet cannot make what the tenant is told depend on their order.

-- ---- formatting ----------------------------------------------------------

-- An amount in the smallest unit of its currency, as people read it.
CREATE OR REPLACE FUNCTION billing.notify_money(p_amount bigint, p_currency text) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN CASE WHEN p_amount IS NULL OR p_currency IS NULL THEN NULL
            WHEN lower(p_currency) IN ('bif', 'clp', 'djf', 'gnf', 'jpy', 'kmf', 'krw', 'mga', 'pyg', 'rwf',
                                       'ugx', 'vnd', 'vuv', 'xaf', 'xof', 'xpf')
              THEN upper(p_currency) || ' ' || to_char(p_amount, 'FM999,999,999,999,990')
            ELSE upper(p_currency) || ' ' || to_char(p_amount / 100.0, 'FM999,999,999,999,990.00') END;

COMMENT ON FUNCTION billing.notify_money(bigint, text) IS
  'An amount in the smallest currency unit as text, e.g. USD 29.00 (zero-decimal currencies without decimals).';

CREATE OR REPLACE FUNCTION billing.notify_utc(p_at timestamptz) RETURNS text
  LANGUAGE sql STABLE
RETURN to_char(p_at AT TIME ZONE 'UTC', 'FMDD FMMonth YYYY, HH24:MI "UTC"');

COMMENT ON FUNCTION billing.notify_utc(timestamptz) IS 'A time as notifications show it, in UTC.';

CREATE OR REPLACE FUNCTION billing.notify_html(p text) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN replace(replace(replace(replace(replace(p, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'), '"', '&quot;'), '''', '&#39;');

COMMENT ON FUNCTION billing.notify_html(text) IS 'Text escaped for HTML.';

-- A quantity of a metric: storage in bytes as a size, counters as numbers.
CREATE OR REPLACE FUNCTION billing.notify_quantity(p_metric text, p_quantity bigint) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
RETURN CASE WHEN p_quantity IS NULL THEN 'unlimited'
            WHEN (SELECT m.unit FROM billing.metrics m WHERE m.metric = p_metric) = 'byte'
              THEN pg_size_pretty(p_quantity)
            ELSE to_char(p_quantity, 'FM999,999,999,999,999,990') END;

CREATE OR REPLACE FUNCTION billing.notify_metric_label(p_metric text) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
RETURN CASE p_metric WHEN 'api_calls' THEN 'API calls' WHEN 'storage' THEN 'storage'
                     ELSE coalesce((SELECT m.unit || 's' FROM billing.metrics m WHERE m.metric = p_metric), p_metric) END;

-- A plan's limits in one line: "10 signatures, 50 documents, 1,000 API calls, 1024 MB storage".
CREATE OR REPLACE FUNCTION billing.notify_plan_limits(p_plan text) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT string_agg(billing.notify_quantity(l.metric, l.soft_limit) || ' ' || billing.notify_metric_label(l.metric),
                    ', ' ORDER BY m.kind, l.metric DESC)
    FROM billing.plan_limits l JOIN billing.metrics m USING (metric)
   WHERE l.plan_id = p_plan
$$;

-- ---- templates -----------------------------------------------------------

-- The template of each kind: subject, headline, paragraphs (what happened,
-- what it means for the limits, what to do) and an action, with
-- {{placeholders}} filled from billing.notify_vars().  Both parts of the
-- email and the webhook's text are rendered from it.
CREATE OR REPLACE FUNCTION billing.notify_template(p_kind text) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN CASE p_kind
  WHEN 'usage.threshold' THEN jsonb_build_object(
    'subject', '{{percent}} % of your {{metric_label}} used ({{plan_name}} plan)',
    'headline', 'You have used {{percent}} % of the {{metric_label}} in your plan',
    'paragraphs', jsonb_build_array(
      '{{tenant_name}} has used {{used}} of the {{limit}} {{metric_label}} included in the {{plan_name}} plan in the billing period from {{period_start}} to {{period_end}}.',
      '{{meaning}}',
      '{{todo}}'),
    'action', '{{action_label}}')
  WHEN 'payment.failed' THEN jsonb_build_object(
    'subject', 'Payment of {{amount}} failed{{subject_deadline}}',
    'headline', 'We could not collect your payment',
    'paragraphs', jsonb_build_array(
      'The payment of {{amount}} for invoice {{invoice_number}} of {{tenant_name}} failed.',
      '{{meaning}}',
      'Please pay the invoice or update your payment method{{todo_deadline}}.'),
    'action', 'Pay invoice {{invoice_number}}')
  WHEN 'grace.ended' THEN jsonb_build_object(
    'subject', 'Your grace period has ended: Free plan limits apply',
    'headline', 'Your account now has the Free plan''s limits',
    'paragraphs', jsonb_build_array(
      'The grace period after the failed payment of {{amount}} for invoice {{invoice_number}} ended on {{grace_until}}, and the invoice is still unpaid.',
      'The {{plan_name}} limits no longer apply to {{tenant_name}}: from now on the Free plan''s limits do ({{free_limits}} per period). Usage above them is reported as over the limit.',
      'Pay the open invoice to have the {{plan_name}} limits back at once.'),
    'action', 'Pay invoice {{invoice_number}}')
  WHEN 'payment.recovered' THEN jsonb_build_object(
    'subject', 'Payment received: your {{plan_name}} plan is fully restored',
    'headline', 'Thank you: your payment went through',
    'paragraphs', jsonb_build_array(
      'We received {{amount}} for invoice {{invoice_number}} of {{tenant_name}}.',
      'The {{plan_name}} limits apply again: {{plan_limits}} per period.',
      'Nothing else to do.'),
    'action', 'View your invoices')
  WHEN 'subscription.trial_will_end' THEN jsonb_build_object(
    'subject', 'Your {{plan_name}} trial ends on {{trial_end}}',
    'headline', 'Your trial ends soon',
    'paragraphs', jsonb_build_array(
      'The {{plan_name}} trial of {{tenant_name}} ends on {{trial_end}}.',
      'After it the subscription goes on at {{price}} per {{interval}} and keeps the {{plan_name}} limits ({{plan_limits}} per period). If the first payment fails, they stay for a grace period, then the Free plan''s limits apply ({{free_limits}}).',
      'Check your payment method before {{trial_end}}, or cancel the subscription to stay on the Free plan.'),
    'action', 'Manage your subscription')
  WHEN 'dispute.created' THEN jsonb_build_object(
    'subject', '[QES billing] Dispute of {{amount}} by tenant {{tenant_id}}',
    'headline', 'A payment was disputed',
    'paragraphs', jsonb_build_array(
      'Tenant {{tenant_name}} ({{tenant_id}}) disputed a card payment of {{amount}} (dispute {{dispute}}, charge {{charge}}, reason: {{reason}}).',
      'The tenant''s limits are unchanged; the tenant is flagged as disputed. Stripe holds the amount and the dispute fee until the dispute is decided.',
      'Respond with evidence in the Stripe Dashboard before the deadline Stripe shows.'),
    'action', 'Open the dispute in Stripe')
  ELSE jsonb_build_object(
    'subject', 'Billing notice: {{kind}}',
    'headline', 'Billing notice: {{kind}}',
    'paragraphs', jsonb_build_array('{{payload}}'),
    'action', 'Open billing')
END;

COMMENT ON FUNCTION billing.notify_template(text) IS
  'The template of a notification kind: subject, headline, paragraphs (what happened, what it means for the limits, what to do), action.';

-- Fill {{name}} placeholders in one pass (a value is never read as a
-- template); unknown names become empty.  p_html escapes the values.
CREATE OR REPLACE FUNCTION billing.notify_fill(p_template text, p_vars jsonb, p_html boolean DEFAULT false) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(string_agg(CASE WHEN t.n % 2 = 1 THEN CASE WHEN p_html THEN billing.notify_html(t.part) ELSE t.part END
                                  WHEN p_html THEN billing.notify_html(coalesce(p_vars ->> t.part, ''))
                                  ELSE coalesce(p_vars ->> t.part, '') END, '' ORDER BY t.n), '')
    FROM regexp_split_to_table(p_template, '\{\{|\}\}') WITH ORDINALITY AS t(part, n)
$$;

-- ---- what a notification says, and whether it still applies -------------

-- Does the mirror vouch for an object's state (a subscription, an invoice)
-- as of p_as_of?  NULL: yes -- its state is as of then, or fresh, or Stripe
-- was asked for it (once per notification and object): what the answer
-- mirrored, or the mirror's own when there was none.  {"verify": {object,
-- id}}: ask Stripe first; {"defer": reason}: the answer is on its way;
-- {"skip": reason}: Stripe has no such object.
CREATE OR REPLACE FUNCTION billing.notify_checked(n billing.notifications, p_object text, p_id text,
                                       p_state_at timestamptz, p_as_of timestamptz) RETURNS jsonb
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  r billing.stripe_requests;
BEGIN
  IF p_state_at >= least(p_as_of, billing.now() - billing.fresh_within())
     OR p_id IS NULL OR p_id !~ '^[a-z]{2,4}_[A-Za-z0-9_]+$' THEN
    RETURN NULL;   -- vouched for, or nothing Stripe could be asked about
  END IF;
  SELECT * INTO r FROM billing.stripe_requests x
   WHERE x.request_id = ANY (n.verify_requests)
     AND x.path = CASE p_object WHEN 'subscription' THEN '/v1/subscriptions/' ELSE '/v1/invoices/' END || p_id
   ORDER BY x.request_id DESC LIMIT 1;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('verify', jsonb_build_object('object', p_object, 'id', p_id));
  END IF;
  IF r.state NOT IN ('succeeded', 'failed') THEN
    RETURN jsonb_build_object('defer', format('waiting for Stripe''s answer about %s', p_id));
  END IF;
  IF r.state = 'succeeded' AND r.http_status = 404 THEN
    RETURN jsonb_build_object('skip', format('Stripe has no %s %s', p_object, p_id));
  END IF;
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.notify_checked(billing.notifications, text, text, timestamptz, timestamptz) IS
  'Whether the mirror vouches for an object''s state as of a moment (NULL), or Stripe must be asked first (verify), is being asked (defer), or has no such object (skip).';

-- The values a notification's template needs, read as things are now; or
-- {"skip": reason} when it no longer applies; {"verify": ...} or
-- {"defer": reason} when Stripe must be asked first (billing.notify_checked).
CREATE OR REPLACE FUNCTION billing.notify_vars(n billing.notifications) RETURNS jsonb
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  p       jsonb := n.payload;
  t       billing.tenants;
  s       billing.subscriptions;
  i       billing.invoices;
  v       jsonb;
  u       record;
  v_plan  billing.plans;
  v_next  record;
  v_hard  integer;
  v_base  text := rtrim(billing.base_url(), '/');
  v_billing_url text;
  v_chk   jsonb;
  v_told  billing.notifications;
BEGIN
  SELECT * INTO t FROM billing.tenants WHERE tenant_id = n.tenant_id;
  v_billing_url := CASE WHEN v_base ~ '^https?://' THEN v_base || '/billing' END;
  v := jsonb_build_object('tenant_id', n.tenant_id, 'tenant_name', t.name, 'billing_email', t.billing_email,
                          'kind', n.kind, 'event_id', n.event_id, 'created', billing.notify_utc(n.created_at),
                          'action_url', v_billing_url, 'free_limits', billing.notify_plan_limits('free'),
                          'payload', p::text);

  CASE n.kind
  WHEN 'usage.threshold' THEN
    SELECT * INTO u FROM billing.usage_current(n.tenant_id) c WHERE c.metric = p ->> 'metric';
    IF NOT FOUND OR u.period_start IS DISTINCT FROM (p ->> 'period_start')::timestamptz THEN
      RETURN jsonb_build_object('skip', format('the billing period that started on %s has ended',
                                               billing.notify_utc((p ->> 'period_start')::timestamptz)));
    END IF;
    IF u.usage_limit IS NULL THEN
      RETURN jsonb_build_object('skip', format('%s are unlimited on the %s plan now', billing.notify_metric_label(u.metric), u.plan_id));
    END IF;
    IF u.used::numeric * 100 < u.usage_limit::numeric * (p ->> 'threshold_percent')::integer THEN
      RETURN jsonb_build_object('skip', format('usage is below %s %% of the limit now (%s of %s on the %s plan)',
                                               p ->> 'threshold_percent', u.used, u.usage_limit, u.plan_id));
    END IF;
    IF (p ->> 'threshold_percent')::integer < 100 AND u.used >= u.usage_limit
       AND EXISTS (SELECT FROM billing.notifications x
                    WHERE x.tenant_id = n.tenant_id AND x.kind = n.kind AND x.notification_id <> n.notification_id
                      AND x.payload ->> 'metric' = p ->> 'metric' AND x.payload ->> 'period_start' = p ->> 'period_start'
                      AND (x.payload ->> 'threshold_percent')::integer = 100) THEN
      RETURN jsonb_build_object('skip', format('superseded: 100 %% of the %s limit was reached meanwhile',
                                               billing.notify_metric_label(u.metric)));
    END IF;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = u.plan_id;
    SELECT l.hard_limit_pct INTO v_hard FROM billing.plan_limits l WHERE l.plan_id = u.plan_id AND l.metric = u.metric;
    SELECT pl.name, l.soft_limit INTO v_next
      FROM billing.plans pl LEFT JOIN billing.plan_limits l ON l.plan_id = pl.plan_id AND l.metric = u.metric
     WHERE pl.tier > v_plan.tier AND pl.active ORDER BY pl.tier LIMIT 1;
    v := v || jsonb_build_object(
      'metric', u.metric, 'metric_label', billing.notify_metric_label(u.metric),
      'percent', p ->> 'threshold_percent', 'plan_name', v_plan.name,
      'used', billing.notify_quantity(u.metric, u.used), 'limit', billing.notify_quantity(u.metric, u.usage_limit),
      'period_start', billing.notify_utc(u.period_start), 'period_end', billing.notify_utc(u.period_end),
      'meaning', CASE
        WHEN (p ->> 'threshold_percent')::integer < 100 AND v_hard IS NULL THEN
          'Nothing is limited. Past 100 % you can go on, but every further one is over your plan''s limit and comes with an upgrade prompt.'
        WHEN (p ->> 'threshold_percent')::integer < 100 THEN
          format('Nothing is limited yet. Past 100 %% further ones are over your plan''s limit, and above %s (%s %%) they are refused until the period renews on %s.',
                 billing.notify_quantity(u.metric, u.usage_limit * v_hard / 100), v_hard, billing.notify_utc(u.period_end))
        WHEN v_hard IS NULL THEN
          'You have reached your plan''s limit. You can go on: further ones are counted over the limit and come with an upgrade prompt.'
        ELSE format('You have reached your plan''s limit. Further ones are allowed up to %s (%s %%), then refused until the period renews on %s.',
                    billing.notify_quantity(u.metric, u.usage_limit * v_hard / 100), v_hard, billing.notify_utc(u.period_end))
        END,
      'todo', CASE WHEN v_next.name IS NOT NULL
                   THEN format('Upgrade to %s for %s %s per period, or wait for the allowance to renew on %s.',
                               v_next.name, billing.notify_quantity(u.metric, v_next.soft_limit),
                               billing.notify_metric_label(u.metric), billing.notify_utc(u.period_end))
                   ELSE format('The allowance renews on %s.', billing.notify_utc(u.period_end)) END,
      'action_label', CASE WHEN v_next.name IS NOT NULL THEN 'Upgrade to ' || v_next.name ELSE 'View your usage' END);

  WHEN 'payment.failed' THEN
    SELECT * INTO i FROM billing.invoices WHERE stripe_invoice_id = p ->> 'invoice';
    IF i.status IN ('paid', 'void') THEN
      RETURN jsonb_build_object('skip', format('invoice %s was %s meanwhile', coalesce(i.number, i.stripe_invoice_id),
                                               CASE i.status WHEN 'paid' THEN 'paid' ELSE 'voided' END));
    END IF;
    SELECT * INTO s FROM billing.subscriptions x WHERE x.tenant_id = n.tenant_id AND x.subscription_id = i.subscription_id;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = s.plan_id;
    v := v || jsonb_build_object(
      'invoice_number', coalesce(i.number, p ->> 'invoice'),
      'amount', coalesce(billing.notify_money(coalesce(nullif(i.amount_remaining, 0), i.amount_due), i.currency),
                         'the amount due'),
      'plan_name', v_plan.name,
      'grace_until', billing.notify_utc(s.grace_until),
      'subject_deadline', CASE WHEN s.status = 'past_due' AND s.grace_until IS NOT NULL
                               THEN ': please pay by ' || billing.notify_utc(s.grace_until) ELSE '' END,
      'todo_deadline', CASE WHEN s.status = 'past_due' AND s.grace_until IS NOT NULL
                            THEN ' before ' || billing.notify_utc(s.grace_until) ELSE '' END,
      'meaning', CASE
        WHEN s.status = 'past_due' AND s.grace_until IS NOT NULL THEN
          format('Your %s limits stay during a grace period until %s. If the invoice is still unpaid then, the Free plan''s limits apply (%s per period).',
                 v_plan.name, billing.notify_utc(s.grace_until), billing.notify_plan_limits('free'))
        WHEN s.status IN ('incomplete', 'incomplete_expired') THEN
          format('Your %s subscription has not started: the Free plan''s limits (%s per period) apply until the payment succeeds.',
                 v_plan.name, billing.notify_plan_limits('free'))
        WHEN s.status = 'unpaid' OR (s.status = 'past_due' AND s.grace_until <= billing.now()) THEN
          format('The Free plan''s limits apply (%s per period) until the invoice is paid.', billing.notify_plan_limits('free'))
        ELSE 'Your limits are unchanged for now.' END,
      'action_url', CASE WHEN coalesce(i.hosted_invoice_url, p ->> 'hosted_invoice_url') ~ '^https://'
                         THEN coalesce(i.hosted_invoice_url, p ->> 'hosted_invoice_url') ELSE v_billing_url END);

  WHEN 'grace.ended' THEN
    SELECT * INTO s FROM billing.subscriptions x
     WHERE x.tenant_id = n.tenant_id AND x.subscription_id = (p ->> 'subscription_id')::bigint;
    IF NOT FOUND OR s.status NOT IN ('past_due', 'unpaid') THEN
      RETURN jsonb_build_object('skip', format('the subscription is %s again: the invoice was paid meanwhile', coalesce(s.status, 'gone')));
    END IF;
    IF s.grace_until IS DISTINCT FROM (p ->> 'grace_until')::timestamptz OR s.grace_until > billing.now() THEN
      RETURN jsonb_build_object('skip', 'the grace period was changed: a newer one applies');
    END IF;
    -- still unpaid when it ended, as Stripe has it: the invoice it runs
    -- from (billing.dunning_since) and the subscription, each as of then
    SELECT * INTO i FROM billing.invoices x
     WHERE x.tenant_id = n.tenant_id AND x.stripe_subscription_id = s.stripe_subscription_id
       AND x.status IN ('open', 'uncollectible')
     ORDER BY x.first_failed_at IS NULL AND x.attempt_count = 0, coalesce(x.first_failed_at, x.finalized_at, x.stripe_created)
     LIMIT 1;
    IF FOUND THEN
      v_chk := billing.notify_checked(n, 'invoice', i.stripe_invoice_id, i.stripe_state_at, s.grace_until);
      IF v_chk IS NOT NULL THEN
        RETURN v_chk;
      END IF;
    END IF;
    v_chk := billing.notify_checked(n, 'subscription', s.stripe_subscription_id, s.stripe_state_at, s.grace_until);
    IF v_chk IS NOT NULL THEN
      RETURN v_chk;
    END IF;
    SELECT * INTO i FROM billing.invoices x
     WHERE x.tenant_id = n.tenant_id AND x.subscription_id = s.subscription_id AND x.status IN ('open', 'uncollectible')
     ORDER BY x.stripe_created DESC LIMIT 1;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = s.plan_id;
    v := v || jsonb_build_object(
      'plan_name', v_plan.name, 'grace_until', billing.notify_utc(s.grace_until),
      'invoice_number', coalesce(i.number, i.stripe_invoice_id, 'of the subscription'),
      'amount', coalesce(billing.notify_money(coalesce(nullif(i.amount_remaining, 0), i.amount_due), i.currency), 'the amount due'),
      'action_url', CASE WHEN i.hosted_invoice_url ~ '^https://' THEN i.hosted_invoice_url ELSE v_billing_url END);

  WHEN 'payment.recovered' THEN
    IF p ? 'invoice' THEN
      -- the invoice it recovers (billing.sync_invoice_failure): told only
      -- after its failure was
      SELECT * INTO v_told FROM billing.notifications x
       WHERE x.tenant_id = n.tenant_id AND x.dedup_key = 'payment_failed:' || (p ->> 'invoice');
      IF v_told.state IN ('pending', 'in_flight') THEN
        RETURN jsonb_build_object('defer', 'the failure it recovers from is being told first',
                                  'until', v_told.next_attempt_at);
      END IF;
      IF v_told.notification_id IS NULL OR v_told.delivered = '{}' THEN
        RETURN jsonb_build_object('skip', format('the tenant was not told that invoice %s failed', p ->> 'invoice'));
      END IF;
      SELECT * INTO i FROM billing.invoices x WHERE x.tenant_id = n.tenant_id AND x.stripe_invoice_id = p ->> 'invoice';
      SELECT * INTO s FROM billing.subscriptions x
       WHERE x.tenant_id = n.tenant_id AND x.stripe_subscription_id = p ->> 'subscription';
    ELSE
      -- queued before recoveries were facts of an invoice: as it was then
      SELECT * INTO s FROM billing.subscriptions x
       WHERE x.tenant_id = n.tenant_id AND x.subscription_id = (p ->> 'subscription_id')::bigint;
      IF NOT FOUND OR s.status NOT IN ('active', 'trialing') THEN
        RETURN jsonb_build_object('skip', format('the subscription is %s now', coalesce(s.status, 'gone')));
      END IF;
      SELECT * INTO i FROM billing.invoices x
       WHERE x.tenant_id = n.tenant_id AND x.subscription_id = s.subscription_id AND x.status = 'paid'
       ORDER BY x.stripe_state_at DESC NULLS LAST, x.stripe_created DESC LIMIT 1;
    END IF;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = s.plan_id;
    v := v || jsonb_build_object(
      'plan_name', v_plan.name, 'plan_limits', billing.notify_plan_limits(s.plan_id),
      'invoice_number', coalesce(i.number, i.stripe_invoice_id, 'of the subscription'),
      'amount', coalesce(billing.notify_money(i.amount_paid, i.currency), 'the amount due'));

  WHEN 'subscription.trial_will_end' THEN
    SELECT * INTO s FROM billing.subscriptions x WHERE x.stripe_subscription_id = p ->> 'subscription';
    IF FOUND AND s.trial_end <= billing.now() THEN
      RETURN jsonb_build_object('skip', 'the trial has ended already');
    END IF;
    IF FOUND THEN
      -- still in its trial now, as Stripe has it
      v_chk := billing.notify_checked(n, 'subscription', s.stripe_subscription_id, s.stripe_state_at, now());
      IF v_chk IS NOT NULL THEN
        RETURN v_chk;
      END IF;
    END IF;
    IF NOT FOUND OR s.status <> 'trialing' THEN
      RETURN jsonb_build_object('skip', format('the subscription is %s, no longer in its trial', coalesce(s.status, 'gone')));
    END IF;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = s.plan_id;
    v := v || jsonb_build_object(
      'plan_name', v_plan.name, 'plan_limits', billing.notify_plan_limits(s.plan_id),
      'trial_end', billing.notify_utc(coalesce(s.trial_end, (p ->> 'trial_end')::timestamptz)),
      'interval', s.billing_interval,
      'price', (SELECT billing.notify_money(pr.unit_amount, pr.currency) FROM billing.prices pr
                 WHERE pr.stripe_price_id = s.stripe_price_id
                    OR (pr.plan_id = s.plan_id AND pr.billing_interval = s.billing_interval AND pr.active)
                 ORDER BY pr.stripe_price_id = s.stripe_price_id DESC NULLS LAST LIMIT 1));

  WHEN 'dispute.created' THEN
    v := v || jsonb_build_object(
      'dispute', p ->> 'dispute', 'charge', coalesce(p ->> 'charge', 'unknown'),
      'reason', coalesce(replace(p ->> 'reason', '_', ' '), 'not given'),
      'amount', billing.notify_money((p ->> 'amount')::bigint, coalesce(p ->> 'currency', 'usd')),
      'action_url', 'https://dashboard.stripe.com/' || CASE WHEN billing.stripe_mode() = 'test' THEN 'test/' ELSE '' END
                    || 'disputes/' || (p ->> 'dispute'));
  ELSE
    NULL;
  END CASE;
  RETURN v;
END
$$;

COMMENT ON FUNCTION billing.notify_vars(billing.notifications) IS
  'What a notification''s template needs, read as things are now; {"skip": reason} when it no longer applies (an invoice paid meanwhile, a period that ended, a trial that converted).';

-- The email (subject, plain text, HTML) and the webhook's event of a notification.
CREATE OR REPLACE FUNCTION billing.notify_render(n billing.notifications, p_vars jsonb, p_to text,
                                      OUT subject text, OUT text_body text, OUT html_body text, OUT event jsonb)
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  tpl     jsonb := billing.notify_template(n.kind);
  v_head  text := billing.notify_fill(tpl ->> 'headline', p_vars);
  v_act   text := billing.notify_fill(tpl ->> 'action', p_vars);
  v_url   text := CASE WHEN p_vars ->> 'action_url' ~ '^https?://[^\s<>"]+$' THEN p_vars ->> 'action_url' END;
  v_paras text[];
  v_foot  text;
BEGIN
  subject := regexp_replace(billing.notify_fill(tpl ->> 'subject', p_vars), '[\r\n]+', ' ', 'g');
  SELECT array_agg(billing.notify_fill(x, p_vars) ORDER BY o) INTO v_paras
    FROM jsonb_array_elements_text(tpl -> 'paragraphs') WITH ORDINALITY AS a(x, o)
   WHERE billing.notify_fill(x, p_vars) <> '';
  v_foot := format('Sent by QES billing to %s about the account %s (%s). Notification %s.',
                   coalesce(p_to, 'the platform'), p_vars ->> 'tenant_name', n.tenant_id, n.event_id);
  text_body := v_head || E'\n\n' || array_to_string(v_paras, E'\n\n')
               || CASE WHEN v_url IS NOT NULL THEN E'\n\n' || v_act || ': ' || v_url ELSE '' END
               || E'\n\n-- \n' || v_foot || E'\n';
  html_body := '<!DOCTYPE html>' || E'\n<html><head><meta charset="utf-8"><title>' || billing.notify_html(subject)
               || E'</title></head>\n<body style="font-family: Helvetica, Arial, sans-serif; color: #1f2933; max-width: 600px;">\n'
               || '<h1 style="font-size: 20px;">' || billing.notify_html(v_head) || E'</h1>\n'
               || (SELECT string_agg('<p>' || billing.notify_html(x) || '</p>', E'\n' ORDER BY o)
                     FROM unnest(v_paras) WITH ORDINALITY AS a(x, o))
               || CASE WHEN v_url IS NOT NULL
                       THEN E'\n<p><a href="' || billing.notify_html(v_url)
                            || '" style="display: inline-block; padding: 10px 16px; background: #1a56db; color: #ffffff; text-decoration: none; border-radius: 4px;">'
                            || billing.notify_html(v_act) || '</a></p>'
                       ELSE '' END
               || E'\n<hr>\n<p style="font-size: 12px; color: #6b7280;">' || billing.notify_html(v_foot) || E'</p>\n</body></html>\n';
  event := jsonb_build_object(
    'id', n.event_id, 'object', 'event', 'type', n.kind, 'api_version', 'qes_billing/1',
    'created', floor(extract(epoch FROM n.created_at))::bigint, 'livemode', billing.stripe_mode() = 'live',
    'data', jsonb_build_object('object', jsonb_build_object(
      'object', 'notification', 'tenant_id', n.tenant_id, 'notification_id', n.notification_id,
      'audience', n.audience, 'kind', n.kind, 'payload', n.payload,
      'subject', subject, 'text', text_body, 'action_url', v_url,
      'created_at', to_char(n.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))));
END
$$;

COMMENT ON FUNCTION billing.notify_render(billing.notifications, jsonb, text) IS
  'Render a notification from its kind''s template: the email''s subject, plain-text and HTML parts, and the platform webhook''s event.';

-- ---- timers --------------------------------------------------------------

-- Grace periods that have ended: limits are lowered to Free's (check_limit
-- does that by itself from grace_until); queue the notice, once per
-- subscription and grace period.  Whether it goes out (and is audited as
-- dunning.grace_ended) is decided when it is claimed, once the mirror
-- vouches that the subscription was still unpaid then (billing.notify_vars).
CREATE OR REPLACE FUNCTION billing.notify_timers() RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n integer;
BEGIN
  -- (an INSERT of no rows would still fire the wake-up trigger: the worker
  -- would wake itself and claim again, forever)
  IF NOT EXISTS (SELECT FROM billing.subscriptions s
                  WHERE s.status IN ('past_due', 'unpaid') AND s.grace_until IS NOT NULL
                    AND s.grace_until <= billing.now() AND NOT billing.tenant_fenced(s.tenant_id)
                    AND NOT EXISTS (SELECT FROM billing.notifications x
                                     WHERE x.tenant_id = s.tenant_id
                                       AND x.dedup_key = 'grace_ended:' || s.subscription_id || ':'
                                                         || extract(epoch FROM s.grace_until)::bigint)) THEN
    RETURN 0;
  END IF;
  WITH due AS (
    SELECT s.tenant_id, s.subscription_id, s.stripe_subscription_id, s.plan_id, s.grace_until,
           'grace_ended:' || s.subscription_id || ':' || extract(epoch FROM s.grace_until)::bigint AS dedup_key
      FROM billing.subscriptions s
     WHERE s.status IN ('past_due', 'unpaid') AND s.grace_until IS NOT NULL AND s.grace_until <= billing.now()
       AND NOT billing.tenant_fenced(s.tenant_id)),   -- its partition is moving (src/fence.c)
  ins AS (
    INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
    SELECT d.tenant_id, 'grace.ended', d.dedup_key,
           jsonb_build_object('subscription', d.stripe_subscription_id, 'subscription_id', d.subscription_id,
                              'plan_id', d.plan_id, 'grace_until', d.grace_until)
      FROM due d
     WHERE NOT EXISTS (SELECT FROM billing.notifications x WHERE x.tenant_id = d.tenant_id AND x.dedup_key = d.dedup_key)
    ON CONFLICT (tenant_id, dedup_key) DO NOTHING
    RETURNING tenant_id)
  SELECT count(*) INTO v_n FROM ins;
  RETURN v_n;
END
$$;

COMMENT ON FUNCTION billing.notify_timers() IS
  'Queue a grace.ended notification for each subscription whose grace period ended unpaid, once per grace period (audited as dunning.grace_ended when it is claimed and still holds).';

-- A changed grace period wakes the worker, whose next due time includes it.
-- (A recovery is no transition the mirror passed through, which depends on
-- the order it saw states in: it is a fact of the invoice that was paid,
-- billing.sync_invoice_failure.)
CREATE OR REPLACE FUNCTION billing.notify_subscription_changed() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF NEW.grace_until IS DISTINCT FROM OLD.grace_until THEN
    PERFORM billing.wake_worker();
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER notify_on_change AFTER UPDATE OF status, grace_until ON billing.subscriptions
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.grace_until IS DISTINCT FROM NEW.grace_until)
  EXECUTE FUNCTION billing.notify_subscription_changed();

-- queued notifications and a moved billing clock wake the worker at commit
CREATE OR REPLACE TRIGGER wake_worker AFTER INSERT ON billing.notifications
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();

CREATE OR REPLACE TRIGGER wake_worker AFTER UPDATE ON billing.clock
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();

-- ---- the worker's protocol -----------------------------------------------

-- Claim due notifications for delivery on the channels the worker has
-- (p_email, p_webhook; p_operator_email is where operators' email goes, NULL
-- for none).  Commits before any byte leaves.
CREATE OR REPLACE FUNCTION billing.notify_claim(p_limit integer, p_email boolean, p_webhook boolean, p_operator_email text)
  RETURNS TABLE (tenant_id text, notification_id bigint, attempt integer, event_id text, kind text,
                 email_to text, subject text, text_body text, html_body text, webhook_body text)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
#variable_conflict use_column
DECLARE
  n        billing.notifications;
  v        jsonb;
  r        record;
  v_to     text;
  v_chan   text[];
  v_err    text;
BEGIN
  PERFORM billing.notify_timers();
  -- in flight for longer than twice the timeout: this worker lost the answer
  UPDATE billing.notifications x
     SET state = 'pending', claimed_at = NULL, channels_due = '{}', next_attempt_at = now(), updated_at = now()
   WHERE x.state = 'in_flight'
     AND x.claimed_at < now() - 2 * current_setting('qes_billing.notify_timeout')::interval
     AND NOT billing.tenant_fenced(x.tenant_id);

  FOR n IN
    SELECT * FROM billing.notifications x
     WHERE x.state = 'pending' AND x.next_attempt_at <= now()
     ORDER BY x.next_attempt_at, x.notification_id
     LIMIT p_limit
       FOR UPDATE SKIP LOCKED
  LOOP
    IF billing.tenant_fenced(n.tenant_id) THEN
      CONTINUE;   -- its partition is moving (src/fence.c): it goes with its rows
    END IF;
    BEGIN
      v := billing.notify_vars(n);
      v_to := CASE WHEN n.audience = 'tenant' THEN v ->> 'billing_email' ELSE nullif(p_operator_email, '') END;
      v_chan := '{}';
      IF p_email AND v_to IS NOT NULL AND NOT n.delivered ? 'email' THEN
        v_chan := v_chan || 'email'::text;
      END IF;
      IF p_webhook AND NOT n.delivered ? 'webhook' THEN
        v_chan := v_chan || 'webhook'::text;
      END IF;
      IF NOT (v ?| ARRAY['skip', 'verify', 'defer']) AND cardinality(v_chan) > 0 THEN
        r := billing.notify_render(n, v, v_to);   -- the same text on every channel and attempt
      END IF;
    EXCEPTION WHEN OTHERS THEN
      -- a notification that cannot be rendered must not hold up the others
      GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT;
      UPDATE billing.notifications x
         SET state = 'failed', attempts = x.attempts + 1, last_error = 'render: ' || v_err, updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      PERFORM billing.audit('notification.failed', n.tenant_id,
                            jsonb_build_object('notification_id', n.notification_id, 'kind', n.kind,
                                               'event_id', n.event_id, 'error', 'render: ' || v_err));
      CONTINUE;
    END;
    IF v ? 'verify' THEN
      -- ask Stripe first (once per object); the answer wakes the worker
      UPDATE billing.notifications x
         SET verify_requests = x.verify_requests
                               || billing.fetch_object(n.tenant_id, v -> 'verify' ->> 'object', v -> 'verify' ->> 'id'),
             next_attempt_at = now() + interval '1 second', updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      CONTINUE;
    END IF;
    IF v ? 'defer' THEN
      UPDATE billing.notifications x
         SET next_attempt_at = greatest(now() + interval '1 second', (v ->> 'until')::timestamptz), updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      CONTINUE;
    END IF;
    IF v ? 'skip' THEN
      UPDATE billing.notifications x SET state = 'skipped', skip_reason = v ->> 'skip', updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      CONTINUE;
    END IF;
    IF n.kind = 'grace.ended' AND n.attempts = 0 AND n.delivered = '{}' THEN
      -- the grace period ended unpaid, as Stripe has it: audited once, when decided
      PERFORM billing.audit('dunning.grace_ended', n.tenant_id, n.payload);
    END IF;
    IF cardinality(v_chan) = 0 THEN
      -- nothing left that a configured channel can deliver
      UPDATE billing.notifications x
         SET state = CASE WHEN x.delivered = '{}' THEN 'skipped' ELSE 'sent' END,
             sent_at = CASE WHEN x.delivered = '{}' THEN NULL ELSE clock_timestamp() END,
             skip_reason = CASE WHEN x.delivered = '{}'
                                THEN 'no channel delivers ' || x.audience || ' notifications'
                                     || CASE WHEN x.audience = 'operator'
                                             THEN ' (set qes_billing.notify_operator_email or the platform webhook)' ELSE '' END
                           END,
             updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      CONTINUE;
    END IF;
    UPDATE billing.notifications x
       SET state = 'in_flight', attempts = x.attempts + 1, claimed_at = now(), channels_due = v_chan,
           attempt_errors = '{}', updated_at = now()
     WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id
     RETURNING * INTO n;
    tenant_id := n.tenant_id;
    notification_id := n.notification_id;
    attempt := n.attempts;
    event_id := n.event_id;
    kind := n.kind;
    email_to := CASE WHEN 'email' = ANY (v_chan) THEN v_to END;
    subject := r.subject;
    text_body := r.text_body;
    html_body := r.html_body;
    webhook_body := CASE WHEN 'webhook' = ANY (v_chan) THEN r.event::text END;
    RETURN NEXT;
  END LOOP;
END
$$;

COMMENT ON FUNCTION billing.notify_claim(integer, boolean, boolean, text) IS
  'Run by the worker: queue timers, skip what no longer applies, mark up to p_limit due notifications in flight and return them rendered for each channel.';

-- Seconds until a notification is due (a retry, or a grace period that
-- ends); NULL when none is: the worker sleeps until then.
CREATE OR REPLACE FUNCTION billing.notify_next_due() RETURNS double precision
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  -- (greatest() ignores a NULL: only a due time, if any, goes into it)
  SELECT CASE WHEN d.due IS NOT NULL THEN greatest(0, extract(epoch FROM d.due - now()))::double precision END
    FROM (SELECT least(
            (SELECT min(x.next_attempt_at) FROM billing.notifications x WHERE x.state = 'pending'),
            (SELECT min(s.grace_until) FROM billing.subscriptions s
              WHERE s.status IN ('past_due', 'unpaid') AND s.grace_until IS NOT NULL
                AND s.grace_until > billing.now()) - (billing.now() - now()),
            (SELECT min(x.claimed_at) FROM billing.notifications x WHERE x.state = 'in_flight')
              + 2 * current_setting('qes_billing.notify_timeout')::interval) AS due) d
$$;

COMMENT ON FUNCTION billing.notify_next_due() IS
  'Seconds until the next notification is due (retry, grace period end); NULL when none.';

-- The delay before attempt n+1 (billing.backoff with the notification settings).
CREATE OR REPLACE FUNCTION billing.notify_backoff(p_attempts integer) RETURNS interval
  LANGUAGE sql VOLATILE
RETURN billing.backoff(p_attempts, current_setting('qes_billing.notify_retry_base_delay')::interval,
                       current_setting('qes_billing.notify_retry_max_delay')::interval);

-- One channel's outcome.  Returns the notification's state, NULL when the
-- row was reclaimed meanwhile (a later attempt owns it).  p_error is
-- redacted by the worker (never a secret).
CREATE OR REPLACE FUNCTION billing.notify_record(p_tenant text, p_notification_id bigint, p_attempt integer, p_channel text,
                                      p_ok boolean, p_permanent boolean DEFAULT false, p_error text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  n     billing.notifications;
  v_max integer := current_setting('qes_billing.notify_max_attempts')::integer;
BEGIN
  SELECT * INTO n FROM billing.notifications x
   WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id FOR UPDATE;
  IF NOT FOUND OR n.state <> 'in_flight' OR n.attempts <> p_attempt OR NOT p_channel = ANY (n.channels_due) THEN
    RETURN NULL;
  END IF;
  UPDATE billing.notifications x
     SET channels_due = array_remove(x.channels_due, p_channel),
         delivered = CASE WHEN p_ok THEN x.delivered || jsonb_build_object(p_channel, clock_timestamp()) ELSE x.delivered END,
         attempt_errors = CASE WHEN p_ok THEN x.attempt_errors
                               ELSE x.attempt_errors || jsonb_build_object(p_channel, jsonb_build_object(
                                      'error', left(p_error, 1000), 'permanent', p_permanent)) END,
         last_error = CASE WHEN p_ok THEN x.last_error ELSE p_channel || ': ' || left(p_error, 1000) END,
         updated_at = now()
   WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id
   RETURNING * INTO n;
  IF cardinality(n.channels_due) > 0 THEN
    RETURN 'in_flight';   -- the other channel is still on its way
  END IF;
  IF n.attempt_errors = '{}' THEN
    UPDATE billing.notifications x SET state = 'sent', sent_at = clock_timestamp(), claimed_at = NULL, updated_at = now()
     WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id;
    RETURN 'sent';
  END IF;
  IF n.attempts >= v_max OR jsonb_path_exists(n.attempt_errors, '$.*.permanent ? (@ == true)') THEN
    UPDATE billing.notifications x SET state = 'failed', claimed_at = NULL, updated_at = now()
     WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id;
    PERFORM billing.audit('notification.failed', p_tenant,
                          jsonb_build_object('notification_id', n.notification_id, 'kind', n.kind, 'event_id', n.event_id,
                                             'attempts', n.attempts, 'errors', n.attempt_errors,
                                             'delivered', n.delivered));
    RETURN 'failed';
  END IF;
  UPDATE billing.notifications x
     SET state = 'pending', claimed_at = NULL, next_attempt_at = now() + billing.notify_backoff(n.attempts), updated_at = now()
   WHERE x.tenant_id = p_tenant AND x.notification_id = p_notification_id;
  RETURN 'pending';
END
$$;

COMMENT ON FUNCTION billing.notify_record(text, bigint, integer, text, boolean, boolean, text) IS
  'Run by the worker for each channel''s outcome: sent when every channel delivered; else back to pending with backoff, or failed (audited) after qes_billing.notify_max_attempts or a permanent refusal.';

-- Crash reconciliation: rows in flight when the worker starts were left by
-- a crash; they go out again (same event_id).
CREATE OR REPLACE FUNCTION billing.notify_reclaim() RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  UPDATE billing.notifications
     SET state = 'pending', claimed_at = NULL, channels_due = '{}', next_attempt_at = now(), updated_at = now()
   WHERE state = 'in_flight'
     AND NOT billing.tenant_fenced(tenant_id);   -- its partition is moving: the target reclaims it
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n > 0 THEN
    PERFORM billing.audit('worker.reclaimed', NULL, jsonb_build_object('notifications', v_n));
  END IF;
  RETURN v_n;
END
$$;

COMMENT ON FUNCTION billing.notify_reclaim() IS
  'Run by the worker before its first delivery: put notifications left in flight by a crash back in the queue.';

-- ---- for operators ---------------------------------------------------------

CREATE OR REPLACE FUNCTION billing.notify_channels(OUT channel text, OUT enabled boolean, OUT target text, OUT problem text)
  RETURNS SETOF record
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_notify_channels';

COMMENT ON FUNCTION billing.notify_channels() IS
  'The delivery channels as the settings configure them: email (SMTP) and the platform webhook; what is missing when one is off. Never a secret.';

CREATE VIEW billing.notification_failures AS
SELECT n.tenant_id, n.notification_id, n.kind, n.audience, n.event_id, n.attempts, n.last_error,
       n.attempt_errors AS errors, n.delivered, n.created_at, n.updated_at AS failed_at
  FROM billing.notifications n
 WHERE n.state = 'failed';

COMMENT ON VIEW billing.notification_failures IS
  'Notifications that could not be delivered after qes_billing.notify_max_attempts (or were refused for good): replay them with billing.replay_notification().';

CREATE VIEW billing.notification_metrics AS
SELECT (SELECT count(*) FROM billing.notifications WHERE state = 'pending') AS pending,
       (SELECT count(*) FROM billing.notifications WHERE state = 'in_flight') AS in_flight,
       (SELECT count(*) FROM billing.notifications WHERE state = 'pending' AND attempts > 0) AS retrying,
       (SELECT count(*) FROM billing.notifications WHERE state = 'sent' AND sent_at > now() - interval '1 hour') AS sent_last_hour,
       (SELECT count(*) FROM billing.notifications WHERE state = 'skipped' AND updated_at > now() - interval '1 hour') AS skipped_last_hour,
       (SELECT count(*) FROM billing.notifications WHERE state = 'failed') AS failed,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at))
          FROM billing.notifications WHERE sent_at > now() - interval '1 hour') AS latency_p50_s,
       (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at))
          FROM billing.notifications WHERE sent_at > now() - interval '1 hour') AS latency_p99_s;

COMMENT ON VIEW billing.notification_metrics IS
  'Notifications: queued, in flight, retrying, sent and skipped in the last hour, failed; latency queued -> sent (p50, p99 over the last hour).';

CREATE OR REPLACE FUNCTION billing.replay_notification(p_tenant text DEFAULT NULL, p_notification_id bigint DEFAULT NULL)
  RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n integer;
BEGIN
  UPDATE billing.notifications
     SET state = 'pending', attempts = 0, next_attempt_at = now(), claimed_at = NULL, channels_due = '{}',
         attempt_errors = '{}', updated_at = now()
   WHERE state = 'failed' AND (p_tenant IS NULL OR tenant_id = p_tenant)
     AND (p_notification_id IS NULL OR notification_id = p_notification_id);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF p_notification_id IS NOT NULL AND v_n = 0 THEN
    RAISE EXCEPTION 'no failed notification % of tenant %', p_notification_id, coalesce(p_tenant, '(any)')
      USING ERRCODE = 'no_data_found', HINT = 'List them with: SELECT * FROM billing.notification_failures.';
  END IF;
  PERFORM billing.audit('notification.replayed', p_tenant,
                        jsonb_build_object('notification_id', p_notification_id, 'notifications', v_n));
  PERFORM billing.wake_worker();
  RETURN v_n;
END
$$;

COMMENT ON FUNCTION billing.replay_notification(text, bigint) IS
  'Deliver failed notifications again (one, a tenant''s, or all), with their event ids; channels that delivered are not sent again. Audited.';

GRANT SELECT ON billing.notification_failures, billing.notification_metrics TO qes_admin;

GRANT EXECUTE ON FUNCTION billing.replay_notification(text, bigint), billing.notify_channels() TO qes_admin;

CREATE VIEW api.usage WITH (security_invoker = true) AS
SELECT u.period_start, u.period_end, u.is_current, u.metric, u.used, u.usage_limit, u.percent, u.status,
       b.included AS billed_beyond, b.billable, b.amount AS billable_amount, b.currency AS billable_currency,
       b.sent AS sent_to_stripe
  FROM billing.my_usage() u
  LEFT JOIN billing.my_usage_billable() b ON u.is_current AND b.metric = u.metric;

COMMENT ON VIEW api.usage IS
  'The calling tenant''s usage: the current billing period per metric (used, usage_limit (null = unlimited), percent, status: ok, warning, over_soft_limit, blocked) and the totals of earlier periods (is_current = false). A metric billed by usage (Stripe Billing Meters) also shows what will be billed so far this period: the units included (billed_beyond), the billable units, their amount (smallest currency unit, billable_currency) and how many Stripe has been sent; null when not billed by usage.';

CREATE VIEW api.invoices WITH (security_invoker = true) AS
SELECT i.stripe_invoice_id AS invoice_id, i.number, i.status, i.amount_due, i.amount_paid, i.amount_remaining,
       i.currency, i.period_start, i.period_end, i.hosted_invoice_url, i.invoice_pdf, i.stripe_created AS created,
       (SELECT jsonb_agg(jsonb_build_object('metric', l.metric, 'description', l.description, 'quantity', l.quantity,
                                            'amount', l.amount, 'period_start', l.period_start, 'period_end', l.period_end)
                         ORDER BY l.period_start, l.line_id)
          FROM billing.invoice_lines l
         WHERE l.tenant_id = i.tenant_id AND l.stripe_invoice_id = i.stripe_invoice_id AND l.metered) AS usage_lines,
       x.subtotal, x.tax, x.total, x.automatic_tax_status,
       CASE WHEN x.finalized_without_tax THEN x.automatic_tax_disabled_reason END AS tax_missing_reason,
       x.tax_lines
  FROM billing.invoices i
  LEFT JOIN billing.invoice_taxes x ON x.tenant_id = i.tenant_id AND x.stripe_invoice_id = i.stripe_invoice_id
 ORDER BY i.stripe_created DESC, i.stripe_invoice_id DESC;

COMMENT ON VIEW api.invoices IS
  'The calling tenant''s invoices, mirrored from Stripe, newest first (amounts in the smallest currency unit). usage_lines: the usage Stripe billed on it through meters (metric, quantity, amount, period), as its newest event showed. subtotal, tax, total and per line the tax amounts with their rate or taxability reason (tax_lines); automatic_tax_status (complete, failed, requires_location_inputs); tax_missing_reason when Stripe finalized it without tax (finalization_requires_location_inputs: the billing address was missing). Page with limit and offset.';

-- VAT through Stripe Tax: a tenant's billing details (legal name, address,
-- an EU VAT number), validated here (country code, the VAT number's shape
-- for its country) and then by Stripe (tax[validate_location]=immediately on
-- the customer: a location Stripe cannot tax is refused at once).  Stripe's
-- answer comes back through the outbox; the tenant sees it in GET
-- /rpc/billing_details -- a refusal as 422 naming the field.  The VAT number
-- becomes a customer tax ID (eu_vat) whose verification Stripe reports in
-- customer.tax_id.* events (mirrored here); a verified business in another
-- EU member state than qes_billing.tax_origin_country is marked for reverse
-- charge (customer tax_exempt=reverse), and the decision is audited with its
-- basis.

-- The Stripe time of the followed tax ID's state (the event's created, or
-- for the tax_id.create answer the second its request first went out):
-- customer.tax_id.* events arrive in any order, and an older one must not
-- overwrite a newer verification (docs/architecture.md, "Mirroring Stripe").
ALTER TABLE billing.billing_details ADD COLUMN tax_id_state_at timestamptz;

COMMENT ON COLUMN billing.billing_details.tax_id_state_at IS
  'The Stripe time of the state of stripe_tax_id kept here (an event''s created, or the tax_id.create answer''s first attempt); an older state of that tax ID is ignored, and its deletion is final.';

-- ISO 3166-1 alpha-2 codes (officially assigned).
CREATE OR REPLACE FUNCTION billing.iso_countries() RETURNS text[]
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN string_to_array(
  'AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ '
  'CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR '
  'GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO '
  'JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR '
  'MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO '
  'RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV '
  'TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW', ' ');

COMMENT ON FUNCTION billing.iso_countries() IS 'The officially assigned ISO 3166-1 alpha-2 country codes.';

-- The shape of an EU VAT number per member state, after its prefix (the
-- country code; EL for Greece), spaces, dots and dashes removed.
CREATE OR REPLACE FUNCTION billing.eu_vat_pattern(p_country text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE p_country
  WHEN 'AT' THEN '^U[0-9]{8}$'           WHEN 'BE' THEN '^[01][0-9]{9}$'
  WHEN 'BG' THEN '^[0-9]{9,10}$'         WHEN 'CY' THEN '^[0-9]{8}[A-Z]$'
  WHEN 'CZ' THEN '^[0-9]{8,10}$'         WHEN 'DE' THEN '^[0-9]{9}$'
  WHEN 'DK' THEN '^[0-9]{8}$'            WHEN 'EE' THEN '^[0-9]{9}$'
  WHEN 'GR' THEN '^[0-9]{9}$'            WHEN 'ES' THEN '^[A-Z0-9][0-9]{7}[A-Z0-9]$'
  WHEN 'FI' THEN '^[0-9]{8}$'            WHEN 'FR' THEN '^[A-HJ-NP-Z0-9]{2}[0-9]{9}$'
  WHEN 'HR' THEN '^[0-9]{11}$'           WHEN 'HU' THEN '^[0-9]{8}$'
  WHEN 'IE' THEN '^([0-9]{7}[A-W][A-I]?|[0-9][A-Z+*][0-9]{5}[A-W])$'
  WHEN 'IT' THEN '^[0-9]{11}$'           WHEN 'LT' THEN '^([0-9]{9}|[0-9]{12})$'
  WHEN 'LU' THEN '^[0-9]{8}$'            WHEN 'LV' THEN '^[0-9]{11}$'
  WHEN 'MT' THEN '^[0-9]{8}$'            WHEN 'NL' THEN '^[0-9]{9}B[0-9]{2}$'
  WHEN 'PL' THEN '^[0-9]{10}$'           WHEN 'PT' THEN '^[0-9]{9}$'
  WHEN 'RO' THEN '^[0-9]{2,10}$'         WHEN 'SE' THEN '^[0-9]{10}01$'
  WHEN 'SI' THEN '^[0-9]{8}$'            WHEN 'SK' THEN '^[0-9]{10}$'
END;

COMMENT ON FUNCTION billing.eu_vat_pattern(text) IS
  'The shape of an EU VAT number of this member state after its prefix (NULL: not an EU member state).';

CREATE OR REPLACE FUNCTION billing.eu_vat_prefix(p_country text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN p_country = 'GR' THEN 'EL' ELSE p_country END;

-- The tenant's details as Stripe's customer parameters.
CREATE OR REPLACE FUNCTION billing.billing_details_params(d billing.billing_details) RETURNS jsonb
  LANGUAGE sql STABLE
RETURN jsonb_build_object(
  'name', d.legal_name,
  'address', jsonb_strip_nulls(jsonb_build_object('country', d.country, 'postal_code', d.postal_code,
                                                  'line1', d.line1, 'city', d.city)),
  'tax', jsonb_build_object('validate_location', 'immediately'),
  'expand', jsonb_build_array('tax'));

-- Send the details (and then the VAT number) to Stripe: on the customer if
-- there is one, else once customer.create has answered (billing_details_send
-- is called again then, from billing.outbox_apply).
CREATE OR REPLACE FUNCTION billing.billing_details_send(p_tenant text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  t     billing.tenants;
  d     billing.billing_details;
  v_req bigint;
BEGIN
  SELECT * INTO t FROM billing.tenants x WHERE x.tenant_id = p_tenant;
  SELECT * INTO d FROM billing.billing_details x WHERE x.tenant_id = p_tenant FOR UPDATE;
  IF NOT FOUND OR d.state <> 'pending' THEN
    RETURN NULL;
  END IF;
  IF t.stripe_customer_id IS NULL THEN
    PERFORM billing.customer_request(t);   -- the details follow its answer
    RETURN NULL;
  END IF;
  v_req := billing.outbox_enqueue(p_tenant, 'billing_details.update', 'POST', '/v1/customers/' || t.stripe_customer_id,
                                  billing.billing_details_params(d), jsonb_build_object('version', d.version));
  UPDATE billing.billing_details x SET stripe_request = v_req WHERE x.tenant_id = p_tenant;
  RETURN v_req;
END
$$;

COMMENT ON FUNCTION billing.billing_details_send(text) IS
  'Queue the tenant''s pending billing details to its Stripe customer with tax[validate_location]=immediately (after the customer is created, when it is not yet).';

CREATE OR REPLACE FUNCTION api.set_billing_details(legal_name text, country text, postal_code text,
                                        line1 text DEFAULT NULL, city text DEFAULT NULL,
                                        vat_number text DEFAULT NULL)
  RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  t       billing.tenants := billing.calling_tenant();
  v_cc    text := upper(btrim(country));
  v_vat   text := nullif(upper(regexp_replace(coalesce(vat_number, ''), '[[:space:].-]', '', 'g')), '');
  v_name  text := btrim(legal_name);
  v_pc    text := btrim(postal_code);
  d       billing.billing_details;
  v_old   billing.billing_details;
BEGIN
  IF v_name IS NULL OR length(v_name) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'legal_name must have 1 to 200 characters'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give the company''s registered name.';
  END IF;
  IF v_cc IS NULL OR NOT v_cc = ANY (billing.iso_countries()) THEN
    RAISE EXCEPTION 'country: % is not an ISO 3166-1 country code', coalesce(quote_literal(country), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give two letters, e.g. DE, FR, NL (GB, not UK).';
  END IF;
  IF v_pc IS NULL OR v_pc !~ '^[A-Za-z0-9][A-Za-z0-9 -]{1,11}$' THEN
    RAISE EXCEPTION 'postal_code: % is not a postal code', coalesce(quote_literal(postal_code), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give the postal code of the billing address (Stripe Tax needs it).';
  END IF;
  IF length(line1) > 200 OR length(city) > 100 THEN
    RAISE EXCEPTION 'line1 (at most 200 characters) or city (at most 100) is too long'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Shorten the address.';
  END IF;
  IF v_vat IS NOT NULL THEN
    IF billing.eu_vat_pattern(v_cc) IS NULL THEN
      RAISE EXCEPTION 'vat_number: % is not in the EU; only EU VAT numbers are taken', v_cc
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Leave vat_number out for a business outside the EU.';
    END IF;
    IF left(v_vat, 2) <> billing.eu_vat_prefix(v_cc)
       OR substr(v_vat, 3) !~ billing.eu_vat_pattern(v_cc) THEN
      RAISE EXCEPTION 'vat_number: % is not a VAT number of %', quote_literal(vat_number), v_cc
        USING ERRCODE = 'invalid_parameter_value',
              HINT = format('A VAT number of %s starts with %s; the rest matches %s.', v_cc,
                            billing.eu_vat_prefix(v_cc), billing.eu_vat_pattern(v_cc));
    END IF;
  END IF;

  SELECT * INTO v_old FROM billing.billing_details x WHERE x.tenant_id = t.tenant_id FOR UPDATE;
  INSERT INTO billing.billing_details AS x (tenant_id, legal_name, country, postal_code, line1, city, vat_number)
  VALUES (t.tenant_id, v_name, v_cc, v_pc, line1, city, v_vat)
  ON CONFLICT (tenant_id) DO UPDATE
     SET legal_name = EXCLUDED.legal_name, country = EXCLUDED.country, postal_code = EXCLUDED.postal_code,
         line1 = EXCLUDED.line1, city = EXCLUDED.city, vat_number = EXCLUDED.vat_number,
         state = 'pending', refusal = NULL, stripe_request = NULL, version = x.version + 1,
         tax_id_status = CASE WHEN x.vat_number IS NOT DISTINCT FROM EXCLUDED.vat_number THEN x.tax_id_status END,
         -- another number: its own tax ID is followed (billing.sync_tax_id), from its first state
         stripe_tax_id = CASE WHEN x.vat_number IS NOT DISTINCT FROM EXCLUDED.vat_number THEN x.stripe_tax_id END,
         tax_id_state_at = CASE WHEN x.vat_number IS NOT DISTINCT FROM EXCLUDED.vat_number THEN x.tax_id_state_at END,
         reverse_charge = x.reverse_charge AND x.vat_number IS NOT DISTINCT FROM EXCLUDED.vat_number
                          AND x.country = EXCLUDED.country,
         updated_at = now()
  RETURNING * INTO d;
  -- reverse charge rests on a verified VAT number of that country: another
  -- number, none, or another country ends it until the new one is verified
  IF v_old.reverse_charge AND NOT d.reverse_charge AND t.stripe_customer_id IS NOT NULL THEN
    PERFORM billing.tax_exempt_send(t.tenant_id, t.stripe_customer_id, 'none');
    PERFORM billing.audit('tax.reverse_charge', t.tenant_id, jsonb_build_object(
      'reverse_charge', false,
      'basis', jsonb_build_object('vat_number', d.vat_number, 'vat_number_before', v_old.vat_number,
                                  'customer_country', d.country, 'country_before', v_old.country,
                                  'reason', 'the verified VAT number no longer stands'),
      'tax_exempt', 'none'));
  END IF;
  PERFORM billing.billing_details_send(t.tenant_id);
  PERFORM billing.audit('billing_details.set', t.tenant_id,
                        jsonb_build_object('country', v_cc, 'postal_code', v_pc, 'vat_number', v_vat,
                                           'version', d.version));
  RETURN json_build_object('state', 'pending', 'country', v_cc, 'postal_code', v_pc, 'vat_number', v_vat,
                           'version', d.version);
END
$$;

COMMENT ON FUNCTION api.set_billing_details(text, text, text, text, text, text) IS
  'The calling tenant''s billing details: legal name, address (country and postal code required) and optionally an EU VAT number (checked against its country''s shape). Stripe then validates the location; GET /rpc/billing_details shows the outcome (422 naming the field when Stripe refuses). Audited.';

CREATE OR REPLACE FUNCTION api.billing_details() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_t text := billing.jwt_tenant_id();
  d   billing.billing_details;
BEGIN
  SELECT * INTO d FROM billing.billing_details x WHERE x.tenant_id = v_t;
  IF NOT FOUND THEN
    PERFORM set_config('response.status', '404', true);
    RETURN json_build_object('state', 'none', 'hint', 'Give them with POST /rpc/set_billing_details.');
  END IF;
  IF d.state = 'refused' THEN
    PERFORM set_config('response.status', '422', true);
  END IF;
  RETURN json_build_object('state', d.state, 'legal_name', d.legal_name, 'country', d.country,
                           'postal_code', d.postal_code, 'line1', d.line1, 'city', d.city,
                           'vat_number', d.vat_number, 'vat_verification', d.tax_id_status,
                           'reverse_charge', d.reverse_charge, 'error', d.refusal, 'version', d.version);
END
$$;

COMMENT ON FUNCTION api.billing_details() IS
  'The calling tenant''s billing details and where Stripe''s validation stands: pending, valid, or refused (HTTP 422, error names the field and Stripe''s message); the VAT number''s verification (pending, verified, unverified, unavailable) and whether reverse charge applies.';

-- Stripe's answer to the details (billing.outbox_apply).
CREATE OR REPLACE FUNCTION billing.billing_details_apply(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  d     billing.billing_details;
  v_req bigint;
BEGIN
  SELECT * INTO d FROM billing.billing_details x WHERE x.tenant_id = r.tenant_id FOR UPDATE;
  IF NOT FOUND OR d.version <> (r.subject ->> 'version')::integer THEN
    RETURN;    -- details given again since: their own request decides
  END IF;
  IF r.kind = 'billing_details.update' THEN
    UPDATE billing.billing_details x SET state = 'valid', refusal = NULL, validated_at = now()
     WHERE x.tenant_id = r.tenant_id;
    PERFORM billing.audit('billing_details.valid', r.tenant_id,
                          jsonb_build_object('country', d.country, 'automatic_tax', r.response -> 'tax' ->> 'automatic_tax'));
    IF d.vat_number IS NOT NULL AND d.tax_id_status IS NULL THEN
      v_req := billing.outbox_enqueue(r.tenant_id, 'tax_id.create', 'POST',
                                      '/v1/customers/' || (r.response ->> 'id') || '/tax_ids',
                                      jsonb_build_object('type', 'eu_vat', 'value', d.vat_number),
                                      jsonb_build_object('version', d.version));
    END IF;
  ELSIF r.kind = 'tax_id.create' THEN
    PERFORM billing.sync_tax_id(r.tenant_id, r.response, false, billing.outbox_state_at(r));
  END IF;
END
$$;

COMMENT ON FUNCTION billing.billing_details_apply(billing.stripe_requests) IS
  'Stripe accepted the billing details (valid; the VAT number then sent as a tax ID) or created the tax ID.';

-- A refusal: the field Stripe names, shown to the tenant.
CREATE OR REPLACE FUNCTION billing.billing_details_failure(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_param text := coalesce(r.error ->> 'param', r.response -> 'error' ->> 'param');
  v_field text;
BEGIN
  v_field := CASE
    WHEN v_param LIKE 'address[postal_code]%' THEN 'postal_code'
    WHEN v_param LIKE 'address[country]%' THEN 'country'
    WHEN v_param LIKE 'address%' THEN 'address'
    WHEN v_param LIKE 'value%' OR r.kind = 'tax_id.create' THEN 'vat_number'
    WHEN coalesce(r.error ->> 'code', '') = 'customer_tax_location_invalid' THEN 'postal_code'
    ELSE coalesce(v_param, 'billing_details') END;
  UPDATE billing.billing_details x
     SET state = 'refused',
         refusal = jsonb_build_object('field', v_field, 'code', r.error ->> 'code',
                                      'message', coalesce(r.error ->> 'message', 'Stripe refused the billing details.'))
   WHERE x.tenant_id = r.tenant_id AND x.version = (r.subject ->> 'version')::integer;
  PERFORM billing.audit('billing_details.refused', r.tenant_id,
                        jsonb_build_object('field', v_field, 'code', r.error ->> 'code', 'kind', r.kind));
END
$$;

COMMENT ON FUNCTION billing.billing_details_failure(billing.stripe_requests) IS
  'Stripe refused the billing details (e.g. customer_tax_location_invalid) or the VAT number: refused, with the field, shown by GET /rpc/billing_details as 422.';

-- The customer's tax_exempt as decided, sent so that the last decision is
-- the one Stripe keeps: the requests about one customer's tax_exempt go out
-- one after the other.  A decision taken while an earlier request has not
-- gone out yet replaces that request's value (nothing of it reached
-- Stripe); while one may have reached Stripe (in flight, or retried after a
-- 5xx or a lost answer), the new one waits for it (after_request), so a
-- retry of the older value can never land after the newer one
-- (docs/architecture.md, "Tax").  Returns the request that carries it.
CREATE OR REPLACE FUNCTION billing.tax_exempt_send(p_tenant text, p_customer text, p_tax_exempt text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_path text := '/v1/customers/' || p_customer;
  v_id   bigint;
  r      billing.stripe_requests;
BEGIN
  IF p_tax_exempt IS NULL OR p_tax_exempt NOT IN ('none', 'exempt', 'reverse') THEN
    RAISE EXCEPTION 'tax_exempt %: not one of Stripe''s values', coalesce(quote_literal(p_tax_exempt), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Use none, exempt or reverse.';
  END IF;
  IF p_customer IS NULL THEN
    RAISE EXCEPTION 'tenant % has no Stripe customer to set tax_exempt on', p_tenant
      USING ERRCODE = 'invalid_parameter_value', HINT = 'The customer''s tax_exempt follows once it is created.';
  END IF;
  -- the newest request about this customer's tax_exempt not done yet,
  -- locked (the worker records it under the same lock); looked up again if
  -- it was done between the look and the lock
  FOR i IN 1 .. 5 LOOP
    SELECT x.request_id INTO v_id FROM billing.stripe_requests x
     WHERE x.tenant_id = p_tenant AND x.kind = 'tax_exempt.update' AND x.path = v_path
       AND x.state IN ('waiting', 'pending', 'in_flight')
     ORDER BY x.request_id DESC LIMIT 1;
    EXIT WHEN v_id IS NULL;
    SELECT * INTO r FROM billing.stripe_requests x WHERE x.request_id = v_id FOR UPDATE;
    EXIT WHEN r.state IN ('waiting', 'pending', 'in_flight');
    r := NULL;
    v_id := NULL;
  END LOOP;
  IF v_id IS NULL THEN
    RETURN billing.outbox_enqueue(p_tenant, 'tax_exempt.update', 'POST', v_path,
                                  jsonb_build_object('tax_exempt', p_tax_exempt));
  END IF;
  IF r.state IN ('waiting', 'pending') AND r.first_sent_at IS NULL THEN
    -- not gone out yet: it carries the new decision instead
    UPDATE billing.stripe_requests x SET params = x.params || jsonb_build_object('tax_exempt', p_tax_exempt),
                                         updated_at = now()
     WHERE x.request_id = r.request_id;
    RETURN r.request_id;
  END IF;
  IF r.params ->> 'tax_exempt' = p_tax_exempt THEN
    RETURN r.request_id;     -- already what goes out last
  END IF;
  RETURN billing.outbox_enqueue(p_tenant, 'tax_exempt.update', 'POST', v_path,
                                jsonb_build_object('tax_exempt', p_tax_exempt), '{}'::jsonb, r.request_id);
END
$$;

COMMENT ON FUNCTION billing.tax_exempt_send(text, text, text) IS
  'Queue the customer''s tax_exempt (none, exempt, reverse) so that the last decision is the one Stripe keeps: it replaces the value of a request that has not gone out, or waits for one that may have reached Stripe. Returns the request.';

-- A tax ID as Stripe tells of it (the answer, or customer.tax_id.* events):
-- its verification mirrored; reverse charge decided and audited.  Ordered
-- as every mirror is (docs/architecture.md, "Mirroring Stripe"): p_at is the
-- Stripe time of this state (the event's created; the answer's first
-- attempt; NULL: an operator's call, taken as the newest state); an older
-- state of the followed tax ID is ignored, and in the same second the state
-- further along wins (a decided verification over pending; of two decided
-- ones, the one that does not reverse-charge, so that a tie never leaves
-- VAT uncollected); its deletion is final.  Another tax ID of the same
-- number is followed instead only when the followed one is deleted or it
-- was created after the followed one's newest state.
CREATE OR REPLACE FUNCTION billing.sync_tax_id(p_tenant text, o jsonb, p_deleted boolean, p_at timestamptz DEFAULT NULL)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  d        billing.billing_details;
  v_status text := CASE WHEN p_deleted THEN 'deleted' ELSE coalesce(o -> 'verification' ->> 'status', 'pending') END;
  v_origin text := upper(nullif(btrim(current_setting('qes_billing.tax_origin_country')), ''));
  v_at     timestamptz := coalesce(p_at, date_trunc('second', billing.now()));
  v_id     text;
  v_rc     boolean;
  v_cust   text := (SELECT t.stripe_customer_id FROM billing.tenants t WHERE t.tenant_id = p_tenant);
  -- the order of states within one second (further along is greater)
  v_rank   text[] := ARRAY['pending', 'verified', 'unavailable', 'unverified'];
BEGIN
  SELECT * INTO d FROM billing.billing_details x WHERE x.tenant_id = p_tenant FOR UPDATE;
  IF NOT FOUND OR (o ->> 'value') IS DISTINCT FROM d.vat_number THEN
    RETURN;    -- a tax ID of a VAT number the tenant no longer gives
  END IF;
  v_id := coalesce(o ->> 'id', d.stripe_tax_id);
  IF p_at IS NULL THEN
    -- an operator's statement of the tax ID as it is now: the newest state
    v_at := greatest(v_at, d.tax_id_state_at);
  ELSIF d.stripe_tax_id IS NOT NULL AND v_id <> d.stripe_tax_id THEN
    -- another tax ID of the same number
    IF p_deleted OR NOT (d.tax_id_status = 'deleted' OR d.tax_id_state_at IS NULL
                         -- (its creation; without one, the time of this state)
                         OR coalesce(to_timestamp((o ->> 'created')::double precision), v_at) > d.tax_id_state_at) THEN
      RETURN;
    END IF;
  ELSIF d.stripe_tax_id IS NOT NULL THEN
    IF d.tax_id_status = 'deleted' THEN
      RETURN;    -- deleted is final for this tax ID
    END IF;
    IF NOT p_deleted AND d.tax_id_state_at IS NOT NULL
       AND (v_at < d.tax_id_state_at
            OR (v_at = d.tax_id_state_at
                AND coalesce(array_position(v_rank, v_status), 0) < coalesce(array_position(v_rank, d.tax_id_status), 0))) THEN
      RETURN;    -- an older state of this tax ID
    END IF;
    v_at := greatest(v_at, d.tax_id_state_at);
  END IF;
  IF billing.eu_vat_pattern(v_origin) IS NULL THEN
    v_origin := NULL;    -- not an EU member state's code (GR, not EL): reverse charge is never decided
  END IF;
  -- reverse charge: a verified EU VAT number of another member state than ours
  v_rc := v_status = 'verified' AND billing.eu_vat_pattern(d.country) IS NOT NULL
          AND v_origin IS NOT NULL AND d.country <> v_origin;
  UPDATE billing.billing_details x
     SET stripe_tax_id = v_id, tax_id_status = v_status, reverse_charge = v_rc, tax_id_state_at = v_at
   WHERE x.tenant_id = p_tenant;
  IF d.tax_id_status IS DISTINCT FROM v_status THEN
    PERFORM billing.audit('tax_id.' || v_status, p_tenant,
                          jsonb_build_object('tax_id', v_id, 'vat_number', d.vat_number));
  END IF;
  IF d.reverse_charge IS DISTINCT FROM v_rc AND v_cust IS NOT NULL THEN
    PERFORM billing.tax_exempt_send(p_tenant, v_cust, CASE WHEN v_rc THEN 'reverse' ELSE 'none' END);
    PERFORM billing.audit('tax.reverse_charge', p_tenant, jsonb_build_object(
      'reverse_charge', v_rc,
      'basis', jsonb_build_object('vat_number', d.vat_number, 'verification', v_status,
                                  'customer_country', d.country, 'origin_country', v_origin,
                                  'eu_member', billing.eu_vat_pattern(d.country) IS NOT NULL),
      'tax_exempt', CASE WHEN v_rc THEN 'reverse' ELSE 'none' END));
  END IF;
END
$$;

COMMENT ON FUNCTION billing.sync_tax_id(text, jsonb, boolean, timestamptz) IS
  'Mirror a tenant''s tax ID (verification status) as of Stripe time p_at (older states ignored, deletion final) and decide reverse charge: a verified EU VAT number of another member state than qes_billing.tax_origin_country; the customer''s tax_exempt follows in Stripe, the last decision last; audited with its basis.';

-- ---- the invoices' tax --------------------------------------------------------

-- The first of its arguments that is a JSON array, else [] (Stripe sends
-- null for a list it has nothing in, and older or newer API versions name
-- the same list differently).
CREATE OR REPLACE FUNCTION billing.json_array(VARIADIC v jsonb[]) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT x FROM unnest(v) WITH ORDINALITY AS u(x, n) WHERE jsonb_typeof(x) = 'array' ORDER BY n LIMIT 1),
                '[]'::jsonb);

COMMENT ON FUNCTION billing.json_array(jsonb[]) IS
  'The first argument that is a JSON array, else an empty array (Stripe sends null for an empty list).';

-- A line's taxes, in either API shape (tax_amounts before 2025-03-31,
-- taxes since): amount, inclusive or not, the rate (its id, or its
-- percentage when expanded) or the taxability reason.
CREATE OR REPLACE FUNCTION billing.invoice_line_taxes(l jsonb) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
          'amount', (x ->> 'amount')::bigint,
          'inclusive', coalesce((x ->> 'inclusive')::boolean, x ->> 'tax_behavior' = 'inclusive'),
          'taxable_amount', (x ->> 'taxable_amount')::bigint,
          'rate', coalesce(x -> 'tax_rate' ->> 'percentage', x -> 'tax_rate_details' -> 'tax_rate' ->> 'percentage'),
          'tax_rate', coalesce(CASE WHEN jsonb_typeof(x -> 'tax_rate') = 'string' THEN x ->> 'tax_rate' END,
                               x -> 'tax_rate' ->> 'id',
                               CASE WHEN jsonb_typeof(x -> 'tax_rate_details' -> 'tax_rate') = 'string'
                                    THEN x -> 'tax_rate_details' ->> 'tax_rate' END),
          'taxability_reason', x ->> 'taxability_reason')))
          FROM jsonb_array_elements(billing.json_array(l -> 'tax_amounts', l -> 'taxes')) x), '[]'::jsonb);

-- An invoice event that was applied: keep the invoice's tax (the newest event's).
CREATE OR REPLACE FUNCTION billing.keep_invoice_tax() RETURNS trigger
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  o       jsonb := (NEW.payload -> 'data' -> 'object')::jsonb;
  v_at    timestamptz := NEW.stripe_created;
  v_tax   bigint;
  v_no    boolean;
  v_old   billing.invoice_taxes;
BEGIN
  IF NEW.tenant_id IS NULL OR NEW.tenant_id = '' OR o ->> 'id' IS NULL
     OR NOT EXISTS (SELECT FROM billing.tenants t WHERE t.tenant_id = NEW.tenant_id) THEN
    RETURN NULL;
  END IF;
  SELECT * INTO v_old FROM billing.invoice_taxes x WHERE x.tenant_id = NEW.tenant_id AND x.stripe_invoice_id = o ->> 'id';
  IF v_old.stripe_state_at > v_at THEN
    RETURN NULL;   -- an older state of the invoice
  END IF;
  v_tax := coalesce((o ->> 'tax')::bigint,
                    (SELECT sum((x ->> 'amount')::bigint) FROM jsonb_array_elements(
                       billing.json_array(o -> 'total_tax_amounts', o -> 'total_taxes')) x),
                    (o ->> 'total')::bigint - (o ->> 'total_excluding_tax')::bigint);
  -- finalized (not a draft) while Stripe could not locate the customer
  v_no := coalesce(o ->> 'status', 'draft') <> 'draft'
          AND coalesce(o -> 'automatic_tax' ->> 'disabled_reason' = 'finalization_requires_location_inputs'
                       OR o -> 'automatic_tax' ->> 'status' = 'requires_location_inputs', false);
  INSERT INTO billing.invoice_taxes AS x (tenant_id, stripe_invoice_id, currency, subtotal, tax, total,
                                          automatic_tax_enabled, automatic_tax_status, automatic_tax_disabled_reason,
                                          finalized_without_tax, tax_lines, stripe_state_at)
  VALUES (NEW.tenant_id, o ->> 'id', coalesce(o ->> 'currency', 'usd'), (o ->> 'subtotal')::bigint, v_tax,
          (o ->> 'total')::bigint, (o -> 'automatic_tax' ->> 'enabled')::boolean, o -> 'automatic_tax' ->> 'status',
          o -> 'automatic_tax' ->> 'disabled_reason', v_no,
          coalesce((SELECT jsonb_agg(jsonb_build_object('line', l ->> 'id', 'description', l ->> 'description',
                                                        'amount', (l ->> 'amount')::bigint,
                                                        'taxes', billing.invoice_line_taxes(l)) ORDER BY n)
                      FROM jsonb_array_elements(billing.json_array(o -> 'lines' -> 'data')) WITH ORDINALITY AS e(l, n)),
                   '[]'::jsonb),
          v_at)
  ON CONFLICT (tenant_id, stripe_invoice_id) DO UPDATE
     SET currency = EXCLUDED.currency, subtotal = EXCLUDED.subtotal, tax = EXCLUDED.tax, total = EXCLUDED.total,
         automatic_tax_enabled = EXCLUDED.automatic_tax_enabled, automatic_tax_status = EXCLUDED.automatic_tax_status,
         automatic_tax_disabled_reason = EXCLUDED.automatic_tax_disabled_reason,
         finalized_without_tax = x.finalized_without_tax OR EXCLUDED.finalized_without_tax,
         tax_lines = EXCLUDED.tax_lines, stripe_state_at = EXCLUDED.stripe_state_at;
  IF v_no AND NOT coalesce(v_old.finalized_without_tax, false) THEN
    PERFORM billing.audit('invoice.finalized_without_tax', NEW.tenant_id,
                          jsonb_build_object('invoice', o ->> 'id', 'number', o ->> 'number',
                                             'automatic_tax', o -> 'automatic_tax'));
  END IF;
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.keep_invoice_tax() IS
  'Trigger: when an invoice event is applied, keep the invoice''s tax as that event shows it (unless a newer event''s is kept); an invoice finalized without tax because the location was missing is marked and audited once.';

CREATE OR REPLACE TRIGGER keep_invoice_tax AFTER UPDATE OF state ON billing.webhook_events
  FOR EACH ROW WHEN (NEW.state = 'applied' AND NEW.event_type LIKE 'invoice.%')
  EXECUTE FUNCTION billing.keep_invoice_tax();

-- Prometheus: invoices finalized without tax because the location was
-- missing (the alert QesBillingInvoiceWithoutTax), and tax IDs by status.
CREATE VIEW billing.prometheus_tax AS
SELECT (SELECT count(*) FROM billing.invoice_taxes x WHERE x.finalized_without_tax) AS invoices_without_tax_total,
       (SELECT count(*) FROM billing.billing_details d WHERE d.state = 'refused') AS billing_details_refused,
       (SELECT count(*) FROM billing.billing_details d WHERE d.tax_id_status = 'pending') AS tax_ids_pending,
       (SELECT count(*) FROM billing.billing_details d WHERE d.reverse_charge) AS reverse_charge_customers;

COMMENT ON VIEW billing.prometheus_tax IS
  'Prometheus: invoices Stripe finalized without tax because the customer''s location was missing (a counter: the mark is never removed), billing details Stripe refused, VAT numbers awaiting verification, customers billed by reverse charge.';

-- ---- one-time payments: Stripe Tax's calculation, then a tax transaction ---------
--
-- A payment intent carries no tax of its own.  With qes_billing.automatic_tax
-- on, api.create_payment_intent first asks Stripe Tax for a calculation
-- (the tenant's address, the price's tax_behavior) and the payment intent
-- waits for it; the calculation's answer sets the payment intent's amount
-- to the calculation's total (billing.tax_calculation_apply).  When the
-- payment succeeds, the calculation is recorded as a tax transaction (what
-- Stripe's tax reports count).  Chosen over an invoice per payment: one
-- request more instead of three (invoice item, invoice, finalize), and the
-- payment flow the front end knows stays as it is.

CREATE OR REPLACE FUNCTION billing.tax_calculation_request(p_tenant text, p_customer text, p_payment bigint,
                                                p_amount bigint, p_currency text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_req bigint;
BEGIN
  v_req := billing.outbox_enqueue(p_tenant, 'tax.calculation', 'POST', '/v1/tax/calculations',
             jsonb_build_object('currency', p_currency, 'customer', p_customer,
                                'line_items', jsonb_build_array(jsonb_build_object(
                                   'amount', p_amount, 'reference', 'payment_' || p_payment,
                                   'tax_behavior', current_setting('qes_billing.tax_behavior'))),
                                'expand', jsonb_build_array('line_items')),
             jsonb_build_object('payment_id', p_payment));
  INSERT INTO billing.payment_taxes (tenant_id, payment_id, amount_subtotal, calculation_request)
  VALUES (p_tenant, p_payment, p_amount, v_req);
  RETURN v_req;
END
$$;

COMMENT ON FUNCTION billing.tax_calculation_request(text, text, bigint, bigint, text) IS
  'Queue Stripe Tax''s calculation for a one-time payment (the payment intent waits for it).';

CREATE OR REPLACE FUNCTION billing.tax_calculation_apply(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  o       jsonb := r.response;
  v_pay   bigint := (r.subject ->> 'payment_id')::bigint;
  v_total bigint := (o ->> 'amount_total')::bigint;
  v_tax   bigint := coalesce((o ->> 'tax_amount_exclusive')::bigint, 0) + coalesce((o ->> 'tax_amount_inclusive')::bigint, 0);
BEGIN
  IF r.kind = 'tax.transaction' THEN
    UPDATE billing.payment_taxes x SET transaction_id = o ->> 'id'
     WHERE x.tenant_id = r.tenant_id AND x.payment_id = v_pay;
    RETURN;
  END IF;
  UPDATE billing.payment_taxes x
     SET calculation_id = o ->> 'id', tax = v_tax, amount_total = v_total, tax_breakdown = o -> 'tax_breakdown'
   WHERE x.tenant_id = r.tenant_id AND x.payment_id = v_pay;
  -- the payment intent waiting for this calculation charges its total
  UPDATE billing.stripe_requests c
     SET params = c.params || jsonb_build_object('amount', v_total,
                                                 'metadata', coalesce(c.params -> 'metadata', '{}'::jsonb)
                                                             || jsonb_build_object('tax_calculation', o ->> 'id'))
   WHERE c.after_request = r.request_id AND c.state = 'waiting' AND c.kind = 'payment_intent.create';
  UPDATE billing.payments p SET amount = v_total, updated_at = now()
   WHERE p.tenant_id = r.tenant_id AND p.payment_id = v_pay AND v_total > 0;
  PERFORM billing.audit('tax.calculated', r.tenant_id,
                        jsonb_build_object('payment_id', v_pay, 'calculation', o ->> 'id', 'tax', v_tax,
                                           'amount_total', v_total,
                                           'taxability_reason', o -> 'tax_breakdown' -> 0 ->> 'taxability_reason'));
END
$$;

COMMENT ON FUNCTION billing.tax_calculation_apply(billing.stripe_requests) IS
  'Stripe Tax''s calculation for a one-time payment: kept, and the waiting payment intent charges its total; or the tax transaction recorded.';

-- A one-time payment that succeeded: its calculation becomes a tax transaction.
CREATE OR REPLACE FUNCTION billing.record_tax_transaction() RETURNS trigger
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  x billing.payment_taxes;
BEGIN
  SELECT * INTO x FROM billing.payment_taxes t
   WHERE t.tenant_id = NEW.tenant_id AND t.payment_id = NEW.payment_id FOR UPDATE;
  IF FOUND AND x.calculation_id IS NOT NULL AND x.transaction_request IS NULL THEN
    UPDATE billing.payment_taxes t
       SET transaction_request = billing.outbox_enqueue(NEW.tenant_id, 'tax.transaction', 'POST',
                                   '/v1/tax/transactions/create_from_calculation',
                                   jsonb_build_object('calculation', x.calculation_id,
                                                      'reference', 'payment_' || NEW.payment_id),
                                   jsonb_build_object('payment_id', NEW.payment_id))
     WHERE t.tenant_id = NEW.tenant_id AND t.payment_id = NEW.payment_id;
  END IF;
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.record_tax_transaction() IS
  'Trigger: a one-time payment with a tax calculation succeeded: record it as a Stripe Tax transaction, once.';

CREATE OR REPLACE TRIGGER record_tax_transaction AFTER UPDATE OF status ON billing.payments
  FOR EACH ROW WHEN (NEW.status = 'succeeded' AND OLD.status IS DISTINCT FROM 'succeeded' AND NEW.kind = 'one_time')
  EXECUTE FUNCTION billing.record_tax_transaction();

CREATE OR REPLACE FUNCTION billing.current_subscription(p_tenant text) RETURNS billing.subscriptions
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT * FROM billing.subscriptions s
   WHERE s.tenant_id = p_tenant AND s.status NOT IN ('canceled', 'incomplete_expired')
   ORDER BY s.subscription_id DESC LIMIT 1
$$;

CREATE OR REPLACE FUNCTION api.create_subscription(plan text, "interval" text DEFAULT 'month') RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  t      billing.tenants := billing.calling_tenant();
  pr     billing.prices := billing.check_plan_interval(plan, "interval");
  cur    billing.subscriptions := billing.current_subscription(t.tenant_id);
  v_sub  billing.subscriptions;
  v_cust bigint;
  v_req  bigint;
BEGIN
  -- an earlier attempt may have created it in Stripe: not a second one while that is checked
  PERFORM billing.check_no_unknown_outcome(t.tenant_id, 'subscription.create');
  IF cur.subscription_id IS NOT NULL AND (cur.stripe_subscription_id IS NOT NULL OR cur.plan_id <> 'free') THEN
    RAISE EXCEPTION 'tenant % already has a subscription (plan %, status %)', t.tenant_id, cur.plan_id, cur.status
      USING ERRCODE = 'unique_violation', HINT = 'Change it with POST /rpc/update_subscription.';
  END IF;
  IF pr.unit_amount = 0 THEN
    IF cur.subscription_id IS NOT NULL THEN
      RAISE EXCEPTION 'tenant % is already on the % plan', t.tenant_id, cur.plan_id
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Choose a paid plan to upgrade.';
    END IF;
    INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status)
    VALUES (t.tenant_id, pr.plan_id, pr.billing_interval, 'active') RETURNING * INTO v_sub;
    PERFORM billing.audit_features(t.tenant_id, v_sub.subscription_id, NULL, NULL, v_sub.plan_id, v_sub.status);
    PERFORM billing.audit('subscription.created', t.tenant_id,
                          jsonb_build_object('subscription_id', v_sub.subscription_id, 'plan', pr.plan_id,
                                             'interval', pr.billing_interval, 'local', true));
  ELSE
    -- the local Free subscription ends; the paid one waits for its first payment
    UPDATE billing.subscriptions SET status = 'canceled', updated_at = now()
     WHERE tenant_id = t.tenant_id AND subscription_id = cur.subscription_id;
    INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status)
    VALUES (t.tenant_id, pr.plan_id, pr.billing_interval, 'incomplete') RETURNING * INTO v_sub;
    PERFORM billing.audit_features(t.tenant_id, v_sub.subscription_id, NULL, NULL, v_sub.plan_id, v_sub.status);
    v_cust := billing.customer_request(t);
    v_req := billing.outbox_enqueue(t.tenant_id, 'subscription.create', 'POST', '/v1/subscriptions',
               jsonb_build_object('items', jsonb_build_array(jsonb_build_object('price', pr.stripe_price_id))
                                           || billing.metered_items_for(pr.plan_id, pr.billing_interval),
                                  'payment_behavior', 'default_incomplete',
                                  'payment_settings', jsonb_build_object('save_default_payment_method', 'on_subscription'),
                                  'expand', jsonb_build_array('latest_invoice.payment_intent'),
                                  'metadata', jsonb_build_object('tenant_id', t.tenant_id,
                                                                 'subscription_id', v_sub.subscription_id))
               -- VAT through Stripe Tax (sql/install/91_tax.sql)
               || CASE WHEN current_setting('qes_billing.automatic_tax')::boolean
                       THEN '{"automatic_tax": {"enabled": true}}'::jsonb ELSE '{}' END
               || CASE WHEN v_cust IS NULL THEN jsonb_build_object('customer', t.stripe_customer_id) ELSE '{}' END,
               jsonb_build_object('subscription_id', v_sub.subscription_id),
               p_after => v_cust, p_inherit => CASE WHEN v_cust IS NOT NULL THEN 'customer' END);
    PERFORM billing.audit('subscription.create_requested', t.tenant_id,
                          jsonb_build_object('subscription_id', v_sub.subscription_id, 'plan', pr.plan_id,
                                             'interval', pr.billing_interval, 'request_id', v_req,
                                             'customer_request_id', v_cust));
  END IF;
  RETURN json_build_object('subscription_id', v_sub.subscription_id, 'plan', v_sub.plan_id,
                           'interval', v_sub.billing_interval, 'status', v_sub.status);
END
$$;

CREATE OR REPLACE FUNCTION api.update_subscription(plan text DEFAULT NULL, "interval" text DEFAULT NULL,
                                        cancel_at_period_end boolean DEFAULT NULL, proration text DEFAULT NULL)
  RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  t        billing.tenants := billing.calling_tenant();
  cur      billing.subscriptions := billing.current_subscription(t.tenant_id);
  v_plan   text := coalesce(plan, cur.plan_id);
  v_int    text := coalesce("interval", cur.billing_interval);
  v_cancel boolean := cancel_at_period_end;
  pr       billing.prices;
  v_params jsonb := '{}';
  v_change jsonb;
  v_up     boolean;
  v_req    bigint;
BEGIN
  IF plan IS NULL AND "interval" IS NULL AND cancel_at_period_end IS NULL THEN
    RAISE EXCEPTION 'nothing to change'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give plan, interval or cancel_at_period_end.';
  END IF;
  IF proration IS NOT NULL AND proration NOT IN ('create_prorations', 'always_invoice', 'none') THEN
    RAISE EXCEPTION 'unknown proration behaviour: %', quote_literal(proration)
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Use create_prorations, always_invoice or none.';
  END IF;
  IF cur.subscription_id IS NULL OR cur.stripe_subscription_id IS NULL
     OR cur.status NOT IN ('active', 'trialing', 'past_due') OR cur.stripe_item_id IS NULL THEN
    RAISE EXCEPTION 'tenant % has no active paid subscription to change', t.tenant_id
      USING ERRCODE = 'invalid_parameter_value',
            DETAIL = CASE WHEN cur.subscription_id IS NULL THEN 'The tenant is on Free.'
                          ELSE format('The subscription is %s (plan %s).', cur.status, cur.plan_id) END,
            HINT = 'Subscribe with POST /rpc/create_subscription; a new subscription can be changed once its first payment succeeded.';
  END IF;
  IF cur.pending_change IS NOT NULL THEN
    RAISE EXCEPTION 'a change of this subscription is already in progress'
      USING ERRCODE = 'unique_violation', DETAIL = cur.pending_change::text,
            HINT = 'Wait until GET /subscription shows no pending_change.';
  END IF;

  IF v_plan = 'free' THEN
    -- to Free: the paid subscription ends with its period
    IF v_cancel IS FALSE THEN
      RAISE EXCEPTION 'moving to Free cancels the subscription at period end'
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Omit cancel_at_period_end.';
    END IF;
    v_plan := cur.plan_id;
    v_int := cur.billing_interval;
    v_cancel := true;
  END IF;
  pr := billing.check_plan_interval(v_plan, v_int);
  IF v_plan = cur.plan_id AND v_int = cur.billing_interval
     AND (v_cancel IS NULL OR v_cancel = cur.cancel_at_period_end) THEN
    RAISE EXCEPTION 'the subscription is already on plan % (%)%', v_plan, v_int,
                    CASE WHEN v_cancel THEN ', cancelling at period end' WHEN v_cancel IS FALSE THEN ', renewing' ELSE '' END
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  IF v_plan <> cur.plan_id OR v_int <> cur.billing_interval THEN
    -- an upgrade (higher tier, or monthly to yearly) is charged at once and
    -- refused by Stripe if the payment fails, so a decline changes nothing
    v_up := (SELECT tier FROM billing.plans WHERE plan_id = v_plan) > (SELECT tier FROM billing.plans WHERE plan_id = cur.plan_id)
            OR (v_plan = cur.plan_id AND v_int = 'year');
    proration := coalesce(proration, CASE WHEN v_up THEN 'always_invoice' ELSE 'create_prorations' END);
    v_params := jsonb_build_object(
      'items', jsonb_build_array(jsonb_build_object('id', cur.stripe_item_id, 'price', pr.stripe_price_id))
               || billing.metered_items_change(cur, pr.plan_id, pr.billing_interval),   -- 94_meters.sql
      'proration_behavior', proration,
      'payment_behavior', 'error_if_incomplete',
      'metadata', jsonb_build_object('tenant_id', t.tenant_id, 'subscription_id', cur.subscription_id));
    -- a plan change keeps the subscription renewing unless told otherwise
    v_cancel := coalesce(v_cancel, false);
  END IF;
  IF v_cancel IS NOT NULL THEN
    v_params := v_params || jsonb_build_object('cancel_at_period_end', v_cancel);
  END IF;

  v_req := billing.outbox_enqueue(t.tenant_id, 'subscription.update', 'POST',
                                  '/v1/subscriptions/' || cur.stripe_subscription_id, v_params,
                                  jsonb_build_object('subscription_id', cur.subscription_id));
  v_change := jsonb_strip_nulls(jsonb_build_object('plan', v_plan, 'interval', v_int,
                                                   'cancel_at_period_end', v_cancel, 'proration', proration,
                                                   'request_id', v_req));
  UPDATE billing.subscriptions SET pending_change = v_change, last_error = NULL, updated_at = now()
   WHERE tenant_id = t.tenant_id AND subscription_id = cur.subscription_id;
  PERFORM billing.audit('subscription.change_requested', t.tenant_id,
                        v_change || jsonb_build_object('subscription_id', cur.subscription_id,
                                                       'from_plan', cur.plan_id, 'from_interval', cur.billing_interval));
  RETURN json_build_object('subscription_id', cur.subscription_id, 'plan', cur.plan_id,
                           'interval', cur.billing_interval, 'status', cur.status, 'pending_change', v_change);
END
$$;

CREATE OR REPLACE FUNCTION api.create_payment_intent(amount bigint, currency text DEFAULT 'usd', description text DEFAULT NULL)
  RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  t     billing.tenants := billing.calling_tenant();
  v_cur text := lower(currency);
  p     billing.payments;
  v_req bigint;
  v_calc bigint;
BEGIN
  IF amount IS NULL OR amount < 50 OR amount > 99999999 THEN
    RAISE EXCEPTION 'invalid amount: %', coalesce(amount::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'The amount is in the smallest currency unit (cents), from 50 to 99999999.';
  END IF;
  IF v_cur IS NULL OR v_cur NOT IN ('usd', 'eur', 'gbp', 'chf') THEN
    RAISE EXCEPTION 'unsupported currency: %', coalesce(quote_literal(currency), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Supported currencies: usd, eur, gbp, chf.';
  END IF;
  IF length(description) > 1000 THEN
    RAISE EXCEPTION 'description is longer than 1000 characters' USING ERRCODE = 'string_data_right_truncation';
  END IF;
  IF t.stripe_customer_id IS NULL THEN
    RAISE EXCEPTION 'tenant % has no Stripe customer yet', t.tenant_id
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A Stripe customer is created with the first paid subscription (POST /rpc/create_subscription).';
  END IF;
  INSERT INTO billing.payments (tenant_id, kind, amount, currency, description, status)
  VALUES (t.tenant_id, 'one_time', amount, v_cur, description, 'pending') RETURNING * INTO p;
  -- VAT through Stripe Tax: the payment intent charges the calculation's total (91_tax.sql)
  IF current_setting('qes_billing.automatic_tax')::boolean THEN
    v_calc := billing.tax_calculation_request(t.tenant_id, t.stripe_customer_id, p.payment_id, amount, v_cur);
  END IF;
  v_req := billing.outbox_enqueue(t.tenant_id, 'payment_intent.create', 'POST', '/v1/payment_intents',
             jsonb_strip_nulls(jsonb_build_object(
               'amount', amount, 'currency', v_cur, 'customer', t.stripe_customer_id, 'description', description,
               'automatic_payment_methods', jsonb_build_object('enabled', true),
               'metadata', jsonb_build_object('tenant_id', t.tenant_id, 'payment_id', p.payment_id))),
             jsonb_build_object('payment_id', p.payment_id), p_after => v_calc);
  PERFORM billing.audit('payment_intent.requested', t.tenant_id,
                        jsonb_build_object('payment_id', p.payment_id, 'amount', amount, 'currency', v_cur,
                                           'request_id', v_req));
  RETURN json_build_object('payment_id', p.payment_id, 'amount', p.amount, 'currency', p.currency, 'status', p.status);
END
$$;

CREATE VIEW api.subscription WITH (security_invoker = true) AS
SELECT s.subscription_id,
       s.plan_id AS plan,
       s.billing_interval AS "interval",
       s.status,
       CASE WHEN s.status IN ('active', 'trialing')
                 OR (s.status = 'past_due' AND (s.grace_until IS NULL OR s.grace_until > billing.now()))
            THEN s.plan_id ELSE 'free' END AS limits_plan,
       CASE WHEN s.status = 'incomplete' THEN s.client_secret END AS client_secret,
       s.current_period_start,
       s.current_period_end,
       s.cancel_at_period_end,
       s.trial_end,
       s.grace_until,
       s.pending_change,
       s.last_error ->> 'message' AS last_error,
       s.last_error ->> 'decline_code' AS decline_code,
       s.stripe_subscription_id,
       s.updated_at
  FROM billing.subscriptions s
 WHERE s.subscription_id = (SELECT max(s2.subscription_id) FROM billing.subscriptions s2 WHERE s2.tenant_id = s.tenant_id);

COMMENT ON VIEW api.subscription IS
  'The calling tenant''s subscription (the latest): plan, interval, Stripe status, limits_plan (whose limits apply now), client_secret while the first payment is awaited, current period, cancel_at_period_end, a change in progress and the last error. No row: the tenant is on Free.';

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

CREATE OR REPLACE FUNCTION billing.outcome_unknown(r billing.stripe_requests) RETURNS boolean
  LANGUAGE sql IMMUTABLE
RETURN r.kind IN ('customer.create', 'subscription.create')
   AND r.error ->> 'category' IN ('network', 'server', 'conflict', 'rate_limited', 'apply', 'expired');

COMMENT ON FUNCTION billing.outcome_unknown(billing.stripe_requests) IS
  'Whether a failed customer or subscription request may still have created its object in Stripe (no definite answer: network, 5xx, 409, 429, an answer that could not be applied, or a retry refused because Stripe no longer keeps its Idempotency-Key).';

-- Queue the lookup of a failed request's object.
CREATE OR REPLACE FUNCTION billing.resolve_request(r billing.stripe_requests) RETURNS bigint
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
CREATE OR REPLACE FUNCTION billing.resolve_fetched(p_req billing.stripe_requests) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.request_recorded() RETURNS trigger
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

CREATE OR REPLACE TRIGGER request_recorded AFTER UPDATE OF state ON billing.stripe_requests
  FOR EACH ROW WHEN (OLD.state <> NEW.state
                     AND (NEW.state = 'failed'
                          OR (NEW.state = 'succeeded'
                              AND (NEW.kind LIKE 'mirror.%' OR NEW.kind LIKE 'reconcile.%' OR NEW.kind LIKE 'resolve.%'))))
  EXECUTE FUNCTION billing.request_recorded();

-- While a customer or subscription is looked up, the tenant may not start
-- another subscription (a one-time payment may be made twice on purpose).
CREATE OR REPLACE FUNCTION billing.check_no_unknown_outcome(p_tenant text, p_kind text) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.dispute_evidence_limits() RETURNS jsonb
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN '{"access_activity_log": 20000, "uncategorized_text": 20000, "product_description": 5000,
         "service_date": 5000, "customer_name": 5000, "customer_email_address": 5000,
         "_total": 150000}'::jsonb;

COMMENT ON FUNCTION billing.dispute_evidence_limits() IS
  'The most characters Stripe takes in each evidence field qes_billing fills, and in all of them together (_total).';

-- A text cut to fit a limit, saying so.
CREATE OR REPLACE FUNCTION billing.dispute_fit(p_text text, p_limit integer) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN length(p_text) <= p_limit THEN p_text
            ELSE left(p_text, p_limit - 40) || E'\n[... shortened to fit Stripe''s limit]' END;

CREATE OR REPLACE FUNCTION billing.dispute_money(p_amount bigint, p_currency text) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_char(p_amount / 100.0, 'FM999999999990.00') || ' ' || upper(p_currency);

CREATE OR REPLACE FUNCTION billing.dispute_utc(p_at timestamptz) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"');

-- The evidence for one dispute, from the tenant's own rows.
CREATE OR REPLACE FUNCTION billing.dispute_assemble(p_tenant text, p_dispute text,
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
CREATE OR REPLACE FUNCTION billing.sync_dispute(p_tenant text, o jsonb, p_at timestamptz, p_type text DEFAULT NULL)
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
CREATE OR REPLACE FUNCTION billing.dispute_stage(d billing.disputes) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.dispute_submit(p_tenant text, p_dispute text, p_auto boolean) RETURNS bigint
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

CREATE OR REPLACE FUNCTION billing.submit_dispute_evidence(p_dispute text) RETURNS bigint
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

CREATE OR REPLACE FUNCTION api.submit_dispute_evidence(dispute text) RETURNS json
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
CREATE OR REPLACE FUNCTION billing.dispute_apply_answer(r billing.stripe_requests) RETURNS void
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

CREATE OR REPLACE FUNCTION billing.dispute_apply_failure(r billing.stripe_requests) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.dispute_closed(d billing.disputes) RETURNS void
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
CREATE OR REPLACE FUNCTION billing.dispute_timers() RETURNS integer
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

-- Usage billed through Stripe Billing Meters (docs/architecture.md, "Usage
-- billed through meters").  The tables: 01_tables.sql (metered_prices,
-- meters, meter_events, meter_event_usage, meter_state).
--
--   setup     billing.setup_meters(run): a meter per billable metric and a
--             metered price (recurring[meter]) per active metered price,
--             found again by event_name and lookup_key (re-runnable)
--   pass      billing.meter_tick(), from the worker's tick: every
--             pass_interval, billing.meter_queue() gathers the billable
--             usage rows no meter event carries yet -- committed rows only,
--             so usage whose transaction rolled back is never seen -- into
--             one meter event per tenant and metric, and queues it in the
--             outbox (kind meter.event) with Idempotency-Key and identifier
--             derived from those rows.  record_usage is unchanged: it only
--             writes locally.
--   answers   billing.meter_apply / billing.meter_apply_failure, from
--             billing.outbox_apply and outbox_apply_failure: delivered;
--             Stripe's "an event already exists with identifier" is
--             delivered too (a lost answer's retry after the key expired)
--   check     billing.meter_reconcile(): Stripe's event summaries per
--             customer and meter against the local sums; differences in
--             billing.drift_report (source meters), failed events re-sent
--             with their identifier where that is safe
--   correct   billing.void_usage(): a voided row's meter event is cancelled
--             (meter_event_adjustments) inside Stripe's window and the
--             event's other rows sent again; after it, a credit by hand

-- ---- setup ------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION billing.setup_meters(p_run text) RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  n integer;
BEGIN
  PERFORM billing.require_secret_key();
  INSERT INTO billing.meters (metric, event_name, aggregation)
  SELECT DISTINCT mp.metric, 'qes_' || mp.metric, CASE m.kind WHEN 'gauge' THEN 'last' ELSE 'sum' END
    FROM billing.metered_prices mp JOIN billing.metrics m USING (metric)
   WHERE mp.active
  ON CONFLICT (metric) DO NOTHING;
  SELECT count(*) INTO n FROM billing.metered_prices WHERE active;
  IF n = 0 THEN
    RETURN 0;   -- nothing is billed: no meter is needed
  END IF;
  PERFORM billing.audit('setup.requested', NULL, jsonb_build_object('run', p_run, 'step', 'meters'));
  PERFORM billing.outbox_enqueue(NULL, 'meter.setup.list', 'GET', '/v1/billing/meters',
                                 jsonb_build_object('limit', 100, 'status', 'active'), p_run_id => p_run);
  RETURN n;
END
$$;

COMMENT ON FUNCTION billing.setup_meters(text) IS
  'Queue the lookups that find or create a Stripe meter per billable metric (event_name qes_<metric>; sum, or last for the storage gauge) and a metered price per active billing.metered_prices row. Re-runnable.';

-- The metered prices, once every meter has its Stripe id.
CREATE OR REPLACE FUNCTION billing.meter_setup_prices(p_run text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM billing.meters m JOIN billing.metered_prices mp USING (metric)
              WHERE mp.active AND m.stripe_meter_id IS NULL) THEN
    RETURN;   -- a meter is still being made: its answer calls this again
  END IF;
  PERFORM billing.outbox_enqueue(NULL, 'meter.setup.prices.list', 'GET', '/v1/prices',
            jsonb_build_object('lookup_keys', (SELECT jsonb_agg(p.price_key ORDER BY p.price_key)
                                                 FROM billing.metered_prices p WHERE p.active),
                               'limit', 100),
            p_run_id => p_run);
END
$$;

-- The form of a metered price: graduated tiers when some units are included.
CREATE OR REPLACE FUNCTION billing.meter_price_params(mp billing.metered_prices) RETURNS jsonb
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT jsonb_build_object(
           'product', coalesce(pl.stripe_product_id, 'qes_' || mp.plan_id),
           'currency', mp.currency,
           'recurring', jsonb_build_object('interval', mp.billing_interval, 'usage_type', 'metered',
                                           'meter', m.stripe_meter_id),
           'lookup_key', mp.price_key, 'transfer_lookup_key', true,
           'nickname', format('%s %s beyond %s', pl.name, mp.metric, mp.included),
           'metadata', jsonb_build_object('qes_plan', mp.plan_id, 'qes_metric', mp.metric,
                                          'qes_price', mp.price_key, 'qes_included', mp.included))
         || CASE WHEN mp.included > 0 THEN
              jsonb_build_object('billing_scheme', 'tiered', 'tiers_mode', 'graduated',
                                 'tiers', jsonb_build_array(
                                   jsonb_build_object('up_to', mp.included, 'unit_amount', 0),
                                   jsonb_build_object('up_to', 'inf', 'unit_amount_decimal', mp.unit_amount_decimal::text)))
            ELSE jsonb_build_object('billing_scheme', 'per_unit', 'unit_amount_decimal', mp.unit_amount_decimal::text) END
    FROM billing.plans pl, billing.meters m
   WHERE pl.plan_id = mp.plan_id AND m.metric = mp.metric
$$;

-- ---- subscriptions' metered items ----------------------------------------------------

-- The metered items a new subscription of this plan and interval gets: the
-- metered prices in the currency of its licensed price, which is usd
-- (billing.check_plan_interval, 92_subscriptions.sql): a subscription's
-- prices all share one currency, and one active metered price per metric
-- is kept per currency.
CREATE OR REPLACE FUNCTION billing.metered_items_for(p_plan text, p_interval text) RETURNS jsonb
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(jsonb_agg(jsonb_build_object('price', mp.stripe_price_id) ORDER BY mp.price_key), '[]')
    FROM billing.metered_prices mp
   WHERE mp.plan_id = p_plan AND mp.billing_interval = p_interval AND mp.active AND mp.stripe_price_id IS NOT NULL
     AND mp.currency = 'usd'
$$;

COMMENT ON FUNCTION billing.metered_items_for(text, text) IS
  'The subscription items (metered prices) a subscription of the plan and interval carries, in the currency of its licensed price (usd): [{"price": ...}].';

-- What a plan change does to the metered items: the current ones deleted,
-- the new plan's added (none when neither has any).
CREATE OR REPLACE FUNCTION billing.metered_items_change(s billing.subscriptions, p_plan text, p_interval text) RETURNS jsonb
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce((SELECT jsonb_agg(jsonb_build_object('id', i ->> 'id', 'deleted', true))
                     FROM jsonb_array_elements(s.metered_items) i), '[]')
         || billing.metered_items_for(p_plan, p_interval)
$$;

-- A Stripe subscription's licensed item (the plan's price) and its metered items.
CREATE OR REPLACE FUNCTION billing.base_item_of(o jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT i ->> 'id' FROM jsonb_array_elements(o -> 'items' -> 'data') WITH ORDINALITY x(i, n)
                  WHERE coalesce(i -> 'price' -> 'recurring' ->> 'usage_type', 'licensed') <> 'metered'
                  ORDER BY n LIMIT 1),
                o -> 'items' -> 'data' -> 0 ->> 'id');

CREATE OR REPLACE FUNCTION billing.metered_items_of(o jsonb) RETURNS jsonb
  LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT jsonb_agg(jsonb_build_object('id', i ->> 'id', 'price', i -> 'price' ->> 'id') ORDER BY n)
                   FROM jsonb_array_elements(o -> 'items' -> 'data') WITH ORDINALITY x(i, n)
                  WHERE i -> 'price' -> 'recurring' ->> 'usage_type' = 'metered'), '[]');

-- ---- the pass -----------------------------------------------------------------------

-- Stripe's dedup identifier of a meter event: the event's own (its tenant,
-- metric and id, and the idempotency keys of the usage rows it carries),
-- computed once when the event is made and stored, so every attempt, a
-- stale reclaim and a re-send by reconciliation carry the same one, and no
-- two events ever share one -- not even an event that carries again the
-- same keys after another was cancelled, or a key voided and recorded anew
-- (docs/architecture.md, "Usage billed through meters").  Every part is
-- length-prefixed, so no key (whatever characters it holds) can be read as
-- two, nor two as one.
CREATE OR REPLACE FUNCTION billing.meter_identifier(p_tenant text, p_metric text, p_meter_event_id bigint, p_keys text[])
  RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN 'qes_' || encode(sha256(convert_to(
         'qes_meter_event:2:' || length(p_tenant) || ':' || p_tenant || length(p_metric) || ':' || p_metric
         || length(p_meter_event_id::text) || ':' || p_meter_event_id::text
         || coalesce(cardinality(p_keys), 0) || ':'
         || coalesce((SELECT string_agg(length(k) || ':' || k, '' ORDER BY n)
                        FROM unnest(p_keys) WITH ORDINALITY x(k, n)), ''),
         'UTF8')), 'hex');

COMMENT ON FUNCTION billing.meter_identifier(text, text, bigint, text[]) IS
  'Stripe''s identifier of one meter event: a hash of its tenant, metric, meter_event_id and usage rows'' idempotency keys, each part length-prefixed (unambiguous whatever the keys hold). Unique per event; stored with it, so every retry carries the same.';

-- The billable usage rows no meter event carries yet, grouped as the next
-- meter events would carry them: one per tenant and metric (none while one
-- is under way for them: Stripe takes one concurrent call per customer and
-- meter), of the oldest period with unsent rows; all tenants, or one.
-- The metered price is the one in the subscription's currency: that of its
-- licensed price (billing.prices, by Stripe price id), else usd, the only
-- currency a subscription is created in (check_plan_interval,
-- 92_subscriptions.sql) -- metered_prices keeps one active price per
-- currency, and any other would count the same usage twice.
CREATE OR REPLACE FUNCTION billing.meter_unsent(p_now timestamptz, p_tenant text DEFAULT NULL)
  RETURNS TABLE (tenant_id text, metric text, event_name text, stripe_customer_id text, period_start timestamptz,
                 value bigint, event_at timestamptz, keys text[], first_recorded timestamptz)
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  WITH live AS (
    SELECT s.tenant_id, s.current_period_start, s.billing_interval, t.stripe_customer_id, mp.metric, m.event_name,
           m.aggregation
      FROM billing.subscriptions s
      LEFT JOIN billing.prices pr ON pr.stripe_price_id = s.stripe_price_id
      JOIN billing.metered_prices mp ON mp.plan_id = s.plan_id AND mp.billing_interval = s.billing_interval
                                    AND mp.currency = coalesce(pr.currency, 'usd')
      JOIN billing.meters m ON m.metric = mp.metric AND m.stripe_meter_id IS NOT NULL
      JOIN billing.tenants t ON t.tenant_id = s.tenant_id
     WHERE mp.active AND mp.stripe_price_id IS NOT NULL
       AND (p_tenant IS NULL OR s.tenant_id = p_tenant)
       AND s.stripe_subscription_id IS NOT NULL AND s.status IN ('trialing', 'active', 'past_due')
       AND s.current_period_start IS NOT NULL AND t.stripe_customer_id IS NOT NULL
       AND NOT billing.tenant_fenced(s.tenant_id)   -- its partition is moving (src/fence.c)
       AND NOT EXISTS (SELECT 1 FROM billing.meter_events e
                        WHERE e.tenant_id = s.tenant_id AND e.metric = mp.metric
                          AND e.state IN ('queued', 'cancel_queued'))),
  -- the current period's rows, and the previous period's not sent yet (usage
  -- recorded just before a renewal was mirrored, or reported late: Stripe
  -- bills it on that period's invoice while the invoice is still a draft)
  fresh AS (
    SELECT l.tenant_id, l.metric, l.event_name, l.aggregation, l.stripe_customer_id, u.period_start,
           u.idempotency_key, u.quantity, u.occurred_at, u.recorded_at
      FROM live l
      JOIN billing.usage_events u ON u.tenant_id = l.tenant_id AND u.metric = l.metric
                                 AND u.period_start >= l.current_period_start
                                      - CASE l.billing_interval WHEN 'year' THEN interval '1 year' ELSE interval '1 month' END
     WHERE u.occurred_at > p_now - interval '34 days'
       AND NOT EXISTS (SELECT 1 FROM billing.meter_event_usage x
                        WHERE x.tenant_id = u.tenant_id AND x.idempotency_key = u.idempotency_key)),
  -- one period per tenant and metric and pass (the oldest): one call per
  -- customer and meter at a time
  oldest AS (
    SELECT f.* FROM fresh f
     WHERE f.period_start = (SELECT min(g.period_start) FROM fresh g
                              WHERE g.tenant_id = f.tenant_id AND g.metric = f.metric))
  SELECT f.tenant_id, f.metric, f.event_name, f.stripe_customer_id, f.period_start,
         CASE WHEN f.aggregation = 'sum' THEN least(sum(f.quantity), 9223372036854775807)::bigint
              ELSE (array_agg(f.quantity ORDER BY f.occurred_at DESC, f.recorded_at DESC, f.idempotency_key))[1] END,
         -- in the rows' period; Stripe takes timestamps of the last 35
         -- days, at most 5 minutes ahead
         least(greatest(max(f.occurred_at), p_now - interval '34 days', f.period_start), p_now),
         array_agg(f.idempotency_key ORDER BY f.idempotency_key),
         min(f.recorded_at)
    FROM oldest f
   GROUP BY f.tenant_id, f.metric, f.event_name, f.stripe_customer_id, f.period_start, f.aggregation
$$;

COMMENT ON FUNCTION billing.meter_unsent(timestamptz, text) IS
  'The billable usage rows no meter event carries yet, as the next meter events would carry them (one per tenant and metric, the oldest period first; none while one is under way), in the metered price of the subscription''s currency; every tenant''s, or one''s.';

-- Make and queue the next meter events (of every tenant, or of one), at
-- most p_limit: the events, the rows each carries, their requests.
-- Returns how many.
CREATE OR REPLACE FUNCTION billing.meter_queue_some(p_now timestamptz, p_limit integer, p_tenant text DEFAULT NULL)
  RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_seq regclass := pg_get_serial_sequence('billing.meter_events', 'meter_event_id')::regclass;
  v_ev  text[];
  x     text;
BEGIN
  -- the event's id is drawn first: its identifier is made from it
  WITH grouped AS (
    SELECT g.*, nextval(v_seq) AS new_id
      FROM (SELECT u.* FROM billing.meter_unsent(p_now, p_tenant) u ORDER BY u.first_recorded LIMIT p_limit) g),
  ev AS (
    INSERT INTO billing.meter_events (tenant_id, meter_event_id, identifier, metric, event_name, stripe_customer_id,
                                      value, event_at, period_start, usage_rows)
    OVERRIDING SYSTEM VALUE
    SELECT g.tenant_id, g.new_id, billing.meter_identifier(g.tenant_id, g.metric, g.new_id, g.keys), g.metric,
           g.event_name, g.stripe_customer_id, g.value, g.event_at, g.period_start, cardinality(g.keys)
      FROM grouped g
    RETURNING meter_events.tenant_id, meter_events.meter_event_id),
  used AS (
    INSERT INTO billing.meter_event_usage (tenant_id, idempotency_key, meter_event_id)
    SELECT e.tenant_id, k, e.meter_event_id
      FROM ev e JOIN grouped g ON g.tenant_id = e.tenant_id AND g.new_id = e.meter_event_id, unnest(g.keys) k)
  SELECT array_agg(e.meter_event_id::text || ' ' || e.tenant_id) INTO v_ev FROM ev e;
  -- the requests, in a statement of their own (they read the rows just made)
  FOREACH x IN ARRAY coalesce(v_ev, '{}') LOOP
    PERFORM billing.meter_send(substr(x, strpos(x, ' ') + 1), split_part(x, ' ', 1)::bigint);
  END LOOP;
  RETURN coalesce(cardinality(v_ev), 0);
END
$$;

COMMENT ON FUNCTION billing.meter_queue_some(timestamptz, integer, text) IS
  'Part of the meter pass: make and queue the next meter events of every tenant (p_tenant NULL) or of one, at most p_limit. Returns how many.';

-- A tenant whose meter events could not be made: the pass goes on without
-- it.  Logged each time; audited (naming the tenant and the error) unless
-- the tenant's newest audit row already says so within the hour.
CREATE OR REPLACE FUNCTION billing.meter_skipped(p_tenant text, p_sqlstate text, p_error text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  a billing.audit_log;
BEGIN
  RAISE WARNING 'qes_billing: the meter pass skipped tenant "%": % (SQLSTATE %)', p_tenant, p_error, p_sqlstate
    USING HINT = 'The tenant''s usage is not sent to Stripe until this is fixed; the other tenants'' is. '
                 'See its rows in billing.usage_events and billing.meter_events, then run billing.meter_pass_now().';
  SELECT * INTO a FROM billing.audit_log l WHERE l.tenant_id = p_tenant ORDER BY l.audit_id DESC LIMIT 1;
  IF a.action = 'meter.pass_skipped' AND a.details ->> 'sqlstate' = p_sqlstate AND a.details ->> 'error' = p_error
     AND a.occurred_at > clock_timestamp() - interval '1 hour' THEN
    RETURN;
  END IF;
  PERFORM billing.audit('meter.pass_skipped', p_tenant,
                        jsonb_build_object('sqlstate', p_sqlstate, 'error', p_error,
                                           'to_do', 'the tenant''s usage is not sent to Stripe until the error is fixed'));
END
$$;

COMMENT ON FUNCTION billing.meter_skipped(text, text, text) IS
  'Part of the meter pass: a tenant whose meter events failed to be made is skipped; logged (WARNING) and audited as meter.pass_skipped (at most hourly for the same error).';

-- Queue the billable usage no meter event carries yet: one meter event per
-- tenant and metric, at most p_limit.  One pass at a time.  All tenants in
-- one statement; if that fails, each tenant on its own (a subtransaction
-- each), so that one tenant's failure skips only that tenant -- reported
-- by billing.meter_skipped -- and never holds up the others' billing.
-- Returns how many were queued.
CREATE OR REPLACE FUNCTION billing.meter_queue(p_limit integer, p_wait boolean DEFAULT true) RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_now    timestamptz := billing.now();
  v_tenant text;
  v_state  text;
  v_msg    text;
  v_subs   integer := 0;
  n        integer := 0;
BEGIN
  -- one pass at a time: a second one waits (or, the worker's, skips) and
  -- then, in a statement of its own, sees what the first committed
  IF p_wait THEN
    PERFORM pg_advisory_xact_lock(hashtext('qes_billing.meter_queue'));
  ELSIF NOT pg_try_advisory_xact_lock(hashtext('qes_billing.meter_queue')) THEN
    RETURN 0;
  END IF;
  BEGIN
    n := billing.meter_queue_some(v_now, p_limit);
  EXCEPTION WHEN OTHERS THEN
    -- (one subtransaction per tenant only now: many of them in one
    -- transaction cost every backend's snapshots while it runs -- past the
    -- 64 a backend caches, every snapshot looks into pg_subtrans -- so at
    -- most 32 tenants' events are made this way per pass; the others wait
    -- for the next pass)
    n := 0;
    FOR v_tenant IN SELECT u.tenant_id FROM billing.meter_unsent(v_now) u
                     GROUP BY u.tenant_id ORDER BY min(u.first_recorded), u.tenant_id LOOP
      EXIT WHEN n >= p_limit OR v_subs >= 32;
      BEGIN
        n := n + billing.meter_queue_some(v_now, p_limit - n, v_tenant);
        v_subs := v_subs + 1;   -- (a subtransaction that rolled back holds no xid)
      EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
        PERFORM billing.meter_skipped(v_tenant, v_state, v_msg);
      END;
    END LOOP;
  END;
  RETURN n;
END
$$;

COMMENT ON FUNCTION billing.meter_queue(integer, boolean) IS
  'Gather the committed billable usage rows no meter event carries yet into one meter event per tenant and metric (none while one is under way) and queue them; at most p_limit. A tenant whose events fail is skipped (WARNING, audited as meter.pass_skipped), the others go on. One pass at a time (p_wait false: skip when another runs). Returns how many.';

-- Queue the request that sends one meter event.  The Idempotency-Key and
-- the identifier are the event's own: a retry of the request (lost answer,
-- crash, 429) replays; a send after the key expired is refused by Stripe
-- as a repeat of the identifier, which counts as delivered.
CREATE OR REPLACE FUNCTION billing.meter_send(p_tenant text, p_meter_event_id bigint, p_attempt integer DEFAULT 0)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  e    billing.meter_events;
  v_id bigint;
BEGIN
  SELECT * INTO STRICT e FROM billing.meter_events WHERE tenant_id = p_tenant AND meter_event_id = p_meter_event_id;
  INSERT INTO billing.stripe_requests (tenant_id, kind, method, path, params, subject, idempotency_key)
  VALUES (e.tenant_id, 'meter.event', 'POST', '/v1/billing/meter_events',
          jsonb_build_object('event_name', e.event_name, 'identifier', e.identifier,
                             -- whole seconds, rounded down: usage of a period's last second stays in it
                             'timestamp', floor(extract(epoch FROM e.event_at))::bigint,
                             'payload', jsonb_build_object('stripe_customer_id', e.stripe_customer_id,
                                                           'value', e.value::text)),
          jsonb_build_object('meter_event_id', e.meter_event_id),
          'qes-' || e.identifier || CASE WHEN p_attempt > 0 THEN '-' || p_attempt ELSE '' END)
  RETURNING request_id INTO v_id;
  UPDATE billing.meter_events SET request_id = v_id, state = 'queued', last_error = NULL
   WHERE tenant_id = e.tenant_id AND meter_event_id = e.meter_event_id;
  RETURN v_id;
END
$$;

-- From billing.worker_tick: run the pass when it is due.  Returns the
-- seconds until the next one, NULL when nothing is billed through meters
-- (then nothing is scheduled: idle is free).
CREATE OR REPLACE FUNCTION billing.meter_tick() RETURNS double precision
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  st billing.meter_state;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM billing.metered_prices mp JOIN billing.meters m USING (metric)
                  WHERE mp.active AND mp.stripe_price_id IS NOT NULL AND m.stripe_meter_id IS NOT NULL) THEN
    RETURN NULL;
  END IF;
  SELECT * INTO st FROM billing.meter_state;
  IF NOT FOUND THEN
    INSERT INTO billing.meter_state DEFAULT VALUES ON CONFLICT DO NOTHING RETURNING * INTO st;
  END IF;
  -- in a subtransaction: whatever goes wrong here must not hold up the
  -- rest of the tick (the inbox); it is logged and tried at the next pass
  BEGIN
    IF st.next_pass_at <= now() THEN
      PERFORM billing.meter_queue(st.max_events, false);
      UPDATE billing.meter_state SET next_pass_at = now() + pass_interval RETURNING * INTO st;
    END IF;
    IF st.reconcile_interval > interval '0' AND st.next_reconcile_at <= now() THEN
      PERFORM billing.meter_reconcile(NULL);
      UPDATE billing.meter_state SET next_reconcile_at = now() + reconcile_interval RETURNING * INTO st;
    END IF;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'qes_billing: the meter pass failed: %', SQLERRM;
    UPDATE billing.meter_state SET next_pass_at = now() + pass_interval RETURNING * INTO st;
  END;
  RETURN extract(epoch FROM least(st.next_pass_at,
                                  CASE WHEN st.reconcile_interval > interval '0' THEN st.next_reconcile_at END) - now());
END
$$;

COMMENT ON FUNCTION billing.meter_tick() IS
  'Run by the worker''s tick: the meter pass every meter_state.pass_interval, the comparison with Stripe every reconcile_interval. Returns the seconds until the next is due; NULL when no usage is billed through meters.';

-- An operator's pass, now (tests, and after a change of the catalog).
CREATE OR REPLACE FUNCTION billing.meter_pass_now() RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  n integer;
BEGIN
  INSERT INTO billing.meter_state DEFAULT VALUES ON CONFLICT DO NOTHING;
  n := billing.meter_queue((SELECT max_events FROM billing.meter_state));
  UPDATE billing.meter_state SET next_pass_at = now() + pass_interval;
  RETURN n;
END
$$;

COMMENT ON FUNCTION billing.meter_pass_now() IS
  'Queue the billable usage not sent yet now, instead of at the next pass. Returns the meter events queued.';

-- ---- answers ------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION billing.meter_apply(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  o       jsonb := r.response;
  v_found jsonb;
  m       billing.meters;
  mp      billing.metered_prices;
BEGIN
  CASE r.kind
  WHEN 'meter.event' THEN
    UPDATE billing.meter_events SET state = 'delivered', delivered_at = now(), last_error = NULL
     WHERE request_id = r.request_id AND state = 'queued';
  WHEN 'meter.cancel' THEN
    PERFORM billing.meter_cancelled(r);
  WHEN 'meter.summary' THEN
    PERFORM billing.meter_compare(r);
  WHEN 'meter.setup.list' THEN
    FOR m IN SELECT * FROM billing.meters x
              WHERE x.stripe_meter_id IS NULL
                AND EXISTS (SELECT 1 FROM billing.metered_prices p WHERE p.metric = x.metric AND p.active)
              ORDER BY x.metric LOOP
      SELECT x INTO v_found FROM jsonb_array_elements(o -> 'data') x WHERE x ->> 'event_name' = m.event_name LIMIT 1;
      IF v_found IS NOT NULL THEN
        UPDATE billing.meters SET stripe_meter_id = v_found ->> 'id' WHERE metric = m.metric;
      ELSIF (o ->> 'has_more')::boolean THEN
        NULL;   -- the next page may have it
      ELSE
        PERFORM billing.outbox_enqueue(NULL, 'meter.setup.create', 'POST', '/v1/billing/meters',
                  jsonb_build_object('display_name', 'QES ' || m.metric, 'event_name', m.event_name,
                                     'default_aggregation', jsonb_build_object('formula', m.aggregation),
                                     'customer_mapping', jsonb_build_object('type', 'by_id',
                                                                            'event_payload_key', 'stripe_customer_id'),
                                     'value_settings', jsonb_build_object('event_payload_key', 'value')),
                  jsonb_build_object('metric', m.metric), p_run_id => r.run_id);
      END IF;
    END LOOP;
    IF (o ->> 'has_more')::boolean THEN
      PERFORM billing.outbox_enqueue(NULL, 'meter.setup.list', 'GET', '/v1/billing/meters',
                jsonb_build_object('limit', 100, 'status', 'active', 'starting_after', o -> 'data' -> -1 ->> 'id'),
                p_run_id => r.run_id);
    ELSE
      PERFORM billing.meter_setup_prices(r.run_id);
    END IF;
  WHEN 'meter.setup.create' THEN
    UPDATE billing.meters SET stripe_meter_id = o ->> 'id' WHERE metric = r.subject ->> 'metric';
    PERFORM billing.audit('setup.meter_created', NULL, jsonb_build_object('metric', r.subject ->> 'metric',
                                                                          'meter', o ->> 'id'));
    PERFORM billing.meter_setup_prices(r.run_id);
  WHEN 'meter.setup.prices.list' THEN
    FOR mp IN SELECT * FROM billing.metered_prices p WHERE p.active ORDER BY p.price_key LOOP
      SELECT x INTO v_found FROM jsonb_array_elements(o -> 'data') x WHERE x ->> 'lookup_key' = mp.price_key LIMIT 1;
      IF v_found IS NOT NULL AND coalesce((v_found ->> 'active')::boolean, true)
         AND v_found -> 'recurring' ->> 'meter' = (SELECT stripe_meter_id FROM billing.meters WHERE metric = mp.metric)
         AND v_found -> 'recurring' ->> 'interval' = mp.billing_interval AND v_found ->> 'currency' = mp.currency
         AND coalesce(v_found -> 'metadata' ->> 'qes_included', '0') = mp.included::text
         AND coalesce(v_found ->> 'unit_amount_decimal', v_found -> 'tiers' -> -1 ->> 'unit_amount_decimal')::numeric
             = mp.unit_amount_decimal THEN
        UPDATE billing.metered_prices SET stripe_price_id = v_found ->> 'id' WHERE price_key = mp.price_key;
      ELSE
        -- missing, or the catalog changed: a new price takes the lookup key over
        PERFORM billing.outbox_enqueue(NULL, 'meter.setup.price.create', 'POST', '/v1/prices',
                  billing.meter_price_params(mp), jsonb_build_object('price_key', mp.price_key),
                  p_run_id => r.run_id);
      END IF;
    END LOOP;
  WHEN 'meter.setup.price.create' THEN
    UPDATE billing.metered_prices SET stripe_price_id = o ->> 'id' WHERE price_key = r.subject ->> 'price_key';
    PERFORM billing.audit('setup.price_created', NULL,
                          jsonb_build_object('price_key', r.subject ->> 'price_key', 'price', o ->> 'id', 'metered', true));
  ELSE
    NULL;
  END CASE;
END
$$;

COMMENT ON FUNCTION billing.meter_apply(billing.stripe_requests) IS
  'Apply a successful answer of a meter request (billing.outbox_apply): a meter event delivered or cancelled, a summary compared, setup''s meters and prices recorded.';

CREATE OR REPLACE FUNCTION billing.meter_apply_failure(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  e billing.meter_events;
BEGIN
  CASE r.kind
  WHEN 'meter.event' THEN
    IF r.error ->> 'message' ILIKE '%already exists with identifier%' THEN
      -- Stripe has this identifier: an earlier attempt was delivered
      UPDATE billing.meter_events SET state = 'delivered', delivered_at = now(), last_error = NULL
       WHERE request_id = r.request_id AND state = 'queued';
    ELSE
      UPDATE billing.meter_events SET state = 'failed', last_error = r.error
       WHERE request_id = r.request_id AND state = 'queued';
    END IF;
  WHEN 'meter.cancel' THEN
    IF r.subject ->> 'was' = 'failed' THEN
      SELECT * INTO e FROM billing.meter_events WHERE cancel_request_id = r.request_id AND state = 'cancel_queued'
         FOR UPDATE;
      IF NOT FOUND THEN
        NULL;
      ELSIF r.error ->> 'category' = 'not_found' OR r.error ->> 'code' = 'resource_missing'
            OR r.error ->> 'message' ILIKE '%no meter event%' THEN
        -- Stripe never had the failed event: nothing to cancel there
        PERFORM billing.meter_cancel_here(e, 'a row was voided; Stripe never had the event');
      ELSE
        -- Stripe may have it (a failed send of unknown outcome): failed as
        -- before (last_error stays the send's), never sent again:
        -- reconciliation re-sends no event a voided row was part of
        UPDATE billing.meter_events SET state = 'failed'
         WHERE tenant_id = e.tenant_id AND meter_event_id = e.meter_event_id;
        PERFORM billing.audit('meter.cancel_failed', r.tenant_id,
                              jsonb_build_object('meter_event_id', e.meter_event_id, 'identifier', e.identifier,
                                                 'error', r.error ->> 'message',
                                                 'to_do', 'look the identifier up in Stripe: if Stripe has the event, '
                                                          'credit the voided usage by hand; if not, its other rows '
                                                          'were never billed'));
      END IF;
      RETURN;
    END IF;
    -- not cancelled (e.g. past Stripe's window): it stays billed
    UPDATE billing.meter_events SET state = 'delivered', last_error = r.error
     WHERE cancel_request_id = r.request_id AND state = 'cancel_queued';
    PERFORM billing.audit('meter.cancel_failed', r.tenant_id,
                          jsonb_build_object('meter_event_id', (r.subject ->> 'meter_event_id')::bigint,
                                             'error', r.error ->> 'message',
                                             'to_do', 'credit the tenant by hand (a credit note on the invoice)'));
  ELSE
    NULL;
  END CASE;
END
$$;

COMMENT ON FUNCTION billing.meter_apply_failure(billing.stripe_requests) IS
  'A meter request failed for good: a meter event Stripe already has (its identifier) is delivered, any other failed (reconciliation finds what Stripe lacks); a cancellation that failed leaves the event billed, audited.';

-- ---- reconciliation -----------------------------------------------------------------

-- Compare Stripe's event summaries with the local sums for every live
-- tenant and meter (or one tenant's), through the outbox.  Returns the run.
CREATE OR REPLACE FUNCTION billing.meter_reconcile(p_tenant text DEFAULT NULL) RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_run  text := 'rm_' || replace(gen_random_uuid()::text, '-', '');
  v_end  timestamptz := date_trunc('minute', billing.now()) + interval '1 minute';
  x      record;
  n      integer := 0;
BEGIN
  IF p_tenant IS NOT NULL AND NOT EXISTS (SELECT 1 FROM billing.tenants WHERE tenant_id = p_tenant) THEN
    RAISE EXCEPTION 'tenant "%" is not registered', p_tenant
      USING ERRCODE = 'foreign_key_violation', HINT = 'List tenants with SELECT tenant_id FROM billing.tenants.';
  END IF;
  INSERT INTO billing.reconcile_runs (run_id, kind, tenant_id) VALUES (v_run, 'meters', p_tenant);
  FOR x IN SELECT DISTINCT e.tenant_id, e.metric, e.stripe_customer_id, e.period_start, m.stripe_meter_id
             FROM billing.meter_events e JOIN billing.meters m USING (metric)
             JOIN billing.subscriptions s ON s.tenant_id = e.tenant_id AND s.current_period_start = e.period_start
                                         AND s.status IN ('trialing', 'active', 'past_due')
            WHERE m.stripe_meter_id IS NOT NULL AND (p_tenant IS NULL OR e.tenant_id = p_tenant)
            ORDER BY 1, 2 LOOP
    PERFORM billing.outbox_enqueue(x.tenant_id, 'meter.summary', 'GET',
              '/v1/billing/meters/' || x.stripe_meter_id || '/event_summaries',
              jsonb_build_object('customer', x.stripe_customer_id,
                                 'start_time', extract(epoch FROM date_trunc('minute', x.period_start))::bigint,
                                 'end_time', extract(epoch FROM greatest(v_end, date_trunc('minute', x.period_start)
                                                                                 + interval '1 minute'))::bigint,
                                 'limit', 100),
              jsonb_build_object('run_id', v_run, 'metric', x.metric, 'period_start', x.period_start,
                                 'customer', x.stripe_customer_id, 'meter', x.stripe_meter_id),
              p_run_id => v_run);
    n := n + 1;
  END LOOP;
  IF n = 0 THEN
    UPDATE billing.reconcile_runs SET finished_at = now() WHERE run_id = v_run;
  END IF;
  PERFORM billing.audit('reconcile.requested', p_tenant, jsonb_build_object('run', v_run, 'meters', n));
  RETURN v_run;
END
$$;

COMMENT ON FUNCTION billing.meter_reconcile(text) IS
  'Compare Stripe''s meter event summaries of the current period with the local sums, per tenant and meter (all, or one tenant''s), through the outbox. Differences go to billing.drift_report (source meters); meter events whose sending failed are sent again with their identifier when exactly they are missing. Returns the run id. Audited.';

-- The local figure Stripe's summary should show: the sum of the period's
-- meter events not cancelled (counters), or the newest one's value (gauge).
CREATE OR REPLACE FUNCTION billing.meter_local_value(p_tenant text, p_metric text, p_period timestamptz) RETURNS numeric
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT CASE WHEN m.aggregation = 'sum'
              THEN (SELECT coalesce(sum(e.value), 0) FROM billing.meter_events e
                     WHERE e.tenant_id = p_tenant AND e.metric = p_metric AND e.period_start = p_period
                       AND e.state NOT IN ('cancelled'))
              ELSE (SELECT e.value FROM billing.meter_events e
                     WHERE e.tenant_id = p_tenant AND e.metric = p_metric AND e.period_start = p_period
                       AND e.state NOT IN ('cancelled')
                     ORDER BY e.event_at DESC, e.meter_event_id DESC LIMIT 1) END
    FROM billing.meters m WHERE m.metric = p_metric
$$;

CREATE OR REPLACE FUNCTION billing.meter_compare(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_metric text := r.subject ->> 'metric';
  v_period timestamptz := (r.subject ->> 'period_start')::timestamptz;
  v_run    text := r.subject ->> 'run_id';
  v_agg    text := (SELECT aggregation FROM billing.meters WHERE metric = v_metric);
  v_stripe numeric;
  v_local  numeric;
  v_failed numeric;
  v_short  bigint;
  v_repair text := 'none';
  e        billing.meter_events;
BEGIN
  SELECT CASE WHEN v_agg = 'sum' THEN coalesce(sum((s ->> 'aggregated_value')::numeric), 0)
              ELSE (array_agg((s ->> 'aggregated_value')::numeric ORDER BY (s ->> 'end_time')::bigint DESC))[1] END
    INTO v_stripe FROM jsonb_array_elements(r.response -> 'data') s;
  UPDATE billing.reconcile_runs SET requests = requests + 1, listed = listed + 1 WHERE run_id = v_run;
  IF EXISTS (SELECT 1 FROM billing.meter_events x
              WHERE x.tenant_id = r.tenant_id AND x.metric = v_metric AND x.period_start = v_period
                AND x.state IN ('queued', 'cancel_queued')) THEN
    NULL;   -- an event under way: compared at the next run
  ELSE
    v_local := billing.meter_local_value(r.tenant_id, v_metric, v_period);
    IF v_local IS DISTINCT FROM v_stripe AND NOT (v_local IS NULL AND v_stripe = 0) THEN
      -- safe to repair: Stripe lacks exactly what failed to be sent (its
      -- identifier makes a second copy impossible within Stripe's window)
      SELECT coalesce(sum(x.value), 0) INTO v_failed FROM billing.meter_events x
       WHERE x.tenant_id = r.tenant_id AND x.metric = v_metric AND x.period_start = v_period AND x.state = 'failed';
      -- an event whose rows are not all there (one was voided) is never
      -- sent again: its value would bill the voided units
      SELECT count(*) INTO v_short FROM billing.meter_events x
       WHERE x.tenant_id = r.tenant_id AND x.metric = v_metric AND x.period_start = v_period AND x.state = 'failed'
         AND x.usage_rows <> (SELECT count(*) FROM billing.meter_event_usage y
                                JOIN billing.usage_events u ON u.tenant_id = y.tenant_id
                                                           AND u.idempotency_key = y.idempotency_key
                               WHERE y.tenant_id = x.tenant_id AND y.meter_event_id = x.meter_event_id);
      IF v_agg = 'sum' AND v_failed > 0 AND v_short = 0 AND v_local - coalesce(v_stripe, 0) = v_failed THEN
        FOR e IN SELECT * FROM billing.meter_events x
                  WHERE x.tenant_id = r.tenant_id AND x.metric = v_metric AND x.period_start = v_period
                    AND x.state = 'failed' LOOP
          PERFORM billing.meter_send(e.tenant_id, e.meter_event_id, (SELECT count(*)::integer FROM billing.stripe_requests q
                                          WHERE q.kind = 'meter.event'
                                            AND (q.subject ->> 'meter_event_id')::bigint = e.meter_event_id));
        END LOOP;
        v_repair := 'failed meter events sent again with their identifiers';
      ELSIF coalesce(v_stripe, 0) > coalesce(v_local, 0) THEN
        v_repair := 'none: Stripe has more than was sent; cancel the events within 24 hours or credit the tenant';
      ELSE
        v_repair := 'none: compare billing.meter_events with Stripe''s events by identifier';
      END IF;
      INSERT INTO billing.drift_repairs (tenant_id, run_id, source, object, stripe_id, before, after)
      VALUES (r.tenant_id, v_run, 'meters', 'meter_usage', (r.subject ->> 'meter') || ':' || (r.subject ->> 'customer'),
              jsonb_build_object('metric', v_metric, 'period_start', v_period, 'stripe_value', v_stripe),
              jsonb_build_object('metric', v_metric, 'period_start', v_period, 'local_value', v_local,
                                 'difference', coalesce(v_local, 0) - coalesce(v_stripe, 0), 'repair', v_repair));
      UPDATE billing.reconcile_runs SET repairs = repairs + 1 WHERE run_id = v_run;
      PERFORM billing.audit('meter.drift', r.tenant_id,
                            jsonb_build_object('run', v_run, 'metric', v_metric, 'period_start', v_period,
                                               'stripe_value', v_stripe, 'local_value', v_local, 'repair', v_repair));
    END IF;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM billing.stripe_requests q
                  WHERE q.run_id = v_run AND q.request_id <> r.request_id
                    AND q.state IN ('waiting', 'pending', 'in_flight')) THEN
    UPDATE billing.reconcile_runs SET finished_at = now() WHERE run_id = v_run;
  END IF;
END
$$;

-- ---- corrections --------------------------------------------------------------------

-- Void one usage row (an operator's correction): the row is removed (the
-- counters are rebuilt at commit) and audited with what it was.  If a meter
-- event carried it to Stripe, that event is cancelled with a meter event
-- adjustment while Stripe's window (24 hours from receipt) is open, and its
-- other rows are sent again in a new event once the cancellation is
-- confirmed; after the window, the usage stays billed and the audit row says
-- to credit the tenant by hand.  Returns what was done.
CREATE OR REPLACE FUNCTION billing.void_usage(p_tenant text, p_key text, p_reason text) RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  u      billing.usage_events;
  e      billing.meter_events;
  v_req  bigint;
  v_done text;
BEGIN
  IF p_reason IS NULL OR length(btrim(p_reason)) = 0 THEN
    RAISE EXCEPTION 'a reason is required to void usage'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Say why, e.g. ''signature failed, not the tenant''''s fault''.';
  END IF;
  -- a meter pass under way may be about to send this row: wait for it, so
  -- what follows sees whether it was sent (passes take the same lock)
  PERFORM pg_advisory_xact_lock(hashtext('qes_billing.meter_queue'));
  SELECT * INTO u FROM billing.usage_events WHERE tenant_id = p_tenant AND idempotency_key = p_key FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no usage of tenant "%" with idempotency key "%"', p_tenant, p_key
      USING ERRCODE = 'no_data_found', HINT = 'Find it in billing.usage_events.';
  END IF;
  SELECT e2.* INTO e FROM billing.meter_event_usage x
    JOIN billing.meter_events e2 ON e2.tenant_id = x.tenant_id AND e2.meter_event_id = x.meter_event_id
   WHERE x.tenant_id = p_tenant AND x.idempotency_key = p_key FOR UPDATE OF e2;
  IF e.meter_event_id IS NULL THEN
    v_done := 'voided; never sent to Stripe';
  ELSIF e.state = 'queued' THEN
    RAISE EXCEPTION 'the usage is being sent to Stripe right now (meter event %)', e.meter_event_id
      USING ERRCODE = 'object_in_use', HINT = 'Try again in a minute, when Stripe has answered.';
  ELSIF e.state IN ('cancel_queued', 'cancelled') THEN
    v_done := 'voided; its meter event is cancelled already';
  -- (a 401 or 403 is no refusal: Stripe checks the API key before the
  -- Idempotency-Key, so an earlier attempt may have delivered it --
  -- billing.retry_request's rule)
  ELSIF e.state = 'failed' AND e.last_error ->> 'category' IN ('invalid_request', 'card', 'not_found')
        AND e.last_error ->> 'type' IS DISTINCT FROM 'idempotency_error' THEN
    -- Stripe refused the event: it bills none of it.  Cancelled here, so
    -- that neither reconciliation nor anything else ever sends its value
    -- (which counts the voided row) again; its other rows go out in a new
    -- event, under a new identifier, at the next pass
    PERFORM billing.meter_cancel_here(e, 'a row was voided after Stripe refused the event');
    v_done := format('voided; meter event %s had been refused by Stripe and is cancelled, its other %s row(s) '
                     'will be sent again', e.meter_event_id, e.usage_rows - 1);
  ELSIF (e.state = 'delivered' AND e.delivered_at > now() - interval '23 hours') OR e.state = 'failed' THEN
    -- delivered within Stripe's window, or failed with an outcome unknown
    -- (Stripe may have it): cancelled in Stripe by its identifier
    v_req := billing.outbox_enqueue(p_tenant, 'meter.cancel', 'POST', '/v1/billing/meter_event_adjustments',
               jsonb_build_object('event_name', e.event_name, 'type', 'cancel',
                                  'cancel', jsonb_build_object('identifier', e.identifier)),
               jsonb_build_object('meter_event_id', e.meter_event_id, 'was', e.state));
    UPDATE billing.meter_events SET state = 'cancel_queued', cancel_request_id = v_req
     WHERE tenant_id = e.tenant_id AND meter_event_id = e.meter_event_id;
    v_done := format('voided; meter event %s is being cancelled in Stripe, its other %s row(s) will be sent again',
                     e.meter_event_id, e.usage_rows - 1);
  ELSE
    v_done := format('voided locally; meter event %s was delivered more than 23 hours ago and stays billed: '
                     'credit the tenant by hand (a credit note on the invoice)', e.meter_event_id);
  END IF;
  DELETE FROM billing.meter_event_usage WHERE tenant_id = p_tenant AND idempotency_key = p_key;
  DELETE FROM billing.usage_events WHERE tenant_id = p_tenant AND idempotency_key = p_key;
  PERFORM billing.audit('usage.voided', p_tenant,
                        jsonb_build_object('idempotency_key', p_key, 'metric', u.metric, 'quantity', u.quantity,
                                           'occurred_at', u.occurred_at, 'reason', p_reason,
                                           'meter_event_id', e.meter_event_id, 'done', v_done));
  RETURN v_done;
END
$$;

COMMENT ON FUNCTION billing.void_usage(text, text, text) IS
  'Void one usage row (with a reason; audited): removed locally; a meter event that carried it is cancelled in Stripe within its 24-hour window and the event''s other rows sent again; after the window it stays billed and the tenant is to be credited by hand. Returns what was done.';

-- The cancellation was confirmed: the event no longer counts, and the rows
-- it carried that were not voided become unsent (the next pass sends them).
CREATE OR REPLACE FUNCTION billing.meter_cancelled(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  e billing.meter_events;
BEGIN
  SELECT * INTO e FROM billing.meter_events WHERE cancel_request_id = r.request_id AND state = 'cancel_queued'
     FOR UPDATE;
  IF FOUND THEN
    PERFORM billing.meter_cancel_here(e, 'cancelled in Stripe');
  END IF;
END
$$;

-- A meter event that no longer counts: cancelled, and the rows it carried
-- that were not voided become unsent (the next pass sends them in a new
-- event, under a new identifier).  Audited.
CREATE OR REPLACE FUNCTION billing.meter_cancel_here(e billing.meter_events, p_why text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  UPDATE billing.meter_events SET state = 'cancelled'
   WHERE tenant_id = e.tenant_id AND meter_event_id = e.meter_event_id;
  DELETE FROM billing.meter_event_usage WHERE tenant_id = e.tenant_id AND meter_event_id = e.meter_event_id;
  PERFORM billing.audit('meter.cancelled', e.tenant_id,
                        jsonb_build_object('meter_event_id', e.meter_event_id, 'identifier', e.identifier,
                                           'value', e.value, 'was', e.state, 'why', p_why));
END
$$;

COMMENT ON FUNCTION billing.meter_cancel_here(billing.meter_events, text) IS
  'A meter event no longer counts (cancelled in Stripe, or refused by it and a row voided): cancelled, its rows not voided unsent again (the next pass sends them under a new identifier). Audited as meter.cancelled.';

-- ---- what Stripe billed: the invoices' lines -------------------------------------------

-- An invoice event that was applied: keep its lines (the newest event's).
CREATE OR REPLACE FUNCTION billing.keep_invoice_lines() RETURNS trigger
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  o     jsonb := (NEW.payload -> 'data' -> 'object')::jsonb;
  v_at  timestamptz := NEW.stripe_created;
  v_old timestamptz;
BEGIN
  IF NEW.tenant_id IS NULL OR o ->> 'id' IS NULL OR jsonb_typeof(o -> 'lines' -> 'data') IS DISTINCT FROM 'array' THEN
    RETURN NULL;
  END IF;
  SELECT max(l.stripe_state_at) INTO v_old FROM billing.invoice_lines l
   WHERE l.tenant_id = NEW.tenant_id AND l.stripe_invoice_id = o ->> 'id';
  IF v_old > v_at THEN
    RETURN NULL;   -- an older state of the invoice: the newer lines stay
  END IF;
  -- (the lines are shown, never decided on: a line that cannot be kept
  -- must not keep the invoice event from being applied)
  BEGIN
  DELETE FROM billing.invoice_lines WHERE tenant_id = NEW.tenant_id AND stripe_invoice_id = o ->> 'id';
  INSERT INTO billing.invoice_lines (tenant_id, stripe_invoice_id, line_id, stripe_price_id, metered, metric,
                                     description, quantity, amount, currency, period_start, period_end, stripe_state_at)
  SELECT NEW.tenant_id, o ->> 'id', l ->> 'id', x.price,
         mp.price_key IS NOT NULL OR l -> 'price' -> 'recurring' ->> 'usage_type' = 'metered', mp.metric,
         l ->> 'description', (l ->> 'quantity')::bigint, coalesce((l ->> 'amount')::bigint, 0),
         coalesce(l ->> 'currency', o ->> 'currency'),
         to_timestamp((l -> 'period' ->> 'start')::bigint), to_timestamp((l -> 'period' ->> 'end')::bigint), v_at
    FROM jsonb_array_elements(billing.json_array(o -> 'lines' -> 'data')) l
    CROSS JOIN LATERAL (SELECT coalesce(l -> 'price' ->> 'id', l ->> 'price',
                                        l -> 'pricing' -> 'price_details' ->> 'price') AS price) x
    LEFT JOIN billing.metered_prices mp ON mp.stripe_price_id = x.price
   WHERE l ->> 'id' IS NOT NULL
  ON CONFLICT DO NOTHING;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'qes_billing: the lines of invoice % were not kept: %', o ->> 'id', SQLERRM;
  END;
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.keep_invoice_lines() IS
  'Trigger: when an invoice event is applied, keep the invoice''s lines as that event shows them (unless a newer event''s are kept).';

CREATE OR REPLACE TRIGGER keep_invoice_lines AFTER UPDATE OF state ON billing.webhook_events
  FOR EACH ROW WHEN (NEW.state = 'applied' AND NEW.event_type LIKE 'invoice.%')
  EXECUTE FUNCTION billing.keep_invoice_lines();

CREATE VIEW billing.meter_metrics AS
SELECT (SELECT count(*) FROM billing.meter_events WHERE state = 'queued') AS queued,
       (SELECT count(*) FROM billing.meter_events WHERE state = 'delivered') AS delivered,
       (SELECT count(*) FROM billing.meter_events WHERE state = 'failed') AS failed,
       (SELECT count(*) FROM billing.meter_events WHERE state IN ('cancel_queued', 'cancelled')) AS cancelled,
       (SELECT count(*) FROM billing.meter_event_usage) AS usage_rows_sent;

COMMENT ON VIEW billing.meter_metrics IS
  'Meter events queued, delivered, failed and cancelled, and the usage rows they carried.';

-- Operator metrics: subscription health, payment success and usage
-- patterns (webhook and outbox metrics are next to their queues:
-- billing.webhook_metrics, billing.outbox_metrics).  Views over the
-- mirrored tables; qes_admin may read them.

CREATE VIEW billing.subscription_health AS
SELECT s.plan_id,
       s.billing_interval,
       s.status,
       count(*) AS subscriptions,
       count(*) FILTER (WHERE s.cancel_at_period_end) AS cancelling_at_period_end,
       count(*) FILTER (WHERE s.status = 'past_due' AND s.grace_until > billing.now()) AS in_grace_period,
       count(*) FILTER (WHERE s.status = 'past_due' AND s.grace_until <= billing.now()) AS grace_period_over,
       -- monthly recurring revenue in the smallest currency unit (yearly prices / 12)
       coalesce(sum(CASE WHEN s.status IN ('active', 'trialing', 'past_due')
                         THEN pr.unit_amount / CASE s.billing_interval WHEN 'year' THEN 12.0 ELSE 1 END END), 0)::bigint AS mrr
  FROM billing.subscriptions s
  LEFT JOIN billing.prices pr
         ON pr.plan_id = s.plan_id AND pr.billing_interval = s.billing_interval AND pr.active AND pr.currency = 'usd'
 WHERE s.status NOT IN ('canceled', 'incomplete_expired')
 GROUP BY s.plan_id, s.billing_interval, s.status;

COMMENT ON VIEW billing.subscription_health IS
  'Current subscriptions by plan, interval and Stripe status: how many, cancelling at period end, past due within and after the grace period, and monthly recurring revenue (cents; yearly prices / 12).';

-- Metrics in Prometheus's shapes, for prometheus-postgres-exporter
-- (docs/monitoring/qes_billing_queries.yaml reads these views; docs/operations.md,
-- "Monitoring").  The operator views of sql/install/95_metrics.sql and the
-- queue views look at the last hour or the last 30 days; Prometheus wants
-- counters that only ever grow (it computes rates and windows itself),
-- gauges for what is there now, and a histogram for latency.  So:
--
--   * counters count facts that never change once they happened: inbox rows
--     by Stripe event type (an event id is stored once), events applied and
--     requests succeeded (final states), and rows of the append-only audit
--     log (a request failed for good, an event parked, a dispute, a drift
--     repair).  A request an operator retries leaves the failed state, but
--     its audit row stays, so the failure counter never goes down (a drop
--     would read as a counter reset and a false spike in rate());
--   * webhook refusals are counted when billing.flush_webhook_rejections()
--     writes them to billing.webhook_rejections; the ones not written yet
--     are a separate gauge, because the sum of the two could go down for a
--     moment while a flush commits;
--   * labels take few values: plan, billing interval, status, kind, metric,
--     event type, refusal reason, failure category -- never a tenant.  The
--     subscribed event types, the refusal reasons and the failure
--     categories are listed even at zero, so that a first occurrence is a
--     rise that rate() and increase() see.
--
-- A view scans a table at most once; the queue gauges read the queues'
-- partial indexes.  Operators (qes_admin) read them; the exporter logs in
-- as a member of qes_monitor, which reads them and nothing else
-- (99_security.sql; docs/operations.md, "Monitoring").

-- Upper bounds (seconds) of the webhook latency histogram's buckets.
CREATE OR REPLACE FUNCTION billing.prometheus_latency_buckets() RETURNS double precision[]
  LANGUAGE sql IMMUTABLE
RETURN '{0.05,0.1,0.25,0.5,1,2.5,5,10,30,60,300,900,3600}'::double precision[];

COMMENT ON FUNCTION billing.prometheus_latency_buckets() IS
  'Upper bounds in seconds of the buckets of qes_billing_webhook_latency_seconds (received -> applied).';

-- Per Stripe event type: received and applied (counters), ignored and
-- waiting now (gauges: an ignored or waiting event may still be applied
-- later, once what it names is mirrored), and the histogram of the time
-- from receipt to being applied (cumulative bucket counts in the bounds'
-- order, as the exporter's HISTOGRAM columns want them).  An event enters
-- the histogram once, when it is applied, so the histogram only grows.
-- One pass over the inbox groups events by type and by "ge", the number
-- of bucket bounds at or above the event's latency (width_bucket over the
-- negated bounds; NULL while not applied): bucket i (of n) holds the
-- events with ge > n - i.
CREATE VIEW billing.prometheus_webhook_events AS
WITH b AS MATERIALIZED (
  SELECT billing.prometheus_latency_buckets() AS le,
         ARRAY(SELECT -x FROM unnest(billing.prometheus_latency_buckets()) x ORDER BY 1) AS neg
), g AS MATERIALIZED (
  SELECT e.event_type,
         width_bucket(-l.s, b.neg) AS ge,
         count(*) AS received,
         count(l.s) AS applied,
         count(*) FILTER (WHERE e.state = 'ignored') AS ignored,
         count(*) FILTER (WHERE e.state = 'waiting') AS waiting,
         sum(l.s) AS seconds
    FROM billing.webhook_events e
   CROSS JOIN b
   CROSS JOIN LATERAL (SELECT CASE WHEN e.state = 'applied'
                                   THEN extract(epoch FROM e.applied_at - e.received_at)::double precision
                              END AS s) l
   GROUP BY e.event_type, width_bucket(-l.s, b.neg)
), types AS (
  SELECT t AS event_type FROM unnest(billing.webhook_event_types()) t
  UNION
  SELECT g.event_type FROM g
), totals AS (
  SELECT g.event_type, sum(g.received) AS received, sum(g.applied) AS applied, sum(g.ignored) AS ignored,
         sum(g.waiting) AS waiting, sum(g.seconds) AS seconds
    FROM g GROUP BY g.event_type
), cumulative AS (
  SELECT t.event_type, i.i,
         coalesce(sum(g.applied) FILTER (WHERE g.ge > cardinality(b.le) - i.i), 0)::bigint AS n
    FROM types t
   CROSS JOIN b
   CROSS JOIN generate_series(1, cardinality(b.le)) i
    LEFT JOIN g ON g.event_type = t.event_type
   GROUP BY t.event_type, i.i
), buckets AS (
  SELECT c.event_type, array_agg(c.n ORDER BY c.i) AS counts FROM cumulative c GROUP BY c.event_type
)
SELECT t.event_type AS type,
       coalesce(s.received, 0)::bigint AS events_received_total,
       coalesce(s.applied, 0)::bigint AS events_applied_total,
       coalesce(s.ignored, 0)::bigint AS events_ignored,
       coalesce(s.waiting, 0)::bigint AS events_waiting,
       b.le AS latency_seconds,
       k.counts AS latency_seconds_bucket,
       coalesce(s.seconds, 0)::double precision AS latency_seconds_sum,
       coalesce(s.applied, 0)::bigint AS latency_seconds_count
  FROM types t
 CROSS JOIN b
  JOIN buckets k ON k.event_type = t.event_type
  LEFT JOIN totals s ON s.event_type = t.event_type;

COMMENT ON VIEW billing.prometheus_webhook_events IS
  'Prometheus: per Stripe event type, inbox events received (a repeated delivery is not stored) and applied to a tenant of ours since the inbox began; events ignored (not about a tenant known to be ours) and waiting (for an object not mirrored yet) now; and the histogram of the time from receipt to being applied. The 16 subscribed types are listed even at zero.';

-- The inbox now (partial indexes make these cheap).
CREATE VIEW billing.prometheus_webhook_inbox AS
SELECT (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'received') AS pending,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'processing') AS processing,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'received' AND e.attempts > 0) AS retrying,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'needs_review') AS parked,
       (SELECT coalesce(extract(epoch FROM pg_catalog.now() - min(e.next_attempt_at)), 0)::double precision
          FROM billing.webhook_events e
         WHERE e.state = 'received' AND e.next_attempt_at <= pg_catalog.now()) AS oldest_due_age_seconds;

COMMENT ON VIEW billing.prometheus_webhook_inbox IS
  'Prometheus: inbox events waiting (pending, of which retrying after a failure), being applied, and parked (needs_review, an operator replays them); and for how long the longest-waiting due event has been due (0 when none is).';

-- Refusals by reason: written (a counter) and not yet written (a gauge).
-- The reasons are those of src/guard.c (reason_names); one added there
-- shows here once it occurs, and test/python/test_prometheus.py checks that
-- this list still matches.
CREATE VIEW billing.prometheus_webhook_rejections AS
WITH known(reason) AS (
  VALUES ('no_header'), ('malformed'), ('no_v1'), ('mismatch'), ('stale'), ('no_secret'), ('not_an_event'),
         ('wrong_mode'), ('bad_type'), ('bad_created'), ('bad_encoding'), ('escaped_key')
), written AS (
  SELECT r.reason, sum(r.deliveries) AS n FROM billing.webhook_rejections r GROUP BY r.reason
), pending AS (
  SELECT p.reason, sum(p.deliveries) AS n FROM billing.webhook_rejections_pending() p GROUP BY p.reason
)
SELECT k.reason,
       coalesce(w.n, 0)::bigint AS total,
       coalesce(p.n, 0)::bigint AS unflushed
  FROM (SELECT reason FROM known UNION SELECT reason FROM written UNION SELECT reason FROM pending) k
  LEFT JOIN written w ON w.reason = k.reason
  LEFT JOIN pending p ON p.reason = k.reason;

COMMENT ON VIEW billing.prometheus_webhook_rejections IS
  'Prometheus: webhook deliveries refused at intake, by reason: written to billing.webhook_rejections by billing.flush_webhook_rejections() (a counter) and counted in shared memory but not written yet (a gauge).';

-- The outbox: queue gauges (partial indexes) and two counters.
CREATE VIEW billing.prometheus_outbox AS
SELECT count(*) AS requests_created_total,
       count(*) FILTER (WHERE r.state = 'succeeded') AS requests_succeeded_total,
       count(*) FILTER (WHERE r.state = 'waiting') AS waiting,
       count(*) FILTER (WHERE r.state = 'pending') AS pending,
       count(*) FILTER (WHERE r.state = 'in_flight') AS in_flight,
       count(*) FILTER (WHERE r.state = 'pending' AND r.attempts > 0) AS retrying,
       count(*) FILTER (WHERE r.state = 'failed') AS failed,
       coalesce(extract(epoch FROM pg_catalog.now() - min(r.next_attempt_at)
                                   FILTER (WHERE r.state = 'pending' AND r.next_attempt_at <= pg_catalog.now())),
                0)::double precision AS oldest_due_age_seconds
  FROM billing.stripe_requests r;

COMMENT ON VIEW billing.prometheus_outbox IS
  'Prometheus: Stripe requests queued (all time) and succeeded (counters); now waiting for another request, pending (of which retrying), in flight, failed and not retried; and for how long the longest-waiting due request has been due (0 when none is).';

-- Final failures by category, from the audit log (stripe.request_failed):
-- the categories of billing.outbox_classify() plus apply, dependency and
-- expired (billing.outbox_claim).
CREATE VIEW billing.prometheus_outbox_failures AS
WITH known(category) AS (
  VALUES ('network'), ('conflict'), ('rate_limited'), ('server'), ('card'), ('authentication'), ('permission'),
         ('not_found'), ('invalid_request'), ('apply'), ('dependency'), ('expired')
), seen AS (
  SELECT coalesce(a.details -> 'error' ->> 'category', 'unknown') AS category, count(*) AS n
    FROM billing.audit_log a
   WHERE a.action = 'stripe.request_failed'
   GROUP BY 1
)
SELECT k.category, coalesce(s.n, 0)::bigint AS total
  FROM (SELECT category FROM known UNION SELECT category FROM seen) k
  LEFT JOIN seen s ON s.category = k.category;

COMMENT ON VIEW billing.prometheus_outbox_failures IS
  'Prometheus: Stripe requests that failed for good, by category (card declines are the customer''s; the others are ours or Stripe''s), counted from the append-only audit log so that a retry by an operator never lowers the count.';

-- Other facts from the audit log, one scan.  drift.repaired is written by
-- reconciliation (the drift feature); until it runs, the count is 0.
CREATE VIEW billing.prometheus_audit_counters AS
SELECT count(*) FILTER (WHERE a.action = 'webhook.parked') AS webhook_events_parked_total,
       count(*) FILTER (WHERE a.action = 'webhook.replayed') AS webhook_replays_total,
       count(*) FILTER (WHERE a.action = 'stripe.request_retried') AS outbox_requests_retried_total,
       count(*) FILTER (WHERE a.action = 'dunning.started') AS dunning_started_total,
       -- paid again, whether the tenant had been told of the failure or not
       count(*) FILTER (WHERE a.action IN ('dunning.recovered', 'dunning.recovered_before_known')) AS dunning_recovered_total,
       count(*) FILTER (WHERE a.action = 'dispute.created') AS disputes_total,
       count(*) FILTER (WHERE a.action = 'drift.repaired') AS drift_repairs_total,
       count(*) AS audit_events_total
  FROM billing.audit_log a;

COMMENT ON VIEW billing.prometheus_audit_counters IS
  'Prometheus: counters from the append-only audit log: webhook events parked and replays, outbox requests retried by an operator, dunning started and recovered, disputes, drift repairs made by reconciliation (drift.repaired), and all audit rows.';

-- The worker (billing.worker_status, whose "alive" is "up" here).
CREATE VIEW billing.prometheus_worker AS
SELECT (s.pid IS NOT NULL)::integer AS running,
       coalesce(s.alive, false)::integer AS up,
       extract(epoch FROM s.heartbeat_age)::double precision AS heartbeat_age_seconds,
       coalesce(extract(epoch FROM s.started_at), 0)::double precision AS start_time_seconds,
       coalesce(extract(epoch FROM s.last_loop_at), 0)::double precision AS last_loop_timestamp_seconds,
       w.extension_present::integer AS extension_present,
       s.loops AS loops_total,
       s.wake_requests AS wake_requests_total,
       s.latch_wakeups AS latch_wakeups_total,
       s.timeout_wakeups AS timeout_wakeups_total,
       s.reclaimed AS reclaimed_total,
       s.naptime_ms / 1000.0::double precision AS naptime_seconds,
       coalesce(extract(epoch FROM s.last_error_at), 0)::double precision AS last_error_timestamp_seconds
  FROM billing.worker_status s
 CROSS JOIN billing.worker_state() w;

COMMENT ON VIEW billing.prometheus_worker IS
  'Prometheus: the worker: running (a process), up (billing.worker_status.alive: running and looped lately), heartbeat age, start and last loop times, whether it found the extension, loops, wake-ups, rows reclaimed after a crash, naptime, time of its last error (times are 0 when there is none; the heartbeat age is NULL, NaN in Prometheus, before the first loop).';

-- Current subscriptions (billing.subscription_health), MRR in dollars.
CREATE VIEW billing.prometheus_subscriptions AS
SELECT h.plan_id AS plan, h.billing_interval, h.status,
       h.subscriptions AS current,
       h.cancelling_at_period_end AS cancel_at_period_end,
       h.in_grace_period,
       h.grace_period_over,
       h.mrr / 100.0::double precision AS mrr_usd
  FROM billing.subscription_health h;

COMMENT ON VIEW billing.prometheus_subscriptions IS
  'Prometheus: current subscriptions by plan, interval and status (billing.subscription_health), with monthly recurring revenue in US dollars.';

-- Payments by kind and current status (every payment mirrored).
CREATE VIEW billing.prometheus_payments AS
SELECT p.kind, p.status, count(*) AS current
  FROM billing.payments p
 GROUP BY p.kind, p.status;

COMMENT ON VIEW billing.prometheus_payments IS
  'Prometheus: payments mirrored from Stripe by kind (one_time, subscription) and current status. For success rates use the counters of payment_intent.succeeded and payment_intent.payment_failed events.';

-- Usage in the current periods (billing.usage_patterns).
-- (through a function that runs as the extension's owner: the view's
-- functions would be called with the reader's rights, and the exporter's
-- role may not call usage_current, which gives one tenant's usage)
CREATE OR REPLACE FUNCTION billing.usage_patterns_now() RETURNS SETOF billing.usage_patterns
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$ SELECT * FROM billing.usage_patterns $$;

COMMENT ON FUNCTION billing.usage_patterns_now() IS
  'billing.usage_patterns, aggregated over every tenant, for billing.prometheus_usage (whose readers may not read one tenant''s usage).';

CREATE VIEW billing.prometheus_usage AS
SELECT u.metric, u.tenants, u.active_tenants,
       coalesce(u.used, 0)::double precision AS current_period,
       u.used_p50::double precision AS tenant_p50,
       u.used_p95::double precision AS tenant_p95,
       u.used_max::double precision AS tenant_max,
       u.near_limit AS tenants_near_limit,
       u.over_limit AS tenants_over_limit
  FROM billing.usage_patterns_now() u;

COMMENT ON VIEW billing.prometheus_usage IS
  'Prometheus: usage in each tenant''s current period by metric (billing.usage_patterns): tenants, active tenants, the sum, the per-tenant median, p95 and maximum, tenants near (80 %) and over their limit.';

-- Shared-memory usage counters (billing.usage_cache_stats()).
CREATE VIEW billing.prometheus_usage_cache AS
SELECT s.capacity, s.entries,
       s.hits AS hits_total, s.loads AS loads_total, s.uncached AS uncached_total,
       s.dropped AS dropped_total, s.swept AS swept_total, s.evicted AS evicted_total,
       s.bytes_per_counter AS entry_size_bytes
  FROM billing.usage_cache_stats() s;

COMMENT ON VIEW billing.prometheus_usage_cache IS
  'Prometheus: the shared-memory usage counters since the server started: capacity and entries, hits, builds from the table, uncached reads, entries dropped, swept and evicted, and the bytes one entry takes.';

-- Inbound rate limiting (billing.rate_limit_stats()).
CREATE VIEW billing.prometheus_rate_limit AS
SELECT s.allowed AS requests_allowed_total, s.limited AS requests_limited_total,
       s.overflowed AS requests_overflowed_total, s.slots_used AS buckets_used, s.slots AS buckets
  FROM billing.rate_limit_stats() s;

COMMENT ON VIEW billing.prometheus_rate_limit IS
  'Prometheus: inbound rate limiting since the server started: requests allowed, limited (429) and sharing the overflow bucket; token buckets in use and available.';

REVOKE ALL ON FUNCTION billing.prometheus_latency_buckets(), billing.usage_patterns_now() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION billing.prometheus_latency_buckets(), billing.webhook_event_types(),
                          billing.usage_patterns_now() TO qes_admin;

GRANT SELECT ON billing.prometheus_webhook_events, billing.prometheus_webhook_inbox,
                billing.prometheus_webhook_rejections, billing.prometheus_outbox,
                billing.prometheus_outbox_failures, billing.prometheus_audit_counters,
                billing.prometheus_worker, billing.prometheus_subscriptions, billing.prometheus_payments,
                billing.prometheus_usage, billing.prometheus_usage_cache, billing.prometheus_rate_limit
  TO qes_admin;

-- (upgrade) billing.seed_rows holds the rows as CREATE EXTENSION made them
-- (in 0.1), not as they are now: a row an operator changed since is no
-- longer its seed, and pg_dump keeps it.  0.1's own seed statements make
-- them again, into copies of the tables.
CREATE TABLE qes_billing_0_1.seed_metrics (LIKE billing.metrics INCLUDING DEFAULTS);
CREATE TABLE qes_billing_0_1.seed_plans (LIKE billing.plans INCLUDING DEFAULTS);
CREATE TABLE qes_billing_0_1.seed_plan_limits (LIKE billing.plan_limits INCLUDING DEFAULTS);
CREATE TABLE qes_billing_0_1.seed_prices (LIKE billing.prices INCLUDING DEFAULTS);
CREATE TABLE qes_billing_0_1.seed_clock (LIKE billing.clock INCLUDING DEFAULTS);
CREATE TABLE qes_billing_0_1.seed_audit_head (LIKE billing.audit_head INCLUDING DEFAULTS);
INSERT INTO qes_billing_0_1.seed_clock DEFAULT VALUES;
INSERT INTO qes_billing_0_1.seed_metrics VALUES
  ('signatures', 'counter', 'signature', 'Qualified electronic signatures created'),
  ('documents',  'counter', 'document',  'Documents uploaded for signing'),
  ('api_calls',  'counter', 'call',      'Calls to the platform API'),
  ('storage',    'gauge',   'byte',      'Document storage in use');
INSERT INTO qes_billing_0_1.seed_plans (plan_id, name, tier, description, features) VALUES
  ('free', 'Free', 0, 'For trying QES signatures', '{}'),
  ('professional', 'Professional', 1, 'For growing teams',
   '{advanced_signatures,api_access}'),
  ('enterprise', 'Enterprise', 2, 'For regulated organisations',
   '{advanced_signatures,api_access,priority_support,compliance_tools}');
INSERT INTO qes_billing_0_1.seed_plan_limits (plan_id, metric, soft_limit) VALUES
  ('free', 'signatures', 10), ('free', 'documents', 50),
  ('free', 'api_calls', 1000), ('free', 'storage', 1073741824),
  ('professional', 'signatures', 100), ('professional', 'documents', 1000),
  ('professional', 'api_calls', 10000), ('professional', 'storage', 10737418240),
  ('enterprise', 'signatures', NULL), ('enterprise', 'documents', NULL),
  ('enterprise', 'api_calls', NULL), ('enterprise', 'storage', 107374182400);
INSERT INTO qes_billing_0_1.seed_prices (price_key, plan_id, billing_interval, unit_amount) VALUES
  ('free_monthly', 'free', 'month', 0),
  ('free_yearly', 'free', 'year', 0),
  ('professional_monthly', 'professional', 'month', 2900),
  ('professional_yearly', 'professional', 'year', 29000),
  ('enterprise_monthly', 'enterprise', 'month', 9900),
  ('enterprise_yearly', 'enterprise', 'year', 99000);
INSERT INTO qes_billing_0_1.seed_audit_head VALUES (true, 0, '\x0000000000000000000000000000000000000000000000000000000000000000');
INSERT INTO billing.seed_rows
SELECT 'metrics', pg_catalog.to_jsonb(t) FROM qes_billing_0_1.seed_metrics t
UNION ALL SELECT 'plans', pg_catalog.to_jsonb(t) FROM qes_billing_0_1.seed_plans t
UNION ALL SELECT 'plan_limits', pg_catalog.to_jsonb(t) FROM qes_billing_0_1.seed_plan_limits t
UNION ALL SELECT 'prices', pg_catalog.to_jsonb(t) FROM qes_billing_0_1.seed_prices t
UNION ALL SELECT 'clock', pg_catalog.to_jsonb(t) FROM qes_billing_0_1.seed_clock t
UNION ALL SELECT 'audit_head', pg_catalog.to_jsonb(t) FROM qes_billing_0_1.seed_audit_head t;

-- Whether a row is still as seeded, as an SQL expression over a table
-- alias: pg_dump's filter for the seeded tables, and the test of the
-- trigger below.  The stored seed is read back into the row type and
-- compared as typed values, so settings such as IntervalStyle or
-- bytea_output, which pg_dump and the installing session may set
-- differently, do not matter; a column the stored seed lacks (added by a
-- later version) is not compared.  pg_dump runs the filter with an empty
-- search_path, and with the rights of whoever dumps (a member of
-- pg_read_all_data can read seed_rows, but may execute no billing
-- function): so it is plain, qualified SQL.
CREATE OR REPLACE FUNCTION billing.seed_row_test(p_table text, p_alias text) RETURNS text
  LANGUAGE sql STABLE STRICT
RETURN pg_catalog.format(
  'EXISTS (SELECT FROM billing.seed_rows s WHERE s.relname OPERATOR(pg_catalog.=) %L'
  ' AND pg_catalog.jsonb_populate_record(%I.*, s."row") IS NOT DISTINCT FROM %I.*)',
  p_table, p_alias, p_alias);

COMMENT ON FUNCTION billing.seed_row_test(text, text) IS
  'The SQL condition "this row of the seeded table is still exactly as CREATE EXTENSION made it", over a table alias.';

-- A row inserted with the primary key of a row that is still its seed
-- replaces that row instead of failing on the key: this is how a restore
-- puts a changed seed row (dumped) over the seed CREATE EXTENSION just made.
-- The row is updated in place, never deleted, so ON DELETE CASCADE and
-- foreign keys into it are not disturbed.  Any other insert proceeds (a
-- duplicate of a changed row still fails with 23505).  It runs with the
-- rights of the inserter, who needs the table owner's (as for every
-- catalog change: nothing on these tables is granted).
CREATE OR REPLACE FUNCTION billing.replace_seed_row() RETURNS trigger
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_match text;
  v_cols  text;
  v_seed  boolean;
BEGIN
  SELECT string_agg(format('t.%1$I = ($1).%1$I', a.attname), ' AND ')
    INTO v_match
    FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
   WHERE i.indrelid = TG_RELID AND i.indisprimary;
  IF v_match IS NULL THEN
    RAISE EXCEPTION 'table % has no primary key', TG_RELID::regclass
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  EXECUTE format('SELECT %s FROM %s t WHERE %s FOR UPDATE',
                 billing.seed_row_test(TG_TABLE_NAME, 't'), TG_RELID::regclass, v_match)
     INTO v_seed USING NEW;
  IF v_seed IS NOT TRUE THEN
    RETURN NEW;   -- no row with this key, or one that is no longer its seed
  END IF;

  SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
    INTO v_cols
    FROM pg_attribute a
   WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
  EXECUTE format('UPDATE %s t SET (%s) = (SELECT %s FROM (SELECT ($1).*) n) WHERE %s',
                 TG_RELID::regclass, v_cols, v_cols, v_match)
    USING NEW;
  RETURN NULL;    -- the seed row now holds it
END
$$;

COMMENT ON FUNCTION billing.replace_seed_row() IS
  'Trigger: an inserted row whose primary key is that of a row still as seeded replaces that row (how a restore loads a changed seed row).';

DO $dump$
DECLARE
  t text;
BEGIN
  -- the seeded tables: every row but those still as seeded
  FOREACH t IN ARRAY ARRAY['metrics', 'plans', 'plan_limits', 'prices', 'clock', 'audit_head'] LOOP
    EXECUTE format('CREATE TRIGGER replace_seed BEFORE INSERT ON billing.%I
                      FOR EACH ROW EXECUTE FUNCTION billing.replace_seed_row()', t);
    PERFORM pg_catalog.pg_extension_config_dump(format('billing.%I', t)::regclass,
              'WHERE NOT ' || billing.seed_row_test(t, t));
  END LOOP;

  -- tenant data, queues, the audit log: every row
  FOREACH t IN ARRAY ARRAY['tenants', 'subscriptions', 'usage_events', 'invoices', 'payments', 'disputes',
                           'notifications', 'stripe_requests', 'webhook_events', 'webhook_rejections',
                           'audit_log', 'stripe_customers', 'invoice_payments', 'webhook_waits',
                           'reconcile_runs', 'drift_repairs', 'reconcile_state', 'invoice_failures',
                           'partition_fences', 'partition_move_log', 'cluster_identity'] LOOP
    PERFORM pg_catalog.pg_extension_config_dump(format('billing.%I', t)::regclass, '');
  END LOOP;

  -- the identity sequences, so that new ids follow the restored rows
  FOR t IN SELECT pg_catalog.pg_get_serial_sequence(format('billing.%I', c.relname), a.attname)
             FROM pg_catalog.pg_attribute a
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
            WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
              AND a.attidentity <> '' AND NOT a.attisdropped
            ORDER BY 1 LOOP
    PERFORM pg_catalog.pg_extension_config_dump(t::regclass, '');
  END LOOP;

  -- billing.seed_rows (made by this script) and billing.stripe_secrets
  -- (secrets stay out of dumps) are not dumped.
END
$dump$;

-- Usage billed through meters (94_meters.sql): the operator's metered
-- prices, the meters setup made, which usage rows went to Stripe in which
-- meter event (what makes a restore send nothing twice) and the invoices'
-- lines: every row.
-- (one call per statement: each updates the extension's catalog row)
DO $meters$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['metered_prices', 'meters', 'meter_events', 'meter_event_usage', 'meter_state',
                           'invoice_lines'] LOOP
    PERFORM pg_catalog.pg_extension_config_dump(format('billing.%I', t)::regclass, '');
  END LOOP;
END
$meters$;

-- Tax (91_tax.sql): the tenants' billing details, the invoices' and
-- one-time payments' tax as Stripe computed it: every row.
DO $tax$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['billing_details', 'invoice_taxes', 'payment_taxes'] LOOP
    PERFORM pg_catalog.pg_extension_config_dump(format('billing.%I', t)::regclass, '');
  END LOOP;
END
$tax$;

-- Privileges and row-level security.  Runs last, over everything above.
--   qes_anon    anonymous PostgREST requests (and Stripe's webhooks)
--   qes_tenant  a tenant's users; the JWT carries tenant_id
--   qes_admin   operators
--   qes_app     the QES platform itself (registers tenants, records usage)
--   qes_monitor the Prometheus exporter: the metrics views, nothing else
-- Nothing is granted to PUBLIC.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing FROM PUBLIC;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA api FROM PUBLIC;

REVOKE ALL ON SCHEMA api FROM PUBLIC;

GRANT USAGE ON SCHEMA api TO qes_anon, qes_tenant, qes_admin, qes_app;

GRANT USAGE ON SCHEMA billing TO qes_tenant, qes_admin, qes_app;

-- Stripe's webhooks arrive anonymously: the one write the anonymous role may do
GRANT EXECUTE ON FUNCTION api.stripe_webhook(json) TO qes_anon;

-- public catalog and status
GRANT SELECT ON api.plans TO qes_anon, qes_tenant, qes_admin, qes_app;

GRANT EXECUTE ON FUNCTION api.config(), api.health() TO qes_anon, qes_tenant, qes_admin, qes_app;

-- tenant-owned rows, behind row-level security
GRANT EXECUTE ON FUNCTION billing.jwt_claims(), billing.jwt_tenant_id() TO qes_tenant, qes_admin, qes_app;

GRANT SELECT ON api.tenant TO qes_tenant, qes_admin;

GRANT SELECT ON api.invoices TO qes_tenant, qes_admin;

-- (upgrade) row-level security of the table made again (the others keep theirs)
ALTER TABLE billing.subscriptions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_own_rows ON billing.subscriptions FOR SELECT TO qes_tenant
  USING (tenant_id = billing.jwt_tenant_id());
CREATE POLICY staff_all_rows ON billing.subscriptions TO qes_admin, qes_app
  USING (true) WITH CHECK (true);
GRANT SELECT ON billing.subscriptions TO qes_tenant, qes_admin;

-- (what pg_dump keeps: sql/install/97_dump.sql)

-- subscriptions and payments, for the tenant
GRANT EXECUTE ON FUNCTION api.create_subscription(text, text),
                          api.update_subscription(text, text, boolean, text),
                          api.create_payment_intent(bigint, text, text)
  TO qes_tenant;

GRANT EXECUTE ON FUNCTION billing.now(), billing.environment() TO qes_tenant, qes_admin;

GRANT SELECT ON billing.clock TO qes_tenant, qes_admin;   -- billing.now() reads it

GRANT SELECT ON api.subscription, api.payments TO qes_tenant, qes_admin;

-- usage, for the tenant through api.usage
GRANT EXECUTE ON FUNCTION billing.my_usage() TO qes_tenant;

GRANT SELECT ON api.usage TO qes_tenant;

-- features, for the tenant through api.features and api.has_feature
-- (sql/install/41_features.sql)
GRANT EXECUTE ON FUNCTION billing.my_features(), api.has_feature(text) TO qes_tenant;

GRANT SELECT ON api.features TO qes_tenant;

GRANT EXECUTE ON FUNCTION billing.has_feature(text, text), billing.features_current(text) TO qes_app, qes_admin;

-- the webhook endpoints whose secrets are kept, never the secrets
-- (sql/install/88_webhook_endpoints.sql; set_webhook_secret: superusers only)
GRANT SELECT ON billing.webhook_endpoints TO qes_admin;

-- usage billed through meters (sql/install/94_meters.sql)
GRANT EXECUTE ON FUNCTION billing.my_usage_billable() TO qes_tenant;

-- the invoices' lines, behind row-level security like the invoices
ALTER TABLE billing.invoice_lines ENABLE ROW LEVEL SECURITY;

CREATE POLICY tenant_own_rows ON billing.invoice_lines FOR SELECT TO qes_tenant
  USING (tenant_id = billing.jwt_tenant_id());

CREATE POLICY staff_all_rows ON billing.invoice_lines TO qes_admin, qes_app USING (true) WITH CHECK (true);

GRANT SELECT ON billing.invoice_lines TO qes_tenant, qes_admin;

GRANT EXECUTE ON FUNCTION billing.usage_billable(text) TO qes_app, qes_admin;

GRANT EXECUTE ON FUNCTION billing.meter_reconcile(text), billing.void_usage(text, text, text) TO qes_admin;

GRANT SELECT ON billing.meter_metrics, billing.meter_events, billing.metered_prices, billing.meters TO qes_admin;

-- the platform
GRANT EXECUTE ON FUNCTION billing.upsert_tenant(text, text, text),
                          billing.record_usage(text, text, bigint, text, jsonb, timestamptz),
                          billing.record_usage_batch(text, jsonb),
                          billing.check_limit(text, text, bigint),
                          billing.usage_current(text),
                          billing.usage_period(text, timestamptz),
                          billing.usage_report(text)
  TO qes_app, qes_admin;

-- operators
GRANT SELECT ON billing.worker_status, billing.audit_log, billing.stripe_requests,
                billing.webhook_events, billing.webhook_rejections, billing.webhook_metrics,
                billing.outbox_metrics, billing.subscription_health, billing.payment_metrics,
                billing.usage_patterns TO qes_admin;

GRANT EXECUTE ON FUNCTION billing.replay_webhook(text), billing.retry_request(bigint, boolean) TO qes_admin;

-- reconciliation (sql/install/86_reconcile.sql)
GRANT SELECT ON billing.drift_report, billing.reconcile_runs TO qes_admin;

GRANT EXECUTE ON FUNCTION billing.reconcile_tenant(text), billing.reconcile_now() TO qes_admin;

GRANT EXECUTE ON FUNCTION billing.worker_state(), billing.outbox_lane_state(), billing.verify_audit_chain(), billing.usage_cache_stats(),
                          billing.audit_hash(bytea, bigint, timestamptz, text, text, text, text, text, jsonb),
                          billing.wake_worker()
  TO qes_admin;

-- abuse protection: PostgREST calls the pre-request function as every role
GRANT EXECUTE ON FUNCTION api.pre_request() TO qes_anon, qes_tenant, qes_admin, qes_app;

GRANT EXECUTE ON FUNCTION billing.webhook_rejections_pending(), billing.rate_limit_stats() TO qes_admin;

-- verify_audit_chain() reads the chain head (not a secret: the last row's hash)
GRANT SELECT ON billing.audit_head TO qes_admin;

-- ... and where the kept chain starts (audit rows archived: ids, hashes, the export's digest)
GRANT SELECT ON billing.audit_archives TO qes_admin;

-- disputes (sql/install/94_disputes.sql): the evidence to review, its submission, the alert's view
GRANT SELECT ON billing.dispute_evidence, billing.prometheus_disputes TO qes_admin;

GRANT EXECUTE ON FUNCTION billing.submit_dispute_evidence(text), api.submit_dispute_evidence(text) TO qes_admin;

-- tax (sql/install/91_tax.sql): a tenant's own billing details; the
-- invoices' tax behind row-level security like the invoices
ALTER TABLE billing.invoice_taxes ENABLE ROW LEVEL SECURITY;

CREATE POLICY tenant_own_rows ON billing.invoice_taxes FOR SELECT TO qes_tenant
  USING (tenant_id = billing.jwt_tenant_id());

CREATE POLICY staff_all_rows ON billing.invoice_taxes TO qes_admin, qes_app USING (true) WITH CHECK (true);

GRANT SELECT ON billing.invoice_taxes TO qes_tenant, qes_admin;

GRANT SELECT ON billing.prometheus_tax TO qes_admin;

GRANT EXECUTE ON FUNCTION api.set_billing_details(text, text, text, text, text, text), api.billing_details()
  TO qes_tenant;

-- The exporter's role (docs/operations.md, "Monitoring"): the metrics views
-- and the functions they call, and nothing that acts or reads a tenant's
-- rows.  (Not qes_admin: default_transaction_read_only is only a default,
-- and an operator's role can force a retry, void usage or read payment
-- secrets.)
GRANT USAGE ON SCHEMA billing TO qes_monitor;

GRANT SELECT ON billing.prometheus_webhook_events, billing.prometheus_webhook_inbox,
                billing.prometheus_webhook_rejections, billing.prometheus_outbox,
                billing.prometheus_outbox_failures, billing.prometheus_audit_counters,
                billing.prometheus_worker, billing.prometheus_subscriptions, billing.prometheus_payments,
                billing.prometheus_usage, billing.prometheus_usage_cache, billing.prometheus_rate_limit,
                billing.prometheus_disputes, billing.prometheus_tax
  TO qes_monitor;

-- (a view's functions are called with the reader's rights; not
-- usage_current, one tenant's usage: prometheus_usage reads the sums
-- through billing.usage_patterns_now())
GRANT EXECUTE ON FUNCTION billing.prometheus_latency_buckets(), billing.webhook_event_types(),
                          billing.worker_state(), billing.rate_limit_stats(), billing.usage_cache_stats(),
                          billing.webhook_rejections_pending(), billing.usage_patterns_now(), billing.now(),
                          billing.environment()
  TO qes_monitor;

GRANT SELECT ON billing.clock TO qes_monitor;   -- billing.now() reads it

-- Shared memory outlives DROP EXTENSION: forget what an earlier
-- incarnation cached, and let the worker find the new extension (and
-- reconcile its queues) as soon as CREATE EXTENSION commits.
SELECT billing.reset_caches();

SELECT billing.wake_worker();

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
