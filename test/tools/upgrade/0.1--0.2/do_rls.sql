-- (upgrade) row-level security of the table made again (the others keep theirs)
ALTER TABLE billing.subscriptions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_own_rows ON billing.subscriptions FOR SELECT TO qes_tenant
  USING (tenant_id = billing.jwt_tenant_id());
CREATE POLICY staff_all_rows ON billing.subscriptions TO qes_admin, qes_app
  USING (true) WITH CHECK (true);
GRANT SELECT ON billing.subscriptions TO qes_tenant, qes_admin;
