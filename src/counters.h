/*-------------------------------------------------------------------------
 *
 * counters.h
 *	  Shared-memory usage counters.  Locking rules: see counters.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_COUNTERS_H
#define QES_COUNTERS_H

#include "access/transam.h"
#include "datatype/timestamp.h"

#include "catalog_cache.h"

/* A counter's key as its caller holds it; shared memory keeps only fp. */
typedef struct CounterKey
{
	char		tenant_id[QES_TENANT_ID_LEN];
	char		metric[QES_METRIC_LEN];
	TimestampTz period_start;
	uint64		fp[2];			/* with this database: the fingerprint */
} CounterKey;

#define QES_NOTIFIED_80		0x01
#define QES_NOTIFIED_100	0x02

typedef enum
{
	SEEN,						/* the build counted the committer's rows: skip its delta */
	NOT_SEEN,					/* it did not: add the delta */
	UNKNOWN						/* cannot tell: drop the entry */
} Seen;


extern Seen qes_counter_seen(FullTransactionId xmin, FullTransactionId xmax, int xcnt,
							 const FullTransactionId *xip, FullTransactionId xid);

extern void qes_counters_request(void);
extern void qes_counters_startup(void);
extern void qes_counters_register_rmgr(void);
extern void qes_counter_key(CounterKey *key, const char *tenant_id, const char *metric,
							TimestampTz period_start);
extern int64 qes_counter_get(const CounterKey *key, bool is_gauge, TimestampTz period_end,
							 uint8 *notified);
extern int64 qes_counter_own_pending(const CounterKey *key, bool is_gauge, bool *has_gauge);
extern void qes_counter_add_at_commit(const CounterKey *key, bool is_gauge, int64 value,
									  TimestampTz at);
extern void qes_counter_notified_at_commit(const CounterKey *key, uint8 bit);
extern void qes_counters_pre_commit(void);
extern void qes_counters_at_commit(void);
extern void qes_counters_reset_at_commit(void);
extern void qes_counters_at_abort(void);
extern void qes_counters_refuse_prepare(void);
extern void qes_counters_at_subabort(SubTransactionId mysubid);
extern void qes_counters_at_subcommit(SubTransactionId mysubid, SubTransactionId parentsubid);

#endif							/* QES_COUNTERS_H */
