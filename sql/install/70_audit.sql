-- The audit log: append-only, hash-chained with SHA-256 (src/audit.c).
-- Writers serialize on the single chain-head row, so audit ids are
-- gap-free and in chain order; a missing row shows as a gap.

CREATE FUNCTION billing.audit_hash(prev bytea, audit_id bigint, occurred_at timestamptz,
                                   actor_role text, actor_sub text, actor_tenant text,
                                   tenant_id text, action text, details jsonb)
  RETURNS bytea LANGUAGE c IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_audit_hash';
COMMENT ON FUNCTION billing.audit_hash(bytea, bigint, timestamptz, text, text, text, text, text, jsonb) IS
  'SHA-256 over the previous hash and the canonical content of one audit row.';
INSERT INTO billing.audit_head VALUES (true, 0, '\x0000000000000000000000000000000000000000000000000000000000000000');

CREATE FUNCTION billing.audit(p_action text, p_tenant_id text DEFAULT NULL, p_details jsonb DEFAULT '{}')
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_head   billing.audit_head;
  v_id     bigint;
  v_at     timestamptz;
  v_role   text := billing.outer_role();
  v_claims jsonb := billing.jwt_claims();
  v_hash   bytea;
BEGIN
  IF p_action IS NULL OR p_action !~ '^[a-z_]+(\.[a-z_]+)+$' THEN
    RAISE EXCEPTION 'invalid audit action: %', coalesce(quote_literal(p_action), 'NULL')
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Actions look like "subscription.created".';
  END IF;
  -- no audit row ever holds a secret (docs/architecture.md, rule 13)
  p_details := billing.redact(coalesce(p_details, '{}'));

  SELECT * INTO v_head FROM billing.audit_head FOR UPDATE;
  -- stamped once the chain is ours: times never go back along the chain,
  -- so a period of time is a run of consecutive rows (72_audit_export.sql)
  v_at := clock_timestamp();
  v_id := v_head.last_id + 1;
  v_hash := billing.audit_hash(v_head.last_hash, v_id, v_at, v_role, v_claims ->> 'sub',
                               v_claims ->> 'tenant_id', p_tenant_id, p_action, p_details);
  INSERT INTO billing.audit_log
    VALUES (v_id, v_at, v_role, v_claims ->> 'sub', v_claims ->> 'tenant_id', p_tenant_id,
            p_action, p_details, v_head.last_hash, v_hash);
  UPDATE billing.audit_head SET last_id = v_id, last_hash = v_hash;
  RETURN v_id;
END
$$;
COMMENT ON FUNCTION billing.audit(text, text, jsonb) IS
  'Append one row to the audit log, chained to the previous one. Returns its audit_id.';

-- Who may write the chain: the owner of the audit tables (and superusers),
-- which is what billing.audit() runs as (SECURITY DEFINER) and what calls
-- billing.audit_archive() (72_audit_export.sql: superusers and the
-- extension's owner).  A role that may write every table but owns none of
-- these -- pg_write_all_data, an ETL or DBA login -- could otherwise append
-- a row with a hash it computed itself and move the chain head to it, or
-- record an archive that "covers" every row and then delete them all, and
-- the chain would still verify (docs/operations.md, "The audit chain does
-- not verify").  The check is on the role the statement runs as, which a
-- caller cannot set to the owner's (set_config can fake a setting, not
-- current_user); a pg_restore, run as a superuser or the owner, passes.
-- (Inline, not a helper function: a trigger's function needs no EXECUTE
-- right of whoever fires it, a function it calls would.)
CREATE FUNCTION billing.audit_writers_guard() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF NOT pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE') THEN
    RAISE EXCEPTION 'only billing.audit() and billing.audit_archive() write the audit chain: % on %.% is not allowed for role %',
                    TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME, current_user
      USING ERRCODE = 'insufficient_privilege',
            DETAIL = 'Audit rows, the chain head and the archives are written only as the owner of the audit tables.',
            HINT = 'Write audit rows with billing.audit(); archive with the command qes_billing_audit archive.';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
COMMENT ON FUNCTION billing.audit_writers_guard() IS
  'Trigger: refuse writes to audit_log, audit_head and audit_archives by any role without the tables'' owner''s rights (pg_write_all_data too); billing.audit() and billing.audit_archive() run as the owner.';

CREATE FUNCTION billing.audit_guard() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  -- a row covered by a recorded archive may be removed (billing.audit_archive,
  -- which runs as the owner: nobody else may delete even those)
  IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_log'
     AND pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE')
     AND EXISTS (SELECT FROM billing.audit_archives a
                  WHERE a.last_id >= OLD.audit_id AND a.first_id <= OLD.audit_id) THEN
    RETURN OLD;
  END IF;
  IF current_setting('qes_billing.audit_guard')::boolean THEN
    RAISE EXCEPTION 'the audit log is append-only: % is not allowed', TG_OP
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Audit rows are never changed or removed.';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
COMMENT ON FUNCTION billing.audit_guard() IS
  'Trigger: refuse UPDATE, DELETE and TRUNCATE of the audit log (but the owner''s DELETE of rows an archive covers) and of its archives.';

CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON billing.audit_log
  FOR EACH ROW EXECUTE FUNCTION billing.audit_guard();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON billing.audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION billing.audit_guard();
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON billing.audit_archives
  FOR EACH ROW EXECUTE FUNCTION billing.audit_guard();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON billing.audit_archives
  FOR EACH STATEMENT EXECUTE FUNCTION billing.audit_guard();
-- the writers: INSERT into the log and the archives, any change to the head
-- (named to fire before 97_dump.sql's replace_seed on audit_head)
CREATE TRIGGER chain_writers BEFORE INSERT ON billing.audit_log
  FOR EACH ROW EXECUTE FUNCTION billing.audit_writers_guard();
CREATE TRIGGER chain_writers BEFORE INSERT ON billing.audit_archives
  FOR EACH ROW EXECUTE FUNCTION billing.audit_writers_guard();
CREATE TRIGGER chain_writers BEFORE INSERT OR UPDATE OR DELETE ON billing.audit_head
  FOR EACH ROW EXECUTE FUNCTION billing.audit_writers_guard();
CREATE TRIGGER chain_writers_truncate BEFORE TRUNCATE ON billing.audit_head
  FOR EACH STATEMENT EXECUTE FUNCTION billing.audit_writers_guard();

CREATE FUNCTION billing.verify_audit_chain(
  OUT ok boolean, OUT rows_checked bigint, OUT first_bad_id bigint, OUT problem text)
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_head billing.audit_head;
  v_last billing.audit_log;
  -- where the chain in audit_log starts: after the newest archive, or at 1
  v_base_id   bigint := 0;
  v_base_hash bytea := '\x0000000000000000000000000000000000000000000000000000000000000000';
BEGIN
  SELECT a.last_id, a.last_hash INTO v_base_id, v_base_hash
    FROM billing.audit_archives a ORDER BY a.last_id DESC LIMIT 1;
  IF NOT FOUND THEN
    v_base_id := 0;
    v_base_hash := '\x0000000000000000000000000000000000000000000000000000000000000000';
  END IF;
  SELECT count(*) INTO rows_checked FROM billing.audit_log;

  -- The archives first: the chain kept starts from the newest one's last
  -- hash, so a forged archive would hide every row it claims to cover
  -- (docs/operations.md, "The audit trail out of the database").  They
  -- follow one another from row 1 without a gap or an overlap ...
  SELECT a.first_id,
         format('archive %s (rows %s to %s) does not follow on from %s', a.archive_id, a.first_id, a.last_id,
                CASE WHEN a.prev_last IS NULL THEN 'the start of the chain (row 1)'
                     ELSE 'the archive before it (rows up to ' || a.prev_last || ')' END)
    INTO first_bad_id, problem
    FROM (SELECT b.*, lag(b.last_id) OVER (ORDER BY b.first_id, b.last_id) AS prev_last
            FROM billing.audit_archives b) a
   WHERE a.first_id <> coalesce(a.prev_last, 0) + 1
   ORDER BY a.first_id, a.last_id
   LIMIT 1;
  -- ... and each is vouched for by the audit.archived row that
  -- billing.audit_archive() chained after it: the newest archive's row is
  -- always kept (its id is past the archive), an older one's may have been
  -- archived in turn; a row that is kept names the same rows, last hash and
  -- export digest.  A superuser who records an archive by hand (triggers
  -- off) has no such row to show.
  IF first_bad_id IS NULL THEN
    SELECT a.first_id,
           CASE WHEN r.audit_id IS NULL
                THEN format('archive %s (rows %s to %s) has no audit.archived row: billing.audit_archive() did not make it',
                            a.archive_id, a.first_id, a.last_id)
                ELSE format('archive %s (rows %s to %s) is not what its audit.archived row (audit_id %s) recorded',
                            a.archive_id, a.first_id, a.last_id, r.audit_id) END
      INTO first_bad_id, problem
      FROM billing.audit_archives a
      LEFT JOIN billing.audit_log r
        ON r.action = 'audit.archived' AND r.details ->> 'last_id' = a.last_id::text
     WHERE (r.audit_id IS NULL AND a.last_id = v_base_id)
        OR (r.audit_id IS NOT NULL
            AND (r.audit_id <= a.last_id
                 OR r.details ->> 'first_id' IS DISTINCT FROM a.first_id::text
                 OR r.details ->> 'last_hash' IS DISTINCT FROM encode(a.last_hash, 'hex')
                 OR r.details ->> 'export_sha256' IS DISTINCT FROM encode(a.export_sha256, 'hex')))
     ORDER BY a.first_id
     LIMIT 1;
  END IF;
  -- every audit.archived row kept has its archive (one removed by hand)
  IF first_bad_id IS NULL THEN
    SELECT r.audit_id,
           format('the archive of rows %s to %s that this audit.archived row records is missing',
                  r.details ->> 'first_id', r.details ->> 'last_id')
      INTO first_bad_id, problem
      FROM billing.audit_log r
     WHERE r.action = 'audit.archived'
       AND NOT EXISTS (SELECT FROM billing.audit_archives a WHERE r.details ->> 'last_id' = a.last_id::text)
     ORDER BY r.audit_id
     LIMIT 1;
  END IF;

  IF first_bad_id IS NULL THEN
    SELECT c.audit_id,
           CASE
             WHEN c.prev_id IS NULL AND c.audit_id <> v_base_id + 1 THEN 'rows before this one are missing'
             WHEN c.prev_id IS NOT NULL AND c.audit_id <> c.prev_id + 1 THEN 'rows before this one are missing'
             WHEN c.prev_hash <> coalesce(c.chain_prev, v_base_hash)
               THEN 'prev_hash does not match the previous row'
             ELSE 'content does not match its hash'
           END
      INTO first_bad_id, problem
      FROM (SELECT a.*,
                   lag(a.hash) OVER w AS chain_prev,
                   lag(a.audit_id) OVER w AS prev_id
              FROM billing.audit_log a
            WINDOW w AS (ORDER BY a.audit_id)) c
     WHERE (c.prev_id IS NULL AND c.audit_id <> v_base_id + 1)
        OR (c.prev_id IS NOT NULL AND c.audit_id <> c.prev_id + 1)
        OR c.prev_hash <> coalesce(c.chain_prev, v_base_hash)
        OR c.hash <> billing.audit_hash(c.prev_hash, c.audit_id, c.occurred_at, c.actor_role, c.actor_sub,
                                        c.actor_tenant, c.tenant_id, c.action, c.details)
     ORDER BY c.audit_id
     LIMIT 1;
  END IF;

  IF first_bad_id IS NULL THEN
    SELECT * INTO v_head FROM billing.audit_head;
    SELECT * INTO v_last FROM billing.audit_log ORDER BY audit_id DESC LIMIT 1;
    IF v_head.last_id IS NULL THEN
      first_bad_id := coalesce(v_last.audit_id, v_base_id) + 1;
      problem := 'the chain head (billing.audit_head) is missing';
    ELSIF v_head.last_id <> coalesce(v_last.audit_id, v_base_id)
       OR v_head.last_hash <> coalesce(v_last.hash, v_head.last_hash) THEN
      first_bad_id := coalesce(v_last.audit_id, v_base_id) + 1;
      problem := 'the newest rows are missing (the chain head is at ' || v_head.last_id || ')';
    END IF;
  END IF;
  ok := first_bad_id IS NULL;
END
$$;
COMMENT ON FUNCTION billing.verify_audit_chain() IS
  'Check that the archives follow one another from row 1, each recorded by its audit.archived row; walk the audit chain from the newest archive''s last hash (or from the start); report the first archive or row whose link or hash does not match, or that newest rows are missing.';
