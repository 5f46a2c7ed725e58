/* ds4.h - the public engine API: the only engine header that cli/, server/
 * and tools/bench include. No tensor, buffer or backend type appears here.
 *
 * Model: an engine is the loaded model (weights, tokenizer, backend); it never
 * changes after ds4_engine_open and may be shared by threads for read-only
 * queries (tokenize, token text, metadata). A session is one timeline of
 * tokens that owns its KV state; a session is used by one thread at a time.
 * Callers hand a session the full token prefix they want evaluated
 * (ds4_session_sync) and the engine reuses, extends or rebuilds the state.
 *
 * Errors: functions returning int give 0 on success or a negative DS4_E*
 * code (util/err.h) and fill *err when it is non-NULL. Nothing here exits.
 */
#ifndef DS4_H
#define DS4_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

typedef struct ds4_engine ds4_engine;
typedef struct ds4_session ds4_session;

typedef enum {
    DS4_BACKEND_AUTO = 0, /* CUDA when built with it and a GPU is present, else CPU */
    DS4_BACKEND_CPU,
    DS4_BACKEND_CUDA,
    DS4_BACKEND_STRICT,   /* diagnostic: CPU math behind the contract checker */
} ds4_backend_kind;

/* Progress of long operations (model load, prefill): done of total units.
 * Return non-zero to cancel (the operation then fails with DS4_E_CANCEL). */
typedef int (*ds4_progress_fn)(void *user, const char *what, int64_t done, int64_t total);

typedef struct ds4_engine_opts {
    const char *model_path;   /* main GGUF (required) */
    const char *mtp_path;     /* optional MTP GGUF, NULL for none; "synthetic" with a
                                 synthetic model: an MTP block of the published recipe */
    ds4_backend_kind backend;
    int n_threads;            /* CPU worker threads; 0 = number of cores */
    /* Diagnostic (not a user mode): turn off every rounding of docs/MODEL.md §E
     * (FP8 KV rows, Hadamard+FP4 indexer, cache storage precision) so the
     * engine can be compared with implementations that do not round. */
    bool plain_numerics;
    /* Load only the metadata and the tokenizer (no weights, no backend):
     * for --dump-tokens and tokenizer-only GGUFs. Session calls then fail. */
    bool vocab_only;
    /* Benchmarks: build the DeepSeek V4 Flash shapes without a file, "q2" or
     * "q4" (the published tensor types), weights from a seeded generator
     * filled by the backend (on the GPU for CUDA). model_path is then
     * ignored and the engine has no tokenizer. */
    const char *synthetic;
    uint64_t synthetic_seed;
    /* Weight upload progress ("load", bytes done, bytes total); may be NULL. */
    ds4_progress_fn progress;
    void *progress_user;
    /* Diagnostics (--help-debug). */
    int cuda_device;          /* CUDA device ordinal (of the first part) */
    /* Layer split (docs/ARCHITECTURE.md "Several GPUs"): n_parts > 1 runs the
     * blocks in that many contiguous parts, each on its own backend. CUDA:
     * part p on device devices[p] when p < n_devices, else cuda_device + p
     * (a device may repeat: two parts on one GPU), the HC states passed on
     * through NCCL. CPU / strict: n_parts backends in this process (checks
     * the split itself; no speed-up). split_layers[p] > 0: blocks per part
     * (they must add up to the model's), else parts of about equal bytes. */
    int n_parts;
    int n_devices;
    int devices[8];
    int split_layers[8];
    /* Ranks (docs/ARCHITECTURE.md 6b): n_ranks > 1 runs part r of the split
     * in the worker process of rank r (ds4_worker_run), which connects to
     * `rendezvous` (HOST:PORT this process listens on) within rank_timeout_s
     * (0 = 300 s); this process runs part 0 on its own backend. */
    int n_ranks;
    const char *rendezvous;
    int rank_timeout_s;
    bool cuda_sync_debug;     /* synchronise and check after every launch */
    bool cuda_no_graphs;      /* never capture decode steps into graphs */
    int layer_limit;          /* evaluate only the first N blocks, then the head (0 = all) */
    unsigned numerics_off;    /* turn off single roundings: 1 FP8 KV, 2 FP4 indexer, 4 f16 cache, 8 int8 activations */
} ds4_engine_opts;

/* Opens a model. On success *out owns the mapping and backend resources.
 * Fails with DS4_E_IO / DS4_E_FORMAT / DS4_E_MODEL and a message naming the
 * offending key or tensor. Not thread-safe with respect to the same opts. */
/* Command-line forms of the layer split, shared by ds4, ds4-server and
 * ds4-bench: --gpus "N" (N parts on devices 0..N-1) or a list "0,1" (one
 * part per listed device; a device may repeat); --split "22,21" (blocks per
 * part; with --cpu / --strict-backend it alone splits the CPU backend);
 * --ranks N --rendezvous HOST:PORT [--rank-timeout S] (part r in the worker
 * process of rank r). ds4_opts_parse_flag returns 1 when `flag` is none of
 * these (value unused), 0 when it took value, DS4_E_ARG with a message on a
 * malformed value. */
int ds4_opts_parse_flag(ds4_engine_opts *o, const char *flag, const char *value, ds4_err *err);
int ds4_opts_parse_gpus(ds4_engine_opts *o, const char *arg, ds4_err *err);
int ds4_opts_parse_split(ds4_engine_opts *o, const char *arg, ds4_err *err);
/* The combinations of those flags that cannot work, known before the model
 * loads (a usage error, exit 2): --ranks N > 1 without --rendezvous, --ranks
 * with --gpus, a --split whose part count is not --ranks. 0, or DS4_E_ARG
 * with the message ds4_engine_open would give. */
int ds4_opts_check_split(const ds4_engine_opts *o, ds4_err *err);
/* Copies the split fields of src (as parsed above) into dst. */
void ds4_opts_copy_split(ds4_engine_opts *dst, const ds4_engine_opts *src);

/* A worker rank: connects to rank 0 at hostport as `rank` and runs the ops
 * rank 0 sends on a backend of o->backend (CUDA on o->cuda_device, CPU with
 * o->n_threads, or strict), binding its part of the model at o->model_path
 * (NULL: the path rank 0 uses). Returns when rank 0 closes (0) or on a
 * failure (DS4_E_IO and friends). */
int ds4_worker_run(const ds4_engine_opts *o, const char *hostport, int rank, ds4_err *err);
int ds4_engine_open(ds4_engine **out, const ds4_engine_opts *opts, ds4_err *err);
void ds4_engine_close(ds4_engine *e);

/* Model facts (valid for the engine's lifetime). */
int ds4_engine_n_vocab(const ds4_engine *e);   /* logits width */
int ds4_engine_n_layer(const ds4_engine *e);
/* True once a worker rank of the split (--ranks) is gone: every later
 * evaluation fails; only restarting every rank recovers. */
bool ds4_engine_lost_rank(const ds4_engine *e);
const char *ds4_engine_backend_name(const ds4_engine *e);
/* One-paragraph human-readable summary for --inspect; static storage owned by e. */
const char *ds4_engine_describe(const ds4_engine *e);

/* ---- Tokenizer (thread-safe) -------------------------------------------- */

typedef enum {
    DS4_TOK_BOS = 0,
    DS4_TOK_EOS,
    DS4_TOK_USER,
    DS4_TOK_ASSISTANT,
    DS4_TOK_THINK_OPEN,
    DS4_TOK_THINK_CLOSE,
    DS4_TOK_DSML,
    DS4_TOK__COUNT
} ds4_special_token;

/* True when the model carries a tokenizer (a GGUF without one runs on ids). */
bool ds4_has_tokenizer(const ds4_engine *e);
/* Id of one of the seven marker tokens, looked up by string at load; -1 if
 * the model has no tokenizer. */
int32_t ds4_token_special(const ds4_engine *e, ds4_special_token which);

/* Tokenizes text[0..len). rendered=true recognizes the seven marker strings
 * (docs/TEXT.md A.2 "rendered"); false is plain BPE. Writes up to cap ids to out
 * and returns the total number of ids (may exceed cap: call again with a
 * bigger buffer), or a negative code. */
int ds4_tokenize(const ds4_engine *e, const char *text, size_t len, bool rendered,
                 int32_t *out, int cap, ds4_err *err);

/* The longest byte string one token stands for (0 without a tokenizer): a
 * text of len bytes has at least len / ds4_token_max_bytes() tokens, a
 * bound a server can check before it tokenizes. */
size_t ds4_token_max_bytes(const ds4_engine *e);

/* Raw bytes a token decodes to (byte-level symbols mapped back); *len set.
 * The pointer is owned by the engine. NULL for an invalid id. */
const char *ds4_token_bytes(const ds4_engine *e, int32_t id, size_t *len);
/* The vocabulary string as stored (byte-level form, e.g. "Ġworld"). */
const char *ds4_token_text(const ds4_engine *e, int32_t id);
/* True when id is a control token, not text: a marker of docs/TEXT.md A.1
 * (BOS, EOS, User, Assistant, <think>, </think>, ｜DSML｜) or another added
 * token ("<｜place▁holder▁no▁3｜>", "<|EOT|>", ...). Servers keep such
 * tokens out of reply text. False without a tokenizer. */
bool ds4_token_is_control(const ds4_engine *e, int32_t id);

/* ---- Streaming detokenizer ---------------------------------------------- */

/* Turns generated ids into text that never ends inside a UTF-8 character:
 * the bytes of an incomplete trailing character are held until the next
 * token completes them; bytes that can never form a character become
 * U+FFFD, so the output is always valid UTF-8 (tokenizer.h has the policy).
 * One ds4_detok serves one stream on one thread; e must outlive it. */
typedef struct ds4_detok ds4_detok;

/* DS4_E_ARG when the model has no tokenizer, DS4_E_NOMEM. */
int ds4_detok_open(const ds4_engine *e, ds4_detok **out, ds4_err *err);
void ds4_detok_close(ds4_detok *d); /* NULL is fine */
/* Feeds one id; returns the text that became complete (*len bytes, maybe
 * none), valid until the next call on d. An id out of range adds nothing. */
const char *ds4_detok_push(ds4_detok *d, int32_t id, size_t *len);
/* End of stream: U+FFFD for held-back bytes (or nothing); starts afresh. */
const char *ds4_detok_flush(ds4_detok *d, size_t *len);

/* ---- Sessions ------------------------------------------------------------ */

typedef struct ds4_session_opts {
    int n_ctx;           /* maximum tokens the session can hold */
    int prefill_chunk;   /* tokens per batched prefill step; 0 = engine default */
} ds4_session_opts;

/* Creates a session with room for n_ctx tokens. Memory sized by n_ctx is
 * allocated here; failure is DS4_E_NOMEM, not an abort. */
int ds4_session_new(ds4_engine *e, const ds4_session_opts *opts, ds4_session **out,
                    ds4_err *err);
void ds4_session_free(ds4_session *s);

int ds4_session_n_ctx(const ds4_session *s);
/* Tokens currently evaluated in the session (its timeline). */
int ds4_session_n_tokens(const ds4_session *s);
const int32_t *ds4_session_tokens(const ds4_session *s);

typedef struct ds4_sync_info {
    int n_reused;     /* prefix tokens whose state was kept */
    int n_evaluated;  /* tokens evaluated by this call */
} ds4_sync_info;

/* Makes the session hold exactly tokens[0..n): keeps the longest common
 * prefix it already has (rewinding if needed) and evaluates the rest in
 * batched prefill. After success, ds4_session_logits gives the logits after
 * the last token. n must be >= 1 and <= n_ctx (else DS4_E_RANGE).
 * progress may be NULL; prefill batches end at absolute multiples of the
 * batch size, so progress reports land on those positions. On failure the
 * session is left empty (invalid); when progress cancels (DS4_E_CANCEL) it
 * holds the prefix evaluated so far (tokens[0..ds4_session_n_tokens)), as
 * valid as after a sync to that prefix. */
int ds4_session_sync(ds4_session *s, const int32_t *tokens, int n, ds4_sync_info *info,
                     ds4_progress_fn progress, void *progress_user, ds4_err *err);

/* The tokens a ds4_session_sync to tokens[0..n) would keep without
 * evaluating them (its info.n_reused): the common prefix when the session's
 * timeline only grows, else the latest in-memory checkpoint inside it (0:
 * none). Changes nothing. */
int ds4_session_reusable(const ds4_session *s, const int32_t *tokens, int n);

/* How ds4_session_extend evaluates a batch: one prefill, token-by-token
 * decode, or prefill in chunks of `chunk` tokens. All three must agree. */
typedef enum {
    DS4_EVAL_PREFILL = 0,
    DS4_EVAL_DECODE,
    DS4_EVAL_CHUNKED,
} ds4_eval_mode;

/* Appends tokens[0..n) to the session. If all_logits is non-NULL it receives
 * (n, n_vocab) float logits, the logits after each appended position. */
int ds4_session_extend(ds4_session *s, const int32_t *tokens, int n, ds4_eval_mode mode,
                       int chunk, float *all_logits, ds4_err *err);

/* Appends one token (a decode step). */
int ds4_session_eval(ds4_session *s, int32_t token, ds4_err *err);

/* Logits after the last evaluated token, (n_vocab). Owned by the session,
 * valid until the next call that changes it. NULL when the session is empty
 * or when they cannot be read back from the backend. On a GPU this copies
 * the row from device memory the first time it is asked for after a step:
 * greedy loops should use ds4_session_argmax instead. */
const float *ds4_session_logits(const ds4_session *s);
/* The same, with the reason in *err when it returns NULL (e.g. a device or
 * a worker rank that failed). */
const float *ds4_session_logits_err(const ds4_session *s, ds4_err *err);

/* The greedy token after the last evaluated token: the lowest id of the
 * largest finite logit, computed where the logits are (only the id
 * crosses to the host). DS4_E_ARG on an empty session; DS4_E_MODEL when no
 * logit is finite (a broken model: greedy decoding would otherwise repeat
 * token 0). ds4_session_logits_err says the same when it fetches a row with
 * no finite value. */
int ds4_session_argmax(ds4_session *s, int32_t *id, ds4_err *err);

/* Drops tokens so that n_tokens remain (n_tokens <= current count). The
 * engine may have to recompute from an earlier point; the result equals a
 * session that only ever saw the kept prefix. */
int ds4_session_rewind(ds4_session *s, int n_tokens, ds4_err *err);

/* Serializes the session (tokens, KV and compressor state, logits) into a
 * versioned payload fingerprinted to the model. *out is malloc'ed, caller
 * frees. Loading checks version, fingerprint and sizes; a payload that does
 * not match is rejected with DS4_E_FORMAT and the session left empty. */
int ds4_session_save(const ds4_session *s, void **out, size_t *out_bytes, ds4_err *err);
int ds4_session_load(ds4_session *s, const void *buf, size_t n_bytes, ds4_err *err);

/* ---- Speculative decoding with the MTP block (--mtp) -------------------- */

struct ds4_sampler_params; /* sampler.h */
struct ds4_rng;

/* True when the engine was opened with an MTP model (opts.mtp_path). */
bool ds4_engine_has_mtp(const ds4_engine *e);

typedef struct ds4_spec_opts {
    int n_draft;   /* drafts per cycle, 1..4 */
    /* Confidence gate: drafting stops at a draft whose probability under
     * the MTP head (softmax at temperature 1) is below this; 0 = never. */
    float gate;
} ds4_spec_opts;

typedef struct ds4_spec_stats {
    int64_t cycles;          /* verify passes (ds4_session_spec_step calls) */
    int64_t tokens;          /* tokens they appended */
    int64_t drafted;         /* drafts verified */
    int64_t accepted;        /* drafts kept */
    int64_t gated;           /* drafts dropped by the confidence gate */
    int64_t pos_drafted[4];  /* by place in the cycle */
    int64_t pos_accepted[4];
} ds4_spec_stats;

/* Turns speculative decoding on for the session (DS4_E_ARG when the engine
 * has no MTP model and no test drafter is set, DS4_E_RANGE for n_draft
 * outside 1..4 or a negative gate). From then on every evaluation of the
 * session also feeds the MTP block's own window (MODEL.md C.12, D.1). */
int ds4_session_spec_enable(ds4_session *s, const ds4_spec_opts *o, ds4_err *err);

/* One speculative cycle. `next` is the token that follows the timeline,
 * chosen by the caller from ds4_session_logits as before ds4_session_eval.
 * The engine appends it, drafts up to n_draft more tokens with the MTP
 * block, verifies them in one batched pass and appends the longest prefix
 * the model accepts: with p->temperature <= 0 a draft is kept when it is
 * the model's greedy token there, so the output is exactly the greedy
 * output; otherwise (coupled sampling) each verified row's token is
 * ds4_sampler_sample's draw from the model's logits there with the next
 * uniform of rng, a draft is kept when it equals that token, and the MTP
 * draws its drafts with the same uniforms (from a copy of rng): the tokens
 * and rng's state are exactly those of plain sampling with the same
 * generator, whatever was drafted.
 * p NULL means greedy (rng may then be NULL too).
 * out[0..*n_out) receives the appended tokens (next first; at most max_new,
 * which must be >= 1; out has room for 5); *following the token after
 * them, chosen by the same rules (the next call's `next`); when sampling,
 * -1 where plain sampling draws no further token (the appended tokens reach
 * max_new, or a kept draft is the end of sequence), so that rng is advanced
 * exactly as plain sampling advances it. The session's
 * logits are those after the last appended token. Everything the rejected
 * drafts touched is rolled back. On failure the session is left empty. */
int ds4_session_spec_step(ds4_session *s, int32_t next, int max_new, const struct ds4_sampler_params *p,
                          struct ds4_rng *rng, int32_t *out, int *n_out, int32_t *following, ds4_err *err);
void ds4_session_spec_stats(const ds4_session *s, ds4_spec_stats *st);

/* 32-byte fingerprint of the loaded model (hash of metadata and tensor
 * table), used to key disk caches. */
void ds4_engine_fingerprint(const ds4_engine *e, uint8_t out[32]);
/* 32 bytes naming the states this engine saves and loads: the fingerprint
 * with the release numerics, else a hash of it and the numerics switches
 * (a payload made with other numerics is refused by ds4_session_load, so a
 * disk cache keys its files by this). */
void ds4_engine_state_id(const ds4_engine *e, uint8_t out[32]);

#endif
