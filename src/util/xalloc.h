/* xalloc.h - allocation wrappers for small, fixed-size allocations.
 *
 * xmalloc/xcalloc/xrealloc/xstrdup abort the process with a message when the
 * allocation fails. Use them only for sizes that do not come from input
 * (a context size, a request body, a file header): those must use plain
 * malloc and return DS4_E_NOMEM instead.
 */
#ifndef DS4_UTIL_XALLOC_H
#define DS4_UTIL_XALLOC_H

#include <stddef.h>

void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);

#endif
