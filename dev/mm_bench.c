/* mm_bench.c - the CPU backend's matrix-product engine (cpu_matmuls) alone,
 * on one weight matrix of a chosen type and shape, next to the backend's
 * streaming-read probe: decode (1 token) as GB/s of weights and as a
 * fraction of the probe, prefill (many tokens) as GMAC/s.
 *
 * usage: build/dev/mm_bench TYPE ROWS COLS TOKENS [THREADS] [SECONDS]
 *   TYPE  q8_0 | q2_K | q4_K | iq2_xxs | f16 | f32
 *   e.g.  mm_bench q8_0 32768 1024 1      (Flash's q_b in decode)
 *         mm_bench iq2_xxs 2048 4096 64   (an expert's gate for 64 tokens)
 * Weights are random bytes with sane block scales (values do not matter for
 * speed); the matrix is made larger than the last-level cache by repeating
 * it (set ROWS accordingly for decode).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/cpu.h"
#include "quant.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return rng;
}

static int type_of(const char *s) {
    static const int ts[] = {DS4_TYPE_Q8_0, DS4_TYPE_Q2_K, DS4_TYPE_Q4_K, DS4_TYPE_IQ2_XXS, DS4_TYPE_F16, DS4_TYPE_F32};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
        if (!strcmp(s, ds4_type_name(ts[i]))) return ts[i];
    return -1;
}

/* a random f16 scale around 2^-7 */
static uint16_t f16_scale(void) { return (uint16_t)((8u << 10) | (next() & 0x3ff)); }

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: mm_bench TYPE ROWS COLS TOKENS [THREADS] [SECONDS]\n");
        return 2;
    }
    int type = type_of(argv[1]), n_tok = atoi(argv[4]), threads = argc > 5 ? atoi(argv[5]) : 0;
    int64_t rows = atoll(argv[2]), cols = atoll(argv[3]);
    double min_s = argc > 6 ? atof(argv[6]) : 2.0;
    if (type < 0 || rows <= 0 || !ds4_type_row_ok(type, cols) || n_tok <= 0) {
        fprintf(stderr, "mm_bench: bad type or shape\n");
        return 2;
    }
    size_t rb = ds4_type_row_bytes(type, cols), bytes = (size_t)rows * rb;
    uint8_t *w = malloc(bytes);
    float *x = malloc((size_t)n_tok * cols * sizeof(float)), *y = malloc((size_t)n_tok * rows * sizeof(float));
    if (!w || !x || !y) return 1;
    for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t)next();
    const ds4_type_traits *tt = ds4_type_get(type);
    for (size_t b = 0; b < bytes / (size_t)tt->block_bytes && tt->block_elems > 1; b++) {
        uint8_t *blk = w + b * tt->block_bytes;
        uint16_t s1 = f16_scale(), s2 = f16_scale();
        if (type == DS4_TYPE_Q2_K) memcpy(blk + 80, &s1, 2), memcpy(blk + 82, &s2, 2);
        else memcpy(blk, &s1, 2), memcpy(blk + 2, &s2, type == DS4_TYPE_Q4_K ? 2 : 0);
    }
    if (type == DS4_TYPE_F16)
        for (size_t i = 0; i < bytes; i += 2) {
            uint16_t h = (uint16_t)(0x2000 | (next() & 0x83ff));
            memcpy(w + i, &h, 2);
        }
    if (type == DS4_TYPE_F32)
        for (size_t i = 0; i < bytes; i += 4) {
            float f = (float)(next() % 2001) / 1000.0f - 1.0f;
            memcpy(w + i, &f, 4);
        }
    for (int64_t i = 0; i < (int64_t)n_tok * cols; i++) x[i] = (float)((int64_t)(next() % 2001) - 1000) / 1000.0f;

    ds4_backend be;
    ds4_err err = {0};
    if (ds4_cpu_backend_new(threads, &be, &err)) {
        fprintf(stderr, "mm_bench: %s\n", err.msg);
        return 1;
    }
    cpu_ctx *c = be.ctx;
    double probe = 0;
    be.ops->bandwidth(be.ctx, &probe, &err);
    ds4_weight wt = {.name = "w", .type = type, .n_in = cols, .n_out = rows, .n_mat = 1, .row_bytes = rb,
                     .mat_bytes = bytes, .data = w};
    cpu_mm m = {.w = &wt, .n_rows = rows, .x = x, .ldx = cols, .n = n_tok, .y = y, .ldy = rows};
    cpu_matmuls(c, &m, 1, true); /* warm-up: pages, scratch */
    int reps = 0;
    double t0 = now_s(), t;
    do {
        cpu_matmuls(c, &m, 1, true);
        reps++;
        t = now_s() - t0;
    } while (t < min_s);
    double per = t / reps;
    printf("%s %lld x %lld, %d tokens, %d threads: %.3f ms per product, %.2f GB/s of weights (probe %.2f GB/s: %.0f%%), "
           "%.2f GMAC/s\n",
           ds4_type_name(type), (long long)rows, (long long)cols, n_tok, c->n_threads, per * 1e3, bytes / per / 1e9,
           probe, probe > 0 ? 100.0 * bytes / per / 1e9 / probe : 0.0, (double)rows * cols * n_tok / per / 1e9);
    be.ops->destroy(be.ctx);
    free(w), free(x), free(y);
    return 0;
}
