/* dev/fwd_bench.c - CPU prefill and decode tok/s of a model through ds4.h.
 * usage: fwd_bench MODEL.gguf [n_prefill=128] [n_decode=32] [threads=0] [plain=0]
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "ds4.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: fwd_bench MODEL.gguf [n_prefill] [n_decode] [threads] [plain]\n"); return 2; }
    int np = argc > 2 ? atoi(argv[2]) : 128, nd = argc > 3 ? atoi(argv[3]) : 32;
    ds4_engine_opts eo = {.model_path = argv[1], .backend = DS4_BACKEND_CPU,
                          .n_threads = argc > 4 ? atoi(argv[4]) : 0, .plain_numerics = argc > 5 && atoi(argv[5])};
    ds4_engine *e;
    ds4_err err = {0};
    if (ds4_engine_open(&e, &eo, &err)) { fprintf(stderr, "%s\n", err.msg); return 1; }
    int V = ds4_engine_n_vocab(e);
    int32_t *ids = malloc((size_t)(np + nd) * sizeof(int32_t));
    for (int i = 0; i < np + nd; i++) ids[i] = (int32_t)((i * 2654435761u) % (unsigned)V);
    ds4_session_opts so = {.n_ctx = np + nd, .prefill_chunk = 0};
    ds4_session *s;
    if (ds4_session_new(e, &so, &s, &err)) { fprintf(stderr, "%s\n", err.msg); return 1; }
    double t0 = now();
    if (ds4_session_extend(s, ids, np, DS4_EVAL_PREFILL, 0, NULL, &err)) { fprintf(stderr, "%s\n", err.msg); return 1; }
    double t1 = now();
    for (int i = 0; i < nd; i++)
        if (ds4_session_eval(s, ids[np + i], &err)) { fprintf(stderr, "%s\n", err.msg); return 1; }
    double t2 = now();
    printf("%s\nprefill %d tokens: %.1f tok/s; decode %d tokens: %.1f tok/s\n", ds4_engine_describe(e), np,
           np / (t1 - t0), nd, nd / (t2 - t1));
    ds4_session_free(s);
    ds4_engine_close(e);
    free(ids);
    return 0;
}
