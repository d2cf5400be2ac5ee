/*-------------------------------------------------------------------------
 *
 * siphash.c
 *	  SipHash-2-4, 128-bit output, written from the paper's description
 *	  (two compression rounds per 8-byte word, four finalization rounds per
 *	  64-bit half of the result; words read little-endian).
 *
 * The usage counters (counters.c) are keyed by this hash of (database,
 * tenant, metric, period) under a key drawn at server start, so that an
 * entry costs 16 bytes of key instead of the 112 the strings take.  Two
 * different keys share a fingerprint with probability about n^2 / 2^129
 * (2.4e-26 for 4 million counters), and nobody who does not know the key
 * can pick tenant ids that collide.  Its self-check against the paper's
 * test vector is test/python/test_c_sql_contract.py.
 *
 *-------------------------------------------------------------------------
 */
#include "c.h"

#include "siphash.h"

#define ROTL64(x, b)	(((x) << (b)) | ((x) >> (64 - (b))))

#define SIP_ROUND(v0, v1, v2, v3) \
	do { \
		(v0) += (v1); (v1) = ROTL64((v1), 13); (v1) ^= (v0); (v0) = ROTL64((v0), 32); \
		(v2) += (v3); (v3) = ROTL64((v3), 16); (v3) ^= (v2); \
		(v0) += (v3); (v3) = ROTL64((v3), 21); (v3) ^= (v0); \
		(v2) += (v1); (v1) = ROTL64((v1), 17); (v1) ^= (v2); (v2) = ROTL64((v2), 32); \
	} while (0)

static inline uint64
read_le64(const unsigned char *p)
{
	uint64		w = 0;

	for (int i = 7; i >= 0; i--)
		w = (w << 8) | p[i];
	return w;
}

void
qes_siphash128(const uint64 key[2], const void *data, size_t len, uint64 out[2])
{
	const unsigned char *p = (const unsigned char *) data;
	const unsigned char *end = p + (len - len % 8);
	uint64		v0 = key[0] ^ UINT64CONST(0x736f6d6570736575);
	uint64		v1 = key[1] ^ UINT64CONST(0x646f72616e646f6d) ^ 0xee;
	uint64		v2 = key[0] ^ UINT64CONST(0x6c7967656e657261);
	uint64		v3 = key[1] ^ UINT64CONST(0x7465646279746573);
	uint64		last = ((uint64) len) << 56;

	for (; p < end; p += 8)
	{
		uint64		m = read_le64(p);

		v3 ^= m;
		SIP_ROUND(v0, v1, v2, v3);
		SIP_ROUND(v0, v1, v2, v3);
		v0 ^= m;
	}
	for (int i = (int) (len % 8) - 1; i >= 0; i--)
		last |= ((uint64) p[i]) << (8 * i);
	v3 ^= last;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	v0 ^= last;

	v2 ^= 0xee;
	for (int i = 0; i < 4; i++)
		SIP_ROUND(v0, v1, v2, v3);
	out[0] = v0 ^ v1 ^ v2 ^ v3;
	v1 ^= 0xdd;
	for (int i = 0; i < 4; i++)
		SIP_ROUND(v0, v1, v2, v3);
	out[1] = v0 ^ v1 ^ v2 ^ v3;
}
