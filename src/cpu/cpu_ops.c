/* cpu_ops.c - the stages of the CPU reference backend (MODEL.md §C).
 *
 * Each function computes one stage for a batch of n tokens. Per-token
 * results never depend on n or on the thread count: the same kernel call
 * computes each element, and sums always run in the order written here
 * (rows by position, then compressed rows ascending; slots in order). The
 * orders follow transformers where that is free, to stay close to the
 * oracle in plain-numerics mode.
 *
 * MODEL.md vs transformers 5.23 (checked against modeling_deepseek_v4.py;
 * plain-numerics logits agree to < 1e-5 on every oracle fixture):
 *  - HC flat norm: transformers uses rms_norm_eps, MODEL.md E.5 lists it
 *    under the RMSNorm epsilon too; hc_eps is only the Sinkhorn/sigmoid eps.
 *  - Routing weights: transformers divides by (sum + 1e-20) and applies the
 *    weight after the down projection; ds4 uses max(sum, 2^-14) and scales
 *    the SwiGLU output. Equal in exact arithmetic; we divide like
 *    transformers and scale before the down projection like ds4/official
 *    (the Q8_K activation of the release path then sees the weighted h).
 *  - Indexer score: relu(q.k) / sqrt(d_I) * (w_h / sqrt(H_I)), transformers'
 *    grouping of MODEL.md's 1/sqrt(d_I * H_I).
 *  - Compressor pooling: candidates in transformers' slot order (previous
 *    window's first halves, then the current window); a missing previous
 *    window is left out, which equals transformers' -inf gates.
 *  - expert_weights_norm = false (not in Flash) skips the renormalisation;
 *    transformers ignores the flag and always renormalises.
 * No disagreement in the math was found beyond these orderings.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "numerics.h"
#include "quant.h"

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* ------------------------------------------------------------ embed */

int cpu_embed(void *ctx, const ds4_embed_args *a) {
    (void)ctx;
    const ds4_hparams *hp = &a->m->hp;
    const int D = hp->n_embd, hc = hp->n_hc;
    const ds4_weight *w = &a->m->tok_embd;
    /* the ids come from the step (a worker's from the network): in range
     * before any row is read (the engine checks them first too) */
    for (int t = 0; t < a->n; t++)
        if (a->tokens[t] < 0 || a->tokens[t] >= hp->n_vocab) return DS4_E_ARG;
    for (int t = 0; t < a->n; t++) {
        float *X = a->X + (size_t)t * hc * D;
        ds4_dequant_row(w->type, (const char *)w->data + (size_t)a->tokens[t] * w->row_bytes, X, D);
        for (int s = 1; s < hc; s++) memcpy(X + (size_t)s * D, X, (size_t)D * sizeof(float));
    }
    return 0;
}

/* ------------------------------------------------------------ MTP input */

/* MODEL.md C.12 steps 1-3 (backend.h ds4_mtp_embed_args). The normalised
 * embeddings and streams are formed first, then the two products (one run),
 * then X_s = e + h_s in that order. */
int cpu_mtp_embed(void *ctx, const ds4_mtp_embed_args *a) {
    cpu_ctx *c = ctx;
    const ds4_model *m = a->m;
    const ds4_hparams *hp = &m->hp;
    const int D = hp->n_embd, hc = hp->n_hc, n = a->n;
    const ds4_weight *w = &m->tok_embd;
    float *en = cpu_scratch(c, 0, (size_t)n * D * sizeof(float));
    float *hn = cpu_scratch(c, 1, (size_t)n * hc * D * sizeof(float));
    float *ep = cpu_scratch(c, 2, (size_t)n * D * sizeof(float));
    float *hp_out = cpu_scratch(c, 3, (size_t)n * hc * D * sizeof(float));
    if (!en || !hn || !ep || !hp_out) return DS4_E_NOMEM;
    for (int t = 0; t < n; t++)
        if (a->tokens[t] < 0 || a->tokens[t] >= hp->n_vocab) return DS4_E_ARG; /* (as cpu_embed) */
    for (int t = 0; t < n; t++) {
        float *e = en + (size_t)t * D;
        ds4_dequant_row(w->type, (const char *)w->data + (size_t)a->tokens[t] * w->row_bytes, e, D);
        cpu_rmsnorm(e, e, D, m->mtp_enorm, hp->rms_eps);
        for (int s = 0; s < hc; s++) {
            size_t o = ((size_t)t * hc + s) * D;
            cpu_rmsnorm(hn + o, a->hc + o, D, m->mtp_hnorm, hp->rms_eps);
        }
    }
    cpu_mm mm[2] = {{.w = &m->mtp_e_proj, .n_rows = D, .x = en, .ldx = D, .n = n, .y = ep, .ldy = D},
                    {.w = &m->mtp_h_proj, .n_rows = D, .x = hn, .ldx = D, .n = n * hc, .y = hp_out, .ldy = D}};
    int rc = cpu_matmuls(c, mm, 2, a->num.act_quant);
    if (rc) return rc;
    for (int t = 0; t < n; t++)
        for (int s = 0; s < hc; s++) {
            size_t o = ((size_t)t * hc + s) * D;
            const float *e = ep + (size_t)t * D;
            for (int d = 0; d < D; d++) a->X[o + d] = e[d] + hp_out[o + d];
        }
    return c->err;
}

/* ------------------------------------------------------------ HC */

typedef struct hc_job {
    cpu_ctx *c;
    const ds4_hc_pre_args *a;
    float *phi;  /* small batches: (n, nflat) normalised states */
    float *mix;  /* small batches: (n, nmix) mixer values */
} hc_job;

/* Steps 4-7 of HC-pre for token t from its mixer values: pre/post, the
 * Sinkhorn comb, the weighted sum of the streams and the sublayer norm. */
static void hc_pre_finish(const ds4_hc_pre_args *a, int t, const float *mix, float *x) {
    const ds4_hparams *hp = &a->m->hp;
    const int D = hp->n_embd, hc = hp->n_hc, nflat = hc * D;
    const float *X = a->X + (size_t)t * nflat;
    float pre[64], C[64 * 64];
    float *post = a->post + (size_t)t * hc, *comb = a->comb + (size_t)t * hc * hc;
    for (int s = 0; s < hc; s++) {
        pre[s] = sigmoidf(mix[s] * a->scale[0] + a->base[s]) + hp->hc_eps;
        post[s] = 2.0f * sigmoidf(mix[hc + s] * a->scale[1] + a->base[hc + s]);
    }
    /* 6: comb = Sinkhorn(softmax over b of Z[a][b]) */
    for (int r = 0; r < hc; r++) {
        float *Cr = C + r * hc, mx = -INFINITY, sum = 0;
        for (int b = 0; b < hc; b++) {
            Cr[b] = mix[2 * hc + r * hc + b] * a->scale[2] + a->base[2 * hc + r * hc + b];
            mx = fmaxf(mx, Cr[b]);
        }
        for (int b = 0; b < hc; b++) { Cr[b] = expf(Cr[b] - mx); sum += Cr[b]; }
        for (int b = 0; b < hc; b++) Cr[b] = Cr[b] / sum + hp->hc_eps;
    }
    for (int it = 0; it < hp->sinkhorn_iters; it++) {
        if (it > 0) /* row normalisation (the softmax was the first) */
            for (int r = 0; r < hc; r++) {
                float s = 0;
                for (int b = 0; b < hc; b++) s += C[r * hc + b];
                for (int b = 0; b < hc; b++) C[r * hc + b] /= (s + hp->hc_eps);
            }
        for (int b = 0; b < hc; b++) { /* column normalisation */
            float s = 0;
            for (int r = 0; r < hc; r++) s += C[r * hc + b];
            for (int r = 0; r < hc; r++) C[r * hc + b] /= (s + hp->hc_eps);
        }
    }
    memcpy(comb, C, (size_t)hc * hc * sizeof(float));
    /* 7: x = sum_s pre_s X_s, then the sublayer norm */
    for (int d = 0; d < D; d++) {
        float acc = 0;
        for (int s = 0; s < hc; s++) acc += pre[s] * X[(size_t)s * D + d];
        x[d] = acc;
    }
    cpu_rmsnorm(a->out + (size_t)t * D, x, D, a->norm_w, hp->rms_eps);
}

/* one token per item: 1-3 m = fn . RMSNorm(vec X), then the finish */
static void hc_pre_task(void *p, int t0, int t1, int tid) {
    const hc_job *j = p;
    const ds4_hc_pre_args *a = j->a;
    const ds4_hparams *hp = &a->m->hp;
    const int D = hp->n_embd, hc = hp->n_hc, nflat = hc * D, nmix = (2 + hc) * hc;
    const ds4_quant_kernels *k = ds4_quant_kernels_get(a->fn->type, DS4_SIMD_AUTO);
    float *phi = cpu_tscratch(j->c, tid, 0, (size_t)nflat * sizeof(float));
    float *mix = cpu_tscratch(j->c, tid, 1, (size_t)(nmix + D) * sizeof(float));
    if (!phi || !mix) return;
    for (int t = t0; t < t1; t++) {
        cpu_rmsnorm(phi, a->X + (size_t)t * nflat, nflat, NULL, hp->rms_eps);
        for (int o = 0; o < nmix; o++)
            mix[o] = k->dot_f32((const char *)a->fn->data + (size_t)o * a->fn->row_bytes, phi, nflat);
        hc_pre_finish(a, t, mix, mix + nmix);
    }
}

/* small batches, phase by phase: the norms, then one item per (token, mixer
 * row) so that the mixer weights (the step's bandwidth) stream on every
 * core, then the finishes; each value is computed by the same calls as in
 * hc_pre_task, so the results are the same bits. */
static void hc_norm_task(void *p, int t0, int t1, int tid) {
    const hc_job *j = p;
    const ds4_hparams *hp = &j->a->m->hp;
    const int nflat = hp->n_hc * hp->n_embd;
    (void)tid;
    for (int t = t0; t < t1; t++)
        cpu_rmsnorm(j->phi + (size_t)t * nflat, j->a->X + (size_t)t * nflat, nflat, NULL, hp->rms_eps);
}

static void hc_mix_task(void *p, int i0, int i1, int tid) {
    const hc_job *j = p;
    const ds4_hc_pre_args *a = j->a;
    const ds4_hparams *hp = &a->m->hp;
    const int nflat = hp->n_hc * hp->n_embd, nmix = (2 + hp->n_hc) * hp->n_hc;
    const ds4_quant_kernels *k = ds4_quant_kernels_get(a->fn->type, DS4_SIMD_AUTO);
    (void)tid;
    for (int i = i0; i < i1; i++) {
        const int t = i / nmix, o = i % nmix;
        j->mix[i] = k->dot_f32((const char *)a->fn->data + (size_t)o * a->fn->row_bytes, j->phi + (size_t)t * nflat, nflat);
    }
}

static void hc_finish_task(void *p, int t0, int t1, int tid) {
    const hc_job *j = p;
    const ds4_hc_pre_args *a = j->a;
    const int nmix = (2 + a->m->hp.n_hc) * a->m->hp.n_hc;
    float *x = cpu_tscratch(j->c, tid, 1, (size_t)a->m->hp.n_embd * sizeof(float));
    if (!x) return;
    for (int t = t0; t < t1; t++) hc_pre_finish(a, t, j->mix + (size_t)t * nmix, x);
}

int cpu_hc_pre(void *ctx, const ds4_hc_pre_args *a) {
    cpu_ctx *c = ctx;
    if (a->m->hp.n_hc > 64) return c->err = DS4_E_INTERNAL;
    if (a->py) { /* the previous sublayer's HC-post first */
        ds4_hc_post_args pa = {.m = a->m, .step = a->step, .n = a->n, .pos0 = a->pos0, .y = a->py, .post = a->ppost,
                               .comb = a->pcomb, .X = a->X};
        if (cpu_hc_post(ctx, &pa)) return c->err;
    }
    hc_job j = {c, a, NULL, NULL};
    const ds4_hparams *hp = &a->m->hp;
    const int nflat = hp->n_hc * hp->n_embd, nmix = (2 + hp->n_hc) * hp->n_hc;
    if (a->n >= c->n_threads) {
        cpu_run_w(c, a->n, (double)nflat * (nmix + 2), hc_pre_task, &j);
        return c->err;
    }
    j.phi = cpu_scratch(c, 0, (size_t)a->n * nflat * sizeof(float));
    j.mix = cpu_scratch(c, 1, (size_t)a->n * nmix * sizeof(float));
    if (!j.phi || !j.mix) return DS4_E_NOMEM;
    cpu_run(c, a->n, hc_norm_task, &j);
    cpu_run(c, a->n * nmix, hc_mix_task, &j);
    cpu_run(c, a->n, hc_finish_task, &j);
    return c->err;
}

typedef struct hc_post_job {
    cpu_ctx *c;
    const ds4_hc_post_args *a;
} hc_post_job;

static void hc_post_task(void *p, int t0, int t1, int tid) {
    const hc_post_job *j = p;
    const ds4_hc_post_args *a = j->a;
    const int D = a->m->hp.n_embd, hc = a->m->hp.n_hc;
    float *old = cpu_tscratch(j->c, tid, 0, (size_t)hc * D * sizeof(float));
    if (!old) return;
    for (int t = t0; t < t1; t++) {
        float *X = a->X + (size_t)t * hc * D;
        const float *y = a->y + (size_t)t * D, *post = a->post + (size_t)t * hc;
        const float *comb = a->comb + (size_t)t * hc * hc;
        memcpy(old, X, (size_t)hc * D * sizeof(float));
        for (int b = 0; b < hc; b++)
            for (int d = 0; d < D; d++) {
                float acc = 0;
                for (int s = 0; s < hc; s++) acc += comb[s * hc + b] * old[(size_t)s * D + d];
                X[(size_t)b * D + d] = post[b] * y[d] + acc;
            }
    }
}

/* small batches: items of (token, 256 dims), each dim's streams kept in
 * registers (the same products and sums as hc_post_task) */
#define HC_POST_DB 256
static void hc_post_blk_task(void *p, int i0, int i1, int tid) {
    const hc_post_job *j = p;
    const ds4_hc_post_args *a = j->a;
    const int D = a->m->hp.n_embd, hc = a->m->hp.n_hc, nb = (D + HC_POST_DB - 1) / HC_POST_DB;
    (void)tid;
    for (int i = i0; i < i1; i++) {
        const int t = i / nb, d0 = (i % nb) * HC_POST_DB, d1 = d0 + HC_POST_DB < D ? d0 + HC_POST_DB : D;
        float *X = a->X + (size_t)t * hc * D;
        const float *y = a->y + (size_t)t * D, *post = a->post + (size_t)t * hc;
        const float *comb = a->comb + (size_t)t * hc * hc;
        for (int d = d0; d < d1; d++) {
            float old[64];
            for (int s = 0; s < hc; s++) old[s] = X[(size_t)s * D + d];
            for (int b = 0; b < hc; b++) {
                float acc = 0;
                for (int s = 0; s < hc; s++) acc += comb[s * hc + b] * old[s];
                X[(size_t)b * D + d] = post[b] * y[d] + acc;
            }
        }
    }
}

int cpu_hc_post(void *ctx, const ds4_hc_post_args *a) {
    cpu_ctx *c = ctx;
    hc_post_job j = {c, a};
    const ds4_hparams *hp = &a->m->hp;
    if (a->n < c->n_threads && hp->n_hc <= 64) {
        cpu_run(c, a->n * ((hp->n_embd + HC_POST_DB - 1) / HC_POST_DB), hc_post_blk_task, &j);
        return c->err;
    }
    cpu_run_w(c, a->n, (double)hp->n_hc * hp->n_hc * hp->n_embd, hc_post_task, &j);
    return c->err;
}

/* ------------------------------------------------------------ q / kv */

/* The RoPE cos/sin tables of positions pos0 .. pos0 + n - 1 (n_rot floats
 * each) in scratch slot `slot`: every head of a token then applies its
 * position's table (cpu_rope_apply; the same bits as cpu_rope per head). */
static float *rope_tables(cpu_ctx *c, int slot, const float *inv_freq, int n_rot, int pos0, int n) {
    float *cs = cpu_scratch(c, slot, (size_t)n * (n_rot > 0 ? n_rot : 1) * sizeof(float));
    if (!cs) return NULL;
    for (int t = 0; t < n; t++) cpu_rope_table(cs + (size_t)t * n_rot, n_rot, inv_freq, pos0 + t);
    return cs;
}

static void kv_row_finish(float *kv, const ds4_hparams *hp, const float *inv_freq, int pos,
                          const float *norm_w, ds4_numerics num) {
    const int dh = hp->head_dim, nope = dh - hp->n_rot;
    cpu_rmsnorm(kv, kv, dh, norm_w, hp->rms_eps);
    cpu_rope(kv + nope, hp->n_rot, inv_freq, pos, false);
    if (num.fp8_kv) ds4_num_fp8_round(kv, nope, 64);
    if (num.f16_cache) ds4_num_f16_round(kv, dh);
}

/* Finishing of attn_project: phase 0 the q_a norm per token; phase 1 the
 * per-head q norm + RoPE (cs: the tokens' RoPE tables) and the kv row, one
 * item per token, or (fewer tokens than threads) one per head or kv row. */
typedef struct proj_job {
    const ds4_attn_project_args *a;
    int phase;
    bool per_head;
    const float *cs;
} proj_job;

static void proj_head(const proj_job *j, int t, int h) {
    const ds4_attn_project_args *a = j->a;
    const ds4_hparams *hp = &a->m->hp;
    const int dh = hp->head_dim, H = hp->n_head;
    if (h == H) {
        kv_row_finish(a->kv + (size_t)t * dh, hp, a->rope->inv_freq, a->pos0 + t, a->l->kv_norm, a->num);
        return;
    }
    float *qh = a->q + ((size_t)t * H + h) * dh;
    cpu_rmsnorm(qh, qh, dh, NULL, hp->rms_eps);
    cpu_rope_apply(qh + dh - hp->n_rot, hp->n_rot, j->cs + (size_t)t * hp->n_rot, false);
}

static void proj_task(void *p, int i0, int i1, int tid) {
    (void)tid;
    const proj_job *j = p;
    const ds4_attn_project_args *a = j->a;
    const ds4_hparams *hp = &a->m->hp;
    const int H = hp->n_head, ql = hp->q_lora;
    for (int i = i0; i < i1; i++) {
        if (j->phase == 0) {
            cpu_rmsnorm(a->cq + (size_t)i * ql, a->cq + (size_t)i * ql, ql, a->l->q_a_norm, hp->rms_eps);
        } else if (j->per_head) {
            proj_head(j, i / (H + 1), i % (H + 1));
        } else {
            for (int h = 0; h <= H; h++) proj_head(j, i, h);
        }
    }
}

int cpu_attn_project(void *ctx, const ds4_attn_project_args *a) {
    cpu_ctx *c = ctx;
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int D = hp->n_embd, dh = hp->head_dim, H = hp->n_head, ql = hp->q_lora;
    int rc;
    /* q_a and kv read the same input: one run */
    cpu_mm qkv[2] = {{.w = &l->q_a, .n_rows = ql, .x = a->u, .ldx = D, .n = a->n, .y = a->cq, .ldy = ql},
                     {.w = &l->kv, .n_rows = dh, .x = a->u, .ldx = D, .n = a->n, .y = a->kv, .ldy = dh}};
    if ((rc = cpu_matmuls(c, qkv, 2, a->num.act_quant))) return rc;
    proj_job j = {.a = a, .phase = 0};
    cpu_run_w(c, a->n, (double)ql * 4, proj_task, &j);
    if ((rc = cpu_matmul(c, &l->q_b, 0, 0, (int64_t)H * dh, a->cq, ql, NULL, a->n, a->q, (int64_t)H * dh,
                         a->num.act_quant))) return rc;
    j.phase = 1;
    if (!(j.cs = rope_tables(c, 0, a->rope->inv_freq, hp->n_rot, a->pos0, a->n))) return DS4_E_NOMEM;
    if (a->n < c->n_threads) {
        j.per_head = true;
        cpu_run_w(c, a->n * (H + 1), (double)dh * 4, proj_task, &j);
    } else {
        cpu_run_w(c, a->n, (double)(H + 1) * dh * 4, proj_task, &j);
    }
    return c->err;
}

int cpu_kv_store(void *ctx, const ds4_kv_store_args *a) {
    (void)ctx;
    const int W = a->m->hp.window, dh = a->m->hp.head_dim;
    int t0 = a->n > W ? a->n - W : 0;
    for (int t = t0; t < a->n; t++)
        memcpy((float *)a->raw + (size_t)((a->pos0 + t) % W) * dh, a->kv + (size_t)t * dh, (size_t)dh * sizeof(float));
    return 0;
}

/* ------------------------------------------------------------ compressor */

/* Emits compressed row k from the frontier ring (MODEL.md C.5). */
static void compress_emit(const ds4_compress_args *a, int k, float *pooled) {
    const ds4_hparams *hp = &a->m->hp;
    const int R = a->ratio, d = a->d, c = a->overlap ? 2 : 1, w = c * d, ring = c * R;
    for (int ch = 0; ch < d; ch++) {
        float mx = -INFINITY, sum = 0, acc = 0;
        int nc = 0;
        /* candidates in transformers' slot order: previous window's first
         * halves (R = 4 only, absent for k = 0), then the current window.
         * At most c*R <= 256 (checked by cpu_check_model). */
        float G[256], A[256];
        if (a->overlap && k > 0)
            for (int r = 0; r < R; r++) {
                int slot = (R * (k - 1) + r) % ring;
                G[nc] = a->fg[(size_t)slot * w + ch];
                A[nc++] = a->fa[(size_t)slot * w + ch];
            }
        for (int r = 0; r < R; r++) {
            int slot = (R * k + r) % ring, off = a->overlap ? d : 0;
            G[nc] = a->fg[(size_t)slot * w + off + ch];
            A[nc++] = a->fa[(size_t)slot * w + off + ch];
        }
        for (int i = 0; i < nc; i++) mx = fmaxf(mx, G[i]);
        for (int i = 0; i < nc; i++) { G[i] = expf(G[i] - mx); sum += G[i]; }
        for (int i = 0; i < nc; i++) acc += A[i] * (G[i] / sum);
        pooled[ch] = acc;
    }
    float *row = (float *)a->rows + (size_t)k * d;
    cpu_rmsnorm(row, pooled, d, a->norm_w, hp->rms_eps);
    cpu_rope(row + d - hp->n_rot, hp->n_rot, a->rope->inv_freq, k * R, false);
    if (a->indexer) {
        if (a->num.fp4_indexer) {
            ds4_num_hadamard(row, d);
            ds4_num_fp4_round(row, d);
        }
    } else if (a->num.fp8_kv) {
        ds4_num_fp8_round(row, d - hp->n_rot, 64);
    }
    if (a->num.f16_cache) ds4_num_f16_round(row, d);
}

int cpu_compress_update(void *ctx, const ds4_compress_args *a) {
    cpu_ctx *c = ctx;
    const ds4_hparams *hp = &a->m->hp;
    const int D = hp->n_embd, R = a->ratio, cw = a->overlap ? 2 : 1, w = cw * a->d, ring = cw * R;
    if (ring > 256) return c->err = DS4_E_INTERNAL; /* compress_emit's stack arrays; refused at open */
    if (a->row_type != DS4_TYPE_F32) return c->err = DS4_E_INTERNAL; /* kv_row_type is F32 */
    float *A = cpu_scratch(c, 0, (size_t)a->n * w * sizeof(float));
    float *G = cpu_scratch(c, 1, (size_t)a->n * w * sizeof(float));
    float *ape = cpu_scratch(c, 2, (size_t)R * w * sizeof(float));
    float *pooled = cpu_scratch(c, 3, (size_t)a->d * sizeof(float));
    if (!A || !G || !ape || !pooled) return DS4_E_NOMEM;
    int rc;
    cpu_mm kg[2] = {{.w = a->wkv, .n_rows = w, .x = a->u, .ldx = D, .n = a->n, .y = A, .ldy = w},
                    {.w = a->wgate, .n_rows = w, .x = a->u, .ldx = D, .n = a->n, .y = G, .ldy = w}};
    if ((rc = cpu_matmuls(c, kg, 2, a->num.act_quant))) return rc;
    for (int r = 0; r < R; r++)
        ds4_dequant_row(a->ape->type, (const char *)a->ape->data + (size_t)r * a->ape->row_bytes, ape + (size_t)r * w, w);
    for (int t = 0; t < a->n; t++) {
        int p = a->pos0 + t, j = p % R, slot = p % ring;
        memcpy(a->fa + (size_t)slot * w, A + (size_t)t * w, (size_t)w * sizeof(float));
        for (int i = 0; i < w; i++) a->fg[(size_t)slot * w + i] = G[(size_t)t * w + i] + ape[(size_t)j * w + i];
        if ((p + 1) % R == 0) {
            int k = (p + 1) / R - 1;
            if (k >= a->cap) return c->err = DS4_E_RANGE;
            compress_emit(a, k, pooled);
        }
    }
    return c->err;
}

/* ------------------------------------------------------------ indexer */

typedef struct scored_t {
    float s;
    int32_t i;
} scored_t;

typedef struct idx_job {
    cpu_ctx *c;
    const ds4_indexer_args *a;
    float *qi, *wt;
    /* FP4 numerics: the queries' and the rows' codes and block powers
     * (ds4_num_fp4_codes), the scores then exact (ds4_num_fp4_dot) */
    int8_t *qc, *kc;
    float *qp, *kp;
    int t;          /* decode path: the token whose rows are scored */
    scored_t *sc;   /* decode path: its scores */
    const float *cs; /* the tokens' RoPE tables (n, n_rot) */
} idx_job;

static int before(const scored_t *x, const scored_t *y) {
    /* the selection order: higher score first, ties to the lower index */
    return x->s > y->s || (x->s == y->s && x->i < y->i);
}

static int cmp_i32(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

/* Moves the k first of sc[0..n) in the selection order to sc[0..k)
 * (quickselect, median-of-three pivots): O(n) where a full sort of a long
 * context's rows would dominate a decode step. The set is unique (the order
 * is total: indices differ), so it does not depend on the algorithm. */
static void select_first(scored_t *sc, int n, int k) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (before(&sc[mid], &sc[lo])) { scored_t t = sc[mid]; sc[mid] = sc[lo]; sc[lo] = t; }
        if (before(&sc[hi], &sc[lo])) { scored_t t = sc[hi]; sc[hi] = sc[lo]; sc[lo] = t; }
        if (before(&sc[hi], &sc[mid])) { scored_t t = sc[hi]; sc[hi] = sc[mid]; sc[mid] = t; }
        scored_t pv = sc[mid];
        int i = lo, j = hi;
        while (i <= j) {
            /* bounds kept even without sentinels: NaN scores make the
             * order partial */
            while (i < hi && before(&sc[i], &pv)) i++;
            while (j > lo && before(&pv, &sc[j])) j--;
            if (i <= j) { scored_t t = sc[i]; sc[i] = sc[j]; sc[j] = t; i++, j--; }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* Rotates and rounds indexer query head h of token t (MODEL.md C.6). */
static void idx_prep_head(const idx_job *j, int t, int h) {
    const ds4_indexer_args *a = j->a;
    const ds4_hparams *hp = &a->m->hp;
    const int IH = hp->idx_heads, ID = hp->idx_dim;
    float *qh = j->qi + ((size_t)t * IH + h) * ID;
    cpu_rope_apply(qh + ID - hp->n_rot, hp->n_rot, j->cs + (size_t)t * hp->n_rot, false);
    if (a->num.fp4_indexer) {
        ds4_num_hadamard(qh, ID);
        ds4_num_fp4_round(qh, ID);
        const int nb = ID / 32;
        float pb[65536 / 32]; /* idx_dim <= 65536 (model.c) */
        cpu_fp4_codes(qh, ID, j->qc + ((size_t)t * IH + h) * ID, pb);
        for (int b = 0; b < nb; b++) j->qp[((size_t)t * nb + b) * IH + h] = pb[b]; /* block-major */
    }
}

/* The codes of compressed rows [r0, r1) (FP4 numerics). */
static void idx_codes_task(void *p, int r0, int r1, int tid) {
    (void)tid;
    const idx_job *j = p;
    const int ID = j->a->m->hp.idx_dim;
    for (int r = r0; r < r1; r++)
        cpu_fp4_codes((const float *)j->a->idx_rows + (size_t)r * ID, ID, j->kc + (size_t)r * ID,
                      j->kp + (size_t)r * (ID / 32));
}

static void idx_prep_q(const idx_job *j, int t) {
    for (int h = 0; h < j->a->m->hp.idx_heads; h++) idx_prep_head(j, t, h);
}

/* Decode: the heads of token j->t over the threads. */
static void idx_heads_task(void *p, int h0, int h1, int tid) {
    (void)tid;
    const idx_job *j = p;
    for (int h = h0; h < h1; h++) idx_prep_head(j, j->t, h);
}

/* Scores of token t against compressed rows [r0, r1) into sc[r0..r1). */
static void idx_score(const idx_job *j, int t, int r0, int r1, scored_t *sc) {
    const ds4_indexer_args *a = j->a;
    const ds4_hparams *hp = &a->m->hp;
    const int IH = hp->idx_heads, ID = hp->idx_dim;
    const float sm_scale = 1.0f / sqrtf((float)ID), w_scale = 1.0f / sqrtf((float)IH);
    const float *q = j->qi + (size_t)t * IH * ID, *wt = j->wt + (size_t)t * IH;
    float dots[256];
    for (int r = r0; r < r1; r++) {
        if (j->kc) {
            const int nb = ID / 32;
            cpu_fp4_dot_heads(j->qc + (size_t)t * IH * ID, j->qp + (size_t)t * nb * IH, IH, j->kc + (size_t)r * ID,
                              j->kp + (size_t)r * nb, ID, dots);
        } else {
            cpu_dot8_heads(q, IH, (const float *)a->idx_rows + (size_t)r * ID, ID, dots);
        }
        float tot = 0;
        for (int h = 0; h < IH; h++) {
            float dot = dots[h];
            float s = (dot > 0 ? dot : 0) * sm_scale;
            tot += s * (wt[h] * w_scale);
        }
        sc[r].s = tot;
        sc[r].i = r;
    }
}

/* sel = the top_k rows of sc[0..Nc), ascending. */
static void idx_pick(const ds4_indexer_args *a, int t, scored_t *sc, int Nc) {
    const int K = a->m->hp.idx_topk;
    int32_t *sel = a->sel + (size_t)t * K;
    select_first(sc, Nc, K);
    for (int i = 0; i < K; i++) sel[i] = sc[i].i;
    qsort(sel, (size_t)K, sizeof(int32_t), cmp_i32);
    a->n_sel[t] = K;
}

/* Prefill: one token per item (prep, score every row, pick). */
static void idx_task(void *p, int t0, int t1, int tid) {
    const idx_job *j = p;
    const ds4_indexer_args *a = j->a;
    const int K = a->m->hp.idx_topk;
    for (int t = t0; t < t1; t++) {
        int Nc = (a->pos0 + t + 1) / 4;
        if (Nc <= K) {
            for (int i = 0; i < Nc; i++) a->sel[(size_t)t * K + i] = i;
            a->n_sel[t] = Nc;
            continue;
        }
        idx_prep_q(j, t);
        scored_t *sc = cpu_tscratch(j->c, tid, 0, (size_t)Nc * sizeof(scored_t));
        if (!sc) return;
        idx_score(j, t, 0, Nc, sc);
        idx_pick(a, t, sc, Nc);
    }
}

/* Decode (fewer tokens than threads): the rows of one token split over
 * the threads. */
static void idx_rows_task(void *p, int r0, int r1, int tid) {
    (void)tid;
    const idx_job *j = p;
    idx_score(j, j->t, r0, r1, j->sc);
}

int cpu_indexer_select(void *ctx, const ds4_indexer_args *a) {
    cpu_ctx *c = ctx;
    const ds4_hparams *hp = &a->m->hp;
    const int D = hp->n_embd, IH = hp->idx_heads, ID = hp->idx_dim, K = hp->idx_topk;
    if (IH > 256) return c->err = DS4_E_INTERNAL; /* idx_score's array; refused at open */
    idx_job j = {.c = c, .a = a};
    if ((a->pos0 + a->n) / 4 > K) {
        /* some token has more rows than top_k: score them */
        j.qi = cpu_scratch(c, 4, (size_t)a->n * IH * ID * sizeof(float));
        j.wt = cpu_scratch(c, 5, (size_t)a->n * IH * sizeof(float));
        if (!j.qi || !j.wt) return DS4_E_NOMEM;
        int rc;
        cpu_mm qw[2] = {{.w = &a->l->idx_q_b, .n_rows = (int64_t)IH * ID, .x = a->cq, .ldx = hp->q_lora, .n = a->n,
                         .y = j.qi, .ldy = (int64_t)IH * ID},
                        {.w = &a->l->idx_proj, .n_rows = IH, .x = a->u, .ldx = D, .n = a->n, .y = j.wt, .ldy = IH}};
        if ((rc = cpu_matmuls(c, qw, 2, a->num.act_quant))) return rc;
        if (!(j.cs = rope_tables(c, 7, a->rope->inv_freq, hp->n_rot, a->pos0, a->n))) return DS4_E_NOMEM;
        if (a->num.fp4_indexer) {
            /* exact scores from codes (MODEL.md E.3; numerics_inl.h) */
            const int nr = (a->pos0 + a->n) / 4, nb = ID / 32;
            j.qc = cpu_scratch(c, 0, (size_t)a->n * IH * ID);
            j.qp = cpu_scratch(c, 1, (size_t)a->n * IH * nb * sizeof(float));
            j.kc = cpu_scratch(c, 2, (size_t)nr * ID);
            j.kp = cpu_scratch(c, 3, (size_t)nr * nb * sizeof(float));
            if (!j.qc || !j.qp || !j.kc || !j.kp) return DS4_E_NOMEM;
            cpu_run_w(c, nr, (double)ID * 4, idx_codes_task, &j);
        }
    }
    if (!j.qi || a->n >= c->n_threads) {
        cpu_run_w(c, a->n, j.qi ? (double)((a->pos0 + a->n) / 4) * IH * ID : 1.0, idx_task, &j);
        return c->err;
    }
    for (int t = 0; t < a->n; t++) {
        int Nc = (a->pos0 + t + 1) / 4;
        if (Nc <= K) {
            for (int i = 0; i < Nc; i++) a->sel[(size_t)t * K + i] = i;
            a->n_sel[t] = Nc;
            continue;
        }
        j.t = t;
        cpu_run_w(c, IH, (double)ID * 64, idx_heads_task, &j);
        if (!(j.sc = cpu_scratch(c, 6, (size_t)Nc * sizeof(scored_t)))) return DS4_E_NOMEM;
        cpu_run_w(c, Nc, (double)IH * ID, idx_rows_task, &j);
        idx_pick(a, t, j.sc, Nc);
    }
    return c->err;
}

/* ------------------------------------------------------------ attention */

typedef struct attn_job {
    cpu_ctx *c;
    const ds4_attention_args *a;
    float *o; /* (n, H, dh) */
    const float *cs; /* the tokens' RoPE tables (n, n_rot) */
} attn_job;

enum { ATTN_HG = 4 }; /* heads per work item: they share the token's rows */

static void attn_task(void *p, int i0, int i1, int tid) {
    const attn_job *j = p;
    const ds4_attention_args *a = j->a;
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int H = hp->n_head, dh = hp->head_dim, W = hp->window, n_hg = (H + ATTN_HG - 1) / ATTN_HG;
    const float scale = 1.0f / sqrtf((float)dh);
    for (int it = i0; it < i1; it++) {
        int t = it / n_hg, h0 = (it % n_hg) * ATTN_HG, P = a->pos0 + t;
        int nq = H - h0 < ATTN_HG ? H - h0 : ATTN_HG;
        int lo = P - W + 1 > 0 ? P - W + 1 : 0;
        int n_raw = P - lo + 1, n_comp = 0;
        const int32_t *sel = NULL;
        if (l->kind == DS4_ATTN_HCA) n_comp = (P + 1) / l->ratio;
        else if (l->kind == DS4_ATTN_CSA) {
            n_comp = a->n_sel[t];
            sel = a->sel + (size_t)t * hp->idx_topk;
        }
        int nr = n_raw + n_comp;
        float *sc = cpu_tscratch(j->c, tid, 1, (size_t)ATTN_HG * nr * sizeof(float));
        const float **rows = cpu_tscratch(j->c, tid, 2, (size_t)nr * sizeof(float *));
        if (!sc || !rows) return;
        for (int r = 0; r < n_raw; r++) {
            int pos = lo + r;
            rows[r] = pos >= a->pos0 ? a->kv + (size_t)(pos - a->pos0) * dh : (const float *)a->raw + (size_t)(pos % W) * dh;
        }
        for (int r = 0; r < n_comp; r++) rows[n_raw + r] = (const float *)a->comp + (size_t)(sel ? sel[r] : r) * dh;
        const float *q[ATTN_HG];
        float *o[ATTN_HG];
        for (int k = 0; k < nq; k++) {
            q[k] = a->q + ((size_t)t * H + h0 + k) * dh;
            o[k] = j->o + ((size_t)t * H + h0 + k) * dh;
        }
        cpu_dot8_rows_multi(q, nq, rows, nr, dh, scale, sc);
        for (int k = 0; k < nq; k++) { /* softmax with the head's sink */
            float *s = sc + (size_t)k * nr, sink = l->sinks[h0 + k], mx = sink, den = 0;
            for (int r = 0; r < nr; r++) mx = fmaxf(mx, s[r]);
            for (int r = 0; r < nr; r++) { s[r] = expf(s[r] - mx); den += s[r]; }
            den += expf(sink - mx);
            for (int r = 0; r < nr; r++) s[r] = s[r] / den;
        }
        /* o_h[i] = sum_r p_hr v_r[i], rows in order */
        cpu_sum_rows_multi(sc, nq, rows, nr, dh, o);
        for (int k = 0; k < nq; k++) cpu_rope_apply(o[k] + dh - hp->n_rot, hp->n_rot, j->cs + (size_t)t * hp->n_rot, true);
    }
}

int cpu_attention(void *ctx, const ds4_attention_args *a) {
    cpu_ctx *c = ctx;
    const ds4_hparams *hp = &a->m->hp;
    const int H = hp->n_head, dh = hp->head_dim, G = hp->o_groups, ol = hp->o_lora;
    const int64_t gd = (int64_t)(H / G) * dh;
    if (a->row_type != DS4_TYPE_F32) return c->err = DS4_E_INTERNAL; /* kv_row_type is F32 */
    attn_job j = {c, a, cpu_scratch(c, 0, (size_t)a->n * H * dh * sizeof(float)),
                  rope_tables(c, 2, a->rope->inv_freq, hp->n_rot, a->pos0, a->n)};
    float *z = cpu_scratch(c, 1, (size_t)a->n * G * ol * sizeof(float));
    if (!j.o || !z || !j.cs) return DS4_E_NOMEM;
    cpu_run_w(c, a->n * ((H + ATTN_HG - 1) / ATTN_HG),
              (double)ATTN_HG * dh * (hp->window + (a->l->ratio ? (a->pos0 + a->n) / a->l->ratio : 0)) * 2, attn_task, &j);
    if (c->err) return c->err;
    int rc;
    /* grouped output projection: z_g = W_oa[g] . (heads of group g), all groups one run */
    cpu_mm og[64];
    if (G > 64) return c->err = DS4_E_INTERNAL;
    for (int g = 0; g < G; g++)
        og[g] = (cpu_mm){.w = &a->l->o_a, .row0 = (int64_t)g * ol, .n_rows = ol, .x = j.o + g * gd,
                         .ldx = (int64_t)H * dh, .n = a->n, .y = z + (size_t)g * ol, .ldy = (int64_t)G * ol};
    if ((rc = cpu_matmuls(c, og, G, a->num.act_quant))) return rc;
    if ((rc = cpu_matmul(c, &a->l->o_b, 0, 0, hp->n_embd, z, (int64_t)G * ol, NULL, a->n, a->y, hp->n_embd,
                         a->num.act_quant))) return rc;
    return c->err;
}

/* ------------------------------------------------------------ MoE */

static float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

int cpu_moe_route(void *ctx, const ds4_moe_route_args *a) {
    cpu_ctx *c = ctx;
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int E = hp->n_expert, K = hp->n_expert_used;
    float *lg = cpu_scratch(c, 0, (size_t)a->n * E * sizeof(float));
    if (!lg) return DS4_E_NOMEM;
    int rc = cpu_matmul(c, &l->gate_inp, 0, 0, E, a->v, hp->n_embd, NULL, a->n, lg, E, false);
    if (rc) return rc;
    for (int t = 0; t < a->n; t++) {
        float *s = lg + (size_t)t * E;
        int32_t *ids = a->ids + (size_t)t * K;
        float *w = a->w + (size_t)t * K;
        for (int e = 0; e < E; e++) s[e] = sqrtf(softplusf(s[e]));
        if (l->hash) {
            if (a->tokens[t] < 0 || a->tokens[t] >= hp->n_vocab) return DS4_E_ARG; /* (as cpu_embed) */
            for (int i = 0; i < K; i++) ids[i] = l->tid2eid[(size_t)a->tokens[t] * K + i];
        } else {
            /* biased top-k; strict '>' keeps the lower index on ties */
            for (int i = 0; i < K; i++) {
                int best = -1;
                float bv = 0;
                for (int e = 0; e < E; e++) {
                    bool taken = false;
                    for (int q = 0; q < i; q++) taken |= ids[q] == e;
                    if (taken) continue;
                    float v = s[e] + l->exp_bias[e];
                    if (best < 0 || v > bv) { best = e; bv = v; }
                }
                ids[i] = best;
            }
        }
        float sum = 0;
        for (int i = 0; i < K; i++) sum += s[ids[i]];
        for (int i = 0; i < K; i++) {
            float g = hp->expert_weights_norm ? s[ids[i]] / (sum + 1e-20f) : s[ids[i]];
            w[i] = g * hp->expert_weights_scale;
        }
    }
    return 0;
}

/* h = silu(min(g, lim)) * clamp(u, -lim, lim) * wt (C.8) */
static void swiglu(float *h, const float *g, const float *u, int F, float lim, float wt) {
    for (int i = 0; i < F; i++) {
        float gv = g[i] < lim ? g[i] : lim;
        float uv = u[i] < -lim ? -lim : (u[i] > lim ? lim : u[i]);
        float si = gv / (1.0f + expf(-gv));
        h[i] = si * uv * wt;
    }
}

/* Expert-major MoE. The (token, slot) items are sorted by expert (items of
 * one expert in increasing order), so each expert's weights are read once for
 * all its tokens; gate and up of every used expert and of the shared expert
 * are one parallel run, SwiGLU, then every down projection is a second run.
 * A decode step thus keeps all threads on the six experts' rows together
 * instead of running expert after expert. Per item the operations are those
 * of one token alone, and the final sum adds the slots in order, then the
 * shared expert. */
typedef struct moe_job {
    const ds4_moe_experts_args *a;
    float *gb, *ub, *ob;       /* (NI + n, F), (NI + n, F), (NI + n, D): sorted items, then shared rows */
    const int32_t *items;      /* sorted position -> item t*K+k */
    const int32_t *pos;        /* item -> sorted position */
    int NI;
} moe_job;

static void moe_swiglu_task(void *p, int r0, int r1, int tid) {
    (void)tid;
    const moe_job *j = p;
    const ds4_hparams *hp = &j->a->m->hp;
    const int F = hp->n_ff_exp;
    const float lim = hp->swiglu_clamp[j->a->il];
    for (int r = r0; r < r1; r++) {
        float wt = r < j->NI ? j->a->w[j->items[r]] : 1.0f;
        float *g = j->gb + (size_t)r * F;
        swiglu(g, g, j->ub + (size_t)r * F, F, lim, wt);
    }
}

static void moe_sum_task(void *p, int t0, int t1, int tid) {
    (void)tid;
    const moe_job *j = p;
    const ds4_hparams *hp = &j->a->m->hp;
    const int D = hp->n_embd, K = hp->n_expert_used;
    for (int t = t0; t < t1; t++) {
        float *y = j->a->y + (size_t)t * D;
        const float *sh = j->ob + (size_t)(j->NI + t) * D;
        const float *o[64];
        for (int k = 0; k < K; k++) o[k] = j->ob + (size_t)j->pos[t * K + k] * D;
        for (int d = 0; d < D; d++) {
            float acc = 0;
            for (int k = 0; k < K; k++) acc += o[k][d];
            y[d] = acc + sh[d];
        }
    }
}

int cpu_moe_experts(void *ctx, const ds4_moe_experts_args *a) {
    cpu_ctx *c = ctx;
    const ds4_hparams *hp = &a->m->hp;
    const ds4_layer *l = a->l;
    const int D = hp->n_embd, F = hp->n_ff_exp, E = hp->n_expert, K = hp->n_expert_used, n = a->n;
    const int NI = n * K;
    const bool aq = a->num.act_quant;
    if (K > 64) return c->err = DS4_E_INTERNAL; /* moe_sum_task's slot array; Flash has 6 */
    moe_job j = {.a = a, .NI = NI};
    j.gb = cpu_scratch(c, 0, (size_t)(NI + n) * F * sizeof(float));
    j.ub = cpu_scratch(c, 1, (size_t)(NI + n) * F * sizeof(float));
    j.ob = cpu_scratch(c, 2, (size_t)(NI + n) * D * sizeof(float));
    int32_t *cnt = cpu_scratch(c, 3, (size_t)(E + 1) * sizeof(int32_t));
    int32_t *items = cpu_scratch(c, 4, (size_t)NI * 3 * sizeof(int32_t));
    cpu_mm *mm = cpu_scratch(c, 5, (size_t)(2 * E + 2) * sizeof(cpu_mm));
    if (!j.gb || !j.ub || !j.ob || !cnt || !items || !mm) return DS4_E_NOMEM;
    int32_t *tok = items + NI, *pos = items + 2 * NI;
    j.items = items;
    j.pos = pos;
    /* sort (token, slot) items by expert, increasing within an expert */
    memset(cnt, 0, (size_t)(E + 1) * sizeof(int32_t));
    for (int i = 0; i < NI; i++) {
        if (a->ids[i] < 0 || a->ids[i] >= E) return c->err = DS4_E_INTERNAL;
        cnt[a->ids[i] + 1]++;
    }
    for (int e = 0; e < E; e++) cnt[e + 1] += cnt[e];
    for (int i = 0; i < NI; i++) {
        int q = cnt[a->ids[i]]++;
        items[q] = i;
        tok[q] = i / K;
        pos[i] = q;
    }
    for (int e = E; e > 0; e--) cnt[e] = cnt[e - 1]; /* back to starts */
    cnt[0] = 0;
    /* gate and up: every used expert, then the shared expert */
    int nm = 0, rc;
    for (int e = 0; e < E; e++) {
        int b = cnt[e], ne = cnt[e + 1] - b;
        if (ne == 0) continue;
        mm[nm++] = (cpu_mm){.w = &l->gate_exps, .mat = e, .n_rows = F, .x = a->v, .ldx = D, .xidx = tok + b,
                            .n = ne, .y = j.gb + (size_t)b * F, .ldy = F};
        mm[nm++] = (cpu_mm){.w = &l->up_exps, .mat = e, .n_rows = F, .x = a->v, .ldx = D, .xidx = tok + b,
                            .n = ne, .y = j.ub + (size_t)b * F, .ldy = F};
    }
    mm[nm++] = (cpu_mm){.w = &l->gate_sh, .n_rows = F, .x = a->v, .ldx = D, .n = n, .y = j.gb + (size_t)NI * F,
                        .ldy = F};
    mm[nm++] = (cpu_mm){.w = &l->up_sh, .n_rows = F, .x = a->v, .ldx = D, .n = n, .y = j.ub + (size_t)NI * F,
                        .ldy = F};
    if ((rc = cpu_matmuls(c, mm, nm, aq))) return rc;
    cpu_run_w(c, NI + n, (double)F * 8, moe_swiglu_task, &j);
    if (a->act)                 /* imatrix collection: sorted rows back to (token, slot) order */
        for (int r = 0; r < NI; r++) memcpy(a->act + (size_t)items[r] * F, j.gb + (size_t)r * F, (size_t)F * sizeof(float));
    /* down: every used expert, then the shared expert */
    nm = 0;
    for (int e = 0; e < E; e++) {
        int b = cnt[e], ne = cnt[e + 1] - b;
        if (ne == 0) continue;
        mm[nm++] = (cpu_mm){.w = &l->down_exps, .mat = e, .n_rows = D, .x = j.gb + (size_t)b * F, .ldx = F,
                            .n = ne, .y = j.ob + (size_t)b * D, .ldy = D};
    }
    mm[nm++] = (cpu_mm){.w = &l->down_sh, .n_rows = D, .x = j.gb + (size_t)NI * F, .ldx = F, .n = n,
                        .y = j.ob + (size_t)NI * D, .ldy = D};
    if ((rc = cpu_matmuls(c, mm, nm, aq))) return rc;
    cpu_run_w(c, n, (double)(K + 1) * D, moe_sum_task, &j);
    return c->err;
}

/* ------------------------------------------------------------ head */

int cpu_head(void *ctx, const ds4_head_args *a) {
    cpu_ctx *c = ctx;
    const ds4_model *m = a->m;
    const ds4_hparams *hp = &m->hp;
    const int D = hp->n_embd, hc = hp->n_hc, nflat = hc * D;
    float *hn = cpu_scratch(c, 0, (size_t)a->n * D * sizeof(float));
    float *phi = cpu_scratch(c, 1, (size_t)(nflat + D) * sizeof(float));
    if (!hn || !phi) return DS4_E_NOMEM;
    float *h = phi + nflat;
    const ds4_quant_kernels *k = ds4_quant_kernels_get(m->out_hc_fn.type, DS4_SIMD_AUTO);
    for (int t = 0; t < a->n; t++) {
        const float *X = a->X + (size_t)t * nflat;
        cpu_rmsnorm(phi, X, nflat, NULL, hp->rms_eps);
        float ws[64];
        for (int s = 0; s < hc && s < 64; s++) {
            float mv = k->dot_f32((const char *)m->out_hc_fn.data + (size_t)s * m->out_hc_fn.row_bytes, phi, nflat);
            ws[s] = sigmoidf(mv * m->out_hc_scale[0] + m->out_hc_base[s]) + hp->hc_eps;
        }
        for (int d = 0; d < D; d++) {
            float acc = 0;
            for (int s = 0; s < hc; s++) acc += ws[s] * X[(size_t)s * D + d];
            h[d] = acc;
        }
        cpu_rmsnorm(hn + (size_t)t * D, h, D, m->out_norm, hp->rms_eps);
    }
    return cpu_matmul(c, &m->output, 0, 0, hp->n_vocab, hn, D, NULL, a->n, a->logits, hp->n_vocab,
                      a->num.act_quant);
}
