/* iq2_ab.c - A/B timing of IQ2_XXS decode micro-kernel variants (one token,
 * 8 rows per micro-tile, 4096 columns) against the shipped one
 * (quant_avx2.c's iq2_xxs_micro), interleaved in one process: the best
 * thread CPU time of many rounds, so a noisy shared machine still ranks
 * them; every variant is checked bit-identical to the shipped one, except
 * the three "bound" lines, which replace a lookup with a plain load to show
 * what the lookups cost.
 *
 * Usage: build/dev/iq2_ab [KiB of weights (65536)] [rounds (20)]
 *
 * Seen on the 2-core AMD EPYC (Zen 3) VM, GB/s of weights, best of
 * several runs (the VM's speed swings by 2x from minute to minute):
 *   128 KiB (L2): shipped 2.6-3.1, gather64 2.0-2.2, nibble codes +
 *   vpgatherdd 1.9, nibble codes scalar 2.6-2.8, 16-bit pair table (1 MiB)
 *   1.7-1.8, signs from the 1 KiB table 3.1, signs by pdep 3.2; bounds: no
 *   magnitude lookup 3.7-4.5, no sign lookup 4.5, neither 9.0-9.3.
 *   64 MiB (streaming, as decode): shipped 1.7-3.0, 1 KiB sign table
 *   2.1-3.0, pdep signs 1.9-3.1, shift/mask signs 1.8-2.5.
 * So the magnitude and the sign lookups cost about a third of the time
 * each; AVX2 gathers lose on Zen 3; the sign variants stay within the
 * machine's noise of the shipped 256 KiB table (and pdep is microcoded on
 * Zen 1/2), so none was taken.
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

/* nibble i of entry k = code (0, 1, 2 for 8, 25, 43) of byte i of grid k */
static uint32_t nib32[256];

static void build_nib(void) {
    for (int k = 0; k < 256; k++) {
        uint32_t v = 0;
        for (int i = 0; i < 8; i++) {
            uint8_t m = (uint8_t)(ds4_iq2xxs_grid[k] >> (8 * i));
            uint32_t c = m == 8 ? 0 : m == 25 ? 1 : 2;
            v |= c << (4 * i);
        }
        nib32[k] = v;
    }
}

/* shipped R=8 T=1 */
static TGT void v0(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    iq2_xxs_micro(w, x, ts, 8, 1, nb, pf, out);
}

#define COMBINE()                                                                                        \
    __m256 bs = _mm256_cvtepi32_ps(hsum8x8_i32(s));                                                      \
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(row_scales(w, o, 1), _mm256_set1_ps(0.125f)), bs);            \
    acc = _mm256_add_ps(acc, _mm256_mul_ps(tok_scales(ts + b, 1), v));

/* gather of the 4 grid entries of a group */
static TGT void v1(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint32_t a0, a1;
                memcpy(&a0, q, 4);
                memcpy(&a1, q + 4, 4);
                __m256i mag = _mm256_i32gather_epi64((const long long *)ds4_iq2xxs_grid,
                                                     _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)a0)), 8);
                __m256i sg = iq2_group_signs(a1);
                __m256i scl = _mm256_load_si256((const __m256i *)iq2_scale16[a1 >> 28]);
                __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, sg));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(prod, scl));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
}

/* nibble codes, one dword gather for two groups */
static TGT void v3(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i m15 = _mm256_set1_epi8(15);
    const __m256i lut = _mm256_setr_epi8(8, 25, 43, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 25, 43, 0, 0, 0, 0, 0,
                                         0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g += 2) {
            __m256i a_g = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
            __m256i a_h = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g + 32));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                __m128i raw = _mm_loadu_si128((const __m128i *)q);
                __m256i idx = _mm256_cvtepu8_epi32(_mm_shuffle_epi32(raw, 0x08));
                __m256i v = _mm256_i32gather_epi32((const int *)nib32, idx, 4);
                __m256i lo = _mm256_and_si256(v, m15), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
                __m256i u0 = _mm256_unpacklo_epi8(lo, hi), u1 = _mm256_unpackhi_epi8(lo, hi);
                __m256i mg = _mm256_shuffle_epi8(lut, _mm256_permute2x128_si256(u0, u1, 0x20));
                __m256i mh = _mm256_shuffle_epi8(lut, _mm256_permute2x128_si256(u0, u1, 0x31));
                uint32_t a1g = (uint32_t)_mm_extract_epi32(raw, 1), a1h = (uint32_t)_mm_extract_epi32(raw, 3);
                __m256i pg = _mm256_maddubs_epi16(mg, _mm256_sign_epi8(a_g, iq2_group_signs(a1g)));
                __m256i ph = _mm256_maddubs_epi16(mh, _mm256_sign_epi8(a_h, iq2_group_signs(a1h)));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(pg, _mm256_load_si256((const __m256i *)iq2_scale16[a1g >> 28])));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(ph, _mm256_load_si256((const __m256i *)iq2_scale16[a1h >> 28])));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
}

/* nibble codes without gather: 8 scalar dword loads per two groups */
static TGT void v4(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i m15 = _mm256_set1_epi8(15);
    const __m256i lut = _mm256_setr_epi8(8, 25, 43, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 25, 43, 0, 0, 0, 0, 0,
                                         0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g += 2) {
            __m256i a_g = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
            __m256i a_h = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g + 32));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint32_t a1g, a1h;
                memcpy(&a1g, q + 4, 4);
                memcpy(&a1h, q + 12, 4);
                __m256i v = _mm256_setr_epi32((int)nib32[q[0]], (int)nib32[q[1]], (int)nib32[q[2]], (int)nib32[q[3]],
                                              (int)nib32[q[8]], (int)nib32[q[9]], (int)nib32[q[10]], (int)nib32[q[11]]);
                __m256i lo = _mm256_and_si256(v, m15), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
                __m256i u0 = _mm256_unpacklo_epi8(lo, hi), u1 = _mm256_unpackhi_epi8(lo, hi);
                __m256i mg = _mm256_shuffle_epi8(lut, _mm256_permute2x128_si256(u0, u1, 0x20));
                __m256i mh = _mm256_shuffle_epi8(lut, _mm256_permute2x128_si256(u0, u1, 0x31));
                __m256i pg = _mm256_maddubs_epi16(mg, _mm256_sign_epi8(a_g, iq2_group_signs(a1g)));
                __m256i ph = _mm256_maddubs_epi16(mh, _mm256_sign_epi8(a_h, iq2_group_signs(a1h)));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(pg, _mm256_load_si256((const __m256i *)iq2_scale16[a1g >> 28])));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(ph, _mm256_load_si256((const __m256i *)iq2_scale16[a1h >> 28])));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
}



/* magnitudes of two entries per 16-byte load (a 1 MiB pair table) */
static uint64_t (*pair16)[2];
static void build_pair(void) {
    pair16 = aligned_alloc(64, (size_t)65536 * 16);
    for (int i = 0; i < 65536; i++) pair16[i][0] = ds4_iq2xxs_grid[i & 255], pair16[i][1] = ds4_iq2xxs_grid[i >> 8];
}
static TGT void v5(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint16_t i0, i1;
                uint32_t a1;
                memcpy(&i0, q, 2);
                memcpy(&i1, q + 2, 2);
                memcpy(&a1, q + 4, 4);
                __m256i mag = _mm256_loadu2_m128i((const __m128i *)pair16[i1], (const __m128i *)pair16[i0]);
                __m256i sg = iq2_group_signs(a1);
                __m256i scl = _mm256_load_si256((const __m256i *)iq2_scale16[a1 >> 28]);
                __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, sg));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(prod, scl));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
}

/* bounds: a plain load instead of the magnitude lookup (vA), of the sign
 * lookup (vB), of both (vC) */
static TGT void vA(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint32_t a1;
                memcpy(&a1, q + 4, 4);
                __m256i mag = _mm256_loadu_si256((const __m256i *)(q - 2));
                __m256i sg = iq2_group_signs(a1);
                __m256i scl = _mm256_load_si256((const __m256i *)iq2_scale16[a1 >> 28]);
                __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, sg));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(prod, scl));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
}

static TGT void vB(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint32_t a1;
                memcpy(&a1, q + 4, 4);
                __m256i mag = _mm256_setr_epi64x((long long)ds4_iq2xxs_grid[q[0]], (long long)ds4_iq2xxs_grid[q[1]], (long long)ds4_iq2xxs_grid[q[2]], (long long)ds4_iq2xxs_grid[q[3]]);
                __m256i sg = _mm256_set1_epi32((int)a1);
                __m256i scl = _mm256_load_si256((const __m256i *)iq2_scale16[a1 >> 28]);
                __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, sg));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(prod, scl));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
}

static TGT void vC(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint32_t a1;
                memcpy(&a1, q + 4, 4);
                __m256i mag = _mm256_loadu_si256((const __m256i *)(q - 2));
                __m256i sg = _mm256_set1_epi32((int)a1);
                __m256i scl = _mm256_load_si256((const __m256i *)iq2_scale16[a1 >> 28]);
                __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, sg));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(prod, scl));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
}


/* signs without a table: pdep spreads the 4 x 7 bits over 4 bytes, bytewise
 * parity gives bit 7, a shuffle and compare spread the bits over bytes */
static inline TGT __m256i sign_arith(uint32_t a1) {
    uint32_t w = _pdep_u32(a1, 0x7f7f7f7fu);
    uint32_t x = w ^ (w >> 4);
    x ^= x >> 2;
    x ^= x >> 1;
    w |= (x & 0x01010101u) << 7;
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), spread);
    return _mm256_or_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(1));
}
/* the same with shifts and masks (pdep is microcoded, slow, before Zen 3): spreads the 4 x 7 bits over 4 bytes, bytewise
 * parity gives bit 7, a shuffle and compare spread the bits over bytes */
static inline TGT __m256i sign_shift(uint32_t a1) {
    uint32_t w = (a1 & 0x7fu) | (a1 << 1 & 0x7f00u) | (a1 << 2 & 0x7f0000u) | (a1 << 3 & 0x7f000000u);
    uint32_t x = w ^ (w >> 4);
    x ^= x >> 2;
    x ^= x >> 1;
    w |= (x & 0x01010101u) << 7;
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), spread);
    return _mm256_or_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(1));
}
/* signs from the 1 KiB table, 4 lookups per group */
static TGT void vS1(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint32_t a1;
                memcpy(&a1, q + 4, 4);
                __m256i mag = _mm256_setr_epi64x((long long)ds4_iq2xxs_grid[q[0]], (long long)ds4_iq2xxs_grid[q[1]], (long long)ds4_iq2xxs_grid[q[2]], (long long)ds4_iq2xxs_grid[q[3]]);
                __m256i sg = _mm256_setr_epi64x((long long)iq2_signs64[a1 & 127], (long long)iq2_signs64[(a1 >> 7) & 127], (long long)iq2_signs64[(a1 >> 14) & 127], (long long)iq2_signs64[(a1 >> 21) & 127]);
                __m256i scl = _mm256_load_si256((const __m256i *)iq2_scale16[a1 >> 28]);
                __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, sg));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(prod, scl));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
}

static TGT void vS2(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint32_t a1;
                memcpy(&a1, q + 4, 4);
                __m256i mag = _mm256_setr_epi64x((long long)ds4_iq2xxs_grid[q[0]], (long long)ds4_iq2xxs_grid[q[1]], (long long)ds4_iq2xxs_grid[q[2]], (long long)ds4_iq2xxs_grid[q[3]]);
                __m256i sg = sign_arith(a1);
                __m256i scl = _mm256_load_si256((const __m256i *)iq2_scale16[a1 >> 28]);
                __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, sg));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(prod, scl));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
}
static TGT void vS3(const uint8_t *const *w, const ds4_block_q8_k *const *x, const float *ts, int64_t nb,
                   const uint8_t *pf, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_span(pf + (size_t)b * 8 * 66, 8 * 66);
        const size_t o = (size_t)b * 66;
        __m256i s[8];
        for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(x[0][b].qs + 32 * g));
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const uint8_t *q = w[r] + o + 2 + 8 * g;
                uint32_t a1;
                memcpy(&a1, q + 4, 4);
                __m256i mag = _mm256_setr_epi64x((long long)ds4_iq2xxs_grid[q[0]], (long long)ds4_iq2xxs_grid[q[1]], (long long)ds4_iq2xxs_grid[q[2]], (long long)ds4_iq2xxs_grid[q[3]]);
                __m256i sg = sign_shift(a1);
                __m256i scl = _mm256_load_si256((const __m256i *)iq2_scale16[a1 >> 28]);
                __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, sg));
                s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(prod, scl));
            }
        }
        COMBINE()
    }
    _mm256_storeu_ps(out, acc);
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
    build_nib();
    build_pair();
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
    micro_fn fns[] = {v0, v1, v3, v4, v5, vS1, vS2, vS3, vA, vB, vC};
    const char *names[] = {"shipped", "gather64", "nib+gather32", "nib scalar", "pair16 1MiB", "sign 1KiB x4", "sign pdep", "sign shifts", "bound: no mag", "bound: no sign", "bound: neither"};
    const int nf = sizeof fns / sizeof fns[0];
    float *y0 = malloc(n_rows * sizeof(float)), *y1 = malloc(n_rows * sizeof(float));
    run_tile(v0, w, row_bytes, n_rows, xq, nb, ts, y0);
    double best[16];
    for (int f = 0; f < nf; f++) {
        run_tile(fns[f], w, row_bytes, n_rows, xq, nb, ts, y1);
        if (f < nf - 3 && memcmp(y0, y1, n_rows * sizeof(float))) printf("%s: NOT bit-identical\n", names[f]);
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
