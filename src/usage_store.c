/*-------------------------------------------------------------------------
 *
 * usage_store.c
 *	  Writing and reading billing.usage_events for record_usage.
 *
 * Every row is written through PostgreSQL's own INSERT (a kept SPI plan),
 * so it goes to the relation as it is now: every index it has at this
 * moment (including ones a DBA created CONCURRENTLY, or rebuilt with
 * REINDEX CONCURRENTLY), its constraints and triggers, the defaults of
 * columns a later version adds, TOAST, and the read-only checks of a hot
 * standby or a fenced primary.  The plan cache re-plans the statement when
 * the relation changes, so nothing about the relation's shape is kept
 * across transactions by this file (docs/architecture.md, "Direct writes").
 *
 * The statement is INSERT ... ON CONFLICT DO NOTHING: a key recorded
 * before (or by a concurrent transaction that commits while we wait for
 * it) inserts nothing, and the caller then reads the original row.
 *
 * The earlier direct heap and index insert saved one executor start-up per
 * call but skipped indexes created after the backend first resolved the
 * table, and failed after REINDEX CONCURRENTLY; the measured cost of doing
 * it right is in the README's benchmark section.
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
#include "usage_store.h"

static SPIPlanPtr insert_plan = NULL;

/*
 * True while record_usage's own INSERT runs: the usage_changed trigger
 * then knows the counters get this row's delta at commit, and any other
 * INSERT into the table (a backfill, a restore) resets them instead.
 */
bool		qes_usage_inserting = false;

typedef struct InsertArgs
{
	const UsageRow *row;
	bool		inserted;
} InsertArgs;

static void
insert_cb(void *arg)
{
	InsertArgs *a = (InsertArgs *) arg;
	const UsageRow *row = a->row;
	Datum		values[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			rc;

	if (insert_plan == NULL)
	{
		Oid			types[8] = {TEXTOID, TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID,
		TIMESTAMPTZOID, JSONBOID, INT8OID};
		SPIPlanPtr	plan;

		plan = SPI_prepare(/* result: none */ "INSERT INTO billing.usage_events"
						   " (tenant_id, idempotency_key, metric, quantity, period_start,"
						   "  occurred_at, metadata, total_after)"
						   " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
						   " ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
						   8, types);
		if (plan == NULL)
			elog(ERROR, "qes_billing: could not prepare the usage insert: %s",
				 SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		insert_plan = plan;
	}
	values[0] = CStringGetTextDatum(row->tenant_id);
	values[1] = CStringGetTextDatum(row->idempotency_key);
	values[2] = CStringGetTextDatum(row->metric);
	values[3] = Int64GetDatum(row->quantity);
	values[4] = TimestampTzGetDatum(row->period_start);
	values[5] = TimestampTzGetDatum(row->occurred_at);
	values[6] = PointerGetDatum(row->metadata);
	nulls[6] = (row->metadata == NULL) ? 'n' : ' ';
	values[7] = Int64GetDatum(row->total_after);
	rc = SPI_execute_plan(insert_plan, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "qes_billing: usage insert failed: %s", SPI_result_code_string(rc));
	a->inserted = (SPI_processed == 1);
}

/*
 * Insert the row unless its (tenant_id, idempotency_key) exists; returns
 * whether it was inserted.  Runs as the table owner (qes_run_as_owner), so
 * the caller needs no privilege on the table.
 */
bool
qes_usage_insert(const UsageRow *row)
{
	InsertArgs	a = {row, false};

	/* an error aborts the transaction; the flag is cleared at its end */
	qes_usage_inserting = true;
	qes_run_as_owner(insert_cb, &a);
	qes_usage_inserting = false;
	return a.inserted;
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
