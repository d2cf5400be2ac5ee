/*-------------------------------------------------------------------------
 *
 * webhook_signature.c
 *	  Verify Stripe's webhook signatures: HMAC-SHA256, constant-time.
 *
 * Header: "t=<unix seconds>,v1=<hex>[,v1=<hex>...][,v0=...]".  The
 * signature is HMAC-SHA256 keyed with the whole endpoint secret (whsec_...)
 * over "<t>.<raw body>".  A header is accepted when any v1 matches any of
 * the configured secrets (several during a rotation) and t is not older than
 * the tolerance.
 *
 * The header is read exactly as Stripe's own libraries read it, so that the
 * decision is the same as theirs (test/python/test_webhook_signature.py
 * compares the two on thousands of generated headers): fields are split on
 * ",", a field's name ends at its first "=" and its value at the next "=";
 * the first "t" is the timestamp, parsed like a Python int (surrounding
 * whitespace, a sign and underscores between digits are allowed) and
 * formatted back in decimal for the signed payload; a "t" or "v1" field
 * without "=" makes the header unparseable; timestamps in the future pass.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "guc.h"
#include "webhook_signature.h"

PG_FUNCTION_INFO_V1(qes_verify_stripe_signature_fn);

const char *
qes_sig_result_code(QesSigResult r)
{
	switch (r)
	{
		case QES_SIG_OK:
			return "ok";
		case QES_SIG_NO_HEADER:
			return "no_header";
		case QES_SIG_NO_SECRET:
			return "no_secret";
		case QES_SIG_MALFORMED:
			return "malformed";
		case QES_SIG_NO_V1:
			return "no_v1";
		case QES_SIG_MISMATCH:
			return "mismatch";
		case QES_SIG_STALE:
			return "stale";
	}
	return "malformed";
}

static bool
py_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

/* Parse like Python's int(): whitespace, sign, digits with single underscores. */
static bool
parse_py_int(const char *s, size_t len, int64 *out)
{
	size_t		i = 0;
	bool		neg = false;
	bool		digit_seen = false;
	bool		prev_underscore = false;
	uint64		v = 0;

	while (len > 0 && py_space(s[len - 1]))
		len--;
	while (i < len && py_space(s[i]))
		i++;
	if (i < len && (s[i] == '+' || s[i] == '-'))
		neg = (s[i++] == '-');
	for (; i < len; i++)
	{
		if (s[i] == '_')
		{
			if (!digit_seen || prev_underscore)
				return false;
			prev_underscore = true;
			continue;
		}
		if (s[i] < '0' || s[i] > '9')
			return false;
		if (v > (PG_UINT64_MAX - 9) / 10 || v * 10 + (s[i] - '0') > (uint64) PG_INT64_MAX)
			return false;		/* out of range: no real header has it */
		v = v * 10 + (s[i] - '0');
		digit_seen = true;
		prev_underscore = false;
	}
	if (!digit_seen || prev_underscore)
		return false;
	*out = neg ? -(int64) v : (int64) v;
	return true;
}

typedef struct SigField
{
	const char *name;
	size_t		name_len;
	const char *value;			/* NULL: the field has no '=' */
	size_t		value_len;
} SigField;

/* The next field of the header at *p, advancing *p past it. */
static bool
next_field(const char **p, const char *end, SigField *f)
{
	const char *start = *p;
	const char *comma;
	const char *eq;

	if (start > end)
		return false;
	comma = memchr(start, ',', end - start);
	if (comma == NULL)
		comma = end;
	eq = memchr(start, '=', comma - start);
	f->name = start;
	if (eq == NULL)
	{
		f->name_len = comma - start;
		f->value = NULL;
		f->value_len = 0;
	}
	else
	{
		const char *eq2 = memchr(eq + 1, '=', comma - (eq + 1));

		f->name_len = eq - start;
		f->value = eq + 1;
		f->value_len = (eq2 ? eq2 : comma) - (eq + 1);
	}
	*p = comma + 1;
	return true;
}

static bool
field_is(const SigField *f, const char *name)
{
	return f->name_len == strlen(name) && memcmp(f->name, name, f->name_len) == 0;
}

static void
hmac_hex(const char *key, size_t key_len, const char *prefix, size_t prefix_len,
		 const char *payload, size_t payload_len, char *hex)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int md_len = 0;
	HMAC_CTX   *ctx = HMAC_CTX_new();
	static const char digits[] = "0123456789abcdef";

	if (ctx == NULL ||
		HMAC_Init_ex(ctx, key, (int) key_len, EVP_sha256(), NULL) != 1 ||
		HMAC_Update(ctx, (const unsigned char *) prefix, prefix_len) != 1 ||
		HMAC_Update(ctx, (const unsigned char *) payload, payload_len) != 1 ||
		HMAC_Final(ctx, md, &md_len) != 1 || md_len != 32)
	{
		HMAC_CTX_free(ctx);
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute HMAC-SHA256")));
	}
	HMAC_CTX_free(ctx);
	for (unsigned int i = 0; i < md_len; i++)
	{
		hex[2 * i] = digits[md[i] >> 4];
		hex[2 * i + 1] = digits[md[i] & 0xf];
	}
	hex[64] = '\0';
}

/* A timestamptz as microseconds since the Unix epoch. */
int64
qes_unix_usecs(TimestampTz ts)
{
	return ts + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * USECS_PER_SEC;
}

/*
 * Verify header against payload with any of the comma-separated secrets,
 * at now_us (microseconds since the Unix epoch).
 */
QesSigResult
qes_verify_stripe_signature(const char *header, const char *payload, size_t payload_len,
							const char *secrets, int64 tolerance_s, int64 now_us)
{
	const char *end;
	const char *p;
	SigField	f;
	bool		have_t = false;
	int64		t = 0;
	int			nsig = 0;
	char		prefix[32];
	int			prefix_len;
	const char *s;
	bool		matched = false;
	bool		any_secret = false;

	if (header == NULL || header[0] == '\0')
		return QES_SIG_NO_HEADER;

	end = header + strlen(header);
	p = header;
	while (next_field(&p, end, &f))
	{
		if (field_is(&f, "t"))
		{
			if (f.value == NULL)
				return QES_SIG_MALFORMED;
			if (!have_t)
			{
				if (!parse_py_int(f.value, f.value_len, &t))
					return QES_SIG_MALFORMED;
				have_t = true;
			}
		}
		else if (field_is(&f, "v1"))
		{
			if (f.value == NULL)
				return QES_SIG_MALFORMED;
			nsig++;
		}
	}
	if (!have_t)
		return QES_SIG_MALFORMED;
	if (nsig == 0)
		return QES_SIG_NO_V1;

	prefix_len = snprintf(prefix, sizeof(prefix), INT64_FORMAT ".", t);

	/* every v1 against every secret; constant time per comparison */
	for (s = secrets; s != NULL && *s != '\0';)
	{
		const char *comma = strchr(s, ',');
		size_t		len = comma ? (size_t) (comma - s) : strlen(s);
		char		expected[65];

		while (len > 0 && (*s == ' ' || *s == '\t'))
			s++, len--;
		while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t'))
			len--;
		if (len > 0)
		{
			any_secret = true;
			hmac_hex(s, len, prefix, prefix_len, payload, payload_len, expected);
			p = header;
			while (next_field(&p, end, &f))
			{
				if (field_is(&f, "v1") && f.value_len == 64 &&
					CRYPTO_memcmp(expected, f.value, 64) == 0)
					matched = true;
			}
		}
		s = comma ? comma + 1 : NULL;
	}
	if (!any_secret)
		return QES_SIG_NO_SECRET;
	if (!matched)
		return QES_SIG_MISMATCH;
	/*
	 * Stale exactly when stripe-python says so: t < time.time() - tolerance,
	 * compared in microseconds (a whole-second clock would accept up to one
	 * second longer).  A timestamp beyond the int64 microsecond range is in
	 * the future, which Stripe's SDKs do not refuse either.
	 */
	if (tolerance_s > 0 && t < PG_INT64_MAX / USECS_PER_SEC &&
		(t < PG_INT64_MIN / USECS_PER_SEC ||
		 t * USECS_PER_SEC < now_us - tolerance_s * USECS_PER_SEC))
		return QES_SIG_STALE;
	return QES_SIG_OK;
}

/*
 * billing.verify_stripe_signature(payload text, header text,
 *		secrets text default NULL, tolerance_s integer default NULL,
 *		at timestamptz default NULL) returns text
 *
 * 'ok', or why not: no_header, no_secret, malformed, no_v1, mismatch,
 * stale.  By default the configured webhook secret(s) of the current mode,
 * qes_billing.webhook_tolerance, and the real clock (not the billing clock:
 * Stripe signs with real time).
 */
Datum
qes_verify_stripe_signature_fn(PG_FUNCTION_ARGS)
{
	text	   *payload;
	char	   *header;
	const char *secrets;
	int64		tolerance;
	int64		now_us;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("payload must not be null")));
	payload = PG_GETARG_TEXT_PP(0);
	header = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	secrets = PG_ARGISNULL(2) ? qes_stripe_key(QES_KEY_WEBHOOK, true)
		: text_to_cstring(PG_GETARG_TEXT_PP(2));
	tolerance = PG_ARGISNULL(3) ? qes_webhook_tolerance_s : PG_GETARG_INT32(3);
	now_us = qes_unix_usecs(PG_ARGISNULL(4) ? GetCurrentTimestamp() : PG_GETARG_TIMESTAMPTZ(4));

	PG_RETURN_TEXT_P(cstring_to_text(qes_sig_result_code(
		qes_verify_stripe_signature(header, VARDATA_ANY(payload), VARSIZE_ANY_EXHDR(payload),
									secrets, tolerance, now_us))));
}
