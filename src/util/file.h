/* file.h - opening input files that must be regular files.
 *
 * open(2) of a FIFO blocks until a writer appears, and a read from a FIFO,
 * socket or terminal may block forever; a directory opens fine but reads
 * fail. Model files, safetensors, JSON inputs and cache entries are only
 * meaningful as regular files, so they are opened with ds4_open_regular,
 * which never blocks on them. (Inputs that may legitimately be pipes, such
 * as --prompt-file, are read with plain stdio.)
 */
#ifndef DS4_UTIL_FILE_H
#define DS4_UTIL_FILE_H

#include <stdbool.h>
#include <stdio.h>
#include <sys/stat.h>

#include "util/err.h"

/* Opens path with flags (O_RDONLY or O_RDWR; O_CLOEXEC is added) without
 * blocking: opened O_NONBLOCK, checked with fstat, refused unless it is a
 * regular file, then switched back to blocking I/O. st (may be NULL)
 * receives the fstat result. Returns the descriptor (>= 0; the caller
 * closes it) or DS4_E_IO with err set to "PATH: cannot open: REASON" or
 * "PATH: not a regular file (KIND)". errno then tells them apart: as
 * open(2) left it (ENOENT, EACCES, ...), or EINVAL for a file that is not
 * regular. Thread-safe. */
int ds4_open_regular(const char *path, int flags, struct stat *st, ds4_err *err);

/* An output path that a temporary file + rename(2) may replace: not empty,
 * not an existing directory, device, FIFO or socket (a rename would put a
 * regular file in its place: run as root, `-o /dev/null` replaced the
 * device), and its directory exists. 0, or DS4_E_IO / DS4_E_ARG with err set
 * to "PATH: REASON". Meant to be called before any long work. */
int ds4_output_path_ok(const char *path, ds4_err *err);

/* Removes path only when it is a regular file (a failed output's cleanup:
 * never a device, FIFO or directory given as the output); true when removed. */
bool ds4_unlink_regular(const char *path);

/* a and b are the same existing file (same device and inode). */
int ds4_same_file(const char *a, const char *b);

/* A temporary output file being written (one at a time per process), for
 * ds4_tmp_fatal_signals: track it when created, untrack it once renamed or
 * removed. */
void ds4_tmp_track(const char *path);
void ds4_tmp_untrack(void);
/* Installs handlers for signals that end the process and that the program
 * does not handle itself (SIGBUS: an input file truncated under its mmap;
 * SIGPIPE, SIGUSR1, SIGUSR2, SIGALRM, SIGXCPU): the tracked temporary file
 * is removed and a line naming the signal is written to stderr, then the
 * signal takes its default action. */
void ds4_tmp_fatal_signals(const char *prog);
/* SIGBUS alone (a mapped input file, such as the model, truncated while the
 * program reads it): "PROG: an input file shrank while being read (SIGBUS)"
 * on stderr, then the default action. For programs that handle SIGPIPE and
 * the others themselves. */
void ds4_sigbus_message(const char *prog);

/* An output replaced whole or not at all. ds4_out_open creates a fresh
 * temporary file beside path ("PATH.tmp.XXXXXX", mkstemp: never an existing
 * file or a planted link), with the mode a new file would get (0666 less the
 * umask); the caller writes o->f; ds4_out_commit flushes, fsyncs, closes and
 * renames it over path. Until the rename path keeps its old contents, and a
 * failed commit or ds4_out_abort removes the temporary file. SIGXFSZ is
 * ignored from the open on, so a file-size limit fails a write (EFBIG)
 * instead of killing the process with the file half written; the temporary
 * file is tracked for ds4_tmp_fatal_signals. One at a time per process;
 * o must stay where it is until the commit or abort (o->f writes through it). */
typedef struct {
    FILE *f;
    char *tmp;
    const char *path;
    int fd;
    int werr; /* the first failed write's errno (stdio's own error flag forgets it) */
} ds4_out;
/* mode: "w" or "wb". 0, or DS4_E_IO / DS4_E_NOMEM with err set to
 * "cannot create a temporary file next to PATH: REASON". */
int ds4_out_open(ds4_out *o, const char *path, const char *mode, ds4_err *err);
/* 0, or DS4_E_IO with err set to "disk full writing PATH: ..." (ENOSPC),
 * "file too large writing PATH: ..." (EFBIG) or "error writing PATH: ...":
 * the first failing call's errno (a write error seen by ferror counts). o is
 * released either way. */
int ds4_out_commit(ds4_out *o, ds4_err *err);
/* Closes and removes the temporary file; path is untouched. Safe on a zeroed
 * or already released o. */
void ds4_out_abort(ds4_out *o);

/* a and b name the same file, existing or not: the same existing file, or
 * the same name in the same directory ("x.gguf" and "./x.gguf"). */
int ds4_same_path(const char *a, const char *b);

#endif
