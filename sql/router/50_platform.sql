-- The platform's calls (README, "Usage metering and limits"), routed to
-- the tenant's shard.  Each is one autocommitted statement there: a routed
-- record_usage is exactly once by its idempotency key, but it is not part
-- of the caller's transaction.  The billable act and its record_usage
-- belong in one transaction on the tenant's shard: connect there
-- (router.tenant_shard, or PgBouncer's database for the shard) for that;
-- these serve checks, reports and calls that stand alone.

CREATE FUNCTION router.check_limit(tenant_id text, metric text, quantity bigint DEFAULT 1)
  RETURNS router.limit_check
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_hash  integer := router.tenant_hash(tenant_id);
  v_role  text := router.caller_role();
  v_state text; v_msg text; v_detail text; v_hint text;
BEGIN
  IF router.reads_from_standby('check_limit', true) THEN
    BEGIN
      RETURN router.remote_check_limit(true, v_hash, v_role, tenant_id, metric, quantity);
    EXCEPTION WHEN OTHERS THEN
      -- any failure on the standby (down, a recovery conflict): the shard
      -- answers, and raises what is the caller's own error itself
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      RAISE LOG 'qes_billing_router: standby of shard % failed, checking on the shard: % %',
        router.partition_shard(v_hash), v_state, v_msg;
    END;
  END IF;
  RETURN router.remote_check_limit(false, v_hash, v_role, tenant_id, metric, quantity);
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
                          v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
  PERFORM router.call_failed(v_hash, v_state, v_msg, v_detail, v_hint);
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION router.check_limit(text, text, bigint) IS
  'billing.check_limit on the tenant''s shard, or on its hot standby when qes_billing_router.read_from_standbys is on (the shard when the standby does not answer).';

CREATE FUNCTION router.record_usage(tenant_id text, metric text, quantity bigint, idempotency_key text,
                                    metadata jsonb DEFAULT NULL, occurred_at timestamptz DEFAULT NULL)
  RETURNS router.usage_result
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_hash  integer := router.tenant_hash(tenant_id);
  v_role  text := router.caller_role();
  v_state text; v_msg text; v_detail text; v_hint text;
BEGIN
  RETURN router.remote_record_usage(v_hash, v_role, tenant_id, metric, quantity, idempotency_key, metadata, occurred_at);
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
                          v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
  PERFORM router.call_failed(v_hash, v_state, v_msg, v_detail, v_hint);
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION router.record_usage(text, text, bigint, text, jsonb, timestamptz) IS
  'billing.record_usage on the tenant''s shard, committed there at once (exactly once by its idempotency key; not in the caller''s transaction).';

CREATE FUNCTION router.upsert_tenant(p_tenant_id text, p_name text, p_billing_email text) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_hash  integer := router.tenant_hash(p_tenant_id);
  v_role  text := router.caller_role();
  v_row   json;
  v_state text; v_msg text; v_detail text; v_hint text;
BEGIN
  IF p_tenant_id IS NULL THEN
    v_hash := 0;    -- the shard refuses it as one database does
  END IF;
  SELECT r INTO v_row FROM router.remote_upsert_tenant(v_hash, v_role, p_tenant_id, p_name, p_billing_email) r;
  RETURN v_row;
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
                          v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
  PERFORM router.call_failed(v_hash, v_state, v_msg, v_detail, v_hint);
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION router.upsert_tenant(text, text, text) IS
  'billing.upsert_tenant on the tenant''s shard (registers the tenant where its partition lives); the row as JSON.';

CREATE FUNCTION router.usage_report(p_tenant_id text)
  RETURNS TABLE (period_start timestamptz, period_end timestamptz, is_current boolean, metric text,
                 used bigint, usage_limit bigint, percent double precision, status text)
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_hash  integer := router.tenant_hash(p_tenant_id);
  v_role  text := router.caller_role();
  v_state text; v_msg text; v_detail text; v_hint text;
BEGIN
  RETURN QUERY SELECT * FROM router.remote_usage_report(coalesce(v_hash, 0), v_role, p_tenant_id);
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
                          v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
  PERFORM router.call_failed(v_hash, v_state, v_msg, v_detail, v_hint);
END
$$;
COMMENT ON FUNCTION router.usage_report(text) IS 'billing.usage_report on the tenant''s shard.';
