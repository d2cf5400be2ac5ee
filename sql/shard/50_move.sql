-- Moving a partition between shards (docs/scaleout.md, "Moving a
-- partition").  The router's mover (router.move_partition_online) calls
-- these on the shard the partition leaves (the source) and on the shard it
-- goes to (the target); each call is one autocommitted statement.  The
-- partition's rows are found by its tenants (billing.tenants), and every
-- tenant-owned table leads with tenant_id, so each is read by its index.

-- The tables a partition's rows live in, in the order their references
-- need (a row before the rows that name it), with the columns their rows
-- are ordered by.  usage_events is copied in pages; the audit log is the
-- shard's chain and stays (both chains record the move).
CREATE FUNCTION billing_shard.move_tables()
  RETURNS TABLE (ord integer, table_name text, key_columns text)
  LANGUAGE sql IMMUTABLE SET search_path = pg_catalog
AS $$
  SELECT * FROM (VALUES
    (1, 'tenants', 'tenant_id'),
    (2, 'billing_details', 'tenant_id'),
    (3, 'stripe_customers', 'tenant_id, stripe_customer_id'),
    (4, 'subscriptions', 'tenant_id, subscription_id'),
    (5, 'invoices', 'tenant_id, stripe_invoice_id'),
    (6, 'invoice_taxes', 'tenant_id, stripe_invoice_id'),
    (7, 'invoice_lines', 'tenant_id, stripe_invoice_id, line_id'),
    (8, 'invoice_failures', 'tenant_id, stripe_invoice_id'),
    (9, 'payments', 'tenant_id, payment_id'),
    (10, 'invoice_payments', 'tenant_id, stripe_payment_intent_id, stripe_invoice_id'),
    (11, 'payment_taxes', 'tenant_id, payment_id'),
    (12, 'disputes', 'tenant_id, stripe_dispute_id'),
    (13, 'dispute_responses', 'tenant_id, stripe_dispute_id'),
    (14, 'notifications', 'tenant_id, notification_id'),
    (15, 'stripe_requests', 'request_id'),
    (16, 'webhook_events', 'stripe_event_id'),
    (17, 'webhook_waits', 'stripe_id, stripe_event_id'),
    (18, 'reconcile_runs', 'run_id'),
    (19, 'drift_repairs', 'tenant_id, repair_id'),
    (20, 'meter_events', 'tenant_id, meter_event_id'),
    (21, 'meter_event_usage', 'tenant_id, idempotency_key'),
    (22, 'usage_events', 'tenant_id, idempotency_key')) AS x (ord, table_name, key_columns)
$$;
COMMENT ON FUNCTION billing_shard.move_tables() IS
  'The tables a partition move copies, in the order references need, with the columns their rows are ordered by.';

-- Which rows of a table are the tenants' ($1: their ids).  Inbox events are
-- the tenants' once applied (tenant_id), or, while still to be applied,
-- when the event names one of them (metadata or customer).
CREATE FUNCTION billing_shard.move_where(p_table text) RETURNS text
  LANGUAGE sql IMMUTABLE SET search_path = pg_catalog
  RETURN CASE p_table
    WHEN 'webhook_events' THEN
      '(t.tenant_id = ANY ($1) OR (t.tenant_id IS NULL AND t.state = ''received''
        AND billing.event_tenant(t.payload::jsonb -> ''data'' -> ''object'') = ANY ($1)))'
    WHEN 'webhook_waits' THEN
      't.stripe_event_id IN (SELECT e.stripe_event_id FROM billing.webhook_events e WHERE e.tenant_id = ANY ($1)
                             OR (e.tenant_id IS NULL AND e.state = ''received''
                                 AND billing.event_tenant(e.payload::jsonb -> ''data'' -> ''object'') = ANY ($1)))'
    ELSE 't.tenant_id = ANY ($1)' END;
COMMENT ON FUNCTION billing_shard.move_where(text) IS
  'The condition that picks a table''s rows of the tenants given as $1.';

CREATE FUNCTION billing_shard.move_check_table(p_table text) RETURNS text
  LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog
AS $$
BEGIN
  IF NOT EXISTS (SELECT FROM billing_shard.move_tables() m WHERE m.table_name = p_table) THEN
    RAISE EXCEPTION 'a partition move does not copy table %', coalesce(quote_literal(p_table), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'The tables are listed by billing_shard.move_tables().';
  END IF;
  RETURN (SELECT m.key_columns FROM billing_shard.move_tables() m WHERE m.table_name = p_table);
END
$$;
COMMENT ON FUNCTION billing_shard.move_check_table(text) IS
  'The key columns of a table a partition move copies; raises for any other table.';

-- The partition's tenants on this shard.
CREATE FUNCTION billing_shard.move_tenants(p_partitions integer, p_partition integer) RETURNS text[]
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(array_agg(t.tenant_id ORDER BY t.tenant_id), '{}')
    FROM billing.tenants t
   WHERE billing.tenant_partition(t.tenant_id, p_partitions) = p_partition
$$;
COMMENT ON FUNCTION billing_shard.move_tenants(integer, integer) IS
  'The tenants of a partition on this shard.';

-- Moves write only the rows of partitions fenced here for a move: what the
-- router's login may import or delete is bounded by fences, and every
-- fence is in the audit chain.  p_fences: which fences allow it
-- ('moving in', 'moved out', ...).
CREATE FUNCTION billing_shard.move_require_fence(p_tenants text[], p_fences text[]) RETURNS void
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_bad text;
BEGIN
  SELECT coalesce(t, '(none)') INTO v_bad
    FROM unnest(p_tenants) t
   WHERE t IS NULL
      OR NOT EXISTS (SELECT FROM billing.partition_fences f
                      WHERE f.partition = billing.tenant_partition(t, f.partition_count)
                        AND f.state || ' ' || f.direction = ANY (p_fences))
   LIMIT 1;
  IF v_bad IS NOT NULL THEN
    RAISE EXCEPTION 'tenant % is not in a partition fenced here for a move', quote_literal(v_bad)
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = format('Needed: a fence %s.', array_to_string(p_fences, ' or ')),
            HINT = 'Rows are copied and removed only by router.move_partition_online, under its fences.';
  END IF;
END
$$;
COMMENT ON FUNCTION billing_shard.move_require_fence(text[], text[]) IS
  'Raise unless every tenant given is in a partition fenced here in one of the given ways (e.g. ''moving in'').';

-- Fence a partition here, or lift its fence (p_state NULL).  In force at
-- once (billing.partition_fences' trigger).  Lifting a fence wakes the
-- worker: what the partition brought may be due.
CREATE FUNCTION billing_shard.move_fence(p_move_id bigint, p_partitions integer, p_partition integer,
                                         p_state text, p_direction text, p_peer text) RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_dir text;
BEGIN
  -- one change of the fences at a time: each installs the table as its
  -- transaction sees it (src/fence.c)
  LOCK TABLE billing.partition_fences IN SHARE ROW EXCLUSIVE MODE;
  IF p_state IS NULL THEN
    DELETE FROM billing.partition_fences WHERE partition_count = p_partitions AND partition = p_partition
    RETURNING direction INTO v_dir;
    IF v_dir = 'out' THEN
      -- the source's keys logged while it was copied are of no more use
      -- (the target keeps what arrived until the move has compared it)
      DELETE FROM billing.partition_move_log l WHERE billing.tenant_partition(l.tenant_id, p_partitions) = p_partition;
    END IF;
    IF v_dir IS NOT NULL THEN
      PERFORM billing.audit('partition.fence', NULL,
                            jsonb_build_object('move_id', p_move_id, 'partition', p_partition,
                                               'partitions', p_partitions, 'state', 'lifted'));
    END IF;
    UPDATE billing.stripe_requests SET state = state WHERE false;    -- wakes the worker at commit
    UPDATE billing.webhook_events SET state = state WHERE false;
    RETURN;
  END IF;
  -- one partition count per shard: fences of another count are stale
  DELETE FROM billing.partition_fences WHERE partition_count <> p_partitions;
  IF p_state = 'moved' THEN
    DELETE FROM billing.partition_move_log l WHERE billing.tenant_partition(l.tenant_id, p_partitions) = p_partition;
  END IF;
  INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
  VALUES (p_partitions, p_partition, p_state, p_direction, p_move_id, p_peer)
  ON CONFLICT (partition_count, partition) DO UPDATE
    SET state = EXCLUDED.state, direction = EXCLUDED.direction, move_id = EXCLUDED.move_id,
        peer_shard = EXCLUDED.peer_shard, set_at = now();
  PERFORM billing.audit('partition.fence', NULL,
                        jsonb_build_object('move_id', p_move_id, 'partition', p_partition, 'partitions', p_partitions,
                                           'state', p_state, 'direction', p_direction, 'peer_shard', p_peer));
END
$$;
COMMENT ON FUNCTION billing_shard.move_fence(bigint, integer, integer, text, text, text) IS
  'Fence a partition on this shard (copying: log new usage; moving, in or out; moved) or lift its fence (state NULL).';

-- After a fence changed: wait until no transaction that passed a check
-- before it can still commit (after 'copying': until every new usage row
-- of the partition is logged), and, p_in_flight, until the partition's
-- Stripe requests and notifications in flight have been answered and
-- recorded.
CREATE FUNCTION billing_shard.move_wait(p_partitions integer, p_partition integer, p_timeout_ms integer,
                                        p_in_flight boolean)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_start    timestamptz := clock_timestamp();
  v_deadline timestamptz := clock_timestamp() + make_interval(secs => p_timeout_ms / 1000.0);
  v_tenants  text[] := billing_shard.move_tenants(p_partitions, p_partition);
  v_xacts    integer;
  v_polls    integer := 0;
BEGIN
  PERFORM set_config('lock_timeout', p_timeout_ms || 'ms', true);
  v_xacts := billing.partition_fence_wait();
  WHILE p_in_flight
        AND (EXISTS (SELECT FROM billing.stripe_requests r WHERE r.tenant_id = ANY (v_tenants) AND r.state = 'in_flight')
             OR EXISTS (SELECT FROM billing.notifications n WHERE n.tenant_id = ANY (v_tenants) AND n.state = 'in_flight')) LOOP
    IF clock_timestamp() > v_deadline THEN
      RAISE EXCEPTION 'partition % still has Stripe requests or notifications in flight after % ms', p_partition, p_timeout_ms
        USING ERRCODE = 'lock_not_available',
              HINT = 'Resume the move later (router.move_partition_online again) or undo it (router.undo_partition_move).';
    END IF;
    v_polls := v_polls + 1;
    PERFORM pg_sleep(0.01);
  END LOOP;
  RETURN jsonb_build_object('transactions', v_xacts, 'polls', v_polls,
                            'ms', round(extract(epoch FROM clock_timestamp() - v_start) * 1000, 1));
END
$$;
COMMENT ON FUNCTION billing_shard.move_wait(integer, integer, integer, boolean) IS
  'Wait, after a fence changed, for the transactions that checked the partition''s fence before (and, p_in_flight, for its Stripe requests and notifications in flight).';

CREATE FUNCTION billing_shard.move_untracked_writes() RETURNS text
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog
  -- with the server's start: the count restarts at 0 with it
  RETURN pg_postmaster_start_time()::text || ' ' || billing.partition_untracked_writes();
COMMENT ON FUNCTION billing_shard.move_untracked_writes() IS
  'billing.partition_untracked_writes() for the router: usage written otherwise than by record_usage while partitions were fenced or copied.';

-- One page of a table's rows of the tenants, as a JSON array in key order.
-- usage_events is read in pages of p_limit after p_after (the last key of
-- the previous page): p_logged true, only the usage logged while the
-- partition was being copied (billing.partition_move_log), which the copy
-- under the fence takes; false, the history (what was not logged); NULL,
-- all of it.
CREATE FUNCTION billing_shard.move_export(p_tenants text[], p_table text, p_logged boolean, p_after text[],
                                          p_limit integer)
  RETURNS text
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing SET TimeZone = 'UTC'
AS $$
DECLARE
  v_key text := billing_shard.move_check_table(p_table);
  v     text;
BEGIN
  IF p_table <> 'usage_events' THEN
    EXECUTE format('SELECT coalesce(json_agg(row_to_json(t) ORDER BY %s), ''[]'')::text FROM billing.%I t WHERE %s',
                   v_key, p_table, billing_shard.move_where(p_table))
      INTO v USING p_tenants;
    RETURN v;
  END IF;
  -- tenant by tenant, each an index range scan in key order (a plan that
  -- walked the whole table in key order to fill the page would read every
  -- tenant's history)
  SELECT coalesce(json_agg(row_to_json(x) ORDER BY x.tenant_id, x.idempotency_key), '[]')::text INTO v
    FROM (SELECT r.*
            FROM unnest(p_tenants) AS tt (tenant)
           CROSS JOIN LATERAL (
                 SELECT u.*
                   FROM billing.usage_events u
                  WHERE NOT coalesce(p_logged, false) AND u.tenant_id = tt.tenant
                    AND (p_after IS NULL OR tt.tenant > p_after[1] OR u.idempotency_key > p_after[2])
                    -- the history (p_logged false): what no one logged
                    AND (p_logged IS NULL
                         OR NOT EXISTS (SELECT FROM billing.partition_move_log k
                                         WHERE k.tenant_id = u.tenant_id AND k.idempotency_key = u.idempotency_key))
                  UNION ALL
                 SELECT u.*
                   FROM billing.partition_move_log l
                   JOIN billing.usage_events u ON u.tenant_id = l.tenant_id AND u.idempotency_key = l.idempotency_key
                  WHERE coalesce(p_logged, false) AND l.tenant_id = tt.tenant AND l.kind = 'written'
                    AND (p_after IS NULL OR tt.tenant > p_after[1] OR l.idempotency_key > p_after[2])
                  ORDER BY 2
                  LIMIT coalesce(p_limit, 5000)) r
           WHERE p_after IS NULL OR tt.tenant >= p_after[1]
           ORDER BY r.tenant_id, r.idempotency_key
           LIMIT coalesce(p_limit, 5000)) x;
  RETURN v;
END
$$;
COMMENT ON FUNCTION billing_shard.move_export(text[], text, boolean, text[], integer) IS
  'A partition move''s read: the tenants'' rows of one table as a JSON array in key order (usage_events in pages; p_logged: only the usage logged while the partition was being copied, false: the rest, NULL: all).';

-- A catch-up round while the partition still serves: a page of the usage
-- logged since the history was copied and not copied yet, marked copied in
-- the same transaction (a change meanwhile waits for it, then marks the key
-- written again), so that the copy under the fence takes only what comes
-- after the last round.
CREATE FUNCTION billing_shard.move_export_catchup(p_tenants text[], p_limit integer) RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing SET TimeZone = 'UTC'
AS $$
DECLARE
  v_tenants text[];
  v_keys    text[];
  v        text;
BEGIN
  WITH page AS (
    SELECT l.tenant_id, l.idempotency_key FROM billing.partition_move_log l
     WHERE l.tenant_id = ANY (p_tenants) AND l.kind = 'written'
     ORDER BY l.tenant_id, l.idempotency_key
     LIMIT coalesce(p_limit, 5000)
       FOR UPDATE),
  marked AS (
    UPDATE billing.partition_move_log l SET kind = 'copied'
      FROM page p WHERE l.tenant_id = p.tenant_id AND l.idempotency_key = p.idempotency_key
    RETURNING l.tenant_id, l.idempotency_key)
  SELECT array_agg(m.tenant_id), array_agg(m.idempotency_key) INTO v_tenants, v_keys FROM marked m;
  -- read in a statement of its own: its snapshot sees a change that
  -- committed while this one waited for the log row it locks
  SELECT coalesce(json_agg(row_to_json(u) ORDER BY u.tenant_id, u.idempotency_key), '[]')::text INTO v
    FROM unnest(v_tenants, v_keys) AS k (tenant_id, idempotency_key)
    JOIN billing.usage_events u ON u.tenant_id = k.tenant_id AND u.idempotency_key = k.idempotency_key;
  RETURN v;
END
$$;
COMMENT ON FUNCTION billing_shard.move_export_catchup(text[], integer) IS
  'A partition move''s catch-up round before its fence: a page of the usage logged and not copied yet, marked copied.';

-- Before the catch-up rounds of a step that runs again: what an earlier
-- round marked copied may not have arrived (the router failed between the
-- two calls); it is due again.
CREATE FUNCTION billing_shard.move_reset_copied(p_tenants text[]) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  UPDATE billing.partition_move_log SET kind = 'written' WHERE tenant_id = ANY (p_tenants) AND kind = 'copied';
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing_shard.move_reset_copied(text[]) IS
  'Mark the usage a move''s catch-up rounds copied as due again (before the rounds of a step that runs again).';

-- A move undone after the source marked the partition moved: the events
-- its worker set aside for the target are its own again.
CREATE FUNCTION billing_shard.move_unmark_moved(p_partitions integer, p_partition integer) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  UPDATE billing.webhook_events e SET state = 'received', last_error = NULL, next_attempt_at = now()
   WHERE e.state = 'ignored' AND e.last_error LIKE 'moved: %'
     AND NOT EXISTS (SELECT FROM billing_shard.forwarded_events f WHERE f.stripe_event_id = e.stripe_event_id)
     AND billing.tenant_partition(coalesce(e.tenant_id, billing.event_tenant(e.payload::jsonb -> 'data' -> 'object'), ''),
                                  p_partitions) = p_partition;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing_shard.move_unmark_moved(integer, integer) IS
  'After an undone move: inbox events set aside because the partition had moved are to be applied here again.';

-- Store rows another shard exported.  Triggers do not fire (the rows are
-- as the other shard made them: no audit, notification or fence), so the
-- usage counters are reset here.  p_merge: rows already here are kept
-- (usage copied again); else a row already here is an error.
CREATE FUNCTION billing_shard.move_import(p_table text, p_rows text, p_merge boolean, p_log text DEFAULT NULL)
  RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, billing SET TimeZone = 'UTC' SET session_replication_role = replica
AS $$
DECLARE
  v_n        integer;
  v_conflict text := '';
  v_set      text;
BEGIN
  PERFORM billing_shard.move_check_table(p_table);
  IF p_log IS NOT NULL AND (p_table <> 'usage_events' OR p_log NOT IN ('written', 'history')) THEN
    RAISE EXCEPTION 'invalid log kind % for table %', quote_literal(p_log), p_table
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Usage arrives as written or history.';
  END IF;
  -- every row must be of a tenant whose partition is fenced here for a move
  -- in; a row that names no tenant is refused (an inbox event by the tenant
  -- it names, a wait by its event)
  PERFORM billing_shard.move_require_fence(
    CASE p_table
      WHEN 'webhook_waits' THEN
        ARRAY(SELECT coalesce(e.tenant_id, billing.event_tenant(e.payload::jsonb -> 'data' -> 'object'))
                FROM json_array_elements(p_rows::json) r
                LEFT JOIN billing.webhook_events e ON e.stripe_event_id = r ->> 'stripe_event_id')
      WHEN 'webhook_events' THEN
        ARRAY(SELECT coalesce(r ->> 'tenant_id', billing.event_tenant((r -> 'payload')::jsonb -> 'data' -> 'object'))
                FROM json_array_elements(p_rows::json) r)
      ELSE ARRAY(SELECT r ->> 'tenant_id' FROM json_array_elements(p_rows::json) r) END,
    ARRAY['moving in']);
  SELECT string_agg(format('%I = EXCLUDED.%I', a.attname, a.attname), ', ' ORDER BY a.attnum) INTO v_set
    FROM pg_attribute a
   WHERE a.attrelid = format('billing.%I', p_table)::regclass AND a.attnum > 0 AND NOT a.attisdropped;
  IF p_table = 'usage_events' AND p_log = 'written' THEN
    -- written (or changed) on the source since the history was copied
    v_conflict := 'ON CONFLICT (tenant_id, idempotency_key) DO UPDATE SET ' || v_set;
  ELSIF p_table = 'webhook_events' THEN
    -- an event every shard stored (its owner was unknown then): the source's is the tenant's
    v_conflict := 'ON CONFLICT (stripe_event_id) DO UPDATE SET ' || v_set;
  ELSIF p_merge OR p_table = 'webhook_waits' THEN
    v_conflict := 'ON CONFLICT DO NOTHING';
  END IF;
  EXECUTE format('INSERT INTO billing.%I OVERRIDING SYSTEM VALUE SELECT * FROM json_populate_recordset(NULL::billing.%I, $1::json) %s',
                 p_table, p_table, v_conflict)
    USING p_rows;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF p_table = 'usage_events' THEN
    IF p_log IS NOT NULL THEN
      -- what arrived, logged here too: the counts under the fence and the
      -- digest after the switch compare it
      INSERT INTO billing.partition_move_log (tenant_id, idempotency_key, kind)
      SELECT r.tenant_id, r.idempotency_key, p_log FROM json_populate_recordset(NULL::billing.usage_events, p_rows::json) r
      ON CONFLICT (tenant_id, idempotency_key) DO UPDATE SET kind = EXCLUDED.kind;
    END IF;
    PERFORM billing.reset_caches();
  END IF;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing_shard.move_import(text, text, boolean, text) IS
  'A partition move''s write: store rows another shard exported (without firing triggers) for tenants whose partition is fenced here moving in; p_merge keeps rows already here; p_log (usage) logs their keys as written or history.';

-- Every table but usage_events at once (one round trip each way under the
-- fence): a JSON object, table name -> its rows as move_export gives them.
CREATE FUNCTION billing_shard.move_export_mirror(p_tenants text[]) RETURNS text
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing SET TimeZone = 'UTC'
AS $$
DECLARE
  m record;
  v text := '';
BEGIN
  FOR m IN SELECT * FROM billing_shard.move_tables() WHERE table_name <> 'usage_events' ORDER BY ord LOOP
    v := v || CASE WHEN v = '' THEN '' ELSE ', ' END || to_json(m.table_name)::text || ': '
           || billing_shard.move_export(p_tenants, m.table_name, false, NULL, NULL);
  END LOOP;
  RETURN '{' || v || '}';
END
$$;
COMMENT ON FUNCTION billing_shard.move_export_mirror(text[]) IS
  'A partition move''s read of every table but usage_events: a JSON object of table name -> the tenants'' rows.';

CREATE FUNCTION billing_shard.move_import_mirror(p_tables text) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  m record;
  v jsonb := '{}';
BEGIN
  FOR m IN SELECT * FROM billing_shard.move_tables() WHERE table_name <> 'usage_events' ORDER BY ord LOOP
    v := v || jsonb_build_object(m.table_name,
                billing_shard.move_import(m.table_name, coalesce(p_tables::json -> m.table_name, '[]')::text, false, NULL));
  END LOOP;
  RETURN v;
END
$$;
COMMENT ON FUNCTION billing_shard.move_import_mirror(text) IS
  'A partition move''s write of what billing_shard.move_export_mirror read on the other shard; the rows stored per table.';

-- Remove the tenants' rows (every table; usage_events too when p_usage):
-- on the target before a copy, on the source once the map has switched.
CREATE FUNCTION billing_shard.move_clear(p_tenants text[], p_usage boolean) RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER
  SET search_path = pg_catalog, billing SET session_replication_role = replica
AS $$
DECLARE
  m   record;
  v_n bigint;
  v   jsonb := '{}';
BEGIN
  -- the target before a copy (its fence: moving in), the source once the
  -- partition has moved (moved out)
  PERFORM billing_shard.move_require_fence(p_tenants, ARRAY['moving in', 'moved out']);
  -- on the source, once moved: an inbox event still to be applied that
  -- names one of the tenants may have come after the copy; it is marked for
  -- the router to hand over (router.forward_moved_events), not deleted
  UPDATE billing.webhook_events e
     SET state = 'ignored', last_error = 'moved: its tenant''s partition moved to another shard'
   WHERE e.tenant_id IS NULL AND e.state = 'received'
     AND billing.event_tenant(e.payload::jsonb -> 'data' -> 'object') = ANY (p_tenants)
     AND EXISTS (SELECT FROM billing.partition_fences f
                  WHERE f.state = 'moved'
                    AND f.partition = billing.tenant_partition(billing.event_tenant(e.payload::jsonb -> 'data' -> 'object'),
                                                               f.partition_count));
  FOR m IN SELECT * FROM billing_shard.move_tables() ORDER BY ord DESC LOOP
    CONTINUE WHEN m.table_name = 'usage_events' AND NOT p_usage;
    EXECUTE format('DELETE FROM billing.%I t WHERE %s', m.table_name, billing_shard.move_where(m.table_name))
      USING p_tenants;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n > 0 THEN
      v := v || jsonb_build_object(m.table_name, v_n);
    END IF;
  END LOOP;
  IF p_usage THEN
    DELETE FROM billing.partition_move_log WHERE tenant_id = ANY (p_tenants);
  END IF;
  PERFORM billing.reset_caches();
  RETURN v;
END
$$;
COMMENT ON FUNCTION billing_shard.move_clear(text[], boolean) IS
  'Delete the tenants'' rows from every table a move copies (usage_events only when asked), without firing triggers; returns the rows deleted per table.';

-- What a move compares on both shards under the fence and records in both
-- audit chains: per table, the number of the tenants' rows and a digest,
-- the sum of each row's MD5 (its first 60 bits; the row as text in UTC).
-- Not usage_events, the one table whose size is the tenants' whole
-- history: its rows are counted (billing_shard.move_usage_count) before the
-- fence (the history) and under it (what was logged), and its digest is
-- compared after the switch (billing_shard.move_usage_digest), when the
-- source's rows no longer change.
CREATE FUNCTION billing_shard.move_digest(p_tenants text[]) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, billing SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
DECLARE
  m   record;
  v_n bigint;
  v_s numeric;
  v   jsonb := '{}';
BEGIN
  FOR m IN SELECT * FROM billing_shard.move_tables() WHERE table_name <> 'usage_events' ORDER BY ord LOOP
    EXECUTE format('SELECT count(*), coalesce(sum((''x'' || substr(md5(t::text), 1, 15))::bit(60)::bigint::numeric), 0)
                      FROM billing.%I t WHERE %s', m.table_name, billing_shard.move_where(m.table_name))
      INTO v_n, v_s USING p_tenants;
    v := v || jsonb_build_object(m.table_name, jsonb_build_object('rows', v_n, 'digest', v_s::text));
  END LOOP;
  RETURN v;
END
$$;
COMMENT ON FUNCTION billing_shard.move_digest(text[]) IS
  'Per table a move copies, but usage_events: how many rows the tenants have here and a digest of them (the sum of each row''s MD5, first 60 bits).';

-- The tenants' usage rows and the sum of their quantities: p_logged true,
-- of the keys logged (billing.partition_move_log: what came while the
-- partition was copied; on the target, what arrived of it); false, of the
-- rest (the history); NULL, all.  Under the fence only the logged ones are
-- counted, so the pause does not grow with the history.
CREATE FUNCTION billing_shard.move_usage_count(p_tenants text[], p_logged boolean) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, billing SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
DECLARE
  v jsonb;
BEGIN
  IF p_logged THEN
    -- from the log (under the fence: as long as what was logged, not the history)
    SELECT jsonb_build_object('rows', count(*), 'quantity', coalesce(sum(u.quantity), 0)::text,
                              'digest', coalesce(sum(('x' || substr(md5(u::text), 1, 15))::bit(60)::bigint::numeric), 0)::text)
      INTO v
      FROM billing.partition_move_log l
      JOIN billing.usage_events u ON u.tenant_id = l.tenant_id AND u.idempotency_key = l.idempotency_key
     WHERE l.tenant_id = ANY (p_tenants) AND l.kind <> 'history';
  ELSE
    SELECT jsonb_build_object('rows', count(*), 'quantity', coalesce(sum(u.quantity), 0)::text) INTO v
      FROM billing.usage_events u
     WHERE u.tenant_id = ANY (p_tenants)
       AND (p_logged IS NULL
            OR NOT EXISTS (SELECT FROM billing.partition_move_log l
                            WHERE l.tenant_id = u.tenant_id AND l.idempotency_key = u.idempotency_key
                              AND l.kind <> 'history'));
  END IF;
  RETURN v;
END
$$;
COMMENT ON FUNCTION billing_shard.move_usage_count(text[], boolean) IS
  'The tenants'' usage rows and quantity here: of the keys logged for a move (true), of the others (false), or all (NULL).';

-- The digest of the tenants' usage rows (as move_digest computes one, over
-- the columns nothing changes later: not period_start, which a plan change
-- re-keys): all of them, or (p_arrived) those that arrived with the move.
CREATE FUNCTION billing_shard.move_usage_digest(p_tenants text[], p_arrived boolean) RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, billing SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
DECLARE
  v_n bigint;
  v_s numeric;
BEGIN
  SELECT count(*),
         coalesce(sum(('x' || substr(md5(row(t.tenant_id, t.idempotency_key, t.metric, t.quantity, t.occurred_at,
                                             t.recorded_at, t.metadata, t.total_after)::text), 1, 15))::bit(60)::bigint::numeric), 0)
    INTO v_n, v_s
    FROM billing.usage_events t
   WHERE t.tenant_id = ANY (p_tenants)
     AND (NOT p_arrived OR EXISTS (SELECT FROM billing.partition_move_log l
                                    WHERE l.tenant_id = t.tenant_id AND l.idempotency_key = t.idempotency_key));
  RETURN jsonb_build_object('rows', v_n, 'digest', v_s::text);
END
$$;
COMMENT ON FUNCTION billing_shard.move_usage_digest(text[], boolean) IS
  'The number and digest of the tenants'' usage rows here: all, or those that arrived with a move (logged as they arrived).';

-- The move has compared what arrived: its keys are forgotten.
CREATE FUNCTION billing_shard.move_forget_log(p_tenants text[]) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  DELETE FROM billing.partition_move_log WHERE tenant_id = ANY (p_tenants);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing_shard.move_forget_log(text[]) IS
  'Forget the usage keys a move logged for these tenants (once it has compared them).';

CREATE FUNCTION billing_shard.move_audit(p_action text, p_details jsonb) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF p_action NOT IN ('partition.moved_out', 'partition.moved_in') THEN
    RAISE EXCEPTION 'not a partition move''s audit action: %', coalesce(quote_literal(p_action), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- once per move and action (a step that runs again records nothing more)
  IF EXISTS (SELECT FROM billing.audit_log a
              WHERE a.action = p_action AND a.details ->> 'move_id' = p_details ->> 'move_id') THEN
    RETURN NULL;
  END IF;
  RETURN billing.audit(p_action, NULL, p_details);
END
$$;
COMMENT ON FUNCTION billing_shard.move_audit(text, jsonb) IS
  'Record a partition move in this shard''s audit chain (partition.moved_out on the source, partition.moved_in on the target).';

-- Inbox events about a tenant that has moved away (the worker found its
-- partition moved when it came to apply them): the router hands them to
-- the tenant's shard (router.forward_moved_events), then marks them.
CREATE FUNCTION billing_shard.moved_events(p_limit integer)
  RETURNS TABLE (stripe_event_id text, payload text)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
  SELECT e.stripe_event_id, e.payload::text
    FROM billing.webhook_events e
   WHERE e.state = 'ignored' AND e.last_error LIKE 'moved: %'
     AND NOT EXISTS (SELECT FROM billing_shard.forwarded_events f WHERE f.stripe_event_id = e.stripe_event_id)
   ORDER BY e.stripe_created, e.stripe_event_id
   LIMIT p_limit
$$;
COMMENT ON FUNCTION billing_shard.moved_events(integer) IS
  'Inbox events this shard could not apply because their tenant''s partition moved away, not yet handed to its shard.';

-- Ids made by sequences (subscriptions, payments, requests, ...) must not
-- collide when rows move between shards: each shard draws from its own
-- range, from p_base (router.add_shard gives shard n the base n * 2^40).
CREATE FUNCTION billing_shard.reserve_ids(p_base bigint) RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  s   regclass;
  v_n integer := 0;
BEGIN
  IF p_base IS NULL OR p_base < 0 THEN
    RAISE EXCEPTION 'invalid id base: %', coalesce(p_base::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOR s IN SELECT pg_get_serial_sequence(format('billing.%I', c.relname), a.attname)::regclass
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
              AND a.attidentity <> '' AND NOT a.attisdropped LOOP
    IF (SELECT coalesce(q.last_value, 0) FROM pg_sequences q
         WHERE format('%I.%I', q.schemaname, q.sequencename)::regclass = s) < p_base THEN
      PERFORM setval(s, p_base + 1, false);
      v_n := v_n + 1;
    END IF;
  END LOOP;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing_shard.reserve_ids(bigint) IS
  'Move this shard''s id sequences to at least p_base, so that its ids never collide with another shard''s when a partition moves; returns how many moved.';
