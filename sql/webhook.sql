-- Stripe webhook intake: the signature verifier (src/webhook_signature.c)
-- and api.stripe_webhook.  Signatures below were computed with Python's
-- hmac; test/python/test_webhook_signature.py compares the verifier with
-- stripe-python on thousands of generated headers.
\set body '{"a":1}'
\set secret 'whsec_regress_secret'
\set at 'to_timestamp(1700000100)'
SELECT h AS header, billing.verify_stripe_signature(:'body', h, :'secret', 300, :at) AS result
  FROM unnest(ARRAY[
    't=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                          -- valid
    't=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e98529740',                    -- tampered signature
    't=1700000001,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                          -- other timestamp
    't=1700000000,v1=0000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                  -- any v1 may match
    't=1700000000,v0=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                          -- v0 only
    'v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                                       -- no timestamp
    't=abc,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                                 -- unparseable timestamp
    't=1700000000,v1',                              -- v1 without a value
    't= 1700000000 ,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                        -- whitespace around the number, as int() allows
    't=1_700_000_000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                       -- underscores, as int() allows
    't=1700000000,t=1,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                      -- the first t counts
    ' t=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d',                         -- a name with a space is not t
    't=1700000000,v1=5A1A49CFFB6075F8055459D60608F8C5B95AB1BA8F2FDBE7753B299E9852974D',                  -- hex is case-sensitive
    't=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d=',                         -- a value ends at the next =
    ''
  ]) h;
SELECT billing.verify_stripe_signature(:'body', NULL, :'secret', 300, :at) AS missing_header;
-- stale only when older than the tolerance; later than now passes, as Stripe's libraries do
SELECT billing.verify_stripe_signature(:'body', 't=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d', :'secret', 300, to_timestamp(1700000301)) AS too_old,
       billing.verify_stripe_signature(:'body', 't=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d', :'secret', 300, to_timestamp(1700000300)) AS just_in_time,
       billing.verify_stripe_signature(:'body', 't=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d', :'secret', 300, to_timestamp(1600000000)) AS from_the_future,
       billing.verify_stripe_signature(:'body', 't=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d', :'secret', 0, to_timestamp(1900000000)) AS no_tolerance;
-- a rotation: either secret verifies; Stripe sends one v1 per active secret
SELECT billing.verify_stripe_signature(:'body', 't=1700000000,v1=058b0a38ab926364ab1c61039ddbc3a8a0c81b7396723d81bbaf87566e5f2047', 'whsec_regress_secret,whsec_rotated_secret', 300, :at) AS rotated,
       billing.verify_stripe_signature(:'body', 't=1700000000,v1=058b0a38ab926364ab1c61039ddbc3a8a0c81b7396723d81bbaf87566e5f2047', :'secret', 300, :at) AS old_secret_only,
       billing.verify_stripe_signature(:'body', 't=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d,v1=058b0a38ab926364ab1c61039ddbc3a8a0c81b7396723d81bbaf87566e5f2047', 'whsec_rotated_secret', 300, :at) AS both_sent;
-- with no secret configured
SELECT billing.verify_stripe_signature(:'body', 't=1700000000,v1=5a1a49cffb6075f8055459d60608f8c5b95ab1ba8f2fdbe7753b299e9852974d') AS unconfigured;

-- POST /rpc/stripe_webhook, as PostgREST calls it (anonymous, raw body)
SET qes_billing.stripe_test_webhook_secret = 'whsec_regress_secret';
CREATE FUNCTION pg_temp.deliver(body text, signature text) RETURNS TABLE (status text, response json)
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('role', 'qes_anon', true),
          set_config('request.jwt.claims', '{"role":"qes_anon"}', true),
          set_config('request.headers', json_build_object('content-type', 'application/json',
                                                          'stripe-signature', signature)::text, true),
          set_config('response.status', '', true);
  response := api.stripe_webhook(body::json);
  status := coalesce(nullif(current_setting('response.status', true), ''), '200');
  RESET ROLE;
  RETURN NEXT;
END $$;
\set ev '{"id": "evt_regress_1", "object": "event", "type": "invoice.paid", "created": 1700000000, "livemode": false, "api_version": "2024-06-20", "data": {"object": {"id": "in_1", "object": "invoice"}}}'
\set live '{"id": "evt_regress_live", "object": "event", "type": "invoice.paid", "created": 1700000000, "livemode": true, "api_version": "2024-06-20", "data": {"object": {"id": "in_1", "object": "invoice"}}}'
\set notev '{"hello": "world"}'
BEGIN; SELECT * FROM pg_temp.deliver(:'ev', 't=4102444800,v1=6a6e54d6f23d7f165d97686ace348677845f2791af8170bc2e780d0b30923289'); COMMIT;
-- the same event again: 200, nothing new
BEGIN; SELECT * FROM pg_temp.deliver(:'ev', 't=4102444800,v1=6a6e54d6f23d7f165d97686ace348677845f2791af8170bc2e780d0b30923289'); COMMIT;
SELECT stripe_event_id, event_type, livemode, api_version, stripe_created = to_timestamp(1700000000) AS created,
       payload::text = :'ev' AS raw_body_kept FROM billing.webhook_events;
-- refusals: 400 with the reason, counted and audited, nothing stored.
-- The worker writes counted refusals (the first at once, then at most once a
-- minute) under the flush's advisory lock (QES_FLUSH_LOCK_KEY, src/guard.c).
-- This session holds that lock until the end of the refusals' part, so the
-- worker cannot write them first (its flush waits); the flushes below take
-- the same lock, which a session may take again.
SELECT pg_advisory_lock(x'7165735f72656a65'::bigint) IS NOT NULL AS worker_flush_held_off;
SELECT count(*) AS pending_before FROM billing.webhook_rejections_pending();
SELECT count(*) AS rows_before FROM billing.webhook_rejections;
BEGIN; SELECT * FROM pg_temp.deliver(:'ev', NULL); COMMIT;
BEGIN; SELECT * FROM pg_temp.deliver(:'ev', 't=4102444800,v1=6a6e54d6f23d7f165d97686ace348677845f2791af8170bc2e780d0b30923280'); COMMIT;
BEGIN; SELECT * FROM pg_temp.deliver(:'ev', 'garbage'); COMMIT;
BEGIN; SELECT * FROM pg_temp.deliver(:'ev', 't=1700000000,v1=6a6e54d6f23d7f165d97686ace348677845f2791af8170bc2e780d0b30923289'); COMMIT;
BEGIN; SELECT * FROM pg_temp.deliver(:'live', 't=4102444800,v1=b740b2c7c65f84ba76a14bca7a31f82d3ea77c78280211617021bebe99ebcd41'); COMMIT;
BEGIN; SELECT * FROM pg_temp.deliver(:'notev', 't=4102444800,v1=9f3e08c0a3bbf7b8b1182bf1530c3aa1bfceed90fa68df83202bb3b6e18d3a53'); COMMIT;
-- counted in shared memory per delivery: nothing written, no audit lock taken
SELECT count(*) AS rows_written FROM billing.webhook_rejections;
SELECT count(*) AS audit_rows_written FROM billing.audit_log WHERE action = 'webhook.rejected';
SELECT reason, deliveries FROM billing.webhook_rejections_pending() ORDER BY reason;
SELECT rejected_last_hour FROM billing.webhook_metrics;
-- the flush: one row and one audit row per reason, with the count; a second
-- flush finds nothing new
SELECT billing.flush_webhook_rejections() AS deliveries_flushed;
SELECT billing.flush_webhook_rejections() AS flushed_again;
SELECT count(*) AS still_pending FROM billing.webhook_rejections_pending();
SELECT reason, deliveries FROM billing.webhook_rejections ORDER BY reason;
SELECT details ->> 'reason' AS audited_reason, details ->> 'deliveries' AS deliveries
  FROM billing.audit_log WHERE action = 'webhook.rejected' ORDER BY details ->> 'reason';
SELECT rejected_last_hour FROM billing.webhook_metrics;
SELECT count(*) AS inbox FROM billing.webhook_events;
-- during a rotation both secrets are accepted
SET qes_billing.stripe_test_webhook_secret = 'whsec_regress_secret, whsec_rotated_secret';
BEGIN; SELECT status FROM pg_temp.deliver(:'ev', 't=4102444800,v1=0bf464e130ec281cb6339d9fc738b709bf4ec84fb9296c2efe30dbd45c62c41d'); COMMIT;
-- no secret configured: 500, so that Stripe retries once it is
RESET qes_billing.stripe_test_webhook_secret;
BEGIN; SELECT * FROM pg_temp.deliver(:'ev', 't=4102444800,v1=6a6e54d6f23d7f165d97686ace348677845f2791af8170bc2e780d0b30923289'); COMMIT;
-- only the anonymous role (and the owner) may call it
SELECT grantee FROM information_schema.routine_privileges
 WHERE routine_schema = 'api' AND routine_name = 'stripe_webhook' ORDER BY 1;

-- the event's top-level fields are read by a scanner (src/webhook_intake.c), not a full parse
SET qes_billing.stripe_test_webhook_secret = 'whsec_regress_secret';
-- a string with braces and quotes inside data.object is skipped correctly
BEGIN; SELECT status, response ->> 'reason' AS reason, response ->> 'event_id' AS event_id FROM pg_temp.deliver('{"id": "evt_scan_1", "type": "invoice.paid", "created": 1700000001, "livemode": false, "data": {"object": {"description": "a } \" ] { [", "nested": {"id": "evt_not_this"}}}}', 't=4102444800,v1=0ec1061a23b60ba2bfc59a0c05d2b177ad490c4ecdff409fffe617799f87ddf6'); COMMIT;
-- a repeated key counts with its last value, as in jsonb
BEGIN; SELECT status, response ->> 'reason' AS reason, response ->> 'event_id' AS event_id FROM pg_temp.deliver('{"id": "evt_scan_2", "type": "invoice.created", "type": "invoice.paid", "created": 1700000002, "livemode": false, "data": {"object": {}}}', 't=4102444800,v1=70f8339831f0a62afe26fe19acf69d228be2b9c6bed45790c6572e7cbaf559fe'); COMMIT;
-- created with a fraction
BEGIN; SELECT status, response ->> 'reason' AS reason, response ->> 'event_id' AS event_id FROM pg_temp.deliver('{"id": "evt_scan_3", "type": "invoice.paid", "created": 1700000003.5, "livemode": false, "data": {"object": {}}}', 't=4102444800,v1=a4772a3533cbb7e031d07baefd1d325e338c62c931bfc71f49e33b79c9fc6bad'); COMMIT;
-- livemode as a string
BEGIN; SELECT status, response ->> 'reason' AS reason, response ->> 'event_id' AS event_id FROM pg_temp.deliver('{"id": "evt_scan_4", "type": "invoice.paid", "created": 1700000004, "livemode": "false", "data": {"object": {}}}', 't=4102444800,v1=24dc148eeea3145009a5152a41326573cde9bf2e58277289b77959c00bbf55a9'); COMMIT;
-- data.object not an object
BEGIN; SELECT status, response ->> 'reason' AS reason, response ->> 'event_id' AS event_id FROM pg_temp.deliver('{"id": "evt_scan_5", "type": "invoice.paid", "created": 1700000005, "livemode": false, "data": {"object": []}}', 't=4102444800,v1=d6391d1e2b8f5be92ac6c8da5a04efba18b8ffb81e1de488286501125e5d4596'); COMMIT;
-- an id that is not an event id
BEGIN; SELECT status, response ->> 'reason' AS reason, response ->> 'event_id' AS event_id FROM pg_temp.deliver('{"id": "evt_scan-6", "type": "invoice.paid", "created": 1700000006, "livemode": false, "data": {"object": {}}}', 't=4102444800,v1=5c6444c5d18b1a7b30630f5959d57a9e7668d415253aa0720935e78ac4de6708'); COMMIT;
-- an escaped top-level key is refused (Stripe never escapes keys; jsonb would decode it)
BEGIN; SELECT status, response ->> 'reason' AS reason, response ->> 'event_id' AS event_id FROM pg_temp.deliver('{"\u0069d": "evt_scan_7", "type": "invoice.paid", "created": 1700000007, "livemode": false, "data": {"object": {}}}', 't=4102444800,v1=4f3d792da58af3fca2c70037e6803b5a3a9f21516344fe3fd7a994660f17551c'); COMMIT;
-- not an object at all
BEGIN; SELECT status, response ->> 'reason' AS reason, response ->> 'event_id' AS event_id FROM pg_temp.deliver('[{"id": "evt_scan_8"}]', 't=4102444800,v1=7bd153316227612a69db8990d3309690d15108ae307213dc56b97ebb03fdbbcd'); COMMIT;
-- no data
BEGIN; SELECT status, response ->> 'reason' AS reason, response ->> 'event_id' AS event_id FROM pg_temp.deliver('{"id": "evt_scan_9", "type": "invoice.paid", "created": 1700000009, "livemode": false}', 't=4102444800,v1=7a4c5b728ff77a1261390920635a91a868b6efce4237a74fac1db2586eb08d99'); COMMIT;
-- validly signed but implausible or unstorable: refused with its reason (pgcrypto signs them here)
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgcrypto;
RESET client_min_messages;
CREATE FUNCTION pg_temp.signed(body text) RETURNS text LANGUAGE sql
  RETURN 't=4102444800,v1=' || encode(hmac('4102444800.' || body, 'whsec_regress_secret', 'sha256'), 'hex');
CREATE FUNCTION pg_temp.try(body text) RETURNS TABLE (status text, reason text, event_id text) LANGUAGE sql
  RETURN (SELECT (d.status, d.response ->> 'reason', d.response ->> 'event_id') FROM pg_temp.deliver(body, pg_temp.signed(body)) d);
SELECT 'type 10 KB' AS "case", * FROM pg_temp.try('{"id": "evt_imp_1", "type": "' || repeat('x', 10000) || '.paid", "created": 1700000000, "livemode": false, "data": {"object": {}}}')
UNION ALL SELECT 'type with a space', * FROM pg_temp.try('{"id": "evt_imp_2", "type": "invoice paid", "created": 1700000000, "livemode": false, "data": {"object": {}}}')
UNION ALL SELECT 'type without a dot', * FROM pg_temp.try('{"id": "evt_imp_3", "type": "invoice", "created": 1700000000, "livemode": false, "data": {"object": {}}}')
UNION ALL SELECT 'created 0', * FROM pg_temp.try('{"id": "evt_imp_4", "type": "invoice.paid", "created": 0, "livemode": false, "data": {"object": {}}}')
UNION ALL SELECT 'created in 5138', * FROM pg_temp.try('{"id": "evt_imp_5", "type": "invoice.paid", "created": 99999999999, "livemode": false, "data": {"object": {}}}')
UNION ALL SELECT 'created negative', * FROM pg_temp.try('{"id": "evt_imp_6", "type": "invoice.paid", "created": -5, "livemode": false, "data": {"object": {}}}')
UNION ALL SELECT 'NUL escape', * FROM pg_temp.try('{"id": "evt_imp_7", "type": "invoice.paid", "created": 1700000000, "livemode": false, "data": {"object": {"d": "a\u0000b"}}}')
UNION ALL SELECT 'lone high surrogate', * FROM pg_temp.try('{"id": "evt_imp_8", "type": "invoice.paid", "created": 1700000000, "livemode": false, "data": {"object": {"d": "\ud800x"}}}')
UNION ALL SELECT 'lone low surrogate', * FROM pg_temp.try('{"id": "evt_imp_9", "type": "invoice.paid", "created": 1700000000, "livemode": false, "data": {"object": {"d": "\udc00"}}}')
UNION ALL SELECT 'surrogate pair (fine)', * FROM pg_temp.try('{"id": "evt_imp_10", "type": "invoice.paid", "created": 1700000000, "livemode": false, "data": {"object": {"d": "\ud83d\ude00"}}}')
UNION ALL SELECT 'escaped key in data (fine)', * FROM pg_temp.try('{"id": "evt_imp_11", "type": "invoice.paid", "created": 1700000000, "livemode": false, "data": {"object": {"\u0064": 1}}}')
UNION ALL SELECT 'api_version 100 chars', * FROM pg_temp.try('{"id": "evt_imp_12", "type": "invoice.paid", "created": 1700000000, "livemode": false, "api_version": "' || repeat('9', 100) || '", "data": {"object": {}}}')
UNION ALL SELECT 'api_version null (fine)', * FROM pg_temp.try('{"id": "evt_imp_13", "type": "invoice.paid", "created": 1700000000, "livemode": false, "api_version": null, "data": {"object": {}}}');
-- every stored payload casts to jsonb (the worker can apply it)
SELECT count(*) AS stored, count(payload::jsonb) AS castable FROM billing.webhook_events;
-- header values are read as the JSON they are: a quote or a tab in the header is not "no header"
BEGIN;
SELECT set_config('request.headers', json_build_object('stripe-signature',
         pg_temp.signed('{"id": "evt_hdr_1", "type": "invoice.paid", "created": 1700000000, "livemode": false, "data": {"object": {}}}')
         || ',note="a\b",x=' || chr(9))::text, true) IS NOT NULL AS h;
SELECT api.stripe_webhook('{"id": "evt_hdr_1", "type": "invoice.paid", "created": 1700000000, "livemode": false, "data": {"object": {}}}') ->> 'event_id' AS accepted;
COMMIT;
SELECT stripe_event_id, event_type, stripe_created FROM billing.webhook_events WHERE stripe_event_id LIKE 'evt_scan%' ORDER BY 1;
-- the tolerance edge, as stripe-python decides (t < now - tolerance, in fractions of a second)
SELECT billing.verify_stripe_signature('{}', 't=1700000000,v1=' || encode(hmac('1700000000.{}', 'whsec_edge', 'sha256'), 'hex'),
                                       'whsec_edge', 300, to_timestamp(1700000300)) AS at_edge,
       billing.verify_stripe_signature('{}', 't=1700000000,v1=' || encode(hmac('1700000000.{}', 'whsec_edge', 'sha256'), 'hex'),
                                       'whsec_edge', 300, to_timestamp(1700000300.001)) AS a_millisecond_past;
-- every refusal since the first flush, still pending (the worker was held off), then written
SELECT reason, deliveries FROM billing.webhook_rejections_pending() ORDER BY reason;
SELECT billing.flush_webhook_rejections() AS deliveries_flushed;
SELECT reason, sum(deliveries) AS deliveries FROM billing.webhook_rejections
 WHERE reason IN ('bad_type', 'bad_created', 'bad_encoding', 'escaped_key') GROUP BY reason ORDER BY reason;
SELECT pg_advisory_unlock(x'7165735f72656a65'::bigint) AS worker_flush_released;
DROP FUNCTION pg_temp.try(text), pg_temp.signed(text);
DROP EXTENSION pgcrypto;
RESET qes_billing.stripe_test_webhook_secret;
