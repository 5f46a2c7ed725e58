/* generate.c - one-shot generation (docs/SERVING.md A.3) and the helpers every
 * generating mode shares: Ctrl+C handling, prompt segments -> tokens, the
 * prefill progress display, and the streaming printer.
 *
 * Output contract: generated text goes to stdout only (UTF-8-safe, think
 * markers removed); progress, statistics and errors go to stderr. The final
 * stderr lines are
 *   ds4: tokens: prompt P (reused R, evaluated E), generated G
 *   ds4: prefill: X t/s, generation: Y t/s
 * (the first one is ours: tests read it to see how much was evaluated).
 */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

volatile sig_atomic_t ds4_cli_interrupted = 0;

static void on_sigint(int sig) {
    if (ds4_cli_interrupted) {
        /* A second Ctrl+C while the first is still pending: give up. */
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    ds4_cli_interrupted = sig;
}

static void install(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: a blocking read returns EINTR */
    sigaction(sig, &sa, NULL);
}

void ds4_cli_install_sigint(void) { install(SIGINT); }

int ds4_cli_signal_status(void) { return 128 + (ds4_cli_interrupted ? (int)ds4_cli_interrupted : SIGINT); }

void ds4_cli_install_stop_signals(void) {
    install(SIGINT);
    install(SIGTERM);
}

double ds4_cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- token lists ------------------------------------------------------------ */

int ds4_cli_toks_push(ds4_cli_toks *t, const int32_t *ids, int n) {
    if (n <= 0) return 0;
    if (t->n + n > t->cap) {
        int cap = t->cap ? t->cap : 256;
        while (cap < t->n + n) cap *= 2;
        int32_t *v = realloc(t->v, (size_t)cap * sizeof *v);
        if (!v) return DS4_E_NOMEM;
        t->v = v;
        t->cap = cap;
    }
    memcpy(t->v + t->n, ids, (size_t)n * sizeof *ids);
    t->n += n;
    return 0;
}

void ds4_cli_toks_free(ds4_cli_toks *t) {
    free(t->v);
    memset(t, 0, sizeof *t);
}

/* Tokenizes text into out (growing it); rendered per ds4_tokenize. */
static int tokenize_append(ds4_engine *e, const char *text, size_t len, bool rendered,
                           ds4_cli_toks *out, int *n_added) {
    ds4_err err = {0};
    int cap = (int)(len < 64 ? 64 : len + 16); /* BPE never yields more ids than bytes */
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "ds4: out of memory tokenizing %zu bytes\n", len);
        return -1;
    }
    int n = ds4_tokenize(e, text, len, rendered, ids, cap, &err);
    if (n > cap) { /* not expected; retry with the reported size */
        int32_t *b = realloc(ids, (size_t)n * sizeof *ids);
        if (!b) { free(ids); fprintf(stderr, "ds4: out of memory\n"); return -1; }
        ids = b;
        n = ds4_tokenize(e, text, len, rendered, ids, n, &err);
    }
    if (n < 0) {
        fprintf(stderr, "ds4: tokenizer: %s\n", err.msg);
        free(ids);
        return -1;
    }
    int rc = ds4_cli_toks_push(out, ids, n);
    free(ids);
    if (rc) {
        fprintf(stderr, "ds4: out of memory\n");
        return -1;
    }
    if (n_added) *n_added = n;
    return 0;
}

int ds4_cli_tokenize_segs(ds4_engine *e, const ds4_segs *segs, ds4_cli_toks *out) {
    if (!ds4_has_tokenizer(e)) {
        fprintf(stderr, "ds4: the model has no tokenizer; give token ids with --prompt-tokens-file\n");
        return -1;
    }
    for (int i = 0; i < segs->n; i++) {
        const ds4_seg *s = &segs->v[i];
        int added = 0;
        if (tokenize_append(e, s->text, s->len, s->kind != DS4_SEG_PLAIN, out, &added)) return -1;
        if (s->kind == DS4_SEG_SPECIAL && added != 1) {
            fprintf(stderr, "ds4: the model's vocabulary lacks the marker '%s'\n", s->text);
            return -1;
        }
    }
    return 0;
}

/* ---- progress ------------------------------------------------------------------ */

void ds4_cli_progress_init(ds4_cli_progress *p) {
    p->tty = isatty(STDERR_FILENO);
    p->t0 = ds4_cli_now();
    p->last_pct = -1;
}

int ds4_cli_progress_cb(void *user, const char *what, int64_t done, int64_t total) {
    ds4_cli_progress *p = user;
    (void)what;
    if (total <= 0) return ds4_cli_interrupted;
    int pct = (int)(100 * done / total);
    if (p->tty) {
        /* Redraw the bar in place when the percentage moves. */
        if (pct != p->last_pct || done == total) {
            enum { W = 30 };
            int fill = (int)(W * done / total);
            char bar[W + 1];
            for (int i = 0; i < W; i++) bar[i] = i < fill ? '#' : '.';
            bar[W] = '\0';
            double dt = ds4_cli_now() - p->t0;
            fprintf(stderr, "\rprefill [%s] %3d%% %lld/%lld tokens  %.1f t/s  ", bar, pct,
                    (long long)done, (long long)total, dt > 0 ? (double)done / dt : 0.0);
            fflush(stderr);
            p->last_pct = pct;
        }
    } else {
        /* Plain lines (logs, pipes): at most one per 10%, and the last one. */
        int decile = done == total ? 10 : pct / 10;
        if (decile > p->last_pct) {
            fprintf(stderr, "processing %lld input tokens: %lld/%lld (%d%%)\n", (long long)total,
                    (long long)done, (long long)total, pct);
            p->last_pct = decile;
        }
    }
    return ds4_cli_interrupted;
}

void ds4_cli_progress_end(ds4_cli_progress *p) {
    if (p->tty && p->last_pct >= 0) fputc('\n', stderr);
    p->last_pct = -1;
}

/* ---- printer ------------------------------------------------------------------- */

#define GREY "\x1b[90m"
#define RESET "\x1b[0m"

void ds4_cli_printer_init(ds4_cli_printer *p, const ds4_engine *e, FILE *out, bool reasoning) {
    memset(p, 0, sizeof *p);
    p->out = out;
    p->e = e;
    ds4_detok_open(e, &p->detok, NULL); /* NULL without a tokenizer: ids have no text */
    p->color = isatty(fileno(out));
    p->think_open = ds4_token_special(e, DS4_TOK_THINK_OPEN);
    p->think_close = ds4_token_special(e, DS4_TOK_THINK_CLOSE);
    p->last_byte = -1;
    p->in_reasoning = reasoning;
    if (reasoning && p->color) { fputs(GREY, out); p->grey = true; }
}

static void emit(ds4_cli_printer *p, const void *b, size_t n) {
    if (!n) return;
    fwrite(b, 1, n, p->out);
    p->last_byte = ((const unsigned char *)b)[n - 1];
}

void ds4_cli_printer_token(ds4_cli_printer *p, int32_t id) {
    size_t len = 0;
    const char *b;
    if (id == p->think_open && id >= 0) {
        if (!p->in_reasoning && p->color) { fputs(GREY, p->out); p->grey = true; }
        p->in_reasoning = true;
        return;
    }
    if (id == p->think_close && id >= 0) {
        if (p->detok && (b = ds4_detok_flush(p->detok, &len))) emit(p, b, len);
        if (p->in_reasoning) {
            if (p->grey) fputs(RESET, p->out);
            p->grey = false;
            if (p->last_byte >= 0 && p->last_byte != '\n') emit(p, "\n", 1);
        }
        p->in_reasoning = false;
        fflush(p->out);
        return;
    }
    if (!p->detok) {
        /* no tokenizer: the ids, in --prompt-tokens-file's format (whitespace-separated decimal) */
        char t[16];
        int n = snprintf(t, sizeof t, "%s%d", p->last_byte >= 0 && p->last_byte != '\n' ? " " : "", id);
        emit(p, t, (size_t)n);
        fflush(p->out);
        return;
    }
    /* other control tokens are markup, not text (TEXT A.7): nothing shown,
     * as the server's replies (the transcript keeps them) */
    if (p->e && ds4_token_is_control(p->e, id)) return;
    b = ds4_detok_push(p->detok, id, &len);
    emit(p, b, len);
    fflush(p->out);
}

void ds4_cli_printer_finish(ds4_cli_printer *p) {
    size_t len = 0;
    const char *b = p->detok ? ds4_detok_flush(p->detok, &len) : NULL;
    if (b) emit(p, b, len);
    ds4_detok_close(p->detok);
    p->detok = NULL;
    if (p->grey) fputs(RESET, p->out);
    p->grey = false;
    if (p->last_byte >= 0 && p->last_byte != '\n') emit(p, "\n", 1);
    fflush(p->out);
}

/* ---- options ------------------------------------------------------------------- */

ds4_sampler_params ds4_cli_sampler_params(const ds4_cli_opts *o) {
    ds4_sampler_params sp = ds4_sampler_defaults();
    sp.temperature = o->temp;
    sp.top_p = o->top_p;
    sp.top_k = o->top_k;
    sp.min_p = o->min_p;
    sp.seed = o->seed ? o->seed : ds4_rng_entropy_seed();
    return sp;
}

ds4_think ds4_cli_think_mode(int think, int n_ctx, bool warn) {
    ds4_think m = think == 2 ? DS4_THINK_MAX : think == 1 ? DS4_THINK_HIGH : DS4_THINK_NONE;
    ds4_think eff = ds4_chat_effective_think(m, n_ctx);
    if (warn && m == DS4_THINK_MAX && eff != DS4_THINK_MAX)
        fprintf(stderr, "ds4: warning: --think-max needs --ctx >= %d; using --think (high)\n",
                DS4_THINK_MAX_MIN_CTX);
    return eff;
}

/* ---- one-shot ------------------------------------------------------------------ */

int ds4_cli_read_token_file(const char *path, int n_vocab, ds4_cli_toks *out) {
    size_t len;
    char *text = ds4_cli_read_file(path, &len);
    if (!text) return -1;
    if (memchr(text, 0, len)) { /* it would end the parse early: the ids after it silently lost */
        fprintf(stderr, "ds4: %s: a NUL byte at offset %zu (expected whitespace-separated integers >= 0)\n", path,
                (size_t)((char *)memchr(text, 0, len) - text));
        free(text);
        return -1;
    }
    char *p = text;
    int rc = 0;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        const bool digits = *p >= '0' && *p <= '9'; /* strtol also takes "+3" and "-0" */
        if (end == p || !digits || errno || v < 0 || v > (n_vocab > 0 ? n_vocab - 1L : 0x7fffffffL) ||
            (*end && *end != ' ' && *end != '\t' && *end != '\n' && *end != '\r')) {
            int k = 0;
            while (p[k] && p[k] != ' ' && p[k] != '\t' && p[k] != '\n' && p[k] != '\r' && k < 32) k++;
            bool number = end != p && digits && !errno && v >= 0 && (!*end || *end == ' ' || *end == '\t' ||
                                                                     *end == '\n' || *end == '\r');
            if (number)
                fprintf(stderr, "ds4: %s: token id %.*s is out of range (ids are 0..%ld)\n", path, k,
                        p, n_vocab > 0 ? n_vocab - 1L : 0x7fffffffL);
            else
                fprintf(stderr, "ds4: %s: '%.*s' is not a token id (expected whitespace-separated "
                        "integers >= 0)\n", path, k, p);
            rc = -1;
            break;
        }
        int32_t id = (int32_t)v;
        if (ds4_cli_toks_push(out, &id, 1)) { fprintf(stderr, "ds4: out of memory\n"); rc = -1; break; }
        p = end;
    }
    free(text);
    if (!rc && out->n == 0) {
        fprintf(stderr, "ds4: %s holds no token ids\n", path);
        rc = -1;
    }
    return rc;
}

/* Prompt tokens per A.3 step 1 (or from --prompt-tokens-file). Also says
 * whether generation starts inside a reasoning block. */
int ds4_cli_build_prompt(ds4_engine *e, const ds4_cli_opts *o, ds4_think mode, ds4_cli_toks *out,
                         bool *reasoning) {
    *reasoning = false;
    if (o->prompt_tokens_file)
        return ds4_cli_read_token_file(o->prompt_tokens_file, ds4_engine_n_vocab(e), out);
    size_t len = 0;
    char *owned = NULL;
    const char *text = o->prompt;
    if (o->prompt_file) {
        owned = ds4_cli_read_file(o->prompt_file, &len);
        if (!owned) return -1;
        text = owned;
    } else {
        len = strlen(text);
    }
    ds4_segs segs;
    ds4_segs_init(&segs);
    const char *sys = o->system && *o->system ? o->system : NULL;
    int rc = ds4_chat_oneshot_segs(&segs, sys, text, len, mode);
    if (rc) fprintf(stderr, "ds4: out of memory building the prompt\n");
    else rc = ds4_cli_tokenize_segs(e, &segs, out);
    ds4_segs_free(&segs);
    free(owned);
    /* The template ends with <think> in thinking modes; a pre-rendered prompt
     * (starting with BOS) tells by its own last token. */
    if (!rc && out->n > 0) *reasoning = out->v[out->n - 1] == ds4_token_special(e, DS4_TOK_THINK_OPEN);
    return rc;
}

/* A session of n_ctx tokens with speculative decoding on when the engine
 * has an MTP block (every session the generating loops use: they decide
 * on speculation from the engine); NULL with err set. */
ds4_session *ds4_cli_new_session(const ds4_cli_opts *o, ds4_engine *e, int n_ctx, ds4_err *err) {
    ds4_session_opts so = {.n_ctx = n_ctx};
    ds4_session *s = NULL;
    if (ds4_session_new(e, &so, &s, err) != 0) {
        ds4_err_prefix(err, "cannot create a session of %d tokens", n_ctx);
        return NULL;
    }
    if (ds4_engine_has_mtp(e)) {
        ds4_spec_opts sop = {.n_draft = o->mtp_draft, .gate = o->mtp_gate};
        if (ds4_session_spec_enable(s, &sop, err) != 0) {
            ds4_err_prefix(err, "cannot enable MTP");
            ds4_session_free(s);
            return NULL;
        }
    }
    return s;
}

/* Opens the engine and a session of n_ctx tokens; prints errors. */
int ds4_cli_open_session(const ds4_cli_opts *o, int n_ctx, ds4_engine **e_out, ds4_session **s_out) {
    double t0 = ds4_cli_now();
    if (isatty(STDERR_FILENO)) fprintf(stderr, "ds4: loading %s ...", o->model_path);
    ds4_engine *e = ds4_cli_open_engine(o, false);
    if (isatty(STDERR_FILENO)) fprintf(stderr, e ? " done (%.1f s)\n" : "\n", ds4_cli_now() - t0);
    if (!e) return -1;
    ds4_err err = {0};
    ds4_session *s = ds4_cli_new_session(o, e, n_ctx, &err);
    if (!s) {
        fprintf(stderr, "ds4: %s\n", err.msg);
        ds4_engine_close(e);
        return -1;
    }
    fprintf(stderr, "ds4: ctx=%d, backend=%s%s\n", n_ctx, ds4_engine_backend_name(e),
            ds4_engine_has_mtp(e) ? ", mtp" : "");
    *e_out = e;
    *s_out = s;
    return 0;
}

/* Syncs the session to the prompt with progress; prints errors. */
int ds4_cli_prefill(ds4_session *s, const ds4_cli_toks *prompt, ds4_sync_info *info, double *secs) {
    ds4_cli_progress pr;
    ds4_cli_progress_init(&pr);
    ds4_err err = {0};
    double t0 = ds4_cli_now();
    int rc = ds4_session_sync(s, prompt->v, prompt->n, info, ds4_cli_progress_cb, &pr, &err);
    ds4_cli_progress_end(&pr);
    *secs = ds4_cli_now() - t0;
    if (rc == DS4_E_CANCEL || (rc && ds4_cli_interrupted)) {
        fprintf(stderr, "ds4: prompt processing interrupted\n");
        return DS4_E_CANCEL;
    }
    if (rc) fprintf(stderr, "ds4: prompt processing failed: %s\n", err.msg);
    return rc;
}

int ds4_cli_generate_loop(const ds4_cli_gen_args *g, ds4_cli_gen_result *r) {
    memset(r, 0, sizeof *r);
    const ds4_engine *e = g->e;
    int32_t eos = ds4_token_special(e, DS4_TOK_EOS);
    int n_vocab = ds4_engine_n_vocab(e);
    ds4_err err = {0};
    /* Speculative decoding (the session has it on when --mtp loaded a
     * block): a cycle appends the chosen token plus the accepted drafts,
     * which are then printed without further evaluation, and names the
     * token after them. */
    ds4_spec_stats st0;
    ds4_session_spec_stats(g->s, &st0);
    const bool spec = ds4_engine_has_mtp(e);
    int32_t queue[8], next = -1;
    int nq = 0, qi = 0;
    float *masked = NULL; /* (n_vocab) the logits with EOS removed: --ignore-eos */
    if (g->ignore_eos && !(masked = malloc((size_t)n_vocab * sizeof *masked))) {
        fprintf(stderr, "ds4: out of memory\n");
        r->failed = true;
        return -1;
    }
    double t0 = ds4_cli_now();
    for (int i = 0; i < g->max_new; i++) {
        if (ds4_cli_interrupted) { r->interrupted = true; break; }
        int32_t tok;
        bool evaluated = false;
        if (qi < nq) {
            tok = queue[qi++];
            evaluated = true;
        } else if (next >= 0) {
            tok = next;
            next = -1;
        } else if (!(g->params.temperature > 0.0f) && !masked) {
            /* greedy: the backend picks the id, the logits stay where they are */
            if (ds4_session_argmax(g->s, &tok, &err) != 0) {
                fprintf(stderr, "ds4: %s\n", err.msg);
                r->failed = true;
                break;
            }
        } else {
            const float *logits = ds4_session_logits_err(g->s, &err);
            if (!logits) { fprintf(stderr, "ds4: %s\n", err.msg); r->failed = true; break; }
            if (masked) {
                memcpy(masked, logits, (size_t)n_vocab * sizeof *masked);
                masked[eos] = -INFINITY;
                logits = masked;
            }
            tok = ds4_sampler_sample(g->sampler, logits, &g->params, g->rng);
        }
        if (tok < 0 || tok >= n_vocab) { fprintf(stderr, "ds4: sampler returned %d\n", tok); r->failed = true; break; }
        if (tok == eos) { r->eos = true; break; }
        if (g->printer) ds4_cli_printer_token(g->printer, tok);
        if (g->printer && ferror(stdout)) {
            /* the Ctrl+C's signal cut the write (the handler has no
             * SA_RESTART): an interrupt, not lost output */
            if (ds4_cli_interrupted) {
                clearerr(stdout);
                r->interrupted = true;
                break;
            }
            r->failed = true; /* the output is lost: stop (main says why) */
            break;
        }
        if (g->transcript && ds4_cli_toks_push(g->transcript, &tok, 1)) {
            fprintf(stderr, "ds4: out of memory\n");
            r->failed = true;
            break;
        }
        r->n_generated++;
        if (evaluated) continue;
        /* The last token is not evaluated: nothing would read its logits
         * (the REPL's next sync evaluates it with the next turn). */
        if (i + 1 == g->max_new || ds4_cli_interrupted) {
            r->interrupted = ds4_cli_interrupted;
            break;
        }
        if (spec) {
            int32_t out[8];
            int n_out = 0;
            if (ds4_session_spec_step(g->s, tok, g->max_new - i, &g->params, g->rng, out, &n_out, &next, &err) != 0) {
                fprintf(stderr, "ds4: decode failed: %s\n", err.msg);
                r->failed = true;
                break;
            }
            for (int j = 1; j < n_out; j++) queue[j - 1] = out[j];
            nq = n_out - 1;
            qi = 0;
            r->n_evaluated += n_out;
            continue;
        }
        if (ds4_session_eval(g->s, tok, &err) != 0) {
            fprintf(stderr, "ds4: decode failed: %s\n", err.msg);
            r->failed = true;
            break;
        }
        r->n_evaluated++;
    }
    r->secs = ds4_cli_now() - t0;
    if (spec) {
        ds4_spec_stats st;
        ds4_session_spec_stats(g->s, &st);
        r->spec = true;
        r->spec_st = st;
        r->spec_st.cycles -= st0.cycles;
        r->spec_st.tokens -= st0.tokens;
        r->spec_st.drafted -= st0.drafted;
        r->spec_st.accepted -= st0.accepted;
        r->spec_st.gated -= st0.gated;
        for (int k = 0; k < 4; k++) {
            r->spec_st.pos_drafted[k] -= st0.pos_drafted[k];
            r->spec_st.pos_accepted[k] -= st0.pos_accepted[k];
        }
    }
    free(masked);
    return r->failed ? -1 : 0;
}

void ds4_cli_print_stats(int n_prompt, const ds4_sync_info *info, double prefill_s,
                         const ds4_cli_gen_result *r) {
    double pf = prefill_s > 0 ? info->n_evaluated / prefill_s : 0.0;
    double gen = r->secs > 0 ? r->n_generated / r->secs : 0.0;
    fprintf(stderr, "ds4: tokens: prompt %d (reused %d, evaluated %d), generated %d\n", n_prompt,
            info->n_reused, info->n_evaluated, r->n_generated);
    if (!r->spec) {
        fprintf(stderr, "ds4: prefill: %.2f t/s, generation: %.2f t/s\n", pf, gen);
        return;
    }
    const ds4_spec_stats *st = &r->spec_st;
    fprintf(stderr, "ds4: prefill: %.2f t/s, generation: %.2f t/s, mtp: %.2f tokens/cycle, drafts %lld, "
            "accepted %lld (%.1f%%), gated %lld\n", pf, gen, st->cycles ? (double)st->tokens / (double)st->cycles : 0.0,
            (long long)st->drafted, (long long)st->accepted,
            st->drafted ? 100.0 * (double)st->accepted / (double)st->drafted : 0.0, (long long)st->gated);
}

int ds4_cli_generate(const ds4_cli_opts *o) {
    ds4_engine *e = NULL;
    ds4_session *s = NULL;
    ds4_think mode = ds4_cli_think_mode(o->think, o->n_ctx, true);
    if (ds4_cli_open_session(o, o->n_ctx, &e, &s)) return 1;
    int status = 1;
    ds4_cli_toks prompt = {0};
    ds4_sampler *smp = NULL;
    bool reasoning;
    if (ds4_cli_build_prompt(e, o, mode, &prompt, &reasoning)) goto out;
    if (prompt.n >= o->n_ctx) {
        fprintf(stderr, "ds4: the prompt has %d tokens; the context holds %d (use --ctx)\n",
                prompt.n, o->n_ctx);
        goto out;
    }
    ds4_err err = {0};
    smp = ds4_sampler_new(ds4_engine_n_vocab(e), &err);
    if (!smp) { fprintf(stderr, "ds4: %s\n", err.msg); goto out; }
    ds4_cli_install_stop_signals();
    ds4_sync_info info = {0};
    double prefill_s = 0;
    int rc = ds4_cli_prefill(s, &prompt, &info, &prefill_s);
    if (rc) { /* cancelled: the shell's status for the signal, as after generation */
        status = rc == DS4_E_CANCEL ? ds4_cli_signal_status() : 1;
        goto out;
    }

    ds4_rng rng;
    ds4_sampler_params sp = ds4_cli_sampler_params(o);
    ds4_rng_seed(&rng, sp.seed);
    ds4_cli_printer pr;
    ds4_cli_printer_init(&pr, e, stdout, reasoning);
    /* the last token is not evaluated (ds4_cli_generate_loop): ctx - prompt
     * tokens fit, as in the server */
    int max_new = o->n_predict;
    const bool ctx_cut = max_new > o->n_ctx - prompt.n;
    if (ctx_cut) max_new = o->n_ctx - prompt.n;
    ds4_cli_gen_args g = {.e = e, .s = s, .sampler = smp, .params = sp, .rng = &rng,
                          .printer = &pr, .max_new = max_new, .ignore_eos = o->ignore_eos};
    ds4_cli_gen_result r;
    rc = ds4_cli_generate_loop(&g, &r);
    ds4_cli_printer_finish(&pr);
    if (r.interrupted) fprintf(stderr, "ds4: interrupted\n");
    else if (!rc && ctx_cut && !r.eos && !r.failed && r.n_generated == max_new)
        fprintf(stderr, "ds4: stopped at the context size (--ctx %d)\n", o->n_ctx);
    ds4_cli_print_stats(prompt.n, &info, prefill_s, &r);
    /* interrupted: the shell's status for the signal (130 SIGINT, 143 SIGTERM), so a
     * script sees the output is cut */
    status = rc ? 1 : r.interrupted ? ds4_cli_signal_status() : 0;
out:
    if (smp) ds4_sampler_free(smp);
    ds4_cli_toks_free(&prompt);
    if (s) ds4_session_free(s);
    if (e) ds4_engine_close(e);
    return status;
}

int ds4_cli_stdout_status(int rc) {
    errno = 0;
    bool bad = ferror(stdout) != 0;
    int e = errno;
    if (fclose(stdout) != 0) bad = true, e = errno;
    if (!bad) return rc;
    fprintf(stderr, "ds4: writing the output failed%s%s: the output is incomplete\n", e ? ": " : "",
            e ? strerror(e) : "");
    return rc ? rc : 1;
}
