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

extern void qes_register_worker(void);
extern void qes_wake_at_commit(void);
extern void qes_wake_xact_event(XactEvent event);

extern PGDLLEXPORT void qes_worker_main(Datum main_arg);

#endif							/* QES_WORKER_H */
