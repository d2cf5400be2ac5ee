/*-------------------------------------------------------------------------
 *
 * webhook_intake.h
 *	  api.stripe_webhook, and reading what PostgREST passes in settings.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_WEBHOOK_INTAKE_H
#define QES_WEBHOOK_INTAKE_H

extern char *qes_json_top_level_string(const char *json, const char *key);
extern char *qes_request_header(const char *name);

#endif							/* QES_WEBHOOK_INTAKE_H */
