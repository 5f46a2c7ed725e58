/* quant.h - every tensor format of ds4, stated once: block layouts, type
 * traits, dequantization, dot products, reference quantizers, and decoding
 * of the official checkpoint's FP8 E4M3FN / FP4 E2M1 weights.
 *
 * Type ids are ggml's (docs/FORMATS.md §B.0). Block layouts follow docs/FORMATS.md
 * §B.2-B.5 byte for byte; every multi-byte field is little-endian (the code
 * assumes a little-endian host, checked at compile time).
 *
 * Weight type -> int8 activation type used by the fast dot (ds4_dot_row_q):
 *   Q8_0                    -> Q8_0 activations (32-value blocks, f16 scale)
 *   Q4_K, Q2_K, IQ2_XXS     -> Q8_K activations (256-value blocks, f32 scale,
 *                              16 int16 partial sums)
 *   F32, F16, BF16, I32     -> none (use ds4_dot_row_f32)
 * ds4_type_act(type) returns it. Rows passed to any row function must hold a
 * whole number of blocks (n % block_elems == 0), otherwise the call is a
 * programmer error and aborts (ds4_type_row_ok() checks beforehand).
 *
 * Thread-safety: everything here is thread-safe. Lookup tables are static
 * const data (src/quant_tables.c, generated from tests/data/tables); the
 * IQ2_XXS quantizer's neighbour tables and the SIMD selection are built once
 * on first use under pthread_once.
 *
 * Files: quant.c (traits, conversions, scalar kernels, dispatch), quant_ref.c
 * (reference quantizers), quant_avx2.c (AVX2/FMA/F16C kernels chosen at run
 * time), quant_tables.c (generated tables), quant_impl.h (internal).
 */
#ifndef DS4_QUANT_H
#define DS4_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

/* Also included by the CUDA backend's C++ (.cu) files. */
#ifdef __cplusplus
#define DS4_QUANT_STATIC_ASSERT static_assert
extern "C" {
#else
#define DS4_QUANT_STATIC_ASSERT _Static_assert
#endif

/* ggml type ids (docs/FORMATS.md §B.0). Only these are supported by ds4. */
enum {
    DS4_TYPE_F32 = 0,
    DS4_TYPE_F16 = 1,
    DS4_TYPE_Q8_0 = 8,
    DS4_TYPE_Q2_K = 10,
    DS4_TYPE_Q4_K = 12,
    DS4_TYPE_Q8_K = 15, /* activation-only: never stored in files */
    DS4_TYPE_IQ2_XXS = 16,
    DS4_TYPE_I32 = 26,
    DS4_TYPE_BF16 = 30,
};

#define DS4_QK8_0 32 /* values per Q8_0 block */
#define DS4_QK_K 256 /* values per K-quant / IQ2_XXS / Q8_K super-block */

/* ---- block layouts ------------------------------------------------------ */

/* Q8_0: y[i] = f16(d) * qs[i]. */
typedef struct ds4_block_q8_0 {
    uint16_t d;              /* f16 scale */
    int8_t qs[DS4_QK8_0];    /* quants */
} ds4_block_q8_0;

/* Q4_K: 8 sub-blocks of 32; y = (d*sc[j])*q - (dmin*m[j]), q in 0..15. */
typedef struct ds4_block_q4_k {
    uint16_t d;              /* f16 super-scale of the 6-bit sub-block scales */
    uint16_t dmin;           /* f16 super-scale of the 6-bit sub-block mins */
    uint8_t scales[12];      /* 8 scales + 8 mins, 6 bits each, packed (§B.3) */
    uint8_t qs[DS4_QK_K / 2];/* nibbles: qs[32c+l] = value 64c+l (lo), 64c+32+l (hi) */
} ds4_block_q4_k;

/* Q2_K: 16 sub-blocks of 16; y = (d*(sc&15))*q - (dmin*(sc>>4)), q in 0..3. */
typedef struct ds4_block_q2_k {
    uint8_t scales[16];      /* lo nibble scale, hi nibble min, per sub-block */
    uint8_t qs[DS4_QK_K / 4];/* qs[32h+l] bits 2k..2k+1 = value 128h+32k+l */
    uint16_t d;              /* f16 */
    uint16_t dmin;           /* f16 */
} ds4_block_q2_k;

/* IQ2_XXS: 8 groups of 32 = 4 sub-groups of 8 on the E8-like grid (§B.5).
 * qs[4g..4g+3] as two LE uint32: a0 = 4 grid indices (one byte each),
 * a1 = 4 x 7-bit sign indices (bits 7k..7k+6) + 4-bit group scale (bits 28..31). */
typedef struct ds4_block_iq2_xxs {
    uint16_t d;              /* f16 */
    uint16_t qs[DS4_QK_K / 8];
} ds4_block_iq2_xxs;

/* Q8_K activation block: x[i] ~= d * qs[i]; bsums[k] = sum of qs[16k..16k+15]
 * (lets the K-quant dots apply the sub-block mins without touching qs). */
typedef struct ds4_block_q8_k {
    float d;
    int8_t qs[DS4_QK_K];
    int16_t bsums[DS4_QK_K / 16];
} ds4_block_q8_k;

DS4_QUANT_STATIC_ASSERT(sizeof(ds4_block_q8_0) == 34, "Q8_0 block is 34 bytes");
DS4_QUANT_STATIC_ASSERT(sizeof(ds4_block_q4_k) == 144, "Q4_K block is 144 bytes");
DS4_QUANT_STATIC_ASSERT(sizeof(ds4_block_q2_k) == 84, "Q2_K block is 84 bytes");
DS4_QUANT_STATIC_ASSERT(sizeof(ds4_block_iq2_xxs) == 66, "IQ2_XXS block is 66 bytes");
DS4_QUANT_STATIC_ASSERT(sizeof(ds4_block_q8_k) == 292, "Q8_K block is 292 bytes");

/* ---- type traits -------------------------------------------------------- */

typedef struct ds4_type_traits {
    int type;                /* ggml id */
    const char *name;        /* "q4_K", as ggml spells it */
    int block_elems;         /* values per block */
    int block_bytes;         /* bytes per block */
    int act_type;            /* int8 activation type for ds4_dot_row_q, or -1 */
    int can_quantize;        /* ds4_quantize_row supports it */
} ds4_type_traits;

/* Traits of a supported type id, or NULL for any other id (never aborts). */
const ds4_type_traits *ds4_type_get(int type);
/* Name of any ggml type id (also unsupported ones, for messages), or "?". */
const char *ds4_type_name(int type);
/* 1 when type is supported and n >= 0 is a whole number of its blocks. */
int ds4_type_row_ok(int type, int64_t n);
/* Bytes of a row of n values; 0 when !ds4_type_row_ok(type, n). */
size_t ds4_type_row_bytes(int type, int64_t n);
/* The activation type of ds4_dot_row_q for weight type `type`, or -1. */
int ds4_type_act(int type);

/* ---- scalar conversions (B.1; exact, round-to-nearest-even) ------------- */

float ds4_f16_to_f32(uint16_t h);
uint16_t ds4_f32_to_f16(float f);   /* overflow -> inf, NaN -> 0x7E00|sign */
float ds4_bf16_to_f32(uint16_t h);
uint16_t ds4_f32_to_bf16(float f);  /* NaN -> top 16 bits | 0x40 */

/* ---- row operations (thread-safe; no per-call allocation) ---------------- */

/* dst[0..n) = dequantized src (a row of `type`: F32, F16, BF16, Q8_0, Q2_K,
 * Q4_K, IQ2_XXS; I32 converts the integers to float). Bit-identical to
 * gguf-py's dequantize for every type it knows, on every SIMD path (NaN
 * payloads aside: F16C quiets signalling NaNs). */
void ds4_dequant_row(int type, const void *src, float *dst, int64_t n);

/* sum_i dequant(row)[i] * x[i] for a row of n values (types as above except
 * I32). SIMD paths sum in another order: results differ by float rounding
 * only (tests bound it by 1e-5 * sum_i |y_i * x_i|). */
float ds4_dot_row_f32(int type, const void *row, const float *x, int64_t n);

/* Quantizes activations x[0..n) to act_type (DS4_TYPE_Q8_0 or DS4_TYPE_Q8_K;
 * dst holds n / block_elems blocks). Deterministic on every SIMD path. */
void ds4_quantize_act(int act_type, const float *x, void *dst, int64_t n);

/* sum_i dequant(row)[i] * xq[i], xq quantized with ds4_type_act(type).
 * Integer sums are exact; only the per-block float combination is rounded. */
float ds4_dot_row_q(int type, const void *row, const void *xq, int64_t n);

/* Reference quantizer (docs/FORMATS.md §C): writes one row of n values of `type`
 * (F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS) to dst and returns its byte
 * count. imatrix: n importance values (one per column) or NULL. Q8_0, F16,
 * BF16, F32 ignore it; Q4_K/Q2_K use the weighted path when given; IQ2_XXS
 * requires it (returns 0 and writes nothing when NULL: use ds4_quantize_rows,
 * which builds the synthetic importance of §C.6). Returns 0 (and writes
 * nothing) for a type it cannot produce, a bad n, a non-finite value in a
 * block type's row, or a negative/non-finite importance. Scalar, byte-exact
 * with ggml's reference quantizers when built with -ffp-contract=off
 * (checked against tests/data/quant_golden).
 * Thread-safe. For IQ2_XXS the first call builds its search tables (a few ms). */
size_t ds4_quantize_row(int type, const float *src, void *dst, int64_t n,
                        const float *imatrix);

/* Quantizes a matrix src (n_rows, n_cols) row by row into dst
 * (n_rows * ds4_type_row_bytes(type, n_cols) bytes). imatrix: n_cols values
 * or NULL; for IQ2_XXS, NULL means the synthetic importance
 * imp[c] = sum_r src[r][c]^2 over this matrix (§C.6; allocated here).
 * Returns 0, DS4_E_ARG (bad type/shape, non-finite input), or DS4_E_NOMEM;
 * fills err. Thread-safe. */
int ds4_quantize_rows(int type, const float *src, void *dst, int64_t n_rows,
                      int64_t n_cols, const float *imatrix, ds4_err *err);

/* ---- per-type kernels, for callers that bind once and call often -------- */

/* levels: each includes the one below (VNNI = AVX2 with AVX-512 VNNI tiles,
 * AMX = VNNI with AMX-INT8 tiles; every level computes the same bits) */
enum { DS4_SIMD_AUTO = 0, DS4_SIMD_SCALAR = 1, DS4_SIMD_AVX2 = 2, DS4_SIMD_VNNI = 3, DS4_SIMD_AMX = 4 };

typedef struct ds4_quant_kernels {
    int type;
    int act_type;                                              /* or -1 */
    void (*dequant)(const void *src, float *dst, int64_t n);
    float (*dot_f32)(const void *row, const float *x, int64_t n); /* NULL for I32 */
    float (*dot_q)(const void *row, const void *xq, int64_t n);   /* NULL without act_type */
    void (*quantize_act)(const float *x, void *xq, int64_t n);    /* act_type's; NULL without */
    /* Tiles, for matrix products (NULL when the type has none: call the
     * row dot per pair). For r < n_rows and t < n_tok:
     *   dot_q_tile:   y[t * ldy + r] = dot_q(w + r * row_bytes, xq[t], n)
     *   dot_f32_tile: y[t * ldy + r] = dot_f32(w + r * row_bytes, x[t], n)
     * bit for bit, whatever n_rows and n_tok: every pair goes through the
     * row dot's operations in the row dot's order. A tile only lets a
     * weight block be decoded once for several tokens, and several pairs
     * share one horizontal reduction and one vector of float combinations.
     * Weights are read n_tok / (tokens per micro-tile) times: keep
     * n_rows * row_bytes cache-sized. Thread-safe. */
    void (*dot_q_tile)(const void *w, size_t row_bytes, int n_rows, const void *const *xq, int n_tok, int64_t n,
                       float *y, int64_t ldy);
    void (*dot_f32_tile)(const void *w, size_t row_bytes, int n_rows, const float *const *x, int n_tok, int64_t n,
                         float *y, int64_t ldy);
} ds4_quant_kernels;

/* Kernels of `type` for a SIMD level (AUTO = best the CPU supports). Returns
 * NULL for an unsupported type, or when `simd` is not available on this CPU
 * or in this build. The result is static: never freed. Thread-safe. */
const ds4_quant_kernels *ds4_quant_kernels_get(int type, int simd);
/* SIMD level AUTO resolves to on this machine (SCALAR or AVX2). */
int ds4_quant_simd_best(void);

/* ---- official checkpoint decoding (docs/FORMATS.md §E.3) --------------------- */

float ds4_fp8_e4m3_to_f32(uint8_t c);  /* 0x7f/0xff -> NaN */
float ds4_fp4_e2m1_to_f32(uint8_t c);  /* low 4 bits used */
float ds4_ue8m0_to_f32(uint8_t s);     /* 2^(s-127); 255 -> NaN */

/* One row of an FP8 E4M3FN matrix with 128x128 tiles of ue8m0 scales:
 * dst[c] = e4m3(w[c]) * ue8m0(scales[c / 128]) for c in 0..n-1, where
 * `scales` points at the scale row of this row's tile row (ceil(n/128)
 * bytes: scale + (r/128) * ceil(n_cols/128)). Any n >= 0. */
void ds4_fp8_dequant_row(const uint8_t *w, const uint8_t *scales, float *dst,
                         int64_t n);

/* A whole FP8 matrix w (n_rows, n_cols) with scales (ceil(n_rows/128),
 * ceil(n_cols/128)) into dst (n_rows, n_cols); rows/cols need not be
 * multiples of 128. The caller checks the scale tensor's shape. */
void ds4_fp8_dequant_matrix(const uint8_t *w, const uint8_t *scales, float *dst,
                            int64_t n_rows, int64_t n_cols);

/* One row of FP4 E2M1 weights, two codes per byte (element 2j = low nibble
 * of byte j), one ue8m0 scale per 32 elements:
 * dst[i] = e2m1(code_i) * ue8m0(scales[i / 32]). n must be a multiple of 32
 * (packed: n/2 bytes, scales: n/32 bytes). */
void ds4_fp4_dequant_row(const uint8_t *packed, const uint8_t *scales,
                         float *dst, int64_t n);

/* ---- tables (src/quant_tables.c, generated by tools/gen_quant_tables.py) */

extern const uint64_t ds4_iq2xxs_grid[256];   /* 8 magnitude bytes (8/25/43) */
extern const uint16_t ds4_iq2xxs_kgrid[256];  /* 2-bit levels, quantizer form */
extern const uint8_t ds4_ksigns_iq2xs[128];   /* 7 sign bits + parity bit */
extern const uint8_t ds4_kmask_iq2xs[8];      /* 1 << j */
extern const uint32_t ds4_e4m3fn_bits[256];   /* f32 bit pattern per FP8 code */
extern const float ds4_fp4_e2m1_values[16];   /* value per FP4 code */

#ifdef __cplusplus
}
#endif

#endif
