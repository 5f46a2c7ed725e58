/* quantize_bench.c - single-thread throughput of the weight quantizers that
 * ds4-convert's q2 and q4 recipes use (IQ2_XXS, Q2_K, Q4_K), with and
 * without an importance matrix, on Gaussian rows of 4096 values: MB/s of
 * f32 input per second of thread CPU time (so other load on the machine
 * counts less), the median of several repeats. Also prints an FNV-1a hash of
 * each output, and with "hash" a hash over many input distributions, so two
 * builds can be checked byte-identical (run both, compare the lines).
 *
 * Usage: build/dev/quantize_bench [ROWS (64)] [REPEATS (5)] [TYPE]
 *        build/dev/quantize_bench hash [ROWS (256)]
 *
 * Seen on the 2-core AMD EPYC dev VM (another job sharing it, so runs swing
 * by up to 2x; the typical medians of 64 rows x 5 repeats), MB/s per thread:
 *                     IQ2_XXS   Q2_K plain  Q2_K imatrix  Q4_K plain  Q4_K imatrix
 *   before (80e9005)  8.0-8.6   57-60       23.5-24.3     48-52       27.6-27.9
 *   after  (qspeed)   24-28     55-61       29-32         45-50       29.5-32.7
 * (IQ2_XXS 26-28 in the quietest A/B runs; Q4_K plain is ~4% slower in
 * paired runs: the skip test in make_qkx rarely fires with 21 steps.)
 * Where IQ2_XXS's time went before (gprof of a -fno-inline build): the
 * neighbour search of the grid projection about half (56 projections per
 * 32 values, ~27 candidates each), make_qp a fifth. Now, with the AVX2
 * neighbour kernel: the kernel ~40%, the rest of the projection ~20%,
 * the level rounding ~16%, make_qp ~13%. Q2_K: make_qkx ~90%.
 * `hash` output of the two builds (and ds4-convert's q2 GGUF of the 8-expert
 * checkpoint) was identical.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "quant.h"

enum { N_COLS = 4096 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;
static double urand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return ((rng >> 11) + 0.5) / 9007199254740992.0;
}
static float gauss(void) { return (float)(sqrt(-2 * log(urand())) * cos(6.283185307179586 * urand())); }

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Input distribution `kind` (0..9) for the hash mode: Gaussian at several
 * scales, zeros, constants, sparse, huge/tiny, heavy tails, mixed signs. */
static void fill(float *x, int64_t n, int kind) {
    for (int64_t i = 0; i < n; i++) {
        float g = gauss();
        switch (kind) {
        case 0: x[i] = 0.02f * g; break;
        case 1: x[i] = 0.0f; break;
        case 2: x[i] = (i / 256) % 2 ? 0.5f : -0.25f; break;
        case 3: x[i] = urand() < 0.05 ? g : 0.0f; break;
        case 4: x[i] = 1e30f * g; break;
        case 5: x[i] = 1e-30f * g; break;
        case 6: x[i] = g * g * g * g * g; break;
        case 7: x[i] = fabsf(g); break;
        case 8: x[i] = (float)((int)(4 * g)); break;
        default: x[i] = (i % 32) == 7 ? 100 * g : g; break;
        }
    }
}

static int hash_mode(int64_t n_rows) {
    static const int types[] = {DS4_TYPE_IQ2_XXS, DS4_TYPE_Q2_K, DS4_TYPE_Q4_K};
    float *x = malloc((size_t)n_rows * N_COLS * 4), *w = malloc(N_COLS * 4);
    uint8_t *o = malloc((size_t)n_rows * N_COLS * 4);
    for (int kind = 0; kind < 10; kind++)
        for (int wk = 0; wk < 3; wk++)
            for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
                fill(x, n_rows * N_COLS, kind);
                for (int i = 0; i < N_COLS; i++)
                    w[i] = wk == 1 ? (float)urand() : wk == 2 ? (i % 5 ? fabsf(1e-3f * gauss() * gauss()) : 0.0f) : 0;
                ds4_err err = {0};
                if (ds4_quantize_rows(types[t], x, o, n_rows, N_COLS, wk ? w : NULL, &err)) {
                    printf("kind %d w %d %-8s error %s\n", kind, wk, ds4_type_name(types[t]), err.msg);
                    continue;
                }
                size_t bytes = (size_t)n_rows * ds4_type_row_bytes(types[t], N_COLS);
                printf("kind %d w %d %-8s %016llx\n", kind, wk, ds4_type_name(types[t]),
                       (unsigned long long)fnv(14695981039346656037ull, o, bytes));
            }
    free(x), free(w), free(o);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "hash")) return hash_mode(argc > 2 ? atoll(argv[2]) : 256);
    int64_t n_rows = argc > 1 ? atoll(argv[1]) : 64;
    int reps = argc > 2 ? atoi(argv[2]) : 5;
    const char *only = argc > 3 ? argv[3] : NULL;
    float *x = malloc((size_t)n_rows * N_COLS * 4), *w = malloc(N_COLS * 4);
    uint8_t *o = malloc((size_t)n_rows * N_COLS * 4);
    for (int64_t i = 0; i < n_rows * N_COLS; i++) x[i] = 0.02f * gauss();
    for (int i = 0; i < N_COLS; i++) w[i] = (float)urand();
    static const int types[] = {DS4_TYPE_IQ2_XXS, DS4_TYPE_Q2_K, DS4_TYPE_Q4_K};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++)
        for (int wk = 0; wk < 2; wk++) {
            if (only && strcmp(only, ds4_type_name(types[t]))) continue;
            double ts[64];
            int nr = reps < 64 ? reps : 64;
            for (int r = 0; r < nr; r++) {
                ds4_err err = {0};
                double t0 = now_s();
                if (ds4_quantize_rows(types[t], x, o, n_rows, N_COLS, wk ? w : NULL, &err)) {
                    fprintf(stderr, "error: %s\n", err.msg);
                    return 1;
                }
                ts[r] = now_s() - t0;
            }
            qsort(ts, (size_t)nr, sizeof ts[0], cmp_d);
            size_t bytes = (size_t)n_rows * ds4_type_row_bytes(types[t], N_COLS);
            printf("%-8s %-9s %8.3f MB/s  (median %.3f s, min %.3f s, %d reps)  out %016llx\n",
                   ds4_type_name(types[t]), wk ? "imatrix" : "no-imat",
                   n_rows * N_COLS * 4 / ts[nr / 2] / 1e6, ts[nr / 2], ts[0], nr,
                   (unsigned long long)fnv(14695981039346656037ull, o, bytes));
        }
    free(x), free(w), free(o);
    return 0;
}
