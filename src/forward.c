/* forward.c - the one layer loop (MODEL.md C.10/C.11) as backend stage
 * calls, and the per-session KV state of MODEL.md §D.
 *
 * Order inside a block (this order is what makes prefill == decode): HC-pre,
 * q/kv projection, compressor(s) for every token of the batch (rows are
 * final when emitted and visibility is by position, so emitting the whole
 * batch's rows before attention is exact), indexer selection, attention
 * (raw rows < pos0 from the ring, the batch's own rows from kv), then the
 * batch's raw rows are pushed into the ring, HC-post, FFN.
 *
 * State layout per layer (capacities from n_ctx): raw ring of `window` rows;
 * compressed rows n_ctx/R + 1; indexer rows n_ctx/4 + 1; frontier rings of
 * c*R token slots (token p in slot p % (c*R)), a and g (with ape).
 */
#include "forward.h"

#include <stdlib.h>
#include <string.h>

struct ds4_fwd {
    const ds4_model *m;
    const ds4_backend *be;
    ds4_numerics num;
    int n_ctx, n_batch, pos;
    ds4_layer_state *ls;   /* (n_layer) */
    /* batch activations, backend memory */
    float *X;              /* (n_batch, n_hc, D) */
    float *u;              /* (n_batch, D) sublayer input after norm */
    float *post, *comb;    /* (n_batch, n_hc), (n_batch, n_hc, n_hc) */
    float *cq;             /* (n_batch, q_lora) */
    float *q;              /* (n_batch, H, head_dim) */
    float *kv;             /* (n_batch, head_dim) */
    float *y;              /* (n_batch, D) sublayer output */
    int32_t *sel, *n_sel;  /* (n_batch, idx_topk), (n_batch) */
    int32_t *ids;          /* (n_batch, k) */
    float *w;              /* (n_batch, k) */
    float *logits;         /* (n_batch, n_vocab) */
    size_t ckpt_bytes;     /* cached ds4_fwd_ckpt_bytes */
};

static void *balloc(ds4_fwd *f, size_t bytes, int *fail) {
    void *p = f->be->ops->alloc(f->be->ctx, bytes);
    if (!p) *fail = 1;
    return p;
}

static int frontier_rows(const ds4_layer *l) { return (l->kind == DS4_ATTN_CSA ? 2 : 1) * l->ratio; }

int ds4_fwd_new(const ds4_model *m, const ds4_backend *be, ds4_numerics num, int n_ctx, int n_batch,
                ds4_fwd **out, ds4_err *err) {
    *out = NULL;
    const ds4_hparams *hp = &m->hp;
    if (n_ctx < 1 || n_batch < 1) return ds4_err_set(err, DS4_E_ARG, "n_ctx and n_batch must be >= 1");
    ds4_fwd *f = calloc(1, sizeof *f);
    if (!f) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    f->m = m;
    f->be = be;
    f->num = num;
    f->n_ctx = n_ctx;
    f->n_batch = n_batch;
    int fail = 0;
    const size_t F = sizeof(float), nb = (size_t)n_batch;
    const size_t D = (size_t)hp->n_embd, dh = (size_t)hp->head_dim;
    f->ls = calloc((size_t)hp->n_layer, sizeof(ds4_layer_state));
    if (!f->ls) fail = 1;
    for (int il = 0; !fail && il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        ds4_layer_state *s = &f->ls[il];
        s->raw = balloc(f, (size_t)hp->window * dh * F, &fail);
        if (l->kind != DS4_ATTN_SLIDING) {
            size_t w = (size_t)ds4_model_comp_width(m, il);
            s->comp_cap = n_ctx / l->ratio + 1;
            s->comp = balloc(f, (size_t)s->comp_cap * dh * F, &fail);
            s->comp_a = balloc(f, (size_t)frontier_rows(l) * w * F, &fail);
            s->comp_g = balloc(f, (size_t)frontier_rows(l) * w * F, &fail);
        }
        if (l->kind == DS4_ATTN_CSA) {
            size_t iw = 2 * (size_t)hp->idx_dim;
            s->idx_cap = n_ctx / 4 + 1;
            s->idx = balloc(f, (size_t)s->idx_cap * hp->idx_dim * F, &fail);
            s->icomp_a = balloc(f, 8 * iw * F, &fail);
            s->icomp_g = balloc(f, 8 * iw * F, &fail);
        }
    }
    if (!fail) {
        f->X = balloc(f, nb * hp->n_hc * D * F, &fail);
        f->u = balloc(f, nb * D * F, &fail);
        f->post = balloc(f, nb * hp->n_hc * F, &fail);
        f->comb = balloc(f, nb * hp->n_hc * hp->n_hc * F, &fail);
        f->cq = balloc(f, nb * hp->q_lora * F, &fail);
        f->q = balloc(f, nb * hp->n_head * dh * F, &fail);
        f->kv = balloc(f, nb * dh * F, &fail);
        f->y = balloc(f, nb * D * F, &fail);
        f->sel = balloc(f, nb * hp->idx_topk * sizeof(int32_t), &fail);
        f->n_sel = balloc(f, nb * sizeof(int32_t), &fail);
        f->ids = balloc(f, nb * hp->n_expert_used * sizeof(int32_t), &fail);
        f->w = balloc(f, nb * hp->n_expert_used * F, &fail);
        f->logits = balloc(f, nb * hp->n_vocab * F, &fail);
    }
    if (fail) {
        ds4_fwd_free(f);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory allocating the session state (n_ctx %d, batch %d)",
                           n_ctx, n_batch);
    }
    *out = f;
    return 0;
}

void ds4_fwd_free(ds4_fwd *f) {
    if (!f) return;
    void (*fr)(void *, void *) = f->be->ops->free;
    void *c = f->be->ctx;
    if (f->ls)
        for (int il = 0; il < f->m->hp.n_layer; il++) {
            ds4_layer_state *s = &f->ls[il];
            void *ps[] = {s->raw, s->comp, s->comp_a, s->comp_g, s->idx, s->icomp_a, s->icomp_g};
            for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++)
                if (ps[i]) fr(c, ps[i]);
        }
    free(f->ls);
    void *bs[] = {f->X, f->u, f->post, f->comb, f->cq, f->q, f->kv, f->y, f->sel, f->n_sel, f->ids, f->w, f->logits};
    for (size_t i = 0; i < sizeof bs / sizeof bs[0]; i++)
        if (bs[i]) fr(c, bs[i]);
    free(f);
}

void ds4_fwd_reset(ds4_fwd *f) { f->pos = 0; }
int ds4_fwd_pos(const ds4_fwd *f) { return f->pos; }
int ds4_fwd_n_batch(const ds4_fwd *f) { return f->n_batch; }

#define STAGE(op, args)                                   \
    do {                                                  \
        int rc_ = ops->op(ctx, &(args));                  \
        if (rc_) goto fail;                               \
    } while (0)

int ds4_fwd_eval(ds4_fwd *f, const int32_t *tokens, int n, float *logits, bool all, ds4_err *err) {
    const ds4_model *m = f->m;
    const ds4_hparams *hp = &m->hp;
    const ds4_backend_ops *ops = f->be->ops;
    void *ctx = f->be->ctx;
    if (n < 1 || n > f->n_batch || f->pos + n > f->n_ctx)
        return ds4_err_set(err, DS4_E_RANGE, "batch of %d tokens at position %d exceeds the session (ctx %d, batch %d)",
                           n, f->pos, f->n_ctx, f->n_batch);
    const int pos0 = f->pos;
    ops->step_begin(ctx);

    ds4_embed_args ea = {.m = m, .n = n, .tokens = tokens, .X = f->X};
    STAGE(embed, ea);
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        ds4_layer_state *s = &f->ls[il];
        const ds4_rope *rope = l->kind == DS4_ATTN_SLIDING ? &m->rope_main : &m->rope_compress;

        /* ---- attention sublayer */
        ds4_hc_pre_args hpa = {.m = m, .n = n, .fn = &l->hc_attn_fn, .scale = l->hc_attn_scale,
                               .base = l->hc_attn_base, .norm_w = l->attn_norm, .X = f->X,
                               .out = f->u, .post = f->post, .comb = f->comb};
        STAGE(hc_pre, hpa);
        ds4_attn_project_args pa = {.m = m, .l = l, .rope = rope, .num = f->num, .n = n, .pos0 = pos0,
                                    .u = f->u, .cq = f->cq, .q = f->q, .kv = f->kv};
        STAGE(attn_project, pa);
        if (l->kind != DS4_ATTN_SLIDING) {
            ds4_compress_args ca = {.m = m, .rope = rope, .num = f->num, .indexer = false, .ratio = l->ratio,
                                    .overlap = l->kind == DS4_ATTN_CSA, .d = hp->head_dim, .ape = &l->comp_ape,
                                    .wkv = &l->comp_kv, .wgate = &l->comp_gate, .norm_w = l->comp_norm,
                                    .n = n, .pos0 = pos0, .u = f->u, .fa = s->comp_a, .fg = s->comp_g,
                                    .rows = s->comp, .cap = s->comp_cap};
            STAGE(compress_update, ca);
        }
        if (l->kind == DS4_ATTN_CSA) {
            ds4_compress_args ia = {.m = m, .rope = rope, .num = f->num, .indexer = true, .ratio = 4,
                                    .overlap = true, .d = hp->idx_dim, .ape = &l->icomp_ape,
                                    .wkv = &l->icomp_kv, .wgate = &l->icomp_gate, .norm_w = l->icomp_norm,
                                    .n = n, .pos0 = pos0, .u = f->u, .fa = s->icomp_a, .fg = s->icomp_g,
                                    .rows = s->idx, .cap = s->idx_cap};
            STAGE(compress_update, ia);
            ds4_indexer_args xa = {.m = m, .l = l, .rope = rope, .num = f->num, .n = n, .pos0 = pos0,
                                   .cq = f->cq, .u = f->u, .idx_rows = s->idx, .sel = f->sel, .n_sel = f->n_sel};
            STAGE(indexer_select, xa);
        }
        ds4_attention_args aa = {.m = m, .l = l, .rope = rope, .num = f->num, .n = n, .pos0 = pos0,
                                 .q = f->q, .kv = f->kv, .raw = s->raw, .comp = s->comp,
                                 .sel = l->kind == DS4_ATTN_CSA ? f->sel : NULL,
                                 .n_sel = l->kind == DS4_ATTN_CSA ? f->n_sel : NULL, .y = f->y};
        STAGE(attention, aa);
        ds4_kv_store_args ka = {.m = m, .n = n, .pos0 = pos0, .kv = f->kv, .raw = s->raw};
        STAGE(kv_store, ka);
        ds4_hc_post_args po = {.m = m, .n = n, .y = f->y, .post = f->post, .comb = f->comb, .X = f->X};
        STAGE(hc_post, po);

        /* ---- FFN sublayer */
        ds4_hc_pre_args hfa = {.m = m, .n = n, .fn = &l->hc_ffn_fn, .scale = l->hc_ffn_scale,
                               .base = l->hc_ffn_base, .norm_w = l->ffn_norm, .X = f->X,
                               .out = f->u, .post = f->post, .comb = f->comb};
        STAGE(hc_pre, hfa);
        ds4_moe_route_args ra = {.m = m, .l = l, .n = n, .tokens = tokens, .v = f->u, .ids = f->ids, .w = f->w};
        STAGE(moe_route, ra);
        ds4_moe_experts_args xa2 = {.m = m, .l = l, .num = f->num, .n = n, .v = f->u, .ids = f->ids,
                                    .w = f->w, .y = f->y};
        STAGE(moe_experts, xa2);
        STAGE(hc_post, po);
    }
    {
        const size_t V = (size_t)hp->n_vocab, nflat = (size_t)hp->n_hc * hp->n_embd;
        int nh = all ? n : 1;
        ds4_head_args ha = {.m = m, .num = f->num, .n = nh, .X = f->X + (all ? 0 : (size_t)(n - 1) * nflat),
                            .logits = f->logits};
        STAGE(head, ha);
        int rc = ops->step_end(ctx, err);
        if (rc) return rc;
        ops->download(ctx, logits, f->logits, (size_t)nh * V * sizeof(float));
    }
    f->pos += n;
    return 0;
fail:
    {
        int rc = ops->step_end(ctx, err);
        return rc ? rc : ds4_err_set(err, DS4_E_INTERNAL, "backend stage failed");
    }
}

/* ------------------------------------------------------------ state I/O */

/* Serialized state at position T, per layer in order: raw rows of positions
 * max(0, T-window) .. T-1 (ascending); compressed rows 0 .. T/R-1; the
 * compressor frontier rings a then g; indexer rows 0 .. T/4-1; indexer
 * frontier rings a then g. All float32. */
size_t ds4_fwd_state_bytes(const ds4_fwd *f, int T) {
    const ds4_model *m = f->m;
    const ds4_hparams *hp = &m->hp;
    size_t floats = 0;
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        int nraw = T < hp->window ? T : hp->window;
        floats += (size_t)nraw * hp->head_dim;
        if (l->kind != DS4_ATTN_SLIDING)
            floats += (size_t)(T / l->ratio) * hp->head_dim +
                      2 * (size_t)frontier_rows(l) * ds4_model_comp_width(m, il);
        if (l->kind == DS4_ATTN_CSA)
            floats += (size_t)(T / 4) * hp->idx_dim + 2 * 8 * 2 * (size_t)hp->idx_dim;
    }
    return floats * sizeof(float);
}

static void state_io(const ds4_fwd *f, int T, unsigned char *buf, bool save) {
    const ds4_model *m = f->m;
    const ds4_hparams *hp = &m->hp;
    const ds4_backend_ops *ops = f->be->ops;
    void *ctx = f->be->ctx;
    size_t off = 0;
#define IO(ptr, bytes)                                                              \
    do {                                                                            \
        size_t b_ = (bytes);                                                        \
        if (save) ops->download(ctx, buf + off, (ptr), b_);                         \
        else ops->upload(ctx, (ptr), buf + off, b_);                                \
        off += b_;                                                                  \
    } while (0)
    const size_t dh = (size_t)hp->head_dim * sizeof(float);
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        ds4_layer_state *s = &f->ls[il];
        int lo = T > hp->window ? T - hp->window : 0;
        for (int p = lo; p < T; p++) IO((char *)s->raw + (size_t)(p % hp->window) * dh, dh);
        if (l->kind != DS4_ATTN_SLIDING) {
            size_t fr = (size_t)frontier_rows(l) * ds4_model_comp_width(m, il) * sizeof(float);
            IO(s->comp, (size_t)(T / l->ratio) * dh);
            IO(s->comp_a, fr);
            IO(s->comp_g, fr);
        }
        if (l->kind == DS4_ATTN_CSA) {
            size_t fr = 8 * 2 * (size_t)hp->idx_dim * sizeof(float);
            IO(s->idx, (size_t)(T / 4) * hp->idx_dim * sizeof(float));
            IO(s->icomp_a, fr);
            IO(s->icomp_g, fr);
        }
    }
#undef IO
}

void ds4_fwd_state_save(const ds4_fwd *f, void *dst) { state_io(f, f->pos, dst, true); }

int ds4_fwd_state_load(ds4_fwd *f, int pos, const void *src, size_t bytes, ds4_err *err) {
    if (pos < 0 || pos > f->n_ctx)
        return ds4_err_set(err, DS4_E_FORMAT, "state of %d tokens does not fit the session (ctx %d)", pos, f->n_ctx);
    if (bytes != ds4_fwd_state_bytes(f, pos))
        return ds4_err_set(err, DS4_E_FORMAT, "state has %zu bytes, expected %zu for %d tokens", bytes,
                           ds4_fwd_state_bytes(f, pos), pos);
    state_io(f, pos, (unsigned char *)(uintptr_t)src, false);
    f->pos = pos;
    return 0;
}

/* ------------------------------------------------------------ checkpoints */

static void ckpt_io(const ds4_fwd *f, unsigned char *buf, bool save) {
    const ds4_model *m = f->m;
    const ds4_hparams *hp = &m->hp;
    const ds4_backend_ops *ops = f->be->ops;
    void *ctx = f->be->ctx;
    size_t off = 0;
#define IO(ptr, bytes)                                                              \
    do {                                                                            \
        size_t b_ = (bytes);                                                        \
        if (buf) {                                                                  \
            if (save) ops->download(ctx, buf + off, (ptr), b_);                     \
            else ops->upload(ctx, (ptr), buf + off, b_);                            \
        }                                                                           \
        off += b_;                                                                  \
    } while (0)
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        ds4_layer_state *s = &f->ls[il];
        IO(s->raw, (size_t)hp->window * hp->head_dim * sizeof(float));
        if (l->kind != DS4_ATTN_SLIDING) {
            size_t fr = (size_t)frontier_rows(l) * ds4_model_comp_width(m, il) * sizeof(float);
            IO(s->comp_a, fr);
            IO(s->comp_g, fr);
        }
        if (l->kind == DS4_ATTN_CSA) {
            size_t fr = 8 * 2 * (size_t)hp->idx_dim * sizeof(float);
            IO(s->icomp_a, fr);
            IO(s->icomp_g, fr);
        }
    }
#undef IO
    if (!buf) ((ds4_fwd *)f)->ckpt_bytes = off;
}

size_t ds4_fwd_ckpt_bytes(const ds4_fwd *f) {
    ckpt_io(f, NULL, true);
    return f->ckpt_bytes;
}

void ds4_fwd_ckpt_save(const ds4_fwd *f, void *dst) { ckpt_io(f, dst, true); }

void ds4_fwd_ckpt_restore(ds4_fwd *f, int pos, const void *src) {
    ckpt_io(f, (unsigned char *)(uintptr_t)src, false);
    f->pos = pos;
}
