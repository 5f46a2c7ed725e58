/* runner.c - runs the DS4_TEST cases linked into ds4-test (see test.h).
 *
 * Usage: ds4-test [--data-dir DIR] [--list] [FILTER...]
 * Each test runs in a forked child with a 300 s alarm, so a crash or a hang
 * fails that one test. A FILTER is a substring of the test name. The last
 * line printed is "N passed, N failed, N skipped".
 */
#include "test.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct {
    const char *name;
    const char *file;
    ds4_test_fn fn;
} test_entry;

static test_entry g_tests[4096];
static int g_n_tests;
static const char *g_data_dir = "tests/data";
static char g_tmpdir[512];

void ds4_test_register(const char *name, ds4_test_fn fn, const char *file) {
    if (g_n_tests >= (int)(sizeof g_tests / sizeof g_tests[0])) {
        fprintf(stderr, "too many tests\n");
        abort();
    }
    g_tests[g_n_tests++] = (test_entry){name, file, fn};
}

const char *ds4_test_path(const char *rel) {
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", g_data_dir, rel);
    return buf;
}

const char *ds4_test_tmpdir(void) { return g_tmpdir; }

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb; (void)flag; (void)ftw;
    return remove(p);
}

static int cmp_entry(const void *a, const void *b) {
    const test_entry *x = a, *y = b;
    int c = strcmp(x->file, y->file);
    return c ? c : strcmp(x->name, y->name);
}

int main(int argc, char **argv) {
    int list = 0;
    const char *filters[64];
    int n_filters = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--data-dir") && i + 1 < argc) g_data_dir = argv[++i];
        else if (!strcmp(argv[i], "--list")) list = 1;
        else if (n_filters < 64) filters[n_filters++] = argv[i];
    }
    qsort(g_tests, g_n_tests, sizeof g_tests[0], cmp_entry);
    int passed = 0, failed = 0, skipped = 0;
    /* Shared page the child writes its result into. */
    ds4_test_ctx *shared = mmap(NULL, sizeof *shared, PROT_READ | PROT_WRITE,
                                MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED) { perror("mmap"); return 1; }
    for (int i = 0; i < g_n_tests; i++) {
        test_entry *te = &g_tests[i];
        if (n_filters) {
            int hit = 0;
            for (int f = 0; f < n_filters; f++) hit |= strstr(te->name, filters[f]) != NULL;
            if (!hit) continue;
        }
        if (list) { printf("%s\n", te->name); continue; }
        memset(shared, 0, sizeof *shared);
        snprintf(g_tmpdir, sizeof g_tmpdir, "/tmp/ds4-test-%d-XXXXXX", (int)getpid());
        if (!mkdtemp(g_tmpdir)) { perror("mkdtemp"); return 1; }
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            alarm(300);
            te->fn(shared);
            fflush(NULL);
            _exit(0);
        }
        int st = 0;
        waitpid(pid, &st, 0);
        nftw(g_tmpdir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            failed++;
            if (WIFSIGNALED(st))
                printf("FAIL %s: killed by signal %d (%s)\n", te->name, WTERMSIG(st),
                       strsignal(WTERMSIG(st)));
            else
                printf("FAIL %s: exit status %d\n", te->name, WEXITSTATUS(st));
        } else if (shared->failed) {
            failed++;
            printf("FAIL %s: %s\n", te->name, shared->msg);
        } else if (shared->skipped) {
            skipped++;
            printf("skip %s: %s\n", te->name, shared->msg);
        } else {
            passed++;
            printf("ok   %s\n", te->name);
        }
        fflush(stdout);
    }
    if (!list) printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
