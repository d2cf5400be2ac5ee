-- The plan catalog's seed rows (the plans of the README) and the functions
-- that read it.  The tables: 01_tables.sql.

INSERT INTO billing.metrics VALUES
  ('signatures', 'counter', 'signature', 'Qualified electronic signatures created'),
  ('documents',  'counter', 'document',  'Documents uploaded for signing'),
  ('api_calls',  'counter', 'call',      'Calls to the platform API'),
  ('storage',    'gauge',   'byte',      'Document storage in use');

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
