/*-------------------------------------------------------------------------
 *
 * fence.c
 *	  Partition fences: how a shard stops writing for the tenants of a
 *	  partition that is moving to another shard, or has moved
 *	  (docs/scaleout.md, "Moving a partition").
 *
 * Wording
 *	  partition	the tenant's place in the router's map: the first 32 bits of
 *				MD5(tenant id) & (partitions - 1), as router.tenant_partition
 *				computes it.
 *	  fence		the state of one partition on this shard, kept in
 *				billing.partition_fences (the truth) and mirrored here:
 *				'moving' (its rows are being copied, out of this shard or
 *				into it) or 'moved' (it lives on another shard now); and
 *				'copying', no fence: the history is being copied while the
 *				partition serves, and record_usage logs each new key in
 *				billing.partition_move_log for the copy under the fence.  Writes
 *				for a fenced partition's tenants are refused: 'moving' with
 *				SQLSTATE QBMOV (retry in a moment), 'moved' with QBMVD (look
 *				the tenant up again).
 *	  check		what every writer of a tenant's rows does first: record_usage,
 *				the row trigger on the tenant-owned tables, the worker's
 *				claims (billing.tenant_fenced).
 *	  exempt	a transaction finishing work that began before the fence
 *				(the worker recording a Stripe answer or a notification's
 *				outcome): its writes pass, and the mover waits for that work
 *				to end instead.
 *
 * The mover (router.move_partition_online) writes billing.partition_fences,
 * calls billing.partition_fences_reload() in the same transaction, commits,
 * then calls billing.partition_fence_wait(): it returns once every
 * transaction that may have passed a check before the fence was in place
 * has ended.  After that no write for the partition's tenants can commit on
 * this shard except the exempt ones, which the mover waits out by their
 * rows' states (no request or notification in flight).
 *
 * LOCKING RULES
 *
 * - FenceShared->lock (an LWLock of the tranche "qes_billing fences")
 *	 protects installing the states: loaded, generation, dboid,
 *	 partition_count, state[] and nfenced are written only under it,
 *	 EXCLUSIVE.  It is never held across SPI, I/O or an ereport.
 * - Checks read state[] (one byte), nfenced, loaded and dboid without the
 *	 lock: each is a single aligned load, and a check needs only to see
 *	 either the old or the new value (below).
 * - slots[] (one per PGPROC, by pgprocno) holds the virtual transaction id
 *	 of the newest transaction of that backend that made a check.  Only its
 *	 own backend writes its slot; the mover reads all of them.
 * - The handshake: a check writes its slot, then a full barrier, then reads
 *	 the state; the mover writes the state, then a full barrier, then reads
 *	 the slots.  So either the check sees the fence, or the mover sees the
 *	 check's transaction in its slot and waits for it (VirtualXactLock).
 * - Loading from the table at the first check after a start: a loader
 *	 notes the generation, reads the table, and installs what it read only
 *	 if nothing was installed meanwhile (generation unchanged, not loaded).
 *	 The mover's reload always installs (its own changes, before they
 *	 commit: a fence is never late) and bumps the generation; if its
 *	 transaction aborts, the abort clears `loaded` and bumps the generation
 *	 (atomics, no lock), so the next check loads the committed table; so
 *	 does the end of any transaction that installed.
 *	 Changes to the table are serialized (billing_shard.move_fence locks
 *	 it), so one transaction's install never hides another's fence.
 * - A prepared transaction has no backend, so its slot says nothing.  One
 *	 that made a check takes, as it prepares, a ShareLock on the object
 *	 (pg_extension, the extension's OID, sub-id QES_PREPARED_WRITERS); the
 *	 lock passes to the prepared transaction and is recovered with it after
 *	 a restart, and the mover waits for every holder of a conflicting
 *	 lock.  Only preparing takes it: nothing on the checks' path.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/htup_details.h"
#include "access/twophase.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "common/md5.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/lock.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "catalog_cache.h"
#include "fence.h"

/* the sub-id of the lock prepared transactions that made a check hold */
#define QES_PREPARED_WRITERS 1

/* the router's partition counts are powers of two up to this */
#define QES_MAX_PARTITIONS	65536

#define FENCE_NONE		0
#define FENCE_MOVING	1
#define FENCE_MOVED		2
#define FENCE_COPYING	3		/* not a fence: writes pass, new usage is logged */

typedef struct FenceShared
{
	LWLock	   *lock;
	pg_atomic_uint32 loaded;	/* state[] reflects the table (since start) */
	pg_atomic_uint32 generation;	/* bumped at every install and forget */
	Oid			dboid;			/* the database whose table was installed */
	int32		partition_count;	/* 0: no fence */
	int			nslots;
	pg_atomic_uint32 nfenced;	/* partitions with a fence */
	pg_atomic_uint64 untracked;	/* usage writes not by record_usage, while fenced */
	uint8		state[QES_MAX_PARTITIONS];
} FenceShared;

static FenceShared *fence = NULL;
static pg_atomic_uint64 *slots = NULL;

/* set around a call that finishes work begun before any fence */
static bool exempt = false;

/* this transaction installed the table as it sees it (undone at abort) */
static bool installed_in_xact = false;

/* the local transaction that last checked a tenant while fences existed */
static LocalTransactionId checked_lxid = InvalidLocalTransactionId;

/* the generation at which this backend found no fences in its database */
static uint32 local_empty_generation = PG_UINT32_MAX;

PG_FUNCTION_INFO_V1(qes_partition_fences_reload);
PG_FUNCTION_INFO_V1(qes_partition_fence_wait);
PG_FUNCTION_INFO_V1(qes_tenant_fenced);
PG_FUNCTION_INFO_V1(qes_partition_fence_guard);
PG_FUNCTION_INFO_V1(qes_partition_fence_usage);
PG_FUNCTION_INFO_V1(qes_tenant_partition);
PG_FUNCTION_INFO_V1(qes_partition_untracked_writes);

static int
fence_nslots(void)
{
	return MaxBackends + NUM_AUXILIARY_PROCS + max_prepared_xacts;
}

static Size
fence_size(void)
{
	return add_size(MAXALIGN(sizeof(FenceShared)),
					mul_size(sizeof(pg_atomic_uint64), fence_nslots()));
}

void
qes_fence_request(void)
{
	RequestAddinShmemSpace(fence_size());
	RequestNamedLWLockTranche("qes_billing fences", 1);
}

/* called from the startup hook, with AddinShmemInitLock held */
void
qes_fence_startup(void)
{
	bool		found;
	char	   *base;

	base = ShmemInitStruct("qes_billing fences", fence_size(), &found);
	fence = (FenceShared *) base;
	slots = (pg_atomic_uint64 *) (base + MAXALIGN(sizeof(FenceShared)));
	if (!found)
	{
		memset(fence, 0, sizeof(FenceShared));
		fence->lock = &(GetNamedLWLockTranche("qes_billing fences"))[0].lock;
		fence->nslots = fence_nslots();
		pg_atomic_init_u32(&fence->nfenced, 0);
		pg_atomic_init_u64(&fence->untracked, 0);
		pg_atomic_init_u32(&fence->loaded, 0);
		pg_atomic_init_u32(&fence->generation, 0);
		for (int i = 0; i < fence->nslots; i++)
			pg_atomic_init_u64(&slots[i], 0);
	}
}

/*
 * The partition of a tenant id for a router with `count` partitions: the
 * first 32 bits of the id's MD5, big-endian, masked (router.tenant_hash).
 */
static uint32
tenant_partition(const char *tenant_id, int32 count)
{
	uint8		sum[16];
	const char *errstr = NULL;
	uint32		h;

	if (!pg_md5_binary(tenant_id, strlen(tenant_id), sum, &errstr))
		elog(ERROR, "qes_billing: could not compute MD5: %s", errstr ? errstr : "unknown error");
	h = ((uint32) sum[0] << 24) | ((uint32) sum[1] << 16) | ((uint32) sum[2] << 8) | (uint32) sum[3];
	return h & (uint32) (count - 1);
}

/* ---- loading the table --------------------------------------------------- */

typedef struct FenceRows
{
	bool		present;		/* the table exists */
	int32		count;
	int			n;
	int32	   *partition;
	uint8	   *state;
} FenceRows;

static void
read_fences_cb(void *arg)
{
	FenceRows  *rows = (FenceRows *) arg;

	if (SPI_execute(/* result: bool */ "SELECT pg_catalog.to_regclass('billing.partition_fences') IS NOT NULL",
					true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "qes_billing: could not look for billing.partition_fences");
	{
		bool		isnull;

		rows->present = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	if (!rows->present)
		return;
	if (SPI_execute(/* result: int4, int4, int4 */ "SELECT f.partition_count, f.partition,"
					"       CASE WHEN f.state OPERATOR(pg_catalog.=) 'moved' THEN 2"
					"            WHEN f.state OPERATOR(pg_catalog.=) 'copying' THEN 3 ELSE 1 END"
					"  FROM billing.partition_fences f",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing: could not read billing.partition_fences");
	rows->n = SPI_processed;
	rows->partition = MemoryContextAlloc(TopTransactionContext, sizeof(int32) * Max(rows->n, 1));
	rows->state = MemoryContextAlloc(TopTransactionContext, Max(rows->n, 1));
	for (int i = 0; i < rows->n; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;
		int32		count = DatumGetInt32(SPI_getbinval(t, d, 1, &isnull));

		if (i > 0 && count != rows->count)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("billing.partition_fences names two partition counts, %d and %d", rows->count, count),
					 errhint("Every fence of a shard is for the router's one partition count; delete the stale rows.")));
		rows->count = count;
		rows->partition[i] = DatumGetInt32(SPI_getbinval(t, d, 2, &isnull));
		rows->state[i] = (uint8) DatumGetInt32(SPI_getbinval(t, d, 3, &isnull));
	}
}

/*
 * Read the table and install it.  force: the mover's reload (always
 * installs); else a first check's load, which installs only if nothing was
 * installed since it began.  Returns the number of fenced partitions.
 */
static int
load_fences(bool force)
{
	FenceRows	rows = {0};
	uint32		gen;
	int			fenced = 0;
	uint8	   *newstate;

	gen = pg_atomic_read_u32(&fence->generation);

	/*
	 * A first check reads the newest committed table, not its statement's
	 * snapshot (which may predate a fence, and in REPEATABLE READ the whole
	 * transaction's); the mover's reload reads its own changes.
	 */
	if (!force)
		PushActiveSnapshot(GetLatestSnapshot());
	qes_run_as_owner(read_fences_cb, &rows);	/* (an error pops it at abort) */
	if (!force)
		PopActiveSnapshot();
	if (!force && (!rows.present || rows.n == 0) && fence->dboid != MyDatabaseId)
	{
		/* nothing to claim: this backend knows its database has no fences */
		local_empty_generation = gen;
		return 0;
	}
	if (!rows.present)
		return 0;
	if (rows.n > 0 && (rows.count < 1 || rows.count > QES_MAX_PARTITIONS || (rows.count & (rows.count - 1)) != 0))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("billing.partition_fences has partition count %d", rows.count),
				 errhint("The router's partition count is a power of two up to %d.", QES_MAX_PARTITIONS)));

	newstate = palloc0(QES_MAX_PARTITIONS);
	for (int i = 0; i < rows.n; i++)
		if (rows.partition[i] >= 0 && rows.partition[i] < rows.count)
			newstate[rows.partition[i]] = rows.state[i];
	for (int i = 0; i < QES_MAX_PARTITIONS; i++)
		if (newstate[i] != FENCE_NONE)
			fenced++;

	LWLockAcquire(fence->lock, LW_EXCLUSIVE);
	if (force || ((pg_atomic_read_u32(&fence->loaded) == 0 || fence->dboid == InvalidOid) &&
				  pg_atomic_read_u32(&fence->generation) == gen &&
				  (fence->dboid == InvalidOid || fence->dboid == MyDatabaseId)))
	{
		/*
		 * Checks read state[] without the lock: a fence that stays must
		 * never read as lifted meanwhile.  So the count goes up first (the
		 * fast path looks), then only the bytes that change are written,
		 * then the count is set.
		 */
		pg_atomic_write_u32(&fence->nfenced, Max(fenced, (int) pg_atomic_read_u32(&fence->nfenced)));
		pg_write_barrier();
		if (rows.n > 0)
			fence->partition_count = rows.count;
		for (int i = 0; i < QES_MAX_PARTITIONS; i++)
			if (fence->state[i] != newstate[i])
				fence->state[i] = newstate[i];
		pg_write_barrier();
		/* a database with fences is the shard's (lazy loads without rows return early) */
		fence->dboid = MyDatabaseId;
		pg_atomic_fetch_add_u32(&fence->generation, 1);
		pg_atomic_write_u32(&fence->loaded, 1);
		pg_atomic_write_u32(&fence->nfenced, fenced);
	}
	LWLockRelease(fence->lock);
	pfree(newstate);
	if (force)
		installed_in_xact = true;
	/* the mover's side of the handshake: the states before the slots */
	pg_memory_barrier();
	return fenced;
}

/* ---- checks -------------------------------------------------------------- */

/*
 * The check's side of the handshake: publish this transaction, then read.
 * Returns the fence state of the tenant's partition (FENCE_NONE when this
 * transaction is exempt or nothing is fenced).
 */
static uint8
fence_state_of(const char *tenant_id, uint32 *partition, int32 *count)
{
	if (fence == NULL || MyProc == NULL || !IsTransactionState())
		return FENCE_NONE;
	if (MyProc->pgprocno < fence->nslots)
	{
		uint64		v = ((uint64) (uint32) MyBackendId << 32) | (uint64) MyProc->lxid;

		if (pg_atomic_read_u64(&slots[MyProc->pgprocno]) != v)
			pg_atomic_write_u64(&slots[MyProc->pgprocno], v);
	}
	pg_memory_barrier();
	/* a standby writes nothing; another database than the shard's has no fences */
	if (RecoveryInProgress())
		return FENCE_NONE;
	/*
	 * Until a database with fences claims the shared copy, each backend
	 * looks at its own database's table once per generation; a load that
	 * lost a race with an install or a forget tries again.
	 */
	for (int tries = 0;; tries++)
	{
		Oid			owner = fence->dboid;

		if (owner != InvalidOid && owner != MyDatabaseId)
			return FENCE_NONE;	/* another database is the shard's */
		if (owner == MyDatabaseId && pg_atomic_read_u32(&fence->loaded) != 0)
			break;
		if (owner == InvalidOid && local_empty_generation == pg_atomic_read_u32(&fence->generation))
			return FENCE_NONE;	/* no fences here, as of this generation */
		if (tries == 100)
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not load the partition fences"),
					 errdetail("billing.partition_fences changed 100 times while it was read."),
					 errhint("Retry the transaction.")));
		load_fences(false);
	}
	if (pg_atomic_read_u32(&fence->nfenced) == 0 || tenant_id == NULL)
		return FENCE_NONE;
	checked_lxid = MyProc->lxid;
	if (exempt)
		return FENCE_NONE;
	*count = fence->partition_count;
	if (*count < 1)
		return FENCE_NONE;
	*partition = tenant_partition(tenant_id, *count);
	return fence->state[*partition];
}

static void
refuse(const char *tenant_id, uint32 partition, int32 count, uint8 state)
{
	if (state == FENCE_MOVED)
		ereport(ERROR,
				(errcode(ERRCODE_QES_PARTITION_MOVED),
				 errmsg("tenant \"%s\" is no longer on this shard", tenant_id),
				 errdetail("Its partition %u of %d has moved to another shard.", partition, count),
				 errhint("Look up the tenant's shard again (router.tenant_shard) and retry the transaction there.")));
	ereport(ERROR,
			(errcode(ERRCODE_QES_PARTITION_MOVING),
			 errmsg("tenant \"%s\" is being moved to another shard", tenant_id),
			 errdetail("Its partition %u of %d is fenced while its rows are copied; its writes resume on its new shard within seconds.",
					   partition, count),
			 errhint("Retry the transaction in a moment, on the shard router.tenant_shard names then.")));
}

/*
 * Refuse a write for a tenant whose partition is fenced here.  Returns true
 * when the partition is being copied while it serves ('copying'): the
 * caller logs the usage it records (qes_fence_log_usage).
 */
bool
qes_fence_check_tenant(const char *tenant_id)
{
	uint32		partition = 0;
	int32		count = 0;
	uint8		state = fence_state_of(tenant_id, &partition, &count);

	if (state == FENCE_COPYING)
		return true;
	if (state != FENCE_NONE)
		refuse(tenant_id, partition, count, state);
	return false;
}

typedef struct LoggedUsage
{
	const char *tenant_id;
	const char *idempotency_key;
} LoggedUsage;

static void
log_usage_cb(void *arg)
{
	LoggedUsage *u = (LoggedUsage *) arg;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];

	values[0] = CStringGetTextDatum(u->tenant_id);
	values[1] = CStringGetTextDatum(u->idempotency_key);
	if (SPI_execute_with_args(/* result: none */ "INSERT INTO billing.partition_move_log (tenant_id, idempotency_key)"
							  " VALUES ($1, $2) ON CONFLICT (tenant_id, idempotency_key)"
							  " DO UPDATE SET kind = 'written', logged_at = pg_catalog.now()",
							  2, types, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "qes_billing: could not log usage of a partition being copied");
}

/*
 * Usage recorded for a tenant whose partition is being copied: its key goes
 * into billing.partition_move_log in the same transaction, so that the copy
 * under the fence takes exactly what came since (not the whole history).
 */
void
qes_fence_log_usage(const char *tenant_id, const char *idempotency_key)
{
	LoggedUsage u = {tenant_id, idempotency_key};

	qes_run_as_owner(log_usage_cb, &u);
}

/*
 * Run fn(arg) as work that began before any fence (the worker recording a
 * Stripe answer or a notification's outcome): its writes pass the checks.
 */
void
qes_fence_exempt_call(void (*fn) (void *), void *arg)
{
	bool		save = exempt;

	exempt = true;
	PG_TRY();
	{
		fn(arg);
	}
	PG_FINALLY();
	{
		exempt = save;
	}
	PG_END_TRY();
}

/*
 * At the end of a transaction that installed the table as it saw it, the
 * states are forgotten and the next check loads the committed table: after
 * an abort (or a rolled-back savepoint) what it installed was never true,
 * and after a commit the table is the truth anyway.  Atomics only: no lock
 * is taken while a transaction ends.
 */
void
qes_fence_at_xact_end(bool top)
{
	if (!installed_in_xact || fence == NULL)
		return;
	if (top)
		installed_in_xact = false;	/* a rolled-back savepoint: again at the end */
	pg_atomic_fetch_add_u32(&fence->generation, 1);
	pg_atomic_write_u32(&fence->loaded, 0);
	pg_memory_barrier();
}

/* the lock of prepared transactions that made a check (locking rules) */
static bool
prepared_writers_tag(LOCKTAG *tag)
{
	Oid			extoid = get_extension_oid("qes_billing", true);

	if (!OidIsValid(extoid))
		return false;
	SET_LOCKTAG_OBJECT(*tag, MyDatabaseId, ExtensionRelationId, extoid, QES_PREPARED_WRITERS);
	return true;
}

/*
 * PREPARE TRANSACTION ends the backend's virtual transaction: a prepared
 * transaction that wrote a tenant's rows is no longer found by its slot.
 * Refused while any partition is fenced or copied here; otherwise, if the
 * transaction made a check, it takes the lock a partition move waits for
 * (locking rules), which the prepared transaction keeps until it ends.
 */
void
qes_fence_refuse_prepare(void)
{
	LOCKTAG		tag;

	if (fence == NULL || MyProc == NULL)
		return;
	if (MyProc->pgprocno < fence->nslots &&
		pg_atomic_read_u64(&slots[MyProc->pgprocno]) ==
		(((uint64) (uint32) MyBackendId << 32) | (uint64) MyProc->lxid) &&
		prepared_writers_tag(&tag))
		(void) LockAcquire(&tag, ShareLock, false, false);
	if (checked_lxid != MyProc->lxid || pg_atomic_read_u32(&fence->nfenced) == 0)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
			 errmsg("cannot PREPARE a transaction that wrote tenants' billing rows while a partition is being moved"),
			 errdetail("A partition move waits for the transactions that write its tenants' rows; a prepared transaction escapes that wait."),
			 errhint("Commit it without two-phase commit, or after the move.")));
}

/*
 * usage_events written otherwise than by record_usage (a DBA, a restore):
 * such rows are not logged while a partition is copied, so a move compares
 * this count before it copies and under its fence, and copies all of the
 * usage again when it changed.  The write publishes its transaction first,
 * so a move that began copying after the count was read waits for it.
 */
void
qes_fence_note_untracked_usage_write(void)
{
	uint32		partition;
	int32		count;

	if (fence == NULL)
		return;
	(void) fence_state_of(NULL, &partition, &count);
	if (pg_atomic_read_u32(&fence->nfenced) > 0)
		pg_atomic_fetch_add_u64(&fence->untracked, 1);
}

/* ---- SQL ----------------------------------------------------------------- */

/* billing.partition_fences_reload(): install the table now (the mover) */
Datum
qes_partition_fences_reload(PG_FUNCTION_ARGS)
{
	if (fence == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("qes_billing is not in shared_preload_libraries"),
				 errhint("Partition fences live in the library's shared memory.")));
	PG_RETURN_INT32(load_fences(true));
}

/*
 * billing.partition_fence_wait(): wait until every other transaction that
 * made a check before now has ended, prepared ones included; returns how
 * many were still running.
 * Waits as a lock waiter does: lock_timeout and statement_timeout apply.
 */
Datum
qes_partition_fence_wait(PG_FUNCTION_ARGS)
{
	int			waited = 0;
	int			n;
	uint64	   *seen;

	if (fence == NULL)
		PG_RETURN_INT32(0);
	pg_memory_barrier();
	n = fence->nslots;
	seen = palloc(sizeof(uint64) * n);
	for (int i = 0; i < n; i++)
		seen[i] = pg_atomic_read_u64(&slots[i]);
	for (int i = 0; i < n; i++)
	{
		VirtualTransactionId vxid;

		if (seen[i] == 0)
			continue;
		vxid.backendId = (BackendId) (seen[i] >> 32);
		vxid.localTransactionId = (LocalTransactionId) (seen[i] & 0xFFFFFFFF);
		if (vxid.backendId == MyBackendId || !VirtualTransactionIdIsValid(vxid))
			continue;
		if (!VirtualXactLock(vxid, false))
		{
			waited++;
			VirtualXactLock(vxid, true);
		}
		CHECK_FOR_INTERRUPTS();
	}
	pfree(seen);
	/* and the prepared transactions that made a check (locking rules) */
	{
		LOCKTAG		tag;
		VirtualTransactionId *holders;
		int			nholders;

		if (prepared_writers_tag(&tag))
		{
			holders = GetLockConflicts(&tag, ExclusiveLock, &nholders);
			for (int i = 0; i < nholders; i++)
			{
				if (!VirtualXactLock(holders[i], false))
				{
					waited++;
					VirtualXactLock(holders[i], true);
				}
				CHECK_FOR_INTERRUPTS();
			}
		}
	}
	PG_RETURN_INT32(waited);
}

/* billing.partition_untracked_writes(): see qes_fence_note_untracked_usage_write */
Datum
qes_partition_untracked_writes(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(fence == NULL ? 0 : (int64) pg_atomic_read_u64(&fence->untracked));
}

/* billing.tenant_fenced(tenant_id): whether its writes are refused here */
Datum
qes_tenant_fenced(PG_FUNCTION_ARGS)
{
	uint32		partition = 0;
	int32		count = 0;

	if (PG_ARGISNULL(0))
		PG_RETURN_BOOL(false);
	{
		uint8		state = fence_state_of(text_to_cstring(PG_GETARG_TEXT_PP(0)), &partition, &count);

		PG_RETURN_BOOL(state == FENCE_MOVING || state == FENCE_MOVED);
	}
}

/* billing.tenant_partition(tenant_id, partitions): router.tenant_partition's answer */
Datum
qes_tenant_partition(PG_FUNCTION_ARGS)
{
	int32		count = PG_GETARG_INT32(1);

	if (count < 1 || count > QES_MAX_PARTITIONS || (count & (count - 1)) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the number of partitions must be a power of two up to %d, not %d", QES_MAX_PARTITIONS, count)));
	PG_RETURN_INT32((int32) tenant_partition(text_to_cstring(PG_GETARG_TEXT_PP(0)), count));
}

static void
guard_tuple(Relation rel, HeapTuple tuple, int attnum)
{
	bool		isnull;
	Datum		d;

	if (tuple == NULL)
		return;
	d = heap_getattr(tuple, attnum, RelationGetDescr(rel), &isnull);
	if (!isnull)
		(void) qes_fence_check_tenant(TextDatumGetCString(d));
}

/*
 * The row trigger on usage_events, BEFORE UPDATE OR DELETE (record_usage's
 * inserts check in C): refused for a fenced tenant; while its partition is
 * copied, an update is logged (the copy under the fence takes the row
 * again) and a delete counted (the move copies all of the usage again).
 */
Datum
qes_partition_fence_usage(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	bool		isnull;
	Datum		tenant;
	Datum		key;
	uint32		partition = 0;
	int32		count = 0;
	uint8		state;
	char	   *tenant_id;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_ROW(td->tg_event) || !TRIGGER_FIRED_BEFORE(td->tg_event) ||
		TRIGGER_FIRED_BY_INSERT(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing.partition_fence_usage() must be a BEFORE UPDATE OR DELETE row trigger")));
	desc = RelationGetDescr(td->tg_relation);
	tenant = heap_getattr(td->tg_trigtuple, SPI_fnumber(desc, "tenant_id"), desc, &isnull);
	if (!isnull)
	{
		tenant_id = TextDatumGetCString(tenant);
		state = fence_state_of(tenant_id, &partition, &count);
		if (state == FENCE_MOVING || state == FENCE_MOVED)
			refuse(tenant_id, partition, count, state);
		if (state == FENCE_COPYING && TRIGGER_FIRED_BY_UPDATE(td->tg_event))
		{
			key = heap_getattr(td->tg_trigtuple, SPI_fnumber(desc, "idempotency_key"), desc, &isnull);
			if (!isnull)
				qes_fence_log_usage(tenant_id, TextDatumGetCString(key));
		}
		else if (state == FENCE_COPYING)
			pg_atomic_fetch_add_u64(&fence->untracked, 1);
	}
	return PointerGetDatum(TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? td->tg_newtuple : td->tg_trigtuple);
}

/*
 * The row trigger on the tenant-owned tables (BEFORE INSERT OR UPDATE OR
 * DELETE): the old and the new row's tenant must not be fenced.
 */
Datum
qes_partition_fence_guard(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	int			attnum;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_ROW(td->tg_event) || !TRIGGER_FIRED_BEFORE(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing.partition_fence_guard() must be a BEFORE ROW trigger")));
	attnum = SPI_fnumber(RelationGetDescr(td->tg_relation), "tenant_id");
	if (attnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("table %s has no column tenant_id", RelationGetRelationName(td->tg_relation))));
	if (TRIGGER_FIRED_BY_INSERT(td->tg_event))
	{
		guard_tuple(td->tg_relation, td->tg_trigtuple, attnum);
		return PointerGetDatum(td->tg_trigtuple);
	}
	guard_tuple(td->tg_relation, td->tg_trigtuple, attnum);
	if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
	{
		guard_tuple(td->tg_relation, td->tg_newtuple, attnum);
		return PointerGetDatum(td->tg_newtuple);
	}
	return PointerGetDatum(td->tg_trigtuple);
}
