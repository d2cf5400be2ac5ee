/*-------------------------------------------------------------------------
 *
 * usage.c
 *	  record_usage and check_limit: the hot paths.
 *
 * record_usage inserts one row into billing.usage_events in the caller's
 * transaction (so the billable action and its usage commit or roll back
 * together) and queues the delta for the shared counter, applied at COMMIT
 * (counters.c).  The same (tenant_id, idempotency_key) is counted once,
 * forever: the primary key refuses a second row and the original result is
 * returned.  check_limit reads the committed counter and the plan's limits
 * from the backend's catalog cache (catalog_cache.c): no usage history is
 * read and no network is involved.
 *
 * Limits are soft: over the limit, the caller is told and offered the next
 * plan up; only a plan's optional hard ceiling blocks.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <math.h>

#include "access/xact.h"
#include "common/hashfn.h"
#include "common/int.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "catalog_cache.h"
#include "counters.h"
#include "fence.h"
#include "usage.h"
#include "usage_store.h"

#define QES_MAX_METADATA_BYTES	4096
#define QES_MAX_KEY_LEN			255
#define QES_FUTURE_SLACK_USEC	(5 * 60 * USECS_PER_SEC)

PG_FUNCTION_INFO_V1(qes_record_usage);
PG_FUNCTION_INFO_V1(qes_check_limit);
PG_FUNCTION_INFO_V1(qes_usage_current);
PG_FUNCTION_INFO_V1(qes_usage_period);

typedef enum
{
	ST_OK,
	ST_WARNING,
	ST_OVER_SOFT,
	ST_BLOCKED
} LimitStatus;

static const char *const status_names[] = {"ok", "warning", "over_soft_limit", "blocked"};

static LimitStatus
status_for(int64 amount, const QesLimit *l)
{
	if (!l->defined || l->unlimited)
		return ST_OK;
	if (l->hard_limit_pct > 0 && (double) amount * 100.0 > (double) l->soft_limit * l->hard_limit_pct)
		return ST_BLOCKED;
	if (amount > l->soft_limit)
		return ST_OVER_SOFT;
	if ((double) amount * 100.0 >= (double) l->soft_limit * 80.0)
		return ST_WARNING;
	return ST_OK;
}

/*
 * The functions' result descriptors, kept per backend: looking one up
 * (pg_proc, a descriptor built from its OUT parameters or its composite
 * type, blessed) cost check_limit about 1.5 % of its time when done per
 * call.  A pg_proc change (a function replaced), or a relcache
 * invalidation of a result's composite type (ALTER TYPE), makes them
 * stale; a stale one is freed at the end of the transaction (a call may
 * still be using it until then).
 */
#define QES_RESULT_DESCS 8

typedef struct ResultDesc
{
	Oid			fn_oid;
	Oid			typrelid;		/* the composite result type's relation, or 0 */
	TupleDesc	desc;
} ResultDesc;

static ResultDesc result_descs[QES_RESULT_DESCS];
static int	n_result_descs = 0;
static List *stale_result_descs = NIL;
static uint64 result_desc_invals = 0;

static void
forget_result_descs(Oid relid)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	int			kept = 0;

	result_desc_invals++;
	for (int i = 0; i < n_result_descs; i++)
	{
		if (!OidIsValid(relid) || result_descs[i].typrelid == relid)
			stale_result_descs = lappend(stale_result_descs, result_descs[i].desc);
		else
			result_descs[kept++] = result_descs[i];
	}
	n_result_descs = kept;
	MemoryContextSwitchTo(old);
}

static void
result_desc_proc_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	forget_result_descs(InvalidOid);
}

static void
result_desc_relcache_callback(Datum arg, Oid relid)
{
	if (n_result_descs > 0)
	{
		bool		ours = !OidIsValid(relid);

		for (int i = 0; i < n_result_descs && !ours; i++)
			ours = (result_descs[i].typrelid == relid);
		if (ours)
			forget_result_descs(relid);
	}
}

void
qes_usage_init(void)
{
	CacheRegisterSyscacheCallback(PROCOID, result_desc_proc_callback, (Datum) 0);
	CacheRegisterRelcacheCallback(result_desc_relcache_callback, (Datum) 0);
}

/* at the end of a transaction: no call uses a stale descriptor any more */
void
qes_usage_at_xact_end(void)
{
	ListCell   *lc;

	if (stale_result_descs == NIL)
		return;
	foreach(lc, stale_result_descs)
		FreeTupleDesc((TupleDesc) lfirst(lc));
	list_free(stale_result_descs);
	stale_result_descs = NIL;
}

static TupleDesc
result_desc(FunctionCallInfo fcinfo)
{
	Oid			fn = fcinfo->flinfo->fn_oid;
	TupleDesc	tupdesc;
	MemoryContext old;
	uint64		seen = result_desc_invals;
	Oid			typrelid;

	for (int i = 0; i < n_result_descs; i++)
		if (result_descs[i].fn_oid == fn)
			return result_descs[i].desc;
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	typrelid = get_typ_typrelid(get_func_rettype(fn));
	old = MemoryContextSwitchTo(TopMemoryContext);
	tupdesc = CreateTupleDescCopy(tupdesc);
	BlessTupleDesc(tupdesc);
	/* kept, unless it may already be stale (an invalidation while we looked) */
	if (n_result_descs < QES_RESULT_DESCS && result_desc_invals == seen)
	{
		result_descs[n_result_descs].fn_oid = fn;
		result_descs[n_result_descs].typrelid = typrelid;
		result_descs[n_result_descs].desc = tupdesc;
		n_result_descs++;
	}
	else
		stale_result_descs = lappend(stale_result_descs, tupdesc);
	MemoryContextSwitchTo(old);
	return tupdesc;
}

static void
require_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

static int
lookup_metric_or_error(const char *metric)
{
	int			m = qes_metric_lookup(metric);

	if (m < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown usage metric \"%s\"", metric),
				 errhint("Metrics are: %s.", qes_metric_names())));
	return m;
}

static void
tenant_plan_or_error(const char *tenant_id, TimestampTz at, QesTenantPlan *tp)
{
	qes_validate_tenant_id(tenant_id);
	if (!qes_tenant_plan(tenant_id, at, tp))
		ereport(ERROR,
				(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
				 errmsg("tenant \"%s\" is not registered", tenant_id),
				 errhint("Register the tenant first with billing.upsert_tenant().")));
}

/* ---- record_usage -------------------------------------------------------- */

static SPIPlanPtr notify_plan = NULL;

/* threshold-notice locks taken by this transaction (see queue_threshold) */
#define QES_MAX_NOTICE_LOCKS 64
static TransactionId notice_locks_xid = InvalidTransactionId;
static int	notice_locks = 0;

typedef struct UsageResult
{
	bool		recorded;
	bool		duplicate;
	char		metric[QES_METRIC_LEN];
	int64		quantity;
	TimestampTz period_start;
	TimestampTz period_end;
	int64		total;
	QesLimit	limit;			/* a copy: the cache may be reloaded before the answer is built */
} UsageResult;

/* "2026-11-01T00:00:00Z", whatever the session's DateStyle and TimeZone */
static char *
iso_utc(TimestampTz ts)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR, (errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE), errmsg("timestamp out of range")));
	return psprintf("%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year, tm.tm_mon, tm.tm_mday,
					tm.tm_hour, tm.tm_min, tm.tm_sec);
}

static void
queue_threshold(const char *tenant_id, const CounterKey *key, const QesTenantPlan *tp,
				int metric, int threshold, int64 total, const QesLimit *l)
{
	StringInfoData dedup;
	StringInfoData payload;
	Datum		values[3];
	char		isnull[3] = {' ', ' ', ' '};

	initStringInfo(&dedup);
	appendStringInfo(&dedup, "usage:%s:%s:%d", qes_metric(metric)->name,
					 iso_utc(tp->period_start), threshold);
	initStringInfo(&payload);
	appendStringInfoString(&payload, "{\"metric\": ");
	escape_json(&payload, qes_metric(metric)->name);
	appendStringInfo(&payload, ", \"threshold_percent\": %d, \"total\": " INT64_FORMAT
					 ", \"limit\": " INT64_FORMAT ", \"plan_id\": ",
					 threshold, total, l->soft_limit);
	escape_json(&payload, qes_plan(tp->plan)->plan_id);
	appendStringInfoString(&payload, ", \"period_start\": ");
	escape_json(&payload, iso_utc(tp->period_start));
	appendStringInfoString(&payload, "}");

	/*
	 * Another transaction queueing the same notice (it crossed the threshold
	 * too and has not committed) would make our INSERT wait for it -- and two
	 * recorders crossing two thresholds in opposite orders deadlock.  The
	 * notice is a side effect: never wait for it.  Whoever holds the lock
	 * queues it; if that transaction rolls back, the next record over the
	 * threshold queues it (the notified bit is set only at commit).
	 */
	if (notice_locks_xid != GetTopTransactionId())
	{
		notice_locks_xid = GetTopTransactionId();
		notice_locks = 0;
	}
	/*
	 * Each lock lasts until the transaction ends: a transaction that crosses
	 * thresholds for thousands of tenants (a bulk import) would fill the lock
	 * table, so past QES_MAX_NOTICE_LOCKS it inserts as before (and may wait).
	 */
	if (notice_locks < QES_MAX_NOTICE_LOCKS)
	{
		notice_locks++;
		if (!DatumGetBool(DirectFunctionCall1(pg_try_advisory_xact_lock_int8,
											  Int64GetDatum((int64) hash_bytes_extended((const unsigned char *) dedup.data,
																						  strlen(dedup.data),
																						  (uint64) hash_bytes((const unsigned char *) tenant_id,
																											  strlen(tenant_id)))))))
			return;
	}

	values[0] = CStringGetTextDatum(tenant_id);
	values[1] = CStringGetTextDatum(dedup.data);
	values[2] = DirectFunctionCall1(jsonb_in, CStringGetDatum(payload.data));
	if (SPI_execute_plan(notify_plan, values, isnull, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "qes_billing: could not queue a usage notification");
	/* queued now or earlier: either way it exists once this commits */
	qes_counter_notified_at_commit(key, threshold == 80 ? QES_NOTIFIED_80 : QES_NOTIFIED_100);
}

typedef struct ThresholdArgs
{
	const char *tenant_id;
	const CounterKey *key;
	const QesTenantPlan *tp;
	int			metric;
	int64		total;
	const QesLimit *l;
	uint8		notified;
} ThresholdArgs;

static void
queue_thresholds_cb(void *arg)
{
	ThresholdArgs *a = (ThresholdArgs *) arg;
	Oid			notify_types[3] = {TEXTOID, TEXTOID, JSONBOID};

	if (notify_plan == NULL)
	{
		notify_plan = SPI_prepare(/* result: none */ "INSERT INTO billing.notifications (tenant_id, kind, dedup_key, payload)"
								  " VALUES ($1, 'usage.threshold', $2, $3)"
								  " ON CONFLICT (tenant_id, dedup_key) DO NOTHING",
								  3, notify_types);
		if (notify_plan == NULL)
			elog(ERROR, "qes_billing: could not prepare the notification statement");
		SPI_keepplan(notify_plan);
	}
	if (!(a->notified & QES_NOTIFIED_80) && (double) a->total * 100.0 >= (double) a->l->soft_limit * 80.0)
		queue_threshold(a->tenant_id, a->key, a->tp, a->metric, 80, a->total, a->l);
	if (!(a->notified & QES_NOTIFIED_100) && a->total >= a->l->soft_limit)
		queue_threshold(a->tenant_id, a->key, a->tp, a->metric, 100, a->total, a->l);
}

/* The original result of a key recorded before; an error if it recorded other usage. */
static void
duplicate_result(const char *tenant_id, const char *idem_key, const char *metric_name,
				 int64 quantity, const UsageRow *existing, UsageResult *res)
{
	QesTenantPlan otp;

	if (strcmp(existing->metric, metric_name) != 0 || existing->quantity != quantity)
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("idempotency key \"%s\" was already used for different usage", idem_key),
				 errdetail("It recorded %s " INT64_FORMAT "; this call reports %s " INT64_FORMAT ".",
						   existing->metric, existing->quantity, metric_name, quantity),
				 errhint("Use a new idempotency key for each billable action.")));
	res->recorded = false;
	res->duplicate = true;
	res->quantity = existing->quantity;
	res->period_start = existing->period_start;
	res->total = existing->total_after;
	(void) qes_tenant_plan(tenant_id, existing->period_start, &otp);
	res->period_end = otp.period_end;
}

static void
record_one(const char *tenant_id, const char *metric_name, int64 quantity,
		   const char *idem_key, Jsonb *metadata, TimestampTz occurred_at,
		   UsageResult *res)
{
	QesTenantPlan tp;
	CounterKey	key;
	int			metric;
	bool		is_gauge;
	int64		committed;
	int64		own;
	bool		own_gauge;
	uint8		notified;
	int64		total;
	const QesLimit *l;
	UsageRow	row;
	UsageRow	existing;
	bool		overflow;
	bool		log_for_move;

	/* a tenant whose partition is moving or has moved is not written here */
	log_for_move = qes_fence_check_tenant(tenant_id);
	/* the caller refreshed the catalog cache */
	metric = lookup_metric_or_error(metric_name);
	is_gauge = qes_metric(metric)->is_gauge;
	if (is_gauge ? quantity < 0 : quantity <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid quantity " INT64_FORMAT " for metric \"%s\"", quantity, metric_name),
				 is_gauge ? errhint("\"%s\" is a gauge: report the current value, zero or more.", metric_name)
				 : errhint("\"%s\" is a counter: report how many were used, one or more.", metric_name)));
	if (strlen(idem_key) == 0 || strlen(idem_key) > QES_MAX_KEY_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid idempotency key"),
				 errhint("An idempotency key is 1 to %d characters, unique per tenant for each billable action.",
						 QES_MAX_KEY_LEN)));
	if (metadata != NULL)
	{
		if (VARSIZE(metadata) - VARHDRSZ > QES_MAX_METADATA_BYTES)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("usage metadata is too large (%d bytes)", (int) (VARSIZE(metadata) - VARHDRSZ)),
					 errhint("Keep metadata under %d bytes; store documents elsewhere and reference them.",
							 QES_MAX_METADATA_BYTES)));
		if (!JB_ROOT_IS_OBJECT(metadata))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("usage metadata must be a JSON object")));
	}
	if (occurred_at > qes_billing_now() + QES_FUTURE_SLACK_USEC)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("occurred_at is in the future"),
				 errdetail("occurred_at is %s; the billing clock reads %s.",
						   timestamptz_to_str(occurred_at), timestamptz_to_str(qes_billing_now())),
				 errhint("Record usage when it has happened; omit occurred_at to use the current time.")));
	tenant_plan_or_error(tenant_id, occurred_at, &tp);

	qes_counter_key(&key, tenant_id, metric_name, tp.period_start);
	committed = qes_counter_get(&key, is_gauge, tp.period_end, &notified);
	own = qes_counter_own_pending(&key, is_gauge, &own_gauge);
	overflow = false;
	if (is_gauge)
		total = quantity;
	else
		overflow = pg_add_s64_overflow(committed, own, &total) ||
			pg_add_s64_overflow(total, quantity, &total);
	l = qes_limit(tp.plan, metric);

	memset(res, 0, sizeof(*res));
	res->limit = *l;
	l = &res->limit;
	strlcpy(res->metric, metric_name, QES_METRIC_LEN);

	/*
	 * Counted once, forever: a key already recorded (also by a transaction
	 * that committed while our insert waited for it) returns its result.
	 */
	if (overflow)
	{
		if (qes_usage_find(tenant_id, idem_key, &existing))
		{
			duplicate_result(tenant_id, idem_key, metric_name, quantity, &existing, res);
			return;
		}
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("usage total of \"%s\" for tenant \"%s\" would overflow", metric_name, tenant_id),
				 errdetail("The period total is " INT64_FORMAT "; adding " INT64_FORMAT " exceeds " INT64_FORMAT ".",
						   committed, quantity, PG_INT64_MAX),
				 errhint("Nothing was recorded. Check the quantity: it is a count of uses, not an amount.")));
	}

	row.tenant_id = tenant_id;
	row.idempotency_key = idem_key;
	row.metric = metric_name;
	row.quantity = quantity;
	row.period_start = tp.period_start;
	row.occurred_at = occurred_at;
	row.metadata = metadata;
	row.total_after = total;
	if (!qes_usage_insert(&row))
	{
		if (!qes_usage_find(tenant_id, idem_key, &existing))
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("usage under idempotency key \"%s\" was removed while it was being recorded", idem_key),
					 errhint("Retry the transaction.")));
		duplicate_result(tenant_id, idem_key, metric_name, quantity, &existing, res);
		return;
	}

	if (log_for_move)
		qes_fence_log_usage(tenant_id, idem_key);
	res->recorded = true;
	res->quantity = quantity;
	res->period_start = tp.period_start;
	res->period_end = tp.period_end;
	res->total = total;
	qes_counter_add_at_commit(&key, is_gauge, quantity, occurred_at);

	/* thresholds: one notification each per tenant, metric and period */
	if (l->defined && !l->unlimited &&
		((!(notified & QES_NOTIFIED_80) && (double) total * 100.0 >= (double) l->soft_limit * 80.0) ||
		 (!(notified & QES_NOTIFIED_100) && total >= l->soft_limit)))
	{
		ThresholdArgs ta = {tenant_id, &key, &tp, metric, total, l, notified};

		qes_run_as_owner(queue_thresholds_cb, &ta);
	}
}

/*
 * billing.record_usage(tenant_id, metric, quantity, idempotency_key,
 *						metadata jsonb, occurred_at timestamptz)
 */
Datum
qes_record_usage(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	UsageResult res;
	Datum		values[10];
	bool		nulls[10] = {0};
	TimestampTz occurred_at;

	require_arg(fcinfo, 0, "tenant_id");
	require_arg(fcinfo, 1, "metric");
	require_arg(fcinfo, 2, "quantity");
	require_arg(fcinfo, 3, "idempotency_key");
	tupdesc = result_desc(fcinfo);
	/* it writes: 25006 in a read-only transaction, on a standby, when fenced */
	PreventCommandIfReadOnly("billing.record_usage()");

	qes_catalog_refresh();
	occurred_at = PG_ARGISNULL(5) ? qes_billing_now() : PG_GETARG_TIMESTAMPTZ(5);
	record_one(text_to_cstring(PG_GETARG_TEXT_PP(0)), text_to_cstring(PG_GETARG_TEXT_PP(1)),
			   PG_GETARG_INT64(2), text_to_cstring(PG_GETARG_TEXT_PP(3)),
			   PG_ARGISNULL(4) ? NULL : PG_GETARG_JSONB_P(4), occurred_at, &res);

	values[0] = BoolGetDatum(res.recorded);
	values[1] = BoolGetDatum(res.duplicate);
	values[2] = CStringGetTextDatum(res.metric);
	values[3] = Int64GetDatum(res.quantity);
	values[4] = TimestampTzGetDatum(res.period_start);
	values[5] = TimestampTzGetDatum(res.period_end);
	values[6] = Int64GetDatum(res.total);
	if (!res.limit.defined || res.limit.unlimited)
		nulls[7] = nulls[8] = true;
	else
	{
		values[7] = Int64GetDatum(res.limit.soft_limit);
		values[8] = Int64GetDatum(Max(res.limit.soft_limit - res.total, 0));
	}
	values[9] = CStringGetTextDatum(status_names[status_for(res.total, &res.limit)]);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* ---- check_limit --------------------------------------------------------- */

static double
percent_of(int64 amount, const QesLimit *l)
{
	double		pct;

	pct = l->soft_limit > 0 ? (double) amount * 100.0 / (double) l->soft_limit
		: (amount > 0 ? 100.0 : 0.0);
	return rint(pct * 10.0) / 10.0;
}

/*
 * billing.check_limit(tenant_id, metric, quantity default 1)
 *
 * The hot path's question, answered with the essentials; the period and
 * percentages are in billing.usage_current().
 */
Datum
qes_check_limit(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	char	   *tenant_id;
	char	   *metric_name;
	int64		quantity;
	int			metric;
	QesTenantPlan tp;
	CounterKey	key;
	uint8		notified;
	int64		current;
	int64		asked;
	const QesLimit *l;
	LimitStatus st;
	Datum		values[8];
	bool		nulls[8] = {0};
	Datum		prompt;

	require_arg(fcinfo, 0, "tenant_id");
	require_arg(fcinfo, 1, "metric");
	require_arg(fcinfo, 2, "quantity");
	tupdesc = result_desc(fcinfo);
	tenant_id = text_to_cstring(PG_GETARG_TEXT_PP(0));
	metric_name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	quantity = PG_GETARG_INT64(2);

	qes_catalog_refresh();
	metric = lookup_metric_or_error(metric_name);
	if (quantity < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid quantity " INT64_FORMAT ": must not be negative", quantity),
				 errhint("Ask for the amount about to be used; 0 asks where the tenant stands.")));
	tenant_plan_or_error(tenant_id, qes_billing_now(), &tp);

	qes_counter_key(&key, tenant_id, metric_name, tp.period_start);
	current = qes_counter_get(&key, qes_metric(metric)->is_gauge, tp.period_end, &notified);
	l = qes_limit(tp.plan, metric);
	/* saturating: a total at the int8 maximum plus more is still over */
	if (pg_add_s64_overflow(current, quantity, &asked))
		asked = PG_INT64_MAX;
	st = status_for(asked, l);

	values[0] = BoolGetDatum(st != ST_BLOCKED);
	values[1] = CStringGetTextDatum(status_names[st]);
	values[2] = Int64GetDatum(current);
	if (!l->defined || l->unlimited)
		nulls[3] = nulls[4] = true;
	else
	{
		values[3] = Int64GetDatum(l->soft_limit);
		values[4] = Int64GetDatum(Max(l->soft_limit - current, 0));
	}
	values[5] = CStringGetTextDatum(qes_plan(tp.plan)->plan_id);
	if (tp.reason)
		values[6] = CStringGetTextDatum(tp.reason);
	else
		nulls[6] = true;
	prompt = (st != ST_OK) ? qes_upgrade_prompt(tp.plan, metric) : (Datum) 0;
	values[7] = prompt;
	nulls[7] = (prompt == (Datum) 0);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * billing.usage_current(tenant_id): every metric of the tenant's current
 * period -- period, used, limit, percent, status -- for reports.
 */
Datum
qes_usage_current(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *tenant_id;
	QesTenantPlan tp;

	require_arg(fcinfo, 0, "tenant_id");
	tenant_id = text_to_cstring(PG_GETARG_TEXT_PP(0));
	InitMaterializedSRF(fcinfo, 0);
	qes_catalog_refresh();
	tenant_plan_or_error(tenant_id, qes_billing_now(), &tp);

	for (int m = 0; m < qes_metric_count(); m++)
	{
		const QesMetric *qm = qes_metric(m);
		const QesLimit *l = qes_limit(tp.plan, m);
		CounterKey	key;
		uint8		notified;
		int64		used;
		Datum		values[9];
		bool		nulls[9] = {0};

		qes_counter_key(&key, tenant_id, qm->name, tp.period_start);
		used = qes_counter_get(&key, qm->is_gauge, tp.period_end, &notified);
		values[0] = CStringGetTextDatum(qm->name);
		values[1] = TimestampTzGetDatum(tp.period_start);
		values[2] = TimestampTzGetDatum(tp.period_end);
		values[3] = Int64GetDatum(used);
		if (!l->defined || l->unlimited)
			nulls[4] = nulls[5] = true;
		else
		{
			values[4] = Int64GetDatum(l->soft_limit);
			values[5] = Float8GetDatum(percent_of(used, l));
		}
		values[6] = CStringGetTextDatum(status_names[status_for(used, l)]);
		values[7] = CStringGetTextDatum(qes_plan(tp.plan)->plan_id);
		if (tp.reason)
			values[8] = CStringGetTextDatum(tp.reason);
		else
			nulls[8] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * billing.usage_period(tenant_id, at): the period usage that occurred at
 * `at` is filed under, and the plan whose limits apply then, as the mirror
 * stands in this transaction (docs/architecture.md, "Billing periods").
 * billing.rekey_usage_from() moves usage whose key no longer matches it.
 */
Datum
qes_usage_period(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	char	   *tenant_id;
	QesTenantPlan tp;
	Datum		values[3];
	bool		nulls[3] = {0};

	require_arg(fcinfo, 0, "tenant_id");
	require_arg(fcinfo, 1, "at");
	tupdesc = result_desc(fcinfo);
	tenant_id = text_to_cstring(PG_GETARG_TEXT_PP(0));
	qes_catalog_refresh();
	tenant_plan_or_error(tenant_id, PG_GETARG_TIMESTAMPTZ(1), &tp);
	values[0] = TimestampTzGetDatum(tp.period_start);
	values[1] = TimestampTzGetDatum(tp.period_end);
	values[2] = CStringGetTextDatum(qes_plan(tp.plan)->plan_id);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
