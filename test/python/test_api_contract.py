"""The api schema through PostgREST: config, health, plans, tenant rows."""
import pytest

from conftest import ADMIN, TEST_KEYS, tenant_claims
from postgrest import PostgREST, http_status_for


@pytest.fixture(scope="module")
def tenants(pg):
    pg.sql("SELECT billing.upsert_tenant('acme', 'Acme', 'billing@acme.example')")
    pg.sql("SELECT billing.upsert_tenant('globex', 'Globex', 'ap@globex.example')")


@pytest.mark.parametrize("claims", [None, tenant_claims("acme")], ids=["anonymous", "tenant"])
def test_config(api, claims):
    r = api.get("/rpc/config", claims=claims)
    assert r.status == 200
    assert r.body["environment"] == "development"
    assert r.body["stripe_mode"] == "test"
    assert r.body["publishable_key"] == TEST_KEYS["STRIPE_TEST_PUBLISHABLE_KEY"]
    assert r.body["webhook_url"] == "https://sign.example.test/api/v1/billing/webhooks/stripe"
    assert [p["plan_id"] for p in r.body["plans"]] == ["free", "professional", "enterprise"]
    for secret in (TEST_KEYS["STRIPE_TEST_SECRET_KEY"], TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]):
        assert secret not in r.raw


@pytest.mark.parametrize("claims", [None, tenant_claims("acme")], ids=["anonymous", "tenant"])
def test_health_ok(api, claims):
    r = api.get("/rpc/health", claims=claims)
    assert r.status == 200, r.body
    assert r.body["status"] == "ok"
    assert r.body["database"] is True
    assert r.body["worker"]["alive"] is True
    assert r.body["worker"]["heartbeat_age_seconds"] < 5
    assert r.body["stripe"] == {"configured": True, "mode": "test", "problem": None}
    assert r.body["outbox_backlog"] == 0 and r.body["inbox_backlog"] == 0


def test_health_503_without_keys(pg_nokeys):
    api = PostgREST(pg_nokeys.dsn(user="authenticator"))
    try:
        r = api.get("/rpc/health")
        assert r.status == 503
        assert r.body["status"] == "unhealthy"
        assert r.body["stripe"]["problem"] == "STRIPE_TEST_SECRET_KEY is not set"
        # config still answers, without a publishable key
        c = api.get("/rpc/config")
        assert c.status == 200 and c.body["publishable_key"] is None
    finally:
        api.close()


def test_health_reports_backlog(pg, api):
    pg.sql("INSERT INTO billing.stripe_requests (kind, method, path, next_attempt_at) "
           "VALUES ('test.later', 'GET', '/v1/balance', now() + interval '1 hour')")
    try:
        assert api.get("/rpc/health").body["outbox_backlog"] == 1
    finally:
        pg.sql("DELETE FROM billing.stripe_requests WHERE kind = 'test.later'")


@pytest.mark.parametrize("claims", [None, tenant_claims("acme"), ADMIN], ids=["anonymous", "tenant", "admin"])
def test_plans(api, claims):
    r = api.get("/plans", claims=claims, params={"order": "tier.asc"})
    assert r.status == 200
    assert [(p["plan_id"], p["monthly_price"], p["yearly_price"]) for p in r.body] == [
        ("free", 0, 0), ("professional", 2900, 29000), ("enterprise", 9900, 99000)]
    pro = r.body[1]
    assert pro["limits"] == {"signatures": 100, "documents": 1000, "api_calls": 10000, "storage": 10737418240}
    assert pro["features"] == ["advanced_signatures", "api_access"]
    assert r.body[2]["limits"]["signatures"] is None


def test_plans_filter(api):
    r = api.get("/plans", params={"plan_id": "eq.enterprise"})
    assert r.status == 200 and len(r.body) == 1 and r.body[0]["name"] == "Enterprise"


def test_tenant_sees_only_itself(api, tenants):
    r = api.get("/tenant", claims=tenant_claims("acme"))
    assert r.status == 200
    assert [t["tenant_id"] for t in r.body] == ["acme"]
    r = api.get("/tenant", claims=tenant_claims("globex"))
    assert [t["tenant_id"] for t in r.body] == ["globex"]
    # filtering for another tenant's row finds nothing
    r = api.get("/tenant", claims=tenant_claims("acme"), params={"tenant_id": "eq.globex"})
    assert r.status == 200 and r.body == []


def test_tenant_view_refuses_anonymous(api, tenants):
    r = api.get("/tenant")
    assert r.status == 401 and r.body["code"] == "42501"


def test_admin_sees_all_tenants(api, tenants, pg):
    r = api.get("/tenant", claims=ADMIN, params={"order": "tenant_id.asc"})
    ids = [t["tenant_id"] for t in r.body]
    # every tenant (other tests of the session may have registered more)
    assert ids == [t for (t,) in pg.sql("SELECT tenant_id FROM billing.tenants ORDER BY tenant_id COLLATE \"C\"")]
    assert {"acme", "globex"} <= set(ids)


def test_unknown_routes(api):
    assert api.get("/rpc/no_such_function").status == 404
    assert api.get("/no_such_view").status == 404


def test_private_schema_is_not_reachable(api, tenants):
    # a tenant cannot call private functions even by full name
    r = api.post("/rpc/health", claims=tenant_claims("acme"))
    assert r.status == 200
    with api.conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT set_config('role', 'qes_tenant', true)")
        with pytest.raises(Exception) as exc:
            cur.execute("SELECT billing.audit('x.y', NULL, '{}')")
        assert exc.value.diag.sqlstate == "42501"
        cur.execute("ROLLBACK")


def test_status_mapping():
    assert http_status_for("23505", True) == 409
    assert http_status_for("42501", False) == 401
    assert http_status_for("42501", True) == 403
    assert http_status_for("P0001", True) == 400
    assert http_status_for("P0002", True) == 500
    assert http_status_for("53300", True) == 503
    assert http_status_for("53400", True) == 400
    assert http_status_for("PT402", True) == 402
    assert http_status_for("22023", True) == 400
