"""Usage periods follow Stripe's periods exactly (docs/architecture.md, "Billing periods").

`stripe_boundary` below is how Stripe bills: every boundary is the billing
cycle anchor plus k intervals, the anchor's day clamped to the month's
length (an anchor on the 31st bills on Feb 28 or 29, then on Mar 31; a
yearly anchor on Feb 29 bills on Feb 28 in common years), at the anchor's
time of day.  The table-driven test mirrors subscriptions through signed
webhooks (the period of every renewal, and none at all) and compares the
period record_usage files usage under with Stripe's, for anchors on every
day 28-31, February in leap and common years, yearly plans and a trial.

The regime test records usage around changes of regime (paid -> Free
limits after the grace period -> paid, Free -> paid, upgrade, monthly ->
yearly, the end of a subscription, a trial then paid, an immediate
cancellation), with the events delivered after the usage they govern, and
checks that check_limit counts exactly the usage that occurred in the
period it reports: none lost, none counted twice.
"""
import calendar
import copy
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import stripe

from conftest import TEST_KEYS
from postgrest import PostgREST
from test_webhook_handlers import fx  # noqa: F401  (fixture)

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
UTC = timezone.utc
DAY = 86400


def stripe_boundary(anchor, months):
    """anchor + months, the day clamped to the month's length (Stripe)."""
    y, m = divmod(anchor.month - 1 + months, 12)
    y += anchor.year
    m += 1
    return anchor.replace(year=y, month=m, day=min(anchor.day, calendar.monthrange(y, m)[1]))


def stripe_periods(anchor, step, n, first_start=None):
    """The first n periods of a subscription anchored at `anchor` (step:
    1 monthly, 12 yearly); with first_start, a first period (a trial) runs
    from it to the anchor."""
    out = [(first_start, anchor)] if first_start else []
    k = 0
    while len(out) < n:
        out.append((stripe_boundary(anchor, k * step), stripe_boundary(anchor, (k + 1) * step)))
        k += 1
    return out


def test_the_reference_bills_like_stripe():
    """The reference itself, on the examples Stripe documents."""
    a = datetime(2024, 1, 31, 9, 30, tzinfo=UTC)
    assert [s.date().isoformat() for s, _ in stripe_periods(a, 1, 4)] == \
        ["2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30"]
    a = datetime(2025, 1, 31, tzinfo=UTC)
    assert stripe_periods(a, 1, 2)[1][0].date().isoformat() == "2025-02-28"
    a = datetime(2020, 2, 29, tzinfo=UTC)
    assert [s.date().isoformat() for s, _ in stripe_periods(a, 12, 5)] == \
        ["2020-02-29", "2021-02-28", "2022-02-28", "2023-02-28", "2024-02-29"]


def ts(dt):
    return int(dt.timestamp())


@pytest.fixture(scope="module")
def api(pg):
    client = PostgREST(pg.dsn(user="authenticator"))
    yield client
    client.close()


def event(type_, o, created):
    return {"id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2024-06-20",
            "created": created, "livemode": False, "type": type_, "data": {"object": copy.deepcopy(o)},
            "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None}}


def deliver_all(pg, api, events):
    for ev in events:
        body = json.dumps(ev)
        header = stripe.WebhookSignature.generate_signature_header(body, SECRET)
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        assert r.status == 200, r.body
    ids = [e["id"] for e in events]
    assert pg.wait_until("SELECT count(*) = 0 FROM billing.webhook_events WHERE state = 'received' "
                         f"AND stripe_event_id = ANY('{{{','.join(ids)}}}')", 60)
    bad = pg.sql("SELECT stripe_event_id, state, last_error FROM billing.webhook_events "
                 "WHERE stripe_event_id = ANY(%s) AND state <> 'applied'", (ids,))
    assert bad == [], bad


def subscription(fx, sub_id, cus, tenant, status, period, anchor, key="professional_monthly", interval="month",
                 **kw):
    """A subscription in the pinned shape (the period at the top level)."""
    o = copy.deepcopy(fx["subscription"])
    o.update(id=sub_id, customer=cus, status=status, cancel_at_period_end=False, trial_end=None,
             metadata={"tenant_id": tenant}, billing_cycle_anchor=ts(anchor) if anchor else None,
             current_period_start=ts(period[0]), current_period_end=ts(period[1]),
             created=ts(period[0]), ended_at=None, canceled_at=None)
    o.update(kw)
    item = o["items"]["data"][0]
    item["price"].update(id=f"price_{key}", lookup_key=key)
    item["price"]["recurring"]["interval"] = interval
    item.pop("current_period_start", None)
    item.pop("current_period_end", None)
    return o


def new_tenant(pg, prefix):
    t = f"{prefix}_{uuid.uuid4().hex[:8]}"
    pg.sql("SELECT billing.upsert_tenant(%s, 'Period GmbH', 'p@period.example')", (t,))
    pg.sql("UPDATE billing.tenants SET stripe_customer_id = %s WHERE tenant_id = %s", (f"cus_{t}", t))
    return t


def filed_period(pg, tenant, at):
    """The period record_usage files usage that occurred at `at` under."""
    row = pg.sql("SELECT period_start, period_end FROM billing.record_usage(%s, 'api_calls', 1, %s, NULL, %s)",
                 (tenant, f"p-{uuid.uuid4().hex}", at))[0]
    return row[0].astimezone(UTC), row[1].astimezone(UTC)


CASES = [
    # name, anchor, step (months), periods to check
    ("jan28_leap", datetime(2024, 1, 28, 13, 45, 10, tzinfo=UTC), 1, 14),
    ("jan29_leap", datetime(2024, 1, 29, 13, 45, 10, tzinfo=UTC), 1, 14),
    ("jan30_leap", datetime(2024, 1, 30, 13, 45, 10, tzinfo=UTC), 1, 14),
    ("jan31_leap", datetime(2024, 1, 31, 13, 45, 10, tzinfo=UTC), 1, 14),
    ("jan28_common", datetime(2025, 1, 28, 0, 0, 1, tzinfo=UTC), 1, 14),
    ("jan29_common", datetime(2025, 1, 29, 0, 0, 1, tzinfo=UTC), 1, 14),
    ("jan30_common", datetime(2025, 1, 30, 0, 0, 1, tzinfo=UTC), 1, 14),
    ("jan31_common", datetime(2025, 1, 31, 0, 0, 1, tzinfo=UTC), 1, 14),
    ("aug31", datetime(2023, 8, 31, 23, 59, 59, tzinfo=UTC), 1, 14),
    ("mar31", datetime(2023, 3, 31, 6, 0, tzinfo=UTC), 1, 14),
    ("nov30", datetime(2023, 11, 30, 12, 0, tzinfo=UTC), 1, 14),
    ("feb29_yearly", datetime(2020, 2, 29, 8, 0, tzinfo=UTC), 12, 6),
    ("feb28_yearly", datetime(2019, 2, 28, 8, 0, tzinfo=UTC), 12, 6),
    ("jan31_yearly", datetime(2020, 1, 31, 8, 0, tzinfo=UTC), 12, 6),
    ("dec31_yearly", datetime(2019, 12, 31, 22, 0, tzinfo=UTC), 12, 6),
]


def test_periods_follow_stripe(pg, api, fx):  # noqa: F811
    """Table-driven: for every case, first with only the first period
    mirrored (no renewal arrived: the periods after it are stepped from the
    anchor), then with each renewal mirrored in turn, the period usage is
    filed under at the start, the middle and the last second of every
    period -- and of the periods before and after the mirrored one -- is
    Stripe's.  Plus a 14-day trial before a monthly plan anchored on the
    31st, and the anchor inferred when the mirror lacks it."""
    cases = []
    for name, anchor, step, n in CASES:
        cases.append((name, step, stripe_periods(anchor, step, n), anchor, True))
    trial_start = datetime(2024, 1, 17, 10, 0, tzinfo=UTC)
    trial_anchor = datetime(2024, 1, 31, 10, 0, tzinfo=UTC)
    cases.append(("trial_then_jan31", 1, stripe_periods(trial_anchor, 1, 14, first_start=trial_start),
                  trial_anchor, True))
    # no billing_cycle_anchor in the mirror: inferred from the period
    for name, anchor, step, n in CASES[:4] + CASES[8:11]:
        cases.append((name + "_inferred", step, stripe_periods(anchor, step, n), anchor, False))

    tenants = {}
    for name, step, periods, anchor, with_anchor in cases:
        t = new_tenant(pg, "per")
        tenants[name] = (t, step, periods, anchor, with_anchor)

    def sub_event(name, k):
        t, step, periods, anchor, with_anchor = tenants[name]
        status = "trialing" if name.startswith("trial") and k == 0 else "active"
        o = subscription(fx, f"sub_{t}", f"cus_{t}", t, status, periods[k], anchor if with_anchor else None,
                         key="professional_yearly" if step == 12 else "professional_monthly",
                         interval="year" if step == 12 else "month")
        return event("customer.subscription.updated" if k else "customer.subscription.created", o,
                     ts(periods[k][0]) + k)

    mismatches = []

    def check(name, k_mirrored, ks):
        t, step, periods, anchor, with_anchor = tenants[name]
        for k in ks:
            if k < 0 or k >= len(periods):
                continue
            start, end = periods[k]
            for at in (start, start + (end - start) / 2, end - timedelta(seconds=1)):
                got = filed_period(pg, t, at)
                if got != (start, end):
                    mismatches.append((name, f"mirrored P{k_mirrored}", f"P{k}", at.isoformat(),
                                       "got", got[0].isoformat(), got[1].isoformat(),
                                       "stripe", start.isoformat(), end.isoformat()))

    deliver_all(pg, api, [sub_event(name, 0) for name in tenants])
    for name in tenants:
        check(name, 0, range(len(tenants[name][2])))           # no renewal arrived: all stepped
    rounds = max(len(v[2]) for v in tenants.values())
    for k in range(1, rounds):
        names = [name for name in tenants if k < len(tenants[name][2])]
        deliver_all(pg, api, [sub_event(name, k) for name in names])
        for name in names:
            if name.endswith("_inferred") and k > 1:
                # without Stripe's anchor a period can look like an anchor of its own
                # (Feb 28 -> Mar 28 on a 31st anchor): only Stripe's own period is exact
                check(name, k, [k])
            elif name.startswith("trial") and k == 1:
                # the trial before the first paid period is not a period of the anchor's:
                # once the paid period is mirrored, only Stripe's own and later ones are known
                check(name, k, [k, k + 1, k + 2])
            else:
                check(name, k, [k - 1, k, k + 1, k + 2])
    assert mismatches == [], "\n".join(map(str, mismatches[:20])) + f"\n({len(mismatches)} mismatches)"


# ---- regimes ----------------------------------------------------------------

def counted(pg, tenant):
    """check_limit's count now, and the period it reports."""
    cur, plan = pg.sql("SELECT current, plan_id FROM billing.check_limit(%s, 'signatures', 0)", (tenant,))[0]
    start, end = pg.sql("SELECT period_start, period_end FROM billing.usage_current(%s) WHERE metric = 'signatures'",
                        (tenant,))[0]
    return cur, plan, start.astimezone(UTC), end.astimezone(UTC)


def record(pg, tenant, at, quantity, ledger):
    pg.sql("SELECT billing.record_usage(%s, 'signatures', %s, %s, NULL, %s)",
           (tenant, quantity, f"r-{uuid.uuid4().hex}", at))
    ledger.append((at, quantity))


def in_period(ledger, start, end):
    return sum(q for at, q in ledger if start <= at < end)


def invoice(fx, inv_id, cus, sub_id, status, created):
    o = copy.deepcopy(fx["invoice"])
    o.update(id=inv_id, customer=cus, status=status, amount_due=2900, currency="usd", created=created,
             amount_paid=2900 if status == "paid" else 0, amount_remaining=0 if status == "paid" else 2900,
             attempt_count=1, number=None, subscription=sub_id, payment_intent=None,
             status_transitions={"finalized_at": created, "paid_at": created if status == "paid" else None,
                                 "voided_at": None, "marked_uncollectible_at": None})
    o.pop("parent", None)
    return o


# Fixed simulated dates (the billing clock), never the day the suite runs:
# early in a month in the evening (a paid period that ended in the previous
# month), midday, the turn of a year, a leap day late in the evening, the
# last days of short and long months.
REGIME_DATES = [
    datetime(2026, 12, 6, 21, 30, tzinfo=UTC),
    datetime(2026, 12, 6, 12, 0, tzinfo=UTC),
    datetime(2027, 1, 7, 21, 30, tzinfo=UTC),
    datetime(2027, 1, 1, 0, 30, tzinfo=UTC),
    datetime(2027, 12, 31, 23, 30, tzinfo=UTC),
    datetime(2028, 2, 29, 23, 30, tzinfo=UTC),
    datetime(2028, 3, 1, 20, 0, tzinfo=UTC),
    datetime(2027, 4, 30, 22, 0, tzinfo=UTC),
    datetime(2027, 3, 3, 19, 45, tzinfo=UTC),
]


@pytest.fixture
def clock(pg):
    """Set the billing clock for one test; back to the real clock after."""
    yield lambda at: pg.set_clock(at)
    pg.reset_clock()


@pytest.mark.parametrize("now", REGIME_DATES, ids=[d.strftime("%Y-%m-%dT%H%M") for d in REGIME_DATES])
def test_regime_changes_neither_lose_nor_double_count(pg, api, fx, clock, now):  # noqa: F811
    """Usage around every change of regime, the events delivered after the
    usage they govern: check_limit counts exactly what occurred in the
    period it reports, at each of the fixed dates."""
    clock(now)
    d = timedelta(days=1)
    results = {}

    # paid -> Free limits after the grace period -> paid again: one period throughout
    t = new_tenant(pg, "reg_grace")
    led = []
    sub_id, cus = f"sub_{t}", f"cus_{t}"
    period = (now - 10 * d, stripe_boundary(now - 10 * d, 1))
    deliver_all(pg, api, [event("customer.subscription.created",
                                subscription(fx, sub_id, cus, t, "active", period, period[0]), ts(period[0]))])
    record(pg, t, now - 9 * d, 3, led)
    deliver_all(pg, api, [
        event("invoice.payment_failed", invoice(fx, f"in_{t}", cus, sub_id, "open", ts(now - 9 * d)), ts(now - 9 * d)),
        event("customer.subscription.updated", subscription(fx, sub_id, cus, t, "past_due", period, period[0]),
              ts(now - 9 * d))])
    record(pg, t, now - 1 * d, 5, led)               # after the grace period: Free limits, same period
    cur, plan, s, e = counted(pg, t)
    assert plan == "free" and (s, e) == period and cur == 8 == in_period(led, s, e), (cur, plan, s, e)
    deliver_all(pg, api, [
        event("invoice.paid", invoice(fx, f"in_{t}", cus, sub_id, "paid", ts(now) - 3600), ts(now) - 3600),
        event("customer.subscription.updated", subscription(fx, sub_id, cus, t, "active", period, period[0]),
              ts(now) - 3600)])
    record(pg, t, now - timedelta(minutes=5), 2, led)
    results["grace"] = (t, led)

    # Free -> paid: usage while the first payment was pending counts in the paid period
    t = new_tenant(pg, "reg_free")
    led = []
    sub_id, cus = f"sub_{t}", f"cus_{t}"
    record(pg, t, now - 5 * d, 4, led)               # Free
    period = (now - 3 * d, stripe_boundary(now - 3 * d, 1))
    deliver_all(pg, api, [event("customer.subscription.created",
                                subscription(fx, sub_id, cus, t, "incomplete", period, period[0]), ts(period[0]))])
    record(pg, t, now - 2 * d, 2, led)               # first payment pending: Free limits
    record(pg, t, now - 1 * d, 1, led)               # paid already, the event not here yet
    deliver_all(pg, api, [event("customer.subscription.updated",
                                subscription(fx, sub_id, cus, t, "active", period, period[0]), ts(now - 1 * d) - 60)])
    results["free_to_paid"] = (t, led)

    # upgrade mid-period: the same period
    t = new_tenant(pg, "reg_up")
    led = []
    sub_id, cus = f"sub_{t}", f"cus_{t}"
    period = (now - 10 * d, stripe_boundary(now - 10 * d, 1))
    deliver_all(pg, api, [event("customer.subscription.created",
                                subscription(fx, sub_id, cus, t, "active", period, period[0]), ts(period[0]))])
    record(pg, t, now - 8 * d, 3, led)
    record(pg, t, now - 2 * d, 2, led)
    deliver_all(pg, api, [event("customer.subscription.updated",
                                subscription(fx, sub_id, cus, t, "active", period, period[0],
                                             key="enterprise_monthly"), ts(now - 4 * d))])
    results["upgrade"] = (t, led)

    # monthly -> yearly: a new period from the switch
    t = new_tenant(pg, "reg_switch")
    led = []
    sub_id, cus = f"sub_{t}", f"cus_{t}"
    period = (now - 10 * d, stripe_boundary(now - 10 * d, 1))
    deliver_all(pg, api, [event("customer.subscription.created",
                                subscription(fx, sub_id, cus, t, "active", period, period[0]), ts(period[0]))])
    record(pg, t, now - 8 * d, 3, led)
    record(pg, t, now - 3 * d, 2, led)               # after the switch, before its event
    yearly = (now - 4 * d, stripe_boundary(now - 4 * d, 12))
    deliver_all(pg, api, [event("customer.subscription.updated",
                                subscription(fx, sub_id, cus, t, "active", yearly, yearly[0],
                                             key="professional_yearly", interval="year"), ts(now - 4 * d))])
    results["switch"] = (t, led)

    # a subscription that ended at its period's end: Free from then on
    t = new_tenant(pg, "reg_end")
    led = []
    sub_id, cus = f"sub_{t}", f"cus_{t}"
    period = (now - 40 * d, stripe_boundary(now - 40 * d, 1))
    deliver_all(pg, api, [event("customer.subscription.created",
                                subscription(fx, sub_id, cus, t, "active", period, period[0]), ts(period[0]))])
    record(pg, t, now - 20 * d, 3, led)
    record(pg, t, now - 5 * d, 2, led)               # after the end, before its event
    deliver_all(pg, api, [event("customer.subscription.deleted",
                                subscription(fx, sub_id, cus, t, "canceled", period, period[0],
                                             ended_at=ts(period[1])), ts(period[1]))])
    record(pg, t, now - 1 * d, 1, led)
    results["ended"] = (t, led)

    # a trial, then paid (the renewal's event late)
    t = new_tenant(pg, "reg_trial")
    led = []
    sub_id, cus = f"sub_{t}", f"cus_{t}"
    trial = (now - 20 * d, now - 6 * d)
    deliver_all(pg, api, [event("customer.subscription.created",
                                subscription(fx, sub_id, cus, t, "trialing", trial, trial[1],
                                             trial_end=ts(trial[1])), ts(trial[0]))])
    record(pg, t, now - 10 * d, 4, led)
    record(pg, t, now - 5 * d, 3, led)
    paid = (trial[1], stripe_boundary(trial[1], 1))
    deliver_all(pg, api, [event("customer.subscription.updated",
                                subscription(fx, sub_id, cus, t, "active", paid, trial[1]), ts(paid[0]))])
    record(pg, t, now - 1 * d, 1, led)
    results["trial"] = (t, led)

    # cancelled at once mid-period: the rest of the period on Free limits
    t = new_tenant(pg, "reg_cancel")
    led = []
    sub_id, cus = f"sub_{t}", f"cus_{t}"
    period = (now - 10 * d, stripe_boundary(now - 10 * d, 1))
    deliver_all(pg, api, [event("customer.subscription.created",
                                subscription(fx, sub_id, cus, t, "active", period, period[0]), ts(period[0]))])
    record(pg, t, now - 8 * d, 3, led)
    record(pg, t, now - 4 * d, 2, led)
    deliver_all(pg, api, [event("customer.subscription.deleted",
                                subscription(fx, sub_id, cus, t, "canceled", period, period[0],
                                             ended_at=ts(now - 5 * d)), ts(now - 5 * d))])
    record(pg, t, now - 1 * d, 1, led)
    results["cancel"] = (t, led)

    expected = {"grace": 10, "free_to_paid": 3, "upgrade": 5, "switch": 2, "trial": 4, "cancel": 6}
    for name, (t, led) in results.items():
        cur, plan, s, e = counted(pg, t)
        assert s <= now < e, (name, s, e)
        assert cur == in_period(led, s, e), (name, cur, plan, s.isoformat(), e.isoformat(), led)
        if name in expected:
            assert cur == expected[name], (name, cur, s, e)
    # the one that ended: Free from its end to the next calendar month, then calendar months
    t, led = results["ended"]
    cur, plan, s, e = counted(pg, t)
    end = stripe_boundary(now - 40 * d, 1)
    next_month = stripe_boundary(end.replace(day=1, hour=0, minute=0, second=0), 1)
    if now < next_month:
        assert (s, e) == (end, next_month) and cur == 3, (s, e, cur)
    else:
        assert s == now.replace(day=1, hour=0, minute=0, second=0) and cur == in_period(led, s, e)
    assert plan == "free"
    # every recorded unit is in exactly one period
    for name, (t, led) in results.items():
        assert pg.sql("SELECT sum(quantity) FROM billing.usage_events WHERE tenant_id = %s AND metric = 'signatures'",
                      (t,))[0][0] == sum(q for _, q in led)
