/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The qes_billing background worker: a latch loop.
 *
 * One worker per cluster, connected to qes_billing.database.  It sleeps on
 * its latch; backends that queue work set the latch when their transaction
 * COMMITs (qes_wake_at_commit), never before and never on abort, and the
 * naptime wakes it anyway for retries and timers.
 *
 * Each loop runs in its own short transaction (DESIGN.md rule 3): it checks
 * that the extension exists (it may not yet, or may be dropped and created
 * again while we run; a share lock on the extension object keeps DROP
 * EXTENSION from deadlocking with us), reclaims work left in flight by a crash once per
 * incarnation of the extension, and runs the timers.  An error in a loop is
 * logged, kept for the worker_state() view, and the loop goes on.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "commands/trigger.h"
#include <limits.h>
#include <math.h>

#include "guc.h"
#include "notify.h"
#include "outbox.h"
#include "redact.h"
#include "shmem.h"
#include "worker.h"

/* events billing.worker_tick() applies per loop (see sql/install/60_queues.sql) */
#define QES_TICK_BATCH 200
/* longest time the outbox runs before the loop's other work gets a turn */
#define QES_PUMP_SLICE_MS 200
/* shortest time between the starts of two loops when not busy */
#define QES_MIN_LOOP_MS 5

PG_FUNCTION_INFO_V1(qes_worker_state_fn);
PG_FUNCTION_INFO_V1(qes_wake_worker_trigger);
PG_FUNCTION_INFO_V1(qes_wake_worker);

/* ---- waking the worker at commit --------------------------------------- */

static bool wake_pending = false;

/* called from the module's transaction callback (qes_billing.c) */
void
qes_wake_xact_event(XactEvent event)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_pending)
			{
				wake_pending = false;
				qes_set_worker_latch();
			}
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* a prepared transaction is picked up by the naptime */
			wake_pending = false;
			break;
		default:
			break;
	}
}

/*
 * Ask for the worker to be woken when the current transaction commits.
 */
void
qes_wake_at_commit(void)
{
	wake_pending = true;
}

/*
 * billing.wake_worker_on_commit(): statement-level AFTER INSERT trigger on
 * the queues.
 */
Datum
qes_wake_worker_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("wake_worker_on_commit() must be called as a trigger")));
	qes_wake_at_commit();
	return PointerGetDatum(NULL);
}

/*
 * billing.wake_worker(): wake the worker when the caller's transaction
 * commits.
 */
Datum
qes_wake_worker(PG_FUNCTION_ARGS)
{
	qes_wake_at_commit();
	PG_RETURN_VOID();
}

/* ---- the worker's view of itself ---------------------------------------- */

Datum
qes_worker_state_fn(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[13];
	bool		nulls[13];
	QesWorkerState copy;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	LWLockAcquire(qes_worker_state->lock, LW_SHARED);
	memcpy(&copy, qes_worker_state, sizeof(copy));
	LWLockRelease(qes_worker_state->lock);

	memset(nulls, 0, sizeof(nulls));
	values[0] = Int32GetDatum(copy.pid);
	nulls[0] = (copy.pid == 0);
	values[1] = TimestampTzGetDatum(copy.started_at);
	nulls[1] = (copy.started_at == 0);
	values[2] = TimestampTzGetDatum(copy.last_loop_at);
	nulls[2] = (copy.last_loop_at == 0);
	values[3] = Int64GetDatum((int64) copy.loops);
	values[4] = Int64GetDatum((int64) copy.latch_wakeups);
	values[5] = Int64GetDatum((int64) copy.timeout_wakeups);
	values[6] = Int32GetDatum(copy.naptime_ms);
	values[7] = Int64GetDatum((int64) copy.reclaimed);
	values[8] = BoolGetDatum(copy.extension_present);
	copy.last_error[QES_LAST_ERROR_LEN - 1] = '\0';
	values[9] = CStringGetTextDatum(copy.last_error);
	nulls[9] = (copy.last_error[0] == '\0');
	values[10] = TimestampTzGetDatum(copy.last_error_at);
	nulls[10] = (copy.last_error_at == 0);
	values[11] = Int64GetDatum((int64) pg_atomic_read_u64(&qes_worker_state->wake_requests));
	values[12] = Int64GetDatum((int64) copy.wakes_served);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* ---- the worker --------------------------------------------------------- */

void
qes_register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 2;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, QES_EXTENSION_NAME);
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "qes_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, QES_WORKER_NAME);
	snprintf(worker.bgw_type, BGW_MAXLEN, QES_WORKER_NAME);
	RegisterBackgroundWorker(&worker);
}

static void
worker_detach(int code, Datum arg)
{
	LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
	qes_worker_state->pid = 0;
	qes_worker_state->latch = NULL;
	LWLockRelease(qes_worker_state->lock);
}

/* the context of one loop, reset after it (outbox.c allocates in it too) */
MemoryContext qes_worker_loop_context = NULL;

void
qes_worker_note_error(const char *message)
{
	/* shown by worker_status and api.health: never a secret (DESIGN.md rule 13) */
	message = qes_redact_cstring(message);
	LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
	strlcpy(qes_worker_state->last_error, message, QES_LAST_ERROR_LEN);
	qes_worker_state->last_error_at = GetCurrentTimestamp();
	LWLockRelease(qes_worker_state->lock);
}

/*
 * Run one SQL statement that returns a single bigint (the worker's entry
 * points into the schema).  Returns 0 for NULL.
 */
static int64
run_bigint(const char *sql)
{
	bool		isnull;
	Datum		d;

	if (SPI_execute(sql, false, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "qes_billing worker: \"%s\" did not return one row", sql);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetInt64(d);
}

/*
 * Start a transaction of the worker and lock the extension.  Returns the
 * extension's OID, or InvalidOid when it does not exist; when it does, SPI
 * is connected.  End with qes_worker_end_xact().
 */
static bool xact_spi = false;

static Oid
begin_xact(const char *activity)
{
	Oid			extoid;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);

	extoid = get_extension_oid(QES_EXTENSION_NAME, true);
	if (OidIsValid(extoid))
	{
		/*
		 * Lock ordering against DROP EXTENSION: it locks the extension object
		 * exclusively before any of its relations, so we share-lock the
		 * object before touching a relation.  One of us waits for the other;
		 * neither can hold what the other needs.  The extension may be gone
		 * once we have the lock.
		 */
		LockDatabaseObject(ExtensionRelationId, extoid, 0, AccessShareLock);
		if (get_extension_oid(QES_EXTENSION_NAME, true) != extoid)
			extoid = InvalidOid;
	}
	xact_spi = false;
	if (OidIsValid(extoid))
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "qes_billing worker: SPI_connect failed");
		xact_spi = true;
	}
	return extoid;
}

bool
qes_worker_begin_xact(const char *activity)
{
	return OidIsValid(begin_xact(activity));
}

void
qes_worker_end_xact(void)
{
	if (xact_spi)
		SPI_finish();
	xact_spi = false;
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* extension OID whose queues were reclaimed by this worker process */
static Oid	reclaimed_for = InvalidOid;

/*
 * One loop of work, in its own transaction.  Returns false when there is
 * nothing for the outbox to do (no extension, paused); *next_due_ms is how
 * long until an outbox request is due (-1: none is pending).
 */
static bool
worker_loop_once(long *next_due_ms)
{
	Oid			extoid;
	int64		reclaimed = 0;
	bool		did_reclaim = false;
	bool		active;

	*next_due_ms = -1;
	extoid = begin_xact("qes_billing worker loop");
	/* paused for maintenance: heartbeat only */
	active = OidIsValid(extoid) && !qes_worker_paused;
	if (active)
	{
		bool		isnull;
		Datum		d;

		/* crash reconciliation, once per incarnation of the extension */
		if (extoid != reclaimed_for)
		{
			reclaimed = run_bigint("SELECT billing.worker_reclaim()");
			did_reclaim = true;
			if (reclaimed > 0)
				ereport(LOG,
						(errmsg("qes_billing worker reclaimed " INT64_FORMAT " queue rows left in flight",
								reclaimed)));
		}
		if (SPI_execute("SELECT applied, outbox_due_s FROM billing.worker_tick()", false, 1) != SPI_OK_SELECT ||
			SPI_processed != 1)
			elog(ERROR, "qes_billing worker: billing.worker_tick() did not return one row");
		/* a full batch of events: there may be more, loop again at once */
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		if (!isnull && DatumGetInt64(d) >= QES_TICK_BATCH)
			SetLatch(MyLatch);
		/* when the outbox has its next request due */
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
		if (!isnull)
		{
			double		due_s = DatumGetFloat8(d);

			*next_due_ms = due_s <= 0 ? 0 : (long) Min(ceil(due_s * 1000.0), (double) INT_MAX);
		}
	}
	qes_worker_end_xact();

	if (did_reclaim)
		reclaimed_for = extoid;

	LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
	qes_worker_state->extension_present = OidIsValid(extoid);
	qes_worker_state->reclaimed += reclaimed;
	LWLockRelease(qes_worker_state->lock);
	return active;
}

void
qes_worker_main(Datum main_arg)
{
	MemoryContext loop_context;
	volatile int wake_reason = WL_LATCH_SET;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(qes_database, NULL, 0);
	pgstat_report_appname(QES_WORKER_NAME);

	LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
	qes_worker_state->pid = MyProcPid;
	qes_worker_state->latch = MyLatch;
	qes_worker_state->started_at = GetCurrentTimestamp();
	qes_worker_state->naptime_ms = qes_worker_naptime_ms;
	LWLockRelease(qes_worker_state->lock);
	before_shmem_exit(worker_detach, (Datum) 0);

	ereport(LOG,
			(errmsg("qes_billing worker started in database \"%s\"", qes_database)));

	loop_context = AllocSetContextCreate(TopMemoryContext,
										 "qes_billing worker loop",
										 ALLOCSET_DEFAULT_SIZES);
	qes_worker_loop_context = loop_context;

	for (;;)
	{
		MemoryContext oldcontext;
		uint64		wakes = pg_atomic_read_u64(&qes_worker_state->wake_requests);
		long		next_due_ms = -1;
		volatile bool busy = false;
		long		timeout;
		TimestampTz loop_started = GetCurrentTimestamp();

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		oldcontext = MemoryContextSwitchTo(loop_context);
		PG_TRY();
		{
			if (worker_loop_once(&next_due_ms))
			{
				if (next_due_ms == 0)
					qes_outbox_wake();
				/* the outbox, for a slice of time; then the loop again */
				busy = qes_outbox_pump(QES_PUMP_SLICE_MS);
				/* notifications (src/notify.c); lowers next_due_ms to theirs */
				busy |= qes_notify_pump(QES_PUMP_SLICE_MS, &next_due_ms);
			}
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			/* restore state: log, remember, abort the loop's transaction */
			MemoryContextSwitchTo(loop_context);
			edata = CopyErrorData();
			FlushErrorState();
			ereport(LOG,
					(errmsg("qes_billing worker loop failed: %s", qes_redact_cstring(edata->message))));
			qes_worker_note_error(edata->message);
			AbortCurrentTransaction();
			pgstat_report_activity(STATE_IDLE, NULL);
		}
		PG_END_TRY();
		MemoryContextSwitchTo(oldcontext);
		MemoryContextReset(loop_context);

		LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
		qes_worker_state->loops++;
		qes_worker_state->wakes_served = wakes;
		if (wake_reason & WL_LATCH_SET)
			qes_worker_state->latch_wakeups++;
		else
			qes_worker_state->timeout_wakeups++;
		qes_worker_state->last_loop_at = GetCurrentTimestamp();
		qes_worker_state->naptime_ms = qes_worker_naptime_ms;
		LWLockRelease(qes_worker_state->lock);

		/*
		 * Coalesce wake-ups: every commit that queues work sets our latch,
		 * thousands of times a second under load, and a loop costs a
		 * transaction.  Unless busy, loops start at most every
		 * QES_MIN_LOOP_MS; what arrives meanwhile is taken by the next one.
		 */
		if (!busy)
		{
			long		since = TimestampDifferenceMilliseconds(loop_started, GetCurrentTimestamp());

			if (since < QES_MIN_LOOP_MS)
				(void) WaitLatch(NULL, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, QES_MIN_LOOP_MS - since,
								 PG_WAIT_EXTENSION);
		}

		/* sleep until woken, the naptime, or the next retry is due */
		timeout = busy ? qes_outbox_busy_wait_ms() : qes_worker_naptime_ms;
		if (!busy && next_due_ms >= 0 && next_due_ms < timeout)
			timeout = next_due_ms;
		wake_reason = WaitLatch(MyLatch,
								WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								timeout,
								PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		if (wake_reason & WL_LATCH_SET)
			qes_outbox_wake();
	}
}
