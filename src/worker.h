/*-------------------------------------------------------------------------
 *
 * worker.h
 *	  The qes_billing background worker and how backends wake it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_WORKER_H
#define QES_WORKER_H

#include "access/xact.h"
#include "utils/palloc.h"

extern void qes_register_worker(void);
extern void qes_wake_at_commit(void);
extern void qes_wake_xact_event(XactEvent event);

extern PGDLLEXPORT void qes_worker_main(Datum main_arg);

/* for the worker's modules (outbox.c) */
extern MemoryContext qes_worker_loop_context;
extern Oid	qes_worker_begin_xact(const char *activity);	/* the extension, or InvalidOid */
extern void qes_worker_end_xact(void);
extern void qes_worker_note_error(const char *message);
extern Oid	qes_worker_incarnation(void);
extern int	qes_worker_subxids(void);

/*
 * A worker transaction commits before its PGPROC caches more subtransaction
 * xids than this (PGPROC_MAX_CACHED_SUBXIDS is 64): what one more step may
 * take stays below the overflow that slows every snapshot in the cluster.
 */
#define QES_SUBXID_BUDGET 48

extern void qes_worker_request_tick(long ms);

#endif							/* QES_WORKER_H */
