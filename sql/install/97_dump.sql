-- What pg_dump keeps (docs/architecture.md, rule 11: a pg_dump restores into a
-- working system).  pg_dump leaves out the rows of tables an extension created
-- unless they are marked with pg_extension_config_dump(); on restore, CREATE
-- EXTENSION runs this script again and then the dumped rows are loaded into
-- the tables it made.  So:
--
--   * tenant data, the queues and the audit log are dumped whole;
--   * the seeded tables (metrics, plans, plan_limits, prices, clock,
--     audit_head) are dumped without the rows that are still exactly as
--     CREATE EXTENSION made them (it makes them again), and a row loaded with
--     the key of a seed row that is still as installed replaces it (trigger
--     replace_seed): an operator's limit change, the Stripe ids written by
--     setup, the clock and the audit chain head survive, and no seed row is
--     doubled;
--   * the identity sequences are dumped, so ids go on after the restored rows;
--   * billing.stripe_secrets is never dumped (rule 13): after a restore the
--     webhook secret is configured again (docs/operations.md, "Backup and restore").
--
-- A seed row that was deleted comes back on restore (CREATE EXTENSION makes
-- it): retire a plan or price with active = false, lift a limit with
-- soft_limit = NULL, and keep the seed keys.

INSERT INTO billing.seed_rows
SELECT 'metrics', pg_catalog.to_jsonb(t) FROM billing.metrics t
UNION ALL SELECT 'plans', pg_catalog.to_jsonb(t) FROM billing.plans t
UNION ALL SELECT 'plan_limits', pg_catalog.to_jsonb(t) FROM billing.plan_limits t
UNION ALL SELECT 'prices', pg_catalog.to_jsonb(t) FROM billing.prices t
UNION ALL SELECT 'clock', pg_catalog.to_jsonb(t) FROM billing.clock t
UNION ALL SELECT 'audit_head', pg_catalog.to_jsonb(t) FROM billing.audit_head t;

-- Whether a row is still as seeded, as an SQL expression over a table
-- alias: pg_dump's filter for the seeded tables, and the test of the
-- trigger below.  The stored seed is read back into the row type and
-- compared as typed values, so settings such as IntervalStyle or
-- bytea_output, which pg_dump and the installing session may set
-- differently, do not matter; a column the stored seed lacks (added by a
-- later version) is not compared.  pg_dump runs the filter with an empty
-- search_path, and with the rights of whoever dumps (a member of
-- pg_read_all_data can read seed_rows, but may execute no billing
-- function): so it is plain, qualified SQL.
CREATE FUNCTION billing.seed_row_test(p_table text, p_alias text) RETURNS text
  LANGUAGE sql STABLE STRICT
RETURN pg_catalog.format(
  'EXISTS (SELECT FROM billing.seed_rows s WHERE s.relname OPERATOR(pg_catalog.=) %L'
  ' AND pg_catalog.jsonb_populate_record(%I.*, s."row") IS NOT DISTINCT FROM %I.*)',
  p_table, p_alias, p_alias);
COMMENT ON FUNCTION billing.seed_row_test(text, text) IS
  'The SQL condition "this row of the seeded table is still exactly as CREATE EXTENSION made it", over a table alias.';

-- A row inserted with the primary key of a row that is still its seed
-- replaces that row instead of failing on the key: this is how a restore
-- puts a changed seed row (dumped) over the seed CREATE EXTENSION just made.
-- The row is updated in place, never deleted, so ON DELETE CASCADE and
-- foreign keys into it are not disturbed.  Any other insert proceeds (a
-- duplicate of a changed row still fails with 23505).  It runs with the
-- rights of the inserter, who needs the table owner's (as for every
-- catalog change: nothing on these tables is granted).
CREATE FUNCTION billing.replace_seed_row() RETURNS trigger
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_match text;
  v_cols  text;
  v_seed  boolean;
BEGIN
  SELECT string_agg(format('t.%1$I = ($1).%1$I', a.attname), ' AND ')
    INTO v_match
    FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
   WHERE i.indrelid = TG_RELID AND i.indisprimary;
  IF v_match IS NULL THEN
    RAISE EXCEPTION 'table % has no primary key', TG_RELID::regclass
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  EXECUTE format('SELECT %s FROM %s t WHERE %s FOR UPDATE',
                 billing.seed_row_test(TG_TABLE_NAME, 't'), TG_RELID::regclass, v_match)
     INTO v_seed USING NEW;
  IF v_seed IS NOT TRUE THEN
    RETURN NEW;   -- no row with this key, or one that is no longer its seed
  END IF;

  SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
    INTO v_cols
    FROM pg_attribute a
   WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
  EXECUTE format('UPDATE %s t SET (%s) = (SELECT %s FROM (SELECT ($1).*) n) WHERE %s',
                 TG_RELID::regclass, v_cols, v_cols, v_match)
    USING NEW;
  RETURN NULL;    -- the seed row now holds it
END
$$;
COMMENT ON FUNCTION billing.replace_seed_row() IS
  'Trigger: an inserted row whose primary key is that of a row still as seeded replaces that row (how a restore loads a changed seed row).';

DO $dump$
DECLARE
  t text;
BEGIN
  -- the seeded tables: every row but those still as seeded
  FOREACH t IN ARRAY ARRAY['metrics', 'plans', 'plan_limits', 'prices', 'clock', 'audit_head'] LOOP
    EXECUTE format('CREATE TRIGGER replace_seed BEFORE INSERT ON billing.%I
                      FOR EACH ROW EXECUTE FUNCTION billing.replace_seed_row()', t);
    PERFORM pg_catalog.pg_extension_config_dump(format('billing.%I', t)::regclass,
              'WHERE NOT ' || billing.seed_row_test(t, t));
  END LOOP;

  -- tenant data, queues, the audit log: every row
  FOREACH t IN ARRAY ARRAY['tenants', 'subscriptions', 'usage_events', 'invoices', 'payments', 'disputes',
                           'notifications', 'stripe_requests', 'webhook_events', 'webhook_rejections',
                           'audit_log', 'stripe_customers', 'invoice_payments', 'webhook_waits',
                           'reconcile_runs', 'drift_repairs', 'reconcile_state', 'invoice_failures',
                           'partition_fences', 'partition_move_log', 'cluster_identity'] LOOP
    PERFORM pg_catalog.pg_extension_config_dump(format('billing.%I', t)::regclass, '');
  END LOOP;

  -- the identity sequences, so that new ids follow the restored rows
  FOR t IN SELECT pg_catalog.pg_get_serial_sequence(format('billing.%I', c.relname), a.attname)
             FROM pg_catalog.pg_attribute a
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
            WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
              AND a.attidentity <> '' AND NOT a.attisdropped
            ORDER BY 1 LOOP
    PERFORM pg_catalog.pg_extension_config_dump(t::regclass, '');
  END LOOP;

  -- billing.seed_rows (made by this script) and billing.stripe_secrets
  -- (secrets stay out of dumps) are not dumped.
END
$dump$;

-- Usage billed through meters (94_meters.sql): the operator's metered
-- prices, the meters setup made, which usage rows went to Stripe in which
-- meter event (what makes a restore send nothing twice) and the invoices'
-- lines: every row.
-- (one call per statement: each updates the extension's catalog row)
DO $meters$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['metered_prices', 'meters', 'meter_events', 'meter_event_usage', 'meter_state',
                           'invoice_lines'] LOOP
    PERFORM pg_catalog.pg_extension_config_dump(format('billing.%I', t)::regclass, '');
  END LOOP;
END
$meters$;

-- Tax (91_tax.sql): the tenants' billing details, the invoices' and
-- one-time payments' tax as Stripe computed it: every row.
DO $tax$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['billing_details', 'invoice_taxes', 'payment_taxes'] LOOP
    PERFORM pg_catalog.pg_extension_config_dump(format('billing.%I', t)::regclass, '');
  END LOOP;
END
$tax$;
