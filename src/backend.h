/* backend.h - the backend contract: a vtable of memory, transfer and step
 * ops plus one argument struct per model stage.
 *
 * forward.c owns the one layer loop and calls these stages in order; a
 * backend (src/cpu/, src/cuda/) implements the math of each stage and never
 * re-implements the loop, so cache layout and ordering cannot drift between
 * backends. Stages are shaped like DeepSeek V4 itself (MODEL.md §C):
 * hc_pre, attn_project, compress_update, indexer_select, attention, kv_store,
 * hc_post, moe_route, moe_experts, head.
 *
 * Memory. A backend owns every byte a stage touches:
 *  - Weights are bound once, at engine open: ops->bind_model returns the
 *    backend's copy of the model description (host structs) in which every
 *    data pointer (ds4_weight.data, norm/HC/sink/bias vectors, tid2eid, RoPE
 *    frequencies) is backend memory. The layout behind a bound weight's
 *    `data` is the backend's own (the CUDA backend repacks Q8_0/IQ2_XXS into
 *    aligned planes); only that backend's stages read it. Host-side
 *    descriptions (hp, names, ratios, clamp values, types and shapes) stay
 *    host memory and may be read anywhere.
 *  - Sessions (forward.c) allocate their KV state and batch activations with
 *    ops->alloc up front, sized by n_ctx and the largest batch; cached rows
 *    are stored in the backend's row type (ops->kv_row_type: F32, or F16 when
 *    the f16 cache rounding is on and the backend wants half storage).
 *  - Scratch: ops->reserve is told the largest batch and context before any
 *    step, so stages never allocate (a captured step stays valid).
 *  - Token ids, positions and counts of a step live in a ds4_step in backend
 *    memory, uploaded once per step. Stage args also carry host copies of n
 *    and pos0 for eager backends; a backend that replays captured steps
 *    (graph_key) must read positions only from the step, never from the host
 *    pos0, and must take position-dependent decisions (emit a compressed row,
 *    score the indexer) on the device.
 *  A strict test backend (src/cpu/strict.c) checks that every pointer a stage
 *  receives lies in memory it allocated or bound.
 *
 * Shapes are written (rows, cols), row-major; n = tokens in the batch,
 * pos0 = absolute position of the batch's first token.
 *
 * Batches: a stage processes n consecutive tokens of one session. Every
 * per-token result is computed by the same operations whatever n is on the
 * CPU, so a CPU prefill of N tokens is bit-identical to N decode steps.
 * (Batched serving will extend ds4_step with per-row sessions/positions.)
 *
 * Errors: ops return 0 or a negative DS4_E*; stages may defer errors (the
 * first one is kept by the backend and reported by step_end). Unsupported
 * shapes are refused by ops->check_model at open, never mid-request.
 */
#ifndef DS4_BACKEND_H
#define DS4_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "util/err.h"

/* Which of the official roundings (MODEL.md §E) are on. The release path has
 * all on; --plain-numerics turns all off. act_quant selects the int8
 * activation dots of E.1 for quantized (Q8_0 / K-quant / IQ2) weights; F32,
 * F16 and BF16 weights always use float32 activations. */
typedef struct ds4_numerics {
    bool fp8_kv;      /* E.2: FP8 rounding of raw and compressed KV rows */
    bool fp4_indexer; /* E.3: Hadamard + FP4 on indexer queries and keys */
    bool f16_cache;   /* E.4: cache rows stored rounded to half */
    bool act_quant;   /* E.1: Q8_0 / Q8_K activations for quantized weights */
} ds4_numerics;

/* One evaluation step, in backend memory (ops->alloc), written by forward.c
 * with one upload before step_begin. tokens[] follows the header. */
typedef struct ds4_step {
    int32_t pos0;    /* absolute position of tokens[0] */
    int32_t n;       /* tokens in this step, 1..n_cap */
    int32_t n_cap;   /* capacity of tokens[] (the session's largest batch) */
    int32_t pad;
} ds4_step;
#define DS4_STEP_TOKENS(st) ((int32_t *)((ds4_step *)(st) + 1))
#define DS4_STEP_BYTES(n_cap) (sizeof(ds4_step) + (size_t)(n_cap) * sizeof(int32_t))

/* KV state of one layer (MODEL.md §D.1), in backend memory; forward.c
 * decides the capacities, the backend the row type of raw/comp/idx. */
typedef struct ds4_layer_state {
    void *raw;        /* (window, head_dim) ring: position p at row p % window */
    void *comp;       /* (comp_cap, head_dim) compressed rows, append-only (R != 0) */
    float *comp_a;    /* (c*R, c*head_dim) compressor frontier ring: token p at */
    float *comp_g;    /*   row p % (c*R); g includes ape (R != 0) */
    void *idx;        /* (idx_cap, idx_dim) indexer key rows (CSA) */
    float *icomp_a;   /* (8, 2*idx_dim) indexer compressor frontier (CSA) */
    float *icomp_g;
    int comp_cap, idx_cap;
} ds4_layer_state;

/* Every stage receives the step (backend memory) and host copies of n and
 * pos0 (see the memory notes above). */
#define DS4_STAGE_COMMON \
    const ds4_model *m;  /* the bound model */ \
    const ds4_step *step; \
    int n, pos0

typedef struct ds4_embed_args {
    DS4_STAGE_COMMON;
    const int32_t *tokens;   /* (n) backend memory: DS4_STEP_TOKENS(step) */
    float *X;                /* out (n, n_hc, D): every stream = the embedding */
} ds4_embed_args;

/* HC-pre (MODEL.md C.2) + the sublayer's RMSNorm. */
typedef struct ds4_hc_pre_args {
    DS4_STAGE_COMMON;
    const ds4_weight *fn;    /* n_hc*D -> (2+n_hc)*n_hc */
    const float *scale;      /* (3) */
    const float *base;       /* ((2+n_hc)*n_hc) */
    const float *norm_w;     /* (D) attn_norm or ffn_norm */
    float *X;                /* (n, n_hc, D); in/out when py is set */
    float *out;              /* out (n, D): RMSNorm_{norm_w}(sum_s pre_s X_s) */
    float *post;             /* out (n, n_hc) */
    float *comb;             /* out (n, n_hc, n_hc): comb[a][b], a = source stream */
    /* Optional: the previous sublayer's HC-post, applied to X first, with the
     * inputs of ds4_hc_post_args (y (n, D), post, comb); NULL when X is up to
     * date. ppost / pcomb may be this call's post / comb (read before they
     * are written). A backend may fuse the two (one pass over X). */
    const float *py, *ppost, *pcomb;
} ds4_hc_pre_args;

/* q and kv paths (C.3 steps 1-7 without the store). */
typedef struct ds4_attn_project_args {
    DS4_STAGE_COMMON;
    const ds4_layer *l;
    const ds4_rope *rope;
    ds4_numerics num;
    const float *u;          /* (n, D) attention input */
    float *cq;               /* out (n, q_lora): normalised query latent */
    float *q;                /* out (n, H, head_dim): per-head norm, RoPE */
    float *kv;               /* out (n, head_dim): norm, RoPE, FP8 + half if on */
} ds4_attn_project_args;

/* One compressor instance (C.5): the attention compressor (d = head_dim) or
 * the indexer compressor (d = idx_dim) of a layer. Appends the rows of every
 * window completed by the batch. */
typedef struct ds4_compress_args {
    DS4_STAGE_COMMON;
    const ds4_rope *rope;
    ds4_numerics num;
    bool indexer;            /* indexer instance: Hadamard+FP4; else FP8 */
    int ratio;               /* R */
    bool overlap;            /* R = 4 two-series windows (c = 2) */
    int d;                   /* output row width */
    const ds4_weight *ape;   /* (R rows of c*d) */
    const ds4_weight *wkv, *wgate;  /* D -> c*d */
    const float *norm_w;     /* (d) */
    const float *u;          /* (n, D) */
    float *fa, *fg;          /* frontier rings (c*R, c*d) */
    void *rows;              /* (cap, d) in row_type: row k = window k */
    int row_type;            /* DS4_TYPE_F32 or DS4_TYPE_F16 */
    int cap;
} ds4_compress_args;

/* Lightning indexer (C.6) for a CSA layer: per token, the visible
 * compressed rows (all when there are <= top_k, else the top_k best scores,
 * ties to the lower index), ascending. */
typedef struct ds4_indexer_args {
    DS4_STAGE_COMMON;
    const ds4_layer *l;
    const ds4_rope *rope;
    ds4_numerics num;
    const float *cq;         /* (n, q_lora) */
    const float *u;          /* (n, D) */
    const void *idx_rows;    /* (>= (pos0+n)/4, idx_dim) in row_type */
    int row_type;
    int32_t *sel;            /* out (n, top_k) row ids, ascending */
    int32_t *n_sel;          /* out (n) */
} ds4_indexer_args;

/* Attention core with sinks, inverse RoPE and grouped output projection
 * (C.7). Raw rows of positions < pos0 come from the ring, the others from
 * the batch's kv. */
typedef struct ds4_attention_args {
    DS4_STAGE_COMMON;
    const ds4_layer *l;
    const ds4_rope *rope;
    ds4_numerics num;
    const float *q;          /* (n, H, head_dim) */
    const float *kv;         /* (n, head_dim) this batch's raw rows */
    const void *raw;         /* ring (window, head_dim) holding positions < pos0, row_type */
    const void *comp;        /* (comp_cap, head_dim) compressed rows or NULL, row_type */
    int comp_cap;            /* rows allocated in comp (bounds what any step may read) */
    int row_type;
    const int32_t *sel;      /* CSA: (n, top_k) from indexer_select; else NULL */
    const int32_t *n_sel;
    float *y;                /* out (n, D) */
} ds4_attention_args;

/* Pushes the batch's raw rows into the ring (after attention read them). */
typedef struct ds4_kv_store_args {
    DS4_STAGE_COMMON;
    const float *kv;         /* (n, head_dim) */
    void *raw;               /* ring (window, head_dim), row_type */
    int row_type;
} ds4_kv_store_args;

/* HC-post (C.2): X_b <- post_b * y + sum_a comb[a][b] X_a. */
typedef struct ds4_hc_post_args {
    DS4_STAGE_COMMON;
    const float *y;          /* (n, D) */
    const float *post;       /* (n, n_hc) */
    const float *comb;       /* (n, n_hc, n_hc) */
    float *X;                /* in/out (n, n_hc, D) */
} ds4_hc_post_args;

/* Router (C.8): hash table or biased top-k, weights from sqrt(softplus). */
typedef struct ds4_moe_route_args {
    DS4_STAGE_COMMON;
    const ds4_layer *l;
    const int32_t *tokens;   /* (n) backend memory: DS4_STEP_TOKENS(step) */
    const float *v;          /* (n, D) */
    int32_t *ids;            /* out (n, k) */
    float *w;                /* out (n, k) */
} ds4_moe_route_args;

/* Routed experts (each (token, slot) applied once, in slot order) + shared. */
typedef struct ds4_moe_experts_args {
    DS4_STAGE_COMMON;
    const ds4_layer *l;
    int il;                  /* layer index (clamp: m->hp.swiglu_clamp[il]) */
    ds4_numerics num;
    const float *v;          /* (n, D) */
    const int32_t *ids;      /* (n, k) */
    const float *w;          /* (n, k) */
    float *y;                /* out (n, D) */
    float *act;              /* out (n, k, F) or NULL: each slot's down-projection input (SwiGLU times the
                                route weight), for imatrix collection; backends without it leave it alone */
} ds4_moe_experts_args;

/* Output head (C.9) on n_out states; X points at the first of them. */
typedef struct ds4_head_args {
    DS4_STAGE_COMMON;        /* n here = the states given (1 or the batch) */
    ds4_numerics num;
    const float *X;          /* (n, n_hc, D) */
    float *logits;           /* out (n, n_vocab) */
} ds4_head_args;

/* MTP input (MODEL.md C.12 steps 1-3), the one stage of the MTP block
 * that the main model has no equivalent for. The model is the bound MTP
 * model (ds4_model_load_mtp): per token t,
 *   e   = e_proj . RMSNorm_{mtp_enorm}(tok_embd[tokens[t]])
 *   X_s = e + h_proj . RMSNorm_{mtp_hnorm}(hc[t]_s)   for each stream s,
 * with the matrix products under the numerics' activation rule (E.1), each
 * row computed as in a batch of one. Optional in the vtable: a backend
 * without it cannot load an MTP model (refused at open). */
typedef struct ds4_mtp_embed_args {
    DS4_STAGE_COMMON;
    ds4_numerics num;
    const int32_t *tokens;   /* (n) backend memory: DS4_STEP_TOKENS(step) */
    const float *hc;         /* (n, n_hc, D) incoming HC states */
    float *X;                /* out (n, n_hc, D) */
} ds4_mtp_embed_args;

/* How a model is bound. synthetic: weights whose data is NULL in the host
 * description are filled by the backend with ds4_synth values (no file). */
typedef struct ds4_bind_opts {
    bool synthetic;
    uint64_t seed;
    /* Progress (bytes done of total); may be NULL. Non-zero return cancels. */
    int (*progress)(void *user, int64_t done, int64_t total);
    void *progress_user;
} ds4_bind_opts;

typedef struct ds4_step_info {
    const ds4_step *step;    /* backend memory, uploaded */
    int n, pos0;             /* host copies */
    /* Non-zero when every stage call of this step (pointers, n and every
     * other argument except pos0 and the step's contents) is identical for
     * all steps with this key: the backend may capture the stages once and
     * replay them. 0 = run eagerly. The low DS4_GRAPH_SESSION_BITS bits
     * name the session (forget drops all of its keys), the bits above the
     * step's shape (batch size, all-rows logits). */
    uint64_t graph_key;
} ds4_step_info;

#define DS4_GRAPH_SESSION_BITS 40
#define DS4_GRAPH_SESSION(key) ((key) & ((UINT64_C(1) << DS4_GRAPH_SESSION_BITS) - 1))

/* Stage kinds for per-stage timing (ds4-bench --profile). */
enum {
    DS4_PROF_EMBED = 0, DS4_PROF_HC_PRE, DS4_PROF_ATTN_PROJECT, DS4_PROF_COMPRESS, DS4_PROF_INDEXER,
    DS4_PROF_ATTENTION, DS4_PROF_KV_STORE, DS4_PROF_HC_POST, DS4_PROF_MOE_ROUTE, DS4_PROF_MOE_EXPERTS,
    DS4_PROF_HEAD, DS4_PROF_LINK /* HC states to the next part of a layer split */, DS4_PROF_N
};

/* One backend -> backend copy of copy_many. */
typedef struct {
    void *dst;
    const void *src;
    size_t bytes;
} ds4_copy;

typedef struct ds4_backend_ops {
    const char *name;
    void (*destroy)(void *ctx);
    /* Refuses a model the backend cannot run (types, shapes). */
    int (*check_model)(void *ctx, const ds4_model *m, ds4_err *err);
    /* Binds a loaded model: *bound is the backend's description of it (see
     * the memory notes). For the CPU it may be `host` itself. The host model
     * (and its mapping) must outlive the binding. */
    int (*bind_model)(void *ctx, const ds4_model *host, const ds4_bind_opts *o, ds4_model **bound,
                      ds4_err *err);
    void (*unbind_model)(void *ctx, ds4_model *bound);
    /* Row type of cached KV rows for these numerics (DS4_TYPE_F32 / F16). */
    int (*kv_row_type)(void *ctx, ds4_numerics num);
    /* Grows the backend's scratch for batches of n_batch tokens and contexts
     * of n_ctx positions. Called when a session is created, never inside a
     * step. */
    int (*reserve)(void *ctx, const ds4_model *bound, int n_batch, int n_ctx, ds4_err *err);
    /* Zero-filled backend memory, NULL when out of memory. */
    void *(*alloc)(void *ctx, size_t bytes);
    void (*free)(void *ctx, void *p);
    /* host -> backend: src may be reused when the call returns; ordered
     * before every later stage. */
    int (*upload)(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err);
    /* backend -> host: complete on return (after every earlier stage). */
    int (*download)(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err);
    /* backend -> backend copy, ordered with the stages. */
    int (*copy)(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err);
    /* Optional: n backend -> backend copies at once, ordered with the stages
     * (the speculative save/restore of ~430 ring runs per cycle: one launch
     * instead of one copy each). The regions of different copies must not
     * overlap. NULL: the caller loops over copy. */
    int (*copy_many)(void *ctx, const ds4_copy *v, int n, ds4_err *err);
    /* Starts a step. Returns 1 when the backend replayed a captured step for
     * si->graph_key (the caller then issues no stages and calls step_end),
     * 0 when the stages must be issued, or a negative error. */
    int (*step_begin)(void *ctx, const ds4_step_info *si, ds4_err *err);
    int (*step_end)(void *ctx, ds4_err *err);
    /* Forgets every step captured under a key of session graph_key (its
     * buffers are going away): keys k with DS4_GRAPH_SESSION(k) == graph_key. */
    void (*forget)(void *ctx, uint64_t graph_key);
    /* ids[r] = argmax of logits row r (n_vocab floats, backend memory): the
     * lowest index of the largest finite value, -1 when none is finite (a
     * broken model: the forward layer reports it).
     * ids is host memory; complete on return. */
    int (*argmax)(void *ctx, const float *logits, int n_rows, int n_vocab, int32_t *ids, ds4_err *err);
    /* Optional (NULL when unsupported), for benchmarks and tests:
     * prof_mark(kind) says that a stage of that kind starts now (kind =
     * DS4_PROF_N closes the last one) in an eager step; prof_read adds up the
     * milliseconds per kind since the last read into ms[DS4_PROF_N] and
     * resets. bandwidth measures the device's streaming read rate (GB/s).
     * describe writes a one-line description of the device and memory use. */
    void (*prof_mark)(void *ctx, int kind);
    int (*prof_read)(void *ctx, double *ms);
    int (*bandwidth)(void *ctx, double *gbps, ds4_err *err);
    void (*describe)(void *ctx, char *buf, size_t cap);

    int (*embed)(void *ctx, const ds4_embed_args *a);
    int (*hc_pre)(void *ctx, const ds4_hc_pre_args *a);
    int (*attn_project)(void *ctx, const ds4_attn_project_args *a);
    int (*compress_update)(void *ctx, const ds4_compress_args *a);
    int (*indexer_select)(void *ctx, const ds4_indexer_args *a);
    int (*attention)(void *ctx, const ds4_attention_args *a);
    int (*kv_store)(void *ctx, const ds4_kv_store_args *a);
    int (*hc_post)(void *ctx, const ds4_hc_post_args *a);
    int (*moe_route)(void *ctx, const ds4_moe_route_args *a);
    int (*moe_experts)(void *ctx, const ds4_moe_experts_args *a);
    int (*head)(void *ctx, const ds4_head_args *a);
    /* MTP only (NULL = the backend has no MTP support). */
    int (*mtp_embed)(void *ctx, const ds4_mtp_embed_args *a);
    /* Optional, for a layer split (forward.h ds4_fwd_new_split): copies bytes
     * from src (this backend's memory) to dst in the memory of peer_ctx,
     * another context of this same ops table (e.g. the next GPU). Ordered
     * after every earlier stage of this backend and before every later
     * stage of the peer. NULL: forward.c stages the bytes through the host. */
    int (*link)(void *ctx, void *peer_ctx, void *dst, const void *src, size_t bytes, ds4_err *err);
    /* Optional: nonzero, with err filled, when the backend can no longer run
     * anything for a reason other than memory (a worker's connection lost,
     * remote.c). Ops that cannot report an error (alloc, kv_row_type) are
     * followed by this question, so that the user is told the cause. */
    int (*lost)(void *ctx, ds4_err *err);
} ds4_backend_ops;

typedef struct ds4_backend {
    const ds4_backend_ops *ops;
    void *ctx;
} ds4_backend;

/* The CPU reference backend with n_threads workers (0 = online cores).
 * Fails with DS4_E_NOMEM or DS4_E_INTERNAL (thread creation). */
int ds4_cpu_backend_new(int n_threads, ds4_backend *out, ds4_err *err);

/* The strict test backend: the CPU reference's math behind a contract
 * checker. It copies the bound weights into its own arena and fails any
 * stage (DS4_E_INTERNAL, naming the stage and argument) that receives a
 * pointer it did not allocate or bind. For tests and --strict-backend. */
int ds4_strict_backend_new(int n_threads, ds4_backend *out, ds4_err *err);

/* The CUDA backend on device `device` (built with `make cuda`). Fails with
 * DS4_E_BACKEND when no device is usable, naming the CUDA error. */
typedef struct ds4_cuda_opts {
    int device;
    bool sync_debug;   /* synchronise and check after every launch */
    bool no_graphs;    /* never capture decode steps */
    bool profile;      /* per-stage event timing (ds4_debug) */
    bool multi;        /* one of several CUDA backends of this thread: every op selects its device */
} ds4_cuda_opts;
int ds4_cuda_backend_new(const ds4_cuda_opts *o, ds4_backend *out, ds4_err *err);
/* Joins n CUDA backends (created with .multi) into one NCCL communicator,
 * one rank per distinct device, so that their link op passes bytes between
 * them (parts on one device send to themselves through NCCL). DS4_E_BACKEND
 * when this build or machine has no NCCL, naming what is missing. */
int ds4_cuda_link_parts(ds4_backend *bes, int n, ds4_err *err);

#endif
