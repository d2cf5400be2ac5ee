/*-------------------------------------------------------------------------
 *
 * notify.c
 *	  The worker delivers billing.notifications: email over SMTP and a
 *	  signed webhook to the platform, through the worker's libcurl multi
 *	  loop (src/worker_http.c).
 *
 * The protocol with SQL (sql/install/89_notify.sql) is the outbox's
 * (docs/architecture.md, rule 3, docs/architecture.md "One notification"):
 *
 *	1. claim: in a short transaction billing.notify_claim() skips what no
 *	   longer applies, marks due rows in_flight (FOR UPDATE SKIP LOCKED) and
 *	   returns them rendered; billing.notify_next_due() says when the next
 *	   one is due; COMMIT.
 *	2. send: each row goes out on its channels -- an email (multipart/
 *	   alternative, plain text and HTML) to the SMTP server, a JSON event
 *	   POSTed to the platform, signed like Stripe's webhooks
 *	   ("QES-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of t.body>").  No
 *	   transaction is open meanwhile.
 *	3. record: each channel's outcome by billing.notify_record() in a new
 *	   transaction (a subtransaction per outcome).
 *
 * Transactions and subtransactions are the worker's (src/worker_xact.c).  A
 * turn of the pump never waits: the worker's loop turns it, and waits on
 * curl's sockets and its latch together between turns (src/worker_http.c,
 * which hands each finished delivery back to this file).
 *
 * At least once: a crash between sending and recording sends again.  Every
 * attempt carries the notification's event_id (the event's "id" and the
 * QES-Event-Id header; the email's Message-ID and X-QES-Event-Id), so
 * receivers can deduplicate.  Rows left in_flight by a crash are reclaimed
 * before this process claims for the first time (billing.notify_reclaim).
 *
 * Idle is free (docs/architecture.md, rule 14): a claim transaction runs only when a
 * commit that queued work other than Stripe requests woke the worker since
 * the last claim (qes_worker_state's other_wakes moved: notifications, a
 * changed grace period or billing clock wake it; a commit that only queued
 * Stripe requests does not), when the due time billing.notify_next_due() gave has
 * come, or while rows may be waiting; with no channel configured, never.
 *
 * Secrets (the SMTP password, the webhook signing secret) are read from the
 * settings at each claim, go only to libcurl and the HMAC, and are never
 * logged or stored: error texts are redacted before they are recorded.
 *
 * All state lives in this process (the worker); nothing here is shared.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <limits.h>
#include <math.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/base64.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "guc.h"
#include "notify.h"
#include "fence.h"
#include "redact.h"
#include "shmem.h"
#include "worker_http.h"
#include "worker_xact.h"

/* transfers (an email or a webhook POST each) in flight at once */
#define QES_NOTIFY_MAX_INFLIGHT	32
/* notifications claimed per transaction */
#define QES_NOTIFY_CLAIM_BATCH	50
#define QES_NOTIFY_RECORD_TRIES	3
/* the platform's answer is not needed: read at most this much of it */
#define QES_NOTIFY_MAX_RESPONSE	65536

PG_FUNCTION_INFO_V1(qes_notify_channels);

typedef enum NotifyChannel
{
	CHANNEL_EMAIL,
	CHANNEL_WEBHOOK
} NotifyChannel;

static const char *const channel_names[] = {"email", "webhook"};

/* One email or one webhook POST of one notification. */
typedef struct Transfer
{
	QesHttpTransfer http;		/* first: its curl handle */
	MemoryContext context;		/* holds this struct and all it points to */
	struct Transfer *next;
	NotifyChannel channel;
	char	   *tenant_id;
	int64		notification_id;
	int32		attempt;
	struct curl_slist *list;	/* SMTP recipients, or HTTP headers */
	char	   *data;			/* the message (SMTP upload) or the body */
	size_t		len;
	size_t		pos;
	size_t		received;
	bool		done;			/* finished (http.result; http.response_code: the
								 * last SMTP reply or the HTTP status) */
	int			record_tries;
	Oid			extoid;			/* the incarnation of the extension it was claimed from */
} Transfer;

/* What the settings configure, checked at each claim. */
typedef struct Channels
{
	bool		email;
	bool		webhook;
	char	   *email_problem;	/* why not, when not */
	char	   *webhook_problem;
	char	   *mail_from;		/* addr-spec of qes_billing.notify_from */
	char	   *from_domain;
} Channels;

static MemoryContext notify_context = NULL;
static Transfer *transfers = NULL;	/* in flight or done, not yet recorded */
static int	n_in_flight = 0;
static bool claim_more = true;	/* rows may be due now */
/*
 * other_wakes when we last claimed: commits that queued work other than
 * Stripe requests (a notification is such work, src/worker.c); a commit
 * that only queued Stripe requests does not send us claiming
 */
static uint64 seen_wakes = 0;
static TimestampTz due_at = 0;	/* when the next row is due (0: none known) */
static bool was_enabled = false;
static Oid	reclaimed_for = InvalidOid;
static uint64 settings_hash = 0;	/* of the settings the cached connections were made with */
static bool connections_stale = false;	/* made with other settings: forget them */

/* ---- settings ------------------------------------------------------------- */

/* Is the host of "scheme://host[:port]/..." (p points past "//") the loopback? */
static bool
host_is_loopback(const char *p)
{
	size_t		len;

	if (p[0] == '[')
		return strncmp(p, "[::1]", 5) == 0;
	len = strcspn(p, ":/?#");
	return (len == 9 && strncmp(p, "localhost", 9) == 0) ||
		(len >= 9 && strncmp(p, "127.", 4) == 0);
}

/* the addr-spec of "Name <addr>" or "addr"; NULL when it is not one */
static char *
addr_spec(const char *from)
{
	const char *lt = strchr(from, '<');
	const char *start = lt ? lt + 1 : from;
	size_t		len = lt ? strcspn(start, ">") : strlen(from);
	char	   *addr;
	char	   *at;

	while (len > 0 && start[0] == ' ')
		start++, len--;
	while (len > 0 && start[len - 1] == ' ')
		len--;
	if (lt && start[len] != '>')
		return NULL;
	addr = pnstrdup(start, len);
	at = strchr(addr, '@');
	if (len == 0 || at == NULL || at == addr || at[1] == '\0' || strchr(at + 1, '@') ||
		strpbrk(addr, " \t\r\n<>,;\"") != NULL)
		return NULL;
	return addr;
}

static bool
is_ascii_line(const char *s)
{
	for (; *s; s++)
		if ((unsigned char) *s >= 0x80 || *s == '\r' || *s == '\n')
			return false;
	return true;
}

static void
channels_config(Channels *ch)
{
	const char *smtp = qes_smtp_url ? qes_smtp_url : "";
	const char *from = qes_notify_from ? qes_notify_from : "";
	const char *hook = qes_notify_webhook_url ? qes_notify_webhook_url : "";
	bool		live = qes_live_mode();

	memset(ch, 0, sizeof(*ch));

	if (smtp[0] == '\0')
		ch->email_problem = "qes_billing.smtp_url is not set";
	else if (from[0] == '\0')
		ch->email_problem = "qes_billing.notify_from is not set";
	else if (!is_ascii_line(from) || (ch->mail_from = addr_spec(from)) == NULL)
		ch->email_problem = "qes_billing.notify_from is not an ASCII address such as \"QES Billing <billing@example.com>\"";
	else if (strncmp(smtp, "smtp://", 7) == 0 && qes_smtp_starttls != QES_STARTTLS_REQUIRE &&
			 (live || !host_is_loopback(smtp + 7)) &&
			 (qes_smtp_starttls == QES_STARTTLS_OFF || (qes_smtp_username && qes_smtp_username[0])))
		ch->email_problem = live
			? "qes_billing.smtp_starttls is not \"require\" in production, where email (and the SMTP password) would travel in clear text"
			: "qes_billing.smtp_starttls is not \"require\" for an SMTP server that is not the loopback";
	else
	{
		ch->email = true;
		ch->from_domain = strchr(ch->mail_from, '@') + 1;
	}

	if (hook[0] == '\0')
		ch->webhook_problem = "qes_billing.notify_webhook_url is not set";
	else if (qes_notify_webhook_secret() == NULL)
		ch->webhook_problem = "qes_billing.notify_webhook_secret (or QES_NOTIFY_WEBHOOK_SECRET) is not set";
	else if (strncmp(hook, "https://", 8) != 0 &&
			 (live || strncmp(hook, "http://", 7) != 0 || !host_is_loopback(hook + 7)))
		ch->webhook_problem = "qes_billing.notify_webhook_url must be https:// (http:// only to the loopback, outside production)";
	else
		ch->webhook = true;
}

/*
 * billing.notify_channels(): each channel, whether it is on, where it goes
 * and what is missing.  Never a secret (the SMTP URL cannot hold one).
 */
Datum
qes_notify_channels(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Channels	ch;
	Datum		values[4];
	bool		nulls[4];

	InitMaterializedSRF(fcinfo, 0);
	channels_config(&ch);

	memset(nulls, 0, sizeof(nulls));
	values[0] = CStringGetTextDatum("email");
	values[1] = BoolGetDatum(ch.email);
	nulls[2] = (qes_smtp_url == NULL || qes_smtp_url[0] == '\0');
	values[2] = nulls[2] ? (Datum) 0 : CStringGetTextDatum(qes_smtp_url);
	nulls[3] = ch.email_problem == NULL;
	values[3] = nulls[3] ? (Datum) 0 : CStringGetTextDatum(ch.email_problem);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);

	memset(nulls, 0, sizeof(nulls));
	values[0] = CStringGetTextDatum("webhook");
	values[1] = BoolGetDatum(ch.webhook);
	nulls[2] = (qes_notify_webhook_url == NULL || qes_notify_webhook_url[0] == '\0');
	values[2] = nulls[2] ? (Datum) 0 : CStringGetTextDatum(qes_notify_webhook_url);
	nulls[3] = ch.webhook_problem == NULL;
	values[3] = nulls[3] ? (Datum) 0 : CStringGetTextDatum(ch.webhook_problem);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);

	return (Datum) 0;
}

/* ---- the email -------------------------------------------------------------- */

/* quoted-printable (RFC 2045), lines ending in CRLF, at most 76 characters */
static void
append_qp(StringInfo out, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	int			linelen = 0;

	for (const unsigned char *p = (const unsigned char *) s; *p; p++)
	{
		unsigned char c = *p;
		bool		literal;
		int			width;

		if (c == '\r')
			continue;
		if (c == '\n')
		{
			appendStringInfoString(out, "\r\n");
			linelen = 0;
			continue;
		}
		if (c == ' ' || c == '\t')
			literal = p[1] != '\0' && p[1] != '\n' && p[1] != '\r';	/* no trailing space */
		else
			literal = c >= 33 && c <= 126 && c != '=';
		/* a dot opening a line: encoded, so no server reads it as the end */
		if (c == '.' && linelen == 0)
			literal = false;
		width = literal ? 1 : 3;
		if (linelen + width > 75)
		{
			appendStringInfoString(out, "=\r\n");
			linelen = 0;
		}
		if (literal)
			appendStringInfoChar(out, (char) c);
		else
		{
			appendStringInfoChar(out, '=');
			appendStringInfoChar(out, hex[c >> 4]);
			appendStringInfoChar(out, hex[c & 15]);
		}
		linelen += width;
	}
	if (linelen > 0)
		appendStringInfoString(out, "\r\n");
}

/* A header value: as is when short ASCII, else RFC 2047 encoded words. */
static void
append_header_text(StringInfo out, const char *s)
{
	size_t		len = strlen(s);
	size_t		pos = 0;
	bool		first = true;

	if (is_ascii_line(s) && len <= 70)
	{
		appendStringInfoString(out, s);
		return;
	}
	while (pos < len)
	{
		size_t		chunk = Min(len - pos, 45);
		char		b64[64];
		int			n;

		/* never split a UTF-8 character */
		while (chunk > 0 && pos + chunk < len && ((unsigned char) s[pos + chunk] & 0xC0) == 0x80)
			chunk--;
		if (chunk == 0)
			chunk = Min(len - pos, 45);
		n = pg_b64_encode(s + pos, (int) chunk, b64, sizeof(b64));
		if (n < 0)
			elog(ERROR, "qes_billing worker: could not encode a header");
		appendStringInfo(out, "%s=?UTF-8?B?%.*s?=", first ? "" : "\r\n ", n, b64);
		first = false;
		pos += chunk;
	}
}

static void
append_rfc5322_date(StringInfo out, time_t t)
{
	static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
	static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
	"Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
	struct tm	tm;

	gmtime_r(&t, &tm);
	appendStringInfo(out, "%s, %02d %s %04d %02d:%02d:%02d +0000",
					 days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900,
					 tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* the whole message: headers, then multipart/alternative (text, HTML) */
static char *
build_email(const Channels *ch, const char *to, const char *event_id, const char *kind,
			const char *subject, const char *text, const char *html)
{
	StringInfoData m;

	initStringInfo(&m);
	appendStringInfoString(&m, "Date: ");
	append_rfc5322_date(&m, time(NULL));
	appendStringInfo(&m, "\r\nFrom: %s\r\nTo: <%s>\r\nSubject: ", qes_notify_from, to);
	append_header_text(&m, subject);
	/* the same on every attempt: a receiver deduplicates by it */
	appendStringInfo(&m, "\r\nMessage-ID: <%s@%s>\r\n", event_id, ch->from_domain);
	appendStringInfo(&m, "X-QES-Event-Id: %s\r\nX-QES-Notification: %s\r\n", event_id, kind);
	appendStringInfoString(&m, "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n");
	/* "=_" never occurs in quoted-printable text: a safe boundary */
	appendStringInfo(&m, "Content-Type: multipart/alternative; boundary=\"=_qes_%s\"\r\n\r\n", event_id);
	appendStringInfoString(&m, "This is a message in MIME format.\r\n");
	appendStringInfo(&m, "\r\n--=_qes_%s\r\n", event_id);
	appendStringInfoString(&m, "Content-Type: text/plain; charset=utf-8\r\n"
						   "Content-Transfer-Encoding: quoted-printable\r\n\r\n");
	append_qp(&m, text);
	appendStringInfo(&m, "\r\n--=_qes_%s\r\n", event_id);
	appendStringInfoString(&m, "Content-Type: text/html; charset=utf-8\r\n"
						   "Content-Transfer-Encoding: quoted-printable\r\n\r\n");
	append_qp(&m, html);
	appendStringInfo(&m, "\r\n--=_qes_%s--\r\n", event_id);
	return m.data;
}

/* ---- curl callbacks (must not ereport) ---------------------------------- */

static size_t
read_cb(char *buffer, size_t size, size_t nitems, void *arg)
{
	Transfer   *t = (Transfer *) arg;
	size_t		n = Min(size * nitems, t->len - t->pos);

	memcpy(buffer, t->data + t->pos, n);
	t->pos += n;
	return n;
}

static size_t
discard_cb(char *data, size_t size, size_t nmemb, void *arg)
{
	Transfer   *t = (Transfer *) arg;
	size_t		n = size * nmemb;

	t->received += n;
	return t->received > QES_NOTIFY_MAX_RESPONSE ? 0 : n;
}

/* ---- transfers ------------------------------------------------------------ */

static void
notify_init(void)
{
	if (notify_context == NULL)
		notify_context = AllocSetContextCreate(TopMemoryContext, "qes_billing notifications",
											   ALLOCSET_DEFAULT_SIZES);
}

/* a delivery finished (src/worker_http.c calls this): recorded at the next turn */
static void
transfer_done(QesHttpTransfer *xfer)
{
	Transfer   *t = (Transfer *) xfer;

	t->done = true;
	n_in_flight--;
}

static Transfer *
new_transfer(NotifyChannel channel, const char *tenant_id, int64 id, int32 attempt)
{
	MemoryContext cxt = AllocSetContextCreate(notify_context, "qes_billing delivery",
											  ALLOCSET_SMALL_SIZES);
	Transfer   *t = MemoryContextAllocZero(cxt, sizeof(Transfer));

	t->context = cxt;
	t->channel = channel;
	t->tenant_id = MemoryContextStrdup(cxt, tenant_id);
	t->notification_id = id;
	t->attempt = attempt;
	if (!qes_http_transfer_init(&t->http, transfer_done))
	{
		MemoryContextDelete(cxt);
		elog(ERROR, "qes_billing worker: curl_easy_init failed");
	}
	curl_easy_setopt(t->http.easy, CURLOPT_TIMEOUT_MS, (long) qes_notify_timeout_ms);
	curl_easy_setopt(t->http.easy, CURLOPT_CONNECTTIMEOUT_MS, (long) Min(qes_notify_timeout_ms, 10000));
	if (qes_notify_ca_file && qes_notify_ca_file[0])
		curl_easy_setopt(t->http.easy, CURLOPT_CAINFO, qes_notify_ca_file);
	if (connections_stale)
	{
		/* none of the connections made under the old settings, and keep none */
		curl_easy_setopt(t->http.easy, CURLOPT_FRESH_CONNECT, 1L);
		curl_easy_setopt(t->http.easy, CURLOPT_FORBID_REUSE, 1L);
	}
	return t;
}

static void
setup_email(Transfer *t, const Channels *ch, const char *to, const char *message)
{
	MemoryContext old = MemoryContextSwitchTo(t->context);
	const char *password = qes_smtp_password();

	t->data = pstrdup(message);
	t->len = strlen(t->data);
	t->list = curl_slist_append(NULL, psprintf("<%s>", to));

	curl_easy_setopt(t->http.easy, CURLOPT_URL, qes_smtp_url);
	qes_http_set_protocols(t->http.easy, "smtp,smtps");
	curl_easy_setopt(t->http.easy, CURLOPT_MAIL_FROM, psprintf("<%s>", ch->mail_from));
	curl_easy_setopt(t->http.easy, CURLOPT_MAIL_RCPT, t->list);
	curl_easy_setopt(t->http.easy, CURLOPT_USE_SSL,
					 qes_smtp_starttls == QES_STARTTLS_REQUIRE ? (long) CURLUSESSL_ALL :
					 qes_smtp_starttls == QES_STARTTLS_TRY ? (long) CURLUSESSL_TRY : (long) CURLUSESSL_NONE);
	if (qes_smtp_username && qes_smtp_username[0])
	{
		/* libcurl keeps its own copies */
		curl_easy_setopt(t->http.easy, CURLOPT_USERNAME, qes_smtp_username);
		curl_easy_setopt(t->http.easy, CURLOPT_PASSWORD, password ? password : "");
	}
	curl_easy_setopt(t->http.easy, CURLOPT_READFUNCTION, read_cb);
	curl_easy_setopt(t->http.easy, CURLOPT_READDATA, t);
	curl_easy_setopt(t->http.easy, CURLOPT_UPLOAD, 1L);
	curl_easy_setopt(t->http.easy, CURLOPT_INFILESIZE_LARGE, (curl_off_t) t->len);
	MemoryContextSwitchTo(old);
}

static void
setup_webhook(Transfer *t, const char *event_id, const char *body)
{
	MemoryContext old = MemoryContextSwitchTo(t->context);
	const char *secret = qes_notify_webhook_secret();
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	char		hexmac[2 * EVP_MAX_MD_SIZE + 1];
	StringInfoData signed_payload;
	char	   *header;
	long		now = (long) time(NULL);

	t->data = pstrdup(body);
	t->len = strlen(t->data);

	/* Stripe's scheme: HMAC-SHA256 over "<t>.<body>", hex, as v1 */
	initStringInfo(&signed_payload);
	appendStringInfo(&signed_payload, "%ld.", now);
	appendBinaryStringInfo(&signed_payload, t->data, (int) t->len);
	if (secret == NULL ||
		HMAC(EVP_sha256(), secret, (int) strlen(secret), (unsigned char *) signed_payload.data,
			 signed_payload.len, mac, &maclen) == NULL)
		elog(ERROR, "qes_billing worker: could not sign a notification event");
	for (unsigned int i = 0; i < maclen; i++)
		snprintf(hexmac + 2 * i, 3, "%02x", mac[i]);
	pfree(signed_payload.data);

	header = psprintf("QES-Signature: t=%ld,v1=%s", now, hexmac);
	t->list = curl_slist_append(t->list, header);
	t->list = curl_slist_append(t->list, psprintf("QES-Event-Id: %s", event_id));
	t->list = curl_slist_append(t->list, "Content-Type: application/json; charset=utf-8");
	t->list = curl_slist_append(t->list, "Accept: application/json");
	t->list = curl_slist_append(t->list, "Expect:");

	curl_easy_setopt(t->http.easy, CURLOPT_URL, qes_notify_webhook_url);
	qes_http_set_protocols(t->http.easy, "http,https");
	curl_easy_setopt(t->http.easy, CURLOPT_HTTPHEADER, t->list);
	curl_easy_setopt(t->http.easy, CURLOPT_POST, 1L);
	curl_easy_setopt(t->http.easy, CURLOPT_POSTFIELDS, t->data);
	curl_easy_setopt(t->http.easy, CURLOPT_POSTFIELDSIZE, (long) t->len);
	curl_easy_setopt(t->http.easy, CURLOPT_WRITEFUNCTION, discard_cb);
	curl_easy_setopt(t->http.easy, CURLOPT_WRITEDATA, t);
	MemoryContextSwitchTo(old);
}

/* on the worker's curl loop (src/worker_http.c) */
static void
start_transfer(Transfer *t)
{
	t->next = transfers;
	transfers = t;
	n_in_flight++;
	/* (refused by curl: done at once, recorded as a failure, retried with backoff) */
	qes_http_start(&t->http);
}

static void
free_transfer(Transfer *t)
{
	if (!t->done)
	{
		qes_http_cancel(&t->http);
		n_in_flight--;
	}
	curl_easy_cleanup(t->http.easy);
	curl_slist_free_all(t->list);
	if (t->data)
		memset(t->data, 0, t->len);
	MemoryContextDelete(t->context);
}

/* ---- claim ------------------------------------------------------------------ */

typedef struct ClaimedRow
{
	char	   *tenant_id;
	int64		notification_id;
	int32		attempt;
	char	   *event_id;
	char	   *kind;
	char	   *email_to;
	char	   *subject;
	char	   *text_body;
	char	   *html_body;
	char	   *webhook_body;
} ClaimedRow;

static char *
getvalue_or_null(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;

	(void) SPI_getbinval(tup, desc, col, &isnull);
	return isnull ? NULL : SPI_getvalue(tup, desc, col);
}

/*
 * Claim up to `room` due notifications and start their transfers.  Returns
 * how many were claimed.
 */
static int
claim_and_send(int room, const Channels *ch)
{
	Oid			argtypes[4] = {INT4OID, BOOLOID, BOOLOID, TEXTOID};
	Datum		args[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	ClaimedRow *rows = NULL;
	int			n = 0;
	Oid			extoid;
	bool		reclaimed = false;
	double		due_s = -1;
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext caller = CurrentMemoryContext;	/* where the rows are copied to */

	/* until this succeeds: look again in a while (an error propagates) */
	claim_more = false;
	due_at = TimestampTzPlusMilliseconds(now, 5000);
	seen_wakes = pg_atomic_read_u64(&qes_worker_state->other_wakes);

	extoid = qes_worker_begin_xact("qes_billing worker: claiming notifications");
	if (!OidIsValid(extoid))
	{
		qes_worker_end_xact();
		due_at = 0;
		return 0;
	}
	if (extoid != reclaimed_for)
	{
		/* before our first claim in this incarnation of the extension */
		if (SPI_execute(/* result: - */ "SELECT billing.notify_reclaim()", false, 0) != SPI_OK_SELECT)
			elog(ERROR, "qes_billing worker: billing.notify_reclaim failed");
		reclaimed = true;
	}

	args[0] = Int32GetDatum(room);
	args[1] = BoolGetDatum(ch->email);
	args[2] = BoolGetDatum(ch->webhook);
	if (qes_notify_operator_email && qes_notify_operator_email[0])
		args[3] = CStringGetTextDatum(qes_notify_operator_email);
	else
		nulls[3] = 'n';
	if (SPI_execute_with_args(/* result: text, int8, int4, text, text, text, text, text, text, text */ "SELECT tenant_id, notification_id, attempt, event_id, kind, email_to,"
							  " subject, text_body, html_body, webhook_body"
							  "  FROM billing.notify_claim($1, $2, $3, $4)",
							  4, argtypes, args, nulls, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing worker: billing.notify_claim failed");
	n = (int) SPI_processed;
	if (n > 0)
	{
		MemoryContext old = MemoryContextSwitchTo(caller);
		SPITupleTable *tt = SPI_tuptable;

		rows = palloc(sizeof(ClaimedRow) * n);
		for (int i = 0; i < n; i++)
		{
			HeapTuple	tup = tt->vals[i];
			TupleDesc	desc = tt->tupdesc;
			bool		isnull;

			rows[i].tenant_id = SPI_getvalue(tup, desc, 1);
			rows[i].notification_id = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
			rows[i].attempt = DatumGetInt32(SPI_getbinval(tup, desc, 3, &isnull));
			rows[i].event_id = SPI_getvalue(tup, desc, 4);
			rows[i].kind = SPI_getvalue(tup, desc, 5);
			rows[i].email_to = getvalue_or_null(tup, desc, 6);
			rows[i].subject = getvalue_or_null(tup, desc, 7);
			rows[i].text_body = getvalue_or_null(tup, desc, 8);
			rows[i].html_body = getvalue_or_null(tup, desc, 9);
			rows[i].webhook_body = getvalue_or_null(tup, desc, 10);
		}
		MemoryContextSwitchTo(old);
	}
	if (SPI_execute(/* result: float8 */ "SELECT billing.notify_next_due()", false, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			due_s = DatumGetFloat8(d);
	}
	qes_worker_end_xact();		/* COMMIT: the rows are in_flight before a byte leaves */

	if (reclaimed)
		reclaimed_for = extoid;
	claim_more = (n >= room);
	if (due_s < 0)
		due_at = 0;
	else
	{
		/* rows locked by someone else are due but not claimable: not a busy loop */
		if (n < room && due_s < 0.1)
			due_s = 0.1;
		due_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
											 (int64) Min(ceil(due_s * 1000.0), (double) INT_MAX));
	}

	for (int i = 0; i < n; i++)
	{
		ClaimedRow *r = &rows[i];

		if (r->email_to && ch->email)
		{
			char	   *message = build_email(ch, r->email_to, r->event_id, r->kind,
											  r->subject ? r->subject : "", r->text_body ? r->text_body : "",
											  r->html_body ? r->html_body : "");
			Transfer   *t = new_transfer(CHANNEL_EMAIL, r->tenant_id, r->notification_id, r->attempt);

			t->extoid = extoid;

			setup_email(t, ch, r->email_to, message);
			start_transfer(t);
		}
		if (r->webhook_body && ch->webhook)
		{
			Transfer   *t = new_transfer(CHANNEL_WEBHOOK, r->tenant_id, r->notification_id, r->attempt);

			t->extoid = extoid;

			setup_webhook(t, r->event_id, r->webhook_body);
			start_transfer(t);
		}
	}
	return n;
}

/* ---- record ----------------------------------------------------------------- */

/* what went wrong, fit to be stored: never a secret */
static char *
transfer_error(Transfer *t, bool *permanent)
{
	char	   *msg;

	*permanent = false;
	if (t->channel == CHANNEL_EMAIL)
	{
		if (t->http.result == CURLE_OK)
			return NULL;
		msg = psprintf("%s: %s%s", curl_easy_strerror(t->http.result),
					   t->http.errbuf[0] ? t->http.errbuf : "no detail",
					   t->http.response_code > 0 ? psprintf(" (SMTP reply %ld)", t->http.response_code) : "");
		/*
		 * The server refused this message for good (5xx to MAIL, RCPT or
		 * DATA); but authentication wanted or refused (530, 534, 535, 538)
		 * is about our settings, not the message: retried, for the operator
		 * to fix.
		 */
		*permanent = t->http.response_code >= 500 && t->http.response_code <= 599 &&
			t->http.response_code != 530 && t->http.response_code != 534 && t->http.response_code != 535 && t->http.response_code != 538 &&
			(t->http.result == CURLE_SEND_ERROR || t->http.result == CURLE_WEIRD_SERVER_REPLY ||
			 t->http.result == CURLE_RECV_ERROR);
	}
	else
	{
		if (t->http.result == CURLE_OK && t->http.response_code >= 200 && t->http.response_code <= 299)
			return NULL;
		if (t->http.result == CURLE_OK)
			msg = psprintf("HTTP %ld from the platform", t->http.response_code);
		else if (t->received > QES_NOTIFY_MAX_RESPONSE && t->http.response_code >= 200 && t->http.response_code <= 299)
			return NULL;		/* answered 2xx; we stopped reading a long body */
		else
			msg = psprintf("%s: %s", curl_easy_strerror(t->http.result),
						   t->http.errbuf[0] ? t->http.errbuf : "no detail");
	}
	return qes_redact_secrets(msg);
}

/* one channel's outcome, by billing.notify_record (a step of qes_worker_subxact) */
static void
record_one_now(void *arg)
{
	Transfer   *t = (Transfer *) arg;
	Oid			argtypes[7] = {TEXTOID, INT8OID, INT4OID, TEXTOID, BOOLOID, BOOLOID, TEXTOID};
	Datum		args[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	bool		permanent;
	char	   *error = transfer_error(t, &permanent);

	args[0] = CStringGetTextDatum(t->tenant_id);
	args[1] = Int64GetDatum(t->notification_id);
	args[2] = Int32GetDatum(t->attempt);
	args[3] = CStringGetTextDatum(channel_names[t->channel]);
	args[4] = BoolGetDatum(error == NULL);
	args[5] = BoolGetDatum(permanent);
	args[6] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[6] = error ? ' ' : 'n';
	if (SPI_execute_with_args(/* result: - */ "SELECT billing.notify_record($1, $2, $3, $4, $5, $6, $7)",
							  7, argtypes, args, nulls, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing worker: billing.notify_record failed");
}

/* an attempt made before any fence: recorded whatever fence came since (fence.c) */
static void
record_one(void *arg)
{
	qes_fence_exempt_call(record_one_now, arg);
}

/* Record one outcome in a subtransaction; false (logged) when it could not be. */
static bool
record_in_subxact(Transfer *t)
{
	return qes_worker_subxact(record_one, t,
							  psprintf("record the delivery of notification " INT64_FORMAT,
									   t->notification_id));
}

static int
record_done(void)
{
	Transfer  **link;
	int			n = 0;
	bool		present;
	Oid			extoid;

	for (Transfer *t = transfers; t; t = t->next)
		if (t->done)
			n++;
	if (n == 0)
		return 0;

	extoid = qes_worker_begin_xact("qes_billing worker: recording notification deliveries");
	present = OidIsValid(extoid);
	n = 0;
	if (present)
	{
		for (Transfer *t = transfers; t; t = t->next)
		{
			if (!t->done)
				continue;
			if (t->extoid != extoid)
			{
				/* its row went with DROP EXTENSION: never record it on a new one */
				ereport(LOG,
						(errmsg("qes_billing worker: dropped the delivery result of notification " INT64_FORMAT " of a dropped incarnation of the extension",
								t->notification_id)));
				t->record_tries = -2;
				continue;
			}
			t->record_tries++;
			if (record_in_subxact(t))
			{
				t->record_tries = -1;	/* recorded */
				n++;
			}
		}
	}
	qes_worker_end_xact();

	/*
	 * Committed.  Forget what was recorded, what cannot be (the extension is
	 * gone) and what failed too often (its row is reclaimed as stale and
	 * sent again, with the same event id).
	 */
	link = &transfers;
	while (*link)
	{
		Transfer   *t = *link;

		if (t->done && (t->record_tries < 0 || !present || t->record_tries >= QES_NOTIFY_RECORD_TRIES))
		{
			*link = t->next;
			free_transfer(t);
		}
		else
			link = &t->next;
	}
	if (n > 0)
		claim_more = true;		/* what waited for room may go now */
	return n;
}

/* ---- the pump --------------------------------------------------------------- */

/*
 * libcurl keeps connections (an SMTP session, TLS after STARTTLS) for the
 * next transfer; one made under other settings (server, TLS, CA, user,
 * password) must not be reused.  When they changed, the worker's connections
 * are forgotten as soon as nothing is in flight (src/worker_http.c);
 * until then every delivery makes a connection of its own and keeps none.
 */
static void
forget_connections_if_settings_changed(void)
{
	StringInfoData s;
	const char *pw = qes_smtp_password();
	const char *secret = qes_notify_webhook_secret();
	uint64		h;

	initStringInfo(&s);
	appendStringInfo(&s, "%s|%d|%s|%s|%s|%s|%s", qes_smtp_url ? qes_smtp_url : "", qes_smtp_starttls,
					 qes_smtp_username ? qes_smtp_username : "", pw ? pw : "",
					 qes_notify_ca_file ? qes_notify_ca_file : "",
					 qes_notify_webhook_url ? qes_notify_webhook_url : "", secret ? secret : "");
	h = hash_bytes_extended((const unsigned char *) s.data, s.len, 0);
	memset(s.data, 0, s.len);
	pfree(s.data);
	if (h != settings_hash)
	{
		/* (the first settings: no connection was made under others) */
		connections_stale = settings_hash != 0;
		settings_hash = h;
	}
	if (connections_stale && qes_http_forget_connections())
		connections_stale = false;
}

/*
 * One turn of the notifications, without waiting: claim what is due and
 * fits (its transfers started on the worker's curl loop, src/worker_http.c),
 * record the deliveries that finished.  Runs no transaction when nothing was
 * queued since the last look (no wake-up) and nothing is due.  Lowers
 * *next_due_ms (-1: none) to when the next notification is due.
 * *progress: something was claimed or recorded, so another turn may find
 * more at once.  Returns true when deliveries are in flight or more may be
 * due, so the caller must not sleep.
 */
bool
qes_notify_pump(long *next_due_ms, bool *progress)
{
	Channels	ch;
	bool		enabled;
	int			claimed = 0;
	int			recorded = 0;
	TimestampTz now = GetCurrentTimestamp();

	*progress = false;
	channels_config(&ch);
	enabled = ch.email || ch.webhook;
	if (enabled && !was_enabled)
		claim_more = true;		/* a channel was just configured */
	was_enabled = enabled;
	if (!enabled && transfers == NULL)
		return false;
	notify_init();
	forget_connections_if_settings_changed();

	if (enabled &&
		(pg_atomic_read_u64(&qes_worker_state->other_wakes) != seen_wakes ||
		 (due_at != 0 && now >= due_at)))
		claim_more = true;
	if (enabled && claim_more && n_in_flight + 2 <= QES_NOTIFY_MAX_INFLIGHT)
		claimed = claim_and_send(Min(QES_NOTIFY_CLAIM_BATCH, (QES_NOTIFY_MAX_INFLIGHT - n_in_flight) / 2), &ch);
	if (transfers != NULL)
		recorded = record_done();
	*progress = claimed > 0 || recorded > 0;

	if (enabled && due_at != 0)
	{
		long		ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), due_at);

		if (*next_due_ms < 0 || ms < *next_due_ms)
			*next_due_ms = ms;
	}
	return n_in_flight > 0 || transfers != NULL || (enabled && claim_more);
}
