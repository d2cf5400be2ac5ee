/*-------------------------------------------------------------------------
 *
 * redact.c
 *	  Masking secrets before anything is stored or logged (docs/architecture.md, rule 13).
 *
 * Secrets live only in the environment, superuser-only settings and
 * billing.stripe_secrets.  Everything else that may carry one -- Stripe's
 * answers and the errors made of them (billing.stripe_requests), audit
 * details, the worker's last error, the server log -- goes through here
 * first.  What is masked, each replaced by "[redacted]":
 *
 *	- Stripe secret and restricted keys: sk_live_..., sk_test_...,
 *	  rk_live_..., rk_test_... (publishable keys are public and stay);
 *	- webhook signing secrets: whsec_...;
 *	- credentials of an Authorization header: "Bearer <token>" (8
 *	  characters or more) and "Basic <token>" (16 or more), the scheme's
 *	  name kept;
 *	- in JSON, the value of any key named "secret" or "authorization"
 *	  (any case, at any depth; a webhook endpoint's signing secret is its
 *	  "secret").  A client_secret is the tenant's, handed to its front end
 *	  by design, and stays.
 *
 *	- the value given to a setting that holds a secret, recognised by the
 *	  setting's name: SET / ALTER SYSTEM SET qes_billing.smtp_password =
 *	  <value> (or TO; ALTER ROLE/DATABASE ... SET, refused, alike) masks
 *	  everything after the "=" up to the end of the statement, and
 *	  set_config('qes_billing.smtp_password', <value>, ...) the argument
 *	  after the name.  The settings are every qes_billing.* string setting
 *	  defined as a secret (superuser-only and hidden from SHOW ALL,
 *	  src/guc.c), read from the GUC table at load: the SMTP password and
 *	  the platform webhook's signing secret, which have no form to be
 *	  recognised by, and the Stripe keys, whatever their value looks like.
 *
 * A key or secret is recognised at the start of a word (not preceded by a
 * letter or digit), so identifiers that merely contain the letters stay.
 * Masking is idempotent: what it produces is never masked again.
 *
 * Two secrets have no prefix to be recognised by: the SMTP password and the
 * platform webhook's signing secret (src/guc.c).  qes_redact_secrets() masks
 * their current values as well, wherever they occur; a value shorter than
 * QES_REDACT_MIN_VALUE_LEN is not looked for (it would mask ordinary words).
 *
 * SQL: billing.redact_text(text) and billing.redact(jsonb)
 * (sql/install/05_redact.sql).  C: the worker masks what it logs and keeps
 * as its last error (src/worker_xact.c) and the notifications' delivery
 * errors (src/notify.c), and the one emit_log_hook masks every message,
 * detail, hint and context any process logs -- the reload's "parameter
 * changed to" lines included -- and hides the statement of a logged error
 * when the statement holds a secret.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "executor/executor.h"
#include "parser/analyze.h"
#include "tcop/pquery.h"
#include "tcop/utility.h"
#include "utils/portal.h"
#include "utils/backend_status.h"

#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/elog.h"
#include "utils/guc_tables.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#include "guc.h"
#include "redact.h"

PG_FUNCTION_INFO_V1(qes_redact_text_fn);
PG_FUNCTION_INFO_V1(qes_redact_jsonb_fn);

static const char *const key_prefixes[] = {
	"sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_", NULL
};

static inline bool
is_alnum(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* characters of a key or secret after its prefix */
static inline bool
is_key_char(char c)
{
	return is_alnum(c) || c == '_' || c == '-' || c == '+' || c == '/' || c == '=';
}

/* characters of an HTTP credential (RFC 7235 token68) */
static inline bool
is_token68_char(char c)
{
	return is_alnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/' || c == '=';
}

/* ---- settings that hold secrets ------------------------------------------- */

#define QES_GUC_PREFIX "qes_billing"

/* the names after "qes_billing." of the settings that hold secrets */
static char **secret_settings = NULL;
static int	n_secret_settings = 0;

/*
 * Read them from the GUC table (qes_define_gucs() ran first, in _PG_init):
 * every qes_billing.* string setting defined as a secret, superuser-only and
 * hidden from SHOW ALL (src/guc.c, SECRET_FLAGS).
 */
static void
collect_secret_settings(void)
{
	struct config_generic **vars = get_guc_variables();
	int			nvars = GetNumConfigOptions();
	int			plen = strlen(QES_GUC_PREFIX ".");

	secret_settings = MemoryContextAllocZero(TopMemoryContext, sizeof(char *) * (nvars + 1));
	n_secret_settings = 0;
	for (int i = 0; i < nvars; i++)
	{
		struct config_generic *g = vars[i];

		if (g->vartype == PGC_STRING &&
			(g->flags & (GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL)) == (GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL) &&
			pg_strncasecmp(g->name, QES_GUC_PREFIX ".", plen) == 0 && g->name[plen] != '\0')
			secret_settings[n_secret_settings++] = MemoryContextStrdup(TopMemoryContext, g->name + plen);
	}
}

/* a character of an unquoted SQL identifier */
static inline bool
is_ident_char(char c)
{
	return is_alnum(c) || c == '_' || c == '$' || IS_HIGHBIT_SET(c);
}

static inline int
skip_space(const char *s, int len, int j)
{
	while (j < len && (s[j] == ' ' || s[j] == '\t' || s[j] == '\n' || s[j] == '\r' || s[j] == '\f'))
		j++;
	return j;
}

/* the end of the quoted string or identifier that opens at s[j] */
static int
quoted_end(const char *s, int len, int j, bool backslash_escapes)
{
	char		q = s[j];

	for (j++; j < len; j++)
	{
		if (backslash_escapes && s[j] == '\\')
			j++;
		else if (s[j] == q)
		{
			if (j + 1 < len && s[j + 1] == q)
				j++;			/* a doubled quote */
			else
				return j + 1;
		}
	}
	return len;
}

/*
 * Where the value of a setting that starts at s[j] ends: a statement's value
 * (SET name = value) at the end of the statement, a function's argument
 * (set_config(name, value, ...)) at the next "," or ")" outside brackets as
 * well.  Quoted strings and identifiers, dollar quotes and comments are
 * skipped whole; what cannot be read runs to the end of the text, which
 * masks too much rather than too little.
 */
static int
value_end(const char *s, int len, int j, bool argument)
{
	int			depth = 0;

	while (j < len)
	{
		char		c = s[j];

		if (c == '\'')
			j = quoted_end(s, len, j,
						   j > 0 && (s[j - 1] == 'E' || s[j - 1] == 'e') &&
						   (j < 2 || !is_ident_char(s[j - 2])));
		else if (c == '"')
			j = quoted_end(s, len, j, false);
		else if (c == '$' && (j == 0 || !is_ident_char(s[j - 1])))
		{
			/* $tag$ ... $tag$ (the tag may be empty); $1 is a parameter */
			int			t = j + 1;

			if (t < len && (is_alnum(s[t]) || s[t] == '_') && !(s[t] >= '0' && s[t] <= '9'))
				while (t < len && (is_alnum(s[t]) || s[t] == '_'))
					t++;
			if (t < len && s[t] == '$')
			{
				int			tlen = t - j + 1;
				int			k;

				for (k = t + 1; k + tlen <= len; k++)
					if (s[k] == '$' && memcmp(s + k, s + j, tlen) == 0)
						break;
				j = (k + tlen <= len) ? k + tlen : len;
			}
			else
				j++;
		}
		else if (c == '-' && j + 1 < len && s[j + 1] == '-')
		{
			while (j < len && s[j] != '\n')
				j++;
		}
		else if (c == '/' && j + 1 < len && s[j + 1] == '*')
		{
			int			nest = 1;

			for (j += 2; j < len && nest > 0; j++)
			{
				if (s[j] == '/' && j + 1 < len && s[j + 1] == '*')
					nest++, j++;
				else if (s[j] == '*' && j + 1 < len && s[j + 1] == '/')
					nest--, j++;
			}
		}
		else if (c == ';')
			return j;
		else if (argument && (c == '(' || c == '['))
			depth++, j++;
		else if (argument && (c == ')' || c == ']'))
		{
			if (depth == 0)
				return j;
			depth--, j++;
		}
		else if (argument && c == ',' && depth == 0)
			return j;
		else
			j++;
	}
	return len;
}

/*
 * Is a value assigned at s[i] to a setting that holds a secret?  That is,
 * the setting's name (qes_billing.smtp_password, any case, either part
 * double-quoted, or the whole in quotes) followed by "=" or TO (SET, ALTER
 * SYSTEM SET) or by "," (set_config).  Returns its value's span, blanks
 * around it left out, in *vstart and *vend; a value already masked does
 * not count.
 */
static bool
setting_value_at(const char *s, int len, int i, int *vstart, int *vend)
{
	int			plen = strlen(QES_GUC_PREFIX);
	int			j;
	int			k;
	bool		argument;

	if (n_secret_settings == 0 || (i > 0 && is_ident_char(s[i - 1])) ||
		len - i <= plen || pg_strncasecmp(s + i, QES_GUC_PREFIX, plen) != 0)
		return false;
	j = i + plen;
	if (s[j] == '"')
		j++;
	j = skip_space(s, len, j);
	if (j >= len || s[j] != '.')
		return false;
	j = skip_space(s, len, j + 1);
	if (j < len && s[j] == '"')
		j++;
	for (k = 0; k < n_secret_settings; k++)
	{
		int			nlen = strlen(secret_settings[k]);

		if (len - j >= nlen && pg_strncasecmp(s + j, secret_settings[k], nlen) == 0 &&
			(j + nlen == len || !is_ident_char(s[j + nlen])))
		{
			j += nlen;
			break;
		}
	}
	if (k == n_secret_settings)
		return false;
	if (j < len && (s[j] == '"' || s[j] == '\''))
		j++;
	j = skip_space(s, len, j);
	if (j < len && s[j] == '=')
		argument = false, j++;
	else if (j < len && s[j] == ',')
		argument = true, j++;
	else if (len - j > 2 && pg_strncasecmp(s + j, "to", 2) == 0 && !is_ident_char(s[j + 2]))
		argument = false, j += 2;
	else
		return false;
	*vstart = skip_space(s, len, j);
	*vend = value_end(s, len, *vstart, argument);
	while (*vend > *vstart && (s[*vend - 1] == ' ' || s[*vend - 1] == '\t' ||
							   s[*vend - 1] == '\n' || s[*vend - 1] == '\r'))
		(*vend)--;
	if (*vend == *vstart ||
		(*vend - *vstart == strlen(QES_REDACTED) &&
		 memcmp(s + *vstart, QES_REDACTED, strlen(QES_REDACTED)) == 0))
		return false;
	return true;
}

/*
 * Is there a secret at s[i]?  Returns its length (0: none) and in *keep how
 * many of its first bytes stay (the scheme name and blanks of "Bearer x").
 */
static int
secret_at(const char *s, int len, int i, int *keep)
{
	char		c = s[i];

	*keep = 0;
	if (i > 0 && is_alnum(s[i - 1]))
		return 0;
	if (c == 's' || c == 'r' || c == 'w')
	{
		for (int p = 0; key_prefixes[p] != NULL; p++)
		{
			int			plen = strlen(key_prefixes[p]);
			int			j = i + plen;

			if (len - i <= plen || memcmp(s + i, key_prefixes[p], plen) != 0)
				continue;
			while (j < len && is_key_char(s[j]))
				j++;
			if (j > i + plen)
				return j - i;
		}
	}
	else if (c == 'B' || c == 'b')
	{
		static const char *const schemes[] = {"bearer", "basic"};

		for (int k = 0; k < 2; k++)
		{
			int			slen = strlen(schemes[k]);
			int			j = i + slen;
			int			t;

			if (len - i <= slen || pg_strncasecmp(s + i, schemes[k], slen) != 0 ||
				(s[j] != ' ' && s[j] != '\t'))
				continue;
			while (j < len && (s[j] == ' ' || s[j] == '\t'))
				j++;
			t = j;
			while (t < len && is_token68_char(s[t]))
				t++;
			/*
			 * Both are also words ("the Basic plan"): only what looks like
			 * a credential (keys and tokens are long)
			 */
			if (t - j >= (k == 0 ? 8 : 16))
			{
				*keep = j - i;
				return t - i;
			}
		}
	}
	return 0;
}

/*
 * Does s (len bytes) hold anything to mask?  Run on every statement's text
 * (the ExecutorRun hook below), so it looks closely only where a secret can
 * begin: at a word's first letter, and only at the letters secret_at()
 * knows (s, r, w for keys; b, B for credentials) and setting_value_at()
 * (q, Q for a setting's name).
 */
bool
qes_redact_needed(const char *s, int len)
{
	int			keep;
	int			vstart;
	int			vend;
	bool		after_alnum = false;

	for (int i = 0; i < len; i++)
	{
		char		c = s[i];

		if (!after_alnum && (c == 's' || c == 'r' || c == 'w' || c == 'b' || c == 'B') &&
			secret_at(s, len, i, &keep) > 0)
			return true;
		if (!after_alnum && (c == 'q' || c == 'Q') &&
			setting_value_at(s, len, i, &vstart, &vend))
			return true;
		after_alnum = is_alnum(c);
	}
	return false;
}

/* s (len bytes) with every secret masked, appended to buf */
static void
redact_into(StringInfo buf, const char *s, int len)
{
	int			from = 0;

	for (int i = 0; i < len;)
	{
		int			keep;
		int			vstart;
		int			vend;
		int			n;

		if ((s[i] == 'q' || s[i] == 'Q') && setting_value_at(s, len, i, &vstart, &vend))
		{
			/* the value given to a secret setting, up to its end */
			appendBinaryStringInfo(buf, s + from, vstart - from);
			appendStringInfoString(buf, QES_REDACTED);
			i = from = vend;
			continue;
		}
		n = secret_at(s, len, i, &keep);
		if (n == 0)
		{
			i++;
			continue;
		}
		appendBinaryStringInfo(buf, s + from, i + keep - from);
		appendStringInfoString(buf, QES_REDACTED);
		i += n;
		from = i;
	}
	appendBinaryStringInfo(buf, s + from, len - from);
}

/* A palloc'd copy of s with every secret masked (s itself when none). */
char *
qes_redact_cstring(const char *s)
{
	StringInfoData buf;
	int			len;

	if (s == NULL)
		return NULL;
	len = strlen(s);
	if (!qes_redact_needed(s, len))
		return (char *) s;
	initStringInfo(&buf);
	redact_into(&buf, s, len);
	return buf.data;
}

/*
 * s with every occurrence of value masked (s itself when there is none, or
 * the value is too short to be looked for).
 */
static const char *
redact_value(const char *s, const char *value)
{
	StringInfoData buf;
	const char *p;
	const char *hit;
	size_t		len;

	if (value == NULL || (len = strlen(value)) < QES_REDACT_MIN_VALUE_LEN ||
		strstr(s, value) == NULL)
		return s;
	initStringInfo(&buf);
	for (p = s; (hit = strstr(p, value)) != NULL; p = hit + len)
	{
		appendBinaryStringInfo(&buf, p, (int) (hit - p));
		appendStringInfoString(&buf, QES_REDACTED);
	}
	appendStringInfoString(&buf, p);
	return buf.data;
}

/*
 * A palloc'd copy of s with every secret masked: those recognised by their
 * form (qes_redact_cstring), and the current values of the secrets that have
 * no form (the SMTP password, the platform webhook's signing secret).  s
 * itself when there is none.
 */
char *
qes_redact_secrets(const char *s)
{
	if (s == NULL)
		return NULL;
	s = redact_value(s, qes_smtp_password());
	s = redact_value(s, qes_notify_webhook_secret());
	return qes_redact_cstring(s);
}

/* Does s give a setting that holds a secret a value (SET, set_config)? */
static bool
sets_secret_setting(const char *s)
{
	int			len = strlen(s);
	int			vstart;
	int			vend;

	for (int i = 0; i < len; i++)
		if ((s[i] == 'q' || s[i] == 'Q') && setting_value_at(s, len, i, &vstart, &vend))
			return true;
	return false;
}

/* Does s hold a secret of either kind? */
static bool
holds_secret(const char *s)
{
	return qes_redact_secrets(s) != s;
}

/* ---- JSON ------------------------------------------------------------------ */

static bool
secret_key(const JsonbValue *k)
{
	return (k->val.string.len == 6 && pg_strncasecmp(k->val.string.val, "secret", 6) == 0) ||
		(k->val.string.len == 13 && pg_strncasecmp(k->val.string.val, "authorization", 13) == 0);
}

static bool
string_needs(const JsonbValue *v)
{
	return v->type == jbvString && qes_redact_needed(v->val.string.val, v->val.string.len);
}

/* mask a string value in place (into new memory) */
static void
redact_string(JsonbValue *v)
{
	StringInfoData buf;

	initStringInfo(&buf);
	redact_into(&buf, v->val.string.val, v->val.string.len);
	v->val.string.val = buf.data;
	v->val.string.len = buf.len;
}

static void
set_redacted(JsonbValue *v)
{
	v->type = jbvString;
	v->val.string.val = pstrdup(QES_REDACTED);
	v->val.string.len = strlen(QES_REDACTED);
}

/* Is anything in the document to be masked?  (Most answers hold nothing.) */
static bool
jsonb_needs(Jsonb *in)
{
	JsonbIterator *it = JsonbIteratorInit(&in->root);
	JsonbValue	v;
	JsonbIteratorToken tok;
	bool		after_secret_key = false;

	while ((tok = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		switch (tok)
		{
			case WJB_KEY:
				if (string_needs(&v))
					return true;
				after_secret_key = secret_key(&v);
				break;
			case WJB_VALUE:
				if ((after_secret_key && v.type != jbvNull &&
					 !(v.type == jbvString && v.val.string.len == strlen(QES_REDACTED) &&
					   memcmp(v.val.string.val, QES_REDACTED, v.val.string.len) == 0)) ||
					string_needs(&v))
					return true;
				after_secret_key = false;
				break;
			case WJB_ELEM:
				if (string_needs(&v))
					return true;
				break;
			case WJB_BEGIN_ARRAY:
			case WJB_BEGIN_OBJECT:
				if (after_secret_key)
					return true;	/* a container under a secret key */
				break;
			default:
				break;
		}
	}
	return false;
}

/*
 * The document with every secret masked; the input itself when nothing is
 * to be masked.
 */
Jsonb *
qes_redact_jsonb(Jsonb *in)
{
	JsonbIterator *it;
	JsonbParseState *state = NULL;
	JsonbValue	v;
	JsonbValue *res = NULL;
	JsonbIteratorToken tok;
	bool		after_secret_key = false;
	int			skip = 0;		/* depth inside a container being masked */

	if (!jsonb_needs(in))
		return in;

	it = JsonbIteratorInit(&in->root);
	while ((tok = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		if (skip > 0)
		{
			if (tok == WJB_BEGIN_ARRAY || tok == WJB_BEGIN_OBJECT)
				skip++;
			else if (tok == WJB_END_ARRAY || tok == WJB_END_OBJECT)
				skip--;
			continue;
		}
		switch (tok)
		{
			case WJB_KEY:
				after_secret_key = secret_key(&v);
				if (string_needs(&v))
					redact_string(&v);
				res = pushJsonbValue(&state, tok, &v);
				break;
			case WJB_VALUE:
			case WJB_ELEM:
				if (tok == WJB_VALUE && after_secret_key)
				{
					if (v.type != jbvNull)
						set_redacted(&v);
					after_secret_key = false;
				}
				else if (string_needs(&v))
					redact_string(&v);
				res = pushJsonbValue(&state, tok, &v);
				break;
			case WJB_BEGIN_ARRAY:
			case WJB_BEGIN_OBJECT:
				if (after_secret_key)
				{
					/* an object or array under a secret key: masked whole */
					after_secret_key = false;
					skip = 1;
					set_redacted(&v);
					res = pushJsonbValue(&state, WJB_VALUE, &v);
					break;
				}
				res = pushJsonbValue(&state, tok,
									 (tok == WJB_BEGIN_ARRAY && v.val.array.rawScalar) ? &v : NULL);
				break;
			case WJB_END_ARRAY:
			case WJB_END_OBJECT:
				res = pushJsonbValue(&state, tok, NULL);
				break;
			default:
				break;
		}
	}
	return JsonbValueToJsonb(res);
}

/* ---- SQL ------------------------------------------------------------------- */

/* billing.redact_text(text) */
Datum
qes_redact_text_fn(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	StringInfoData buf;

	if (!qes_redact_needed(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t)))
		PG_RETURN_TEXT_P(t);
	initStringInfo(&buf);
	redact_into(&buf, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	PG_RETURN_TEXT_P(cstring_to_text_with_len(buf.data, buf.len));
}

/* billing.redact(jsonb) */
Datum
qes_redact_jsonb_fn(PG_FUNCTION_ARGS)
{
	PG_RETURN_JSONB_P(qes_redact_jsonb(PG_GETARG_JSONB_P(0)));
}

/* ---- the server log ------------------------------------------------------- */

static emit_log_hook_type prev_emit_log_hook = NULL;

/*
 * A message that also goes to the client is masked by form only: masking
 * the current value of a secret that has no form (the SMTP password, the
 * platform webhook's signing secret) in a message the client wrote itself
 * would tell it which of its guesses is the secret.  Such a message still
 * never carries a secret the client did not send.
 */
static void
redact_field(char **field, bool to_client)
{
	if (*field != NULL)
		*field = to_client ? qes_redact_cstring(*field) : qes_redact_secrets(*field);
}

/*
 * Every message any process sends to the server log (and with it, to the
 * client): masked.  This is the module's only emit_log_hook.  Allocations
 * go to the error's own context.  The statement of a logged error is
 * printed from debug_query_string, which we cannot change: it is hidden
 * when it holds a secret.
 */
static void
qes_emit_log_hook(ErrorData *edata)
{
	bool		to_client = edata->output_to_client;

	redact_field(&edata->message, to_client);
	redact_field(&edata->detail, to_client);
	redact_field(&edata->detail_log, to_client);
	redact_field(&edata->hint, to_client);
	redact_field(&edata->context, to_client);
	redact_field(&edata->internalquery, to_client);
	/*
	 * A statement of the extended protocol is logged (log_statement,
	 * log_min_duration_statement) with its parameters in the detail:
	 * set_config('qes_billing.smtp_password', $1, false) has the password
	 * there, where nothing names it.
	 */
	if (debug_query_string != NULL && sets_secret_setting(debug_query_string))
	{
		if (edata->detail != NULL && strncmp(edata->detail, "parameters: ", 12) == 0)
			edata->detail = pstrdup("parameters: " QES_REDACTED);
		if (edata->detail_log != NULL && strncmp(edata->detail_log, "parameters: ", 12) == 0)
			edata->detail_log = pstrdup("parameters: " QES_REDACTED);
	}
	if (!edata->hide_stmt && debug_query_string != NULL && holds_secret(debug_query_string))
		edata->hide_stmt = true;
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/* ---- pg_stat_activity ------------------------------------------------------- */

static post_parse_analyze_hook_type prev_post_parse_analyze_hook = NULL;

/*
 * A statement that holds a secret (ALTER SYSTEM SET qes_billing.stripe_... =
 * 'sk_live_...', set_config of a key) would stay in pg_stat_activity.query,
 * which pg_monitor (and so a metrics exporter) reads: report it masked.
 * The text was reported before parsing; this replaces it, and it is what
 * the session shows until its next statement.
 */
static void
qes_post_parse_analyze(ParseState *pstate, Query *query, JumbleState *jstate)
{
	if (prev_post_parse_analyze_hook)
		prev_post_parse_analyze_hook(pstate, query, jstate);
	if (pgstat_track_activities && pstate->p_sourcetext != NULL &&
		qes_redact_needed(pstate->p_sourcetext, strlen(pstate->p_sourcetext)))
		pgstat_report_activity(STATE_RUNNING, qes_redact_cstring(pstate->p_sourcetext));
}

/*
 * The extended query protocol reports the statement's text again, raw, when
 * it is executed (the Execute message, after Bind started the executor),
 * after parse analysis masked it: mask it again when the executor runs or a
 * utility command starts.  What the session shows while idle afterwards is
 * the masked text.
 */
static ExecutorRun_hook_type prev_ExecutorRun_hook = NULL;
static ProcessUtility_hook_type prev_ProcessUtility_hook = NULL;

static void
mask_activity(const char *text)
{
	if (pgstat_track_activities && text != NULL && qes_redact_needed(text, strlen(text)))
		pgstat_report_activity(STATE_RUNNING, qes_redact_cstring(text));
}

static void
qes_executor_run(QueryDesc *queryDesc, ScanDirection direction, uint64 count, bool execute_once)
{
	/* the top-level statement only (not what SPI runs inside it) */
	if (ActivePortal != NULL && queryDesc->sourceText == ActivePortal->sourceText)
		mask_activity(queryDesc->sourceText);
	if (prev_ExecutorRun_hook)
		prev_ExecutorRun_hook(queryDesc, direction, count, execute_once);
	else
		standard_ExecutorRun(queryDesc, direction, count, execute_once);
}

static void
qes_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					ProcessUtilityContext context, ParamListInfo params,
					QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	if (context == PROCESS_UTILITY_TOPLEVEL)
		mask_activity(queryString);
	if (prev_ProcessUtility_hook)
		prev_ProcessUtility_hook(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

void
qes_redact_install_log_hook(void)
{
	collect_secret_settings();
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = qes_emit_log_hook;
	prev_post_parse_analyze_hook = post_parse_analyze_hook;
	post_parse_analyze_hook = qes_post_parse_analyze;
	prev_ExecutorRun_hook = ExecutorRun_hook;
	ExecutorRun_hook = qes_executor_run;
	prev_ProcessUtility_hook = ProcessUtility_hook;
	ProcessUtility_hook = qes_process_utility;
}
