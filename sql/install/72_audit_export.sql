-- The audit trail leaves the database: an export of a period that can be
-- verified without PostgreSQL (src/qes_billing_audit_verify), and archival
-- of the rows older than qes_billing.audit_retention (exported, then
-- removed, the chain going on from the archive's last hash).
--
-- A period [from, to) is a run of consecutive rows of the chain: the rows
-- after the boundary of `from` up to the boundary of `to`, the boundary of
-- a time being the newest row stamped before it (billing.audit_boundary).
-- billing.audit() stamps a row once it holds the chain head, so times never
-- go back along the chain; and consecutive periods [a, b), [b, c) are
-- consecutive runs, so their exports chain together: the second's
-- prev_hash is the first's last_hash.
--
-- An export is JSON Lines (docs/architecture.md, "Audit exports"):
--   {"format": "qes_billing.audit_export", "version": 1, "from", "to",
--    "first_id", "last_id", "rows", "prev_hash", "exported_at"}
--   one line per row: audit_id, occurred_at (UTC, microseconds), actor_role,
--    actor_sub, actor_tenant, tenant_id, action, details (jsonb's canonical
--    text, exactly what was hashed), prev_hash, hash
--   {"end": true, "rows", "last_id", "last_hash"}
-- Hashes are lower-case hex.

SELECT pg_catalog.pg_extension_config_dump('billing.audit_archives', '');

CREATE FUNCTION billing.audit_chain_base(OUT base_id bigint, OUT base_hash bytea)
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
BEGIN ATOMIC
  SELECT coalesce(max(a.last_id), 0),
         coalesce((SELECT b.last_hash FROM billing.audit_archives b ORDER BY b.last_id DESC LIMIT 1),
                  '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
    FROM billing.audit_archives a;
END;
COMMENT ON FUNCTION billing.audit_chain_base() IS
  'Where the chain kept in audit_log starts: the last id and hash of the newest archive, or 0 and 32 zero bytes.';

CREATE FUNCTION billing.audit_boundary(p_at timestamptz) RETURNS bigint
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
BEGIN ATOMIC
  SELECT greatest(coalesce((SELECT max(l.audit_id) FROM billing.audit_log l WHERE l.occurred_at < p_at), 0),
                  (SELECT b.base_id FROM billing.audit_chain_base() b));
END;
COMMENT ON FUNCTION billing.audit_boundary(timestamptz) IS
  'The id of the newest audit row stamped before this time (or where the kept chain starts): periods of audit exports end at it.';

CREATE FUNCTION billing.audit_export(p_from timestamptz, p_to timestamptz) RETURNS SETOF text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_first bigint;
  v_last  bigint;
  v_prev  bytea;
  v_end   bytea;
  v_base  record;
  v_rows  bigint;
BEGIN
  IF p_from IS NULL OR p_to IS NULL THEN
    RAISE EXCEPTION 'audit export: the period needs both ends (from %, to %)',
                    coalesce(p_from::text, 'NULL'), coalesce(p_to::text, 'NULL')
      USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Give a start and an end; ''-infinity'' starts at the oldest row kept.';
  END IF;
  IF p_from > p_to THEN
    RAISE EXCEPTION 'audit export: the period ends (%) before it starts (%)', p_to, p_from
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Swap from and to.';
  END IF;
  IF p_to > clock_timestamp() THEN
    RAISE EXCEPTION 'audit export: the period ends in the future (%)', p_to
      USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Rows may still be added to a period that has not ended, and its export would not chain with the next one.',
            HINT = 'Export periods that have ended; now() is the latest end.';
  END IF;

  -- Wait for a writer that holds the chain head (it may be stamping a row
  -- before p_to) to finish, without keeping writers out while the rows are
  -- read: the share lock is taken in a subtransaction that is rolled back,
  -- which releases it.  Any writer after this stamps its row after p_to.
  BEGIN
    PERFORM FROM billing.audit_head FOR SHARE;
    RAISE EXCEPTION USING ERRCODE = 'QB001';
  EXCEPTION WHEN SQLSTATE 'QB001' THEN
    NULL;
  END;

  SELECT * INTO v_base FROM billing.audit_chain_base();
  v_first := billing.audit_boundary(p_from) + 1;
  v_last := greatest(billing.audit_boundary(p_to), v_first - 1);
  v_prev := CASE WHEN v_first - 1 = v_base.base_id THEN v_base.base_hash
                 ELSE (SELECT l.hash FROM billing.audit_log l WHERE l.audit_id = v_first - 1) END;
  v_end := CASE WHEN v_last = v_first - 1 THEN v_prev
                ELSE (SELECT l.hash FROM billing.audit_log l WHERE l.audit_id = v_last) END;
  SELECT count(*) INTO v_rows FROM billing.audit_log l WHERE l.audit_id BETWEEN v_first AND v_last;

  RETURN NEXT json_build_object(
    'format', 'qes_billing.audit_export', 'version', 1,
    'from', CASE WHEN isfinite(p_from) THEN to_char(p_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END,
    'to', CASE WHEN isfinite(p_to) THEN to_char(p_to AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END,
    'first_id', v_first, 'last_id', v_last, 'rows', v_rows,
    'prev_hash', encode(v_prev, 'hex'),
    'exported_at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text;

  RETURN QUERY
    SELECT json_build_object(
             'audit_id', l.audit_id,
             'occurred_at', to_char(l.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
             'actor_role', l.actor_role, 'actor_sub', l.actor_sub, 'actor_tenant', l.actor_tenant,
             'tenant_id', l.tenant_id, 'action', l.action,
             'details', l.details::text,
             'prev_hash', encode(l.prev_hash, 'hex'), 'hash', encode(l.hash, 'hex'))::text
      FROM billing.audit_log l
     WHERE l.audit_id BETWEEN v_first AND v_last
     ORDER BY l.audit_id;

  RETURN NEXT json_build_object('end', true, 'rows', v_rows, 'last_id', v_last,
                                'last_hash', encode(v_end, 'hex'))::text;
END
$$;
COMMENT ON FUNCTION billing.audit_export(timestamptz, timestamptz) IS
  'The audit rows of the period [from, to) as JSON Lines: a header with the hash of the row before the period, the rows with everything their hashes cover, a trailer with the last hash. src/qes_billing_audit_verify checks it offline; consecutive periods chain.';

CREATE FUNCTION billing.audit_archive_cutoff() RETURNS timestamptz
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_retention interval := current_setting('qes_billing.audit_retention')::interval;
BEGIN
  IF v_retention = interval '0' THEN
    RETURN NULL;
  END IF;
  RETURN least(billing.now() - v_retention, now());
END
$$;
COMMENT ON FUNCTION billing.audit_archive_cutoff() IS
  'Audit rows stamped before this time are past qes_billing.audit_retention and may be archived; NULL when rows are kept for ever.';

CREATE FUNCTION billing.audit_archive(p_first_id bigint, p_last_id bigint, p_last_hash bytea,
                                      p_export_sha256 bytea)
  RETURNS billing.audit_archives
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_cutoff timestamptz := billing.audit_archive_cutoff();
  v_base   record;
  v_hash   bytea;
  v_row    billing.audit_archives;
  v_gone   bigint;
BEGIN
  IF v_cutoff IS NULL THEN
    RAISE EXCEPTION 'audit archive: qes_billing.audit_retention is 0, audit rows are kept for ever'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'Set qes_billing.audit_retention (e.g. 3650d) to archive older rows.';
  END IF;
  IF p_first_id IS NULL OR p_last_id IS NULL OR p_last_hash IS NULL OR p_export_sha256 IS NULL THEN
    RAISE EXCEPTION 'audit archive: first_id, last_id, last_hash and export_sha256 are all needed'
      USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Archive with the command qes_billing_audit archive, which fills them from the export it wrote.';
  END IF;
  IF octet_length(p_last_hash) <> 32 OR octet_length(p_export_sha256) <> 32 THEN
    RAISE EXCEPTION 'audit archive: last_hash and export_sha256 must be SHA-256 digests (32 bytes)'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass them as decode(<64 hex digits>, ''hex'').';
  END IF;

  LOCK TABLE billing.audit_archives IN SHARE ROW EXCLUSIVE MODE;
  SELECT * INTO v_base FROM billing.audit_chain_base();
  IF p_first_id <> v_base.base_id + 1 THEN
    RAISE EXCEPTION 'audit archive: the export starts at row %, but the rows kept start at row %',
                    p_first_id, v_base.base_id + 1
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Archives follow one another without a gap: export from ''-infinity''.';
  END IF;
  IF p_last_id < p_first_id THEN
    RAISE EXCEPTION 'audit archive: no rows to archive (rows % to %)', p_first_id, p_last_id
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Nothing is older than the retention yet.';
  END IF;
  IF p_last_id > billing.audit_boundary(v_cutoff) THEN
    RAISE EXCEPTION 'audit archive: row % is not older than the retention (rows stamped before % may go)',
                    p_last_id, v_cutoff
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Export up to billing.audit_archive_cutoff() and archive that.';
  END IF;
  SELECT l.hash INTO v_hash FROM billing.audit_log l WHERE l.audit_id = p_last_id;
  IF v_hash IS DISTINCT FROM p_last_hash THEN
    RAISE EXCEPTION 'audit archive: the export''s last hash does not match row % in the database', p_last_id
      USING ERRCODE = 'data_exception',
            HINT = 'The export is not of this database''s chain, or a row changed: verify both before removing anything.';
  END IF;

  INSERT INTO billing.audit_archives (first_id, last_id, last_hash, rows_removed, export_sha256, archived_by)
  VALUES (p_first_id, p_last_id, p_last_hash, p_last_id - p_first_id + 1, p_export_sha256, billing.outer_role())
  RETURNING * INTO v_row;
  DELETE FROM billing.audit_log l WHERE l.audit_id BETWEEN p_first_id AND p_last_id;
  GET DIAGNOSTICS v_gone = ROW_COUNT;
  IF v_gone <> v_row.rows_removed THEN
    RAISE EXCEPTION 'audit archive: % rows were to be removed, % were found', v_row.rows_removed, v_gone
      USING ERRCODE = 'data_exception',
            HINT = 'Rows are missing from the chain: SELECT * FROM billing.verify_audit_chain();';
  END IF;
  PERFORM billing.audit('audit.archived', NULL,
    jsonb_build_object('first_id', p_first_id, 'last_id', p_last_id, 'rows', v_gone,
                       'last_hash', encode(p_last_hash, 'hex'),
                       'export_sha256', encode(p_export_sha256, 'hex'),
                       'retention', current_setting('qes_billing.audit_retention'),
                       'cutoff', v_cutoff));
  RETURN v_row;
END
$$;
COMMENT ON FUNCTION billing.audit_archive(bigint, bigint, bytea, bytea) IS
  'Remove the audit rows first_id..last_id, past the retention and held by a verified export (its last hash and SHA-256 given), and record the archive; the chain in audit_log goes on from its last hash. Audited as audit.archived.';
