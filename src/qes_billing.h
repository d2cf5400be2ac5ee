/*-------------------------------------------------------------------------
 *
 * qes_billing.h
 *	  Declarations shared by the qes_billing modules.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_BILLING_H
#define QES_BILLING_H

#include "postgres.h"

#define QES_EXTENSION_NAME	"qes_billing"
#define QES_VERSION			"0.2"
#define QES_WORKER_NAME		"qes_billing worker"

#if PG_VERSION_NUM < 150000
#error "qes_billing requires PostgreSQL 15 or later"
#endif

#endif							/* QES_BILLING_H */
