/*-------------------------------------------------------------------------
 *
 * usage_store.c
 *	  Direct access to billing.usage_events for record_usage.
 *
 * record_usage must cost about what a plain INSERT of its row costs.  Going
 * through SPI meant two executor start-ups per call (a probe and an
 * INSERT), which profiling showed to be over 40 % of the call.  So, as
 * PostgreSQL's own catalog code does, the row is found with a scan of the
 * primary key and inserted with simple_table_tuple_insert() plus
 * ExecInsertIndexTuples(): the same heap and index work as an INSERT, with
 * the same WAL, locks, and unique-violation behaviour, but no planner and
 * no executor tree.
 *
 * What an INSERT would add and this does not: permission and row-level
 * security checks (record_usage is granted explicitly and writes as the
 * table owner), CHECK constraints (there are none; record_usage validates
 * its input), and INSERT triggers (there are none on this table; adding one
 * would be bypassed -- the install script is the table's only definition).
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "executor/executor.h"
#include "nodes/execnodes.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"

#include "usage_store.h"

enum
{
	COL_TENANT_ID,
	COL_IDEMPOTENCY_KEY,
	COL_METRIC,
	COL_QUANTITY,
	COL_PERIOD_START,
	COL_OCCURRED_AT,
	COL_RECORDED_AT,
	COL_METADATA,
	COL_TOTAL_AFTER,
	NUM_COLS
};

static const char *const col_names[NUM_COLS] = {
	"tenant_id", "idempotency_key", "metric", "quantity", "period_start",
	"occurred_at", "recorded_at", "metadata", "total_after"
};

static bool resolved = false;
static Oid	usage_relid;
static Oid	usage_pkey;
static AttrNumber attnums[NUM_COLS];

/* Forget the OIDs (the extension may have been re-created). */
void
qes_usage_store_reset(void)
{
	resolved = false;
}

static void
resolve(void)
{
	Oid			nsp;
	Relation	rel;

	if (resolved)
		return;
	nsp = get_namespace_oid("billing", false);
	usage_relid = get_relname_relid("usage_events", nsp);
	if (!OidIsValid(usage_relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"billing.usage_events\" does not exist")));
	rel = table_open(usage_relid, AccessShareLock);
	qes_table_columns(rel, col_names, NUM_COLS, attnums);
	usage_pkey = RelationGetPrimaryKeyIndex(rel);
	table_close(rel, AccessShareLock);
	resolved = true;
}

/*
 * The attribute numbers of the named columns of one of the extension's
 * tables, and that it has its primary key and no other columns: the hot
 * paths that write without the executor rely on the table being as the
 * install script made it.
 */
void
qes_table_columns(Relation rel, const char *const *names, int ncols, AttrNumber *attnums)
{
	if (RelationGetDescr(rel)->natts != ncols || !OidIsValid(RelationGetPrimaryKeyIndex(rel)))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("billing.%s does not have the columns and primary key qes_billing created",
						RelationGetRelationName(rel)),
				 errhint("Do not alter the extension's tables; recreate the extension.")));
	for (int i = 0; i < ncols; i++)
	{
		attnums[i] = get_attnum(RelationGetRelid(rel), names[i]);
		if (attnums[i] == InvalidAttrNumber)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" of billing.%s does not exist", names[i], RelationGetRelationName(rel))));
	}
}

/*
 * Find the row recorded under (tenant_id, idempotency_key), as of now:
 * committed rows and this transaction's own earlier ones.
 */
bool
qes_usage_find(const char *tenant_id, const char *idempotency_key, UsageRow *found)
{
	Relation	rel;
	Relation	idx;
	ScanKeyData key[2];
	SysScanDesc scan;
	HeapTuple	tup;
	Snapshot	snap;
	bool		result = false;

	resolve();
	/* make our own earlier rows of this statement visible, as SPI would */
	CommandCounterIncrement();
	snap = RegisterSnapshot(GetLatestSnapshot());
	rel = table_open(usage_relid, RowExclusiveLock);
	idx = index_open(usage_pkey, RowExclusiveLock);
	ScanKeyEntryInitialize(&key[0], 0, attnums[COL_TENANT_ID], BTEqualStrategyNumber, InvalidOid,
						   idx->rd_indcollation[0], F_TEXTEQ, CStringGetTextDatum(tenant_id));
	ScanKeyEntryInitialize(&key[1], 0, attnums[COL_IDEMPOTENCY_KEY], BTEqualStrategyNumber, InvalidOid,
						   idx->rd_indcollation[1], F_TEXTEQ, CStringGetTextDatum(idempotency_key));
	scan = systable_beginscan(rel, usage_pkey, true, snap, 2, key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		TupleDesc	desc = RelationGetDescr(rel);
		bool		isnull;

		found->tenant_id = tenant_id;
		found->idempotency_key = idempotency_key;
		found->metric = TextDatumGetCString(heap_getattr(tup, attnums[COL_METRIC], desc, &isnull));
		found->quantity = DatumGetInt64(heap_getattr(tup, attnums[COL_QUANTITY], desc, &isnull));
		found->period_start = DatumGetTimestampTz(heap_getattr(tup, attnums[COL_PERIOD_START], desc, &isnull));
		found->occurred_at = DatumGetTimestampTz(heap_getattr(tup, attnums[COL_OCCURRED_AT], desc, &isnull));
		found->metadata = NULL;
		found->total_after = DatumGetInt64(heap_getattr(tup, attnums[COL_TOTAL_AFTER], desc, &isnull));
		if (isnull)
			found->total_after = found->quantity;
		result = true;
	}
	systable_endscan(scan);
	index_close(idx, NoLock);
	table_close(rel, NoLock);
	UnregisterSnapshot(snap);
	return result;
}

/*
 * Insert the row and its index entries.  A concurrent insert of the same
 * key makes the primary key wait for that transaction and, if it commits,
 * raise a unique violation, exactly as an INSERT would.
 */
void
qes_usage_insert(const UsageRow *row)
{
	Relation	rel;
	Datum		values[NUM_COLS];
	bool		nulls[NUM_COLS];
	Datum		ordered[NUM_COLS];
	bool		ordered_nulls[NUM_COLS];

	resolve();
	rel = table_open(usage_relid, RowExclusiveLock);

	memset(nulls, 0, sizeof(nulls));
	values[COL_TENANT_ID] = CStringGetTextDatum(row->tenant_id);
	values[COL_IDEMPOTENCY_KEY] = CStringGetTextDatum(row->idempotency_key);
	values[COL_METRIC] = CStringGetTextDatum(row->metric);
	values[COL_QUANTITY] = Int64GetDatum(row->quantity);
	values[COL_PERIOD_START] = TimestampTzGetDatum(row->period_start);
	values[COL_OCCURRED_AT] = TimestampTzGetDatum(row->occurred_at);
	values[COL_RECORDED_AT] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	values[COL_METADATA] = PointerGetDatum(row->metadata);
	nulls[COL_METADATA] = (row->metadata == NULL);
	values[COL_TOTAL_AFTER] = Int64GetDatum(row->total_after);
	for (int i = 0; i < NUM_COLS; i++)
	{
		ordered[attnums[i] - 1] = values[i];
		ordered_nulls[attnums[i] - 1] = nulls[i];
	}

	qes_insert_row(rel, ordered, ordered_nulls);
	table_close(rel, NoLock);
}

/*
 * Insert a row (values in attribute order) into rel, opened with
 * RowExclusiveLock, and its index entries (partial indexes included) --
 * the heap and index work of an INSERT without planner or executor tree.
 * Shared by the hot paths that write this way (usage, webhook intake); the
 * caller answers for what an INSERT would add: CHECK constraints, triggers,
 * permissions.
 */
void
qes_insert_row(Relation rel, Datum *values, bool *nulls)
{
	TupleDesc	desc = RelationGetDescr(rel);
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
	List	   *recheck;

	estate = CreateExecutorState();
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 1, NULL, 0);
	ExecOpenIndices(rri, false);
	slot = MakeSingleTupleTableSlot(desc, &TTSOpsHeapTuple);
	ExecStoreHeapTuple(heap_form_tuple(desc, values, nulls), slot, false);

	simple_table_tuple_insert(rel, slot);
#if PG_VERSION_NUM >= 160000
	recheck = ExecInsertIndexTuples(rri, slot, estate, false, false, NULL, NIL, false);
#else
	recheck = ExecInsertIndexTuples(rri, slot, estate, false, false, NULL, NIL);
#endif
	Assert(recheck == NIL);
	(void) recheck;

	ExecDropSingleTupleTableSlot(slot);
	ExecCloseIndices(rri);
	FreeExecutorState(estate);
}
