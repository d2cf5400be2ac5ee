"""The sharded qes_billing (docs/scaleout.md): one router (PL/Proxy,
qes_billing_router) and 4 shards (separate clusters, PgBouncer in
transaction mode between them), against a single database.

- the router's api schema is the single database's (what PostgREST derives
  its OpenAPI description from): functions, signatures, volatility, grants,
  comments, view columns;
- placement is stable and every partition has a shard;
- the differential test: the same workload (tenants, usage in the
  platform's own transactions on the tenant's shard with repeated keys and
  rollbacks, routed calls, subscription flows against a fake Stripe,
  webhooks shuffled and repeated, error cases, rate limiting) against both;
  every answer and each tenant's final state must be identical;
- webhooks whose owner no shard knows yet, reconciliation's hand-over;
- operators' views over all shards;
- last, the failure test: a shard stopped under load; only its tenants get
  errors (503, Retry-After), nothing is lost when it returns.
"""
import json
import random
import re
import threading
import time
from datetime import datetime

import psycopg
import pytest

from conftest import ADMIN, TEST_KEYS, amcheck_and_stop, tenant_claims
from fake_stripe import FakeStripe, signed
from pgcluster import Cluster
from postgrest import PostgREST
from shards import PARTITIONS, Sharded
from test_prometheus import MONITORING, Exporter, parse, value

ROUTER_QUERIES = MONITORING + "/qes_billing_router_queries.yaml"


def shard_metrics(router):
    """The router's exporter (docs/monitoring/qes_billing_router_queries.yaml),
    scraped once: {(name, labels): value} of the qes_billing_shard series."""
    exporter = Exporter(f"host=127.0.0.1 port={router.port} dbname={router.database} user=postgres sslmode=disable",
                        queries=ROUTER_QUERIES)
    try:
        text, _ = exporter.scrape()
    finally:
        exporter.stop()
    return parse(text)[1]

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
SHARDS = 4

PRICES = {"professional_monthly": ("professional", 2900, "month"), "professional_yearly": ("professional", 29000, "year"),
          "enterprise_monthly": ("enterprise", 9900, "month"), "enterprise_yearly": ("enterprise", 99000, "year")}


def seed_prices(fake):
    """The catalog's prices in the fake, as qes_billing_setup --setup-products would leave them."""
    for key, (plan, amount, interval) in PRICES.items():
        fake.objects[f"price_{key}"] = {"id": f"price_{key}", "object": "price", "unit_amount": amount,
                                        "currency": "usd", "lookup_key": key, "product": f"qes_{plan}",
                                        "recurring": {"interval": interval}, "active": True, "livemode": False}


def use_prices(cluster):
    cluster.sql("UPDATE billing.prices SET stripe_price_id = 'price_' || price_key "
                "WHERE unit_amount > 0 AND stripe_price_id IS NULL")


def shard_conf(base):
    return {"qes_billing.stripe_api_base": f"'{base}'", "qes_billing.retry_base_delay": "'20ms'",
            "qes_billing.retry_max_delay": "'400ms'", "qes_billing.request_timeout": "'2s'",
            "qes_billing.max_attempts": "30", "qes_billing.reconcile_interval": "0",
            "qes_billing.rate_limit_tenant": "20"}


class System:
    """One way of running the workload: a single database, or the router."""

    def __init__(self, name, api_cluster, fake, tx_dsn, platform_prefix, clusters):
        self.name = name
        self.api_cluster = api_cluster
        self.api = PostgREST(api_cluster.dsn(user="authenticator"))
        self.limited = PostgREST(api_cluster.dsn(user="authenticator"), pre_request="api.pre_request")
        self.fake = fake
        self.tx_dsn = tx_dsn                  # tenant -> the DSN of its own transactions
        self.platform = platform_prefix       # billing (one database) or router
        self.clusters = clusters              # where the billing data is

    def platform_call(self, fn, *args):
        """A platform call (billing.* on one database, router.* through the
        router), as qes_app; the answer, or the error as (SQLSTATE, message,
        detail, hint)."""
        placeholders = ", ".join(["%s"] * len(args))
        with self.api_cluster.connect(user="authenticator", autocommit=True) as c:
            c.execute("SET ROLE qes_app")
            try:
                rows = c.execute(f"SELECT to_jsonb(r) FROM {self.platform}.{fn}({placeholders}) r", args).fetchall()
                return [r[0] for r in rows]
            except psycopg.Error as e:
                d = e.diag
                return ("error", d.sqlstate, d.message_primary, d.message_detail, d.message_hint)

    def act(self, tenant, key, commit=True):
        """The platform's billable act and its usage in one transaction on
        the tenant's database (for the router: its shard, through PgBouncer)."""
        with psycopg.connect(self.tx_dsn(tenant), prepare_threshold=None) as c:
            with c.transaction(force_rollback=not commit):
                c.execute("INSERT INTO public.app_acts (tenant_id, act_key) VALUES (%s, %s)", (tenant, key))
                row = c.execute("SELECT to_jsonb(r) FROM billing.record_usage(%s, 'signatures', 1, %s) r",
                                (tenant, key)).fetchone()
        return row[0]

    def settle(self, timeout=60):
        open_q = ("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE state IN ('pending', 'in_flight') "
                  "AND next_attempt_at <= now() + interval '2 seconds') AND NOT EXISTS (SELECT 1 FROM "
                  "billing.webhook_events WHERE state IN ('received', 'processing'))")
        for c in self.clusters:
            assert c.wait_until(open_q, timeout), (self.name, c.sql(
                "SELECT kind, state, error FROM billing.stripe_requests WHERE state IN ('pending','in_flight')"))

    def close(self):
        self.api.close()
        self.limited.close()


@pytest.fixture(scope="module")
def world():
    fakes = [FakeStripe(seed=11), FakeStripe(seed=11)]
    for f in fakes:
        f.base = f.serve()
        seed_prices(f)
    single = sharded = None
    try:
        single = Cluster("single", env=TEST_KEYS, conf=shard_conf(fakes[0].base)).start()
        sharded = Sharded(SHARDS, env=TEST_KEYS, shard_conf=shard_conf(fakes[1].base)).start()
        for c in [single, *sharded.shards]:
            use_prices(c)
            c.sql("CREATE TABLE public.app_acts (tenant_id text, act_key text, PRIMARY KEY (tenant_id, act_key))")
        assert single.wait_until("SELECT alive FROM billing.worker_status"), single.log()
        sharded.wait_workers()
        one = System("single", single, fakes[0], lambda t: single.dsn(), "billing", [single])

        def shard_dsn(tenant):
            pool = sharded.router.sql("SELECT pool_name FROM router.tenant_shard(%s)", (tenant,))[0][0]
            return f"host=127.0.0.1 port={sharded.bouncer.port} dbname={pool} user=postgres"
        many = System("sharded", sharded.router, fakes[1], shard_dsn, "router", sharded.shards)
        yield {"single": one, "sharded": many, "cluster": single, "shards": sharded}
        one.close()
        many.close()
    finally:
        try:
            if single is not None:
                amcheck_and_stop(single)
        finally:
            if sharded is not None:
                sharded.stop(amcheck_and_stop)
            for f in fakes:
                f.stop()


# ---- normalisation: what may differ between one database and N ----------

STRIPE_ID = re.compile(r"^(cus|sub|si|in|pi|ch|evt|dp|we|req)_[0-9a-f]+(_secret_[0-9a-f]+)?$")
ISO_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)$")
# identities are per database (one sequence per shard)
LOCAL_IDS = {"subscription_id", "payment_id", "request_id", "customer_request_id"}
# wall-clock and Stripe-clock times: the two runs are seconds apart
CLOCK_KEYS = {"created_at", "updated_at", "recorded_at", "current_period_start", "current_period_end", "created",
              "period_start", "period_end", "heartbeat_age_seconds", "grace_until", "trial_end", "linked_at"}


def norm(v, key=None):
    if isinstance(v, dict):
        return {k: norm(x, k) for k, x in v.items() if k != "shards"}
    if isinstance(v, list):
        return [norm(x) for x in v]
    if isinstance(v, datetime):
        return "<time>"
    if key in LOCAL_IDS and v is not None:
        return "<id>"
    if isinstance(v, str):
        m = STRIPE_ID.match(v)
        if m:
            return f"<{m.group(1)}{'_secret' if m.group(2) else ''}>"
        if key in CLOCK_KEYS and ISO_TS.match(v):
            return "<time>"
        if key in ("hosted_invoice_url", "invoice_pdf"):     # the fake's random URLs
            return re.sub(r"[0-9a-f]{12}", "<hex>", v)
        if key == "number" and v.startswith("QES-"):        # the fake's account-wide invoice counter
            return "QES-<n>"
    if key in CLOCK_KEYS and isinstance(v, (int, float)) and key == "heartbeat_age_seconds":
        return "<age>"
    return v


def answer(r):
    return (r.status, norm(r.body), r.headers.get("Retry-After"))


def both(world, fn):
    """Run fn(system) on the single database and on the router; the
    normalised answers must be equal."""
    a = fn(world["single"])
    b = fn(world["sharded"])
    assert norm(a) == norm(b), f"single: {json.dumps(norm(a), default=str)[:3000]}\n" \
                               f"sharded: {json.dumps(norm(b), default=str)[:3000]}"
    return a, b


# ---- the api schema is the same -------------------------------------------

CATALOG_FUNCTIONS = """
SELECT p.oid::regprocedure::text, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
       p.provolatile, p.prosecdef, p.proretset,
       (SELECT array_agg(a ORDER BY a) FROM unnest(p.proacl::text[]) a), obj_description(p.oid, 'pg_proc')
  FROM pg_proc p WHERE p.pronamespace = 'api'::regnamespace ORDER BY 1"""
CATALOG_VIEWS = """
SELECT c.relname, c.relkind, (SELECT array_agg(a ORDER BY a) FROM unnest(c.relacl::text[]) a),
       obj_description(c.oid, 'pg_class'),
       (SELECT array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       (SELECT array_agg(col_description(c.oid, a.attnum) ORDER BY a.attnum)
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
  FROM pg_class c WHERE c.relnamespace = 'api'::regnamespace ORDER BY 1"""
CATALOG_SCHEMA = """SELECT obj_description('api'::regnamespace, 'pg_namespace'),
       (SELECT array_agg(a ORDER BY a) FROM unnest(nspacl::text[]) a) FROM pg_namespace WHERE nspname = 'api'"""


def test_api_schema_is_the_single_databases(world):
    single, router = world["cluster"], world["shards"].router
    for q in (CATALOG_FUNCTIONS, CATALOG_VIEWS, CATALOG_SCHEMA):
        a, b = single.sql(q), router.sql(q)
        assert a and a == b, "\n".join(f"single: {x}\nrouter: {y}" for x, y in zip(a, b) if x != y) or (a, b)
    # every api object has a comment, on the router too
    assert all(r[7] for r in router.sql(CATALOG_FUNCTIONS)) and all(r[3] for r in router.sql(CATALOG_VIEWS))
    # nothing of the router's is granted to PUBLIC
    assert router.sql("""SELECT count(*) FROM pg_proc p WHERE p.pronamespace IN ('router'::regnamespace, 'api'::regnamespace)
                          AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) x WHERE x.grantee = 0))""")[0][0] == 0
    # every SECURITY DEFINER function pins its search_path
    assert router.sql("""SELECT array_agg(p.oid::regprocedure) FROM pg_proc p
                          WHERE p.prosecdef AND p.pronamespace IN ('router'::regnamespace, 'api'::regnamespace)
                            AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')""")[0][0] is None
    for c in world["shards"].shards:
        assert c.sql("""SELECT array_agg(p.oid::regprocedure) FROM pg_proc p
                         WHERE p.pronamespace = 'billing_shard'::regnamespace
                           AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) x WHERE x.grantee = 0))""")[0][0] is None


def test_placement_is_stable_and_complete(world):
    import hashlib
    router = world["shards"].router
    for t in ("acme", "globex", "t-000001", "A.b:c_d-e"):
        h = int.from_bytes(hashlib.md5(t.encode()).digest()[:4], "big", signed=True)
        assert router.sql("SELECT router.tenant_hash(%s), router.tenant_partition(%s)", (t, t))[0] == \
            (h, h & (PARTITIONS - 1))
    assert router.sql("SELECT router.partition_count()")[0][0] == PARTITIONS
    rows = router.sql("SELECT shard_name, partitions FROM router.shard_partitions ORDER BY 1")
    assert rows == [(f"s{i}", PARTITIONS // SHARDS) for i in range(SHARDS)]
    # each shard knows its own name, as the router calls it
    for i in range(SHARDS):
        assert world["shards"].shards[i].sql("SELECT billing_shard.shard_name()")[0][0] == f"s{i}"
    # a partition count that is no power of two is refused with a hint
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        router.sql("SELECT router.set_partitions(48)")
    assert e.value.diag.message_hint


# ---- the differential test -----------------------------------------------

def tenants(world):
    return [t for ts in world["shards"].tenants_per_shard("tn", 3).values() for t in ts]


def deliver_all(system, order, repeats):
    """Every event of the system's fake in the given order of indexes, each
    delivered `repeats[i]` times; the answers."""
    out = []
    events = list(system.fake.events)
    for i in order:
        if i >= len(events):
            continue
        body, header = signed(events[i], SECRET)
        for _ in range(repeats[i]):
            r = system.api.post("/rpc/stripe_webhook", body=body,
                                headers={"Content-Type": "application/json", "Stripe-Signature": header})
            out.append((i, r.status, norm(r.body)))
    return out


def pay(system, tenant, card):
    """What the tenant's browser does with the client secret."""
    cus = [c["id"] for c in system.fake.of_type("customer") if c.get("metadata", {}).get("tenant_id") == tenant]
    pis = [p for p in system.fake.of_type("payment_intent") if p["customer"] in cus and p["status"] != "succeeded"]
    assert pis, (system.name, tenant)
    try:
        system.fake.confirm(pis[-1]["id"], card)
        return "paid"
    except Exception as e:      # a decline is an answer
        return type(e).__name__


def tenant_state(system, tenant):
    c = tenant_claims(tenant)
    state = {}
    for path in ("/subscription", "/usage", "/invoices", "/payments", "/tenant"):
        r = system.api.get(path, claims=c)
        state[path] = (r.status, norm(r.body))
    state["check"] = [system.platform_call("check_limit", tenant, m, 1)
                      for m in ("signatures", "documents", "api_calls", "storage")]
    state["report"] = system.platform_call("usage_report", tenant)
    return norm(state)


def test_differential_single_vs_sharded(world):
    ts = tenants(world)
    assert len(ts) == 3 * SHARDS
    log = []

    # tenants
    for t in ts:
        log.append(both(world, lambda s: s.platform_call("upsert_tenant", t, f"Tenant {t}", f"billing@{t}.example")))
    both(world, lambda s: s.platform_call("upsert_tenant", "bad id!", "x", "a@b.example"))
    both(world, lambda s: s.platform_call("upsert_tenant", ts[0], f"Tenant {ts[0]}", "not-an-email"))

    # usage in the platform's own transaction, keys repeated, some rolled back
    rnd = random.Random(5)
    acts = [(t, f"act-{rnd.randrange(12)}", rnd.random() > 0.15) for t in ts for _ in range(14)]
    for t, key, commit in acts:
        def run(s):
            try:
                return s.act(t, key, commit)
            except psycopg.errors.UniqueViolation:
                return "duplicate act"     # the platform's own row: a repeated act
        both(world, run)
    # routed record_usage: exactly once by its key, whoever asks again
    for t in ts[:6]:
        for key in ("routed-1", "routed-2", "routed-1"):
            log.append(both(world, lambda s: s.platform_call("record_usage", t, "documents", 2, key)))
        both(world, lambda s: s.platform_call("record_usage", t, "documents", 3, "routed-1"))   # same key, other values: 23505
        both(world, lambda s: s.platform_call("record_usage", t, "nosuch", 1, "x"))
        both(world, lambda s: s.platform_call("check_limit", t, "signatures", 5))
    both(world, lambda s: s.platform_call("record_usage", "nobody", "signatures", 1, "x"))
    # Stripe's times are whole seconds: a subscription created in the same
    # second as usage would start (its current_period_start) before that
    # usage in one system and after it in the other; the subscriptions come
    # in a later second than the usage
    time.sleep(1.1)

    # the API's refusals, as every role
    calls = [("GET", "/rpc/config", None, None), ("GET", "/rpc/health", None, None), ("GET", "/plans", None, None),
             ("POST", "/rpc/create_subscription", tenant_claims(ts[0]), {"plan": "nope"}),
             ("POST", "/rpc/create_subscription", None, {"plan": "professional"}),
             ("POST", "/rpc/create_subscription", tenant_claims("unregistered"), {"plan": "professional"}),
             ("POST", "/rpc/create_subscription", {"role": "qes_tenant"}, {"plan": "professional"}),
             ("POST", "/rpc/update_subscription", tenant_claims(ts[1]), {"plan": "enterprise"}),
             ("POST", "/rpc/update_subscription", tenant_claims(ts[1]), {}),
             ("POST", "/rpc/create_payment_intent", tenant_claims(ts[2]), {"amount": 10}),
             ("POST", "/rpc/create_payment_intent", tenant_claims(ts[2]), {"amount": 4900, "currency": "eur"}),
             ("GET", "/usage", None, None), ("GET", "/subscription", ADMIN, None),
             ("POST", "/rpc/stripe_webhook", None, "{}"),
             ("GET", "/rpc/nosuch", None, None)]
    for method, path, claims, body in calls:
        log.append(both(world, lambda s: answer(s.api.request(method, path, claims=claims, body=body))))

    # subscription flows against the fake Stripe: two tenants of each shard pay, one has its card declined
    payers = ts[::3] + ts[1::3]
    for t in payers:
        log.append(both(world, lambda s: answer(s.api.post("/rpc/create_subscription", claims=tenant_claims(t),
                                                           body={"plan": "professional", "interval": "month"}))))
    for s in (world["single"], world["sharded"]):
        s.settle()
    for i, t in enumerate(payers):
        card = "pm_card_chargeDeclined" if i % 5 == 4 else "pm_card_visa"
        both(world, lambda s: pay(s, t, card))
    # webhooks: shuffled, repeated, the same permutation for both
    n = max(len(world["single"].fake.events), len(world["sharded"].fake.events))
    assert len(world["single"].fake.events) == len(world["sharded"].fake.events)
    order = list(range(n))
    random.Random(9).shuffle(order)
    repeats = [1 + (i % 3 == 0) + (i % 7 == 0) for i in range(n)]
    both(world, lambda s: deliver_all(s, order, repeats))
    for s in (world["single"], world["sharded"]):
        s.settle()
    # upgrades of those that paid, then their events
    upgraded = [t for i, t in enumerate(payers) if i % 5 != 4][:4]
    for t in upgraded:
        log.append(both(world, lambda s: answer(s.api.post("/rpc/update_subscription", claims=tenant_claims(t),
                                                           body={"plan": "enterprise"}))))
    for s in (world["single"], world["sharded"]):
        s.settle()
    n2 = len(world["single"].fake.events)
    assert n2 == len(world["sharded"].fake.events) and n2 > n
    order2 = list(range(n, n2))
    random.Random(10).shuffle(order2)
    repeats = [2] * n2
    both(world, lambda s: deliver_all(s, order2, repeats))
    for s in (world["single"], world["sharded"]):
        s.settle()

    # every tenant ends in the same state, as every API answer shows it
    for t in ts:
        a, b = both(world, lambda s: tenant_state(s, t))
    # and the flows really happened: paid subscriptions, declines, upgrades, usage
    subs = [tenant_state(world["sharded"], t)["/subscription"][1] for t in payers]
    assert sum(1 for x in subs if x and x[0]["status"] == "active") >= len(payers) - 2, subs
    assert {x[0]["plan"] for x in subs if x} >= {"professional", "enterprise"}, subs
    used = tenant_state(world["sharded"], ts[2])["check"][0]
    single_used = world["cluster"].sql("SELECT current FROM billing.check_limit(%s, 'signatures', 1)", (ts[2],))[0][0]
    assert used[0]["current"] == single_used > 0
    # usage counted once per key: the committed acts' distinct keys, per tenant
    for t in ts:
        expected = len({k for tt, k, commit in acts if tt == t and commit})
        shard = world["shards"].shard_of(t)
        assert shard.sql("SELECT count(*) FROM billing.usage_events WHERE tenant_id = %s AND metric = 'signatures'",
                         (t,))[0][0] == expected
        # and nowhere else
        for other in world["shards"].shards:
            if other is not shard:
                assert other.sql("SELECT count(*) FROM billing.tenants WHERE tenant_id = %s", (t,))[0][0] == 0
    # each shard's audit chain verifies
    for c in world["shards"].shards:
        assert c.sql("SELECT bool_and(ok) FROM billing.verify_audit_chain()")[0][0] is not False


def test_rate_limiting_on_the_router(world):
    """db-pre-request on the router: the same token buckets, the same 429."""
    t = tenants(world)[0]

    def burst(s):
        out = []
        for _ in range(30):
            r = s.limited.get("/rpc/config", claims=tenant_claims(t))
            out.append(r.status)
        return out
    for s in (world["single"], world["sharded"]):
        out = burst(s)
        # a burst of one second's worth (rate_limit_tenant = 20), then refused;
        # how many refill meanwhile depends on each one's speed, not asserted
        assert out[:20] == [200] * 20 and 429 in out, (s.name, out)
    r = world["sharded"].limited.get("/rpc/config", claims=tenant_claims(t))
    assert r.status == 429 and r.body["code"] == "QB429" and r.headers["Retry-After"]
    assert world["shards"].router.sql("SELECT limited > 0 FROM router.rate_limit_stats()")[0][0]


# ---- webhooks whose owner no shard knows yet; reconciliation's hand-over --

def deliver_event(system, ev):
    body, header = signed(ev, SECRET)
    return system.api.post("/rpc/stripe_webhook", body=body,
                           headers={"Content-Type": "application/json", "Stripe-Signature": header})


def event_states(world, event_id):
    return {f"s{i}": (c.sql("SELECT state FROM billing.webhook_events WHERE stripe_event_id = %s", (event_id,))
                      or [(None,)])[0][0]
            for i, c in enumerate(world["shards"].shards)}


def test_webhook_of_a_customer_no_shard_knows_yet(world):
    """Stored by every shard, applied by the one whose tenant the customer
    turns out to be, when it learns of it -- never by two, never lost."""
    sharded = world["sharded"]
    fake = sharded.fake
    t = world["shards"].tenants_per_shard("late", 1)["s2"][0]
    sharded.platform_call("upsert_tenant", t, "Late AG", "billing@late.example")
    with fake.lock:
        cus = fake.handle("POST", "/v1/customers", {"email": "billing@late.example", "metadata": {"tenant_id": t}})
        pi = fake._payment_intent(4900, "usd", cus["id"], "pack", {}, None)
        fake._charge(pi, "pm_card_visa")
    events = {ev["type"]: ev for ev in fake.events if ev["data"]["object"].get("customer") == cus["id"]
              or ev["data"]["object"].get("id") == cus["id"]}
    charge_ev = events["charge.succeeded"]
    # the charge first: no shard knows its customer, so every shard stores it
    r = deliver_event(sharded, charge_ev)
    assert r.status == 200 and r.body["duplicate"] is False, r.body
    sharded.settle()
    assert set(event_states(world, charge_ev["id"]).values()) == {"ignored"}
    # delivered again: a duplicate everywhere
    r = deliver_event(sharded, charge_ev)
    assert r.status == 200 and r.body["duplicate"] is True, r.body
    # the customer's own event names the tenant: its shard links it and applies what waited
    r = deliver_event(sharded, events["customer.created"])
    assert r.status == 200 and r.body["duplicate"] is False
    sharded.settle()
    states = event_states(world, charge_ev["id"])
    assert states.pop("s2") == "applied", event_states(world, charge_ev["id"])
    assert set(states.values()) == {"ignored"}
    # the next event of that customer goes to s2 only, and the router keeps its tenant
    r = deliver_event(sharded, events["payment_intent.succeeded"])
    assert r.status == 200
    states = event_states(world, events["payment_intent.succeeded"]["id"])
    assert states["s2"] is not None and [v for k, v in states.items() if k != "s2"] == [None] * (SHARDS - 1)
    assert world["shards"].router.sql("SELECT tenant_id FROM router.customer_tenants WHERE stripe_customer_id = %s",
                                      (cus["id"],)) == [(t,)]
    # a forged delivery is refused as one database refuses it, and counted on a shard
    r = sharded.api.post("/rpc/stripe_webhook", body=json.dumps(charge_ev),
                         headers={"Content-Type": "application/json", "Stripe-Signature": "t=1,v1=00"})
    r1 = world["single"].api.post("/rpc/stripe_webhook", body=json.dumps(charge_ev),
                                  headers={"Content-Type": "application/json", "Stripe-Signature": "t=1,v1=00"})
    assert (r.status, r.body) == (r1.status, r1.body) and r.status == 400


def test_reconciliation_hands_events_to_their_shard(world):
    """One shard lists Stripe's events for the account; what it finds for
    another shard's tenant is handed over once."""
    shards = world["shards"]
    t = shards.tenants_per_shard("recon", 1)["s3"][0]
    world["sharded"].platform_call("upsert_tenant", t, "Recon AG", "billing@recon.example")
    ev = {"id": "evt_reconcile0000001", "object": "event", "api_version": "2024-06-20", "created": int(time.time()),
          "livemode": False, "type": "customer.created",
          "data": {"object": {"id": "cus_recon000001", "object": "customer", "email": "billing@recon.example",
                              "metadata": {"tenant_id": t}, "created": int(time.time()), "livemode": False}}}
    s0 = shards.shards[0]
    s0.sql("INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, api_version, stripe_created, "
           "payload, source) VALUES (%s, %s, false, %s, to_timestamp(%s), %s::json, 'reconcile')",
           (ev["id"], ev["type"], ev["api_version"], ev["created"], json.dumps(ev)))
    world["sharded"].settle()
    assert event_states(world, ev["id"])["s0"] == "ignored"
    assert shards.router.sql("SELECT router.reconcile_forward()")[0][0] == 1
    assert shards.router.sql("SELECT router.reconcile_forward()")[0][0] == 0     # once
    world["sharded"].settle()
    states = event_states(world, ev["id"])
    assert states == {"s0": "ignored", "s1": None, "s2": None, "s3": "applied"}, states
    assert shards.shards[3].sql("SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = %s", (t,)) == \
        [("cus_recon000001",)]
    assert s0.sql("SELECT shards FROM billing_shard.forwarded_events WHERE stripe_event_id = %s", (ev["id"],)) == \
        [(["s3"],)]


# ---- operators see one system ---------------------------------------------

def test_operators_see_every_shard(world):
    shards = world["shards"]
    router = shards.router
    rows = router.sql("SELECT shard_name, up, health, worker_alive FROM router.shard_status")
    assert rows == [(f"s{i}", True, "ok", True) for i in range(SHARDS)], rows
    assert router.sql("SELECT count(*), bool_and(alive) FROM router.worker_status WHERE up") == [(SHARDS, True)]
    # a parked event on one shard shows with its shard
    shards.shards[1].sql("INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, stripe_created, "
                         "payload, state, attempts, last_error) VALUES ('evt_parked00000001', 'invoice.paid', false, "
                         "now(), '{}', 'needs_review', 5, 'boom')")
    assert router.sql("SELECT shard, stripe_event_id, last_error FROM router.failed_webhooks") == \
        [("s1", "evt_parked00000001", "boom")]
    # the same from Prometheus: one exporter on the router, a series per shard
    m = shard_metrics(router)
    assert [value(m, "qes_billing_shard_up", shard=f"s{i}") for i in range(SHARDS)] == [1] * SHARDS
    assert [value(m, "qes_billing_shard_webhooks_parked", shard=f"s{i}") for i in range(SHARDS)] == [0, 1, 0, 0]
    assert sum(value(m, "qes_billing_shard_partitions", shard=f"s{i}") for i in range(SHARDS)) == PARTITIONS
    api = world["sharded"].api
    h = api.get("/rpc/health", claims=ADMIN)
    assert h.status == 200 and h.body["webhooks_parked"] == 1 and h.body["status"] == "ok", h.body
    shards.shards[1].sql("DELETE FROM billing.webhook_events WHERE stripe_event_id = 'evt_parked00000001'")
    # health has the single database's keys, added up, and each shard
    h, h1 = api.get("/rpc/health"), world["single"].api.get("/rpc/health")
    assert h.status == h1.status == 200 and set(h.body) - {"shards"} == set(h1.body)
    assert [s["shard"] for s in h.body["shards"]] == [f"s{i}" for i in range(SHARDS)]
    # each shard's audit chain, verified from the router
    v = router.sql("SELECT shard, up, verification FROM router.audit_verification ORDER BY 1")
    assert [x[:2] for x in v] == [(f"s{i}", True) for i in range(SHARDS)] and all(x[2] for x in v), v
    # the operators' views are for operators only
    with router.connect(user="authenticator", autocommit=True) as c:
        c.execute("SET ROLE qes_tenant")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT * FROM router.shard_status")


# ---- a shard stops under load ---------------------------------------------

def test_a_shard_down_under_load(world):
    """Only the down shard's tenants get errors -- 503 with Retry-After,
    naming the shard -- the others none; nothing is lost when it returns."""
    shards = world["shards"]
    sharded = world["sharded"]
    per = shards.tenants_per_shard("load", 2)
    for ts in per.values():
        for t in ts:
            sharded.platform_call("upsert_tenant", t, f"Load {t}", f"billing@{t}.example")
    down = shards.shards[1]
    stop = threading.Event()
    results = {t: [] for ts in per.values() for t in ts}     # (phase, key, outcome)
    phase = {"now": "before"}

    def load(tenant_list):
        api = PostgREST(shards.router.dsn(user="authenticator"))
        conn = psycopg.connect(shards.router.dsn(user="authenticator"), autocommit=True)
        conn.execute("SET ROLE qes_app")
        k = 0
        try:
            while not stop.is_set():
                for t in tenant_list:
                    key = f"load-{k}"
                    ph = phase["now"]
                    try:
                        conn.execute("SELECT * FROM router.record_usage(%s, 'api_calls', 1, %s)", (t, key))
                        out = "ok"
                    except psycopg.Error as e:
                        out = ("sql", e.diag.sqlstate, e.diag.message_primary)
                    r = api.get("/usage", claims=tenant_claims(t))
                    if phase["now"] != ph:
                        ph = "changing"         # began in one phase, ended in another
                    results[t].append((ph, key, out, r.status, r.headers.get("Retry-After"),
                                       (r.body or {}).get("code") if r.status != 200 else None))
                k += 1
        finally:
            api.close()
            conn.close()

    threads = [threading.Thread(target=load, args=(ts,)) for ts in per.values()]
    for th in threads:
        th.start()
    time.sleep(1.5)
    phase["now"] = "stopping"        # calls in flight while it stops may go either way
    down._run("pg_ctl", "-D", down.datadir, "-m", "fast", "-w", "stop")
    phase["now"] = "down"
    time.sleep(5)
    # while it is down: health says so, the others answer
    h = sharded.api.get("/rpc/health")
    assert h.status == 503 and {s["shard"]: s["status"] for s in h.body["shards"]} == \
        {"s0": "ok", "s1": "down", "s2": "ok", "s3": "ok"}, h.body
    assert shards.router.sql("SELECT shard_name, up FROM router.shard_status") == \
        [("s0", True), ("s1", False), ("s2", True), ("s3", True)]
    # and to Prometheus: the down shard's series say so, the others' go on
    m = shard_metrics(shards.router)
    assert [value(m, "qes_billing_shard_up", shard=f"s{i}") for i in range(SHARDS)] == [1, 0, 1, 1]
    assert [value(m, "qes_billing_shard_healthy", shard=f"s{i}") for i in range(SHARDS)] == [1, 0, 1, 1]
    # a webhook for a tenant of the down shard: 503, so Stripe delivers it again
    t1 = per["s1"][0]
    ev = {"id": "evt_whiledown000001", "object": "event", "api_version": "2024-06-20", "created": int(time.time()),
          "livemode": False, "type": "customer.created",
          "data": {"object": {"id": "cus_whiledown0001", "object": "customer", "email": f"billing@{t1}.example",
                              "metadata": {"tenant_id": t1}, "created": int(time.time()), "livemode": False}}}
    r = deliver_event(sharded, ev)
    assert r.status == 503 and r.headers.get("Retry-After") == "5" and "s1" in r.body["message"], (r.status, r.body)
    phase["now"] = "starting"
    down._run("pg_ctl", "-D", down.datadir, "-l", down.logfile, "-w", "start")
    phase["now"] = "back"
    time.sleep(2.5)
    stop.set()
    for th in threads:
        th.join(30)

    on_down = set(per["s1"])
    for t, rows in results.items():
        failures = [x for x in rows if x[2] != "ok" or x[3] != 200]
        if t not in on_down:
            assert failures == [], (t, failures[:5])
            continue
        # its tenants: answered before and after, refused while down with a clear status
        assert [x for x in failures if x[0] == "before"] == [], failures[:5]
        down_rows = [x for x in rows if x[0] == "down"]
        assert down_rows and all(x[2] != "ok" and x[3] == 503 for x in down_rows), down_rows[:5]
        for x in failures:
            assert x[2] == "ok" or (x[2][1] == "PGRST" and "billing shard s1 is not available" in x[2][2]), x
            assert x[3] == 200 or (x[3] == 503 and x[4] == "5" and x[5] == "QB503"), x
        assert any(x[2] == "ok" and x[3] == 200 for x in rows if x[0] == "back"), rows[-5:]
    # nothing lost: every usage answered ok is there once; the refused ones are
    # recorded once when the platform retries them with their keys
    for t, rows in results.items():
        shard = shards.shard_of(t)
        ok_keys = {x[1] for x in rows if x[2] == "ok"}
        refused = {x[1] for x in rows if x[2] != "ok"} - ok_keys
        got = {r[0] for r in shard.sql("SELECT idempotency_key FROM billing.usage_events WHERE tenant_id = %s", (t,))}
        assert ok_keys <= got, (t, ok_keys - got)
        for key in refused:
            res = sharded.platform_call("record_usage", t, "api_calls", 1, key)
            assert isinstance(res, list), res
        total = shard.sql("SELECT count(*), count(DISTINCT idempotency_key) FROM billing.usage_events "
                          "WHERE tenant_id = %s", (t,))[0]
        assert total[0] == total[1] == len(ok_keys | refused)
    # Stripe delivers the webhook again: stored and applied now
    r = deliver_event(sharded, ev)
    assert r.status == 200 and r.body["duplicate"] is False, r.body
    sharded.settle()
    assert down.sql("SELECT state FROM billing.webhook_events WHERE stripe_event_id = %s", (ev["id"],)) == [("applied",)]
    assert down.wait_until("SELECT alive FROM billing.worker_status")
    assert sharded.api.get("/rpc/health").status == 200
