-- Benchmark fixtures: 100 tenants on Free, and the ceiling table for
-- record_usage: the same row, a plain table, the same unique index.
CREATE EXTENSION IF NOT EXISTS qes_billing;
SELECT count(billing.upsert_tenant('bench' || i, 'Bench ' || i, 'b' || i || '@bench.example'))
  FROM generate_series(1, 100) i;
DROP TABLE IF EXISTS bench_plain_usage;
CREATE TABLE bench_plain_usage (LIKE billing.usage_events INCLUDING DEFAULTS);
ALTER TABLE bench_plain_usage ADD PRIMARY KEY (tenant_id, idempotency_key);
