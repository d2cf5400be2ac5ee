"""Secrets stay secret (docs/architecture.md, rule 13).

A secret -- an sk_/rk_ key, a whsec_ signing secret, the `secret` field of
a webhook endpoint -- is stored only in billing.stripe_secrets; responses,
errors and audit details are redacted before they are stored or logged.

After a full run -- qes_billing_setup --all through the fake Stripe (which
returns the endpoint's signing secret once, as Stripe does), a subscription
paid and its events delivered signed with the stored secret, then requests
answered by an endpoint that echoes our request headers (Authorization:
Bearer <secret key>) in JSON and HTML error bodies and in a 200, and an
error raised while the worker records an answer whose message carries the
key -- every table and view of the schemas billing and api readable by each
role (the superuser too, billing.stripe_secrets apart), the settings views,
pg_stat_activity (as each role and as a pg_monitor login), api.health/
api.config, the server log (log_statement = all), qes_billing_setup's output
and pg_dump are searched for the key, the signing secret and any
sk_/rk_/whsec_ token, and none is found.

pg_stat_activity is also read while statements that carry a secret are
running (held by an advisory lock) and after them, by the superuser and by a
pg_monitor login: masked.  And the search is shown able to fail: secrets
planted in a row, a log line and a running statement are found exactly
there.
"""
import json
import os
import re
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from conftest import amcheck_and_stop, tenant_claims
from fake_stripe import FakeStripe, signed
from pgcluster import Cluster
from postgrest import PostgREST

KEY = "sk_test_51RedactionProofKey9f3Kq7ZtW2mXv"
ENV = {
    "QES_ENVIRONMENT": "development",
    "QES_BASE_URL": "https://sign.example.test",
    "STRIPE_TEST_SECRET_KEY": KEY,
    "STRIPE_TEST_PUBLISHABLE_KEY": "pk_test_51RedactionProofPublishable",
    # no STRIPE_TEST_WEBHOOK_SECRET: webhooks are verified with the secret
    # --setup-webhook stores in billing.stripe_secrets
}
TOKEN = re.compile(r"(?:sk|rk)_(?:test|live)_[A-Za-z0-9]+|whsec_[A-Za-z0-9]+")
OPEN = "state IN ('waiting', 'pending', 'in_flight')"
ROLES = ("qes_admin", "qes_app", "qes_tenant", "qes_anon")
MONITOR = "secrets_monitor"     # a metrics exporter's login: pg_monitor shows it every session's statement
HELD = 7_404_001                # the advisory lock that keeps statements running
CONTROL = "x" + "sk_test_" + "ControlRunningInClear"    # not masked: a letter before the prefix


@pytest.fixture(scope="module")
def fake():
    f = FakeStripe(seed=12, timeout_s=1.5)
    f.base = f.serve()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def pg(fake):
    c = Cluster("secrets", env=ENV, conf={
        "qes_billing.stripe_api_base": f"'{fake.base}'", "qes_billing.retry_base_delay": "'20ms'",
        "qes_billing.retry_max_delay": "'200ms'", "qes_billing.request_timeout": "'1s'",
        "qes_billing.max_attempts": "4", "qes_billing.worker_naptime": "'200ms'",
        # echoed 5xx are unknown outcomes: retried with their key only this long
        "qes_billing.idempotency_window": "'1s'",
        "log_statement": "'all'", "log_min_messages": "'info'"}).start()
    assert c.wait_until("SELECT alive FROM billing.worker_status"), c.log()
    yield c
    amcheck_and_stop(c)


@pytest.fixture(scope="module")
def api(pg):
    client = PostgREST(pg.dsn(user="authenticator"))
    client.delivered = 0
    yield client
    client.close()


def setup_command(pg, *args):
    exe = os.path.join(pg.bindir, "qes_billing_setup")
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(pg.port), PGDATABASE=pg.database, PGUSER="postgres")
    return subprocess.run([exe, *args, "--timeout", "30"], env=env, capture_output=True, text=True, timeout=90)


def drain(pg, timeout=60):
    assert pg.wait_until(f"SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE {OPEN})", timeout), \
        pg.sql(f"SELECT request_id, kind, state, attempts FROM billing.stripe_requests WHERE {OPEN}")


def deliver(pg, api, fake, secret):
    events = fake.events[api.delivered:]
    api.delivered += len(events)
    for ev in events:
        body, header = signed(ev, secret)
        r = api.post("/rpc/stripe_webhook", body=body,
                     headers={"Content-Type": "application/json", "Stripe-Signature": header})
        assert r.status == 200, r.body
    assert pg.wait_until("SELECT NOT EXISTS (SELECT 1 FROM billing.webhook_events WHERE state = 'received')")


def leaks(text, secrets):
    """The secrets and secret-looking tokens in text."""
    found = {s for s in secrets if s in text}
    return found | set(TOKEN.findall(text))


def readable(conn, role, claims, queries):
    """Run each query as role (None: the superuser) with these JWT claims,
    each in its own transaction; return ({place: text of all rows},
    {place: sqlstate of a refusal})."""
    seen, refused = {}, {}
    for place, query in queries:
        try:
            with conn.transaction():
                if role:
                    conn.execute(f"SET LOCAL ROLE {role}")
                if claims:
                    conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
                rows = conn.execute(query).fetchall()
        except psycopg.Error as e:
            refused[place] = e.sqlstate
            continue
        seen[place] = "\n".join(str(r[0]) for r in rows)
    return seen, refused


def everything(conn, superuser):
    rels = [r for (r,) in conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname IN ('billing', 'api') AND c.relkind IN ('r', 'v', 'm', 'p', 'f') ORDER BY 1")]
    assert "billing.stripe_requests" in rels and "billing.audit_log" in rels, rels
    queries = [(rel, f"SELECT row_to_json(t)::text FROM {rel} t") for rel in rels
               if not (superuser and rel == "billing.stripe_secrets")]
    queries += [(v, f"SELECT row_to_json(s)::text FROM {v} s")
                for v in ("pg_settings", "pg_db_role_setting", "pg_file_settings", "pg_stat_activity")]
    queries += [("SHOW ALL", "SELECT string_agg(name || '=' || setting, ' ') FROM pg_settings")]
    queries += [(f"current_setting({g})", f"SELECT current_setting('{g}', true)")
                for g in ("qes_billing.stripe_test_secret_key", "qes_billing.stripe_test_webhook_secret",
                          "qes_billing.stripe_live_secret_key", "qes_billing.stripe_live_webhook_secret")]
    queries += [(f, f"SELECT {f}::text") for f in ("api.health()", "api.config()", "billing.worker_state()")]
    return queries


def monitor_login(pg):
    pg.sql(f"""DO $$ BEGIN
                 IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{MONITOR}') THEN
                   CREATE ROLE {MONITOR} LOGIN IN ROLE pg_monitor;
                 END IF;
               END $$""")


class Running:
    """Statements kept running in their own sessions: each waits for a
    share of the advisory lock HELD (pg_advisory_lock_shared, in its
    executor, after parse analysis) until release(); the sessions then stay
    open, idle, until close().  A statement goes by the simple query
    protocol, as psql sends it; a (statement, parameters) pair by the
    extended protocol (Parse, Bind, Execute), as PostgREST, JDBC and
    asyncpg send theirs."""

    def __init__(self, pg, statements):
        self.holder = pg.connect(autocommit=True)
        self.holder.execute("SELECT pg_advisory_lock(%s)", (HELD,))
        self.conns = {name: pg.connect(autocommit=True) for name in statements}
        self.pids = {name: c.info.backend_pid for name, c in self.conns.items()}
        self.errors = {}
        self.threads = [threading.Thread(target=self._run, args=(name, q)) for name, q in statements.items()]
        for t in self.threads:
            t.start()
        pids = list(self.pids.values())
        assert pg.wait_until(f"SELECT count(*) = {len(pids)} FROM pg_stat_activity WHERE pid = ANY('{{{','.join(map(str, pids))}}}') "
                             "AND state = 'active' AND wait_event_type = 'Lock' AND wait_event = 'advisory'"), \
            pg.sql("SELECT pid, state, wait_event_type, wait_event FROM pg_stat_activity")

    def _run(self, name, query):
        try:
            if isinstance(query, tuple):
                self.conns[name].execute(*query)
            else:
                psycopg.ClientCursor(self.conns[name]).execute(query)
        except psycopg.Error as e:        # pragma: no cover - shown by the test
            self.errors[name] = str(e)

    def release(self):
        self.holder.execute("SELECT pg_advisory_unlock(%s)", (HELD,))
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads) and not self.errors, self.errors

    def close(self):
        for c in [self.holder, *self.conns.values()]:
            c.close()


def activity(conn, pids):
    """{pid: (state, query)} of these sessions, as conn's role sees them."""
    return {pid: (state, query) for pid, state, query in conn.execute(
        "SELECT pid, state, query FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),))}


def search(pg, secrets, outputs=()):
    """Search every place the module's docstring names, read by the superuser,
    by each role and by a monitoring login (pg_monitor, which sees every
    session's statement): returns ({place: sorted secrets found there}, what
    the superuser read of each relation).  test_the_search_finds_planted_secrets
    shows that it finds what is there."""
    found = {}

    def check(where, text):
        hit = leaks(text, secrets)
        if hit:
            found[where] = sorted(hit)

    with pg.connect(autocommit=True) as conn:
        # the superuser with a tenant's claims, so that the views of the
        # calling tenant (api.usage, api.features ...) show a tenant's rows
        seen, refused = readable(conn, None, tenant_claims("calm"), everything(conn, True))
        assert not {p: s for p, s in refused.items() if p != "pg_file_settings"}, refused
        for place, text in seen.items():
            check(f"postgres: {place}", text)
        operator = seen
        counts = {}
        for role in ROLES:
            claim_sets = ([tenant_claims(t) for t in ("calm", "echo_a", "echo_b", "echo_c", "rec_fault")]
                          if role == "qes_tenant" else [{"role": role, "sub": "ops@qes.example"}])
            for claims in claim_sets:
                seen, refused = readable(conn, role, claims, everything(conn, False))
                assert "billing.stripe_secrets" in refused, role
                counts[role] = counts.get(role, 0) + sum(t.count("\n") + 1 for t in seen.values() if t)
                for place, text in seen.items():
                    check(f"{role} {claims.get('tenant_id', '')}: {place}", text)
        assert all(counts.values()), counts
    monitor_login(pg)
    with pg.connect(user=MONITOR, autocommit=True) as conn:
        check(f"{MONITOR}: pg_stat_activity",
              "\n".join(r[0] for r in conn.execute("SELECT row_to_json(s)::text FROM pg_stat_activity s")))

    check("server log", pg.log())
    for i, text in enumerate(outputs):
        check(f"qes_billing_setup run {i}", text)
    dump = subprocess.run([os.path.join(pg.bindir, "pg_dump"), "-d", pg.dsn()],
                          capture_output=True, text=True, check=True).stdout
    assert "audit_log" in dump
    check("pg_dump", dump)
    return found, operator


def test_no_secret_is_stored_shown_logged_or_dumped(pg, api, fake):
    out = []     # what qes_billing_setup printed

    # -- setup: the endpoint's signing secret goes to billing.stripe_secrets
    r = setup_command(pg, "--all")
    out.append(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "signing secret stored" in r.stdout, r.stdout
    endpoints = fake.of_type("webhook_endpoint")
    assert len(endpoints) == 1
    whsec = endpoints[0]["secret"]
    assert whsec.startswith("whsec_")
    assert pg.sql("SELECT mode, secret FROM billing.stripe_secrets") == [("test", whsec)]
    secrets = (KEY, whsec)

    # -- a subscription, paid; its events verified with the stored secret
    pg.sql("SELECT billing.upsert_tenant('calm', 'Calm GmbH', 'billing@calm.example')")
    calm = tenant_claims("calm")
    r = api.post("/rpc/create_subscription", body={"plan": "professional", "interval": "month"}, claims=calm)
    assert r.status == 200, r.body
    drain(pg)
    s = api.get("/subscription", claims=calm).body[0]
    fake.confirm(s["client_secret"].split("_secret_")[0], "pm_card_visa")
    deliver(pg, api, fake, whsec)
    assert api.get("/subscription", claims=calm).body[0]["status"] == "active"
    assert pg.sql("SELECT count(*) FROM billing.webhook_events WHERE state = 'applied'")[0][0] > 0

    # -- an endpoint that echoes our headers: every answer, each kind of answer
    fake.echo = 1.0
    for t in ("echo_a", "echo_b", "echo_c"):
        pg.sql("SELECT billing.upsert_tenant(%s, %s, %s)", (t, t.upper(), f"billing@{t}.example"))
        api.post("/rpc/create_subscription", body={"plan": "enterprise", "interval": "year"},
                 claims=tenant_claims(t))
    r = api.post("/rpc/create_payment_intent", body={"amount": 1500, "currency": "eur"}, claims=calm)
    assert r.status == 200, r.body
    r = api.post("/rpc/update_subscription", body={"plan": "enterprise"}, claims=calm)
    assert r.status == 200, r.body
    r = setup_command(pg, "--test-config", "--setup-webhook")
    out.append(r.stdout + r.stderr)
    drain(pg)
    fake.echo = 0.0
    echoed = {k: v for k, v in fake.faults.items() if k.startswith("echo_")}
    assert len(echoed) == 4 and sum(echoed.values()) >= 12, echoed
    # the echoed answers were stored (redacted), failed requests audited
    assert pg.sql("SELECT count(*) FROM billing.stripe_requests WHERE state = 'failed'")[0][0] >= 3
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'stripe.request_failed'")[0][0] >= 3

    # -- an error while the worker records an answer, its message carrying
    #    the key (logged, and kept as the worker's last error)
    pg.sql("SELECT billing.upsert_tenant('rec_fault', 'Rec', 'billing@rec.example')")
    with pg.connect(autocommit=True) as c:
        c.execute(f"""CREATE FUNCTION public.refuse_recording() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN
                        RAISE EXCEPTION 'proxy said: Authorization: Bearer {KEY}';
                      END $$""")
        c.execute("""CREATE TRIGGER refuse_recording BEFORE UPDATE ON billing.stripe_requests FOR EACH ROW
                     WHEN (NEW.tenant_id = 'rec_fault' AND NEW.state <> 'in_flight')
                     EXECUTE FUNCTION public.refuse_recording()""")
    try:
        api.post("/rpc/create_subscription", body={"plan": "professional"}, claims=tenant_claims("rec_fault"))
        assert pg.wait_until("SELECT last_error LIKE '%proxy said%' FROM billing.worker_status"), \
            pg.sql("SELECT * FROM billing.worker_status")
    finally:
        with pg.connect(autocommit=True) as c:
            c.execute("DROP TRIGGER refuse_recording ON billing.stripe_requests")
            c.execute("DROP FUNCTION public.refuse_recording()")
    # the row whose answer could not be recorded is reclaimed as stale after
    # twice the request timeout (the worker schedules its tick for it), then
    # sent again with its key and recorded
    drain(pg)
    pg.sql("SELECT billing.flush_webhook_rejections()")

    # -- the search
    found, operator = search(pg, secrets, out)
    assert "could not record the answer" in pg.log()
    assert not found, "secrets found:\n" + "\n".join(f"  {w}: {h}" for w, h in sorted(found.items()))
    # the echoes and the recording error were there, masked
    assert "Bearer [redacted]" in operator["billing.stripe_requests"]
    assert "Bearer [redacted]" in operator["billing.audit_log"]
    assert "Bearer [redacted]" in pg.log()
    # the endpoint's answer is kept, its secret masked (setup reports it stored)
    assert pg.sql("SELECT response ->> 'secret' FROM billing.stripe_requests"
                  " WHERE kind = 'setup.webhook.create' ORDER BY request_id LIMIT 1") == [("[redacted]",)]


def test_a_running_statement_shows_its_secret_masked(pg):
    """pg_stat_activity while a statement that carries a secret runs (and
    after it, while its session is idle): masked for the superuser and for a
    pg_monitor login.  A control statement whose token the masking does not
    recognise (it does not start a word) runs beside them and is seen in
    clear, so the reading does see running statements' text."""
    whsec = "whsec_" + "RunningStatementSecret42"
    control = CONTROL
    monitor_login(pg)
    running = Running(pg, {
        "literal": f"SELECT pg_advisory_lock_shared({HELD}), '{KEY}' AS key, 'Bearer {whsec}' AS header",
        "set_config": f"SELECT set_config('qes_billing.stripe_test_webhook_secret', '{whsec}', false)"
                      f" FROM pg_advisory_lock_shared({HELD})",
        "control": f"SELECT pg_advisory_lock_shared({HELD}), '{control}' AS control",
        "extended": (f"SELECT pg_advisory_lock_shared(%s), '{KEY}' AS key, 'Bearer {whsec}' AS header", (HELD,)),
    })
    try:
        pids = running.pids
        for state in ("active", "idle"):
            with pg.connect(autocommit=True) as su, pg.connect(user=MONITOR, autocommit=True) as mon:
                for who, conn in (("postgres", su), (MONITOR, mon)):
                    seen = activity(conn, pids.values())
                    assert {s for s, _ in seen.values()} == {state}, (who, seen)
                    for name in ("literal", "set_config", "extended"):
                        query = seen[pids[name]][1]
                        assert "[redacted]" in query and not leaks(query, (KEY, whsec)), (who, state, name, query)
                        assert "pg_advisory_lock_shared" in query, (who, state, name, query)
                    assert seen[pids["control"]][1].count(control) == 1, (who, state, seen[pids["control"]])
                    assert leaks("\n".join(q for _, q in seen.values()), (KEY, whsec)) == {control[1:]}
                # a role without pg_read_all_stats sees no other session's statement at all
                su.execute("SET ROLE qes_admin")
                assert {q for _, q in activity(su, pids.values()).values()} == {"<insufficient privilege>"}
                su.execute("RESET ROLE")
            if state == "active":
                running.release()
    finally:
        running.close()


def test_a_secret_setting_is_masked_by_its_name(pg):
    """The SMTP password and the platform webhook's signing secret have no
    form to be recognised by: a statement that gives either a value -- SET,
    ALTER SYSTEM SET, set_config(), by the simple and the extended protocol
    -- shows it masked in pg_stat_activity, to the superuser and to a
    pg_monitor login, while it runs and after it, and the server log
    (log_statement = all, the extended protocol's parameters too) never has
    it.  A control statement carrying a plain string beside them is seen in
    clear."""
    tag = uuid.uuid4().hex[:10]
    password, signing, other, control = (f"Smtp-Pass-{tag}", f"platform-signing-{tag}",
                                         f"Alter-System-Pass-{tag}", f"Plain-Control-{tag}")
    values = (password, signing, other)
    monitor_login(pg)
    running = Running(pg, {
        "smtp": f"SELECT set_config('qes_billing.smtp_password', '{password}', false)"
                f" FROM pg_advisory_lock_shared({HELD})",
        "notify": f"SELECT set_config('QES_BILLING.Notify_Webhook_Secret', '{signing}' || '', false)"
                  f" FROM pg_advisory_lock_shared({HELD})",
        "extended": ("SELECT set_config('qes_billing.smtp_password', %s, false) FROM pg_advisory_lock_shared(%s)",
                     (password, HELD)),
        "control": f"SELECT pg_advisory_lock_shared({HELD}), '{control}' AS control",
    })
    # utility statements cannot be held: their sessions are read idle, as
    # they stay after the statement
    utility = {"set": f"SET qes_billing.notify_webhook_secret TO '{signing}'",
               "quoted": f'SET "qes_billing"."smtp_password" = \'{password}\'',
               "alter_system": f"ALTER SYSTEM SET qes_billing.smtp_password = '{other}'"}
    idle = {name: pg.connect(autocommit=True) for name in utility}
    try:
        for name, statement in utility.items():
            psycopg.ClientCursor(idle[name]).execute(statement)
        pids = dict(running.pids, **{name: c.info.backend_pid for name, c in idle.items()})
        for state in ("active", "idle"):
            with pg.connect(autocommit=True) as su, pg.connect(user=MONITOR, autocommit=True) as mon:
                for who, conn in (("postgres", su), (MONITOR, mon)):
                    seen = activity(conn, pids.values())
                    for name in ("smtp", "notify", "extended", *utility):
                        query = seen[pids[name]][1]
                        assert not any(v in query for v in values), (who, state, name, query)
                        assert "[redacted]" in query, (who, state, name, query)
                        assert "set_config" in query or name in utility, (who, state, name, query)
                    assert "pg_advisory_lock_shared" in seen[pids["smtp"]][1]
                    assert "pg_advisory_lock_shared($2)" in seen[pids["extended"]][1]
                    assert seen[pids["control"]][1].count(control) == 1, (who, state, seen[pids["control"]])
            if state == "active":
                running.release()
        log = pg.log()
        assert control in log
        assert "set_config('qes_billing.smtp_password', [redacted], false)" in log
        assert "ALTER SYSTEM SET qes_billing.smtp_password = [redacted]" in log
        assert "parameters: [redacted]" in log
        assert not [v for v in values if v in log], [line for line in log.splitlines() if any(v in line for v in values)]
    finally:
        running.close()
        for c in idle.values():
            c.close()
        with pg.connect(autocommit=True) as su:
            su.execute("ALTER SYSTEM RESET qes_billing.smtp_password")


def test_the_search_finds_planted_secrets(pg):
    """The search is able to fail: a secret planted in a table row, a log
    line and a running statement's text (each in a form the masking leaves
    alone or never sees) is found in exactly those places and in the dump."""
    pg.sql("SELECT billing.upsert_tenant('calm', 'Calm GmbH', 'billing@calm.example')")
    in_row, in_log, in_activity = ("sk_test_" + "PlantedInARow7", "sk_test_" + "PlantedInTheLog7",
                                   "sk_test_" + "PlantedRunning7")
    # the statements never carry the token whole (their text is logged): the
    # row is written through a concatenation, the log line and the running
    # statement carry it after a letter, where the masking does not look
    pg.sql("CREATE TABLE billing.zz_secret_plant (note text)")
    running = None
    try:
        pg.sql("INSERT INTO billing.zz_secret_plant VALUES ('sk_' || 'test_' || 'PlantedInARow7')")
        pg.sql("DO $$ BEGIN RAISE LOG 'self-test: x%', 'sk_' || 'test_' || 'PlantedInTheLog7'; END $$")
        running = Running(pg, {"plant": f"SELECT pg_advisory_lock_shared({HELD}), 'x{in_activity}' AS plant"})
        found, _ = search(pg, (KEY,))
        # the log also holds the control statement of the test before, if it ran
        in_server_log = set(found.pop("server log", ()))
        assert {in_log, in_activity} <= in_server_log <= {in_log, in_activity, CONTROL[1:]}, in_server_log
        assert found == {
            "postgres: billing.zz_secret_plant": [in_row],
            "postgres: pg_stat_activity": [in_activity],
            f"{MONITOR}: pg_stat_activity": [in_activity],
            "pg_dump": [in_row],
        }, found
        running.release()
    finally:
        if running:
            running.close()
        pg.sql("DROP TABLE billing.zz_secret_plant")


def test_masking_is_no_oracle_for_a_secret_without_a_form(pg):
    """The SMTP password has no form to be recognised by; masking its value
    in a message that goes back to the client would tell an ordinary login
    which of its guesses is the password.  A client's own error comes back
    as it wrote it; the server log still gets the value masked."""
    password = "Oracle-Probe-Password-77"
    with pg.connect(autocommit=True) as su:
        su.execute(f"ALTER SYSTEM SET qes_billing.smtp_password = '{password}'")
        su.execute("SELECT pg_reload_conf()")
        su.execute("CREATE ROLE oracle_probe LOGIN")
    try:
        assert pg.wait_until("SELECT current_setting('qes_billing.smtp_password') <> ''")
        with pg.connect(user="oracle_probe", autocommit=True) as probe:
            with pytest.raises(psycopg.Error) as e:
                probe.execute(f"SELECT 'guess-one {password} guess-three'::int")
        message = str(e.value)
        assert password in message and "[redacted]" not in message, message
    finally:
        with pg.connect(autocommit=True) as su:
            su.execute("ALTER SYSTEM RESET qes_billing.smtp_password")
            su.execute("SELECT pg_reload_conf()")
            su.execute("DROP ROLE oracle_probe")
