/* cpu_backend.c - the CPU reference backend: context, thread pool, scratch,
 * memory ops, the matrix-product engine, the norm/RoPE helpers, the bench
 * hooks (bandwidth probe, per-stage profile) and the vtable.
 *
 * Speed (issue 13). Matrix products run as one parallel run of row chunks
 * handed out dynamically; each chunk runs the quant tiles over the whole
 * batch, so prefill reads a weight block once per chunk of tokens instead of
 * once per token, and decode keeps every thread on every large product
 * (the six routed experts' rows together). Kernels: AVX2 (+FMA/F16C/BMI2)
 * chosen at run time, scalar otherwise.
 * Not done, documented instead:
 *  - AVX-512 / VNNI kernels: none; no machine here has them to test on.
 *  - NUMA: untested (no multi-socket machine). Threads are not pinned and the
 *    model is read through the page cache where it lies; on a multi-socket
 *    server run one process per socket (numactl --cpunodebind=N --membind=N)
 *    or interleave the mapping (numactl --interleave=all) and compare.
 */
#include "cpu/cpu.h"

#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "quant.h"
#include "quant_impl.h"
#include "synth.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

/* ------------------------------------------------------------ pool */

typedef struct worker_arg {
    cpu_ctx *c;
    int tid;
} worker_arg;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline void cpu_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* How long an idle worker polls for the next run before it sleeps. A decode
 * step issues a dozen runs per layer, tens to hundreds of microseconds
 * apart; a futex wake-up costs about as much as a small run, so workers poll
 * through the gaps and sleep only when the engine is idle. */
#define CPU_SPIN_S 300e-6

static void run_range(cpu_ctx *c, int tid) {
    int n = c->n_items, T = c->n_threads;
    int i0 = (int)((int64_t)n * tid / T), i1 = (int)((int64_t)n * (tid + 1) / T);
    if (i1 > i0) c->fn(c->arg, i0, i1, tid);
}

/* Waits until the generation differs from `seen` (or quit): polls for
 * CPU_SPIN_S, then sleeps. The sleeper registers in n_sleeping before its
 * last check, and cpu_run bumps the generation before it reads n_sleeping
 * (both sequentially consistent), so a run never misses a sleeper. */
static uint64_t wait_generation(cpu_ctx *c, uint64_t seen) {
    uint64_t g;
    double t0 = 0;
    for (int i = 0;; i++) {
        if ((g = atomic_load_explicit(&c->generation, memory_order_acquire)) != seen) return g;
        if (atomic_load_explicit(&c->quit, memory_order_relaxed)) return g;
        cpu_pause();
        if ((i & 255) == 255) {
            double t = now_s();
            if (t0 == 0) t0 = t;
            else if (t - t0 > CPU_SPIN_S) break;
        }
    }
    pthread_mutex_lock(&c->mu);
    atomic_fetch_add(&c->n_sleeping, 1);
    while ((g = atomic_load(&c->generation)) == seen && !atomic_load(&c->quit)) pthread_cond_wait(&c->cv_start, &c->mu);
    atomic_fetch_sub(&c->n_sleeping, 1);
    pthread_mutex_unlock(&c->mu);
    return g;
}

static void *worker_main(void *p) {
    worker_arg *wa = p;
    cpu_ctx *c = wa->c;
    int tid = wa->tid;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        seen = wait_generation(c, seen);
        if (atomic_load(&c->quit)) break;
        run_range(c, tid);
        atomic_fetch_sub_explicit(&c->n_pending, 1, memory_order_release);
    }
    return NULL;
}

void cpu_run(cpu_ctx *c, int n_items, cpu_task_fn fn, void *arg) {
    if (n_items <= 0) return;
    if (c->n_threads == 1 || n_items == 1) {
        fn(arg, 0, n_items, 0);
        return;
    }
    c->fn = fn;
    c->arg = arg;
    c->n_items = n_items;
    atomic_store_explicit(&c->n_pending, c->n_threads - 1, memory_order_relaxed);
    atomic_fetch_add(&c->generation, 1); /* publishes fn/arg/n_items */
    if (atomic_load(&c->n_sleeping) > 0) {
        pthread_mutex_lock(&c->mu);
        pthread_cond_broadcast(&c->cv_start);
        pthread_mutex_unlock(&c->mu);
    }
    run_range(c, 0);
    /* workers finish within microseconds of us; yield only if one was
     * descheduled (more runnable threads than cores) */
    for (int i = 0; atomic_load_explicit(&c->n_pending, memory_order_acquire) > 0; i++) {
        if (i < 4096) cpu_pause();
        else sched_yield();
    }
}

void cpu_run_w(cpu_ctx *c, int n_items, double work_per_item, cpu_task_fn fn, void *arg) {
    if (n_items > 0 && (double)n_items * work_per_item < 262144.0) {
        fn(arg, 0, n_items, 0);
        return;
    }
    cpu_run(c, n_items, fn, arg);
}

/* ------------------------------------------------------------ scratch */

static void *grow(void **p, size_t *have, size_t bytes) {
    if (bytes <= *have && *p) return *p;
    size_t nb = bytes < 64 ? 64 : bytes + bytes / 4;
    void *q = realloc(*p, nb);
    if (!q) return NULL;
    *p = q;
    *have = nb;
    return q;
}

void *cpu_scratch(cpu_ctx *c, int slot, size_t bytes) {
    void *p = grow(&c->scratch[slot], &c->scratch_bytes[slot], bytes);
    if (!p) c->err = DS4_E_NOMEM;
    return p;
}

void *cpu_tscratch(cpu_ctx *c, int tid, int slot, size_t bytes) {
    void *p = grow(&c->tscratch[tid][slot], &c->tscratch_bytes[tid][slot], bytes);
    if (!p) c->err = DS4_E_NOMEM; /* benign race: any thread may set the same code */
    return p;
}

/* ------------------------------------------------------------ helpers */

void cpu_rmsnorm(float *out, const float *x, int n, const float *w, float eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) {
        float v = x[i] * r;
        out[i] = w ? w[i] * v : v;
    }
}

void cpu_rope_table(float *cs, int n_rot, const float *inv_freq, int pos) {
    for (int i = 0; i < n_rot / 2; i++) {
        float th = (float)pos * inv_freq[i];
        cs[2 * i] = cosf(th);
        cs[2 * i + 1] = sinf(th);
    }
}

void cpu_rope_apply(float *z, int n_rot, const float *cs, bool inverse) {
    for (int i = 0; i < n_rot / 2; i++) {
        float c = cs[2 * i], s = cs[2 * i + 1];
        if (inverse) s = -s;
        float x0 = z[2 * i], x1 = z[2 * i + 1];
        z[2 * i] = x0 * c - x1 * s;
        z[2 * i + 1] = x1 * c + x0 * s;
    }
}

void cpu_rope(float *z, int n_rot, const float *inv_freq, int pos, bool inverse) {
    for (int i = 0; i < n_rot / 2; i++) {
        float th = (float)pos * inv_freq[i];
        float cs[2] = {cosf(th), sinf(th)};
        cpu_rope_apply(z + 2 * i, 2, cs, inverse);
    }
}

/* ------------------------------------------------------------ matrix products */

/* A product as executed: kernels, resolved pointers, and its row chunks
 * (items first_chunk .. first_chunk + n_chunks - 1 of the run). */
struct cpu_mm_plan {
    const ds4_quant_kernels *k;
    const unsigned char *base;   /* row 0 of the product (row0 applied) */
    size_t row_bytes;
    int64_t n_rows;
    int n_in;
    const float *x;              /* float32 activations, or */
    int64_t ldx;
    const unsigned char *xq;     /* quantized activations (xq_bytes per row) */
    size_t xq_bytes;
    const int32_t *xidx;
    int n;
    float *y;
    int64_t ldy;
    int chunk_rows, first_chunk, n_chunks;
};

typedef struct mm_run {
    const cpu_mm_plan *p;
    int n_p, n_chunks;
    atomic_int next;             /* next chunk to hand out */
} mm_run;

enum { MM_TOK_BLOCK = 64 };      /* tokens per tile call (pointer arrays on the stack) */

/* Rows [r0, r1) of product p for all its tokens, in tile calls of up to
 * MM_TOK_BLOCK tokens. */
static void mm_chunk(const cpu_mm_plan *p, int64_t r0, int64_t r1) {
    const void *xp[MM_TOK_BLOCK];
    const float *xf[MM_TOK_BLOCK];
    const int nr = (int)(r1 - r0);
    const unsigned char *w = p->base + (size_t)r0 * p->row_bytes;
    for (int t0 = 0; t0 < p->n; t0 += MM_TOK_BLOCK) {
        int nt = p->n - t0 < MM_TOK_BLOCK ? p->n - t0 : MM_TOK_BLOCK;
        for (int t = 0; t < nt; t++) {
            int64_t xr = p->xidx ? p->xidx[t0 + t] : t0 + t;
            if (p->xq) xp[t] = p->xq + (size_t)xr * p->xq_bytes;
            else xf[t] = p->x + xr * p->ldx;
        }
        float *y = p->y + (int64_t)t0 * p->ldy + r0;
        if (p->xq && p->k->dot_q_tile) {
            p->k->dot_q_tile(w, p->row_bytes, nr, xp, nt, p->n_in, y, p->ldy);
        } else if (!p->xq && p->k->dot_f32_tile) {
            p->k->dot_f32_tile(w, p->row_bytes, nr, xf, nt, p->n_in, y, p->ldy);
        } else {
            /* no tile for this type: rows outer, so a row stays in L1 */
            for (int r = 0; r < nr; r++) {
                const unsigned char *row = w + (size_t)r * p->row_bytes;
                for (int t = 0; t < nt; t++)
                    y[(int64_t)t * p->ldy + r] = p->xq ? p->k->dot_q(row, xp[t], p->n_in)
                                                       : p->k->dot_f32(row, xf[t], p->n_in);
            }
        }
    }
}

static void mm_task(void *arg, int i0, int i1, int tid) {
    (void)i0;
    (void)i1;
    (void)tid;
    mm_run *run = arg;
    int pi = 0;
    for (;;) {
        int i = atomic_fetch_add_explicit(&run->next, 1, memory_order_relaxed);
        if (i >= run->n_chunks) break;
        while (i >= run->p[pi].first_chunk + run->p[pi].n_chunks) pi++; /* chunks are handed out in order */
        const cpu_mm_plan *p = &run->p[pi];
        int64_t r0 = (int64_t)(i - p->first_chunk) * p->chunk_rows;
        int64_t r1 = r0 + p->chunk_rows < p->n_rows ? r0 + p->chunk_rows : p->n_rows;
        mm_chunk(p, r0, r1);
    }
}

/* Activation quantization of a run: rows [0, n_rows) of input i go to dst. */
typedef struct mm_quant_in {
    int act_type;
    const float *x;
    int64_t ldx, n_in;
    int n_rows;
    unsigned char *dst;
    size_t row_bytes;
    int first_row;               /* index of its first row among all inputs */
} mm_quant_in;

typedef struct mm_quant_job {
    const mm_quant_in *in;
    int n_in;
} mm_quant_job;

static void mm_quant_task(void *arg, int i0, int i1, int tid) {
    (void)tid;
    const mm_quant_job *j = arg;
    int k = 0;
    for (int i = i0; i < i1; i++) {
        while (i >= j->in[k].first_row + j->in[k].n_rows) k++;
        const mm_quant_in *q = &j->in[k];
        int r = i - q->first_row;
        ds4_quantize_act(q->act_type, q->x + (int64_t)r * q->ldx, q->dst + (size_t)r * q->row_bytes, q->n_in);
    }
}

/* Rows per chunk: about 384 KiB of weights (stays in L2 while a chunk's
 * tokens stream past; the prefill tiles build their token layouts once per
 * call, so larger chunks spread that cost: 96 KiB measured 67 -> 83 GMAC/s
 * on the VNNI Q8_0 tile and 63 -> 128 on AMX, decode unchanged), a multiple
 * of 16 (the AMX tiles' rows; a remainder would take the VNNI tile and its
 * own token layout), fewer when the run would have too few chunks to keep
 * every thread busy. */
#define CHUNK_KB 384
static int chunk_rows_for(size_t row_bytes, int64_t n_rows, int64_t total_rows, int n_threads) {
    int64_t cr = (int64_t)(CHUNK_KB * 1024 / (row_bytes ? row_bytes : 1));
    cr = (cr + 15) / 16 * 16;
    if (cr < 16) cr = 16;
    if (cr > 512) cr = 512;
    while (cr > 16 && total_rows / cr < 4 * n_threads) cr -= 16;
    return (int)(cr < n_rows ? cr : (n_rows > 0 ? n_rows : 1));
}

int cpu_matmuls(cpu_ctx *c, const cpu_mm *mm, int n_mm, bool act_quant) {
    if (n_mm <= 0) return 0;
    size_t need = (size_t)n_mm * (sizeof(cpu_mm_plan) + sizeof(mm_quant_in));
    if (need > c->mm_plans_bytes) {
        void *np = realloc(c->mm_plans, need);
        if (!np) return c->err = DS4_E_NOMEM;
        c->mm_plans = np;
        c->mm_plans_bytes = need;
    }
    cpu_mm_plan *P = c->mm_plans;
    mm_quant_in *Q = (mm_quant_in *)(P + n_mm);
    int n_q = 0, q_rows = 0;
    size_t xq_total = 0;
    double work = 0;
    int64_t total_rows = 0;
    /* 1. resolve kernels and find the distinct inputs to quantize */
    for (int i = 0; i < n_mm; i++) {
        const cpu_mm *m = &mm[i];
        cpu_mm_plan *p = &P[i];
        memset(p, 0, sizeof *p);
        p->k = ds4_quant_kernels_get(m->w->type, DS4_SIMD_AUTO);
        if (!p->k || !p->k->dot_f32) return c->err = DS4_E_INTERNAL;
        p->base = (const unsigned char *)m->w->data + (size_t)m->mat * m->w->mat_bytes +
                  (size_t)m->row0 * m->w->row_bytes;
        p->row_bytes = m->w->row_bytes;
        p->n_rows = m->n > 0 ? m->n_rows : 0;
        p->n_in = (int)m->w->n_in;
        p->xidx = m->xidx;
        p->n = m->n;
        p->y = m->y;
        p->ldy = m->ldy;
        p->x = m->x;
        p->ldx = m->ldx;
        if (m->xq) {
            if (!p->k->dot_q || p->k->act_type < 0) return c->err = DS4_E_INTERNAL;
            p->xq = m->xq;
            p->xq_bytes = ds4_type_row_bytes(p->k->act_type, p->n_in);
        } else if (act_quant && p->k->act_type >= 0 && p->k->dot_q && p->n_rows > 0) {
            int rows = 0;
            for (int t = 0; t < m->n; t++) {
                int xr = m->xidx ? m->xidx[t] : t;
                if (xr + 1 > rows) rows = xr + 1;
            }
            int q = 0;
            while (q < n_q && !(Q[q].x == m->x && Q[q].ldx == m->ldx && Q[q].act_type == p->k->act_type &&
                                Q[q].n_in == p->n_in))
                q++;
            if (q == n_q) {
                Q[n_q++] = (mm_quant_in){.act_type = p->k->act_type, .x = m->x, .ldx = m->ldx, .n_in = p->n_in,
                                         .row_bytes = ds4_type_row_bytes(p->k->act_type, p->n_in)};
            }
            if (rows > Q[q].n_rows) Q[q].n_rows = rows;
            p->first_chunk = -1 - q; /* input index until the buffer exists */
        }
        work += (double)p->n_rows * p->n * p->n_in;
        total_rows += p->n_rows;
    }
    /* 2. quantize each distinct input once, in one parallel pass */
    if (n_q) {
        for (int q = 0; q < n_q; q++) {
            Q[q].first_row = q_rows;
            q_rows += Q[q].n_rows;
            xq_total += (size_t)Q[q].n_rows * Q[q].row_bytes;
        }
        if (xq_total > c->mm_xq_bytes) {
            void *nx = realloc(c->mm_xq, xq_total + xq_total / 4);
            if (!nx) return c->err = DS4_E_NOMEM;
            c->mm_xq = nx;
            c->mm_xq_bytes = xq_total + xq_total / 4;
        }
        size_t off = 0;
        for (int q = 0; q < n_q; q++) {
            Q[q].dst = (unsigned char *)c->mm_xq + off;
            off += (size_t)Q[q].n_rows * Q[q].row_bytes;
        }
        mm_quant_job qj = {Q, n_q};
        cpu_run_w(c, q_rows, (double)Q[0].n_in * 8, mm_quant_task, &qj);
        for (int i = 0; i < n_mm; i++)
            if (P[i].first_chunk < 0) {
                const mm_quant_in *q = &Q[-1 - P[i].first_chunk];
                P[i].xq = q->dst;
                P[i].xq_bytes = q->row_bytes;
                P[i].first_chunk = 0;
            }
    }
    /* 3. chunks, then one run */
    mm_run run = {.p = P, .n_p = n_mm};
    for (int i = 0; i < n_mm; i++) {
        P[i].chunk_rows = chunk_rows_for(P[i].row_bytes, P[i].n_rows, total_rows, c->n_threads);
        P[i].first_chunk = run.n_chunks;
        P[i].n_chunks = P[i].n_rows > 0 ? (int)((P[i].n_rows + P[i].chunk_rows - 1) / P[i].chunk_rows) : 0;
        run.n_chunks += P[i].n_chunks;
    }
    if (run.n_chunks == 0) return 0;
    atomic_init(&run.next, 0);
    if (work < 262144.0) mm_task(&run, 0, 1, 0);
    else cpu_run(c, c->n_threads, mm_task, &run);
    return 0;
}

int cpu_matmul(cpu_ctx *c, const ds4_weight *w, int64_t mat, int64_t row0, int64_t n_rows,
               const float *x, int64_t ldx, const int32_t *xidx, int n, float *y, int64_t ldy,
               bool act_quant) {
    cpu_mm m = {.w = w, .mat = mat, .row0 = row0, .n_rows = n_rows, .x = x, .ldx = ldx, .xidx = xidx, .n = n,
                .y = y, .ldy = ldy};
    return cpu_matmuls(c, &m, 1, act_quant);
}

/* ------------------------------------------------------------ vtable */

static void cpu_destroy(void *ctx) {
    cpu_ctx *c = ctx;
    if (!c) return;
    atomic_store(&c->quit, true);
    atomic_fetch_add(&c->generation, 1);
    pthread_mutex_lock(&c->mu);
    pthread_cond_broadcast(&c->cv_start);
    pthread_mutex_unlock(&c->mu);
    for (int i = 1; i < c->n_threads; i++) pthread_join(c->threads[i], NULL);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv_start);
    for (int i = 0; i < 8; i++) free(c->scratch[i]);
    for (int t = 0; t < CPU_MAX_THREADS; t++)
        for (int s = 0; s < CPU_TSLOTS; s++) free(c->tscratch[t][s]);
    free(c->mm_plans);
    free(c->mm_xq);
    free(c);
}

static int cpu_check_model(void *ctx, const ds4_model *m, ds4_err *err) {
    (void)ctx;
    if (m->hp.n_hc > 64)
        return ds4_err_set(err, DS4_E_MODEL, "cpu backend: hyper_connection.count %d exceeds 64", m->hp.n_hc);
    if (m->hp.idx_heads > 256 || m->hp.n_expert_used > 64 || m->hp.o_groups > 64)
        return ds4_err_set(err, DS4_E_MODEL, "cpu backend: %d indexer heads, %d experts per token or %d output groups "
                           "exceed 256, 64, 64", m->hp.idx_heads, m->hp.n_expert_used, m->hp.o_groups);
    /* Every type bound by model.c has scalar kernels in quant.c. */
    for (int il = 0; il < m->hp.n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        if ((l->kind == DS4_ATTN_CSA ? 2 : 1) * l->ratio > 256)
            return ds4_err_set(err, DS4_E_MODEL, "cpu backend: layer %d compress ratio %d exceeds 256", il, l->ratio);
        const ds4_weight *ws[] = {&l->q_a, &l->q_b, &l->kv, &l->o_a, &l->o_b, &l->gate_inp,
                                  &l->gate_exps, &l->up_exps, &l->down_exps, &l->gate_sh,
                                  &l->up_sh, &l->down_sh};
        for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++)
            if (!ds4_quant_kernels_get(ws[i]->type, DS4_SIMD_AUTO))
                return ds4_err_set(err, DS4_E_MODEL, "cpu backend: no kernels for tensor '%s' (%s)",
                                   ws[i]->name, ds4_type_name(ws[i]->type));
    }
    return 0;
}

static void *cpu_alloc(void *ctx, size_t bytes) {
    (void)ctx;
    return calloc(1, bytes ? bytes : 1);
}
static void cpu_free(void *ctx, void *p) {
    (void)ctx;
    free(p);
}
static int cpu_copy(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    (void)ctx;
    (void)err;
    if (bytes) memmove(dst, src, bytes);
    return 0;
}
static int cpu_kv_row_type(void *ctx, ds4_numerics num) {
    (void)ctx;
    (void)num;
    return DS4_TYPE_F32;
}
static int cpu_reserve(void *ctx, const ds4_model *m, int n_batch, int n_ctx, ds4_err *err) {
    (void)ctx; /* scratch grows on first use (no captured steps on the CPU) */
    (void)m;
    (void)n_batch;
    (void)n_ctx;
    (void)err;
    return 0;
}
static int cpu_step_begin(void *ctx, const ds4_step_info *si, ds4_err *err) {
    (void)si;
    (void)err;
    ((cpu_ctx *)ctx)->err = 0;
    return 0; /* always issue the stages */
}
static int cpu_step_end(void *ctx, ds4_err *err) {
    cpu_ctx *c = ctx;
    int e = c->err;
    c->err = 0;
    if (e) return ds4_err_set(err, e, "cpu backend: %s", e == DS4_E_NOMEM ? "out of memory" : "internal error");
    return 0;
}
static void cpu_forget(void *ctx, uint64_t key) {
    (void)ctx;
    (void)key;
}
/* The lowest index of the largest finite value (the sampler's ds4_argmax
 * rule); -1 when none is finite (the backend contract). */
static int32_t argmax_row(const float *x, int n) {
    int32_t best = -1;
    float bv = 0.0f;
    for (int i = 0; i < n; i++)
        if (isfinite(x[i]) && (best < 0 || x[i] > bv)) {
            best = i;
            bv = x[i];
        }
    return best;
}
static int cpu_argmax(void *ctx, const float *logits, int n_rows, int n_vocab, int32_t *ids, ds4_err *err) {
    (void)ctx;
    (void)err;
    for (int r = 0; r < n_rows; r++) ids[r] = argmax_row(logits + (size_t)r * n_vocab, n_vocab);
    return 0;
}

/* ------------------------------------------------------------ bench hooks */

static void cpu_prof_mark(void *ctx, int kind) {
    cpu_ctx *c = ctx;
    double t = now_s();
    if (c->prof_kind >= 0 && c->prof_kind < DS4_PROF_N) c->prof_ms[c->prof_kind] += (t - c->prof_t0) * 1e3;
    c->prof_kind = kind < DS4_PROF_N ? kind : -1;
    c->prof_t0 = t;
}

static int cpu_prof_read(void *ctx, double *ms) {
    cpu_ctx *c = ctx;
    memcpy(ms, c->prof_ms, sizeof c->prof_ms);
    memset(c->prof_ms, 0, sizeof c->prof_ms);
    return 0;
}

/* Streaming read probe: every thread sums its slice of a buffer much
 * larger than the caches (touched first by the same thread, so pages sit on
 * its NUMA node under first-touch); the best of a few passes, in GB/s. This
 * is the bandwidth a decode step can hope for: it reads its weights once, in
 * streams, on all threads. */
typedef struct bw_job {
    const uint64_t *buf;
    size_t n_words;              /* whole buffer */
    int n_slices;                /* one per thread */
    bool touch;                  /* first pass: write (first-touch placement) */
    uint64_t sums[CPU_MAX_THREADS];
} bw_job;

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static uint64_t bw_sum_avx2(const uint64_t *p, size_t n) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(p + i + 4)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(p + i + 8)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(p + i + 12)));
    }
    uint64_t o[4];
    _mm256_storeu_si256((__m256i *)o, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
    uint64_t s = o[0] + o[1] + o[2] + o[3];
    for (; i < n; i++) s += p[i];
    return s;
}
#endif

static uint64_t bw_sum(const uint64_t *p, size_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (ds4_quant_simd_best() >= DS4_SIMD_AVX2) return bw_sum_avx2(p, n);
#endif
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) s0 += p[i], s1 += p[i + 1], s2 += p[i + 2], s3 += p[i + 3];
    for (; i < n; i++) s0 += p[i];
    return s0 + s1 + s2 + s3;
}

static void bw_task(void *p, int i0, int i1, int tid) {
    bw_job *j = p;
    (void)tid;
    for (int i = i0; i < i1; i++) {
        size_t a = j->n_words * (size_t)i / (size_t)j->n_slices, b = j->n_words * (size_t)(i + 1) / (size_t)j->n_slices;
        if (j->touch) memset((void *)(j->buf + a), (int)(a & 0xff), (b - a) * sizeof(uint64_t));
        else j->sums[i] = bw_sum(j->buf + a, b - a);
    }
}

static int cpu_bandwidth(void *ctx, double *gbps, ds4_err *err) {
    cpu_ctx *c = ctx;
    /* 1 GiB: far past any last-level cache, one second or less to run */
    const size_t bytes = (size_t)1 << 30;
    uint64_t *buf = malloc(bytes);
    if (!buf) return ds4_err_set(err, DS4_E_NOMEM, "cpu backend: no memory for the bandwidth probe");
    bw_job *j = calloc(1, sizeof *j);
    if (!j) {
        free(buf);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    j->buf = buf;
    j->n_words = bytes / sizeof(uint64_t);
    j->n_slices = c->n_threads;
    j->touch = true;
    cpu_run(c, c->n_threads, bw_task, j);
    j->touch = false;
    double best = 0;
    for (int rep = 0; rep < 4; rep++) {
        double t0 = now_s();
        cpu_run(c, c->n_threads, bw_task, j);
        double t = now_s() - t0;
        if (t > 0 && bytes / t > best) best = bytes / t;
    }
    free(buf);
    free(j);
    *gbps = best / 1e9;
    return 0;
}

static void cpu_describe(void *ctx, char *buf, size_t cap) {
    cpu_ctx *c = ctx;
    char model[128] = "";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "model name", 10)) {
                const char *v = strchr(line, ':');
                if (v) {
                    snprintf(model, sizeof model, "%s", v + 2);
                    model[strcspn(model, "\n")] = 0;
                }
                break;
            }
        fclose(f);
    }
    snprintf(buf, cap, "CPU %s, %d threads, %s%s kernels", model[0] ? model : "(unknown)", c->n_threads,
             ds4_quant_simd_best() == DS4_SIMD_AMX    ? "AVX2 + AVX-512 VNNI + AMX-INT8"
             : ds4_quant_simd_best() == DS4_SIMD_VNNI ? "AVX2 + AVX-512 VNNI"
             : ds4_quant_simd_best() == DS4_SIMD_AVX2 ? "AVX2"
                                                      : "scalar",
             ds4_quant_vbmi ? " + VBMI" : "");
}

/* Binding: the CPU reads the mapping in place (the bound model is the host
 * model), except for synthetic models, whose weights are filled here. */
typedef struct synth_fill {
    cpu_ctx *c;
    void **owned;
    int n_owned, cap;
    uint64_t seed;
    int64_t done, total;
    const ds4_bind_opts *o;
} synth_fill;

/* blocks [i0, i1) of one synthetic weight, on the pool (the generator is
 * pure: a block's bytes depend only on the key and its index) */
typedef struct synth_task {
    int type, be;
    uint64_t key;
    float std;
    uint8_t *p;
    size_t nb, per; /* blocks, blocks per item */
} synth_task;
static void synth_blocks(void *arg, int i0, int i1, int tid) {
    (void)tid;
    const synth_task *t = arg;
    for (size_t b = (size_t)i0 * t->per; b < (size_t)i1 * t->per && b < t->nb; b++)
        ds4_synth_block(t->type, t->key, b, t->std, t->p + b * (size_t)t->be);
}

static int synth_weight(void *user, ds4_weight *w) {
    synth_fill *sf = user;
    if (w->data) return 0;
    size_t bytes = w->mat_bytes * (size_t)w->n_mat;
    uint8_t *p = malloc(bytes ? bytes : 1);
    if (!p) return DS4_E_NOMEM;
    if (sf->n_owned == sf->cap) {
        int nc = sf->cap ? 2 * sf->cap : 256;
        void **no = realloc(sf->owned, (size_t)nc * sizeof(void *));
        if (!no) {
            free(p);
            return DS4_E_NOMEM;
        }
        sf->owned = no;
        sf->cap = nc;
    }
    sf->owned[sf->n_owned++] = p;
    int be = ds4_synth_block_bytes(w->type);
    synth_task t = {.type = w->type, .be = be, .key = ds4_synth_key(sf->seed, w->name),
                    .std = ds4_model_synth_std(w), .p = p, .nb = bytes / (size_t)be};
    t.per = t.nb / 4096 + 1;
    cpu_run(sf->c, (int)((t.nb + t.per - 1) / t.per), synth_blocks, &t);
    w->data = p;
    sf->done += (int64_t)bytes;
    if (sf->o->progress && sf->o->progress(sf->o->progress_user, sf->done, sf->total)) return DS4_E_CANCEL;
    return 0;
}
static int synth_count(void *user, ds4_weight *w) {
    synth_fill *sf = user;
    if (!w->data) sf->total += (int64_t)(w->mat_bytes * (size_t)w->n_mat);
    return 0;
}
static int vec_keep(void *user, void **p, size_t bytes) {
    (void)user;
    (void)p;
    (void)bytes;
    return 0;
}

typedef struct cpu_binding {
    ds4_model *mirror;
    void **owned;
    int n_owned;
} cpu_binding;

static int cpu_bind_model(void *ctx, const ds4_model *host, const ds4_bind_opts *o, ds4_model **bound,
                          ds4_err *err) {
    cpu_ctx *c = ctx;
    if (!o->synthetic) {
        *bound = (ds4_model *)host;
        return 0;
    }
    int slot = c->synth[0].bound ? 1 : 0;
    if (c->synth[slot].bound) return ds4_err_set(err, DS4_E_ARG, "cpu backend: at most two synthetic models");
    ds4_model *mm = ds4_model_mirror(host);
    if (!mm) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    synth_fill sf = {.c = c, .seed = o->seed, .o = o};
    ds4_model_visit cnt = {.weight = synth_count, .vec = vec_keep, .user = &sf};
    ds4_model_visit_all(mm, &cnt);
    ds4_model_visit v = {.weight = synth_weight, .vec = vec_keep, .user = &sf};
    int rc = ds4_model_visit_all(mm, &v);
    if (rc) {
        for (int i = 0; i < sf.n_owned; i++) free(sf.owned[i]);
        free(sf.owned);
        ds4_model_mirror_free(mm);
        return ds4_err_set(err, rc, rc == DS4_E_CANCEL ? "cancelled"
                                                       : "cpu backend: out of memory filling %.1f GiB of synthetic weights",
                           (double)sf.total / (1 << 30));
    }
    c->synth[slot] = (struct cpu_synth){.bound = mm, .owned = sf.owned, .n_owned = sf.n_owned};
    *bound = mm;
    return 0;
}

static void cpu_unbind_model(void *ctx, ds4_model *bound) {
    cpu_ctx *c = ctx;
    for (int k = 0; k < 2; k++) {
        struct cpu_synth *sy = &c->synth[k];
        if (sy->bound != bound) continue;
        for (int i = 0; i < sy->n_owned; i++) free(sy->owned[i]);
        free(sy->owned);
        *sy = (struct cpu_synth){0};
        ds4_model_mirror_free(bound);
        return;
    }
    /* else the host model itself: nothing was copied */
}

static const ds4_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .check_model = cpu_check_model,
    .bind_model = cpu_bind_model,
    .unbind_model = cpu_unbind_model,
    .kv_row_type = cpu_kv_row_type,
    .reserve = cpu_reserve,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .copy = cpu_copy,
    .step_begin = cpu_step_begin,
    .step_end = cpu_step_end,
    .forget = cpu_forget,
    .argmax = cpu_argmax,
    .prof_mark = cpu_prof_mark,
    .prof_read = cpu_prof_read,
    .bandwidth = cpu_bandwidth,
    .describe = cpu_describe,
    .embed = cpu_embed,
    .hc_pre = cpu_hc_pre,
    .attn_project = cpu_attn_project,
    .compress_update = cpu_compress_update,
    .indexer_select = cpu_indexer_select,
    .attention = cpu_attention,
    .kv_store = cpu_kv_store,
    .hc_post = cpu_hc_post,
    .moe_route = cpu_moe_route,
    .moe_experts = cpu_moe_experts,
    .head = cpu_head,
    .mtp_embed = cpu_mtp_embed,
};

int ds4_cpu_backend_new(int n_threads, ds4_backend *out, ds4_err *err) {
    if (n_threads <= 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = nc > 0 ? (int)nc : 1;
    }
    if (n_threads > CPU_MAX_THREADS) n_threads = CPU_MAX_THREADS;
    cpu_ctx *c = calloc(1, sizeof *c);
    if (!c) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    c->n_threads = 1;
    c->prof_kind = -1;
    atomic_init(&c->generation, 0);
    atomic_init(&c->n_pending, 0);
    atomic_init(&c->n_sleeping, 0);
    atomic_init(&c->quit, false);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv_start, NULL);
    /* Workers block every signal (they inherit the mask at creation), so
     * asynchronous signals such as SIGINT reach the application's threads:
     * a REPL waiting in read() must be interrupted, not a pool worker. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) {
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            cpu_destroy(c);
            return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        }
        wa->c = c;
        wa->tid = i;
        if (pthread_create(&c->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            cpu_destroy(c);
            return ds4_err_set(err, DS4_E_INTERNAL, "cpu backend: cannot create worker thread %d", i);
        }
        c->n_threads = i + 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    out->ops = &cpu_ops;
    out->ctx = c;
    return 0;
}
