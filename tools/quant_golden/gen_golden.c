/* gen_golden.c - writes the golden quantizer outputs in tests/data/quant_golden
 * using ggml's own reference quantizers (ggml_quantize_chunk), so that
 * tests/unit/test_quant.c can check ours byte for byte against them.
 *
 * Not part of the build (it needs a ggml library). How the committed files
 * were made: ggml from the PyPI sdist ggml-python==0.0.45 (vendor/ggml),
 * configured with CFLAGS=-ffp-contract=off, -DGGML_NATIVE=OFF, target
 * ggml-base; then
 *   cc -O2 -std=c11 -ffp-contract=off -I$GGML/include gen_golden.c \
 *      -L$BUILD/src -lggml-base -lm -o gen_golden && ./gen_golden OUTDIR
 * Inputs are generated here and written next to the outputs (f32, LE), so
 * the test never depends on libm agreeing across machines.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "ggml.h"

enum { R = 4, N = 1024 };

static unsigned long long st = 0x243F6A8885A308D3ull;
static unsigned long long rnd(void) {
    st ^= st << 13;
    st ^= st >> 7;
    st ^= st << 17;
    return st;
}
static float uni(void) { return (float)(((rnd() >> 40) + 0.5) / 16777216.0); }
static float gauss(void) { return sqrtf(-2 * logf(uni())) * cosf(6.2831853f * uni()); }
static float heavy(void) {
    float u = uni() - 0.5f, v = (u < 0 ? 1 : -1) * logf(1 - 2 * fabsf(u));
    return uni() < 0.01f ? v * (8 + 12 * uni()) : v;
}

static void put(const char *dir, const char *name, const void *p, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n || fclose(f)) {
        perror(path);
        exit(1);
    }
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : ".";
    static float x[R * N], imp[N];
    static unsigned char out[R * N * 2];
    static const struct { enum ggml_type t; const char *name; } types[] = {
        {GGML_TYPE_Q8_0, "q8_0"}, {GGML_TYPE_Q4_K, "q4_K"}, {GGML_TYPE_Q2_K, "q2_K"}, {GGML_TYPE_IQ2_XXS, "iq2_xxs"}};
    for (int d = 0; d < 2; d++) {
        const char *dist = d ? "heavy" : "gauss";
        char name[128];
        for (int i = 0; i < R * N; i++) x[i] = d ? heavy() : gauss();
        for (int c = 0; c < N; c++) {
            float u = uni();
            imp[c] = expf(6 * u * u) - 0.9f;
        }
        snprintf(name, sizeof name, "%s_input.f32", dist);
        put(dir, name, x, sizeof x);
        snprintf(name, sizeof name, "%s_imatrix.f32", dist);
        put(dir, name, imp, sizeof imp);
        for (int t = 0; t < 4; t++) {
            ggml_quantize_init(types[t].t);
            for (int w = 0; w < 2; w++) {
                if (types[t].t == GGML_TYPE_IQ2_XXS && !w) continue; /* needs importance */
                size_t n = ggml_quantize_chunk(types[t].t, x, out, 0, R, N, w ? imp : NULL);
                snprintf(name, sizeof name, "%s_%s_%s.bin", dist, types[t].name, w ? "imatrix" : "plain");
                put(dir, name, out, n);
            }
        }
    }
    return 0;
}
