-- Stripe webhook intake: verify, store, acknowledge; the worker applies.

CREATE FUNCTION billing.verify_stripe_signature(payload text, header text, secrets text DEFAULT NULL,
                                                tolerance_s integer DEFAULT NULL, at timestamptz DEFAULT NULL)
  RETURNS text
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_verify_stripe_signature_fn';
COMMENT ON FUNCTION billing.verify_stripe_signature(text, text, text, integer, timestamptz) IS
  'Check a Stripe-Signature header against the raw body: ok, or no_header, no_secret, malformed, no_v1, mismatch, stale. Defaults: the configured webhook secret(s), qes_billing.webhook_tolerance, the real clock.';

-- Refused deliveries are counted in shared memory without a write or the
-- audit chain's lock (src/guard.c); the worker writes the counts here and
-- into the audit log about once a minute.
CREATE FUNCTION billing.flush_webhook_rejections() RETURNS bigint
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_flush_webhook_rejections';
COMMENT ON FUNCTION billing.flush_webhook_rejections() IS
  'Write the webhook refusals counted since the last flush: one webhook_rejections row and one audit row (webhook.rejected) per reason, with the number of deliveries. Returns the deliveries written. The worker runs it about once a minute.';

CREATE FUNCTION billing.webhook_rejections_pending(OUT reason text, OUT deliveries bigint)
  RETURNS SETOF record
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_webhook_rejections_pending';
COMMENT ON FUNCTION billing.webhook_rejections_pending() IS
  'Webhook refusals counted in shared memory and not yet written to billing.webhook_rejections, by reason.';

CREATE FUNCTION api.stripe_webhook(json) RETURNS json
  LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
  AS 'MODULE_PATHNAME', 'qes_stripe_webhook_fn';
COMMENT ON FUNCTION api.stripe_webhook(json) IS
  'Stripe webhook endpoint (POST /rpc/stripe_webhook, the raw event as the body). Verifies the Stripe-Signature header and the mode, stores a new event in the inbox for the worker and answers 200 at once; a repeated event id answers 200 and stores nothing. Refusals answer 400 with the reason (500 when no secret is configured) and are counted, then written and audited once a minute per reason.';

-- Inbound rate limiting (src/guard.c): PostgREST's db-pre-request function.
CREATE FUNCTION api.pre_request() RETURNS void
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_pre_request';
COMMENT ON FUNCTION api.pre_request() IS
  'PostgREST db-pre-request: token buckets per client address (last X-Forwarded-For entry; never for Stripe webhook deliveries), per tenant (JWT tenant_id) and per staff role; over the limit the request is answered 429 with Retry-After.';

CREATE FUNCTION billing.rate_limit_stats(OUT allowed bigint, OUT limited bigint, OUT overflowed bigint,
                                         OUT slots_used bigint, OUT slots integer)
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_rate_limit_stats';
COMMENT ON FUNCTION billing.rate_limit_stats() IS
  'Inbound rate limiting since start: requests allowed and limited (429), requests that shared an overflow bucket, buckets in use of those available.';
