"""Periods and entitlements proven over the calendar, against a reference
model (period_model.py) written independently of the SQL and C.

A generator (Hypothesis, with shrinking: a failure prints the smallest
lifecycle that breaks) draws a subscription's lifecycle in Stripe's own
event shapes (stripe-mock's fixtures): an anchor on any day and time of
2024-2028, monthly or yearly, a trial or a pending first payment,
renewals, failed payments with and without recovery (inside and past the
grace period), upgrades, switches between monthly and yearly, cancellation at
once and at the period's end, and a new subscription after the end.
Usage occurs before, between and after the events that govern it and is
sometimes recorded late; events are delivered late, shuffled and
repeated.  The lifecycle is replayed in time order through the billing
clock (each step at its own simulated moment): deliveries go through the
webhook intake and the worker, usage through record_usage, and at every
check moment check_limit's plan and count and the period usage is filed
under are compared with the model (knowing exactly the events delivered so
far).  After the last event, billing.usage_period is compared with the
model for every day of 2024-01-01 .. 2028-12-31 (at midnight and a second
before the anchor's time of day).

A fixed, derandomized run is part of `make test` (QES_PERIOD_EXAMPLES,
default 150 lifecycles); `make test-periods` runs a long random one.  A
separate test does the every-day sweep for anchors on every day 1-31,
monthly and yearly.  And the gate shows it can fail: with usage no longer
moved when the mirror learns of a period late (the fault this test was
written for), the model finds the lost usage.
"""
import json
import os
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
import stripe
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from conftest import TEST_KEYS, amcheck_and_stop
from period_model import Inv, Knowledge, Sub, add_months, plan_and_period
from pgcluster import Cluster
from postgrest import PostgREST
from test_periods import event, invoice, subscription
from test_webhook_handlers import fx  # noqa: F401  (fixture)

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
UTC = timezone.utc
DAY = 86400
EXAMPLES = int(os.environ.get("QES_PERIOD_EXAMPLES", "150"))
RANDOM = os.environ.get("QES_PERIOD_RANDOM", "") not in ("", "0")
SWEEP_FROM, SWEEP_TO = datetime(2024, 1, 1, tzinfo=UTC), datetime(2028, 12, 31, tzinfo=UTC)
STATS = {"lifecycles": 0, "events": 0, "deliveries": 0, "usage": 0, "checks": 0, "days": 0}


# ---- lifecycles ---------------------------------------------------------------

STEPS = ("renew", "fail_recover", "fail_end", "upgrade", "switch_interval", "cancel_now", "cancel_at_end")


@dataclass
class Life:
    """One drawn lifecycle (Hypothesis shrinks these fields)."""
    start: datetime          # the anchor (after the trial, when there is one)
    yearly: bool
    enterprise: bool
    trial_days: int          # 0: no trial
    pending_hours: int       # 0: paid at once; else the first payment is pending (incomplete) that long
    steps: tuple             # one action per period
    step_days: tuple         # where in the period an action happens (days, wrapped to the period)
    resubscribe_days: int    # -1: none; else a new subscription that many days after an end
    usage: tuple             # (seconds after start - 20 days, quantity, recorded late by seconds)
    late: tuple              # per event: delivered late by seconds (cycled)
    repeats: tuple           # per event: delivered again this many times (cycled)
    checks: tuple            # extra check moments, seconds after start - 20 days
    seed: int                # shuffles deliveries of the same moment


@st.composite
def lifecycles(draw):
    y = draw(st.integers(2024, 2028))
    m = draw(st.integers(1, 12 if y < 2028 else 6))
    d = draw(st.integers(1, 31))
    import calendar
    d = min(d, calendar.monthrange(y, m)[1])
    start = datetime(y, m, d, draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 59)),
                     tzinfo=UTC)
    yearly = draw(st.booleans())
    n = draw(st.integers(1, 3 if yearly else 8))
    steps = tuple(draw(st.lists(st.sampled_from(STEPS), min_size=n, max_size=n)))
    return Life(
        start=start, yearly=yearly, enterprise=draw(st.booleans()),
        trial_days=draw(st.sampled_from([0, 0, 0, 7, 14, 30])),
        pending_hours=draw(st.sampled_from([0, 0, 0, 3, 50])),
        steps=steps,
        step_days=tuple(draw(st.lists(st.integers(0, 400), min_size=n, max_size=n))),
        resubscribe_days=draw(st.sampled_from([-1, -1, 0, 3, 20, 45])),
        usage=tuple(draw(st.lists(st.tuples(st.integers(0, 500 * DAY), st.integers(1, 5),
                                            st.sampled_from([0, 0, 0, 60, DAY, 3 * DAY])),
                                  min_size=1, max_size=14))),
        late=tuple(draw(st.lists(st.sampled_from([0, 0, 0, 0, 30, 3600, DAY, 5 * DAY, 12 * DAY]),
                                 min_size=1, max_size=12))),
        repeats=tuple(draw(st.lists(st.integers(0, 2), min_size=1, max_size=6))),
        checks=tuple(draw(st.lists(st.integers(0, 500 * DAY), max_size=8))),
        seed=draw(st.integers(0, 2 ** 16)))


def build(life, fx, tenant):  # noqa: F811
    """Stripe's timeline of a lifecycle: [(created, event type, object json,
    model object)], each subscription's states at least a minute apart."""
    cus = f"cus_{tenant}"
    out = []
    step = 12 if life.yearly else 1
    plan = "enterprise" if life.enterprise else "professional"

    last = {}

    def after_last(sid, at):
        """Stripe's states of one subscription are at least a minute apart
        (same-second states are a case of their own, tested elsewhere)."""
        return max(at, last.get(sid, at - timedelta(days=1)) + timedelta(seconds=61))

    def sub_state(sid, status, cps, cpe, anchor, at, plan, interval, deleted=False, **kw):
        at = after_last(sid, at)
        last[sid] = at
        key = f"{plan}_{'yearly' if interval == 'year' else 'monthly'}"
        o = subscription(fx, sid, cus, tenant, status, (cps, cpe), anchor, key=key, interval=interval,
                         cancel_at_period_end=kw.get("cancel_at_period_end", False),
                         trial_end=int(kw["trial_end"].timestamp()) if kw.get("trial_end") else None,
                         ended_at=int(kw["ended_at"].timestamp()) if kw.get("ended_at") else None,
                         canceled_at=int(kw["ended_at"].timestamp()) if kw.get("ended_at") else None)
        typ = ("customer.subscription.deleted" if deleted else
               "customer.subscription.created" if not any(e[3].id == sid for e in out if isinstance(e[3], Sub))
               else "customer.subscription.updated")
        out.append((at, typ, o, Sub(sid, status, plan, interval, cps, cpe, anchor, at,
                                    kw.get("cancel_at_period_end", False), kw.get("trial_end"), kw.get("ended_at"))))

    def inv_state(iid, sid, status, at, created=None):
        """invoice.payment_failed (open: its first failed attempt is the
        event's time) or invoice.paid; returns the event's time."""
        at = after_last(sid, at)
        last[sid] = at
        o = invoice(fx, iid, cus, sid, status, int((created or at).timestamp()))
        o["status_transitions"]["paid_at"] = int(at.timestamp()) if status == "paid" else None
        typ = "invoice.paid" if status == "paid" else "invoice.payment_failed"
        out.append((at, typ, o, Inv(iid, sid, status, at if status == "open" else None,
                                    at if status == "paid" else None, at)))
        return at

    invoices = [0]

    def one(sid, anchor, interval, step, steps, step_days, trial_days, pending_hours):
        """A subscription from its start; returns when (and whether) it ended."""
        plan_now = plan
        if trial_days:
            t0 = anchor - timedelta(days=trial_days)
            sub_state(sid, "trialing", t0, anchor, anchor, t0, plan_now, interval, trial_end=anchor)
            sub_state(sid, "active", anchor, add_months(anchor, step), anchor, anchor + timedelta(seconds=5),
                      plan_now, interval)
        elif pending_hours:
            sub_state(sid, "incomplete", anchor, add_months(anchor, step), anchor, anchor, plan_now, interval)
            sub_state(sid, "active", anchor, add_months(anchor, step), anchor,
                      anchor + timedelta(hours=pending_hours), plan_now, interval)
        else:
            sub_state(sid, "active", anchor, add_months(anchor, step), anchor, anchor, plan_now, interval)
        k = 0
        cps, cpe = anchor, add_months(anchor, step)
        for i, (action, days) in enumerate(zip(steps, step_days)):
            length = (cpe - cps).total_seconds()
            mid = cps + timedelta(seconds=min(max(days * DAY % length, 7200), length - 7200))
            mid = after_last(sid, mid)
            if mid >= cpe - timedelta(hours=1):
                action = "renew"      # no room left in this period
            if action == "upgrade" and plan_now != "enterprise":
                plan_now = "enterprise"
                sub_state(sid, "active", cps, cpe, anchor, mid, plan_now, interval)
            elif action == "switch_interval":
                # monthly <-> yearly: a new period and anchor from the switch
                interval, step = ("year", 12) if interval == "month" else ("month", 1)
                anchor = mid
                cps, cpe, k = mid, add_months(mid, step), 0
                sub_state(sid, "active", cps, cpe, anchor, mid, plan_now, interval)
                continue
            elif action == "cancel_now":
                sub_state(sid, "canceled", cps, cpe, anchor, mid, plan_now, interval, deleted=True, ended_at=mid)
                return mid
            elif action == "cancel_at_end":
                sub_state(sid, "active", cps, cpe, anchor, mid, plan_now, interval, cancel_at_period_end=True)
                sub_state(sid, "canceled", cps, cpe, anchor, cpe + timedelta(seconds=10), plan_now, interval,
                          deleted=True, cancel_at_period_end=True, ended_at=cpe)
                return cpe
            # the renewal at cpe
            k += 1
            b = cpe
            cps, cpe = b, add_months(anchor, (k + 1) * step)
            sub_state(sid, "active", cps, cpe, anchor, b + timedelta(seconds=10), plan_now, interval)
            if action in ("fail_recover", "fail_end"):
                invoices[0] += 1      # unique per lifecycle (k starts again after a switch)
                iid = f"in_{sid[4:]}_{invoices[0]}"
                failed = inv_state(iid, sid, "open", b + timedelta(hours=1))
                sub_state(sid, "past_due", cps, cpe, anchor, failed + timedelta(seconds=60), plan_now, interval)
                length = (cpe - cps).total_seconds()
                later = b + timedelta(seconds=min(max(days * 3600, 3 * 3600), length - 3600))
                if action == "fail_recover":
                    later = inv_state(iid, sid, "paid", later, created=failed)
                    sub_state(sid, "active", cps, cpe, anchor, later + timedelta(seconds=60), plan_now, interval)
                else:
                    sub_state(sid, "canceled", cps, cpe, anchor, later, plan_now, interval, deleted=True,
                              ended_at=later)
                    return later
        return None

    sid = f"sub_{tenant}"
    ended = one(sid, life.start, "year" if life.yearly else "month", step, life.steps, life.step_days,
                life.trial_days, life.pending_hours)
    first = len(out)
    if ended is not None and life.resubscribe_days >= 0:
        again = ended + timedelta(days=life.resubscribe_days, seconds=90)
        one(f"sub_{tenant}_2", again, "year" if life.yearly else "month", step,
            ("renew",) * 2, (0, 0), 0, 0)
    return out, first


# ---- replay -------------------------------------------------------------------

class Replay:
    """Drives one lifecycle through the billing clock, the intake and the
    worker, comparing with the model at every check moment."""

    def __init__(self, pg, api, fx):  # noqa: F811
        self.pg, self.api, self.fx = pg, api, fx
        self.conn = psycopg.connect(pg.dsn(), autocommit=True)

    def close(self):
        self.conn.close()

    def set_clock(self, at):
        self.conn.execute("SELECT billing.set_clock(%s::timestamptz - pg_catalog.now())", (at,))

    def deliver(self, evs):
        for ev in evs:
            body = json.dumps(ev)
            header = stripe.WebhookSignature.generate_signature_header(body, SECRET)
            r = self.api.post("/rpc/stripe_webhook", body=body,
                              headers={"Content-Type": "application/json", "Stripe-Signature": header})
            assert r.status == 200, r.body
        ids = list({e["id"] for e in evs})
        deadline = time.time() + 60
        while True:
            rows = self.conn.execute(
                "SELECT stripe_event_id, state, last_error FROM billing.webhook_events"
                " WHERE stripe_event_id = ANY(%s) AND state <> 'applied'", (ids,)).fetchall()
            if not rows:
                return
            assert time.time() < deadline and all(s in ("received", "processing") for _, s, _ in rows), rows
            time.sleep(0.002)

    def run(self, life, tenant):
        timeline, _ = build(life, self.fx, tenant)
        rng = random.Random(life.seed)
        moments = {}   # time -> [("deliver", ev, model) | ("record", occurred, q) | ("check",)]

        def at(t, item):
            moments.setdefault(t, []).append(item)

        sub1_end_delivery = None
        # events: each delivered late by a drawn amount, some again later;
        # the second subscription's only after the first one's end arrived
        deliveries = []
        for i, (created, typ, o, model) in enumerate(timeline):
            ev = event(typ, o, int(created.timestamp()))
            late = life.late[i % len(life.late)]
            n = 1 + life.repeats[i % len(life.repeats)]
            for r in range(n):
                deliveries.append((created + timedelta(seconds=late + r * (late + 3600)), ev, model))
        for t, ev, model in deliveries:
            if isinstance(model, Sub) and not model.id.endswith("_2") and model.status == "canceled":
                sub1_end_delivery = max(sub1_end_delivery or t, t)
        for t, ev, model in deliveries:
            if sub1_end_delivery and (model.id.endswith("_2") or getattr(model, "sub", "").endswith("_2")):
                t = max(t, sub1_end_delivery + timedelta(seconds=1))
            at(t, ("deliver", ev, model))
        origin = life.start - timedelta(days=20)
        for off, q, delay in life.usage:
            occurred = origin + timedelta(seconds=off)
            at(occurred + timedelta(seconds=delay), ("record", occurred, q))
        checks = [origin + timedelta(seconds=c) for c in life.checks]
        for created, _, _, model in timeline:
            checks += [created - timedelta(seconds=1), created + timedelta(seconds=1)]
            if isinstance(model, Sub):
                checks += [model.cpe - timedelta(seconds=1), model.cpe, model.cps + timedelta(days=7, seconds=3601)]
        for c in checks:
            at(c, ("check",))
        STATS["lifecycles"] += 1
        STATS["events"] += len(timeline)
        STATS["deliveries"] += len(deliveries)

        know = Knowledge()
        ledger = []
        mismatches = []
        for t in sorted(moments):
            items = moments[t]
            rng.shuffle(items)
            evs = [(ev, model) for kind, *rest in items if kind == "deliver" for ev, model in [rest]]
            if evs:
                self.set_clock(t)
                self.deliver([ev for ev, _ in evs])
                for _, model in evs:
                    know.learn(model)
            for kind, *rest in items:
                if kind == "record":
                    occurred, q = rest
                    with self.conn.transaction():
                        self.set_clock(t)
                        self.conn.execute("SELECT billing.record_usage(%s, 'signatures', %s, %s, NULL, %s)",
                                          (tenant, q, f"m-{uuid.uuid4().hex}", occurred))
                    ledger.append((occurred, q))
                    STATS["usage"] += 1
            # every moment is a check moment: after each delivery and record too
            mismatches += self.check(tenant, t, know, ledger)
            if mismatches:
                break
        return know, mismatches

    def check(self, tenant, t, know, ledger):
        try:
            with self.conn.transaction():
                self.set_clock(t)
                cur, plan = self.conn.execute(
                    "SELECT current, plan_id FROM billing.check_limit(%s, 'signatures', 0)", (tenant,)).fetchone()
                s, e = self.conn.execute(
                    "SELECT period_start, period_end FROM billing.usage_current(%s) WHERE metric = 'signatures'",
                    (tenant,)).fetchone()
                raise _Rollback((cur, plan, s, e))
        except _Rollback as r:
            cur, plan, s, e = r.value
        STATS["checks"] += 1
        want_plan, ws, we = plan_and_period(know, t)
        want = sum(q for occ, q in ledger if ws <= occ < we)
        got = (plan, s.astimezone(UTC), e.astimezone(UTC), cur)
        if got != (want_plan, ws, we, want):
            return [f"at {t.isoformat()}: check_limit says plan {plan}, period {s.astimezone(UTC).isoformat()}"
                    f" .. {e.astimezone(UTC).isoformat()}, {cur} used; the model says plan {want_plan},"
                    f" period {ws.isoformat()} .. {we.isoformat()}, {want} used"]
        return []

    def sweep(self, tenant, know, times_of_day):
        """billing.usage_period against the model for every day of the range."""
        days = []
        d = SWEEP_FROM
        while d <= SWEEP_TO:
            for tod in times_of_day:
                days.append(d + tod)
            d += timedelta(days=1)
        rows = self.conn.execute(
            "SELECT d, p.plan_id, p.period_start, p.period_end"
            "  FROM unnest(%s::timestamptz[]) d, billing.usage_period(%s, d) p", (days, tenant)).fetchall()
        STATS["days"] += len(rows)
        bad = []
        for d, plan, s, e in rows:
            want = plan_and_period(know, d.astimezone(UTC))
            got = (plan, s.astimezone(UTC), e.astimezone(UTC))
            if got != want:
                bad.append(f"usage_period at {d.astimezone(UTC).isoformat()}: {got[0]} {got[1].isoformat()} .. "
                           f"{got[2].isoformat()}; model: {want[0]} {want[1].isoformat()} .. {want[2].isoformat()}")
        return bad


class _Rollback(Exception):
    def __init__(self, value):
        self.value = value


def new_tenant(pg, prefix="pm"):
    t = f"{prefix}_{uuid.uuid4().hex[:10]}"
    pg.sql("SELECT billing.upsert_tenant(%s, 'Model GmbH', 'm@model.example')", (t,))
    pg.sql("UPDATE billing.tenants SET stripe_customer_id = %s WHERE tenant_id = %s", (f"cus_{t}", t))
    return t


@pytest.fixture(scope="module")
def replay(pg, fx):  # noqa: F811
    api = PostgREST(pg.dsn(user="authenticator"))
    r = Replay(pg, api, fx)
    started = time.time()
    yield r
    r.close()
    api.close()
    pg.reset_clock()
    print(f"\nperiod model: {STATS['lifecycles']} lifecycles, {STATS['events']} events in "
          f"{STATS['deliveries']} deliveries, {STATS['usage']} usage records, {STATS['checks']} checks at "
          f"their moments, {STATS['days']} days swept, {time.time() - started:.0f} s")


def run_one(replay, pg, life):
    tenant = new_tenant(pg)
    know, mismatches = replay.run(life, tenant)
    assert not mismatches, f"tenant {tenant}\n" + "\n".join(mismatches)
    anchor_tod = timedelta(hours=life.start.hour, minutes=life.start.minute, seconds=life.start.second)
    bad = replay.sweep(tenant, know, [timedelta(0), anchor_tod - timedelta(seconds=1)])
    assert not bad, (f"tenant {tenant}: {len(bad)} days differ\n" + "\n".join(bad[:10]) + "\nmirror: " +
                     str(pg.sql("SELECT status, plan_id, stripe_subscription_id, current_period_start,"
                                " current_period_end, ended_at FROM billing.subscriptions WHERE tenant_id = %s"
                                " ORDER BY subscription_id", (tenant,))))


# The lifecycle this test was written for: paid monthly from an evening in
# late October, ended at its period's end in November, the end learnt in
# December after usage was recorded in December.
ENDED_LATE = Life(start=datetime(2026, 10, 27, 21, 30, tzinfo=UTC), yearly=False, enterprise=False, trial_days=0,
                  pending_hours=0, steps=("cancel_at_end",), step_days=(10,), resubscribe_days=-1,
                  usage=((40 * DAY, 3, 0), (55 * DAY, 2, 0), (59 * DAY, 1, 0)), late=(0, 0, 12 * DAY),
                  repeats=(0,), checks=(56 * DAY, 60 * DAY), seed=1)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=list(HealthCheck), print_blob=True,
          phases=[Phase.explicit, Phase.generate, Phase.shrink] if RANDOM else [Phase.explicit, Phase.generate])
@example(life=ENDED_LATE)
@example(life=Life(start=datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC), yearly=False, enterprise=True,
                   trial_days=14, pending_hours=0, steps=("renew", "fail_recover", "fail_end"),
                   step_days=(0, 9, 3), resubscribe_days=0, usage=((30 * DAY, 1, DAY), (70 * DAY, 2, 0)),
                   late=(0, 5 * DAY, 0, DAY), repeats=(1, 0), checks=(), seed=7))
@example(life=Life(start=datetime(2028, 2, 29, 8, 0, tzinfo=UTC), yearly=True, enterprise=False, trial_days=0,
                   pending_hours=50, steps=("renew", "cancel_now"), step_days=(0, 200), resubscribe_days=20,
                   usage=((10 * DAY, 1, 0), (400 * DAY, 2, 3 * DAY)), late=(0, 12 * DAY), repeats=(0, 2),
                   checks=(380 * DAY,), seed=3))
@given(life=lifecycles())
def test_periods_and_entitlements_follow_the_model(replay, pg, life):
    run_one(replay, pg, life)


@pytest.mark.parametrize("interval", ["month", "year"])
def test_every_anchor_day_every_day(replay, pg, fx, interval):  # noqa: F811
    """Anchors on every day 1-31 (in January, so that every day exists, at
    an evening time), renewed for a year, ending in December 2024 when
    monthly: billing.usage_period equals the model on every day 2024-2028."""
    for day in range(1, 32):
        steps = ("renew",) * 11 + ("cancel_at_end",) if interval == "month" else ("renew", "cancel_at_end")
        life = Life(start=datetime(2024, 1, day, 20, 15, tzinfo=UTC), yearly=interval == "year", enterprise=False,
                    trial_days=0, pending_hours=0, steps=steps, step_days=(5,) * len(steps), resubscribe_days=-1,
                    usage=((25 * DAY, 1, 0),), late=(0,), repeats=(0,), checks=(), seed=day)
        run_one(replay, pg, life)


# ---- the gate can fail ------------------------------------------------------------

@pytest.fixture(scope="module")
def pg_planted(session_fake_stripe):
    cluster = Cluster("planted", env=TEST_KEYS,
                      conf={"qes_billing.stripe_api_base": f"'{session_fake_stripe.base}'"}).start()
    assert cluster.wait_until("SELECT alive FROM billing.worker_status"), cluster.log()
    yield cluster
    amcheck_and_stop(cluster)


def test_the_model_finds_lost_usage(pg_planted, fx):  # noqa: F811
    """With the fault planted -- usage no longer moved when the mirror learns
    of a period late -- the same replay reports a difference."""
    pg_planted.sql("CREATE OR REPLACE FUNCTION billing.rekey_usage_from(p_tenant text, p_from timestamptz)"
                   " RETURNS bigint LANGUAGE sql AS 'SELECT 0::bigint'")
    api = PostgREST(pg_planted.dsn(user="authenticator"))
    r = Replay(pg_planted, api, fx)
    try:
        tenant = new_tenant(pg_planted)
        _, mismatches = r.run(ENDED_LATE, tenant)
    finally:
        r.close()
        api.close()
    assert mismatches, "the planted fault went unnoticed"
    print("planted fault found:", mismatches[0])
