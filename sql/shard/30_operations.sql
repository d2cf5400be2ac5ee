-- Operators see one system (docs/scaleout.md, "Operations"): the router
-- reads the same views and functions on every shard (one call per shard, in
-- parallel with RUN ON ALL, or shard by shard to tell a shard that is down)
-- and adds them up.  Each row comes back as JSON with the view's own
-- columns; the router puts the shard's name beside it.  Read as qes_admin,
-- the role operators have on one database.

CREATE FUNCTION billing_shard.operator_rows(p_what text, p_tenant text DEFAULT NULL)
  RETURNS TABLE (shard text, row_data json)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog
AS $$
DECLARE
  v_shard text := billing_shard.shard_name();
BEGIN
  PERFORM billing_shard.act_as('qes_admin');
  PERFORM set_config('transaction_read_only', 'on', true);
  IF p_what IN ('worker_status', 'outbox_metrics', 'webhook_metrics', 'payment_metrics', 'subscription_health',
                'usage_patterns', 'notification_metrics', 'notification_failures', 'drift_report',
                'reconcile_runs', 'webhook_rejections',
                'prometheus_worker', 'prometheus_webhook_events', 'prometheus_webhook_inbox',
                'prometheus_webhook_rejections', 'prometheus_outbox', 'prometheus_outbox_failures',
                'prometheus_audit_counters', 'prometheus_subscriptions', 'prometheus_payments',
                'prometheus_usage', 'prometheus_usage_cache', 'prometheus_rate_limit') THEN
    RETURN QUERY EXECUTE format('SELECT $1, row_to_json(v) FROM billing.%I v', p_what) USING v_shard;
  ELSIF p_what = 'failed_webhooks' THEN
    RETURN QUERY SELECT v_shard, row_to_json(v) FROM (
      SELECT e.stripe_event_id, e.event_type, e.tenant_id, e.attempts, e.last_error, e.received_at, e.stripe_created
        FROM billing.webhook_events e WHERE e.state = 'needs_review'
       ORDER BY e.received_at) v;
  ELSIF p_what = 'verify_audit_chain' THEN
    RETURN QUERY SELECT v_shard, row_to_json(v) FROM billing.verify_audit_chain() v;
  ELSIF p_what = 'tenant_audit' THEN
    -- the tenant's entries in this shard's chain, and this shard's records
    -- of the moves of the tenant's partition (as the partition count was
    -- then: MD5's first 32 bits & (partitions - 1), billing.tenant_partition)
    IF p_tenant IS NULL THEN
      RAISE EXCEPTION 'tenant_audit needs a tenant' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN QUERY SELECT v_shard, row_to_json(v) FROM (
      SELECT a.audit_id, a.occurred_at, a.action, a.tenant_id, a.actor_role, a.actor_sub, a.actor_tenant, a.details,
             encode(a.prev_hash, 'hex') AS prev_hash, encode(a.hash, 'hex') AS hash
        FROM billing.audit_log a
       WHERE a.tenant_id = p_tenant
          OR (a.action IN ('partition.moved_out', 'partition.moved_in') AND a.tenant_id IS NULL
              AND (a.details ->> 'partition')::integer
                  = (('x' || substr(md5(p_tenant), 1, 8))::bit(32)::integer
                     & ((a.details ->> 'partitions')::integer - 1)))
       ORDER BY a.audit_id) v;
  ELSIF p_what = 'health' THEN
    RETURN QUERY SELECT v_shard, api.health();
  ELSE
    RAISE EXCEPTION 'the router asked for an unknown operators'' view: %', coalesce(quote_literal(p_what), 'NULL')
      USING ERRCODE = 'undefined_table',
            HINT = 'The router and the shard run different versions of qes_billing_router / qes_billing_shard.';
  END IF;
END
$$;
COMMENT ON FUNCTION billing_shard.operator_rows(text, text) IS
  'Rows of one operators'' view or check (worker_status, the metrics views, failed webhooks, notification failures, the drift report, the audit chain''s verification, health, the Prometheus views; tenant_audit: p_tenant''s audit entries and the partition moves) as qes_admin, each with this shard''s name.';
