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
    audit chain's head locked by an open transaction, it is refused, and its
    answer comes while that lock is still held (had it waited for the lock,
    it would wait until the holder ends)."""
    body, _ = signed_event()
    holder = psycopg.connect(pg.dsn())
    answer, took = [], []

    def refuse():
        started = time.perf_counter()
        answer.append(api.post("/rpc/stripe_webhook", body=body,
                               headers={"Stripe-Signature": "t=1,v1=" + "0" * 64}))
        took.append(time.perf_counter() - started)

    try:
        holder.execute("SELECT * FROM billing.audit_head FOR UPDATE")
        t = threading.Thread(target=refuse)
        t.start()
        t.join(60)
        answered_while_held = not t.is_alive()
        waiting = pg.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                         "AND query LIKE '%%stripe_webhook%%'")[0][0]
    finally:
        holder.rollback()
        holder.close()
    t.join()
    assert answered_while_held and waiting == 0, "the refusal waited for the audit chain's lock"
    r = answer[0]
    assert r.status == 400 and r.body["reason"] == "mismatch"
    print(f"\nrefusal with the audit chain locked: answered in {took[0] * 1000:.1f} ms")


def _p(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


# the refusal flush's advisory lock (QES_FLUSH_LOCK_KEY, src/guard.c)
FLUSH_LOCK = 0x7165735f72656a65


def refusals(pg, reason):
    """Deliveries refused for `reason` so far: written plus still pending,
    read under the flush's lock, so that a flush (the worker's, about once a
    minute) is never seen half done."""
    with pg.connect() as c:
        c.execute("SELECT pg_advisory_xact_lock(%s)", (FLUSH_LOCK,))
        written = c.execute("SELECT coalesce(sum(deliveries), 0) FROM billing.webhook_rejections "
                            "WHERE reason = %s", (reason,)).fetchone()[0]
        pending = c.execute("SELECT coalesce(sum(deliveries), 0) FROM billing.webhook_rejections_pending() "
                            "WHERE reason = %s", (reason,)).fetchone()[0]
        c.rollback()
    return written + pending


def rejection_audit_rows(pg, reason):
    return pg.sql("SELECT count(*), coalesce(sum((details ->> 'deliveries')::bigint), 0) FROM billing.audit_log "
                  "WHERE action = 'webhook.rejected' AND details ->> 'reason' = %s", (reason,))[0]


def _audited_calls(pg, tenant, label, calls=None, until=None):
    """Audited tenant calls (the tenant's email changed each time): `calls`
    of them, or until until() (at least one).  Returns their latencies and
    the calls whose answer was not the row they wrote."""
    lat, wrong = [], []
    with pg.connect(autocommit=True) as c:
        i = 0
        while True:
            i += 1
            email = f"{label}{i}@guard.example"
            t0 = time.perf_counter()
            row = c.execute("SELECT tenant_id, billing_email FROM billing.upsert_tenant(%s, 'Flood', %s)",
                            (tenant, email)).fetchone()
            lat.append(time.perf_counter() - t0)
            if row != (tenant, email):
                wrong.append((email, row))
            if (calls is not None and i >= calls) or (until is not None and until()):
                break
    return lat, wrong


def test_forged_flood_leaves_audited_calls_correct(pg):
    """8 connections send 3,200 forged deliveries while a tenant's audited calls
    run: every forged delivery is refused (400, mismatch) and counted exactly
    once, every audited call writes and answers its row and is audited, the
    audit chain verifies, and the flood writes at most one audit row per
    worker flush (at most one a minute, the first at once).  The latencies
    are printed, not judged (make bench measures speed)."""
    tenant = "guard_flood"
    pg.sql("SELECT billing.upsert_tenant(%s, 'Flood', 'f0@guard.example')", (tenant,))
    pg.sql("SELECT billing.flush_webhook_rejections()")     # nothing of earlier tests pending
    counted_before = refusals(pg, "mismatch")
    rows_before, audited_before = rejection_audit_rows(pg, "mismatch")
    tenant_audit_before = pg.sql("SELECT count(*) FROM billing.audit_log WHERE tenant_id = %s "
                                 "AND action = 'tenant.updated'", (tenant,))[0][0]

    baseline, wrong_baseline = _audited_calls(pg, tenant, "base", calls=200)

    per_thread = 400
    answers = [[] for _ in range(8)]
    started = threading.Event()

    def flood(k):
        client = PostgREST(pg.dsn(user="authenticator"))
        try:
            started.set()
            for _ in range(per_thread):
                body = json.dumps({"id": f"evt_forged_{uuid.uuid4().hex}", "type": "invoice.paid",
                                   "created": int(time.time()), "livemode": False,
                                   "data": {"object": {"id": "in_x"}}})
                r = client.post("/rpc/stripe_webhook", body=body,
                                headers={"Stripe-Signature": f"t={int(time.time())},v1={uuid.uuid4().hex * 2}"})
                answers[k].append((r.status, r.body.get("reason") if isinstance(r.body, dict) else r.body))
        finally:
            client.close()

    threads = [threading.Thread(target=flood, args=(k,)) for k in range(8)]
    t0 = time.time()
    for t in threads:
        t.start()
    try:
        started.wait(30)
        flooded, wrong_flooded = _audited_calls(pg, tenant, "flood",
                                                until=lambda: not any(t.is_alive() for t in threads))
    finally:
        for t in threads:
            t.join()
    flood_s = time.time() - t0
    sent = sum(len(a) for a in answers)
    counted = refusals(pg, "mismatch") - counted_before
    rows_after, audited_after = rejection_audit_rows(pg, "mismatch")
    print(f"\nforged deliveries: {sent} in {flood_s:.1f} s from 8 connections; audited calls: "
          f"without the flood p50 {_p(baseline, 0.5) * 1000:.2f} ms p99 {_p(baseline, 0.99) * 1000:.2f} ms "
          f"({len(baseline)} calls), during it p50 {_p(flooded, 0.5) * 1000:.2f} ms "
          f"p99 {_p(flooded, 0.99) * 1000:.2f} ms ({len(flooded)} calls); "
          f"audit rows written for the flood meanwhile: {rows_after - rows_before}")

    # every forged delivery refused, and counted exactly once
    assert sent == 8 * per_thread
    assert {a for answer in answers for a in answer} == {(400, "mismatch")}
    assert counted == sent, (counted, sent)
    # every audited call did what it was asked, and is in the audit chain
    assert wrong_baseline == [] and wrong_flooded == []
    assert pg.sql("SELECT billing_email FROM billing.tenants WHERE tenant_id = %s", (tenant,)) == \
        [(f"flood{len(flooded)}@guard.example",)]
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE tenant_id = %s AND action = 'tenant.updated'",
                  (tenant,))[0][0] - tenant_audit_before == len(baseline) + len(flooded)
    assert pg.sql("SELECT ok FROM billing.verify_audit_chain()") == [(True,)]
    # the flood's audit rows: one per reason per worker flush, at most one a minute
    assert rows_after - rows_before <= 1 + int(flood_s // 60)
    # written now: exactly the deliveries counted, in the rows and the audit rows
    pg.sql("SELECT billing.flush_webhook_rejections()")
    assert pg.sql("SELECT count(*) FROM billing.webhook_rejections_pending() WHERE reason = 'mismatch'") == [(0,)]
    assert rejection_audit_rows(pg, "mismatch")[1] - audited_before == counted


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
