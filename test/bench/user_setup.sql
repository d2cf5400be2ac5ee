-- What a user would write instead of record_usage + check_limit: their own
-- usage table (the same columns, the same primary key and period index as
-- billing.usage_events), written with INSERT ... ON CONFLICT DO NOTHING and
-- summed per tenant, metric and period.  Filled with a copy of the rows
-- billing.usage_events holds now (load_history.sql: 10,000 per benchmark
-- tenant this period).
DROP TABLE IF EXISTS bench_user_usage;
CREATE TABLE bench_user_usage (
  tenant_id       text NOT NULL,
  idempotency_key text NOT NULL,
  metric          text NOT NULL,
  quantity        bigint NOT NULL,
  period_start    timestamptz NOT NULL,
  occurred_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, idempotency_key)
);
CREATE INDEX ON bench_user_usage (tenant_id, metric, period_start) INCLUDE (quantity);
INSERT INTO bench_user_usage (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at)
SELECT tenant_id, idempotency_key, metric, quantity, date_trunc('month', now()), occurred_at FROM billing.usage_events;
VACUUM ANALYZE bench_user_usage;
