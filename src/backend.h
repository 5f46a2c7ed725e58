/* backend.h - the backend vtable and one argument struct per stage.
 *
 * forward.c owns the one layer loop and calls these stages in order; a
 * backend (src/cpu/ now, src/cuda/ later) implements the math of each stage
 * and never re-implements the loop, so cache layout and ordering cannot drift
 * between backends. Stages are shaped like DeepSeek V4 itself (MODEL.md §C):
 * hc_pre, attn_project, compress_update, indexer_select, attention, kv_store,
 * hc_post, moe_route, moe_experts, head.
 *
 * Memory: every float pointer in an argument struct is backend memory
 * obtained from ops->alloc (host memory on the CPU, device memory on CUDA);
 * token ids and the ds4_model/ds4_layer descriptions are host memory.
 * Shapes are written (rows, cols), row-major, n = tokens in the batch,
 * pos0 = absolute position of the batch's first token.
 *
 * Batches: a stage processes n consecutive tokens. Every per-token result is
 * computed by exactly the same operations in the same order whatever n is, so
 * on the CPU a prefill of N tokens is bit-identical to N decode steps.
 *
 * Errors: stages return 0 or a negative DS4_E* (the first error is kept by
 * the backend and reported at the next stage boundary). Unsupported shapes
 * are refused by ops->check_model at open, never mid-request.
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

/* KV state of one layer (MODEL.md §D.1), in backend memory; forward.c
 * decides the layout and the capacities. */
typedef struct ds4_layer_state {
    float *raw;       /* (window, head_dim) ring: position p at row p % window */
    float *comp;      /* (comp_cap, head_dim) compressed rows, append-only (R != 0) */
    float *comp_a;    /* (c*R, c*head_dim) compressor frontier ring: token p at */
    float *comp_g;    /*   row p % (c*R); g includes ape (R != 0) */
    float *idx;       /* (idx_cap, idx_dim) indexer key rows (CSA) */
    float *icomp_a;   /* (8, 2*idx_dim) indexer compressor frontier (CSA) */
    float *icomp_g;
    int comp_cap, idx_cap;
} ds4_layer_state;

typedef struct ds4_embed_args {
    const ds4_model *m;
    int n;
    const int32_t *tokens;   /* (n) host, validated ids */
    float *X;                /* out (n, n_hc, D): every stream = the embedding */
} ds4_embed_args;

/* HC-pre (MODEL.md C.2) + the sublayer's RMSNorm. */
typedef struct ds4_hc_pre_args {
    const ds4_model *m;
    int n;
    const ds4_weight *fn;    /* n_hc*D -> (2+n_hc)*n_hc */
    const float *scale;      /* (3) */
    const float *base;       /* ((2+n_hc)*n_hc) */
    const float *norm_w;     /* (D) attn_norm or ffn_norm */
    const float *X;          /* (n, n_hc, D) */
    float *out;              /* out (n, D): RMSNorm_{norm_w}(sum_s pre_s X_s) */
    float *post;             /* out (n, n_hc) */
    float *comb;             /* out (n, n_hc, n_hc): comb[a][b], a = source stream */
} ds4_hc_pre_args;

/* q and kv paths (C.3 steps 1-7 without the store). */
typedef struct ds4_attn_project_args {
    const ds4_model *m;
    const ds4_layer *l;
    const ds4_rope *rope;
    ds4_numerics num;
    int n, pos0;
    const float *u;          /* (n, D) attention input */
    float *cq;               /* out (n, q_lora): normalised query latent */
    float *q;                /* out (n, H, head_dim): per-head norm, RoPE */
    float *kv;               /* out (n, head_dim): norm, RoPE, FP8 + half if on */
} ds4_attn_project_args;

/* One compressor instance (C.5): the attention compressor (d = head_dim) or
 * the indexer compressor (d = idx_dim) of a layer. Appends the rows of every
 * window completed by the batch. */
typedef struct ds4_compress_args {
    const ds4_model *m;
    const ds4_rope *rope;
    ds4_numerics num;
    bool indexer;            /* indexer instance: Hadamard+FP4; else FP8 */
    int ratio;               /* R */
    bool overlap;            /* R = 4 two-series windows (c = 2) */
    int d;                   /* output row width */
    const ds4_weight *ape;   /* (R rows of c*d) */
    const ds4_weight *wkv, *wgate;  /* D -> c*d */
    const float *norm_w;     /* (d) */
    int n, pos0;
    const float *u;          /* (n, D) */
    float *fa, *fg;          /* frontier rings (c*R, c*d) */
    float *rows;             /* (cap, d): row k = window k */
    int cap;
} ds4_compress_args;

/* Lightning indexer (C.6) for a CSA layer: per token, the visible
 * compressed rows (all when there are <= top_k, else the top_k best scores,
 * ties to the lower index), ascending. */
typedef struct ds4_indexer_args {
    const ds4_model *m;
    const ds4_layer *l;
    const ds4_rope *rope;
    ds4_numerics num;
    int n, pos0;
    const float *cq;         /* (n, q_lora) */
    const float *u;          /* (n, D) */
    const float *idx_rows;   /* (>= (pos0+n)/4, idx_dim) */
    int32_t *sel;            /* out (n, top_k) row ids, ascending */
    int32_t *n_sel;          /* out (n) */
} ds4_indexer_args;

/* Attention core with sinks, inverse RoPE and grouped output projection
 * (C.7). Raw rows of positions < pos0 come from the ring, the others from
 * the batch's kv. */
typedef struct ds4_attention_args {
    const ds4_model *m;
    const ds4_layer *l;
    const ds4_rope *rope;
    ds4_numerics num;
    int n, pos0;
    const float *q;          /* (n, H, head_dim) */
    const float *kv;         /* (n, head_dim) this batch's raw rows */
    const float *raw;        /* ring (window, head_dim) holding positions < pos0 */
    const float *comp;       /* (rows, head_dim) compressed rows or NULL */
    const int32_t *sel;      /* CSA: (n, top_k) from indexer_select; else NULL */
    const int32_t *n_sel;
    float *y;                /* out (n, D) */
} ds4_attention_args;

/* Pushes the batch's raw rows into the ring (after attention read them). */
typedef struct ds4_kv_store_args {
    const ds4_model *m;
    int n, pos0;
    const float *kv;         /* (n, head_dim) */
    float *raw;              /* ring (window, head_dim) */
} ds4_kv_store_args;

/* HC-post (C.2): X_b <- post_b * y + sum_a comb[a][b] X_a. */
typedef struct ds4_hc_post_args {
    const ds4_model *m;
    int n;
    const float *y;          /* (n, D) */
    const float *post;       /* (n, n_hc) */
    const float *comb;       /* (n, n_hc, n_hc) */
    float *X;                /* in/out (n, n_hc, D) */
} ds4_hc_post_args;

/* Router (C.8): hash table or biased top-k, weights from sqrt(softplus). */
typedef struct ds4_moe_route_args {
    const ds4_model *m;
    const ds4_layer *l;
    int n;
    const int32_t *tokens;   /* (n) host */
    const float *v;          /* (n, D) */
    int32_t *ids;            /* out (n, k) */
    float *w;                /* out (n, k) */
} ds4_moe_route_args;

/* Routed experts (each (token, slot) applied once, in slot order) + shared. */
typedef struct ds4_moe_experts_args {
    const ds4_model *m;
    const ds4_layer *l;
    ds4_numerics num;
    int n;
    const float *v;          /* (n, D) */
    const int32_t *ids;      /* (n, k) */
    const float *w;          /* (n, k) */
    float *y;                /* out (n, D) */
} ds4_moe_experts_args;

/* Output head (C.9) on n states. */
typedef struct ds4_head_args {
    const ds4_model *m;
    ds4_numerics num;
    int n;
    const float *X;          /* (n, n_hc, D) */
    float *logits;           /* out (n, n_vocab) */
} ds4_head_args;

typedef struct ds4_backend_ops {
    const char *name;
    void (*destroy)(void *ctx);
    /* Refuses a model the backend cannot run (types, shapes). */
    int (*check_model)(void *ctx, const ds4_model *m, ds4_err *err);
    /* Zero-filled backend memory, NULL when out of memory. */
    void *(*alloc)(void *ctx, size_t bytes);
    void (*free)(void *ctx, void *p);
    void (*upload)(void *ctx, void *dst, const void *src, size_t bytes);   /* host -> backend */
    void (*download)(void *ctx, void *dst, const void *src, size_t bytes); /* backend -> host */
    void (*step_begin)(void *ctx);
    int (*step_end)(void *ctx, ds4_err *err);

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
} ds4_backend_ops;

typedef struct ds4_backend {
    const ds4_backend_ops *ops;
    void *ctx;
} ds4_backend;

/* The CPU reference backend with n_threads workers (0 = online cores).
 * Fails with DS4_E_NOMEM or DS4_E_INTERNAL (thread creation). */
int ds4_cpu_backend_new(int n_threads, ds4_backend *out, ds4_err *err);

#endif
