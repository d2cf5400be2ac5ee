-- amcheck every btree index of the schemas billing and api in the current
-- database: bt_index_check(index, heapallindexed => true) finds a heap row
-- that lacks its index entry (a direct write that skipped an index) as well
-- as broken pages.  Indexes that are not valid or not ready (a CREATE INDEX
-- CONCURRENTLY that failed or is running) cannot be checked and are skipped
-- with a NOTICE.  Each failure is a WARNING naming the index; the script
-- ends with an ERROR if any index failed or none was found, so
-- `psql -v ON_ERROR_STOP=1 -f test/tools/amcheck.sql` exits non-zero.
-- Used by the valgrind layer's own cluster; pg_regress (sql/zz_amcheck.sql),
-- isolation (zz_amcheck.spec), TAP (QesTest::amcheck_all) and pytest
-- (Cluster.amcheck) run the same check.
CREATE EXTENSION IF NOT EXISTS amcheck;
DO $$
DECLARE
  idx record;
  checked int := 0;
  failed int := 0;
  skipped int := 0;
BEGIN
  FOR idx IN
    SELECT c.oid::regclass AS name, i.indisvalid AND i.indisready AS checkable
      FROM pg_index i
      JOIN pg_class c ON c.oid = i.indexrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_am am ON am.oid = c.relam
     WHERE n.nspname IN ('billing', 'api') AND am.amname = 'btree' AND c.relkind = 'i'
     ORDER BY n.nspname, c.relname
  LOOP
    IF NOT idx.checkable THEN
      RAISE NOTICE 'amcheck: skipping %: not valid or not ready', idx.name;
      skipped := skipped + 1;
      CONTINUE;
    END IF;
    BEGIN
      PERFORM bt_index_check(idx.name, true);
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'amcheck: % failed: % (SQLSTATE %)', idx.name, SQLERRM, SQLSTATE;
      failed := failed + 1;
    END;
    checked := checked + 1;
  END LOOP;
  IF failed > 0 OR checked = 0 THEN
    RAISE EXCEPTION 'amcheck: % of % billing indexes failed (% skipped)', failed, checked, skipped;
  END IF;
  RAISE NOTICE 'amcheck: % billing indexes ok (% skipped)', checked, skipped;
END
$$;
