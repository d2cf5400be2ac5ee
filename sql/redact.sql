-- Redaction (docs/architecture.md, rule 13): what is masked before anything is stored or logged.

-- keys and secrets, at the start of a word; the scheme name of a credential stays
SELECT billing.redact_text(t) FROM (VALUES
  ('Authorization: Bearer sk_test_51HabcDEF123'),
  ('key=sk_live_51Habc, restricted=rk_test_51Hr_x-y and rk_live_Z9'),
  ('secret "whsec_abc+/=123" rotated'),
  ('authorization: bearer eyJhbGciOi.payload.sig;'),
  ('Authorization: Basic c2tfdGVzdF81MUhhYmM6'),
  ('the Basic plan, a Bearer bond, Bearer abc'),
  ('task_test_1 and mask_live_2 and sk_test_ alone and pk_test_51Hpublishable'),
  ('Bearer [redacted] and sk_test_[redacted]'),
  ('ümlaut sk_test_x ümlaut')) v(t);

-- the value given to a setting that holds a secret, found by the setting's
-- name (any case, quoted or not) whatever the value looks like: to the end of
-- the statement after "=" or TO, the argument after the name in set_config;
-- reading, resetting and other settings stay
SELECT billing.redact_text(t) FROM (VALUES
  ('ALTER SYSTEM SET qes_billing.smtp_password = ''Plain-Password-1'''),
  ('SET qes_billing.notify_webhook_secret TO $x$plain;secret$x$; SELECT 1'),
  ('SET "qes_billing"."smtp_password" = E''it\''s; still the value'''),
  ('SET "qes_billing.smtp_password" = plainword -- why; it is'),
  ('SELECT set_config(''QES_BILLING.SMTP_PASSWORD'', ''a'' || lower(''B,c''), false), now()'),
  ('SELECT set_config(''qes_billing.notify_webhook_secret'', $1, false)'),
  ('ALTER SYSTEM SET qes_billing.stripe_live_secret_key = ''not-in-a-key-form'''),
  ('ALTER ROLE ops SET qes_billing.smtp_password = ''refused-but-shown'''),
  ('ALTER SYSTEM RESET qes_billing.smtp_password'),
  ('SHOW qes_billing.smtp_password'),
  ('SELECT current_setting(''qes_billing.smtp_password'')'),
  ('SET qes_billing.smtp_username = ''ops'''),
  ('SET qes_billing.smtp_password_old = ''another setting'''),
  ('SET qes_billing.smtp_password = [redacted]')) v(t);

-- JSON: "secret" and "authorization" at any depth, any case; strings (keys too)
-- masked; a client_secret stays; a null secret stays null
SELECT billing.redact('{"id": "we_1", "secret": "whsec_abc", "url": "https://x.example"}');
SELECT billing.redact('{"a": [{"Secret": {"nested": ["x"]}}, {"AUTHORIZATION": "Bearer sk_test_1"}], "secret": null}');
SELECT billing.redact('{"client_secret": "pi_1_secret_abc", "error": {"message": "echo: Bearer sk_live_9 and whsec_1"}}');
SELECT billing.redact('{"sk_test_key": 1, "list": ["rk_live_z", 2, true, null]}');
SELECT billing.redact('"Bearer sk_test_scalar"'), billing.redact('42'), billing.redact('[]');
-- nothing to mask: the same document back; masking is idempotent
SELECT billing.redact(j) = j AS unchanged FROM (VALUES ('{"id": "cus_1", "client_secret": "x"}'::jsonb)) v(j);
SELECT billing.redact(billing.redact(j)) = billing.redact(j) AS idempotent
  FROM (VALUES ('{"secret": "whsec_1", "m": "Bearer sk_test_1", "o": {"secret": [1]}}'::jsonb)) v(j);

-- audit details are masked before they are chained
SELECT billing.audit('setup.redaction_checked', NULL, '{"secret": "whsec_audit", "note": "Bearer sk_test_audit"}') > 0 AS written;
SELECT details FROM billing.audit_log WHERE action = 'setup.redaction_checked';
SELECT hash = billing.audit_hash(prev_hash, audit_id, occurred_at, actor_role, actor_sub, actor_tenant,
                                 tenant_id, action, details) AS chained
  FROM billing.audit_log WHERE action = 'setup.redaction_checked';

-- what any process logs is masked (emit_log_hook): an error's message,
-- detail, hint and context
DO $$ BEGIN
  RAISE EXCEPTION 'upstream said: Authorization: Bearer sk_test_51HlogLeak'
    USING DETAIL = 'whsec_detailLeak', HINT = 'rk_live_hintLeak';
END $$;
