"""Where C hard-codes what SQL defines (docs/architecture.md, "Where C depends
on what SQL defines"): every SQL statement the C code sends through SPI is
extracted from src/*.c and prepared against the installed extension, so a
renamed table, column, function or index in sql/install fails here instead
of at run time.

The C reads results by position (SPI_getbinval + DatumGetInt64 and the like),
so a column whose type changes would be misread, not refused.  Every
statement therefore says in C, in a comment right after the call's opening
parenthesis, the type of each result column it returns:

    SPI_prepare(/* result: int8, int4, text, jsonb */ "SELECT ...", ...)

one type per column in order (any name PostgreSQL's regtype accepts), "-"
for a column the C does not read, "none" for a statement that returns no
columns.  The test compares that with the statement's result types as the
server describes them (the protocol's Describe of the prepared statement), and checks the
DatumGet* reads it can see in the C after each statement against it."""
import glob
import os
import re

import psycopg
import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
CALLS = re.compile(r"\b(SPI_prepare|SPI_execute|SPI_execute_with_args|run_bigint)\s*\(")
RESULT = re.compile(r"\s*/\*\s*result:\s*(.*?)\s*\*/", re.S)
LITERAL = re.compile(r'\s*"((?:[^"\\]|\\.)*)"')
# where the C reads results, and what a statement's rows are read after
EXECUTES = re.compile(r"\b(?:SPI_execute|SPI_execute_with_args|SPI_execute_plan|SPI_execute_snapshot|"
                      r"SPI_prepare|run_bigint)\s*\(")
# a kept plan: the reads follow SPI_execute_plan(<its variable>, ...)
PLAN_VAR = re.compile(r"(\w+)\s*=\s*$")
# the datum readers and the type each reads
DATUM_TYPES = {"Int64": "int8", "Int32": "int4", "Int16": "int2", "Bool": "bool",
               "Float8": "float8", "Float4": "float4", "TimestampTz": "timestamptz",
               "Timestamp": "timestamp", "JsonbP": "jsonb", "IntervalP": "interval",
               "TextPP": "text", "TextP": "text", "ObjectId": "oid", "DateADT": "date"}
# the names the annotations may use for the types DatumGet* reads
ALIASES = {"bigint": "int8", "integer": "int4", "smallint": "int2", "boolean": "bool",
           "double precision": "float8", "real": "float4", "timestamp with time zone": "timestamptz",
           "timestamp without time zone": "timestamp"}
READ_DIRECT = re.compile(r"DatumGet(\w+)\(\s*SPI_getbinval\([^;]*?,\s*(\d+)\s*,")
READ_VIA = re.compile(r"(\w+)\s*=\s*SPI_getbinval\([^;]*?,\s*(\d+)\s*,")
READ_TEXT = re.compile(r"\b(?:SPI_getvalue|getvalue_or_null)\([^;]*?,\s*(\d+)\s*\)")
# the C's own helpers that read a column as a type: name, type, the column's argument
READ_HELPERS = [(re.compile(r"\bint64_col\([^;]*?,[^;]*?,\s*(\d+)\s*,"), "int8"),   # catalog_cache.c
                (re.compile(r"\bget_float8\(\s*(\d+)\s*,"), "float8")]                 # worker.c


class Statement:
    def __init__(self, source, line, call, sql, declared, reads):
        self.source, self.line, self.call, self.sql = source, line, call, sql
        self.declared = declared        # list of type names ("-" not read), [] for "none", None if missing
        self.reads = reads              # {column: {type read, or "any" (as text)}}

    def __repr__(self):
        return f"{self.source}:{self.line}"


def _function_end(text, pos):
    """Where the C function around pos ends (a closing brace in column 0)."""
    m = re.compile(r"^}", re.M).search(text, pos)
    return m.start() if m else len(text)


def _reads(region):
    """{column: {type}} of the reads in a piece of C (a helper that hides
    its reads is not seen: only what is seen is checked)."""
    reads = {}
    for m in READ_DIRECT.finditer(region):
        reads.setdefault(int(m.group(2)), set()).add(DATUM_TYPES.get(m.group(1), m.group(1)))
    for m in READ_VIA.finditer(region):
        var, col = m.group(1), int(m.group(2))
        nxt = READ_VIA.search(region, m.end())
        scope = region[m.end():nxt.start() if nxt else len(region)]
        for g in re.finditer(r"DatumGet(\w+)\(\s*" + re.escape(var) + r"\s*\)", scope):
            reads.setdefault(col, set()).add(DATUM_TYPES.get(g.group(1), g.group(1)))
    for m in READ_TEXT.finditer(region):
        reads.setdefault(int(m.group(1)), set()).add("any")
    for pattern, type_ in READ_HELPERS:
        for m in pattern.finditer(region):
            reads.setdefault(int(m.group(1)), set()).add(type_)
    return reads


def statements():
    """A Statement for each SPI call whose first argument is a string literal
    (adjacent literals concatenated, as the C compiler does)."""
    found = []
    for path in sorted(glob.glob(os.path.join(SRC, "*.c"))):
        text = open(path).read()
        for m in CALLS.finditer(text):
            pos, parts, declared = m.end(), [], None
            r = RESULT.match(text, pos)
            if r:
                words = [w.strip() for w in r.group(1).split(",")]
                declared = [] if words == ["none"] else words
                pos = r.end()
            while True:
                lit = LITERAL.match(text, pos)
                if not lit:
                    break
                parts.append(lit.group(1))
                pos = lit.end()
            if not parts:
                continue
            sql = "".join(parts).encode().decode("unicode_escape")
            # the C that reads its rows: after the call (a kept plan: after each
            # SPI_execute_plan of its variable), up to the next statement run
            starts = [m.start()]
            if m.group(1) == "SPI_prepare":
                line_start = text.rfind("\n", 0, m.start()) + 1
                v = PLAN_VAR.search(text[line_start:m.start()])
                if v:
                    starts = [e.start() for e in re.finditer(
                        r"\bSPI_execute_(?:plan|snapshot)\s*\([^,]*\b" + re.escape(v.group(1)) + r"\b", text)]
            reads = {}
            for start in starts:
                nxt = EXECUTES.search(text, start + 1)
                end = min(nxt.start() if nxt else len(text), _function_end(text, start))
                for col, types in _reads(text[start:end]).items():
                    reads.setdefault(col, set()).update(types)
            if m.group(1) == "run_bigint":
                reads.setdefault(1, set()).add("int8")   # run_bigint reads column 1 as int8
            line = text.count("\n", 0, m.start()) + 1
            found.append(Statement(os.path.basename(path), line, m.group(1), sql, declared, reads))
    return found


STATEMENTS = statements()


def test_the_extraction_finds_the_hot_paths():
    files = {s.source for s in STATEMENTS}
    assert {"webhook_intake.c", "counters.c", "catalog_cache.c", "worker.c",
            "outbox.c", "notify.c"} <= files
    assert len(STATEMENTS) >= 15
    # the reads are found where they are (a check that the check looks)
    claim = [s for s in STATEMENTS if "billing.outbox_claim" in s.sql]
    assert claim and claim[0].reads.get(1) == {"int8"} and claim[0].reads.get(5) == {"jsonb"}, claim


def test_every_statement_declares_its_result_types():
    missing = [f"{s}: {s.sql[:60]}" for s in STATEMENTS if s.declared is None]
    assert not missing, "no /* result: ... */ after the call's parenthesis: " + "; ".join(missing)


def test_the_declared_types_are_what_the_c_reads():
    wrong = []
    for s in STATEMENTS:
        if s.declared is None:
            continue
        for col, types in s.reads.items():
            declared = s.declared[col - 1] if col <= len(s.declared) else None
            declared = ALIASES.get(declared, declared)
            if declared in (None, "-"):
                wrong.append(f"{s}: column {col} is read but declared {declared or 'absent'}")
                continue
            for t in types - {"any"}:
                if t != declared:
                    wrong.append(f"{s}: column {col} is read as {t}, declared {declared}")
    assert not wrong, "; ".join(wrong)


def _described(conn, sql):
    """The result types of sql, as the server describes its prepared form."""
    try:
        conn.execute(f"PREPARE qes_contract AS {sql}")
    except psycopg.errors.IndeterminateDatatype:
        conn.rollback()
        # parameters whose type only the C call gives: check the rest with NULLs
        conn.execute("PREPARE qes_contract AS " + re.sub(r"\$\d+", "NULL", sql))
    res = conn.pgconn.describe_prepared(b"qes_contract")
    oids = [res.ftype(i) for i in range(res.nfields)]
    return [conn.execute("SELECT %s::oid::regtype::text", (oid,)).fetchone()[0] for oid in oids]


def _canonical(conn, names):
    return [n if n == "-" else conn.execute("SELECT %s::regtype::text", (n,)).fetchone()[0] for n in names]


@pytest.mark.parametrize("stmt", STATEMENTS, ids=[repr(s) for s in STATEMENTS])
def test_statement_matches_the_schema(pg, stmt):
    with pg.connect() as conn:
        described = _described(conn, stmt.sql)
        if stmt.declared is not None:
            declared = _canonical(conn, stmt.declared)
            assert len(declared) == len(described), \
                f"{stmt}: declares {len(declared)} result columns, the statement returns {described}"
            for i, (d, s) in enumerate(zip(declared, described), 1):
                assert d in ("-", s), f"{stmt}: result column {i} is {s}, the C reads it as {d}"
        conn.rollback()


# ---- the tables the hot paths write without SQL (src/insert_once.c) ---------------
# A QesInsertTarget names its table, the columns it fills (an array of
# names just before it) and the extension's own statement trigger whose work
# the caller does itself.  The values are passed in the C's order with
# Datums of the C's types: the columns must exist with those types, the
# table must have its primary key (the arbiter), and the trigger must be
# there with that function (or it would be fired, or missed, silently).
COLUMNS = re.compile(r"static const char \*const (\w+)\[\]\s*=\s*\{([^}]*)\};")
TYPES = re.compile(r"static const Oid (\w+)\[\]\s*=\s*\{([^}]*)\};")
TARGET = re.compile(r"static QesInsertTarget \w+\s*=\s*\{\s*\"(\w+)\",\s*\"(\w+)\",\s*lengthof\((\w+)\),\s*\w+,\s*"
                    r"(\w+),\s*(\d+),\s*(?:true|false),\s*\"(\w+)\",\s*\"(\w+)\"")
# the type OID macros the C makes its Datums with
OID_MACROS = {"TEXTOID": "text", "INT8OID": "bigint", "INT4OID": "integer", "BOOLOID": "boolean",
              "TIMESTAMPTZOID": "timestamp with time zone", "JSONBOID": "jsonb", "JSONOID": "json"}


def insert_targets():
    found = []
    for path in sorted(glob.glob(os.path.join(SRC, "*.c"))):
        text = open(path).read()
        arrays = {m.group(1): re.findall(r'"(\w+)"', m.group(2)) for m in COLUMNS.finditer(text)}
        types = {m.group(1): [OID_MACROS[t] for t in re.findall(r"\w+", m.group(2))] for m in TYPES.finditer(text)}
        for m in TARGET.finditer(text):
            found.append((os.path.basename(path), m.group(1), m.group(2), arrays[m.group(3)], types[m.group(4)],
                          int(m.group(5)), m.group(6), m.group(7)))
    return found


TARGETS = insert_targets()


def test_the_extraction_finds_the_insert_targets():
    assert {(t[0], t[2]) for t in TARGETS} == {("usage_store.c", "usage_events"),
                                               ("webhook_intake.c", "webhook_events")}, TARGETS


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
def test_insert_target_matches_the_schema(pg, target):
    source, nsp, rel, columns, value_types, nkey, trigger, function = target
    with pg.connect() as conn:
        types = [conn.execute(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
            " WHERE a.attrelid = %s::regclass AND a.attname = %s AND NOT a.attisdropped AND a.attgenerated = ''",
            (f"{nsp}.{rel}", c)).fetchone() for c in columns]
        missing = [c for c, t in zip(columns, types) if t is None]
        assert not missing, f"{source}: {nsp}.{rel} has no column(s) {missing}"
        assert len(value_types) == len(columns), f"{source}: a type per column"
        assert [t[0] for t in types] == value_types, f"{source}: {nsp}.{rel} column types"
        key = conn.execute(
            "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
            " WHERE i.indrelid = %s::regclass AND i.indisprimary", (f"{nsp}.{rel}",)).fetchone()[0]
        assert key == sorted(columns[:nkey]), f"{source}: {nsp}.{rel}'s primary key is {key}"
        assert conn.execute(
            "SELECT p.proname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE t.tgrelid = %s::regclass AND t.tgname = %s AND p.pronamespace = %s::regnamespace",
            (f"{nsp}.{rel}", trigger, nsp)).fetchone() == (function,), \
            f"{source}: {nsp}.{rel} has no trigger {trigger} running {nsp}.{function}()"
