/*-------------------------------------------------------------------------
 *
 * webhook_intake.c
 *	  api.stripe_webhook(json): verify, store, acknowledge (docs/architecture.md, rule 5).
 *
 * PostgREST calls it for POST /rpc/stripe_webhook with the raw body (a
 * single unnamed json parameter keeps Stripe's bytes) and the request
 * headers in the request.headers setting.  In C, because it is the hot
 * path of every delivery: the signature is checked over the bytes as they
 * are (webhook_signature.c), and only the event's top-level fields are read
 * (id, type, created, livemode, api_version, and that data.object is an
 * object) by a bounds-checked scanner instead of building the whole jsonb.
 * The body has been checked to be JSON by json's input function already; the
 * scanner still never reads past the end and gives up on anything unexpected
 * (which rejects the delivery as not_an_event).  Keys are matched as written:
 * Stripe never escapes them.  A repeated key counts with its last value, as
 * in jsonb (which is how the worker reads the payload).
 *
 * A new event is inserted into billing.webhook_events through a kept INSERT
 * plan (the insert's trigger wakes the worker at commit); a known one
 * answers 200 and stores nothing.
 * A refused delivery is handed to billing.webhook_reject(), which records and
 * audits it and sets the HTTP status.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/timestamp.h"

#include "catalog_cache.h"
#include "guc.h"
#include "webhook_signature.h"

PG_FUNCTION_INFO_V1(qes_stripe_webhook_fn);

/* ---- a scanner for the top level of a JSON object --------------------- */

typedef struct JsonSpan
{
	const char *start;			/* the raw value, as written */
	int			len;
	bool		present;
} JsonSpan;

typedef struct JsonScan
{
	const char *p;
	const char *end;
} JsonScan;

static void
skip_ws(JsonScan *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

/* past a string whose opening quote is at s->p */
static bool
skip_string(JsonScan *s)
{
	s->p++;
	while (s->p < s->end)
	{
		if (*s->p == '\\')
			s->p += 2;
		else if (*s->p == '"')
		{
			s->p++;
			return true;
		}
		else
			s->p++;
	}
	return false;
}

/* past one value of any kind */
static bool
skip_value(JsonScan *s)
{
	int			depth = 0;

	if (s->p >= s->end)
		return false;
	if (*s->p == '"')
		return skip_string(s);
	if (*s->p != '{' && *s->p != '[')
	{
		/* number, true, false, null */
		while (s->p < s->end && *s->p != ',' && *s->p != '}' && *s->p != ']' &&
			   *s->p != ' ' && *s->p != '\t' && *s->p != '\n' && *s->p != '\r')
			s->p++;
		return true;
	}
	while (s->p < s->end)
	{
		char		c = *s->p;

		if (c == '"')
		{
			if (!skip_string(s))
				return false;
			continue;
		}
		if (c == '{' || c == '[')
			depth++;
		else if (c == '}' || c == ']')
		{
			depth--;
			if (depth == 0)
			{
				s->p++;
				return true;
			}
		}
		s->p++;
	}
	return false;
}

/*
 * JsonScan the object at [p, end): for each key in keys[] (NULL-terminated),
 * the raw span of its (last) value.  False when this is not an object.
 */
static bool
scan_object(const char *p, const char *end, const char *const *keys, JsonSpan *out)
{
	JsonScan		s = {p, end};

	for (int i = 0; keys[i]; i++)
		out[i].present = false;
	skip_ws(&s);
	if (s.p >= s.end || *s.p != '{')
		return false;
	s.p++;
	skip_ws(&s);
	if (s.p < s.end && *s.p == '}')
		return true;
	for (;;)
	{
		const char *kstart;
		int			klen;
		const char *vstart;

		skip_ws(&s);
		if (s.p >= s.end || *s.p != '"')
			return false;
		kstart = s.p + 1;
		if (!skip_string(&s))
			return false;
		klen = (int) (s.p - 1 - kstart);
		skip_ws(&s);
		if (s.p >= s.end || *s.p != ':')
			return false;
		s.p++;
		skip_ws(&s);
		vstart = s.p;
		if (!skip_value(&s))
			return false;
		for (int i = 0; keys[i]; i++)
		{
			if ((int) strlen(keys[i]) == klen && memcmp(keys[i], kstart, klen) == 0)
			{
				out[i].start = vstart;
				out[i].len = (int) (s.p - vstart);
				out[i].present = true;
			}
		}
		skip_ws(&s);
		if (s.p < s.end && *s.p == ',')
		{
			s.p++;
			continue;
		}
		return s.p < s.end && *s.p == '}';
	}
}

/* a string value without escapes, as a palloc'd C string; NULL otherwise */
static char *
plain_string(const JsonSpan *v)
{
	if (!v->present || v->len < 2 || v->start[0] != '"' || v->start[v->len - 1] != '"' ||
		memchr(v->start, '\\', v->len) != NULL)
		return NULL;
	return pnstrdup(v->start + 1, v->len - 2);
}

static bool
span_is(const JsonSpan *v, const char *literal)
{
	return v->present && v->len == (int) strlen(literal) && memcmp(v->start, literal, v->len) == 0;
}

/* an integer value (no fraction or exponent) */
static bool
span_int64(const JsonSpan *v, int64 *out)
{
	int64		n = 0;
	int			i = 0;
	bool		neg = false;

	if (!v->present || v->len == 0 || v->len > 18)
		return false;
	if (v->start[0] == '-')
		neg = true, i = 1;
	if (i >= v->len)
		return false;
	for (; i < v->len; i++)
	{
		if (v->start[i] < '0' || v->start[i] > '9')
			return false;
		n = n * 10 + (v->start[i] - '0');
	}
	*out = neg ? -n : n;
	return true;
}

static bool
valid_event_id(const char *id)
{
	if (id == NULL || strncmp(id, "evt_", 4) != 0 || id[4] == '\0' || strlen(id) > 255)
		return false;
	for (const char *c = id + 4; *c; c++)
		if (!((*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_'))
			return false;
	return true;
}

/* the Stripe-Signature header from request.headers (lower-cased names) */
static char *
signature_header(void)
{
	static const char *const keys[] = {"stripe-signature", NULL};
	const char *headers = GetConfigOption("request.headers", true, false);
	JsonSpan	v[1];

	if (headers == NULL || headers[0] == '\0' ||
		!scan_object(headers, headers + strlen(headers), keys, v))
		return NULL;
	return plain_string(&v[0]);
}

/* ---- the inbox row ------------------------------------------------------- */

static SPIPlanPtr store_plan = NULL;

typedef struct StoreArgs
{
	const char *id;
	const char *type;
	bool		live;
	const char *api_version;
	TimestampTz created;
	text	   *payload;
	bool		stored;
} StoreArgs;

static void
store_cb(void *arg)
{
	StoreArgs  *a = (StoreArgs *) arg;
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	int			rc;

	if (store_plan == NULL)
	{
		Oid			types[6] = {TEXTOID, TEXTOID, BOOLOID, TEXTOID, TIMESTAMPTZOID, JSONOID};
		SPIPlanPtr	plan;

		plan = SPI_prepare("INSERT INTO billing.webhook_events"
						   " (stripe_event_id, event_type, livemode, api_version, stripe_created, payload)"
						   " VALUES ($1, $2, $3, $4, $5, $6)"
						   " ON CONFLICT (stripe_event_id) DO NOTHING",
						   6, types);
		if (plan == NULL)
			elog(ERROR, "qes_billing: could not prepare the inbox insert: %s",
				 SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		store_plan = plan;
	}
	values[0] = CStringGetTextDatum(a->id);
	values[1] = CStringGetTextDatum(a->type);
	values[2] = BoolGetDatum(a->live);
	values[3] = a->api_version ? CStringGetTextDatum(a->api_version) : (Datum) 0;
	nulls[3] = a->api_version ? ' ' : 'n';
	values[4] = TimestampTzGetDatum(a->created);
	values[5] = PointerGetDatum(a->payload);	/* json is text inside */
	rc = SPI_execute_plan(store_plan, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "qes_billing: inbox insert failed: %s", SPI_result_code_string(rc));
	a->stored = (SPI_processed == 1);
}

/*
 * Store the event in billing.webhook_events unless its id is there already;
 * returns whether it was new.  Through PostgreSQL's INSERT (a kept SPI
 * plan, as the table owner), so the row reaches every index the table has
 * now, its constraints, defaults and triggers (the insert trigger wakes the
 * worker at commit), and a read-only transaction or a standby refuses it
 * (docs/architecture.md, "Direct writes").  ON CONFLICT DO NOTHING: two
 * deliveries of one new event at once, the second waits for the first and
 * answers "duplicate" if it commits, or stores the event if it rolls back.
 */
static bool
store_event(const char *id, const char *type, bool live, const char *api_version,
			TimestampTz created, text *payload)
{
	StoreArgs	a = {id, type, live, api_version, created, payload, false};

	qes_run_as_owner(store_cb, &a);
	return a.stored;
}

/* ---- the endpoint ------------------------------------------------------- */

static Datum
reject(const char *reason, const char *id, const char *type)
{
	Oid			argtypes[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		args[3];
	char		nulls[3] = {' ', ' ', ' '};
	bool		isnull;
	Datum		result;

	args[0] = CStringGetTextDatum(reason);
	args[1] = id ? CStringGetTextDatum(id) : (Datum) 0;
	nulls[1] = id ? ' ' : 'n';
	args[2] = type ? CStringGetTextDatum(type) : (Datum) 0;
	nulls[2] = type ? ' ' : 'n';
	if (SPI_execute_with_args("SELECT billing.webhook_reject($1, $2, $3)", 3, argtypes, args, nulls,
							  false, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "billing.webhook_reject failed");
	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return SPI_datumTransfer(result, false, -1);
}

/*
 * api.stripe_webhook(json) returns json
 */
Datum
qes_stripe_webhook_fn(PG_FUNCTION_ARGS)
{
	static const char *const event_keys[] = {"id", "type", "created", "livemode", "api_version", "data", NULL};
	static const char *const data_keys[] = {"object", NULL};
	text	   *body;
	const char *payload;
	int			len;
	char	   *header;
	const char *secrets;
	QesSigResult sig;
	int64		now_s;
	JsonSpan	ev[6];
	JsonSpan	data[1];
	char	   *id = NULL;
	char	   *type = NULL;
	char	   *api_version = NULL;
	int64		created = 0;
	bool		live = qes_live_mode();
	const char *reason = NULL;
	Datum		result;
	StringInfoData out;
	MemoryContext upper = CurrentMemoryContext;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the webhook body must not be null")));
	/* it writes (the event, or the refusal): 25006 on a standby or when fenced */
	PreventCommandIfReadOnly("api.stripe_webhook()");
	body = PG_GETARG_TEXT_PP(0);
	payload = VARDATA_ANY(body);
	len = VARSIZE_ANY_EXHDR(body);

	/* the configured secret(s); without one, what --setup-webhook stored */
	secrets = qes_stripe_key(QES_KEY_WEBHOOK, true);
	if (secrets == NULL)
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (SPI_execute("SELECT billing.stored_webhook_secrets()", true, 1) == SPI_OK_SELECT &&
			SPI_processed == 1)
		{
			char	   *stored = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

			secrets = stored ? MemoryContextStrdup(upper, stored) : NULL;
		}
		SPI_finish();
	}

	header = signature_header();
	now_s = GetCurrentTimestamp() / USECS_PER_SEC +
		(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY;
	sig = qes_verify_stripe_signature(header, payload, len, secrets, qes_webhook_tolerance_s, now_s);

	if (sig != QES_SIG_OK)
		reason = qes_sig_result_code(sig);
	else if (!scan_object(payload, payload + len, event_keys, ev) ||
			 !valid_event_id(id = plain_string(&ev[0])) ||
			 (type = plain_string(&ev[1])) == NULL || type[0] == '\0' ||
			 !span_int64(&ev[2], &created) || created < 0 || created > INT64CONST(100000000000) ||
			 !(span_is(&ev[3], "true") || span_is(&ev[3], "false")) ||
			 !ev[5].present ||
			 !scan_object(ev[5].start, ev[5].start + ev[5].len, data_keys, data) ||
			 !data[0].present || data[0].start[0] != '{')
		reason = "not_an_event";
	else if (span_is(&ev[3], "true") != live)
		reason = "wrong_mode";

	if (reason != NULL)
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		result = reject(reason, id, type);
		SPI_finish();
		PG_RETURN_DATUM(result);
	}
	api_version = plain_string(&ev[4]);

	/* store it, once per event id */
	{
		bool		is_new;

		is_new = store_event(id, type, live, api_version,
							 (created - (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY) * USECS_PER_SEC,
							 body);
		initStringInfo(&out);
		appendStringInfo(&out, "{\"received\": true, \"duplicate\": %s, \"event_id\": ",
						 is_new ? "false" : "true");
		escape_json(&out, id);
		appendStringInfoChar(&out, '}');
	}
	PG_RETURN_TEXT_P(cstring_to_text_with_len(out.data, out.len));
}
