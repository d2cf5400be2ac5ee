-- The api schema through the router: the same functions (names, arguments,
-- defaults, results, volatility, grants, comments) and the same views
-- (columns, types, grants, comments) as one database's, so that PostgREST
-- pointed at the router serves the same paths with the same answers
-- (test/python/test_router_contract.py compares the two catalogs).  Each
-- request goes to the shard of the caller's tenant (the JWT's tenant_id),
-- runs there as the same role with the same claims, and its answer or
-- error comes back unchanged.

-- One API call on a partition's shard: its body, with response.status and
-- response.headers set here as the shard set them, or its error raised
-- again with the same SQLSTATE, message, detail and hint.
CREATE FUNCTION router.invoke(p_partition integer, p_call text, p_args json DEFAULT '{}', p_body text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_role   text := router.caller_role();
  r        record;
  v_answered boolean := false;
  v_state  text;
  v_msg    text;
  v_detail text;
  v_hint   text;
BEGIN
  IF router.reads_from_standby(p_call, current_setting('transaction_read_only')::boolean) THEN
    BEGIN
      SELECT * INTO r
        FROM router.remote_api(true, p_partition, v_role, current_setting('request.jwt.claims', true),
                               current_setting('request.headers', true), current_setting('request.method', true),
                               current_setting('request.path', true), true, p_call, p_args, p_body);
      -- what a standby cannot answer (25006: it would write; 40001: a
      -- recovery conflict cancelled it) goes to the shard
      v_answered := r.ok OR coalesce(r.err_state NOT IN ('25006', '40001'), true);
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      -- a standby that does not answer: the shard itself does
      RAISE LOG 'qes_billing_router: standby of shard % (partition %) failed, reading from the shard: % %',
        router.partition_shard(p_partition), p_partition, v_state, v_msg;
    END;
  END IF;
  BEGIN
    IF NOT v_answered THEN
      SELECT * INTO r
        FROM router.remote_api(false, p_partition, v_role, current_setting('request.jwt.claims', true),
                               current_setting('request.headers', true), current_setting('request.method', true),
                               current_setting('request.path', true), current_setting('transaction_read_only')::boolean,
                               p_call, p_args, p_body);
    END IF;
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
                            v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
    PERFORM router.call_failed(p_partition, v_state, v_msg, v_detail, v_hint);
  END;
  IF r.status IS NOT NULL THEN
    PERFORM set_config('response.status', r.status, true);
  END IF;
  IF r.headers IS NOT NULL THEN
    PERFORM set_config('response.headers', r.headers, true);
  END IF;
  IF NOT r.ok THEN
    IF r.err_state IN ('QBMOV', 'QBMVD') THEN
      PERFORM router.partition_moving_answer(p_partition, r.err_message);
    END IF;
    PERFORM router.reraise(r.err_state, r.err_message, nullif(r.err_detail, ''), nullif(r.err_hint, ''));
  END IF;
  RETURN r.body;
END
$$;
COMMENT ON FUNCTION router.invoke(integer, text, json, text) IS
  'Run one API call on a partition''s shard as the caller''s role with the request''s claims and headers; returns its body, sets response.status and response.headers, raises its error unchanged, or 503 when the shard is down.';

-- A call that any shard answers alike (config, the plan catalog, an
-- anonymous refusal): the first shard that answers, from a different one
-- each time, so one shard that is down costs nothing but a retry.
CREATE FUNCTION router.invoke_any(p_call text, p_args json DEFAULT '{}', p_body text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_parts integer[] := ARRAY(SELECT partition FROM router.shard_partitions);
  v_n     integer := cardinality(v_parts);
  v_start integer;
  v_state text;
  v_msg   text;
BEGIN
  IF v_n = 0 THEN
    RAISE EXCEPTION 'the billing router has no shards'
      USING ERRCODE = 'PGRST',
            MESSAGE = '{"code": "QB503", "message": "the billing router has no shards", "details": null, "hint": "An operator registers shards with router.add_shard and router.set_partitions."}',
            DETAIL = '{"status": 503, "headers": {"Retry-After": "5"}}';
  END IF;
  v_start := floor(random() * v_n)::integer;
  FOR i IN 0 .. v_n - 1 LOOP
    BEGIN
      RETURN router.invoke(v_parts[1 + (v_start + i) % v_n], p_call, p_args, p_body);
    EXCEPTION WHEN SQLSTATE 'PGRST' THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      -- a shard that is down: the next one; any other answer stands
      IF v_msg NOT LIKE '{"code" : "QB503"%' OR i = v_n - 1 THEN
        RAISE;
      END IF;
    END;
  END LOOP;
END
$$;
COMMENT ON FUNCTION router.invoke_any(text, json, text) IS
  'Run an API call that every shard answers alike on one shard that answers (another one when a shard is down).';

-- The rows of an api view: a tenant's own on its shard; everyone's (staff:
-- row-level security lets qes_admin and qes_app see all tenants) from every
-- shard; the plan catalog from any one.
CREATE FUNCTION router.api_rows(p_view text) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_tenant text := nullif(current_setting('request.jwt.claims', true), '')::json ->> 'tenant_id';
  v_rows   json;
BEGIN
  IF p_view = 'plans' THEN
    RETURN router.invoke_any(p_view)::json;
  END IF;
  IF router.caller_role() = 'qes_tenant' THEN
    IF v_tenant IS NULL THEN
      RETURN router.invoke_any(p_view)::json;
    END IF;
    RETURN router.invoke(router.tenant_hash(v_tenant), p_view)::json;
  END IF;
  SELECT coalesce(json_agg(e ORDER BY s.partition, x.n), '[]') INTO v_rows
    FROM router.shard_partitions s
   CROSS JOIN LATERAL json_array_elements(router.invoke(s.partition, p_view)::json) WITH ORDINALITY x(e, n);
  RETURN v_rows;
END
$$;
COMMENT ON FUNCTION router.api_rows(text) IS
  'The rows of an api view as the caller would read them on one database: a tenant''s from its shard, staff''s from every shard, the plan catalog from any one.';

-- ---- functions ------------------------------------------------------------

CREATE FUNCTION api.config() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
BEGIN
  RETURN router.invoke_any('config')::json;
END
$$;
COMMENT ON FUNCTION api.config() IS
  'Public billing configuration: environment, Stripe mode, publishable key, base and webhook URLs, plans. Never a secret.';

CREATE FUNCTION router.claims_partition() RETURNS integer
  LANGUAGE sql STABLE SET search_path = pg_catalog
  RETURN router.tenant_hash(nullif(current_setting('request.jwt.claims', true), '')::json ->> 'tenant_id');
COMMENT ON FUNCTION router.claims_partition() IS
  'The hash of the tenant named by the request''s JWT (NULL without one).';

-- A tenant's call: on its shard; without a tenant the shard refuses it as
-- one database does (no tenant in the request), so any shard answers.
CREATE FUNCTION router.invoke_tenant(p_call text, p_args json) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_hash integer := router.claims_partition();
BEGIN
  IF v_hash IS NULL THEN
    RETURN router.invoke_any(p_call, p_args)::json;
  END IF;
  RETURN router.invoke(v_hash, p_call, p_args)::json;
END
$$;
COMMENT ON FUNCTION router.invoke_tenant(text, json) IS
  'Run a tenant''s API call on the shard of the JWT''s tenant.';

-- An operator's call about one dispute: on the shard that has it (every
-- shard is asked; one that has none answers as one database does).
CREATE FUNCTION api.submit_dispute_evidence(dispute text) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_targets integer[];
BEGIN
  IF dispute ~ '^(dp|du)_[A-Za-z0-9_]+$' THEN
    v_targets := router.event_targets(jsonb_build_object('object', 'dispute', 'id', dispute));
  END IF;
  IF cardinality(v_targets) = 1 THEN
    RETURN router.invoke(v_targets[1], 'submit_dispute_evidence', json_build_object('dispute', dispute))::json;
  END IF;
  RETURN router.invoke_any('submit_dispute_evidence', json_build_object('dispute', dispute))::json;
END
$$;
COMMENT ON FUNCTION api.submit_dispute_evidence(text) IS
  'Operators (qes_admin): submit the staged evidence of a dispute to Stripe after review. Stripe takes it once. Audited.';

-- Inbound rate limiting, as on one database: qes_billing's token buckets in
-- this cluster's shared memory (the library is preloaded here too).
CREATE FUNCTION api.pre_request() RETURNS void
  LANGUAGE c VOLATILE AS '$libdir/qes_billing', 'qes_pre_request';
COMMENT ON FUNCTION api.pre_request() IS
  'PostgREST db-pre-request: token buckets per client address (last X-Forwarded-For entry; never for Stripe webhook deliveries), per tenant (JWT tenant_id) and per staff role; over the limit the request is answered 429 with Retry-After.';

CREATE FUNCTION router.rate_limit_stats(OUT allowed bigint, OUT limited bigint, OUT overflowed bigint,
                                        OUT slots_used bigint, OUT slots integer)
  LANGUAGE c VOLATILE AS '$libdir/qes_billing', 'qes_rate_limit_stats';
COMMENT ON FUNCTION router.rate_limit_stats() IS
  'Inbound rate limiting on the router since start: requests allowed and limited (429), requests that shared an overflow bucket, buckets in use of those available.';
