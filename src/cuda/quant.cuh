/* quant.cuh - per-format device code of the CUDA backend: decoding one
 * 32-value chunk of a weight row (device layout, cuda.cuh) and its int8
 * dot with quantized activations. This is the only place that knows block
 * formats on the GPU; every kernel is templated on the type and calls
 * these. Formats and formulas follow src/quant.c:
 *  - f32 path: dequantize (same expressions as quant.c's dq_*), then FMA;
 *  - int8 path (act_quant, E.1): the integer sums of quant.c's dotq_* are
 *    exact; a K-quant super-block spans 8 consecutive chunks (lanes), whose
 *    integer partials are combined by the caller before the one float
 *    expression per super-block that quant.c uses.
 * Chunk c of a row = values [32c, 32c+32).
 */
#ifndef DS4_CUDA_QUANT_CUH
#define DS4_CUDA_QUANT_CUH

#include "cuda/cuda.cuh"

/* Weight loads, with ld.global.cs (evict-first in L1 and L2) by default:
 * a decode step streams ~9.6 GB of weights through the 50-60 MB L2, so with
 * plain loads every line of kernel code and every small table is evicted
 * between two calls of the same kernel (one layer later) and the serial
 * tails (HC-pre's finish, the router, the finishes of q/kv) run cold code.
 * With the weights first to go, more of the rest stays in L2 (H100, q2:20 at
 * 2k: decode 207.4-208.3 -> 217.4-217.9 tok/s). CU_WEIGHT_CS=0 (make cuda
 * NVDEFS=-DCU_WEIGHT_CS=0) gives plain loads. The same values either way. */
#ifndef CU_WEIGHT_CS
#define CU_WEIGHT_CS 1
#endif
template <class T> __device__ __forceinline__ T cu_wld(const T *p) {
#if CU_WEIGHT_CS
    return __ldcs(p);
#else
    return *p;
#endif
}
/* Cache-row loads of one-token indexer scoring (k_idx_scores_mma in decode,
 * where each indexer row is read exactly once per step: ~1.4 GB per token at
 * 1M), evict-first when built with CU_KV_CS=1 (make cuda NVDEFS=-DCU_KV_CS=1;
 * default 0, not yet measured), so that, like the weights, they do not push
 * kernel code out of L2. (Not for k_attn_part: its head-group blocks read
 * each row 4 or 16 times per step.) cs: the caller's one-token condition.
 * The same values either way. */
#ifndef CU_KV_CS
#define CU_KV_CS 0
#endif
template <class T> __device__ __forceinline__ T cu_kvld(const T *p, bool cs) {
#if CU_KV_CS
    return cs ? __ldcs(p) : *p;
#else
    (void)cs;
    return *p;
#endif
}
__device__ __forceinline__ float cu_h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t cu_ld16(const uint8_t *p) { return cu_wld((const unsigned short *)p); }
__device__ __forceinline__ uint32_t cu_ld32(const uint8_t *p) { return cu_wld((const unsigned int *)p); }

/* How the signs of an IQ2_XXS group are applied to its 8 grid bytes (every
 * grid byte is 8, 25 or 43), a build option (make cuda NVDEFS=-DCU_IQ2_SIGNS=N),
 * both giving the same signed bytes (unit test
 * quant_iq2xxs_signed_bytes_by_xor_add_are_exact):
 *   0  the ksigns byte spread to byte masks by shifts (cu_sign_mask4), then
 *      __vsub4(g ^ m, m): the form measured and tested on the H200 through
 *      the ninth session;
 *   3  the sign byte computed instead of read from the table, ksigns[i] =
 *      i | parity(i) << 7 (the 8th sign makes the count of negatives even;
 *      the unit test checks the identity for all 128 entries), spread in
 *      registers, ((s & 15) * 0x00204081) & 0x01010101 (bit j to bit 8j, no
 *      carries), and applied as (g ^ m) + (m & 0x01010101): the default
 *      (H100, q2:20 at 2k: routed experts 1.379 -> 1.306 ms per token,
 *      decode 203.4 -> 207.3 tok/s).
 * Tried and dropped (dev/cuda_notes.md, fifteenth and sixteenth sessions):
 * a 64-bit mask table in shared memory (1), the table's sign byte spread in
 * registers (2: mode 3 without the computed byte), and the grid as 2-bit level
 * codes with the signs OR-ed into byte-permute selectors over the signed
 * levels (4, 5: 1.10x in dev/moe_bench.cu's kernel alone, no change in the
 * decode step: H100 q2:20 204.6 / 204.2 vs 204.8 tok/s). */
#ifndef CU_IQ2_SIGNS
#define CU_IQ2_SIGNS 3
#endif
#if CU_IQ2_SIGNS != 0 && CU_IQ2_SIGNS != 3
#error "CU_IQ2_SIGNS: 0 or 3"
#endif

/* The IQ2_XXS tables, loaded into shared memory by kernels that need them:
 * the grid and the 7-bit -> 8-sign table. */
struct cu_iq2_tab {
    uint64_t grid[256];
    uint8_t ksigns[128];
};

__device__ __forceinline__ void cu_iq2_tab_load(cu_iq2_tab *t, const uint64_t *grid, const uint8_t *ksigns) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) t->grid[i] = grid[i];
    for (int i = threadIdx.x; i < 128; i += blockDim.x) t->ksigns[i] = ksigns[i];
}

/* byte mask (0x00 / 0xff per byte) of the low 4 bits of s */
__device__ __forceinline__ uint32_t cu_sign_mask4(uint32_t s) {
    uint32_t m = (s & 1u) | ((s & 2u) << 7) | ((s & 4u) << 14) | ((s & 8u) << 21);
    return m * 0xffu;
}

/* Four signed grid bytes from four magnitudes g and their byte masks m:
 * (g ^ m) + 1 = 256 - g where m = 0xff, g where m = 0, with no carry between
 * bytes since g >= 1: __vsub4(g ^ m, m) in plain integer operations. */
__device__ __forceinline__ uint32_t cu_iq2_signed4(uint32_t g, uint32_t m) { return (g ^ m) + (m & 0x01010101u); }

/* The 8 signed bytes (low, high word) of grid entry `grid` under sign index
 * i (7 bits). */
__device__ __forceinline__ void cu_iq2_signed8(const cu_iq2_tab *t, uint64_t grid, uint32_t i, uint32_t *v0,
                                               uint32_t *v1) {
    const uint32_t g0 = (uint32_t)grid, g1 = (uint32_t)(grid >> 32);
#if CU_IQ2_SIGNS == 3
    const uint32_t s = i | (__popc(i) & 1u) << 7;
    const uint32_t b0 = (s & 15u) * 0x00204081u & 0x01010101u, b1 = ((s >> 4) & 15u) * 0x00204081u & 0x01010101u;
    *v0 = (g0 ^ (b0 * 0xffu)) + b0;
    *v1 = (g1 ^ (b1 * 0xffu)) + b1;
#else
    const uint32_t s = t->ksigns[i], m0 = cu_sign_mask4(s), m1 = cu_sign_mask4(s >> 4);
    *v0 = __vsub4(g0 ^ m0, m0);
    *v1 = __vsub4(g1 ^ m1, m1);
#endif
}

/* The 8 signed bytes of grid entry gi under sign index si (7 bits): the
 * IQ2_XXS value bytes of every int8 kernel. */
__device__ __forceinline__ void cu_iq2_signed8_i(const cu_iq2_tab *t, uint32_t gi, uint32_t si, uint32_t *v0,
                                                 uint32_t *v1) {
    cu_iq2_signed8(t, t->grid[gi], si, v0, v1);
}

__device__ __forceinline__ void cu_q4k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* ---------------------------------------------------------------- f32 path */

/* v[0..32) = dequantized chunk c of a row (qrow/srow: the row's planes). */
template <int WT>
__device__ __forceinline__ void cu_dq_chunk(const uint8_t *qrow, const uint8_t *srow, int c, float *v,
                                            const cu_iq2_tab *tab) {
    if constexpr (WT == DS4_TYPE_F32) {
        const float4 *p = (const float4 *)(qrow + (size_t)c * 128);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float4 f = p[i];
            v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
        }
    } else if constexpr (WT == DS4_TYPE_F16 || WT == DS4_TYPE_BF16) {
        const uint4 *p = (const uint4 *)(qrow + (size_t)c * 64);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint4 u = cu_wld(p + i);
            uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                uint16_t lo = (uint16_t)(w[k] & 0xffff), hi = (uint16_t)(w[k] >> 16);
                if constexpr (WT == DS4_TYPE_F16) {
                    v[8 * i + 2 * k] = cu_h2f(lo);
                    v[8 * i + 2 * k + 1] = cu_h2f(hi);
                } else {
                    v[8 * i + 2 * k] = __uint_as_float((uint32_t)lo << 16);
                    v[8 * i + 2 * k + 1] = __uint_as_float((uint32_t)hi << 16);
                }
            }
        }
    } else if constexpr (WT == DS4_TYPE_Q8_0) {
        const uint4 *p = (const uint4 *)(qrow + (size_t)c * 32);
        float d = cu_h2f(cu_ld16(srow + 2 * (size_t)c));
#pragma unroll
        for (int i = 0; i < 2; i++) {
            uint4 u = cu_wld(p + i);
            uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int k = 0; k < 16; k++) v[16 * i + k] = d * (float)(int8_t)(w[k / 4] >> (8 * (k % 4)));
        }
    } else if constexpr (WT == DS4_TYPE_Q4_K) {
        const uint8_t *b = qrow + (size_t)(c >> 3) * 144;
        int j = c & 7;
        float d = cu_h2f(cu_ld16(b)), dmin = cu_h2f(cu_ld16(b + 2));
        int sc, m;
        cu_q4k_scale_min(b + 4, j, &sc, &m);
        float dl = d * (float)sc, ml = dmin * (float)m;
        const uint4 *p = (const uint4 *)(b + 16 + 32 * (j >> 1));
        int sh = (j & 1) * 4;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            uint4 u = p[i];
            uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int k = 0; k < 16; k++) v[16 * i + k] = dl * (float)((w[k / 4] >> (8 * (k % 4) + sh)) & 15) - ml;
        }
    } else if constexpr (WT == DS4_TYPE_Q2_K) {
        const uint8_t *b = qrow + (size_t)(c >> 3) * 84;
        int j = c & 7, h = j >> 2, k2 = 2 * (j & 3);
        float d = cu_h2f(cu_ld16(b + 80)), dmin = cu_h2f(cu_ld16(b + 82));
#pragma unroll
        for (int s = 0; s < 2; s++) {
            int sc = b[8 * h + (j & 3) * 2 + s];
            float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
#pragma unroll
            for (int w4 = 0; w4 < 4; w4++) {
                uint32_t w = cu_ld32(b + 16 + 32 * h + 16 * s + 4 * w4);
#pragma unroll
                for (int k = 0; k < 4; k++) v[16 * s + 4 * w4 + k] = dl * (float)((w >> (8 * k + k2)) & 3) - ml;
            }
        }
    } else if constexpr (WT == DS4_TYPE_IQ2_XXS) {
        int g = c & 7;
        const uint8_t *p = qrow + (size_t)(c >> 3) * 64 + 8 * g;
        uint32_t a0 = cu_ld32(p), a1 = cu_ld32(p + 4);
        float d = cu_h2f(cu_ld16(srow + 2 * (size_t)(c >> 3)));
        float db = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            uint64_t grid = tab->grid[(a0 >> (8 * k)) & 0xff];
            uint8_t signs = tab->ksigns[(a1 >> (7 * k)) & 127];
#pragma unroll
            for (int m = 0; m < 8; m++) {
                float x = db * (float)(uint8_t)(grid >> (8 * m));
                v[8 * k + m] = (signs >> m) & 1 ? -x : x;
            }
        }
    }
}

/* ---------------------------------------------------------------- int8 path */

/* Integer partial of chunk c against 32 int8 activations aq (16-byte
 * aligned) and, for K-quants, the chunk's two Q8_K group sums bs0/bs1.
 * Q8_0: *isum = sum w*a, *fscale = d_w (the caller multiplies by d_a).
 * K-quants: *isum, *msum are this chunk's share of quant.c's super-block
 * isum / msum (IQ2_XXS: bsum; msum 0), and *fscale the super-block's d. */
template <int WT>
__device__ __forceinline__ void cu_dotq_chunk(const uint8_t *qrow, const uint8_t *srow, int c, const int8_t *aq,
                                              int bs0, int bs1, int *isum, int *msum, float *d, float *dmin,
                                              const cu_iq2_tab *tab) {
    const int4 a01 = ((const int4 *)aq)[0], a23 = ((const int4 *)aq)[1];
    const int a[8] = {a01.x, a01.y, a01.z, a01.w, a23.x, a23.y, a23.z, a23.w};
    if constexpr (WT == DS4_TYPE_Q8_0) {
        const int4 *p = (const int4 *)(qrow + (size_t)c * 32);
        int4 w0 = cu_wld(p), w1 = cu_wld(p + 1);
        int s = 0;
        s = __dp4a(w0.x, a[0], s); s = __dp4a(w0.y, a[1], s); s = __dp4a(w0.z, a[2], s); s = __dp4a(w0.w, a[3], s);
        s = __dp4a(w1.x, a[4], s); s = __dp4a(w1.y, a[5], s); s = __dp4a(w1.z, a[6], s); s = __dp4a(w1.w, a[7], s);
        *isum = s;
        *msum = 0;
        *d = cu_h2f(cu_ld16(srow + 2 * (size_t)c));
        *dmin = 0.0f;
    } else if constexpr (WT == DS4_TYPE_Q4_K) {
        const uint8_t *b = qrow + (size_t)(c >> 3) * 144;
        int j = c & 7;
        int sc, m;
        cu_q4k_scale_min(b + 4, j, &sc, &m);
        const int4 *p = (const int4 *)(b + 16 + 32 * (j >> 1));
        int4 u0 = cu_wld(p), u1 = cu_wld(p + 1);
        const uint32_t w[8] = {(uint32_t)u0.x, (uint32_t)u0.y, (uint32_t)u0.z, (uint32_t)u0.w,
                               (uint32_t)u1.x, (uint32_t)u1.y, (uint32_t)u1.z, (uint32_t)u1.w};
        int sh = (j & 1) * 4, s = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) s = __dp4a((int)((w[i] >> sh) & 0x0f0f0f0fu), a[i], s);
        *isum = sc * s;
        *msum = m * (bs0 + bs1);
        *d = cu_h2f(cu_ld16(b));
        *dmin = cu_h2f(cu_ld16(b + 2));
    } else if constexpr (WT == DS4_TYPE_Q2_K) {
        const uint8_t *b = qrow + (size_t)(c >> 3) * 84;
        int j = c & 7, h = j >> 2, k2 = 2 * (j & 3);
        int sc0 = cu_wld(b + 8 * h + (j & 3) * 2), sc1 = cu_wld(b + 8 * h + (j & 3) * 2 + 1);
        int s0 = 0, s1 = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t w = cu_ld32(b + 16 + 32 * h + 4 * i);
            s0 = __dp4a((int)((w >> k2) & 0x03030303u), a[i], s0);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t w = cu_ld32(b + 32 + 32 * h + 4 * i);
            s1 = __dp4a((int)((w >> k2) & 0x03030303u), a[4 + i], s1);
        }
        *isum = (sc0 & 15) * s0 + (sc1 & 15) * s1;
        *msum = (sc0 >> 4) * bs0 + (sc1 >> 4) * bs1;
        *d = cu_h2f(cu_ld16(b + 80));
        *dmin = cu_h2f(cu_ld16(b + 82));
    } else if constexpr (WT == DS4_TYPE_IQ2_XXS) {
        /* the chunk's 8 bytes in one load (rows are 16-byte aligned, cuda.cuh) */
        const uint2 q = cu_wld((const uint2 *)(qrow + (size_t)(c >> 3) * 64 + 8 * (c & 7)));
        const uint32_t a0 = q.x, a1 = q.y;
        int s = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            uint32_t v0, v1;
            cu_iq2_signed8_i(tab, (a0 >> (8 * k)) & 0xff, (a1 >> (7 * k)) & 127, &v0, &v1);
            s = __dp4a((int)v0, a[2 * k], s);
            s = __dp4a((int)v1, a[2 * k + 1], s);
        }
        *isum = (2 * (int)(a1 >> 28) + 1) * s;
        *msum = 0;
        *d = cu_h2f(cu_ld16(srow + 2 * (size_t)(c >> 3)));
        *dmin = 0.0f;
    }
    (void)bs0, (void)bs1, (void)tab;
}

/* The float value of a K-quant super-block from its summed integers, as
 * quant.c's dotq_*: ad * (d*isum - dmin*msum), IQ2_XXS ad * (d*0.125*isum). */
template <int WT>
__device__ __forceinline__ float cu_kblock(float ad, float d, float dmin, int isum, int msum) {
    if constexpr (WT == DS4_TYPE_IQ2_XXS) return __fmul_rn(ad, __fmul_rn(__fmul_rn(d, 0.125f), (float)isum));
    else return __fmul_rn(ad, __fsub_rn(__fmul_rn(d, (float)isum), __fmul_rn(dmin, (float)msum)));
}

template <int WT> struct cu_is_k { static constexpr bool v = WT == DS4_TYPE_Q2_K || WT == DS4_TYPE_Q4_K || WT == DS4_TYPE_IQ2_XXS; };

/* Sum over the 8 lanes of a super-block (lanes 8g..8g+7), exact. */
__device__ __forceinline__ int cu_sum8(int v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    return v;
}

__device__ __forceinline__ float cu_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
/* The warp sums of N values per lane (N a power of two <= 32) by
 * recursive halving: at offset O a lane keeps the half of its values that
 * its lane bit O names and adds its partner's copy of each (own + partner,
 * as cu_warp_sum), then the next offset; once one value is left, the rest
 * of cu_warp_sum's offsets. Every value is added in cu_warp_sum's pairs and
 * order, so the same bits, with N - 1 shuffles for all N values instead of
 * 5 each. Lane l returns the sum of value l >> (5 - log2 N). */
template <int N, int O = 16>
__device__ __forceinline__ float cu_warp_sums_halving(const float (&a)[N], int lane) {
    static_assert(N == 1 || N <= 2 * O, "cu_warp_sums_halving: at most 32 values");
    if constexpr (N == 1) {
        float v = a[0];
#pragma unroll
        for (int o = O; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        return v;
    } else {
        const bool bit = lane & O;
        float b[N / 2];
#pragma unroll
        for (int i = 0; i < N / 2; i++)
            b[i] = (bit ? a[N / 2 + i] : a[i]) + __shfl_xor_sync(0xffffffffu, bit ? a[i] : a[N / 2 + i], O);
        return cu_warp_sums_halving<N / 2, O / 2>(b, lane);
    }
}
__device__ __forceinline__ double cu_warp_sumd(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float cu_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Activation quantizers (quant.c's ds4_quantize_act, byte-exact), one warp
 * per block, all lanes calling. Q8_0: lane i holds value i of a 32-value
 * block; d = f16(amax/127), q = rne(x * (127/amax)) clamped to +-127. */
__device__ __forceinline__ void cu_warp_q8_0_am(float v, float amax, int8_t *q, float *d) {
    const int lane = threadIdx.x & 31;
    float iscale = amax > 0.0f ? 127.0f / amax : 0.0f;
    int qi = __float2int_rn(v * iscale);
    qi = qi > 127 ? 127 : qi < -127 ? -127 : qi;
    q[lane] = (int8_t)qi;
    if (lane == 0) *d = __half2float(__float2half_rn(amax / 127.0f));
}
/* (cu_warp_q8_0_am: the same with the block's amax = cu_warp_max(|v|) given) */
__device__ __forceinline__ void cu_warp_q8_0(float v, int8_t *q, float *d) {
    cu_warp_q8_0_am(v, cu_warp_max(fabsf(v)), q, d);
}
/* Q8_K: lane i holds values 8i..8i+7 of a 256-value block; d = amax/127
 * (f32); bs[0..16) the sums of 16 consecutive codes. */
__device__ __forceinline__ void cu_warp_q8_k(const float *v, int8_t *q, float *d, int32_t *bs) {
    const int lane = threadIdx.x & 31;
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(v[i]));
    amax = cu_warp_max(amax);
    float iscale = amax > 0.0f ? 127.0f / amax : 0.0f;
    int s = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int qi = __float2int_rn(v[i] * iscale);
        qi = qi > 127 ? 127 : qi < -127 ? -127 : qi;
        q[8 * lane + i] = (int8_t)qi;
        s += qi;
    }
    s += __shfl_down_sync(0xffffffffu, s, 1);
    if ((lane & 1) == 0) bs[lane / 2] = s;
    if (lane == 0) *d = amax / 127.0f;
}

/* One thread's contribution to y = W[row] . x for NT token rows, over the
 * chunks c = c0 + lane, c0 + cstep + lane, ... of a row (all lanes of the
 * warp call it together; c0 and cstep multiples of 32, so the 8 lanes of a
 * K-quant super-block stay together). Token row t starts at element offset xo[t] of the activation
 * arrays: f32 rows x, or int8 rows aq with scales ad (one per 32 values for
 * Q8_0, per 256 for Q8_K) and Q8_K group sums abs (one per 16). Returns
 * per-token partials in acc[]; the caller reduces them over the warp. */
template <int WT, bool AQ, int NT>
__device__ __forceinline__ void cu_row_dot(const uint8_t *qrow, const uint8_t *srow, int nch, int nt, const float *x,
                                           const int8_t *aq, const float *ad, const int32_t *abs, const int64_t *xo,
                                           float *acc, const cu_iq2_tab *tab, int c0 = 0, int cstep = 32) {
    const int lane = threadIdx.x & 31;
#pragma unroll 4
    for (int base = c0; base < nch; base += cstep) {
        const int c = base + lane;
        const bool on = c < nch;
        if constexpr (!AQ) {
            if (on) {
                float v[32];
                cu_dq_chunk<WT>(qrow, srow, c, v, tab);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t >= nt) break;
                    const float4 *xp = (const float4 *)(x + xo[t] + (int64_t)c * 32);
                    float s = 0.0f;
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        float4 f = xp[i];
                        s = fmaf(v[4 * i], f.x, s);
                        s = fmaf(v[4 * i + 1], f.y, s);
                        s = fmaf(v[4 * i + 2], f.z, s);
                        s = fmaf(v[4 * i + 3], f.w, s);
                    }
                    acc[t] += s;
                }
            }
        } else if constexpr (WT == DS4_TYPE_Q8_0) {
            if (on) {
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t >= nt) break;
                    int isum, msum;
                    float d, dmin;
                    cu_dotq_chunk<WT>(qrow, srow, c, aq + xo[t] + (int64_t)c * 32, 0, 0, &isum, &msum, &d, &dmin, tab);
                    acc[t] = __fadd_rn(acc[t], __fmul_rn(__fmul_rn(d, ad[xo[t] / 32 + c]), (float)isum));
                }
            }
        } else {
            /* K-quants: 8 lanes per super-block; inactive lanes add zeros */
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t >= nt) break;
                int isum = 0, msum = 0;
                float d = 0.0f, dmin = 0.0f;
                if (on) {
                    const int64_t g16 = xo[t] / 16 + 2 * (int64_t)c;
                    cu_dotq_chunk<WT>(qrow, srow, c, aq + xo[t] + (int64_t)c * 32, abs[g16], abs[g16 + 1], &isum, &msum,
                                      &d, &dmin, tab);
                }
                isum = cu_sum8(isum);
                msum = cu_sum8(msum);
                if (on && (lane & 7) == 0) acc[t] = __fadd_rn(acc[t], cu_kblock<WT>(ad[xo[t] / 256 + c / 8], d, dmin, isum, msum));
            }
        }
    }
}

/* cu_row_dot with int8 activations, one token, for up to M rows at once
 * (the first m of them): row k's weights at qrow[k] / srow[k], its
 * activations at element offset xo[k]. The loads of all rows' chunks are
 * in flight together; each row's partial has exactly cu_row_dot's
 * operations and order (its chunks in the same sequence, the same
 * per-chunk arithmetic), so acc[k] equals cu_row_dot's for that row bit
 * for bit. Default chunk set: c = lane, lane + 32, ... */
template <int WT, int M>
__device__ __forceinline__ void cu_row_dot_multi(const uint8_t *const (&qrow)[M], const uint8_t *const (&srow)[M], int m,
                                                 int nch, const int8_t *aq, const float *ad, const int32_t *abs,
                                                 const int64_t (&xo)[M], float (&acc)[M], const cu_iq2_tab *tab) {
    const int lane = threadIdx.x & 31;
#pragma unroll 2
    for (int base = 0; base < nch; base += 32) {
        const int c = base + lane;
        const bool on = c < nch;
        if constexpr (WT == DS4_TYPE_Q8_0) {
            if (on) {
#pragma unroll
                for (int k = 0; k < M; k++) {
                    if (k >= m) break;
                    int isum, msum;
                    float d, dmin;
                    cu_dotq_chunk<WT>(qrow[k], srow[k], c, aq + xo[k] + (int64_t)c * 32, 0, 0, &isum, &msum, &d, &dmin,
                                      tab);
                    acc[k] = __fadd_rn(acc[k], __fmul_rn(__fmul_rn(d, ad[xo[k] / 32 + c]), (float)isum));
                }
            }
        } else {
            int is[M], ms[M];
            float dd[M], dm[M];
#pragma unroll
            for (int k = 0; k < M; k++) {
                is[k] = 0, ms[k] = 0, dd[k] = 0.0f, dm[k] = 0.0f;
                if (k < m && on) {
                    const int64_t g16 = xo[k] / 16 + 2 * (int64_t)c;
                    cu_dotq_chunk<WT>(qrow[k], srow[k], c, aq + xo[k] + (int64_t)c * 32, abs[g16], abs[g16 + 1], &is[k],
                                      &ms[k], &dd[k], &dm[k], tab);
                }
            }
#pragma unroll
            for (int k = 0; k < M; k++) {
                if (k >= m) break;
                const int isum = cu_sum8(is[k]), msum = cu_sum8(ms[k]);
                if (on && (lane & 7) == 0)
                    acc[k] = __fadd_rn(acc[k], cu_kblock<WT>(ad[xo[k] / 256 + c / 8], dd[k], dm[k], isum, msum));
            }
        }
    }
}

/* One row's value for nt token rows as the matvec computes it when the row
 * is split over wpr warps (chunk sets 32j + lane, stride 32 wpr; the warp
 * sums added in j order: mv_rows_store, k_matvec), all by one warp: v[t]. */
template <int WT, bool AQ, int NT>
__device__ __forceinline__ void cu_row_split(const uint8_t *qrow, const uint8_t *srow, int nch, int nt, int wpr,
                                             const float *x, const int8_t *aq, const float *ad, const int32_t *abs,
                                             const int64_t *xo, float *v, const cu_iq2_tab *tab) {
    for (int j = 0; j < wpr; j++) {
        float acc[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = 0.0f;
        cu_row_dot<WT, AQ, NT>(qrow, srow, nch, nt, x, aq, ad, abs, xo, acc, tab, 32 * j, 32 * wpr);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float part = cu_warp_sum(acc[t]);
            v[t] = j ? v[t] + part : part;
        }
    }
}

#endif
