/*-------------------------------------------------------------------------
 *
 * stripe_form.c
 *	  Stripe's form encoding of request parameters, from jsonb.
 *
 * Stripe takes application/x-www-form-urlencoded bodies (and query strings)
 * with brackets for nesting:
 *
 *	{"metadata": {"tenant_id": "t1"}}			metadata[tenant_id]=t1
 *	{"items": [{"price": "price_x"}]}			items[0][price]=price_x
 *	{"expand": ["latest_invoice.payment_intent"]}	expand[]=latest_invoice.payment_intent
 *
 * Arrays of scalars use "[]", arrays of objects or arrays an index.
 * Booleans are true/false, numbers as written, null is the empty string
 * (Stripe's way to unset a field).  An empty object or array sends nothing.
 * Names and values are percent-encoded (RFC 3986 unreserved characters
 * stay; brackets are encoded too, which Stripe accepts).
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "stripe_form.h"

static void
append_escaped(StringInfo out, const char *s, int len)
{
	static const char hex[] = "0123456789ABCDEF";

	for (int i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
			c == '-' || c == '_' || c == '.' || c == '~')
			appendStringInfoChar(out, (char) c);
		else
		{
			appendStringInfoChar(out, '%');
			appendStringInfoChar(out, hex[c >> 4]);
			appendStringInfoChar(out, hex[c & 15]);
		}
	}
}

static void
append_pair(StringInfo out, const char *name, const JsonbValue *v)
{
	if (out->len > 0)
		appendStringInfoChar(out, '&');
	append_escaped(out, name, strlen(name));
	appendStringInfoChar(out, '=');
	switch (v->type)
	{
		case jbvString:
			append_escaped(out, v->val.string.val, v->val.string.len);
			break;
		case jbvNumeric:
			{
				char	   *num = DatumGetCString(DirectFunctionCall1(numeric_out,
																	  NumericGetDatum(v->val.numeric)));

				append_escaped(out, num, strlen(num));
				pfree(num);
				break;
			}
		case jbvBool:
			appendStringInfoString(out, v->val.boolean ? "true" : "false");
			break;
		case jbvNull:
			break;
		default:
			elog(ERROR, "unexpected jsonb value type %d in Stripe parameters", (int) v->type);
	}
}

/* is every element of this array container a scalar? */
static bool
array_of_scalars(JsonbContainer *jc)
{
	uint32		n = JsonContainerSize(jc);

	for (uint32 i = 0; i < n; i++)
	{
		JsonbValue *elem = getIthJsonbValueFromContainer(jc, i);

		if (elem->type == jbvBinary)
			return false;
	}
	return true;
}

static void encode_container(StringInfo out, const char *prefix, JsonbContainer *jc);

static void
encode_value(StringInfo out, const char *name, JsonbValue *v)
{
	if (v->type == jbvBinary)
		encode_container(out, name, v->val.binary.data);
	else
		append_pair(out, name, v);
}

/*
 * Encode an object or array whose name is prefix (NULL at the top level,
 * which must be an object).
 */
static void
encode_container(StringInfo out, const char *prefix, JsonbContainer *jc)
{
	if (JsonContainerIsScalar(jc))
	{
		JsonbValue	scalar;

		if (prefix == NULL || !JsonbExtractScalar(jc, &scalar))
			elog(ERROR, "Stripe parameters must be a JSON object");
		append_pair(out, prefix, &scalar);
	}
	else if (JsonContainerIsObject(jc))
	{
		JsonbIterator *it = JsonbIteratorInit(jc);
		JsonbValue	v;
		JsonbIteratorToken tok;
		char	   *name = NULL;

		while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		{
			if (tok == WJB_KEY)
			{
				char	   *key = pnstrdup(v.val.string.val, v.val.string.len);

				name = prefix ? psprintf("%s[%s]", prefix, key) : key;
			}
			else if (tok == WJB_VALUE)
				encode_value(out, name, &v);
		}
	}
	else
	{
		uint32		n = JsonContainerSize(jc);
		bool		scalars;

		if (prefix == NULL)
			elog(ERROR, "Stripe parameters must be a JSON object");
		scalars = array_of_scalars(jc);
		for (uint32 i = 0; i < n; i++)
		{
			JsonbValue *elem = getIthJsonbValueFromContainer(jc, i);
			char	   *name = scalars ? psprintf("%s[]", prefix) : psprintf("%s[%u]", prefix, i);

			encode_value(out, name, elem);
		}
	}
}

/*
 * The form encoding of a jsonb object, palloc'd in the current memory
 * context ("" for an empty object).
 */
char *
qes_stripe_form_encode(Jsonb *params)
{
	StringInfoData out;

	initStringInfo(&out);
	if (!JB_ROOT_IS_OBJECT(params))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Stripe parameters must be a JSON object")));
	encode_container(&out, NULL, &params->root);
	return out.data;
}

PG_FUNCTION_INFO_V1(qes_stripe_form_fn);

/*
 * billing.stripe_form(jsonb): the encoding, for tests and for operators
 * reading what a queued request will send.
 */
Datum
qes_stripe_form_fn(PG_FUNCTION_ARGS)
{
	Jsonb	   *params = PG_GETARG_JSONB_P(0);

	PG_RETURN_TEXT_P(cstring_to_text(qes_stripe_form_encode(params)));
}
