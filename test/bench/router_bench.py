#!/usr/bin/env python3
"""make bench, part router (docs/scaleout.md, "Capacity"): the cost of going
through the router (PL/Proxy, PgBouncer in transaction mode) beside the same
call made directly on the shard, routed throughput with 1, 2 and 4 shards on
this machine, the webhook path through the router, and the pause of
the partition moves (docs/scaleout.md, "Moving a partition").

Each line is a ratio beside its ceiling, with the microseconds per call
(clients / tps).  pgbench runs BENCH_ROUNDS alternating rounds of
BENCH_SECONDS per figure, CLIENTS clients.
"""
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from conftest import TEST_KEYS, amcheck_and_stop  # noqa: E402
from fake_stripe import signed  # noqa: E402
import psycopg  # noqa: E402
from postgrest import PostgREST  # noqa: E402
from shards import Sharded  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "8"))
TENANTS = 100
CONF = {"qes_billing.reconcile_interval": "0", "qes_billing.rate_limit_tenant": "0",
        "qes_billing.rate_limit_address": "0", "synchronous_commit": "on"}


def pgbench(cluster, script, seconds=SECONDS, clients=CLIENTS):
    path = os.path.join(cluster.dir, "bench.sql")
    with open(path, "w") as f:
        f.write(script)
    os.chmod(cluster.dir, 0o755)
    os.chmod(path, 0o644)
    cmd = [os.path.join(cluster.bindir, "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
           "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", path, "-M", "prepared", cluster.database]
    out = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    if not m:
        raise RuntimeError(out.stdout + out.stderr)
    return float(m.group(1))


def pair(name, measure, ceiling, ceiling_name):
    """Alternating rounds of the measurement and its ceiling; the mean of each."""
    a, b, ratios = [], [], []
    for _ in range(ROUNDS):
        x, y = measure(), ceiling()
        a.append(x)
        b.append(y)
        ratios.append(x / y)
    ta, tb = sum(a) / len(a), sum(b) / len(b)
    print(f"{name} tps={ta:.0f} us_per_call={1e6 * CLIENTS / ta:.0f} ceiling={ceiling_name} ceiling_tps={tb:.0f} "
          f"ceiling_us_per_call={1e6 * CLIENTS / tb:.0f} ratio={ta / tb:.2f} "
          f"spread={min(ratios):.2f}..{max(ratios):.2f} ({ROUNDS} rounds)", flush=True)
    return ta, tb


def register(sharded, n=TENANTS):
    with sharded.router.connect(autocommit=True) as c:
        for i in range(n):
            c.execute("SELECT router.upsert_tenant(%s, %s, %s)", (f"t{i}", f"Tenant {i}", f"b@t{i}.example"))


def routed_vs_direct():
    s = Sharded(1, env=TEST_KEYS, shard_conf=CONF, router_conf=CONF).start()
    try:
        register(s)
        shard = s.shards[0]
        tenant = "\\set t random(0, %d)\n" % (TENANTS - 1)
        pair("router_check_limit",
             lambda: pgbench(s.router, tenant + "SELECT * FROM router.check_limit('t' || :t, 'signatures', 1);\n"),
             lambda: pgbench(shard, tenant + "SELECT * FROM billing.check_limit('t' || :t, 'signatures', 1);\n"),
             "check_limit_on_the_shard")
        pair("router_record_usage",
             lambda: pgbench(s.router, tenant + "SELECT * FROM router.record_usage('t' || :t, 'api_calls', 1, "
                                                "gen_random_uuid()::text);\n"),
             lambda: pgbench(shard, tenant + "SELECT * FROM billing.record_usage('t' || :t, 'api_calls', 1, "
                                             "gen_random_uuid()::text);\n"),
             "record_usage_on_the_shard")
        webhooks(s)
    finally:
        s.stop(amcheck_and_stop)


def webhooks(s, n=1000):
    """The webhook path: signed deliveries of distinct events for known
    tenants through the router's api.stripe_webhook (verify, route, the
    shard's intake) beside the same deliveries to the shard's own."""
    secret = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]

    def deliveries(prefix):
        out = []
        for i in range(n):
            ev = {"id": f"evt_{prefix}{i:08d}", "object": "event", "api_version": "2024-06-20",
                  "created": int(time.time()), "livemode": False, "type": "customer.updated",
                  "data": {"object": {"id": f"cus_bench{i % TENANTS:06d}", "object": "customer",
                                      "metadata": {"tenant_id": f"t{i % TENANTS}"}, "created": int(time.time()),
                                      "livemode": False, "email": "b@x.example", "pad": "x" * 2500}}}
            out.append(signed(ev, secret))
        return out

    def run(cluster, prefix):
        api = PostgREST(cluster.dsn(user="authenticator"))
        batch = deliveries(prefix)
        t0 = time.perf_counter()
        for body, header in batch:
            r = api.post("/rpc/stripe_webhook", body=body,
                         headers={"Content-Type": "application/json", "Stripe-Signature": header})
            assert r.status == 200, r.body
        dt = time.perf_counter() - t0
        api.close()
        return n / dt

    a, b = [], []
    for r in range(ROUNDS):
        a.append(run(s.router, f"r{r}x"))
        b.append(run(s.shards[0], f"d{r}x"))
    ta, tb = sum(a) / len(a), sum(b) / len(b)
    print(f"router_webhook deliveries_per_s={ta:.0f} us_per_delivery={1e6 / ta:.0f} ceiling=webhook_on_the_shard "
          f"ceiling_per_s={tb:.0f} ceiling_us_per_delivery={1e6 / tb:.0f} ratio={ta / tb:.2f} "
          f"(one client, {n} signed ~3 KB events per round, {ROUNDS} rounds)", flush=True)


def scaling():
    """Routed check_limit + record_usage with 1, 2 and 4 shards, all on this
    machine: the router and the shards share its two cores."""
    base = None
    for n in (1, 2, 4):
        s = Sharded(n, env=TEST_KEYS, shard_conf=CONF, router_conf=CONF).start()
        try:
            register(s)
            script = ("\\set t random(0, %d)\n" % (TENANTS - 1) +
                      "SELECT * FROM router.check_limit('t' || :t, 'signatures', 1);\n"
                      "SELECT * FROM router.record_usage('t' || :t, 'api_calls', 1, gen_random_uuid()::text);\n")
            tps = sum(pgbench(s.router, script) for _ in range(ROUNDS)) / ROUNDS
            base = base or tps
            print(f"router_shards_{n} tps={tps:.0f} ceiling=router_shards_1 ceiling_tps={base:.0f} ratio={tps / base:.2f} "
                  f"(check_limit + record_usage per transaction through the router, {CLIENTS} clients; "
                  f"router, PgBouncer and {n} shard cluster(s) on {os.cpu_count()} cores)", flush=True)
        finally:
            s.stop(amcheck_and_stop)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def moves(n_moves=8, history=2000):
    """Partitions moved from two shards to a third while CLIENTS clients
    record usage for 100 tenants (each with `history` usage rows), each write
    its own transaction on the tenant's shard, retried (looked up again)
    when refused by a fence.  The pause of each move (fence to switch, as
    router.partition_move_pauses has it), the stall of the writes that met
    a fence, beside the latency of the writes that did not."""
    s = Sharded(2, env=TEST_KEYS, shard_conf=CONF, router_conf=CONF, partitions=16).start()
    try:
        s.add_shard("s2")
        register(s)
        for name, c in s.names.items():
            if name != "s2":
                c.sql("INSERT INTO billing.usage_events (tenant_id, idempotency_key, metric, quantity, period_start, "
                      "occurred_at) SELECT t.tenant_id, 'old-' || i, 'documents', 1, "
                      "date_trunc('month', billing.now()) - interval '1 month', "
                      "date_trunc('month', billing.now()) - interval '1 month' "
                      "FROM billing.tenants t, generate_series(1, %s) i", (history,))
        where, lock = {}, threading.Lock()
        normal, stalls, refused_tenants, stop = [], [], set(), threading.Event()

        def dsn(t, fresh=False):
            if fresh or t not in where:
                row = s.router.sql("SELECT connstr, pool_name FROM router.tenant_shard(%s)", (t,))[0]
                where[t] = (f"host=127.0.0.1 port={s.bouncer.port} dbname={row[1]} user=postgres" if row[1]
                            else row[0] + " user=postgres")
            return where[t]

        def client(seed):
            rnd, conns = random.Random(seed), {}
            while not stop.is_set():
                t = f"t{rnd.randrange(TENANTS)}"
                start, refused, fresh = time.monotonic(), False, False
                while True:
                    d = dsn(t, fresh)
                    try:
                        if d not in conns:
                            conns[d] = psycopg.connect(d, autocommit=True, prepare_threshold=None)
                        conns[d].execute("SELECT billing.record_usage(%s, 'signatures', 1, gen_random_uuid()::text)",
                                         (t,))
                        break
                    except psycopg.Error as e:
                        if e.sqlstate not in ("QBMOV", "QBMVD"):
                            raise
                        refused, fresh = True, True
                        time.sleep(0.005)
                ms = (time.monotonic() - start) * 1000
                with lock:
                    (stalls if refused else normal).append(ms)
                    if refused:
                        refused_tenants.add(t)
            for c in conns.values():
                c.close()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for th in threads:
            th.start()
        time.sleep(2)
        parts = [p for (p,) in s.router.sql("SELECT partition FROM router.partition_map ORDER BY partition")][:n_moves]
        moved_tenants = set()
        with s.router.connect(autocommit=True) as c:
            for p in parts:
                moved_tenants |= {f"t{i}" for i in range(TENANTS)
                                  if s.router.sql("SELECT router.tenant_partition(%s)", (f"t{i}",))[0][0] == p}
                c.execute("CALL router.move_partition_online(%s, 's2')", (p,))
                time.sleep(0.5)
        stop.set()
        for th in threads:
            th.join()
        pauses = [float(x) for (x,) in s.router.sql("SELECT pause_ms FROM router.partition_move_pauses")]
        print(f"router_move_pause moves={len(pauses)} pause_p50_ms={pct(pauses, 0.5):.0f} "
              f"pause_p99_ms={pct(pauses, 0.99):.0f} stalled_writes={len(stalls)} "
              f"stall_p50_ms={pct(stalls, 0.5):.0f} stall_p99_ms={pct(stalls, 0.99):.0f} "
              f"ceiling=write_latency_without_fence ceiling_p50_ms={pct(normal, 0.5):.1f} "
              f"ceiling_p99_ms={pct(normal, 0.99):.1f} writes={len(normal) + len(stalls)} "
              f"refused_outside_moved_partitions={len(refused_tenants - moved_tenants)} "
              f"({n_moves} of 16 partitions from 2 shards to a third, {TENANTS} tenants with {history} usage rows "
              f"each, {CLIENTS} clients writing throughout)", flush=True)
    finally:
        s.stop(amcheck_and_stop)


if __name__ == "__main__":
    print(f"router benchmark: {CLIENTS} clients, {ROUNDS} x {SECONDS}s per figure, {os.cpu_count()} cores", flush=True)
    routed_vs_direct()
    scaling()
    moves()
