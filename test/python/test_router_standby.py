"""Read-only calls routed to shards' hot standbys (docs/scaleout.md,
"Reading from standbys"): with qes_billing_router.read_from_standbys on,
check_limit and GET /usage, /subscription, /invoices and /plans are
answered by the shard's hot standby (the standby's replay is paused, so its
answers are told from the shard's: they are what it had replayed), writes
still go to the shard, a shard without a standby answers itself, and a
standby that does not answer leaves the read to its shard.  With the
setting off (the default) nothing reads from a standby.  At a fixed date
through the billing clock."""
import json
from datetime import datetime, timezone

import pytest

from conftest import amcheck_and_stop
from pgcluster import StandbyCluster
from shards import Sharded

AT = datetime(2027, 11, 1, 21, 30, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def world():
    sh = Sharded(n_shards=2, bouncer=False).start()
    standby = None
    try:
        for c in sh.shards:
            c.sql("CREATE EXTENSION IF NOT EXISTS amcheck")
            c.set_clock(AT)
        standby = StandbyCluster("shard0-standby", sh.shards[0]).start()
        with sh.router.connect(autocommit=True) as c:
            c.execute("CREATE USER MAPPING FOR PUBLIC SERVER qes_billing_standby OPTIONS (user 'qes_router')")
            c.execute("SELECT router.set_standby('s0', %s)",
                      (f"host=127.0.0.1 port={standby.port} dbname={standby.database} connect_timeout=2",))
        yield sh, standby
    finally:
        try:
            if standby is not None:
                amcheck_and_stop(standby)
        finally:
            sh.stop(amcheck_and_stop)


def router_call(sh, query, params=(), standbys=False):
    with sh.router.connect(autocommit=True) as c:
        if standbys:
            c.execute("SET qes_billing_router.read_from_standbys = on")
        return c.execute(query, params).fetchall()


def get(sh, path, tenant, standbys=False):
    """What PostgREST does for GET /<path> (a read-only transaction, the
    request's settings, the JWT's role)."""
    with sh.router.connect() as c:
        if standbys:
            c.execute("SET qes_billing_router.read_from_standbys = on")
        c.execute("COMMIT")
        c.execute("BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY")
        c.execute("SELECT set_config('request.jwt.claims', %s, true), set_config('request.method', 'GET', true),"
                  " set_config('request.path', %s, true)",
                  (json.dumps({"role": "qes_tenant", "tenant_id": tenant}), "/" + path))
        c.execute("SET LOCAL ROLE qes_tenant")
        rows = c.execute(f"SELECT to_json(v) FROM api.{path} v").fetchall()
        c.execute("ROLLBACK")
    return [r[0] for r in rows]


def api_used(rows, metric="api_calls"):
    return [r["used"] for r in rows if r["metric"] == metric and r["is_current"]][0]


def test_reads_from_standbys(world):
    sh, standby = world
    placed = sh.tenants_per_shard("rs", 1)
    t0, t1 = placed["s0"][0], placed["s1"][0]
    for t in (t0, t1):
        router_call(sh, "SELECT router.upsert_tenant(%s, %s, %s)", (t, t, f"{t}@t.example"))
        router_call(sh, "SELECT router.record_usage(%s, 'api_calls', 5, %s)", (t, f"{t}-1"))
    standby.catch_up()
    check = "SELECT (router.check_limit(%s, 'api_calls', 0)).current"
    assert router_call(sh, check, (t0,), standbys=True) == [(5,)]

    standby.pause_replay()
    try:
        # while the standby replays nothing: usage, a subscription and an
        # invoice on shard s0, and usage recorded with the setting on
        router_call(sh, "SELECT router.record_usage(%s, 'api_calls', 3, %s)", (t0, f"{t0}-2"), standbys=True)
        sh.shards[0].sql(
            "INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, current_period_start,"
            " current_period_end) VALUES (%s, 'professional', 'month', 'active', %s, %s)",
            (t0, AT.replace(day=1, hour=0, minute=0), datetime(2027, 12, 1, tzinfo=timezone.utc)))
        sh.shards[0].sql(
            "INSERT INTO billing.invoices (tenant_id, stripe_invoice_id, status, currency, stripe_created)"
            " VALUES (%s, 'in_standby_test', 'open', 'eur', %s)", (t0, AT))
        [(on_shard,)] = sh.shards[0].sql("SELECT sum(quantity) FROM billing.usage_events WHERE tenant_id = %s", (t0,))
        assert on_shard == 8            # the write went to the shard, setting on or not

        # setting on: the standby answers, as of what it replayed
        assert router_call(sh, check, (t0,), standbys=True) == [(5,)]
        assert api_used(get(sh, "usage", t0, standbys=True)) == 5
        assert get(sh, "subscription", t0, standbys=True) == []
        assert get(sh, "invoices", t0, standbys=True) == []
        assert {p["plan_id"] for p in get(sh, "plans", t0, standbys=True)} >= {"free", "professional", "enterprise"}
        # a shard without a standby answers itself
        assert router_call(sh, check, (t1,), standbys=True) == [(5,)]

        # setting off: the shard answers
        assert router_call(sh, check, (t0,)) == [(8,)]
        assert api_used(get(sh, "usage", t0)) == 8
        assert [s["plan"] for s in get(sh, "subscription", t0)] == ["professional"]
        assert [i["invoice_id"] for i in get(sh, "invoices", t0)] == ["in_standby_test"]
    finally:
        standby.resume_replay()
    standby.catch_up()
    assert router_call(sh, check, (t0,), standbys=True) == [(8,)]
    assert [s["plan"] for s in get(sh, "subscription", t0, standbys=True)] == ["professional"]

    # the standby down: its reads go to the shard
    standby._run("pg_ctl", "-D", standby.datadir, "-m", "fast", "-w", "stop")
    try:
        router_call(sh, "SELECT router.record_usage(%s, 'api_calls', 1, %s)", (t0, f"{t0}-3"))
        assert router_call(sh, check, (t0,), standbys=True) == [(9,)]
        assert api_used(get(sh, "usage", t0, standbys=True)) == 9
    finally:
        standby._run("pg_ctl", "-D", standby.datadir, "-l", standby.logfile, "-w", "start")
    standby.catch_up()
    assert router_call(sh, check, (t0,), standbys=True) == [(9,)]


def test_set_standby_refuses_a_stranger(world):
    sh, standby = world
    with sh.router.connect(autocommit=True) as c:
        # shard s1's standby cannot be s0's copy
        with pytest.raises(Exception) as e:
            c.execute("SELECT router.set_standby('s1', %s)",
                      (f"host=127.0.0.1 port={standby.port} dbname={standby.database} connect_timeout=2",))
        assert e.value.sqlstate == "22023" and "is shard s0, not a hot standby of s1" in str(e.value)
        # the shard itself is no standby of itself
        with pytest.raises(Exception) as e:
            c.execute("SELECT router.set_standby('s1', %s)",
                      (f"host=127.0.0.1 port={sh.shards[1].port} dbname={sh.shards[1].database} connect_timeout=2",))
        assert e.value.sqlstate == "22023" and "(not in recovery)" in str(e.value)
        for bad in ("host=127.0.0.1 password = x dbname=qes", "postgresql://u:p@127.0.0.1/qes",
                    "service=shard1", "dbname='qes'password=x", "host=127.0.0.1 passfile=/tmp/p dbname=qes"):
            with pytest.raises(Exception) as e:
                c.execute("SELECT router.set_standby('s1', %s)", (bad,))
            assert e.value.sqlstate == "22023", bad
        with pytest.raises(Exception) as e:
            c.execute("SELECT router.set_standby('nope', NULL)")
        assert e.value.sqlstate == "22023"
        # the standby map: s0's partitions at its standby, s1's at s1
        rows = c.execute(
            "SELECT count(*) FILTER (WHERE o.option_value LIKE %s), count(*)"
            "  FROM pg_foreign_server s, pg_options_to_table(s.srvoptions) o"
            " WHERE s.srvname = 'qes_billing_standby' AND o.option_name ~ '^p[0-9]+$'",
            (f"%port={standby.port}%",)).fetchone()
        [(parts_s0,)] = c.execute("SELECT partitions FROM router.shard_partitions WHERE shard_name = 's0'").fetchall()
    assert rows[0] == parts_s0 and rows[1] == sh.partitions
