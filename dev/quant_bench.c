/* quant_bench.c - single-thread throughput of the quant kernels: GB/s of
 * weight bytes for dequantization, the f32 dot and the int8-activation dot,
 * per type, scalar vs AVX2, on matrices with Flash-like rows (4096 and 2048
 * columns); then the tiles of the best path: "tile1" is GB/s of a decode
 * product (one token, 64-row tiles over the whole matrix), "tileN" the
 * GMAC/s of a prefill product (64 tokens against 32 cached rows), the int8
 * tile for quantized types, the float one for plain types.
 *
 * Usage: build/dev/quant_bench [MB] [SECONDS] [TYPE]
 *   MB       weight bytes per matrix (default 32: larger than the caches,
 *            so the figures include streaming from memory)
 *   SECONDS  minimum thread CPU time per measurement (default 0.2); CPU
 *            time, not wall time, so other load on the machine does not count
 *   TYPE     only this type (e.g. iq2_xxs), to time one kernel quickly
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "quant.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); /* CPU time: the machine is shared */
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;
static float frand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) / 16777216.0) * 2.0f - 1.0f;
}

enum { OP_DEQUANT, OP_DOT_F32, OP_DOT_Q, OP_TILE1, OP_TILEN };
enum { TILE_TOK = 64, TILE_ROWS = 32 };
static volatile float sink;

/* Runs op over all rows until min_s has passed; returns GB/s of weights. */
static double measure(const ds4_quant_kernels *k, int op, const uint8_t *w, size_t row_bytes, int64_t n_rows,
                      int64_t n_cols, const float *x, const void *xq, float *y, double min_s) {
    double t0 = now_s(), t;
    long reps = 0;
    do {
        float acc = 0.0f;
        if (op == OP_TILE1) {
            const void *xp[1] = {xq};
            const float *xf[1] = {x};
            for (int64_t r = 0; r < n_rows; r += 64) {
                int nr = (int)(n_rows - r < 64 ? n_rows - r : 64);
                if (xq) k->dot_q_tile(w + (size_t)r * row_bytes, row_bytes, nr, xp, 1, n_cols, y, 1);
                else k->dot_f32_tile(w + (size_t)r * row_bytes, row_bytes, nr, xf, 1, n_cols, y, 1);
                acc += y[0];
            }
        } else if (op == OP_TILEN) {
            /* the same 32 rows (cached) against 64 tokens that share x */
            const void *xp[TILE_TOK];
            const float *xf[TILE_TOK];
            for (int t = 0; t < TILE_TOK; t++) xp[t] = xq, xf[t] = x;
            for (int rep = 0; rep < 16; rep++) {
                if (xq) k->dot_q_tile(w, row_bytes, TILE_ROWS, xp, TILE_TOK, n_cols, y, TILE_ROWS);
                else k->dot_f32_tile(w, row_bytes, TILE_ROWS, xf, TILE_TOK, n_cols, y, TILE_ROWS);
                acc += y[0];
            }
        }
        for (int64_t r = 0; op < OP_TILE1 && r < n_rows; r++) {
            const uint8_t *row = w + (size_t)r * row_bytes;
            if (op == OP_DEQUANT) {
                k->dequant(row, y, n_cols);
                acc += y[r % n_cols];
            } else if (op == OP_DOT_F32) {
                acc += k->dot_f32(row, x, n_cols);
            } else {
                acc += k->dot_q(row, xq, n_cols);
            }
        }
        sink = acc;
        reps++;
        t = now_s() - t0;
    } while (t < min_s);
    if (op == OP_TILEN) return (double)reps * 16 * TILE_ROWS * TILE_TOK * n_cols / t / 1e9; /* GMAC/s */
    return (double)reps * n_rows * row_bytes / t / 1e9;
}

int main(int argc, char **argv) {
    double mb = argc > 1 ? atof(argv[1]) : 32.0, min_s = argc > 2 ? atof(argv[2]) : 0.2;
    static const int types[] = {DS4_TYPE_F32, DS4_TYPE_F16, DS4_TYPE_BF16, DS4_TYPE_Q8_0,
                                DS4_TYPE_Q4_K, DS4_TYPE_Q2_K, DS4_TYPE_IQ2_XXS};
    static const int64_t widths[] = {4096, 2048};
    int best = ds4_quant_simd_best();
    printf("single thread, %.0f MB of weights per matrix; GB/s of weight bytes (AVX2 %s)\n", mb,
           best >= DS4_SIMD_AVX2 ? "available" : "NOT available");
    printf("%-8s %5s | %9s %9s | %9s %9s | %9s %9s | %9s %9s\n", "type", "cols", "dq scal", "dq avx2", "f32 scal",
           "f32 avx2", "q8 scal", "q8 avx2", "tile1", "tileN MAC");
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        int type = types[ti];
        if (argc > 3 && strcmp(argv[3], ds4_type_name(type))) continue;
        for (size_t wi = 0; wi < 2; wi++) {
            int64_t n_cols = widths[wi];
            size_t row_bytes = ds4_type_row_bytes(type, n_cols);
            int64_t n_rows = (int64_t)(mb * 1e6 / row_bytes);
            uint8_t *w = malloc((size_t)n_rows * row_bytes);
            float *src = malloc(n_cols * sizeof(float)), *x = malloc(n_cols * sizeof(float)), *y = malloc(n_cols * sizeof(float));
            float *imp = malloc(n_cols * sizeof(float));
            void *xq = malloc(ds4_type_row_bytes(DS4_TYPE_Q8_K, n_cols) + ds4_type_row_bytes(DS4_TYPE_Q8_0, n_cols));
            for (int64_t i = 0; i < n_cols; i++) x[i] = frand(), imp[i] = 1.0f;
            /* quantize a few distinct rows and tile them: quantizing 32 MB
             * with the reference quantizers would dominate the run time */
            for (int64_t r = 0; r < n_rows; r++) {
                if (r < 16) {
                    for (int64_t i = 0; i < n_cols; i++) src[i] = frand();
                    ds4_quantize_row(type, src, w + (size_t)r * row_bytes, n_cols, imp);
                } else {
                    memcpy(w + (size_t)r * row_bytes, w + (size_t)(r % 16) * row_bytes, row_bytes);
                }
            }
            double gbs[3][2] = {{0}}, tile1 = 0, tilen = 0;
            for (int s = 0; s < 2; s++) {
                const ds4_quant_kernels *k = ds4_quant_kernels_get(type, s ? DS4_SIMD_AVX2 : DS4_SIMD_SCALAR);
                if (!k) continue;
                gbs[0][s] = measure(k, OP_DEQUANT, w, row_bytes, n_rows, n_cols, x, NULL, y, min_s);
                gbs[1][s] = measure(k, OP_DOT_F32, w, row_bytes, n_rows, n_cols, x, NULL, y, min_s);
                if (k->dot_q) {
                    k->quantize_act(x, xq, n_cols);
                    gbs[2][s] = measure(k, OP_DOT_Q, w, row_bytes, n_rows, n_cols, x, xq, y, min_s);
                }
            }
            const ds4_quant_kernels *kb = ds4_quant_kernels_get(type, DS4_SIMD_AUTO);
            const void *xqt = kb->dot_q_tile ? xq : NULL;
            if (kb->dot_q_tile || kb->dot_f32_tile) {
                float *yt = malloc(TILE_TOK * TILE_ROWS * sizeof(float));
                if (xqt) kb->quantize_act(x, xq, n_cols);
                tile1 = measure(kb, OP_TILE1, w, row_bytes, n_rows, n_cols, x, xqt, yt, min_s);
                tilen = measure(kb, OP_TILEN, w, row_bytes, n_rows, n_cols, x, xqt, yt, min_s);
                free(yt);
            }
            printf("%-8s %5lld |", ds4_type_name(type), (long long)n_cols);
            for (int op = 0; op < 3; op++)
                for (int s = 0; s < 2; s++) {
                    if (gbs[op][s] > 0) printf(" %9.2f", gbs[op][s]);
                    else printf(" %9s", "-");
                    if (s == 1) printf(" |");
                }
            if (tile1 > 0) printf(" %9.2f %9.2f", tile1, tilen);
            else printf(" %9s %9s", "-", "-");
            printf("\n");
            fflush(stdout);
            free(w), free(src), free(x), free(y), free(imp), free(xq);
        }
    }
    return 0;
}
