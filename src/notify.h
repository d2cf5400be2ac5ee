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
 * Deliver due notifications for at most budget_ms.  Runs no transaction
 * when nothing was queued since the last look (no wake-up) and nothing is
 * due.  Lowers *next_due_ms (-1: none) to when the next notification is
 * due.  Returns true when deliveries are in flight or more may be due, so
 * the caller must not sleep.
 */
extern bool qes_notify_pump(long budget_ms, long *next_due_ms);

#endif							/* QES_NOTIFY_H */
