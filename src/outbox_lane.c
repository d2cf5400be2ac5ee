/*-------------------------------------------------------------------------
 *
 * outbox_lane.c
 *	  The outbox's direct lane: a Stripe request claimed by the transaction
 *	  that queues it and handed to the worker through shared memory, so
 *	  that the worker sends it without a transaction of its own
 *	  (docs/architecture.md, "The direct lane").
 *
 * Wording: a *slot* holds one request on its way to the worker: what the
 * worker needs to send it (method, path, form-encoded parameters,
 * Idempotency-Key) and the (sub)transaction id whose INSERT holds its row.
 * The lane is *open* while the worker says it would claim a request at once
 * (src/outbox.c publishes it): no backlog, a key, room in flight.
 *
 * How a request takes the lane (billing.outbox_enqueue, in the caller's
 * transaction):
 *
 *	1. billing.outbox_lane_reserve() takes a free slot while the lane is
 *	   open, copies the request into it and notes the current transaction
 *	   id (the xmin of the row about to be inserted);
 *	2. the row is inserted already claimed: in_flight, attempt 1, claimed_at
 *	   the clock -- what billing.outbox_claim would have written;
 *	3. billing.outbox_lane_fill() gives the slot the row's id.
 *
 * At COMMIT the slot is stamped with the commit record's end and the
 * worker woken (no outbox wake-up: nothing is left to claim).  The worker
 * takes a slot only once its transaction id is known to have committed --
 * not in progress, and TransactionIdDidCommit(), which follows a
 * subtransaction to its top -- and sends it after the WAL up to its commit
 * is flushed, so that a request never leaves before the row that claims it
 * is durable.  A slot whose transaction or subtransaction aborted is freed
 * (by its backend at once, by the worker whatever happened to the backend).
 * A prepared transaction's slot waits for COMMIT PREPARED; the worker looks
 * each tick while prepared transactions exist (src/worker.c).
 *
 * What the worker does not send from the lane it puts back in the queue
 * (billing.outbox_lane_release) to be claimed the ordinary way
 * (src/outbox.c, lane_send): no key, paused, the rate limit's bucket empty,
 * or queued too long before it was taken (a prepared transaction's, a long
 * transaction's: the claim's time dates Stripe's answer).  A row
 * whose slot was lost (a restart of the server or of the worker) is in
 * flight without a sender, and is reclaimed like any other: at worker
 * start-up, or once stale.  A row sent twice (a reclaim racing a slot) goes
 * under the same Idempotency-Key, and only the answer of the attempt that
 * owns the row is recorded.
 *
 * LOCKING RULES
 *
 * - The lane (LaneShared and its slots) is protected by its own LWLock,
 *   lane->lock, from the named tranche "qes_billing lane".  Backends take it
 *   EXCLUSIVE to reserve, fill, stamp and free their own slots; the worker
 *   takes it EXCLUSIVE to publish, and to take or free slots.
 * - It is held only to copy: never across I/O, SPI, an ereport, an
 *   allocation or another LWLock.  Transaction status is looked up with the
 *   lock released (the slot is checked again after: same xid, still filled).
 * - waiters, sent and released are atomics and need no lock.
 * - nbusy (slots not free) is written under the lock; the worker reads it
 *   without, as a hint (a commit sets the worker's latch after stamping its
 *   slots, and setting a latch is a barrier).
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/transam.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "catalog/namespace.h"
#include "catalog/pg_namespace.h"
#include "utils/array.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "commands/extension.h"
#include "fmgr.h"
#include "funcapi.h"
#include "access/htup_details.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "outbox_lane.h"
#include "stripe_form.h"

#define QES_LANE_TRANCHE	"qes_billing lane"

typedef enum LaneSlotState
{
	LANE_FREE = 0,
	LANE_RESERVED,				/* its row is being inserted */
	LANE_FILLED					/* its row is inserted: the xid decides */
} LaneSlotState;

typedef struct LaneSlot
{
	LaneSlotState state;
	pid_t		owner;			/* the backend whose transaction holds it; 0 once prepared */
	TransactionId xid;			/* the (sub)transaction that inserted the row */
	XLogRecPtr	commit_lsn;		/* end of its commit record (invalid until stamped) */
	bool		prepared;		/* PREPARE TRANSACTION: committed by someone else, if at all */
	Oid			extoid;
	int64		request_id;
	TimestampTz reserved_at;
	char		method[8];
	int			path_len;
	int			form_len;
	int			key_len;
	char		data[QES_LANE_BYTES];	/* path, form, key, each NUL-terminated */
} LaneSlot;

typedef struct LaneShared
{
	LWLock	   *lock;
	int			nbusy;			/* slots not free */
	bool		open;			/* published by the worker */
	Oid			dboid;			/* ... for its database */
	Oid			extoid;			/* ... and incarnation of the extension */
	pg_atomic_uint64 waiters;	/* requests queued to wait for another (atomic) */
	pg_atomic_uint64 sent;		/* requests the worker sent from the lane (atomic) */
	pg_atomic_uint64 released;	/* ... and put back in the queue instead (atomic) */
	LaneSlot	slots[QES_LANE_SLOTS];
} LaneShared;

static LaneShared *lane = NULL;

/*
 * A transaction takes at most this many slots: one that queues many
 * requests (the meter pass) leaves the lane to others, and one left open
 * (idle in transaction) cannot close it.
 */
#define QES_LANE_PER_XACT	8

/* this backend's slots in the current transaction, and the subtransaction of each */
static int	my_slot[QES_LANE_PER_XACT];
static SubTransactionId my_subid[QES_LANE_PER_XACT];
static int	my_n = 0;
/* the next INSERT into billing.stripe_requests is one the lane took */
static bool insert_expected = false;

PG_FUNCTION_INFO_V1(qes_outbox_lane_reserve);
PG_FUNCTION_INFO_V1(qes_outbox_lane_fill);
PG_FUNCTION_INFO_V1(qes_outbox_note_waiter);
PG_FUNCTION_INFO_V1(qes_outbox_lane_state);

/* ---- shared memory ------------------------------------------------------ */

void
qes_lane_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(LaneShared)));
	RequestNamedLWLockTranche(QES_LANE_TRANCHE, 1);
}

/* called from the startup hook, with AddinShmemInitLock held */
void
qes_lane_startup(void)
{
	bool		found;

	lane = ShmemInitStruct("qes_billing lane", sizeof(LaneShared), &found);
	if (!found)
	{
		memset(lane, 0, sizeof(LaneShared));
		lane->lock = &(GetNamedLWLockTranche(QES_LANE_TRANCHE))[0].lock;
		pg_atomic_init_u64(&lane->waiters, 0);
		pg_atomic_init_u64(&lane->sent, 0);
		pg_atomic_init_u64(&lane->released, 0);
	}
}

/* free slot i (lock held) */
static void
free_slot(int i)
{
	if (lane->slots[i].state != LANE_FREE)
	{
		lane->slots[i].state = LANE_FREE;
		lane->nbusy--;
	}
}

/* ---- backends: queuing a request ---------------------------------------- */

/*
 * billing.outbox_lane_reserve(method, path, params, idempotency_key): a
 * slot for a request about to be inserted in the current (sub)transaction,
 * or NULL when the lane is closed, full, or the request does not fit.
 */
Datum
qes_outbox_lane_reserve(PG_FUNCTION_ARGS)
{
	char	   *method;
	char	   *path;
	char	   *form;
	char	   *key;
	int			path_len;
	int			form_len;
	int			key_len;
	Oid			extoid;
	TransactionId xid;
	TimestampTz now;
	int			slot = -1;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3))
		PG_RETURN_NULL();
	/* (unlocked: a hint; checked again under the lock) */
	if (lane == NULL || !lane->open || lane->dboid != MyDatabaseId ||
		RecoveryInProgress() || IsInParallelMode() || my_n >= QES_LANE_PER_XACT)
		PG_RETURN_NULL();
	extoid = get_extension_oid("qes_billing", true);
	if (!OidIsValid(extoid) || extoid != lane->extoid)
		PG_RETURN_NULL();

	method = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (strcmp(method, "GET") != 0 && strcmp(method, "POST") != 0 && strcmp(method, "DELETE") != 0)
		PG_RETURN_NULL();		/* (the row's CHECK refuses it) */
	path = text_to_cstring(PG_GETARG_TEXT_PP(1));
	form = qes_stripe_form_encode(PG_GETARG_JSONB_P(2));
	key = text_to_cstring(PG_GETARG_TEXT_PP(3));
	path_len = strlen(path);
	form_len = strlen(form);
	key_len = strlen(key);
	if (key_len > QES_LANE_KEY_MAX || path_len + form_len + key_len + 3 > QES_LANE_BYTES)
		PG_RETURN_NULL();		/* a large request goes the ordinary way */

	xid = GetCurrentTransactionId();	/* the row's xmin */
	now = GetCurrentTimestamp();

	LWLockAcquire(lane->lock, LW_EXCLUSIVE);
	if (lane->open && lane->dboid == MyDatabaseId && lane->extoid == extoid)
	{
		for (int i = 0; i < QES_LANE_SLOTS; i++)
		{
			LaneSlot   *s = &lane->slots[i];

			if (s->state != LANE_FREE)
				continue;
			s->state = LANE_RESERVED;
			s->owner = MyProcPid;
			s->xid = xid;
			s->commit_lsn = InvalidXLogRecPtr;
			s->prepared = false;
			s->extoid = extoid;
			s->request_id = 0;
			s->reserved_at = now;
			strlcpy(s->method, method, sizeof(s->method));
			s->path_len = path_len;
			s->form_len = form_len;
			s->key_len = key_len;
			memcpy(s->data, path, path_len + 1);
			memcpy(s->data + path_len + 1, form, form_len + 1);
			memcpy(s->data + path_len + 1 + form_len + 1, key, key_len + 1);
			lane->nbusy++;
			slot = i;
			break;
		}
	}
	LWLockRelease(lane->lock);
	if (slot < 0)
		PG_RETURN_NULL();

	my_slot[my_n] = slot;
	my_subid[my_n] = GetCurrentSubTransactionId();
	my_n++;
	insert_expected = true;
	PG_RETURN_INT32(slot + 1);
}

/*
 * billing.outbox_lane_fill(slot, request_id): the row of the reserved slot
 * is inserted.
 */
Datum
qes_outbox_lane_fill(PG_FUNCTION_ARGS)
{
	int			slot = PG_GETARG_INT32(0) - 1;
	int64		request_id = PG_GETARG_INT64(1);
	bool		mine = false;
	bool		filled = false;

	insert_expected = false;
	for (int k = 0; k < my_n; k++)
		mine |= my_slot[k] == slot;
	if (mine && lane != NULL)
	{
		LWLockAcquire(lane->lock, LW_EXCLUSIVE);
		if (lane->slots[slot].state == LANE_RESERVED && lane->slots[slot].owner == MyProcPid &&
			lane->slots[slot].xid == GetCurrentTransactionIdIfAny())
		{
			lane->slots[slot].request_id = request_id;
			lane->slots[slot].state = LANE_FILLED;
			filled = true;
		}
		LWLockRelease(lane->lock);
	}
	if (!filled)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("outbox lane slot %d is not reserved by this transaction", slot + 1),
				 errhint("billing.outbox_lane_fill is called by billing.outbox_enqueue only.")));
	PG_RETURN_VOID();
}

/*
 * billing.outbox_note_waiter(): a request was queued to wait for another.
 * The worker records the answers that came in at once from now on (not
 * QES_RECORD_DELAY_MS later, src/outbox.c), so that a chain of requests
 * goes at the pace of Stripe's answers.
 */
Datum
qes_outbox_note_waiter(PG_FUNCTION_ARGS)
{
	if (lane != NULL)
		pg_atomic_fetch_add_u64(&lane->waiters, 1);
	PG_RETURN_VOID();
}

/* how many requests were queued to wait for another, ever (src/outbox.c) */
uint64
qes_lane_waiters(void)
{
	return lane != NULL ? pg_atomic_read_u64(&lane->waiters) : 0;
}

/*
 * The wake-up trigger saw an INSERT into billing.stripe_requests: was it
 * the row of a slot just reserved?  (Then the commit wakes the worker for
 * the lane, not for a claim.)
 */
bool
qes_lane_take_insert(void)
{
	bool		r = insert_expected;

	insert_expected = false;
	return r;
}

/*
 * PREPARE TRANSACTION: a prepared transaction carries no claim of the
 * lane.  Its rows go back to the queue as never claimed, in the
 * transaction being prepared, and its slots are freed: after COMMIT
 * PREPARED the worker claims them the ordinary way (and dates them from
 * then), and a prepared transaction that waits for hours leaves no row in
 * flight that a reclaim would take for possibly sent.
 */
static void
unclaim_for_prepare(void)
{
	Datum	   *ids = palloc(sizeof(Datum) * Max(my_n, 1));
	int			n = 0;
	Datum		args[1];
	Oid			types[1] = {INT8ARRAYOID};
	int			rc;
	Oid			nsp;
	HeapTuple	tup;
	Oid			owner;
	Oid			save_userid;
	int			save_sec;

	LWLockAcquire(lane->lock, LW_EXCLUSIVE);
	for (int k = 0; k < my_n; k++)
	{
		LaneSlot   *s = &lane->slots[my_slot[k]];

		if (s->state == LANE_FREE || s->owner != MyProcPid)
			continue;
		if (s->state == LANE_FILLED)
			ids[n++] = Int64GetDatum(s->request_id);
		free_slot(my_slot[k]);
	}
	LWLockRelease(lane->lock);
	my_n = 0;
	insert_expected = false;
	if (n == 0)
		return;

	args[0] = PointerGetDatum(construct_array(ids, n, INT8OID, sizeof(int64), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));

	/*
	 * As the owner of the billing schema (the extension's): the rows were
	 * queued by SECURITY DEFINER code, and the session's own role (an
	 * application's) may call none of this.
	 */
	nsp = get_namespace_oid("billing", false);
	tup = SearchSysCache1(NAMESPACEOID, ObjectIdGetDatum(nsp));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for schema %u", nsp);
	owner = ((Form_pg_namespace) GETSTRUCT(tup))->nspowner;
	ReleaseSysCache(tup);
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "qes_billing: SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	rc = SPI_execute_with_args(/* result: int8 */ "SELECT billing.outbox_lane_release($1)", 1, types, args, NULL, false, 1);
	PopActiveSnapshot();
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "qes_billing: could not put the direct lane's requests back in the queue before PREPARE TRANSACTION");
	SPI_finish();
	SetUserIdAndSecContext(save_userid, save_sec);
}

/* the transaction ends: stamp our slots at commit, free them at abort (and prepare) */
void
qes_lane_xact_event(XactEvent event)
{
	if (event == XACT_EVENT_PRE_PREPARE)
	{
		if (my_n > 0 && lane != NULL)
			unclaim_for_prepare();
		return;
	}
	if (event != XACT_EVENT_COMMIT && event != XACT_EVENT_PARALLEL_COMMIT &&
		event != XACT_EVENT_PREPARE && event != XACT_EVENT_ABORT &&
		event != XACT_EVENT_PARALLEL_ABORT)
		return;
	insert_expected = false;
	if (my_n == 0 || lane == NULL)
		return;
	LWLockAcquire(lane->lock, LW_EXCLUSIVE);
	for (int k = 0; k < my_n; k++)
	{
		LaneSlot   *s = &lane->slots[my_slot[k]];

		if (s->state == LANE_FREE || s->owner != MyProcPid)
			continue;
		if (s->state == LANE_FILLED && (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT))
			s->commit_lsn = XactLastCommitEnd;
		else if (s->state == LANE_FILLED && event == XACT_EVENT_PREPARE)
		{
			s->prepared = true;
			s->owner = 0;
		}
		else
			free_slot(my_slot[k]);
	}
	LWLockRelease(lane->lock);
	my_n = 0;
}

/* a subtransaction rolled back: the slots it reserved go (its rows went) */
void
qes_lane_subxact_abort(SubTransactionId subid)
{
	int			kept = 0;

	insert_expected = false;
	if (my_n == 0 || lane == NULL)
		return;
	LWLockAcquire(lane->lock, LW_EXCLUSIVE);
	for (int k = 0; k < my_n; k++)
	{
		/* (a subtransaction's id is larger than its parent's: >= takes its children too) */
		if (my_subid[k] >= subid)
		{
			if (lane->slots[my_slot[k]].owner == MyProcPid)
				free_slot(my_slot[k]);
			continue;
		}
		my_slot[kept] = my_slot[k];
		my_subid[kept] = my_subid[k];
		kept++;
	}
	LWLockRelease(lane->lock);
	my_n = kept;
}

/* ---- the worker ------------------------------------------------------------ */

/* the worker (re)started: the lane stays closed until it opens it */
void
qes_lane_worker_start(void)
{
	LWLockAcquire(lane->lock, LW_EXCLUSIVE);
	lane->open = false;
	LWLockRelease(lane->lock);
}

/*
 * Open or close the lane for this database and the incarnation extoid of
 * the extension.
 */
void
qes_lane_publish(bool open, Oid extoid)
{
	static bool published = false;
	static bool was_open = false;
	static Oid	was_extoid = InvalidOid;

	if (!OidIsValid(extoid))
		open = false;
	if (published && open == was_open && extoid == was_extoid)
		return;
	LWLockAcquire(lane->lock, LW_EXCLUSIVE);
	lane->open = open;
	lane->dboid = MyDatabaseId;
	lane->extoid = extoid;
	LWLockRelease(lane->lock);
	published = true;
	was_open = open;
	was_extoid = extoid;
}

/* are slots in use (a hint: read without the lock)? */
bool
qes_lane_has_work(void)
{
	return lane != NULL && lane->nbusy > 0;
}

/*
 * Take up to max requests whose transactions have committed, copied into
 * out[], their slots freed; free the slots of those that aborted.  Returns
 * how many were taken.  Their commits are flushed before this returns.
 */
int
qes_lane_take(QesLaneRequest *out, int max)
{
	int			idx[QES_LANE_SLOTS];
	TransactionId xids[QES_LANE_SLOTS];
	int			status[QES_LANE_SLOTS]; /* 0: in progress, 1: committed, -1: aborted, 2: not known */
	TransactionId oldest;
	int			n = 0;
	int			taken = 0;
	XLogRecPtr	flush_to = InvalidXLogRecPtr;
	TimestampTz now = GetCurrentTimestamp();

	if (!qes_lane_has_work() || max <= 0)
		return 0;
	LWLockAcquire(lane->lock, LW_SHARED);
	for (int i = 0; i < QES_LANE_SLOTS; i++)
	{
		if (lane->slots[i].state != LANE_FILLED)
			continue;
		idx[n] = i;
		xids[n] = lane->slots[i].xid;
		n++;
	}
	LWLockRelease(lane->lock);
	if (n == 0)
		return 0;

	/*
	 * Their transactions' fate, without our lock (ProcArrayLock, the clog).
	 * One so old that the clog no longer holds it (the worker paused for
	 * ages) is not looked up -- that would raise -- but handed back for
	 * release by id: if its row exists, it goes back to the queue.
	 */
	LWLockAcquire(XactTruncationLock, LW_SHARED);
	oldest = ShmemVariableCache->oldestClogXid;
	LWLockRelease(XactTruncationLock);
	for (int k = 0; k < n; k++)
	{
		if (TransactionIdIsInProgress(xids[k]))
			status[k] = 0;
		else if (TransactionIdPrecedes(xids[k], oldest))
			status[k] = 2;
		else
			status[k] = TransactionIdDidCommit(xids[k]) ? 1 : -1;
	}

	LWLockAcquire(lane->lock, LW_EXCLUSIVE);
	for (int k = 0; k < n; k++)
	{
		LaneSlot   *s = &lane->slots[idx[k]];
		QesLaneRequest *r;

		if (s->state != LANE_FILLED || s->xid != xids[k] || status[k] == 0)
			continue;
		if (status[k] < 0)
		{
			free_slot(idx[k]);	/* rolled back: its row is gone */
			continue;
		}
		if (taken >= max)
			continue;

		/*
		 * Committed.  Its backend stamps the commit's end right after (a
		 * prepared transaction's is not known, nor is that of a backend
		 * that could not stamp it within a second): then everything
		 * inserted so far is flushed instead.
		 */
		if (status[k] == 2)
			s->commit_lsn = InvalidXLogRecPtr;	/* (released, never sent: no flush needed) */
		else if (XLogRecPtrIsInvalid(s->commit_lsn))
		{
			if (!s->prepared && now - s->reserved_at < USECS_PER_SEC)
				continue;
			s->commit_lsn = GetXLogInsertRecPtr();
		}
		if (s->commit_lsn > flush_to)
			flush_to = s->commit_lsn;
		r = &out[taken++];
		r->unknown = status[k] == 2;
		r->extoid = s->extoid;
		r->request_id = s->request_id;
		r->reserved_at = s->reserved_at;
		memcpy(r->method, s->method, sizeof(r->method));
		memcpy(r->data, s->data, s->path_len + s->form_len + s->key_len + 3);
		r->path = r->data;
		r->form = r->data + s->path_len + 1;
		r->idempotency_key = r->form + s->form_len + 1;
		free_slot(idx[k]);
	}
	LWLockRelease(lane->lock);

	/* no request leaves before the row that claims it is on disk */
	if (!XLogRecPtrIsInvalid(flush_to) && flush_to > GetFlushRecPtr(NULL))
		XLogFlush(flush_to);
	return taken;
}

/* the worker sent n requests from the lane and put m back in the queue */
void
qes_lane_count(int sent, int released)
{
	if (sent > 0)
		pg_atomic_fetch_add_u64(&lane->sent, sent);
	if (released > 0)
		pg_atomic_fetch_add_u64(&lane->released, released);
}

/*
 * billing.outbox_lane_state(): whether the lane is open, the slots in use,
 * and how many requests went through it or back to the queue since the
 * server started.
 */
Datum
qes_outbox_lane_state(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};
	bool		open;
	int			busy;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	LWLockAcquire(lane->lock, LW_SHARED);
	open = lane->open && lane->dboid == MyDatabaseId;
	busy = lane->nbusy;
	LWLockRelease(lane->lock);
	values[0] = BoolGetDatum(open);
	values[1] = Int32GetDatum(busy);
	values[2] = Int64GetDatum((int64) pg_atomic_read_u64(&lane->sent));
	values[3] = Int64GetDatum((int64) pg_atomic_read_u64(&lane->released));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
