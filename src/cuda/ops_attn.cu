/* ops_attn.cu - CUDA stages of the residual stream and the attention path:
 * embed, HC-pre / HC-post (MODEL.md C.2), the q/kv projections (C.3), the
 * attention core with sinks and the grouped output projection (C.7), the
 * raw-ring store, the output head (C.9), and greedy argmax.
 *
 * Positions come from the device step (ds4_step.pos0), never from the
 * host copy in the stage arguments, so a decode step can be replayed from a
 * captured graph (cuda_backend.cu).
 */
#include "cuda/cuda.cuh"
#include "cuda/mma.cuh"
#include "cuda/rowops.cuh"

#include <stdio.h>
#include <type_traits>

/* ---------------------------------------------------------------- embed */

int cu_embed(void *ctx, const ds4_embed_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    const ds4_hparams *hp = &a->m->hp;
    const int64_t D = hp->n_embd;
    cu_dequant_rows(c, &a->m->tok_embd, a->tokens, a->n, a->X, hp->n_hc * D, hp->n_hc, D);
    return c->err;
}

/* ---------------------------------------------------------------- HC */

#define HC_MAX_MIX 32
#define HC_MAX_SPLIT 64

static __device__ float cu_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
/* x*a + b rounded twice, as the CPU (no fused multiply-add) */
static __device__ float cu_lin(float x, float a, float b) { return __fadd_rn(__fmul_rn(x, a), b); }

struct hc_fin {
    const float *X;          /* (n, n_hc, D) */
    /* k_hc with the previous sublayer's HC-post (py != NULL): each element
     * of X is first updated as k_hc_post does (from the old X of every
     * stream at its dim), into xn; the last block reads xn and writes it
     * back to Xw (= X) once every block has read the old X */
    const float *py, *ppost, *pcomb;
    float *xn, *Xw;
    const uint8_t *fn;       /* (n_mix, n_hc*D) mixer rows, F32/F16/BF16 */
    int n_mix;               /* rows of fn */
    float *hcp;              /* (n, n_split, HC_MAX_MIX) partial dots */
    double *hcs;             /* (n, n_split) partial sums of squares */
    unsigned *cnt;           /* (n) blocks done, back to 0 after the last */
    int n_split, n_hc, D, sinkhorn;
    float rms_eps, hc_eps;
    const float *scale, *base, *norm_w;
    float *out;              /* (n, D) */
    float *post, *comb;      /* HC-pre outputs (NULL for the head) */
    float *cin;              /* deferred comb (DS4_CUDA_COMB_HOST=1, few tokens): warp 0 leaves the (n, hc*hc)
                              * Sinkhorn inputs here, a later kernel finishes them into comb (cu_comb_job) */
    bool head;
    int diag;                /* DS4_CUDA_HC_DIAG bits (timing diagnostics) */
    int n;                   /* tokens (the batch kernels) */
    int pf;                  /* k_hc: prefetch the block's slices of fn to L2 before cu_pdl_wait */
    int bfly;                /* k_hc: the warp sums of the mix dots by recursive halving (DS4_CUDA_HC_BFLY) */
    int fin2;                /* hc_finish: loads at once, the warp's Q8_0 maxima together (DS4_CUDA_HC_FIN2) */
    int fin3;                /* hc_finish: norm weights staged in shared memory, the norm loop rolled (DS4_CUDA_HC_FIN3) */
    int trig;                /* k_hc: the last block lets the next kernel launch (DS4_CUDA_TAIL_TRIGGER) */
    int8_t *q0;              /* optional (n, D) Q8_0 codes of out, scales d0 (n, D/32) */
    float *d0;
    int8_t *qk;              /* optional (n, D) Q8_K codes of out, scales dk (n, D/256), sums bsk (n, D/16) */
    float *dk;
    int32_t *bsk;
};

#define HC_THREADS 512

/* DS4_CUDA_HC_DIAG bit 256 (results unchanged): SM clocks of the phases of
 * k_hc's last block in one-token HC-pre calls (decode; not the head's),
 * summed over the calls (cu_hc_clk_print; "w0 comb done" stays 0 with
 * DS4_CUDA_COMB_HOST=1, whose comb runs elsewhere). Bits 512 / 1024 (timing
 * only, wrong results): the norm warps' normalise + Q8_0 section / warp 0's
 * comb run twice, the same code, with a clock after the first pass: a
 * second pass much faster than the first names instruction fetch (the
 * finish runs once per call on one SM, its code cold there) */
#define HC_CLK_N 20
__device__ unsigned long long cu_hc_clk[HC_CLK_N];
__device__ __forceinline__ void hc_stamp(const hc_fin &p, int t, long long ck0, int i) {
    if ((p.diag & 256) && t == 0 && p.n == 1 && !p.head) atomicAdd(&cu_hc_clk[i], (unsigned long long)(clock64() - ck0));
}

/* k_hc_comb: a comb HC-pre left for later that no kernel took (cu_comb_flush) */
__global__ void k_hc_comb(const __grid_constant__ cu_comb_job j) {
    cu_pdl_wait();
    hc_comb_run(j, blockIdx.x); /* 32 threads */
}

/* One group of a norm warp's 32-value blocks, b0, b0 + nwk, ...,
 * b0 + (U-1)*nwk (those below nb): normalised first (norm_blk's
 * expressions; wv(u, d) the norm weight of value d of the group's u-th
 * block), their Q8_0 maxima by one interleaved shuffle tree (cu_warp_max's
 * pairs for each), then the codes: U chains in flight. FIN2 takes all of
 * a warp's blocks as one group (weights in registers); FIN3=2|4 (opt-in
 * until measured) a rolled loop of groups of 2 or 4 (weights from shared
 * memory): U chains for U times FIN3=1's one-block body, still fetched
 * once. */
template <int U, class WV>
__device__ __forceinline__ void hc_norm_grp(const hc_fin &p, int t, float *xs, float rn, int b0, int nwk, int nb,
                                            int D, WV wv) {
    const int lane = threadIdx.x & 31;
    float v[U], am[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int blk = b0 + u * nwk, d = 32 * blk + lane;
        v[u] = 0.0f;
        if (blk < nb) {
            v[u] = __fmul_rn(xs[d], rn);
            v[u] = p.norm_w ? __fmul_rn(wv(u, d), v[u]) : v[u];
            xs[d] = v[u];
            p.out[(int64_t)t * D + d] = v[u];
        }
        am[u] = fabsf(v[u]);
    }
    if (p.q0) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < U; u++) am[u] = fmaxf(am[u], __shfl_xor_sync(0xffffffffu, am[u], o));
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int blk = b0 + u * nwk;
            if (blk < nb) cu_warp_q8_0_am(v[u], am[u], p.q0 + (int64_t)t * D + 32 * blk, p.d0 + (int64_t)t * nb + blk);
        }
    }
}

/* Finishes HC-pre (mixer split, Sinkhorn, weighted sum, RMSNorm) or the
 * head's stream weighting for token t, run by the last block of k_hc to
 * finish its partials. The small mixer math runs on warp 0 with exactly
 * cpu_ops.c's expressions. HCN: n_hc as a constant (loops unrolled), 0 =
 * read it from p. xs: D floats of shared memory.
 *
 * Order: warp 0 computes pre/post; every thread forms its weighted sums and
 * sums of squares (cu_row_rmsnorm's per-thread order); then warp 0 signals
 * a named barrier without waiting and runs the comb softmax + Sinkhorn
 * (only HC-post reads it) while warps 1.. finish the norm (the block
 * reduction's tree, replayed by each of them), write the output and, when
 * asked, its Q8_0 and Q8_K quantizations for the projections that read it. */
template <int HCN>
__device__ __forceinline__ void hc_finish(const hc_fin &p, int t, float *xs, long long ck0 = 0) {
    __shared__ double red[32];
    __shared__ float mix[HC_MAX_MIX], pre[8];
    __shared__ float part[HC_MAX_SPLIT * HC_MAX_MIX];
    __shared__ double parts[HC_MAX_SPLIT];
    const int hc = HCN ? HCN : p.n_hc, D = p.D, nflat = hc * D;
    const int n_mix = p.head ? hc : (2 + hc) * hc;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __shared__ float rsq;
    /* the small parameters now (first use after two dependent loads and
     * three barriers): the mixer's scales and biases on warp 0, the norm
     * weights of each warp's 32-value blocks (warps 1..) in registers */
    const int nb = D / 32, wk = w - 1, nwk = nw - 1;
    constexpr int NWR = 12;
    const bool nreg = !p.fin3 && w > 0 && nb <= NWR * nwk;
    float nwr[NWR];
#pragma unroll
    for (int j = 0; j < NWR; j++)
        nwr[j] = nreg && p.norm_w && wk + j * nwk < nb ? p.norm_w[32 * (wk + j * nwk) + lane] : 0.0f;
    float sc0 = 0.0f, sc1 = 0.0f, sc2 = 0.0f, bs0 = 0.0f, bs1 = 0.0f, bs2 = 0.0f;
    if (w == 0) {
        sc0 = p.scale[0];
        bs0 = lane < hc ? p.base[lane] : 0.0f;
        if (!p.head) {
            sc1 = p.scale[1];
            sc2 = p.scale[2];
            bs1 = lane < hc ? p.base[hc + lane] : 0.0f;
            bs2 = lane < hc * hc ? p.base[2 * hc + lane] : 0.0f;
        }
    }
    /* this thread's values of X (dims tid + k*blockDim of every stream),
     * loaded now so that their latency hides behind the mixer math */
    const float *X = p.X + (int64_t)t * nflat;
    constexpr int XK = 8, XS = 4;
    float xr[XK][XS];
    const bool xreg = D <= XK * (int)blockDim.x && hc <= XS; /* always with py (checked by the launcher) */
    if (p.py) { /* the updated streams, written by every block of this launch: from L2 */
        const float *xn = p.xn + (int64_t)t * nflat;
        float *xw = p.Xw + (int64_t)t * nflat;
#pragma unroll
        for (int k = 0; k < XK; k++)
#pragma unroll
            for (int s = 0; s < XS; s++) {
                const int d = threadIdx.x + k * blockDim.x;
                xr[k][s] = d < D && s < hc ? __ldcg(xn + (int64_t)s * D + d) : 0.0f;
            }
#pragma unroll
        for (int k = 0; k < XK; k++)
#pragma unroll
            for (int s = 0; s < XS; s++) {
                const int d = threadIdx.x + k * blockDim.x;
                if (d < D && s < hc) xw[(int64_t)s * D + d] = xr[k][s];
            }
    } else if (xreg) {
#pragma unroll
        for (int k = 0; k < XK; k++)
#pragma unroll
            for (int s = 0; s < XS; s++) {
                const int d = threadIdx.x + k * blockDim.x;
                xr[k][s] = d < D && s < hc ? X[(int64_t)s * D + d] : 0.0f;
            }
    }
    /* DS4_CUDA_HC_FIN3=1: the norm weights into shared memory (xs + D; the
     * barriers below order these stores before the norm warps' reads) */
    float *nws = xs + D;
    if (p.fin3 && p.norm_w) {
        constexpr int NK = 8;
        float nv[NK];
#pragma unroll
        for (int k = 0; k < NK; k++) {
            const int d = threadIdx.x + k * blockDim.x;
            nv[k] = d < D ? p.norm_w[d] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < NK; k++)
            if (threadIdx.x + k * blockDim.x < D) nws[threadIdx.x + k * blockDim.x] = nv[k];
        for (int d = threadIdx.x + NK * blockDim.x; d < D; d += blockDim.x) nws[d] = p.norm_w[d];
    }
    if (threadIdx.x == 0) hc_stamp(p, t, ck0, 2);
    if (p.diag & 32) return; /* timing: the finish up to here */
    /* the split partials: loaded at once, then summed in split order, one
     * thread per mix value */
    if (p.fin2 && blockDim.x == HC_THREADS) {
        /* DS4_CUDA_HC_FIN2=1: every thread's loads issued together (one
         * round trip instead of three); the same values */
        constexpr int PK = HC_MAX_SPLIT * HC_MAX_MIX / HC_THREADS;
        static_assert(HC_MAX_SPLIT * HC_MAX_MIX % HC_THREADS == 0 && HC_MAX_SPLIT <= HC_THREADS, "PK loads cover the partials");
        const int np = p.n_split * HC_MAX_MIX;
        float pv[PK];
        double sv = 0.0;
#pragma unroll
        for (int k = 0; k < PK; k++) {
            const int i = threadIdx.x + k * HC_THREADS;
            pv[k] = i < np ? __ldcg(p.hcp + (int64_t)t * np + i) : 0.0f;
        }
        if ((int)threadIdx.x < p.n_split) sv = __ldcg(p.hcs + (int64_t)t * p.n_split + threadIdx.x);
#pragma unroll
        for (int k = 0; k < PK; k++)
            if (threadIdx.x + k * HC_THREADS < np) part[threadIdx.x + k * HC_THREADS] = pv[k];
        if ((int)threadIdx.x < p.n_split) parts[threadIdx.x] = sv;
    } else {
        for (int i = threadIdx.x; i < p.n_split * HC_MAX_MIX; i += blockDim.x)
            part[i] = __ldcg(p.hcp + (int64_t)t * p.n_split * HC_MAX_MIX + i);
        for (int i = threadIdx.x; i < p.n_split; i += blockDim.x) parts[i] = __ldcg(p.hcs + (int64_t)t * p.n_split + i);
    }
    __syncthreads();
    if (threadIdx.x < n_mix) {
        float v = 0.0f;
        for (int s = 0; s < p.n_split; s++) v += part[s * HC_MAX_MIX + threadIdx.x];
        mix[threadIdx.x] = v;
    } else if (threadIdx.x == 32) {
        double ss = 0.0;
        for (int s = 0; s < p.n_split; s++) ss += parts[s];
        rsq = 1.0f / sqrtf((float)(ss / nflat) + p.rms_eps);
    }
    __syncthreads();
    if (threadIdx.x == 0) hc_stamp(p, t, ck0, 3);
    if (p.diag & 64) return;
    if (threadIdx.x < hc) {
        pre[lane] = cu_sigmoid(cu_lin(__fmul_rn(mix[lane], rsq), sc0, bs0)) + p.hc_eps;
        if (!p.head)
            p.post[(int64_t)t * hc + lane] = 2.0f * cu_sigmoid(cu_lin(__fmul_rn(mix[hc + lane], rsq), sc1, bs1));
    }
    __syncthreads();
    if (threadIdx.x == 0) hc_stamp(p, t, ck0, 4);
    if (p.diag & 128) return;
    /* weighted sum of the streams and this thread's sum of squares */
    double ss = 0.0;
    if (!(p.diag & 8)) {
        if (xreg) {
#pragma unroll
            for (int k = 0; k < XK; k++) {
                const int d = threadIdx.x + k * blockDim.x;
                if (d < D) {
                    float acc = 0.0f;
#pragma unroll
                    for (int s = 0; s < XS; s++)
                        if (s < hc) acc = __fadd_rn(acc, __fmul_rn(pre[s], xr[k][s]));
                    xs[d] = acc;
                    ss += (double)acc * (double)acc;
                }
            }
        } else {
            for (int d = threadIdx.x; d < D; d += blockDim.x) {
                float acc = 0.0f;
                for (int s = 0; s < hc; s++) acc = __fadd_rn(acc, __fmul_rn(pre[s], X[(int64_t)s * D + d]));
                xs[d] = acc;
                ss += (double)acc * (double)acc;
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) red[w] = ss;
    if (w == 0) {
        /* release warps 1.. (they wait for all nw warps' partials) */
        asm volatile("bar.arrive 1, %0;" ::"r"(blockDim.x) : "memory");
        if (lane == 0) hc_stamp(p, t, ck0, 5);
        if (p.head) return;
        /* comb: its inputs here, the row softmax and Sinkhorn in hc_comb_warp,
         * now or (p.cin) by a later kernel (cu_comb_job) */
        const bool on = lane < hc * hc;
        const float c = on ? cu_lin(__fmul_rn(mix[2 * hc + lane], rsq), sc2, bs2) : 0.0f;
        if (p.cin) {
            if (on) p.cin[(int64_t)t * hc * hc + lane] = c;
            return;
        }
#pragma unroll 1
        for (int pass = (p.diag & 1024) ? 0 : 1; pass < 2; pass++) {
            hc_comb_warp<HCN>(c, hc, p.hc_eps, (p.diag & 1) ? 0 : p.sinkhorn, p.comb + (int64_t)t * hc * hc);
            if (lane == 0) hc_stamp(p, t, ck0, pass ? 6 : 14);
        }
        return;
    }
    asm volatile("bar.sync 1, %0;" ::"r"(blockDim.x) : "memory");
    const bool stw = lane == 0 && (w == 1 || w == nw - 1); /* phase clocks: the first and last norm warps */
    if (stw) hc_stamp(p, t, ck0, w == 1 ? 7 : 11);
    if (p.diag & 8) return;
    /* the block reduction's final tree (cu_block_reduce), in every warp */
    double tot = lane < nw ? red[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, o);
    const float rn = 1.0f / sqrtf((float)(tot / D) + p.rms_eps);
    if (stw && w == 1) hc_stamp(p, t, ck0, 8);
    /* one pass (HC_DIAG bit 512: two, the second clocked apart) */
#pragma unroll 1
    for (int pass = (p.diag & 512) ? 0 : 1; pass < 2; pass++) {
    if (pass == 1 && (p.diag & 512) && stw && w == 1) hc_stamp(p, t, ck0, 15);
    /* normalise by 32-value blocks (cu_row_rmsnorm's expressions), write,
     * and quantize to Q8_0 */
    auto norm_blk = [&](int blk, float wv) {
        const int d = 32 * blk + lane;
        float v = __fmul_rn(xs[d], rn);
        v = p.norm_w ? __fmul_rn(wv, v) : v;
        xs[d] = v;
        p.out[(int64_t)t * D + d] = v;
        if (p.q0) cu_warp_q8_0(v, p.q0 + (int64_t)t * D + 32 * blk, p.d0 + (int64_t)t * nb + blk);
    };
    if (nreg && p.fin2) {
        /* DS4_CUDA_HC_FIN2=1: all of the warp's blocks as one group */
        hc_norm_grp<NWR>(p, t, xs, rn, wk, nwk, nb, D, [&](int u, int) { return nwr[u]; });
    } else if (nreg) {
#pragma unroll
        for (int j = 0; j < NWR; j++)
            if (wk + j * nwk < nb) norm_blk(wk + j * nwk, nwr[j]);
    } else if (p.fin3 >= 2) {
        /* DS4_CUDA_HC_FIN3=2|4: groups of 2 or 4 blocks, the loop rolled */
        auto wsh = [&](int, int d) { return nws[d]; };
#pragma unroll 1
        for (int b0 = wk; b0 < nb; b0 += (p.fin3 >= 4 ? 4 : 2) * nwk) {
            if (p.fin3 >= 4) hc_norm_grp<4>(p, t, xs, rn, b0, nwk, nb, D, wsh);
            else hc_norm_grp<2>(p, t, xs, rn, b0, nwk, nb, D, wsh);
        }
    } else if (p.fin3) {
        /* DS4_CUDA_HC_FIN3=1: one block per iteration, the loop kept rolled
         * (this code runs once per call on one SM, cold in its instruction
         * cache: a short body fetched once beats unrolled straight code) */
#pragma unroll 1
        for (int blk = wk; blk < nb; blk += nwk) norm_blk(blk, p.norm_w ? nws[32 * blk + lane] : 0.0f);
    } else {
        for (int blk = wk; blk < nb; blk += nwk) norm_blk(blk, p.norm_w ? p.norm_w[32 * blk + lane] : 0.0f);
    }
    } /* pass (one, or two with HC_DIAG bit 512; the section above is not re-indented) */
    if (stw) hc_stamp(p, t, ck0, w == 1 ? 9 : 12);
    if (p.qk) {
        asm volatile("bar.sync 2, %0;" ::"r"(blockDim.x - 32) : "memory");
        for (int sb = wk; sb < D / 256; sb += nwk) {
            float v[8];
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = xs[256 * sb + 8 * lane + i];
            cu_warp_q8_k(v, p.qk + (int64_t)t * D + 256 * sb, p.dk + (int64_t)t * (D / 256) + sb,
                         p.bsk + (int64_t)t * (D / 16) + 16 * sb);
        }
        if (stw) hc_stamp(p, t, ck0, w == 1 ? 10 : 13);
    }
}

/* HC-pre (or the head's stream weighting) in one launch: block (s, t) takes
 * slice s of the flat (n_hc*D) state of token t and writes its sum of
 * squares (double) and its dot with each of the n_mix rows of fn to
 * hcs[t][s], hcp[t][s][o] (warp partials added in warp order); the last of
 * the token's blocks to finish (a counter that wraps back to 0) sums the
 * splits in split order and finishes (hc_finish). HC_THREADS threads;
 * dynamic shared: D floats. */
template <int WT, int HCN>
__global__ void __launch_bounds__(HC_THREADS) k_hc(const __grid_constant__ hc_fin p) {
    extern __shared__ float xs[];
    __shared__ float red[HC_THREADS / 32][HC_MAX_MIX + 1];
    __shared__ double redd[HC_THREADS / 32];
    __shared__ bool last;
    const int s = blockIdx.x, t = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int nflat = p.n_hc * p.D, n_split = p.n_split, n_mix = p.n_mix;
    const int e0 = (int)((int64_t)nflat * s / n_split), e1 = (int)((int64_t)nflat * (s + 1) / n_split);
    const long long ck0 = (p.diag & 256) ? clock64() : 0;
    if (p.pf && t == 0 && (int)threadIdx.x < n_mix) { /* the weights do not depend on the previous kernel */
        constexpr int es = WT == DS4_TYPE_F32 ? 4 : 2;
        cu_prefetch_l2(p.fn + ((int64_t)threadIdx.x * nflat + e0) * es, (size_t)(e1 - e0) * es);
    }
    cu_pdl_wait();
    const long long ck1 = (p.diag & 256) ? clock64() : 0;
    const float *x = p.X + (int64_t)t * nflat;
    float dot[HC_MAX_MIX];
#pragma unroll
    for (int o = 0; o < HC_MAX_MIX; o++) dot[o] = 0.0f;
    double ss = 0.0;
    for (int e = e0 + threadIdx.x; e < ((p.diag & 4) ? e0 : e1); e += blockDim.x) {
        float v;
        if (p.py) { /* k_hc_post's expressions for element e = (stream b, dim d) */
            const int D = p.D, hc = p.n_hc, b = e / D, d = e % D;
            const float *cm = p.pcomb + (int64_t)t * hc * hc;
            float acc = 0.0f;
            for (int s2 = 0; s2 < hc; s2++) acc = __fadd_rn(acc, __fmul_rn(cm[s2 * hc + b], x[(int64_t)s2 * D + d]));
            v = __fadd_rn(__fmul_rn(p.ppost[(int64_t)t * hc + b], p.py[(int64_t)t * D + d]), acc);
            p.xn[(int64_t)t * nflat + e] = v;
        } else {
            v = x[e];
        }
        ss += (double)v * (double)v;
#pragma unroll
        for (int o = 0; o < HC_MAX_MIX; o++) {
            if (o < n_mix) {
                float wv;
                if constexpr (WT == DS4_TYPE_F32) wv = ((const float *)p.fn)[(int64_t)o * nflat + e];
                else if constexpr (WT == DS4_TYPE_F16) wv = cu_h2f(((const uint16_t *)p.fn)[(int64_t)o * nflat + e]);
                else wv = __uint_as_float((uint32_t)((const uint16_t *)p.fn)[(int64_t)o * nflat + e] << 16);
                dot[o] = fmaf(wv, v, dot[o]);
            }
        }
    }
    if (p.bfly && n_mix > 8) {
        /* DS4_CUDA_HC_BFLY=1: the 32 warp sums (n_mix real, the rest 0) by
         * recursive halving: at offset 16 a lane keeps the half of the values
         * its bit 4 names and adds its partner's copy, and so on down to
         * offset 1, where lane o holds value o's sum. Each value is added in
         * the pairs of cu_warp_sum's xor tree (own + partner at offset 16, 8,
         * ..., 1), so the same bits, with 31 shuffles instead of 5 per value. */
        static_assert(HC_MAX_MIX == 32, "the halving reduces 32 values");
        /* (one array per width: an in-place loop over the widths puts dot[]
         * in local memory, nvcc 13.0) */
        const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4, b1 = lane & 2, b0 = lane & 1;
        float a16[16], a8[8], a4[4], a2[2];
#pragma unroll
        for (int i = 0; i < 16; i++)
            a16[i] = (b4 ? dot[16 + i] : dot[i]) + __shfl_xor_sync(0xffffffffu, b4 ? dot[i] : dot[16 + i], 16);
#pragma unroll
        for (int i = 0; i < 8; i++)
            a8[i] = (b3 ? a16[8 + i] : a16[i]) + __shfl_xor_sync(0xffffffffu, b3 ? a16[i] : a16[8 + i], 8);
#pragma unroll
        for (int i = 0; i < 4; i++)
            a4[i] = (b2 ? a8[4 + i] : a8[i]) + __shfl_xor_sync(0xffffffffu, b2 ? a8[i] : a8[4 + i], 4);
#pragma unroll
        for (int i = 0; i < 2; i++)
            a2[i] = (b1 ? a4[2 + i] : a4[i]) + __shfl_xor_sync(0xffffffffu, b1 ? a4[i] : a4[2 + i], 2);
        const float a1 = (b0 ? a2[1] : a2[0]) + __shfl_xor_sync(0xffffffffu, b0 ? a2[0] : a2[1], 1);
        if (lane < n_mix) red[w][lane] = a1;
    } else {
#pragma unroll
        for (int o = 0; o < HC_MAX_MIX; o++) {
            if (o < n_mix) {
                float v = cu_warp_sum(dot[o]);
                if (lane == 0) red[w][o] = v;
            }
        }
    }
    ss = cu_warp_sumd(ss);
    if (lane == 0) redd[w] = ss;
    __syncthreads();
    if (threadIdx.x < n_mix) {
        float v = 0.0f;
        for (int k = 0; k < nw; k++) v += red[k][threadIdx.x];
        p.hcp[((int64_t)t * n_split + s) * HC_MAX_MIX + threadIdx.x] = v;
    }
    if (threadIdx.x == 32) {
        double v = 0.0;
        for (int k = 0; k < nw; k++) v += redd[k];
        p.hcs[(int64_t)t * n_split + s] = v;
    }
    /* make the partials visible, then count this block in */
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicInc(p.cnt + t, (unsigned)(n_split - 1)) == (unsigned)(n_split - 1);
    __syncthreads();
    if (!last || (p.diag & 2)) return;
    /* DS4_CUDA_TAIL_TRIGGER=1: the other blocks have finished their part;
     * the next kernel's blocks may now be placed and prefetch their weights
     * to L2 while this block finishes (they wait in cu_pdl_wait for it) */
    if (p.trig) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    __threadfence();
    if (threadIdx.x == 0) {
        hc_stamp(p, t, ck0, 1);
        if ((p.diag & 256) && t == 0 && p.n == 1 && !p.head) {
            atomicAdd(&cu_hc_clk[0], (unsigned long long)(ck1 - ck0));
            atomicAdd(&cu_hc_clk[HC_CLK_N - 1], 1ull);
        }
    }
    hc_finish<HCN>(p, t, xs, ck0);
}

/* ---- HC for batches: the partials of many tokens per block, then the finishes.
 *
 * k_hc recomputes nothing across tokens but re-reads the mixer weights and
 * spends most of its time in warp shuffles (24 warp sums per warp per
 * token). For a batch, k_hc_part computes exactly k_hc's partials for a
 * tile of HCB_TT tokens and one split, with another schedule of the same
 * operations: when a split has at most HC_THREADS elements (nflat / n_split
 * <= 512, checked by the launcher) thread tid of k_hc holds one product,
 * fmaf(w, x, 0) (0 past the split's end); its warp sum is the butterfly
 * tree, which one thread rebuilds from the 32 lane values arriving in
 * bit-reversed lane order (cu_bfly_push, mma.cuh: the pairing of
 * cu_warp_sum); the 16 warp sums are added in warp order from 0, as k_hc.
 * The sums of squares the same way in double. Thread (t, k) of a warp takes
 * token t of a pair and virtual warp k: the shared layouts [.][k][33] make
 * both operand reads conflict-free. k_hc_fin then runs hc_finish per
 * token (the code k_hc's last block runs), so a batch gives the bits of
 * single-token steps. */
#define HCB_TT 16
#define HCB_MIN_N 8
static_assert(HC_THREADS == 512 && HCB_TT == 16, "k_hc_part: 16 virtual warps, 8 warps of 2 tokens");

static size_t hcb_smem(int n_mix) {
    return (size_t)(HCB_TT * 16 * 33 + n_mix * 16 * 33 + HCB_TT * n_mix * 17) * sizeof(float) +
           (size_t)HCB_TT * 17 * sizeof(double);
}

template <int WT>
__global__ void __launch_bounds__(256) k_hc_part(const __grid_constant__ hc_fin p) {
    cu_pdl_wait();
    extern __shared__ __align__(16) float hsm[];
    const int s = blockIdx.x, t0 = blockIdx.y * HCB_TT, n_mix = p.n_mix, n_split = p.n_split;
    const int nflat = p.n_hc * p.D, nt = p.n - t0 < HCB_TT ? p.n - t0 : HCB_TT;
    const int e0 = (int)((int64_t)nflat * s / n_split), e1 = (int)((int64_t)nflat * (s + 1) / n_split);
    float *xs = hsm;                        /* [HCB_TT][16][33] */
    float *ws = xs + HCB_TT * 16 * 33;      /* [n_mix][16][33] */
    float *red = ws + n_mix * 16 * 33;      /* [HCB_TT][n_mix][17] */
    double *redd = (double *)(red + HCB_TT * n_mix * 17); /* [HCB_TT][17] */
    for (int i = threadIdx.x; i < HCB_TT * HC_THREADS; i += blockDim.x) {
        const int t = i / HC_THREADS, v = i % HC_THREADS, e = e0 + v;
        xs[(t * 16 + v / 32) * 33 + v % 32] = t < nt && e < e1 ? p.X[(int64_t)(t0 + t) * nflat + e] : 0.0f;
    }
    for (int i = threadIdx.x; i < n_mix * HC_THREADS; i += blockDim.x) {
        const int o = i / HC_THREADS, v = i % HC_THREADS, e = e0 + v;
        float wv = 0.0f;
        if (e < e1) {
            if constexpr (WT == DS4_TYPE_F32) wv = ((const float *)p.fn)[(int64_t)o * nflat + e];
            else if constexpr (WT == DS4_TYPE_F16) wv = cu_h2f(((const uint16_t *)p.fn)[(int64_t)o * nflat + e]);
            else wv = __uint_as_float((uint32_t)((const uint16_t *)p.fn)[(int64_t)o * nflat + e] << 16);
        }
        ws[(o * 16 + v / 32) * 33 + v % 32] = wv;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, t = 2 * (threadIdx.x >> 5) + (lane >> 4), k = lane & 15;
    const float *xr = xs + (t * 16 + k) * 33;
    for (int og = 0; og < n_mix; og += 4) {
        float a[4], lvl[5][4];
#pragma unroll
        for (int m = 0; m < 32; m++) {
            const int l = mm_br5(m);
            const float xv = xr[l];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = og + i < n_mix ? fmaf(ws[((og + i) * 16 + k) * 33 + l], xv, 0.0f) : 0.0f;
            cu_bfly_push<4, float>(m, a, lvl);
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (og + i < n_mix) red[(t * n_mix + og + i) * 17 + k] = a[i];
    }
    {
        double a[1], lvl[5][1];
#pragma unroll
        for (int m = 0; m < 32; m++) {
            const double v = (double)xr[mm_br5(m)];
            a[0] = v * v; /* exact: k_hc's first (only) term, 0 + v * v */
            cu_bfly_push<1, double>(m, a, lvl);
        }
        redd[t * 17 + k] = a[0];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nt * n_mix; i += blockDim.x) {
        const int tt = i / n_mix, o = i % n_mix;
        float v = 0.0f;
        for (int w = 0; w < HC_THREADS / 32; w++) v = __fadd_rn(v, red[(tt * n_mix + o) * 17 + w]);
        p.hcp[((int64_t)(t0 + tt) * n_split + s) * HC_MAX_MIX + o] = v;
    }
    for (int tt = threadIdx.x; tt < nt; tt += blockDim.x) {
        double v = 0.0;
        for (int w = 0; w < HC_THREADS / 32; w++) v = __dadd_rn(v, redd[tt * 17 + w]);
        p.hcs[(int64_t)(t0 + tt) * n_split + s] = v;
    }
}

template <int HCN>
__global__ void __launch_bounds__(HC_THREADS) k_hc_fin(const __grid_constant__ hc_fin p) {
    cu_pdl_wait();
    extern __shared__ float xs[];
    hc_finish<HCN>(p, blockIdx.x, xs);
}

__global__ void k_hc_post(const float *y, const float *post, const float *comb, float *X, int n, int D, int hc);

/* hc_pre and the head's first half: partial products + finish. */
static void hc_mix(cu_ctx *c, const ds4_model *m, const ds4_weight *fn, int n_mix, const float *X, int n,
                   const float *scale, const float *base, const float *norm_w, float *out, float *post, float *comb,
                   bool head, const cu_act *q0, const cu_act *qk, const float *py = nullptr,
                   const float *ppost = nullptr, const float *pcomb = nullptr) {
    const ds4_hparams *hp = &m->hp;
    const int nflat = hp->n_hc * hp->n_embd;
    int split = c->hc_split;
    if (nflat / split < HC_THREADS) split = nflat / HC_THREADS > 0 ? nflat / HC_THREADS : 1;
    if (split > HC_MAX_SPLIT) split = HC_MAX_SPLIT;
    hc_fin p;
    memset(&p, 0, sizeof p);
    p.X = X;
    p.fn = (const uint8_t *)fn->data;
    p.n_mix = n_mix;
    p.hcp = c->s.hcp;
    p.hcs = c->s.hcs;
    p.cnt = c->s.hcc;
    p.n_split = split;
    p.n_hc = hp->n_hc;
    p.D = hp->n_embd;
    p.sinkhorn = hp->sinkhorn_iters;
    p.rms_eps = hp->rms_eps;
    p.hc_eps = hp->hc_eps;
    p.scale = scale;
    p.base = base;
    p.norm_w = norm_w;
    p.out = out;
    p.post = post;
    p.comb = comb;
    p.head = head;
    p.diag = c->hc_diag;
    /* DS4_CUDA_HC_WPRE=1: that prefetch without the early trigger */
    p.pf = (c->early_trigger || c->hc_wpre) && !c->no_prefetch && !c->no_pdl;
    p.bfly = c->hc_bfly;
    p.fin2 = c->hc_fin2;
    /* (the staged norm weights double the dynamic shared memory: up to 32 KB,
     * beside k_hc's ~11 KB static, within the 48 KB of a plain launch) */
    p.fin3 = (size_t)2 * hp->n_embd * sizeof(float) <= 32 * 1024 ? c->hc_fin3 : 0;
    p.trig = c->tail_trig && !c->no_pdl && !c->early_trigger && !head; /* (not before the 0.5 GB vocabulary head) */
    const int D = hp->n_embd;
    const bool qok = D % 256 == 0 && (size_t)n * D <= c->s.h0.cap;
    p.q0 = q0 && qok ? q0->q : nullptr;
    p.d0 = q0 && qok ? q0->d : nullptr;
    p.qk = qk && qok ? qk->q : nullptr;
    p.dk = qk && qok ? qk->d : nullptr;
    p.bsk = qk && qok ? qk->bs : nullptr;
    p.n = n;
    dim3 g(split, n);
    const size_t sm = (size_t)D * sizeof(float) * (p.fin3 ? 2 : 1); /* xs (+ the staged norm weights) */
    /* batches: partials of HCB_TT tokens per block, then the finishes (same bits) */
    const bool batch = n >= HCB_MIN_N && !c->no_hc_batch && !(p.diag & ~256) && (nflat + split - 1) / split <= HC_THREADS;
    /* the comb left to a later kernel (DS4_CUDA_COMB_HOST=1, few tokens): the
     * next q/kv finish or router launch takes it (a spare block runs
     * hc_comb_run), else cu_comb_flush launches it before its first
     * possible reader; the same inputs and code, off the critical path */
    cu_comb_flush(c); /* (none is pending here: every vtable entry to HC-pre flushed) */
    if (c->comb_host && comb && !head && !batch && !(p.diag & ~256) && n <= 8 && hp->n_hc * hp->n_hc <= 32)
        p.cin = c->s.cin; /* the job is recorded once k_hc is launched */
    /* the previous HC-post inside k_hc (few tokens), else its own kernel first */
    if (py) {
        if (!batch && !(p.diag & 6) && !c->no_hc_fuse && hp->n_hc <= 4 && hp->n_embd <= 8 * HC_THREADS &&
            (size_t)n * nflat <= c->s.xn_cap) {
            p.py = py;
            p.ppost = ppost;
            p.pcomb = pcomb;
            p.xn = c->s.xn;
            p.Xw = (float *)X;
        } else {
            cu_launch(c, k_hc_post, cu_div_up((int64_t)n * hp->n_embd, 256), 256, 0, py, ppost, pcomb, (float *)X, n,
                      hp->n_embd, hp->n_hc);
            CU_LAUNCH(c, "hc_post");
        }
    }
#define HC_LAUNCH(T)                                                                                    \
    if (batch) {                                                                                        \
        cudaFuncSetAttribute(k_hc_part<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)hcb_smem(n_mix)); \
        cu_launch(c, k_hc_part<T>, dim3(split, cu_div_up(n, HCB_TT)), 256, hcb_smem(n_mix), p);      \
        CU_LAUNCH(c, "hc_part");                                                                        \
        if (hp->n_hc == 4) cu_launch(c, k_hc_fin<4>, dim3(n), HC_THREADS, sm, p);                       \
        else cu_launch(c, k_hc_fin<0>, dim3(n), HC_THREADS, sm, p);                                     \
    } else if (hp->n_hc == 4) {                                                                         \
        cu_launch(c, k_hc<T, 4>, g, HC_THREADS, sm, p);                                                 \
    } else {                                                                                            \
        cu_launch(c, k_hc<T, 0>, g, HC_THREADS, sm, p);                                                 \
    }
    switch (fn->type) {
    case DS4_TYPE_F32: HC_LAUNCH(DS4_TYPE_F32); break;
    case DS4_TYPE_F16: HC_LAUNCH(DS4_TYPE_F16); break;
    case DS4_TYPE_BF16: HC_LAUNCH(DS4_TYPE_BF16); break;
    default: cu_fail(c, DS4_E_INTERNAL, "cuda: HC weight '%s' of type %s", fn->name, ds4_type_name(fn->type)); return;
    }
#undef HC_LAUNCH
    const bool trig_pf = p.trig && !batch && !c->err; /* (cu_launch cleared pf_next) */
    CU_LAUNCH(c, batch ? "hc_fin" : "hc");
    if (p.cin && !c->err) c->comb_job = cu_comb_job{c->s.cin, comb, n, hp->n_hc, hp->sinkhorn_iters, hp->hc_eps};
    if (trig_pf) c->pf_next = 1; /* the next matvec prefetches its weights before its wait */
    /* the projections that read `out` take these codes instead of
     * quantizing it again (cu_mv_pair, cu_moe_experts) */
    if (p.q0) cu_preq_set(c, out, n, D, D, DS4_TYPE_Q8_0, q0);
    if (p.qk) cu_preq_set(c, out, n, D, D, DS4_TYPE_Q8_K, qk);
}

/* DS4_CUDA_HC_DIAG bit 256: the phase clocks of k_hc's last block, token 0,
 * mean over the calls (stderr, at backend close) */
void cu_hc_clk_print(cu_ctx *c) {
    unsigned long long v[HC_CLK_N];
    if (cudaMemcpyFromSymbol(v, cu_hc_clk, sizeof v) != cudaSuccess || !v[HC_CLK_N - 1]) return;
    int khz = 0;
    cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, c->device);
    static const char *const name[HC_CLK_N - 1] = {
        "pdl wait done", "last block known", "streams loaded", "split sums", "stream weights",
        "w0 weighted sum", "w0 comb done", "w1 norm start", "w1 rn", "w1 normed+q8_0", "w1 q8_k",
        "wN norm start", "wN normed+q8_0", "wN q8_k", "w0 comb pass 1", "w1 norm pass 1", "", "", ""};
    const double n = (double)v[HC_CLK_N - 1];
    fprintf(stderr, "ds4: HC-pre phase clocks (k_hc's last block, one-token calls: %.0f; cycles since the block's "
                    "start, us at %d MHz):\n", n, khz / 1000);
    for (int i = 0; i < HC_CLK_N - 1; i++)
        if (v[i]) fprintf(stderr, "  %-18s %9.0f %7.2f\n", name[i], v[i] / n, khz ? v[i] / n / (khz / 1000.0) : 0.0);
}

cu_comb_job cu_comb_take(cu_ctx *c) {
    const cu_comb_job j = c->comb_job;
    c->comb_job.n = 0;
    return j;
}

void cu_comb_flush(cu_ctx *c) {
    if (!c->comb_job.n) return;
    const cu_comb_job j = cu_comb_take(c);
    if (c->err) return; /* a failed step: nothing more runs */
    cu_launch(c, k_hc_comb, j.n, 32, 0, j);
    CU_LAUNCH(c, "hc_comb");
}

int cu_hc_pre(void *ctx, const ds4_hc_pre_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    const int hc = a->m->hp.n_hc;
    cu_preq_clear(c);
    hc_mix(c, a->m, a->fn, (2 + hc) * hc, a->X, a->n, a->scale, a->base, a->norm_w, a->out, a->post, a->comb, false,
           &c->s.h0, &c->s.hk, a->py, a->ppost, a->pcomb);
    return c->err;
}

/* X_b <- post_b * y + sum_a comb[a][b] X_a for one (t, d) per thread. */
__global__ void k_hc_post(const float *y, const float *post, const float *comb, float *X, int n, int D, int hc) {
    cu_pdl_wait();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)n * D) return;
    const int t = (int)(i / D), d = (int)(i % D);
    float old[8];
    float *Xt = X + (int64_t)t * hc * D;
    for (int s = 0; s < hc; s++) old[s] = Xt[(int64_t)s * D + d];
    const float *cm = comb + (int64_t)t * hc * hc;
    const float yv = y[i];
    for (int b = 0; b < hc; b++) {
        float acc = 0.0f;
        for (int s = 0; s < hc; s++) acc = __fadd_rn(acc, __fmul_rn(cm[s * hc + b], old[s]));
        Xt[(int64_t)b * D + d] = __fadd_rn(__fmul_rn(post[(int64_t)t * hc + b], yv), acc);
    }
}

int cu_hc_post(void *ctx, const ds4_hc_post_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    cu_preq_clear(c);
    const ds4_hparams *hp = &a->m->hp;
    int64_t items = (int64_t)a->n * hp->n_embd;
    cu_launch(c, k_hc_post, cu_div_up(items, 256), 256, 0, a->y, a->post, a->comb, a->X, a->n, hp->n_embd, hp->n_hc);
    CU_LAUNCH(c, "hc_post");
    return c->err;
}

/* ---------------------------------------------------------------- q / kv */

/* RMSNorm of rows of n values in place (one block per row); with q != NULL
 * also the Q8_0 codes of the normalised rows (n % 32 == 0, scales d) for
 * the next projection (rows_rmsnorm_body, rowops.cuh). */
__global__ void __launch_bounds__(256) k_rows_rmsnorm(float *x, int64_t ld, int n, const float *w, float eps,
                                                      int8_t *q, float *d, int reg) {
    extern __shared__ float row[];
    __shared__ double red[32];
    rows_rmsnorm_body(blockIdx.x, x, ld, n, w, eps, q, d, reg, row, red);
}

/* Per-head query finish: unweighted RMSNorm + RoPE on the last n_rot dims
 * at position pos0 + t. One warp per (t, h); dh <= 1024. */
__device__ __forceinline__ void q_heads_body(int blk, float *q, int n, int H, int dh, int n_rot, const float *inv_freq,
                                             float eps, const ds4_step *step) {
    const int64_t wid = ((int64_t)blk * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (wid >= (int64_t)n * H) return;
    const int t = (int)(wid / H);
    float *qh = q + wid * dh;
    double ss = 0.0;
    for (int i = lane; i < dh; i += 32) ss += (double)qh[i] * (double)qh[i];
    ss = cu_warp_sumd(ss);
    float r = 1.0f / sqrtf((float)(ss / dh) + eps);
    for (int i = lane; i < dh; i += 32) qh[i] = __fmul_rn(qh[i], r);
    __syncwarp();
    const int pos = step->pos0 + t;
    for (int i = lane; i < n_rot / 2; i += 32) cu_rope_pair(qh + dh - n_rot, i, inv_freq, pos, false);
}

/* KV row finish (cpu kv_row_finish): RMSNorm_w, RoPE at pos0 + t, FP8 of
 * the nope dims, half rounding. One block per token; shared: 2*dh floats. */
__device__ __forceinline__ void kv_finish_body(int t, float *kv, int dh, int n_rot, const float *norm_w, float eps,
                                               const float *inv_freq, bool fp8, bool f16, const ds4_step *step) {
    extern __shared__ float sm[];
    __shared__ double red[32];
    float *row = sm, *fred = sm + dh;
    float *x = kv + (int64_t)t * dh;
    for (int i = threadIdx.x; i < dh; i += blockDim.x) row[i] = x[i];
    __syncthreads();
    cu_row_rmsnorm(row, dh, norm_w, eps, red);
    cu_row_rope(row + dh - n_rot, n_rot, inv_freq, step->pos0 + t, false);
    if (fp8) cu_row_fp8(row, dh - n_rot, 64, fred);
    if (f16) cu_row_f16(row, dh);
    for (int i = threadIdx.x; i < dh; i += blockDim.x) x[i] = row[i];
}

/* DS4_CUDA_ROWNORM_REG=1 forms of the two bodies above: the same operations
 * in the same order, with each thread's values (and the norm weights) loaded
 * at once into registers and the RoPE angles of the rotated pairs (pos0,
 * inv_freq, cos, sin) taken while the loads are in flight, instead of one
 * round trip per loop step. Need dh <= 32 * QRK (q heads), dh <= 256 * KRK
 * (kv row, 256 threads), n_rot / 2 <= 32 (q) or <= blockDim (kv). */
#define QRK 16
#define KRK 4
__device__ __forceinline__ void q_heads_body_reg(int blk, float *q, int n, int H, int dh, int n_rot,
                                                 const float *inv_freq, float eps, const ds4_step *step) {
    const int64_t wid = ((int64_t)blk * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (wid >= (int64_t)n * H) return;
    const int t = (int)(wid / H);
    float *qh = q + wid * dh;
    float v[QRK];
#pragma unroll
    for (int k = 0; k < QRK; k++) {
        const int i = lane + 32 * k;
        v[k] = i < dh ? qh[i] : 0.0f;
    }
    const bool rp = lane < n_rot / 2;
    float cs = 0.0f, sn = 0.0f;
    if (rp) { /* cu_rope_pair's angle of pair `lane` */
        const float th = __fmul_rn((float)(step->pos0 + t), inv_freq[lane]);
        cs = cosf(th);
        sn = sinf(th);
    }
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < QRK; k++)
        if (lane + 32 * k < dh) ss += (double)v[k] * (double)v[k];
    ss = cu_warp_sumd(ss);
    float r = 1.0f / sqrtf((float)(ss / dh) + eps);
#pragma unroll
    for (int k = 0; k < QRK; k++)
        if (lane + 32 * k < dh) qh[lane + 32 * k] = __fmul_rn(v[k], r);
    __syncwarp();
    if (rp) {
        float *z = qh + dh - n_rot;
        const float x0 = z[2 * lane], x1 = z[2 * lane + 1];
        z[2 * lane] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
        z[2 * lane + 1] = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(x0, sn));
    }
}

__device__ __forceinline__ void kv_finish_body_reg(int t, float *kv, int dh, int n_rot, const float *norm_w, float eps,
                                                   const float *inv_freq, bool fp8, bool f16, const ds4_step *step) {
    extern __shared__ float sm[];
    __shared__ double red[32];
    float *row = sm, *fred = sm + dh;
    float *x = kv + (int64_t)t * dh;
    float xv[KRK], wv[KRK];
#pragma unroll
    for (int k = 0; k < KRK; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        xv[k] = i < dh ? x[i] : 0.0f;
        wv[k] = norm_w && i < dh ? norm_w[i] : 1.0f;
    }
    const bool rp = (int)threadIdx.x < n_rot / 2;
    float cs = 0.0f, sn = 0.0f;
    if (rp) {
        const float th = __fmul_rn((float)(step->pos0 + t), inv_freq[threadIdx.x]);
        cs = cosf(th);
        sn = sinf(th);
    }
    /* cu_row_rmsnorm */
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < KRK; k++)
        if (threadIdx.x + k * blockDim.x < dh) ss += (double)xv[k] * (double)xv[k];
    ss = cu_block_sumd(ss, red);
    float r = 1.0f / sqrtf((float)(ss / dh) + eps);
#pragma unroll
    for (int k = 0; k < KRK; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < dh) {
            const float v = __fmul_rn(xv[k], r);
            xv[k] = norm_w ? __fmul_rn(wv[k], v) : v;
            row[i] = xv[k];
        }
    }
    __syncthreads();
    /* cu_row_rope */
    if (rp) {
        float *z = row + dh - n_rot;
        const int i = threadIdx.x;
        const float x0 = z[2 * i], x1 = z[2 * i + 1];
        z[2 * i] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
        z[2 * i + 1] = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(x0, sn));
    }
    const int nn = dh - n_rot;
    if (!(fp8 && nn % 64 == 0 && blockDim.x % 64 == 0)) {
        __syncthreads();
        if (fp8) cu_row_fp8(row, nn, 64, fred);
        if (f16) cu_row_f16(row, dh);
        for (int i = threadIdx.x; i < dh; i += blockDim.x) x[i] = row[i];
        return;
    }
    /* cu_row_fp8 of the nope dims (untouched by the RoPE) from the registers:
     * a 64-value block is warps 2j and 2j+1 of one k, so its amax is two warp
     * maxima (max is exact in any order; fabsf leaves no -0 and fmaxf skips
     * NaN as the shared-memory tree does) joined through shared memory */
    __shared__ float g32[KRK][32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    float am[KRK];
#pragma unroll
    for (int k = 0; k < KRK; k++) am[k] = threadIdx.x + k * blockDim.x < nn ? fabsf(xv[k]) : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int k = 0; k < KRK; k++) am[k] = fmaxf(am[k], __shfl_xor_sync(0xffffffffu, am[k], o));
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < KRK; k++) g32[k][w] = am[k];
    __syncthreads(); /* also the RoPE's */
#pragma unroll
    for (int k = 0; k < KRK; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nn) {
            const float v = cu_fp8_value(xv[k], fmaxf(g32[k][w & ~1], g32[k][w | 1]));
            x[i] = f16 ? __half2float(__float2half_rn(v)) : v;
        } else if (i < dh) {
            const float v = row[i];
            x[i] = f16 ? __half2float(__float2half_rn(v)) : v;
        }
    }
}

/* q heads (blocks < qb; rows of H heads of dh values) and kv rows (block
 * qb + t); both read the kv/q projections only, so they share a launch.
 * Shared: 2*dh floats (kv rows). */
__global__ void __launch_bounds__(256) k_q_kv_finish(float *q, int n, int H, float eps, int qb, float *kv, int dh,
                                                     int n_rot, const float *norm_w, const float *inv_freq, bool fp8,
                                                     bool f16, const ds4_step *step, const __grid_constant__ cu_comb_job cj,
                                                     int reg) {
    cu_pdl_wait();
    if (reg) {
        if ((int)blockIdx.x < qb) q_heads_body_reg(blockIdx.x, q, n, H, dh, n_rot, inv_freq, eps, step);
        else if ((int)blockIdx.x < qb + n)
            kv_finish_body_reg(blockIdx.x - qb, kv, dh, n_rot, norm_w, eps, inv_freq, fp8, f16, step);
        else if (threadIdx.x < 32) hc_comb_run(cj, blockIdx.x - qb - n);
        return;
    }
    if ((int)blockIdx.x < qb) q_heads_body(blockIdx.x, q, n, H, dh, n_rot, inv_freq, eps, step);
    else if ((int)blockIdx.x < qb + n) kv_finish_body(blockIdx.x - qb, kv, dh, n_rot, norm_w, eps, inv_freq, fp8, f16, step);
    else if (threadIdx.x < 32) hc_comb_run(cj, blockIdx.x - qb - n); /* HC-pre's comb (DS4_CUDA_COMB_HOST=1) */
}

int cu_attn_project(void *ctx, const ds4_attn_project_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int n = a->n, D = hp->n_embd, dh = hp->head_dim, H = hp->n_head, ql = hp->q_lora;
    const bool aq = a->num.act_quant;
    const bool qa_codes = aq && !c->no_preq && cu_act_type(l->q_b.type) == DS4_TYPE_Q8_0 && ql % 32 == 0 &&
                          (size_t)n * ql <= c->s.a1.cap;
    /* q_a and kv read the same normed input */
    cu_mv_pair(c, &l->q_a, a->cq, ql, &l->kv, a->kv, dh, a->u, D, n, aq, &c->s.a1, a->step, 0);
    cu_launch(c, k_rows_rmsnorm, n, 256, (size_t)ql * sizeof(float), a->cq, ql, ql, l->q_a_norm, hp->rms_eps,
              qa_codes ? c->s.a1.q : (int8_t *)nullptr, qa_codes ? c->s.a1.d : (float *)nullptr, c->rownorm_reg);
    CU_LAUNCH(c, "q_a_norm");
    /* DS4_CUDA_IDX_FORK=1: the indexer's query path may start here
     * (cu_indexer_select_j); only this layer's event is ever waited on */
    c->qa_live = false;
    if (c->idx_fork && c->st4 && n <= 4) c->qa_live = cu_ok(c, cudaEventRecord(c->ev_qa, c->st), "indexer fork");
    if (qa_codes) cu_preq_set(c, a->cq, n, ql, ql, DS4_TYPE_Q8_0, &c->s.a1);
    /* DS4_CUDA_COMB_BIG=1: the attention's HC-pre comb, if left for later, is
     * offered to the q_b matvec (one token: k_matvec_q8r's block 0, ~13 us of
     * weight streaming to hide the ~7 us Sinkhorn behind); not taken, it
     * falls to the q/kv finish below as by default */
    if (c->comb_big && n == 1) c->mv_cj = cu_comb_take(c);
    cu_mv_pair(c, &l->q_b, a->q, (int64_t)H * dh, nullptr, nullptr, 0, a->cq, ql, n, aq, &c->s.a1, a->step, 0);
    if (c->mv_cj.n) {
        c->comb_job = c->mv_cj;
        c->mv_cj = cu_comb_job{};
    }
    /* the query heads and the kv rows finish in one launch: blocks [0, qb)
     * take 8 (token, head) warps each, the next n blocks one kv row each */
    const int qb = cu_div_up((int64_t)n * H * 32, 256);
    const cu_comb_job cj = cu_comb_take(c); /* the attention's HC-pre comb, if left for later */
    cu_launch(c, k_q_kv_finish, qb + n + cj.n, 256, (size_t)2 * dh * sizeof(float), a->q, n, H, hp->rms_eps, qb, a->kv,
              dh, hp->n_rot, l->kv_norm, a->rope->inv_freq, a->num.fp8_kv, a->num.f16_cache, a->step, cj,
              (int)(c->rownorm_reg && dh <= 32 * QRK && dh <= 256 * KRK && hp->n_rot / 2 <= 32));
    CU_LAUNCH(c, "q_kv_finish");
    return c->err;
}

/* ---------------------------------------------------------------- kv store */

template <typename T>
__global__ void k_kv_store(const float *kv, T *raw, int n, int dh, int W, const ds4_step *step) {
    cu_pdl_wait();
    const int t0 = n > W ? n - W : 0;
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)(n - t0) * dh) return;
    const int t = t0 + (int)(i / dh), e = (int)(i % dh);
    raw[(int64_t)((step->pos0 + t) % W) * dh + e] = cu_to_row<T>(kv[(int64_t)t * dh + e]);
}

int cu_kv_store(void *ctx, const ds4_kv_store_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    /* stored by the attention's merge already (the default; DS4_CUDA_KV_IN_MERGE=0: not) */
    const cu_kv_fused kf = c->kv_fused;
    c->kv_fused = cu_kv_fused{};
    if (kf.raw && kf.raw == a->raw && kf.kv == a->kv && kf.n == a->n && kf.pos0 == a->pos0) return 0;
    const ds4_hparams *hp = &a->m->hp;
    const int n = a->n, W = hp->window, dh = hp->head_dim, nt = n > W ? W : n;
    int64_t items = (int64_t)nt * dh;
    if (a->row_type == DS4_TYPE_F16)
        cu_launch(c, k_kv_store<__half>, cu_div_up(items, 256), 256, 0, a->kv, (__half *)a->raw, n, dh, W, a->step);
    else
        cu_launch(c, k_kv_store<float>, cu_div_up(items, 256), 256, 0, a->kv, (float *)a->raw, n, dh, W, a->step);
    CU_LAUNCH(c, "kv_store");
    return c->err;
}

/* ---------------------------------------------------------------- attention */

struct attn_p {
    const float *q;          /* (n, H, dh) */
    const float *kv;         /* (n, dh) batch rows, f32 */
    const void *raw;         /* ring (W, dh), T */
    const void *comp;        /* (cap, dh), T */
    const int32_t *sel, *n_sel;
    const float *sinks;
    const float *inv_freq;
    float *o;                /* (n, H, dh) */
    float *part_o;           /* (n_sub, S, H, dh) split outputs */
    float *part_m, *part_l;  /* (n_sub, S, H) split maxima and sums */
    const ds4_step *step;
    int t0;                  /* first token of this launch */
    int S;                   /* split stride of the partial buffers */
    int H, dh, W, n_rot, kind, ratio, topk;
    float scale;
    int8_t *oq;              /* optional Q8_0 codes of o (n, H*dh), scales od */
    float *od;
    int att_r4;              /* k_attn_part's four-rows-per-warp phases (same bits; DS4_CUDA_NO_ATT_R4=1: off) */
    int att_bfly;            /* the four rows' score sums by recursive halving (same bits; DS4_CUDA_ATT_BFLY) */
    void *st_raw;            /* by default the ring the merge stores the batch's kv rows into (the
                              * kv_store stage then has nothing left to do), else NULL */
    int st_f16;              /* its rows are half (else f32) */
    int st_t0;               /* first token stored (n > W: only the last W) */
    int zb;                  /* k_attn_part: splits per block (DS4_CUDA_ATT_ZB with 16 heads per block; else 1) */
    int mreg;                /* k_attn_merge: loads at once (DS4_CUDA_MERGE_REG=1, same values) */
};

/* Rows a token attends: its raw window (ring rows, or this batch's kv for
 * positions >= pos0), then its compressed rows (all of them for HCA, the
 * indexer's selection for CSA). */
struct attn_rows {
    int P, lo, n_raw, n;
    const int32_t *sel;
};

__device__ __forceinline__ attn_rows attn_rows_of(const attn_p &p, int t) {
    attn_rows r;
    r.P = p.step->pos0 + t;
    r.lo = r.P - p.W + 1 > 0 ? r.P - p.W + 1 : 0;
    r.n_raw = r.P - r.lo + 1;
    r.sel = nullptr;
    int n_comp = 0;
    if (p.kind == DS4_ATTN_HCA) n_comp = (r.P + 1) / p.ratio;
    else if (p.kind == DS4_ATTN_CSA) {
        n_comp = p.n_sel[t];
        r.sel = p.sel + (int64_t)t * p.topk;
    }
    r.n = r.n_raw + n_comp;
    return r;
}

/* Where row r of the token's list lives: -1 - i for row i of this batch's
 * kv (positions >= pos0), the ring slot for older raw rows, W + the
 * compressed row's index after them. */
__device__ __forceinline__ int64_t attn_row_off(const attn_p &p, const attn_rows &ar, int r, int pos0) {
    if (r < ar.n_raw) {
        const int pos = ar.lo + r;
        return pos >= pos0 ? -1 - (int64_t)(pos - pos0) : (int64_t)(pos % p.W);
    }
    const int k = r - ar.n_raw;
    return p.W + (int64_t)(ar.sel ? ar.sel[k] : k);
}

#define ATT_R 32    /* rows per split: one split per block, one lane per row */
#define ATT_MAXK 2  /* head_dim <= 256 * ATT_MAXK */

/* RH: the staged rows kept as half in shared memory (f16 rows only: the
 * ring and compressed rows are half, and this batch's kv rows are
 * f16-exact, as prefill == decode needs), read back as the same floats:
 * half the rows' shared memory, so more blocks fit on an SM (default;
 * DS4_CUDA_ATT_RH=0 stages f32) */
template <bool RH> struct ap_rows {
    float *f;
    __device__ __forceinline__ float get(int i) const {
        if constexpr (RH) return __half2float(((const __half *)f)[i]);
        else return f[i];
    }
    __device__ __forceinline__ void put4(int i, float4 v) const {
        if constexpr (RH) {
            __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
            uint2 u;
            u.x = *(unsigned *)&a;
            u.y = *(unsigned *)&b;
            *(uint2 *)((__half *)f + i) = u;
        } else
            *(float4 *)(f + i) = v;
    }
    __device__ __forceinline__ float *end(int n) const { return RH ? (float *)((__half *)f + n) : f + n; }
};

/* The phases of one split (ATT_R rows of a token for HB heads), shared by
 * k_attn_part and k_attn_fused so that both compute a split's (m, l, c)
 * with the same operations. Phase 0 (ap_stage): the rows to shared memory
 * as f32, or as half with RH (all loads in flight); phase 1 (ap_scores):
 * warps take rows, lanes dims, HB scores per row; phase 2 (ap_softmax): warp
 * h the local maximum m and e = exp(s - m), l = sum e over the split;
 * phase 3 (ap_values): thread dims tid, tid+256: c = sum e * v in row order.
 * Every thread of the block calls each phase; the caller syncs between. */
template <typename T, bool RH>
__device__ __forceinline__ void ap_stage(const attn_p &p, const ap_rows<RH> &rs, const int64_t *ro, int nr, int dh,
                                         const T *raw, const T *comp) {
    /* 4 values per load, LB loads in flight */
    constexpr int LB = 8;
    const int d4 = dh / 4, n_u = nr * d4;
    for (int u0 = threadIdx.x; u0 < n_u; u0 += LB * blockDim.x) {
        float4 v[LB];
#pragma unroll
        for (int k = 0; k < LB; k++) {
            const int u = u0 + k * blockDim.x;
            if (u < n_u) {
                const int r = u / d4, e = (u % d4) * 4;
                const int64_t o = ro[r];
                if (o < 0) v[k] = *(const float4 *)(p.kv + (-1 - o) * dh + e);
                else {
                    const T *src = o < p.W ? raw + o * dh + e : comp + (o - p.W) * dh + e;
                    if constexpr (sizeof(T) == 2) {
                        uint2 b = *(const uint2 *)src;
                        __half2 a0 = *(__half2 *)&b.x, a1 = *(__half2 *)&b.y;
                        float2 f0 = __half22float2(a0), f1 = __half22float2(a1);
                        v[k] = make_float4(f0.x, f0.y, f1.x, f1.y);
                    } else
                        v[k] = *(const float4 *)src;
                }
            }
        }
#pragma unroll
        for (int k = 0; k < LB; k++) {
            const int u = u0 + k * blockDim.x;
            if (u < n_u) rs.put4((u / d4) * dh + (u % d4) * 4, v[k]);
        }
    }
}

/* phase 1: scores into sc (HB x ATT_R). Warp w takes rows w, w + 8, w + 16,
 * w + 24 at once: the HB query values of a dim are loaded once for the four
 * rows (was once per row: ~1 shared load per fma), and each (row, head) sum
 * still runs over its dims in the same order, so the bits do not change
 * (default since measured: +3.9% prefill; DS4_CUDA_NO_ATT_R4=1 gives the
 * row-at-a-time loop) */
template <int HB, bool RH>
__device__ __forceinline__ void ap_scores(const attn_p &p, const float *qs, const ap_rows<RH> &rs, float *sc, int nr,
                                          int dh, int lane, int w) {
    const int per = dh / 32;
    if (!p.att_r4) {
        for (int r = w; r < nr; r += 8) {
            float part[HB];
#pragma unroll
            for (int h = 0; h < HB; h++) part[h] = 0.0f;
            for (int k = 0; k < per; k++) {
                const int e = lane + 32 * k;
                const float v = rs.get(r * dh + e);
#pragma unroll
                for (int h = 0; h < HB; h++) part[h] = fmaf(qs[h * dh + e], v, part[h]);
            }
#pragma unroll
            for (int h = 0; h < HB; h++) {
                float s = cu_warp_sum(part[h]);
                if (lane == 0) sc[h * ATT_R + r] = s * p.scale;
            }
        }
    } else {
        static_assert(ATT_R == 32, "k_attn_part: 4 rows per warp of 8");
        float part[4][HB];
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int h = 0; h < HB; h++) part[j][h] = 0.0f;
        for (int k = 0; k < per; k++) {
            const int e = lane + 32 * k;
            float qv[HB];
#pragma unroll
            for (int h = 0; h < HB; h++) qv[h] = qs[h * dh + e];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int r = w + 8 * j;
                if (r < nr) {
                    const float v = rs.get(r * dh + e);
#pragma unroll
                    for (int h = 0; h < HB; h++) part[j][h] = fmaf(qv[h], v, part[j][h]);
                }
            }
        }
        if (p.att_bfly) {
            /* DS4_CUDA_ATT_BFLY=1: the 4 x HB warp sums by recursive halving
             * (cu_warp_sums_halving: the same pairs, so the same bits), in
             * sets of at most 32 values (value v = 4-row index j * HB + h);
             * lane l ends with value l >> (5 - log2 N) of its set and the
             * first lane of each value stores it */
            constexpr int N = 4 * HB > 32 ? 32 : 4 * HB, NS = 4 * HB / N, SH = N == 32 ? 0 : N == 16 ? 1 : N == 8 ? 2 : 3;
            static_assert(4 * HB % N == 0 && (N >> (5 - SH)) == 1, "ap_scores: HB a power of two from 1 to 16");
#pragma unroll
            for (int q = 0; q < NS; q++) {
                float a[N];
#pragma unroll
                for (int i = 0; i < N; i++) a[i] = part[(q * N + i) / HB][(q * N + i) % HB];
                const float s = cu_warp_sums_halving<N>(a, lane);
                const int v = q * N + (lane >> SH), j = v / HB, h = v % HB, r = w + 8 * j;
                if ((lane & ((1 << SH) - 1)) == 0 && r < nr) sc[h * ATT_R + r] = s * p.scale;
            }
            return;
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int r = w + 8 * j;
            if (r < nr)
#pragma unroll
                for (int h = 0; h < HB; h++) {
                    float s = cu_warp_sum(part[j][h]);
                    if (lane == 0) sc[h * ATT_R + r] = s * p.scale;
                }
        }
    }
}

/* phase 2 for head hh (one warp): its scores become e = exp(s - m) in
 * place; m and l (the sum of e) in every lane */
__device__ __forceinline__ void ap_softmax(float *sc, int hh, int nr, int lane, float *m_out, float *l_out) {
    const float s = lane < nr ? sc[hh * ATT_R + lane] : -INFINITY;
    const float m = cu_warp_max(s);
    const float e = lane < nr ? expf(s - m) : 0.0f;
    if (lane < nr) sc[hh * ATT_R + lane] = e;
    *m_out = m;
    *l_out = cu_warp_sum(e);
}

/* phase 3: acc = sum over the split's rows of e * v, in row order (acc
 * starts at 0); the weights of 4 rows of a head in one 16-byte shared load
 * (was one load per row and head), the same fma order */
template <int HB, bool RH>
__device__ __forceinline__ void ap_values(const attn_p &p, const ap_rows<RH> &rs, const float *sc, int nr, int dh,
                                          float (&acc)[HB][ATT_MAXK]) {
#pragma unroll
    for (int h = 0; h < HB; h++)
#pragma unroll
        for (int k = 0; k < ATT_MAXK; k++) acc[h][k] = 0.0f;
    int r = 0;
    if (p.att_r4)
        for (; r + 4 <= nr; r += 4) {
            float4 e4[HB];
#pragma unroll
            for (int h = 0; h < HB; h++) e4[h] = *(const float4 *)(sc + h * ATT_R + r);
#pragma unroll
            for (int k = 0; k < ATT_MAXK; k++) {
                const int e = threadIdx.x + 256 * k;
                if (e < dh) {
                    const float v0 = rs.get(r * dh + e), v1 = rs.get((r + 1) * dh + e), v2 = rs.get((r + 2) * dh + e),
                                v3 = rs.get((r + 3) * dh + e);
#pragma unroll
                    for (int h = 0; h < HB; h++) {
                        float a = fmaf(e4[h].x, v0, acc[h][k]);
                        a = fmaf(e4[h].y, v1, a);
                        a = fmaf(e4[h].z, v2, a);
                        acc[h][k] = fmaf(e4[h].w, v3, a);
                    }
                }
            }
        }
    for (; r < nr; r++) {
#pragma unroll
        for (int k = 0; k < ATT_MAXK; k++) {
            const int e = threadIdx.x + 256 * k;
            if (e < dh) {
                const float v = rs.get(r * dh + e);
#pragma unroll
                for (int h = 0; h < HB; h++) acc[h][k] = fmaf(sc[h * ATT_R + r], v, acc[h][k]);
            }
        }
    }
}

/* the HB heads' queries of token t to shared memory: contiguous, float4
 * loads, LB in flight per thread before the shared stores (a load -> store
 * loop would wait for each load in turn) */
template <int HB>
__device__ __forceinline__ void ap_stage_q(const attn_p &p, float *qs, int t, int h0, int dh) {
    constexpr int LB = 8;
    const float4 *qg = (const float4 *)(p.q + ((int64_t)t * p.H + h0) * dh);
    const int n4 = HB * dh / 4;
    for (int i0 = threadIdx.x; i0 < n4; i0 += LB * blockDim.x) {
        float4 v[LB];
#pragma unroll
        for (int k = 0; k < LB; k++)
            if (i0 + k * (int)blockDim.x < n4) v[k] = qg[i0 + k * blockDim.x];
#pragma unroll
        for (int k = 0; k < LB; k++)
            if (i0 + k * (int)blockDim.x < n4) ((float4 *)qs)[i0 + k * blockDim.x] = v[k];
    }
}

/* Split attention (flash-decoding): block (head group x, token y, split z)
 * takes rows [z*ATT_R, z*ATT_R + ATT_R) of the token's rows for HB heads
 * (the phases above); (m, l, c) go to the partial buffers and k_attn_merge
 * combines the splits in split order. The split of a row depends only on
 * its index, so a token's result is the same in any batch (prefill ==
 * decode, bit for bit).
 * Shared: HB*dh (q) floats, ATT_R*dh rows (floats, halves with RH), HB*ATT_R
 * scores, ATT_R offsets (attn_part_smem). */
template <typename T, int HB, int DHC, bool MZ, bool RH = false>
__global__ void __launch_bounds__(256, MZ ? 2 : 0) k_attn_part(const __grid_constant__ attn_p p) {
    static_assert(!RH || sizeof(T) == 2, "k_attn_part: half staged rows for half rows only");
    cu_pdl_wait();
    extern __shared__ float sm[];
    const int dh = DHC ? DHC : p.dh; /* DHC: the head size as a constant (index arithmetic folded), 0 = p.dh */
    float *qs = sm;                       /* HB x dh */
    const ap_rows<RH> rs{qs + HB * dh};   /* ATT_R x dh */
    float *sc = rs.end(ATT_R * dh);       /* HB x ATT_R */
    int64_t *ro = (int64_t *)(sc + HB * ATT_R);
    const int tl = blockIdx.y, t = p.t0 + tl, h0 = blockIdx.x * HB;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const attn_rows ar = attn_rows_of(p, t);
    /* MZ: splits blockIdx.z * zb .. + zb - 1 in turn (DS4_CUDA_ATT_ZB: the
     * queries staged once for zb splits; each split computed and written
     * exactly as alone); else split blockIdx.z alone, as before */
    const int zb = MZ && p.zb > 1 ? p.zb : 1;
    int z = (int)blockIdx.z * zb, r0 = z * ATT_R;
    if (r0 >= ar.n) return;
    int nr = ar.n - r0 < ATT_R ? ar.n - r0 : ATT_R;
    const int pos0 = p.step->pos0;
    if (threadIdx.x < nr) ro[threadIdx.x] = attn_row_off(p, ar, r0 + threadIdx.x, pos0);
    ap_stage_q<HB>(p, qs, t, h0, dh);
    __syncthreads();
    const T *raw = (const T *)p.raw, *comp = (const T *)p.comp;
    for (int zz = 0;;) {
    ap_stage<T, RH>(p, rs, ro, nr, dh, raw, comp);
    __syncthreads();
    ap_scores<HB, RH>(p, qs, rs, sc, nr, dh, lane, w);
    __syncthreads();
    /* one warp per head (warp w takes heads w, w + 8, ...: with HB = 16 a
     * block's 8 warps take two each) */
    for (int hh = w; hh < HB; hh += (int)(blockDim.x >> 5)) {
        float m, l;
        ap_softmax(sc, hh, nr, lane, &m, &l);
        if (lane == 0) {
            const int64_t i = ((int64_t)tl * p.S + z) * p.H + h0 + hh;
            p.part_m[i] = m;
            p.part_l[i] = l;
        }
    }
    __syncthreads();
    float acc[HB][ATT_MAXK];
    ap_values<HB, RH>(p, rs, sc, nr, dh, acc);
#pragma unroll
    for (int k = 0; k < ATT_MAXK; k++) {
        const int e = threadIdx.x + 256 * k;
        if (e < dh)
#pragma unroll
            for (int h = 0; h < HB; h++) p.part_o[(((int64_t)tl * p.S + z) * p.H + h0 + h) * dh + e] = acc[h][k];
    }
    /* the next split of this block (MZ), the same for all its threads */
    if (!MZ || ++zz >= zb) break;
    z++;
    r0 += ATT_R;
    if (r0 >= ar.n) break;
    nr = ar.n - r0 < ATT_R ? ar.n - r0 : ATT_R;
    __syncthreads(); /* this split's reads of ro, rs and sc are done */
    if (threadIdx.x < nr) ro[threadIdx.x] = attn_row_off(p, ar, r0 + threadIdx.x, pos0);
    __syncthreads();
    } /* splits */
}

/* ------------------------------------------- attention on tensor cores */

/* The same split attention (rows [32z, 32z + 32) of a token per block, the
 * same (m, l, c) partials for k_attn_merge) with both products on TF32
 * tensor cores (mma m16n8k8, f32 accumulation), all heads of a block at
 * once: MQA gives every head the same rows, so the scores of HB heads are
 * Q (HB x dh) . R^T (dh x 32) and the split outputs P (HB x 32) . R (32 x dh).
 * f32 operands are split in two TF32 parts, x = big + small, exact to
 * ~2^-22 |x| (3xTF32 with the small x small product left out): f16 rows
 * (release numerics) are exact in TF32 and take one part, so a score is
 * Qb.R + Qs.R and an output Pb.R + Ps.R; f32 rows add Qb.Rs (Pb.Rs).
 * Each output tile is computed by one warp in a fixed order (scores: two
 * halves of dh, each its own k order, added half 0 + half 1; outputs: the
 * 32 rows in 4 k-steps), independent of HB and of the batch, so prefill ==
 * decode == chunked stays bit for bit. Opt-in (DS4_CUDA_ATT_TC=1): on the
 * H200 it measured prefill 1,278 -> 1,525 tok/s and decode +3.6% (q2, 2k),
 * as accurate as k_attn_part against transformers on the plain fixtures, but
 * on one release fixture (tiny_yarn_48_release) its last-bit differences
 * flipped an FP4/int8 rounding and then a top-k decision from position ~39
 * on where k_attn_part happens not to: by the rule that a faster path flips
 * no decision on the oracle fixtures, it is not the default (dev/cuda_notes). */
#define ATC_PS 36 /* score / weight row stride in floats: conflict-free fragments */

__device__ __forceinline__ unsigned atc_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}
/* x = big + small: x - big is exact in f32 */
__device__ __forceinline__ void atc_split(float x, unsigned &b, unsigned &s) {
    b = atc_tf32(x);
    s = atc_tf32(x - __uint_as_float(b));
}
__device__ __forceinline__ void atc_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Shared layouts. f32 rows of dh values (queries; rows when T = float): 4-value
 * groups XOR-swizzled within 32 values, so that the two fragment patterns
 * (8 rows x 4 columns and 4 rows x 8 columns) both hit 32 banks. f16 rows:
 * 8-value groups swizzled within 64 values (the same property per word). */
__device__ __forceinline__ int atc_i32(int r, int d, int dh) {
    return r * dh + (d ^ (8 * (r & 3) + 4 * ((r >> 2) & 1)));
}
__device__ __forceinline__ int atc_i16(int r, int d, int dh) { return r * dh + (d ^ (8 * (r & 7))); }

template <typename T> struct atc_rows;
template <> struct atc_rows<__half> {
    static __device__ __forceinline__ float get(const void *rs, int r, int d, int dh) {
        return __half2float(((const __half *)rs)[atc_i16(r, d, dh)]);
    }
};
template <> struct atc_rows<float> {
    static __device__ __forceinline__ float get(const void *rs, int r, int d, int dh) {
        return ((const float *)rs)[atc_i32(r, d, dh)];
    }
};

/* acc (+)= A . B for one m16n8k8 step: A split in two parts; B split when
 * it is f32 (T = float), exact otherwise */
template <typename T>
__device__ __forceinline__ void atc_step(float (&cb)[4], float (&cs)[4], const unsigned (&ab)[4],
                                         const unsigned (&as)[4], float b0, float b1) {
    if constexpr (sizeof(T) == 2) {
        atc_mma(cb, ab, __float_as_uint(b0), __float_as_uint(b1));
        atc_mma(cs, as, __float_as_uint(b0), __float_as_uint(b1));
    } else {
        unsigned bb0, bs0, bb1, bs1;
        atc_split(b0, bb0, bs0);
        atc_split(b1, bb1, bs1);
        atc_mma(cb, ab, bb0, bb1);
        atc_mma(cs, as, bb0, bb1);
        atc_mma(cs, ab, bs0, bs1);
    }
}

static size_t attn_tc_smem(int hb, int dh, size_t row_bytes) {
    return (size_t)hb * dh * 4 + (size_t)ATT_R * dh * row_bytes + (size_t)3 * hb * ATC_PS * 4 + ATT_R * sizeof(int64_t);
}

/* block (head group x, token y, split z), 256 threads; HB heads (16, 32 or
 * 64; heads past H are zeros and not written). Shared: queries HB x dh f32,
 * rows 32 x dh T, two score halves and the weights HB x ATC_PS, offsets. */
template <typename T, int HB>
__global__ void __launch_bounds__(256) k_attn_tc(const __grid_constant__ attn_p p) {
    cu_pdl_wait();
    extern __shared__ float sm[];
    const int dh = p.dh;
    float *qs = sm;                                         /* HB x dh */
    T *rs = (T *)(qs + HB * dh);                            /* ATT_R x dh */
    float *sc0 = (float *)(rs + ATT_R * dh);                /* HB x ATC_PS: score half 0 */
    float *sc1 = sc0 + HB * ATC_PS;                         /* half 1 */
    float *pw = sc1 + HB * ATC_PS;                          /* weights e */
    int64_t *ro = (int64_t *)(pw + HB * ATC_PS);
    const int tl = blockIdx.y, t = p.t0 + tl, h0 = blockIdx.x * HB, z = blockIdx.z;
    const int hv = p.H - h0 < HB ? p.H - h0 : HB;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, tg = lane & 3;
    const attn_rows ar = attn_rows_of(p, t);
    const int r0 = z * ATT_R;
    if (r0 >= ar.n) return;
    const int nr = ar.n - r0 < ATT_R ? ar.n - r0 : ATT_R;
    const int pos0 = p.step->pos0;
    if (threadIdx.x < ATT_R) /* past the split's rows: zeros */
        ro[threadIdx.x] = threadIdx.x < nr ? attn_row_off(p, ar, r0 + threadIdx.x, pos0) : INT64_MIN;
    constexpr int LB = 8; /* loads in flight per thread before the shared stores */
    { /* queries: 4-value groups, zeros past head H */
        const float *qg = p.q + ((int64_t)t * p.H + h0) * dh;
        const int d4 = dh / 4, n4 = HB * d4;
        for (int i0 = threadIdx.x; i0 < n4; i0 += LB * blockDim.x) {
            float4 v[LB];
#pragma unroll
            for (int k = 0; k < LB; k++) {
                const int i = i0 + k * blockDim.x;
                v[k] = make_float4(0.f, 0.f, 0.f, 0.f);
                if (i < n4 && i / d4 < hv) v[k] = *(const float4 *)(qg + (int64_t)i * 4);
            }
#pragma unroll
            for (int k = 0; k < LB; k++) {
                const int i = i0 + k * blockDim.x;
                if (i < n4) *(float4 *)(qs + atc_i32(i / d4, (i % d4) * 4, dh)) = v[k];
            }
        }
    }
    __syncthreads();
    { /* rows: f16 rows in 8-value groups, f32 rows in 4-value groups */
        const T *raw = (const T *)p.raw, *comp = (const T *)p.comp;
        constexpr int G = sizeof(T) == 2 ? 8 : 4;
        const int dg = dh / G, n_u = ATT_R * dg;
        for (int u0 = threadIdx.x; u0 < n_u; u0 += LB * blockDim.x) {
            uint4 v[LB];
#pragma unroll
            for (int k = 0; k < LB; k++) {
                const int u = u0 + k * blockDim.x;
                v[k] = make_uint4(0, 0, 0, 0);
                if (u < n_u) {
                    const int r = u / dg, e = (u % dg) * G;
                    const int64_t o = ro[r];
                    if (o == INT64_MIN) continue;
                    if (o < 0) { /* this batch's row, f32 (f16-exact when T = __half) */
                        const float *src = p.kv + (-1 - o) * dh + e;
                        if constexpr (sizeof(T) == 2) {
                            const float4 a = *(const float4 *)src, b = *(const float4 *)(src + 4);
                            __half2 h[4] = {__floats2half2_rn(a.x, a.y), __floats2half2_rn(a.z, a.w),
                                            __floats2half2_rn(b.x, b.y), __floats2half2_rn(b.z, b.w)};
                            v[k] = *(uint4 *)h;
                        } else
                            v[k] = *(const uint4 *)src;
                    } else {
                        const T *src = o < p.W ? raw + o * dh + e : comp + (o - p.W) * dh + e;
                        v[k] = *(const uint4 *)src;
                    }
                }
            }
#pragma unroll
            for (int k = 0; k < LB; k++) {
                const int u = u0 + k * blockDim.x;
                if (u < n_u) {
                    const int r = u / dg, e = (u % dg) * G;
                    *(uint4 *)(rs + (sizeof(T) == 2 ? atc_i16(r, e, dh) : atc_i32(r, e, dh))) = v[k];
                }
            }
        }
    }
    __syncthreads();
    /* scores: units (16-head tile, 8-row tile, half of dh), one per warp */
    {
        const int KH = dh / 16; /* k-steps per half */
        for (int u = w; u < (HB / 16) * 8; u += 8) {
            const int mt = u >> 3, nt = (u >> 1) & 3, kh = u & 1;
            const int h = 16 * mt + g, r = 8 * nt + g;
            float cb[4] = {0.f, 0.f, 0.f, 0.f}, cs[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
            for (int ks = kh * KH; ks < kh * KH + KH; ks++) {
                const int d = 8 * ks + tg;
                unsigned ab[4], as[4];
                atc_split(qs[atc_i32(h, d, dh)], ab[0], as[0]);
                atc_split(qs[atc_i32(h + 8, d, dh)], ab[1], as[1]);
                atc_split(qs[atc_i32(h, d + 4, dh)], ab[2], as[2]);
                atc_split(qs[atc_i32(h + 8, d + 4, dh)], ab[3], as[3]);
                atc_step<T>(cb, cs, ab, as, atc_rows<T>::get(rs, r, d, dh), atc_rows<T>::get(rs, r, d + 4, dh));
            }
            float *o = kh ? sc1 : sc0;
            const int c = 8 * nt + 2 * tg;
            o[h * ATC_PS + c] = cb[0] + cs[0];
            o[h * ATC_PS + c + 1] = cb[1] + cs[1];
            o[(h + 8) * ATC_PS + c] = cb[2] + cs[2];
            o[(h + 8) * ATC_PS + c + 1] = cb[3] + cs[3];
        }
    }
    __syncthreads();
    /* split maximum and sum, one warp per head, lane = row */
    for (int h = w; h < HB; h += 8) {
        float s = -INFINITY;
        if (h < hv && lane < nr) s = (sc0[h * ATC_PS + lane] + sc1[h * ATC_PS + lane]) * p.scale;
        const float m = cu_warp_max(s);
        const float e = h < hv && lane < nr ? expf(s - m) : 0.0f;
        pw[h * ATC_PS + lane] = e;
        const float l = cu_warp_sum(e);
        if (lane == 0 && h < hv) {
            const int64_t i = ((int64_t)tl * p.S + z) * p.H + h0 + h;
            p.part_m[i] = m;
            p.part_l[i] = l;
        }
    }
    __syncthreads();
    /* outputs: (16-head tile, 8-dim tile) units, 8 dim tiles per warp at once,
     * k = the 32 rows in 4 steps */
    const int NT = dh / 8;
    for (int mt = 0; mt < HB / 16 && 16 * mt < hv; mt++) {
        unsigned ab[4][4], as[4][4];
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            const int h = 16 * mt + g, r = 8 * ks + tg;
            atc_split(pw[h * ATC_PS + r], ab[ks][0], as[ks][0]);
            atc_split(pw[(h + 8) * ATC_PS + r], ab[ks][1], as[ks][1]);
            atc_split(pw[h * ATC_PS + r + 4], ab[ks][2], as[ks][2]);
            atc_split(pw[(h + 8) * ATC_PS + r + 4], ab[ks][3], as[ks][3]);
        }
        for (int nt0 = w; nt0 < NT; nt0 += 64) {
            float cb[8][4], cs[8][4];
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) cb[j][i] = cs[j][i] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < 4; ks++)
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const int d = 8 * (nt0 + 8 * j) + g;
                    if (d < dh)
                        atc_step<T>(cb[j], cs[j], ab[ks], as[ks], atc_rows<T>::get(rs, 8 * ks + tg, d, dh),
                                    atc_rows<T>::get(rs, 8 * ks + tg + 4, d, dh));
                }
            const int h = 16 * mt + g;
            float *po = p.part_o + (((int64_t)tl * p.S + z) * p.H + h0) * dh;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int d = 8 * (nt0 + 8 * j) + 2 * tg;
                if (d >= dh) continue;
                if (h < hv) *(float2 *)(po + (int64_t)h * dh + d) = make_float2(cb[j][0] + cs[j][0], cb[j][1] + cs[j][1]);
                if (h + 8 < hv)
                    *(float2 *)(po + (int64_t)(h + 8) * dh + d) = make_float2(cb[j][2] + cs[j][2], cb[j][3] + cs[j][3]);
            }
        }
    }
}

/* Merge of the splits of head blockIdx.x of token t0 + blockIdx.y, in split
 * order: M = max(sink, m_z), w_z = exp(m_z - M), den = sum_z l_z w_z +
 * exp(sink - M), o = (sum_z w_z c_z) / den; then the inverse RoPE.
 * 256 threads; shared: dh floats + the split weights. */
/* gridDim.z > 1 (the default; DS4_CUDA_NO_MERGE_SLICES=1: one block per head): block z merges
 * dims [z * dh / gridDim.z, (z + 1) * dh / gridDim.z) of the head, with the
 * split maxima and sums read into shared memory first (every block computes
 * the same M and den, in the same order) and 16 split outputs in flight per
 * dim (SL: launch bounds that leave the registers to hold them; one warp's
 * loads are issued together): the same operations per value as the
 * unsliced kernel (SL false, launched with gridDim.z = 1), where one block and
 * one thread's chain of dependent global loads per head walk all splits
 * (260 of them per HCA head at 1M context). The launcher slices only when the
 * RoPE dims and the Q8_0 blocks of o lie inside one slice each. */
template <bool SL, bool ON = false>
__global__ void __launch_bounds__(256, SL ? 1 : 0) k_attn_merge(const __grid_constant__ attn_p p) {
    /* DS4_CUDA_MERGE_REG=1: the RoPE threads' inverse frequencies first (they
     * do not depend on the previous kernel); below, the kv row's values all
     * loaded before they are stored */
    const int half = p.n_rot / 2;
    const float ifq = p.mreg && (int)threadIdx.x < half ? p.inv_freq[threadIdx.x] : 0.0f;
    cu_pdl_wait();
    /* the kv row of token t into the ring (k_kv_store's values): the
     * partial kernel of this chunk of tokens, and of every earlier chunk,
     * has finished reading the ring; later chunks read it after this store,
     * but the slot (pos0 + t) % W held position pos0 + t - W, which no later
     * token of the batch attends (its window starts above it) */
    if (p.st_raw && blockIdx.x == 0 && blockIdx.z == 0 && p.t0 + (int)blockIdx.y >= p.st_t0) {
        const int tt = p.t0 + blockIdx.y;
        const float *src = p.kv + (int64_t)tt * p.dh;
        const int64_t slot = (int64_t)((p.step->pos0 + tt) % p.W) * p.dh;
        constexpr int SK = 8;
        if (p.mreg && p.dh <= SK * (int)blockDim.x) {
            float v[SK];
#pragma unroll
            for (int k = 0; k < SK; k++) {
                const int e = threadIdx.x + k * blockDim.x;
                v[k] = e < p.dh ? src[e] : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < SK; k++) {
                const int e = threadIdx.x + k * blockDim.x;
                if (e < p.dh) {
                    if (p.st_f16) ((__half *)p.st_raw)[slot + e] = cu_to_row<__half>(v[k]);
                    else ((float *)p.st_raw)[slot + e] = cu_to_row<float>(v[k]);
                }
            }
        } else {
            for (int e = threadIdx.x; e < p.dh; e += blockDim.x) {
                if (p.st_f16) ((__half *)p.st_raw)[slot + e] = cu_to_row<__half>(src[e]);
                else ((float *)p.st_raw)[slot + e] = cu_to_row<float>(src[e]);
            }
        }
    }
    extern __shared__ float ms[];
    float *os = ms;            /* dh */
    float *wz = ms + p.dh;     /* S */
    float *lz = wz + p.S;      /* S (sliced, or ON) */
    float *wa = lz + p.S;      /* S (ON: a_z) */
    float *wb = wa + p.S;      /* S (ON: b_z) */
    __shared__ float red[32];
    __shared__ float den_s;
    const int h = blockIdx.x, tl = blockIdx.y, t = p.t0 + tl, dh = p.dh;
    const bool sliced = SL && gridDim.z > 1;
    const int e_lo = blockIdx.z * (dh / gridDim.z), e_hi = e_lo + dh / gridDim.z;
    const attn_rows ar = attn_rows_of(p, t);
    const int nz = (ar.n + ATT_R - 1) / ATT_R;
    const int64_t b = (int64_t)tl * p.S * p.H + h;
    const float sink = p.sinks[h];
    if constexpr (ON) {
        /* the online merge (DS4_CUDA_ATT_ONLINE): with M_-1 = sink, D_-1 = 1
         * and for z in order M_z = max(M_z-1, m_z), a_z = exp(M_z-1 - M_z),
         * b_z = exp(m_z - M_z), D_z = b_z l_z + D_z-1 a_z (fmaf of b_z l_z onto
         * the rounded product), and per dim A_z = b_z c_z + A_z-1 a_z alike;
         * o = A / D. M_z is the prefix maximum (exact in any order: one warp
         * scans, each lane a run of splits), a_z and b_z are then independent,
         * D runs on thread 0, A per dim below: k_attn_fused's operations */
        for (int z = threadIdx.x; z < nz; z += blockDim.x) {
            wz[z] = p.part_m[b + (int64_t)z * p.H];
            lz[z] = p.part_l[b + (int64_t)z * p.H];
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            const int lane = threadIdx.x, per = (nz + 31) / 32, za = lane * per, zb = za + per < nz ? za + per : nz;
            float run = -INFINITY;
            for (int z = za; z < zb; z++) run = fmaxf(run, wz[z]);
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float u = __shfl_up_sync(0xffffffffu, run, o);
                if (lane >= o) run = fmaxf(run, u);
            }
            const float before = __shfl_up_sync(0xffffffffu, run, 1);
            float M = lane ? fmaxf(sink, before) : sink;
            for (int z = za; z < zb; z++) {
                const float m = wz[z], Mn = fmaxf(M, m);
                wa[z] = expf(M - Mn);
                wb[z] = expf(m - Mn);
                M = Mn;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float d = 1.0f;
            for (int z = 0; z < nz; z++) d = fmaf(wb[z], lz[z], __fmul_rn(d, wa[z]));
            den_s = d;
        }
        __syncthreads();
    } else {
        float mx = sink;
        if (sliced) {
            for (int z = threadIdx.x; z < nz; z += blockDim.x) {
                const float m = p.part_m[b + (int64_t)z * p.H];
                wz[z] = m;
                lz[z] = p.part_l[b + (int64_t)z * p.H];
                mx = fmaxf(mx, m);
            }
        } else {
#pragma unroll 4
            for (int z = threadIdx.x; z < nz; z += blockDim.x) mx = fmaxf(mx, p.part_m[b + (int64_t)z * p.H]);
        }
        mx = cu_warp_max(mx);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
        __syncthreads();
        if (threadIdx.x < 32) {
            float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : -INFINITY;
            v = cu_warp_max(v);
            if (threadIdx.x == 0) red[0] = v;
        }
        __syncthreads();
        const float M = red[0];
        for (int z = threadIdx.x; z < nz; z += blockDim.x) wz[z] = expf((sliced ? wz[z] : p.part_m[b + (int64_t)z * p.H]) - M);
        __syncthreads();
        if (threadIdx.x == 0) {
            float d = 0.0f;
#pragma unroll 8
            for (int z = 0; z < nz; z++) d = fmaf(sliced ? lz[z] : p.part_l[b + (int64_t)z * p.H], wz[z], d);
            den_s = d + expf(sink - M);
        }
        __syncthreads();
    }
    const float den = den_s;
    const int lo = sliced ? e_lo : 0, hi = sliced ? e_hi : dh;
    constexpr int NG = SL ? 16 : 8;
    for (int e = lo + threadIdx.x; e < hi; e += blockDim.x) {
        /* the split outputs in groups of NG loads, added in z order */
        float acc = 0.0f;
        for (int z0 = 0; z0 < nz; z0 += NG) {
            float v[NG];
#pragma unroll
            for (int k = 0; k < NG; k++) v[k] = z0 + k < nz ? p.part_o[(b + (int64_t)(z0 + k) * p.H) * dh + e] : 0.0f;
#pragma unroll
            for (int k = 0; k < NG; k++)
                if (z0 + k < nz) {
                    if constexpr (ON) acc = fmaf(wb[z0 + k], v[k], __fmul_rn(acc, wa[z0 + k]));
                    else acc = fmaf(wz[z0 + k], v[k], acc);
                }
        }
        os[e] = acc / den;
    }
    __syncthreads();
    if (!sliced || e_hi == dh) { /* the RoPE dims (n_rot <= 128): all in the last slice */
        if (p.mreg && half <= (int)blockDim.x) {
            if ((int)threadIdx.x < half) { /* cu_rope_pair(.., inverse) with the frequency loaded early */
                const int j = threadIdx.x;
                float *z = os + dh - p.n_rot;
                const float th = __fmul_rn((float)ar.P, ifq);
                const float cs = cosf(th), sn = -sinf(th);
                const float x0 = z[2 * j], x1 = z[2 * j + 1];
                z[2 * j] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
                z[2 * j + 1] = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(x0, sn));
            }
        } else {
            for (int j = threadIdx.x; j < half; j += blockDim.x) cu_rope_pair(os + dh - p.n_rot, j, p.inv_freq, ar.P, true);
        }
    }
    __syncthreads();
    for (int e = lo + threadIdx.x; e < hi; e += blockDim.x) p.o[((int64_t)t * p.H + h) * dh + e] = os[e];
    if (p.oq) { /* the Q8_0 codes of o for the output projection (rows of H*dh) */
        const int64_t o0 = ((int64_t)t * p.H + h) * dh;
        for (int b = lo / 32 + (threadIdx.x >> 5); b < hi / 32; b += blockDim.x >> 5)
            cu_warp_q8_0(os[32 * b + (threadIdx.x & 31)], p.oq + o0 + 32 * b, p.od + o0 / 32 + b);
    }
}

/* Attention of a batch with the splits merged inside the kernel
 * (the default online merge, batches on the CUDA-core path;
 * DS4_CUDA_ATT_ONLINE=0 keeps the two-pass merge). Block (head group x, token y) walks the token's splits in
 * order, each with k_attn_part's phases (the same (m, l, c) bits), and
 * folds split z into its running state at once, as the online merge of
 * k_attn_merge<ON> does with the partials of decode: M = max(M, m_z),
 * a = exp(M_old - M), b = exp(m_z - M), D = fmaf(b, l_z, D * a), A_e =
 * fmaf(b, c_z,e, A_e * a), from M = sink, D = 1, A = 0; then o = A / D, the
 * inverse RoPE and the Q8_0 codes of o as the merge. Nothing goes through
 * the partial buffers (a 2,048-token CSA chunk: ~5.4 GB written and read
 * back per layer), and the queries are staged once per token, not once per
 * split. The kv rows are left to the kv_store stage: a token's ring slot
 * still holds a row that earlier tokens of the same launch attend.
 * Shared: attn_part_smem's + 4 floats per head (M, D, a, b). */
#ifndef CU_ATT_FUSED_MINB
#define CU_ATT_FUSED_MINB 0 /* blocks per SM its registers must allow (build option) */
#endif
template <typename T, int HB, int DHC, bool RH>
__global__ void __launch_bounds__(256, CU_ATT_FUSED_MINB) k_attn_fused(const __grid_constant__ attn_p p) {
    static_assert(!RH || sizeof(T) == 2, "k_attn_fused: half staged rows for half rows only");
    cu_pdl_wait();
    extern __shared__ float sm[];
    const int dh = DHC ? DHC : p.dh;
    float *qs = sm;                       /* HB x dh; at the end o */
    const ap_rows<RH> rs{qs + HB * dh};   /* ATT_R x dh */
    float *sc = rs.end(ATT_R * dh);       /* HB x ATT_R */
    int64_t *ro = (int64_t *)(sc + HB * ATT_R);
    float *st = (float *)(ro + ATT_R);    /* HB x (M, D, a, b) */
    const int tl = blockIdx.y, t = p.t0 + tl, h0 = blockIdx.x * HB;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const attn_rows ar = attn_rows_of(p, t);
    const int pos0 = p.step->pos0;
    const T *raw = (const T *)p.raw, *comp = (const T *)p.comp;
    if ((int)threadIdx.x < HB) {
        st[4 * threadIdx.x] = p.sinks[h0 + threadIdx.x];
        st[4 * threadIdx.x + 1] = 1.0f;
    }
    ap_stage_q<HB>(p, qs, t, h0, dh);
    float A[HB][ATT_MAXK];
#pragma unroll
    for (int h = 0; h < HB; h++)
#pragma unroll
        for (int k = 0; k < ATT_MAXK; k++) A[h][k] = 0.0f;
    for (int r0 = 0; r0 < ar.n; r0 += ATT_R) {
        const int nr = ar.n - r0 < ATT_R ? ar.n - r0 : ATT_R;
        if ((int)threadIdx.x < nr) ro[threadIdx.x] = attn_row_off(p, ar, r0 + threadIdx.x, pos0);
        __syncthreads();
        ap_stage<T, RH>(p, rs, ro, nr, dh, raw, comp);
        __syncthreads();
        ap_scores<HB, RH>(p, qs, rs, sc, nr, dh, lane, w);
        __syncthreads();
        for (int hh = w; hh < HB; hh += (int)(blockDim.x >> 5)) {
            float m, l;
            ap_softmax(sc, hh, nr, lane, &m, &l);
            if (lane == 0) {
                float *x = st + 4 * hh;
                const float M = x[0], Mn = fmaxf(M, m), a = expf(M - Mn), b = expf(m - Mn);
                x[0] = Mn;
                x[1] = fmaf(b, l, __fmul_rn(x[1], a));
                x[2] = a;
                x[3] = b;
            }
        }
        __syncthreads();
        float c[HB][ATT_MAXK];
        ap_values<HB, RH>(p, rs, sc, nr, dh, c);
#pragma unroll
        for (int h = 0; h < HB; h++) {
            const float a = st[4 * h + 2], b = st[4 * h + 3];
#pragma unroll
            for (int k = 0; k < ATT_MAXK; k++) A[h][k] = fmaf(b, c[h][k], __fmul_rn(A[h][k], a));
        }
        __syncthreads(); /* this split's reads of ro, rs, sc and st are done */
    }
    /* o = A / D into shared memory (over the queries), the inverse RoPE of
     * each head's last n_rot dims, then o and its Q8_0 codes out */
#pragma unroll
    for (int k = 0; k < ATT_MAXK; k++) {
        const int e = threadIdx.x + 256 * k;
        if (e < dh)
#pragma unroll
            for (int h = 0; h < HB; h++) qs[h * dh + e] = A[h][k] / st[4 * h + 1];
    }
    __syncthreads();
    const int half = p.n_rot / 2;
    for (int i = threadIdx.x; i < HB * half; i += blockDim.x)
        cu_rope_pair(qs + (i / half) * dh + dh - p.n_rot, i % half, p.inv_freq, ar.P, true);
    __syncthreads();
    const int64_t o0 = ((int64_t)t * p.H + h0) * dh; /* the HB heads' o are contiguous */
    for (int i = threadIdx.x; i < HB * dh / 4; i += blockDim.x) ((float4 *)(p.o + o0))[i] = ((const float4 *)qs)[i];
    if (p.oq)
        for (int b = w; b < HB * dh / 32; b += blockDim.x >> 5)
            cu_warp_q8_0(qs[32 * b + lane], p.oq + o0 + 32 * b, p.od + o0 / 32 + b);
}

static size_t attn_part_smem(int hb, int dh, bool rh = false) {
    return ((size_t)hb * dh + (size_t)hb * ATT_R) * sizeof(float) + (size_t)ATT_R * dh * (rh ? 2 : 4) +
           ATT_R * sizeof(int64_t);
}

/* f(integral_constant<int, HB>, integral_constant<int, DHC>) for HB = hb of
 * 16, 8, 4, 2 (else 1) and DHC = 512 (dh512: the Flash head size as a
 * constant) or 0 (the head size at run time): the instances of the
 * CUDA-core attention kernels a launch picks from */
template <class F> static void att_dispatch(int hb, bool dh512, F &&f) {
    auto dh = [&](auto H) {
        if (dh512) f(H, std::integral_constant<int, 512>{});
        else f(H, std::integral_constant<int, 0>{});
    };
    switch (hb) {
    case 16: dh(std::integral_constant<int, 16>{}); break;
    case 8: dh(std::integral_constant<int, 8>{}); break;
    case 4: dh(std::integral_constant<int, 4>{}); break;
    case 2: dh(std::integral_constant<int, 2>{}); break;
    default: dh(std::integral_constant<int, 1>{}); break;
    }
}

/* kernel k on grid x 256 threads with smem bytes of dynamic shared memory
 * (max_smem: the attribute it is allowed) */
template <class K> static void launch_k(cu_ctx *c, K k, dim3 grid, size_t max_smem, size_t smem, const attn_p &p) {
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)max_smem);
    cu_launch(c, k, grid, 256, smem, p);
}

/* k_attn_merge for nt tokens: mz slices of each head's dims (else one
 * block per head), the online form unless DS4_CUDA_ATT_ONLINE=0 */
static void merge_launch(cu_ctx *c, const attn_p &p, int nt, int mz, size_t msmem) {
    if (c->att_online) {
        if (mz > 1) cu_launch(c, k_attn_merge<true, true>, dim3(p.H, nt, mz), 128, msmem, p);
        else cu_launch(c, k_attn_merge<false, true>, dim3(p.H, nt), 256, msmem, p);
    } else {
        if (mz > 1) cu_launch(c, k_attn_merge<true>, dim3(p.H, nt, mz), 128, msmem, p);
        else cu_launch(c, k_attn_merge<false>, dim3(p.H, nt), 256, msmem, p);
    }
}

/* Splits and tokens per launch for rows of up to nr_cap (the scratch holds
 * att_tokens x att_splits partials, cuda_backend.cu layout_scratch). */
int cu_attn_splits(int nr_cap) { return (nr_cap + ATT_R - 1) / ATT_R; }

template <typename T>
static void launch_attention(cu_ctx *c, attn_p &p, int n, int nr_cap) {
    /* heads per block: 4 for a few tokens (H200, q2 decode at 4k: 2, 4
     * and 8 within the +-1.5 tok/s run-to-run spread, 16 slower), 16 for
     * batches (2048-token prefill: 1,494 tok/s with 4, 1,616 with 8, 1,735
     * with 16: each staged row serves more heads); DS4_CUDA_ATT_HB
     * overrides it (A/B; the values are the same for any choice) */
    /* half staged rows (DS4_CUDA_ATT_RH, default on; f16 rows, one split
     * per block): 64 registers and ~50 KB of shared memory give 8 heads
     * per block 4 blocks per SM (16 heads: 2, at 128 registers); H100
     * dev/att_bench.cu, the partial kernel of a 256-token prefill chunk of a
     * CSA layer 1.539 ms (16 heads, f32 rows) -> 1.421 (8, half), one 1M HCA
     * decode token 0.098 -> 0.090; the same bits */
    const bool rh_ok = c->att_rh && sizeof(T) == 2 && !c->att_tc;
    int hb = c->att_hb ? c->att_hb : n >= MM_MIN_N ? (rh_ok ? 8 : 16) : 4;
    /* heads per block of a few tokens' HCA layers: 16 when the rows'
     * capacity reaches ATT_HB_HCA_MIN_ROWS (DS4_CUDA_ATT_HB_HCA sets it for
     * any capacity; 0: as the other layers). At 1M context 4 heads per
     * block made 16 head groups x 260 splits stage every compressed row 16
     * times; H200 2026-12-05, q2 at 1M: attention 8.62 -> 7.06 ms per
     * token, decode 53.9 -> 58.9 gen_ss; the same values for any choice */
    if (!c->att_hb && n < MM_MIN_N && p.kind == DS4_ATTN_HCA && c->att_hb_hca && nr_cap >= c->att_hb_hca_min)
        hb = c->att_hb_hca == 16 && c->att_hb_hca_min && rh_ok ? 8 : c->att_hb_hca; /* unset: 8 with half rows */
    while (hb > 1 && p.H % hb) hb /= 2;
    /* the online merge (default; DS4_CUDA_ATT_ONLINE=0: two-pass) for every
     * batch size, and batches on the CUDA-core path with at most att_fused_max_s
     * splits merged inside k_attn_fused (8 heads per block unless
     * DS4_CUDA_ATT_HB: its running outputs take registers); the kv rows then
     * go by the kv_store stage */
    if (c->att_online && n >= MM_MIN_N && !c->att_tc && !c->no_att_fused &&
        cu_attn_splits(nr_cap) <= c->att_fused_max_s) {
        int fb = c->att_hb ? c->att_hb : 8;
        while (fb > 1 && p.H % fb) fb /= 2;
        const size_t fsm = attn_part_smem(fb, p.dh, rh_ok) + 4 * (size_t)fb * sizeof(float);
        p.st_raw = nullptr;
        p.t0 = 0;
        for (int t0 = 0; t0 < n; t0 += 65535) {
            p.t0 = t0;
            dim3 grid(p.H / fb, n - t0 < 65535 ? n - t0 : 65535);
            att_dispatch(fb, p.dh == 512 && !c->att_dh_rt, [&](auto H, auto D) {
                constexpr int HB = decltype(H)::value, DHC = decltype(D)::value;
                if (rh_ok) launch_k(c, k_attn_fused<T, HB, DHC, sizeof(T) == 2>, grid, fsm, fsm, p);
                else launch_k(c, k_attn_fused<T, HB, DHC, false>, grid, fsm, fsm, p);
            });
            if (!CU_LAUNCH(c, "attn_fused")) return;
        }
        return;
    }
    const int S = cu_attn_splits(nr_cap);
    if (S > c->s.att_splits) {
        cu_fail(c, DS4_E_RANGE, "cuda: attention over %d rows exceeds the reserved scratch (%d)", nr_cap,
                c->s.att_splits * ATT_R);
        return;
    }
    p.S = S;
    /* splits per block of the CUDA-core kernel with 16 heads per block
     * (batches; few tokens in HCA layers of long sessions): 1, or
     * DS4_CUDA_ATT_ZB (opt-in until run: each block stages its token's 16
     * queries, 32 KB, for 32 rows; with zb splits per block once for 32 zb
     * rows) */
    p.zb = c->att_zb > 1 ? c->att_zb : 1;
    /* tensor cores when switched on (dh a multiple of 64: the shared
     * layouts); 16 heads per block for a few tokens (more blocks), 64 for
     * batches (the rows staged once per token and split) */
    const bool tc = c->att_tc && p.dh % 64 == 0;
    int tb = c->att_tc_hb ? c->att_tc_hb : n >= MM_MIN_N ? 64 : 16;
    while (tb > 16 && tb >= 2 * p.H) tb /= 2;
    /* merge slices: dh / 128 when the RoPE dims fit the last slice
     * (DS4_CUDA_NO_MERGE_SLICES=1: one block per head; H200 2026-12-05, q2
     * at 1M with 16 HCA heads per block: attention 7.06 -> 5.47 ms per
     * token, decode 58.9 -> 65.1 gen_ss; the same bits) */
    const int mz = !c->no_merge_slices && p.dh % 128 == 0 && p.dh > 128 && p.n_rot <= 128 ? p.dh / 128 : 1;
    const bool rh = rh_ok && !(hb == 16 && p.zb > 1);
    const size_t smem = tc ? attn_tc_smem(tb, p.dh, sizeof(T)) : attn_part_smem(hb, p.dh, rh),
                 msmem = ((size_t)p.dh + (c->att_online ? 4 : mz > 1 ? 2 : 1) * (size_t)S) * sizeof(float);
    for (int t0 = 0; t0 < n; t0 += c->s.att_tokens) {
        const int nt = n - t0 < c->s.att_tokens ? n - t0 : c->s.att_tokens;
        p.t0 = t0;
        if (tc) {
            dim3 grid((p.H + tb - 1) / tb, nt, S);
#define AT(HB)                                                                                                  \
    do {                                                                                                        \
        cudaFuncSetAttribute(k_attn_tc<T, HB>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);         \
        cu_launch(c, k_attn_tc<T, HB>, grid, 256, smem, p);                                                     \
    } while (0)
            switch (tb) {
            case 64: AT(64); break;
            case 32: AT(32); break;
            default: AT(16); break;
            }
#undef AT
            if (!CU_LAUNCH(c, "attn_tc")) return;
            merge_launch(c, p, nt, mz, msmem);
            if (!CU_LAUNCH(c, "attn_merge")) return;
            continue;
        }
        if (hb != 16) p.zb = 1;
        /* no fewer blocks than 2 per SM for it (HCA decode at 1M: 4 head
         * groups x 260 splits) */
        while (p.zb > 1 && (int64_t)(p.H / hb) * nt * cu_div_up(S, p.zb) < 2 * (int64_t)c->n_sm) p.zb /= 2;
        dim3 grid(p.H / hb, nt, cu_div_up(S, p.zb));
        /* several splits per block only with 16 heads per block (batches, long HCA layers): the looping kernel
         * is instantiated for 16 heads only; half staged rows (ATT_RH) only for half rows; the Flash head size
         * (512) as a constant unless DS4_CUDA_ATT_DH_RT=1 (A/B; the same operations) */
        att_dispatch(hb, p.dh == 512 && !c->att_dh_rt, [&](auto H, auto D) {
            constexpr int HB = decltype(H)::value, DHC = decltype(D)::value;
            if (HB == 16 && p.zb > 1) launch_k(c, k_attn_part<T, HB, DHC, HB == 16, false>, grid, 200 * 1024, smem, p);
            else if (rh) launch_k(c, k_attn_part<T, HB, DHC, false, sizeof(T) == 2>, grid, 200 * 1024, smem, p);
            else launch_k(c, k_attn_part<T, HB, DHC, false, false>, grid, 200 * 1024, smem, p);
        });
        if (!CU_LAUNCH(c, "attn_part")) return;
        merge_launch(c, p, nt, mz, msmem);
        if (!CU_LAUNCH(c, "attn_merge")) return;
    }
}

int cu_attention(void *ctx, const ds4_attention_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int n = a->n, H = hp->n_head, dh = hp->head_dim, G = hp->o_groups, ol = hp->o_lora;
    attn_p p{};
    p.q = a->q;
    p.kv = a->kv;
    p.raw = a->raw;
    p.comp = a->comp;
    p.sel = a->sel;
    p.n_sel = a->n_sel;
    p.sinks = l->sinks;
    p.inv_freq = a->rope->inv_freq;
    p.o = c->s.o;
    p.part_o = c->s.att_o;
    p.part_m = c->s.att_m;
    p.part_l = c->s.att_l;
    p.step = a->step;
    p.H = H;
    p.dh = dh;
    p.W = hp->window;
    p.n_rot = hp->n_rot;
    p.kind = l->kind;
    p.ratio = l->ratio;
    p.topk = hp->idx_topk;
    const int nr_cap = hp->window + (l->kind == DS4_ATTN_CSA ? hp->idx_topk : l->kind == DS4_ATTN_HCA ? a->comp_cap : 0);
    p.scale = 1.0f / sqrtf((float)dh);
    p.att_r4 = !c->no_att_r4;
    p.att_bfly = c->att_bfly;
    if (dh % 32 || dh > 256 * ATT_MAXK) {
        cu_fail(c, DS4_E_INTERNAL, "cuda: attention head_dim %d (needs a multiple of 32, at most %d)", dh, 256 * ATT_MAXK);
        return c->err;
    }
    /* grouped output projection: z_g = W_oa[g] . (heads of group g) */
    const int64_t gd = (int64_t)(H / G) * dh;
    const bool aq = a->num.act_quant && cu_act_type(l->o_a.type) >= 0;
    /* Q8_0 activations of o are written by the merge kernel */
    const bool merge_q = aq && !c->no_preq && cu_act_type(l->o_a.type) == DS4_TYPE_Q8_0 &&
                         (size_t)n * H * dh <= c->s.a1.cap;
    p.oq = merge_q ? c->s.a1.q : nullptr;
    p.od = merge_q ? c->s.a1.d : nullptr;
    if (merge_q) cu_preq_set(c, c->s.o, n, (int64_t)H * dh, H * dh, DS4_TYPE_Q8_0, &c->s.a1);
    /* the merge kernel also stores the kv rows into the ring, and the
     * kv_store stage that follows (forward.c: the same ring and rows)
     * launches nothing (DS4_CUDA_KV_IN_MERGE=0: kv_store stores them) */
    c->kv_fused = cu_kv_fused{};
    p.st_raw = c->kv_in_merge && a->raw ? (void *)a->raw : nullptr;
    p.st_f16 = a->row_type == DS4_TYPE_F16;
    p.st_t0 = n > hp->window ? n - hp->window : 0;
    p.mreg = c->merge_reg;
    if (a->row_type == DS4_TYPE_F16) launch_attention<__half>(c, p, n, nr_cap);
    else launch_attention<float>(c, p, n, nr_cap);
    if (p.st_raw && !c->err) c->kv_fused = cu_kv_fused{a->raw, a->kv, n, a->pos0};
    if (aq && !merge_q) cu_quantize(c, cu_act_type(l->o_a.type), c->s.o, (int64_t)H * dh, n, H * dh, &c->s.a1);
    for (int g0 = 0; g0 < G; g0 += CU_MAX_SEGS) {
        cu_seg segs[CU_MAX_SEGS];
        int ns = 0;
        for (int g = g0; g < G && ns < CU_MAX_SEGS; g++)
            segs[ns++] = cu_seg{cu_weight_rows(&l->o_a, 0, (int64_t)g * ol), ol, c->s.z + (int64_t)g * ol,
                                (int64_t)G * ol, g * gd};
        cu_matvec(c, segs, ns, n, c->s.o, (int64_t)H * dh, aq ? &c->s.a1 : nullptr, a->step, 0);
    }
    cu_mv_pair(c, &l->o_b, a->y, hp->n_embd, nullptr, nullptr, 0, c->s.z, (int64_t)G * ol, n, a->num.act_quant,
               &c->s.a1, a->step, 0);
    return c->err;
}

/* ---------------------------------------------------------------- head */

int cu_head(void *ctx, const ds4_head_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    const ds4_model *m = a->m;
    const ds4_hparams *hp = &m->hp;
    cu_preq_clear(c);
    hc_mix(c, m, &m->out_hc_fn, hp->n_hc, a->X, a->n, m->out_hc_scale, m->out_hc_base, m->out_norm, c->s.hn, nullptr,
           nullptr, true, &c->s.h0, nullptr);
    cu_mv_pair(c, &m->output, a->logits, hp->n_vocab, nullptr, nullptr, 0, c->s.hn, hp->n_embd, a->n, a->num.act_quant,
            &c->s.a1, a->step, 0);
    return c->err;
}

/* ---------------------------------------------------------------- argmax */

/* One block per row: the lowest index of the largest finite value (the rule
 * of ds4_argmax), -1 when none is finite (the backend contract). */
__global__ void __launch_bounds__(1024) k_argmax(const float *logits, int n_vocab, int32_t *ids, int vec) {
    cu_pdl_wait();
    const float *x = logits + (int64_t)blockIdx.x * n_vocab;
    float bv = 0.0f;
    int bi = -1;
    /* the largest finite value, the lowest index on ties: the same answer in
     * any order of the comparisons (each thread scans its indices upwards) */
    if (vec && n_vocab % 4 == 0 && ((uintptr_t)x & 15) == 0) {
        /* DS4_CUDA_ARGMAX_VEC=1: 8 float4 loads in flight per thread (a
         * row of 129,280 logits: 4 round trips instead of 127) */
        const float4 *x4 = (const float4 *)x;
        const int n4 = n_vocab / 4;
        for (int base = 0; base < n4; base += 8 * blockDim.x) {
            float4 v[8];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const int j = base + threadIdx.x + k * blockDim.x;
                v[k] = j < n4 ? x4[j] : make_float4(NAN, NAN, NAN, NAN);
            }
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const int i = 4 * (base + threadIdx.x + k * blockDim.x);
                const float e[4] = {v[k].x, v[k].y, v[k].z, v[k].w};
#pragma unroll
                for (int u = 0; u < 4; u++)
                    if (isfinite(e[u]) && (bi < 0 || e[u] > bv)) {
                        bv = e[u];
                        bi = i + u;
                    }
            }
        }
    } else {
        for (int i = threadIdx.x; i < n_vocab; i += blockDim.x) {
            float v = x[i];
            if (isfinite(v) && (bi < 0 || v > bv)) {
                bv = v;
                bi = i;
            }
        }
    }
    __shared__ float sv[1024];
    __shared__ int si[1024];
    sv[threadIdx.x] = bv;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) {
            float v2 = sv[threadIdx.x + h];
            int i2 = si[threadIdx.x + h];
            int i1 = si[threadIdx.x];
            if (i2 >= 0 && (i1 < 0 || v2 > sv[threadIdx.x] || (v2 == sv[threadIdx.x] && i2 < i1))) {
                sv[threadIdx.x] = v2;
                si[threadIdx.x] = i2;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) ids[blockIdx.x] = si[0]; /* -1: no finite value */
}

void cu_argmax_rows(cu_ctx *c, const float *logits, int n_rows, int n_vocab, int32_t *ids_dev) {
    cu_launch(c, k_argmax, n_rows, 1024, 0, logits, n_vocab, ids_dev, c->argmax_vec);
    CU_LAUNCH(c, "argmax");
}

/* ---------------------------------------------------------------- MTP */

/* X[t][s][d] = e[t][d] + X[t][s][d] (X holds h_proj of the normed streams) */
__global__ void k_mtp_add(const float *e, float *X, int n, int hc, int D) {
    cu_pdl_wait();
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)n * hc * D) return;
    const int64_t t = i / ((int64_t)hc * D);
    X[i] = __fadd_rn(e[t * D + i % D], X[i]);
}

/* MODEL.md C.12 steps 1-3 (backend.h ds4_mtp_embed_args), as cpu_mtp_embed:
 * e = e_proj . RMSNorm_enorm(embedding row), X_s = e + h_proj .
 * RMSNorm_hnorm(hc_s). Scratch: hn (normed embedding), out (normed streams,
 * sized for max(K, n_hc) rows per token), sd (e). */
int cu_mtp_embed(void *ctx, const ds4_mtp_embed_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->err) return c->err;
    const ds4_model *m = a->m;
    const ds4_hparams *hp = &m->hp;
    const int D = hp->n_embd, hc = hp->n_hc, n = a->n;
    float *en = c->s.hn, *hn = c->s.out, *ep = c->s.sd;
    cu_dequant_rows(c, &m->tok_embd, a->tokens, n, en, D, 1, 0);
    cu_launch(c, k_rows_rmsnorm, n, 256, (size_t)D * sizeof(float), en, (int64_t)D, D, (const float *)m->mtp_enorm,
              hp->rms_eps, (int8_t *)nullptr, (float *)nullptr, c->rownorm_reg);
    CU_LAUNCH(c, "mtp_enorm");
    cu_ok(c, cudaMemcpyAsync(hn, a->hc, (size_t)n * hc * D * sizeof(float), cudaMemcpyDeviceToDevice, c->st), "mtp copy");
    cu_launch(c, k_rows_rmsnorm, n * hc, 256, (size_t)D * sizeof(float), hn, (int64_t)D, D,
              (const float *)m->mtp_hnorm, hp->rms_eps, (int8_t *)nullptr, (float *)nullptr, c->rownorm_reg);
    CU_LAUNCH(c, "mtp_hnorm");
    cu_mv_pair(c, &m->mtp_e_proj, ep, D, nullptr, nullptr, 0, en, D, n, a->num.act_quant, &c->s.a1, a->step, 0);
    cu_mv_pair(c, &m->mtp_h_proj, a->X, D, nullptr, nullptr, 0, hn, D, n * hc, a->num.act_quant, &c->s.a1, a->step, 0);
    const int64_t items = (int64_t)n * hc * D;
    cu_launch(c, k_mtp_add, cu_div_up(items, 256), 256, 0, (const float *)ep, a->X, n, hc, D);
    CU_LAUNCH(c, "mtp_add");
    return c->err;
}

CU_TU_SWITCHES(cu_sw_attn)
