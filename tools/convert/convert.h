/* convert.h - ds4-convert internals shared between its source files.
 *
 * tokenizer_json.c: tokenizer.json (Hugging Face) -> GGUF tokenizer keys.
 * safetensors.c: read-only views of *.safetensors; hf.c: config.json, the
 * tensor plan (main and MTP files, recipes, --type-map), HF / official name
 * mapping with FP8/FP4 scale binding; stream.c: the chunked, threaded tensor
 * producer (decode + quantize + write); imatrix.c: legacy .dat importance
 * matrices; demo.c: the random-weight demo model; main.c: the command line.
 */
#ifndef DS4_CONVERT_H
#define DS4_CONVERT_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "util/err.h"

/* ---- tokenizer (tokenizer_json.c) --------------------------------------- */

/* Vocabulary width of the published DeepSeek V4 Flash files: the token
 * table is padded to this many entries with "[PADn]" tokens. */
#define DS4_CONVERT_V4_N_VOCAB 129280

/* A byte-level BPE tokenizer read from a tokenizer.json, laid out as the
 * GGUF keys want it. All arrays have n_tokens (resp. n_merges) entries and
 * are owned by the struct. */
typedef struct ds4_tokjson {
    int n_tokens;
    char **tokens;          /* byte-level strings; markers literal; "[PADn]" gaps */
    size_t *token_lens;
    int32_t *token_type;    /* 1 normal, 3 control, 4 user-defined, 5 unused */
    int n_merges;
    char **merges;          /* "left right", rank = index */
    size_t *merge_lens;
    int32_t bos_id, eos_id, pad_id; /* -1 when the string is absent */
} ds4_tokjson;

/* Reads a Hugging Face tokenizer.json of type BPE (model.vocab, model.merges
 * as "a b" strings or ["a","b"] pairs, added_tokens). Adds the DeepSeek V4
 * tokens <think>, </think> and ｜DSML｜ when absent (docs/TEXT.md A.8: at ids
 * 128821, 128822, 128825 when those are free, else after the last id), and
 * pads the table with "[PADn]" (type unused) up to pad_to entries (never
 * truncates; 0 = no padding). Returns 0, or DS4_E_IO / DS4_E_FORMAT (not a
 * BPE tokenizer.json, duplicate or out-of-range ids; the message names the
 * entry) / DS4_E_NOMEM. On failure *tj is left empty. */
int ds4_tokjson_load(ds4_tokjson *tj, const char *path, int pad_to, ds4_err *err);
void ds4_tokjson_free(ds4_tokjson *tj);

/* Loads tokenizer_json_path (padded to DS4_CONVERT_V4_N_VOCAB) and adds the
 * tokenizer keys of the published GGUFs to w: tokenizer.ggml.model "gpt2",
 * .pre "joyai-llm", .tokens, .token_type, .merges, .bos_token_id,
 * .eos_token_id, .padding_token_id (when present), .add_bos_token true,
 * .add_eos_token false. Returns 0 or the error of ds4_tokjson_load / the
 * writer. */
int ds4_convert_add_tokenizer(ds4_gguf_writer *w, const char *tokenizer_json_path, ds4_err *err);

/* ---- safetensors (safetensors.c) ----------------------------------------- */

enum {
    DS4_ST_F32, DS4_ST_F16, DS4_ST_BF16, DS4_ST_I64, DS4_ST_I32, DS4_ST_F64, DS4_ST_I8, DS4_ST_U8,
    DS4_ST_I16, DS4_ST_BOOL, DS4_ST_F8_E4M3, DS4_ST_F8_E8M0, DS4_ST_F8_E5M2,
};
#define DS4_ST_MAX_DIMS 8

/* One tensor of a safetensors file: a zero-copy view into its mapping. */
typedef struct ds4_st_tensor {
    char *name;                     /* owned */
    int dtype;                      /* DS4_ST_* */
    int n_dims;
    int64_t shape[DS4_ST_MAX_DIMS]; /* row-major (C order), shape[n_dims-1] fastest */
    int64_t n_elems;
    const uint8_t *data;            /* little-endian, possibly unaligned */
    uint64_t n_bytes;
    int file;                       /* index into ds4_st.files */
} ds4_st_tensor;

/* The tensors of a model directory, sorted by name. */
typedef struct ds4_st {
    struct ds4_st_file { void *map; size_t size; char *path; } *files;
    int n_files;
    ds4_st_tensor *t;
    int n, cap;
} ds4_st;

/* Opens the *.safetensors of dir (through model.safetensors.index.json when
 * present) and validates every header (see safetensors.c). Returns 0, or
 * DS4_E_IO / DS4_E_FORMAT / DS4_E_NOMEM with a message naming the file and
 * the tensor; on failure st is empty. Free with ds4_st_close. */
int ds4_st_open_dir(ds4_st *st, const char *dir, ds4_err *err);
void ds4_st_close(ds4_st *st);
/* The tensor called name, or NULL. O(log n). */
const ds4_st_tensor *ds4_st_find(const ds4_st *st, const char *name);
const char *ds4_st_dtype_name(int dtype);
int ds4_st_dtype_size(int dtype);   /* bytes per element, 0 when unknown */

/* ---- model description and tensor plan (hf.c) ---------------------------- */

/* Hyperparameters of a DeepSeek V4 model as the GGUF metadata states them
 * (docs/MODEL.md §A; names follow the deepseek4.* keys). */
typedef struct ds4_conv_hparams {
    int n_layer, n_embd, n_vocab, n_head, head_dim, n_rot;
    int q_lora, o_lora, o_groups;
    int n_expert, n_expert_used, n_ff, n_hash;
    int window, idx_heads, idx_dim, idx_topk;
    int n_hc, sinkhorn_iters, nextn;
    double hc_eps, rms_eps, routed_scale, swiglu_limit;
    double rope_base, compress_rope_base;
    bool yarn;                       /* YaRN on compressed layers, else plain RoPE */
    double yarn_factor, yarn_beta_fast, yarn_beta_slow;
    uint64_t yarn_orig_ctx, context_length;
    int *ratio;                      /* (n_ratio) compress ratio: 0, 4 (CSA) or another R > 0 (HCA); owned */
    int n_ratio;                     /* entries of ratio: n_layer, or n_layer + nextn when the official
                                        compress_ratios lists the MTP layers too (written whole, as the
                                        published files do, docs/FORMATS.md D.4); 0 = n_layer */
} ds4_conv_hparams;

void ds4_conv_hparams_free(ds4_conv_hparams *hp);

/* Reads a Hugging Face config.json (transformers' DeepseekV4Config fields or
 * the official checkpoint's, docs/FORMATS.md E.5). Returns 0, or DS4_E_IO /
 * DS4_E_FORMAT naming the missing or invalid key. */
int ds4_conv_read_config(ds4_conv_hparams *hp, const char *path, ds4_err *err);

/* Loads a JSON input file (jansson flags as for json_loadfd). A FIFO or any
 * other non-regular file is refused without blocking (util/file.h). Returns
 * a new reference, or NULL with err set: DS4_E_IO for the file, DS4_E_FORMAT
 * "PATH: REASON (line N)" for bad JSON. */
struct json_t;
struct json_t *ds4_conv_load_json(const char *path, size_t flags, ds4_err *err);

/* Output type recipes of --recipe / --outtype (docs/FORMATS.md D.2): F32
 * everything (oracle tests); F16 matrices; Q8_0 the published non-expert
 * types with Q8_0 experts; Q4 the published q4 file (Q4_K experts); Q2 the
 * published q2 file (IQ2_XXS gate/up, Q2_K down). */
typedef enum { DS4_OUT_F32, DS4_OUT_F16, DS4_OUT_Q8_0, DS4_OUT_Q4, DS4_OUT_Q2 } ds4_conv_outtype;

/* Where the bytes of one planned GGUF tensor come from. */
typedef enum {
    DS4_SRC_NONE = 0,   /* not bound yet */
    DS4_SRC_PLAIN,      /* one source tensor, same element order (stacked experts included) */
    DS4_SRC_EXPERTS,    /* one source tensor per matrix (per-expert checkpoints) */
    DS4_SRC_FUSED_LO,   /* matrix m = rows [0, n_out) of source slab m of 2*n_out rows (gate of gate_up) */
    DS4_SRC_FUSED_HI,   /* rows [n_out, 2*n_out) of slab m (up of gate_up) */
    DS4_SRC_RANDOM,     /* generated (demo model) */
} ds4_conv_src_kind;

typedef enum { DS4_RAND_NORMAL, DS4_RAND_UNIFORM, DS4_RAND_EXPERT_ID } ds4_conv_rand_kind;

typedef struct ds4_conv_tensor {
    char name[64];          /* GGUF name */
    uint32_t type;          /* output ggml type */
    int n_dims;
    int64_t ne[3];          /* GGUF dims: n_in, n_out, n_mat */
    bool optional;          /* may be left unbound (then not written) */
    ds4_conv_src_kind src;
    const ds4_st_tensor *st;        /* PLAIN, FUSED_* */
    const ds4_st_tensor *scale;     /* PLAIN: ue8m0 scales of an FP8/FP4 st, else NULL */
    const ds4_st_tensor **experts;  /* EXPERTS: ne[2] entries, owned array */
    const ds4_st_tensor **expert_scales; /* EXPERTS: ne[2] entries (NULL: not FP8/FP4), owned array */
    const float *imatrix;           /* importance: ne[0] values (every matrix) or ne[0] * ne[2] (per
                                       matrix, matrix-major); NULL: none. Owned by the ds4_conv_imatrix */
    bool imatrix_per_matrix;        /* imatrix holds ne[0] * ne[2] values */
    ds4_conv_rand_kind rand;        /* RANDOM */
    double ra, rb;                  /* RANDOM: normal (mean, std) or uniform [ra, rb) */
    uint64_t seed;                  /* RANDOM */
} ds4_conv_tensor;

typedef struct ds4_conv_plan {
    ds4_conv_tensor *t;
    int n;
} ds4_conv_plan;

/* Lays out every tensor of the published GGUF layout (docs/MODEL.md B.2-B.3) for
 * hp, with output types chosen by outtype; sources unbound. */
int ds4_conv_plan_layout(ds4_conv_plan *plan, const ds4_conv_hparams *hp, ds4_conv_outtype outtype,
                         ds4_err *err);
/* Lays out the MTP file (docs/FORMATS.md D.3): the mtp.N.* tensors of the
 * hp->nextn MTP blocks; Q8_0 projections and shared experts, Q4_K routed
 * experts (Q8_0 when a row is not whole 256-blocks), F32 for everything else
 * (F32 throughout under DS4_OUT_F32). Fails when hp->nextn is 0. */
int ds4_conv_plan_mtp(ds4_conv_plan *plan, const ds4_conv_hparams *hp, ds4_conv_outtype outtype, ds4_err *err);
/* Applies a --type-map to the n_plans plans together (the main file and,
 * with --mtp-out, the MTP file): comma-separated PATTERN=TYPE rules (fnmatch
 * globs on GGUF names; TYPE f32, f16, bf16, q8_0, q4_K, q2_K, iq2_xxs), or
 * the path of a file with one rule per line ('#' comments). The last matching
 * rule wins. Refuses a rule that matches no tensor of any plan, a 1-D or I32
 * tensor, an unknown type, or a type whose block does not divide the row. */
int ds4_conv_plan_type_map(ds4_conv_plan *const *plans, int n_plans, const char *spec, ds4_err *err);
void ds4_conv_plan_free(ds4_conv_plan *plan);
ds4_conv_tensor *ds4_conv_plan_find(ds4_conv_plan *plan, const char *name);

/* Binds every planned tensor to the tensors of a model directory (accepting
 * save_pretrained's, the in-memory module names and the official
 * checkpoint's, docs/ORACLE.md §4 / docs/FORMATS.md E.4), checking shapes and dtypes.
 * Fails with DS4_E_MODEL naming a tensor it cannot map, a shape mismatch, or
 * the tensors that are missing. Binding options. mtp: bind the mtp.N.* tensors to a ds4_conv_plan_mtp plan
 * (and ignore the rest) instead of the main tensors. skip_unknown: list and
 * skip tensors that map to nothing (else they are an error). FP8 E4M3
 * weights and packed FP4 E2M1 weights (I8/U8) are bound together with their
 * ue8m0 "NAME.scale" companion, whose dtype and shape are checked. */
typedef struct ds4_conv_bind_opts {
    bool mtp;
    bool skip_unknown;
    bool mtp_elsewhere; /* main bind with --mtp-out: the mtp.* tensors go there (no "skipped" note) */
} ds4_conv_bind_opts;
int ds4_conv_bind_hf_opts(ds4_conv_plan *plan, const ds4_conv_hparams *hp, const ds4_st *st,
                          const ds4_conv_bind_opts *opt, ds4_err *err);

/* Adds the deepseek4.* and general.* metadata for hp (docs/FORMATS.md D.4). */
int ds4_conv_add_metadata(ds4_gguf_writer *w, const ds4_conv_hparams *hp, const char *name,
                          ds4_conv_outtype outtype, ds4_err *err);

/* Streaming options: worker threads (0 = every online CPU) and progress
 * lines on stderr (tensor, GB of input done, rate, ETA). cancel: when
 * non-NULL and *cancel becomes non-zero (a signal handler sets it), the
 * producer stops at the next chunk of rows with DS4_E_CANCEL, so the GGUF
 * writer removes its temporary file. delay_ms: a pause after every chunk
 * (--debug-chunk-delay-ms: tests need a conversion slow enough to interrupt). */
typedef struct ds4_conv_stream_opts {
    int n_threads;
    bool progress;
    const volatile sig_atomic_t *cancel;
    int delay_ms;
} ds4_conv_stream_opts;

/* Adds every bound tensor of plan to w with a streaming producer (stream.c):
 * rows are decoded (BF16/F16/F32/FP8/FP4 -> f32) and converted to the output
 * type in chunks of bounded size on n_threads threads, in order, at write
 * time. Memory is O(chunk), never O(tensor). plan and opt must outlive the
 * write. */
int ds4_conv_add_tensors_opts(ds4_gguf_writer *w, ds4_conv_plan *plan, const ds4_conv_stream_opts *opt,
                              ds4_err *err);
/* Bytes of source data (weights and scales) a bound tensor reads. */
uint64_t ds4_conv_tensor_src_bytes(const ds4_conv_tensor *t);
/* Seconds, input bytes and threads of the tensor data written so far by
 * the last ds4_conv_add_tensors_opts (for the summary line). */
void ds4_conv_stream_totals(double *seconds, uint64_t *in_bytes, int *n_threads);

/* ---- importance matrix (imatrix.c) ---------------------------------------- */

/* An importance matrix: llama.cpp's legacy .dat (docs/FORMATS.md C.7) or its
 * GGUF imatrix (NAME.in_sum2 / NAME.counts), values already divided by
 * ncall (resp. the counts). Entries are sorted by name. */
typedef struct ds4_conv_imatrix {
    int n;
    struct ds4_conv_imat_entry {
        char *name;
        int32_t ncall;
        int64_t n_val;
        float *val;
        bool used;           /* bound to a tensor by ds4_conv_imatrix_apply */
        bool known;          /* names a tensor of the plans (used or not: e.g. a Q8_0 tensor's) */
    } *e;
    float **bufs;            /* (n_bufs) per-expert entries gathered into stacks, owned */
    int n_bufs;
    int32_t chunks;          /* -1 when absent */
    char *dataset;           /* NULL when absent */
    char *path;
} ds4_conv_imatrix;

/* Reads path (.dat or GGUF, by its first bytes); DS4_E_IO / DS4_E_FORMAT
 * ("PATH: entry N 'NAME': ...") for a truncated file, bad lengths,
 * non-finite values, a name twice or no entry at all. */
int ds4_conv_imatrix_load(ds4_conv_imatrix *im, const char *path, ds4_err *err);
void ds4_conv_imatrix_free(ds4_conv_imatrix *im);
/* Points t->imatrix of every Q4_K, Q2_K and IQ2_XXS tensor of the n_plans
 * plans (main file first, then the MTP file) at its importance, looked up as
 * docs/FORMATS.md C.6 says: per-expert entries "G.expert.E" / "G.expert_E" /
 * the checkpoint's per-expert tensor names (each ne[0] values), then "G"
 * (ne[0] values, or ne[0] * ne[2] per matrix), then the checkpoint's name of
 * the tensor; other tensors keep none. strict: a tensor of the main plan
 * without an entry is an error. Entries naming no tensor of the plans are
 * listed on stderr; when no entry names one the file is refused
 * (DS4_E_MODEL). *n_used: the tensors that got an importance. */
int ds4_conv_imatrix_apply(ds4_conv_imatrix *im, ds4_conv_plan *const *plans, int n_plans, bool strict, int *n_used,
                           ds4_err *err);
/* Adds the quantize.imatrix.* keys of docs/FORMATS.md C.8. */
int ds4_conv_imatrix_add_metadata(ds4_gguf_writer *w, const ds4_conv_imatrix *im, ds4_err *err);

/* ---- demo model (demo.c) ------------------------------------------------- */

/* Fills hp with the demo model's shape (hidden 256, 6 layers with sliding,
 * CSA, HCA and hash layers; vocab n_vocab) and binds every tensor of plan to
 * seeded random values. */
void ds4_conv_demo_hparams(ds4_conv_hparams *hp, int n_vocab);
void ds4_conv_demo_bind(ds4_conv_plan *plan, const ds4_conv_hparams *hp, uint64_t seed);

#endif
