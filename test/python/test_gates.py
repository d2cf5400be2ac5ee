"""The test gates can fail (CONTRIBUTING.md, "Tests").

amcheck: a billing index that lacks a row is found by every form of the
check the layers run -- Cluster.amcheck and conftest.amcheck_and_stop
(pytest), test/tools/amcheck.sql (the valgrind layer), sql/zz_amcheck.sql
(pg_regress; the isolation specs run the same query in their teardowns).
The corruption is planted the way a direct write that skipped an index
would leave it: a row inserted while the index was marked not ready.

valgrind: the classifier (test/tools/valgrind_classify.py) counts a report
as ours by its frames, on logs written the way the valgrind layer writes
them; the layer's self-test shows it on a real planted error.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import amcheck_and_stop
from pgcluster import Cluster

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
INDEX = "billing.tenants_stripe_customer_id_key"


def plant_missing_index_entry(cluster, tenant):
    """A tenants row with no entry in INDEX (its stripe_customer_id is NULL,
    which a btree index holds like any value)."""
    with cluster.connect(autocommit=True) as c:
        c.execute(f"UPDATE pg_index SET indisready = false WHERE indexrelid = '{INDEX}'::regclass")
        try:
            c.execute("SELECT billing.upsert_tenant(%s, 'Gate', 'gate@t.example')", (tenant,))
        finally:
            c.execute(f"UPDATE pg_index SET indisready = true WHERE indexrelid = '{INDEX}'::regclass")


def psql_file(cluster, path):
    cmd = [os.path.join(cluster.bindir, "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-d", cluster.dsn(), "-f", path]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def gate():
    cluster = Cluster("gates").start()
    yield cluster
    amcheck_and_stop(cluster)


def test_amcheck_finds_a_row_missing_from_a_billing_index(gate):
    # green first: nothing planted
    checked, failures, skipped = gate.amcheck()
    assert checked >= 10 and failures == [] and skipped == [], (checked, failures, skipped)
    assert psql_file(gate, os.path.join(ROOT, "test/tools/amcheck.sql")).returncode == 0

    plant_missing_index_entry(gate, "gate")
    try:
        # pytest's check names the index and the row
        checked, failures, skipped = gate.amcheck()
        assert [f for f in failures if f.startswith(INDEX + ":")
                and "lacks matching index tuple" in f] == failures and len(failures) == 1, failures

        # conftest.amcheck_and_stop fails with it (on a stand-in that is not stopped)
        class Unstopped:
            name, amcheck = gate.name, gate.amcheck

            def stop(self):
                pass
        with pytest.raises(AssertionError, match="tenants_stripe_customer_id_key.*lacks matching index tuple"):
            amcheck_and_stop(Unstopped())

        # test/tools/amcheck.sql exits non-zero and names the index
        r = psql_file(gate, os.path.join(ROOT, "test/tools/amcheck.sql"))
        assert r.returncode != 0, r.stdout + r.stderr
        assert "tenants_stripe_customer_id_key failed" in r.stderr and "1 of" in r.stderr, r.stderr

        # pg_regress's zz_amcheck.sql prints one failure (its expected output: 0)
        r = psql_file(gate, os.path.join(ROOT, "sql/zz_amcheck.sql"))
        assert r.returncode == 0, r.stderr
        assert re.search(r"^\s*t\s*\|\s*1\s*$", r.stdout, re.M) and INDEX in r.stdout, r.stdout
    finally:
        # repaired, the cluster passes again (and amcheck_and_stop ends it green)
        gate.sql(f"REINDEX INDEX {INDEX}")
    assert gate.amcheck()[1] == []


# ---- the valgrind classifier ------------------------------------------------

def vg_log(pid, *reports, finished=True):
    """A memcheck text log as the valgrind layer writes it (--fullpath-after=,
    --show-error-list=yes): reports, then the exit summary."""
    out = [f"=={pid}== Memcheck, a memory error detector", f"=={pid}== Command: postgres -D data", f"=={pid}== "]
    for rep in reports:
        out += [f"=={pid}== {line}" for line in textwrap.dedent(rep).strip("\n").splitlines()] + [f"=={pid}== "]
    if finished:
        out += [f"=={pid}== ERROR SUMMARY: {len(reports)} errors from {len(reports)} contexts (suppressed: 7 from 2)",
                f"--{pid}-- used_suppression:      5 qes-pg-wal-write-padding-flush /x/valgrind-postgres.supp:25",
                f"--{pid}-- used_suppression:      2 qes-pg-regex-cache-memmove /x/valgrind-postgres.supp:70"]
        # -s repeats the reports after the summary: they must not count twice
        for rep in reports:
            out += [f"=={pid}== 1 errors in context 1 of 1:"]
            out += [f"=={pid}== {line}" for line in textwrap.dedent(rep).strip("\n").splitlines()] + [f"=={pid}== "]
    return "\n".join(out) + "\n"


OURS_INVALID_READ = """
Invalid read of size 8
   at 0x87F51DF: outbox_record_one (/work/main/src/outbox.c:412)
   by 0x87F79C8: outbox_turn (/work/main/src/outbox.c:640)
   by 0x4F9AF5: StartBackgroundWorker (in /usr/lib/postgresql/15/bin/postgres)
 Address 0x127583c8 is 8 bytes after a block of size 16 alloc'd
   at 0x48417B4: malloc (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
   by 0x6E0D20: palloc (in /usr/lib/postgresql/15/bin/postgres)
"""
# our code only where the freed block was allocated
OURS_BY_ALLOCATION = """
Invalid read of size 1
   at 0x484A2E4: strlen (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
   by 0x6E0D20: cstring_to_text (in /usr/lib/postgresql/15/bin/postgres)
 Address 0x1 is 0 bytes inside a block of size 4 free'd
   at 0x48417B4: free (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
   by 0x6E0D20: pfree (in /usr/lib/postgresql/15/bin/postgres)
   by 0x87F79C8: qes_redact_text (/build/tree/src/redact.c:88)
"""
# a library without debug information
OURS_BY_OBJECT = """
Conditional jump or move depends on uninitialised value(s)
   at 0x87F51DF: ??? (in /usr/lib/postgresql/15/lib/qes_billing.so)
   by 0x407E0E: ExecInterpExpr (in /usr/lib/postgresql/15/bin/postgres)
"""
# PostgreSQL's own guc.c (with its debug symbols) is not ours
POSTGRES_ONLY = """
Syscall param write(buf) points to uninitialised byte(s)
   at 0x58D1350: write (io/../sysdeps/unix/sysv/linux/write.c:26)
   by 0x6A71BF: set_config_option (./build/../src/backend/utils/misc/guc.c:7712)
   by 0x6A7592: ProcessConfigFile (./build/../src/backend/utils/misc/guc-file.l:190)
"""


def classify(logdir, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "test/tools/valgrind_classify.py"), str(logdir), *args],
                          capture_output=True, text=True, timeout=60)


def test_valgrind_classifier_fails_on_any_report_with_our_frame(tmp_path):
    (tmp_path / "vg.101.log").write_text(vg_log(101, POSTGRES_ONLY))
    r = classify(tmp_path)
    assert r.returncode == 0, r.stdout
    assert "0 reports in qes_billing code, 1 elsewhere; 7 suppressed" in r.stdout, r.stdout

    for pid, rep in ((102, OURS_INVALID_READ), (103, OURS_BY_ALLOCATION), (104, OURS_BY_OBJECT)):
        (tmp_path / f"vg.{pid}.log").write_text(vg_log(pid, rep))
        r = classify(tmp_path)
        assert r.returncode == 1, (pid, r.stdout)
        assert f"--- process {pid}: " in r.stdout, r.stdout     # the offending report is printed
        (tmp_path / f"vg.{pid}.log").unlink()

    # a process killed before its summary: what it wrote counts
    (tmp_path / "vg.105.log").write_text(vg_log(105, OURS_INVALID_READ, finished=False))
    r = classify(tmp_path)
    assert r.returncode == 1 and "1 reports in qes_billing code" in r.stdout, r.stdout
    assert "1 processes ended without valgrind's exit summary" in r.stdout, r.stdout


def test_valgrind_self_test_needs_every_planted_fault(tmp_path):
    planted_read = OURS_INVALID_READ.replace("outbox_record_one (/work/main/src/outbox.c:412)",
                                             "qes_debug_fault_point (/work/main/src/guc.c:691)").replace(
        "Invalid read of size 8", "Invalid read of size 1")
    (tmp_path / "vg.201.log").write_text(vg_log(201, planted_read))
    # only one of the two planted faults reported: the self-test fails
    r = classify(tmp_path, "--planted")
    assert r.returncode == 1 and "planted uninitialised: 0 report(s)" in r.stdout and "MISSED" in r.stdout, r.stdout
    assert classify(tmp_path, "--planted", "invalid_read").returncode == 0
    # no logs at all (valgrind did not run) is a failure, not a pass
    empty = tmp_path / "empty"
    empty.mkdir()
    assert classify(empty).returncode == 1
