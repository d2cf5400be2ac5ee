-- qes_billing_shard install script, assembled from sql/shard/*.sql in name order.
\echo Use "CREATE EXTENSION qes_billing_shard" to load this file. \quit

-- The shard side of a sharded qes_billing (docs/scaleout.md).  A shard is a
-- complete qes_billing database; the router (qes_billing_router, PL/Proxy)
-- calls the functions of this schema, and nothing else, as the login role
-- qes_router.  Every call is its own autocommitted statement on the shard
-- (PL/Proxy has no distributed transaction), so every entry point is a read
-- or idempotent, and the API entry answers an error as a value (PL/Proxy
-- drops its connection after a remote error and rewrites the message).

CREATE SCHEMA billing_shard;
COMMENT ON SCHEMA billing_shard IS
  'qes_billing_shard: the entry points the qes_billing_router proxy calls on this shard (docs/scaleout.md).';

-- The role the router logs in as.  Like PostgREST's authenticator it is
-- NOINHERIT and a member of the four request roles, so that a routed
-- request runs as exactly the role it would run as on one database.  The
-- DBA gives it LOGIN and a password (docs/scaleout.md, "Adding the router").
DO $roles$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'qes_router') THEN
    CREATE ROLE qes_router NOLOGIN NOINHERIT;
  END IF;
END
$roles$;
GRANT qes_anon, qes_tenant, qes_admin, qes_app TO qes_router;

-- Which shard this is (its name in the router's map), set when the router
-- registers it (router.add_shard).
CREATE TABLE billing_shard.identity (
  one_row       boolean PRIMARY KEY DEFAULT true CHECK (one_row),
  shard_name    text NOT NULL CHECK (shard_name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
  registered_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing_shard.identity IS
  'This shard''s name in the router''s shard map (one row, written by billing_shard.register when the router adds the shard).';
SELECT pg_catalog.pg_extension_config_dump('billing_shard.identity', '');

CREATE FUNCTION billing_shard.register(p_shard_name text) RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing_shard
AS $$
DECLARE
  v_old text;
BEGIN
  IF p_shard_name IS NULL OR p_shard_name !~ '^[a-z0-9][a-z0-9_-]{0,62}$' THEN
    RAISE EXCEPTION 'invalid shard name: %', coalesce(quote_literal(p_shard_name), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A shard name is 1 to 63 lower-case letters, digits, "_" or "-".';
  END IF;
  SELECT shard_name INTO v_old FROM billing_shard.identity FOR UPDATE;
  IF v_old IS NOT NULL AND v_old <> p_shard_name THEN
    RAISE EXCEPTION 'this database is shard % already, not %', v_old, p_shard_name
      USING ERRCODE = 'unique_violation',
            HINT = 'A database is one shard; register it under its name, or delete billing_shard.identity first if it really changes.';
  END IF;
  IF v_old IS NULL THEN
    INSERT INTO billing_shard.identity (shard_name) VALUES (p_shard_name);
    PERFORM billing.audit('shard.registered', NULL, jsonb_build_object('shard', p_shard_name));
  END IF;
  RETURN current_database();
END
$$;
COMMENT ON FUNCTION billing_shard.register(text) IS
  'Record this database''s shard name (the router calls it when it adds the shard); returns the database name. Audited once.';

CREATE FUNCTION billing_shard.shard_name() RETURNS text
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing_shard
  RETURN (SELECT i.shard_name FROM billing_shard.identity i);
COMMENT ON FUNCTION billing_shard.shard_name() IS 'This shard''s name in the router''s map (NULL before it is registered).';
