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
 * Wording
 *
 *	fingerprint	the 128-bit keyed SipHash of (database, tenant, metric,
 *				period start) that identifies a counter in shared memory
 *				(siphash.c): 16 bytes instead of the 112 the strings take.
 *				The SipHash key is drawn at server start.
 *	slot		one 48-byte place in a partition's open-addressing table:
 *				empty (fingerprint zero) or one counter.
 *	young		a counter whose build's snapshot is still needed, kept
 *				beside it in a YoungState (one of QES_YOUNG); a counter
 *				that no longer needs it is mature and costs its slot only.
 *	window		the span of a transaction that recorded usage from just
 *				before its commit record until its deltas are applied,
 *				published as the epoch it began in (windows[], by pgprocno).
 *
 * Building an entry races with transactions that commit meanwhile.  The
 * builder sums the table under an MVCC snapshot S of its own (own rows made
 * invisible).  A committing transaction X then adds its delta only if S did
 * not see X's rows, i.e. only if X was still in progress at S: X >= S.xmax,
 * or X in S.xip.  Deltas that commit while the sum is running are parked
 * beside the entry and judged the same way when the build finishes.  When S
 * had more in-progress xids than can be kept, a commit that cannot be
 * judged drops the entry, which is rebuilt later.  xids are 64-bit
 * FullTransactionIds, so judgements stay right however many xids pass.
 *
 * S is needed only while a transaction that S saw may still apply its
 * delta.  Such a transaction committed before S was taken, so it opened its
 * window before the builder advanced the epoch after S: once no window
 * opened at or before that epoch is still open, every later delta comes
 * from a transaction S did not see, S is forgotten, and the counter adds
 * every delta (mature).  Windows are read without locks; the store that
 * opens one precedes its commit, and the builder reads them after taking S
 * under ProcArrayLock, so a window S depends on is always seen.
 *
 * Keys carry the database OID: the same tenant in two databases of one
 * cluster (a restore beside the original) are two counters.
 *
 * On a hot standby the table changes by WAL replay, which no commit
 * callback sees: counters there follow the deltas the primary logs (see
 * "hot standbys" below), and those built during recovery are dropped at
 * their first use after a promotion.  Totals saturate at the int8 maximum
 * instead of wrapping (record_usage refuses a quantity that would pass it).
 *
 * Capacity is qes_billing.max_counters, split evenly over up to 128
 * partitions (at least 64 counters each).  A partition is an open-addressing
 * table with linear probing, at most three quarters full, where removal
 * shifts the following entries back (no tombstones).  When a partition is
 * full, a clock sweep over its slots evicts the first counter not used
 * since the hand last passed (each hit sets the counter's reference bit),
 * so counters in steady use stay whatever order others arrive in.  An
 * evicted counter is rebuilt from the table when next used: a delta that
 * commits while it is absent is in the table by then.  Entries of ended
 * periods are also swept by the worker.
 *
 * LOCKING RULES
 *
 * - Each partition has an LWLock of the tranche "qes_billing counters".
 *   Its slots, its live count's changes and its clock hand, and the
 *   YoungState of any of its counters, are read under that lock SHARED
 *   and changed under it EXCLUSIVE.  A hit sets the reference bit (an
 *   atomic) under the SHARED lock.
 * - A backend holds at most one partition lock at a time.  Eviction works
 *   inside the partition it inserts into; sweeping and resetting take the
 *   partitions one after another.  Nothing ever holds every partition lock.
 * - young_mutex (a spinlock) protects only the YoungState free list and
 *   each state's in_use/partition/fingerprint; it may be taken while a
 *   partition lock is held, never the other way round.
 * - No lock is held across SPI, I/O, memory allocation or ereport(ERROR).
 *   The sum is computed with no lock held; the entry is marked loading
 *   meanwhile, and other backends compute their own total uncached rather
 *   than wait.
 * - The epoch, windows[], live counts read for statistics and the
 *   statistics themselves are atomics and need no lock.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/transam.h"
#include "access/twophase.h"
#include "access/xlog.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "access/rmgr.h"
#include "access/xlog_internal.h"
#include "access/xloginsert.h"
#include "access/xlogutils.h"
#include "access/xlogreader.h"
#include "lib/stringinfo.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "counters.h"
#include "guc.h"
#include "siphash.h"

#define QES_MAX_PARTITIONS		128
#define QES_PARTITION_MIN		64	/* counters per partition, at least */
#define QES_YOUNG_MIN			128	/* YoungStates, at least; else 1 per 64 counters ... */
#define QES_YOUNG_MAX			PG_UINT16_MAX	/* ... up to what CounterEntry.young indexes */
#define QES_RING				4096	/* deltas replayed on a standby, kept for builds */
#define QES_SNAP_XIP			32
#define QES_PARKED				16
#define QES_COUNTER_TRANCHE		"qes_billing counters"

#define CE_LOADING				0x01
#define CE_GAUGE				0x02
#define CE_STANDBY				0x04	/* built during recovery: parked deltas fold in on read */

/* the custom WAL resource manager of the standby counters (docs/operations.md) */
#define QES_RMGR_ID				RM_EXPERIMENTAL_ID
#define XLOG_QES_USAGE_DELTA	0x10
#define XLOG_QES_COUNTERS_RESET	0x20

/*
 * One committing transaction's delta to one counter, logged just before its
 * commit record (wal_level replica or higher): a hot standby's counters add
 * it when the commit is replayed.  The transaction is the record's xid.
 */
typedef struct xl_qes_usage_delta
{
	Oid			dbid;
	bool		is_gauge;
	TimestampTz period_start;
	int64		value;
	TimestampTz at;
	/* followed by the metric and the tenant id, each with its NUL */
} xl_qes_usage_delta;

typedef struct CounterEntry
{
	uint64		fp[2];			/* fingerprint; both zero: an empty slot */
	int64		value;			/* counter: period total; gauge: latest */
	TimestampTz gauge_at;		/* occurred_at of the gauge value */
	TimestampTz period_end;
	uint16		young;			/* 1 + its YoungState's index; 0: mature */
	uint8		flags;			/* CE_* */
	uint8		notified;		/* QES_NOTIFIED_* thresholds queued */
	pg_atomic_uint32 referenced;	/* clock bit: used since the hand passed */
} CounterEntry;

StaticAssertDecl(sizeof(CounterEntry) <= 48, "a counter's slot must stay 48 bytes");

typedef struct ParkedDelta
{
	FullTransactionId xid;
	int64		value;
	TimestampTz at;
} ParkedDelta;

typedef struct YoungState
{
	/* under young_mutex */
	bool		in_use;
	int			next_free;
	int			part;
	uint64		fp[2];
	/* under the partition's lock */
	int			builder_pid;	/* who builds it, with ... */
	uint64		build_seq;		/* ... which build of theirs */
	bool		load_failed;	/* too many deltas parked: build again */
	uint64		epoch;			/* mature once no window opened at or before it is open */
	FullTransactionId snap_xmin;	/* the build's snapshot */
	FullTransactionId snap_xmax;
	int			snap_xcnt;		/* -1: more than QES_SNAP_XIP */
	FullTransactionId snap_xip[QES_SNAP_XIP];
	int			nparked;
	ParkedDelta parked[QES_PARKED];
} YoungState;

/* a delta replayed on a standby (the ring; under ring_lock) */
typedef struct RingDelta
{
	uint64		fp[2];
	FullTransactionId xid;
	int64		value;
	TimestampTz at;
} RingDelta;

typedef struct CounterPartition
{
	pg_atomic_uint32 nlive;		/* changed under the lock, read anywhere */
	uint32		hand;			/* clock hand, under the lock */
} CounterPartition;

typedef struct CounterShared
{
	int			nparts;
	uint32		part_limit;		/* counters a partition holds */
	uint32		part_slots;		/* its slots: a third more */
	int			nwindows;
	int			nyoung;
	uint64		sipkey[2];
	LWLockPadded *locks;		/* nparts of them, then the ring's */
	uint64		ring_next;		/* deltas ever put in the ring (under ring_lock) */
	FullTransactionId ring_lost;	/* newest xid whose delta left the ring unapplied */
	bool		ring_armed;		/* ring_lost covers what replay began without */
	uint64		fold_cursor;	/* the startup process's round over YoungStates */
	pg_atomic_uint64 epoch;
	slock_t		young_mutex;
	int			young_free;		/* head of the free list, -1: none */
	pg_atomic_uint64 hits;
	pg_atomic_uint64 loads;
	pg_atomic_uint64 uncached;
	pg_atomic_uint64 dropped;
	pg_atomic_uint64 swept;
	pg_atomic_uint64 evicted;
	CounterPartition parts[QES_MAX_PARTITIONS];
} CounterShared;


static CounterShared *shared = NULL;
static YoungState *young = NULL;	/* nyoung */
static RingDelta *ring = NULL;	/* QES_RING */
static pg_atomic_uint64 *windows = NULL;	/* nwindows, by pgprocno */
static CounterEntry *slots = NULL;	/* nparts * part_slots */

/* A delta (or threshold mark) of this backend's transaction, applied at commit. */
typedef struct PendingItem
{
	uint64		fp[2];
	char		tenant_id[QES_TENANT_ID_LEN];	/* for the standby's WAL record */
	char		metric[QES_METRIC_LEN];
	TimestampTz period_start;
	int			order;			/* position in the transaction, for sorting */
	bool		is_gauge;
	uint8		notify_bit;		/* nonzero: mark a threshold, no delta */
	int64		value;
	TimestampTz at;
	FullTransactionId xid;
	SubTransactionId subid;
} PendingItem;

static void apply_value(CounterEntry *e, int64 value, TimestampTz at);
static void reset_all(void);

static bool reset_at_commit = false;
static bool window_open = false;

static PendingItem *pending = NULL;
static int	npending = 0;
static int	maxpending = 0;

/*
 * The entry this backend is building, removed again if the build fails.
 * (young state, pid, seq) identify the build: a reset may remove the entry
 * meanwhile and another backend start building the same key.
 */
static bool building = false;
static uint64 building_fp[2];
static int	building_young = -1;
static uint64 build_seq = 0;

PG_FUNCTION_INFO_V1(qes_usage_cache_stats);
PG_FUNCTION_INFO_V1(qes_counter_seen_fn);
PG_FUNCTION_INFO_V1(qes_usage_cache_sweep);

/* ---- shared memory ------------------------------------------------------ */

/* How the counters' shared memory is laid out, from the settings. */
typedef struct CounterLayout
{
	int			nparts;			/* partitions */
	uint32		limit;			/* counters a partition holds */
	uint32		nslots;			/* its slots */
	int			nwindows;		/* commit windows, one per PGPROC */
	int			nyoung;			/* YoungStates */
} CounterLayout;

static CounterLayout
layout(void)
{
	CounterLayout l;

	l.nparts = Max(1, Min(QES_MAX_PARTITIONS, qes_max_counters / QES_PARTITION_MIN));
	l.limit = (uint32) ((qes_max_counters + l.nparts - 1) / l.nparts);
	l.nslots = l.limit + l.limit / 3 + 1;
	l.nwindows = MaxBackends + NUM_AUXILIARY_PROCS + max_prepared_xacts;
	l.nyoung = Min(QES_YOUNG_MAX, Max(QES_YOUNG_MIN, qes_max_counters / 64));
	return l;
}

static Size
counters_size(void)
{
	CounterLayout l = layout();
	Size		size;

	size = MAXALIGN(sizeof(CounterShared));
	size = add_size(size, MAXALIGN(mul_size(sizeof(YoungState), l.nyoung)));
	size = add_size(size, MAXALIGN(mul_size(sizeof(RingDelta), QES_RING)));
	size = add_size(size, MAXALIGN(mul_size(sizeof(pg_atomic_uint64), l.nwindows)));
	size = add_size(size, PG_CACHE_LINE_SIZE);
	size = add_size(size, mul_size(sizeof(CounterEntry), mul_size(l.nparts, l.nslots)));
	return size;
}

void
qes_counters_request(void)
{
	RequestAddinShmemSpace(counters_size());
	RequestNamedLWLockTranche(QES_COUNTER_TRANCHE, layout().nparts + 1);
}

/* called with AddinShmemInitLock held */
void
qes_counters_startup(void)
{
	bool		found;
	char	   *base;
	CounterLayout l = layout();
	int			nparts = l.nparts,
				nwindows = l.nwindows,
				nyoung = l.nyoung;
	uint32		limit = l.limit,
				nslots = l.nslots;
	base = ShmemInitStruct("qes_billing counters", counters_size(), &found);
	shared = (CounterShared *) base;
	base += MAXALIGN(sizeof(CounterShared));
	young = (YoungState *) base;
	base += MAXALIGN(mul_size(sizeof(YoungState), nyoung));
	ring = (RingDelta *) base;
	base += MAXALIGN(mul_size(sizeof(RingDelta), QES_RING));
	windows = (pg_atomic_uint64 *) base;
	base += MAXALIGN(mul_size(sizeof(pg_atomic_uint64), nwindows));
	slots = (CounterEntry *) TYPEALIGN(PG_CACHE_LINE_SIZE, base);
	if (found)
		return;

	memset(shared, 0, sizeof(CounterShared));
	shared->nparts = nparts;
	shared->part_limit = limit;
	shared->part_slots = nslots;
	shared->nwindows = nwindows;
	shared->nyoung = nyoung;
	shared->ring_next = 0;
	shared->ring_lost = InvalidFullTransactionId;
	shared->ring_armed = false;
	shared->fold_cursor = 0;
	if (!pg_strong_random(shared->sipkey, sizeof(shared->sipkey)))
		elog(FATAL, "qes_billing: could not draw the usage counters' hash key");
	shared->locks = GetNamedLWLockTranche(QES_COUNTER_TRANCHE);
	pg_atomic_init_u64(&shared->epoch, 1);
	SpinLockInit(&shared->young_mutex);
	pg_atomic_init_u64(&shared->hits, 0);
	pg_atomic_init_u64(&shared->loads, 0);
	pg_atomic_init_u64(&shared->uncached, 0);
	pg_atomic_init_u64(&shared->dropped, 0);
	pg_atomic_init_u64(&shared->swept, 0);
	pg_atomic_init_u64(&shared->evicted, 0);
	for (int i = 0; i < nparts; i++)
		pg_atomic_init_u32(&shared->parts[i].nlive, 0);
	memset(young, 0, sizeof(YoungState) * nyoung);
	for (int i = 0; i < nyoung; i++)
		young[i].next_free = i + 1 < nyoung ? i + 1 : -1;
	memset(ring, 0, sizeof(RingDelta) * QES_RING);
	shared->young_free = 0;
	for (int i = 0; i < nwindows; i++)
		pg_atomic_init_u64(&windows[i], 0);
	memset(slots, 0, sizeof(CounterEntry) * (Size) nparts * nslots);
	for (Size i = 0; i < (Size) nparts * nslots; i++)
		pg_atomic_init_u32(&slots[i].referenced, 0);
}

/* the fingerprint of (database, tenant, metric, period) under this server's key */
static void
fingerprint(Oid dbid, const char *tenant_id, const char *metric, TimestampTz period_start,
			uint64 fp[2])
{
	char		msg[sizeof(Oid) + sizeof(TimestampTz) + QES_METRIC_LEN + QES_TENANT_ID_LEN];
	size_t		len = 0;
	size_t		n;

	/* database, period, then both strings with their NULs: unambiguous */
	memcpy(msg, &dbid, sizeof(Oid));
	len += sizeof(Oid);
	memcpy(msg + len, &period_start, sizeof(TimestampTz));
	len += sizeof(TimestampTz);
	n = strnlen(metric, QES_METRIC_LEN - 1);
	memcpy(msg + len, metric, n);
	msg[len + n] = '\0';
	len += n + 1;
	n = strnlen(tenant_id, QES_TENANT_ID_LEN - 1);
	memcpy(msg + len, tenant_id, n);
	msg[len + n] = '\0';
	len += n + 1;
	qes_siphash128(shared->sipkey, msg, len, fp);
	if (fp[0] == 0 && fp[1] == 0)
		fp[1] = 1;				/* zero marks an empty slot */
}

void
qes_counter_key(CounterKey *key, const char *tenant_id, const char *metric,
				TimestampTz period_start)
{
	memset(key, 0, sizeof(CounterKey));
	strlcpy(key->tenant_id, tenant_id, QES_TENANT_ID_LEN);
	strlcpy(key->metric, metric, QES_METRIC_LEN);
	key->period_start = period_start;
	fingerprint(MyDatabaseId, key->tenant_id, key->metric, period_start, key->fp);
}

/* ---- a partition's open-addressing table (its lock held) ---------------- */

static inline int
partition_of(const uint64 fp[2])
{
	return (int) ((fp[0] >> 32) % (uint64) shared->nparts);
}

static inline LWLock *
partition_lock(int part)
{
	return &shared->locks[part].lock;
}

static inline CounterEntry *
partition_slots(int part)
{
	return slots + (Size) part * shared->part_slots;
}

static inline uint32
home_of(const uint64 fp[2])
{
	return (uint32) (fp[1] % shared->part_slots);
}

static inline bool
slot_empty(const CounterEntry *e)
{
	return e->fp[0] == 0 && e->fp[1] == 0;
}

/* the counter's slot, or NULL */
static CounterEntry *
find_entry(int part, const uint64 fp[2])
{
	CounterEntry *s = partition_slots(part);
	uint32		n = shared->part_slots;
	uint32		i = home_of(fp);

	for (uint32 probes = 0; probes < n; probes++)
	{
		CounterEntry *e = &s[i];

		if (slot_empty(e))
			return NULL;
		if (e->fp[0] == fp[0] && e->fp[1] == fp[1])
			return e;
		if (++i == n)
			i = 0;
	}
	return NULL;
}

/* a new counter's slot; the partition has room (nlive < part_limit) */
static CounterEntry *
insert_entry(int part, const uint64 fp[2])
{
	CounterEntry *s = partition_slots(part);
	uint32		n = shared->part_slots;
	uint32		i = home_of(fp);

	while (!slot_empty(&s[i]))
		if (++i == n)
			i = 0;
	s[i].fp[0] = fp[0];
	s[i].fp[1] = fp[1];
	pg_atomic_fetch_add_u32(&shared->parts[part].nlive, 1);
	return &s[i];
}

static void
young_release(int y)
{
	SpinLockAcquire(&shared->young_mutex);
	young[y].in_use = false;
	young[y].next_free = shared->young_free;
	shared->young_free = y;
	SpinLockRelease(&shared->young_mutex);
}

static int
young_take(int part, const uint64 fp[2])
{
	int			y;

	SpinLockAcquire(&shared->young_mutex);
	y = shared->young_free;
	if (y >= 0)
	{
		shared->young_free = young[y].next_free;
		young[y].in_use = true;
		young[y].part = part;
		young[y].fp[0] = fp[0];
		young[y].fp[1] = fp[1];
	}
	SpinLockRelease(&shared->young_mutex);
	return y;
}

static inline void
copy_entry(CounterEntry *to, CounterEntry *from)
{
	uint32		ref = pg_atomic_read_u32(&from->referenced);

	to->fp[0] = from->fp[0];
	to->fp[1] = from->fp[1];
	to->value = from->value;
	to->gauge_at = from->gauge_at;
	to->period_end = from->period_end;
	to->young = from->young;
	to->flags = from->flags;
	to->notified = from->notified;
	pg_atomic_write_u32(&to->referenced, ref);
}

static inline void
clear_entry(CounterEntry *e)
{
	e->fp[0] = 0;
	e->fp[1] = 0;
	e->value = 0;
	e->gauge_at = 0;
	e->period_end = 0;
	e->young = 0;
	e->flags = 0;
	e->notified = 0;
	pg_atomic_write_u32(&e->referenced, 0);
}

/*
 * Remove a counter, shifting the entries that follow it back so that every
 * probe sequence stays unbroken.  Entries may move: a caller re-finds any
 * slot it still needs.
 */
static void
remove_entry(int part, CounterEntry *e)
{
	CounterEntry *s = partition_slots(part);
	uint32		n = shared->part_slots;
	uint32		hole = (uint32) (e - s);
	uint32		j = hole;

	if (e->young)
		young_release(e->young - 1);
	for (;;)
	{
		uint32		h;

		if (++j == n)
			j = 0;
		if (slot_empty(&s[j]))
			break;
		h = home_of(s[j].fp);
		/* s[j] stays if its home lies cyclically in (hole, j] */
		if (hole <= j ? (hole < h && h <= j) : (hole < h || h <= j))
			continue;
		copy_entry(&s[hole], &s[j]);
		hole = j;
	}
	clear_entry(&s[hole]);
	pg_atomic_fetch_sub_u32(&shared->parts[part].nlive, 1);
}

/*
 * The partition is full: move its clock hand to the first counter not used
 * since the hand last passed and evict it.  Counters being built are
 * skipped.  false: every counter is being built (no room now).
 */
static bool
evict_one(int part)
{
	CounterEntry *s = partition_slots(part);
	CounterPartition *cp = &shared->parts[part];
	uint32		n = shared->part_slots;

	for (uint32 steps = 0; steps < 3 * n; steps++)
	{
		CounterEntry *e = &s[cp->hand];

		if (!slot_empty(e) && !(e->flags & CE_LOADING))
		{
			if (pg_atomic_read_u32(&e->referenced) == 0)
			{
				/* the hand stays: an entry shifted back into it is looked at next */
				remove_entry(part, e);
				pg_atomic_fetch_add_u64(&shared->evicted, 1);
				return true;
			}
			pg_atomic_write_u32(&e->referenced, 0);
		}
		if (++cp->hand == n)
			cp->hand = 0;
	}
	return false;
}

/* ---- young counters: the build's snapshot, kept until no longer needed -- */

/* The epoch of the oldest open window (PG_UINT64_MAX: none is open). */
static uint64
oldest_window(void)
{
	uint64		oldest = PG_UINT64_MAX;

	for (int i = 0; i < shared->nwindows; i++)
	{
		uint64		w = pg_atomic_read_u64(&windows[i]);

		if (w != 0 && w < oldest)
			oldest = w;
	}
	return oldest;
}

/* Is every window opened at or before epoch closed? */
static bool
grace_over(uint64 epoch)
{
	for (int i = 0; i < shared->nwindows; i++)
	{
		uint64		w = pg_atomic_read_u64(&windows[i]);

		if (w != 0 && w <= epoch)
			return false;
	}
	return true;
}

/* the partition's lock held EXCLUSIVE */
static void
try_mature(CounterEntry *e)
{
	if (e->young && !(e->flags & (CE_LOADING | CE_STANDBY)) && grace_over(young[e->young - 1].epoch))
	{
		young_release(e->young - 1);
		e->young = 0;
	}
}

/* Park a delta beside a counter; false when its YoungState is full. */
static bool
park(YoungState *ys, FullTransactionId xid, int64 value, TimestampTz at)
{
	if (ys->nparked >= QES_PARKED)
		return false;
	ys->parked[ys->nparked].xid = xid;
	ys->parked[ys->nparked].value = value;
	ys->parked[ys->nparked].at = at;
	ys->nparked++;
	return true;
}

/*
 * A standby counter's parked deltas: those of transactions whose commit has
 * been replayed are added, those of aborted ones dropped; those still in
 * progress stay (no snapshot sees them yet).  Every parked delta is of a
 * transaction the build's snapshot did not see.  A counter left with none
 * gives its YoungState back.  The partition's lock held EXCLUSIVE.
 */
static void
standby_fold(CounterEntry *e)
{
	YoungState *ys;

	if (e->young == 0)
		return;
	ys = &young[e->young - 1];

	/*
	 * From the end, each delta applied and removed together, so that an
	 * error in the status lookups (clog I/O) leaves no delta both added and
	 * still parked.
	 */
	for (int i = ys->nparked - 1; i >= 0; i--)
	{
		TransactionId xid = XidFromFullTransactionId(ys->parked[i].xid);
		bool		committed;

		if (TransactionIdIsInProgress(xid))
			continue;
		committed = TransactionIdDidCommit(xid);
		if (committed)
			apply_value(e, ys->parked[i].value, ys->parked[i].at);
		ys->parked[i] = ys->parked[ys->nparked - 1];
		ys->nparked--;
	}
	if (ys->nparked == 0 && !(e->flags & CE_LOADING))
	{
		young_release(e->young - 1);
		e->young = 0;
	}
}

/*
 * No YoungState is free: mature the counters that no longer need theirs.
 * Takes one partition lock at a time; holds none when called.
 */
static void
mature_all(void)
{
	uint64		cur = pg_atomic_read_u64(&shared->epoch);
	uint64		oldest;
	int			start = (int) (pg_atomic_fetch_add_u64(&shared->hits, 0) % (uint64) shared->nyoung);
	int			freed = 0;

	/*
	 * Counters finalized before cur was read: the windows they wait for were
	 * opened before that, so they show in this scan.
	 */
	pg_memory_barrier();
	oldest = oldest_window();

	/* from a varying start, until a few are free: bounded work per miss */
	for (int k = 0; k < shared->nyoung && freed < 16; k++)
	{
		int			y = (start + k) % shared->nyoung;
		bool		in_use;
		int			part;
		uint64		fp[2];
		CounterEntry *e;

		SpinLockAcquire(&shared->young_mutex);
		in_use = young[y].in_use;
		part = young[y].part;
		fp[0] = young[y].fp[0];
		fp[1] = young[y].fp[1];
		SpinLockRelease(&shared->young_mutex);
		if (!in_use)
			continue;
		LWLockAcquire(partition_lock(part), LW_EXCLUSIVE);
		e = find_entry(part, fp);
		if (e != NULL && e->young == y + 1 && !(e->flags & CE_LOADING))
		{
			if (!(e->flags & CE_STANDBY))
			{
				/* mature once no window opened at or before its epoch is open */
				if (young[y].epoch < cur && young[y].epoch < oldest)
				{
					young_release(y);
					e->young = 0;
				}
			}
			else if (RecoveryInProgress())
				standby_fold(e);
			else
				remove_entry(part, e);	/* left from before a promotion */
			if (e->young == 0 || find_entry(part, fp) == NULL)
				freed++;
		}
		LWLockRelease(partition_lock(part));
	}
}

/* ---- visibility of a committer to the builder's snapshot ---------------- */

static Seen
seen_by_build(YoungState *ys, FullTransactionId xid)
{
	return qes_counter_seen(ys->snap_xmin, ys->snap_xmax, ys->snap_xcnt, ys->snap_xip, xid);
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
	if (!(e->flags & CE_GAUGE))
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


/* Count a hit: set the counter's reference bit for the clock. */
static inline void
touch(CounterEntry *e)
{
	if (pg_atomic_read_u32(&e->referenced) == 0)
		pg_atomic_write_u32(&e->referenced, 1);
}

/* A cached answer: its value, marked used; the partition's lock released. */
static inline int64
hit(CounterEntry *e, LWLock *lock, uint8 *notified)
{
	int64		value = e->value;

	*notified = e->notified;
	touch(e);
	LWLockRelease(lock);
	pg_atomic_fetch_add_u64(&shared->hits, 1);
	return value;
}

static int64
uncached(const CounterKey *key, bool is_gauge, Snapshot snap)
{
	BuildResult r = compute_from_table(key, is_gauge, snap);

	UnregisterSnapshot(snap);
	pg_atomic_fetch_add_u64(&shared->uncached, 1);
	return r.value;
}

/* ---- building a counter (both kinds) ------------------------------------ */

/* A YoungState for a build, maturing counters to free one if need be. */
static int
take_young(int part, const uint64 fp[2])
{
	int			y = young_take(part, fp);

	if (y < 0)
	{
		mature_all();
		y = young_take(part, fp);
	}
	return y;
}

/* Room for one more counter in the partition (its lock held EXCLUSIVE). */
static bool
make_room(int part)
{
	return pg_atomic_read_u32(&shared->parts[part].nlive) < shared->part_limit || evict_one(part);
}

/*
 * Insert a loading counter with YoungState y, ours to build (the
 * partition's lock held EXCLUSIVE); forget_build removes it if we fail.
 */
static void
start_build(int part, const uint64 fp[2], int y, uint8 flags, TimestampTz period_end)
{
	CounterEntry *e = insert_entry(part, fp);
	YoungState *ys = &young[y];

	e->flags = CE_LOADING | flags;
	e->young = (uint16) (y + 1);
	e->value = 0;
	e->gauge_at = DT_NOBEGIN;
	e->period_end = period_end;
	e->notified = 0;
	pg_atomic_write_u32(&e->referenced, 1);
	ys->builder_pid = MyProcPid;
	ys->build_seq = ++build_seq;
	ys->load_failed = false;
	ys->epoch = 0;
	ys->nparked = 0;
	ys->snap_xcnt = 0;
	building = true;
	building_fp[0] = fp[0];
	building_fp[1] = fp[1];
	building_young = y;
}

/*
 * Being built by another backend, or no room: give the YoungState back,
 * release the partition's lock, and compute the total without caching it.
 */
static int64
no_build(LWLock *lock, int y, const CounterKey *key, bool is_gauge)
{
	LWLockRelease(lock);
	if (y >= 0)
		young_release(y);
	return uncached(key, is_gauge, build_snapshot());
}

/*
 * The build's counter was removed meanwhile (a reset): answer with what
 * was summed, without caching it.  The partition's lock is released.
 */
static int64
build_lost(LWLock *lock, Snapshot snap, int64 value)
{
	LWLockRelease(lock);
	building = false;
	UnregisterSnapshot(snap);
	pg_atomic_fetch_add_u64(&shared->uncached, 1);
	return value;
}

/*
 * The build cannot be cached (a delta it cannot judge): remove its counter,
 * release the partition's lock, answer with what was summed.
 */
static int64
build_dropped(int part, CounterEntry *e, LWLock *lock, int64 value)
{
	remove_entry(part, e);
	LWLockRelease(lock);
	pg_atomic_fetch_add_u64(&shared->dropped, 1);
	return value;
}

/* A build cached: its value; the partition's lock released. */
static int64
build_done(CounterEntry *e, LWLock *lock, uint8 *notified)
{
	int64		value = e->value;

	*notified = e->notified;
	LWLockRelease(lock);
	pg_atomic_fetch_add_u64(&shared->loads, 1);
	return value;
}

/*
 * Is e still the loading counter this backend's current build inserted
 * with YoungState y?  A reset may have removed it meanwhile and another
 * backend begun building the same key.
 */
static bool
is_our_build(CounterEntry *e, int y)
{
	return e != NULL && (e->flags & CE_LOADING) && e->young == y + 1 &&
		young[y].builder_pid == MyProcPid && young[y].build_seq == build_seq;
}

/* ---- hot standbys: counters that follow replay --------------------------- */

/*
 * On a hot standby the table changes by replay, where no commit callback
 * runs.  The primary logs each committing transaction's delta per counter
 * (log_deltas) just before its commit record.  Replaying it, the startup
 * process puts it in a ring of recent deltas and parks it beside the
 * counter, if cached; a reader adds a parked delta once its transaction's
 * commit has been replayed (standby_fold), so the answer is what a
 * snapshot taken at that moment sums from the table.
 *
 * A build sums the table under its snapshot S, taken under the ring's lock
 * together with a copy of the ring's deltas for its counter, so that no
 * delta is replayed in between.  A delta replayed after that is parked
 * beside the loading counter; one replayed before, of a transaction S saw
 * as in progress, is in the copy.  Both are kept only if S did not see the
 * transaction (XidInMVCCSnapshot).  The ring holds QES_RING deltas; one
 * overwritten while its transaction was still in progress is remembered
 * (ring_lost), and a build whose snapshot may have that transaction in
 * progress gives up (answers from the table, uncached).  So does a build
 * while a transaction that was running when the first build began is still
 * in progress: replay started at a checkpoint, and deltas logged before it
 * never reached the ring.
 */

/* the partition's lock held EXCLUSIVE; false: no room, the caller drops e */
static bool
park_standby(CounterEntry *e, int part, FullTransactionId xid, int64 value, TimestampTz at)
{
	YoungState *ys;

	if (e->young == 0)
	{
		int			y = young_take(part, e->fp);

		if (y < 0)
			return false;
		ys = &young[y];
		ys->builder_pid = 0;
		ys->build_seq = 0;
		ys->load_failed = false;
		ys->epoch = 0;
		ys->nparked = 0;
		ys->snap_xcnt = 0;
		e->young = (uint16) (y + 1);
	}
	ys = &young[e->young - 1];
	for (int i = 0; i < ys->nparked; i++)
		if (FullTransactionIdEquals(ys->parked[i].xid, xid))
			return true;		/* one delta per transaction and counter */
	if (ys->nparked >= QES_PARKED && !(e->flags & CE_LOADING))
		standby_fold(e);
	if (e->young == 0)
		return park_standby(e, part, xid, value, at);
	return park(ys, xid, value, at);
}

/* the startup process, replaying a delta */
static void
standby_receive(const uint64 fp[2], FullTransactionId xid, int64 value, TimestampTz at)
{
	LWLock	   *ring_lock = &shared->locks[shared->nparts].lock;
	RingDelta  *r;
	int			part = partition_of(fp);
	CounterEntry *e;

	/* the ring first: a build that begins after this finds it there */
	LWLockAcquire(ring_lock, LW_EXCLUSIVE);
	r = &ring[shared->ring_next % QES_RING];
	/* before the standby knows every running xid, assume it in progress */
	if (shared->ring_next >= QES_RING &&
		(standbyState < STANDBY_SNAPSHOT_READY ||
		 TransactionIdIsInProgress(XidFromFullTransactionId(r->xid))) &&
		(!FullTransactionIdIsValid(shared->ring_lost) ||
		 FullTransactionIdPrecedes(shared->ring_lost, r->xid)))
		shared->ring_lost = r->xid;

	r->fp[0] = fp[0];
	r->fp[1] = fp[1];
	r->xid = xid;
	r->value = value;
	r->at = at;
	shared->ring_next++;
	LWLockRelease(ring_lock);

	LWLockAcquire(partition_lock(part), LW_EXCLUSIVE);
	e = find_entry(part, fp);
	if (e != NULL && !park_standby(e, part, xid, value, at))
	{
		if (e->flags & CE_LOADING)
			young[e->young - 1].load_failed = true;
		else
		{
			remove_entry(part, e);
			pg_atomic_fetch_add_u64(&shared->dropped, 1);
		}
	}
	LWLockRelease(partition_lock(part));

	/* fold one other counter's deltas, so that YoungStates come back */
	{
		int			y = (int) (shared->fold_cursor++ % (uint64) shared->nyoung);
		bool		in_use;
		uint64		yfp[2];

		SpinLockAcquire(&shared->young_mutex);
		in_use = young[y].in_use;
		part = young[y].part;
		yfp[0] = young[y].fp[0];
		yfp[1] = young[y].fp[1];
		SpinLockRelease(&shared->young_mutex);
		if (in_use)
		{
			LWLockAcquire(partition_lock(part), LW_EXCLUSIVE);
			e = find_entry(part, yfp);
			if (e != NULL && e->young == y + 1 && (e->flags & CE_STANDBY) && !(e->flags & CE_LOADING))
				standby_fold(e);
			LWLockRelease(partition_lock(part));
		}
	}
}

/*
 * check_limit and record_usage's reads on a hot standby: the committed
 * total as of the replay position, from a counter that follows replay.
 */
static int64
standby_get(const CounterKey *key, bool is_gauge, TimestampTz period_end, uint8 *notified)
{
	int			part = partition_of(key->fp);
	LWLock	   *lock = partition_lock(part);
	LWLock	   *ring_lock = &shared->locks[shared->nparts].lock;
	CounterEntry *e;
	YoungState *ys;
	Snapshot	snap;
	BuildResult r;
	FullTransactionId next;
	FullTransactionId snap_xmin;
	RingDelta	from_ring[QES_PARKED];
	int			nfrom_ring = 0;
	bool		failed = false;
	int			y;

	LWLockAcquire(lock, LW_SHARED);
	e = find_entry(part, key->fp);
	if (e != NULL && !(e->flags & CE_LOADING) && e->young == 0)
	{
		return hit(e, lock, notified);
	}
	LWLockRelease(lock);

	y = take_young(part, key->fp);
	LWLockAcquire(lock, LW_EXCLUSIVE);
	e = find_entry(part, key->fp);
	if (e != NULL && !(e->flags & CE_LOADING))
	{
		/* cached, with deltas parked: add those whose commit was replayed */
		if (y >= 0)
			young_release(y);
		standby_fold(e);
		return hit(e, lock, notified);
	}
	if (e != NULL || y < 0 || !make_room(part))
		return no_build(lock, y, key, is_gauge);
	start_build(part, key->fp, y, CE_STANDBY | (is_gauge ? CE_GAUGE : 0), period_end);
	LWLockRelease(lock);

	/*
	 * The snapshot and the ring's deltas for this counter together, under
	 * the ring's lock, so that no delta is replayed in between: one replayed
	 * before, of a transaction the snapshot has in progress, is in the copy
	 * (or was lost while in progress: ring_lost); one replayed after is
	 * parked beside our loading entry.
	 */
	LWLockAcquire(ring_lock, LW_EXCLUSIVE);
	if (!shared->ring_armed)
	{
		/*
		 * Replay began at a checkpoint: deltas logged before it, of
		 * transactions that may still be in progress, never reached the
		 * ring.  Build nothing whose snapshot may have one in progress.
		 */
		FullTransactionId newest = FullTransactionIdFromU64(U64FromFullTransactionId(ReadNextFullTransactionId()) - 1);

		if (!FullTransactionIdIsValid(shared->ring_lost) ||
			FullTransactionIdPrecedes(shared->ring_lost, newest))
			shared->ring_lost = newest;
		shared->ring_armed = true;
	}
	snap = build_snapshot();
	next = ReadNextFullTransactionId();
	snap_xmin = widen_xid(next, snap->xmin);
	if (FullTransactionIdIsValid(shared->ring_lost) &&
		!FullTransactionIdPrecedes(shared->ring_lost, snap_xmin))
		failed = true;
	for (uint64 i = 0; !failed && i < Min(shared->ring_next, (uint64) QES_RING); i++)
	{
		RingDelta  *rd = &ring[i];

		if (rd->fp[0] != key->fp[0] || rd->fp[1] != key->fp[1] ||
			FullTransactionIdPrecedes(rd->xid, snap_xmin))
			continue;
		if (nfrom_ring >= QES_PARKED)
			failed = true;
		else
			from_ring[nfrom_ring++] = *rd;
	}
	LWLockRelease(ring_lock);
	qes_debug_counter_build_delay();
	r = compute_from_table(key, is_gauge, snap);

	LWLockAcquire(lock, LW_EXCLUSIVE);
	e = find_entry(part, key->fp);
	ys = &young[y];
	if (!is_our_build(e, y))
		return build_lost(lock, snap, r.value);
	e->value = r.value;
	e->gauge_at = r.at;
	/* deltas parked meanwhile: keep those of transactions snap did not see */
	{
		int			keep = 0;

		for (int i = 0; i < ys->nparked; i++)
			if (!FullTransactionIdPrecedes(ys->parked[i].xid, snap_xmin) &&
				XidInMVCCSnapshot(XidFromFullTransactionId(ys->parked[i].xid), snap))
				ys->parked[keep++] = ys->parked[i];
		ys->nparked = keep;
	}
	/* and those from the ring, of transactions still in progress to snap */
	for (int i = 0; !failed && i < nfrom_ring; i++)
	{
		RingDelta  *rd = &from_ring[i];
		bool		parked = false;

		if (!XidInMVCCSnapshot(XidFromFullTransactionId(rd->xid), snap))
			continue;
		for (int j = 0; j < ys->nparked && !parked; j++)
			parked = FullTransactionIdEquals(ys->parked[j].xid, rd->xid);
		if (!parked && !park(ys, rd->xid, rd->value, rd->at))
			failed = true;
	}
	building = false;
	UnregisterSnapshot(snap);
	if (failed || ys->load_failed)
		return build_dropped(part, e, lock, r.value);
	e->flags &= ~CE_LOADING;
	/* commits replayed since snap was taken */
	standby_fold(e);
	return build_done(e, lock, notified);
}

/* ---- the custom WAL resource manager ------------------------------------- */

static bool
parse_delta(XLogReaderState *record, xl_qes_usage_delta *rec, const char **metric,
			const char **tenant_id)
{
	char	   *data = XLogRecGetData(record);
	Size		len = XLogRecGetDataLen(record);
	Size		mlen,
				tlen;

	if (len < sizeof(xl_qes_usage_delta) + 2)
		return false;
	memcpy(rec, data, sizeof(xl_qes_usage_delta));
	*metric = data + sizeof(xl_qes_usage_delta);
	mlen = strnlen(*metric, len - sizeof(xl_qes_usage_delta));
	if (sizeof(xl_qes_usage_delta) + mlen + 1 >= len)
		return false;
	*tenant_id = *metric + mlen + 1;
	tlen = strnlen(*tenant_id, len - sizeof(xl_qes_usage_delta) - mlen - 1);
	return sizeof(xl_qes_usage_delta) + mlen + 1 + tlen + 1 == len;
}

static void
qes_rmgr_redo(XLogReaderState *record)
{
	uint8		info = XLogRecGetInfo(record) & ~XLR_INFO_MASK;
	TransactionId xid = XLogRecGetXid(record);
	xl_qes_usage_delta rec;
	const char *metric;
	const char *tenant_id;
	uint64		fp[2];

	if (info == XLOG_QES_COUNTERS_RESET)
	{
		LWLock	   *ring_lock = &shared->locks[shared->nparts].lock;

		if (!TransactionIdIsValid(xid) || standbyState == STANDBY_DISABLED)
			return;

		/*
		 * Forget every counter, and build none whose snapshot may have this
		 * transaction in progress (as for a delta lost from the ring): a
		 * counter built before its commit is replayed would miss its change.
		 */
		LWLockAcquire(ring_lock, LW_EXCLUSIVE);
		{
			FullTransactionId fxid = widen_xid(ReadNextFullTransactionId(), xid);

			if (!FullTransactionIdIsValid(shared->ring_lost) ||
				FullTransactionIdPrecedes(shared->ring_lost, fxid))
				shared->ring_lost = fxid;
		}
		LWLockRelease(ring_lock);
		reset_all();
		return;
	}
	if (info != XLOG_QES_USAGE_DELTA)
		elog(PANIC, "qes_billing redo: unknown op code %u", info);
	if (!parse_delta(record, &rec, &metric, &tenant_id))
		elog(PANIC, "qes_billing redo: malformed usage delta record");
	/* crash recovery or archive recovery without readers: nothing is cached */
	if (!TransactionIdIsValid(xid) || standbyState == STANDBY_DISABLED)
		return;
	fingerprint(rec.dbid, tenant_id, metric, rec.period_start, fp);
	standby_receive(fp, widen_xid(ReadNextFullTransactionId(), xid), rec.value, rec.at);
}

static void
qes_rmgr_desc(StringInfo buf, XLogReaderState *record)
{
	xl_qes_usage_delta rec;
	const char *metric;
	const char *tenant_id;

	if ((XLogRecGetInfo(record) & ~XLR_INFO_MASK) == XLOG_QES_COUNTERS_RESET)
		appendStringInfoString(buf, "every counter");
	else if ((XLogRecGetInfo(record) & ~XLR_INFO_MASK) == XLOG_QES_USAGE_DELTA &&
			 parse_delta(record, &rec, &metric, &tenant_id))
		appendStringInfo(buf, "db %u tenant %s metric %s %s " INT64_FORMAT,
						 rec.dbid, tenant_id, metric, rec.is_gauge ? "gauge" : "delta", rec.value);
}

static const char *
qes_rmgr_identify(uint8 info)
{
	switch (info & ~XLR_INFO_MASK)
	{
		case XLOG_QES_USAGE_DELTA:
			return "USAGE_DELTA";
		case XLOG_QES_COUNTERS_RESET:
			return "COUNTERS_RESET";
	}
	return NULL;
}

static RmgrData qes_rmgr = {
	.rm_name = "qes_billing",
	.rm_redo = qes_rmgr_redo,
	.rm_desc = qes_rmgr_desc,
	.rm_identify = qes_rmgr_identify,
};

/* _PG_init, while shared_preload_libraries load */
void
qes_counters_register_rmgr(void)
{
	RegisterCustomRmgr(QES_RMGR_ID, &qes_rmgr);
}

/*
 * The committed value of a counter: from shared memory, building the entry
 * from the table when it is missing.
 */
int64
qes_counter_get(const CounterKey *key, bool is_gauge, TimestampTz period_end, uint8 *notified)
{
	int			part = partition_of(key->fp);
	LWLock	   *lock = partition_lock(part);
	CounterEntry *e;
	YoungState *ys;
	Snapshot	snap;
	BuildResult r;
	FullTransactionId own = GetTopFullTransactionIdIfAny();
	FullTransactionId next;
	uint64		epoch;
	int			y;

	*notified = 0;

	/* a hot standby's counters follow replay (standby_get) */
	if (RecoveryInProgress())
		return standby_get(key, is_gauge, period_end, notified);

	LWLockAcquire(lock, LW_SHARED);
	e = find_entry(part, key->fp);
	if (e != NULL && !(e->flags & (CE_LOADING | CE_STANDBY)))
	{
		return hit(e, lock, notified);
	}
	LWLockRelease(lock);

	/* a build keeps its snapshot beside the counter until no longer needed */
	y = take_young(part, key->fp);

	LWLockAcquire(lock, LW_EXCLUSIVE);
	e = find_entry(part, key->fp);
	if (e != NULL && (e->flags & CE_STANDBY) && !(e->flags & CE_LOADING))
	{
		/* built before a promotion: commits since then were not added */
		remove_entry(part, e);
		e = NULL;
	}
	if (e != NULL && !(e->flags & CE_LOADING))
	{
		if (y >= 0)
			young_release(y);
		return hit(e, lock, notified);
	}
	if (e != NULL || y < 0 || !make_room(part))
		return no_build(lock, y, key, is_gauge);
	start_build(part, key->fp, y, is_gauge ? CE_GAUGE : 0, period_end);
	LWLockRelease(lock);
	snap = build_snapshot();
	r = compute_from_table(key, is_gauge, snap);
	/* every xid of snap precedes this; read without a partition lock held */
	next = ReadNextFullTransactionId();
	/* windows opened from now on belong to transactions snap did not see */
	epoch = pg_atomic_fetch_add_u64(&shared->epoch, 1);

	LWLockAcquire(lock, LW_EXCLUSIVE);
	e = find_entry(part, key->fp);
	ys = &young[y];
	if (!is_our_build(e, y))
		return build_lost(lock, snap, r.value);
	e->value = r.value;
	e->gauge_at = r.at;
	ys->epoch = epoch;
	ys->snap_xmin = widen_xid(next, snap->xmin);
	ys->snap_xmax = widen_xid(next, snap->xmax);
	if (snap->xcnt + (FullTransactionIdIsValid(own) ? 1 : 0) > QES_SNAP_XIP)
		ys->snap_xcnt = -1;
	else
	{
		ys->snap_xcnt = 0;
		for (uint32 i = 0; i < snap->xcnt; i++)
			ys->snap_xip[ys->snap_xcnt++] = widen_xid(next, snap->xip[i]);
		/* our own rows were hidden from the sum: our delta must be added */
		if (FullTransactionIdIsValid(own))
			ys->snap_xip[ys->snap_xcnt++] = own;
	}
	for (int i = 0; i < ys->nparked && !ys->load_failed; i++)
	{
		Seen		s = seen_by_build(ys, ys->parked[i].xid);

		if (s == UNKNOWN)
			ys->load_failed = true;
		else if (s == NOT_SEEN)
			apply_value(e, ys->parked[i].value, ys->parked[i].at);
	}
	ys->nparked = 0;
	building = false;
	UnregisterSnapshot(snap);
	if (ys->load_failed)
		return build_dropped(part, e, lock, r.value);
	e->flags &= ~CE_LOADING;
	try_mature(e);
	return build_done(e, lock, notified);
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
	p->fp[0] = key->fp[0];
	p->fp[1] = key->fp[1];
	memcpy(p->tenant_id, key->tenant_id, QES_TENANT_ID_LEN);
	memcpy(p->metric, key->metric, QES_METRIC_LEN);
	p->period_start = key->period_start;
	p->order = npending - 1;
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

		if (p->notify_bit || p->fp[0] != key->fp[0] || p->fp[1] != key->fp[1])
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

/*
 * One partition after another.  A build that began before our commit holds
 * a loading entry, which goes too: its builder then answers uncached.  A
 * counter built after a partition was emptied read the table after our
 * commit.
 */
static void
reset_all(void)
{
	for (int part = 0; part < shared->nparts; part++)
	{
		CounterEntry *s = partition_slots(part);

		LWLockAcquire(partition_lock(part), LW_EXCLUSIVE);
		for (uint32 i = 0; i < shared->part_slots; i++)
		{
			if (slot_empty(&s[i]))
				continue;
			if (s[i].young)
				young_release(s[i].young - 1);
			clear_entry(&s[i]);
		}
		pg_atomic_write_u32(&shared->parts[part].nlive, 0);
		shared->parts[part].hand = 0;
		LWLockRelease(partition_lock(part));
	}
}

/*
 * XACT_EVENT_PRE_COMMIT: open this transaction's window before its commit
 * record, so that a build whose snapshot sees our rows keeps that snapshot
 * until our deltas are applied.
 */
static int
pending_cmp(const void *a, const void *b)
{
	const PendingItem *x = *(PendingItem *const *) a;
	const PendingItem *y = *(PendingItem *const *) b;

	if (x->fp[0] != y->fp[0])
		return x->fp[0] < y->fp[0] ? -1 : 1;
	if (x->fp[1] != y->fp[1])
		return x->fp[1] < y->fp[1] ? -1 : 1;
	return x->order - y->order;
}

/*
 * Log this transaction's delta to each counter, one record per counter, for
 * hot standbys (wal_level replica or higher): they add it when our commit
 * record is replayed.
 */
static void
log_deltas(void)
{
	PendingItem *few[8];
	PendingItem **sorted;
	int			n = 0;

	if (!XLogStandbyInfoActive())
		return;
	if (reset_at_commit)
	{
		/* the table changed other than by record_usage: standbys start over */
		Oid			dbid = MyDatabaseId;

		XLogBeginInsert();
		XLogRegisterData((char *) &dbid, sizeof(dbid));
		(void) XLogInsert(QES_RMGR_ID, XLOG_QES_COUNTERS_RESET);
		return;
	}
	if (npending == 0)
		return;
	/* record_usage's usual commit has one delta: no allocation, no sort */
	sorted = npending <= lengthof(few) ? few : palloc(sizeof(PendingItem *) * npending);
	for (int i = 0; i < npending; i++)
		if (!pending[i].notify_bit)
			sorted[n++] = &pending[i];
	if (n > 1)
		qsort(sorted, n, sizeof(PendingItem *), pending_cmp);
	for (int i = 0; i < n;)
	{
		PendingItem *first = sorted[i];
		xl_qes_usage_delta rec;

		memset(&rec, 0, sizeof(rec));
		rec.dbid = MyDatabaseId;
		rec.is_gauge = first->is_gauge;
		rec.period_start = first->period_start;
		rec.at = DT_NOBEGIN;
		for (; i < n && sorted[i]->fp[0] == first->fp[0] && sorted[i]->fp[1] == first->fp[1]; i++)
		{
			if (!rec.is_gauge)
			{
				if (pg_add_s64_overflow(rec.value, sorted[i]->value, &rec.value))
					rec.value = PG_INT64_MAX;
			}
			else if (sorted[i]->at >= rec.at)
			{
				rec.value = sorted[i]->value;
				rec.at = sorted[i]->at;
			}
		}
		XLogBeginInsert();
		XLogRegisterData((char *) &rec, sizeof(rec));
		XLogRegisterData(first->metric, strlen(first->metric) + 1);
		XLogRegisterData(first->tenant_id, strlen(first->tenant_id) + 1);
		(void) XLogInsert(QES_RMGR_ID, XLOG_QES_USAGE_DELTA);
	}
	if (sorted != few)
		pfree(sorted);
	qes_debug_counter_delay(true);
}

void
qes_counters_pre_commit(void)
{
	log_deltas();
	if (npending == 0)
		return;
	if (MyProc == NULL || MyProc->pgprocno >= shared->nwindows)
		elog(ERROR, "qes_billing: no commit window for this process");
	pg_atomic_write_u64(&windows[MyProc->pgprocno], pg_atomic_read_u64(&shared->epoch));
	window_open = true;
	pg_memory_barrier();
}

static void
close_window(void)
{
	if (window_open)
	{
		pg_memory_barrier();
		pg_atomic_write_u64(&windows[MyProc->pgprocno], 0);
		window_open = false;
	}
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
		close_window();
		return;
	}
	if (npending > 0)
		qes_debug_counter_delay(false);
	for (int i = 0; i < npending; i++)
	{
		PendingItem *p = &pending[i];
		int			part = partition_of(p->fp);
		LWLock	   *lock = partition_lock(part);
		CounterEntry *e;

		LWLockAcquire(lock, LW_EXCLUSIVE);
		e = find_entry(part, p->fp);
		if (e == NULL)
			;					/* not cached: the next build reads our rows */
		else if (e->flags & CE_STANDBY)
		{
			/* built before a promotion: cannot judge our delta, rebuild */
			if (e->flags & CE_LOADING)
				young[e->young - 1].load_failed = true;
			else
			{
				remove_entry(part, e);
				pg_atomic_fetch_add_u64(&shared->dropped, 1);
			}
		}
		else if (p->notify_bit)
			e->notified |= p->notify_bit;
		else if (e->flags & CE_LOADING)
		{
			YoungState *ys = &young[e->young - 1];

			if (!park(ys, p->xid, p->value, p->at))
				ys->load_failed = true;
		}
		else if (e->young)
		{
			Seen		s = seen_by_build(&young[e->young - 1], p->xid);

			if (s == NOT_SEEN)
				apply_value(e, p->value, p->at);
			if (s == UNKNOWN)
			{
				remove_entry(part, e);
				pg_atomic_fetch_add_u64(&shared->dropped, 1);
			}
			else
				try_mature(e);
		}
		else
			apply_value(e, p->value, p->at);
		LWLockRelease(lock);
	}
	npending = 0;
	close_window();
}

static void
forget_build(void)
{
	if (building)
	{
		int			part = partition_of(building_fp);
		LWLock	   *lock = partition_lock(part);
		CounterEntry *e;

		LWLockAcquire(lock, LW_EXCLUSIVE);
		e = find_entry(part, building_fp);
		if (is_our_build(e, building_young))
			remove_entry(part, e);
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
	close_window();
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
	uint64		capacity = (uint64) shared->nparts * shared->part_limit;
	uint64		entries = 0;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	for (int part = 0; part < shared->nparts; part++)
		entries += pg_atomic_read_u32(&shared->parts[part].nlive);
	values[0] = Int32GetDatum((int32) capacity);
	values[1] = Int32GetDatum((int32) entries);
	values[2] = Int64GetDatum((int64) hits);
	values[3] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->loads));
	values[4] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->uncached));
	values[5] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->dropped));
	values[6] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->swept));
	values[7] = Int64GetDatum((int64) pg_atomic_read_u64(&shared->evicted));
	values[8] = Float8GetDatum(hits + misses > 0 ? (double) hits / (double) (hits + misses) : 0.0);
	nulls[8] = (hits + misses == 0);
	/* all the shared memory the counters take, per counter they can hold */
	values[9] = Int32GetDatum((int32) ((counters_size() + capacity - 1) / capacity));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * billing.usage_cache_sweep(before timestamptz): drop entries whose period
 * ended before `before`.  One partition lock at a time.
 */
Datum
qes_usage_cache_sweep(PG_FUNCTION_ARGS)
{
	TimestampTz before = PG_GETARG_TIMESTAMPTZ(0);
	int64		removed = 0;
	static TimestampTz last_sweep = 0;
	TimestampTz now = GetCurrentTimestamp();

	/* at most once a minute per process: it visits every slot */
	if (last_sweep != 0 && now - last_sweep < 60 * USECS_PER_SEC)
		PG_RETURN_INT64(0);
	last_sweep = now;

	for (int part = 0; part < shared->nparts; part++)
	{
		CounterEntry *s = partition_slots(part);
		uint32		i = 0;

		LWLockAcquire(partition_lock(part), LW_EXCLUSIVE);
		while (i < shared->part_slots)
		{
			/* a removal shifts a later entry back into i: look at i again */
			if (!slot_empty(&s[i]) && !(s[i].flags & CE_LOADING) && s[i].period_end < before)
			{
				remove_entry(part, &s[i]);
				removed++;
			}
			else
				i++;
		}
		LWLockRelease(partition_lock(part));
	}
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
