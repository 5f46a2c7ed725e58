/* err.c - ds4_err helpers (see err.h). Thread-safe: touches only *err. */
#include "util/err.h"

#include <stdio.h>
#include <string.h>

int ds4_err_set(ds4_err *err, int code, const char *fmt, ...) {
    if (!err) return code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    err->code = code;
    return code;
}

int ds4_err_prefix(ds4_err *err, const char *fmt, ...) {
    if (!err) return DS4_E_INTERNAL;
    char old[sizeof err->msg];
    memcpy(old, err->msg, sizeof old);
    char pre[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    snprintf(err->msg, sizeof err->msg, "%s: %s", pre, old);
    return err->code;
}

void ds4_err_clear(ds4_err *err) {
    if (!err) return;
    err->code = 0;
    err->msg[0] = '\0';
}
