-- Usage events: one row per recorded usage, counted once per
-- (tenant_id, idempotency_key) forever.  Hash-partitioned by tenant so that
-- every partition's indexes stay small as history grows.

CREATE TABLE billing.usage_events (
  tenant_id       text NOT NULL,
  idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
  metric          text NOT NULL,
  quantity        bigint NOT NULL,
  period_start    timestamptz NOT NULL,
  occurred_at     timestamptz NOT NULL,
  recorded_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
  metadata        jsonb,
  PRIMARY KEY (tenant_id, idempotency_key)
) PARTITION BY HASH (tenant_id);
COMMENT ON TABLE billing.usage_events IS
  'Recorded usage. Counters: quantity is added to the period total; gauge (storage): the newest row of the period is the value.';

DO $parts$
BEGIN
  FOR i IN 0..7 LOOP
    EXECUTE format('CREATE TABLE billing.usage_events_p%s PARTITION OF billing.usage_events
                    FOR VALUES WITH (MODULUS 8, REMAINDER %s)', i, i);
  END LOOP;
END
$parts$;

CREATE INDEX usage_events_period ON billing.usage_events (tenant_id, metric, period_start);
