-- Masking secrets before anything is stored or logged (docs/architecture.md, rule 13;
-- src/redact.c).  Secrets live only in the environment, superuser-only
-- settings and billing.stripe_secrets; Stripe's answers, the errors made of
-- them and audit details pass through these before they are written.

CREATE FUNCTION billing.redact_text(text) RETURNS text
  LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_redact_text_fn';
COMMENT ON FUNCTION billing.redact_text(text) IS
  'The text with every Stripe secret or restricted key (sk_/rk_ live or test), webhook signing secret (whsec_) and Authorization credential (Bearer ..., Basic ...; the scheme name stays) replaced by [redacted].';

CREATE FUNCTION billing.redact(jsonb) RETURNS jsonb
  LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'qes_redact_jsonb_fn';
COMMENT ON FUNCTION billing.redact(jsonb) IS
  'The document with the value of every "secret" and "authorization" key (at any depth, any case) replaced by [redacted] and every string (keys too) masked as billing.redact_text does. A client_secret is the tenant''s and stays.';
