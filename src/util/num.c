/* num.c - strict decimal numbers (num.h). */
#include "util/num.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

static bool digit(char c) { return c >= '0' && c <= '9'; }

int ds4_parse_long(const char *s, long lo, long hi, long *out) {
    if (!s) return -1;
    const char *p = s + (*s == '-');
    if (!digit(*p)) return -1;
    while (digit(*p)) p++;
    if (*p) return -1;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int ds4_parse_double(const char *s, double lo, double hi, double *out) {
    if (!s) return -1;
    const char *p = s + (*s == '-');
    int nd = 0;
    while (digit(*p)) p++, nd++;
    if (*p == '.') {
        p++;
        while (digit(*p)) p++, nd++;
    }
    if (!nd) return -1;
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '-' || *p == '+') p++;
        if (!digit(*p)) return -1;
        while (digit(*p)) p++;
    }
    if (*p) return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (*end || !isfinite(v)) return -1;
    if (errno == ERANGE && fabs(v) >= 1.0) return -1; /* overflow; underflow reads as its rounded value */
    if (!(v >= lo && v <= hi)) return -1;
    *out = v;
    return 0;
}

int ds4_hex_digit(int c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

size_t ds4_percent_decode(char *dst, const char *src, size_t n, int keep_nul) {
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        int hi, lo;
        if (src[i] == '%' && i + 2 < n && (hi = ds4_hex_digit((unsigned char)src[i + 1])) >= 0 &&
            (lo = ds4_hex_digit((unsigned char)src[i + 2])) >= 0 && (!keep_nul || hi | lo)) {
            dst[m++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            dst[m++] = src[i];
        }
    }
    return m;
}
