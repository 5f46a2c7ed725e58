/* quant.c - type traits, scalar conversions, the scalar (reference) kernels
 * for dequantization and dot products, activation quantization, FP8/FP4
 * decoding, and the choice of SIMD kernels.
 *
 * Invariants:
 * - Every dequant kernel computes each value with the same binary32
 *   operations in the same order as docs/FORMATS.md §B (and gguf-py), so all
 *   paths are bit-identical to each other and to gguf-py.
 * - The int8 dots (dot_q) sum integer products exactly per block and then
 *   combine blocks with the same float operations on every path.
 * - Tables built at run time (kernel selection, FP8 LUT) are written once
 *   under pthread_once and read-only afterwards.
 */
#include "quant.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "quant_impl.h"

_Noreturn void ds4_quant_fatal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("ds4 quant: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

/* ---- type traits -------------------------------------------------------- */

static const ds4_type_traits TRAITS[] = {
    {DS4_TYPE_F32, "f32", 1, 4, -1, 1},
    {DS4_TYPE_F16, "f16", 1, 2, -1, 1},
    {DS4_TYPE_Q8_0, "q8_0", DS4_QK8_0, sizeof(ds4_block_q8_0), DS4_TYPE_Q8_0, 1},
    {DS4_TYPE_Q2_K, "q2_K", DS4_QK_K, sizeof(ds4_block_q2_k), DS4_TYPE_Q8_K, 1},
    {DS4_TYPE_Q4_K, "q4_K", DS4_QK_K, sizeof(ds4_block_q4_k), DS4_TYPE_Q8_K, 1},
    {DS4_TYPE_Q8_K, "q8_K", DS4_QK_K, sizeof(ds4_block_q8_k), -1, 0},
    {DS4_TYPE_IQ2_XXS, "iq2_xxs", DS4_QK_K, sizeof(ds4_block_iq2_xxs), DS4_TYPE_Q8_K, 1},
    {DS4_TYPE_I32, "i32", 1, 4, -1, 0},
    {DS4_TYPE_BF16, "bf16", 1, 2, -1, 1},
};
enum { N_TRAITS = sizeof TRAITS / sizeof TRAITS[0] };

static int type_slot(int type) {
    for (int i = 0; i < N_TRAITS; i++)
        if (TRAITS[i].type == type) return i;
    return -1;
}

const ds4_type_traits *ds4_type_get(int type) {
    int s = type_slot(type);
    return s < 0 ? NULL : &TRAITS[s];
}

const char *ds4_type_name(int type) {
    /* ggml names of every id up to 41 (docs/FORMATS.md §B.0); NULL = retired. */
    static const char *const names[] = {
        "f32", "f16", "q4_0", "q4_1", NULL, NULL, "q5_0", "q5_1", "q8_0", "q8_1",
        "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K", "iq2_xxs", "iq2_xs",
        "iq3_xxs", "iq1_s", "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "i8", "i16",
        "i32", "i64", "f64", "iq1_m", "bf16", NULL, NULL, NULL, "tq1_0", "tq2_0",
        NULL, NULL, NULL, "mxfp4", "nvfp4", "q1_0",
    };
    if (type < 0 || type >= (int)(sizeof names / sizeof names[0]) || !names[type]) return "?";
    return names[type];
}

int ds4_type_row_ok(int type, int64_t n) {
    const ds4_type_traits *t = ds4_type_get(type);
    return t && n >= 0 && n % t->block_elems == 0;
}

size_t ds4_type_row_bytes(int type, int64_t n) {
    if (!ds4_type_row_ok(type, n)) return 0;
    const ds4_type_traits *t = ds4_type_get(type);
    return (size_t)(n / t->block_elems) * (size_t)t->block_bytes;
}

int ds4_type_act(int type) {
    const ds4_type_traits *t = ds4_type_get(type);
    return t ? t->act_type : -1;
}

/* ---- scalar conversions ------------------------------------------------- */

float ds4_f16_to_f32(uint16_t h) { return f16_to_f32_inl(h); }

uint16_t ds4_f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffff;
    if (x > 0x7f800000) return sign | 0x7e00;  /* NaN */
    if (x >= 0x477ff000) return sign | 0x7c00; /* >= 65520 rounds to inf */
    if (x < 0x38800000) {                      /* below 2^-14: subnormal */
        if (x <= 0x33000000) return sign;      /* <= 2^-25 rounds to 0 */
        uint32_t e = x >> 23, m = (x & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;              /* units of 2^-24 */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return sign | (uint16_t)r;
    }
    x += 0xfff + ((x >> 13) & 1);              /* round to nearest even */
    return sign | (uint16_t)((x - 0x38000000) >> 13);
}

float ds4_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t ds4_f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 64);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

/* ---- FP8 / FP4 / UE8M0 (docs/FORMATS.md §E.3) -------------------------------- */

float ds4_fp8_e4m3_to_f32(uint8_t c) {
    int e = (c >> 3) & 15, m = c & 7;
    float v;
    if ((c & 0x7f) == 0x7f) return bits_f32(0x7fc00000u); /* the only NaN codes */
    if (e == 0) v = (float)m * 0x1p-9f;
    else v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
    return (c & 0x80) ? -v : v;
}

float ds4_fp4_e2m1_to_f32(uint8_t c) {
    static const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float v = mag[c & 7];
    return (c & 8) ? -v : v;
}

float ds4_ue8m0_to_f32(uint8_t s) {
    if (s == 255) return bits_f32(0x7fc00000u);
    if (s == 0) return bits_f32(0x00400000u); /* 2^-127, a binary32 subnormal */
    return bits_f32((uint32_t)s << 23);
}

static float fp8_lut[256]; /* written once under lut_once */
static pthread_once_t lut_once = PTHREAD_ONCE_INIT;
static void lut_init(void) {
    for (int c = 0; c < 256; c++) fp8_lut[c] = ds4_fp8_e4m3_to_f32((uint8_t)c);
}

void ds4_fp8_dequant_row(const uint8_t *w, const uint8_t *scales, float *dst, int64_t n) {
    pthread_once(&lut_once, lut_init);
    for (int64_t c0 = 0; c0 < n; c0 += 128) {
        float s = ds4_ue8m0_to_f32(scales[c0 / 128]);
        int64_t c1 = c0 + 128 < n ? c0 + 128 : n;
        for (int64_t c = c0; c < c1; c++) dst[c] = fp8_lut[w[c]] * s;
    }
}

void ds4_fp8_dequant_matrix(const uint8_t *w, const uint8_t *scales, float *dst, int64_t n_rows, int64_t n_cols) {
    int64_t n_tiles = (n_cols + 127) / 128;
    for (int64_t r = 0; r < n_rows; r++)
        ds4_fp8_dequant_row(w + r * n_cols, scales + (r / 128) * n_tiles, dst + r * n_cols, n_cols);
}

void ds4_fp4_dequant_row(const uint8_t *packed, const uint8_t *scales, float *dst, int64_t n) {
    if (n % 32) ds4_quant_fatal("fp4 row length %lld is not a multiple of 32", (long long)n);
    float code[16];
    for (int k = 0; k < 16; k++) code[k] = ds4_fp4_e2m1_to_f32((uint8_t)k);
    for (int64_t b = 0; b < n / 32; b++) {
        float s = ds4_ue8m0_to_f32(scales[b]), t[16];
        for (int k = 0; k < 16; k++) t[k] = code[k] * s;   /* the same products, once per block */
        const uint8_t *p = packed + 16 * b;
        float *y = dst + 32 * b;
        for (int j = 0; j < 16; j++) {
            y[2 * j] = t[p[j] & 15];
            y[2 * j + 1] = t[p[j] >> 4];
        }
    }
}

/* ---- scalar dequant kernels --------------------------------------------- */

static void dq_f32(const void *src, float *y, int64_t n) { memcpy(y, src, (size_t)n * 4); }

static void dq_i32(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) {
        int32_t v;
        memcpy(&v, p + 4 * i, 4);
        y[i] = (float)v;
    }
}

static void dq_f16(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) y[i] = ds4_f16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
}

static void dq_bf16(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) y[i] = ds4_bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
}

/* Row data may be unaligned (GGUF aligns tensors to 32 bytes but a block is
 * 34/66/84 bytes), so blocks are read through these copies. */
#define LOAD_BLOCK(T, dst, src, i) memcpy(&(dst), (const uint8_t *)(src) + (size_t)(i) * sizeof(T), sizeof(T))

static void dq_q8_0(const void *src, float *y, int64_t n) {
    for (int64_t b = 0; b < n / DS4_QK8_0; b++) {
        ds4_block_q8_0 x;
        LOAD_BLOCK(ds4_block_q8_0, x, src, b);
        float d = f16_to_f32_inl(x.d);
        for (int i = 0; i < DS4_QK8_0; i++) y[b * DS4_QK8_0 + i] = d * (float)x.qs[i];
    }
}

/* Sub-block scale j and min j of a Q4_K block (docs/FORMATS.md §B.3). */
static inline void q4k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void dq_q4_k(const void *src, float *y, int64_t n) {
    for (int64_t b = 0; b < n / DS4_QK_K; b++) {
        ds4_block_q4_k x;
        LOAD_BLOCK(ds4_block_q4_k, x, src, b);
        float d = f16_to_f32_inl(x.d), dmin = f16_to_f32_inl(x.dmin);
        float *yb = y + b * DS4_QK_K;
        for (int c = 0; c < 4; c++) {
            int sc0, m0, sc1, m1;
            q4k_scale_min(x.scales, 2 * c, &sc0, &m0);
            q4k_scale_min(x.scales, 2 * c + 1, &sc1, &m1);
            float d0 = d * (float)sc0, dm0 = dmin * (float)m0;
            float d1 = d * (float)sc1, dm1 = dmin * (float)m1;
            const uint8_t *q = x.qs + 32 * c;
            for (int l = 0; l < 32; l++) yb[64 * c + l] = d0 * (float)(q[l] & 15) - dm0;
            for (int l = 0; l < 32; l++) yb[64 * c + 32 + l] = d1 * (float)(q[l] >> 4) - dm1;
        }
    }
}

static void dq_q2_k(const void *src, float *y, int64_t n) {
    for (int64_t b = 0; b < n / DS4_QK_K; b++) {
        ds4_block_q2_k x;
        LOAD_BLOCK(ds4_block_q2_k, x, src, b);
        float d = f16_to_f32_inl(x.d), dmin = f16_to_f32_inl(x.dmin);
        float *yb = y + b * DS4_QK_K;
        /* value 128h + 32k + l sits in bits 2k..2k+1 of qs[32h + l] */
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int s = 0; s < 2; s++) {
                    int sc = x.scales[8 * h + 2 * k + s];
                    float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
                    const uint8_t *q = x.qs + 32 * h + 16 * s;
                    float *yo = yb + 128 * h + 32 * k + 16 * s;
                    for (int l = 0; l < 16; l++) yo[l] = dl * (float)((q[l] >> (2 * k)) & 3) - ml;
                }
    }
}

/* The 8 values of grid index g / sign index s scaled by db (docs/FORMATS.md §B.5). */
static inline void iq2_group8(float db, uint8_t g, uint8_t s, float *y) {
    uint64_t grid = ds4_iq2xxs_grid[g];
    uint8_t signs = ds4_ksigns_iq2xs[s & 127];
    for (int j = 0; j < 8; j++) {
        float v = db * (float)(uint8_t)(grid >> (8 * j));
        y[j] = (signs & ds4_kmask_iq2xs[j]) ? -v : v;
    }
}

static void dq_iq2_xxs(const void *src, float *y, int64_t n) {
    for (int64_t b = 0; b < n / DS4_QK_K; b++) {
        ds4_block_iq2_xxs x;
        LOAD_BLOCK(ds4_block_iq2_xxs, x, src, b);
        float d = f16_to_f32_inl(x.d);
        for (int g = 0; g < 8; g++) {
            uint32_t a0, a1;
            memcpy(&a0, &x.qs[4 * g], 4);
            memcpy(&a1, &x.qs[4 * g + 2], 4);
            float db = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
            for (int k = 0; k < 4; k++)
                iq2_group8(db, (uint8_t)(a0 >> (8 * k)), (uint8_t)(a1 >> (7 * k)),
                           y + b * DS4_QK_K + 32 * g + 8 * k);
        }
    }
}

/* ---- scalar f32 dots: dequantize a block, then a sequential sum --------- */

/* dot of one block worth of dequantized values; blocks are summed in order. */
static float dot_seq(const float *y, const float *x, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += y[i] * x[i];
    return s;
}

#define DEFINE_DOT_F32(NAME, DQ, BLOCK_ELEMS, BLOCK_BYTES)                    \
    static float NAME(const void *row, const float *x, int64_t n) {           \
        float y[BLOCK_ELEMS], sum = 0.0f;                                     \
        const uint8_t *p = row;                                               \
        for (int64_t b = 0; b < n / (BLOCK_ELEMS); b++) {                     \
            DQ(p + (size_t)b * (BLOCK_BYTES), y, BLOCK_ELEMS);                \
            sum += dot_seq(y, x + b * (BLOCK_ELEMS), BLOCK_ELEMS);            \
        }                                                                     \
        return sum;                                                           \
    }

/* Plain types use 256-value chunks; the tail of a row is its own chunk. */
#define DEFINE_DOT_PLAIN(NAME, DQ, ELEM_BYTES)                                \
    static float NAME(const void *row, const float *x, int64_t n) {           \
        float y[256], sum = 0.0f;                                             \
        const uint8_t *p = row;                                               \
        for (int64_t i = 0; i < n; i += 256) {                                \
            int m = (int)(n - i < 256 ? n - i : 256);                         \
            DQ(p + (size_t)i * (ELEM_BYTES), y, m);                           \
            sum += dot_seq(y, x + i, m);                                      \
        }                                                                     \
        return sum;                                                           \
    }

DEFINE_DOT_PLAIN(dot_f32_f32, dq_f32, 4)
DEFINE_DOT_PLAIN(dot_f16_f32, dq_f16, 2)
DEFINE_DOT_PLAIN(dot_bf16_f32, dq_bf16, 2)
DEFINE_DOT_F32(dot_q8_0_f32, dq_q8_0, DS4_QK8_0, sizeof(ds4_block_q8_0))
DEFINE_DOT_F32(dot_q4_k_f32, dq_q4_k, DS4_QK_K, sizeof(ds4_block_q4_k))
DEFINE_DOT_F32(dot_q2_k_f32, dq_q2_k, DS4_QK_K, sizeof(ds4_block_q2_k))
DEFINE_DOT_F32(dot_iq2_xxs_f32, dq_iq2_xxs, DS4_QK_K, sizeof(ds4_block_iq2_xxs))

/* ---- activation quantization -------------------------------------------- */

/* Q8_0 activations: d = amax/127 stored as f16, q = rne(x * 127/amax)
 * clamped to [-127, 127]. (Weights use the roundf rule of C.1 instead; see
 * ds4_quant_ref_q8_0.) */
void ds4_quant_act_q8_0_scalar(const float *x, void *dst, int64_t n) {
    for (int64_t b = 0; b < n / DS4_QK8_0; b++) {
        const float *xb = x + b * DS4_QK8_0;
        ds4_block_q8_0 o;
        float amax = 0.0f;
        for (int i = 0; i < DS4_QK8_0; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float iscale = amax > 0.0f ? 127.0f / amax : 0.0f;
        o.d = ds4_f32_to_f16(amax / 127.0f);
        for (int i = 0; i < DS4_QK8_0; i++) {
            int q = nearest_int(xb[i] * iscale);
            o.qs[i] = (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
        }
        memcpy((uint8_t *)dst + (size_t)b * sizeof o, &o, sizeof o);
    }
}

/* Q8_K activations: d = amax/127 in f32, q = rne(x * 127/amax) clamped,
 * bsums over 16-value groups. */
void ds4_quant_act_q8_k_scalar(const float *x, void *dst, int64_t n) {
    ds4_block_q8_k *o = dst;
    for (int64_t b = 0; b < n / DS4_QK_K; b++) {
        const float *xb = x + b * DS4_QK_K;
        float amax = 0.0f;
        for (int i = 0; i < DS4_QK_K; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float iscale = amax > 0.0f ? 127.0f / amax : 0.0f;
        o[b].d = amax / 127.0f;
        for (int i = 0; i < DS4_QK_K; i++) {
            int q = nearest_int(xb[i] * iscale);
            o[b].qs[i] = (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
        }
        for (int k = 0; k < 16; k++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += o[b].qs[16 * k + i];
            o[b].bsums[k] = (int16_t)s;
        }
    }
}

/* ---- scalar int8 dots ----------------------------------------------------- */

static float dotq_q8_0(const void *row, const void *xq, int64_t n) {
    float sum = 0.0f;
    for (int64_t b = 0; b < n / DS4_QK8_0; b++) {
        ds4_block_q8_0 w, a;
        LOAD_BLOCK(ds4_block_q8_0, w, row, b);
        LOAD_BLOCK(ds4_block_q8_0, a, xq, b);
        int isum = 0;
        for (int i = 0; i < DS4_QK8_0; i++) isum += w.qs[i] * a.qs[i];
        sum += (f16_to_f32_inl(w.d) * f16_to_f32_inl(a.d)) * (float)isum;
    }
    return sum;
}

static float dotq_q4_k(const void *row, const void *xq, int64_t n) {
    const ds4_block_q8_k *a = xq;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / DS4_QK_K; b++) {
        ds4_block_q4_k w;
        LOAD_BLOCK(ds4_block_q4_k, w, row, b);
        int isum = 0, msum = 0;
        for (int j = 0; j < 8; j++) {
            int sc, m, s = 0;
            q4k_scale_min(w.scales, j, &sc, &m);
            const uint8_t *q = w.qs + 32 * (j / 2);
            const int8_t *aq = a[b].qs + 32 * j;
            for (int l = 0; l < 32; l++) s += ((j & 1) ? q[l] >> 4 : q[l] & 15) * aq[l];
            isum += sc * s;
            msum += m * (a[b].bsums[2 * j] + a[b].bsums[2 * j + 1]);
        }
        sum += a[b].d * (f16_to_f32_inl(w.d) * (float)isum - f16_to_f32_inl(w.dmin) * (float)msum);
    }
    return sum;
}

static float dotq_q2_k(const void *row, const void *xq, int64_t n) {
    const ds4_block_q8_k *a = xq;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / DS4_QK_K; b++) {
        ds4_block_q2_k w;
        LOAD_BLOCK(ds4_block_q2_k, w, row, b);
        int isum = 0, msum = 0;
        for (int j = 0; j < 16; j++) {
            int s = 0;
            for (int l = 0; l < 16; l++) {
                int i = 16 * j + l, h = i / 128, r = i % 128;
                s += ((w.qs[32 * h + r % 32] >> (2 * (r / 32))) & 3) * a[b].qs[i];
            }
            isum += (w.scales[j] & 15) * s;
            msum += (w.scales[j] >> 4) * a[b].bsums[j];
        }
        sum += a[b].d * (f16_to_f32_inl(w.d) * (float)isum - f16_to_f32_inl(w.dmin) * (float)msum);
    }
    return sum;
}

/* db*mag = d*(2*ls+1)*mag/8, so a block is d/8 * sum_g (2*ls_g+1)*isum_g. */
static float dotq_iq2_xxs(const void *row, const void *xq, int64_t n) {
    const ds4_block_q8_k *a = xq;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / DS4_QK_K; b++) {
        ds4_block_iq2_xxs w;
        LOAD_BLOCK(ds4_block_iq2_xxs, w, row, b);
        int bsum = 0;
        for (int g = 0; g < 8; g++) {
            uint32_t a0, a1;
            memcpy(&a0, &w.qs[4 * g], 4);
            memcpy(&a1, &w.qs[4 * g + 2], 4);
            int gsum = 0;
            for (int k = 0; k < 4; k++) {
                uint64_t grid = ds4_iq2xxs_grid[(uint8_t)(a0 >> (8 * k))];
                uint8_t signs = ds4_ksigns_iq2xs[(a1 >> (7 * k)) & 127];
                const int8_t *aq = a[b].qs + 32 * g + 8 * k;
                for (int j = 0; j < 8; j++) {
                    int v = (uint8_t)(grid >> (8 * j)) * aq[j];
                    gsum += (signs & (1 << j)) ? -v : v;
                }
            }
            bsum += (2 * (int)(a1 >> 28) + 1) * gsum;
        }
        sum += a[b].d * (f16_to_f32_inl(w.d) * 0.125f * (float)bsum);
    }
    return sum;
}

/* ---- kernel tables and dispatch ------------------------------------------- */

static const ds4_quant_kernels SCALAR[] = {
    {DS4_TYPE_F32, -1, dq_f32, dot_f32_f32, NULL, NULL, NULL, NULL},
    {DS4_TYPE_F16, -1, dq_f16, dot_f16_f32, NULL, NULL, NULL, NULL},
    {DS4_TYPE_BF16, -1, dq_bf16, dot_bf16_f32, NULL, NULL, NULL, NULL},
    {DS4_TYPE_I32, -1, dq_i32, NULL, NULL, NULL, NULL, NULL},
    {DS4_TYPE_Q8_0, DS4_TYPE_Q8_0, dq_q8_0, dot_q8_0_f32, dotq_q8_0, ds4_quant_act_q8_0_scalar, NULL, NULL},
    {DS4_TYPE_Q4_K, DS4_TYPE_Q8_K, dq_q4_k, dot_q4_k_f32, dotq_q4_k, ds4_quant_act_q8_k_scalar, NULL, NULL},
    {DS4_TYPE_Q2_K, DS4_TYPE_Q8_K, dq_q2_k, dot_q2_k_f32, dotq_q2_k, ds4_quant_act_q8_k_scalar, NULL, NULL},
    {DS4_TYPE_IQ2_XXS, DS4_TYPE_Q8_K, dq_iq2_xxs, dot_iq2_xxs_f32, dotq_iq2_xxs, ds4_quant_act_q8_k_scalar, NULL, NULL},
};
enum { N_KERNELS = sizeof SCALAR / sizeof SCALAR[0] };

/* AVX2 set merged over the scalar one, VNNI set over that, AMX over that;
 * filled once under simd_once. */
static ds4_quant_kernels avx2_merged[N_KERNELS], vnni_merged[N_KERNELS], amx_merged[N_KERNELS];
static int simd_best = DS4_SIMD_SCALAR;
static pthread_once_t simd_once = PTHREAD_ONCE_INIT;

/* AMX-INT8: the CPU has it (cpuid 7.0 EDX bits 24 tile, 25 int8) and Linux
 * grants this process the tile data state (arch_prctl, kernel 5.16+;
 * refused e.g. under hypervisors that do not pass it through). */
static int amx_usable(void) {
#if defined(__linux__) && defined(__x86_64__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

static void simd_init(void) {
    for (int i = 0; i < N_KERNELS; i++) {
        ds4_quant_kernels k = SCALAR[i];
        for (int j = 0; j < ds4_quant_avx2_n; j++) {
            const ds4_quant_kernels *v = &ds4_quant_avx2_table[j];
            if (v->type != k.type) continue;
            if (v->dequant) k.dequant = v->dequant;
            if (v->dot_f32) k.dot_f32 = v->dot_f32;
            if (v->dot_q) k.dot_q = v->dot_q;
            if (v->quantize_act) k.quantize_act = v->quantize_act;
            if (v->dot_q_tile) k.dot_q_tile = v->dot_q_tile;
            if (v->dot_f32_tile) k.dot_f32_tile = v->dot_f32_tile;
        }
        avx2_merged[i] = k;
        for (int j = 0; j < ds4_quant_vnni_n; j++) {
            const ds4_quant_kernels *v = &ds4_quant_vnni_table[j];
            if (v->type != k.type) continue;
            if (v->dot_q_tile) k.dot_q_tile = v->dot_q_tile;
        }
        vnni_merged[i] = k;
        for (int j = 0; j < ds4_quant_amx_n; j++) {
            const ds4_quant_kernels *v = &ds4_quant_amx_table[j];
            if (v->type != k.type) continue;
            if (v->dot_q_tile) k.dot_q_tile = v->dot_q_tile;
        }
        amx_merged[i] = k;
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    /* The AVX2 kernels also use FMA, BMI1/BMI2 and F16C; F16C via cpuid leaf 1
     * (ECX bit 29): clang's __builtin_cpu_supports
     * does not know "f16c". */
    unsigned a = 0, b = 0, c = 0, d = 0;
    int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
    if (ds4_quant_avx2_n > 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c &&
        __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")) {
        ds4_quant_avx2_init();
        simd_best = DS4_SIMD_AVX2;
        if (ds4_quant_vnni_n > 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni"))
            simd_best = DS4_SIMD_VNNI;
        /* DS4_CPU_NO_VBMI=1: the gather walk instead (A/B timing; the same bits) */
        const char *novbmi = getenv("DS4_CPU_NO_VBMI");
        if (simd_best == DS4_SIMD_VNNI && __builtin_cpu_supports("avx512vbmi") && !(novbmi && *novbmi == '1')) {
            ds4_quant_vbmi_init();
            ds4_quant_vbmi = 1;
        }
        if (simd_best == DS4_SIMD_VNNI && ds4_quant_amx_n > 0 && amx_usable()) simd_best = DS4_SIMD_AMX;
    }
#endif
}

int ds4_quant_simd_best(void) {
    pthread_once(&simd_once, simd_init);
    return simd_best;
}

const ds4_quant_kernels *ds4_quant_kernels_get(int type, int simd) {
    pthread_once(&simd_once, simd_init);
    if (simd == DS4_SIMD_AUTO) simd = simd_best;
    if (simd < DS4_SIMD_SCALAR || simd > simd_best) return NULL;
    for (int i = 0; i < N_KERNELS; i++)
        if (SCALAR[i].type == type)
            return simd == DS4_SIMD_AMX    ? &amx_merged[i]
                   : simd == DS4_SIMD_VNNI ? &vnni_merged[i]
                   : simd == DS4_SIMD_AVX2 ? &avx2_merged[i]
                                           : &SCALAR[i];
    return NULL;
}

/* Kernels for a row call; aborts on a programmer error (bad type or n). */
static const ds4_quant_kernels *row_kernels(int type, int64_t n, const char *what) {
    const ds4_quant_kernels *k = ds4_quant_kernels_get(type, DS4_SIMD_AUTO);
    if (!k) ds4_quant_fatal("%s: unsupported type %d (%s)", what, type, ds4_type_name(type));
    if (!ds4_type_row_ok(type, n))
        ds4_quant_fatal("%s: row of %lld values is not a whole number of %s blocks", what,
                        (long long)n, ds4_type_name(type));
    return k;
}

void ds4_dequant_row(int type, const void *src, float *dst, int64_t n) {
    row_kernels(type, n, "dequant")->dequant(src, dst, n);
}

float ds4_dot_row_f32(int type, const void *row, const float *x, int64_t n) {
    const ds4_quant_kernels *k = row_kernels(type, n, "dot_f32");
    if (!k->dot_f32) ds4_quant_fatal("dot_f32: no dot for type %s", ds4_type_name(type));
    return k->dot_f32(row, x, n);
}

float ds4_dot_row_q(int type, const void *row, const void *xq, int64_t n) {
    const ds4_quant_kernels *k = row_kernels(type, n, "dot_q");
    if (!k->dot_q) ds4_quant_fatal("dot_q: no int8 dot for type %s", ds4_type_name(type));
    if (!ds4_type_row_ok(k->act_type, n))
        ds4_quant_fatal("dot_q: row of %lld values does not fit %s blocks", (long long)n,
                        ds4_type_name(k->act_type));
    return k->dot_q(row, xq, n);
}

void ds4_quantize_act(int act_type, const float *x, void *dst, int64_t n) {
    int weight = act_type == DS4_TYPE_Q8_0 ? DS4_TYPE_Q8_0 : act_type == DS4_TYPE_Q8_K ? DS4_TYPE_Q4_K : -1;
    if (weight < 0) ds4_quant_fatal("quantize_act: %s is not an activation type", ds4_type_name(act_type));
    if (!ds4_type_row_ok(act_type, n))
        ds4_quant_fatal("quantize_act: %lld values is not a whole number of %s blocks", (long long)n,
                        ds4_type_name(act_type));
    ds4_quant_kernels_get(weight, DS4_SIMD_AUTO)->quantize_act(x, dst, n);
}

/* ---- quantization entry points -------------------------------------------- */

/* The f16 scales of the blocks just written are finite: values of normal
 * size can still need a block scale past F16's 65504 (Q8_0: d = amax / 127,
 * so amax > ~8.3e6), which would decode as inf or NaN. */
static int scales_finite(int type, const uint8_t *o, int64_t n) {
    const int64_t nb = n / ds4_type_get(type)->block_elems;
    for (int64_t b = 0; b < nb; b++) {
        uint16_t h[2];
        int k = 1;
        switch (type) {
        case DS4_TYPE_Q8_0: memcpy(h, &((const ds4_block_q8_0 *)o)[b].d, 2); break;
        case DS4_TYPE_IQ2_XXS: memcpy(h, &((const ds4_block_iq2_xxs *)o)[b].d, 2); break;
        case DS4_TYPE_Q4_K:
            memcpy(&h[0], &((const ds4_block_q4_k *)o)[b].d, 2);
            memcpy(&h[1], &((const ds4_block_q4_k *)o)[b].dmin, 2);
            k = 2;
            break;
        case DS4_TYPE_Q2_K:
            memcpy(&h[0], &((const ds4_block_q2_k *)o)[b].d, 2);
            memcpy(&h[1], &((const ds4_block_q2_k *)o)[b].dmin, 2);
            k = 2;
            break;
        default: return 1;
        }
        for (int i = 0; i < k; i++)
            if ((h[i] & 0x7c00) == 0x7c00) return 0;
    }
    return 1;
}

size_t ds4_quantize_row(int type, const float *src, void *dst, int64_t n, const float *imatrix) {
    const ds4_type_traits *t = ds4_type_get(type);
    if (!t || !t->can_quantize || !ds4_type_row_ok(type, n)) return 0;
    uint8_t *o = dst;
    if (type == DS4_TYPE_IQ2_XXS && !imatrix) return 0;
    if (type != DS4_TYPE_F32 && type != DS4_TYPE_F16 && type != DS4_TYPE_BF16) {
        /* the block quantizers' searches assume finite values, and squares
         * that do not overflow (|x| < ~1.8e19); no block type here can
         * represent |x| past ~1e8 anyway (F16 block scales: Q8_0 ~8.3e6) */
        for (int64_t i = 0; i < n; i++)
            if (!(fabsf(src[i]) <= 1e9f)) return 0;
        if (imatrix && type != DS4_TYPE_Q8_0)
            for (int64_t i = 0; i < n; i++)
                if (!isfinite(imatrix[i]) || imatrix[i] < 0) return 0;
    }
    switch (type) {
    case DS4_TYPE_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case DS4_TYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = ds4_f32_to_f16(src[i]);
            memcpy(o + 2 * i, &h, 2);
        }
        break;
    case DS4_TYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = ds4_f32_to_bf16(src[i]);
            memcpy(o + 2 * i, &h, 2);
        }
        break;
    case DS4_TYPE_Q8_0:
        ds4_quant_ref_q8_0(src, dst, n);
        break;
    case DS4_TYPE_Q4_K:
        ds4_quant_ref_q4_k(src, dst, n, imatrix);
        break;
    case DS4_TYPE_Q2_K:
        ds4_quant_ref_q2_k(src, dst, n, imatrix);
        break;
    case DS4_TYPE_IQ2_XXS:
        ds4_quant_ref_iq2_xxs(src, dst, n, imatrix);
        break;
    default:
        return 0;
    }
    if (!scales_finite(type, o, n)) return 0;
    return ds4_type_row_bytes(type, n);
}

int ds4_quantize_rows(int type, const float *src, void *dst, int64_t n_rows, int64_t n_cols,
                      const float *imatrix, ds4_err *err) {
    const ds4_type_traits *t = ds4_type_get(type);
    if (!t || !t->can_quantize)
        return ds4_err_set(err, DS4_E_ARG, "quantize: cannot produce type %d (%s)", type, ds4_type_name(type));
    if (n_rows < 0 || !ds4_type_row_ok(type, n_cols))
        return ds4_err_set(err, DS4_E_ARG, "quantize: %lld x %lld does not fit %s blocks of %d",
                           (long long)n_rows, (long long)n_cols, t->name, t->block_elems);
    size_t row_bytes = ds4_type_row_bytes(type, n_cols);
    float *imp = NULL;
    if (type == DS4_TYPE_IQ2_XXS && !imatrix && n_cols > 0) {
        /* synthetic importance of docs/FORMATS.md C.6: column sums of squares */
        imp = calloc((size_t)n_cols, sizeof *imp);
        if (!imp) return ds4_err_set(err, DS4_E_NOMEM, "quantize: no memory for %lld importances", (long long)n_cols);
        for (int64_t r = 0; r < n_rows; r++)
            for (int64_t c = 0; c < n_cols; c++) imp[c] += src[r * n_cols + c] * src[r * n_cols + c];
        imatrix = imp;
    }
    for (int64_t r = 0; r < n_rows; r++) {
        if (n_cols > 0 &&
            !ds4_quantize_row(type, src + r * n_cols, (uint8_t *)dst + (size_t)r * row_bytes, n_cols, imatrix)) {
            free(imp);
            return ds4_err_set(err, DS4_E_ARG,
                               "quantize %s: row %lld has a non-finite value or importance, or values too large "
                               "for its F16 block scales", t->name, (long long)r);
        }
    }
    free(imp);
    return 0;
}
