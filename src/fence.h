/*-------------------------------------------------------------------------
 *
 * fence.h
 *	  Partition fences: writes refused for tenants whose partition is
 *	  moving to another shard or has moved.  Locking rules: see fence.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_FENCE_H
#define QES_FENCE_H

/* a partition being moved (out of this shard or into it): retry shortly */
#define ERRCODE_QES_PARTITION_MOVING	MAKE_SQLSTATE('Q','B','M','O','V')
/* a partition that lives on another shard now: look the tenant up again */
#define ERRCODE_QES_PARTITION_MOVED		MAKE_SQLSTATE('Q','B','M','V','D')

extern void qes_fence_request(void);
extern void qes_fence_startup(void);
extern bool qes_fence_check_tenant(const char *tenant_id);
extern void qes_fence_log_usage(const char *tenant_id, const char *idempotency_key);
extern void qes_fence_exempt_call(void (*fn) (void *), void *arg);
extern void qes_fence_at_xact_end(bool top);
extern void qes_fence_refuse_prepare(void);
extern void qes_fence_note_untracked_usage_write(void);

#endif							/* QES_FENCE_H */
