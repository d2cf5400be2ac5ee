"""Drive the `api` schema exactly as PostgREST (v12/v13) does.

One HTTP request = one transaction on a connection logged in as the
`authenticator` role (shared/POSTGREST.md):

1. BEGIN ISOLATION LEVEL READ COMMITTED, READ ONLY for GET/HEAD and for RPC
   on STABLE/IMMUTABLE functions, READ WRITE otherwise;
2. one statement of set_config(..., true): search_path, role, the JWT
   claims, request.method, request.path, request.headers, request.cookies;
3. the db-pre-request function, when one is configured (select api.<fn>());
4. the main query: a CTE around the call or the read, reading
   response.status and response.headers in the same statement;
5. COMMIT, or ROLLBACK on any error, with the SQLSTATE mapped to HTTP
   (SQLSTATE PGRST: the message is the JSON body, the detail the status
   and headers).

This is the one place the tests know PostgREST's behaviour; keep it small.
"""
import json
import re
from dataclasses import dataclass, field

import psycopg
from psycopg import sql


@dataclass
class Response:
    status: int
    body: object
    headers: dict = field(default_factory=dict)
    raw: str = ""


def http_status_for(sqlstate, authenticated):
    """PostgREST's SQLSTATE -> HTTP status mapping."""
    if sqlstate in ("23503", "23505"):
        return 409
    if sqlstate == "42501":
        return 403 if authenticated else 401
    if sqlstate in ("42883", "42P01"):
        return 404
    if sqlstate == "25006":
        return 405
    if sqlstate == "P0001":
        return 400
    if sqlstate.startswith("P0"):
        return 500
    if sqlstate.startswith("08") or (sqlstate.startswith("53") and sqlstate != "53400"):
        return 503
    if sqlstate.startswith("40"):
        return 500
    if re.fullmatch(r"PT\d{3}", sqlstate):
        return int(sqlstate[2:])
    return 400


class PostgREST:
    def __init__(self, dsn, anon_role="qes_anon", schema="api", pre_request=None):
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.anon_role = anon_role
        self.schema = schema
        self.pre_request = pre_request      # db-pre-request, e.g. "api.pre_request"

    def close(self):
        self.conn.close()

    # -- routing ----------------------------------------------------------
    def _routine(self, name):
        row = self.conn.execute(
            """SELECT p.provolatile, p.proargnames, p.proargtypes::regtype[]::text[],
                      p.prorettype::regtype::text, p.pronargs
                 FROM pg_proc p WHERE p.pronamespace = %s::regnamespace AND p.proname = %s""",
            (self.schema, name)).fetchone()
        return row

    def request(self, method, path, *, claims=None, body=None, params=None, headers=None,
                content_type="application/json"):
        method = method.upper()
        params = dict(params or {})
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        headers.setdefault("content-type", content_type)
        authenticated = claims is not None
        claims = dict(claims) if claims else {"role": self.anon_role}
        role = claims.get("role", self.anon_role)

        rpc = path.startswith("/rpc/")
        if rpc:
            name = path[len("/rpc/"):]
            routine = self._routine(name)
            if routine is None:
                return Response(404, {"code": "PGRST202", "message": f"Could not find the function {self.schema}.{name}"})
            volatile = routine[0] == "v"
            read_only = method in ("GET", "HEAD") or not volatile
        else:
            read_only = method in ("GET", "HEAD")

        cur = self.conn.cursor()
        cur.execute("BEGIN ISOLATION LEVEL READ COMMITTED " + ("READ ONLY" if read_only else "READ WRITE"))
        try:
            cur.execute(
                "SELECT set_config('search_path', %s, true), set_config('role', %s, true), "
                "set_config('request.jwt.claims', %s, true), set_config('request.method', %s, true), "
                "set_config('request.path', %s, true), set_config('request.headers', %s, true), "
                "set_config('request.cookies', %s, true)",
                (f'"{self.schema}", "public"', role, json.dumps(claims), method, path,
                 json.dumps(headers), "{}"))
            if self.pre_request:
                cur.execute(sql.SQL("SELECT {}()").format(sql.Identifier(*self.pre_request.split("."))))
            if rpc:
                query, args = self._call_query(name, routine, method, body, params, content_type)
            else:
                query, args = self._read_query(path.lstrip("/"), params)
            cur.execute(query, args)
            row = cur.fetchone()
            cur.execute("COMMIT")
        except psycopg.Error as e:
            cur.execute("ROLLBACK")
            diag = e.diag
            state = diag.sqlstate or "XX000"
            if state == "PGRST":
                # full control: the message is the body, the detail status and headers
                detail = json.loads(diag.message_detail or "{}")
                return Response(int(detail.get("status", 500)), json.loads(diag.message_primary),
                                dict(detail.get("headers", {})))
            return Response(http_status_for(state, authenticated),
                            {"code": state, "message": diag.message_primary,
                             "details": diag.message_detail, "hint": diag.message_hint})
        _total, _page, body_text, resp_headers, resp_status = row
        out_headers = {}
        if resp_headers:
            for h in json.loads(resp_headers):
                out_headers.update(h)
        if rpc and routine[3] == "void":
            status = 204
        else:
            status = 200
        if resp_status:
            status = int(resp_status)
        parsed = json.loads(body_text) if body_text not in (None, "") else None
        return Response(status, parsed, out_headers, body_text or "")

    def _call_query(self, name, routine, method, body, params, content_type):
        fn = sql.Identifier(self.schema, name)
        tail = sql.SQL(
            " SELECT null::bigint AS total_result_set, pg_catalog.count(_postgrest_t) AS page_total, "
            "coalesce((json_agg(_postgrest_t.pgrst_scalar)->0)::text, 'null') AS body, "
            "nullif(current_setting('response.headers', true), '') AS response_headers, "
            "nullif(current_setting('response.status', true), '') AS response_status "
            "FROM (SELECT pgrst_scalar FROM pgrst_source) _postgrest_t")
        argnames = routine[1] or []
        argtypes = routine[2] or []
        if routine[4] == 1 and (not argnames or argnames[0] == "") and method == "POST":
            # single unnamed parameter: the raw body, unchanged
            raw = body if isinstance(body, (str, bytes)) else json.dumps(body if body is not None else {})
            cast = {"json": "json", "jsonb": "jsonb", "text": "text", "bytea": "bytea"}[argtypes[0]]
            q = sql.SQL("WITH pgrst_source AS (SELECT {}({}::" + cast + ") AS pgrst_scalar)").format(
                fn, sql.Placeholder()) + tail
            return q, [raw or "{}"]
        if method == "GET":
            values = params
        else:
            values = body if isinstance(body, dict) else json.loads(body or "{}")
        named = [n for n in argnames if n in values]
        if not named:
            q = sql.SQL("WITH pgrst_source AS (SELECT {}() AS pgrst_scalar)").format(fn) + tail
            return q, []
        cols = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(argtypes[argnames.index(n)])) for n in named)
        call_args = sql.SQL(", ").join(
            sql.SQL("{} := pgrst_args.{}").format(sql.Identifier(n), sql.Identifier(n)) for n in named)
        q = sql.SQL(
            "WITH pgrst_payload AS (SELECT {}::json AS json_data), "
            "pgrst_body AS (SELECT CASE WHEN json_typeof(json_data) = 'array' THEN json_data "
            "ELSE json_build_array(json_data) END AS val FROM pgrst_payload), "
            "pgrst_args AS (SELECT * FROM json_populate_recordset(null::record, (SELECT val FROM pgrst_body)) "
            "AS _({})), "
            "pgrst_source AS (SELECT {}({}) AS pgrst_scalar FROM pgrst_args LIMIT 1)").format(
            sql.Placeholder(), cols, fn, call_args) + tail
        return q, [json.dumps(values)]

    def _read_query(self, relation, params):
        where, order, limit, offset = [], [], None, None
        args = []
        for k, v in params.items():
            if k == "order":
                for part in v.split(","):
                    col, _, direction = part.partition(".")
                    order.append(sql.SQL("{} {}").format(
                        sql.Identifier(col), sql.SQL("DESC" if direction.startswith("desc") else "ASC")))
            elif k == "limit":
                limit = int(v)
            elif k == "offset":
                offset = int(v)
            else:
                op, _, val = v.partition(".")
                ops = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
                where.append(sql.SQL("{} " + ops[op] + " {}").format(sql.Identifier(k), sql.Placeholder()))
                args.append(val)
        src = sql.SQL("SELECT {}.* FROM {}").format(
            sql.Identifier(self.schema, relation), sql.Identifier(self.schema, relation))
        if where:
            src += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        if order:
            src += sql.SQL(" ORDER BY ") + sql.SQL(", ").join(order)
        if limit is not None:
            src += sql.SQL(" LIMIT {}").format(sql.Literal(limit))
        if offset is not None:
            src += sql.SQL(" OFFSET {}").format(sql.Literal(offset))
        q = sql.SQL(
            "WITH pgrst_source AS ({}) SELECT null::bigint AS total_result_set, "
            "pg_catalog.count(_postgrest_t) AS page_total, "
            "coalesce(json_agg(_postgrest_t), '[]')::character varying AS body, "
            "nullif(current_setting('response.headers', true), '') AS response_headers, "
            "nullif(current_setting('response.status', true), '') AS response_status "
            "FROM (SELECT * FROM pgrst_source) _postgrest_t").format(src)
        return q, args

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)
