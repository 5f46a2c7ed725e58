/* utf8.c - strict UTF-8 and escaped untrusted bytes (see utf8.h). */
#include "util/utf8.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

int ds4_utf8_char(const unsigned char *p, size_t n) {
    if (!n) return 0;
    const unsigned char b = p[0];
    if (b < 0x80) return 1;
    int len;
    uint32_t cp, min;
    if ((b & 0xe0) == 0xc0) len = 2, cp = b & 0x1f, min = 0x80;
    else if ((b & 0xf0) == 0xe0) len = 3, cp = b & 0x0f, min = 0x800;
    else if ((b & 0xf8) == 0xf0) len = 4, cp = b & 0x07, min = 0x10000;
    else return 0;
    if ((size_t)len > n) return 0;
    for (int k = 1; k < len; k++) {
        if ((p[k] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (p[k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return len;
}

const char *ds4_escaped(char *buf, size_t cap, const char *s, size_t n, size_t max) {
    if (!cap) return buf;
    const unsigned char *p = (const unsigned char *)s;
    const size_t lim = max && n > max ? max : n;
    size_t o = 0, i = 0;
    while (i < lim) {
        const unsigned char c = p[i];
        int len = c >= 0x20 && c < 0x7f && c != '\\' ? 1 : c >= 0x80 ? ds4_utf8_char(p + i, lim - i) : 0;
        const size_t need = len ? (size_t)len : c == '\\' ? 2 : 4;
        if (o + need + 4 > cap) break; /* room for this, "..." and the NUL */
        if (len) memcpy(buf + o, p + i, (size_t)len), o += (size_t)len, i += (size_t)len;
        else if (c == '\\') memcpy(buf + o, "\\\\", 2), o += 2, i++;
        else o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", c), i++;
    }
    if (i < n && o + 4 <= cap) memcpy(buf + o, "...", 3), o += 3;
    buf[o] = 0;
    return buf;
}

int ds4_utf8_text(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    for (size_t k = 0; k < n;) {
        const int len = p[k] >= 0x20 && p[k] != 0x7f ? ds4_utf8_char(p + k, n - k) : 0;
        if (!len) return 0;
        k += (size_t)len;
    }
    return 1;
}
