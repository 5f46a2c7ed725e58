/* num.h - strict parsing of numbers given on command lines.
 *
 * strtol/strtod accept more than a user means by a number: leading blanks,
 * '+', hexadecimal ("0x10", "0x1p-2"), "inf"/"nan", an empty string as 0.
 * These accept only a plain decimal: an optional '-', digits, and for reals
 * an optional fraction and exponent ("1", "-3", "0.25", "1e-3", ".5").
 * A real too small for a double reads as the nearest representable value
 * (0 or a subnormal); one too large is refused. Return 0 and set *out when
 * s is such a number within [lo, hi], else -1 and leave *out alone.
 */
#ifndef DS4_UTIL_NUM_H
#define DS4_UTIL_NUM_H

#include <stddef.h>

int ds4_parse_long(const char *s, long lo, long hi, long *out);
int ds4_parse_double(const char *s, double lo, double hi, double *out);

/* The value 0..15 of hexadecimal digit c, or -1. */
int ds4_hex_digit(int c);

/* src[0..n) with each %XX (two hex digits) decoded into dst, which may be
 * src (decoding never lengthens); "%00" stays as it is when keep_nul (a C
 * string cut at a decoded NUL would read as another). Returns the decoded
 * length; dst is not NUL-terminated. */
size_t ds4_percent_decode(char *dst, const char *src, size_t n, int keep_nul);

#endif
