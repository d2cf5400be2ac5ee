#!/usr/bin/env python3
"""Draft an upgrade script qes_billing--A--B.sql (docs/operations.md, "Upgrades").

    draft.py A B PARTS_DIR  (stdout: the script; stderr: what it found)

Reads the installed install scripts of versions A and B and two databases
of the running cluster (PG* environment): qes_A with CREATE EXTENSION
qes_billing VERSION 'A', qes_B with version B (test/tools/upgrade/draft.sh
makes them).  It writes:

  1. DROP of the views and functions B no longer has, or that CREATE OR
     REPLACE cannot change (another result type, argument names or
     defaults), of what depends on them, and of what depends on a table
     that is made again (its columns do not just append); then
     PARTS_DIR/pre.sql (hand-written: moving such tables aside);
  2. every statement of B's install script that is not in A's, in B's
     order -- functions and triggers as CREATE OR REPLACE, an index whose
     definition changed dropped first, the objects dropped in 1 created
     again, every GRANT and REVOKE -- where a changed CREATE TABLE of an
     existing table becomes ALTER TABLE ... ADD COLUMN for what it appends
     (filled with the default, then SET DEFAULT, SET NOT NULL, the new
     constraints) unless PARTS_DIR/table_<name>.sql replaces it, a DO block
     is replaced by PARTS_DIR/do_<tag>.sql, an INSERT by
     PARTS_DIR/insert_<table>.sql;
  3. PARTS_DIR/post.sql (hand-written: the data).

A draft: test/t/011_upgrade.pl is the check (schema equal to a fresh
install, data carried over)."""
import os
import re
import subprocess
import sys


# ---- splitting a script into statements ------------------------------

def split(text):
    """Yields (raw, code): raw with its leading comments, code without comments."""
    i, n = 0, len(text)
    stmts = []
    raw_start = 0
    code = []
    while i < n:
        c = text[i]
        if c == '\\' and (i == 0 or text[i-1] == '\n') and not ''.join(code).strip():
            j = text.find('\n', i)
            j = n if j < 0 else j + 1
            i = j
            raw_start = i
            continue
        if text.startswith('--', i):
            j = text.find('\n', i)
            j = n if j < 0 else j
            code.append(' ')
            i = j
            continue
        if text.startswith('/*', i):
            depth, j = 1, i + 2
            while depth and j < n:
                if text.startswith('/*', j): depth += 1; j += 2
                elif text.startswith('*/', j): depth -= 1; j += 2
                else: j += 1
            code.append(' ')
            i = j
            continue
        if c == "'":
            j = i + 1
            estr = i > 0 and text[i-1] in 'eE' and (i < 2 or not (text[i-2].isalnum() or text[i-2] == '_'))
            while j < n:
                if estr and text[j] == '\\': j += 2; continue
                if text[j] == "'":
                    if j + 1 < n and text[j+1] == "'": j += 2; continue
                    break
                j += 1
            code.append(text[i:j+1]); i = j + 1
            continue
        if c == '"':
            j = text.find('"', i + 1)
            while j + 1 < n and text[j+1] == '"':
                j = text.find('"', j + 2)
            code.append(text[i:j+1]); i = j + 1
            continue
        if c == '$':
            m = re.match(r'\$([A-Za-z_][A-Za-z_0-9]*)?\$', text[i:])
            if m and (i == 0 or not (text[i-1].isalnum() or text[i-1] == '_')):
                tag = m.group(0)
                j = text.find(tag, i + len(tag))
                code.append(text[i:j+len(tag)]); i = j + len(tag)
                continue
        if c == ';':
            raw = text[raw_start:i+1]
            stmts.append((raw.strip('\n') , re.sub(r'\s+', ' ', ''.join(code)).strip()))
            code = []
            i += 1
            # the rest of the line (a trailing comment) belongs to this statement
            m = re.match(r'[ \t]*(--[^\n]*)?\n?', text[i:])
            if m and m.group(1):
                stmts[-1] = (stmts[-1][0] + m.group(0).rstrip('\n'), stmts[-1][1])
            i += m.end() if m else 0
            raw_start = i
            continue
        code.append(c); i += 1
    rest = text[raw_start:].strip()
    return stmts, rest



A, B, PARTS = sys.argv[1], sys.argv[2], sys.argv[3]
EXT = subprocess.run(['pg_config', '--sharedir'], capture_output=True, text=True, check=True).stdout.strip() + '/extension'
DB_A, DB_B = 'qes_' + A, 'qes_' + B
# the scratch schema the hand-written parts move old tables into
SCRATCH = 'qes_billing_' + A.replace('.', '_')
env = os.environ

def q(db, sql):
    out = subprocess.run(['psql', '-XAtq', '-F', '\t', '-d', db, '-c', sql], env=env,
                         capture_output=True, text=True, check=True).stdout
    return [l.split('\t') for l in out.splitlines() if l != '']

def part(name):
    p = os.path.join(PARTS, name)
    return open(p).read().rstrip('\n') + '\n' if os.path.exists(p) else None

s01, _ = split(open(f'{EXT}/qes_billing--{A}.sql').read())
s02, _ = split(open(f'{EXT}/qes_billing--{B}.sql').read())
codes01 = {c for r, c in s01}

# ---- catalogs ------------------------------------------------------------
FUNCS = """SELECT p.oid::regprocedure::text, n.nspname || '.' || p.proname,
                  pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.prokind
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname IN ('billing', 'api')"""
fa = {r[1]: r for r in q(DB_A, FUNCS)}
fb = {r[1]: r for r in q(DB_B, FUNCS)}
VIEWS = """SELECT c.oid::regclass::text, md5(pg_get_viewdef(c.oid)),
                  (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
                     FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0)
             FROM pg_class c WHERE c.relkind = 'v' AND c.relnamespace IN ('billing'::regnamespace, 'api'::regnamespace)"""
va = {r[0]: r for r in q(DB_A, VIEWS)}
vb = {r[0]: r for r in q(DB_B, VIEWS)}
COLS = """SELECT c.oid::regclass::text, a.attname, format_type(a.atttypid, a.atttypmod)
            FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           WHERE c.relkind = 'r' AND c.relnamespace = 'billing'::regnamespace ORDER BY 1, a.attnum"""
def cols(db):
    d = {}
    for t, n, ty in q(db, COLS):
        d.setdefault(t, []).append((n, ty))
    return d
ca, cb = cols(DB_A), cols(DB_B)

# tables whose A columns are not a prefix of the B ones: made again
rebuild = sorted(t for t in ca if t in cb and cb[t][:len(ca[t])] != ca[t])
changed_tables = sorted(t for t in ca if t in cb and ca[t] != cb[t])
print('rebuilt:', rebuild, file=sys.stderr)
print('changed:', changed_tables, file=sys.stderr)
for t in changed_tables:
    new = [c for c in cb[t] if c not in ca[t]]
    gone = [c for c in ca[t] if c not in cb[t]]
    print(f'  {t}: +{new} -{gone}', file=sys.stderr)

# the dependency graph of A (views, functions, tables, row types), by name
EDGES = """
  WITH o AS (
    SELECT 'pg_class'::regclass AS classid, c.oid AS objid,
           CASE c.relkind WHEN 'v' THEN 'view' WHEN 'r' THEN 'table' ELSE 'rel' END AS kind, c.oid::regclass::text AS ident
      FROM pg_class c WHERE c.relnamespace IN ('billing'::regnamespace, 'api'::regnamespace)
    UNION ALL
    SELECT 'pg_proc'::regclass, p.oid, 'function', p.oid::regprocedure::text
      FROM pg_proc p WHERE p.pronamespace IN ('billing'::regnamespace, 'api'::regnamespace)
    UNION ALL
    SELECT 'pg_type'::regclass, t.oid, 'table', t.typrelid::regclass::text
      FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid AND c.relkind = 'r'
     WHERE t.typnamespace = 'billing'::regnamespace
    UNION ALL
    SELECT 'pg_rewrite'::regclass, r.oid, 'view', r.ev_class::regclass::text
      FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class AND c.relkind = 'v'
     WHERE c.relnamespace IN ('billing'::regnamespace, 'api'::regnamespace))
  SELECT DISTINCT a.kind, a.ident, b.kind, b.ident
    FROM pg_depend d JOIN o a ON a.classid = d.classid AND a.objid = d.objid
    JOIN o b ON b.classid = d.refclassid AND b.objid = d.refobjid
   WHERE d.deptype = 'n' AND a.ident <> b.ident"""
edges = q(DB_A, EDGES)
def dependents_of(idents):
    """(kind, ident) of everything depending on idents, recursively"""
    found, todo = set(), list(idents)
    while todo:
        x = todo.pop()
        for k, i, rk, ri in edges:
            if ri == x and (k, i) not in found and k in ('view', 'function'):
                found.add((k, i)); todo.append(i)
    return found

deps = dependents_of(rebuild)
print('dependents of rebuilt tables:', sorted(deps), file=sys.stderr)

drop_views = set()
drop_funcs = {}           # name -> identity in A
recreate = set()          # names (qualified) of views/functions created again from B
def add_drop(kind, ident):
    if kind == 'view':
        drop_views.add(ident)
        if ident in vb: recreate.add(ident)
    else:
        name = ident.split('(')[0]
        drop_funcs[name] = ident
        if name in fb: recreate.add(name)
for kind, ident in deps:
    add_drop(kind, ident)
for v in va:
    if v not in vb or va[v][1:] != vb[v][1:]:
        add_drop('view', v)
for name, r in fa.items():
    if name not in fb or r[0] != fb[name][0] or r[3] != fb[name][3] or r[2] != fb[name][2]:
        # gone, or another signature, result or argument names/defaults:
        # CREATE OR REPLACE cannot change those
        add_drop('function', r[0])
# what depends on the dropped views and functions goes too
for kind, ident in dependents_of(list(drop_views) + list(drop_funcs.values())):
    add_drop(kind, ident)
vdeps = [(i, ri) for k, i, rk, ri in edges if k == 'view' and rk == 'view']

# order view drops: dependents first
order = []
def visit(v, seen=set()):
    if v in seen: return
    seen.add(v)
    for a_, b_ in vdeps:
        if b_ == v and a_ in drop_views: visit(a_)
    order.append(v)
for v in sorted(drop_views): visit(v)

print('drop views:', order, file=sys.stderr)
print('drop functions:', drop_funcs, file=sys.stderr)

def seed_rows():
    """billing.seed_rows (new in 0.2), made by A's own seed statements into copies"""
    seeded = ['metrics', 'plans', 'plan_limits', 'prices', 'clock', 'audit_head']
    res = ['-- (upgrade) billing.seed_rows holds the rows as CREATE EXTENSION made them',
           f'-- (in {A}), not as they are now: a row an operator changed since is no',
           f'-- longer its seed, and pg_dump keeps it.  {A}\'s own seed statements make',
           '-- them again, into copies of the tables.']
    for t in seeded:
        res.append(f'CREATE TABLE {SCRATCH}.seed_{t} (LIKE billing.{t} INCLUDING DEFAULTS);')
    for raw, code in s01:
        m = re.match(r'INSERT INTO billing\.(\w+)', code)
        if m and m.group(1) in seeded:
            body = re.sub(r'^(?:--[^\n]*\n)*', '', raw.strip('\n'))
            res.append(body.replace('INSERT INTO billing.' + m.group(1), f'INSERT INTO {SCRATCH}.seed_' + m.group(1), 1))
    res.append('INSERT INTO billing.seed_rows\n' + '\nUNION ALL '.join(
        f"SELECT '{t}', pg_catalog.to_jsonb(t) FROM {SCRATCH}.seed_{t} t" for t in seeded) + ';')
    return '\n'.join(res)

# ---- a table that gains columns at its end ----------------------------------
# Columns and constraints added by ALTER TABLE statements of B's script are
# left to those statements.
altered_cols, altered_cons = set(), set()
for raw, code in s02:
    m = re.match(r'ALTER TABLE ([\w.]+)', code, re.I)
    if m:
        altered_cols |= {(m.group(1), c) for c in re.findall(r'ADD COLUMN (\w+)', code, re.I)}
        altered_cons |= {(m.group(1), c) for c in re.findall(r'ADD CONSTRAINT (\w+)', code, re.I)}
COLDEFS = """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    pg_get_expr(d.adbin, d.adrelid)
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = '%s'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"""
CONS = """SELECT c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c
           WHERE c.conrelid = '%s'::regclass ORDER BY c.contype <> 'c', c.conname"""

def append_columns(t, raw):
    """ALTER TABLE for the columns (and their constraints) a changed CREATE
    TABLE appends.  A column gets its default only once its rows are filled,
    so that the table holds no "missing value" a fresh one has not."""
    have = {c for c, _ in ca[t]}
    cons_a = {r[0] for r in q(DB_A, CONS % t)}
    res = [f'-- (upgrade) what {B} adds to {t}']
    fill = []
    for name, typ, notnull, default in q(DB_B, COLDEFS % t):
        if name in have or (t, name) in altered_cols:
            continue
        res.append(f'ALTER TABLE {t} ADD COLUMN {name} {typ};')
        if default:
            fill.append(f'UPDATE {t} SET {name} = {default};')
            fill.append(f'ALTER TABLE {t} ALTER COLUMN {name} SET DEFAULT {default};')
        if notnull == 't':
            if not default:
                warnings.append(f'{t}.{name} is NOT NULL without a default: fill it in a part')
            fill.append(f'ALTER TABLE {t} ALTER COLUMN {name} SET NOT NULL;')
    res += fill
    for name, definition in q(DB_B, CONS % t):
        if name not in cons_a and (t, name) not in altered_cons:
            res.append(f'ALTER TABLE {t} ADD CONSTRAINT {name} {definition};')
    if len(res) == 1:
        warnings.append(f'{t}: its CREATE TABLE changed, but no column or constraint was added: check it')
    return '\n'.join(res)

# ---- statements ------------------------------------------------------------
rebuilt_names = set(rebuild)
def refs_rebuilt(code):
    return any(re.search(r'\b' + re.escape(t) + r'\b', code) for t in rebuilt_names)

tables01 = set(ca)
do_tags01 = {m.group(1) for r, c in s01 for m in [re.match(r'DO \$(\w*)\$', c, re.I)] if m}
idx01 = {m.group(1) for r, c in s01 for m in [re.match(r'CREATE (?:UNIQUE )?INDEX (\w+) ON', c, re.I)] if m}
out = []
warnings = []
created_tables = set()
for raw, code in s02:
    up = code.upper()
    m_fn = re.match(r'CREATE (?:OR REPLACE )?FUNCTION ([\w.]+)\s*\(', code, re.I)
    m_tab = re.match(r'CREATE TABLE ([\w.]+)', code, re.I)
    m_idx = re.match(r'CREATE (?:UNIQUE )?INDEX (\w+) ON ([\w.]+)', code, re.I)
    m_trg = re.match(r'CREATE (?:OR REPLACE )?TRIGGER (\w+) .*? ON ([\w.]+) ', code, re.I)
    m_view = re.match(r'CREATE (?:OR REPLACE )?VIEW ([\w.]+)', code, re.I)
    m_cmt = re.match(r'COMMENT ON (\w+) ([\w.]+)', code, re.I)
    m_alt = re.match(r'ALTER TABLE ([\w.]+)', code, re.I)
    m_ins = re.match(r'INSERT INTO ([\w.]+)', code, re.I)
    m_do = re.match(r'DO (\$\w*\$)', code, re.I)
    same = code in codes01
    if m_fn:
        name = m_fn.group(1)
        if same and name not in recreate:
            continue
        out.append(re.sub(r'CREATE FUNCTION', 'CREATE OR REPLACE FUNCTION', raw, count=1))
    elif m_tab:
        t = m_tab.group(1)
        if t not in tables01 or t in rebuilt_names:
            out.append(raw)
            continue
        if same:
            continue
        rep = part('table_' + t.split('.')[1] + '.sql')
        if rep is None:
            out.append(append_columns(t, raw))
        else:
            out.append(rep.rstrip('\n'))
    elif m_idx:
        if same and not refs_rebuilt(code):
            continue
        schema = m_idx.group(2).split('.')[0]
        if m_idx.group(1) in idx01 and not refs_rebuilt(code):
            # another definition of an index of A
            out.append(f'DROP INDEX {schema}.{m_idx.group(1)};\n' + raw)
        else:
            out.append(raw)
    elif m_trg:
        if same and not refs_rebuilt(code):
            continue
        out.append(re.sub(r'CREATE TRIGGER', 'CREATE OR REPLACE TRIGGER', raw, count=1))
    elif m_view:
        v = m_view.group(1)
        if same and v not in recreate:
            continue
        out.append(raw)
    elif m_cmt:
        kind, target = m_cmt.group(1).upper(), m_cmt.group(2)
        base = target if kind != 'COLUMN' else target.rsplit('.', 1)[0]
        if same and base not in recreate and not refs_rebuilt(code):
            continue
        out.append(raw)
    elif m_alt:
        if same and not refs_rebuilt(code):
            continue
        out.append(raw)
    elif m_ins and m_ins.group(1) == 'billing.seed_rows':
        out.append(seed_rows())
    elif m_ins:
        t = m_ins.group(1)
        rep = part('insert_' + t.split('.')[1] + '.sql')
        if rep is not None:
            out.append(rep.rstrip('\n'))
        elif t not in tables01:
            out.append(raw)
        elif not same:
            warnings.append(f'changed seed rows of {t}')
            out.append('-- FIXME changed insert\n' + raw)
    elif m_do:
        tag = m_do.group(1).strip('$')
        rep = part('do_' + tag + '.sql')
        if rep is not None:
            out.append(rep.rstrip('\n'))
        elif same:
            continue
        else:
            if tag in do_tags01:
                warnings.append(f'changed DO block {tag}: it runs again as it is in {B}, unless do_{tag}.sql replaces it')
            out.append(raw)
    elif up.startswith('GRANT') or up.startswith('REVOKE'):
        out.append(raw)
    elif up.startswith('SELECT'):
        out.append(raw)
    elif up.startswith('DROP INDEX'):
        if not same: out.append(raw)
    else:
        if not same:
            warnings.append('other statement: ' + code[:80])
            out.append(raw)

# ---- assemble --------------------------------------------------------------
res = []
res.append(part('header.sql'))
res.append(f'\n-- ---- 1. what {B} no longer has, or creates again ' + '-' * 30 + '\n')
res.append(''.join(f'DROP VIEW {v};\n' for v in order))   # dependents first
for name in sorted(drop_funcs):
    res.append(f'DROP FUNCTION {drop_funcs[name]};\n')
pre = part('pre.sql')
if pre: res.append('\n' + pre)
res.append(f'\n-- ---- 2. the {B} install script where it differs from {A}, in its order ' + '-' * 10 + '\n\n')
res.append('\n\n'.join(out) + '\n')
post = part('post.sql')
if post: res.append('\n' + post)
sys.stdout.write(''.join(x for x in res if x))
for w in warnings:
    print('WARNING:', w, file=sys.stderr)
