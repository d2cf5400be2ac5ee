/*-------------------------------------------------------------------------
 *
 * catalog_cache.h
 *	  Backend-local cache of the plan catalog, the billing clock and tenants.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_CATALOG_CACHE_H
#define QES_CATALOG_CACHE_H

#include "datatype/timestamp.h"

#define QES_TENANT_ID_LEN	65		/* 64 characters and a NUL */
#define QES_METRIC_LEN		33
#define QES_PLAN_ID_LEN		33

typedef struct QesMetric
{
	char		name[QES_METRIC_LEN];
	bool		is_gauge;
} QesMetric;

typedef struct QesPlan
{
	char		plan_id[QES_PLAN_ID_LEN];
	char	   *name;
	int			tier;
	bool		active;
	bool		has_monthly;
	bool		has_yearly;
	int64		monthly_price;
	int64		yearly_price;
} QesPlan;

typedef struct QesLimit
{
	bool		defined;		/* a plan_limits row exists */
	bool		unlimited;		/* soft_limit IS NULL */
	int64		soft_limit;
	int32		hard_limit_pct; /* 0 when there is no hard ceiling */
} QesLimit;

/* A tenant's billing state at one moment. */
typedef struct QesTenantPlan
{
	int			plan;			/* index into the plan array */
	TimestampTz period_start;
	TimestampTz period_end;
	const char *reason;			/* why the limits are not the subscribed plan's, or NULL */
} QesTenantPlan;

extern void qes_run_as_owner(void (*fn) (void *), void *arg);
extern void qes_catalog_refresh(void);
extern int	qes_metric_lookup(const char *name);	/* -1 when unknown */
extern const QesMetric *qes_metric(int idx);
extern int	qes_metric_count(void);
extern const char *qes_metric_names(void);
extern const QesPlan *qes_plan(int idx);
extern int	qes_next_plan_up(int plan);	/* -1 when none */
extern Datum qes_upgrade_prompt(int plan, int metric);
extern const QesLimit *qes_limit(int plan, int metric);
extern int	qes_plan_count(void);
extern int	qes_feature_lookup(const char *name);	/* -1 when no plan lists it */
extern int	qes_feature_count(void);
extern const char *qes_feature_name(int idx);
extern const char *qes_feature_names(void);
extern bool qes_plan_has_feature(int plan, int feature);
extern TimestampTz qes_billing_now(void);
extern bool qes_tenant_plan(const char *tenant_id, TimestampTz at, QesTenantPlan *out);
extern void qes_validate_tenant_id(const char *tenant_id);

#include "utils/relcache.h"
extern void qes_catalog_register_callback(void);
extern void qes_catalog_invalidate_rel(Relation rel);
extern void qes_catalog_invalidate_all(void);

#endif							/* QES_CATALOG_CACHE_H */
