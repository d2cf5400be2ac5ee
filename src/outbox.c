/*-------------------------------------------------------------------------
 *
 * outbox.c
 *	  The worker's Stripe client: the outbox, sent through the worker's
 *	  libcurl multi loop (src/worker_http.c).
 *
 * The protocol with SQL (sql/install/87_outbox.sql), docs/architecture.md, rules 3 and 4:
 *
 *	1. claim: in a short transaction, billing.outbox_claim(n) marks up to n
 *	   due rows in_flight (FOR UPDATE SKIP LOCKED) and returns them; COMMIT.
 *	2. send: only then are they handed to curl, many at once (at most
 *	   qes_billing.max_concurrent_requests), each with the Idempotency-Key of
 *	   its row, so a retry or a resend after a crash is replayed by Stripe
 *	   instead of creating twice.  No transaction spans a request.
 *	3. record: the answers that came in are recorded in a new transaction,
 *	   which also applies them to local state or schedules the retry.
 *
 * One transaction per turn of the pump, not one per request
 * (docs/architecture.md, "The worker loop"): the answers that came in since
 * the last turn are recorded and the requests that take their places are
 * claimed in the same transaction; it commits before any of those requests
 * is sent.  (Claiming and sending before recording, in a transaction of
 * its own, put requests on the wire no sooner and cost twice the
 * transactions.)  Answers are recorded with one call of
 * billing.outbox_record_batch per batch, no subtransaction per answer; when
 * something in a batch raises, the batch is rolled back (it ran in one
 * subtransaction) and each of its answers is recorded on its own by
 * billing.outbox_record in a subtransaction, so one bad answer cannot undo
 * the others.  A transaction commits before its subtransactions' xids could
 * overflow the PGPROC cache (QES_SUBXID_BUDGET).  Transactions and
 * subtransactions are the worker's (src/worker_xact.c).  The statements are
 * prepared once per incarnation of the extension and kept; the curl handles
 * are kept and reused (the worker's multi handle keeps the connections alive
 * between requests).
 *
 * A turn of the pump never waits: the worker's loop turns it, and waits on
 * curl's sockets and the latch together between turns (src/worker_http.c,
 * which hands each answer back to this file as it comes in).  A commit that
 * queued a request (counted in shared memory by the wake-up trigger,
 * src/worker.c) has it claimed and sent at the next turn, before anything
 * else, even while other requests are in flight.
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
 * the last recording) said a request is due, and to record answers.
 *
 * The secret key is read from the settings at each claim and goes only into
 * the Authorization header; it is never logged or stored.  A request never
 * leaves with a key of the wrong mode: the settings refuse such keys, and
 * qes_stripe_key() checks the prefix again at each claim.
 *
 * qes_billing.max_requests_per_second bounds the rate of sending (a token
 * bucket of a tenth of a second's worth), below Stripe's own limits, so that a burst
 * of work does not turn into a burst of 429s; while it holds a backlog back,
 * the turns are paced to the bucket ("Paced sending" below).
 *
 * All state lives in this process (the worker); nothing here is shared.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <limits.h>
#include <math.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "replication/syncrep.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "guc.h"
#include "outbox.h"
#include "outbox_lane.h"
#include "fence.h"
#include "redact.h"
#include "shmem.h"
#include "stripe_form.h"
#include "worker_http.h"
#include "worker_xact.h"

#define QES_MAX_RESPONSE_BYTES	(4 * 1024 * 1024)
/* a kept response buffer larger than this is given back after its answer */
#define QES_KEEP_RESPONSE_BYTES	(64 * 1024)
#define QES_RECORD_TRIES		3
/* answers per call of billing.outbox_record_batch */
#define QES_RECORD_BATCH		32
/*
 * answers are recorded as they come for this long after a request was
 * queued to wait for another ("Recording later", below)
 */
#define QES_PROMPT_MS			60000
/* requests of the direct lane waiting to go back to the queue, at most */
#define QES_LANE_RELEASE_MAX	256
/*
 * A request of the lane queued longer ago than this goes back to the queue
 * instead: its claim's time (claimed_at, set when it was queued) dates
 * Stripe's answer (billing.outbox_state_at), and must be close to when it
 * is sent.  A prepared transaction's requests go back so, as do those of a
 * transaction that went on for long after queuing them.
 */
#define QES_LANE_MAX_AGE_MS		50

typedef struct OutboxCall
{
	QesHttpTransfer http;		/* first: its curl handle, kept and reused */
	Oid			extoid;			/* the incarnation of the extension it belongs to */
	int64		request_id;
	int32		attempt;
	struct curl_slist *headers;
	StringInfoData url;
	StringInfoData body;		/* POST body */
	StringInfoData response;
	bool		too_large;
	char		should_retry[16];
	char		retry_after[32];
	bool		done;			/* answered (http.result, http.response_code) */
	bool		lane;			/* sent from the direct lane (src/outbox_lane.c) */
	TimestampTz started_at;		/* when it was handed to curl */
	int			record_tries;	/* -1: recorded; -2: dropped (its incarnation is gone) */
	struct OutboxCall *next;
} OutboxCall;

/*
 * Rate limit (qes_billing.max_requests_per_second): a token bucket holding
 * at most a tenth of a second's worth, refilled with time.
 */
static double tokens = 0;
static TimestampTz tokens_at = 0;

/* fill the bucket for the time since it was last filled (rate > 0) */
static void
refill_tokens(int rate)
{
	TimestampTz now = GetCurrentTimestamp();
	/* a burst of at most a tenth of a second's worth: no second sees more than 1.1 x rate */
	double		cap = Max(1.0, rate / 10.0);

	if (tokens_at == 0)
		tokens = cap;
	else
		tokens = Min(cap, tokens + (double) (now - tokens_at) / USECS_PER_SEC * rate);
	tokens_at = now;
}

static int
take_tokens(int want)
{
	int			rate = qes_max_requests_per_second;
	int			n;

	if (rate <= 0)
		return want;
	refill_tokens(rate);
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

/*
 * Paced sending.  While the rate limit holds a backlog back, tokens come
 * one at a time, and so do the answers to what they let out: a turn per
 * token claimed one request and recorded one answer in transactions of
 * their own (at 196 requests a second, 430-450 us of the worker's CPU per
 * request, 0.75 transactions; docs/benchmarks.md, "The worker beside
 * pg_net").  So while paced a turn waits until the bucket is full again
 * (QES_PACE_MS worth of tokens, its whole burst, or as many as fit the free
 * slots) or the oldest answer has waited QES_PACE_MS; then it records the
 * answers and claims what the tokens allow, in one transaction.  The rate
 * stays what the bucket allows; a request of the backlog leaves at most
 * QES_PACE_MS later, and an answer is recorded at most QES_PACE_MS after it
 * came.  Paced means that the bucket cut the last claim short; a claim that
 * finds fewer due rows than it could take ends it, and without a backlog
 * the worker claims and records at once (a commit's request is on the wire
 * within milliseconds).
 */
#define QES_PACE_MS 100
static bool paced = false;
static bool bucket_cut = false; /* the turn under way claims less than it could, for the bucket */
static TimestampTz answered_at = 0; /* the oldest unrecorded answer came then (0: none waits) */
static bool answer_urgent = false;	/* an unrecorded answer is not a success: record it at once */

static MemoryContext outbox_context = NULL;
static MemoryContext turn_context = NULL;	/* one turn's claimed rows, reset per turn */
static OutboxCall *calls = NULL;	/* in flight or answered, not yet recorded */
static OutboxCall *free_calls = NULL;	/* kept for reuse, with their curl handles */
static int	n_in_flight = 0;
static int	n_answered = 0;		/* calls done and not yet recorded or dropped */
static bool claim_more = false;	/* due rows may be left to claim */
static TimestampTz claim_at = 0;	/* when a request is due (0: none known) */
static bool last_turn_failed = false;	/* record and claim apart after an error */
static uint64 outbox_wakes_seen = 0;	/* qes_worker_state->outbox_wakes as last read */
static TimestampTz tick_wanted_at = 0;	/* the worker's tick is wanted by then (0: not) */

/* statements, prepared once per incarnation of the extension and kept */
static Oid	plans_extoid = InvalidOid;
static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr record_batch_plan = NULL;
static SPIPlanPtr record_plan = NULL;
static SPIPlanPtr next_due_plan = NULL;
static SPIPlanPtr lane_release_plan = NULL;

/* requests taken from the direct lane (src/outbox_lane.c), and those to put back */
static QesLaneRequest *lane_buf = NULL;
static int64 *lane_release = NULL;
static int	n_release = 0;
static bool lane_open = false;	/* as last published */
/* qes_lane_waiters() as last read, and answers recorded at once until then */
static uint64 waiters_seen = 0;
static TimestampTz prompt_until = 0;

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
	if (outbox_context != NULL)
		return;
	outbox_context = AllocSetContextCreate(TopMemoryContext, "qes_billing outbox",
										   ALLOCSET_DEFAULT_SIZES);
	turn_context = AllocSetContextCreate(outbox_context, "qes_billing outbox turn",
										 ALLOCSET_DEFAULT_SIZES);
	lane_buf = MemoryContextAlloc(outbox_context, sizeof(QesLaneRequest) * QES_LANE_SLOTS);
	lane_release = MemoryContextAlloc(outbox_context, sizeof(int64) * QES_LANE_RELEASE_MAX);
}

/*
 * The statements of the incarnation extoid, prepared in its first
 * transaction and kept (a new incarnation gets its own).
 */
static void
prepare_plans(Oid extoid)
{
	Oid			batch_types[7] = {INT8ARRAYOID, INT4ARRAYOID, INT4ARRAYOID, TEXTARRAYOID,
	TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID};
	Oid			record_types[7] = {INT8OID, INT4OID, INT4OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Oid			claim_types[1] = {INT4OID};
	Oid			release_types[1] = {INT8ARRAYOID};

	if (plans_extoid == extoid && lane_release_plan != NULL)
		return;
	if (claim_plan)
		SPI_freeplan(claim_plan);
	if (record_batch_plan)
		SPI_freeplan(record_batch_plan);
	if (record_plan)
		SPI_freeplan(record_plan);
	if (next_due_plan)
		SPI_freeplan(next_due_plan);
	if (lane_release_plan)
		SPI_freeplan(lane_release_plan);
	claim_plan = record_batch_plan = record_plan = next_due_plan = lane_release_plan = NULL;
	plans_extoid = InvalidOid;

	claim_plan = SPI_prepare(/* result: int8, int4, text, text, jsonb, text */ "SELECT request_id, attempt, method, path, params, idempotency_key"
							 "  FROM billing.outbox_claim($1)", 1, claim_types);
	if (claim_plan == NULL || SPI_keepplan(claim_plan) != 0)
		elog(ERROR, "qes_billing worker: cannot prepare the outbox claim: %s", SPI_result_code_string(SPI_result));
	record_batch_plan = SPI_prepare(/* result: - */ "SELECT billing.outbox_record_batch($1, $2, $3, $4, $5, $6, $7)",
									7, batch_types);
	if (record_batch_plan == NULL || SPI_keepplan(record_batch_plan) != 0)
		elog(ERROR, "qes_billing worker: cannot prepare the outbox record: %s", SPI_result_code_string(SPI_result));
	record_plan = SPI_prepare(/* result: - */ "SELECT billing.outbox_record($1, $2, $3, $4, $5, $6, $7)", 7, record_types);
	if (record_plan == NULL || SPI_keepplan(record_plan) != 0)
		elog(ERROR, "qes_billing worker: cannot prepare the outbox record: %s", SPI_result_code_string(SPI_result));
	next_due_plan = SPI_prepare(/* result: float8 */ "SELECT billing.outbox_next_due()", 0, NULL);
	if (next_due_plan == NULL || SPI_keepplan(next_due_plan) != 0)
		elog(ERROR, "qes_billing worker: cannot prepare billing.outbox_next_due(): %s", SPI_result_code_string(SPI_result));
	lane_release_plan = SPI_prepare(/* result: int8 */ "SELECT billing.outbox_lane_release($1)", 1, release_types);
	if (lane_release_plan == NULL || SPI_keepplan(lane_release_plan) != 0)
		elog(ERROR, "qes_billing worker: cannot prepare billing.outbox_lane_release(): %s", SPI_result_code_string(SPI_result));
	plans_extoid = extoid;
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

/* a StringInfo in the outbox's own memory */
static void
init_kept_string(StringInfo str)
{
	MemoryContext old = MemoryContextSwitchTo(outbox_context);

	initStringInfo(str);
	MemoryContextSwitchTo(old);
}

/* the answer came in (src/worker_http.c calls this): recorded at the next turn */
static void
call_done(QesHttpTransfer *xfer)
{
	OutboxCall *call = (OutboxCall *) xfer;

	call->done = true;
	n_in_flight--;
	/* (only the lane's successes wait: "Recording later") */
	if (!call->lane || xfer->result != CURLE_OK || xfer->response_code < 200 || xfer->response_code > 299)
		answer_urgent = true;
	if (n_answered++ == 0)
		answered_at = GetCurrentTimestamp();
}

/* a call and its curl handle: one kept for reuse, or a new one */
static OutboxCall *
get_call(void)
{
	OutboxCall *call = free_calls;
	CURL	   *easy;

	if (call != NULL)
	{
		free_calls = call->next;
		return call;
	}
	call = MemoryContextAllocZero(outbox_context, sizeof(OutboxCall));
	if (!qes_http_transfer_init(&call->http, call_done))
	{
		pfree(call);
		elog(ERROR, "qes_billing worker: curl_easy_init failed");
	}
	init_kept_string(&call->url);
	init_kept_string(&call->body);
	init_kept_string(&call->response);

	/* what stays the same for every request of this handle */
	easy = call->http.easy;
	qes_http_set_protocols(easy, "http,https");
	curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(easy, CURLOPT_WRITEDATA, call);
	curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(easy, CURLOPT_HEADERDATA, call);
	return call;
}

/* a call whose answer is recorded (or dropped): kept for the next request */
static void
put_call(OutboxCall *call)
{
	if (!call->done)
	{
		qes_http_cancel(&call->http);
		n_in_flight--;
	}
	curl_easy_setopt(call->http.easy, CURLOPT_HTTPHEADER, NULL);
	curl_slist_free_all(call->headers);
	call->headers = NULL;
	if (call->response.maxlen > QES_KEEP_RESPONSE_BYTES)
	{
		pfree(call->response.data);
		init_kept_string(&call->response);
	}
	call->next = free_calls;
	free_calls = call;
}

/*
 * Make the request of one claimed row on a kept call.  Everything curl
 * reads during the transfer lives in the call.
 */
static OutboxCall *
make_call(const ClaimedRow *row, const char *key, Oid extoid)
{
	OutboxCall *call = get_call();
	bool		is_post = strcmp(row->method, "POST") == 0;
	bool		is_get = strcmp(row->method, "GET") == 0;
	const char *base = qes_stripe_api_base;
	size_t		baselen = strlen(base);
	long		timeout_ms = qes_request_timeout_ms;
	StringInfoData header;

	call->extoid = extoid;
	call->request_id = row->request_id;
	call->attempt = row->attempt;
	call->too_large = false;
	call->should_retry[0] = '\0';
	call->retry_after[0] = '\0';
	call->done = false;
	call->lane = false;
	call->record_tries = 0;
	resetStringInfo(&call->response);

	while (baselen > 0 && base[baselen - 1] == '/')
		baselen--;
	resetStringInfo(&call->url);
	appendBinaryStringInfo(&call->url, base, baselen);
	appendStringInfoString(&call->url, row->path);
	if (!is_post && row->form[0])
	{
		appendStringInfoChar(&call->url, '?');
		appendStringInfoString(&call->url, row->form);
	}

	initStringInfo(&header);
	appendStringInfo(&header, "Authorization: Bearer %s", key);
	call->headers = curl_slist_append(NULL, header.data);
	memset(header.data, 0, header.len);	/* no copy of the key lingers */
	resetStringInfo(&header);
	appendStringInfo(&header, "Stripe-Version: %s", qes_stripe_api_version);
	call->headers = curl_slist_append(call->headers, header.data);
	if (!is_get)
	{
		resetStringInfo(&header);
		appendStringInfo(&header, "Idempotency-Key: %s", row->idempotency_key);
		call->headers = curl_slist_append(call->headers, header.data);
	}
	pfree(header.data);
	call->headers = curl_slist_append(call->headers, "Accept: application/json");
	call->headers = curl_slist_append(call->headers, "Expect:");
	if (is_post)
		call->headers = curl_slist_append(call->headers,
										  "Content-Type: application/x-www-form-urlencoded");

	curl_easy_setopt(call->http.easy, CURLOPT_URL, call->url.data);
	curl_easy_setopt(call->http.easy, CURLOPT_HTTPHEADER, call->headers);
	if (is_post)
	{
		resetStringInfo(&call->body);
		appendStringInfoString(&call->body, row->form);
		curl_easy_setopt(call->http.easy, CURLOPT_CUSTOMREQUEST, NULL);
		curl_easy_setopt(call->http.easy, CURLOPT_POST, 1L);
		curl_easy_setopt(call->http.easy, CURLOPT_POSTFIELDS, call->body.data);
		curl_easy_setopt(call->http.easy, CURLOPT_POSTFIELDSIZE, (long) call->body.len);
	}
	else
	{
		curl_easy_setopt(call->http.easy, CURLOPT_HTTPGET, 1L);
		curl_easy_setopt(call->http.easy, CURLOPT_CUSTOMREQUEST,
						 strcmp(row->method, "DELETE") == 0 ? "DELETE" : NULL);
	}
	curl_easy_setopt(call->http.easy, CURLOPT_TIMEOUT_MS, timeout_ms);
	call->started_at = GetCurrentTimestamp();
	curl_easy_setopt(call->http.easy, CURLOPT_CONNECTTIMEOUT_MS, Min(timeout_ms, 10000L));
	return call;
}

/* ---- claim ---------------------------------------------------------------- */

/*
 * Seconds until the next request is due as of the transaction we are in (0:
 * now; -1: none is pending).
 */
static double
next_due(void)
{
	bool		isnull;
	Datum		d;

	if (SPI_execute_plan(next_due_plan, NULL, NULL, false, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "qes_billing worker: billing.outbox_next_due() did not return one row");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? -1 : Max(0.0, DatumGetFloat8(d));
}

/*
 * Claim up to room due requests in the current transaction; the rows are
 * copied, form-encoded, into the turn's memory.  Returns how many.
 */
static int
claim(int room, ClaimedRow **rows_out)
{
	Datum		args[1];
	ClaimedRow *rows;
	int			n;

	args[0] = Int32GetDatum(room);
	if (SPI_execute_plan(claim_plan, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing worker: billing.outbox_claim failed");
	n = (int) SPI_processed;
	rows = MemoryContextAlloc(turn_context, sizeof(ClaimedRow) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		Jsonb	   *params;
		MemoryContext old;

		rows[i].request_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		rows[i].attempt = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
		params = DatumGetJsonbP(SPI_getbinval(tup, desc, 5, &isnull));
		old = MemoryContextSwitchTo(turn_context);
		rows[i].method = SPI_getvalue(tup, desc, 3);
		rows[i].path = SPI_getvalue(tup, desc, 4);
		rows[i].form = qes_stripe_form_encode(params);
		rows[i].idempotency_key = SPI_getvalue(tup, desc, 6);
		MemoryContextSwitchTo(old);
	}
	/*
	 * Every due row we could take is taken: when is the next one due?  One
	 * due now was skipped (SKIP LOCKED: a backend holds it): look again
	 * after the naptime, or when that backend's commit wakes us.  When the
	 * bucket cut the claim short and it took all it could, is a backlog
	 * left (paced sending), or did it take the last due row?
	 */
	if (n < room || bucket_cut)
	{
		double		due_s = next_due();

		if (n < room)
		{
			claim_more = false;
			qes_outbox_set_due(due_s == 0 ? qes_worker_naptime_ms / 1000.0 : due_s);
		}
		else if (due_s != 0)
		{
			claim_more = false;
			qes_outbox_set_due(due_s);
		}
	}
	*rows_out = rows;
	return n;
}

/* ---- record --------------------------------------------------------------- */

/*
 * The transport error of an answer, or NULL.  One that ended the request
 * before any connection to Stripe existed (its name not resolved, the
 * connection refused, and curl never had a connection to send it on:
 * src/worker_http.c, connected) starts with QES_NOT_SENT: nothing of the
 * request left us, so the attempt does not start the time Stripe keeps its
 * Idempotency-Key (billing.outbox_record_answer reads the prefix).
 */
#define QES_NOT_SENT "not sent: "

static char *
transport_error(OutboxCall *call)
{
	CURLcode	rc = call->http.result;

	if (rc == CURLE_OK)
		return NULL;
	if (call->too_large)
		return psprintf("response larger than %d bytes", QES_MAX_RESPONSE_BYTES);
	return psprintf("%s%s: %s",
					(!call->http.connected &&
					 (rc == CURLE_COULDNT_RESOLVE_HOST || rc == CURLE_COULDNT_RESOLVE_PROXY ||
					  rc == CURLE_COULDNT_CONNECT)) ? QES_NOT_SENT : "",
					curl_easy_strerror(rc),
					call->http.errbuf[0] ? call->http.errbuf : "no detail");
}

/* the seven arguments of billing.outbox_record for one answer */
static void
answer_args(OutboxCall *call, Datum *args, bool *nulls)
{
	char	   *error = transport_error(call);

	args[0] = Int64GetDatum(call->request_id);
	nulls[0] = false;
	args[1] = Int32GetDatum(call->attempt);
	nulls[1] = false;
	args[2] = Int32GetDatum((int32) call->http.response_code);
	nulls[2] = error != NULL || call->http.response_code == 0;
	args[3] = error != NULL ? (Datum) 0 : CStringGetTextDatum(call->response.data);
	nulls[3] = error != NULL;
	args[4] = call->should_retry[0] ? CStringGetTextDatum(call->should_retry) : (Datum) 0;
	nulls[4] = !call->should_retry[0];
	args[5] = call->retry_after[0] ? CStringGetTextDatum(call->retry_after) : (Datum) 0;
	nulls[5] = !call->retry_after[0];
	args[6] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[6] = error == NULL;
}

/* one answer, by billing.outbox_record (a step of qes_worker_subxact) */
static void
record_one_now(void *arg)
{
	OutboxCall *call = (OutboxCall *) arg;
	Datum		args[7];
	bool		nulls[7];
	char		n[7];

	answer_args(call, args, nulls);
	for (int i = 0; i < 7; i++)
		n[i] = nulls[i] ? 'n' : ' ';
	if (SPI_execute_plan(record_plan, args, n, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing worker: billing.outbox_record failed");
}

/* an answer to a request sent before any fence: recorded whatever fence came since (fence.c) */
static void
record_one(void *arg)
{
	qes_fence_exempt_call(record_one_now, arg);
}

/*
 * Record one answer in a subtransaction.  Returns false (logged) when it
 * could not be recorded; the others go on.
 */
static bool
record_in_subxact(OutboxCall *call)
{
	return qes_worker_subxact(record_one, call,
							  psprintf("record the answer to Stripe request " INT64_FORMAT,
									   call->request_id));
}

typedef struct AnswerBatch
{
	OutboxCall **calls;
	int			n;
} AnswerBatch;

/*
 * A batch of answers, by one call of billing.outbox_record_batch (a step of
 * qes_worker_subxact): each argument an array with an element per answer.
 */
static void
record_batch_now(void *arg)
{
	AnswerBatch *batch = (AnswerBatch *) arg;
	int			n = batch->n;
	static const Oid elemtypes[7] = {INT8OID, INT4OID, INT4OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		arrays[7];
	Datum	   *elems[7];
	bool	   *elemnulls[7];
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int j = 0; j < 7; j++)
	{
		elems[j] = palloc(sizeof(Datum) * n);
		elemnulls[j] = palloc(sizeof(bool) * n);
	}
	for (int i = 0; i < n; i++)
	{
		Datum		args[7];
		bool		nulls[7];

		answer_args(batch->calls[i], args, nulls);
		for (int j = 0; j < 7; j++)
		{
			elems[j][i] = args[j];
			elemnulls[j][i] = nulls[j];
		}
	}
	for (int j = 0; j < 7; j++)
	{
		int16		typlen;
		bool		typbyval;
		char		typalign;

		get_typlenbyvalalign(elemtypes[j], &typlen, &typbyval, &typalign);
		arrays[j] = PointerGetDatum(construct_md_array(elems[j], elemnulls[j], 1, dims, lbs,
													   elemtypes[j], typlen, typbyval, typalign));
	}
	if (SPI_execute_plan(record_batch_plan, arrays, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing worker: billing.outbox_record_batch failed");
}

/* answers to requests sent before any fence: recorded whatever fence came since (fence.c) */
static void
record_batch(void *arg)
{
	qes_fence_exempt_call(record_batch_now, arg);
}

/*
 * Record a batch of answers in a subtransaction.  Returns false, with the
 * subtransaction rolled back and nothing recorded, when anything in it
 * raised (not logged: each answer is then recorded on its own).
 */
static bool
record_batch_in_subxact(OutboxCall **calls, int n)
{
	AnswerBatch batch = {calls, n};

	return qes_worker_subxact(record_batch, &batch, NULL);
}

/*
 * calls in the order they were sent (then of their requests' ids): of two
 * answers about one object, the one asked for later is applied last
 */
static int
call_cmp(const void *a, const void *b)
{
	const OutboxCall *x = *(OutboxCall *const *) a;
	const OutboxCall *y = *(OutboxCall *const *) b;

	if (x->started_at != y->started_at)
		return x->started_at < y->started_at ? -1 : 1;
	return x->request_id < y->request_id ? -1 : (x->request_id > y->request_id ? 1 : 0);
}

/*
 * Record the answered calls in the transaction we are in (of incarnation
 * *extoid), committing and beginning another before the subtransaction
 * xids could overflow the PGPROC cache.  The calls recorded are put in
 * recorded[] (they are forgotten once the last transaction has committed);
 * the answers of a dropped incarnation are dropped.  Returns how many were
 * recorded.
 */
static int
record_answers(Oid *extoid, OutboxCall **recorded)
{
	/* (in the turn's memory: SPI's goes with each commit) */
	OutboxCall **todo = MemoryContextAlloc(turn_context, sizeof(OutboxCall *) * Max(n_answered, 1));
	int			n_todo = 0;
	int			n_recorded = 0;

	for (OutboxCall *c = calls; c; c = c->next)
	{
		if (!c->done || c->record_tries < 0)
			continue;
		if (c->extoid != *extoid)
		{
			/* its row went with DROP EXTENSION: nothing to record it on */
			ereport(LOG,
					(errmsg("qes_billing worker: dropped the answer to Stripe request " INT64_FORMAT " of a dropped incarnation of the extension",
							c->request_id)));
			c->record_tries = -2;
			n_answered--;
			continue;
		}
		todo[n_todo++] = c;
	}
	/* in the order they were sent (billing.outbox_record_batch applies them so) */
	if (n_todo > 1)
		qsort(todo, n_todo, sizeof(OutboxCall *), call_cmp);

	for (int start = 0; start < n_todo; start += QES_RECORD_BATCH)
	{
		int			n = Min(QES_RECORD_BATCH, n_todo - start);
		OutboxCall **batch = todo + start;

		/*
		 * A batch takes one subtransaction xid (and what the answers' apply
		 * functions take of their own): commit first when it could pass the
		 * budget.
		 */
		if (qes_worker_subxids() > QES_SUBXID_BUDGET - QES_RECORD_BATCH)
		{
			qes_worker_end_xact();
			if (qes_worker_begin_xact("qes_billing worker: Stripe requests") != *extoid)
			{
				/* the extension went meanwhile: the tick reconciles, these wait */
				*extoid = InvalidOid;
				break;
			}
		}
		if (record_batch_in_subxact(batch, n))
		{
			for (int i = 0; i < n; i++)
				recorded[n_recorded++] = batch[i];
			continue;
		}
		/* something in the batch raised: each answer on its own */
		for (int i = 0; i < n; i++)
		{
			OutboxCall *c = batch[i];

			if (qes_worker_subxids() >= QES_SUBXID_BUDGET)
			{
				qes_worker_end_xact();
				if (qes_worker_begin_xact("qes_billing worker: Stripe requests") != *extoid)
				{
					*extoid = InvalidOid;
					break;
				}
			}
			c->record_tries++;
			if (record_in_subxact(c))
				recorded[n_recorded++] = c;
		}
		if (!OidIsValid(*extoid))
			break;
	}
	return n_recorded;
}

/* ---- one turn: record what came in, claim what takes its place ----------- */

/*
 * Forget the calls whose answers were recorded, what cannot be (its
 * extension is gone) and what failed too often (its row is reclaimed as
 * stale and sent again with the same Idempotency-Key); their handles are
 * kept for the next requests.
 */
static void
forget_finished(void)
{
	for (OutboxCall **link = &calls; *link;)
	{
		OutboxCall *c = *link;

		if (c->done && (c->record_tries < 0 || c->record_tries >= QES_RECORD_TRIES))
		{
			/* its row stays in flight: the tick reclaims it once stale */
			if (c->record_tries >= QES_RECORD_TRIES)
			{
				TimestampTz stale_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
																   2 * (long) qes_request_timeout_ms + 100);

				if (tick_wanted_at == 0 || stale_at < tick_wanted_at)
					tick_wanted_at = stale_at;
			}
			if (c->record_tries != -2)
				n_answered--;	/* (a dropped one was counted out when dropped) */
			*link = c->next;
			put_call(c);
		}
		else
			link = &c->next;
	}
}

/* ---- the direct lane (src/outbox_lane.c) --------------------------------- */

/*
 * Put the lane's requests we did not send back in the queue (in the
 * transaction we are in); true when that was done.
 */
static bool
release_lane_requests(void)
{
	Datum		elems[QES_LANE_RELEASE_MAX];
	Datum		args[1];

	for (int i = 0; i < n_release; i++)
		elems[i] = Int64GetDatum(lane_release[i]);
	args[0] = PointerGetDatum(construct_array(elems, n_release, INT8OID, sizeof(int64),
											  FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	if (SPI_execute_plan(lane_release_plan, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing worker: billing.outbox_lane_release failed");
	return true;
}

/*
 * Open the lane while a request queued now would be claimed at once: no
 * backlog (nothing known due, not paced, nothing to put back), room in
 * flight, a token, a key, not paused, and no synchronous standbys (a claim
 * there reaches the standby before any byte leaves; the lane's claim is the
 * queuing transaction's, whose own synchronous_commit decides).
 */
static void
lane_publish(void)
{
	char	   *problem;
	int			rate = qes_max_requests_per_second;
	bool		open;

	if (rate > 0)
		refill_tokens(rate);
	open = qes_direct_lane && !claim_more && !paced && n_release == 0 &&
		n_in_flight < qes_max_inflight && (rate <= 0 || tokens >= 1) &&
		!qes_worker_paused &&
		(SyncRepStandbyNames == NULL || SyncRepStandbyNames[0] == '\0');
	/*
	 * (the key is looked at when the lane opens, not at every turn: a key
	 * gone since is found when a request is taken, and that one goes back
	 * to the queue)
	 */
	if (open && !lane_open)
		open = !qes_stripe_key_problem(QES_KEY_SECRET, &problem);
	lane_open = open;
	qes_lane_publish(open, qes_worker_incarnation());
}

/*
 * Send what the lane holds of committed transactions, as far as there is
 * room in flight; what cannot be sent now (no key, paused, no token, queued
 * more than QES_LANE_MAX_AGE_MS ago) is put back in the queue by the next
 * turn.  Returns how many were sent.
 */
/*
 * make_call for request i of the n taken from the lane; when that raises,
 * it and the ones after it go back to the queue (their slots are free:
 * they would be lost until a reclaim took them for possibly sent).
 */
static OutboxCall *
make_lane_call(const ClaimedRow *row, const char *key, Oid extoid, int i, int n)
{
	OutboxCall *call = NULL;

	PG_TRY();
	{
		call = make_call(row, key, extoid);
	}
	PG_CATCH();
	{
		for (int j = i; j < n; j++)
			if (lane_buf[j].extoid == extoid)
				lane_release[n_release++] = lane_buf[j].request_id;
		claim_more = true;
		PG_RE_THROW();
	}
	PG_END_TRY();
	return call;
}

static int
lane_send(void)
{
	int			room = qes_max_inflight - n_in_flight;
	int			n;
	int			sent = 0;
	int			released = 0;
	const char *key = NULL;
	char	   *problem;
	Oid			extoid = qes_worker_incarnation();
	TimestampTz now;

	if (!qes_lane_has_work() || room <= 0 || n_release > QES_LANE_RELEASE_MAX - QES_LANE_SLOTS)
		return 0;
	n = qes_lane_take(lane_buf, Min(room, QES_LANE_SLOTS));
	if (n == 0)
		return 0;
	if (!qes_stripe_key_problem(QES_KEY_SECRET, &problem))
		key = qes_stripe_key(QES_KEY_SECRET, false);
	now = GetCurrentTimestamp();
	for (int i = 0; i < n; i++)
	{
		QesLaneRequest *r = &lane_buf[i];
		ClaimedRow	row;
		OutboxCall *call;

		if (r->extoid != extoid)
		{
			/* queued in an incarnation dropped since: its row went with it */
			ereport(LOG,
					(errmsg("qes_billing worker: dropped Stripe request " INT64_FORMAT " of a dropped incarnation of the extension",
							r->request_id)));
			continue;
		}
		if (r->unknown || key == NULL || qes_worker_paused ||
			now - r->reserved_at > (TimestampTz) QES_LANE_MAX_AGE_MS * 1000 ||
			take_tokens(1) == 0)
		{
			lane_release[n_release++] = r->request_id;
			released++;
			claim_more = true;	/* (the turn that releases it claims it) */
			continue;
		}
		row.request_id = r->request_id;
		row.attempt = 1;
		row.method = r->method;
		row.path = r->path;
		row.form = r->form;
		row.idempotency_key = r->idempotency_key;
		call = make_lane_call(&row, key, extoid, i, n);
		call->lane = true;
		call->next = calls;
		calls = call;
		n_in_flight++;
		qes_http_start(&call->http);
		sent++;
	}
	qes_lane_count(sent, released);
	return sent;
}

/* ---- recording later ------------------------------------------------------- */

/*
 * Recording later.  A successful answer to a request of the direct lane is
 * recorded with the next claim, which shares its transaction; when none
 * comes, it waits up to qes_billing.record_delay (1 s) for others, or
 * until QES_RECORD_BATCH have come, or requests wait to go back to the
 * queue: at low load, where the lane sends without a transaction, a
 * transaction then records several answers instead of one each (pg_net
 * records about once a second).  The local state (the mirror, a pending
 * change) follows Stripe that much later.  Recorded at once: a failure
 * (its retry or final state matters), the answer to a request claimed from
 * the queue (a backlog's turns record as they claim), and every answer for
 * QES_PROMPT_MS after a request was queued to wait for another
 * (billing.outbox_note_waiter), so that a chain goes at the pace of
 * Stripe's answers.
 */
static bool
record_due(void)
{
	uint64		waiters = qes_lane_waiters();
	TimestampTz now;

	if (n_answered == 0)
		return false;
	now = GetCurrentTimestamp();
	if (waiters != waiters_seen)
	{
		waiters_seen = waiters;
		prompt_until = TimestampTzPlusMilliseconds(now, QES_PROMPT_MS);
	}
	return n_answered >= QES_RECORD_BATCH || n_release > 0 || answer_urgent || now < prompt_until ||
		now >= TimestampTzPlusMilliseconds(answered_at, qes_record_delay_ms);
}

/* milliseconds until the answers that came in are due for recording (-1: none waits) */
static long
record_wait_ms(void)
{
	TimestampTz now;
	TimestampTz due;

	if (n_answered == 0)
		return -1;
	if (record_due())
		return 0;
	now = GetCurrentTimestamp();
	due = TimestampTzPlusMilliseconds(answered_at, qes_record_delay_ms);
	return Max(1, TimestampDifferenceMilliseconds(now, due));
}

/*
 * One transaction: record the answers that came in, then claim up to room
 * due requests (if the extension is the incarnation the tick reconciled and
 * a key is set), COMMIT, and only then start the claimed requests.  After a
 * turn that failed, recording and claiming commit apart, so that an error
 * in claiming cannot keep answers from being recorded.  only_if_due: the
 * turn claims because answers came in (a retry scheduled, a waiting request
 * released), not because requests are known to be due: it claims only if
 * one is.  Returns how many requests were claimed; *n_recorded says how
 * many answers were recorded.
 */
static int
turn(int room, bool only_if_due, int *n_recorded)
{
	const char *key = NULL;
	char	   *problem;
	Oid			extoid;
	OutboxCall **recorded;
	ClaimedRow *rows = NULL;
	int			claimed = 0;
	double		due_s;
	bool		apart = last_turn_failed;
	bool		released = false;
	MemoryContext old;

	*n_recorded = 0;
	if (room > 0)
	{
		if (qes_stripe_key_problem(QES_KEY_SECRET, &problem))
		{
			/*
			 * Nothing can be sent: the rows stay pending (nothing is lost), and
			 * api.health reports the key problem and the outbox backlog.
			 */
			claim_more = false;
			room = 0;
		}
		else					/* present and of the environment's mode (guc.c checks the prefix) */
			key = qes_stripe_key(QES_KEY_SECRET, false);
	}
	if (room == 0 && n_answered == 0 && n_release == 0)
		return 0;

	old = CurrentMemoryContext;
	MemoryContextReset(turn_context);
	recorded = MemoryContextAlloc(turn_context, sizeof(OutboxCall *) * Max(n_answered, 1));

	last_turn_failed = true;	/* until it has committed */
	extoid = qes_worker_begin_xact("qes_billing worker: Stripe requests");
	if (OidIsValid(extoid))
		prepare_plans(extoid);
	if (n_answered > 0)
		*n_recorded = record_answers(&extoid, recorded);
	if (n_release > 0)
	{
		if (OidIsValid(extoid) && extoid == qes_worker_incarnation())
			released = release_lane_requests();
		else
			n_release = 0;		/* their incarnation is gone, and they with it */
	}
	if (room > 0)
	{
		/*
		 * Only from the incarnation the tick has reconciled: a new one
		 * (created since) wakes the worker at its commit, and its tick comes
		 * first.
		 */
		if (!OidIsValid(extoid) || extoid != qes_worker_incarnation())
			claim_more = false;
		else
		{
			if (apart && *n_recorded > 0)
			{
				qes_worker_end_xact();
				if (qes_worker_begin_xact("qes_billing worker: Stripe requests") != extoid)
					extoid = InvalidOid;
			}
			if (!OidIsValid(extoid))
				claim_more = false;
			else if (only_if_due && (due_s = next_due()) != 0)
			{
				/*
				 * Only answers brought us here, and nothing is due: a claim
				 * (an UPDATE of the queue, a hundred or more microseconds even
				 * when it finds nothing) would find nothing.
				 */
				claim_more = false;
				qes_outbox_set_due(due_s);
			}
			else
				claimed = claim(room, &rows);
		}
	}
	else if (*n_recorded > 0)
		claim_more = true;		/* a retry scheduled, or a waiting request released */

	/*
	 * A transaction that only claimed commits without waiting for its WAL
	 * flush (docs/architecture.md, "One Stripe request"): the claim is
	 * visible at once, so nothing else takes the rows, but it need not
	 * survive a crash.  One lost in a crash leaves its rows pending, and they
	 * go out again under their Idempotency-Keys, which Stripe answers with
	 * its first answer -- the outcome of a durable claim reclaimed at
	 * start-up too, but with no reclaim audited and one attempt fewer
	 * counted.  The recording of the answers waits for its flush, which
	 * carries the claim's WAL with it: one flush per request instead of two
	 * when Stripe answers within wal_writer_delay.  Not where the DBA asked
	 * for synchronous standbys: there a claim reaches the standby before any
	 * byte leaves, so that after a failover a row the new primary finds
	 * pending was never sent.
	 */
	if (claimed > 0 && *n_recorded == 0 &&
		(SyncRepStandbyNames == NULL || SyncRepStandbyNames[0] == '\0'))
		(void) set_config_option("synchronous_commit", "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);
	qes_worker_end_xact();		/* COMMIT: the rows are in_flight before a byte leaves */
	MemoryContextSwitchTo(old);
	last_turn_failed = false;

	/* committed: forget what was recorded, and released */
	if (n_answered == *n_recorded)
		answer_urgent = false;
	if (released)
	{
		n_release = 0;
		claim_more = true;		/* (they are due) */
	}
	for (int i = 0; i < *n_recorded; i++)
		recorded[i]->record_tries = -1;
	forget_finished();

	for (int i = 0; i < claimed; i++)
	{
		OutboxCall *call = make_call(&rows[i], key, extoid);

		call->next = calls;
		calls = call;
		n_in_flight++;
		/* (refused by curl: answered at once as a transport error, retried with backoff) */
		qes_http_start(&call->http);
	}
	return claimed;
}

/* ---- the pump ------------------------------------------------------------- */

/* requests a paced turn waits for: QES_PACE_MS worth, at most the free slots */
static int
pace_batch(int rate)
{
	return Max(1, Min(rate * QES_PACE_MS / 1000, qes_max_inflight - n_in_flight));
}

/*
 * Milliseconds until a paced turn is due (0: it is now, or not paced).
 * Answers that came in do not shorten it until QES_PACE_MS after the
 * first.
 */
static long
pace_wait_ms(void)
{
	int			rate = qes_max_requests_per_second;
	TimestampTz now;
	long		wait = QES_PACE_MS;
	int			want;

	if (!paced || rate <= 0)
		return 0;
	now = GetCurrentTimestamp();
	if (n_answered > 0)
	{
		TimestampTz due = TimestampTzPlusMilliseconds(answered_at, QES_PACE_MS);

		/* (the bucket is full again by then: the claim shares their turn) */
		if (due <= now)
			return 0;
		wait = TimestampDifferenceMilliseconds(now, due);
	}
	if (n_in_flight < qes_max_inflight)
	{
		want = pace_batch(rate);
		refill_tokens(rate);
		if (tokens >= want)
			return 0;
		wait = Min(wait, (long) ceil((want - tokens) * 1000.0 / rate));
	}
	return Max(wait, 1);
}

/*
 * Has a commit queued a Stripe request since we last looked?  (The wake-up
 * trigger on billing.stripe_requests counts them, src/worker.c.)  Then one
 * may be due now, whatever the last claim or tick said.
 */
static bool
outbox_woken(void)
{
	uint64		wakes = pg_atomic_read_u64(&qes_worker_state->outbox_wakes);

	if (wakes == outbox_wakes_seen)
		return false;
	outbox_wakes_seen = wakes;
	return true;
}

/*
 * One turn of the outbox, without waiting: record the answers that came in
 * and claim the due requests that fit (up to
 * qes_billing.max_concurrent_requests in flight, at the rate
 * qes_billing.max_requests_per_second allows), started on the worker's curl
 * loop (src/worker_http.c).  *progress: something was recorded or claimed,
 * so another turn may find more at once.  Returns true when requests are in
 * flight, answered and not recorded, or more may be due, so the caller must
 * not sleep.
 */
bool
qes_outbox_pump(bool *progress)
{
	int			room = 0;

	*progress = false;
	if (outbox_woken() || (claim_at != 0 && GetCurrentTimestamp() >= claim_at))
	{
		claim_at = 0;
		claim_more = true;		/* a commit queued one: claimed at once */
	}
	outbox_init();
	/* the direct lane first: committed requests on the wire, no transaction */
	if (lane_send() > 0)
		*progress = true;
	if (!claim_more && n_in_flight == 0 && n_answered == 0 && n_release == 0)
	{
		lane_publish();
		return false;			/* idle: no transaction, no curl */
	}
	/* (a turn forgets what it recorded; one that failed leaves it to us) */
	if (last_turn_failed)
		forget_finished();
	if (qes_max_requests_per_second <= 0)
		paced = false;
	else if (pace_wait_ms() > 0)
	{
		lane_publish();
		return true;			/* paced: the turn waits for a batch */
	}
	/*
	 * Answers due for recording: claim in the same transaction (a retry
	 * scheduled or a waiting request released may be due), not in a turn of
	 * its own.
	 */
	if ((claim_more || record_due()) && n_in_flight < qes_max_inflight)
	{
		int			want = qes_max_inflight - n_in_flight;

		room = take_tokens(want);
		/*
		 * The bucket, not the queue, cut the claim short (claim() looks for
		 * a backlog).  An empty bucket decides nothing: no claim looks, and
		 * a lone request after a burst waits for one token, not a pace.
		 */
		if (room > 0)
			bucket_cut = paced = claim_more && room < want;
	}
	if (room > 0 || record_due() || n_release > 0)
	{
		int			recorded;
		int			claimed = turn(room, !claim_more, &recorded);

		bucket_cut = false;
		tokens += room - claimed;	/* unused tokens go back */
		*progress |= claimed > 0 || recorded > 0;
		if (!claim_more)
			paced = false;		/* the claim found the queue's end */
		if (n_answered > 0)
			answered_at = GetCurrentTimestamp();	/* (left unrecorded: tried again at once) */
	}
	lane_publish();
	return n_in_flight > 0 || claim_more || n_answered > 0 || n_release > 0;
}

/*
 * How long the worker may sleep while the outbox is busy: 0, or -- when
 * nothing is in flight and only the rate limit holds requests back -- until
 * the next token.
 */
long
qes_outbox_busy_wait_ms(void)
{
	/* (with transfers in flight the loop waits on their sockets: run_pumps) */
	if (paced)
		return qes_http_in_flight() == 0 ? pace_wait_ms() : 0;
	if (n_in_flight > 0 || n_release > 0)
		return 0;
	if (!claim_more)
	{
		long		record = record_wait_ms();
		long		claim = qes_outbox_claim_wait_ms();

		/* answers wait to be recorded: until then, or a claim due sooner */
		if (record <= 0)
			return 0;
		return claim >= 0 ? Min(record, claim) : record;
	}
	return token_wait_ms();		/* (answers that came in share the claim's turn) */
}

/*
 * How long the worker may wait on curl's sockets before the outbox wants a
 * turn although no answer came (-1: until one comes): a paced turn's time,
 * when the answers that came in are due for recording, or when a request
 * falls due.
 */
long
qes_outbox_pace_wait_ms(void)
{
	long		wait = paced ? pace_wait_ms() : -1;
	long		record = record_wait_ms();
	long		claim = claim_at != 0 ? qes_outbox_claim_wait_ms() : -1;

	/* (0 from any: its turn is due now, and the pump has taken it) */
	if (record > 0 && (wait <= 0 || record < wait))
		wait = record;
	if (claim > 0 && (wait <= 0 || claim < wait))
		wait = claim;
	return wait;
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

/*
 * When the worker's tick must run for the outbox (0: no need): an answer it
 * could not record leaves its row in flight, to be reclaimed once stale and
 * sent again with its key.  take: the caller has merged it into its
 * schedule, forget it.
 */
TimestampTz
qes_outbox_tick_wanted(bool take)
{
	TimestampTz at = tick_wanted_at;

	if (take)
		tick_wanted_at = 0;
	return at;
}

/*
 * The worker is asked to stop: record the answers that came in (and put
 * back what the lane left to release), so that a clean shutdown leaves no
 * request in flight whose answer we had (it would be reclaimed at the next
 * start as possibly sent, and sent again).  What is still on the wire stays
 * in flight, as it must.  With a lock timeout: a lock held by a prepared
 * transaction must not hold the shutdown.  Called outside any
 * transaction; an error is logged and given up on.
 */
void
qes_outbox_flush_answers(void)
{
	MemoryContext old = CurrentMemoryContext;
	int			recorded = 0;

	if ((n_answered == 0 && n_release == 0) || outbox_context == NULL)
		return;
	/* (never waits long: a lock held by a prepared transaction would hold the shutdown) */
	SetConfigOption("lock_timeout", "1000", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("statement_timeout", "5000", PGC_SUSET, PGC_S_OVERRIDE);
	PG_TRY();
	{
		(void) turn(0, true, &recorded);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(old);
		EmitErrorReport();
		FlushErrorState();
		qes_worker_abort_xact();
	}
	PG_END_TRY();
}
