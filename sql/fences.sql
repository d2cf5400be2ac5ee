-- Partition fences (src/fence.c, sql/install/45_fences.sql; docs/scaleout.md,
-- "Moving a partition"): while a partition's tenants move to another shard,
-- and after they have, this shard refuses their writes -- record_usage with
-- SQLSTATE QBMOV ('moving') or QBMVD ('moved'), and so does the row trigger
-- of every tenant-owned table -- and never their reads.  Tenant fence_a is
-- in partition 14 of 64, fence_b in 17, fence_new71 in 14 too.  The test
-- leaves no fence behind.  At a fixed date through the billing clock (the
-- day it runs changes nothing); no timestamp is printed.
\set VERBOSITY default
SET TimeZone = 'UTC';
SELECT billing.set_clock('2028-03-01 23:00:00+00' - now()) IS NOT NULL AS clock_set;

-- ---- a tenant's partition: router.tenant_partition's answer ---------------
-- the first 32 bits of MD5(tenant id), big-endian, masked; 500 ids of all
-- lengths, for every partition count a router may have
SELECT n AS partitions, count(*) AS tenants,
       count(*) FILTER (WHERE billing.tenant_partition(t, n)
                              = ('x' || substr(md5(t), 1, 8))::bit(32)::integer & (n - 1)) AS agree,
       bool_and(billing.tenant_partition(t, n) BETWEEN 0 AND n - 1) AS in_range,
       count(DISTINCT billing.tenant_partition(t, n)) AS partitions_hit
  FROM (SELECT 't' || i || '.' || repeat(chr(97 + i % 26), i % 60) AS t FROM generate_series(1, 500) i) ids,
       unnest(ARRAY[1, 2, 64, 1024, 65536]) n
 GROUP BY n ORDER BY n;
-- the ids of this test; fence_a's MD5 starts with 0xbae130ce (negative as a signed integer)
SELECT t AS tenant_id, billing.tenant_partition(t, 64) AS of_64, billing.tenant_partition(t, 128) AS of_128,
       billing.tenant_partition(t, 65536) AS of_65536
  FROM unnest(ARRAY['fence_a', 'fence_b', 'fence_new71']) t;
-- a partition count that is not a power of two up to 65536 is refused
SELECT billing.tenant_partition('fence_a', 0);
\echo :LAST_ERROR_SQLSTATE
SELECT billing.tenant_partition('fence_a', 3);
\echo :LAST_ERROR_SQLSTATE
SELECT billing.tenant_partition('fence_a', 131072);
\echo :LAST_ERROR_SQLSTATE
SELECT billing.tenant_partition('fence_a', -64);
SELECT billing.tenant_partition('fence_a', NULL) IS NULL AS strict;

-- ---- before any fence: both tenants write -----------------------------------
SELECT (billing.upsert_tenant('fence_a', 'Fence A Ltd', 'a@fence.example')).tenant_id,
       (billing.upsert_tenant('fence_b', 'Fence B Ltd', 'b@fence.example')).tenant_id;
SELECT recorded, duplicate, total FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-1');
SELECT recorded, duplicate, total FROM billing.record_usage('fence_b', 'signatures', 1, 'fb-1');
SELECT billing.partition_fences_reload() AS fenced,
       billing.tenant_fenced('fence_a') AS a_fenced, billing.tenant_fenced('fence_b') AS b_fenced;

-- ---- fence_a's partition moving out: its writes refused, fence_b's not ------
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (64, billing.tenant_partition('fence_a', 64), 'moving', 'out', 1, 'shard-9');
-- in force at once (the table's statement trigger reloaded it)
SELECT billing.tenant_fenced('fence_a') AS a_fenced, billing.tenant_fenced('fence_b') AS b_fenced,
       billing.tenant_fenced('fence_new71') AS new71_fenced, billing.tenant_fenced(NULL) AS null_fenced;
SELECT billing.partition_fences_reload() AS fenced;
SELECT count(*) AS a_rows_before FROM billing.usage_events WHERE tenant_id = 'fence_a' \gset
SELECT count(*) AS a_audit_before FROM billing.audit_log WHERE tenant_id = 'fence_a' \gset
SELECT * FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-2');
\echo :LAST_ERROR_SQLSTATE
-- a retry of usage already recorded is refused too (the fence is checked first)
SELECT * FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-1');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM billing.record_usage_batch('fence_a', '[{"metric": "documents", "quantity": 1, "idempotency_key": "fa-b1"}]');
\echo :LAST_ERROR_SQLSTATE
-- the other partition is not fenced
SELECT recorded, duplicate, total FROM billing.record_usage('fence_b', 'signatures', 1, 'fb-2');
-- the tenant-owned tables: the row trigger refuses fence_a's rows, old or new
SELECT billing.upsert_tenant('fence_a', 'Fence A Renamed', 'a@fence.example');
\echo :LAST_ERROR_SQLSTATE
-- (a call that changes nothing writes nothing, so nothing is refused)
SELECT tenant_id, name FROM billing.upsert_tenant('fence_a', 'Fence A Ltd', 'a@fence.example');
-- a new tenant of the fenced partition is not registered here either
SELECT billing.upsert_tenant('fence_new71', 'New Ltd', 'n@fence.example');
\echo :LAST_ERROR_SQLSTATE
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status)
VALUES ('fence_a', 'professional', 'month', 'active');
\echo :LAST_ERROR_SQLSTATE
DELETE FROM billing.tenants WHERE tenant_id = 'fence_a';
\echo :LAST_ERROR_SQLSTATE
-- moving a row from fence_b to fence_a is refused: the new row's tenant is fenced
BEGIN;
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status)
VALUES ('fence_b', 'professional', 'month', 'active');
UPDATE billing.subscriptions SET tenant_id = 'fence_a' WHERE tenant_id = 'fence_b';
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
SELECT tenant_id, name FROM billing.upsert_tenant('fence_b', 'Fence B Renamed', 'b@fence.example');
-- nothing half-written: no usage row, no counted usage, no tenant, no audit row
SELECT count(*) - :a_rows_before AS a_rows_added FROM billing.usage_events WHERE tenant_id = 'fence_a';
SELECT count(*) - :a_audit_before AS a_audit_added FROM billing.audit_log WHERE tenant_id = 'fence_a';
SELECT name FROM billing.tenants WHERE tenant_id = 'fence_a';
SELECT count(*) AS new71_rows FROM billing.tenants WHERE tenant_id = 'fence_new71';
SELECT count(*) AS a_subscriptions FROM billing.subscriptions WHERE tenant_id = 'fence_a';
-- reading is never refused
SELECT allowed, current, status FROM billing.check_limit('fence_a', 'signatures', 0);
SELECT allowed, current, status FROM billing.check_limit('fence_a', 'documents', 1);
SELECT used FROM billing.usage_current('fence_a') WHERE metric = 'signatures';
SELECT current FROM billing.check_limit('fence_b', 'signatures', 0);

-- ---- moved: QBMVD -----------------------------------------------------------
UPDATE billing.partition_fences SET state = 'moved' WHERE partition_count = 64
   AND partition = billing.tenant_partition('fence_a', 64);
SELECT billing.tenant_fenced('fence_a') AS a_fenced, billing.tenant_fenced('fence_b') AS b_fenced;
SELECT * FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-2');
\echo :LAST_ERROR_SQLSTATE
SELECT billing.upsert_tenant('fence_a', 'Fence A Renamed', 'a@fence.example');
\echo :LAST_ERROR_SQLSTATE
SELECT allowed, current FROM billing.check_limit('fence_a', 'signatures', 0);
SELECT recorded, total FROM billing.record_usage('fence_b', 'signatures', 1, 'fb-3');

-- ---- moving in (the partition's rows being copied here): refused as well ----
UPDATE billing.partition_fences SET state = 'moving', direction = 'in' WHERE partition_count = 64
   AND partition = billing.tenant_partition('fence_a', 64);
SELECT * FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-2');
\echo :LAST_ERROR_SQLSTATE

-- ---- a change rolled back is forgotten (src/fence.c: the next check loads the committed table)
BEGIN;
DELETE FROM billing.partition_fences WHERE partition_count = 64
   AND partition = billing.tenant_partition('fence_a', 64);
SELECT billing.tenant_fenced('fence_a') AS a_fenced_in_the_lifting_transaction;
ROLLBACK;
SELECT billing.tenant_fenced('fence_a') AS a_fenced_after_rollback;
SELECT * FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-rolled-back-lift');
\echo :LAST_ERROR_SQLSTATE
BEGIN;
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (64, billing.tenant_partition('fence_b', 64), 'moving', 'out', 2, 's9');
SELECT billing.tenant_fenced('fence_b') AS b_fenced_in_the_fencing_transaction;
ROLLBACK;
SELECT billing.tenant_fenced('fence_b') AS b_fenced_after_rollback;
-- a savepoint rolled back alike
BEGIN;
SAVEPOINT s;
DELETE FROM billing.partition_fences WHERE partition_count = 64
   AND partition = billing.tenant_partition('fence_a', 64);
ROLLBACK TO SAVEPOINT s;
SELECT billing.tenant_fenced('fence_a') AS a_fenced_after_savepoint_rollback;
COMMIT;

-- ---- the fence lifted: fence_a writes again -----------------------------------
DELETE FROM billing.partition_fences WHERE partition_count = 64
   AND partition = billing.tenant_partition('fence_a', 64);
SELECT billing.tenant_fenced('fence_a') AS a_fenced, billing.partition_fences_reload() AS fenced;
-- the key refused while fenced is recorded now, once; the earlier key is a duplicate as usual
SELECT recorded, duplicate, quantity, total FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-2');
SELECT recorded, duplicate, quantity, total FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-2');
SELECT recorded, duplicate, quantity, total FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-1');
SELECT count(*) - :a_rows_before AS a_rows_added FROM billing.usage_events WHERE tenant_id = 'fence_a';
SELECT current FROM billing.check_limit('fence_a', 'signatures', 0);
SELECT tenant_id, name FROM billing.upsert_tenant('fence_a', 'Fence A Renamed', 'a@fence.example');

-- ---- the table's checks -----------------------------------------------------
-- (terse: the failing row holds set_at)
\set VERBOSITY terse
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (3, 1, 'moving', 'out', 2, 'shard-9');
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (131072, 1, 'moving', 'out', 2, 'shard-9');
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (64, 64, 'moving', 'out', 2, 'shard-9');
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (64, -1, 'moving', 'out', 2, 'shard-9');
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (64, 14, 'moved', 'in', 2, 'shard-9');
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (64, 14, 'gone', 'out', 2, 'shard-9');
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (64, 14, 'moving', 'sideways', 2, 'shard-9');
\set VERBOSITY default
SELECT count(*) AS fences FROM billing.partition_fences;

-- ---- one partition count per shard -------------------------------------------
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (64, billing.tenant_partition('fence_a', 64), 'moving', 'out', 3, 'shard-9');
-- a fence of another count: the reload in the statement trigger refuses it,
-- and the INSERT with it
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (128, billing.tenant_partition('fence_b', 128), 'moving', 'out', 4, 'shard-9');
\echo :LAST_ERROR_SQLSTATE
-- the loader itself, given such a table (written with the trigger off)
BEGIN;
SET LOCAL session_replication_role = replica;
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (128, billing.tenant_partition('fence_b', 128), 'moving', 'out', 4, 'shard-9');
SELECT billing.partition_fences_reload();
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
-- the fence in force is still the one of 64
SELECT partition_count, partition, state, direction FROM billing.partition_fences;
SELECT billing.partition_fences_reload() AS fenced,
       billing.tenant_fenced('fence_a') AS a_fenced, billing.tenant_fenced('fence_b') AS b_fenced;
SELECT * FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-3');
\echo :LAST_ERROR_SQLSTATE
-- a reload by someone else than a superuser is refused
SET ROLE qes_app;
SELECT billing.partition_fences_reload();
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- ---- copying: not a fence; new usage is logged for the copy under the fence
DELETE FROM billing.partition_fences;
INSERT INTO billing.partition_fences (partition_count, partition, state, direction, move_id, peer_shard)
VALUES (64, billing.tenant_partition('fence_a', 64), 'copying', 'out', 3, 's9');
SELECT billing.tenant_fenced('fence_a') AS a_fenced_while_copying;
SELECT recorded, duplicate FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-copying-1');
SELECT recorded, duplicate FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-copying-1');
SELECT recorded FROM billing.record_usage('fence_b', 'signatures', 1, 'fb-copying-1');
-- a key rolled back is not logged
BEGIN;
SELECT recorded FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-copying-rolled-back');
ROLLBACK;
SELECT tenant_id, idempotency_key FROM billing.partition_move_log ORDER BY 1, 2;
DELETE FROM billing.partition_move_log;
DELETE FROM billing.partition_fences;

-- ---- nothing left behind ------------------------------------------------------
DELETE FROM billing.partition_fences;
SELECT count(*) AS fences FROM billing.partition_fences;
SELECT billing.partition_fences_reload() AS fenced,
       billing.tenant_fenced('fence_a') AS a_fenced, billing.tenant_fenced('fence_b') AS b_fenced;
SELECT recorded, total FROM billing.record_usage('fence_a', 'signatures', 1, 'fa-3');
-- back to the real clock for the tests after this one
SELECT billing.set_clock('0') IS NOT NULL AS clock_reset;
