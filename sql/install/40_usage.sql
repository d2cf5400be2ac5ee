
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

CREATE FUNCTION billing.usage_period(tenant_id text, at timestamptz,
                                     OUT period_start timestamptz, OUT period_end timestamptz, OUT plan_id text)
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_usage_period';
COMMENT ON FUNCTION billing.usage_period(text, timestamptz) IS
  'The billing period that usage occurring at `at` is counted in, and the plan whose limits apply then, as the mirror of Stripe stands now.';

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
  OUT uncached bigint, OUT dropped bigint, OUT swept bigint, OUT evicted bigint,
  OUT hit_rate double precision, OUT bytes_per_counter integer)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_usage_cache_stats';
COMMENT ON FUNCTION billing.usage_cache_stats() IS
  'Shared-memory usage counters: capacity (qes_billing.max_counters), entries, hits, builds from the table, uncached reads (entry being built, eviction running, or a hot standby), entries dropped, swept (period ended) and evicted (least recently used, when full), the hit rate, and the shared memory one counter takes.';

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
  'Trigger: usage rows were added, changed or removed other than by record_usage; cached counters are rebuilt from the table after commit.';
CREATE TRIGGER usage_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON billing.usage_events
  FOR EACH STATEMENT EXECUTE FUNCTION billing.usage_changed();

CREATE FUNCTION billing.reset_caches() RETURNS void
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_reset_caches';
COMMENT ON FUNCTION billing.reset_caches() IS
  'Forget every cached usage counter and catalog entry when this transaction commits.';

CREATE FUNCTION billing.counter_delta_seen(snap_xmin bigint, snap_xmax bigint, snap_xip bigint[],
                                           committer bigint) RETURNS text
  LANGUAGE c IMMUTABLE AS 'MODULE_PATHNAME', 'qes_counter_seen_fn';
COMMENT ON FUNCTION billing.counter_delta_seen(bigint, bigint, bigint[], bigint) IS
  'The rule a cached counter uses to decide whether a committed delta was already in its build (seen, not_seen, unknown), in 64-bit transaction ids; for tests (src/counters.c).';
