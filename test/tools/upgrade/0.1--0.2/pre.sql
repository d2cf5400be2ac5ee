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

-- Two tables keep their shape but gain states, and one index goes: the
-- state checks of billing.notifications (in_flight, skipped) and
-- billing.webhook_events (waiting) are made again with their 0.2 states
-- (same names), and notifications_pending gives way to the claim indexes
-- section 2 creates (notifications_due and others).
ALTER TABLE billing.notifications
  DROP CONSTRAINT notifications_state_check,
  ADD CONSTRAINT notifications_state_check CHECK (state IN ('pending', 'in_flight', 'sent', 'failed', 'skipped'));
DROP INDEX billing.notifications_pending;
ALTER TABLE billing.webhook_events
  DROP CONSTRAINT webhook_events_state_check,
  ADD CONSTRAINT webhook_events_state_check
    CHECK (state IN ('received', 'processing', 'applied', 'ignored', 'waiting', 'needs_review'));
