/* file.c - ds4_open_regular (see file.h). Thread-safe: no shared state. */
#include "util/file.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

static const char *kind_of(mode_t m) {
    if (S_ISFIFO(m)) return "a FIFO";
    if (S_ISDIR(m)) return "a directory";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISSOCK(m)) return "a socket";
    return "not a file";
}

int ds4_open_regular(const char *path, int flags, struct stat *st, ds4_err *err) {
    /* O_NONBLOCK: opening a FIFO without a writer returns at once */
    int fd = open(path, flags | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return ds4_err_set(err, DS4_E_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return ds4_err_set(err, DS4_E_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        ds4_err_set(err, DS4_E_IO, "%s: not a regular file (%s)", path, kind_of(sb.st_mode));
        errno = EINVAL;
        return DS4_E_IO;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
        int e = errno;
        close(fd);
        return ds4_err_set(err, DS4_E_IO, "%s: cannot open: %s", path, strerror(e));
    }
    if (st) *st = sb;
    return fd;
}
