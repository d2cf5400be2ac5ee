"""Unknown outcomes (docs/architecture.md, "Unknown outcomes"): Stripe acted but its answer never
arrived (the connection dropped after it, every attempt).  The request is
retried with its Idempotency-Key beyond qes_billing.max_attempts for as long
as Stripe keeps the key's result (qes_billing.idempotency_window; 2 s here),
then it may fail -- but before the failure stands, the worker looks the
object up in Stripe; the tenant's retry never makes a second customer or
subscription.  An operator's retry_request keeps the key of an unknown
outcome and renews the key of a refusal (Stripe would replay the refusal)."""
import json
import time
import uuid
from datetime import datetime, timezone

import psycopg
import pytest

from conftest import TEST_KEYS, amcheck_and_stop, tenant_claims
from fake_stripe import API_VERSION, FakeStripe, signed
from postgrest import PostgREST
from test_stripe_worker import cluster_for, drain, set_clocks, setup_command, sub, ts

# The fake stamps its objects at this date and the billing clock reads it (no
# events are delivered here, so the worker's answers, stamped with the real
# clock, never meet an event of the fake's clock).  The 5th, in the evening.
AT = datetime(2027, 6, 5, 19, 0, tzinfo=timezone.utc)

OPEN = "state IN ('waiting', 'pending', 'in_flight')"


@pytest.fixture(scope="module")
def fake():
    f = FakeStripe(seed=5, timeout_s=1.0)
    f.base = f.serve()
    f.lost = {}                   # path -> how the answer is lost: "drop" (Stripe acted) or "500" (it did not)
    original = f.process

    def process(method, path, params, key, raw):
        how = f.lost.get((method, path))
        if how == "500":
            return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}, []
        status, body, extra = original(method, path, params, key, raw)
        if how == "drop":
            return "drop", None, []
        return status, body, extra
    f.process = process
    yield f
    f.stop()


@pytest.fixture(scope="module")
def pgu(fake):
    c = cluster_for("unknown", fake.base, **{"qes_billing.max_attempts": "3",
                                             "qes_billing.idempotency_window": "'2s'"})
    set_clocks(c, fake, AT)
    r = setup_command(c, "--setup-products")
    assert r.returncode == 0, r.stdout + r.stderr
    yield c
    amcheck_and_stop(c)


@pytest.fixture(scope="module")
def api(pgu):
    client = PostgREST(pgu.dsn(user="authenticator"))
    yield client
    client.close()


def subscriptions_in_stripe(fake, tenant):
    return [s for s in fake.of_type("subscription") if s["metadata"].get("tenant_id") == tenant]


def customers_in_stripe(fake, tenant):
    return [c for c in fake.of_type("customer") if c["metadata"].get("tenant_id") == tenant]


def test_a_subscription_created_whose_answer_was_lost_is_found(pgu, api, fake):
    pg = pgu
    pg.sql("SELECT billing.upsert_tenant('lost_sub', 'Lost Sub GmbH', 'billing@lostsub.example')")
    claims = tenant_claims("lost_sub")
    fake.lost[("POST", "/v1/subscriptions")] = "drop"
    try:
        assert api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=claims).status == 200
        drain(pg)
    finally:
        fake.lost.clear()
    # every attempt failed without an answer, past max_attempts (3) while the key was honoured;
    # then it failed: on an answer after the window (network), or, when a retry fell due after
    # it, at the claim, never sent again (expired) ...
    state, attempts, category = pg.sql("SELECT state, attempts, error ->> 'category' FROM billing.stripe_requests "
                                       "WHERE tenant_id = 'lost_sub' AND kind = 'subscription.create'")[0]
    assert state == "failed" and category in ("network", "expired") and attempts > 3, (category, attempts)
    # ... but Stripe had made it (once: the same key each time), and the lookup found it
    made = subscriptions_in_stripe(fake, "lost_sub")
    assert len(made) == 1
    s = sub(api, "lost_sub")
    assert s["status"] == "incomplete" and s["stripe_subscription_id"] == made[0]["id"], s
    # mirrored as found: Stripe's period, stamped by the fake at the fixed date
    assert (ts(s["current_period_start"]), ts(s["current_period_end"])) == \
        (ts(made[0]["current_period_start"]), ts(made[0]["current_period_end"])), (s, made[0])
    assert ts(s["current_period_start"]).date() == AT.date(), s
    assert pg.sql("SELECT details ->> 'found', details ->> 'object' FROM billing.audit_log "
                  "WHERE tenant_id = 'lost_sub' AND action = 'stripe.request_resolved'") == [("true", made[0]["id"])]
    # the tenant tries again: refused, still one subscription in Stripe
    r = api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=claims)
    assert r.status == 409, r.body
    drain(pg)
    assert len(subscriptions_in_stripe(fake, "lost_sub")) == 1


def test_a_customer_created_whose_answer_was_lost_is_found(pgu, api, fake):
    pg = pgu
    pg.sql("SELECT billing.upsert_tenant('lost_cus', 'Lost Cus GmbH', 'billing@lostcus.example')")
    claims = tenant_claims("lost_cus")
    fake.lost[("POST", "/v1/customers")] = "drop"
    try:
        assert api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=claims).status == 200
        assert pg.wait_until("SELECT state = 'failed' FROM billing.stripe_requests "
                             "WHERE tenant_id = 'lost_cus' AND kind = 'customer.create'", 30)
    finally:
        fake.lost.clear()
    drain(pg)
    # one customer, found and linked; the subscription that waited for it was sent after all
    assert len(customers_in_stripe(fake, "lost_cus")) == 1
    assert pg.sql("SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = 'lost_cus'")[0][0] == \
        customers_in_stripe(fake, "lost_cus")[0]["id"]
    assert len(subscriptions_in_stripe(fake, "lost_cus")) == 1
    assert sub(api, "lost_cus")["status"] == "incomplete"
    assert api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=claims).status == 409
    drain(pg)
    assert len(customers_in_stripe(fake, "lost_cus")) == 1 and len(subscriptions_in_stripe(fake, "lost_cus")) == 1


def test_nothing_created_the_failure_stands_and_a_retry_works(pgu, api, fake):
    pg = pgu
    pg.sql("SELECT billing.upsert_tenant('no_sub', 'No Sub GmbH', 'billing@nosub.example')")
    claims = tenant_claims("no_sub")
    fake.lost[("POST", "/v1/subscriptions")] = "500"
    try:
        assert api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=claims).status == 200
        drain(pg)
    finally:
        fake.lost.clear()
    assert subscriptions_in_stripe(fake, "no_sub") == []
    assert sub(api, "no_sub")["status"] == "incomplete_expired"
    assert pg.sql("SELECT details ->> 'found' FROM billing.audit_log WHERE tenant_id = 'no_sub' "
                  "AND action = 'stripe.request_resolved'") == [("false",)]
    assert api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=claims).status == 200
    drain(pg)
    assert len(subscriptions_in_stripe(fake, "no_sub")) == 1


def test_no_second_subscription_while_an_outcome_is_checked(pgu, api):
    pg = pgu
    pg.sql("SELECT billing.upsert_tenant('checking', 'Checking GmbH', 'billing@checking.example')")
    # a lookup under way (held back, so that the worker does not answer it first)
    with pg.connect() as c:      # queued to go in an hour: the worker never sees it due
        req = c.execute("SELECT billing.outbox_enqueue('checking', 'resolve.subscription.list', 'GET', "
                        "'/v1/subscriptions', '{\"customer\": \"cus_none\", \"status\": \"all\"}', "
                        "'{\"request_id\": 0}', p_not_before => now() + interval '1 hour')").fetchone()[0]
    r = api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=tenant_claims("checking"))
    assert r.status == 409 and "being checked" in r.body["message"], r.body
    assert "Try again" in r.body["hint"]
    pg.sql("UPDATE billing.stripe_requests SET next_attempt_at = now() WHERE request_id = %s", (req,))
    drain(pg)
    assert pg.sql("SELECT count(*) FROM billing.subscriptions WHERE tenant_id = 'checking'") == [(0,)]


def test_an_unknown_outcome_is_retried_with_its_key_past_max_attempts(pgu, api, fake):
    pg = pgu
    pg.sql("ALTER SYSTEM SET qes_billing.idempotency_window = '1h'")
    pg.sql("SELECT pg_reload_conf()")
    pg.sql("SELECT billing.upsert_tenant('long_unknown', 'Long GmbH', 'billing@long.example')")
    fake.lost[("POST", "/v1/customers")] = "drop"
    try:
        import time
        time.sleep(0.5)
        assert api.post("/rpc/create_subscription", body={"plan": "professional"},
                        claims=tenant_claims("long_unknown")).status == 200
        key = pg.sql("SELECT idempotency_key FROM billing.stripe_requests "
                     "WHERE tenant_id = 'long_unknown' AND kind = 'customer.create'")[0][0]
        assert pg.wait_until("SELECT attempts > 6 FROM billing.stripe_requests "
                             "WHERE tenant_id = 'long_unknown' AND kind = 'customer.create'", 30)
        state, key_now = pg.sql("SELECT state, idempotency_key FROM billing.stripe_requests "
                                "WHERE tenant_id = 'long_unknown' AND kind = 'customer.create'")[0]
        assert state != "failed" and key_now == key
    finally:
        fake.lost.clear()
        pg.sql("ALTER SYSTEM RESET qes_billing.idempotency_window")
        pg.sql("SELECT pg_reload_conf()")
    drain(pg)
    # the answer finally arrives: one customer in Stripe, linked
    assert len(customers_in_stripe(fake, "long_unknown")) == 1
    assert pg.sql("SELECT stripe_customer_id FROM billing.tenants WHERE tenant_id = 'long_unknown'")[0][0] == \
        customers_in_stripe(fake, "long_unknown")[0]["id"]


def test_retry_request_keeps_the_key_of_an_unknown_outcome_and_renews_a_refusal(pgu):
    pg = pgu
    # one transaction, back to failed before it commits: the worker never sends them
    with pg.connect() as c:
        ids = {}
        for name, category in (("unknown", "network"), ("refused", "card")):
            ids[name] = c.execute(
                "INSERT INTO billing.stripe_requests (kind, method, path, params, state, attempts, error)"
                " VALUES ('test.retry', 'POST', '/v1/customers', '{}', 'failed', 3,"
                " jsonb_build_object('category', %s::text))"
                " RETURNING request_id, idempotency_key", (category,)).fetchone()
        for name, (rid, _) in ids.items():
            c.execute("SELECT billing.retry_request(%s)", (rid,))
        keys = {name: c.execute("SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = %s",
                                (rid,)).fetchone()[0] for name, (rid, _) in ids.items()}
        audited = c.execute("SELECT details ->> 'new_idempotency_key' FROM billing.audit_log"
                            " WHERE action = 'stripe.request_retried' ORDER BY audit_id DESC LIMIT 2").fetchall()
        c.execute("UPDATE billing.stripe_requests SET state = 'failed' WHERE kind = 'test.retry'")
        c.commit()
    assert keys["unknown"] == ids["unknown"][1]
    assert keys["refused"] != ids["refused"][1]
    assert sorted(a[0] for a in audited) == ["false", "true"]


def billing_now(pg):
    return pg.sql("SELECT extract(epoch FROM date_trunc('second', billing.now()))::bigint")[0][0]


def deliver_events(pg, api, events):
    for ev in events:
        body, header = signed(ev, TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"])
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        assert r.status == 200, r.body
    assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.webhook_events WHERE state = 'received')")
    assert pg.sql("SELECT event_type, last_error FROM billing.webhook_events WHERE state = 'needs_review'") == []


def set_conf(pg, **kv):
    for k, v in kv.items():
        pg.sql(f"ALTER SYSTEM {'RESET qes_billing.' + k if v is None else f'SET qes_billing.{k} = {v!r}'}")
    pg.sql("SELECT pg_reload_conf()")
    time.sleep(0.5)      # the worker reloads at its next wake-up


def test_a_replayed_answer_does_not_overwrite_a_newer_webhook(pgu, api, fake):
    """A change Stripe made whose answer was lost: Stripe replays the FIRST
    attempt's body to the retry.  A webhook about a later change (past_due,
    at T1) applied before the retry (at T2) must not be overwritten by that
    older body: the answer speaks for its first attempt, not for T2."""
    pg = pgu
    pg.sql("SELECT billing.upsert_tenant('replayed', 'Replayed GmbH', 'billing@replayed.example')")
    claims = tenant_claims("replayed")
    assert api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=claims).status == 200
    drain(pg)
    fake.confirm(sub(api, "replayed")["client_secret"].split("_secret_")[0], "pm_card_visa")
    [stripe_sub] = subscriptions_in_stripe(fake, "replayed")
    sid, cus = stripe_sub["id"], stripe_sub["customer"]
    deliver_events(pg, api, [e for e in list(fake.events)
                             if cus in (e["data"]["object"].get("customer"), e["data"]["object"].get("id"))])
    assert sub(api, "replayed")["status"] == "active"
    query = "FROM billing.stripe_requests WHERE tenant_id = 'replayed' AND kind = 'subscription.update'"
    set_conf(pg, retry_base_delay="10s", retry_max_delay="20s", idempotency_window="1h")
    fake.lost[("POST", f"/v1/subscriptions/{sid}")] = "drop"
    try:
        assert api.post("/rpc/update_subscription", body={"cancel_at_period_end": True}, claims=claims).status == 200
        # Stripe acted on the first attempt; its answer was lost; the retry waits (held here)
        assert pg.wait_until(f"SELECT first_sent_at IS NOT NULL AND state = 'pending' {query}", 30)
        pg.sql(f"UPDATE billing.stripe_requests SET next_attempt_at = 'infinity' WHERE request_id = "
               f"(SELECT request_id {query})")
        assert fake.get(sid)["cancel_at_period_end"] is True
        # then, at T1, the subscription goes past_due in Stripe, and its webhook is applied
        t1 = billing_now(pg) + 1
        assert pg.wait_until(f"SELECT billing.now() >= to_timestamp({t1})", 10)
        fake.get(sid)["status"] = "past_due"
        ev = {"id": "evt_" + uuid.uuid4().hex[:24], "object": "event", "api_version": API_VERSION, "created": t1,
              "livemode": False, "type": "customer.subscription.updated", "pending_webhooks": 1,
              "request": {"id": None, "idempotency_key": None},
              "data": {"object": json.loads(json.dumps(fake.get(sid))),
                       "previous_attributes": {"status": "active"}}}
        deliver_events(pg, api, [ev])
        assert sub(api, "replayed")["status"] == "past_due"
        # the retry goes out at T2, after T1, and gets the first attempt's body (active)
        assert pg.wait_until(f"SELECT billing.now() >= to_timestamp({t1 + 1})", 10)
    finally:
        fake.lost.clear()
    pg.sql(f"UPDATE billing.stripe_requests SET next_attempt_at = now() WHERE request_id = (SELECT request_id {query})")
    try:
        assert pg.wait_until(f"SELECT state = 'succeeded' {query}", 30), pg.sql(f"SELECT state, error {query}")
    finally:
        set_conf(pg, retry_base_delay=None, retry_max_delay=None, idempotency_window=None)
    [(body_status, attempts)] = pg.sql(f"SELECT response ->> 'status', attempts {query}")
    assert (body_status, attempts) == ("active", 2)      # the replayed, older state
    s = sub(api, "replayed")
    assert (s["status"], s["cancel_at_period_end"]) == ("past_due", True), s
