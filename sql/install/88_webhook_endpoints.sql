-- Several webhook endpoints (a primary and a backup, e.g. a second
-- PostgREST in another zone): each endpoint's signing secret is kept in
-- billing.stripe_secrets under its Stripe id, and a delivery is accepted when
-- it is signed with any of them (billing.stored_webhook_secrets).  Stripe
-- sends every event to every endpoint; the inbox keeps one row per event id
-- whichever endpoint delivered it first.  Rotating one endpoint's secret
-- replaces that endpoint's row only.

CREATE VIEW billing.webhook_endpoints AS
SELECT s.mode, s.endpoint, s.url, s.created_at AS secret_since,
       s.url IS NOT DISTINCT FROM billing.webhook_endpoint_url() AS is_primary
  FROM billing.stripe_secrets s
 WHERE s.kind = 'webhook';
COMMENT ON VIEW billing.webhook_endpoints IS
  'The webhook endpoints whose signing secrets are kept (never the secret): mode, Stripe id, URL, since when the secret is in use, and whether it is the primary (QES_BASE_URL''s).';

-- An endpoint's secret was rolled (Stripe's Dashboard shows the new one;
-- while the old one has not expired Stripe signs with both, so the new one
-- alone verifies every delivery).  Superusers only, like the table.
CREATE FUNCTION billing.set_webhook_secret(p_endpoint text, p_secret text) RETURNS void
  LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_mode text := billing.stripe_mode();
BEGIN
  IF p_secret IS NULL OR p_secret !~ '^whsec_[A-Za-z0-9]{8,}$' THEN
    RAISE EXCEPTION 'not a webhook signing secret'
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A signing secret starts with whsec_ (Stripe''s Dashboard, the endpoint''s "Signing secret").';
  END IF;
  UPDATE billing.stripe_secrets SET secret = p_secret, created_at = now()
   WHERE mode = v_mode AND kind = 'webhook' AND endpoint = p_endpoint;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no webhook endpoint % is kept in % mode', coalesce(p_endpoint, 'NULL'), v_mode
      USING ERRCODE = 'no_data_found',
            HINT = 'List them with SELECT * FROM billing.webhook_endpoints; qes_billing_setup --setup-webhook or --setup-backup-webhook URL makes one.';
  END IF;
  PERFORM billing.audit('webhook.secret_rotated', NULL, jsonb_build_object('endpoint', p_endpoint, 'mode', v_mode));
END
$$;
COMMENT ON FUNCTION billing.set_webhook_secret(text, text) IS
  'Replace one webhook endpoint''s signing secret (after rolling it in Stripe); the other endpoints'' secrets stay. Audited without the secret. Superusers only.';
