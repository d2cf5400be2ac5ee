-- (upgrade) the new columns of billing.invoices; attempt_count becomes NOT
-- NULL DEFAULT 0 in section 3, once filled
ALTER TABLE billing.invoices
  ADD COLUMN stripe_subscription_id text,
  ADD COLUMN first_failed_at timestamptz,
  ADD COLUMN attempt_count integer,
  ADD COLUMN finalized_at timestamptz,
  ADD COLUMN paid_at timestamptz,
  ADD COLUMN billing_reason text;
