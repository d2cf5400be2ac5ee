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

CREATE FUNCTION billing.setup_meters(p_run text) RETURNS integer
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
CREATE FUNCTION billing.meter_setup_prices(p_run text) RETURNS void
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
CREATE FUNCTION billing.meter_price_params(mp billing.metered_prices) RETURNS jsonb
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
CREATE FUNCTION billing.metered_items_for(p_plan text, p_interval text) RETURNS jsonb
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
CREATE FUNCTION billing.metered_items_change(s billing.subscriptions, p_plan text, p_interval text) RETURNS jsonb
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce((SELECT jsonb_agg(jsonb_build_object('id', i ->> 'id', 'deleted', true))
                     FROM jsonb_array_elements(s.metered_items) i), '[]')
         || billing.metered_items_for(p_plan, p_interval)
$$;

-- A Stripe subscription's licensed item (the plan's price) and its metered items.
CREATE FUNCTION billing.base_item_of(o jsonb) RETURNS text
  LANGUAGE sql IMMUTABLE
RETURN coalesce((SELECT i ->> 'id' FROM jsonb_array_elements(o -> 'items' -> 'data') WITH ORDINALITY x(i, n)
                  WHERE coalesce(i -> 'price' -> 'recurring' ->> 'usage_type', 'licensed') <> 'metered'
                  ORDER BY n LIMIT 1),
                o -> 'items' -> 'data' -> 0 ->> 'id');

CREATE FUNCTION billing.metered_items_of(o jsonb) RETURNS jsonb
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
CREATE FUNCTION billing.meter_identifier(p_tenant text, p_metric text, p_meter_event_id bigint, p_keys text[])
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
CREATE FUNCTION billing.meter_unsent(p_now timestamptz, p_tenant text DEFAULT NULL)
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
CREATE FUNCTION billing.meter_queue_some(p_now timestamptz, p_limit integer, p_tenant text DEFAULT NULL)
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
CREATE FUNCTION billing.meter_skipped(p_tenant text, p_sqlstate text, p_error text) RETURNS void
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
CREATE FUNCTION billing.meter_queue(p_limit integer, p_wait boolean DEFAULT true) RETURNS integer
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
CREATE FUNCTION billing.meter_send(p_tenant text, p_meter_event_id bigint, p_attempt integer DEFAULT 0)
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
CREATE FUNCTION billing.meter_tick() RETURNS double precision
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
CREATE FUNCTION billing.meter_pass_now() RETURNS integer
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

CREATE FUNCTION billing.meter_apply(r billing.stripe_requests) RETURNS void
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

CREATE FUNCTION billing.meter_apply_failure(r billing.stripe_requests) RETURNS void
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
CREATE FUNCTION billing.meter_reconcile(p_tenant text DEFAULT NULL) RETURNS text
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
CREATE FUNCTION billing.meter_local_value(p_tenant text, p_metric text, p_period timestamptz) RETURNS numeric
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

CREATE FUNCTION billing.meter_compare(r billing.stripe_requests) RETURNS void
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
CREATE FUNCTION billing.void_usage(p_tenant text, p_key text, p_reason text) RETURNS text
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
CREATE FUNCTION billing.meter_cancelled(r billing.stripe_requests) RETURNS void
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
CREATE FUNCTION billing.meter_cancel_here(e billing.meter_events, p_why text) RETURNS void
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
CREATE FUNCTION billing.keep_invoice_lines() RETURNS trigger
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
CREATE TRIGGER keep_invoice_lines AFTER UPDATE OF state ON billing.webhook_events
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
