-- CREATE EXTENSION, what it creates, DROP EXTENSION removes it
-- all, CREATE again works, and the worker runs in this database.
CREATE EXTENSION qes_billing;
SELECT extversion, extrelocatable FROM pg_extension WHERE extname = 'qes_billing';
SELECT nspname FROM pg_namespace WHERE nspname IN ('billing', 'api') ORDER BY 1;

-- the tables of the data model
SELECT c.relname, c.relkind, c.relrowsecurity AS rls
  FROM pg_class c
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p')
 ORDER BY 1;

-- every tenant-owned table leads its primary key with tenant_id
SELECT c.relname, a.attname AS first_key_column
  FROM pg_constraint k
  JOIN pg_class c ON c.oid = k.conrelid
  JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
 WHERE k.contype = 'p' AND c.relnamespace = 'billing'::regnamespace
   AND NOT c.relispartition
 ORDER BY 1;

-- the api surface, each with a comment
SELECT c.relname AS api_object, c.relkind, obj_description(c.oid, 'pg_class') IS NOT NULL AS commented
  FROM pg_class c WHERE c.relnamespace = 'api'::regnamespace ORDER BY 1;
SELECT p.proname AS api_function, obj_description(p.oid, 'pg_proc') IS NOT NULL AS commented
  FROM pg_proc p WHERE p.pronamespace = 'api'::regnamespace ORDER BY 1;

-- nothing is granted to PUBLIC: functions, tables, views, schemas
SELECT p.oid::regprocedure AS public_function
  FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
 WHERE p.pronamespace IN ('billing'::regnamespace, 'api'::regnamespace) AND a.grantee = 0;
SELECT c.oid::regclass AS public_relation
  FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
 WHERE c.relnamespace IN ('billing'::regnamespace, 'api'::regnamespace) AND a.grantee = 0;
SELECT n.nspname AS public_schema
  FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
 WHERE n.nspname IN ('billing', 'api') AND a.grantee = 0;

-- every SECURITY DEFINER function pins search_path
SELECT p.oid::regprocedure AS definer_without_search_path
  FROM pg_proc p
 WHERE p.pronamespace IN ('billing'::regnamespace, 'api'::regnamespace) AND p.prosecdef
   AND NOT EXISTS (SELECT FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%');

-- the roles PostgREST switches to, and the exporter's
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'qes\_%' ORDER BY 1;

-- the worker is up, connected to this database, under a clear name
DO $$
BEGIN
  FOR i IN 1..600 LOOP   -- patient: the valgrind layer starts it slowly
    EXIT WHEN (SELECT w.alive AND s.extension_present FROM billing.worker_status w, billing.worker_state() s);
    PERFORM pg_sleep(0.1);
  END LOOP;
END $$;
SELECT alive, extension_present FROM billing.worker_status, billing.worker_state();
SELECT backend_type, application_name, datname = current_database() AS this_database
  FROM pg_stat_activity WHERE backend_type = 'qes_billing worker';

-- DROP EXTENSION removes everything it created (roles are cluster-wide and stay)
DROP EXTENSION qes_billing;
SELECT count(*) AS schemas_left FROM pg_namespace WHERE nspname IN ('billing', 'api');
SELECT count(*) AS functions_left FROM pg_proc WHERE probin LIKE '%qes_billing%';
SELECT count(*) AS types_left FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname IN ('billing', 'api');

-- and it can be created again, with the catalog seeded afresh
CREATE EXTENSION qes_billing;
SELECT count(*) AS plans FROM billing.plans;
