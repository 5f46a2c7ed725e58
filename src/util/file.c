/* file.c - regular input files, replaced outputs, temporary files under
 * signals (see file.h). */
#include "util/file.h"

#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
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

/* the directory part of path ("." when none) and a pointer to its last name */
static char *dir_of(const char *path, const char **base) {
    const size_t n = strlen(path);
    char *dir = malloc(n + 2); /* room for "." */
    if (!dir) return NULL;
    memcpy(dir, path, n + 1);
    char *slash = strrchr(dir, '/');
    *base = slash ? path + (slash - dir) + 1 : path;
    if (!slash) strcpy(dir, ".");
    else if (slash == dir) dir[1] = 0;
    else *slash = 0;
    return dir;
}

int ds4_output_path_ok(const char *path, ds4_err *err) {
    if (!path || !*path) return ds4_err_set(err, DS4_E_ARG, "the output path is empty");
    struct stat sb;
    if (stat(path, &sb) == 0) {
        if (!S_ISREG(sb.st_mode))
            return ds4_err_set(err, DS4_E_IO, "%s: exists and is %s, not a regular file: refusing to replace it", path,
                               kind_of(sb.st_mode));
        return 0;
    }
    if (errno != ENOENT) return ds4_err_set(err, DS4_E_IO, "%s: %s", path, strerror(errno));
    /* the directory it goes in */
    const char *base;
    char *dir = dir_of(path, &base);
    if (!dir) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    int rc = 0;
    if (stat(dir, &sb) != 0) rc = ds4_err_set(err, DS4_E_IO, "%s: its directory %s: %s", path, dir, strerror(errno));
    else if (!S_ISDIR(sb.st_mode)) rc = ds4_err_set(err, DS4_E_IO, "%s: %s is not a directory", path, dir);
    free(dir);
    return rc;
}

bool ds4_unlink_regular(const char *path) {
    struct stat sb;
    return path && lstat(path, &sb) == 0 && S_ISREG(sb.st_mode) && unlink(path) == 0;
}

int ds4_same_file(const char *a, const char *b) {
    struct stat sa, sb;
    return a && b && stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

int ds4_same_path(const char *a, const char *b) {
    if (!a || !b) return 0;
    if (!strcmp(a, b) || ds4_same_file(a, b)) return 1;
    const char *ba, *bb;
    char *da = dir_of(a, &ba), *db = dir_of(b, &bb);
    int same = da && db && *ba && !strcmp(ba, bb) && ds4_same_file(da, db);
    free(da);
    free(db);
    return same;
}

/* ---- outputs replaced whole: temporary file + rename ---- */

/* o->f's writes: all of buf or the first failure's errno kept in o->werr
 * (by the time stdio reports an error, errno may say something else) */
static ssize_t out_write(void *cookie, const char *buf, size_t n) {
    ds4_out *o = cookie;
    size_t done = 0;
    while (done < n) {
        const ssize_t w = write(o->fd, buf + done, n - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (!o->werr) o->werr = w < 0 ? errno : EIO;
            return 0; /* fopencookie: 0 is the error */
        }
        done += (size_t)w;
    }
    return (ssize_t)n;
}

static int out_close(void *cookie) {
    ds4_out *o = cookie;
    const int rc = close(o->fd);
    o->fd = -1;
    return rc;
}

int ds4_out_open(ds4_out *o, const char *path, const char *mode, ds4_err *err) {
    memset(o, 0, sizeof *o);
    const size_t n = strlen(path) + 16;
    o->tmp = malloc(n);
    if (!o->tmp) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    snprintf(o->tmp, n, "%s.tmp.XXXXXX", path);
    signal(SIGXFSZ, SIG_IGN);
    const int fd = mkstemp(o->tmp);
    if (fd < 0) {
        const int e = errno;
        free(o->tmp);
        o->tmp = NULL;
        return ds4_err_set(err, DS4_E_IO, "cannot create a temporary file next to %s: %s", path, strerror(e));
    }
    const mode_t um = umask(0);
    umask(um);
    o->fd = fd;
    const cookie_io_functions_t io = {.write = out_write, .close = out_close};
    if (fchmod(fd, 0666 & ~um) != 0 || !(o->f = fopencookie(o, mode, io))) {
        const int e = errno;
        close(fd);
        unlink(o->tmp);
        free(o->tmp);
        o->tmp = NULL;
        return ds4_err_set(err, DS4_E_IO, "cannot create a temporary file next to %s: %s", path, strerror(e));
    }
    o->path = path;
    ds4_tmp_track(o->tmp);
    return 0;
}

int ds4_out_commit(ds4_out *o, ds4_err *err) {
    if (!o->f) return ds4_err_set(err, DS4_E_IO, "error writing %s: not open", o->path ? o->path : "output");
    errno = 0;
    const bool flushed = fflush(o->f) == 0 && !ferror(o->f);
    int e = o->werr ? o->werr : flushed ? 0 : errno ? errno : EIO;
    if (!e && fsync(o->fd) != 0) e = errno;
    if (fclose(o->f) != 0 && !e) e = errno ? errno : EIO;
    o->f = NULL;
    if (!e && rename(o->tmp, o->path) != 0) e = errno;
    if (e) unlink(o->tmp);
    ds4_tmp_untrack();
    free(o->tmp);
    o->tmp = NULL;
    if (!e) return 0;
    return ds4_err_set(err, DS4_E_IO, "%s %s: %s (nothing written)",
                       e == ENOSPC ? "disk full writing" : e == EFBIG ? "file too large writing" : "error writing",
                       o->path, strerror(e));
}

void ds4_out_abort(ds4_out *o) {
    if (o->f) fclose(o->f);
    o->f = NULL;
    if (o->tmp) {
        unlink(o->tmp);
        ds4_tmp_untrack();
        free(o->tmp);
        o->tmp = NULL;
    }
}

/* ---- temporary output files under fatal signals ---- */

static char tmp_path[4096];
static volatile sig_atomic_t tmp_set;
static const char *tmp_prog = "ds4";

void ds4_tmp_track(const char *path) {
    tmp_set = 0;
    if (!path || strlen(path) >= sizeof tmp_path) return;
    strcpy(tmp_path, path);
    tmp_set = 1;
}

void ds4_tmp_untrack(void) { tmp_set = 0; }

static void put(const char *s) {
    ssize_t n = write(2, s, strlen(s));
    (void)n;
}

static void on_fatal(int sig) {
    put(tmp_prog);
    put(sig == SIGBUS ? ": an input file shrank while being read (SIGBUS)"
                      : sig == SIGPIPE ? ": SIGPIPE" : ": stopped by a signal");
    if (tmp_set && unlink(tmp_path) == 0) put("; the unfinished output was removed");
    put("\n");
    signal(sig, SIG_DFL);
    raise(sig);
}

static void on_fatal_for(int sig) {
    struct sigaction sa, old;
    /* a signal the parent set to be ignored (SIGQUIT for a job started with
     * & by a script) stays ignored */
    if (sig != SIGBUS && sigaction(sig, NULL, &old) == 0 && old.sa_handler == SIG_IGN) return;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fatal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    sigaction(sig, &sa, NULL);
}

void ds4_tmp_fatal_signals(const char *prog) {
    tmp_prog = prog;
    static const int sigs[] = {SIGBUS, SIGPIPE, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGXCPU};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) on_fatal_for(sigs[i]);
}

void ds4_sigbus_message(const char *prog) {
    tmp_prog = prog;
    on_fatal_for(SIGBUS);
}
