/* test_reduce_order.c - the summation identities the CUDA batch kernels
 * (src/cuda/mm_q8.cu, mm_f.cu, ops_moe.cu k_moe_mm) rely on to give the
 * decode kernels' bits, checked here in IEEE float with the CPU build's
 * -ffp-contract=off:
 *  1. cu_warp_sum's butterfly (lane i adds lane i^o for o = 16, 8, 4, 2, 1;
 *     lane 0's result) equals a binary counter fed the 32 lane values in
 *     bit-reversed order (0, 16, 8, 24, ...): pending sums only, no array of
 *     32 partials (k_mm_q8, k_mm_f);
 *  2. when only lanes 0, 8, 16, 24 hold values (one K-quant super-block per
 *     8 lanes) and the others +0, the butterfly is (A0 + A2) + (A1 + A3)
 *     (k_moe_mm), given no value is -0 (sums that start at +0 never are).
 * A GPU run checks the kernels themselves (tests/cuda); this pins down the
 * arithmetic argument on every machine.
 */
#include "test.h"

#include <stdint.h>
#include <string.h>

static uint64_t rs = 0x9e3779b97f4a7c15ull;
static float rnd_val(void) {
    rs ^= rs >> 12, rs ^= rs << 25, rs ^= rs >> 27;
    uint64_t x = rs * 0x2545f4914f6cdd1dull;
    /* mixed magnitudes and signs, some cancellation, some exact zeros */
    int e = (int)(x >> 58) - 32;
    float m = (float)((x >> 20) & 0xffffff) / 16777216.0f;
    if ((x & 0xff) == 0) return 0.0f;
    float v = ldexpf(1.0f + m, e / 4);
    return (x >> 8) & 1 ? -v : v;
}

/* lane 0 of cu_warp_sum: v += shfl_xor(v, o), o = 16..1 */
static float butterfly(const float *in) {
    float v[32], nv[32];
    memcpy(v, in, sizeof v);
    for (int o = 16; o > 0; o >>= 1) {
        for (int i = 0; i < 32; i++) nv[i] = v[i] + v[i ^ o];
        memcpy(v, nv, sizeof v);
    }
    return v[0];
}

static int br5(int m) { return ((m & 1) << 4) | ((m & 2) << 2) | (m & 4) | ((m & 8) >> 2) | ((m & 16) >> 4); }

/* the kernels' binary counter over arrivals m = 0..31 of lane br5(m) */
static float counter(const float *v) {
    float lvl[5] = {0}, x = 0.0f;
    for (int m = 0; m < 32; m++) {
        x = v[br5(m)];
        for (int b = 0; b < 5; b++) {
            if ((m >> b) & 1) {
                x = lvl[b] + x;
            } else {
                lvl[b] = x;
                break;
            }
        }
    }
    return x; /* after m = 31 every level has been folded in */
}

static int same_bits(float a, float b) {
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y;
}

DS4_TEST(reduce_order_butterfly_is_a_bit_reversed_counter) {
    float v[32];
    int bad = 0;
    for (int it = 0; it < 200000; it++) {
        for (int i = 0; i < 32; i++) v[i] = rnd_val();
        if (it % 7 == 0) /* lanes past the row's end hold +0 */
            for (int i = 32 - it % 29; i < 32; i++) v[i] = 0.0f;
        if (!same_bits(butterfly(v), counter(v))) bad++;
    }
    CHECK_EQ_INT(bad, 0);
    /* the order matters: a plain left-to-right sum differs on some inputs */
    int differ = 0;
    for (int it = 0; it < 20000 && !differ; it++) {
        float s = 0.0f;
        for (int i = 0; i < 32; i++) s += v[i] = rnd_val();
        differ = !same_bits(s, butterfly(v));
    }
    CHECK(differ);
}

DS4_TEST(reduce_order_four_super_block_lanes) {
    float v[32];
    int bad = 0;
    for (int it = 0; it < 200000; it++) {
        for (int i = 0; i < 32; i++) v[i] = 0.0f;
        float a[4];
        for (int g = 0; g < 4; g++) {
            a[g] = 0.0f + rnd_val(); /* a running sum from +0: never -0 */
            v[8 * g] = a[g];
        }
        if (!same_bits(butterfly(v), (a[0] + a[2]) + (a[1] + a[3]))) bad++;
    }
    CHECK_EQ_INT(bad, 0);
}
