-- (upgrade) the new column of billing.payments, filled in section 3
ALTER TABLE billing.payments ADD COLUMN stripe_invoice_id text;
