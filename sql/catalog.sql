-- The plan catalog, seeded as the seed describes.
SELECT metric, kind, unit FROM billing.metrics ORDER BY metric;
SELECT plan_id, name, tier, features FROM billing.plans ORDER BY tier;
SELECT plan_id, metric, soft_limit, hard_limit_pct FROM billing.plan_limits ORDER BY plan_id, metric;
SELECT price_key, plan_id, billing_interval, unit_amount, currency FROM billing.prices ORDER BY plan_id, billing_interval;
SELECT * FROM api.plans ORDER BY tier;

-- operators change it with plain SQL; the constraints keep it honest
BEGIN;
UPDATE billing.prices SET unit_amount = 3900 WHERE price_key = 'professional_monthly';
SELECT monthly_price FROM api.plans WHERE plan_id = 'professional';
ROLLBACK;
INSERT INTO billing.prices (price_key, plan_id, billing_interval, unit_amount) VALUES ('bad', 'gold', 'month', 1);
INSERT INTO billing.prices (price_key, plan_id, billing_interval, unit_amount) VALUES ('bad', 'free', 'week', 1);
INSERT INTO billing.prices (price_key, plan_id, billing_interval, unit_amount) VALUES ('bad', 'free', 'month', -1);
-- one active price per plan, interval and currency
INSERT INTO billing.prices (price_key, plan_id, billing_interval, unit_amount) VALUES ('pro_again', 'professional', 'month', 100);
INSERT INTO billing.plan_limits VALUES ('free', 'pages', 1, NULL);
-- an unlimited metric cannot have a hard ceiling
UPDATE billing.plan_limits SET hard_limit_pct = 150 WHERE plan_id = 'enterprise' AND metric = 'signatures';
INSERT INTO billing.plans (plan_id, name, tier) VALUES ('Gold Plan', 'Gold', 3);
INSERT INTO billing.plans (plan_id, name, tier) VALUES ('gold', 'Gold', 2);
SELECT count(*) AS prices FROM billing.prices;
