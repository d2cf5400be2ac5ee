"""A throw-away PostgreSQL cluster with qes_billing preloaded, for pytest.

initdb refuses to run as root, so when the tests run as root the cluster
steps run as the `postgres` OS user (runuser); connections go over TCP on
127.0.0.1 with trust authentication, so the test process itself may be
any user.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time

import psycopg

SEED_VARS = ("STRIPE_TEST_SECRET_KEY", "STRIPE_TEST_PUBLISHABLE_KEY", "STRIPE_TEST_WEBHOOK_SECRET",
             "STRIPE_LIVE_SECRET_KEY", "STRIPE_LIVE_PUBLISHABLE_KEY", "STRIPE_LIVE_WEBHOOK_SECRET",
             "QES_ENVIRONMENT", "QES_BASE_URL")


def _bindir():
    return subprocess.check_output(["pg_config", "--bindir"], text=True).strip()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, name, env=None, conf=None, database="qes"):
        self.name = name
        self.bindir = _bindir()
        self.port = _free_port()
        self.database = database
        self.dir = tempfile.mkdtemp(prefix=f"qes-{name}-")
        self.datadir = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "server.log")
        self.env = {k: v for k, v in os.environ.items() if k not in SEED_VARS}
        self.env.update(env or {})
        self.conf = conf or {}
        self.as_root = os.geteuid() == 0
        self.amchecked = False      # set by conftest.amcheck_and_stop; stop() insists on it
        if self.as_root:
            shutil.chown(self.dir, user="postgres")

    def _run(self, *args, **kw):
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True, **kw)

    def start(self):
        self._run("initdb", "-D", self.datadir, "-A", "trust", "-U", "postgres", "--no-sync")
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.dir}'",
            "shared_preload_libraries": "'qes_billing'",
            "qes_billing.database": f"'{self.database}'",
            "qes_billing.worker_naptime": "'200ms'",
            "fsync": "off",
        }
        settings.update(self.conf)
        self.append_conf(settings)
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "start")
        with self.connect("postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.database}"')
        with self.connect(autocommit=True) as c:
            c.execute("CREATE EXTENSION qes_billing")
            c.execute("CREATE ROLE authenticator LOGIN NOINHERIT")
            c.execute("GRANT qes_anon, qes_tenant, qes_admin, qes_app TO authenticator")
        return self

    def append_conf(self, settings):
        """Add settings (a dict) at the end of postgresql.conf."""
        extra = "".join(f"{k} = {v}\n" for k, v in settings.items())
        conf = os.path.join(self.datadir, "postgresql.conf")
        if self.as_root:   # the file belongs to postgres
            subprocess.run(["runuser", "-u", "postgres", "--", "sh", "-c", f"cat >> '{conf}'"],
                           input=extra, text=True, check=True)
        else:
            with open(conf, "a") as f:
                f.write(extra)

    def dsn(self, dbname=None, user="postgres"):
        return f"host=127.0.0.1 port={self.port} dbname={dbname or self.database} user={user}"

    def connect(self, dbname=None, user="postgres", autocommit=False):
        return psycopg.connect(self.dsn(dbname, user), autocommit=autocommit)

    def sql(self, query, params=None):
        """Run one statement as superuser in its own transaction; return all rows."""
        with self.connect(autocommit=True) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else []

    def set_clock(self, at):
        """Move the billing clock so that billing.now() reads `at` (a
        timezone-aware datetime) now; it runs on from there with the real
        clock.  Every test that reasons about dates sets it: no test depends
        on the day it runs."""
        return self.sql("SELECT billing.set_clock(%s::timestamptz - pg_catalog.now())", (at,))[0][0]

    def reset_clock(self):
        return self.sql("SELECT billing.set_clock('0')")[0][0]

    def wait_until(self, query, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            rows = self.sql(query)
            if rows and rows[0][0]:
                return True
            time.sleep(0.05)
        return False

    def amcheck(self, dbname=None):
        """amcheck every btree index of the schemas billing and api:
        bt_index_check(index, heapallindexed => true).  Returns (checked,
        failures, skipped): failures is a list of "index: error" strings;
        skipped names the indexes that are not valid or not ready (a failed
        or running CREATE INDEX CONCURRENTLY), which amcheck cannot check."""
        failures, skipped, checked = [], [], 0
        with self.connect(dbname, autocommit=True) as c:
            if not c.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                c.execute("CREATE EXTENSION IF NOT EXISTS amcheck")     # a standby has its primary's
            rows = c.execute(
                "SELECT c.oid::regclass::text, i.indisvalid AND i.indisready"
                "  FROM pg_index i"
                "  JOIN pg_class c ON c.oid = i.indexrelid"
                "  JOIN pg_namespace n ON n.oid = c.relnamespace"
                "  JOIN pg_am am ON am.oid = c.relam"
                " WHERE n.nspname IN ('billing', 'api') AND am.amname = 'btree' AND c.relkind = 'i'"
                " ORDER BY 1").fetchall()
            for index, checkable in rows:
                if not checkable:
                    skipped.append(index)
                    continue
                try:
                    c.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
                except psycopg.Error as e:
                    failures.append(f"{index}: {e.sqlstate}: {str(e).strip()}")
                checked += 1
        return checked, failures, skipped

    def log(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def stop(self, amcheck_skipped=None):
        """Stop the cluster and remove it.  Every cluster a test starts ends
        with conftest.amcheck_and_stop, which checks every billing index
        while its rows are still there; a cluster stopped without it fails
        the test (after it is stopped), unless amcheck_skipped says why
        there is nothing to check."""
        try:
            self._run("pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        if not self.amchecked and amcheck_skipped is None:
            raise AssertionError(f"cluster {self.name} was stopped without amcheck: "
                                 "end it with conftest.amcheck_and_stop")


class StandbyCluster(Cluster):
    """A streaming hot standby of `primary` (pg_basebackup -R), with the
    primary's settings and its own port."""

    def __init__(self, name, primary):
        super().__init__(name, env=primary.env, conf=primary.conf, database=primary.database)
        self.primary = primary

    def start(self):
        self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
                  "-D", self.datadir, "-R", "-X", "stream", "-c", "fast")
        self.append_conf({"port": str(self.port), "unix_socket_directories": f"'{self.dir}'", "hot_standby": "on"})
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "start")
        return self

    def pause_replay(self):
        self.sql("SELECT pg_wal_replay_pause()")
        assert self.wait_until("SELECT pg_get_wal_replay_pause_state() = 'paused'"), "replay did not pause"

    def resume_replay(self):
        self.sql("SELECT pg_wal_replay_resume()")

    def catch_up(self, timeout=20.0):
        """Wait until the standby has replayed everything the primary has written."""
        lsn = self.primary.sql("SELECT pg_current_wal_lsn()::text")[0][0]
        assert self.wait_until(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn", timeout), "standby behind"
