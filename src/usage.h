/*-------------------------------------------------------------------------
 *
 * usage.h
 *	  record_usage and check_limit: the hot paths (src/usage.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_USAGE_H
#define QES_USAGE_H

extern void qes_usage_init(void);
extern void qes_usage_at_xact_end(void);

#endif							/* QES_USAGE_H */
