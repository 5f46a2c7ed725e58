/* repl.c - the interactive REPL (SERVING.md A.4, TEXT.md B.6 "CLI REPL").
 *
 * State: one session (live KV) and a token transcript: BOS, [Think-Max
 * prefix], [system], then per turn USER + plain(text) + generation prefix +
 * every sampled token (reasoning included) + EOS. Each turn syncs the
 * session to the whole transcript, so only the new suffix is evaluated when
 * the live state is a prefix of it (the previous turn's EOS and the new
 * user text); toggling Think Max changes token 1 and makes the engine
 * re-prefill. Invariant: the transcript only ever holds complete turns
 * between commands; a turn that fails or is interrupted before its first
 * token is rolled back.
 *
 * Line editing and history (~/.ds4_history, 512 entries) come from libedit
 * when stdin is a terminal; otherwise lines are read plainly (pipes, tests).
 */
#include "cli.h"

#include <editline/readline.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HISTORY_MAX 512

typedef struct repl {
    const ds4_cli_opts *o;
    ds4_engine *e;
    ds4_session *s;
    ds4_sampler *smp;
    ds4_rng rng;
    int n_ctx;
    int think;              /* requested: 0 none, 1 high, 2 max */
    ds4_cli_toks tr;        /* the transcript */
    int n_max_prefix;       /* tokens of the Think-Max prefix right after BOS (0 if absent) */
    ds4_cli_toks max_prefix;/* the prefix's tokens */
    bool tty;
    char history_path[4096];
} repl;

static const char *mode_name(const repl *r) {
    if (r->think == 0) return "none";
    if (r->think == 2)
        return r->n_ctx >= DS4_THINK_MAX_MIN_CTX ? "max" : "high (ctx below 393216)";
    return "high";
}

static ds4_think eff_mode(const repl *r) { return ds4_cli_think_mode(r->think, r->n_ctx, false); }

/* Makes the transcript's Think-Max prefix match the current mode. */
static void sync_max_prefix(repl *r) {
    bool want = eff_mode(r) == DS4_THINK_MAX;
    if (want && !r->n_max_prefix && r->max_prefix.n) {
        /* insert after BOS */
        ds4_cli_toks t = {0};
        if (ds4_cli_toks_push(&t, r->tr.v, 1) || ds4_cli_toks_push(&t, r->max_prefix.v, r->max_prefix.n) ||
            ds4_cli_toks_push(&t, r->tr.v + 1, r->tr.n - 1)) {
            ds4_cli_toks_free(&t);
            fprintf(stderr, "ds4: out of memory\n");
            return;
        }
        ds4_cli_toks_free(&r->tr);
        r->tr = t;
        r->n_max_prefix = r->max_prefix.n;
    } else if (!want && r->n_max_prefix) {
        memmove(r->tr.v + 1, r->tr.v + 1 + r->n_max_prefix,
                (size_t)(r->tr.n - 1 - r->n_max_prefix) * sizeof *r->tr.v);
        r->tr.n -= r->n_max_prefix;
        r->n_max_prefix = 0;
    }
}

static int repl_init(repl *r) {
    const ds4_cli_opts *o = r->o;
    if (ds4_cli_open_session(o, r->n_ctx, &r->e, &r->s)) return -1;
    ds4_err err = {0};
    r->smp = ds4_sampler_new(ds4_engine_n_vocab(r->e), &err);
    if (!r->smp) { fprintf(stderr, "ds4: %s\n", err.msg); return -1; }
    ds4_sampler_params sp = ds4_cli_sampler_params(o);
    ds4_rng_seed(&r->rng, sp.seed);
    /* Transcript start with the mode none (no prefix); the prefix tokens are
     * kept aside and inserted when Think Max is in effect. */
    ds4_segs segs;
    ds4_segs_init(&segs);
    const char *sys = o->system && *o->system ? o->system : NULL;
    int rc = ds4_chat_repl_start_segs(&segs, sys, DS4_THINK_HIGH);
    if (!rc) rc = ds4_cli_tokenize_segs(r->e, &segs, &r->tr);
    ds4_segs_free(&segs);
    if (rc) return -1;
    ds4_segs_init(&segs);
    rc = ds4_segs_push(&segs, DS4_SEG_PLAIN, ds4_chat_max_prefix, ds4_chat_max_prefix_len);
    if (!rc) rc = ds4_cli_tokenize_segs(r->e, &segs, &r->max_prefix);
    ds4_segs_free(&segs);
    if (rc) return -1;
    if (o->think == 2 && r->n_ctx < DS4_THINK_MAX_MIN_CTX) ds4_cli_think_mode(2, r->n_ctx, true);
    sync_max_prefix(r);
    return 0;
}

/* One user turn. */
static void run_turn(repl *r, const char *text, size_t len) {
    int saved = r->tr.n;
    ds4_think mode = eff_mode(r);
    ds4_segs segs;
    ds4_segs_init(&segs);
    int rc = ds4_chat_repl_turn_segs(&segs, text, len, mode);
    if (!rc) rc = ds4_cli_tokenize_segs(r->e, &segs, &r->tr);
    ds4_segs_free(&segs);
    if (rc) { r->tr.n = saved; return; }
    if (r->tr.n >= r->n_ctx) {
        fprintf(stderr, "ds4: the conversation has %d tokens; the context holds %d (use /ctx N)\n",
                r->tr.n, r->n_ctx);
        r->tr.n = saved;
        return;
    }
    ds4_cli_interrupted = 0;
    ds4_sync_info info = {0};
    double prefill_s;
    if (ds4_cli_prefill(r->s, &r->tr, &info, &prefill_s)) {
        r->tr.n = saved; /* the session is left empty: the next sync re-prefills */
        ds4_cli_interrupted = 0;
        return;
    }
    int n_prompt = r->tr.n;
    int max_new = r->o->n_predict;
    if (max_new > r->n_ctx - r->tr.n - 1) max_new = r->n_ctx - r->tr.n - 1;
    ds4_cli_printer pr;
    ds4_cli_printer_init(&pr, r->e, stdout, mode != DS4_THINK_NONE);
    ds4_cli_gen_args g = {.e = r->e, .s = r->s, .sampler = r->smp,
                          .params = ds4_cli_sampler_params(r->o), .rng = &r->rng,
                          .printer = &pr, .transcript = &r->tr, .max_new = max_new};
    ds4_cli_gen_result res;
    ds4_cli_generate_loop(&g, &res);
    ds4_cli_printer_finish(&pr);
    if (res.interrupted) fprintf(stderr, "ds4: interrupted\n");
    ds4_cli_interrupted = 0;
    if (res.n_generated == 0 && (res.interrupted || res.failed)) {
        r->tr.n = saved; /* nothing to keep; the next sync drops the suffix */
    } else {
        int32_t eos = ds4_token_special(r->e, DS4_TOK_EOS);
        if (ds4_cli_toks_push(&r->tr, &eos, 1)) fprintf(stderr, "ds4: out of memory\n");
    }
    ds4_cli_print_stats(n_prompt, &info, prefill_s, &res);
}

static void cmd_ctx(repl *r, const char *arg) {
    char *end;
    errno = 0;
    long v = strtol(arg, &end, 10);
    while (*end == ' ' || *end == '\t') end++;
    if (!*arg || errno || *end || v < 2 || v > (1 << 24)) {
        fprintf(stderr, "ds4: /ctx needs a context size in 2..%d\n", 1 << 24);
        return;
    }
    ds4_session_opts so = {.n_ctx = (int)v};
    ds4_session *s = NULL;
    ds4_err err = {0};
    if (ds4_session_new(r->e, &so, &s, &err) != 0) {
        fprintf(stderr, "ds4: cannot create a session of %ld tokens: %s (keeping %d)\n", v, err.msg,
                r->n_ctx);
        return;
    }
    ds4_session_free(r->s);
    r->s = s;
    r->n_ctx = (int)v;
    sync_max_prefix(r);
    printf("context: %d tokens (the conversation, %d tokens, is re-processed next turn)\n",
           r->n_ctx, r->tr.n);
    if (r->tr.n >= r->n_ctx) fprintf(stderr, "ds4: warning: the conversation no longer fits\n");
}

static void cmd_help(void) {
    printf("commands:\n"
           "  /help          this list\n"
           "  /think         thinking mode high (default)\n"
           "  /think-max     thinking mode max (needs ctx >= %d)\n"
           "  /nothink       no thinking\n"
           "  /ctx N         new context size (the conversation is kept and re-processed)\n"
           "  /read FILE     send the content of FILE as the next message\n"
           "  /quit, /exit   leave (also Ctrl+D)\n"
           "Ctrl+C stops a generation.\n", DS4_THINK_MAX_MIN_CTX);
}

/* Returns 1 to leave the REPL. */
static int handle_line(repl *r, char *line) {
    /* trim */
    char *p = line;
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
    size_t n = strlen(p);
    while (n && (p[n - 1] == ' ' || p[n - 1] == '\t' || p[n - 1] == '\r' || p[n - 1] == '\n')) n--;
    p[n] = '\0';
    if (!n) return 0;
    if (r->tty) add_history(p);
    if (p[0] != '/') {
        run_turn(r, p, n);
        return 0;
    }
    char *arg = p + strcspn(p, " \t");
    if (*arg) *arg++ = '\0';
    while (*arg == ' ' || *arg == '\t') arg++;
    if (!strcmp(p, "/quit") || !strcmp(p, "/exit")) return 1;
    if (!strcmp(p, "/help")) cmd_help();
    else if (!strcmp(p, "/think")) { r->think = 1; sync_max_prefix(r); printf("thinking: %s\n", mode_name(r)); }
    else if (!strcmp(p, "/think-max")) { r->think = 2; sync_max_prefix(r); printf("thinking: %s\n", mode_name(r)); }
    else if (!strcmp(p, "/nothink")) { r->think = 0; sync_max_prefix(r); printf("thinking: %s\n", mode_name(r)); }
    else if (!strcmp(p, "/ctx")) cmd_ctx(r, arg);
    else if (!strcmp(p, "/read")) {
        if (!*arg) { fprintf(stderr, "ds4: /read needs a file name\n"); return 0; }
        size_t len;
        char *text = ds4_cli_read_file(arg, &len);
        if (!text) return 0;
        if (len == 0) fprintf(stderr, "ds4: %s is empty\n", arg);
        else run_turn(r, text, len);
        free(text);
    } else {
        fprintf(stderr, "ds4: unknown command %s (try /help)\n", p);
    }
    fflush(stdout);
    return 0;
}

/* Reads one line: libedit on a terminal, getline otherwise. NULL at EOF.
 * *interrupted is set when Ctrl+C ended the read (not an EOF). */
static char *read_line(repl *r, bool *interrupted) {
    *interrupted = false;
    if (r->tty) {
        errno = 0;
        char *l = readline("ds4> ");
        if (!l && ds4_cli_interrupted) {
            ds4_cli_interrupted = 0;
            *interrupted = true;
        }
        return l;
    }
    char *l = NULL;
    size_t cap = 0;
    for (;;) {
        errno = 0;
        ssize_t n = getline(&l, &cap, stdin);
        if (n >= 0) return l;
        if (errno == EINTR && ds4_cli_interrupted) { /* Ctrl+C while waiting: ignored */
            clearerr(stdin);
            ds4_cli_interrupted = 0;
            continue;
        }
        free(l);
        return NULL;
    }
}

int ds4_cli_repl(const ds4_cli_opts *o) {
    repl r;
    memset(&r, 0, sizeof r);
    r.o = o;
    r.n_ctx = o->n_ctx;
    r.think = o->think;
    r.tty = isatty(STDIN_FILENO);
    int status = 1;
    if (repl_init(&r)) goto out;
    ds4_cli_install_sigint();
    if (r.tty) {
        const char *home = getenv("HOME"); /* the history location is user environment, not configuration */
        if (home) {
            snprintf(r.history_path, sizeof r.history_path, "%s/.ds4_history", home);
            using_history();
            stifle_history(HISTORY_MAX);
            read_history(r.history_path);
        }
        printf("ds4 interactive mode; /help for commands, Ctrl+D to leave.\n");
    }
    for (;;) {
        bool intr;
        char *line = read_line(&r, &intr);
        if (!line) {
            if (intr) { printf("\n"); fflush(stdout); continue; } /* Ctrl+C at the prompt: ignored */
            break;
        }
        int quit = handle_line(&r, line);
        free(line);
        if (r.tty && r.history_path[0]) write_history(r.history_path);
        if (quit) break;
    }
    if (r.tty) printf("\n");
    status = 0;
out:
    ds4_cli_toks_free(&r.tr);
    ds4_cli_toks_free(&r.max_prefix);
    if (r.smp) ds4_sampler_free(r.smp);
    if (r.s) ds4_session_free(r.s);
    if (r.e) ds4_engine_close(r.e);
    return status;
}
