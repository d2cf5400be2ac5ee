/*-------------------------------------------------------------------------
 *
 * shmem.h
 *	  Shared memory of qes_billing.  Locking rules: see shmem.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_SHMEM_H
#define QES_SHMEM_H

#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/timestamp.h"

#define QES_LAST_ERROR_LEN 256

typedef struct QesWorkerState
{
	pg_atomic_uint64 wake_requests; /* commits that woke the worker (atomic) */
	pg_atomic_uint64 outbox_wakes;	/* those of them that queued Stripe requests (atomic) */
	pg_atomic_uint64 other_wakes;	/* those that queued other work than Stripe requests,
									 * counted before wake_requests (atomic) */
	LWLock	   *lock;			/* protects every field below */
	pid_t		pid;			/* 0 when no worker runs */
	Latch	   *latch;			/* the worker's MyLatch, NULL when none */
	TimestampTz started_at;
	TimestampTz last_loop_at;
	uint64		loops;
	uint64		latch_wakeups;	/* loops started because the latch was set */
	uint64		timeout_wakeups;	/* loops started by the naptime */
	int			naptime_ms;		/* naptime as the worker last read it */
	uint64		wakes_served;	/* wake_requests as read at the last loop start */
	uint64		reclaimed;		/* rows put back in the queue at start-up */
	uint64		xacts;			/* transactions the worker ran */
	int			max_subxids;	/* most subtransaction xids one of them cached */
	uint64		subxid_overflows;	/* transactions that overflowed that cache */
	bool		extension_present;
	bool		claims_may_be_lost; /* this server did not start from a clean
									 * shutdown of a primary (shmem.c) ... */
	TimestampTz lost_after;		/* ... so commits after this may be lost */
	TimestampTz unclean_started_at; /* when it started: later rows were never
									 * sent (DT_NOEND: it started in recovery,
									 * every row counts) */
	TimestampTz last_error_at;
	char		last_error[QES_LAST_ERROR_LEN];
} QesWorkerState;

extern QesWorkerState *qes_worker_state;

/* in the data directory from a start that was not clean until the worker's reclaim (shmem.c) */
#define QES_UNCLEAN_FILE "qes_billing.unclean_start"

extern void qes_shmem_init(void);
extern void qes_unclean_start_done(void);
extern void qes_set_worker_latch(void);

#endif							/* QES_SHMEM_H */
