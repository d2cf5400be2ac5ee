-- The worker's queues, the outbox and the inbox (the tables: 01_tables.sql):
-- waking the worker at commit, reclaiming what a crashed worker left in
-- flight, and the worker's status.

-- The delay before attempt n+1 of anything the worker retries (an outbox
-- request, an inbox event, a notification): doubling from base per attempt
-- up to cap, with jitter (50-100 % of it) so that retries of many rows that
-- failed together spread out.  The exponent is capped, so a large attempt
-- count cannot overflow.
CREATE FUNCTION billing.backoff(p_attempts integer, p_base interval, p_cap interval) RETURNS interval
  LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN pg_catalog.make_interval(secs => least(extract(epoch FROM p_cap),
                                              extract(epoch FROM p_base) * 2 ^ least(greatest(p_attempts - 1, 0), 30))
                                        * (0.5 + pg_catalog.random() / 2));
COMMENT ON FUNCTION billing.backoff(integer, interval, interval) IS
  'The delay before the next attempt after p_attempts attempts: p_base doubled per attempt up to p_cap, with 50-100 % jitter.';

CREATE FUNCTION billing.wake_worker_on_commit() RETURNS trigger
  LANGUAGE c AS 'MODULE_PATHNAME', 'qes_wake_worker_trigger';
COMMENT ON FUNCTION billing.wake_worker_on_commit() IS
  'Trigger: wake the worker when the inserting (or updating) transaction commits (not before, not on rollback).';

CREATE TRIGGER wake_worker AFTER INSERT OR UPDATE ON billing.stripe_requests
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();
CREATE TRIGGER wake_worker AFTER INSERT OR UPDATE ON billing.webhook_events
  FOR EACH STATEMENT EXECUTE FUNCTION billing.wake_worker_on_commit();

CREATE FUNCTION billing.wake_worker() RETURNS void
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_wake_worker';
COMMENT ON FUNCTION billing.wake_worker() IS 'Wake the worker when the calling transaction commits.';

-- Crash reconciliation: a row still in flight when the worker starts was
-- left by a crash (there is one worker).  Put it back in the queue; an
-- outbox row keeps its idempotency key, so Stripe replays instead of
-- creating twice.
CREATE FUNCTION billing.worker_reclaim(p_lost_after timestamptz DEFAULT NULL, p_started timestamptz DEFAULT NULL)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_requests bigint;
  v_events bigint;
  v_possibly_sent bigint := 0;
  v_cluster bigint := (SELECT c.system_identifier FROM pg_control_system() c);
  v_others text[];
  v_restored boolean;
  v_unclean boolean := p_lost_after IS NOT NULL;
BEGIN
  -- Data from another cluster (a pg_dump restored here, pg_upgrade), or
  -- of unknown origin (an update from 0.1): the cluster it came from may
  -- have sent any of its queued requests after the dump was taken, so
  -- every one is taken as possibly sent since it was made.  (Restored into
  -- the cluster it was dumped from, it is not known: run this with
  -- '-infinity' by hand, docs/operations.md.)
  SELECT array_agg(DISTINCT i.system_identifier::text) FILTER (WHERE i.system_identifier <> v_cluster),
         count(*) FILTER (WHERE i.system_identifier <> v_cluster) > 0 OR count(*) = 0
    INTO v_others, v_restored
    FROM billing.cluster_identity i;
  IF v_restored THEN
    p_lost_after := '-infinity';
    p_started := NULL;
    DELETE FROM billing.cluster_identity i WHERE i.system_identifier <> v_cluster;
    INSERT INTO billing.cluster_identity (system_identifier)
    SELECT v_cluster WHERE NOT EXISTS (SELECT FROM billing.cluster_identity i WHERE i.system_identifier = v_cluster);
  END IF;
  -- (an attempt in flight at a crash may have reached Stripe)
  UPDATE billing.stripe_requests
     SET state = 'pending', first_sent_at = coalesce(first_sent_at, claimed_at), claimed_at = NULL,
         next_attempt_at = now(), updated_at = now()
   WHERE state = 'in_flight';
  GET DIAGNOSTICS v_requests = ROW_COUNT;
  -- After a start that was not clean (a crash, a restored backup, a
  -- promotion: src/shmem.c) commits made after p_lost_after may be
  -- missing: a claim never waits for its WAL flush (src/outbox.c), and a
  -- promoted standby or a backup may lack any.  A request whose claim (or
  -- release from waiting, or retry) was lost may have gone out though its
  -- row shows no attempt -- after p_lost_after, and after it was created;
  -- one created after this start (p_started) never went out that way.  Its
  -- key's time is taken to run from then: sent again within
  -- qes_billing.idempotency_window, it replays; past it, it fails as
  -- expired instead of going out blind.
  IF p_lost_after IS NOT NULL THEN
    -- these dates must outlive a crash right after this commit: the worker
    -- removes its record of the start once it is in (src/shmem.c), and a
    -- server that runs with synchronous_commit off would otherwise lose
    -- both (the next start's bound would be later than this one's).  The
    -- local flush is what counts ('local', not 'on': a synchronous standby
    -- that is gone, as after a failover, must not hold the worker).
    IF current_setting('synchronous_commit') = 'off' THEN
      PERFORM set_config('synchronous_commit', 'local', true);
    END IF;
    UPDATE billing.stripe_requests
       SET first_sent_at = greatest(created_at, p_lost_after)
     WHERE state IN ('pending', 'waiting') AND method <> 'GET' AND first_sent_at IS NULL
       AND created_at < coalesce(p_started, 'infinity');
    GET DIAGNOSTICS v_possibly_sent = ROW_COUNT;
    IF v_possibly_sent > 0 THEN
      RAISE WARNING 'qes_billing: % Stripe requests may have been sent by work this start lost', v_possibly_sent
        USING DETAIL = CASE WHEN v_restored
                            THEN 'The data comes from another cluster (a pg_dump restored here, pg_upgrade) or from before an update from 0.1; that cluster may have sent them after the dump (the worker.reclaimed audit entry says from which).'
                            ELSE 'The server did not start from a clean shutdown of a primary; commits after the last checkpoint before the start may be lost (the worker.reclaimed audit entry says when).' END,
              HINT = 'Each is sent again within qes_billing.idempotency_window; past it, it fails as expired and customers and subscriptions are looked up.';
    END IF;
  END IF;
  UPDATE billing.webhook_events
     SET state = 'received', next_attempt_at = now()
   WHERE state = 'processing';
  GET DIAGNOSTICS v_events = ROW_COUNT;
  -- (a start that was not clean is audited even when it found nothing)
  IF v_requests + v_events > 0 OR p_lost_after IS NOT NULL THEN
    PERFORM billing.audit('worker.reclaimed', NULL,
                          jsonb_build_object('stripe_requests', v_requests, 'webhook_events', v_events)
                          || CASE WHEN p_lost_after IS NULL THEN '{}'::jsonb
                                  ELSE jsonb_build_object('lost_after', p_lost_after, 'possibly_sent', v_possibly_sent) END
                          || CASE WHEN v_unclean THEN jsonb_build_object('unclean_start', true) ELSE '{}'::jsonb END
                          || CASE WHEN v_restored
                                  THEN jsonb_build_object('other_cluster', true,
                                                          'previous_system_identifiers', to_jsonb(coalesce(v_others, '{}')),
                                                          'system_identifier', v_cluster::text)
                                  ELSE '{}'::jsonb END);
  END IF;
  RETURN v_requests + v_events;
END
$$;
COMMENT ON FUNCTION billing.worker_reclaim(timestamptz, timestamptz) IS
  'Run by the worker at start: put queue rows left in flight by a crash back in the queue; after a start that was not from a clean shutdown of a primary, date the pending and waiting requests other than GETs created before the start (p_started) as possibly sent since p_lost_after (the last checkpoint before it), since lost work may have sent them; data from another cluster or of unknown origin (billing.cluster_identity: a pg_dump restored here, pg_upgrade, an update from 0.1) is dated likewise from each request''s creation. After restoring a dump into the cluster it came from, run it by hand with the dump''s start time, or ''-infinity'' (docs/operations.md).';

-- The worker's tick: apply due webhook events, then timers.  Returns the
-- number of events applied (the worker runs the next tick at once when it
-- was a full batch of p_events), the seconds until the next outbox request
-- is due (NULL: none waits), and the seconds until the tick has work again
-- (NULL: nothing is scheduled; the worker then runs no transaction until a
-- commit wakes it, docs/architecture.md, rule 14).
--
-- Each event is applied in a subtransaction with an xid of its own, and a
-- backend caches 64 of them: p_events stays below that (the worker passes
-- 50), so the batch never overflows the cache and slows every snapshot in
-- the cluster.
CREATE FUNCTION billing.worker_tick(p_events integer, OUT applied bigint, OUT outbox_due_s double precision,
                                    OUT next_due_s double precision)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_timeout interval := current_setting('qes_billing.request_timeout')::interval;
  v_naptime double precision := extract(epoch FROM current_setting('qes_billing.worker_naptime')::interval);
  v_events  double precision;
  v_stale   double precision;
  v_meters  double precision;
BEGIN
  applied := billing.process_inbox(p_events);
  -- usage billed through meters: the pass when due (NULL: none billed)
  v_meters := billing.meter_tick();
  -- outbox requests whose answer this worker lost
  PERFORM billing.outbox_reclaim_stale(v_timeout);
  -- cached usage counters of periods that ended more than a day ago
  PERFORM billing.usage_cache_sweep(billing.now() - interval '1 day');
  -- dispute evidence submitted before its deadline, when a setting says so
  PERFORM billing.dispute_timers();
  outbox_due_s := billing.outbox_next_due();

  IF applied >= p_events THEN
    next_due_s := 0;   -- more may be due now
    RETURN;
  END IF;
  -- an event retried with backoff; one due now but not applied (locked by
  -- someone else) is looked at again after the naptime
  SELECT extract(epoch FROM min(e.next_attempt_at) FILTER (WHERE e.next_attempt_at > now()) - now()),
         CASE WHEN bool_or(e.next_attempt_at <= now()) THEN v_naptime END
    INTO v_events, v_stale
    FROM billing.webhook_events e WHERE e.state = 'received';
  next_due_s := least(v_events, v_stale, v_meters);
  -- a request in flight whose answer may be lost: stale after twice the timeout
  SELECT extract(epoch FROM min(r.claimed_at) + 2 * v_timeout - now()) INTO v_stale
    FROM billing.stripe_requests r WHERE r.state = 'in_flight';
  next_due_s := least(next_due_s, v_stale);
  -- a prepared transaction may hold queued work, and COMMIT PREPARED wakes
  -- nobody: look again every naptime while one exists
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts) THEN
    next_due_s := least(next_due_s, v_naptime);
  END IF;
  -- (overdue is negative: the worker reads it as now)
END
$$;
COMMENT ON FUNCTION billing.worker_tick(integer) IS
  'Run by the worker: apply up to p_events due webhook events, timers. Returns the events applied, the seconds until the next outbox request is due, and the seconds until the tick has work again (NULL: none scheduled).';

CREATE FUNCTION billing.worker_state(
  OUT pid integer, OUT started_at timestamptz, OUT last_loop_at timestamptz,
  OUT loops bigint, OUT latch_wakeups bigint, OUT timeout_wakeups bigint,
  OUT naptime_ms integer, OUT reclaimed bigint, OUT extension_present boolean,
  OUT last_error text, OUT last_error_at timestamptz, OUT wake_requests bigint,
  OUT wakes_served bigint, OUT xacts bigint, OUT max_subxids integer, OUT subxid_overflows bigint)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_worker_state_fn';
COMMENT ON FUNCTION billing.worker_state() IS
  'The worker''s state as it publishes it in shared memory: loops and what woke them, transactions run (an idle worker runs none), the most subtransaction xids one of them cached (the PGPROC cache holds 64) and how many overflowed it.';

CREATE VIEW billing.worker_status AS
SELECT w.pid,
       w.started_at,
       w.last_loop_at,
       pg_catalog.clock_timestamp() - w.last_loop_at AS heartbeat_age,
       w.pid IS NOT NULL
         AND pg_catalog.clock_timestamp() - w.last_loop_at
             < make_interval(secs => 3 * w.naptime_ms / 1000.0 + 10) AS alive,
       w.loops,
       w.wake_requests,
       w.latch_wakeups,
       w.timeout_wakeups,
       w.naptime_ms,
       w.reclaimed,
       w.last_error,
       w.last_error_at,
       (SELECT count(*) FROM billing.stripe_requests r WHERE r.state = 'pending') AS outbox_pending,
       (SELECT count(*) FROM billing.stripe_requests r WHERE r.state = 'in_flight') AS outbox_in_flight,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'received') AS inbox_pending,
       (SELECT count(*) FROM billing.webhook_events e WHERE e.state = 'needs_review') AS inbox_parked
  FROM billing.worker_state() w;
COMMENT ON VIEW billing.worker_status IS
  'The worker: alive since, last loop, wake-ups, queue depths and its last error.';
