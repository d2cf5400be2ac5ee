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

CREATE FUNCTION api.stripe_webhook(json) RETURNS json
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_header  text := nullif(current_setting('request.headers', true), '')::json ->> 'stripe-signature';
  v_reason  text;
  v_status  text := '400';
  v_event   jsonb;
  v_id      text;
  v_type    text;
  v_live    boolean := billing.stripe_mode() = 'live';
  v_created bigint;
  v_new     integer;
BEGIN
  -- the configured secret(s); without one, what --setup-webhook stored
  v_reason := billing.verify_stripe_signature($1::text, v_header,
                CASE WHEN billing.stripe_key_problem('webhook') IS NOT NULL THEN billing.stored_webhook_secrets() END);
  IF v_reason = 'ok' THEN
    v_reason := NULL;
    v_event := $1::jsonb;
    v_id := v_event ->> 'id';
    v_type := v_event ->> 'type';
    IF jsonb_typeof(v_event) <> 'object' OR v_id IS NULL OR v_id !~ '^evt_[A-Za-z0-9_]+$'
       OR v_type IS NULL OR jsonb_typeof(v_event -> 'created') IS DISTINCT FROM 'number'
       OR jsonb_typeof(v_event -> 'livemode') IS DISTINCT FROM 'boolean'
       OR jsonb_typeof(v_event -> 'data' -> 'object') IS DISTINCT FROM 'object' THEN
      v_reason := 'not_an_event';
    ELSIF (v_event ->> 'livemode')::boolean <> v_live THEN
      v_reason := 'wrong_mode';
    END IF;
  ELSIF v_reason = 'no_secret' THEN
    v_status := '500';   -- our configuration, not the sender: Stripe will retry
  END IF;

  IF v_reason IS NOT NULL THEN
    INSERT INTO billing.webhook_rejections (reason, stripe_event_id, event_type)
      VALUES (v_reason, left(v_id, 255), left(v_type, 255));
    PERFORM billing.audit('webhook.rejected', NULL,
                          jsonb_build_object('reason', v_reason, 'event_id', v_id, 'event_type', v_type));
    PERFORM set_config('response.status', v_status, true);
    RETURN json_build_object('error', CASE v_reason
      WHEN 'no_header'    THEN 'missing Stripe-Signature header'
      WHEN 'malformed'    THEN 'unparseable Stripe-Signature header'
      WHEN 'no_v1'        THEN 'no v1 signature in the Stripe-Signature header'
      WHEN 'mismatch'     THEN 'the signature does not match the payload'
      WHEN 'stale'        THEN 'the signature timestamp is outside the tolerance'
      WHEN 'no_secret'    THEN 'the webhook signing secret is not configured'
      WHEN 'not_an_event' THEN 'the payload is not a Stripe event'
      WHEN 'wrong_mode'   THEN CASE WHEN v_live THEN 'a test-mode event was sent to a live-mode endpoint'
                                    ELSE 'a live-mode event was sent to a test-mode endpoint' END
      END, 'reason', v_reason);
  END IF;

  v_created := (v_event ->> 'created')::bigint;
  INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, api_version, stripe_created, payload)
  VALUES (v_id, v_type, v_live, v_event ->> 'api_version', to_timestamp(v_created), $1)
  ON CONFLICT (stripe_event_id) DO NOTHING;
  GET DIAGNOSTICS v_new = ROW_COUNT;
  RETURN json_build_object('received', true, 'duplicate', v_new = 0, 'event_id', v_id);
END
$$;
COMMENT ON FUNCTION api.stripe_webhook(json) IS
  'Stripe webhook endpoint (POST /rpc/stripe_webhook, the raw event as the body). Verifies the Stripe-Signature header and the mode, stores a new event in the inbox for the worker and answers 200 at once; a repeated event id answers 200 and stores nothing. Refusals answer 400 with the reason, and are counted and audited.';
