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
#include "guard.h"
#include "guc.h"
#include "webhook_intake.h"
#include "webhook_signature.h"

/* 2011-01-01T00:00:00Z: no Stripe event is older */
#define QES_EARLIEST_EVENT	INT64CONST(1293840000)

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
scan_object(const char *p, const char *end, const char *const *keys, JsonSpan *out,
			bool *escaped_key)
{
	JsonScan		s = {p, end};

	if (escaped_key)
		*escaped_key = false;

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
		if (escaped_key && memchr(kstart, '\\', klen) != NULL)
			*escaped_key = true;
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

static int
hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static bool
hex4(const char *p, const char *end, int *out)
{
	int			v = 0;

	if (end - p < 4)
		return false;
	for (int i = 0; i < 4; i++)
	{
		int			h = hex_value(p[i]);

		if (h < 0)
			return false;
		v = v * 16 + h;
	}
	*out = v;
	return true;
}

static void
append_utf8(StringInfo buf, int cp)
{
	if (cp < 0x80)
		appendStringInfoChar(buf, (char) cp);
	else if (cp < 0x800)
	{
		appendStringInfoChar(buf, (char) (0xC0 | (cp >> 6)));
		appendStringInfoChar(buf, (char) (0x80 | (cp & 0x3F)));
	}
	else if (cp < 0x10000)
	{
		appendStringInfoChar(buf, (char) (0xE0 | (cp >> 12)));
		appendStringInfoChar(buf, (char) (0x80 | ((cp >> 6) & 0x3F)));
		appendStringInfoChar(buf, (char) (0x80 | (cp & 0x3F)));
	}
	else
	{
		appendStringInfoChar(buf, (char) (0xF0 | (cp >> 18)));
		appendStringInfoChar(buf, (char) (0x80 | ((cp >> 12) & 0x3F)));
		appendStringInfoChar(buf, (char) (0x80 | ((cp >> 6) & 0x3F)));
		appendStringInfoChar(buf, (char) (0x80 | (cp & 0x3F)));
	}
}

/*
 * A JSON string value decoded as JSON decodes it (every escape, surrogate
 * pairs), palloc'd; NULL when it is not a string, or holds \u0000 or an
 * unpaired surrogate (which no text value can hold).
 */
static char *
json_string(const JsonSpan *v)
{
	const char *p;
	const char *end;
	StringInfoData buf;

	if (!v->present || v->len < 2 || v->start[0] != '"' || v->start[v->len - 1] != '"')
		return NULL;
	p = v->start + 1;
	end = v->start + v->len - 1;
	initStringInfo(&buf);
	while (p < end)
	{
		int			cp;

		if (*p != '\\')
		{
			appendStringInfoChar(&buf, *p++);
			continue;
		}
		if (++p >= end)
			return NULL;
		switch (*p++)
		{
			case '"':
				appendStringInfoChar(&buf, '"');
				break;
			case '\\':
				appendStringInfoChar(&buf, '\\');
				break;
			case '/':
				appendStringInfoChar(&buf, '/');
				break;
			case 'b':
				appendStringInfoChar(&buf, '\b');
				break;
			case 'f':
				appendStringInfoChar(&buf, '\f');
				break;
			case 'n':
				appendStringInfoChar(&buf, '\n');
				break;
			case 'r':
				appendStringInfoChar(&buf, '\r');
				break;
			case 't':
				appendStringInfoChar(&buf, '\t');
				break;
			case 'u':
				if (!hex4(p, end, &cp))
					return NULL;
				p += 4;
				if (cp == 0 || (cp >= 0xDC00 && cp <= 0xDFFF))
					return NULL;
				if (cp >= 0xD800 && cp <= 0xDBFF)
				{
					int			lo;

					if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, end, &lo) ||
						lo < 0xDC00 || lo > 0xDFFF)
						return NULL;
					p += 6;
					cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
				}
				append_utf8(&buf, cp);
				break;
			default:
				return NULL;
		}
	}
	return buf.data;
}

/*
 * Does the JSON text hold an escape that jsonb refuses (\u0000, an
 * unpaired surrogate)?  The worker casts each payload to jsonb; such an
 * event could never be applied.
 */
static bool
has_unstorable_escape(const char *p, const char *end)
{
	while (p < end)
	{
		int			cp;

		if (*p != '\\')
		{
			p++;
			continue;
		}
		if (p + 1 >= end)
			return true;
		if (p[1] != 'u')
		{
			p += 2;
			continue;
		}
		if (!hex4(p + 2, end, &cp))
			return true;
		p += 6;
		if (cp == 0 || (cp >= 0xDC00 && cp <= 0xDFFF))
			return true;
		if (cp >= 0xD800 && cp <= 0xDBFF)
		{
			int			lo;

			if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, end, &lo) ||
				lo < 0xDC00 || lo > 0xDFFF)
				return true;
			p += 6;
		}
	}
	return false;
}

/*
 * A top-level string member of a JSON object text, decoded; NULL when
 * absent, not a string, or the text is not an object.
 */
char *
qes_json_top_level_string(const char *json, const char *key)
{
	const char *keys[2] = {key, NULL};
	JsonSpan	v[1];

	if (json == NULL || !scan_object(json, json + strlen(json), keys, v, NULL))
		return NULL;
	return json_string(&v[0]);
}

/*
 * A request header PostgREST passed in request.headers (a JSON object with
 * lower-cased names), its value decoded as the JSON it is; NULL when absent.
 */
char *
qes_request_header(const char *name)
{
	return qes_json_top_level_string(GetConfigOption("request.headers", true, false), name);
}

/* Stripe's event types: "invoice.paid", "customer.subscription.updated", ... */
static bool
valid_event_type(const char *type)
{
	int			dots = 0;
	size_t		len = strlen(type);

	if (len < 3 || len > 100 || type[0] == '.' || type[len - 1] == '.')
		return false;
	for (const char *c = type; *c; c++)
	{
		if (*c == '.')
		{
			if (c[1] == '.')
				return false;
			dots++;
		}
		else if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_'))
			return false;
	}
	return dots >= 1;
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

/*
 * Refuse a delivery: counted in shared memory (guard.c: no write, no audit
 * lock; the worker rolls the counts up into webhook_rejections and the
 * audit log about once a minute), answered with its HTTP status and reason.
 */
static Datum
reject(QesRejectReason reason, bool live)
{
	StringInfoData out;

	qes_guard_count_rejection(reason);
	/* no secret is our configuration, not the sender: 500, so that Stripe retries */
	(void) set_config_option("response.status", reason == QES_REJECT_NO_SECRET ? "500" : "400",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	initStringInfo(&out);
	appendStringInfoString(&out, "{\"error\" : ");
	escape_json(&out, qes_reject_reason_message(reason, live));
	appendStringInfoString(&out, ", \"reason\" : ");
	escape_json(&out, qes_reject_reason_name(reason));
	appendStringInfoChar(&out, '}');
	PG_RETURN_TEXT_P(cstring_to_text_with_len(out.data, out.len));
}

static QesRejectReason
sig_reason(QesSigResult sig)
{
	switch (sig)
	{
		case QES_SIG_NO_HEADER:
			return QES_REJECT_NO_HEADER;
		case QES_SIG_NO_SECRET:
			return QES_REJECT_NO_SECRET;
		case QES_SIG_MALFORMED:
			return QES_REJECT_MALFORMED;
		case QES_SIG_NO_V1:
			return QES_REJECT_NO_V1;
		case QES_SIG_MISMATCH:
			return QES_REJECT_MISMATCH;
		case QES_SIG_STALE:
		case QES_SIG_OK:
			break;
	}
	return QES_REJECT_STALE;
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
	int64		now_unix_s;
	bool		escaped = false;
	bool		data_escaped = false;
	JsonSpan	ev[6];
	JsonSpan	data[1];
	char	   *id = NULL;
	char	   *type = NULL;
	char	   *api_version = NULL;
	int64		created = 0;
	bool		live = qes_live_mode();
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

	header = qes_request_header("stripe-signature");
	sig = qes_verify_stripe_signature(header, payload, len, secrets, qes_webhook_tolerance_s,
									  qes_unix_usecs(GetCurrentTimestamp()));
	if (sig != QES_SIG_OK)
		PG_RETURN_DATUM(reject(sig_reason(sig), live));

	/* validly signed: is it an event the worker can apply? */
	if (!scan_object(payload, payload + len, event_keys, ev, &escaped) ||
		!valid_event_id(id = plain_string(&ev[0])) ||
		(type = plain_string(&ev[1])) == NULL ||
		!span_int64(&ev[2], &created) ||
		!(span_is(&ev[3], "true") || span_is(&ev[3], "false")) ||
		!ev[5].present ||
		!scan_object(ev[5].start, ev[5].start + ev[5].len, data_keys, data, &data_escaped) ||
		!data[0].present || data[0].start[0] != '{')
		PG_RETURN_DATUM(reject(escaped ? QES_REJECT_ESCAPED_KEY : QES_REJECT_NOT_AN_EVENT, live));
	/* an escaped key here could make jsonb's data.object another one than ours */
	if (escaped || data_escaped)
		PG_RETURN_DATUM(reject(QES_REJECT_ESCAPED_KEY, live));
	if (!valid_event_type(type))
		PG_RETURN_DATUM(reject(QES_REJECT_BAD_TYPE, live));
	/*
	 * Stripe began in 2011; a day's clock skew ahead at most, of the real
	 * clock or of the billing clock when a test or demo moved it ahead
	 * (outside production qes_billing_now() may run ahead of the real clock;
	 * in production it is the real clock).
	 */
	now_unix_s = qes_unix_usecs(GetCurrentTimestamp()) / USECS_PER_SEC;
	if (created > now_unix_s + SECS_PER_DAY && qes_environment() != QES_ENV_PRODUCTION)
	{
		/* rare: read the clock (the cache may not be loaded in this backend) */
		qes_catalog_refresh();
		now_unix_s = Max(now_unix_s, qes_unix_usecs(qes_billing_now()) / USECS_PER_SEC);
	}
	if (created < QES_EARLIEST_EVENT || created > now_unix_s + SECS_PER_DAY)
		PG_RETURN_DATUM(reject(QES_REJECT_BAD_CREATED, live));
	if (has_unstorable_escape(payload, payload + len))
		PG_RETURN_DATUM(reject(QES_REJECT_BAD_ENCODING, live));
	if (span_is(&ev[3], "true") != live)
		PG_RETURN_DATUM(reject(QES_REJECT_WRONG_MODE, live));
	if (ev[4].present && !span_is(&ev[4], "null"))
	{
		api_version = plain_string(&ev[4]);
		if (api_version == NULL || strlen(api_version) > 64)
			PG_RETURN_DATUM(reject(QES_REJECT_NOT_AN_EVENT, live));
	}

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
