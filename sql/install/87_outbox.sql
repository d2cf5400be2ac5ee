-- The outbox protocol between SQL and the worker's HTTP client (src/outbox.c).
--
--   billing.outbox_enqueue()  backends queue a request in their transaction
--   billing.outbox_claim()    the worker claims due rows and COMMITs, then sends
--   billing.outbox_record()   the worker records one answer in a new transaction:
--                             success is applied to local state right there;
--                             a retryable failure goes back to the queue with
--                             backoff; anything else is a final failure
--   billing.outbox_record_batch()  the same for a batch of answers in one
--                             call (the worker's common path)
--
-- Retry policy (docs/architecture.md, rule 4): network errors, timeouts, 409, 429 and
-- 5xx are retried, unless Stripe-Should-Retry says otherwise (it overrides
-- the default either way); Retry-After is a lower bound on the delay; the
-- delay doubles per attempt from qes_billing.retry_base_delay up to
-- qes_billing.retry_max_delay, with jitter (50-100 % of it).  After
-- qes_billing.max_attempts the request fails with its last error.  Requests
-- that wait for another (after_request) fail with it.

CREATE FUNCTION billing.stripe_form(params jsonb) RETURNS text
  LANGUAGE c IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'qes_stripe_form_fn';
COMMENT ON FUNCTION billing.stripe_form(jsonb) IS
  'Stripe''s form encoding of request parameters (what the worker sends for a queued request).';

-- The direct lane (src/outbox_lane.c, docs/architecture.md, "The direct
-- lane"): while the worker would claim a request at once, the transaction
-- that queues it claims it itself -- the row goes in in_flight, attempt 1,
-- as billing.outbox_claim would have left it -- and hands it to the worker
-- through shared memory, which sends it once this transaction has
-- committed, without a transaction of its own.  NULL: the lane is closed or
-- full, or the request too large for it; the request is queued pending.
CREATE FUNCTION billing.outbox_lane_reserve(p_method text, p_path text, p_params jsonb, p_idempotency_key text)
  RETURNS integer
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_outbox_lane_reserve';
COMMENT ON FUNCTION billing.outbox_lane_reserve(text, text, jsonb, text) IS
  'Run by billing.outbox_enqueue: a slot of the outbox''s direct lane for the request about to be inserted, or NULL.';
CREATE FUNCTION billing.outbox_lane_fill(p_slot integer, p_request_id bigint) RETURNS void
  LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'qes_outbox_lane_fill';
COMMENT ON FUNCTION billing.outbox_lane_fill(integer, bigint) IS
  'Run by billing.outbox_enqueue: the row of a reserved lane slot is inserted.';

CREATE FUNCTION billing.outbox_note_waiter() RETURNS void
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_outbox_note_waiter';
COMMENT ON FUNCTION billing.outbox_note_waiter() IS
  'Run by billing.outbox_enqueue: a request now waits for another, so the worker records answers at once (a chain goes at the pace of Stripe''s answers).';

CREATE FUNCTION billing.outbox_lane_state(OUT open boolean, OUT slots_in_use integer, OUT sent bigint,
                                          OUT released bigint)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_outbox_lane_state';
COMMENT ON FUNCTION billing.outbox_lane_state() IS
  'The outbox''s direct lane: open (the worker would claim a request at once, so the queuing transaction claims it), its slots in use, and since the server started how many requests the worker sent from it and how many it put back in the queue (too old, no key, the rate limit).';

-- Run by the worker: requests of the lane it could not send (no key, the
-- rate limit's bucket empty, a slot older than the request timeout) go back
-- to the queue as if never claimed, to be claimed the ordinary way.
CREATE FUNCTION billing.outbox_lane_release(p_request_ids bigint[]) RETURNS bigint
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
BEGIN ATOMIC
  WITH r AS (
    UPDATE billing.stripe_requests
       SET state = 'pending', attempts = attempts - 1, claimed_at = NULL, next_attempt_at = now(),
           updated_at = now()
     WHERE request_id = ANY (p_request_ids) AND state = 'in_flight' AND attempts = 1
       AND first_sent_at IS NULL
    RETURNING 1)
  SELECT count(*) FROM r;
END;
COMMENT ON FUNCTION billing.outbox_lane_release(bigint[]) IS
  'Run by the worker: put requests of the direct lane it did not send back in the queue, unclaimed. Returns how many.';

CREATE FUNCTION billing.outbox_enqueue(p_tenant text, p_kind text, p_method text, p_path text,
                                       p_params jsonb DEFAULT '{}', p_subject jsonb DEFAULT '{}',
                                       p_after bigint DEFAULT NULL, p_inherit text DEFAULT NULL,
                                       p_run_id text DEFAULT NULL, p_not_before timestamptz DEFAULT NULL)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_id    bigint;
  v_after billing.stripe_requests;
  v_key   text := 'qes-' || gen_random_uuid();
  v_slot  integer;
BEGIN
  IF p_after IS NOT NULL THEN
    SELECT * INTO v_after FROM billing.stripe_requests WHERE request_id = p_after;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'outbox request % does not exist', p_after USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF v_after.state = 'failed' THEN
      RAISE EXCEPTION 'outbox request % has failed; nothing can wait for it', p_after
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM billing.outbox_note_waiter();
  ELSIF (p_not_before IS NULL OR p_not_before <= now())
        AND NOT coalesce(billing.tenant_fenced(p_tenant), false)
        AND NOT EXISTS (SELECT FROM billing.stripe_rate_budget) THEN
    -- due now, for a tenant whose partition is not moving, and no share of
    -- a sharded account's rate to take: the direct lane may take it
    v_slot := billing.outbox_lane_reserve(p_method, p_path, p_params, v_key);
  END IF;
  INSERT INTO billing.stripe_requests (tenant_id, kind, method, path, params, subject, after_request, inherit,
                                       run_id, idempotency_key, state, attempts, claimed_at, next_attempt_at)
  VALUES (p_tenant, p_kind, p_method, p_path, p_params, p_subject, p_after, p_inherit, p_run_id, v_key,
          CASE WHEN v_slot IS NOT NULL THEN 'in_flight' WHEN p_after IS NULL THEN 'pending' ELSE 'waiting' END,
          (v_slot IS NOT NULL)::integer, CASE WHEN v_slot IS NOT NULL THEN clock_timestamp() END,
          greatest(now(), p_not_before))
  RETURNING request_id INTO v_id;
  IF v_slot IS NOT NULL THEN
    PERFORM billing.outbox_lane_fill(v_slot, v_id);
  END IF;
  IF v_after.state = 'succeeded' THEN
    PERFORM billing.outbox_release_waiting(v_after);   -- done already: due at once
  END IF;
  RETURN v_id;
END
$$;
COMMENT ON FUNCTION billing.outbox_enqueue(text, text, text, text, jsonb, jsonb, bigint, text, text, timestamptz) IS
  'Queue a Stripe request in the caller''s transaction; the worker sends it after COMMIT (not before p_not_before). With p_after it waits for that request and, with p_inherit, receives its response id as that parameter. While the worker has no backlog the request is claimed here and handed to the worker directly (the direct lane): its row is in_flight from the start.';

-- Queue a request unless the same one (tenant, kind, path) is still
-- queued or in flight; returns the request either way.
CREATE FUNCTION billing.outbox_enqueue_once(p_tenant text, p_kind text, p_method text, p_path text,
                                            p_params jsonb DEFAULT '{}', p_not_before timestamptz DEFAULT NULL)
  RETURNS bigint
  LANGUAGE sql VOLATILE SET search_path = pg_catalog, billing
AS $$
  SELECT coalesce(
    (SELECT r.request_id FROM billing.stripe_requests r
      WHERE r.tenant_id = p_tenant AND r.kind = p_kind AND r.path = p_path
        AND r.state IN ('waiting', 'pending', 'in_flight')
      ORDER BY r.request_id LIMIT 1),
    billing.outbox_enqueue(p_tenant, p_kind, p_method, p_path, p_params, p_not_before => p_not_before))
$$;
COMMENT ON FUNCTION billing.outbox_enqueue_once(text, text, text, text, jsonb, timestamptz) IS
  'Queue a request unless the same one (tenant, kind, path) is still queued or in flight; returns the request.';

-- Claim due requests for sending: the worker commits this before any byte
-- goes out.  Rows are taken with SKIP LOCKED, so a backend busy with a
-- row (replaying it, say) never blocks the worker.  PL/pgSQL keeps the plan
-- for the worker's session; the due rows are found in the order of the
-- stripe_requests_due index (no sort) and updated through the primary key,
-- so a claim costs the same however many rows the table or the queue holds
-- (a join planned for an unknown LIMIT hashed the whole table per claim).
CREATE FUNCTION billing.outbox_claim(p_limit integer)
  RETURNS TABLE (request_id bigint, attempt integer, method text, path text, params jsonb, idempotency_key text)
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  -- this database's share of the Stripe account's rate (87_outbox_budget.sql),
  -- when a coordinator gave it one (a sharded deployment); else p_limit
  v_budget  boolean := EXISTS (SELECT FROM billing.stripe_rate_budget);
  v_room    integer := CASE WHEN v_budget THEN billing.stripe_budget_take(p_limit) ELSE p_limit END;
  -- A request that changes something in Stripe and may have reached it
  -- (first_sent_at: an attempt that got an answer, or ended without one
  -- after connecting, or was in flight at a crash) is sent again only while
  -- Stripe still keeps its Idempotency-Key's result; after that a resend
  -- could act twice, so it fails instead, as an unknown outcome ("expired").
  v_expiry  timestamptz := now() - current_setting('qes_billing.idempotency_window')::interval;
  v_n       integer := 0;
  v_passes  integer := 0;
  v_expired jsonb[];
  v_msg     text;
  c         record;
  x         jsonb;
BEGIN
  -- One statement claims the due rows.  An expired row is taken in the same
  -- statement (its attempt not counted, claimed_at left NULL to mark it) and
  -- failed below instead of being returned; the room it took is claimed
  -- again, so that a backlog of them (after an outage) does not make the
  -- worker wait a naptime per batch.
  LOOP
    v_expired := NULL;
    FOR c IN
      UPDATE billing.stripe_requests r
         SET state = 'in_flight', updated_at = now(),
             attempts = r.attempts + (NOT coalesce(r.method <> 'GET' AND r.first_sent_at <= v_expiry, false))::integer,
             claimed_at = CASE WHEN r.method <> 'GET' AND r.first_sent_at <= v_expiry THEN NULL ELSE now() END
       WHERE r.request_id = ANY (ARRAY(
               SELECT d.request_id FROM billing.stripe_requests d
                WHERE d.state = 'pending' AND d.next_attempt_at <= now()
                  -- not for a tenant whose partition is moving (src/fence.c)
                  AND NOT billing.tenant_fenced(d.tenant_id)
                ORDER BY d.next_attempt_at, d.request_id
                LIMIT v_room - v_n
                  FOR UPDATE SKIP LOCKED))
      RETURNING r.request_id, r.attempts, r.method, r.path, r.params, r.idempotency_key, r.claimed_at,
                r.first_sent_at, r.http_status, r.error, r.tenant_id, r.kind
    LOOP
      IF c.claimed_at IS NULL THEN
        v_expired := v_expired || jsonb_build_object(
          'request_id', c.request_id, 'tenant_id', c.tenant_id, 'kind', c.kind, 'http_status', c.http_status,
          'error', jsonb_build_object('category', 'expired', 'retryable', false, 'previous_error', c.error,
            'message', format('not sent again: it may have reached Stripe (first at %s, %s attempt(s)) and '
                              'Stripe no longer keeps the result of its Idempotency-Key '
                              '(qes_billing.idempotency_window %s), so a resend could act twice',
                              c.first_sent_at, c.attempts, current_setting('qes_billing.idempotency_window'))));
        CONTINUE;
      END IF;
      request_id := c.request_id; attempt := c.attempts; method := c.method; path := c.path;
      params := c.params; idempotency_key := c.idempotency_key;
      v_n := v_n + 1;
      RETURN NEXT;
    END LOOP;
    EXIT WHEN v_expired IS NULL;
    -- all of them at once, in one subtransaction
    BEGIN
      FOREACH x IN ARRAY v_expired LOOP
        PERFORM billing.outbox_fail((x ->> 'request_id')::bigint, (x ->> 'http_status')::integer, NULL, x -> 'error');
      END LOOP;
    EXCEPTION WHEN OTHERS THEN
      -- what a failure sets off raised: one by one, and one that raises
      -- again is parked (pending, never due), so that the claim goes on
      -- and nothing sends it; once the cause is fixed an operator's
      -- billing.retry_request makes it due, and the next claim fails it
      FOREACH x IN ARRAY v_expired LOOP
        BEGIN
          PERFORM billing.outbox_fail((x ->> 'request_id')::bigint, (x ->> 'http_status')::integer, NULL, x -> 'error');
        EXCEPTION WHEN OTHERS THEN
          GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
          UPDATE billing.stripe_requests s
             SET state = 'pending', claimed_at = NULL, next_attempt_at = 'infinity', updated_at = now(),
                 error = billing.redact(x -> 'error' || jsonb_build_object('parked', v_msg))
           WHERE s.request_id = (x ->> 'request_id')::bigint;
          -- (audited as a failure, so that the failing-requests alert fires)
          PERFORM billing.audit('stripe.request_failed', x ->> 'tenant_id',
            jsonb_build_object('request_id', (x ->> 'request_id')::bigint, 'kind', x ->> 'kind',
                               'error', x -> 'error', 'parked', v_msg,
                               'to_do', format('fix the cause, then SELECT billing.retry_request(%s) (the next claim fails it)',
                                               x ->> 'request_id')));
          RAISE WARNING 'qes_billing: Stripe request % parked: its failure could not be recorded: %',
            x ->> 'request_id', v_msg;
        END;
      END LOOP;
    END;
    -- (a few passes per claim: each takes a subtransaction id, and the
    -- rows already claimed wait for this transaction's commit)
    v_passes := v_passes + 1;
    EXIT WHEN v_n >= v_room OR v_passes >= 4;
  END LOOP;
  IF v_budget AND v_n < v_room THEN
    PERFORM billing.stripe_budget_give_back(v_room - v_n);
  END IF;
END
$$;
COMMENT ON FUNCTION billing.outbox_claim(integer) IS
  'Run by the worker: mark up to p_limit due requests in flight and return them for sending. A request that changes something in Stripe and may have reached it more than qes_billing.idempotency_window ago (first_sent_at) is failed instead (category expired: its outcome is unknown and a resend could act twice).';

-- Seconds until the next request is due (0: now; NULL: none waits), so the
-- worker sleeps exactly as long as it may.  (greatest(0, NULL) is 0, not
-- NULL: an empty queue must not read as "due now".)
CREATE FUNCTION billing.outbox_next_due() RETURNS double precision
  LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing
AS $$
BEGIN
  -- and not before this database's share of the account's rate allows one
  -- (a sharded deployment's; none without a coordinator)
  RETURN (SELECT greatest(0, extract(epoch FROM d.at - now()),
                          CASE WHEN EXISTS (SELECT FROM billing.stripe_rate_budget) THEN billing.stripe_budget_wait() END
                         )::double precision
            -- (a request parked by billing.outbox_claim is never due)
            FROM (SELECT min(r.next_attempt_at) AS at FROM billing.stripe_requests r
                   WHERE r.state = 'pending' AND r.next_attempt_at < 'infinity') d
           WHERE d.at IS NOT NULL);
END
$$;
COMMENT ON FUNCTION billing.outbox_next_due() IS 'Seconds until the next outbox request is due; NULL when none is pending.';

-- A request in flight whose answer can no longer come (the worker lost it:
-- an error while recording, a restart without a crash) goes back to the
-- queue after twice the request timeout.
CREATE FUNCTION billing.outbox_reclaim_stale(p_timeout interval) RETURNS bigint
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_n bigint;
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'pending', first_sent_at = coalesce(first_sent_at, claimed_at), claimed_at = NULL,
         next_attempt_at = now(), updated_at = now()
   WHERE state = 'in_flight' AND claimed_at < now() - 2 * p_timeout
     AND NOT billing.tenant_fenced(tenant_id);   -- its partition is moving: the target reclaims it
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n > 0 THEN
    PERFORM billing.audit('worker.reclaimed', NULL, jsonb_build_object('stripe_requests', v_n, 'stale', true));
  END IF;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.outbox_reclaim_stale(interval) IS
  'Put requests in flight for longer than twice the request timeout back in the queue (their answer was lost).';

-- What an unsuccessful answer is: a category, whether to retry, and
-- Stripe's error fields.
CREATE FUNCTION billing.outbox_classify(p_http_status integer, p_body jsonb, p_should_retry text,
                                        p_transport_error text)
  RETURNS jsonb
  LANGUAGE sql IMMUTABLE
AS $$
  SELECT jsonb_strip_nulls(jsonb_build_object(
    'category', c.category,
    'retryable', CASE lower(p_should_retry) WHEN 'true' THEN true WHEN 'false' THEN false
                 ELSE c.category IN ('network', 'conflict', 'rate_limited', 'server') END,
    'http_status', p_http_status,
    'type', p_body -> 'error' ->> 'type',
    'code', p_body -> 'error' ->> 'code',
    'decline_code', p_body -> 'error' ->> 'decline_code',
    'param', p_body -> 'error' ->> 'param',
    'message', coalesce(p_transport_error, p_body -> 'error' ->> 'message',
                        'HTTP ' || p_http_status || ' from Stripe')))
    FROM (SELECT CASE
                   WHEN p_transport_error IS NOT NULL OR p_http_status IS NULL THEN 'network'
                   WHEN p_http_status = 409 THEN 'conflict'
                   WHEN p_http_status = 429 THEN 'rate_limited'
                   WHEN p_http_status >= 500 THEN 'server'
                   WHEN p_http_status = 402 OR p_body -> 'error' ->> 'type' = 'card_error' THEN 'card'
                   WHEN p_http_status = 401 THEN 'authentication'
                   WHEN p_http_status = 403 THEN 'permission'
                   WHEN p_http_status = 404 THEN 'not_found'
                   ELSE 'invalid_request'
                 END AS category) c
$$;
COMMENT ON FUNCTION billing.outbox_classify(integer, jsonb, text, text) IS
  'Classify an unsuccessful Stripe answer: network, conflict (409), rate_limited (429) and server (5xx) are retried; card, authentication, permission, not_found and invalid_request are business failures. Stripe-Should-Retry overrides.';

-- The delay before attempt n+1.
CREATE FUNCTION billing.outbox_backoff(p_attempts integer, p_retry_after text DEFAULT NULL) RETURNS interval
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_delay double precision := extract(epoch FROM billing.backoff(p_attempts,
                                                                 current_setting('qes_billing.retry_base_delay')::interval,
                                                                 current_setting('qes_billing.retry_max_delay')::interval));
BEGIN
  IF p_retry_after ~ '^\s*[0-9]{1,6}\s*$' THEN
    v_delay := greatest(v_delay, btrim(p_retry_after)::double precision);
  END IF;
  RETURN make_interval(secs => v_delay);
END
$$;
COMMENT ON FUNCTION billing.outbox_backoff(integer, text) IS
  'Exponential backoff with jitter after the given number of attempts; Retry-After (seconds) is a lower bound.';

-- A 404 is the answer, not a failure, for the lookups setup makes.
CREATE FUNCTION billing.outbox_accepts(p_kind text, p_http_status integer) RETURNS boolean
  LANGUAGE sql IMMUTABLE
RETURN p_http_status BETWEEN 200 AND 299 OR (p_http_status = 404 AND p_kind LIKE '%.lookup');

-- Recording an answer.  billing.outbox_record guards each step: a body
-- that is not JSON is kept as text, and an answer Stripe gave that cannot be
-- applied goes back to the queue (category apply) -- each in a
-- subtransaction.  The worker records a batch of answers with one call of
-- billing.outbox_record_batch, unguarded (no subtransaction per answer);
-- when anything in the batch raises, it rolls the batch back and records
-- each answer with billing.outbox_record instead (src/outbox.c), so one bad
-- answer never undoes the others and the outcome is the same either way.
CREATE FUNCTION billing.outbox_succeed(r billing.stripe_requests, p_http_status integer, p_body jsonb)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'succeeded', http_status = p_http_status, response = billing.redact(p_body), error = NULL,
         updated_at = now()
   WHERE request_id = r.request_id
   RETURNING * INTO r;
  -- the row keeps the answer redacted (docs/architecture.md, rule 13); applying it
  -- sees all of it (setup stores an endpoint's signing secret in
  -- billing.stripe_secrets, the one place a secret is kept)
  r.response := p_body;
  PERFORM billing.outbox_apply(r);
  PERFORM billing.outbox_release_waiting(r);
  RETURN 'succeeded';
END
$$;
COMMENT ON FUNCTION billing.outbox_succeed(billing.stripe_requests, integer, jsonb) IS
  'A successful answer: stored redacted, applied unredacted, and the requests that waited for it released.';

CREATE FUNCTION billing.outbox_record_answer(p_request_id bigint, p_attempt integer, p_http_status integer,
                                             p_body text, p_should_retry text, p_retry_after text,
                                             p_transport_error text, p_guarded boolean)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  r       billing.stripe_requests;
  v_body  jsonb;
  v_err   jsonb;
  v_msg   text;
BEGIN
  SELECT * INTO r FROM billing.stripe_requests WHERE request_id = p_request_id FOR UPDATE;
  IF NOT FOUND OR r.state <> 'in_flight' OR r.attempts <> p_attempt THEN
    RETURN NULL;   -- reclaimed meanwhile: a later attempt owns the row
  END IF;
  -- this attempt may have reached Stripe unless the worker says it never
  -- connected (src/outbox.c, QES_NOT_SENT): the key's 24 hours run from the first
  IF r.first_sent_at IS NULL AND (p_transport_error IS NULL OR p_transport_error NOT LIKE 'not sent: %') THEN
    r.first_sent_at := r.claimed_at;
    UPDATE billing.stripe_requests SET first_sent_at = r.claimed_at WHERE request_id = r.request_id;
  END IF;
  IF NOT p_guarded THEN
    v_body := p_body::jsonb;   -- not JSON: raises, and the worker records it guarded
  ELSE
    BEGIN
      v_body := p_body::jsonb;
    EXCEPTION WHEN OTHERS THEN
      v_body := jsonb_build_object('unparsed_body', left(p_body, 2000));
    END;
  END IF;

  IF p_transport_error IS NULL AND billing.outbox_accepts(r.kind, p_http_status) THEN
    IF NOT p_guarded THEN
      RETURN billing.outbox_succeed(r, p_http_status, v_body);
    END IF;
    BEGIN
      RETURN billing.outbox_succeed(r, p_http_status, v_body);
    EXCEPTION WHEN OTHERS THEN
      -- Stripe answered but we could not apply it: ask again (the same
      -- Idempotency-Key replays the same answer) after a backoff
      GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
      v_err := jsonb_build_object('category', 'apply', 'retryable', true, 'http_status', p_http_status,
                                  'message', v_msg);
    END;
  ELSE
    v_err := billing.outbox_classify(p_http_status, v_body, p_should_retry, p_transport_error);
  END IF;

  v_err := billing.redact(v_err);   -- an answer may echo our Authorization header
  -- Retried while attempts remain; and an outcome that is unknown (the
  -- request may have reached Stripe: network, 5xx, 409, an answer we could
  -- not apply) is retried with the same key for as long as Stripe keeps the
  -- key's result (qes_billing.idempotency_window, under its 24 hours), so a
  -- retry replays instead of acting twice.  Only then may it fail (and a
  -- customer or subscription is looked up before that failure stands).
  IF (v_err ->> 'retryable')::boolean
     AND (r.attempts < current_setting('qes_billing.max_attempts')::integer
          OR (v_err ->> 'category' IN ('network', 'server', 'conflict', 'apply')
              AND now() < coalesce(r.first_sent_at, r.created_at) + current_setting('qes_billing.idempotency_window')::interval)) THEN
    UPDATE billing.stripe_requests
       SET state = 'pending', http_status = p_http_status, error = v_err, claimed_at = NULL,
           next_attempt_at = now() + billing.outbox_backoff(r.attempts, p_retry_after), updated_at = now()
     WHERE request_id = r.request_id;
    RETURN 'pending';
  END IF;
  PERFORM billing.outbox_fail(r.request_id, p_http_status, v_body, v_err);
  RETURN 'failed';
END
$$;
COMMENT ON FUNCTION billing.outbox_record_answer(bigint, integer, integer, text, text, text, text, boolean) IS
  'Record one answer: succeeded and applied, back to pending with backoff, or failed. Guarded: a body that is not JSON is kept as text and an answer that cannot be applied is retried; unguarded, either raises. Returns the new state; NULL when the row was reclaimed meanwhile.';

CREATE FUNCTION billing.outbox_record(p_request_id bigint, p_attempt integer, p_http_status integer,
                                      p_body text, p_should_retry text DEFAULT NULL,
                                      p_retry_after text DEFAULT NULL, p_transport_error text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  RETURN billing.outbox_record_answer(p_request_id, p_attempt, p_http_status, p_body, p_should_retry,
                                      p_retry_after, p_transport_error, true);
END
$$;
COMMENT ON FUNCTION billing.outbox_record(bigint, integer, integer, text, text, text, text) IS
  'Run by the worker after an answer (or a transport error): succeeded and applied, back to pending with backoff, or failed. Returns the new state; NULL when the row was reclaimed meanwhile.';

-- A batch of answers, element i of each array being one answer (the
-- worker's common path, one call per batch).  The successful answers are
-- stored in one UPDATE (one executor start, one check of the table's
-- constraints and triggers for the batch, not one per answer), then each is
-- applied as billing.outbox_succeed applies one; the others are recorded one
-- by one.  Unguarded: anything that raises undoes the whole batch, which
-- the worker then records answer by answer with billing.outbox_record.
-- Returns how many were recorded (not reclaimed meanwhile).
CREATE FUNCTION billing.outbox_record_batch(p_request_ids bigint[], p_attempts integer[], p_http_status integer[],
                                            p_bodies text[], p_should_retry text[], p_retry_after text[],
                                            p_transport_errors text[])
  RETURNS integer
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  v      record;
  r      billing.stripe_requests;
  v_done boolean[] := array_fill(false, ARRAY[coalesce(cardinality(p_request_ids), 0)]);
  v_n    integer := 0;
  -- does anything wait for one of them?  One look for the batch, taken
  -- after its UPDATE (as a release per answer would be), not a statement per
  -- answer; a request an answer's application queues to wait for one of
  -- them sees it succeeded and is released at once.
  v_waited boolean;
BEGIN
  -- (applied in the order of the arrays, the order the worker sent the
  -- requests in: of two answers about one object, the later wins)
  FOR v IN
    WITH u AS (
      UPDATE billing.stripe_requests s
         SET state = 'succeeded', http_status = a.http_status, response = billing.redact(a.body), error = NULL,
             first_sent_at = coalesce(s.first_sent_at, s.claimed_at), updated_at = now()
        FROM (SELECT x.request_id, x.attempt, x.http_status, x.body::jsonb AS body, x.ord
                FROM unnest(p_request_ids, p_attempts, p_http_status, p_bodies, p_transport_errors)
                       WITH ORDINALITY AS x(request_id, attempt, http_status, body, transport_error, ord)
               WHERE x.transport_error IS NULL) a
       WHERE s.request_id = a.request_id AND s.request_id = ANY (p_request_ids)
         -- (a value the planner does not see: the rows are found by their
         -- primary key, never by a scan of stripe_requests_in_flight, whatever
         -- the statistics say)
         AND s.state = (SELECT 'in_flight'::text)
         AND s.attempts = a.attempt AND billing.outbox_accepts(s.kind, a.http_status)
      RETURNING s AS req, a.body, a.ord)
    SELECT * FROM u ORDER BY u.ord
  LOOP
    -- as billing.outbox_succeed: stored redacted, applied as Stripe sent it
    r := v.req;
    r.response := v.body;
    PERFORM billing.outbox_apply(r);
    IF v_waited IS NULL THEN
      v_waited := EXISTS (SELECT FROM billing.stripe_requests w
                           WHERE w.after_request = ANY (p_request_ids) AND w.state = 'waiting');
    END IF;
    IF v_waited THEN
      PERFORM billing.outbox_release_waiting(r);
    END IF;
    v_done[v.ord] := true;
    v_n := v_n + 1;
  END LOOP;
  FOR i IN 1 .. coalesce(cardinality(p_request_ids), 0) LOOP
    CONTINUE WHEN v_done[i];
    IF billing.outbox_record_answer(p_request_ids[i], p_attempts[i], p_http_status[i], p_bodies[i],
                                    p_should_retry[i], p_retry_after[i], p_transport_errors[i], false) IS NOT NULL THEN
      v_n := v_n + 1;
    END IF;
  END LOOP;
  RETURN v_n;
END
$$;
COMMENT ON FUNCTION billing.outbox_record_batch(bigint[], integer[], integer[], text[], text[], text[], text[]) IS
  'Run by the worker: record a batch of answers in one call, unguarded (an error undoes the batch; the worker then records each with billing.outbox_record). Returns how many were recorded.';

-- A final failure, and everything that waited for it.
CREATE FUNCTION billing.outbox_fail(p_request_id bigint, p_http_status integer, p_body jsonb, p_err jsonb)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  r      billing.stripe_requests;
  w      bigint;
  v_kind text;
BEGIN
  UPDATE billing.stripe_requests
     SET state = 'failed', http_status = p_http_status, response = billing.redact(p_body),
         error = billing.redact(p_err) || jsonb_build_object('attempts', attempts), claimed_at = NULL, updated_at = now()
   WHERE request_id = p_request_id
   RETURNING * INTO r;
  PERFORM billing.outbox_apply_failure(r);
  PERFORM billing.audit('stripe.request_failed', r.tenant_id,
                        jsonb_build_object('request_id', r.request_id, 'kind', r.kind, 'error', r.error));
  FOR w, v_kind IN SELECT c.request_id, c.kind FROM billing.stripe_requests c
                    WHERE c.after_request = p_request_id AND c.state = 'waiting' LOOP
    IF r.kind = 'tax_exempt.update' AND v_kind = 'tax_exempt.update' THEN
      -- a chain for order only (billing.tax_exempt_send, 91_tax.sql): the
      -- newer decision goes out whatever became of the older one, which
      -- may have reached Stripe before it failed
      UPDATE billing.stripe_requests SET state = 'pending', next_attempt_at = now(), updated_at = now()
       WHERE request_id = w;
      CONTINUE;
    END IF;
    PERFORM billing.outbox_fail(w, NULL, NULL,
                                jsonb_build_object('category', 'dependency', 'retryable', false,
                                                   'message', format('request %s (%s) failed: %s', r.request_id,
                                                                     r.kind, r.error ->> 'message')));
  END LOOP;
END
$$;
COMMENT ON FUNCTION billing.outbox_fail(bigint, integer, jsonb, jsonb) IS
  'Mark a request failed for good, undo what its caller started, audit it, and fail the requests that waited for it (a tax_exempt.update waiting for an older one, for order only, is released instead).';

CREATE FUNCTION billing.outbox_release_waiting(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  UPDATE billing.stripe_requests c
     SET state = 'pending', next_attempt_at = now(), updated_at = now(),
         params = CASE WHEN c.inherit IS NULL THEN c.params
                       ELSE c.params || jsonb_build_object(c.inherit, r.response ->> 'id') END
   WHERE c.after_request = r.request_id AND c.state = 'waiting';
END
$$;

-- The Stripe time a response speaks for: when we sent the request, on the
-- billing clock (the real clock in production; moved with it in a test or
-- demo, as Stripe's times are there).  A webhook event created later (a
-- later state) still wins; one created before does not.  A POST is answered
-- under its Idempotency-Key with the body of the FIRST attempt that reached
-- Stripe, whenever the retry that gets it goes out: its answer speaks for
-- that first attempt (first_sent_at), never for the retry, or a body lost
-- once and replayed later would overwrite a state a webhook brought in
-- between (docs/architecture.md, "Mirroring Stripe" and "Unknown
-- outcomes").  A GET or a DELETE is not replayed (Stripe ignores their
-- keys): its answer is the state when this attempt was sent (claimed_at).
CREATE FUNCTION billing.outbox_state_at(r billing.stripe_requests) RETURNS timestamptz
  LANGUAGE sql STABLE
RETURN date_trunc('second', coalesce(CASE WHEN r.method = 'POST' THEN r.first_sent_at END, r.claimed_at, r.updated_at)
                            + (billing.now() - pg_catalog.now()));
COMMENT ON FUNCTION billing.outbox_state_at(billing.stripe_requests) IS
  'The Stripe time an answer speaks for, on the billing clock: a POST''s first attempt that may have reached Stripe (first_sent_at: a retry replays that attempt''s answer), else the attempt answered (claimed_at).';

-- Success: what the answer means for local state.
CREATE FUNCTION billing.outbox_apply(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  o      jsonb := r.response;
  v_sub  bigint := (r.subject ->> 'subscription_id')::bigint;
  v_secret text;
BEGIN
  CASE
  WHEN r.kind = 'customer.create' THEN
    UPDATE billing.tenants SET stripe_customer_id = o ->> 'id', updated_at = now()
     WHERE tenant_id = r.tenant_id AND stripe_customer_id IS NULL;
    PERFORM billing.audit('customer.created', r.tenant_id, jsonb_build_object('customer', o ->> 'id'));
    PERFORM billing.billing_details_send(r.tenant_id);   -- details given before the customer (91_tax.sql)
  WHEN r.kind IN ('subscription.create', 'subscription.update', 'subscription.refresh') THEN
    IF v_sub IS NOT NULL THEN
      UPDATE billing.subscriptions SET stripe_subscription_id = o ->> 'id'
       WHERE tenant_id = r.tenant_id AND subscription_id = v_sub AND stripe_subscription_id IS NULL;
    END IF;
    PERFORM billing.apply_subscription(r.tenant_id, o, billing.outbox_state_at(r), o ->> 'status' = 'canceled');
    UPDATE billing.subscriptions s
       SET stripe_item_id = coalesce(billing.base_item_of(o), s.stripe_item_id),
           metered_items = billing.metered_items_of(o),
           client_secret = CASE WHEN s.status = 'incomplete'
                                THEN coalesce(o -> 'latest_invoice' -> 'payment_intent' ->> 'client_secret',
                                              o -> 'latest_invoice' -> 'confirmation_secret' ->> 'client_secret',
                                              s.client_secret) END,
           pending_change = CASE WHEN r.kind = 'subscription.update' THEN NULL ELSE s.pending_change END,
           last_error = CASE WHEN r.kind = 'subscription.refresh' THEN s.last_error END,
           updated_at = now()
     WHERE s.stripe_subscription_id = o ->> 'id';
    IF r.kind <> 'subscription.refresh' THEN
      PERFORM billing.audit(CASE r.kind WHEN 'subscription.create' THEN 'subscription.created'
                                        ELSE 'subscription.changed' END, r.tenant_id,
                            jsonb_build_object('subscription', o ->> 'id', 'status', o ->> 'status',
                                               'price', billing.base_item(o) -> 'price' ->> 'id',
                                               'cancel_at_period_end', o -> 'cancel_at_period_end'));
    END IF;
  WHEN r.kind = 'payment_intent.create' THEN
    -- link the row, then mirror the answer as an event would (newer state wins)
    UPDATE billing.payments p SET stripe_payment_intent_id = o ->> 'id', client_secret = o ->> 'client_secret'
     WHERE p.tenant_id = r.tenant_id AND p.payment_id = (r.subject ->> 'payment_id')::bigint;
    PERFORM billing.apply_payment(r.tenant_id, o, billing.outbox_state_at(r), o ->> 'status');
    PERFORM billing.audit('payment_intent.created', r.tenant_id,
                          jsonb_build_object('payment_id', (r.subject ->> 'payment_id')::bigint,
                                             'payment_intent', o ->> 'id', 'status', o ->> 'status'));
  WHEN r.kind LIKE 'setup.%' THEN
    PERFORM billing.setup_apply(r);
  WHEN r.kind LIKE 'dispute.%' THEN
    PERFORM billing.dispute_apply_answer(r);   -- evidence staged or submitted (94_disputes.sql)
  WHEN r.kind IN ('billing_details.update', 'tax_id.create') THEN
    PERFORM billing.billing_details_apply(r);  -- tax (91_tax.sql)
  WHEN r.kind IN ('tax.calculation', 'tax.transaction') THEN
    PERFORM billing.tax_calculation_apply(r);
  WHEN r.kind LIKE 'meter.%' THEN
    PERFORM billing.meter_apply(r);    -- usage billed through meters (94_meters.sql)
  ELSE
    NULL;   -- a request whose answer changes nothing local (it is kept on the row)
  END CASE;
END
$$;
COMMENT ON FUNCTION billing.outbox_apply(billing.stripe_requests) IS
  'Apply a successful Stripe answer to local state, in the transaction that records it.';

-- Final failure: undo what the caller started, and say why where the tenant sees it.
CREATE FUNCTION billing.outbox_apply_failure(r billing.stripe_requests) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_sub bigint := (r.subject ->> 'subscription_id')::bigint;
BEGIN
  CASE
  WHEN r.kind = 'subscription.create' THEN
    UPDATE billing.subscriptions SET status = 'incomplete_expired', last_error = r.error, client_secret = NULL,
                                     updated_at = now()
     WHERE tenant_id = r.tenant_id AND subscription_id = v_sub AND stripe_subscription_id IS NULL;
  WHEN r.kind = 'subscription.update' THEN
    -- the plan and its limits stay where they were
    UPDATE billing.subscriptions SET pending_change = NULL, last_error = r.error, updated_at = now()
     WHERE tenant_id = r.tenant_id AND subscription_id = v_sub;
  WHEN r.kind = 'payment_intent.create' THEN
    UPDATE billing.payments
       SET status = 'failed', failure_code = coalesce(r.error ->> 'decline_code', r.error ->> 'code', r.error ->> 'category'),
           failure_message = r.error ->> 'message', updated_at = now()
     WHERE tenant_id = r.tenant_id AND payment_id = (r.subject ->> 'payment_id')::bigint;
  WHEN r.kind LIKE 'dispute.%' THEN
    PERFORM billing.dispute_apply_failure(r);
  WHEN r.kind IN ('billing_details.update', 'tax_id.create') THEN
    PERFORM billing.billing_details_failure(r);
  WHEN r.kind LIKE 'meter.%' THEN
    PERFORM billing.meter_apply_failure(r);    -- 94_meters.sql
  ELSE
    NULL;
  END CASE;
END
$$;
COMMENT ON FUNCTION billing.outbox_apply_failure(billing.stripe_requests) IS
  'Undo what a request''s caller started when the request fails for good (limits never change on a failure).';

-- An operator may send a failed request again.  A request whose outcome was
-- unknown keeps its Idempotency-Key (Stripe replays what it did); one that
-- Stripe refused (a card decline, an invalid request) gets a new key, since
-- Stripe would replay the stored refusal for 24 hours.  A request that may
-- have reached Stripe longer ago than Stripe keeps its key could act twice
-- if sent again (a second customer, subscription or charge): refused unless
-- the lookup found that Stripe never made its object, or the operator, who
-- checked in Stripe, says force; then it goes with a new key.  One whose
-- object the lookup found needs nothing.
CREATE FUNCTION billing.retry_request(p_request_id bigint, force boolean DEFAULT false) RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  r         billing.stripe_requests;
  v_force   boolean := coalesce(force, false);
  v_refused boolean;
  v_stale   boolean;
  v_new_key boolean;
  v_event   billing.meter_events;
BEGIN
  SELECT * INTO r FROM billing.stripe_requests WHERE request_id = p_request_id FOR UPDATE;
  -- parked by billing.outbox_claim (its failure could not be recorded):
  -- made due, so that the next claim fails it now that the cause is fixed
  IF FOUND AND r.state = 'pending' AND r.next_attempt_at = 'infinity' THEN
    UPDATE billing.stripe_requests SET next_attempt_at = now(), updated_at = now() WHERE request_id = p_request_id;
    PERFORM billing.audit('stripe.request_retried', r.tenant_id,
                          jsonb_build_object('request_id', p_request_id, 'parked', true));
    RETURN;
  END IF;
  IF NOT FOUND OR r.state <> 'failed' THEN
    RAISE EXCEPTION 'no failed outbox request %', p_request_id
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'List them with: SELECT request_id, kind, error FROM billing.stripe_requests WHERE state = ''failed''.';
  END IF;
  IF r.error -> 'resolved' ->> 'found' = 'true' THEN
    RAISE EXCEPTION 'outbox request % needs no retry: Stripe made its object (%)', p_request_id,
                    r.error -> 'resolved' ->> 'object'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = 'The lookup after its unknown outcome found the object and linked it (audited as stripe.request_resolved).';
  END IF;
  -- a request that failed because the one it waited for failed is not sent
  -- on its own (it would go without what it inherits, and its caller has
  -- undone what it started: the tenant starts again once the first is fixed)
  IF r.error ->> 'category' = 'dependency' THEN
    RAISE EXCEPTION 'outbox request % is not retried on its own: it failed because request % failed',
                    p_request_id, r.after_request
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = format('Retry request %s; what waited for it is started again by its caller (the tenant''s create_subscription).',
                          r.after_request);
  END IF;
  -- a definite refusal (Stripe did nothing; a 401 or 403 is not one: Stripe
  -- checks the API key before the Idempotency-Key, so an earlier attempt may
  -- have acted) gets a new key; any other outcome may have happened
  v_refused := r.error ->> 'category' IN ('card', 'invalid_request', 'not_found');
  v_stale := coalesce(r.method <> 'GET'
                      AND r.first_sent_at <= now() - current_setting('qes_billing.idempotency_window')::interval, false);
  IF NOT v_refused AND v_stale AND NOT v_force AND r.error -> 'resolved' ->> 'found' IS DISTINCT FROM 'false' THEN
    RAISE EXCEPTION 'outbox request % may have reached Stripe longer ago than Stripe keeps its Idempotency-Key (qes_billing.idempotency_window %)',
                    p_request_id, current_setting('qes_billing.idempotency_window')
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = format('Its %s may have happened in Stripe (the request''s first_sent_at says when it first went out); sent again now, it could happen twice: a second customer, subscription or charge.',
                            r.kind),
            HINT = format('Check in Stripe that it did not happen, then: SELECT billing.retry_request(%s, force => true).',
                          p_request_id);
  END IF;
  -- a meter event goes back to queued with its request (so that void_usage
  -- waits for the answer instead of cancelling it here, and the answer
  -- marks it delivered); one cancelled meanwhile is not sent again
  -- (the event by the request's subject: a re-send by reconciliation
  -- moves meter_events.request_id to a newer request)
  IF r.kind = 'meter.event' THEN
    SELECT * INTO v_event FROM billing.meter_events e
     WHERE e.tenant_id = r.tenant_id AND e.meter_event_id = (r.subject ->> 'meter_event_id')::bigint
       FOR UPDATE;
    IF NOT FOUND OR v_event.state <> 'failed' OR v_event.request_id <> p_request_id
       OR v_event.cancel_request_id IS NOT NULL
       OR (SELECT count(*) FROM billing.meter_event_usage x
            WHERE x.tenant_id = v_event.tenant_id AND x.meter_event_id = v_event.meter_event_id) <> v_event.usage_rows THEN
      RAISE EXCEPTION 'outbox request % sends meter event % as it no longer stands', p_request_id,
                      coalesce(v_event.meter_event_id::text, r.subject ->> 'meter_event_id')
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = format('The event is %s%s: sent again, this request would bill what it held when it was made.',
                              coalesce(v_event.state, 'gone'),
                              CASE WHEN v_event.request_id IS DISTINCT FROM p_request_id
                                   THEN format(', sent since by request %s', v_event.request_id)
                                   WHEN v_event.cancel_request_id IS NOT NULL THEN ', a row of it voided'
                                   ELSE '' END),
              HINT = 'Nothing to retry; reconciliation (billing.meter_reconcile) sends what Stripe lacks.';
    END IF;
    UPDATE billing.meter_events SET state = 'queued', last_error = NULL
     WHERE tenant_id = v_event.tenant_id AND meter_event_id = v_event.meter_event_id;
  ELSIF r.kind = 'meter.cancel' THEN
    -- a cancellation sent again: its answer is applied to the event again
    UPDATE billing.meter_events SET state = 'cancel_queued'
     WHERE cancel_request_id = p_request_id AND state IN ('failed', 'delivered');
  ELSIF r.kind = 'tax_exempt.update' AND EXISTS (
          SELECT 1 FROM billing.stripe_requests x
           WHERE x.tenant_id = r.tenant_id AND x.kind = 'tax_exempt.update' AND x.path = r.path
             AND x.request_id > p_request_id) THEN
    -- a newer decision about the customer's tax_exempt exists: sending this
    -- one again would make Stripe keep the older (91_tax.sql, tax_exempt_send)
    RAISE EXCEPTION 'outbox request % is a tax_exempt decision a newer one replaced', p_request_id
      USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = 'Sent again, it would go out after the newer decision and Stripe would keep this older one.',
            HINT = format('Look at the newer one: SELECT request_id, params, state FROM billing.stripe_requests WHERE kind = ''tax_exempt.update'' AND path = %L ORDER BY request_id.',
                          r.path);
  END IF;
  -- the same key while Stripe keeps its result; else a new one (first_sent_at starts again)
  v_new_key := v_refused OR v_stale;
  UPDATE billing.stripe_requests
     SET state = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now(),
         idempotency_key = CASE WHEN v_new_key THEN 'qes-' || gen_random_uuid() ELSE idempotency_key END,
         first_sent_at = CASE WHEN v_new_key THEN NULL ELSE first_sent_at END
   WHERE request_id = p_request_id;
  PERFORM billing.audit('stripe.request_retried', r.tenant_id,
                        jsonb_build_object('request_id', p_request_id, 'new_idempotency_key', v_new_key,
                                           'forced', v_force AND NOT v_refused AND v_stale));
END
$$;
COMMENT ON FUNCTION billing.retry_request(bigint, boolean) IS
  'Send a failed outbox request again: with its original Idempotency-Key unless Stripe definitely refused it (a card decline, an invalid request, not found: a new key, since Stripe would replay the refusal); one that failed because the request it waited for failed is not retried on its own. One that may have reached Stripe longer ago than Stripe keeps its key is refused unless the lookup found Stripe never made its object or force is given (the operator checked in Stripe), and then gets a new key; one whose object was found needs no retry. A request parked because its failure could not be recorded is made due (the next claim fails it). Audited.';

CREATE VIEW billing.outbox_metrics AS
SELECT (SELECT count(*) FROM billing.stripe_requests WHERE state IN ('pending', 'waiting')) AS pending,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'in_flight') AS in_flight,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'pending' AND attempts > 0) AS retrying,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'succeeded' AND updated_at > now() - interval '1 hour') AS succeeded_last_hour,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'failed' AND updated_at > now() - interval '1 hour') AS failed_last_hour,
       (SELECT count(*) FROM billing.stripe_requests WHERE state = 'failed' AND error ->> 'category' = 'card'
           AND updated_at > now() - interval '1 hour') AS card_declines_last_hour;
COMMENT ON VIEW billing.outbox_metrics IS
  'Stripe requests: queued, in flight, retrying, succeeded and failed in the last hour (card declines apart).';
