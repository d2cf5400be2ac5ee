-- Ceiling for check_limit_over_limit beside SELECT 1: the same answer (a
-- billing.limit_check with the upgrade offer) as a constant, so what is
-- measured is sending that row to the client and nothing else.
SELECT ROW(true, 'over_soft_limit', 1200::bigint, 1000::bigint, 0::bigint, 'free', NULL::text,
           '{"name": "Professional", "limit": 10000, "plan_id": "professional", "currency": "usd", "yearly_price": 29000, "monthly_price": 2900}'::jsonb)::billing.limit_check;
