/*-------------------------------------------------------------------------
 *
 * guc.c
 *	  Settings of qes_billing, and the environment variables behind them.
 *
 * The deployment is configured by the seed's environment variables
 * (STRIPE_TEST_SECRET_KEY, ..., QES_ENVIRONMENT, QES_BASE_URL), read from
 * the server's environment.  Each one may be overridden by a qes_billing.*
 * setting; an empty setting means "use the environment variable".
 *
 * Secrets (the six Stripe keys) are superuser-only settings that are left
 * out of SHOW ALL and pg_settings, and whose SHOW / current_setting() output
 * is masked, so their values never reach a view, a log or an error message.
 * Messages name the variable that is wrong, never its value.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <stdlib.h>

#include "access/xact.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"

#include "guc.h"

/* plain settings */
char	   *qes_database = NULL;
char	   *qes_stripe_api_base = NULL;
char	   *qes_stripe_api_version = NULL;
int			qes_worker_naptime_ms = 10000;
int			qes_max_counters = 10000;	/* the counter hash's size (counters.c) */
int			qes_rate_limit_address = 50;	/* inbound rate limits (guard.c) */
int			qes_rate_limit_tenant = 20;
int			qes_rate_limit_staff = 0;
int			qes_rate_limit_slots = 16384;
int			qes_grace_period_s = 7 * 24 * 3600;
int			qes_max_attempts = 8;
int			qes_idempotency_window_s = 23 * 3600;
int			qes_retry_base_ms = 500;
int			qes_retry_max_ms = 300000;
int			qes_webhook_max_attempts = 5;
int			qes_webhook_tolerance_s = 300;
int			qes_max_inflight = 16;
int			qes_request_timeout_ms = 30000;
int			qes_max_requests_per_second = 0;
bool		qes_audit_guard = true;
bool		qes_worker_paused = false;
bool		qes_direct_lane = true;
int			qes_record_delay_ms = 1000;

/* reconciliation (sql/install/86_reconcile.sql reads them with current_setting) */
static int	qes_reconcile_interval_s = 3600;
static int	qes_reconcile_pages = 20;

/* the audit trail's retention (sql/install/72_audit_export.sql reads it with current_setting) */
static int	qes_audit_retention_s = 0;

/* disputes (sql/install/94_disputes.sql reads them with current_setting) */
static bool qes_dispute_auto_submit = false;
static int	qes_dispute_auto_submit_before_s = 24 * 3600;
static int	qes_dispute_lost_action = 0;

/* tax (sql/install/91_tax.sql, 88_setup.sql, 92_subscriptions.sql read them with current_setting) */
static char *qes_tax_origin_country = NULL;
static bool qes_automatic_tax = false;
static int	qes_tax_behavior = 0;

static const struct config_enum_entry tax_behavior_options[] = {
	{"exclusive", 0, false},
	{"inclusive", 1, false},
	{NULL, 0, false}
};

static const struct config_enum_entry dispute_lost_action_options[] = {
	{"none", 0, false},
	{"cancel_at_period_end", 1, false},
	{"cancel_now", 2, false},
	{NULL, 0, false}
};

/* notifications (src/notify.c) */
char	   *qes_smtp_url = NULL;
int			qes_smtp_starttls = QES_STARTTLS_REQUIRE;
char	   *qes_smtp_username = NULL;
char	   *qes_notify_from = NULL;
char	   *qes_notify_operator_email = NULL;
char	   *qes_notify_webhook_url = NULL;
char	   *qes_notify_ca_file = NULL;
int			qes_notify_max_attempts = 12;
int			qes_notify_retry_base_ms = 30000;
int			qes_notify_retry_max_ms = 3600 * 1000;
int			qes_notify_timeout_ms = 30000;
static char *smtp_password_setting = NULL;
static char *notify_webhook_secret_setting = NULL;

static const struct config_enum_entry starttls_options[] = {
	{"require", QES_STARTTLS_REQUIRE, false},
	{"try", QES_STARTTLS_TRY, false},
	{"off", QES_STARTTLS_OFF, false},
	{NULL, 0, false}
};

/* overrides of the seed's environment variables */
static char *qes_environment_setting = NULL;
static char *qes_base_url_setting = NULL;
static char *stripe_test_secret_key = NULL;
static char *stripe_test_publishable_key = NULL;
static char *stripe_test_webhook_secret = NULL;
static char *stripe_live_secret_key = NULL;
static char *stripe_live_publishable_key = NULL;
static char *stripe_live_webhook_secret = NULL;

/*
 * Where one kind of key comes from, in test and in live mode.
 */
typedef struct KeySource
{
	const char *what;			/* "secret key", ... */
	const char *test_env;
	const char *live_env;
	const char *test_guc;
	const char *live_guc;
	char	  **test_value;
	char	  **live_value;
	const char *test_prefixes[3];	/* NULL-terminated; empty for webhook */
	const char *live_prefixes[3];
} KeySource;

static const KeySource key_sources[] = {
	[QES_KEY_SECRET] = {
		"secret key",
		"STRIPE_TEST_SECRET_KEY", "STRIPE_LIVE_SECRET_KEY",
		"qes_billing.stripe_test_secret_key", "qes_billing.stripe_live_secret_key",
		&stripe_test_secret_key, &stripe_live_secret_key,
		{"sk_test_", "rk_test_", NULL}, {"sk_live_", "rk_live_", NULL}
	},
	[QES_KEY_PUBLISHABLE] = {
		"publishable key",
		"STRIPE_TEST_PUBLISHABLE_KEY", "STRIPE_LIVE_PUBLISHABLE_KEY",
		"qes_billing.stripe_test_publishable_key", "qes_billing.stripe_live_publishable_key",
		&stripe_test_publishable_key, &stripe_live_publishable_key,
		{"pk_test_", NULL, NULL}, {"pk_live_", NULL, NULL}
	},
	[QES_KEY_WEBHOOK] = {
		"webhook signing secret",
		"STRIPE_TEST_WEBHOOK_SECRET", "STRIPE_LIVE_WEBHOOK_SECRET",
		"qes_billing.stripe_test_webhook_secret", "qes_billing.stripe_live_webhook_secret",
		&stripe_test_webhook_secret, &stripe_live_webhook_secret,
		{NULL, NULL, NULL}, {NULL, NULL, NULL}
	},
};

static bool
has_prefix(const char *value, const char *const *prefixes)
{
	for (int i = 0; prefixes[i] != NULL; i++)
		if (strncmp(value, prefixes[i], strlen(prefixes[i])) == 0)
			return true;
	return false;
}

/*
 * A webhook secret setting holds one secret or, during a rotation, several
 * separated by commas.  Each must be a whsec_ secret.
 */
static bool
webhook_secrets_valid(const char *value)
{
	const char *p = value;

	while (*p)
	{
		const char *end = strchr(p, ',');
		size_t		len = end ? (size_t) (end - p) : strlen(p);

		while (len > 0 && (*p == ' ' || *p == '\t'))
			p++, len--;
		if (len < 7 || strncmp(p, "whsec_", 6) != 0)
			return false;
		if (!end)
			break;
		p = end + 1;
	}
	return true;
}

/*
 * Is qes_billing.stripe_api_base fit to receive the secret key?  https
 * always; http only outside production and only to the loopback (tests,
 * the local fake).  Sets *problem and *hint when not.
 */
static bool
api_base_problem(bool live, char **problem, char **hint)
{
	const char *base = qes_stripe_api_base ? qes_stripe_api_base : "";
	const char *host;
	size_t		hostlen;

	if (strncmp(base, "https://", 8) == 0)
		return false;
	if (strncmp(base, "http://", 7) != 0)
	{
		*problem = pstrdup("qes_billing.stripe_api_base is not an https:// URL");
		*hint = pstrdup("Set it to https://api.stripe.com (the default).");
		return true;
	}
	if (live)
	{
		*problem = pstrdup("qes_billing.stripe_api_base uses http:// in production, where the secret key would travel in clear text");
		*hint = pstrdup("Use https://api.stripe.com (the default); http:// is for tests against a local server outside production.");
		return true;
	}
	host = base + 7;
	hostlen = strcspn(host, "/?#");
	if (hostlen > 0 && host[0] == '[')
		hostlen = strcspn(host, "]") + 1;
	else
		hostlen = strcspn(host, ":/?#");
	if ((hostlen == 9 && strncmp(host, "localhost", 9) == 0) ||
		(hostlen >= 9 && strncmp(host, "127.", 4) == 0) ||
		(hostlen == 5 && strncmp(host, "[::1]", 5) == 0))
		return false;
	*problem = pstrdup("qes_billing.stripe_api_base uses http:// to a host that is not the loopback");
	*hint = pstrdup("Use https://; http:// is accepted only for a local test server (localhost, 127.0.0.1, [::1]).");
	return true;
}

/*
 * Find the key of the given kind for the current environment.  Returns the
 * key, or NULL with *problem and *hint set (both palloc'd) when it is missing
 * or of the wrong mode.  The key's value never enters a message.
 */
static const char *
lookup_key(QesKeyKind kind, const char **source, char **problem, char **hint,
		   bool *missing)
{
	const KeySource *ks = &key_sources[kind];
	QesEnvironment env = qes_environment();
	bool		live = (env == QES_ENV_PRODUCTION);
	const char *envname = qes_environment_name(env);
	const char *setting = live ? *ks->live_value : *ks->test_value;
	const char *var = live ? ks->live_env : ks->test_env;
	const char *value;

	if (setting && setting[0] != '\0')
	{
		value = setting;
		*source = live ? ks->live_guc : ks->test_guc;
	}
	else
	{
		value = getenv(var);
		*source = var;
	}

	*missing = false;
	if (value == NULL || value[0] == '\0')
	{
		*missing = true;
		*problem = psprintf("%s is not set", var);
		*hint = psprintf("QES_ENVIRONMENT \"%s\" uses the %s-mode %s: set %s in the server's environment, or %s.",
						 envname, live ? "live" : "test", ks->what, var,
						 live ? ks->live_guc : ks->test_guc);
		return NULL;
	}

	if (kind == QES_KEY_WEBHOOK)
	{
		if (!webhook_secrets_valid(value))
		{
			*problem = psprintf("%s does not hold a Stripe webhook signing secret", *source);
			*hint = pstrdup("Webhook signing secrets start with whsec_; separate several with commas during a rotation.");
			return NULL;
		}
		return value;
	}

	if (has_prefix(value, live ? ks->live_prefixes : ks->test_prefixes))
	{
		/* the secret key goes to qes_billing.stripe_api_base: never in clear text */
		if (kind == QES_KEY_SECRET && api_base_problem(live, problem, hint))
			return NULL;
		return value;
	}

	if (has_prefix(value, live ? ks->test_prefixes : ks->live_prefixes))
		*problem = psprintf("%s holds a %s-mode Stripe %s, but QES_ENVIRONMENT is \"%s\"",
							*source, live ? "test" : "live", ks->what, envname);
	else
		*problem = psprintf("%s does not hold a Stripe %s", *source, ks->what);
	/* (worded so that the setting's name is not read as an assignment and masked: src/redact.c) */
	*hint = psprintf("%s uses %s-mode keys: %s needs a key that starts with %s.",
					 envname, live ? "live" : "test", *source,
					 live ? ks->live_prefixes[0] : ks->test_prefixes[0]);
	return NULL;
}

/*
 * The key of the given kind for the current environment, or an error that
 * names the variable at fault.  With missing_ok, an unset key gives NULL
 * (a key of the wrong mode is still an error).
 */
const char *
qes_stripe_key(QesKeyKind kind, bool missing_ok)
{
	const char *source;
	char	   *problem = NULL;
	char	   *hint = NULL;
	bool		missing;
	const char *key = lookup_key(kind, &source, &problem, &hint, &missing);

	if (key)
		return key;
	if (missing_ok && missing)
		return NULL;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("%s", problem),
			 errhint("%s", hint)));
	return NULL;				/* keep compiler quiet */
}

/*
 * Is the key of this kind usable?  When not, *problem says why.
 */
bool
qes_stripe_key_problem(QesKeyKind kind, char **problem)
{
	const char *source;
	char	   *hint = NULL;
	bool		missing;

	*problem = NULL;
	return lookup_key(kind, &source, problem, &hint, &missing) == NULL;
}

static bool
parse_environment(const char *value, QesEnvironment *env)
{
	if (strcmp(value, "development") == 0)
		*env = QES_ENV_DEVELOPMENT;
	else if (strcmp(value, "staging") == 0)
		*env = QES_ENV_STAGING;
	else if (strcmp(value, "production") == 0)
		*env = QES_ENV_PRODUCTION;
	else
		return false;
	return true;
}

QesEnvironment
qes_environment(void)
{
	QesEnvironment env = QES_ENV_DEVELOPMENT;
	const char *value = qes_environment_setting;
	const char *source = "qes_billing.environment";

	if (value == NULL || value[0] == '\0')
	{
		value = getenv("QES_ENVIRONMENT");
		source = "QES_ENVIRONMENT";
	}
	if (value == NULL || value[0] == '\0')
		return QES_ENV_DEVELOPMENT;
	if (!parse_environment(value, &env))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s has an invalid value: \"%s\"", source, value),
				 errhint("Use development, staging or production.")));
	return env;
}

const char *
qes_environment_name(QesEnvironment env)
{
	switch (env)
	{
		case QES_ENV_DEVELOPMENT:
			return "development";
		case QES_ENV_STAGING:
			return "staging";
		case QES_ENV_PRODUCTION:
			return "production";
	}
	return "development";
}

bool
qes_live_mode(void)
{
	return qes_environment() == QES_ENV_PRODUCTION;
}

const char *
qes_base_url(void)
{
	const char *value = qes_base_url_setting;

	if (value == NULL || value[0] == '\0')
		value = getenv("QES_BASE_URL");
	if (value == NULL || value[0] == '\0')
		return NULL;
	return value;
}

/*
 * The notification secrets: the setting, else the environment variable.
 * NULL when neither is set.  Never stored (src/notify.c); they have no
 * prefix to be recognised by, so src/redact.c masks their current values in
 * whatever is logged (PostgreSQL logs "parameter ... changed to <value>"
 * when a reload changes a setting, the raw value included).
 */
static const char *
setting_or_env(const char *setting, const char *var)
{
	const char *value = setting;

	if (value == NULL || value[0] == '\0')
		value = getenv(var);
	if (value == NULL || value[0] == '\0')
		return NULL;
	return value;
}

const char *
qes_smtp_password(void)
{
	return setting_or_env(smtp_password_setting, "QES_SMTP_PASSWORD");
}

const char *
qes_notify_webhook_secret(void)
{
	return setting_or_env(notify_webhook_secret_setting, "QES_NOTIFY_WEBHOOK_SECRET");
}

/* ---- check and show hooks ---------------------------------------------- */

static bool
check_environment(char **newval, void **extra, GucSource source)
{
	QesEnvironment env;

	if (*newval == NULL || (*newval)[0] == '\0' || parse_environment(*newval, &env))
		return true;
	GUC_check_errdetail("qes_billing.environment must be development, staging or production.");
	return false;
}

static bool
check_url(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0' ||
		strncmp(*newval, "http://", 7) == 0 || strncmp(*newval, "https://", 8) == 0)
		return true;
	GUC_check_errdetail("The URL must start with http:// or https://.");
	return false;
}

/*
 * Key settings are taken only from the server's environment,
 * postgresql.conf and ALTER SYSTEM (or SET by a superuser for the session):
 * never stored per database or role, where every role can read them in
 * pg_db_role_setting.  A refused value never reaches the log: the messages
 * never include it, and an error raised for a statement hides the
 * statement (log_min_error_statement would log it, key and all).
 */
static bool
key_refused(GucSource source, const char *name, const char *problem, const char *hint)
{
	bool		stored = (source == PGC_S_TEST || source == PGC_S_DATABASE ||
						  source == PGC_S_USER || source == PGC_S_DATABASE_USER ||
						  source == PGC_S_GLOBAL);

	/* a statement being executed (SET, ALTER SYSTEM, ALTER ROLE/DATABASE SET) */
	if (IsUnderPostmaster && IsTransactionState() && !stored)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s", problem),
				 errhint("%s", hint),
				 errhidestmt(true)));
	if (IsUnderPostmaster && IsTransactionState() && source == PGC_S_TEST)
		ereport(ERROR,
				(errcode(ERRCODE_CANT_CHANGE_RUNTIME_PARAM),
				 errmsg("%s", problem),
				 errhint("%s", hint),
				 errhidestmt(true)));
	GUC_check_errmsg("%s", problem);
	GUC_check_errhint("%s", hint);
	return false;
}

static bool
check_key(char **newval, GucSource source, const char *name, const char *const *prefixes)
{
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (source == PGC_S_TEST || source == PGC_S_DATABASE || source == PGC_S_USER ||
		source == PGC_S_DATABASE_USER || source == PGC_S_GLOBAL)
		return key_refused(source, name,
						   psprintf("%s may be set only in postgresql.conf, with ALTER SYSTEM, or in the server's environment", name),
						   "Settings stored per database or role are readable by every role in pg_db_role_setting.");
	if (prefixes == NULL ? webhook_secrets_valid(*newval) : has_prefix(*newval, prefixes))
		return true;
	if (prefixes == NULL)
		return key_refused(source, name,
						   psprintf("%s must hold whsec_ secrets separated by commas", name),
						   "Webhook signing secrets start with whsec_.");
	return key_refused(source, name,
					   psprintf("%s must hold a key that starts with %s", name, prefixes[0]),
					   "Test-mode keys go into the test settings, live-mode keys into the live ones.");
}

/*
 * A secret of the notifications (SMTP password, platform webhook signing
 * secret): any value, but like the keys never stored per database or role.
 */
static bool
check_notify_secret(char **newval, GucSource source, const char *name)
{
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (source == PGC_S_TEST || source == PGC_S_DATABASE || source == PGC_S_USER ||
		source == PGC_S_DATABASE_USER || source == PGC_S_GLOBAL)
		return key_refused(source, name,
						   psprintf("%s may be set only in postgresql.conf, with ALTER SYSTEM, or in the server's environment", name),
						   "Settings stored per database or role are readable by every role in pg_db_role_setting.");
	return true;
}

static bool
check_smtp_password(char **newval, void **extra, GucSource source)
{
	return check_notify_secret(newval, source, "qes_billing.smtp_password");
}

static bool
check_notify_webhook_secret(char **newval, void **extra, GucSource source)
{
	return check_notify_secret(newval, source, "qes_billing.notify_webhook_secret");
}

/* an SMTP server URL: smtp:// or smtps://, credentials in their own settings */
static bool
check_smtp_url(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;
	const char *host;

	if (v == NULL || v[0] == '\0')
		return true;
	if (strncmp(v, "smtp://", 7) == 0)
		host = v + 7;
	else if (strncmp(v, "smtps://", 8) == 0)
		host = v + 8;
	else
	{
		GUC_check_errdetail("qes_billing.smtp_url must start with smtp:// (STARTTLS) or smtps:// (TLS).");
		return false;
	}
	if (memchr(host, '@', strcspn(host, "/?#")) != NULL)
	{
		/* never echo it: it may hold a password */
		GUC_check_errmsg("qes_billing.smtp_url must not contain credentials");
		GUC_check_errhint("Use qes_billing.smtp_username and qes_billing.smtp_password.");
		return false;
	}
	return true;
}

#define KEY_CHECK_HOOK(fn, kind, mode) \
static bool \
fn(char **newval, void **extra, GucSource source) \
{ \
	return check_key(newval, source, key_sources[kind].mode##_guc, \
					 key_sources[kind].mode##_prefixes[0] ? key_sources[kind].mode##_prefixes : NULL); \
}

KEY_CHECK_HOOK(check_test_secret, QES_KEY_SECRET, test)
KEY_CHECK_HOOK(check_live_secret, QES_KEY_SECRET, live)
KEY_CHECK_HOOK(check_test_publishable, QES_KEY_PUBLISHABLE, test)
KEY_CHECK_HOOK(check_live_publishable, QES_KEY_PUBLISHABLE, live)
KEY_CHECK_HOOK(check_test_webhook, QES_KEY_WEBHOOK, test)
KEY_CHECK_HOOK(check_live_webhook, QES_KEY_WEBHOOK, live)

/* Secrets show as "(set)" or "" -- never their value. */
#define SECRET_SHOW_HOOK(fn, var) \
static const char * \
fn(void) \
{ \
	return (var && var[0] != '\0') ? "(set)" : ""; \
}

SECRET_SHOW_HOOK(show_test_secret, stripe_test_secret_key)
SECRET_SHOW_HOOK(show_live_secret, stripe_live_secret_key)
SECRET_SHOW_HOOK(show_test_webhook, stripe_test_webhook_secret)
SECRET_SHOW_HOOK(show_live_webhook, stripe_live_webhook_secret)
SECRET_SHOW_HOOK(show_smtp_password, smtp_password_setting)
SECRET_SHOW_HOOK(show_notify_webhook_secret, notify_webhook_secret_setting)

#define SECRET_FLAGS (GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE)

/* ---- test-only: a planted memory error --------------------------------- */

/*
 * qes_billing.debug_fault (test-only; CONTRIBUTING.md, "Tests"): when set
 * by a superuser outside production, billing.environment() commits a
 * deliberate memory error, so that the valgrind layer can show that its
 * classifier catches an error in our code (test/tools/valgrind.sh, its
 * self-test).  Production refuses the setting and ignores it if it was set
 * before the environment changed.
 */
typedef enum QesDebugFault
{
	QES_FAULT_NONE,
	QES_FAULT_INVALID_READ,
	QES_FAULT_UNINITIALISED,
	QES_FAULT_COUNTER_COMMIT_DELAY,
	QES_FAULT_COUNTER_PRE_COMMIT_DELAY,
	QES_FAULT_COUNTER_BUILD_DELAY
} QesDebugFault;

static int	qes_debug_fault = QES_FAULT_NONE;

static const struct config_enum_entry debug_fault_options[] = {
	{"none", QES_FAULT_NONE, false},
	{"invalid_read", QES_FAULT_INVALID_READ, false},
	{"uninitialised", QES_FAULT_UNINITIALISED, false},
	{"counter_commit_delay", QES_FAULT_COUNTER_COMMIT_DELAY, false},
	{"counter_pre_commit_delay", QES_FAULT_COUNTER_PRE_COMMIT_DELAY, false},
	{"counter_build_delay", QES_FAULT_COUNTER_BUILD_DELAY, false},
	{NULL, 0, false}
};

/* the environment without raising an error (a check hook must not) */
static bool
production_quietly(void)
{
	const char *value = qes_environment_setting;
	QesEnvironment env;

	if (value == NULL || value[0] == '\0')
		value = getenv("QES_ENVIRONMENT");
	return value != NULL && parse_environment(value, &env) && env == QES_ENV_PRODUCTION;
}

static bool
check_debug_fault(int *newval, void **extra, GucSource source)
{
	if (*newval == QES_FAULT_NONE || !production_quietly())
		return true;
	GUC_check_errdetail("qes_billing.debug_fault is a test-only setting, refused in production.");
	return false;
}

/*
 * Commit the planted memory error, if one is asked for.  The chunk is
 * larger than any allocation set's chunk limit, so palloc gives it a
 * malloc'd block of its own that ends where the chunk ends: memcheck knows
 * that block's bounds and contents even in a server built without
 * USE_VALGRIND.
 */
void
qes_debug_fault_point(void)
{
	const Size	size = 16 * 1024;
	volatile char *chunk;
	volatile char sink;

	if (qes_debug_fault != QES_FAULT_INVALID_READ && qes_debug_fault != QES_FAULT_UNINITIALISED)
		return;
	if (production_quietly())
	{
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("qes_billing.debug_fault is ignored in production")));
		return;
	}
	chunk = palloc(size);
	if (qes_debug_fault == QES_FAULT_INVALID_READ)
	{
		memset((char *) chunk, 0, size);
		sink = chunk[size];		/* one byte past the chunk */
		(void) sink;
	}
	else if (chunk[size / 2] == 'q')	/* a branch on a byte nobody wrote */
		elog(DEBUG1, "qes_billing.debug_fault: the unwritten byte happened to be 'q'");
	pfree((char *) chunk);
	ereport(NOTICE,
			(errmsg("qes_billing.debug_fault: planted \"%s\"",
					debug_fault_options[qes_debug_fault].name)));
}

/*
 * counter_commit_delay: a transaction that recorded usage waits a second
 * after its commit became visible and before its counter deltas are applied
 * (counters.c), so that a test can build the counter in that gap.
 * counter_pre_commit_delay: it waits three seconds after logging its deltas
 * for standbys and before its commit record, so that a standby can replay
 * the one and not the other.  counter_build_delay: a standby's counter
 * build waits six seconds after taking its snapshot.
 */
void
qes_debug_counter_build_delay(void)
{
	if (qes_debug_fault == QES_FAULT_COUNTER_BUILD_DELAY && !production_quietly())
		pg_usleep(6000000L);
}

void
qes_debug_counter_delay(bool pre_commit)
{
	if (qes_debug_fault == (pre_commit ? QES_FAULT_COUNTER_PRE_COMMIT_DELAY : QES_FAULT_COUNTER_COMMIT_DELAY) &&
		!production_quietly())
		pg_usleep(pre_commit ? 3000000L : 1000000L);
}

static void
define_key(const char *name, const char *desc, char **var, int flags,
		   GucStringCheckHook check, GucShowHook show)
{
	DefineCustomStringVariable(name, desc, NULL, var, "", PGC_SUSET, flags,
							   check, NULL, show);
}

void
qes_define_gucs(void)
{
	DefineCustomStringVariable("qes_billing.database",
							   "Database the qes_billing worker connects to.",
							   NULL, &qes_database, "postgres",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("qes_billing.environment",
							   "development, staging or production; overrides QES_ENVIRONMENT.",
							   NULL, &qes_environment_setting, "",
							   PGC_SUSET, 0, check_environment, NULL, NULL);
	DefineCustomStringVariable("qes_billing.base_url",
							   "Public base URL of the platform; overrides QES_BASE_URL.",
							   NULL, &qes_base_url_setting, "",
							   PGC_SUSET, 0, check_url, NULL, NULL);

	define_key("qes_billing.stripe_test_secret_key",
			   "Stripe test-mode secret key; overrides STRIPE_TEST_SECRET_KEY.",
			   &stripe_test_secret_key, SECRET_FLAGS, check_test_secret, show_test_secret);
	define_key("qes_billing.stripe_live_secret_key",
			   "Stripe live-mode secret key; overrides STRIPE_LIVE_SECRET_KEY.",
			   &stripe_live_secret_key, SECRET_FLAGS, check_live_secret, show_live_secret);
	define_key("qes_billing.stripe_test_webhook_secret",
			   "Stripe test-mode webhook signing secret(s); overrides STRIPE_TEST_WEBHOOK_SECRET.",
			   &stripe_test_webhook_secret, SECRET_FLAGS, check_test_webhook, show_test_webhook);
	define_key("qes_billing.stripe_live_webhook_secret",
			   "Stripe live-mode webhook signing secret(s); overrides STRIPE_LIVE_WEBHOOK_SECRET.",
			   &stripe_live_webhook_secret, SECRET_FLAGS, check_live_webhook, show_live_webhook);
	/* publishable keys are public by design; only their mode is checked */
	define_key("qes_billing.stripe_test_publishable_key",
			   "Stripe test-mode publishable key; overrides STRIPE_TEST_PUBLISHABLE_KEY.",
			   &stripe_test_publishable_key, 0, check_test_publishable, NULL);
	define_key("qes_billing.stripe_live_publishable_key",
			   "Stripe live-mode publishable key; overrides STRIPE_LIVE_PUBLISHABLE_KEY.",
			   &stripe_live_publishable_key, 0, check_live_publishable, NULL);

	DefineCustomStringVariable("qes_billing.stripe_api_base",
							   "Base URL of the Stripe API (tests point it at a local server).",
							   NULL, &qes_stripe_api_base, "https://api.stripe.com",
							   PGC_SUSET, 0, check_url, NULL, NULL);
	DefineCustomStringVariable("qes_billing.stripe_api_version",
							   "Stripe API version sent as the Stripe-Version header.",
							   NULL, &qes_stripe_api_version, "2024-06-20",
							   PGC_SUSET, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("qes_billing.worker_naptime",
							"Longest sleep of the worker between loops when nobody wakes it.",
							NULL, &qes_worker_naptime_ms, 10000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.grace_period",
							"How long paid limits stay after a failed payment.",
							NULL, &qes_grace_period_s, 7 * 24 * 3600, 0, 90 * 24 * 3600,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.idempotency_window",
							"How long a Stripe request whose outcome is unknown is retried with its Idempotency-Key.",
							"Stripe keeps a key's result for 24 hours: within that time a retry replays it instead of acting twice; after it the object is looked up before the request is declared failed.",
							&qes_idempotency_window_s, 23 * 3600, 1, 24 * 3600,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.max_attempts",
							"Attempts of one Stripe request before it is marked failed.",
							NULL, &qes_max_attempts, 8, 1, 100,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.retry_base_delay",
							"First retry delay of a Stripe request; doubled per attempt, with jitter.",
							NULL, &qes_retry_base_ms, 500, 1, 3600 * 1000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.retry_max_delay",
							"Longest retry delay of a Stripe request.",
							NULL, &qes_retry_max_ms, 300000, 1, 24 * 3600 * 1000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.reconcile_interval",
							"How often the reconciliation pass lists what changed in Stripe (0: never).",
							NULL, &qes_reconcile_interval_s, 3600, 0, 7 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.reconcile_pages",
							"Most list pages (100 objects each) one reconciliation pass asks Stripe for.",
							NULL, &qes_reconcile_pages, 20, 1, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.webhook_max_attempts",
							"Attempts to apply a webhook event before it is parked for review.",
							NULL, &qes_webhook_max_attempts, 5, 1, 100,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.webhook_tolerance",
							"Largest accepted age of a webhook signature timestamp.",
							NULL, &qes_webhook_tolerance_s, 300, 1, 24 * 3600,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.max_concurrent_requests",
							"Stripe requests the worker keeps in flight at once.",
							NULL, &qes_max_inflight, 16, 1, 1024,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.request_timeout",
							"Longest time one Stripe request may take, connection included.",
							NULL, &qes_request_timeout_ms, 30000, 100, 600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.max_requests_per_second",
							"Largest rate at which the worker sends Stripe requests (0: no limit).",
							"Stripe allows about 100 requests/s in live mode and 25 in test mode.",
							&qes_max_requests_per_second, 0, 0, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("qes_billing.worker_paused",
							 "Pause the worker's work (queues, timers) for maintenance; it keeps its heartbeat.",
							 NULL, &qes_worker_paused, false,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("qes_billing.direct_lane",
							 "Let a transaction that queues a Stripe request claim it and hand it to the worker directly while the worker has no backlog.",
							 "Off: every request is claimed by the worker in a transaction of its own (docs/architecture.md, \"The direct lane\").",
							 &qes_direct_lane, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.record_delay",
							"Longest time the worker keeps a successful answer of the direct lane before recording it with others (0: at once).",
							"Longer: fewer transactions at low load (the worker's CPU), the local state updated later; failures, and answers while a request waits for another, are recorded at once.",
							&qes_record_delay_ms, 1000, 0, 10000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomBoolVariable("qes_billing.audit_guard",
							 "Refuse UPDATE and DELETE on the audit log (superusers may turn it off to test tamper detection).",
							 NULL, &qes_audit_guard, true,
							 PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.audit_retention",
							"How long audit rows stay in the database before they may be archived (0: for ever).",
							"billing.audit_archive() exports, then removes, only rows older than this.",
							&qes_audit_retention_s, 0, 0, PG_INT32_MAX,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomBoolVariable("qes_billing.dispute_auto_submit",
							 "Submit the evidence staged for a dispute automatically before its deadline (off: an operator submits it).",
							 NULL, &qes_dispute_auto_submit, false,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.dispute_auto_submit_before",
							"How long before a dispute's deadline its evidence is submitted automatically.",
							NULL, &qes_dispute_auto_submit_before_s, 24 * 3600, 3600, 30 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("qes_billing.tax_origin_country",
							   "The platform's own EU member state (ISO code): a verified EU business of another one is billed by reverse charge.",
							   "Empty: reverse charge is never decided.",
							   &qes_tax_origin_country, "", PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("qes_billing.automatic_tax",
							 "Create subscriptions and one-time payments with Stripe Tax's automatic tax.",
							 NULL, &qes_automatic_tax, false, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("qes_billing.tax_behavior",
							 "Whether the catalog's prices include tax (inclusive) or have it added (exclusive); set on the prices setup creates.",
							 NULL, &qes_tax_behavior, 0, tax_behavior_options, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("qes_billing.dispute_lost_action",
							 "What a lost dispute does to the tenant's paid subscription: none, cancel_at_period_end or cancel_now.",
							 NULL, &qes_dispute_lost_action, 0, dispute_lost_action_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("qes_billing.max_counters",
							"Usage counters (tenant, metric, period) kept in shared memory.",
							"When full, further totals are computed from billing.usage_events.",
							&qes_max_counters, 10000, 16, 10000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("qes_billing.rate_limit_address",
							"Requests per second one client address may make through PostgREST (0: no limit).",
							"Anonymous and tenant requests, by the last X-Forwarded-For entry; never Stripe's webhook deliveries.",
							&qes_rate_limit_address, 50, 0, 1000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.rate_limit_tenant",
							"Requests per second one tenant (the JWT's tenant_id) may make through PostgREST (0: no limit).",
							NULL, &qes_rate_limit_tenant, 20, 0, 1000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.rate_limit_staff",
							"Requests per second each of the roles qes_admin and qes_app may make through PostgREST (0: no limit).",
							NULL, &qes_rate_limit_staff, 0, 0, 1000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.rate_limit_slots",
							"Rate-limit buckets kept in shared memory (addresses, tenants).",
							NULL, &qes_rate_limit_slots, 16384, 64, 10000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);

	/* notifications (src/notify.c): read by the worker */
	DefineCustomStringVariable("qes_billing.smtp_url",
							   "SMTP server of notification emails: smtp://host:587 (STARTTLS) or smtps://host:465; empty: no email.",
							   NULL, &qes_smtp_url, "",
							   PGC_SIGHUP, 0, check_smtp_url, NULL, NULL);
	DefineCustomEnumVariable("qes_billing.smtp_starttls",
							 "STARTTLS on smtp:// URLs: require (default), try, or off (only to the loopback outside production).",
							 NULL, &qes_smtp_starttls, QES_STARTTLS_REQUIRE, starttls_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("qes_billing.smtp_username",
							   "SMTP user name (empty: no authentication).",
							   NULL, &qes_smtp_username, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	define_key("qes_billing.smtp_password",
			   "SMTP password; overrides QES_SMTP_PASSWORD.",
			   &smtp_password_setting, SECRET_FLAGS, check_smtp_password, show_smtp_password);
	DefineCustomStringVariable("qes_billing.notify_from",
							   "From address of notification emails, e.g. QES Billing <billing@example.com>.",
							   NULL, &qes_notify_from, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("qes_billing.notify_operator_email",
							   "Where operators' notifications (disputes) are emailed; empty: not emailed.",
							   NULL, &qes_notify_operator_email, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("qes_billing.notify_webhook_url",
							   "The platform's URL that receives notifications as signed events; empty: none.",
							   NULL, &qes_notify_webhook_url, "",
							   PGC_SIGHUP, 0, check_url, NULL, NULL);
	define_key("qes_billing.notify_webhook_secret",
			   "Signing secret of the notification events sent to the platform; overrides QES_NOTIFY_WEBHOOK_SECRET.",
			   &notify_webhook_secret_setting, SECRET_FLAGS, check_notify_webhook_secret, show_notify_webhook_secret);
	DefineCustomStringVariable("qes_billing.notify_ca_file",
							   "CA certificates (PEM file) that SMTP and webhook TLS peers are verified against; empty: the system's.",
							   NULL, &qes_notify_ca_file, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.notify_max_attempts",
							"Attempts to deliver a notification before it is marked failed.",
							NULL, &qes_notify_max_attempts, 12, 1, 100,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.notify_retry_base_delay",
							"First retry delay of a notification; doubled per attempt, with jitter.",
							NULL, &qes_notify_retry_base_ms, 30000, 1, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.notify_retry_max_delay",
							"Longest retry delay of a notification.",
							NULL, &qes_notify_retry_max_ms, 3600 * 1000, 1, 24 * 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("qes_billing.notify_timeout",
							"Longest time one delivery (SMTP or webhook) may take, connection included.",
							NULL, &qes_notify_timeout_ms, 30000, 100, 600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	/* test-only (see qes_debug_fault_point); hidden like the secrets */
	DefineCustomEnumVariable("qes_billing.debug_fault",
							 "Test-only: billing.environment() commits a deliberate memory error (invalid_read, uninitialised), or usage counters wait in a commit or a build (counter_commit_delay, counter_pre_commit_delay, counter_build_delay).",
							 "For the valgrind layer's self-test and the counter build race test; refused in production.",
							 &qes_debug_fault, QES_FAULT_NONE, debug_fault_options,
							 PGC_SUSET, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							 check_debug_fault, NULL, NULL);

	MarkGUCPrefixReserved("qes_billing");
}
