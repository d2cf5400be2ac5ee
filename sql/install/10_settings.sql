-- Configuration as seen from SQL (src/config.c), the JWT claims, and the
-- billing clock (docs/architecture.md, rule 9).

CREATE FUNCTION billing.environment() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_environment_fn';
COMMENT ON FUNCTION billing.environment() IS
  'development, staging or production (QES_ENVIRONMENT, or qes_billing.environment).';

CREATE FUNCTION billing.stripe_mode() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_stripe_mode_fn';
COMMENT ON FUNCTION billing.stripe_mode() IS
  'test in development and staging, live in production.';

CREATE FUNCTION billing.base_url() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_base_url_fn';
COMMENT ON FUNCTION billing.base_url() IS 'QES_BASE_URL, or qes_billing.base_url; NULL when unset.';

CREATE FUNCTION billing.publishable_key() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_publishable_key_fn';
COMMENT ON FUNCTION billing.publishable_key() IS
  'The Stripe publishable key of the current mode; NULL when unset, an error when of the wrong mode.';

CREATE FUNCTION billing.stripe_key_problem(kind text) RETURNS text
  LANGUAGE c STABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_stripe_key_problem_fn';
COMMENT ON FUNCTION billing.stripe_key_problem(text) IS
  'NULL when the key of this kind (secret, publishable, webhook) is usable, else what is wrong. Never the key itself.';

CREATE FUNCTION billing.require_stripe_keys() RETURNS void
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_require_stripe_keys_fn';
COMMENT ON FUNCTION billing.require_stripe_keys() IS
  'Raise an error naming the variable at fault unless all three Stripe keys of the current mode are usable.';

CREATE FUNCTION billing.outer_role() RETURNS text
  LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_outer_role';
COMMENT ON FUNCTION billing.outer_role() IS
  'The role the session acts as (PostgREST''s JWT role), even inside SECURITY DEFINER functions.';

CREATE FUNCTION billing.jwt_claims() RETURNS jsonb
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN coalesce(nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb, '{}'::jsonb);
COMMENT ON FUNCTION billing.jwt_claims() IS 'The JWT claims PostgREST set for this request, {} outside PostgREST.';

CREATE FUNCTION billing.jwt_tenant_id() RETURNS text
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN billing.jwt_claims() ->> 'tenant_id';
COMMENT ON FUNCTION billing.jwt_tenant_id() IS 'The tenant_id claim of the request''s JWT; row-level security is keyed on it.';
INSERT INTO billing.clock DEFAULT VALUES;

CREATE FUNCTION billing.now() RETURNS timestamptz
  LANGUAGE sql STABLE PARALLEL SAFE
  RETURN pg_catalog.now() + CASE WHEN billing.environment() = 'production' THEN interval '0'
                                 ELSE (SELECT c.offset_by FROM billing.clock c) END;
COMMENT ON FUNCTION billing.now() IS
  'The billing clock: now() shifted by billing.set_clock() outside production.';

CREATE FUNCTION billing.set_clock(p_offset interval) RETURNS timestamptz
  LANGUAGE plpgsql VOLATILE
  SET search_path = pg_catalog, billing SET IntervalStyle = 'iso_8601'
AS $$
BEGIN
  IF p_offset IS NULL THEN
    RAISE EXCEPTION 'clock offset must not be NULL'
      USING ERRCODE = 'null_value_not_allowed', HINT = 'Use interval ''0'' to return to the real clock.';
  END IF;
  IF billing.environment() = 'production' THEN
    RAISE EXCEPTION 'the billing clock cannot be moved in production'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = 'QES_ENVIRONMENT is production.',
            HINT = 'Move the clock only in development or staging.';
  END IF;
  UPDATE billing.clock SET offset_by = p_offset;
  PERFORM billing.audit('clock.set', NULL, jsonb_build_object('offset', p_offset::text));
  RETURN billing.now();
END
$$;
COMMENT ON FUNCTION billing.set_clock(interval) IS
  'Shift billing.now() by an offset from the real clock (superusers, not in production).';
