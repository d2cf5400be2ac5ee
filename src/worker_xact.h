/*-------------------------------------------------------------------------
 *
 * worker_xact.h
 *	  The worker's transactions, for the loop (src/worker.c) and the pumps
 *	  below it (src/outbox.c, src/notify.c): begin and end one, run a step
 *	  in a subtransaction, keep the worker's last error.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_WORKER_XACT_H
#define QES_WORKER_XACT_H

/*
 * A worker transaction commits before its PGPROC caches more subtransaction
 * xids than this (PGPROC_MAX_CACHED_SUBXIDS is 64): what one more step may
 * take stays below the overflow that slows every snapshot in the cluster.
 */
#define QES_SUBXID_BUDGET 48

/* one step of a transaction, run by qes_worker_subxact() */
typedef void (*QesSubxactStep) (void *arg);

extern Oid	qes_worker_begin_xact(const char *activity);
extern void qes_worker_end_xact(void);
extern void qes_worker_abort_xact(void);
extern bool qes_worker_subxact(QesSubxactStep step, void *arg, const char *failure);
extern int	qes_worker_subxids(void);
extern void qes_worker_note_error(const char *message);
extern Oid	qes_worker_incarnation(void);
extern void qes_worker_set_incarnation(Oid extoid);

#endif							/* QES_WORKER_XACT_H */
