/* quant_avx2.c - AVX2/FMA/F16C kernels for dequantization, dots and
 * activation quantization, and AVX-512 VNNI prefill tiles over them,
 * selected at run time by quant.c (the functions carry a target attribute,
 * so the default build stays portable).
 *
 * Contracts (the same as the scalar kernels in quant.c, checked by
 * tests/unit/test_quant.c):
 * - dequant: bit-identical to scalar (same per-value multiply and subtract,
 *   no FMA; F16C conversion is exact).
 * - dot_q: integer sums are exact whatever the order, and each block's
 *   float combination is the scalar one, so results are bit-identical.
 * - quantize_act: identical bytes (round-to-nearest-even, same scale math).
 * - dot_f32: FMA accumulation in 8 lanes; differs from the scalar sum only
 *   by float rounding (~1e-6 relative to sum |y*x|).
 * - tiles (dot_q_tile / dot_f32_tile): every (row, token) pair bit-identical
 *   to this file's row dot (section "tiles" below).
 */
#include "quant_impl.h"

#if defined(__x86_64__) && defined(__GNUC__)

#include <float.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdbool.h>
#include <immintrin.h>
#include <math.h>

/* BMI1/BMI2 come with AVX2 on every x86 CPU (Haswell, Excavator, Zen); quant.c
 * checks them too. */
#define TGT __attribute__((target("avx2,fma,f16c,bmi,bmi2")))

/* ---- small helpers ---------------------------------------------------------- */

static inline TGT float hsum_f32(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline TGT int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* f16 at p, the scalar conversion (keeps signalling-NaN bits): used where
 * the value is stored as is */
static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32_inl(h);
}

/* f16 block scale at p through F16C: equal to f16_to_f32_inl for every
 * input except that a signalling NaN comes back quiet; scales only enter
 * float arithmetic, which quiets NaNs anyway, so results are identical. */
static inline TGT float scale_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 8 signed bytes -> 8 floats */
static inline TGT __m256 i8x8_to_ps(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Sum of 32 products of unsigned bytes u (<= 127 in use) and signed bytes s,
 * as 8 int32 lanes (pairs summed in int16: fits for |u*s| <= 43*127*2). */
static inline TGT __m256i dot_u8_i8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* 32 bytes -> 4 x 8 floats, in registers */
static inline TGT void u8x32_to_ps(__m256i v, __m256 f[4]) {
    __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    f[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    f[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    f[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    f[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

/* ---- plain types -------------------------------------------------------- */

static TGT void dq_f16(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i))));
    for (; i < n; i++) y[i] = f16_at(p + 2 * i);
}

static TGT void dq_bf16(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 2 * i)));
        _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; i < n; i++) y[i] = ds4_bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
}

/* Plain dots: 4 accumulators of 8 lanes, then the scalar tail. */
#define PLAIN_DOT(NAME, LOAD8, SCALAR_AT)                                        \
    static TGT float NAME(const void *row, const float *x, int64_t n) {          \
        const uint8_t *p = row;                                                  \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;              \
        int64_t i = 0;                                                           \
        for (; i + 32 <= n; i += 32) {                                           \
            a0 = _mm256_fmadd_ps(LOAD8(p, i), _mm256_loadu_ps(x + i), a0);       \
            a1 = _mm256_fmadd_ps(LOAD8(p, i + 8), _mm256_loadu_ps(x + i + 8), a1); \
            a2 = _mm256_fmadd_ps(LOAD8(p, i + 16), _mm256_loadu_ps(x + i + 16), a2); \
            a3 = _mm256_fmadd_ps(LOAD8(p, i + 24), _mm256_loadu_ps(x + i + 24), a3); \
        }                                                                        \
        for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(LOAD8(p, i), _mm256_loadu_ps(x + i), a0); \
        float s = hsum_f32(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))); \
        for (; i < n; i++) s += SCALAR_AT(p, i) * x[i];                          \
        return s;                                                                \
    }

#define LOAD_F32(p, i) _mm256_loadu_ps((const float *)(p) + (i))
#define LOAD_F16(p, i) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((p) + 2 * (i))))
#define LOAD_BF16(p, i) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((p) + 2 * (i)))), 16))
static inline float f32_at(const uint8_t *p, int64_t i) {
    float f;
    memcpy(&f, p + 4 * i, 4);
    return f;
}
static inline float f16_idx(const uint8_t *p, int64_t i) { return f16_at(p + 2 * i); }
static inline float bf16_idx(const uint8_t *p, int64_t i) {
    return ds4_bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
}

PLAIN_DOT(dot_f32_f32, LOAD_F32, f32_at)
PLAIN_DOT(dot_f16_f32, LOAD_F16, f16_idx)
PLAIN_DOT(dot_bf16_f32, LOAD_BF16, bf16_idx)

/* ---- Q8_0 ------------------------------------------------------------------ */

static TGT void dq_q8_0(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    for (int64_t b = 0; b < n / 32; b++, p += sizeof(ds4_block_q8_0), y += 32) {
        __m256 d = _mm256_set1_ps(scale_at(p));
        const int8_t *q = (const int8_t *)(p + 2);
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(d, i8x8_to_ps(q + 8 * k)));
    }
}

static TGT float dot_q8_0_f32(const void *row, const float *x, int64_t n) {
    const uint8_t *p = row;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / 32; b++, p += sizeof(ds4_block_q8_0), x += 32) {
        __m256 d = _mm256_set1_ps(scale_at(p));
        const int8_t *q = (const int8_t *)(p + 2);
        __m256 s = _mm256_mul_ps(i8x8_to_ps(q), _mm256_loadu_ps(x));
        s = _mm256_fmadd_ps(i8x8_to_ps(q + 8), _mm256_loadu_ps(x + 8), s);
        s = _mm256_fmadd_ps(i8x8_to_ps(q + 16), _mm256_loadu_ps(x + 16), s);
        s = _mm256_fmadd_ps(i8x8_to_ps(q + 24), _mm256_loadu_ps(x + 24), s);
        acc = _mm256_fmadd_ps(d, s, acc);
    }
    return hsum_f32(acc);
}

static TGT float dotq_q8_0(const void *row, const void *xq, int64_t n) {
    const uint8_t *p = row, *a = xq;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / 32; b++, p += 34, a += 34) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(p + 2));
        __m256i v = _mm256_loadu_si256((const __m256i *)(a + 2));
        /* |w| * (v with w's sign): unsigned x signed, as maddubs needs */
        int isum = hsum_i32(dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w)));
        sum += (scale_at(p) * scale_at(a)) * (float)isum;
    }
    return sum;
}

/* ---- Q4_K ------------------------------------------------------------------ */

static inline void q4k_sm(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* y = d*q - dm for 32 nibble values (lo or hi half of 32 bytes) */
static inline TGT void q4k_values32(const uint8_t *q, int hi, float dsc, float dm, __m256 out[4]) {
    __m256i bytes = _mm256_loadu_si256((const __m256i *)q);
    __m256i nib = hi ? _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15))
                     : _mm256_and_si256(bytes, _mm256_set1_epi8(15));
    __m256 lv[4], vd = _mm256_set1_ps(dsc), vm = _mm256_set1_ps(dm);
    u8x32_to_ps(nib, lv);
    for (int k = 0; k < 4; k++) out[k] = _mm256_sub_ps(_mm256_mul_ps(vd, lv[k]), vm);
}

static inline TGT void q4k_store32(float *y, const uint8_t *q, int hi, float dsc, float dm) {
    __m256 v[4];
    q4k_values32(q, hi, dsc, dm, v);
    for (int k = 0; k < 4; k++) _mm256_storeu_ps(y + 8 * k, v[k]);
}

static TGT void dq_q4_k(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    for (int64_t b = 0; b < n / 256; b++, p += sizeof(ds4_block_q4_k), y += 256) {
        float d = scale_at(p), dmin = scale_at(p + 2);
        for (int c = 0; c < 4; c++) {
            int sc0, m0, sc1, m1;
            q4k_sm(p + 4, 2 * c, &sc0, &m0);
            q4k_sm(p + 4, 2 * c + 1, &sc1, &m1);
            q4k_store32(y + 64 * c, p + 16 + 32 * c, 0, d * (float)sc0, dmin * (float)m0);
            q4k_store32(y + 64 * c + 32, p + 16 + 32 * c, 1, d * (float)sc1, dmin * (float)m1);
        }
    }
}

static TGT float dot_q4_k_f32(const void *row, const float *x, int64_t n) {
    const uint8_t *p = row;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / 256; b++, p += sizeof(ds4_block_q4_k), x += 256) {
        float d = scale_at(p), dmin = scale_at(p + 2);
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++) {
                int sc, m;
                q4k_sm(p + 4, 2 * c + h, &sc, &m);
                __m256 v[4];
                q4k_values32(p + 16 + 32 * c, h, d * (float)sc, dmin * (float)m, v);
                const float *xs = x + 64 * c + 32 * h;
                for (int k = 0; k < 4; k++) acc = _mm256_fmadd_ps(v[k], _mm256_loadu_ps(xs + 8 * k), acc);
            }
    }
    return hsum_f32(acc);
}

static TGT float dotq_q4_k(const void *row, const void *xq, int64_t n) {
    const ds4_block_q8_k *a = xq;
    const uint8_t *p = row;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / 256; b++, p += sizeof(ds4_block_q4_k)) {
        __m256i acc = _mm256_setzero_si256();
        int msum = 0;
        for (int c = 0; c < 4; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * c));
            __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi8(15));
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
            int sc0, m0, sc1, m1;
            q4k_sm(p + 4, 2 * c, &sc0, &m0);
            q4k_sm(p + 4, 2 * c + 1, &sc1, &m1);
            __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(a[b].qs + 64 * c)));
            __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(a[b].qs + 64 * c + 32)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p0, _mm256_set1_epi16((int16_t)sc0)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p1, _mm256_set1_epi16((int16_t)sc1)));
            msum += m0 * (a[b].bsums[4 * c] + a[b].bsums[4 * c + 1]) + m1 * (a[b].bsums[4 * c + 2] + a[b].bsums[4 * c + 3]);
        }
        int isum = hsum_i32(acc);
        sum += a[b].d * (scale_at(p) * (float)isum - scale_at(p + 2) * (float)msum);
    }
    return sum;
}

/* ---- Q2_K ------------------------------------------------------------------ */

/* 2-bit levels of half h, shift k (values 128h+32k .. +31) as 32 bytes */
static inline TGT __m256i q2k_levels(const uint8_t *qs, int h, int k) {
    __m256i bytes = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
    return _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * k), _mm256_set1_epi8(3));
}

/* the 32 values of half h, shift k of a Q2_K block (sub-blocks j, j+1) */
static inline TGT void q2k_values32(const uint8_t *p, float d, float dmin, int h, int k, __m256 out[4]) {
    __m256 lv[4];
    u8x32_to_ps(q2k_levels(p + 16, h, k), lv);
    for (int s = 0; s < 2; s++) {
        int sc = p[8 * h + 2 * k + s];
        __m256 vd = _mm256_set1_ps(d * (float)(sc & 15)), vm = _mm256_set1_ps(dmin * (float)(sc >> 4));
        out[2 * s] = _mm256_sub_ps(_mm256_mul_ps(vd, lv[2 * s]), vm);
        out[2 * s + 1] = _mm256_sub_ps(_mm256_mul_ps(vd, lv[2 * s + 1]), vm);
    }
}

static TGT void dq_q2_k(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    for (int64_t b = 0; b < n / 256; b++, p += sizeof(ds4_block_q2_k), y += 256) {
        float d = scale_at(p + 80), dmin = scale_at(p + 82);
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++) {
                __m256 v[4];
                q2k_values32(p, d, dmin, h, k, v);
                for (int i = 0; i < 4; i++) _mm256_storeu_ps(y + 128 * h + 32 * k + 8 * i, v[i]);
            }
    }
}

static TGT float dot_q2_k_f32(const void *row, const float *x, int64_t n) {
    const uint8_t *p = row;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / 256; b++, p += sizeof(ds4_block_q2_k), x += 256) {
        float d = scale_at(p + 80), dmin = scale_at(p + 82);
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++) {
                __m256 v[4];
                q2k_values32(p, d, dmin, h, k, v);
                const float *xs = x + 128 * h + 32 * k;
                for (int i = 0; i < 4; i++) acc = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xs + 8 * i), acc);
            }
    }
    return hsum_f32(acc);
}

static TGT float dotq_q2_k(const void *row, const void *xq, int64_t n) {
    const ds4_block_q8_k *a = xq;
    const uint8_t *p = row;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / 256; b++, p += sizeof(ds4_block_q2_k)) {
        __m256i acc = _mm256_setzero_si256();
        int msum = 0;
        for (int j = 0; j < 16; j++) msum += (p[j] >> 4) * a[b].bsums[j];
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++) {
                int j = 8 * h + 2 * k; /* sub-blocks j (first 16 values), j+1 */
                __m256i prod = _mm256_maddubs_epi16(q2k_levels(p + 16, h, k),
                                                    _mm256_loadu_si256((const __m256i *)(a[b].qs + 128 * h + 32 * k)));
                __m256i scl = _mm256_setr_m128i(_mm_set1_epi16((int16_t)(p[j] & 15)), _mm_set1_epi16((int16_t)(p[j + 1] & 15)));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, scl));
            }
        int isum = hsum_i32(acc);
        sum += a[b].d * (scale_at(p + 80) * (float)isum - scale_at(p + 82) * (float)msum);
    }
    return sum;
}

/* ---- IQ2_XXS ---------------------------------------------------------------- */

/* 32 bytes of 0xFF where the value of this group is negative, else 0.
 * The sign word has bit 8k+j = sign of value 8k+j (ksigns_iq2xs of
 * sub-group k: its 7 stored bits plus their parity); one byte shuffle
 * spreads byte k over bytes 8k..8k+7. */
static inline TGT __m256i iq2_signmask(uint32_t a1) {
    uint32_t w = (uint32_t)ds4_ksigns_iq2xs[a1 & 127] | (uint32_t)ds4_ksigns_iq2xs[(a1 >> 7) & 127] << 8 |
                 (uint32_t)ds4_ksigns_iq2xs[(a1 >> 14) & 127] << 16 | (uint32_t)ds4_ksigns_iq2xs[(a1 >> 21) & 127] << 24;
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
}

static inline TGT __m256i iq2_mags(uint32_t a0) {
    return _mm256_setr_epi64x((int64_t)ds4_iq2xxs_grid[a0 & 255], (int64_t)ds4_iq2xxs_grid[(a0 >> 8) & 255],
                              (int64_t)ds4_iq2xxs_grid[(a0 >> 16) & 255], (int64_t)ds4_iq2xxs_grid[a0 >> 24]);
}

/* 8 dequantized values of one sub-group: db*mag, sign applied by XOR of the
 * sign bit (exactly -v), all in registers. */
static inline TGT __m256 iq2_sub8(__m256 vdb, uint8_t g, uint8_t signs7) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i mag = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)ds4_iq2xxs_grid[g]));
    __m256i sg = _mm256_set1_epi32(ds4_ksigns_iq2xs[signs7 & 127]);
    __m256i neg = _mm256_slli_epi32(_mm256_cmpeq_epi32(_mm256_and_si256(sg, bit), bit), 31);
    return _mm256_xor_ps(_mm256_mul_ps(vdb, _mm256_cvtepi32_ps(mag)), _mm256_castsi256_ps(neg));
}

/* the 32 dequantized values of one group */
static inline TGT void iq2_group32(float db, uint32_t a0, uint32_t a1, __m256 out[4]) {
    __m256 vdb = _mm256_set1_ps(db);
    for (int k = 0; k < 4; k++) out[k] = iq2_sub8(vdb, (uint8_t)(a0 >> (8 * k)), (uint8_t)(a1 >> (7 * k)));
}

static TGT void dq_iq2_xxs(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    for (int64_t b = 0; b < n / 256; b++, p += sizeof(ds4_block_iq2_xxs), y += 256) {
        float d = scale_at(p);
        for (int g = 0; g < 8; g++) {
            uint32_t a0, a1;
            memcpy(&a0, p + 2 + 8 * g, 4);
            memcpy(&a1, p + 6 + 8 * g, 4);
            __m256 v[4];
            iq2_group32(d * (0.5f + (float)(a1 >> 28)) * 0.25f, a0, a1, v);
            for (int k = 0; k < 4; k++) _mm256_storeu_ps(y + 32 * g + 8 * k, v[k]);
        }
    }
}

static TGT float dot_iq2_xxs_f32(const void *row, const float *x, int64_t n) {
    const uint8_t *p = row;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / 256; b++, p += sizeof(ds4_block_iq2_xxs), x += 256) {
        float d = scale_at(p);
        for (int g = 0; g < 8; g++) {
            uint32_t a0, a1;
            memcpy(&a0, p + 2 + 8 * g, 4);
            memcpy(&a1, p + 6 + 8 * g, 4);
            __m256 v[4];
            iq2_group32(d * (0.5f + (float)(a1 >> 28)) * 0.25f, a0, a1, v);
            for (int k = 0; k < 4; k++) acc = _mm256_fmadd_ps(v[k], _mm256_loadu_ps(x + 32 * g + 8 * k), acc);
        }
    }
    return hsum_f32(acc);
}

static TGT float dotq_iq2_xxs(const void *row, const void *xq, int64_t n) {
    const ds4_block_q8_k *a = xq;
    const uint8_t *p = row;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / 256; b++, p += sizeof(ds4_block_iq2_xxs)) {
        __m256i acc = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            uint32_t a0, a1;
            memcpy(&a0, p + 2 + 8 * g, 4);
            memcpy(&a1, p + 6 + 8 * g, 4);
            __m256i av = _mm256_loadu_si256((const __m256i *)(a[b].qs + 32 * g));
            /* negate the activation where the weight is negative */
            __m256i m = iq2_signmask(a1);
            av = _mm256_sub_epi8(_mm256_xor_si256(av, m), m);
            __m256i prod = _mm256_maddubs_epi16(iq2_mags(a0), av);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, _mm256_set1_epi16((int16_t)(2 * (a1 >> 28) + 1))));
        }
        int bsum = hsum_i32(acc);
        sum += a[b].d * (scale_at(p) * 0.125f * (float)bsum);
    }
    return sum;
}

/* ---- activation quantization ------------------------------------------------ */

static inline TGT float amax_ps(const float *x, int n) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* q[i] = clamp(rne(x[i] * iscale), -127, 127) for 32 values */
static inline TGT void quant32(const float *x, float iscale, int8_t *q) {
    __m256 vs = _mm256_set1_ps(iscale);
    __m256i v[4];
    for (int k = 0; k < 4; k++) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
        v[k] = _mm256_cvtps_epi32(r);
    }
    /* packs work within 128-bit lanes; the permute restores the order */
    __m256i p16a = _mm256_packs_epi32(v[0], v[1]), p16b = _mm256_packs_epi32(v[2], v[3]);
    __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p8);
}

static TGT void act_q8_0(const float *x, void *dst, int64_t n) {
    uint8_t *o = dst;
    for (int64_t b = 0; b < n / 32; b++, x += 32, o += 34) {
        float amax = amax_ps(x, 32);
        float iscale = amax > 0.0f ? 127.0f / amax : 0.0f;
        uint16_t d = ds4_f32_to_f16(amax / 127.0f);
        memcpy(o, &d, 2);
        quant32(x, iscale, (int8_t *)(o + 2));
    }
}

static TGT void act_q8_k(const float *x, void *dst, int64_t n) {
    ds4_block_q8_k *o = dst;
    for (int64_t b = 0; b < n / 256; b++, x += 256) {
        float amax = amax_ps(x, 256);
        float iscale = amax > 0.0f ? 127.0f / amax : 0.0f;
        o[b].d = amax / 127.0f;
        for (int k = 0; k < 8; k++) quant32(x + 32 * k, iscale, o[b].qs + 32 * k);
        for (int k = 0; k < 16; k++) {
            /* sum of 16 int8 via sign-extension to int16 */
            __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(o[b].qs + 16 * k)));
            __m256i s = _mm256_madd_epi16(v, _mm256_set1_epi16(1));
            o[b].bsums[k] = (int16_t)hsum_i32(s);
        }
    }
}

/* ---- tiles (quant.h: bit-identical to the row dots) ------------------------
 *
 * A micro-tile computes 8 pairs (row r, token t), R rows x T tokens with
 * R * T = 8, over the whole row: lane r * T + t of one vector. Per block it
 * decodes each row's weights once for its T tokens, reduces the 8 integer
 * sums with one transpose-add tree, and combines the blocks with the row
 * dot's float operations (scale products, then the running sum), one lane
 * per pair: vector lanes round exactly like the scalar operations, so every
 * pair is bit-identical to the row dot. A tile walks its tokens in groups of
 * T = TMAX, .., 2, 1 (8 for the Q8_K types, whose weight decode is dear; 4
 * for Q8_0), converts the group's per-block activation scales once into a
 * table, and inside a group walks its rows R at a time; a short last row
 * group repeats its last row and drops those lanes. Decode (one token) runs
 * 8 rows per micro-tile. */

#define ALWAYS __attribute__((always_inline)) inline
#define TILE_MAX_BLOCKS 512 /* blocks per row a tile's scale table holds; longer rows use the row dot */

static inline uint16_t ld16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return h;
}

/* lane i = sum of the 8 lanes of v[i] (exact integer sums, so any order).
 * Unpack-and-add levels rather than hadd: vphaddd decodes to several uops
 * on Zen (and Intel), and this tree runs once per block of every tile;
 * unpacks and adds are one uop each (q8_0 prefill tile ~5% faster). */
static ALWAYS TGT __m256i hsum8x8_i32(const __m256i v[8]) {
    __m256i t[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) /* per 128-bit half: [v0 lanes 0+1, v1 0+1, v0 2+3, v1 2+3] for v = v[2i], v[2i+1] */
        t[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    /* per half: the half-sums of v[0..3] and of v[4..7] */
    __m256i u0 = _mm256_add_epi32(_mm256_unpacklo_epi64(t[0], t[1]), _mm256_unpackhi_epi64(t[0], t[1]));
    __m256i u1 = _mm256_add_epi32(_mm256_unpacklo_epi64(t[2], t[3]), _mm256_unpackhi_epi64(t[2], t[3]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* Prefetches [p, p + bytes) into L1. Decode reads each weight byte once, in
 * 8 short interleaved row streams that the hardware prefetchers follow
 * poorly (rows of 700-1100 bytes); each block step of a micro-tile fetches
 * the same share of the next row group. */
static ALWAYS TGT void prefetch_span(const uint8_t *p, size_t bytes) {
    for (size_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T0);
}

/* Lane r*T+t = the f16 at w[r] + off (row scales of a micro-tile). */
static ALWAYS TGT __m256 row_scales(const uint8_t *const *w, size_t off, int T) {
    if (T == 8) return _mm256_set1_ps(_cvtsh_ss(ld16(w[0] + off)));
    if (T == 4)
        return _mm256_setr_m128(_mm_set1_ps(_cvtsh_ss(ld16(w[0] + off))), _mm_set1_ps(_cvtsh_ss(ld16(w[1] + off))));
    if (T == 2) {
        uint64_t h = (uint64_t)ld16(w[0] + off) * 0x10001u | ((uint64_t)ld16(w[1] + off) * 0x10001u) << 32;
        uint64_t g = (uint64_t)ld16(w[2] + off) * 0x10001u | ((uint64_t)ld16(w[3] + off) * 0x10001u) << 32;
        return _mm256_cvtph_ps(_mm_set_epi64x((long long)g, (long long)h));
    }
    return _mm256_cvtph_ps(_mm_setr_epi16((short)ld16(w[0] + off), (short)ld16(w[1] + off), (short)ld16(w[2] + off),
                                          (short)ld16(w[3] + off), (short)ld16(w[4] + off), (short)ld16(w[5] + off),
                                          (short)ld16(w[6] + off), (short)ld16(w[7] + off)));
}

/* Lane r*T+t = ts[t] (a token group's scales of one block, T floats). */
static ALWAYS TGT __m256 tok_scales(const float *ts, int T) {
    if (T == 8) return _mm256_loadu_ps(ts);
    if (T == 4) return _mm256_broadcast_ps((const __m128 *)ts);
    if (T == 2) return _mm256_castpd_ps(_mm256_broadcast_sd((const double *)ts));
    return _mm256_broadcast_ss(ts);
}

/* Walks the tile (see above). MICRO(wr, xt, ts, R, T, out) computes the
 * pairs of rows wr[0..R) and tokens xt[0..T) with the group's scale table
 * ts (nb x T floats, filled by SCALES(ts, xt, T)) into out[r*T+t]. */
#define TILE_WALK(TMAX, XT, SCALES, MICRO)                                                   \
    const uint8_t *wr[8];                                                                    \
    const XT *xt[8];                                                                         \
    float out[8];                                                                            \
    float ts[TILE_MAX_BLOCKS * (TMAX)];                                                      \
    for (int t0 = 0; t0 < n_tok;) {                                                          \
        int nt = n_tok - t0;                                                                 \
        int T = nt >= 8 && (TMAX) >= 8 ? 8 : nt >= 4 ? 4 : nt >= 2 ? 2 : 1;                  \
        int R = 8 / T;                                                                       \
        for (int t = 0; t < T; t++) xt[t] = (const XT *)x[t0 + t];                           \
        SCALES(ts, xt, T);                                                                   \
        for (int r0 = 0; r0 < n_rows; r0 += R) {                                             \
            int nr = n_rows - r0 < R ? n_rows - r0 : R;                                      \
            for (int r = 0; r < R; r++) wr[r] = (const uint8_t *)w + (size_t)(r0 + (r < nr ? r : nr - 1)) * row_bytes; \
            /* decode streams the weights once: prefetch the next row group */               \
            const uint8_t *pf = (const uint8_t *)w + (size_t)(r0 + R) * row_bytes;           \
            if (T == 8) MICRO(wr, xt, ts, 1, 8, out);                                        \
            else if (T == 4) MICRO(wr, xt, ts, 2, 4, out);                                   \
            else if (T == 2) MICRO(wr, xt, ts, 4, 2, out);                                   \
            else MICRO(wr, xt, ts, 8, 1, out);                                               \
            for (int r = 0; r < nr; r++)                                                     \
                for (int t = 0; t < T; t++) y[(int64_t)(t0 + t) * ldy + r0 + r] = out[r * T + t]; \
        }                                                                                    \
        t0 += T;                                                                             \
    }

/* ---- Q8_0 tiles: R x T = 8 x 1, 4 x 2, 2 x 4 */

static ALWAYS TGT void q8_0_micro(const uint8_t *const *w, const uint8_t *const *x, const float *ts, int R, int T,
                                  int64_t nb, const uint8_t *pf, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if (T == 1) prefetch_span(pf + (size_t)b * R * sizeof(ds4_block_q8_0), R * sizeof(ds4_block_q8_0));
        const size_t o = (size_t)b * sizeof(ds4_block_q8_0);
        __m256i wv[8], av[8], p[8];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) wv[r] = _mm256_loadu_si256((const __m256i *)(w[r] + o + 2));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) av[t] = _mm256_loadu_si256((const __m256i *)(x[t] + o + 2));
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m256i aw = _mm256_sign_epi8(wv[r], wv[r]);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                p[r * T + t] = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(av[t], wv[r])), ones);
        }
        __m256 is = _mm256_cvtepi32_ps(hsum8x8_i32(p));
        /* (d_w * d_x) * isum, then the running sum, as dotq_q8_0 */
        __m256 d = _mm256_mul_ps(row_scales(w, o, T), tok_scales(ts + b * T, T));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(d, is));
    }
    _mm256_storeu_ps(out, acc);
}

/* ts[b*T + t] = the f16 scale of block b of token t, as float */
static inline TGT void q8_0_scales(float *ts, const uint8_t *const *x, int T, int64_t nb) {
    for (int64_t b = 0; b < nb; b++)
        for (int t = 0; t < T; t++) ts[b * T + t] = _cvtsh_ss(ld16(x[t] + (size_t)b * sizeof(ds4_block_q8_0)));
}

static TGT void tile_q8_0_walk(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok,
                               int64_t n, float *y, int64_t ldy) {
    const int64_t nb = n / DS4_QK8_0;
    if (nb > TILE_MAX_BLOCKS) {
        for (int t = 0; t < n_tok; t++)
            for (int r = 0; r < n_rows; r++) y[t * ldy + r] = dotq_q8_0((const uint8_t *)w + r * row_bytes, x[t], n);
        return;
    }
#define Q8_0_SCALES(ts, xt, T) q8_0_scales(ts, xt, T, nb)
#define Q8_0_MICRO(wr, xt, ts, R, T, out) q8_0_micro(wr, xt, ts, R, T, nb, pf, out)
    TILE_WALK(4, uint8_t, Q8_0_SCALES, Q8_0_MICRO)
#undef Q8_0_SCALES
#undef Q8_0_MICRO
}

/* Prefill (4 or more tokens): rows outer, two at a time, so their weights
 * stay in L1 while groups of 4 tokens stream from L2, and the scale
 * products read tables: the two rows' block scales in lane order (once per
 * row pair), the tokens' in groups of 4 (once per call). Same lanes and
 * operations as q8_0_micro with R = 2, T = 4, so the same bits. */
#define Q8_0_P_BLOCKS 256 /* rows up to 8192 values */
#define Q8_0_P_TOKENS 32 /* scale tables on the stack: 32 tokens x 256 blocks = 32 KiB */

static TGT void q8_0_micro_p(const uint8_t *w0, const uint8_t *w1, const uint8_t *const *x, const float *ws,
                             const float *ts, int64_t nb, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const size_t o = (size_t)b * sizeof(ds4_block_q8_0) + 2;
        __m256i p[8];
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w0 + o)), v1 = _mm256_loadu_si256((const __m256i *)(w1 + o));
        const __m256i a0 = _mm256_sign_epi8(v0, v0), a1 = _mm256_sign_epi8(v1, v1);
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(x[t] + o));
            p[t] = _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(a, v0)), ones);
            p[4 + t] = _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(a, v1)), ones);
        }
        __m256 is = _mm256_cvtepi32_ps(hsum8x8_i32(p));
        __m256 d = _mm256_mul_ps(_mm256_loadu_ps(ws + 8 * b), _mm256_broadcast_ps((const __m128 *)(ts + 4 * b)));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(d, is));
    }
    _mm256_storeu_ps(out, acc);
}

/* the prefill micro-tile of 2 rows x 4 tokens: x are the tokens' Q8_0 rows,
 * or with an offset micro their int8 values + 128 (32 bytes per block) */
typedef void q8_0_micro_fn(const uint8_t *w0, const uint8_t *w1, const uint8_t *const *x, const float *ws,
                           const float *ts, int64_t nb, float *out);

#define Q8_0_OFF_BYTES (128 * 1024) /* offset activations on the stack */

static TGT void tile_q8_0_with(q8_0_micro_fn *micro, bool offset, const void *w, size_t row_bytes, int n_rows,
                               const void *const *x, int n_tok, int64_t n, float *y, int64_t ldy) {
    const int64_t nb = n / DS4_QK8_0;
    int t0 = 0;
    if (n_tok >= 4 && nb <= Q8_0_P_BLOCKS) {
        float ts[Q8_0_P_TOKENS / 4][Q8_0_P_BLOCKS * 4], ws[Q8_0_P_BLOCKS * 8], out[8];
        uint8_t xo[offset ? Q8_0_OFF_BYTES : 1] __attribute__((aligned(32)));
        const uint8_t *xp[Q8_0_P_TOKENS];
        /* token groups per pass: the scale tables, and the offset copies */
        int max_ng = Q8_0_P_TOKENS / 4;
        if (offset && max_ng > (int)(Q8_0_OFF_BYTES / (nb * 32) / 4)) max_ng = (int)(Q8_0_OFF_BYTES / (nb * 32) / 4);
        const __m256i k80 = _mm256_set1_epi8((char)0x80);
        while (t0 + 4 <= n_tok) {
            int ng = (n_tok - t0) / 4 < max_ng ? (n_tok - t0) / 4 : max_ng;
            for (int k = 0; k < ng; k++) q8_0_scales(ts[k], (const uint8_t *const *)(x + t0 + 4 * k), 4, nb);
            for (int t = 0; t < 4 * ng; t++) {
                const uint8_t *xt = (const uint8_t *)x[t0 + t];
                if (!offset) {
                    xp[t] = xt;
                    continue;
                }
                uint8_t *o = xo + (size_t)t * nb * 32;
                for (int64_t b = 0; b < nb; b++)
                    _mm256_store_si256((__m256i *)(o + 32 * b),
                                       _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(xt + 34 * b + 2)), k80));
                xp[t] = o;
            }
            for (int r = 0; r < n_rows; r += 2) {
                const uint8_t *w0 = (const uint8_t *)w + (size_t)r * row_bytes;
                const uint8_t *w1 = r + 1 < n_rows ? w0 + row_bytes : w0;
                for (int64_t b = 0; b < nb; b++) {
                    float d0 = _cvtsh_ss(ld16(w0 + (size_t)b * sizeof(ds4_block_q8_0)));
                    float d1 = _cvtsh_ss(ld16(w1 + (size_t)b * sizeof(ds4_block_q8_0)));
                    for (int i = 0; i < 4; i++) ws[8 * b + i] = d0, ws[8 * b + 4 + i] = d1;
                }
                for (int k = 0; k < ng; k++) {
                    micro(w0, w1, xp + 4 * k, ws, ts[k], nb, out);
                    for (int t = 0; t < 4; t++) {
                        y[(int64_t)(t0 + 4 * k + t) * ldy + r] = out[t];
                        if (r + 1 < n_rows) y[(int64_t)(t0 + 4 * k + t) * ldy + r + 1] = out[4 + t];
                    }
                }
            }
            t0 += 4 * ng;
        }
    }
    if (t0 < n_tok) tile_q8_0_walk(w, row_bytes, n_rows, x + t0, n_tok - t0, n, y + (int64_t)t0 * ldy, ldy);
}

static TGT void tile_q8_0(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok, int64_t n,
                          float *y, int64_t ldy) {
    tile_q8_0_with(q8_0_micro_p, false, w, row_bytes, n_rows, x, n_tok, n, y, ldy);
}

/* ---- Q8_K tiles (IQ2_XXS, Q2_K, Q4_K): R x T = 8 x 1, 4 x 2, 2 x 4, 1 x 8 */

/* Q8_K block b of activation row x */
#define ACT_K(x, b) ((const ds4_block_q8_k *)(x) + (b))

static inline void q8_k_scales(float *ts, const ds4_block_q8_k *const *x, int T, int64_t nb) {
    for (int64_t b = 0; b < nb; b++)
        for (int t = 0; t < T; t++) ts[b * T + t] = x[t][b].d;
}

#define Q8K_TILE(NAME, MICRO_FN, ROW_DOT)                                                                      \
    static TGT void NAME(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok,         \
                         int64_t n, float *y, int64_t ldy) {                                                   \
        const int64_t nb = n / DS4_QK_K;                                                                       \
        if (nb > TILE_MAX_BLOCKS) {                                                                            \
            for (int t = 0; t < n_tok; t++)                                                                    \
                for (int r = 0; r < n_rows; r++)                                                               \
                    y[t * ldy + r] = ROW_DOT((const uint8_t *)w + r * row_bytes, x[t], n);                     \
            return;                                                                                            \
        }                                                                                                      \
        TILE_WALK(8, ds4_block_q8_k, Q8K_SCALES, Q8K_MICRO_##MICRO_FN)                                         \
    }
#define Q8K_SCALES(ts, xt, T) q8_k_scales(ts, xt, T, nb)

/* ±1 bytes of the 8 signs of IQ2_XXS sign index s: byte j = -1 when bit j of
 * ds4_ksigns_iq2xs[s] (s | parity << 7) is set, else +1 (for sign_epi8). */
#define KS_B(s, j) ((((s) >> (j)) & 1) ? 0xffull : 0x01ull)
#define KS_P(s) (((s) ^ (s) >> 1 ^ (s) >> 2 ^ (s) >> 3 ^ (s) >> 4 ^ (s) >> 5 ^ (s) >> 6) & 1)
#define KS8(s) (KS_B(s, 0) | KS_B(s, 1) << 8 | KS_B(s, 2) << 16 | KS_B(s, 3) << 24 | KS_B(s, 4) << 32 | \
                KS_B(s, 5) << 40 | KS_B(s, 6) << 48 | (KS_P(s) ? 0xffull : 0x01ull) << 56)
#define KS4(s) KS8(s), KS8((s) + 1), KS8((s) + 2), KS8((s) + 3)
#define KS16(s) KS4(s), KS4((s) + 4), KS4((s) + 8), KS4((s) + 12)
#define KS64(s) KS16(s), KS16((s) + 16), KS16((s) + 32), KS16((s) + 48)
static const uint64_t iq2_signs64[128] = {KS64(0), KS64(64)};

/* The signs of two sub-groups at once: entry i = iq2_signs64[i & 127] then
 * iq2_signs64[i >> 7], for the 14 low or the next 14 bits of a group's sign
 * word. One 16-byte load replaces two shifts, two masks and two 8-byte
 * lookups; 256 KiB, built once (ds4_quant_avx2_init) and read-only after. */
static uint64_t iq2_signs128[1 << 14][2] __attribute__((aligned(16)));

void ds4_quant_avx2_init(void) {
    for (int i = 0; i < 1 << 14; i++) {
        iq2_signs128[i][0] = iq2_signs64[i & 127];
        iq2_signs128[i][1] = iq2_signs64[i >> 7];
    }
}

/* the ±1 sign bytes of a group from its sign word a1 */
static inline TGT __m256i iq2_group_signs(uint32_t a1) {
    return _mm256_loadu2_m128i((const __m128i *)iq2_signs128[(a1 >> 14) & 0x3fff],
                               (const __m128i *)iq2_signs128[a1 & 0x3fff]);
}
/* 2 * ls + 1 in every int16 lane, for the 16 group scales ls */
#define SC16(v) {v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}
static const int16_t iq2_scale16[16][16] __attribute__((aligned(32))) = {
    SC16(1), SC16(3), SC16(5), SC16(7), SC16(9), SC16(11), SC16(13), SC16(15),
    SC16(17), SC16(19), SC16(21), SC16(23), SC16(25), SC16(27), SC16(29), SC16(31)};

static ALWAYS TGT void iq2_xxs_micro(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int R,
                                     int T, int64_t nb, const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if (T == 1) prefetch_span(pf + (size_t)b * R * sizeof(ds4_block_iq2_xxs), R * sizeof(ds4_block_iq2_xxs));
        const size_t o = (size_t)b * sizeof(ds4_block_iq2_xxs);
        __m256i s[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            /* one row (T = 8) reads each activation once: no preload (registers) */
            __m256i av[8];
#pragma GCC unroll 8
            for (int t = 0; t < T && R > 1; t++) av[t] = _mm256_loadu_si256((const __m256i *)(x[t][b].qs + 32 * g));
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint32_t a1;
                memcpy(&a1, q + 4, 4);
                __m256i mag = _mm256_setr_epi64x((long long)ds4_iq2xxs_grid[q[0]], (long long)ds4_iq2xxs_grid[q[1]],
                                                 (long long)ds4_iq2xxs_grid[q[2]], (long long)ds4_iq2xxs_grid[q[3]]);
                __m256i sg = iq2_group_signs(a1);
                __m256i scl = _mm256_load_si256((const __m256i *)iq2_scale16[a1 >> 28]);
#pragma GCC unroll 8
                for (int t = 0; t < T; t++) {
                    __m256i a = R > 1 ? av[t] : _mm256_loadu_si256((const __m256i *)(x[t][b].qs + 32 * g));
                    __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, sg));
                    s[r * T + t] = _mm256_add_epi32(s[r * T + t], _mm256_madd_epi16(prod, scl));
                }
            }
        }
        __m256 bs = _mm256_cvtepi32_ps(hsum8x8_i32(s));
        /* a.d * ((d * 0.125f) * bsum), then the running sum, as dotq_iq2_xxs */
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(row_scales(w, o, T), _mm256_set1_ps(0.125f)), bs);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(tok_scales(ts + b * T, T), v));
    }
    _mm256_storeu_ps(out, acc);
}
#define Q8K_MICRO_iq2_xxs(wr, xt, ts, R, T, out) iq2_xxs_micro(wr, xt, ts, R, T, nb, pf, out)
Q8K_TILE(tile_iq2_walk, iq2_xxs, dotq_iq2_xxs)

/* Prefill: a row decoded once for many tokens. The lookups that build a
 * group's magnitudes and signs cost more than the group's whole product with
 * one token, so with 8 or more tokens each row is expanded once (signed
 * weights, 2*ls+1 and d per block, on the stack) and then multiplied with
 * groups of 8 tokens.
 *
 * No sign instruction per (row, token): maddubs needs an unsigned operand,
 * so the tokens' int8 values a are offset once per tile call to a + 128
 * (0x80 XOR: exactly a + 128 for every int8, 0..255) and multiplied with
 * the signed weights w (|w| <= 43: pair sums <= 2 * 255 * 43, no saturation).
 * sum (a + 128) * w * s = sum a * w * s + 128 * sum w * s, and the second
 * term is the row's alone (corr, per block, from the expansion), so the
 * block's integer sum is exactly dotq_iq2_xxs's, and the float combination
 * is iq2_xxs_micro's: the same bits. */
#define IQ2_X_BLOCKS 32 /* rows up to 8192 values expand on the stack (experts: 4096) */
#define IQ2_X_TOKENS 32 /* tokens per row expansion, fewer for rows over 4096 values */
#define IQ2_X_OFF_BYTES (32 * 16 * DS4_QK_K) /* offset activations on the stack: 128 KiB */

typedef struct iq2_row_x {
    __m256i w[IQ2_X_BLOCKS * 8]; /* signed weights of group g of block b at [8b + g] */
    int16_t scl[IQ2_X_BLOCKS * 8];
    int32_t corr[IQ2_X_BLOCKS];  /* 128 * sum_g scl_g * sum of group g's weights */
    float d[IQ2_X_BLOCKS];
} iq2_row_x;

static TGT void iq2_xxs_expand(const uint8_t *row, int64_t nb, iq2_row_x *e) {
    const __m256i ones = _mm256_set1_epi8(1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = row + (size_t)b * sizeof(ds4_block_iq2_xxs);
        e->d[b] = _cvtsh_ss(ld16(p));
        __m256i c = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const uint8_t *q = p + 2 + 8 * g;
            uint32_t a1;
            memcpy(&a1, q + 4, 4);
            __m256i mag = _mm256_setr_epi64x((long long)ds4_iq2xxs_grid[q[0]], (long long)ds4_iq2xxs_grid[q[1]],
                                             (long long)ds4_iq2xxs_grid[q[2]], (long long)ds4_iq2xxs_grid[q[3]]);
            __m256i w = _mm256_sign_epi8(mag, iq2_group_signs(a1));
            int16_t scl = (int16_t)(2 * (a1 >> 28) + 1);
            e->w[b * 8 + g] = w;
            e->scl[b * 8 + g] = scl;
            c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(ones, w), _mm256_set1_epi16(scl)));
        }
        e->corr[b] = 128 * hsum_i32(c);
    }
}

/* out[t] = the row dot of expanded row e with tokens xo[0..8) (offset
 * activations, nb * 256 bytes each; ts: [b][8] scales) */
static TGT void iq2_xxs_micro_x(const iq2_row_x *e, const uint8_t *const *xo, const float *ts, int64_t nb,
                                float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i s[8];
        /* tokens 4 at a time over the block: 4 accumulators stay in registers */
#pragma GCC unroll 2
        for (int h = 0; h < 8; h += 4) {
#pragma GCC unroll 4
            for (int t = h; t < h + 4; t++) s[t] = _mm256_setzero_si256();
            for (int g = 0; g < 8; g++) {
                const __m256i w = e->w[b * 8 + g];
                const __m256i scl = _mm256_set1_epi16(e->scl[b * 8 + g]);
#pragma GCC unroll 4
                for (int t = h; t < h + 4; t++) {
                    __m256i a = _mm256_loadu_si256((const __m256i *)(xo[t] + 256 * b + 32 * g));
                    s[t] = _mm256_add_epi32(s[t], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), scl));
                }
            }
        }
        __m256i is = _mm256_sub_epi32(hsum8x8_i32(s), _mm256_set1_epi32(e->corr[b]));
        __m256 bs = _mm256_cvtepi32_ps(is);
        /* a.d * ((d * 0.125f) * bsum), then the running sum, as dotq_iq2_xxs */
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(e->d[b]), _mm256_set1_ps(0.125f)), bs);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(ts + b * 8), v));
    }
    _mm256_storeu_ps(out, acc);
}

static TGT void tile_iq2_xxs(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok, int64_t n,
                             float *y, int64_t ldy) {
    const int64_t nb = n / DS4_QK_K;
    int t0 = 0;
    if (n_tok >= 8 && nb <= IQ2_X_BLOCKS) {
        iq2_row_x e;
        float ts[IQ2_X_TOKENS / 8][IQ2_X_BLOCKS * 8], out[8];
        uint8_t xo[IQ2_X_OFF_BYTES] __attribute__((aligned(32)));
        const uint8_t *xp[IQ2_X_TOKENS];
        const __m256i off = _mm256_set1_epi8((char)0x80);
        /* groups of 8 tokens per expansion: as many as the buffers hold */
        int max_ng = (int)(IQ2_X_OFF_BYTES / (nb * DS4_QK_K) / 8);
        if (max_ng > IQ2_X_TOKENS / 8) max_ng = IQ2_X_TOKENS / 8;
        for (; t0 + 8 <= n_tok;) {
            int ng = (n_tok - t0) / 8 < max_ng ? (n_tok - t0) / 8 : max_ng;
            for (int t = 0; t < 8 * ng; t++) {
                const ds4_block_q8_k *xt = x[t0 + t];
                uint8_t *xot = xo + (size_t)t * nb * DS4_QK_K;
                for (int64_t b = 0; b < nb; b++) {
                    ts[t / 8][b * 8 + t % 8] = xt[b].d;
                    for (int i = 0; i < DS4_QK_K; i += 32)
                        _mm256_store_si256((__m256i *)(xot + 256 * b + i),
                                           _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(xt[b].qs + i)), off));
                }
                xp[t] = xot;
            }
            for (int r = 0; r < n_rows; r++) {
                iq2_xxs_expand((const uint8_t *)w + (size_t)r * row_bytes, nb, &e);
                for (int k = 0; k < ng; k++) {
                    iq2_xxs_micro_x(&e, xp + 8 * k, ts[k], nb, out);
                    for (int t = 0; t < 8; t++) y[(int64_t)(t0 + 8 * k + t) * ldy + r] = out[t];
                }
            }
            t0 += 8 * ng;
        }
    }
    if (t0 < n_tok) tile_iq2_walk(w, row_bytes, n_rows, x + t0, n_tok - t0, n, y + (int64_t)t0 * ldy, ldy);
}

/* Q2_K: byte shuffles putting the scale of sub-block 2p (values 0..15 of
 * piece p, 32 values) in the int16 lanes of the low half and that of 2p+1 in
 * the high half (odd bytes -1: zero). */
#define Q2C8(j) j, -1, j, -1, j, -1, j, -1, j, -1, j, -1, j, -1, j, -1
#define Q2CTL(p) {Q2C8(2 * (p)), Q2C8(2 * (p) + 1)}
static const int8_t q2k_ctl[8][32] __attribute__((aligned(32))) = {Q2CTL(0), Q2CTL(1), Q2CTL(2), Q2CTL(3),
                                                                   Q2CTL(4), Q2CTL(5), Q2CTL(6), Q2CTL(7)};

/* a.d * (d * isum - dmin * msum), then the running sum (dotq_q2_k, dotq_q4_k):
 * isum and msum lanes per pair */
static ALWAYS TGT __m256 kquant_combine(__m256 acc, __m256i isum, __m256i msum, const uint8_t *const *w, size_t o_d,
                                        size_t o_dmin, const float *ts, int T) {
    __m256 fi = _mm256_cvtepi32_ps(isum), fm = _mm256_cvtepi32_ps(msum);
    __m256 v = _mm256_sub_ps(_mm256_mul_ps(row_scales(w, o_d, T), fi), _mm256_mul_ps(row_scales(w, o_dmin, T), fm));
    return _mm256_add_ps(acc, _mm256_mul_ps(tok_scales(ts, T), v));
}

static ALWAYS TGT void q2_k_micro(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int R,
                                  int T, int64_t nb, const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i m3 = _mm256_set1_epi8(3), m15 = _mm256_set1_epi8(15);
    for (int64_t b = 0; b < nb; b++) {
        if (T == 1) prefetch_span(pf + (size_t)b * R * sizeof(ds4_block_q2_k), R * sizeof(ds4_block_q2_k));
        const size_t o = (size_t)b * sizeof(ds4_block_q2_k);
        /* msum = sum_j (sc_j >> 4) * bsums_j, reduced before the isum pass
         * (8 accumulators at a time fit the registers) */
        __m256i v[8];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m128i sc = _mm_loadu_si128((const __m128i *)(w[r] + o));
            __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), _mm256_castsi256_si128(m15)));
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                v[r * T + t] = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)x[t][b].bsums));
        }
        const __m256i msum = hsum8x8_i32(v);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const uint8_t *p = w[r] + o;
            __m256i scl16 = _mm256_and_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)), m15);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) v[r * T + t] = _mm256_setzero_si256();
            for (int h = 0; h < 2; h++) {
                __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * h));
                for (int k = 0; k < 4; k++) {
                    __m256i lv = _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * k), m3);
                    __m256i scl = _mm256_shuffle_epi8(scl16, _mm256_load_si256((const __m256i *)q2k_ctl[4 * h + k]));
#pragma GCC unroll 8
                    for (int t = 0; t < T; t++) {
                        __m256i prod =
                            _mm256_maddubs_epi16(lv, _mm256_loadu_si256((const __m256i *)(x[t][b].qs + 128 * h + 32 * k)));
                        v[r * T + t] = _mm256_add_epi32(v[r * T + t], _mm256_madd_epi16(prod, scl));
                    }
                }
            }
        }
        acc = kquant_combine(acc, hsum8x8_i32(v), msum, w, o + 80, o + 82, ts + b * T, T);
    }
    _mm256_storeu_ps(out, acc);
}
#define Q8K_MICRO_q2_k(wr, xt, ts, R, T, out) q2_k_micro(wr, xt, ts, R, T, nb, pf, out)
Q8K_TILE(tile_q2_k, q2_k, dotq_q2_k)

static ALWAYS TGT void q4_k_micro(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int R,
                                  int T, int64_t nb, const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i m15 = _mm256_set1_epi8(15);
    for (int64_t b = 0; b < nb; b++) {
        if (T == 1) prefetch_span(pf + (size_t)b * R * sizeof(ds4_block_q4_k), R * sizeof(ds4_block_q4_k));
        const size_t o = (size_t)b * sizeof(ds4_block_q4_k);
        int sc[8][8];
        __m256i v[8];
        /* msum = sum_j m_j * (bsums[2j] + bsums[2j+1]) (m_j in int16 lanes 2j,
         * 2j+1), reduced before the isum pass */
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            int m[8];
            for (int j = 0; j < 8; j++) q4k_sm(w[r] + o + 4, j, &sc[r][j], &m[j]);
            __m256i mins = _mm256_setr_epi16((short)m[0], (short)m[0], (short)m[1], (short)m[1], (short)m[2],
                                             (short)m[2], (short)m[3], (short)m[3], (short)m[4], (short)m[4],
                                             (short)m[5], (short)m[5], (short)m[6], (short)m[6], (short)m[7],
                                             (short)m[7]);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                v[r * T + t] = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)x[t][b].bsums));
        }
        const __m256i msum = hsum8x8_i32(v);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const uint8_t *p = w[r] + o;
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) v[r * T + t] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * c));
                __m256i lo = _mm256_and_si256(bytes, m15), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m15);
                __m256i s0 = _mm256_set1_epi16((short)sc[r][2 * c]), s1 = _mm256_set1_epi16((short)sc[r][2 * c + 1]);
#pragma GCC unroll 8
                for (int t = 0; t < T; t++) {
                    const int8_t *aq = x[t][b].qs + 64 * c;
                    __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)aq));
                    __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(aq + 32)));
                    v[r * T + t] = _mm256_add_epi32(v[r * T + t], _mm256_madd_epi16(p0, s0));
                    v[r * T + t] = _mm256_add_epi32(v[r * T + t], _mm256_madd_epi16(p1, s1));
                }
            }
        }
        acc = kquant_combine(acc, hsum8x8_i32(v), msum, w, o, o + 2, ts + b * T, T);
    }
    _mm256_storeu_ps(out, acc);
}
#define Q8K_MICRO_q4_k(wr, xt, ts, R, T, out) q4_k_micro(wr, xt, ts, R, T, nb, pf, out)
Q8K_TILE(tile_q4_k, q4_k, dotq_q4_k)

/* Plain types: two tokens per weight load, each with PLAIN_DOT's four
 * accumulators, tail loop and final sum. */
#define PLAIN_TILE(NAME, DOT, LOAD8, SCALAR_AT)                                                              \
    static TGT void NAME(const void *w, size_t row_bytes, int n_rows, const float *const *x, int n_tok,   \
                         int64_t n, float *y, int64_t ldy) {                                              \
        for (int t0 = 0; t0 < n_tok; t0 += 2) {                                                           \
            const float *x0 = x[t0], *x1 = x[t0 + 1 < n_tok ? t0 + 1 : t0];                               \
            if (t0 + 1 == n_tok) { /* a last single token: the row dot itself */                          \
                for (int r = 0; r < n_rows; r++)                                                          \
                    y[(int64_t)t0 * ldy + r] = DOT((const uint8_t *)w + (size_t)r * row_bytes, x0, n);    \
                break;                                                                                    \
            }                                                                                             \
            for (int r = 0; r < n_rows; r++) {                                                            \
                const uint8_t *p = (const uint8_t *)w + (size_t)r * row_bytes;                            \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
                int64_t i = 0;                                                                            \
                for (; i + 32 <= n; i += 32) {                                                            \
                    __m256 w0 = LOAD8(p, i), w1 = LOAD8(p, i + 8), w2 = LOAD8(p, i + 16), w3 = LOAD8(p, i + 24); \
                    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + i), a0);                                \
                    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x0 + i + 8), a1);                            \
                    a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x0 + i + 16), a2);                           \
                    a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x0 + i + 24), a3);                           \
                    b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + i), b0);                                \
                    b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + i + 8), b1);                            \
                    b2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x1 + i + 16), b2);                           \
                    b3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x1 + i + 24), b3);                           \
                }                                                                                         \
                for (; i + 8 <= n; i += 8) {                                                              \
                    __m256 w0 = LOAD8(p, i);                                                              \
                    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + i), a0);                                \
                    b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + i), b0);                                \
                }                                                                                         \
                float s0 = hsum_f32(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));         \
                float s1 = hsum_f32(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));         \
                for (; i < n; i++) {                                                                      \
                    float wv = SCALAR_AT(p, i);                                                           \
                    s0 += wv * x0[i];                                                                     \
                    s1 += wv * x1[i];                                                                     \
                }                                                                                         \
                y[(int64_t)t0 * ldy + r] = s0;                                                            \
                if (t0 + 1 < n_tok) y[(int64_t)(t0 + 1) * ldy + r] = s1;                                  \
            }                                                                                             \
        }                                                                                                 \
    }

PLAIN_TILE(tile_f32_f32, dot_f32_f32, LOAD_F32, f32_at)
PLAIN_TILE(tile_f16_f32, dot_f16_f32, LOAD_F16, f16_idx)
PLAIN_TILE(tile_bf16_f32, dot_bf16_f32, LOAD_BF16, bf16_idx)


/* ---- AVX-512 VNNI tiles ------------------------------------------------------ */

/* vpdpbusd / vpdpwssd on 256-bit registers (AVX512-VNNI + VL): the same
 * exact integer block sums as the AVX2 tiles in fewer instructions, the same
 * float combination, so the same bits. Selected at run time by quant.c when
 * the CPU has them (DS4_SIMD_VNNI). */
#define TGT_VNNI __attribute__((target("avx2,fma,f16c,bmi,bmi2,avx512f,avx512vl,avx512bw,avx512vnni")))

/* q8_0_micro_p with offset activations a + 128 (unsigned) against the
 * signed weights: vpdpbusd sums 4 products per int32 lane with no int16
 * stage, and each lane starts from -128 * (the weights' sum), so the lane
 * holds sum a * w exactly: one instruction per (row, token) instead of
 * sign + maddubs + madd. */
static TGT_VNNI void q8_0_micro_v(const uint8_t *w0, const uint8_t *w1, const uint8_t *const *xo, const float *ws,
                                  const float *ts, int64_t nb, float *out) {
    const __m256i k80 = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const size_t o = (size_t)b * sizeof(ds4_block_q8_0) + 2;
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w0 + o)), v1 = _mm256_loadu_si256((const __m256i *)(w1 + o));
        const __m256i c0 = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, k80, v0));
        const __m256i c1 = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, k80, v1));
        __m256i p[8];
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
            const __m256i a = _mm256_load_si256((const __m256i *)(xo[t] + 32 * b));
            p[t] = _mm256_dpbusd_epi32(c0, a, v0);
            p[4 + t] = _mm256_dpbusd_epi32(c1, a, v1);
        }
        __m256 is = _mm256_cvtepi32_ps(hsum8x8_i32(p));
        __m256 d = _mm256_mul_ps(_mm256_loadu_ps(ws + 8 * b), _mm256_broadcast_ps((const __m128 *)(ts + 4 * b)));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(d, is));
    }
    _mm256_storeu_ps(out, acc);
}

/* Groups of 8 tokens, one per int32 lane: for block b and dword j of the
 * 32 values, a register holds the 4 offset bytes (a + 128) of each of the 8
 * tokens, so a row's dword j broadcast to all lanes and vpdpbusd add 4
 * products to each token's sum: 8 instructions give 8 tokens' whole block
 * sums, with no horizontal sum. A lane starts from -128 * the row's block
 * sum of weights, so it ends at sum a * w exactly; the float combination is
 * the row dot's ((d_w * d_x) * isum, then the running sum). */
#define Q8_0_V_TOKENS 64 /* tokens per pass (8 groups): 64 x 8192 bytes at most */

/* the transposed layout of 8 tokens' 32-byte chunks src[t]: 8 registers
 * of [token t: bytes 4j..4j+3] (+ 128 with offset), stored at xi[stride j] */
static ALWAYS TGT_VNNI void lanes8s(const uint8_t *const *src, uint8_t *xi, bool offset, size_t stride) {
    const __m256i k80 = _mm256_set1_epi8(offset ? (char)0x80 : 0);
    __m256i r[8], t[8], u[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) r[i] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)src[i]), k80);
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);     /* j0 j1 | j4 j5 of tokens 2i, 2i+1 */
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]); /* j2 j3 | j6 j7 */
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) { /* tokens 4h..4h+3 */
        u[4 * h] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);         /* j0 | j4 */
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);     /* j1 | j5 */
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]); /* j2 | j6 */
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]); /* j3 | j7 */
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        _mm256_store_si256((__m256i *)(xi + stride * j), _mm256_permute2x128_si256(u[j], u[4 + j], 0x20));
        _mm256_store_si256((__m256i *)(xi + stride * (j + 4)), _mm256_permute2x128_si256(u[j], u[4 + j], 0x31));
    }
}
static ALWAYS TGT_VNNI void lanes8(const uint8_t *const *src, uint8_t *xi, bool offset) { lanes8s(src, xi, offset, 32); }

/* 4 rows x 8 tokens: out[r][t]; xi: the group's layout (256 bytes per
 * block), ts: its scales [b][8], nc / dw: the rows' -128 * block weight sums
 * and block scales [r][b] */
static TGT_VNNI void q8_0_micro_lanes(const uint8_t *const *w, const uint8_t *xi, const float *ts, const int32_t *nc,
                                      const float *dw, int64_t nb, float out[4][8]) {
    __m256 acc[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i a[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) a[j] = _mm256_load_si256((const __m256i *)(xi + 256 * b + 32 * j));
        const __m256 tsv = _mm256_loadu_ps(ts + 8 * b);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const uint8_t *q = w[r] + (size_t)b * sizeof(ds4_block_q8_0) + 2;
            __m256i p0 = _mm256_set1_epi32(nc[r * Q8_0_P_BLOCKS + b]), p1 = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int j = 0; j < 8; j += 2) {
                int32_t w0, w1;
                memcpy(&w0, q + 4 * j, 4);
                memcpy(&w1, q + 4 * j + 4, 4);
                p0 = _mm256_dpbusd_epi32(p0, a[j], _mm256_set1_epi32(w0));
                p1 = _mm256_dpbusd_epi32(p1, a[j + 1], _mm256_set1_epi32(w1));
            }
            const __m256 is = _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
            const __m256 d = _mm256_mul_ps(_mm256_set1_ps(dw[r * Q8_0_P_BLOCKS + b]), tsv);
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(d, is));
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) _mm256_storeu_ps(out[r], acc[r]);
}

static TGT_VNNI void tile_q8_0_vnni(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok,
                                    int64_t n, float *y, int64_t ldy) {
    const int64_t nb = n / DS4_QK8_0;
    int t0 = 0;
    if (n_tok >= 8 && nb <= Q8_0_P_BLOCKS) {
        uint8_t xi[Q8_0_OFF_BYTES] __attribute__((aligned(32)));
        float ts[Q8_0_V_TOKENS / 8][Q8_0_P_BLOCKS * 8], dw[4 * Q8_0_P_BLOCKS], out[4][8];
        int32_t nc[4 * Q8_0_P_BLOCKS];
        int max_ng = (int)(Q8_0_OFF_BYTES / (nb * 256));
        if (max_ng > Q8_0_V_TOKENS / 8) max_ng = Q8_0_V_TOKENS / 8;
        const __m256i k80 = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
        while (t0 + 8 <= n_tok) {
            const int ng = (n_tok - t0) / 8 < max_ng ? (n_tok - t0) / 8 : max_ng;
            for (int g = 0; g < ng; g++) {
                const uint8_t *const *xg = (const uint8_t *const *)(x + t0 + 8 * g);
                q8_0_scales(ts[g], xg, 8, nb);
                for (int64_t b = 0; b < nb; b++) {
                    const uint8_t *src[8];
                    for (int t = 0; t < 8; t++) src[t] = xg[t] + (size_t)b * sizeof(ds4_block_q8_0) + 2;
                    lanes8(src, xi + ((size_t)g * nb + b) * 256, true);
                }
            }
            for (int r0 = 0; r0 < n_rows; r0 += 4) {
                const uint8_t *wr[4];
                for (int r = 0; r < 4; r++) {
                    wr[r] = (const uint8_t *)w + (size_t)(r0 + r < n_rows ? r0 + r : n_rows - 1) * row_bytes;
                    for (int64_t b = 0; b < nb; b++) {
                        const uint8_t *q = wr[r] + (size_t)b * sizeof(ds4_block_q8_0);
                        dw[r * Q8_0_P_BLOCKS + b] = _cvtsh_ss(ld16(q));
                        __m256i s = _mm256_dpbusd_epi32(zero, k80, _mm256_loadu_si256((const __m256i *)(q + 2)));
                        nc[r * Q8_0_P_BLOCKS + b] = -hsum_i32(s);
                    }
                }
                for (int g = 0; g < ng; g++) {
                    q8_0_micro_lanes(wr, xi + (size_t)g * nb * 256, ts[g], nc, dw, nb, out);
                    for (int r = 0; r < 4 && r0 + r < n_rows; r++)
                        for (int t = 0; t < 8; t++) y[(int64_t)(t0 + 8 * g + t) * ldy + r0 + r] = out[r][t];
                }
            }
            t0 += 8 * ng;
        }
    }
    if (t0 < n_tok)
        tile_q8_0_with(q8_0_micro_v, true, w, row_bytes, n_rows, x + t0, n_tok - t0, n, y + (int64_t)t0 * ldy, ldy);
}

/* IQ2_XXS in token lanes (see Q8_0 above): 4 expanded rows' group g (32
 * signed weights each) against 8 tokens' offset values, vpdpbusd per dword,
 * the group scale by vpmulld; each block's integer sum minus the row's
 * offset correction is iq2_xxs_micro_x's, and so is the float part. */
static TGT_VNNI void iq2_xxs_micro_lanes(const iq2_row_x *const *e, const uint8_t *xi, const float *ts, int64_t nb,
                                         float out[4][8]) {
    __m256 acc[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i is[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) is[r] = _mm256_set1_epi32(-e[r]->corr[b]);
        for (int g = 0; g < 8; g++) {
            const uint8_t *xg = xi + (size_t)(8 * b + g) * 256;
            __m256i a[8];
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) a[j] = _mm256_load_si256((const __m256i *)(xg + 32 * j));
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                const int32_t *wg = (const int32_t *)&e[r]->w[b * 8 + g];
                __m256i p0 = _mm256_setzero_si256(), p1 = _mm256_setzero_si256();
#pragma GCC unroll 4
                for (int j = 0; j < 8; j += 2) {
                    p0 = _mm256_dpbusd_epi32(p0, a[j], _mm256_set1_epi32(wg[j]));
                    p1 = _mm256_dpbusd_epi32(p1, a[j + 1], _mm256_set1_epi32(wg[j + 1]));
                }
                is[r] = _mm256_add_epi32(
                    is[r], _mm256_mullo_epi32(_mm256_add_epi32(p0, p1), _mm256_set1_epi32(e[r]->scl[b * 8 + g])));
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            __m256 bs = _mm256_cvtepi32_ps(is[r]);
            __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(e[r]->d[b]), _mm256_set1_ps(0.125f)), bs);
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_loadu_ps(ts + b * 8), v));
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) _mm256_storeu_ps(out[r], acc[r]);
}

/* Decode (one token) at the VNNI level: the 8-row walk of iq2_xxs_micro
 * (R = 8, T = 1) two groups per 512-bit step. The 8 grid entries by one
 * gather; the 64 sign bits from the 4 x 7 stored bits of each group by pdep
 * plus their per-byte parity (ds4_ksigns_iq2xs[s] = s | parity(s) << 7) into
 * a mask register that negates the activations (as sign_epi8 with the +-1
 * bytes does); maddubs/madd with the group scales as in iq2_xxs_micro.
 * Each block's integer sum is the same integer, the float part the same
 * operations, so the values are iq2_xxs_micro's bit for bit. */
static TGT_VNNI void iq2_xxs_micro512(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts,
                                      int64_t nb, const uint8_t *pf, float *out) {
    const __m128i pick = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * sizeof(ds4_block_iq2_xxs), 8 * sizeof(ds4_block_iq2_xxs));
        const size_t o = (size_t)b * sizeof(ds4_block_iq2_xxs);
        __m512i av[4];
        for (int gp = 0; gp < 4; gp++) av[gp] = _mm512_loadu_si512((const void *)(x[0][b].qs + 64 * gp));
        int32_t bsum[8] __attribute__((aligned(32)));
        for (int r = 0; r < 8; r++) {
            const uint8_t *q = w[r] + o + 2;
            __m512i s = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int gp = 0; gp < 4; gp++) {
                const uint8_t *qg = q + 16 * gp;
                const __m512i idx = _mm512_cvtepu8_epi64(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)qg), pick));
                const __m512i mag = _mm512_i64gather_epi64(idx, (const void *)ds4_iq2xxs_grid, 8);
                uint32_t a1g, a1h;
                memcpy(&a1g, qg + 4, 4);
                memcpy(&a1h, qg + 12, 4);
                uint64_t sb = _pdep_u64((uint64_t)(a1g & 0x0fffffffu) | (uint64_t)(a1h & 0x0fffffffu) << 28,
                                        0x7f7f7f7f7f7f7f7full);
                uint64_t t = sb ^ sb >> 4;
                t ^= t >> 2;
                t ^= t >> 1;
                sb |= (t & 0x0101010101010101ull) << 7;
                const __m512i a = _mm512_mask_sub_epi8(av[gp], _cvtu64_mask64(sb), _mm512_setzero_si512(), av[gp]);
                const __m512i scl =
                    _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256((const __m256i *)iq2_scale16[a1g >> 28])),
                                       _mm256_load_si256((const __m256i *)iq2_scale16[a1h >> 28]), 1);
                s = _mm512_add_epi32(s, _mm512_madd_epi16(_mm512_maddubs_epi16(mag, a), scl));
            }
            bsum[r] = _mm512_reduce_add_epi32(s);
        }
        __m256 bs = _mm256_cvtepi32_ps(_mm256_load_si256((const __m256i *)bsum));
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(row_scales(w, o, 1), _mm256_set1_ps(0.125f)), bs);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(tok_scales(ts + b, 1), v));
    }
    _mm256_storeu_ps(out, acc);
}
/* Decode (one token) with AVX-512 VBMI (ds4_quant_vbmi): the lookups of
 * iq2_xxs_micro512 as byte permutes on tables held in registers, for two
 * rows at a time (64 grid entries = one zmm of indices):
 * - the grid: each entry's 8 magnitudes {8, 25, 43} as 2-bit codes, 16 bits
 *   per entry split in a low and a high byte table (256 bytes each = 2 x 2
 *   vpermi2b + a blend on index bit 7), interleaved to words once; per 8
 *   entries (64 weights) a word permute places entry j's code in qword j,
 *   a multishift puts code j in byte j's low bits, a permute maps the code
 *   to its magnitude;
 * - the signs: a multishift puts each 7-bit sign field in a byte, one
 *   vpermi2b on ds4_ksigns_iq2xs (128 bytes) completes the parity bit; the
 *   sign bytes of 8 entries are the 64-bit mask that negates the
 *   activations (as the gather walk does), loaded from memory;
 * - the group scales 2 * ls + 1 as int16 lanes by a permute of the block's
 *   qwords shifted right by 60.
 * maddubs + madd as the other walks: each block's integer sum is the same
 * integer (exact), the float part the same operations: the bits of
 * iq2_xxs_micro512. build/dev/iq2_ab (one core of a Sapphire Rapids VM):
 * 7.2 GB/s of weights from L2 and 6.5 streaming, against 5.6 / 5.3 for the
 * gather walk (AVX2 walk 5.3 / 4.7). */
static uint8_t iq2_code_lo[256] __attribute__((aligned(64))), iq2_code_hi[256] __attribute__((aligned(64)));

void ds4_quant_vbmi_init(void) {
    for (int i = 0; i < 256; i++) {
        unsigned c = 0;
        for (int j = 0; j < 8; j++) {
            unsigned v = (unsigned)(ds4_iq2xxs_grid[i] >> 8 * j) & 0xff;
            c |= (v == 8 ? 0u : v == 25 ? 1u : 2u) << 2 * j; /* the grid holds only 8, 25, 43 */
        }
        iq2_code_lo[i] = (uint8_t)c, iq2_code_hi[i] = (uint8_t)(c >> 8);
    }
}

/* a mask register loaded from memory (kmovq k, m64): the compiler would
 * otherwise forward the store through a general register */
static inline __attribute__((always_inline)) __mmask64 kload(const uint64_t *p) {
    __mmask64 k;
    __asm__("kmovq %1, %0" : "=k"(k) : "m"(*p));
    return k;
}

#define TGT_VBMI __attribute__((target("avx2,fma,f16c,bmi,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi")))

static TGT_VBMI void iq2_xxs_micro_vbmi(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts,
                                        int64_t nb, const uint8_t *pf, float *out) {
    const __m512i L0 = _mm512_load_si512(iq2_code_lo), L1 = _mm512_load_si512(iq2_code_lo + 64);
    const __m512i L2 = _mm512_load_si512(iq2_code_lo + 128), L3 = _mm512_load_si512(iq2_code_lo + 192);
    const __m512i H0 = _mm512_load_si512(iq2_code_hi), H1 = _mm512_load_si512(iq2_code_hi + 64);
    const __m512i H2 = _mm512_load_si512(iq2_code_hi + 128), H3 = _mm512_load_si512(iq2_code_hi + 192);
    const __m512i K0 = _mm512_loadu_si512(ds4_ksigns_iq2xs), K1 = _mm512_loadu_si512(ds4_ksigns_iq2xs + 64);
    uint8_t ctl[4][64] __attribute__((aligned(64)));
    for (int i = 0; i < 64; i++) {
        const int e = i & 31, src = 8 * (e >> 2) + (e & 3) + (i & 32 ? 64 : 0);
        ctl[0][i] = (uint8_t)src;                            /* entry e's index (rows A, B) */
        ctl[1][i] = (uint8_t)((i & 7) < 4 ? 32 + 7 * (i & 7) : 0); /* sign fields to bytes 0..3 of a qword */
        ctl[2][i] = (uint8_t)(2 * (i & 7));                  /* code j of a qword to byte j */
        ctl[3][i] = (uint8_t)((i & 3) == 0 ? 8 : (i & 3) == 1 ? 25 : (i & 3) == 2 ? 43 : 0); /* code -> magnitude */
    }
    const __m512i IDX = _mm512_load_si512(ctl[0]), SGF = _mm512_load_si512(ctl[1]);
    const __m512i CODE = _mm512_load_si512(ctl[2]), MAG = _mm512_load_si512(ctl[3]);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * sizeof(ds4_block_iq2_xxs), 8 * sizeof(ds4_block_iq2_xxs));
        const size_t o = (size_t)b * sizeof(ds4_block_iq2_xxs);
        __m512i av[4];
        for (int c = 0; c < 4; c++) av[c] = _mm512_loadu_si512((const void *)(x[0][b].qs + 64 * c));
        __m256i bsum[8];
        for (int r = 0; r < 8; r += 2) {
            const __m512i qa = _mm512_loadu_si512((const void *)(w[r] + o + 2));
            const __m512i qb = _mm512_loadu_si512((const void *)(w[r + 1] + o + 2));
            /* the 64 grid indices (row A's 32, then B's), their codes */
            const __m512i idx = _mm512_permutex2var_epi8(qa, IDX, qb);
            const __mmask64 top = _mm512_movepi8_mask(idx);
            const __m512i lo = _mm512_mask_mov_epi8(_mm512_permutex2var_epi8(L0, idx, L1), top,
                                                    _mm512_permutex2var_epi8(L2, idx, L3));
            const __m512i hi = _mm512_mask_mov_epi8(_mm512_permutex2var_epi8(H0, idx, H1), top,
                                                    _mm512_permutex2var_epi8(H2, idx, H3));
            /* the 16-bit codes as words: 128-bit lane L of wl holds entries 16L..16L+7, of wh 16L+8..16L+15 */
            const __m512i wl = _mm512_unpacklo_epi8(lo, hi), wh = _mm512_unpackhi_epi8(lo, hi);
            /* the 64 sign bytes, entry order */
            const __m512i sf = _mm512_permutex2var_epi8(_mm512_multishift_epi64_epi8(SGF, qa), IDX,
                                                        _mm512_multishift_epi64_epi8(SGF, qb));
            uint64_t sg[8] __attribute__((aligned(64)));
            _mm512_store_si512((void *)sg, _mm512_permutex2var_epi8(K0, sf, K1));
            /* 2 * ls + 1 in byte 0 of each group's qword */
            const __m512i sca = _mm512_or_si512(_mm512_slli_epi64(_mm512_srli_epi64(qa, 60), 1), _mm512_set1_epi64(1));
            const __m512i scb = _mm512_or_si512(_mm512_slli_epi64(_mm512_srli_epi64(qb, 60), 1), _mm512_set1_epi64(1));
            __m512i s[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                /* qword j: the code of entry 8c + j (word 8(c >> 1) + j of wl or wh) */
                const __m512i qw = _mm512_permutexvar_epi16(
                    _mm512_add_epi64(_mm512_set1_epi64(8 * (c >> 1)), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)),
                    c & 1 ? wh : wl);
                const __m512i mag = _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(CODE, qw), MAG);
                const __m512i a = _mm512_mask_sub_epi8(av[c & 3], kload(&sg[c]), _mm512_setzero_si512(),
                                                       av[c & 3]);
                /* words 0..15: group 2(c&3), 16..31: group 2(c&3)+1 (qwords of the row) */
                const int g = 2 * (c & 3);
                const __m512i gsel =
                    _mm512_mask_blend_epi64(0xf0, _mm512_set1_epi64((long long)(0x0808080808080808ull * (uint64_t)g)),
                                            _mm512_set1_epi64((long long)(0x0808080808080808ull * (uint64_t)(g + 1))));
                /* bytes 2i = 8 * group (the scale), 2i + 1 = 8 * group + 1 (zero) */
                const __m512i sidx = _mm512_or_si512(gsel, _mm512_set1_epi16(0x0100));
                const __m512i scl = _mm512_permutexvar_epi8(sidx, c < 4 ? sca : scb);
                s[c >> 2] = _mm512_add_epi32(s[c >> 2], _mm512_madd_epi16(_mm512_maddubs_epi16(mag, a), scl));
            }
            bsum[r] = _mm256_add_epi32(_mm512_castsi512_si256(s[0]), _mm512_extracti64x4_epi64(s[0], 1));
            bsum[r + 1] = _mm256_add_epi32(_mm512_castsi512_si256(s[1]), _mm512_extracti64x4_epi64(s[1], 1));
        }
        __m256 bs = _mm256_cvtepi32_ps(hsum8x8_i32(bsum));
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(row_scales(w, o, 1), _mm256_set1_ps(0.125f)), bs);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(tok_scales(ts + b, 1), v));
    }
    _mm256_storeu_ps(out, acc);
}

int ds4_quant_vbmi; /* quant.c: this CPU runs AVX-512 VBMI (0 in tests that check the other walk) */

#define Q8K_MICRO_iq2_xxs512(wr, xt, ts, R, T, out)                           \
    do {                                                                       \
        if ((T) == 1 && ds4_quant_vbmi) iq2_xxs_micro_vbmi(wr, xt, ts, nb, pf, out); \
        else if ((T) == 1) iq2_xxs_micro512(wr, xt, ts, nb, pf, out);          \
        else iq2_xxs_micro(wr, xt, ts, R, T, nb, pf, out);                     \
    } while (0)
Q8K_TILE(tile_iq2_walk512, iq2_xxs512, dotq_iq2_xxs)

static TGT_VNNI void tile_iq2_xxs_vnni(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok,
                                       int64_t n, float *y, int64_t ldy) {
    const int64_t nb = n / DS4_QK_K;
    int t0 = 0;
    if (n_tok >= 8 && nb <= IQ2_X_BLOCKS) {
        iq2_row_x ex[4];
        const iq2_row_x *ep[4];
        float ts[IQ2_X_TOKENS / 8][IQ2_X_BLOCKS * 8], out[4][8];
        uint8_t xi[IQ2_X_OFF_BYTES] __attribute__((aligned(32)));
        int max_ng = (int)(IQ2_X_OFF_BYTES / (nb * DS4_QK_K) / 8);
        if (max_ng > IQ2_X_TOKENS / 8) max_ng = IQ2_X_TOKENS / 8;
        while (t0 + 8 <= n_tok) {
            const int ng = (n_tok - t0) / 8 < max_ng ? (n_tok - t0) / 8 : max_ng;
            for (int g = 0; g < ng; g++) {
                const ds4_block_q8_k *xt[8];
                for (int t = 0; t < 8; t++) xt[t] = (const ds4_block_q8_k *)x[t0 + 8 * g + t];
                for (int64_t b = 0; b < nb; b++) {
                    for (int t = 0; t < 8; t++) ts[g][b * 8 + t] = xt[t][b].d;
                    for (int c = 0; c < 8; c++) {
                        const uint8_t *src[8];
                        for (int t = 0; t < 8; t++) src[t] = (const uint8_t *)xt[t][b].qs + 32 * c;
                        lanes8(src, xi + (((size_t)g * nb + b) * 8 + c) * 256, true);
                    }
                }
            }
            for (int r0 = 0; r0 < n_rows; r0 += 4) {
                const int nr = n_rows - r0 < 4 ? n_rows - r0 : 4;
                for (int r = 0; r < 4; r++) {
                    if (r < nr) iq2_xxs_expand((const uint8_t *)w + (size_t)(r0 + r) * row_bytes, nb, &ex[r]);
                    ep[r] = &ex[r < nr ? r : 0];
                }
                for (int g = 0; g < ng; g++) {
                    iq2_xxs_micro_lanes(ep, xi + (size_t)g * nb * 8 * 256, ts[g], nb, out);
                    for (int r = 0; r < nr; r++)
                        for (int t = 0; t < 8; t++) y[(int64_t)(t0 + 8 * g + t) * ldy + r0 + r] = out[r][t];
                }
            }
            t0 += 8 * ng;
        }
    }
    if (t0 < n_tok) tile_iq2_walk512(w, row_bytes, n_rows, x + t0, n_tok - t0, n, y + (int64_t)t0 * ldy, ldy);
}

/* Q2_K in token lanes: a row expanded once per pass into bytes q * sc
 * (<= 45, unsigned) in value order and its group mins as int16 pairs; the
 * tokens' int8 values and bsums in token lanes (no offset: the weights are
 * the unsigned operand). isum = sum (q * sc) * a by vpdpbusd, msum = sum
 * min * bsum by vpdpwssd: quant.c's integers; then kquant_combine's float
 * expression (dotq_q2_k). */
typedef struct q2k_row_x {
    uint8_t wq[IQ2_X_BLOCKS][DS4_QK_K] __attribute__((aligned(32)));
    int32_t mn[IQ2_X_BLOCKS][8]; /* mins of groups 2i, 2i+1 as int16 pairs */
    float d[IQ2_X_BLOCKS], dmin[IQ2_X_BLOCKS];
} q2k_row_x;

static TGT_VNNI void q2_k_expand(const uint8_t *row, int64_t nb, q2k_row_x *e) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = row + (size_t)b * sizeof(ds4_block_q2_k);
        e->d[b] = scale_at(p + 80);
        e->dmin[b] = scale_at(p + 82);
        for (int i = 0; i < 8; i++)
            e->mn[b][i] = (int32_t)((uint32_t)(p[2 * i] >> 4) | (uint32_t)(p[2 * i + 1] >> 4) << 16);
        for (int h = 0; h < 2; h++) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * h));
            for (int k = 0; k < 4; k++) {
                /* q * sc by table lookup: low 16 values take group 8h + 2k's scale, high 16 the next */
                const int s0 = p[8 * h + 2 * k] & 15, s1 = p[8 * h + 2 * k + 1] & 15;
                const __m256i tab = _mm256_setr_epi8(0, (char)s0, (char)(2 * s0), (char)(3 * s0), 0, 0, 0, 0, 0, 0, 0, 0,
                                                     0, 0, 0, 0, 0, (char)s1, (char)(2 * s1), (char)(3 * s1), 0, 0, 0, 0,
                                                     0, 0, 0, 0, 0, 0, 0, 0);
                const __m256i lv = _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * k), m3);
                _mm256_store_si256((__m256i *)(e->wq[b] + 128 * h + 32 * k), _mm256_shuffle_epi8(tab, lv));
            }
        }
    }
}

/* 4 rows x 8 tokens; xi: per block 64 value registers then 8 bsum registers */
static TGT_VNNI void q2_k_micro_lanes(const q2k_row_x *const *e, const uint8_t *xi, const float *ts, int64_t nb,
                                      float out[4][8]) {
    __m256 acc[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *xb = xi + (size_t)b * (64 + 8) * 32;
        __m256i i0[4], i1[4], ms[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) i0[r] = i1[r] = ms[r] = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int j = 0; j < 64; j += 2) {
            const __m256i a0 = _mm256_load_si256((const __m256i *)(xb + 32 * j));
            const __m256i a1 = _mm256_load_si256((const __m256i *)(xb + 32 * j + 32));
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                const int32_t *wq = (const int32_t *)e[r]->wq[b];
                i0[r] = _mm256_dpbusd_epi32(i0[r], _mm256_set1_epi32(wq[j]), a0);
                i1[r] = _mm256_dpbusd_epi32(i1[r], _mm256_set1_epi32(wq[j + 1]), a1);
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            const __m256i bs = _mm256_load_si256((const __m256i *)(xb + 32 * (64 + i)));
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) ms[r] = _mm256_dpwssd_epi32(ms[r], bs, _mm256_set1_epi32(e[r]->mn[b][i]));
        }
        const __m256 tsv = _mm256_loadu_ps(ts + 8 * b);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m256 fi = _mm256_cvtepi32_ps(_mm256_add_epi32(i0[r], i1[r])), fm = _mm256_cvtepi32_ps(ms[r]);
            const __m256 v = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(e[r]->d[b]), fi),
                                           _mm256_mul_ps(_mm256_set1_ps(e[r]->dmin[b]), fm));
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(tsv, v));
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) _mm256_storeu_ps(out[r], acc[r]);
}

static TGT_VNNI void tile_q2_k_vnni(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok,
                                    int64_t n, float *y, int64_t ldy) {
    const int64_t nb = n / DS4_QK_K;
    int t0 = 0;
    if (n_tok >= 8 && nb <= IQ2_X_BLOCKS) {
        q2k_row_x ex[4];
        const q2k_row_x *ep[4];
        float ts[IQ2_X_TOKENS / 8][IQ2_X_BLOCKS * 8], out[4][8];
        uint8_t xi[IQ2_X_OFF_BYTES] __attribute__((aligned(32)));
        const size_t per_group = (size_t)nb * (64 + 8) * 32;
        int max_ng = (int)(IQ2_X_OFF_BYTES / per_group);
        if (max_ng > IQ2_X_TOKENS / 8) max_ng = IQ2_X_TOKENS / 8;
        while (t0 + 8 <= n_tok) {
            const int ng = (n_tok - t0) / 8 < max_ng ? (n_tok - t0) / 8 : max_ng;
            for (int g = 0; g < ng; g++) {
                const ds4_block_q8_k *xt[8];
                for (int t = 0; t < 8; t++) xt[t] = (const ds4_block_q8_k *)x[t0 + 8 * g + t];
                for (int64_t b = 0; b < nb; b++) {
                    uint8_t *xb = xi + g * per_group + (size_t)b * (64 + 8) * 32;
                    const uint8_t *src[8];
                    for (int t = 0; t < 8; t++) ts[g][b * 8 + t] = xt[t][b].d;
                    for (int c = 0; c < 8; c++) {
                        for (int t = 0; t < 8; t++) src[t] = (const uint8_t *)xt[t][b].qs + 32 * c;
                        lanes8(src, xb + 256 * c, false);
                    }
                    for (int t = 0; t < 8; t++) src[t] = (const uint8_t *)xt[t][b].bsums;
                    lanes8(src, xb + 64 * 32, false);
                }
            }
            for (int r0 = 0; r0 < n_rows; r0 += 4) {
                const int nr = n_rows - r0 < 4 ? n_rows - r0 : 4;
                for (int r = 0; r < 4; r++) {
                    if (r < nr) q2_k_expand((const uint8_t *)w + (size_t)(r0 + r) * row_bytes, nb, &ex[r]);
                    ep[r] = &ex[r < nr ? r : 0];
                }
                for (int g = 0; g < ng; g++) {
                    q2_k_micro_lanes(ep, xi + g * per_group, ts[g], nb, out);
                    for (int r = 0; r < nr; r++)
                        for (int t = 0; t < 8; t++) y[(int64_t)(t0 + 8 * g + t) * ldy + r0 + r] = out[r][t];
                }
            }
            t0 += 8 * ng;
        }
    }
    if (t0 < n_tok) tile_q2_k(w, row_bytes, n_rows, x + t0, n_tok - t0, n, y + (int64_t)t0 * ldy, ldy);
}

/* entries merged over the AVX2 set */
const ds4_quant_kernels ds4_quant_vnni_table[] = {
    {DS4_TYPE_Q8_0, DS4_TYPE_Q8_0, NULL, NULL, NULL, NULL, tile_q8_0_vnni, NULL},
    {DS4_TYPE_IQ2_XXS, DS4_TYPE_Q8_K, NULL, NULL, NULL, NULL, tile_iq2_xxs_vnni, NULL},
    {DS4_TYPE_Q2_K, DS4_TYPE_Q8_K, NULL, NULL, NULL, NULL, tile_q2_k_vnni, NULL},
};
const int ds4_quant_vnni_n = sizeof ds4_quant_vnni_table / sizeof ds4_quant_vnni_table[0];

/* ---- AMX tiles ---------------------------------------------------------------- */

/* Q8_0 on AMX-INT8: one TDPBSSD per block gives the exact int32 block sums
 * of 16 rows x 16 tokens (A: the rows' 32 code bytes, read in place with
 * the row stride; B: the 16 tokens' codes in the token-lane layout above,
 * no offset: signed x signed), stored and combined per lane as the row dot
 * does ((d_w * d_x) * isum, then the running sum): the same bits. Two sets
 * of tiles alternate so the next block's product overlaps this block's
 * float work. Used where the CPU has AMX-INT8 and Linux grants the tile
 * state (quant.c, DS4_SIMD_AMX); leftover rows and tokens take the VNNI
 * tile. */
#define TGT_AMX __attribute__((target("avx2,fma,f16c,bmi,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,amx-tile,amx-int8")))
#define Q8_0_A_TOKENS 64 /* tokens per pass: 4 groups of 16 */

typedef struct amx_cfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_cfg;

/* A per-thread buffer for the tiles' token layouts, kept between calls (a
 * fresh allocation per call measured 20-30% slower: page faults) and freed
 * when the thread ends; NULL when it cannot grow (the caller then takes a
 * tile that needs none). */
static pthread_key_t tile_buf_key;
static pthread_once_t tile_buf_once = PTHREAD_ONCE_INIT;
static int tile_buf_ok;
typedef struct tile_buf {
    size_t cap;
    void *p;
} tile_buf;
static void tile_buf_free(void *v) {
    tile_buf *b = v;
    free(b->p);
    free(b);
}
static void tile_buf_init(void) { tile_buf_ok = pthread_key_create(&tile_buf_key, tile_buf_free) == 0; }
static void *tile_scratch(size_t bytes) {
    pthread_once(&tile_buf_once, tile_buf_init);
    if (!tile_buf_ok) return NULL;
    tile_buf *b = pthread_getspecific(tile_buf_key);
    if (!b) {
        if (!(b = calloc(1, sizeof *b))) return NULL;
        if (pthread_setspecific(tile_buf_key, b)) {
            free(b);
            return NULL;
        }
    }
    if (b->cap < bytes) {
        void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!p) return NULL;
        free(b->p);
        b->p = p;
        b->cap = bytes;
    }
    return b->p;
}

/* 16 tokens' 32-byte chunks src[t] as one B tile of TDPBSSD: 8 rows of
 * [16 tokens x 4 bytes] (tokens 0-7 then 8-15 in each 64-byte row) */
static ALWAYS TGT_AMX void lanes16(const uint8_t *const *src, uint8_t *xi) {
    lanes8s(src, xi, false, 64);
    lanes8s(src + 8, xi + 32, false, 64);
}

/* Q8_K block b of 16 tokens x[0..16): their scales to ts[16 b ..], their
 * 256 codes as 8 B tiles of 32 values at xb + 512 j (a 64-value product
 * reads two consecutive ones as one 16-row tile) */
static ALWAYS TGT_AMX void q8_k_lanes16(const void *const *x, int64_t b, float *ts, uint8_t *xb) {
    const ds4_block_q8_k *xt[16];
    for (int t = 0; t < 16; t++) {
        xt[t] = (const ds4_block_q8_k *)x[t] + b;
        ts[16 * b + t] = xt[t]->d;
    }
    for (int j = 0; j < 8; j++) {
        const uint8_t *src[16];
        for (int t = 0; t < 16; t++) src[t] = (const uint8_t *)xt[t]->qs + 32 * j;
        lanes16(src, xb + 512 * j);
    }
}

/* rows r0..r0+15 of tokens t..t+15 (y at token t, row r0): acc[r] holds
 * row r's 16 token lanes */
static ALWAYS TGT_AMX void amx_store16(const __m512 acc[16], float *y, int64_t ldy) {
    for (int r = 0; r < 16; r++) {
        float o[16];
        _mm512_storeu_ps(o, acc[r]);
        for (int t = 0; t < 16; t++) y[(int64_t)t * ldy + r] = o[t];
    }
}

typedef void tile_fn(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok, int64_t n, float *y,
                     int64_t ldy);

/* After an AMX tile did rows [0, rows16) of tokens [0, t0): the last rows of
 * those tokens, then every row of the tokens left, by the VNNI tile */
static void amx_rest(tile_fn *vnni, const void *w, size_t row_bytes, int n_rows, int rows16, const void *const *x,
                     int t0, int n_tok, int64_t n, float *y, int64_t ldy) {
    if (t0 > 0 && rows16 < n_rows)
        vnni((const uint8_t *)w + (size_t)rows16 * row_bytes, row_bytes, n_rows - rows16, x, t0, n, y + rows16, ldy);
    if (t0 < n_tok) vnni(w, row_bytes, n_rows, x + t0, n_tok - t0, n, y + (int64_t)t0 * ldy, ldy);
}

static ALWAYS TGT_AMX void q8_0_amx_epilogue(const int32_t (*cb)[16], const float *dw, int64_t nb, int64_t b,
                                              const float *ts, __m512 acc[16]) {
    const __m512 tsv = _mm512_loadu_ps(ts + 16 * b);
#pragma GCC unroll 16
    for (int r = 0; r < 16; r++) {
        const __m512 is = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)cb[r]));
        const __m512 d = _mm512_mul_ps(_mm512_set1_ps(dw[r * nb + b]), tsv);
        acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(d, is));
    }
}

static TGT_AMX void tile_q8_0_amx(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok,
                                  int64_t n, float *y, int64_t ldy) {
    const int64_t nb = n / DS4_QK8_0;
    const int rows16 = n_rows / 16 * 16;
    int t0 = 0;
    uint8_t *xi = n_tok >= 16 && rows16 > 0 && nb <= Q8_0_P_BLOCKS ? tile_scratch(Q8_0_OFF_BYTES) : NULL;
    if (xi) {
        amx_cfg cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int k = 0; k < 2; k++) { /* C (16 x 16 int32), A (16 rows x 32 codes), B (8 x 16 tokens x 4) */
            cfg.rows[3 * k] = 16, cfg.colsb[3 * k] = 64;
            cfg.rows[3 * k + 1] = 16, cfg.colsb[3 * k + 1] = 32;
            cfg.rows[3 * k + 2] = 8, cfg.colsb[3 * k + 2] = 64;
        }
        _tile_loadconfig(&cfg);
        float ts[Q8_0_A_TOKENS / 16][Q8_0_P_BLOCKS * 16], dw[16 * Q8_0_P_BLOCKS];
        int32_t cb[2][16][16] __attribute__((aligned(64)));
        int max_ng = (int)(Q8_0_OFF_BYTES / (nb * 512));
        if (max_ng > Q8_0_A_TOKENS / 16) max_ng = Q8_0_A_TOKENS / 16;
        while (t0 + 16 <= n_tok) {
            const int ng = (n_tok - t0) / 16 < max_ng ? (n_tok - t0) / 16 : max_ng;
            for (int g = 0; g < ng; g++) {
                const uint8_t *const *xg = (const uint8_t *const *)(x + t0 + 16 * g);
                for (int64_t b = 0; b < nb; b++) {
                    const uint8_t *src[16];
                    for (int t = 0; t < 16; t++) {
                        src[t] = xg[t] + (size_t)b * sizeof(ds4_block_q8_0);
                        ts[g][16 * b + t] = _cvtsh_ss(ld16(src[t]));
                        src[t] += 2;
                    }
                    lanes16(src, xi + ((size_t)g * nb + b) * 512);
                }
            }
            for (int r0 = 0; r0 < rows16; r0 += 16) {
                const uint8_t *w0 = (const uint8_t *)w + (size_t)r0 * row_bytes + 2;
                for (int r = 0; r < 16; r++)
                    for (int64_t b = 0; b < nb; b++)
                        dw[r * nb + b] = _cvtsh_ss(ld16(w0 - 2 + (size_t)r * row_bytes + (size_t)b * sizeof(ds4_block_q8_0)));
                for (int g = 0; g < ng; g++) {
                    const uint8_t *xg = xi + (size_t)g * nb * 512;
                    __m512 acc[16];
#pragma GCC unroll 16
                    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
                    for (int64_t b = 0; b < nb; b++) {
                        const uint8_t *wb = w0 + (size_t)b * sizeof(ds4_block_q8_0), *xb = xg + (size_t)b * 512;
                        if (b & 1) {
                            _tile_zero(3);
                            _tile_loadd(4, wb, (long)row_bytes);
                            _tile_loadd(5, xb, 64);
                            _tile_dpbssd(3, 4, 5);
                            _tile_stored(3, cb[1], 64);
                        } else {
                            _tile_zero(0);
                            _tile_loadd(1, wb, (long)row_bytes);
                            _tile_loadd(2, xb, 64);
                            _tile_dpbssd(0, 1, 2);
                            _tile_stored(0, cb[0], 64);
                        }
                        if (b > 0) q8_0_amx_epilogue((const int32_t(*)[16])cb[(b - 1) & 1], dw, nb, b - 1, ts[g], acc);
                    }
                    q8_0_amx_epilogue((const int32_t(*)[16])cb[(nb - 1) & 1], dw, nb, nb - 1, ts[g], acc);
                    amx_store16(acc, y + (int64_t)(t0 + 16 * g) * ldy + r0, ldy);
                }
            }
            t0 += 16 * ng;
        }
        _tile_release();
    }
    amx_rest(tile_q8_0_vnni, w, row_bytes, n_rows, rows16, x, t0, n_tok, n, y, ldy);
}

/* Q2_K on AMX-INT8 (rows up to 2048 values: the experts' down projection):
 * 16 rows expanded once per call to int8 q * sc and to their group mins
 * broadcast over the group's 16 values (both <= 45), so one block's isum is
 * the product of the first with the tokens' codes and its msum (sum min *
 * bsum) the product of the second; 4 TDPBSSD of 64 values each per
 * matrix, then kquant_combine's float expression per lane: the same bits. */
#define Q2K_A_BLOCKS 8
#define Q2K_A_TOKENS 64

typedef struct q2k_row_a {
    int8_t wq[Q2K_A_BLOCKS][DS4_QK_K], wm[Q2K_A_BLOCKS][DS4_QK_K];
    float d[Q2K_A_BLOCKS], dmin[Q2K_A_BLOCKS];
} q2k_row_a;

static TGT_AMX void q2_k_expand_a(const uint8_t *row, int64_t nb, q2k_row_a *e) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = row + (size_t)b * sizeof(ds4_block_q2_k);
        e->d[b] = scale_at(p + 80);
        e->dmin[b] = scale_at(p + 82);
        for (int j = 0; j < 16; j++) memset(e->wm[b] + 16 * j, p[j] >> 4, 16);
        for (int h = 0; h < 2; h++) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * h));
            for (int k = 0; k < 4; k++) {
                const int s0 = p[8 * h + 2 * k] & 15, s1 = p[8 * h + 2 * k + 1] & 15;
                const __m256i tab = _mm256_setr_epi8(0, (char)s0, (char)(2 * s0), (char)(3 * s0), 0, 0, 0, 0, 0, 0, 0, 0,
                                                     0, 0, 0, 0, 0, (char)s1, (char)(2 * s1), (char)(3 * s1), 0, 0, 0, 0,
                                                     0, 0, 0, 0, 0, 0, 0, 0);
                const __m256i lv = _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * k), m3);
                _mm256_storeu_si256((__m256i *)(e->wq[b] + 128 * h + 32 * k), _mm256_shuffle_epi8(tab, lv));
            }
        }
    }
}

static TGT_AMX void tile_q2_k_amx(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok,
                                  int64_t n, float *y, int64_t ldy) {
    const int64_t nb = n / DS4_QK_K;
    const int rows16 = n_rows / 16 * 16;
    int t0 = 0;
    uint8_t *xi = n_tok >= 16 && rows16 > 0 && nb <= Q2K_A_BLOCKS
                      ? tile_scratch((size_t)Q2K_A_TOKENS / 16 * Q2K_A_BLOCKS * 4 * 1024)
                      : NULL;
    if (xi) {
        amx_cfg cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int k = 0; k < 5; k++) cfg.rows[k] = 16, cfg.colsb[k] = 64; /* Ci, Cm, Aq, Am, B */
        _tile_loadconfig(&cfg);
        q2k_row_a ex[16];
        float ts[Q2K_A_TOKENS / 16][Q2K_A_BLOCKS * 16];
        int32_t ci[16][16] __attribute__((aligned(64))), cm[16][16] __attribute__((aligned(64)));
        while (t0 + 16 <= n_tok) {
            const int ng = (n_tok - t0) / 16 < Q2K_A_TOKENS / 16 ? (n_tok - t0) / 16 : Q2K_A_TOKENS / 16;
            /* B: per block, 4 chunks of 64 values: 16 rows of [16 tokens x 4 codes] */
            for (int g = 0; g < ng; g++)
                for (int64_t b = 0; b < nb; b++) q8_k_lanes16(x + t0 + 16 * g, b, ts[g], xi + ((size_t)g * nb + b) * 4096);
            for (int r0 = 0; r0 < rows16; r0 += 16) {
                for (int r = 0; r < 16; r++) q2_k_expand_a((const uint8_t *)w + (size_t)(r0 + r) * row_bytes, nb, &ex[r]);
                for (int g = 0; g < ng; g++) {
                    __m512 acc[16];
#pragma GCC unroll 16
                    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
                    for (int64_t b = 0; b < nb; b++) {
                        _tile_zero(0);
                        _tile_zero(1);
                        for (int c = 0; c < 4; c++) {
                            _tile_loadd(4, xi + (((size_t)g * nb + b) * 4 + c) * 1024, 64);
                            _tile_loadd(2, ex[0].wq[b] + 64 * c, (long)sizeof(q2k_row_a));
                            _tile_loadd(3, ex[0].wm[b] + 64 * c, (long)sizeof(q2k_row_a));
                            _tile_dpbssd(0, 2, 4);
                            _tile_dpbssd(1, 3, 4);
                        }
                        _tile_stored(0, ci, 64);
                        _tile_stored(1, cm, 64);
                        const __m512 tsv = _mm512_loadu_ps(ts[g] + 16 * b);
#pragma GCC unroll 16
                        for (int r = 0; r < 16; r++) {
                            const __m512 fi = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)ci[r]));
                            const __m512 fm = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)cm[r]));
                            const __m512 v = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ex[r].d[b]), fi),
                                                           _mm512_mul_ps(_mm512_set1_ps(ex[r].dmin[b]), fm));
                            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(tsv, v));
                        }
                    }
                    amx_store16(acc, y + (int64_t)(t0 + 16 * g) * ldy + r0, ldy);
                }
            }
            t0 += 16 * ng;
        }
        _tile_release();
    }
    amx_rest(tile_q2_k_vnni, w, row_bytes, n_rows, rows16, x, t0, n_tok, n, y, ldy);
}

/* IQ2_XXS on AMX-INT8 (rows up to 4096 values: the experts' gate and up):
 * 16 rows expanded once per pass (iq2_xxs_expand: signed weights, group
 * scales), one TDPBSSD per 32-value group (16 rows x 16 tokens, signed x
 * signed: no offset), the group scale by vpmulld into the block's exact
 * isum, then iq2_xxs_micro_x's float expression per lane: the same bits. */
#define IQ2_A_BLOCKS 16
#define IQ2_A_TOKENS 64

typedef struct iq2_row_a {
    int8_t w[IQ2_A_BLOCKS][DS4_QK_K];
    int32_t scl[IQ2_A_BLOCKS][8];
    float d[IQ2_A_BLOCKS];
} iq2_row_a;

static TGT_AMX void tile_iq2_xxs_amx(const void *w, size_t row_bytes, int n_rows, const void *const *x, int n_tok,
                                     int64_t n, float *y, int64_t ldy) {
    const int64_t nb = n / DS4_QK_K;
    const int rows16 = n_rows / 16 * 16;
    int t0 = 0;
    /* the token layouts: 256 KiB for 64 tokens, per thread */
    uint8_t *xi = n_tok >= 16 && rows16 > 0 && nb <= IQ2_A_BLOCKS
                      ? tile_scratch((size_t)IQ2_A_TOKENS / 16 * IQ2_A_BLOCKS * 8 * 512)
                      : NULL;
    if (xi) {
        amx_cfg cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        cfg.rows[0] = 16, cfg.colsb[0] = 64; /* C: 16 rows x 16 tokens */
        cfg.rows[1] = 16, cfg.colsb[1] = 32; /* A: 16 rows x 32 weights */
        cfg.rows[2] = 8, cfg.colsb[2] = 64;  /* B: 8 x [16 tokens x 4 codes] */
        _tile_loadconfig(&cfg);
        iq2_row_a ra[16];
        iq2_row_x e;
        float ts[IQ2_A_TOKENS / 16][IQ2_A_BLOCKS * 16];
        int32_t cb[8][16][16] __attribute__((aligned(64)));
        while (t0 + 16 <= n_tok) {
            const int ng = (n_tok - t0) / 16 < IQ2_A_TOKENS / 16 ? (n_tok - t0) / 16 : IQ2_A_TOKENS / 16;
            for (int g = 0; g < ng; g++)
                for (int64_t b = 0; b < nb; b++) q8_k_lanes16(x + t0 + 16 * g, b, ts[g], xi + ((size_t)g * nb + b) * 4096);
            for (int r0 = 0; r0 < rows16; r0 += 16) {
                for (int r = 0; r < 16; r++) {
                    iq2_xxs_expand((const uint8_t *)w + (size_t)(r0 + r) * row_bytes, nb, &e);
                    for (int64_t b = 0; b < nb; b++) {
                        memcpy(ra[r].w[b], &e.w[b * 8], DS4_QK_K);
                        for (int c = 0; c < 8; c++) ra[r].scl[b][c] = e.scl[b * 8 + c];
                        ra[r].d[b] = e.d[b];
                    }
                }
                for (int g = 0; g < ng; g++) {
                    __m512 acc[16];
#pragma GCC unroll 16
                    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
                    for (int64_t b = 0; b < nb; b++) {
                        for (int c = 0; c < 8; c++) {
                            _tile_zero(0);
                            _tile_loadd(1, ra[0].w[b] + 32 * c, (long)sizeof(iq2_row_a));
                            _tile_loadd(2, xi + (((size_t)g * nb + b) * 8 + c) * 512, 64);
                            _tile_dpbssd(0, 1, 2);
                            _tile_stored(0, cb[c], 64);
                        }
                        const __m512 tsv = _mm512_loadu_ps(ts[g] + 16 * b);
#pragma GCC unroll 4
                        for (int r = 0; r < 16; r++) {
                            __m512i is = _mm512_setzero_si512();
#pragma GCC unroll 8
                            for (int c = 0; c < 8; c++)
                                is = _mm512_add_epi32(is, _mm512_mullo_epi32(_mm512_load_si512((const void *)cb[c][r]),
                                                                             _mm512_set1_epi32(ra[r].scl[b][c])));
                            const __m512 bs = _mm512_cvtepi32_ps(is);
                            const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(ra[r].d[b]), _mm512_set1_ps(0.125f)), bs);
                            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(tsv, v));
                        }
                    }
                    amx_store16(acc, y + (int64_t)(t0 + 16 * g) * ldy + r0, ldy);
                }
            }
            t0 += 16 * ng;
        }
        _tile_release();
    }
    amx_rest(tile_iq2_xxs_vnni, w, row_bytes, n_rows, rows16, x, t0, n_tok, n, y, ldy);
}

/* entries merged over the VNNI set */
const ds4_quant_kernels ds4_quant_amx_table[] = {
    {DS4_TYPE_Q8_0, DS4_TYPE_Q8_0, NULL, NULL, NULL, NULL, tile_q8_0_amx, NULL},
    {DS4_TYPE_Q2_K, DS4_TYPE_Q8_K, NULL, NULL, NULL, NULL, tile_q2_k_amx, NULL},
    {DS4_TYPE_IQ2_XXS, DS4_TYPE_Q8_K, NULL, NULL, NULL, NULL, tile_iq2_xxs_amx, NULL},
};
const int ds4_quant_amx_n = sizeof ds4_quant_amx_table / sizeof ds4_quant_amx_table[0];


const ds4_quant_kernels ds4_quant_avx2_table[] = {
    {DS4_TYPE_F32, -1, NULL, dot_f32_f32, NULL, NULL, NULL, tile_f32_f32},
    {DS4_TYPE_F16, -1, dq_f16, dot_f16_f32, NULL, NULL, NULL, tile_f16_f32},
    {DS4_TYPE_BF16, -1, dq_bf16, dot_bf16_f32, NULL, NULL, NULL, tile_bf16_f32},
    {DS4_TYPE_Q8_0, DS4_TYPE_Q8_0, dq_q8_0, dot_q8_0_f32, dotq_q8_0, act_q8_0, tile_q8_0, NULL},
    {DS4_TYPE_Q4_K, DS4_TYPE_Q8_K, dq_q4_k, dot_q4_k_f32, dotq_q4_k, act_q8_k, tile_q4_k, NULL},
    {DS4_TYPE_Q2_K, DS4_TYPE_Q8_K, dq_q2_k, dot_q2_k_f32, dotq_q2_k, act_q8_k, tile_q2_k, NULL},
    {DS4_TYPE_IQ2_XXS, DS4_TYPE_Q8_K, dq_iq2_xxs, dot_iq2_xxs_f32, dotq_iq2_xxs, act_q8_k, tile_iq2_xxs, NULL},
};
const int ds4_quant_avx2_n = sizeof ds4_quant_avx2_table / sizeof ds4_quant_avx2_table[0];

/* ---- IQ2_XXS quantizer: neighbour costs ------------------------------------ */

/* 8 candidates per step, one lane each: coordinate i's term is a permute
 * of cost[4i..4i+3] by the lane's 2-bit level; the lane sums are the
 * scalar's sequential sums from 0 (vaddps rounds as addss does). Each lane
 * keeps its first strict minimum (below FLT_MAX, j < n); the lanes are then
 * merged by value, ties to the smaller j. */
TGT int ds4_iq2_nearest_avx2(const uint16_t *u, int n, const float cost[32]) {
    __m256 c[8];
    for (int i = 0; i < 8; i++) c[i] = _mm256_castps128_ps256(_mm_loadu_ps(cost + 4 * i));
    const __m256i three = _mm256_set1_epi32(3), eight = _mm256_set1_epi32(8), nv = _mm256_set1_epi32(n);
    __m256i jv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), bj = _mm256_set1_epi32(-1);
    __m256 best = _mm256_set1_ps(FLT_MAX);
    for (int j = 0; j < n; j += 8) {
        __m256i g = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(u + j)));
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < 8; i++) {
            __m256i l = _mm256_and_si256(_mm256_srli_epi32(g, 2 * i), three);
            acc = _mm256_add_ps(acc, _mm256_permutevar8x32_ps(c[i], l));
        }
        __m256 lt = _mm256_and_ps(_mm256_cmp_ps(acc, best, _CMP_LT_OQ),
                                  _mm256_castsi256_ps(_mm256_cmpgt_epi32(nv, jv)));
        best = _mm256_blendv_ps(best, acc, lt);
        bj = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bj), _mm256_castsi256_ps(jv), lt));
        jv = _mm256_add_epi32(jv, eight);
    }
    /* merge: the smallest lane value (lanes that chose nothing hold FLT_MAX
     * and j = -1, and chosen values are below FLT_MAX), then the smallest j
     * among the lanes holding it */
    __m256 m = _mm256_min_ps(best, _mm256_permute2f128_ps(best, best, 1));
    m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, 0x4e));
    m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, 0xb1));
    __m256i sel = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(best, m, _CMP_EQ_OQ)),
                                   _mm256_cmpgt_epi32(bj, _mm256_set1_epi32(-1)));
    __m256i idx = _mm256_blendv_epi8(_mm256_set1_epi32(0x7fffffff), bj, sel);
    idx = _mm256_min_epi32(idx, _mm256_permute2x128_si256(idx, idx, 1));
    idx = _mm256_min_epi32(idx, _mm256_shuffle_epi32(idx, 0x4e));
    idx = _mm256_min_epi32(idx, _mm256_shuffle_epi32(idx, 0xb1));
    int r = _mm256_cvtsi256_si32(idx);
    return r == 0x7fffffff ? -1 : r;
}

#else /* no x86 AVX2 code in this build */

void ds4_quant_avx2_init(void) {}
int ds4_quant_vbmi;
void ds4_quant_vbmi_init(void) {}
int ds4_iq2_nearest_avx2(const uint16_t *u, int n, const float cost[32]) {
    return ds4_iq2_nearest_scalar(u, n, cost);
}

const ds4_quant_kernels ds4_quant_avx2_table[1] = {{-1, -1, NULL, NULL, NULL, NULL, NULL, NULL}};
const int ds4_quant_avx2_n = 0;
const ds4_quant_kernels ds4_quant_vnni_table[1] = {{-1, -1, NULL, NULL, NULL, NULL, NULL, NULL}};
const int ds4_quant_vnni_n = 0;
const ds4_quant_kernels ds4_quant_amx_table[1] = {{-1, -1, NULL, NULL, NULL, NULL, NULL, NULL}};
const int ds4_quant_amx_n = 0;

#endif
