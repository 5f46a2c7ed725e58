/* numerics.c - FP8 / FP4 / Hadamard / half rounding simulations (docs/MODEL.md §E).
 * See numerics.h. All scales are exact powers of two, so x/scale and
 * v*scale are exact and only the rounding to the small format loses bits.
 */
#include "numerics.h"

#include <math.h>

#include "numerics_inl.h"
#include "quant.h"

float ds4_num_e4m3_round(float v) { return ds4_num_e4m3_round_inl(v); }

void ds4_num_fp8_round(float *x, int n, int block) {
    for (int b0 = 0; b0 < n; b0 += block) {
        int nb = n - b0 < block ? n - b0 : block;
        float amax = 0.0f;
        for (int i = 0; i < nb; i++) amax = fmaxf(amax, fabsf(x[b0 + i]));
        if (amax < 1e-4f) amax = 1e-4f;
        float scale = ldexpf(1.0f, ds4_num_ceil_log2(amax / 448.0f));
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

float ds4_num_e2m1_round(float v) { return ds4_num_e2m1_round_inl(v); }

void ds4_num_fp4_round(float *x, int n) {
    const float floor_amax = 6.0f * 0x1p-126f;
    for (int b0 = 0; b0 < n; b0 += 32) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b0 + i]));
        if (amax < floor_amax) amax = floor_amax;
        float scale = ldexpf(1.0f, ds4_num_ceil_log2(amax / 6.0f));
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

void ds4_num_fp4_codes(const float *x, int n, int8_t *c, float *p) {
    for (int b0 = 0; b0 < n; b0 += 32) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b0 + i]));
        const float pw = ds4_num_i4_pow(amax), ip = ds4_num_i4_recip(pw);
        p[b0 / 32] = pw;
        for (int i = 0; i < 32; i++) c[b0 + i] = (int8_t)ds4_num_i4_code_r(x[b0 + i], pw, ip);
    }
}

float ds4_num_fp4_dot(const int8_t *a, const float *pa, const int8_t *b, const float *pb, int n) {
    float d = 0.0f;
    for (int k = 0; k < n / 32; k++) {
        int s = 0;
        for (int i = 0; i < 32; i++) s += (int)a[32 * k + i] * (int)b[32 * k + i];
        const float pp = pa[k] * pb[k];
        d = k ? fmaf((float)s, pp, d) : (float)s * pp;
    }
    return d;
}
