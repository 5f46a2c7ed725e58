/* numerics_inl.h - the scalar rounding rules of MODEL.md §E, stated once
 * for the CPU (numerics.c) and the CUDA backend (cuda/rowops.cuh): FP8
 * E4M3FN and FP4 E2M1 rounding of one value, and the exact ceil(log2) of a
 * block scale. Pure functions; every multiply here is by a power of two, so
 * results are exact whatever the compiler fuses.
 */
#ifndef DS4_NUMERICS_INL_H
#define DS4_NUMERICS_INL_H

#include <math.h>

#ifdef __CUDACC__
#define DS4_NUM_FN static __host__ __device__ inline
#else
#define DS4_NUM_FN static inline
#endif

/* ceil(log2(r)) for a positive normal float r, from its binary exponent
 * (log2f + ceilf agree except within an ulp of a power of two, where this
 * form is the mathematically exact one). */
DS4_NUM_FN int ds4_num_ceil_log2(float r) {
    int e;
    float m = frexpf(r, &e); /* r = m * 2^e, m in [0.5, 1) */
    return m == 0.5f ? e - 1 : e;
}

/* v (already divided by its block scale, |v| <= 448) rounded to the
 * nearest E4M3FN value, ties to even mantissa. Normal E4M3 values have 3
 * mantissa bits; below 2^-6 the grid is the subnormal step 2^-9. rintf
 * rounds to nearest even, and an even quotient means an even mantissa. */
DS4_NUM_FN float ds4_num_e4m3_round_inl(float v) {
    float a = fabsf(v);
    if (a == 0.0f) return v;
    int e;
    frexpf(a, &e);               /* a in [2^(e-1), 2^e) */
    int ex = e - 1;              /* floor(log2 a) */
    if (ex < -6) ex = -6;
    float step = ldexpf(1.0f, ex - 3);
    float r = rintf(a / step) * step;
    if (r > 448.0f) r = 448.0f;
    return v < 0 ? -r : r;
}

/* v (|v| <= 6) rounded to the nearest of {0,.5,1,1.5,2,3,4,6} (with sign):
 * midpoints between neighbours, a tie goes to the even code (codes 0..7 =
 * 0, .5, 1, 1.5, 2, 3, 4, 6). */
DS4_NUM_FN float ds4_num_e2m1_round_inl(float v) {
    float a = fabsf(v), r;
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

/* E.3, exact indexer scores: a block of 32 FP4-rounded values x_i (E2M1
 * grid values times the block's power-of-two scale 2^s, possibly rounded to
 * half for storage afterwards) is x_i = c_i * p with small integers c_i and
 * one power of two p = 2^(floor(log2 max|x|) - 3): with the largest grid
 * value m (0.5..6) and f = floor(log2 m) (-1..2), x_i / p = code_i *
 * 2^(3 - f) is an integer because 2 * code_i is one and f <= 2, and
 * |c_i| <= m * 2^(3 - f) <= 12. The dot product of two such vectors is then
 * a sum of exact integer block sums S_b times powers of two, which
 * ds4_num_fp4_dot (numerics.h) adds in block order: any kernel can compute
 * the S_b (CPU integer loops, int8 tensor cores) and get the same bits.
 * For values off the grid (a half underflow, garbage) the codes are rintf
 * of the quotient, clamped to +-127, NaN -> 0: still deterministic. */

/* p for a block whose largest magnitude is amax (fmaxf over |x_i|, so NaN is
 * ignored); 1 when amax is 0, inf or NaN; at least 2^-149. */
DS4_NUM_FN float ds4_num_i4_pow(float amax) {
    if (!(amax > 0.0f) || amax > 3.4028234663852886e38f) return 1.0f;
    int e;
    frexpf(amax, &e); /* amax in [2^(e-1), 2^e): floor(log2) = e - 1 */
    int k = e - 4;
    if (k < -149) k = -149;
    return ldexpf(1.0f, k);
}

/* the code of one value x of a block with power p (exact division: p is a
 * power of two and |x| / p < 16 for a block's own values) */
DS4_NUM_FN int ds4_num_i4_code(float x, float p) {
    float v = rintf(x / p);
    if (!(v == v)) return 0;
    if (v > 127.0f) v = 127.0f;
    if (v < -127.0f) v = -127.0f;
    return (int)v;
}

/* The same code without a division per value: ip = ds4_num_i4_recip(p) is
 * 1/p when that is a float (p in [2^-126, 2^126]; then x * ip and x / p
 * are the same real number rounded once, so the same float), else 0 and the
 * division is used. */
DS4_NUM_FN float ds4_num_i4_recip(float p) { return p >= 0x1p-126f && p <= 0x1p126f ? 1.0f / p : 0.0f; }
DS4_NUM_FN int ds4_num_i4_code_r(float x, float p, float ip) {
    float v = rintf(ip != 0.0f ? x * ip : x / p);
    if (!(v == v)) return 0;
    if (v > 127.0f) v = 127.0f;
    if (v < -127.0f) v = -127.0f;
    return (int)v;
}

#endif
