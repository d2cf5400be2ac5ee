/*-------------------------------------------------------------------------
 *
 * insert_once.c
 *	  Insert a row unless its primary key exists: the write of record_usage
 *	  (billing.usage_events) and of webhook intake (billing.webhook_events).
 *
 * Both hot paths used to run INSERT ... ON CONFLICT (pkey) DO NOTHING
 * through a kept SPI plan.  This file does the same insert with the
 * executor's own pieces, the way logical replication's apply worker writes
 * a row (src/backend/executor/execReplication.c in PostgreSQL): a
 * ResultRelInfo opened per call, PostgreSQL's index inserts with
 * speculative insertion for the primary key, its constraint checks, its
 * BEFORE/AFTER row triggers and generated columns.  What it saves per call
 * is the plan cache's revalidation, ModifyTable's executor start-up and
 * projection, and the ON CONFLICT pre-check (see "Order" below).
 *
 * What a write must still reach, and how it does (docs/architecture.md,
 * "Direct writes"):
 *	- every index the table has at this moment: the index list is read from
 *	  the relcache on every call (ExecOpenIndices), after the table's lock
 *	  is taken, so an index built CONCURRENTLY or rebuilt by REINDEX
 *	  CONCURRENTLY gets the row exactly as an INSERT's would;
 *	- constraints (NOT NULL, CHECK, other unique indexes), row triggers,
 *	  generated columns, defaults of columns a later version adds: from
 *	  the relcache, through the executor's functions;
 *	- statement triggers: a DBA's fire as for an INSERT; the extension's own
 *	  one on the table (the caller names it: usage_changed, wake_worker) is
 *	  not fired, the caller does its work itself;
 *	- read-only transactions, hot standbys and a fenced primary: the callers
 *	  call PreventCommandIfReadOnly() first, as INSERT does.
 *
 * Kept across calls, per backend, in a "shape" per target: the column
 * map, the prepared default and CHECK expressions and whether other
 * statement triggers exist.  A shape is dropped on any relcache
 * invalidation of its table (ALTER TABLE, CREATE/DROP TRIGGER or INDEX,
 * new defaults or constraints) and on any pg_proc change (a function a
 * default or CHECK calls was replaced); relcache invalidations are
 * accepted when the table's lock is taken, before the shape is looked at.
 * A shape replaced while a call may still use it (a trigger recording
 * usage from inside the insert) is freed at the end of the transaction.
 * Types (ALTER DOMAIN) and schemas (a rename) invalidate every shape.
 *
 * Order.  ON CONFLICT first probes the primary key for the row and inserts
 * only if it is absent: two descents of the index for every new row.  Here,
 * for a target whose repeats are rare (record_usage: a retry), the row is
 * inserted speculatively at once (the probe happens inside the index
 * insert, which reports a possible duplicate instead of failing); only on a
 * possible duplicate is the inserted row version killed and the full check
 * (which waits for an in-progress inserter) made.  New rows, the common
 * case, take one descent; a repeated key costs a transaction id and leaves
 * one dead row version for VACUUM, as an aborted INSERT does.  The probe
 * comes first, as in ON CONFLICT, for a target whose repeats are common
 * (webhook intake: Stripe redelivers, and a repeat must stay a read), and
 * whenever the table has a unique or exclusion index that is not an
 * arbiter (a DBA's, or the copy REINDEX CONCURRENTLY builds): a repeated
 * key must be found before it reaches that index, which would refuse it.
 *
 * Arbiters are inferred as ON CONFLICT (key columns) infers them: every
 * valid, immediate, non-partial unique index on exactly the key columns.
 * The shape checks that the primary key is on those columns and that each
 * column the caller fills has the type of its values (a DBA who changed
 * one gets an error, never a misread Datum).
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/genam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_trigger.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/nodeModifyTable.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "rewrite/rewriteHandler.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "insert_once.h"

typedef struct InsertShape
{
	MemoryContext cxt;
	Oid			relid;
	bool		valid;
	int			natts;
	int		   *source;			/* per attribute: the caller's column, or -1 */
	ExprState **defaults;		/* per attribute: its default, or NULL */
	ExprState **checks;			/* per CHECK constraint (NULL: none) */
	EState	   *estate;			/* owns the expression states above */
	AttrNumber *key;			/* the key columns' attribute numbers */
	bool		fire_statement; /* statement triggers other than our own */
	struct InsertShape *next_retired;
} InsertShape;

/* every target used in this backend (for the invalidation callbacks) */
#define QES_MAX_INSERT_TARGETS 8
static QesInsertTarget *targets[QES_MAX_INSERT_TARGETS];
static int	ntargets = 0;

/* shapes replaced in this transaction (a running call may still use one) */
static InsertShape *retired = NULL;

/* counts invalidations: one during a shape's build makes it stale at once */
static uint64 inval_count = 0;

static void
invalidate(Oid relid)
{
	inval_count++;
	for (int i = 0; i < ntargets; i++)
		if (targets[i]->shape != NULL &&
			(!OidIsValid(relid) || targets[i]->shape->relid == relid))
			targets[i]->shape->valid = false;
}

static void
relcache_callback(Datum arg, Oid relid)
{
	invalidate(relid);
}

/* a function, type (domain) or schema changed: every shape */
static void
syscache_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	invalidate(InvalidOid);
}

void
qes_insert_once_init(void)
{
	CacheRegisterRelcacheCallback(relcache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(PROCOID, syscache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(TYPEOID, syscache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(NAMESPACEOID, syscache_callback, (Datum) 0);
}

static void
free_retired(void)
{
	while (retired != NULL)
	{
		InsertShape *s = retired;

		retired = s->next_retired;
		MemoryContextDelete(s->cxt);
	}
}

/* At the end of a transaction no call is running: free what was replaced. */
void
qes_insert_once_at_xact_end(void)
{
	if (retired != NULL)
		free_retired();
}

/* Is trig the extension's own statement trigger named by the target? */
static bool
is_own_trigger(const QesInsertTarget *t, Relation rel, const Trigger *trig)
{
	char	   *fname;
	bool		own;

	if (t->own_trigger == NULL || strcmp(trig->tgname, t->own_trigger) != 0)
		return false;
	fname = get_func_name(trig->tgfoid);
	own = fname != NULL && strcmp(fname, t->own_trigger_function) == 0 &&
		get_func_namespace(trig->tgfoid) == RelationGetNamespace(rel);
	return own;
}

/* Is an index with this pg_index row on exactly the key columns? */
static bool
key_matches(const InsertShape *s, int nkey, Form_pg_index index)
{
	if (index->indnkeyatts != nkey)
		return false;
	for (int k = 0; k < nkey; k++)
	{
		bool		found = false;

		for (int j = 0; j < nkey; j++)
			found |= (index->indkey.values[j] == s->key[k]);
		if (!found)
			return false;
	}
	return true;
}

static char *
key_names(const QesInsertTarget *t)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int k = 0; k < t->nkey; k++)
		appendStringInfo(&buf, "%s%s", k ? ", " : "", t->columns[k]);
	return buf.data;
}

static InsertShape *
build_shape(QesInsertTarget *t, Relation rel)
{
	MemoryContext cxt;
	MemoryContext old;
	InsertShape *s;
	TupleDesc	desc = RelationGetDescr(rel);
	TupleConstr *constr = desc->constr;

	/* under the caller's context until it is complete: an error frees it */
	cxt = AllocSetContextCreate(CurrentMemoryContext, "qes_billing insert shape",
								ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(cxt);
	s = palloc0(sizeof(InsertShape));
	s->cxt = cxt;
	s->relid = RelationGetRelid(rel);
	s->natts = desc->natts;
	s->source = palloc(sizeof(int) * Max(desc->natts, 1));
	s->defaults = palloc0(sizeof(ExprState *) * Max(desc->natts, 1));
	s->estate = CreateExecutorState();

	for (int i = 0; i < desc->natts; i++)
		s->source[i] = -1;
	for (int c = 0; c < t->ncolumns; c++)
	{
		int			found = -1;

		for (int i = 0; i < desc->natts; i++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, i);

			if (!att->attisdropped && strcmp(NameStr(att->attname), t->columns[c]) == 0)
				found = i;
		}
		if (found < 0 || TupleDescAttr(desc, found)->attgenerated)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("%s.%s does not have the column \"%s\" qes_billing created",
							t->nspname, t->relname, t->columns[c]),
					 errhint("Do not drop or change the extension's columns; recreate the extension.")));
		/* the values are Datums of these types: nothing else may receive them */
		if (TupleDescAttr(desc, found)->atttypid != t->types[c] ||
			TupleDescAttr(desc, found)->atttypmod != -1)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("column \"%s\" of %s.%s is of type %s, but qes_billing writes %s",
							t->columns[c], t->nspname, t->relname,
							format_type_with_typemod(TupleDescAttr(desc, found)->atttypid,
													 TupleDescAttr(desc, found)->atttypmod),
							format_type_be(t->types[c])),
					 errhint("Do not change the types of the extension's columns; change it back.")));
		s->source[found] = c;
	}

	/* the rest get their defaults, as in an INSERT that names only ours */
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		Node	   *expr;

		if (s->source[i] >= 0 || att->attisdropped || att->attgenerated)
			continue;
		expr = build_column_default(rel, i + 1);
		if (expr != NULL)
			s->defaults[i] = ExecPrepareExpr((Expr *) expr, s->estate);
	}

	/* CHECK constraints, prepared as ExecConstraints would on first use */
	if (constr != NULL && constr->num_check > 0)
	{
		MemoryContext q = MemoryContextSwitchTo(s->estate->es_query_cxt);

		s->checks = palloc(sizeof(ExprState *) * constr->num_check);
		for (int i = 0; i < constr->num_check; i++)
			s->checks[i] = ExecPrepareExpr((Expr *) stringToNode(constr->check[i].ccbin), s->estate);
		MemoryContextSwitchTo(q);
	}

	/* the primary key is on the key columns, and only on them */
	s->key = palloc(sizeof(AttrNumber) * t->nkey);
	for (int k = 0; k < t->nkey; k++)
		for (int i = 0; i < desc->natts; i++)
			if (s->source[i] == k)
				s->key[k] = i + 1;
	{
		Oid			pkey = RelationGetPrimaryKeyIndex(rel);
		bool		matches = false;

		if (OidIsValid(pkey))
		{
			Relation	idx = index_open(pkey, AccessShareLock);

			matches = key_matches(s, t->nkey, idx->rd_index);
			index_close(idx, AccessShareLock);
		}
		if (!matches)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("%s.%s does not have the primary key qes_billing created", t->nspname, t->relname),
					 errdetail("qes_billing needs a primary key on exactly (%s).",
							   key_names(t)),
					 errhint("Do not drop or change the extension's keys; recreate the extension.")));
	}

	if (rel->trigdesc != NULL)
		for (int i = 0; i < rel->trigdesc->numtriggers; i++)
		{
			Trigger    *trig = &rel->trigdesc->triggers[i];

			if (TRIGGER_FOR_INSERT(trig->tgtype) && !TRIGGER_FOR_ROW(trig->tgtype) &&
				!is_own_trigger(t, rel, trig))
				s->fire_statement = true;
		}

	MemoryContextSwitchTo(old);
	MemoryContextSetParent(cxt, TopMemoryContext);
	s->valid = true;
	return s;
}

/* The table's shape, rebuilt if it was invalidated since it was made. */
static InsertShape *
shape_for(QesInsertTarget *t, Relation rel)
{
	InsertShape *s = t->shape;
	uint64		seen;

	if (s != NULL && s->valid && s->relid == RelationGetRelid(rel))
		return s;
	if (t->shape == NULL)
	{
		bool		known = false;

		for (int i = 0; i < ntargets; i++)
			known |= (targets[i] == t);
		if (!known)
		{
			if (ntargets >= QES_MAX_INSERT_TARGETS)
				elog(ERROR, "qes_billing: too many insert targets");
			targets[ntargets++] = t;
		}
	}
	seen = inval_count;
	s = build_shape(t, rel);
	/* invalidated while it was built: use it for this call, build it again next */
	if (inval_count != seen)
		s->valid = false;
	if (t->shape != NULL)
	{
		/* a running call may still use it (an insert inside a trigger) */
		t->shape->next_retired = retired;
		retired = t->shape;
	}
	t->shape = s;
	return s;
}

/*
 * At REPEATABLE READ or SERIALIZABLE, a conflicting row our snapshot cannot
 * see is a serialization failure, as for INSERT ... ON CONFLICT DO NOTHING.
 */
static void
check_conflict_visible(EState *estate, Relation rel, ItemPointer tid)
{
	TupleTableSlot *slot;
	bool		isnull;

	if (!IsolationUsesXactSnapshot())
		return;
	slot = ExecInitExtraTupleSlot(estate, RelationGetDescr(rel), table_slot_callbacks(rel));
	if (!table_tuple_fetch_row_version(rel, tid, SnapshotAny, slot))
		elog(ERROR, "qes_billing: could not fetch the conflicting row of %s", RelationGetRelationName(rel));
	if (!table_tuple_satisfies_snapshot(rel, slot, estate->es_snapshot) &&
		!TransactionIdIsCurrentTransactionId(DatumGetTransactionId(slot_getsysattr(slot, MinTransactionIdAttributeNumber,
																					&isnull))))
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to concurrent update")));
}

static QesInsertResult
insert_row(const QesInsertTarget *target, InsertShape *shape, Relation rel,
		   const Datum *values, const bool *nulls)
{
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
	ExprContext *econtext;
	TriggerDesc *td;
	TransitionCaptureState *tcs = NULL;
	bool		after;
	List	   *arbiters;
	List	   *recheck = NIL;
	QesInsertResult result = QES_INSERT_EXISTS;
	bool		probe = target->probe_first;

	estate = CreateExecutorState();
	estate->es_output_cid = GetCurrentCommandId(true);
	estate->es_snapshot = ActiveSnapshotSet() ? GetActiveSnapshot() : InvalidSnapshot;
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 0, NULL, 0);
	estate->es_opened_result_relations = list_make1(rri);
	CheckValidResultRel(rri, CMD_INSERT);
	ExecOpenIndices(rri, true);
	rri->ri_ConstraintExprs = shape->checks;

	/*
	 * The arbiters, as ON CONFLICT (key columns) infers them; any other
	 * unique or exclusion index (a DBA's, the new copy of REINDEX
	 * CONCURRENTLY) would refuse a repeated key that reached it: look first.
	 */
	arbiters = NIL;
	for (int i = 0; i < rri->ri_NumIndices; i++)
	{
		Form_pg_index index = rri->ri_IndexRelationDescs[i]->rd_index;
		IndexInfo  *info = rri->ri_IndexRelationInfo[i];

		if (index->indisunique && index->indimmediate && index->indisvalid &&
			info->ii_Predicate == NIL && info->ii_Expressions == NIL &&
			key_matches(shape, target->nkey, index))
			arbiters = lappend_oid(arbiters, RelationGetRelid(rri->ri_IndexRelationDescs[i]));
		else if (info->ii_Unique || info->ii_ExclusionOps != NULL)
			probe = true;
	}
	if (arbiters == NIL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("%s.%s has no valid unique index on its key", target->nspname, target->relname),
				 errhint("Rebuild the primary key (REINDEX INDEX CONCURRENTLY).")));

	slot = ExecInitExtraTupleSlot(estate, RelationGetDescr(rel), &TTSOpsVirtual);
	econtext = GetPerTupleExprContext(estate);
	ExecClearTuple(slot);
	/* (a CHECK or a generated column may read tableoid) */
	slot->tts_tableOid = RelationGetRelid(rel);
	for (int i = 0; i < shape->natts; i++)
	{
		int			c = shape->source[i];

		if (c >= 0)
		{
			slot->tts_values[i] = values[c];
			slot->tts_isnull[i] = nulls[c];
		}
		else if (shape->defaults[i] != NULL)
			slot->tts_values[i] = ExecEvalExprSwitchContext(shape->defaults[i], econtext,
															&slot->tts_isnull[i]);
		else
		{
			slot->tts_values[i] = (Datum) 0;
			slot->tts_isnull[i] = true;
		}
	}
	ExecStoreVirtualTuple(slot);

	td = rri->ri_TrigDesc;
	after = shape->fire_statement ||
		(td != NULL && (td->trig_insert_after_row || td->trig_insert_new_table));
	if (after)
	{
		AfterTriggerBeginQuery();
		tcs = MakeTransitionCaptureState(td, RelationGetRelid(rel), CMD_INSERT);
	}
	if (shape->fire_statement)
		ExecBSInsertTriggers(estate, rri);

	if (td != NULL && td->trig_insert_before_row && !ExecBRInsertTriggers(estate, rri, slot))
		ereport(ERROR,
				(errcode(ERRCODE_TRIGGERED_ACTION_EXCEPTION),
				 errmsg("a BEFORE INSERT trigger on %s skipped the row qes_billing inserts",
						RelationGetRelationName(rel)),
				 errhint("A trigger on the extension's table must not return NULL for its rows.")));
	if (rel->rd_att->constr != NULL && rel->rd_att->constr->has_generated_stored)
		ExecComputeStoredGenerated(rri, estate, slot, CMD_INSERT);
	if (rel->rd_att->constr != NULL)
		ExecConstraints(rri, slot, estate);
	if (rel->rd_rel->relispartition)
		ExecPartitionCheck(rri, slot, estate, true);

	for (;;)
	{
		ItemPointerData conflict;
		bool		speculative_conflict = false;
		uint32		token;

		CHECK_FOR_INTERRUPTS();
		/* first or after a possible duplicate: the full check, waiting for its inserter */
		if (probe && !ExecCheckIndexConstraints(rri, slot, estate, &conflict, arbiters))
		{
			check_conflict_visible(estate, rel, &conflict);
			result = QES_INSERT_EXISTS;
			break;
		}
		token = SpeculativeInsertionLockAcquire(GetCurrentTransactionId());
		table_tuple_insert_speculative(rel, slot, estate->es_output_cid, 0, NULL, token);
		recheck = ExecInsertIndexTuples(rri, slot, estate, false, true, &speculative_conflict, arbiters);
		table_tuple_complete_speculative(rel, slot, token, !speculative_conflict);
		SpeculativeInsertionLockRelease(GetCurrentTransactionId());
		if (!speculative_conflict)
		{
			result = QES_INSERTED;
			break;
		}
		list_free(recheck);
		recheck = NIL;
		probe = true;
	}

	if (result == QES_INSERTED)
		ExecARInsertTriggers(estate, rri, slot, recheck, tcs);
	if (shape->fire_statement)
		ExecASInsertTriggers(estate, rri, tcs);
	if (after)
		AfterTriggerEndQuery(estate);

	ExecCloseResultRelations(estate);
	ExecResetTupleTable(estate->es_tupleTable, false);
	FreeExecutorState(estate);
	return result;
}

/*
 * Insert the row (values and nulls in the order of target->columns) unless
 * a row with its primary key exists.  Runs as the extension's owner, as the
 * SPI statement it replaces did; the caller has checked that writing is
 * allowed (PreventCommandIfReadOnly).
 */
QesInsertResult
qes_insert_once(QesInsertTarget *target, const Datum *values, const bool *nulls)
{
	Oid			relid;
	Relation	rel;
	InsertShape *shape;
	QesInsertResult result;
	Oid			save_userid;
	int			save_sec_context;

	/*
	 * The table's lock accepts invalidations, so what is looked at after it
	 * is current.  The table known from the last call is locked by its OID:
	 * had it been dropped, renamed or changed since, its shape would now be
	 * invalid, and the name is looked up again.
	 */
	relid = InvalidOid;
	if (target->shape != NULL && target->shape->valid)
	{
		LockRelationOid(target->shape->relid, RowExclusiveLock);
		if (target->shape->valid)
			relid = target->shape->relid;
	}
	if (!OidIsValid(relid))
		relid = RangeVarGetRelid(makeRangeVar((char *) target->nspname, (char *) target->relname, -1),
								 RowExclusiveLock, false);
	rel = table_open(relid, NoLock);
	if (rel->rd_rel->relkind != RELKIND_RELATION)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("%s.%s is not a plain table", target->nspname, target->relname),
				 errhint("qes_billing writes its rows into the table it created; recreate the extension.")));

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(BOOTSTRAP_SUPERUSERID, save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	shape = shape_for(target, rel);
	result = insert_row(target, shape, rel, values, nulls);
	SetUserIdAndSecContext(save_userid, save_sec_context);
	table_close(rel, NoLock);
	return result;
}
