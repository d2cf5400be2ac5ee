"""The Stripe worker end to end: the outbox sent by the background worker
(libcurl) to stripe-mock, which validates every request against Stripe's
API specification, and to the stateful fake (fake_stripe.py), which keeps
state, replays idempotent requests and injects faults.

Tenants call the API through the PostgREST helper; the fake's events are
delivered signed through POST /rpc/stripe_webhook, as Stripe would.
"""
import json
import os
import re
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import TEST_KEYS, amcheck_and_stop, tenant_claims
from fake_stripe import FakeStripe, signed
from pgcluster import Cluster
from postgrest import PostgREST

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
OPEN = "state IN ('waiting', 'pending', 'in_flight')"
# The fake's clock and the billing clock stay on the real clock here: the
# worker stamps the state in Stripe's answers with the time it claimed the
# request (billing.outbox_state_at, the real clock), and the mirror keeps the
# newest state, so answers and the fake's events interleave only when the
# fake's clock is the real one.  No assertion here depends on the day: the
# periods checked are Stripe's (the fake's), compared with the fake's own;
# limits follow the subscription's status.  (Tests that write Stripe's events
# themselves run at fixed dates: test_mirror_order, test_webhook_handlers.)


def set_clocks(pg, fake, at=None):
    """The billing clock and the fake's at `at` together (both run on with
    the real clock from there); None: the real clock."""
    if at is None:
        pg.reset_clock()
        fake.reset_clock()
    else:
        pg.set_clock(at)
        fake.set_clock(at)


def ts(value):
    """A timestamp from the API (JSON) or from Stripe (Unix seconds)."""
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    return datetime.fromisoformat(value)


def cluster_for(name, base, **conf):
    settings = {"qes_billing.stripe_api_base": f"'{base}'", "qes_billing.retry_base_delay": "'20ms'",
                "qes_billing.retry_max_delay": "'400ms'", "qes_billing.request_timeout": "'1s'",
                "qes_billing.max_attempts": "30", "qes_billing.worker_naptime": "'200ms'"}
    settings.update(conf)
    c = Cluster(name, env=TEST_KEYS, conf=settings).start()
    assert c.wait_until("SELECT alive FROM billing.worker_status"), c.log()
    return c


def setup_command(pg, *args, timeout=60):
    exe = os.path.join(pg.bindir, "qes_billing_setup")
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(pg.port), PGDATABASE=pg.database, PGUSER="postgres")
    return subprocess.run([exe, *args, "--timeout", "30"], env=env, capture_output=True, text=True,
                          timeout=timeout)


def drain(pg, timeout=60):
    assert pg.wait_until(f"SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE {OPEN})", timeout), \
        pg.sql(f"SELECT request_id, kind, state, attempts, error FROM billing.stripe_requests WHERE {OPEN}")


# ---- stripe-mock: every kind of request is one Stripe accepts ------------

def test_every_request_kind_is_valid_for_stripe(stripe_mock):
    # no next reconciliation pass queued after the one asked for below
    pg = cluster_for("smock", stripe_mock, **{"qes_billing.reconcile_interval": "0"})
    try:
        r = setup_command(pg, "--all")
        assert "setup.check" in r.stdout, r.stdout + r.stderr
        drain(pg)
        # stripe-mock answers with fixtures: give the catalog a price of its subscriptions
        pg.sql("UPDATE billing.prices SET stripe_price_id = 'price_' || price_key "
               "WHERE unit_amount > 0 AND stripe_price_id IS NULL")
        api = PostgREST(pg.dsn(user="authenticator"))
        pg.sql("SELECT billing.upsert_tenant('sm', 'Stripe Mock AG', 'billing@sm.example')")
        assert api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=tenant_claims("sm")).status == 200
        assert pg.wait_until("SELECT count(*) = 2 FROM billing.stripe_requests "
                             "WHERE tenant_id = 'sm' AND http_status IS NOT NULL"), pg.log()[-3000:]
        # a subscription as stripe-mock knows it, so that changes can be asked for
        pg.sql("UPDATE billing.subscriptions SET status = 'active', stripe_subscription_id = 'sub_sm1', "
               "stripe_item_id = 'si_sm1', pending_change = NULL WHERE tenant_id = 'sm'")
        pg.sql("UPDATE billing.tenants SET stripe_customer_id = 'cus_sm1' WHERE tenant_id = 'sm'")
        for body in ({"plan": "enterprise"}, {"interval": "year"}, {"cancel_at_period_end": True},
                     {"plan": "enterprise", "proration": "none"}):
            r = api.post("/rpc/update_subscription", body=body, claims=tenant_claims("sm"))
            assert r.status == 200, r.body
            pg.sql("UPDATE billing.subscriptions SET pending_change = NULL, plan_id = 'professional', "
                   "billing_interval = 'month', cancel_at_period_end = false, status = 'active' WHERE tenant_id = 'sm'")
        assert api.post("/rpc/create_payment_intent", body={"amount": 4900, "currency": "eur", "description": "pack"},
                        claims=tenant_claims("sm")).status == 200
        pg.sql("SELECT billing.outbox_enqueue('sm', 'subscription.refresh', 'GET', '/v1/subscriptions/sub_sm1')")
        # what the mirror asks Stripe for (billing.fetch_object)
        for obj, oid in (("subscription", "sub_sm2"), ("invoice", "in_sm1"), ("customer", "cus_sm1"),
                         ("charge", "ch_sm1"), ("payment_intent", "pi_sm1")):
            pg.sql("SELECT billing.fetch_object('sm', %s, %s)", (obj, oid))
        # what reconciliation lists (sql/install/86_reconcile.sql)
        pg.sql("SELECT billing.reconcile_now()")
        pg.sql("SELECT billing.reconcile_tenant('sm')")
        pg.sql("SELECT billing.outbox_enqueue('sm', 'reconcile.disputes.list', 'GET', '/v1/disputes', "
               "'{\"charge\": \"ch_sm1\", \"limit\": 100}')")
        # a dispute's evidence staged (submit=false), then submitted; a lost
        # dispute's cancellation now (sql/install/94_disputes.sql); once the
        # answers above are in, on a subscription as stripe-mock knows it
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE http_status IS NULL)", 30)
        pg.sql("UPDATE billing.subscriptions SET status = 'active', stripe_subscription_id = 'sub_sm1' "
               "WHERE tenant_id = 'sm' AND subscription_id = (SELECT max(subscription_id) FROM billing.subscriptions "
               "WHERE tenant_id = 'sm')")
        pg.sql("INSERT INTO billing.disputes (tenant_id, stripe_dispute_id, stripe_charge_id, amount, currency, "
               "reason, status, stripe_created, evidence_due_by) VALUES ('sm', 'dp_sm1', 'ch_sm1', 2900, 'usd', "
               "'fraudulent', 'needs_response', now(), now() + interval '7 days')")
        # (in one transaction: the submission waits for the staging request)
        pg.sql("DO $$ BEGIN PERFORM billing.dispute_stage(d) FROM billing.disputes d WHERE stripe_dispute_id = 'dp_sm1'; "
               "PERFORM billing.submit_dispute_evidence('dp_sm1'); END $$")
        # (lost once Stripe's answers about it are in: an answer mirrors the dispute)
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE http_status IS NULL)", 30)
        pg.sql("UPDATE billing.disputes SET status = 'lost' WHERE stripe_dispute_id = 'dp_sm1'")
        pg.sql("ALTER SYSTEM SET qes_billing.dispute_lost_action = 'cancel_now'")
        pg.sql("SELECT pg_reload_conf()")
        assert pg.wait_until("SELECT current_setting('qes_billing.dispute_lost_action') = 'cancel_now'")
        pg.sql("SELECT billing.dispute_closed(d) FROM billing.disputes d WHERE stripe_dispute_id = 'dp_sm1'")
        # tax (sql/install/91_tax.sql): billing details, the VAT number's tax ID,
        # reverse charge, a one-time payment's calculation and transaction
        pg.sql("ALTER SYSTEM SET qes_billing.automatic_tax = on")
        pg.sql("ALTER SYSTEM SET qes_billing.tax_origin_country = 'DE'")
        pg.sql("SELECT pg_reload_conf()")
        assert pg.wait_until("SELECT current_setting('qes_billing.automatic_tax')::boolean")
        assert api.post("/rpc/set_billing_details", body={"legal_name": "Stripe Mock AG", "country": "AT",
                                                          "postal_code": "1010", "vat_number": "ATU12345678"},
                        claims=tenant_claims("sm")).status == 200
        # the tax ID is asked for once Stripe took the details: wait for that
        # before its verification arrives (which would make asking moot)
        assert pg.wait_until("SELECT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE kind = 'tax_id.create')", 30)
        pg.sql("SELECT billing.sync_tax_id('sm', '{\"id\": \"txi_sm1\", \"value\": \"ATU12345678\", "
               "\"verification\": {\"status\": \"verified\"}}', false)")
        assert api.post("/rpc/create_payment_intent", body={"amount": 990, "currency": "eur"},
                        claims=tenant_claims("sm")).status == 200
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE http_status IS NULL)", 30)
        pg.sql("UPDATE billing.payments SET status = 'succeeded' WHERE tenant_id = 'sm' AND payment_id = "
               "(SELECT max(payment_id) FROM billing.payments WHERE tenant_id = 'sm')")
        assert pg.sql("SELECT method, path FROM billing.stripe_requests WHERE method = 'DELETE'") == \
            [("DELETE", "/v1/subscriptions/sub_sm1")]
        # the lookups that resolve an unknown outcome (sql/install/93_resolve.sql)
        for kind, (path, params) in {"resolve.customer.list": ("/v1/customers", {"email": "billing@sm.example", "limit": 100}),
                                     "resolve.subscription.list": ("/v1/subscriptions", {"customer": "cus_sm1", "status": "all", "limit": 100})}.items():
            pg.sql("SELECT billing.outbox_enqueue('sm', %s, 'GET', %s, %s::jsonb, '{\"request_id\": 0}')",
                   (kind, path, json.dumps(params)))
        # the branches of setup stripe-mock's fixtures never take (it has every
        # product, and no endpoint at our URL): the same code, fed other answers
        pg.sql("""SELECT billing.setup_apply(jsonb_populate_record(NULL::billing.stripe_requests,
                    to_jsonb(r) || '{"http_status": 404}')) FROM billing.stripe_requests r
                   WHERE kind = 'setup.product.lookup' AND subject->>'plan' = 'enterprise'""")
        pg.sql("""SELECT billing.setup_apply(jsonb_populate_record(NULL::billing.stripe_requests,
                    to_jsonb(r) || jsonb_build_object('response', jsonb_build_object('has_more', false, 'data',
                      jsonb_build_array(jsonb_build_object('id', 'we_ours', 'url', billing.webhook_endpoint_url(),
                                                           'status', 'disabled', 'enabled_events', '["invoice.paid"]'::jsonb))))))
                    FROM billing.stripe_requests r WHERE kind = 'setup.webhook.list' LIMIT 1""")
        pg.sql("""SELECT billing.setup_apply(jsonb_populate_record(NULL::billing.stripe_requests,
                    to_jsonb(r) || jsonb_build_object('response', jsonb_build_object('has_more', true, 'data',
                      jsonb_build_array(jsonb_build_object('id', 'we_other', 'url', 'https://other.example/hook'))))))
                    FROM billing.stripe_requests r WHERE kind = 'setup.webhook.list' LIMIT 1""")
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE http_status IS NULL)", 30), \
            pg.sql("SELECT request_id, kind, state, error FROM billing.stripe_requests WHERE http_status IS NULL")
        rows = pg.sql("SELECT kind, method, path, http_status, error FROM billing.stripe_requests ORDER BY request_id")
        kinds = {r[0] for r in rows}
        assert kinds == {"setup.check", "setup.product.lookup", "setup.product.create", "setup.prices.list",
                         "setup.price.create", "setup.webhook.list", "setup.webhook.create", "setup.webhook.update",
                         "customer.create", "subscription.create", "subscription.update", "payment_intent.create",
                         "subscription.refresh", "mirror.subscription.lookup", "mirror.invoice.lookup",
                         "mirror.customer.lookup", "mirror.charge.lookup", "mirror.payment_intent.lookup",
                         "reconcile.events.list", "reconcile.customer.lookup", "reconcile.subscriptions.list",
                         "reconcile.invoices.list", "reconcile.payment_intents.list", "reconcile.charges.list",
                         "reconcile.disputes.list", "resolve.customer.list", "resolve.subscription.list",
                         "dispute.stage", "dispute.submit", "billing_details.update", "tax_id.create",
                         "tax_exempt.update", "tax.calculation", "tax.transaction"}, kinds
        # and that is every kind the SQL code can queue
        src = os.path.join(os.path.dirname(__file__), "..", "..", "sql", "install")
        queued = set()
        for name in os.listdir(src):
            with open(os.path.join(src, name)) as f:
                queued |= set(re.findall(r"outbox_enqueue\([^,]+,\s*'([a-z_.]+)'", f.read()))
        # (usage billed through meters: proven against stripe-mock in test_meters)
        from test_meters import METER_KINDS
        assert queued and queued <= kinds | METER_KINDS, queued - kinds - METER_KINDS
        assert pg.sql("SELECT count(*) FROM billing.stripe_requests WHERE kind = 'setup.webhook.list' "
                      "AND params ? 'starting_after'")[0][0] == 1
        rejected = [r for r in rows if r[3] is not None and r[3] >= 400]
        assert rejected == [], rejected
        api.close()
    finally:
        amcheck_and_stop(pg)


# ---- the stateful fake -----------------------------------------------------

@pytest.fixture(scope="module")
def fake():
    f = FakeStripe(seed=7, timeout_s=1.5)
    f.base = f.serve()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def pgf(fake):
    c = cluster_for("fake", fake.base)
    set_clocks(c, fake)
    yield c
    amcheck_and_stop(c)


@pytest.fixture(scope="module")
def apif(pgf):
    client = PostgREST(pgf.dsn(user="authenticator"))
    client.delivered = 0
    yield client
    client.close()


def deliver(pg, api, fake, only=None):
    """Deliver the fake's new events (those of the types in `only`), signed,
    as Stripe would; wait until applied."""
    events = fake.events[api.delivered:]
    api.delivered += len(events)
    for ev in events:
        if only and ev["type"] not in only:
            continue
        body, header = signed(ev, SECRET)
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        assert r.status == 200, r.body
    assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.webhook_events WHERE state = 'received')"), \
        pg.sql("SELECT stripe_event_id, event_type, last_error FROM billing.webhook_events WHERE state <> 'applied'")
    parked = pg.sql("SELECT event_type, last_error FROM billing.webhook_events WHERE state = 'needs_review'")
    assert parked == []


def sub(api, tenant):
    r = api.get("/subscription", claims=tenant_claims(tenant))
    assert r.status == 200, r.body
    return r.body[0] if r.body else None


def limits_plan(pg, tenant):
    return pg.sql("SELECT plan_id FROM billing.check_limit(%s, 'signatures', 0)", (tenant,))[0][0]


def test_setup_all_twice_creates_nothing_the_second_time(pgf, fake):
    r = setup_command(pgf, "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "created product qes_professional" in r.stdout and "created webhook endpoint" in r.stdout, r.stdout
    first = dict(fake.creates)
    assert first == {"product": 2, "price": 4, "webhook_endpoint": 1}, first
    prices = pgf.sql("SELECT price_key, stripe_price_id FROM billing.prices WHERE unit_amount > 0 ORDER BY 1")
    assert all(p[1] and p[1].startswith("price_") for p in prices), prices
    assert pgf.sql("SELECT count(*) FROM billing.stripe_secrets")[0][0] == 1
    # the signing secret is readable by superusers only
    assert pgf.sql("SELECT has_table_privilege('qes_admin', 'billing.stripe_secrets', 'SELECT')")[0][0] is False
    endpoint = fake.of_type("webhook_endpoint")[0]
    assert endpoint["url"] == "https://sign.example.test/api/v1/billing/webhooks/stripe"
    assert len(endpoint["enabled_events"]) == 23

    r = setup_command(pgf, "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.creates == first, fake.creates
    assert "found product qes_professional" in r.stdout and "created" not in r.stdout, r.stdout
    assert pgf.sql("SELECT price_key, stripe_price_id FROM billing.prices WHERE unit_amount > 0 ORDER BY 1") == prices


def test_setup_reports_a_missing_key_and_exits_nonzero(stripe_mock):
    pg = Cluster("nokey", env={k: v for k, v in TEST_KEYS.items() if k != "STRIPE_TEST_SECRET_KEY"},
                 conf={"qes_billing.stripe_api_base": f"'{stripe_mock}'"}).start()
    try:
        r = setup_command(pg, "--test-config")
        assert r.returncode == 1
        assert "STRIPE_TEST_SECRET_KEY" in r.stdout + r.stderr
        assert "FAIL" in r.stdout
        assert pg.sql("SELECT count(*) FROM billing.stripe_requests")[0][0] == 0
        assert setup_command(pg, "--bogus").returncode == 2
    finally:
        amcheck_and_stop(pg)


def test_subscription_lifecycle(pgf, apif, fake):
    pg, api = pgf, apif
    pg.sql("SELECT billing.upsert_tenant('life', 'Life GmbH', 'billing@life.example')")
    claims = tenant_claims("life")
    r = api.post("/rpc/create_subscription", body={"plan": "professional", "interval": "month"}, claims=claims)
    assert r.status == 200 and r.body["status"] == "incomplete", r.body
    drain(pg)
    s = sub(api, "life")
    assert s["status"] == "incomplete" and s["limits_plan"] == "free" and s["client_secret"], s
    assert limits_plan(pg, "life") == "free"
    # exactly one customer, carrying the tenant id
    customers = [c for c in fake.of_type("customer") if c["metadata"].get("tenant_id") == "life"]
    assert len(customers) == 1

    # the front end confirms the payment with the client secret
    fake.confirm(s["client_secret"].split("_secret_")[0], "pm_card_visa")
    deliver(pg, api, fake)
    s = sub(api, "life")
    assert (s["plan"], s["interval"], s["status"], s["limits_plan"]) == ("professional", "month", "active", "professional")
    assert s["client_secret"] is None and s["current_period_end"] is not None
    # the period is Stripe's (the fake's)
    [stripe_sub] = [x for x in fake.of_type("subscription") if x["metadata"].get("tenant_id") == "life"]
    period = (ts(stripe_sub["current_period_start"]), ts(stripe_sub["current_period_end"]))
    assert (ts(s["current_period_start"]), ts(s["current_period_end"])) == period, (s, stripe_sub)
    inv = api.get("/invoices", claims=claims).body
    assert [i["status"] for i in inv] == ["paid"] and inv[0]["amount_paid"] == 2900

    # upgrade: charged at once, the plan changes when Stripe confirms
    r = api.post("/rpc/update_subscription", body={"plan": "enterprise"}, claims=claims)
    assert r.status == 200 and r.body["pending_change"]["proration"] == "always_invoice", r.body
    drain(pg)
    deliver(pg, api, fake)
    s = sub(api, "life")
    assert (s["plan"], s["limits_plan"], s["pending_change"]) == ("enterprise", "enterprise", None), s
    assert limits_plan(pg, "life") == "enterprise"

    # downgrade, with prorations credited to the next invoice
    r = api.post("/rpc/update_subscription", body={"plan": "professional"}, claims=claims)
    assert r.body["pending_change"]["proration"] == "create_prorations", r.body
    drain(pg)
    assert sub(api, "life")["plan"] == "professional"
    # monthly to yearly
    api.post("/rpc/update_subscription", body={"interval": "year"}, claims=claims)
    drain(pg)
    deliver(pg, api, fake)
    s = sub(api, "life")
    assert (s["plan"], s["interval"]) == ("professional", "year"), s
    # the switch starts the period Stripe starts (the fake: a year of 365 days from the switch)
    start, end = ts(s["current_period_start"]), ts(s["current_period_end"])
    assert (start, end) == (ts(stripe_sub["current_period_start"]), ts(stripe_sub["current_period_end"]))
    assert end - start == timedelta(days=365) and start >= period[0], (start, end, period)
    # cancel at period end, then resume
    api.post("/rpc/update_subscription", body={"cancel_at_period_end": True}, claims=claims)
    drain(pg)
    assert sub(api, "life")["cancel_at_period_end"] is True
    assert limits_plan(pg, "life") == "professional"    # paid until the period ends
    [(offset,)] = pg.sql("SELECT offset_by FROM billing.clock")
    pg.set_clock(end - timedelta(hours=1))              # the period's last hour
    try:
        assert limits_plan(pg, "life") == "professional"
    finally:
        pg.sql("SELECT billing.set_clock(%s)", (offset,))   # back where it was, with the fake's
    api.post("/rpc/update_subscription", body={"cancel_at_period_end": False}, claims=claims)
    drain(pg)
    deliver(pg, api, fake)
    assert sub(api, "life")["cancel_at_period_end"] is False

    # every step is audited
    actions = [a for (a,) in pg.sql("SELECT action FROM billing.audit_log WHERE tenant_id = 'life' ORDER BY audit_id")]
    assert actions.count("subscription.change_requested") == 5
    assert actions.count("subscription.changed") == 5
    assert "subscription.create_requested" in actions and "customer.created" in actions


def test_enterprise_yearly_and_free(pgf, apif, fake):
    pg, api = pgf, apif
    pg.sql("SELECT billing.upsert_tenant('ent', 'Ent SA', 'billing@ent.example')")
    pg.sql("SELECT billing.upsert_tenant('fre', 'Fre UG', 'billing@fre.example')")
    assert api.post("/rpc/create_subscription", body={"plan": "free"}, claims=tenant_claims("fre")).status == 200
    r = api.post("/rpc/create_subscription", body={"plan": "enterprise", "interval": "year"}, claims=tenant_claims("ent"))
    assert r.status == 200, r.body
    drain(pg)
    fake.confirm(sub(api, "ent")["client_secret"].split("_secret_")[0], "pm_card_visa")
    deliver(pg, api, fake)
    s = sub(api, "ent")
    assert (s["plan"], s["interval"], s["status"], s["limits_plan"]) == ("enterprise", "year", "active", "enterprise")
    assert sub(api, "fre")["plan"] == "free"
    assert not any(c["metadata"].get("tenant_id") == "fre" for c in fake.of_type("customer"))   # Free is local


def test_declined_payments_leave_the_limits_where_they_were(pgf, apif, fake):
    pg, api = pgf, apif
    pg.sql("SELECT billing.upsert_tenant('dec', 'Declined Ltd', 'billing@dec.example')")
    claims = tenant_claims("dec")
    api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=claims)
    drain(pg)
    pi = sub(api, "dec")["client_secret"].split("_secret_")[0]
    with pytest.raises(Exception):
        fake.confirm(pi, "pm_card_chargeDeclined")        # first payment declined
    deliver(pg, api, fake)
    assert (sub(api, "dec")["status"], limits_plan(pg, "dec")) == ("incomplete", "free")
    fake.confirm(pi, "pm_card_visa")                       # a good card
    deliver(pg, api, fake)
    assert limits_plan(pg, "dec") == "professional"

    # the saved card stops working; the upgrade is refused and nothing changes
    customer = pg.sql("SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = 'dec'")[0][0]
    fake.customer_cards[customer] = "pm_card_chargeDeclined"
    r = api.post("/rpc/update_subscription", body={"plan": "enterprise"}, claims=claims)
    assert r.status == 200
    drain(pg)
    deliver(pg, api, fake)
    s = sub(api, "dec")
    assert (s["plan"], s["limits_plan"], s["pending_change"]) == ("professional", "professional", None), s
    assert s["decline_code"] == "generic_decline" and "declined" in s["last_error"]
    assert limits_plan(pg, "dec") == "professional"
    failed = pg.sql("SELECT attempts, error->>'category' FROM billing.stripe_requests "
                    "WHERE tenant_id = 'dec' AND kind = 'subscription.update'")
    assert failed == [(1, "card")]                         # a business failure is not retried


def test_one_time_payment(pgf, apif, fake):
    pg, api = pgf, apif
    claims = tenant_claims("life")
    r = api.post("/rpc/create_payment_intent", body={"amount": 1500, "currency": "eur", "description": "Timestamps"},
                 claims=claims)
    assert r.status == 200, r.body
    drain(pg)
    pay = [p for p in api.get("/payments", claims=claims).body if p["payment_id"] == r.body["payment_id"]][0]
    assert pay["status"] == "requires_payment_method" and pay["client_secret"], pay
    fake.confirm(pay["payment_intent_id"], "pm_card_visa")
    deliver(pg, api, fake)
    pay = [p for p in api.get("/payments", claims=claims).body if p["payment_id"] == r.body["payment_id"]][0]
    assert pay["status"] == "succeeded" and pay["client_secret"] is None
    # bad input: a clear error, nothing queued
    before = pg.sql("SELECT count(*) FROM billing.stripe_requests")[0][0]
    for body, code in (({"amount": -1}, "22023"), ({"amount": 100, "currency": "xyz"}, "22023")):
        r = api.post("/rpc/create_payment_intent", body=body, claims=claims)
        assert (r.status, r.body["code"]) == (400, code), r.body
    assert pg.sql("SELECT count(*) FROM billing.stripe_requests")[0][0] == before


def test_thirty_percent_faults_converge_to_exactly_one_object_each(pgf, apif, fake):
    pg, api = pgf, apif
    tenants = [f"chaos{i:02d}" for i in range(30)]
    for t in tenants:
        pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (t, f"Chaos {t}", f"billing@{t}.example"))
    subs_before = len(fake.of_type("subscription"))
    fake.fault_rate = 0.3
    try:
        for i, t in enumerate(tenants):
            plan = ("professional", "enterprise")[i % 2]
            r = api.post("/rpc/create_subscription", body={"plan": plan, "interval": ("month", "year")[i % 3 == 0]},
                         claims=tenant_claims(t))
            assert r.status == 200, r.body
        drain(pg, timeout=120)
        # payments of tenants that already had a customer (every one now)
        for t in tenants[:10]:
            assert api.post("/rpc/create_payment_intent", body={"amount": 990}, claims=tenant_claims(t)).status == 200
        drain(pg, timeout=120)
    finally:
        fake.fault_rate = 0.0
    faults = dict(fake.faults)
    assert sum(faults.values()) >= 20 and len(faults) == 5, faults
    states = pg.sql("SELECT state, count(*) FROM billing.stripe_requests WHERE tenant_id LIKE 'chaos%%' GROUP BY 1")
    assert states == [("succeeded", 70)], states
    retried = pg.sql("SELECT count(*) FROM billing.stripe_requests WHERE tenant_id LIKE 'chaos%%' AND attempts > 1")[0][0]
    assert retried > 0
    for t in tenants:
        customers = [c for c in fake.of_type("customer") if c["metadata"].get("tenant_id") == t]
        assert len(customers) == 1, (t, customers)
        subs = [s for s in fake.of_type("subscription") if s["customer"] == customers[0]["id"]]
        assert len(subs) == 1, (t, subs)
        local = pg.sql("SELECT stripe_subscription_id, status, client_secret IS NOT NULL FROM billing.subscriptions "
                       "WHERE tenant_id = %s AND status <> 'canceled'", (t,))
        assert local == [(subs[0]["id"], "incomplete", True)], (t, local)
        assert pg.sql("SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = %s", (t,))[0][0] == customers[0]["id"]
    assert len(fake.of_type("subscription")) - subs_before == 30
    pis = [p for p in fake.of_type("payment_intent") if p["metadata"].get("tenant_id", "").startswith("chaos")]
    assert len(pis) == 10
    print(f"faults injected: {faults}; requests retried: {retried}")


def test_an_invoice_of_an_unknown_subscription_asks_stripe_for_it(pgf, apif, fake):
    """Stripe's subscription events are late (or lost): the invoice handler
    asks Stripe for the subscription through the outbox and mirrors it."""
    pg, api = pgf, apif
    pg.sql("SELECT billing.upsert_tenant('late', 'Late Events BV', 'billing@late.example')")
    with fake.lock:
        cust = fake.handle("POST", "/v1/customers", {"name": "Late", "metadata": {"tenant_id": "late"}})
        price = [p for p in fake.of_type("price") if p["lookup_key"] == "professional_monthly"][0]
        s = fake.handle("POST", "/v1/subscriptions", {"customer": cust["id"], "items": [{"price": price["id"]}],
                                                      "metadata": {"tenant_id": "late"}})
    pg.sql("UPDATE billing.tenants SET stripe_customer_id = %s WHERE tenant_id = 'late'", (cust["id"],))
    inv = fake.objects[s["latest_invoice"]]
    fake.confirm(inv["payment_intent"], "pm_card_visa")
    deliver(pg, api, fake, only={"invoice.paid"})            # the subscription's own events never come
    drain(pg)
    assert pg.sql("SELECT kind, state FROM billing.stripe_requests WHERE tenant_id = 'late'") == \
        [("mirror.subscription.lookup", "succeeded")]
    row = pg.sql("SELECT plan_id, status, stripe_subscription_id FROM billing.subscriptions WHERE tenant_id = 'late'")
    assert row == [("professional", "active", s["id"])], row
    assert limits_plan(pg, "late") == "professional"


def test_rate_limit_bounds_the_sending_rate(pgf, fake):
    """qes_billing.max_requests_per_second: 60 requests at 20/s take about
    three seconds, and no second sees more than 1.1 x 20 (the bucket's
    burst is a tenth of a second's worth).  Paced by the bucket, the worker
    records and claims in batches (src/outbox.c, "Paced sending"): fewer
    transactions than requests, where a turn per token took two per
    request (one to claim, one to record)."""
    pg = pgf
    pg.sql("ALTER SYSTEM SET qes_billing.max_requests_per_second = 20")
    pg.sql("SELECT pg_reload_conf()")
    time.sleep(0.5)
    try:
        xacts0 = int(pg.sql("SELECT xacts FROM billing.worker_state()")[0][0])
        start = time.time()
        pg.sql("SELECT count(billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers', "
               "jsonb_build_object('name', 'Rate ' || i))) FROM generate_series(1, 60) i")
        drain(pg)
        took = time.time() - start
        xacts = int(pg.sql("SELECT xacts FROM billing.worker_state()")[0][0]) - xacts0
    finally:
        pg.sql("ALTER SYSTEM RESET qes_billing.max_requests_per_second")
        pg.sql("SELECT pg_reload_conf()")
    sent = sorted(r[4] for r in fake.requests if r[1] == "/v1/customers" and r[4] >= start)
    assert len(sent) == 60
    busiest = max(sum(1 for t in sent if s <= t < s + 1.0) for s in sent)
    print(f"60 requests at 20/s took {took:.2f}s; busiest second: {busiest}; worker transactions: {xacts}")
    # two requests a turn (the bucket's burst at 20/s), their answers with them
    assert xacts <= 45, xacts
    # the limiter's bound (60 at 20/s, a tenth of a second's burst): never faster
    assert took >= 2.5, took
    assert busiest <= 22, busiest
