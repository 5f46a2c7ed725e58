/* dump_logits.c - `ds4 --prompt-tokens-file F --dump-logits OUT.f32`:
 * evaluates the token ids of F and writes the float32 logits after every
 * position (n_tokens x n_vocab, little-endian) to OUT.f32. --eval chooses
 * one batched prefill, token-by-token decode or prefill in chunks of N; the
 * three must agree (tests compare them). Exit 0 ok, 1 runtime error.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* Parses whitespace-separated decimal ids; returns the count or -1. */
static int parse_ids(const char *path, const char *text, int32_t **out) {
    size_t cap = 256;
    int n = 0;
    int32_t *ids = malloc(cap * sizeof(int32_t));
    if (!ids) return -1;
    const char *p = text;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 0x7fffffffL ||
            (*end && *end != ' ' && *end != '\t' && *end != '\n' && *end != '\r')) {
            int len = 0;
            while (p[len] && p[len] != ' ' && p[len] != '\n' && len < 32) len++;
            fprintf(stderr, "ds4: %s: '%.*s' is not a token id (expected whitespace-separated integers >= 0)\n",
                    path, len, p);
            free(ids);
            return -1;
        }
        if ((size_t)n == cap) {
            int32_t *nb = realloc(ids, cap * 2 * sizeof(int32_t));
            if (!nb) { free(ids); return -1; }
            ids = nb;
            cap *= 2;
        }
        ids[n++] = (int32_t)v;
        p = end;
    }
    *out = ids;
    return n;
}

int ds4_cli_dump_logits(const ds4_cli_opts *o) {
    if (!o->prompt_tokens_file) {
        fprintf(stderr, "ds4: --dump-logits needs --prompt-tokens-file F\n");
        return 1;
    }
    size_t len;
    char *text = ds4_cli_read_file(o->prompt_tokens_file, &len);
    if (!text) return 1;
    int32_t *ids = NULL;
    int n = parse_ids(o->prompt_tokens_file, text, &ids);
    free(text);
    if (n < 0) return 1;
    if (n == 0) {
        fprintf(stderr, "ds4: %s holds no token ids\n", o->prompt_tokens_file);
        free(ids);
        return 1;
    }
    ds4_engine *e = ds4_cli_open_engine(o, false);
    if (!e) { free(ids); return 1; }
    int V = ds4_engine_n_vocab(e), rc = 1;
    for (int i = 0; i < n; i++)
        if (ids[i] >= V) {
            fprintf(stderr, "ds4: %s: token id %d at index %d is out of range (vocab %d)\n",
                    o->prompt_tokens_file, ids[i], i, V);
            goto out_engine;
        }
    const int ng = o->dump_greedy;
    ds4_session_opts so = {.n_ctx = n + ng > o->n_ctx ? n + ng : o->n_ctx, .prefill_chunk = 0};
    if (so.n_ctx > n + ng && so.n_ctx > 4096) so.n_ctx = n + ng; /* size the state to the prompt */
    if (o->eval_mode == DS4_EVAL_CHUNKED && o->eval_chunk > 0) so.prefill_chunk = o->eval_chunk;
    ds4_session *s = NULL;
    ds4_err err = {0};
    if (ds4_session_new(e, &so, &s, &err) != 0) {
        fprintf(stderr, "ds4: %s\n", err.msg);
        goto out_engine;
    }
    float *logits = malloc((size_t)n * (size_t)V * sizeof(float));
    if (!logits) {
        fprintf(stderr, "ds4: out of memory for %d x %d logits\n", n, V);
        goto out_session;
    }
    if (ds4_session_extend(s, ids, n, o->eval_mode, o->eval_chunk, logits, &err) != 0) {
        fprintf(stderr, "ds4: %s\n", err.msg);
        goto out_logits;
    }
    FILE *f = fopen(o->dump_logits, "wb");
    if (!f) {
        fprintf(stderr, "ds4: cannot open %s: %s\n", o->dump_logits, strerror(errno));
        goto out_logits;
    }
    size_t w = fwrite(logits, sizeof(float), (size_t)n * V, f);
    if (fclose(f) != 0 || w != (size_t)n * V) {
        fprintf(stderr, "ds4: cannot write %s\n", o->dump_logits);
        goto out_logits;
    }
    /* --dump-greedy N: N greedy decode steps after the prompt (argmax on the
     * backend, one token per step), ids printed on one stdout line */
    if (ng > 0) {
        printf("greedy:");
        for (int i = 0; i < ng; i++) {
            int32_t id;
            if (ds4_session_argmax(s, &id, &err) != 0 || (i + 1 < ng && ds4_session_eval(s, id, &err) != 0)) {
                fprintf(stderr, "ds4: %s\n", err.msg);
                goto out_logits;
            }
            printf(" %d", id);
        }
        printf("\n");
    }
    rc = 0;
out_logits:
    free(logits);
out_session:
    ds4_session_free(s);
out_engine:
    ds4_engine_close(e);
    free(ids);
    return rc;
}
