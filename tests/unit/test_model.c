/* test_model.c - model loading and validation: a tiny random model loads
 * through the same code as Flash; a missing tensor, a wrong shape or type
 * and inconsistent metadata each fail with DS4_E_MODEL naming the culprit. */
#include <stdio.h>
#include <string.h>

#include "ds4.h"
#include "quant.h"
#include "test.h"
#include "test_model_build.h"

static int open_model(const tm_cfg *c, const char *name, ds4_engine **e, ds4_err *err) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s.gguf", ds4_test_tmpdir(), name);
    if (tm_build(c, path) != 0) return -100;
    ds4_engine_opts o = {.model_path = path, .backend = DS4_BACKEND_CPU, .n_threads = 1};
    return ds4_engine_open(e, &o, err);
}

DS4_TEST(model_tiny_loads_and_describes) {
    tm_cfg c = tm_default();
    ds4_engine *e = NULL;
    ds4_err err = {0};
    int rc = open_model(&c, "ok", &e, &err);
    CHECK_MSG(rc == 0, "open failed: %s", err.msg);
    CHECK_EQ_INT(ds4_engine_n_vocab(e), 64);
    CHECK_EQ_INT(ds4_engine_n_layer(e), 5);
    CHECK(strstr(ds4_engine_describe(e), "2 sliding, 2 CSA, 1 HCA") != NULL);
    CHECK(!ds4_has_tokenizer(e));
    CHECK_EQ_INT(ds4_token_special(e, DS4_TOK_BOS), -1);
    ds4_engine_close(e);
}

/* Opens a defective model and checks code and that the message names it. */
static const char *expect_fail(ds4_test_ctx *t, const tm_cfg *c, const char *name, const char *needle,
                               const char *needle2) {
    ds4_engine *e = NULL;
    ds4_err err = {0};
    int rc = open_model(c, name, &e, &err);
    if (rc == 0) { ds4_engine_close(e); snprintf(t->msg, sizeof t->msg, "%s: opened", name); return "opened"; }
    if (rc != DS4_E_MODEL) { snprintf(t->msg, sizeof t->msg, "%s: rc %d (%s)", name, rc, err.msg); return "rc"; }
    if (!strstr(err.msg, needle) || (needle2 && !strstr(err.msg, needle2))) {
        snprintf(t->msg, sizeof t->msg, "%s: message '%s' lacks '%s'", name, err.msg, needle);
        return "msg";
    }
    return NULL;
}

#define EXPECT_FAIL(c, name, needle, needle2)                         \
    do { if (expect_fail(t, &(c), name, needle, needle2)) { t->failed = 1; return; } } while (0)

DS4_TEST(model_missing_tensor_is_named) {
    tm_cfg c = tm_default();
    c.skip_tensor = "blk.3.attn_compressor_gate.weight";
    EXPECT_FAIL(c, "missing", "blk.3.attn_compressor_gate.weight", "missing");
    c = tm_default();
    c.skip_tensor = "blk.1.ffn_gate_tid2eid.weight";
    EXPECT_FAIL(c, "missing2", "blk.1.ffn_gate_tid2eid.weight", "missing");
    c = tm_default();
    c.skip_tensor = "blk.4.indexer.proj.weight";
    EXPECT_FAIL(c, "missing3", "blk.4.indexer.proj.weight", "missing");
}

DS4_TEST(model_wrong_shape_is_named) {
    tm_cfg c = tm_default();
    c.bad_shape_tensor = "blk.2.attn_q_b.weight";
    EXPECT_FAIL(c, "shape", "blk.2.attn_q_b.weight", "expected [32, 512]");
    c = tm_default();
    c.bad_shape_tensor = "blk.0.attn_sinks.weight";
    EXPECT_FAIL(c, "shape2", "blk.0.attn_sinks.weight", "[5], expected [4]");
    c = tm_default();
    c.bad_shape_tensor = "blk.4.ffn_down_exps.weight";
    EXPECT_FAIL(c, "shape3", "blk.4.ffn_down_exps.weight", "expected [64, 64, 8]");
}

DS4_TEST(model_wrong_type_is_named) {
    tm_cfg c = tm_default();
    c.bad_type_tensor = "blk.1.attn_kv.weight";
    EXPECT_FAIL(c, "type", "blk.1.attn_kv.weight", "I32");
    c = tm_default();
    c.bad_type_tensor = "output_norm.weight";
    EXPECT_FAIL(c, "type2", "output_norm.weight", "expected F32");
    /* gate and up experts must share a type */
    c = tm_default();
    c.type_gate = DS4_TYPE_Q8_0;
    c.bad_type_tensor = NULL;
    ds4_engine *e = NULL;
    ds4_err err = {0};
    CHECK_MSG(open_model(&c, "q8exp", &e, &err) == 0, "%s", err.msg); /* same type: fine */
    ds4_engine_close(e);
}

DS4_TEST(model_inconsistent_metadata_is_named) {
    tm_cfg c = tm_default();
    c.head_count_kv = 2;
    EXPECT_FAIL(c, "kv2", "head_count_kv", NULL);
    c = tm_default();
    c.short_ratios = 1;
    EXPECT_FAIL(c, "ratios", "compress_ratios", "at least block_count");
    c = tm_default();
    c.drop_key = "deepseek4.attention.q_lora_rank";
    EXPECT_FAIL(c, "nokey", "deepseek4.attention.q_lora_rank", "missing");
    c = tm_default();
    c.K = 9; /* more experts used than exist */
    EXPECT_FAIL(c, "k9", "expert_used_count", NULL);
    c = tm_default();
    c.bad_expert_id = true;
    EXPECT_FAIL(c, "eid", "blk.0.ffn_gate_tid2eid.weight", "expert id 8");
}

DS4_TEST(model_other_schedules_and_plain_rope_load) {
    /* other ratios, window, top-k and layer count; plain RoPE on compressed layers */
    tm_cfg c = tm_default();
    c.n_layer = 3;
    c.ratios[0] = 4; c.ratios[1] = 16; c.ratios[2] = 0;
    c.n_hash = 1;
    c.window = 5;
    c.topk = 2;
    c.yarn = false;
    ds4_engine *e = NULL;
    ds4_err err = {0};
    CHECK_MSG(open_model(&c, "sched", &e, &err) == 0, "%s", err.msg);
    CHECK(strstr(ds4_engine_describe(e), "1 sliding, 1 CSA, 1 HCA") != NULL);
    CHECK(strstr(ds4_engine_describe(e), "compressed RoPE plain") != NULL);
    ds4_engine_close(e);
}
