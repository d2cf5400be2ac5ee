-- qes_billing_router install script, assembled from sql/router/*.sql in name order.
\echo Use "CREATE EXTENSION qes_billing_router" to load this file. \quit

-- The router database of a sharded qes_billing (docs/scaleout.md).  It holds
-- no billing data: the api schema PostgREST exposes, answered by the shard
-- that owns the caller's tenant through PL/Proxy, the platform's calls
-- routed the same way, the operators' views over all shards, and the
-- placement: tenant -> partition (router.tenant_partition, a fixed
-- function) and partition -> shard (the PL/Proxy cluster qes_billing, a
-- SQL/MED server whose options p0 .. pN-1 are the shards' connect strings).
--
-- Needs qes_billing's library preloaded in this cluster too
-- (shared_preload_libraries = 'qes_billing'): api.pre_request's token
-- buckets live in its shared memory, and the webhook signature is checked
-- by its verifier.  No qes_billing extension is created here; its worker
-- finds none in this database and sleeps.

CREATE SCHEMA router;
CREATE SCHEMA api;
COMMENT ON SCHEMA api IS
  'QES billing REST API: subscriptions, usage, invoices, payments and the Stripe webhook, exposed through PostgREST.';
COMMENT ON SCHEMA router IS
  'qes_billing_router: placement of tenants on shards, the routed platform calls and the operators'' views over all shards.';

DO $roles$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['qes_anon', 'qes_tenant', 'qes_admin', 'qes_app'] LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
      EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
    END IF;
  END LOOP;
END
$roles$;

-- ---- placement ------------------------------------------------------------

-- Tenant -> hash: the first 32 bits of the MD5 of the tenant id (tenant
-- ids are ASCII, so the bytes do not depend on the database encoding).  MD5
-- is fixed by RFC 1321, so a tenant's partition never changes with a
-- PostgreSQL release (hashtext()'s output has changed before).
CREATE FUNCTION router.tenant_hash(p_tenant_id text) RETURNS integer
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
  RETURN ('x' || pg_catalog.substr(pg_catalog.md5(p_tenant_id), 1, 8))::bit(32)::integer;
COMMENT ON FUNCTION router.tenant_hash(text) IS
  'The stable hash of a tenant id: the first 32 bits of its MD5, as a signed integer. PL/Proxy maps it to partition hash & (partitions - 1).';

-- The SQL/MED server is the partition -> shard map.  It is created here but
-- is not a member of the extension: pg_dump keeps its options (the map) and
-- its user mapping, and DROP EXTENSION leaves the map in place.  PL/Proxy
-- wants at least one partition: until router.set_partitions writes the map,
-- p0 names no database (router.shard_partitions leaves it out).
CREATE SERVER qes_billing FOREIGN DATA WRAPPER plproxy
  OPTIONS (connection_lifetime '1800', p0 'dbname=qes_billing_no_shard');
ALTER EXTENSION qes_billing_router DROP SERVER qes_billing;

-- The same map with each shard's hot standby in its place (the shard itself
-- where it has none), kept by router.sync_standby_map: the cluster that
-- read-only calls use when qes_billing_router.read_from_standbys is on.
-- Its user mapping is the DBA's, as for qes_billing.
CREATE SERVER qes_billing_standby FOREIGN DATA WRAPPER plproxy
  OPTIONS (connection_lifetime '1800', p0 'dbname=qes_billing_no_shard');
ALTER EXTENSION qes_billing_router DROP SERVER qes_billing_standby;

CREATE FUNCTION router.partition_count() RETURNS integer
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog
  RETURN (SELECT count(*)::integer
            FROM pg_catalog.pg_foreign_server s, pg_catalog.pg_options_to_table(s.srvoptions) o
           WHERE s.srvname = 'qes_billing' AND o.option_name ~ '^p[0-9]+$');
COMMENT ON FUNCTION router.partition_count() IS
  'How many partitions the cluster qes_billing has (a power of two; 0 before router.set_partitions).';

CREATE FUNCTION router.tenant_partition(p_tenant_id text) RETURNS integer
  LANGUAGE sql STABLE SET search_path = pg_catalog
  RETURN router.tenant_hash(p_tenant_id) & (router.partition_count() - 1);
COMMENT ON FUNCTION router.tenant_partition(text) IS
  'The partition a tenant belongs to: router.tenant_hash(tenant) & (partitions - 1), as PL/Proxy computes it.';

CREATE TABLE router.shards (
  shard_name text PRIMARY KEY CHECK (shard_name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
  connstr    text NOT NULL UNIQUE,
  pool_name  text,
  added_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
  standby_connstr text UNIQUE CHECK (standby_connstr !~* '(^|[\s''])(user|password|passfile|sslpassword|service)\s*=|://'),
  -- the shard's ids (subscriptions, payments, requests, ...) start at
  -- shard_no * 2^40, so rows keep their ids when a partition moves
  shard_no   integer NOT NULL UNIQUE CHECK (shard_no BETWEEN 0 AND 8388606)
);
COMMENT ON TABLE router.shards IS
  'The shards: name, the connect string the router uses (without user and password, which come from the user mapping of server qes_billing), the database name an application uses on the shared PgBouncer (pool_name), and the connect string of its hot standby for read-only calls (router.set_standby).';
SELECT pg_catalog.pg_extension_config_dump('router.shards', '');

-- The map as PL/Proxy sees it: partition, its connect string, the shard
-- that string belongs to.
CREATE VIEW router.partition_map AS
SELECT substr(o.option_name, 2)::integer AS partition,
       sh.shard_name,
       o.option_value AS connstr,
       sh.pool_name
  FROM pg_catalog.pg_foreign_server s
 CROSS JOIN LATERAL pg_catalog.pg_options_to_table(s.srvoptions) o
  LEFT JOIN router.shards sh ON sh.connstr = o.option_value
 WHERE s.srvname = 'qes_billing' AND o.option_name ~ '^p[0-9]+$';
COMMENT ON VIEW router.partition_map IS
  'Partition -> shard: the options p0 .. pN-1 of server qes_billing (PL/Proxy''s cluster configuration) with the shard each connect string belongs to.';

-- One partition per shard to address it by (its lowest), in shard order.
CREATE VIEW router.shard_partitions AS
SELECT m.shard_name, min(m.partition) AS partition, count(*)::integer AS partitions, m.connstr
  FROM router.partition_map m
 WHERE m.connstr <> 'dbname=qes_billing_no_shard'
 GROUP BY m.shard_name, m.connstr
 ORDER BY min(m.partition);
COMMENT ON VIEW router.shard_partitions IS
  'Each shard that holds partitions: the lowest of them (the router addresses the shard by it), how many it holds and its connect string.';

CREATE FUNCTION router.partition_shard(p_partition integer) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog
  RETURN (SELECT coalesce(m.shard_name, 'p' || m.partition)
            FROM router.partition_map m
           WHERE m.partition = p_partition & greatest(router.partition_count() - 1, 0));
COMMENT ON FUNCTION router.partition_shard(integer) IS 'The name of the shard that holds a partition.';

-- Where a tenant's own transactions go: the billable act and record_usage
-- must commit together, on the tenant's shard (docs/scaleout.md).
CREATE FUNCTION router.tenant_shard(p_tenant_id text,
                                    OUT partition integer, OUT shard_name text, OUT connstr text, OUT pool_name text)
  LANGUAGE sql STABLE SET search_path = pg_catalog
AS $$
  SELECT m.partition, m.shard_name, m.connstr, m.pool_name
    FROM router.partition_map m
   WHERE m.partition = router.tenant_partition(p_tenant_id)
$$;
COMMENT ON FUNCTION router.tenant_shard(text) IS
  'The shard that owns a tenant: its partition, the shard''s name, its connect string (without credentials) and its database on PgBouncer. The platform runs a tenant''s billable transaction (the act plus billing.record_usage) there.';
