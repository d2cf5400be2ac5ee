-- Privileges, as on one database: nothing to PUBLIC; the api objects carry
-- the same grants as qes_billing's (sql/install/99_security.sql); the
-- router's own functions run as their owner (SECURITY DEFINER, search_path
-- pinned) and are granted only where a role needs them.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA router FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA api FROM PUBLIC;
REVOKE ALL ON SCHEMA api FROM PUBLIC;
REVOKE ALL ON SCHEMA router FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA router FROM PUBLIC;
REVOKE USAGE ON FOREIGN SERVER qes_billing FROM PUBLIC;
REVOKE USAGE ON FOREIGN SERVER qes_billing_standby FROM PUBLIC;

GRANT USAGE ON SCHEMA api TO qes_anon, qes_tenant, qes_admin, qes_app;
GRANT USAGE ON SCHEMA router TO qes_anon, qes_tenant, qes_admin, qes_app;

-- the api schema: what sql/install/99_security.sql grants (the views' and the
-- tenant functions' grants are in 25_api_generated.sql)
GRANT EXECUTE ON FUNCTION api.stripe_webhook(json) TO qes_anon;
GRANT EXECUTE ON FUNCTION api.config(), api.health() TO qes_anon, qes_tenant, qes_admin, qes_app;
GRANT EXECUTE ON FUNCTION api.submit_dispute_evidence(text) TO qes_admin;
GRANT EXECUTE ON FUNCTION api.pre_request() TO qes_anon, qes_tenant, qes_admin, qes_app;

-- the views read their rows through this (security_invoker views call it as the caller)
GRANT EXECUTE ON FUNCTION router.api_rows(text) TO qes_anon, qes_tenant, qes_admin, qes_app;

-- the platform (as billing.* on one database: qes_app and qes_admin)
GRANT EXECUTE ON FUNCTION router.check_limit(text, text, bigint),
                          router.record_usage(text, text, bigint, text, jsonb, timestamptz),
                          router.upsert_tenant(text, text, text),
                          router.usage_report(text),
                          router.tenant_shard(text),
                          router.tenant_partition(text),
                          router.tenant_hash(text),
                          router.partition_count()
  TO qes_app, qes_admin;
GRANT SELECT ON router.partition_map, router.shard_partitions TO qes_app, qes_admin;

-- operators
GRANT EXECUTE ON FUNCTION router.shard_rows(text), router.tenant_audit(text), router.rate_limit_stats(),
                          router.reconcile_forward(integer)
  TO qes_admin;
GRANT SELECT ON router.shard_status, router.worker_status, router.failed_webhooks, router.notification_failures,
                router.notification_metrics, router.drift_report, router.outbox_metrics, router.webhook_metrics,
                router.audit_verification, router.shards
  TO qes_admin;

-- Stripe's account limits (60_stripe.sql): operators see the shares
GRANT SELECT ON router.stripe_shares TO qes_admin;
-- ALL FUNCTIONS above leaves procedures out
REVOKE ALL ON PROCEDURE router.stripe_coordinator(integer, integer, double precision) FROM PUBLIC;

-- partition moves (70_move.sql): superusers run them; operators see them
REVOKE ALL ON PROCEDURE router.move_partition_online(integer, text), router.undo_partition_move(bigint) FROM PUBLIC;
GRANT SELECT ON router.partition_moves, router.partition_move_pauses TO qes_admin;
GRANT EXECUTE ON FUNCTION router.forward_moved_events(integer) TO qes_admin;
