-- Partition fences (src/fence.c; docs/scaleout.md, "Moving a partition").
-- While a partition's tenants move to another shard, and after they have,
-- this shard writes nothing for them: record_usage checks in C, every
-- tenant-owned table has the row trigger below, and the worker's claims
-- skip them.  billing.partition_fences is the truth; the library keeps a
-- copy in shared memory that every write checks.

CREATE FUNCTION billing.tenant_partition(p_tenant_id text, p_partitions integer) RETURNS integer
  LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_tenant_partition';
COMMENT ON FUNCTION billing.tenant_partition(text, integer) IS
  'The partition of a tenant in a router with p_partitions partitions: the first 32 bits of MD5(tenant_id) & (p_partitions - 1), as router.tenant_partition computes it.';

CREATE FUNCTION billing.tenant_fenced(p_tenant_id text) RETURNS boolean
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_tenant_fenced';
COMMENT ON FUNCTION billing.tenant_fenced(text) IS
  'Whether writes for this tenant are refused here: its partition is moving or has moved (billing.partition_fences). The worker''s claims skip such tenants.';

CREATE FUNCTION billing.partition_fences_reload() RETURNS integer
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_partition_fences_reload';
COMMENT ON FUNCTION billing.partition_fences_reload() IS
  'Copy billing.partition_fences, as this transaction sees it, into shared memory, where writes check it; returns the number of fenced partitions. Runs by itself whenever the table changes.';

CREATE FUNCTION billing.partition_fence_wait() RETURNS integer
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_partition_fence_wait';
COMMENT ON FUNCTION billing.partition_fence_wait() IS
  'Wait until every other transaction that checked a fence before now has ended (after a fence was set, no write it refuses can still commit); returns how many were still running. lock_timeout applies.';

CREATE FUNCTION billing.partition_untracked_writes() RETURNS bigint
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_partition_untracked_writes';
COMMENT ON FUNCTION billing.partition_untracked_writes() IS
  'How many statements wrote usage_events otherwise than record_usage while a partition was fenced or copied here (since the server started): a move that sees it change copies all of the usage again.';

CREATE FUNCTION billing.partition_fence_guard() RETURNS trigger
  LANGUAGE c AS 'MODULE_PATHNAME', 'qes_partition_fence_guard';
COMMENT ON FUNCTION billing.partition_fence_guard() IS
  'Row trigger of the tenant-owned tables: refuses a write for a tenant whose partition is moving (SQLSTATE QBMOV) or has moved (QBMVD).';

CREATE FUNCTION billing.partition_fence_usage() RETURNS trigger
  LANGUAGE c AS 'MODULE_PATHNAME', 'qes_partition_fence_usage';
COMMENT ON FUNCTION billing.partition_fence_usage() IS
  'Row trigger of usage_events for updates and deletes (record_usage''s inserts check in C): refused for a fenced tenant; while its partition is copied, an update is logged for the copy and a delete makes the move copy all of the usage again.';
CREATE TRIGGER partition_fence BEFORE UPDATE OR DELETE ON billing.usage_events
  FOR EACH ROW EXECUTE FUNCTION billing.partition_fence_usage();

CREATE FUNCTION billing.partition_fences_changed() RETURNS trigger
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.partition_fences_reload();
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing.partition_fences_changed() IS
  'Statement trigger of billing.partition_fences: a change is in force at once (before its commit: a fence is never late).';
CREATE TRIGGER reload AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON billing.partition_fences
  FOR EACH STATEMENT EXECUTE FUNCTION billing.partition_fences_changed();

-- Every table with a tenant_id except usage_events (record_usage checks in
-- C; a row trigger there would cost the hot path), the audit log (the
-- chain is the shard's, not the tenant's) and the inbox (an event is the
-- tenant's only once applied, and applying it writes guarded tables; the
-- worker's bookkeeping of an event it could not apply must not fail).
DO $fences$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['tenants', 'billing_details', 'invoice_taxes', 'subscriptions', 'stripe_customers',
                           'invoices', 'invoice_failures', 'payments', 'invoice_payments', 'payment_taxes',
                           'disputes', 'dispute_responses', 'notifications', 'stripe_requests',
                           'drift_repairs', 'reconcile_runs', 'meter_events',
                           'meter_event_usage', 'invoice_lines'] LOOP
    EXECUTE format('CREATE TRIGGER partition_fence BEFORE INSERT OR UPDATE OR DELETE ON billing.%I
                      FOR EACH ROW EXECUTE FUNCTION billing.partition_fence_guard()', t);
  END LOOP;
END
$fences$;
