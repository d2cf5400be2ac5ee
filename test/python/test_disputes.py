"""Disputes answered with the platform's own evidence, against the stateful
fake Stripe (test/python/fake_stripe.py): a tenant subscribes and pays,
uses the platform, and disputes the charge; the evidence assembled from its
own rows is staged in Stripe with submit=false, reviewed in
billing.dispute_evidence, submitted by an operator through the API (or by
the worker before the deadline when qes_billing.dispute_auto_submit is on);
every dispute event is mirrored; a lost dispute acts on the subscription as
qes_billing.dispute_lost_action says, audited; the alert's view counts a
dispute due within 72 hours whose evidence is not submitted.  The evidence
never holds another tenant's data or a secret, neither in the database nor
in what Stripe received.  (Request shapes against stripe-mock:
test_stripe_worker.py, test_every_request_kind_is_valid_for_stripe.)

The fake's clock and the billing clock stay on the real clock (as in
test_stripe_worker.py: the worker stamps Stripe's answers with the real
claim time); no assertion depends on the day: deadlines are relative to the
fake's now().
"""
import json
import os
import subprocess
import time

import psycopg
import pytest

from conftest import ADMIN, TEST_KEYS, amcheck_and_stop, tenant_claims
from fake_stripe import FakeStripe, signed
from pgcluster import Cluster
from postgrest import PostgREST

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
OPEN = "state IN ('waiting', 'pending', 'in_flight')"
LIMITS = {"access_activity_log": 20000, "uncategorized_text": 20000, "product_description": 5000,
          "service_date": 5000, "customer_name": 5000, "customer_email_address": 5000}


@pytest.fixture(scope="module")
def fake():
    f = FakeStripe(seed=23, timeout_s=1.5)
    f.base = f.serve()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def pg(fake):
    c = Cluster("disputes", env=TEST_KEYS, conf={
        "qes_billing.stripe_api_base": f"'{fake.base}'", "qes_billing.retry_base_delay": "'20ms'",
        "qes_billing.retry_max_delay": "'400ms'", "qes_billing.request_timeout": "'1s'",
        "qes_billing.worker_naptime": "'200ms'", "qes_billing.reconcile_interval": "0"}).start()
    assert c.wait_until("SELECT alive FROM billing.worker_status"), c.log()
    exe = os.path.join(c.bindir, "qes_billing_setup")
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(c.port), PGDATABASE=c.database, PGUSER="postgres")
    r = subprocess.run([exe, "--setup-products", "--timeout", "30"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
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
    """The fake's new events, signed, as Stripe delivers them; applied."""
    events = fake.events[api.delivered:]
    api.delivered += len(events)
    for ev in events:
        body, header = signed(ev, SECRET)
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        assert r.status == 200, r.body
    assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.webhook_events WHERE state = 'received')"), \
        pg.sql("SELECT stripe_event_id, event_type, last_error FROM billing.webhook_events WHERE state <> 'applied'")
    assert pg.sql("SELECT event_type, last_error FROM billing.webhook_events WHERE state = 'needs_review'") == []


def settle(pg, api, fake, rounds=4):
    for _ in range(rounds):
        drain(pg)
        deliver(pg, api, fake)


def subscribe_and_pay(pg, api, fake, tenant, name, email, plan="professional"):
    pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (tenant, name, email))
    r = api.post("/rpc/create_subscription", body={"plan": plan, "interval": "month"}, claims=tenant_claims(tenant))
    assert r.status == 200, r.body
    drain(pg)
    s = api.get("/subscription", claims=tenant_claims(tenant)).body[0]
    fake.confirm(s["client_secret"].split("_secret_")[0], "pm_card_visa")
    settle(pg, api, fake)
    [(charge,)] = pg.sql("SELECT stripe_charge_id FROM billing.payments WHERE tenant_id = %s AND status = 'succeeded'",
                         (tenant,))
    assert charge and charge.startswith("ch_")
    return charge


def use(pg, tenant, n, marker):
    """n uses of each counter, now (after the payment), metadata carrying a
    marker (metadata never goes into evidence)."""
    with pg.connect(autocommit=True) as c:
        for i in range(n):
            for metric in ("signatures", "documents", "api_calls"):
                c.execute("SELECT billing.record_usage(%s, %s, %s, %s, %s::jsonb)",
                          (tenant, metric, 1 + i % 3, f"{marker}-{metric}-{i}",
                           json.dumps({"document_title": f"{marker} contract {i}", "api_token": f"{marker}-token"})))


@pytest.fixture(scope="module")
def world(pg, api, fake):
    charges = {
        "acme": subscribe_and_pay(pg, api, fake, "acme", "Acme Signing GmbH", "billing@acme.example"),
        "rival": subscribe_and_pay(pg, api, fake, "rival", "Rival Secret Holdings Ltd", "cfo@rival.example"),
    }
    # a one-time payment started and not confirmed: its client secret is in the database
    r = api.post("/rpc/create_payment_intent", body={"amount": 990, "description": "signature pack"},
                 claims=tenant_claims("acme"))
    assert r.status == 200, r.body
    drain(pg)
    use(pg, "acme", 30, "acme-use")
    use(pg, "rival", 30, "RIVALMARK")
    time.sleep(1.1)     # a dispute's time is whole seconds: after every use
    return charges


def evidence_row(pg, dispute):
    return pg.sql("SELECT evidence_state, evidence, field_lengths, total_length, period_start, period_end, status,"
                  "       has_evidence, submission_count, auto_submitted"
                  "  FROM billing.dispute_evidence WHERE stripe_dispute_id = %s", (dispute,))[0]


def forbidden_strings(pg):
    """What must never be in acme's evidence: the other tenant's identity and
    usage, any client secret, key or signing secret, usage metadata."""
    secrets = [s for (s,) in pg.sql("SELECT client_secret FROM billing.payments WHERE client_secret IS NOT NULL "
                                    "UNION ALL SELECT client_secret FROM billing.subscriptions WHERE client_secret IS NOT NULL")]
    assert secrets, "the test needs client secrets to look for"
    return ["rival", "Rival Secret Holdings", "cfo@rival.example", "RIVALMARK", "acme-use", "sk_live_", "sk_test_",
            "whsec_", "_secret_", "api_token", "document_title", TEST_KEYS["STRIPE_TEST_SECRET_KEY"]] + secrets


def test_a_dispute_gets_the_tenants_own_evidence_staged(pg, api, fake, world, capsys):
    dp = fake.dispute(world["acme"], reason="product_not_received", due_in_s=6 * 86400)
    settle(pg, api, fake)
    state, ev, lengths, total, p_start, p_end, status, has_ev, count, auto = evidence_row(pg, dp["id"])
    assert (state, status, count, auto) == ("staged", "needs_response", 0, False)
    # staged in Stripe with submit=false: what Stripe holds is exactly ours, not submitted
    held = fake.get(dp["id"])
    assert held["evidence"] == ev and held["status"] == "needs_response"
    assert held["evidence_details"]["submission_count"] == 0 and has_ev is True
    assert set(ev) == set(LIMITS)
    for field, value in ev.items():
        assert 0 < len(value) <= LIMITS[field], (field, len(value))
    assert lengths == {k: len(v) for k, v in ev.items()} and total == sum(lengths.values()) <= 150000
    # the tenant's own facts
    assert ev["customer_name"] == "Acme Signing GmbH" and ev["customer_email_address"] == "billing@acme.example"
    assert ev["product_description"].startswith("Professional plan of the QES platform")
    log = ev["access_activity_log"]
    used = dict(pg.sql("SELECT metric, sum(quantity) FROM billing.usage_events WHERE tenant_id = 'acme' "
                       "AND occurred_at >= %s AND occurred_at < %s GROUP BY 1", (p_start, p_end)))
    assert used["signatures"] == sum(1 + i % 3 for i in range(30))
    assert f"{used['signatures']} Qualified electronic signatures created" in log
    assert f"Each recorded use ({3 * 30} in all; the newest 90):" in log
    assert log.count(" signatures x ") == 30
    text = ev["uncategorized_text"]
    assert "Disputed charge: 29.00 USD" in text and "Subscription: plan Professional, billed monthly, status active" in text
    assert "subscription.create_requested" in text and "Invoices (newest first):" in text and "paid" in text
    # nothing of the other tenant, no secret: in the database nor in Stripe
    blob = json.dumps(ev) + json.dumps(held)
    for s in forbidden_strings(pg):
        assert s not in blob, s
    # audited with the sizes, never the content
    [(details,)] = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'dispute.evidence_staged'")
    assert details["fields"] == lengths and details["dispute"] == dp["id"]
    # the funds' withdrawal mirrored and audited
    assert pg.sql("SELECT funds_withdrawn_at IS NOT NULL, evidence_due_by FROM billing.disputes WHERE stripe_dispute_id = %s",
                  (dp["id"],))[0][0] is True
    with capsys.disabled():
        print(f"\ndispute evidence (staged, {total} characters):")
        for k, v in ev.items():
            print(f"--- {k} ({len(v)})\n{v if len(v) < 1500 else v[:1500] + ' ...'}")


def test_the_operator_submits_through_the_api_once(pg, api, fake, world):
    [(dp,)] = pg.sql("SELECT stripe_dispute_id FROM billing.disputes WHERE tenant_id = 'acme'")
    # a tenant may not
    r = api.post("/rpc/submit_dispute_evidence", body={"dispute": dp}, claims=tenant_claims("acme"))
    assert r.status in (401, 403), r.body
    r = api.post("/rpc/submit_dispute_evidence", body={"dispute": dp}, claims=ADMIN)
    assert r.status == 200 and r.body["state"] == "submitting", r.body
    settle(pg, api, fake)
    state, ev, *_ , status, has_ev, count, auto = evidence_row(pg, dp)
    assert (state, status, count, auto) == ("submitted", "under_review", 1, False)
    assert fake.get(dp)["status"] == "under_review" and fake.get(dp)["evidence_details"]["submission_count"] == 1
    actions = [a for (a,) in pg.sql("SELECT action FROM billing.audit_log WHERE details ->> 'dispute' = %s "
                                    "ORDER BY audit_id", (dp,))]
    assert actions == ["dispute.created", "dispute.evidence_staged", "dispute.funds_withdrawn",
                       "dispute.evidence_submit_requested", "dispute.evidence_submitted"], actions
    [(by,)] = pg.sql("SELECT submitted_by FROM billing.dispute_responses WHERE stripe_dispute_id = %s", (dp,))
    assert by == ADMIN["sub"]
    # Stripe takes evidence once: a second submission is refused here, nothing queued
    before = pg.sql("SELECT count(*) FROM billing.stripe_requests")[0][0]
    for query, code, words in [
        ("SELECT billing.submit_dispute_evidence(%s)", "55000", "already submitted"),
    ]:
        with pg.connect() as c:
            with pytest.raises(psycopg.Error) as e:
                c.execute(query, (dp,))
            assert e.value.sqlstate == code and words in str(e.value) and e.value.diag.message_hint
    for bad, code in (("ch_123", "22023"), (None, "22023"), ("dp_unknown", "P0002")):
        with pg.connect() as c:
            with pytest.raises(psycopg.Error) as e:
                c.execute("SELECT billing.submit_dispute_evidence(%s)", (bad,))
            assert e.value.sqlstate == code and e.value.diag.message_hint
    assert pg.sql("SELECT count(*) FROM billing.stripe_requests")[0][0] == before


def set_conf(pg, **kv):
    for k, v in kv.items():
        pg.sql(f"ALTER SYSTEM SET qes_billing.{k} = '{v}'")
    pg.sql("SELECT pg_reload_conf()")
    for k, v in kv.items():
        assert pg.wait_until(f"SELECT current_setting('qes_billing.{k}') = '{v}'")


def test_a_lost_dispute_cancels_as_the_setting_says_audited(pg, api, fake, world):
    [(dp,)] = pg.sql("SELECT stripe_dispute_id FROM billing.disputes WHERE tenant_id = 'acme'")
    set_conf(pg, dispute_lost_action="cancel_at_period_end")
    try:
        fake.close_dispute(dp, "lost")
        settle(pg, api, fake)
    finally:
        set_conf(pg, dispute_lost_action="none")
    row = pg.sql("SELECT status, closed_at IS NOT NULL, evidence_due_by FROM billing.disputes WHERE stripe_dispute_id = %s",
                 (dp,))[0]
    assert row == ("lost", True, None)
    [(details,)] = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'dispute.closed'")
    assert details["status"] == "lost" and details["lost_action_setting"] == "cancel_at_period_end"
    assert details["entitlements"] == "cancel_at_period_end" and details["subscription"].startswith("sub_")
    # Stripe cancels at period end; the mirror follows; the paid limits hold until then
    assert fake.get(details["subscription"])["cancel_at_period_end"] is True
    assert pg.sql("SELECT cancel_at_period_end, status FROM billing.subscriptions WHERE tenant_id = 'acme' "
                  "AND status = 'active'") == [(True, "active")]
    # the same close delivered again acts once
    ev = [e for e in fake.events if e["type"] == "charge.dispute.closed"][-1]
    body, header = signed(ev, SECRET)
    api.post("/rpc/stripe_webhook", body=body, headers={"Content-Type": "application/json", "Stripe-Signature": header})
    drain(pg)
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'dispute.closed'")[0][0] == 1


def test_due_within_72_hours_alerts_until_submitted_automatically(pg, api, fake, world):
    def due_soon():
        return pg.sql("SELECT needs_response, due_soon_unsubmitted FROM billing.prometheus_disputes")[0]
    assert due_soon() == (0, 0)
    # rival disputes; its deadline is 48 hours away
    dp = fake.dispute(world["rival"], reason="fraudulent", due_in_s=48 * 3600)
    settle(pg, api, fake)
    assert evidence_row(pg, dp["id"])[0] == "staged"
    assert due_soon() == (1, 1)     # staged is not answered
    [(next_due,)] = pg.sql("SELECT next_due_timestamp_seconds FROM billing.prometheus_disputes")
    assert int(next_due) == dp["evidence_details"]["due_by"]
    # rival's evidence holds nothing of acme
    ev = evidence_row(pg, dp["id"])[1]
    assert "Acme" not in json.dumps(ev) and "acme" not in json.dumps(ev) and "RIVALMARK" not in json.dumps(ev)
    # automatic submission, 72 hours before the deadline: the worker submits it
    set_conf(pg, dispute_auto_submit="on", dispute_auto_submit_before="3d")
    try:
        assert pg.wait_until(f"SELECT evidence_state <> 'staged' FROM billing.dispute_evidence "
                             f"WHERE stripe_dispute_id = '{dp['id']}'", 20)
        settle(pg, api, fake)
    finally:
        set_conf(pg, dispute_auto_submit="off", dispute_auto_submit_before="1d")
    state, *_, status, has_ev, count, auto = evidence_row(pg, dp["id"])
    assert (state, status, count, auto) == ("submitted", "under_review", 1, True)
    assert due_soon() == (0, 0)
    [(details,)] = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'dispute.evidence_submit_requested' "
                          "AND details ->> 'dispute' = %s", (dp["id"],))
    assert details["auto"] is True
    # won: the funds come back, nothing happens to the subscription
    fake.close_dispute(dp["id"], "won")
    settle(pg, api, fake)
    row = pg.sql("SELECT status, funds_reinstated_at IS NOT NULL FROM billing.disputes WHERE stripe_dispute_id = %s",
                 (dp["id"],))[0]
    assert row == ("won", True)
    [(details,)] = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'dispute.closed' "
                          "AND details ->> 'dispute' = %s", (dp["id"],))
    assert details["status"] == "won" and "entitlements" not in details
    assert pg.sql("SELECT cancel_at_period_end FROM billing.subscriptions WHERE tenant_id = 'rival' "
                  "AND status = 'active'") == [(False,)]


def test_events_in_any_order_end_in_the_same_dispute(pg, api, fake, world):
    """The close delivered before the creation: the mirror ends closed, and
    no evidence is staged for a dispute already decided."""
    dp = fake.dispute(world["acme"], reason="duplicate", due_in_s=5 * 86400)
    fake.close_dispute(dp["id"], "lost")
    events = fake.events[api.delivered:]
    api.delivered += len(events)
    for ev in reversed(events):
        body, header = signed(ev, SECRET)
        assert api.post("/rpc/stripe_webhook", body=body,
                        headers={"Content-Type": "application/json", "Stripe-Signature": header}).status == 200
    drain(pg)
    assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.webhook_events WHERE state = 'received')")
    row = pg.sql("SELECT status, closed_at IS NOT NULL, funds_withdrawn_at IS NOT NULL FROM billing.disputes "
                 "WHERE stripe_dispute_id = %s", (dp["id"],))[0]
    assert row == ("lost", True, True)
    assert pg.sql("SELECT count(*) FROM billing.dispute_responses WHERE stripe_dispute_id = %s", (dp["id"],))[0][0] == 0


def test_a_lost_dispute_cancelling_now_bills_the_usage_not_yet_invoiced(pg, api, fake, world):
    """cancel_now ends the subscription at once and asks Stripe for the
    final invoice (invoice_now=true: without it, Stripe bills nothing more
    and the metered usage of the period is never invoiced); no credit for
    the unused time (prorate=false: the chargeback took the payment back)."""
    charge = subscribe_and_pay(pg, api, fake, "nowco", "Cancel Now Ltd", "billing@nowco.example")
    dp = fake.dispute(charge, reason="fraudulent", due_in_s=6 * 86400)
    settle(pg, api, fake)
    [(sub_id,)] = pg.sql("SELECT stripe_subscription_id FROM billing.subscriptions WHERE tenant_id = 'nowco' "
                         "AND status = 'active'")
    set_conf(pg, dispute_lost_action="cancel_now")
    try:
        fake.close_dispute(dp["id"], "lost")
        settle(pg, api, fake)
    finally:
        set_conf(pg, dispute_lost_action="none")
    [(details,)] = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'dispute.closed' "
                          "AND details ->> 'dispute' = %s", (dp["id"],))
    assert details["entitlements"] == "cancel_now" and details["subscription"] == sub_id, details
    assert pg.sql("SELECT method, path, params FROM billing.stripe_requests WHERE request_id = %s",
                  (details["request_id"],)) == [("DELETE", f"/v1/subscriptions/{sub_id}",
                                                 {"invoice_now": True, "prorate": False})]
    # Stripe canceled it with the final invoice; the mirror follows
    assert fake.cancellations[sub_id] == [{"invoice_now": "true", "prorate": "false"}]
    assert fake.get(sub_id)["status"] == "canceled"
    final = [i for i in fake.of_type("invoice") if i["subscription"] == sub_id and i.get("final_for_cancel")]
    assert len(final) == 1, final
    assert pg.sql("SELECT status FROM billing.subscriptions WHERE stripe_subscription_id = %s", (sub_id,)) == \
        [("canceled",)]
