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
  PRIMARY KEY (tenant_id, stripe_invoice_id),
  FOREIGN KEY (tenant_id, subscription_id) REFERENCES billing.subscriptions
);
COMMENT ON TABLE billing.invoices IS 'Invoices mirrored from Stripe.';
CREATE INDEX invoices_newest ON billing.invoices (tenant_id, stripe_created DESC);
CREATE INDEX invoices_subscription ON billing.invoices (stripe_subscription_id) WHERE stripe_subscription_id IS NOT NULL;

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
  PRIMARY KEY (tenant_id, stripe_dispute_id)
);
COMMENT ON TABLE billing.disputes IS 'Card disputes (chargebacks) reported by Stripe.';

CREATE TABLE billing.notifications (
  tenant_id       text NOT NULL REFERENCES billing.tenants,
  notification_id bigint GENERATED ALWAYS AS IDENTITY,
  kind            text NOT NULL CHECK (kind ~ '^[a-z_]+(\.[a-z_]+)*$'),
  audience        text NOT NULL DEFAULT 'tenant' CHECK (audience IN ('tenant', 'operator')),
  dedup_key       text NOT NULL,
  payload         jsonb NOT NULL DEFAULT '{}',
  state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
  created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
  sent_at         timestamptz,
  PRIMARY KEY (tenant_id, notification_id),
  UNIQUE (tenant_id, dedup_key)
);
COMMENT ON TABLE billing.notifications IS
  'Notifications to tenants or operators, queued once per dedup_key (e.g. one per tenant, metric, period and threshold).';
CREATE INDEX notifications_pending ON billing.notifications (created_at) WHERE state = 'pending';
