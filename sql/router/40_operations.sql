-- Operators see one system (docs/scaleout.md, "Operations").  Every view
-- here reads the same view or check on every shard -- in parallel, with
-- PL/Proxy's RUN ON ALL, and when that fails because a shard is down, shard
-- by shard so that the down one shows as down and the others still answer
-- -- and puts the shard's name beside each row.  Totals add these rows up.

CREATE FUNCTION router.shard_rows(p_what text)
  RETURNS TABLE (shard text, up boolean, row_data json)
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  s       record;
  v_state text;
  v_msg   text;
BEGIN
  BEGIN
    RETURN QUERY SELECT r.shard, true, r.row_data FROM router.remote_operator_rows_all(p_what) r;
    RETURN;
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
    IF NOT router.is_unavailable(v_state) THEN
      PERFORM router.call_failed(0, v_state, v_msg, NULL, NULL);
    END IF;
  END;
  FOR s IN SELECT * FROM router.shard_partitions LOOP
    BEGIN
      RETURN QUERY SELECT coalesce(r.shard, s.shard_name), true, r.row_data
                     FROM router.remote_operator_rows(s.partition, p_what) r;
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      IF NOT router.is_unavailable(v_state) THEN
        PERFORM router.call_failed(s.partition, v_state, v_msg, NULL, NULL);
      END IF;
      RAISE LOG 'qes_billing_router: shard % is down: % %', s.shard_name, v_state, v_msg;
      RETURN QUERY SELECT s.shard_name, false, NULL::json;
    END;
  END LOOP;
END
$$;
COMMENT ON FUNCTION router.shard_rows(text) IS
  'The rows of one operators'' view on every shard (RUN ON ALL; shard by shard when a shard is down), each with its shard; a shard that is down gives one row with up = false and no data.';

CREATE VIEW router.shard_status AS
SELECT sp.shard_name, sp.partition, sp.partitions,
       coalesce(h.up, false) AS up,
       (h.row_data ->> 'status') AS health,
       (h.row_data -> 'worker' ->> 'alive')::boolean AS worker_alive,
       (h.row_data ->> 'outbox_backlog')::bigint AS outbox_backlog,
       (h.row_data ->> 'inbox_backlog')::bigint AS inbox_backlog,
       (h.row_data ->> 'webhooks_parked')::bigint AS webhooks_parked
  FROM router.shard_partitions sp
  LEFT JOIN router.shard_rows('health') h ON h.shard = sp.shard_name
 ORDER BY sp.partition;
COMMENT ON VIEW router.shard_status IS
  'Every shard: the partitions it holds, whether it answers (up), its health (ok or unhealthy), its worker and its backlogs.';

CREATE FUNCTION api.health() RETURNS json
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_shards  json;
  v_healthy boolean;
  v         record;
BEGIN
  SELECT bool_and(h.up AND h.row_data ->> 'status' = 'ok') AS healthy,
         bool_and(coalesce((h.row_data -> 'worker' ->> 'alive')::boolean, false)) AS alive,
         max((h.row_data -> 'worker' ->> 'heartbeat_age_seconds')::numeric) AS age,
         min(CASE WHEN h.row_data -> 'worker' ->> 'last_error' IS NOT NULL
                  THEN h.shard || ': ' || (h.row_data -> 'worker' ->> 'last_error') END) AS last_error,
         bool_and(coalesce((h.row_data -> 'stripe' ->> 'configured')::boolean, false)) AS configured,
         min(h.row_data -> 'stripe' ->> 'mode') AS mode,
         min(CASE WHEN h.row_data -> 'stripe' ->> 'problem' IS NOT NULL
                  THEN h.shard || ': ' || (h.row_data -> 'stripe' ->> 'problem') END) AS problem,
         sum((h.row_data ->> 'outbox_backlog')::bigint) AS outbox_backlog,
         sum((h.row_data ->> 'inbox_backlog')::bigint) AS inbox_backlog,
         sum((h.row_data ->> 'webhooks_parked')::bigint) AS webhooks_parked,
         json_agg(json_build_object('shard', h.shard,
                                    'status', CASE WHEN NOT h.up THEN 'down' ELSE h.row_data ->> 'status' END,
                                    'worker_alive', (h.row_data -> 'worker' ->> 'alive')::boolean,
                                    'outbox_backlog', (h.row_data ->> 'outbox_backlog')::bigint,
                                    'inbox_backlog', (h.row_data ->> 'inbox_backlog')::bigint)
                  ORDER BY h.shard) AS shards
    INTO v
    FROM router.shard_rows('health') h;
  v_healthy := coalesce(v.healthy, false);
  IF NOT v_healthy THEN
    PERFORM set_config('response.status', '503', true);
  END IF;
  RETURN json_build_object(
    'status', CASE WHEN v_healthy THEN 'ok' ELSE 'unhealthy' END,
    'database', true,
    'worker', json_build_object('alive', coalesce(v.alive, false), 'heartbeat_age_seconds', v.age,
                                'last_error', v.last_error),
    'stripe', json_build_object('configured', coalesce(v.configured, false), 'mode', v.mode, 'problem', v.problem),
    'outbox_backlog', coalesce(v.outbox_backlog, 0),
    'inbox_backlog', coalesce(v.inbox_backlog, 0),
    'webhooks_parked', coalesce(v.webhooks_parked, 0),
    'shards', coalesce(v.shards, '[]'));
END
$$;
COMMENT ON FUNCTION api.health() IS
  'Health: database, worker heartbeat, Stripe configuration and queue backlogs. HTTP 503 when unhealthy, 200 otherwise.';

-- The operators' views of one database, over all shards, with the shard.
CREATE VIEW router.worker_status AS
SELECT r.shard, r.up, x.*
  FROM router.shard_rows('worker_status') r
  LEFT JOIN LATERAL json_to_record(r.row_data)
       AS x(pid integer, started_at timestamptz, last_loop_at timestamptz, heartbeat_age interval, alive boolean,
            loops bigint, last_error text, last_error_at timestamptz, outbox_pending bigint, outbox_in_flight bigint,
            inbox_pending bigint, inbox_parked bigint) ON true;
COMMENT ON VIEW router.worker_status IS
  'billing.worker_status of every shard (up = false: the shard did not answer).';

CREATE VIEW router.failed_webhooks AS
SELECT r.shard, x.*
  FROM router.shard_rows('failed_webhooks') r
 CROSS JOIN LATERAL json_to_record(r.row_data)
       AS x(stripe_event_id text, event_type text, tenant_id text, attempts integer, last_error text,
            received_at timestamptz, stripe_created timestamptz)
 WHERE r.up;
COMMENT ON VIEW router.failed_webhooks IS
  'Webhook events parked as needs_review on every shard (billing.replay_webhook on the shard puts one back).';

CREATE VIEW router.notification_failures AS
SELECT r.shard, r.row_data AS notification
  FROM router.shard_rows('notification_failures') r
 WHERE r.up;
COMMENT ON VIEW router.notification_failures IS
  'billing.notification_failures of every shard, one JSON row each, with its shard.';

CREATE VIEW router.notification_metrics AS
SELECT r.shard, r.row_data AS metrics
  FROM router.shard_rows('notification_metrics') r
 WHERE r.up;
COMMENT ON VIEW router.notification_metrics IS 'billing.notification_metrics of every shard, with its shard.';

CREATE VIEW router.drift_report AS
SELECT r.shard, r.row_data AS repair
  FROM router.shard_rows('drift_report') r
 WHERE r.up;
COMMENT ON VIEW router.drift_report IS 'billing.drift_report of every shard, one JSON row per repair, with its shard.';

CREATE VIEW router.outbox_metrics AS
SELECT r.shard, r.row_data AS metrics
  FROM router.shard_rows('outbox_metrics') r
 WHERE r.up;
COMMENT ON VIEW router.outbox_metrics IS 'billing.outbox_metrics of every shard, with its shard.';

CREATE VIEW router.webhook_metrics AS
SELECT r.shard, r.row_data AS metrics
  FROM router.shard_rows('webhook_metrics') r
 WHERE r.up;
COMMENT ON VIEW router.webhook_metrics IS 'billing.webhook_metrics of every shard, with its shard.';

-- A tenant's audit history across shards: after a partition move its
-- older entries stay in the old shard's chain (each shard keeps its own),
-- and the newer ones are in the new shard's.  Every registered shard is
-- read, also one that no longer serves any partition (it keeps the
-- entries of the tenants that left it), one after the other.  Each entry
-- comes with its shard and its place in that shard's chain (audit_id,
-- prev_hash, hash: router.audit_verification checks the chains); the moves
-- of the tenant's partition are among them (partition.moved_out on the
-- shard it left, partition.moved_in on the one it reached, both written
-- as the move completes, so the first entries on the new shard can come a
-- moment before its moved_in); a shard that did not answer gives one row
-- with up = false.  In the order of occurred_at (each shard's clock).
-- one shard's part (a shard that cannot be reached: one row, up = false)
CREATE FUNCTION router.tenant_audit_shard(p_shard_name text, p_tenant_id text)
  RETURNS TABLE (shard text, up boolean, row_data json)
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_state text;
  v_msg   text;
BEGIN
  BEGIN
    RETURN QUERY SELECT p_shard_name, true, r.row_data
                   FROM router.remote_tenant_audit(router.shard_login(p_shard_name), p_tenant_id) r;
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
    IF NOT router.is_unavailable(v_state) THEN
      RAISE;
    END IF;
    RAISE LOG 'qes_billing_router: shard % is down: % %', p_shard_name, v_state, v_msg;
    RETURN QUERY SELECT p_shard_name, false, NULL::json;
  END;
END
$$;
COMMENT ON FUNCTION router.tenant_audit_shard(text, text) IS
  'One shard''s part of router.tenant_audit: the tenant''s entries and its partition''s moves there, or one row with up = false when the shard cannot be reached.';

CREATE FUNCTION router.tenant_audit(p_tenant_id text)
  RETURNS TABLE (shard text, up boolean, audit_id bigint, occurred_at timestamptz, action text,
                 tenant_id text, actor_role text, actor_sub text, actor_tenant text, details jsonb,
                 prev_hash text, hash text)
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
BEGIN
  IF p_tenant_id IS NULL OR p_tenant_id = '' THEN
    RAISE EXCEPTION 'router.tenant_audit needs a tenant id' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  -- (each shard's rows as they come: a long history is sorted, not held in one value)
  RETURN QUERY
    SELECT r.shard, r.up, (r.row_data ->> 'audit_id')::bigint, (r.row_data ->> 'occurred_at')::timestamptz,
           r.row_data ->> 'action', r.row_data ->> 'tenant_id', r.row_data ->> 'actor_role',
           r.row_data ->> 'actor_sub', r.row_data ->> 'actor_tenant', (r.row_data -> 'details')::jsonb,
           r.row_data ->> 'prev_hash', r.row_data ->> 'hash'
      FROM router.shards s
     CROSS JOIN LATERAL router.tenant_audit_shard(s.shard_name, p_tenant_id) r
     ORDER BY (r.row_data ->> 'occurred_at')::timestamptz NULLS FIRST, r.shard, (r.row_data ->> 'audit_id')::bigint;
END
$$;
COMMENT ON FUNCTION router.tenant_audit(text) IS
  'A tenant''s audit entries on every registered shard (after a partition move the older ones stay in the old shard''s chain), with the moves of its partition, in the order they happened; each with its shard and its place in that shard''s chain. up = false: a shard that did not answer (its entries are missing).';

CREATE VIEW router.audit_verification AS
SELECT r.shard, r.up, r.row_data AS verification
  FROM router.shard_rows('verify_audit_chain') r;
COMMENT ON VIEW router.audit_verification IS
  'billing.verify_audit_chain() of every shard: each shard keeps its own hash chain (up = false: not checked, the shard did not answer).';
