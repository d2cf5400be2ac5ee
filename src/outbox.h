/*-------------------------------------------------------------------------
 *
 * outbox.h
 *	  The worker's Stripe client (libcurl multi) over the outbox.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_OUTBOX_H
#define QES_OUTBOX_H

extern bool qes_outbox_pump(long budget_ms);
extern void qes_outbox_set_due(double due_s);
extern long qes_outbox_claim_wait_ms(void);
extern int	qes_outbox_in_flight(void);
extern long qes_outbox_busy_wait_ms(void);

#endif							/* QES_OUTBOX_H */
