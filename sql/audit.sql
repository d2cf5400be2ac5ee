-- The audit log: one row per operation, append-only, hash-chained.
SELECT (billing.upsert_tenant('audited', 'Audited Ltd', 'ap@audited.example')).tenant_id;
SELECT billing.audit('invoice.viewed', 'audited', '{"b": 2, "a": 1}') > 0 AS written;

-- who: the role the session acts as, and the JWT's subject and tenant
BEGIN;
SELECT set_config('request.jwt.claims', '{"role": "qes_admin", "sub": "ops@qes.example", "tenant_id": "audited"}', true);
SET LOCAL ROLE qes_admin;
SELECT (billing.upsert_tenant('audited', 'Audited Limited', 'ap@audited.example')).name;
RESET ROLE;
COMMIT;
SELECT action, actor_role, actor_sub, actor_tenant, tenant_id, details
  FROM billing.audit_log WHERE tenant_id = 'audited' ORDER BY audit_id;

-- ids are gap-free and each row chains to the previous one
SELECT bool_and(audit_id = rn) AS gap_free FROM (SELECT audit_id, row_number() OVER (ORDER BY audit_id) rn FROM billing.audit_log) s;
SELECT count(*) AS broken_links
  FROM (SELECT prev_hash, lag(hash) OVER (ORDER BY audit_id) AS prev FROM billing.audit_log) s
 WHERE prev IS NOT NULL AND prev_hash <> prev;
SELECT length(hash) AS hash_bytes FROM billing.audit_log ORDER BY audit_id LIMIT 1;
SELECT * FROM billing.verify_audit_chain();

-- the hash does not depend on DateStyle, TimeZone or jsonb key order
SET TimeZone = 'Pacific/Auckland';
SET DateStyle = 'German';
SELECT * FROM billing.verify_audit_chain();
RESET TimeZone;
RESET DateStyle;

-- append-only, even for the owner
UPDATE billing.audit_log SET details = '{}' WHERE tenant_id = 'audited';
DELETE FROM billing.audit_log WHERE tenant_id = 'audited';
TRUNCATE billing.audit_log;
SELECT billing.audit('Bad Action', NULL, '{}');
SELECT billing.audit(NULL, NULL, '{}');

-- tampering (a superuser with the guard turned off) is detected and named
SET qes_billing.audit_guard = off;
UPDATE billing.audit_log SET details = '{"b": 2, "a": 1000}' WHERE action = 'invoice.viewed'
  RETURNING audit_id AS tampered_id;
SELECT ok, first_bad_id = (SELECT audit_id FROM billing.audit_log WHERE action = 'invoice.viewed') AS names_tampered_row, problem
  FROM billing.verify_audit_chain();
UPDATE billing.audit_log SET details = '{"a": 1, "b": 2}' WHERE action = 'invoice.viewed';
SELECT ok FROM billing.verify_audit_chain();
-- a removed newest row is caught by the chain head
CREATE TEMP TABLE saved AS SELECT * FROM billing.audit_log ORDER BY audit_id DESC LIMIT 1;
DELETE FROM billing.audit_log WHERE audit_id = (SELECT audit_id FROM saved);
SELECT ok, first_bad_id = (SELECT audit_id FROM saved) AS names_missing_row, problem LIKE 'the newest rows are missing%' AS tail_missing
  FROM billing.verify_audit_chain();
INSERT INTO billing.audit_log SELECT * FROM saved;
SELECT ok FROM billing.verify_audit_chain();
-- a removed row in the middle shows as a gap
DELETE FROM billing.audit_log WHERE action = 'invoice.viewed';
SELECT ok, first_bad_id = (SELECT min(audit_id) FROM billing.audit_log WHERE tenant_id = 'audited' AND action = 'tenant.updated') AS names_next_row, problem
  FROM billing.verify_audit_chain();
RESET qes_billing.audit_guard;
-- every role it is granted to can run it
SET ROLE qes_admin;
SELECT ok FROM billing.verify_audit_chain();
RESET ROLE;
