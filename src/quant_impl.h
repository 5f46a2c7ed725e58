/* quant_impl.h - internals shared by the quant_*.c files (not a public API).
 *
 * quant.c owns the scalar kernels, the type dispatch and the SIMD choice;
 * quant_avx2.c provides AVX2/FMA kernels with the same contracts;
 * quant_ref.c holds the reference quantizers. Scalar helpers that every
 * path must compute identically (f16 decode, nearest_int) live here as
 * static inline functions so there is exactly one definition of each.
 */
#ifndef DS4_QUANT_IMPL_H
#define DS4_QUANT_IMPL_H

#include <string.h>

#include "quant.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "quant formats are little-endian; big-endian hosts are not supported");

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE binary16 -> binary32, exact (subnormals and NaN payloads kept);
 * inline so the hot dot/dequant kernels do not pay a call per block scale.
 * ds4_f16_to_f32 (quant.c) is this function. */
static inline float f16_to_f32_inl(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000 | (man << 13)); /* inf/NaN */
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24, exact in binary32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* Round-half-to-even for |v| <= 4194303 (docs/FORMATS.md C.0): the sum with
 * 1.5*2^23 puts the integer part in the low mantissa bits. */
static inline int nearest_int(float v) {
    float val = v + 12582912.f;
    return (int)(f32_bits(val) & 0x007fffff) - 0x00400000;
}

/* Aborts with a message: a programmer error (bad type id or row length). */
_Noreturn void ds4_quant_fatal(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

/* Scalar activation quantizers (round-half-to-even, see quant.c). */
void ds4_quant_act_q8_0_scalar(const float *x, void *dst, int64_t n);
void ds4_quant_act_q8_k_scalar(const float *x, void *dst, int64_t n);

/* AVX2 kernel table, one entry per supported type, in any order; n = 0
 * when the build has no x86 AVX2 code. quant.c fills any NULL member of an
 * entry from the scalar table. */
extern const ds4_quant_kernels ds4_quant_avx2_table[];
extern const int ds4_quant_avx2_n;
/* AVX-512 VNNI tiles, merged over the AVX2 set (quant_avx2.c) */
extern const ds4_quant_kernels ds4_quant_vnni_table[];
extern const int ds4_quant_vnni_n;
/* AMX-INT8 tiles, merged over the VNNI set (quant_avx2.c) */
extern const ds4_quant_kernels ds4_quant_amx_table[];
extern const int ds4_quant_amx_n;
/* Builds the AVX2 kernels' run-time tables; quant.c calls it once, under
 * its pthread_once, before any AVX2 kernel can be handed out. */
void ds4_quant_avx2_init(void);
/* Non-zero when the VNNI level may use AVX-512 VBMI kernels (quant.c sets it
 * once with ds4_quant_vbmi_init; tests clear it to check the other path). */
extern int ds4_quant_vbmi;
void ds4_quant_vbmi_init(void);

/* IQ2_XXS neighbour search (quant_ref.c): the cost of candidate j < n is
 * d2[j] = the sum over i = 0..7, in that order from 0, of
 * cost[4*i + ((u[j] >> 2i) & 3)]; returns the first j whose d2[j] is
 * strictly smallest and below FLT_MAX (NaN never wins), or -1 if none.
 * The AVX2 version reads u[] up to n rounded up to a multiple of 8 (callers
 * pad) and returns the same j: its lane sums are the same additions in the
 * same order (no FMA), and its lane-wise minima are merged smallest value,
 * then smallest j, which is the sequential scan's answer. */
int ds4_iq2_nearest_scalar(const uint16_t *u, int n, const float cost[32]);
int ds4_iq2_nearest_avx2(const uint16_t *u, int n, const float cost[32]);

/* Reference quantizers (quant_ref.c); one row each, n % block == 0. */
void ds4_quant_ref_q8_0(const float *x, void *dst, int64_t n);
void ds4_quant_ref_q4_k(const float *x, void *dst, int64_t n, const float *qw);
void ds4_quant_ref_q2_k(const float *x, void *dst, int64_t n, const float *qw);
void ds4_quant_ref_iq2_xxs(const float *x, void *dst, int64_t n, const float *qw);

#endif
