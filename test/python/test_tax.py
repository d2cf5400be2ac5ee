"""Tax: a tenant's billing details through the API, checked here (country
codes, each EU member state's VAT number shape) and then by Stripe
(tax[validate_location]=immediately: a refusal reaches the tenant as 422
naming the field); the VAT number as an eu_vat tax ID whose verification is
mirrored from customer.tax_id.* events; reverse charge decided for a
verified business of another member state, audited with its basis.
Behaviour against the stateful fake; the request shapes against
stripe-mock.  Clocks: the fake's and the billing clock stay on the real
clock (the worker stamps answers with the real claim time); nothing here
depends on the day.
"""
import json
import os
import subprocess
import uuid

import psycopg
import pytest

from conftest import TEST_KEYS, amcheck_and_stop, tenant_claims
from fake_stripe import API_VERSION, FakeStripe, signed
from pgcluster import Cluster
from postgrest import PostgREST

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
OPEN = "state IN ('waiting', 'pending', 'in_flight')"


def cluster(name, base):
    c = Cluster(name, env=TEST_KEYS, conf={
        "qes_billing.stripe_api_base": f"'{base}'", "qes_billing.retry_base_delay": "'20ms'",
        "qes_billing.retry_max_delay": "'400ms'", "qes_billing.request_timeout": "'1s'",
        "qes_billing.worker_naptime": "'200ms'", "qes_billing.reconcile_interval": "0",
        "qes_billing.tax_origin_country": "'DE'"}).start()
    assert c.wait_until("SELECT alive FROM billing.worker_status"), c.log()
    return c


@pytest.fixture(scope="module")
def fake():
    f = FakeStripe(seed=31, timeout_s=1.5)
    f.base = f.serve()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def pg(fake):
    c = cluster("tax", fake.base)
    yield c
    amcheck_and_stop(c)


@pytest.fixture(scope="module")
def api(pg):
    client = PostgREST(pg.dsn(user="authenticator"))
    client.delivered = 0
    yield client
    client.close()


def drain(pg, timeout=60):
    assert pg.wait_until(f"SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE {OPEN})", timeout), \
        pg.sql(f"SELECT request_id, kind, state, attempts, error FROM billing.stripe_requests WHERE {OPEN}")


def deliver(pg, api, fake):
    events = fake.events[api.delivered:]
    api.delivered += len(events)
    for ev in events:
        body, header = signed(ev, SECRET)
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        assert r.status == 200, r.body
    assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.webhook_events WHERE state = 'received')")
    assert pg.sql("SELECT event_type, last_error FROM billing.webhook_events WHERE state = 'needs_review'") == []


def settle(pg, api, fake):
    for _ in range(4):
        drain(pg)
        deliver(pg, api, fake)


def details(api, tenant):
    return api.get("/rpc/billing_details", claims=tenant_claims(tenant))


def put(api, tenant, **body):
    return api.post("/rpc/set_billing_details", body=body, claims=tenant_claims(tenant))


def test_bad_details_are_refused_here_naming_the_field_and_nothing_is_written(pg, api):
    pg.sql("SELECT billing.upsert_tenant('bad', 'Bad Input SARL', 'billing@bad.example')")
    cases = [
        (dict(legal_name="Bad Input SARL", country="UK", postal_code="75001"), "country: 'UK' is not an ISO 3166-1 country code"),
        (dict(legal_name="Bad Input SARL", country="XX", postal_code="75001"), "country: 'XX'"),
        (dict(legal_name="Bad Input SARL", country="FR", postal_code="?"), "postal_code: '?' is not a postal code"),
        (dict(legal_name="", country="FR", postal_code="75001"), "legal_name must have 1 to 200 characters"),
        (dict(legal_name="Bad Input SARL", country="FR", postal_code="75001", vat_number="DE123456789"),
         "vat_number: 'DE123456789' is not a VAT number of FR"),
        (dict(legal_name="Bad Input SARL", country="DE", postal_code="10115", vat_number="DE12345678"),
         "vat_number: 'DE12345678' is not a VAT number of DE"),
        (dict(legal_name="Bad Input SARL", country="NL", postal_code="1011 AB", vat_number="NL123456789X01"),
         "vat_number: 'NL123456789X01' is not a VAT number of NL"),
        (dict(legal_name="Bad Input SARL", country="US", postal_code="10001", vat_number="US123"),
         "vat_number: US is not in the EU"),
    ]
    for body, words in cases:
        r = put(api, "bad", **body)
        assert r.status == 400, (body, r.status, r.body)
        assert r.body["code"] == "22023" and words in r.body["message"], r.body
        assert r.body["hint"], r.body
    assert pg.sql("SELECT count(*) FROM billing.billing_details")[0][0] == 0
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action LIKE 'billing_details.%'")[0][0] == 0
    assert pg.sql("SELECT count(*) FROM billing.stripe_requests WHERE tenant_id = 'bad'")[0][0] == 0
    assert details(api, "bad").status == 404


def test_a_location_stripe_refuses_comes_back_as_422_naming_the_field(pg, api, fake):
    pg.sql("SELECT billing.upsert_tenant('nowhere', 'Nowhere GmbH', 'billing@nowhere.example')")
    # no Stripe customer yet: it is created first, then the details follow
    r = put(api, "nowhere", legal_name="Nowhere GmbH", country="DE", postal_code="00000")
    assert r.status == 200 and r.body["state"] == "pending", r.body
    settle(pg, api, fake)
    r = details(api, "nowhere")
    assert r.status == 422, r.body
    assert r.body["state"] == "refused"
    assert r.body["error"]["field"] == "postal_code" and r.body["error"]["code"] == "customer_tax_location_invalid"
    assert "location" in r.body["error"]["message"]
    # given again, right: valid, and Stripe holds the address
    r = put(api, "nowhere", legal_name="Nowhere GmbH", country="DE", postal_code="10115", city="Berlin")
    assert r.status == 200 and r.body["version"] == 2, r.body
    settle(pg, api, fake)
    r = details(api, "nowhere")
    assert r.status == 200 and r.body["state"] == "valid" and r.body["error"] is None, r.body
    [cust] = [c for c in fake.of_type("customer") if c["metadata"].get("tenant_id") == "nowhere"]
    assert cust["address"] == {"country": "DE", "postal_code": "10115", "city": "Berlin"} and cust["name"] == "Nowhere GmbH"
    actions = [a for (a,) in pg.sql("SELECT action FROM billing.audit_log WHERE tenant_id = 'nowhere' "
                                    "AND action LIKE 'billing_details.%' ORDER BY audit_id")]
    assert actions == ["billing_details.set", "billing_details.refused", "billing_details.set", "billing_details.valid"]


def test_a_verified_eu_business_abroad_is_reverse_charged_audited(pg, api, fake):
    pg.sql("SELECT billing.upsert_tenant('nlbv', 'Tekenen B.V.', 'billing@tekenen.example')")
    r = put(api, "nlbv", legal_name="Tekenen B.V.", country="NL", postal_code="1011 AB", line1="Damrak 1",
            city="Amsterdam", vat_number="nl 1234.567.89 B01")
    assert r.status == 200 and r.body["vat_number"] == "NL123456789B01", r.body
    settle(pg, api, fake)
    r = details(api, "nlbv").body
    assert (r["state"], r["vat_verification"], r["reverse_charge"]) == ("valid", "pending", False), r
    [txi] = [t for t in fake.of_type("tax_id") if t["value"] == "NL123456789B01"]
    # pending -> verified: reverse charge (NL is not DE, the platform's member state)
    fake.verify_tax_id(txi["id"], "verified", "TEKENEN B.V.")
    settle(pg, api, fake)
    r = details(api, "nlbv").body
    assert (r["vat_verification"], r["reverse_charge"]) == ("verified", True), r
    assert fake.get(txi["customer"])["tax_exempt"] == "reverse"
    [(basis,)] = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'tax.reverse_charge' AND tenant_id = 'nlbv'")
    assert basis == {"reverse_charge": True, "tax_exempt": "reverse",
                     "basis": {"vat_number": "NL123456789B01", "verification": "verified", "customer_country": "NL",
                               "origin_country": "DE", "eu_member": True}}
    # verification withdrawn (unverified): back to normal VAT, audited again
    fake.verify_tax_id(txi["id"], "unverified")
    settle(pg, api, fake)
    r = details(api, "nlbv").body
    assert (r["vat_verification"], r["reverse_charge"]) == ("unverified", False), r
    assert fake.get(txi["customer"])["tax_exempt"] == "none"
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'tax.reverse_charge' AND tenant_id = 'nlbv'")[0][0] == 2


def test_reverse_charge_ends_when_the_vat_number_goes(pg, api, fake):
    """A reverse-charged business that drops its VAT number (or gives
    another, or moves) pays VAT again at once: the decision rests on the
    verified number, not on the tenant's word after it."""
    pg.sql("SELECT billing.upsert_tenant('atgo', 'Signatur Wien GmbH', 'billing@wien.example')")
    assert put(api, "atgo", legal_name="Signatur Wien GmbH", country="AT", postal_code="1010",
               vat_number="ATU12345678").status == 200
    settle(pg, api, fake)
    [txi] = [t for t in fake.of_type("tax_id") if t["value"] == "ATU12345678"]
    fake.verify_tax_id(txi["id"], "verified")
    settle(pg, api, fake)
    assert details(api, "atgo").body["reverse_charge"] is True
    assert fake.get(txi["customer"])["tax_exempt"] == "reverse"
    # the number withdrawn by the tenant
    assert put(api, "atgo", legal_name="Signatur Wien GmbH", country="AT", postal_code="1010").status == 200
    settle(pg, api, fake)
    r = details(api, "atgo").body
    assert (r["reverse_charge"], r["vat_number"]) == (False, None), r
    assert fake.get(txi["customer"])["tax_exempt"] == "none"
    [(d,)] = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'tax.reverse_charge' AND tenant_id = 'atgo' "
                    "ORDER BY audit_id DESC LIMIT 1")
    assert d["reverse_charge"] is False and d["basis"]["vat_number_before"] == "ATU12345678", d


def test_a_verified_business_at_home_is_not_reverse_charged(pg, api, fake):
    pg.sql("SELECT billing.upsert_tenant('debv', 'Signatur GmbH', 'billing@signatur.example')")
    r = put(api, "debv", legal_name="Signatur GmbH", country="DE", postal_code="80331", vat_number="DE123456789")
    assert r.status == 200, r.body
    settle(pg, api, fake)
    [txi] = [t for t in fake.of_type("tax_id") if t["value"] == "DE123456789"]
    fake.verify_tax_id(txi["id"], "verified")
    settle(pg, api, fake)
    r = details(api, "debv").body
    assert (r["vat_verification"], r["reverse_charge"]) == ("verified", False), r
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'tax.reverse_charge' AND tenant_id = 'debv'")[0][0] == 0
    assert fake.get(txi["customer"]).get("tax_exempt") in (None, "none")


def billing_now(pg):
    """The billing clock in Unix seconds (Stripe's times are whole seconds)."""
    return pg.sql("SELECT extract(epoch FROM date_trunc('second', billing.now()))::bigint")[0][0]


def tax_id_event(type_, txi, created, status=None):
    """A customer.tax_id.* event of `txi` as of Stripe time `created`, with
    its verification `status` (the fake's as it is, when None)."""
    o = json.loads(json.dumps(txi))
    if status is not None:
        o["verification"] = {"status": status, "verified_name": None, "verified_address": None}
    return {"id": "evt_" + uuid.uuid4().hex[:24], "object": "event", "api_version": API_VERSION,
            "created": created, "livemode": False, "type": type_, "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None}, "data": {"object": o}}


def deliver_events(pg, api, events):
    """These events, in this order, each applied before the next arrives."""
    for ev in events:
        body, header = signed(ev, SECRET)
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        assert r.status == 200, r.body
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.webhook_events WHERE state = 'received')")
    assert pg.sql("SELECT event_type, last_error FROM billing.webhook_events WHERE state = 'needs_review'") == []


def tenant_with_tax_id(pg, api, fake, tenant, name, country, postal_code, vat):
    pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (tenant, name, f"billing@{tenant}.example"))
    assert put(api, tenant, legal_name=name, country=country, postal_code=postal_code, vat_number=vat).status == 200
    settle(pg, api, fake)
    assert details(api, tenant).body["vat_verification"] == "pending"
    [txi] = [t for t in fake.of_type("tax_id") if t["value"] == vat]
    return txi


def test_a_late_older_tax_id_event_does_not_undo_a_verification(pg, api, fake):
    """customer.tax_id.updated (verified) applied, then the created event
    (pending) ten minutes older arrives late: the verified EU business keeps
    its reverse charge, and Stripe is not told to charge it VAT."""
    txi = tenant_with_tax_id(pg, api, fake, "frlate", "Signature Tardive SAS", "FR", "75001", "FR12345678901")
    t = billing_now(pg)
    deliver_events(pg, api, [tax_id_event("customer.tax_id.updated", txi, t + 600, "verified"),
                             tax_id_event("customer.tax_id.created", txi, t, "pending")])
    settle(pg, api, fake)
    r = details(api, "frlate").body
    assert (r["vat_verification"], r["reverse_charge"]) == ("verified", True), r
    assert fake.get(txi["customer"])["tax_exempt"] == "reverse"
    assert [d["reverse_charge"] for (d,) in pg.sql(
        "SELECT details FROM billing.audit_log WHERE action = 'tax.reverse_charge' AND tenant_id = 'frlate' "
        "ORDER BY audit_id")] == [True]


def test_a_deleted_tax_id_is_not_revived_by_an_older_verification(pg, api, fake):
    """customer.tax_id.deleted applied, then an updated (verified) event an
    hour older arrives late: the tax ID stays deleted, no reverse charge
    (no VAT would be collected without a tax ID)."""
    txi = tenant_with_tax_id(pg, api, fake, "itdel", "Firma Cancellata S.r.l.", "IT", "00184", "IT12345678901")
    t = billing_now(pg)
    deliver_events(pg, api, [tax_id_event("customer.tax_id.deleted", txi, t + 7200),
                             tax_id_event("customer.tax_id.updated", txi, t + 3600, "verified")])
    settle(pg, api, fake)
    r = details(api, "itdel").body
    assert (r["vat_verification"], r["reverse_charge"]) == ("deleted", False), r
    assert fake.get(txi["customer"]).get("tax_exempt") in (None, "none")
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'tax.reverse_charge' "
                  "AND tenant_id = 'itdel'")[0][0] == 0
    # deleted is final for that tax ID: even a newer state of it changes nothing
    deliver_events(pg, api, [tax_id_event("customer.tax_id.updated", txi, t + 9000, "verified")])
    settle(pg, api, fake)
    assert details(api, "itdel").body["vat_verification"] == "deleted"


def test_the_last_tax_exempt_decision_is_the_one_stripe_keeps(pg, api, fake):
    """Reverse charge decided (verified), its request answered 500 and
    retried; meanwhile the verification is withdrawn (unverified): the
    retry of "reverse" must not land after "none"."""
    txi = tenant_with_tax_id(pg, api, fake, "beretry", "Handtekening NV", "BE", "1000", "BE0123456789")
    cus = txi["customer"]
    failing = {"on": True}
    original = fake.process

    def process(method, path, params, key, raw):
        if failing["on"] and method == "POST" and path == f"/v1/customers/{cus}" and "tax_exempt=reverse" in raw:
            return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}, []
        return original(method, path, params, key, raw)
    fake.process = process
    try:
        t = billing_now(pg)
        deliver_events(pg, api, [tax_id_event("customer.tax_id.updated", txi, t + 1, "verified")])
        # "reverse" reached Stripe and failed: it is retried
        assert pg.wait_until("SELECT first_sent_at IS NOT NULL AND state <> 'succeeded' FROM billing.stripe_requests "
                             "WHERE tenant_id = 'beretry' AND kind = 'tax_exempt.update'", 30)
        deliver_events(pg, api, [tax_id_event("customer.tax_id.updated", txi, t + 2, "unverified")])
        # whatever goes out of "none" has gone out (it waits, or it was sent)
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE tenant_id = 'beretry' "
                             "AND kind = 'tax_exempt.update' AND params ->> 'tax_exempt' = 'none' "
                             "AND state IN ('pending', 'in_flight'))", 30)
    finally:
        failing["on"] = False
        fake.process = original
    settle(pg, api, fake)
    r = details(api, "beretry").body
    assert (r["vat_verification"], r["reverse_charge"]) == ("unverified", False), r
    assert fake.get(cus)["tax_exempt"] == "none"
    assert pg.sql("SELECT params ->> 'tax_exempt', state FROM billing.stripe_requests WHERE tenant_id = 'beretry' "
                  "AND kind = 'tax_exempt.update' ORDER BY request_id") == [("reverse", "succeeded"), ("none", "succeeded")]


def test_a_newer_tax_exempt_decision_goes_out_when_the_older_fails(pg, api, fake):
    """"reverse" reaches Stripe (applied, its answer lost: 500), then is
    refused for good on a retry; "none", decided meanwhile, waited for it
    for order only: it still goes out, and Stripe keeps "none" (failing it
    with its predecessor left Stripe on "reverse", no VAT charged)."""
    txi = tenant_with_tax_id(pg, api, fake, "beorder", "Orde BV", "BE", "1000", "BE0987654321")
    cus = txi["customer"]
    seen = {"reverse": 0}
    original = fake.process

    def process(method, path, params, key, raw):
        if method == "POST" and path == f"/v1/customers/{cus}" and "tax_exempt=reverse" in raw:
            seen["reverse"] += 1
            if seen["reverse"] == 1:
                original(method, path, params, key, raw)      # applied, the answer lost
                return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}, []
            if seen.get("refuse"):
                return 400, {"error": {"type": "invalid_request_error", "message": "Refused for this test"}}, []
            return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}, []
        return original(method, path, params, key, raw)
    fake.process = process
    try:
        t = billing_now(pg)
        deliver_events(pg, api, [tax_id_event("customer.tax_id.updated", txi, t + 1, "verified")])
        assert pg.wait_until("SELECT first_sent_at IS NOT NULL AND state <> 'succeeded' FROM billing.stripe_requests "
                             "WHERE tenant_id = 'beorder' AND kind = 'tax_exempt.update'", 30)
        assert fake.get(cus)["tax_exempt"] == "reverse"
        deliver_events(pg, api, [tax_id_event("customer.tax_id.updated", txi, t + 2, "unverified")])
        assert pg.wait_until("SELECT state = 'waiting' FROM billing.stripe_requests WHERE tenant_id = 'beorder' "
                             "AND kind = 'tax_exempt.update' AND params ->> 'tax_exempt' = 'none'", 30)
        seen["refuse"] = True
        pg.sql("UPDATE billing.stripe_requests SET next_attempt_at = now() WHERE tenant_id = 'beorder' "
               "AND kind = 'tax_exempt.update' AND state = 'pending'")
        pg.sql("SELECT billing.wake_worker()")
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE tenant_id = 'beorder' "
                             "AND kind = 'tax_exempt.update' AND state IN ('waiting', 'pending', 'in_flight'))", 60), \
            pg.sql("SELECT request_id, params, state, error FROM billing.stripe_requests WHERE tenant_id = 'beorder'")
    finally:
        fake.process = original
    settle(pg, api, fake)
    assert pg.sql("SELECT params ->> 'tax_exempt', state FROM billing.stripe_requests WHERE tenant_id = 'beorder' "
                  "AND kind = 'tax_exempt.update' ORDER BY request_id") == [("reverse", "failed"), ("none", "succeeded")]
    assert fake.get(cus)["tax_exempt"] == "none"
    # the failed older decision is not sent again by an operator's retry:
    # Stripe would keep it
    with pytest.raises(psycopg.Error) as e:
        pg.sql("SELECT billing.retry_request(request_id) FROM billing.stripe_requests WHERE tenant_id = 'beorder' "
               "AND kind = 'tax_exempt.update' AND state = 'failed'")
    assert e.value.sqlstate == "55000" and "newer one replaced" in str(e.value), e.value


def test_request_shapes_are_valid_for_stripe(stripe_mock):
    pg = cluster("taxmock", stripe_mock)
    try:
        api = PostgREST(pg.dsn(user="authenticator"))
        pg.sql("SELECT billing.upsert_tenant('sm', 'Stripe Mock AG', 'billing@sm.example')")
        pg.sql("UPDATE billing.tenants SET stripe_customer_id = 'cus_sm1' WHERE tenant_id = 'sm'")
        r = put(api, "sm", legal_name="Stripe Mock AG", country="AT", postal_code="1010", line1="Ring 1",
                city="Wien", vat_number="ATU12345678")
        assert r.status == 200, r.body
        assert pg.wait_until("SELECT count(*) = 2 FROM billing.stripe_requests WHERE http_status IS NOT NULL", 30), \
            pg.sql("SELECT kind, state, error FROM billing.stripe_requests")
        # reverse charge asked for (a verified tax ID of AT, the platform being in DE)
        pg.sql("SELECT billing.sync_tax_id('sm', %s::jsonb, false)",
               (json.dumps({"id": "txi_sm1", "value": "ATU12345678", "verification": {"status": "verified"}}),))
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE http_status IS NULL)", 30)
        rows = pg.sql("SELECT kind, method, path, http_status, error FROM billing.stripe_requests ORDER BY request_id")
        assert [(k, m, p, s) for k, m, p, s, _ in rows] == [
            ("billing_details.update", "POST", "/v1/customers/cus_sm1", 200),
            ("tax_id.create", "POST", "/v1/customers/cus_sm1/tax_ids", 200),
            ("tax_exempt.update", "POST", "/v1/customers/cus_sm1", 200)], rows
        params = dict(pg.sql("SELECT kind, params FROM billing.stripe_requests"))
        assert params["billing_details.update"]["tax"] == {"validate_location": "immediately"}
        assert params["tax_id.create"] == {"type": "eu_vat", "value": "ATU12345678"}
        # a one-time payment with automatic tax: the calculation, the payment
        # intent, and the tax transaction once it succeeded
        set_conf(pg, automatic_tax="on")
        r = api.post("/rpc/create_payment_intent", body={"amount": 4900, "currency": "eur"}, claims=tenant_claims("sm"))
        assert r.status == 200, r.body
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE http_status IS NULL)", 30)
        pg.sql("UPDATE billing.payments SET status = 'succeeded' WHERE tenant_id = 'sm' AND kind = 'one_time'")
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE http_status IS NULL)", 30)
        rows = pg.sql("SELECT kind, path, http_status FROM billing.stripe_requests WHERE kind IN "
                      "('tax.calculation', 'payment_intent.create', 'tax.transaction') ORDER BY request_id")
        assert rows == [("tax.calculation", "/v1/tax/calculations", 200),
                        ("payment_intent.create", "/v1/payment_intents", 200),
                        ("tax.transaction", "/v1/tax/transactions/create_from_calculation", 200)], rows
        # a subscription with automatic tax (stripe-mock's fixtures: a price of its own)
        pg.sql("UPDATE billing.prices SET stripe_price_id = 'price_' || price_key WHERE unit_amount > 0")
        r = api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=tenant_claims("sm"))
        assert r.status == 200, r.body
        assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE http_status IS NULL)", 30)
        [(params, status)] = pg.sql("SELECT params, http_status FROM billing.stripe_requests WHERE kind = 'subscription.create'")
        assert params["automatic_tax"] == {"enabled": True} and status == 200, (params, status)
        api.close()
    finally:
        amcheck_and_stop(pg)


def setup_products(pg):
    exe = os.path.join(pg.bindir, "qes_billing_setup")
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(pg.port), PGDATABASE=pg.database, PGUSER="postgres")
    r = subprocess.run([exe, "--setup-products", "--timeout", "30"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def set_conf(pg, **kv):
    for k, v in kv.items():
        pg.sql(f"ALTER SYSTEM SET qes_billing.{k} = '{v}'")
    pg.sql("SELECT pg_reload_conf()")
    for k, v in kv.items():
        assert pg.wait_until(f"SELECT current_setting('qes_billing.{k}') = '{v}'")


def subscribe(pg, api, fake, tenant):
    r = api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=tenant_claims(tenant))
    assert r.status == 200, r.body
    settle(pg, api, fake)
    [inv] = api.get("/invoices", claims=tenant_claims(tenant)).body
    return inv


def test_invoices_carry_their_tax_and_one_without_tax_is_shown_and_counted(pg, api, fake):
    setup_products(pg)
    prices = [p for p in fake.of_type("price") if p["lookup_key"]]
    assert prices and {p["tax_behavior"] for p in prices} == {"exclusive"}, prices
    set_conf(pg, automatic_tax="on")
    try:
        # a located customer: the Netherlands' 21 % on top (exclusive prices)
        pg.sql("SELECT billing.upsert_tenant('nlnv', 'Onderteken N.V.', 'billing@onderteken.example')")
        assert put(api, "nlnv", legal_name="Onderteken N.V.", country="NL", postal_code="3011 AA").status == 200
        settle(pg, api, fake)
        inv = subscribe(pg, api, fake, "nlnv")
        assert (inv["subtotal"], inv["tax"], inv["total"], inv["automatic_tax_status"], inv["tax_missing_reason"]) == \
            (2900, 609, 3509, "complete", None), inv
        assert inv["tax_lines"][0]["taxes"] == [{"amount": 609, "inclusive": False, "taxable_amount": 2900,
                                                 "tax_rate": "txr_nl_21", "taxability_reason": "standard_rated"}]
        [sub] = [s for s in fake.of_type("subscription") if s["metadata"].get("tenant_id") == "nlnv"]
        assert sub["automatic_tax"] == {"enabled": True}
        # a verified business abroad: reverse charge, no tax, the reason on the line
        [txi] = [t for t in fake.of_type("tax_id") if t["value"] == "NL123456789B01"]
        fake.verify_tax_id(txi["id"], "verified")
        settle(pg, api, fake)
        inv = subscribe(pg, api, fake, "nlbv")
        assert (inv["tax"], inv["total"]) == (0, 2900), inv
        assert inv["tax_lines"][0]["taxes"][0]["taxability_reason"] == "reverse_charge"
        # no billing details: Stripe finalizes without tax; shown, audited, counted
        pg.sql("SELECT billing.upsert_tenant('nowhere2', 'Nowhere Two Ltd', 'billing@nowhere2.example')")
        before = pg.sql("SELECT invoices_without_tax_total FROM billing.prometheus_tax")[0][0]
        inv = subscribe(pg, api, fake, "nowhere2")
        assert (inv["tax"], inv["automatic_tax_status"], inv["tax_missing_reason"]) == \
            (0, "requires_location_inputs", "finalization_requires_location_inputs"), inv
        assert pg.sql("SELECT invoices_without_tax_total FROM billing.prometheus_tax")[0][0] == before + 1
        [(d,)] = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'invoice.finalized_without_tax'")
        assert d["invoice"] == inv["invoice_id"] and d["automatic_tax"]["disabled_reason"] == "finalization_requires_location_inputs"
        # another tenant sees none of these invoices
        assert api.get("/invoices", claims=tenant_claims("debv")).body == []
    finally:
        set_conf(pg, automatic_tax="off")


def test_a_one_time_payment_is_taxed_through_a_calculation(pg, api, fake):
    set_conf(pg, automatic_tax="on")
    try:
        r = api.post("/rpc/create_payment_intent", body={"amount": 1000, "currency": "eur", "description": "pack"},
                     claims=tenant_claims("nlnv"))
        assert r.status == 200, r.body
        settle(pg, api, fake)
        [(pid, amount, pi)] = pg.sql("SELECT payment_id, amount, stripe_payment_intent_id FROM billing.payments "
                                     "WHERE tenant_id = 'nlnv' AND kind = 'one_time'")
        assert amount == 1210 and fake.get(pi)["amount"] == 1210          # NL: 21 % on top
        calc = fake.get(pi)["metadata"]["tax_calculation"]
        assert calc.startswith("taxcalc_")
        fake.confirm(pi, "pm_card_visa")
        settle(pg, api, fake)
        row = pg.sql("SELECT amount_subtotal, tax, amount_total, calculation_id, starts_with(transaction_id, 'tax_') "
                     "FROM billing.payment_taxes WHERE tenant_id = 'nlnv' AND payment_id = %s", (pid,))[0]
        assert row == (1000, 210, 1210, calc, True), row
        [(d,)] = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'tax.calculated' AND tenant_id = 'nlnv'")
        assert (d["tax"], d["amount_total"], d["taxability_reason"]) == (210, 1210, "standard_rated")
        # no location: Stripe Tax refuses, and the payment fails with it (nothing charged)
        r = api.post("/rpc/create_payment_intent", body={"amount": 1000, "currency": "eur"}, claims=tenant_claims("nowhere2"))
        assert r.status == 200, r.body
        settle(pg, api, fake)
        assert pg.sql("SELECT status, stripe_payment_intent_id FROM billing.payments "
                      "WHERE tenant_id = 'nowhere2' AND kind = 'one_time'") == [("failed", None)]
        assert pg.sql("SELECT state, error ->> 'code' FROM billing.stripe_requests "
                      "WHERE tenant_id = 'nowhere2' AND kind = 'tax.calculation'") == [("failed", "customer_tax_location_invalid")]
    finally:
        set_conf(pg, automatic_tax="off")
