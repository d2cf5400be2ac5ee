/*-------------------------------------------------------------------------
 *
 * outbox.h
 *	  The worker's Stripe client (libcurl multi) over the outbox.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_OUTBOX_H
#define QES_OUTBOX_H

#include "datatype/timestamp.h"

extern bool qes_outbox_pump(bool *progress);
extern void qes_outbox_set_due(double due_s);
extern long qes_outbox_claim_wait_ms(void);
extern long qes_outbox_busy_wait_ms(void);
extern long qes_outbox_pace_wait_ms(void);
extern TimestampTz qes_outbox_tick_wanted(bool take);
extern void qes_outbox_flush_answers(void);

#endif							/* QES_OUTBOX_H */
