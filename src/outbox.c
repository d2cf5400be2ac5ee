/*-------------------------------------------------------------------------
 *
 * outbox.c
 *	  The worker's Stripe client: the outbox driven through libcurl's multi
 *	  interface.
 *
 * The protocol with SQL (sql/install/87_outbox.sql), DESIGN.md rules 3 and 4:
 *
 *	1. claim: in a short transaction, billing.outbox_claim(n) marks up to n
 *	   due rows in_flight (FOR UPDATE SKIP LOCKED) and returns them; COMMIT.
 *	2. send: only then are they handed to curl, many at once (at most
 *	   qes_billing.max_concurrent_requests), each with the Idempotency-Key of
 *	   its row, so a retry or a resend after a crash is replayed by Stripe
 *	   instead of creating twice.  No transaction spans a request.
 *	3. record: each answer is recorded by billing.outbox_record() in a new
 *	   transaction (one per batch of answers, a subtransaction per answer, so
 *	   one bad answer cannot undo the others), which also applies it to local
 *	   state or schedules the retry.
 *
 * A row left in_flight by a crash is reclaimed at worker start-up
 * (billing.worker_reclaim); one whose answer this process lost is reclaimed
 * after twice the request timeout (billing.outbox_reclaim_stale).
 *
 * Each request belongs to the incarnation of the extension it was claimed
 * from.  After DROP and CREATE EXTENSION its row is gone, and the new
 * tables number their rows from 1 again: the answer to a request of an
 * incarnation that is no longer there is dropped, never recorded (it would
 * land on the new row with the same id and attempt).  Nothing is claimed from
 * a new incarnation before the worker's tick has reconciled it.
 *
 * Idle is free: the pump runs a transaction only to claim when the tick (or
 * the last recording) said a request is due, and to record answers.  A
 * batch of answers is recorded in as many transactions as it takes to keep
 * each under QES_SUBXID_BUDGET subtransaction xids.
 *
 * The secret key is read from the settings at each claim and goes only into
 * the Authorization header; it is never logged or stored.  A request never
 * leaves with a key of the wrong mode: the settings refuse such keys, and
 * qes_stripe_key() checks the prefix again at each claim.
 *
 * qes_billing.max_requests_per_second bounds the rate of sending (a token
 * bucket of a tenth of a second's worth), below Stripe's own limits, so that a burst
 * of work does not turn into a burst of 429s.
 *
 * All state lives in this process (the worker); nothing here is shared.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <curl/curl.h>
#include <limits.h>
#include <math.h>

#include "access/xact.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "guc.h"
#include "outbox.h"
#include "redact.h"
#include "stripe_form.h"
#include "worker.h"

#define QES_MAX_RESPONSE_BYTES	(4 * 1024 * 1024)
#define QES_RECORD_TRIES		3

typedef struct OutboxCall
{
	MemoryContext context;		/* holds this struct and all it points to */
	Oid			extoid;			/* the incarnation of the extension it belongs to */
	int64		request_id;
	int32		attempt;
	CURL	   *easy;
	struct curl_slist *headers;
	char	   *url;
	char	   *body;			/* POST body, or NULL */
	StringInfoData response;
	bool		too_large;
	char		should_retry[16];
	char		retry_after[32];
	char		errbuf[CURL_ERROR_SIZE];
	bool		done;
	CURLcode	result;
	long		http_status;
	int			record_tries;
	struct OutboxCall *next;
} OutboxCall;

/*
 * Rate limit (qes_billing.max_requests_per_second): a token bucket holding
 * at most a tenth of a second's worth, refilled with time.
 */
static double tokens = 0;
static TimestampTz tokens_at = 0;

static int
take_tokens(int want)
{
	TimestampTz now = GetCurrentTimestamp();
	int			rate = qes_max_requests_per_second;
	int			n;
	double		cap;

	if (rate <= 0)
		return want;
	/* a burst of at most a tenth of a second's worth: no second sees more than 1.1 x rate */
	cap = Max(1.0, rate / 10.0);
	if (tokens_at == 0)
		tokens = cap;
	else
		tokens = Min(cap, tokens + (double) (now - tokens_at) / USECS_PER_SEC * rate);
	tokens_at = now;
	n = Min(want, (int) tokens);
	tokens -= n;
	return n;
}

/* milliseconds until the bucket holds a token again (0: it does) */
static long
token_wait_ms(void)
{
	int			rate = qes_max_requests_per_second;

	if (rate <= 0 || tokens >= 1)
		return 0;
	return (long) ceil((1 - tokens) * 1000.0 / rate);
}

static CURLM *multi = NULL;
static MemoryContext outbox_context = NULL;
static OutboxCall *calls = NULL;	/* in flight or answered, not yet recorded */
static int	n_in_flight = 0;
static bool claim_more = false;	/* due rows may be left to claim */
static TimestampTz claim_at = 0;	/* when a request is due (0: none known) */

/* ---- curl callbacks (must not ereport) ---------------------------------- */

static size_t
write_cb(char *data, size_t size, size_t nmemb, void *arg)
{
	OutboxCall *call = (OutboxCall *) arg;
	size_t		n = size * nmemb;

	if (call->response.len + n > QES_MAX_RESPONSE_BYTES)
	{
		call->too_large = true;
		return 0;				/* aborts the transfer */
	}
	appendBinaryStringInfo(&call->response, data, n);
	return n;
}

static void
copy_header_value(char *dst, size_t dstlen, const char *v, size_t len)
{
	while (len > 0 && (*v == ' ' || *v == '\t'))
		v++, len--;
	while (len > 0 && (v[len - 1] == '\r' || v[len - 1] == '\n' || v[len - 1] == ' '))
		len--;
	if (len >= dstlen)
		len = dstlen - 1;
	memcpy(dst, v, len);
	dst[len] = '\0';
}

static size_t
header_cb(char *data, size_t size, size_t nmemb, void *arg)
{
	OutboxCall *call = (OutboxCall *) arg;
	size_t		n = size * nmemb;
	static const char should_retry[] = "stripe-should-retry:";
	static const char retry_after[] = "retry-after:";

	if (n > sizeof(should_retry) - 1 && pg_strncasecmp(data, should_retry, sizeof(should_retry) - 1) == 0)
		copy_header_value(call->should_retry, sizeof(call->should_retry),
						  data + sizeof(should_retry) - 1, n - (sizeof(should_retry) - 1));
	else if (n > sizeof(retry_after) - 1 && pg_strncasecmp(data, retry_after, sizeof(retry_after) - 1) == 0)
		copy_header_value(call->retry_after, sizeof(call->retry_after),
						  data + sizeof(retry_after) - 1, n - (sizeof(retry_after) - 1));
	return n;
}

/* ---- set-up --------------------------------------------------------------- */

static void
outbox_init(void)
{
	if (multi != NULL)
		return;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		elog(ERROR, "qes_billing worker: curl_global_init failed");
	multi = curl_multi_init();
	if (multi == NULL)
		elog(ERROR, "qes_billing worker: curl_multi_init failed");
	outbox_context = AllocSetContextCreate(TopMemoryContext, "qes_billing outbox",
										   ALLOCSET_DEFAULT_SIZES);
}

typedef struct ClaimedRow
{
	int64		request_id;
	int32		attempt;
	char	   *method;
	char	   *path;
	char	   *form;
	char	   *idempotency_key;
} ClaimedRow;

/*
 * Build the curl handle of one claimed row.  Everything it needs is copied
 * into the call's own memory context.
 */
static OutboxCall *
make_call(const ClaimedRow *row, const char *key, Oid extoid)
{
	MemoryContext cxt = AllocSetContextCreate(outbox_context, "qes_billing request",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	OutboxCall *call = palloc0(sizeof(OutboxCall));
	bool		is_post = strcmp(row->method, "POST") == 0;
	const char *base = qes_stripe_api_base;
	size_t		baselen = strlen(base);
	char	   *header;
	long		timeout_ms = qes_request_timeout_ms;

	call->context = cxt;
	call->extoid = extoid;
	call->request_id = row->request_id;
	call->attempt = row->attempt;
	initStringInfo(&call->response);
	while (baselen > 0 && base[baselen - 1] == '/')
		baselen--;
	call->url = psprintf("%.*s%s%s%s", (int) baselen, base, row->path,
						 (!is_post && row->form[0]) ? "?" : "",
						 (!is_post && row->form[0]) ? row->form : "");
	if (is_post)
		call->body = pstrdup(row->form);

	call->easy = curl_easy_init();
	if (call->easy == NULL)
		elog(ERROR, "qes_billing worker: curl_easy_init failed");

	header = psprintf("Authorization: Bearer %s", key);
	call->headers = curl_slist_append(call->headers, header);
	memset(header, 0, strlen(header));	/* no copy of the key lingers */
	call->headers = curl_slist_append(call->headers,
									  psprintf("Stripe-Version: %s", qes_stripe_api_version));
	if (strcmp(row->method, "GET") != 0)
		call->headers = curl_slist_append(call->headers,
										  psprintf("Idempotency-Key: %s", row->idempotency_key));
	call->headers = curl_slist_append(call->headers, "Accept: application/json");
	call->headers = curl_slist_append(call->headers, "Expect:");
	if (is_post)
		call->headers = curl_slist_append(call->headers,
										  "Content-Type: application/x-www-form-urlencoded");

	curl_easy_setopt(call->easy, CURLOPT_URL, call->url);
	curl_easy_setopt(call->easy, CURLOPT_HTTPHEADER, call->headers);
	curl_easy_setopt(call->easy, CURLOPT_USERAGENT,
					 "qes_billing/" QES_VERSION " (PostgreSQL " PG_VERSION ")");
	if (is_post)
	{
		curl_easy_setopt(call->easy, CURLOPT_POST, 1L);
		curl_easy_setopt(call->easy, CURLOPT_POSTFIELDS, call->body);
		curl_easy_setopt(call->easy, CURLOPT_POSTFIELDSIZE, (long) strlen(call->body));
	}
	else if (strcmp(row->method, "DELETE") == 0)
		curl_easy_setopt(call->easy, CURLOPT_CUSTOMREQUEST, "DELETE");
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(call->easy, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	curl_easy_setopt(call->easy, CURLOPT_PROTOCOLS, CURLPROTO_HTTP | CURLPROTO_HTTPS);
#endif
	curl_easy_setopt(call->easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(call->easy, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(call->easy, CURLOPT_SSL_VERIFYHOST, 2L);
	curl_easy_setopt(call->easy, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(call->easy, CURLOPT_CONNECTTIMEOUT_MS, Min(timeout_ms, 10000L));
	curl_easy_setopt(call->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(call->easy, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(call->easy, CURLOPT_WRITEDATA, call);
	curl_easy_setopt(call->easy, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(call->easy, CURLOPT_HEADERDATA, call);
	curl_easy_setopt(call->easy, CURLOPT_ERRORBUFFER, call->errbuf);
	curl_easy_setopt(call->easy, CURLOPT_PRIVATE, call);

	MemoryContextSwitchTo(old);
	return call;
}

static void
free_call(OutboxCall *call)
{
	if (call->easy)
	{
		if (!call->done)
			curl_multi_remove_handle(multi, call->easy);
		curl_easy_cleanup(call->easy);
	}
	curl_slist_free_all(call->headers);
	MemoryContextDelete(call->context);
}

static double next_due(void);

/* ---- claim ---------------------------------------------------------------- */

/*
 * Claim up to `room` due requests and start them.  Returns how many.
 */
static int
claim_and_send(int room)
{
	const char *key;
	char	   *problem;
	ClaimedRow *rows = NULL;
	int			n = 0;
	Oid			argtypes[1] = {INT4OID};
	Datum		args[1];
	Oid			extoid;

	if (qes_stripe_key_problem(QES_KEY_SECRET, &problem))
	{
		/*
		 * Nothing can be sent: the rows stay pending (nothing is lost), and
		 * api.health reports the key problem and the outbox backlog.
		 */
		claim_more = false;
		return 0;
	}
	/* present and of the environment's mode (guc.c checks the prefix) */
	key = qes_stripe_key(QES_KEY_SECRET, false);

	/*
	 * Only from the incarnation the tick has reconciled: a new one (created
	 * since) wakes the worker at its commit, and its tick comes first.
	 */
	extoid = qes_worker_begin_xact("qes_billing worker: claiming Stripe requests");
	if (!OidIsValid(extoid) || extoid != qes_worker_incarnation())
	{
		qes_worker_end_xact();
		claim_more = false;
		return 0;
	}
	args[0] = Int32GetDatum(room);
	if (SPI_execute_with_args("SELECT request_id, attempt, method, path, params, idempotency_key"
							  "  FROM billing.outbox_claim($1)",
							  1, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing worker: billing.outbox_claim failed");
	n = (int) SPI_processed;
	if (n > 0)
	{
		/* copied out of SPI's memory into the loop's context */
		MemoryContext old = MemoryContextSwitchTo(qes_worker_loop_context);

		rows = palloc(sizeof(ClaimedRow) * n);
		MemoryContextSwitchTo(old);
		for (int i = 0; i < n; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;
			Jsonb	   *params;

			rows[i].request_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
			rows[i].attempt = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
			params = DatumGetJsonbP(SPI_getbinval(tup, desc, 5, &isnull));
			old = MemoryContextSwitchTo(qes_worker_loop_context);
			rows[i].method = SPI_getvalue(tup, desc, 3);
			rows[i].path = SPI_getvalue(tup, desc, 4);
			rows[i].form = qes_stripe_form_encode(params);
			rows[i].idempotency_key = SPI_getvalue(tup, desc, 6);
			MemoryContextSwitchTo(old);
		}
	}
	/*
	 * Every due row we could take is taken: when is the next one due?  One
	 * due now was skipped (SKIP LOCKED: a backend holds it): look again
	 * after the naptime, or when that backend's commit wakes us.
	 */
	if (n < room)
	{
		double		due_s = next_due();

		claim_more = false;
		qes_outbox_set_due(due_s == 0 ? qes_worker_naptime_ms / 1000.0 : due_s);
	}
	qes_worker_end_xact();		/* COMMIT: the rows are in_flight before a byte leaves */

	for (int i = 0; i < n; i++)
	{
		OutboxCall *call = make_call(&rows[i], key, extoid);
		CURLMcode	rc;

		call->next = calls;
		calls = call;
		n_in_flight++;
		rc = curl_multi_add_handle(multi, call->easy);
		if (rc != CURLM_OK)
		{
			/* recorded as a transport error, retried with backoff */
			call->done = true;
			call->result = CURLE_FAILED_INIT;
			snprintf(call->errbuf, sizeof(call->errbuf), "curl_multi_add_handle: %s",
					 curl_multi_strerror(rc));
			n_in_flight--;
		}
	}
	return n;
}

/* ---- record --------------------------------------------------------------- */

static void
record_one(OutboxCall *call)
{
	Oid			argtypes[7] = {INT8OID, INT4OID, INT4OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		args[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	char	   *transport_error = NULL;

	if (call->result != CURLE_OK)
	{
		if (call->too_large)
			transport_error = psprintf("response larger than %d bytes", QES_MAX_RESPONSE_BYTES);
		else
			transport_error = psprintf("%s: %s", curl_easy_strerror(call->result),
									   call->errbuf[0] ? call->errbuf : "no detail");
	}
	args[0] = Int64GetDatum(call->request_id);
	args[1] = Int32GetDatum(call->attempt);
	args[2] = Int32GetDatum((int32) call->http_status);
	nulls[2] = (transport_error != NULL || call->http_status == 0) ? 'n' : ' ';
	args[3] = CStringGetTextDatum(call->response.data);
	nulls[3] = transport_error != NULL ? 'n' : ' ';
	args[4] = CStringGetTextDatum(call->should_retry);
	nulls[4] = call->should_retry[0] ? ' ' : 'n';
	args[5] = CStringGetTextDatum(call->retry_after);
	nulls[5] = call->retry_after[0] ? ' ' : 'n';
	args[6] = transport_error ? CStringGetTextDatum(transport_error) : (Datum) 0;
	nulls[6] = transport_error ? ' ' : 'n';

	if (SPI_execute_with_args("SELECT billing.outbox_record($1, $2, $3, $4, $5, $6, $7)",
							  7, argtypes, args, nulls, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing worker: billing.outbox_record failed");
}

/*
 * Record one answer in a subtransaction.  Returns false (logged) when it
 * could not be recorded.
 */
static bool
record_in_subxact(OutboxCall *call)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		record_one(call);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		ok = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		/* restore state: this answer stays unrecorded, the others go on */
		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		ereport(LOG,
				(errmsg("qes_billing worker: could not record the answer to Stripe request " INT64_FORMAT ": %s",
						call->request_id, qes_redact_cstring(edata->message))));
		qes_worker_note_error(edata->message);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return ok;
}

/*
 * Seconds until the next request is due as of the transaction we are in (0:
 * now; -1: none is pending).
 */
static double
next_due(void)
{
	bool		isnull;
	Datum		d;

	if (SPI_execute("SELECT billing.outbox_next_due()", false, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "qes_billing worker: billing.outbox_next_due() did not return one row");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? -1 : Max(0.0, DatumGetFloat8(d));
}

/*
 * Record every answered call, a subtransaction for each answer (so one bad
 * answer cannot undo the others), in one transaction -- or more, each
 * committed before its subtransactions' xids could overflow the PGPROC cache.
 * Returns how many were recorded.
 */
static int
record_answers(void)
{
	OutboxCall **link;
	int			n = 0;
	Oid			extoid;

	if (calls == NULL)
		return 0;
	for (OutboxCall *c = calls; c; c = c->next)
		if (c->done)
			n++;
	if (n == 0)
		return 0;

	extoid = qes_worker_begin_xact("qes_billing worker: recording Stripe answers");
	n = 0;
	for (OutboxCall *c = calls; c; c = c->next)
	{
		if (!c->done || c->record_tries < 0)
			continue;
		if (OidIsValid(extoid) && qes_worker_subxids() >= QES_SUBXID_BUDGET)
		{
			qes_worker_end_xact();
			extoid = qes_worker_begin_xact("qes_billing worker: recording Stripe answers");
		}
		if (c->extoid != extoid)
		{
			/* its row went with DROP EXTENSION: nothing to record it on */
			ereport(LOG,
					(errmsg("qes_billing worker: dropped the answer to Stripe request " INT64_FORMAT " of a dropped incarnation of the extension",
							c->request_id)));
			c->record_tries = -2;
			continue;
		}
		c->record_tries++;
		if (record_in_subxact(c))
		{
			c->record_tries = -1;	/* recorded */
			n++;
		}
	}
	/* a retry scheduled, or a waiting request released: when to claim next */
	if (n > 0)
		qes_outbox_set_due(next_due());
	qes_worker_end_xact();

	/*
	 * Committed.  Forget what was recorded, what cannot be (its extension is
	 * gone) and what failed too often (its row is reclaimed as stale and
	 * sent again with the same Idempotency-Key).
	 */
	link = &calls;
	while (*link)
	{
		OutboxCall *c = *link;

		if (c->done && (c->record_tries < 0 || c->record_tries >= QES_RECORD_TRIES))
		{
			/* its row stays in flight: the tick reclaims it once stale */
			if (c->record_tries >= QES_RECORD_TRIES)
				qes_worker_request_tick(2 * (long) qes_request_timeout_ms + 100);
			*link = c->next;
			free_call(c);
		}
		else
			link = &c->next;
	}
	if (n > 0)
		claim_more = true;		/* requests waiting for these may be due now */
	return n;
}

/* ---- the pump ------------------------------------------------------------- */

static void
collect_finished(void)
{
	CURLMsg    *msg;
	int			left;

	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		OutboxCall *call = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &call);
		call->result = msg->data.result;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &call->http_status);
		curl_multi_remove_handle(multi, msg->easy_handle);
		call->done = true;
		n_in_flight--;
	}
}

/*
 * Work the outbox for at most budget_ms: keep up to
 * qes_billing.max_concurrent_requests requests in flight, record answers as
 * they come.  Returns early when the worker's latch is set (new work) and
 * nothing is answered yet.  Returns true when requests are still in flight
 * or more may be due, so the caller must not sleep.
 */
bool
qes_outbox_pump(long budget_ms)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), budget_ms);

	if (claim_at != 0 && GetCurrentTimestamp() >= claim_at)
	{
		claim_at = 0;
		claim_more = true;
	}
	if (!claim_more && calls == NULL)
		return false;			/* idle: no transaction, no curl */
	outbox_init();
	for (;;)
	{
		int			running;
		long		left_ms;

		CHECK_FOR_INTERRUPTS();
		if (claim_more && n_in_flight < qes_max_inflight)
		{
			int			room = take_tokens(qes_max_inflight - n_in_flight);

			if (room > 0)
			{
				int			claimed = claim_and_send(room);

				tokens += room - claimed;	/* unused tokens go back */
			}
		}

		if (n_in_flight > 0)
		{
			curl_multi_perform(multi, &running);
			collect_finished();
		}
		if (calls != NULL && record_answers() > 0)
			continue;			/* claim again at once */

		left_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (n_in_flight == 0 || left_ms <= 0 || MyLatch->is_set)
			break;
		curl_multi_poll(multi, NULL, 0, Min(left_ms, 50), NULL);
	}
	return n_in_flight > 0 || claim_more || calls != NULL;
}

/*
 * How long the worker may sleep while the outbox is busy: 0, or -- when
 * nothing is in flight and only the rate limit holds requests back -- until
 * the next token.
 */
long
qes_outbox_busy_wait_ms(void)
{
	if (n_in_flight > 0 || calls != NULL || !claim_more)
		return 0;
	return token_wait_ms();
}

/*
 * The next request is due in due_s seconds (0: now; < 0: none is pending), as
 * the tick or the last recording found.
 */
void
qes_outbox_set_due(double due_s)
{
	if (due_s < 0)
		claim_at = 0;
	else if (due_s == 0)
	{
		claim_at = 0;
		claim_more = true;
	}
	else
		claim_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
											   (long) Min(ceil(due_s * 1000.0), (double) INT_MAX));
}

/* milliseconds until a request is due (-1: none known) */
long
qes_outbox_claim_wait_ms(void)
{
	TimestampTz now;

	if (claim_more)
		return 0;
	if (claim_at == 0)
		return -1;
	now = GetCurrentTimestamp();
	return claim_at <= now ? 0 : TimestampDifferenceMilliseconds(now, claim_at);
}

int
qes_outbox_in_flight(void)
{
	return n_in_flight;
}
