-- The PL/Proxy functions: each runs one statement on one partition's shard
-- (RUN ON a partition number) or on every shard (RUN ON ALL: once per
-- distinct connect string).  Not granted to anyone: the functions below
-- call them and turn their failures into clear answers.

-- The cluster a call runs on: the shards (qes_billing), or their hot
-- standbys where they have one (qes_billing_standby, router.set_standby).
CREATE FUNCTION router.cluster_name(p_standby boolean) RETURNS text
  LANGUAGE sql IMMUTABLE
  RETURN CASE WHEN p_standby THEN 'qes_billing_standby' ELSE 'qes_billing' END;
COMMENT ON FUNCTION router.cluster_name(boolean) IS
  'The PL/Proxy cluster of the shards (qes_billing) or of their hot standbys (qes_billing_standby).';

CREATE FUNCTION router.remote_api(
  p_standby boolean, p_partition integer, p_role text, p_claims text, p_headers text, p_method text, p_path text,
  p_read_only boolean, p_call text, p_args json, p_body text,
  OUT ok boolean, OUT body text, OUT status text, OUT headers text,
  OUT err_state text, OUT err_message text, OUT err_detail text, OUT err_hint text)
  LANGUAGE plproxy
AS $$
  CLUSTER router.cluster_name(p_standby);
  RUN ON p_partition;
  SELECT * FROM billing_shard.api(p_role, p_claims, p_headers, p_method, p_path, p_read_only, p_call, p_args, p_body);
$$;
COMMENT ON FUNCTION router.remote_api(boolean, integer, text, text, text, text, text, boolean, text, json, text) IS
  'PL/Proxy: one API request on a partition''s shard, or on its hot standby (billing_shard.api).';

CREATE TYPE router.limit_check AS (
  allowed      boolean,
  status       text,
  current      bigint,
  usage_limit  bigint,
  remaining    bigint,
  plan_id      text,
  reason       text,
  upgrade      jsonb
);
COMMENT ON TYPE router.limit_check IS 'billing.limit_check as the shard answers it.';

CREATE TYPE router.usage_result AS (
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
COMMENT ON TYPE router.usage_result IS 'billing.usage_result as the shard answers it.';

CREATE FUNCTION router.remote_check_limit(p_standby boolean, p_partition integer, p_role text, tenant_id text,
                                          metric text, quantity bigint)
  RETURNS router.limit_check
  LANGUAGE plproxy
AS $$
  CLUSTER router.cluster_name(p_standby);
  RUN ON p_partition;
  SELECT * FROM billing_shard.check_limit(p_role, tenant_id, metric, quantity);
$$;
COMMENT ON FUNCTION router.remote_check_limit(boolean, integer, text, text, text, bigint) IS
  'PL/Proxy: billing.check_limit on a partition''s shard, or on its hot standby.';

CREATE FUNCTION router.remote_record_usage(p_partition integer, p_role text, tenant_id text, metric text, quantity bigint,
                                           idempotency_key text, metadata jsonb, occurred_at timestamptz)
  RETURNS router.usage_result
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT * FROM billing_shard.record_usage(p_role, tenant_id, metric, quantity, idempotency_key, metadata, occurred_at);
$$;
COMMENT ON FUNCTION router.remote_record_usage(integer, text, text, text, bigint, text, jsonb, timestamptz) IS
  'PL/Proxy: billing.record_usage on a partition''s shard, committed there by itself.';

CREATE FUNCTION router.remote_upsert_tenant(p_partition integer, p_role text, p_tenant_id text, p_name text,
                                            p_billing_email text)
  RETURNS SETOF json
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT row_to_json(t) AS remote_upsert_tenant
    FROM billing_shard.upsert_tenant(p_role, p_tenant_id, p_name, p_billing_email) t;
$$;
COMMENT ON FUNCTION router.remote_upsert_tenant(integer, text, text, text, text) IS
  'PL/Proxy: billing.upsert_tenant on a partition''s shard (the row as JSON).';

CREATE FUNCTION router.remote_usage_report(p_partition integer, p_role text, p_tenant_id text,
  OUT period_start timestamptz, OUT period_end timestamptz, OUT is_current boolean, OUT metric text,
  OUT used bigint, OUT usage_limit bigint, OUT percent double precision, OUT status text)
  RETURNS SETOF record
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT * FROM billing_shard.usage_report(p_role, p_tenant_id);
$$;
COMMENT ON FUNCTION router.remote_usage_report(integer, text, text) IS
  'PL/Proxy: billing.usage_report on a partition''s shard.';

CREATE FUNCTION router.remote_shard_name(p_partition integer) RETURNS text
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT billing_shard.shard_name() AS remote_shard_name;
$$;
COMMENT ON FUNCTION router.remote_shard_name(integer) IS 'PL/Proxy: the name a shard knows itself by.';

CREATE FUNCTION router.remote_event_owner(p_partition integer, p_object jsonb) RETURNS SETOF text
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT o AS remote_event_owner FROM billing_shard.event_owner(p_object) o;
$$;
COMMENT ON FUNCTION router.remote_event_owner(integer, jsonb) IS
  'PL/Proxy: the tenant of a shard a Stripe object belongs to (no row: none there).';

CREATE FUNCTION router.remote_take_event(p_partition integer, p_payload text, p_source text) RETURNS boolean
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT billing_shard.take_event(p_payload, p_source) AS remote_take_event;
$$;
COMMENT ON FUNCTION router.remote_take_event(integer, text, text) IS
  'PL/Proxy: store an event handed over from another shard in a shard''s inbox.';

CREATE FUNCTION router.remote_unowned_reconciled(p_partition integer, p_limit integer,
                                                 OUT stripe_event_id text, OUT payload text)
  RETURNS SETOF record
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT * FROM billing_shard.unowned_reconciled(p_limit);
$$;
COMMENT ON FUNCTION router.remote_unowned_reconciled(integer, integer) IS
  'PL/Proxy: events a shard''s reconciliation pass found for other shards'' tenants.';

CREATE FUNCTION router.remote_mark_forwarded(p_partition integer, p_event_id text, p_shards text[]) RETURNS void
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT billing_shard.mark_forwarded(p_event_id, p_shards);
$$;
COMMENT ON FUNCTION router.remote_mark_forwarded(integer, text, text[]) IS
  'PL/Proxy: record on the reconciling shard that an event was handed over.';

CREATE FUNCTION router.remote_operator_rows(p_partition integer, p_what text, OUT shard text, OUT row_data json)
  RETURNS SETOF record
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT * FROM billing_shard.operator_rows(p_what);
$$;
COMMENT ON FUNCTION router.remote_operator_rows(integer, text) IS
  'PL/Proxy: one operators'' view on one shard.';

CREATE FUNCTION router.remote_operator_rows_all(p_what text, OUT shard text, OUT row_data json)
  RETURNS SETOF record
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON ALL;
  SELECT * FROM billing_shard.operator_rows(p_what);
$$;
COMMENT ON FUNCTION router.remote_operator_rows_all(text) IS
  'PL/Proxy: one operators'' view on every shard at once (RUN ON ALL); fails when any shard does.';

-- a tenant's audit entries on one registered shard, by its connect string
-- (router.tenant_audit reads every shard, also one that serves no partition)
CREATE FUNCTION router.remote_tenant_audit(p_connstr text, p_tenant_id text, OUT shard text, OUT row_data json)
  RETURNS SETOF record
  LANGUAGE plproxy
AS $$
  CONNECT p_connstr;
  SELECT * FROM billing_shard.operator_rows('tenant_audit', p_tenant_id);
$$;
COMMENT ON FUNCTION router.remote_tenant_audit(text, text) IS
  'PL/Proxy: a tenant''s audit entries and partition moves on one shard, by its connect string.';

-- ---- failures -----------------------------------------------------------

-- Whether a failure of a PL/Proxy call means the shard could not be
-- reached or stopped answering (PL/Proxy's own failures are XX000: cannot
-- connect, connection lost, query_timeout; a shard shutting down or full
-- answers 57P0x, 08xxx or 53xxx).  The shard-side entry points answer SQL
-- errors as values, so anything else is a real error of the call.
CREATE FUNCTION router.is_unavailable(p_state text) RETURNS boolean
  LANGUAGE sql IMMUTABLE
  RETURN p_state = 'XX000' OR p_state LIKE '08%' OR p_state LIKE '57P%' OR p_state LIKE '53%';
COMMENT ON FUNCTION router.is_unavailable(text) IS
  'Whether the SQLSTATE of a failed PL/Proxy call means that the shard is down or unreachable.';

-- PL/Proxy rewrites a remote message as "fn(n): [db] REMOTE ERROR: msg"
-- (and its detail and hint as "Remote detail: ...", "Remote hint: ...").
CREATE FUNCTION router.remote_message(p_message text) RETURNS text
  LANGUAGE sql IMMUTABLE
  RETURN regexp_replace(p_message, '^[A-Za-z0-9_.]+\([0-9]+\): \[[^]]*\] REMOTE (ERROR|FATAL|PANIC): ', '');
COMMENT ON FUNCTION router.remote_message(text) IS
  'A remote error''s message without the prefix PL/Proxy adds.';

-- Raise an error again with its own SQLSTATE, message, detail and hint.
CREATE FUNCTION router.reraise(p_state text, p_message text, p_detail text, p_hint text) RETURNS void
  LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF p_detail IS NOT NULL AND p_hint IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_message, DETAIL = p_detail, HINT = p_hint;
  ELSIF p_detail IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_message, DETAIL = p_detail;
  ELSIF p_hint IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_message, HINT = p_hint;
  ELSE
    RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_message;
  END IF;
END
$$;
COMMENT ON FUNCTION router.reraise(text, text, text, text) IS
  'Raise an error with the given SQLSTATE, message and (when not NULL) detail and hint.';

-- A shard that cannot serve: 503 with Retry-After through PostgREST
-- (SQLSTATE PGRST: the message is the body, the detail the status and
-- headers), the shard named, never its address.  The underlying error goes
-- to the router's log.
CREATE FUNCTION router.shard_unavailable(p_partition integer, p_state text, p_message text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
DECLARE
  v_shard text := router.partition_shard(p_partition);
BEGIN
  RAISE LOG 'qes_billing_router: shard % (partition %) failed: % %', v_shard, p_partition, p_state, p_message;
  RAISE EXCEPTION USING
    ERRCODE = 'PGRST',
    MESSAGE = json_build_object(
      'code', 'QB503',
      'message', format('billing shard %s is not available', v_shard),
      'details', format('The shard that holds partition %s did not answer (%s).', p_partition, p_state),
      'hint', 'The shard is down or unreachable; retry in a few seconds. Tenants on other shards are not affected.')::text,
    DETAIL = '{"status": 503, "headers": {"Retry-After": "5"}}';
END
$$;
COMMENT ON FUNCTION router.shard_unavailable(integer, text, text) IS
  'Answer 503 (Retry-After: 5) naming the shard that is down or unreachable; logs the underlying error.';

-- A failed PL/Proxy call: 503 for a shard that is down, else the remote
-- error again with its SQLSTATE, without PL/Proxy's prefix.
CREATE FUNCTION router.call_failed(p_partition integer, p_state text, p_message text, p_detail text, p_hint text)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
BEGIN
  IF router.is_unavailable(p_state) THEN
    PERFORM router.shard_unavailable(p_partition, p_state, p_message);
  END IF;
  PERFORM router.reraise(p_state, router.remote_message(p_message),
                         nullif(regexp_replace(p_detail, '^Remote detail: ', ''), ''),
                         nullif(regexp_replace(p_hint, '^Remote hint: ', ''), ''));
END
$$;
COMMENT ON FUNCTION router.call_failed(integer, text, text, text, text) IS
  'Turn a failed PL/Proxy call into its answer: 503 for a shard that is down, else the remote error with its SQLSTATE.';

-- ---- the caller ---------------------------------------------------------

-- The role the request runs as, as on one database: the role PostgREST
-- switched to (or SET ROLE), else the login; a login that is none of the
-- four request roles acts as the most capable one it has the privileges of.
CREATE FUNCTION router.caller_role() RETURNS text
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog
AS $$
DECLARE
  v text := coalesce(nullif(current_setting('role'), 'none'), session_user::text);
  r text;
BEGIN
  IF v IN ('qes_anon', 'qes_tenant', 'qes_admin', 'qes_app') THEN
    RETURN v;
  END IF;
  FOREACH r IN ARRAY ARRAY['qes_admin', 'qes_app', 'qes_tenant', 'qes_anon'] LOOP
    IF pg_has_role(v, r, 'USAGE') THEN
      RETURN r;
    END IF;
  END LOOP;
  RAISE EXCEPTION 'role % may not call the billing router', v
    USING ERRCODE = 'insufficient_privilege',
          HINT = 'Call as qes_anon, qes_tenant, qes_admin or qes_app (PostgREST does), or as a role that has their privileges.';
END
$$;
COMMENT ON FUNCTION router.caller_role() IS
  'The request role a routed call runs as on the shard: the role set for the request, or the most capable of the four the login has the privileges of.';
