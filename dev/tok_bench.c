/* tok_bench.c - tokenizer throughput (and an id dump for debugging).
 *
 *   build/dev/tok_bench [--ids] [--rendered] [--reps N] TOKENIZER TEXT
 *
 * TOKENIZER is a GGUF with tokenizer keys (e.g. written by
 * `ds4-convert --vocab-only --tokenizer tokenizer.json -o tok.gguf`) or a
 * tokenizer.json (read with the converter's loader, V4 tokens added as the
 * converter does). Encodes the whole TEXT single-threaded N times (default
 * 5) and prints the best MB/s (MB = 1e6 bytes) and the token count; with
 * --ids prints the ids, space-separated, instead.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gguf.h"
#include "tokenizer.h"

/* dev harness: reuse the converter's tokenizer.json loader directly */
#include "../tools/convert/tokenizer_json.c"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return b;
}

static int load(const char *path, ds4_tokenizer **t, ds4_err *err) {
    size_t n = strlen(path);
    if (n > 5 && !strcmp(path + n - 5, ".json")) {
        ds4_tokjson tj;
        int rc = ds4_tokjson_load(&tj, path, DS4_CONVERT_V4_N_VOCAB, err);
        if (rc) return rc;
        rc = ds4_tokenizer_from_arrays(t, (const char *const *)tj.tokens, tj.token_lens,
                                       tj.n_tokens, (const char *const *)tj.merges,
                                       tj.merge_lens, tj.n_merges, err);
        ds4_tokjson_free(&tj);
        return rc;
    }
    ds4_gguf *g;
    int rc = ds4_gguf_open(&g, path, err);
    if (rc) return rc;
    rc = ds4_tokenizer_from_gguf(g, t, err);
    ds4_gguf_close(g);
    if (!rc && !*t) rc = ds4_err_set(err, DS4_E_MODEL, "%s has no tokenizer", path);
    return rc;
}

int main(int argc, char **argv) {
    int ids = 0, rendered = 0, reps = 5, a = 1;
    for (; a < argc && argv[a][0] == '-'; a++) {
        if (!strcmp(argv[a], "--ids")) ids = 1;
        else if (!strcmp(argv[a], "--rendered")) rendered = 1;
        else if (!strcmp(argv[a], "--reps") && a + 1 < argc) reps = atoi(argv[++a]);
        else break;
    }
    if (argc - a != 2) {
        fprintf(stderr, "usage: tok_bench [--ids] [--rendered] [--reps N] TOKENIZER TEXT\n");
        return 2;
    }
    ds4_err err = {0};
    ds4_tokenizer *t = NULL;
    double t0 = now_s();
    if (load(argv[a], &t, &err)) {
        fprintf(stderr, "tok_bench: %s\n", err.msg);
        return 1;
    }
    double t_load = now_s() - t0;
    size_t len;
    char *text = read_all(argv[a + 1], &len);
    if (!text) {
        fprintf(stderr, "tok_bench: cannot read %s\n", argv[a + 1]);
        return 1;
    }
    int n = ds4_tokenizer_encode(t, text, len, rendered, NULL, 0, &err);
    if (n < 0) {
        fprintf(stderr, "tok_bench: %s\n", err.msg);
        return 1;
    }
    int32_t *out = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    if (ids) {
        ds4_tokenizer_encode(t, text, len, rendered, out, n, &err);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", out[i]);
        printf("\n");
        return 0;
    }
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double s = now_s();
        ds4_tokenizer_encode(t, text, len, rendered, out, n, &err);
        double e = now_s() - s;
        if (e < best) best = e;
    }
    printf("load %.3f s; %zu bytes -> %d tokens; best of %d: %.4f s = %.2f MB/s\n", t_load, len, n,
           reps, best, len / best / 1e6);
    free(out);
    free(text);
    ds4_tokenizer_free(t);
    return 0;
}
