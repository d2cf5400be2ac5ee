-- Stripe webhook intake: verify, store, acknowledge; the worker applies.

CREATE FUNCTION billing.verify_stripe_signature(payload text, header text, secrets text DEFAULT NULL,
                                                tolerance_s integer DEFAULT NULL, at timestamptz DEFAULT NULL)
  RETURNS text
  LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'qes_verify_stripe_signature_fn';
COMMENT ON FUNCTION billing.verify_stripe_signature(text, text, text, integer, timestamptz) IS
  'Check a Stripe-Signature header against the raw body: ok, or no_header, no_secret, malformed, no_v1, mismatch, stale. Defaults: the configured webhook secret(s), qes_billing.webhook_tolerance, the real clock.';

CREATE TABLE billing.webhook_rejections (
  rejection_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  rejected_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
  reason          text NOT NULL,
  stripe_event_id text,
  event_type      text
);
COMMENT ON TABLE billing.webhook_rejections IS
  'Webhook deliveries refused at intake (bad or missing signature, stale, wrong mode, not an event): an attack or a wrong secret shows here.';
CREATE INDEX webhook_rejections_recent ON billing.webhook_rejections (rejected_at);

-- A refused delivery: counted, audited, answered with its HTTP status and
-- reason (called by api.stripe_webhook, src/webhook_intake.c).
CREATE FUNCTION billing.webhook_reject(p_reason text, p_event_id text, p_event_type text) RETURNS json
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
BEGIN
  INSERT INTO billing.webhook_rejections (reason, stripe_event_id, event_type)
    VALUES (p_reason, left(p_event_id, 255), left(p_event_type, 255));
  PERFORM billing.audit('webhook.rejected', NULL,
                        jsonb_build_object('reason', p_reason, 'event_id', p_event_id, 'event_type', p_event_type));
  -- no secret is our configuration, not the sender: 500, so that Stripe retries
  PERFORM set_config('response.status', CASE WHEN p_reason = 'no_secret' THEN '500' ELSE '400' END, true);
  RETURN json_build_object('error', CASE p_reason
    WHEN 'no_header'    THEN 'missing Stripe-Signature header'
    WHEN 'malformed'    THEN 'unparseable Stripe-Signature header'
    WHEN 'no_v1'        THEN 'no v1 signature in the Stripe-Signature header'
    WHEN 'mismatch'     THEN 'the signature does not match the payload'
    WHEN 'stale'        THEN 'the signature timestamp is outside the tolerance'
    WHEN 'no_secret'    THEN 'the webhook signing secret is not configured'
    WHEN 'not_an_event' THEN 'the payload is not a Stripe event'
    WHEN 'wrong_mode'   THEN CASE WHEN billing.stripe_mode() = 'live' THEN 'a test-mode event was sent to a live-mode endpoint'
                              ELSE 'a live-mode event was sent to a test-mode endpoint' END
    END, 'reason', p_reason);
END
$$;
COMMENT ON FUNCTION billing.webhook_reject(text, text, text) IS
  'Record and audit a refused webhook delivery; sets response.status (400, or 500 when no secret is configured) and returns the error body.';

CREATE FUNCTION api.stripe_webhook(json) RETURNS json
  LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
  AS 'MODULE_PATHNAME', 'qes_stripe_webhook_fn';
COMMENT ON FUNCTION api.stripe_webhook(json) IS
  'Stripe webhook endpoint (POST /rpc/stripe_webhook, the raw event as the body). Verifies the Stripe-Signature header and the mode, stores a new event in the inbox for the worker and answers 200 at once; a repeated event id answers 200 and stores nothing. Refusals answer 400 with the reason, and are counted and audited.';
