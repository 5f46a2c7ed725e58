/* logprobs.c - --dump-logprobs (docs/SERVING.md A.6) and --perplexity-file (A.7).
 *
 * --dump-logprobs: the one-shot prompt, prefilled, then greedy steps; each
 * step records the argmax and the top-k log-probabilities (docs/TEXT.md D.5)
 * in the exact JSON layout of A.6 (fixed whitespace, %.9g numbers, the
 * string escaping rules below). Sampling flags are ignored.
 * --perplexity-file: teacher-forced scoring of raw text (plain BPE, no BOS).
 */
#include "cli.h"
#include "util/file.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Strict UTF-8 validity (no overlongs, no surrogates, <= U+10FFFF). */
static bool utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) { i++; continue; }
        else if (c >= 0xC2 && c <= 0xDF) { k = 1; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { k = 2; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { k = 3; cp = c & 0x07; }
        else return false;
        if (n - i < k + 1) return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) || cp > 0x10FFFF ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += k + 1;
    }
    return true;
}

/* A.6 string: escape " \ \n \r \t, other bytes < 0x20 as \u00XX; when the
 * bytes are not valid UTF-8, every byte >= 0x80 as \u00XX too. */
static void json_str(FILE *f, const unsigned char *s, size_t n) {
    bool valid = utf8_valid(s, n);
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '"') fputs("\\\"", f);
        else if (c == '\\') fputs("\\\\", f);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c < 0x20 || (c >= 0x80 && !valid)) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

/* {"id":N,"text":"...","bytes":[...]} */
static void json_token(FILE *f, const ds4_engine *e, int32_t id) {
    size_t n = 0;
    const char *b = ds4_token_bytes(e, id, &n);
    if (!b) n = 0;
    fprintf(f, "{\"id\":%d,\"text\":", id);
    json_str(f, (const unsigned char *)(b ? b : ""), n);
    fputs(",\"bytes\":[", f);
    for (size_t i = 0; i < n; i++) fprintf(f, i ? ",%u" : "%u", (unsigned char)b[i]);
    fputs("]}", f);
}

int ds4_cli_dump_logprobs(const ds4_cli_opts *o) {
    ds4_engine *e = NULL;
    ds4_session *s = NULL;
    /* the output: a regular file or a new one, replaced whole through a
     * temporary file (ds4_out) when the run ends: a failed run leaves an
     * earlier file as it was; one cut short by a signal during generation
     * commits what it has, well-formed */
    ds4_err pe = {0};
    if (ds4_output_path_ok(o->dump_logprobs, &pe)) {
        fprintf(stderr, "ds4: --dump-logprobs %s\n", pe.msg);
        return 2;
    }
    ds4_think mode = ds4_cli_think_mode(o->think, o->n_ctx, true);
    if (ds4_cli_open_session(o, o->n_ctx, &e, &s)) return 1;
    int status = 1, k = o->logprobs_top_k;
    ds4_cli_toks prompt = {0};
    ds4_sampler *smp = NULL;
    ds4_out out = {0};
    FILE *f = NULL;
    int32_t *ids = malloc((size_t)k * sizeof *ids);
    double *lps = malloc((size_t)k * sizeof *lps);
    bool reasoning;
    ds4_err err = {0};
    if (!ids || !lps) { fprintf(stderr, "ds4: out of memory\n"); goto out; }
    if (ds4_cli_build_prompt(e, o, mode, &prompt, &reasoning)) goto out;
    if (prompt.n >= o->n_ctx) {
        fprintf(stderr, "ds4: the prompt has %d tokens; the context holds %d (use --ctx)\n",
                prompt.n, o->n_ctx);
        goto out;
    }
    smp = ds4_sampler_new(ds4_engine_n_vocab(e), &err);
    if (!smp) { fprintf(stderr, "ds4: %s\n", err.msg); goto out; }
    if (ds4_out_open(&out, o->dump_logprobs, "w", &err)) {
        fprintf(stderr, "ds4: --dump-logprobs: %s\n", err.msg);
        goto out;
    }
    f = out.f;
    ds4_cli_install_stop_signals();
    ds4_sync_info info = {0};
    double prefill_s;
    if (ds4_cli_prefill(s, &prompt, &info, &prefill_s)) {
        if (ds4_cli_interrupted) status = ds4_cli_signal_status();
        goto out;
    }
    /* as one-shot generation: the last step's token is not evaluated, so ctx - prompt steps fit */
    int steps = o->n_predict;
    const bool ctx_cut = steps > o->n_ctx - prompt.n;
    if (ctx_cut) steps = o->n_ctx - prompt.n;
    int32_t eos = ds4_token_special(e, DS4_TOK_EOS);
    int n_vocab = ds4_engine_n_vocab(e);
    fprintf(f, "{\n  \"source\":\"ds4\",\n  \"prompt_tokens\":%d,\n  \"ctx\":%d,\n  \"top_k\":%d,\n"
               "  \"steps\":[\n", prompt.n, o->n_ctx, k);
    double t0 = ds4_cli_now();
    int done = 0;
    for (int step = 0; step < steps; step++) {
        if (ds4_cli_interrupted) { fprintf(stderr, "ds4: interrupted\n"); break; }
        ds4_err le = {0};
        const float *logits = ds4_session_logits_err(s, &le);
        if (!logits) { fprintf(stderr, "ds4: %s\n", le.msg); goto out; }
        int nt = ds4_sampler_logprobs(smp, logits, k, ids, lps, NULL);
        if (nt < 0) { fprintf(stderr, "ds4: logprobs failed\n"); goto out; }
        int32_t sel = ds4_argmax(logits, n_vocab);
        fprintf(f, "%s    {\"step\":%d,\"selected\":", step ? ",\n" : "", step);
        json_token(f, e, sel);
        fputs(",\"top_logprobs\":[", f);
        for (int j = 0; j < nt; j++) {
            fputs(j ? ",{\"token\":" : "{\"token\":", f);
            json_token(f, e, ids[j]);
            fprintf(f, ",\"logit\":%.9g,\"logprob\":%.9g}", (double)logits[ids[j]], lps[j]);
        }
        fputs("]}", f);
        done++;
        if (sel == eos) break;
        if (step + 1 < steps && ds4_session_eval(s, sel, &err) != 0) {
            fprintf(stderr, "ds4: decode failed: %s\n", err.msg);
            goto out;
        }
    }
    fprintf(f, "%s  ]\n}\n", done ? "\n" : "");
    f = NULL;
    if (ds4_out_commit(&out, &err)) {
        fprintf(stderr, "ds4: --dump-logprobs: %s\n", err.msg);
        goto out;
    }
    double dt = ds4_cli_now() - t0;
    fprintf(stderr, "ds4: wrote %d steps to %s\n", done, o->dump_logprobs);
    if (ctx_cut && done == steps) fprintf(stderr, "ds4: stopped at the context size (--ctx %d)\n", o->n_ctx);
    fprintf(stderr, "ds4: prefill: %.2f t/s, generation: %.2f t/s\n",
            prefill_s > 0 ? info.n_evaluated / prefill_s : 0.0, dt > 0 ? done / dt : 0.0);
    /* cut short by a signal: the file is well-formed but shorter; the shell's status says so */
    status = ds4_cli_interrupted ? ds4_cli_signal_status() : 0;
out:
    ds4_out_abort(&out); /* (nothing left after a commit) */
    free(ids);
    free(lps);
    if (smp) ds4_sampler_free(smp);
    ds4_cli_toks_free(&prompt);
    if (s) ds4_session_free(s);
    if (e) ds4_engine_close(e);
    return status;
}

/* ---- perplexity ---------------------------------------------------------------- */

#define PPL_CONTEXT 32 /* tokens prefilled before scoring starts (A.7) */
#define PPL_CHUNK 64   /* tokens per batched evaluation while scoring */

int ds4_cli_perplexity(const ds4_cli_opts *o) {
    if (o->prompt || o->prompt_file || o->prompt_tokens_file) {
        fprintf(stderr, "ds4: --perplexity-file cannot be combined with a prompt\n");
        return 2;
    }
    size_t len;
    char *text = ds4_cli_read_file(o->perplexity_file, &len);
    if (!text) return 1;
    ds4_engine *e = NULL;
    ds4_session *s = NULL;
    if (ds4_cli_open_session(o, o->n_ctx, &e, &s)) { free(text); return 1; }
    int status = 1, n_vocab = ds4_engine_n_vocab(e);
    ds4_err err = {0};
    ds4_sampler *smp = NULL;
    float *all = NULL;
    double *lp = NULL;
    int32_t *tok = malloc((len + 16) * sizeof *tok);
    if (!tok) { fprintf(stderr, "ds4: out of memory\n"); goto out; }
    int T = ds4_tokenize(e, text, len, false, tok, (int)(len + 16), &err);
    if (T < 0) { fprintf(stderr, "ds4: tokenizer: %s\n", err.msg); goto out; }
    if (T <= PPL_CONTEXT) {
        fprintf(stderr, "ds4: %s has %d tokens; perplexity needs more than %d\n", o->perplexity_file,
                T, PPL_CONTEXT);
        goto out;
    }
    if (o->n_ctx <= PPL_CONTEXT + 1) {
        fprintf(stderr, "ds4: --ctx must be more than %d for perplexity\n", PPL_CONTEXT + 1);
        goto out;
    }
    int S = T - PPL_CONTEXT;
    if (S > o->n_predict) S = o->n_predict;
    if (S > o->n_ctx - PPL_CONTEXT) S = o->n_ctx - PPL_CONTEXT;
    if (S < 1) {
        fprintf(stderr, "ds4: nothing to score (-n is 0)\n");
        goto out;
    }
    smp = ds4_sampler_new(n_vocab, &err);
    all = malloc((size_t)PPL_CHUNK * (size_t)n_vocab * sizeof *all);
    lp = malloc((size_t)n_vocab * sizeof *lp);
    if (!smp || !all || !lp) { fprintf(stderr, "ds4: out of memory\n"); goto out; }
    ds4_cli_install_stop_signals();
    ds4_cli_toks ctx0 = {tok, PPL_CONTEXT, PPL_CONTEXT};
    ds4_sync_info info;
    double secs;
    if (ds4_cli_prefill(s, &ctx0, &info, &secs)) {
        if (ds4_cli_interrupted) status = ds4_cli_signal_status();
        goto out;
    }
    double nll = 0;
    int scored = 0;
    /* Score token PPL_CONTEXT from the prefill logits, then evaluate tokens in
     * chunks; the logits after token i score token i + 1. */
    ds4_err le = {0};
    const float *l0 = ds4_session_logits_err(s, &le);
    if (!l0) { fprintf(stderr, "ds4: %s\n", le.msg); goto out; }
    ds4_sampler_logprobs(smp, l0, 0, NULL, NULL, lp);
    nll -= lp[tok[PPL_CONTEXT]];
    scored = 1;
    double t0 = ds4_cli_now();
    while (scored < S) {
        if (ds4_cli_interrupted) {
            fprintf(stderr, "ds4: interrupted\n");
            status = ds4_cli_signal_status();
            goto out;
        }
        int first = PPL_CONTEXT + scored - 1; /* next token to evaluate */
        int n = S - scored < PPL_CHUNK ? S - scored : PPL_CHUNK;
        if (ds4_session_extend(s, tok + first, n, DS4_EVAL_PREFILL, 0, all, &err) != 0) {
            fprintf(stderr, "ds4: evaluation failed: %s\n", err.msg);
            goto out;
        }
        for (int j = 0; j < n; j++) {
            ds4_sampler_logprobs(smp, all + (size_t)j * n_vocab, 0, NULL, NULL, lp);
            nll -= lp[tok[first + j + 1]];
        }
        scored += n;
        fprintf(stderr, "perplexity: scored %d/%d tokens (%.1f t/s)\n", scored, S,
                (scored - 1) / (ds4_cli_now() - t0 + 1e-9));
    }
    double avg = nll / scored;
    printf("tokens=%d scored=%d nll=%.9f avg_nll=%.9f ppl=%.9f\n", T, scored, nll, avg, exp(avg));
    status = 0;
out:
    free(all);
    free(lp);
    if (smp) ds4_sampler_free(smp);
    free(tok);
    free(text);
    if (s) ds4_session_free(s);
    if (e) ds4_engine_close(e);
    return status;
}
