/*-------------------------------------------------------------------------
 *
 * guc.h
 *	  Settings of qes_billing and the environment variables behind them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_GUC_H
#define QES_GUC_H

typedef enum QesEnvironment
{
	QES_ENV_DEVELOPMENT,
	QES_ENV_STAGING,
	QES_ENV_PRODUCTION
} QesEnvironment;

typedef enum QesKeyKind
{
	QES_KEY_SECRET,
	QES_KEY_PUBLISHABLE,
	QES_KEY_WEBHOOK
} QesKeyKind;

extern char *qes_database;
extern char *qes_stripe_api_base;
extern char *qes_stripe_api_version;
extern int	qes_worker_naptime_ms;
extern int	qes_max_counters;
extern int	qes_rate_limit_address;
extern int	qes_rate_limit_tenant;
extern int	qes_rate_limit_staff;
extern int	qes_rate_limit_slots;
extern int	qes_grace_period_s;
extern int	qes_max_attempts;
extern int	qes_idempotency_window_s;
extern int	qes_retry_base_ms;
extern int	qes_retry_max_ms;
extern int	qes_webhook_max_attempts;
extern int	qes_webhook_tolerance_s;
extern int	qes_max_inflight;
extern int	qes_request_timeout_ms;
extern int	qes_max_requests_per_second;
extern bool qes_audit_guard;
extern bool qes_worker_paused;
extern bool qes_direct_lane;
extern int	qes_record_delay_ms;

/* notifications (src/notify.c) */
typedef enum QesStartTls
{
	QES_STARTTLS_REQUIRE,
	QES_STARTTLS_TRY,
	QES_STARTTLS_OFF
} QesStartTls;

extern char *qes_smtp_url;
extern int	qes_smtp_starttls;
extern char *qes_smtp_username;
extern char *qes_notify_from;
extern char *qes_notify_operator_email;
extern char *qes_notify_webhook_url;
extern char *qes_notify_ca_file;
extern int	qes_notify_max_attempts;
extern int	qes_notify_retry_base_ms;
extern int	qes_notify_retry_max_ms;
extern int	qes_notify_timeout_ms;
extern const char *qes_smtp_password(void);
extern const char *qes_notify_webhook_secret(void);

extern void qes_define_gucs(void);
extern QesEnvironment qes_environment(void);
extern const char *qes_environment_name(QesEnvironment env);
extern bool qes_live_mode(void);
extern const char *qes_base_url(void);
extern const char *qes_stripe_key(QesKeyKind kind, bool missing_ok);
extern bool qes_stripe_key_problem(QesKeyKind kind, char **problem);
extern void qes_debug_fault_point(void);
extern void qes_debug_counter_delay(bool pre_commit);
extern void qes_debug_counter_build_delay(void);

#endif							/* QES_GUC_H */
