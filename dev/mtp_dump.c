/* dev/mtp_dump.c - the MTP block on its own, for tests of MODEL.md C.12
 * (tests/py/test_mtp.py compares it with a float64 NumPy reference).
 * usage: mtp_dump MODEL.gguf MTP.gguf TOKENS.txt OUT.f32 [plain=1]
 * Evaluates the ids of TOKENS.txt one at a time on the CPU, recording the
 * main model's final HC state h_i after each; then runs the MTP block, in a
 * fresh window, on the pairs (h_i, t_{i+1}) for i = 0..n-2 in order. OUT
 * holds, per pair, float32: h_i (n_hc x n_embd), the MTP logits (n_vocab),
 * the MTP output state (n_hc x n_embd).
 */
#include <stdio.h>
#include <stdlib.h>

#include "ds4.h"
#include "ds4_debug.h"

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: mtp_dump MODEL.gguf MTP.gguf TOKENS.txt OUT.f32 [plain=1]\n");
        return 2;
    }
    int32_t ids[4096];
    int n = 0;
    FILE *tf = fopen(argv[3], "r");
    if (!tf) { perror(argv[3]); return 1; }
    while (n < 4096 && fscanf(tf, "%d", &ids[n]) == 1) n++;
    fclose(tf);
    if (n < 2) { fprintf(stderr, "mtp_dump: need at least 2 token ids\n"); return 1; }
    ds4_engine_opts eo = {.model_path = argv[1], .mtp_path = argv[2], .backend = DS4_BACKEND_CPU, .n_threads = 1,
                          .plain_numerics = argc < 6 || atoi(argv[5])};
    ds4_engine *e = NULL;
    ds4_err err = {0};
    if (ds4_engine_open(&e, &eo, &err)) { fprintf(stderr, "mtp_dump: %s\n", err.msg); return 1; }
    const int V = ds4_engine_n_vocab(e);
    const size_t nf = ds4_debug_state_floats(e);
    ds4_session *s = NULL, *m = NULL;
    ds4_session_opts so = {.n_ctx = n + 1};
    ds4_spec_opts sp = {.n_draft = 1, .gate = 0};
    float *hc = malloc((size_t)n * nf * sizeof(float)), *lg = malloc((size_t)n * V * sizeof(float));
    float *oh = malloc((size_t)n * nf * sizeof(float));
    int rc = !hc || !lg || !oh;
    if (!rc) rc = ds4_session_new(e, &so, &s, &err) || ds4_session_new(e, &so, &m, &err) ||
                  ds4_session_spec_enable(m, &sp, &err);
    for (int i = 0; !rc && i < n; i++)
        rc = ds4_session_extend(s, &ids[i], 1, DS4_EVAL_DECODE, 1, NULL, &err) ||
             ds4_debug_session_state(s, hc + (size_t)i * nf, &err);
    if (!rc) rc = ds4_debug_mtp_eval(m, hc, ids + 1, n - 1, lg, oh, &err);
    if (rc) fprintf(stderr, "mtp_dump: %s\n", err.msg[0] ? err.msg : "out of memory");
    FILE *f = rc ? NULL : fopen(argv[4], "wb");
    if (!rc && !f) { perror(argv[4]); rc = 1; }
    for (int i = 0; f && i < n - 1; i++) {
        fwrite(hc + (size_t)i * nf, sizeof(float), nf, f);
        fwrite(lg + (size_t)i * V, sizeof(float), (size_t)V, f);
        fwrite(oh + (size_t)i * nf, sizeof(float), nf, f);
    }
    if (f && fclose(f)) rc = 1;
    free(hc);
    free(lg);
    free(oh);
    ds4_session_free(m);
    ds4_session_free(s);
    ds4_engine_close(e);
    return rc ? 1 : 0;
}
