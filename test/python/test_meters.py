"""Usage billed through Stripe Billing Meters (sql/install/94_meters.sql).

Request shapes against stripe-mock (setup's meters and metered prices, meter
events, adjustments, event summaries: every one is a request Stripe
accepts); behaviour against the stateful fake (fake_stripe.py): setup found
again, each usage row reaching Stripe exactly once through crashes, lost
answers, 429s, repeats and expired idempotency keys (Stripe's identifier
dedup), rolled-back usage never sent, corrections inside and after Stripe's
cancel window, asynchronous errors found by the comparison of Stripe's
event summaries with the local sums.

Every cluster runs at a fixed date through the billing clock, the fake's
clock with it (2027-06-15 19:00 UTC, in a period from June 1)."""
import contextlib
import random
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from conftest import TEST_KEYS, amcheck_and_stop
from fake_stripe import FakeStripe
from pgcluster import Cluster
from test_stripe_worker import setup_command

AT = datetime(2027, 6, 15, 19, 0, tzinfo=timezone.utc)
PERIOD = (datetime(2027, 6, 1, tzinfo=timezone.utc), datetime(2027, 7, 1, tzinfo=timezone.utc))
OPEN = "state IN ('waiting', 'pending', 'in_flight')"

# the request kinds of usage billed through meters, every one sent to
# stripe-mock by test_every_meter_request_is_valid_for_stripe (and counted by
# test_stripe_worker's check that every kind the SQL code queues is proven)
METER_KINDS = {"meter.setup.list", "meter.setup.create", "meter.setup.prices.list", "meter.setup.price.create",
               "meter.event", "meter.cancel", "meter.summary"}

METERED = """
INSERT INTO billing.metered_prices (price_key, plan_id, metric, billing_interval, included, unit_amount_decimal)
VALUES ('professional_signatures_overage_monthly', 'professional', 'signatures', 'month', 100, 50),
       ('professional_storage_monthly', 'professional', 'storage', 'month', 10737418240, 0.000001),
       ('enterprise_signatures_monthly', 'enterprise', 'signatures', 'month', 0, 25)"""


def cluster(name, base, **conf):
    settings = {"qes_billing.stripe_api_base": f"'{base}'", "qes_billing.retry_base_delay": "'20ms'",
                "qes_billing.retry_max_delay": "'300ms'", "qes_billing.request_timeout": "'1s'",
                "qes_billing.max_attempts": "40", "qes_billing.worker_naptime": "'200ms'"}
    settings.update(conf)
    c = Cluster(name, env=TEST_KEYS, conf=settings).start()
    assert c.wait_until("SELECT alive FROM billing.worker_status"), c.log()
    c.set_clock(AT)
    return c


def drain(pg, timeout=90):
    assert pg.wait_until(f"SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE {OPEN})", timeout), \
        pg.sql(f"SELECT request_id, kind, state, attempts, error FROM billing.stripe_requests WHERE {OPEN} LIMIT 5")


def subscribe(pg, fake, tenant, plan, customer=None):
    """A tenant with a Stripe customer (in the fake unless given) and a live
    subscription of the plan whose period is June 2027."""
    pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (tenant, tenant.title(), f"{tenant}@example.test"))
    if customer is None:
        customer = fake.handle("POST", "/v1/customers", {"email": f"{tenant}@example.test"})["id"]
    pg.sql("UPDATE billing.tenants SET stripe_customer_id = %s WHERE tenant_id = %s", (customer, tenant))
    pg.sql("""INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, stripe_subscription_id,
                                                 current_period_start, current_period_end, billing_cycle_anchor)
              VALUES (%s, %s, 'month', 'active', %s, %s, %s, %s)""",
           (tenant, plan, "sub_" + tenant, PERIOD[0], PERIOD[1], PERIOD[0]))
    return customer


def stripe_value(pg, fake, tenant, metric):
    customer, meter = pg.sql("SELECT t.stripe_customer_id, m.stripe_meter_id FROM billing.tenants t, billing.meters m "
                             "WHERE t.tenant_id = %s AND m.metric = %s", (tenant, metric))[0]
    return fake.meter_value(meter, customer, int(PERIOD[0].timestamp()), int(PERIOD[1].timestamp()))


def local_value(pg, tenant, metric):
    """What the period's usage table says Stripe should bill."""
    if metric == "storage":
        rows = pg.sql("SELECT quantity FROM billing.usage_events WHERE tenant_id = %s AND metric = %s "
                      "AND period_start = %s ORDER BY occurred_at DESC, recorded_at DESC LIMIT 1",
                      (tenant, metric, PERIOD[0]))
        return rows[0][0] if rows else 0
    return pg.sql("SELECT coalesce(sum(quantity), 0) FROM billing.usage_events WHERE tenant_id = %s AND metric = %s "
                  "AND period_start = %s", (tenant, metric, PERIOD[0]))[0][0]


def pass_and_drain(pg):
    pg.sql("SELECT billing.meter_pass_now()")
    drain(pg)


# ---- stripe-mock: every request shape is one Stripe accepts --------------------------

def test_every_meter_request_is_valid_for_stripe(stripe_mock):
    pg = cluster("meters_mock", stripe_mock)
    try:
        pg.sql(METERED)
        pg.sql("UPDATE billing.plans SET stripe_product_id = 'prod_NWjs8kKbJWmuuc' WHERE plan_id = 'professional'")
        r = setup_command(pg, "--setup-meters")
        assert r.returncode == 0, r.stdout + r.stderr
        # stripe-mock answers with its fixtures: take its meter and price ids
        assert pg.sql("SELECT count(*) FROM billing.meters WHERE stripe_meter_id IS NOT NULL")[0][0] == 2
        assert pg.sql("SELECT count(*) FROM billing.metered_prices WHERE stripe_price_id IS NOT NULL")[0][0] == 3
        subscribe(pg, None, "mock_t", "professional", customer="cus_NeZwdNtLEOXuvB")
        pg.sql("SELECT billing.record_usage('mock_t', 'signatures', 3, 'm1')")
        pg.sql("SELECT billing.record_usage('mock_t', 'storage', 5000, 'm2')")
        assert pg.sql("SELECT billing.meter_pass_now()")[0][0] == 2
        drain(pg)
        assert pg.sql("SELECT state, count(*) FROM billing.meter_events GROUP BY 1") == [("delivered", 2)]
        assert "being cancelled" in pg.sql("SELECT billing.void_usage('mock_t', 'm1', 'test')")[0][0]
        drain(pg)
        pg.sql("SELECT billing.meter_reconcile()")
        drain(pg)
        kinds = {k for (k,) in pg.sql("SELECT DISTINCT kind FROM billing.stripe_requests WHERE state = 'succeeded'")}
        assert kinds == METER_KINDS, kinds
        failed = pg.sql("SELECT kind, error FROM billing.stripe_requests WHERE state = 'failed'")
        assert failed == [], failed
        # the form of a tiered metered price, as stripe-mock accepted it
        form = pg.sql("SELECT billing.stripe_form(params) FROM billing.stripe_requests "
                      "WHERE kind = 'meter.setup.price.create' AND subject ->> 'price_key' = "
                      "'professional_signatures_overage_monthly'")[0][0]
        for part in ("recurring%5Busage_type%5D=metered", "recurring%5Bmeter%5D=m", "tiers_mode=graduated",
                     "tiers%5B0%5D%5Bup_to%5D=100", "tiers%5B1%5D%5Bup_to%5D=inf",
                     "tiers%5B1%5D%5Bunit_amount_decimal%5D=50"):
            assert part in form, (part, form)
    finally:
        amcheck_and_stop(pg)


# ---- the stateful fake --------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake():
    f = FakeStripe(seed=23, timeout_s=1.2)
    f.base = f.serve()
    f.set_clock(AT)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def pg(fake):
    c = cluster("meters", fake.base)
    yield c
    amcheck_and_stop(c)


@pytest.fixture
def billed(pg, fake):
    """The metered prices set up in Stripe (test_setup_meters_once's work,
    made here when that test did not run first)."""
    if pg.sql("SELECT count(*) FROM billing.metered_prices WHERE stripe_price_id IS NOT NULL")[0][0] < 3:
        if pg.sql("SELECT count(*) FROM billing.metered_prices")[0][0] == 0:
            pg.sql(METERED)
        r = setup_command(pg, "--setup-products", "--setup-meters")
        assert r.returncode == 0, r.stdout + r.stderr
    return pg


def test_off_by_default(pg):
    # no metered price: nothing is billed, the tick schedules nothing
    assert pg.sql("SELECT billing.meter_tick()") == [(None,)]
    assert pg.sql("SELECT count(*) FROM billing.meters") == [(0,)]


def test_setup_meters_once(pg, fake):
    pg.sql(METERED)
    r = setup_command(pg, "--setup-products", "--setup-meters")
    assert r.returncode == 0, r.stdout + r.stderr
    meters = {m["event_name"]: m["default_aggregation"]["formula"] for m in fake.of_type("billing.meter")}
    assert meters == {"qes_signatures": "sum", "qes_storage": "last"}
    prices = {p["lookup_key"]: p for p in fake.of_type("price") if p["recurring"]
              and p["recurring"].get("usage_type") == "metered"}
    assert set(prices) == {"professional_signatures_overage_monthly", "professional_storage_monthly",
                           "enterprise_signatures_monthly"}
    over = prices["professional_signatures_overage_monthly"]
    assert over["tiers_mode"] == "graduated" and over["tiers"][0] == {"up_to": "100", "unit_amount": "0"}
    assert over["tiers"][1]["unit_amount_decimal"] == "50.000000"
    assert prices["enterprise_signatures_monthly"]["unit_amount_decimal"] == "25.000000"
    creates = dict(fake.creates)
    r = setup_command(pg, "--setup-meters")
    assert r.returncode == 0 and fake.creates == creates, (r.stdout, fake.creates)
    assert pg.sql("SELECT count(*) FROM billing.metered_prices WHERE stripe_price_id IS NULL") == [(0,)]


def test_usage_reaches_stripe_once_and_rollbacks_never(billed, fake):
    pg = billed
    subscribe(pg, fake, "pro_a", "professional")
    for i in range(5):
        pg.sql("SELECT billing.record_usage('pro_a', 'signatures', 2, %s)", (f"a{i}",))
    # a transaction that rolls back: never sent
    with pg.connect() as c:
        c.execute("SELECT billing.record_usage('pro_a', 'signatures', 1000, 'rolled-back')")
        c.rollback()
    # a repeated key: counted once
    pg.sql("SELECT billing.record_usage('pro_a', 'signatures', 2, 'a0')")
    assert pg.sql("SELECT billing.meter_pass_now()") == [(1,)]
    drain(pg)
    assert stripe_value(pg, fake, "pro_a", "signatures") == 10 == local_value(pg, "pro_a", "signatures")
    # a second pass sends only what is new; the same rows never again
    assert pg.sql("SELECT billing.meter_pass_now()") == [(0,)]
    pg.sql("SELECT billing.record_usage('pro_a', 'signatures', 1, 'a5')")
    pass_and_drain(pg)
    assert stripe_value(pg, fake, "pro_a", "signatures") == 11
    assert pg.sql("SELECT value, usage_rows, state FROM billing.meter_events WHERE tenant_id = 'pro_a' "
                  "ORDER BY meter_event_id") == [(10, 5, "delivered"), (1, 1, "delivered")]
    # what the tenant sees: billable beyond the 100 included, what Stripe has
    assert pg.sql("SELECT metric, used, included, billable, amount, sent FROM billing.usage_billable('pro_a') "
                  "WHERE metric = 'signatures'") == [("signatures", 11, 100, 0, 0, 11)]


def test_gauge_bills_the_last_value(billed, fake):
    pg = billed
    subscribe(pg, fake, "pro_g", "professional")
    for i, v in enumerate((5_000, 9_000, 7_000)):
        pg.sql("SELECT billing.record_usage('pro_g', 'storage', %s, %s, NULL, %s)",
               (v, f"g{i}", AT + timedelta(minutes=i)))
    pass_and_drain(pg)
    assert stripe_value(pg, fake, "pro_g", "storage") == 7_000 == local_value(pg, "pro_g", "storage")


def test_dedup_by_identifier_when_the_key_expired(billed, fake):
    pg = billed
    subscribe(pg, fake, "ent_d", "enterprise")
    pg.sql("SELECT billing.record_usage('ent_d', 'signatures', 4, 'd1')")
    pass_and_drain(pg)
    e = pg.sql("SELECT tenant_id, meter_event_id FROM billing.meter_events WHERE tenant_id = 'ent_d'")[0]
    # the answer was lost, the key expired: the same identifier sent again
    fake.meter_forget_keys = True
    try:
        repeats = fake.meter_repeats
        pg.sql("UPDATE billing.meter_events SET state = 'failed' WHERE tenant_id = %s AND meter_event_id = %s", e)
        pg.sql("SELECT billing.meter_send(%s, %s, 1)", e)
        drain(pg)
    finally:
        fake.meter_forget_keys = False
    assert fake.meter_repeats == repeats + 1
    assert pg.sql("SELECT state FROM billing.meter_events WHERE tenant_id = %s AND meter_event_id = %s", e) == \
        [("delivered",)]
    assert stripe_value(pg, fake, "ent_d", "signatures") == 4


def test_void_inside_and_after_the_cancel_window(billed, fake):
    pg = billed
    subscribe(pg, fake, "ent_v", "enterprise")
    for i, q in enumerate((3, 4, 5)):
        pg.sql("SELECT billing.record_usage('ent_v', 'signatures', %s, %s)", (q, f"v{i}"))
    pass_and_drain(pg)
    assert stripe_value(pg, fake, "ent_v", "signatures") == 12
    done = pg.sql("SELECT billing.void_usage('ent_v', 'v1', 'signature failed on our side')")[0][0]
    assert "being cancelled" in done, done
    drain(pg)
    pass_and_drain(pg)          # the event's other rows again, in a new event
    assert stripe_value(pg, fake, "ent_v", "signatures") == 8 == local_value(pg, "ent_v", "signatures")
    assert pg.sql("SELECT state, value FROM billing.meter_events WHERE tenant_id = 'ent_v' ORDER BY meter_event_id") \
        == [("cancelled", 12), ("delivered", 8)]
    # after Stripe's window: voided locally, billed in Stripe, the audit says to credit
    pg.sql("UPDATE billing.meter_events SET delivered_at = delivered_at - interval '2 days' WHERE tenant_id = 'ent_v'")
    done = pg.sql("SELECT billing.void_usage('ent_v', 'v2', 'late correction')")[0][0]
    assert "credit the tenant by hand" in done, done
    assert pg.sql("SELECT details ->> 'done' FROM billing.audit_log WHERE action = 'usage.voided' "
                  "AND details ->> 'idempotency_key' = 'v2'") == [(done,)]
    # bad input: a clear error, nothing changed
    for args, state in ((("ent_v", "nope", "x"), "P0002"), (("ent_v", "v0", ""), "22023")):
        with pytest.raises(psycopg.Error) as e:
            pg.sql("SELECT billing.void_usage(%s, %s, %s)", args)
        assert e.value.sqlstate == state
    assert local_value(pg, "ent_v", "signatures") == 3


def test_async_error_is_found_by_the_comparison(billed, fake):
    pg = billed
    # a customer Stripe does not know: accepted, reported as an error later
    subscribe(pg, fake, "ent_x", "enterprise", customer="cus_unknownToStripe")
    pg.sql("SELECT billing.record_usage('ent_x', 'signatures', 6, 'x1')")
    pass_and_drain(pg)
    assert fake.meter_errors and fake.meter_errors[-1]["error"] == "customer_not_found"
    run = pg.sql("SELECT billing.meter_reconcile('ent_x')")[0][0]
    drain(pg)
    rows = pg.sql("SELECT object, before ->> 'stripe_value', after ->> 'local_value', after ->> 'repair' "
                  "FROM billing.drift_report WHERE run_id = %s", (run,))
    assert len(rows) == 1 and rows[0][0] == "meter_usage" and float(rows[0][1]) == 0 and rows[0][2] == "6", rows
    assert pg.sql("SELECT finished_at IS NOT NULL, repairs FROM billing.reconcile_runs WHERE run_id = %s", (run,)) \
        == [(True, 1)]


def test_failed_sends_are_repaired_by_the_comparison(billed, fake):
    pg = billed
    subscribe(pg, fake, "ent_r", "enterprise")
    pg.sql("SELECT billing.record_usage('ent_r', 'signatures', 7, 'r1')")
    fake.fault_rate = 1.0          # every attempt fails until the request gives up
    try:
        pg.sql("ALTER SYSTEM SET qes_billing.max_attempts = 2")
        pg.sql("ALTER SYSTEM SET qes_billing.idempotency_window = '1s'")
        pg.sql("SELECT pg_reload_conf()")
        time.sleep(0.3)
        pass_and_drain(pg)
    finally:
        fake.fault_rate = 0.0
        pg.sql("ALTER SYSTEM RESET qes_billing.max_attempts")
        pg.sql("ALTER SYSTEM RESET qes_billing.idempotency_window")
        pg.sql("SELECT pg_reload_conf()")
        time.sleep(0.3)
    state = pg.sql("SELECT state FROM billing.meter_events WHERE tenant_id = 'ent_r'")[0][0]
    before = stripe_value(pg, fake, "ent_r", "signatures")
    run = pg.sql("SELECT billing.meter_reconcile('ent_r')")[0][0]
    drain(pg)
    drain(pg)
    after = stripe_value(pg, fake, "ent_r", "signatures")
    assert after == 7, (state, before, after)
    if state == "failed" and before == 0:
        assert pg.sql("SELECT after ->> 'repair' FROM billing.drift_report WHERE run_id = %s", (run,)) == \
            [("failed meter events sent again with their identifiers",)]


def test_chaos_crashes_lost_answers_repeats(billed, fake):
    pg = billed
    """Many tenants record usage (with repeated keys and rolled-back
    transactions) while 30 % of Stripe's answers are faults (429, 5xx
    before and after acting, timeouts, dropped connections after acting),
    idempotency keys expire at times (only Stripe's identifier dedup is
    left) and the server crashes (immediate stop) four times.  At the end
    Stripe's sums equal the local sums for every tenant and meter."""
    rnd = random.Random(5)
    tenants = [f"chaos_{i}" for i in range(12)]
    for i, t in enumerate(tenants):
        subscribe(pg, fake, t, "professional" if i % 2 else "enterprise")
    faults_before = dict(fake.faults)
    repeats_before = fake.meter_repeats
    replays_before = sum(1 for r in fake.requests if r[1] == "/v1/billing/meter_events")
    pg.sql("UPDATE billing.meter_state SET pass_interval = '1 second', next_pass_at = now()")
    fake.fault_rate = 0.3
    recorded = rolled_back = repeated = crashes = 0
    try:
        for rnd_i in range(8):
            with pg.connect() as c:
                for _ in range(40):
                    t = rnd.choice(tenants)
                    metric = "storage" if rnd.random() < 0.2 else "signatures"
                    q = rnd.randint(1, 9) if metric == "signatures" else rnd.randint(1, 10**9)
                    key = f"k{rnd.randint(0, 400)}"
                    if rnd.random() < 0.1:
                        c.execute("SELECT billing.record_usage(%s, %s, %s, 'rb-' || %s)", (t, metric, q, key))
                        c.rollback()
                        rolled_back += 1
                        continue
                    try:
                        r = c.execute("SELECT duplicate FROM billing.record_usage(%s, %s, %s, %s)",
                                      (t, metric, q, key + metric)).fetchone()
                        c.commit()
                        repeated += r[0]
                        recorded += not r[0]
                    except psycopg.Error:
                        c.rollback()       # the same key for other usage: refused
                        repeated += 1
            fake.meter_forget_keys = rnd_i % 3 == 1
            time.sleep(0.6)
            if rnd_i % 2 == 1:
                pg._run("pg_ctl", "-D", pg.datadir, "-m", "immediate", "-w", "stop")
                pg._run("pg_ctl", "-D", pg.datadir, "-l", pg.logfile, "-w", "start")
                crashes += 1
                assert pg.wait_until("SELECT alive FROM billing.worker_status"), pg.log()
    finally:
        fake.fault_rate = 0.0
        fake.meter_forget_keys = False
    # the rest goes out; then the comparison repairs what failed for good
    for _ in range(3):
        pg.sql("SELECT billing.meter_pass_now()")
        drain(pg, 120)
    run = pg.sql("SELECT billing.meter_reconcile()")[0][0]
    drain(pg, 120)
    drain(pg, 120)
    differences = []
    billable = pg.sql("""SELECT s.tenant_id, mp.metric FROM billing.subscriptions s
                           JOIN billing.metered_prices mp ON mp.plan_id = s.plan_id AND mp.active
                          WHERE s.tenant_id LIKE 'chaos_%' ORDER BY 1, 2""")
    assert len(billable) == 18      # Professional: signatures and storage; Enterprise: signatures
    for t, metric in billable:
            s, l = stripe_value(pg, fake, t, metric), local_value(pg, t, metric)
            if s != l:
                differences.append((t, metric, s, l))
    faults = {k: v - faults_before.get(k, 0) for k, v in fake.faults.items()}
    sent = sum(1 for r in fake.requests if r[1] == "/v1/billing/meter_events") - replays_before
    repairs = pg.sql("SELECT after ->> 'repair', count(*) FROM billing.drift_repairs WHERE run_id = %s GROUP BY 1",
                     (run,))
    found = sum(n for _, n in repairs)
    failed = pg.sql("SELECT regexp_replace(error ->> 'message', 'qes_[0-9a-f]+', 'qes_...'), count(*) "
                    "FROM billing.stripe_requests "
                    "WHERE kind = 'meter.event' AND state = 'failed' AND tenant_id LIKE 'chaos_%' GROUP BY 1")
    events = pg.sql("SELECT count(*), coalesce(sum(usage_rows), 0) FROM billing.meter_events "
                    "WHERE tenant_id LIKE 'chaos_%'")[0]
    print(f"\nchaos: {recorded} usage rows recorded, {repeated} repeats refused or deduplicated, "
          f"{rolled_back} rolled back; {events[0]} meter events carrying {events[1]} rows; "
          f"{sent} meter-event requests, faults {faults}; "
          f"lost answers (acted, answer lost) {faults.get('500_after', 0) + faults.get('drop_after', 0)}; "
          f"identifier repeats refused by Stripe {fake.meter_repeats - repeats_before}; {crashes} crashes; "
          f"meter-event requests failed for good {failed} (each resolved: Stripe's identifier refusal counts as "
          f"delivered, anything else is the comparison's); differences found by the comparison {found} {repairs}; differences after it "
          f"{len(differences)}")
    assert differences == [], differences
    assert events[1] == pg.sql("""SELECT count(*) FROM billing.usage_events u JOIN billing.subscriptions s USING (tenant_id)
                                    JOIN billing.metered_prices mp ON mp.plan_id = s.plan_id AND mp.metric = u.metric
                                   WHERE u.tenant_id LIKE 'chaos_%'""")[0][0]
    assert crashes == 4 and recorded > 100 and faults.get("drop_after", 0) + faults.get("500_after", 0) > 0


# ---- subscriptions carry the metered items -------------------------------------------------

def test_subscriptions_get_and_move_their_metered_items():
    """Through the API: a Professional subscription gets the plan's metered
    items; an upgrade to Enterprise deletes them and adds Enterprise's.  Both
    clocks stay on the real clock here, as in test_stripe_worker (the worker
    stamps Stripe's answers with its real claim time); nothing asserted
    depends on the day."""
    from postgrest import PostgREST
    from conftest import tenant_claims
    from test_stripe_worker import deliver, sub
    f = FakeStripe(seed=29, timeout_s=1.2)
    f.base = f.serve()
    pg = Cluster("meters_items", env=TEST_KEYS,
                 conf={"qes_billing.stripe_api_base": f"'{f.base}'", "qes_billing.retry_base_delay": "'20ms'",
                       "qes_billing.worker_naptime": "'200ms'"}).start()
    api = PostgREST(pg.dsn(user="authenticator"))
    api.delivered = 0
    try:
        assert pg.wait_until("SELECT alive FROM billing.worker_status"), pg.log()
        pg.sql(METERED)
        r = setup_command(pg, "--setup-products", "--setup-meters")
        assert r.returncode == 0, r.stdout + r.stderr
        pg.sql("SELECT billing.upsert_tenant('items', 'Items AG', 'billing@items.example')")
        claims = tenant_claims("items")
        r = api.post("/rpc/create_subscription", body={"plan": "professional", "interval": "month"}, claims=claims)
        assert r.status == 200, r.body
        drain(pg)
        s = sub(api, "items")
        f.confirm(s["client_secret"].split("_secret_")[0], "pm_card_visa")
        deliver(pg, api, f)

        def stripe_items():
            [x] = [x for x in f.of_type("subscription") if x["metadata"].get("tenant_id") == "items"]
            return [i["price"]["lookup_key"] for i in x["items"]["data"]]

        assert stripe_items() == ["professional_monthly", "professional_signatures_overage_monthly",
                                  "professional_storage_monthly"]
        local = pg.sql("SELECT jsonb_array_length(metered_items), stripe_item_id FROM billing.subscriptions "
                       "WHERE tenant_id = 'items' AND stripe_subscription_id IS NOT NULL")
        assert local[0][0] == 2 and local[0][1].startswith("si_"), local
        r = api.post("/rpc/update_subscription", body={"plan": "enterprise"}, claims=claims)
        assert r.status == 200, r.body
        drain(pg)
        deliver(pg, api, f)
        assert sub(api, "items")["plan"] == "enterprise"
        assert stripe_items() == ["enterprise_monthly", "enterprise_signatures_monthly"]
        assert pg.sql("SELECT metered_items -> 0 ->> 'price' = (SELECT stripe_price_id FROM billing.metered_prices "
                      "WHERE price_key = 'enterprise_signatures_monthly') FROM billing.subscriptions "
                      "WHERE tenant_id = 'items' AND stripe_subscription_id IS NOT NULL") == [(True,)]
    finally:
        api.close()
        f.stop()
        amcheck_and_stop(pg)


def test_the_tenant_sees_what_will_be_and_what_was_billed(billed, fake):
    """GET /usage: what will be billed so far this period; GET /invoices: the
    usage lines Stripe billed (from the invoice's event, delivered signed)."""
    import json as _json
    from conftest import tenant_claims
    from fake_stripe import signed
    from postgrest import PostgREST
    pg = billed
    customer = subscribe(pg, fake, "pro_i", "professional")
    for i in range(3):
        pg.sql("SELECT billing.record_usage('pro_i', 'signatures', 50, %s)", (f"i{i}",))
    pass_and_drain(pg)
    api = PostgREST(pg.dsn(user="authenticator"))
    try:
        claims = tenant_claims("pro_i")
        rows = {r["metric"]: r for r in api.get("/usage", claims=claims).body if r["is_current"]}
        s = rows["signatures"]
        assert (s["used"], s["billed_beyond"], s["billable"], s["billable_amount"], s["sent_to_stripe"]) == \
            (150, 100, 50, 2500, 150), s
        assert rows["documents"]["billable"] is None          # not billed by usage
        # the invoice Stripe made at the period's end, with its metered line
        price = pg.sql("SELECT stripe_price_id FROM billing.metered_prices "
                       "WHERE price_key = 'professional_signatures_overage_monthly'")[0][0]
        at = int(AT.timestamp())
        p0, p1 = int(PERIOD[0].timestamp()), int(PERIOD[1].timestamp())
        inv = {"id": "in_meters1", "object": "invoice", "customer": customer, "subscription": "sub_pro_i",
               "status": "open", "amount_due": 5400, "amount_paid": 0, "amount_remaining": 5400, "currency": "usd",
               "created": at, "period_start": p0, "period_end": p1, "attempt_count": 0, "billing_reason":
               "subscription_cycle", "status_transitions": {"finalized_at": at}, "livemode": False,
               "lines": {"object": "list", "has_more": False, "data": [
                   {"id": "il_base", "object": "line_item", "amount": 2900, "currency": "usd", "quantity": 1,
                    "description": "Professional", "period": {"start": p1, "end": p1 + 30 * 86400},
                    "price": {"id": "price_base", "recurring": {"usage_type": "licensed"}}},
                   {"id": "il_usage", "object": "line_item", "amount": 2500, "currency": "usd", "quantity": 150,
                    "description": "Signatures beyond 100", "period": {"start": p0, "end": p1},
                    "price": {"id": price, "recurring": {"usage_type": "metered"}}}]}}
        ev = {"id": "evt_meters_inv1", "object": "event", "type": "invoice.finalized", "api_version": "2024-06-20",
              "created": at, "livemode": False, "data": {"object": inv}}
        body, header = signed(ev, TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"], at=time.time())
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        assert r.status == 200, r.body
        assert pg.wait_until("SELECT state = 'applied' FROM billing.webhook_events "
                             "WHERE stripe_event_id = 'evt_meters_inv1'"), \
            pg.sql("SELECT state, last_error FROM billing.webhook_events WHERE stripe_event_id = 'evt_meters_inv1'")
        [invoice] = [i for i in api.get("/invoices", claims=claims).body if i["invoice_id"] == "in_meters1"]
        assert [(l["metric"], l["quantity"], l["amount"]) for l in invoice["usage_lines"]] == \
            [("signatures", 150, 2500)], invoice
        # another tenant sees none of it
        assert [i for i in api.get("/invoices", claims=tenant_claims("pro_a")).body
                if i["invoice_id"] == "in_meters1"] == []
    finally:
        api.close()


def test_usage_of_the_previous_period_after_the_renewal(billed, fake):
    """Usage that occurred just before a renewal and was recorded (or sent)
    after Stripe's renewal was mirrored goes to Stripe with its own time, in
    the period it occurred in (the invoice of that period is still a draft
    for an hour); the new period's usage in a meter event of its own."""
    pg = billed
    july = PERIOD[1]
    subscribe(pg, fake, "ent_late", "enterprise")
    pg.sql("SELECT billing.record_usage('ent_late', 'signatures', 4, 'june-1')")
    pg.set_clock(july + timedelta(minutes=20))
    fake.set_clock(july + timedelta(minutes=20))
    try:
        # the renewal is mirrored; then June's last usage is reported late
        pg.sql("UPDATE billing.subscriptions SET current_period_start = %s, current_period_end = %s "
               "WHERE tenant_id = 'ent_late'", (july, datetime(2027, 8, 1, tzinfo=timezone.utc)))
        pg.sql("SELECT billing.record_usage('ent_late', 'signatures', 5, 'june-late', NULL, %s)",
               (july - timedelta(minutes=3),))
        pg.sql("SELECT billing.record_usage('ent_late', 'signatures', 7, 'july-1')")
        assert pg.sql("SELECT period_start FROM billing.usage_events WHERE tenant_id = 'ent_late' ORDER BY 1") == \
            [(PERIOD[0],), (PERIOD[0],), (july,)]
        pass_and_drain(pg)          # June's (the oldest period first)
        pass_and_drain(pg)          # then July's
        customer, meter = pg.sql("SELECT t.stripe_customer_id, m.stripe_meter_id FROM billing.tenants t, "
                                 "billing.meters m WHERE t.tenant_id = 'ent_late' AND m.metric = 'signatures'")[0]
        june_value = fake.meter_value(meter, customer, int(PERIOD[0].timestamp()), int(july.timestamp()))
        july_value = fake.meter_value(meter, customer, int(july.timestamp()), int(july.timestamp()) + 31 * 86400)
        assert (june_value, july_value) == (9, 7)
        assert pg.sql("SELECT period_start, value, state FROM billing.meter_events WHERE tenant_id = 'ent_late' "
                      "ORDER BY meter_event_id") == [(PERIOD[0], 9, "delivered"), (july, 7, "delivered")]
    finally:
        pg.set_clock(AT)
        fake.set_clock(AT)


# ---- money bugs found by review: each test was seen red with its fault planted ----------------

def hold_passes(pg):
    """No worker pass between a test's steps (the chaos test makes them run
    every second): only the test's own billing.meter_pass_now()."""
    pg.sql("UPDATE billing.meter_state SET pass_interval = '1 hour', next_pass_at = now() + interval '1 hour'")


@contextlib.contextmanager
def refusing(fake, customer):
    """The fake answers the customer's meter events with a 400 meanwhile."""
    fake.meter_refuse.add(customer)
    try:
        yield
    finally:
        fake.meter_refuse.discard(customer)


def test_a_key_recorded_again_after_a_void_goes_out_in_a_new_event(billed, fake):
    """k4 and k5 went out in one event; k4 is voided (the event cancelled in
    Stripe, k5 unsent again) and the application records k4 again under the
    same key: the next event carries the same keys as the cancelled one and
    still gets an identifier of its own (no unique violation, which stopped
    every tenant's pass, and no refusal by Stripe as a repeat, which would
    have been taken for delivered: 11 units lost)."""
    pg = billed
    hold_passes(pg)
    subscribe(pg, fake, "ent_k", "enterprise")
    subscribe(pg, fake, "ent_k2", "enterprise")
    pg.sql("SELECT billing.record_usage('ent_k', 'signatures', 2, 'k4')")
    pg.sql("SELECT billing.record_usage('ent_k', 'signatures', 9, 'k5')")
    pass_and_drain(pg)
    assert stripe_value(pg, fake, "ent_k", "signatures") == 11
    assert "being cancelled" in pg.sql("SELECT billing.void_usage('ent_k', 'k4', 'recorded twice by the app')")[0][0]
    drain(pg)
    assert stripe_value(pg, fake, "ent_k", "signatures") == 0
    pg.sql("SELECT billing.record_usage('ent_k', 'signatures', 2, 'k4')")
    pg.sql("SELECT billing.record_usage('ent_k2', 'signatures', 6, 'o1')")      # another tenant, same pass
    pass_and_drain(pg)
    assert stripe_value(pg, fake, "ent_k", "signatures") == 11 == local_value(pg, "ent_k", "signatures")
    assert stripe_value(pg, fake, "ent_k2", "signatures") == 6
    rows = pg.sql("SELECT state, value, usage_rows, identifier FROM billing.meter_events WHERE tenant_id = 'ent_k' "
                  "ORDER BY meter_event_id")
    assert [r[:3] for r in rows] == [("cancelled", 11, 2), ("delivered", 11, 2)] and rows[0][3] != rows[1][3], rows


def test_meter_identifiers_are_unambiguous_and_per_event(billed):
    pg = billed

    def ident(tenant, metric, event_id, keys):
        return pg.sql("SELECT billing.meter_identifier(%s, %s, %s, %s)", (tenant, metric, event_id, keys))[0][0]

    same = ident("t1", "signatures", 7, ["a", "b"])
    assert same == ident("t1", "signatures", 7, ["a", "b"])          # stable: every retry carries it
    assert len(same) <= 100 and same.startswith("qes_")
    # keys may hold any character: no two lists of keys read alike
    assert ident("t1", "signatures", 7, ["a\x01b"]) != ident("t1", "signatures", 7, ["a", "b"])
    assert ident("t1", "signatures", 7, ["a\x01", "b"]) != ident("t1", "signatures", 7, ["a", "\x01b"])
    assert ident("t1\x01signatures", "signatures", 7, []) != ident("t1", "signatures\x01signatures", 7, [])
    # the same rows in another event: another identifier
    assert ident("t1", "signatures", 8, ["a", "b"]) != same


def test_one_tenants_failure_skips_only_that_tenant(billed, fake):
    """Whatever makes one tenant's meter event fail (here a trigger planted
    by the test), the pass sends the other tenants' usage, warns and audits
    the tenant it skipped (once, not at every pass), and sends the skipped
    tenant's usage once the cause is gone."""
    pg = billed
    hold_passes(pg)
    subscribe(pg, fake, "ent_bad", "enterprise")
    subscribe(pg, fake, "ent_good", "enterprise")
    pg.sql("SELECT billing.record_usage('ent_bad', 'signatures', 3, 'b1')")
    pg.sql("SELECT billing.record_usage('ent_good', 'signatures', 4, 'g1')")
    pg.sql("""CREATE FUNCTION public.test_meter_boom() RETURNS trigger LANGUAGE plpgsql AS $$
              BEGIN
                IF NEW.tenant_id = 'ent_bad' THEN
                  RAISE EXCEPTION 'planted failure' USING ERRCODE = 'data_exception';
                END IF;
                RETURN NEW;
              END $$""")
    pg.sql("CREATE TRIGGER test_meter_boom BEFORE INSERT ON billing.meter_events "
           "FOR EACH ROW EXECUTE FUNCTION public.test_meter_boom()")
    try:
        warnings = []
        for _ in range(2):
            with pg.connect(autocommit=True) as c:
                c.add_notice_handler(lambda d: warnings.append(d.message_primary))
                c.execute("SELECT billing.meter_pass_now()")
        drain(pg)
        assert stripe_value(pg, fake, "ent_good", "signatures") == 4
        assert stripe_value(pg, fake, "ent_bad", "signatures") == 0
        assert pg.sql("SELECT count(*) FROM billing.meter_events WHERE tenant_id = 'ent_bad'") == [(0,)]
        assert len(warnings) == 2 and all('skipped tenant "ent_bad"' in w and "planted failure" in w
                                          for w in warnings), warnings
        assert pg.sql("SELECT details ->> 'sqlstate', details ->> 'error' FROM billing.audit_log "
                      "WHERE action = 'meter.pass_skipped' AND tenant_id = 'ent_bad'") == \
            [("22000", "planted failure")]
    finally:
        pg.sql("DROP TRIGGER test_meter_boom ON billing.meter_events")
        pg.sql("DROP FUNCTION public.test_meter_boom()")
    pass_and_drain(pg)
    assert stripe_value(pg, fake, "ent_bad", "signatures") == 3 == local_value(pg, "ent_bad", "signatures")


def test_metered_prices_in_another_currency_are_not_counted(billed, fake):
    """An active eur metered price beside the usd one (one active per
    currency): a subscription's usage is billed once, at the price of its
    own currency (its licensed price's; usd when unknown)."""
    pg = billed
    hold_passes(pg)
    pg.sql("""INSERT INTO billing.metered_prices (price_key, plan_id, metric, billing_interval, included,
                                                  unit_amount_decimal, currency, stripe_price_id)
              VALUES ('professional_signatures_eur_monthly', 'professional', 'signatures', 'month', 50, 40, 'eur',
                      'price_testSignaturesEur')""")
    pg.sql("""INSERT INTO billing.prices (price_key, plan_id, billing_interval, unit_amount, currency, stripe_price_id)
              VALUES ('professional_eur_monthly', 'professional', 'month', 2700, 'eur', 'price_testProfessionalEur')""")
    try:
        subscribe(pg, fake, "pro_usd", "professional")
        subscribe(pg, fake, "pro_eur", "professional")
        pg.sql("UPDATE billing.subscriptions SET stripe_price_id = 'price_testProfessionalEur' "
               "WHERE tenant_id = 'pro_eur'")
        for t in ("pro_usd", "pro_eur"):
            pg.sql("SELECT billing.record_usage(%s, 'signatures', 130, 'c1')", (t,))
        pass_and_drain(pg)
        for t in ("pro_usd", "pro_eur"):
            assert stripe_value(pg, fake, t, "signatures") == 130 == local_value(pg, t, "signatures")
        assert pg.sql("SELECT tenant_id, value, state FROM billing.meter_events "
                      "WHERE tenant_id IN ('pro_usd', 'pro_eur') ORDER BY 1") == \
            [("pro_eur", 130, "delivered"), ("pro_usd", 130, "delivered")]
        # what the tenant sees: one row, at its own currency's price
        assert pg.sql("SELECT used, included, billable, amount, currency FROM billing.usage_billable('pro_usd') "
                      "WHERE metric = 'signatures'") == [(130, 100, 30, 1500, "usd")]
        assert pg.sql("SELECT used, included, billable, amount, currency FROM billing.usage_billable('pro_eur') "
                      "WHERE metric = 'signatures'") == [(130, 50, 80, 3200, "eur")]
        # a new subscription carries the metered prices of its licensed price's currency only
        assert pg.sql("SELECT billing.metered_items_for('professional', 'month')")[0][0] == [
            {"price": p} for (p,) in pg.sql("SELECT stripe_price_id FROM billing.metered_prices WHERE plan_id = "
                                            "'professional' AND currency = 'usd' AND active ORDER BY price_key")]
    finally:
        pg.sql("DELETE FROM billing.metered_prices WHERE price_key = 'professional_signatures_eur_monthly'")
        pg.sql("DELETE FROM billing.prices WHERE price_key = 'professional_eur_monthly'")


def test_voiding_a_row_of_a_failed_event_never_bills_it(billed, fake):
    """k6=5 and k7=3 go out in one event of value 8, which Stripe refuses;
    k6 is voided: the event is cancelled, k7 goes out again in a new event
    (new identifier) and reconciliation never sends the 8.  A failed event
    Stripe may have (an unknown outcome) is cancelled in Stripe first; Stripe
    never had it, so its other rows go out again too."""
    pg = billed
    hold_passes(pg)
    customer = subscribe(pg, fake, "ent_f", "enterprise")
    with refusing(fake, customer):
        for key, q in (("k6", 5), ("k7", 3), ("k8", 4), ("k9", 1)):
            pg.sql("SELECT billing.record_usage('ent_f', 'signatures', %s, %s)", (q, key))
        pass_and_drain(pg)
    assert pg.sql("SELECT state, value FROM billing.meter_events WHERE tenant_id = 'ent_f'") == [("failed", 13)]
    done = pg.sql("SELECT billing.void_usage('ent_f', 'k6', 'not the tenant''s')")[0][0]
    assert "refused by Stripe and is cancelled" in done, done
    pass_and_drain(pg)
    pg.sql("SELECT billing.meter_reconcile('ent_f')")
    drain(pg)
    drain(pg)
    assert stripe_value(pg, fake, "ent_f", "signatures") == 8 == local_value(pg, "ent_f", "signatures")
    assert pg.sql("SELECT state, value FROM billing.meter_events WHERE tenant_id = 'ent_f' ORDER BY meter_event_id") \
        == [("cancelled", 13), ("delivered", 8)]
    # the new event failed too, its outcome unknown (Stripe may have it)
    pg.sql("SELECT billing.record_usage('ent_f', 'signatures', 2, 'k10')")
    with refusing(fake, customer):
        pass_and_drain(pg)
    pg.sql("""UPDATE billing.meter_events SET last_error = '{"category": "expired", "retryable": false}'
               WHERE tenant_id = 'ent_f' AND state = 'failed'""")
    done = pg.sql("SELECT billing.void_usage('ent_f', 'k10', 'not the tenant''s')")[0][0]
    assert "being cancelled" in done, done
    drain(pg)
    # reconciliation: the failed events are cancelled, nothing is sent again
    pg.sql("SELECT billing.meter_reconcile('ent_f')")
    drain(pg)
    drain(pg)
    pass_and_drain(pg)
    assert stripe_value(pg, fake, "ent_f", "signatures") == 8 == local_value(pg, "ent_f", "signatures")
    assert pg.sql("SELECT state, value FROM billing.meter_events WHERE tenant_id = 'ent_f' ORDER BY meter_event_id") \
        == [("cancelled", 13), ("delivered", 8), ("cancelled", 2)]
    sent = [e["payload"]["value"] for e in fake.meter_events.values()
            if e["payload"].get("stripe_customer_id") == customer]
    assert sorted(sent) == ["8"], sent


def test_a_failed_event_retried_by_an_operator_is_delivered(billed, fake):
    """A meter event Stripe refused, sent again by an operator's
    billing.retry_request once the cause is fixed, is delivered: its state
    follows the request (it stayed failed, out of what was sent)."""
    pg = billed
    hold_passes(pg)
    customer = subscribe(pg, fake, "ent_opretry", "enterprise")
    with refusing(fake, customer):
        pg.sql("SELECT billing.record_usage('ent_opretry', 'signatures', 6, 'opretry1')")
        pass_and_drain(pg)
    assert pg.sql("SELECT state FROM billing.meter_events WHERE tenant_id = 'ent_opretry'") == [("failed",)]
    pg.sql("SELECT billing.retry_request(request_id) FROM billing.meter_events WHERE tenant_id = 'ent_opretry'")
    drain(pg)
    assert pg.sql("SELECT state, value FROM billing.meter_events WHERE tenant_id = 'ent_opretry'") == [("delivered", 6)]
    assert stripe_value(pg, fake, "ent_opretry", "signatures") == 6 == local_value(pg, "ent_opretry", "signatures")


def test_retry_never_sends_an_event_as_it_no_longer_stands(billed, fake):
    """An operator's billing.retry_request of a failed meter event that
    lost a row since (voided while its cancellation failed too) is refused:
    sent again it would bill the voided units."""
    pg = billed
    hold_passes(pg)
    customer = subscribe(pg, fake, "ent_lost", "enterprise")
    with refusing(fake, customer):
        pg.sql("SELECT billing.record_usage('ent_lost', 'signatures', 4, 'lost1')")
        pg.sql("SELECT billing.record_usage('ent_lost', 'signatures', 5, 'lost2')")
        pass_and_drain(pg)
    assert pg.sql("SELECT state, value, usage_rows FROM billing.meter_events WHERE tenant_id = 'ent_lost'") \
        == [("failed", 9, 2)]
    # what a void leaves when the cancellation in Stripe failed as well: the
    # event failed, one row fewer
    pg.sql("DELETE FROM billing.meter_event_usage WHERE tenant_id = 'ent_lost' AND idempotency_key = 'lost1'")
    pg.sql("DELETE FROM billing.usage_events WHERE tenant_id = 'ent_lost' AND idempotency_key = 'lost1'")
    with pytest.raises(psycopg.Error) as e:
        pg.sql("SELECT billing.retry_request(request_id) FROM billing.meter_events WHERE tenant_id = 'ent_lost'")
    assert e.value.sqlstate == "55000" and "no longer stands" in str(e.value), e.value
    assert pg.sql("SELECT state FROM billing.meter_events WHERE tenant_id = 'ent_lost'") == [("failed",)]


def test_usage_of_a_periods_last_second_is_billed_in_it(billed, fake):
    """Usage at 23:59:59.6 on the period's last day is dated 23:59:59 in
    Stripe (rounded down), not at the next period's first second."""
    pg = billed
    hold_passes(pg)
    july = PERIOD[1]
    subscribe(pg, fake, "ent_sec", "enterprise")
    pg.set_clock(july + timedelta(minutes=20))
    fake.set_clock(july + timedelta(minutes=20))
    try:
        pg.sql("UPDATE billing.subscriptions SET current_period_start = %s, current_period_end = %s "
               "WHERE tenant_id = 'ent_sec'", (july, datetime(2027, 8, 1, tzinfo=timezone.utc)))
        pg.sql("SELECT billing.record_usage('ent_sec', 'signatures', 5, 'last-second', NULL, %s)",
               (july - timedelta(milliseconds=400),))
        assert pg.sql("SELECT period_start FROM billing.usage_events WHERE tenant_id = 'ent_sec'") == [(PERIOD[0],)]
        pass_and_drain(pg)
        customer, meter = pg.sql("SELECT t.stripe_customer_id, m.stripe_meter_id FROM billing.tenants t, "
                                 "billing.meters m WHERE t.tenant_id = 'ent_sec' AND m.metric = 'signatures'")[0]
        june_value = fake.meter_value(meter, customer, int(PERIOD[0].timestamp()), int(july.timestamp()))
        july_value = fake.meter_value(meter, customer, int(july.timestamp()), int(july.timestamp()) + 31 * 86400)
        assert (june_value, july_value) == (5, 0)
    finally:
        pg.set_clock(AT)
        fake.set_clock(AT)
