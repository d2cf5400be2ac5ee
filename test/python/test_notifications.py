"""Notifications delivered (src/notify.c, sql/install/89_notify.sql): the
worker sends each billing.notifications row by email to a real SMTP server
(aiosmtpd) and as a signed event to an HTTP receiver that verifies the
signature with Stripe's own library, both on the loopback.  Faults: SMTP
4xx and 5xx, connection refused, a server that never answers, HTTP 5xx, and
a crash of the worker between sending and recording.

Every cluster here runs at a fixed date through the billing clock (AT,
Dec 31 in the evening: a Free tenant's period ends at midnight, with the
year), and the rows the tests write carry billing.now(), so no test depends
on the day it runs.
"""
import os
import re
import signal
import tempfile
import time
from datetime import datetime, timezone

import psycopg
import pytest

from notify_sinks import (BlackHole, SmtpSink, WebhookReceiver, free_port, parts, self_signed_cert,
                          server_tls_context)
from pgcluster import Cluster

SECRET = "nwhsec_pytest_platform_signing_secret"
SMTP_PASSWORD = "smtp-pw-never-shown-4711"
FROM = "QES Billing <billing@qes.example>"
OPERATORS = "ops@qes.example"
AT = datetime(2027, 12, 31, 22, 0, tzinfo=timezone.utc)


def base_conf(smtp, hook, **extra):
    conf = {
        "qes_billing.smtp_url": f"'{smtp.url}'",
        "qes_billing.smtp_starttls": "'off'",
        "qes_billing.notify_from": f"'{FROM}'",
        "qes_billing.notify_operator_email": f"'{OPERATORS}'",
        "qes_billing.notify_webhook_url": f"'{hook.url}'",
        "qes_billing.notify_webhook_secret": f"'{SECRET}'",
        "qes_billing.notify_retry_base_delay": "'50ms'",
        "qes_billing.notify_retry_max_delay": "'400ms'",
        "qes_billing.notify_max_attempts": "4",
        "qes_billing.notify_timeout": "'1s'",
        "qes_billing.worker_naptime": "'200ms'",
        "shared_preload_libraries": "'qes_billing,pg_stat_statements'",
        "pg_stat_statements.track": "all",
    }
    conf.update(extra)
    return conf


def start_cluster(name, smtp, hook, **extra):
    c = Cluster(name, env={"QES_BASE_URL": "https://sign.example.test"}, conf=base_conf(smtp, hook, **extra)).start()
    assert c.wait_until("SELECT alive FROM billing.worker_status"), c.log()
    c.sql("CREATE EXTENSION pg_stat_statements")
    c.set_clock(AT)
    return c


@pytest.fixture(scope="module")
def sinks():
    smtp = SmtpSink().start()
    hook = WebhookReceiver(SECRET).start()
    yield smtp, hook
    smtp.stop()
    hook.stop()


@pytest.fixture(scope="module")
def pg(sinks):
    from conftest import amcheck_and_stop
    c = start_cluster("notify", *sinks)
    yield c
    amcheck_and_stop(c)


@pytest.fixture(autouse=True)
def clean_sinks(sinks):
    smtp, hook = sinks
    for s in (smtp, hook):
        s.hold_seconds = 0
    smtp.rcpt_replies, smtp.data_replies, smtp.reply_for = [], [], {}
    hook.statuses = []
    yield


def reconfigure(pg, **settings):
    """ALTER SYSTEM and reload; the worker takes it at its next loop."""
    with pg.connect(autocommit=True) as c:
        for k, v in settings.items():
            if v is None:
                c.execute(f"ALTER SYSTEM RESET qes_billing.{k}")
            else:
                c.execute(f"ALTER SYSTEM SET qes_billing.{k} = '{v}'")
        c.execute("SELECT pg_reload_conf()")
    time.sleep(0.7)


def wait_state(pg, tenant, state, count=1, timeout=20):
    ok = pg.wait_until(f"SELECT count(*) >= {count} FROM billing.notifications "
                       f"WHERE tenant_id = '{tenant}' AND state = '{state}'", timeout)
    assert ok, pg.sql(f"SELECT notification_id, kind, state, attempts, last_error, skip_reason "
                      f"FROM billing.notifications WHERE tenant_id = '{tenant}'") + [pg.log()[-2000:]]


def row(pg, tenant, kind):
    rows = pg.sql("SELECT notification_id, state, attempts, event_id, last_error, skip_reason, sent_at, delivered "
                  "FROM billing.notifications WHERE tenant_id = %s AND kind = %s ORDER BY notification_id",
                  (tenant, kind))
    keys = ("id", "state", "attempts", "event_id", "last_error", "skip_reason", "sent_at", "delivered")
    return [dict(zip(keys, r)) for r in rows]


def mails_for(smtp, event_id):
    return [m for m in smtp.messages if m["msg"]["X-QES-Event-Id"] == event_id]


def hooks_for(hook, event_id):
    return [r for r in hook.requests if r["headers"].get("QES-Event-Id") == event_id]


# ---- delivered -------------------------------------------------------------

def test_usage_thresholds_by_email_and_webhook(pg, sinks):
    smtp, hook = sinks
    pg.sql("SELECT billing.upsert_tenant('u1', 'Signing & Sons <GmbH>', 'billing@u1.example')")
    pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage('u1', 'signatures', 1, 'u1-' || i)")
    wait_state(pg, "u1", "sent")
    [n80] = row(pg, "u1", "usage.threshold")
    assert n80["attempts"] == 1 and n80["sent_at"] is not None and set(n80["delivered"]) == {"email", "webhook"}

    [m] = mails_for(smtp, n80["event_id"])
    msg = m["msg"]
    assert m["rcpt_tos"] == ["billing@u1.example"] and m["mail_from"] == "billing@qes.example"
    assert msg["To"].addresses[0].addr_spec == "billing@u1.example" and b"\r\nTo: <billing@u1.example>\r\n" in m["raw"]
    assert msg["From"].addresses[0].display_name == "QES Billing" and msg["From"].addresses[0].addr_spec == "billing@qes.example"
    assert msg["Subject"] == "80 % of your signatures used (Free plan)"
    assert msg["Message-ID"] == f"<{n80['event_id']}@qes.example>"
    assert msg["Auto-Submitted"] == "auto-generated" and msg["Date"]
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    text, html = parts(msg)
    # what happened, what it means for the limits, what to do; dates in UTC
    assert "Signing & Sons <GmbH> has used 8 of the 10 signatures included in the Free plan" in text
    assert "Nothing is limited" in text and "Upgrade to Professional for 100 signatures per period" in text
    assert "renew on 1 January 2028, 00:00 UTC" in text        # Free: the next calendar month (UTC)
    assert "Upgrade to Professional: https://sign.example.test/billing" in text
    assert "Signing &amp; Sons &lt;GmbH&gt;" in html and "<GmbH>" not in html
    assert '<a href="https://sign.example.test/billing"' in html

    [r] = hooks_for(hook, n80["event_id"])
    assert r["verified"], r["error"]
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", r["headers"]["QES-Signature"])
    ev = r["event"]
    assert ev["id"] == n80["event_id"] and ev["type"] == "usage.threshold" and ev["object"] == "event"
    obj = ev["data"]["object"]
    assert obj["tenant_id"] == "u1" and obj["payload"]["threshold_percent"] == 80 and obj["payload"]["total"] == 8
    assert obj["subject"] == msg["Subject"] and obj["text"].startswith("You have used 80 %")

    # 100 %: its own notification, once, with what that means
    pg.sql("SELECT count(*) FROM generate_series(9, 11) i, billing.record_usage('u1', 'signatures', 1, 'u1-' || i)")
    wait_state(pg, "u1", "sent", 2)
    n100 = row(pg, "u1", "usage.threshold")[1]
    [m100] = mails_for(smtp, n100["event_id"])
    assert m100["msg"]["Subject"] == "100 % of your signatures used (Free plan)"
    assert "You have reached your plan's limit" in parts(m100["msg"])[0]
    assert len(hooks_for(hook, n100["event_id"])) == 1


def test_every_kind_says_what_happened_and_what_to_do(pg, sinks):
    smtp, hook = sinks
    pg.sql("SELECT billing.upsert_tenant('k1', 'Kind AG', 'billing@k1.example')")
    sub = pg.sql("""INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, stripe_subscription_id,
                      current_period_start, current_period_end, grace_until, stripe_state_at)
                    VALUES ('k1', 'professional', 'month', 'past_due', 'sub_k1', billing.now() - interval '10 days',
                            billing.now() + interval '20 days', '2031-03-07 09:30:00+00', billing.now())
                    RETURNING subscription_id""")[0][0]
    pg.sql("""INSERT INTO billing.invoices (tenant_id, stripe_invoice_id, subscription_id, number, status, amount_due,
                amount_remaining, currency, hosted_invoice_url, stripe_created)
              VALUES ('k1', 'in_k1', %s, 'QES-0042', 'open', 4900, 4900, 'eur',
                      'https://invoice.stripe.com/i/acct_1/test_k1', billing.now())""", (sub,))
    # as billing.apply_event_ex queues it (85_events.sql)
    pg.sql("""INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
              VALUES ('k1', 'payment.failed', 'payment_failed:in_k1', '{"invoice": "in_k1", "amount_due": 4900}')""")
    wait_state(pg, "k1", "sent")
    [pf] = row(pg, "k1", "payment.failed")
    [m] = mails_for(smtp, pf["event_id"])
    assert m["msg"]["Subject"] == "Payment of EUR 49.00 failed: please pay by 7 March 2031, 09:30 UTC"
    text = parts(m["msg"])[0]
    assert "The payment of EUR 49.00 for invoice QES-0042 of Kind AG failed." in text
    assert "Your Professional limits stay during a grace period until 7 March 2031, 09:30 UTC" in text
    assert "the Free plan's limits apply (10 signatures" in text
    assert "Pay invoice QES-0042: https://invoice.stripe.com/i/acct_1/test_k1" in text

    # the grace period ends: limits fall to Free's, the tenant is told once (and it is audited)
    pg.sql("UPDATE billing.subscriptions SET grace_until = billing.now() - interval '1 minute' WHERE tenant_id = 'k1'")
    wait_state(pg, "k1", "sent", 2)
    [ge] = row(pg, "k1", "grace.ended")
    [m] = mails_for(smtp, ge["event_id"])
    assert m["msg"]["Subject"] == "Your grace period has ended: Free plan limits apply"
    text = parts(m["msg"])[0]
    assert "The Professional limits no longer apply to Kind AG" in text and "10 signatures" in text
    assert pg.sql("SELECT plan_id FROM billing.check_limit('k1', 'signatures')")[0][0] == "free"
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'dunning.grace_ended' AND tenant_id = 'k1'")[0][0] == 1
    time.sleep(0.5)
    assert len(row(pg, "k1", "grace.ended")) == 1

    # paid: recovered
    pg.sql("UPDATE billing.invoices SET status = 'paid', amount_paid = 4900, amount_remaining = 0 WHERE tenant_id = 'k1'")
    pg.sql("UPDATE billing.subscriptions SET status = 'active', grace_until = NULL WHERE tenant_id = 'k1'")
    wait_state(pg, "k1", "sent", 3)
    [pr] = row(pg, "k1", "payment.recovered")
    [m] = mails_for(smtp, pr["event_id"])
    assert m["msg"]["Subject"] == "Payment received: your Professional plan is fully restored"
    assert "We received EUR 49.00 for invoice QES-0042" in parts(m["msg"])[0]
    assert "100 signatures" in parts(m["msg"])[0]

    # the operators' dispute alert goes to the operators' address
    pg.sql("""INSERT INTO billing.notifications (tenant_id, kind, audience, dedup_key, payload)
              VALUES ('k1', 'dispute.created', 'operator', 'dispute:dp_k1',
                      '{"dispute": "dp_k1", "charge": "ch_k1", "amount": 1234, "currency": "eur", "reason": "fraudulent"}')""")
    wait_state(pg, "k1", "sent", 4)
    [dp] = row(pg, "k1", "dispute.created")
    [m] = mails_for(smtp, dp["event_id"])
    assert m["rcpt_tos"] == [OPERATORS]
    assert m["msg"]["Subject"] == "[QES billing] Dispute of EUR 12.34 by tenant k1"
    assert "reason: fraudulent" in parts(m["msg"])[0]
    assert "https://dashboard.stripe.com/test/disputes/dp_k1" in parts(m["msg"])[0]
    assert hooks_for(hook, dp["event_id"])[0]["event"]["data"]["object"]["audience"] == "operator"

    # a trial that ends soon
    pg.sql("SELECT billing.upsert_tenant('k2', 'Trial GmbH', 'billing@k2.example')")
    pg.sql("""INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, stripe_subscription_id,
                stripe_price_id, current_period_start, current_period_end, trial_end, stripe_state_at)
              VALUES ('k2', 'professional', 'year', 'trialing', 'sub_k2', NULL, billing.now(), billing.now() + interval '14 days',
                      '2031-01-15 12:00:00+00', billing.now())""")
    pg.sql("""INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)
              VALUES ('k2', 'subscription.trial_will_end', 'trial_will_end:sub_k2',
                      '{"subscription": "sub_k2", "trial_end": "2031-01-15T12:00:00+00:00"}')""")
    wait_state(pg, "k2", "sent")
    [tw] = row(pg, "k2", "subscription.trial_will_end")
    [m] = mails_for(smtp, tw["event_id"])
    assert m["msg"]["Subject"] == "Your Professional trial ends on 15 January 2031, 12:00 UTC"
    assert "goes on at USD 290.00 per year" in parts(m["msg"])[0]


def test_skipped_when_it_no_longer_applies(pg, sinks):
    smtp, hook = sinks
    reconfigure(pg, worker_paused="on")
    try:
        pg.sql("SELECT billing.upsert_tenant('s1', 'Skip KG', 'billing@s1.example')")
        sub = pg.sql("""INSERT INTO billing.subscriptions (tenant_id, plan_id, billing_interval, status, stripe_subscription_id,
                          current_period_start, current_period_end, trial_end, stripe_state_at)
                        VALUES ('s1', 'professional', 'month', 'trialing', 'sub_s1', billing.now(), billing.now() + interval '30 days',
                                billing.now() + interval '3 days', billing.now())
                        RETURNING subscription_id""")[0][0]
        pg.sql("""INSERT INTO billing.invoices (tenant_id, stripe_invoice_id, subscription_id, number, status, amount_due,
                    currency, stripe_created)
                  VALUES ('s1', 'in_s1', %s, 'QES-0100', 'open', 2900, 'usd', billing.now())""", (sub,))
        pg.sql("""INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload) VALUES
                    ('s1', 'payment.failed', 'payment_failed:in_s1', '{"invoice": "in_s1", "amount_due": 2900}'),
                    ('s1', 'subscription.trial_will_end', 'trial_will_end:sub_s1', '{"subscription": "sub_s1"}')""")
        # meanwhile: the invoice is paid, the trial converted
        pg.sql("UPDATE billing.invoices SET status = 'paid' WHERE stripe_invoice_id = 'in_s1'")
        pg.sql("UPDATE billing.subscriptions SET status = 'active' WHERE tenant_id = 's1'")
    finally:
        reconfigure(pg, worker_paused=None)
    wait_state(pg, "s1", "skipped", 2)
    [pf] = row(pg, "s1", "payment.failed")
    [tw] = row(pg, "s1", "subscription.trial_will_end")
    assert pf["skip_reason"] == "invoice QES-0100 was paid meanwhile" and pf["attempts"] == 0
    assert tw["skip_reason"] == "the subscription is active, no longer in its trial"
    assert not mails_for(smtp, pf["event_id"]) and not hooks_for(hook, pf["event_id"])


# ---- faults ----------------------------------------------------------------

def test_smtp_4xx_is_retried_with_backoff(pg, sinks):
    smtp, hook = sinks
    smtp.data_replies = ["451 4.3.0 Mail server temporarily rejected message", "421 4.7.0 Try again later"]
    pg.sql("SELECT billing.upsert_tenant('r1', 'Retry SE', 'billing@r1.example')")
    pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage('r1', 'signatures', 1, 'r1-' || i)")
    wait_state(pg, "r1", "sent")
    [n] = row(pg, "r1", "usage.threshold")
    assert n["attempts"] == 3 and "SMTP reply 421" in n["last_error"], n
    assert len(mails_for(smtp, n["event_id"])) == 1
    # the webhook delivered at the first attempt and was not sent again
    assert len(hooks_for(hook, n["event_id"])) == 1


def test_smtp_5xx_fails_for_good_then_replay(pg, sinks):
    smtp, hook = sinks
    smtp.reply_for = {"billing@f1.example": "550 5.1.1 Mailbox unavailable"}
    pg.sql("SELECT billing.upsert_tenant('f1', 'Fail Ltd', 'billing@f1.example')")
    pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage('f1', 'signatures', 1, 'f1-' || i)")
    wait_state(pg, "f1", "failed")
    [n] = row(pg, "f1", "usage.threshold")
    assert n["attempts"] == 1 and "SMTP reply 550" in n["last_error"] and list(n["delivered"]) == ["webhook"], n
    # operators see it, and the failure is audited
    with pg.connect() as c:
        c.execute("SET ROLE qes_admin")
        [(kind, err)] = c.execute("SELECT kind, last_error FROM billing.notification_failures "
                                  "WHERE tenant_id = 'f1'").fetchall()
        assert kind == "usage.threshold" and "550" in err
        c.rollback()
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'notification.failed' AND tenant_id = 'f1'")[0][0] == 1

    # the mailbox is fixed; an operator replays it (audited); only the email goes again
    smtp.reply_for = {}
    with pg.connect() as c:
        c.execute("SET ROLE qes_admin")
        assert c.execute("SELECT billing.replay_notification('f1', %s)", (n["id"],)).fetchone()[0] == 1
        c.commit()
    wait_state(pg, "f1", "sent")
    assert len(mails_for(smtp, n["event_id"])) == 1 and len(hooks_for(hook, n["event_id"])) == 1
    assert pg.sql("SELECT details ->> 'notification_id' FROM billing.audit_log "
                  "WHERE action = 'notification.replayed' AND tenant_id = 'f1'")[0][0] == str(n["id"])
    with pytest.raises(psycopg.errors.NoDataFound):
        pg.sql("SELECT billing.replay_notification('f1', %s)", (n["id"],))


def test_connection_refused_and_timeouts_fail_after_the_attempts(pg, sinks):
    smtp, hook = sinks
    hole = BlackHole().start()
    closed = free_port()
    pg.sql("SELECT billing.upsert_tenant('c1', 'Refused BV', 'billing@c1.example')")
    pg.sql("SELECT billing.upsert_tenant('c2', 'Silent OY', 'billing@c2.example')")
    with pg.connect(autocommit=True) as c:
        c.execute(f"ALTER SYSTEM SET qes_billing.smtp_password = '{SMTP_PASSWORD}'")
    reconfigure(pg, smtp_url=f"smtp://127.0.0.1:{closed}", smtp_username="qes", notify_webhook_url=None)
    try:
        pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage('c1', 'signatures', 1, 'c1-' || i)")
        wait_state(pg, "c1", "failed")
        [n] = row(pg, "c1", "usage.threshold")
        assert n["attempts"] == 4 and "Couldn't connect to server" in n["last_error"], n

        reconfigure(pg, smtp_url=f"smtp://127.0.0.1:{hole.port}", notify_timeout="500ms")
        started = time.time()
        pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage('c2', 'signatures', 1, 'c2-' || i)")
        wait_state(pg, "c2", "failed", timeout=30)
        [n2] = row(pg, "c2", "usage.threshold")
        assert n2["attempts"] == 4 and "Timeout was reached" in n2["last_error"], n2
        assert time.time() - started >= 4 * 0.5
        # the password never reaches a row, the audit log or the server log
        dump = str(pg.sql("SELECT array_agg(to_jsonb(n)) FROM billing.notifications n")) + \
            str(pg.sql("SELECT array_agg(details) FROM billing.audit_log"))
        assert SMTP_PASSWORD not in dump and SMTP_PASSWORD not in pg.log()
    finally:
        with pg.connect(autocommit=True) as c:
            c.execute("ALTER SYSTEM RESET qes_billing.smtp_password")
        reconfigure(pg, smtp_url=smtp.url, smtp_username=None, notify_timeout=None, notify_webhook_url=hook.url)
        hole.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_starttls_and_tls_with_authentication(pg, sinks):
    smtp, hook = sinks
    cert, key = self_signed_cert(tempfile.mkdtemp(prefix="qes-tls-"))
    starttls = SmtpSink(starttls_context=server_tls_context(cert, key), logins={"qes": SMTP_PASSWORD}).start()
    implicit = SmtpSink(implicit_tls_context=server_tls_context(cert, key), logins={"qes": SMTP_PASSWORD}).start()
    no_tls = SmtpSink().start()

    def queue(tenant):
        pg.sql("SELECT billing.upsert_tenant(%s, 'TLS AG', %s)", (tenant, f"billing@{tenant}.example"))
        pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage(%s, 'signatures', 1, %s || i)",
               (tenant, tenant))

    with pg.connect(autocommit=True) as c:
        c.execute(f"ALTER SYSTEM SET qes_billing.smtp_password = '{SMTP_PASSWORD}'")
    try:
        # STARTTLS (required), then AUTH over TLS, the server's certificate checked against our CA
        reconfigure(pg, smtp_url=starttls.url, smtp_starttls="require", smtp_username="qes", notify_ca_file=cert,
                    notify_webhook_url=None)
        queue("tls1")
        wait_state(pg, "tls1", "sent")
        [m] = starttls.messages
        assert m["tls"] and m["authenticated"] and starttls.auth_attempts == [
            {"mechanism": starttls.auth_attempts[0]["mechanism"], "login": "qes", "ok": True}]
        assert parts(m["msg"])[0].startswith("You have used 80 %")

        # TLS from the first byte (smtps://)
        reconfigure(pg, smtp_url=implicit.url)
        queue("tls2")
        wait_state(pg, "tls2", "sent")
        [m] = implicit.messages
        assert m["tls"] and m["authenticated"]

        # STARTTLS required, but the server does not offer it: nothing goes in clear text
        reconfigure(pg, smtp_url=no_tls.url)
        queue("tls3")

        wait_state(pg, "tls3", "failed")
        [n] = row(pg, "tls3", "usage.threshold")
        assert n["attempts"] == 4 and "STARTTLS" in n["last_error"] and no_tls.messages == [], n

        # a certificate nobody vouches for is refused
        reconfigure(pg, smtp_url=starttls.url, notify_ca_file=None)
        queue("tls4")
        wait_state(pg, "tls4", "failed")
        [n] = row(pg, "tls4", "usage.threshold")
        assert "certificate" in n["last_error"] and len(starttls.messages) == 1, n

        # a wrong password is refused (and retried: it is the operator's to fix), never recorded
        with pg.connect(autocommit=True) as c:
            c.execute("ALTER SYSTEM SET qes_billing.smtp_password = 'wrong-password-9876'")
        reconfigure(pg, notify_ca_file=cert)
        queue("tls5")
        wait_state(pg, "tls5", "failed")
        [n] = row(pg, "tls5", "usage.threshold")
        assert n["attempts"] == 4 and "Login denied" in n["last_error"], n
        assert starttls.auth_attempts[-1] == {"mechanism": starttls.auth_attempts[-1]["mechanism"], "login": "qes",
                                              "ok": False}
        everything = str(pg.sql("SELECT array_agg(to_jsonb(n)) FROM billing.notifications n")) + \
            str(pg.sql("SELECT array_agg(details) FROM billing.audit_log")) + pg.log()
        assert "wrong-password-9876" not in everything and SMTP_PASSWORD not in everything
    finally:
        with pg.connect(autocommit=True) as c:
            c.execute("ALTER SYSTEM RESET qes_billing.smtp_password")
        reconfigure(pg, smtp_url=smtp.url, smtp_starttls="off", smtp_username=None, notify_ca_file=None,
                    notify_webhook_url=hook.url)
        for s in (starttls, implicit, no_tls):
            s.stop()


def test_webhook_retried_with_the_same_id_and_verified(pg, sinks):
    smtp, hook = sinks
    hook.statuses = [500, 503]
    pg.sql("SELECT billing.upsert_tenant('w1', 'Hook SAS', 'billing@w1.example')")
    pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage('w1', 'signatures', 1, 'w1-' || i)")
    wait_state(pg, "w1", "sent")
    [n] = row(pg, "w1", "usage.threshold")
    reqs = hooks_for(hook, n["event_id"])
    assert len(reqs) == 3 and n["attempts"] == 3 and n["last_error"] == "webhook: HTTP 503 from the platform"
    assert all(r["verified"] for r in reqs)
    assert {r["event"]["id"] for r in reqs} == {n["event_id"]}
    assert len({r["body"] for r in reqs}) == 1          # the same event every time
    # a receiver that deduplicates by id keeps one
    assert sum(1 for i in hook.events() if i == n["event_id"]) == 1
    # the email went once, at the first attempt
    assert len(mails_for(smtp, n["event_id"])) == 1
    # a forged or tampered delivery would not verify
    ok, _ = hook.verify(reqs[0]["body"] + b" ", reqs[0]["headers"]["QES-Signature"])
    assert not ok


# ---- operations --------------------------------------------------------------

def test_idle_runs_no_claim(pg, sinks):
    smtp, hook = sinks
    claims = ("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
              "WHERE query LIKE '%billing.notify_claim(%' AND query NOT LIKE '%pg_stat_statements%'")
    time.sleep(1.0)
    before = pg.sql(claims)[0][0]
    time.sleep(2.0)                # ten naptimes
    assert pg.sql(claims)[0][0] == before, (
        pg.sql("SELECT state, count(*), min(next_attempt_at) - now() FROM billing.notifications GROUP BY 1"),
        pg.sql("SELECT billing.notify_next_due(), wake_requests FROM billing.worker_state()"),
        pg.sql("SELECT query, calls FROM pg_stat_statements ORDER BY calls DESC LIMIT 8"))
    # something queued wakes it
    pg.sql("SELECT billing.upsert_tenant('i1', 'Idle AB', 'billing@i1.example')")
    pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage('i1', 'signatures', 1, 'i1-' || i)")
    wait_state(pg, "i1", "sent")
    assert pg.sql(claims)[0][0] > before


def test_stripe_requests_wake_no_notification_claim(pg, sinks):
    """A commit that only queued Stripe requests wakes the worker for the
    outbox; the notification pump does not claim for it (a transaction per
    Stripe request, before: it claimed on every wake-up)."""
    claims = ("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
              "WHERE query LIKE '%billing.notify_claim(%' AND query NOT LIKE '%pg_stat_statements%'")
    time.sleep(1.0)
    before = pg.sql(claims)[0][0]
    wakes = pg.sql("SELECT wake_requests FROM billing.worker_state()")[0][0]
    for _ in range(10):
        pg.sql("SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers', '{}')")
        time.sleep(0.05)
    time.sleep(0.5)
    assert pg.sql("SELECT wake_requests FROM billing.worker_state()")[0][0] >= wakes + 10
    assert pg.sql(claims)[0][0] == before
    pg.sql("DELETE FROM billing.stripe_requests WHERE kind = 'test.customer'")


def test_channels_and_secrets(pg, sinks):
    smtp, hook = sinks
    rows = {r[0]: r for r in pg.sql("SELECT * FROM billing.notify_channels()")}
    assert rows["email"][1] and rows["webhook"][1] and rows["webhook"][2] == hook.url
    assert pg.sql("SHOW qes_billing.notify_webhook_secret")[0][0] == "(set)"
    assert pg.sql("SELECT count(*) FROM pg_settings WHERE name IN "
                  "('qes_billing.notify_webhook_secret', 'qes_billing.smtp_password')")[0][0] == 0
    with pytest.raises(psycopg.errors.CantChangeRuntimeParam):
        pg.sql("ALTER ROLE postgres SET qes_billing.smtp_password = 'stored-where-all-can-read'")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        pg.sql("ALTER SYSTEM SET qes_billing.smtp_url = 'smtp://user:pw-in-url@mail.example'")
    assert "pw-in-url" not in str(e.value)
    with pg.connect() as c:
        c.execute("SET ROLE qes_admin")
        for r in c.execute("SELECT * FROM billing.notify_channels()").fetchall():
            assert SECRET not in str(r)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SHOW qes_billing.notify_webhook_secret")
        c.rollback()
    # clear text to a server that is not the loopback is refused
    reconfigure(pg, smtp_url="smtp://mail.example.com:587")
    try:
        problem = pg.sql("SELECT problem FROM billing.notify_channels() WHERE channel = 'email'")[0][0]
        assert "not the loopback" in problem
    finally:
        reconfigure(pg, smtp_url=smtp.url)


# ---- a crash between sending and recording -----------------------------------

def test_crash_between_sending_and_recording(sinks):
    smtp, hook = sinks
    pg = start_cluster("notify_crash", smtp, hook)
    try:
        tenants = [f"x{i}" for i in range(5)]
        for t in tenants:
            pg.sql("SELECT billing.upsert_tenant(%s, 'Crash Test', %s)", (t, f"billing@{t}.example"))
            pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage(%s, 'signatures', 1, %s || i)",
                   (t, t + "-"))
        assert pg.wait_until("SELECT count(*) = 5 FROM billing.notifications WHERE state = 'sent'", 20)
        sent_before = {r[0] for r in pg.sql("SELECT event_id FROM billing.notifications")}
        mails_before = len(smtp.messages)

        # the next one is received by the SMTP server, which holds its answer:
        # the worker dies before it can record that it was sent
        smtp.hold_seconds = 30
        pg.sql("SELECT billing.upsert_tenant('xc', 'Crash Test', 'billing@xc.example')")
        pg.sql("SELECT count(*) FROM generate_series(1, 8) i, billing.record_usage('xc', 'signatures', 1, 'xc-' || i)")
        assert smtp.wait_for(mails_before + 1, 20)
        [(event_id, state)] = pg.sql("SELECT event_id, state FROM billing.notifications WHERE tenant_id = 'xc'")
        assert state == "in_flight"
        pid = pg.sql("SELECT pid FROM billing.worker_status")[0][0]
        os.kill(pid, signal.SIGKILL)
        smtp.hold_seconds = 0
        time.sleep(1.0)                      # the postmaster restarts everything
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if pg.sql("SELECT state FROM billing.notifications WHERE tenant_id = 'xc'")[0][0] == "sent":
                    break
            except psycopg.Error:
                pass
            time.sleep(0.1)
        [(state, attempts)] = pg.sql("SELECT state, attempts FROM billing.notifications WHERE tenant_id = 'xc'")
        assert state == "sent" and attempts == 2
        assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE action = 'worker.reclaimed' "
                      "AND details ? 'notifications'")[0][0] == 1

        # at least once: the one in flight twice, with the same id; nothing else again
        by_event = smtp.by_event()
        assert len(by_event[event_id]) == 2
        assert len({m["msg"]["Message-ID"] for m in by_event[event_id]}) == 1
        assert all(len(by_event[e]) == 1 for e in sent_before)
        assert set(by_event) >= sent_before | {event_id}
        # the platform too: one verified event per id
        assert all(len(hooks_for(hook, e)) == 1 for e in sent_before)
        assert set(hook.events()) >= sent_before | {event_id}
    finally:
        from conftest import amcheck_and_stop
        amcheck_and_stop(pg)


# ---- figures -------------------------------------------------------------------

def worker_cpu(pid):
    """CPU seconds (user + system) the worker process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_throughput_and_latency(sinks, capsys):
    """Figures for the README: notifications delivered per second (email and
    webhook each) from a burst, and the latency from the commit that queued
    one to its delivery on an idle system."""
    smtp, hook = sinks
    pg = start_cluster("notify_bench", smtp, hook)
    try:
        n = 500
        pg.sql("SELECT billing.upsert_tenant('b' || i, 'Bench ' || i, 'billing@b' || i || '.example') "
               "FROM generate_series(1, %s) i", (n,))
        time.sleep(0.5)
        pid = pg.sql("SELECT pid FROM billing.worker_status")[0][0]
        cpu_before = worker_cpu(pid)
        # one transaction queues n threshold notifications (8 signatures each)
        with pg.connect() as c:
            c.execute("SELECT count(*) FROM generate_series(1, %s) t, generate_series(1, 8) i, "
                      "LATERAL billing.record_usage('b' || t, 'signatures', 1, 'b' || t || '-' || i)", (n,))
            committed = c.execute("SELECT clock_timestamp()").fetchone()[0]
            c.commit()
        assert pg.wait_until(f"SELECT count(*) = {n} FROM billing.notifications WHERE state = 'sent'", 120)
        last = pg.sql("SELECT max(sent_at) FROM billing.notifications")[0][0]
        burst_s = (last - committed).total_seconds()
        rate = n / burst_s
        cpu_ms = (worker_cpu(pid) - cpu_before) * 1000 / n

        # latency after the triggering commit, one at a time
        lat = []
        for i in range(20):
            t = f"l{i}"
            pg.sql("SELECT billing.upsert_tenant(%s, 'Latency', %s)", (t, f"billing@{t}.example"))
            time.sleep(0.3)
            with pg.connect() as c:
                c.execute("SELECT count(*) FROM generate_series(1, 8) i, "
                          "billing.record_usage(%s, 'signatures', 1, %s || i)", (t, t))
                at = c.execute("SELECT clock_timestamp()").fetchone()[0]
                c.commit()
            assert pg.wait_until(f"SELECT state = 'sent' FROM billing.notifications WHERE tenant_id = '{t}'", 10)
            lat.append((pg.sql("SELECT sent_at FROM billing.notifications WHERE tenant_id = %s", (t,))[0][0]
                        - at).total_seconds())
        lat.sort()
        with capsys.disabled():
            print(f"\nnotifications: {n} delivered (email + signed webhook each) in {burst_s:.2f} s after one commit: "
                  f"{rate:.0f}/s (the worker's CPU: {cpu_ms:.1f} ms per notification; the sinks share one "
                  f"Python process); latency commit -> delivered on an idle worker: "
                  f"p50={lat[len(lat) // 2] * 1000:.0f} ms max={lat[-1] * 1000:.0f} ms")
    finally:
        from conftest import amcheck_and_stop
        amcheck_and_stop(pg)
