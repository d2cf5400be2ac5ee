/*-------------------------------------------------------------------------
 *
 * guard.c
 *	  Abuse protection in shared memory: counters of refused webhook
 *	  deliveries, and token buckets for inbound rate limiting.
 *
 * Refused webhooks.  A forged or broken delivery must cost almost nothing
 * and must not touch the audit chain, whose single head row every audited
 * operation locks: a flood of forged deliveries would otherwise serialize
 * every tenant's audited calls behind it and grow the append-only log
 * without bound.  So a refusal only adds one to an atomic counter per
 * reason (no write, no transaction id, no lock).  billing.flush_webhook_
 * rejections(), which the worker runs about once a minute when something
 * is pending, turns what was counted since the last flush into one row of
 * billing.webhook_rejections and one audit row per reason, with the number
 * of deliveries; the counts leave "pending" only when that commits.  A crash loses at most the last minute's counts, never an
 * event (a refused delivery stores nothing anyway).
 *
 * Rate limiting.  api.pre_request() is PostgREST's db-pre-request function:
 * it runs at the start of every request's transaction.  Token buckets,
 * refilled continuously, limit requests per client address (the last
 * X-Forwarded-For entry, set by the trusted proxy), per tenant (the JWT's
 * tenant_id) and per staff role (qes_admin, qes_app).  Stripe's webhook
 * deliveries are never limited by address: Stripe sends from few
 * addresses in bursts, and a refused delivery is retried for days.  Over
 * the limit the request fails with SQLSTATE PGRST and a detail that makes
 * PostgREST answer 429 with Retry-After.
 *
 * The buckets live in a fixed array of qes_billing.rate_limit_slots slots,
 * split into QES_GUARD_PARTITIONS regions.  A key hashes (with a random
 * seed chosen at start, so nobody can compute which keys collide) to a
 * region and a start slot and probes up to QES_GUARD_PROBES slots.  A slot
 * whose bucket has refilled completely holds no information and may be
 * taken over by another key, so the answer is the same as with unbounded
 * memory.  When every probed slot is busy, the one refilled longest ago is
 * taken over (erring towards letting a request through; counted as
 * "overflowed").  IPv6 clients are limited per /64, the block one host
 * usually has; IPv4 per address.
 *
 * LOCKING RULES
 *
 * - One LWLock per region ("qes_billing guard" tranche) protects the
 *   region's slots, EXCLUSIVE to take a token (it updates a bucket), SHARED
 *   to read them for statistics.  At most one is held at a time, for a few
 *   instructions: no I/O, allocation or ereport while held.
 * - The rejection and statistics counters are atomics and need no lock.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <arpa/inet.h>
#include <math.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "catalog_cache.h"
#include "guard.h"
#include "guc.h"
#include "postgrest.h"

#define QES_GUARD_PARTITIONS	16
#define QES_GUARD_PROBES		8
#define QES_GUARD_KEY_LEN		72
#define QES_GUARD_TRANCHE		"qes_billing guard"


typedef struct Bucket
{
	char		key[QES_GUARD_KEY_LEN]; /* "" when never used */
	double		tokens;
	TimestampTz refilled_at;
} Bucket;

typedef struct GuardShared
{
	pg_atomic_uint64 rejected[QES_REJECT_NREASONS];
	pg_atomic_uint64 flushed[QES_REJECT_NREASONS];
	pg_atomic_uint64 allowed;
	pg_atomic_uint64 limited;
	pg_atomic_uint64 overflowed;
	LWLockPadded *locks;
	int			per_region;
	uint64		seed;			/* random, for the bucket hash */
	Bucket		slots[FLEXIBLE_ARRAY_MEMBER];
} GuardShared;

static GuardShared *guard = NULL;

PG_FUNCTION_INFO_V1(qes_flush_webhook_rejections);
PG_FUNCTION_INFO_V1(qes_webhook_rejections_pending);
PG_FUNCTION_INFO_V1(qes_pre_request);
PG_FUNCTION_INFO_V1(qes_rate_limit_stats);

/* ---- reasons --------------------------------------------------------------- */

static const char *const reason_names[QES_REJECT_NREASONS] = {
	"no_header", "malformed", "no_v1", "mismatch", "stale", "no_secret",
	"not_an_event", "wrong_mode", "bad_type", "bad_created", "bad_encoding",
	"escaped_key"
};

static const char *const reason_messages[QES_REJECT_NREASONS] = {
	"missing Stripe-Signature header",
	"unparseable Stripe-Signature header",
	"no v1 signature in the Stripe-Signature header",
	"the signature does not match the payload",
	"the signature timestamp is outside the tolerance",
	"the webhook signing secret is not configured",
	"the payload is not a Stripe event",
	NULL,						/* wrong_mode: depends on the mode */
	"the event type is not a Stripe event type",
	"the event's created time is not plausible",
	"the payload contains \\u0000 or an unpaired surrogate, which cannot be stored as jsonb",
	"the event has an escaped top-level key, which Stripe never sends"
};

const char *
qes_reject_reason_name(QesRejectReason r)
{
	return reason_names[r];
}

const char *
qes_reject_reason_message(QesRejectReason r, bool live)
{
	if (r == QES_REJECT_WRONG_MODE)
		return live ? "a test-mode event was sent to a live-mode endpoint"
			: "a live-mode event was sent to a test-mode endpoint";
	return reason_messages[r];
}

/* ---- shared memory ------------------------------------------------------------ */

static Size
guard_size(void)
{
	return add_size(offsetof(GuardShared, slots),
					mul_size(sizeof(Bucket), (Size) qes_rate_limit_slots));
}

void
qes_guard_request(void)
{
	RequestAddinShmemSpace(guard_size());
	RequestNamedLWLockTranche(QES_GUARD_TRANCHE, QES_GUARD_PARTITIONS);
}

/* called with AddinShmemInitLock held */
void
qes_guard_startup(void)
{
	bool		found;

	guard = ShmemInitStruct("qes_billing guard", guard_size(), &found);
	if (!found)
	{
		memset(guard, 0, guard_size());
		for (int i = 0; i < QES_REJECT_NREASONS; i++)
		{
			pg_atomic_init_u64(&guard->rejected[i], 0);
			pg_atomic_init_u64(&guard->flushed[i], 0);
		}
		pg_atomic_init_u64(&guard->allowed, 0);
		pg_atomic_init_u64(&guard->limited, 0);
		pg_atomic_init_u64(&guard->overflowed, 0);
		guard->locks = GetNamedLWLockTranche(QES_GUARD_TRANCHE);
		guard->per_region = Max(qes_rate_limit_slots / QES_GUARD_PARTITIONS, 1);
		if (!pg_strong_random(&guard->seed, sizeof(guard->seed)))
			guard->seed = (uint64) GetCurrentTimestamp() ^ (uint64) MyProcPid;
	}
}

/* ---- refused webhooks ------------------------------------------------------- */

void
qes_guard_count_rejection(QesRejectReason r)
{
	if (guard != NULL)
		pg_atomic_fetch_add_u64(&guard->rejected[r], 1);
}

bool
qes_guard_rejections_pending(void)
{
	if (guard == NULL)
		return false;
	for (int i = 0; i < QES_REJECT_NREASONS; i++)
		if (pg_atomic_read_u64(&guard->rejected[i]) != pg_atomic_read_u64(&guard->flushed[i]))
			return true;
	return false;
}

typedef struct FlushArgs
{
	int			reason;
	int64		deliveries;
} FlushArgs;

static void
flush_cb(void *arg)
{
	FlushArgs  *a = (FlushArgs *) arg;
	Oid			types[2] = {TEXTOID, INT8OID};
	Datum		values[2];

	values[0] = CStringGetTextDatum(reason_names[a->reason]);
	values[1] = Int64GetDatum(a->deliveries);
	if (SPI_execute_with_args(/* result: none */ "INSERT INTO billing.webhook_rejections (reason, deliveries) VALUES ($1, $2)",
							  2, types, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "qes_billing: could not record webhook rejections");
	if (SPI_execute_with_args(/* result: - */ "SELECT billing.audit('webhook.rejected', NULL,"
							  " pg_catalog.jsonb_build_object('reason', $1, 'deliveries', $2))",
							  2, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing: could not audit webhook rejections");
}

/*
 * Flushes are serialized by a transaction-scoped advisory lock, and the
 * "flushed" marks move only when the flushing transaction commits (the
 * module's commit callback calls qes_guard_at_commit): an aborted flush
 * leaves the counts pending, and two flushes never write the same counts.
 */
#define QES_FLUSH_LOCK_KEY	INT64CONST(0x7165735f72656a65)	/* "qes_reje" */

static bool flush_at_commit = false;
static SubTransactionId flush_subid = InvalidSubTransactionId;
static uint64 flush_marks[QES_REJECT_NREASONS];

void
qes_guard_at_commit(void)
{
	if (flush_at_commit && guard != NULL)
		for (int i = 0; i < QES_REJECT_NREASONS; i++)
			pg_atomic_write_u64(&guard->flushed[i], flush_marks[i]);
	flush_at_commit = false;
}

void
qes_guard_at_abort(void)
{
	flush_at_commit = false;
}

/* a flush rolled back to a savepoint is undone: its counts stay pending */
void
qes_guard_at_subabort(SubTransactionId mysubid)
{
	if (flush_at_commit && flush_subid >= mysubid)
		flush_at_commit = false;
}

/* the marks move in this backend's commit callback: not from another one */
void
qes_guard_refuse_prepare(void)
{
	if (flush_at_commit)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot PREPARE a transaction that flushed webhook refusals")));
}

/*
 * billing.flush_webhook_rejections(): write what was counted since the last
 * flush, one row and one audit row per reason; returns the deliveries
 * written.
 */
Datum
qes_flush_webhook_rejections(PG_FUNCTION_ARGS)
{
	int64		total = 0;

	PreventCommandIfReadOnly("billing.flush_webhook_rejections()");
	(void) DirectFunctionCall1(pg_advisory_xact_lock_int8, Int64GetDatum(QES_FLUSH_LOCK_KEY));
	for (int i = 0; i < QES_REJECT_NREASONS; i++)
	{
		/* a flush earlier in this transaction counts as done */
		uint64		prev = flush_at_commit ? flush_marks[i] : pg_atomic_read_u64(&guard->flushed[i]);
		uint64		cur = pg_atomic_read_u64(&guard->rejected[i]);
		FlushArgs	a;

		flush_marks[i] = cur;
		if (cur == prev)
			continue;
		a.reason = i;
		a.deliveries = (int64) (cur - prev);
		qes_run_as_owner(flush_cb, &a);
		total += a.deliveries;
	}
	if (!flush_at_commit)
		flush_subid = GetCurrentSubTransactionId();
	flush_at_commit = true;
	PG_RETURN_INT64(total);
}

/* billing.webhook_rejections_pending(): counted, not yet flushed, by reason */
Datum
qes_webhook_rejections_pending(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < QES_REJECT_NREASONS; i++)
	{
		uint64		n = pg_atomic_read_u64(&guard->rejected[i]) - pg_atomic_read_u64(&guard->flushed[i]);
		Datum		values[2];
		bool		nulls[2] = {false, false};

		if (n == 0)
			continue;
		values[0] = CStringGetTextDatum(reason_names[i]);
		values[1] = Int64GetDatum((int64) n);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* ---- token buckets ------------------------------------------------------------ */

/*
 * Take one token from key's bucket (rate per second, burst of one second's
 * worth, at least 1).  Returns 0 when allowed, else the seconds to wait.
 */
static int
take_token(const char *key, int rate)
{
	/* seeded per cluster start: nobody can compute which keys collide */
	uint32		h = (uint32) hash_bytes_extended((const unsigned char *) key, strlen(key), guard->seed);
	int			region = h % QES_GUARD_PARTITIONS;
	int			per = guard->per_region;
	int			start = (h / QES_GUARD_PARTITIONS) % per;
	double		burst = Max((double) rate, 1.0);
	TimestampTz now = GetCurrentTimestamp();
	Bucket	   *b = NULL;
	Bucket	   *free_slot = NULL;
	Bucket	   *oldest = NULL;
	LWLock	   *lock = &guard->locks[region].lock;
	int			wait = 0;

	LWLockAcquire(lock, LW_EXCLUSIVE);
	for (int i = 0; i < Min(QES_GUARD_PROBES, per); i++)
	{
		Bucket	   *s = &guard->slots[region * per + (start + i) % per];

		if (strcmp(s->key, key) == 0)
		{
			b = s;
			break;
		}
		if (free_slot == NULL &&
			(s->key[0] == '\0' ||
			 s->tokens + (double) Max(now - s->refilled_at, 0) / USECS_PER_SEC * rate >= burst))
			free_slot = s;
		if (oldest == NULL || s->refilled_at < oldest->refilled_at)
			oldest = s;
	}
	/*
	 * Every slot of the window is busy: take over the one refilled longest
	 * ago (counted as overflow).  Its key starts again with a full bucket,
	 * which only ever errs towards letting a request through; with the seeded
	 * hash an attacker cannot aim at a victim's window.
	 */
	if (b == NULL && free_slot == NULL && oldest != NULL)
	{
		free_slot = oldest;
		pg_atomic_fetch_add_u64(&guard->overflowed, 1);
	}
	if (b == NULL && free_slot != NULL)
	{
		b = free_slot;
		strlcpy(b->key, key, QES_GUARD_KEY_LEN);
		b->tokens = burst;
		b->refilled_at = now;
	}
	/* a clock stepped back refills nothing (and takes nothing) */
	b->tokens = Min(burst, b->tokens + (double) Max(now - b->refilled_at, 0) / USECS_PER_SEC * rate);
	b->refilled_at = now;
	if (b->tokens >= 1.0)
		b->tokens -= 1.0;
	else
		wait = (int) ceil((1.0 - b->tokens) / rate);
	LWLockRelease(lock);
	return Max(wait, 0);
}

/* the client address: the last X-Forwarded-For entry, as the trusted proxy set it */
static char *
client_address(void)
{
	char	   *xff = qes_request_header("x-forwarded-for");
	char	   *last;
	char	   *end;

	if (xff == NULL)
		return pstrdup("unknown");
	last = strrchr(xff, ',');
	last = last ? last + 1 : xff;
	while (*last == ' ' || *last == '\t')
		last++;
	end = last + strlen(last);
	while (end > last && (end[-1] == ' ' || end[-1] == '\t'))
		*--end = '\0';
	if (*last == '\0' || strlen(last) > 45)
		return pstrdup("invalid");
	if (strchr(last, ':') != NULL)
	{
		unsigned char a6[16];
		char		out[INET6_ADDRSTRLEN + 4];

		/* IPv6: the /64 (a host usually has all of it) */
		if (inet_pton(AF_INET6, last, a6) != 1)
			return pstrdup("invalid");
		memset(a6 + 8, 0, 8);
		if (inet_ntop(AF_INET6, a6, out, sizeof(out)) == NULL)
			return pstrdup("invalid");
		strlcat(out, "/64", sizeof(out));
		return pstrdup(out);
	}
	return pstrdup(last);
}

static void
too_many(const char *what, int wait)
{
	pg_atomic_fetch_add_u64(&guard->limited, 1);
	ereport(ERROR,
			(errcode(MAKE_SQLSTATE('P', 'G', 'R', 'S', 'T')),
			 errmsg("{\"code\": \"QB429\", \"message\": \"too many requests %s\", \"hint\": \"Retry after %d s.\"}",
					what, wait),
			 errdetail("{\"status\": 429, \"headers\": {\"Retry-After\": \"%d\"}}", wait)));
}

/*
 * api.pre_request(): PostgREST's db-pre-request function.
 */
Datum
qes_pre_request(PG_FUNCTION_ARGS)
{
	const char *path = GetConfigOption("request.path", true, false);
	char	   *role = GetUserNameFromId(GetUserId(), true);
	char	   *tenant = qes_request_claim("tenant_id");
	bool		webhook = (path != NULL && strcmp(path, "/rpc/stripe_webhook") == 0);
	bool		staff = (role != NULL && (strcmp(role, "qes_admin") == 0 || strcmp(role, "qes_app") == 0));
	char		key[QES_GUARD_KEY_LEN];
	int			wait;

	if (staff)
	{
		if (qes_rate_limit_staff > 0)
		{
			snprintf(key, sizeof(key), "r:%s", role);
			if ((wait = take_token(key, qes_rate_limit_staff)) > 0)
				too_many("for this role", wait);
		}
	}
	else
	{
		if (tenant != NULL && tenant[0] != '\0' && qes_rate_limit_tenant > 0)
		{
			snprintf(key, sizeof(key), "t:%s", tenant);
			if ((wait = take_token(key, qes_rate_limit_tenant)) > 0)
				too_many("for this tenant", wait);
		}
		if (!webhook && qes_rate_limit_address > 0)
		{
			snprintf(key, sizeof(key), "a:%s", client_address());
			if ((wait = take_token(key, qes_rate_limit_address)) > 0)
				too_many("from this address", wait);
		}
	}
	pg_atomic_fetch_add_u64(&guard->allowed, 1);
	PG_RETURN_VOID();
}

/* billing.rate_limit_stats(): allowed, limited, overflowed, slots in use */
Datum
qes_rate_limit_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[5];
	bool		nulls[5] = {0};
	int64		used = 0;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	for (int r = 0; r < QES_GUARD_PARTITIONS; r++)
	{
		LWLockAcquire(&guard->locks[r].lock, LW_SHARED);
		for (int i = 0; i < guard->per_region; i++)
			if (guard->slots[r * guard->per_region + i].key[0] != '\0')
				used++;
		LWLockRelease(&guard->locks[r].lock);
	}
	values[0] = Int64GetDatum((int64) pg_atomic_read_u64(&guard->allowed));
	values[1] = Int64GetDatum((int64) pg_atomic_read_u64(&guard->limited));
	values[2] = Int64GetDatum((int64) pg_atomic_read_u64(&guard->overflowed));
	values[3] = Int64GetDatum(used);
	values[4] = Int32GetDatum(guard->per_region * QES_GUARD_PARTITIONS);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
