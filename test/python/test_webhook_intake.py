"""POST /rpc/stripe_webhook through PostgREST: every intake case and its status."""
import json
import time
import uuid

import pytest
import stripe

from conftest import TEST_KEYS, tenant_claims

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]


def event(livemode=False, type_="invoice.paid", **extra):
    ev = {"id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2024-06-20",
          "created": int(time.time()), "livemode": livemode, "type": type_,
          "data": {"object": {"id": "in_123", "object": "invoice", "amount_paid": 2900}}}
    ev.update(extra)
    # Stripe pretty-prints its bodies; the signature covers these exact bytes
    return json.dumps(ev, indent=2)


def deliver(api, body, header=None, secret=SECRET, timestamp=None, claims=None):
    if header is None:
        header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp)
    headers = {"Content-Type": "application/json"}
    if header is not False:
        headers["Stripe-Signature"] = header
    return api.post("/rpc/stripe_webhook", body=body, headers=headers, claims=claims)


def inbox_count(pg, event_id):
    return pg.sql("SELECT count(*) FROM billing.webhook_events WHERE stripe_event_id = %s", (event_id,))[0][0]


def test_valid_event_is_stored_and_acknowledged(pg, api):
    body = event()
    eid = json.loads(body)["id"]
    before = pg.sql("SELECT wake_requests FROM billing.worker_state()")[0][0]
    r = deliver(api, body)
    assert r.status == 200 and r.body == {"received": True, "duplicate": False, "event_id": eid}
    row = pg.sql("SELECT event_type, livemode, payload::text, state FROM billing.webhook_events "
                 "WHERE stripe_event_id = %s", (eid,))[0]
    assert row[:3] == ("invoice.paid", False, body)               # the raw bytes, unchanged
    assert row[3] in ("received", "ignored")                      # the worker may have been there already
    assert pg.sql("SELECT wake_requests FROM billing.worker_state()")[0][0] > before


def test_duplicate_delivery_is_200_and_stores_nothing(pg, api):
    body = event()
    eid = json.loads(body)["id"]
    assert deliver(api, body).status == 200
    again = deliver(api, body, timestamp=int(time.time()) + 1)   # Stripe re-signs each attempt
    assert again.status == 200 and again.body["duplicate"] is True
    assert inbox_count(pg, eid) == 1


@pytest.mark.parametrize("case,header,reason", [
    ("missing", False, "no_header"),
    ("garbage", "garbage", "malformed"),
    ("no v1", "t=1700000000,v0=abc", "no_v1"),
    ("wrong secret", None, "mismatch"),
    ("stale", None, "stale"),
])
def test_refusals(pg, api, case, header, reason):
    body = event()
    eid = json.loads(body)["id"]
    kwargs = {}
    if case == "wrong secret":
        kwargs["secret"] = "whsec_not_ours"
    if case == "stale":
        kwargs["timestamp"] = int(time.time()) - 3600
    before = refused(pg, reason)
    r = deliver(api, body, header=header, **kwargs)
    assert r.status == 400 and r.body["reason"] == reason, r.body
    assert inbox_count(pg, eid) == 0
    # counted at once (shared memory), written and audited per reason by the flush
    assert refused(pg, reason) == before + 1
    pg.sql("SELECT billing.flush_webhook_rejections()")
    assert pg.sql("SELECT count(*) FROM billing.webhook_rejections_pending() WHERE reason = %s", (reason,))[0][0] == 0
    assert refused(pg, reason) == before + 1
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'webhook.rejected' "
                  "AND details ->> 'reason' = %s", (reason,))[0][0] >= 1


def refused(pg, reason):
    """Deliveries refused for reason: written rows plus what is still counted in memory."""
    return pg.sql("SELECT (SELECT coalesce(sum(deliveries), 0) FROM billing.webhook_rejections WHERE reason = %s)"
                  " + (SELECT coalesce(sum(deliveries), 0) FROM billing.webhook_rejections_pending() WHERE reason = %s)",
                  (reason, reason))[0][0]


def test_tampered_body(pg, api):
    body = event()
    header = stripe.WebhookSignature.generate_signature_header(body, SECRET)
    tampered = body.replace("2900", "1")
    r = deliver(api, tampered, header=header)
    assert r.status == 400 and r.body["reason"] == "mismatch"


def test_wrong_mode(pg, api):
    r = deliver(api, event(livemode=True))
    assert r.status == 400 and r.body["reason"] == "wrong_mode"


def test_not_an_event(pg, api):
    r = deliver(api, json.dumps({"hello": "world"}))
    assert r.status == 400 and r.body["reason"] == "not_an_event"


def test_only_the_anonymous_role_calls_it(api):
    r = deliver(api, event(), claims=tenant_claims("acme"))
    assert r.status == 403


# the intake's body limit (src/webhook_intake.c, QES_WEBHOOK_MAX_BODY)
MAX_BODY = 1024 * 1024


def padded_event(size):
    """A valid event whose body is exactly size bytes (padding in data.object)."""
    body = event()
    ev = json.loads(body)
    ev["data"]["object"]["description"] = ""
    base = len(json.dumps(ev, indent=2).encode())
    ev["data"]["object"]["description"] = "x" * (size - base)
    body = json.dumps(ev, indent=2)
    assert len(body.encode()) == size
    return body


def test_a_body_over_the_limit_is_refused_before_it_is_verified(pg, api):
    """A forged 20 MB delivery once cost an HMAC and a scan of all of it.  A
    body over 1 MB is refused with 54000 before anything reads it: neither
    verified (it is counted as no refusal: the signature was never looked
    at) nor stored.  One at the limit, validly signed, is taken."""
    big = padded_event(MAX_BODY + 1)
    eid = json.loads(big)["id"]
    before = {reason: refused(pg, reason) for reason in ("mismatch", "malformed")}
    for kwargs in ({"secret": "whsec_not_ours"}, {}):           # forged, and even validly signed
        r = deliver(api, big, **kwargs)
        assert r.status == 400 and r.body["code"] == "54000", r.body
        assert r.body["message"] == f"webhook body too large: {MAX_BODY + 1} bytes, the limit is {MAX_BODY}", r.body
    r = deliver(api, padded_event(20 * MAX_BODY), secret="whsec_not_ours")
    assert r.status == 400 and r.body["code"] == "54000", r.body
    assert inbox_count(pg, eid) == 0
    assert {reason: refused(pg, reason) for reason in before} == before
    # at the limit: an event, verified and stored
    ok = padded_event(MAX_BODY)
    r = deliver(api, ok)
    assert r.status == 200 and r.body["duplicate"] is False, r.body
    assert inbox_count(pg, json.loads(ok)["id"]) == 1


@pytest.mark.parametrize("header", [
    "t={t},v1=00",                                   # too short to be an HMAC-SHA256
    "t={t},v1=" + "A" * 64,                          # upper case: no HMAC we compute equals it
    "t={t},v1=" + "g" * 64,                          # not hex
    "t={t},v1=" + "0" * 65,                          # too long
    "t={t},v0=" + "0" * 64 + ",v1=x",                # the v0 would not count either
])
def test_a_signature_no_hmac_can_equal_is_refused_unverified(pg, api, header):
    """A v1 that is not 64 lower-case hex digits cannot equal any HMAC: the
    header is refused as malformed before the secret is looked up and the
    body's HMAC computed (which would refuse it as a mismatch, later)."""
    body = event()
    before = refused(pg, "malformed"), refused(pg, "mismatch")
    r = deliver(api, body, header=header.format(t=int(time.time())))
    assert r.status == 400 and r.body["reason"] == "malformed", r.body
    assert (refused(pg, "malformed"), refused(pg, "mismatch")) == (before[0] + 1, before[1])
    assert inbox_count(pg, json.loads(body)["id"]) == 0
