-- The Stripe account's rate shared by the shards (docs/scaleout.md,
-- "Stripe's account limits"): the router's coordinator asks every shard for
-- its demand and sets each shard's share in billing.stripe_rate_budget,
-- which the shard's outbox claim obeys (sql/install/87_outbox_budget.sql).

CREATE FUNCTION billing_shard.stripe_demand(OUT shard text, OUT due bigint, OUT taken double precision,
                                            OUT limited bigint, OUT rate double precision)
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  b billing.stripe_rate_budget;
BEGIN
  shard := billing_shard.shard_name();
  -- requests due now (at most 10,000 counted: the index of pending rows)
  SELECT count(*) INTO due
    FROM (SELECT 1 FROM billing.stripe_requests r
           WHERE r.state = 'pending' AND r.next_attempt_at <= now() LIMIT 10000) d;
  -- Stripe's 429s of the last two seconds (such a row is pending again, for its retry)
  SELECT count(*) INTO limited
    FROM billing.stripe_requests r
   WHERE r.state = 'pending' AND r.http_status = 429 AND r.updated_at > clock_timestamp() - interval '2 seconds';
  SELECT * INTO b FROM billing.stripe_rate_budget;
  rate := billing.stripe_budget_rate(b);
  taken := coalesce(b.tokens, 0);
END
$$;
COMMENT ON FUNCTION billing_shard.stripe_demand() IS
  'What this shard wants of the Stripe account''s rate: requests due now, 429s of the last two seconds, its share in force and the tokens it has left.';

CREATE FUNCTION billing_shard.set_stripe_budget(p_rate double precision, p_fallback double precision,
                                                p_expires_at timestamptz, p_slow_until timestamptz, p_by text)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
BEGIN
  IF p_rate IS NULL OR p_rate < 0 OR p_fallback IS NULL OR p_fallback < 0 OR p_expires_at IS NULL THEN
    RAISE EXCEPTION 'a share of the Stripe account''s rate needs a rate, a fallback rate (>= 0) and when it expires'
      USING ERRCODE = 'invalid_parameter_value', HINT = 'The router''s router.stripe_rebalance sets it.';
  END IF;
  INSERT INTO billing.stripe_rate_budget AS b (rate, fallback_rate, expires_at, slow_until, set_by, tokens, refilled_at)
  VALUES (p_rate, p_fallback, p_expires_at, p_slow_until, p_by, least(1, p_rate / 10), clock_timestamp())
  ON CONFLICT (one_row) DO UPDATE
    SET rate = EXCLUDED.rate, fallback_rate = EXCLUDED.fallback_rate, expires_at = EXCLUDED.expires_at,
        slow_until = greatest(b.slow_until, EXCLUDED.slow_until), set_by = EXCLUDED.set_by, updated_at = now(),
        -- the bucket keeps its tokens, refilled at the old rate until now
        tokens = least(greatest(1, b.rate / 10),
                       b.tokens + greatest(extract(epoch FROM clock_timestamp() - b.refilled_at), 0) * b.rate),
        refilled_at = clock_timestamp();
  -- a larger share may let a waiting request go now
  IF p_rate > 0 THEN
    PERFORM billing.wake_worker();
  END IF;
END
$$;
COMMENT ON FUNCTION billing_shard.set_stripe_budget(double precision, double precision, timestamptz, timestamptz, text) IS
  'Set this shard''s share of the Stripe account''s rate (requests per second), what it falls back to when not renewed by p_expires_at, and a hold after a 429 (p_slow_until).';

CREATE FUNCTION billing_shard.clear_stripe_budget() RETURNS void
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$ DELETE FROM billing.stripe_rate_budget $$;
COMMENT ON FUNCTION billing_shard.clear_stripe_budget() IS
  'Remove this shard''s share: the worker''s own qes_billing.max_requests_per_second alone applies again.';

GRANT EXECUTE ON FUNCTION billing_shard.stripe_demand(),
                          billing_shard.set_stripe_budget(double precision, double precision, timestamptz, timestamptz, text),
                          billing_shard.clear_stripe_budget()
  TO qes_router;
