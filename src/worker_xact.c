/*-------------------------------------------------------------------------
 *
 * worker_xact.c
 *	  The worker's transactions: the one place that begins, ends and
 *	  aborts them, runs a step in a subtransaction, and keeps the worker's
 *	  last error (docs/architecture.md, "The worker loop").
 *
 * The loop (src/worker.c) and the pumps it calls (src/outbox.c,
 * src/notify.c) use these; nothing here calls back into them.
 *
 * Every transaction of the worker is short and never spans an HTTP call
 * (docs/architecture.md, rule 3).  qes_worker_begin_xact() starts one, locks the
 * extension against DROP EXTENSION and connects SPI; qes_worker_end_xact()
 * commits it, counts it (and the subtransaction xids it cached) in the
 * worker's shared state, and returns to the memory context that was current
 * when it began.  qes_worker_subxact() runs one step (recording an answer,
 * a delivery, a batch of them) in a subtransaction: when the step raises,
 * it alone is rolled back, and what it raised is logged and kept as the
 * last error, redacted, while the transaction goes on.
 *
 * The worker's shared state (QesWorkerState) is protected as src/shmem.c
 * says at its top.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "storage/sinval.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "redact.h"
#include "shmem.h"
#include "worker_xact.h"

/* whether the transaction we are in connected SPI */
static bool xact_spi = false;
/* the memory context that was current when it began */
static MemoryContext xact_caller_context = NULL;
/* the incarnation of the extension this process last used */
static Oid	last_extoid = InvalidOid;

/*
 * SharedInvalidMessageCounter when last_extoid was last found to be the
 * current incarnation (extoid_current: whether it was); see
 * qes_worker_begin_xact().
 */
static uint64 extoid_checked_at = 0;
static bool extoid_current = false;

/*
 * The extension OID whose queues this process reconciled (rows left in
 * flight put back, src/worker.c): the incarnation the outbox may claim
 * requests of.
 */
static Oid	reconciled_extoid = InvalidOid;

/* count a transaction of the worker, and the subxids it cached */
static void
note_xact(int subxids, bool overflowed)
{
	LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
	qes_worker_state->xacts++;
	if (subxids > qes_worker_state->max_subxids)
		qes_worker_state->max_subxids = subxids;
	if (overflowed)
		qes_worker_state->subxid_overflows++;
	LWLockRelease(qes_worker_state->lock);
}

/* subtransaction xids the current transaction holds in its PGPROC cache */
int
qes_worker_subxids(void)
{
	return MyProc->subxidStatus.overflowed ? PGPROC_MAX_CACHED_SUBXIDS + 1 : MyProc->subxidStatus.count;
}

/*
 * Start a transaction of the worker and lock the extension.  Returns the
 * extension's OID, or InvalidOid when it does not exist; when it does, SPI
 * is connected.  End with qes_worker_end_xact().
 *
 * The extension may have been dropped and created again, in one transaction,
 * since this process last used it.  Its new incarnation becomes visible
 * (ProcArrayEndTransaction) before that transaction sends its invalidation
 * messages (AtEOXact_Inval), and its commit wakes us in between
 * (XACT_EVENT_COMMIT): a loop starting then sees the new extension in the
 * catalog while our catalog caches still hold the old one -- "billing" the
 * dropped schema, so that billing.worker_reclaim() "does not exist".  The
 * dropping transaction holds its lock on the old extension object until
 * after it has sent them, so we take that lock too before touching the new
 * incarnation, as PostgreSQL does for relations: lock, then read
 * invalidations.  The transaction snapshot is taken only after every lock
 * wait, so it sees whatever we waited for.
 */
Oid
qes_worker_begin_xact(const char *activity)
{
	Oid			extoid;

	xact_caller_context = CurrentMemoryContext;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	pgstat_report_activity(STATE_RUNNING, activity);

	/*
	 * The incarnation we found current last time is still current if no
	 * invalidation message has been processed since: a DROP EXTENSION sends
	 * its messages (for the schema and relations it drops) before it
	 * releases its lock on the extension object, StartTransactionCommand()
	 * has accepted whatever was queued, and LockDatabaseObject() accepts
	 * whatever we waited for.  (pg_extension has no catalog cache: it is
	 * the extension's members, its schema and relations, whose messages
	 * tell.)  Any invalidation anywhere in the cluster (another database's
	 * DDL, an ANALYZE's or VACUUM's statistics) sends us the long way,
	 * below, which reads pg_extension twice: 4 % of the worker's CPU per
	 * lone request when every transaction took it.
	 */
	if (extoid_current && SharedInvalidMessageCounter == extoid_checked_at)
	{
		LockDatabaseObject(ExtensionRelationId, last_extoid, 0, AccessShareLock);
		if (SharedInvalidMessageCounter == extoid_checked_at)
		{
			extoid = last_extoid;
			goto locked;
		}
		UnlockDatabaseObject(ExtensionRelationId, last_extoid, 0, AccessShareLock);
	}

	for (;;)
	{
		extoid = get_extension_oid(QES_EXTENSION_NAME, true);
		if (!OidIsValid(extoid))
			break;

		/*
		 * Lock ordering against DROP EXTENSION: it locks the extension object
		 * exclusively before any of its relations, so we share-lock the
		 * object before touching a relation.  One of us waits for the other;
		 * neither can hold what the other needs.
		 */
		LockDatabaseObject(ExtensionRelationId, extoid, 0, AccessShareLock);
		if (OidIsValid(last_extoid) && extoid != last_extoid)
		{
			/* a new incarnation: wait for the end of whoever dropped ours */
			LockDatabaseObject(ExtensionRelationId, last_extoid, 0, AccessShareLock);
			UnlockDatabaseObject(ExtensionRelationId, last_extoid, 0, AccessShareLock);
		}
		/* the extension may be gone, or new, once we have the lock */
		if (get_extension_oid(QES_EXTENSION_NAME, true) == extoid)
			break;
		UnlockDatabaseObject(ExtensionRelationId, extoid, 0, AccessShareLock);
	}
	if (OidIsValid(extoid))
		last_extoid = extoid;
	extoid_current = OidIsValid(extoid);
	extoid_checked_at = SharedInvalidMessageCounter;

locked:
	PushActiveSnapshot(GetTransactionSnapshot());
	xact_spi = false;
	if (OidIsValid(extoid))
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "qes_billing worker: SPI_connect failed");
		xact_spi = true;
	}
	return extoid;
}

/*
 * Commit the worker's transaction and count it; back in the memory context
 * that was current when it began (a commit leaves TopMemoryContext current).
 */
void
qes_worker_end_xact(void)
{
	int			subxids = qes_worker_subxids();
	bool		overflowed = MyProc->subxidStatus.overflowed;

	if (xact_spi)
		SPI_finish();
	xact_spi = false;
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
	note_xact(subxids, overflowed);
	if (xact_caller_context != NULL)
		MemoryContextSwitchTo(xact_caller_context);
	xact_caller_context = NULL;
}

/*
 * After an error: abort the transaction the worker was in, if any (counted
 * as one of its transactions).
 */
void
qes_worker_abort_xact(void)
{
	if (IsTransactionState())
		note_xact(0, false);
	AbortCurrentTransaction();
	xact_spi = false;
	xact_caller_context = NULL;
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Run step(arg) in a subtransaction of the current transaction.  Returns
 * true when it went through.  When it raised, the subtransaction is rolled
 * back (and with it everything the step did) and false is returned; unless
 * failure is NULL, what it raised is logged as "could not <failure>" and
 * kept as the worker's last error, both redacted.
 */
bool
qes_worker_subxact(QesSubxactStep step, void *arg, const char *failure)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		step(arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		ok = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		/* restore state: this step is undone, the transaction goes on */
		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		if (failure != NULL)
		{
			ereport(LOG,
					(errmsg("qes_billing worker: could not %s: %s",
							failure, qes_redact_secrets(edata->message))));
			qes_worker_note_error(edata->message ? edata->message : "an error without a message");
		}
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return ok;
}

/*
 * Keep message as the worker's last error, shown by worker_status and
 * api.health: never a secret (docs/architecture.md, rule 13).
 */
void
qes_worker_note_error(const char *message)
{
	int			len;

	message = qes_redact_secrets(message);
	/* cut on a character boundary: the text is returned as text */
	len = pg_mbcliplen(message, strlen(message), QES_LAST_ERROR_LEN - 1);
	LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
	memcpy(qes_worker_state->last_error, message, len);
	qes_worker_state->last_error[len] = '\0';
	qes_worker_state->last_error_at = GetCurrentTimestamp();
	LWLockRelease(qes_worker_state->lock);
}

/* the incarnation of the extension whose queues the worker reconciled */
Oid
qes_worker_incarnation(void)
{
	return reconciled_extoid;
}

void
qes_worker_set_incarnation(Oid extoid)
{
	reconciled_extoid = extoid;
}
