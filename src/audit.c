/*-------------------------------------------------------------------------
 *
 * audit.c
 *	  SHA-256 hash chain of billing.audit_log.
 *
 * Each row's hash is SHA-256(previous row's hash || canonical content), the
 * first row chaining from 32 zero bytes.  The canonical content is every
 * audited field in a fixed order, each written as "<length>:<bytes>" or "-"
 * for NULL, so that no two different rows share an encoding.  Timestamps
 * enter as microseconds since the PostgreSQL epoch and details as jsonb's
 * own canonical text, so the encoding does not depend on DateStyle,
 * TimeZone or the key order the caller used.
 *
 * The SQL side (sql/install/70_audit.sql) serializes writers on the chain
 * head row and walks the chain to verify it; this file only hashes.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include <openssl/evp.h>

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "audit.h"

PG_FUNCTION_INFO_V1(qes_audit_hash);
PG_FUNCTION_INFO_V1(qes_outer_role);

static void
digest_field(EVP_MD_CTX *ctx, const char *data, size_t len, bool isnull)
{
	char		prefix[32];
	int			n;

	if (isnull)
	{
		EVP_DigestUpdate(ctx, "-", 1);
		return;
	}
	n = snprintf(prefix, sizeof(prefix), "%zu:", len);
	EVP_DigestUpdate(ctx, prefix, n);
	EVP_DigestUpdate(ctx, data, len);
}

static void
digest_text_arg(EVP_MD_CTX *ctx, FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		digest_field(ctx, NULL, 0, true);
	else
	{
		text	   *t = PG_GETARG_TEXT_PP(argno);

		digest_field(ctx, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), false);
	}
}

/*
 * billing.audit_hash(prev bytea, audit_id bigint, occurred_at timestamptz,
 *					  actor_role text, actor_sub text, actor_tenant text,
 *					  tenant_id text, action text, details jsonb)
 *	  returns bytea
 */
Datum
qes_audit_hash(PG_FUNCTION_ARGS)
{
	EVP_MD_CTX *ctx;
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	bytea	   *result;
	char		buf[32];
	int			n;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(7))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("audit_hash: prev, audit_id, occurred_at and action must not be NULL")));

	ctx = EVP_MD_CTX_new();
	if (ctx == NULL || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not initialise SHA-256")));

	{
		bytea	   *prev = PG_GETARG_BYTEA_PP(0);

		if (VARSIZE_ANY_EXHDR(prev) != QES_AUDIT_HASH_LEN)
		{
			EVP_MD_CTX_free(ctx);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("audit_hash: previous hash must be %d bytes", QES_AUDIT_HASH_LEN)));
		}
		EVP_DigestUpdate(ctx, VARDATA_ANY(prev), QES_AUDIT_HASH_LEN);
	}

	n = snprintf(buf, sizeof(buf), INT64_FORMAT, PG_GETARG_INT64(1));
	digest_field(ctx, buf, n, false);
	n = snprintf(buf, sizeof(buf), INT64_FORMAT, (int64) PG_GETARG_TIMESTAMPTZ(2));
	digest_field(ctx, buf, n, false);
	digest_text_arg(ctx, fcinfo, 3);
	digest_text_arg(ctx, fcinfo, 4);
	digest_text_arg(ctx, fcinfo, 5);
	digest_text_arg(ctx, fcinfo, 6);
	digest_text_arg(ctx, fcinfo, 7);
	if (PG_ARGISNULL(8))
		digest_field(ctx, NULL, 0, true);
	else
	{
		Jsonb	   *details = PG_GETARG_JSONB_P(8);
		char	   *s = JsonbToCString(NULL, &details->root, VARSIZE(details));

		digest_field(ctx, s, strlen(s), false);
	}

	if (EVP_DigestFinal_ex(ctx, md, &mdlen) != 1 || mdlen != QES_AUDIT_HASH_LEN)
	{
		EVP_MD_CTX_free(ctx);
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute SHA-256")));
	}
	EVP_MD_CTX_free(ctx);

	result = (bytea *) palloc(VARHDRSZ + mdlen);
	SET_VARSIZE(result, VARHDRSZ + mdlen);
	memcpy(VARDATA(result), md, mdlen);
	PG_RETURN_BYTEA_P(result);
}

/*
 * billing.outer_role(): the role the session acts as (after SET ROLE, as
 * PostgREST switches to the JWT's role), unaffected by SECURITY DEFINER.
 */
Datum
qes_outer_role(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(GetUserNameFromId(GetOuterUserId(), false)));
}
