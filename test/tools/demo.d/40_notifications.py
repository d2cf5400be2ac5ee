# Notifications: the worker emails the tenants (a local SMTP sink) and sends signed events to the platform
"""Run by `make run` after the other demos, which queued notifications
(the demo tenant's usage thresholds, the Stripe flow's payment events).

It starts a local SMTP server (aiosmtpd) and a local HTTP receiver that
verifies each event's signature with Stripe's library, points the worker at
them (ALTER SYSTEM, reload), waits for the queue to drain and prints what
arrived: one email with its headers and both parts, one platform webhook
with its signature.  Afterwards the settings are reset (the sinks stop
with the demo).
"""
import json
import os
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "python"))
import psycopg  # noqa: E402
from notify_sinks import SmtpSink, WebhookReceiver, parts  # noqa: E402

DSN = f"host={os.environ['PGHOST']} port={os.environ['PGPORT']} dbname={os.environ['PGDATABASE']} user=postgres"
SECRET = "demo_platform_signing_secret_" + os.urandom(8).hex()
SETTINGS = ("smtp_url", "smtp_starttls", "notify_from", "notify_operator_email", "notify_webhook_url",
            "notify_webhook_secret", "notify_retry_base_delay")

db = psycopg.connect(DSN, autocommit=True)


def sql(q, *args):
    cur = db.execute(q, args)
    return cur.fetchall() if cur.description else []


def configure(values):
    for k in SETTINGS:
        if values is None:
            db.execute(f"ALTER SYSTEM RESET qes_billing.{k}")
        else:
            db.execute(f"ALTER SYSTEM SET qes_billing.{k} = '{values[k]}'")
    db.execute("SELECT pg_reload_conf()")


smtp = SmtpSink().start()
hook = WebhookReceiver(SECRET).start()
try:
    print(f"   SMTP sink on {smtp.url}, platform receiver on {hook.url}")
    configure({"smtp_url": smtp.url, "smtp_starttls": "off",   # a loopback sink without TLS (development only)
               "notify_from": "QES Billing <billing@qes.example>", "notify_operator_email": "ops@qes.example",
               "notify_webhook_url": hook.url, "notify_webhook_secret": SECRET, "notify_retry_base_delay": "1s"})
    deadline = time.time() + 30
    while time.time() < deadline:
        if not sql("SELECT 1 FROM billing.notifications WHERE state IN ('pending', 'in_flight') "
                   "AND attempts = 0 LIMIT 1"):
            break
        time.sleep(0.2)
    time.sleep(0.5)
    # what the earlier steps queued no longer applies by now (skipped, with the reason);
    # a fresh one: a new tenant signs 8 of its 10 Free signatures
    sql("SELECT billing.upsert_tenant('notify-demo', 'Muster Signatur GmbH', 'billing@muster-signatur.example')")
    with psycopg.connect(DSN) as c:
        c.execute("SELECT count(*) FROM generate_series(1, 8) i, "
                  "billing.record_usage('notify-demo', 'signatures', 1, 'notify-demo-' || i)")
        committed = c.execute("SELECT clock_timestamp()").fetchone()[0]
    deadline = time.time() + 30
    while time.time() < deadline and not sql("SELECT 1 FROM billing.notifications "
                                             "WHERE tenant_id = 'notify-demo' AND state = 'sent'"):
        time.sleep(0.05)
    sent_at = sql("SELECT sent_at FROM billing.notifications WHERE tenant_id = 'notify-demo'")[0][0]
    if sent_at:
        print(f"   notify-demo's 80 % notice: delivered {(sent_at - committed).total_seconds() * 1000:.0f} ms "
              "after the commit that queued it")

    print("   billing.notifications:")
    for r in sql("SELECT tenant_id, kind, audience, state, attempts, to_char(sent_at, 'HH24:MI:SS.MS'), "
                 "coalesce(skip_reason, last_error, '') FROM billing.notifications ORDER BY notification_id"):
        print("     %-14s %-28s %-8s %-8s attempts=%d sent=%s %s" % (r[0], r[1], r[2], r[3], r[4], r[5] or "-", r[6]))
    print(f"   the SMTP sink received {len(smtp.messages)} email(s), the platform {len(hook.requests)} event(s)")

    if smtp.messages:
        m = smtp.messages[-1]
        for cand in smtp.messages:
            if cand["msg"]["X-QES-Notification"] == "usage.threshold":
                m = cand
        msg = m["msg"]
        print(f"\n   -- one email, as the SMTP server got it (MAIL FROM {m['mail_from']}, RCPT TO {', '.join(m['rcpt_tos'])})")
        for h in ("Date", "From", "To", "Subject", "Message-ID", "X-QES-Event-Id", "Content-Type"):
            print(f"   {h}: {msg[h]}")
        text, html = parts(msg)
        print("   [text/plain part]")
        for line in text.rstrip().splitlines():
            print("   | " + line)
        print(f"   [text/html part: {len(html)} characters]")
        for line in html.splitlines()[3:5]:
            print("   | " + line[:110])
    if hook.requests:
        r = hook.requests[-1]
        print("\n   -- one platform webhook, as the receiver got it")
        print(f"   POST {hook.url}")
        for h in ("QES-Signature", "QES-Event-Id", "Content-Type"):
            print(f"   {h}: {r['headers'].get(h)}")
        print(f"   signature verified with stripe.WebhookSignature.verify_header: {'yes' if r['verified'] else 'NO: ' + str(r['error'])}")
        ev = dict(r["event"])
        obj = dict(ev["data"]["object"])
        obj["text"] = obj["text"][:80] + "..."
        ev["data"] = {"object": obj}
        for line in json.dumps(ev, indent=2).splitlines():
            print("   " + line)
    print("\n   billing.notification_metrics:")
    cur = db.execute("SELECT * FROM billing.notification_metrics")
    print("   " + ", ".join(f"{d.name}={v}" for d, v in zip(cur.description, cur.fetchone())))
finally:
    configure(None)
    smtp.stop()
    hook.stop()
    print("   (the sinks stop with the demo and the notification settings are reset;"
          " set qes_billing.smtp_url, notify_from, notify_webhook_url and notify_webhook_secret to deliver for real)")
