-- Plan features as entitlements (src/features.c, sql/install/41_features.sql):
-- has_feature answers from the same state and rules as check_limit.  The
-- test runs at a fixed date through the billing clock: the evening of
-- May 10 2028.
SET TimeZone = 'UTC';
SELECT billing.set_clock('2028-05-10 20:00:00+00' - now()) IS NOT NULL AS clock_set;
SELECT (billing.upsert_tenant('f_free', 'Free Co', 'f@f.example')).tenant_id,
       (billing.upsert_tenant('f_pro', 'Pro Co', 'p@f.example')).tenant_id;

-- the catalog's features, and which plan has them
SELECT plan_id, features FROM billing.plans ORDER BY tier;

-- a tenant with no subscription: Free, no feature
SELECT feature, enabled, plan_id, reason, available_in FROM billing.features_current('f_free');
SELECT billing.has_feature('f_free', 'api_access') AS free_api;

-- unknown feature, unknown tenant, NULLs: clear errors
\set VERBOSITY default
SELECT billing.has_feature('f_free', 'teleportation');
SELECT billing.has_feature('nobody', 'api_access');
SELECT billing.has_feature('f_free', NULL);
SELECT billing.has_feature(NULL, 'api_access');
\set VERBOSITY terse

-- Professional, trialing: its features, like its limits
-- (mirrored as an event of Stripe's would be)
SELECT billing.apply_subscription_state('f_pro', jsonb_build_object(
         'id', 'sub_f_pro', 'object', 'subscription', 'status', 'trialing', 'cancel_at_period_end', false,
         'billing_cycle_anchor', extract(epoch FROM timestamptz '2028-05-01 00:00+00')::bigint,
         'current_period_start', extract(epoch FROM timestamptz '2028-05-01 00:00+00')::bigint,
         'current_period_end', extract(epoch FROM timestamptz '2028-06-01 00:00+00')::bigint,
         'trial_end', extract(epoch FROM timestamptz '2028-06-01 00:00+00')::bigint,
         'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object('price', jsonb_build_object(
           'id', 'price_professional_monthly', 'lookup_key', 'professional_monthly',
           'recurring', jsonb_build_object('interval', 'month')))))),
       '2028-05-01 00:00+00', false) IS NULL AS applied;
SELECT billing.has_feature('f_pro', 'api_access') AS api, billing.has_feature('f_pro', 'compliance_tools') AS compliance,
       (billing.check_limit('f_pro', 'signatures')).plan_id AS limits_of;
SELECT feature, enabled, plan_id, reason, available_in FROM billing.features_current('f_pro');

-- past_due inside the grace period keeps them; after it, Free (as the limits)
UPDATE billing.subscriptions SET status = 'past_due', grace_until = '2028-05-12 20:00+00' WHERE tenant_id = 'f_pro';
SELECT billing.has_feature('f_pro', 'api_access') AS in_grace, (billing.check_limit('f_pro', 'signatures')).plan_id;
SELECT billing.set_clock('2028-05-13 09:00:00+00' - now()) IS NOT NULL AS after_grace;
SELECT billing.has_feature('f_pro', 'api_access') AS after_grace, (billing.check_limit('f_pro', 'signatures')).plan_id;
SELECT DISTINCT reason FROM billing.features_current('f_pro');
-- paid again: back
UPDATE billing.subscriptions SET status = 'active', grace_until = NULL WHERE tenant_id = 'f_pro';
SELECT billing.has_feature('f_pro', 'api_access') AS paid;

-- upgraded to Enterprise: compliance tools at commit
UPDATE billing.subscriptions SET plan_id = 'enterprise' WHERE tenant_id = 'f_pro';
SELECT billing.has_feature('f_pro', 'compliance_tools') AS enterprise_compliance;
-- waiting for a first payment (incomplete) and cancelled: Free
UPDATE billing.subscriptions SET status = 'incomplete' WHERE tenant_id = 'f_pro';
SELECT billing.has_feature('f_pro', 'api_access') AS incomplete;
UPDATE billing.subscriptions SET status = 'canceled', ended_at = billing.now() WHERE tenant_id = 'f_pro';
SELECT billing.has_feature('f_pro', 'api_access') AS canceled;

-- every change of features was audited, with what was gained and lost
SELECT action, details ->> 'plan_before' AS plan_before, details ->> 'status_before' AS status_before,
       details ->> 'plan' AS plan, details ->> 'status' AS status, details -> 'gained' AS gained, details -> 'lost' AS lost
  FROM billing.audit_log WHERE tenant_id = 'f_pro' AND action = 'features.changed' ORDER BY audit_id;

-- an operator's catalog change takes effect at commit, in this backend too
UPDATE billing.plans SET features = features || '{bulk_signing}' WHERE plan_id = 'enterprise';
SELECT feature, available_in FROM billing.features_current('f_free') WHERE feature = 'bulk_signing';
UPDATE billing.plans SET features = array_remove(features, 'bulk_signing') WHERE plan_id = 'enterprise';
SELECT billing.has_feature('f_free', 'bulk_signing');

-- the tenant's view through the API (the JWT's tenant), and only its own
SET ROLE qes_tenant;
SELECT set_config('request.jwt.claims', '{"tenant_id": "f_free", "role": "qes_tenant"}', false) IS NOT NULL AS claims;
SELECT feature, enabled FROM api.features ORDER BY feature;
SELECT api.has_feature('advanced_signatures') AS mine;
SELECT api.has_feature('nope');
SELECT billing.has_feature('f_pro', 'api_access');
RESET ROLE;
SELECT set_config('request.jwt.claims', '', false) IS NOT NULL AS claims_cleared;

SELECT billing.set_clock('0') IS NOT NULL AS clock_reset;

-- GET /features without a registered tenant in the JWT: no rows (as GET /usage)
SET ROLE qes_tenant;
SELECT set_config('request.jwt.claims', '{"tenant_id": "nobody", "role": "qes_tenant"}', false) IS NOT NULL AS claims;
SELECT count(*) AS features_of_nobody FROM api.features;
RESET ROLE;
SELECT set_config('request.jwt.claims', '', false) IS NOT NULL AS claims_cleared;
