/* cpu_backend.c - the CPU reference backend: context, thread pool, scratch,
 * memory ops, the shared matmul/norm/RoPE helpers and the vtable.
 */
#include "cpu/cpu.h"

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quant.h"
#include "synth.h"

/* ------------------------------------------------------------ pool */

typedef struct worker_arg {
    cpu_ctx *c;
    int tid;
} worker_arg;

static void run_range(cpu_ctx *c, int tid) {
    int n = c->n_items, T = c->n_threads;
    int i0 = (int)((int64_t)n * tid / T), i1 = (int)((int64_t)n * (tid + 1) / T);
    if (i1 > i0) c->fn(c->arg, i0, i1, tid);
}

static void *worker_main(void *p) {
    worker_arg *wa = p;
    cpu_ctx *c = wa->c;
    int tid = wa->tid;
    free(wa);
    uint64_t seen = 0;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->quit && c->generation == seen) pthread_cond_wait(&c->cv_start, &c->mu);
        if (c->quit) break;
        seen = c->generation;
        pthread_mutex_unlock(&c->mu);
        run_range(c, tid);
        pthread_mutex_lock(&c->mu);
        if (--c->n_pending == 0) pthread_cond_signal(&c->cv_done);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

void cpu_run(cpu_ctx *c, int n_items, cpu_task_fn fn, void *arg) {
    if (n_items <= 0) return;
    if (c->n_threads == 1 || n_items == 1) {
        fn(arg, 0, n_items, 0);
        return;
    }
    pthread_mutex_lock(&c->mu);
    c->fn = fn;
    c->arg = arg;
    c->n_items = n_items;
    c->n_pending = c->n_threads - 1;
    c->generation++;
    pthread_cond_broadcast(&c->cv_start);
    pthread_mutex_unlock(&c->mu);
    run_range(c, 0);
    pthread_mutex_lock(&c->mu);
    while (c->n_pending > 0) pthread_cond_wait(&c->cv_done, &c->mu);
    pthread_mutex_unlock(&c->mu);
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

void cpu_rope(float *z, int n_rot, const float *inv_freq, int pos, bool inverse) {
    for (int i = 0; i < n_rot / 2; i++) {
        float th = (float)pos * inv_freq[i];
        float c = cosf(th), s = sinf(th);
        if (inverse) s = -s;
        float x0 = z[2 * i], x1 = z[2 * i + 1];
        z[2 * i] = x0 * c - x1 * s;
        z[2 * i + 1] = x1 * c + x0 * s;
    }
}

typedef struct mm_job {
    const ds4_quant_kernels *k;
    const unsigned char *base;   /* first row of the matrix */
    size_t row_bytes;
    int64_t row0;
    const float *x;
    int64_t ldx;
    const unsigned char *xq;     /* quantized activations or NULL */
    size_t xq_bytes;             /* bytes per quantized row */
    const int32_t *xidx;
    int n, n_in;
    float *y;
    int64_t ldy;
} mm_job;

static void mm_task(void *p, int r0, int r1, int tid) {
    (void)tid;
    const mm_job *j = p;
    enum { RB = 16 };
    for (int rb = r0; rb < r1; rb += RB) {
        int re = rb + RB < r1 ? rb + RB : r1;
        for (int t = 0; t < j->n; t++) {
            int64_t xr = j->xidx ? j->xidx[t] : t;
            float *yt = j->y + (int64_t)t * j->ldy;
            if (j->xq) {
                const void *xq = j->xq + (size_t)xr * j->xq_bytes;
                for (int r = rb; r < re; r++)
                    yt[r] = j->k->dot_q(j->base + (size_t)(j->row0 + r) * j->row_bytes, xq, j->n_in);
            } else {
                const float *xt = j->x + xr * j->ldx;
                for (int r = rb; r < re; r++)
                    yt[r] = j->k->dot_f32(j->base + (size_t)(j->row0 + r) * j->row_bytes, xt, j->n_in);
            }
        }
    }
}

int cpu_matmul(cpu_ctx *c, const ds4_weight *w, int64_t mat, int64_t row0, int64_t n_rows,
               const float *x, int64_t ldx, const int32_t *xidx, int n, float *y, int64_t ldy,
               bool act_quant) {
    if (n <= 0 || n_rows <= 0) return 0;
    mm_job j = {0};
    j.k = ds4_quant_kernels_get(w->type, DS4_SIMD_AUTO);
    if (!j.k || !j.k->dot_f32) return c->err = DS4_E_INTERNAL;
    j.base = (const unsigned char *)w->data + (size_t)mat * w->mat_bytes;
    j.row_bytes = w->row_bytes;
    j.row0 = row0;
    j.x = x;
    j.ldx = ldx;
    j.xidx = xidx;
    j.n = n;
    j.n_in = (int)w->n_in;
    j.y = y; /* items are rows relative to row0 */
    j.ldy = ldy;
    if (act_quant && j.k->act_type >= 0 && j.k->dot_q) {
        /* Quantize the distinct x rows once (E.1), rows indexed like x. */
        int64_t n_x = 0;
        for (int t = 0; t < n; t++) {
            int64_t xr = xidx ? xidx[t] : t;
            if (xr + 1 > n_x) n_x = xr + 1;
        }
        j.xq_bytes = ds4_type_row_bytes(j.k->act_type, w->n_in);
        unsigned char *xq = cpu_scratch(c, 7, (size_t)n_x * j.xq_bytes);
        if (!xq) return DS4_E_NOMEM;
        for (int64_t r = 0; r < n_x; r++)
            ds4_quantize_act(j.k->act_type, x + r * ldx, xq + (size_t)r * j.xq_bytes, w->n_in);
        j.xq = xq;
    }
    cpu_run_w(c, (int)n_rows, (double)n * (double)w->n_in, mm_task, &j);
    return 0;
}

void *cpu_quantize_rows(cpu_ctx *c, int slot, int act_type, const float *x, int64_t ldx, int n, int64_t n_in) {
    size_t rb = ds4_type_row_bytes(act_type, n_in);
    unsigned char *xq = cpu_scratch(c, slot, (size_t)n * rb);
    if (!xq) return NULL;
    for (int r = 0; r < n; r++) ds4_quantize_act(act_type, x + r * ldx, xq + (size_t)r * rb, n_in);
    return xq;
}

int cpu_matmul_pre(cpu_ctx *c, const ds4_weight *w, int64_t mat, int64_t row0, int64_t n_rows, const void *xq,
                   const int32_t *xidx, int n, float *y, int64_t ldy) {
    if (n <= 0 || n_rows <= 0) return 0;
    mm_job j = {0};
    j.k = ds4_quant_kernels_get(w->type, DS4_SIMD_AUTO);
    if (!j.k || !j.k->dot_q || j.k->act_type < 0) return c->err = DS4_E_INTERNAL;
    j.base = (const unsigned char *)w->data + (size_t)mat * w->mat_bytes;
    j.row_bytes = w->row_bytes;
    j.row0 = row0;
    j.xidx = xidx;
    j.n = n;
    j.n_in = (int)w->n_in;
    j.y = y;
    j.ldy = ldy;
    j.xq = xq;
    j.xq_bytes = ds4_type_row_bytes(j.k->act_type, w->n_in);
    cpu_run_w(c, (int)n_rows, (double)n * (double)w->n_in, mm_task, &j);
    return 0;
}

/* ------------------------------------------------------------ vtable */

static void cpu_destroy(void *ctx) {
    cpu_ctx *c = ctx;
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    c->quit = true;
    pthread_cond_broadcast(&c->cv_start);
    pthread_mutex_unlock(&c->mu);
    for (int i = 1; i < c->n_threads; i++) pthread_join(c->threads[i], NULL);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv_start);
    pthread_cond_destroy(&c->cv_done);
    for (int i = 0; i < 8; i++) free(c->scratch[i]);
    for (int t = 0; t < CPU_MAX_THREADS; t++)
        for (int s = 0; s < CPU_TSLOTS; s++) free(c->tscratch[t][s]);
    free(c);
}

static int cpu_check_model(void *ctx, const ds4_model *m, ds4_err *err) {
    (void)ctx;
    if (m->hp.n_hc > 64)
        return ds4_err_set(err, DS4_E_MODEL, "cpu backend: hyper_connection.count %d exceeds 64", m->hp.n_hc);
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
/* The lowest index of the largest finite value; 0 when none is finite (the
 * sampler's ds4_argmax rule). */
static int32_t argmax_row(const float *x, int n) {
    int32_t best = -1;
    float bv = 0.0f;
    for (int i = 0; i < n; i++)
        if (isfinite(x[i]) && (best < 0 || x[i] > bv)) {
            best = i;
            bv = x[i];
        }
    return best < 0 ? 0 : best;
}
static int cpu_argmax(void *ctx, const float *logits, int n_rows, int n_vocab, int32_t *ids, ds4_err *err) {
    (void)ctx;
    (void)err;
    for (int r = 0; r < n_rows; r++) ids[r] = argmax_row(logits + (size_t)r * n_vocab, n_vocab);
    return 0;
}

/* Binding: the CPU reads the mapping in place (the bound model is the host
 * model), except for synthetic models, whose weights are filled here. */
typedef struct synth_fill {
    void **owned;
    int n_owned, cap;
    uint64_t seed;
    int64_t done, total;
    const ds4_bind_opts *o;
} synth_fill;

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
    size_t nb = bytes / (size_t)be;
    uint64_t key = ds4_synth_key(sf->seed, w->name);
    float std = ds4_model_synth_std(w);
    for (size_t b = 0; b < nb; b++) ds4_synth_block(w->type, key, b, std, p + b * (size_t)be);
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
    ds4_model *mm = ds4_model_mirror(host);
    if (!mm) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    synth_fill sf = {.seed = o->seed, .o = o};
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
    c->synth_owned = sf.owned;
    c->n_synth_owned = sf.n_owned;
    *bound = mm;
    return 0;
}

static void cpu_unbind_model(void *ctx, ds4_model *bound) {
    cpu_ctx *c = ctx;
    if (!c->synth_owned) return; /* the host model itself */
    for (int i = 0; i < c->n_synth_owned; i++) free(c->synth_owned[i]);
    free(c->synth_owned);
    c->synth_owned = NULL;
    c->n_synth_owned = 0;
    ds4_model_mirror_free(bound);
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
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv_start, NULL);
    pthread_cond_init(&c->cv_done, NULL);
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
