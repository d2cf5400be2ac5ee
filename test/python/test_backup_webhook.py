"""A backup webhook endpoint: qes_billing_setup --setup-backup-webhook URL
makes a second endpoint (another URL, e.g. a second PostgREST in another
zone) subscribed to the same events, against the stateful fake; each
endpoint's signing secret is kept and accepted; an event delivered through
both is stored once; rotating one endpoint's secret leaves the other's
alone.  The cluster has no webhook secret setting, so the intake verifies
with what setup stored (README, "Stripe webhooks")."""
import json
import time
from datetime import datetime, timezone

import pytest

from conftest import TEST_KEYS, amcheck_and_stop
from fake_stripe import FakeStripe, signed
from pgcluster import Cluster
from postgrest import PostgREST
from test_stripe_worker import setup_command

AT = datetime(2027, 9, 14, 19, 30, tzinfo=timezone.utc)
PRIMARY = "https://sign.example.test/api/v1/billing/webhooks/stripe"
BACKUP = "https://zone-b.sign.example.test/api/v1/billing/webhooks/stripe"


@pytest.fixture(scope="module")
def fake():
    f = FakeStripe(seed=11, timeout_s=1.5)
    f.base = f.serve()
    f.set_clock(AT)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def pg(fake):
    env = {k: v for k, v in TEST_KEYS.items() if k != "STRIPE_TEST_WEBHOOK_SECRET"}
    c = Cluster("backup_webhook", env=env,
                conf={"qes_billing.stripe_api_base": f"'{fake.base}'", "qes_billing.retry_base_delay": "'20ms'",
                      "qes_billing.worker_naptime": "'200ms'"}).start()
    assert c.wait_until("SELECT alive FROM billing.worker_status"), c.log()
    c.set_clock(AT)
    yield c
    amcheck_and_stop(c)


@pytest.fixture(scope="module")
def api(pg):
    client = PostgREST(pg.dsn(user="authenticator"))
    yield client
    client.close()


def event(n):
    """An event the intake stores (a customer not known to be ours: ignored
    when applied, which is beside the point here)."""
    return {"id": f"evt_backup_{n}", "object": "event", "type": "customer.created", "api_version": "2024-06-20",
            "created": int(time.time()), "livemode": False,
            "data": {"object": {"id": f"cus_backup_{n}", "object": "customer", "email": "x@example.test",
                                "metadata": {}}}}


def post(api, body, header):
    return api.post("/rpc/stripe_webhook", body=body,
                    headers={"Content-Type": "application/json", "Stripe-Signature": header})


def secrets(pg):
    return dict(pg.sql("SELECT url, secret FROM billing.stripe_secrets WHERE mode = 'test' AND kind = 'webhook'"))


def test_setup_makes_both_endpoints_once(pg, fake):
    r = setup_command(pg, "--setup-webhook", "--setup-backup-webhook", BACKUP)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "== setup-backup-webhook" in r.stdout and f"created webhook endpoint" in r.stdout, r.stdout
    endpoints = {w["url"]: w for w in fake.of_type("webhook_endpoint")}
    assert set(endpoints) == {PRIMARY, BACKUP}
    assert sorted(endpoints[PRIMARY]["enabled_events"]) == sorted(endpoints[BACKUP]["enabled_events"])
    assert len(endpoints[BACKUP]["enabled_events"]) == 23
    kept = secrets(pg)
    assert set(kept) == {PRIMARY, BACKUP} and kept[PRIMARY] != kept[BACKUP]
    assert pg.sql("SELECT url, is_primary FROM billing.webhook_endpoints ORDER BY url") == \
        [(PRIMARY, True), (BACKUP, False)]
    # re-runnable: a second run finds both and creates nothing
    creates = dict(fake.creates)
    r = setup_command(pg, "--setup-webhook", "--setup-backup-webhook", BACKUP)
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.creates == creates and "created" not in r.stdout, r.stdout
    assert secrets(pg) == kept


def test_bad_backup_urls_are_refused(pg):
    for url, why in ((PRIMARY, "is the primary's"), ("http://zone-b.example.test/hook", "not an https URL"),
                     ("https://", "not an https URL")):
        r = setup_command(pg, "--setup-backup-webhook", url)
        assert r.returncode == 1 and why in r.stderr, (url, r.stdout, r.stderr)
    r = setup_command(pg, "--setup-backup-webhook")
    assert r.returncode == 2 and "takes a URL" in r.stderr


def test_each_endpoint_is_accepted_and_an_event_is_stored_once(pg, api):
    kept = secrets(pg)
    ev = event(1)
    for url in (PRIMARY, BACKUP, BACKUP, PRIMARY):      # both endpoints, each twice (Stripe's retries)
        body, header = signed(ev, kept[url])
        r = post(api, body, header)
        assert r.status == 200, (url, r.body)
    assert pg.sql("SELECT count(*) FROM billing.webhook_events WHERE stripe_event_id = 'evt_backup_1'")[0][0] == 1
    # a delivery signed with no kept secret is refused
    body, header = signed(event(2), "whsec_" + "0" * 32)
    assert post(api, body, header).status != 200
    assert pg.sql("SELECT count(*) FROM billing.webhook_events WHERE stripe_event_id = 'evt_backup_2'")[0][0] == 0


def test_rotating_one_endpoint_leaves_the_other(pg, api):
    kept = secrets(pg)
    backup_id = pg.sql("SELECT endpoint FROM billing.webhook_endpoints WHERE url = %s", (BACKUP,))[0][0]
    new = "whsec_rotatedBackupSecret0123456789"
    pg.sql("SELECT billing.set_webhook_secret(%s, %s)", (backup_id, new))
    now = secrets(pg)
    assert now[BACKUP] == new and now[PRIMARY] == kept[PRIMARY]
    # the rotation is audited, never with the secret
    details = pg.sql("SELECT details::text FROM billing.audit_log WHERE action = 'webhook.secret_rotated'")
    assert len(details) == 1 and backup_id in details[0][0] and "whsec_" not in details[0][0]

    results = {}
    for n, (name, secret) in enumerate((("primary", kept[PRIMARY]), ("backup_new", new),
                                        ("backup_old", kept[BACKUP])), start=10):
        body, header = signed(event(n), secret)
        results[name] = post(api, body, header).status
    assert results == {"primary": 200, "backup_new": 200, "backup_old": results["backup_old"]}
    assert results["backup_old"] != 200, results
    # Stripe signs with both secrets while the old one has not expired: accepted
    ev = event(20)
    body, h_old = signed(ev, kept[BACKUP])
    _, h_new = signed(ev, new)
    assert post(api, body, h_old + "," + h_new.split(",", 1)[1]).status == 200


def test_rotation_refuses_bad_input_and_changes_nothing(pg):
    before = secrets(pg)
    audits = pg.sql("SELECT count(*) FROM billing.audit_log")[0][0]
    for endpoint, secret, state in (("we_nope", "whsec_abcdefgh12345", "P0002"),
                                    (None, "whsec_abcdefgh12345", "P0002"),
                                    ("we_x", "sk_test_notasecret", "22023"),
                                    ("we_x", None, "22023")):
        with pytest.raises(Exception) as e:
            pg.sql("SELECT billing.set_webhook_secret(%s, %s)", (endpoint, secret))
        assert e.value.sqlstate == state, (endpoint, e.value)
    assert secrets(pg) == before
    assert pg.sql("SELECT count(*) FROM billing.audit_log")[0][0] == audits
    # superusers only, like the table
    assert pg.sql("SELECT has_function_privilege('qes_admin', 'billing.set_webhook_secret(text, text)', 'EXECUTE')") \
        == [(False,)]
