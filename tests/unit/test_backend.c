/* test_backend.c - the backend contract (src/backend.h) from the outside:
 * the strict test backend refuses a stage argument that is not backend
 * memory (naming the stage and the argument) and accepts the same call with
 * backend memory; its bound weights are copies, not the mapping; the CPU
 * argmax follows the sampler's rule (lowest index of the largest finite
 * value; -1 when none is finite); f16 session payloads are half the size of f32 ones and load back
 * to the same logits. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ds4.h"
#include "gguf.h"
#include "model.h"
#include "test.h"
#include "test_model_build.h"

static int load_tiny(ds4_test_ctx *t, ds4_gguf **g, ds4_model *m, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s.gguf", ds4_test_tmpdir(), name);
    tm_cfg c = tm_default();
    if (tm_build(&c, path)) return -1;
    ds4_err e = {0};
    if (ds4_gguf_open(g, path, &e) || ds4_model_load(m, *g, &e)) {
        snprintf(t->msg, sizeof t->msg, "load: %s", e.msg);
        return -1;
    }
    return 0;
}

DS4_TEST(backend_strict_refuses_host_pointers_and_names_them) {
    ds4_gguf *g = NULL;
    ds4_model m;
    CHECK(load_tiny(t, &g, &m, "strict") == 0);
    ds4_backend be;
    ds4_err e = {0};
    CHECK(ds4_strict_backend_new(1, &be, &e) == 0);
    ds4_model *bm = NULL;
    ds4_bind_opts bo = {0};
    CHECK(be.ops->bind_model(be.ctx, &m, &bo, &bm, &e) == 0);
    /* the binding is a copy: no weight of the bound model points into the mapping */
    CHECK(bm != &m && bm->tok_embd.data != m.tok_embd.data && bm->layers[0].attn_norm != m.layers[0].attn_norm);
    CHECK(memcmp(bm->tok_embd.data, m.tok_embd.data, m.tok_embd.mat_bytes) == 0);
    const ds4_hparams *hp = &m.hp;
    const int n = 2;
    ds4_step *st = be.ops->alloc(be.ctx, DS4_STEP_BYTES(n));
    float *X = be.ops->alloc(be.ctx, (size_t)n * hp->n_hc * hp->n_embd * sizeof(float));
    CHECK(st && X);
    ds4_step host = {.pos0 = 0, .n = n, .n_cap = n};
    int32_t toks[2] = {3, 5};
    CHECK(be.ops->upload(be.ctx, st, &host, sizeof host, &e) == 0);
    CHECK(be.ops->upload(be.ctx, DS4_STEP_TOKENS(st), toks, sizeof toks, &e) == 0);
    ds4_step_info si = {.step = st, .n = n, .pos0 = 0};
    /* tokens from host memory: refused, with the stage and argument named */
    CHECK(be.ops->step_begin(be.ctx, &si, &e) == 0);
    ds4_embed_args bad = {.m = bm, .step = st, .n = n, .pos0 = 0, .tokens = toks, .X = X};
    CHECK(be.ops->embed(be.ctx, &bad) != 0);
    int rc = be.ops->step_end(be.ctx, &e);
    CHECK(rc == DS4_E_INTERNAL);
    CHECK_MSG(strstr(e.msg, "embed") && strstr(e.msg, "tokens"), "message: %s", e.msg);
    /* the host model instead of the bound one: refused */
    CHECK(be.ops->step_begin(be.ctx, &si, &e) == 0);
    ds4_embed_args bad_m = {.m = &m, .step = st, .n = n, .pos0 = 0, .tokens = DS4_STEP_TOKENS(st), .X = X};
    CHECK(be.ops->embed(be.ctx, &bad_m) != 0);
    CHECK(be.ops->step_end(be.ctx, &e) == DS4_E_INTERNAL);
    /* a buffer too small for the stage: refused */
    float *small = be.ops->alloc(be.ctx, 16);
    CHECK(be.ops->step_begin(be.ctx, &si, &e) == 0);
    ds4_embed_args bad_x = {.m = bm, .step = st, .n = n, .pos0 = 0, .tokens = DS4_STEP_TOKENS(st), .X = small};
    CHECK(be.ops->embed(be.ctx, &bad_x) != 0);
    CHECK(be.ops->step_end(be.ctx, &e) == DS4_E_INTERNAL);
    /* backend memory everywhere: accepted, and the rows are the embeddings */
    CHECK(be.ops->step_begin(be.ctx, &si, &e) == 0);
    ds4_embed_args ok = {.m = bm, .step = st, .n = n, .pos0 = 0, .tokens = DS4_STEP_TOKENS(st), .X = X};
    CHECK(be.ops->embed(be.ctx, &ok) == 0);
    CHECK(be.ops->step_end(be.ctx, &e) == 0);
    float row[64];
    CHECK(hp->n_embd <= 64);
    CHECK(be.ops->download(be.ctx, row, X + (size_t)hp->n_hc * hp->n_embd, (size_t)hp->n_embd * 4, &e) == 0);
    CHECK(memcmp(row, (const char *)m.tok_embd.data + 5 * m.tok_embd.row_bytes, (size_t)hp->n_embd * 4) == 0);
    /* copies outside backend memory are refused too */
    float host_buf[4];
    CHECK(be.ops->download(be.ctx, host_buf, host_buf, sizeof host_buf, &e) != 0);
    be.ops->free(be.ctx, small);
    be.ops->free(be.ctx, X);
    be.ops->free(be.ctx, st);
    be.ops->unbind_model(be.ctx, bm);
    be.ops->destroy(be.ctx);
    ds4_model_free(&m);
    ds4_gguf_close(g);
}

DS4_TEST(backend_cpu_argmax_rule) {
    ds4_backend be;
    ds4_err e = {0};
    CHECK(ds4_cpu_backend_new(1, &be, &e) == 0);
    float a[6] = {1.0f, 3.0f, NAN, 3.0f, INFINITY, -2.0f};
    float b[3] = {NAN, NAN, -INFINITY};
    float c[2] = {-5.0f, -5.0f};
    int32_t id = -1;
    CHECK(be.ops->argmax(be.ctx, a, 1, 6, &id, &e) == 0 && id == 1);
    CHECK(be.ops->argmax(be.ctx, b, 1, 3, &id, &e) == 0 && id == -1); /* none finite: -1 (the contract) */
    CHECK(be.ops->argmax(be.ctx, c, 1, 2, &id, &e) == 0 && id == 0);
    float rows[4] = {0.0f, 1.0f, 2.0f, -1.0f};
    int32_t ids[2];
    CHECK(be.ops->argmax(be.ctx, rows, 2, 2, ids, &e) == 0 && ids[0] == 1 && ids[1] == 0);
    be.ops->destroy(be.ctx);
}

/* Release numerics store cached rows as half in the payload: the payload of
 * a plain-numerics session (f32 rows) is larger, and both load back to the
 * same logits. */
DS4_TEST(backend_session_payload_rows_half_with_f16_cache) {
    char path[512];
    snprintf(path, sizeof path, "%s/payload.gguf", ds4_test_tmpdir());
    tm_cfg c = tm_default();
    CHECK(tm_build(&c, path) == 0);
    size_t bytes[2];
    for (int plain = 0; plain < 2; plain++) {
        ds4_engine_opts o = {.model_path = path, .backend = DS4_BACKEND_CPU, .n_threads = 1, .plain_numerics = plain};
        ds4_engine *e = NULL;
        ds4_err err = {0};
        CHECK(ds4_engine_open(&e, &o, &err) == 0);
        ds4_session_opts so = {.n_ctx = 64};
        ds4_session *s = NULL, *s2 = NULL;
        CHECK(ds4_session_new(e, &so, &s, &err) == 0 && ds4_session_new(e, &so, &s2, &err) == 0);
        int32_t toks[40];
        for (int i = 0; i < 40; i++) toks[i] = (i * 7 + 3) % 64;
        CHECK(ds4_session_sync(s, toks, 40, NULL, NULL, NULL, &err) == 0);
        void *buf = NULL;
        CHECK(ds4_session_save(s, &buf, &bytes[plain], &err) == 0);
        CHECK(ds4_session_load(s2, buf, bytes[plain], &err) == 0);
        int32_t a, b;
        CHECK(ds4_session_eval(s, 9, &err) == 0 && ds4_session_eval(s2, 9, &err) == 0);
        CHECK(memcmp(ds4_session_logits(s), ds4_session_logits(s2), 64 * sizeof(float)) == 0);
        CHECK(ds4_session_argmax(s, &a, &err) == 0 && ds4_session_argmax(s2, &b, &err) == 0 && a == b);
        free(buf);
        ds4_session_free(s);
        ds4_session_free(s2);
        ds4_engine_close(e);
    }
    CHECK_MSG(bytes[0] < bytes[1], "release payload %zu bytes, plain %zu", bytes[0], bytes[1]);
}
