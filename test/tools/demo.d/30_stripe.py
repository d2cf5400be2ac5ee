# Stripe end to end: a tenant subscribes, pays, upgrades and buys a pack; the worker talks to Stripe
"""Run by `make run` after qes_billing_setup --all.

The tenant calls the API as PostgREST would (test/python/postgrest.py).
With the local fake (QES_DEMO_FAKE set, the default without keys) the
demo also plays the browser (confirming payments with the client secret,
as Stripe.js would) and delivers the fake's signed webhook events to
POST /rpc/stripe_webhook.  Against Stripe's test mode it stops where a
browser would have to confirm the first payment.
"""
import json
import os
import sys
import time
import urllib.request

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "python"))
from fake_stripe import signed  # noqa: E402
from postgrest import PostgREST  # noqa: E402
import psycopg  # noqa: E402

DSN = f"host={os.environ['PGHOST']} port={os.environ['PGPORT']} dbname={os.environ['PGDATABASE']} user=postgres"
FAKE = os.environ.get("QES_DEMO_FAKE")
TENANT = "acme-signing"
CLAIMS = {"role": "qes_tenant", "tenant_id": TENANT, "sub": "cfo@acme.example"}
db = psycopg.connect(DSN, autocommit=True)
api = PostgREST(DSN)
delivered = 0


def sql(q, *args):
    cur = db.execute(q, args)
    return cur.fetchall() if cur.description else []


def wait(query, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sql(query)[0][0]:
            return True
        time.sleep(0.1)
    return False


def outbox_done():
    wait("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE state IN ('waiting', 'pending', 'in_flight'))")


def fake(path, body=None):
    req = urllib.request.Request(FAKE + path, data=json.dumps(body).encode() if body is not None else None,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def deliver_events():
    """The fake's new events, signed, delivered as Stripe would."""
    global delivered
    secret = sql("SELECT coalesce(current_setting('qes_billing.stripe_test_webhook_secret', true), '')")[0][0] \
        or sql("SELECT split_part(billing.stored_webhook_secrets(), ',', 1)")[0][0]
    events = fake("/_fake/events")["data"][delivered:]
    delivered += len(events)
    codes = {}
    for ev in events:
        body, header = signed(ev, secret)
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        codes[r.status] = codes.get(r.status, 0) + 1
    wait("SELECT NOT EXISTS (SELECT 1 FROM billing.webhook_events WHERE state = 'received')")
    print(f"   Stripe delivered {len(events)} signed events: HTTP {codes}; "
          + ", ".join(sorted({e['type'] for e in events})))


def show_subscription(title):
    s = api.get("/subscription", claims=CLAIMS).body[0]
    limit = sql("SELECT coalesce(usage_limit::text, 'unlimited') FROM billing.check_limit(%s, 'signatures', 0)", TENANT)[0][0]
    print(f"   {title}: plan={s['plan']} interval={s['interval']} status={s['status']} "
          f"limits={s['limits_plan']} (signatures: {limit}) cancel_at_period_end={s['cancel_at_period_end']}"
          + (f" pending_change={s['pending_change']}" if s["pending_change"] else "")
          + (f" last_error={s['last_error']!r}" if s["last_error"] else ""))
    return s


def post(path, body):
    r = api.post(path, body=body, claims=CLAIMS)
    print(f"   POST {path} {json.dumps(body)} -> {r.status} {json.dumps(r.body)}")
    return r


sql("SELECT billing.upsert_tenant(%s, 'Acme Signing AG', 'billing@acme.example')", TENANT)
where = ("the local fake at " + FAKE) if FAKE else sql("SELECT current_setting('qes_billing.stripe_api_base')")[0][0]
print(f"   Stripe: {where}")
post("/rpc/create_subscription", {"plan": "professional", "interval": "month"})
outbox_done()
s = show_subscription("after Stripe answered")
print(f"   client_secret for the browser: {s['client_secret']}")
if not FAKE:
    print("   (Stripe test mode: confirm the payment in a browser with Stripe.js; the webhooks then arrive through PostgREST)")
    sys.exit(0)

print("   the browser confirms with a card that is declined, then with a good one:")
pi = s["client_secret"].split("_secret_")[0]
print("   decline:", fake("/_fake/confirm", {"payment_intent": pi, "payment_method": "pm_card_chargeDeclined"})["error"]["message"])
deliver_events()
show_subscription("after the decline")
fake("/_fake/confirm", {"payment_intent": pi, "payment_method": "pm_card_visa"})
deliver_events()
show_subscription("after payment")

post("/rpc/update_subscription", {"plan": "enterprise"})
outbox_done()
deliver_events()
show_subscription("after the upgrade")
post("/rpc/update_subscription", {"interval": "year"})
outbox_done()
deliver_events()
show_subscription("after switching to yearly")
post("/rpc/update_subscription", {"cancel_at_period_end": True})
outbox_done()
show_subscription("cancelling at period end")
post("/rpc/update_subscription", {"cancel_at_period_end": False})
outbox_done()
show_subscription("resumed")

r = post("/rpc/create_payment_intent", {"amount": 4900, "currency": "eur", "description": "Qualified timestamp pack"})
outbox_done()
pay = [p for p in api.get("/payments", claims=CLAIMS).body if p["payment_id"] == r.body["payment_id"]][0]
fake("/_fake/confirm", {"payment_intent": pay["payment_intent_id"], "payment_method": "pm_card_visa"})
deliver_events()

print("   GET /invoices:")
for i in api.get("/invoices", claims=CLAIMS).body:
    print(f"     {i['number']} {i['status']:5} {i['amount_paid']:>6} {i['currency']}  {i['hosted_invoice_url']}")
print("   GET /payments:")
for p in api.get("/payments", claims=CLAIMS).body:
    print(f"     #{p['payment_id']} {p['kind']:12} {p['amount']:>6} {p['currency']} {p['status']:10} {p['description'] or ''}")
print("   the outbox:")
for row in sql("SELECT kind, count(*), sum(attempts), string_agg(DISTINCT state, ',') FROM billing.stripe_requests "
               "WHERE tenant_id = %s GROUP BY kind ORDER BY min(request_id)", TENANT):
    print(f"     {row[0]:22} requests={row[1]} attempts={row[2]} state={row[3]}")
print("   audit trail of the tenant:", ", ".join(a for (a,) in sql(
    "SELECT action FROM billing.audit_log WHERE tenant_id = %s ORDER BY audit_id", TENANT)))
