/* forward.h - the one layer loop (forward.c) and the per-session state it
 * owns. Internal to the engine: engine.c is its only user.
 *
 * A ds4_fwd holds the KV state of one timeline (MODEL.md §D: raw windows,
 * compressed rows, indexer keys, compressor frontiers) plus the activation
 * buffers of one batch, all in backend memory, sized at creation by n_ctx
 * and n_batch. Evaluation never allocates state; the backend's scratch grows
 * only to the largest batch seen. Not thread-safe: one thread at a time.
 */
#ifndef DS4_FORWARD_H
#define DS4_FORWARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "model.h"

typedef struct ds4_fwd ds4_fwd;

/* Allocates state for n_ctx positions and batches of up to n_batch tokens.
 * DS4_E_NOMEM on failure (*out = NULL). m and be must outlive the result. */
int ds4_fwd_new(const ds4_model *m, const ds4_backend *be, ds4_numerics num, int n_ctx, int n_batch,
                ds4_fwd **out, ds4_err *err);
void ds4_fwd_free(ds4_fwd *f);

/* A layer split (docs/ARCHITECTURE.md "Several GPUs"): the blocks in
 * contiguous ranges, part p = blocks [l0, l1) on backend be with m that
 * backend's binding of the part (ds4_model_part); the first part also runs
 * the embedding (or the MTP input), the last the head and holds the logits.
 * Each block's KV state lives on its part's backend; the HC states go from
 * part to part after each one's blocks (ops->link, or through host memory).
 * Parts start at block 0 and end at n_layer without gaps; all parts give the
 * same kv_row_type. A one-part split is ds4_fwd_new. */
#define DS4_FWD_MAX_PARTS 8
typedef struct ds4_fwd_part {
    const ds4_model *m;
    const ds4_backend *be;
    int l0, l1;
} ds4_fwd_part;
int ds4_fwd_new_split(const ds4_fwd_part *parts, int n_parts, ds4_numerics num, int n_ctx, int n_batch,
                      ds4_fwd **out, ds4_err *err);

/* Forgets every token (position 0). */
void ds4_fwd_reset(ds4_fwd *f);
int ds4_fwd_pos(const ds4_fwd *f);
int ds4_fwd_n_batch(const ds4_fwd *f);

/* Backend row type of the session's cached rows (DS4_TYPE_F32 / F16). */
int ds4_fwd_row_type(const ds4_fwd *f);

/* Evaluates tokens[0..n) (valid ids, 1 <= n <= n_batch, pos + n <= n_ctx)
 * at positions pos..pos+n-1 and advances pos. The logits stay in backend
 * memory: when all, (n, n_vocab) rows after each token, else the row after
 * the last; when `logits` (host) is non-NULL they are also copied there.
 * On failure the state is undefined (reset it). */
int ds4_fwd_eval(ds4_fwd *f, const int32_t *tokens, int n, float *logits, bool all, ds4_err *err);

/* The same without the head: only the states and the caches advance (no
 * logits afterwards). For feeding the MTP block's window. */
int ds4_fwd_eval_states(ds4_fwd *f, const int32_t *tokens, int n, ds4_err *err);

/* The logits row after the last evaluated token, copied to dst (n_vocab
 * floats, host). DS4_E_ARG when the last eval's logits are gone (reset,
 * load, restore). */
int ds4_fwd_logits(ds4_fwd *f, float *dst, ds4_err *err);
/* Greedy token of that row, computed by the backend (ds4_argmax rules). */
int ds4_fwd_argmax(ds4_fwd *f, int32_t *id, ds4_err *err);
/* The error of a logits row with no finite value (DS4_E_MODEL): the argmax
 * calls return it, and the engine when host logits have none. */
int ds4_fwd_nonfinite_error(ds4_err *err);

/* Observer of the routed experts (imatrix collection, host-memory backends
 * only): after each layer's moe_experts stage, fn gets the layer, the batch
 * size n, the FFN input x (n, D), the expert ids and route weights (n, k)
 * and each slot's down-projection input act (n, k, F). NULL turns it off.
 * DS4_E_NOMEM when the act buffer cannot be allocated. */
typedef void (*ds4_fwd_moe_fn)(void *user, int il, int n, const float *x, const int32_t *ids, const float *w,
                               const float *act);
int ds4_fwd_set_moe_observer(ds4_fwd *f, ds4_fwd_moe_fn fn, void *user, ds4_err *err);

/* Eager steps with per-stage timing marks (backend prof_mark). */
void ds4_fwd_set_profile(ds4_fwd *f, bool on);
/* Debug: evaluate only the first n_layers blocks, then the head (0 = all). */
void ds4_fwd_set_layer_limit(ds4_fwd *f, int n_layers);
/* Benchmarks: the state of a context of pos tokens without computing it
 * (synthetic cached rows); see forward.c. */
int ds4_fwd_fast_forward(ds4_fwd *f, int pos, uint64_t seed, ds4_err *err);

/* The state at the current position, serialized (bytes are a pure function
 * of the state's meaningful part; layout documented in forward.c). */
size_t ds4_fwd_state_bytes(const ds4_fwd *f, int pos);
int ds4_fwd_state_save(ds4_fwd *f, void *dst, ds4_err *err);
/* Restores a state of position pos from src (bytes must equal
 * ds4_fwd_state_bytes(f, pos), else DS4_E_FORMAT). */
int ds4_fwd_state_load(ds4_fwd *f, int pos, const void *src, size_t bytes, ds4_err *err);

/* Light checkpoints for rewind. Compressed and indexer rows are
 * append-only and final, so the state at position c is fully described by
 * c, the raw window rings and the compressor frontiers (MODEL.md D.2): a
 * checkpoint saves only those (fixed size, independent of c). Restoring it
 * is valid while the timeline still starts with the same c tokens; rows
 * emitted after c are simply overwritten by the re-evaluation. */
size_t ds4_fwd_ckpt_bytes(ds4_fwd *f);
int ds4_fwd_ckpt_save(ds4_fwd *f, void *dst, ds4_err *err);
int ds4_fwd_ckpt_restore(ds4_fwd *f, int pos, const void *src, ds4_err *err);

/* ---- MTP and speculative decoding (engine.c) */

/* Rows of logits the last eval left (n with `all`, else 1; 0 after
 * reset/load/restore). */
int ds4_fwd_n_logits(const ds4_fwd *f);
/* Row `row` of them, copied to dst (n_vocab floats, host). */
int ds4_fwd_logits_row(ds4_fwd *f, int row, float *dst, ds4_err *err);
/* ids[r] = greedy token of every row, computed by the backend. */
int ds4_fwd_argmax_rows(ds4_fwd *f, int32_t *ids, ds4_err *err);

/* MTP sessions (model from ds4_model_load_mtp): the next eval reads its
 * incoming HC states from rows 0..n-1 of an input buffer. hc_from copies
 * the final states (after the last block, before the head) of src's last
 * eval, rows src_row.., into it (src may be the main session or f itself);
 * hc_keep saves one such state aside and hc_from_kept puts it back. */
int ds4_fwd_hc_from(ds4_fwd *dst, int dst_row, const ds4_fwd *src, int src_row, int n, ds4_err *err);
/* Host rows into the input buffer; a final state row of the last eval to
 * the host; the token count of the last eval. */
int ds4_fwd_hc_upload(ds4_fwd *f, int row, const float *src, int n, ds4_err *err);
int ds4_fwd_state_row(ds4_fwd *f, int row, float *dst, ds4_err *err);
int ds4_fwd_last_n(const ds4_fwd *f);
int ds4_fwd_hc_keep(ds4_fwd *dst, const ds4_fwd *src, int src_row, ds4_err *err);
int ds4_fwd_hc_from_kept(ds4_fwd *f, int dst_row, ds4_err *err);

/* Speculative rollback. spec_begin saves the ring slots (raw windows,
 * compressor and indexer frontiers) that the next n <= DS4_FWD_SPEC_MAX
 * positions will overwrite. After evaluating up to n tokens,
 * spec_rollback(keep) drops all but the first `keep`: the saved slots of
 * the dropped positions are restored, pos becomes begin + keep and the
 * last logits row is row keep-1 of the eval. Compressed and indexer rows
 * emitted by dropped tokens lie at or past row pos/R, which no kept
 * position reads and the next evaluation rewrites, so the state equals a
 * session that never saw the dropped tokens (MODEL.md D.1-D.2). */
#define DS4_FWD_SPEC_MAX 8
int ds4_fwd_spec_begin(ds4_fwd *f, int n, ds4_err *err);
int ds4_fwd_spec_rollback(ds4_fwd *f, int keep, ds4_err *err);

#endif
