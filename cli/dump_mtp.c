/* dump_mtp.c - `ds4 --mtp FILE --prompt-tokens-file F --dump-mtp OUT.f32`
 * (diagnostic, for tests of MODEL.md C.12): evaluates the ids of F one at
 * a time and records the main model's final HC state h_i after each; then
 * runs the MTP block, in a fresh window, on the pairs (h_i, t_{i+1}) for
 * i = 0..n-2 in order. OUT holds, per pair, float32 little-endian: h_i
 * (n_hc x n_embd), the MTP logits (n_vocab), the MTP output state
 * (n_hc x n_embd). Exit 0 ok, 1 runtime error.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "ds4_debug.h"

int ds4_cli_dump_mtp(const ds4_cli_opts *o) {
    if (!o->prompt_tokens_file || !o->mtp_path) {
        fprintf(stderr, "ds4: --dump-mtp needs --mtp FILE and --prompt-tokens-file F\n");
        return 1;
    }
    ds4_cli_toks toks = {0};
    if (ds4_cli_read_token_file(o->prompt_tokens_file, 0, &toks)) {
        free(toks.v);
        return 1;
    }
    int n = toks.n, rc = 1;
    if (n < 2) {
        fprintf(stderr, "ds4: --dump-mtp needs at least 2 tokens\n");
        free(toks.v);
        return 1;
    }
    ds4_engine *e = ds4_cli_open_engine(o, false);
    if (!e) {
        free(toks.v);
        return 1;
    }
    const int V = ds4_engine_n_vocab(e);
    ds4_session *s = NULL, *m = NULL;
    float *hc = NULL, *lg = NULL, *oh = NULL;
    FILE *f = NULL;
    ds4_err err = {0};
    for (int i = 0; i < n; i++)
        if (toks.v[i] >= V) {
            fprintf(stderr, "ds4: token id %d is out of range (ids are 0..%d)\n", toks.v[i], V - 1);
            goto out;
        }
    ds4_session_opts so = {.n_ctx = n + 1};
    ds4_spec_opts sp = {.n_draft = 1, .gate = 0};
    if (ds4_session_new(e, &so, &s, &err) || ds4_session_new(e, &so, &m, &err) ||
        ds4_session_spec_enable(m, &sp, &err)) {
        fprintf(stderr, "ds4: %s\n", err.msg);
        goto out;
    }
    const size_t nf = ds4_debug_state_floats(e);
    if (!nf) {
        fprintf(stderr, "ds4: cannot read the model's state size\n");
        goto out;
    }
    hc = malloc((size_t)n * nf * sizeof(float));
    lg = malloc((size_t)n * V * sizeof(float));
    oh = malloc((size_t)n * nf * sizeof(float));
    if (!hc || !lg || !oh) {
        fprintf(stderr, "ds4: out of memory\n");
        goto out;
    }
    for (int i = 0; i < n; i++)
        if (ds4_session_extend(s, &toks.v[i], 1, DS4_EVAL_DECODE, 1, NULL, &err) ||
            ds4_debug_session_state(s, hc + (size_t)i * nf, &err)) {
            fprintf(stderr, "ds4: %s\n", err.msg);
            goto out;
        }
    if (ds4_debug_mtp_eval(m, hc, toks.v + 1, n - 1, lg, oh, &err)) {
        fprintf(stderr, "ds4: %s\n", err.msg);
        goto out;
    }
    f = fopen(o->dump_mtp, "wb");
    if (!f) {
        fprintf(stderr, "ds4: cannot open %s: %s\n", o->dump_mtp, strerror(errno));
        goto out;
    }
    bool ok = true;
    for (int i = 0; i < n - 1 && ok; i++)
        ok = fwrite(hc + (size_t)i * nf, sizeof(float), nf, f) == nf &&
             fwrite(lg + (size_t)i * V, sizeof(float), (size_t)V, f) == (size_t)V &&
             fwrite(oh + (size_t)i * nf, sizeof(float), nf, f) == nf;
    if (fclose(f) != 0 || !ok) {
        fprintf(stderr, "ds4: cannot write %s\n", o->dump_mtp);
        goto out;
    }
    rc = 0;
out:
    free(hc);
    free(lg);
    free(oh);
    ds4_session_free(m);
    ds4_session_free(s);
    ds4_engine_close(e);
    free(toks.v);
    return rc;
}
