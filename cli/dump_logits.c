/* dump_logits.c - `ds4 --prompt-tokens-file F --dump-logits OUT.f32`:
 * evaluates the token ids of F and writes the float32 logits after every
 * position (n_tokens x n_vocab, little-endian) to OUT.f32. --eval chooses
 * one batched prefill, token-by-token decode or prefill in chunks of N; the
 * three must agree (tests compare them). Exit 0 ok, 1 runtime error, 2 an
 * output path that is not a regular file.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "util/file.h"

int ds4_cli_dump_logits(const ds4_cli_opts *o) {
    if (!o->prompt_tokens_file) {
        fprintf(stderr, "ds4: --dump-logits needs --prompt-tokens-file F\n");
        return 2;
    }
    /* the output: a regular file or a new one (never a device or another
     * kind of file: the rename would replace it) */
    ds4_err pe = {0};
    if (ds4_output_path_ok(o->dump_logits, &pe)) {
        fprintf(stderr, "ds4: --dump-logits %s\n", pe.msg);
        return 2;
    }
    /* read before the model loads (a bad file fails at once); the range
     * is checked against the vocabulary once it is known */
    ds4_cli_toks toks = {0};
    if (ds4_cli_read_token_file(o->prompt_tokens_file, 0, &toks)) {
        free(toks.v);
        return 1;
    }
    int32_t *ids = toks.v;
    int n = toks.n;
    ds4_engine *e = ds4_cli_open_engine(o, false);
    if (!e) { free(ids); return 1; }
    int V = ds4_engine_n_vocab(e), rc = 1;
    for (int i = 0; i < n; i++)
        if (ids[i] >= V) {
            fprintf(stderr, "ds4: %s: token id %d is out of range (ids are 0..%d)\n",
                    o->prompt_tokens_file, ids[i], V - 1);
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
    /* replaced whole (ds4_out): a failed write leaves an earlier file as it was */
    ds4_out out;
    if (ds4_out_open(&out, o->dump_logits, "wb", &err) ||
        (fwrite(logits, sizeof(float), (size_t)n * V, out.f), ds4_out_commit(&out, &err))) {
        fprintf(stderr, "ds4: --dump-logits: %s\n", err.msg);
        goto out_logits;
    }
    /* --dump-greedy N: N greedy decode steps after the prompt (argmax on the
     * backend, one token per step), ids printed on one stdout line */
    if (ng > 0 && ds4_engine_has_mtp(e)) {
        /* the same continuation through speculative cycles (greedy) */
        ds4_spec_opts sop = {.n_draft = o->mtp_draft, .gate = o->mtp_gate};
        ds4_sampler_params sp = ds4_sampler_defaults();
        sp.temperature = 0;
        ds4_rng rng;
        ds4_rng_seed(&rng, 1);
        int32_t next;
        if (ds4_session_spec_enable(s, &sop, &err) != 0 || ds4_session_rewind(s, 0, &err) != 0 ||
            ds4_session_extend(s, ids, n, o->eval_mode, o->eval_chunk, NULL, &err) != 0 ||
            ds4_session_argmax(s, &next, &err) != 0) {
            fprintf(stderr, "ds4: %s\n", err.msg);
            goto out_logits;
        }
        printf("greedy:");
        for (int i = 0; i < ng;) {
            int32_t out[8];
            int no = 0;
            if (ds4_session_spec_step(s, next, ng - i, &sp, &rng, out, &no, &next, &err) != 0) {
                fprintf(stderr, "ds4: %s\n", err.msg);
                goto out_logits;
            }
            for (int k = 0; k < no; k++) printf(" %d", out[k]);
            i += no;
        }
        printf("\n");
        ds4_spec_stats st;
        ds4_session_spec_stats(s, &st);
        fprintf(stderr, "ds4: mtp: cycles %lld, tokens %lld, drafts %lld, accepted %lld, gated %lld\n",
                (long long)st.cycles, (long long)st.tokens, (long long)st.drafted, (long long)st.accepted,
                (long long)st.gated);
    } else if (ng > 0) {
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
