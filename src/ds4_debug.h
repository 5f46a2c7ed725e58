/* ds4_debug.h - debug hooks into the engine for tests and dev tools only
 * (never included by cli/ or server/ code paths that serve users).
 */
#ifndef DS4_DEBUG_H
#define DS4_DEBUG_H

#include <stdbool.h>

#include "ds4.h"

/* The individual switches behind --plain-numerics (docs/MODEL.md §E). */
typedef struct ds4_debug_numerics {
    bool fp8_kv;      /* E.2 FP8 rounding of KV rows */
    bool fp4_indexer; /* E.3 Hadamard + FP4 of indexer queries/keys */
    bool f16_cache;   /* E.4 half storage of cache rows */
    bool act_quant;   /* E.1 int8 activations for quantized weights */
} ds4_debug_numerics;

/* Replaces the engine's numerics; affects sessions created afterwards.
 * Not thread-safe with concurrent session creation. */
void ds4_debug_set_numerics(ds4_engine *e, const ds4_debug_numerics *n);
void ds4_debug_get_numerics(const ds4_engine *e, ds4_debug_numerics *n);

/* ---- Benchmarks and device tests (ds4-bench, make test-cuda) ---------- */

/* One line about the backend's device and memory (static storage of e). */
const char *ds4_debug_device(ds4_engine *e);
/* Streaming read bandwidth of the backend's device in GB/s (a multi-GiB
 * read); DS4_E_ARG when the backend cannot measure it. */
int ds4_debug_bandwidth(ds4_engine *e, double *gbps, ds4_err *err);

/* Per-stage timing: while on, the session's steps run eagerly (no graphs)
 * with a mark before each stage; ds4_debug_profile_read adds up the
 * milliseconds per stage kind since the last read (n_kinds entries, names
 * from ds4_debug_profile_name) and resets them. Returns the number of kinds
 * or DS4_E_ARG when the backend has no timing. */
void ds4_debug_session_profile(ds4_session *s, bool on);
int ds4_debug_profile_read(ds4_engine *e, double *ms, int max);
const char *ds4_debug_profile_name(int kind);

/* Puts the session at n_tokens tokens of pseudo-random ids without
 * evaluating them: caches filled with synthetic rows (ds4-bench measures
 * decode at 64k..1M without the prefill). The session's logits are then
 * undefined until the next evaluation. */
int ds4_debug_session_fast_forward(ds4_session *s, int n_tokens, uint64_t seed, ds4_err *err);

/* Evaluates only the first n_layers blocks (then the head) in sessions
 * created afterwards: intermediate results of two backends can be compared
 * through the logits. 0 = all. */
void ds4_debug_set_layer_limit(ds4_engine *e, int n_layers);

/* Roofline inputs (PERFORMANCE.md A.3-A.7) computed from the loaded model:
 * bytes of weights and of cached rows one decode step reads at context ctx
 * (DS4_E_ARG for a vocab-only engine), and the FLOPs of one token at
 * position pos. */
int ds4_debug_decode_bytes(ds4_engine *e, int ctx, double *weight_bytes, double *kv_bytes);
double ds4_debug_token_flops(ds4_engine *e, int pos);
/* The same by profile stage (ds4_debug_profile_name kinds): bytes[i] read by
 * stage i of one decode step at context ctx (weights + cache rows), flops[i]
 * of stage i for the token at position pos. Return the number of kinds
 * (filling at most max), or a negative ds4 error. */
int ds4_debug_stage_bytes(ds4_engine *e, int ctx, double *bytes, int max);
int ds4_debug_stage_flops(ds4_engine *e, int pos, double *flops, int max);
/* Bytes of the session's serialized state (its cached rows and frontiers). */
size_t ds4_debug_session_state_bytes(const ds4_session *s);

/* Speculative decoding tests: a drafter that replaces the MTP block. It
 * gets the timeline (tokens[0..n)), the token `next` about to be appended
 * and room for max drafts; returns how many it wrote (0..max). NULL
 * restores the MTP block. Sessions with a drafter feed no MTP window. */
typedef int (*ds4_debug_drafter)(void *user, const int32_t *tokens, int n, int32_t next, int32_t *drafts, int max);
void ds4_debug_session_drafter(ds4_session *s, ds4_debug_drafter fn, void *user);

/* Benchmarks only (ds4-bench --mtp-accept): speculative cycles of the
 * session accept draft i (i = 0..3, while the earlier ones were accepted)
 * with probability rates[i] from a generator seeded by seed, instead of
 * verifying it; the output is then not the model's. n = 0 turns it off. */
void ds4_debug_session_force_accept(ds4_session *s, const float *rates, int n, uint64_t seed);

/* The MTP block on its own (tests against a reference of MODEL.md C.12):
 * evaluates the session's MTP window for n pairs (hc[i], tokens[i]), hc
 * given as (n, n_hc, n_embd) floats, and writes the MTP head's logits of
 * every pair into logits (n, n_vocab) and its output states into out_hc
 * (n, n_hc, n_embd) when non-NULL. Pairs are appended to the MTP window one
 * at a time (as drafting does). DS4_E_ARG without an MTP model. */
int ds4_debug_mtp_eval(ds4_session *s, const float *hc, const int32_t *tokens, int n, float *logits, float *out_hc,
                       ds4_err *err);
/* The main model's final HC state (after the last block, before the head)
 * of the session's last evaluated token, (n_hc, n_embd) floats. */
int ds4_debug_session_state(ds4_session *s, float *hc, ds4_err *err);
/* Floats of one such state (n_hc * n_embd); 0 for a vocab-only engine. */
size_t ds4_debug_state_floats(const ds4_engine *e);
/* ---- imatrix collection (ds4 --imatrix-out) ----------------------------- */

/* Observer of the routed experts, called after each layer's expert stage of
 * every evaluation in sessions created afterwards: layer il, n tokens, the
 * FFN input x (n, n_embd) (RMS-normed, as the experts read it), expert ids
 * and route weights (n, n_used), and act (n, n_used, n_ff): each slot's
 * down-projection input (clamped SwiGLU times the route weight). Pointers
 * are valid during the call only. CPU/strict backends only (DS4_E_ARG
 * otherwise); NULL turns it off. */
typedef void (*ds4_debug_moe_fn)(void *user, int il, int n, const float *x, const int32_t *ids, const float *w,
                                 const float *act);
int ds4_debug_set_moe_observer(ds4_engine *e, ds4_debug_moe_fn fn, void *user, ds4_err *err);

typedef struct ds4_debug_moe_shape {
    int n_layer, n_embd, n_ff, n_expert, n_used;
} ds4_debug_moe_shape;
/* Shape of the routed experts; DS4_E_ARG for a vocab-only engine. */
int ds4_debug_moe_dims(const ds4_engine *e, ds4_debug_moe_shape *out);

#endif
