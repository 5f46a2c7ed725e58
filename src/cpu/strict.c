/* strict.c - the strict test backend: the CPU reference's stages behind a
 * checker of the backend contract (backend.h "Memory").
 *
 * It owns an arena of allocations (every ops->alloc, and a copy of every
 * bound weight and vector), and before each stage it checks every pointer
 * of the argument struct: the model and layer must be its bound copy, and
 * every buffer must lie, with the extent the stage will touch, inside one
 * of its allocations. A violation fails the stage with DS4_E_INTERNAL and a
 * message naming the stage and the argument (reported by step_end). This
 * is what proves, without a GPU, that forward.c and the engine hand a
 * backend only memory it owns. Not thread-safe (like any backend context).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "quant.h"

typedef struct region {
    uintptr_t base;
    size_t bytes;
} region;

typedef struct strict_ctx {
    ds4_backend cpu;      /* the inner reference backend */
    region *r;            /* sorted by base */
    int n_r, cap_r;
    ds4_model *bound[2];  /* mirrors whose data lives in the arena (main, MTP) */
    int err;
    char msg[400];
} strict_ctx;

/* ------------------------------------------------------------ arena */

static int find_region(const strict_ctx *s, uintptr_t p) {
    int lo = 0, hi = s->n_r - 1, best = -1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (s->r[mid].base <= p) {
            best = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return best;
}

static void *arena_alloc(strict_ctx *s, size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) return NULL;
    if (s->n_r == s->cap_r) {
        int nc = s->cap_r ? 2 * s->cap_r : 256;
        region *nr = realloc(s->r, (size_t)nc * sizeof(region));
        if (!nr) {
            free(p);
            return NULL;
        }
        s->r = nr;
        s->cap_r = nc;
    }
    int i = find_region(s, (uintptr_t)p) + 1;
    memmove(s->r + i + 1, s->r + i, (size_t)(s->n_r - i) * sizeof(region));
    s->r[i] = (region){(uintptr_t)p, bytes ? bytes : 1};
    s->n_r++;
    return p;
}

static void arena_free(strict_ctx *s, void *p) {
    if (!p) return;
    int i = find_region(s, (uintptr_t)p);
    if (i < 0 || s->r[i].base != (uintptr_t)p) {
        if (!s->err) {
            s->err = DS4_E_INTERNAL;
            snprintf(s->msg, sizeof s->msg, "free of a pointer the strict backend did not allocate");
        }
        return;
    }
    memmove(s->r + i, s->r + i + 1, (size_t)(s->n_r - i - 1) * sizeof(region));
    s->n_r--;
    free(p);
}

/* 0 when [p, p+bytes) lies inside one allocation; else records the first
 * violation. */
static int chk(strict_ctx *s, const char *stage, const char *arg, const void *p, size_t bytes) {
    uintptr_t u = (uintptr_t)p;
    int i = p ? find_region(s, u) : -1;
    if (i >= 0 && u + bytes <= s->r[i].base + s->r[i].bytes) return 0;
    if (!s->err) {
        s->err = DS4_E_INTERNAL;
        snprintf(s->msg, sizeof s->msg, "strict backend: %s: argument %s (%p, %zu bytes) is not backend memory", stage,
                 arg, p, bytes);
    }
    return DS4_E_INTERNAL;
}

static int chk_model(strict_ctx *s, const char *stage, const ds4_model *m, const ds4_layer *l) {
    bool ok = m && (m == s->bound[0] || m == s->bound[1]) && (!l || (l >= m->layers && l < m->layers + m->hp.n_layer));
    if (ok) return 0;
    if (!s->err) {
        s->err = DS4_E_INTERNAL;
        snprintf(s->msg, sizeof s->msg, "strict backend: %s: the model or layer is not the bound model", stage);
    }
    return DS4_E_INTERNAL;
}

static size_t wbytes(const ds4_weight *w) { return w->mat_bytes * (size_t)w->n_mat; }

/* ------------------------------------------------------------ binding */

static int copy_weight(void *user, ds4_weight *w) {
    strict_ctx *s = user;
    void *p = arena_alloc(s, wbytes(w));
    if (!p) return DS4_E_NOMEM;
    memcpy(p, w->data, wbytes(w));
    w->data = p;
    return 0;
}

static int copy_vec(void *user, void **pp, size_t bytes) {
    strict_ctx *s = user;
    void *p = arena_alloc(s, bytes);
    if (!p) return DS4_E_NOMEM;
    memcpy(p, *pp, bytes);
    *pp = p;
    return 0;
}

static void st_free_model(strict_ctx *s, ds4_model *mm);

static int st_bind_model(void *ctx, const ds4_model *host, const ds4_bind_opts *o, ds4_model **bound, ds4_err *err) {
    strict_ctx *s = ctx;
    if (o->synthetic) return ds4_err_set(err, DS4_E_ARG, "strict backend: synthetic models are not supported");
    ds4_model *mm = ds4_model_mirror(host);
    if (!mm) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    ds4_model_visit v = {.weight = copy_weight, .vec = copy_vec, .user = s};
    int rc = ds4_model_visit_all(mm, &v);
    if (rc) {
        ds4_model_mirror_free(mm);
        return ds4_err_set(err, DS4_E_NOMEM, "strict backend: out of memory copying the weights");
    }
    if (s->bound[0] && s->bound[1]) {
        st_free_model(s, mm);
        return ds4_err_set(err, DS4_E_ARG, "strict backend: at most two models (main and MTP) can be bound");
    }
    s->bound[s->bound[0] ? 1 : 0] = mm;
    *bound = mm;
    return 0;
}

static int free_weight(void *user, ds4_weight *w) {
    arena_free(user, (void *)w->data);
    return 0;
}
static int free_vec(void *user, void **pp, size_t bytes) {
    (void)bytes;
    arena_free(user, *pp);
    return 0;
}

static void st_free_model(strict_ctx *s, ds4_model *mm) {
    ds4_model_visit v = {.weight = free_weight, .vec = free_vec, .user = s};
    ds4_model_visit_all(mm, &v);
    ds4_model_mirror_free(mm);
}

static void st_unbind_model(void *ctx, ds4_model *bound) {
    strict_ctx *s = ctx;
    st_free_model(s, bound);
    for (int i = 0; i < 2; i++)
        if (s->bound[i] == bound) s->bound[i] = NULL;
}

/* ------------------------------------------------------------ plain ops */

static void st_destroy(void *ctx) {
    strict_ctx *s = ctx;
    if (!s) return;
    for (int i = 0; i < s->n_r; i++) free((void *)s->r[i].base);
    free(s->r);
    if (s->cpu.ops) s->cpu.ops->destroy(s->cpu.ctx);
    free(s);
}
static int st_check_model(void *ctx, const ds4_model *m, ds4_err *err) {
    strict_ctx *s = ctx;
    return s->cpu.ops->check_model(s->cpu.ctx, m, err);
}
static int st_kv_row_type(void *ctx, ds4_numerics num) {
    strict_ctx *s = ctx;
    return s->cpu.ops->kv_row_type(s->cpu.ctx, num);
}
static int st_reserve(void *ctx, const ds4_model *m, int n_batch, int n_ctx, ds4_err *err) {
    strict_ctx *s = ctx;
    if (chk_model(s, "reserve", m, NULL)) return ds4_err_set(err, DS4_E_INTERNAL, "%s", s->msg);
    return s->cpu.ops->reserve(s->cpu.ctx, m, n_batch, n_ctx, err);
}
static void *st_alloc(void *ctx, size_t bytes) { return arena_alloc(ctx, bytes); }
static void st_free(void *ctx, void *p) { arena_free(ctx, p); }

static int report(strict_ctx *s, ds4_err *err) {
    int e = s->err;
    s->err = 0;
    return ds4_err_set(err, e, "%s", s->msg);
}
static int st_upload(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    strict_ctx *s = ctx;
    if (chk(s, "upload", "dst", dst, bytes)) return report(s, err);
    memmove(dst, src, bytes);
    return 0;
}
static int st_download(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    strict_ctx *s = ctx;
    if (chk(s, "download", "src", src, bytes)) return report(s, err);
    memmove(dst, src, bytes);
    return 0;
}
static int st_copy(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    strict_ctx *s = ctx;
    if (chk(s, "copy", "dst", dst, bytes) || chk(s, "copy", "src", src, bytes)) return report(s, err);
    memmove(dst, src, bytes);
    return 0;
}
static int st_step_begin(void *ctx, const ds4_step_info *si, ds4_err *err) {
    strict_ctx *s = ctx;
    s->err = 0;
    if (chk(s, "step_begin", "step", si->step, DS4_STEP_BYTES(si->n))) return report(s, err);
    return s->cpu.ops->step_begin(s->cpu.ctx, si, err);
}
static int st_step_end(void *ctx, ds4_err *err) {
    strict_ctx *s = ctx;
    int rc = s->cpu.ops->step_end(s->cpu.ctx, err);
    if (s->err) return report(s, err);
    return rc;
}
static void st_forget(void *ctx, uint64_t key) {
    strict_ctx *s = ctx;
    s->cpu.ops->forget(s->cpu.ctx, key);
}
static int st_argmax(void *ctx, const float *logits, int n_rows, int n_vocab, int32_t *ids, ds4_err *err) {
    strict_ctx *s = ctx;
    if (chk(s, "argmax", "logits", logits, (size_t)n_rows * n_vocab * sizeof(float))) return report(s, err);
    return s->cpu.ops->argmax(s->cpu.ctx, logits, n_rows, n_vocab, ids, err);
}

/* ------------------------------------------------------------ stages */

#define F32S(n) ((size_t)(n) * sizeof(float))
#define I32S(n) ((size_t)(n) * sizeof(int32_t))
#define CHK(arg, bytes) bad |= chk(s, stage, #arg, a->arg, (bytes)) != 0
#define COMMON()                                                                   \
    strict_ctx *s = ctx;                                                           \
    const ds4_hparams *hp = &a->m->hp;                                             \
    int bad = chk_model(s, stage, a->m, NULL) != 0;                                \
    bad |= chk(s, stage, "step", a->step, DS4_STEP_BYTES(a->n)) != 0;              \
    (void)hp
#define RUN(op)                                                                    \
    if (bad) return s->err;                                                        \
    return s->cpu.ops->op(s->cpu.ctx, a)

static size_t rowsz(int row_type) { return row_type == DS4_TYPE_F16 ? 2 : 4; }

static int st_embed(void *ctx, const ds4_embed_args *a) {
    static const char stage[] = "embed";
    COMMON();
    CHK(tokens, I32S(a->n));
    CHK(X, F32S((size_t)a->n * hp->n_hc * hp->n_embd));
    RUN(embed);
}

static int st_hc_pre(void *ctx, const ds4_hc_pre_args *a) {
    static const char stage[] = "hc_pre";
    COMMON();
    const size_t mix = (size_t)(2 + hp->n_hc) * hp->n_hc;
    bad |= chk(s, stage, "fn.data", a->fn->data, wbytes(a->fn)) != 0;
    CHK(scale, F32S(3));
    CHK(base, F32S(mix));
    CHK(norm_w, F32S(hp->n_embd));
    CHK(X, F32S((size_t)a->n * hp->n_hc * hp->n_embd));
    CHK(out, F32S((size_t)a->n * hp->n_embd));
    CHK(post, F32S((size_t)a->n * hp->n_hc));
    CHK(comb, F32S((size_t)a->n * hp->n_hc * hp->n_hc));
    if (a->py) {
        CHK(py, F32S((size_t)a->n * hp->n_embd));
        CHK(ppost, F32S((size_t)a->n * hp->n_hc));
        CHK(pcomb, F32S((size_t)a->n * hp->n_hc * hp->n_hc));
    }
    RUN(hc_pre);
}

static int chk_layer_weights(strict_ctx *s, const char *stage, const ds4_layer *l) {
    const ds4_weight *ws[] = {&l->q_a, &l->q_b, &l->kv, &l->o_a, &l->o_b, &l->comp_kv, &l->comp_gate, &l->comp_ape,
                              &l->idx_q_b, &l->idx_proj, &l->icomp_kv, &l->icomp_gate, &l->icomp_ape,
                              &l->gate_inp, &l->gate_exps, &l->up_exps, &l->down_exps, &l->gate_sh, &l->up_sh,
                              &l->down_sh};
    int bad = 0;
    for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++)
        if (ws[i]->n_in > 0) bad |= chk(s, stage, ws[i]->name ? ws[i]->name : "weight", ws[i]->data, wbytes(ws[i])) != 0;
    return bad;
}

static int chk_rope(strict_ctx *s, const char *stage, const ds4_rope *r) {
    for (int i = 0; i < 2; i++) {
        const ds4_model *b = s->bound[i];
        if (b && (r == &b->rope_main || r == &b->rope_compress))
            return chk(s, stage, "rope.inv_freq", r->inv_freq, F32S(b->hp.n_rot / 2)) != 0;
    }
    if (!s->err) {
        s->err = DS4_E_INTERNAL;
        snprintf(s->msg, sizeof s->msg, "strict backend: %s: rope is not the bound model's", stage);
    }
    return 1;
}

static int st_attn_project(void *ctx, const ds4_attn_project_args *a) {
    static const char stage[] = "attn_project";
    COMMON();
    bad |= chk_model(s, stage, a->m, a->l) != 0;
    bad |= chk_layer_weights(s, stage, a->l);
    bad |= chk_rope(s, stage, a->rope);
    bad |= chk(s, stage, "l.q_a_norm", a->l->q_a_norm, F32S(hp->q_lora)) != 0;
    bad |= chk(s, stage, "l.kv_norm", a->l->kv_norm, F32S(hp->head_dim)) != 0;
    CHK(u, F32S((size_t)a->n * hp->n_embd));
    CHK(cq, F32S((size_t)a->n * hp->q_lora));
    CHK(q, F32S((size_t)a->n * hp->n_head * hp->head_dim));
    CHK(kv, F32S((size_t)a->n * hp->head_dim));
    RUN(attn_project);
}

static int st_compress_update(void *ctx, const ds4_compress_args *a) {
    static const char stage[] = "compress_update";
    COMMON();
    const size_t c = a->overlap ? 2 : 1, w = c * (size_t)a->d, ring = c * (size_t)a->ratio;
    bad |= chk_rope(s, stage, a->rope);
    bad |= chk(s, stage, "ape.data", a->ape->data, wbytes(a->ape)) != 0;
    bad |= chk(s, stage, "wkv.data", a->wkv->data, wbytes(a->wkv)) != 0;
    bad |= chk(s, stage, "wgate.data", a->wgate->data, wbytes(a->wgate)) != 0;
    CHK(norm_w, F32S(a->d));
    CHK(u, F32S((size_t)a->n * hp->n_embd));
    CHK(fa, F32S(ring * w));
    CHK(fg, F32S(ring * w));
    CHK(rows, (size_t)a->cap * a->d * rowsz(a->row_type));
    RUN(compress_update);
}

static int st_indexer_select(void *ctx, const ds4_indexer_args *a) {
    static const char stage[] = "indexer_select";
    COMMON();
    bad |= chk_model(s, stage, a->m, a->l) != 0;
    bad |= chk_layer_weights(s, stage, a->l);
    bad |= chk_rope(s, stage, a->rope);
    size_t n_rows = (size_t)(a->pos0 + a->n) / 4;
    CHK(cq, F32S((size_t)a->n * hp->q_lora));
    CHK(u, F32S((size_t)a->n * hp->n_embd));
    if (n_rows) CHK(idx_rows, n_rows * hp->idx_dim * rowsz(a->row_type));
    CHK(sel, I32S((size_t)a->n * hp->idx_topk));
    CHK(n_sel, I32S(a->n));
    RUN(indexer_select);
}

static int st_attention(void *ctx, const ds4_attention_args *a) {
    static const char stage[] = "attention";
    COMMON();
    bad |= chk_model(s, stage, a->m, a->l) != 0;
    bad |= chk_layer_weights(s, stage, a->l);
    bad |= chk_rope(s, stage, a->rope);
    bad |= chk(s, stage, "l.sinks", a->l->sinks, F32S(hp->n_head)) != 0;
    const size_t dh = (size_t)hp->head_dim, rs = rowsz(a->row_type);
    CHK(q, F32S((size_t)a->n * hp->n_head * dh));
    CHK(kv, F32S((size_t)a->n * dh));
    CHK(raw, (size_t)hp->window * dh * rs);
    if (a->l->kind != DS4_ATTN_SLIDING) {
        size_t n_comp = (size_t)(a->pos0 + a->n) / (size_t)a->l->ratio;
        if (n_comp) CHK(comp, n_comp * dh * rs);
    }
    if (a->l->kind == DS4_ATTN_CSA) {
        CHK(sel, I32S((size_t)a->n * hp->idx_topk));
        CHK(n_sel, I32S(a->n));
    }
    CHK(y, F32S((size_t)a->n * hp->n_embd));
    RUN(attention);
}

static int st_kv_store(void *ctx, const ds4_kv_store_args *a) {
    static const char stage[] = "kv_store";
    COMMON();
    CHK(kv, F32S((size_t)a->n * hp->head_dim));
    CHK(raw, (size_t)hp->window * hp->head_dim * rowsz(a->row_type));
    RUN(kv_store);
}

static int st_hc_post(void *ctx, const ds4_hc_post_args *a) {
    static const char stage[] = "hc_post";
    COMMON();
    CHK(y, F32S((size_t)a->n * hp->n_embd));
    CHK(post, F32S((size_t)a->n * hp->n_hc));
    CHK(comb, F32S((size_t)a->n * hp->n_hc * hp->n_hc));
    CHK(X, F32S((size_t)a->n * hp->n_hc * hp->n_embd));
    RUN(hc_post);
}

static int st_moe_route(void *ctx, const ds4_moe_route_args *a) {
    static const char stage[] = "moe_route";
    COMMON();
    bad |= chk_model(s, stage, a->m, a->l) != 0;
    bad |= chk(s, stage, "l.gate_inp", a->l->gate_inp.data, wbytes(&a->l->gate_inp)) != 0;
    bad |= chk(s, stage, "l.exp_bias", a->l->exp_bias, F32S(hp->n_expert)) != 0;
    if (a->l->hash)
        bad |= chk(s, stage, "l.tid2eid", a->l->tid2eid, I32S((size_t)hp->n_vocab * hp->n_expert_used)) != 0;
    CHK(tokens, I32S(a->n));
    CHK(v, F32S((size_t)a->n * hp->n_embd));
    CHK(ids, I32S((size_t)a->n * hp->n_expert_used));
    CHK(w, F32S((size_t)a->n * hp->n_expert_used));
    RUN(moe_route);
}

static int st_moe_experts(void *ctx, const ds4_moe_experts_args *a) {
    static const char stage[] = "moe_experts";
    COMMON();
    bad |= chk_model(s, stage, a->m, a->l) != 0;
    bad |= chk_layer_weights(s, stage, a->l);
    CHK(v, F32S((size_t)a->n * hp->n_embd));
    CHK(ids, I32S((size_t)a->n * hp->n_expert_used));
    CHK(w, F32S((size_t)a->n * hp->n_expert_used));
    CHK(y, F32S((size_t)a->n * hp->n_embd));
    RUN(moe_experts);
}

static int st_head(void *ctx, const ds4_head_args *a) {
    static const char stage[] = "head";
    strict_ctx *s = ctx;
    const ds4_hparams *hp = &a->m->hp;
    int bad = chk_model(s, stage, a->m, NULL) != 0;
    bad |= chk(s, stage, "step", a->step, sizeof(ds4_step)) != 0;
    bad |= chk(s, stage, "output", a->m->output.data, wbytes(&a->m->output)) != 0;
    bad |= chk(s, stage, "out_hc_fn", a->m->out_hc_fn.data, wbytes(&a->m->out_hc_fn)) != 0;
    bad |= chk(s, stage, "out_norm", a->m->out_norm, F32S(hp->n_embd)) != 0;
    CHK(X, F32S((size_t)a->n * hp->n_hc * hp->n_embd));
    CHK(logits, F32S((size_t)a->n * hp->n_vocab));
    RUN(head);
}

static int st_mtp_embed(void *ctx, const ds4_mtp_embed_args *a) {
    static const char stage[] = "mtp_embed";
    COMMON();
    const ds4_model *m = a->m;
    bad |= chk(s, stage, "tok_embd", m->tok_embd.data, wbytes(&m->tok_embd)) != 0;
    bad |= chk(s, stage, "mtp_e_proj", m->mtp_e_proj.data, wbytes(&m->mtp_e_proj)) != 0;
    bad |= chk(s, stage, "mtp_h_proj", m->mtp_h_proj.data, wbytes(&m->mtp_h_proj)) != 0;
    bad |= chk(s, stage, "mtp_enorm", m->mtp_enorm, F32S(hp->n_embd)) != 0;
    bad |= chk(s, stage, "mtp_hnorm", m->mtp_hnorm, F32S(hp->n_embd)) != 0;
    CHK(tokens, I32S(a->n));
    CHK(hc, F32S((size_t)a->n * hp->n_hc * hp->n_embd));
    CHK(X, F32S((size_t)a->n * hp->n_hc * hp->n_embd));
    RUN(mtp_embed);
}

static const ds4_backend_ops strict_ops = {
    .name = "strict",
    .destroy = st_destroy,
    .check_model = st_check_model,
    .bind_model = st_bind_model,
    .unbind_model = st_unbind_model,
    .kv_row_type = st_kv_row_type,
    .reserve = st_reserve,
    .alloc = st_alloc,
    .free = st_free,
    .upload = st_upload,
    .download = st_download,
    .copy = st_copy,
    .step_begin = st_step_begin,
    .step_end = st_step_end,
    .forget = st_forget,
    .argmax = st_argmax,
    .embed = st_embed,
    .hc_pre = st_hc_pre,
    .attn_project = st_attn_project,
    .compress_update = st_compress_update,
    .indexer_select = st_indexer_select,
    .attention = st_attention,
    .kv_store = st_kv_store,
    .hc_post = st_hc_post,
    .moe_route = st_moe_route,
    .moe_experts = st_moe_experts,
    .head = st_head,
    .mtp_embed = st_mtp_embed,
};

int ds4_strict_backend_new(int n_threads, ds4_backend *out, ds4_err *err) {
    strict_ctx *s = calloc(1, sizeof *s);
    if (!s) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    int rc = ds4_cpu_backend_new(n_threads, &s->cpu, err);
    if (rc) {
        free(s);
        return rc;
    }
    out->ops = &strict_ops;
    out->ctx = s;
    return 0;
}
