"""Abuse protection through PostgREST: inbound rate limiting (api.pre_request,
configured as PostgREST's db-pre-request) and floods of forged webhooks that
must cost nothing to everyone else."""
import json
import threading
import time
import uuid

import psycopg
import pytest
import stripe

from conftest import TEST_KEYS, tenant_claims
from postgrest import PostgREST

SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]


def set_limits(pg, **limits):
    for name, value in limits.items():
        if value is None:
            pg.sql(f"ALTER SYSTEM RESET qes_billing.{name}")
        else:
            pg.sql(f"ALTER SYSTEM SET qes_billing.{name} = {int(value)}")
    pg.sql("SELECT pg_reload_conf()")
    for name, value in limits.items():
        want = str(value) if value is not None else None
        deadline = time.time() + 10
        while time.time() < deadline:
            shown = pg.sql(f"SHOW qes_billing.{name}")[0][0]
            if want is None or shown == want:
                break
            time.sleep(0.05)


@pytest.fixture
def limited(pg):
    set_limits(pg, rate_limit_address=3, rate_limit_tenant=3)
    client = PostgREST(pg.dsn(user="authenticator"), pre_request="api.pre_request")
    yield client
    client.close()
    set_limits(pg, rate_limit_address=None, rate_limit_tenant=None)


def addr():
    """A fresh client address, so tests never share a bucket."""
    n = uuid.uuid4().int
    return f"10.{n % 250}.{(n >> 8) % 250}.{(n >> 16) % 250 + 1}"


def get_config(api, address, claims=None):
    return api.get("/rpc/config", headers={"X-Forwarded-For": f"203.0.113.9, {address}"}, claims=claims)


def signed_event():
    ev = {"id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2024-06-20",
          "created": int(time.time()), "livemode": False, "type": "invoice.paid",
          "data": {"object": {"id": "in_guard", "object": "invoice"}}}
    body = json.dumps(ev)
    return body, stripe.WebhookSignature.generate_signature_header(body, SECRET)


def test_per_address_limit_answers_429_with_retry_after(limited):
    a, b = addr(), addr()
    statuses = [get_config(limited, a).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    r = get_config(limited, a)
    assert r.status == 429, r.body
    assert r.headers.get("Retry-After") == "1"
    assert r.body["code"] == "QB429" and "address" in r.body["message"]
    assert get_config(limited, b).status == 200          # another address has its own bucket
    time.sleep(1.1)                                      # refilled at 3 per second
    assert get_config(limited, a).status == 200


def test_spoofed_first_forwarded_entry_does_not_help(limited):
    a = addr()
    for _ in range(3):
        assert get_config(limited, a).status == 200
    # the client may write anything before the proxy's entry; the last one counts
    r = limited.get("/rpc/config", headers={"X-Forwarded-For": f"{addr()}, {a}"})
    assert r.status == 429


def test_stripe_webhooks_are_never_limited_by_address(limited, pg):
    a = addr()
    for _ in range(3):
        get_config(limited, a)
    assert get_config(limited, a).status == 429
    for _ in range(10):
        body, header = signed_event()
        r = limited.post("/rpc/stripe_webhook", body=body,
                         headers={"Stripe-Signature": header, "X-Forwarded-For": a})
        assert r.status == 200, r.body


def test_per_tenant_limit(limited, pg):
    for t in ("guard_t1", "guard_t2"):
        pg.sql("SELECT billing.upsert_tenant(%s, 'Guard', 'g@guard.example')", (t,))
    # each request from a different address: only the tenant's bucket binds
    statuses = [get_config(limited, addr(), claims=tenant_claims("guard_t1")).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    r = get_config(limited, addr(), claims=tenant_claims("guard_t1"))
    assert r.status == 429 and "tenant" in r.body["message"]
    assert get_config(limited, addr(), claims=tenant_claims("guard_t2")).status == 200


def test_limits_off_when_zero(pg):
    set_limits(pg, rate_limit_address=0)
    try:
        client = PostgREST(pg.dsn(user="authenticator"), pre_request="api.pre_request")
        a = addr()
        assert all(get_config(client, a).status == 200 for _ in range(60))
        client.close()
    finally:
        set_limits(pg, rate_limit_address=None)


def test_refusal_never_waits_for_the_audit_chain(pg, api):
    """A forged delivery takes no lock an audited operation holds: with the
    audit chain's head locked by an open transaction, it is refused at once."""
    body, _ = signed_event()
    holder = psycopg.connect(pg.dsn())
    try:
        holder.execute("SELECT * FROM billing.audit_head FOR UPDATE")
        started = time.time()
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Stripe-Signature": "t=1,v1=" + "0" * 64})
        took = time.time() - started
    finally:
        holder.rollback()
        holder.close()
    assert r.status == 400 and r.body["reason"] == "mismatch"
    assert took < 1.0, f"the refusal waited {took:.2f} s"


def _p99(samples):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def _audited_calls(pg, seconds):
    """Audited tenant calls (a tenant's email change) for `seconds`; their latencies."""
    lat = []
    with pg.connect(autocommit=True) as c:
        end = time.time() + seconds
        i = 0
        while time.time() < end:
            i += 1
            t0 = time.perf_counter()
            c.execute("SELECT billing.upsert_tenant('guard_flood', 'Flood', %s)", (f"f{i}@guard.example",))
            lat.append(time.perf_counter() - t0)
    return lat


def test_forged_flood_does_not_slow_audited_calls(pg):
    pg.sql("SELECT billing.flush_webhook_rejections()")
    baseline = _audited_calls(pg, 3)
    audit_before = pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'webhook.rejected'")[0][0]
    stop = threading.Event()
    sent = [0] * 8

    def flood(k):
        client = PostgREST(pg.dsn(user="authenticator"))
        while not stop.is_set():
            body = json.dumps({"id": f"evt_forged_{uuid.uuid4().hex}", "type": "invoice.paid",
                               "created": int(time.time()), "livemode": False,
                               "data": {"object": {"id": "in_x"}}})
            client.post("/rpc/stripe_webhook", body=body,
                        headers={"Stripe-Signature": f"t={int(time.time())},v1={uuid.uuid4().hex * 2}"})
            sent[k] += 1
        client.close()

    threads = [threading.Thread(target=flood, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        flooded = _audited_calls(pg, 3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    audit_after = pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'webhook.rejected'")[0][0]
    counted = pg.sql("SELECT (SELECT coalesce(sum(deliveries), 0) FROM billing.webhook_rejections_pending() "
                     "WHERE reason = 'mismatch')")[0][0]
    print(f"\nforged deliveries: {sum(sent)} in ~3.5 s from 8 connections; "
          f"audited call p99 without flood {_p99(baseline) * 1000:.2f} ms ({len(baseline)} calls), "
          f"with flood {_p99(flooded) * 1000:.2f} ms ({len(flooded)} calls); "
          f"audit rows written for the flood: {audit_after - audit_before}")
    assert sum(sent) > 100
    # at most one roll-up row per reason per flush (the worker flushes about once a minute)
    assert audit_after - audit_before <= 2 * 12
    pg.sql("SELECT billing.flush_webhook_rejections()")
    assert counted >= 0


def test_worker_writes_refusals_once_a_minute():
    """The worker writes counted refusals: the first at once, then at most once
    a minute (one row and one audit row per reason), and nothing when idle."""
    from pgcluster import Cluster
    cluster = Cluster("refusals", env={"STRIPE_TEST_WEBHOOK_SECRET": SECRET}).start()
    try:
        assert cluster.wait_until("SELECT alive FROM billing.worker_status")
        api = PostgREST(cluster.dsn(user="authenticator"))
        body, _ = signed_event()
        bad = {"Stripe-Signature": "t=1,v1=" + "0" * 64}
        assert api.post("/rpc/stripe_webhook", body=body, headers=bad).status == 400
        assert cluster.wait_until("SELECT count(*) = 0 FROM billing.webhook_rejections_pending()", timeout=10)
        assert cluster.sql("SELECT reason, deliveries FROM billing.webhook_rejections") == [("mismatch", 1)]
        for _ in range(5):
            api.post("/rpc/stripe_webhook", body=body, headers=bad)
        time.sleep(2)
        # within the minute: counted, not written yet
        assert cluster.sql("SELECT sum(deliveries) FROM billing.webhook_rejections_pending()")[0][0] == 5
        assert cluster.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'webhook.rejected'")[0][0] == 1
        api.close()
    finally:
        from conftest import amcheck_and_stop
        amcheck_and_stop(cluster)
