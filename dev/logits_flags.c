/* dev/logits_flags.c - dumps prefill logits with individual numerics
 * switches (debugging the release path against patched oracles).
 * usage: logits_flags MODEL.gguf TOKENS.txt OUT.f32 FP8 FP4 F16 ACTQ (0/1 each) [STATE.bin]
 */
#include <stdio.h>
#include <stdlib.h>

#include "ds4.h"
#include "ds4_debug.h"

int main(int argc, char **argv) {
    if (argc < 8) { fprintf(stderr, "usage: see source\n"); return 2; }
    ds4_engine_opts eo = {.model_path = argv[1], .backend = DS4_BACKEND_CPU, .n_threads = 1};
    ds4_engine *e;
    ds4_err err = {0};
    if (ds4_engine_open(&e, &eo, &err)) { fprintf(stderr, "%s\n", err.msg); return 1; }
    ds4_debug_numerics n = {atoi(argv[4]), atoi(argv[5]), atoi(argv[6]), atoi(argv[7])};
    ds4_debug_set_numerics(e, &n);
    FILE *f = fopen(argv[2], "r");
    int32_t ids[65536];
    int nt = 0;
    while (nt < 65536 && fscanf(f, "%d", &ids[nt]) == 1) nt++;
    fclose(f);
    ds4_session_opts so = {.n_ctx = nt, .prefill_chunk = 0};
    ds4_session *s;
    if (ds4_session_new(e, &so, &s, &err)) { fprintf(stderr, "%s\n", err.msg); return 1; }
    int V = ds4_engine_n_vocab(e);
    float *lg = malloc((size_t)nt * V * sizeof(float));
    if (ds4_session_extend(s, ids, nt, DS4_EVAL_PREFILL, 0, lg, &err)) { fprintf(stderr, "%s\n", err.msg); return 1; }
    f = fopen(argv[3], "wb");
    fwrite(lg, sizeof(float), (size_t)nt * V, f);
    fclose(f);
    if (argc > 8) {
        void *buf;
        size_t nb;
        ds4_session_save(s, &buf, &nb, &err);
        f = fopen(argv[8], "wb");
        fwrite(buf, 1, nb, f);
        fclose(f);
        free(buf);
    }
    ds4_session_free(s);
    ds4_engine_close(e);
    free(lg);
    return 0;
}
