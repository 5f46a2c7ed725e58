/* buf.c - growable byte buffer (see buf.h). Growth doubles the capacity;
 * sizes are checked for overflow so a huge request fails cleanly. */
#include "util/buf.h"
#include "util/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ds4_buf_init(ds4_buf *b) {
    b->data = NULL;
    b->len = b->cap = 0;
    b->oom = 0;
}

void ds4_buf_free(ds4_buf *b) {
    free(b->data);
    ds4_buf_init(b);
}

void ds4_buf_reset(ds4_buf *b) {
    b->len = 0;
    b->oom = 0;
    if (b->data) b->data[0] = '\0';
}

int ds4_buf_reserve(ds4_buf *b, size_t extra) {
    if (extra > SIZE_MAX / 2 - b->len - 1) {
        b->oom = 1;
        return DS4_E_NOMEM;
    }
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) {
        b->oom = 1;
        return DS4_E_NOMEM;
    }
    b->data = p;
    b->cap = cap;
    return 0;
}

int ds4_buf_append(ds4_buf *b, const void *p, size_t n) {
    if (ds4_buf_reserve(b, n)) return DS4_E_NOMEM;
    if (n) memmove(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int ds4_buf_puts(ds4_buf *b, const char *s) { return ds4_buf_append(b, s, strlen(s)); }

int ds4_buf_putc(ds4_buf *b, char c) { return ds4_buf_append(b, &c, 1); }

int ds4_buf_printf(ds4_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return DS4_E_ARG;
    if (ds4_buf_reserve(b, (size_t)n)) return DS4_E_NOMEM;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

int ds4_buf_put_u32le(ds4_buf *b, uint32_t v) {
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    return ds4_buf_append(b, x, 4);
}

void ds4_buf_truncate(ds4_buf *b, size_t n) {
    if (n < b->len) {
        b->len = n;
        b->data[n] = '\0';
    }
}

int ds4_buf_ok(const ds4_buf *b) { return !b->oom; }

char *ds4_buf_detach(ds4_buf *b, size_t *len) {
    char *p = b->data;
    size_t n = b->len;
    if (!p) {
        p = malloc(1);
        if (!p) return NULL;
        p[0] = '\0';
    }
    if (len) *len = n;
    ds4_buf_init(b);
    return p;
}
