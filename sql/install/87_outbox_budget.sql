-- The Stripe account's rate, shared (docs/scaleout.md, "Stripe's account
-- limits").  Stripe limits requests per account (about 100/s live, 25/s in
-- test mode).  One database alone keeps under it with the worker's token
-- bucket (qes_billing.max_requests_per_second, src/outbox.c).  When several
-- databases send for one account -- the shards of a sharded qes_billing --
-- a coordinator (the router's router.stripe_rebalance) gives each its share
-- of the account's rate, here, and the claim takes no more than the share
-- allows: a token bucket in this row, refilled at `rate` per second, a
-- tenth of a second's worth at most.  No row: no share, the worker's own
-- limit alone.  A share that is not renewed by expires_at falls back to
-- fallback_rate (the share the coordinator would give if every database
-- were busy), so a coordinator that stops never lets the sum pass the
-- account's rate.  slow_until: a 429 seen by any database holds every one
-- back until then.

CREATE TABLE billing.stripe_rate_budget (
  one_row       boolean PRIMARY KEY DEFAULT true CHECK (one_row),
  rate          double precision NOT NULL CHECK (rate >= 0),
  fallback_rate double precision NOT NULL CHECK (fallback_rate >= 0),
  expires_at    timestamptz NOT NULL,
  slow_until    timestamptz,
  tokens        double precision NOT NULL DEFAULT 0,
  refilled_at   timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
  set_by        text,
  updated_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing.stripe_rate_budget IS
  'This database''s share of the Stripe account''s request rate, set by a coordinator when several databases send for one account (the shards of a sharded qes_billing): requests per second, until expires_at (then fallback_rate), held back until slow_until after a 429. No row: the worker''s own qes_billing.max_requests_per_second alone.';

-- The rate in force now, or NULL (no share set).
CREATE FUNCTION billing.stripe_budget_rate(b billing.stripe_rate_budget) RETURNS double precision
  LANGUAGE sql STABLE
  RETURN CASE WHEN b.one_row IS NULL THEN NULL
              WHEN pg_catalog.clock_timestamp() > b.expires_at THEN b.fallback_rate ELSE b.rate END;
COMMENT ON FUNCTION billing.stripe_budget_rate(billing.stripe_rate_budget) IS
  'The share in force: rate, or fallback_rate once expires_at has passed; NULL without a share.';

-- Take up to p_want tokens for a claim (the claim gives back what it did
-- not use).  Without a share, p_want: the row is only read, never locked.
CREATE FUNCTION billing.stripe_budget_take(p_want integer) RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  b      billing.stripe_rate_budget;
  v_rate double precision;
  v_now  timestamptz := clock_timestamp();
  v_tok  double precision;
  v_n    integer;
BEGIN
  IF NOT EXISTS (SELECT FROM billing.stripe_rate_budget) THEN
    RETURN p_want;
  END IF;
  SELECT * INTO b FROM billing.stripe_rate_budget FOR UPDATE;
  v_rate := billing.stripe_budget_rate(b);
  v_tok := least(greatest(1, v_rate / 10),
                 b.tokens + greatest(extract(epoch FROM v_now - b.refilled_at), 0) * v_rate);
  v_n := CASE WHEN b.slow_until > v_now THEN 0 ELSE least(p_want, floor(v_tok)::integer) END;
  UPDATE billing.stripe_rate_budget SET tokens = v_tok - v_n, refilled_at = v_now;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.stripe_budget_take(integer) IS
  'Run by the claim: how many of p_want requests this database''s share of the Stripe account''s rate lets it send now (all of them without a share).';

-- (PL/pgSQL: its plan is kept for the worker's session; a SQL function
-- with SET clauses is planned again at every call)
CREATE FUNCTION billing.stripe_budget_give_back(p_unused integer) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  UPDATE billing.stripe_rate_budget SET tokens = tokens + p_unused WHERE p_unused > 0;
END
$$;
COMMENT ON FUNCTION billing.stripe_budget_give_back(integer) IS
  'Return the tokens a claim took and did not use.';

-- Seconds until the share lets one more request go (0: now or no share).
CREATE FUNCTION billing.stripe_budget_wait() RETURNS double precision
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
DECLARE
  b      billing.stripe_rate_budget;
  v_rate double precision;
  v_now  timestamptz := clock_timestamp();
  v_tok  double precision;
BEGIN
  SELECT * INTO b FROM billing.stripe_rate_budget;
  IF NOT FOUND THEN
    RETURN 0;
  END IF;
  v_rate := billing.stripe_budget_rate(b);
  IF b.slow_until > v_now THEN
    RETURN extract(epoch FROM b.slow_until - v_now);
  END IF;
  v_tok := b.tokens + greatest(extract(epoch FROM v_now - b.refilled_at), 0) * v_rate;
  IF v_tok >= 1 THEN
    RETURN 0;
  END IF;
  -- a share of 0 (a coordinator gave it nothing): look again at its renewal
  RETURN CASE WHEN v_rate > 0 THEN (1 - v_tok) / v_rate
              ELSE greatest(extract(epoch FROM b.expires_at - v_now), 0.1) END;
END
$$;
COMMENT ON FUNCTION billing.stripe_budget_wait() IS
  'Seconds until this database''s share of the Stripe account''s rate lets one more request go (0: now, or no share).';

SELECT pg_catalog.pg_extension_config_dump('billing.stripe_rate_budget', '');
