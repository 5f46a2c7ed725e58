/* test_model_numerics.c - the §E rounding simulations against values
 * derived by hand from the E4M3 / E2M1 definitions (docs/MODEL.md E.2-E.4). */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "cpu/cpu.h"
#include "numerics.h"
#include "numerics_inl.h"
#include "test.h"

DS4_TEST(model_numerics_e4m3_round_ties_even) {
    CHECK(ds4_num_e4m3_round(92.0026f) == 96.0f);   /* just above the 88|96 midpoint */
    CHECK(ds4_num_e4m3_round(91.99f) == 88.0f);
    CHECK(ds4_num_e4m3_round(1.0625f) == 1.0f);     /* tie 1.0 (m=0) | 1.125 (m=1) -> even */
    CHECK(ds4_num_e4m3_round(1.1875f) == 1.25f);    /* tie 1.125 (m=1) | 1.25 (m=2) -> even */
    CHECK(ds4_num_e4m3_round(-1.1875f) == -1.25f);
    CHECK(ds4_num_e4m3_round(448.0f) == 448.0f);
    CHECK(ds4_num_e4m3_round(0.0f) == 0.0f);
    CHECK(ds4_num_e4m3_round(0x1p-9f) == 0x1p-9f);        /* smallest subnormal */
    CHECK(ds4_num_e4m3_round(1.5f * 0x1p-9f) == 0x1p-8f); /* tie m=1 | m=2 -> 2 */
    CHECK(ds4_num_e4m3_round(0.4f * 0x1p-9f) == 0.0f);
    CHECK(ds4_num_e4m3_round(0x1p-6f * 1.0625f) == 0x1p-6f); /* min normal, tie -> even */
}

DS4_TEST(model_numerics_fp8_block_scale) {
    float x[64];
    for (int i = 0; i < 64; i++) x[i] = 0.0f;
    x[0] = 896.0f; /* amax 896 -> scale 2, 896 -> 448 * 2 exactly */
    x[1] = 3.0f;   /* 3 / 2 = 1.5 exact */
    x[2] = 2.3f;   /* 1.15 -> 1.125 -> 2.25 */
    ds4_num_fp8_round(x, 64, 64);
    CHECK(x[0] == 896.0f && x[1] == 3.0f && x[2] == 2.25f);
    /* amax floor 1e-4: tiny blocks keep their (subnormal-grid) values */
    float y[3] = {1e-6f, 0, 0};
    ds4_num_fp8_round(y, 3, 64); /* scale 2^ceil(log2(1e-4/448)) = 2^-22 */
    CHECK(y[0] == ds4_num_e4m3_round(1e-6f / 0x1p-22f) * 0x1p-22f);
}

DS4_TEST(model_numerics_e2m1_round_ties_even) {
    static const float in[] = {0.25f, 0.26f, 0.75f, 1.25f, 1.3f, 1.75f, 2.5f, 2.6f, 3.5f, 5.0f, 5.1f, -0.3f, 6.0f};
    static const float want[] = {0.0f, 0.5f, 1.0f, 1.0f, 1.5f, 2.0f, 2.0f, 3.0f, 4.0f, 4.0f, 6.0f, -0.5f, 6.0f};
    for (size_t i = 0; i < sizeof in / sizeof in[0]; i++)
        CHECK_MSG(ds4_num_e2m1_round(in[i]) == want[i], "e2m1(%g) = %g, want %g", in[i], ds4_num_e2m1_round(in[i]),
                  want[i]);
    float x[32] = {12.0f, 1.0f, 2.9f}; /* amax 12 -> scale 2 */
    ds4_num_fp4_round(x, 32);
    CHECK(x[0] == 12.0f && x[1] == 1.0f && x[2] == 3.0f); /* 1/2 = 0.5 exact; 2.9/2 = 1.45 -> 1.5 */
}

DS4_TEST(model_numerics_hadamard_orthonormal) {
    float x[128] = {0}, y[128];
    x[0] = 1.0f;
    ds4_num_hadamard(x, 128);
    for (int i = 0; i < 128; i++) CHECK(fabsf(x[i] - 0.08838834764831845f) < 1e-7f);
    for (int i = 0; i < 128; i++) y[i] = x[i] = sinf((float)i * 0.37f) * 3.0f;
    ds4_num_hadamard(x, 128);
    double n0 = 0, n1 = 0;
    for (int i = 0; i < 128; i++) { n0 += (double)y[i] * y[i]; n1 += (double)x[i] * x[i]; }
    CHECK_NEAR(n0, n1, 1e-4 * n0);
    ds4_num_hadamard(x, 128); /* H is symmetric and orthonormal: H(Hx) = x */
    for (int i = 0; i < 128; i++) CHECK_NEAR(x[i], y[i], 1e-5);
    /* sign pattern of row 3 (popcount(3 & j) parity) */
    float e[128] = {0};
    e[3] = 1.0f;
    ds4_num_hadamard(e, 128);
    CHECK(e[0] > 0 && e[1] < 0 && e[2] < 0 && e[3] > 0 && e[4] > 0);
}

DS4_TEST(model_numerics_f16_round) {
    float x[4] = {1.0f, 1.0f + 0x1p-11f, 1.0f + 0x1p-11f + 0x1p-20f, 70000.0f};
    ds4_num_f16_round(x, 4);
    CHECK(x[0] == 1.0f && x[1] == 1.0f && x[2] == 1.0f + 0x1p-10f && isinf(x[3]));
}

/* E.3 exact scores: FP4-rounded vectors as int8 codes times one power of two
 * per block of 32 (numerics_inl.h), and their dot product. */
static uint32_t fp4_rng = 12345u;
static float fp4_gauss(void) {
    float s = 0.0f;
    for (int i = 0; i < 4; i++) {
        fp4_rng = fp4_rng * 1664525u + 1013904223u;
        s += (float)(fp4_rng >> 8) * (1.0f / 16777216.0f) - 0.5f;
    }
    return s;
}

DS4_TEST(model_numerics_fp4_codes_are_exact) {
    float x[128], y[128];
    int8_t c[128];
    float p[4];
    for (int rep = 0; rep < 200; rep++) {
        const float mag = ldexpf(1.0f, (rep & 1) ? rep % 20 - 8 : rep % 40 - 20); /* f16: no overflow */
        for (int i = 0; i < 128; i++) x[i] = fp4_gauss() * mag * (i < 32 && rep % 7 == 0 ? 1e-3f : 1.0f);
        ds4_num_hadamard(x, 128);
        ds4_num_fp4_round(x, 128);
        if (rep & 1) ds4_num_f16_round(x, 128); /* the stored rows */
        ds4_num_fp4_codes(x, 128, c, p);
        int bad = 0;
        for (int i = 0; i < 128; i++) {
            y[i] = (float)c[i] * p[i / 32];
            bad += !(c[i] >= -12 && c[i] <= 12 && y[i] == x[i]); /* -0 codes as 0 */
        }
        CHECK_EQ_INT(bad, 0);
    }
    /* an all-zero block, NaN ignored by the block maximum, inf clamped */
    for (int i = 0; i < 32; i++) x[i] = 0.0f;
    ds4_num_fp4_codes(x, 32, c, p);
    CHECK(p[0] == 1.0f && c[0] == 0 && c[31] == 0);
    x[3] = NAN, x[4] = 6.0f, x[5] = -0.5f;
    ds4_num_fp4_codes(x, 32, c, p);
    CHECK(p[0] == 0.5f && c[3] == 0 && c[4] == 12 && c[5] == -1);
    x[6] = INFINITY;
    ds4_num_fp4_codes(x, 32, c, p);
    CHECK(p[0] == 1.0f && c[6] == 127 && c[4] == 6);
    /* the smallest FP4 scale: 0.5 * 2^-126 codes as 8 * 2^-130 */
    for (int i = 0; i < 32; i++) x[i] = 0.0f;
    x[0] = 0x1p-127f, x[1] = -3.0f * 0x1p-126f;
    ds4_num_fp4_codes(x, 32, c, p);
    CHECK(p[0] == 0x1p-128f && c[0] == 2 && c[1] == -12);
}

DS4_TEST(model_numerics_fp4_dot_is_the_exact_sum) {
    float q[128], k[128], pq[4], pk[4];
    int8_t cq[128], ck[128];
    int exact = 0;
    for (int rep = 0; rep < 300; rep++) {
        for (int i = 0; i < 128; i++) q[i] = fp4_gauss() * 3.0f, k[i] = fp4_gauss() * 0.01f;
        if (rep % 10 == 0)
            for (int i = 64; i < 96; i++) k[i] *= 0x1p-20f; /* a block 20 binades down: inexact sums */
        ds4_num_hadamard(q, 128), ds4_num_fp4_round(q, 128);
        if (rep % 10 != 0) ds4_num_hadamard(k, 128);
        ds4_num_fp4_round(k, 128);
        ds4_num_fp4_codes(q, 128, cq, pq);
        ds4_num_fp4_codes(k, 128, ck, pk);
        const float d = ds4_num_fp4_dot(cq, pq, ck, pk, 128);
        /* the definition, spelled out */
        float want = 0.0f;
        for (int b = 0; b < 4; b++) {
            int s = 0;
            for (int i = 32 * b; i < 32 * b + 32; i++) s += cq[i] * ck[i];
            want = b ? fmaf((float)s, pq[b] * pk[b], want) : (float)s * (pq[b] * pk[b]);
        }
        CHECK(d == want);
        /* the exact value (double holds it: 128 products of 8-bit codes at
         * 2^-40..2^10) whenever every partial sum fits a float, and then
         * any exact f32 summation, e.g. the single fmaf chain of the
         * CUDA-core kernels */
        double e = 0.0;
        bool fits = true, fits_all = true; /* the block sums / every partial sum */
        for (int i = 0; i < 128; i++) {
            e += (double)q[i] * (double)k[i];
            fits_all = fits_all && (double)(float)e == e;
            if (i % 32 == 31) fits = fits && (double)(float)e == e;
        }
        float chain = 0.0f;
        for (int i = 0; i < 128; i++) chain = fmaf(q[i], k[i], chain);
        if (fits) {
            exact++;
            CHECK(d == (float)e);
            CHECK(chain == d || !fits_all);
        } else {
            CHECK(fabs((double)d - e) <= fabs(e) * 0x1p-22); /* two roundings at most change the last bits */
        }
    }
    CHECK(exact >= 250); /* the Hadamard-spread vectors are exact */
}

/* The CPU backend's kernel for the exact dots (8 heads per AVX2 step, else
 * the portable loop) gives ds4_num_fp4_dot's bits, extreme codes included. */
DS4_TEST(model_numerics_fp4_dot_heads_kernel_matches_definition) {
    enum { IH = 24, ID = 128, NB = ID / 32 };
    static int8_t qc[IH * ID], kc[ID];
    float qp[IH * NB], qpT[NB * IH], kp[NB], a[IH], b[IH];
    for (int rep = 0; rep < 50; rep++) {
        for (int i = 0; i < IH * ID; i++) {
            fp4_rng = fp4_rng * 1664525u + 1013904223u;
            qc[i] = (int8_t)(rep % 5 == 0 ? ((fp4_rng >> 20) & 1 ? 127 : -127) : (int)((fp4_rng >> 16) % 25) - 12);
        }
        for (int i = 0; i < ID; i++) {
            fp4_rng = fp4_rng * 1664525u + 1013904223u;
            kc[i] = (int8_t)(rep % 5 == 0 ? -127 : (int)((fp4_rng >> 16) % 25) - 12);
        }
        for (int h = 0; h < IH; h++)
            for (int k = 0; k < NB; k++) qp[h * NB + k] = ldexpf(1.0f, (h * 7 + k * 3 + rep) % 60 - 30);
        for (int k = 0; k < NB; k++) kp[k] = ldexpf(1.0f, (k * 5 + rep) % 50 - 140); /* products near the subnormals */
        const int heads[3] = {8, 24, 5}; /* the SIMD path where there is one; 5: the portable loop */
        for (int v = 0; v < 3; v++) {
            const int nh = heads[v];
            for (int h = 0; h < nh; h++)
                for (int k = 0; k < NB; k++) qpT[k * nh + h] = qp[h * NB + k];
            cpu_fp4_dot_heads(qc, qpT, nh, kc, kp, ID, a);
            cpu_fp4_dot_heads_ref(qc, qpT, nh, kc, kp, ID, b);
            for (int h = 0; h < nh; h++) {
                const float want = ds4_num_fp4_dot(qc + h * ID, qp + h * NB, kc, kp, ID);
                CHECK(memcmp(&a[h], &want, 4) == 0 && memcmp(&b[h], &want, 4) == 0);
            }
        }
    }
}

/* The division-free code (x * 1/p where 1/p is a float) is the division's,
 * for every power p a block can have and values on and off the grid. */
DS4_TEST(model_numerics_fp4_code_by_reciprocal_is_the_division) {
    int n = 0;
    for (int k = -149; k <= 124; k++) {
        const float p = ldexpf(1.0f, k), ip = ds4_num_i4_recip(p);
        for (int rep = 0; rep < 64; rep++) {
            fp4_rng = fp4_rng * 1664525u + 1013904223u;
            float x = ldexpf((float)(int)(fp4_rng >> 8) * 0x1p-23f - 1.0f, k + 4 - (int)(fp4_rng & 31));
            if (rep == 0) x = NAN;
            if (rep == 1) x = INFINITY;
            if (rep == 2) x = -0.0f;
            if (rep == 3) x = 12.5f * p; /* a tie: to even */
            CHECK_EQ_INT(ds4_num_i4_code_r(x, p, ip), ds4_num_i4_code(x, p));
            n++;
        }
    }
    CHECK(n > 17000);
    CHECK(ds4_num_i4_code(12.5f, 1.0f) == 12 && ds4_num_i4_code(13.5f, 1.0f) == 14);
}

/* The CPU backend's block coder (AVX2 where there is one) gives
 * ds4_num_fp4_codes's bytes and powers, for grid values, arbitrary floats,
 * NaN, infinities, signed zeros and blocks too small for a float 1/p. */
DS4_TEST(model_numerics_fp4_codes_kernel_matches_definition) {
    float x[256], p1[8], p2[8];
    int8_t c1[256], c2[256];
    int bad = 0;
    for (int rep = 0; rep < 400; rep++) {
        for (int i = 0; i < 256; i++) {
            fp4_rng = fp4_rng * 1664525u + 1013904223u;
            const int kind = (int)(fp4_rng >> 28);
            const float g = fp4_gauss();
            x[i] = kind == 0   ? NAN
                   : kind == 1 ? (g < 0 ? -INFINITY : INFINITY)
                   : kind == 2 ? -0.0f
                               : ldexpf(g, rep % 300 - 150); /* 2^-150 .. 2^149: subnormal to huge blocks */
        }
        if (rep % 3 == 0) {
            for (int i = 0; i < 256; i++) x[i] = fp4_gauss() * ldexpf(1.0f, rep % 60 - 30);
            ds4_num_fp4_round(x, 256); /* the grid, as stored */
        }
        ds4_num_fp4_codes(x, 256, c1, p1);
        cpu_fp4_codes(x, 256, c2, p2);
        bad += memcmp(c1, c2, sizeof c1) != 0 || memcmp(p1, p2, sizeof p1) != 0;
    }
    CHECK_EQ_INT(bad, 0);
}
