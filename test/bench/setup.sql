-- Benchmark fixtures.  Tenants '1'..'100' (named by number, so that pgbench
-- passes the id as a plain text parameter) are on Enterprise (api_calls
-- unlimited: check_limit's answer is the same with and without history);
-- bench_over is on Free and over its limit (check_limit returns the upgrade
-- prompt).  bench_plain_usage is the ceiling for record_usage: the same
-- row, a plain table, the same unique index.
CREATE EXTENSION IF NOT EXISTS qes_billing;
SELECT count(billing.upsert_tenant(i::text, 'Bench ' || i, 'b' || i || '@bench.example'))
  FROM generate_series(1, 100) i;
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, current_period_start, current_period_end)
SELECT i::text, 'enterprise', 'month', 'active', date_trunc('month', now()), date_trunc('month', now()) + interval '1 month'
  FROM generate_series(1, 100) i;
SELECT billing.upsert_tenant('bench_over', 'Over Ltd', 'o@bench.example');
SELECT count(billing.record_usage('bench_over', 'api_calls', 1, 'over-' || i)) FROM generate_series(1, 1200) i;
DROP TABLE IF EXISTS bench_plain_usage;
CREATE TABLE bench_plain_usage (LIKE billing.usage_events INCLUDING DEFAULTS);
ALTER TABLE bench_plain_usage ADD PRIMARY KEY (tenant_id, idempotency_key);
-- The same ceiling with the same indexes as billing.usage_events (its
-- primary key and usage_events_period, which counter builds, standby reads
-- and reports need): what inserting the row costs PostgreSQL when nothing is
-- left out.  bench.sh fills it with a copy of usage_events before each use,
-- so that both tables and their indexes are the same size.
DROP TABLE IF EXISTS bench_same_usage;
CREATE TABLE bench_same_usage (LIKE billing.usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
