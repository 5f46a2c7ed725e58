/* demo.c - the demo model: a small random-weight DeepSeek V4 of the real
 * structure (sliding, CSA, HCA and hash-MoE layers, hyper-connections, YaRN)
 * with the real vocabulary width, so the whole text path (tokenizer, chat
 * template, sampler, server) runs on a CPU in seconds. Its weights are
 * seeded noise: the text it produces is meaningless.
 *
 * The weights are never held in memory: each planned tensor is bound to a
 * seeded generator that hf.c's streaming producer evaluates row by row.
 */
#include <math.h>
#include <string.h>

#include "convert.h"
#include "util/xalloc.h"

/* Demo schedule: 2 sliding, then CSA / HCA alternating like Flash, with an
 * HCA ratio of 16 (instead of 128) so compressed rows appear in short chats. */
static const int demo_ratio[] = {0, 0, 4, 16, 4, 16};

void ds4_conv_demo_hparams(ds4_conv_hparams *hp, int n_vocab) {
    memset(hp, 0, sizeof *hp);
    hp->n_layer = (int)(sizeof demo_ratio / sizeof demo_ratio[0]);
    hp->n_embd = 256;
    hp->n_vocab = n_vocab;
    hp->n_head = 4;
    hp->head_dim = 128;
    hp->n_rot = 64;
    hp->q_lora = 64;
    hp->o_lora = 64;
    hp->o_groups = 2;
    hp->n_expert = 8;
    hp->n_expert_used = 2;
    hp->n_ff = 256;
    hp->n_hash = 3;
    hp->window = 128;
    hp->idx_heads = 4;
    hp->idx_dim = 128;
    hp->idx_topk = 32;
    hp->n_hc = 4;
    hp->sinkhorn_iters = 20;
    hp->hc_eps = 1e-6;
    hp->rms_eps = 1e-6;
    hp->routed_scale = 1.5;
    hp->swiglu_limit = 10.0;
    hp->rope_base = 10000.0;
    hp->compress_rope_base = 160000.0;
    hp->yarn = true;
    hp->yarn_factor = 16.0;
    hp->yarn_orig_ctx = 65536;
    hp->yarn_beta_fast = 32.0;
    hp->yarn_beta_slow = 1.0;
    hp->context_length = 65536;
    hp->ratio = xmalloc(sizeof demo_ratio);         /* small and fixed: freed by ds4_conv_hparams_free */
    memcpy(hp->ratio, demo_ratio, sizeof demo_ratio);
}

static bool has(const char *s, const char *part) { return strstr(s, part) != NULL; }

static uint64_t name_hash(const char *s) {
    uint64_t h = 1469598103934665603ull;            /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

void ds4_conv_demo_bind(ds4_conv_plan *p, const ds4_conv_hparams *hp, uint64_t seed) {
    (void)hp;
    for (int i = 0; i < p->n; i++) {
        ds4_conv_tensor *t = &p->t[i];
        t->src = DS4_SRC_RANDOM;
        t->seed = seed * 0x9E3779B97F4A7C15ull ^ name_hash(t->name);
        t->rand = DS4_RAND_NORMAL;
        t->ra = 0.0;
        if (has(t->name, "tid2eid")) {
            t->rand = DS4_RAND_EXPERT_ID;                /* rb = n_expert, set by the layout */
        } else if (has(t->name, "norm")) {
            t->rand = DS4_RAND_UNIFORM, t->ra = 0.8, t->rb = 1.2;
        } else if (has(t->name, "_scale")) {
            t->rand = DS4_RAND_UNIFORM, t->ra = 0.5, t->rb = 1.5;
        } else if (has(t->name, "_base")) {
            t->rb = 0.5;
        } else if (has(t->name, "attn_sinks") || has(t->name, "_ape") || !strcmp(t->name, "token_embd.weight")) {
            t->rb = 1.0;
        } else if (has(t->name, "exp_probs_b")) {
            t->rb = 0.2;
        } else {
            t->rb = 1.0 / sqrt((double)t->ne[0]);        /* matrices: unit-variance outputs */
        }
    }
}
