-- Last test of the pg_regress layer: every btree index of the schemas
-- billing and api in the regression database passes amcheck
-- (bt_index_check with heapallindexed: every heap row has its index
-- entry).  The direct-write paths insert index entries themselves, so a
-- path that skips an index fails here.  Only the number of failures and
-- the failing indexes are printed, so new indexes do not change the
-- expected output.  Indexes that are not valid or not ready are skipped.
CREATE EXTENSION IF NOT EXISTS amcheck;
CREATE FUNCTION pg_temp.amcheck_billing(OUT index_name regclass, OUT error text)
RETURNS SETOF record LANGUAGE plpgsql AS $$
BEGIN
  FOR index_name IN
    SELECT c.oid::regclass
      FROM pg_index i
      JOIN pg_class c ON c.oid = i.indexrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_am am ON am.oid = c.relam
     WHERE n.nspname IN ('billing', 'api') AND am.amname = 'btree' AND c.relkind = 'i'
       AND i.indisvalid AND i.indisready
     ORDER BY n.nspname, c.relname
  LOOP
    BEGIN
      PERFORM bt_index_check(index_name, true);
      error := NULL;
    EXCEPTION WHEN OTHERS THEN
      error := SQLSTATE || ': ' || SQLERRM;
    END;
    RETURN NEXT;
  END LOOP;
END
$$;
CREATE TEMP TABLE amcheck_result AS SELECT * FROM pg_temp.amcheck_billing();
-- enough indexes were checked for the check to mean something, none failed
SELECT count(*) >= 10 AS indexes_checked, count(error) AS failures FROM amcheck_result;
SELECT index_name, error FROM amcheck_result WHERE error IS NOT NULL;
