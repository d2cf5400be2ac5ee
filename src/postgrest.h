/*-------------------------------------------------------------------------
 *
 * postgrest.h
 *	  What PostgREST passes to the database with a request.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_POSTGREST_H
#define QES_POSTGREST_H

extern char *qes_request_header(const char *name);
extern char *qes_request_claim(const char *name);

#endif							/* QES_POSTGREST_H */
