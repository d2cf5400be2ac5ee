"""Metrics for Prometheus (docs/operations.md, "Monitoring").

Debian's prometheus-postgres-exporter runs docs/monitoring/qes_billing_queries.yaml
against a cluster with activity (tenants, usage, subscriptions, payments,
webhooks applied, ignored and parked, refusals written and not yet written,
Stripe requests succeeded and failed); every qes_billing series of its
/metrics matches what the views give to the exporter's role at the same
moment, the values match the base tables, no tenant id shows, and `promtool
check metrics` passes.  `promtool test rules` runs the alert rules' unit
tests.  The scrape is timed with 10,000 tenants.

Both binaries come from Debian (test/tools/deps.sh installs them); a missing
one fails the test.
"""
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
import uuid

import pytest
import stripe
import yaml

from conftest import TEST_KEYS, amcheck_and_stop
from fake_stripe import FakeStripe
from pgcluster import Cluster
from postgrest import PostgREST

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MONITORING = os.path.join(REPO, "docs", "monitoring")
QUERIES = os.path.join(MONITORING, "qes_billing_queries.yaml")
ALERTS = os.path.join(MONITORING, "qes_billing_alerts.yml")
ALERTS_TEST = os.path.join(MONITORING, "qes_billing_alerts_test.yml")
SECRET = TEST_KEYS["STRIPE_TEST_WEBHOOK_SECRET"]
EXPORTER_ROLE = "qes_billing_exporter"
TENANT_MARK = "zq7tenant"          # in every tenant id; must never reach /metrics

# The role the README tells operators to create.
ROLE_SQL = f"""
CREATE ROLE {EXPORTER_ROLE} LOGIN;
GRANT pg_monitor, qes_monitor TO {EXPORTER_ROLE};
ALTER ROLE {EXPORTER_ROLE} SET default_transaction_read_only = on;
ALTER ROLE {EXPORTER_ROLE} SET jit = off;
ALTER ROLE {EXPORTER_ROLE} SET statement_timeout = '10s';
"""


def binary(name):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: run test/tools/deps.sh "
                    "(Debian packages prometheus-postgres-exporter and prometheus)")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Exporter:
    """prometheus-postgres-exporter run directly (not as a service) on a free
    loopback port with our queries file."""

    def __init__(self, dsn, *flags, queries=QUERIES):
        self.port = free_port()
        self.logfile = tempfile.NamedTemporaryFile(prefix="qes-exporter-", suffix=".log", delete=False)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DATA_SOURCE_NAME": dsn}
        self.proc = subprocess.Popen(
            [binary("prometheus-postgres-exporter"), f"--web.listen-address=127.0.0.1:{self.port}",
             f"--extend.query-path={queries}", *flags],
            env=env, stdout=self.logfile, stderr=subprocess.STDOUT)
        # up when its web server answers (the landing page runs no query, so
        # the first scrape is a cold one)
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5):
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                log = self.log()
                self.stop()
                pytest.fail(f"the exporter did not come up: {log}")
            time.sleep(0.1)

    def scrape(self):
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=60) as r:
            text = r.read().decode()
        return text, time.monotonic() - t0

    def log(self):
        with open(self.logfile.name, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        os.unlink(self.logfile.name)


# ---- the text exposition format ------------------------------------------------

SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """(types {family: type}, samples {(name, frozenset(labels)): value})."""
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m, f"unparseable line: {line!r}"
            labels = frozenset(LABEL.findall(m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return types, samples


def ours(samples):
    return {k: v for k, v in samples.items() if k[0].startswith("qes_billing_")}


def without_server(samples):
    return {(n, frozenset(l for l in labels if l[0] != "server")): v for (n, labels), v in samples.items()}


def value(samples, name, **labels):
    want = frozenset((k, str(v)) for k, v in labels.items())
    found = [v for (n, l), v in samples.items() if n == name and want <= l]
    assert len(found) == 1, f"{name}{labels}: {len(found)} series"
    return found[0]


# ---- what the queries file says the exporter makes ------------------------------

def load_queries():
    with open(QUERIES) as f:
        return yaml.safe_load(f)


def expected_series(conn, queries):
    """The series each query of the file yields, read as the exporter's role:
    {(name, frozenset(labels)): (value, type)}, histograms expanded."""
    out = {}
    for ns, q in queries.items():
        columns = {}
        for m in q["metrics"]:
            (col, spec), = m.items()
            columns[col] = spec["usage"]
        cur = conn.execute(q["query"])
        names = [d.name for d in cur.description]
        for row in cur.fetchall():
            r = dict(zip(names, row))
            labels = frozenset((c, str(r[c])) for c, u in columns.items() if u == "LABEL")
            for col, usage in columns.items():
                name = f"{ns}_{col}"
                if usage in ("COUNTER", "GAUGE"):
                    v = r[col]
                    out[(name, labels)] = (math.nan if v is None else float(v), usage.lower())
                elif usage == "HISTOGRAM":
                    for le, n in zip(r[col], r[col + "_bucket"]):
                        out[(name + "_bucket", labels | {("le", format_le(le))})] = (float(n), "histogram")
                    out[(name + "_bucket", labels | {("le", "+Inf")})] = (float(r[col + "_count"]), "histogram")
                    out[(name + "_sum", labels)] = (float(r[col + "_sum"]), "histogram")
                    out[(name + "_count", labels)] = (float(r[col + "_count"]), "histogram")
        # every column is declared: the exporter would emit an undeclared one untyped
        assert set(names) - {c + s for c, u in columns.items() if u == "HISTOGRAM"
                             for s in ("_bucket", "_sum", "_count")} == set(columns), ns
    return out


def format_le(le):
    """Go's strconv.FormatFloat(le, 'g', -1, 64), as client_golang writes le."""
    s = repr(float(le))
    return s[:-2] if s.endswith(".0") else s


# these move between two reads without going through every value in between
TIME_VARYING = {"qes_billing_worker_heartbeat_age_seconds"}


def check_scrape_against_sql(cluster, exporter, queries):
    """Every qes_billing series the exporter shows is one the queries file
    describes, with the type it declares and a value between what SQL gave
    just before and just after the scrape (the worker keeps working)."""
    with cluster.connect(user=EXPORTER_ROLE, autocommit=True) as conn:
        before = expected_series(conn, queries)
        text, seconds = exporter.scrape()
        after = expected_series(conn, queries)
    types, samples = parse(text)
    got = without_server(ours(samples))
    assert set(got) == set(before) == set(after), (set(got) ^ set(before)) | (set(before) ^ set(after))
    for key, v in got.items():
        (b, kind), (a, _) = before[key], after[key]
        family = key[0] if kind != "histogram" else re.sub(r"_(bucket|sum|count)$", "", key[0])
        assert types[family] == kind, (family, types[family], kind)
        if key[0] in TIME_VARYING:
            assert 0 <= v < 10, (key, v)
        elif math.isnan(b) or math.isnan(a):
            assert math.isnan(v) or min(b, a) <= v <= max(b, a) or (math.isnan(b) and math.isnan(a)), (key, b, v, a)
        else:
            tol = 1e-6 * max(1.0, abs(b), abs(a))
            assert min(b, a) - tol <= v <= max(b, a) + tol, (key, b, v, a)
    return text, samples, seconds


def promtool_check_metrics(text):
    return subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)


# ---- activity --------------------------------------------------------------------

def event(type_, obj, created=None):
    ev = {"id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2024-06-20",
          "created": created or int(time.time()), "livemode": False, "type": type_,
          "data": {"object": obj}}
    return json.dumps(ev, indent=2)


def deliver(api, body, secret=SECRET, header=None, timestamp=None):
    if header is None:
        header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp)
    headers = {"Content-Type": "application/json"}
    if header is not False:
        headers["Stripe-Signature"] = header
    return api.post("/rpc/stripe_webhook", body=body, headers=headers)


def tenant(i):
    return f"{TENANT_MARK}-{i}"


@pytest.fixture(scope="module")
def fake():
    f = FakeStripe(seed=7)
    f.base = f.serve()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def prom_pg(fake):
    binary("prometheus-postgres-exporter")
    binary("promtool")
    cluster = Cluster("prom", env=TEST_KEYS, conf={
        "qes_billing.stripe_api_base": f"'{fake.base}'",
        "qes_billing.webhook_max_attempts": "1",          # a failing event parks at once
    }).start()
    assert cluster.wait_until("SELECT alive FROM billing.worker_status"), cluster.log()
    with cluster.connect(autocommit=True) as c:
        c.execute(ROLE_SQL)
    yield cluster
    amcheck_and_stop(cluster)


@pytest.fixture(scope="module")
def activity(prom_pg):
    pg = prom_pg
    api = PostgREST(pg.dsn(user="authenticator"))
    try:
        for i in range(6):
            pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (tenant(i), f"Tenant {i}", f"billing{i}@example.com"))
        # subscriptions as Stripe mirrors them
        for i, (plan, interval, status, grace) in enumerate([
                ("professional", "month", "active", None), ("professional", "month", "active", None),
                ("enterprise", "year", "active", None), ("professional", "year", "past_due", "7 days"),
                ("professional", "month", "past_due", "-1 day")]):
            pg.sql("INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, "
                   "stripe_subscription_id, current_period_start, current_period_end, grace_until) "
                   "VALUES (%s, %s, %s, %s, %s, billing.now() - interval '3 days', "
                   "billing.now() + interval '27 days', billing.now() + %s::interval)",
                   (tenant(i), plan, interval, status, f"sub_prom{i}", grace))
        # usage
        for i in range(6):
            for metric, q in (("signatures", 3 + i), ("documents", 10 * i), ("api_calls", 100 + i)):
                if q:
                    pg.sql("SELECT billing.record_usage(%s, %s, %s, %s)", (tenant(i), metric, q, f"k-{i}-{metric}"))
        pg.sql("SELECT billing.record_usage(%s, 'signatures', 9, 'k-5-over')", (tenant(5),))   # Free: 10/month
        # webhooks: payments of ours, an event about a stranger, a broken one
        for i in range(3):
            body = event("payment_intent.succeeded", {
                "id": f"pi_prom_ok{i}", "object": "payment_intent", "amount": 2900, "currency": "usd",
                "status": "succeeded", "metadata": {"tenant_id": tenant(i)}})
            assert deliver(api, body).status == 200
        body = event("payment_intent.payment_failed", {
            "id": "pi_prom_fail", "object": "payment_intent", "amount": 9900, "currency": "usd",
            "status": "requires_payment_method", "metadata": {"tenant_id": tenant(3)},
            "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds"}})
        assert deliver(api, body).status == 200
        body = event("invoice.paid", {"id": "in_stranger", "object": "invoice", "customer": "cus_notours",
                                      "status": "paid", "amount_due": 100, "amount_paid": 100})
        assert deliver(api, body).status == 200
        broken = event("invoice.paid", {"id": "in_prom_broken", "object": "invoice", "status": "paid",
                                        "metadata": {"tenant_id": tenant(0)}, "currency": "usd",
                                        "amount_due": "not a number", "amount_paid": "not a number"})
        assert deliver(api, broken).status == 200
        # refusals: written ones and one still in memory
        for _ in range(3):
            assert deliver(api, event("invoice.paid", {"id": "in_x", "object": "invoice"}), secret="whsec_wrong").status == 400
        for _ in range(2):
            assert deliver(api, event("invoice.paid", {"id": "in_x", "object": "invoice"}), header=False).status == 400
        pg.sql("SELECT billing.flush_webhook_rejections()")
        assert deliver(api, event("invoice.paid", {"id": "in_x", "object": "invoice"}),
                       timestamp=int(time.time()) - 3600).status == 400
        # Stripe requests: one that succeeds, one that fails for good (404)
        pg.sql("SELECT billing.outbox_enqueue(%s, 'customer.create', 'POST', '/v1/customers', %s::jsonb)",
               (tenant(4), json.dumps({"email": "billing4@example.com", "metadata": {"tenant_id": tenant(4)}})))
        pg.sql("SELECT billing.outbox_enqueue(%s, 'customer.fetch', 'GET', '/v1/customers/cus_prom_missing')",
               (tenant(4),))
        # the worker is done with all of it
        assert pg.wait_until("SELECT NOT EXISTS (SELECT FROM billing.webhook_events"
                             "                   WHERE state IN ('received', 'processing'))"
                             "   AND NOT EXISTS (SELECT FROM billing.stripe_requests"
                             "                   WHERE state IN ('pending', 'in_flight', 'waiting'))", 30), pg.log()
        assert pg.sql("SELECT state FROM billing.webhook_events WHERE payload::jsonb -> 'data' -> 'object' ->> 'id'"
                      " = 'in_prom_broken'") == [("needs_review",)]
    finally:
        api.close()
    return pg


# ---- tests -------------------------------------------------------------------------

def test_alert_rules_unit_tests():
    check = subprocess.run([binary("promtool"), "check", "rules", ALERTS], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([binary("promtool"), "test", "rules", ALERTS_TEST], capture_output=True, text=True,
                         cwd=MONITORING)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
    # every alert of the file has a test that fires it
    with open(ALERTS) as f:
        alerts = {r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"] if "alert" in r}
    with open(ALERTS_TEST) as f:
        fired = {c["alertname"] for t in yaml.safe_load(f)["tests"] for c in t.get("alert_rule_test", [])
                 if c["exp_alerts"]}
    assert alerts == fired, alerts ^ fired


def test_refusal_reasons_match_the_c_list():
    """The view lists every refusal reason (at zero too); src/guard.c names them."""
    with open(os.path.join(REPO, "src", "guard.c")) as f:
        c = f.read()
    block = re.search(r"reason_names\[QES_REJECT_NREASONS\]\s*=\s*\{(.*?)\};", c, re.S).group(1)
    in_c = set(re.findall(r'"([a-z_]+)"', block))
    with open(os.path.join(REPO, "sql", "install", "96_prometheus.sql")) as f:
        sql = f.read()
    known = re.search(r"CREATE VIEW billing.prometheus_webhook_rejections AS.*?VALUES (.*?)\n\), written", sql, re.S)
    assert set(re.findall(r"\('([a-z_]+)'\)", known.group(1))) == in_c


def test_exporter_role_reads_metrics_only(activity):
    """The exporter's role (qes_monitor, docs/operations.md, "Monitoring")
    reads the metrics views and can do nothing else: with its read-only
    default turned off, it still can neither act (force a retry, reconcile)
    nor read a tenant's rows or a payment's client secret."""
    pg = activity
    with pg.connect(user=EXPORTER_ROLE, autocommit=True) as conn:
        c = conn.cursor()
        c.execute("SET default_transaction_read_only = off")
        c.execute("SELECT count(*) FROM billing.prometheus_worker")
        assert c.fetchone()[0] == 1
        for stmt in ("SELECT billing.retry_request(1, true)",
                     "SELECT billing.reconcile_now()",
                     "SELECT count(*) FROM billing.payments",
                     "SELECT count(*) FROM billing.tenants",
                     "SELECT count(*) FROM billing.stripe_requests",
                     "SELECT * FROM billing.usage_current('t0')"):
            with pytest.raises(Exception) as e:
                c.execute(stmt)
            assert getattr(e.value, "sqlstate", None) == "42501", (stmt, e.value)


def test_scrape_matches_sql(activity):
    pg = activity
    exporter = Exporter(f"host=127.0.0.1 port={pg.port} dbname={pg.database} user={EXPORTER_ROLE} sslmode=disable",
                        "--disable-default-metrics", "--disable-settings-metrics", "--log.level=warn")
    try:
        text, samples, _ = check_scrape_against_sql(pg, exporter, load_queries())
        lint = promtool_check_metrics(text)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert TENANT_MARK not in text
        assert value(samples, "pg_exporter_last_scrape_error") == 0, exporter.log()
        got = ours(samples)

        # the worker
        assert value(got, "qes_billing_worker_running") == 1
        assert value(got, "qes_billing_worker_up") == 1
        assert value(got, "qes_billing_worker_extension_present") == 1
        assert value(got, "qes_billing_worker_naptime_seconds") == 0.2
        assert value(got, "qes_billing_worker_loops_total") > 0

        # webhook events per type, and the latency histogram, against the inbox
        for type_, received, applied, ignored in pg.sql(
                "SELECT event_type, count(*), count(*) FILTER (WHERE state = 'applied'),"
                "       count(*) FILTER (WHERE state = 'ignored') FROM billing.webhook_events GROUP BY 1"):
            assert value(got, "qes_billing_webhook_events_received_total", type=type_) == received
            assert value(got, "qes_billing_webhook_events_applied_total", type=type_) == applied
            assert value(got, "qes_billing_webhook_events_ignored", type=type_) == ignored
        assert value(got, "qes_billing_webhook_events_received_total", type="payment_intent.succeeded") == 3
        assert value(got, "qes_billing_webhook_events_applied_total", type="payment_intent.succeeded") == 3
        assert value(got, "qes_billing_webhook_events_applied_total", type="payment_intent.payment_failed") == 1
        assert value(got, "qes_billing_webhook_events_received_total", type="customer.deleted") == 0
        lat = pg.sql("SELECT extract(epoch FROM applied_at - received_at)::float8 FROM billing.webhook_events"
                     " WHERE state = 'applied' AND event_type = 'payment_intent.succeeded'")
        lat = [r[0] for r in lat]
        h = "qes_billing_webhook_latency_seconds"
        assert value(got, h + "_count", type="payment_intent.succeeded") == len(lat) == 3
        assert value(got, h + "_sum", type="payment_intent.succeeded") == pytest.approx(sum(lat), rel=1e-9)
        bounds = pg.sql("SELECT unnest(billing.prometheus_latency_buckets())")
        previous = 0
        for (le,) in bounds:
            n = value(got, h + "_bucket", type="payment_intent.succeeded", le=format_le(le))
            assert n == sum(1 for x in lat if x <= le) and n >= previous
            previous = n
        assert value(got, h + "_bucket", type="payment_intent.succeeded", le="+Inf") == 3

        # the inbox: one parked event (counted by the audit log too), nothing waiting
        assert value(got, "qes_billing_webhook_inbox_parked") == 1
        assert value(got, "qes_billing_webhook_events_parked_total") == 1
        assert value(got, "qes_billing_webhook_inbox_pending") == 0
        assert value(got, "qes_billing_webhook_inbox_oldest_due_age_seconds") == 0

        # refusals: written and still in memory
        written = dict(pg.sql("SELECT reason, sum(deliveries)::int FROM billing.webhook_rejections GROUP BY 1"))
        pending = dict(pg.sql("SELECT reason, deliveries::int FROM billing.webhook_rejections_pending()"))
        assert written.get("mismatch", 0) + pending.get("mismatch", 0) == 3
        assert written.get("no_header", 0) + pending.get("no_header", 0) == 2
        assert written.get("stale", 0) + pending.get("stale", 0) == 1
        for reason in ("mismatch", "no_header", "stale"):
            assert (value(got, "qes_billing_webhook_rejections_total", reason=reason)
                    + value(got, "qes_billing_webhook_rejections_unflushed", reason=reason)
                    in (written.get(reason, 0) + pending.get(reason, 0),)), reason
        assert value(got, "qes_billing_webhook_rejections_total", reason="bad_encoding") == 0

        # the outbox: a success and a final failure (not_found), from the table and the audit log
        assert value(got, "qes_billing_outbox_requests_created_total") == pg.sql(
            "SELECT count(*) FROM billing.stripe_requests")[0][0] >= 2
        assert value(got, "qes_billing_outbox_requests_succeeded_total") == pg.sql(
            "SELECT count(*) FROM billing.stripe_requests WHERE state = 'succeeded'")[0][0] >= 1
        assert value(got, "qes_billing_outbox_requests_failed_total", category="not_found") == 1
        assert value(got, "qes_billing_outbox_requests_failed_total", category="card") == 0
        assert value(got, "qes_billing_outbox_failed") == 1
        assert value(got, "qes_billing_outbox_pending") == 0

        # subscriptions and revenue, payments, usage
        assert value(got, "qes_billing_subscriptions_current", plan="professional", billing_interval="month",
                     status="active") == 2
        assert value(got, "qes_billing_subscriptions_in_grace_period", plan="professional",
                     billing_interval="year", status="past_due") == 1
        assert value(got, "qes_billing_subscriptions_grace_period_over", plan="professional",
                     billing_interval="month", status="past_due") == 1
        mrr = dict(((p, i, s), m) for p, i, s, m in pg.sql(
            "SELECT plan_id, billing_interval, status, mrr FROM billing.subscription_health"))
        assert value(got, "qes_billing_subscriptions_mrr_usd", plan="enterprise", billing_interval="year",
                     status="active") == mrr[("enterprise", "year", "active")] / 100 > 0
        assert value(got, "qes_billing_payments_current", kind="one_time", status="succeeded") == 3
        assert value(got, "qes_billing_payments_current", kind="one_time", status="failed") == 1
        assert value(got, "qes_billing_usage_tenants", metric="signatures") == 6
        assert value(got, "qes_billing_usage_current_period", metric="signatures") == sum(3 + i for i in range(6)) + 9
        assert value(got, "qes_billing_usage_tenants_over_limit", metric="signatures") == 1
        assert value(got, "qes_billing_usage_tenant_max", metric="api_calls") == 105
        assert value(got, "qes_billing_usage_cache_entries") > 0
        assert value(got, "qes_billing_rate_limit_buckets") > 0
        assert value(got, "qes_billing_audit_events_total") == pg.sql("SELECT count(*) FROM billing.audit_log")[0][0]
        assert value(got, "qes_billing_drift_repairs_total") == 0
    finally:
        exporter.stop()


def test_with_default_metrics(activity):
    """As most deployments run it, with the exporter's own PostgreSQL metrics:
    ours are the same series, and promtool's remarks (the exporter's built-in
    counters lack _total) never concern a qes_billing metric."""
    pg = activity
    exporter = Exporter(f"host=127.0.0.1 port={pg.port} dbname={pg.database} user={EXPORTER_ROLE} sslmode=disable",
                        "--log.level=warn")
    try:
        text, _ = exporter.scrape()
        types, samples = parse(text)
        assert value(samples, "pg_exporter_last_scrape_error") == 0, exporter.log()
        assert {k[0] for k in ours(samples)} >= {"qes_billing_worker_up", "qes_billing_webhook_latency_seconds_bucket",
                                                 "qes_billing_outbox_requests_failed_total"}
        lint = promtool_check_metrics(text)
        remarks = [l for l in (lint.stdout + lint.stderr).splitlines() if l.strip()]
        assert not [l for l in remarks if "qes_billing" in l], remarks
        ourtext = "\n".join(l for l in text.splitlines()
                            if re.match(r"(# (HELP|TYPE) )?qes_billing_", l)) + "\n"
        lint = promtool_check_metrics(ourtext)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        exporter.stop()


def test_scrape_time_with_10000_tenants(activity):
    """10,000 tenants with a realistic history; the figures are printed
    (pytest -s) and the scrape stays well inside a 15 s scrape interval."""
    pg = activity
    n = 10000
    t = f"'{TENANT_MARK}-s' || i"      # the tenant id of row i (no parameters: % is SQL's modulo)
    with pg.connect(autocommit=True) as c:
        c.execute(f"SELECT billing.upsert_tenant({t}, 'Scale ' || i, 'b' || i || '@example.com')"
                  f"  FROM generate_series(1, {n}) i")
        # 60 % pay (professional or enterprise, month or year; some trialing, some past due)
        c.execute(f"""
            INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, stripe_subscription_id,
                                               current_period_start, current_period_end, grace_until)
            SELECT {t}, CASE WHEN i % 5 = 0 THEN 'enterprise' ELSE 'professional' END,
                   CASE WHEN i % 3 = 0 THEN 'year' ELSE 'month' END,
                   CASE WHEN i % 50 = 0 THEN 'past_due' WHEN i % 40 = 0 THEN 'trialing' ELSE 'active' END,
                   'sub_scale' || i, billing.now() - interval '10 days', billing.now() + interval '20 days',
                   CASE WHEN i % 50 = 0 THEN billing.now() + interval '3 days' END
              FROM generate_series(1, {n}) i WHERE i % 5 IN (0, 1, 2)""")
        # usage: every tenant signs, half upload documents, a third call the API
        c.execute(f"""
            SELECT billing.record_usage({t}, m.metric, 1 + (i * 7 + m.k) % 90, 'scale-' || i || '-' || m.metric)
              FROM generate_series(1, {n}) i
             CROSS JOIN (VALUES ('signatures', 1), ('documents', 2), ('api_calls', 3)) m(metric, k)
             WHERE i % m.k = 0""")
        # payments: 12 a paying tenant, 1 in 17 failed
        c.execute(f"""
            INSERT INTO billing.payments (tenant_id, kind, amount, currency, status, stripe_payment_intent_id)
            SELECT {t}, 'subscription', 2900, 'usd',
                   CASE WHEN (i + j) % 17 = 0 THEN 'failed' ELSE 'succeeded' END, 'pi_scale_' || i || '_' || j
              FROM generate_series(1, {n}) i CROSS JOIN generate_series(1, 12) j WHERE i % 5 IN (0, 1, 2)""")
        # the inbox: 10 events a tenant over the last months, applied after
        # 0.05-3 s (1 in 500 after 4 minutes), 1 in 23 ignored
        c.execute(f"""
            INSERT INTO billing.webhook_events (stripe_event_id, event_type, livemode, stripe_created, payload,
                                                tenant_id, state, attempts, received_at, applied_at)
            SELECT 'evt_scale_' || i || '_' || j, ty.types[1 + (i + j) % 16], false, r.at,
                   json_build_object('id', 'evt_scale_' || i || '_' || j, 'object', 'event',
                                     'type', ty.types[1 + (i + j) % 16],
                                     'data', json_build_object('object', json_build_object('id', 'obj_' || i || '_' || j))),
                   {t}, CASE WHEN (i + j) % 23 = 0 THEN 'ignored' ELSE 'applied' END, 1, r.at,
                   r.at + make_interval(secs => CASE WHEN (i * j) % 500 = 0 THEN 240 ELSE 0.05 + ((i * j) % 300) / 100.0 END)
              FROM generate_series(1, {n}) i CROSS JOIN generate_series(1, 10) j
             CROSS JOIN (SELECT billing.webhook_event_types() AS types) ty
             CROSS JOIN LATERAL (SELECT now() - make_interval(hours => (i * 31 + j * 97) % 2000) AS at) r""")
        c.execute("VACUUM ANALYZE billing.webhook_events, billing.payments, billing.subscriptions,"
                  " billing.usage_events, billing.audit_log, billing.tenants")
        rows = c.execute("SELECT (SELECT count(*) FROM billing.tenants), (SELECT count(*) FROM billing.webhook_events),"
                         " (SELECT count(*) FROM billing.usage_events), (SELECT count(*) FROM billing.payments),"
                         " (SELECT count(*) FROM billing.audit_log)").fetchone()
    print(f"\nscale: tenants={rows[0]} webhook_events={rows[1]} usage_events={rows[2]} payments={rows[3]}"
          f" audit_rows={rows[4]}")

    # each query as the exporter's role
    queries = load_queries()
    with pg.connect(user=EXPORTER_ROLE, autocommit=True) as conn:
        for ns, q in queries.items():
            t0 = time.monotonic()
            conn.execute(q["query"]).fetchall()
            print(f"scale: query {ns} {1000 * (time.monotonic() - t0):.1f} ms")

    exporter = Exporter(f"host=127.0.0.1 port={pg.port} dbname={pg.database} user={EXPORTER_ROLE} sslmode=disable",
                        "--disable-default-metrics", "--disable-settings-metrics", "--log.level=warn")
    try:
        text, samples, first = check_scrape_against_sql(pg, exporter, queries)
        assert TENANT_MARK not in text
        series = len(ours(samples))
        durations, walls = [], []
        for _ in range(5):
            text, wall = exporter.scrape()
            _, s = parse(text)
            durations.append(value(s, "pg_exporter_last_scrape_duration_seconds"))
            walls.append(wall)
        print(f"scale: {series} qes_billing series; first scrape (every query) {first:.3f} s;"
              f" then (usage cached for 60 s) median {statistics.median(walls):.3f} s wall,"
              f" exporter's own figure median {statistics.median(durations):.3f} s")
        assert series < 1000          # labels never grow with tenants
        assert first < 15 and max(walls) < 15
    finally:
        exporter.stop()
