/*-------------------------------------------------------------------------
 *
 * usage_store.h
 *	  Direct access to billing.usage_events for the hot path.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_USAGE_STORE_H
#define QES_USAGE_STORE_H

#include "datatype/timestamp.h"
#include "utils/jsonb.h"

typedef struct UsageRow
{
	const char *tenant_id;
	const char *idempotency_key;
	const char *metric;
	int64		quantity;
	TimestampTz period_start;
	TimestampTz occurred_at;
	Jsonb	   *metadata;		/* NULL for none */
	int64		total_after;
} UsageRow;

extern void qes_usage_store_reset(void);
extern bool qes_usage_find(const char *tenant_id, const char *idempotency_key, UsageRow *found);
extern void qes_usage_insert(const UsageRow *row);

/* shared by the hot paths that write without the executor */
#include "access/attnum.h"
#include "utils/relcache.h"
extern void qes_insert_row(Relation rel, Datum *values, bool *nulls);
extern void qes_table_columns(Relation rel, const char *const *names, int ncols, AttrNumber *attnums);

#endif							/* QES_USAGE_STORE_H */
