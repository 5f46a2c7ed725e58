/* test.h - the C unit-test harness used by every file in tests/unit/.
 *
 * A test is declared with DS4_TEST(name) { ... } and registers itself at
 * start-up (a constructor), so adding a test file needs no list to edit.
 * tests/runner.c runs each test in a forked child (a crash fails that test
 * only), prints "ok   name" or "FAIL name" with the first failed check, and
 * ends with "N passed, N failed".
 *
 * Checks: CHECK(cond), CHECK_EQ_INT(a,b), CHECK_NEAR(a,b,tol), CHECK_STR(a,b)
 * record the failure and return from the test. TEST_SKIP("why") marks a test
 * skipped, saying why (only for tests that need something absent, e.g. a model).
 */
#ifndef DS4_TESTS_TEST_H
#define DS4_TESTS_TEST_H

#include <math.h>
#include <stdio.h>
#include <string.h>

typedef struct ds4_test_ctx {
    int failed;
    int skipped;
    char msg[1024];
} ds4_test_ctx;

typedef void (*ds4_test_fn)(ds4_test_ctx *t);
void ds4_test_register(const char *name, ds4_test_fn fn, const char *file);

/* Path of a file under the repo's tests/data (or shared data), resolved
 * against the runner's --data-dir; returns a static buffer. */
const char *ds4_test_path(const char *rel);
/* A fresh temporary directory for this test (removed by the runner). */
const char *ds4_test_tmpdir(void);

#define DS4_TEST(name)                                                    \
    static void name(ds4_test_ctx *t);                                    \
    __attribute__((constructor)) static void ds4_reg_##name(void) {       \
        ds4_test_register(#name, name, __FILE__);                         \
    }                                                                     \
    static void name(ds4_test_ctx *t)

#define TEST_FAIL(...)                                                    \
    do {                                                                  \
        int n_ = snprintf(t->msg, sizeof t->msg, "%s:%d: ", __FILE__, __LINE__); \
        if (n_ > 0 && (size_t)n_ < sizeof t->msg)                         \
            snprintf(t->msg + n_, sizeof t->msg - n_, __VA_ARGS__);       \
        t->failed = 1;                                                    \
        return;                                                           \
    } while (0)

#define TEST_SKIP(...)                                                    \
    do {                                                                  \
        snprintf(t->msg, sizeof t->msg, __VA_ARGS__);                     \
        t->skipped = 1;                                                   \
        return;                                                           \
    } while (0)

#define CHECK(cond)                                                       \
    do { if (!(cond)) TEST_FAIL("CHECK(%s)", #cond); } while (0)
#define CHECK_MSG(cond, ...)                                              \
    do { if (!(cond)) TEST_FAIL(__VA_ARGS__); } while (0)
#define CHECK_EQ_INT(a, b)                                                \
    do { long long a_ = (long long)(a), b_ = (long long)(b);              \
         if (a_ != b_) TEST_FAIL("%s == %lld, expected %s == %lld", #a, a_, #b, b_); } while (0)
#define CHECK_NEAR(a, b, tol)                                             \
    do { double a_ = (double)(a), b_ = (double)(b);                       \
         if (!(fabs(a_ - b_) <= (tol)))                                   \
             TEST_FAIL("%s = %.9g, %s = %.9g, |diff| > %g", #a, a_, #b, b_, (double)(tol)); } while (0)
#define CHECK_STR(a, b)                                                   \
    do { const char *a_ = (a), *b_ = (b);                                 \
         if (!a_ || !b_ || strcmp(a_, b_) != 0)                           \
             TEST_FAIL("%s = \"%s\", expected \"%s\"", #a, a_ ? a_ : "(null)", b_ ? b_ : "(null)"); } while (0)

#endif
