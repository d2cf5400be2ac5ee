/*-------------------------------------------------------------------------
 *
 * usage_store.h
 *	  Writing and reading billing.usage_events for record_usage.
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

extern bool qes_usage_inserting;
extern bool qes_usage_find(const char *tenant_id, const char *idempotency_key, UsageRow *found);
extern bool qes_usage_insert(const UsageRow *row);

#endif							/* QES_USAGE_STORE_H */
