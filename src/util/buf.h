/* buf.h - a growable byte buffer (text or binary).
 *
 * Invariants: data is NULL with len == cap == 0 until the first append;
 * afterwards data[len] == '\0' always (so text can be used as a C string
 * when it holds no NUL), and len < cap. Appends that fail to allocate
 * return DS4_E_NOMEM, leave the contents unchanged and set the sticky
 * `oom` flag, so a caller may append many pieces and test once with
 * ds4_buf_ok(). Not thread-safe: one owner at a time.
 */
#ifndef DS4_UTIL_BUF_H
#define DS4_UTIL_BUF_H

#include <stddef.h>
#include <stdint.h>

typedef struct ds4_buf {
    char *data;  /* (cap) bytes, owned; NUL at data[len] once allocated */
    size_t len;  /* bytes in use */
    size_t cap;  /* bytes allocated */
    int oom;     /* sticky: some append failed since init/reset */
} ds4_buf;

#define DS4_BUF_INIT {NULL, 0, 0, 0}

void ds4_buf_init(ds4_buf *b);
/* Frees the storage and re-initializes b. */
void ds4_buf_free(ds4_buf *b);
/* Sets len to 0 and clears oom; keeps the allocation. */
void ds4_buf_reset(ds4_buf *b);
/* Makes room for `extra` more bytes (+ the NUL). 0 or DS4_E_NOMEM. */
int ds4_buf_reserve(ds4_buf *b, size_t extra);
int ds4_buf_append(ds4_buf *b, const void *p, size_t n);
int ds4_buf_puts(ds4_buf *b, const char *s);
int ds4_buf_putc(ds4_buf *b, char c);
int ds4_buf_printf(ds4_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Little-endian fixed-width integers (binary records). */
int ds4_buf_put_u32le(ds4_buf *b, uint32_t v);
/* Shortens to n bytes (n <= len). */
void ds4_buf_truncate(ds4_buf *b, size_t n);
/* 1 if no append failed since init/reset. */
int ds4_buf_ok(const ds4_buf *b);
/* Hands the storage to the caller (free() it) and re-initializes b.
 * Returns a NUL-terminated string (an empty malloc'd one if b was empty),
 * or NULL if that small allocation fails. *len (if non-NULL) gets len. */
char *ds4_buf_detach(ds4_buf *b, size_t *len);

#endif
