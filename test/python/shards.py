"""A sharded qes_billing on this machine, for the router's tests and bench.

One router cluster (PL/Proxy, qes_billing_router, qes_billing's library
preloaded for the rate limiter and the signature verifier, no billing
data), N shard clusters (each a complete qes_billing with its worker and
qes_billing_shard), and one PgBouncer in transaction mode between the
router and the shards (docs/scaleout.md).  Every cluster is a pgcluster
Cluster, so a test ends each with conftest.amcheck_and_stop.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time

import psycopg

from pgcluster import Cluster, _free_port

PARTITIONS = 64


class RouterCluster(Cluster):
    """A cluster whose database holds qes_billing_router instead of
    qes_billing (the library is preloaded all the same)."""

    def start(self):
        self._run("initdb", "-D", self.datadir, "-A", "trust", "-U", "postgres", "--no-sync")
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.dir}'",
            "shared_preload_libraries": "'qes_billing'",
            # the worker finds no qes_billing here and sleeps
            "qes_billing.database": f"'{self.database}'",
            "fsync": "off",
            "max_connections": "200",
        }
        settings.update(self.conf)
        self.append_conf(settings)
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "start")
        with self.connect("postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.database}"')
        with self.connect(autocommit=True) as c:
            c.execute("CREATE EXTENSION plproxy")
            c.execute("CREATE EXTENSION qes_billing_router")
            c.execute("CREATE ROLE authenticator LOGIN NOINHERIT")
            c.execute("GRANT qes_anon, qes_tenant, qes_admin, qes_app TO authenticator")
        return self

    def amcheck(self, dbname=None):
        """The router's own indexes (schema router): its map and customer
        directory."""
        failures, checked = [], 0
        with self.connect(dbname, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
            rows = c.execute(
                "SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " JOIN pg_am am ON am.oid = c.relam"
                " WHERE c.relnamespace = 'router'::regnamespace AND am.amname = 'btree' ORDER BY 1").fetchall()
            for (index,) in rows:
                try:
                    c.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
                except psycopg.Error as e:
                    failures.append(f"{index}: {e.sqlstate}: {e}")
                checked += 1
        return checked, failures, []


class PgBouncer:
    """PgBouncer in transaction mode with one database per shard."""

    def __init__(self, shards, pool_size=20):
        self.dir = tempfile.mkdtemp(prefix="qes-pgbouncer-")
        self.port = _free_port()
        self.shards = shards
        self.as_root = os.geteuid() == 0
        dbs = "".join(f"{name} = host=127.0.0.1 port={c.port} dbname={c.database}\n" for name, c in shards)
        with open(os.path.join(self.dir, "users.txt"), "w") as f:
            f.write('"qes_router" ""\n"postgres" ""\n"authenticator" ""\n"app" ""\n')
        with open(os.path.join(self.dir, "pgbouncer.ini"), "w") as f:
            f.write(f"""[databases]
{dbs}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/users.txt
pool_mode = transaction
max_client_conn = 1000
default_pool_size = {pool_size}
server_login_retry = 1
server_connect_timeout = 2
query_wait_timeout = 3
ignore_startup_parameters = extra_float_digits,options
logfile = {self.dir}/pgbouncer.log
pidfile = {self.dir}/pgbouncer.pid
""")
        if self.as_root:
            shutil.chown(self.dir, user="postgres")
            for n in os.listdir(self.dir):
                shutil.chown(os.path.join(self.dir, n), user="postgres")

    def start(self):
        cmd = ["pgbouncer", "-d", os.path.join(self.dir, "pgbouncer.ini")]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("pgbouncer did not start: " + self.log())

    def log(self):
        try:
            with open(os.path.join(self.dir, "pgbouncer.log")) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        try:
            with open(os.path.join(self.dir, "pgbouncer.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, 15)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class Sharded:
    """Router + N shards + PgBouncer.  shard_conf: settings for every
    shard (e.g. the Stripe API base); the router gets router_conf."""

    def __init__(self, n_shards=4, env=None, shard_conf=None, router_conf=None, partitions=PARTITIONS,
                 bouncer=True):
        self.n = n_shards
        self.env = env or {}
        self.shard_conf = shard_conf or {}
        self.router_conf = router_conf or {}
        self.partitions = partitions
        self.use_bouncer = bouncer
        self.shards = []
        self.names = {}             # shard name -> cluster
        self.router = None
        self.bouncer = None

    def start(self):
        try:
            return self._start()
        except BaseException:
            from conftest import amcheck_and_stop
            try:
                self.stop(amcheck_and_stop)
            except BaseException as e:      # the failure to start is the one to show
                print(f"stopping after a failed start: {e}")
            raise

    def _start(self):
        for i in range(self.n):
            c = Cluster(f"shard{i}", env=self.env, conf=dict(self.shard_conf)).start()
            self.shards.append(c)
            with c.connect(autocommit=True) as conn:
                conn.execute("CREATE EXTENSION qes_billing_shard")
                conn.execute("ALTER ROLE qes_router LOGIN")
        names = [(f"s{i}", c) for i, c in enumerate(self.shards)]
        self.names = dict(names)
        if self.use_bouncer:
            self.bouncer = PgBouncer(names).start()
        self.router = RouterCluster("router", env=self.env, conf=dict(self.router_conf), database="router").start()
        with self.router.connect(autocommit=True) as conn:
            conn.execute("CREATE USER MAPPING FOR PUBLIC SERVER qes_billing OPTIONS (user 'qes_router')")
            for name, c in names:
                conn.execute("SELECT router.add_shard(%s, %s, %s)", (name, self.connstr(name, c), name))
            conn.execute("SELECT router.set_partitions(%s)", (self.partitions,))
        return self

    def add_shard(self, name):
        """A new shard cluster registered with the router under `name`
        (connected directly, not through PgBouncer), holding no partition
        yet (docs/scaleout.md, "Adding a shard")."""
        c = Cluster(f"shard{len(self.shards)}", env=self.env, conf=dict(self.shard_conf)).start()
        self.shards.append(c)
        self.names[name] = c
        with c.connect(autocommit=True) as conn:
            conn.execute("CREATE EXTENSION qes_billing_shard")
            conn.execute("ALTER ROLE qes_router LOGIN")
        with self.router.connect(autocommit=True) as conn:
            conn.execute("SELECT router.add_shard(%s, %s, NULL)",
                         (name, f"host=127.0.0.1 port={c.port} dbname={c.database} connect_timeout=2"))
        return c

    def connstr(self, name, cluster):
        if self.use_bouncer:
            return f"host=127.0.0.1 port={self.bouncer.port} dbname={name} connect_timeout=2"
        return f"host=127.0.0.1 port={cluster.port} dbname={cluster.database} connect_timeout=2"

    def shard_of(self, tenant_id):
        """The shard cluster that owns a tenant, as the router places it."""
        return self.names[self.shard_name_of(tenant_id)]

    def shard_name_of(self, tenant_id):
        return self.router.sql("SELECT shard_name FROM router.tenant_shard(%s)", (tenant_id,))[0][0]

    def tenants_per_shard(self, prefix, count):
        """`count` tenant ids per shard: tenant ids that place on each."""
        found = {f"s{i}": [] for i in range(self.n)}
        k = 0
        while any(len(v) < count for v in found.values()):
            t = f"{prefix}{k}"
            k += 1
            s = self.shard_name_of(t)
            if len(found[s]) < count:
                found[s].append(t)
        return found

    def wait_workers(self):
        for c in self.shards:
            assert c.wait_until("SELECT alive FROM billing.worker_status"), c.log()

    def stop(self, check):
        """Stop everything; `check` (conftest.amcheck_and_stop) ends each
        cluster, so every billing index is checked first."""
        errors = []
        for c in [self.router, *self.shards]:
            if c is None:
                continue
            try:
                check(c)
            except AssertionError as e:
                errors.append(str(e))
        if self.bouncer:
            self.bouncer.stop()
        assert not errors, "; ".join(errors)
