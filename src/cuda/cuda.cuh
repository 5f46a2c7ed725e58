/* cuda.cuh - internals shared by the CUDA backend's .cu files: the context,
 * error handling, the scratch layout, the weight layout on the device and
 * the launchers each op file provides.
 *
 * One context = one device, one main stream: every kernel and copy of the
 * backend is ordered on ctx->st, except the work forked onto side streams
 * with events and joined back before anything reads it (the compressors
 * on st2 after HC-pre, cuda_backend.cu; L2 prefetches on st3,
 * DS4_CUDA_L2AHEAD; the indexer's query path on st4, DS4_CUDA_IDX_FORK).
 * The first error (a CUDA call, a launch, or a device-side range check) is
 * kept in the context and reported by step_end; after it every stage is a
 * no-op until step_end clears it.
 *
 * Device weight layout (what a bound ds4_weight.data points to): F32, F16,
 * BF16, Q2_K and Q4_K keep the GGUF bytes; Q8_0 and IQ2_XXS are repacked
 * into two planes so that every row's payload is 16-byte aligned: first the
 * payload plane (Q8_0: 32 quant bytes per block; IQ2_XXS: the 64 qs bytes),
 * rows of all matrices in order, then, at a 256-byte aligned offset, the
 * plane of f16 block scales. The repack is lossless (same values).
 */
#ifndef DS4_CUDA_CUH
#define DS4_CUDA_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "backend.h"
#include "quant.h"
}

/* ---------------------------------------------------------------- errors */

struct cu_ctx;
/* Records the first error (code + message) in the context. */
void cu_fail(cu_ctx *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Checks a CUDA call; on failure records "what: cudaGetErrorString". */
bool cu_ok(cu_ctx *c, cudaError_t e, const char *what);
/* Checks the launch just made (and synchronises in sync_debug mode). */
bool cu_launched(cu_ctx *c, const char *kernel);

#define CU_LAUNCH(c, name) cu_launched((c), name)

/* Device-side status bits (ctx->dstatus), set by kernels, read at step_end. */
enum { CU_ST_COMP_RANGE = 1, CU_ST_IDX_RANGE = 2, CU_ST_TOPK_SYNC = 4, CU_ST_F16_RANGE = 8 };

/* DS4_CUDA_BLAS: the FP16 weight segment's capacity (values: q_b, o_b) */
#define CU_BLAS_WH ((size_t)32 << 20)

enum { CU_KPROF_BASE = 1000 };

/* ---------------------------------------------------------------- scratch */

/* An int8 activation buffer: quants, per-block scales (Q8_0: one per 32,
 * Q8_K: one per 256, f32) and Q8_K group sums (one int per 16). Rows of
 * `ld` values. */
struct cu_act {
    int8_t *q;
    float *d;
    int32_t *bs;
    size_t cap;  /* values */
};

struct cu_scratch {
    size_t n_batch, n_ctx;     /* what it was sized for */
    cu_act a1, a2, a3;         /* a1: any row activation; a2: second quantisation of v; a3: expert hidden */
    cu_act h0, hk;             /* Q8_0 / Q8_K codes of the HC-pre (or head) output, written by k_hc */
    cu_act a4;                 /* shared expert hidden codes (fused experts of up to 4 tokens) */
    cu_act ac;                 /* the compressors' input codes (their own: they may run on the side stream) */
    float *o;                  /* (B, H*dh) attention output */
    float *att_o;              /* (att_tokens, att_splits, H, dh) split attention outputs */
    float *att_m, *att_l;      /* (att_tokens, att_splits, H) split maxima / sums */
    int att_splits, att_tokens;
    float *z;                  /* (B, G*o_lora) */
    float *ca, *cg;            /* (B, 2*dh) compressor projections */
    float *qi;                 /* (B, IH*ID) indexer queries */
    float *wt;                 /* (B, IH) indexer head weights */
    int8_t *qc;                /* (B, IH*ID) indexer query codes (FP4 numerics, k_idx_scores_mma) */
    float *qp;                 /* (B, IH, ID/32) their block powers */
    unsigned *topw;            /* (4, 1024) k_idx_topk_wide's meeting state (arrivals and histogram 0 between launches) */
    float *scores;             /* (score_rows, n_ctx/4 + 1) indexer scores */
    int score_rows;            /* tokens scored per pass */
    float *hcp;                /* (B, n_split, 32) HC partial dots */
    double *hcs;               /* (B, n_split) HC partial sums of squares */
    unsigned *hcc;             /* (B) HC blocks done per token (0 between launches) */
    float *xn;                 /* (xn_cap) streams updated by the HC-post inside k_hc */
    size_t xn_cap;
    unsigned *rcc;             /* (1) k_route1 blocks done (0 between launches) */
    unsigned *mcc;             /* ((4K+1) * F/256) fused-expert blocks done per hidden super-block (0 between) */
    float *mix;                /* (B, 32) HC mixes (or head weights) */
    float *cin;                /* (min(B, 8), 32) the inputs of a comb HC-pre left for later (cu_comb_job) */
    float *hn;                 /* (B, D) head input */
    float *rl;                 /* (B, E) router logits */
    int32_t *items;            /* (B*K) expert-major item ids */
    int32_t *off;              /* (E+1) expert offsets */
    int32_t *act;              /* (E) active experts, then n_act at [E] */
    float *gu;                 /* (B*K, F) routed hidden, expert-major rows */
    float *out;                /* (B*K, D) routed outputs, item order */
    float *sg, *su;            /* (B, F) shared gate / up (then hidden) */
    float *sd;                 /* (B, D) shared down */
    float *tmp;                /* (B, max(D, q_lora)) */
    __half *xh;                /* DS4_CUDA_BLAS=1 only: FP16 activations (B, row_max) and */
    __half *wh;                /* one weight segment in FP16 (CU_BLAS_WH values) */
    size_t xh_cap;             /* values of xh */
};

/* A producer kernel that also wrote the int8 codes of its output records
 * it here (host side, in launch order); cu_mv_pair and the expert stage
 * then read those codes instead of quantizing the same rows again. Records
 * live from the producer to the next HC stage (cu_preq_clear) and a record
 * naming a buffer is dropped when cu_quantize overwrites that buffer. */
struct cu_preq {
    const float *x;            /* the f32 rows the codes were made from */
    int n, n_in, type;
    int64_t ldx;
    const cu_act *a;
};
#define CU_MAX_PREQ 4

/* ---------------------------------------------------------------- context */

#define CU_MAX_GRAPHS 16

struct cu_graph {
    uint64_t key;
    cudaGraphExec_t exec;
    uint64_t used;
};

/* 16 heads per block in few-token HCA attention from this many rows of
 * capacity (window + compressed rows: sessions of >= ~240k tokens); below
 * it 4 (with 16, a short context's few splits leave a quarter of the
 * blocks, each with 4x the work) */
#define ATT_HB_HCA_MIN_ROWS 2048

/* batches whose rows take at most this many splits of ATT_R (32) rows run
 * the whole attention in k_attn_fused (DS4_CUDA_ATT_FUSED_MAX_S overrides
 * it; the same bits either way). H100 2026-12-06, q2:20, one 2,048-token
 * chunk: at 2k context (CSA layers 20 splits, HCA 5) fused 4,531-4,553
 * tok/s against 4,374 by k_attn_part + the merge; at 1M (HCA 260 splits)
 * 654 against 695: one block per token and 8 heads walking 260 splits at
 * 2 blocks per SM loses to the split kernel's 4 per SM */
#define ATT_FUSED_MAX_S 32

/* A comb of HC-pre left for later (DS4_CUDA_COMB_HOST=1): its inputs cin
 * (n, hc*hc) and where it goes. Only HC-post reads comb, at the end of the
 * sublayer, so a kernel in between with a spare block finishes it
 * (hc_comb_run, the same code as HC-pre's warp 0 otherwise runs). */
struct cu_comb_job {
    const float *cin;
    float *comb;
    int n, hc, iters;
    float e;
};

/* The comb of one token from its inputs c (lane l < hc*hc: element
 * (l/hc, l%hc) = cu_lin(mix * rsq, scale[2], base)): row softmax, then
 * Sinkhorn, every sum gathered by shuffles and added in cpu_ops.c's order
 * (hc <= 4: 16 lanes); one warp, written to comb (hc*hc). */
template <int HCN>
__device__ __forceinline__ void hc_comb_warp(float c, int hc, float e, int iters, float *comb) {
    const int lane = threadIdx.x & 31, r = lane / hc, b = lane % hc;
    const bool on = lane < hc * hc;
    float g[HCN ? HCN : 8];
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < (HCN ? HCN : 8); k++)
        if (k < hc) mx = fmaxf(mx, __shfl_sync(0xffffffffu, c, r * hc + k));
    c = on ? expf(c - mx) : 0.0f;
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < (HCN ? HCN : 8); k++)
        if (k < hc) g[k] = __shfl_sync(0xffffffffu, c, r * hc + k);
#pragma unroll
    for (int k = 0; k < (HCN ? HCN : 8); k++)
        if (k < hc) sum += g[k];
    c = c / sum + e;
    /* the sum of the hc elements at lanes l0, l0 + step, ... (all gathered, then added in k order) */
    auto gsum = [&](int l0, int step) {
#pragma unroll
        for (int k = 0; k < (HCN ? HCN : 8); k++)
            if (k < hc) g[k] = __shfl_sync(0xffffffffu, c, l0 + k * step);
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < (HCN ? HCN : 8); k++)
            if (k < hc) s += g[k];
        return s;
    };
    for (int it = 0; it < iters; it++) {
        if (it > 0) c /= (gsum(r * hc, 1) + e); /* row normalisation (the softmax was the first) */
        c /= (gsum(b, hc) + e);                 /* column normalisation */
    }
    if (on) comb[lane] = c;
}

/* token t's comb of job j by the calling warp (all its lanes) */
__device__ __forceinline__ void hc_comb_run(const cu_comb_job &j, int t) {
    if (t >= j.n) return;
    const int lane = threadIdx.x & 31;
    const float c = lane < j.hc * j.hc ? j.cin[(int64_t)t * j.hc * j.hc + lane] : 0.0f;
    if (j.hc == 4) hc_comb_warp<4>(c, 4, j.e, j.iters, j.comb + (int64_t)t * 16);
    else hc_comb_warp<0>(c, j.hc, j.e, j.iters, j.comb + (int64_t)t * j.hc * j.hc);
}

/* The kv rows the last attention stored into their ring (DS4_CUDA_KV_IN_MERGE) */
struct cu_kv_fused {
    const void *raw;
    const float *kv;
    int n, pos0;
};

struct cu_ctx {
    int device;
    int n_sm;
    char dev_name[256];
    cudaStream_t st;
    bool sync_debug, no_graphs, profile;
    int no_pdl;            /* DS4_CUDA_NO_PDL=1: step kernels without programmatic dependent launch */
    int err;               /* first error, sticky until step_end */
    char msg[480];
    /* device status word (kernels OR bits into it) and its pinned mirror */
    int *dstatus;
    int *hstatus;
    int32_t *hids;         /* pinned argmax results */
    int32_t *dids;
    /* scratch, reserved up front */
    void *scratch_mem;
    size_t scratch_bytes;
    cu_scratch s;
    int hc_split;          /* splits of the HC flat dot */
    cu_preq preq[CU_MAX_PREQ];
    const int32_t *moe_grouped; /* ids of a one-token route whose expert grouping the route kernel wrote (consumed by
                                 * moe_experts; cleared at step_begin and by every upload or copy) */
    int no_preq;           /* DS4_CUDA_NO_PREQ=1: quantize at every consumer (A/B switch) */
    int att_hb;            /* DS4_CUDA_ATT_HB=1|2|4|8|16: CUDA-core attention heads per block (A/B switch; 0 = 4) */
    int att_tc;            /* DS4_CUDA_ATT_TC=1: attention on TF32 tensor cores (k_attn_tc; opt-in) */
    int no_idx_tile;       /* DS4_CUDA_NO_IDX_TILE=1: plain-numerics indexer scores on k_idx_scores, not k_idx_scores_t */
    int no_topk_wide;      /* DS4_CUDA_NO_TOPK_WIDE=1: the indexer top-k in one block per token always */
    int att_hb_hca;        /* DS4_CUDA_ATT_HB_HCA=1|2|4|8|16: heads per block of few-token HCA attention (unset: 16 from
                            * att_hb_hca_min rows of capacity; 0 or another value: as the other layers) */
    int att_hb_hca_min;
    cu_kv_fused kv_fused;  /* set by cu_attention when its merge stored the rows, consumed by cu_kv_store */
    int att_zb;            /* DS4_CUDA_ATT_ZB=N: k_attn_part takes N splits per block in batches (same bits) */
    int kv_in_merge;       /* the attention merge stores the kv rows, kv_store launches nothing (DS4_CUDA_KV_IN_MERGE=0: off) */
    int att_dh_rt;         /* DS4_CUDA_ATT_DH_RT=1: k_attn_part with the head size read at run time (A/B; same bits) */
    int att_rh;            /* DS4_CUDA_ATT_RH=1: k_attn_part keeps its staged f16 rows as half in shared memory */
    int mm_tw;             /* DS4_CUDA_MM_TW: 4 (default) k_mm_q8 in 16 warps of 16 x 16 outputs; 2: 8 of 16 x 32 (same bits) */
    int mm_ldm;            /* DS4_CUDA_MM_LDM (default 1): k_mm_q8/k_moe_mm fragments by ldmatrix .x4 (0: 32-bit loads; same bits) */
    int mf_tw;             /* DS4_CUDA_MF_TW: 2 (default) k_mm_f in 16 warps of 32 x 8 outputs; 1: 8 of 32 x 16 (same bits) */
    int att_online;        /* online split merge, batches merged in k_attn_fused (DS4_CUDA_ATT_ONLINE=0: two-pass merge) */
    int no_att_fused;      /* DS4_CUDA_NO_ATT_FUSED=1: batches still by k_attn_part + k_attn_merge (same bits) */
    int att_fused_max_s;   /* DS4_CUDA_ATT_FUSED_MAX_S: k_attn_fused only up to this many splits of rows */
    int no_merge_slices;   /* DS4_CUDA_NO_MERGE_SLICES=1: k_attn_merge in one block per head (same bits) */
    int topk_ilp;          /* DS4_CUDA_TOPK_ILP=0|1|2: the indexer top-k with 8 keys per thread and round never|always|by each token's rows on the device (else -1: by the launch's rows) */
    int no_idx_mma;        /* DS4_CUDA_NO_IDX_MMA=1: FP4 indexer scores on CUDA cores (float sums), not k_idx_scores_mma */
    int no_att_r4;         /* DS4_CUDA_NO_ATT_R4=1: k_attn_part's row-at-a-time loops (four rows per warp by default) */
    int att_bfly;          /* DS4_CUDA_ATT_BFLY=1: the attention's score warp sums by recursive halving (same bits) */
    int att_tc_hb;         /* DS4_CUDA_ATT_TC_HB=16|32|64: tensor-core attention heads per block (0 = 16 for
                            * fewer than 32 tokens, else 64) */
    int no_route_group;    /* DS4_CUDA_NO_ROUTE_GROUP=1: one-token expert grouping by moe_group (A/B switch) */
    int mv_no_r2;          /* DS4_CUDA_MV_R1=1: one row per warp everywhere (A/B switch) */
    int mv_tall;           /* DS4_CUDA_MV_TALL=2|4 (default 2, 0 off): one-token Q8_0 launches of many rows in all at 2 or 4 rows per warp */
    int mv_tall_min;       /* DS4_CUDA_MV_TALL_MIN: from how many rows (default 8192) */
    int moe1_seq;          /* DS4_CUDA_MOE1_SEQ=1: fused experts' rows one after the other (A/B switch) */
    int xpf;               /* DS4_CUDA_XPF=1: L2 prefetch of the fused experts' routed rows (opt-in until measured) */
    int mv_no_few;         /* DS4_CUDA_NO_MV_FEW=1: 2..4 tokens on the generic k_matvec (A/B switch) */
    int no_mma;            /* DS4_CUDA_NO_MMA=1: batches without the tensor-core kernels (A/B switch) */
    int blas;              /* DS4_CUDA_BLAS=1: batch Q8_0 projections as cuBLAS FP16 GEMMs (opt-in, other bits) */
    int blas_min;          /* DS4_CUDA_BLAS_MIN: from how many tokens (default 128) */
    void *blas_h;          /* its cublasHandle_t (mm_blas.cu) */
    void *blas_ws;         /* and the handle's workspace */
    cudaStream_t blas_st;  /* the stream the handle is bound to (the main one) */
    int hc_diag;           /* DS4_CUDA_HC_DIAG (diagnostic timing switch, wrong results) */
    int floor_diag;        /* DS4_CUDA_FLOOR=1: every cu_launch kernel empty (timing only, wrong results) */
    int gtrace;            /* DS4_CUDA_GTRACE=N: timeline of the N-th step graph replay (CU_GTRACE builds) */
    long gt_replays;       /* step graph replays so far */
    bool gt_on;            /* this step is the traced one */
    unsigned *gt_ctr;      /* device: records taken (CU_GTRACE) */
    void *gt_buf;          /* device: the records */
    int twice_diag;        /* DS4_CUDA_TWICE=1: eager launches run twice, the first timed apart (timing only, wrong results) */
    int no_hc_batch;       /* DS4_CUDA_NO_HC_BATCH=1: batches on the per-token HC kernel (A/B switch) */
    int no_moe_fuse;       /* DS4_CUDA_NO_MOE_FUSE=1: experts of 1-4 tokens in 7 launches, not 2 (A/B switch) */
    int no_prefetch;       /* DS4_CUDA_NO_PREFETCH=1: with early_trigger or tail_trig, no L2 prefetch of weights (A/B switch) */
    int early_trigger;     /* DS4_CUDA_EARLY_TRIGGER=1: kernels let the next one launch at their start (A/B switch) */
    int tail_trig;         /* DS4_CUDA_TAIL_TRIGGER=1: k_hc's last block and k_route let the next kernel launch early */
    int pf_next;           /* set after such a launch: the next matvec / fused experts prefetch their weights to L2 */
    int ring_in_emit;      /* DS4_CUDA_RING_IN_EMIT=1: one token's compressor frontier written by k_comp_emit */
    int emit_reg;          /* DS4_CUDA_EMIT_REG (default 1): k_comp_emit's ratio-4 candidates loaded at once, FP8 maxima by warps */
    int idx_pp;            /* DS4_CUDA_IDX_PP (default 2): (row, block) pairs per thread loaded at once in k_idx_scores_mma */
    int merge_reg;         /* DS4_CUDA_MERGE_REG=1: the attention merge's loads at once (same values) */
    int rownorm_reg;       /* DS4_CUDA_ROWNORM_REG=1: k_rows_rmsnorm on values in registers, loads at once */
    int argmax_vec;        /* DS4_CUDA_ARGMAX_VEC=1: greedy argmax with 8 float4 loads in flight per thread */
    int route_reg;         /* DS4_CUDA_ROUTE_REG=1: the router keeps the chosen ids in registers (same bits) */
    int route_lanes;       /* DS4_CUDA_ROUTE_LANES (default 1): route_token's loads at once, one token's top-k tail on K lanes (same values) */
    int hc_wpre;           /* DS4_CUDA_HC_WPRE (default 1): k_hc's mixer slices prefetched to L2 before the PDL wait (same bits) */
    int hc_fin2;           /* DS4_CUDA_HC_FIN2=1: HC-pre's finish with its loads at once, Q8_0 maxima together */
    int hc_fin3;           /* DS4_CUDA_HC_FIN3 (default 1): HC-pre's finish: norm weights in shared memory, norm loop rolled */
    int hc_bfly;           /* DS4_CUDA_HC_BFLY=1: k_hc's warp sums by recursive halving (same bits) */
    int no_hc_fuse;        /* DS4_CUDA_NO_HC_FUSE=1: HC-post in its own kernel before HC-pre (A/B switch) */
    int route_fuse;        /* DS4_CUDA_ROUTE_FUSE=1: one token's router logits + top-k in one launch (opt-in) */
    int no_side_stream;    /* DS4_CUDA_NO_SIDE_STREAM=1: the compressors on the main stream (default: a second one) */
    int l2ahead;           /* DS4_CUDA_L2AHEAD bits: weights prefetched to L2 ahead of their kernel (cu_ahead) */
    /* layer split (ds4_cuda_link_parts): the NCCL communicator of this
     * device (an ncclComm_t; owned by the first backend on the device) and
     * this backend's rank in it */
    void *comm;
    int rank;
    bool comm_owner;
    cudaStream_t st2;      /* the side stream, its fork (after HC-pre) and join events */
    cudaEvent_t ev_fork, ev_join;
    /* DS4_CUDA_IDX_FORK (default 1): the indexer's query path on its own stream,
     * forked after the q_a norm (ev_qa, recorded while qa_live) and joined
     * before the scores (ev_iq) */
    int idx_fork;
    cudaStream_t st4;
    cudaEvent_t ev_qa, ev_iq;
    bool qa_live;
    bool side_live;        /* work queued on st2 that st has not joined yet */
    int comb_host;         /* DS4_CUDA_COMB_HOST (default 1): HC-pre's comb (softmax + Sinkhorn) by a later kernel's spare block */
    int comb_big;          /* DS4_CUDA_COMB_BIG (default 1): that comb hosted by a long kernel instead (one-token q_b matvec, fused experts' gate/up) */
    cu_comb_job mv_cj;     /* DS4_CUDA_COMB_BIG: a comb offered to the next one-token Q8_0 matvec launch (k_matvec_q8r) */
    cu_comb_job comb_job;  /* the comb the last HC-pre left (n = 0: none): taken by the next q/kv finish or router
                            * launch, else launched on its own (cu_comb_flush) before anything that may read it */
    cudaStream_t st3;      /* the L2-ahead stream (cu_ahead), its fork and join events */
    cudaEvent_t ev_af, ev_aj;
    bool ahead_live;       /* prefetches queued on st3 that st has not joined yet */
    /* graphs */
    cu_graph graphs[CU_MAX_GRAPHS];
    uint64_t graph_clock;
    bool capturing;
    uint64_t cap_key;
    /* bound model allocations */
    void **allocs;
    int n_allocs, cap_allocs;
    void **pinned;
    int n_pinned, cap_pinned;
    size_t bytes_device, bytes_host;
    /* every bound weight by its host identity (name pointer + data pointer +
     * shape): a second model that views the same tensors (the MTP block's
     * tok_embd and output) binds to the same device memory */
    struct cu_bound {
        const char *name;
        const void *src;
        int type;
        int64_t n_in, n_out, n_mat;
        void *dev;
    } *bound;
    int n_bound, cap_bound;
    /* per-stage timing (prof_mark / prof_read) */
    cudaEvent_t *prof_ev;
    int *prof_kind;
    int n_prof, cap_prof;
    double prof_ms[DS4_PROF_N];
    /* per-kernel timing (DS4_CUDA_KPROF=1, profiled eager steps only):
     * marks of kind CU_KPROF_BASE + i after each launch of kernel i */
    int kprof;
    int n_kp;
    struct {
        const char *name;
        double ms;
        long calls;
    } kp[96];
    /* device copies of the IQ2_XXS tables */
    const uint64_t *grid;   /* (256) */
    const uint8_t *ksigns;  /* (128) */
};

/* ---------------------------------------------------------------- launch */

/* Every kernel of a step starts with cu_pdl_wait(): it returns once the
 * previous kernel on the stream has finished and its writes are visible
 * (a no-op when the kernel was launched without the attribute). Nothing
 * before it may read what an earlier kernel of the step writes; kernels may
 * prefetch their weights to L2 there.
 * With DS4_CUDA_EARLY_TRIGGER=1 (A/B, not the default) it first lets the
 * next kernel launch (griddepcontrol.launch_dependents): that kernel's
 * blocks are then placed while this one runs and wait in their own
 * cu_pdl_wait. In the H200 runs of 2026-12-04 decode measured 86-89 tok/s
 * (gen_ss) with it and 93-94 without it in earlier sessions (cross-call
 * figures, not a same-call A/B): a cascade of early launches places the
 * blocks of small kernels on the few SMs with room at that moment. */
static __constant__ int cu_early_trigger; /* one copy per .cu file, set by its CU_TU_SWITCHES function */
__device__ __forceinline__ void cu_pdl_wait() {
    if (cu_early_trigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
}
/* The wait without the early trigger, for kernels whose blocks wait on each
 * other (k_idx_topk_wide): the next kernel's blocks must not take the SMs
 * its later blocks need. */
__device__ __forceinline__ void cu_pdl_wait_only() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

/* In-graph timeline (diagnostic build `make cuda NVDEFS=-DCU_GTRACE=1`, run
 * with DS4_CUDA_GTRACE=N): in the N-th replay of a step graph, the first
 * and the last block of every kernel log, at the kernel's cu_pdl_wait, the
 * %globaltimer before and after the wait and when the block leaves the
 * scope of the wait (for a wait at the top of a kernel: the block's end),
 * with the wait's source file and line. The records go to ds4-gtrace.txt
 * in the working directory after that step;
 * dev/gtrace.py names the kernels and sums the timeline. The default
 * build has none of this code. */
#ifndef CU_GTRACE
#define CU_GTRACE 0
#endif
#if CU_GTRACE
struct cu_gt_rec {
    char file[16];
    int line, last;            /* last: the grid's last block (else its first) */
    unsigned nblk, smid;
    unsigned long long t_pre, t_post, t_exit;
};
enum { CU_GT_CAP = 1 << 16 };
static __constant__ unsigned *cu_gt_ctr; /* records taken; >= CU_GT_CAP: off */
static __constant__ cu_gt_rec *cu_gt_buf;
__device__ __forceinline__ unsigned long long cu_gt_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
struct cu_gt_guard {
    const char *file;
    int line, who; /* 0: not logged, 1: first block, 2: last block */
    unsigned long long t_pre, t_post;
    __device__ cu_gt_guard(const char *f, int l) : file(f), line(l), who(0), t_pre(0), t_post(0) {
        const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        const unsigned nb = gridDim.x * gridDim.y * gridDim.z;
        if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0 && (b == 0 || b == nb - 1))
            who = b == 0 ? 1 : 2;
        if (who) t_pre = cu_gt_now();
    }
    __device__ void waited() {
        if (who) t_post = cu_gt_now();
    }
    __device__ ~cu_gt_guard() {
        if (!who || !cu_gt_ctr || *(volatile unsigned *)cu_gt_ctr >= CU_GT_CAP) return;
        const unsigned long long t_exit = cu_gt_now();
        const unsigned i = atomicAdd(cu_gt_ctr, 1u);
        if (i >= CU_GT_CAP) return;
        cu_gt_rec *r = cu_gt_buf + i;
        const char *base = file;
        for (const char *q = file; *q; q++)
            if (*q == '/') base = q + 1;
        int k = 0;
        for (; k < 15 && base[k]; k++) r->file[k] = base[k];
        for (; k < 16; k++) r->file[k] = 0;
        unsigned sm;
        asm("mov.u32 %0, %%smid;" : "=r"(sm));
        r->line = line;
        r->last = who == 2;
        r->nblk = gridDim.x * gridDim.y * gridDim.z;
        r->smid = sm;
        r->t_pre = t_pre;
        r->t_post = t_post;
        r->t_exit = t_exit;
    }
};
#define cu_pdl_wait()                                \
    cu_gt_guard cu_gt_g_(__FILE__, __LINE__);        \
    cu_pdl_wait_fn();                                \
    cu_gt_g_.waited()
#define cu_pdl_wait_only()                           \
    cu_gt_guard cu_gt_g_(__FILE__, __LINE__);        \
    cu_pdl_wait_only_fn();                           \
    cu_gt_g_.waited()
__device__ __forceinline__ void cu_pdl_wait_fn() {
    if (cu_early_trigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
}
__device__ __forceinline__ void cu_pdl_wait_only_fn() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
#define CU_TU_GTRACE(name)                                                                                 \
    bool name##_gt(unsigned *ctr, cu_gt_rec *buf) {                                                        \
        return cudaMemcpyToSymbol(cu_gt_ctr, &ctr, sizeof ctr) == cudaSuccess &&                           \
               cudaMemcpyToSymbol(cu_gt_buf, &buf, sizeof buf) == cudaSuccess;                             \
    }
bool cu_sw_matvec_gt(unsigned *, cu_gt_rec *), cu_sw_mm_f_gt(unsigned *, cu_gt_rec *),
    cu_sw_mm_q8_gt(unsigned *, cu_gt_rec *), cu_sw_attn_gt(unsigned *, cu_gt_rec *),
    cu_sw_compress_gt(unsigned *, cu_gt_rec *), cu_sw_moe_gt(unsigned *, cu_gt_rec *),
    cu_sw_backend_gt(unsigned *, cu_gt_rec *), cu_sw_blas_gt(unsigned *, cu_gt_rec *);
#else
#define CU_TU_GTRACE(name)
#endif

/* Each .cu file with kernels defines its setter of the device-side switches
 * (CU_TU_SWITCHES(name)); cu_create calls them all. */
#define CU_TU_SWITCHES(name)                                                                            \
    bool name(int early_trigger) {                                                                      \
        return cudaMemcpyToSymbol(cu_early_trigger, &early_trigger, sizeof early_trigger) == cudaSuccess; \
    }                                                                                                   \
    CU_TU_GTRACE(name)
bool cu_sw_matvec(int), cu_sw_mm_f(int), cu_sw_mm_q8(int), cu_sw_attn(int), cu_sw_compress(int), cu_sw_moe(int),
    cu_sw_backend(int), cu_sw_blas(int);

/* A hint: bring [p, p + bytes) into L2 (bulk prefetches of at most 1 MiB,
 * the range shrunk to whole 16-byte units inside it). One thread calls it. */
__device__ __forceinline__ void cu_prefetch_l2(const void *p, size_t bytes) {
    uintptr_t a = ((uintptr_t)p + 15) & ~(uintptr_t)15, e = ((uintptr_t)p + bytes) & ~(uintptr_t)15;
    while (a < e) {
        const uint32_t n = e - a > (1u << 20) ? (1u << 20) : (uint32_t)(e - a);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"(n) : "memory");
        a += n;
    }
}

/* cudaLaunchKernelEx on the context's stream with at most one launch
 * attribute (a: NULL for none) */
template <typename... KArgs, typename... Args>
static inline cudaError_t cu_launch_with(cu_ctx *c, const cudaLaunchAttribute *a, void (*k)(KArgs...), dim3 grid,
                                         dim3 block, size_t smem, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = c->st;
    cudaLaunchAttribute at[1];
    if (a) at[0] = *a;
    cfg.attrs = at;
    cfg.numAttrs = a ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, k, static_cast<KArgs>(args)...);
}

/* Launches a step kernel on the context's stream; unless ctx->no_pdl, as a
 * programmatic dependent launch (PERFORMANCE.md A.8: its launch and block
 * scheduling overlap the previous kernel's tail; cu_pdl_wait() keeps the
 * data dependency). */
/* DS4_CUDA_FLOOR=1 (timing only, wrong results): every step kernel that
 * cu_launch would start is this empty one with the same grid and block, so a
 * decode step's graph keeps its nodes, its dependencies and their launch
 * cost and does no work: the latency floor of the kernel sequence. */
template <int N = 0> __global__ void k_floor() { cu_pdl_wait(); }

/* DS4_CUDA_TWICE: the profile mark after a first launch (cuda_backend.cu) */
void cu_twice_mark(cu_ctx *c);

template <typename... KArgs, typename... Args>
static inline void cu_launch(cu_ctx *c, void (*k)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
    cudaLaunchAttribute a;
    a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    a.val.programmaticStreamSerializationAllowed = 1;
    /* (its launcher read pf_next before this call: the prefetch of an
     * early-launched kernel is for the launch right after the trigger's) */
    c->pf_next = 0;
    if (c->floor_diag) {
        const cudaError_t e = cu_launch_with(c, c->no_pdl ? nullptr : &a, k_floor<0>, grid, block, 0);
        if (e != cudaSuccess) cu_ok(c, e, "kernel launch");
        return;
    }
    cudaError_t e = cu_launch_with(c, c->no_pdl ? nullptr : &a, k, grid, block, smem, args...);
    if (e != cudaSuccess) cu_ok(c, e, "kernel launch");
    if (c->twice_diag && !c->capturing && e == cudaSuccess) {
        /* DS4_CUDA_TWICE=1 with DS4_CUDA_KPROF=1 (timing only, wrong
         * results: a kernel may read what it wrote): the first launch's time
         * goes to one "(first launches)" row, the second, with its code and
         * data just used, to the kernel's own row; a KPROF run without it
         * gives each kernel's first-launch time */
        cu_twice_mark(c);
        e = cu_launch_with(c, c->no_pdl ? nullptr : &a, k, grid, block, smem, args...);
        if (e != cudaSuccess) cu_ok(c, e, "kernel launch");
    }
}

/* ---------------------------------------------------------------- weights */

/* Device view of one weight: payload/scale planes and their row strides. */
struct cu_w {
    const uint8_t *q;      /* payload of row 0 of matrix 0 */
    const uint8_t *s;      /* scales of row 0 (Q8_0 / IQ2_XXS), else NULL */
    int type;
    int n_in;
    size_t q_row;          /* payload bytes per row */
    size_t s_row;          /* scale bytes per row */
    int64_t rows_per_mat;  /* n_out */
};

/* True for the types repacked into planes. */
static inline bool cu_planar(int type) { return type == DS4_TYPE_Q8_0 || type == DS4_TYPE_IQ2_XXS; }
/* Payload bytes per block of a type in the device layout. */
static inline size_t cu_payload_block(int type) {
    return type == DS4_TYPE_Q8_0 ? 32 : type == DS4_TYPE_IQ2_XXS ? 64 : (size_t)ds4_type_get(type)->block_bytes;
}
/* Device bytes of a weight (both planes). */
size_t cu_weight_bytes(const ds4_weight *w);
/* Byte offset of the scale plane. */
size_t cu_scale_offset(const ds4_weight *w);
cu_w cu_weight_view(const ds4_weight *w);
/* A view of rows [row0, ...) of matrix mat. */
cu_w cu_weight_rows(const ds4_weight *w, int64_t mat, int64_t row0);

/* L2 ahead (DS4_CUDA_L2AHEAD, bits = places): steps of at most 8 tokens
 * bring the weights a later kernel of the step reads into L2 while the
 * kernels before it are latency-bound (attention, HC-pre, the router): a
 * tiny kernel of bulk prefetches on stream st3, forked from the main stream
 * at the call and joined at step_end, so the main stream never waits for
 * it. A hint only: results unchanged. Bits: CU_AHEAD_OA (o_a during the
 * attention core), CU_AHEAD_FFN (the shared expert and the router during
 * the FFN's HC-pre), CU_AHEAD_NEXT (the next layer's q_a, kv and HC mixer
 * during the experts' tail and the next HC-pre), CU_AHEAD_QB (its q_b). */
enum { CU_AHEAD_OA = 1, CU_AHEAD_FFN = 2, CU_AHEAD_NEXT = 4, CU_AHEAD_QB = 8 };
void cu_ahead(cu_ctx *c, int bit, const ds4_weight *const *ws, int nw, int n_tokens);

/* ---------------------------------------------------------------- ops */

/* matvec.cu */
struct cu_seg {            /* one output segment of a matvec launch */
    cu_w w;                /* rows start at w.q / w.s */
    int rows;
    float *y;              /* y[t*ldy + r] */
    int64_t ldy;
    int64_t xoff;          /* offset of this segment's input inside an x row */
};
#define CU_MAX_SEGS 8

/* y_seg[t][r] = W_seg[r] . x[t] for every segment, t in [0, n). Activations
 * are f32 rows x (ld ldx) or, when aq != NULL, int8 rows of aq (ld ldx,
 * quantized to the weights' activation type by cu_quantize). All segments
 * share one weight type and n_in. skip_le > 0: the kernel does nothing when
 * (pos0 + n) / 4 <= skip_le (indexer projections below top-k). */
void cu_matvec(cu_ctx *c, const cu_seg *segs, int n_seg, int n, const float *x, int64_t ldx, const cu_act *aq,
               const ds4_step *step, int skip_le);
/* Runs w1 (and w2 when non-NULL) on the same n input rows x (ld ldx):
 * y1 (ld ld1), y2 (ld ld2). With act_quant and quantized weights the input
 * is quantized into buf once per activation type; w1 and w2 share one
 * launch when they share type and row length. */
void cu_mv_pair(cu_ctx *c, const ds4_weight *w1, float *y1, int64_t ld1, const ds4_weight *w2, float *y2, int64_t ld2,
                const float *x, int64_t ldx, int n, bool act_quant, cu_act *buf, const ds4_step *step, int skip_le);
/* Quantizes n rows of n_in values of x (ld ldx) into a (ld n_in) as act_type
 * (DS4_TYPE_Q8_0 or DS4_TYPE_Q8_K), byte-exact with ds4_quantize_act. */
void cu_quantize(cu_ctx *c, int act_type, const float *x, int64_t ldx, int n, int n_in, cu_act *a);
void cu_preq_set(cu_ctx *c, const float *x, int n, int64_t ldx, int n_in, int type, const cu_act *a);
const cu_act *cu_preq_find(cu_ctx *c, const float *x, int n, int64_t ldx, int n_in, int type);
/* The int8 codes of x as act_type: a producer's (cu_preq_find), else
 * quantized into buf now. */
const cu_act *cu_act_codes(cu_ctx *c, int act_type, const float *x, int64_t ldx, int n, int n_in, cu_act *buf);
void cu_preq_clear(cu_ctx *c);
void *cu_dl_load(const char *what, const char *env, const char *name, const char *fallback, const char *const *syms,
                 void **const *slots, int n, char *why, size_t cap);
/* DS4_CUDA_BLAS=1: cuBLAS loaded (dlopen) and a handle on the context's stream; close frees it */
bool cu_blas_open(cu_ctx *c);
/* DS4_CUDA_BLAS_MIN, or its default 128 */
static inline int cu_blas_min(const cu_ctx *c) { return c->blas_min > 0 ? c->blas_min : 128; }
void cu_blas_close(cu_ctx *c);
/* Warps per row of the one-token matvec for a weight of `rows` rows (the
 * largest of a launch's segments) and nch 32-value chunks per row. */
int cu_mv_wpr(int rows, int nch);
/* Dequantizes rows ids[t] (device, n of them; NULL = rows 0..n-1) of w into
 * y (ld ldy), repeating each row `rep` times at stride rep_stride floats. */
void cu_dequant_rows(cu_ctx *c, const ds4_weight *w, const int32_t *ids, int n, float *y, int64_t ldy, int rep,
                     int64_t rep_stride);

/* ops_attn.cu */
int cu_embed(void *ctx, const ds4_embed_args *a);
int cu_hc_pre(void *ctx, const ds4_hc_pre_args *a);
/* the pending comb job: handed to the kernel about to launch (cleared), or
 * launched on its own now (k_hc_comb) */
cu_comb_job cu_comb_take(cu_ctx *c);
void cu_comb_flush(cu_ctx *c);
void cu_hc_clk_print(cu_ctx *c); /* DS4_CUDA_HC_DIAG bit 256 */
int cu_hc_post(void *ctx, const ds4_hc_post_args *a);
int cu_attn_project(void *ctx, const ds4_attn_project_args *a);
int cu_attention(void *ctx, const ds4_attention_args *a);
int cu_attn_splits(int nr_cap); /* row splits of the split attention */
int cu_kv_store(void *ctx, const ds4_kv_store_args *a);
int cu_head(void *ctx, const ds4_head_args *a);
int cu_mtp_embed(void *ctx, const ds4_mtp_embed_args *a);
/* ops_compress.cu */
int cu_compress_update(void *ctx, const ds4_compress_args *a);
int cu_indexer_select(void *ctx, const ds4_indexer_args *a);
/* its two halves: the query path (projections, k_idx_q: reads the q_a
 * norm's output and HC-pre's only) and the scores + top-k */
int cu_indexer_q(cu_ctx *c, const ds4_indexer_args *a);
int cu_indexer_scores(cu_ctx *c, const ds4_indexer_args *a);
/* ops_moe.cu */
int cu_moe_route(void *ctx, const ds4_moe_route_args *a);
int cu_moe_experts(void *ctx, const ds4_moe_experts_args *a);
/* argmax (ops_attn.cu): ids_dev[r] for n_rows rows */
void cu_argmax_rows(cu_ctx *c, const float *logits, int n_rows, int n_vocab, int32_t *ids_dev);

/* ---------------------------------------------------------------- helpers */

static inline int cu_div_up(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

/* Activation type used with a weight type (ds4_type_act), -1 for none. */
static inline int cu_act_type(int wtype) {
    return wtype == DS4_TYPE_Q8_0 ? DS4_TYPE_Q8_0
           : (wtype == DS4_TYPE_Q2_K || wtype == DS4_TYPE_Q4_K || wtype == DS4_TYPE_IQ2_XXS) ? DS4_TYPE_Q8_K
                                                                                              : -1;
}

#endif
