/* test_model_build.h - tiny random DeepSeek V4 GGUFs for engine tests. */
#ifndef DS4_TEST_MODEL_BUILD_H
#define DS4_TEST_MODEL_BUILD_H

#include <stdbool.h>
#include <stdint.h>

typedef struct tm_cfg {
    int n_layer, D, V, H, dh, n_rot, q_lora, o_lora, G, E, K, F, n_hash, window, IH, ID, topk, n_hc;
    int ratios[64];
    float clamp;
    bool yarn;
    int type_mat;    /* attention projections, shared expert, output head */
    int type_gate;   /* routed gate/up */
    int type_down;   /* routed down */
    int type_small;  /* embedding, HC fns, router, compressor, indexer */
    uint64_t seed;
    bool mixed_last;     /* last layer: Q4_K gate/up + Q2_K down (needs D, F multiples of 256) */
    /* defects */
    const char *skip_tensor, *bad_shape_tensor, *bad_type_tensor, *drop_key;
    int head_count_kv;   /* 0 = 1 */
    int short_ratios;    /* write compress_ratios with this many entries fewer */
    bool bad_expert_id;
} tm_cfg;

tm_cfg tm_default(void);
/* Writes the model to path; 0 or a negative DS4_E*. */
int tm_build(const tm_cfg *c, const char *path);
/* The MTP GGUF (32 tensors, prefix mtp.0.) for a model of the same cfg. */
int tm_build_mtp(const tm_cfg *c, const char *path);

#endif
