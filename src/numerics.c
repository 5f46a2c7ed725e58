/* numerics.c - FP8 / FP4 / Hadamard / half rounding simulations (docs/MODEL.md §E).
 * See numerics.h. All scales are exact powers of two, so x/scale and
 * v*scale are exact and only the rounding to the small format loses bits.
 */
#include "numerics.h"

#include <math.h>

#include "quant.h"

/* ceil(log2(r)) for a positive normal float r, computed exactly from its
 * binary exponent (log2f + ceilf agree with this except within an ulp of a
 * power of two, where this form is the mathematically exact one). */
static int ceil_log2(float r) {
    int e;
    float m = frexpf(r, &e); /* r = m * 2^e, m in [0.5, 1) */
    return m == 0.5f ? e - 1 : e;
}

float ds4_num_e4m3_round(float v) {
    float a = fabsf(v);
    if (a == 0.0f) return v;
    /* Normal E4M3 values have 3 mantissa bits; below 2^-6 the grid is the
     * subnormal step 2^-9. rintf rounds to nearest even, and an even
     * quotient means an even mantissa code. */
    int e;
    frexpf(a, &e);               /* a in [2^(e-1), 2^e) */
    int ex = e - 1;              /* floor(log2 a) */
    if (ex < -6) ex = -6;
    float step = ldexpf(1.0f, ex - 3);
    float r = rintf(a / step) * step;
    if (r > 448.0f) r = 448.0f;
    return v < 0 ? -r : r;
}

void ds4_num_fp8_round(float *x, int n, int block) {
    for (int b0 = 0; b0 < n; b0 += block) {
        int nb = n - b0 < block ? n - b0 : block;
        float amax = 0.0f;
        for (int i = 0; i < nb; i++) amax = fmaxf(amax, fabsf(x[b0 + i]));
        if (amax < 1e-4f) amax = 1e-4f;
        float scale = ldexpf(1.0f, ceil_log2(amax / 448.0f));
        for (int i = 0; i < nb; i++) {
            float v = x[b0 + i] / scale;
            if (v > 448.0f) v = 448.0f;
            if (v < -448.0f) v = -448.0f;
            x[b0 + i] = ds4_num_e4m3_round(v) * scale;
        }
    }
}

void ds4_num_hadamard(float *x, int n) {
    for (int h = 1; h < n; h *= 2) {
        for (int i = 0; i < n; i += 2 * h) {
            for (int j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
    }
    float s = 1.0f / sqrtf((float)n);
    if (n == 128) s = 0.08838834764831845f;
    for (int i = 0; i < n; i++) x[i] *= s;
}

float ds4_num_e2m1_round(float v) {
    float a = fabsf(v), r;
    /* Midpoints between neighbours; a tie goes to the even code
     * (codes 0..7 = 0, .5, 1, 1.5, 2, 3, 4, 6). */
    if (a <= 0.25f) r = 0.0f;
    else if (a < 0.75f) r = 0.5f;
    else if (a <= 1.25f) r = 1.0f;
    else if (a < 1.75f) r = 1.5f;
    else if (a <= 2.5f) r = 2.0f;
    else if (a < 3.5f) r = 3.0f;
    else if (a <= 5.0f) r = 4.0f;
    else r = 6.0f;
    return v < 0 ? -r : r;
}

void ds4_num_fp4_round(float *x, int n) {
    const float floor_amax = 6.0f * 0x1p-126f;
    for (int b0 = 0; b0 < n; b0 += 32) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b0 + i]));
        if (amax < floor_amax) amax = floor_amax;
        float scale = ldexpf(1.0f, ceil_log2(amax / 6.0f));
        for (int i = 0; i < 32; i++) {
            float v = x[b0 + i] / scale;
            if (v > 6.0f) v = 6.0f;
            if (v < -6.0f) v = -6.0f;
            x[b0 + i] = ds4_num_e2m1_round(v) * scale;
        }
    }
}

void ds4_num_f16_round(float *x, int n) {
    for (int i = 0; i < n; i++) x[i] = ds4_f16_to_f32(ds4_f32_to_f16(x[i]));
}
