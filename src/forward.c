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
 * State layout per layer (capacities from n_ctx), all backend memory: raw
 * ring of `window` rows; compressed rows n_ctx/R + 1; indexer rows n_ctx/4
 * + 1 (these three in the backend's row type); frontier rings of c*R token
 * slots (token p in slot p % (c*R)), a and g (with ape), float32.
 *
 * A step: the tokens and pos0 go to the backend in one upload (ds4_step);
 * decode steps of one session (n = 1, last-row logits) and its speculative
 * verify steps carry a graph key so a backend can capture them once and
 * replay. Logits stay in backend memory
 * until asked for (ds4_fwd_logits / ds4_fwd_argmax).
 */
#include "forward.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

/* One part of a layer split: blocks [l0, l1) on one backend, with that
 * backend's step, batch activations and (for the blocks) KV state. A
 * session without a split has one part. */
typedef struct fwd_part {
    const ds4_model *m;    /* the part's bound model */
    const ds4_backend *be;
    int l0, l1;
    ds4_step *step;        /* backend memory, DS4_STEP_BYTES(n_batch) */
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
    float *act;            /* (n_batch, k, F) while moe_fn is set */
} fwd_part;

struct ds4_fwd {
    const ds4_model *m;    /* the first part's bound model (hp, layer kinds) */
    const ds4_backend *be; /* the first part's backend */
    fwd_part P[DS4_FWD_MAX_PARTS];
    int np;
    ds4_numerics num;
    int n_ctx, n_batch, pos;
    int row_type;          /* backend row type of raw/comp/idx rows */
    size_t row_elem;       /* its bytes per value */
    uint64_t key;          /* graph key of this session's decode steps */
    ds4_layer_state *ls;   /* (n_layer) */
    ds4_step *step_host;   /* host staging of the step */
    float *logits;         /* (n_batch, n_vocab) on the last part */
    int n_logits;          /* rows of `logits` written by the last eval */
    unsigned char *stage;  /* host staging for state I/O (row conversion) */
    size_t stage_bytes;
    size_t ckpt_bytes;     /* cached ds4_fwd_ckpt_bytes */
    bool profile;          /* eager steps with per-stage marks */
    int layer_limit;       /* blocks evaluated (debug; n_layer normally) */
    /* MTP sessions (the model has mtp_e_proj): the first stage is
     * mtp_embed reading hc_in instead of embed */
    bool mtp;
    float *hc_in;          /* (n_batch, n_hc, D) incoming HC states (first part) */
    float *hc_last;        /* (n_hc, D) a kept state (ds4_fwd_hc_keep; first part) */
    bool no_head;          /* this eval skips the head (ds4_fwd_eval_states) */
    int last_n;            /* tokens of the last eval (rows of X) */
    /* speculative rollback (ds4_fwd_spec_begin), allocated on first use */
    void **spec_buf;       /* per layer: raw, comp_a, comp_g, icomp_a, icomp_g slots */
    int spec_pos, spec_n;  /* saved positions spec_pos .. spec_pos + spec_n - 1 */
    ds4_fwd_moe_fn moe_fn; /* imatrix observer, or NULL */
    void *moe_user;
};

static const fwd_part *last_part(const ds4_fwd *f) { return &f->P[f->np - 1]; }
/* The part holding block il. */
static const fwd_part *part_of(const ds4_fwd *f, int il) {
    int p = 0;
    while (p + 1 < f->np && il >= f->P[p].l1) p++;
    return &f->P[p];
}

static atomic_uint_fast64_t next_key = 1;

static void *balloc(const ds4_backend *be, size_t bytes, int *fail) {
    void *p = be->ops->alloc(be->ctx, bytes);
    if (!p) *fail = 1;
    return p;
}

/* The backend's lost-connection error (backend.h `lost`), else 0. */
static int be_lost(const ds4_backend *be, ds4_err *err) {
    return be->ops->lost && be->ops->lost(be->ctx, err) ? (err && err->code ? err->code : DS4_E_BACKEND) : 0;
}

static int frontier_rows(const ds4_layer *l) { return (l->kind == DS4_ATTN_CSA ? 2 : 1) * l->ratio; }

int ds4_fwd_new(const ds4_model *m, const ds4_backend *be, ds4_numerics num, int n_ctx, int n_batch,
                ds4_fwd **out, ds4_err *err) {
    ds4_fwd_part p = {.m = m, .be = be, .l0 = 0, .l1 = m->hp.n_layer};
    return ds4_fwd_new_split(&p, 1, num, n_ctx, n_batch, out, err);
}

int ds4_fwd_new_split(const ds4_fwd_part *parts, int n_parts, ds4_numerics num, int n_ctx, int n_batch,
                      ds4_fwd **out, ds4_err *err) {
    *out = NULL;
    if (n_parts < 1 || n_parts > DS4_FWD_MAX_PARTS)
        return ds4_err_set(err, DS4_E_ARG, "a layer split of %d parts (1..%d)", n_parts, DS4_FWD_MAX_PARTS);
    const ds4_model *m = parts[0].m;
    const ds4_hparams *hp = &m->hp;
    if (n_ctx < 1 || n_batch < 1) return ds4_err_set(err, DS4_E_ARG, "n_ctx and n_batch must be >= 1");
    for (int p = 0; p < n_parts; p++) {
        const ds4_fwd_part *q = &parts[p];
        if (q->l0 != (p ? parts[p - 1].l1 : 0) || q->l1 <= q->l0 || q->l1 > hp->n_layer ||
            (p == n_parts - 1 && q->l1 != hp->n_layer) || q->m->hp.n_layer != hp->n_layer)
            return ds4_err_set(err, DS4_E_ARG, "layer split part %d (blocks %d..%d of %d) does not continue the split",
                               p, q->l0, q->l1, hp->n_layer);
        const int rt = q->be->ops->kv_row_type(q->be->ctx, num), rt0 = parts[0].be->ops->kv_row_type(parts[0].be->ctx, num);
        int lrc = be_lost(q->be, err);
        if (lrc || (lrc = be_lost(parts[0].be, err))) return lrc;
        if (rt != rt0)
            return ds4_err_set(err, DS4_E_ARG, "layer split part %d (%s backend) stores cached rows in another type "
                               "than part 0 (%s backend)", p, q->be->ops->name, parts[0].be->ops->name);
        int rc = q->be->ops->reserve(q->be->ctx, q->m, n_batch, n_ctx, err);
        if (rc) return rc;
    }
    ds4_fwd *f = calloc(1, sizeof *f);
    if (!f) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    f->np = n_parts;
    for (int p = 0; p < n_parts; p++)
        f->P[p] = (fwd_part){.m = parts[p].m, .be = parts[p].be, .l0 = parts[p].l0, .l1 = parts[p].l1};
    f->m = m;
    f->be = parts[0].be;
    f->num = num;
    f->n_ctx = n_ctx;
    f->n_batch = n_batch;
    f->row_type = f->be->ops->kv_row_type(f->be->ctx, num);
    f->row_elem = f->row_type == DS4_TYPE_F16 ? 2 : 4;
    f->key = atomic_fetch_add(&next_key, 1);
    f->layer_limit = hp->n_layer;
    f->mtp = m->mtp_e_proj.n_in > 0;
    if (f->mtp && !f->be->ops->mtp_embed) {
        const char *name = f->be->ops->name;
        free(f);
        return ds4_err_set(err, DS4_E_MODEL, "the %s backend does not implement the MTP stage (mtp_embed)", name);
    }
    int fail = 0;
    const size_t F = sizeof(float), nb = (size_t)n_batch, E = f->row_elem;
    const size_t D = (size_t)hp->n_embd, dh = (size_t)hp->head_dim;
    f->ls = calloc((size_t)hp->n_layer, sizeof(ds4_layer_state));
    f->step_host = calloc(1, DS4_STEP_BYTES(n_batch));
    if (!f->ls || !f->step_host) fail = 1;
    for (int il = 0; !fail && il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        const ds4_backend *be = part_of(f, il)->be;
        ds4_layer_state *s = &f->ls[il];
        s->raw = balloc(be, (size_t)hp->window * dh * E, &fail);
        if (l->kind != DS4_ATTN_SLIDING) {
            size_t w = (size_t)ds4_model_comp_width(m, il);
            s->comp_cap = n_ctx / l->ratio + 1;
            s->comp = balloc(be, (size_t)s->comp_cap * dh * E, &fail);
            s->comp_a = balloc(be, (size_t)frontier_rows(l) * w * F, &fail);
            s->comp_g = balloc(be, (size_t)frontier_rows(l) * w * F, &fail);
        }
        if (l->kind == DS4_ATTN_CSA) {
            size_t iw = 2 * (size_t)hp->idx_dim;
            s->idx_cap = n_ctx / 4 + 1;
            s->idx = balloc(be, (size_t)s->idx_cap * hp->idx_dim * E, &fail);
            s->icomp_a = balloc(be, 8 * iw * F, &fail);
            s->icomp_g = balloc(be, 8 * iw * F, &fail);
        }
    }
    for (int p = 0; !fail && p < n_parts; p++) {
        fwd_part *q = &f->P[p];
        const ds4_backend *be = q->be;
        q->step = balloc(be, DS4_STEP_BYTES(n_batch), &fail);
        q->X = balloc(be, nb * hp->n_hc * D * F, &fail);
        q->u = balloc(be, nb * D * F, &fail);
        q->post = balloc(be, nb * hp->n_hc * F, &fail);
        q->comb = balloc(be, nb * hp->n_hc * hp->n_hc * F, &fail);
        q->cq = balloc(be, nb * hp->q_lora * F, &fail);
        q->q = balloc(be, nb * hp->n_head * dh * F, &fail);
        q->kv = balloc(be, nb * dh * F, &fail);
        q->y = balloc(be, nb * D * F, &fail);
        q->sel = balloc(be, nb * hp->idx_topk * sizeof(int32_t), &fail);
        q->n_sel = balloc(be, nb * sizeof(int32_t), &fail);
        q->ids = balloc(be, nb * hp->n_expert_used * sizeof(int32_t), &fail);
        q->w = balloc(be, nb * hp->n_expert_used * F, &fail);
    }
    if (!fail) {
        f->logits = balloc(last_part(f)->be, nb * hp->n_vocab * F, &fail);
        if (f->mtp) {
            f->hc_in = balloc(f->be, nb * hp->n_hc * D * F, &fail);
            f->hc_last = balloc(f->be, (size_t)hp->n_hc * D * F, &fail);
        }
    }
    if (fail) {
        const char *name = f->be->ops->name;
        for (int p = 0; p < f->np; p++) { /* a lost worker, not memory */
            const int lrc = be_lost(f->P[p].be, err);
            if (lrc) {
                ds4_fwd_free(f);
                return lrc;
            }
        }
        ds4_fwd_free(f);
        return ds4_err_set(err, DS4_E_NOMEM, "out of %s memory allocating the session state (n_ctx %d, batch %d)",
                           name, n_ctx, n_batch);
    }
    *out = f;
    return 0;
}

static void bfree(const ds4_backend *be, void *p) {
    if (p) be->ops->free(be->ctx, p);
}

void ds4_fwd_free(ds4_fwd *f) {
    if (!f) return;
    for (int p = 0; p < f->np; p++) f->P[p].be->ops->forget(f->P[p].be->ctx, f->key);
    if (f->ls)
        for (int il = 0; il < f->m->hp.n_layer; il++) {
            ds4_layer_state *s = &f->ls[il];
            const ds4_backend *be = part_of(f, il)->be;
            void *ps[] = {s->raw, s->comp, s->comp_a, s->comp_g, s->idx, s->icomp_a, s->icomp_g};
            for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) bfree(be, ps[i]);
            if (f->spec_buf)
                for (int k = 0; k < 5; k++) bfree(be, f->spec_buf[il * 5 + k]);
        }
    free(f->ls);
    free(f->spec_buf);
    for (int p = 0; p < f->np; p++) {
        fwd_part *q = &f->P[p];
        void *bs[] = {q->step, q->X, q->u, q->post, q->comb, q->cq, q->q, q->kv, q->y, q->sel, q->n_sel, q->ids,
                      q->w, q->act};
        for (size_t i = 0; i < sizeof bs / sizeof bs[0]; i++) bfree(q->be, bs[i]);
    }
    bfree(last_part(f)->be, f->logits);
    bfree(f->be, f->hc_in);
    bfree(f->be, f->hc_last);
    free(f->step_host);
    free(f->stage);
    free(f);
}

void ds4_fwd_reset(ds4_fwd *f) {
    f->pos = 0;
    f->n_logits = 0;
    f->last_n = 0;
    f->spec_n = 0;
}
int ds4_fwd_pos(const ds4_fwd *f) { return f->pos; }
int ds4_fwd_n_batch(const ds4_fwd *f) { return f->n_batch; }
int ds4_fwd_row_type(const ds4_fwd *f) { return f->row_type; }

#define STAGE(op, args) STAGE_K(op, args, -1)
#define STAGE_K(op, args, kind)                                           \
    do {                                                                  \
        if (prof && (kind) >= 0) ops->prof_mark(ctx, (kind));             \
        int rc_ = ops->op(ctx, &(args));                                  \
        if (rc_) return rc_;                                              \
    } while (0)

/* The stages of one step on part pi (everything between its step_begin and
 * step_end): the embedding on the first part, its blocks, the head on the
 * last. Returns the first stage's error (the backend also keeps it for
 * step_end). */
static int issue_stages(ds4_fwd *f, int pi, int n, int pos0, bool all) {
    fwd_part *P = &f->P[pi];
    const ds4_model *m = P->m;
    const ds4_hparams *hp = &m->hp;
    const ds4_backend_ops *ops = P->be->ops;
    void *ctx = P->be->ctx;
    const ds4_step *st = P->step;
    const int32_t *tokens = DS4_STEP_TOKENS(P->step);
    const bool prof = f->profile && ops->prof_mark;
#define C .m = m, .step = st, .n = n, .pos0 = pos0
    if (pi > 0) {
        /* X arrived from the previous part */
    } else if (f->mtp) {
        ds4_mtp_embed_args ma = {C, .num = f->num, .tokens = tokens, .hc = f->hc_in, .X = P->X};
        STAGE_K(mtp_embed, ma, DS4_PROF_EMBED);
    } else {
        ds4_embed_args ea = {C, .tokens = tokens, .X = P->X};
        STAGE_K(embed, ea, DS4_PROF_EMBED);
    }
    /* Each sublayer's HC-post goes to the next HC-pre (one stage, which a
     * backend may fuse), except when profiling (every stage timed apart);
     * the last one runs on its own. */
    const bool fuse_post = !prof;
    bool post_due = false;
    ds4_hc_post_args po = {C, .y = P->y, .post = P->post, .comb = P->comb, .X = P->X};
    const int l_end = P->l1 < f->layer_limit ? P->l1 : f->layer_limit;
    for (int il = P->l0; il < l_end; il++) {
        const ds4_layer *l = &m->layers[il];
        ds4_layer_state *s = &f->ls[il];
        const ds4_rope *rope = l->kind == DS4_ATTN_SLIDING ? &m->rope_main : &m->rope_compress;

        /* ---- attention sublayer (HC-post of the previous one first, when pending) */
        ds4_hc_pre_args hpa = {C, .fn = &l->hc_attn_fn, .scale = l->hc_attn_scale, .base = l->hc_attn_base,
                               .norm_w = l->attn_norm, .X = P->X, .out = P->u, .post = P->post, .comb = P->comb,
                               .py = post_due ? P->y : NULL, .ppost = post_due ? P->post : NULL,
                               .pcomb = post_due ? P->comb : NULL};
        STAGE_K(hc_pre, hpa, DS4_PROF_HC_PRE);
        post_due = false;
        ds4_attn_project_args pa = {C, .l = l, .rope = rope, .num = f->num, .u = P->u, .cq = P->cq, .q = P->q,
                                    .kv = P->kv};
        STAGE_K(attn_project, pa, DS4_PROF_ATTN_PROJECT);
        if (l->kind != DS4_ATTN_SLIDING) {
            ds4_compress_args ca = {C, .rope = rope, .num = f->num, .indexer = false, .ratio = l->ratio,
                                    .overlap = l->kind == DS4_ATTN_CSA, .d = hp->head_dim, .ape = &l->comp_ape,
                                    .wkv = &l->comp_kv, .wgate = &l->comp_gate, .norm_w = l->comp_norm,
                                    .u = P->u, .fa = s->comp_a, .fg = s->comp_g, .rows = s->comp,
                                    .row_type = f->row_type, .cap = s->comp_cap};
            STAGE_K(compress_update, ca, DS4_PROF_COMPRESS);
        }
        if (l->kind == DS4_ATTN_CSA) {
            ds4_compress_args ia = {C, .rope = rope, .num = f->num, .indexer = true, .ratio = 4, .overlap = true,
                                    .d = hp->idx_dim, .ape = &l->icomp_ape, .wkv = &l->icomp_kv,
                                    .wgate = &l->icomp_gate, .norm_w = l->icomp_norm, .u = P->u,
                                    .fa = s->icomp_a, .fg = s->icomp_g, .rows = s->idx, .row_type = f->row_type,
                                    .cap = s->idx_cap};
            STAGE_K(compress_update, ia, DS4_PROF_COMPRESS);
            ds4_indexer_args xa = {C, .l = l, .rope = rope, .num = f->num, .cq = P->cq, .u = P->u,
                                   .idx_rows = s->idx, .row_type = f->row_type, .sel = P->sel, .n_sel = P->n_sel};
            STAGE_K(indexer_select, xa, DS4_PROF_INDEXER);
        }
        ds4_attention_args aa = {C, .l = l, .rope = rope, .num = f->num, .q = P->q, .kv = P->kv, .raw = s->raw,
                                 .comp = s->comp, .comp_cap = s->comp_cap, .row_type = f->row_type,
                                 .sel = l->kind == DS4_ATTN_CSA ? P->sel : NULL,
                                 .n_sel = l->kind == DS4_ATTN_CSA ? P->n_sel : NULL, .y = P->y};
        STAGE_K(attention, aa, DS4_PROF_ATTENTION);
        ds4_kv_store_args ka = {C, .kv = P->kv, .raw = s->raw, .row_type = f->row_type};
        STAGE_K(kv_store, ka, DS4_PROF_KV_STORE);
        if (fuse_post) post_due = true;
        else STAGE_K(hc_post, po, DS4_PROF_HC_POST);

        /* ---- FFN sublayer */
        ds4_hc_pre_args hfa = {C, .fn = &l->hc_ffn_fn, .scale = l->hc_ffn_scale, .base = l->hc_ffn_base,
                               .norm_w = l->ffn_norm, .X = P->X, .out = P->u, .post = P->post, .comb = P->comb,
                               .py = post_due ? P->y : NULL, .ppost = post_due ? P->post : NULL,
                               .pcomb = post_due ? P->comb : NULL};
        STAGE_K(hc_pre, hfa, DS4_PROF_HC_PRE);
        post_due = false;
        ds4_moe_route_args ra = {C, .l = l, .tokens = tokens, .v = P->u, .ids = P->ids, .w = P->w};
        STAGE_K(moe_route, ra, DS4_PROF_MOE_ROUTE);
        ds4_moe_experts_args xa2 = {C, .l = l, .il = il, .num = f->num, .v = P->u, .ids = P->ids, .w = P->w,
                                    .y = P->y, .act = f->moe_fn ? P->act : NULL};
        STAGE_K(moe_experts, xa2, DS4_PROF_MOE_EXPERTS);
        if (f->moe_fn) f->moe_fn(f->moe_user, il, n, P->u, P->ids, P->w, P->act);
        if (fuse_post) post_due = true;
        else STAGE_K(hc_post, po, DS4_PROF_HC_POST);
    }
    if (post_due) STAGE_K(hc_post, po, DS4_PROF_HC_POST);
    if (!f->no_head && pi == f->np - 1) {
        const size_t nflat = (size_t)hp->n_hc * hp->n_embd;
        int nh = all ? n : 1;
        ds4_head_args ha = {.m = m, .step = st, .n = nh, .pos0 = pos0, .num = f->num,
                            .X = P->X + (all ? 0 : (size_t)(n - 1) * nflat), .logits = f->logits};
        STAGE_K(head, ha, DS4_PROF_HEAD);
    }
    if (prof) ops->prof_mark(ctx, DS4_PROF_N);
#undef C
    return 0;
}

/* Steps worth capturing: decode (n = 1, last-row logits) and speculative
 * verification (n <= DS4_FWD_SPEC_MAX, all rows' logits), which repeat with
 * the same shape at every position. Prefill chunks of changing sizes run
 * eagerly. */
static uint64_t graph_key(const ds4_fwd *f, int n, bool all) {
    if (f->profile || f->no_head) return 0;
    if (n == 1 && !all) return f->key | UINT64_C(1) << DS4_GRAPH_SESSION_BITS;
    if (all && n > 1 && n <= DS4_FWD_SPEC_MAX)
        return f->key | (uint64_t)n << DS4_GRAPH_SESSION_BITS | UINT64_C(1) << (DS4_GRAPH_SESSION_BITS + 8);
    return 0;
}

static int stage_grow(ds4_fwd *f, size_t bytes, ds4_err *err);

/* Hands the batch's HC states (n rows of X) from part pi to part pi + 1:
 * the backend's link when both parts are of one backend that has it, else
 * through host memory. */
static int link_states(ds4_fwd *f, int pi, int n, ds4_err *err) {
    const fwd_part *a = &f->P[pi], *b = &f->P[pi + 1];
    const size_t bytes = (size_t)n * f->m->hp.n_hc * f->m->hp.n_embd * sizeof(float);
    if (a->be->ops == b->be->ops && a->be->ops->link)
        return a->be->ops->link(a->be->ctx, b->be->ctx, b->X, a->X, bytes, err);
    int rc = stage_grow(f, bytes, err);
    if (!rc) rc = a->be->ops->download(a->be->ctx, f->stage, a->X, bytes, err);
    if (!rc) rc = b->be->ops->upload(b->be->ctx, b->X, f->stage, bytes, err);
    return rc;
}

int ds4_fwd_eval(ds4_fwd *f, const int32_t *tokens, int n, float *logits, bool all, ds4_err *err) {
    const ds4_hparams *hp = &f->m->hp;
    if (n < 1 || n > f->n_batch || f->pos + n > f->n_ctx)
        return ds4_err_set(err, DS4_E_RANGE, "batch of %d tokens at position %d exceeds the session (ctx %d, batch %d)",
                           n, f->pos, f->n_ctx, f->n_batch);
    const int pos0 = f->pos;
    f->n_logits = 0;
    f->last_n = 0;
    /* the step: one upload of pos0, n and the tokens to every part */
    f->step_host->pos0 = pos0;
    f->step_host->n = n;
    f->step_host->n_cap = f->n_batch;
    memcpy(DS4_STEP_TOKENS(f->step_host), tokens, (size_t)n * sizeof(int32_t));
    int rc;
    for (int p = 0; p < f->np; p++)
        if ((rc = f->P[p].be->ops->upload(f->P[p].be->ctx, f->P[p].step, f->step_host, DS4_STEP_BYTES(n), err)))
            return rc;
    const uint64_t key = graph_key(f, n, all);
    for (int p = 0; p < f->np; p++) {
        const ds4_backend_ops *ops = f->P[p].be->ops;
        void *ctx = f->P[p].be->ctx;
        ds4_step_info si = {.step = f->P[p].step, .n = n, .pos0 = pos0, .graph_key = key};
        rc = ops->step_begin(ctx, &si, err);
        if (rc < 0) return rc;
        int src = rc == 0 ? issue_stages(f, p, n, pos0, all) : 0;
        /* the hand-over to the next part: inside a profiled (eager) step, so
         * that its time is counted as a stage of this one; after the step
         * otherwise (outside any captured graph) */
        const bool hand = p + 1 < f->np, timed = hand && f->profile && ops->prof_mark && !src;
        int lrc = 0;
        if (timed) {
            ops->prof_mark(ctx, DS4_PROF_LINK);
            lrc = link_states(f, p, n, err);
            ops->prof_mark(ctx, DS4_PROF_N);
        }
        rc = ops->step_end(ctx, err);
        if (rc) return rc;
        if (src) return ds4_err_set(err, src < 0 ? src : DS4_E_INTERNAL, "%s backend: a stage failed", ops->name);
        if (lrc) return lrc;
        if (hand && !timed && (rc = link_states(f, p, n, err))) return rc;
    }
    f->n_logits = f->no_head ? 0 : all ? n : 1;
    f->last_n = n;
    if (logits && f->n_logits) {
        const fwd_part *L = last_part(f);
        rc = L->be->ops->download(L->be->ctx, logits, f->logits, (size_t)f->n_logits * hp->n_vocab * sizeof(float),
                                  err);
        if (rc) return rc;
    }
    f->pos += n;
    return 0;
}

int ds4_fwd_eval_states(ds4_fwd *f, const int32_t *tokens, int n, ds4_err *err) {
    f->no_head = true;
    int rc = ds4_fwd_eval(f, tokens, n, NULL, false, err);
    f->no_head = false;
    return rc;
}

void ds4_fwd_set_profile(ds4_fwd *f, bool on) { f->profile = on; }
int ds4_fwd_set_moe_observer(ds4_fwd *f, ds4_fwd_moe_fn fn, void *user, ds4_err *err) {
    const ds4_hparams *hp = &f->m->hp;
    for (int p = 0; fn && p < f->np; p++)
        if (!f->P[p].act) {
            int fail = 0;
            f->P[p].act = balloc(f->P[p].be, (size_t)f->n_batch * hp->n_expert_used * hp->n_ff_exp * sizeof(float),
                                 &fail);
            if (fail) return ds4_err_set(err, DS4_E_NOMEM, "out of memory for the expert activations");
        }
    f->moe_fn = fn;
    f->moe_user = user;
    return 0;
}

void ds4_fwd_set_layer_limit(ds4_fwd *f, int n_layers) {
    f->layer_limit = n_layers > 0 && n_layers < f->m->hp.n_layer ? n_layers : f->m->hp.n_layer;
}

/* Benchmarks: state as if pos tokens had been evaluated, without computing
 * them (cached rows and frontiers filled with values from seed, rounded to
 * the cache precision). The timing of later steps is what a real context of
 * that length costs; their numbers mean nothing. */
int ds4_fwd_fast_forward(ds4_fwd *f, int pos, uint64_t seed, ds4_err *err) {
    const ds4_model *m = f->m;
    const ds4_hparams *hp = &m->hp;
    if (pos < 0 || pos >= f->n_ctx) return ds4_err_set(err, DS4_E_RANGE, "fast forward to %d: context is %d", pos, f->n_ctx);
    enum { CHUNK = 1 << 22 }; /* values per upload */
    int rc = stage_grow(f, (size_t)CHUNK * 4, err);
    if (rc) return rc;
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < CHUNK; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        float v = ((float)(s >> 40) * (1.0f / 16777216.0f) - 0.5f) * 2.0f;
        if (f->row_elem == 2) {
            uint16_t h = ds4_f32_to_f16(v);
            memcpy(f->stage + 2 * i, &h, 2);
        } else {
            memcpy(f->stage + 4 * i, &v, 4);
        }
    }
#define FILL(dev, n_vals, elem)                                                                        \
    do {                                                                                               \
        size_t nv_ = (n_vals);                                                                         \
        for (size_t o_ = 0; o_ < nv_; o_ += CHUNK) {                                                   \
            size_t k_ = nv_ - o_ < CHUNK ? nv_ - o_ : CHUNK;                                           \
            if ((rc = ops->upload(ctx, (unsigned char *)(dev) + o_ * (elem), f->stage, k_ * (elem), err))) \
                return rc;                                                                             \
        }                                                                                              \
    } while (0)
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        ds4_layer_state *st = &f->ls[il];
        const ds4_backend_ops *ops = part_of(f, il)->be->ops;
        void *ctx = part_of(f, il)->be->ctx;
        FILL(st->raw, (size_t)hp->window * hp->head_dim, f->row_elem);
        if (l->kind != DS4_ATTN_SLIDING) {
            FILL(st->comp, (size_t)(pos / l->ratio) * hp->head_dim, f->row_elem);
        }
        if (l->kind == DS4_ATTN_CSA) FILL(st->idx, (size_t)(pos / 4) * hp->idx_dim, f->row_elem);
    }
#undef FILL
    f->pos = pos;
    f->n_logits = 0;
    f->last_n = 0;
    return 0;
}

int ds4_fwd_logits(ds4_fwd *f, float *dst, ds4_err *err) {
    const size_t V = (size_t)f->m->hp.n_vocab;
    if (f->n_logits < 1) return ds4_err_set(err, DS4_E_ARG, "no logits: nothing evaluated yet");
    const ds4_backend *be = last_part(f)->be;
    return be->ops->download(be->ctx, dst, f->logits + (size_t)(f->n_logits - 1) * V, V * sizeof(float), err);
}

/* A row of logits with no finite value (NaN or infinity everywhere): the
 * weights or the metadata broke the forward pass. Greedy decoding would
 * otherwise pick token 0 every step and look like a normal run. */
int ds4_fwd_nonfinite_error(ds4_err *err) {
    return ds4_err_set(err, DS4_E_MODEL, "the model produced no finite logit (NaN or infinity everywhere): its "
                                         "weights or metadata break the forward pass");
}

int ds4_fwd_argmax(ds4_fwd *f, int32_t *id, ds4_err *err) {
    const size_t V = (size_t)f->m->hp.n_vocab;
    if (f->n_logits < 1) return ds4_err_set(err, DS4_E_ARG, "no logits: nothing evaluated yet");
    const ds4_backend *be = last_part(f)->be;
    int rc = be->ops->argmax(be->ctx, f->logits + (size_t)(f->n_logits - 1) * V, 1, (int)V, id, err);
    if (!rc && *id < 0) rc = ds4_fwd_nonfinite_error(err);
    if (!rc && *id >= (int32_t)V) /* (a remote worker's answer) */
        rc = ds4_err_set(err, DS4_E_BACKEND, "the %s backend answered token id %d (the vocabulary has %zu)",
                         be->ops->name, *id, V);
    return rc;
}

/* ------------------------------------------------------------ MTP and speculation */

int ds4_fwd_n_logits(const ds4_fwd *f) { return f->n_logits; }

int ds4_fwd_logits_row(ds4_fwd *f, int row, float *dst, ds4_err *err) {
    const size_t V = (size_t)f->m->hp.n_vocab;
    if (row < 0 || row >= f->n_logits) return ds4_err_set(err, DS4_E_ARG, "no logits row %d (%d rows)", row, f->n_logits);
    const ds4_backend *be = last_part(f)->be;
    return be->ops->download(be->ctx, dst, f->logits + (size_t)row * V, V * sizeof(float), err);
}

int ds4_fwd_argmax_rows(ds4_fwd *f, int32_t *ids, ds4_err *err) {
    if (f->n_logits < 1) return ds4_err_set(err, DS4_E_ARG, "no logits: nothing evaluated yet");
    const ds4_backend *be = last_part(f)->be;
    int rc = be->ops->argmax(be->ctx, f->logits, f->n_logits, f->m->hp.n_vocab, ids, err);
    for (int r = 0; !rc && r < f->n_logits; r++) {
        if (ids[r] < 0) rc = ds4_fwd_nonfinite_error(err);
        else if (ids[r] >= f->m->hp.n_vocab) /* (a remote worker's answer) */
            rc = ds4_err_set(err, DS4_E_BACKEND, "the %s backend answered token id %d (the vocabulary has %d)",
                             be->ops->name, ids[r], f->m->hp.n_vocab);
    }
    return rc;
}

static size_t state_floats(const ds4_fwd *f) { return (size_t)f->m->hp.n_hc * f->m->hp.n_embd; }

int ds4_fwd_hc_from(ds4_fwd *dst, int dst_row, const ds4_fwd *src, int src_row, int n, ds4_err *err) {
    const size_t nf = state_floats(dst);
    if (!dst->mtp || n < 0 || dst_row < 0 || dst_row + n > dst->n_batch || src_row < 0 || src_row + n > src->n_batch ||
        state_floats(src) != nf)
        return ds4_err_set(err, DS4_E_ARG, "HC copy of %d rows (%d -> %d) out of range", n, src_row, dst_row);
    if (last_part(src)->be != dst->be)
        return ds4_err_set(err, DS4_E_ARG, "HC copy between backends (the MTP block must sit with the last blocks)");
    if (n == 0) return 0;
    return dst->be->ops->copy(dst->be->ctx, dst->hc_in + (size_t)dst_row * nf,
                              last_part(src)->X + (size_t)src_row * nf, (size_t)n * nf * sizeof(float), err);
}

int ds4_fwd_hc_upload(ds4_fwd *f, int row, const float *src, int n, ds4_err *err) {
    const size_t nf = state_floats(f);
    if (!f->mtp || row < 0 || n < 0 || row + n > f->n_batch)
        return ds4_err_set(err, DS4_E_ARG, "HC upload of %d rows at %d out of range", n, row);
    return f->be->ops->upload(f->be->ctx, f->hc_in + (size_t)row * nf, src, (size_t)n * nf * sizeof(float), err);
}

int ds4_fwd_state_row(ds4_fwd *f, int row, float *dst, ds4_err *err) {
    const size_t nf = state_floats(f);
    if (row < 0 || row >= f->last_n) return ds4_err_set(err, DS4_E_ARG, "no state row %d (%d rows)", row, f->last_n);
    const fwd_part *L = last_part(f);
    return L->be->ops->download(L->be->ctx, dst, L->X + (size_t)row * nf, nf * sizeof(float), err);
}

int ds4_fwd_last_n(const ds4_fwd *f) { return f->last_n; }

int ds4_fwd_hc_keep(ds4_fwd *dst, const ds4_fwd *src, int src_row, ds4_err *err) {
    const size_t nf = state_floats(dst);
    if (!dst->mtp || src_row < 0 || src_row >= src->n_batch || state_floats(src) != nf)
        return ds4_err_set(err, DS4_E_ARG, "HC keep of row %d out of range", src_row);
    if (last_part(src)->be != dst->be)
        return ds4_err_set(err, DS4_E_ARG, "HC copy between backends (the MTP block must sit with the last blocks)");
    return dst->be->ops->copy(dst->be->ctx, dst->hc_last, last_part(src)->X + (size_t)src_row * nf,
                              nf * sizeof(float), err);
}

int ds4_fwd_hc_from_kept(ds4_fwd *f, int dst_row, ds4_err *err) {
    const size_t nf = state_floats(f);
    if (!f->mtp || dst_row < 0 || dst_row >= f->n_batch)
        return ds4_err_set(err, DS4_E_ARG, "HC row %d out of range", dst_row);
    return f->be->ops->copy(f->be->ctx, f->hc_in + (size_t)dst_row * nf, f->hc_last, nf * sizeof(float), err);
}

/* The rings a speculative step can overwrite, per layer: k = 0 raw window,
 * 1/2 compressor frontier a/g, 3/4 indexer frontier a/g. Their slot count
 * and bytes per slot (0 when the layer has no such ring). */
static void spec_ring(const ds4_fwd *f, int il, int k, void **base, int *slots, size_t *slot_bytes) {
    const ds4_model *m = f->m;
    const ds4_layer *l = &m->layers[il];
    ds4_layer_state *s = &f->ls[il];
    *base = NULL;
    *slots = 0;
    *slot_bytes = 0;
    if (k == 0) {
        *base = s->raw;
        *slots = m->hp.window;
        *slot_bytes = (size_t)m->hp.head_dim * f->row_elem;
    } else if (k <= 2 && l->kind != DS4_ATTN_SLIDING) {
        *base = k == 1 ? (void *)s->comp_a : (void *)s->comp_g;
        *slots = frontier_rows(l);
        *slot_bytes = (size_t)ds4_model_comp_width(m, il) * sizeof(float);
    } else if (k >= 3 && l->kind == DS4_ATTN_CSA) {
        *base = k == 3 ? (void *)s->icomp_a : (void *)s->icomp_g;
        *slots = 8;
        *slot_bytes = 2 * (size_t)m->hp.idx_dim * sizeof(float);
    }
}

static int copy_many(const ds4_backend *be, const ds4_copy *v, int n, ds4_err *err) {
    const ds4_backend_ops *ops = be->ops;
    if (ops->copy_many) return ops->copy_many(be->ctx, v, n, err);
    for (int i = 0; i < n; i++) {
        int rc = ops->copy(be->ctx, v[i].dst, v[i].src, v[i].bytes, err);
        if (rc) return rc;
    }
    return 0;
}

/* Copies the ring slots of positions p0 .. p0+n-1 between the ring and the
 * save buffer (saved in position order), in at most two contiguous runs. */
static int spec_io(ds4_fwd *f, int p0, int off, int n, bool save, ds4_err *err) {
    ds4_copy v[64];
    int nv = 0;
    for (int il = 0; il < f->m->hp.n_layer; il++) {
        const ds4_backend *be = part_of(f, il)->be;
        for (int k = 0; k < 5; k++) {
            void *base;
            int slots;
            size_t sb;
            spec_ring(f, il, k, &base, &slots, &sb);
            if (!base) continue;
            unsigned char *ring = base, *buf = f->spec_buf[il * 5 + k];
            int done = 0;
            while (done < n) {
                int p = p0 + off + done, slot = p % slots;
                int run = slots - slot < n - done ? slots - slot : n - done;
                unsigned char *r = ring + (size_t)slot * sb, *b = buf + (size_t)(off + done) * sb;
                v[nv++] = save ? (ds4_copy){b, r, (size_t)run * sb} : (ds4_copy){r, b, (size_t)run * sb};
                if (nv == 64) { /* ring and save buffers are disjoint: the copies may run at once */
                    int rc = copy_many(be, v, nv, err);
                    if (rc) return rc;
                    nv = 0;
                }
                done += run;
            }
        }
        /* the copies of one call go to one backend */
        bool flush = il + 1 == f->m->hp.n_layer || part_of(f, il + 1)->be != be;
        if (flush && nv) {
            int rc = copy_many(be, v, nv, err);
            if (rc) return rc;
            nv = 0;
        }
    }
    return 0;
}

int ds4_fwd_spec_begin(ds4_fwd *f, int n, ds4_err *err) {
    const ds4_hparams *hp = &f->m->hp;
    if (n < 1 || n > DS4_FWD_SPEC_MAX || n > f->n_batch || f->pos + n > f->n_ctx)
        return ds4_err_set(err, DS4_E_RANGE, "speculative step of %d tokens at %d does not fit (batch %d, ctx %d)", n,
                           f->pos, f->n_batch, f->n_ctx);
    /* a ring smaller than the step would be overwritten by the step itself */
    for (int il = 0; il < hp->n_layer; il++)
        for (int k = 0; k < 5; k++) {
            void *base;
            int slots;
            size_t sb;
            spec_ring(f, il, k, &base, &slots, &sb);
            if (base && slots < n)
                return ds4_err_set(err, DS4_E_RANGE, "speculative step of %d tokens exceeds a ring of %d slots (layer %d)",
                                   n, slots, il);
        }
    if (!f->spec_buf) {
        f->spec_buf = calloc((size_t)hp->n_layer * 5, sizeof(void *));
        if (!f->spec_buf) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        int fail = 0;
        for (int il = 0; il < hp->n_layer; il++)
            for (int k = 0; k < 5; k++) {
                void *base;
                int slots;
                size_t sb;
                spec_ring(f, il, k, &base, &slots, &sb);
                if (base) f->spec_buf[il * 5 + k] = balloc(part_of(f, il)->be, (size_t)DS4_FWD_SPEC_MAX * sb, &fail);
            }
        if (fail) return ds4_err_set(err, DS4_E_NOMEM, "out of %s memory for speculative rollback", f->be->ops->name);
    }
    f->spec_pos = f->pos;
    f->spec_n = n;
    return spec_io(f, f->pos, 0, n, true, err);
}

int ds4_fwd_spec_rollback(ds4_fwd *f, int keep, ds4_err *err) {
    if (f->spec_n < 1 || keep < 0 || keep > f->spec_n || f->pos < f->spec_pos + keep || f->pos > f->spec_pos + f->spec_n)
        return ds4_err_set(err, DS4_E_ARG, "speculative rollback to %d of %d tokens without a matching begin", keep,
                           f->spec_n);
    int n_drop = f->pos - (f->spec_pos + keep);
    int rc = n_drop > 0 ? spec_io(f, f->spec_pos, keep, n_drop, false, err) : 0;
    if (rc) return rc;
    f->pos = f->spec_pos + keep;
    if (f->n_logits > keep) f->n_logits = keep;
    f->spec_n = 0;
    return 0;
}

/* ------------------------------------------------------------ state I/O */

/* Serialized state at position T, per layer in order: raw rows of positions
 * max(0, T-window) .. T-1 (ascending); compressed rows 0 .. T/R-1; the
 * compressor frontier rings a then g; indexer rows 0 .. T/4-1; indexer
 * frontier rings a then g. Cached rows (raw, compressed, indexer) are IEEE
 * half when the f16 cache rounding is on (they hold half values exactly)
 * and float32 otherwise; frontiers are float32. */
static size_t payload_elem(const ds4_fwd *f) { return f->num.f16_cache ? 2 : 4; }

size_t ds4_fwd_state_bytes(const ds4_fwd *f, int T) {
    const ds4_model *m = f->m;
    const ds4_hparams *hp = &m->hp;
    size_t rows = 0, floats = 0;
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        int nraw = T < hp->window ? T : hp->window;
        rows += (size_t)nraw * hp->head_dim;
        if (l->kind != DS4_ATTN_SLIDING) {
            rows += (size_t)(T / l->ratio) * hp->head_dim;
            floats += 2 * (size_t)frontier_rows(l) * ds4_model_comp_width(m, il);
        }
        if (l->kind == DS4_ATTN_CSA) {
            rows += (size_t)(T / 4) * hp->idx_dim;
            floats += 2 * 8 * 2 * (size_t)hp->idx_dim;
        }
    }
    return rows * payload_elem(f) + floats * sizeof(float);
}

static int stage_grow(ds4_fwd *f, size_t bytes, ds4_err *err) {
    if (bytes <= f->stage_bytes) return 0;
    unsigned char *p = realloc(f->stage, bytes);
    if (!p) return ds4_err_set(err, DS4_E_NOMEM, "out of memory (%zu bytes of state staging)", bytes);
    f->stage = p;
    f->stage_bytes = bytes;
    return 0;
}

/* Moves n_vals cached values between backend rows (row type) and the
 * payload (payload type), converting through the staging buffer when the
 * two differ. */
static int rows_io(ds4_fwd *f, const ds4_backend *be, unsigned char *buf, void *dev, size_t n_vals, bool save,
                   ds4_err *err) {
    const ds4_backend_ops *ops = be->ops;
    void *ctx = be->ctx;
    size_t pe = payload_elem(f), re = f->row_elem;
    if (n_vals == 0) return 0;
    if (pe == re)
        return save ? ops->download(ctx, buf, dev, n_vals * re, err) : ops->upload(ctx, dev, buf, n_vals * re, err);
    int rc = stage_grow(f, n_vals * re, err);
    if (rc) return rc;
    if (save) {
        if ((rc = ops->download(ctx, f->stage, dev, n_vals * re, err))) return rc;
        if (re == 4) { /* backend f32 -> payload f16 (values are half-exact) */
            const float *s = (const float *)f->stage;
            for (size_t i = 0; i < n_vals; i++) {
                uint16_t h = ds4_f32_to_f16(s[i]);
                memcpy(buf + 2 * i, &h, 2);
            }
        } else { /* backend f16 -> payload f32 */
            for (size_t i = 0; i < n_vals; i++) {
                uint16_t h;
                memcpy(&h, f->stage + 2 * i, 2);
                float v = ds4_f16_to_f32(h);
                memcpy(buf + 4 * i, &v, 4);
            }
        }
        return 0;
    }
    if (re == 4) {
        float *d = (float *)f->stage;
        for (size_t i = 0; i < n_vals; i++) {
            uint16_t h;
            memcpy(&h, buf + 2 * i, 2);
            d[i] = ds4_f16_to_f32(h);
        }
    } else {
        uint16_t *d = (uint16_t *)f->stage;
        for (size_t i = 0; i < n_vals; i++) {
            float v;
            memcpy(&v, buf + 4 * i, 4);
            d[i] = ds4_f32_to_f16(v);
        }
    }
    return ops->upload(ctx, dev, f->stage, n_vals * re, err);
}

static int floats_io(const ds4_backend *be, unsigned char *buf, float *dev, size_t n, bool save, ds4_err *err) {
    const ds4_backend_ops *ops = be->ops;
    return save ? ops->download(be->ctx, buf, dev, n * sizeof(float), err)
                : ops->upload(be->ctx, dev, buf, n * sizeof(float), err);
}

static int state_io(ds4_fwd *f, int T, unsigned char *buf, bool save, ds4_err *err) {
    const ds4_model *m = f->m;
    const ds4_hparams *hp = &m->hp;
    const size_t dh = (size_t)hp->head_dim, pe = payload_elem(f), W = (size_t)hp->window;
    size_t off = 0;
    int rc;
#define ROWS(dev, n_vals)                                                              \
    do {                                                                               \
        size_t nv_ = (n_vals);                                                         \
        if ((rc = rows_io(f, be, buf + off, (dev), nv_, save, err))) return rc;        \
        off += nv_ * pe;                                                               \
    } while (0)
#define FLOATS(dev, n_vals)                                                            \
    do {                                                                               \
        size_t nv_ = (n_vals);                                                         \
        if ((rc = floats_io(be, buf + off, (dev), nv_, save, err))) return rc;         \
        off += nv_ * sizeof(float);                                                    \
    } while (0)
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        ds4_layer_state *s = &f->ls[il];
        const ds4_backend *be = part_of(f, il)->be;
        /* raw rows of positions lo..T-1: ring slots lo%W.. wrap at most once */
        size_t lo = (size_t)T > W ? (size_t)T - W : 0, nraw = (size_t)T - lo;
        size_t first = lo % W, seg1 = nraw < W - first ? nraw : W - first;
        unsigned char *raw = s->raw;
        ROWS(raw + first * dh * f->row_elem, seg1 * dh);
        ROWS(raw, (nraw - seg1) * dh);
        if (l->kind != DS4_ATTN_SLIDING) {
            size_t fr = (size_t)frontier_rows(l) * ds4_model_comp_width(m, il);
            ROWS(s->comp, (size_t)(T / l->ratio) * dh);
            FLOATS(s->comp_a, fr);
            FLOATS(s->comp_g, fr);
        }
        if (l->kind == DS4_ATTN_CSA) {
            size_t fr = 8 * 2 * (size_t)hp->idx_dim;
            ROWS(s->idx, (size_t)(T / 4) * hp->idx_dim);
            FLOATS(s->icomp_a, fr);
            FLOATS(s->icomp_g, fr);
        }
    }
#undef ROWS
#undef FLOATS
    return 0;
}

int ds4_fwd_state_save(ds4_fwd *f, void *dst, ds4_err *err) { return state_io(f, f->pos, dst, true, err); }

int ds4_fwd_state_load(ds4_fwd *f, int pos, const void *src, size_t bytes, ds4_err *err) {
    if (pos < 0 || pos > f->n_ctx)
        return ds4_err_set(err, DS4_E_FORMAT, "state of %d tokens does not fit the session (ctx %d)", pos, f->n_ctx);
    if (bytes != ds4_fwd_state_bytes(f, pos))
        return ds4_err_set(err, DS4_E_FORMAT, "state has %zu bytes, expected %zu for %d tokens", bytes,
                           ds4_fwd_state_bytes(f, pos), pos);
    f->n_logits = 0;
    f->last_n = 0;
    int rc = state_io(f, pos, (unsigned char *)(uintptr_t)src, false, err);
    if (rc) return rc;
    f->pos = pos;
    return 0;
}

/* ------------------------------------------------------------ checkpoints */

/* Light checkpoint: raw rings (row type) and the frontiers, as stored. */
static int ckpt_io(ds4_fwd *f, unsigned char *buf, bool save, size_t *bytes, ds4_err *err) {
    const ds4_model *m = f->m;
    const ds4_hparams *hp = &m->hp;
    size_t off = 0;
#define IO(ptr, n_bytes)                                                                          \
    do {                                                                                          \
        size_t b_ = (n_bytes);                                                                    \
        if (buf) {                                                                                \
            int rc_ = save ? ops->download(ctx, buf + off, (ptr), b_, err)                         \
                           : ops->upload(ctx, (ptr), buf + off, b_, err);                          \
            if (rc_) return rc_;                                                                  \
        }                                                                                         \
        off += b_;                                                                                \
    } while (0)
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        ds4_layer_state *s = &f->ls[il];
        const ds4_backend_ops *ops = part_of(f, il)->be->ops;
        void *ctx = part_of(f, il)->be->ctx;
        IO(s->raw, (size_t)hp->window * hp->head_dim * f->row_elem);
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
    if (bytes) *bytes = off;
    return 0;
}

size_t ds4_fwd_ckpt_bytes(ds4_fwd *f) {
    if (!f->ckpt_bytes) ckpt_io(f, NULL, true, &f->ckpt_bytes, NULL);
    return f->ckpt_bytes;
}

int ds4_fwd_ckpt_save(ds4_fwd *f, void *dst, ds4_err *err) { return ckpt_io(f, dst, true, NULL, err); }

int ds4_fwd_ckpt_restore(ds4_fwd *f, int pos, const void *src, ds4_err *err) {
    f->n_logits = 0;
    f->last_n = 0;
    int rc = ckpt_io(f, (unsigned char *)(uintptr_t)src, false, NULL, err);
    if (rc) return rc;
    f->pos = pos;
    return 0;
}
