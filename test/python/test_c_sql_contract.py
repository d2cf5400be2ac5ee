"""Where C hard-codes what SQL defines (docs/architecture.md, "Where C depends
on what SQL defines"): every SQL statement the C code sends through SPI is
extracted from src/*.c and prepared against the installed extension, so a
renamed table, column, function or index in sql/install fails here instead
of at run time."""
import glob
import os
import re

import psycopg
import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
CALLS = re.compile(r"\b(SPI_prepare|SPI_execute|SPI_execute_with_args|run_bigint)\s*\(")
LITERAL = re.compile(r'\s*"((?:[^"\\]|\\.)*)"')


def statements():
    """(file, sql) for each SPI call whose first argument is a string literal
    (adjacent literals concatenated, as the C compiler does)."""
    found = []
    for path in sorted(glob.glob(os.path.join(SRC, "*.c"))):
        text = open(path).read()
        for m in CALLS.finditer(text):
            pos, parts = m.end(), []
            while True:
                lit = LITERAL.match(text, pos)
                if not lit:
                    break
                parts.append(lit.group(1))
                pos = lit.end()
            if parts:
                sql = "".join(parts).encode().decode("unicode_escape")
                found.append((os.path.basename(path), sql))
    return found


STATEMENTS = statements()


def test_the_extraction_finds_the_hot_paths():
    files = {f for f, _ in STATEMENTS}
    assert {"usage_store.c", "webhook_intake.c", "counters.c", "catalog_cache.c", "worker.c"} <= files
    assert len(STATEMENTS) >= 15


@pytest.mark.parametrize("source,sql", STATEMENTS, ids=[f"{f}:{i}" for i, (f, _) in enumerate(STATEMENTS)])
def test_statement_matches_the_schema(pg, source, sql):
    with pg.connect() as conn:
        try:
            conn.execute(f"PREPARE qes_contract AS {sql}")
        except psycopg.errors.IndeterminateDatatype:
            conn.rollback()
            # parameters whose type only the C call gives: check the rest with NULLs
            conn.execute("PREPARE qes_contract AS " + re.sub(r"\$\d+", "NULL", sql))
        conn.rollback()
