-- Registering tenants, and the functions over tenants and their
-- subscriptions.  The tables: 01_tables.sql.

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
