-- qes_billing install script, assembled from sql/install/*.sql in name order.
\echo Use "CREATE EXTENSION qes_billing" to load this file. \quit

-- Schema billing is private; schema api is what PostgREST exposes.  Both
-- are members of the extension, so DROP EXTENSION removes them.
CREATE SCHEMA billing;
CREATE SCHEMA api;
COMMENT ON SCHEMA api IS
  'QES billing REST API: subscriptions, usage, invoices, payments and the Stripe webhook, exposed through PostgREST.';
COMMENT ON SCHEMA billing IS
  'qes_billing private schema: billing tables, queues, audit log and internal functions.';

-- The roles PostgREST switches to.  Roles are cluster-wide and are not
-- members of the extension: they are created when missing and survive
-- DROP EXTENSION, so that other databases using them keep working.
DO $roles$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['qes_anon', 'qes_tenant', 'qes_admin', 'qes_app'] LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
      EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
    END IF;
  END LOOP;
END
$roles$;
-- Configuration as seen from SQL (src/config.c), the JWT claims, and the
-- billing clock (docs/architecture.md, rule 9).

CREATE FUNCTION billing.environment() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_environment_fn';
COMMENT ON FUNCTION billing.environment() IS
  'development, staging or production (QES_ENVIRONMENT, or qes_billing.environment).';

CREATE FUNCTION billing.stripe_mode() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_stripe_mode_fn';
COMMENT ON FUNCTION billing.stripe_mode() IS
  'test in development and staging, live in production.';

CREATE FUNCTION billing.base_url() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_base_url_fn';
COMMENT ON FUNCTION billing.base_url() IS 'QES_BASE_URL, or qes_billing.base_url; NULL when unset.';

CREATE FUNCTION billing.publishable_key() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_publishable_key_fn';
COMMENT ON FUNCTION billing.publishable_key() IS
  'The Stripe publishable key of the current mode; NULL when unset, an error when of the wrong mode.';

CREATE FUNCTION billing.stripe_key_problem(kind text) RETURNS text
  LANGUAGE c STABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_stripe_key_problem_fn';
COMMENT ON FUNCTION billing.stripe_key_problem(text) IS
  'NULL when the key of this kind (secret, publishable, webhook) is usable, else what is wrong. Never the key itself.';

CREATE FUNCTION billing.require_stripe_keys() RETURNS void
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_require_stripe_keys_fn';
COMMENT ON FUNCTION billing.require_stripe_keys() IS
  'Raise an error naming the variable at fault unless all three Stripe keys of the current mode are usable.';

CREATE FUNCTION billing.outer_role() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_outer_role';
COMMENT ON FUNCTION billing.outer_role() IS
  'The role the session acts as (PostgREST''s JWT role), even inside SECURITY DEFINER functions.';

CREATE FUNCTION billing.jwt_claims() RETURNS jsonb
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN coalesce(nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb, '{}'::jsonb);
COMMENT ON FUNCTION billing.jwt_claims() IS 'The JWT claims PostgREST set for this request, {} outside PostgREST.';

CREATE FUNCTION billing.jwt_tenant_id() RETURNS text
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN billing.jwt_claims() ->> 'tenant_id';
COMMENT ON FUNCTION billing.jwt_tenant_id() IS 'The tenant_id claim of the request''s JWT; row-level security is keyed on it.';

-- The billing clock.  Every time-dependent rule reads billing.now().
CREATE TABLE billing.clock (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  offset_by interval NOT NULL DEFAULT '0'
);
COMMENT ON TABLE billing.clock IS 'Offset of billing.now() from the real clock (ignored in production).';
INSERT INTO billing.clock DEFAULT VALUES;

CREATE FUNCTION billing.now() RETURNS timestamptz
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN pg_catalog.now() + CASE WHEN billing.environment() = 'production' THEN interval '0'
                                 ELSE (SELECT c.offset_by FROM billing.clock c) END;
COMMENT ON FUNCTION billing.now() IS
  'The billing clock: now() shifted by billing.set_clock() outside production.';

CREATE FUNCTION billing.set_clock(p_offset interval) RETURNS timestamptz
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, billing SET IntervalStyle = 'iso_8601'
AS $$
BEGIN
  IF p_offset IS NULL THEN
    RAISE EXCEPTION 'clock offset must not be NULL'
      USING ERRCODE = 'null_value_not_allowed', HINT = 'Use interval ''0'' to return to the real clock.';
  END IF;
  IF billing.environment() = 'production' THEN
    RAISE EXCEPTION 'the billing clock cannot be moved in production'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = 'QES_ENVIRONMENT is production.',
            HINT = 'Move the clock only in development or staging.';
  END IF;
  UPDATE billing.clock SET offset_by = p_offset;
  PERFORM billing.audit('clock.set', NULL, jsonb_build_object('offset', p_offset::text));
  RETURN billing.now();
END
$$;
COMMENT ON FUNCTION billing.set_clock(interval) IS
  'Shift billing.now() by an offset from the real clock (superusers, not in production).';
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

INSERT INTO billing.metrics VALUES
  ('signatures', 'counter', 'signature', 'Qualified electronic signatures created'),
  ('documents',  'counter', 'document',  'Documents uploaded for signing'),
  ('api_calls',  'counter', 'call',      'Calls to the platform API'),
  ('storage',    'gauge',   'byte',      'Document storage in use');

CREATE TABLE billing.plans (
  plan_id           text PRIMARY KEY CHECK (plan_id ~ '^[a-z][a-z0-9_]{0,31}$'),
  name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  tier              integer NOT NULL UNIQUE CHECK (tier >= 0),
  description       text NOT NULL DEFAULT '',
  features          text[] NOT NULL DEFAULT '{}',
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

INSERT INTO billing.plans (plan_id, name, tier, description, features) VALUES
  ('free', 'Free', 0, 'For trying QES signatures', '{}'),
  ('professional', 'Professional', 1, 'For growing teams',
   '{advanced_signatures,api_access}'),
  ('enterprise', 'Enterprise', 2, 'For regulated organisations',
   '{advanced_signatures,api_access,priority_support,compliance_tools}');

-- storage limits are bytes: 1, 10 and 100 GiB
INSERT INTO billing.plan_limits (plan_id, metric, soft_limit) VALUES
  ('free', 'signatures', 10), ('free', 'documents', 50),
  ('free', 'api_calls', 1000), ('free', 'storage', 1073741824),
  ('professional', 'signatures', 100), ('professional', 'documents', 1000),
  ('professional', 'api_calls', 10000), ('professional', 'storage', 10737418240),
  ('enterprise', 'signatures', NULL), ('enterprise', 'documents', NULL),
  ('enterprise', 'api_calls', NULL), ('enterprise', 'storage', 107374182400);

INSERT INTO billing.prices (price_key, plan_id, billing_interval, unit_amount) VALUES
  ('free_monthly', 'free', 'month', 0),
  ('free_yearly', 'free', 'year', 0),
  ('professional_monthly', 'professional', 'month', 2900),
  ('professional_yearly', 'professional', 'year', 29000),
  ('enterprise_monthly', 'enterprise', 'month', 9900),
  ('enterprise_yearly', 'enterprise', 'year', 99000);
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
  created_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
  updated_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (tenant_id, subscription_id),
  CHECK (current_period_end IS NULL OR current_period_start IS NULL
         OR current_period_end > current_period_start)
);
COMMENT ON TABLE billing.subscriptions IS
  'Subscriptions mirrored from Stripe (Free is local only). stripe_state_at is the Stripe time of the newest state applied, so an older event never overwrites a newer one.';
CREATE UNIQUE INDEX subscriptions_one_current ON billing.subscriptions (tenant_id)
  WHERE status NOT IN ('canceled', 'incomplete_expired');

CREATE FUNCTION billing.upsert_tenant(p_tenant_id text, p_name text, p_billing_email text)
  RETURNS billing.tenants
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_old billing.tenants;
  v_new billing.tenants;
BEGIN
  IF p_tenant_id IS NULL OR p_tenant_id !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$' THEN
    RAISE EXCEPTION 'invalid tenant id: %', coalesce(quote_literal(p_tenant_id), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A tenant id is 1 to 64 letters, digits, ".", "_", ":" or "-", starting with a letter or digit.';
  END IF;
  IF p_name IS NULL OR length(btrim(p_name)) = 0 OR length(p_name) > 200 THEN
    RAISE EXCEPTION 'invalid tenant name for tenant %', p_tenant_id
      USING ERRCODE = 'invalid_parameter_value', HINT = 'A tenant name is 1 to 200 characters.';
  END IF;
  IF p_billing_email IS NULL OR length(p_billing_email) > 254
     OR p_billing_email !~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$' THEN
    RAISE EXCEPTION 'invalid billing email for tenant %', p_tenant_id
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give an address such as billing@example.com.';
  END IF;

  SELECT * INTO v_old FROM billing.tenants WHERE tenant_id = p_tenant_id FOR UPDATE;
  IF NOT FOUND THEN
    INSERT INTO billing.tenants (tenant_id, name, billing_email)
      VALUES (p_tenant_id, btrim(p_name), p_billing_email)
      RETURNING * INTO v_new;
    PERFORM billing.audit('tenant.created', p_tenant_id,
                          jsonb_build_object('name', v_new.name, 'billing_email', v_new.billing_email));
  ELSIF v_old.name IS DISTINCT FROM btrim(p_name) OR v_old.billing_email IS DISTINCT FROM p_billing_email THEN
    UPDATE billing.tenants
       SET name = btrim(p_name), billing_email = p_billing_email, updated_at = now()
     WHERE tenant_id = p_tenant_id
     RETURNING * INTO v_new;
    PERFORM billing.audit('tenant.updated', p_tenant_id,
                          jsonb_build_object('name', v_new.name, 'billing_email', v_new.billing_email,
                                             'previous', jsonb_build_object('name', v_old.name,
                                                                            'billing_email', v_old.billing_email)));
  ELSE
    v_new := v_old;
  END IF;
  RETURN v_new;
END
$$;
COMMENT ON FUNCTION billing.upsert_tenant(text, text, text) IS
  'Register a tenant, or update its name and billing email. Audited; a call that changes nothing writes nothing.';
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

-- The hot paths, in C (src/usage.c, src/counters.c).

CREATE TYPE billing.usage_result AS (
  recorded     boolean,
  duplicate    boolean,
  metric       text,
  quantity     bigint,
  period_start timestamptz,
  period_end   timestamptz,
  total        bigint,
  usage_limit  bigint,
  remaining    bigint,
  status       text
);
COMMENT ON TYPE billing.usage_result IS
  'What record_usage did: recorded (new) or duplicate (the original result), the period total, the limit (NULL = unlimited), what remains and the limit status.';

CREATE TYPE billing.limit_check AS (
  allowed      boolean,
  status       text,
  current      bigint,
  usage_limit  bigint,
  remaining    bigint,
  plan_id      text,
  reason       text,
  upgrade      jsonb
);
COMMENT ON TYPE billing.limit_check IS
  'check_limit''s answer: allowed, status (ok, warning, over_soft_limit, blocked), the committed usage of the period, the limit (NULL = unlimited) and what remains, the plan whose limits apply, why they are not the subscribed plan''s (reason), and the upgrade offered when near or over the limit.';

CREATE FUNCTION billing.record_usage(
  tenant_id text, metric text, quantity bigint, idempotency_key text,
  metadata jsonb DEFAULT NULL, occurred_at timestamptz DEFAULT NULL)
  RETURNS billing.usage_result
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_record_usage';
COMMENT ON FUNCTION billing.record_usage(text, text, bigint, text, jsonb, timestamptz) IS
  'Record usage in the caller''s transaction. Counted once per (tenant_id, idempotency_key), forever; a repeat returns the original result. Counters add up per billing period; storage is a gauge (the latest value counts).';

CREATE FUNCTION billing.check_limit(tenant_id text, metric text, quantity bigint DEFAULT 1)
  RETURNS billing.limit_check
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_check_limit';
COMMENT ON FUNCTION billing.check_limit(text, text, bigint) IS
  'May the tenant use quantity more of metric? Soft limits: over them it is allowed, with the status and an upgrade prompt; only a plan''s hard ceiling blocks. Reads committed usage only.';

CREATE FUNCTION billing.usage_current(tenant_id text)
  RETURNS TABLE (metric text, period_start timestamptz, period_end timestamptz, used bigint,
                 usage_limit bigint, percent double precision, status text, plan_id text, reason text)
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_usage_current';
COMMENT ON FUNCTION billing.usage_current(text) IS
  'The tenant''s current billing period for every metric: used, limit (NULL = unlimited), percent and status, with the plan whose limits apply.';

CREATE FUNCTION billing.record_usage_batch(p_tenant_id text, p_events jsonb)
  RETURNS TABLE (idempotency_key text, recorded boolean, duplicate boolean, metric text,
                 quantity bigint, total bigint, usage_limit bigint, status text)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  e jsonb;
  r billing.usage_result;
  i integer := 0;
BEGIN
  IF p_events IS NULL OR jsonb_typeof(p_events) <> 'array' THEN
    RAISE EXCEPTION 'usage events must be a JSON array'
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass [{"metric": "signatures", "quantity": 1, "idempotency_key": "..."}, ...].';
  END IF;
  IF jsonb_array_length(p_events) > 10000 THEN
    RAISE EXCEPTION 'too many usage events in one batch: %', jsonb_array_length(p_events)
      USING ERRCODE = 'program_limit_exceeded', HINT = 'Send at most 10000 events per batch.';
  END IF;
  FOR e IN SELECT * FROM jsonb_array_elements(p_events) LOOP
    i := i + 1;
    IF jsonb_typeof(e) <> 'object' OR NOT (e ? 'metric' AND e ? 'quantity' AND e ? 'idempotency_key') THEN
      RAISE EXCEPTION 'usage event % must be an object with metric, quantity and idempotency_key', i
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    r := billing.record_usage(p_tenant_id, e ->> 'metric', (e ->> 'quantity')::bigint,
                              e ->> 'idempotency_key', e -> 'metadata',
                              (e ->> 'occurred_at')::timestamptz);
    idempotency_key := e ->> 'idempotency_key';
    recorded := r.recorded;
    duplicate := r.duplicate;
    metric := r.metric;
    quantity := r.quantity;
    total := r.total;
    usage_limit := r.usage_limit;
    status := r.status;
    RETURN NEXT;
  END LOOP;
END
$$;
COMMENT ON FUNCTION billing.record_usage_batch(text, jsonb) IS
  'Record many usage events of one tenant atomically; each as record_usage (duplicates, in the batch or against history, are skipped and reported).';

CREATE FUNCTION billing.usage_cache_stats(
  OUT capacity integer, OUT entries integer, OUT hits bigint, OUT loads bigint,
  OUT uncached bigint, OUT dropped bigint, OUT swept bigint)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_usage_cache_stats';
COMMENT ON FUNCTION billing.usage_cache_stats() IS
  'Shared-memory usage counters: capacity (qes_billing.max_counters), entries, hits, builds from the table, uncached reads (table full or entry being built), entries dropped, entries swept.';

CREATE FUNCTION billing.usage_cache_sweep(before timestamptz) RETURNS bigint
  LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'qes_usage_cache_sweep';
COMMENT ON FUNCTION billing.usage_cache_sweep(timestamptz) IS
  'Drop cached counters of periods that ended before the given time (the worker runs it).';

-- Usage per period for a tenant: the current period from the counters,
-- earlier periods from the history.
CREATE FUNCTION billing.usage_report(p_tenant_id text)
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
      FROM (SELECT u.period_start, u.metric, sum(u.quantity)::bigint AS used
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
COMMENT ON FUNCTION billing.usage_report(text) IS
  'A tenant''s usage: the current period per metric (used, limit, percent, status) and the totals of earlier periods.';

CREATE FUNCTION billing.my_usage()
  RETURNS TABLE (period_start timestamptz, period_end timestamptz, is_current boolean, metric text,
                 used bigint, usage_limit bigint, percent double precision, status text)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$ SELECT * FROM billing.usage_report(billing.jwt_tenant_id()) $$;
COMMENT ON FUNCTION billing.my_usage() IS 'usage_report() for the tenant named by the request''s JWT.';

-- Changes to what the backends cache take effect at commit.
CREATE FUNCTION billing.invalidate_cache_on_commit() RETURNS trigger
  LANGUAGE c AS 'MODULE_PATHNAME', 'qes_invalidate_cache_trigger';
COMMENT ON FUNCTION billing.invalidate_cache_on_commit() IS
  'Trigger: make every backend reload the plan catalog, clock and tenants when this transaction commits.';

DO $inval$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['metrics', 'plans', 'plan_limits', 'prices', 'clock', 'tenants', 'subscriptions'] LOOP
    EXECUTE format('CREATE TRIGGER invalidate_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON billing.%I
                      FOR EACH STATEMENT EXECUTE FUNCTION billing.invalidate_cache_on_commit()', t);
  END LOOP;
END
$inval$;

CREATE FUNCTION billing.usage_changed() RETURNS trigger
  LANGUAGE c AS 'MODULE_PATHNAME', 'qes_usage_changed_trigger';
COMMENT ON FUNCTION billing.usage_changed() IS
  'Trigger: usage rows were changed or removed other than by record_usage; cached counters are rebuilt from the table after commit.';
CREATE TRIGGER usage_changed AFTER UPDATE OR DELETE OR TRUNCATE ON billing.usage_events
  FOR EACH STATEMENT EXECUTE FUNCTION billing.usage_changed();

CREATE FUNCTION billing.reset_caches() RETURNS void
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_reset_caches';
COMMENT ON FUNCTION billing.reset_caches() IS
  'Forget every cached usage counter and catalog entry when this transaction commits.';
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
  PRIMARY KEY (tenant_id, stripe_invoice_id),
  FOREIGN KEY (tenant_id, subscription_id) REFERENCES billing.subscriptions
);
COMMENT ON TABLE billing.invoices IS 'Invoices mirrored from Stripe.';
CREATE INDEX invoices_newest ON billing.invoices (tenant_id, stripe_created DESC);

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
  PRIMARY KEY (tenant_id, payment_id)
);
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
-- The worker's queues: the outbox of Stripe requests and the inbox of
-- webhook events.  Both are global (not tenant-owned): a request or an event
-- may concern no tenant (setup) or one not yet known (a new event).
-- Inserting into either wakes the worker when the transaction commits.

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
  updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing.stripe_requests IS
  'Outbox of Stripe API requests. idempotency_key is fixed at insert and sent on every attempt.';
CREATE INDEX stripe_requests_due ON billing.stripe_requests (next_attempt_at) WHERE state = 'pending';
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
  state           text NOT NULL DEFAULT 'received'
                    CHECK (state IN ('received', 'processing', 'applied', 'ignored', 'needs_review')),
  attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  next_attempt_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  last_error      text,
  received_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
  applied_at      timestamptz
);
COMMENT ON TABLE billing.webhook_events IS
  'Inbox of verified Stripe webhook events, unique by Stripe event id; applied by the worker.';
-- in the order the worker claims events, so a batch needs no sort
CREATE INDEX webhook_events_due ON billing.webhook_events (stripe_created, received_at) WHERE state = 'received';
CREATE INDEX webhook_events_busy ON billing.webhook_events (received_at) WHERE state IN ('processing', 'needs_review');

CREATE FUNCTION billing.wake_worker_on_commit() RETURNS trigger
  LANGUAGE c AS 'MODULE_PATHNAME', 'qes_wake_worker_trigger';
COMMENT ON FUNCTION billing.wake_worker_on_commit() IS
  'Trigger: wake the worker when the inserting transaction commits (not before, not on rollback).';

CREATE TRIGGER wake_worker AFTER INSERT ON billing.stripe_requests
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();
CREATE TRIGGER wake_worker AFTER INSERT ON billing.webhook_events
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();

CREATE FUNCTION billing.wake_worker() RETURNS void
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_wake_worker';
COMMENT ON FUNCTION billing.wake_worker() IS 'Wake the worker when the calling transaction commits.';

-- Crash reconciliation: a row still in flight when the worker starts was
-- left by a crash (there is one worker).  Put it back in the queue; an
-- outbox row keeps its idempotency key, so Stripe replays instead of
-- creating twice.
CREATE FUNCTION billing.worker_reclaim() RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_requests bigint;
  v_events bigint;
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'pending', claimed_at = NULL, next_attempt_at = now(), updated_at = now()
   WHERE state = 'in_flight';
  GET DIAGNOSTICS v_requests = ROW_COUNT;
  UPDATE billing.webhook_events
     SET state = 'received', next_attempt_at = now()
   WHERE state = 'processing';
  GET DIAGNOSTICS v_events = ROW_COUNT;
  IF v_requests + v_events > 0 THEN
    PERFORM billing.audit('worker.reclaimed', NULL,
                          jsonb_build_object('stripe_requests', v_requests, 'webhook_events', v_events));
  END IF;
  RETURN v_requests + v_events;
END
$$;
COMMENT ON FUNCTION billing.worker_reclaim() IS
  'Run by the worker at start: put queue rows left in flight by a crash back in the queue.';

-- The worker's work, once per loop: apply due webhook events, then timers.
-- Returns the number of events applied (the worker loops again at once
-- when it was a full batch) and the seconds until the next outbox request
-- is due (NULL: none waits), so that one call per loop tells it both.
CREATE FUNCTION billing.worker_tick(OUT applied bigint, OUT outbox_due_s double precision)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  applied := billing.process_inbox(200);
  -- outbox requests whose answer this worker lost
  PERFORM billing.outbox_reclaim_stale(current_setting('qes_billing.request_timeout')::interval);
  -- cached usage counters of periods that ended more than a day ago
  PERFORM billing.usage_cache_sweep(billing.now() - interval '1 day');
  outbox_due_s := billing.outbox_next_due();
END
$$;
COMMENT ON FUNCTION billing.worker_tick() IS
  'Run by the worker once per loop: apply due webhook events, timers. Returns the events applied and the seconds until the next outbox request is due.';

CREATE FUNCTION billing.worker_state(
  OUT pid integer, OUT started_at timestamptz, OUT last_loop_at timestamptz,
  OUT loops bigint, OUT latch_wakeups bigint, OUT timeout_wakeups bigint,
  OUT naptime_ms integer, OUT reclaimed bigint, OUT extension_present boolean,
  OUT last_error text, OUT last_error_at timestamptz, OUT wake_requests bigint,
  OUT wakes_served bigint)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_worker_state_fn';
COMMENT ON FUNCTION billing.worker_state() IS 'The worker''s state as it publishes it in shared memory.';

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
-- The audit log: append-only, hash-chained with SHA-256 (src/audit.c).
-- Writers serialize on the single chain-head row, so audit ids are
-- gap-free and in chain order; a missing row shows as a gap.

CREATE FUNCTION billing.audit_hash(prev bytea, audit_id bigint, occurred_at timestamptz,
                                   actor_role text, actor_sub text, actor_tenant text,
                                   tenant_id text, action text, details jsonb)
  RETURNS bytea LANGUAGE c IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_audit_hash';
COMMENT ON FUNCTION billing.audit_hash(bytea, bigint, timestamptz, text, text, text, text, text, jsonb) IS
  'SHA-256 over the previous hash and the canonical content of one audit row.';

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

CREATE TABLE billing.audit_head (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  last_id   bigint NOT NULL,
  last_hash bytea NOT NULL
);
COMMENT ON TABLE billing.audit_head IS 'The newest link of the audit chain; audit writers lock it.';
INSERT INTO billing.audit_head VALUES (true, 0, '\x0000000000000000000000000000000000000000000000000000000000000000');

CREATE FUNCTION billing.audit(p_action text, p_tenant_id text DEFAULT NULL, p_details jsonb DEFAULT '{}')
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_head   billing.audit_head;
  v_id     bigint;
  v_at     timestamptz := clock_timestamp();
  v_role   text := billing.outer_role();
  v_claims jsonb := billing.jwt_claims();
  v_hash   bytea;
BEGIN
  IF p_action IS NULL OR p_action !~ '^[a-z_]+(\.[a-z_]+)+$' THEN
    RAISE EXCEPTION 'invalid audit action: %', coalesce(quote_literal(p_action), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Actions look like "subscription.created".';
  END IF;
  p_details := coalesce(p_details, '{}');

  SELECT * INTO v_head FROM billing.audit_head FOR UPDATE;
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
COMMENT ON FUNCTION billing.audit(text, text, jsonb) IS
  'Append one row to the audit log, chained to the previous one. Returns its audit_id.';

CREATE FUNCTION billing.audit_guard() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF current_setting('qes_billing.audit_guard')::boolean THEN
    RAISE EXCEPTION 'the audit log is append-only: % is not allowed', TG_OP
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Audit rows are never changed or removed.';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
COMMENT ON FUNCTION billing.audit_guard() IS 'Trigger: refuse UPDATE, DELETE and TRUNCATE of the audit log.';

CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON billing.audit_log
  FOR EACH ROW EXECUTE FUNCTION billing.audit_guard();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON billing.audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION billing.audit_guard();

CREATE FUNCTION billing.verify_audit_chain(
  OUT ok boolean, OUT rows_checked bigint, OUT first_bad_id bigint, OUT problem text)
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_head billing.audit_head;
  v_last billing.audit_log;
BEGIN
  SELECT count(*) INTO rows_checked FROM billing.audit_log;

  SELECT c.audit_id,
         CASE
           WHEN c.prev_id IS NULL AND c.audit_id <> 1 THEN 'rows before this one are missing'
           WHEN c.prev_id IS NOT NULL AND c.audit_id <> c.prev_id + 1 THEN 'rows before this one are missing'
           WHEN c.prev_hash <> coalesce(c.chain_prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
             THEN 'prev_hash does not match the previous row'
           ELSE 'content does not match its hash'
         END
    INTO first_bad_id, problem
    FROM (SELECT a.*,
                 lag(a.hash) OVER w AS chain_prev,
                 lag(a.audit_id) OVER w AS prev_id
            FROM billing.audit_log a
          WINDOW w AS (ORDER BY a.audit_id)) c
   WHERE (c.prev_id IS NULL AND c.audit_id <> 1)
      OR (c.prev_id IS NOT NULL AND c.audit_id <> c.prev_id + 1)
      OR c.prev_hash <> coalesce(c.chain_prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
      OR c.hash <> billing.audit_hash(c.prev_hash, c.audit_id, c.occurred_at, c.actor_role, c.actor_sub,
                                      c.actor_tenant, c.tenant_id, c.action, c.details)
   ORDER BY c.audit_id
   LIMIT 1;

  IF first_bad_id IS NULL THEN
    SELECT * INTO v_head FROM billing.audit_head;
    SELECT * INTO v_last FROM billing.audit_log ORDER BY audit_id DESC LIMIT 1;
    IF v_head.last_id <> coalesce(v_last.audit_id, 0)
       OR v_head.last_hash <> coalesce(v_last.hash, v_head.last_hash) THEN
      first_bad_id := coalesce(v_last.audit_id, 0) + 1;
      problem := 'the newest rows are missing (the chain head is at ' || v_head.last_id || ')';
    END IF;
  END IF;
  ok := first_bad_id IS NULL;
END
$$;
COMMENT ON FUNCTION billing.verify_audit_chain() IS
  'Walk the audit chain; report the first row whose link or hash does not match, or that newest rows are missing.';
-- Stripe webhook intake: verify, store, acknowledge; the worker applies.

CREATE FUNCTION billing.verify_stripe_signature(payload text, header text, secrets text DEFAULT NULL,
                                                tolerance_s integer DEFAULT NULL, at timestamptz DEFAULT NULL)
  RETURNS text
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_verify_stripe_signature_fn';
COMMENT ON FUNCTION billing.verify_stripe_signature(text, text, text, integer, timestamptz) IS
  'Check a Stripe-Signature header against the raw body: ok, or no_header, no_secret, malformed, no_v1, mismatch, stale. Defaults: the configured webhook secret(s), qes_billing.webhook_tolerance, the real clock.';

CREATE TABLE billing.webhook_rejections (
  rejection_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  rejected_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
  reason          text NOT NULL,
  stripe_event_id text,
  event_type      text
);
COMMENT ON TABLE billing.webhook_rejections IS
  'Webhook deliveries refused at intake (bad or missing signature, stale, wrong mode, not an event): an attack or a wrong secret shows here.';
CREATE INDEX webhook_rejections_recent ON billing.webhook_rejections (rejected_at);

-- A refused delivery: counted, audited, answered with its HTTP status and
-- reason (called by api.stripe_webhook, src/webhook_intake.c).
CREATE FUNCTION billing.webhook_reject(p_reason text, p_event_id text, p_event_type text) RETURNS json
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  INSERT INTO billing.webhook_rejections (reason, stripe_event_id, event_type)
    VALUES (p_reason, left(p_event_id, 255), left(p_event_type, 255));
  PERFORM billing.audit('webhook.rejected', NULL,
                        jsonb_build_object('reason', p_reason, 'event_id', p_event_id, 'event_type', p_event_type));
  -- no secret is our configuration, not the sender: 500, so that Stripe retries
  PERFORM set_config('response.status', CASE WHEN p_reason = 'no_secret' THEN '500' ELSE '400' END, true);
  RETURN json_build_object('error', CASE p_reason
    WHEN 'no_header'    THEN 'missing Stripe-Signature header'
    WHEN 'malformed'    THEN 'unparseable Stripe-Signature header'
    WHEN 'no_v1'        THEN 'no v1 signature in the Stripe-Signature header'
    WHEN 'mismatch'     THEN 'the signature does not match the payload'
    WHEN 'stale'        THEN 'the signature timestamp is outside the tolerance'
    WHEN 'no_secret'    THEN 'the webhook signing secret is not configured'
    WHEN 'not_an_event' THEN 'the payload is not a Stripe event'
    WHEN 'wrong_mode'   THEN CASE WHEN billing.stripe_mode() = 'live' THEN 'a test-mode event was sent to a live-mode endpoint'
                              ELSE 'a live-mode event was sent to a test-mode endpoint' END
    END, 'reason', p_reason);
END
$$;
COMMENT ON FUNCTION billing.webhook_reject(text, text, text) IS
  'Record and audit a refused webhook delivery; sets response.status (400, or 500 when no secret is configured) and returns the error body.';

CREATE FUNCTION api.stripe_webhook(json) RETURNS json
  LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
  AS 'MODULE_PATHNAME', 'qes_stripe_webhook_fn';
COMMENT ON FUNCTION api.stripe_webhook(json) IS
  'Stripe webhook endpoint (POST /rpc/stripe_webhook, the raw event as the body). Verifies the Stripe-Signature header and the mode, stores a new event in the inbox for the worker and answers 200 at once; a repeated event id answers 200 and stores nothing. Refusals answer 400 with the reason, and are counted and audited.';
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
       (SELECT count(*) FROM billing.webhook_rejections WHERE rejected_at > now() - interval '1 hour') AS rejected_last_hour;
COMMENT ON VIEW billing.webhook_metrics IS
  'Webhook processing: latency received -> applied (p50, p95, p99 over the last hour), throughput, retries, parked and rejected deliveries.';
-- The outbox protocol between SQL and the worker's HTTP client (src/outbox.c).
--
--   billing.outbox_enqueue()  backends queue a request in their transaction
--   billing.outbox_claim()    the worker claims due rows and COMMITs, then sends
--   billing.outbox_record()   the worker records one answer in a new transaction:
--                             success is applied to local state right there;
--                             a retryable failure goes back to the queue with
--                             backoff; anything else is a final failure
--
-- Retry policy (docs/architecture.md, rule 4): network errors, timeouts, 409, 429 and
-- 5xx are retried, unless Stripe-Should-Retry says otherwise (it overrides
-- the default either way); Retry-After is a lower bound on the delay; the
-- delay doubles per attempt from qes_billing.retry_base_delay up to
-- qes_billing.retry_max_delay, with jitter (50-100 % of it).  After
-- qes_billing.max_attempts the request fails with its last error.  Requests
-- that wait for another (after_request) fail with it.

CREATE TABLE billing.stripe_secrets (
  mode       text NOT NULL CHECK (mode IN ('test', 'live')),
  kind       text NOT NULL CHECK (kind IN ('webhook')),
  endpoint   text NOT NULL,
  secret     text NOT NULL CHECK (secret ~ '^whsec_'),
  created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (mode, kind, endpoint)
);
COMMENT ON TABLE billing.stripe_secrets IS
  'Secrets learnt from Stripe (the webhook endpoint''s signing secret, returned once at creation). Superusers only: nothing is granted on it.';

ALTER TABLE billing.subscriptions
  ADD COLUMN stripe_item_id text,
  ADD COLUMN pending_change jsonb,
  ADD COLUMN last_error jsonb;

CREATE FUNCTION billing.stripe_form(params jsonb) RETURNS text
  LANGUAGE c IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'qes_stripe_form_fn';
COMMENT ON FUNCTION billing.stripe_form(jsonb) IS
  'Stripe''s form encoding of request parameters (what the worker sends for a queued request).';

CREATE FUNCTION billing.outbox_enqueue(p_tenant text, p_kind text, p_method text, p_path text,
                                       p_params jsonb DEFAULT '{}', p_subject jsonb DEFAULT '{}',
                                       p_after bigint DEFAULT NULL, p_inherit text DEFAULT NULL,
                                       p_run_id text DEFAULT NULL)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_id    bigint;
  v_after billing.stripe_requests;
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
  END IF;
  INSERT INTO billing.stripe_requests (tenant_id, kind, method, path, params, subject, after_request, inherit,
                                       run_id, state)
  VALUES (p_tenant, p_kind, p_method, p_path, p_params, p_subject, p_after, p_inherit, p_run_id,
          CASE WHEN p_after IS NULL THEN 'pending' ELSE 'waiting' END)
  RETURNING request_id INTO v_id;
  IF v_after.state = 'succeeded' THEN
    PERFORM billing.outbox_release_waiting(v_after);   -- done already: due at once
  END IF;
  RETURN v_id;
END
$$;
COMMENT ON FUNCTION billing.outbox_enqueue(text, text, text, text, jsonb, jsonb, bigint, text, text) IS
  'Queue a Stripe request in the caller''s transaction; the worker sends it after COMMIT. With p_after it waits for that request and, with p_inherit, receives its response id as that parameter.';

-- Queue a request unless the same one (tenant, kind, path) is still
-- queued or in flight; returns the request either way.
CREATE FUNCTION billing.outbox_enqueue_once(p_tenant text, p_kind text, p_method text, p_path text,
                                            p_params jsonb DEFAULT '{}')
  RETURNS bigint
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(
    (SELECT r.request_id FROM billing.stripe_requests r
      WHERE r.tenant_id = p_tenant AND r.kind = p_kind AND r.path = p_path
        AND r.state IN ('waiting', 'pending', 'in_flight')
      ORDER BY r.request_id LIMIT 1),
    billing.outbox_enqueue(p_tenant, p_kind, p_method, p_path, p_params))
$$;
COMMENT ON FUNCTION billing.outbox_enqueue_once(text, text, text, text, jsonb) IS
  'Queue a request unless the same one (tenant, kind, path) is still queued or in flight; returns the request.';

-- Claim due requests for sending: the worker commits this before any byte
-- goes out.  Rows are taken with SKIP LOCKED, so a backend busy with a
-- row (replaying it, say) never blocks the worker.
CREATE FUNCTION billing.outbox_claim(p_limit integer)
  RETURNS TABLE (request_id bigint, attempt integer, method text, path text, params jsonb, idempotency_key text)
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
AS $$
  WITH due AS (
    SELECT r.request_id FROM billing.stripe_requests r
     WHERE r.state = 'pending' AND r.next_attempt_at <= now()
     ORDER BY r.next_attempt_at, r.request_id
     LIMIT p_limit
       FOR UPDATE SKIP LOCKED)
  UPDATE billing.stripe_requests r
     SET state = 'in_flight', attempts = r.attempts + 1, claimed_at = now(), updated_at = now()
    FROM due
   WHERE r.request_id = due.request_id
  RETURNING r.request_id, r.attempts, r.method, r.path, r.params, r.idempotency_key
$$;
COMMENT ON FUNCTION billing.outbox_claim(integer) IS
  'Run by the worker: mark up to p_limit due requests in flight and return them for sending.';

-- Seconds until the next request is due (NULL: none waits), so the
-- worker sleeps exactly as long as it may.
CREATE FUNCTION billing.outbox_next_due() RETURNS double precision
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT greatest(0, extract(epoch FROM min(r.next_attempt_at) - now()))::double precision
    FROM billing.stripe_requests r WHERE r.state = 'pending'
$$;
COMMENT ON FUNCTION billing.outbox_next_due() IS 'Seconds until the next outbox request is due; NULL when none is pending.';

-- A request in flight whose answer can no longer come (the worker lost it:
-- an error while recording, a restart without a crash) goes back to the
-- queue after twice the request timeout.
CREATE FUNCTION billing.outbox_reclaim_stale(p_timeout interval) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'pending', claimed_at = NULL, next_attempt_at = now(), updated_at = now()
   WHERE state = 'in_flight' AND claimed_at < now() - 2 * p_timeout;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n > 0 THEN
    PERFORM billing.audit('worker.reclaimed', NULL, jsonb_build_object('stripe_requests', v_n, 'stale', true));
  END IF;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.outbox_reclaim_stale(interval) IS
  'Put requests in flight for longer than twice the request timeout back in the queue (their answer was lost).';

-- What an unsuccessful answer is: a category, whether to retry, and
-- Stripe's error fields.
CREATE FUNCTION billing.outbox_classify(p_http_status integer, p_body jsonb, p_should_retry text,
                                        p_transport_error text)
  RETURNS jsonb
  LANGUAGE sql IMMUTABLE
AS $$
  SELECT jsonb_strip_nulls(jsonb_build_object(
    'category', c.category,
    'retryable', CASE lower(p_should_retry) WHEN 'true' THEN true WHEN 'false' THEN false
                 ELSE c.category IN ('network', 'conflict', 'rate_limited', 'server') END,
    'http_status', p_http_status,
    'type', p_body -> 'error' ->> 'type',
    'code', p_body -> 'error' ->> 'code',
    'decline_code', p_body -> 'error' ->> 'decline_code',
    'param', p_body -> 'error' ->> 'param',
    'message', coalesce(p_transport_error, p_body -> 'error' ->> 'message',
                        'HTTP ' || p_http_status || ' from Stripe')))
    FROM (SELECT CASE
                   WHEN p_transport_error IS NOT NULL OR p_http_status IS NULL THEN 'network'
                   WHEN p_http_status = 409 THEN 'conflict'
                   WHEN p_http_status = 429 THEN 'rate_limited'
                   WHEN p_http_status >= 500 THEN 'server'
                   WHEN p_http_status = 402 OR p_body -> 'error' ->> 'type' = 'card_error' THEN 'card'
                   WHEN p_http_status = 401 THEN 'authentication'
                   WHEN p_http_status = 403 THEN 'permission'
                   WHEN p_http_status = 404 THEN 'not_found'
                   ELSE 'invalid_request'
                 END AS category) c
$$;
COMMENT ON FUNCTION billing.outbox_classify(integer, jsonb, text, text) IS
  'Classify an unsuccessful Stripe answer: network, conflict (409), rate_limited (429) and server (5xx) are retried; card, authentication, permission, not_found and invalid_request are business failures. Stripe-Should-Retry overrides.';

-- The delay before attempt n+1.
CREATE FUNCTION billing.outbox_backoff(p_attempts integer, p_retry_after text DEFAULT NULL) RETURNS interval
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_base  double precision := extract(epoch FROM current_setting('qes_billing.retry_base_delay')::interval);
  v_cap   double precision := extract(epoch FROM current_setting('qes_billing.retry_max_delay')::interval);
  v_delay double precision;
BEGIN
  v_delay := least(v_cap, v_base * 2 ^ least(greatest(p_attempts - 1, 0), 30)) * (0.5 + random() / 2);
  IF p_retry_after ~ '^\s*[0-9]{1,6}\s*$' THEN
    v_delay := greatest(v_delay, btrim(p_retry_after)::double precision);
  END IF;
  RETURN make_interval(secs => v_delay);
END
$$;
COMMENT ON FUNCTION billing.outbox_backoff(integer, text) IS
  'Exponential backoff with jitter after the given number of attempts; Retry-After (seconds) is a lower bound.';

-- A 404 is the answer, not a failure, for the lookups setup makes.
CREATE FUNCTION billing.outbox_accepts(p_kind text, p_http_status integer) RETURNS boolean
  LANGUAGE sql IMMUTABLE
RETURN p_http_status BETWEEN 200 AND 299 OR (p_http_status = 404 AND p_kind LIKE '%.lookup');

CREATE FUNCTION billing.outbox_record(p_request_id bigint, p_attempt integer, p_http_status integer,
                                      p_body text, p_should_retry text DEFAULT NULL,
                                      p_retry_after text DEFAULT NULL, p_transport_error text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  r       billing.stripe_requests;
  v_body  jsonb;
  v_err   jsonb;
  v_msg   text;
  v_max   integer := current_setting('qes_billing.max_attempts')::integer;
BEGIN
  SELECT * INTO r FROM billing.stripe_requests WHERE request_id = p_request_id FOR UPDATE;
  IF NOT FOUND OR r.state <> 'in_flight' OR r.attempts <> p_attempt THEN
    RETURN NULL;   -- reclaimed meanwhile: a later attempt owns the row
  END IF;
  BEGIN
    v_body := p_body::jsonb;
  EXCEPTION WHEN OTHERS THEN
    v_body := jsonb_build_object('unparsed_body', left(p_body, 2000));
  END;

  IF p_transport_error IS NULL AND billing.outbox_accepts(r.kind, p_http_status) THEN
    BEGIN
      UPDATE billing.stripe_requests
         SET state = 'succeeded', http_status = p_http_status, response = v_body, error = NULL, updated_at = now()
       WHERE request_id = r.request_id
       RETURNING * INTO r;
      PERFORM billing.outbox_apply(r);
      PERFORM billing.outbox_release_waiting(r);
      RETURN 'succeeded';
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

  IF (v_err ->> 'retryable')::boolean AND r.attempts < v_max THEN
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
COMMENT ON FUNCTION billing.outbox_record(bigint, integer, integer, text, text, text, text) IS
  'Run by the worker after an answer (or a transport error): succeeded and applied, back to pending with backoff, or failed. Returns the new state; NULL when the row was reclaimed meanwhile.';

-- A final failure, and everything that waited for it.
CREATE FUNCTION billing.outbox_fail(p_request_id bigint, p_http_status integer, p_body jsonb, p_err jsonb)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  r billing.stripe_requests;
  w bigint;
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'failed', http_status = p_http_status, response = p_body,
         error = p_err || jsonb_build_object('attempts', attempts), claimed_at = NULL, updated_at = now()
   WHERE request_id = p_request_id
   RETURNING * INTO r;
  PERFORM billing.outbox_apply_failure(r);
  PERFORM billing.audit('stripe.request_failed', r.tenant_id,
                        jsonb_build_object('request_id', r.request_id, 'kind', r.kind, 'error', r.error));
  FOR w IN SELECT c.request_id FROM billing.stripe_requests c
            WHERE c.after_request = p_request_id AND c.state = 'waiting' LOOP
    PERFORM billing.outbox_fail(w, NULL, NULL,
                                jsonb_build_object('category', 'dependency', 'retryable', false,
                                                   'message', format('request %s (%s) failed: %s', r.request_id,
                                                                     r.kind, r.error ->> 'message')));
  END LOOP;
END
$$;
COMMENT ON FUNCTION billing.outbox_fail(bigint, integer, jsonb, jsonb) IS
  'Mark a request failed for good, undo what its caller started, audit it, and fail the requests that waited for it.';

CREATE FUNCTION billing.outbox_release_waiting(r billing.stripe_requests) RETURNS void
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
AS $$
  UPDATE billing.stripe_requests c
     SET state = 'pending', next_attempt_at = now(), updated_at = now(),
         params = CASE WHEN c.inherit IS NULL THEN c.params
                       ELSE c.params || jsonb_build_object(c.inherit, r.response ->> 'id') END
   WHERE c.after_request = r.request_id AND c.state = 'waiting'
$$;

-- The Stripe time a response speaks for: when we sent the request.  A
-- webhook event created later (a later state) still wins; one created
-- before does not.
CREATE FUNCTION billing.outbox_state_at(r billing.stripe_requests) RETURNS timestamptz
  LANGUAGE sql STABLE
RETURN date_trunc('second', coalesce(r.claimed_at, r.updated_at));

-- Success: what the answer means for local state.
CREATE FUNCTION billing.outbox_apply(r billing.stripe_requests) RETURNS void
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
  WHEN r.kind IN ('subscription.create', 'subscription.update', 'subscription.refresh') THEN
    IF v_sub IS NOT NULL THEN
      UPDATE billing.subscriptions SET stripe_subscription_id = o ->> 'id'
       WHERE tenant_id = r.tenant_id AND subscription_id = v_sub AND stripe_subscription_id IS NULL;
    END IF;
    PERFORM billing.apply_subscription(r.tenant_id, o, billing.outbox_state_at(r), o ->> 'status' = 'canceled');
    UPDATE billing.subscriptions s
       SET stripe_item_id = coalesce(o -> 'items' -> 'data' -> 0 ->> 'id', s.stripe_item_id),
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
                                               'price', o -> 'items' -> 'data' -> 0 -> 'price' ->> 'id',
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
  ELSE
    NULL;   -- a request whose answer changes nothing local (it is kept on the row)
  END CASE;
END
$$;
COMMENT ON FUNCTION billing.outbox_apply(billing.stripe_requests) IS
  'Apply a successful Stripe answer to local state, in the transaction that records it.';

-- Final failure: undo what the caller started, and say why where the tenant sees it.
CREATE FUNCTION billing.outbox_apply_failure(r billing.stripe_requests) RETURNS void
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
  ELSE
    NULL;
  END CASE;
END
$$;
COMMENT ON FUNCTION billing.outbox_apply_failure(billing.stripe_requests) IS
  'Undo what a request''s caller started when the request fails for good (limits never change on a failure).';

-- An operator may send a failed request again (same Idempotency-Key).
CREATE FUNCTION billing.retry_request(p_request_id bigint) RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
BEGIN
  UPDATE billing.stripe_requests SET state = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
   WHERE request_id = p_request_id AND state = 'failed';
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no failed outbox request %', p_request_id
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'List them with: SELECT request_id, kind, error FROM billing.stripe_requests WHERE state = ''failed''.';
  END IF;
  PERFORM billing.audit('stripe.request_retried', NULL, jsonb_build_object('request_id', p_request_id));
END
$$;
COMMENT ON FUNCTION billing.retry_request(bigint) IS
  'Send a failed outbox request again with its original Idempotency-Key. Audited.';

CREATE VIEW billing.outbox_metrics AS
SELECT (SELECT count(*) FROM billing.stripe_requests WHERE state IN ('pending', 'waiting')) AS pending,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'in_flight') AS in_flight,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'pending' AND attempts > 0) AS retrying,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'succeeded' AND updated_at > now() - interval '1 hour') AS succeeded_last_hour,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'failed' AND updated_at > now() - interval '1 hour') AS failed_last_hour,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'failed' AND error ->> 'category' = 'card'
           AND updated_at > now() - interval '1 hour') AS card_declines_last_hour;
COMMENT ON VIEW billing.outbox_metrics IS
  'Stripe requests: queued, in flight, retrying, succeeded and failed in the last hour (card declines apart).';
-- Setup of the Stripe account through the outbox: the products and prices
-- of the paid plans, and the webhook endpoint.  The qes_billing_setup
-- command (src/qes_billing_setup) calls billing.setup_*() and waits for the
-- run's requests.  Everything is found again before it is created (stable
-- product ids qes_<plan>, price lookup_keys, the endpoint's URL), so a
-- second run creates nothing.

CREATE FUNCTION billing.webhook_event_types() RETURNS text[]
  LANGUAGE sql IMMUTABLE
RETURN ARRAY['customer.created', 'customer.updated', 'customer.deleted',
             'customer.subscription.created', 'customer.subscription.updated',
             'customer.subscription.deleted', 'customer.subscription.trial_will_end',
             'invoice.created', 'invoice.finalized', 'invoice.paid', 'invoice.payment_failed',
             'payment_intent.succeeded', 'payment_intent.payment_failed',
             'charge.succeeded', 'charge.failed', 'charge.dispute.created'];
COMMENT ON FUNCTION billing.webhook_event_types() IS 'The 16 Stripe events the webhook endpoint subscribes to (all handled).';

CREATE FUNCTION billing.webhook_endpoint_url() RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
RETURN rtrim(billing.base_url(), '/') || '/api/v1/billing/webhooks/stripe';

CREATE FUNCTION billing.require_secret_key() RETURNS void
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_problem text := billing.stripe_key_problem('secret');
BEGIN
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'Stripe cannot be called: %', v_problem
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Set the secret key of the ' || billing.stripe_mode() || ' mode in the server''s environment (STRIPE_'
                   || upper(billing.stripe_mode()) || '_SECRET_KEY) or in qes_billing.stripe_'
                   || billing.stripe_mode() || '_secret_key.';
  END IF;
END
$$;
COMMENT ON FUNCTION billing.require_secret_key() IS 'Raise an error naming the problem unless the secret key of the current mode is usable.';

-- --test-config: is the key accepted?  (Local checks are in setup_config.)
CREATE FUNCTION billing.setup_check(p_run text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.require_secret_key();
  PERFORM billing.audit('setup.requested', NULL, jsonb_build_object('run', p_run, 'step', 'test-config'));
  RETURN billing.outbox_enqueue(NULL, 'setup.check', 'GET', '/v1/balance', p_run_id => p_run);
END
$$;
COMMENT ON FUNCTION billing.setup_check(text) IS 'Queue a request that proves Stripe is reachable and accepts the secret key.';

CREATE FUNCTION billing.setup_config() RETURNS TABLE (item text, value text, ok boolean)
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  VALUES ('environment', billing.environment(), true),
         ('stripe mode', billing.stripe_mode(), true),
         ('secret key', coalesce(billing.stripe_key_problem('secret'), 'present, ' || billing.stripe_mode() || ' mode'),
          billing.stripe_key_problem('secret') IS NULL),
         ('publishable key', coalesce(billing.stripe_key_problem('publishable'), 'present, ' || billing.stripe_mode() || ' mode'),
          billing.stripe_key_problem('publishable') IS NULL),
         ('webhook secret', coalesce(CASE WHEN billing.stripe_key_problem('webhook') IS NULL THEN 'present (setting)' END,
                                     CASE WHEN EXISTS (SELECT 1 FROM billing.stripe_secrets s
                                                        WHERE s.mode = billing.stripe_mode() AND s.kind = 'webhook')
                                          THEN 'present (stored by --setup-webhook)' END,
                                     'missing: run --setup-webhook or set the ' || upper(billing.stripe_mode()) || ' webhook secret'),
          true),
         ('base url', billing.base_url(), billing.base_url() ~ '^https?://'),
         ('stripe api', current_setting('qes_billing.stripe_api_base'), true),
         ('stripe api version', current_setting('qes_billing.stripe_api_version'),
          current_setting('qes_billing.stripe_api_version') ~ '^\d{4}-\d{2}-\d{2}'),
         ('worker', CASE WHEN (SELECT alive FROM billing.worker_status) THEN 'alive' ELSE 'not running' END,
          coalesce((SELECT alive FROM billing.worker_status), false))
$$;
COMMENT ON FUNCTION billing.setup_config() IS 'What qes_billing_setup --test-config checks locally; never shows a key.';

-- --setup-products
CREATE FUNCTION billing.setup_products(p_run text) RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  p billing.plans;
  n integer := 0;
BEGIN
  PERFORM billing.require_secret_key();
  PERFORM billing.audit('setup.requested', NULL, jsonb_build_object('run', p_run, 'step', 'products'));
  FOR p IN SELECT * FROM billing.plans pl
            WHERE pl.active AND EXISTS (SELECT 1 FROM billing.prices pr
                                         WHERE pr.plan_id = pl.plan_id AND pr.active AND pr.unit_amount > 0)
            ORDER BY pl.tier LOOP
    PERFORM billing.outbox_enqueue(NULL, 'setup.product.lookup', 'GET', '/v1/products/qes_' || p.plan_id,
                                   p_subject => jsonb_build_object('plan', p.plan_id), p_run_id => p_run);
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;
COMMENT ON FUNCTION billing.setup_products(text) IS
  'Queue the lookups that find or create a Stripe product (id qes_<plan>) and its prices (by lookup_key) for each paid plan.';

-- --setup-webhook
CREATE FUNCTION billing.setup_webhook(p_run text) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.require_secret_key();
  IF billing.base_url() !~ '^https?://[^/]+' THEN
    RAISE EXCEPTION 'QES_BASE_URL is not an http(s) URL: %', billing.base_url()
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Set QES_BASE_URL (or qes_billing.base_url) to the public URL of the platform.';
  END IF;
  PERFORM billing.audit('setup.requested', NULL,
                        jsonb_build_object('run', p_run, 'step', 'webhook', 'url', billing.webhook_endpoint_url()));
  RETURN billing.outbox_enqueue(NULL, 'setup.webhook.list', 'GET', '/v1/webhook_endpoints',
                                jsonb_build_object('limit', 100), p_run_id => p_run);
END
$$;
COMMENT ON FUNCTION billing.setup_webhook(text) IS
  'Queue the lookup that finds, updates or creates the webhook endpoint at QES_BASE_URL/api/v1/billing/webhooks/stripe.';

-- The answers of setup requests: each finds what exists and queues only what is missing.
CREATE FUNCTION billing.setup_apply(r billing.stripe_requests) RETURNS void
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
         AND coalesce((v_found ->> 'active')::boolean, true) THEN
        UPDATE billing.prices SET stripe_price_id = v_found ->> 'id' WHERE price_key = pr.price_key;
      ELSE
        -- missing, or the catalog's amount changed: a new price takes the lookup key over
        PERFORM billing.outbox_enqueue(NULL, 'setup.price.create', 'POST', '/v1/prices',
                  jsonb_build_object('product', coalesce(pl.stripe_product_id, 'qes_' || v_plan),
                                     'unit_amount', pr.unit_amount, 'currency', pr.currency,
                                     'recurring', jsonb_build_object('interval', pr.billing_interval),
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
     WHERE x ->> 'url' = billing.webhook_endpoint_url() LIMIT 1;
    IF v_found IS NOT NULL THEN
      IF v_found ->> 'status' IS DISTINCT FROM 'enabled'
         OR NOT (SELECT array_agg(e ORDER BY e) FROM jsonb_array_elements_text(v_found -> 'enabled_events') e)
                IS NOT DISTINCT FROM (SELECT array_agg(e ORDER BY e) FROM unnest(billing.webhook_event_types()) e) THEN
        PERFORM billing.outbox_enqueue(NULL, 'setup.webhook.update', 'POST', '/v1/webhook_endpoints/' || (v_found ->> 'id'),
                  jsonb_build_object('enabled_events', to_jsonb(billing.webhook_event_types()), 'disabled', false),
                  jsonb_build_object('endpoint', v_found ->> 'id'), p_run_id => r.run_id);
      END IF;
    ELSIF (o ->> 'has_more')::boolean THEN
      PERFORM billing.outbox_enqueue(NULL, 'setup.webhook.list', 'GET', '/v1/webhook_endpoints',
                jsonb_build_object('limit', 100, 'starting_after', o -> 'data' -> -1 ->> 'id'), p_run_id => r.run_id);
    ELSE
      PERFORM billing.outbox_enqueue(NULL, 'setup.webhook.create', 'POST', '/v1/webhook_endpoints',
                jsonb_build_object('url', billing.webhook_endpoint_url(),
                                   'enabled_events', to_jsonb(billing.webhook_event_types()),
                                   'api_version', current_setting('qes_billing.stripe_api_version'),
                                   'description', 'qes_billing (' || billing.environment() || ')',
                                   'metadata', jsonb_build_object('qes_environment', billing.environment())),
                p_run_id => r.run_id);
    END IF;
  WHEN 'setup.webhook.create' THEN
    IF o ->> 'secret' ~ '^whsec_' THEN
      INSERT INTO billing.stripe_secrets (mode, kind, endpoint, secret)
      VALUES (v_mode, 'webhook', o ->> 'id', o ->> 'secret')
      ON CONFLICT (mode, kind, endpoint) DO UPDATE SET secret = EXCLUDED.secret, created_at = now();
    END IF;
    PERFORM billing.audit('setup.webhook_created', NULL, jsonb_build_object('endpoint', o ->> 'id', 'url', o ->> 'url'));
  ELSE
    NULL;   -- setup.check, setup.webhook.update: the answer is the result
  END CASE;
END
$$;
COMMENT ON FUNCTION billing.setup_apply(billing.stripe_requests) IS
  'Apply the answer of a setup request: record what exists, queue only what is missing.';

-- Waiting for a run: true when none of its requests is still queued.
CREATE FUNCTION billing.setup_wait(p_run text, p_timeout_s double precision DEFAULT 60) RETURNS boolean
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_deadline timestamptz := clock_timestamp() + make_interval(secs => p_timeout_s);
BEGIN
  LOOP
    IF NOT EXISTS (SELECT 1 FROM billing.stripe_requests
                    WHERE run_id = p_run AND state IN ('waiting', 'pending', 'in_flight')) THEN
      RETURN true;
    END IF;
    IF clock_timestamp() > v_deadline THEN
      RETURN false;
    END IF;
    PERFORM pg_sleep(0.05);
  END LOOP;
END
$$;
COMMENT ON FUNCTION billing.setup_wait(text, double precision) IS
  'Wait until every request of a setup run has succeeded or failed (each statement sees the worker''s commits). False on timeout.';

CREATE FUNCTION billing.setup_report(p_run text)
  RETURNS TABLE (request_id bigint, kind text, state text, result text)
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT r.request_id, r.kind, r.state,
         CASE WHEN r.state = 'failed' THEN coalesce(r.error ->> 'category', '?') || ': ' || coalesce(r.error ->> 'message', '')
              WHEN r.state <> 'succeeded' THEN 'still ' || r.state
                   || coalesce(' (last error: ' || (r.error ->> 'message') || ')', '')
              ELSE CASE r.kind
                WHEN 'setup.check' THEN 'Stripe answered and accepted the key (' || coalesce(r.response ->> 'object', '?') || ')'
                WHEN 'setup.product.lookup' THEN CASE WHEN r.http_status = 404 THEN 'no product ' || (r.subject ->> 'plan') || ' yet'
                                                      ELSE 'found product ' || (r.response ->> 'id') END
                WHEN 'setup.product.create' THEN 'created product ' || (r.response ->> 'id')
                WHEN 'setup.prices.list' THEN 'found ' || jsonb_array_length(r.response -> 'data') || ' price(s) of ' || (r.subject ->> 'plan')
                WHEN 'setup.price.create' THEN 'created price ' || (r.response ->> 'id') || ' (' || (r.subject ->> 'price_key') || ')'
                WHEN 'setup.webhook.list' THEN 'found ' || jsonb_array_length(r.response -> 'data') || ' webhook endpoint(s)'
                WHEN 'setup.webhook.create' THEN 'created webhook endpoint ' || (r.response ->> 'id') || ' for ' || (r.response ->> 'url')
                                                 || CASE WHEN r.response ->> 'secret' IS NOT NULL THEN '; signing secret stored' ELSE '' END
                WHEN 'setup.webhook.update' THEN 'updated webhook endpoint ' || (r.response ->> 'id')
                ELSE 'ok' END
         END
    FROM billing.stripe_requests r
   WHERE r.run_id = p_run
   ORDER BY r.request_id
$$;
COMMENT ON FUNCTION billing.setup_report(text) IS 'What each request of a setup run found, created or why it failed.';

-- The webhook secrets to verify with: the configured setting(s) when set,
-- else what --setup-webhook stored for this mode.
CREATE FUNCTION billing.stored_webhook_secrets() RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT string_agg(s.secret, ',' ORDER BY s.created_at DESC)
    FROM billing.stripe_secrets s
   WHERE s.mode = billing.stripe_mode() AND s.kind = 'webhook'
$$;
COMMENT ON FUNCTION billing.stored_webhook_secrets() IS
  'Webhook signing secrets stored by qes_billing_setup --setup-webhook for the current mode (superuser-only table).';
-- Schema api: what PostgREST exposes.  Every object has a COMMENT (it
-- becomes the OpenAPI description).

CREATE VIEW api.plans AS
SELECT p.plan_id,
       p.name,
       p.tier,
       p.description,
       p.features,
       (SELECT pr.unit_amount FROM billing.prices pr
         WHERE pr.plan_id = p.plan_id AND pr.billing_interval = 'month' AND pr.active AND pr.currency = 'usd') AS monthly_price,
       (SELECT pr.unit_amount FROM billing.prices pr
         WHERE pr.plan_id = p.plan_id AND pr.billing_interval = 'year' AND pr.active AND pr.currency = 'usd') AS yearly_price,
       'usd'::text AS currency,
       (SELECT jsonb_object_agg(l.metric, l.soft_limit) FROM billing.plan_limits l
         WHERE l.plan_id = p.plan_id) AS limits
  FROM billing.plans p
 WHERE p.active;
COMMENT ON VIEW api.plans IS
  'The plan catalog: prices in the smallest currency unit (cents) per month and per year, and per-period limits by metric (null = unlimited; storage in bytes).';

CREATE VIEW api.tenant WITH (security_invoker = true) AS
SELECT t.tenant_id,
       t.name,
       t.billing_email,
       t.stripe_customer_id IS NOT NULL AS has_stripe_customer,
       t.disputed,
       t.created_at
  FROM billing.tenants t;
COMMENT ON VIEW api.tenant IS 'The calling tenant (row-level security on the JWT''s tenant_id claim).';

CREATE VIEW api.usage WITH (security_invoker = true) AS
SELECT u.period_start, u.period_end, u.is_current, u.metric, u.used, u.usage_limit, u.percent, u.status
  FROM billing.my_usage() u;
COMMENT ON VIEW api.usage IS
  'The calling tenant''s usage: the current billing period per metric (used, usage_limit (null = unlimited), percent, status: ok, warning, over_soft_limit, blocked) and the totals of earlier periods (is_current = false).';

CREATE VIEW api.invoices WITH (security_invoker = true) AS
SELECT i.stripe_invoice_id AS invoice_id, i.number, i.status, i.amount_due, i.amount_paid, i.amount_remaining,
       i.currency, i.period_start, i.period_end, i.hosted_invoice_url, i.invoice_pdf, i.stripe_created AS created
  FROM billing.invoices i
 ORDER BY i.stripe_created DESC, i.stripe_invoice_id DESC;
COMMENT ON VIEW api.invoices IS
  'The calling tenant''s invoices, mirrored from Stripe, newest first (amounts in the smallest currency unit). Page with limit and offset.';

CREATE FUNCTION api.config() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_base text := rtrim(billing.base_url(), '/');
BEGIN
  RETURN json_build_object(
    'environment', billing.environment(),
    'stripe_mode', billing.stripe_mode(),
    'publishable_key', billing.publishable_key(),
    'base_url', v_base,
    'webhook_url', v_base || '/api/v1/billing/webhooks/stripe',
    'stripe_api_version', current_setting('qes_billing.stripe_api_version'),
    'plans', (SELECT json_agg(p ORDER BY p.tier) FROM api.plans p));
END
$$;
COMMENT ON FUNCTION api.config() IS
  'Public billing configuration: environment, Stripe mode, publishable key, base and webhook URLs, plans. Never a secret.';

CREATE FUNCTION api.health() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  w billing.worker_status;
  v_problem text := billing.stripe_key_problem('secret');
  v_healthy boolean;
BEGIN
  SELECT * INTO w FROM billing.worker_status;
  v_healthy := coalesce(w.alive, false) AND v_problem IS NULL;
  IF NOT v_healthy THEN
    PERFORM set_config('response.status', '503', true);
  END IF;
  RETURN json_build_object(
    'status', CASE WHEN v_healthy THEN 'ok' ELSE 'unhealthy' END,
    'database', true,
    'worker', json_build_object(
      'alive', coalesce(w.alive, false),
      'heartbeat_age_seconds', round(extract(epoch FROM w.heartbeat_age)::numeric, 3),
      'last_error', w.last_error),
    'stripe', json_build_object(
      'configured', v_problem IS NULL,
      'mode', billing.stripe_mode(),
      'problem', v_problem),
    'outbox_backlog', w.outbox_pending + w.outbox_in_flight,
    'inbox_backlog', w.inbox_pending,
    'webhooks_parked', w.inbox_parked);
END
$$;
COMMENT ON FUNCTION api.health() IS
  'Health: database, worker heartbeat, Stripe configuration and queue backlogs. HTTP 503 when unhealthy, 200 otherwise.';
-- Subscriptions and one-time payments for the calling tenant (PostgREST:
-- POST /rpc/create_subscription, GET /subscription, POST
-- /rpc/update_subscription, POST /rpc/create_payment_intent, GET /payments).
-- Each call validates everything before it writes anything, queues its
-- Stripe requests in the caller's transaction (the worker sends them after
-- COMMIT) and writes one audit row.  Local plan and limits change only when
-- Stripe confirms (billing.outbox_apply, or the webhook).

-- The calling tenant, from the JWT, or an error.
CREATE FUNCTION billing.calling_tenant() RETURNS billing.tenants
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_id text := billing.jwt_tenant_id();
  t billing.tenants;
BEGIN
  IF v_id IS NULL THEN
    RAISE EXCEPTION 'no tenant in the request'
      USING ERRCODE = 'insufficient_privilege', HINT = 'Call with a JWT that carries a tenant_id claim.';
  END IF;
  SELECT * INTO t FROM billing.tenants WHERE tenant_id = v_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'tenant % is not registered for billing', v_id
      USING ERRCODE = 'insufficient_privilege', HINT = 'The platform registers tenants with billing.upsert_tenant().';
  END IF;
  RETURN t;
END
$$;

CREATE FUNCTION billing.current_subscription(p_tenant text) RETURNS billing.subscriptions
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT * FROM billing.subscriptions s
   WHERE s.tenant_id = p_tenant AND s.status NOT IN ('canceled', 'incomplete_expired')
   ORDER BY s.subscription_id DESC LIMIT 1
$$;

CREATE FUNCTION billing.check_plan_interval(p_plan text, p_interval text) RETURNS billing.prices
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  pr billing.prices;
BEGIN
  IF p_plan IS NULL OR NOT EXISTS (SELECT 1 FROM billing.plans WHERE plan_id = p_plan AND active) THEN
    RAISE EXCEPTION 'unknown plan: %', coalesce(quote_literal(p_plan), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Plans: ' || (SELECT string_agg(plan_id, ', ' ORDER BY tier) FROM billing.plans WHERE active) || '.';
  END IF;
  IF p_interval IS NULL OR p_interval NOT IN ('month', 'year') THEN
    RAISE EXCEPTION 'unknown billing interval: %', coalesce(quote_literal(p_interval), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'The interval is month or year.';
  END IF;
  SELECT * INTO pr FROM billing.prices
   WHERE plan_id = p_plan AND billing_interval = p_interval AND active AND currency = 'usd';
  IF NOT FOUND THEN
    RAISE EXCEPTION 'plan % has no % price', p_plan, p_interval USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF pr.unit_amount > 0 AND pr.stripe_price_id IS NULL THEN
    RAISE EXCEPTION 'plan % (%) is not set up in Stripe yet', p_plan, p_interval
      USING ERRCODE = 'invalid_parameter_value', HINT = 'An operator runs: qes_billing_setup --setup-products.';
  END IF;
  RETURN pr;
END
$$;

-- The tenant's Stripe customer, or the queued request that creates it.
CREATE FUNCTION billing.customer_request(t billing.tenants) RETURNS bigint
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
AS $$
  SELECT CASE WHEN t.stripe_customer_id IS NULL THEN
    billing.outbox_enqueue_once(t.tenant_id, 'customer.create', 'POST', '/v1/customers',
                                jsonb_build_object('name', t.name, 'email', t.billing_email,
                                                   'metadata', jsonb_build_object('tenant_id', t.tenant_id)))
  END
$$;

CREATE FUNCTION api.create_subscription(plan text, "interval" text DEFAULT 'month') RETURNS json
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
    PERFORM billing.audit('subscription.created', t.tenant_id,
                          jsonb_build_object('subscription_id', v_sub.subscription_id, 'plan', pr.plan_id,
                                             'interval', pr.billing_interval, 'local', true));
  ELSE
    -- the local Free subscription ends; the paid one waits for its first payment
    UPDATE billing.subscriptions SET status = 'canceled', updated_at = now()
     WHERE tenant_id = t.tenant_id AND subscription_id = cur.subscription_id;
    INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status)
    VALUES (t.tenant_id, pr.plan_id, pr.billing_interval, 'incomplete') RETURNING * INTO v_sub;
    v_cust := billing.customer_request(t);
    v_req := billing.outbox_enqueue(t.tenant_id, 'subscription.create', 'POST', '/v1/subscriptions',
               jsonb_build_object('items', jsonb_build_array(jsonb_build_object('price', pr.stripe_price_id)),
                                  'payment_behavior', 'default_incomplete',
                                  'payment_settings', jsonb_build_object('save_default_payment_method', 'on_subscription'),
                                  'expand', jsonb_build_array('latest_invoice.payment_intent'),
                                  'metadata', jsonb_build_object('tenant_id', t.tenant_id,
                                                                 'subscription_id', v_sub.subscription_id))
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
COMMENT ON FUNCTION api.create_subscription(text, text) IS
  'Subscribe the calling tenant to a plan (free, professional, enterprise), interval month or year. Free is local. A paid plan returns at once with status incomplete; GET /subscription shows the client_secret to confirm the first payment once Stripe has answered. Audited.';

CREATE FUNCTION api.update_subscription(plan text DEFAULT NULL, "interval" text DEFAULT NULL,
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
      'items', jsonb_build_array(jsonb_build_object('id', cur.stripe_item_id, 'price', pr.stripe_price_id)),
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
COMMENT ON FUNCTION api.update_subscription(text, text, boolean, text) IS
  'Change the calling tenant''s paid subscription: plan (up or down; free = cancel at period end), interval (month, year), cancel_at_period_end (true cancels at period end, false resumes), proration (create_prorations, always_invoice, none; default: always_invoice for upgrades, create_prorations otherwise). The plan and its limits change only when Stripe confirms. Audited.';

CREATE FUNCTION api.create_payment_intent(amount bigint, currency text DEFAULT 'usd', description text DEFAULT NULL)
  RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  t     billing.tenants := billing.calling_tenant();
  v_cur text := lower(currency);
  p     billing.payments;
  v_req bigint;
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
  v_req := billing.outbox_enqueue(t.tenant_id, 'payment_intent.create', 'POST', '/v1/payment_intents',
             jsonb_strip_nulls(jsonb_build_object(
               'amount', amount, 'currency', v_cur, 'customer', t.stripe_customer_id, 'description', description,
               'automatic_payment_methods', jsonb_build_object('enabled', true),
               'metadata', jsonb_build_object('tenant_id', t.tenant_id, 'payment_id', p.payment_id))),
             jsonb_build_object('payment_id', p.payment_id));
  PERFORM billing.audit('payment_intent.requested', t.tenant_id,
                        jsonb_build_object('payment_id', p.payment_id, 'amount', amount, 'currency', v_cur,
                                           'request_id', v_req));
  RETURN json_build_object('payment_id', p.payment_id, 'amount', p.amount, 'currency', p.currency, 'status', p.status);
END
$$;
COMMENT ON FUNCTION api.create_payment_intent(bigint, text, text) IS
  'A one-time payment by the calling tenant: amount in the smallest currency unit (50 to 99999999), currency (usd, eur, gbp, chf), description. Returns the payment id at once; GET /payments shows its client_secret when Stripe has answered. Audited.';

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

CREATE VIEW api.payments WITH (security_invoker = true) AS
SELECT p.payment_id, p.kind, p.amount, p.currency, p.description, p.status,
       CASE WHEN p.status NOT IN ('succeeded', 'canceled', 'failed') THEN p.client_secret END AS client_secret,
       p.failure_code, p.failure_message, p.stripe_payment_intent_id AS payment_intent_id, p.created_at, p.updated_at
  FROM billing.payments p
 ORDER BY p.created_at DESC, p.payment_id DESC;
COMMENT ON VIEW api.payments IS
  'The calling tenant''s payments (one-time and subscription charges), newest first; client_secret while a payment awaits confirmation.';
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

CREATE VIEW billing.payment_metrics AS
SELECT p.kind,
       count(*) AS payments,
       count(*) FILTER (WHERE p.status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE p.status = 'failed') AS failed,
       round(count(*) FILTER (WHERE p.status = 'succeeded')::numeric
             / nullif(count(*) FILTER (WHERE p.status IN ('succeeded', 'failed')), 0), 3) AS success_rate,
       coalesce(sum(p.amount) FILTER (WHERE p.status = 'succeeded'), 0) AS amount_collected,
       mode() WITHIN GROUP (ORDER BY p.failure_code) FILTER (WHERE p.status = 'failed') AS commonest_failure,
       (SELECT count(*) FROM billing.disputes d WHERE d.recorded_at > pg_catalog.now() - interval '30 days') AS disputes
  FROM billing.payments p
 WHERE p.created_at > pg_catalog.now() - interval '30 days'
 GROUP BY p.kind;
COMMENT ON VIEW billing.payment_metrics IS
  'Payments of the last 30 days by kind (one_time, subscription): succeeded, failed, success rate of those decided, amount collected (smallest unit, mixed currencies summed as is), the commonest failure code, and disputes recorded.';

CREATE VIEW billing.usage_patterns AS
SELECT u.metric,
       count(*) AS tenants,
       count(*) FILTER (WHERE u.used > 0) AS active_tenants,
       sum(u.used) AS used,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY u.used) AS used_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY u.used) AS used_p95,
       max(u.used) AS used_max,
       count(*) FILTER (WHERE u.status = 'warning') AS near_limit,
       count(*) FILTER (WHERE u.status IN ('over_soft_limit', 'blocked')) AS over_limit
  FROM billing.tenants t
 CROSS JOIN LATERAL billing.usage_current(t.tenant_id) u
 GROUP BY u.metric;
COMMENT ON VIEW billing.usage_patterns IS
  'Usage in each tenant''s current billing period, by metric: tenants, active tenants, total, per-tenant p50/p95/max, and how many are near (80 %) or over their limit (the upgrade candidates).';
-- Privileges and row-level security.  Runs last, over everything above.
--   qes_anon    anonymous PostgREST requests (and Stripe's webhooks)
--   qes_tenant  a tenant's users; the JWT carries tenant_id
--   qes_admin   operators
--   qes_app     the QES platform itself (registers tenants, records usage)
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

DO $rls$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['tenants', 'subscriptions', 'usage_events', 'invoices', 'payments',
                           'disputes', 'notifications'] LOOP
    EXECUTE format('ALTER TABLE billing.%I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant_own_rows ON billing.%I FOR SELECT TO qes_tenant
                      USING (tenant_id = billing.jwt_tenant_id())', t);
    EXECUTE format('CREATE POLICY staff_all_rows ON billing.%I TO qes_admin, qes_app
                      USING (true) WITH CHECK (true)', t);
    EXECUTE format('GRANT SELECT ON billing.%I TO qes_tenant, qes_admin', t);
    -- keep tenant data in pg_dump (extension tables are skipped otherwise)
    PERFORM pg_catalog.pg_extension_config_dump(format('billing.%I', t)::regclass, '');
  END LOOP;
END
$rls$;

SELECT pg_catalog.pg_extension_config_dump('billing.stripe_requests', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_rejections', '');

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

-- the platform
GRANT EXECUTE ON FUNCTION billing.upsert_tenant(text, text, text),
                          billing.record_usage(text, text, bigint, text, jsonb, timestamptz),
                          billing.record_usage_batch(text, jsonb),
                          billing.check_limit(text, text, bigint),
                          billing.usage_current(text),
                          billing.usage_report(text)
  TO qes_app, qes_admin;

-- operators
GRANT SELECT ON billing.worker_status, billing.audit_log, billing.stripe_requests,
                billing.webhook_events, billing.webhook_rejections, billing.webhook_metrics,
                billing.outbox_metrics, billing.subscription_health, billing.payment_metrics,
                billing.usage_patterns TO qes_admin;
GRANT EXECUTE ON FUNCTION billing.replay_webhook(text), billing.retry_request(bigint) TO qes_admin;
GRANT EXECUTE ON FUNCTION billing.worker_state(), billing.verify_audit_chain(), billing.usage_cache_stats(),
                          billing.audit_hash(bytea, bigint, timestamptz, text, text, text, text, text, jsonb),
                          billing.wake_worker()
  TO qes_admin;

-- Shared memory outlives DROP EXTENSION: forget what an earlier
-- incarnation cached, and let the worker find the new extension (and
-- reconcile its queues) as soon as CREATE EXTENSION commits.
SELECT billing.reset_caches();
SELECT billing.wake_worker();
