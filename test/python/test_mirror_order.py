"""The mirror converges to Stripe's truth whatever the order of delivery
(docs/architecture.md, rule 12).

Each case runs once per delivery order, every order for its own tenant
(so all orders run side by side): the k-th event of every order is
delivered, the worker applies them, then the (k+1)-th.  Objects are
stripe-mock's fixtures (the newest API shapes) pointed at our tenants.
What must hold is the same in every order: the final mirror, the grace
period (from Stripe's times, never from when an event was applied), and
check_limit at several clock offsets.  Each case runs at a fixed date (the
billing clock reads it; the events' Stripe times are computed from it), so
no case depends on the day it runs.
"""
import copy
import itertools
import json
import uuid
from datetime import datetime, timezone

import pytest
import stripe

from conftest import TEST_KEYS
from postgrest import PostgREST
from test_webhook_handlers import fx  # noqa: F401  (fixture)

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
DAY = 86400


@pytest.fixture(scope="module")
def api(pg):
    client = PostgREST(pg.dsn(user="authenticator"))
    yield client
    client.close()


@pytest.fixture(scope="module", autouse=True)
def quick_retries(pg):
    pg.sql("ALTER SYSTEM SET qes_billing.retry_base_delay = '20ms'")
    pg.sql("SELECT pg_reload_conf()")
    yield
    pg.sql("ALTER SYSTEM RESET qes_billing.retry_base_delay")
    pg.sql("SELECT pg_reload_conf()")
    pg.reset_clock()


def utc(*args):
    return datetime(*args, tzinfo=timezone.utc)


def run_at(pg, at):
    """The case runs at `at`: the billing clock reads it now.  Returns it in
    Unix seconds, the 'now' the case's Stripe times are computed from."""
    pg.set_clock(at)
    return int(at.timestamp())


def event(type_, o, created):
    return {"id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2025-03-31.basil",
            "created": created, "livemode": False, "type": type_, "data": {"object": copy.deepcopy(o)},
            "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None}}


def deliver(api, ev):
    body = json.dumps(ev)
    header = stripe.WebhookSignature.generate_signature_header(body, SECRET)
    r = api.post("/rpc/stripe_webhook", body=body,
                 headers={"Content-Type": "application/json", "Stripe-Signature": header})
    assert r.status == 200, r.body


def settle(pg, ids, timeout=60):
    """Wait until none of these events is still to be applied."""
    assert pg.wait_until("SELECT count(*) = 0 FROM billing.webhook_events WHERE state = 'received' "
                         f"AND stripe_event_id = ANY('{{{','.join(ids)}}}')", timeout), \
        pg.sql("SELECT stripe_event_id, event_type, attempts, last_error FROM billing.webhook_events "
               "WHERE state = 'received' AND stripe_event_id = ANY(%s)", (ids,))


def run_orders(pg, api, sequences):
    """sequences: {tenant: [event, ...]} -- delivered step by step, all tenants at once."""
    for k in range(max(len(s) for s in sequences.values())):
        ids = []
        for evs in sequences.values():
            if k < len(evs):
                deliver(api, evs[k])
                ids.append(evs[k]["id"])
        settle(pg, ids)
    parked = pg.sql("SELECT stripe_event_id, last_error FROM billing.webhook_events "
                    "WHERE state = 'needs_review' AND tenant_id = ANY(%s)", (list(sequences),))
    assert parked == []


def new_tenant(pg, prefix):
    t = f"{prefix}_{uuid.uuid4().hex[:8]}"
    cus = f"cus_{t}"
    pg.sql("SELECT billing.upsert_tenant(%s, 'Order GmbH', 'o@order.example')", (t,))
    pg.sql("UPDATE billing.tenants SET stripe_customer_id = %s WHERE tenant_id = %s", (cus, t))
    return t, cus


def subscription(fx, sub_id, cus, status, start, key="professional_monthly", interval="month", **kw):
    o = copy.deepcopy(fx["subscription"])
    o.update(id=sub_id, customer=cus, status=status, cancel_at_period_end=False, trial_end=None,
             created=start, billing_cycle_anchor=start, ended_at=None, canceled_at=None, metadata={})
    o.update(kw)
    item = o["items"]["data"][0]
    item["price"].update(id=f"price_{key}", lookup_key=key)
    item["price"]["recurring"]["interval"] = interval
    item["current_period_start"], item["current_period_end"] = start, start + 30 * DAY
    return o


def invoice(fx, inv_id, cus, sub_id, status, created, **kw):
    o = copy.deepcopy(fx["invoice"])
    o.update(id=inv_id, customer=cus, status=status, amount_due=2900, currency="usd", created=created,
             amount_paid=2900 if status == "paid" else 0, amount_remaining=0 if status == "paid" else 2900,
             attempt_count=1 if status != "draft" else 0, number=f"N-{inv_id}",
             status_transitions={"finalized_at": created, "paid_at": None, "voided_at": None,
                                 "marked_uncollectible_at": None})
    o["parent"] = {"type": "subscription_details", "quote_details": None,
                   "subscription_details": {"subscription": sub_id, "metadata": {}}}
    o.update(kw)
    return o


def limits(pg, tenant, now, offset_days):
    """check_limit with the billing clock offset_days after the case's now."""
    pg.set_clock(datetime.fromtimestamp(now + offset_days * DAY, timezone.utc))
    try:
        return pg.sql("SELECT plan_id, usage_limit, reason FROM billing.check_limit(%s, 'signatures', 0)",
                      (tenant,))[0]
    finally:
        pg.set_clock(datetime.fromtimestamp(now, timezone.utc))


def sub_state(pg, tenant):
    return pg.sql("SELECT stripe_subscription_id, plan_id, status, grace_until FROM billing.subscriptions "
                  "WHERE tenant_id = %s AND stripe_subscription_id IS NOT NULL ORDER BY 1", (tenant,))


def dunning_events(fx, cus, sub_id, t0, t1, t2):
    """A renewal fails at t1 (the invoice event and the subscription's
    past_due update in the same second), is paid at t2."""
    inv_id = f"in_{sub_id[4:]}_r1"
    return {
        "failed": event("invoice.payment_failed", invoice(fx, inv_id, cus, sub_id, "open", t1), t1),
        "past_due": event("customer.subscription.updated",
                          subscription(fx, sub_id, cus, "past_due", t1), t1),
        "paid": event("invoice.paid", invoice(fx, inv_id, cus, sub_id, "paid", t1,
                                              status_transitions={"finalized_at": t1, "paid_at": t2,
                                                                  "voided_at": None,
                                                                  "marked_uncollectible_at": None}), t2),
        "active": event("customer.subscription.updated", subscription(fx, sub_id, cus, "active", t1), t2),
    }


def test_dunning_in_every_order(pg, api, fx):  # noqa: F811
    """invoice.payment_failed, customer.subscription.updated (past_due, then
    active) and invoice.paid in all 24 orders: the grace period runs from the
    failed attempt's Stripe time whichever of the two failure events comes
    first, and every order ends active on the paid plan."""
    # Feb 29 of a leap year, in the evening: the grace period ends in March
    now = run_at(pg, utc(2028, 2, 29, 19, 30))
    t0, t1, t2 = now - 20 * DAY, now - 1 * DAY, now - 3600
    orders = list(itertools.permutations(["failed", "past_due", "paid", "active"]))
    tenants, seqs, names = {}, {}, {}
    for order in orders:
        t, cus = new_tenant(pg, "dun")
        sub_id = f"sub_{t}"
        evs = dunning_events(fx, cus, sub_id, t0, t1, t2)
        first = event("customer.subscription.created", subscription(fx, sub_id, cus, "active", t0), t0)
        tenants[t] = order
        seqs[t] = [first] + [evs[n] for n in order]
        names[t] = evs
    # the failure only (both of its events, in both orders): inside the grace period
    half = {}
    for t, order in tenants.items():
        seen = [n for n in order[:2]]
        if set(seen) == {"failed", "past_due"}:
            half[t] = order
    assert len(half) == 4
    for k in range(3):          # created, then the first two of each order
        ids = []
        for t, evs in seqs.items():
            deliver(api, evs[k])
            ids.append(evs[k]["id"])
        settle(pg, ids)
    grace = datetime.fromtimestamp(t1 + 7 * DAY, timezone.utc)
    assert grace == utc(2028, 3, 6, 19, 30)
    for t in half:
        rows = sub_state(pg, t)
        assert [(r[1], r[2]) for r in rows] == [("professional", "past_due")], (half[t], rows)
        assert rows[0][3] == grace, (half[t], rows)                                  # t1 + 7 days, Stripe's time
        assert limits(pg, t, now, 0)[:2] == ("professional", 100)                        # inside the grace period
        plan, lim, reason = limits(pg, t, now, 7)                                        # t1 + 8 days: over
        assert (plan, lim) == ("free", 10) and "grace period" in reason, (half[t], plan, reason)
        actions = [a for (a,) in pg.sql("SELECT action FROM billing.audit_log WHERE tenant_id = %s "
                                        "AND action LIKE 'dunning.%%' ORDER BY audit_id", (t,))]
        assert actions and actions[0] == "dunning.started", (half[t], actions)
    # the rest of every order
    for k in range(3, 5):
        ids = []
        for t, evs in seqs.items():
            deliver(api, evs[k])
            ids.append(evs[k]["id"])
        settle(pg, ids)
    for t, order in tenants.items():
        rows = sub_state(pg, t)
        assert [(r[1], r[2], r[3]) for r in rows] == [("professional", "active", None)], (order, rows)
        for offset in (0, 3, 8, 31):
            assert limits(pg, t, now, offset) == ("professional", 100, None), (order, offset)
        assert pg.sql("SELECT status, first_failed_at = to_timestamp(%s) FROM billing.invoices "
                      "WHERE tenant_id = %s", (t1, t)) == [("paid", True)], order


def test_a_failure_delivered_late_grants_no_extra_days(pg, api, fx):  # noqa: F811
    """A renewal that failed ten days ago, its events delivered only now (in
    both orders): the grace period ended three days ago, Free limits apply
    at once."""
    # Dec 31, in the evening: the failure was in December, the grace period ended three days ago
    now = run_at(pg, utc(2027, 12, 31, 21, 0))
    seqs = {}
    for order in (("failed", "past_due"), ("past_due", "failed")):
        t, cus = new_tenant(pg, "late")
        sub_id = f"sub_{t}"
        evs = dunning_events(fx, cus, sub_id, now - 40 * DAY, now - 10 * DAY, now)
        seqs[t] = [event("customer.subscription.created", subscription(fx, sub_id, cus, "active", now - 40 * DAY),
                         now - 40 * DAY)] + [evs[n] for n in order]
    run_orders(pg, api, seqs)
    for t in seqs:
        plan, lim, reason = limits(pg, t, now, 0)
        assert (plan, lim) == ("free", 10) and "grace period" in reason, (t, plan, reason)
        assert pg.sql("SELECT grace_until = to_timestamp(%s) FROM billing.subscriptions WHERE tenant_id = %s "
                      "AND status = 'past_due'", (now - 3 * DAY, t)) == [(True,)]


def test_a_failed_payment_does_not_hide_newer_subscription_states(pg, api, fx):  # noqa: F811
    """The failure of an invoice (its event created at t+20, applied first)
    must not stamp the subscription: its upgrade at t+10 and its renewal at
    t+15 are newer subscription states and win."""
    # the 4th, in the evening; the renewal is in February
    now = run_at(pg, utc(2027, 3, 4, 20, 0))
    t0 = now - 40 * DAY
    seqs = {}
    for order in itertools.permutations(["failed", "upgrade", "renewal"]):
        t, cus = new_tenant(pg, "stamp")
        sub_id = f"sub_{t}"
        evs = {
            "failed": event("invoice.payment_failed",
                            invoice(fx, f"in_{t}_old", cus, sub_id, "open", t0 + 5), t0 + 20),
            "upgrade": event("customer.subscription.updated",
                             subscription(fx, sub_id, cus, "active", t0, key="enterprise_monthly"), t0 + 10),
            "renewal": event("customer.subscription.updated",
                             subscription(fx, sub_id, cus, "active", t0 + 30 * DAY, key="enterprise_monthly"),
                             t0 + 15),
        }
        seqs[t] = [event("customer.subscription.created", subscription(fx, sub_id, cus, "active", t0), t0)] + \
            [evs[n] for n in order]
    run_orders(pg, api, seqs)
    for t in seqs:
        rows = pg.sql("SELECT plan_id, status, current_period_start = to_timestamp(%s) FROM billing.subscriptions "
                      "WHERE tenant_id = %s", (t0 + 30 * DAY, t))
        assert rows == [("enterprise", "active", True)], rows


def test_deleted_customers_and_subscriptions_are_never_revived(pg, api, fx):  # noqa: F811
    """customer.deleted, then an older customer.updated: the tenant is not
    linked to the deleted customer again, and the invoices of its new
    customer (the tenant came back) are still mirrored.  An ended
    subscription is not revived by an older update."""
    # Jan 31, in the evening
    now = run_at(pg, utc(2027, 1, 31, 22, 0))
    seqs = {}
    for order in itertools.permutations(["deleted", "updated", "new_customer", "new_invoice"]):
        t = f"ret_{uuid.uuid4().hex[:8]}"
        pg.sql("SELECT billing.upsert_tenant(%s, 'Returning BV', 'r@ret.example')", (t,))
        old, new = f"cus_{t}_a", f"cus_{t}_b"
        cust = dict(copy.deepcopy(fx["customer"]), metadata={"tenant_id": t})
        evs = {
            "deleted": event("customer.deleted", dict(cust, id=old, created=now - 50 * DAY, deleted=True), now - 20 * DAY),
            "updated": event("customer.updated", dict(cust, id=old, created=now - 50 * DAY), now - 30 * DAY),
            "new_customer": event("customer.created", dict(cust, id=new, created=now - 10 * DAY), now - 10 * DAY),
            # an invoice of the new customer, without our metadata: known by its customer only
            "new_invoice": event("invoice.paid", invoice(fx, f"in_{t}_b", new, None, "paid", now - 9 * DAY,
                                                         parent=None), now - 9 * DAY),
        }
        seqs[t] = [event("customer.created", dict(cust, id=old, created=now - 50 * DAY), now - 50 * DAY)] + \
            [evs[n] for n in order]
    run_orders(pg, api, seqs)
    for t in seqs:
        assert pg.sql("SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = %s", (t,)) == [(f"cus_{t}_b",)]
        assert pg.sql("SELECT status FROM billing.invoices WHERE tenant_id = %s", (t,)) == [("paid",)]
        assert pg.sql("SELECT stripe_customer_id, deleted_at IS NOT NULL FROM billing.stripe_customers "
                      "WHERE tenant_id = %s ORDER BY 1", (t,)) == [(f"cus_{t}_a", True), (f"cus_{t}_b", False)]

    # a subscription: deleted, then an older update (and a same-second one)
    t, cus = new_tenant(pg, "subdel")
    sub_id = f"sub_{t}"
    run_orders(pg, api, {t: [
        event("customer.subscription.created", subscription(fx, sub_id, cus, "active", now - 40 * DAY), now - 40 * DAY),
        event("customer.subscription.deleted", subscription(fx, sub_id, cus, "canceled", now - 10 * DAY,
                                                            ended_at=now - 5 * DAY), now - 5 * DAY),
        event("customer.subscription.updated", subscription(fx, sub_id, cus, "active", now - 10 * DAY), now - 6 * DAY),
        event("customer.subscription.updated", subscription(fx, sub_id, cus, "past_due", now - 10 * DAY), now - 5 * DAY),
    ]})
    assert pg.sql("SELECT status, ended_at = to_timestamp(%s) FROM billing.subscriptions WHERE tenant_id = %s",
                  (now - 5 * DAY, t)) == [("canceled", True)]
    assert limits(pg, t, now, 0)[:2] == ("free", 10)


def test_relations_resolve_in_either_order(pg, api, fx):  # noqa: F811
    """An invoice before its subscription is linked when the subscription
    arrives; a dispute before its charge waits (never parked) and is applied
    when the charge arrives; a payment intent and its invoice are linked from
    either side."""
    pg.sql("ALTER SYSTEM SET qes_billing.webhook_max_attempts = 2")
    pg.sql("SELECT pg_reload_conf()")
    try:
        # the 1st, in the evening: the events are of the day before, in September
        now = run_at(pg, utc(2027, 10, 1, 20, 30))
        seqs = {}
        for order in itertools.permutations(["subscription", "invoice", "payment", "charge", "dispute"]):
            if order.index("dispute") > 2:       # 120 orders; those with the dispute early are the interesting half
                continue
            t, cus = new_tenant(pg, "rel")
            sub_id, inv_id, pi_id, ch_id = f"sub_{t}", f"in_{t}", f"pi_{t}", f"ch_{t}"
            pi = dict(copy.deepcopy(fx["payment_intent"]), id=pi_id, customer=cus, amount=2900, currency="usd",
                      status="succeeded", latest_charge=ch_id, invoice=inv_id)    # pinned shape: names its invoice
            evs = {
                "subscription": event("customer.subscription.created",
                                      subscription(fx, sub_id, cus, "active", now - DAY), now - DAY),
                "invoice": event("invoice.paid", invoice(fx, inv_id, cus, sub_id, "paid", now - DAY), now - DAY + 1),
                "payment": event("payment_intent.succeeded", pi, now - DAY + 2),
                "charge": event("charge.succeeded",
                                dict(copy.deepcopy(fx["charge"]), id=ch_id, customer=cus, payment_intent=pi_id,
                                     amount=2900, currency="usd", status="succeeded"), now - DAY + 2),
                "dispute": event("charge.dispute.created",
                                 dict(copy.deepcopy(fx["dispute"]), id=f"dp_{t}", charge=ch_id, payment_intent=None,
                                      amount=2900, currency="usd", reason="fraudulent"), now - 3600),
            }
            seqs[t] = [evs[n] for n in order]
        run_orders(pg, api, seqs)
        for t in seqs:
            assert pg.sql("SELECT i.subscription_id = s.subscription_id FROM billing.invoices i "
                          "JOIN billing.subscriptions s USING (tenant_id) WHERE i.tenant_id = %s", (t,)) == [(True,)]
            assert pg.sql("SELECT kind, status, stripe_charge_id, stripe_invoice_id FROM billing.payments "
                          "WHERE tenant_id = %s", (t,)) == [("subscription", "succeeded", f"ch_{t}", f"in_{t}")]
            assert pg.sql("SELECT count(*) FROM billing.disputes WHERE tenant_id = %s", (t,)) == [(1,)]
            assert pg.sql("SELECT disputed FROM billing.tenants WHERE tenant_id = %s", (t,)) == [(True,)]
        # nothing parked, nothing left waiting
        assert pg.sql("SELECT count(*) FROM billing.webhook_events WHERE state IN ('waiting', 'needs_review') "
                      "AND payload::jsonb -> 'data' -> 'object' ->> 'id' LIKE 'dp_rel_%%'") == [(0,)]
    finally:
        pg.sql("ALTER SYSTEM RESET qes_billing.webhook_max_attempts")
        pg.sql("SELECT pg_reload_conf()")


def test_newer_shapes_link_invoice_payments(pg, api, fx, session_fake_stripe):  # noqa: F811
    """API 2025-03-31 and later: the payment intent does not name its
    invoice, the invoice does not name its payment intent.  The link comes
    from the invoice's payments when the event carries them, else the worker
    asks Stripe for the invoice in the pinned version (which names it); an
    invoice_payment.paid event links it too."""
    # the 9th, late in the evening
    now = run_at(pg, utc(2027, 7, 9, 23, 0))
    fake = session_fake_stripe
    cases = {}
    for how in ("payments_in_event", "fetched", "invoice_payment_event"):
        t, cus = new_tenant(pg, "shape")
        inv_id, pi_id = f"in_{t}", f"pi_{t}"
        pi = copy.deepcopy(fx["payment_intent"])       # stripe-mock's: no invoice field
        assert "invoice" not in pi
        pi.update(id=pi_id, customer=cus, amount=2900, currency="usd", status="succeeded", latest_charge=None)
        inv = invoice(fx, inv_id, cus, None, "paid", now - 100, parent=None)
        assert "payment_intent" not in inv
        if how == "payments_in_event":
            inv["payments"] = {"object": "list", "has_more": False, "data": [
                {"id": f"inpay_{t}", "object": "invoice_payment", "invoice": inv_id, "is_default": True,
                 "status": "paid", "payment": {"type": "payment_intent", "payment_intent": pi_id}}]}
        pinned = dict(copy.deepcopy(inv), payment_intent=pi_id, subscription=None)
        pinned.pop("parent", None)
        pinned.pop("payments", None)
        with fake.lock:
            fake.objects[inv_id] = pinned             # what GET /v1/invoices/{id} answers in the pinned version
        evs = [event("payment_intent.succeeded", pi, now - 50), event("invoice.paid", inv, now - 40)]
        if how == "invoice_payment_event":
            evs.append(event("invoice_payment.paid",
                             {"id": f"inpay_{t}", "object": "invoice_payment", "invoice": inv_id, "is_default": True,
                              "status": "paid", "payment": {"type": "payment_intent", "payment_intent": pi_id}},
                             now - 39))
        cases[t] = evs
    original = fake.handle

    def handle(method, path, params):
        parts = [p for p in path.split("/") if p][1:]
        if method == "GET" and len(parts) == 2 and parts[0] == "invoices":
            return fake.get(parts[1], "invoice")
        return original(method, path, params)
    fake.handle = handle
    try:
        run_orders(pg, api, cases)
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE tenant_id LIKE 'shape_%' "
                             "AND state IN ('pending', 'in_flight', 'waiting'))", 30)
    finally:
        fake.handle = original
    for t in cases:
        assert pg.sql("SELECT kind, stripe_invoice_id FROM billing.payments WHERE tenant_id = %s", (t,)) == \
            [("subscription", f"in_{t}")], t
    fetched = [t for t in cases if pg.sql("SELECT count(*) FROM billing.stripe_requests WHERE tenant_id = %s "
                                          "AND kind = 'mirror.invoice.lookup' AND state = 'succeeded'", (t,))[0][0]]
    assert len(fetched) >= 1


def test_reconcile_tenant_refuses_bad_input_and_is_for_operators(pg):
    import psycopg
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown tenant"):
        pg.sql("SELECT billing.reconcile_tenant('nobody_here')")
    pg.sql("SELECT billing.upsert_tenant('rec_free', 'Free GmbH', 'f@free.example')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="has no Stripe customer"):
        pg.sql("SELECT billing.reconcile_tenant('rec_free')")
    with pg.connect() as c:
        c.execute("SET ROLE qes_tenant")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT billing.reconcile_tenant('rec_free')")
    with pg.connect() as c:
        c.execute("SET ROLE qes_admin")
        c.execute("SELECT * FROM billing.drift_report LIMIT 1")
        c.execute("SELECT * FROM billing.reconcile_runs LIMIT 1")
    for obj in ("billing.reconcile_tenant(text)", "billing.reconcile_now()"):
        assert pg.sql("SELECT obj_description(%s::regprocedure, 'pg_proc') IS NOT NULL", (obj,)) == [(True,)]
    assert pg.sql("SELECT obj_description('billing.drift_report'::regclass, 'pg_class') IS NOT NULL") == [(True,)]
