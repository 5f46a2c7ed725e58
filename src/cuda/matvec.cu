/* matvec.cu - the generic quantized matrix x token-rows product of the CUDA
 * backend, the int8 activation quantizers, and row dequantization.
 *
 * k_matvec: one warp per output row, 8 rows per 256-thread block; each lane
 * takes the row's chunks lane, lane+32, ... and dots them against NT token
 * rows at a time, so every weight byte is read once per NT tokens (the
 * "share-warp" idea: decode NT = 1, batches NT = 8). The warp reduction has
 * a fixed shape, so results are deterministic. Rows of up to CU_MAX_SEGS
 * segments (different weights of one type and n_in, different outputs, each
 * with its own input offset) run in one launch: q_a with kv, the 8 output
 * groups of o_a, shared gate with up.
 */
#include <stdarg.h>
#include <stdio.h>

#include "cuda/cuda.cuh"
#include "cuda/quant.cuh"
#include "cuda/mma.cuh"

/* ---------------------------------------------------------------- quantize */

/* Q8_0 activations: one warp per 32-value block, lane i holds value i.
 * d = f16(amax/127), q = rne(x * (127/amax)) clamped (quant.c). */
__global__ void k_quant_q8_0(const float *x, int64_t ldx, int n, int n_in, int8_t *q, float *d) {
    cu_pdl_wait();
    const int nb = n_in / 32;
    const int64_t blk = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (blk >= (int64_t)n * nb) return;
    const int t = (int)(blk / nb), b = (int)(blk % nb), lane = threadIdx.x & 31;
    cu_warp_q8_0(x[t * ldx + (int64_t)b * 32 + lane], q + (int64_t)t * n_in + (int64_t)b * 32, d + (int64_t)t * nb + b);
}

/* Q8_K activations: one warp per 256-value block, lane i holds values
 * 8i..8i+7; d = amax/127 (f32); group sums of 16 values. */
__global__ void k_quant_q8_k(const float *x, int64_t ldx, int n, int n_in, int8_t *q, float *d, int32_t *bs) {
    cu_pdl_wait();
    const int nb = n_in / 256;
    const int64_t blk = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (blk >= (int64_t)n * nb) return;
    const int t = (int)(blk / nb), b = (int)(blk % nb), lane = threadIdx.x & 31;
    const float *xp = x + t * ldx + (int64_t)b * 256 + 8 * lane;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = xp[i];
    cu_warp_q8_k(v, q + (int64_t)t * n_in + (int64_t)b * 256, d + (int64_t)t * nb + b,
                 bs + (int64_t)t * (n_in / 16) + (int64_t)b * 16);
}

/* ---------------------------------------------------------------- pre-quantized rows */

void cu_preq_clear(cu_ctx *c) { memset(c->preq, 0, sizeof c->preq); }

static void preq_drop(cu_ctx *c, const cu_act *a) {
    for (int i = 0; i < CU_MAX_PREQ; i++)
        if (c->preq[i].a == a) c->preq[i] = cu_preq{};
}

void cu_preq_set(cu_ctx *c, const float *x, int n, int64_t ldx, int n_in, int type, const cu_act *a) {
    if (c->no_preq) return;
    int slot = -1;
    for (int i = 0; i < CU_MAX_PREQ; i++) /* the buffer now holds only these codes */
        if (c->preq[i].a == a || (c->preq[i].x == x && c->preq[i].type == type)) c->preq[i] = cu_preq{};
    for (int i = 0; i < CU_MAX_PREQ && slot < 0; i++)
        if (!c->preq[i].a) slot = i;
    if (slot < 0) slot = 0;
    c->preq[slot] = cu_preq{x, n, n_in, type, ldx, a};
}

const cu_act *cu_preq_find(cu_ctx *c, const float *x, int n, int64_t ldx, int n_in, int type) {
    for (int i = 0; i < CU_MAX_PREQ; i++) {
        const cu_preq &r = c->preq[i];
        if (r.a && r.x == x && r.n == n && r.ldx == ldx && r.n_in == n_in && r.type == type) return r.a;
    }
    return nullptr;
}

const cu_act *cu_act_codes(cu_ctx *c, int act_type, const float *x, int64_t ldx, int n, int n_in, cu_act *buf) {
    const cu_act *pre = cu_preq_find(c, x, n, ldx, n_in, act_type);
    if (pre) return pre;
    cu_quantize(c, act_type, x, ldx, n, n_in, buf);
    return buf;
}

void cu_quantize(cu_ctx *c, int act_type, const float *x, int64_t ldx, int n, int n_in, cu_act *a) {
    if (c->err || n <= 0) return;
    preq_drop(c, a);
    if ((size_t)n * n_in > a->cap) {
        cu_fail(c, DS4_E_INTERNAL, "cuda: activation buffer too small (%d x %d > %zu)", n, n_in, a->cap);
        return;
    }
    if (act_type == DS4_TYPE_Q8_0) {
        int64_t blocks = (int64_t)n * (n_in / 32);
        cu_launch(c, k_quant_q8_0, cu_div_up(blocks, 8), 256, 0, x, ldx, n, n_in, a->q, a->d);
        CU_LAUNCH(c, "quant_q8_0");
    } else {
        int64_t blocks = (int64_t)n * (n_in / 256);
        cu_launch(c, k_quant_q8_k, cu_div_up(blocks, 8), 256, 0, x, ldx, n, n_in, a->q, a->d, a->bs);
        CU_LAUNCH(c, "quant_q8_k");
    }
}

/* ---------------------------------------------------------------- matvec */

#define MV_FEW_N 4 /* k_matvec_q8rt / k_matvec_frt take 2..MV_FEW_N tokens */


/* WPR warps per row (1, 2, 4 or 8; 8/WPR rows per 256-thread block): warp
 * j of a row takes the chunks 32*(j + WPR*k) + lane; the WPR warp sums are
 * added in j order. WPR depends only on the weight's shape (mv_wpr), never
 * on the number of tokens, so a row's value is the same in any batch. */
/* The end of the R-rows matvecs: warp sums of acc, then (WPR > 1) the
 * partials of a row's warps added in warp order by its first warp; y =
 * the warp's first row. */
template <int WPR, int R>
__device__ __forceinline__ void mv_rows_store(const float (&acc)[R], float (&part)[8][R], int warp, int j, int lane,
                                              bool live, float *y) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        float v = cu_warp_sum(acc[r]);
        if (WPR == 1) {
            if (live && lane == 0) y[r] = v;
        } else if (lane == 0) {
            part[warp][r] = v;
        }
    }
    if constexpr (WPR > 1) {
        __syncthreads();
        if (live && j == 0 && lane < R) {
            float v = part[warp][lane];
#pragma unroll
            for (int k = 1; k < WPR; k++) v += part[warp + k][lane];
            y[lane] = v;
        }
    }
}

/* mv_rows_store for NT token rows: acc[r][t] is row r0 + r of token t,
 * stored at y[t * ldy + r]; the same warp sum and warp-order partial sum
 * per value as mv_rows_store, so a token's values never depend on NT. */
template <int WPR, int R, int NT>
__device__ __forceinline__ void mv_rows_store_nt(const float (&acc)[R][NT], float (&part)[8][R * NT], int warp, int j,
                                                 int lane, bool live, int nt, float *y, int64_t ldy) {
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float v = cu_warp_sum(acc[r][t]);
            if (WPR == 1) {
                if (live && lane == 0 && t < nt) y[t * ldy + r] = v;
            } else if (lane == 0) {
                part[warp][r * NT + t] = v;
            }
        }
    if constexpr (WPR > 1) {
        __syncthreads();
        if (live && j == 0 && lane < R * NT && lane % NT < nt) {
            float v = part[warp][lane];
#pragma unroll
            for (int k = 1; k < WPR; k++) v += part[warp + k][lane];
            y[(lane % NT) * ldy + lane / NT] = v;
        }
    }
}

/* Q8_0 x int8, one token, R rows per warp: the activation chunk is loaded
 * once for the R rows and their weight loads are in flight together. Each
 * row's sum has exactly the order of cu_row_dot (chunks 32*(j + WPR*k) +
 * lane in k order, warp sum, warps in j order), so values equal k_matvec's
 * R = 1 path bit for bit (dev/mv_bench.cu checks it). */
template <int WPR, int R, bool CB = false>
__global__ void __launch_bounds__(256) k_matvec_q8r(const __grid_constant__ mv_params p) {
    /* CB (DS4_CUDA_COMB_BIG): block 0 runs a pending HC-pre comb (warp t:
     * token t), the rows' blocks follow (block b takes the rows of b - 1);
     * a template flag, so that the comb's code costs the plain kernel no
     * registers */
    const int bx = (int)blockIdx.x - (CB ? 1 : 0);
    if constexpr (CB) {
        if (bx < 0) {
            cu_pdl_wait();
            hc_comb_run(p.cj, threadIdx.x >> 5);
            return;
        }
        mv_prefetch(p, 8 / WPR * R, bx, (int)gridDim.x - 1);
    } else {
        mv_prefetch(p, 8 / WPR * R);
    }
    cu_pdl_wait();
    __shared__ float part[8][R];
    const int warp = threadIdx.x / 32, j = warp % WPR, lane = threadIdx.x & 31;
    const int row0 = (bx * (8 / WPR) + warp / WPR) * R;
    int s = 0;
    while (s < p.n_seg && row0 >= p.seg_end[s]) s++;
    /* R divides every segment's rows (checked by the launcher): a warp's rows share a segment */
    const bool live = s < p.n_seg;
    const cu_seg &g = p.seg[live ? s : 0];
    const int r0 = live ? row0 - (s ? p.seg_end[s - 1] : 0) : 0;
    const int8_t *aq = p.aq + g.xoff;
    const float *ad = p.ad + g.xoff / 32;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    if (live) {
#pragma unroll 4
        for (int base = 32 * j; base < p.nch; base += 32 * WPR) {
            const int c = base + lane;
            if (c < p.nch) {
                const int4 a0 = ((const int4 *)(aq + (int64_t)c * 32))[0], a1 = ((const int4 *)(aq + (int64_t)c * 32))[1];
                const float da = ad[c];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const int4 *w = (const int4 *)(g.w.q + (size_t)(r0 + r) * g.w.q_row + (size_t)c * 32);
                    const int4 w0 = cu_wld(w), w1 = cu_wld(w + 1);
                    int sum = 0;
                    sum = __dp4a(w0.x, a0.x, sum); sum = __dp4a(w0.y, a0.y, sum);
                    sum = __dp4a(w0.z, a0.z, sum); sum = __dp4a(w0.w, a0.w, sum);
                    sum = __dp4a(w1.x, a1.x, sum); sum = __dp4a(w1.y, a1.y, sum);
                    sum = __dp4a(w1.z, a1.z, sum); sum = __dp4a(w1.w, a1.w, sum);
                    const float d = cu_h2f(cu_ld16(g.w.s + (size_t)(r0 + r) * g.w.s_row + 2 * (size_t)c));
                    acc[r] = __fadd_rn(acc[r], __fmul_rn(__fmul_rn(d, da), (float)sum));
                }
            }
        }
    }
    mv_rows_store<WPR, R>(acc, part, warp, j, lane, live, g.y + r0);
}

/* Q8_0 x int8 for 2..NT tokens (MTP verify rows, small chunks), R rows per
 * warp: the weight chunk of each row is loaded once for the tokens, and
 * every (row, token) sum has k_matvec_q8r's (so cu_row_dot's) order, so a
 * token's values are those of a batch of one, bit for bit. */
template <int WPR, int R, int NT>
__global__ void __launch_bounds__(256) k_matvec_q8rt(const __grid_constant__ mv_params p) {
    mv_prefetch(p, 8 / WPR * R);
    cu_pdl_wait();
    __shared__ float part[8][R * NT];
    if (p.skip_le > 0 && (p.step->pos0 + p.step->n) / 4 <= p.skip_le) return;
    const int warp = threadIdx.x / 32, j = warp % WPR, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (8 / WPR) + warp / WPR) * R, nt = p.n < NT ? p.n : NT;
    int s = 0;
    while (s < p.n_seg && row0 >= p.seg_end[s]) s++;
    const bool live = s < p.n_seg;
    const cu_seg &g = p.seg[live ? s : 0];
    const int r0 = live ? row0 - (s ? p.seg_end[s - 1] : 0) : 0;
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
    if (live) {
#pragma unroll 2
        for (int base = 32 * j; base < p.nch; base += 32 * WPR) {
            const int c = base + lane;
            if (c < p.nch) {
                int4 w0[R], w1[R];
                float d[R];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const int4 *w = (const int4 *)(g.w.q + (size_t)(r0 + r) * g.w.q_row + (size_t)c * 32);
                    w0[r] = cu_wld(w);
                    w1[r] = cu_wld(w + 1);
                    d[r] = cu_h2f(cu_ld16(g.w.s + (size_t)(r0 + r) * g.w.s_row + 2 * (size_t)c));
                }
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t >= nt) break;
                    const int64_t xo = (int64_t)t * p.ldq + g.xoff;
                    const int4 *ap = (const int4 *)(p.aq + xo + (int64_t)c * 32);
                    const int4 a0 = ap[0], a1 = ap[1];
                    const float da = p.ad[xo / 32 + c];
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        int sum = 0;
                        sum = __dp4a(w0[r].x, a0.x, sum); sum = __dp4a(w0[r].y, a0.y, sum);
                        sum = __dp4a(w0[r].z, a0.z, sum); sum = __dp4a(w0[r].w, a0.w, sum);
                        sum = __dp4a(w1[r].x, a1.x, sum); sum = __dp4a(w1[r].y, a1.y, sum);
                        sum = __dp4a(w1[r].z, a1.z, sum); sum = __dp4a(w1[r].w, a1.w, sum);
                        acc[r][t] = __fadd_rn(acc[r][t], __fmul_rn(__fmul_rn(d[r], da), (float)sum));
                    }
                }
            }
        }
    }
    mv_rows_store_nt<WPR, R, NT>(acc, part, warp, j, lane, live, nt, g.y + r0, g.ldy);
}

/* f32-activation weights for 2..NT tokens, R rows per warp: each row's
 * chunk dequantized once for the tokens; every (row, token) sum has
 * cu_row_dot's order (a 32-term fma chain per chunk added to the lane's
 * partial), so a token's values are those of a batch of one, bit for bit. */
template <int WT, int WPR, int R, int NT>
__global__ void __launch_bounds__(256) k_matvec_frt(const __grid_constant__ mv_params p) {
    mv_prefetch(p, 8 / WPR * R);
    cu_pdl_wait();
    __shared__ float part[8][R * NT];
    if (p.skip_le > 0 && (p.step->pos0 + p.step->n) / 4 <= p.skip_le) return;
    const int warp = threadIdx.x / 32, j = warp % WPR, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (8 / WPR) + warp / WPR) * R, nt = p.n < NT ? p.n : NT;
    int s = 0;
    while (s < p.n_seg && row0 >= p.seg_end[s]) s++;
    const bool live = s < p.n_seg;
    const cu_seg &g = p.seg[live ? s : 0];
    const int r0 = live ? row0 - (s ? p.seg_end[s - 1] : 0) : 0;
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
    if (live) {
        for (int base = 32 * j; base < p.nch; base += 32 * WPR) {
            const int c = base + lane;
            if (c < p.nch) {
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float v[32];
                    cu_dq_chunk<WT>(g.w.q + (size_t)(r0 + r) * g.w.q_row,
                                    g.w.s ? g.w.s + (size_t)(r0 + r) * g.w.s_row : nullptr, c, v, nullptr);
#pragma unroll
                    for (int t = 0; t < NT; t++) {
                        if (t >= nt) break;
                        const float4 *xp = (const float4 *)(p.x + (int64_t)t * p.ldx + g.xoff + (int64_t)c * 32);
                        float sum = 0.0f;
#pragma unroll
                        for (int i = 0; i < 8; i++) {
                            const float4 f = xp[i];
                            sum = fmaf(v[4 * i], f.x, sum);
                            sum = fmaf(v[4 * i + 1], f.y, sum);
                            sum = fmaf(v[4 * i + 2], f.z, sum);
                            sum = fmaf(v[4 * i + 3], f.w, sum);
                        }
                        acc[r][t] += sum;
                    }
                }
            }
        }
    }
    mv_rows_store_nt<WPR, R, NT>(acc, part, warp, j, lane, live, nt, g.y + r0, g.ldy);
}

/* f32-activation weights (F16/BF16/F32), one token, R rows per warp: the
 * input chunk (128 bytes of f32) is loaded once for the R rows; each row's
 * sum has cu_row_dot's order, so values equal the R = 1 path bit for bit.
 * R by mv_f_rows (dev/mv_bench.cu F16 rows on the H200). */
template <int WT, int WPR, int R>
__global__ void __launch_bounds__(256) k_matvec_fr(const __grid_constant__ mv_params p) {
    mv_prefetch(p, 8 / WPR * R);
    cu_pdl_wait();
    __shared__ float part[8][R];
    if (p.skip_le > 0 && (p.step->pos0 + p.step->n) / 4 <= p.skip_le) return;
    const int warp = threadIdx.x / 32, j = warp % WPR, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (8 / WPR) + warp / WPR) * R;
    int s = 0;
    while (s < p.n_seg && row0 >= p.seg_end[s]) s++;
    const bool live = s < p.n_seg;
    const cu_seg &g = p.seg[live ? s : 0];
    const int r0 = live ? row0 - (s ? p.seg_end[s - 1] : 0) : 0;
    const float *x = p.x + g.xoff;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    if (live) {
#pragma unroll 2
        for (int base = 32 * j; base < p.nch; base += 32 * WPR) {
            const int c = base + lane;
            if (c < p.nch) {
                const float4 *xp = (const float4 *)(x + (int64_t)c * 32);
                float4 xv[8];
#pragma unroll
                for (int i = 0; i < 8; i++) xv[i] = xp[i];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float v[32];
                    cu_dq_chunk<WT>(g.w.q + (size_t)(r0 + r) * g.w.q_row,
                                    g.w.s ? g.w.s + (size_t)(r0 + r) * g.w.s_row : nullptr, c, v, nullptr);
                    float sum = 0.0f;
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        sum = fmaf(v[4 * i], xv[i].x, sum);
                        sum = fmaf(v[4 * i + 1], xv[i].y, sum);
                        sum = fmaf(v[4 * i + 2], xv[i].z, sum);
                        sum = fmaf(v[4 * i + 3], xv[i].w, sum);
                    }
                    acc[r] += sum;
                }
            }
        }
    }
    mv_rows_store<WPR, R>(acc, part, warp, j, lane, live, g.y + r0);
}

template <int WT, bool AQ, int NT, int WPR>
__global__ void __launch_bounds__(256) k_matvec(const __grid_constant__ mv_params p) {
    mv_prefetch(p, 8 / WPR);
    cu_pdl_wait();
    __shared__ cu_iq2_tab tab;
    __shared__ float part[WPR > 1 ? 8 : 1][NT];
    if constexpr (WT == DS4_TYPE_IQ2_XXS) {
        cu_iq2_tab_load(&tab, p.grid, p.ksigns);
        __syncthreads();
    }
    if (p.skip_le > 0 && (p.step->pos0 + p.step->n) / 4 <= p.skip_le) return;
    const int warp = threadIdx.x / 32, j = warp % WPR;
    const int row = blockIdx.x * (8 / WPR) + warp / WPR, lane = threadIdx.x & 31;
    int s = 0;
    while (s < p.n_seg && row >= p.seg_end[s]) s++;
    const bool live = s < p.n_seg;
    if (WPR == 1 && !live) return;
    const cu_seg &g = p.seg[live ? s : 0];
    const int r = live ? row - (s ? p.seg_end[s - 1] : 0) : 0;
    const uint8_t *qrow = g.w.q + (size_t)r * g.w.q_row;
    const uint8_t *srow = g.w.s ? g.w.s + (size_t)r * g.w.s_row : nullptr;
    for (int t0 = 0; t0 < p.n; t0 += NT) {
        const int nt = p.n - t0 < NT ? p.n - t0 : NT;
        float acc[NT];
        int64_t xo[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) {
            acc[t] = 0.0f;
            xo[t] = (int64_t)(t0 + t) * (AQ ? p.ldq : p.ldx) + g.xoff;
        }
        if (live) cu_row_dot<WT, AQ, NT>(qrow, srow, p.nch, nt, p.x, p.aq, p.ad, p.abs, xo, acc, &tab, 32 * j, 32 * WPR);
        if constexpr (WPR == 1) {
#pragma unroll
            for (int t = 0; t < NT; t++) {
                float v = cu_warp_sum(acc[t]);
                if (lane == 0 && t < nt) g.y[(int64_t)(t0 + t) * g.ldy + r] = v;
            }
        } else {
#pragma unroll
            for (int t = 0; t < NT; t++) {
                float v = cu_warp_sum(acc[t]);
                if (lane == 0) part[warp][t] = v;
            }
            __syncthreads();
            if (live && j == 0 && lane < nt) {
                float v = part[warp][lane];
#pragma unroll
                for (int k = 1; k < WPR; k++) v += part[warp + k][lane];
                g.y[(int64_t)(t0 + lane) * g.ldy + r] = v;
            }
            __syncthreads();
        }
    }
}

/* Warps per row from the weight's shape: short, wide matrices split their
 * rows over more warps so that enough loads are in flight. */
int cu_mv_wpr(int rows, int nch) {
    int w = rows <= 1024 ? 8 : rows <= 4096 ? 4 : rows <= 16384 ? 2 : 1;
    while (w > 1 && nch < 32 * w) w /= 2;
    return w;
}

/* kernel names for the per-kernel profile */
template <int WT, bool AQ> static const char *mv_name() {
    switch (WT) {
    case DS4_TYPE_F32: return "mv_f32";
    case DS4_TYPE_F16: return "mv_f16";
    case DS4_TYPE_BF16: return "mv_bf16";
    case DS4_TYPE_Q8_0: return AQ ? "mv_q8_0_i8" : "mv_q8_0";
    case DS4_TYPE_Q4_K: return AQ ? "mv_q4_k_i8" : "mv_q4_k";
    case DS4_TYPE_Q2_K: return AQ ? "mv_q2_k_i8" : "mv_q2_k";
    default: return AQ ? "mv_iq2_xxs_i8" : "mv_iq2_xxs";
    }
}

/* Two rows per warp for one token pays where a warp has at least two
 * chunk rounds or the weight is tall (dev/mv_bench.cu on the H200: q_b
 * 1.26x, o_a 1.09x, o_b 1.06x; shorter weights lose). Shape-only rule. */
static bool mv_two_rows(const mv_params &p, int wpr, int max_n = 1) {
    if (p.n > max_n || p.skip_le > 0 || !p.aq) return false;
    int seg_rows = 0;
    for (int i = 0; i < p.n_seg; i++) {
        if (p.seg[i].rows % 2) return false;
        seg_rows = p.seg[i].rows > seg_rows ? p.seg[i].rows : seg_rows;
    }
    return (seg_rows >= 1024 && seg_rows <= 32768 && p.nch >= 64 * wpr) || (seg_rows >= 8192 && seg_rows <= 32768);
}

/* Rows per warp for f32-activation weights, one token (dev/mv_bench.cu,
 * F16 at the Flash shapes on the H200): 4 rows from 2048 rows per launch
 * (compressor kv+gate of ratio-4 layers 2.02x, indexer q_b 1.75x), 2 rows
 * from 512 (ratio-128 compressor 1.35x, indexer compressor 1.07x); the
 * router (256 rows) and the indexer weights projection (64) lose with more
 * rows per warp. Every segment's rows must be a multiple of R, so that
 * a warp's rows never straddle two weights. */
static int mv_f_rows(const mv_params &p, int rows, int max_n = 1) {
    if (p.n > max_n) return 1; /* k_matvec_fr tests skip_le itself */
    int R = rows >= 2048 ? 4 : rows >= 512 ? 2 : 1;
    for (int i = 0; i < p.n_seg; i++)
        while (R > 1 && p.seg[i].rows % R) R /= 2;
    return R;
}

/* DS4_CUDA_MV_TALL=R (default 2; 4, or 0 for off): one token, a Q8_0
 * launch that mv_two_rows leaves at one row per warp but whose rows in all
 * reach DS4_CUDA_MV_TALL_MIN (default 8192; at most 32768, so not the head)
 * takes R rows per warp. The case: the grouped o_a (8 segments of 1,024 rows
 * x 128 chunks: WPR 4 from the segment's shape, one chunk round per warp,
 * 4,096 blocks) measured 25.8 us in a graph replay on an H100 (thirtieth
 * session's timeline) against 12.7-13.9 us for o_b and q_b, which move the
 * same 35.6 MB at two rows per warp. R never changes a value (each row keeps
 * k_matvec's order), so the same bits. Returns R, or 0. */
static int mv_tall_rows(const cu_ctx *c, const mv_params &p, int rows) {
    if (c->mv_no_r2 || (c->mv_tall != 2 && c->mv_tall != 4) || p.n != 1 || p.skip_le > 0 || !p.aq) return 0;
    const int lo = c->mv_tall_min > 0 ? c->mv_tall_min : 8192;
    if (rows < lo || rows > 32768) return 0;
    for (int i = 0; i < p.n_seg; i++)
        if (p.seg[i].rows % c->mv_tall) return 0;
    return c->mv_tall;
}

template <int WT, bool AQ, int WPR>
static void launch_mv_w(cu_ctx *c, mv_params &p, int rows) {
    dim3 grid(cu_div_up(rows, 8 / WPR));
    if constexpr (WT == DS4_TYPE_Q8_0 && AQ) {
        if (cu_blas_q8(c, p) || cu_mm_q8(c, p, rows, WPR)) return;
        const int rt = !c->mv_no_r2 && mv_two_rows(p, WPR) ? 2 : mv_tall_rows(c, p, rows);
        if (rt == 2) {
            /* a comb offered by the caller (DS4_CUDA_COMB_BIG, one token): one more block, the first */
            if (c->mv_cj.n && p.n == 1) {
                p.cj = c->mv_cj;
                c->mv_cj = cu_comb_job{};
            }
            if (p.cj.n) cu_launch(c, k_matvec_q8r<WPR, 2, true>, dim3(cu_div_up(rows, 8 / WPR * 2) + 1), 256, 0, p);
            else cu_launch(c, k_matvec_q8r<WPR, 2>, dim3(cu_div_up(rows, 8 / WPR * 2)), 256, 0, p);
            return;
        }
        if (rt == 4) {
            cu_launch(c, k_matvec_q8r<WPR, 4>, dim3(cu_div_up(rows, 8 / WPR * 4)), 256, 0, p);
            return;
        }
    }
    if constexpr (!AQ && (WT == DS4_TYPE_F16 || WT == DS4_TYPE_BF16)) {
        if (cu_mm_f(c, p, rows, WPR, WT)) return;
    }
    if constexpr (!AQ && (WT == DS4_TYPE_F16 || WT == DS4_TYPE_BF16 || WT == DS4_TYPE_F32)) {
        const int R = c->mv_no_r2 ? 1 : mv_f_rows(p, rows);
        if (R == 4) {
            cu_launch(c, k_matvec_fr<WT, WPR, 4>, dim3(cu_div_up(rows, 8 / WPR * 4)), 256, 0, p);
            return;
        }
        if (R == 2) {
            cu_launch(c, k_matvec_fr<WT, WPR, 2>, dim3(cu_div_up(rows, 8 / WPR * 2)), 256, 0, p);
            return;
        }
    }
    /* 2..4 tokens (MTP verify rows): the one-token kernels' row split and
     * sums with each weight chunk read once for the tokens */
    if (p.n >= 2 && p.n <= MV_FEW_N && !c->mv_no_few) {
        if constexpr (WT == DS4_TYPE_Q8_0 && AQ) {
            const int R = !c->mv_no_r2 && mv_two_rows(p, WPR, MV_FEW_N) ? 2 : 1;
            if (R == 2 && p.n == 2) cu_launch(c, k_matvec_q8rt<WPR, 2, 2>, dim3(cu_div_up(rows, 8 / WPR * 2)), 256, 0, p);
            else if (R == 2) cu_launch(c, k_matvec_q8rt<WPR, 2, 4>, dim3(cu_div_up(rows, 8 / WPR * 2)), 256, 0, p);
            else if (p.n == 2) cu_launch(c, k_matvec_q8rt<WPR, 1, 2>, grid, 256, 0, p);
            else cu_launch(c, k_matvec_q8rt<WPR, 1, 4>, grid, 256, 0, p);
            return;
        }
        if constexpr (!AQ && (WT == DS4_TYPE_F16 || WT == DS4_TYPE_BF16 || WT == DS4_TYPE_F32)) {
            const int R = c->mv_no_r2 ? 1 : mv_f_rows(p, rows, MV_FEW_N);
            const dim3 gr(cu_div_up(rows, 8 / WPR * R));
            if (R == 4) p.n == 2 ? cu_launch(c, k_matvec_frt<WT, WPR, 4, 2>, gr, 256, 0, p)
                                 : cu_launch(c, k_matvec_frt<WT, WPR, 4, 4>, gr, 256, 0, p);
            else if (R == 2) p.n == 2 ? cu_launch(c, k_matvec_frt<WT, WPR, 2, 2>, gr, 256, 0, p)
                                      : cu_launch(c, k_matvec_frt<WT, WPR, 2, 4>, gr, 256, 0, p);
            else p.n == 2 ? cu_launch(c, k_matvec_frt<WT, WPR, 1, 2>, gr, 256, 0, p)
                          : cu_launch(c, k_matvec_frt<WT, WPR, 1, 4>, gr, 256, 0, p);
            return;
        }
    }
    if (p.n == 1) cu_launch(c, k_matvec<WT, AQ, 1, WPR>, grid, 256, 0, p);
    else if (p.n <= 4) cu_launch(c, k_matvec<WT, AQ, 4, WPR>, grid, 256, 0, p);
    else cu_launch(c, k_matvec<WT, AQ, 8, WPR>, grid, 256, 0, p);
}

template <int WT, bool AQ>
static void launch_mv(cu_ctx *c, mv_params &p, int rows) {
    /* the split depends on the rows of the largest segment's weight */
    int seg_rows = 0;
    for (int i = 0; i < p.n_seg; i++) seg_rows = p.seg[i].rows > seg_rows ? p.seg[i].rows : seg_rows;
    switch (cu_mv_wpr(seg_rows, p.nch)) {
    case 8: launch_mv_w<WT, AQ, 8>(c, p, rows); break;
    case 4: launch_mv_w<WT, AQ, 4>(c, p, rows); break;
    case 2: launch_mv_w<WT, AQ, 2>(c, p, rows); break;
    default: launch_mv_w<WT, AQ, 1>(c, p, rows); break;
    }
    const char *nm = mv_name<WT, AQ>();
    CU_LAUNCH(c, nm);
}

void cu_matvec(cu_ctx *c, const cu_seg *segs, int n_seg, int n, const float *x, int64_t ldx, const cu_act *aq,
               const ds4_step *step, int skip_le) {
    if (c->err || n <= 0 || n_seg <= 0) return;
    if (n_seg > CU_MAX_SEGS) {
        cu_fail(c, DS4_E_INTERNAL, "cuda: %d matvec segments", n_seg);
        return;
    }
    mv_params p;
    memset(&p, 0, sizeof p);
    int rows = 0;
    for (int i = 0; i < n_seg; i++) {
        p.seg[i] = segs[i];
        rows += segs[i].rows;
        p.seg_end[i] = rows;
    }
    const int type = segs[0].w.type;
    p.n_seg = n_seg;
    p.n = n;
    p.nch = segs[0].w.n_in / 32;
    p.x = x;
    p.ldx = ldx;
    p.step = step;
    p.skip_le = skip_le;
    p.grid = c->grid;
    p.ksigns = c->ksigns;
    p.pf = (c->early_trigger || c->pf_next) && !c->no_prefetch && !c->no_pdl ? 4 * c->n_sm : 0;
    if (aq) { /* int8 rows of ldx values (quantized by cu_quantize) */
        p.aq = aq->q;
        p.ad = aq->d;
        p.abs = aq->bs;
        p.ldq = ldx;
    }
    switch (type) {
    case DS4_TYPE_F32: launch_mv<DS4_TYPE_F32, false>(c, p, rows); break;
    case DS4_TYPE_F16: launch_mv<DS4_TYPE_F16, false>(c, p, rows); break;
    case DS4_TYPE_BF16: launch_mv<DS4_TYPE_BF16, false>(c, p, rows); break;
    case DS4_TYPE_Q8_0:
        if (aq) launch_mv<DS4_TYPE_Q8_0, true>(c, p, rows);
        else launch_mv<DS4_TYPE_Q8_0, false>(c, p, rows);
        break;
    case DS4_TYPE_Q4_K:
        if (aq) launch_mv<DS4_TYPE_Q4_K, true>(c, p, rows);
        else launch_mv<DS4_TYPE_Q4_K, false>(c, p, rows);
        break;
    case DS4_TYPE_Q2_K:
        if (aq) launch_mv<DS4_TYPE_Q2_K, true>(c, p, rows);
        else launch_mv<DS4_TYPE_Q2_K, false>(c, p, rows);
        break;
    case DS4_TYPE_IQ2_XXS:
        if (aq) launch_mv<DS4_TYPE_IQ2_XXS, true>(c, p, rows);
        else launch_mv<DS4_TYPE_IQ2_XXS, false>(c, p, rows);
        break;
    default: cu_fail(c, DS4_E_INTERNAL, "cuda: matvec of type %s", ds4_type_name(type));
    }
}

/* ---------------------------------------------------------------- dequant */

/* One warp per (row, 32-value chunk): y[t][32c..] = row ids[t] chunk c,
 * written rep times (HC streams). */
template <int WT>
__global__ void k_dequant_rows(cu_w w, const int32_t *ids, int n, float *y, int64_t ldy, int rep, int64_t rep_stride,
                               const uint64_t *grid, const uint8_t *ksigns) {
    cu_pdl_wait();
    __shared__ cu_iq2_tab tab;
    if constexpr (WT == DS4_TYPE_IQ2_XXS) {
        cu_iq2_tab_load(&tab, grid, ksigns);
        __syncthreads();
    }
    const int nch = w.n_in / 32;
    const int64_t item = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= (int64_t)n * nch) return;
    const int t = (int)(item / nch), c = (int)(item % nch);
    const int64_t r = ids ? ids[t] : t;
    float v[32];
    cu_dq_chunk<WT>(w.q + (size_t)r * w.q_row, w.s ? w.s + (size_t)r * w.s_row : nullptr, c, v, &tab);
    for (int k = 0; k < rep; k++) {
        float4 *o = (float4 *)(y + t * ldy + k * rep_stride + (int64_t)c * 32);
#pragma unroll
        for (int i = 0; i < 8; i++) o[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    }
}

void cu_dequant_rows(cu_ctx *c, const ds4_weight *w, const int32_t *ids, int n, float *y, int64_t ldy, int rep,
                     int64_t rep_stride) {
    if (c->err || n <= 0) return;
    cu_w v = cu_weight_view(w);
    int64_t items = (int64_t)n * (w->n_in / 32);
    dim3 grid(cu_div_up(items, 128));
#define DQ(T) cu_launch(c, k_dequant_rows<T>, grid, 128, 0, v, ids, n, y, ldy, rep, rep_stride, c->grid, c->ksigns)
    switch (w->type) {
    case DS4_TYPE_F32: DQ(DS4_TYPE_F32); break;
    case DS4_TYPE_F16: DQ(DS4_TYPE_F16); break;
    case DS4_TYPE_BF16: DQ(DS4_TYPE_BF16); break;
    case DS4_TYPE_Q8_0: DQ(DS4_TYPE_Q8_0); break;
    case DS4_TYPE_Q4_K: DQ(DS4_TYPE_Q4_K); break;
    case DS4_TYPE_Q2_K: DQ(DS4_TYPE_Q2_K); break;
    case DS4_TYPE_IQ2_XXS: DQ(DS4_TYPE_IQ2_XXS); break;
    default: cu_fail(c, DS4_E_INTERNAL, "cuda: dequant of type %s", ds4_type_name(w->type)); return;
    }
#undef DQ
    CU_LAUNCH(c, "dequant_rows");
}

/* ---------------------------------------------------------------- pairs */

/* Runs W1 (and W2 when given) on the same input rows: one launch when the
 * two share a type and row length, with the input quantized once. */
void cu_mv_pair(cu_ctx *c, const ds4_weight *w1, float *y1, int64_t ld1, const ds4_weight *w2, float *y2,
                    int64_t ld2, const float *x, int64_t ldx, int n, bool act_quant, cu_act *buf,
                    const ds4_step *step, int skip_le) {
    const ds4_weight *ws[2] = {w1, w2};
    float *ys[2] = {y1, y2};
    int64_t lds[2] = {ld1, ld2};
    int nw = w2 ? 2 : 1;
    bool fuse = nw == 2 && w1->type == w2->type && w1->n_in == w2->n_in;
    int quantized_for = -1;
    const cu_act *use = buf;
    for (int i = 0; i < nw; i++) {
        int at = act_quant ? cu_act_type(ws[i]->type) : -1;
        if (at >= 0 && at != quantized_for) {
            use = cu_act_codes(c, at, x, ldx, n, (int)ws[i]->n_in, buf);
            quantized_for = at;
        }
        cu_seg seg[2];
        int ns = 0;
        seg[ns++] = cu_seg{cu_weight_view(ws[i]), (int)ws[i]->n_out, ys[i], lds[i], 0};
        if (fuse) seg[ns++] = cu_seg{cu_weight_view(ws[1]), (int)ws[1]->n_out, ys[1], lds[1], 0};
        cu_matvec(c, seg, ns, n, x, at >= 0 ? ws[i]->n_in : ldx, at >= 0 ? use : nullptr, step, skip_le);
        if (fuse) break;
    }
}

CU_TU_SWITCHES(cu_sw_matvec)
