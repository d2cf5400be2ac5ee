-- qes_billing install script, assembled from sql/install/*.sql in name order.
\echo Use "CREATE EXTENSION qes_billing" to load this file. \quit

-- Schema billing is private; schema api is what PostgREST exposes.  Both
-- are members of the extension, so DROP EXTENSION removes them.
CREATE SCHEMA billing;
CREATE SCHEMA api;
COMMENT ON SCHEMA api IS
  'QES billing REST API: subscriptions, usage, invoices, payments and the Stripe webhook, exposed through PostgREST.';
COMMENT ON SCHEMA billing IS
  'qes_billing private schema: billing tables, queues, audit log and internal functions.';

-- The roles PostgREST switches to.  Roles are cluster-wide and are not
-- members of the extension: they are created when missing and survive
-- DROP EXTENSION, so that other databases using them keep working.
DO $roles$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['qes_anon', 'qes_tenant', 'qes_admin', 'qes_app', 'qes_monitor'] LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
      EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
    END IF;
  END LOOP;
END
$roles$;
