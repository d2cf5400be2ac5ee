/*-------------------------------------------------------------------------
 *
 * usage_store.c
 *	  Writing and reading billing.usage_events for record_usage.
 *
 * Every row is written by src/insert_once.c: the executor's own index
 * inserts, constraints and triggers, against the relation as it is now
 * (every index it has at this moment, including ones a DBA created
 * CONCURRENTLY or rebuilt with REINDEX CONCURRENTLY), the defaults of
 * columns a later version adds, TOAST; record_usage itself refuses
 * read-only transactions, hot standbys and a fenced primary first
 * (docs/architecture.md, "Direct writes").
 *
 * It has the meaning of INSERT ... ON CONFLICT (tenant_id,
 * idempotency_key) DO NOTHING: a key recorded before (or by a concurrent
 * transaction that commits while we wait for it) inserts nothing, and the
 * caller then reads the original row.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "catalog_cache.h"
#include "insert_once.h"
#include "usage_store.h"

/*
 * True while record_usage's own INSERT runs: the usage_changed trigger
 * (fired only when a DBA's statement trigger on the table makes the insert
 * fire statement triggers) then knows the counters get this row's delta at
 * commit; any other INSERT into the table (a backfill, a restore) resets
 * them instead.
 */
bool		qes_usage_inserting = false;

static const char *const usage_columns[] = {
	"tenant_id", "idempotency_key", "metric", "quantity", "period_start",
	"occurred_at", "metadata", "total_after"
};

static const Oid usage_types[] = {
	TEXTOID, TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID, JSONBOID, INT8OID
};

/* repeats are retries, rare: inserted first, looked for only on a conflict */
static QesInsertTarget usage_target = {
	"billing", "usage_events", lengthof(usage_columns), usage_columns, usage_types, 2, false,
	"usage_changed", "usage_changed", NULL
};

/*
 * Insert the row unless its (tenant_id, idempotency_key) exists; returns
 * whether it was inserted (src/insert_once.c).
 */
bool
qes_usage_insert(const UsageRow *row)
{
	Datum		values[8];
	bool		nulls[8] = {0};
	QesInsertResult r;

	values[0] = CStringGetTextDatum(row->tenant_id);
	values[1] = CStringGetTextDatum(row->idempotency_key);
	values[2] = CStringGetTextDatum(row->metric);
	values[3] = Int64GetDatum(row->quantity);
	values[4] = TimestampTzGetDatum(row->period_start);
	values[5] = TimestampTzGetDatum(row->occurred_at);
	values[6] = PointerGetDatum(row->metadata);
	nulls[6] = (row->metadata == NULL);
	values[7] = Int64GetDatum(row->total_after);

	/* an error aborts the transaction; the flag is cleared at its end */
	qes_usage_inserting = true;
	r = qes_insert_once(&usage_target, values, nulls);
	qes_usage_inserting = false;
	return r == QES_INSERTED;
}

/*
 * Find the row recorded under (tenant_id, idempotency_key), as of now:
 * committed rows (also those committed after this transaction's snapshot,
 * which ON CONFLICT waited for) and this transaction's own.  A read only:
 * the relation, its primary key and column numbers are looked up afresh
 * from the relcache on every call.
 */
bool
qes_usage_find(const char *tenant_id, const char *idempotency_key, UsageRow *found)
{
	Relation	rel;
	Oid			pkey;
	TupleDesc	desc;
	ScanKeyData key[2];
	SysScanDesc scan;
	HeapTuple	tup;
	Snapshot	snap;
	AttrNumber	att_tenant,
				att_key,
				att_metric,
				att_quantity,
				att_period,
				att_occurred,
				att_total;
	bool		result = false;

	rel = table_openrv(makeRangeVar("billing", "usage_events", -1), AccessShareLock);
	pkey = RelationGetPrimaryKeyIndex(rel);
	att_tenant = get_attnum(RelationGetRelid(rel), "tenant_id");
	att_key = get_attnum(RelationGetRelid(rel), "idempotency_key");
	att_metric = get_attnum(RelationGetRelid(rel), "metric");
	att_quantity = get_attnum(RelationGetRelid(rel), "quantity");
	att_period = get_attnum(RelationGetRelid(rel), "period_start");
	att_occurred = get_attnum(RelationGetRelid(rel), "occurred_at");
	att_total = get_attnum(RelationGetRelid(rel), "total_after");
	if (!OidIsValid(pkey) || att_tenant == InvalidAttrNumber || att_key == InvalidAttrNumber ||
		att_metric == InvalidAttrNumber || att_quantity == InvalidAttrNumber ||
		att_period == InvalidAttrNumber || att_occurred == InvalidAttrNumber ||
		att_total == InvalidAttrNumber)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("billing.usage_events does not have the columns and primary key qes_billing created"),
				 errhint("Do not drop the extension's columns or keys; recreate the extension.")));
	desc = RelationGetDescr(rel);

	/* make our own earlier rows visible, as a new statement would */
	CommandCounterIncrement();
	snap = RegisterSnapshot(GetLatestSnapshot());
	ScanKeyInit(&key[0], att_tenant, BTEqualStrategyNumber, F_TEXTEQ, CStringGetTextDatum(tenant_id));
	key[0].sk_collation = TupleDescAttr(desc, att_tenant - 1)->attcollation;
	ScanKeyInit(&key[1], att_key, BTEqualStrategyNumber, F_TEXTEQ, CStringGetTextDatum(idempotency_key));
	key[1].sk_collation = TupleDescAttr(desc, att_key - 1)->attcollation;
	scan = systable_beginscan(rel, pkey, true, snap, 2, key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;

		found->tenant_id = tenant_id;
		found->idempotency_key = idempotency_key;
		found->metric = TextDatumGetCString(heap_getattr(tup, att_metric, desc, &isnull));
		found->quantity = DatumGetInt64(heap_getattr(tup, att_quantity, desc, &isnull));
		found->period_start = DatumGetTimestampTz(heap_getattr(tup, att_period, desc, &isnull));
		found->occurred_at = DatumGetTimestampTz(heap_getattr(tup, att_occurred, desc, &isnull));
		found->metadata = NULL;
		found->total_after = DatumGetInt64(heap_getattr(tup, att_total, desc, &isnull));
		if (isnull)
			found->total_after = found->quantity;
		result = true;
	}
	systable_endscan(scan);
	UnregisterSnapshot(snap);
	table_close(rel, NoLock);
	return result;
}
