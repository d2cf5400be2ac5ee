"""The audit trail out of the database: billing.audit_export(from, to), the
command qes_billing_audit (export, archive) and the offline verifier
qes_billing_audit_verify.  Exports verify without PostgreSQL, consecutive
periods chain, a changed row, a missing row, a cut file and a broken chain
between files are each named; archival past the retention removes rows
only behind a verified export and leaves the chain verifiable from the
archive's last hash."""
import json
import os
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import amcheck_and_stop
from pgcluster import Cluster

HERE = os.path.dirname(__file__)
SRC = os.path.join(HERE, "..", "..", "src")
COMMAND = os.path.join(SRC, "qes_billing_audit")
VERIFIER = os.path.join(SRC, "qes_billing_audit_verify")
ZERO = "0" * 64


@pytest.fixture(scope="module")
def pg():
    cluster = Cluster("audit_export").start()
    yield cluster
    amcheck_and_stop(cluster)


def write_rows(pg, n, tenant="t_export", tag="test.row"):
    """n audit rows through billing.audit(); details with text that tests the
    canonical encoding (accents, quotes, backslashes, a newline, an emoji)."""
    with pg.connect(autocommit=True) as c:
        ids = []
        for i in range(n):
            ids.append(c.execute(
                "SELECT billing.audit(%s, %s, %s::jsonb)",
                (tag, tenant, json.dumps({"i": i, "b": 'Zoë "quoted" \\ back\nnew line \U0001F512',
                                          "n": 1.50, "a": [3, 1, 2]}))).fetchone()[0])
        return ids


def stamp(pg):
    """The database's clock now (export boundaries are times of the chain)."""
    return pg.sql("SELECT clock_timestamp()")[0][0]


def export(pg, tmp_path, name, t_from, t_to):
    out = tmp_path / name
    r = subprocess.run([COMMAND, "-d", pg.dsn(), "export", "--from", str(t_from), "--to", str(t_to),
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def verify(*paths, prev=None):
    args = [VERIFIER] + (["--prev-hash", prev] if prev else []) + [str(p) for p in paths]
    r = subprocess.run(args, capture_output=True, text=True)
    return r.returncode, r.stdout.strip()


def lines(path):
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


def rewrite(path, new_lines):
    path.write_text("\n".join(new_lines) + "\n", encoding="utf-8")


def test_export_verifies_offline_and_matches_the_database(pg, tmp_path):
    t0 = stamp(pg)
    ids = write_rows(pg, 25)
    t1 = stamp(pg)
    f = export(pg, tmp_path, "one.jsonl", t0, t1)
    code, out = verify(f)
    assert code == 0, out
    assert out.startswith(f"OK 25 rows, audit_id {ids[0]}..{ids[-1]}, ")
    body = lines(f)
    head, rows, tail = json.loads(body[0]), [json.loads(x) for x in body[1:-1]], json.loads(body[-1])
    assert [r["audit_id"] for r in rows] == ids
    db = pg.sql("SELECT audit_id, encode(prev_hash, 'hex'), encode(hash, 'hex'), details::text"
                "  FROM billing.audit_log WHERE audit_id BETWEEN %s AND %s ORDER BY 1", (ids[0], ids[-1]))
    assert [(r["audit_id"], r["prev_hash"], r["hash"], r["details"]) for r in rows] == [tuple(x) for x in db]
    # the hash of the row before the period, and the last one, in header and trailer
    before = pg.sql("SELECT encode(hash, 'hex') FROM billing.audit_log WHERE audit_id = %s", (ids[0] - 1,))
    assert head["prev_hash"] == (before[0][0] if before else ZERO)
    assert (head["first_id"], head["last_id"], head["rows"]) == (ids[0], ids[-1], 25)
    assert tail == {"end": True, "rows": 25, "last_id": ids[-1], "last_hash": db[-1][2]}
    assert "Zoë" in rows[0]["details"] and "\U0001F512" in rows[0]["details"]


def test_consecutive_periods_chain_even_while_rows_are_written(pg, tmp_path):
    stop = threading.Event()
    written = []

    def writer():
        with pg.connect(autocommit=True) as c:
            while not stop.is_set():
                written.append(c.execute("SELECT billing.audit('test.concurrent', 't_w', '{}')").fetchone()[0])

    threads = [threading.Thread(target=writer) for _ in range(3)]
    t0 = stamp(pg)
    for t in threads:
        t.start()
    bounds = [t0]
    for _ in range(3):
        time.sleep(0.3)
        bounds.append(stamp(pg))
    time.sleep(0.2)
    files = [export(pg, tmp_path, f"p{i}.jsonl", bounds[i], bounds[i + 1]) for i in range(3)]
    stop.set()
    for t in threads:
        t.join()
    code, out = verify(*files)
    assert code == 0, out
    heads = [json.loads(lines(f)[0]) for f in files]
    tails = [json.loads(lines(f)[-1]) for f in files]
    for a, b, ha in zip(tails, heads[1:], heads):
        assert b["first_id"] == a["last_id"] + 1 and b["prev_hash"] == a["last_hash"]
    # together they hold exactly the rows stamped in [t0, t3)
    in_db = pg.sql("SELECT count(*), min(audit_id), max(audit_id) FROM billing.audit_log"
                   " WHERE occurred_at >= %s AND occurred_at < %s", (bounds[0], bounds[3]))[0]
    assert sum(h["rows"] for h in heads) == in_db[0]
    assert (heads[0]["first_id"], tails[-1]["last_id"]) == (in_db[1], in_db[2])
    assert in_db[0] > 30
    # out of order, or one left out: the chain between files is broken
    code, out = verify(files[1], files[0])
    assert code == 1 and f"audit_id {heads[0]['first_id']}: does not chain" in out
    code, out = verify(files[0], files[2])
    assert code == 1 and "p2.jsonl:1: " in out and "does not chain" in out
    # an empty period still carries the chain
    t4 = stamp(pg)
    empty = export(pg, tmp_path, "empty.jsonl", t4, t4)
    head = json.loads(lines(empty)[0])
    assert head["rows"] == 0 and head["prev_hash"] == json.loads(lines(empty)[-1])["last_hash"]
    assert verify(empty)[0] == 0


@pytest.fixture
def period(pg, tmp_path):
    t0 = stamp(pg)
    ids = write_rows(pg, 10, tag="test.tamper")
    t1 = stamp(pg)
    return export(pg, tmp_path, "period.jsonl", t0, t1), ids


def test_a_changed_row_is_named(period):
    f, ids = period
    body = lines(f)
    row = json.loads(body[4])
    row["details"] = row["details"].replace('"i": 3', '"i": 30')
    body[4] = json.dumps(row, ensure_ascii=False)
    rewrite(f, body)
    code, out = verify(f)
    assert code == 1
    assert out == f"BROKEN {f}:5: audit_id {ids[3]}: content does not match its hash (the row was changed)"


def test_a_changed_time_or_actor_is_named(period):
    f, ids = period
    for field, value in (("occurred_at", None), ("actor_sub", "someone.else")):
        body = lines(f)
        row = json.loads(body[7])
        original = dict(row)
        row[field] = value if value else row["occurred_at"][:-2] + ("1Z" if row["occurred_at"][-2] != "1" else "2Z")
        body[7] = json.dumps(row, ensure_ascii=False)
        rewrite(f, body)
        code, out = verify(f)
        assert (code, out) == (1, f"BROKEN {f}:8: audit_id {ids[6]}: content does not match its hash (the row was changed)")
        body[7] = json.dumps(original, ensure_ascii=False)
        rewrite(f, body)
        assert verify(f)[0] == 0


def test_a_rehashed_row_breaks_the_next_link_and_a_rehashed_file_the_next_export(pg, tmp_path, period):
    f, ids = period
    sys_path = __import__("sys").path
    sys_path.insert(0, SRC)
    try:
        import importlib.machinery
        import importlib.util
        loader = importlib.machinery.SourceFileLoader("qes_verify", VERIFIER)
        spec = importlib.util.spec_from_loader("qes_verify", loader)
        verifier = importlib.util.module_from_spec(spec)
        loader.exec_module(verifier)
    finally:
        sys_path.remove(SRC)
    original = lines(f)
    body = list(original)
    row = json.loads(body[3])
    row["details"] = row["details"].replace('"i": 2', '"i": 20')
    row["hash"] = verifier.row_hash(row["prev_hash"], row)
    body[3] = json.dumps(row, ensure_ascii=False)
    rewrite(f, body)
    code, out = verify(f)
    assert (code, out) == (1, f"BROKEN {f}:5: audit_id {ids[3]}: prev_hash is not the hash of the row before")
    # the forger rehashes everything after it too: the file verifies alone,
    # but no longer chains with the next period's export
    t2 = stamp(pg)
    write_rows(pg, 2, tag="test.after")
    nxt = export(pg, tmp_path, "next.jsonl", t2, stamp(pg))
    prev = row["hash"]
    for i in range(4, len(body) - 1):
        r = json.loads(body[i])
        r["prev_hash"] = prev
        r["hash"] = prev = verifier.row_hash(prev, r)
        body[i] = json.dumps(r, ensure_ascii=False)
    tail = json.loads(body[-1])
    tail["last_hash"] = prev
    body[-1] = json.dumps(tail)
    rewrite(f, body)
    assert verify(f)[0] == 0
    code, out = verify(f, nxt)
    assert code == 1 and out.startswith(f"BROKEN {nxt}:1: audit_id {ids[-1] + 1}: does not chain")
    rewrite(f, original)
    assert verify(f, nxt)[0] == 0


def test_a_gap_and_a_cut_file_are_named(period):
    f, ids = period
    original = lines(f)
    rewrite(f, original[:5] + original[6:])         # row ids[4] left out
    assert verify(f) == (1, f"BROKEN {f}:6: audit_id {ids[5]}: gap: row {ids[4]} is missing")
    rewrite(f, original[:3] + original[6:])         # three rows left out
    assert verify(f) == (1, f"BROKEN {f}:4: audit_id {ids[5]}: gap: rows {ids[2]}..{ids[4]} are missing")
    rewrite(f, original[:-2] + original[-1:])       # the last row left out
    code, out = verify(f)
    assert code == 1 and out.startswith(f"BROKEN {f}:11: audit_id {ids[-1]}: rows are missing")
    rewrite(f, original[:-1])                       # cut short, no trailer
    code, out = verify(f)
    assert code == 1 and f"audit_id {ids[-1]}: the trailer is missing" in out
    rewrite(f, original)
    assert verify(f)[0] == 0


def test_a_row_changed_in_the_database_is_named_in_its_export(pg, tmp_path):
    t0 = stamp(pg)
    ids = write_rows(pg, 5, tag="test.indb")
    t1 = stamp(pg)
    with pg.connect() as c:
        c.execute("SET LOCAL qes_billing.audit_guard = off")
        c.execute("UPDATE billing.audit_log SET details = details || '{\"i\": 99}' WHERE audit_id = %s",
                  (ids[2],))
        c.commit()
    try:
        out_file = tmp_path / "tampered.jsonl"
        r = subprocess.run([COMMAND, "-d", pg.dsn(), "export", "--from", str(t0), "--to", str(t1),
                            "-o", str(out_file)], capture_output=True, text=True)
        assert r.returncode == 1
        assert f"audit_id {ids[2]}: content does not match its hash" in r.stdout
        assert "nothing was removed" in r.stderr and not out_file.exists()
        assert pg.sql("SELECT first_bad_id FROM billing.verify_audit_chain()")[0][0] == ids[2]
    finally:
        with pg.connect() as c:
            c.execute("SET LOCAL qes_billing.audit_guard = off")
            c.execute("UPDATE billing.audit_log SET details = details || '{\"i\": 2}' WHERE audit_id = %s",
                      (ids[2],))
            c.commit()
    assert pg.sql("SELECT ok FROM billing.verify_audit_chain()")[0][0] is True


def test_bad_periods_are_refused(pg):
    cases = [("SELECT billing.audit_export(NULL, now())", "22004", "the period needs both ends"),
             ("SELECT billing.audit_export(now(), now() - interval '1 day')", "22023", "ends"),
             ("SELECT billing.audit_export(now() - interval '1 day', clock_timestamp() + interval '1 hour')",
              "22023", "the period ends in the future")]
    for query, code, words in cases:
        with pg.connect() as c:
            with pytest.raises(psycopg.Error) as e:
                c.execute(query).fetchall()
            assert e.value.sqlstate == code and words in str(e.value)
            assert e.value.diag.message_hint


def set_retention(pg, value):
    pg.sql(f"ALTER SYSTEM SET qes_billing.audit_retention = '{value}'")
    pg.sql("SELECT pg_reload_conf()")
    assert pg.wait_until(f"SELECT current_setting('qes_billing.audit_retention') = '{value}'")


def archive(pg, out):
    return subprocess.run([COMMAND, "-d", pg.dsn(), "archive", "-o", str(out)], capture_output=True, text=True)


def test_archive_removes_old_rows_behind_a_verified_export(pg, tmp_path):
    set_retention(pg, "0")
    r = archive(pg, tmp_path / "never.jsonl")
    assert r.returncode == 1 and "kept for ever" in r.stderr
    assert not (tmp_path / "never.jsonl").exists()

    write_rows(pg, 20, tag="test.old")
    time.sleep(3.5)
    young = write_rows(pg, 5, tag="test.young")
    set_retention(pg, "3s")
    total_before = pg.sql("SELECT count(*), max(audit_id) FROM billing.audit_log")[0]
    first_archive = tmp_path / "archive1.jsonl"
    r = archive(pg, first_archive)
    assert r.returncode == 0, r.stdout + r.stderr
    head, tail = json.loads(lines(first_archive)[0]), json.loads(lines(first_archive)[-1])
    assert head["first_id"] == 1 and head["prev_hash"] == ZERO
    assert tail["last_id"] < young[0]
    assert f"archived rows 1..{tail['last_id']} ({tail['last_id']} rows)" in r.stdout
    assert verify(first_archive)[0] == 0
    # removed from the database; the young rows and everything after stay
    kept = pg.sql("SELECT min(audit_id), count(*) FROM billing.audit_log")[0]
    assert kept[0] == tail["last_id"] + 1
    assert kept[1] == total_before[0] - tail["last_id"] + 1          # + audit.archived
    rec = pg.sql("SELECT first_id, last_id, rows_removed, encode(last_hash, 'hex'), encode(export_sha256, 'hex')"
                 "  FROM billing.audit_archives")
    digest = subprocess.check_output(["sha256sum", str(first_archive)], text=True).split()[0]
    assert rec == [(1, tail["last_id"], tail["last_id"], tail["last_hash"], digest)]
    audited = pg.sql("SELECT details FROM billing.audit_log WHERE action = 'audit.archived'")
    assert len(audited) == 1 and audited[0][0]["rows"] == tail["last_id"]
    assert audited[0][0]["export_sha256"] == digest
    # the chain in the database verifies from the archive's last hash
    assert pg.sql("SELECT ok, first_bad_id FROM billing.verify_audit_chain()")[0] == (True, None)
    # the rest exports from there and chains to the archive
    rest = export(pg, tmp_path, "rest.jsonl", "-infinity", stamp(pg))
    assert json.loads(lines(rest)[0])["prev_hash"] == tail["last_hash"]
    code, out = verify(first_archive, rest)
    assert code == 0, out
    assert verify(rest, prev=tail["last_hash"])[0] == 0
    assert verify(rest, prev=ZERO)[0] == 1
    # a row not archived is still append-only
    with pg.connect() as c:
        with pytest.raises(psycopg.Error) as e:
            c.execute("DELETE FROM billing.audit_log WHERE audit_id = %s", (young[0],))
        assert e.value.sqlstate == "42501"
    # a second archive follows the first
    time.sleep(3.5)
    second = tmp_path / "archive2.jsonl"
    r = archive(pg, second)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(lines(second)[0])["first_id"] == tail["last_id"] + 1
    assert verify(first_archive, second)[0] == 0
    assert pg.sql("SELECT ok FROM billing.verify_audit_chain()")[0][0] is True
    set_retention(pg, "0")


def test_archive_refuses_what_the_export_does_not_prove(pg):
    set_retention(pg, "1s")
    try:
        time.sleep(1.5)
        base_id, base_hash = pg.sql("SELECT base_id, encode(base_hash, 'hex') FROM billing.audit_chain_base()")[0]
        last = pg.sql("SELECT audit_id, encode(hash, 'hex') FROM billing.audit_log"
                      " WHERE audit_id = billing.audit_boundary(billing.audit_archive_cutoff())")[0]
        count = pg.sql("SELECT count(*) FROM billing.audit_log")[0][0]
        cases = [
            ((base_id + 1, last[0], "00" * 32, "11" * 32), "22000", "does not match row"),
            ((base_id + 2, last[0], last[1], "11" * 32), "22023", "the rows kept start at row"),
            ((base_id + 1, last[0] + 100000, last[1], "11" * 32), "22023", "is not older than the retention"),
            ((base_id + 1, last[0], last[1][:10], "11" * 32), "22023", "SHA-256 digests"),
        ]
        for (first, last_id, h, digest), code, words in cases:
            with pg.connect() as c:
                with pytest.raises(psycopg.Error) as e:
                    c.execute("SELECT billing.audit_archive(%s, %s, decode(%s, 'hex'), decode(%s, 'hex'))",
                              (first, last_id, h, digest))
                assert e.value.sqlstate == code and words in str(e.value), str(e.value)
                assert e.value.diag.message_hint
        assert pg.sql("SELECT count(*) FROM billing.audit_log")[0][0] == count
        assert pg.sql("SELECT base_id FROM billing.audit_chain_base()")[0][0] == base_id
    finally:
        set_retention(pg, "0")
