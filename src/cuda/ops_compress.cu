/* ops_compress.cu - CUDA stages of the compressors (MODEL.md C.5) and the
 * lightning indexer (C.6).
 *
 * Compressor: the batch's kv/gate projections, then one block per window
 * completed inside the batch pools its candidates (previous window's first
 * halves for the overlapping R = 4 compressor, then the current window),
 * reading positions before the batch from the frontier ring and the
 * batch's own positions from the projections; only then are the batch's
 * last c*R tokens written into the ring. Which windows complete is decided
 * on the device from the step's pos0.
 *
 * Indexer: per token the visible compressed rows are all rows when there
 * are <= top_k of them, else the top_k best scores (ties to the lower row)
 * listed in ascending order, found by an exact 4-pass radix select over
 * order-preserving keys of the float scores and an ordered compaction.
 */
#include "cuda/cuda.cuh"
#include "cuda/mma.cuh"
#include "cuda/rowops.cuh"

/* Element i of a small plain-typed weight (F32 / F16 / BF16). */
__device__ __forceinline__ float cu_plain(int type, const void *p, int64_t i) {
    if (type == DS4_TYPE_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return type == DS4_TYPE_F16 ? cu_h2f(h) : __uint_as_float((uint32_t)h << 16);
}

struct comp_p {
    const float *A, *G;       /* (n, w) batch projections */
    float *fa, *fg;           /* rings (ring, w) */
    const void *ape;          /* (R, w) plain type */
    int ape_type;
    const float *norm_w;      /* (d) */
    const float *inv_freq;
    void *rows;               /* (cap, d) T */
    int cap, d, w, R, ring, n, n_rot;
    bool overlap, indexer, fp8, fp4, f16;
    float eps;
    const ds4_step *step;
    int *status;
    int ring1;                /* k_comp_emit also writes the one token's frontier (DS4_CUDA_RING_IN_EMIT=1, n = 1) */
    int emit_reg;             /* DS4_CUDA_EMIT_REG (default 1): ratio-4 candidates loaded at once, FP8 block maxima by warps */
};

/* One block per window k completed by the batch (k = k_lo + blockIdx.x);
 * threads loop over channels; shared: 2*d floats. */
template <typename T>
__global__ void __launch_bounds__(256) k_comp_emit(const __grid_constant__ comp_p p) {
    cu_pdl_wait();
    extern __shared__ float sm[];
    __shared__ double red[32];
    float *row = sm, *fred = sm + p.d;
    const int pos0 = p.step->pos0, R = p.R;
    if (p.ring1 && blockIdx.x == 0) {
        /* DS4_CUDA_RING_IN_EMIT=1, one token (n = 1): k_comp_ring's stores of
         * token 0 here. No candidate below reads slot pos0 % ring: the window
         * completes at pos0 = R k + R - 1, and the candidates from the ring are
         * q in [R (k - 1), pos0) (overlap, ring 2R: pos0 - q < 2R) or [R k,
         * pos0) (ring R: q % R < R - 1 = pos0 % R) */
        const int slot = pos0 % p.ring;
        for (int col = threadIdx.x; col < p.w; col += blockDim.x) {
            p.fa[(int64_t)slot * p.w + col] = p.A[col];
            p.fg[(int64_t)slot * p.w + col] =
                __fadd_rn(p.G[col], cu_plain(p.ape_type, p.ape, (int64_t)(pos0 % R) * p.w + col));
        }
    }
    const int k = (pos0 + R) / R - 1 + blockIdx.x, k_hi = (pos0 + p.n) / R - 1;
    if (k > k_hi) return;
    /* candidate q at column offset off: g (with ape) and a */
    auto cand = [&](int q, int col, float *g, float *a) {
        if (q >= pos0) {
            const int64_t i = (int64_t)(q - pos0) * p.w + col;
            *a = p.A[i];
            *g = __fadd_rn(p.G[i], cu_plain(p.ape_type, p.ape, (int64_t)(q % R) * p.w + col));
        } else {
            const int64_t i = (int64_t)(q % p.ring) * p.w + col;
            *a = p.fa[i];
            *g = p.fg[i];
        }
    };
    const int off = p.overlap ? p.d : 0;
    const bool prev = p.overlap && k > 0;
    if (p.emit_reg && R == 4) {
        /* DS4_CUDA_EMIT_REG (default; 0: the loops below), ratio 4 (the CSA compressor and the indexer's):
         * a channel's <= 8 candidates loaded at once into registers (the
         * loops below wait for one load per candidate and pass, 24 round
         * trips), then the same expressions in the same order, each
         * candidate's expf(g - mx) computed once for the sum and the
         * weighted sum (the same value both times): the same bits */
        for (int ch = threadIdx.x; ch < p.d; ch += blockDim.x) {
            float g[8], a[8];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                g[i] = -INFINITY, a[i] = 0.0f;
                if (i < 4 && !prev) continue;
                if (i < 4) cand(4 * (k - 1) + i, ch, &g[i], &a[i]);
                else cand(4 * k + i - 4, off + ch, &g[i], &a[i]);
            }
            const int i0 = prev ? 0 : 4;
            float mx = -INFINITY, sum = 0.0f, acc = 0.0f, e[8];
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (i >= i0) mx = fmaxf(mx, g[i]);
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (i >= i0) {
                    e[i] = expf(g[i] - mx);
                    sum = __fadd_rn(sum, e[i]);
                }
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (i >= i0) acc = __fadd_rn(acc, __fmul_rn(a[i], e[i] / sum));
            row[ch] = acc;
        }
    } else
    for (int ch = threadIdx.x; ch < p.d; ch += blockDim.x) {
        float g, a, mx = -INFINITY, sum = 0.0f, acc = 0.0f;
        if (prev)
            for (int r = 0; r < R; r++) {
                cand(R * (k - 1) + r, ch, &g, &a);
                mx = fmaxf(mx, g);
            }
        for (int r = 0; r < R; r++) {
            cand(R * k + r, off + ch, &g, &a);
            mx = fmaxf(mx, g);
        }
        if (prev)
            for (int r = 0; r < R; r++) {
                cand(R * (k - 1) + r, ch, &g, &a);
                sum = __fadd_rn(sum, expf(g - mx));
            }
        for (int r = 0; r < R; r++) {
            cand(R * k + r, off + ch, &g, &a);
            sum = __fadd_rn(sum, expf(g - mx));
        }
        if (prev)
            for (int r = 0; r < R; r++) {
                cand(R * (k - 1) + r, ch, &g, &a);
                acc = __fadd_rn(acc, __fmul_rn(a, expf(g - mx) / sum));
            }
        for (int r = 0; r < R; r++) {
            cand(R * k + r, off + ch, &g, &a);
            acc = __fadd_rn(acc, __fmul_rn(a, expf(g - mx) / sum));
        }
        row[ch] = acc;
    }
    __syncthreads();
    cu_row_rmsnorm(row, p.d, p.norm_w, p.eps, red);
    cu_row_rope(row + p.d - p.n_rot, p.n_rot, p.inv_freq, k * R, false);
    if (p.indexer) {
        if (p.fp4 && p.emit_reg && p.d % 64 == 0 && p.d <= (int)blockDim.x) {
            /* EMIT_REG: thread i holds value i (whole warps beyond d idle
             * along): the Hadamard stages below 32 by shuffles, 32 and up
             * through row / fred in turn (one barrier each), the FP4 block
             * amax by shuffles (a block of 32 is a warp): cu_row_hadamard's
             * and cu_row_fp4's expressions, as idx_q_reg */
            const int i = threadIdx.x, d = p.d;
            float v = i < d ? row[i] : 0.0f;
            __syncthreads(); /* every thread has read row */
            v = cu_reg_hadamard_fp4(v, d, i < d, row, fred);
            __syncthreads(); /* the last stage's buffer read */
            if (i < d) row[i] = v;
            __syncthreads();
        } else if (p.fp4) {
            cu_row_hadamard(row, p.d);
            cu_row_fp4(row, p.d, fred);
        }
    } else if (p.fp8) {
        if (p.emit_reg && (p.d - p.n_rot) % 64 == 0 && (p.d - p.n_rot) / 64 <= (int)blockDim.x / 32) {
            /* EMIT_REG: block b's amax by warp b (two values per lane, then
             * a shuffle tree; maxima are exact in any order), one barrier
             * instead of cu_row_block_amax's tree of seven */
            const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
            if (w < (p.d - p.n_rot) / 64) {
                float am = fmaxf(fabsf(row[64 * w + lane]), fabsf(row[64 * w + 32 + lane]));
#pragma unroll
                for (int o = 16; o; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
                if (lane == 0) fred[64 * w] = am;
            }
            __syncthreads();
            for (int i = threadIdx.x; i < p.d - p.n_rot; i += blockDim.x) row[i] = cu_fp8_value(row[i], fred[i & ~63]);
            __syncthreads();
        } else
            cu_row_fp8(row, p.d - p.n_rot, 64, fred);
    }
    if (p.f16) cu_row_f16(row, p.d);
    if (k >= p.cap) {
        if (threadIdx.x == 0) atomicOr(p.status, p.indexer ? CU_ST_IDX_RANGE : CU_ST_COMP_RANGE);
        return;
    }
    T *dst = (T *)p.rows + (int64_t)k * p.d;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) dst[i] = cu_to_row<T>(row[i]);
}

/* The batch's last min(n, ring) tokens into the frontier rings. */
__global__ void k_comp_ring(const __grid_constant__ comp_p p) {
    cu_pdl_wait();
    const int t0 = p.n > p.ring ? p.n - p.ring : 0;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)(p.n - t0) * p.w) return;
    const int t = t0 + (int)(i / p.w), col = (int)(i % p.w);
    const int pos = p.step->pos0 + t, slot = pos % p.ring;
    const int64_t src = (int64_t)t * p.w + col, dst = (int64_t)slot * p.w + col;
    p.fa[dst] = p.A[src];
    p.fg[dst] = __fadd_rn(p.G[src], cu_plain(p.ape_type, p.ape, (int64_t)(pos % p.R) * p.w + col));
}

int cu_compress_update(void *ctx, const ds4_compress_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    const ds4_hparams *hp = &a->m->hp;
    const int n = a->n, D = hp->n_embd, cw = a->overlap ? 2 : 1, w = cw * a->d;
    cu_mv_pair(c, a->wkv, c->s.ca, w, a->wgate, c->s.cg, w, a->u, D, n, a->num.act_quant, &c->s.ac, a->step, 0);
    comp_p p;
    p.A = c->s.ca;
    p.G = c->s.cg;
    p.fa = a->fa;
    p.fg = a->fg;
    p.ape = a->ape->data;
    p.ape_type = a->ape->type;
    p.norm_w = a->norm_w;
    p.inv_freq = a->rope->inv_freq;
    p.rows = a->rows;
    p.cap = a->cap;
    p.d = a->d;
    p.w = w;
    p.R = a->ratio;
    p.ring = cw * a->ratio;
    p.n = n;
    p.n_rot = hp->n_rot;
    p.overlap = a->overlap;
    p.indexer = a->indexer;
    p.fp8 = a->num.fp8_kv;
    p.fp4 = a->num.fp4_indexer;
    p.f16 = a->num.f16_cache;
    p.eps = hp->rms_eps;
    p.step = a->step;
    p.status = c->dstatus;
    p.ring1 = c->ring_in_emit && n == 1;
    p.emit_reg = c->emit_reg;
    const int blocks = cu_div_up(n, a->ratio);
    const size_t smem = (size_t)2 * a->d * sizeof(float);
    if (a->row_type == DS4_TYPE_F16) cu_launch(c, k_comp_emit<__half>, blocks, 256, smem, p);
    else cu_launch(c, k_comp_emit<float>, blocks, 256, smem, p);
    CU_LAUNCH(c, "compress_emit");
    if (p.ring1) return c->err;
    const int nt = n > p.ring ? p.ring : n;
    cu_launch(c, k_comp_ring, cu_div_up((int64_t)nt * w, 256), 256, 0, p);
    CU_LAUNCH(c, "compress_ring");
    return c->err;
}

/* ---------------------------------------------------------------- indexer */

/* Indexer query finish for (t, h) = (blockIdx.y, blockIdx.x): RoPE at
 * pos0 + t, Hadamard + FP4 when on. Skipped below top_k. Shared: 2*ID. */
/* DS4_CUDA_ROWNORM_REG=1 form of k_idx_q's body for one (token, head) when
 * blockDim == ID (a multiple of 32): thread i holds value i in a register
 * through the RoPE (its pair partner by a shuffle), the Hadamard stages
 * (h < 32 by shuffles, 32 and up through shared memory, one barrier each),
 * the FP4 rounding (a block of 32 is one warp: its amax by shuffles) and
 * the codes: cu_rope_pair's, cu_row_hadamard's, cu_row_fp4's expressions,
 * so the same bits. sm: 2 * ID floats. */
__device__ __forceinline__ void idx_q_reg(float *q, int ID, int n_rot, const float *inv_freq, bool fp4, int pos,
                                          int8_t *qc, float *qp, float *sm) {
    const int i = threadIdx.x, r0 = ID - n_rot;
    float v = q[i];
    const float o1 = __shfl_xor_sync(0xffffffffu, v, 1); /* the RoPE pair's other value (r0 is even) */
    if (i >= r0) { /* pair j = (i - r0) / 2 of the rotated dims, x0 at even offsets */
        const float th = __fmul_rn((float)pos, inv_freq[(i - r0) >> 1]);
        const float c = cosf(th), s = sinf(th);
        v = ((i - r0) & 1) ? __fadd_rn(__fmul_rn(v, c), __fmul_rn(o1, s)) : __fsub_rn(__fmul_rn(v, c), __fmul_rn(o1, s));
    }
    if (fp4) v = cu_reg_hadamard_fp4(v, ID, true, sm, sm + ID);
    q[i] = v;
    if (qc) {
        float am = fabsf(v);
#pragma unroll
        for (int o = 16; o; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
        const float p = ds4_num_i4_pow(am);
        qc[i] = (int8_t)ds4_num_i4_code_r(v, p, ds4_num_i4_recip(p));
        if ((i & 31) == 0) qp[i / 32] = p;
    }
}

__global__ void __launch_bounds__(128) k_idx_q(float *qi, int IH, int ID, int n_rot, const float *inv_freq, bool fp4,
                                              int topk, int n, int8_t *qc, float *qp, const ds4_step *step, int reg) {
    cu_pdl_wait();
    extern __shared__ float sm[];
    const int pos0 = step->pos0;
    if ((pos0 + n) / 4 <= topk) return;
    const int t = blockIdx.y, h = blockIdx.x;
    float *q = qi + ((int64_t)t * IH + h) * ID, *row = sm, *fred = sm + ID;
    if (reg && (int)blockDim.x == ID) {
        idx_q_reg(q, ID, n_rot, inv_freq, fp4, pos0 + t, qc ? qc + ((int64_t)t * IH + h) * ID : nullptr,
                  qp ? qp + ((int64_t)t * IH + h) * (ID / 32) : nullptr, row);
        return;
    }
    for (int i = threadIdx.x; i < ID; i += blockDim.x) row[i] = q[i];
    __syncthreads();
    cu_row_rope(row + ID - n_rot, n_rot, inv_freq, pos0 + t, false);
    if (fp4) {
        cu_row_hadamard(row, ID);
        cu_row_fp4(row, ID, fred);
    }
    for (int i = threadIdx.x; i < ID; i += blockDim.x) q[i] = row[i];
    /* the codes of k_idx_scores_mma (ds4_num_fp4_codes): warp w holds block
     * w (ID <= 128 = blockDim, a multiple of 32: whole warps take part) */
    if (qc) {
        for (int i = threadIdx.x; i < ID; i += blockDim.x) {
            const float x = row[i];
            float am = fabsf(x);
#pragma unroll
            for (int o = 16; o; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
            const float p = ds4_num_i4_pow(am);
            qc[((int64_t)t * IH + h) * ID + i] = (int8_t)ds4_num_i4_code_r(x, p, ds4_num_i4_recip(p));
            if ((i & 31) == 0) qp[((int64_t)t * IH + h) * (ID / 32) + i / 32] = p;
        }
    }
}

/* Scores of rows for tokens t0..t0+nt-1 (blockIdx.y = t - t0): IDX_ROWS
 * rows per block, 4 threads per row, thread g holding the dots of heads
 * [g*hg, g*hg + hg) in registers (dims summed in order, 32 of the row's dims
 * in registers at a time); the per-head terms relu(q_h . k) * sm_scale *
 * (w_h * w_scale) go through shared memory and thread 0 of the row adds
 * them in head order, as cpu idx_score. Queries in shared memory, head h at
 * h*ID + 4*(h/hg) so the 4 groups' broadcasts fall on different banks.
 * Shared: IH x ID + 16 (q) + IDX_ROWS x (IH + 1) (terms) floats.
 * IH <= IDX_MAX_HEADS, ID a multiple of 32. */
#define IDX_ROWS 64
#define IDX_MAX_HEADS 64
#define IDX_HG (IDX_MAX_HEADS / 4)
template <typename T>
__global__ void __launch_bounds__(IDX_ROWS * 4) k_idx_scores(const float *qi, const float *wt, const T *krows, int IH,
                                                            int ID, int topk, int t0, float sm_scale, float w_scale,
                                                            float *scores, int64_t ld_scores, const ds4_step *step) {
    cu_pdl_wait();
    extern __shared__ float qs[];
    const int tl = blockIdx.y, t = t0 + tl, pos0 = step->pos0;
    const int Nc = (pos0 + t + 1) / 4;
    if (Nc <= topk) return;
    const int r0 = blockIdx.x * IDX_ROWS;
    if (r0 >= Nc) return;
    const int hg = (IH + 3) / 4;
    float *terms = qs + IH * ID + 16;
    const float *q = qi + (int64_t)t * IH * ID;
    for (int i = threadIdx.x; i < IH * ID / 4; i += blockDim.x) {
        const int h = (4 * i) / ID;
        *(float4 *)(qs + 4 * i + 4 * (h / hg)) = ((const float4 *)q)[i];
    }
    __syncthreads();
    const int rl = threadIdx.x >> 2, g = threadIdx.x & 3, r = r0 + rl;
    const int h0 = g * hg, nh = IH - h0 < hg ? (IH - h0 > 0 ? IH - h0 : 0) : hg;
    if (r < Nc) {
        float dot[IDX_HG];
#pragma unroll
        for (int h = 0; h < IDX_HG; h++) dot[h] = 0.0f;
        const T *kr = krows + (int64_t)r * ID;
        for (int d0 = 0; d0 < ID; d0 += 32) {
            float k[32];
            if constexpr (sizeof(T) == 2) {
                const uint4 *p = (const uint4 *)(kr + d0);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    uint4 u = p[i];
                    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        float2 f = __half22float2(*(const __half2 *)&w[j]);
                        k[8 * i + 2 * j] = f.x;
                        k[8 * i + 2 * j + 1] = f.y;
                    }
                }
            } else {
                const float4 *p = (const float4 *)(kr + d0);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    float4 f = p[i];
                    k[4 * i] = f.x, k[4 * i + 1] = f.y, k[4 * i + 2] = f.z, k[4 * i + 3] = f.w;
                }
            }
#pragma unroll
            for (int j = 0; j < IDX_HG; j++) {
                if (j < nh) {
                    const int h = h0 + j;
                    const float4 *qh = (const float4 *)(qs + h * ID + 4 * g + d0);
                    float sd = dot[j];
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        const float4 qv = qh[i];
                        sd = fmaf(qv.x, k[4 * i], sd);
                        sd = fmaf(qv.y, k[4 * i + 1], sd);
                        sd = fmaf(qv.z, k[4 * i + 2], sd);
                        sd = fmaf(qv.w, k[4 * i + 3], sd);
                    }
                    dot[j] = sd;
                }
            }
        }
        const float *wt_t = wt + (int64_t)t * IH;
#pragma unroll
        for (int j = 0; j < IDX_HG; j++) {
            if (j < nh) {
                const float sd = dot[j];
                const float v = __fmul_rn(sd > 0.0f ? sd : 0.0f, sm_scale);
                terms[rl * (IH + 1) + h0 + j] = __fmul_rn(v, __fmul_rn(wt_t[h0 + j], w_scale));
            }
        }
    }
    __syncthreads();
    if (r < Nc && g == 0) {
        float tot = 0.0f;
        for (int h = 0; h < IH; h++) tot = __fadd_rn(tot, terms[rl * (IH + 1) + h]);
        scores[(int64_t)tl * ld_scores + r] = tot;
    }
}

/* The same scores with a register tile (the default for plain numerics;
 * DS4_CUDA_NO_IDX_TILE=1: k_idx_scores): a block takes IDXT_ROWS keys of one token for all heads; the
 * query (transposed, qT[d][h]) and the keys (transposed, kT[d][r]) sit in
 * shared memory and thread (rg, hg) holds the dots of keys 4rg..4rg+3 with
 * heads 4hg..4hg+3 and 32+4hg..32+4hg+3: per dim 32 fma for two 16-byte
 * query loads and one 4-key load (k_idx_scores: 4 fma per 16-byte load,
 * ~4 TFLOP/s at 1M context). Each (key, head) dot is the same fmaf chain
 * over the dims in order and the terms are formed and added in head order
 * exactly as there, so the scores keep their bits. IH == 64, ID <= 128 and
 * a multiple of 16 (the launcher checks; other shapes take k_idx_scores).
 * Shared: ID x 64 (qT) floats then ID x IDXT_ROWS (kT) T; afterwards the
 * IDXT_ROWS x 65 terms over them. */
#define IDXT_ROWS 128
template <typename T>
__global__ void __launch_bounds__(256) k_idx_scores_t(const float *qi, const float *wt, const T *krows, int ID,
                                                     int topk, int t0, float sm_scale, float w_scale, float *scores,
                                                     int64_t ld_scores, const ds4_step *step) {
    cu_pdl_wait();
    extern __shared__ float qT[];                                   /* ID x 64 */
    T *kT = (T *)(qT + (size_t)ID * 64);                            /* ID x IDXT_ROWS */
    float *terms = qT; /* IDXT_ROWS x 65, over qT and kT once the dots are done */
    const int tl = blockIdx.y, t = t0 + tl, pos0 = step->pos0;
    const int Nc = (pos0 + t + 1) / 4;
    if (Nc <= topk) return;
    const int r0 = blockIdx.x * IDXT_ROWS;
    if (r0 >= Nc) return;
    const int tid = threadIdx.x;
    /* the query, transposed: thread (h = i % 64, 4 dims) reads q[h][d..d+3]
     * and writes qT[d + j][h] (consecutive threads, consecutive heads) */
    const float *q = qi + (int64_t)t * 64 * ID;
    for (int i = tid; i < 64 * ID / 4; i += blockDim.x) {
        const int h = i % 64, d = 4 * (i / 64);
        const float4 v = *(const float4 *)(q + (int64_t)h * ID + d);
        qT[(d + 0) * 64 + h] = v.x;
        qT[(d + 1) * 64 + h] = v.y;
        qT[(d + 2) * 64 + h] = v.z;
        qT[(d + 3) * 64 + h] = v.w;
    }
    /* the keys, transposed: thread (key quad rq, 4 dims c) reads dims
     * 4c..4c+3 of keys 4rq..4rq+3 (one 8- or 16-byte load each) and writes
     * kT[4c + j][4rq..4rq+3] (one store per dim; consecutive threads,
     * consecutive key quads); keys past Nc are 0 */
    const int nc4 = ID / 4;
    for (int i = tid; i < (IDXT_ROWS / 4) * nc4; i += blockDim.x) {
        /* a warp: 8 key quads x 4 dim chunks, i.e. 32 contiguous bytes of
         * each of 8 keys per load (ID % 16 == 0, checked by the launcher) */
        const int lane = i & 31, wi = i >> 5;
        const int rq = (lane & 7) + 8 * (wi & 3), c = 4 * (wi >> 2) + (lane >> 3);
        T v[4][4];
#pragma unroll
        for (int a = 0; a < 4; a++) {
            const int r = r0 + 4 * rq + a;
            const T *src = krows + (int64_t)r * ID + 4 * c;
            if constexpr (sizeof(T) == 2) {
                uint2 u = make_uint2(0u, 0u);
                if (r < Nc) u = *(const uint2 *)src;
                memcpy(v[a], &u, sizeof u);
            } else {
                float4 f = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (r < Nc) f = *(const float4 *)src;
                memcpy(v[a], &f, sizeof f);
            }
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            T w[4] = {v[0][j], v[1][j], v[2][j], v[3][j]};
            T *dst = kT + (4 * c + j) * IDXT_ROWS + 4 * rq;
            if constexpr (sizeof(T) == 2) {
                uint2 u;
                memcpy(&u, w, sizeof u);
                *(uint2 *)dst = u;
            } else {
                float4 f;
                memcpy(&f, w, sizeof f);
                *(float4 *)dst = f;
            }
        }
    }
    __syncthreads();
    const int hg = tid & 7, rg = tid >> 3;
    float acc[4][8];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < 8; b++) acc[a][b] = 0.0f;
    for (int d = 0; d < ID; d++) {
        const float4 qa = *(const float4 *)(qT + d * 64 + 4 * hg);
        const float4 qb = *(const float4 *)(qT + d * 64 + 32 + 4 * hg);
        const float qv[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
        float kv[4];
        if constexpr (sizeof(T) == 2) {
            const uint2 u = *(const uint2 *)(kT + d * IDXT_ROWS + 4 * rg);
            const float2 f0 = __half22float2(*(const __half2 *)&u.x), f1 = __half22float2(*(const __half2 *)&u.y);
            kv[0] = f0.x, kv[1] = f0.y, kv[2] = f1.x, kv[3] = f1.y;
        } else {
            const float4 f = *(const float4 *)(kT + d * IDXT_ROWS + 4 * rg);
            kv[0] = f.x, kv[1] = f.y, kv[2] = f.z, kv[3] = f.w;
        }
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int b = 0; b < 8; b++) acc[a][b] = fmaf(qv[b], kv[a], acc[a][b]);
    }
    /* the per-head terms (over the shared tiles: all reads done first),
     * then one thread per key adds them in head order */
    __syncthreads();
    const float *wt_t = wt + (int64_t)t * 64;
#pragma unroll
    for (int b = 0; b < 8; b++) {
        const int h = b < 4 ? 4 * hg + b : 32 + 4 * hg + (b - 4);
        const float wh = __fmul_rn(wt_t[h], w_scale);
#pragma unroll
        for (int a = 0; a < 4; a++) {
            const float sd = acc[a][b];
            const float v = __fmul_rn(sd > 0.0f ? sd : 0.0f, sm_scale);
            terms[(4 * rg + a) * 65 + h] = __fmul_rn(v, wh);
        }
    }
    __syncthreads();
    if (tid < IDXT_ROWS && r0 + tid < Nc) {
        float tot = 0.0f;
        for (int h = 0; h < 64; h++) tot = __fadd_rn(tot, terms[tid * 65 + h]);
        scores[(int64_t)tl * ld_scores + r0 + tid] = tot;
    }
}

/* The scores of FP4 numerics on int8 tensor cores (the default;
 * DS4_CUDA_NO_IDX_MMA=1: the CUDA-core kernels). The query and the rows as int8 codes times a
 * power of two per block of 32 (numerics_inl.h; the queries' from k_idx_q,
 * the rows' here), one m16n8k32 mma per block gives the exact integer block
 * sums S_b of 16 heads x 8 keys, and each dot is then ds4_num_fp4_dot's
 * (float)S_0 * (pq * pk), fmaf for the next blocks in order, so the scores
 * are the CPU reference's bits (cpu_fp4_dot_heads). The per-head terms and
 * their head-order sum as k_idx_scores. A block: IDXM_KEYS rows, their codes
 * made once, for tpb tokens in turn (1 while the grid has at most 1,024
 * blocks, else IDXM_TOK, reusing the rows; tpb 0: decided here);
 * warp w takes keys 16w..16w+15, all heads (IH padded to 16s with zero
 * codes). IH <= 64, ID <= 128 and a multiple of 32 (the launcher checks).
 * Shared: codes of rows and queries with rows ID + 16 bytes apart (fragment
 * loads on 32 banks), their powers, head weights, IDXM_KEYS x 65 terms. */
#define IDXM_KEYS 128
#define IDXM_TOK 8
static size_t idxm_smem(int ID) {
    return (size_t)(IDXM_KEYS + 64) * (ID + 16) + (size_t)(IDXM_KEYS + 64) * 4 * sizeof(float) + 64 * sizeof(float) +
           (size_t)IDXM_KEYS * 65 * sizeof(float);
}
/* The shared-memory layout of k_idx_scores_mma (idxm_smem) */
struct idxm_sh {
    int8_t *kcs, *qcs;  /* IDXM_KEYS and 64 rows of RS = ID + 16 code bytes */
    float *kps, *qps;   /* their block powers, 4 per row */
    float *whs, *terms; /* 64 head weights; IDXM_KEYS x 65 terms */
    int RS;
};
__device__ __forceinline__ idxm_sh idxm_layout(unsigned char *sm, int ID) {
    idxm_sh m;
    m.RS = ID + 16;
    m.kcs = (int8_t *)sm;
    m.qcs = m.kcs + IDXM_KEYS * m.RS;
    m.kps = (float *)(m.qcs + 64 * m.RS);
    m.qps = m.kps + IDXM_KEYS * 4;
    m.whs = m.qps + 64 * 4;
    m.terms = m.whs + 64;
    return m;
}

/* token t's query codes, powers and head weights into shared memory
 * (heads past IH as zeros); every thread of the block calls it */
__device__ __forceinline__ void idxm_stage_q(const idxm_sh &m, const int8_t *qc, const float *qp, const float *wt,
                                             int IH, int ID, float w_scale, int t) {
    const int tid = threadIdx.x, nb = ID / 32;
    for (int i = tid; i < 64 * (ID / 16); i += blockDim.x) {
        const int h = i / (ID / 16), cch = i % (ID / 16);
        uint4 u = make_uint4(0u, 0u, 0u, 0u);
        if (h < IH) u = *(const uint4 *)(qc + ((int64_t)t * IH + h) * ID + 16 * cch);
        *(uint4 *)(m.qcs + h * m.RS + 16 * cch) = u;
    }
    for (int i = tid; i < 64 * nb; i += blockDim.x) {
        const int h = i / nb, b = i % nb;
        m.qps[h * 4 + b] = h < IH ? qp[((int64_t)t * IH + h) * nb + b] : 0.0f;
    }
    if (tid < 64) m.whs[tid] = tid < IH ? __fmul_rn(wt[(int64_t)t * IH + tid], w_scale) : 0.0f;
}

/* The staged token's terms of the block's keys and heads: warp w's keys
 * 16w..16w+15, one m16n8k32 mma per 32-value block (exact integer sums),
 * then ds4_num_fp4_dot's float steps, relu, scale and head weight */
__device__ __forceinline__ void idxm_terms(const idxm_sh &m, int IH, int ID, float sm_scale) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const int nb = ID / 32, nht = (IH + 15) / 16, RS = m.RS;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int kn = warp * 16 + half * 8; /* this mma's 8 keys */
        unsigned bf[4][2];
        float pk0[4], pk1[4];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            if (b < nb) {
                bf[b][0] = *(const unsigned *)(m.kcs + (kn + g) * RS + 32 * b + 4 * tq);
                bf[b][1] = *(const unsigned *)(m.kcs + (kn + g) * RS + 32 * b + 16 + 4 * tq);
                pk0[b] = m.kps[(kn + 2 * tq) * 4 + b];
                pk1[b] = m.kps[(kn + 2 * tq + 1) * 4 + b];
            }
        }
        for (int ht = 0; ht < nht; ht++) {
            const int ha = ht * 16 + g; /* heads ha, ha + 8 */
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int b = 0; b < 4; b++) {
                if (b < nb) {
                    unsigned af[4];
                    af[0] = *(const unsigned *)(m.qcs + ha * RS + 32 * b + 4 * tq);
                    af[1] = *(const unsigned *)(m.qcs + (ha + 8) * RS + 32 * b + 4 * tq);
                    af[2] = *(const unsigned *)(m.qcs + ha * RS + 32 * b + 16 + 4 * tq);
                    af[3] = *(const unsigned *)(m.qcs + (ha + 8) * RS + 32 * b + 16 + 4 * tq);
                    int ci[4];
                    mm_mma(af, bf[b][0], bf[b][1], ci);
                    const float pa = m.qps[ha * 4 + b], pb = m.qps[(ha + 8) * 4 + b];
                    const float pp[4] = {__fmul_rn(pa, pk0[b]), __fmul_rn(pa, pk1[b]), __fmul_rn(pb, pk0[b]),
                                         __fmul_rn(pb, pk1[b])};
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        d[e] = b ? __fmaf_rn(mm_i2f(ci[e]), pp[e], d[e]) : __fmul_rn(mm_i2f(ci[e]), pp[e]);
                }
            }
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int h = ha + (e >> 1) * 8, key = kn + 2 * tq + (e & 1);
                const float v = __fmul_rn(d[e] > 0.0f ? d[e] : 0.0f, sm_scale);
                m.terms[key * 65 + h] = __fmul_rn(v, m.whs[h]);
            }
        }
    }
}

/* Key `tid`'s score: its terms added in head order (REG: the 64 terms
 * loaded at once first; IH 64 only) */
template <bool REG>
__device__ __forceinline__ float idxm_sum(const idxm_sh &m, int IH, int tid) {
    float tot = 0.0f;
    if (REG && IH == 64) {
        float tv[64];
#pragma unroll
        for (int h = 0; h < 64; h++) tv[h] = m.terms[tid * 65 + h];
#pragma unroll
        for (int h = 0; h < 64; h++) tot = __fadd_rn(tot, tv[h]);
    } else {
        for (int h = 0; h < IH; h++) tot = __fadd_rn(tot, m.terms[tid * 65 + h]);
    }
    return tot;
}

template <typename T, int PP = 1>
__global__ void __launch_bounds__(256) k_idx_scores_mma(const int8_t *qc, const float *qp, const float *wt,
                                                       const T *krows, int IH, int ID, int topk, int t0, int nt,
                                                       int tpb, float sm_scale, float w_scale, float *scores,
                                                       int64_t ld_scores, const ds4_step *step) {
    cu_pdl_wait();
    extern __shared__ __align__(16) unsigned char idxm_sm[];
    const idxm_sh m = idxm_layout(idxm_sm, ID);
    const int RS = m.RS, nb = ID / 32;
    const int pos0 = step->pos0, tid = threadIdx.x;
    if (tpb == 0) { /* a captured step: decided from the rows of this replay, the grid has nt rows of blocks */
        const int rows = (pos0 + t0 + nt) / 4 + 1;
        tpb = (int64_t)((rows + IDXM_KEYS - 1) / IDXM_KEYS) * nt <= 1024 ? 1 : IDXM_TOK;
        if ((int)blockIdx.y * tpb >= nt) return;
    }
    const int tb = t0 + blockIdx.y * tpb, te = min(tb + tpb, t0 + nt);
    const int r0 = blockIdx.x * IDXM_KEYS, nc_max = (pos0 + te) / 4;
    const bool rcs = nt == 1; /* one token: each row read once per step (cu_kvld) */
    if (nc_max <= topk || r0 >= nc_max) return;
    /* the rows' codes: thread (row, block), consecutive threads on
     * consecutive 32-value blocks of consecutive rows; PP (row, block)
     * pairs per thread loaded before the first one's codes (PP = 1: one
     * pair's loads, then its codes, then the next pair's loads) */
    constexpr int NU = sizeof(T) == 2 ? 4 : 8; /* 16-byte loads per pair */
    const int npair = IDXM_KEYS * nb;
    /* the first token's query codes, powers and head weights (PP > 1):
     * staged now, their loads in flight with the rows' */
    if constexpr (PP > 1) idxm_stage_q(m, qc, qp, wt, IH, ID, w_scale, tb);
    for (int p0 = tid; p0 < npair; p0 += PP * blockDim.x) {
        uint4 raw[PP][NU];
#pragma unroll
        for (int k = 0; k < PP; k++) {
            const int pi = p0 + k * blockDim.x, kl = pi / nb, b = pi % nb, r = r0 + kl;
            if (pi < npair && r < nc_max) {
                const uint4 *src = (const uint4 *)(krows + (int64_t)r * ID + 32 * b);
#pragma unroll
                for (int i = 0; i < NU; i++) raw[k][i] = cu_kvld(src + i, rcs);
            } else {
#pragma unroll
                for (int i = 0; i < NU; i++) raw[k][i] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
#pragma unroll
        for (int k = 0; k < PP; k++) {
            const int pi = p0 + k * blockDim.x, kl = pi / nb, b = pi % nb;
            if (pi >= npair) break;
            float v[32];
#pragma unroll
            for (int i = 0; i < NU; i++) {
                const uint32_t w[4] = {raw[k][i].x, raw[k][i].y, raw[k][i].z, raw[k][i].w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    if constexpr (sizeof(T) == 2) {
                        const float2 f = __half22float2(*(const __half2 *)&w[j]);
                        v[8 * i + 2 * j] = f.x, v[8 * i + 2 * j + 1] = f.y;
                    } else {
                        v[4 * i + j] = __uint_as_float(w[j]);
                    }
                }
            }
            float am = 0.0f;
#pragma unroll
            for (int i = 0; i < 32; i++) am = fmaxf(am, fabsf(v[i]));
            const float p = ds4_num_i4_pow(am), ip = ds4_num_i4_recip(p);
            uint32_t w[8];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                uint32_t x = 0;
#pragma unroll
                for (int j = 0; j < 4; j++)
                    x |= ((uint32_t)(uint8_t)(int8_t)ds4_num_i4_code_r(v[4 * i + j], p, ip)) << (8 * j);
                w[i] = x;
            }
            uint4 *dst = (uint4 *)(m.kcs + kl * RS + 32 * b);
            dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
            dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
            m.kps[kl * 4 + b] = p;
        }
    }
    for (int t = tb; t < te; t++) {
        const int Nc = (pos0 + t + 1) / 4;
        __syncthreads(); /* the rows' codes; the previous token's terms read */
        if (Nc <= topk) continue;
        if (PP == 1 || t != tb) {
            idxm_stage_q(m, qc, qp, wt, IH, ID, w_scale, t);
            __syncthreads();
        }
        idxm_terms(m, IH, ID, sm_scale);
        __syncthreads();
        if (tid < IDXM_KEYS && r0 + tid < Nc) scores[(int64_t)(t - t0) * ld_scores + r0 + tid] = idxm_sum<(PP > 1)>(m, IH, tid);
    }
}

__device__ __forceinline__ uint32_t cu_order_key(float f) {
    if (f == 0.0f) f = 0.0f; /* -0 ties +0, as the CPU's comparisons */
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Warp 0 of a block: the largest bin b of hist[256] whose keys, with those
 * of all higher bins, reach `need` (bin 0 when none above does): lane l
 * holds bins 8l..8l+7, the counts above each lane come from a suffix scan;
 * integer sums, so the result is exactly the serial scan's. Writes the
 * extended prefix and the keys still needed from that bin. */
__device__ __forceinline__ void topk_pick_bin(const int *hist, int need, uint32_t prefix, int shift, uint32_t *s_prefix,
                                              int *s_need) {
    const int l = threadIdx.x;
    int h[8], sl = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) sl += (h[j] = hist[8 * l + j]);
    int suf = sl; /* bins of lanes >= l */
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int v = __shfl_down_sync(0xffffffffu, suf, o);
        if (l + o < 32) suf += v;
    }
    int cum = suf - sl, hit = -1, cum_hit = 0;
#pragma unroll
    for (int j = 7; j >= 0; j--) {
        if (hit < 0 && (cum + h[j] >= need || (l == 0 && j == 0))) {
            hit = 8 * l + j;
            cum_hit = cum;
        }
        cum += h[j];
    }
    const unsigned any = __ballot_sync(0xffffffffu, hit >= 0);
    const int top = 31 - __clz(any);
    if (l == top) {
        *s_prefix = prefix | ((uint32_t)hit << shift);
        *s_need = need - cum_hit;
    }
}

/* The same histogram step for a block's keys in [lo, hi) of s (or of the
 * order keys ks in shared memory when ks): the lanes of a warp with the
 * same bin add once (__match_any_sync) instead of 32 atomics on one word
 * in turn (most keys share the leading bytes: the scores' sign and
 * exponent). */
template <int U>
__device__ __forceinline__ void topk_hist(int *hist, const float *s, const uint32_t *ks, int lo, int hi, uint32_t mask,
                                          uint32_t prefix, int shift) {
    const int lane = threadIdx.x & 31;
    if constexpr (U > 1) {
        /* U keys per thread per round, all loaded before any is counted
         * (U loads in flight instead of one at L2 latency) */
        for (int i0 = lo; i0 < hi; i0 += U * blockDim.x) {
            uint32_t k[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = i0 + u * (int)blockDim.x + threadIdx.x;
                k[u] = i < hi ? (ks ? ks[i - lo] : cu_order_key(s[i])) : 0u;
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = i0 + u * (int)blockDim.x + threadIdx.x;
                const int bin = i < hi && (k[u] & mask) == prefix ? (int)((k[u] >> shift) & 255) : -1;
                const unsigned peers = __match_any_sync(0xffffffffu, bin);
                if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
            }
        }
    } else {
        for (int i0 = lo; i0 < hi; i0 += blockDim.x) {
            const int i = i0 + threadIdx.x;
            int bin = -1;
            if (i < hi) {
                const uint32_t k = ks ? ks[i - lo] : cu_order_key(s[i]);
                if ((k & mask) == prefix) bin = (int)((k >> shift) & 255);
            }
            const unsigned peers = __match_any_sync(0xffffffffu, bin);
            if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
        }
    }
}

/* Ordered compaction of a block's keys in [lo, hi) (of s, or the order
 * keys ks in shared memory): every key above prefix and the keys equal to
 * it while fewer than `need` equal keys come before them (base_eq before
 * this range), written from out[base_sel] on in index order. wsum: 2 x
 * (warps) ints of shared memory. */
template <int U>
__device__ __forceinline__ void topk_compact(const float *s, const uint32_t *ks, int lo, int hi, uint32_t prefix,
                                             int need, int base_sel, int base_eq, int32_t *out, int topk, int *wsum) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if constexpr (U > 1) {
        /* U consecutive keys per thread per chunk; the counts of the keys
         * above and at the k-th before each thread from a block scan (warp
         * shuffles, then warp 0 over the warp totals); wsum: 2 nw + 2 ints.
         * Taken before key i: base_sel + the keys above it in [lo, i) +
         * min(base_eq + equal keys in [lo, i), need) - min(base_eq, need). */
        const int taken0 = base_eq < need ? base_eq : need;
        int acc_gt = 0, acc_eq = 0;
        for (int c0 = lo; c0 < hi; c0 += U * (int)blockDim.x) {
            const int j0 = c0 + U * threadIdx.x;
            uint32_t k[U];
            int n_gt = 0, n_eq = 0;
            if (U == 8 && ks && j0 + U <= hi) {
                /* two 16-byte loads (j0 - lo is a multiple of 8; the keys
                 * are 16-byte aligned): 8 scalar loads at a stride of 8
                 * words would meet 8-way bank conflicts */
                const uint4 a = *(const uint4 *)(ks + (j0 - lo)), b = *(const uint4 *)(ks + (j0 - lo) + 4);
                const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int u = 0; u < U; u++) k[u] = w[u % 8];
            } else {
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int i = j0 + u;
                    k[u] = i < hi ? (ks ? ks[i - lo] : cu_order_key(s[i])) : 0u;
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = j0 + u;
                n_gt += i < hi && k[u] > prefix;
                n_eq += i < hi && k[u] == prefix;
            }
            int ig = n_gt, ie = n_eq; /* inclusive scans within the warp */
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int a = __shfl_up_sync(0xffffffffu, ig, o), b = __shfl_up_sync(0xffffffffu, ie, o);
                if (lane >= o) ig += a, ie += b;
            }
            if (lane == 31) wsum[w] = ig, wsum[nw + w] = ie;
            __syncthreads();
            if (w == 0) {
                const int a = lane < nw ? wsum[lane] : 0, b = lane < nw ? wsum[nw + lane] : 0;
                int sa = a, sb = b;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const int x = __shfl_up_sync(0xffffffffu, sa, o), y = __shfl_up_sync(0xffffffffu, sb, o);
                    if (lane >= o) sa += x, sb += y;
                }
                if (lane < nw) wsum[lane] = sa - a, wsum[nw + lane] = sb - b;
                if (lane == 31) wsum[2 * nw] = sa, wsum[2 * nw + 1] = sb;
            }
            __syncthreads();
            int gt_before = acc_gt + wsum[w] + ig - n_gt, eq_before = acc_eq + wsum[nw + w] + ie - n_eq;
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = j0 + u;
                const bool gt = i < hi && k[u] > prefix, eq = i < hi && k[u] == prefix;
                const int e_all = base_eq + eq_before;
                if (gt || (eq && e_all < need)) {
                    const int pos = base_sel + gt_before + (e_all < need ? e_all : need) - taken0;
                    if (pos < topk) out[pos] = i;
                }
                gt_before += gt;
                eq_before += eq;
            }
            acc_gt += wsum[2 * nw];
            acc_eq += wsum[2 * nw + 1];
            __syncthreads();
        }
    } else {
        for (int i0 = lo; i0 < hi; i0 += blockDim.x) {
            const int i = i0 + threadIdx.x;
            uint32_t k = i < hi ? (ks ? ks[i - lo] : cu_order_key(s[i])) : 0;
            const bool gt = i < hi && k > prefix, eq = i < hi && k == prefix;
            const unsigned lt = (1u << lane) - 1;
            unsigned beq = __ballot_sync(0xffffffffu, eq);
            if (lane == 0) wsum[nw + w] = __popc(beq);
            __syncthreads();
            int eq_before = base_eq;
            for (int k2 = 0; k2 < w; k2++) eq_before += wsum[nw + k2];
            eq_before += __popc(beq & lt);
            const bool take = gt || (eq && eq_before < need);
            unsigned bt = __ballot_sync(0xffffffffu, take);
            if (lane == 0) wsum[w] = __popc(bt);
            __syncthreads();
            int pos = base_sel;
            for (int k2 = 0; k2 < w; k2++) pos += wsum[k2];
            pos += __popc(bt & lt);
            if (take && pos < topk) out[pos] = i;
            int tot_sel = 0, tot_eq = 0;
            for (int k2 = 0; k2 < nw; k2++) {
                tot_sel += wsum[k2];
                tot_eq += wsum[nw + k2];
            }
            base_sel += tot_sel;
            base_eq += tot_eq;
            __syncthreads();
        }
    }
}

/* past this many compressed rows the top-k takes 8 keys per thread and round */
#define TOPK_ILP_ROWS 4096

/* One block's radix select and compaction of the Nc scores s (U keys per
 * thread and round). */
template <int U>
__device__ __forceinline__ void topk_block(const float *s, int Nc, int topk, int32_t *out, int *hist,
                                           uint32_t *s_prefix, int *s_need, int *wsum) {
    uint32_t prefix = 0, mask = 0;
    int need = topk;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        topk_hist<U>(hist, s, nullptr, 0, Nc, mask, prefix, shift);
        __syncthreads();
        if (threadIdx.x < 32) topk_pick_bin(hist, need, prefix, shift, s_prefix, s_need);
        __syncthreads();
        prefix = *s_prefix;
        need = *s_need;
        mask |= 255u << shift;
        __syncthreads();
    }
    /* prefix = key of the k-th largest; `need` of the keys equal to it are
     * taken, lowest indices first. */
    topk_compact<U>(s, nullptr, 0, Nc, prefix, need, 0, 0, out, topk, wsum);
}

/* Top-k of token t = t0 + blockIdx.x (1024 threads). Radix select of the
 * k-th largest key (4 passes of 8 bits), then an ordered compaction taking
 * every key above it and the lowest-index keys equal to it. U: keys per
 * thread and round, 1 or 8, or 0: 8 past TOPK_ILP_ROWS of the token's own
 * rows, else 1 (decided here: a captured step's launch knows only the
 * capacity). The same selection for any U. */
template <int U>
__global__ void __launch_bounds__(1024) k_idx_topk(const float *scores, int64_t ld_scores, int topk, int t0,
                                                  int32_t *sel, int32_t *n_sel, const ds4_step *step) {
    cu_pdl_wait();
    __shared__ int hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int s_need;
    __shared__ int wsum[2 * 32 + 2];
    const int tl = blockIdx.x, t = t0 + tl;
    const int Nc = (step->pos0 + t + 1) / 4;
    int32_t *out = sel + (int64_t)t * topk;
    if (Nc <= topk) {
        for (int i = threadIdx.x; i < Nc; i += blockDim.x) out[i] = i;
        if (threadIdx.x == 0) n_sel[t] = Nc;
        return;
    }
    const float *s = scores + (int64_t)tl * ld_scores;
    if (U == 8 || (U == 0 && Nc > TOPK_ILP_ROWS)) topk_block<8>(s, Nc, topk, out, hist, &s_prefix, &s_need, wsum);
    else topk_block<1>(s, Nc, topk, out, hist, &s_prefix, &s_need, wsum);
    if (threadIdx.x == 0) n_sel[t] = topk;
}

/* The same top-k over several blocks per token (decode and MTP verify at
 * long contexts: one block reads ~1M scores at L2 latency, 0.83 ms at 262k
 * rows on an H100). Token t = t0 + blockIdx.y; G = min(gridDim.x, rows /
 * TOPW_CHUNK rounded up) blocks each hold a slice of the order keys in
 * shared memory, and meet after each radix pass: their histograms add up in
 * global memory (sync, TOPW_SYNC words per token), the last block to arrive
 * (a wrapping counter) picks the bin and releases the others (a generation
 * word they spin on). Then each block counts its keys above and at the k-th,
 * meets once more, and compacts its slice from the position the blocks
 * before it leave (the same selection as k_idx_topk: every key above the
 * k-th, the lowest-index keys equal to it, ascending). Every block of a
 * launch must be resident at once (the launcher keeps gridDim.x * gridDim.y
 * <= TOPW_MAX_BLOCKS); a wait longer than 2 s sets CU_ST_TOPK_SYNC and the
 * step fails instead of hanging. */
#define TOPW_THREADS 512
#define TOPW_CHUNK 4096
#define TOPW_SYNC 1024
#define TOPW_MAX_BLOCKS 128
#define TOPW_MAX_TOKENS 4
#define TOPW_MAX_SMEM (96 * 1024)
__device__ __forceinline__ unsigned long long cu_globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
template <int U>
__global__ void __launch_bounds__(TOPW_THREADS) k_idx_topk_wide(const float *scores, int64_t ld_scores, int topk,
                                                               int t0, int32_t *sel, int32_t *n_sel, unsigned *sync,
                                                               int *status, const ds4_step *step) {
    cu_pdl_wait_only();
    /* blocks of an earlier launch of this step did not meet: the step fails,
     * and the meeting state is reset at its end (cu_step_end) */
    if (*(volatile int *)status & CU_ST_TOPK_SYNC) return;
    extern __shared__ __align__(16) uint32_t topw_keys[];
    __shared__ int hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int s_need, s_last, s_ok, s_base[2];
    __shared__ unsigned s_gen;
    __shared__ int wsum[2 * (TOPW_THREADS / 32) + 2];
    const int tl = blockIdx.y, t = t0 + tl, b = blockIdx.x, tid = threadIdx.x;
    const int Nc = (step->pos0 + t + 1) / 4;
    int32_t *out = sel + (int64_t)t * topk;
    if (Nc <= topk) {
        if (b == 0) {
            for (int i = tid; i < Nc; i += blockDim.x) out[i] = i;
            if (tid == 0) n_sel[t] = Nc;
        }
        return;
    }
    const int G = min((int)gridDim.x, (Nc + TOPW_CHUNK - 1) / TOPW_CHUNK);
    if (b >= G) return;
    const int S = (Nc + G - 1) / G, lo = b * S, hi = min(Nc, lo + S);
    const float *s = scores + (int64_t)tl * ld_scores;
    for (int i = lo + tid; i < hi; i += blockDim.x) topw_keys[i - lo] = cu_order_key(s[i]);
    /* [0] arrivals, [1] generation, [2] prefix, [3] need, [4, 260) the
     * histogram, [260, 260 + 2 G) the blocks' counts */
    unsigned *ts = sync + (size_t)tl * TOPW_SYNC;
    auto meet = [&](bool pick, int need, uint32_t prefix, int shift) -> bool {
        __syncthreads();
        if (tid == 0) {
            s_gen = *(volatile unsigned *)&ts[1];
            __threadfence();
            s_last = atomicInc(&ts[0], (unsigned)G - 1) == (unsigned)G - 1;
            __threadfence(); /* the last block: the others' histogram adds before its reads */
            s_ok = 1;
        }
        __syncthreads();
        if (s_last) {
            if (pick) {
                for (int i = tid; i < 256; i += blockDim.x) hist[i] = (int)atomicExch(&ts[4 + i], 0u);
                __syncthreads();
                if (tid < 32) topk_pick_bin(hist, need, prefix, shift, &s_prefix, &s_need);
                __syncthreads();
                if (tid == 0) ts[2] = s_prefix, ts[3] = (unsigned)s_need;
            }
            __syncthreads();
            if (tid == 0) {
                __threadfence();
                atomicAdd(&ts[1], 1u);
            }
        } else if (tid == 0) {
            const unsigned long long w0 = cu_globaltimer();
            while (*(volatile unsigned *)&ts[1] == s_gen) {
                if (cu_globaltimer() - w0 > 2000000000ull) {
                    atomicOr(status, CU_ST_TOPK_SYNC);
                    s_ok = 0;
                    break;
                }
                __nanosleep(100);
            }
            __threadfence();
        }
        __syncthreads();
        return s_ok;
    };
    uint32_t prefix = 0, mask = 0;
    int need = topk;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        topk_hist<U>(hist, nullptr, topw_keys, lo, hi, mask, prefix, shift);
        __syncthreads();
        if (G > 1) {
            for (int i = tid; i < 256; i += blockDim.x)
                if (hist[i]) atomicAdd(&ts[4 + i], (unsigned)hist[i]);
            if (!meet(true, need, prefix, shift)) return;
            if (tid == 0) s_prefix = *(volatile unsigned *)&ts[2], s_need = (int)*(volatile unsigned *)&ts[3];
        } else if (tid < 32) {
            topk_pick_bin(hist, need, prefix, shift, &s_prefix, &s_need);
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= 255u << shift;
        __syncthreads();
    }
    int base_sel = 0, base_eq = 0;
    if (G > 1) {
        int n_gt = 0, n_eq = 0;
        for (int i0 = lo; i0 < hi; i0 += blockDim.x) {
            const int i = i0 + tid;
            const uint32_t k = i < hi ? topw_keys[i - lo] : 0;
            n_gt += __syncthreads_count(i < hi && k > prefix);
            n_eq += __syncthreads_count(i < hi && k == prefix);
        }
        if (tid == 0) ts[260 + 2 * b] = (unsigned)n_gt, ts[261 + 2 * b] = (unsigned)n_eq;
        if (!meet(false, 0, 0, 0)) return;
        if (tid == 0) {
            int bs = 0, be = 0;
            for (int b2 = 0; b2 < b; b2++) {
                const int g2 = (int)*(volatile unsigned *)&ts[260 + 2 * b2], e2 = (int)*(volatile unsigned *)&ts[261 + 2 * b2];
                const int room = need - be;
                bs += g2 + (room <= 0 ? 0 : room < e2 ? room : e2);
                be += e2;
            }
            s_base[0] = bs, s_base[1] = be;
        }
        __syncthreads();
        base_sel = s_base[0], base_eq = s_base[1];
    }
    topk_compact<U>(nullptr, topw_keys, lo, hi, prefix, need, base_sel, base_eq, out, topk, wsum);
    if (b == 0 && tid == 0) n_sel[t] = topk;
}

/* ---- the host launchers (dev/idx_bench.cu includes the kernels above, from IDX_ROWS on) */

/* The wide top-k with WU keys per thread and round, if its blocks fit on
 * the GPU at once (they wait for each other; a GPU shared through MPS or a
 * MIG slice may have few SMs); false: nothing launched. */
template <int WU>
static bool launch_topk_wide(cu_ctx *c, const ds4_indexer_args *a, int nt, int t0, int gw, size_t wsm, int64_t ld,
                             int K) {
    /* the limit is a maximum: always the largest, so that no launch lowers
     * it below what a captured graph's launch uses (per device: set on
     * every call, as the other kernels do) */
    cudaFuncSetAttribute(k_idx_topk_wide<WU>, cudaFuncAttributeMaxDynamicSharedMemorySize, TOPW_MAX_SMEM);
    cudaFuncSetAttribute(k_idx_topk_wide<WU>, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_idx_topk_wide<WU>, TOPW_THREADS, wsm) != cudaSuccess) {
        cudaGetLastError();
        per_sm = 0;
    }
    if ((int64_t)per_sm * c->n_sm < (int64_t)gw * nt) return false;
    cu_launch(c, k_idx_topk_wide<WU>, dim3(gw, nt), TOPW_THREADS, wsm, (const float *)c->s.scores, ld, K, t0, a->sel,
              a->n_sel, c->s.topw, c->dstatus, a->step);
    return true;
}

/* The top-k of tokens t0..t0+nt-1: few tokens at long context over several
 * blocks each (k_idx_topk_wide), else one block per token. U: keys per
 * thread and round, 1, 8 (loads in flight), or 0: by the rows (the one-block
 * kernel decides per token on the device; the wide kernel, whose blocks
 * hold a few thousand rows each, takes 8). max_rows: the largest row count
 * of these tokens, or the capacity when capturing. */
template <int U>
static void launch_topk(cu_ctx *c, const ds4_indexer_args *a, int nt, int t0, int max_rows, int64_t ld, int K) {
    const int gw = cu_div_up(max_rows, TOPW_CHUNK) < TOPW_MAX_BLOCKS / TOPW_MAX_TOKENS ? cu_div_up(max_rows, TOPW_CHUNK)
                                                                                       : TOPW_MAX_BLOCKS / TOPW_MAX_TOKENS;
    const size_t wsm = (size_t)(cu_div_up(max_rows, gw) > TOPW_CHUNK ? cu_div_up(max_rows, gw) : TOPW_CHUNK) * 4;
    const bool wide = !c->no_topk_wide && nt <= TOPW_MAX_TOKENS && gw > 1 && wsm <= TOPW_MAX_SMEM;
    if (wide && launch_topk_wide<U == 1 ? 1 : 8>(c, a, nt, t0, gw, wsm, ld, K)) return;
    cu_launch(c, k_idx_topk<U>, nt, 1024, 0, (const float *)c->s.scores, ld, K, t0, a->sel, a->n_sel, a->step);
}

int cu_indexer_select(void *ctx, const ds4_indexer_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    cu_indexer_q(c, a);
    return cu_indexer_scores(c, a);
}

/* whether the FP4 scores run on int8 tensor cores (k_idx_q then writes the codes) */
static bool idx_mma(const cu_ctx *c, const ds4_indexer_args *a) {
    const ds4_hparams *hp = &a->m->hp;
    const int IH = hp->idx_heads, ID = hp->idx_dim;
    return !c->no_idx_mma && a->num.fp4_indexer && IH <= 64 && ID <= 128 && ID % 32 == 0;
}

int cu_indexer_q(cu_ctx *c, const ds4_indexer_args *a) {
    if (c->err) return c->err;
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int n = a->n, IH = hp->idx_heads, ID = hp->idx_dim, K = hp->idx_topk;
    /* projections, skipped on the device while no token has > top_k rows */
    cu_mv_pair(c, &l->idx_q_b, c->s.qi, (int64_t)IH * ID, nullptr, nullptr, 0, a->cq, hp->q_lora, n, a->num.act_quant,
               &c->s.a1, a->step, K);
    cu_mv_pair(c, &l->idx_proj, c->s.wt, IH, nullptr, nullptr, 0, a->u, hp->n_embd, n, a->num.act_quant, &c->s.a2,
               a->step, K);
    /* FP4 numerics on int8 tensor cores: k_idx_q writes the codes */
    const bool mma = idx_mma(c, a);
    dim3 gq(IH, n);
    cu_launch(c, k_idx_q, gq, 128, (size_t)2 * ID * sizeof(float), c->s.qi, IH, ID, hp->n_rot, a->rope->inv_freq,
                                                                 a->num.fp4_indexer, K, n, mma ? c->s.qc : nullptr,
              mma ? c->s.qp : nullptr, a->step,
              (int)(c->rownorm_reg && ID == 128 && hp->n_rot % 2 == 0 && hp->n_rot <= ID));
    CU_LAUNCH(c, "indexer_q");
    return c->err;
}

int cu_indexer_scores(cu_ctx *c, const ds4_indexer_args *a) {
    if (c->err) return c->err;
    const ds4_hparams *hp = &a->m->hp;
    const int n = a->n, IH = hp->idx_heads, ID = hp->idx_dim, K = hp->idx_topk;
    const bool mma = idx_mma(c, a);
    const float sm_scale = 1.0f / sqrtf((float)ID), w_scale = 1.0f / sqrtf((float)IH);
    const int64_t ld = (int64_t)(c->s.n_ctx / 4 + 1);
    /* The grid covers the rows visible to the batch's last token. A step
     * being captured (decode, replayed later at other positions) covers
     * the session capacity instead; eager steps may size it from the host
     * position. */
    const int max_rows = c->capturing ? (int)(c->s.n_ctx / 4 + 1) : (a->pos0 + n) / 4 + 1;
    const size_t qsm = ((size_t)IH * ID + 16 + (size_t)IDX_ROWS * (IH + 1)) * sizeof(float);
    if (IH > IDX_MAX_HEADS || ID % 32) {
        cu_fail(c, DS4_E_INTERNAL, "cuda: indexer of %d heads x %d dims (at most %d heads, dims a multiple of 32)", IH, ID,
                IDX_MAX_HEADS);
        return c->err;
    }
    const bool tile = !c->no_idx_tile && IH == 64 && ID <= 128 && ID % 16 == 0;
    size_t tsm = (size_t)ID * 64 * sizeof(float) + (size_t)ID * IDXT_ROWS * (a->row_type == DS4_TYPE_F16 ? 2 : 4);
    if (tsm < (size_t)IDXT_ROWS * 65 * sizeof(float)) tsm = (size_t)IDXT_ROWS * 65 * sizeof(float);
    for (int t0 = 0; t0 < n; t0 += c->s.score_rows) {
        const int nt = n - t0 < c->s.score_rows ? n - t0 : c->s.score_rows;
        dim3 gs(cu_div_up(max_rows, IDX_ROWS), nt);
        if (mma) {
            /* tokens per block: one while the grid is small (decode, verify,
             * short contexts), else IDXM_TOK so each row's codes serve 8;
             * a captured step (grid from the capacity) decides on the device
             * (tpb 0) from the rows of each replay */
            const int tpb = c->capturing ? (nt == 1 ? 1 : 0) : (int64_t)cu_div_up(max_rows, IDXM_KEYS) * nt <= 1024 ? 1 : IDXM_TOK;
            dim3 gm(cu_div_up(max_rows, IDXM_KEYS), tpb ? cu_div_up(nt, tpb) : nt);
            const size_t msm = idxm_smem(ID);
            /* PP 2 (DS4_CUDA_IDX_PP, the default): two (row, block) pairs'
             * loads per thread in flight, the first token's query staged
             * with them, the head sums from registers; the same bits
             * (H100, q2:20 at 1M: the prefill chunk's indexer stage -2.3%,
             * decode unchanged) */
            const bool pp2 = c->idx_pp != 1;
            if (a->row_type == DS4_TYPE_F16) {
                auto k = pp2 ? k_idx_scores_mma<__half, 2> : k_idx_scores_mma<__half, 1>;
                cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)msm);
                cu_launch(c, k, gm, 256, msm, (const int8_t *)c->s.qc, (const float *)c->s.qp, (const float *)c->s.wt,
                          (const __half *)a->idx_rows, IH, ID, K, t0, nt, tpb, sm_scale, w_scale, c->s.scores, ld,
                          a->step);
            } else {
                auto k = pp2 ? k_idx_scores_mma<float, 2> : k_idx_scores_mma<float, 1>;
                cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)msm);
                cu_launch(c, k, gm, 256, msm, (const int8_t *)c->s.qc, (const float *)c->s.qp, (const float *)c->s.wt,
                          (const float *)a->idx_rows, IH, ID, K, t0, nt, tpb, sm_scale, w_scale, c->s.scores, ld,
                          a->step);
            }
        } else if (tile) {
            dim3 gt(cu_div_up(max_rows, IDXT_ROWS), nt);
            if (a->row_type == DS4_TYPE_F16) {
                cudaFuncSetAttribute(k_idx_scores_t<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tsm);
                cu_launch(c, k_idx_scores_t<__half>, gt, 256, tsm, c->s.qi, c->s.wt, (const __half *)a->idx_rows, ID, K,
                          t0, sm_scale, w_scale, c->s.scores, ld, a->step);
            } else {
                cudaFuncSetAttribute(k_idx_scores_t<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tsm);
                cu_launch(c, k_idx_scores_t<float>, gt, 256, tsm, c->s.qi, c->s.wt, (const float *)a->idx_rows, ID, K,
                          t0, sm_scale, w_scale, c->s.scores, ld, a->step);
            }
        } else if (a->row_type == DS4_TYPE_F16) {
            cudaFuncSetAttribute(k_idx_scores<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)qsm);
            cu_launch(c, k_idx_scores<__half>, gs, IDX_ROWS * 4, qsm, c->s.qi, c->s.wt, (const __half *)a->idx_rows, IH, ID, K, t0,
                                                         sm_scale, w_scale, c->s.scores, ld, a->step);
        } else {
            cudaFuncSetAttribute(k_idx_scores<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)qsm);
            cu_launch(c, k_idx_scores<float>, gs, IDX_ROWS * 4, qsm, c->s.qi, c->s.wt, (const float *)a->idx_rows, IH, ID, K, t0,
                                                        sm_scale, w_scale, c->s.scores, ld, a->step);
        }
        CU_LAUNCH(c, "indexer_scores");
        /* 8 keys per thread and round past TOPK_ILP_ROWS rows (H200
         * 2026-12-05, dev/idx_bench.cu: one block 0.94 -> 0.31 ms at 262,144
         * rows, 0.021 -> 0.013 at 4,100; 32 blocks 0.052 -> 0.038; but
         * 0.008 -> 0.013 at 600 rows, its block scans' fixed cost), or as
         * DS4_CUDA_TOPK_ILP says (1 always, 0 never, 2 by each token's own
         * rows on the device: a captured step's max_rows is the capacity,
         * so by default its one-block launches take 8 from 4,097 rows of
         * capacity on; opt-in until run); the same selection */
        if (c->topk_ilp == 2) launch_topk<0>(c, a, nt, t0, max_rows, ld, K); /* decided on the device (opt-in) */
        else if (c->topk_ilp == 1 || (c->topk_ilp < 0 && max_rows > TOPK_ILP_ROWS)) launch_topk<8>(c, a, nt, t0, max_rows, ld, K);
        else launch_topk<1>(c, a, nt, t0, max_rows, ld, K);
        CU_LAUNCH(c, "indexer_topk");
    }
    return c->err;
}

CU_TU_SWITCHES(cu_sw_compress)
