/*-------------------------------------------------------------------------
 *
 * guard.h
 *	  Abuse protection: webhook rejection counters and inbound rate
 *	  limiting, in shared memory.  Locking rules: see guard.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_GUARD_H
#define QES_GUARD_H

/* why a webhook delivery was refused (the order of guard.c's names) */
typedef enum QesRejectReason
{
	QES_REJECT_NO_HEADER,
	QES_REJECT_MALFORMED,
	QES_REJECT_NO_V1,
	QES_REJECT_MISMATCH,
	QES_REJECT_STALE,
	QES_REJECT_NO_SECRET,
	QES_REJECT_NOT_AN_EVENT,
	QES_REJECT_WRONG_MODE,
	QES_REJECT_BAD_TYPE,
	QES_REJECT_BAD_CREATED,
	QES_REJECT_BAD_ENCODING,
	QES_REJECT_ESCAPED_KEY,
	QES_REJECT_NREASONS
} QesRejectReason;


extern void qes_guard_request(void);
extern void qes_guard_startup(void);
extern const char *qes_reject_reason_name(QesRejectReason r);
extern const char *qes_reject_reason_message(QesRejectReason r, bool live);
extern void qes_guard_count_rejection(QesRejectReason r);
extern bool qes_guard_rejections_pending(void);
extern void qes_guard_at_commit(void);
extern void qes_guard_at_abort(void);
extern void qes_guard_refuse_prepare(void);
extern void qes_guard_at_subabort(SubTransactionId mysubid);

#endif							/* QES_GUARD_H */
