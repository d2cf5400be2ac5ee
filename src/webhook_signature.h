/*-------------------------------------------------------------------------
 *
 * webhook_signature.h
 *	  Verification of Stripe's Stripe-Signature header.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_WEBHOOK_SIGNATURE_H
#define QES_WEBHOOK_SIGNATURE_H

#include "datatype/timestamp.h"

typedef enum QesSigResult
{
	QES_SIG_OK,
	QES_SIG_NO_HEADER,			/* missing or empty header */
	QES_SIG_NO_SECRET,			/* no signing secret configured */
	QES_SIG_MALFORMED,			/* no usable timestamp, or a field without '=' */
	QES_SIG_NO_V1,				/* no v1 signature */
	QES_SIG_MISMATCH,			/* no v1 matches any secret */
	QES_SIG_STALE				/* timestamp older than the tolerance */
} QesSigResult;

extern const char *qes_sig_result_code(QesSigResult r);
extern QesSigResult qes_verify_stripe_signature(const char *header,
												const char *payload, size_t payload_len,
												const char *secrets, int64 tolerance_s,
												int64 now_us);
extern int64 qes_unix_usecs(TimestampTz ts);

#endif							/* QES_WEBHOOK_SIGNATURE_H */
