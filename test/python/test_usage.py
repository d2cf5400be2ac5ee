"""Usage through PostgREST (GET /usage) and the bounded counter cache.

The module runs at a fixed date through the billing clock (AT, the 1st of a
month in the evening): a Free tenant's period is that calendar month, and no
test depends on the day it runs."""
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from conftest import ADMIN, amcheck_and_stop, tenant_claims
from pgcluster import Cluster
from postgrest import PostgREST


AT = datetime(2027, 11, 1, 21, 30, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def usage_tenants(pg):
    pg.set_clock(AT)
    for t in ("use_a", "use_b"):
        pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (t, t.upper(), f"{t}@t.example"))
    for i in range(12):
        pg.sql("SELECT billing.record_usage('use_a', 'signatures', 1, %s)", (f"a-sig-{i}",))
    pg.sql("SELECT billing.record_usage('use_b', 'documents', 7, 'b-doc-1')")
    pg.sql("SELECT billing.record_usage('use_b', 'storage', 123456, 'b-st-1')")
    yield
    pg.reset_clock()


def current(rows):
    return {r["metric"]: r for r in rows if r["is_current"]}


def test_usage_for_tenant(api, usage_tenants):
    r = api.get("/usage", claims=tenant_claims("use_a"))
    assert r.status == 200
    cur = current(r.body)
    assert set(cur) == {"signatures", "documents", "api_calls", "storage"}
    sig = cur["signatures"]
    assert (sig["used"], sig["usage_limit"], sig["status"]) == (12, 10, "over_soft_limit")
    assert float(sig["percent"]) == 120.0
    assert cur["documents"]["used"] == 0
    # Free: the calendar month (UTC) of the billing clock's date
    assert {(datetime.fromisoformat(c["period_start"]), datetime.fromisoformat(c["period_end"]))
            for c in cur.values()} == {(datetime(2027, 11, 1, tzinfo=timezone.utc),
                                        datetime(2027, 12, 1, tzinfo=timezone.utc))}


def test_usage_isolated_between_tenants(api, usage_tenants):
    cur = current(api.get("/usage", claims=tenant_claims("use_b")).body)
    assert cur["signatures"]["used"] == 0
    assert cur["documents"]["used"] == 7
    assert cur["storage"]["used"] == 123456


def test_usage_filters(api, usage_tenants):
    r = api.get("/usage", claims=tenant_claims("use_a"), params={"metric": "eq.signatures"})
    assert r.status == 200 and [x["used"] for x in r.body] == [12]


def test_usage_refuses_anonymous(api, usage_tenants):
    r = api.get("/usage")
    assert r.status == 401


def test_usage_unknown_tenant_is_empty(api, usage_tenants):
    r = api.get("/usage", claims=tenant_claims("nobody"))
    assert (r.status, r.body) == (200, [])


def test_usage_is_for_tenants_only(api, usage_tenants):
    # operators read usage with billing.usage_report(tenant_id), not /usage
    r = api.get("/usage", claims=ADMIN)
    assert r.status == 403 and r.body["code"] == "42501"


def test_tenant_cannot_record_usage(api, usage_tenants):
    # record_usage is not in the api schema, and not executable by tenants
    assert api.post("/rpc/record_usage", claims=tenant_claims("use_a"),
                    body={"tenant_id": "use_a", "metric": "signatures"}).status == 404


@pytest.fixture(scope="module")
def small_cache():
    cluster = Cluster("smallcache", conf={"qes_billing.max_counters": "16"}).start()
    cluster.set_clock(AT)       # one period for all the usage below
    yield cluster
    amcheck_and_stop(cluster)


def test_full_counter_table_stays_correct(small_cache):
    """With room for 16 counters, 40 tenants x 2 metrics still add up exactly."""
    pg = small_cache
    tenants = [f"full{i}" for i in range(40)]
    with pg.connect(autocommit=True) as c:
        for t in tenants:
            c.execute("SELECT billing.upsert_tenant(%s, %s, %s)", (t, t, f"{t}@t.example"))
        for round_ in range(3):
            for n, t in enumerate(tenants):
                c.execute("SELECT billing.record_usage(%s, 'api_calls', %s, %s)", (t, n + 1, f"{t}-{round_}"))
                c.execute("SELECT billing.record_usage(%s, 'documents', 1, %s)", (t, f"{t}-d-{round_}"))
        for n, t in enumerate(tenants):
            got = c.execute("SELECT (billing.check_limit(%s, 'api_calls', 0)).current, "
                            "(billing.check_limit(%s, 'documents', 0)).current", (t, t)).fetchone()
            assert got == (3 * (n + 1), 3), t
        capacity, entries, evicted = c.execute(
            "SELECT capacity, entries, evicted FROM billing.usage_cache_stats()").fetchone()
        # totals equal the table for every tenant and metric, after all that eviction
        off = c.execute(
            "SELECT count(*) FROM (SELECT u.tenant_id, u.metric, sum(u.quantity) AS s FROM billing.usage_events u"
            " WHERE u.tenant_id LIKE 'full%%' GROUP BY 1, 2) t"
            " WHERE (billing.check_limit(t.tenant_id, t.metric, 0)).current <> t.s").fetchone()[0]
    assert capacity == 16
    assert entries <= 16
    assert evicted > 0           # the least recently used made room
    assert off == 0


def test_busiest_tenant_stays_cached(small_cache):
    """LRU eviction: a tenant used in every transaction keeps its counter while
    60 others pass through a table of 16; its answers need no rebuild."""
    pg = small_cache
    with pg.connect(autocommit=True) as c:
        c.execute("SELECT billing.upsert_tenant('busy', 'Busy', 'busy@t.example')")
        for i in range(60):
            c.execute("SELECT billing.upsert_tenant(%s, 'Other', 'o@t.example')", (f"other{i}",))
        c.execute("SELECT billing.record_usage('busy', 'api_calls', 1, 'busy-0')")
        loads_before = c.execute("SELECT loads FROM billing.usage_cache_stats()").fetchone()[0]
        for i in range(60):
            c.execute("SELECT billing.record_usage(%s, 'api_calls', 1, %s)", (f"other{i}", f"o-{i}"))
            c.execute("SELECT billing.record_usage('busy', 'api_calls', 1, %s)", (f"busy-{i + 1}",))
        loads, evicted = c.execute("SELECT loads, evicted FROM billing.usage_cache_stats()").fetchone()
        busy = c.execute("SELECT (billing.check_limit('busy', 'api_calls', 0)).current").fetchone()[0]
    assert busy == 61
    assert evicted > 0
    # 60 other tenants were built once each; busy never again
    assert loads - loads_before <= 60, (loads_before, loads)


def test_build_between_commit_and_delta_counts_once(small_cache):
    """The race a build must survive: a transaction's usage is visible in the
    table but its delta not yet applied (counter_commit_delay holds it for a
    second) when another session builds the counter from the table.  The
    delta, applied afterwards, must not be added again: the build's snapshot
    is kept until the committer's window closes (counters.c, "young")."""
    pg = small_cache
    pg.sql("SELECT billing.upsert_tenant('race', 'Race', 'race@t.example')")
    with pg.connect(autocommit=True) as a, pg.connect(autocommit=True) as b:
        a.execute("SET qes_billing.debug_fault = 'counter_commit_delay'")
        a.execute("BEGIN")
        a.execute("SELECT billing.record_usage('race', 'api_calls', 5, 'race-1')")
        # forget every counter (a fresh process may sweep): the next read builds
        with pg.connect(autocommit=True) as c:
            c.execute("SELECT billing.usage_cache_sweep('infinity')")
        done = threading.Event()

        def commit():
            a.execute("COMMIT")
            done.set()

        t = threading.Thread(target=commit)
        t.start()
        try:
            # wait until a's row is visible while its delta is still held back
            deadline = time.time() + 5
            while time.time() < deadline and not b.execute(
                    "SELECT count(*) FROM billing.usage_events WHERE idempotency_key = 'race-1'").fetchone()[0]:
                time.sleep(0.02)
            loads = b.execute("SELECT loads FROM billing.usage_cache_stats()").fetchone()[0]
            during = b.execute("SELECT (billing.check_limit('race', 'api_calls', 0)).current").fetchone()[0]
            built = b.execute("SELECT loads FROM billing.usage_cache_stats()").fetchone()[0] - loads
            assert not done.is_set(), "the commit finished before the build: the race was not reproduced"
        finally:
            t.join()
        after = b.execute("SELECT (billing.check_limit('race', 'api_calls', 0)).current").fetchone()[0]
        table = b.execute("SELECT sum(quantity) FROM billing.usage_events WHERE tenant_id = 'race'").fetchone()[0]
    assert built == 1           # the counter was built while the delta was held back
    assert (during, after, table) == (5, 5, 5)


@pytest.fixture(scope="module")
def partitioned_cache():
    # 2,000 counters: 31 partitions of 65, each evicting on its own
    cluster = Cluster("partcache", conf={"qes_billing.max_counters": "2000"}).start()
    cluster.set_clock(AT)
    yield cluster
    amcheck_and_stop(cluster)


def test_partitioned_counters_exact_under_churn(partitioned_cache):
    """5,000 tenant periods through room for 2,000, from four sessions at
    once, some tenants hot: every total equals the table, the hot tenants
    stay cached."""
    pg = partitioned_cache
    pg.sql("SELECT count(billing.upsert_tenant('p' || i, 'P', 'p@t.example')) FROM generate_series(0, 4999) i")
    errors = []

    def writer(w):
        try:
            with pg.connect(autocommit=True) as c:
                for i in range(w, 5000, 4):
                    c.execute("SELECT billing.record_usage(%s, 'api_calls', %s, %s)", (f"p{i}", i % 7 + 1, f"w-{i}"))
                    # tenants p0..p9 are used by every writer all along
                    c.execute("SELECT billing.record_usage(%s, 'documents', 1, %s)", (f"p{i % 10}", f"d-{i}"))
        except Exception as e:     # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with pg.connect(autocommit=True) as c:
        hits_before = c.execute("SELECT hits FROM billing.usage_cache_stats()").fetchone()[0]
        hot = c.execute("SELECT sum((billing.check_limit('p' || i, 'documents', 0)).current)"
                        " FROM generate_series(0, 9) i").fetchone()[0]
        hits_after = c.execute("SELECT hits FROM billing.usage_cache_stats()").fetchone()[0]
        off = c.execute(
            "SELECT count(*) FROM (SELECT u.tenant_id, u.metric, sum(u.quantity) AS s FROM billing.usage_events u"
            " GROUP BY 1, 2) t WHERE (billing.check_limit(t.tenant_id, t.metric, 0)).current <> t.s").fetchone()[0]
        capacity, entries, evicted, per_counter = c.execute(
            "SELECT capacity, entries, evicted, bytes_per_counter FROM billing.usage_cache_stats()").fetchone()
    assert hot == 5000
    assert hits_after - hits_before == 10     # the hot tenants were still cached
    assert off == 0
    assert 2000 <= capacity < 2000 + 31 and 0 < entries <= capacity
    assert evicted > 3000
    # at this small size the fixed parts (build states, the standby ring) weigh
    assert per_counter <= 256, per_counter


def test_counter_memory_at_scale():
    """Room for a million counters: each costs at most 128 bytes of shared
    memory, everything included (slots, partitions, build states, the ring)."""
    cluster = Cluster("bigcache", conf={"qes_billing.max_counters": "1000000"}).start()
    try:
        capacity, per_counter = cluster.sql(
            "SELECT capacity, bytes_per_counter FROM billing.usage_cache_stats()")[0]
        [(shmem,)] = cluster.sql("SELECT sum(allocated_size) FROM pg_shmem_allocations"
                                 " WHERE name = 'qes_billing counters'")
    finally:
        amcheck_and_stop(cluster)
    assert 1000000 <= capacity < 1000000 + 128
    assert per_counter <= 128, per_counter
    assert shmem <= 128 * capacity, shmem


def test_idempotency_key_is_forever(pg, usage_tenants):
    key = f"forever-{uuid.uuid4()}"
    first = pg.sql("SELECT recorded, total FROM billing.record_usage('use_b', 'api_calls', 2, %s)", (key,))
    [(offset,)] = pg.sql("SELECT offset_by FROM billing.clock")
    pg.set_clock(AT + timedelta(days=400))
    try:
        again = pg.sql("SELECT recorded, duplicate, total FROM billing.record_usage('use_b', 'api_calls', 2, %s)", (key,))
    finally:
        pg.sql("SELECT billing.set_clock(%s)", (offset,))
    assert first[0][0] is True
    assert again[0] == (False, True, first[0][1])
