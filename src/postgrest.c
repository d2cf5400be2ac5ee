/*-------------------------------------------------------------------------
 *
 * postgrest.c
 *	  What PostgREST passes to the database with a request: it sets
 *	  request.headers (a JSON object of the headers, names lower-cased) and
 *	  request.jwt.claims (the JWT's claims, a JSON object) for the
 *	  transaction of the request (README.md, "Roles and PostgREST").
 *
 * Read by the webhook intake (src/webhook_intake.c: Stripe-Signature) and
 * the rate limiter (src/guard.c: X-Forwarded-For, the tenant claim).
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "utils/guc.h"

#include "json_scan.h"
#include "postgrest.h"

/*
 * A request header PostgREST passed in request.headers (a JSON object with
 * lower-cased names), its value decoded as the JSON it is; NULL when absent.
 */
char *
qes_request_header(const char *name)
{
	return qes_json_top_level_string(GetConfigOption("request.headers", true, false), name);
}

/*
 * A string claim of the request's JWT (request.jwt.claims), decoded; NULL
 * when there is no JWT or no such string claim.
 */
char *
qes_request_claim(const char *name)
{
	const char *claims = GetConfigOption("request.jwt.claims", true, false);

	if (claims == NULL || claims[0] == '\0')
		return NULL;
	return qes_json_top_level_string(claims, name);
}
