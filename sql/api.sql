-- The api schema driven the way PostgREST drives it (shared/POSTGREST.md):
-- one transaction per request, set_config(..., true) for the role and the
-- request, then the main query.  (test/python drives it over HTTP terms.)
SET qes_billing.stripe_test_secret_key = 'sk_test_51Hsecretvalue';
SET qes_billing.stripe_test_publishable_key = 'pk_test_51Hpublic';
SET qes_billing.base_url = 'https://qes.example/';
SELECT (billing.upsert_tenant('t_one', 'Tenant One', 'one@t.example')).tenant_id,
       (billing.upsert_tenant('t_two', 'Tenant Two', 'two@t.example')).tenant_id;

-- GET /rpc/config as the anonymous role
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('search_path', '"api", "public"', true) IS NOT NULL AS s,
       set_config('role', 'qes_anon', true) IS NOT NULL AS r,
       set_config('request.jwt.claims', '{"role":"qes_anon"}', true) IS NOT NULL AS c,
       set_config('request.method', 'GET', true) IS NOT NULL AS m,
       set_config('request.path', '/rpc/config', true) IS NOT NULL AS p;
SELECT c ->> 'environment' AS environment, c ->> 'stripe_mode' AS mode, c ->> 'publishable_key' AS publishable_key,
       c ->> 'base_url' AS base_url, c ->> 'webhook_url' AS webhook_url,
       json_array_length(c -> 'plans') AS plans, c::text ~ 'sk_test|whsec' AS leaks_secret
  FROM api.config() c;
COMMIT;

-- GET /rpc/health: 200 with the worker alive and keys set ...
DO $$
BEGIN
  FOR i IN 1..600 LOOP
    EXIT WHEN (SELECT alive FROM billing.worker_status);
    PERFORM pg_sleep(0.1);
  END LOOP;
END $$;
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_anon', true) IS NOT NULL AS r;
SELECT h ->> 'status' AS status, h -> 'worker' ->> 'alive' AS worker_alive, h -> 'stripe' AS stripe,
       h ->> 'outbox_backlog' AS outbox, h ->> 'inbox_backlog' AS inbox
  FROM api.health() h;
SELECT current_setting('response.status', true) AS response_status;
COMMIT;
-- ... and 503 without a usable secret key
RESET qes_billing.stripe_test_secret_key;
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_anon', true) IS NOT NULL AS r;
SELECT h ->> 'status' AS status, h -> 'stripe' AS stripe FROM api.health() h;
SELECT current_setting('response.status', true) AS response_status;
COMMIT;

-- GET /plans as anonymous
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_anon', true) IS NOT NULL AS r;
SELECT plan_id, monthly_price, yearly_price, limits ->> 'signatures' AS signatures FROM api.plans ORDER BY tier;
COMMIT;
-- anonymous sees no tenant and no billing table (each a request of its own)
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_anon', true) IS NOT NULL AS r;
SELECT * FROM api.tenant;
ROLLBACK;
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_anon', true) IS NOT NULL AS r;
SELECT count(*) FROM billing.tenants;
ROLLBACK;

-- GET /tenant as a tenant: its own row only
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_tenant', true) IS NOT NULL AS r,
       set_config('request.jwt.claims', '{"role":"qes_tenant","tenant_id":"t_one","sub":"u1"}', true) IS NOT NULL AS c;
SELECT tenant_id, name FROM api.tenant;
SELECT tenant_id FROM billing.tenants;
COMMIT;
-- and cannot reach what is not its own
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_tenant', true) IS NOT NULL AS r,
       set_config('request.jwt.claims', '{"role":"qes_tenant","tenant_id":"t_one"}', true) IS NOT NULL AS c;
SELECT count(*) FROM billing.audit_log;
ROLLBACK;
BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE;
SELECT set_config('role', 'qes_tenant', true) IS NOT NULL AS r,
       set_config('request.jwt.claims', '{"role":"qes_tenant","tenant_id":"t_one"}', true) IS NOT NULL AS c;
SELECT billing.upsert_tenant('t_one', 'Renamed', 'one@t.example');
ROLLBACK;
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_tenant', true) IS NOT NULL AS r,
       set_config('request.jwt.claims', '{"role":"qes_tenant","tenant_id":"t_two"}', true) IS NOT NULL AS c;
SELECT tenant_id, name FROM api.tenant;
COMMIT;
-- a tenant token without a tenant_id claim sees nothing
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_tenant', true) IS NOT NULL AS r,
       set_config('request.jwt.claims', '{"role":"qes_tenant"}', true) IS NOT NULL AS c;
SELECT count(*) AS visible FROM api.tenant;
COMMIT;
-- an admin sees every tenant
BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;
SELECT set_config('role', 'qes_admin', true) IS NOT NULL AS r;
SELECT tenant_id FROM api.tenant ORDER BY 1;
COMMIT;
