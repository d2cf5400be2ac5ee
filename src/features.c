/*-------------------------------------------------------------------------
 *
 * features.c
 *	  has_feature and features_current: plan features as entitlements.
 *
 * A feature is one of the names billing.plans.features lists.  Whether a
 * tenant may use it now is decided exactly as check_limit decides which
 * limits apply (catalog_cache.c, qes_tenant_plan): the plan Stripe's
 * mirrored state implies at billing.now() -- a trial and a past_due
 * subscription inside its grace period keep their plan; one waiting for its
 * first payment, past its grace period, unpaid, paused or ended falls back
 * to Free.  The same backend cache answers, so the cost is check_limit's
 * without the counter (docs/architecture.md, "Plan features").
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"

#include "catalog_cache.h"

PG_FUNCTION_INFO_V1(qes_has_feature);
PG_FUNCTION_INFO_V1(qes_features_current);

static void
require_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

static void
tenant_plan_or_error(const char *tenant_id, QesTenantPlan *tp)
{
	qes_validate_tenant_id(tenant_id);
	if (!qes_tenant_plan(tenant_id, qes_billing_now(), tp))
		ereport(ERROR,
				(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
				 errmsg("tenant \"%s\" is not registered", tenant_id),
				 errhint("Register the tenant first with billing.upsert_tenant().")));
}

/* The lowest-tier active plan that lists the feature, or -1. */
static int
plan_offering(int feature)
{
	for (int p = 0; p < qes_plan_count(); p++)	/* sorted by tier */
		if (qes_plan(p)->active && qes_plan_has_feature(p, feature))
			return p;
	return -1;
}

/*
 * billing.has_feature(tenant_id, feature) returns boolean
 */
Datum
qes_has_feature(PG_FUNCTION_ARGS)
{
	char	   *tenant_id;
	char	   *name;
	int			feature;
	QesTenantPlan tp;

	require_arg(fcinfo, 0, "tenant_id");
	require_arg(fcinfo, 1, "feature");
	tenant_id = text_to_cstring(PG_GETARG_TEXT_PP(0));
	name = text_to_cstring(PG_GETARG_TEXT_PP(1));

	qes_catalog_refresh();
	feature = qes_feature_lookup(name);
	if (feature < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown feature \"%s\"", name),
				 qes_feature_count() > 0
				 ? errhint("Features are: %s.", qes_feature_names())
				 : errhint("No plan lists a feature (billing.plans.features).")));
	tenant_plan_or_error(tenant_id, &tp);
	PG_RETURN_BOOL(qes_plan_has_feature(tp.plan, feature));
}

/*
 * billing.features_current(tenant_id): every feature, whether the tenant
 * may use it now, the plan whose features apply, why it is not the
 * subscribed plan (as check_limit's reason), and the lowest plan that has
 * the feature.
 */
Datum
qes_features_current(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *tenant_id;
	QesTenantPlan tp;

	require_arg(fcinfo, 0, "tenant_id");
	tenant_id = text_to_cstring(PG_GETARG_TEXT_PP(0));
	InitMaterializedSRF(fcinfo, 0);
	qes_catalog_refresh();
	tenant_plan_or_error(tenant_id, &tp);

	for (int f = 0; f < qes_feature_count(); f++)
	{
		Datum		values[5];
		bool		nulls[5] = {0};
		int			offering = plan_offering(f);

		values[0] = CStringGetTextDatum(qes_feature_name(f));
		values[1] = BoolGetDatum(qes_plan_has_feature(tp.plan, f));
		values[2] = CStringGetTextDatum(qes_plan(tp.plan)->plan_id);
		if (tp.reason)
			values[3] = CStringGetTextDatum(tp.reason);
		else
			nulls[3] = true;
		if (offering >= 0)
			values[4] = CStringGetTextDatum(qes_plan(offering)->plan_id);
		else
			nulls[4] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
