"""The outbox's direct lane (src/outbox_lane.c, docs/architecture.md, "The
direct lane"): while the worker has no backlog, the transaction that queues a
Stripe request claims it itself and hands it to the worker through shared
memory; the worker sends it once that transaction has committed, without a
transaction of its own, and records the answers of several requests in one.

Each test drives the real worker against the stateful fake (fake_stripe.py)
and checks what reached it, by Idempotency-Key: nothing of a transaction that
rolled back, everything of one that committed, exactly once.
"""
import time

import pytest

from conftest import TEST_KEYS, amcheck_and_stop
from fake_stripe import FakeStripe
from pgcluster import Cluster

OPEN = "state IN ('waiting', 'pending', 'in_flight')"


@pytest.fixture(scope="module")
def fake():
    f = FakeStripe(seed=11, timeout_s=1.5)
    f.base = f.serve()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def pg(fake):
    c = Cluster("lane", env=TEST_KEYS, conf={
        "qes_billing.stripe_api_base": f"'{fake.base}'", "qes_billing.retry_base_delay": "'20ms'",
        "qes_billing.retry_max_delay": "'400ms'", "qes_billing.request_timeout": "'2s'",
        "max_prepared_transactions": "4"}).start()
    assert c.wait_until("SELECT alive FROM billing.worker_status"), c.log()
    assert c.wait_until("SELECT open FROM billing.outbox_lane_state()"), c.log()
    yield c
    amcheck_and_stop(c)


def drain(pg, timeout=30):
    assert pg.wait_until(f"SELECT NOT EXISTS (SELECT 1 FROM billing.stripe_requests WHERE {OPEN})", timeout), \
        pg.sql(f"SELECT request_id, kind, state, attempts, error FROM billing.stripe_requests WHERE {OPEN}")


def lane(pg):
    """(sent, released) so far."""
    return tuple(pg.sql("SELECT sent, released FROM billing.outbox_lane_state()")[0])


def xacts(pg):
    return int(pg.sql("SELECT xacts FROM billing.worker_state()")[0][0])


def reached(fake, key):
    """How many times a request with this Idempotency-Key reached the fake."""
    return sum(1 for r in fake.requests if r[2] == key)


def enqueue(cur, name):
    """Queue a customer creation in the cursor's transaction; its key."""
    cur.execute("SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers', "
                "jsonb_build_object('name', %s::text))", (name,))
    cur.execute("SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = %s", (cur.fetchone()[0],))
    return cur.fetchone()[0]


def test_lone_requests_go_without_worker_transactions(pg, fake):
    """Requests queued one by one, each in its own transaction, as an
    application queues them: each is sent from the lane (no claim), once, and
    their answers are recorded a few to a transaction.  Without the lane the
    worker ran two transactions per request (a claim, a recording)."""
    drain(pg)
    sent0, released0 = lane(pg)
    x0 = xacts(pg)
    keys = []
    with pg.connect(autocommit=True) as c:
        for i in range(20):
            keys.append(enqueue(c.cursor(), f"lone {i}"))
            time.sleep(0.03)
    drain(pg)
    sent, released = lane(pg)
    x = xacts(pg) - x0
    rows = pg.sql("SELECT state, attempts, count(*) FROM billing.stripe_requests "
                  "WHERE idempotency_key = ANY(%s) GROUP BY 1, 2", (keys,))
    print(f"20 lone requests: {sent - sent0} through the lane, {released - released0} put back, "
          f"{x} worker transactions")
    assert rows == [("succeeded", 1, 20)], rows
    assert [reached(fake, k) for k in keys] == [1] * 20
    assert sent - sent0 == 20 and released == released0
    assert x <= 8, x


def test_rolled_back_requests_are_never_sent(pg, fake):
    """A request of a transaction that rolls back, or of a subtransaction
    rolled back to its savepoint, never leaves, and its slot is free again
    (40 of them, more than the lane has slots, and the lane still takes
    the next)."""
    drain(pg)
    gone = []
    with pg.connect() as c:
        cur = c.cursor()
        for i in range(40):
            gone.append(enqueue(cur, f"rolled back {i}"))
            c.rollback()
        kept = enqueue(cur, "kept")
        cur.execute("SAVEPOINT s")
        gone.append(enqueue(cur, "to the savepoint"))
        cur.execute("ROLLBACK TO SAVEPOINT s")
        kept2 = enqueue(cur, "kept too")
        c.commit()
    drain(pg)
    time.sleep(0.3)
    assert [reached(fake, k) for k in gone] == [0] * len(gone)
    assert (reached(fake, kept), reached(fake, kept2)) == (1, 1)
    assert pg.sql("SELECT slots_in_use FROM billing.outbox_lane_state()") == [(0,)]
    sent0, _ = lane(pg)
    with pg.connect(autocommit=True) as c:
        k = enqueue(c.cursor(), "after the rollbacks")
    drain(pg)
    assert reached(fake, k) == 1 and lane(pg)[0] == sent0 + 1


def test_prepared_transaction_carries_no_lane_claim(pg, fake):
    """PREPARE TRANSACTION puts the transaction's lane requests back in the
    queue as never claimed (and frees their slots): nothing leaves before
    COMMIT PREPARED, nothing after ROLLBACK PREPARED, and a prepared
    transaction that waits longer than twice the request timeout leaves no
    row in flight that a reclaim would date as possibly sent: the request
    goes after COMMIT PREPARED, dated from then."""
    drain(pg)
    with pg.connect() as c:
        k1 = enqueue(c.cursor(), "prepared, committed")
        c.execute("PREPARE TRANSACTION 'lane_commit'")
    with pg.connect() as c:
        k2 = enqueue(c.cursor(), "prepared, rolled back")
        c.execute("PREPARE TRANSACTION 'lane_rollback'")
    assert pg.sql("SELECT slots_in_use FROM billing.outbox_lane_state()") == [(0,)]
    time.sleep(5.0)     # (the request timeout is 2 s: a claim would be stale by now)
    assert (reached(fake, k1), reached(fake, k2)) == (0, 0)
    with pg.connect(autocommit=True) as c:
        committed = c.execute("SELECT clock_timestamp()").fetchone()[0]
        c.execute("COMMIT PREPARED 'lane_commit'")
        c.execute("ROLLBACK PREPARED 'lane_rollback'")
    drain(pg)
    time.sleep(0.3)
    assert (reached(fake, k1), reached(fake, k2)) == (1, 0)
    rows = pg.sql("SELECT state, attempts, first_sent_at >= %s FROM billing.stripe_requests "
                  "WHERE idempotency_key = %s", (committed, k1))
    assert rows == [("succeeded", 1, True)], rows


def test_prepared_by_an_application_role(pg, fake):
    """PREPARE TRANSACTION in a session whose own role may not touch the
    queue (an application's, queuing through SECURITY DEFINER code as the
    API does) still puts the transaction's lane requests back; after COMMIT
    PREPARED they go."""
    drain(pg)
    pg.sql("DO $$ BEGIN CREATE ROLE lane_app; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    pg.sql("""CREATE OR REPLACE FUNCTION public.lane_app_enqueue(p_name text) RETURNS text
                LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
              DECLARE v bigint;
              BEGIN
                v := billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers',
                                            jsonb_build_object('name', p_name));
                RETURN (SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = v);
              END $f$""")
    pg.sql("REVOKE ALL ON FUNCTION public.lane_app_enqueue(text) FROM PUBLIC")
    pg.sql("GRANT EXECUTE ON FUNCTION public.lane_app_enqueue(text) TO lane_app")
    with pg.connect() as c:
        c.execute("SET LOCAL ROLE lane_app")
        k = c.execute("SELECT public.lane_app_enqueue('prepared by an application')").fetchone()[0]
        c.execute("PREPARE TRANSACTION 'lane_app'")
    assert pg.sql("SELECT slots_in_use FROM billing.outbox_lane_state()") == [(0,)]
    with pg.connect(autocommit=True) as c:
        c.execute("COMMIT PREPARED 'lane_app'")
    drain(pg)
    assert reached(fake, k) == 1
    assert pg.sql("SELECT state, attempts FROM billing.stripe_requests WHERE idempotency_key = %s", (k,)) \
        == [("succeeded", 1)]


def test_one_transaction_takes_a_few_slots(pg, fake):
    """A transaction that queues many requests takes at most 8 slots of the
    lane; the rest are claimed from the queue; each is sent once."""
    drain(pg)
    sent0, _ = lane(pg)
    with pg.connect() as c:
        keys = [enqueue(c.cursor(), f"many {i}") for i in range(20)]
        c.commit()
    drain(pg)
    assert [reached(fake, k) for k in keys] == [1] * 20
    assert lane(pg)[0] - sent0 <= 8, lane(pg)


def test_long_transaction_request_is_claimed_at_its_commit(pg, fake):
    """A request queued long before its transaction commits goes back to the
    queue and is claimed the ordinary way: claimed_at (which dates Stripe's
    answer) is after the commit, not when it was queued."""
    drain(pg)
    _, released0 = lane(pg)
    with pg.connect() as c:
        cur = c.cursor()
        k = enqueue(cur, "long transaction")
        cur.execute("SELECT pg_sleep(0.3)")
        c.commit()
    drain(pg)
    rows = pg.sql("SELECT state, attempts, claimed_at - created_at >= interval '0.3 s' "
                  "FROM billing.stripe_requests WHERE idempotency_key = %s", (k,))
    assert rows == [("succeeded", 1, True)], rows
    assert reached(fake, k) == 1
    assert lane(pg)[1] == released0 + 1


def test_not_before_is_kept(pg, fake):
    """A request queued to go out later (p_not_before: a lookup in the next
    second, a scheduled reconciliation) does not take the lane."""
    drain(pg)
    start = time.time()
    with pg.connect(autocommit=True) as c:
        cur = c.cursor()
        cur.execute("SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers', "
                    "'{\"name\": \"later\"}', p_not_before => clock_timestamp() + interval '1.5 s')")
        cur.execute("SELECT idempotency_key FROM billing.stripe_requests WHERE request_id = %s", (cur.fetchone()[0],))
        k = cur.fetchone()[0]
    drain(pg)
    at = [r[4] for r in fake.requests if r[2] == k]
    assert len(at) == 1 and at[0] - start >= 1.4, (at, start)


def test_clean_restart_records_the_answers_first(pg, fake):
    """A success waits up to a second to be recorded with others; a clean
    shutdown records it first, so the restart finds nothing in flight to
    reclaim and nothing is sent again."""
    drain(pg)
    time.sleep(1.2)     # (lazily recorded: no waiter queued lately)
    audited = pg.sql("SELECT coalesce(max(audit_id), 0) FROM billing.audit_log")[0][0]
    with pg.connect(autocommit=True) as c:
        k = enqueue(c.cursor(), "before the restart")
    deadline = time.time() + 10
    while reached(fake, k) == 0 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)     # answered, not yet recorded
    pg._run("pg_ctl", "-D", pg.datadir, "-l", pg.logfile, "-m", "fast", "-w", "restart")
    assert pg.wait_until("SELECT alive FROM billing.worker_status"), pg.log()
    drain(pg)
    assert pg.sql("SELECT state, attempts FROM billing.stripe_requests WHERE idempotency_key = %s", (k,)) \
        == [("succeeded", 1)]
    assert reached(fake, k) == 1
    assert pg.sql("SELECT count(*) FROM billing.audit_log WHERE audit_id > %s AND action = 'worker.reclaimed' "
                  "AND (details ->> 'stripe_requests')::int > 0", (audited,)) == [(0,)]


def test_chain_goes_at_the_pace_of_answers(pg, fake):
    """A request that waits for another is released as soon as the other's
    answer comes (recorded at once, not a second later: outbox_note_waiter),
    so a chain of five takes well under the second each link would wait."""
    drain(pg)
    time.sleep(1.2)     # (no waiter queued lately: the worker records lazily)
    with pg.connect() as c:
        cur = c.cursor()
        cur.execute("SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers', "
                    "'{\"name\": \"link 0\"}')")
        prev = cur.fetchone()[0]
        for i in range(1, 5):
            cur.execute("SELECT billing.outbox_enqueue(NULL, 'test.customer', 'POST', '/v1/customers', "
                        "jsonb_build_object('name', %s::text), p_after => %s)", (f"link {i}", prev))
            prev = cur.fetchone()[0]
        c.commit()
    start = time.time()
    drain(pg)
    took = time.time() - start
    print(f"a chain of 5 took {took:.2f}s")
    assert took < 2.5, took


def test_async_commit_request_is_sent_after_its_flush(pg, fake):
    """A transaction that commits without waiting for its WAL flush
    (synchronous_commit off): its request still goes, once, the worker having
    flushed the commit first."""
    drain(pg)
    with pg.connect() as c:
        cur = c.cursor()
        cur.execute("SET synchronous_commit = off")
        k = enqueue(cur, "async commit")
        c.commit()
    drain(pg)
    assert reached(fake, k) == 1
