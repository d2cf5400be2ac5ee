-- Privileges: the router's login role, and nothing to PUBLIC.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing_shard FROM PUBLIC;
REVOKE ALL ON SCHEMA billing_shard FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA billing_shard FROM PUBLIC;
GRANT USAGE ON SCHEMA billing_shard TO qes_router, qes_anon, qes_tenant, qes_admin, qes_app;
GRANT EXECUTE ON FUNCTION
    billing_shard.api(text, text, text, text, text, boolean, text, json, text),
    billing_shard.check_limit(text, text, text, bigint),
    billing_shard.record_usage(text, text, text, bigint, text, jsonb, timestamptz),
    billing_shard.upsert_tenant(text, text, text, text),
    billing_shard.usage_report(text, text),
    billing_shard.act_as(text),
    billing_shard.api_dynamic(text, json),
    billing_shard.register(text),
    billing_shard.shard_name(),
    billing_shard.stripe_ref(jsonb),
    billing_shard.event_owner(jsonb),
    billing_shard.take_event(text, text),
    billing_shard.unowned_reconciled(integer),
    billing_shard.mark_forwarded(text, text[]),
    billing_shard.operator_rows(text, text),
    billing_shard.move_tables(),
    billing_shard.move_tenants(integer, integer),
    billing_shard.move_fence(bigint, integer, integer, text, text, text),
    billing_shard.move_wait(integer, integer, integer, boolean),
    billing_shard.move_untracked_writes(),
    billing_shard.move_export(text[], text, boolean, text[], integer),
    billing_shard.move_import(text, text, boolean, text),
    billing_shard.move_export_mirror(text[]),
    billing_shard.move_export_catchup(text[], integer),
    billing_shard.move_reset_copied(text[]),
    billing_shard.move_unmark_moved(integer, integer),
    billing_shard.move_import_mirror(text),
    billing_shard.move_clear(text[], boolean),
    billing_shard.move_digest(text[]),
    billing_shard.move_usage_digest(text[], boolean),
    billing_shard.move_forget_log(text[]),
    billing_shard.move_usage_count(text[], boolean),
    billing_shard.move_audit(text, jsonb),
    billing_shard.moved_events(integer),
    billing_shard.reserve_ids(bigint)
  TO qes_router;
-- a routed call switches to a request role before it calls on
GRANT EXECUTE ON FUNCTION billing_shard.act_as(text), billing_shard.shard_name(), billing_shard.api_dynamic(text, json) TO qes_anon, qes_tenant, qes_admin, qes_app;
