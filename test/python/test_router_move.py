"""Moving partitions between shards while the platform runs
(docs/scaleout.md, "Moving a partition"): a router, 4 shards (PgBouncer
between), a fake Stripe that answers slowly (so requests are in flight when
a move fences), and the platform writing usage for tenants of every
partition, each write in its own transaction on the tenant's shard, with
repeated idempotency keys; webhooks delivered through the router all the
while.

- one move under that load: every acknowledged key recorded exactly once,
  on the tenant's shard only, a repeated key answered as the first time;
  totals equal before and after; only the moving partition's writes pause;
  subscriptions created while the move ran exist once, in Stripe and in the
  mirror; every webhook applied on the shard that owns its tenant; both
  shards' audit chains record the move with the same digests and verify;
- interrupted moves: stopped after the fence (writes refused until it goes
  on), the mover's session killed in the middle of the copy and resumed,
  a move undone before the switch (everything as before);
- adding shards: 4 -> 8 under the same load, half of the partitions moved;
  the pauses (p50/p99) are printed.
Every cluster ends with amcheck over every billing index.
"""
import json
import random
import statistics
import threading
import time

import psycopg
import pytest

from conftest import TEST_KEYS, amcheck_and_stop, tenant_claims
from fake_stripe import FakeStripe, signed
from postgrest import PostgREST
from shards import Sharded
from test_router import SECRET, seed_prices, shard_conf, use_prices

PARTITIONS = 16
MOVING = ("QBMOV", "QBMVD")


class Platform:
    """The platform: usage in its own transactions on each tenant's shard,
    found with router.tenant_shard and looked up again when the shard says
    the tenant's partition is moving or has moved."""

    def __init__(self, world, tenants):
        self.world = world
        self.sharded = world["sharded"]
        self.tenants = tenants
        self.where = {}
        self.lock = threading.Lock()
        # (tenant, key) -> the first answer's total, over every test of the module
        self.acked = world.setdefault("acked", {})
        world["platforms"] = world.get("platforms", 0) + 1
        self.run_id = world["platforms"]
        self.repeats = 0
        self.mismatches = []
        self.refusals = {}         # tenant -> refusals seen
        self.pauses = []           # (tenant, seconds from the first refusal to the answer)
        self.errors = []
        self.stop = threading.Event()
        self.threads = []

    def dsn(self, tenant, fresh=False):
        if fresh or tenant not in self.where:
            row = self.sharded.router.sql("SELECT shard_name, connstr, pool_name FROM router.tenant_shard(%s)",
                                          (tenant,))[0]
            if row[2]:
                self.where[tenant] = (f"host=127.0.0.1 port={self.sharded.bouncer.port} dbname={row[2]} "
                                      "user=postgres")
            else:
                self.where[tenant] = row[1] + " user=postgres"
        return self.where[tenant]

    def record(self, tenant, key):
        """One billable act's usage, retried while its partition moves;
        the answer and how long it was refused."""
        first_refusal = None
        fresh = False
        while True:
            try:
                with psycopg.connect(self.dsn(tenant, fresh), prepare_threshold=None, connect_timeout=5) as c:
                    with c.transaction():
                        row = c.execute("SELECT to_jsonb(r) FROM billing.record_usage(%s, 'signatures', 1, %s) r",
                                        (tenant, key)).fetchone()[0]
                if first_refusal is not None:
                    with self.lock:
                        self.pauses.append((tenant, time.monotonic() - first_refusal))
                return row
            except psycopg.Error as e:
                if e.sqlstate not in MOVING:
                    raise
                with self.lock:
                    self.refusals[tenant] = self.refusals.get(tenant, 0) + 1
                if first_refusal is None:
                    first_refusal = time.monotonic()
                fresh = True
                time.sleep(0.005 if e.sqlstate == "QBMVD" else 0.02)

    def run(self, seed):
        rnd = random.Random(seed)
        n = 0
        while not self.stop.is_set():
            tenant = rnd.choice(self.tenants)
            with self.lock:
                mine = [k for k in self.acked if k[0] == tenant]
            repeat = mine and rnd.random() < 0.2
            key = rnd.choice(mine)[1] if repeat else f"{tenant}-{self.run_id}.{seed}-{n}"
            n += 1
            try:
                ans = self.record(tenant, key)
            except Exception as e:       # nothing else may fail
                with self.lock:
                    self.errors.append(f"{tenant} {key}: {e}")
                continue
            with self.lock:
                if repeat:
                    self.repeats += 1
                    if not ans["duplicate"] or ans["total"] != self.acked[(tenant, key)]:
                        self.mismatches.append((tenant, key, ans, self.acked[(tenant, key)]))
                elif ans["duplicate"]:
                    self.mismatches.append((tenant, key, ans, "new key answered as a duplicate"))
                else:
                    self.acked[(tenant, key)] = ans["total"]

    def start(self, n=3):
        self.stop.clear()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()
        time.sleep(0.5)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not self.errors, self.errors[:5]
        assert not self.mismatches, self.mismatches[:5]


class Webhooks:
    """Stripe delivering every event of the fake through the router, again
    and again while the router answers 503 (as Stripe retries)."""

    def __init__(self, world):
        self.api = PostgREST(world["sharded"].router.dsn(user="authenticator"))
        self.fake = world["fake"]
        self.sent = 0
        self.refused = 0
        self.stop = threading.Event()
        self.thread = None

    def deliver(self, ev):
        body, header = signed(ev, SECRET)
        for _ in range(600):
            r = self.api.post("/rpc/stripe_webhook", body=body,
                              headers={"Content-Type": "application/json", "Stripe-Signature": header})
            if r.status == 200:
                return
            assert r.status == 503, (r.status, r.body)
            self.refused += 1
            time.sleep(0.05)
        raise AssertionError(f"event {ev['id']} refused for 30 s")

    def run(self):
        while not self.stop.is_set():
            events = list(self.fake.events)
            if self.sent < len(events):
                self.deliver(events[self.sent])
                self.sent += 1
            else:
                time.sleep(0.02)

    def start(self):
        self.stop.clear()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def finish(self):
        deadline = time.time() + 60
        while self.sent < len(self.fake.events) and time.time() < deadline:
            time.sleep(0.05)
        self.stop.set()
        self.thread.join(timeout=60)
        assert self.sent == len(self.fake.events)


@pytest.fixture(scope="module")
def world():
    fake = FakeStripe(seed=19, delay_s=0.15)
    fake.base = fake.serve()
    seed_prices(fake)
    sharded = None
    try:
        sharded = Sharded(4, env=TEST_KEYS, shard_conf=shard_conf(fake.base), partitions=PARTITIONS).start()
        for c in sharded.shards:
            use_prices(c)
        sharded.wait_workers()
        tenants = [f"mv{i}" for i in range(48)]
        with sharded.router.connect(autocommit=True) as c:
            for t in tenants:
                c.execute("SELECT router.upsert_tenant(%s, %s, %s)", (t, t, f"{t}@example.com"))
        yield {"sharded": sharded, "fake": fake, "tenants": tenants}
    finally:
        if sharded is not None:
            sharded.stop(amcheck_and_stop)
        fake.stop()


def router_call(world, sql, params=()):
    with world["sharded"].router.connect(autocommit=True) as c:
        cur = c.execute(sql, params)
        return cur.fetchall() if cur.description else []


def partition_of(world, tenant):
    return router_call(world, "SELECT router.tenant_partition(%s)", (tenant,))[0][0]


def move(world, partition, shard, **settings):
    with world["sharded"].router.connect(autocommit=True) as c:
        for k, v in settings.items():
            c.execute(f"SET qes_billing_router.{k} = '{v}'")
        c.execute("CALL router.move_partition_online(%s, %s)", (partition, shard))
    return router_call(world, "SELECT move_id, step, pause_ms FROM router.partition_move_pauses "
                              "WHERE partition = %s ORDER BY move_id DESC LIMIT 1", (partition,))[0]


def settle(world, timeout=90):
    """Every shard's outbox and inbox at rest, events stranded by moves handed over."""
    deadline = time.time() + timeout
    q = ("SELECT NOT EXISTS (SELECT FROM billing.stripe_requests WHERE state IN ('pending', 'in_flight', 'waiting')) "
         "AND NOT EXISTS (SELECT FROM billing.webhook_events WHERE state IN ('received', 'processing'))")
    while time.time() < deadline:
        router_call(world, "SELECT router.forward_moved_events()")
        if all(c.sql(q)[0][0] for c in world["sharded"].shards):
            return
        time.sleep(0.2)
    raise AssertionError([(c.name, c.sql("SELECT kind, state, tenant_id, error FROM billing.stripe_requests "
                                         "WHERE state IN ('pending', 'in_flight', 'waiting')"),
                           c.sql("SELECT stripe_event_id, state, last_error FROM billing.webhook_events "
                                 "WHERE state IN ('received', 'processing')"))
                          for c in world["sharded"].shards])


def usage_everywhere(world):
    """(tenant, key) -> [shard names holding it], over every shard."""
    out = {}
    for name, c in world["sharded"].names.items():
        for t, k in c.sql("SELECT tenant_id, idempotency_key FROM billing.usage_events"):
            out.setdefault((t, k), []).append(name)
    return out


def check_exactly_once(world, platform):
    sharded = world["sharded"]
    held = usage_everywhere(world)
    for (t, k) in platform.acked:
        assert (t, k) in held, ("acknowledged usage lost", t, k)
        assert held[(t, k)] == [sharded.shard_name_of(t)], ("usage not exactly once on the tenant's shard", t, k,
                                                            held[(t, k)])
    for (t, k), where in held.items():
        if t in world["tenants"]:
            assert (t, k) in platform.acked, ("usage nobody acknowledged", t, k, where)
    # totals: check_limit counts each key of the current period once
    for t in world["tenants"]:
        c = sharded.names[sharded.shard_name_of(t)]
        period = c.sql("SELECT period_start FROM billing.usage_current(%s) WHERE metric = 'signatures'", (t,))[0][0]
        in_period = {r[0] for r in c.sql("SELECT idempotency_key FROM billing.usage_events WHERE tenant_id = %s "
                                         "AND period_start = %s", (t, period))}
        n = sum(1 for (tt, k) in platform.acked if tt == t and k in in_period)
        got = router_call(world, "SELECT current FROM router.check_limit(%s, 'signatures')", (t,))[0][0]
        assert got == n, (t, got, n, period)


def check_audit(world, move_id):
    """Both chains record the move with the same digest, and verify."""
    sharded = world["sharded"]
    m = router_call(world, "SELECT from_shard, to_shard, digest FROM router.partition_moves WHERE move_id = %s",
                    (move_id,))[0]
    src, dst = sharded.names[m[0]], sharded.names[m[1]]
    out = src.sql("SELECT details FROM billing.audit_log WHERE action = 'partition.moved_out' "
                  "AND (details->>'move_id')::bigint = %s", (move_id,))
    inn = dst.sql("SELECT details FROM billing.audit_log WHERE action = 'partition.moved_in' "
                  "AND (details->>'move_id')::bigint = %s", (move_id,))
    assert len(out) == 1 and len(inn) == 1, (out, inn)
    assert out[0][0]["rows"] == inn[0][0]["rows"] == m[2]
    assert out[0][0]["to_shard"] == m[1] and inn[0][0]["from_shard"] == m[0]
    for c in (src, dst):
        ok = c.sql("SELECT ok FROM billing.verify_audit_chain()")[0][0]
        assert ok, c.sql("SELECT * FROM billing.verify_audit_chain()")


def check_tenant_audit(world, move_id, tenant, other):
    """router.tenant_audit: the tenant's entries of every shard's chain, the
    old shard's from before the move and the new one's from after it, with
    the move between them; nothing of another partition's moves."""
    sharded = world["sharded"]
    m = router_call(world, "SELECT from_shard, to_shard, partition, partitions FROM router.partition_moves "
                           "WHERE move_id = %s", (move_id,))[0]
    with sharded.router.connect(autocommit=True) as c:
        c.execute("SET ROLE qes_admin")      # what operators have
        got = c.execute("SELECT shard, up, audit_id, occurred_at, action, details, hash FROM router.tenant_audit(%s)",
                        (tenant,)).fetchall()
        other_rows = c.execute("SELECT action, details FROM router.tenant_audit(%s)", (other,)).fetchall()
    assert got and all(r[1] for r in got), got
    want = set()
    for name, c in sharded.names.items():
        for (aid,) in c.sql("SELECT audit_id FROM billing.audit_log WHERE tenant_id = %s", (tenant,)):
            want.add((name, aid))
    assert {(r[0], r[2]) for r in got if r[4] not in ("partition.moved_out", "partition.moved_in")} == want
    shards_with_entries = {r[0] for r in got if r[4] not in ("partition.moved_out", "partition.moved_in")}
    assert {m[0], m[1]} <= shards_with_entries, (m, shards_with_entries)
    moves = [(r[0], r[4], r[5]["move_id"]) for r in got if r[4] in ("partition.moved_out", "partition.moved_in")]
    assert (m[0], "partition.moved_out", move_id) in moves and (m[1], "partition.moved_in", move_id) in moves, moves
    assert all(r[5]["partition"] == m[2] for r in got if r[4].startswith("partition.moved")), moves
    # on the old shard everything of the tenant happened before its move out
    out_at = next(r[3] for r in got if r[4] == "partition.moved_out" and r[5]["move_id"] == move_id)
    assert all(r[3] <= out_at for r in got if r[0] == m[0] and r[4] not in ("partition.moved_out", "partition.moved_in"))
    # the hashes are the chains' own
    for r in got[:3]:
        h = sharded.names[r[0]].sql("SELECT encode(hash, 'hex') FROM billing.audit_log WHERE audit_id = %s", (r[2],))
        assert h == [(r[6],)], (r, h)
    # a tenant of another partition: its own entries, none of this move
    assert router_call(world, "SELECT router.tenant_partition(%s)", (other,))[0][0] != m[2]
    assert other_rows and not any(d.get("move_id") == move_id for (a, d) in other_rows
                                  if a.startswith("partition.moved")), other_rows


def test_a_move_under_load(world):
    sharded, fake, tenants = world["sharded"], world["fake"], world["tenants"]
    # the partition with the most of our tenants, and the tenants' subscriptions under way when it moves
    by_part = {}
    for t in tenants:
        by_part.setdefault(partition_of(world, t), []).append(t)
    part = max(by_part, key=lambda p: len(by_part[p]))
    movers = by_part[part]
    src = router_call(world, "SELECT router.partition_shard(%s)", (part,))[0][0]
    dst = next(n for n in ("s0", "s1", "s2", "s3") if n != src)
    api = PostgREST(sharded.router.dsn(user="authenticator"))
    platform, hooks = Platform(world, tenants), Webhooks(world)
    platform.start()
    hooks.start()
    try:
        for t in movers:
            r = api.post("/rpc/create_subscription", claims=tenant_claims(t), body={"plan": "professional"})
            assert r.status == 200, r.body
        time.sleep(0.2)       # customers created, subscriptions on their way to the slow Stripe
        in_flight = sharded.names[src].sql(
            "SELECT count(*) FROM billing.stripe_requests WHERE state IN ('pending', 'in_flight') "
            "AND tenant_id = ANY (%s)", (movers,))[0][0]
        move_id, step, pause_ms = move(world, part, dst)
        assert step == "done"
        time.sleep(1)
        # the tenants' browsers pay (webhooks follow)
        for t in movers:
            for _ in range(100):
                cus = [c["id"] for c in fake.of_type("customer") if c.get("metadata", {}).get("tenant_id") == t]
                pis = [p for p in fake.of_type("payment_intent") if p["customer"] in cus]
                if pis:
                    break
                time.sleep(0.1)
            fake.confirm(pis[-1]["id"], "pm_card_visa")
        time.sleep(1)
    finally:
        platform.finish()
        hooks.finish()
        api.close()
    settle(world)
    print(f"move {move_id}: partition {part} ({len(movers)} tenants) {src} -> {dst}, pause {pause_ms} ms, "
          f"{in_flight} Stripe requests pending or in flight at the start, {len(platform.acked)} keys, "
          f"{platform.repeats} repeats, {hooks.refused} deliveries refused (503) while it moved")
    assert in_flight > 0, "no Stripe request was under way when the partition moved"
    assert platform.repeats > 0
    # only the moving partition's writes paused
    assert set(platform.refusals) <= set(movers), platform.refusals
    check_exactly_once(world, platform)
    # nothing of the partition left on the source, all of it on the target
    for t in movers:
        assert sharded.names[src].sql("SELECT count(*) FROM billing.tenants WHERE tenant_id = %s", (t,))[0][0] == 0
        assert sharded.shard_name_of(t) == dst
    # each subscription once in Stripe and once in the mirror, as Stripe has it
    for t in movers:
        subs = [s for s in fake.of_type("subscription") if s.get("metadata", {}).get("tenant_id") == t]
        custs = [c for c in fake.of_type("customer") if c.get("metadata", {}).get("tenant_id") == t]
        assert len(subs) == 1 and len(custs) == 1, (t, len(subs), len(custs))
        mirror = sharded.names[dst].sql("SELECT stripe_subscription_id, status FROM billing.subscriptions "
                                        "WHERE tenant_id = %s", (t,))
        assert mirror == [(subs[0]["id"], subs[0]["status"])], (t, mirror, subs[0]["status"])
        reqs = {}
        for name, c in sharded.names.items():
            for (k,) in c.sql("SELECT idempotency_key FROM billing.stripe_requests WHERE tenant_id = %s", (t,)):
                reqs.setdefault(k, []).append(name)
        assert reqs and all(v == [dst] for v in reqs.values()), (t, reqs)
    # every event of a moved tenant is applied on the target, none is left waiting anywhere
    for ev in fake.events:
        tenant = (ev["data"]["object"].get("metadata") or {}).get("tenant_id")
        if tenant in movers:
            st = sharded.names[dst].sql("SELECT state FROM billing.webhook_events WHERE stripe_event_id = %s",
                                        (ev["id"],))
            assert st and st[0][0] in ("applied", "ignored"), (ev["id"], ev["type"], st)
    check_audit(world, move_id)
    check_tenant_audit(world, move_id, movers[0], next(t for t in tenants if t not in movers))


def test_interrupted_moves(world):
    sharded, tenants = world["sharded"], world["tenants"]
    platform = Platform(world, tenants)
    platform.start(2)
    try:
        parts = sorted({partition_of(world, t) for t in tenants})
        # 1. stopped once fenced: the partition's writes are refused until the move goes on
        p = parts[0]
        t = next(x for x in tenants if partition_of(world, x) == p)
        src = router_call(world, "SELECT router.partition_shard(%s)", (p,))[0][0]
        dst = next(n for n in ("s0", "s1", "s2", "s3") if n != src)
        _, step, _ = move(world, p, dst, move_stop_after="precopied")
        assert step == "precopied"
        # a DBA's usage row, not logged for the move (not by record_usage): the
        # copy under the fence sees the counts differ and copies all usage again
        dba = next(f"dba{i}" for i in range(10000) if partition_of(world, f"dba{i}") == p)
        router_call(world, "SELECT router.upsert_tenant(%s, 'dba', 'dba@example.com')", (dba,))
        sharded.names[src].sql(
            "INSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at) "
            "VALUES (%s, 'by-hand', 'documents', 3, date_trunc('month', billing.now()), billing.now())", (dba,))
        _, step, _ = move(world, p, dst, move_stop_after="fenced")
        assert step == "fenced"
        with pytest.raises(psycopg.Error) as e:
            with psycopg.connect(sharded.names[src].dsn(), autocommit=True) as c:
                c.execute("SELECT billing.record_usage(%s, 'signatures', 1, 'while-fenced')", (t,))
        assert e.value.sqlstate == "QBMOV"
        assert "being moved" in e.value.diag.message_primary and e.value.diag.message_hint
        time.sleep(0.5)
        move_id, step, _ = move(world, p, dst)
        assert step == "done"
        check_audit(world, move_id)
        first = (move_id, src, dst)
        # registered after the history was copied, its usage not logged: copied whole under the fence
        assert "usage_events_again" in router_call(world, "SELECT copied_rows FROM router.partition_moves "
                                                          "WHERE move_id = %s", (move_id,))[0][0]
        assert sharded.names[dst].sql("SELECT quantity FROM billing.usage_events WHERE tenant_id = %s", (dba,)) == [(3,)]

        # 2. the mover's session killed while it copies the usage history
        #    (100,000 rows of one more tenant of the partition): run again, it goes on
        p = parts[1]
        src = router_call(world, "SELECT router.partition_shard(%s)", (p,))[0][0]
        dst = next(n for n in ("s0", "s1", "s2", "s3") if n != src)
        bulk = next(f"bulk{i}" for i in range(10000) if partition_of(world, f"bulk{i}") == p)
        router_call(world, "SELECT router.upsert_tenant(%s, 'bulk', 'bulk@example.com')", (bulk,))
        sharded.names[src].sql(
            "INSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, occurred_at) "
            "SELECT %s, 'old-' || i, 'documents', 1, date_trunc('month', billing.now()) - interval '1 month', "
            "date_trunc('month', billing.now()) - interval '1 month' FROM generate_series(1, 100000) i", (bulk,))
        killed = []

        def run_mover():
            try:
                move(world, p, dst)
            except psycopg.Error as e:
                killed.append(e)
        mover = threading.Thread(target=run_mover)
        mover.start()
        deadline = time.time() + 30
        copied = 0
        while time.time() < deadline and not (0 < copied < 100000):
            copied = sharded.names[dst].sql("SELECT count(*) FROM billing.usage_events WHERE tenant_id = %s",
                                            (bulk,))[0][0]
            time.sleep(0.01)
        router_call(world, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE query LIKE 'CALL router.move%%' AND pid <> pg_backend_pid()")
        mover.join()
        assert len(killed) == 1, "the mover was not interrupted"
        step = router_call(world, "SELECT step FROM router.partition_moves WHERE partition = %s "
                                  "ORDER BY move_id DESC LIMIT 1", (p,))[0][0]
        assert step == "started" and 0 < copied < 100000, (step, copied)
        move_id, step, _ = move(world, p, dst)
        assert step == "done"
        assert sharded.names[dst].sql("SELECT count(*) FROM billing.usage_events WHERE tenant_id = %s",
                                      (bulk,))[0][0] == 100000
        assert sharded.names[src].sql("SELECT count(*) FROM billing.usage_events WHERE tenant_id = %s",
                                      (bulk,))[0][0] == 0
        check_audit(world, move_id)

        # 3. undone before the switch: the partition stays, nothing is left on the target
        p = parts[2]
        t = next(x for x in tenants if partition_of(world, x) == p)
        src = router_call(world, "SELECT router.partition_shard(%s)", (p,))[0][0]
        dst = next(n for n in ("s0", "s1", "s2", "s3") if n != src)
        before = sharded.names[src].sql("SELECT billing_shard.move_digest(%s)", ([t],))[0][0]
        move_id, step, _ = move(world, p, dst, move_stop_after="copied")
        assert step == "copied"
        assert sharded.names[dst].sql("SELECT count(*) FROM billing.tenants WHERE tenant_id = %s", (t,))[0][0] == 1
        router_call(world, "CALL router.undo_partition_move(%s)", (move_id,))
        assert router_call(world, "SELECT router.partition_shard(%s)", (p,))[0][0] == src
        assert sharded.names[dst].sql("SELECT count(*) FROM billing.tenants WHERE tenant_id = %s", (t,))[0][0] == 0
        assert sharded.names[dst].sql("SELECT count(*) FROM billing.usage_events WHERE tenant_id = %s", (t,))[0][0] == 0
        assert p not in [r[0] for r in sharded.names[dst].sql("SELECT partition FROM billing.partition_fences")]
        # the source writes again, its rows as they were plus what came since
        time.sleep(0.5)
        after = sharded.names[src].sql("SELECT billing_shard.move_digest(%s)", ([t],))[0][0]
        assert after["tenants"] == before["tenants"]
        with pytest.raises(psycopg.Error) as e:
            router_call(world, "CALL router.undo_partition_move(%s)", (move_id - 1,))
        assert e.value.sqlstate == "55000"    # that one had switched already
        # 4. the router's login cannot write rows outside a move: no fence, no import, no delete
        some = tenants[0]
        shard = sharded.names[sharded.shard_name_of(some)]
        other = next(c for n, c in sharded.names.items() if c is not shard)
        rows = shard.sql("SELECT billing_shard.move_export(%s, 'tenants', NULL, NULL, NULL)", ([some],))[0][0]
        for c, call, args in ((other, "billing_shard.move_import('tenants', %s, false)", (rows,)),
                              (shard, "billing_shard.move_clear(%s, true)", ([some],))):
            with pytest.raises(psycopg.Error) as e:
                with psycopg.connect(c.dsn(user="qes_router"), autocommit=True) as conn:
                    conn.execute("SELECT " + call, args)
            assert e.value.sqlstate == "55000" and "not in a partition fenced here" in e.value.diag.message_primary
        # every fence, set and lifted, is in the audit chain: the first move's
        # source was copying, moving, moved; its target moving (in), lifted
        move_id, src, dst = first
        fences = {name: {r[0] for r in sharded.names[name].sql(
            "SELECT details ->> 'state' FROM billing.audit_log WHERE action = 'partition.fence' "
            "AND (details ->> 'move_id')::bigint = %s", (move_id,))} for name in (src, dst)}
        assert fences == {src: {"copying", "moving", "moved"}, dst: {"moving", "lifted"}}, fences
    finally:
        platform.finish()
    check_exactly_once(world, platform)


def test_four_shards_become_eight_under_load(world):
    sharded, tenants = world["sharded"], world["tenants"]
    for i in range(4, 8):
        sharded.add_shard(f"s{i}")
    platform, hooks = Platform(world, tenants), Webhooks(world)
    platform.start()
    hooks.start()
    moved = []
    try:
        # each new shard takes two partitions from the shards that hold the most
        for new in ("s4", "s5", "s6", "s7"):
            for _ in range(PARTITIONS // 8):
                held = {}
                for p, shard in router_call(world, "SELECT partition, shard_name FROM router.partition_map ORDER BY 1"):
                    held.setdefault(shard, []).append(p)
                donor = max((s for s in held if s not in ("s4", "s5", "s6", "s7")), key=lambda s: len(held[s]))
                moved.append((held[donor][-1], move(world, held[donor][-1], new)))
    finally:
        platform.finish()
        hooks.finish()
    settle(world)
    counts = dict(router_call(world, "SELECT shard_name, count(*) FROM router.partition_map GROUP BY 1"))
    assert len(counts) == 8 and all(n == PARTITIONS // 8 for n in counts.values()), counts
    pauses = sorted(m[1][2] for m in moved)
    print(f"4 -> 8 shards: {len(moved)} moves under load, pause p50 {statistics.median(pauses)} ms, "
          f"max {pauses[-1]} ms; writes refused then retried: p50 "
          f"{statistics.median([s for _, s in platform.pauses]) * 1000 if platform.pauses else 0:.0f} ms, "
          f"max {max([s for _, s in platform.pauses], default=0) * 1000:.0f} ms over {len(platform.pauses)} writes")
    assert all(m[1][1] == "done" for m in moved)
    check_exactly_once(world, platform)
    for p, (move_id, _, _) in moved[:3]:
        check_audit(world, move_id)
