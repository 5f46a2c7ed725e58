/* err.h - the error record every library call fills on failure.
 *
 * Library functions return 0 on success or a negative DS4_E* code, and on
 * failure write a one-line, human-readable message into a caller-owned
 * ds4_err. Only main() turns that into an exit status. A NULL ds4_err is
 * allowed everywhere: the message is then dropped.
 */
#ifndef DS4_UTIL_ERR_H
#define DS4_UTIL_ERR_H

#include <stdarg.h>

enum {
    DS4_OK = 0,
    DS4_E_IO = -1,       /* open/read/write/mmap failed */
    DS4_E_FORMAT = -2,   /* malformed or unsupported file content */
    DS4_E_NOMEM = -3,    /* an allocation sized by input failed */
    DS4_E_ARG = -4,      /* bad argument from the caller or the user */
    DS4_E_MODEL = -5,    /* model metadata/tensors inconsistent */
    DS4_E_RANGE = -6,    /* request exceeds a limit (context, batch) */
    DS4_E_CANCEL = -7,   /* cancelled by the caller */
    DS4_E_INTERNAL = -8, /* a bug: an invariant did not hold */
    DS4_E_BACKEND = -9,  /* the device failed: no GPU, device memory, a kernel fault */
};

typedef struct ds4_err {
    int code;       /* one of DS4_E*, 0 when no error was recorded */
    char msg[512];  /* NUL-terminated message, no trailing newline */
} ds4_err;

/* Records code and a printf-style message in err (if non-NULL); returns code
 * so callers can write `return ds4_err_set(err, DS4_E_FORMAT, "...")`. */
int ds4_err_set(ds4_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefixes an existing message with more context ("loading X: <old msg>"). */
int ds4_err_prefix(ds4_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Clears err (code 0, empty message). */
void ds4_err_clear(ds4_err *err);

#endif
