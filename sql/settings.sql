-- Settings, the seed's environment variables, and the Stripe key guards.
-- (The regression cluster runs with none of the seed's variables set; the
-- TAP test t/003_environment.pl covers keys given in the environment.)
SELECT name, setting, unit, context
  FROM pg_settings WHERE name LIKE 'qes\_billing.%' ORDER BY name;

SELECT billing.environment(), billing.stripe_mode(), billing.base_url(), billing.publishable_key();
SELECT kind, billing.stripe_key_problem(kind) FROM unnest(ARRAY['secret', 'publishable', 'webhook']) kind;
SELECT billing.stripe_key_problem('private');
SELECT billing.require_stripe_keys();

-- a setting refuses a key of the wrong mode, and says which setting
SET qes_billing.stripe_test_secret_key = 'sk_live_51Habc';
SET qes_billing.stripe_live_secret_key = 'sk_test_51Habc';
SET qes_billing.stripe_test_publishable_key = 'pk_live_51Habc';
SET qes_billing.stripe_test_webhook_secret = 'secret';
SET qes_billing.environment = 'prod';
SET qes_billing.stripe_api_base = 'ftp://stripe.example';

-- keys of the right mode are used; secrets never show
SET qes_billing.stripe_test_secret_key = 'sk_test_51Hsecretvalue';
SET qes_billing.stripe_test_publishable_key = 'pk_test_51Hpublic';
SET qes_billing.stripe_test_webhook_secret = 'whsec_old, whsec_new';
SHOW qes_billing.stripe_test_secret_key;
SHOW qes_billing.stripe_test_webhook_secret;
SELECT current_setting('qes_billing.stripe_test_secret_key');
SELECT count(*) AS secret_rows_in_pg_settings FROM pg_settings
 WHERE name ~ 'secret' AND name LIKE 'qes\_billing.%';
SELECT kind, billing.stripe_key_problem(kind) FROM unnest(ARRAY['secret', 'publishable', 'webhook']) kind;
SELECT billing.require_stripe_keys();
SELECT billing.publishable_key();

-- production uses the live keys: the test keys above no longer count
SET qes_billing.environment = 'production';
SELECT billing.environment(), billing.stripe_mode();
SELECT billing.publishable_key();
SELECT billing.require_stripe_keys();
SET qes_billing.stripe_live_secret_key = 'rk_live_51Hrestricted';
SET qes_billing.stripe_live_publishable_key = 'pk_live_51Hpublic';
SET qes_billing.stripe_live_webhook_secret = 'whsec_live';
SELECT billing.require_stripe_keys();
SELECT billing.publishable_key();
SET qes_billing.environment = 'staging';
SELECT billing.stripe_mode(), billing.publishable_key();
RESET qes_billing.environment;

-- other roles see no secret, and cannot set one
CREATE ROLE regress_qes_user;
SET ROLE regress_qes_user;
SHOW qes_billing.stripe_test_secret_key;
SET qes_billing.stripe_test_secret_key = 'sk_test_other';
SELECT count(*) AS secret_rows_visible FROM pg_settings WHERE name ~ 'secret' AND name LIKE 'qes\_billing.%';
SHOW qes_billing.stripe_test_publishable_key;
RESET ROLE;
DROP ROLE regress_qes_user;

-- the billing clock moves outside production only, and the move is audited
-- (offsets shown in UTC: 30 days across a daylight-saving change elsewhere
-- would read 29 days 23 hours)
SET TimeZone = 'UTC';
SELECT billing.now() - now() AS offset_before;
SELECT billing.set_clock('30 days') - now() AS offset_after;
SELECT billing.now() - now() AS offset_now;
SET qes_billing.environment = 'production';
SELECT billing.now() - now() AS offset_in_production;
SELECT billing.set_clock('1 day');
RESET qes_billing.environment;
SELECT billing.set_clock(NULL);
SELECT billing.set_clock('0') - now() AS offset_reset;
RESET TimeZone;
SELECT action, details FROM billing.audit_log WHERE action = 'clock.set' ORDER BY audit_id;

-- key settings are never stored per database or role (pg_db_role_setting is readable by every role)
ALTER DATABASE contrib_regression SET qes_billing.stripe_test_webhook_secret = 'whsec_per_database';
\echo :LAST_ERROR_SQLSTATE
CREATE ROLE regress_qes_keyholder;
ALTER ROLE regress_qes_keyholder SET qes_billing.stripe_test_secret_key = 'sk_test_per_role';
ALTER ROLE regress_qes_keyholder IN DATABASE contrib_regression SET qes_billing.stripe_live_secret_key = 'sk_live_per_role';
DROP ROLE regress_qes_keyholder;
SELECT count(*) AS stored_key_settings FROM pg_db_role_setting s, unnest(s.setconfig) c WHERE c LIKE 'qes_billing.stripe%';
-- the secret key only ever goes to an https API base (http only to the loopback, outside production)
SET qes_billing.stripe_test_secret_key = 'sk_test_51Habc';
SET qes_billing.stripe_api_base = 'http://127.0.0.1:12111';
SELECT billing.stripe_key_problem('secret') AS loopback_http;
SET qes_billing.stripe_api_base = 'http://stripe-proxy.example';
SELECT billing.stripe_key_problem('secret') AS remote_http;
SET qes_billing.environment = 'production';
SET qes_billing.stripe_live_secret_key = 'sk_live_51Habc';
SET qes_billing.stripe_api_base = 'http://127.0.0.1:12111';
SELECT billing.stripe_key_problem('secret') AS http_in_production;
SET qes_billing.stripe_api_base = 'https://api.stripe.com';
SELECT billing.stripe_key_problem('secret') AS https_in_production;
RESET qes_billing.environment;
RESET qes_billing.stripe_live_secret_key;
RESET qes_billing.stripe_test_secret_key;
RESET qes_billing.stripe_api_base;
