-- qes_billing 0.1 -> 0.2: ALTER EXTENSION qes_billing UPDATE.
--
-- Released with 0.2 and never edited afterwards (README.md, "Upgrading");
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
-- name C symbols only the 0.2 library has (README.md, "Upgrading").
--
--   1. what 0.2 drops, or creates anew because it cannot be changed in place
--   2. the 0.2 install script (sql/install/*.sql) where it differs from 0.1,
--      in its order
--   3. the data: the tables made again, facts 0.1 kept only in the inbox,
--      the seed rows, secrets 0.1 stored in clear
\echo Use "ALTER EXTENSION qes_billing UPDATE TO '0.2'" to load this file. \quit

-- ---- 1. what 0.2 no longer has, or creates again ------------------------------
DROP VIEW api.subscription;
DROP VIEW billing.subscription_health;
DROP VIEW billing.webhook_metrics;
DROP VIEW billing.worker_status;
DROP FUNCTION billing.apply_event(jsonb);
DROP FUNCTION billing.apply_invoice(text,jsonb,timestamp with time zone);
DROP FUNCTION billing.current_subscription(text);
DROP FUNCTION billing.refresh_subscription(text,text);
DROP FUNCTION billing.usage_cache_stats();
DROP FUNCTION billing.webhook_reject(text,text,text);
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

-- ---- 2. the 0.2 install script where it differs from 0.1, in its order ----------

-- Masking secrets before anything is stored or logged (DESIGN.md rule 13;
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
  PRIMARY KEY (tenant_id, subscription_id),
  CHECK (current_period_end IS NULL OR current_period_start IS NULL
         OR current_period_end > current_period_start)
);

COMMENT ON TABLE billing.subscriptions IS
  'Subscriptions mirrored from Stripe (Free is local only). stripe_state_at is the Stripe time of the newest state applied, so an older event never overwrites a newer one; grace_until is derived from Stripe''s times (billing.sync_dunning).';

CREATE UNIQUE INDEX subscriptions_one_current ON billing.subscriptions (tenant_id)
  WHERE status NOT IN ('canceled', 'incomplete_expired');

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

-- (upgrade) the new columns of billing.invoices; attempt_count becomes NOT
-- NULL DEFAULT 0 in section 3, once filled
ALTER TABLE billing.invoices
  ADD COLUMN stripe_subscription_id text,
  ADD COLUMN first_failed_at timestamptz,
  ADD COLUMN attempt_count integer,
  ADD COLUMN finalized_at timestamptz,
  ADD COLUMN paid_at timestamptz;

CREATE INDEX invoices_subscription ON billing.invoices (stripe_subscription_id) WHERE stripe_subscription_id IS NOT NULL;

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

DROP INDEX billing.stripe_requests_due;
-- in the order the worker claims requests (billing.outbox_claim), so a claim needs no sort
CREATE INDEX stripe_requests_due ON billing.stripe_requests (next_attempt_at, request_id) WHERE state = 'pending';

COMMENT ON FUNCTION billing.wake_worker_on_commit() IS
  'Trigger: wake the worker when the inserting (or updating) transaction commits (not before, not on rollback).';

CREATE OR REPLACE TRIGGER wake_worker AFTER INSERT OR UPDATE ON billing.stripe_requests
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();

CREATE OR REPLACE TRIGGER wake_worker AFTER INSERT OR UPDATE ON billing.webhook_events
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();

-- The worker's tick: apply due webhook events, then timers.  Returns the
-- number of events applied (the worker runs the next tick at once when it
-- was a full batch of p_events), the seconds until the next outbox request
-- is due (NULL: none waits), and the seconds until the tick has work again
-- (NULL: nothing is scheduled; the worker then runs no transaction until a
-- commit wakes it, DESIGN.md rule 14).
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
BEGIN
  applied := billing.process_inbox(p_events);
  -- outbox requests whose answer this worker lost
  PERFORM billing.outbox_reclaim_stale(v_timeout);
  -- cached usage counters of periods that ended more than a day ago
  PERFORM billing.usage_cache_sweep(billing.now() - interval '1 day');
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
  next_due_s := least(v_events, v_stale);
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
  v_at     timestamptz := clock_timestamp();
  v_role   text := billing.outer_role();
  v_claims jsonb := billing.jwt_claims();
  v_hash   bytea;
BEGIN
  IF p_action IS NULL OR p_action !~ '^[a-z_]+(\.[a-z_]+)+$' THEN
    RAISE EXCEPTION 'invalid audit action: %', coalesce(quote_literal(p_action), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Actions look like "subscription.created".';
  END IF;
  -- no audit row ever holds a secret (DESIGN.md rule 13)
  p_details := billing.redact(coalesce(p_details, '{}'));

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
-- (DESIGN.md rule 12; docs/architecture.md, "Mirroring Stripe"):
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
--   * an event that names what is not mirrored yet waits for it (state
--     'waiting', or 'ignored' for a customer that is not known to be ours)
--     and is applied again as soon as it arrives (billing.inbox_requeue).

ALTER TABLE billing.webhook_events ADD COLUMN waits_for text[];

COMMENT ON COLUMN billing.webhook_events.waits_for IS
  'The Stripe ids an event waits for (a waiting or ignored event is applied again when one of them is mirrored).';

ALTER TABLE billing.webhook_events DROP CONSTRAINT webhook_events_state_check;

ALTER TABLE billing.webhook_events ADD CONSTRAINT webhook_events_state_check
  CHECK (state IN ('received', 'processing', 'applied', 'ignored', 'waiting', 'needs_review'));

-- The same, as rows to look up by Stripe id (global like the inbox: an event
-- may not be known to belong to any tenant yet).
CREATE TABLE billing.webhook_waits (
  stripe_id       text NOT NULL,
  stripe_event_id text NOT NULL REFERENCES billing.webhook_events ON DELETE CASCADE,
  PRIMARY KEY (stripe_id, stripe_event_id)
);

COMMENT ON TABLE billing.webhook_waits IS
  'Which waiting or ignored inbox event waits for which Stripe id (applied again when that object is mirrored).';

CREATE INDEX webhook_waits_event ON billing.webhook_waits (stripe_event_id);

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
-- call, 220 us of the ~540 us an event took to apply, issue 13)
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
  v_id := billing.outbox_enqueue_once(p_tenant, 'mirror.' || p_object || '.lookup', 'GET', v_path || p_id);
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
-- (never from when an event was applied); audited when it changes.
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
    PERFORM billing.audit(CASE WHEN s.grace_until IS NULL THEN 'dunning.started'
                               WHEN v_grace IS NULL AND s.status IN ('active', 'trialing', 'past_due') THEN 'dunning.recovered'
                               WHEN v_grace IS NULL THEN 'dunning.ended'
                               ELSE 'dunning.updated' END,
                          p_tenant,
                          jsonb_build_object('subscription', s.stripe_subscription_id, 'status', s.status,
                                             'since', v_since, 'grace_until', v_grace,
                                             'previous_grace_until', s.grace_until));
  END IF;
END
$$;

COMMENT ON FUNCTION billing.sync_dunning(text, bigint) IS
  'Derive a subscription''s grace period from Stripe''s facts (past_due status, the first failed attempt of its oldest unpaid invoice); audited as dunning.started, dunning.updated, dunning.recovered or dunning.ended.';

-- Usage that occurred in Stripe's current period of a subscription but
-- was recorded under another period -- the mirror learnt of the period
-- late: a first payment, a renewal or an interval switch whose events came
-- after the usage -- moves to that period, so that it counts there and
-- nowhere else (docs/architecture.md, "Billing periods").  Rows of other
-- tenants and periods are not touched; the usage counters are rebuilt from
-- the table after the commit (the usage_changed trigger).  Audited.
CREATE OR REPLACE FUNCTION billing.rekey_usage(p_tenant text, p_start timestamptz, p_end timestamptz) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  IF p_start IS NULL OR p_end IS NULL OR p_end <= p_start THEN
    RETURN 0;
  END IF;
  -- per metric, through the usage_events_period index: a row of the period
  -- carries a key no older than a year (the longest period) before it
  IF NOT EXISTS (SELECT 1 FROM billing.metrics m
                  CROSS JOIN LATERAL (SELECT 1 FROM billing.usage_events u
                                       WHERE u.tenant_id = p_tenant AND u.metric = m.metric
                                         AND u.period_start >= p_start - interval '13 months' AND u.period_start < p_end
                                         AND u.period_start <> p_start
                                         AND u.occurred_at >= p_start AND u.occurred_at < p_end
                                       LIMIT 1) x) THEN
    RETURN 0;
  END IF;
  UPDATE billing.usage_events u SET period_start = p_start
   WHERE u.tenant_id = p_tenant AND u.period_start >= p_start - interval '13 months' AND u.period_start < p_end
     AND u.period_start <> p_start AND u.occurred_at >= p_start AND u.occurred_at < p_end;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  PERFORM billing.audit('usage.rekeyed', p_tenant,
                        jsonb_build_object('period_start', p_start, 'period_end', p_end, 'events', v_n));
  RETURN v_n;
END
$$;

COMMENT ON FUNCTION billing.rekey_usage(text, timestamptz, timestamptz) IS
  'Move the tenant''s usage that occurred in [p_start, p_end) but was recorded under another period into that period (the mirror learnt of the period after the usage). Audited as usage.rekeyed.';

-- One subscription state.  Returns the Stripe ids it waits for when it
-- cannot be applied yet (the tenant has another current subscription whose
-- end is not mirrored: that one is fetched from Stripe meanwhile).
CREATE OR REPLACE FUNCTION billing.apply_subscription_state(p_tenant text, o jsonb, p_at timestamptz, p_deleted boolean,
                                                 p_source text DEFAULT 'event', OUT waits_for text[])
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_price    jsonb := o -> 'items' -> 'data' -> 0 -> 'price';
  v_plan     text;
  v_int      text;
  v_status   text := CASE WHEN p_deleted THEN 'canceled' ELSE o ->> 'status' END;
  v_terminal boolean;
  v_sub      billing.subscriptions;
  v_other    billing.subscriptions;
  v_id       bigint;
  v_pstart   timestamptz := to_timestamp((coalesce(o ->> 'current_period_start',
                                                   o -> 'items' -> 'data' -> 0 ->> 'current_period_start'))::bigint);
  v_pend     timestamptz := to_timestamp((coalesce(o ->> 'current_period_end',
                                                   o -> 'items' -> 'data' -> 0 ->> 'current_period_end'))::bigint);
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
  END IF;

  -- a period the usage was not recorded under yet (renewed, switched, or
  -- paid for the first time): what occurred in it counts in it
  IF v_status IN ('trialing', 'active', 'past_due', 'unpaid', 'paused')
     AND (v_sub.subscription_id IS NULL OR v_sub.current_period_start IS DISTINCT FROM v_pstart
          OR v_sub.status NOT IN ('trialing', 'active', 'past_due', 'unpaid', 'paused')) THEN
    PERFORM billing.rekey_usage(p_tenant, v_pstart, v_pend);
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
                                  attempt_count, finalized_at, paid_at)
    VALUES (p_tenant, o ->> 'id', v_sub.subscription_id, v_subid, o ->> 'number', o ->> 'status',
            coalesce((o ->> 'amount_due')::bigint, 0), coalesce((o ->> 'amount_paid')::bigint, 0),
            coalesce((o ->> 'amount_remaining')::bigint, 0), o ->> 'currency',
            to_timestamp((o ->> 'period_start')::bigint), to_timestamp((o ->> 'period_end')::bigint),
            o ->> 'hosted_invoice_url', o ->> 'invoice_pdf', to_timestamp((o ->> 'created')::bigint), p_at,
            CASE WHEN p_failed THEN p_at END, coalesce((o ->> 'attempt_count')::integer, 0),
            to_timestamp((v_st ->> 'finalized_at')::bigint), to_timestamp((v_st ->> 'paid_at')::bigint));
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
      paid_at = coalesce(i.paid_at, to_timestamp((v_st ->> 'paid_at')::bigint)),
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

CREATE OR REPLACE FUNCTION billing.mirror_fetched() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  o     jsonb := NEW.response;
  v_t   text := coalesce(billing.event_tenant(NEW.response), NEW.tenant_id);
  v_at  timestamptz := billing.outbox_state_at(NEW);
BEGIN
  IF NEW.http_status <> 200 OR v_t IS NULL OR NOT EXISTS (SELECT 1 FROM billing.tenants t WHERE t.tenant_id = v_t) THEN
    RETURN NULL;   -- Stripe has no such object (404), or it is not ours
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
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.mirror_fetched() IS
  'Trigger: the answer of a GET the mirror asked for (billing.fetch_object) is applied like an event, in the transaction that records it; an error there makes the worker ask again.';

CREATE OR REPLACE TRIGGER mirror_fetched AFTER UPDATE OF state ON billing.stripe_requests
  FOR EACH ROW WHEN (NEW.state = 'succeeded' AND OLD.state <> 'succeeded' AND NEW.kind LIKE 'mirror.%')
  EXECUTE FUNCTION billing.mirror_fetched();

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
  IF v_type = 'charge.dispute.created' THEN
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
    PERFORM billing.apply_invoice(v_t, o, v_at, v_type = 'invoice.payment_failed', false, e ->> 'api_version');
    IF v_type = 'invoice.payment_failed' THEN
      -- the fact, whatever order events arrive in (once per invoice); whoever
      -- delivers notifications skips it if the invoice is paid by then
      INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
      VALUES (v_t, 'payment.failed', 'payment_failed:' || (o ->> 'id'),
              jsonb_build_object('invoice', o ->> 'id', 'amount_due', (o ->> 'amount_due')::bigint,
                                 'hosted_invoice_url', o ->> 'hosted_invoice_url'))
      ON CONFLICT (tenant_id, dedup_key) DO NOTHING;
    END IF;
  WHEN v_type = 'invoice_payment.paid' THEN
    PERFORM billing.link_invoice_payment(v_t, billing.stripe_ref(o -> 'invoice'),
                                         billing.stripe_ref(o -> 'payment' -> 'payment_intent'));
  WHEN v_type IN ('payment_intent.succeeded', 'charge.succeeded') THEN
    PERFORM billing.apply_payment(v_t, o, v_at, 'succeeded');
  WHEN v_type IN ('payment_intent.payment_failed', 'charge.failed') THEN
    PERFORM billing.apply_payment(v_t, o, v_at, 'failed');
  WHEN v_type = 'charge.dispute.created' THEN
    PERFORM billing.apply_dispute(v_t, o);
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
  v_base  double precision := extract(epoch FROM current_setting('qes_billing.retry_base_delay')::interval);
  v_cap   double precision := extract(epoch FROM current_setting('qes_billing.retry_max_delay')::interval);
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
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT;
      v_err := billing.redact_text(v_err);
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
-- (issue 10; docs/architecture.md, "Reconciliation").  Webhooks can be lost
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

ALTER TABLE billing.webhook_events ADD COLUMN source text NOT NULL DEFAULT 'webhook'
  CHECK (source IN ('webhook', 'reconcile'));

COMMENT ON COLUMN billing.webhook_events.source IS
  'How the event came: delivered by Stripe (webhook) or found missing by a reconciliation pass (reconcile).';

-- One run: a pass over Stripe's events, or one tenant's objects.  Global
-- like the queues (a pass concerns no one tenant).
CREATE TABLE billing.reconcile_runs (
  run_id        text PRIMARY KEY,
  kind          text NOT NULL CHECK (kind IN ('pass', 'tenant')),
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
  source          text NOT NULL CHECK (source IN ('events', 'objects')),
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
         "charge.dispute.created"]'::jsonb;

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
            jsonb_build_object('run_id', p_run), p_run_id => p_run);
  UPDATE billing.stripe_requests SET next_attempt_at = greatest(p_due, now()) WHERE request_id = v_id;
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

CREATE OR REPLACE FUNCTION billing.reconcile_fetched() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  o       jsonb := NEW.response;
  v_run   text := NEW.subject ->> 'run_id';
  v_at    timestamptz := billing.outbox_state_at(NEW);
  v_live  boolean := billing.environment() = 'production';
  v_data  jsonb := CASE WHEN jsonb_typeof(NEW.response -> 'data') = 'array' THEN NEW.response -> 'data' ELSE '[]' END;
  v_last  text := NEW.response -> 'data' -> -1 ->> 'id';
  v_more  boolean := coalesce((NEW.response ->> 'has_more')::boolean, false);
  v_n     integer := jsonb_array_length(CASE WHEN jsonb_typeof(NEW.response -> 'data') = 'array'
                                             THEN NEW.response -> 'data' ELSE '[]' END);
  v_missed integer := 0;
  v_newest timestamptz;
  e       jsonb;
  st      billing.reconcile_state;
  v_pages integer := current_setting('qes_billing.reconcile_pages')::integer;
  v_int   interval := current_setting('qes_billing.reconcile_interval')::interval;
BEGIN
  UPDATE billing.reconcile_runs SET requests = requests + 1, listed = listed + v_n WHERE run_id = v_run;
  IF NEW.http_status <> 200 THEN
    NULL;   -- a customer Stripe does not have (404): nothing to mirror
  ELSIF NEW.kind = 'reconcile.events.list' THEN
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
    FOR e IN SELECT * FROM jsonb_array_elements(CASE WHEN NEW.kind = 'reconcile.customer.lookup'
                                                     THEN jsonb_build_array(o) ELSE v_data END) LOOP
      PERFORM billing.reconcile_object(NEW.tenant_id, e, v_at, v_run);
      -- a disputed charge: its disputes
      IF e ->> 'object' = 'charge' AND coalesce((e ->> 'disputed')::boolean, false) AND e ->> 'id' ~ '^ch_[A-Za-z0-9_]+$' THEN
        PERFORM billing.outbox_enqueue(NEW.tenant_id, 'reconcile.disputes.list', 'GET', '/v1/disputes',
                                       jsonb_build_object('charge', e ->> 'id', 'limit', 100),
                                       jsonb_build_object('run_id', v_run), p_run_id => v_run);
      END IF;
    END LOOP;
    IF v_more AND v_last IS NOT NULL THEN
      PERFORM billing.outbox_enqueue(NEW.tenant_id, NEW.kind, 'GET', NEW.path,
                                     NEW.params || jsonb_build_object('starting_after', v_last),
                                     NEW.subject, p_run_id => v_run);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.stripe_requests r
                    WHERE r.run_id = v_run AND r.request_id <> NEW.request_id
                      AND r.state IN ('waiting', 'pending', 'in_flight')) THEN
      UPDATE billing.reconcile_runs SET finished_at = now() WHERE run_id = v_run;
      PERFORM billing.audit('reconcile.finished', NEW.tenant_id,
                            (SELECT jsonb_build_object('run', r.run_id, 'requests', r.requests, 'listed', r.listed,
                                                       'repairs', r.repairs, 'errors', r.errors)
                               FROM billing.reconcile_runs r WHERE r.run_id = v_run));
    END IF;
  END IF;
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.reconcile_fetched() IS
  'Trigger: a reconciliation answer (reconcile.*) is applied when the worker records it: missed events into the inbox, listed objects mirrored as repairs, the next page or pass queued.';

CREATE OR REPLACE TRIGGER reconcile_fetched AFTER UPDATE OF state ON billing.stripe_requests
  FOR EACH ROW WHEN (NEW.state = 'succeeded' AND OLD.state <> 'succeeded' AND NEW.kind LIKE 'reconcile.%')
  EXECUTE FUNCTION billing.reconcile_fetched();

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

ALTER TABLE billing.subscriptions
  ADD COLUMN stripe_item_id text,
  ADD COLUMN pending_change jsonb,
  ADD COLUMN last_error jsonb;

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
  -- this database's share of the Stripe account's rate (87_outbox_budget.sql)
  v_room integer := billing.stripe_budget_take(p_limit);
  v_n    integer;
BEGIN
  RETURN QUERY
  UPDATE billing.stripe_requests r
     SET state = 'in_flight', attempts = r.attempts + 1, claimed_at = now(), updated_at = now()
   WHERE r.request_id = ANY (ARRAY(
           SELECT d.request_id FROM billing.stripe_requests d
            WHERE d.state = 'pending' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at, d.request_id
            LIMIT v_room
              FOR UPDATE SKIP LOCKED))
  RETURNING r.request_id, r.attempts, r.method, r.path, r.params, r.idempotency_key;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n < v_room THEN
    PERFORM billing.stripe_budget_give_back(v_room - v_n);
  END IF;
END
$$;

-- Seconds until the next request is due (0: now; NULL: none waits), so the
-- worker sleeps exactly as long as it may.  (greatest(0, NULL) is 0, not
-- NULL: an empty queue must not read as "due now".)
CREATE OR REPLACE FUNCTION billing.outbox_next_due() RETURNS double precision
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
BEGIN
  -- and not before this database's share of the account's rate allows one
  RETURN (SELECT greatest(0, extract(epoch FROM d.at - now()), billing.stripe_budget_wait())::double precision
            FROM (SELECT min(r.next_attempt_at) AS at FROM billing.stripe_requests r WHERE r.state = 'pending') d
           WHERE d.at IS NOT NULL);
END
$$;

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
CREATE FUNCTION billing.stripe_budget_rate(b billing.stripe_rate_budget) RETURNS double precision
  LANGUAGE sql STABLE
  RETURN CASE WHEN b.one_row IS NULL THEN NULL
              WHEN pg_catalog.clock_timestamp() > b.expires_at THEN b.fallback_rate ELSE b.rate END;
COMMENT ON FUNCTION billing.stripe_budget_rate(billing.stripe_rate_budget) IS
  'The share in force: rate, or fallback_rate once expires_at has passed; NULL without a share.';

-- Take up to p_want tokens for a claim (the claim gives back what it did
-- not use).  Without a share, p_want: the row is only read, never locked.
CREATE FUNCTION billing.stripe_budget_take(p_want integer) RETURNS integer
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

CREATE FUNCTION billing.stripe_budget_give_back(p_unused integer) RETURNS void
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
AS $$
  UPDATE billing.stripe_rate_budget SET tokens = tokens + p_unused WHERE p_unused > 0
$$;
COMMENT ON FUNCTION billing.stripe_budget_give_back(integer) IS
  'Return the tokens a claim took and did not use.';

-- Seconds until the share lets one more request go (0: now or no share).
CREATE FUNCTION billing.stripe_budget_wait() RETURNS double precision
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
  -- the row keeps the answer redacted (DESIGN.md rule 13); applying it
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
              AND now() < r.created_at + current_setting('qes_billing.idempotency_window')::interval)) THEN
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
BEGIN
  FOR v IN
    UPDATE billing.stripe_requests s
       SET state = 'succeeded', http_status = a.http_status, response = billing.redact(a.body), error = NULL,
           updated_at = now()
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
    RETURNING s AS req, a.body, a.ord
  LOOP
    -- as billing.outbox_succeed: stored redacted, applied as Stripe sent it
    r := v.req;
    r.response := v.body;
    PERFORM billing.outbox_apply(r);
    PERFORM billing.outbox_release_waiting(r);
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
  r billing.stripe_requests;
  w bigint;
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'failed', http_status = p_http_status, response = billing.redact(p_body),
         error = billing.redact(p_err) || jsonb_build_object('attempts', attempts), claimed_at = NULL, updated_at = now()
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

-- An operator may send a failed request again.  A request whose outcome was
-- unknown keeps its Idempotency-Key (Stripe replays what it did); one that
-- Stripe refused (a card decline, an invalid request) gets a new key, since
-- Stripe would replay the stored refusal for 24 hours.
CREATE OR REPLACE FUNCTION billing.retry_request(p_request_id bigint) RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_new_key boolean;
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now(),
         idempotency_key = CASE WHEN coalesce(error ->> 'category', 'network') IN ('network', 'server', 'conflict', 'apply', 'rate_limited')
                                THEN idempotency_key ELSE 'qes-' || gen_random_uuid() END
   WHERE request_id = p_request_id AND state = 'failed'
  RETURNING coalesce(error ->> 'category', 'network') NOT IN ('network', 'server', 'conflict', 'apply', 'rate_limited')
    INTO v_new_key;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no failed outbox request %', p_request_id
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'List them with: SELECT request_id, kind, error FROM billing.stripe_requests WHERE state = ''failed''.';
  END IF;
  PERFORM billing.audit('stripe.request_retried', NULL,
                        jsonb_build_object('request_id', p_request_id, 'new_idempotency_key', v_new_key));
END
$$;

COMMENT ON FUNCTION billing.retry_request(bigint) IS
  'Send a failed outbox request again: with its original Idempotency-Key when its outcome was unknown, with a new one when Stripe refused it (Stripe would replay the refusal). Audited.';

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
-- Where notifications are queued: usage thresholds (src/usage.c), payment
-- failed, trial ending and the operator's dispute alert (85_events.sql),
-- grace ended (billing.notify_timers, below), payment recovered (trigger on
-- subscriptions, below).

-- The delivery state of a notification (the table: 50_documents.sql):
-- pending -> in_flight -> sent | pending (retry) | failed; or skipped when
-- it no longer applies by its turn.  event_id is what receivers deduplicate
-- by, the same on every attempt.  channels_due: the channels of the attempt
-- in flight not yet recorded; delivered: channel -> when it delivered (a
-- channel that delivered is not sent again); attempt_errors: what failed in
-- this attempt, per channel.
ALTER TABLE billing.notifications
  DROP CONSTRAINT notifications_state_check,
  ADD CONSTRAINT notifications_state_check CHECK (state IN ('pending', 'in_flight', 'sent', 'failed', 'skipped')),
  ADD COLUMN event_id text NOT NULL
    DEFAULT 'ntf_' || pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '')
    CHECK (event_id ~ '^ntf_[0-9a-f]{32}$'),
  ADD COLUMN attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  ADD COLUMN claimed_at timestamptz,
  ADD COLUMN channels_due text[] NOT NULL DEFAULT '{}',
  ADD COLUMN delivered jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(delivered) = 'object'),
  ADD COLUMN attempt_errors jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(attempt_errors) = 'object'),
  ADD COLUMN last_error text,
  ADD COLUMN skip_reason text,
  ADD COLUMN updated_at timestamptz NOT NULL DEFAULT pg_catalog.now();

COMMENT ON COLUMN billing.notifications.event_id IS
  'The id of the notification on every channel and attempt (webhook "id" and QES-Event-Id, email Message-ID and X-QES-Event-Id): receivers deduplicate by it.';

-- the worker claims by due time
DROP INDEX billing.notifications_pending;

CREATE INDEX notifications_due ON billing.notifications (next_attempt_at) WHERE state = 'pending';

CREATE INDEX notifications_in_flight ON billing.notifications (claimed_at) WHERE state = 'in_flight';

CREATE INDEX notifications_failed ON billing.notifications (updated_at) WHERE state = 'failed';

CREATE INDEX subscriptions_grace ON billing.subscriptions (grace_until)
  WHERE status IN ('past_due', 'unpaid') AND grace_until IS NOT NULL;

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

-- The values a notification's template needs, read as things are now; or
-- {"skip": reason} when it no longer applies.
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
    SELECT * INTO s FROM billing.subscriptions x
     WHERE x.tenant_id = n.tenant_id AND x.subscription_id = (p ->> 'subscription_id')::bigint;
    IF NOT FOUND OR s.status NOT IN ('active', 'trialing') THEN
      RETURN jsonb_build_object('skip', format('the subscription is %s now', coalesce(s.status, 'gone')));
    END IF;
    SELECT * INTO i FROM billing.invoices x
     WHERE x.tenant_id = n.tenant_id AND x.subscription_id = s.subscription_id AND x.status = 'paid'
     ORDER BY x.stripe_state_at DESC NULLS LAST, x.stripe_created DESC LIMIT 1;
    SELECT * INTO v_plan FROM billing.plans WHERE plan_id = s.plan_id;
    v := v || jsonb_build_object(
      'plan_name', v_plan.name, 'plan_limits', billing.notify_plan_limits(s.plan_id),
      'invoice_number', coalesce(i.number, i.stripe_invoice_id, 'of the subscription'),
      'amount', coalesce(billing.notify_money(i.amount_paid, i.currency), 'the amount due'));

  WHEN 'subscription.trial_will_end' THEN
    SELECT * INTO s FROM billing.subscriptions x WHERE x.stripe_subscription_id = p ->> 'subscription';
    IF NOT FOUND OR s.status <> 'trialing' THEN
      RETURN jsonb_build_object('skip', format('the subscription is %s, no longer in its trial', coalesce(s.status, 'gone')));
    END IF;
    IF s.trial_end <= billing.now() THEN
      RETURN jsonb_build_object('skip', 'the trial has ended already');
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
-- does that by itself from grace_until); queue the notice and audit it,
-- once per subscription and grace period.
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
                    AND s.grace_until <= billing.now()
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
     WHERE s.status IN ('past_due', 'unpaid') AND s.grace_until IS NOT NULL AND s.grace_until <= billing.now()),
  ins AS (
    INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
    SELECT d.tenant_id, 'grace.ended', d.dedup_key,
           jsonb_build_object('subscription', d.stripe_subscription_id, 'subscription_id', d.subscription_id,
                              'plan_id', d.plan_id, 'grace_until', d.grace_until)
      FROM due d
     WHERE NOT EXISTS (SELECT FROM billing.notifications x WHERE x.tenant_id = d.tenant_id AND x.dedup_key = d.dedup_key)
    ON CONFLICT (tenant_id, dedup_key) DO NOTHING
    RETURNING tenant_id, payload)
  SELECT count(billing.audit('dunning.grace_ended', ins.tenant_id, ins.payload)) INTO v_n FROM ins;
  RETURN v_n;
END
$$;

COMMENT ON FUNCTION billing.notify_timers() IS
  'Queue (and audit) a grace.ended notification for each subscription whose grace period ended unpaid, once per grace period.';

-- Payment recovered: a subscription leaves past_due/unpaid for active.  A
-- changed grace period wakes the worker, whose next due time includes it.
CREATE OR REPLACE FUNCTION billing.notify_subscription_changed() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF OLD.status IN ('past_due', 'unpaid') AND NEW.status IN ('active', 'trialing') THEN
    INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
    VALUES (NEW.tenant_id, 'payment.recovered',
            'payment_recovered:' || NEW.subscription_id || ':'
              || extract(epoch FROM coalesce(OLD.grace_until, NEW.stripe_state_at, now()))::bigint,
            jsonb_build_object('subscription', NEW.stripe_subscription_id, 'subscription_id', NEW.subscription_id,
                               'grace_until', OLD.grace_until))
    ON CONFLICT (tenant_id, dedup_key) DO NOTHING;
  END IF;
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
     AND x.claimed_at < now() - 2 * current_setting('qes_billing.notify_timeout')::interval;

  FOR n IN
    SELECT * FROM billing.notifications x
     WHERE x.state = 'pending' AND x.next_attempt_at <= now()
     ORDER BY x.next_attempt_at, x.notification_id
     LIMIT p_limit
       FOR UPDATE SKIP LOCKED
  LOOP
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
      IF NOT v ? 'skip' AND cardinality(v_chan) > 0 THEN
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
    IF v ? 'skip' THEN
      UPDATE billing.notifications x SET state = 'skipped', skip_reason = v ->> 'skip', updated_at = now()
       WHERE x.tenant_id = n.tenant_id AND x.notification_id = n.notification_id;
      CONTINUE;
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

-- The delay before attempt n+1: exponential with jitter (50-100 %).
CREATE OR REPLACE FUNCTION billing.notify_backoff(p_attempts integer) RETURNS interval
  LANGUAGE sql VOLATILE
RETURN make_interval(secs => least(extract(epoch FROM current_setting('qes_billing.notify_retry_max_delay')::interval),
                                   extract(epoch FROM current_setting('qes_billing.notify_retry_base_delay')::interval)
                                     * 2 ^ least(greatest(p_attempts - 1, 0), 30))
                             * (0.5 + random() / 2));

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
   WHERE state = 'in_flight';
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

-- Unknown outcomes (issue 10, item 7): a request that creates a customer or
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
   AND r.error ->> 'category' IN ('network', 'server', 'conflict', 'rate_limited', 'apply');

COMMENT ON FUNCTION billing.outcome_unknown(billing.stripe_requests) IS
  'Whether a failed customer or subscription request may still have created its object in Stripe (no definite answer: network, 5xx, 409, 429, or an answer that could not be applied).';

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
                                  jsonb_build_object('email', t.billing_email, 'limit', 100),
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

CREATE OR REPLACE FUNCTION billing.request_failed_unknown() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.resolve_request(NEW);
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.request_failed_unknown() IS
  'Trigger: a request that creates an object and failed without a definite answer is looked up in Stripe before its failure stands.';

CREATE OR REPLACE TRIGGER request_failed_unknown AFTER UPDATE OF state ON billing.stripe_requests
  FOR EACH ROW WHEN (NEW.state = 'failed' AND OLD.state <> 'failed' AND billing.outcome_unknown(NEW))
  EXECUTE FUNCTION billing.request_failed_unknown();

-- The lookup's answer: the object qes_billing asked for, or nothing.
CREATE OR REPLACE FUNCTION billing.resolve_fetched() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  r      billing.stripe_requests;
  o      jsonb;
  w      billing.stripe_requests;
  v_at   timestamptz := billing.outbox_state_at(NEW);
  v_sub  bigint;
BEGIN
  SELECT * INTO r FROM billing.stripe_requests WHERE request_id = (NEW.subject ->> 'request_id')::bigint FOR UPDATE;
  IF NOT FOUND OR r.state <> 'failed' THEN
    RETURN NULL;
  END IF;
  v_sub := (r.subject ->> 'subscription_id')::bigint;
  SELECT x INTO o FROM jsonb_array_elements(CASE WHEN jsonb_typeof(NEW.response -> 'data') = 'array'
                                                 THEN NEW.response -> 'data' ELSE '[]' END) x
   WHERE CASE r.kind
           WHEN 'customer.create' THEN x -> 'metadata' ->> 'tenant_id' = r.tenant_id AND NOT coalesce((x ->> 'deleted')::boolean, false)
           ELSE x -> 'metadata' ->> 'subscription_id' = r.subject ->> 'subscription_id'
                AND x -> 'metadata' ->> 'tenant_id' = r.tenant_id
         END
   ORDER BY (x ->> 'created')::bigint LIMIT 1;
  IF o IS NULL THEN
    PERFORM billing.audit('stripe.request_resolved', r.tenant_id,
                          jsonb_build_object('request_id', r.request_id, 'kind', r.kind, 'found', false));
    RETURN NULL;   -- Stripe never created it: the failure stands
  END IF;

  CASE r.kind
  WHEN 'customer.create' THEN
    UPDATE billing.tenants SET stripe_customer_id = o ->> 'id', updated_at = now()
     WHERE tenant_id = r.tenant_id AND stripe_customer_id IS NULL;
    PERFORM billing.apply_customer(r.tenant_id, o, v_at, false);
    -- what waited for the customer never reached Stripe: send it now, with its own key
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
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION billing.resolve_fetched() IS
  'Trigger: the answer of a lookup for a failed request of unknown outcome; the object found is linked and mirrored (and what waited for it sent again), otherwise the failure stands. Audited.';

CREATE OR REPLACE TRIGGER resolve_fetched AFTER UPDATE OF state ON billing.stripe_requests
  FOR EACH ROW WHEN (NEW.state = 'succeeded' AND OLD.state <> 'succeeded' AND NEW.kind LIKE 'resolve.%')
  EXECUTE FUNCTION billing.resolve_fetched();

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
-- (docs/monitoring/qes_billing_queries.yaml reads these views; README,
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
-- partial indexes.  Nothing here is granted beyond qes_admin: the exporter
-- logs in as a member of it (README, "Monitoring").

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
-- the categories of billing.outbox_classify() plus apply and dependency.
CREATE VIEW billing.prometheus_outbox_failures AS
WITH known(category) AS (
  VALUES ('network'), ('conflict'), ('rate_limited'), ('server'), ('card'), ('authentication'), ('permission'),
         ('not_found'), ('invalid_request'), ('apply'), ('dependency')
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
       count(*) FILTER (WHERE a.action = 'dunning.recovered') AS dunning_recovered_total,
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
CREATE VIEW billing.prometheus_usage AS
SELECT u.metric, u.tenants, u.active_tenants,
       coalesce(u.used, 0)::double precision AS current_period,
       u.used_p50::double precision AS tenant_p50,
       u.used_p95::double precision AS tenant_p95,
       u.used_max::double precision AS tenant_max,
       u.near_limit AS tenants_near_limit,
       u.over_limit AS tenants_over_limit
  FROM billing.usage_patterns u;

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

REVOKE ALL ON FUNCTION billing.prometheus_latency_buckets() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION billing.prometheus_latency_buckets(), billing.webhook_event_types() TO qes_admin;

GRANT SELECT ON billing.prometheus_webhook_events, billing.prometheus_webhook_inbox,
                billing.prometheus_webhook_rejections, billing.prometheus_outbox,
                billing.prometheus_outbox_failures, billing.prometheus_audit_counters,
                billing.prometheus_worker, billing.prometheus_subscriptions, billing.prometheus_payments,
                billing.prometheus_usage, billing.prometheus_usage_cache, billing.prometheus_rate_limit
  TO qes_admin;

-- What pg_dump keeps (docs/architecture.md, rule 11: a pg_dump restores into a
-- working system).  pg_dump leaves out the rows of tables an extension created
-- unless they are marked with pg_extension_config_dump(); on restore, CREATE
-- EXTENSION runs this script again and then the dumped rows are loaded into
-- the tables it made.  So:
--
--   * tenant data, the queues and the audit log are dumped whole;
--   * the seeded tables (metrics, plans, plan_limits, prices, clock,
--     audit_head) are dumped without the rows that are still exactly as
--     CREATE EXTENSION made them (it makes them again), and a row loaded with
--     the key of a seed row that is still as installed replaces it (trigger
--     replace_seed): an operator's limit change, the Stripe ids written by
--     setup, the clock and the audit chain head survive, and no seed row is
--     doubled;
--   * the identity sequences are dumped, so ids go on after the restored rows;
--   * billing.stripe_secrets is never dumped (rule 13): after a restore the
--     webhook secret is configured again (README, "Backup and restore").
--
-- A seed row that was deleted comes back on restore (CREATE EXTENSION makes
-- it): retire a plan or price with active = false, lift a limit with
-- soft_limit = NULL, and keep the seed keys.

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
                           'reconcile_runs', 'drift_repairs', 'reconcile_state'] LOOP
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

-- reconciliation (sql/install/86_reconcile.sql)
GRANT SELECT ON billing.drift_report, billing.reconcile_runs TO qes_admin;

GRANT EXECUTE ON FUNCTION billing.reconcile_tenant(text), billing.reconcile_now() TO qes_admin;

GRANT EXECUTE ON FUNCTION billing.worker_state(), billing.verify_audit_chain(), billing.usage_cache_stats(),
                          billing.audit_hash(bytea, bigint, timestamptz, text, text, text, text, text, jsonb),
                          billing.wake_worker()
  TO qes_admin;

-- abuse protection: PostgREST calls the pre-request function as every role
GRANT EXECUTE ON FUNCTION api.pre_request() TO qes_anon, qes_tenant, qes_admin, qes_app;

GRANT EXECUTE ON FUNCTION billing.webhook_rejections_pending(), billing.rate_limit_stats() TO qes_admin;

-- verify_audit_chain() reads the chain head (not a secret: the last row's hash)
GRANT SELECT ON billing.audit_head TO qes_admin;

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

-- Invoices: their subscription by Stripe id, the first failed attempt (the
-- earliest invoice.payment_failed), the attempt count, status transitions.
UPDATE billing.invoices i
   SET stripe_subscription_id = coalesce(f.subscription, s.stripe_subscription_id),
       first_failed_at = f.first_failed_at, attempt_count = coalesce(f.attempt_count, 0),
       finalized_at = f.finalized_at, paid_at = f.paid_at
  FROM billing.invoices i2
  LEFT JOIN billing.subscriptions s ON s.tenant_id = i2.tenant_id AND s.subscription_id = i2.subscription_id
  LEFT JOIN (SELECT x.id,
                    min(billing.invoice_subscription(x.o)) AS subscription,
                    min(x.at) FILTER (WHERE x.source = 'invoice.payment_failed') AS first_failed_at,
                    max(qes_billing_0_1.int(x.o ->> 'attempt_count')) AS attempt_count,
                    min(qes_billing_0_1.ts(x.o -> 'status_transitions' ->> 'finalized_at')) AS finalized_at,
                    min(qes_billing_0_1.ts(x.o -> 'status_transitions' ->> 'paid_at')) AS paid_at
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

-- The 0.1 tables made again: out of the extension's pg_dump marks, then gone
-- with the scratch schema.
ALTER EXTENSION qes_billing DROP TABLE qes_billing_0_1.subscriptions;
ALTER EXTENSION qes_billing DROP TABLE qes_billing_0_1.webhook_rejections;
DROP SCHEMA qes_billing_0_1 CASCADE;
