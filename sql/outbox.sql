-- The outbox (sql/install/87_outbox.sql) and the subscription API
-- (92_subscriptions.sql), driven here by hand: this cluster has no Stripe
-- key, so the worker sends nothing and the test plays the worker with
-- billing.outbox_claim() and billing.outbox_record().  The HTTP side is
-- tested against stripe-mock and the stateful fake (test/python).

-- Stripe's form encoding
SELECT billing.stripe_form('{"customer":"cus_1","items":[{"price":"price_a","quantity":2}],"expand":["latest_invoice.payment_intent"],"metadata":{"tenant_id":"t 1&x=y"},"cancel_at_period_end":true,"description":null,"amount":1999}') AS form;
SELECT billing.stripe_form('{}') AS empty, billing.stripe_form('{"a":{"b":{"c":"ü"}},"list":[],"obj":{}}') AS nested_and_empty;
SELECT billing.stripe_form('[1,2]');

-- classification of unsuccessful answers
SELECT s AS http_status, sr AS should_retry, e AS transport_error,
       billing.outbox_classify(s, b::jsonb, sr, e) - 'message' AS classified
  FROM (VALUES (NULL::int, NULL::text, NULL::text, 'Timeout was reached'),
               (409, NULL, '{"error":{"type":"idempotency_error","message":"in use"}}', NULL),
               (429, NULL, '{"error":{"type":"rate_limit_error"}}', NULL),
               (500, NULL, '{"error":{"type":"api_error"}}', NULL),
               (503, 'false', '{}', NULL),
               (402, NULL, '{"error":{"type":"card_error","code":"card_declined","decline_code":"insufficient_funds","message":"Your card has insufficient funds."}}', NULL),
               (400, NULL, '{"error":{"type":"invalid_request_error","param":"items","message":"No such price"}}', NULL),
               (400, 'true', '{"error":{"type":"invalid_request_error","message":"Lock timeout"}}', NULL),
               (401, NULL, '{"error":{"type":"authentication_error"}}', NULL),
               (404, NULL, '{"error":{"type":"invalid_request_error","code":"resource_missing"}}', NULL)) v(s, sr, b, e);

-- backoff: doubles per attempt from retry_base_delay, with 50-100 % jitter, capped; Retry-After is a floor
SET qes_billing.retry_base_delay = '1s';
SET qes_billing.retry_max_delay = '10s';
SELECT n AS attempts,
       bool_and(d BETWEEN make_interval(secs => least(10, 2 ^ (n - 1)) / 2) AND make_interval(secs => least(10, 2 ^ (n - 1)))) AS in_range
  FROM generate_series(1, 6) n, LATERAL (SELECT billing.outbox_backoff(n) d FROM generate_series(1, 50)) x
 GROUP BY n ORDER BY n;
SELECT billing.outbox_backoff(1, '30') >= interval '30 s' AS retry_after_floor,
       billing.outbox_backoff(1, 'Wed, 21 Oct 2015 07:28:00 GMT') < interval '2 s' AS http_date_ignored;

-- a tenant and the catalog as setup leaves it
SELECT tenant_id FROM billing.upsert_tenant('acme', 'Acme', 'billing@acme.test');
SELECT tenant_id FROM billing.upsert_tenant('solo', 'Solo', 'billing@solo.test');

-- as PostgREST calls for the tenant: role and claims local to the transaction
CREATE FUNCTION as_tenant(t text) RETURNS void LANGUAGE sql AS $$
  SELECT set_config('role', 'qes_tenant', true), set_config('request.jwt.claims', json_build_object('role', 'qes_tenant', 'tenant_id', t)::text, true);
$$;
GRANT EXECUTE ON FUNCTION as_tenant(text) TO PUBLIC;

-- bad input: a clear error, nothing queued
BEGIN; SELECT as_tenant('acme'); SELECT api.create_subscription('platinum'); ROLLBACK;
BEGIN; SELECT as_tenant('acme'); SELECT api.create_subscription('professional', 'week'); ROLLBACK;
BEGIN; SELECT as_tenant('acme'); SELECT api.create_subscription('professional'); ROLLBACK;  -- not set up in Stripe yet
BEGIN; SELECT as_tenant('nobody'); SELECT api.create_subscription('free'); ROLLBACK;
BEGIN; SELECT set_config('role', 'qes_tenant', true); SELECT api.create_subscription('free'); ROLLBACK;
BEGIN; SELECT as_tenant('acme'); SELECT api.create_payment_intent(-5); ROLLBACK;
BEGIN; SELECT as_tenant('acme'); SELECT api.create_payment_intent(1000, 'xyz'); ROLLBACK;
BEGIN; SELECT as_tenant('acme'); SELECT api.create_payment_intent(1000, 'usd', 'no customer yet'); ROLLBACK;
BEGIN; SELECT as_tenant('acme'); SELECT api.update_subscription('enterprise'); ROLLBACK;
BEGIN; SELECT as_tenant('acme'); SELECT api.update_subscription(); ROLLBACK;
SELECT count(*) AS queued FROM billing.stripe_requests;
SELECT count(*) AS subscriptions FROM billing.subscriptions;

-- Free is local; twice is refused
BEGIN; SELECT as_tenant('solo'); SELECT api.create_subscription('free'); COMMIT;
BEGIN; SELECT as_tenant('solo'); SELECT api.create_subscription('free'); ROLLBACK;
BEGIN; SELECT as_tenant('solo'); SELECT plan, "interval", status, limits_plan, client_secret FROM api.subscription; COMMIT;

-- prices known to Stripe (what --setup-products records)
UPDATE billing.prices SET stripe_price_id = 'price_' || price_key WHERE unit_amount > 0;

-- Professional monthly: a customer first, then the subscription that waits for it
BEGIN; SELECT as_tenant('acme'); SELECT api.create_subscription('professional'); COMMIT;
SELECT request_id, kind, method, path, state, after_request, inherit, billing.stripe_form(params) AS form
  FROM billing.stripe_requests ORDER BY request_id;
BEGIN; SELECT as_tenant('acme'); SELECT api.create_subscription('enterprise', 'year'); ROLLBACK;  -- one at a time

-- the worker's part: claim (only what is due and not waiting), send, record
SELECT request_id, attempt, method, path FROM billing.outbox_claim(10);
SELECT billing.outbox_record(1, 1, 500, '{"error":{"type":"api_error","message":"boom"}}');
SELECT state, attempts, error ->> 'category' AS category, next_attempt_at > now() AS backs_off
  FROM billing.stripe_requests WHERE request_id = 1;
UPDATE billing.stripe_requests SET next_attempt_at = now() WHERE request_id = 1;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.outbox_record(1, 1, 200, '{"id":"cus_stale"}') AS stale_attempt;   -- not the current attempt: ignored
SELECT billing.outbox_record(1, 2, 200, '{"id":"cus_A1","object":"customer"}') AS recorded;
SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = 'acme';
-- the subscription request is released with the customer it waited for
SELECT request_id, state, params ->> 'customer' AS customer FROM billing.stripe_requests WHERE request_id = 2;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.outbox_record(2, 1, 200, $${"id":"sub_A1","object":"subscription","status":"incomplete","customer":"cus_A1",
  "cancel_at_period_end":false,"current_period_start":1767225600,"current_period_end":1769904000,
  "items":{"data":[{"id":"si_A1","price":{"id":"price_professional_monthly","lookup_key":"professional_monthly","recurring":{"interval":"month"}}}]},
  "latest_invoice":{"id":"in_A1","payment_intent":{"id":"pi_A1","client_secret":"pi_A1_secret_x"}}}$$);
BEGIN; SELECT as_tenant('acme'); SELECT plan, "interval", status, limits_plan, client_secret, stripe_subscription_id FROM api.subscription; COMMIT;
-- the payment succeeds: Stripe's webhook (or a later answer) says active
SELECT billing.outbox_enqueue('acme', 'subscription.refresh', 'GET', '/v1/subscriptions/sub_A1',
                              p_subject => '{"subscription_id": 2}') AS refresh_request;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.outbox_record(3, 1, 200, $${"id":"sub_A1","object":"subscription","status":"active","customer":"cus_A1",
  "cancel_at_period_end":false,"current_period_start":1767225600,"current_period_end":1769904000,
  "items":{"data":[{"id":"si_A1","price":{"id":"price_professional_monthly","lookup_key":"professional_monthly","recurring":{"interval":"month"}}}]}}$$);
BEGIN; SELECT as_tenant('acme'); SELECT plan, status, limits_plan, client_secret, pending_change FROM api.subscription; COMMIT;

-- an upgrade whose payment is declined: the plan and its limits stay
BEGIN; SELECT as_tenant('acme'); SELECT api.update_subscription('enterprise'); COMMIT;
BEGIN; SELECT as_tenant('acme'); SELECT api.update_subscription('enterprise'); ROLLBACK;   -- one change at a time
SELECT request_id, path, billing.stripe_form(params) AS form FROM billing.stripe_requests WHERE request_id = 4;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.outbox_record(4, 1, 402, '{"error":{"type":"card_error","code":"card_declined","decline_code":"generic_decline","message":"Your card was declined."}}');
BEGIN; SELECT as_tenant('acme'); SELECT plan, status, limits_plan, pending_change, last_error, decline_code FROM api.subscription; COMMIT;
SELECT plan_id FROM billing.check_limit('acme', 'signatures', 1);

-- cancel at period end
BEGIN; SELECT as_tenant('acme'); SELECT api.update_subscription(cancel_at_period_end => true); COMMIT;
SELECT billing.stripe_form(params) AS form FROM billing.stripe_requests WHERE request_id = 5;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.outbox_record(5, 1, 200, $${"id":"sub_A1","object":"subscription","status":"active","customer":"cus_A1",
  "cancel_at_period_end":true,"current_period_start":1767225600,"current_period_end":1769904000,
  "items":{"data":[{"id":"si_A1","price":{"id":"price_professional_monthly","lookup_key":"professional_monthly","recurring":{"interval":"month"}}}]}}$$);
BEGIN; SELECT as_tenant('acme'); SELECT plan, status, cancel_at_period_end, pending_change FROM api.subscription; COMMIT;

-- a one-time payment, now that the tenant has a customer
BEGIN; SELECT as_tenant('acme'); SELECT api.create_payment_intent(4900, 'EUR', 'Qualified timestamp pack'); COMMIT;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.stripe_form(params) AS form FROM billing.stripe_requests WHERE request_id = 6;
SELECT billing.outbox_record(6, 1, NULL, NULL, NULL, NULL, 'Failed to connect to api.stripe.com port 443');
SELECT state, error ->> 'category' AS category, error ->> 'message' AS message FROM billing.stripe_requests WHERE request_id = 6;
UPDATE billing.stripe_requests SET next_attempt_at = now() WHERE request_id = 6;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.outbox_record(6, 2, 200, '{"id":"pi_B1","object":"payment_intent","status":"requires_payment_method","client_secret":"pi_B1_secret_y","amount":4900,"currency":"eur"}');
BEGIN; SELECT as_tenant('acme'); SELECT payment_id, amount, currency, status, client_secret, payment_intent_id FROM api.payments; COMMIT;

-- an answer we cannot apply is asked again (same key), not lost
BEGIN; SELECT as_tenant('acme'); SELECT api.create_payment_intent(700); COMMIT;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.outbox_record(7, 1, 200, '{"id":"not_a_payment_intent"}');
SELECT state, error ->> 'category' AS category FROM billing.stripe_requests WHERE request_id = 7;

-- Stripe-Should-Retry: false makes a 503 final; retries end after max_attempts
SET qes_billing.max_attempts = 2;
UPDATE billing.stripe_requests SET next_attempt_at = now() WHERE request_id = 7;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.outbox_record(7, 2, 503, '{}', 'false');
SELECT state, error ->> 'category' AS category, error ->> 'attempts' AS attempts FROM billing.stripe_requests WHERE request_id = 7;
BEGIN; SELECT as_tenant('acme'); SELECT payment_id, status, failure_code FROM api.payments ORDER BY payment_id; COMMIT;
RESET qes_billing.max_attempts;

-- a failed customer fails what waited for it
SELECT tenant_id FROM billing.upsert_tenant('beta', 'Beta', 'billing@beta.test');
BEGIN; SELECT as_tenant('beta'); SELECT api.create_subscription('enterprise', 'year'); COMMIT;
SELECT request_id, attempt FROM billing.outbox_claim(10);
SELECT billing.outbox_record(8, 1, 400, '{"error":{"type":"invalid_request_error","message":"Invalid email address"}}');
SELECT request_id, kind, state, error ->> 'category' AS category, error ->> 'message' AS message
  FROM billing.stripe_requests WHERE tenant_id = 'beta' ORDER BY request_id;
BEGIN; SELECT as_tenant('beta'); SELECT plan, status, limits_plan, last_error FROM api.subscription; COMMIT;
-- and the tenant may try again
BEGIN; SELECT as_tenant('beta'); SELECT api.create_subscription('enterprise', 'year'); COMMIT;

-- the subscription that waited for the failed customer is not retried on
-- its own (it would go without its customer; the tenant starts again)
SELECT billing.retry_request(9);
-- an operator sends a failed request again (same Idempotency-Key)
SELECT idempotency_key = (SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = 8) AS same_key
  FROM billing.stripe_requests WHERE request_id = 8;
SELECT billing.retry_request(8);
SELECT state, attempts FROM billing.stripe_requests WHERE request_id = 8;
SELECT billing.retry_request(8);

-- crash reconciliation: in flight → pending, key kept
SELECT request_id, attempt FROM billing.outbox_claim(1);
SELECT billing.worker_reclaim() > 0 AS reclaimed;
SELECT request_id, state, attempts FROM billing.stripe_requests WHERE request_id = 10;

-- ... but only while Stripe keeps the key's result: a request that may have
-- reached Stripe (first_sent_at: the reclaim above set it) longer ago than
-- qes_billing.idempotency_window is not sent again blind; it fails as
-- expired, and a customer is looked up
SELECT first_sent_at IS NOT NULL AS may_have_reached_stripe FROM billing.stripe_requests WHERE request_id = 10;
UPDATE billing.stripe_requests SET first_sent_at = now() - interval '23 hours 1 minute' WHERE request_id = 10;
-- a request never sent goes out whatever its age, and so does a GET
SELECT billing.outbox_enqueue('beta', 'payment_intent.create', 'POST', '/v1/payment_intents',
                              '{"amount": 100, "currency": "eur"}') AS never_sent;
SELECT billing.outbox_enqueue('beta', 'subscription.refresh', 'GET', '/v1/subscriptions/sub_X') AS a_get;
UPDATE billing.stripe_requests SET created_at = now() - interval '2 days', first_sent_at = now() - interval '2 days',
                                   attempts = 3
 WHERE request_id = (SELECT max(request_id) FROM billing.stripe_requests);
UPDATE billing.stripe_requests SET created_at = now() - interval '2 days'
 WHERE request_id = (SELECT max(request_id) - 1 FROM billing.stripe_requests);
SELECT request_id, attempt, method FROM billing.outbox_claim(10) ORDER BY request_id;
SELECT request_id, kind, state, attempts, error ->> 'category' AS category, error ->> 'retryable' AS retryable,
       error ->> 'attempts' AS error_attempts, error ->> 'message' ~ '^not sent again' AS says_why
  FROM billing.stripe_requests WHERE request_id = 10;
SELECT request_id AS lookup, kind, method, subject ->> 'request_id' AS resolves FROM billing.stripe_requests
 WHERE kind LIKE 'resolve.%' AND (subject ->> 'request_id')::bigint = 10;
SELECT details -> 'error' ->> 'category' AS audited FROM billing.audit_log
 WHERE action = 'stripe.request_failed' AND (details ->> 'request_id')::bigint = 10;
-- an operator's retry would be as blind: refused while the lookup runs ...
SELECT billing.retry_request(10);
-- ... and once the lookup (claimed above) found the customer, nothing is left to retry
SELECT billing.outbox_record(r.request_id, 1, 200,
         '{"object":"list","data":[{"id":"cus_B7","object":"customer","email":"billing@beta.test","metadata":{"tenant_id":"beta"},"created":1767225600}]}')
  FROM billing.stripe_requests r WHERE r.kind = 'resolve.customer.list';
SELECT stripe_customer_id, (SELECT error -> 'resolved' FROM billing.stripe_requests WHERE request_id = 10) AS resolved
  FROM billing.tenants WHERE tenant_id = 'beta';
SELECT billing.retry_request(10);
-- the never-sent payment intent fails on a connection refused: it did not
-- reach Stripe, its key's time has not started
SELECT billing.outbox_record(12, 1, NULL, NULL, NULL, NULL, 'not sent: Couldn''t connect to server: Connection refused');
SELECT state, attempts, first_sent_at IS NULL AS never_reached_stripe FROM billing.stripe_requests WHERE request_id = 12;
-- an expired request Stripe may have acted on is retried only when forced
UPDATE billing.stripe_requests SET state = 'failed', first_sent_at = now() - interval '2 days',
                                   error = '{"category": "expired"}' WHERE request_id = 12;
SELECT billing.retry_request(12);
SELECT billing.retry_request(12, force => true);
SELECT state, attempts, first_sent_at IS NULL AS new_key_not_sent, idempotency_key <> 'x' AS has_key
  FROM billing.stripe_requests WHERE request_id = 12;
SELECT details FROM billing.audit_log WHERE action = 'stripe.request_retried' ORDER BY audit_id DESC LIMIT 1;
-- a 401 after an attempt that may have acted proves nothing (Stripe checks
-- the API key before the Idempotency-Key): refused too, and force => NULL is not force
UPDATE billing.stripe_requests SET state = 'failed', first_sent_at = now() - interval '2 days',
                                   error = '{"category": "authentication"}' WHERE request_id = 12;
SELECT billing.retry_request(12, force => NULL);
-- a failure whose undoing raises does not hold up the claim: the request is
-- parked (pending, never due) and said so; made due again once the cause is
-- fixed, the next claim fails it
BEGIN; SELECT as_tenant('acme'); SELECT api.create_payment_intent(300) ->> 'status' AS status; COMMIT;
UPDATE billing.stripe_requests SET attempts = 1, first_sent_at = now() - interval '2 days'
 WHERE request_id = (SELECT max(request_id) FROM billing.stripe_requests WHERE kind = 'payment_intent.create');
CREATE FUNCTION public.payments_frozen() RETURNS trigger LANGUAGE plpgsql
AS $$ BEGIN RAISE EXCEPTION 'billing.payments is frozen for an audit'; END $$;
CREATE TRIGGER payments_frozen BEFORE UPDATE ON billing.payments FOR EACH ROW EXECUTE FUNCTION public.payments_frozen();
SET client_min_messages = error;
SELECT count(*) AS sent FROM billing.outbox_claim(10);
RESET client_min_messages;
SELECT state, next_attempt_at = 'infinity' AS never_due, error ->> 'category' AS category, error ->> 'parked' AS parked
  FROM billing.stripe_requests WHERE request_id = (SELECT max(request_id) FROM billing.stripe_requests WHERE kind = 'payment_intent.create');
SELECT details ->> 'parked' AS parked, details ->> 'kind' AS kind, details ->> 'to_do' ~ 'retry_request' AS says_what_to_do
  FROM billing.audit_log WHERE action = 'stripe.request_failed' AND details ? 'parked';
SELECT billing.outbox_next_due() IS NULL OR billing.outbox_next_due() < 1e9 AS not_waited_for;
DROP TRIGGER payments_frozen ON billing.payments;
DROP FUNCTION public.payments_frozen();
SELECT billing.retry_request(max(request_id)) FROM billing.stripe_requests WHERE kind = 'payment_intent.create';
SELECT count(*) AS sent FROM billing.outbox_claim(10);
SELECT state, error ->> 'category' AS category FROM billing.stripe_requests
 WHERE request_id = (SELECT max(request_id) FROM billing.stripe_requests WHERE kind = 'payment_intent.create');
BEGIN; SELECT as_tenant('acme'); SELECT status, failure_code FROM api.payments WHERE amount = 300; COMMIT;

-- every step above is in the audit trail
SELECT action, tenant_id FROM billing.audit_log
 WHERE action ~ '^(subscription|customer|payment_intent|stripe)\.' ORDER BY audit_id;
SELECT * FROM billing.outbox_metrics;

-- After a start that was not clean (a crash, a restored backup, a
-- promotion) commits after the last checkpoint (p_lost_after) may be
-- missing: a request whose claim was lost may have gone out while its row
-- looks never sent.  The reclaim dates every pending or waiting request
-- other than a GET, created before the start (p_started), as possibly
-- sent since then (or since its creation, if later); a GET, one created
-- after the start and one already dated keep theirs.
SELECT now() - interval '1 day' AS lost_after \gset
SELECT billing.outbox_enqueue(NULL, 'test.lost_claim', 'POST', '/v1/customers', '{"name": "due"}') AS due_post \gset
SELECT billing.outbox_enqueue(NULL, 'test.lost_claim', 'GET', '/v1/customers/cus_X') AS due_get \gset
SELECT billing.outbox_enqueue(NULL, 'test.lost_claim', 'POST', '/v1/customers', '{"name": "later"}') AS later_post \gset
SELECT billing.outbox_enqueue(NULL, 'test.lost_claim', 'POST', '/v1/customers', '{"name": "dated"}') AS dated_post \gset
SELECT billing.outbox_enqueue(NULL, 'test.lost_claim', 'POST', '/v1/customers', '{"name": "waiting"}', '{}',
                              :later_post) AS waiting_post \gset
SELECT billing.outbox_enqueue(NULL, 'test.lost_claim', 'POST', '/v1/customers', '{"name": "after start"}') AS after_post \gset
UPDATE billing.stripe_requests SET created_at = now() - interval '3 days', next_attempt_at = now() - interval '2 days'
 WHERE request_id IN (:due_post, :due_get);
UPDATE billing.stripe_requests SET next_attempt_at = now() + interval '1 hour' WHERE request_id = :later_post;
UPDATE billing.stripe_requests SET first_sent_at = now() - interval '1 hour' WHERE request_id = :dated_post;
UPDATE billing.stripe_requests SET created_at = now() + interval '1 hour' WHERE request_id = :after_post;
-- a clean start dates nothing
SELECT billing.worker_reclaim() AS reclaimed;
SELECT count(*) AS dated FROM billing.stripe_requests WHERE kind = 'test.lost_claim' AND first_sent_at IS NOT NULL;
-- (in a session with synchronous_commit off: the dating commits durably all the same)
BEGIN;
SET LOCAL synchronous_commit = off;
SELECT billing.worker_reclaim(:'lost_after', now() + interval '1 minute') AS reclaimed;
SHOW synchronous_commit;
COMMIT;
SELECT params ->> 'name' AS name, method, state, first_sent_at = :'lost_after' AS from_lost_after,
       first_sent_at = created_at AS from_creation,
       first_sent_at > now() - interval '2 hours' AND first_sent_at <> created_at AS kept_its_own,
       first_sent_at IS NULL AS undated
  FROM billing.stripe_requests WHERE kind = 'test.lost_claim' ORDER BY request_id;
SELECT details - 'lost_after' AS details, (details ->> 'lost_after')::timestamptz = :'lost_after' AS lost_after
  FROM billing.audit_log WHERE action = 'worker.reclaimed' ORDER BY audit_id DESC LIMIT 1;
-- past the window it is not sent blind: the claim fails it as expired
SELECT r.method, r.params ->> 'name' AS name FROM billing.outbox_claim(10) c JOIN billing.stripe_requests r USING (request_id)
 WHERE r.kind = 'test.lost_claim' ORDER BY r.request_id;
SELECT params ->> 'name' AS name, state, error ->> 'category' AS category
  FROM billing.stripe_requests WHERE kind = 'test.lost_claim' ORDER BY request_id;

-- Data from another cluster (a pg_dump restored here, or pg_upgrade):
-- billing.cluster_identity holds another system identifier beside this
-- cluster's (CREATE EXTENSION wrote this one, the dump brought the other),
-- and every queued request other than a GET is dated from its creation,
-- whatever the start was (that cluster may have sent it after the dump).
SELECT count(*) AS identities, bool_and(system_identifier = (SELECT c.system_identifier FROM pg_control_system() c)) AS this_cluster
  FROM billing.cluster_identity;
SELECT billing.outbox_enqueue(NULL, 'test.restored', 'POST', '/v1/customers', '{"name": "restored"}') AS restored_post \gset
SELECT billing.outbox_enqueue(NULL, 'test.restored', 'GET', '/v1/customers/cus_R') AS restored_get \gset
UPDATE billing.stripe_requests SET created_at = now() - interval '2 days' WHERE kind = 'test.restored';
INSERT INTO billing.cluster_identity (system_identifier) VALUES (42);
SELECT billing.worker_reclaim() AS reclaimed;
SELECT method, first_sent_at = created_at AS dated_from_creation, first_sent_at IS NULL AS undated
  FROM billing.stripe_requests WHERE kind = 'test.restored' ORDER BY request_id;
SELECT details ->> 'other_cluster' AS other_cluster, details -> 'previous_system_identifiers' AS previous,
       details ->> 'possibly_sent' AS possibly_sent, details ? 'unclean_start' AS unclean_start,
       details ->> 'system_identifier' = (SELECT c.system_identifier::text FROM pg_control_system() c) AS now_this
  FROM billing.audit_log WHERE action = 'worker.reclaimed' ORDER BY audit_id DESC LIMIT 1;
SELECT count(*) AS identities, bool_and(system_identifier = (SELECT c.system_identifier FROM pg_control_system() c)) AS this_cluster
  FROM billing.cluster_identity;
-- the next start in this cluster knows it: a clean one dates nothing, audits nothing
UPDATE billing.stripe_requests SET first_sent_at = NULL WHERE kind = 'test.restored';
SELECT billing.worker_reclaim() AS reclaimed;
SELECT count(*) AS undated FROM billing.stripe_requests WHERE kind = 'test.restored' AND first_sent_at IS NULL;
-- no identity at all (an update from 0.1, whose data may come from a dump):
-- of unknown origin, dated the same way
DELETE FROM billing.cluster_identity;
SELECT billing.worker_reclaim() AS reclaimed;
SELECT method, first_sent_at = created_at AS dated_from_creation
  FROM billing.stripe_requests WHERE kind = 'test.restored' ORDER BY request_id;
SELECT details -> 'previous_system_identifiers' AS previous FROM billing.audit_log
 WHERE action = 'worker.reclaimed' ORDER BY audit_id DESC LIMIT 1;
SELECT count(*) AS identities FROM billing.cluster_identity;
SELECT count(*) AS reclaim_audits FROM billing.audit_log WHERE action = 'worker.reclaimed' AND details ? 'other_cluster';
DELETE FROM billing.stripe_requests WHERE kind = 'test.restored';
