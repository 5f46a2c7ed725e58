/* test_model_build.c - builds tiny random-weight DeepSeek V4 GGUFs for the
 * engine tests (test_model.c, test_engine.c) with our GGUF writer, with
 * optional defects (a missing tensor, a wrong shape or type, bad metadata).
 * Weights are drawn from a fixed-seed generator, so two builds with the same
 * seed hold the same float weights whatever their storage types.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"
#include "quant.h"
#include "test_model_build.h"

tm_cfg tm_default(void) {
    tm_cfg c = {
        .n_layer = 5, .D = 64, .V = 64, .H = 4, .dh = 128, .n_rot = 64, .q_lora = 32, .o_lora = 32, .G = 2,
        .E = 8, .K = 3, .F = 64, .n_hash = 3, .window = 8, .IH = 2, .ID = 128, .topk = 3, .n_hc = 4,
        .ratios = {0, 0, 4, 8, 4}, .clamp = 1.0f, .yarn = true, .type_mat = DS4_TYPE_F32,
        .type_gate = DS4_TYPE_F32, .type_down = DS4_TYPE_F32, .type_small = DS4_TYPE_F32, .seed = 1,
    };
    return c;
}

/* ---- deterministic normal generator (xorshift64* + Box-Muller) */
typedef struct rng { uint64_t s; } rng;
static uint64_t rnext(rng *r) {
    r->s ^= r->s >> 12; r->s ^= r->s << 25; r->s ^= r->s >> 27;
    return r->s * 2685821657736338717ULL;
}
static double runif(rng *r) { return ((rnext(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
static float rnorm(rng *r, float sd) {
    double u = runif(r), v = runif(r);
    return (float)(sqrt(-2 * log(u)) * cos(2 * M_PI * v)) * sd;
}

typedef struct tm_ctx {
    const tm_cfg *c;
    ds4_gguf_writer *w;
    rng r;
    void **blobs;
    int n_blobs;
} tm_ctx;

static void *keep(tm_ctx *t, void *p) {
    t->blobs = realloc(t->blobs, (size_t)(t->n_blobs + 1) * sizeof(void *));
    t->blobs[t->n_blobs++] = p;
    return p;
}

/* ds4_quantize_rows over row ranges on up to 16 threads (the stage models
 * of make test-cuda hold ~1 GB of quantized experts: their IQ2_XXS search
 * took most of a minute on one core). The rows are independent, and the
 * importance IQ2_XXS derives from all rows when given none is made here
 * first, as ds4_quantize_rows makes it, so the bytes are the same as one
 * call's. */
typedef struct qjob {
    int type;
    const float *src, *imp;
    unsigned char *dst;
    int64_t r0, r1, n_cols;
    size_t rb;
} qjob;

static void *qjob_run(void *p) {
    const qjob *j = p;
    ds4_quantize_rows(j->type, j->src + j->r0 * j->n_cols, j->dst + (size_t)j->r0 * j->rb, j->r1 - j->r0, j->n_cols,
                      j->imp, NULL);
    return NULL;
}

static void quantize_par(int type, const float *src, unsigned char *dst, int64_t rows, int64_t n_cols, size_t rb) {
    long nc = sysconf(_SC_NPROCESSORS_ONLN);
    int nt = nc < 1 ? 1 : nc > 16 ? 16 : (int)nc;
    if (rows < 4 * nt || rows * n_cols < (1 << 16)) nt = 1;
    float *imp = NULL;
    if (type == DS4_TYPE_IQ2_XXS && n_cols > 0 && nt > 1) { /* ds4_quantize_rows' synthetic importance */
        imp = calloc((size_t)n_cols, sizeof *imp);
        if (!imp) nt = 1; /* one call, which makes its own */
        for (int64_t r = 0; imp && r < rows; r++)
            for (int64_t c = 0; c < n_cols; c++) imp[c] += src[r * n_cols + c] * src[r * n_cols + c];
    }
    qjob jobs[16];
    pthread_t th[16];
    int started = 0;
    for (int i = 0; i < nt; i++) {
        jobs[i] = (qjob){type, src, imp, dst, rows * i / nt, rows * (i + 1) / nt, n_cols, rb};
        if (i > 0 && pthread_create(&th[i], NULL, qjob_run, &jobs[i]) == 0) started |= 1 << i;
    }
    qjob_run(&jobs[0]);
    for (int i = 1; i < nt; i++) {
        if (started & (1 << i)) pthread_join(th[i], NULL);
        else qjob_run(&jobs[i]); /* no thread: here */
    }
    free(imp);
}

/* Adds tensor `name` of ne [n0, n1, n2] (n_dims) with values from gen
 * (0: N(0, sd); 1: 1 + U(-0.2, 0.2) (norm weights)), stored as `type`. */
static void add(tm_ctx *t, const char *name, int type, int n_dims, int64_t n0, int64_t n1, int64_t n2, int gen,
                float sd) {
    const tm_cfg *c = t->c;
    int64_t n = n0 * n1 * n2;
    float *x = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = gen == 1 ? 1.0f + (float)(runif(&t->r) * 0.4 - 0.2) : rnorm(&t->r, sd);
    if (c->skip_tensor && !strcmp(c->skip_tensor, name)) { free(x); return; }
    int64_t ne[3] = {n0, n1, n2};
    if (c->bad_shape_tensor && !strcmp(c->bad_shape_tensor, name)) ne[n_dims - 1] += 1;
    bool bad_type = c->bad_type_tensor && !strcmp(c->bad_type_tensor, name);
    int64_t rows = 1;
    for (int i = 1; i < n_dims; i++) rows *= ne[i];
    if (!ds4_type_row_ok(type, ne[0])) type = DS4_TYPE_F32;
    size_t rb = ds4_type_row_bytes(type, ne[0]);
    unsigned char *q = calloc((size_t)rows, rb);
    int64_t need = rows * ne[0];
    float *src = calloc((size_t)need, sizeof(float)); /* a bad shape gets zeros past the data */
    memcpy(src, x, (size_t)(need < n ? need : n) * sizeof(float));
    if (bad_type) { /* same bytes labelled I32: a type no float tensor may have */
        type = DS4_TYPE_I32;
        free(q);
        q = (unsigned char *)src;
        rb = (size_t)ne[0] * 4;
    } else {
        quantize_par(type, src, q, rows, ne[0], rb);
        free(src);
    }
    free(x);
    keep(t, q);
    ds4_gguf_writer_add_tensor(t->w, name, (uint32_t)type, (uint32_t)n_dims, ne, q, (uint64_t)rows * rb);
}

#define KEY(s) "deepseek4." s
static void u32(tm_ctx *t, const char *k, uint32_t v) {
    if (t->c->drop_key && !strcmp(t->c->drop_key, k)) return;
    ds4_gguf_writer_add_u32(t->w, k, v);
}
static void f32(tm_ctx *t, const char *k, float v) {
    if (t->c->drop_key && !strcmp(t->c->drop_key, k)) return;
    ds4_gguf_writer_add_f32(t->w, k, v);
}

int tm_build(const tm_cfg *c, const char *path) {
    tm_ctx t = {.c = c, .w = ds4_gguf_writer_new(), .r = {c->seed * 0x9E3779B97F4A7C15ULL + 1}};
    ds4_gguf_writer *w = t.w;
    ds4_gguf_writer_add_str(w, "general.architecture", "deepseek4", 9);
    u32(&t, KEY("block_count"), (uint32_t)c->n_layer);
    u32(&t, KEY("embedding_length"), (uint32_t)c->D);
    u32(&t, KEY("vocab_size"), (uint32_t)c->V);
    u32(&t, KEY("attention.head_count"), (uint32_t)c->H);
    u32(&t, KEY("attention.head_count_kv"), c->head_count_kv ? (uint32_t)c->head_count_kv : 1u);
    u32(&t, KEY("attention.key_length"), (uint32_t)c->dh);
    u32(&t, KEY("attention.value_length"), (uint32_t)c->dh);
    u32(&t, KEY("rope.dimension_count"), (uint32_t)c->n_rot);
    u32(&t, KEY("attention.q_lora_rank"), (uint32_t)c->q_lora);
    u32(&t, KEY("attention.output_lora_rank"), (uint32_t)c->o_lora);
    u32(&t, KEY("attention.output_group_count"), (uint32_t)c->G);
    u32(&t, KEY("expert_count"), (uint32_t)c->E);
    u32(&t, KEY("expert_used_count"), (uint32_t)c->K);
    u32(&t, KEY("expert_feed_forward_length"), (uint32_t)c->F);
    u32(&t, KEY("expert_shared_count"), 1);
    u32(&t, KEY("hash_layer_count"), (uint32_t)c->n_hash);
    u32(&t, KEY("attention.sliding_window"), (uint32_t)c->window);
    u32(&t, KEY("attention.indexer.head_count"), (uint32_t)c->IH);
    u32(&t, KEY("attention.indexer.key_length"), (uint32_t)c->ID);
    u32(&t, KEY("attention.indexer.top_k"), (uint32_t)c->topk);
    u32(&t, KEY("hyper_connection.count"), (uint32_t)c->n_hc);
    u32(&t, KEY("hyper_connection.sinkhorn_iterations"), 20);
    f32(&t, KEY("hyper_connection.epsilon"), 1e-6f);
    f32(&t, KEY("attention.layer_norm_rms_epsilon"), 1e-6f);
    f32(&t, KEY("rope.freq_base"), 10000.0f);
    f32(&t, KEY("attention.compress_rope_freq_base"), 160000.0f);
    if (c->yarn) {
        ds4_gguf_writer_add_str(w, KEY("rope.scaling.type"), "yarn", 4);
        f32(&t, KEY("rope.scaling.factor"), 16.0f);
        u32(&t, KEY("rope.scaling.original_context_length"), 65536);
        f32(&t, KEY("rope.scaling.yarn_beta_fast"), 32.0f);
        f32(&t, KEY("rope.scaling.yarn_beta_slow"), 1.0f);
    }
    f32(&t, KEY("expert_weights_scale"), 1.5f);
    ds4_gguf_writer_add_bool(w, KEY("expert_weights_norm"), true);
    int32_t ratios[64];
    float clamps[64];
    for (int i = 0; i < c->n_layer; i++) { ratios[i] = c->ratios[i]; clamps[i] = c->clamp; }
    if (!(c->drop_key && !strcmp(c->drop_key, KEY("attention.compress_ratios"))))
        ds4_gguf_writer_add_arr(w, KEY("attention.compress_ratios"), DS4_GGUF_I32, ratios,
                                (uint64_t)(c->n_layer - c->short_ratios));
    ds4_gguf_writer_add_arr(w, KEY("swiglu_clamp_exp"), DS4_GGUF_F32, clamps, (uint64_t)c->n_layer);

    const int D = c->D, hc = c->n_hc, mix = (2 + hc) * hc, TM = c->type_mat, TS = c->type_small;
    const float sd = 0.08f;
    add(&t, "token_embd.weight", TS, 2, D, c->V, 1, 0, 1.0f);
    add(&t, "output_hc_fn.weight", TS, 2, (int64_t)hc * D, hc, 1, 0, sd);
    add(&t, "output_hc_base.weight", DS4_TYPE_F32, 1, hc, 1, 1, 0, 0.5f);
    add(&t, "output_hc_scale.weight", DS4_TYPE_F32, 1, 1, 1, 1, 1, 0);
    add(&t, "output_norm.weight", DS4_TYPE_F32, 1, D, 1, 1, 1, 0);
    add(&t, "output.weight", TM, 2, D, c->V, 1, 0, sd);
    char nm[128];
    for (int il = 0; il < c->n_layer; il++) {
        int R = c->ratios[il];
#define N(s) (snprintf(nm, sizeof nm, "blk.%d." s, il), nm)
        add(&t, N("hc_attn_fn.weight"), TS, 2, (int64_t)hc * D, mix, 1, 0, sd);
        add(&t, N("hc_attn_scale.weight"), DS4_TYPE_F32, 1, 3, 1, 1, 1, 0);
        add(&t, N("hc_attn_base.weight"), DS4_TYPE_F32, 1, mix, 1, 1, 0, 0.5f);
        add(&t, N("attn_norm.weight"), DS4_TYPE_F32, 1, D, 1, 1, 1, 0);
        add(&t, N("attn_q_a.weight"), TM, 2, D, c->q_lora, 1, 0, sd);
        add(&t, N("attn_q_a_norm.weight"), DS4_TYPE_F32, 1, c->q_lora, 1, 1, 1, 0);
        add(&t, N("attn_q_b.weight"), TM, 2, c->q_lora, (int64_t)c->H * c->dh, 1, 0, sd * 2);
        add(&t, N("attn_kv.weight"), TM, 2, D, c->dh, 1, 0, sd);
        add(&t, N("attn_kv_a_norm.weight"), DS4_TYPE_F32, 1, c->dh, 1, 1, 1, 0);
        add(&t, N("attn_sinks.weight"), DS4_TYPE_F32, 1, c->H, 1, 1, 0, 1.0f);
        add(&t, N("attn_output_a.weight"), TM, 2, (int64_t)c->H * c->dh / c->G, (int64_t)c->G * c->o_lora, 1, 0, sd);
        add(&t, N("attn_output_b.weight"), TM, 2, (int64_t)c->G * c->o_lora, D, 1, 0, sd);
        if (R) {
            int64_t wd = (R == 4 ? 2 : 1) * (int64_t)c->dh;
            add(&t, N("attn_compressor_ape.weight"), TS, 2, wd, R, 1, 0, 1.0f);
            add(&t, N("attn_compressor_kv.weight"), TS, 2, D, wd, 1, 0, sd);
            add(&t, N("attn_compressor_gate.weight"), TS, 2, D, wd, 1, 0, sd * 4);
            add(&t, N("attn_compressor_norm.weight"), DS4_TYPE_F32, 1, c->dh, 1, 1, 1, 0);
        }
        if (R == 4) {
            add(&t, N("indexer.attn_q_b.weight"), TS, 2, c->q_lora, (int64_t)c->IH * c->ID, 1, 0, sd * 2);
            add(&t, N("indexer.proj.weight"), TS, 2, D, c->IH, 1, 0, sd);
            add(&t, N("indexer_compressor_ape.weight"), TS, 2, 2 * (int64_t)c->ID, 4, 1, 0, 1.0f);
            add(&t, N("indexer_compressor_kv.weight"), TS, 2, D, 2 * (int64_t)c->ID, 1, 0, sd);
            add(&t, N("indexer_compressor_gate.weight"), TS, 2, D, 2 * (int64_t)c->ID, 1, 0, sd * 4);
            add(&t, N("indexer_compressor_norm.weight"), DS4_TYPE_F32, 1, c->ID, 1, 1, 1, 0);
        }
        add(&t, N("hc_ffn_fn.weight"), TS, 2, (int64_t)hc * D, mix, 1, 0, sd);
        add(&t, N("hc_ffn_scale.weight"), DS4_TYPE_F32, 1, 3, 1, 1, 1, 0);
        add(&t, N("hc_ffn_base.weight"), DS4_TYPE_F32, 1, mix, 1, 1, 0, 0.5f);
        add(&t, N("ffn_norm.weight"), DS4_TYPE_F32, 1, D, 1, 1, 1, 0);
        add(&t, N("ffn_gate_inp.weight"), TS, 2, D, c->E, 1, 0, sd * 4);
        if (il >= c->n_hash) add(&t, N("exp_probs_b.bias"), DS4_TYPE_F32, 1, c->E, 1, 1, 0, 0.2f);
        else {
            int32_t *ids = keep(&t, malloc((size_t)c->V * c->K * sizeof(int32_t)));
            for (int i = 0; i < c->V * c->K; i++) ids[i] = (int32_t)(rnext(&t.r) % (uint64_t)c->E); /* repeats allowed */
            if (c->bad_expert_id && il == 0) ids[5] = c->E;
            int64_t ne[2] = {c->K, c->V};
            if (!(c->skip_tensor && !strcmp(c->skip_tensor, N("ffn_gate_tid2eid.weight"))))
                ds4_gguf_writer_add_tensor(w, N("ffn_gate_tid2eid.weight"), DS4_TYPE_I32, 2, ne, ids,
                                           (uint64_t)c->V * c->K * 4);
        }
        bool mx = c->mixed_last && il == c->n_layer - 1;
        add(&t, N("ffn_gate_exps.weight"), mx ? DS4_TYPE_Q4_K : c->type_gate, 3, D, c->F, c->E, 0, sd);
        add(&t, N("ffn_up_exps.weight"), mx ? DS4_TYPE_Q4_K : c->type_gate, 3, D, c->F, c->E, 0, sd);
        add(&t, N("ffn_down_exps.weight"), mx ? DS4_TYPE_Q2_K : c->type_down, 3, c->F, D, c->E, 0, sd);
        add(&t, N("ffn_gate_shexp.weight"), TM, 2, D, c->F, 1, 0, sd);
        add(&t, N("ffn_up_shexp.weight"), TM, 2, D, c->F, 1, 0, sd);
        add(&t, N("ffn_down_shexp.weight"), TM, 2, c->F, D, 1, 0, sd);
#undef N
    }
    ds4_err err = {0};
    int rc = ds4_gguf_writer_write_file(w, path, &err);
    if (rc) fprintf(stderr, "tm_build: %s\n", err.msg);
    ds4_gguf_writer_free(w);
    for (int i = 0; i < t.n_blobs; i++) free(t.blobs[i]);
    free(t.blobs);
    return rc;
}

/* The MTP block of a model built with the same cfg (MODEL.md B.4 names,
 * FORMATS.md D.3): one ratio-0 block with biased routing plus the input
 * and head tensors, no metadata. Defects as for tm_build. */
int tm_build_mtp(const tm_cfg *c, const char *path) {
    tm_ctx t = {.c = c, .w = ds4_gguf_writer_new(), .r = {c->seed * 0x9E3779B97F4A7C15ULL + 7}};
    ds4_gguf_writer *w = t.w;
    ds4_gguf_writer_add_str(w, "general.architecture", "deepseek4", 9);
    const int D = c->D, hc = c->n_hc, mix = (2 + hc) * hc, TM = c->type_mat, TS = c->type_small;
    const float sd = 0.08f;
#define M(s) "mtp.0." s
    add(&t, M("e_proj.weight"), TM, 2, D, D, 1, 0, 1.0f / sqrtf((float)D));
    add(&t, M("h_proj.weight"), TM, 2, D, D, 1, 0, 1.0f / sqrtf((float)D));
    add(&t, M("enorm.weight"), DS4_TYPE_F32, 1, D, 1, 1, 1, 0);
    add(&t, M("hnorm.weight"), DS4_TYPE_F32, 1, D, 1, 1, 1, 0);
    add(&t, M("norm.weight"), DS4_TYPE_F32, 1, D, 1, 1, 1, 0);
    add(&t, M("hc_head_fn.weight"), TS, 2, (int64_t)hc * D, hc, 1, 0, sd);
    add(&t, M("hc_head_base.weight"), DS4_TYPE_F32, 1, hc, 1, 1, 0, 0.5f);
    add(&t, M("hc_head_scale.weight"), DS4_TYPE_F32, 1, 1, 1, 1, 1, 0);
    add(&t, M("hc_attn_fn.weight"), TS, 2, (int64_t)hc * D, mix, 1, 0, sd);
    add(&t, M("hc_attn_scale.weight"), DS4_TYPE_F32, 1, 3, 1, 1, 1, 0);
    add(&t, M("hc_attn_base.weight"), DS4_TYPE_F32, 1, mix, 1, 1, 0, 0.5f);
    add(&t, M("attn_norm.weight"), DS4_TYPE_F32, 1, D, 1, 1, 1, 0);
    add(&t, M("attn_q_a.weight"), TM, 2, D, c->q_lora, 1, 0, sd);
    add(&t, M("attn_q_a_norm.weight"), DS4_TYPE_F32, 1, c->q_lora, 1, 1, 1, 0);
    add(&t, M("attn_q_b.weight"), TM, 2, c->q_lora, (int64_t)c->H * c->dh, 1, 0, sd * 2);
    add(&t, M("attn_kv.weight"), TM, 2, D, c->dh, 1, 0, sd);
    add(&t, M("attn_kv_a_norm.weight"), DS4_TYPE_F32, 1, c->dh, 1, 1, 1, 0);
    add(&t, M("attn_sinks.weight"), DS4_TYPE_F32, 1, c->H, 1, 1, 0, 1.0f);
    add(&t, M("attn_output_a.weight"), TM, 2, (int64_t)c->H * c->dh / c->G, (int64_t)c->G * c->o_lora, 1, 0, sd);
    add(&t, M("attn_output_b.weight"), TM, 2, (int64_t)c->G * c->o_lora, D, 1, 0, sd);
    add(&t, M("hc_ffn_fn.weight"), TS, 2, (int64_t)hc * D, mix, 1, 0, sd);
    add(&t, M("hc_ffn_scale.weight"), DS4_TYPE_F32, 1, 3, 1, 1, 1, 0);
    add(&t, M("hc_ffn_base.weight"), DS4_TYPE_F32, 1, mix, 1, 1, 0, 0.5f);
    add(&t, M("ffn_norm.weight"), DS4_TYPE_F32, 1, D, 1, 1, 1, 0);
    add(&t, M("ffn_gate_inp.weight"), TS, 2, D, c->E, 1, 0, sd * 4);
    add(&t, M("exp_probs_b.bias"), DS4_TYPE_F32, 1, c->E, 1, 1, 0, 0.2f);
    add(&t, M("ffn_gate_exps.weight"), c->type_gate, 3, D, c->F, c->E, 0, sd);
    add(&t, M("ffn_up_exps.weight"), c->type_gate, 3, D, c->F, c->E, 0, sd);
    add(&t, M("ffn_down_exps.weight"), c->type_down, 3, c->F, D, c->E, 0, sd);
    add(&t, M("ffn_gate_shexp.weight"), TM, 2, D, c->F, 1, 0, sd);
    add(&t, M("ffn_up_shexp.weight"), TM, 2, D, c->F, 1, 0, sd);
    add(&t, M("ffn_down_shexp.weight"), TM, 2, c->F, D, 1, 0, sd);
#undef M
    ds4_err err = {0};
    int rc = ds4_gguf_writer_write_file(w, path, &err);
    if (rc) fprintf(stderr, "tm_build_mtp: %s\n", err.msg);
    ds4_gguf_writer_free(w);
    for (int i = 0; i < t.n_blobs; i++) free(t.blobs[i]);
    free(t.blobs);
    return rc;
}
