-- Correct under real operations (docs/architecture.md): writes go through
-- PostgreSQL's machinery for the relation as it is now, read-only
-- transactions are refused, caches never hold what no transaction
-- committed, totals never wrap, counters compare 64-bit xids.
\set VERBOSITY default
-- at a fixed date through the billing clock (the evening of Mar 1 2028, as sql/usage.sql)
SELECT billing.set_clock('2028-03-01 22:30:00+00' - now()) IS NOT NULL AS clock_set;
SELECT (billing.upsert_tenant('ops', 'Ops Ltd', 'ops@t.example')).tenant_id;

-- ---- read-only transactions: 25006, nothing written -----------------------
BEGIN READ ONLY;
SELECT * FROM billing.record_usage('ops', 'signatures', 1, 'ro-1');
ROLLBACK;
\echo :LAST_ERROR_SQLSTATE
BEGIN READ ONLY;
SELECT set_config('request.headers', '{"stripe-signature": "t=1,v1=00"}', true) IS NOT NULL AS h;
SELECT api.stripe_webhook('{"id": "evt_ro", "type": "invoice.paid", "created": 1, "livemode": false, "data": {"object": {}}}');
ROLLBACK;
\echo :LAST_ERROR_SQLSTATE
-- how an old primary is fenced
SET default_transaction_read_only = on;
SELECT * FROM billing.record_usage('ops', 'signatures', 1, 'ro-2');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM billing.record_usage_batch('ops', '[{"metric": "signatures", "quantity": 1, "idempotency_key": "ro-3"}]');
\echo :LAST_ERROR_SQLSTATE
-- reading is fine
SELECT allowed, current FROM billing.check_limit('ops', 'signatures', 0);
RESET default_transaction_read_only;
SELECT count(*) AS rows_written FROM billing.usage_events WHERE tenant_id = 'ops';
SELECT count(*) AS events_written FROM billing.webhook_events WHERE stripe_event_id = 'evt_ro';

-- ---- caches hold only what committed --------------------------------------
-- a limit change in a transaction that rolls back: seen inside it, gone after
SELECT usage_limit FROM billing.check_limit('ops', 'signatures', 0);
BEGIN;
UPDATE billing.plan_limits SET soft_limit = 999999 WHERE plan_id = 'free' AND metric = 'signatures';
SELECT usage_limit FROM billing.check_limit('ops', 'signatures', 0);
ROLLBACK;
SELECT usage_limit FROM billing.check_limit('ops', 'signatures', 0);
-- the same when the cache is first loaded inside that transaction
BEGIN;
UPDATE billing.plan_limits SET soft_limit = 999998 WHERE plan_id = 'free' AND metric = 'signatures';
UPDATE billing.plan_limits SET soft_limit = 999997 WHERE plan_id = 'free' AND metric = 'documents';
SELECT metric, usage_limit FROM billing.usage_current('ops') WHERE metric IN ('signatures', 'documents') ORDER BY 1;
ROLLBACK;
SELECT metric, usage_limit FROM billing.usage_current('ops') WHERE metric IN ('signatures', 'documents') ORDER BY 1;
-- and in a subtransaction that rolls back
BEGIN;
SAVEPOINT a;
UPDATE billing.plan_limits SET soft_limit = 999996 WHERE plan_id = 'free' AND metric = 'signatures';
SELECT usage_limit FROM billing.check_limit('ops', 'signatures', 0);
ROLLBACK TO SAVEPOINT a;
SELECT usage_limit FROM billing.check_limit('ops', 'signatures', 0);
COMMIT;
-- a tenant registered in a transaction that rolls back does not exist after it
BEGIN;
SELECT (billing.upsert_tenant('ops_ghost', 'Ghost', 'g@t.example')).tenant_id;
SELECT recorded FROM billing.record_usage('ops_ghost', 'signatures', 1, 'ghost-1');
ROLLBACK;
SELECT * FROM billing.check_limit('ops_ghost', 'signatures', 0);
SELECT * FROM billing.record_usage('ops_ghost', 'signatures', 1, 'ghost-2');
SELECT count(*) AS ghost_rows FROM billing.usage_events WHERE tenant_id = 'ops_ghost';
-- a committed change is seen at once
UPDATE billing.plan_limits SET soft_limit = 12 WHERE plan_id = 'free' AND metric = 'signatures';
SELECT usage_limit FROM billing.check_limit('ops', 'signatures', 0);
UPDATE billing.plan_limits SET soft_limit = 10 WHERE plan_id = 'free' AND metric = 'signatures';
SELECT usage_limit FROM billing.check_limit('ops', 'signatures', 0);

-- ---- index DDL: the next write reaches the relation as it is now ----------
SELECT recorded FROM billing.record_usage('ops', 'signatures', 1, 'ddl-0');
CREATE INDEX usage_events_ops_extra ON billing.usage_events (occurred_at);
SELECT recorded FROM billing.record_usage('ops', 'signatures', 1, 'ddl-1');
REINDEX TABLE CONCURRENTLY billing.usage_events;
SELECT recorded FROM billing.record_usage('ops', 'signatures', 1, 'ddl-2');
SELECT recorded, duplicate FROM billing.record_usage('ops', 'signatures', 1, 'ddl-1');
ALTER TABLE billing.usage_events ADD COLUMN ops_note text NOT NULL DEFAULT 'later version';
SELECT recorded FROM billing.record_usage('ops', 'signatures', 1, 'ddl-3');
SELECT idempotency_key, ops_note FROM billing.usage_events WHERE tenant_id = 'ops' ORDER BY 1;
-- the same for the inbox
CREATE INDEX webhook_events_ops_extra ON billing.webhook_events (event_type);
REINDEX TABLE CONCURRENTLY billing.webhook_events;
CREATE EXTENSION IF NOT EXISTS amcheck;
SELECT count(*) AS indexes_checked
  FROM (SELECT bt_index_check(c.oid, true)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid IN ('billing.usage_events'::regclass, 'billing.webhook_events'::regclass)) x;
DROP EXTENSION amcheck;
ALTER TABLE billing.usage_events DROP COLUMN ops_note;
DROP INDEX billing.usage_events_ops_extra;
DROP INDEX billing.webhook_events_ops_extra;
SELECT recorded FROM billing.record_usage('ops', 'signatures', 1, 'ddl-4');

-- ---- a DBA's triggers and constraints reach record_usage's write -------------
-- (src/insert_once.c: row triggers, statement triggers other than the
-- extension's own, CHECK constraints, as for an INSERT)
CREATE TABLE ops_trigger_log (what text, key text);
CREATE FUNCTION ops_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.metadata := coalesce(NEW.metadata, '{}') || '{"stamped": true}'; RETURN NEW; END $$;
CREATE FUNCTION ops_row_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO ops_trigger_log VALUES (TG_WHEN || ' ' || TG_LEVEL, NEW.idempotency_key); RETURN NULL; END $$;
CREATE FUNCTION ops_stmt_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO ops_trigger_log VALUES (TG_WHEN || ' ' || TG_LEVEL, NULL); RETURN NULL; END $$;
CREATE TRIGGER ops_stamp BEFORE INSERT ON billing.usage_events FOR EACH ROW EXECUTE FUNCTION ops_stamp();
CREATE TRIGGER ops_row_log AFTER INSERT ON billing.usage_events FOR EACH ROW EXECUTE FUNCTION ops_row_log();
CREATE TRIGGER ops_stmt_log BEFORE INSERT ON billing.usage_events FOR EACH STATEMENT EXECUTE FUNCTION ops_stmt_log();
SELECT current AS before_triggers FROM billing.check_limit('ops', 'signatures', 0);
SELECT recorded, total FROM billing.record_usage('ops', 'signatures', 1, 'trg-1');
SELECT recorded, duplicate, total FROM billing.record_usage('ops', 'signatures', 1, 'trg-1');
SELECT metadata FROM billing.usage_events WHERE tenant_id = 'ops' AND idempotency_key = 'trg-1';
-- the AFTER ROW trigger saw the new row once; the statement trigger fired per call
SELECT what, key FROM ops_trigger_log ORDER BY what, key;
-- record_usage's own row did not reset the counters (usage_changed knows it)
SELECT current AS after_triggers FROM billing.check_limit('ops', 'signatures', 0);
-- a CHECK constraint refuses the row: nothing is written, nothing counted
ALTER TABLE billing.usage_events ADD CONSTRAINT ops_small CHECK (quantity < 1000) NOT VALID;
\set VERBOSITY terse
SELECT * FROM billing.record_usage('ops', 'api_calls', 5000, 'trg-big');
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS big_rows FROM billing.usage_events WHERE idempotency_key = 'trg-big';
-- caught in a subtransaction, the error leaves nothing behind
DO $$
BEGIN
  PERFORM billing.record_usage('ops', 'api_calls', 5000, 'trg-big');
EXCEPTION WHEN check_violation THEN
  RAISE NOTICE 'caught %', SQLSTATE;
END $$;
ALTER TABLE billing.usage_events DROP CONSTRAINT ops_small;
-- the dropped constraint is not kept by the backend
SELECT recorded FROM billing.record_usage('ops', 'api_calls', 5000, 'trg-big');
-- another unique index that a repeated key would violate: the key is looked
-- for first, and the repeat is a duplicate, not 23505
CREATE UNIQUE INDEX ops_unique_keys ON billing.usage_events (idempotency_key) WHERE tenant_id = 'ops';
SELECT recorded, duplicate FROM billing.record_usage('ops', 'api_calls', 5000, 'trg-big');
SELECT recorded FROM billing.record_usage('ops', 'api_calls', 1, 'trg-unique-new');
DROP INDEX billing.ops_unique_keys;
-- a column whose type a DBA changed: a clear error, never a misread value
ALTER TABLE billing.usage_events ALTER COLUMN quantity TYPE numeric;
SELECT * FROM billing.record_usage('ops', 'api_calls', 1, 'trg-numeric');
\echo :LAST_ERROR_SQLSTATE
ALTER TABLE billing.usage_events ALTER COLUMN quantity TYPE bigint;
SELECT recorded FROM billing.record_usage('ops', 'api_calls', 1, 'trg-numeric');
-- a BEFORE trigger that skips the row is an error, not a silent loss
CREATE OR REPLACE FUNCTION ops_stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
SELECT * FROM billing.record_usage('ops', 'signatures', 1, 'trg-skipped');
\echo :LAST_ERROR_SQLSTATE
DROP TRIGGER ops_stamp ON billing.usage_events;
DROP TRIGGER ops_row_log ON billing.usage_events;
DROP TRIGGER ops_stmt_log ON billing.usage_events;
DROP FUNCTION ops_stamp(), ops_row_log(), ops_stmt_log();
DROP TABLE ops_trigger_log;
-- one key twice in one statement: the second is the first's duplicate
SELECT g, r.recorded, r.duplicate FROM generate_series(1, 2) g,
       LATERAL billing.record_usage('ops', 'signatures', 1, 'trg-twice' || repeat('x', g * 0)) r ORDER BY g;
-- and the same at REPEATABLE READ
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT recorded FROM billing.record_usage('ops', 'signatures', 1, 'trg-rr');
SELECT recorded, duplicate FROM billing.record_usage('ops', 'signatures', 1, 'trg-rr');
COMMIT;
SELECT current AS after_all FROM billing.check_limit('ops', 'signatures', 0);

-- ---- totals never wrap -------------------------------------------------------
SELECT (billing.upsert_tenant('ops_big', 'Big', 'big@t.example')).tenant_id;
SELECT recorded, total, status FROM billing.record_usage('ops_big', 'api_calls', 9223372036854775806, 'big-1');
SELECT * FROM billing.record_usage('ops_big', 'api_calls', 2, 'big-2');
\echo :LAST_ERROR_SQLSTATE
-- nothing was written by the refused call; a repeat of the first key is still its result
SELECT count(*) AS big_rows FROM billing.usage_events WHERE tenant_id = 'ops_big';
SELECT recorded, duplicate, total FROM billing.record_usage('ops_big', 'api_calls', 9223372036854775806, 'big-1');
SELECT recorded, total FROM billing.record_usage('ops_big', 'api_calls', 1, 'big-3');
SELECT allowed, status, current FROM billing.check_limit('ops_big', 'api_calls', 5);
-- rows whose sum passes int8 (written past record_usage): answers saturate, never 22003
INSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at)
SELECT 'ops_big', 'direct-' || i, 'documents', 9223372036854775807,
       (SELECT u.period_start FROM billing.usage_current('ops_big') u WHERE u.metric = 'documents'), billing.now()
  FROM generate_series(1, 2) i;
SELECT current, status FROM billing.check_limit('ops_big', 'documents', 0);
SELECT used, status FROM billing.usage_current('ops_big') WHERE metric = 'documents';
SELECT metric, used FROM billing.usage_report('ops_big') WHERE metric = 'documents';
SELECT metric, used_max FROM billing.usage_patterns WHERE metric = 'documents';
-- a quantity of zero or less is refused as before
SELECT * FROM billing.record_usage('ops_big', 'api_calls', -9223372036854775808, 'big-4');

-- ---- counters compare 64-bit transaction ids --------------------------------
-- a snapshot built at xid 1000 (xmin 990, 995 in progress), judged against committers
SELECT billing.counter_delta_seen(990, 1000, '{995}', 980) AS before_xmin,
       billing.counter_delta_seen(990, 1000, '{995}', 995) AS in_progress,
       billing.counter_delta_seen(990, 1000, '{995}', 996) AS committed_before,
       billing.counter_delta_seen(990, 1000, '{995}', 1000) AS at_xmax,
       billing.counter_delta_seen(990, 1000, NULL, 996) AS too_many_to_keep;
-- the same snapshot judged 2^31 and 2^32 transactions later: still not seen
-- (32-bit xids compare the first as "older than the build" and drop its delta)
SELECT billing.counter_delta_seen(990, 1000, '{995}', 1000 + 2147483648) AS after_2_31,
       billing.counter_delta_seen(990, 1000, '{995}', 1000 + 4294967296) AS after_2_32,
       billing.counter_delta_seen(990 + 4294967296, 1000 + 4294967296, '{}', 996) AS old_epoch_committer;

-- ---- two-phase commit: what only this backend's commit callback applies is refused --
BEGIN;
DELETE FROM billing.usage_events WHERE tenant_id = 'ops_big' AND metric = 'documents';
PREPARE TRANSACTION 'ops_usage_change';
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS prepared FROM pg_prepared_xacts WHERE gid = 'ops_usage_change';
SELECT current FROM billing.check_limit('ops_big', 'documents', 0);
-- a flush of refused webhooks rolled back to a savepoint leaves them pending.
-- This session holds the flush's advisory lock (as in sql/webhook.sql), so
-- the worker cannot write the refusal first; what was pending before is
-- written first.
SELECT pg_advisory_lock(x'7165735f72656a65'::bigint) IS NOT NULL AS worker_flush_held_off;
SELECT billing.flush_webhook_rejections() IS NOT NULL AS earlier_refusals_written;
SELECT set_config('request.headers', '{"stripe-signature": "t=1,v1=00"}', false) IS NOT NULL AS h;
SELECT api.stripe_webhook('{"id": "evt_sp", "type": "invoice.paid", "created": 1700000000, "livemode": false, "data": {"object": {}}}') ->> 'reason' AS refused;
RESET request.headers;
BEGIN;
SAVEPOINT s;
SELECT billing.flush_webhook_rejections() AS flushed;
ROLLBACK TO SAVEPOINT s;
-- rolled back: the same counts are still to be written
SELECT billing.flush_webhook_rejections() AS flushed_again;
COMMIT;
SELECT count(*) AS pending_after_commit FROM billing.webhook_rejections_pending();
SELECT pg_advisory_unlock(x'7165735f72656a65'::bigint) AS worker_flush_released;
SELECT billing.set_clock('0') IS NOT NULL AS clock_reset;
