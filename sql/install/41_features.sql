-- Plan features as entitlements (src/features.c): "may this tenant use API
-- access now?" answered from the same mirrored state, clock and rules as
-- check_limit (docs/architecture.md, "Plan features").  A feature is a name
-- some plan lists in billing.plans.features.

CREATE FUNCTION billing.has_feature(tenant_id text, feature text) RETURNS boolean
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_has_feature';
COMMENT ON FUNCTION billing.has_feature(text, text) IS
  'May the tenant use the feature now? The plan whose limits check_limit applies (trials and grace periods keep the plan; a first payment still due, an ended grace period, unpaid, paused or cancelled fall back to Free) decides. An unknown feature is an error (22023) naming the features.';

CREATE FUNCTION billing.features_current(tenant_id text)
  RETURNS TABLE (feature text, enabled boolean, plan_id text, reason text, available_in text)
  LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'qes_features_current';
COMMENT ON FUNCTION billing.features_current(text) IS
  'Every feature of the catalog for the tenant now: enabled, the plan whose features apply, why it is not the subscribed plan (as check_limit''s reason), and the lowest active plan that has the feature.';

CREATE FUNCTION billing.my_features()
  RETURNS TABLE (feature text, enabled boolean, plan_id text, reason text, available_in text)
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_tenant text := billing.jwt_tenant_id();
BEGIN
  -- like GET /usage: no tenant in the JWT, no rows
  IF v_tenant IS NOT NULL AND EXISTS (SELECT 1 FROM billing.tenants t WHERE t.tenant_id = v_tenant) THEN
    RETURN QUERY SELECT * FROM billing.features_current(v_tenant);
  END IF;
END
$$;
COMMENT ON FUNCTION billing.my_features() IS
  'features_current() for the tenant named by the request''s JWT (no rows without a registered tenant, like GET /usage).';

CREATE VIEW api.features WITH (security_invoker = true) AS
SELECT f.feature, f.enabled, f.plan_id, f.reason, f.available_in
  FROM billing.my_features() f;
COMMENT ON VIEW api.features IS
  'The calling tenant''s features now: enabled, the plan whose features apply (the one Stripe''s state implies: trials and grace periods keep the plan), why it is not the subscribed plan, and the lowest plan that has the feature.';

CREATE FUNCTION api.has_feature(feature text) RETURNS boolean
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$ SELECT billing.has_feature(billing.jwt_tenant_id(), feature) $$;
COMMENT ON FUNCTION api.has_feature(text) IS
  'May the calling tenant use the feature now? Same rules as billing.has_feature; an unknown feature is an error (22023).';

-- The features a subscription row entitles to by its own state (the grace
-- period's end is a moment, not a change of the row: dunning.grace_ended
-- audits it).
CREATE FUNCTION billing.features_of(p_plan text, p_status text) RETURNS text[]
  LANGUAGE sql STABLE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(p.features, '{}')
    FROM billing.plans p
   WHERE p.plan_id = CASE WHEN p_status IN ('active', 'trialing', 'past_due') THEN p_plan ELSE 'free' END
$$;
COMMENT ON FUNCTION billing.features_of(text, text) IS
  'The features a subscription of this plan and status entitles to (Free''s outside trialing, active and past_due).';

-- A plan change (Stripe's state mirrored) that changes features writes one
-- audit row with what was gained and lost, beside the subscription's own.
-- Called by the trigger below for an UPDATE, and by the two places that
-- INSERT a subscription (billing.apply_subscription_state, billing.
-- create_subscription) for a new one: a trigger on INSERT would also fire
-- when pg_restore loads the rows, and write audit rows the source never had.
CREATE FUNCTION billing.audit_features(p_tenant text, p_subscription_id bigint, p_plan_before text,
                                       p_status_before text, p_plan text, p_status text) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_before text[] := billing.features_of(coalesce(p_plan_before, 'free'), coalesce(p_status_before, 'active'));
  v_after  text[] := billing.features_of(p_plan, p_status);
  v_gained text[] := ARRAY(SELECT unnest(v_after) EXCEPT SELECT unnest(v_before) ORDER BY 1);
  v_lost   text[] := ARRAY(SELECT unnest(v_before) EXCEPT SELECT unnest(v_after) ORDER BY 1);
BEGIN
  IF cardinality(v_gained) > 0 OR cardinality(v_lost) > 0 THEN
    PERFORM billing.audit('features.changed', p_tenant,
                          jsonb_build_object('subscription_id', p_subscription_id,
                                             'plan_before', p_plan_before, 'status_before', p_status_before,
                                             'plan', p_plan, 'status', p_status,
                                             'gained', to_jsonb(v_gained), 'lost', to_jsonb(v_lost)));
  END IF;
END
$$;
COMMENT ON FUNCTION billing.audit_features(text, bigint, text, text, text, text) IS
  'Audit features.changed (gained, lost) when a subscription''s plan or status changes what it entitles to (before NULL: a new subscription, from Free).';

CREATE FUNCTION billing.audit_feature_change() RETURNS trigger
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
BEGIN
  PERFORM billing.audit_features(NEW.tenant_id, NEW.subscription_id, OLD.plan_id, OLD.status, NEW.plan_id, NEW.status);
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing.audit_feature_change() IS
  'Trigger: audit features.changed (gained, lost) when an update of a subscription''s plan or status changes what it entitles to.';
CREATE TRIGGER audit_feature_change AFTER UPDATE OF plan_id, status ON billing.subscriptions
  FOR EACH ROW EXECUTE FUNCTION billing.audit_feature_change();
