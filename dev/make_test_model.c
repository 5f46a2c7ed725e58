/* dev/make_test_model.c - writes a random-weight DeepSeek V4 GGUF of a chosen
 * size with the unit tests' builder (for speed measurements).
 * usage: make_test_model OUT.gguf D layers experts ffn vocab mat_type exp_type
 *   types: f32 | f16 | q8_0 | q4_K | q2_K | iq2_xxs; exp_type may be GATEUP/DOWN, e.g. iq2_xxs/q2_K (the q2
 *   recipe's experts); layers use the 0,0,4,128,4,128,... schedule
 *   optional 9th argument "flash": Flash's per-layer dims (64 heads x 512, q_lora 1024, 8 x 1024 output
 *   groups, 64 indexer heads, window 128), with D/layers/experts/ffn/vocab from the command line.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tests/unit/test_model_build.c"

static int type_of(const char *s) {
    if (!strcmp(s, "q8_0")) return DS4_TYPE_Q8_0;
    if (!strcmp(s, "q4_K")) return DS4_TYPE_Q4_K;
    if (!strcmp(s, "q2_K")) return DS4_TYPE_Q2_K;
    if (!strcmp(s, "iq2_xxs")) return DS4_TYPE_IQ2_XXS;
    if (!strcmp(s, "f16")) return DS4_TYPE_F16;
    return DS4_TYPE_F32;
}

int main(int argc, char **argv) {
    if (argc < 9) { fprintf(stderr, "usage: see source\n"); return 2; }
    tm_cfg c = tm_default();
    c.D = atoi(argv[2]);
    c.n_layer = atoi(argv[3]);
    c.E = atoi(argv[4]);
    c.K = c.E < 6 ? c.E : 6;
    c.F = atoi(argv[5]);
    c.V = atoi(argv[6]);
    c.type_mat = type_of(argv[7]);
    const char *slash = strchr(argv[8], '/');
    c.type_gate = c.type_down = type_of(argv[8]);
    if (slash) {
        char gate[32];
        snprintf(gate, sizeof gate, "%.*s", (int)(slash - argv[8]), argv[8]);
        c.type_gate = type_of(gate);
        c.type_down = type_of(slash + 1);
    }
    c.type_small = DS4_TYPE_F16;
    c.H = 16;
    c.dh = 512;
    c.G = 4;
    c.q_lora = 256;
    c.o_lora = 256;
    c.window = 128;
    c.IH = 16;
    c.topk = 64;
    if (argc > 9 && !strcmp(argv[9], "flash")) {
        c.H = 64;
        c.q_lora = 1024;
        c.G = 8;
        c.o_lora = 1024;
        c.IH = 64;
        c.topk = 16;
    }
    for (int i = 0; i < c.n_layer && i < 64; i++) c.ratios[i] = i < 2 ? 0 : (i % 2 ? 128 : 4);
    return tm_build(&c, argv[1]) ? 1 : 0;
}
