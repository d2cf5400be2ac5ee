-- Moving a partition to another shard while the platform runs
-- (docs/scaleout.md, "Moving a partition").  Superusers only.
--
--   CALL router.move_partition_online(17, 's4');
--
-- Steps, each committed and recorded in router.partition_moves, so that a
-- move that stops (an error, a lost session, a restart) goes on from where
-- it stopped when the same CALL runs again, or is undone
-- (router.undo_partition_move) until the map has switched:
--
--   started    the target fences the partition (incoming: its worker leaves
--              the rows alone); the source marks it 'copying' (record_usage
--              logs each new key) and, once no transaction that checked
--              before can still write unlogged, sends the usage history to
--              the target in pages while it serves;
--   precopied  what was logged meanwhile is copied in catch-up rounds while
--              the partition serves; then the source fences the partition:
--              its writes are refused
--              (QBMOV, retried by the platform) and the mover waits for the
--              transactions that passed the fence's check before it and for
--              Stripe requests and notifications in flight (the pause begins);
--   fenced     the target's rows of the tenants are cleared and every table
--              is copied, of usage only what was logged since 'copying';
--              both shards must count the same (digests of every table,
--              rows and quantity of usage);
--   copied     the target lifts its fence, the map points at the target, the
--              source marks the partition moved (QBMVD: look it up again)
--              (the pause ends);
--   switched   the usage rows' digests are compared (the source's no longer
--              change; the target's written before the switch), both audit
--              chains record the move, the source deletes the tenants' rows
--              and events it could not apply are handed to the target;
--   done.

CREATE TABLE router.partition_moves (
  move_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  partition    integer NOT NULL CHECK (partition >= 0),
  partitions   integer NOT NULL,
  from_shard   text NOT NULL REFERENCES router.shards,
  to_shard     text NOT NULL REFERENCES router.shards,
  step         text NOT NULL DEFAULT 'started'
                 CHECK (step IN ('started', 'precopied', 'fenced', 'copied', 'switched', 'done', 'undoing', 'undone')),
  untracked    text,
  tenants      text[],
  digest       jsonb,
  copied_rows  jsonb,
  wait         jsonb,
  timings      jsonb NOT NULL DEFAULT '{}',
  started_at   timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
  fenced_at    timestamptz,
  switched_at  timestamptz,
  finished_at  timestamptz,
  last_error   text,
  CHECK (from_shard <> to_shard)
);
COMMENT ON TABLE router.partition_moves IS
  'Partition moves between shards, one row per move, with the step it has reached (docs/scaleout.md, "Moving a partition"); fenced_at .. switched_at is the time the partition''s writes paused; timings: milliseconds per step and, under the fence, per part of the copy.';
CREATE UNIQUE INDEX partition_moves_open ON router.partition_moves (partition) WHERE step NOT IN ('done', 'undone');
SELECT pg_catalog.pg_extension_config_dump('router.partition_moves', '');

CREATE VIEW router.partition_move_pauses AS
  SELECT m.move_id, m.partition, m.from_shard, m.to_shard, m.step,
         round((extract(epoch FROM m.switched_at - m.fenced_at) * 1000)::numeric, 1) AS pause_ms,
         m.started_at, m.finished_at
    FROM router.partition_moves m;
COMMENT ON VIEW router.partition_move_pauses IS
  'Each move''s pause: the milliseconds between fencing the partition on its source and switching the map (the time its writes were refused).';

-- ---- the shards' side, by connect string ---------------------------------

CREATE FUNCTION router.remote_move_tenants(p_connstr text, p_partitions integer, p_partition integer) RETURNS text[]
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_tenants(p_partitions, p_partition); $$;
COMMENT ON FUNCTION router.remote_move_tenants(text, integer, integer) IS 'PL/Proxy: billing_shard.move_tenants on a shard.';

CREATE FUNCTION router.remote_move_fence(p_connstr text, p_move_id bigint, p_partitions integer, p_partition integer,
                                         p_state text, p_direction text, p_peer text) RETURNS void
  LANGUAGE plproxy
AS $$
  CONNECT p_connstr;
  SELECT billing_shard.move_fence(p_move_id, p_partitions, p_partition, p_state, p_direction, p_peer);
$$;
COMMENT ON FUNCTION router.remote_move_fence(text, bigint, integer, integer, text, text, text) IS
  'PL/Proxy: billing_shard.move_fence on a shard.';

CREATE FUNCTION router.remote_move_wait(p_connstr text, p_partitions integer, p_partition integer, p_timeout_ms integer,
                                        p_in_flight boolean)
  RETURNS jsonb
  LANGUAGE plproxy
AS $$ CONNECT p_connstr; SELECT billing_shard.move_wait(p_partitions, p_partition, p_timeout_ms, p_in_flight); $$;
COMMENT ON FUNCTION router.remote_move_wait(text, integer, integer, integer, boolean) IS
  'PL/Proxy: billing_shard.move_wait on a shard.';

CREATE FUNCTION router.remote_move_untracked_writes(p_connstr text) RETURNS text
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_untracked_writes(); $$;
COMMENT ON FUNCTION router.remote_move_untracked_writes(text) IS 'PL/Proxy: billing_shard.move_untracked_writes on a shard.';

CREATE FUNCTION router.remote_move_export(p_connstr text, p_tenants text[], p_table text, p_logged boolean,
                                          p_after text[], p_limit integer) RETURNS text
  LANGUAGE plproxy
AS $$ CONNECT p_connstr; SELECT billing_shard.move_export(p_tenants, p_table, p_logged, p_after, p_limit); $$;
COMMENT ON FUNCTION router.remote_move_export(text, text[], text, boolean, text[], integer) IS
  'PL/Proxy: billing_shard.move_export on a shard.';

CREATE FUNCTION router.remote_move_import(p_connstr text, p_table text, p_rows text, p_merge boolean, p_log text)
  RETURNS integer
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_import(p_table, p_rows, p_merge, p_log); $$;
COMMENT ON FUNCTION router.remote_move_import(text, text, text, boolean, text) IS 'PL/Proxy: billing_shard.move_import on a shard.';

CREATE FUNCTION router.remote_move_usage_count(p_connstr text, p_tenants text[], p_logged boolean) RETURNS jsonb
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_usage_count(p_tenants, p_logged); $$;
COMMENT ON FUNCTION router.remote_move_usage_count(text, text[], boolean) IS 'PL/Proxy: billing_shard.move_usage_count on a shard.';

CREATE FUNCTION router.remote_move_export_catchup(p_connstr text, p_tenants text[], p_limit integer) RETURNS text
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_export_catchup(p_tenants, p_limit); $$;
COMMENT ON FUNCTION router.remote_move_export_catchup(text, text[], integer) IS 'PL/Proxy: billing_shard.move_export_catchup on a shard.';

CREATE FUNCTION router.remote_move_reset_copied(p_connstr text, p_tenants text[]) RETURNS bigint
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_reset_copied(p_tenants); $$;
COMMENT ON FUNCTION router.remote_move_reset_copied(text, text[]) IS 'PL/Proxy: billing_shard.move_reset_copied on a shard.';

CREATE FUNCTION router.remote_move_unmark_moved(p_connstr text, p_partitions integer, p_partition integer) RETURNS bigint
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_unmark_moved(p_partitions, p_partition); $$;
COMMENT ON FUNCTION router.remote_move_unmark_moved(text, integer, integer) IS 'PL/Proxy: billing_shard.move_unmark_moved on a shard.';

CREATE FUNCTION router.remote_move_export_mirror(p_connstr text, p_tenants text[]) RETURNS text
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_export_mirror(p_tenants); $$;
COMMENT ON FUNCTION router.remote_move_export_mirror(text, text[]) IS 'PL/Proxy: billing_shard.move_export_mirror on a shard.';

CREATE FUNCTION router.remote_move_import_mirror(p_connstr text, p_tables text) RETURNS jsonb
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_import_mirror(p_tables); $$;
COMMENT ON FUNCTION router.remote_move_import_mirror(text, text) IS 'PL/Proxy: billing_shard.move_import_mirror on a shard.';

CREATE FUNCTION router.remote_move_clear(p_connstr text, p_tenants text[], p_usage boolean) RETURNS jsonb
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_clear(p_tenants, p_usage); $$;
COMMENT ON FUNCTION router.remote_move_clear(text, text[], boolean) IS 'PL/Proxy: billing_shard.move_clear on a shard.';

CREATE FUNCTION router.remote_move_digest(p_connstr text, p_tenants text[]) RETURNS jsonb
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_digest(p_tenants); $$;
COMMENT ON FUNCTION router.remote_move_digest(text, text[]) IS 'PL/Proxy: billing_shard.move_digest on a shard.';

CREATE FUNCTION router.remote_move_usage_digest(p_connstr text, p_tenants text[], p_arrived boolean) RETURNS jsonb
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_usage_digest(p_tenants, p_arrived); $$;
COMMENT ON FUNCTION router.remote_move_usage_digest(text, text[], boolean) IS
  'PL/Proxy: billing_shard.move_usage_digest on a shard.';

CREATE FUNCTION router.remote_move_forget_log(p_connstr text, p_tenants text[]) RETURNS bigint
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_forget_log(p_tenants); $$;
COMMENT ON FUNCTION router.remote_move_forget_log(text, text[]) IS 'PL/Proxy: billing_shard.move_forget_log on a shard.';

CREATE FUNCTION router.remote_move_audit(p_connstr text, p_action text, p_details jsonb) RETURNS bigint
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.move_audit(p_action, p_details); $$;
COMMENT ON FUNCTION router.remote_move_audit(text, text, jsonb) IS 'PL/Proxy: billing_shard.move_audit on a shard.';

CREATE FUNCTION router.remote_reserve_ids(p_connstr text, p_base bigint) RETURNS integer
  LANGUAGE plproxy AS $$ CONNECT p_connstr; SELECT billing_shard.reserve_ids(p_base); $$;
COMMENT ON FUNCTION router.remote_reserve_ids(text, bigint) IS 'PL/Proxy: billing_shard.reserve_ids on a shard.';

CREATE FUNCTION router.remote_moved_events(p_partition integer, p_limit integer)
  RETURNS TABLE (stripe_event_id text, payload text)
  LANGUAGE plproxy
AS $$ CLUSTER 'qes_billing'; RUN ON p_partition; SELECT * FROM billing_shard.moved_events(p_limit); $$;
COMMENT ON FUNCTION router.remote_moved_events(integer, integer) IS 'PL/Proxy: billing_shard.moved_events on a partition''s shard.';

-- A shard's connect string with the user mapping's credentials.
CREATE FUNCTION router.shard_login(p_shard_name text) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog, router
  RETURN router.login_connstr((SELECT s.connstr FROM router.shards s WHERE s.shard_name = p_shard_name));
COMMENT ON FUNCTION router.shard_login(text) IS
  'A registered shard''s connect string with the credentials of server qes_billing''s user mapping.';

-- ---- the steps -------------------------------------------------------------

CREATE FUNCTION router.move_wait_ms() RETURNS integer
  LANGUAGE sql STABLE SET search_path = pg_catalog
  RETURN coalesce(nullif(current_setting('qes_billing_router.move_wait_ms', true), '')::integer, 30000);
COMMENT ON FUNCTION router.move_wait_ms() IS
  'How long a move waits for the transactions and the Stripe requests in flight of a partition it fenced (qes_billing_router.move_wait_ms, default 30 s).';

CREATE FUNCTION router.ms_since(p_at timestamptz) RETURNS numeric
  LANGUAGE sql VOLATILE SET search_path = pg_catalog
  RETURN round((extract(epoch FROM clock_timestamp() - p_at) * 1000)::numeric, 1);
COMMENT ON FUNCTION router.ms_since(timestamptz) IS 'Milliseconds since a time, to a tenth.';

-- Copy one table (usage_events in pages) from one shard to another;
-- returns the rows stored.
CREATE FUNCTION router.move_copy_table(p_from text, p_to text, p_tenants text[], p_table text, p_logged boolean,
                                       p_merge boolean) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
DECLARE
  v_rows  text;
  v_after text[];
  v_last  jsonb;
  v_n     bigint := 0;
BEGIN
  LOOP
    v_rows := router.remote_move_export(p_from, p_tenants, p_table, p_logged, v_after, 5000);
    EXIT WHEN v_rows = '[]';
    v_n := v_n + router.remote_move_import(p_to, p_table, v_rows, p_merge,
                                           CASE WHEN p_table <> 'usage_events' THEN NULL
                                                WHEN p_logged THEN 'written' ELSE 'history' END);
    EXIT WHEN p_table <> 'usage_events';
    v_last := v_rows::jsonb -> -1;
    v_after := ARRAY[v_last ->> 'tenant_id', v_last ->> 'idempotency_key'];
  END LOOP;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION router.move_copy_table(text, text, text[], text, boolean, boolean) IS
  'A partition move''s copy of one table from one shard to another (usage_events in pages of 5,000: what was logged while copying (logged there too), the rest, or all); the rows stored.';

CREATE FUNCTION router.move_step(p_move_id bigint) RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
DECLARE
  m        router.partition_moves;
  v_src    text;
  v_dst    text;
  v_copied jsonb := '{}';
  v_ds     jsonb;
  v_dt     jsonb;
  v_start  timestamptz := clock_timestamp();
  v_rows   text;
  v_at     timestamptz := clock_timestamp();
  v_ms     jsonb := '{}';
BEGIN
  SELECT * INTO m FROM router.partition_moves WHERE move_id = p_move_id FOR UPDATE;
  v_src := router.shard_login(m.from_shard);
  v_dst := router.shard_login(m.to_shard);
  CASE m.step
  WHEN 'started' THEN
    -- usage written by hand from now on is not logged: counted instead
    m.untracked := router.remote_move_untracked_writes(v_src);
    PERFORM router.remote_move_fence(v_dst, m.move_id, m.partitions, m.partition, 'moving', 'in', m.from_shard);
    PERFORM router.remote_move_fence(v_src, m.move_id, m.partitions, m.partition, 'copying', 'out', m.to_shard);
    -- from here every new usage row of the partition is logged on the source
    PERFORM router.remote_move_wait(v_src, m.partitions, m.partition, router.move_wait_ms(), false);
    m.tenants := router.remote_move_tenants(v_src, m.partitions, m.partition);
    -- the history: what was not logged (a step run again starts over)
    PERFORM router.remote_move_clear(v_dst, coalesce(router.remote_move_tenants(v_dst, m.partitions, m.partition), '{}')
                                            || m.tenants, true);
    v_copied := jsonb_build_object('usage_events_history',
                  router.move_copy_table(v_src, v_dst, m.tenants, 'usage_events', false, true));
    v_ds := router.remote_move_usage_count(v_src, m.tenants, false);
    v_dt := router.remote_move_usage_count(v_dst, m.tenants, NULL);
    IF v_ds IS DISTINCT FROM v_dt THEN
      RAISE EXCEPTION 'the usage history of partition % copied to shard % differs from shard %', m.partition, m.to_shard, m.from_shard
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = format('source %s, target %s', v_ds, v_dt),
              HINT = 'Usage rows changed on the source while they were copied (not by record_usage). Run the move again.';
    END IF;
    UPDATE router.partition_moves
       SET step = 'precopied', tenants = m.tenants, copied_rows = v_copied, last_error = NULL, untracked = m.untracked,
           digest = jsonb_build_object('usage_history', v_ds)
     WHERE move_id = m.move_id;
  WHEN 'precopied' THEN
    -- catch up with what was written while the history was copied, still
    -- serving, so that the copy under the fence is short (what an earlier
    -- run of this step marked copied is due again: it may not have arrived)
    PERFORM router.remote_move_reset_copied(v_src, m.tenants);
    FOR i IN 1 .. 20 LOOP
      v_rows := router.remote_move_export_catchup(v_src, m.tenants, 5000);
      EXIT WHEN v_rows = '[]';
      PERFORM router.remote_move_import(v_dst, 'usage_events', v_rows, true, 'written');
    END LOOP;
    PERFORM router.remote_move_fence(v_src, m.move_id, m.partitions, m.partition, 'moving', 'out', m.to_shard);
    UPDATE router.partition_moves SET fenced_at = coalesce(fenced_at, clock_timestamp()) WHERE move_id = m.move_id;
    UPDATE router.partition_moves
       SET step = 'fenced', last_error = NULL,
           wait = router.remote_move_wait(v_src, m.partitions, m.partition, router.move_wait_ms(), true)
     WHERE move_id = m.move_id;
  WHEN 'fenced' THEN
    -- under the fence no tenant of the partition appears or changes on the source
    m.tenants := router.remote_move_tenants(v_src, m.partitions, m.partition);
    PERFORM router.remote_move_clear(v_dst, m.tenants, false);
    v_ms := v_ms || jsonb_build_object('clear', router.ms_since(v_at)); v_at := clock_timestamp();
    v_copied := v_copied || router.remote_move_import_mirror(v_dst, router.remote_move_export_mirror(v_src, m.tenants));
    v_ms := v_ms || jsonb_build_object('tables', router.ms_since(v_at)); v_at := clock_timestamp();
    v_copied := v_copied || jsonb_build_object('usage_events_logged',
                  router.move_copy_table(v_src, v_dst, m.tenants, 'usage_events', true, true));
    v_ms := v_ms || jsonb_build_object('usage_logged', router.ms_since(v_at)); v_at := clock_timestamp();
    v_ds := router.remote_move_digest(v_src, m.tenants);
    v_dt := router.remote_move_digest(v_dst, m.tenants);
    -- usage: what was logged since the history was copied, on both
    v_ds := v_ds || jsonb_build_object('usage_logged', router.remote_move_usage_count(v_src, m.tenants, true));
    v_dt := v_dt || jsonb_build_object('usage_logged', router.remote_move_usage_count(v_dst, m.tenants, true));
    v_ms := v_ms || jsonb_build_object('digests', router.ms_since(v_at)); v_at := clock_timestamp();
    IF v_ds -> 'usage_logged' IS DISTINCT FROM v_dt -> 'usage_logged'
       OR router.remote_move_untracked_writes(v_src) IS DISTINCT FROM m.untracked THEN
      -- usage changed on the source in a way the log does not show (a
      -- DBA's insert or delete, or the source restarted): all of the
      -- tenants' usage again, whole
      PERFORM router.remote_move_clear(v_dst, m.tenants, true);
      PERFORM router.remote_move_import_mirror(v_dst, router.remote_move_export_mirror(v_src, m.tenants));
      v_copied := v_copied || jsonb_build_object('usage_events_again',
                    router.move_copy_table(v_src, v_dst, m.tenants, 'usage_events', NULL, true));
      v_ds := v_ds || jsonb_build_object('usage_logged', router.remote_move_usage_count(v_src, m.tenants, NULL));
      v_dt := router.remote_move_digest(v_dst, m.tenants)
              || jsonb_build_object('usage_logged', router.remote_move_usage_count(v_dst, m.tenants, NULL));
    END IF;
    IF v_ds IS DISTINCT FROM v_dt THEN
      RAISE EXCEPTION 'partition % copied to shard % differs from shard %', m.partition, m.to_shard, m.from_shard
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = format('source %s, target %s', v_ds, v_dt),
              HINT = 'Nothing was switched. Run the move again (it copies again) or undo it with CALL router.undo_partition_move.';
    END IF;
    v_ds := (m.digest || v_ds) - 'usage_logged' || jsonb_build_object('usage_since_history', v_ds -> 'usage_logged');
    UPDATE router.partition_moves
       SET step = 'copied', tenants = m.tenants, digest = v_ds,
           copied_rows = coalesce(copied_rows, '{}') || v_copied, last_error = NULL,
           timings = timings || jsonb_build_object('fenced', v_ms)
     WHERE move_id = m.move_id;
  WHEN 'copied' THEN
    -- the source refuses for good, then the map points at the target (the
    -- target lifts its fence in the next step, once both are committed)
    PERFORM router.remote_move_fence(v_src, m.move_id, m.partitions, m.partition, 'moved', 'out', m.to_shard);
    PERFORM router.move_partition(m.partition, m.to_shard);
    UPDATE router.partition_moves SET step = 'switched', last_error = NULL WHERE move_id = m.move_id;
  WHEN 'switched' THEN
    PERFORM router.remote_move_fence(v_dst, m.move_id, m.partitions, m.partition, NULL, NULL, NULL);
    UPDATE router.partition_moves SET switched_at = coalesce(switched_at, clock_timestamp()) WHERE move_id = m.move_id;
    -- the usage rows, row by row: the source's (no longer written) against
    -- what arrived on the target; then both audit chains
    v_ds := router.remote_move_usage_digest(v_src, m.tenants, false);
    v_dt := router.remote_move_usage_digest(v_dst, m.tenants, true);
    IF (v_ds ->> 'rows')::bigint = 0 AND (v_dt ->> 'rows')::bigint > 0
       AND cardinality(router.remote_move_tenants(v_src, m.partitions, m.partition)) = 0 THEN
      v_ds := v_dt;    -- this step ran before and cleared the source: what arrived stands
    END IF;
    IF v_ds IS DISTINCT FROM v_dt THEN
      RAISE EXCEPTION 'the usage rows of partition % on shard % differ from shard %''s', m.partition, m.to_shard, m.from_shard
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = format('source %s, target %s', v_ds, v_dt),
              HINT = 'The partition is served by the target already; the source keeps its rows until this is resolved. Compare the tenants'' usage_events on both shards.';
    END IF;
    m.digest := m.digest || jsonb_build_object('usage_events', v_ds);
    UPDATE router.partition_moves SET digest = m.digest WHERE move_id = m.move_id;
    PERFORM router.remote_move_audit(v_src, 'partition.moved_out',
              jsonb_build_object('move_id', m.move_id, 'partition', m.partition, 'partitions', m.partitions,
                                 'to_shard', m.to_shard, 'tenants', cardinality(m.tenants), 'rows', m.digest));
    PERFORM router.remote_move_audit(v_dst, 'partition.moved_in',
              jsonb_build_object('move_id', m.move_id, 'partition', m.partition, 'partitions', m.partitions,
                                 'from_shard', m.from_shard, 'tenants', cardinality(m.tenants), 'rows', m.digest));
    PERFORM router.remote_move_clear(v_src, m.tenants, true);
    PERFORM router.remote_move_forget_log(v_dst, m.tenants);
    -- events the source could not apply (or received after the copy) go to the target
    PERFORM router.forward_moved_events();
    UPDATE router.partition_moves SET step = 'done', finished_at = clock_timestamp(), last_error = NULL
     WHERE move_id = m.move_id;
  ELSE
    RETURN m.step;
  END CASE;
  UPDATE router.partition_moves
     SET timings = timings || jsonb_build_object(m.step || '_ms', router.ms_since(v_start))
   WHERE move_id = m.move_id;
  RETURN (SELECT step FROM router.partition_moves WHERE move_id = m.move_id);
END
$$;
COMMENT ON FUNCTION router.move_step(bigint) IS
  'Take a partition move one step further (see router.move_partition_online); returns the step reached.';

-- Record why a step failed, in its own transaction's row (the step's own
-- changes were rolled back).
CREATE FUNCTION router.move_failed(p_move_id bigint, p_error text) RETURNS void
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, router
AS $$
  UPDATE router.partition_moves SET last_error = p_error WHERE move_id = p_move_id
$$;
COMMENT ON FUNCTION router.move_failed(bigint, text) IS 'Record the error that stopped a partition move.';

-- Begin a move or go on with the open one.  A procedure, so that each step
-- commits (no SET clause: that would forbid COMMIT; names are qualified).
CREATE PROCEDURE router.move_partition_online(p_partition integer, p_to_shard text)
  LANGUAGE plpgsql
AS $$
DECLARE
  m        router.partition_moves;
  v_from   text;
  v_step   text;
  v_stop   text := nullif(pg_catalog.current_setting('qes_billing_router.move_stop_after', true), '');
  v_err    text;
  v_detail text;
BEGIN
  SELECT * INTO m FROM router.partition_moves x
   WHERE x.partition = p_partition AND x.step OPERATOR(pg_catalog.<>) ALL (ARRAY['done', 'undone']);
  IF NOT FOUND THEN
    IF NOT EXISTS (SELECT FROM router.shards s WHERE s.shard_name = p_to_shard) THEN
      RAISE EXCEPTION 'unknown shard: %', coalesce(pg_catalog.quote_literal(p_to_shard), 'NULL')
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Register it with router.add_shard first.';
    END IF;
    IF p_partition IS NULL OR p_partition < 0 OR p_partition >= router.partition_count() THEN
      RAISE EXCEPTION 'no partition %', coalesce(p_partition::text, 'NULL')
        USING ERRCODE = 'invalid_parameter_value',
              HINT = pg_catalog.format('Partitions are 0 to %s.', router.partition_count() - 1);
    END IF;
    v_from := router.partition_shard(p_partition);
    IF v_from IS NOT DISTINCT FROM p_to_shard THEN
      RAISE NOTICE 'partition % is on shard % already', p_partition, p_to_shard;
      RETURN;
    END IF;
    INSERT INTO router.partition_moves (partition, partitions, from_shard, to_shard)
    VALUES (p_partition, router.partition_count(), v_from, p_to_shard)
    RETURNING * INTO m;
    COMMIT;
  ELSIF m.to_shard IS DISTINCT FROM p_to_shard THEN
    RAISE EXCEPTION 'partition % is being moved to shard % already', p_partition, m.to_shard
      USING ERRCODE = 'object_in_use',
            HINT = pg_catalog.format('Go on with it: CALL router.move_partition_online(%s, %L), or undo it: CALL router.undo_partition_move(%s).',
                                     p_partition, m.to_shard, m.move_id);
  END IF;
  IF m.step = 'undoing' THEN
    RAISE EXCEPTION 'partition move % is being undone', m.move_id
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = pg_catalog.format('Finish the undo: CALL router.undo_partition_move(%s).', m.move_id);
  END IF;
  v_step := m.step;
  WHILE v_step OPERATOR(pg_catalog.<>) ALL (ARRAY['done', 'undone']) LOOP
    v_err := NULL;
    BEGIN
      v_step := router.move_step(m.move_id);
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
    END;
    IF v_err IS NOT NULL THEN
      -- (no COMMIT inside a block with an exception handler)
      PERFORM router.move_failed(m.move_id, v_err || coalesce(E'\n' || nullif(v_detail, ''), ''));
      COMMIT;
      RAISE EXCEPTION 'moving partition % to shard % stopped at step %: %', p_partition, p_to_shard, v_step, v_err
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = pg_catalog.format('Run CALL router.move_partition_online(%s, %L) again to go on, or undo it: CALL router.undo_partition_move(%s) (possible until the map switched).',
                                       p_partition, p_to_shard, m.move_id);
    END IF;
    COMMIT;
    IF v_step = 'undoing' THEN
      RAISE EXCEPTION 'partition move % is being undone', m.move_id
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = pg_catalog.format('Finish the undo: CALL router.undo_partition_move(%s).', m.move_id);
    END IF;
    EXIT WHEN v_step = v_stop;
  END LOOP;
END
$$;
COMMENT ON PROCEDURE router.move_partition_online(integer, text) IS
  'Move a partition''s tenants and all their rows to another shard while the platform runs (writes for the partition pause between fence and switch), or go on with the partition''s open move. Each step commits; run it again after an interruption.';

-- Undo a move that has not switched the map: the target's copies are
-- deleted, both fences lifted; the partition stays where it was.  A
-- procedure: 'undoing' is committed first, so that a move half undone is
-- never resumed (only undone again).
CREATE PROCEDURE router.undo_partition_move(p_move_id bigint)
  LANGUAGE plpgsql
AS $$
DECLARE
  m     router.partition_moves;
  v_src text;
  v_dst text;
BEGIN
  SELECT * INTO m FROM router.partition_moves x WHERE x.move_id = p_move_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no partition move %', coalesce(p_move_id::text, 'NULL') USING ERRCODE = 'no_data_found';
  END IF;
  IF m.step = 'undone' THEN
    RETURN;
  END IF;
  IF m.step IN ('switched', 'done') OR router.partition_shard(m.partition) IS NOT DISTINCT FROM m.to_shard THEN
    RAISE EXCEPTION 'partition move % has switched the map already', p_move_id
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = pg_catalog.format('Finish it (CALL router.move_partition_online(%s, %L)), then move the partition back the same way.',
                                     m.partition, m.to_shard);
  END IF;
  UPDATE router.partition_moves x SET step = 'undoing' WHERE x.move_id = p_move_id;
  COMMIT;
  v_src := router.shard_login(m.from_shard);
  v_dst := router.shard_login(m.to_shard);
  -- the target's copies go (under its fence, set again in case the move
  -- stopped before it was), then the target's fence, then the source's
  PERFORM router.remote_move_fence(v_dst, m.move_id, m.partitions, m.partition, 'moving', 'in', m.from_shard);
  PERFORM router.remote_move_clear(v_dst, coalesce(router.remote_move_tenants(v_dst, m.partitions, m.partition), '{}')
                                          || coalesce(m.tenants, '{}'), true);
  PERFORM router.remote_move_fence(v_dst, m.move_id, m.partitions, m.partition, NULL, NULL, NULL);
  PERFORM router.remote_move_fence(v_src, m.move_id, m.partitions, m.partition, NULL, NULL, NULL);
  PERFORM router.remote_move_unmark_moved(v_src, m.partitions, m.partition);
  UPDATE router.partition_moves x SET step = 'undone', finished_at = pg_catalog.clock_timestamp() WHERE x.move_id = p_move_id;
  COMMIT;
END
$$;
COMMENT ON PROCEDURE router.undo_partition_move(bigint) IS
  'Undo a partition move that has not switched the map yet: delete what the target received, lift both fences. Run it again if it stops.';

-- Whether a partition (or a tenant hash) is between fence and switch: its
-- webhooks are answered 503 then (Stripe delivers them again).
CREATE FUNCTION router.partition_moving(p_hash integer) RETURNS boolean
  LANGUAGE sql STABLE SET search_path = pg_catalog, router
  RETURN EXISTS (SELECT FROM router.partition_moves m
                  WHERE m.partition = p_hash & (m.partitions - 1) AND m.step IN ('precopied', 'fenced', 'copied', 'undoing'));
COMMENT ON FUNCTION router.partition_moving(integer) IS
  'Whether the partition of a tenant hash is being moved (from its fence to the switch of the map).';

-- Events a shard could not apply because their tenant moved away: hand
-- each to the shard that owns it now (once), as reconcile_forward does.
CREATE FUNCTION router.forward_moved_events(p_limit integer DEFAULT 1000) RETURNS integer
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
  RETURN router.hand_over_events(true, p_limit);
COMMENT ON FUNCTION router.forward_moved_events(integer) IS
  'Hand the events a shard could not apply because their tenant''s partition moved away to the shard that owns it now (once per event); returns how many were handed over.';

-- A write refused by a fence, through the API: 503 with Retry-After, as
-- for a shard that is down, naming the move.
CREATE FUNCTION router.partition_moving_answer(p_partition integer, p_message text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
BEGIN
  RAISE EXCEPTION USING
    ERRCODE = 'PGRST',
    MESSAGE = json_build_object(
      'code', 'QB503',
      'message', 'this tenant''s billing data is being moved to another shard',
      'details', p_message,
      'hint', 'Retry in a second; the move pauses this tenant''s writes for a few seconds at most.')::text,
    DETAIL = '{"status": 503, "headers": {"Retry-After": "1"}}';
END
$$;
COMMENT ON FUNCTION router.partition_moving_answer(integer, text) IS
  'Answer 503 (Retry-After: 1) for a write refused because the tenant''s partition is being moved.';
