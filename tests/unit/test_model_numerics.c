/* test_model_numerics.c - the §E rounding simulations against values
 * derived by hand from the E4M3 / E2M1 definitions (docs/MODEL.md E.2-E.4). */
#include <math.h>
#include <string.h>

#include "numerics.h"
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
