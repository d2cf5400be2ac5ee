/*-------------------------------------------------------------------------
 *
 * config.c
 *	  SQL-callable views of the configuration (see guc.c).
 *
 * None of these returns a secret: the publishable key is public by Stripe's
 * design, and problems name the variable at fault, never its value.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "fmgr.h"
#include "utils/builtins.h"

#include "guc.h"

PG_FUNCTION_INFO_V1(qes_environment_fn);
PG_FUNCTION_INFO_V1(qes_stripe_mode_fn);
PG_FUNCTION_INFO_V1(qes_base_url_fn);
PG_FUNCTION_INFO_V1(qes_publishable_key_fn);
PG_FUNCTION_INFO_V1(qes_stripe_key_problem_fn);
PG_FUNCTION_INFO_V1(qes_require_stripe_keys_fn);

static QesKeyKind
parse_key_kind(text *t)
{
	char	   *s = text_to_cstring(t);

	if (strcmp(s, "secret") == 0)
		return QES_KEY_SECRET;
	if (strcmp(s, "publishable") == 0)
		return QES_KEY_PUBLISHABLE;
	if (strcmp(s, "webhook") == 0)
		return QES_KEY_WEBHOOK;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown Stripe key kind \"%s\"", s),
			 errhint("Use secret, publishable or webhook.")));
	return QES_KEY_SECRET;		/* keep compiler quiet */
}

/*
 * billing.environment(): development, staging or production.  Also where
 * the test-only qes_billing.debug_fault plants its memory error.
 */
Datum
qes_environment_fn(PG_FUNCTION_ARGS)
{
	qes_debug_fault_point();
	PG_RETURN_TEXT_P(cstring_to_text(qes_environment_name(qes_environment())));
}

/* billing.stripe_mode(): test or live, following the environment */
Datum
qes_stripe_mode_fn(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(qes_live_mode() ? "live" : "test"));
}

/* billing.base_url(): QES_BASE_URL or its override, NULL when unset */
Datum
qes_base_url_fn(PG_FUNCTION_ARGS)
{
	const char *url = qes_base_url();

	if (url == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(url));
}

/* billing.publishable_key(): NULL when unset, an error when of the wrong mode */
Datum
qes_publishable_key_fn(PG_FUNCTION_ARGS)
{
	const char *key = qes_stripe_key(QES_KEY_PUBLISHABLE, true);

	if (key == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(key));
}

/* billing.stripe_key_problem(kind): NULL when usable, else why not */
Datum
qes_stripe_key_problem_fn(PG_FUNCTION_ARGS)
{
	char	   *problem;

	if (!qes_stripe_key_problem(parse_key_kind(PG_GETARG_TEXT_PP(0)), &problem))
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(problem));
}

/* billing.require_stripe_keys(): the first problem with any key, as an error */
Datum
qes_require_stripe_keys_fn(PG_FUNCTION_ARGS)
{
	(void) qes_stripe_key(QES_KEY_SECRET, false);
	(void) qes_stripe_key(QES_KEY_PUBLISHABLE, false);
	(void) qes_stripe_key(QES_KEY_WEBHOOK, false);
	PG_RETURN_VOID();
}
