-- Tenant registration by the platform.
SELECT tenant_id, name, billing_email, stripe_customer_id, disputed
  FROM billing.upsert_tenant('acme', 'Acme Signing GmbH', 'billing@acme.example');
-- the same values again change nothing and write no audit row
SELECT tenant_id, name FROM billing.upsert_tenant('acme', 'Acme Signing GmbH', 'billing@acme.example');
SELECT tenant_id, name, billing_email FROM billing.upsert_tenant('acme', '  Acme Signing AG ', 'finance@acme.example');
SELECT tenant_id, action, details FROM billing.audit_log WHERE tenant_id = 'acme' ORDER BY audit_id;

-- bad input: a clear error, nothing written
\set VERBOSITY default
SELECT billing.upsert_tenant('', 'x', 'a@b.example');
\echo :LAST_ERROR_SQLSTATE
SELECT billing.upsert_tenant('has space', 'x', 'a@b.example');
SELECT billing.upsert_tenant(NULL, 'x', 'a@b.example');
SELECT billing.upsert_tenant('globex', '   ', 'a@b.example');
SELECT billing.upsert_tenant('globex', 'Globex', 'not-an-email');
\echo :LAST_ERROR_SQLSTATE
SELECT billing.upsert_tenant('globex', 'Globex', NULL);
SELECT count(*) AS globex_rows FROM billing.tenants WHERE tenant_id = 'globex';

-- the table's own checks hold for direct writes too (terse: rows hold timestamps)
\set VERBOSITY terse
INSERT INTO billing.tenants (tenant_id, name, billing_email) VALUES ('x y', 'X', 'x@y.example');
INSERT INTO billing.tenants (tenant_id, name, billing_email, stripe_customer_id) VALUES ('xy', 'X', 'x@y.example', 'acct_1');
-- one current subscription per tenant
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status) VALUES ('acme', 'free', 'month', 'active');
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status) VALUES ('acme', 'professional', 'month', 'incomplete');
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status) VALUES ('acme', 'professional', 'month', 'canceled');
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status) VALUES ('nobody', 'free', 'month', 'active');
INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status) VALUES ('acme', 'free', 'fortnight', 'canceled');
\set VERBOSITY default
SELECT plan_id, status FROM billing.subscriptions WHERE tenant_id = 'acme' ORDER BY subscription_id;
