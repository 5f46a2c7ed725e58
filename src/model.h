/* model.h - the DeepSeek V4 model description: hyperparameters read from the
 * GGUF metadata, the per-layer kinds, and the GGUF-name -> typed-weight table.
 *
 * Nothing about Flash's size is hard-coded: every dimension comes from the
 * `deepseek4.*` keys (docs/MODEL.md §A, docs/FORMATS.md §D.4) and every tensor is bound
 * by name and checked for shape and type against those dimensions (docs/MODEL.md
 * §B). Any mismatch fails the load with DS4_E_MODEL and a message naming the
 * key or tensor (expected vs actual). Per layer: compress ratio 0 = sliding
 * window only, 4 = CSA (overlapping compressor + lightning indexer), any other
 * R > 0 = HCA (non-overlapping compressor); the first hash_layer_count layers
 * route by the tid2eid table.
 *
 * A ds4_model borrows the ds4_gguf it was loaded from (weights are zero-copy
 * views into the mapping): the gguf must outlive the model. Small vectors
 * (norm weights, HC scales/bases, sinks, router bias) are converted to owned
 * float32 arrays at load. A loaded model is immutable and may be read by any
 * number of threads.
 */
#ifndef DS4_MODEL_H
#define DS4_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "util/err.h"

/* One matrix or expert stack bound from the file: a typed handle. Rows are
 * n_in values (ne[0]) of `type`; n_out rows per matrix (ne[1]); n_mat
 * matrices (ne[2], experts) of mat_bytes each. */
/* The ranges (lo, hi] the loader accepts for float hyperparameters that a
 * finite but absurd value breaks (an epsilon of 0 divides by zero; a scale
 * of 3e38 or a YaRN factor of 1e-45 turns every logit into NaN). ds4-convert
 * checks config.json against the same ranges, so a file it writes loads. */
#define DS4_EPS_RANGE 0.0, 0.5            /* hyper_connection.epsilon, layer_norm_rms_epsilon */
#define DS4_EXPERT_SCALE_RANGE 0.0, 1e4   /* expert_weights_scale (routed_scaling_factor) */
#define DS4_ROPE_BASE_RANGE 1.0, 1e12     /* rope.freq_base, compress_rope_freq_base */
#define DS4_YARN_FACTOR_RANGE 1e-6, 1e6   /* rope.scaling.factor */
#define DS4_YARN_BETA_RANGE 1e-6, 1e6     /* rope.scaling.yarn_beta_fast / _slow */
static inline bool ds4_in_range(double v, double lo, double hi) { return v > lo && v <= hi; }

typedef struct ds4_weight {
    const char *name;   /* GGUF tensor name (owned by the gguf handle) */
    int type;           /* ggml type id (quant.h DS4_TYPE_*) */
    int64_t n_in;       /* values per row */
    int64_t n_out;      /* rows per matrix */
    int64_t n_mat;      /* matrices (1 unless an expert stack) */
    size_t row_bytes;   /* bytes of one row */
    size_t mat_bytes;   /* bytes of one matrix (n_out * row_bytes) */
    const void *data;   /* first byte (zero-copy view into the mapping) */
} ds4_weight;

typedef enum {
    DS4_ATTN_SLIDING = 0, /* R = 0: raw window only */
    DS4_ATTN_CSA = 1,     /* R = 4: overlapping compressor + indexer */
    DS4_ATTN_HCA = 2,     /* other R > 0: non-overlapping compressor */
} ds4_attn_kind;

/* RoPE frequencies of one rope family ("main" for sliding layers,
 * "compress" for CSA/HCA layers, docs/MODEL.md C.4). */
typedef struct ds4_rope {
    float base;
    bool yarn;
    float *inv_freq;    /* (n_rot/2) angular frequency per pair, float32 */
} ds4_rope;

typedef struct ds4_hparams {
    int n_layer, n_embd, n_vocab;
    int n_head, n_head_kv, head_dim, n_rot;   /* n_rot: trailing RoPE dims */
    int q_lora, o_lora, o_groups;
    int n_expert, n_expert_used, n_ff_exp, n_expert_shared, n_hash;
    int window;                               /* raw sliding window (incl. current) */
    int idx_heads, idx_dim, idx_topk;
    int n_hc, sinkhorn_iters;
    float hc_eps, rms_eps;
    float expert_weights_scale;
    bool expert_weights_norm;
    float rope_base, compress_rope_base;
    bool yarn;                                /* YaRN on compressed layers */
    float yarn_factor, yarn_beta_fast, yarn_beta_slow;
    uint64_t yarn_orig_ctx;
    int *compress_ratio;                      /* (n_layer) */
    float *swiglu_clamp;                      /* (n_layer) */
    uint64_t context_length;                  /* display only; 0 if absent */
} ds4_hparams;

typedef struct ds4_layer {
    ds4_attn_kind kind;
    int ratio;                /* R (0 for sliding) */
    bool hash;                /* hash-routed MoE */
    /* hyper-connections: fn (n_hc*D -> (2+n_hc)*n_hc), scale (3), base */
    ds4_weight hc_attn_fn, hc_ffn_fn;
    float *hc_attn_scale, *hc_attn_base, *hc_ffn_scale, *hc_ffn_base;
    /* attention */
    float *attn_norm;         /* (D) */
    ds4_weight q_a;           /* D -> q_lora */
    float *q_a_norm;          /* (q_lora) */
    ds4_weight q_b;           /* q_lora -> H*head_dim */
    ds4_weight kv;            /* D -> head_dim */
    float *kv_norm;           /* (head_dim) */
    float *sinks;             /* (H) */
    ds4_weight o_a;           /* H*head_dim/G -> G*o_lora (group g: rows g*o_lora..) */
    ds4_weight o_b;           /* G*o_lora -> D */
    /* compressor (R != 0): width w = c*head_dim, c = 2 for CSA, 1 for HCA */
    ds4_weight comp_ape;      /* (R rows of w): added to the gate by slot */
    ds4_weight comp_kv, comp_gate; /* D -> w */
    float *comp_norm;         /* (head_dim) */
    /* indexer (CSA) */
    ds4_weight idx_q_b;       /* q_lora -> idx_heads*idx_dim */
    ds4_weight idx_proj;      /* D -> idx_heads */
    ds4_weight icomp_ape;     /* (4 rows of 2*idx_dim) */
    ds4_weight icomp_kv, icomp_gate; /* D -> 2*idx_dim */
    float *icomp_norm;        /* (idx_dim) */
    /* FFN */
    float *ffn_norm;          /* (D) */
    ds4_weight gate_inp;      /* D -> n_expert (router) */
    float *exp_bias;          /* (n_expert) selection bias, zeros if absent */
    int32_t *tid2eid;         /* (n_vocab, n_expert_used) owned copy, hash layers; checked in range */
    ds4_weight gate_exps, up_exps; /* D -> F, n_expert matrices */
    ds4_weight down_exps;     /* F -> D, n_expert matrices */
    ds4_weight gate_sh, up_sh, down_sh; /* shared expert */
} ds4_layer;

typedef struct ds4_model {
    ds4_hparams hp;
    ds4_rope rope_main, rope_compress;
    ds4_weight tok_embd;      /* rows of D per token */
    ds4_weight out_hc_fn;     /* n_hc*D -> n_hc */
    float *out_hc_base;       /* (n_hc) */
    float *out_hc_scale;      /* (1) */
    float *out_norm;          /* (D) */
    ds4_weight output;        /* D -> n_vocab */
    ds4_layer *layers;        /* (n_layer) */
    /* MTP models only (ds4_model_load_mtp), zero otherwise: the input
     * projections of MODEL.md C.12. */
    ds4_weight mtp_e_proj, mtp_h_proj; /* D -> D */
    float *mtp_enorm, *mtp_hnorm;      /* (D) */
    bool weights_loaded;
    char *arch_name;          /* general.name or NULL */
    char *owned_names;        /* tensor names of a synthetic model, else NULL */
    int n_owned_names;
} ds4_model;

/* Reads hyperparameters only (no tensors): for vocab-only opens and for
 * describing a file. Fails with DS4_E_MODEL naming the key. */
int ds4_model_read_hparams(ds4_hparams *hp, const ds4_gguf *g, ds4_err *err);
void ds4_hparams_free(ds4_hparams *hp);

/* Loads hyperparameters and binds + validates every tensor. On failure the
 * model is left freed (ds4_model_free is still safe) and err names the
 * key/tensor. */
int ds4_model_load(ds4_model *m, const ds4_gguf *g, ds4_err *err);
void ds4_model_free(ds4_model *m);

/* Loads the MTP block (MODEL.md C.12, FORMATS.md D.3) from its own GGUF as
 * a one-layer model beside `main` (a loaded, non-synthetic model): hp is a
 * copy of main's with n_layer 1, layers[0] the `mtp.0.*` block (ratio 0,
 * biased routing, exp_probs_b.bias required), out_hc_* / out_norm the MTP
 * head (hc_head_*, norm), mtp_* the input projections, and tok_embd /
 * output views of main's tensors (main must outlive it). The file's
 * metadata is not read. Every tensor is checked for shape and type like the
 * main file's; failures name the tensor. */
int ds4_model_load_mtp(ds4_model *mtp, const ds4_model *main, const ds4_gguf *g, ds4_err *err);

/* Builds the DeepSeek V4 Flash description without a file (ds4-bench
 * --synthetic): recipe "q2" or "q4" sets the published tensor types; every
 * ds4_weight has data = NULL (the backend fills it, synth.h) and the small
 * vectors (norms, HC scale/base, sinks, biases, tid2eid) are generated here
 * from seed. Names are static storage. DS4_E_ARG for another recipe. */
int ds4_model_synth(ds4_model *m, const char *recipe, uint64_t seed, ds4_err *err);
/* The MTP block (as ds4_model_load_mtp) of the published recipe beside a
 * synthetic main model, weights left for the backend to fill. */
int ds4_model_synth_mtp(ds4_model *m, const ds4_model *main, uint64_t seed, ds4_err *err);
/* The value spread synthetic filling uses for weight w. */
float ds4_model_synth_std(const ds4_weight *w);

/* A backend's copy of a model description: the struct and its layers array
 * are new (host memory), every pointer still points where m's do until the
 * backend rewrites it (ds4_model_visit_all). hp's arrays and the tensor
 * names stay owned by m. ds4_model_mirror_free frees only the copy. */
ds4_model *ds4_model_mirror(const ds4_model *m);
void ds4_model_mirror_free(ds4_model *mm);

/* One part of a layer split (docs/ARCHITECTURE.md): a mirror of m in which
 * only blocks [l0, l1) keep their weights and vectors, plus the token
 * embedding when `first` and the output head (output_hc_*, output_norm,
 * output) when `last`; everything else is hollow (weights with n_in 0 and
 * no data, vectors NULL), so binding it uploads only the part. Layer kinds,
 * ratios and hp stay whole. Free with ds4_model_mirror_free. */
ds4_model *ds4_model_part(const ds4_model *m, int l0, int l1, bool first, bool last);
/* Bytes of the weights of block il (every matrix and vector it binds). */
size_t ds4_model_layer_bytes(const ds4_model *m, int il);

/* Calls weight() for every bound weight (n_in > 0) and vec() for every data
 * vector (norms, HC scale/base, sinks, biases, tid2eid, RoPE frequencies)
 * with its size in bytes; a callback may replace the pointer. Stops at the
 * first non-zero return and returns it. */
typedef struct ds4_model_visit {
    int (*weight)(void *user, ds4_weight *w);
    int (*vec)(void *user, void **p, size_t bytes);
    void *user;
} ds4_model_visit;
int ds4_model_visit_all(ds4_model *m, const ds4_model_visit *v);

/* Head-major helpers derived from hp. */
static inline int ds4_model_comp_width(const ds4_model *m, int il) {
    const ds4_layer *l = &m->layers[il];
    return l->kind == DS4_ATTN_CSA ? 2 * m->hp.head_dim : m->hp.head_dim;
}

#endif
