/*-------------------------------------------------------------------------
 *
 * json_scan.c
 *	  A bounds-checked scanner for the top level of a JSON object text.
 *
 * The webhook intake (src/webhook_intake.c) reads an event's top-level
 * fields with it instead of building the whole jsonb, and the PostgREST
 * request helpers (src/postgrest.c) read a header or a JWT claim from the
 * JSON object PostgREST passes in a setting.  It never reads past the end
 * and gives up on anything unexpected.  Keys are matched as written (an
 * escaped key is reported, not decoded); a repeated key counts with its last
 * value, as in jsonb.
 *
 *-------------------------------------------------------------------------
 */
#include "qes_billing.h"

#include "lib/stringinfo.h"

#include "json_scan.h"

typedef struct JsonScan
{
	const char *p;
	const char *end;
} JsonScan;

static void
skip_ws(JsonScan *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

/* past a string whose opening quote is at s->p */
static bool
skip_string(JsonScan *s)
{
	s->p++;
	while (s->p < s->end)
	{
		if (*s->p == '\\')
			s->p += 2;
		else if (*s->p == '"')
		{
			s->p++;
			return true;
		}
		else
			s->p++;
	}
	return false;
}

/* past one value of any kind */
static bool
skip_value(JsonScan *s)
{
	int			depth = 0;

	if (s->p >= s->end)
		return false;
	if (*s->p == '"')
		return skip_string(s);
	if (*s->p != '{' && *s->p != '[')
	{
		/* number, true, false, null */
		while (s->p < s->end && *s->p != ',' && *s->p != '}' && *s->p != ']' &&
			   *s->p != ' ' && *s->p != '\t' && *s->p != '\n' && *s->p != '\r')
			s->p++;
		return true;
	}
	while (s->p < s->end)
	{
		char		c = *s->p;

		if (c == '"')
		{
			if (!skip_string(s))
				return false;
			continue;
		}
		if (c == '{' || c == '[')
			depth++;
		else if (c == '}' || c == ']')
		{
			depth--;
			if (depth == 0)
			{
				s->p++;
				return true;
			}
		}
		s->p++;
	}
	return false;
}

/*
 * Scan the object at [p, end): for each key in keys[] (NULL-terminated),
 * the raw span of its (last) value.  False when this is not an object.
 */
bool
qes_json_scan_object(const char *p, const char *end, const char *const *keys,
					 QesJsonSpan *out, bool *escaped_key)
{
	JsonScan		s = {p, end};

	if (escaped_key)
		*escaped_key = false;

	for (int i = 0; keys[i]; i++)
		out[i].present = false;
	skip_ws(&s);
	if (s.p >= s.end || *s.p != '{')
		return false;
	s.p++;
	skip_ws(&s);
	if (s.p < s.end && *s.p == '}')
		return true;
	for (;;)
	{
		const char *kstart;
		int			klen;
		const char *vstart;

		skip_ws(&s);
		if (s.p >= s.end || *s.p != '"')
			return false;
		kstart = s.p + 1;
		if (!skip_string(&s))
			return false;
		klen = (int) (s.p - 1 - kstart);
		if (escaped_key && memchr(kstart, '\\', klen) != NULL)
			*escaped_key = true;
		skip_ws(&s);
		if (s.p >= s.end || *s.p != ':')
			return false;
		s.p++;
		skip_ws(&s);
		vstart = s.p;
		if (!skip_value(&s))
			return false;
		for (int i = 0; keys[i]; i++)
		{
			if ((int) strlen(keys[i]) == klen && memcmp(keys[i], kstart, klen) == 0)
			{
				out[i].start = vstart;
				out[i].len = (int) (s.p - vstart);
				out[i].present = true;
			}
		}
		skip_ws(&s);
		if (s.p < s.end && *s.p == ',')
		{
			s.p++;
			continue;
		}
		return s.p < s.end && *s.p == '}';
	}
}

/* a string value without escapes, as a palloc'd C string; NULL otherwise */
char *
qes_json_plain_string(const QesJsonSpan *v)
{
	if (!v->present || v->len < 2 || v->start[0] != '"' || v->start[v->len - 1] != '"' ||
		memchr(v->start, '\\', v->len) != NULL)
		return NULL;
	return pnstrdup(v->start + 1, v->len - 2);
}

bool
qes_json_span_is(const QesJsonSpan *v, const char *literal)
{
	return v->present && v->len == (int) strlen(literal) && memcmp(v->start, literal, v->len) == 0;
}

/* an integer value (no fraction or exponent) */
bool
qes_json_span_int64(const QesJsonSpan *v, int64 *out)
{
	int64		n = 0;
	int			i = 0;
	bool		neg = false;

	if (!v->present || v->len == 0 || v->len > 18)
		return false;
	if (v->start[0] == '-')
		neg = true, i = 1;
	if (i >= v->len)
		return false;
	for (; i < v->len; i++)
	{
		if (v->start[i] < '0' || v->start[i] > '9')
			return false;
		n = n * 10 + (v->start[i] - '0');
	}
	*out = neg ? -n : n;
	return true;
}

static int
hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static bool
hex4(const char *p, const char *end, int *out)
{
	int			v = 0;

	if (end - p < 4)
		return false;
	for (int i = 0; i < 4; i++)
	{
		int			h = hex_value(p[i]);

		if (h < 0)
			return false;
		v = v * 16 + h;
	}
	*out = v;
	return true;
}

static void
append_utf8(StringInfo buf, int cp)
{
	if (cp < 0x80)
		appendStringInfoChar(buf, (char) cp);
	else if (cp < 0x800)
	{
		appendStringInfoChar(buf, (char) (0xC0 | (cp >> 6)));
		appendStringInfoChar(buf, (char) (0x80 | (cp & 0x3F)));
	}
	else if (cp < 0x10000)
	{
		appendStringInfoChar(buf, (char) (0xE0 | (cp >> 12)));
		appendStringInfoChar(buf, (char) (0x80 | ((cp >> 6) & 0x3F)));
		appendStringInfoChar(buf, (char) (0x80 | (cp & 0x3F)));
	}
	else
	{
		appendStringInfoChar(buf, (char) (0xF0 | (cp >> 18)));
		appendStringInfoChar(buf, (char) (0x80 | ((cp >> 12) & 0x3F)));
		appendStringInfoChar(buf, (char) (0x80 | ((cp >> 6) & 0x3F)));
		appendStringInfoChar(buf, (char) (0x80 | (cp & 0x3F)));
	}
}

/*
 * A JSON string value decoded as JSON decodes it (every escape, surrogate
 * pairs), palloc'd; NULL when it is not a string, or holds \u0000 or an
 * unpaired surrogate (which no text value can hold).
 */
char *
qes_json_string(const QesJsonSpan *v)
{
	const char *p;
	const char *end;
	StringInfoData buf;

	if (!v->present || v->len < 2 || v->start[0] != '"' || v->start[v->len - 1] != '"')
		return NULL;
	p = v->start + 1;
	end = v->start + v->len - 1;
	initStringInfo(&buf);
	while (p < end)
	{
		int			cp;

		if (*p != '\\')
		{
			appendStringInfoChar(&buf, *p++);
			continue;
		}
		if (++p >= end)
			return NULL;
		switch (*p++)
		{
			case '"':
				appendStringInfoChar(&buf, '"');
				break;
			case '\\':
				appendStringInfoChar(&buf, '\\');
				break;
			case '/':
				appendStringInfoChar(&buf, '/');
				break;
			case 'b':
				appendStringInfoChar(&buf, '\b');
				break;
			case 'f':
				appendStringInfoChar(&buf, '\f');
				break;
			case 'n':
				appendStringInfoChar(&buf, '\n');
				break;
			case 'r':
				appendStringInfoChar(&buf, '\r');
				break;
			case 't':
				appendStringInfoChar(&buf, '\t');
				break;
			case 'u':
				if (!hex4(p, end, &cp))
					return NULL;
				p += 4;
				if (cp == 0 || (cp >= 0xDC00 && cp <= 0xDFFF))
					return NULL;
				if (cp >= 0xD800 && cp <= 0xDBFF)
				{
					int			lo;

					if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, end, &lo) ||
						lo < 0xDC00 || lo > 0xDFFF)
						return NULL;
					p += 6;
					cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
				}
				append_utf8(&buf, cp);
				break;
			default:
				return NULL;
		}
	}
	return buf.data;
}

/*
 * Does the JSON text hold an escape that jsonb refuses (\u0000, an
 * unpaired surrogate)?  The worker casts each payload to jsonb; such an
 * event could never be applied.
 */
bool
qes_json_has_unstorable_escape(const char *p, const char *end)
{
	while (p < end)
	{
		int			cp;

		if (*p != '\\')
		{
			p++;
			continue;
		}
		if (p + 1 >= end)
			return true;
		if (p[1] != 'u')
		{
			p += 2;
			continue;
		}
		if (!hex4(p + 2, end, &cp))
			return true;
		p += 6;
		if (cp == 0 || (cp >= 0xDC00 && cp <= 0xDFFF))
			return true;
		if (cp >= 0xD800 && cp <= 0xDBFF)
		{
			int			lo;

			if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, end, &lo) ||
				lo < 0xDC00 || lo > 0xDFFF)
				return true;
			p += 6;
		}
	}
	return false;
}

/*
 * A top-level string member of a JSON object text, decoded; NULL when
 * absent, not a string, or the text is not an object.
 */
char *
qes_json_top_level_string(const char *json, const char *key)
{
	const char *keys[2] = {key, NULL};
	QesJsonSpan	v[1];

	if (json == NULL || !qes_json_scan_object(json, json + strlen(json), keys, v, NULL))
		return NULL;
	return qes_json_string(&v[0]);
}
