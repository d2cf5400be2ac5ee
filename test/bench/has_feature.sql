\set t random(1, 100)
SELECT billing.has_feature(:t, 'api_access');
