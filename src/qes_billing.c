/*-------------------------------------------------------------------------
 *
 * qes_billing.c
 *	  Module entry point: settings, shared memory and the worker.
 *
 * The library must be in shared_preload_libraries: it owns shared memory
 * and a background worker, both of which exist only when the postmaster
 * loads it.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "catalog_cache.h"
#include "counters.h"
#include "fence.h"
#include "guard.h"
#include "guc.h"
#include "insert_once.h"
#include "outbox_lane.h"
#include "redact.h"
#include "shmem.h"
#include "usage.h"
#include "usage_store.h"
#include "worker.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

PG_FUNCTION_INFO_V1(qes_invalidate_cache_trigger);
PG_FUNCTION_INFO_V1(qes_usage_changed_trigger);
PG_FUNCTION_INFO_V1(qes_reset_caches);

/*
 * One transaction callback for the module: deltas, cache invalidations and
 * wake-ups take effect at COMMIT and are forgotten on abort.
 */
static void
qes_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_PREPARE:
			qes_counters_refuse_prepare();
			qes_fence_refuse_prepare();
			qes_guard_refuse_prepare();
			break;
		case XACT_EVENT_PRE_COMMIT:
			qes_counters_pre_commit();
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			qes_counters_at_commit();
			qes_fence_at_xact_end(true);
			qes_guard_at_commit();
			qes_insert_once_at_xact_end();
			qes_usage_at_xact_end();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			qes_usage_inserting = false;
			qes_insert_once_at_xact_end();
			qes_usage_at_xact_end();
			qes_counters_at_abort();
			qes_fence_at_xact_end(true);
			qes_guard_at_abort();
			break;
		default:
			break;
	}
	/* (the lane stamps its slots before the worker is woken) */
	qes_lane_xact_event(event);
	qes_wake_xact_event(event);
}

static void
qes_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
					 SubTransactionId parentSubid, void *arg)
{
	switch (event)
	{
		case SUBXACT_EVENT_ABORT_SUB:
			qes_usage_inserting = false;
			qes_counters_at_subabort(mySubid);
			qes_fence_at_xact_end(false);
			qes_guard_at_subabort(mySubid);
			qes_lane_subxact_abort(mySubid);
			break;
		case SUBXACT_EVENT_COMMIT_SUB:
			qes_counters_at_subcommit(mySubid, parentSubid);
			break;
		default:
			break;
	}
}

/*
 * billing.invalidate_cache_on_commit(): statement trigger on the tables the
 * backends cache (plans, limits, prices, metrics, clock, tenants,
 * subscriptions): a relcache invalidation of the table, which PostgreSQL
 * sends at commit (and COMMIT PREPARED, and replays on standbys).
 */
Datum
qes_invalidate_cache_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("invalidate_cache_on_commit() must be called as a trigger")));
	qes_catalog_invalidate_rel(((TriggerData *) fcinfo->context)->tg_relation);
	return PointerGetDatum(NULL);
}

/*
 * billing.usage_changed(): statement trigger for INSERT, UPDATE, DELETE and
 * TRUNCATE of billing.usage_events -- the cached counters are rebuilt from
 * the table after this commits.  record_usage's own INSERT is the one
 * change the counters follow by themselves (its delta is added at commit).
 */
Datum
qes_usage_changed_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("usage_changed() must be called as a trigger")));
	if (!(TRIGGER_FIRED_BY_INSERT(((TriggerData *) fcinfo->context)->tg_event) && qes_usage_inserting))
	{
		qes_counters_reset_at_commit();
		/*
		 * usage inserted or truncated by hand: a partition move must copy
		 * all of it (updates and deletes are seen row by row: fence.c)
		 */
		if (TRIGGER_FIRED_BY_INSERT(((TriggerData *) fcinfo->context)->tg_event) ||
			TRIGGER_FIRED_BY_TRUNCATE(((TriggerData *) fcinfo->context)->tg_event))
			qes_fence_note_untracked_usage_write();
	}
	return PointerGetDatum(NULL);
}

/*
 * billing.reset_caches(): forget all cached counters and catalog data when
 * the transaction commits (run by CREATE EXTENSION).
 */
Datum
qes_reset_caches(PG_FUNCTION_ARGS)
{
	qes_counters_reset_at_commit();
	qes_catalog_invalidate_all();
	PG_RETURN_VOID();
}

void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("qes_billing must be loaded via shared_preload_libraries"),
				 errdetail("It needs shared memory and a background worker, which only the server can set up at start."),
				 errhint("Add qes_billing to shared_preload_libraries in postgresql.conf and restart the server.")));

	qes_define_gucs();
	qes_redact_install_log_hook();
	qes_shmem_init();
	qes_counters_register_rmgr();
	qes_register_worker();
	RegisterXactCallback(qes_xact_callback, NULL);
	RegisterSubXactCallback(qes_subxact_callback, NULL);
	qes_catalog_register_callback();
	qes_insert_once_init();
	qes_usage_init();
}
