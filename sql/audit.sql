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

-- only billing.audit() and billing.audit_archive() write the chain: a role
-- that may write every table (pg_write_all_data, an ETL or DBA login) forges
-- nothing.  forge() runs its statements in order and rolls them back; it
-- says which one was refused, with its SQLSTATE.
CREATE ROLE regress_audit_forger IN ROLE pg_write_all_data, pg_read_all_data;
CREATE FUNCTION pg_temp.forge(VARIADIC p_sql text[]) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  v_done int := 0;
BEGIN
  BEGIN
    FOR i IN 1 .. cardinality(p_sql) LOOP
      EXECUTE p_sql[i];
      v_done := i;
    END LOOP;
    RAISE EXCEPTION USING ERRCODE = 'QB999';
  EXCEPTION
    WHEN SQLSTATE 'QB999' THEN
      RETURN 'not refused: every statement went through';
    WHEN OTHERS THEN
      RETURN format('statement %s refused: %s %s', v_done + 1, SQLSTATE, SQLERRM);
  END;
END
$$;
SET ROLE regress_audit_forger;
-- an archive that "covers" every row, then every row deleted (which would
-- verify: 0 rows checked, from the forged archive's hash)
SELECT pg_temp.forge(
  $q$INSERT INTO billing.audit_archives (first_id, last_id, last_hash, rows_removed, export_sha256, archived_by)
     SELECT 1, h.last_id, h.last_hash, h.last_id, sha256('forged'), 'regress_audit_forger' FROM billing.audit_head h$q$,
  'DELETE FROM billing.audit_log') AS covering_archive;
-- and the delete alone, of rows no archive covers
SELECT pg_temp.forge('DELETE FROM billing.audit_log') AS delete_rows;
-- a row appended with a hash made by hand, the chain head moved to it
SELECT pg_temp.forge(
  $q$INSERT INTO billing.audit_log
     SELECT h.last_id + 1, now(), 'qes_admin', NULL, NULL, 'audited', 'invoice.refunded', '{}', h.last_hash,
            sha256(h.last_hash || '\x01'::bytea) FROM billing.audit_head h$q$,
  $q$UPDATE billing.audit_head SET last_id = last_id + 1, last_hash = sha256(last_hash || '\x01'::bytea)$q$) AS appended_row;
-- the head alone: moved, removed, upserted
SELECT pg_temp.forge('UPDATE billing.audit_head SET last_id = last_id') AS head_updated;
SELECT pg_temp.forge('DELETE FROM billing.audit_head') AS head_deleted;
SELECT pg_temp.forge($q$INSERT INTO billing.audit_head VALUES (true, 0, sha256(''))
                       ON CONFLICT (singleton) DO UPDATE SET last_id = 0$q$) AS head_upserted;
RESET ROLE;
SELECT ok, problem FROM billing.verify_audit_chain();
-- the owner (a superuser here) writes the chain as before
SELECT billing.audit('report.exported', NULL, '{"c": 3}') > 0 AS written;
SELECT ok FROM billing.verify_audit_chain();

-- an archive smuggled in by a superuser with triggers off is caught: the
-- newest archive has no audit.archived row, and archives start at row 1
BEGIN;
SET LOCAL session_replication_role = replica;
INSERT INTO billing.audit_archives (first_id, last_id, last_hash, rows_removed, export_sha256, archived_by)
SELECT 1, h.last_id, h.last_hash, h.last_id, sha256('forged'), 'postgres' FROM billing.audit_head h;
DELETE FROM billing.audit_log;
SELECT ok, rows_checked, first_bad_id, problem LIKE 'archive % (rows 1 to %) has no audit.archived row: billing.audit_archive() did not make it' AS names_archive
  FROM billing.verify_audit_chain();
ROLLBACK;
BEGIN;
SET LOCAL session_replication_role = replica;
INSERT INTO billing.audit_archives (first_id, last_id, last_hash, rows_removed, export_sha256, archived_by)
SELECT 3, 4, l.hash, 2, sha256('forged'), 'postgres' FROM billing.audit_log l WHERE l.audit_id = 4;
SELECT ok, first_bad_id, problem LIKE 'archive % (rows 3 to 4) does not follow on from the start of the chain (row 1)' AS names_gap
  FROM billing.verify_audit_chain();
ROLLBACK;
SELECT ok FROM billing.verify_audit_chain();
DROP ROLE regress_audit_forger;

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
