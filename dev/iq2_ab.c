/* iq2_ab.c - A/B timing of the IQ2_XXS decode micro-kernels (one token,
 * 8 rows per micro-tile, 4096 columns) of quant_avx2.c, interleaved in one
 * process: the best thread CPU time of many rounds, so a noisy shared
 * machine still ranks them; each is checked bit-identical to the AVX2 walk.
 *
 * Usage: build/dev/iq2_ab [KiB of weights (65536)] [rounds (20)]
 *
 * Kernels: "avx2" iq2_xxs_micro (R = 8, T = 1; table lookups per group),
 * "gather" iq2_xxs_micro512 (VNNI level: 8 grid entries per gather, pdep
 * signs), "vbmi" iq2_xxs_micro_vbmi (byte permutes on register tables).
 *
 * Earlier findings (2-core AMD EPYC Zen 3 VM, the AVX2 walk's variants, since
 * removed from this file): the magnitude and the sign lookups cost about a
 * third of the time each; AVX2 gathers lose on Zen 3 (gather64 2.0-2.2 vs
 * 2.6-3.1 GB/s in L2); a 1 MiB 16-bit pair table, nibble codes and sign
 * expansions by shifts or pdep stayed within the noise or lost.
 * Results on the Sapphire Rapids VM: see dev/cpu_notes.md.
 */
#include "../src/quant_avx2.c"

#if defined(__x86_64__) && defined(__GNUC__)

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static TGT void avx2_walk(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                      const uint8_t *pf, float *out) {
    iq2_xxs_micro(w, x, ts, 8, 1, nb, pf, out);
}

typedef void (*micro_fn)(const uint8_t *const *, const ds4_block_q8_k *const *, const float *, int64_t,
                         const uint8_t *, float *);

static void run_tile(micro_fn f, const uint8_t *w, size_t row_bytes, int n_rows, const ds4_block_q8_k *x, int64_t nb,
                     const float *ts, float *y) {
    const uint8_t *wr[8];
    const ds4_block_q8_k *xt[1] = {x};
    for (int r0 = 0; r0 < n_rows; r0 += 8) {
        for (int r = 0; r < 8; r++) wr[r] = w + (size_t)(r0 + r) * row_bytes;
        f(wr, xt, ts, nb, w + (size_t)(r0 + 8) * row_bytes, y + r0);
    }
}

int main(int argc, char **argv) {
    double kb = argc > 1 ? atof(argv[1]) : 65536;
    int rounds = argc > 2 ? atoi(argv[2]) : 20;
    ds4_quant_avx2_init();
    if (!__builtin_cpu_supports("avx512vbmi") || !__builtin_cpu_supports("avx512vnni")) {
        printf("iq2_ab: this CPU lacks AVX-512 VNNI/VBMI\n");
        return 0;
    }
    ds4_quant_vbmi_init();
    const int64_t n = 4096, nb = n / 256;
    const size_t row_bytes = (size_t)nb * 66;
    int n_rows = (int)(kb * 1024 / row_bytes) / 8 * 8;
    if (n_rows < 8) n_rows = 8;
    uint8_t *w = malloc((size_t)(n_rows + 8) * row_bytes);
    uint64_t rng = 88172645463325252ull;
    for (size_t i = 0; i < (size_t)(n_rows + 8) * row_bytes; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        w[i] = (uint8_t)(rng >> 32);
    }
    for (int r = 0; r < n_rows + 8; r++)
        for (int64_t b = 0; b < nb; b++) {
            uint16_t d = (uint16_t)(0x2c00 + (r * 7 + b) % 1024);
            memcpy(w + (size_t)r * row_bytes + b * 66, &d, 2);
        }
    float *xf = malloc(n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        xf[i] = (float)((rng >> 40) / 16777216.0) * 2.0f - 1.0f;
    }
    ds4_block_q8_k *xq = malloc(nb * sizeof(ds4_block_q8_k));
    act_q8_k(xf, xq, n);
    float ts[64];
    for (int64_t b = 0; b < nb; b++) ts[b] = xq[b].d;
    micro_fn fns[] = {avx2_walk, iq2_xxs_micro512, iq2_xxs_micro_vbmi};
    const char *names[] = {"avx2", "gather", "vbmi"};
    const int nf = sizeof fns / sizeof fns[0];
    float *y0 = malloc(n_rows * sizeof(float)), *y1 = malloc(n_rows * sizeof(float));
    run_tile(avx2_walk, w, row_bytes, n_rows, xq, nb, ts, y0);
    double best[16];
    for (int f = 0; f < nf; f++) {
        run_tile(fns[f], w, row_bytes, n_rows, xq, nb, ts, y1);
        if (memcmp(y0, y1, n_rows * sizeof(float))) printf("%s: NOT bit-identical\n", names[f]);
        best[f] = 1e9;
    }
    int reps = (int)(4096.0 / kb) + 1;
    for (int it = 0; it < rounds; it++)
        for (int f = 0; f < nf; f++) {
            double t0 = cpu_s();
            for (int k = 0; k < reps; k++) run_tile(fns[f], w, row_bytes, n_rows, xq, nb, ts, y1);
            double t = (cpu_s() - t0) / reps;
            if (t < best[f]) best[f] = t;
        }
    for (int f = 0; f < nf; f++)
        printf("%-15s %7.2f GB/s (%d rows, %.0f KiB)\n", names[f], n_rows * row_bytes / best[f] / 1e9, n_rows,
               n_rows * row_bytes / 1024.0);
    return 0;
}

#else
#include <stdio.h>
int main(void) {
    printf("iq2_ab: AVX2 kernels need an x86-64 build\n");
    return 0;
}
#endif
