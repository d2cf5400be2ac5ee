"""Stripe's account-wide rate, shared by the shards (docs/scaleout.md,
"Stripe's account limits").

A fake Stripe account counts every request per second across all shards
and answers 429 above the account's limit.  Uncoordinated, two shards that
each keep their own qes_billing.max_requests_per_second (the account's
rate) send twice the account's rate and get 429s; with the router's
coordinator the sum stays within it, a shard alone gets (nearly) all of it,
two busy shards get even shares, and a 429 on one shard slows the other.
"""
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import TEST_KEYS, amcheck_and_stop
from shards import Sharded

LIMIT = 20       # the account's requests per second (Stripe's test mode allows 25)


class Account:
    """One Stripe account: every request of every shard, by second."""

    def __init__(self, limit):
        self.limit = limit
        self.lock = threading.Lock()
        self.log = []                  # (time, shard, status)
        self.force_429 = None          # a shard whose requests are refused for now

    def serve(self):
        account = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                shard = parse_qs(url.query).get("shard", ["?"])[0]
                now = time.time()
                with account.lock:
                    second = int(now)
                    in_second = sum(1 for t, _, _ in account.log if int(t) == second)
                    status = 429 if in_second >= account.limit or account.force_429 == shard else 200
                    account.log.append((now, shard, status))
                body = json.dumps({"object": "balance", "available": []} if status == 200 else
                                  {"error": {"type": "invalid_request_error", "code": "rate_limit",
                                             "message": "Too many requests"}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 429:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def window(self, t0, t1, shard=None):
        with self.lock:
            return [x for x in self.log if t0 <= x[0] < t1 and (shard is None or x[1] == shard)]

    def per_second(self, t0, t1):
        with self.lock:
            return Counter(int(t) for t, _, _ in self.log if t0 <= t < t1)


@pytest.fixture(scope="module")
def setup():
    account = Account(LIMIT)
    base = account.serve()
    conf = {"qes_billing.stripe_api_base": f"'{base}'", "qes_billing.reconcile_interval": "0",
            # each shard alone keeps within the account's rate ...
            "qes_billing.max_requests_per_second": str(LIMIT),
            "qes_billing.retry_base_delay": "'200ms'", "qes_billing.retry_max_delay": "'1s'",
            "qes_billing.max_attempts": "50"}
    sharded = Sharded(2, env=TEST_KEYS, shard_conf=conf,
                      router_conf={"qes_billing.max_requests_per_second": str(LIMIT)}).start()
    sharded.wait_workers()
    try:
        yield account, sharded
    finally:
        account.stop()
        sharded.stop(amcheck_and_stop)


def queue(cluster, shard, n):
    cluster.sql("SELECT billing.outbox_enqueue(NULL, 'test.ping', 'GET', '/v1/balance', "
                "jsonb_build_object('shard', %s::text, 'n', i)) FROM generate_series(1, %s) i", (shard, n))


def drained(cluster):
    return cluster.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests "
                              "WHERE kind = 'test.ping' AND state IN ('pending', 'in_flight'))", 120)


def coordinator(sharded, seconds):
    def run():
        with sharded.router.connect(autocommit=True) as c:
            c.execute("CALL router.stripe_coordinator(200, %s)", (seconds,))
    th = threading.Thread(target=run)
    th.start()
    return th


def test_uncoordinated_shards_pass_the_account_limit(setup):
    """The fake can fail: two shards each within their own limit send twice
    the account's rate together, and Stripe answers 429."""
    account, sharded = setup
    s0, s1 = sharded.shards
    t0 = time.time()
    queue(s0, "s0", 60)
    queue(s1, "s1", 60)
    assert drained(s0) and drained(s1)
    seconds = account.per_second(t0, time.time())
    assert max(seconds.values()) > LIMIT * 1.3, seconds
    assert any(x[2] == 429 for x in account.window(t0, time.time()))


def test_coordinated_shards_share_the_account_rate(setup):
    account, sharded = setup
    s0, s1 = sharded.shards
    time.sleep(2.5)                    # the previous test's 429s are behind
    th = coordinator(sharded, 40)
    try:
        time.sleep(0.6)
        # one shard busy, the other idle: it gets (nearly) the account's rate
        t0 = time.time()
        queue(s0, "s0", 80)
        assert drained(s0)
        t1 = time.time()
        alone = len(account.window(t0, t1, "s0")) / (t1 - t0)
        assert alone >= LIMIT * 0.6, (alone, account.per_second(t0, t1))
        # both busy: even shares, the sum within the account's rate
        t2 = time.time()
        queue(s0, "s0", 80)
        queue(s1, "s1", 80)
        assert drained(s0) and drained(s1)
        t3 = time.time()
        seconds = account.per_second(t2, t3)
        full = [n for sec, n in seconds.items() if t2 + 1 <= sec < t3 - 1]
        assert full and max(full) <= LIMIT, seconds
        ok = [x for x in account.window(t2, t3) if x[2] == 200]
        first_half = [x for x in ok if x[0] < t2 + (t3 - t2) / 2]
        n0 = sum(1 for x in first_half if x[1] == "s0")
        n1 = sum(1 for x in first_half if x[1] == "s1")
        assert n0 and n1 and 0.5 <= n0 / n1 <= 2.0, (n0, n1)
        assert [x for x in account.window(t0, t3) if x[2] == 429] == []
        # a 429 on s1 slows s0 too
        queue(s0, "s0", 200)
        queue(s1, "s1", 200)
        time.sleep(2)
        t4 = time.time()
        before = len([x for x in account.window(t4 - 1.5, t4, "s0") if x[2] == 200]) / 1.5
        account.force_429 = "s1"
        time.sleep(0.5)
        account.force_429 = None
        t5 = time.time()
        time.sleep(1.5)
        after = len([x for x in account.window(t5, t5 + 1.0, "s0")]) / 1.0
        assert before > 0 and after <= before * 0.6, (before, after)
        shares = sharded.router.sql("SELECT shard_name, up, share FROM router.stripe_shares ORDER BY 1")
        assert [s[:2] for s in shares] == [("s0", True), ("s1", True)]
        assert drained(s0) and drained(s1)
    finally:
        th.join(60)
    # the coordinator stopped: shares fall back to account rate / shards
    time.sleep(1)
    rates = [c.sql("SELECT billing.stripe_budget_rate(b) FROM billing.stripe_rate_budget b")[0][0]
             for c in sharded.shards]
    assert rates == [LIMIT / 2, LIMIT / 2], rates
