/* file.c - ds4_open_regular (see file.h). Thread-safe: no shared state. */
#include "util/file.h"

#include <errno.h>
#include <signal.h>
#include <fcntl.h>
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
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fatal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    sigaction(sig, &sa, NULL);
}

void ds4_tmp_fatal_signals(const char *prog) {
    tmp_prog = prog;
    static const int sigs[] = {SIGBUS, SIGPIPE, SIGUSR1, SIGUSR2, SIGALRM, SIGXCPU};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) on_fatal_for(sigs[i]);
}

void ds4_sigbus_message(const char *prog) {
    tmp_prog = prog;
    on_fatal_for(SIGBUS);
}
