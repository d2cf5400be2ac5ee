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
/*
 * QES_VERSION is the extension's version, passed by the Makefile from
 * qes_billing.control's default_version (the one place it is written).
 */
#ifndef QES_VERSION
#error "QES_VERSION is not defined: build with the Makefile (it reads qes_billing.control)"
#endif
#define QES_WORKER_NAME		"qes_billing worker"

#if PG_VERSION_NUM < 150000
#error "qes_billing requires PostgreSQL 15 or later"
#endif

#endif							/* QES_BILLING_H */
