-- Tenants and their subscriptions.  Tenant-owned tables lead their primary
-- key with tenant_id (docs/architecture.md, rule 2).

CREATE TABLE billing.tenants (
  tenant_id          text PRIMARY KEY CHECK (tenant_id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
  name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  billing_email      text NOT NULL CHECK (length(billing_email) <= 254
                                          AND billing_email ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$'),
  stripe_customer_id text UNIQUE CHECK (stripe_customer_id ~ '^cus_'),
  disputed           boolean NOT NULL DEFAULT false,
  created_at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
  updated_at         timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing.tenants IS 'Tenants of the QES platform, registered by the platform with billing.upsert_tenant().';

CREATE TABLE billing.subscriptions (
  tenant_id              text NOT NULL REFERENCES billing.tenants,
  subscription_id        bigint GENERATED ALWAYS AS IDENTITY,
  plan_id                text NOT NULL REFERENCES billing.plans ON UPDATE CASCADE,
  billing_interval       text NOT NULL CHECK (billing_interval IN ('month', 'year')),
  status                 text NOT NULL CHECK (status IN ('incomplete', 'incomplete_expired', 'trialing',
                                                         'active', 'past_due', 'canceled', 'unpaid', 'paused')),
  stripe_subscription_id text UNIQUE CHECK (stripe_subscription_id ~ '^sub_'),
  stripe_price_id        text,
  client_secret          text,
  current_period_start   timestamptz,
  current_period_end     timestamptz,
  cancel_at_period_end   boolean NOT NULL DEFAULT false,
  trial_end              timestamptz,
  grace_until            timestamptz,
  stripe_state_at        timestamptz,
  -- Stripe's own facts the entitlements are computed from (docs/architecture.md,
  -- "Mirroring Stripe"): the cycle anchor the periods step from, when the
  -- subscription was created and when it ended
  billing_cycle_anchor   timestamptz,
  stripe_created         timestamptz,
  ended_at               timestamptz,
  -- where the state came from: an event (Stripe's time, whole seconds) or
  -- an answer of the outbox (stamped with the second its request was sent)
  stripe_state_source    text CHECK (stripe_state_source IN ('event', 'answer')),
  created_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
  updated_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (tenant_id, subscription_id),
  CHECK (current_period_end IS NULL OR current_period_start IS NULL
         OR current_period_end > current_period_start)
);
COMMENT ON TABLE billing.subscriptions IS
  'Subscriptions mirrored from Stripe (Free is local only). stripe_state_at is the Stripe time of the newest state applied, so an older event never overwrites a newer one; grace_until is derived from Stripe''s times (billing.sync_dunning).';
CREATE UNIQUE INDEX subscriptions_one_current ON billing.subscriptions (tenant_id)
  WHERE status NOT IN ('canceled', 'incomplete_expired');

-- Every Stripe customer of a tenant that Stripe told about, kept by Stripe
-- id: events about any of them (a deleted one too) belong to the tenant, and
-- a deleted customer is never linked again.  tenants.stripe_customer_id is
-- the newest customer that is not deleted (billing.sync_customer).
CREATE TABLE billing.stripe_customers (
  tenant_id          text NOT NULL REFERENCES billing.tenants,
  stripe_customer_id text NOT NULL UNIQUE CHECK (stripe_customer_id ~ '^cus_'),
  stripe_created     timestamptz,
  deleted_at         timestamptz,
  linked_at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (tenant_id, stripe_customer_id)
);
COMMENT ON TABLE billing.stripe_customers IS
  'Every Stripe customer of each tenant that Stripe told about (customer events). deleted_at is the Stripe time of customer.deleted: a deleted customer is never revived by an older event.';

CREATE FUNCTION billing.upsert_tenant(p_tenant_id text, p_name text, p_billing_email text)
  RETURNS billing.tenants
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, billing
AS $$
DECLARE
  v_old billing.tenants;
  v_new billing.tenants;
BEGIN
  IF p_tenant_id IS NULL OR p_tenant_id !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$' THEN
    RAISE EXCEPTION 'invalid tenant id: %', coalesce(quote_literal(p_tenant_id), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A tenant id is 1 to 64 letters, digits, ".", "_", ":" or "-", starting with a letter or digit.';
  END IF;
  IF p_name IS NULL OR length(btrim(p_name)) = 0 OR length(p_name) > 200 THEN
    RAISE EXCEPTION 'invalid tenant name for tenant %', p_tenant_id
      USING ERRCODE = 'invalid_parameter_value', HINT = 'A tenant name is 1 to 200 characters.';
  END IF;
  IF p_billing_email IS NULL OR length(p_billing_email) > 254
     OR p_billing_email !~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$' THEN
    RAISE EXCEPTION 'invalid billing email for tenant %', p_tenant_id
      USING ERRCODE = 'invalid_parameter_value', HINT = 'Give an address such as billing@example.com.';
  END IF;

  SELECT * INTO v_old FROM billing.tenants WHERE tenant_id = p_tenant_id FOR UPDATE;
  IF NOT FOUND THEN
    INSERT INTO billing.tenants (tenant_id, name, billing_email)
      VALUES (p_tenant_id, btrim(p_name), p_billing_email)
      RETURNING * INTO v_new;
    PERFORM billing.audit('tenant.created', p_tenant_id,
                          jsonb_build_object('name', v_new.name, 'billing_email', v_new.billing_email));
  ELSIF v_old.name IS DISTINCT FROM btrim(p_name) OR v_old.billing_email IS DISTINCT FROM p_billing_email THEN
    UPDATE billing.tenants
       SET name = btrim(p_name), billing_email = p_billing_email, updated_at = now()
     WHERE tenant_id = p_tenant_id
     RETURNING * INTO v_new;
    PERFORM billing.audit('tenant.updated', p_tenant_id,
                          jsonb_build_object('name', v_new.name, 'billing_email', v_new.billing_email,
                                             'previous', jsonb_build_object('name', v_old.name,
                                                                            'billing_email', v_old.billing_email)));
  ELSE
    v_new := v_old;
  END IF;
  RETURN v_new;
END
$$;
COMMENT ON FUNCTION billing.upsert_tenant(text, text, text) IS
  'Register a tenant, or update its name and billing email. Audited; a call that changes nothing writes nothing.';
