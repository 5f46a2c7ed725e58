/* ops_moe.cu - CUDA stages of the FFN (MODEL.md C.8): the router (hash
 * table or biased top-k, sqrt-softplus weights) and the routed + shared
 * experts.
 *
 * Routed experts run expert-major for every batch size: a single-block
 * kernel groups the (token, slot) items by expert (stable: increasing item
 * index inside an expert, as the CPU), listing the active experts; then
 * gate+up (with SwiGLU, clamp and route weight) and down run one block
 * column per active expert, each weight row read once per tile of up to 8
 * items of that expert; outputs land per item and a final kernel sums the
 * slots in order and adds the shared expert (cpu_moe_experts' order). No
 * float atomics anywhere: results do not depend on scheduling.
 */
#include "cuda/cuda.cuh"
#include "cuda/rowops.cuh"
#include "cuda/mma.cuh"

#define MOE_MAX_E 256
#define MOE_MAX_K 16 /* one-token grouping inside the router kernel */

/* ---------------------------------------------------------------- router */

__device__ __forceinline__ float cu_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* The router's arguments (k_route, k_route1) */
struct route_p {
    const float *logits;     /* (n, E) */
    int n, E, K;
    const int32_t *tokens, *tid2eid;
    const float *bias;
    bool hash, norm;
    float scale;
    int32_t *ids;
    float *wts;
    int32_t *items, *off, *act; /* one token: its grouping (NULL: none) */
    /* k_route1: the router weights and input, the logits' counter */
    cu_w w;
    const float *x;
    int wpr;
    unsigned *cnt;
    cu_comb_job cj;          /* k_route: the FFN HC-pre's comb, if left for later (one block past the tokens') */
    bool reg;                /* DS4_CUDA_ROUTE_REG=1: the chosen ids kept in registers for the tail */
    bool lanes;              /* route_token: loads at once, one token's top-k tail on K lanes (DS4_CUDA_ROUTE_LANES=0: not) */
    bool trig;               /* k_route: let the next kernel launch at once (DS4_CUDA_TAIL_TRIGGER) */
};

/* Item `slot` of one token's top-k (expert e, score v; sum: the K scores
 * summed in slot order) at position pos of the grouping: its weight as
 * route_token's lane-0 loop forms it, and k_moe_group's entries */
__device__ __forceinline__ void route_item(const route_p &p, int t, int slot, int e, float v, float sum, int pos) {
    const float g = p.norm ? v / (sum + 1e-20f) : v;
    p.wts[(int64_t)t * p.K + slot] = g * p.scale;
    p.items[pos] = slot;
    p.act[pos] = e;
    p.off[e] = pos;
    p.off[e + 1] = pos + 1; /* (the start of e + 1 when it is chosen too: the same value) */
}

/* Token t's routing by one warp (all lanes calling). s: E floats of shared
 * memory. Lane l holds the biased scores of experts l, l+32, ... in
 * registers (E <= MOE_MAX_E) and a bit per taken one; each of the K rounds
 * takes the largest, the lowest expert id on ties (in a lane: ascending scan
 * with a strict compare; across lanes: the tie rule in the butterfly), as
 * cpu_ops.c's top-k. The logits are read from L2 (k_route1 reads those
 * other blocks of its launch wrote). */
__device__ __forceinline__ void route_token(const route_p &p, int t, float *s) {
    const int lane = threadIdx.x & 31, E = p.E, K = p.K;
    constexpr int PER = MOE_MAX_E / 32;
    float bvv[PER];
    if (p.lanes) {
        /* DS4_CUDA_ROUTE_LANES=1: every logit and bias load first (one round
         * trip instead of one per expert: the loop below branches, so its
         * loads are not hoisted); the same values */
        float lg[PER], bi[PER];
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const int e = lane + 32 * k;
            lg[k] = e < E ? __ldcg(p.logits + (int64_t)t * E + e) : 0.0f;
            bi[k] = e < E && !p.hash ? p.bias[e] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const int e = lane + 32 * k;
            if (e < E) {
                const float v = sqrtf(cu_softplus(lg[k]));
                s[e] = v;
                if (!p.hash) bvv[k] = __fadd_rn(v, bi[k]);
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const int e = lane + 32 * k;
            if (e < E) {
                const float v = sqrtf(cu_softplus(__ldcg(p.logits + (int64_t)t * E + e)));
                s[e] = v;
                if (!p.hash) bvv[k] = __fadd_rn(v, p.bias[e]);
            }
        }
    }
    __syncwarp();
    int32_t *id = p.ids + (int64_t)t * K;
    /* the chosen ids also in every lane's registers (K <= MOE_MAX_K), so the
     * weights and the grouping below need no read back of id[] from global
     * memory (a round trip to L2 per item; DS4_CUDA_ROUTE_REG=1, opt-in until
     * measured: the same values) */
    const bool reg = p.reg && K <= MOE_MAX_K;
    int sel[MOE_MAX_K];
#pragma unroll
    for (int k = 0; k < MOE_MAX_K; k++) sel[k] = 0;
    if (p.hash) {
        const int my = lane < K ? p.tid2eid[(int64_t)p.tokens[t] * K + lane] : 0;
        if (lane < K) id[lane] = my;
        if (reg)
#pragma unroll
            for (int k = 0; k < MOE_MAX_K; k++) sel[k] = __shfl_sync(0xffffffffu, my, k);
    } else {
        unsigned taken = 0; /* bit k: expert lane + 32k */
        for (int i = 0; i < K; i++) {
            float bv = 0.0f;
            int be = -1;
#pragma unroll
            for (int k = 0; k < PER; k++) {
                const int e = lane + 32 * k;
                if (e < E && !(taken >> k & 1u) && (be < 0 || bvv[k] > bv)) {
                    be = e;
                    bv = bvv[k];
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                int oe = __shfl_xor_sync(0xffffffffu, be, o);
                if (oe >= 0 && (be < 0 || ov > bv || (ov == bv && oe < be))) {
                    bv = ov;
                    be = oe;
                }
            }
            if ((be & 31) == lane) taken |= 1u << (be >> 5);
            if (lane == 0) id[i] = be;
            if (reg)
#pragma unroll
                for (int k = 0; k < MOE_MAX_K; k++)
                    if (k == i) sel[k] = be; /* (lane 0's copy is the one used: its own id[i]) */
        }
    }
    __syncwarp();
    if (p.lanes && reg && !p.hash && p.items) {
        /* DS4_CUDA_ROUTE_LANES=1, one token's top-k (distinct experts, every
         * lane holding the K ids): lane i < K forms item i's weight and its place among the
         * chosen experts in id order (the stable sort's). The sum in slot
         * order in every lane: the values of lane 0's loops below */
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < MOE_MAX_K; i++)
            if (i < K) sum += s[sel[i]];
        int e = sel[0];
#pragma unroll
        for (int k = 1; k < MOE_MAX_K; k++)
            if (k == lane) e = sel[k];
        if (lane < K) {
            int pos = 0;
#pragma unroll
            for (int j = 0; j < MOE_MAX_K; j++) pos += j < K && sel[j] < e;
            route_item(p, t, lane, e, s[e], sum, pos);
        }
        if (lane == 0) p.act[E] = K;
        return;
    }
    if (lane == 0) {
        float sum = 0.0f;
        if (reg) {
#pragma unroll
            for (int i = 0; i < MOE_MAX_K; i++)
                if (i < K) sum += s[sel[i]];
#pragma unroll
            for (int i = 0; i < MOE_MAX_K; i++) {
                if (i < K) {
                    float g = p.norm ? s[sel[i]] / (sum + 1e-20f) : s[sel[i]];
                    p.wts[(int64_t)t * K + i] = g * p.scale;
                }
            }
        } else {
            for (int i = 0; i < K; i++) sum += s[id[i]];
            for (int i = 0; i < K; i++) {
                float g = p.norm ? s[id[i]] / (sum + 1e-20f) : s[id[i]];
                p.wts[(int64_t)t * K + i] = g * p.scale;
            }
        }
        if (p.items) { /* one token (K <= MOE_MAX_K): k_moe_group's output, by a stable insertion sort of the K items */
            int es[MOE_MAX_K], is[MOE_MAX_K];
            for (int i = 0; i < K; i++) {
                int e;
                if (reg) { /* sel[i] with i a register index: a select chain, no local memory */
                    e = sel[0];
#pragma unroll
                    for (int k = 1; k < MOE_MAX_K; k++)
                        if (k == i) e = sel[k];
                } else {
                    e = id[i];
                }
                int j = i;
                for (; j > 0 && es[j - 1] > e; j--) {
                    es[j] = es[j - 1];
                    is[j] = is[j - 1];
                }
                es[j] = e;
                is[j] = i;
            }
            int na = 0;
            for (int j = 0; j < K; j++) {
                p.items[j] = is[j];
                if (j == 0 || es[j] != es[j - 1]) {
                    p.act[na++] = es[j];
                    p.off[es[j]] = j;
                }
                p.off[es[j] + 1] = j + 1; /* the end of es[j]: also the start of es[j] + 1 when that one is active */
            }
            p.act[E] = na;
        }
    }
}

/* One warp per token (8 per block). Shared: 8 x E scores. */
__global__ void __launch_bounds__(256) k_route(const __grid_constant__ route_p p) {
    /* DS4_CUDA_TAIL_TRIGGER=1: the experts' blocks placed now (a block or
     * two here), prefetching the shared expert's rows while this routes */
    if (p.trig) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    cu_pdl_wait();
    extern __shared__ float sm[];
    if (p.cj.n && blockIdx.x == gridDim.x - 1) { /* DS4_CUDA_COMB_HOST=1: warp t, token t's comb (n <= 8) */
        hc_comb_run(p.cj, threadIdx.x >> 5);
        return;
    }
    const int w = threadIdx.x >> 5, t = blockIdx.x * 8 + w;
    if (t >= p.n) return;
    route_token(p, t, sm + w * p.E);
}

/* One token's router in one launch (DS4_CUDA_ROUTE_FUSE=1, opt-in): warp w
 * of block b computes logit 8b + w with the matvec's operations (the row
 * split into wpr chunk sets, cu_mv_wpr of the weight's shape, warp sums
 * added in j order: k_matvec's values), and the last block to finish (a
 * counter that wraps back to 0) routes the token (route_token). */
template <int WT>
__global__ void __launch_bounds__(256) k_route1(const __grid_constant__ route_p p) {
    cu_pdl_wait();
    __shared__ float sm[MOE_MAX_E];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, r = blockIdx.x * 8 + (threadIdx.x >> 5), nch = p.w.n_in / 32;
    if (r < p.E) {
        const uint8_t *q = p.w.q + (size_t)r * p.w.q_row, *sc = p.w.s ? p.w.s + (size_t)r * p.w.s_row : nullptr;
        const int64_t xo[1] = {0};
        float v[1];
        cu_row_split<WT, false, 1>(q, sc, nch, 1, p.wpr, p.x, nullptr, nullptr, nullptr, xo, v, nullptr);
        if (lane == 0) ((float *)p.logits)[r] = v[0];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicInc(p.cnt, gridDim.x - 1) == gridDim.x - 1;
    __syncthreads();
    if (!last || threadIdx.x >= 32) return;
    __threadfence();
    route_token(p, 0, sm);
}

/* the fused few-token experts take at most this many tokens (moe1_try) */
#define MOE1_MAX_N 4

int cu_moe_route(void *ctx, const ds4_moe_route_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int E = hp->n_expert, K = hp->n_expert_used;
    /* one token: the router kernel also groups the K items by expert (the
     * moe_group launch of moe_experts is then skipped) */
    const bool group = a->n == 1 && K <= MOE_MAX_K && !c->no_route_group;
    route_p p;
    memset(&p, 0, sizeof p);
    p.logits = c->s.rl;
    p.n = a->n;
    p.E = E;
    p.K = K;
    p.tokens = a->tokens;
    p.tid2eid = l->tid2eid;
    p.bias = l->exp_bias;
    p.hash = l->hash;
    p.norm = hp->expert_weights_norm;
    p.scale = hp->expert_weights_scale;
    p.ids = a->ids;
    p.wts = a->w;
    p.items = group ? c->s.items : nullptr;
    p.off = group ? c->s.off : nullptr;
    p.act = group ? c->s.act : nullptr;
    p.reg = c->route_reg;
    p.lanes = c->route_lanes;
    const int wt = l->gate_inp.type;
    if (c->route_fuse && a->n == 1 && E <= MOE_MAX_E && l->gate_inp.n_in % 32 == 0 &&
        (wt == DS4_TYPE_F16 || wt == DS4_TYPE_BF16 || wt == DS4_TYPE_F32)) {
        cu_comb_flush(c); /* k_route1 hosts no comb */
        p.w = cu_weight_view(&l->gate_inp);
        p.x = a->v;
        p.wpr = cu_mv_wpr(E, (int)l->gate_inp.n_in / 32);
        p.cnt = c->s.rcc;
        const int nb = cu_div_up(E, 8);
        if (wt == DS4_TYPE_F16) cu_launch(c, k_route1<DS4_TYPE_F16>, nb, 256, 0, p);
        else if (wt == DS4_TYPE_BF16) cu_launch(c, k_route1<DS4_TYPE_BF16>, nb, 256, 0, p);
        else cu_launch(c, k_route1<DS4_TYPE_F32>, nb, 256, 0, p);
    } else {
        cu_mv_pair(c, &l->gate_inp, c->s.rl, E, nullptr, nullptr, 0, a->v, hp->n_embd, a->n, false, &c->s.a1, a->step,
                   0);
        /* the FFN's HC-pre comb, if left for later: one more block; with
         * DS4_CUDA_COMB_BIG=1 and at most MOE1_MAX_N tokens it stays pending
         * for the fused experts' gate/up launch (moe1_try) */
        if (!(c->comb_big && a->n <= MOE1_MAX_N && !c->no_moe_fuse)) p.cj = cu_comb_take(c);
        p.trig = c->tail_trig && !c->no_pdl && !c->early_trigger && a->n <= MOE1_MAX_N; /* (the fused experts prefetch) */
        cu_launch(c, k_route, cu_div_up(a->n, 8) + (p.cj.n ? 1 : 0), 256, (size_t)8 * E * sizeof(float), p);
        if (p.trig && !c->err) c->pf_next = 1; /* (after cu_launch, which clears it) */
    }
    c->moe_grouped = group ? a->ids : nullptr;
    CU_LAUNCH(c, "route");
    return c->err;
}

/* ---------------------------------------------------------------- grouping */

/* Groups the n*K items by expert (single block of 1024 threads):
 * off[e]..off[e+1] are expert e's positions in items[] (increasing item
 * index), act[0..n_act) the experts with items (ascending), act[E] = n_act.
 * Shared: E counters, E running offsets, 32 x E per-warp counts. */
__global__ void __launch_bounds__(1024) k_moe_group(const int32_t *ids, int NI, int E, int32_t *items, int32_t *off,
                                                   int32_t *act) {
    cu_pdl_wait();
    extern __shared__ int smi[];
    int *cnt = smi, *run = smi + E, *wc = smi + 2 * E;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < NI; i += blockDim.x) atomicAdd(&cnt[ids[i]], 1);
    __syncthreads();
    { /* exclusive prefix sums of the counts and of the active flags:
       * warp scans, then a scan of the warp totals (E <= blockDim) */
        __shared__ int wtot[2][32];
        const int e = threadIdx.x;
        const int c0 = e < E ? cnt[e] : 0, a0 = c0 > 0;
        int c = c0, a = a0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int cu = __shfl_up_sync(0xffffffffu, c, o), au = __shfl_up_sync(0xffffffffu, a, o);
            if (lane >= o) c += cu, a += au;
        }
        if (lane == 31) wtot[0][w] = c, wtot[1][w] = a;
        __syncthreads();
        if (w == 0) {
            const int nw = blockDim.x >> 5;
            int tc = lane < nw ? wtot[0][lane] : 0, ta = lane < nw ? wtot[1][lane] : 0;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int cu = __shfl_up_sync(0xffffffffu, tc, o), au = __shfl_up_sync(0xffffffffu, ta, o);
                if (lane >= o) tc += cu, ta += au;
            }
            if (lane < nw) wtot[0][lane] = tc, wtot[1][lane] = ta; /* inclusive */
        }
        __syncthreads();
        const int cb = (w ? wtot[0][w - 1] : 0) + c - c0, ab = (w ? wtot[1][w - 1] : 0) + a - a0;
        if (e < E) {
            off[e] = cb;
            run[e] = cb;
            if (a0) act[ab] = e;
        }
        if (e == E - 1) {
            off[E] = cb + c0;
            act[E] = ab + a0;
        }
        __syncthreads();
    }
    const unsigned lt = (1u << lane) - 1;
    for (int i0 = 0; i0 < NI; i0 += blockDim.x) {
        const int i = i0 + threadIdx.x;
        const int e = i < NI ? ids[i] : -1;
        for (int k = threadIdx.x; k < 32 * E; k += blockDim.x) wc[k] = 0;
        __syncthreads();
        const unsigned same = __match_any_sync(0xffffffffu, e);
        if (e >= 0 && lane == __ffs(same) - 1) wc[w * E + e] = __popc(same);
        __syncthreads();
        if (e >= 0) {
            int pos = run[e] + __popc(same & lt);
            for (int k = 0; k < w; k++) pos += wc[k * E + e];
            items[pos] = i;
        }
        __syncthreads();
        for (int e2 = threadIdx.x; e2 < E; e2 += blockDim.x) {
            int s = 0;
            for (int k = 0; k < 32; k++) s += wc[k * E + e2];
            run[e2] += s;
        }
        __syncthreads();
    }
}

/* ---------------------------------------------------------------- experts */

struct moe_p {
    cu_w wa, wb;             /* gate and up (gate/up kernel) or down (wa) */
    int64_t mat_rows;        /* rows per expert matrix */
    int rows;                /* rows computed (F for gate/up, D for down) */
    int nch;                 /* chunks per row */
    int K;
    const int32_t *items, *off, *act;
    int E;
    const float *wts;        /* (n*K) route weights by item */
    const float *x;          /* f32 activations */
    const int8_t *aq;
    const float *ad;
    const int32_t *abs;
    int64_t ld;              /* activation row length */
    float *out;              /* gate/up: (NI, F) by position; down: (NI, D) by item */
    float lim;
    const uint64_t *grid;
    const uint8_t *ksigns;
};

/* The prologue of the expert kernels, called by every thread: the IQ2
 * tables into shared memory, then this warp's active expert e =
 * act[blockIdx.y] and row r = blockIdx.x*8 + warp; returns the row's index
 * in the expert stack, or -1 when the block or warp has nothing to do. */
template <int WT>
__device__ __forceinline__ int64_t moe_row(const moe_p &p, cu_iq2_tab *tab, int *e, int *r) {
    if constexpr (WT == DS4_TYPE_IQ2_XXS) {
        cu_iq2_tab_load(tab, p.grid, p.ksigns);
        __syncthreads();
    }
    if ((int)blockIdx.y >= p.act[p.E]) return -1;
    *e = p.act[blockIdx.y];
    *r = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (*r >= p.rows) return -1;
    return (int64_t)*e * p.mat_rows + *r;
}

/* silu(min(g, lim)) * clamp(u, -lim, lim) * route weight: one function for
 * the CUDA-core and tensor-core expert kernels (same bits) */
__device__ __forceinline__ float moe_act(float g, float u, float lim, float w) {
    const float gv = g < lim ? g : lim;
    const float uv = u < -lim ? -lim : (u > lim ? lim : u);
    const float si = gv / (1.0f + expf(-gv));
    return __fmul_rn(__fmul_rn(si, uv), w);
}

/* Gate + up + SwiGLU for active expert act[blockIdx.y], rows
 * blockIdx.x*8 + warp, its items in tiles of NT. */
template <int WT, bool AQ, int NT>
__global__ void __launch_bounds__(256) k_moe_gate_up(const __grid_constant__ moe_p p) {
    cu_pdl_wait();
    __shared__ cu_iq2_tab tab;
    int e, r;
    const int64_t row = moe_row<WT>(p, &tab, &e, &r);
    if (row < 0) return;
    const int lane = threadIdx.x & 31;
    const uint8_t *qa = p.wa.q + (size_t)row * p.wa.q_row, *sa = p.wa.s ? p.wa.s + (size_t)row * p.wa.s_row : nullptr;
    const uint8_t *qb = p.wb.q + (size_t)row * p.wb.q_row, *sb = p.wb.s ? p.wb.s + (size_t)row * p.wb.s_row : nullptr;
    const int b = p.off[e], ne = p.off[e + 1] - b;
    for (int i0 = 0; i0 < ne; i0 += NT) {
        const int nt = ne - i0 < NT ? ne - i0 : NT;
        float ga[NT], ua[NT];
        int64_t xo[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) {
            ga[t] = ua[t] = 0.0f;
            xo[t] = t < nt ? (int64_t)(p.items[b + i0 + t] / p.K) * p.ld : 0;
        }
        cu_row_dot<WT, AQ, NT>(qa, sa, p.nch, nt, p.x, p.aq, p.ad, p.abs, xo, ga, &tab);
        cu_row_dot<WT, AQ, NT>(qb, sb, p.nch, nt, p.x, p.aq, p.ad, p.abs, xo, ua, &tab);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float g = cu_warp_sum(ga[t]), u = cu_warp_sum(ua[t]);
            if (lane == 0 && t < nt) {
                const int pos = b + i0 + t;
                p.out[(int64_t)pos * p.rows + r] = moe_act(g, u, p.lim, p.wts[p.items[pos]]);
            }
        }
    }
}

/* Down projection for active expert act[blockIdx.y]: rows blockIdx.x*8 +
 * warp; the inputs are the expert-major hidden rows; outputs by item. */
template <int WT, bool AQ, int NT>
__global__ void __launch_bounds__(256) k_moe_down(const __grid_constant__ moe_p p) {
    cu_pdl_wait();
    __shared__ cu_iq2_tab tab;
    int e, r;
    const int64_t row = moe_row<WT>(p, &tab, &e, &r);
    if (row < 0) return;
    const int lane = threadIdx.x & 31;
    const uint8_t *qa = p.wa.q + (size_t)row * p.wa.q_row, *sa = p.wa.s ? p.wa.s + (size_t)row * p.wa.s_row : nullptr;
    const int b = p.off[e], ne = p.off[e + 1] - b;
    for (int i0 = 0; i0 < ne; i0 += NT) {
        const int nt = ne - i0 < NT ? ne - i0 : NT;
        float acc[NT];
        int64_t xo[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) {
            acc[t] = 0.0f;
            xo[t] = (int64_t)(b + i0 + t) * p.ld;
        }
        cu_row_dot<WT, AQ, NT>(qa, sa, p.nch, nt, p.x, p.aq, p.ad, p.abs, xo, acc, &tab);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float v = cu_warp_sum(acc[t]);
            if (lane == 0 && t < nt) p.out[(int64_t)p.items[b + i0 + t] * p.rows + r] = v;
        }
    }
}

/* ---------------------------------------------------------------- tensor-core experts */

/* Routed experts for batches on the int8 mma (m16n8k32, one 32-value chunk
 * per mma, each chunk's integer dot exact): IQ2_XXS gate + up and Q2_K
 * down against Q8_K activations. One super-block (256 values) of the
 * weights is decoded to int8 in shared memory per stage:
 *  - IQ2_XXS: the grid values with their signs; the chunk scale
 *    2*(aux>>28)+1 multiplies each chunk's dot (integers);
 *  - Q2_K: "matrix" 0 holds q * (scale & 15) (at most 45, an int8), so its
 *    dot is quant.c's isum; "matrix" 1 holds the 16-value group's min
 *    (scale >> 4) on each of its values, so its dot is sum(min * bsum), the
 *    msum (bsums are the sums of the Q8_K codes).
 * The float work keeps cu_row_dot's operations (K-quants, one warp per
 * row): chunk c sits on lane c % 32, so super-block sb is added as
 * cu_kblock by lane 8 * (sb % 4), in sb order, and the warp sum of those
 * four lanes is (A0 + A2) + (A1 + A3). Block tile 64 rows x 32 items of one
 * expert, 8 warps of 16 rows x 16 items; super-block s + 1 is loaded
 * (weights to registers, activations by cp.async) while s is multiplied. */
#define MG_BM 64
#define MG_BN 32
/* A chunk's rows are padded by 16 bytes: the 8 lanes of a quarter warp
 * that store one row's 8 chunk decodes (raw_store) then hit 8 different
 * 16-byte bank groups (without it all 8 hit one: 8-way conflicts on every
 * decode store); the fragment reads of one chunk are shifted alike. */
#define MG_ACH (MG_BM * 32 + 16)
struct mg_smem {
    int8_t a[2][2][8][MG_ACH];      /* [buf][matrix][chunk][row x 32, padded] */
    int8_t b[2][8][MG_BN * 32];     /* [buf][chunk][item x 32] */
    int32_t ls[2][2][MG_BM][8];     /* IQ2_XXS chunk scales */
    float d[2][2][MG_BM];           /* IQ2_XXS: gate, up d; Q2_K: d, dmin */
    float ad[2][MG_BN];             /* activation super-block scales */
    int32_t arow[MG_BN];            /* activation row of each item of the tile */
    cu_iq2_tab tab;
};

/* raw bytes of this thread's 4 chunk decodes of a stage */
struct mg_raw {
    uint32_t w[4][8]; /* IQ2_XXS: w[u][0..1]; Q2_K (matrix 0): the 32 bytes of 2-bit codes */
    uint32_t sc[4];   /* Q2_K: the chunk's two scale bytes */
    uint32_t dd;      /* f16 d (IQ2_XXS) or d | dmin << 16 (Q2_K) */
};

/* CU_MOE_MM_MINB (build option, default 2): blocks per SM the kernel's
 * registers must allow. Unbounded (0) the IQ2_XXS instance holds 240
 * registers and the Q2_K one 177, so one block of 8 warps per SM; 2 bounds
 * them to 128 (296 / 200 B of spills) and two 94 KB blocks fit. The PTX
 * differs only by .minnctapersm, and every float operation of the kernel
 * carries its rounding mode (.rn): the same arithmetic. H100, q2:20, 2,048-
 * token chunk: prefill 4,310 -> 4,421 / 4,413 tok/s (moe_down 3.44 -> 2.98
 * ms, moe_gate_up 3.62 -> 3.50 ms per layer and chunk). */
#ifndef CU_MOE_MM_MINB
#define CU_MOE_MM_MINB 2
#endif
/* LDM (default, DS4_CUDA_MM_LDM=0 for 32-bit loads; as k_mm_q8): the
 * fragments by ldmatrix .x4, the same words in the same registers (same
 * bits by construction). H100, q2:20, a 2,048-token chunk: moe_gate_up
 * 70.1 -> 67.9 ms, moe_down 59.5 -> 58.1 ms. */
template <int WT, bool LDM>
__global__ void __launch_bounds__(256, CU_MOE_MM_MINB) k_moe_mm(const __grid_constant__ moe_p p) {
    constexpr bool DN = WT == DS4_TYPE_Q2_K; /* down projection (else gate + up) */
    extern __shared__ __align__(16) unsigned char mg_sm[];
    mg_smem &sm = *reinterpret_cast<mg_smem *>(mg_sm);
    cu_pdl_wait();
    if constexpr (!DN) cu_iq2_tab_load(&sm.tab, p.grid, p.ksigns);
    if ((int)blockIdx.y >= p.act[p.E]) return;
    const int e = p.act[blockIdx.y], r0 = blockIdx.x * MG_BM;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int wm = warp & 3, wn = warp >> 2, ra = wm * 16 + g;
    const int b0 = p.off[e], ne = p.off[e + 1] - b0, nsb = p.nch / 8, nsbr = p.ld / 256;
    /* decode v = tid + 256u: matrix v >> 9, row (v >> 3) & 63, chunk v & 7 */
    auto wrow = [&](int mt, int rr) -> const uint8_t * {
        const cu_w &w = (DN || mt == 0) ? p.wa : p.wb;
        return w.q + (size_t)((int64_t)e * p.mat_rows + r0 + rr) * w.q_row;
    };
    auto raw_load = [&](int sb, mg_raw &R) {
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int v = tid + 256 * u, mt = v >> 9, rr = (v >> 3) & 63, ch = v & 7;
            if constexpr (DN) {
                const uint8_t *bk = wrow(0, rr) + (size_t)sb * 84;
                const int h = ch >> 2;
                R.sc[u] = cu_ld16(bk + 8 * h + 2 * (ch & 3));
                if (mt == 0) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        R.w[u][i] = cu_ld32(bk + 16 + 32 * h + 4 * i);
                        R.w[u][4 + i] = cu_ld32(bk + 32 + 32 * h + 4 * i);
                    }
                }
            } else {
                const uint2 x = *(const uint2 *)(wrow(mt, rr) + (size_t)sb * 64 + 8 * ch);
                R.w[u][0] = x.x;
                R.w[u][1] = x.y;
            }
        }
        if (tid < 2 * MG_BM) {
            if constexpr (DN) {
                if (tid < MG_BM) R.dd = cu_ld32(wrow(0, tid) + (size_t)sb * 84 + 80);
            } else {
                const cu_w &w = tid < MG_BM ? p.wa : p.wb;
                R.dd = cu_ld16(w.s + (size_t)((int64_t)e * p.mat_rows + r0 + (tid & 63)) * w.s_row + 2 * (size_t)sb);
            }
        }
    };
    auto raw_store = [&](int buf, const mg_raw &R) {
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int v = tid + 256 * u, mt = v >> 9, rr = (v >> 3) & 63, ch = v & 7;
            uint32_t wv[8];
            if constexpr (DN) {
                const uint32_t s0 = R.sc[u] & 0xff, s1 = R.sc[u] >> 8, k2 = 2 * (ch & 3);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    if (mt == 0) { /* codes 0..3 times the 4-bit scale: bytes stay below 46 */
                        wv[i] = ((R.w[u][i] >> k2) & 0x03030303u) * (s0 & 15);
                        wv[4 + i] = ((R.w[u][4 + i] >> k2) & 0x03030303u) * (s1 & 15);
                    } else {
                        wv[i] = (s0 >> 4) * 0x01010101u;
                        wv[4 + i] = (s1 >> 4) * 0x01010101u;
                    }
                }
            } else {
                const uint32_t a0 = R.w[u][0], a1 = R.w[u][1];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    cu_iq2_signed8_i(&sm.tab, (a0 >> (8 * k)) & 0xff, (a1 >> (7 * k)) & 127, &wv[2 * k],
                                   &wv[2 * k + 1]);
                }
                sm.ls[buf][mt][rr][ch] = 2 * (int)(a1 >> 28) + 1;
            }
            int8_t *dst = sm.a[buf][mt][ch];
            *(uint4 *)(dst + mm_off(rr, 0)) = make_uint4(wv[0], wv[1], wv[2], wv[3]);
            *(uint4 *)(dst + mm_off(rr, 4)) = make_uint4(wv[4], wv[5], wv[6], wv[7]);
        }
        if constexpr (DN) {
            if (tid < MG_BM) {
                sm.d[buf][0][tid] = cu_h2f((uint16_t)(R.dd & 0xffff));
                sm.d[buf][1][tid] = cu_h2f((uint16_t)(R.dd >> 16));
            }
        } else if (tid < 2 * MG_BM) {
            sm.d[buf][tid >> 6][tid & 63] = cu_h2f((uint16_t)R.dd);
        }
    };
    auto act_issue = [&](int sb, int buf, int nt) {
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int v = tid + 256 * u, half = v & 1, it = (v >> 1) & 31, ch = v >> 6;
            const bool ok = it < nt;
            const int8_t *src = p.aq + (ok ? (int64_t)sm.arow[it] * p.ld + (int64_t)sb * 256 + ch * 32 + 16 * half : 0);
            mm_cp16(sm.b[buf][ch] + mm_off(it, 4 * half), src, ok);
        }
        if (tid < MG_BN) sm.ad[buf][tid] = tid < nt ? p.ad[(int64_t)sm.arow[tid] * nsbr + sb] : 0.0f;
    };

    for (int i0 = 0; i0 < ne; i0 += MG_BN) {
        const int nt = ne - i0 < MG_BN ? ne - i0 : MG_BN;
        __syncthreads(); /* the previous tile is done with arow and the buffers */
        /* gate + up read the token's input row, down the item's hidden row */
        if (tid < MG_BN) sm.arow[tid] = tid < nt ? (DN ? b0 + i0 + tid : p.items[b0 + i0 + tid] / p.K) : 0;
        __syncthreads();
        mg_raw R;
        raw_load(0, R);
        act_issue(0, 0, nt);
        mm_commit();
        raw_store(0, R);
        constexpr int NO = DN ? 1 : 2; /* outputs: down; gate and up */
        float A[NO][4][2][4];          /* [output][sb % 4][n-subtile][element] */
#pragma unroll
        for (int o = 0; o < NO; o++)
#pragma unroll
            for (int x = 0; x < 4; x++)
#pragma unroll
                for (int a = 0; a < 2; a++)
#pragma unroll
                    for (int el = 0; el < 4; el++) A[o][x][a][el] = 0.0f;
        mm_wait<0>();
        __syncthreads();
        for (int sb4 = 0; sb4 < nsb; sb4 += 4) {
#pragma unroll
            for (int x = 0; x < 4; x++) {
                const int sb = sb4 + x, buf = x & 1;
                const bool more = sb + 1 < nsb;
                if (more) {
                    raw_load(sb + 1, R);
                    act_issue(sb + 1, buf ^ 1, nt);
                }
                mm_commit();
                int is[2][2][4];
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int a = 0; a < 2; a++)
#pragma unroll
                        for (int el = 0; el < 4; el++) is[mt][a][el] = 0;
#pragma unroll
                for (int ch = 0; ch < 8; ch++) {
                    const int8_t *B = sm.b[buf][ch];
                    unsigned bf[2][2];
                    if (LDM) {
                        /* matrix lane >> 3: the second 16 bytes (bit 0), tile a = 1 (bit 1) */
                        unsigned r4[4];
                        mm_ldsm4(r4, B + mm_off(wn * 16 + (lane >> 4) * 8 + (lane & 7), ((lane >> 3) & 1) * 4));
                        bf[0][0] = r4[0], bf[0][1] = r4[1], bf[1][0] = r4[2], bf[1][1] = r4[3];
                    } else {
#pragma unroll
                        for (int a = 0; a < 2; a++) {
                            const int it = wn * 16 + a * 8 + g;
                            bf[a][0] = *(const unsigned *)(B + mm_off(it, tq));
                            bf[a][1] = *(const unsigned *)(B + mm_off(it, tq + 4));
                        }
                    }
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        const int8_t *Am = sm.a[buf][mt][ch];
                        unsigned af[4];
                        if (LDM) {
                            /* matrix lane >> 3: rows +8 (bit 0), the second 16 bytes (bit 1) */
                            mm_ldsm4(af, Am + mm_off(wm * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), (lane >> 4) * 4));
                        } else {
                            af[0] = *(const unsigned *)(Am + mm_off(ra, tq));
                            af[1] = *(const unsigned *)(Am + mm_off(ra + 8, tq));
                            af[2] = *(const unsigned *)(Am + mm_off(ra, tq + 4));
                            af[3] = *(const unsigned *)(Am + mm_off(ra + 8, tq + 4));
                        }
                        const int l0 = DN ? 1 : sm.ls[buf][mt][ra][ch], l1 = DN ? 1 : sm.ls[buf][mt][ra + 8][ch];
#pragma unroll
                        for (int a = 0; a < 2; a++) {
                            int ci[4];
                            mm_mma(af, bf[a][0], bf[a][1], ci);
                            is[mt][a][0] += l0 * ci[0];
                            is[mt][a][1] += l0 * ci[1];
                            is[mt][a][2] += l1 * ci[2];
                            is[mt][a][3] += l1 * ci[3];
                        }
                    }
                }
#pragma unroll
                for (int o = 0; o < NO; o++) {
                    const float d0 = sm.d[buf][o][ra], d1 = sm.d[buf][o][ra + 8];
                    const float m0 = DN ? sm.d[buf][1][ra] : 0.0f, m1 = DN ? sm.d[buf][1][ra + 8] : 0.0f;
#pragma unroll
                    for (int a = 0; a < 2; a++) {
                        const int it = wn * 16 + a * 8 + 2 * tq;
                        const float a0 = sm.ad[buf][it], a1 = sm.ad[buf][it + 1];
                        const int mi = DN ? 1 : o; /* the msum's matrix (Q2_K) */
                        A[o][x][a][0] = __fadd_rn(A[o][x][a][0], cu_kblock<WT>(a0, d0, m0, is[o][a][0], DN ? is[mi][a][0] : 0));
                        A[o][x][a][1] = __fadd_rn(A[o][x][a][1], cu_kblock<WT>(a1, d0, m0, is[o][a][1], DN ? is[mi][a][1] : 0));
                        A[o][x][a][2] = __fadd_rn(A[o][x][a][2], cu_kblock<WT>(a0, d1, m1, is[o][a][2], DN ? is[mi][a][2] : 0));
                        A[o][x][a][3] = __fadd_rn(A[o][x][a][3], cu_kblock<WT>(a1, d1, m1, is[o][a][3], DN ? is[mi][a][3] : 0));
                    }
                }
                if (more) raw_store(buf ^ 1, R);
                mm_wait<0>();
                __syncthreads();
            }
        }
#pragma unroll
        for (int a = 0; a < 2; a++)
#pragma unroll
            for (int el = 0; el < 4; el++) {
                const int it = wn * 16 + a * 8 + 2 * tq + (el & 1), rr = r0 + ra + (el >> 1) * 8;
                if (it >= nt) continue;
                const int pos = b0 + i0 + it;
                const float s0 = __fadd_rn(__fadd_rn(A[0][0][a][el], A[0][2][a][el]), __fadd_rn(A[0][1][a][el], A[0][3][a][el]));
                if constexpr (DN) {
                    p.out[(int64_t)p.items[pos] * p.rows + rr] = s0;
                } else {
                    const float s1 = __fadd_rn(__fadd_rn(A[NO - 1][0][a][el], A[NO - 1][2][a][el]),
                                               __fadd_rn(A[NO - 1][1][a][el], A[NO - 1][3][a][el]));
                    p.out[(int64_t)pos * p.rows + rr] = moe_act(s0, s1, p.lim, p.wts[p.items[pos]]);
                }
            }
    }
}

/* The tensor-core expert kernels take batches of at least MM_MIN_N tokens
 * with Q8_K activations: IQ2_XXS gate + up, Q2_K down; whole 64-row tiles,
 * whole groups of 4 super-blocks. */
template <int WT> static bool moe_mm_try(cu_ctx *c, const moe_p &p, int n_slots, int n, int type, int type_b) {
    if (c->no_mma || n < MM_MIN_N || type != WT || !p.aq || (WT == DS4_TYPE_IQ2_XXS && type_b != WT) ||
        p.rows % MG_BM || p.nch % 32 || p.ld % 1024)
        return false;
    /* per device, so on every launch (a batch kernel launch, not a decode step) */
    if (c->mm_ldm) {
        cudaFuncSetAttribute(k_moe_mm<WT, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sizeof(mg_smem));
        cu_launch(c, k_moe_mm<WT, true>, dim3(p.rows / MG_BM, n_slots), 256, sizeof(mg_smem), p);
    } else {
        cudaFuncSetAttribute(k_moe_mm<WT, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sizeof(mg_smem));
        cu_launch(c, k_moe_mm<WT, false>, dim3(p.rows / MG_BM, n_slots), 256, sizeof(mg_smem), p);
    }
    return true;
}

template <int WT, bool AQ>
static void launch_gate_up(cu_ctx *c, const moe_p &p, dim3 grid, int n) {
    if (n == 1) cu_launch(c, k_moe_gate_up<WT, AQ, 1>, grid, 256, 0, p);
    else cu_launch(c, k_moe_gate_up<WT, AQ, 8>, grid, 256, 0, p);
}

template <int WT, bool AQ>
static void launch_down(cu_ctx *c, const moe_p &p, dim3 grid, int n) {
    if (n == 1) cu_launch(c, k_moe_down<WT, AQ, 1>, grid, 256, 0, p);
    else cu_launch(c, k_moe_down<WT, AQ, 8>, grid, 256, 0, p);
}

#define MOE_DISPATCH(LAUNCH, type, aq, ...)                                                            \
    switch (type) {                                                                                    \
    case DS4_TYPE_F32: LAUNCH<DS4_TYPE_F32, false>(__VA_ARGS__); break;                                \
    case DS4_TYPE_F16: LAUNCH<DS4_TYPE_F16, false>(__VA_ARGS__); break;                                \
    case DS4_TYPE_BF16: LAUNCH<DS4_TYPE_BF16, false>(__VA_ARGS__); break;                              \
    case DS4_TYPE_Q8_0:                                                                                \
        if (aq) LAUNCH<DS4_TYPE_Q8_0, true>(__VA_ARGS__);                                              \
        else LAUNCH<DS4_TYPE_Q8_0, false>(__VA_ARGS__);                                                \
        break;                                                                                         \
    case DS4_TYPE_Q4_K:                                                                                \
        if (aq) LAUNCH<DS4_TYPE_Q4_K, true>(__VA_ARGS__);                                              \
        else LAUNCH<DS4_TYPE_Q4_K, false>(__VA_ARGS__);                                                \
        break;                                                                                         \
    case DS4_TYPE_Q2_K:                                                                                \
        if (aq) LAUNCH<DS4_TYPE_Q2_K, true>(__VA_ARGS__);                                              \
        else LAUNCH<DS4_TYPE_Q2_K, false>(__VA_ARGS__);                                                \
        break;                                                                                         \
    case DS4_TYPE_IQ2_XXS:                                                                             \
        if (aq) LAUNCH<DS4_TYPE_IQ2_XXS, true>(__VA_ARGS__);                                           \
        else LAUNCH<DS4_TYPE_IQ2_XXS, false>(__VA_ARGS__);                                             \
        break;                                                                                         \
    default: cu_fail(c, DS4_E_INTERNAL, "cuda: experts of type %s", ds4_type_name(type));            \
    }

/* h = silu(min(g, lim)) * clamp(u, -lim, lim) (shared expert, weight 1);
 * with q != NULL also the Q8_0 codes of h for the down projection (n % 32
 * == 0: whole warps hold whole 32-value blocks). */
__global__ void k_swiglu(float *g, const float *u, int64_t n, float lim, int8_t *q, float *d) {
    cu_pdl_wait();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i - (threadIdx.x & 31) >= n) return;
    const bool in = i < n; /* without codes n need not be a multiple of 32 */
    float h = 0.0f;
    if (in) {
        float gv = g[i] < lim ? g[i] : lim;
        float uv = u[i] < -lim ? -lim : (u[i] > lim ? lim : u[i]);
        float si = gv / (1.0f + expf(-gv));
        h = __fmul_rn(__fmul_rn(si, uv), 1.0f);
        g[i] = h;
    }
    if (q) cu_warp_q8_0(h, q + (i & ~(int64_t)31), d + i / 32);
}

/* y[t][d] = (sum_k out[t*K+k][d]) + shared[t][d] */
__global__ void k_moe_sum(const float *out, const float *sh, float *y, int n, int D, int K) {
    cu_pdl_wait();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)n * D) return;
    const int t = (int)(i / D), d = (int)(i % D);
    float acc = 0.0f;
    for (int k = 0; k < K; k++) acc += out[((int64_t)t * K + k) * D + d];
    y[i] = acc + sh[i];
}

/* ---------------------------------------------------------------- few tokens, fused */

/* The experts of 1..MOE1_MAX_N tokens (decode, MTP verify rows) in two
 * launches instead of seven (gate/up, hidden quantization, down, shared
 * gate/up, shared SwiGLU, shared down, sum). Every value is computed by the
 * operations of the unfused path, so the results are the same bits
 * (DS4_CUDA_NO_MOE_FUSE=1 runs the unfused one):
 *  - routed items i = t*K + k (no grouping: with a few tokens almost every
 *    item has its own expert): k_moe_gate_up / k_moe_down's cu_row_dot (one
 *    warp per row, chunks lane + 32m; a token's sum never depends on the
 *    other tokens of the call), item i's hidden row at i * F (the codes are
 *    per row, so the row order does not matter);
 *  - shared rows: the matvec's split of a row over wpr warps (cu_mv_wpr of
 *    the weight's shape), here the wpr partials in one warp, warp sums added
 *    in j order (mv_rows_store, k_matvec);
 *  - the hidden rows' int8 codes (Q8_K for K-quants, Q8_0) by the last of
 *    the 32 blocks that write a 256-value super-block (counters that wrap
 *    back to 0), with cu_quantize's per-block code;
 *  - the down kernel sums an output row as k_moe_sum: 0 + item t*K + ... +
 *    item t*K + K-1, then + shared. */
/* (MOE1_MAX_N: at the top, the router reads it) */
#define MOE1_MAX_K 6 /* experts per token of the fused path (Flash: 6) */
struct moe1_p {
    cu_w g, u, d;            /* routed stacks (rows_per_mat F, F, D) */
    cu_w gs, us, ds;         /* shared gate, up (Q8_0), down (Q8_0) */
    int n, F, D, K, wpr_gu, wpr_d, hat;
    const int32_t *ids;      /* (n*K) expert of each item */
    const float *wts;        /* (n*K) route weights */
    const int8_t *aq;        /* routed input codes (n, D) (act type of the gate weights) */
    const float *ad;
    const int32_t *abs;
    const int8_t *sq;        /* shared input Q8_0 codes (n, D) */
    const float *sd;
    float *gu;               /* (n*K, F) routed hidden */
    float *sh;               /* (n, F) shared hidden */
    int8_t *hq;              /* routed hidden codes (n*K, F) */
    float *hd;
    int32_t *hbs;
    int8_t *shq;             /* shared hidden Q8_0 codes (n, F) */
    float *shd;
    unsigned *cnt;           /* ((1 + n*K) * F/256) */
    float *y;                /* (n, D) */
    float lim;
    int pf;                  /* gate/up: prefetch the shared expert's rows to L2 before cu_pdl_wait */
    int pfd;                 /* down: the same for its shared rows (DS4_CUDA_EARLY_TRIGGER only) */
    int seq;                 /* DS4_CUDA_MOE1_SEQ=1: the items' rows one after the other (A/B) */
    int xpf;                 /* L2 prefetch of the routed rows once the ids are known (DS4_CUDA_XPF=1) */
    cu_comb_job cj;          /* DS4_CUDA_COMB_BIG: an HC-pre comb run by the extra block (F/8, 0) of the gate/up launch */
    const uint64_t *grid;
    const uint8_t *ksigns;
};

/* L2 prefetch of rows [r0, r0 + n) of a (Q8_0) weight */
__device__ __forceinline__ void moe1_prefetch(const cu_w &w, int r0, int n) {
    cu_prefetch_l2(w.q + (size_t)r0 * w.q_row, (size_t)n * w.q_row);
    cu_prefetch_l2(w.s + (size_t)r0 * w.s_row, (size_t)n * w.s_row);
}

/* one Q8_0 row of the shared expert for n tokens (input codes at t * ldq)
 * as the matvec computes it (cu_row_split) */
__device__ __forceinline__ void moe1_q8_row(const cu_w &w, int64_t row, int nch, int wpr, int n, int64_t ldq,
                                            const int8_t *aq, const float *ad, float (&v)[MOE1_MAX_N]) {
    int64_t xo[MOE1_MAX_N];
#pragma unroll
    for (int t = 0; t < MOE1_MAX_N; t++) xo[t] = t * ldq;
    cu_row_split<DS4_TYPE_Q8_0, true, MOE1_MAX_N>(w.q + (size_t)row * w.q_row, w.s + (size_t)row * w.s_row, nch, n,
                                                  wpr, nullptr, aq, ad, nullptr, xo, v, nullptr);
}

/* L2 prefetch of n rows of row_bytes bytes each, the warp's lanes taking
 * their 128-byte lines in turn (the loads that follow then wait on L2, not
 * DRAM: issued before a table load or other work, it hides one DRAM
 * latency of a short-lived block). Values are unaffected. */
template <class RowOf>
__device__ __forceinline__ void moe1_prefetch_rows(RowOf row_of, int n, size_t row_bytes) {
    const int lane = threadIdx.x & 31;
    /* a row not aligned to 128 bytes spans one line more (Q2_K: 672 bytes) */
    const size_t lines = (row_bytes + 127) / 128 + 1;
    for (size_t k = lane; k < (size_t)n * lines; k += 32) {
        const uintptr_t a0 = (uintptr_t)row_of((int)(k / lines));
        const uintptr_t first = a0 & ~(uintptr_t)127, a = first + 128 * (k % lines);
        if (a < a0 + row_bytes) asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
    }
}

/* Gate + up + SwiGLU of unit (x, y): warp w takes row 8x + w of the shared
 * expert (y = 0, every token) or of item y - 1 (tab: the IQ2 tables, loaded
 * by the caller for IQ2_XXS). */
template <int WG>
__device__ __forceinline__ void moe1_gu_rows(const moe1_p &p, int x, int y, const cu_iq2_tab *tab) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int r = x * 8 + w, F = p.F, D = p.D, nch = D / 32;
    if (y == 0) {
        float g[MOE1_MAX_N], u[MOE1_MAX_N];
        moe1_q8_row(p.gs, r, nch, p.wpr_gu, p.n, D, p.sq, p.sd, g);
        moe1_q8_row(p.us, r, nch, p.wpr_gu, p.n, D, p.sq, p.sd, u);
        if (lane == 0)
#pragma unroll
            for (int t = 0; t < MOE1_MAX_N; t++)
                if (t < p.n) p.sh[(int64_t)t * F + r] = moe_act(g[t], u[t], p.lim, 1.0f);
    } else {
        const int i = y - 1, t = i / p.K;
        const int64_t row = (int64_t)p.ids[i] * F + r;
        /* gate and up rows together (their loads in flight at once), each
         * with cu_row_dot's operations */
        const uint8_t *const qr[2] = {p.g.q + (size_t)row * p.g.q_row, p.u.q + (size_t)row * p.u.q_row};
        const uint8_t *const sr[2] = {p.g.s ? p.g.s + (size_t)row * p.g.s_row : nullptr,
                                      p.u.s ? p.u.s + (size_t)row * p.u.s_row : nullptr};
        const int64_t xo[2] = {(int64_t)t * D, (int64_t)t * D};
        float gu[2] = {0.0f, 0.0f};
        if (p.seq) { /* DS4_CUDA_MOE1_SEQ=1: one row after the other (A/B) */
            cu_row_dot<WG, true, 1>(qr[0], sr[0], nch, 1, nullptr, p.aq, p.ad, p.abs, xo, gu, tab);
            cu_row_dot<WG, true, 1>(qr[1], sr[1], nch, 1, nullptr, p.aq, p.ad, p.abs, xo, gu + 1, tab);
        } else {
            cu_row_dot_multi<WG, 2>(qr, sr, 2, nch, p.aq, p.ad, p.abs, xo, gu, tab);
        }
        const float g = cu_warp_sum(gu[0]), u = cu_warp_sum(gu[1]);
        if (lane == 0) p.gu[(int64_t)i * F + r] = moe_act(g, u, p.lim, p.wts[i]);
    }
}

/* The int8 codes of super-block sb of unit row y (0: the shared hidden,
 * Q8_0 per warp; else item y - 1's, Q8_K by warp 0 or Q8_0 per warp), read
 * from L2 once its 32 row groups are written. */
__device__ __forceinline__ void moe1_gu_codes(const moe1_p &p, int y, int sb) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, F = p.F;
    if (y == 0) {
        for (int t = 0; t < p.n; t++) {
            const int64_t i = (int64_t)t * F + 256 * sb + 32 * w;
            cu_warp_q8_0(__ldcg(p.sh + i + lane), p.shq + i, p.shd + i / 32);
        }
        return;
    }
    const int i = y - 1;
    const float *h = p.gu + (int64_t)i * F + 256 * sb;
    if (p.hat == DS4_TYPE_Q8_0) {
        const int64_t o = (int64_t)i * F + 256 * sb + 32 * w;
        cu_warp_q8_0(__ldcg(h + 32 * w + lane), p.hq + o, p.hd + o / 32);
    } else if (w == 0) {
        float v[8];
#pragma unroll
        for (int m = 0; m < 8; m++) v[m] = __ldcg(h + 8 * lane + m);
        cu_warp_q8_k(v, p.hq + (int64_t)i * F + 256 * sb, p.hd + (int64_t)i * (F / 256) + sb,
                     p.hbs + (int64_t)i * (F / 16) + 16 * sb);
    }
}

/* CU_MOE1_GU_MINB (build option, default 0: no bound): blocks per SM for
 * the one-token gate/up kernel (its IQ2_XXS instance holds 60 registers:
 * 4 blocks of 256 per SM, a 2,048-row layer's 256 x 7 blocks in ~3.4
 * waves; 5 bounds it to 48). Register allocation only. */
#ifndef CU_MOE1_GU_MINB
#define CU_MOE1_GU_MINB 0
#endif

/* Gate + up + SwiGLU: block (x, 0) the shared rows 8x..8x+7 of every
 * token, block (x, 1 + i) item i's rows; then the codes of each finished
 * super-block. */
template <int WG>
__global__ void __launch_bounds__(256, CU_MOE1_GU_MINB) k_moe1_gate_up(const __grid_constant__ moe1_p p) {
    if (p.cj.n && blockIdx.x == gridDim.x - 1) { /* DS4_CUDA_COMB_BIG: the extra column, its row 0 the comb */
        if (blockIdx.y == 0) {
            cu_pdl_wait();
            hc_comb_run(p.cj, threadIdx.x >> 5);
        }
        return;
    }
    if (p.pf && blockIdx.y == 0 && threadIdx.x < 2) moe1_prefetch(threadIdx.x ? p.us : p.gs, blockIdx.x * 8, 8);
    cu_pdl_wait();
    __shared__ cu_iq2_tab tab;
    __shared__ bool last;
    const int y = blockIdx.y;
    if (y != 0) {
        if (p.xpf) { /* their DRAM latency behind the table load (and the scale rows of planar types) */
            const int64_t row = (int64_t)p.ids[y - 1] * p.F + blockIdx.x * 8 + (threadIdx.x >> 5);
            const uint8_t *const qr[2] = {p.g.q + (size_t)row * p.g.q_row, p.u.q + (size_t)row * p.u.q_row};
            const uint8_t *const sr[2] = {p.g.s ? p.g.s + (size_t)row * p.g.s_row : nullptr,
                                          p.u.s ? p.u.s + (size_t)row * p.u.s_row : nullptr};
            moe1_prefetch_rows([&](int k) { return k ? qr[1] : qr[0]; }, 2, p.g.q_row);
            if (p.g.s) moe1_prefetch_rows([&](int k) { return k ? sr[1] : sr[0]; }, 2, p.g.s_row);
        }
        if constexpr (WG == DS4_TYPE_IQ2_XXS) {
            cu_iq2_tab_load(&tab, p.grid, p.ksigns);
            __syncthreads();
        }
    }
    moe1_gu_rows<WG>(p, blockIdx.x, y, &tab);
    /* the last of a super-block's 32 blocks quantizes it */
    const int sb = blockIdx.x / 32;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicInc(p.cnt + y * (p.F / 256) + sb, 31u) == 31u;
    __syncthreads();
    if (!last) return;
    __threadfence();
    moe1_gu_codes(p, y, sb);
}

/* Down of every item and the shared expert, summed per token: one warp per
 * output row. */
template <int WD>
__device__ __forceinline__ void moe1_down_rows(const moe1_p &p, int x, const cu_iq2_tab *tab) {
    const int lane = threadIdx.x & 31, r = x * 8 + (threadIdx.x >> 5), F = p.F, nch = F / 32;
    if (p.xpf) { /* the routed rows' DRAM latency behind the shared row */
        moe1_prefetch_rows([&](int i) { return p.d.q + (size_t)((int64_t)p.ids[i] * p.D + r) * p.d.q_row; },
                           p.n * p.K, p.d.q_row);
        if (p.d.s)
            moe1_prefetch_rows([&](int i) { return p.d.s + (size_t)((int64_t)p.ids[i] * p.D + r) * p.d.s_row; },
                               p.n * p.K, p.d.s_row);
    }
    float sh[MOE1_MAX_N];
    moe1_q8_row(p.ds, r, nch, p.wpr_d, p.n, F, p.shq, p.shd, sh);
    for (int t = 0; t < p.n; t++) {
        /* the K items' rows together (their loads in flight at once), each
         * with cu_row_dot's operations; summed in k order as before */
        const uint8_t *qr[MOE1_MAX_K], *sr[MOE1_MAX_K];
        int64_t xo[MOE1_MAX_K];
        float a[MOE1_MAX_K];
#pragma unroll
        for (int k = 0; k < MOE1_MAX_K; k++) {
            const int i = t * p.K + (k < p.K ? k : 0);
            const int64_t row = (int64_t)p.ids[i] * p.D + r;
            qr[k] = p.d.q + (size_t)row * p.d.q_row;
            sr[k] = p.d.s ? p.d.s + (size_t)row * p.d.s_row : nullptr;
            xo[k] = (int64_t)i * F;
            a[k] = 0.0f;
        }
        if (p.seq) { /* DS4_CUDA_MOE1_SEQ=1: one item after the other (A/B) */
            for (int k = 0; k < p.K; k++) {
                const int64_t xk[1] = {(int64_t)(t * p.K + k) * F};
                float ak[1] = {0.0f};
                const int64_t row = (int64_t)p.ids[t * p.K + k] * p.D + r;
                cu_row_dot<WD, true, 1>(p.d.q + (size_t)row * p.d.q_row,
                                        p.d.s ? p.d.s + (size_t)row * p.d.s_row : nullptr, nch, 1, nullptr, p.hq, p.hd,
                                        p.hbs, xk, ak, tab);
#pragma unroll
                for (int m = 0; m < MOE1_MAX_K; m++)
                    if (m == k) a[m] = ak[0];
            }
        } else {
            cu_row_dot_multi<WD, MOE1_MAX_K>(qr, sr, p.K, nch, p.hq, p.hd, p.hbs, xo, a, tab);
        }
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k < MOE1_MAX_K; k++)
            if (k < p.K) acc += cu_warp_sum(a[k]);
        float v = sh[0];
#pragma unroll
        for (int m = 1; m < MOE1_MAX_N; m++)
            if (m == t) v = sh[m];
        if (lane == 0) p.y[(int64_t)t * p.D + r] = acc + v;
    }
}

/* CU_MOE1_DOWN_MINB (build option, default 0: no bound): blocks per SM the
 * down kernel's registers must allow. Unbounded, the Q2_K and Q4_K
 * instances take 128 registers, so 2 blocks of 256 per SM and the 512
 * blocks of a 4,096-row layer run in two waves; 4 bounds them to 64 (one
 * wave on 132 SMs). Register allocation only: the same arithmetic. */
#ifndef CU_MOE1_DOWN_MINB
#define CU_MOE1_DOWN_MINB 0
#endif
template <int WD>
__global__ void __launch_bounds__(256, CU_MOE1_DOWN_MINB) k_moe1_down(const __grid_constant__ moe1_p p) {
    if (p.pfd && threadIdx.x == 0) moe1_prefetch(p.ds, blockIdx.x * 8, 8);
    cu_pdl_wait();
    __shared__ cu_iq2_tab tab;
    if constexpr (WD == DS4_TYPE_IQ2_XXS) {
        cu_iq2_tab_load(&tab, p.grid, p.ksigns);
        __syncthreads();
    }
    moe1_down_rows<WD>(p, blockIdx.x, &tab);
}

/* The fused path when the model's types allow it: K-quant or Q8_0 routed
 * experts with int8 activations, Q8_0 shared expert, whole super-blocks,
 * at most MOE1_MAX_N tokens. Returns false (nothing launched) otherwise. */
static bool moe1_try(cu_ctx *c, const ds4_moe_experts_args *a) {
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int n = a->n, D = hp->n_embd, F = hp->n_ff_exp, K = hp->n_expert_used;
    const int tg = l->gate_exps.type, td = l->down_exps.type;
    auto okt = [](int t) {
        return t == DS4_TYPE_IQ2_XXS || t == DS4_TYPE_Q2_K || t == DS4_TYPE_Q4_K || t == DS4_TYPE_Q8_0;
    };
    if (c->no_moe_fuse || n < 1 || n > MOE1_MAX_N || K > MOE1_MAX_K || !a->num.act_quant || !okt(tg) || l->up_exps.type != tg ||
        !okt(td) || l->gate_sh.type != DS4_TYPE_Q8_0 || l->up_sh.type != DS4_TYPE_Q8_0 ||
        l->down_sh.type != DS4_TYPE_Q8_0 || l->gate_sh.n_out != F || l->up_sh.n_out != F || l->down_sh.n_out != D ||
        F % 256 || D % 256 || (size_t)n * K * F > c->s.a3.cap || (size_t)n * F > c->s.a4.cap ||
        (size_t)n * D > c->s.a1.cap || (size_t)n * D > c->s.a2.cap || n > (int)c->s.n_batch)
        return false;
    cu_scratch &s = c->s;
    moe1_p p;
    memset(&p, 0, sizeof p);
    p.g = cu_weight_view(&l->gate_exps);
    p.u = cu_weight_view(&l->up_exps);
    p.d = cu_weight_view(&l->down_exps);
    p.gs = cu_weight_view(&l->gate_sh);
    p.us = cu_weight_view(&l->up_sh);
    p.ds = cu_weight_view(&l->down_sh);
    p.n = n;
    p.F = F;
    p.D = D;
    p.K = K;
    p.wpr_gu = cu_mv_wpr(F, D / 32); /* the shared pair's launch: 2 segments of F rows */
    p.wpr_d = cu_mv_wpr(D, F / 32);
    p.hat = cu_act_type(td);
    p.ids = a->ids;
    p.wts = a->w;
    p.lim = hp->swiglu_clamp[a->il];
    /* the input's codes: from the producer (HC-pre) or quantized here */
    const int gat = cu_act_type(tg);
    const cu_act *rq = cu_act_codes(c, gat, a->v, D, n, D, &s.a2);
    const cu_act *sq = gat == DS4_TYPE_Q8_0 ? rq : cu_act_codes(c, DS4_TYPE_Q8_0, a->v, D, n, D, &s.a1);
    p.aq = rq->q;
    p.ad = rq->d;
    p.abs = rq->bs;
    p.sq = sq->q;
    p.sd = sq->d;
    p.gu = s.gu;
    p.sh = s.sg;
    p.hq = s.a3.q;
    p.hd = s.a3.d;
    p.hbs = s.a3.bs;
    p.shq = s.a4.q;
    p.shd = s.a4.d;
    p.cnt = s.mcc;
    p.y = a->y;
    p.grid = c->grid;
    p.ksigns = c->ksigns;
    p.pfd = c->early_trigger && !c->no_prefetch && !c->no_pdl;
    p.pf = (c->early_trigger || c->pf_next) && !c->no_prefetch && !c->no_pdl;
    p.seq = c->moe1_seq;
    p.xpf = c->xpf;
    if (c->comb_big) p.cj = cu_comb_take(c); /* a comb the router left (DS4_CUDA_COMB_BIG) */
    const dim3 g1(F / 8 + (p.cj.n ? 1 : 0), 1 + n * K);
    switch (tg) {
    case DS4_TYPE_IQ2_XXS: cu_launch(c, k_moe1_gate_up<DS4_TYPE_IQ2_XXS>, g1, 256, 0, p); break;
    case DS4_TYPE_Q2_K: cu_launch(c, k_moe1_gate_up<DS4_TYPE_Q2_K>, g1, 256, 0, p); break;
    case DS4_TYPE_Q4_K: cu_launch(c, k_moe1_gate_up<DS4_TYPE_Q4_K>, g1, 256, 0, p); break;
    default: cu_launch(c, k_moe1_gate_up<DS4_TYPE_Q8_0>, g1, 256, 0, p); break;
    }
    CU_LAUNCH(c, "moe1_gate_up");
    switch (td) {
    case DS4_TYPE_IQ2_XXS: cu_launch(c, k_moe1_down<DS4_TYPE_IQ2_XXS>, D / 8, 256, 0, p); break;
    case DS4_TYPE_Q2_K: cu_launch(c, k_moe1_down<DS4_TYPE_Q2_K>, D / 8, 256, 0, p); break;
    case DS4_TYPE_Q4_K: cu_launch(c, k_moe1_down<DS4_TYPE_Q4_K>, D / 8, 256, 0, p); break;
    default: cu_launch(c, k_moe1_down<DS4_TYPE_Q8_0>, D / 8, 256, 0, p); break;
    }
    CU_LAUNCH(c, "moe1_down");
    c->moe_grouped = nullptr;
    return true;
}

int cu_moe_experts(void *ctx, const ds4_moe_experts_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int n = a->n, D = hp->n_embd, F = hp->n_ff_exp, E = hp->n_expert, K = hp->n_expert_used, NI = n * K;
    const float lim = hp->swiglu_clamp[a->il];
    const bool aq = a->num.act_quant;
    cu_scratch &s = c->s;
    if (moe1_try(c, a)) return c->err;
    /* group items by expert (unless the router kernel did for these ids) */
    if (!(n == 1 && c->moe_grouped == a->ids)) {
        cu_launch(c, k_moe_group, 1, 1024, (size_t)(2 * E + 32 * E) * sizeof(int), a->ids, NI, E, s.items, s.off,
                  s.act);
        if (!CU_LAUNCH(c, "moe_group")) return c->err;
    }
    c->moe_grouped = nullptr;
    const int n_slots = NI < E ? NI : E;
    /* gate + up */
    moe_p p;
    memset(&p, 0, sizeof p);
    p.K = K;
    p.items = s.items;
    p.off = s.off;
    p.act = s.act;
    p.E = E;
    p.wts = a->w;
    p.lim = lim;
    p.grid = c->grid;
    p.ksigns = c->ksigns;
    const int gat = aq ? cu_act_type(l->gate_exps.type) : -1;
    p.wa = cu_weight_view(&l->gate_exps);
    p.wb = cu_weight_view(&l->up_exps);
    p.mat_rows = F;
    p.rows = F;
    p.nch = D / 32;
    p.ld = D;
    if (gat >= 0) {
        const cu_act *pre = cu_act_codes(c, gat, a->v, D, n, D, &s.a2);
        p.aq = pre->q;
        p.ad = pre->d;
        p.abs = pre->bs;
    } else {
        p.x = a->v;
    }
    p.out = s.gu;
    dim3 g1(cu_div_up(F, 8), n_slots);
    if (!moe_mm_try<DS4_TYPE_IQ2_XXS>(c, p, n_slots, n, l->gate_exps.type, l->up_exps.type))
        MOE_DISPATCH(launch_gate_up, l->gate_exps.type, gat >= 0, c, p, g1, n);
    CU_LAUNCH(c, "moe_gate_up");
    /* down: hidden rows (expert-major) quantized for the down type */
    const int dat = aq ? cu_act_type(l->down_exps.type) : -1;
    moe_p q = p;
    q.wa = cu_weight_view(&l->down_exps);
    q.mat_rows = D;
    q.rows = D;
    q.nch = F / 32;
    q.ld = F;
    q.x = nullptr;
    q.aq = nullptr;
    q.ad = nullptr;
    q.abs = nullptr;
    if (dat >= 0) {
        cu_quantize(c, dat, s.gu, F, NI, F, &s.a3);
        q.aq = s.a3.q;
        q.ad = s.a3.d;
        q.abs = s.a3.bs;
    } else {
        q.x = s.gu;
    }
    q.out = s.out;
    dim3 g2(cu_div_up(D, 8), n_slots);
    if (!moe_mm_try<DS4_TYPE_Q2_K>(c, q, n_slots, n, l->down_exps.type, -1))
        MOE_DISPATCH(launch_down, l->down_exps.type, dat >= 0, c, q, g2, n);
    CU_LAUNCH(c, "moe_down");
    /* shared expert */
    cu_mv_pair(c, &l->gate_sh, s.sg, F, &l->up_sh, s.su, F, a->v, D, n, aq, &s.a1, a->step, 0);
    const bool h_codes = aq && !c->no_preq && cu_act_type(l->down_sh.type) == DS4_TYPE_Q8_0 && F % 32 == 0 &&
                         (size_t)n * F <= s.a1.cap;
    cu_launch(c, k_swiglu, cu_div_up((int64_t)n * F, 256), 256, 0, s.sg, s.su, (int64_t)n * F, lim,
              h_codes ? s.a1.q : (int8_t *)nullptr, h_codes ? s.a1.d : (float *)nullptr);
    if (h_codes) cu_preq_set(c, s.sg, n, F, F, DS4_TYPE_Q8_0, &s.a1);
    CU_LAUNCH(c, "shared_swiglu");
    cu_mv_pair(c, &l->down_sh, s.sd, D, nullptr, nullptr, 0, s.sg, F, n, aq, &s.a1, a->step, 0);
    cu_launch(c, k_moe_sum, cu_div_up((int64_t)n * D, 256), 256, 0, s.out, s.sd, a->y, n, D, K);
    CU_LAUNCH(c, "moe_sum");
    return c->err;
}

CU_TU_SWITCHES(cu_sw_moe)
