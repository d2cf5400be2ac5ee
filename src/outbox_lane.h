/*-------------------------------------------------------------------------
 *
 * outbox_lane.h
 *	  The outbox's direct lane: a request claimed by the transaction that
 *	  queues it and handed to the worker through shared memory.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_OUTBOX_LANE_H
#define QES_OUTBOX_LANE_H

#include "access/xact.h"
#include "datatype/timestamp.h"

/* requests on their way to the worker, at most */
#define QES_LANE_SLOTS		32
/* room for a request's path, form and Idempotency-Key in a slot */
#define QES_LANE_BYTES		4096
#define QES_LANE_KEY_MAX	255

/* a request taken from the lane by the worker (a copy, its own memory) */
typedef struct QesLaneRequest
{
	bool		unknown;		/* its transaction's fate is not known: release it, never send */
	Oid			extoid;			/* the incarnation of the extension it was queued in */
	int64		request_id;
	TimestampTz reserved_at;	/* when its transaction queued it */
	char		method[8];
	char	   *path;			/* these three point into data */
	char	   *form;
	char	   *idempotency_key;
	char		data[QES_LANE_BYTES];
} QesLaneRequest;

/* shared memory (shmem.c) */
extern void qes_lane_request(void);
extern void qes_lane_startup(void);

/* backends: transaction and subtransaction ends (qes_billing.c) */
extern void qes_lane_xact_event(XactEvent event);
extern void qes_lane_subxact_abort(SubTransactionId subid);
/* the wake-up trigger: did this INSERT queue a request the lane took? */
extern bool qes_lane_take_insert(void);

/* the worker */
extern void qes_lane_publish(bool open, Oid extoid);
extern bool qes_lane_has_work(void);
extern int	qes_lane_take(QesLaneRequest *out, int max);
extern void qes_lane_worker_start(void);
extern uint64 qes_lane_waiters(void);
extern void qes_lane_count(int sent, int released);

#endif							/* QES_OUTBOX_LANE_H */
