-- Managing the map (superusers; docs/scaleout.md, "Adding the router").

-- Register a shard: check it answers as a qes_billing shard and record its
-- name there.  The user and password come from the user mapping of server
-- qes_billing (CREATE USER MAPPING FOR PUBLIC SERVER qes_billing OPTIONS
-- (user 'qes_router', password '...')).
CREATE FUNCTION router.remote_register(p_connstr text, p_shard_name text) RETURNS text
  LANGUAGE plproxy
AS $$
  CONNECT p_connstr;
  SELECT billing_shard.register(p_shard_name) AS remote_register;
$$;
COMMENT ON FUNCTION router.remote_register(text, text) IS
  'PL/Proxy: record the shard name in the shard database (billing_shard.register).';

CREATE FUNCTION router.login_connstr(p_connstr text) RETURNS text
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog
AS $$
DECLARE
  v text := p_connstr;
  o record;
BEGIN
  FOR o IN
    SELECT x.option_name, x.option_value
      FROM pg_catalog.pg_user_mapping um
      JOIN pg_catalog.pg_foreign_server s ON s.oid = um.umserver
     CROSS JOIN LATERAL pg_catalog.pg_options_to_table(um.umoptions) x
     WHERE s.srvname = 'qes_billing' AND um.umuser IN (0, current_user::regrole::oid)
     ORDER BY um.umuser DESC
  LOOP
    IF o.option_name IN ('user', 'password') AND v !~ ('(^|\s)' || o.option_name || '=') THEN
      v := v || ' ' || o.option_name || '=' || quote_literal(o.option_value);
    END IF;
  END LOOP;
  RETURN v;
END
$$;
COMMENT ON FUNCTION router.login_connstr(text) IS
  'A shard''s connect string with the user and password of server qes_billing''s user mapping (for the router''s own one-off connections).';

-- Rewrite server qes_billing_standby from server qes_billing: each
-- partition's connect string replaced by its shard's standby's, if any.
CREATE FUNCTION router.sync_standby_map() RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
DECLARE
  v_set text;
BEGIN
  SELECT string_agg(CASE WHEN m.option_name IS NULL THEN format('DROP %I', o.option_name)
                         WHEN o.option_name IS NULL THEN format('ADD %I %L', m.option_name, m.target)
                         ELSE format('SET %I %L', m.option_name, m.target) END, ', ')
    INTO v_set
    FROM (SELECT po.option_name, coalesce(sh.standby_connstr, po.option_value) AS target
            FROM pg_foreign_server s
           CROSS JOIN LATERAL pg_options_to_table(s.srvoptions) po
            LEFT JOIN router.shards sh ON sh.connstr = po.option_value
           WHERE s.srvname = 'qes_billing' AND po.option_name ~ '^p[0-9]+$') m
    FULL JOIN (SELECT so.option_name FROM pg_foreign_server s, pg_options_to_table(s.srvoptions) so
                WHERE s.srvname = 'qes_billing_standby' AND so.option_name ~ '^p[0-9]+$') o
      ON o.option_name = m.option_name;
  IF v_set IS NOT NULL THEN
    EXECUTE 'ALTER SERVER qes_billing_standby OPTIONS (' || v_set || ')';
  END IF;
END
$$;
COMMENT ON FUNCTION router.sync_standby_map() IS
  'Write server qes_billing_standby (the cluster read-only calls use with qes_billing_router.read_from_standbys on): the partition map of qes_billing with each shard''s hot standby in its place.';

CREATE FUNCTION router.remote_standby_name(p_connstr text) RETURNS text
  LANGUAGE plproxy
AS $$
  CONNECT p_connstr;
  SELECT billing_shard.shard_name() || CASE WHEN pg_catalog.pg_is_in_recovery() THEN '' ELSE ' (not in recovery)' END
         AS remote_standby_name;
$$;
COMMENT ON FUNCTION router.remote_standby_name(text) IS
  'PL/Proxy: the shard name a database (a shard''s hot standby) knows itself by, marked when it is not in recovery.';

CREATE FUNCTION router.add_shard(p_shard_name text, p_connstr text, p_pool_name text DEFAULT NULL) RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
DECLARE
  v_db text;
BEGIN
  IF p_connstr IS NULL OR p_connstr ~* '(^|[\s''])(user|password|passfile|sslpassword|service)\s*=|://' THEN
    RAISE EXCEPTION 'a shard''s connect string names host, port and dbname, not user or password'
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Credentials go into the user mapping: CREATE USER MAPPING FOR PUBLIC SERVER qes_billing OPTIONS (user ''qes_router'', password ''...'').';
  END IF;
  BEGIN
    v_db := router.remote_register(router.login_connstr(p_connstr), p_shard_name);
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'shard % does not answer as a qes_billing shard', p_shard_name
      USING ERRCODE = 'connection_failure', DETAIL = SQLERRM,
            HINT = 'The shard database needs CREATE EXTENSION qes_billing_shard, and the role qes_router LOGIN with the user mapping''s password.';
  END;
  INSERT INTO router.shards (shard_name, connstr, pool_name, shard_no)
  VALUES (p_shard_name, p_connstr, p_pool_name, (SELECT coalesce(max(shard_no) + 1, 0) FROM router.shards))
  ON CONFLICT (shard_name) DO UPDATE SET connstr = EXCLUDED.connstr, pool_name = EXCLUDED.pool_name;
  -- its own range of ids, so that moved rows never collide (70_move.sql)
  PERFORM router.remote_reserve_ids(router.login_connstr(p_connstr),
                                    (SELECT shard_no FROM router.shards WHERE shard_name = p_shard_name)::bigint << 40);
  PERFORM router.sync_standby_map();
  RETURN v_db;
END
$$;
COMMENT ON FUNCTION router.add_shard(text, text, text) IS
  'Register a shard: its name, its connect string (host, port, dbname; through PgBouncer) and its database name on PgBouncer for applications. It must answer as a qes_billing shard. Holds no partition until router.set_partitions or router.move_partition.';

-- Spread p_count partitions (a power of two, 64 or more) over the
-- registered shards, partition i on shard i mod n in name order.  Only for
-- a new deployment (or one whose tenants all live in one shard that keeps
-- every partition it has): it moves partitions, not their tenants' rows.
CREATE FUNCTION router.set_partitions(p_count integer DEFAULT 64) RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
DECLARE
  v_shards text[] := ARRAY(SELECT connstr FROM router.shards ORDER BY shard_name);
  v_add text;
BEGIN
  IF p_count IS NULL OR p_count < 1 OR (p_count & (p_count - 1)) <> 0 THEN
    RAISE EXCEPTION 'the number of partitions must be a power of two, not %', coalesce(p_count::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Use 64 or more (64, 128, 256, ...), so that shards can be added by moving partitions.';
  END IF;
  IF cardinality(v_shards) = 0 THEN
    RAISE EXCEPTION 'no shard is registered'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Register the shards first with router.add_shard(name, connstr).';
  END IF;
  IF cardinality(v_shards) > p_count THEN
    RAISE EXCEPTION 'more shards (%) than partitions (%)', cardinality(v_shards), p_count
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Use more partitions.';
  END IF;
  -- one statement: PL/Proxy checks the map after each
  SELECT string_agg(CASE WHEN o.option_name IS NULL THEN format('ADD %I %L', 'p' || i, c.connstr)
                         WHEN i IS NULL THEN format('DROP %I', o.option_name)
                         ELSE format('SET %I %L', 'p' || i, c.connstr) END, ', ')
    INTO v_add
    FROM (SELECT i, v_shards[1 + i % cardinality(v_shards)] AS connstr FROM generate_series(0, p_count - 1) i) c
    FULL JOIN (SELECT o.option_name FROM pg_foreign_server s, pg_options_to_table(s.srvoptions) o
                WHERE s.srvname = 'qes_billing' AND o.option_name ~ '^p[0-9]+$') o ON o.option_name = 'p' || c.i;
  EXECUTE 'ALTER SERVER qes_billing OPTIONS (' || v_add || ')';
  PERFORM router.sync_standby_map();
  RETURN p_count;
END
$$;
COMMENT ON FUNCTION router.set_partitions(integer) IS
  'Write the partition map: p_count partitions (a power of two) spread over the registered shards in name order. Moves no tenant rows: for a new deployment.';

CREATE FUNCTION router.move_partition(p_partition integer, p_shard_name text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
DECLARE
  v_connstr text := (SELECT connstr FROM router.shards WHERE shard_name = p_shard_name);
BEGIN
  IF v_connstr IS NULL THEN
    RAISE EXCEPTION 'unknown shard: %', coalesce(quote_literal(p_shard_name), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Register it with router.add_shard first.';
  END IF;
  IF p_partition IS NULL OR p_partition < 0 OR p_partition >= router.partition_count() THEN
    RAISE EXCEPTION 'no partition %', coalesce(p_partition::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = format('Partitions are 0 to %s.', router.partition_count() - 1);
  END IF;
  EXECUTE format('ALTER SERVER qes_billing OPTIONS (SET %I %L)', 'p' || p_partition, v_connstr);
  PERFORM router.sync_standby_map();
END
$$;
COMMENT ON FUNCTION router.move_partition(integer, text) IS
  'Point a partition at another shard (PL/Proxy picks it up at each backend''s next call). The partition''s tenants'' rows must have been moved to that shard first.';

CREATE FUNCTION router.set_standby(p_shard_name text, p_connstr text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, router
AS $$
DECLARE
  v_name text;
BEGIN
  IF NOT EXISTS (SELECT FROM router.shards WHERE shard_name = p_shard_name) THEN
    RAISE EXCEPTION 'unknown shard: %', coalesce(quote_literal(p_shard_name), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Register it with router.add_shard first.';
  END IF;
  IF p_connstr ~* '(^|[\s''])(user|password|passfile|sslpassword|service)\s*=|://' THEN
    RAISE EXCEPTION 'a standby''s connect string names host, port and dbname (key=value), not user, password or a service'
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Credentials go into the user mapping: CREATE USER MAPPING FOR PUBLIC SERVER qes_billing_standby OPTIONS (user ''qes_router'', password ''...'').';
  END IF;
  IF p_connstr IS NOT NULL THEN
    BEGIN
      v_name := router.remote_standby_name(router.login_connstr(p_connstr));
    EXCEPTION WHEN OTHERS THEN
      RAISE EXCEPTION 'the standby of shard % does not answer', p_shard_name
        USING ERRCODE = 'connection_failure', DETAIL = SQLERRM,
              HINT = 'It must be a hot standby of the shard (hot_standby = on), reachable with the user mapping''s role.';
    END;
    IF v_name IS DISTINCT FROM p_shard_name THEN
      RAISE EXCEPTION 'the database at that connect string is shard %, not a hot standby of %', coalesce(v_name, 'unnamed'), p_shard_name
        USING ERRCODE = 'invalid_parameter_value', HINT = 'Give the connect string of a hot standby of this shard.';
    END IF;
  END IF;
  UPDATE router.shards SET standby_connstr = p_connstr WHERE shard_name = p_shard_name;
  PERFORM router.sync_standby_map();
END
$$;
COMMENT ON FUNCTION router.set_standby(text, text) IS
  'Register a shard''s hot standby (its connect string: host, port, dbname; NULL removes it). Read-only calls go to it when qes_billing_router.read_from_standbys is on; it must answer as a copy of that shard.';

-- Which calls may be answered by a standby: the read-only ones that show a
-- tenant's limits, usage, plans, subscription and invoices, and only when
-- the setting is on and the transaction is read-only (PostgREST's GET).
CREATE FUNCTION router.reads_from_standby(p_call text, p_read_only boolean) RETURNS boolean
  LANGUAGE sql STABLE SET search_path = pg_catalog
  RETURN coalesce(p_read_only, false)
     AND p_call IN ('check_limit', 'usage', 'plans', 'subscription', 'invoices')
     AND coalesce(nullif(current_setting('qes_billing_router.read_from_standbys', true), '')::boolean, false);
COMMENT ON FUNCTION router.reads_from_standby(text, boolean) IS
  'Whether a call goes to the tenant''s shard''s hot standby: qes_billing_router.read_from_standbys is on, the call is check_limit or GET /usage, /plans, /subscription or /invoices, and the transaction is read-only.';
