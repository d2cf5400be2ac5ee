"""Chaos: a realistic lifecycle of a few thousand events for many tenants
(subscribe, renew, fail, recover, upgrade, cancel, dispute), delivered
shuffled with every event repeated up to three times, ends in exactly the
same state as the same events delivered once in order.

Two copies of the same lifecycle run side by side under different tenant,
customer and object ids ("ord" in order, "shf" shuffled); their final
states are compared with the copy prefix taken out.
"""
import copy
import json
import random
import time
from datetime import datetime, timezone

import pytest
import stripe

from conftest import TEST_KEYS
from postgrest import PostgREST
from test_webhook_handlers import fx  # noqa: F401  (fixture)

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
TENANTS = 100


def lifecycle(fx, copy_, i, t0):
    """The events of tenant i, in Stripe's order, for one copy."""
    cus = f"cus_{copy_}{i}"
    sub_id = f"sub_{copy_}{i}"
    t = t0
    events = []

    def ev(type_, o, same_second=False):
        nonlocal t
        if not same_second:
            t += 10
        events.append({"id": f"evt_{copy_}_{i}_{len(events)}", "object": "event", "api_version": "2024-06-20",
                       "created": t, "livemode": False, "type": type_, "data": {"object": o}})

    def sub(status, key="professional_monthly", interval="month", period=0, **kw):
        o = copy.deepcopy(fx["subscription"])
        o.update(id=sub_id, customer=cus, status=status, metadata={"tenant_id": f"{copy_}{i}"},
                 cancel_at_period_end=False, trial_end=None)
        o.update(kw)
        item = o["items"]["data"][0]
        item["price"].update(id=f"price_{key}", lookup_key=key)
        item["price"]["recurring"]["interval"] = interval
        start = t0 + period * 30 * 86400
        item["current_period_start"], item["current_period_end"] = start, start + 30 * 86400
        return o

    def invoice(n, status, **kw):
        o = copy.deepcopy(fx["invoice"])
        o.update(id=f"in_{copy_}{i}_{n}", customer=cus, status=status, number=f"N-{i}-{n}",
                 amount_due=2900, amount_paid=2900 if status == "paid" else 0,
                 amount_remaining=0 if status == "paid" else 2900, created=t0 + n)
        o["parent"]["subscription_details"]["subscription"] = sub_id
        o.update(kw)
        return o

    ev("customer.created", dict(copy.deepcopy(fx["customer"]), id=cus, metadata={"tenant_id": f"{copy_}{i}"}))
    ev("customer.subscription.created", sub("incomplete"))
    ev("invoice.created", invoice(0, "draft"))
    ev("invoice.finalized", invoice(0, "open"))
    if i % 3 == 0:        # first payment fails, then recovers
        ev("invoice.payment_failed", invoice(0, "open"))
        ev("customer.subscription.updated", sub("past_due"), same_second=True)
        ev("invoice.paid", invoice(0, "paid"))
        ev("customer.subscription.updated", sub("active"), same_second=True)
    else:
        ev("invoice.paid", invoice(0, "paid"))
        ev("customer.subscription.updated", sub("active"), same_second=True)
    pi = dict(copy.deepcopy(fx["payment_intent"]), id=f"pi_{copy_}{i}", customer=cus, amount=2900,
              status="succeeded", metadata={"tenant_id": f"{copy_}{i}"}, invoice=f"in_{copy_}{i}_0")
    ev("payment_intent.succeeded", pi)
    ch = dict(copy.deepcopy(fx["charge"]), id=f"ch_{copy_}{i}", customer=cus, payment_intent=pi["id"],
              amount=2900, status="succeeded")
    ev("charge.succeeded", ch, same_second=True)
    for n in range(1, 4):  # renewals, one of them failing for some tenants
        ev("invoice.created", invoice(n, "draft"))
        ev("invoice.finalized", invoice(n, "open"))
        if (i + n) % 7 == 0:
            ev("invoice.payment_failed", invoice(n, "open"))
            ev("customer.subscription.updated", sub("past_due", period=n))
        ev("invoice.paid", invoice(n, "paid"))
        ev("customer.subscription.updated", sub("active", period=n))
    if i % 4 == 0:
        ev("customer.subscription.updated", sub("active", "enterprise_yearly", "year", period=3))
    if i % 5 == 0:
        dp = dict(copy.deepcopy(fx["dispute"]), id=f"dp_{copy_}{i}", charge=ch["id"], payment_intent=pi["id"],
                  amount=2900, reason="fraudulent", status="needs_response")
        ev("charge.dispute.created", dp)
    if i % 6 == 0:
        ev("customer.subscription.trial_will_end", sub("active", period=3, trial_end=t0 + 99 * 86400))
    if i % 2 == 0:
        ev("customer.subscription.updated", sub("active", period=3, cancel_at_period_end=True))
        if i % 4 == 2:
            ev("customer.subscription.deleted", sub("canceled", period=3, cancel_at_period_end=True))
    return events


def deliver(api, e):
    body = json.dumps(e)
    header = stripe.WebhookSignature.generate_signature_header(body, SECRET)
    r = api.post("/rpc/stripe_webhook", body=body,
                 headers={"Content-Type": "application/json", "Stripe-Signature": header})
    assert r.status == 200, r.body


def state(pg, copy_):
    """The final state of one copy, with the copy prefix taken out of tenant ids."""
    n = len(copy_) + 1
    queries = {
        "subscriptions": f"SELECT substr(tenant_id, {n}), plan_id, billing_interval, status, cancel_at_period_end, "
                         "grace_until IS NOT NULL, current_period_start FROM billing.subscriptions",
        "invoices": f"SELECT substr(tenant_id, {n}), number, status, amount_due, amount_paid, amount_remaining "
                    "FROM billing.invoices",
        "payments": f"SELECT substr(tenant_id, {n}), kind, amount, status FROM billing.payments",
        "disputes": f"SELECT substr(tenant_id, {n}), amount, reason FROM billing.disputes",
        "tenants": f"SELECT substr(tenant_id, {n}), disputed, stripe_customer_id IS NOT NULL FROM billing.tenants",
        # notifications of facts (a failed invoice, a dispute, a trial ending); those of
        # transitions the mirror passed through (payment.recovered, grace.ended) depend
        # on the order it saw them in
        "notifications": f"SELECT substr(tenant_id, {n}), kind, audience FROM (SELECT * FROM billing.notifications "
                         "WHERE kind NOT IN ('payment.recovered', 'grace.ended')) n",
    }
    return {name: sorted(map(tuple, pg.sql(sql + " WHERE tenant_id LIKE %s", (copy_ + "%",))), key=repr)
            for name, sql in queries.items()}


AT = datetime(2027, 8, 31, 21, 40, tzinfo=timezone.utc)


def test_shuffled_repeated_delivery_converges(pg, fx):  # noqa: F811
    pg.sql("ALTER SYSTEM SET qes_billing.retry_base_delay = '20ms'")
    pg.sql("ALTER SYSTEM SET qes_billing.webhook_max_attempts = 20")
    pg.sql("SELECT pg_reload_conf()")
    api = PostgREST(pg.dsn(user="authenticator"))
    # a fixed date through the billing clock (the evening of a month's last
    # day), never the day the suite runs; the lifecycles start 10 days before
    pg.set_clock(AT)
    try:
        t0 = int(AT.timestamp()) - 10 * 86400
        for copy_ in ("ord", "shf"):
            for i in range(TENANTS):
                pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (f"{copy_}{i}", f"T{i}", f"t{i}@chaos.example"))
                # as when the outbox created the customer: linked before Stripe can send anything about it
                pg.sql("UPDATE billing.tenants SET stripe_customer_id = %s WHERE tenant_id = %s",
                       (f"cus_{copy_}{i}", f"{copy_}{i}"))
        ordered = [e for i in range(TENANTS) for e in lifecycle(fx, "ord", i, t0)]
        ordered.sort(key=lambda e: e["created"])
        shuffled = [e for i in range(TENANTS) for e in lifecycle(fx, "shf", i, t0)]
        rnd = random.Random(7)
        shuffled = [e for e in shuffled for _ in range(rnd.randint(1, 3))]
        rnd.shuffle(shuffled)
        for e in ordered:
            deliver(api, e)
        # in order means applied in order: let the worker finish before the next copy
        assert pg.wait_until("SELECT count(*) = 0 FROM billing.webhook_events "
                             "WHERE state = 'received' AND stripe_event_id LIKE 'evt_ord%'", timeout=120)
        for e in shuffled:
            deliver(api, e)
        assert pg.wait_until("SELECT count(*) = 0 FROM billing.webhook_events "
                             "WHERE state = 'received' AND stripe_event_id LIKE 'evt_shf%'", timeout=180), \
            pg.sql("SELECT stripe_event_id, last_error FROM billing.webhook_events WHERE state = 'received' LIMIT 5")
        parked = pg.sql("SELECT stripe_event_id, last_error FROM billing.webhook_events "
                        "WHERE state = 'needs_review' AND stripe_event_id ~ '^evt_(ord|shf)'")
        assert parked == []
        print(f"chaos: {len(ordered)} events in order, {len(shuffled)} shuffled deliveries")
        assert len(ordered) > 2000 and len(shuffled) > 1.8 * len(ordered)
        a, b = state(pg, "ord"), state(pg, "shf")
        for table in a:
            assert a[table] == b[table], table
        assert len(a["subscriptions"]) == TENANTS and len(a["disputes"]) == TENANTS // 5
    finally:
        api.close()
        pg.reset_clock()
        pg.sql("ALTER SYSTEM RESET qes_billing.retry_base_delay")
        pg.sql("ALTER SYSTEM RESET qes_billing.webhook_max_attempts")
        pg.sql("SELECT pg_reload_conf()")
