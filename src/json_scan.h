/*-------------------------------------------------------------------------
 *
 * json_scan.h
 *	  A bounds-checked scanner for the top level of a JSON object text.
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_JSON_SCAN_H
#define QES_JSON_SCAN_H

typedef struct QesJsonSpan
{
	const char *start;			/* the raw value, as written */
	int			len;
	bool		present;
} QesJsonSpan;

extern bool qes_json_scan_object(const char *p, const char *end, const char *const *keys,
								 QesJsonSpan *out, bool *escaped_key);
extern char *qes_json_plain_string(const QesJsonSpan *v);
extern bool qes_json_span_is(const QesJsonSpan *v, const char *literal);
extern bool qes_json_span_int64(const QesJsonSpan *v, int64 *out);
extern char *qes_json_string(const QesJsonSpan *v);
extern bool qes_json_has_unstorable_escape(const char *p, const char *end);
extern char *qes_json_top_level_string(const char *json, const char *key);

#endif							/* QES_JSON_SCAN_H */
