"""Stripe events applied by the worker, end to end.

Each event wraps an object from stripe-mock's fixtures (Stripe's current API
shapes), pointed at our tenant; it is signed with stripe-python, delivered
through POST /rpc/stripe_webhook as PostgREST would, and applied by the
background worker.

The module runs at a fixed date: the billing clock reads AT when the module
starts and runs on from there, and the events' Stripe times are computed
from it (now()), so no test depends on the day it runs.
"""
import copy
import json
import time
import uuid
from datetime import datetime, timezone

import pytest
import stripe

from conftest import TEST_KEYS, fixture_get, tenant_claims
from postgrest import PostgREST

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
TENANT = "whk"
CUSTOMER = "cus_whk0001"
# the 3rd of a month in the evening: the grace period ends on the 10th, the
# subscription's period began the day before
AT = datetime(2027, 3, 3, 21, 15, tzinfo=timezone.utc)
_offset = [0.0]          # how far the billing clock runs ahead of the real one


def now():
    """The billing clock's time in Unix seconds: what the events are stamped with."""
    return int(time.time() + _offset[0])


def set_clock(pg, at):
    """The billing clock at `at` (a datetime), running on; now() follows it."""
    pg.set_clock(at)
    _offset[0] = at.timestamp() - time.time()


@pytest.fixture(scope="module")
def fx(stripe_mock):
    objs = {name: fixture_get(stripe_mock, path) for name, path in {
        "customer": "customers/cus_x", "subscription": "subscriptions/sub_x", "invoice": "invoices/in_x",
        "payment_intent": "payment_intents/pi_x", "charge": "charges/ch_x", "dispute": "disputes/dp_x"}.items()}
    return objs


@pytest.fixture(scope="module")
def wh(pg):
    set_clock(pg, AT)
    pg.sql("SELECT billing.upsert_tenant(%s, 'Webhook GmbH', 'wh@t.example')", (TENANT,))
    api = PostgREST(pg.dsn(user="authenticator"))
    yield api
    api.close()
    pg.reset_clock()
    _offset[0] = 0.0


def obj(fx, name, **changes):
    o = copy.deepcopy(fx[name])
    o["id"] = o["id"].split("_")[0] + "_" + uuid.uuid4().hex[:14]
    o.update(changes)
    return o


def send(pg, api, type_, o, created=None, wait=True):
    ev = {"id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2024-06-20",
          "created": created or now(), "livemode": False, "type": type_,
          "data": {"object": o}, "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None}}
    body = json.dumps(ev)
    header = stripe.WebhookSignature.generate_signature_header(body, SECRET)
    r = api.post("/rpc/stripe_webhook", body=body,
                 headers={"Content-Type": "application/json", "Stripe-Signature": header})
    assert r.status == 200, r.body
    if not wait:
        return ev["id"], None
    assert pg.wait_until(f"SELECT state <> 'received' FROM billing.webhook_events "
                         f"WHERE stripe_event_id = '{ev['id']}'"), pg.log()[-2000:]
    return ev["id"], pg.sql("SELECT state, last_error FROM billing.webhook_events WHERE stripe_event_id = %s",
                            (ev["id"],))[0]


def subscription(fx, status="active", lookup_key="professional_monthly", interval="month", **changes):
    changes.setdefault("cancel_at_period_end", False)
    changes.setdefault("trial_end", None)
    o = obj(fx, "subscription", customer=CUSTOMER, status=status, **changes)
    item = o["items"]["data"][0]
    item["price"]["id"] = f"price_{lookup_key}"
    item["price"]["lookup_key"] = lookup_key
    item["price"]["recurring"]["interval"] = interval
    t = now()
    item["current_period_start"], item["current_period_end"] = t - 86400, t + 29 * 86400
    return o


def sub_row(pg):
    return pg.sql("SELECT plan_id, billing_interval, status, cancel_at_period_end, grace_until IS NOT NULL "
                  "FROM billing.subscriptions WHERE tenant_id = %s AND status NOT IN ('canceled', 'incomplete_expired')",
                  (TENANT,))


def limit(pg):
    return pg.sql("SELECT plan_id, usage_limit, reason FROM billing.check_limit(%s, 'signatures', 0)", (TENANT,))[0]


def test_customer_created_links_the_tenant(pg, wh, fx):
    o = obj(fx, "customer", metadata={"tenant_id": TENANT})
    o["id"] = CUSTOMER
    _, (state, err) = send(pg, wh, "customer.created", o)
    assert state == "applied", err
    assert pg.sql("SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = %s", (TENANT,))[0][0] == CUSTOMER


def test_subscription_lifecycle_and_limits(pg, wh, fx):
    sub = subscription(fx)
    t0 = now()
    _, (state, err) = send(pg, wh, "customer.subscription.created", sub, created=t0)
    assert state == "applied", err
    assert sub_row(pg) == [("professional", "month", "active", False, False)]
    assert limit(pg)[:2] == ("professional", 100)
    # cancel at period end, then an OLDER update arrives late: the newer state stays
    newer = copy.deepcopy(sub)
    newer["cancel_at_period_end"] = True
    send(pg, wh, "customer.subscription.updated", newer, created=t0 + 10)
    older = copy.deepcopy(sub)
    older["status"] = "incomplete"
    _, (state, _) = send(pg, wh, "customer.subscription.updated", older, created=t0 + 5)
    assert state == "applied"
    assert sub_row(pg) == [("professional", "month", "active", True, False)]
    # upgrade to Enterprise yearly: limits follow at once
    up = subscription(fx, lookup_key="enterprise_yearly", interval="year")
    up["id"] = sub["id"]
    send(pg, wh, "customer.subscription.updated", up, created=t0 + 20)
    assert sub_row(pg) == [("enterprise", "year", "active", False, False)]
    assert limit(pg)[:2] == ("enterprise", None)
    # a metered item (usage billed through meters) listed before the plan's
    # licensed one: the plan is the licensed item's, whatever the order
    both = copy.deepcopy(up)
    metered = copy.deepcopy(both["items"]["data"][0])
    metered["id"] = "si_" + uuid.uuid4().hex[:14]
    metered["price"] = dict(metered["price"], id="price_meter_signatures", lookup_key=None,
                            recurring=dict(metered["price"]["recurring"], usage_type="metered"))
    both["items"]["data"].insert(0, metered)
    _, (state, err) = send(pg, wh, "customer.subscription.updated", both, created=t0 + 25)
    assert state == "applied", err
    assert sub_row(pg) == [("enterprise", "year", "active", False, False)]


def test_invoices_mirror_and_list(pg, wh, fx):
    sub_id = pg.sql("SELECT stripe_subscription_id FROM billing.subscriptions WHERE tenant_id = %s "
                    "AND status = 'active'", (TENANT,))[0][0]
    inv = obj(fx, "invoice", customer=CUSTOMER, status="draft", number="QES-0001",
              hosted_invoice_url="https://invoice.stripe.com/i/x", invoice_pdf="https://pay.stripe.com/x.pdf",
              created=now())
    inv["parent"]["subscription_details"]["subscription"] = sub_id
    t0 = now()
    send(pg, wh, "invoice.created", inv, created=t0)
    send(pg, wh, "invoice.paid", dict(inv, status="paid", amount_paid=inv["amount_due"], amount_remaining=0), created=t0 + 2)
    send(pg, wh, "invoice.finalized", dict(inv, status="open"), created=t0 + 1)   # late, older
    r = wh.get("/invoices", claims=tenant_claims(TENANT))
    assert r.status == 200
    mine = [i for i in r.body if i["invoice_id"] == inv["id"]]
    assert len(mine) == 1 and mine[0]["status"] == "paid" and mine[0]["amount_paid"] == inv["amount_due"]
    assert mine[0]["hosted_invoice_url"] == "https://invoice.stripe.com/i/x" and mine[0]["number"] == "QES-0001"
    assert wh.get("/invoices", claims=tenant_claims("someone_else")).body == []


def test_dunning_grace_free_limits_and_recovery(pg, wh, fx):
    sub = subscription(fx)
    sub["id"] = pg.sql("SELECT stripe_subscription_id FROM billing.subscriptions WHERE tenant_id = %s "
                       "AND status = 'active'", (TENANT,))[0][0]
    t0 = now() + 100
    send(pg, wh, "customer.subscription.updated", sub, created=t0)
    inv = obj(fx, "invoice", customer=CUSTOMER, status="open", created=t0)
    inv["parent"]["subscription_details"]["subscription"] = sub["id"]
    _, (state, err) = send(pg, wh, "invoice.payment_failed", inv, created=t0 + 1)
    assert state == "applied", err
    # the invoice alone does not change the subscription: Stripe's own update does
    assert sub_row(pg) == [("professional", "month", "active", False, False)]
    send(pg, wh, "customer.subscription.updated", dict(sub, status="past_due"), created=t0 + 1)
    assert sub_row(pg) == [("professional", "month", "past_due", False, True)]
    # the grace period runs from the failed attempt (the event's Stripe time):
    # 7 days from the 3rd in the evening, the 10th in the evening
    grace = datetime.fromtimestamp(t0 + 1 + 7 * 86400, timezone.utc)
    assert pg.sql("SELECT grace_until FROM billing.subscriptions "
                  "WHERE tenant_id = %s AND status = 'past_due'", (TENANT,)) == [(grace,)]
    assert (grace.month, grace.day) == (AT.month, 10), grace
    assert limit(pg)[:2] == ("professional", 100)          # paid limits during the grace period
    assert pg.sql("SELECT count(*) FROM billing.notifications WHERE tenant_id = %s AND kind = 'payment.failed'",
                  (TENANT,))[0][0] == 1
    back = now()
    try:
        set_clock(pg, datetime.fromtimestamp(t0 + 8 * 86400, timezone.utc))   # the grace period ended unpaid
        plan, lim, reason = limit(pg)
        assert (plan, lim) == ("free", 10) and "grace period" in reason
        send(pg, wh, "invoice.paid", dict(inv, status="paid", amount_paid=inv["amount_due"]), created=t0 + 2)
        # paid after the past_due state: the paid limits are back before Stripe's update arrives
        assert sub_row(pg) == [("professional", "month", "past_due", False, False)]
        assert limit(pg) == ("professional", 100, None)
        send(pg, wh, "customer.subscription.updated", sub, created=t0 + 2)
        assert sub_row(pg) == [("professional", "month", "active", False, False)]
        assert limit(pg) == ("professional", 100, None)
    finally:
        set_clock(pg, datetime.fromtimestamp(back, timezone.utc))
    actions = [a for (a,) in pg.sql("SELECT action FROM billing.audit_log WHERE tenant_id = %s "
                                    "AND action LIKE 'dunning.%%' ORDER BY audit_id", (TENANT,))]
    assert actions[-2:] == ["dunning.started", "dunning.recovered"]


def test_payments_and_dispute(pg, wh, fx):
    pi = obj(fx, "payment_intent", customer=CUSTOMER, amount=5000, status="succeeded",
             metadata={"tenant_id": TENANT}, latest_charge=None)
    send(pg, wh, "payment_intent.succeeded", pi)
    ch = obj(fx, "charge", customer=CUSTOMER, payment_intent=pi["id"], amount=5000, status="succeeded")
    send(pg, wh, "charge.succeeded", ch)
    assert pg.sql("SELECT status, amount, stripe_charge_id FROM billing.payments WHERE stripe_payment_intent_id = %s",
                  (pi["id"],)) == [("succeeded", 5000, ch["id"])]
    failed = obj(fx, "payment_intent", customer=CUSTOMER, amount=700, status="requires_payment_method",
                 last_payment_error={"code": "card_declined", "decline_code": "insufficient_funds",
                                     "message": "Your card has insufficient funds."})
    send(pg, wh, "payment_intent.payment_failed", failed)
    assert pg.sql("SELECT status, failure_code FROM billing.payments WHERE stripe_payment_intent_id = %s",
                  (failed["id"],)) == [("failed", "insufficient_funds")]
    dp = obj(fx, "dispute", charge=ch["id"], payment_intent=pi["id"], amount=5000, reason="fraudulent")
    _, (state, err) = send(pg, wh, "charge.dispute.created", dp)
    assert state == "applied", err
    assert pg.sql("SELECT disputed FROM billing.tenants WHERE tenant_id = %s", (TENANT,))[0][0] is True
    assert pg.sql("SELECT audience FROM billing.notifications WHERE tenant_id = %s AND kind = 'dispute.created'",
                  (TENANT,)) == [("operator",)]
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'dispute.created' AND tenant_id = %s",
                  (TENANT,))[0][0] == 1


def test_trial_will_end_and_unknown_and_foreign(pg, wh, fx):
    sub = subscription(fx, status="trialing", trial_end=now() + 3 * 86400)
    send(pg, wh, "customer.subscription.trial_will_end", sub)
    assert pg.sql("SELECT count(*) FROM billing.notifications WHERE tenant_id = %s "
                  "AND kind = 'subscription.trial_will_end'", (TENANT,))[0][0] == 1
    _, (state, _) = send(pg, wh, "plan.created", {"id": "plan_1", "object": "plan"})
    assert state == "ignored"
    _, (state, _) = send(pg, wh, "invoice.paid", obj(fx, "invoice", customer="cus_not_ours"))
    assert state == "ignored"


def test_failing_event_is_parked_and_replayed(pg, wh, fx):
    pg.sql("ALTER SYSTEM SET qes_billing.webhook_max_attempts = 2")
    pg.sql("ALTER SYSTEM SET qes_billing.retry_base_delay = '10ms'")
    pg.sql("SELECT pg_reload_conf()")
    try:
        time.sleep(0.5)
        bad = subscription(fx, lookup_key="gold_monthly")       # a price no plan has
        bad["id"] = pg.sql("SELECT stripe_subscription_id FROM billing.subscriptions WHERE tenant_id = %s "
                           "AND status NOT IN ('canceled', 'incomplete_expired')", (TENANT,))[0][0]
        eid, _ = send(pg, wh, "customer.subscription.updated", bad, created=now() + 1000, wait=False)
        assert pg.wait_until(f"SELECT state = 'needs_review' FROM billing.webhook_events WHERE stripe_event_id = '{eid}'")
        attempts, last_error = pg.sql("SELECT attempts, last_error FROM billing.webhook_events "
                                      "WHERE stripe_event_id = %s", (eid,))[0]
        assert attempts == 2 and "price_gold_monthly which is in no plan" in last_error
        assert pg.sql("SELECT parked FROM billing.webhook_metrics")[0][0] >= 1
        # the operator fixes the catalog and replays
        pg.sql("INSERT INTO billing.plans (plan_id, name, tier) VALUES ('gold', 'Gold', 5)")
        pg.sql("INSERT INTO billing.prices (price_key, plan_id, billing_interval, unit_amount) "
               "VALUES ('gold_monthly', 'gold', 'month', 19900)")
        assert pg.sql("SELECT billing.replay_webhook(%s)", (eid,))[0][0] == 1
        assert pg.wait_until(f"SELECT state = 'applied' FROM billing.webhook_events WHERE stripe_event_id = '{eid}'")
        assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'webhook.replayed' "
                      "AND details ->> 'event_id' = %s", (eid,))[0][0] == 1
        assert sub_row(pg)[0][0] == "gold"
    finally:
        # the catalog as the other tests expect it
        pg.sql("UPDATE billing.plans SET active = false WHERE plan_id = 'gold'")
        pg.sql("ALTER SYSTEM RESET qes_billing.webhook_max_attempts")
        pg.sql("ALTER SYSTEM RESET qes_billing.retry_base_delay")
        pg.sql("SELECT pg_reload_conf()")
    latency = pg.sql("SELECT latency_p50_s, latency_p99_s, applied_last_hour FROM billing.webhook_metrics")[0]
    assert latency[2] > 0 and latency[0] is not None


def test_customer_updated_and_deleted(pg, wh, fx):
    other = "cus_whk_other"
    pg.sql("SELECT billing.upsert_tenant('whk2', 'Second GmbH', 'w2@t.example')")
    o = obj(fx, "customer", metadata={"tenant_id": "whk2"})
    o["id"] = other
    _, (state, err) = send(pg, wh, "customer.updated", o)
    assert state == "applied", err
    assert pg.sql("SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = 'whk2'")[0][0] == other
    _, (state, err) = send(pg, wh, "customer.deleted", dict(o, deleted=True))
    assert state == "applied", err
    assert pg.sql("SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = 'whk2'")[0][0] is None


def test_subscription_deleted_falls_back_to_free(pg, wh, fx):
    sub_id = pg.sql("SELECT stripe_subscription_id FROM billing.subscriptions WHERE tenant_id = %s "
                    "AND status NOT IN ('canceled', 'incomplete_expired')", (TENANT,))[0][0]
    gone = subscription(fx, status="canceled")
    gone["id"] = sub_id
    _, (state, err) = send(pg, wh, "customer.subscription.deleted", gone, created=now() + 5000)
    assert state == "applied", err
    assert sub_row(pg) == []
    assert limit(pg)[:2] == ("free", 10)


def test_charge_failed(pg, wh, fx):
    pi = obj(fx, "payment_intent", customer=CUSTOMER, amount=1200, status="processing",
             metadata={"tenant_id": TENANT})
    send(pg, wh, "payment_intent.succeeded", dict(pi, status="processing"))
    ch = obj(fx, "charge", customer=CUSTOMER, payment_intent=pi["id"], amount=1200, status="failed",
             failure_code="card_declined", failure_message="Your card was declined.")
    _, (state, err) = send(pg, wh, "charge.failed", ch, created=now() + 1)
    assert state == "applied", err
    assert pg.sql("SELECT status, failure_code, stripe_charge_id FROM billing.payments "
                  "WHERE stripe_payment_intent_id = %s", (pi["id"],)) == [("failed", "card_declined", ch["id"])]


def test_paused_worker_keeps_events_queued(pg, wh, fx):
    pg.sql("ALTER SYSTEM SET qes_billing.worker_paused = on")
    pg.sql("SELECT pg_reload_conf()")
    try:
        time.sleep(0.5)
        eid, _ = send(pg, wh, "invoice.created", obj(fx, "invoice", customer=CUSTOMER, status="draft"), wait=False)
        time.sleep(1.5)
        assert pg.sql("SELECT state FROM billing.webhook_events WHERE stripe_event_id = %s", (eid,))[0][0] == "received"
        assert pg.sql("SELECT alive FROM billing.worker_status")[0][0] is True   # heartbeat goes on
    finally:
        pg.sql("ALTER SYSTEM RESET qes_billing.worker_paused")
        pg.sql("SELECT pg_reload_conf()")
    assert pg.wait_until(f"SELECT state = 'applied' FROM billing.webhook_events WHERE stripe_event_id = '{eid}'")
