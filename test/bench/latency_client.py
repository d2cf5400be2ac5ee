"""Queue work one transaction at a time at a given rate (Poisson arrivals) and
note when each commit returned, for the commit -> wire and commit -> applied
latency lines of make bench (test/tools/bench.sh).

  python3 latency_client.py outbox  CONNINFO RATE SECONDS   -> "<request_id> <unix time>" per request
  python3 latency_client.py webhook CONNINFO RATE SECONDS FIRST_N
                                     -> "<stripe_event_id> <unix time>" per event (bench_events from FIRST_N on)
  python3 latency_client.py pg_net  CONNINFO RATE SECONDS URL
                                     -> "<Idempotency-Key> <unix time>" per request queued with
                                        pg_net's net.http_post (the same request, for the
                                        worker's line beside pg_net; pg_net is not part of
                                        the project and is used only when installed)

The time is taken when COMMIT has returned to this client: the moment the
application knows its transaction committed.
"""
import os
import random
import sys
import time

import psycopg


def main():
    mode, conninfo, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    n = int(sys.argv[5]) if mode == "webhook" else 0
    url = sys.argv[5] if mode == "pg_net" else None
    out = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        deadline = time.monotonic() + seconds
        next_at = time.monotonic()
        while True:
            next_at += random.expovariate(rate)
            if next_at > deadline:
                break
            time.sleep(max(0.0, next_at - time.monotonic()))
            if mode == "outbox":
                key = conn.execute(
                    "SELECT billing.outbox_enqueue(NULL, 'bench.latency', 'POST', '/v1/customers', '{\"name\": \"Latency\"}')"
                ).fetchone()[0]
            elif mode == "pg_net":
                # what the worker sends for the outbox request above: a POST
                # with the secret key and an Idempotency-Key (pg_net sends
                # the body as JSON, the worker as a form)
                key = "pgnet-%d-%d" % (os.getpid(), n)
                conn.execute(
                    "SELECT net.http_post(url := %s, body := '{\"name\": \"Latency\"}'::jsonb,"
                    " headers := jsonb_build_object('Content-Type', 'application/json',"
                    " 'Authorization', 'Bearer sk_test_bench_outbox', 'Idempotency-Key', %s::text))",
                    (url, key))
                n += 1
            else:
                with conn.transaction():
                    key = conn.execute(
                        "SELECT 'evt_bench_' || e.n, set_config('request.headers', json_build_object('stripe-signature', e.header)::text, true),"
                        "       api.stripe_webhook(e.body::json) FROM bench_events e WHERE e.n = %s", (n,)
                    ).fetchone()[0]
                n += 1
            out.append("%s %.6f" % (key, time.time()))
    print("\n".join(out))


if __name__ == "__main__":
    main()
