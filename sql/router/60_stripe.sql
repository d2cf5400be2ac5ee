-- Stripe's account-wide limits (docs/scaleout.md, "Stripe's account
-- limits").  Every shard's worker sends to the same Stripe account, which
-- allows about 100 requests/s live and 25/s in test mode in all.  The
-- coordinator asks each shard what it wants (requests due, 429s seen) and
-- gives each a share of the account's rate (qes_billing.max_requests_per_
-- second as set on the router, or p_account_rate), max-min fair: a shard
-- that wants little gets what it wants, the rest is split evenly among the
-- busy ones, an idle shard keeps a small floor so that its first request
-- goes at once, and what nobody needs is spread over the busy ones.  The
-- sum never passes the account's rate: a shard the router cannot reach is
-- counted at its fallback share.  A 429 seen by any shard halves the
-- account's rate for the shares of the next two seconds and holds every
-- shard back for one.  Shares expire after three periods; a shard whose
-- share was not renewed falls back to account rate / shards, so that a
-- coordinator that stops never lets the sum pass it.
--
-- Run it every 250 ms: CALL router.stripe_coordinator() (a supervised psql
-- session, e.g. a systemd service), or SELECT router.stripe_rebalance()
-- from any scheduler.

CREATE FUNCTION router.remote_stripe_demand(p_partition integer, OUT shard text, OUT due bigint,
                                            OUT taken double precision, OUT limited bigint, OUT rate double precision)
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT * FROM billing_shard.stripe_demand();
$$;
COMMENT ON FUNCTION router.remote_stripe_demand(integer) IS 'PL/Proxy: a shard''s demand on the Stripe account.';

CREATE FUNCTION router.remote_set_stripe_budget(p_partition integer, p_rate double precision, p_fallback double precision,
                                                p_expires_at timestamptz, p_slow_until timestamptz, p_by text)
  RETURNS void
  LANGUAGE plproxy
AS $$
  CLUSTER 'qes_billing';
  RUN ON p_partition;
  SELECT billing_shard.set_stripe_budget(p_rate, p_fallback, p_expires_at, p_slow_until, p_by);
$$;
COMMENT ON FUNCTION router.remote_set_stripe_budget(integer, double precision, double precision, timestamptz, timestamptz, text) IS
  'PL/Proxy: set a shard''s share of the Stripe account''s rate.';

-- What the coordinator decided last, per shard.
CREATE UNLOGGED TABLE router.stripe_shares (
  shard_name  text PRIMARY KEY,
  up          boolean NOT NULL,
  due         bigint,
  limited     bigint,
  share       double precision,
  decided_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
COMMENT ON TABLE router.stripe_shares IS
  'The coordinator''s last decision: each shard''s demand (requests due, 429s in the last two seconds) and its share of the Stripe account''s rate (requests per second).';

CREATE TABLE router.stripe_throttle (
  one_row     boolean PRIMARY KEY DEFAULT true CHECK (one_row),
  halved_until timestamptz NOT NULL
);
COMMENT ON TABLE router.stripe_throttle IS 'Until when the account''s rate is halved after a 429.';

CREATE FUNCTION router.stripe_rebalance(p_account_rate double precision DEFAULT NULL,
                                        p_period_ms integer DEFAULT 250) RETURNS double precision
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, router
AS $$
DECLARE
  v_rate    double precision := coalesce(p_account_rate,
                                         nullif(current_setting('qes_billing.max_requests_per_second', true), '')::double precision);
  v_shards  integer;
  v_now     timestamptz := clock_timestamp();
  v_expires timestamptz := clock_timestamp() + make_interval(secs => 3 * p_period_ms / 1000.0);
  v_slow    timestamptz;
  v_avail   double precision;
  v_floor   double precision;
  v_left    double precision;
  v_busy    integer;
  v_fair    double precision;
  s         record;
  d         record;
  v_state   text;
BEGIN
  IF v_rate IS NULL OR v_rate <= 0 THEN
    RAISE EXCEPTION 'no account rate to share'
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Set qes_billing.max_requests_per_second on the router (Stripe allows about 100/s live, 25/s in test mode), or pass the rate.';
  END IF;
  CREATE TEMP TABLE IF NOT EXISTS pg_temp.stripe_demand (shard_name text, partition integer, up boolean,
                                                          due bigint, limited bigint, share double precision)
    ON COMMIT DROP;
  TRUNCATE pg_temp.stripe_demand;
  FOR s IN SELECT * FROM router.shard_partitions LOOP
    BEGIN
      SELECT * INTO d FROM router.remote_stripe_demand(s.partition);
      INSERT INTO pg_temp.stripe_demand VALUES (s.shard_name, s.partition, true, d.due, d.limited, NULL);
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE;
      INSERT INTO pg_temp.stripe_demand VALUES (s.shard_name, s.partition, false, NULL, NULL, NULL);
    END;
  END LOOP;
  SELECT count(*) INTO v_shards FROM pg_temp.stripe_demand;
  IF v_shards = 0 THEN
    RETURN 0;
  END IF;
  -- a 429 anywhere: every shard holds back a second, the account's rate is halved for two
  IF EXISTS (SELECT FROM pg_temp.stripe_demand WHERE limited > 0) THEN
    v_slow := v_now + interval '1 second';
    INSERT INTO router.stripe_throttle VALUES (true, v_now + interval '2 seconds')
    ON CONFLICT (one_row) DO UPDATE SET halved_until = EXCLUDED.halved_until;
  END IF;
  -- a twentieth held back: each shard's token bucket may send a request
  -- ahead of its rate at a second's edge, and the sum must stay within the
  -- account's rate in every second, not only on average
  v_avail := v_rate * 0.95;
  IF EXISTS (SELECT FROM router.stripe_throttle WHERE halved_until > v_now) THEN
    v_avail := v_rate / 2;
  END IF;
  -- a shard out of reach may still send at its fallback share
  v_avail := v_avail - (SELECT count(*) FROM pg_temp.stripe_demand WHERE NOT up) * v_rate / v_shards;
  v_avail := greatest(v_avail, 0);
  -- idle shards: a floor, so that a first request goes at once
  v_floor := least(1, v_avail / (10 * v_shards));
  UPDATE pg_temp.stripe_demand SET share = v_floor WHERE up AND due = 0;
  v_left := v_avail - coalesce((SELECT sum(share) FROM pg_temp.stripe_demand WHERE up AND due = 0), 0);
  -- busy shards, water-filled: the least demanding first; a shard wants its
  -- backlog per second (what is due now, sent within the next second)
  SELECT count(*) INTO v_busy FROM pg_temp.stripe_demand WHERE up AND due > 0;
  FOR d IN SELECT * FROM pg_temp.stripe_demand WHERE up AND due > 0 ORDER BY due, shard_name LOOP
    v_fair := v_left / v_busy;
    UPDATE pg_temp.stripe_demand SET share = least(d.due, v_fair) WHERE shard_name = d.shard_name;
    v_left := v_left - least(d.due, v_fair);
    v_busy := v_busy - 1;
  END LOOP;
  -- what nobody needs now goes to the busy ones evenly (they may grow within the period)
  SELECT count(*) INTO v_busy FROM pg_temp.stripe_demand WHERE up AND due > 0;
  IF v_busy > 0 AND v_left > 0 THEN
    UPDATE pg_temp.stripe_demand SET share = share + v_left / v_busy WHERE up AND due > 0;
  END IF;
  FOR d IN SELECT * FROM pg_temp.stripe_demand WHERE up LOOP
    BEGIN
      PERFORM router.remote_set_stripe_budget(d.partition, d.share, v_rate / v_shards, v_expires, v_slow,
                                              'router:' || current_database());
    EXCEPTION WHEN OTHERS THEN
      UPDATE pg_temp.stripe_demand SET up = false WHERE shard_name = d.shard_name;
    END;
  END LOOP;
  DELETE FROM router.stripe_shares;
  INSERT INTO router.stripe_shares (shard_name, up, due, limited, share)
  SELECT shard_name, up, due, limited, share FROM pg_temp.stripe_demand;
  RETURN (SELECT coalesce(sum(share), 0) FROM pg_temp.stripe_demand WHERE up);
END
$$;
COMMENT ON FUNCTION router.stripe_rebalance(double precision, integer) IS
  'Share the Stripe account''s rate among the shards once: each shard''s demand read, max-min fair shares set (expiring after three periods), halved for two seconds and held back for one after a 429 anywhere. Returns the rate given out.';

CREATE PROCEDURE router.stripe_coordinator(p_period_ms integer DEFAULT 250, p_seconds integer DEFAULT 0,
                                           p_account_rate double precision DEFAULT NULL)
  LANGUAGE plpgsql
AS $$
DECLARE
  v_until timestamptz := CASE WHEN p_seconds > 0 THEN clock_timestamp() + make_interval(secs => p_seconds) END;
BEGIN
  LOOP
    PERFORM router.stripe_rebalance(p_account_rate, p_period_ms);
    COMMIT;
    EXIT WHEN v_until IS NOT NULL AND clock_timestamp() >= v_until;
    PERFORM pg_sleep(p_period_ms / 1000.0);
  END LOOP;
END
$$;
COMMENT ON PROCEDURE router.stripe_coordinator(integer, integer, double precision) IS
  'Share the Stripe account''s rate every p_period_ms (for p_seconds; 0: until cancelled). Run it in one supervised session.';
