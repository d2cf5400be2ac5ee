/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The qes_billing background worker: a latch loop.
 *
 * One worker per cluster, connected to qes_billing.database.  It sleeps on
 * its latch; backends that queue work set the latch when their transaction
 * COMMITs (qes_wake_at_commit), never before and never on abort.
 *
 * Idle is free (docs/architecture.md, rule 14): the worker runs a transaction only when
 * it has something to do -- it was woken by a commit, or the time has come
 * that its last tick said the next work is due (an event or a request
 * retried with backoff, a request in flight too long, a prepared
 * transaction that may hold queued work, the hourly housekeeping).  Other
 * naptime wake-ups only publish a heartbeat.
 *
 * A tick runs in its own short transaction (docs/architecture.md, rule 3): it finds the
 * extension (it may not exist yet, or may be dropped and created again while
 * we run; a share lock on the extension object keeps DROP EXTENSION from
 * deadlocking with us), reclaims work left in flight by a crash once per
 * incarnation of the extension, applies due events and runs the timers.  An
 * error in a loop is logged, kept for the worker_state() view, and the loop
 * goes on.
 *
 * The library and the extension's SQL are updated apart (docs/operations.md,
 * "Upgrades"): after the new library is installed and the server
 * restarted, the database keeps the old version's SQL until ALTER
 * EXTENSION qes_billing UPDATE, and the worker's calls would not match it.
 * Until the versions agree the worker only keeps its heartbeat (and looks
 * again every naptime, in a transaction that reads pg_extension and nothing
 * else); it says why once in the log and in worker_state().last_error, and
 * resumes by itself when the update commits.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "commands/trigger.h"
#include <limits.h>
#include <math.h>

#include "fence.h"
#include "guc.h"
#include "guard.h"
#include "notify.h"
#include "outbox.h"
#include "outbox_lane.h"
#include "redact.h"
#include "shmem.h"
#include "worker.h"
#include "worker_http.h"
#include "worker_xact.h"

/*
 * Events billing.worker_tick() applies per transaction.  Each is applied in a
 * subtransaction that takes an xid of its own, and a backend's PGPROC
 * caches only PGPROC_MAX_CACHED_SUBXIDS (64) of them: one more, and every
 * snapshot taken anywhere in the cluster must look into pg_subtrans while
 * the transaction runs.  A full batch is followed by another transaction at
 * once.
 */
#define QES_TICK_BATCH 50
/* longest time the pumps run before the loop's other work gets a turn */
#define QES_PUMP_SLICE_MS 200
/* shortest time between the starts of two loops when not busy */
#define QES_MIN_LOOP_MS 5
/* the tick runs at least this often: the usage counter sweep */
#define QES_HOUSEKEEPING_MS (3600 * 1000)

PG_FUNCTION_INFO_V1(qes_worker_state_fn);
PG_FUNCTION_INFO_V1(qes_wake_worker_trigger);
PG_FUNCTION_INFO_V1(qes_wake_worker);

/* ---- waking the worker at commit --------------------------------------- */

static bool wake_pending = false;
/* ... and the transaction queued a Stripe request (src/outbox.c claims it first) */
static bool wake_outbox_pending = false;
/* ... and work other than Stripe requests (the tick looks for it) */
static bool wake_other_pending = false;
/* true in the worker process itself */
static bool am_worker = false;

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
				if (wake_outbox_pending)
					pg_atomic_fetch_add_u64(&qes_worker_state->outbox_wakes, 1);
				/* (counted before wake_requests: see wake_for_outbox_only) */
				if (wake_other_pending)
					pg_atomic_fetch_add_u64(&qes_worker_state->other_wakes, 1);
				wake_outbox_pending = false;
				wake_other_pending = false;
				qes_set_worker_latch();
			}
			break;
		case XACT_EVENT_PREPARE:
			/*
			 * The work becomes visible at COMMIT PREPARED, which wakes nobody:
			 * wake the worker now, so that its tick sees a prepared
			 * transaction and looks again every naptime while one exists.
			 */
			if (wake_pending)
			{
				wake_pending = false;
				wake_outbox_pending = false;
				wake_other_pending = false;
				pg_atomic_fetch_add_u64(&qes_worker_state->other_wakes, 1);
				qes_set_worker_latch();
			}
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			wake_pending = false;
			wake_outbox_pending = false;
			wake_other_pending = false;
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
	wake_other_pending = true;
}

/*
 * billing.wake_worker_on_commit(): statement-level AFTER INSERT and AFTER
 * UPDATE trigger on the queues.  The worker's own UPDATEs do not wake it
 * (every tick updates the queues, and would wake it for the next, for
 * ever): the tick itself says when what they changed falls due.  Rows it
 * inserts (a request a handler queues, a notification) wake it as anyone's
 * do.
 */
Datum
qes_wake_worker_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("wake_worker_on_commit() must be called as a trigger")));
	if (!am_worker || TRIGGER_FIRED_BY_INSERT(((TriggerData *) fcinfo->context)->tg_event))
	{
		/* a Stripe request: the worker claims it before anything else */
		if (strcmp(RelationGetRelationName(((TriggerData *) fcinfo->context)->tg_relation),
				   "stripe_requests") == 0)
		{
			wake_pending = true;
			/*
			 * (unless the direct lane took it: then the worker is woken for
			 * the lane, and there is nothing to claim, src/outbox_lane.c)
			 */
			if (!(TRIGGER_FIRED_BY_INSERT(((TriggerData *) fcinfo->context)->tg_event) &&
				  qes_lane_take_insert()))
				wake_outbox_pending = true;
		}
		else
			qes_wake_at_commit();
	}
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
	Datum		values[16];
	bool		nulls[16];
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
	values[13] = Int64GetDatum((int64) copy.xacts);
	values[14] = Int32GetDatum(copy.max_subxids);
	values[15] = Int64GetDatum((int64) copy.subxid_overflows);

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
	/* nothing may take the lane while no worker sends (src/outbox_lane.c) */
	qes_lane_publish(false, InvalidOid);
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

/* ---- the extension's version ------------------------------------------- */

/*
 * The version of the extension's SQL (pg_extension.extversion) whose
 * mismatch with QES_VERSION paused the worker, or "" when none did.
 * ALTER EXTENSION UPDATE keeps the extension's OID, so the version is read
 * on every tick.
 */
static char paused_for_version[NAMEDATALEN] = "";
static char paused_message[QES_LAST_ERROR_LEN] = "";

/* pg_extension.extversion of the extension extoid, palloc'd; NULL if gone */
static char *
extension_version(Oid extoid)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	char	   *version = NULL;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, Anum_pg_extension_extversion, RelationGetDescr(rel), &isnull);

		if (!isnull)
			version = text_to_cstring(DatumGetTextPP(d));
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return version;
}

/*
 * Whether the extension's SQL is the version this library was built for.
 * On a change either way, say so once: in the log, and in last_error while
 * paused (cleared on resuming unless another error replaced it).
 */
static bool
extension_version_matches(Oid extoid)
{
	char	   *version = extension_version(extoid);

	if (version != NULL && strcmp(version, QES_VERSION) == 0)
	{
		if (paused_for_version[0] != '\0')
		{
			ereport(LOG,
					(errmsg("qes_billing worker resumed: extension qes_billing in database \"%s\" is version %s now",
							qes_database, version)));
			LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
			if (strcmp(qes_worker_state->last_error, paused_message) == 0)
			{
				qes_worker_state->last_error[0] = '\0';
				qes_worker_state->last_error_at = 0;
			}
			LWLockRelease(qes_worker_state->lock);
			paused_for_version[0] = '\0';
			paused_message[0] = '\0';
		}
		return true;
	}

	if (version == NULL)
		version = "(none)";
	if (strcmp(paused_for_version, version) != 0)
	{
		strlcpy(paused_for_version, version, sizeof(paused_for_version));
		snprintf(paused_message, sizeof(paused_message),
				 "paused: extension qes_billing is version %s in database \"%s\", the library is version %s; "
				 "run ALTER EXTENSION qes_billing UPDATE",
				 version, qes_database, QES_VERSION);
		ereport(LOG,
				(errmsg("qes_billing worker paused: extension qes_billing in database \"%s\" is version %s, the library is version %s",
						qes_database, version, QES_VERSION),
				 errdetail("The worker does no work until the extension's SQL matches the library; it keeps its heartbeat and looks again every qes_billing.worker_naptime."),
				 errhint("Run ALTER EXTENSION qes_billing UPDATE in database \"%s\"; the worker resumes when it commits.",
						 qes_database)));
		qes_worker_note_error(paused_message);
	}
	return false;
}

/* what a tick tells the loop */
typedef struct TickResult
{
	bool		active;			/* an extension to serve, not paused */
	bool		mismatch;		/* paused: the extension is another version */
	bool		full;			/* a full batch of events: more may be due */
	double		outbox_due_s;	/* until an outbox request is due; < 0: none */
	double		next_due_s;		/* until the tick has work again; < 0: none */
} TickResult;

static double
get_float8(int col, double if_null)
{
	bool		isnull;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col, &isnull);

	return isnull ? if_null : Max(0.0, DatumGetFloat8(d));
}

/* billing.worker_reclaim, with what shared memory says of this start */
typedef struct ReclaimCall
{
	bool		lost;			/* not a clean start (shmem.c) */
	TimestampTz lost_after;
	TimestampTz started_at;
	int64		reclaimed;		/* out */
} ReclaimCall;

static void
reclaim_now(void *arg)
{
	ReclaimCall *rc = (ReclaimCall *) arg;
	Oid			types[2] = {TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		args[2] = {TimestampTzGetDatum(rc->lost_after), TimestampTzGetDatum(rc->started_at)};
	bool		isnull;

	if (SPI_execute_with_args(/* result: int8 */ "SELECT billing.worker_reclaim($1, $2)",
							  2, types, args, rc->lost ? NULL : "nn", false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "qes_billing worker: billing.worker_reclaim() did not return one row");
	rc->reclaimed = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * The tick, in its own transaction: reconcile a new incarnation, apply due
 * events (billing.worker_tick), and learn when there is work again.
 */
static void
worker_tick(TickResult *r)
{
	Oid			extoid;
	int64		reclaimed = 0;
	bool		did_reclaim = false;
	bool		was_unclean = false;

	r->active = false;
	r->mismatch = false;
	r->full = false;
	r->outbox_due_s = -1;
	r->next_due_s = -1;

	extoid = qes_worker_begin_xact("qes_billing worker loop");
	/* paused for maintenance: heartbeat only */
	r->active = OidIsValid(extoid) && !qes_worker_paused;
	/* the extension's SQL of another version: heartbeat only, until updated */
	if (r->active && !extension_version_matches(extoid))
	{
		r->active = false;
		r->mismatch = true;
	}
	if (r->active)
	{
		Oid			argtypes[1] = {INT4OID};
		Datum		args[1] = {Int32GetDatum(QES_TICK_BATCH)};
		bool		isnull;
		Datum		d;

		/* crash reconciliation, once per incarnation of the extension */
		if (extoid != qes_worker_incarnation())
		{
			ReclaimCall rc;

			LWLockAcquire(qes_worker_state->lock, LW_SHARED);
			rc.lost = qes_worker_state->claims_may_be_lost;
			rc.lost_after = qes_worker_state->lost_after;
			rc.started_at = qes_worker_state->unclean_started_at;
			LWLockRelease(qes_worker_state->lock);
			/*
			 * (After a start in recovery -- a standby, a restored backup --
			 * started_at is infinity: every row made before this reclaim is
			 * taken as possibly sent; shmem.c.)  Exempt from partition fences: it finishes work begun before
			 * any fence (rows left in flight, requests lost work may have
			 * sent), and a tenant's moving partition must not stop the
			 * worker for every other tenant (src/fence.c).
			 */
			qes_fence_exempt_call(reclaim_now, &rc);
			reclaimed = rc.reclaimed;
			was_unclean = rc.lost;
			did_reclaim = true;
			if (reclaimed > 0)
				ereport(LOG,
						(errmsg("qes_billing worker reclaimed " INT64_FORMAT " queue rows left in flight",
								reclaimed)));
		}
		if (SPI_execute_with_args(/* result: int8, float8, float8 */ "SELECT applied, outbox_due_s, next_due_s FROM billing.worker_tick($1)",
								  1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT ||
			SPI_processed != 1)
			elog(ERROR, "qes_billing worker: billing.worker_tick() did not return one row");
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		r->full = !isnull && DatumGetInt64(d) >= QES_TICK_BATCH;
		r->outbox_due_s = get_float8(2, -1);
		r->next_due_s = get_float8(3, -1);
	}
	qes_worker_end_xact();

	if (did_reclaim)
		qes_worker_set_incarnation(extoid);
	/* reconcile the queues again once the versions agree (the same OID) */
	if (r->mismatch)
		qes_worker_set_incarnation(InvalidOid);

	LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
	qes_worker_state->extension_present = OidIsValid(extoid);
	qes_worker_state->reclaimed += reclaimed;
	/* committed: the rows it dated keep their dates */
	if (did_reclaim)
		qes_worker_state->claims_may_be_lost = false;
	LWLockRelease(qes_worker_state->lock);
	if (did_reclaim && was_unclean)
		qes_unclean_start_done();
}

/*
 * The tick by the time the outbox wants it, if earlier (an answer it could
 * not record: its row must be reclaimed once stale); take clears the wish,
 * now merged into the loop's own schedule.
 */
static TimestampTz
earliest_tick(TimestampTz tick_at, bool take)
{
	TimestampTz wanted = qes_outbox_tick_wanted(take);

	return (wanted != 0 && wanted < tick_at) ? wanted : tick_at;
}

/*
 * Refused webhook deliveries are counted in shared memory (src/guard.c);
 * write them (one row and one audit row per reason) at most once a
 * minute, and only when something was counted: idle stays free.
 */
#define QES_REJECTION_FLUSH_MS (60 * 1000)
static TimestampTz last_rejection_flush = 0;

static long
rejection_flush_wait_ms(TimestampTz now)
{
	if (!qes_guard_rejections_pending())
		return -1;
	if (last_rejection_flush == 0)
		return 0;
	return Max(0, QES_REJECTION_FLUSH_MS - TimestampDifferenceMilliseconds(last_rejection_flush, now));
}

static void
flush_rejections_if_due(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (rejection_flush_wait_ms(now) != 0)
		return;
	last_rejection_flush = now;
	if (OidIsValid(qes_worker_begin_xact("qes_billing worker: writing refused webhook deliveries")))
		(void) run_bigint(/* result: int8 */ "SELECT billing.flush_webhook_rejections()");
	qes_worker_end_xact();
}

/*
 * CHECK_FOR_INTERRUPTS, but asked to stop (SIGTERM: a shutdown, or
 * pg_terminate_backend) the outbox first records the answers that came in
 * (src/outbox.c, "Recording later").
 */
static void
worker_check_for_interrupts(void)
{
	/*
	 * (The request is set aside while the answers are recorded, and stands
	 * again after: holding interrupts would not do, for any error raised
	 * and caught on the way -- a subtransaction's -- ends the holdoff.)
	 */
	if (ProcDiePending && !IsTransactionState())
	{
		ProcDiePending = false;
		qes_outbox_flush_answers();
		ProcDiePending = true;
		InterruptPending = true;
	}
	CHECK_FOR_INTERRUPTS();
}

/*
 * The pumps, for at most budget_ms: turn by turn, each records what came
 * back and claims what takes its place (the outbox first: a Stripe request
 * a commit queued goes before anything else), and between turns the loop
 * waits on curl's sockets and the latch together (src/worker_http.c, which
 * hands each finished transfer back to its pump).  Returns early when the
 * latch is set (new work for the tick), or when nothing is in flight and no
 * turn got anywhere.  With notify_due_ms NULL only the outbox is turned.
 * Returns true when a pump has transfers in flight or more may be due, so
 * the loop must not sleep.
 */
static bool
run_pumps(long budget_ms, long *notify_due_ms)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), budget_ms);

	for (;;)
	{
		bool		busy;
		bool		progress;
		long		left_ms;
		long		pace_ms;

		worker_check_for_interrupts();
		qes_http_drive();
		busy = qes_outbox_pump(&progress);
		if (notify_due_ms != NULL)
		{
			bool		notified;

			*notify_due_ms = -1;
			busy |= qes_notify_pump(notify_due_ms, &notified);
			progress |= notified;
		}
		if (progress)
			continue;			/* claimed (on the wire at once) or recorded */
		left_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (qes_http_in_flight() == 0 || left_ms <= 0 || MyLatch->is_set)
			return busy;
		/* (a paced outbox turn may be due before any answer comes) */
		pace_ms = qes_outbox_pace_wait_ms();
		if (pace_ms > 0)
			left_ms = Min(left_ms, pace_ms);
		qes_http_wait(left_ms);
	}
}

/*
 * Did only commits that queued Stripe requests (and nothing else) wake us
 * since the last loop?  Then the outbox's fast path claims them and the
 * tick (inbox, timers, meters: a transaction of a dozen statements) has
 * nothing new to look at: at low load that tick was most of the worker's
 * CPU per request.  A commit that queued anything else counts other_wakes
 * before wake_requests, and wakes was read before other_wakes here: a
 * commit whose wake_requests is in wakes has its other_wakes counted by
 * the time we read it.  A latch set without a new wake-up (a signal) is
 * not "only the outbox" either.
 */
static uint64 wakes_seen = 0;
static uint64 other_seen = 0;

static bool
wake_for_outbox_only(uint64 wakes)
{
	uint64		other;
	bool		result;

	pg_read_barrier();
	other = pg_atomic_read_u64(&qes_worker_state->other_wakes);
	result = wakes != wakes_seen && other == other_seen;
	wakes_seen = wakes;
	other_seen = other;
	return result;
}

static long
ms_until(TimestampTz t, TimestampTz now)
{
	return t <= now ? 0 : TimestampDifferenceMilliseconds(now, t);
}

static TimestampTz
plus_seconds(TimestampTz now, double s)
{
	return now + (TimestampTz) Min(s * USECS_PER_SEC, (double) QES_HOUSEKEEPING_MS * 1000);
}

void
qes_worker_main(Datum main_arg)
{
	MemoryContext loop_context;
	volatile int wake_reason = WL_LATCH_SET;
	volatile bool tick_now = true;	/* the first loop looks */
	volatile bool active = false;	/* the last tick found an extension to serve */
	volatile TimestampTz tick_at = 0;	/* when the tick has work again */

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(qes_database, NULL, 0);
	pgstat_report_appname(QES_WORKER_NAME);
	am_worker = true;

#ifdef __GLIBC__

	/*
	 * Keep the heap this process frees instead of handing it back to the
	 * kernel at once.  Every turn of the loop creates and deletes memory
	 * contexts (a transaction's, a statement's), and with glibc's default
	 * trim threshold each turn shrank the heap and grew it again: nine
	 * brk() calls per Stripe request at low load, each followed by page
	 * faults and TLB flushes when the memory was touched again, 7 % of the
	 * worker's CPU samples (README.md, "Performance").  Up to 16 MB free at
	 * the top of the heap stay there.  Fixing these turns off glibc's
	 * sliding mmap threshold, so it is fixed too, at 4 MB: a block below
	 * that (a large answer, a context's bigger blocks) comes from the heap
	 * and is kept for reuse, not mapped and unmapped each time.
	 */
	mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024);
	mallopt(M_TOP_PAD, 4 * 1024 * 1024);
	mallopt(M_TRIM_THRESHOLD, 16 * 1024 * 1024);
#endif

	LWLockAcquire(qes_worker_state->lock, LW_EXCLUSIVE);
	qes_worker_state->pid = MyProcPid;
	qes_worker_state->latch = MyLatch;
	qes_worker_state->started_at = GetCurrentTimestamp();
	qes_worker_state->naptime_ms = qes_worker_naptime_ms;
	LWLockRelease(qes_worker_state->lock);
	qes_lane_worker_start();
	before_shmem_exit(worker_detach, (Datum) 0);

	ereport(LOG,
			(errmsg("qes_billing worker started in database \"%s\"", qes_database)));

	loop_context = AllocSetContextCreate(TopMemoryContext,
										 "qes_billing worker loop",
										 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		MemoryContext oldcontext;
		uint64		wakes = pg_atomic_read_u64(&qes_worker_state->wake_requests);
		long		notify_due_ms = -1;
		volatile bool busy = false;
		volatile bool more = false;
		long		timeout;
		long		stats_ms;
		TimestampTz loop_started = GetCurrentTimestamp();
		volatile bool outbox_only;

		worker_check_for_interrupts();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			tick_now = true;	/* paused, resumed, keys, timeouts: look again */
		}
		/* a commit woke us, or work falls due: otherwise no transaction */
		tick_at = earliest_tick(tick_at, true);
		outbox_only = (wake_reason & WL_LATCH_SET) && wake_for_outbox_only(wakes);
		if (((wake_reason & WL_LATCH_SET) && !outbox_only) || loop_started >= tick_at)
			tick_now = true;

		oldcontext = MemoryContextSwitchTo(loop_context);
		PG_TRY();
		{
			/*
			 * A commit that queued a Stripe request woke us: it is claimed and
			 * sent before the tick (src/outbox.c), so that it is on the wire
			 * a millisecond or so after that commit.
			 */
			if (active && !qes_worker_paused && (wake_reason & WL_LATCH_SET))
				(void) run_pumps(0, NULL);
			/* woken for requests that were not claimed (the rate, say): the tick decides */
			if (outbox_only && (!active || qes_worker_paused || qes_http_in_flight() == 0))
				tick_now = true;
			if (tick_now)
			{
				TickResult	r;
				TimestampTz now;

				tick_now = false;
				worker_tick(&r);
				now = GetCurrentTimestamp();
				active = r.active;
				more = r.full;
				tick_at = TimestampTzPlusMilliseconds(now, QES_HOUSEKEEPING_MS);
				if (r.next_due_s >= 0)
					tick_at = plus_seconds(now, r.next_due_s);
				/* waiting for ALTER EXTENSION UPDATE: look again each naptime */
				if (r.mismatch)
					tick_at = TimestampTzPlusMilliseconds(now, qes_worker_naptime_ms);
				if (active)
					qes_outbox_set_due(r.outbox_due_s);
			}
			/* no extension to serve, or paused: the direct lane closes (outbox.c opens it) */
			if (!active || qes_worker_paused)
				qes_lane_publish(false, InvalidOid);
			if (active)
			{
				/*
				 * the outbox and the notifications (src/notify.c), for a
				 * slice of time; then the loop again
				 */
				busy = run_pumps(QES_PUMP_SLICE_MS, &notify_due_ms);
				/* refused webhook deliveries, about once a minute */
				flush_rejections_if_due();
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
					(errmsg("qes_billing worker loop failed: %s", qes_redact_secrets(edata->message))));
			/* an error outside a transaction leaves no LWLock held either */
			LWLockReleaseAll();
			qes_worker_note_error(edata->message);
			qes_worker_abort_xact();
			/* try again after the naptime (or when woken) */
			tick_now = false;
			more = false;
			busy = false;
			tick_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), qes_worker_naptime_ms);
		}
		PG_END_TRY();
		MemoryContextSwitchTo(oldcontext);
		MemoryContextReset(loop_context);

		/* the worker's own statistics (a background worker must send them) */
		stats_ms = pgstat_report_stat(false);

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
		if (!busy && !more)
		{
			long		since = TimestampDifferenceMilliseconds(loop_started, GetCurrentTimestamp());

			if (since < QES_MIN_LOOP_MS)
				(void) WaitLatch(NULL, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, QES_MIN_LOOP_MS - since,
								 PG_WAIT_EXTENSION);
		}

		/*
		 * Sleep until woken, or until work is due: a full batch of events
		 * goes on at once; otherwise the next tick, outbox claim or
		 * notification, within the naptime (a heartbeat, no transaction).
		 */
		if (more)
		{
			tick_now = true;
			timeout = 0;
		}
		else if (busy)
			timeout = qes_outbox_busy_wait_ms();
		else
		{
			TimestampTz now = GetCurrentTimestamp();
			long		claim_ms = qes_outbox_claim_wait_ms();

			tick_at = earliest_tick(tick_at, false);
			timeout = Min(qes_worker_naptime_ms, ms_until(tick_at, now));
			if (claim_ms >= 0)
				timeout = Min(timeout, claim_ms);
			if (notify_due_ms >= 0)
				timeout = Min(timeout, notify_due_ms);
			if (active && rejection_flush_wait_ms(now) >= 0)
				timeout = Min(timeout, rejection_flush_wait_ms(now));
			if (stats_ms > 0)
				timeout = Min(timeout, stats_ms);
		}
		wake_reason = WaitLatch(MyLatch,
								WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								timeout,
								PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
