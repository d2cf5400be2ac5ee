"""Queue work one transaction at a time at a given rate (Poisson arrivals) and
note when each commit returned, for the commit -> wire and commit -> applied
latency lines of make bench (test/tools/bench.sh).

  python3 latency_client.py outbox  CONNINFO RATE SECONDS   -> "<request_id> <unix time>" per request
  python3 latency_client.py webhook CONNINFO RATE SECONDS FIRST_N
                                     -> "<stripe_event_id> <unix time>" per event (bench_events from FIRST_N on)

The time is taken when COMMIT has returned to this client: the moment the
application knows its transaction committed.
"""
import random
import sys
import time

import psycopg


def main():
    mode, conninfo, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 0
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
