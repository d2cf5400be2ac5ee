-- Two tables get columns in the middle in 0.2 (billing.subscriptions,
-- billing.webhook_rejections): ALTER TABLE can only append, so each is made
-- again, exactly as a fresh 0.2 install makes it.  The 0.1 table moves
-- aside into a schema of its own (with its indexes, identity sequence and
-- row type, so that every name is free), the 0.2 table is created in its
-- place in section 2, and section 3 copies the rows over and drops the old
-- table.  The foreign key from billing.invoices is made again after the copy.
CREATE SCHEMA qes_billing_0_1;
ALTER TABLE billing.invoices DROP CONSTRAINT invoices_tenant_id_subscription_id_fkey;
ALTER TABLE billing.subscriptions SET SCHEMA qes_billing_0_1;
ALTER TABLE billing.webhook_rejections SET SCHEMA qes_billing_0_1;
