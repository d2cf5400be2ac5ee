/*-------------------------------------------------------------------------
 *
 * audit.h
 *	  The hash chain of the audit log.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_AUDIT_H
#define QES_AUDIT_H

#define QES_AUDIT_HASH_LEN 32	/* SHA-256 */

#endif							/* QES_AUDIT_H */
