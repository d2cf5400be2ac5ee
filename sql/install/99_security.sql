-- Privileges and row-level security.  Runs last, over everything above.
--   qes_anon    anonymous PostgREST requests (and Stripe's webhooks)
--   qes_tenant  a tenant's users; the JWT carries tenant_id
--   qes_admin   operators
--   qes_app     the QES platform itself (registers tenants, records usage)
--   qes_monitor the Prometheus exporter: the metrics views, nothing else
-- Nothing is granted to PUBLIC.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA api FROM PUBLIC;
REVOKE ALL ON SCHEMA api FROM PUBLIC;

GRANT USAGE ON SCHEMA api TO qes_anon, qes_tenant, qes_admin, qes_app;
GRANT USAGE ON SCHEMA billing TO qes_tenant, qes_admin, qes_app;

-- Stripe's webhooks arrive anonymously: the one write the anonymous role may do
GRANT EXECUTE ON FUNCTION api.stripe_webhook(json) TO qes_anon;

-- public catalog and status
GRANT SELECT ON api.plans TO qes_anon, qes_tenant, qes_admin, qes_app;
GRANT EXECUTE ON FUNCTION api.config(), api.health() TO qes_anon, qes_tenant, qes_admin, qes_app;

-- tenant-owned rows, behind row-level security
GRANT EXECUTE ON FUNCTION billing.jwt_claims(), billing.jwt_tenant_id() TO qes_tenant, qes_admin, qes_app;
GRANT SELECT ON api.tenant TO qes_tenant, qes_admin;
GRANT SELECT ON api.invoices TO qes_tenant, qes_admin;

DO $rls$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['tenants', 'subscriptions', 'usage_events', 'invoices', 'payments',
                           'disputes', 'notifications'] LOOP
    EXECUTE format('ALTER TABLE billing.%I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant_own_rows ON billing.%I FOR SELECT TO qes_tenant
                      USING (tenant_id = billing.jwt_tenant_id())', t);
    EXECUTE format('CREATE POLICY staff_all_rows ON billing.%I TO qes_admin, qes_app
                      USING (true) WITH CHECK (true)', t);
    EXECUTE format('GRANT SELECT ON billing.%I TO qes_tenant, qes_admin', t);
  END LOOP;
END
$rls$;

-- (what pg_dump keeps: sql/install/97_dump.sql)

-- subscriptions and payments, for the tenant
GRANT EXECUTE ON FUNCTION api.create_subscription(text, text),
                          api.update_subscription(text, text, boolean, text),
                          api.create_payment_intent(bigint, text, text)
  TO qes_tenant;
GRANT EXECUTE ON FUNCTION billing.now(), billing.environment() TO qes_tenant, qes_admin;
GRANT SELECT ON billing.clock TO qes_tenant, qes_admin;   -- billing.now() reads it
GRANT SELECT ON api.subscription, api.payments TO qes_tenant, qes_admin;

-- usage, for the tenant through api.usage
GRANT EXECUTE ON FUNCTION billing.my_usage() TO qes_tenant;
GRANT SELECT ON api.usage TO qes_tenant;

-- features, for the tenant through api.features and api.has_feature
-- (sql/install/41_features.sql)
GRANT EXECUTE ON FUNCTION billing.my_features(), api.has_feature(text) TO qes_tenant;
GRANT SELECT ON api.features TO qes_tenant;
GRANT EXECUTE ON FUNCTION billing.has_feature(text, text), billing.features_current(text) TO qes_app, qes_admin;

-- the webhook endpoints whose secrets are kept, never the secrets
-- (sql/install/88_webhook_endpoints.sql; set_webhook_secret: superusers only)
GRANT SELECT ON billing.webhook_endpoints TO qes_admin;

-- usage billed through meters (sql/install/94_meters.sql)
GRANT EXECUTE ON FUNCTION billing.my_usage_billable() TO qes_tenant;
-- the invoices' lines, behind row-level security like the invoices
ALTER TABLE billing.invoice_lines ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_own_rows ON billing.invoice_lines FOR SELECT TO qes_tenant
  USING (tenant_id = billing.jwt_tenant_id());
CREATE POLICY staff_all_rows ON billing.invoice_lines TO qes_admin, qes_app USING (true) WITH CHECK (true);
GRANT SELECT ON billing.invoice_lines TO qes_tenant, qes_admin;
GRANT EXECUTE ON FUNCTION billing.usage_billable(text) TO qes_app, qes_admin;
GRANT EXECUTE ON FUNCTION billing.meter_reconcile(text), billing.void_usage(text, text, text) TO qes_admin;
GRANT SELECT ON billing.meter_metrics, billing.meter_events, billing.metered_prices, billing.meters TO qes_admin;

-- the platform
GRANT EXECUTE ON FUNCTION billing.upsert_tenant(text, text, text),
                          billing.record_usage(text, text, bigint, text, jsonb, timestamptz),
                          billing.record_usage_batch(text, jsonb),
                          billing.check_limit(text, text, bigint),
                          billing.usage_current(text),
                          billing.usage_period(text, timestamptz),
                          billing.usage_report(text)
  TO qes_app, qes_admin;

-- operators
GRANT SELECT ON billing.worker_status, billing.audit_log, billing.stripe_requests,
                billing.webhook_events, billing.webhook_rejections, billing.webhook_metrics,
                billing.outbox_metrics, billing.subscription_health, billing.payment_metrics,
                billing.usage_patterns TO qes_admin;
GRANT EXECUTE ON FUNCTION billing.replay_webhook(text), billing.retry_request(bigint, boolean) TO qes_admin;
-- reconciliation (sql/install/86_reconcile.sql)
GRANT SELECT ON billing.drift_report, billing.reconcile_runs TO qes_admin;
GRANT EXECUTE ON FUNCTION billing.reconcile_tenant(text), billing.reconcile_now() TO qes_admin;
GRANT EXECUTE ON FUNCTION billing.worker_state(), billing.outbox_lane_state(), billing.verify_audit_chain(), billing.usage_cache_stats(),
                          billing.audit_hash(bytea, bigint, timestamptz, text, text, text, text, text, jsonb),
                          billing.wake_worker()
  TO qes_admin;

-- abuse protection: PostgREST calls the pre-request function as every role
GRANT EXECUTE ON FUNCTION api.pre_request() TO qes_anon, qes_tenant, qes_admin, qes_app;
GRANT EXECUTE ON FUNCTION billing.webhook_rejections_pending(), billing.rate_limit_stats() TO qes_admin;
-- verify_audit_chain() reads the chain head (not a secret: the last row's hash)
GRANT SELECT ON billing.audit_head TO qes_admin;
-- ... and where the kept chain starts (audit rows archived: ids, hashes, the export's digest)
GRANT SELECT ON billing.audit_archives TO qes_admin;
-- disputes (sql/install/94_disputes.sql): the evidence to review, its submission, the alert's view
GRANT SELECT ON billing.dispute_evidence, billing.prometheus_disputes TO qes_admin;
GRANT EXECUTE ON FUNCTION billing.submit_dispute_evidence(text), api.submit_dispute_evidence(text) TO qes_admin;
-- tax (sql/install/91_tax.sql): a tenant's own billing details; the
-- invoices' tax behind row-level security like the invoices
ALTER TABLE billing.invoice_taxes ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_own_rows ON billing.invoice_taxes FOR SELECT TO qes_tenant
  USING (tenant_id = billing.jwt_tenant_id());
CREATE POLICY staff_all_rows ON billing.invoice_taxes TO qes_admin, qes_app USING (true) WITH CHECK (true);
GRANT SELECT ON billing.invoice_taxes TO qes_tenant, qes_admin;
GRANT SELECT ON billing.prometheus_tax TO qes_admin;
GRANT EXECUTE ON FUNCTION api.set_billing_details(text, text, text, text, text, text), api.billing_details()
  TO qes_tenant;

-- The exporter's role (docs/operations.md, "Monitoring"): the metrics views
-- and the functions they call, and nothing that acts or reads a tenant's
-- rows.  (Not qes_admin: default_transaction_read_only is only a default,
-- and an operator's role can force a retry, void usage or read payment
-- secrets.)
GRANT USAGE ON SCHEMA billing TO qes_monitor;
GRANT SELECT ON billing.prometheus_webhook_events, billing.prometheus_webhook_inbox,
                billing.prometheus_webhook_rejections, billing.prometheus_outbox,
                billing.prometheus_outbox_failures, billing.prometheus_audit_counters,
                billing.prometheus_worker, billing.prometheus_subscriptions, billing.prometheus_payments,
                billing.prometheus_usage, billing.prometheus_usage_cache, billing.prometheus_rate_limit,
                billing.prometheus_disputes, billing.prometheus_tax
  TO qes_monitor;
-- (a view's functions are called with the reader's rights; not
-- usage_current, one tenant's usage: prometheus_usage reads the sums
-- through billing.usage_patterns_now())
GRANT EXECUTE ON FUNCTION billing.prometheus_latency_buckets(), billing.webhook_event_types(),
                          billing.worker_state(), billing.rate_limit_stats(), billing.usage_cache_stats(),
                          billing.webhook_rejections_pending(), billing.usage_patterns_now(), billing.now(),
                          billing.environment()
  TO qes_monitor;
GRANT SELECT ON billing.clock TO qes_monitor;   -- billing.now() reads it

-- Shared memory outlives DROP EXTENSION: forget what an earlier
-- incarnation cached, and let the worker find the new extension (and
-- reconcile its queues) as soon as CREATE EXTENSION commits.
SELECT billing.reset_caches();
SELECT billing.wake_worker();
