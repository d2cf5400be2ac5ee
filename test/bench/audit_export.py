#!/usr/bin/env python3
"""Measure the audit trail's way out of the database on 1 million rows
(QES_AUDIT_ROWS to change it): the export (qes_billing_audit export), the
offline verification (qes_billing_audit_verify) and the archival of all of
them (qes_billing_audit archive: export, verify, remove).  Prints figures,
judges none.  Runs on a throw-away cluster of its own:

    python3 test/bench/audit_export.py
"""
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
from pgcluster import Cluster  # noqa: E402

SRC = os.path.join(HERE, "..", "..", "src")
ROWS = int(os.environ.get("QES_AUDIT_ROWS", "1000000"))

# rows chained exactly as billing.audit() chains them, written in one pass
# (the head updated once at the end); tenants and details of realistic size
FILL = """
DO $$
DECLARE
  v_prev bytea;
  v_id   bigint;
  v_at   timestamptz;
  v_det  jsonb;
  v_ten  text;
BEGIN
  SELECT last_id, last_hash INTO v_id, v_prev FROM billing.audit_head;
  FOR i IN 1..%(rows)s LOOP
    v_id := v_id + 1;
    v_at := clock_timestamp();
    v_ten := 'tenant_' || (i %% 500);
    v_det := jsonb_build_object('subscription_id', 'sub_' || md5(i::text), 'status', 'active',
                                'plan', 'professional', 'interval', 'month', 'i', i);
    INSERT INTO billing.audit_log VALUES (
      v_id, v_at, 'qes_app', 'svc@platform', NULL, v_ten, 'subscription.updated', v_det, v_prev,
      billing.audit_hash(v_prev, v_id, v_at, 'qes_app', 'svc@platform', NULL, v_ten,
                         'subscription.updated', v_det));
    v_prev := billing.audit_hash(v_prev, v_id, v_at, 'qes_app', 'svc@platform', NULL, v_ten,
                                 'subscription.updated', v_det);
  END LOOP;
  UPDATE billing.audit_head SET last_id = v_id, last_hash = v_prev;
END
$$;
"""


def timed(args):
    t = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True)
    took = time.monotonic() - t
    if r.returncode != 0:
        sys.exit(f"{args[1:3]} failed: {r.stdout}{r.stderr}")
    return took, r.stdout.strip()


def main():
    pg = Cluster("bench_audit").start()
    try:
        t = time.monotonic()
        pg.sql(FILL % {"rows": ROWS})
        pg.sql("VACUUM ANALYZE billing.audit_log")
        print(f"fill: {ROWS} rows in {time.monotonic() - t:.1f} s")
        size = pg.sql("SELECT pg_size_pretty(pg_total_relation_size('billing.audit_log'))")[0][0]
        print(f"audit_log: {size}")
        assert pg.sql("SELECT ok FROM billing.verify_audit_chain()")[0][0]
        end = pg.sql("SELECT clock_timestamp()")[0][0]
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "export.jsonl")
            took, _ = timed([os.path.join(SRC, "qes_billing_audit"), "-d", pg.dsn(), "export",
                             "--from", "-infinity", "--to", str(end), "-o", out])
            mb = os.path.getsize(out) / 1e6
            print(f"export (command, verified by it): {took:.1f} s, {mb:.0f} MB, {ROWS / took:,.0f} rows/s")
            took, said = timed([os.path.join(SRC, "qes_billing_audit_verify"), out])
            print(f"verify alone: {took:.1f} s ({said[:40]}...)")
            t = time.monotonic()
            n = len(pg.sql("SELECT line FROM billing.audit_export('-infinity', %s) AS line", (end,)))
            print(f"billing.audit_export() alone, read by the client: {time.monotonic() - t:.1f} s ({n} lines)")
            time.sleep(1.5)
            pg.sql("ALTER SYSTEM SET qes_billing.audit_retention = '1s'")
            pg.sql("SELECT pg_reload_conf()")
            time.sleep(0.5)
            took, said = timed([os.path.join(SRC, "qes_billing_audit"), "-d", pg.dsn(), "archive",
                                "-o", os.path.join(d, "archive.jsonl")])
            print(f"archive (export, verify, remove): {took:.1f} s: {said}")
            assert pg.sql("SELECT ok FROM billing.verify_audit_chain()")[0][0]
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
