/*-------------------------------------------------------------------------
 *
 * stripe_form.h
 *	  Stripe's form encoding of request parameters, from jsonb.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_STRIPE_FORM_H
#define QES_STRIPE_FORM_H

#include "utils/jsonb.h"

extern char *qes_stripe_form_encode(Jsonb *params);

#endif							/* QES_STRIPE_FORM_H */
