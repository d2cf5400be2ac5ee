-- The plan catalog (global, not tenant-owned): metrics, plans, their limits
-- and prices.  Operators change it with plain SQL; limits take effect at
-- commit.

CREATE TABLE billing.metrics (
  metric      text PRIMARY KEY CHECK (metric ~ '^[a-z][a-z_]{0,31}$'),
  kind        text NOT NULL CHECK (kind IN ('counter', 'gauge')),
  unit        text NOT NULL,
  description text NOT NULL
);
COMMENT ON TABLE billing.metrics IS
  'What is metered. Counters are summed per billing period; a gauge''s latest value counts.';

INSERT INTO billing.metrics VALUES
  ('signatures', 'counter', 'signature', 'Qualified electronic signatures created'),
  ('documents',  'counter', 'document',  'Documents uploaded for signing'),
  ('api_calls',  'counter', 'call',      'Calls to the platform API'),
  ('storage',    'gauge',   'byte',      'Document storage in use');

CREATE TABLE billing.plans (
  plan_id           text PRIMARY KEY CHECK (plan_id ~ '^[a-z][a-z0-9_]{0,31}$'),
  name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  tier              integer NOT NULL UNIQUE CHECK (tier >= 0),
  description       text NOT NULL DEFAULT '',
  features          text[] NOT NULL DEFAULT '{}',
  stripe_product_id text UNIQUE,
  active            boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE billing.plans IS
  'Plans, ordered by tier (the next tier up is the upgrade a tenant is offered).';

CREATE TABLE billing.plan_limits (
  plan_id        text NOT NULL REFERENCES billing.plans ON UPDATE CASCADE ON DELETE CASCADE,
  metric         text NOT NULL REFERENCES billing.metrics ON UPDATE CASCADE,
  soft_limit     bigint CHECK (soft_limit >= 0),
  hard_limit_pct integer CHECK (hard_limit_pct >= 100),
  PRIMARY KEY (plan_id, metric),
  CHECK (soft_limit IS NOT NULL OR hard_limit_pct IS NULL)
);
COMMENT ON TABLE billing.plan_limits IS
  'Per plan and metric: the soft limit per billing period (NULL = unlimited) and an optional hard ceiling in percent of it.';

CREATE TABLE billing.prices (
  price_key        text PRIMARY KEY CHECK (price_key ~ '^[a-z][a-z0-9_]{0,63}$'),
  plan_id          text NOT NULL REFERENCES billing.plans ON UPDATE CASCADE,
  billing_interval text NOT NULL CHECK (billing_interval IN ('month', 'year')),
  unit_amount      bigint NOT NULL CHECK (unit_amount >= 0),
  currency         text NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{3}$'),
  stripe_price_id  text UNIQUE,
  active           boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE billing.prices IS
  'Prices per plan and interval, in the smallest currency unit. price_key is the Stripe lookup_key.';
CREATE UNIQUE INDEX prices_one_active ON billing.prices (plan_id, billing_interval, currency) WHERE active;

INSERT INTO billing.plans (plan_id, name, tier, description, features) VALUES
  ('free', 'Free', 0, 'For trying QES signatures', '{}'),
  ('professional', 'Professional', 1, 'For growing teams',
   '{advanced_signatures,api_access}'),
  ('enterprise', 'Enterprise', 2, 'For regulated organisations',
   '{advanced_signatures,api_access,priority_support,compliance_tools}');

-- storage limits are bytes: 1, 10 and 100 GiB
INSERT INTO billing.plan_limits (plan_id, metric, soft_limit) VALUES
  ('free', 'signatures', 10), ('free', 'documents', 50),
  ('free', 'api_calls', 1000), ('free', 'storage', 1073741824),
  ('professional', 'signatures', 100), ('professional', 'documents', 1000),
  ('professional', 'api_calls', 10000), ('professional', 'storage', 10737418240),
  ('enterprise', 'signatures', NULL), ('enterprise', 'documents', NULL),
  ('enterprise', 'api_calls', NULL), ('enterprise', 'storage', 107374182400);

INSERT INTO billing.prices (price_key, plan_id, billing_interval, unit_amount) VALUES
  ('free_monthly', 'free', 'month', 0),
  ('free_yearly', 'free', 'year', 0),
  ('professional_monthly', 'professional', 'month', 2900),
  ('professional_yearly', 'professional', 'year', 29000),
  ('enterprise_monthly', 'enterprise', 'month', 9900),
  ('enterprise_yearly', 'enterprise', 'year', 99000);
