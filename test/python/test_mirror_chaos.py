"""Chaos (issue 10, Proof): 200 tenants' lifecycles built on stripe-mock's
objects, in the pinned 2024-06-20 shapes and the newer ones -- subscribe,
trial, upgrade, downgrade, monthly -> yearly, renewals, failed renewals and
recovery, unpaid at the end, cancellation and resubscription, customer
deletion and return, cancellation at period end, disputes before and after
their charges, events about foreign customers, same-second bursts --
delivered once in order ("ord") and, as a second copy under other ids
("shf"), shuffled with every event repeated 1-3 times and a tenth of them
held back to the end (days late).  The worker fetches from the Stripe world
(stripe_world.py) whatever it asks for.

The two copies end equal table by table, both equal to Stripe's final state
as the world computes it, and check_limit is equal for every tenant and
metric at several clock offsets (now, inside and after grace periods).
"""
import json
import random
import time

import pytest
import stripe

from conftest import TEST_KEYS, amcheck_and_stop
from pgcluster import Cluster
from postgrest import PostgREST
from stripe_world import DAY, World
from test_webhook_handlers import fx  # noqa: F401  (fixture)

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
TENANTS = 200


@pytest.fixture(scope="module")
def world(fx):  # noqa: F811
    now = int(time.time())
    w = World(fx, t0=now - 130 * DAY, now=now)
    w.base = w.serve()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def pgw(world):
    cluster = Cluster("chaos", env=TEST_KEYS,
                      conf={"qes_billing.stripe_api_base": f"'{world.base}'",
                            "qes_billing.retry_base_delay": "'20ms'",
                            "qes_billing.webhook_max_attempts": "20",
                            "qes_billing.reconcile_pages": "1000"}).start()
    assert cluster.wait_until("SELECT alive FROM billing.worker_status"), cluster.log()
    yield cluster
    amcheck_and_stop(cluster)


def deliver(api, events):
    for e in events:
        body = json.dumps(e)
        header = stripe.WebhookSignature.generate_signature_header(body, SECRET)
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        assert r.status == 200, r.body


def settle(pg, timeout=300):
    """Until nothing is left to apply or to fetch (the next reconciliation pass, due
    later, aside), three times in a row."""
    quiet = 0
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = pg.sql("SELECT (SELECT count(*) FROM billing.webhook_events WHERE state = 'received')"
                      " + (SELECT count(*) FROM billing.stripe_requests WHERE state IN ('in_flight', 'waiting')"
                      "     OR (state = 'pending' AND next_attempt_at < now() + interval '1 minute'))")[0][0]
        quiet = quiet + 1 if busy == 0 else 0
        if quiet >= 3:
            return
        time.sleep(0.2)
    raise AssertionError(pg.sql("SELECT stripe_event_id, event_type, attempts, last_error FROM billing.webhook_events "
                                "WHERE state = 'received' LIMIT 5"))


def epoch(v):
    return None if v is None else int(v.timestamp())


def mirror(pg, copy_):
    """The mirror of one copy in the world's terms, the copy's name taken out."""
    def strip(v):
        return v.replace(copy_, "", 1) if isinstance(v, str) else v
    like = copy_ + "%"
    q = {
        "subscriptions": ("SELECT tenant_id, stripe_subscription_id, plan_id, billing_interval, status, "
                          "cancel_at_period_end, current_period_start, current_period_end, grace_until, ended_at "
                          "FROM billing.subscriptions WHERE tenant_id LIKE %s", (6, 7, 8, 9)),
        "invoices": ("SELECT tenant_id, stripe_invoice_id, status, amount_due, amount_paid, amount_remaining, "
                     "stripe_subscription_id, first_failed_at FROM billing.invoices "
                     "WHERE tenant_id LIKE %s AND subscription_id IS NOT NULL", (7,)),
        "payments": ("SELECT tenant_id, stripe_payment_intent_id, kind, status, amount, stripe_charge_id, "
                     "stripe_invoice_id FROM billing.payments WHERE tenant_id LIKE %s", ()),
        "disputes": ("SELECT tenant_id, stripe_dispute_id, stripe_charge_id FROM billing.disputes "
                     "WHERE tenant_id LIKE %s", ()),
        "stripe_customers": ("SELECT tenant_id, stripe_customer_id, deleted_at IS NOT NULL FROM billing.stripe_customers "
                             "WHERE tenant_id LIKE %s", ()),
        "tenants": ("SELECT tenant_id, stripe_customer_id, disputed FROM billing.tenants WHERE tenant_id LIKE %s", ()),
        # notifications of facts; those of transitions the mirror passed through
        # (payment.recovered, grace.ended) depend on the order it saw them in
        "notifications": ("SELECT tenant_id, kind, audience FROM billing.notifications WHERE tenant_id LIKE %s "
                          "AND kind IN ('payment.failed', 'dispute.created', 'subscription.trial_will_end')", ()),
    }
    out = {}
    for name, (sql, times) in q.items():
        rows = []
        for r in pg.sql(sql, (like,)):
            rows.append(tuple(epoch(v) if k in times else strip(v) for k, v in enumerate(r)))
        out[name] = sorted(rows, key=repr)
    # invoices whose subscription link is missing show up as a difference too
    out["invoices"] += [("unlinked",) + tuple(map(strip, r)) for r in pg.sql(
        "SELECT tenant_id, stripe_invoice_id FROM billing.invoices WHERE tenant_id LIKE %s AND subscription_id IS NULL",
        (like,))]
    return out


def limits(pg, copy_, offsets):
    out = {}
    for off in offsets:
        pg.sql("SELECT billing.set_clock(%s)", (f"{off} days",))
        for t, m, plan, lim, allowed, reason in pg.sql(
                "SELECT t.tenant_id, m.metric, c.plan_id, c.usage_limit, c.allowed, c.reason IS NOT NULL "
                "FROM billing.tenants t CROSS JOIN billing.metrics m "
                "CROSS JOIN LATERAL billing.check_limit(t.tenant_id, m.metric, 0) c WHERE t.tenant_id LIKE %s",
                (copy_ + "%",)):
            out[(off, t.replace(copy_, "", 1), m)] = (plan, lim, allowed, reason)
    pg.sql("SELECT billing.set_clock('0')")
    return out


def expected_plan(world, copy_, tenant, at):
    """Whose limits apply to the tenant at `at`, from Stripe's final state."""
    cur = [s for s in world.of(copy_, "subscription")
           if s["metadata"]["tenant_id"] == copy_ + tenant and s["status"] not in ("canceled", "incomplete_expired")]
    if not cur:
        return "free"
    s = cur[0]
    plan = world.key(s).split("_")[0]
    if s["status"] in ("active", "trialing"):
        return plan
    if s["status"] == "past_due":
        exp = [x for x in world.expected(copy_)["subscriptions"] if x[1] == s["id"].replace(copy_, "", 1)][0]
        return plan if at < exp[8] else "free"
    return "free"


def differences(a, b):
    return sum(len(set(a[t]) ^ set(b[t])) for t in a)


def test_any_order_any_repeats_same_mirror(pgw, world):
    pg = pgw
    rnd = random.Random(10)
    for copy_ in ("ord", "shf"):
        for i in range(TENANTS):
            t = world.lifecycle(copy_, i)
            pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (t, f"T{i}", f"t{i}@chaos.example"))
            # as when the outbox created the customer: linked before Stripe can send anything about it
            pg.sql("UPDATE billing.tenants SET stripe_customer_id = %s WHERE tenant_id = %s", (f"cus_{t}a", t))
    ordered = sorted(world.events["ord"], key=lambda e: e["created"])
    shuffled = [e for e in world.events["shf"] for _ in range(rnd.randint(1, 3))]
    rnd.shuffle(shuffled)
    late = set(rnd.sample(range(len(shuffled)), len(shuffled) // 10))
    shuffled = [e for k, e in enumerate(shuffled) if k not in late] + [shuffled[k] for k in sorted(late)]

    api = PostgREST(pg.dsn(user="authenticator"))
    try:
        started = time.time()
        deliver(api, ordered)
        settle(pg)
        t_ord = time.time() - started
        started = time.time()
        deliver(api, shuffled)
        settle(pg)
        t_shf = time.time() - started
    finally:
        api.close()

    parked = pg.sql("SELECT stripe_event_id, last_error FROM billing.webhook_events WHERE state = 'needs_review'")
    assert parked == []
    a, b = mirror(pg, "ord"), mirror(pg, "shf")
    want = world.expected("ord")
    diffs_copies, diffs_expected = differences(a, b), differences(a, want)
    for table in a:
        assert a[table] == b[table], (table, sorted(set(a[table]) ^ set(b[table]), key=repr)[:6])
    for table in a:
        assert a[table] == want[table], (table, "mirror - stripe:", sorted(set(a[table]) - set(want[table]), key=repr)[:4],
                                         "stripe - mirror:", sorted(set(want[table]) - set(a[table]), key=repr)[:4])

    offsets = (0, 3, 8, 40)
    la, lb = limits(pg, "ord", offsets), limits(pg, "shf", offsets)
    assert la == lb, [k for k in la if la[k] != lb.get(k)][:10]
    wrong = [(off, t, la[(off, t, "signatures")][0], expected_plan(world, "ord", t, world.now + off * DAY))
             for off in offsets for t in {k[1] for k in la}
             if la[(off, t, "signatures")][0] != expected_plan(world, "ord", t, world.now + off * DAY)]
    assert wrong == [], wrong[:10]

    states = dict(pg.sql("SELECT state, count(*) FROM billing.webhook_events GROUP BY state"))
    fetched = len([r for r in world.requests if r[0] == "GET"])
    plans = {}
    for (off, t, m), v in la.items():
        if m == "signatures" and off == 0:
            plans[v[0]] = plans.get(v[0], 0) + 1
    in_grace = sum(1 for s in want["subscriptions"] if s[8] and s[8] > world.now)
    grace_over = sum(1 for s in want["subscriptions"] if s[8] and s[8] <= world.now)
    print(f"\nchaos: {TENANTS} tenants per copy; events {len(world.events['ord'])} per copy; "
          f"deliveries {len(ordered)} in order ({t_ord:.1f} s), {len(shuffled)} shuffled with repeats "
          f"and {len(late)} late ({t_shf:.1f} s); inbox states {states}; "
          f"rows compared per copy {dict((k, len(v)) for k, v in a.items())}; "
          f"differences ord/shf {diffs_copies}, ord/Stripe {diffs_expected}; "
          f"Stripe GETs by the mirror {fetched}; check_limit compared at offsets {offsets} days for "
          f"{len(la)} (tenant, metric, offset); limits now {plans}; past_due in grace {in_grace}, after {grace_over}")
    assert diffs_copies == 0 and diffs_expected == 0
    assert len(world.events["ord"]) > 6000 and in_grace + grace_over > 0


def restricted(m):
    """What reconciliation can restore from Stripe's objects: everything but the
    facts only events carry -- an invoice's first failed attempt and the
    notifications of events older than Stripe's 30 days of events."""
    out = {k: v for k, v in m.items() if k != "notifications"}
    out["invoices"] = sorted((r[:7] for r in m["invoices"]), key=repr)
    return out


def test_dropped_events_are_found_and_repaired(pgw, world):
    """5 % of the events never delivered (a third copy, "drp", in order):
    the mirror drifts; the reconciliation pass (Stripe's events of the last
    30 days) and billing.reconcile_tenant for every tenant (its objects)
    bring it to Stripe's state, each repair reported with before and after."""
    pg = pgw
    rnd = random.Random(11)
    for i in range(TENANTS):
        t = world.lifecycle("drp", i)
        pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (t, f"T{i}", f"t{i}@chaos.example"))
        pg.sql("UPDATE billing.tenants SET stripe_customer_id = %s WHERE tenant_id = %s", (f"cus_{t}a", t))
    events = sorted(world.events["drp"], key=lambda e: e["created"])
    dropped = set(rnd.sample(range(len(events)), len(events) // 20))
    api = PostgREST(pg.dsn(user="authenticator"))
    try:
        deliver(api, [e for k, e in enumerate(events) if k not in dropped])
    finally:
        api.close()
    settle(pg)
    want = restricted(world.expected("drp"))
    drift = differences(restricted(mirror(pg, "drp")), want)
    assert drift > 0

    requests_before = len(world.requests)
    started = time.time()
    pass_run = pg.sql("SELECT billing.reconcile_now()")[0][0]
    tenants = [t for (t,) in pg.sql("SELECT tenant_id FROM billing.tenants WHERE tenant_id LIKE 'drp%' ORDER BY 1")]
    runs = [pg.sql("SELECT billing.reconcile_tenant(%s)", (t,))[0][0] for t in tenants]
    assert pg.wait_until("SELECT count(*) = 0 FROM billing.reconcile_runs WHERE finished_at IS NULL "
                         f"AND run_id = ANY('{{{','.join([pass_run] + runs)}}}')", 300), \
        pg.sql("SELECT * FROM billing.reconcile_runs WHERE finished_at IS NULL LIMIT 3")
    settle(pg)
    took = time.time() - started
    after = restricted(mirror(pg, "drp"))
    for table in after:
        assert after[table] == want[table], (table, "mirror - stripe:", sorted(set(after[table]) - set(want[table]), key=repr)[:4],
                                             "stripe - mirror:", sorted(set(want[table]) - set(after[table]), key=repr)[:4])
    offsets = (0, 3, 8, 40)
    la = limits(pg, "drp", offsets)
    wrong = [(off, t) for off in offsets for t in {k[1] for k in la}
             if la[(off, t, "signatures")][0] != expected_plan(world, "drp", t, world.now + off * DAY)]
    assert wrong == [], wrong[:10]

    runs_all = [pass_run] + runs
    repairs, by_source = pg.sql("SELECT count(*), jsonb_object_agg(source, n) FROM (SELECT source, count(*) n "
                                "FROM billing.drift_repairs WHERE tenant_id LIKE 'drp%%' GROUP BY source) x")[0][0], None
    by_source = dict(pg.sql("SELECT source, count(*) FROM billing.drift_repairs WHERE tenant_id LIKE 'drp%' GROUP BY source"))
    repairs = sum(by_source.values())
    audited = pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'drift.repaired' AND tenant_id LIKE 'drp%'")[0][0]
    assert repairs > 0 and audited == repairs
    report = pg.sql("SELECT object, changed, before IS NOT NULL OR after IS NOT NULL FROM billing.drift_report "
                    "WHERE tenant_id LIKE 'drp%'")
    assert len(report) == repairs and all(r[2] for r in report)
    missed, spent, listed, errors = pg.sql(
        "SELECT sum(missed_events), sum(requests), sum(listed), sum(errors) FROM billing.reconcile_runs "
        "WHERE run_id = ANY(%s)", (runs_all,))[0]
    outbox = pg.sql("SELECT count(*) FROM billing.stripe_requests WHERE run_id = ANY(%s)", (runs_all,))[0][0]
    by_object = dict(pg.sql("SELECT object, count(*) FROM billing.drift_repairs WHERE tenant_id LIKE 'drp%' "
                            "GROUP BY object"))
    print(f"\nreconciliation: {len(events)} events, {len(dropped)} never delivered; {drift} rows differed from "
          f"Stripe before; pass + {len(runs)} tenant runs: {outbox} Stripe requests ({spent} answered, "
          f"{len(world.requests) - requests_before} seen by Stripe), {listed} events/objects listed, "
          f"{missed} missed events found, {repairs} repairs ({by_source}; {by_object}), {errors} errors, "
          f"{took:.1f} s; 0 rows differ after")
