/*-------------------------------------------------------------------------
 *
 * siphash.h
 *	  SipHash-2-4 with a 128-bit result: a keyed hash whose collisions an
 *	  outsider cannot choose (Aumasson and Bernstein, "SipHash: a fast
 *	  short-input PRF", 2012).
 *
 *-------------------------------------------------------------------------
 */
#ifndef QES_SIPHASH_H
#define QES_SIPHASH_H

#include "c.h"

extern void qes_siphash128(const uint64 key[2], const void *data, size_t len, uint64 out[2]);

#endif							/* QES_SIPHASH_H */
