/*-------------------------------------------------------------------------
 *
 * redact.h
 *	  Masking secrets before anything is stored or logged (docs/architecture.md, rule 13).
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_REDACT_H
#define QES_REDACT_H

#include "utils/jsonb.h"

#define QES_REDACTED "[redacted]"

/* the shortest secret value qes_redact_secrets() looks for */
#define QES_REDACT_MIN_VALUE_LEN 4

extern bool qes_redact_needed(const char *s, int len);
extern char *qes_redact_cstring(const char *s);
extern char *qes_redact_secrets(const char *s);
extern Jsonb *qes_redact_jsonb(Jsonb *in);
extern void qes_redact_install_log_hook(void);

#endif							/* QES_REDACT_H */
