/* cpu_vec.c - float32 vector helpers of the CPU backend's attention and
 * indexer: 8-lane dot products and row sums, with an AVX2 variant chosen at
 * run time (the quant kernels' choice, ds4_quant_simd_best).
 *
 * Invariant: every variant computes the same lanes with the same IEEE
 * operations in the same order (8 partial sums of products, each product
 * rounded before its addition: no FMA; element-wise row sums in row order),
 * so the result does not depend on the variant, the batch or the thread.
 * Thread-safe; nothing here allocates.
 */
#include <math.h>
#include <string.h>

#include "cpu/cpu.h"
#include "numerics.h"
#include "numerics_inl.h"
#include "quant.h"

/* ---- generic: 4-lane vector extension values (one SSE or NEON register) */

typedef float v4f __attribute__((vector_size(16)));
typedef float v4f_u __attribute__((vector_size(16), aligned(4), may_alias)); /* unaligned access */
#define ld4(p) (*(const v4f_u *)(p))
#define st4(p, v) (*(v4f_u *)(p) = (v))

static float dot8_generic(const float *a, const float *b, int n) {
    v4f lo = {0}, hi = {0}; /* partial sums 0..3, 4..7 */
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        lo += ld4(a + i) * ld4(b + i);
        hi += ld4(a + i + 4) * ld4(b + i + 4);
    }
    float s = ((lo[0] + hi[0]) + (lo[1] + hi[1])) + ((lo[2] + hi[2]) + (lo[3] + hi[3]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void sum_rows_generic(const float *p, const float *const *rows, int nr, int n, float *out) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v4f lo = {0}, hi = {0};
        for (int r = 0; r < nr; r++) {
            lo += p[r] * ld4(rows[r] + i);
            hi += p[r] * ld4(rows[r] + i + 4);
        }
        st4(out + i, lo);
        st4(out + i + 4, hi);
    }
    for (; i < n; i++) {
        float acc = 0;
        for (int r = 0; r < nr; r++) acc += p[r] * rows[r][i];
        out[i] = acc;
    }
}

/* ---- exact FP4 indexer dots (numerics.h ds4_num_fp4_dot, the same bits) */

static void fp4_dot_heads_generic(const int8_t *qc, const float *qpT, int n_heads, const int8_t *kc, const float *kp,
                                  int n, float *out) {
    for (int h = 0; h < n_heads; h++) {
        float d = 0.0f;
        for (int b = 0; b < n / 32; b++) {
            int s = 0;
            for (int i = 32 * b; i < 32 * b + 32; i++) s += (int)qc[(size_t)h * n + i] * (int)kc[i];
            const float pp = qpT[(size_t)b * n_heads + h] * kp[b];
            d = b ? fmaf((float)s, pp, d) : (float)s * pp;
        }
        out[h] = d;
    }
}

/* ---- AVX2 (8 lanes in one register) */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TGT __attribute__((target("avx2")))

static inline TGT float dot8_avx2(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    float l[8];
    _mm256_storeu_ps(l, acc);
    float s = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static TGT void dot8_rows_avx2(const float *q, const float *const *rows, int nr, int n, float scale, float *s) {
    for (int r = 0; r < nr; r++) s[r] = dot8_avx2(q, rows[r], n) * scale;
}

static TGT void dot8_heads_avx2(const float *q, int n_heads, const float *k, int n, float *out) {
    for (int h = 0; h < n_heads; h++) out[h] = dot8_avx2(q + (size_t)h * n, k, n);
}

static TGT void sum_rows_avx2(const float *p, const float *const *rows, int nr, int n, float *out) {
    int i = 0;
    for (; i + 16 <= n; i += 16) { /* two independent column groups per pass */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (int r = 0; r < nr; r++) {
            __m256 pr = _mm256_set1_ps(p[r]);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(pr, _mm256_loadu_ps(rows[r] + i)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(pr, _mm256_loadu_ps(rows[r] + i + 8)));
        }
        _mm256_storeu_ps(out + i, a0);
        _mm256_storeu_ps(out + i + 8, a1);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 a0 = _mm256_setzero_ps();
        for (int r = 0; r < nr; r++) a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_set1_ps(p[r]), _mm256_loadu_ps(rows[r] + i)));
        _mm256_storeu_ps(out + i, a0);
    }
    for (; i < n; i++) {
        float acc = 0;
        for (int r = 0; r < nr; r++) acc += p[r] * rows[r][i];
        out[i] = acc;
    }
}
/* Several heads against the same rows (attention reads one token's rows
 * for every head): each row chunk is loaded once for NQ queries. Per head
 * the operations are dot8_avx2's / sum_rows_avx2's, in the same order. */
static inline __attribute__((always_inline)) TGT void dot8_multi_avx2(const float *const *q, int NQ,
                                                                      const float *const *rows, int nr, int n,
                                                                      float scale, float *s) {
    for (int r = 0; r < nr; r++) {
        const float *row = rows[r];
        __m256 acc[4];
#pragma GCC unroll 4
        for (int k = 0; k < NQ; k++) acc[k] = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(row + i);
#pragma GCC unroll 4
            for (int k = 0; k < NQ; k++) acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(_mm256_loadu_ps(q[k] + i), v));
        }
#pragma GCC unroll 4
        for (int k = 0; k < NQ; k++) {
            float l[8];
            _mm256_storeu_ps(l, acc[k]);
            float d = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
            for (int m = i; m < n; m++) d += q[k][m] * row[m];
            s[k * nr + r] = d * scale;
        }
    }
}

static TGT void dot8_rows_multi_avx2(const float *const *q, int nq, const float *const *rows, int nr, int n,
                                     float scale, float *s) {
    switch (nq) {
    case 4: dot8_multi_avx2(q, 4, rows, nr, n, scale, s); break;
    case 3: dot8_multi_avx2(q, 3, rows, nr, n, scale, s); break;
    case 2: dot8_multi_avx2(q, 2, rows, nr, n, scale, s); break;
    default: dot8_multi_avx2(q, 1, rows, nr, n, scale, s); break;
    }
}

static inline __attribute__((always_inline)) TGT void sum_multi_avx2(const float *p, int NQ,
                                                                     const float *const *rows, int nr, int n,
                                                                     float *const *out) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 acc[4];
#pragma GCC unroll 4
        for (int k = 0; k < NQ; k++) acc[k] = _mm256_setzero_ps();
        for (int r = 0; r < nr; r++) {
            __m256 v = _mm256_loadu_ps(rows[r] + i);
#pragma GCC unroll 4
            for (int k = 0; k < NQ; k++) acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(_mm256_set1_ps(p[k * nr + r]), v));
        }
#pragma GCC unroll 4
        for (int k = 0; k < NQ; k++) _mm256_storeu_ps(out[k] + i, acc[k]);
    }
    for (; i < n; i++)
        for (int k = 0; k < NQ; k++) {
            float acc = 0;
            for (int r = 0; r < nr; r++) acc += p[k * nr + r] * rows[r][i];
            out[k][i] = acc;
        }
}

static TGT void sum_rows_multi_avx2(const float *p, int nq, const float *const *rows, int nr, int n,
                                    float *const *out) {
    switch (nq) {
    case 4: sum_multi_avx2(p, 4, rows, nr, n, out); break;
    case 3: sum_multi_avx2(p, 3, rows, nr, n, out); break;
    case 2: sum_multi_avx2(p, 2, rows, nr, n, out); break;
    default: sum_multi_avx2(p, 1, rows, nr, n, out); break;
    }
}
/* 8 heads at a time: integer block sums by madd (exact in any order), the
 * 8 heads' sums gathered by hadd, then the block terms in order with fma. */
static TGT __attribute__((target("fma"))) void fp4_dot_heads_avx2(const int8_t *qc, const float *qpT, int n_heads,
                                                                  const int8_t *kc, const float *kp, int n,
                                                                  float *out) {
    for (int h0 = 0; h0 < n_heads; h0 += 8) {
        __m256 d = _mm256_setzero_ps();
        for (int b = 0; b < n / 32; b++) {
            const __m256i k0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(kc + 32 * b)));
            const __m256i k1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(kc + 32 * b + 16)));
            __m256i v[8];
            for (int j = 0; j < 8; j++) {
                const int8_t *q = qc + (size_t)(h0 + j) * n + 32 * b;
                const __m256i a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
                const __m256i a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
                v[j] = _mm256_add_epi32(_mm256_madd_epi16(a0, k0), _mm256_madd_epi16(a1, k1));
            }
            const __m256i s0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
            const __m256i s1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
            const __m256i S = _mm256_add_epi32(_mm256_permute2x128_si256(s0, s1, 0x20),
                                               _mm256_permute2x128_si256(s0, s1, 0x31));
            const __m256 pp = _mm256_mul_ps(_mm256_loadu_ps(qpT + (size_t)b * n_heads + h0), _mm256_set1_ps(kp[b]));
            const __m256 sf = _mm256_cvtepi32_ps(S);
            d = b ? _mm256_fmadd_ps(sf, pp, d) : _mm256_mul_ps(sf, pp);
        }
        _mm256_storeu_ps(out + h0, d);
    }
}
/* FP4 codes (numerics.h ds4_num_fp4_codes, the same bytes and powers) of a
 * block of 32 at a time: NaN lanes out of the maximum, x * 1/p, clamped to
 * +-127 (before rounding: the same result), rounded to nearest even, NaN to
 * 0; a block whose 1/p is not a float takes the scalar definition. */
static TGT void fp4_codes_avx2(const float *x, int n, int8_t *c, float *p) {
    const __m256 sgn = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b0 = 0; b0 < n; b0 += 32) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + b0 + 8 * i);
            const __m256 a = _mm256_andnot_ps(sgn, v[i]);
            m = _mm256_max_ps(m, _mm256_and_ps(a, _mm256_cmp_ps(a, a, _CMP_ORD_Q)));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        const float pw = ds4_num_i4_pow(_mm_cvtss_f32(h)), ip = ds4_num_i4_recip(pw);
        p[b0 / 32] = pw;
        if (ip == 0.0f) {
            for (int i = 0; i < 32; i++) c[b0 + i] = (int8_t)ds4_num_i4_code(x[b0 + i], pw);
            continue;
        }
        __m256i q[4];
        for (int i = 0; i < 4; i++) {
            const __m256 y = _mm256_mul_ps(v[i], _mm256_set1_ps(ip));
            const __m256 ord = _mm256_cmp_ps(y, y, _CMP_ORD_Q);
            const __m256 r = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(y, lo), hi),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[i] = _mm256_cvtps_epi32(_mm256_and_ps(r, ord));
        }
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(c + b0), _mm256_permutevar8x32_epi32(b, perm));
    }
}
#define HAVE_AVX2_VEC 1
#endif

static int use_avx2(void) {
#ifdef HAVE_AVX2_VEC
    return ds4_quant_simd_best() >= DS4_SIMD_AVX2;
#else
    return 0;
#endif
}

/* ---- entry points */

float cpu_dot8(const float *a, const float *b, int n) {
#ifdef HAVE_AVX2_VEC
    if (use_avx2()) return dot8_avx2(a, b, n);
#endif
    return dot8_generic(a, b, n);
}

void cpu_dot8_rows(const float *q, const float *const *rows, int nr, int n, float scale, float *s) {
#ifdef HAVE_AVX2_VEC
    if (use_avx2()) {
        dot8_rows_avx2(q, rows, nr, n, scale, s);
        return;
    }
#endif
    for (int r = 0; r < nr; r++) s[r] = dot8_generic(q, rows[r], n) * scale;
}

void cpu_dot8_heads(const float *q, int n_heads, const float *k, int n, float *out) {
#ifdef HAVE_AVX2_VEC
    if (use_avx2()) {
        dot8_heads_avx2(q, n_heads, k, n, out);
        return;
    }
#endif
    for (int h = 0; h < n_heads; h++) out[h] = dot8_generic(q + (size_t)h * n, k, n);
}

void cpu_sum_rows(const float *p, const float *const *rows, int nr, int n, float *out) {
#ifdef HAVE_AVX2_VEC
    if (use_avx2()) {
        sum_rows_avx2(p, rows, nr, n, out);
        return;
    }
#endif
    sum_rows_generic(p, rows, nr, n, out);
}

void cpu_dot8_rows_multi(const float *const *q, int nq, const float *const *rows, int nr, int n, float scale,
                         float *s) {
#ifdef HAVE_AVX2_VEC
    if (use_avx2() && nq <= 4) {
        dot8_rows_multi_avx2(q, nq, rows, nr, n, scale, s);
        return;
    }
#endif
    for (int k = 0; k < nq; k++) cpu_dot8_rows(q[k], rows, nr, n, scale, s + (size_t)k * nr);
}

void cpu_sum_rows_multi(const float *p, int nq, const float *const *rows, int nr, int n, float *const *out) {
#ifdef HAVE_AVX2_VEC
    if (use_avx2() && nq <= 4) {
        sum_rows_multi_avx2(p, nq, rows, nr, n, out);
        return;
    }
#endif
    for (int k = 0; k < nq; k++) cpu_sum_rows(p + (size_t)k * nr, rows, nr, n, out[k]);
}

void cpu_fp4_dot_heads(const int8_t *qc, const float *qpT, int n_heads, const int8_t *kc, const float *kp, int n,
                       float *out) {
#ifdef HAVE_AVX2_VEC
    if (use_avx2() && n_heads % 8 == 0) {
        fp4_dot_heads_avx2(qc, qpT, n_heads, kc, kp, n, out);
        return;
    }
#endif
    fp4_dot_heads_generic(qc, qpT, n_heads, kc, kp, n, out);
}

void cpu_fp4_dot_heads_ref(const int8_t *qc, const float *qpT, int n_heads, const int8_t *kc, const float *kp, int n,
                           float *out) {
    fp4_dot_heads_generic(qc, qpT, n_heads, kc, kp, n, out);
}

void cpu_fp4_codes(const float *x, int n, int8_t *c, float *p) {
#ifdef HAVE_AVX2_VEC
    if (use_avx2()) {
        fp4_codes_avx2(x, n, c, p);
        return;
    }
#endif
    ds4_num_fp4_codes(x, n, c, p);
}
