/*-------------------------------------------------------------------------
 *
 * notify.h
 *	  The worker's delivery of billing.notifications: email over SMTP and a
 *	  signed webhook to the platform (libcurl multi).
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_NOTIFY_H
#define QES_NOTIFY_H

/*
 * One turn: claim due notifications and start their deliveries, record the
 * deliveries that finished; never waits.  Runs no transaction when nothing
 * was queued since the last look (no wake-up) and nothing is due.  Lowers
 * *next_due_ms (-1: none) to when the next notification is due; *progress
 * says whether it claimed or recorded anything.  Returns true when
 * deliveries are in flight or more may be due, so the caller must not
 * sleep.
 */
extern bool qes_notify_pump(long *next_due_ms, bool *progress);

#endif							/* QES_NOTIFY_H */
