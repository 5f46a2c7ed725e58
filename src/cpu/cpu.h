/* cpu.h - internals shared by the CPU reference backend's files.
 *
 * The context owns a small pthread pool (no globals) and scratch memory that
 * grows to the largest request and is then reused, so steady-state decode
 * allocates nothing. Work is split statically (item ranges by thread id), so
 * results never depend on timing; each output element is computed by one
 * call of one kernel, so they never depend on the batch size either.
 */
#ifndef DS4_CPU_H
#define DS4_CPU_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"

#define CPU_MAX_THREADS 256
#define CPU_TSLOTS 6 /* per-thread scratch slots */

typedef void (*cpu_task_fn)(void *arg, int i0, int i1, int tid);

typedef struct cpu_ctx {
    int n_threads;
    pthread_t threads[CPU_MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t cv_start, cv_done;
    uint64_t generation;
    int n_pending;
    bool quit;
    cpu_task_fn fn;
    void *arg;
    int n_items;
    /* scratch */
    void *scratch[8];
    size_t scratch_bytes[8];
    void *tscratch[CPU_MAX_THREADS][CPU_TSLOTS];
    size_t tscratch_bytes[CPU_MAX_THREADS][CPU_TSLOTS];
    int err; /* first error (sticky until step_end) */
    void **synth_owned; /* weights filled for a synthetic model */
    int n_synth_owned;
} cpu_ctx;

/* Runs fn over [0, n_items) split in n_threads contiguous ranges; the caller
 * is thread 0. Returns when all ranges are done. */
void cpu_run(cpu_ctx *c, int n_items, cpu_task_fn fn, void *arg);
/* Same, but runs inline on the caller when n_items * work_per_item (rough
 * multiply-adds) is too small to pay for waking the workers. Results are
 * identical either way (each item is computed the same way). */
void cpu_run_w(cpu_ctx *c, int n_items, double work_per_item, cpu_task_fn fn, void *arg);

/* Main-thread scratch slot (0..7) of at least `bytes`; NULL (and c->err set)
 * when out of memory. Contents are not preserved across growth. */
void *cpu_scratch(cpu_ctx *c, int slot, size_t bytes);
/* Per-thread scratch slot; callable from workers. */
void *cpu_tscratch(cpu_ctx *c, int tid, int slot, size_t bytes);

/* y[t*ldy + r - row0] = W[mat][r] . x[(xidx ? xidx[t] : t) * ldx] for rows
 * r in [row0, row0+n_rows) and t in [0, n). With act_quant and a quantized
 * weight type, x rows are first quantized to the weight's activation type
 * (E.1). Returns 0 or DS4_E_NOMEM. Parallel over rows. */
int cpu_matmul(cpu_ctx *c, const ds4_weight *w, int64_t mat, int64_t row0, int64_t n_rows,
               const float *x, int64_t ldx, const int32_t *xidx, int n, float *y, int64_t ldy,
               bool act_quant);

/* Quantizes x rows [0, n) (stride ldx) to act_type into c's scratch slot
 * `slot` (not 7) and returns it; NULL when out of memory. */
void *cpu_quantize_rows(cpu_ctx *c, int slot, int act_type, const float *x, int64_t ldx, int n, int64_t n_in);

/* cpu_matmul on activations already quantized to the weight's activation
 * type (rows of ds4_type_row_bytes(act_type, n_in) bytes, indexed by xidx). */
int cpu_matmul_pre(cpu_ctx *c, const ds4_weight *w, int64_t mat, int64_t row0, int64_t n_rows, const void *xq,
                   const int32_t *xidx, int n, float *y, int64_t ldy);

/* RMSNorm of x[0..n) into out (sum of squares in double, as ds4), times w
 * when w != NULL. out may equal x. */
void cpu_rmsnorm(float *out, const float *x, int n, const float *w, float eps);

/* Interleaved-pair RoPE on z[0..n_rot) at position pos (inverse: angle -θ). */
void cpu_rope(float *z, int n_rot, const float *inv_freq, int pos, bool inverse);

int cpu_embed(void *ctx, const ds4_embed_args *a);
int cpu_hc_pre(void *ctx, const ds4_hc_pre_args *a);
int cpu_hc_post(void *ctx, const ds4_hc_post_args *a);
int cpu_attn_project(void *ctx, const ds4_attn_project_args *a);
int cpu_compress_update(void *ctx, const ds4_compress_args *a);
int cpu_indexer_select(void *ctx, const ds4_indexer_args *a);
int cpu_attention(void *ctx, const ds4_attention_args *a);
int cpu_kv_store(void *ctx, const ds4_kv_store_args *a);
int cpu_moe_route(void *ctx, const ds4_moe_route_args *a);
int cpu_moe_experts(void *ctx, const ds4_moe_experts_args *a);
int cpu_head(void *ctx, const ds4_head_args *a);

#endif
