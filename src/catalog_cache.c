/*-------------------------------------------------------------------------
 *
 * catalog_cache.c
 *	  Backend-local cache of the plan catalog, the billing clock and the
 *	  tenants' subscriptions, for the hot paths (record_usage, check_limit).
 *
 * Everything here is read from tables and is only a cache (docs/
 * architecture.md, "Caches").  It is invalidated by PostgreSQL's own
 * transactional invalidation messages: an AFTER STATEMENT trigger on each
 * table it copies (plans, plan_limits, prices, metrics, clock, tenants,
 * subscriptions) queues a relcache invalidation of that table, which
 * PostgreSQL sends when -- and only when -- the transaction commits
 * (also at COMMIT PREPARED, from the two-phase state file), writes into
 * the commit record so a hot standby replays it, and applies in the
 * writing backend itself at its next command and on abort.  A relcache
 * callback marks the cache stale when one of those tables (or everything)
 * is invalidated.
 *
 * A load reads with the newest snapshot (committed data plus this
 * transaction's own changes), never the transaction's snapshot: a
 * REPEATABLE READ transaction would otherwise cache what it saw at its
 * start after others had committed newer data and sent their messages.
 * Invalidations that arrive while loading (they are processed whenever a
 * lock is taken) leave the cache stale, so it loads again on the next call.
 * Own uncommitted changes are loaded only by the transaction that made
 * them, and its abort invalidates the cache again: nothing a rolled-back or
 * not yet visible transaction wrote outlives it.
 *
 * Loads run as the bootstrap superuser, so the cache does not depend on
 * which role (PostgREST switches roles per request) happened to fill it;
 * every query is therefore schema-qualified down to its operators.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/datum.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "catalog_cache.h"
#include "guc.h"

#define QES_MAX_CACHED_TENANTS 10000

typedef struct TenantEntry
{
	char		tenant_id[QES_TENANT_ID_LEN];	/* hash key */
	bool		exists;
	bool		has_subscription;
	int			plan;			/* subscribed plan */
	char		status[24];
	bool		yearly;
	bool		has_period;
	TimestampTz period_start;	/* Stripe's current_period_start ... */
	TimestampTz period_end;		/* ... and current_period_end */
	TimestampTz anchor;			/* billing_cycle_anchor (or inferred) */
	bool		has_grace;
	TimestampTz grace_until;
	/* the last paid subscription that ended, for the Free periods after it */
	bool		has_ended;
	TimestampTz ended_start;
	TimestampTz ended_end;
	/* the last answer, valid for `at` in [answer_from, answer_until) */
	bool		has_answer;
	TimestampTz answer_from;
	TimestampTz answer_until;
	QesTenantPlan answer;
} TenantEntry;

static MemoryContext cache_context = NULL;
static bool loaded = false;		/* the arrays below hold a complete load */
static bool cache_valid = false;	/* ... and no invalidation came since */
static uint64 inval_count = 0;	/* invalidations of our tables seen */

/* the tables copied here, as resolved at the last load */
#define QES_CACHED_TABLES 7
static const char *const cached_tables[QES_CACHED_TABLES] = {
	"metrics", "plans", "plan_limits", "prices", "clock", "tenants", "subscriptions"
};
static Oid	cached_relids[QES_CACHED_TABLES];

static QesMetric *metrics;
static int	nmetrics;
static char *metric_names;
static QesPlan *plans;
static int	nplans;
static QesLimit *limits;		/* nplans x nmetrics */
static Datum *prompts;			/* nplans x nmetrics upgrade prompts, built on use */
static bool *prompt_built;
static int	free_plan;
static char **features;			/* every feature some plan lists, sorted */
static int	nfeatures;
static char *feature_names;
static bool *plan_features;		/* nplans x nfeatures: the plan lists it */
static bool clock_has_offset;
static Interval clock_offset;
static HTAB *tenants;

static SPIPlanPtr tenant_plan = NULL;

/* ---- invalidation -------------------------------------------------------- */

/*
 * Relcache callback (registered in _PG_init): relid is InvalidOid when
 * everything is invalidated (for instance after the invalidation queue
 * overflowed).  Cheap: called for every relcache invalidation.
 */
static void
relcache_callback(Datum arg, Oid relid)
{
	for (int i = 0; i < QES_CACHED_TABLES; i++)
	{
		if (!OidIsValid(relid) || cached_relids[i] == relid)
		{
			cache_valid = false;
			inval_count++;
			return;
		}
	}
}

void
qes_catalog_register_callback(void)
{
	CacheRegisterRelcacheCallback(relcache_callback, (Datum) 0);
}

/*
 * billing.invalidate_cache_on_commit() calls this for the table it fires
 * on: a relcache invalidation, sent at commit, never on abort.
 */
void
qes_catalog_invalidate_rel(Relation rel)
{
	CacheInvalidateRelcache(rel);
}

/* Every backend drops its cache when this transaction commits. */
void
qes_catalog_invalidate_all(void)
{
	CacheInvalidateRelcacheAll();
}

/* ---- loading ------------------------------------------------------------ */

static int64
int64_col(HeapTuple tup, TupleDesc desc, int col, bool *isnull)
{
	Datum		d = SPI_getbinval(tup, desc, col, isnull);

	return *isnull ? 0 : DatumGetInt64(d);
}

static int
plan_index(const char *plan_id)
{
	for (int i = 0; i < nplans; i++)
		if (strcmp(plans[i].plan_id, plan_id) == 0)
			return i;
	return -1;
}

/*
 * Run fn as the bootstrap superuser inside its own SPI connection, so that
 * what it reads or writes does not depend on the calling role (PostgREST
 * switches roles per request) or its row-level security.  Every query run
 * this way is schema-qualified down to its operators.  An error aborts the
 * transaction, which restores the user id.
 */
void
qes_run_as_owner(void (*fn) (void *), void *arg)
{
	Oid			save_userid;
	int			save_sec_context;

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(BOOTSTRAP_SUPERUSERID,
						   save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "qes_billing: SPI_connect failed");
	fn(arg);
	SPI_finish();
	SetUserIdAndSecContext(save_userid, save_sec_context);
}

static void
load_catalog(void *arg)
{
	MemoryContext old;
	StringInfoData names;

	if (SPI_execute(/* result: text, bool */ "SELECT m.metric, m.kind OPERATOR(pg_catalog.=) 'gauge' FROM billing.metrics m ORDER BY 1",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing: could not read billing.metrics");
	old = MemoryContextSwitchTo(cache_context);
	nmetrics = SPI_processed;
	metrics = palloc0(sizeof(QesMetric) * Max(nmetrics, 1));
	initStringInfo(&names);
	for (int i = 0; i < nmetrics; i++)
	{
		bool		isnull;
		char	   *name = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);

		strlcpy(metrics[i].name, name, QES_METRIC_LEN);
		metrics[i].is_gauge = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull));
		appendStringInfo(&names, "%s%s", i ? ", " : "", name);
	}
	metric_names = names.data;
	MemoryContextSwitchTo(old);

	if (SPI_execute(/* result: text, text, int4, bool, int8, int8 */ "SELECT p.plan_id, p.name, p.tier, p.active,"
					" (SELECT pr.unit_amount FROM billing.prices pr WHERE pr.plan_id OPERATOR(pg_catalog.=) p.plan_id"
					"   AND pr.billing_interval OPERATOR(pg_catalog.=) 'month' AND pr.active"
					"   AND pr.currency OPERATOR(pg_catalog.=) 'usd'),"
					" (SELECT pr.unit_amount FROM billing.prices pr WHERE pr.plan_id OPERATOR(pg_catalog.=) p.plan_id"
					"   AND pr.billing_interval OPERATOR(pg_catalog.=) 'year' AND pr.active"
					"   AND pr.currency OPERATOR(pg_catalog.=) 'usd')"
					" FROM billing.plans p ORDER BY p.tier",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing: could not read billing.plans");
	old = MemoryContextSwitchTo(cache_context);
	nplans = SPI_processed;
	plans = palloc0(sizeof(QesPlan) * Max(nplans, 1));
	free_plan = -1;
	for (int i = 0; i < nplans; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		strlcpy(plans[i].plan_id, SPI_getvalue(tup, desc, 1), QES_PLAN_ID_LEN);
		plans[i].name = SPI_getvalue(tup, desc, 2);
		plans[i].tier = DatumGetInt32(SPI_getbinval(tup, desc, 3, &isnull));
		plans[i].active = DatumGetBool(SPI_getbinval(tup, desc, 4, &isnull));
		plans[i].monthly_price = int64_col(tup, desc, 5, &isnull);
		plans[i].has_monthly = !isnull;
		plans[i].yearly_price = int64_col(tup, desc, 6, &isnull);
		plans[i].has_yearly = !isnull;
		if (strcmp(plans[i].plan_id, "free") == 0)
			free_plan = i;
	}
	if (free_plan < 0 && nplans > 0)
		free_plan = 0;			/* the lowest tier stands in for Free */
	limits = palloc0(sizeof(QesLimit) * Max(nplans * nmetrics, 1));
	prompts = palloc0(sizeof(Datum) * Max(nplans * nmetrics, 1));
	prompt_built = palloc0(sizeof(bool) * Max(nplans * nmetrics, 1));
	MemoryContextSwitchTo(old);

	if (SPI_execute(/* result: text, text, int8, int4 */ "SELECT l.plan_id, l.metric, l.soft_limit, l.hard_limit_pct FROM billing.plan_limits l",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing: could not read billing.plan_limits");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		int			p = plan_index(SPI_getvalue(tup, desc, 1));
		int			m = qes_metric_lookup(SPI_getvalue(tup, desc, 2));
		bool		isnull;
		QesLimit   *l;

		if (p < 0 || m < 0)
			continue;
		l = &limits[p * nmetrics + m];
		l->defined = true;
		l->soft_limit = int64_col(tup, desc, 3, &isnull);
		l->unlimited = isnull;
		l->hard_limit_pct = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
		if (isnull)
			l->hard_limit_pct = 0;
	}

	/* features: what some plan lists; which plan lists which */
	if (SPI_execute(/* result: text, text */ "SELECT f.feature, p.plan_id"
					"  FROM billing.plans p, pg_catalog.unnest(p.features) f(feature)"
					" WHERE f.feature IS NOT NULL"
					" ORDER BY f.feature COLLATE \"C\", p.plan_id COLLATE \"C\"",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing: could not read billing.plans.features");
	old = MemoryContextSwitchTo(cache_context);
	features = palloc0(sizeof(char *) * Max(SPI_processed, 1));
	nfeatures = 0;
	initStringInfo(&names);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		char	   *f = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);

		if (nfeatures == 0 || strcmp(features[nfeatures - 1], f) != 0)
		{
			appendStringInfo(&names, "%s%s", nfeatures ? ", " : "", f);
			features[nfeatures++] = pstrdup(f);
		}
	}
	feature_names = names.data;
	plan_features = palloc0(sizeof(bool) * Max(nplans * nfeatures, 1));
	for (uint64 i = 0, f = 0; i < SPI_processed; i++)
	{
		char	   *name = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		int			p = plan_index(SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2));

		while (strcmp(features[f], name) != 0)
			f++;
		if (p >= 0)
			plan_features[p * nfeatures + f] = true;
	}
	MemoryContextSwitchTo(old);

	clock_has_offset = false;
	if (SPI_execute(/* result: interval */ "SELECT c.offset_by FROM billing.clock c", true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
		{
			memcpy(&clock_offset, DatumGetIntervalP(d), sizeof(Interval));
			clock_has_offset = (clock_offset.time != 0 || clock_offset.day != 0 ||
								clock_offset.month != 0);
		}
	}
}

/* The OIDs of the cached tables, as the catalog has them now. */
static void
resolve_cached_tables(void)
{
	Oid			nsp = get_namespace_oid("billing", true);

	for (int i = 0; i < QES_CACHED_TABLES; i++)
		cached_relids[i] = OidIsValid(nsp) ? get_relname_relid(cached_tables[i], nsp) : InvalidOid;
}

/*
 * Run fn as the table owner under the newest snapshot (see the header).
 */
static void
run_latest(void (*fn) (void *), void *arg)
{
	PushActiveSnapshot(GetLatestSnapshot());
	qes_run_as_owner(fn, arg);
	PopActiveSnapshot();
}

/*
 * Make sure the cache matches the committed catalog (and this
 * transaction's own changes to it).
 */
void
qes_catalog_refresh(void)
{
	HASHCTL		ctl;
	uint64		seen;

	/* messages other sessions (or WAL replay) sent since we last looked */
	AcceptInvalidationMessages();
	if (loaded && cache_valid)
		return;

	if (cache_context == NULL)
		cache_context = AllocSetContextCreate(TopMemoryContext,
											  "qes_billing catalog cache",
											  ALLOCSET_SMALL_SIZES);
	loaded = false;
	MemoryContextReset(cache_context);
	tenants = NULL;

	resolve_cached_tables();
	seen = inval_count;
	cache_valid = true;
	run_latest(load_catalog, NULL);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = QES_TENANT_ID_LEN;
	ctl.entrysize = sizeof(TenantEntry);
	ctl.hcxt = cache_context;
	tenants = hash_create("qes_billing tenant cache", 256, &ctl,
						  HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);

	loaded = true;
	/* an invalidation during the load: use it for this call, load again next */
	if (inval_count != seen)
		cache_valid = false;
}

/* ---- catalog accessors -------------------------------------------------- */

int
qes_metric_lookup(const char *name)
{
	for (int i = 0; i < nmetrics; i++)
		if (strcmp(metrics[i].name, name) == 0)
			return i;
	return -1;
}

const QesMetric *
qes_metric(int idx)
{
	return &metrics[idx];
}

int
qes_metric_count(void)
{
	return nmetrics;
}

const char *
qes_metric_names(void)
{
	return metric_names;
}

const QesPlan *
qes_plan(int idx)
{
	return &plans[idx];
}

const QesLimit *
qes_limit(int plan, int metric)
{
	return &limits[plan * nmetrics + metric];
}

/* Features: every one some plan lists (sorted), and which plan lists it. */
int
qes_feature_lookup(const char *name)
{
	for (int i = 0; i < nfeatures; i++)
		if (strcmp(features[i], name) == 0)
			return i;
	return -1;
}

int
qes_feature_count(void)
{
	return nfeatures;
}

const char *
qes_feature_name(int idx)
{
	return features[idx];
}

const char *
qes_feature_names(void)
{
	return feature_names;
}

bool
qes_plan_has_feature(int plan, int feature)
{
	return plan_features[plan * nfeatures + feature];
}

int
qes_plan_count(void)
{
	return nplans;
}

/*
 * The upgrade offered to a tenant of `plan` near or over its limit for
 * `metric`: the next plan up, its limit and prices, as jsonb; (Datum) 0 when
 * there is no plan up.  Built once per catalog generation.
 */
Datum
qes_upgrade_prompt(int plan, int metric)
{
	int			idx = plan * nmetrics + metric;
	int			up;
	const QesPlan *p;
	const QesLimit *l;
	StringInfoData s;
	MemoryContext old;

	if (prompt_built[idx])
		return prompts[idx];
	up = qes_next_plan_up(plan);
	if (up >= 0)
	{
		p = &plans[up];
		l = &limits[up * nmetrics + metric];
		initStringInfo(&s);
		appendStringInfoString(&s, "{\"plan_id\": ");
		escape_json(&s, p->plan_id);
		appendStringInfoString(&s, ", \"name\": ");
		escape_json(&s, p->name);
		if (!l->defined || l->unlimited)
			appendStringInfoString(&s, ", \"limit\": null");
		else
			appendStringInfo(&s, ", \"limit\": " INT64_FORMAT, l->soft_limit);
		if (p->has_monthly)
			appendStringInfo(&s, ", \"monthly_price\": " INT64_FORMAT, p->monthly_price);
		if (p->has_yearly)
			appendStringInfo(&s, ", \"yearly_price\": " INT64_FORMAT, p->yearly_price);
		appendStringInfoString(&s, ", \"currency\": \"usd\"}");
		old = MemoryContextSwitchTo(cache_context);
		prompts[idx] = datumCopy(DirectFunctionCall1(jsonb_in, CStringGetDatum(s.data)), false, -1);
		MemoryContextSwitchTo(old);
	}
	prompt_built[idx] = true;
	return prompts[idx];
}

/* The next active plan up from this one (plans are sorted by tier). */
int
qes_next_plan_up(int plan)
{
	for (int i = 0; i < nplans; i++)
		if (plans[i].active && plans[i].tier > plans[plan].tier)
			return i;
	return -1;
}

/*
 * billing.now(): the transaction's start shifted by the billing clock
 * outside production (the same value as the SQL function billing.now()).
 */
TimestampTz
qes_billing_now(void)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();

	if (clock_has_offset && qes_environment() != QES_ENV_PRODUCTION)
		now = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													  TimestampTzGetDatum(now),
													  IntervalPGetDatum(&clock_offset)));
	return now;
}

/* ---- periods (UTC) ------------------------------------------------------ */

static TimestampTz
add_months_utc(TimestampTz ts, int months)
{
	struct pg_tm tm;
	fsec_t		fsec;
	int			m;
	TimestampTz result;

	if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR, (errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE), errmsg("timestamp out of range")));
	m = tm.tm_year * 12 + (tm.tm_mon - 1) + months;
	tm.tm_year = m / 12;
	tm.tm_mon = m % 12 + 1;
	if (tm.tm_mday > day_tab[isleap(tm.tm_year)][tm.tm_mon - 1])
		tm.tm_mday = day_tab[isleap(tm.tm_year)][tm.tm_mon - 1];
	if (tm2timestamp(&tm, fsec, NULL, &result) != 0)
		ereport(ERROR, (errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE), errmsg("timestamp out of range")));
	return result;
}

static TimestampTz
month_start_utc(TimestampTz ts)
{
	struct pg_tm tm;
	fsec_t		fsec;
	TimestampTz result;

	if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR, (errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE), errmsg("timestamp out of range")));
	tm.tm_mday = 1;
	tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
	if (tm2timestamp(&tm, 0, NULL, &result) != 0)
		ereport(ERROR, (errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE), errmsg("timestamp out of range")));
	return result;
}

/* Whole months from a to b (UTC), ignoring the day. */
static int
months_between(TimestampTz a, TimestampTz b)
{
	struct pg_tm ta,
				tb;
	fsec_t		fsec;

	if (timestamp2tm(a, NULL, &ta, &fsec, NULL, NULL) != 0 ||
		timestamp2tm(b, NULL, &tb, &fsec, NULL, NULL) != 0)
		ereport(ERROR, (errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE), errmsg("timestamp out of range")));
	return (tb.tm_year - ta.tm_year) * 12 + (tb.tm_mon - ta.tm_mon);
}

/*
 * The subscription period containing ts, as Stripe computes it
 * (docs/architecture.md, "Billing periods"): [period_start, period_end) is
 * Stripe's current period, exactly; before and after it the periods step
 * from the billing cycle anchor by `step` months (12 for yearly), each
 * boundary anchor + k * step months with the anchor's day clamped to the
 * month's length (an anchor on the 31st bills on Feb 28 or 29, then on
 * Mar 31; a yearly anchor on Feb 29 bills on Feb 28 in common years).
 * Every boundary is computed from the anchor, never from the previous
 * boundary, so a clamped day does not stick.
 */
static void
stripe_period(TimestampTz cps, TimestampTz cpe, TimestampTz anchor, int step,
			  TimestampTz ts, TimestampTz *start, TimestampTz *end)
{
	int			k;

	if (ts >= cps && ts < cpe)
	{
		*start = cps;
		*end = cpe;
		return;
	}
	if (ts >= cpe)
	{
		/* the first boundary after the current period, then on */
		k = months_between(anchor, cpe) / step - 1;
		while (add_months_utc(anchor, k * step) <= cpe)
			k++;
		*start = cpe;
		*end = add_months_utc(anchor, k * step);
		while (ts >= *end)
		{
			*start = *end;
			k++;
			*end = add_months_utc(anchor, k * step);
		}
		return;
	}
	/* before the current period (usage reported late, or an earlier clock) */
	k = months_between(anchor, cps) / step + 1;
	while (add_months_utc(anchor, k * step) >= cps)
		k--;
	*end = cps;
	*start = add_months_utc(anchor, k * step);
	while (ts < *start)
	{
		*end = *start;
		k--;
		*start = add_months_utc(anchor, k * step);
	}
}

/*
 * The anchor periods step from: Stripe's billing_cycle_anchor when the
 * mirror has it; else the current period's start when one step from it
 * gives its end (an anchor on the 31st, a period from Jan 31 to Feb 28),
 * else its end (after a trial, or an anchor later in the month than the
 * start's day).
 */
static TimestampTz
infer_anchor(TimestampTz cps, TimestampTz cpe, int step)
{
	return add_months_utc(cps, step) == cpe ? cps : cpe;
}

/*
 * A Free tenant's period containing ts: the calendar month (UTC), except
 * around a paid subscription that ended: its last period runs to its end
 * (with Free limits when it ended early), then a period runs from that end
 * to the start of the next calendar month, and the calendar month in which
 * its last period began ends there.  So the periods never overlap: usage is
 * never counted in two periods and a change of regime loses none.
 */
static void
free_period(const TenantEntry *e, TimestampTz ts, TimestampTz *start, TimestampTz *end)
{
	if (e->has_ended && ts >= e->ended_start && ts < e->ended_end)
	{
		*start = e->ended_start;
		*end = e->ended_end;
		return;
	}
	if (e->has_ended && ts >= e->ended_end)
	{
		TimestampTz next = add_months_utc(month_start_utc(e->ended_end), 1);

		if (ts < next)
		{
			*start = e->ended_end;
			*end = next;
			return;
		}
	}
	*start = month_start_utc(ts);
	*end = add_months_utc(*start, 1);
	/* the calendar month before that subscription's last period ends at it */
	if (e->has_ended && ts < e->ended_start && *end > e->ended_start)
		*end = e->ended_start;
}

/* ---- tenants ------------------------------------------------------------ */

void
qes_validate_tenant_id(const char *tenant_id)
{
	size_t		len = strlen(tenant_id);

	if (len == 0 || len >= QES_TENANT_ID_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid tenant id \"%s\"", tenant_id),
				 errhint("A tenant id is 1 to 64 characters.")));
}

typedef struct TenantLoad
{
	const char *tenant_id;
	TenantEntry *entry;
} TenantLoad;

static void
load_tenant(void *arg)
{
	TenantLoad *tl = (TenantLoad *) arg;
	TenantEntry *e = tl->entry;
	Datum		value = CStringGetTextDatum(tl->tenant_id);
	Oid			argtype = TEXTOID;
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;

	if (tenant_plan == NULL)
	{
		/* s: the current subscription; x: the last paid one that ended */
		tenant_plan = SPI_prepare(/* result: text, text, bool, timestamptz, timestamptz, timestamptz, bool, timestamptz, timestamptz, timestamptz */
			"SELECT s.plan_id, s.status, s.billing_interval OPERATOR(pg_catalog.=) 'year',"
			"       s.current_period_start, s.current_period_end, s.grace_until, s.tenant_id IS NOT NULL,"
			"       s.billing_cycle_anchor, x.current_period_start, x.current_period_end"
			"  FROM billing.tenants t"
			"  LEFT JOIN LATERAL (SELECT * FROM billing.subscriptions s"
			"                      WHERE s.tenant_id OPERATOR(pg_catalog.=) t.tenant_id"
			"                        AND s.status OPERATOR(pg_catalog.<>) ALL ('{canceled,incomplete_expired}'::pg_catalog.text[])"
			"                      ORDER BY s.subscription_id DESC LIMIT 1) s ON true"
			"  LEFT JOIN LATERAL (SELECT * FROM billing.subscriptions x"
			"                      WHERE x.tenant_id OPERATOR(pg_catalog.=) t.tenant_id"
			"                        AND x.status OPERATOR(pg_catalog.=) 'canceled'"
			"                        AND x.current_period_start IS NOT NULL"
			"                        AND x.current_period_end OPERATOR(pg_catalog.>) x.current_period_start"
			"                      ORDER BY x.current_period_end DESC, x.subscription_id DESC LIMIT 1) x ON true"
			" WHERE t.tenant_id OPERATOR(pg_catalog.=) $1",
			1, &argtype);
		if (tenant_plan == NULL)
			elog(ERROR, "qes_billing: could not prepare the tenant query");
		SPI_keepplan(tenant_plan);
	}
	if (SPI_execute_plan(tenant_plan, &value, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "qes_billing: could not read tenant");

	e->exists = (SPI_processed == 1);
	e->has_subscription = false;
	e->has_ended = false;
	e->has_period = false;
	e->has_answer = false;
	if (!e->exists)
		return;
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	e->ended_start = DatumGetTimestampTz(SPI_getbinval(tup, desc, 9, &isnull));
	if (!isnull)
	{
		e->ended_end = DatumGetTimestampTz(SPI_getbinval(tup, desc, 10, &isnull));
		e->has_ended = !isnull;
	}
	e->has_subscription = DatumGetBool(SPI_getbinval(tup, desc, 7, &isnull));
	if (!e->has_subscription)
		return;
	e->plan = plan_index(SPI_getvalue(tup, desc, 1));
	strlcpy(e->status, SPI_getvalue(tup, desc, 2), sizeof(e->status));
	e->yearly = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));
	e->period_start = DatumGetTimestampTz(SPI_getbinval(tup, desc, 4, &isnull));
	e->has_period = !isnull;
	e->period_end = DatumGetTimestampTz(SPI_getbinval(tup, desc, 5, &isnull));
	e->has_period = e->has_period && !isnull;
	e->grace_until = DatumGetTimestampTz(SPI_getbinval(tup, desc, 6, &isnull));
	e->has_grace = !isnull;
	if (e->has_period)
	{
		if (e->period_end <= e->period_start)
			e->has_period = false;
		else
		{
			e->anchor = DatumGetTimestampTz(SPI_getbinval(tup, desc, 8, &isnull));
			if (isnull)
				e->anchor = infer_anchor(e->period_start, e->period_end, e->yearly ? 12 : 1);
		}
	}
}

/*
 * The plan whose limits apply to the tenant at time `at`, and the billing
 * period containing `at`.  Returns false when the tenant is not registered.
 */
bool
qes_tenant_plan(const char *tenant_id, TimestampTz at, QesTenantPlan *out)
{
	TenantEntry *e;
	bool		found;
	bool		subscribed = false;

	qes_catalog_refresh();
	e = hash_search(tenants, tenant_id, HASH_FIND, NULL);
	if (e == NULL)
	{
		TenantLoad	tl;

		uint64		seen;

		if (hash_get_num_entries(tenants) >= QES_MAX_CACHED_TENANTS)
		{
			cache_valid = false;	/* bounded: start over */
			qes_catalog_refresh();
		}
		e = hash_search(tenants, tenant_id, HASH_ENTER, &found);
		tl.tenant_id = tenant_id;
		tl.entry = e;
		seen = inval_count;
		PG_TRY();
		{
			run_latest(load_tenant, &tl);
		}
		PG_CATCH();
		{
			/* restore state: no half-loaded entry survives */
			hash_search(tenants, tenant_id, HASH_REMOVE, NULL);
			PG_RE_THROW();
		}
		PG_END_TRY();
		/* invalidated while loading: answer with it, load afresh next time */
		if (inval_count != seen)
			cache_valid = false;
	}
	if (!e->exists)
		return false;
	if (e->has_answer && at >= e->answer_from && at < e->answer_until)
	{
		*out = e->answer;
		return true;
	}

	out->plan = free_plan;
	out->reason = NULL;
	if (e->has_subscription && e->plan >= 0)
	{
		if (strcmp(e->status, "active") == 0 || strcmp(e->status, "trialing") == 0)
			subscribed = true;
		else if (strcmp(e->status, "past_due") == 0)
		{
			if (!e->has_grace || at < e->grace_until)
				subscribed = true;
			else
				out->reason = "the grace period after a failed payment has ended: Free limits apply until the invoice is paid";
		}
		else if (strcmp(e->status, "incomplete") == 0)
			out->reason = "the subscription is waiting for its first payment: Free limits apply until it is paid";
		else
			out->reason = "the subscription is not active: Free limits apply";
	}
	if (subscribed)
		out->plan = e->plan;

	/*
	 * The period (docs/architecture.md, "Billing periods"): a subscription
	 * Stripe has -- trialing, active, past_due, unpaid, paused -- bills in
	 * Stripe's periods whichever limits apply (after the grace period the
	 * period goes on, with Free limits), so no change of limits moves usage
	 * to another period.  One waiting for its first payment (incomplete),
	 * a local one and none at all are on the Free periods.
	 */
	if (e->has_subscription && e->has_period && strcmp(e->status, "incomplete") != 0)
		stripe_period(e->period_start, e->period_end, e->anchor, e->yearly ? 12 : 1, at,
					  &out->period_start, &out->period_end);
	else
		free_period(e, at, &out->period_start, &out->period_end);

	/* the answer holds within the period, on one side of the grace period's end */
	e->answer = *out;
	e->answer_from = out->period_start;
	e->answer_until = out->period_end;
	if (e->has_subscription && e->has_grace && strcmp(e->status, "past_due") == 0)
	{
		if (at < e->grace_until && e->grace_until < e->answer_until)
			e->answer_until = e->grace_until;
		else if (at >= e->grace_until && e->grace_until > e->answer_from)
			e->answer_from = e->grace_until;
	}
	e->has_answer = true;
	return true;
}
