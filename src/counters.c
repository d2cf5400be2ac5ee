/*-------------------------------------------------------------------------
 *
 * counters.c
 *	  Shared-memory usage counters keyed by (tenant, metric, period).
 *
 * record_usage and check_limit read a tenant's period total from here
 * instead of summing usage history.  The table billing.usage_events stays
 * the source of truth: an entry is built from it on first use (after a
 * restart, or once evicted) and a committed record_usage adds its delta at
 * COMMIT (an xact callback), never before and never on abort.
 *
 * Building an entry races with transactions that commit meanwhile.  The
 * builder sums the table under an MVCC snapshot S of its own (own rows made
 * invisible) and keeps S's xmin, xmax and in-progress xids in the entry.  A
 * committing transaction X then adds its delta only if S did not see X's
 * rows, i.e. only if X was still in progress at S: X >= S.xmax, or X in
 * S.xip.  Deltas that commit while the sum is running are parked in the
 * entry and judged the same way when the build finishes.  When S had more
 * in-progress xids than an entry can keep, a commit that cannot be judged
 * drops the entry, which is rebuilt later.  No delta is lost or counted
 * twice.  The snapshot's xids are kept as 64-bit FullTransactionIds and
 * committers are judged by their FullTransactionId, so an entry that lives
 * for a whole yearly period compares right however many xids pass.
 *
 * Keys carry the database OID: the same tenant in two databases of one
 * cluster (a restore beside the original) are two counters.
 *
 * On a hot standby nothing is cached: the table changes by WAL replay, which
 * no commit callback sees, so every answer is summed from the replicated
 * table (exactly what it holds).  No entry is built during recovery, so
 * none survives a promotion.  Totals saturate at the int8 maximum instead
 * of wrapping (record_usage refuses a quantity that would pass it).
 *
 * The table is bounded by qes_billing.max_counters.  When it is full, the
 * least recently used sixteenth of the entries is evicted (each entry keeps
 * the start time of the last transaction that used it), so the busiest
 * tenants stay cached whatever order they arrive in.  Only one backend
 * evicts at a time; others that find the table full meanwhile compute their
 * total from the table (correct, slower, counted as "uncached").  An
 * evicted entry is simply rebuilt from the table when next used: a delta
 * that commits while it is absent is in the table by then.  Entries of
 * ended periods are also swept by the worker.
 *
 * LOCKING RULES
 *
 * - The hash table is partitioned; QES_COUNTER_PARTITIONS LWLocks of the
 *   tranche "qes_billing counters" protect it, partition chosen by the
 *   key's hash.  An entry is read or written only under its partition's
 *   lock: SHARED to read a ready entry, EXCLUSIVE to create, change or
 *   remove one.
 * - At most one partition lock is held at a time, except by the sweeper
 *   and the evictor, which take all of them in ascending order (and only
 *   one backend evicts at a time: the "evicting" flag).  The evictor's
 *   scratch array is allocated before it takes the locks.
 * - No lock is held across SPI, I/O, memory allocation or ereport(ERROR).
 *   The sum is computed with no lock held; the entry is marked "loading"
 *   meanwhile, and other backends compute their own total uncached rather
 *   than wait.
 * - nentries, the statistics and an entry's last_used are atomics and need
 *   no lock (last_used is written under the SHARED lock of a hit: a
 *   monotonic hint, never used for correctness).
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/transam.h"
#include "access/xlog.h"
#include "common/int.h"
#include "access/xact.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "catalog/pg_type.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "counters.h"
#include "guc.h"

#define QES_COUNTER_PARTITIONS	16
#define QES_SNAP_XIP			32
#define QES_PARKED				16
#define QES_COUNTER_TRANCHE		"qes_billing counters"

typedef struct ParkedDelta
{
	FullTransactionId xid;
	int64		value;
	TimestampTz at;
} ParkedDelta;

typedef struct CounterEntry
{
	CounterKey	key;			/* hash key: must be first */
	bool		loading;		/* being built; other readers go uncached */
	int			builder_pid;	/* who builds it, with ... */
	uint64		build_seq;		/* ... which build of theirs */
	bool		load_failed;	/* too many deltas parked: build again */
	bool		is_gauge;
	uint8		notified;		/* QES_NOTIFIED_* thresholds queued */
	pg_atomic_uint64 last_used; /* start of the last transaction using it */
	int64		value;			/* counter: period total; gauge: latest */
	TimestampTz gauge_at;		/* occurred_at of the gauge value */
	TimestampTz period_end;
	/* the build's snapshot, in 64-bit xids: never wraps however long it lives */
	FullTransactionId snap_xmin;
	FullTransactionId snap_xmax;
	int			snap_xcnt;		/* -1: more than QES_SNAP_XIP */
	FullTransactionId snap_xip[QES_SNAP_XIP];
	int			nparked;
	ParkedDelta parked[QES_PARKED];
} CounterEntry;

typedef struct CounterShared
{
	LWLockPadded *locks;		/* QES_COUNTER_PARTITIONS of them */
	pg_atomic_uint32 nentries;
	pg_atomic_uint64 hits;
	pg_atomic_uint64 loads;
	pg_atomic_uint64 uncached;
	pg_atomic_uint64 dropped;
	pg_atomic_uint64 swept;
	pg_atomic_uint64 evicted;
	pg_atomic_flag evicting;
} CounterShared;


static CounterShared *shared = NULL;
static HTAB *counters = NULL;

/* A delta (or threshold mark) of this backend's transaction, applied at commit. */
typedef struct PendingItem
{
	CounterKey	key;
	uint32		hash;
	bool		is_gauge;
	uint8		notify_bit;		/* nonzero: mark a threshold, no delta */
	int64		value;
	TimestampTz at;
	FullTransactionId xid;
	SubTransactionId subid;
} PendingItem;

static bool reset_at_commit = false;

static PendingItem *pending = NULL;
static int	npending = 0;
static int	maxpending = 0;

/*
 * The entry this backend is building, removed again if the build fails.
 * (pid, seq) identify the build: a reset may remove the entry meanwhile and
 * another backend start building the same key, whose entry is not ours.
 */
static bool building = false;
static CounterKey building_key;
static uint64 build_seq = 0;

static inline bool
is_our_build(CounterEntry *e)
{
	return e->loading && e->builder_pid == MyProcPid && e->build_seq == build_seq;
}

PG_FUNCTION_INFO_V1(qes_usage_cache_stats);
PG_FUNCTION_INFO_V1(qes_counter_seen_fn);
PG_FUNCTION_INFO_V1(qes_usage_cache_sweep);

/* ---- shared memory ------------------------------------------------------ */

static Size
counters_size(void)
{
	return add_size(MAXALIGN(sizeof(CounterShared)),
					hash_estimate_size(qes_max_counters, sizeof(CounterEntry)));
}

void
qes_counters_request(void)
{
	RequestAddinShmemSpace(counters_size());
	RequestNamedLWLockTranche(QES_COUNTER_TRANCHE, QES_COUNTER_PARTITIONS);
}

/* called with AddinShmemInitLock held */
void
qes_counters_startup(void)
{
	bool		found;
	HASHCTL		info;

	shared = ShmemInitStruct("qes_billing counters", sizeof(CounterShared), &found);
	if (!found)
	{
		shared->locks = GetNamedLWLockTranche(QES_COUNTER_TRANCHE);
		pg_atomic_init_u32(&shared->nentries, 0);
		pg_atomic_init_u64(&shared->hits, 0);
		pg_atomic_init_u64(&shared->loads, 0);
		pg_atomic_init_u64(&shared->uncached, 0);
		pg_atomic_init_u64(&shared->dropped, 0);
		pg_atomic_init_u64(&shared->swept, 0);
		pg_atomic_init_u64(&shared->evicted, 0);
		pg_atomic_init_flag(&shared->evicting);
	}
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(CounterKey);
	info.entrysize = sizeof(CounterEntry);
	info.num_partitions = QES_COUNTER_PARTITIONS;
	counters = ShmemInitHash("qes_billing counter hash", qes_max_counters, qes_max_counters,
							 &info, HASH_ELEM | HASH_BLOBS | HASH_PARTITION);
}

static inline LWLock *
partition_lock(uint32 hash)
{
	return &shared->locks[hash % QES_COUNTER_PARTITIONS].lock;
}

void
qes_counter_key(CounterKey *key, const char *tenant_id, const char *metric,
				TimestampTz period_start)
{
	memset(key, 0, sizeof(CounterKey));
	key->dbid = MyDatabaseId;
	strlcpy(key->tenant_id, tenant_id, QES_TENANT_ID_LEN);
	strlcpy(key->metric, metric, QES_METRIC_LEN);
	key->period_start = period_start;
}

/* ---- visibility of a committer to the builder's snapshot ---------------- */

static Seen
seen_by_build(CounterEntry *e, FullTransactionId xid)
{
	return qes_counter_seen(e->snap_xmin, e->snap_xmax, e->snap_xcnt, e->snap_xip, xid);
}

/*
 * Did a snapshot (xmin, xmax, in-progress xids; xcnt -1 when they were too
 * many to keep) see the rows of the committed transaction xid?  All in
 * 64-bit transaction ids, so the answer stays right for an entry that lives
 * through more than 2^31 transactions (a yearly period at 68 xid/s).
 */
Seen
qes_counter_seen(FullTransactionId xmin, FullTransactionId xmax, int xcnt,
				 const FullTransactionId *xip, FullTransactionId xid)
{
	if (FullTransactionIdPrecedes(xid, xmin))
		return SEEN;
	if (!FullTransactionIdPrecedes(xid, xmax))
		return NOT_SEEN;
	if (xcnt < 0)
		return UNKNOWN;
	for (int i = 0; i < xcnt; i++)
		if (FullTransactionIdEquals(xip[i], xid))
			return NOT_SEEN;
	return SEEN;
}

/*
 * The 64-bit form of a 32-bit xid of a current snapshot: one within 2^31
 * transactions of next (ReadNextFullTransactionId), as every xid a live
 * snapshot holds is.
 */
static FullTransactionId
widen_xid(FullTransactionId next, TransactionId xid)
{
	int32		diff = (int32) (xid - XidFromFullTransactionId(next));

	return FullTransactionIdFromU64((uint64) ((int64) U64FromFullTransactionId(next) + diff));
}

static void
apply_value(CounterEntry *e, int64 value, TimestampTz at)
{
	if (!e->is_gauge)
	{
		/* saturate: concurrent records can together pass the int8 range */
		if (pg_add_s64_overflow(e->value, value, &e->value))
			e->value = PG_INT64_MAX;
	}
	else if (at >= e->gauge_at)
	{
		e->value = value;
		e->gauge_at = at;
	}
}

static void
remove_entry(const CounterKey *key, uint32 hash)
{
	if (hash_search_with_hash_value(counters, key, hash, HASH_REMOVE, NULL) != NULL)
		pg_atomic_fetch_sub_u32(&shared->nentries, 1);
}

/* ---- building an entry from the table ----------------------------------- */

static SPIPlanPtr sum_plan = NULL;
static SPIPlanPtr gauge_plan = NULL;

typedef struct BuildResult
{
	int64		value;
	TimestampTz at;
} BuildResult;

typedef struct BuildArgs
{
	const CounterKey *key;
	bool		is_gauge;
	Snapshot	snap;
	BuildResult result;
} BuildArgs;

static void
compute_cb(void *arg)
{
	BuildArgs  *a = (BuildArgs *) arg;
	Oid			argtypes[3] = {TEXTOID, TEXTOID, TIMESTAMPTZOID};
	Datum		values[3];
	bool		isnull;

	if (sum_plan == NULL)
	{
		/* a sum past the int8 range saturates (record_usage refuses to pass it) */
		sum_plan = SPI_prepare(/* result: int8, timestamptz */ "SELECT LEAST(COALESCE(pg_catalog.sum(u.quantity), 0),"
							   " 9223372036854775807::pg_catalog.numeric)::pg_catalog.int8, NULL::pg_catalog.timestamptz"
							   "  FROM billing.usage_events u"
							   " WHERE u.tenant_id OPERATOR(pg_catalog.=) $1 AND u.metric OPERATOR(pg_catalog.=) $2"
							   "   AND u.period_start OPERATOR(pg_catalog.=) $3",
							   3, argtypes);
		gauge_plan = SPI_prepare(/* result: int8, timestamptz */ "SELECT u.quantity, u.occurred_at FROM billing.usage_events u"
								 " WHERE u.tenant_id OPERATOR(pg_catalog.=) $1 AND u.metric OPERATOR(pg_catalog.=) $2"
								 "   AND u.period_start OPERATOR(pg_catalog.=) $3"
								 " ORDER BY u.occurred_at DESC, u.recorded_at DESC LIMIT 1",
								 3, argtypes);
		if (sum_plan == NULL || gauge_plan == NULL)
			elog(ERROR, "qes_billing: could not prepare the usage queries");
		SPI_keepplan(sum_plan);
		SPI_keepplan(gauge_plan);
	}
	values[0] = CStringGetTextDatum(a->key->tenant_id);
	values[1] = CStringGetTextDatum(a->key->metric);
	values[2] = TimestampTzGetDatum(a->key->period_start);
	if (SPI_execute_snapshot(a->is_gauge ? gauge_plan : sum_plan, values, NULL, a->snap,
							 InvalidSnapshot, true, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing: could not read usage");
	if (SPI_processed == 1)
	{
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			a->result.value = DatumGetInt64(d);
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
		if (!isnull)
			a->result.at = DatumGetTimestampTz(d);
	}
}

/*
 * Sum (or, for a gauge, take the latest of) the committed usage rows for
 * key under snapshot snap, as the table owner.
 */
static BuildResult
compute_from_table(const CounterKey *key, bool is_gauge, Snapshot snap)
{
	BuildArgs	a = {key, is_gauge, snap, {0, DT_NOBEGIN}};

	qes_run_as_owner(compute_cb, &a);
	return a.result;
}

/* The newest committed state, without this transaction's own rows. */
static Snapshot
build_snapshot(void)
{
	Snapshot	snap = RegisterSnapshot(GetLatestSnapshot());

	snap->curcid = FirstCommandId;
	return snap;
}

/* Mark an entry used by this transaction (a hint for eviction). */
static inline void
touch(CounterEntry *e)
{
	uint64		now = (uint64) GetCurrentTransactionStartTimestamp();

	if (pg_atomic_read_u64(&e->last_used) < now)
		pg_atomic_write_u64(&e->last_used, now);
}

/* the k-th smallest of a[0..n-1] (0-based), reordering a */
static uint64
select_kth(uint64 *a, int n, int k)
{
	int			lo = 0,
				hi = n - 1;

	while (lo < hi)
	{
		uint64		pivot = a[(lo + hi) / 2];
		int			i = lo,
					j = hi;

		while (i <= j)
		{
			while (a[i] < pivot)
				i++;
			while (a[j] > pivot)
				j--;
			if (i <= j)
			{
				uint64		t = a[i];

				a[i] = a[j];
				a[j] = t;
				i++;
				j--;
			}
		}
		if (k <= j)
			hi = j;
		else if (k >= i)
			lo = i;
		else
			break;
	}
	return a[k];
}

/*
 * The table is full: evict the least recently used sixteenth of it.  Only
 * one backend at a time; the others go uncached meanwhile.
 */
static void
evict_some(void)
{
	static uint64 *scratch = NULL;
	HASH_SEQ_STATUS status;
	CounterEntry *e;
	int			n = 0;
	int			k;
	int			removed = 0;
	uint64		threshold;

	if (scratch == NULL)
		scratch = MemoryContextAlloc(TopMemoryContext, sizeof(uint64) * (qes_max_counters + 1));
	if (!pg_atomic_test_set_flag(&shared->evicting))
		return;
	for (int i = 0; i < QES_COUNTER_PARTITIONS; i++)
		LWLockAcquire(&shared->locks[i].lock, LW_EXCLUSIVE);
	hash_seq_init(&status, counters);
	while ((e = hash_seq_search(&status)) != NULL)
		if (!e->loading && n < qes_max_counters)
			scratch[n++] = pg_atomic_read_u64(&e->last_used);
	if (n > 0)
	{
		k = Max(n / 16, 1);
		threshold = select_kth(scratch, n, k - 1);
		hash_seq_init(&status, counters);
		while ((e = hash_seq_search(&status)) != NULL)
		{
			if (!e->loading && removed < k && pg_atomic_read_u64(&e->last_used) <= threshold)
			{
				hash_search(counters, &e->key, HASH_REMOVE, NULL);
				pg_atomic_fetch_sub_u32(&shared->nentries, 1);
				removed++;
			}
		}
	}
	for (int i = QES_COUNTER_PARTITIONS - 1; i >= 0; i--)
		LWLockRelease(&shared->locks[i].lock);
	pg_atomic_clear_flag(&shared->evicting);
	pg_atomic_fetch_add_u64(&shared->evicted, removed);
}

/*
 * The committed value of a counter: from shared memory, building the entry
 * from the table when it is missing.
 */
int64
qes_counter_get(const CounterKey *key, bool is_gauge, TimestampTz period_end, uint8 *notified)
{
	uint32		hash = get_hash_value(counters, key);
	LWLock	   *lock = partition_lock(hash);
	CounterEntry *e;
	bool		found;
	Snapshot	snap;
	BuildResult r;
	FullTransactionId own = GetTopFullTransactionIdIfAny();
	FullTransactionId next;
	int64		value;

	*notified = 0;

	/*
	 * A hot standby's table changes by WAL replay, which no commit callback
	 * sees: answer from the table itself, exactly what it holds now, and
	 * never build an entry that would outlive a promotion.
	 */
	if (RecoveryInProgress())
	{
		snap = build_snapshot();
		r = compute_from_table(key, is_gauge, snap);
		UnregisterSnapshot(snap);
		pg_atomic_fetch_add_u64(&shared->uncached, 1);
		return r.value;
	}

	LWLockAcquire(lock, LW_SHARED);
	e = hash_search_with_hash_value(counters, key, hash, HASH_FIND, NULL);
	if (e != NULL && !e->loading)
	{
		value = e->value;
		*notified = e->notified;
		touch(e);
		LWLockRelease(lock);
		pg_atomic_fetch_add_u64(&shared->hits, 1);
		return value;
	}
	LWLockRelease(lock);

	e = NULL;
	if (pg_atomic_read_u32(&shared->nentries) >= (uint32) qes_max_counters)
		evict_some();
	if (pg_atomic_read_u32(&shared->nentries) < (uint32) qes_max_counters)
	{
		LWLockAcquire(lock, LW_EXCLUSIVE);
		e = hash_search_with_hash_value(counters, key, hash, HASH_ENTER_NULL, &found);
		if (e != NULL && found)
		{
			if (!e->loading)
			{
				value = e->value;
				*notified = e->notified;
				touch(e);
				LWLockRelease(lock);
				pg_atomic_fetch_add_u64(&shared->hits, 1);
				return value;
			}
			e = NULL;			/* someone else builds it */
		}
		else if (e != NULL)
		{
			pg_atomic_fetch_add_u32(&shared->nentries, 1);
			e->loading = true;
			e->builder_pid = MyProcPid;
			e->build_seq = ++build_seq;
			e->load_failed = false;
			e->is_gauge = is_gauge;
			e->notified = 0;
			pg_atomic_init_u64(&e->last_used, (uint64) GetCurrentTransactionStartTimestamp());
			e->value = 0;
			e->gauge_at = DT_NOBEGIN;
			e->period_end = period_end;
			e->nparked = 0;
			e->snap_xcnt = 0;
		}
		LWLockRelease(lock);
	}

	snap = build_snapshot();
	if (e == NULL)
	{
		/* full, or being built by another backend: compute, do not cache */
		r = compute_from_table(key, is_gauge, snap);
		UnregisterSnapshot(snap);
		pg_atomic_fetch_add_u64(&shared->uncached, 1);
		return r.value;
	}

	building = true;
	building_key = *key;
	r = compute_from_table(key, is_gauge, snap);
	/* every xid of snap precedes this; read without a partition lock held */
	next = ReadNextFullTransactionId();

	LWLockAcquire(lock, LW_EXCLUSIVE);
	e = hash_search_with_hash_value(counters, key, hash, HASH_FIND, NULL);
	if (e == NULL || !is_our_build(e))
	{
		/* the cache was reset meanwhile: answer, do not cache */
		LWLockRelease(lock);
		building = false;
		UnregisterSnapshot(snap);
		pg_atomic_fetch_add_u64(&shared->uncached, 1);
		return r.value;
	}
	if (e->load_failed)
	{
		remove_entry(key, hash);
		LWLockRelease(lock);
		pg_atomic_fetch_add_u64(&shared->dropped, 1);
		building = false;
		UnregisterSnapshot(snap);
		return r.value;
	}
	e->value = r.value;
	e->gauge_at = r.at;
	e->snap_xmin = widen_xid(next, snap->xmin);
	e->snap_xmax = widen_xid(next, snap->xmax);
	if (snap->xcnt + (FullTransactionIdIsValid(own) ? 1 : 0) > QES_SNAP_XIP)
		e->snap_xcnt = -1;
	else
	{
		e->snap_xcnt = 0;
		for (uint32 i = 0; i < snap->xcnt; i++)
			e->snap_xip[e->snap_xcnt++] = widen_xid(next, snap->xip[i]);
		/* our own rows were hidden from the sum: our delta must be added */
		if (FullTransactionIdIsValid(own))
			e->snap_xip[e->snap_xcnt++] = own;
	}
	for (int i = 0; i < e->nparked; i++)
	{
		Seen		s = seen_by_build(e, e->parked[i].xid);

		if (s == UNKNOWN)
		{
			e->load_failed = true;
			break;
		}
		if (s == NOT_SEEN)
			apply_value(e, e->parked[i].value, e->parked[i].at);
	}
	e->nparked = 0;
	if (e->load_failed)
	{
		remove_entry(key, hash);
		pg_atomic_fetch_add_u64(&shared->dropped, 1);
		LWLockRelease(lock);
		building = false;
		UnregisterSnapshot(snap);
		return r.value;
	}
	e->loading = false;
	value = e->value;
	*notified = e->notified;
	LWLockRelease(lock);
	building = false;
	UnregisterSnapshot(snap);
	pg_atomic_fetch_add_u64(&shared->loads, 1);
	return value;
}

/* ---- this transaction's deltas ------------------------------------------ */

static PendingItem *
new_pending(const CounterKey *key)
{
	PendingItem *p;

	if (npending == maxpending)
	{
		int			newmax = maxpending ? maxpending * 2 : 16;

		if (pending == NULL)
			pending = MemoryContextAlloc(TopMemoryContext, sizeof(PendingItem) * newmax);
		else
			pending = repalloc(pending, sizeof(PendingItem) * newmax);
		maxpending = newmax;
	}
	p = &pending[npending++];
	memset(p, 0, sizeof(PendingItem));
	p->key = *key;
	p->hash = get_hash_value(counters, key);
	p->subid = GetCurrentSubTransactionId();
	p->xid = GetTopFullTransactionId();
	return p;
}

void
qes_counter_add_at_commit(const CounterKey *key, bool is_gauge, int64 value, TimestampTz at)
{
	PendingItem *p = new_pending(key);

	p->is_gauge = is_gauge;
	p->value = value;
	p->at = at;
}

void
qes_counter_notified_at_commit(const CounterKey *key, uint8 bit)
{
	new_pending(key)->notify_bit = bit;
}

/* This transaction's own uncommitted deltas for key (the latest, for a gauge). */
int64
qes_counter_own_pending(const CounterKey *key, bool is_gauge, bool *has_gauge)
{
	int64		sum = 0;
	TimestampTz at = DT_NOBEGIN;

	*has_gauge = false;
	for (int i = 0; i < npending; i++)
	{
		PendingItem *p = &pending[i];

		if (p->notify_bit || memcmp(&p->key, key, sizeof(CounterKey)) != 0)
			continue;
		if (!is_gauge)
			sum += p->value;
		else if (!*has_gauge || p->at >= at)
		{
			sum = p->value;
			at = p->at;
			*has_gauge = true;
		}
	}
	return sum;
}

/*
 * Forget every cached counter when this transaction commits: the usage
 * table was changed other than by record_usage, or the extension was
 * (re)created.
 */
void
qes_counters_reset_at_commit(void)
{
	reset_at_commit = true;
}

static void
reset_all(void)
{
	HASH_SEQ_STATUS status;
	CounterEntry *e;

	for (int i = 0; i < QES_COUNTER_PARTITIONS; i++)
		LWLockAcquire(&shared->locks[i].lock, LW_EXCLUSIVE);
	hash_seq_init(&status, counters);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		hash_search(counters, &e->key, HASH_REMOVE, NULL);
		pg_atomic_fetch_sub_u32(&shared->nentries, 1);
	}
	for (int i = QES_COUNTER_PARTITIONS - 1; i >= 0; i--)
		LWLockRelease(&shared->locks[i].lock);
}

/* XACT_EVENT_COMMIT: our rows are visible now; add their deltas. */
void
qes_counters_at_commit(void)
{
	if (reset_at_commit)
	{
		reset_at_commit = false;
		npending = 0;
		reset_all();
		return;
	}
	for (int i = 0; i < npending; i++)
	{
		PendingItem *p = &pending[i];
		LWLock	   *lock = partition_lock(p->hash);
		CounterEntry *e;

		LWLockAcquire(lock, LW_EXCLUSIVE);
		e = hash_search_with_hash_value(counters, &p->key, p->hash, HASH_FIND, NULL);
		if (e == NULL)
			;					/* not cached: the next build reads our rows */
		else if (p->notify_bit)
			e->notified |= p->notify_bit;
		else if (e->loading)
		{
			if (e->nparked < QES_PARKED)
			{
				e->parked[e->nparked].xid = p->xid;
				e->parked[e->nparked].value = p->value;
				e->parked[e->nparked].at = p->at;
				e->nparked++;
			}
			else
				e->load_failed = true;
		}
		else
		{
			Seen		s = seen_by_build(e, p->xid);

			if (s == NOT_SEEN)
				apply_value(e, p->value, p->at);
			else if (s == UNKNOWN)
			{
				remove_entry(&p->key, p->hash);
				pg_atomic_fetch_add_u64(&shared->dropped, 1);
			}
		}
		LWLockRelease(lock);
	}
	npending = 0;
}

static void
forget_build(void)
{
	if (building)
	{
		uint32		hash = get_hash_value(counters, &building_key);
		LWLock	   *lock = partition_lock(hash);
		CounterEntry *e;

		LWLockAcquire(lock, LW_EXCLUSIVE);
		e = hash_search_with_hash_value(counters, &building_key, hash, HASH_FIND, NULL);
		if (e != NULL && is_our_build(e))
			remove_entry(&building_key, hash);
		LWLockRelease(lock);
		building = false;
	}
}

/*
 * A prepared transaction commits in another backend, where our callback
 * never runs: its deltas would be lost.  Refuse it.
 */
void
qes_counters_refuse_prepare(void)
{
	if (npending > 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot PREPARE a transaction that recorded usage"),
				 errhint("Record usage in an ordinary transaction.")));
	/* the reset would happen at COMMIT PREPARED in another backend: never */
	if (reset_at_commit)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot PREPARE a transaction that changed billing.usage_events"),
				 errhint("Change usage rows in an ordinary transaction.")));
}

void
qes_counters_at_abort(void)
{
	reset_at_commit = false;
	npending = 0;
	forget_build();
}

void
qes_counters_at_subabort(SubTransactionId mysubid)
{
	int			keep = 0;

	/* drop the deltas of the aborted subtransaction and its children */
	for (int i = 0; i < npending; i++)
		if (pending[i].subid < mysubid)
			pending[keep++] = pending[i];
	npending = keep;
	forget_build();
}

void
qes_counters_at_subcommit(SubTransactionId mysubid, SubTransactionId parentsubid)
{
	for (int i = 0; i < npending; i++)
		if (pending[i].subid == mysubid)
			pending[i].subid = parentsubid;
}

/* ---- SQL: statistics and sweeping --------------------------------------- */

/* billing.usage_cache_stats() */
Datum
qes_usage_cache_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[10];
	bool		nulls[10] = {0};
	uint64		hits = pg_atomic_read_u64(&shared->hits);
	uint64		misses = pg_atomic_read_u64(&shared->loads) + pg_atomic_read_u64(&shared->uncached);

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	values[0] = Int32GetDatum(qes_max_counters);
	values[1] = Int32GetDatum((int32) pg_atomic_read_u32(&shared->nentries));
	values[2] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->hits));
	values[3] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->loads));
	values[4] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->uncached));
	values[5] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->dropped));
	values[6] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->swept));
	values[7] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->evicted));
	values[8] = Float8GetDatum(hits + misses > 0 ? (double) hits / (double) (hits + misses) : 0.0);
	nulls[8] = (hits + misses == 0);
	/* shared memory per counter: the entry and its share of the hash */
	values[9] = Int32GetDatum((int32) (hash_estimate_size(1000, sizeof(CounterEntry)) / 1000));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * billing.usage_cache_sweep(before timestamptz): drop entries whose period
 * ended before `before`.  Takes every partition lock, in order.
 */
Datum
qes_usage_cache_sweep(PG_FUNCTION_ARGS)
{
	TimestampTz before = PG_GETARG_TIMESTAMPTZ(0);
	HASH_SEQ_STATUS status;
	CounterEntry *e;
	int64		removed = 0;
	static TimestampTz last_sweep = 0;
	TimestampTz now = GetCurrentTimestamp();

	/* at most once a minute per process: it takes every partition lock */
	if (last_sweep != 0 && now - last_sweep < 60 * USECS_PER_SEC)
		PG_RETURN_INT64(0);
	last_sweep = now;

	for (int i = 0; i < QES_COUNTER_PARTITIONS; i++)
		LWLockAcquire(&shared->locks[i].lock, LW_EXCLUSIVE);
	hash_seq_init(&status, counters);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		if (!e->loading && e->period_end < before)
		{
			hash_search(counters, &e->key, HASH_REMOVE, NULL);
			pg_atomic_fetch_sub_u32(&shared->nentries, 1);
			removed++;
		}
	}
	for (int i = QES_COUNTER_PARTITIONS - 1; i >= 0; i--)
		LWLockRelease(&shared->locks[i].lock);
	pg_atomic_fetch_add_u64(&shared->swept, removed);
	PG_RETURN_INT64(removed);
}

/*
 * billing.counter_delta_seen(snap_xmin, snap_xmax, snap_xip, committer):
 * the rule above, for tests: 'seen', 'not_seen' or 'unknown' (snap_xip NULL
 * means the snapshot had more in-progress xids than an entry keeps).  All
 * arguments are 64-bit transaction ids (txid_current() values).
 */
Datum
qes_counter_seen_fn(PG_FUNCTION_ARGS)
{
	FullTransactionId xip[QES_SNAP_XIP];
	int			xcnt = -1;
	Seen		seen;
	static const char *const names[] = {"seen", "not_seen", "unknown"};

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(3))
		PG_RETURN_NULL();
	if (!PG_ARGISNULL(2))
	{
		ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(2);
		Datum	   *elems;
		bool	   *enulls;
		int			n;

		deconstruct_array(arr, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &elems, &enulls, &n);
		if (n > QES_SNAP_XIP)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("at most %d in-progress xids can be given", QES_SNAP_XIP)));
		for (int i = 0; i < n; i++)
		{
			if (enulls[i])
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("in-progress xids must not be null")));
			xip[i] = FullTransactionIdFromU64((uint64) DatumGetInt64(elems[i]));
		}
		xcnt = n;
	}
	seen = qes_counter_seen(FullTransactionIdFromU64((uint64) PG_GETARG_INT64(0)),
							FullTransactionIdFromU64((uint64) PG_GETARG_INT64(1)),
							xcnt, xip,
							FullTransactionIdFromU64((uint64) PG_GETARG_INT64(3)));
	PG_RETURN_TEXT_P(cstring_to_text(names[seen]));
}
