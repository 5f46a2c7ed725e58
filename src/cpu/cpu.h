/* cpu.h - internals shared by the CPU reference backend's files.
 *
 * The context owns a small pthread pool (no globals) and scratch memory that
 * grows to the largest request and is then reused, so steady-state decode
 * allocates nothing. Pool workers spin briefly between parallel runs and
 * then sleep on a condition variable, so a decode step's many short runs do
 * not pay a futex wake-up each. Each output element is computed by one call
 * of one kernel (a tile computes every element exactly like the row dot,
 * quant.h), so results depend neither on the batch size nor on which thread
 * ran which piece: matrix products hand out row chunks dynamically.
 */
#ifndef DS4_CPU_H
#define DS4_CPU_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"

#define CPU_MAX_THREADS 256
#define CPU_TSLOTS 6 /* per-thread scratch slots */

typedef void (*cpu_task_fn)(void *arg, int i0, int i1, int tid);

typedef struct cpu_mm_plan cpu_mm_plan;

typedef struct cpu_ctx {
    int n_threads;
    pthread_t threads[CPU_MAX_THREADS];
    /* pool: a run publishes fn/arg/n_items and bumps `generation`; workers
     * spin on it, then sleep on cv_start (n_sleeping counts them) */
    pthread_mutex_t mu;
    pthread_cond_t cv_start;
    atomic_uint_fast64_t generation;
    atomic_int n_pending;   /* workers still running the current run */
    atomic_int n_sleeping;
    atomic_bool quit;
    cpu_task_fn fn;
    void *arg;
    int n_items;
    /* scratch */
    void *scratch[8];
    size_t scratch_bytes[8];
    void *tscratch[CPU_MAX_THREADS][CPU_TSLOTS];
    size_t tscratch_bytes[CPU_MAX_THREADS][CPU_TSLOTS];
    /* matrix products (cpu_matmuls): plans and quantized activations */
    cpu_mm_plan *mm_plans;
    size_t mm_plans_bytes;
    void *mm_xq;
    size_t mm_xq_bytes;
    int err; /* first error (sticky until step_end) */
    struct cpu_synth {  /* weights filled for synthetic models (main, MTP) */
        ds4_model *bound;
        void **owned;
        int n_owned;
    } synth[2];
    /* per-stage profile (prof_mark / prof_read) */
    int prof_kind;      /* stage running since prof_t0, or -1 */
    double prof_t0;
    double prof_ms[DS4_PROF_N];
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

/* One product of a cpu_matmuls call: y[t * ldy + r] = W[mat][row0 + r] . x_t
 * for r < n_rows and t < n, where x_t is row (xidx ? xidx[t] : t) of either
 * x (float32, stride ldx floats) or xq (rows already quantized to the
 * weight's activation type, ds4_type_row_bytes(act_type, n_in) bytes each). */
typedef struct cpu_mm {
    const ds4_weight *w;
    int64_t mat, row0, n_rows;
    const float *x;
    int64_t ldx;
    const void *xq;
    const int32_t *xidx;
    int n;
    float *y;
    int64_t ldy;
} cpu_mm;

/* Runs n_mm independent products as one parallel run (row chunks of every
 * product handed out dynamically, so all threads stay busy even when the
 * products differ in size or format). With act_quant, float32 x rows of a
 * quantized weight are first quantized to its activation type (E.1), once
 * per distinct (x, ldx, activation type). Each y element is the row dot's
 * result (quant.h tiles), so results never depend on the grouping, the
 * batch or the threads. Returns 0, DS4_E_NOMEM or DS4_E_INTERNAL (also
 * kept in c->err). */
int cpu_matmuls(cpu_ctx *c, const cpu_mm *mm, int n_mm, bool act_quant);

/* One product (cpu_matmuls with n_mm = 1 and x rows). */
int cpu_matmul(cpu_ctx *c, const ds4_weight *w, int64_t mat, int64_t row0, int64_t n_rows,
               const float *x, int64_t ldx, const int32_t *xidx, int n, float *y, int64_t ldy,
               bool act_quant);

/* RMSNorm of x[0..n) into out (sum of squares in double, as ds4), times w
 * when w != NULL. out may equal x. */
void cpu_rmsnorm(float *out, const float *x, int n, const float *w, float eps);

/* Interleaved-pair RoPE on z[0..n_rot) at position pos (inverse: angle -θ). */
void cpu_rope(float *z, int n_rot, const float *inv_freq, int pos, bool inverse);
/* the same rotation in two steps: the angles' cos/sin of one position once
 * (cs: n_rot floats), then applied to any number of heads (same bits) */
void cpu_rope_table(float *cs, int n_rot, const float *inv_freq, int pos);
void cpu_rope_apply(float *z, int n_rot, const float *cs, bool inverse);

/* Float32 vector helpers (cpu_vec.c): 8 partial sums, no FMA, the same bits
 * on every SIMD path.
 *   cpu_dot8:       sum_i a[i] b[i]
 *   cpu_dot8_rows:  s[r] = cpu_dot8(q, rows[r], n) * scale, r < nr
 *   cpu_dot8_heads: out[h] = cpu_dot8(q + h * n, k, n), h < n_heads
 *   cpu_sum_rows:   out[i] = sum_r p[r] rows[r][i], rows added in order
 * Row sums: the product p[r] * v is rounded, then added; dots: likewise. */
float cpu_dot8(const float *a, const float *b, int n);
void cpu_dot8_rows(const float *q, const float *const *rows, int nr, int n, float scale, float *s);
void cpu_dot8_heads(const float *q, int n_heads, const float *k, int n, float *out);
void cpu_sum_rows(const float *p, const float *const *rows, int nr, int n, float *out);
/* The same for nq queries against the same rows (s and p are (nq, nr)),
 * reading each row once for all of them; each query's result is the
 * single-query one bit for bit. */
void cpu_dot8_rows_multi(const float *const *q, int nq, const float *const *rows, int nr, int n, float scale,
                         float *s);
void cpu_sum_rows_multi(const float *p, int nq, const float *const *rows, int nr, int n, float *const *out);

/* Exact FP4 indexer dots: out[h] = ds4_num_fp4_dot(qc + h * n, powers of
 * head h, kc, kp, n) for h < n_heads, bit for bit, with the query powers
 * block-major (qpT[b * n_heads + h]). _ref: the portable loop (tests). */
void cpu_fp4_dot_heads(const int8_t *qc, const float *qpT, int n_heads, const int8_t *kc, const float *kp, int n,
                       float *out);
/* ds4_num_fp4_codes, the same codes and powers (AVX2 where the CPU has it). */
void cpu_fp4_codes(const float *x, int n, int8_t *c, float *p);
void cpu_fp4_dot_heads_ref(const int8_t *qc, const float *qpT, int n_heads, const int8_t *kc, const float *kp, int n,
                           float *out);

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
int cpu_mtp_embed(void *ctx, const ds4_mtp_embed_args *a);

#endif
