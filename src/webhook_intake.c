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
 * object) by a bounds-checked scanner (src/json_scan.c) instead of building
 * the whole jsonb.
 * The body has been checked to be JSON by json's input function already; the
 * scanner still never reads past the end and gives up on anything unexpected
 * (which rejects the delivery as not_an_event).  Keys are matched as written:
 * Stripe never escapes them.  A repeated key counts with its last value, as
 * in jsonb (which is how the worker reads the payload).
 *
 * What costs in proportion to the body comes last: a body over
 * QES_WEBHOOK_MAX_BODY (1 MB) is refused with 54000 before anything reads
 * it, and a Stripe-Signature header that cannot match (no timestamp, no v1,
 * no v1 of 64 lower-case hex digits) before the secret is looked up or any
 * HMAC computed.
 *
 * A new event is inserted into billing.webhook_events (src/insert_once.c)
 * and wakes the worker at commit; a known one answers 200 and stores
 * nothing.
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
#include "insert_once.h"
#include "guc.h"
#include "json_scan.h"
#include "postgrest.h"
#include "webhook_signature.h"
#include "worker.h"

/* 2011-01-01T00:00:00Z: no Stripe event is older */
#define QES_EARLIEST_EVENT	INT64CONST(1293840000)

/*
 * The largest body taken (docs/operations.md, "Many webhooks refused"):
 * Stripe's events are a few kilobytes, far below this.  Anything larger is
 * refused before the signature is computed or the body scanned, which would
 * otherwise cost CPU in proportion to what an unauthenticated sender posts
 * (an HMAC and a scan of 20 MB: about 137 ms).  A constant, not a setting:
 * no genuine event comes near it.
 */
#define QES_WEBHOOK_MAX_BODY	(1024 * 1024)

/* a v1 signature: HMAC-SHA256 in lower-case hex */
#define QES_SIG_HEX_LEN		64

PG_FUNCTION_INFO_V1(qes_stripe_webhook_fn);

/* ---- what makes an event --------------------------------------------- */

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

static const char *const inbox_columns[] = {
	"stripe_event_id", "event_type", "livemode", "api_version", "stripe_created", "payload"
};

static const Oid inbox_types[] = {
	TEXTOID, TEXTOID, BOOLOID, TEXTOID, TIMESTAMPTZOID, JSONOID
};

/* Stripe redelivers: a repeat is looked for first, and stays a read */
static QesInsertTarget inbox_target = {
	"billing", "webhook_events", lengthof(inbox_columns), inbox_columns, inbox_types, 1, true,
	"wake_worker", "wake_worker_on_commit", NULL
};

/*
 * Store the event in billing.webhook_events unless its id is there already;
 * returns whether it was new.  Written by src/insert_once.c, so the row
 * reaches every index the table has now, its constraints, defaults and
 * triggers, with the meaning of INSERT ... ON CONFLICT (stripe_event_id)
 * DO NOTHING: two deliveries of one new event at once, the second waits
 * for the first and answers "duplicate" if it commits, or stores the event
 * if it rolls back.  The caller refused read-only transactions and
 * standbys first.  The table's own wake_worker trigger is not fired: a new
 * event wakes the worker at commit from here.
 */
static bool
store_event(const char *id, const char *type, bool live, const char *api_version,
			TimestampTz created, text *payload)
{
	Datum		values[6];
	bool		nulls[6] = {0};

	values[0] = CStringGetTextDatum(id);
	values[1] = CStringGetTextDatum(type);
	values[2] = BoolGetDatum(live);
	values[3] = api_version ? CStringGetTextDatum(api_version) : (Datum) 0;
	nulls[3] = (api_version == NULL);
	values[4] = TimestampTzGetDatum(created);
	values[5] = PointerGetDatum(payload);	/* json is text inside */
	if (qes_insert_once(&inbox_target, values, nulls) != QES_INSERTED)
		return false;
	qes_wake_at_commit();
	return true;
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
 * Could a v1 signature of the Stripe-Signature header equal an HMAC?  The
 * verifier (webhook_signature.c) reads the header as Stripe's libraries do
 * and computes the HMAC of the whole body for every secret before it
 * compares; a header whose v1 signatures are none of them 64 lower-case hex
 * digits cannot match, and is refused as malformed before that, for the
 * cost of reading it.  Fields are split on ",", a v1's value runs from its
 * first "=" to the next.
 */
static bool
v1_may_match(const char *header)
{
	for (const char *p = header; p != NULL; p = strchr(p, ','))
	{
		const char *v;

		if (*p == ',')
			p++;
		if (strncmp(p, "v1=", 3) != 0)
			continue;
		for (v = p + 3; (*v >= '0' && *v <= '9') || (*v >= 'a' && *v <= 'f'); v++)
			;
		if (v - (p + 3) == QES_SIG_HEX_LEN && (*v == '\0' || *v == ',' || *v == '='))
			return true;
	}
	return false;
}

/* does the (comma-separated) secrets setting hold a secret at all? */
static bool
any_secret(const char *secrets)
{
	for (const char *c = secrets; c != NULL && *c != '\0'; c++)
		if (*c != ',' && *c != ' ' && *c != '\t')
			return true;
	return false;
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
	QesJsonSpan	ev[6];
	QesJsonSpan	data[1];
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

	/*
	 * Before anything costs in proportion to the body (the HMAC, the scan):
	 * an error, not a counted refusal, since nothing is written for it.
	 */
	if (len > QES_WEBHOOK_MAX_BODY)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("webhook body too large: %d bytes, the limit is %d", len, QES_WEBHOOK_MAX_BODY),
				 errdetail("Stripe's events are far smaller; the delivery was not verified or stored."),
				 errhint("Refuse bodies over 1 MB in front of PostgREST as well (e.g. the proxy's body size limit).")));

	/*
	 * A header the verifier refuses unread (missing, no timestamp, no v1)
	 * is refused before the secret is looked up: with no secret and no body
	 * it reads the header and stops there (QES_SIG_NO_SECRET: it is read).
	 */
	header = qes_request_header("stripe-signature");
	sig = qes_verify_stripe_signature(header, "", 0, NULL, 0, 0);
	if (sig != QES_SIG_NO_SECRET)
		PG_RETURN_DATUM(reject(sig_reason(sig), live));

	/* the configured secret(s); without one, what --setup-webhook stored */
	secrets = qes_stripe_key(QES_KEY_WEBHOOK, true);
	if (secrets == NULL)
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (SPI_execute(/* result: text */ "SELECT billing.stored_webhook_secrets()", true, 1) == SPI_OK_SELECT &&
			SPI_processed == 1)
		{
			char	   *stored = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

			secrets = stored ? MemoryContextStrdup(upper, stored) : NULL;
		}
		SPI_finish();
	}

	/* a signature no HMAC can equal: refused before any is computed */
	if (any_secret(secrets) && !v1_may_match(header))
		PG_RETURN_DATUM(reject(QES_REJECT_MALFORMED, live));
	sig = qes_verify_stripe_signature(header, payload, len, secrets, qes_webhook_tolerance_s,
									  qes_unix_usecs(GetCurrentTimestamp()));
	if (sig != QES_SIG_OK)
		PG_RETURN_DATUM(reject(sig_reason(sig), live));

	/* validly signed: is it an event the worker can apply? */
	if (!qes_json_scan_object(payload, payload + len, event_keys, ev, &escaped) ||
		!valid_event_id(id = qes_json_plain_string(&ev[0])) ||
		(type = qes_json_plain_string(&ev[1])) == NULL ||
		!qes_json_span_int64(&ev[2], &created) ||
		!(qes_json_span_is(&ev[3], "true") || qes_json_span_is(&ev[3], "false")) ||
		!ev[5].present ||
		!qes_json_scan_object(ev[5].start, ev[5].start + ev[5].len, data_keys, data, &data_escaped) ||
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
	if (qes_json_has_unstorable_escape(payload, payload + len))
		PG_RETURN_DATUM(reject(QES_REJECT_BAD_ENCODING, live));
	if (qes_json_span_is(&ev[3], "true") != live)
		PG_RETURN_DATUM(reject(QES_REJECT_WRONG_MODE, live));
	if (ev[4].present && !qes_json_span_is(&ev[4], "null"))
	{
		api_version = qes_json_plain_string(&ev[4]);
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
