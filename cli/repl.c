/* repl.c - the interactive REPL (docs/SERVING.md A.4, docs/TEXT.md B.6 "CLI REPL").
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
 *
 * Ctrl+C: during a turn the SIGINT handler (generate.c) only sets
 * ds4_cli_interrupted, which the prefill/decode loops poll. At the prompt
 * libedit reads keys through repl_getc (rl_getc_function): it waits with
 * pselect() while SIGINT is blocked everywhere else in it, so a Ctrl+C that
 * arrives before, during or after the wait is seen (no lost wake-up) and
 * ends the read with EOF; read_line then discards the partial line and
 * reports the interrupt (a fresh prompt follows, like a shell). With
 * libedit's own reader a SIGINT that missed its read() (or that read()
 * retried) was swallowed: readline later returned a line with the flag still
 * set, so the next Ctrl+D was taken for an interrupt (the REPL did not
 * leave) and the next Ctrl+C killed the process. Now the flag is cleared
 * after every prompt. Nothing but the flag is touched in signal context.
 */
#include "cli.h"
#include "util/file.h"
#include "util/num.h"

#include <editline/readline.h>
#include <errno.h>
#include <langinfo.h>
#include <limits.h>
#include <locale.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <unistd.h>
#include <wchar.h>

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
    bool input_failed;      /* stdin failed (not an EOF): exit status 1 */
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

/* The transcript's start (BOS, [system]) without the Think-Max prefix,
 * which sync_max_prefix inserts when that mode is in effect. */
static int start_transcript(repl *r) {
    r->tr.n = 0;
    r->n_max_prefix = 0;
    ds4_segs segs;
    ds4_segs_init(&segs);
    const char *sys = r->o->system && *r->o->system ? r->o->system : NULL;
    int rc = ds4_chat_repl_start_segs(&segs, sys, DS4_THINK_HIGH);
    if (!rc) rc = ds4_cli_tokenize_segs(r->e, &segs, &r->tr);
    ds4_segs_free(&segs);
    return rc;
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
    if (start_transcript(r)) return -1;
    ds4_segs segs;
    int rc;
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
    if (r->tr.n + 1 >= r->n_ctx) { /* no room for one token of reply and its end token */
        fprintf(stderr, "ds4: the conversation has %d tokens; the context holds %d, with no room for a reply "
                "(use /ctx N or /clear)\n", r->tr.n, r->n_ctx);
        r->tr.n = saved;
        return;
    }
    ds4_cli_interrupted = 0;
    ds4_sync_info info = {0};
    double prefill_s;
    if (ds4_cli_prefill(r->s, &r->tr, &info, &prefill_s)) {
        r->tr.n = saved; /* the session keeps what was evaluated (a cancel) or is empty (a failure):
                          * the next sync works from the common prefix either way */
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
                          .printer = &pr, .transcript = &r->tr, .max_new = max_new,
                          .ignore_eos = r->o->ignore_eos};
    ds4_cli_gen_result res;
    ds4_cli_generate_loop(&g, &res);
    ds4_cli_printer_finish(&pr);
    if (res.interrupted) fprintf(stderr, "ds4: interrupted\n");
    else if (!res.failed && !res.eos && max_new < r->o->n_predict && res.n_generated == max_new)
        fprintf(stderr, "ds4: stopped at the context size (%d tokens; the reply's end token is kept)\n", r->n_ctx);
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
    char num[32];
    size_t k = strlen(arg);
    while (k && (arg[k - 1] == ' ' || arg[k - 1] == '\t')) k--;
    long v = 0;
    if (k >= sizeof num || (memcpy(num, arg, k), num[k] = 0, ds4_parse_long(num, 2, 1 << 20, &v))) {
        fprintf(stderr, "ds4: /ctx needs a context size in 2..%d\n", 1 << 20);
        return;
    }
    ds4_err err = {0};
    ds4_session *s = ds4_cli_new_session(r->o, r->e, (int)v, &err); /* MTP on as in the first session */
    if (!s) {
        fprintf(stderr, "ds4: %s (keeping %d)\n", err.msg, r->n_ctx);
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

/* ---- /save, /load: the conversation on disk ---------------------------------
 *
 * File: "DS4REPL2", then little-endian u32 think mode, n_max_prefix, n (the
 * transcript's token count), the n tokens as u32, u64 payload bytes, the
 * SHA-256 of all that, and the session payload (ds4_session_save: KV and
 * compressor state, fingerprinted to the model, SHA-256 checked). Written
 * through a fresh temporary file and renamed (ds4_out), so a failed save
 * leaves any earlier FILE whole. "DS4REPL1" files (before 2026-12-07: no
 * digest, so a flipped header bit or the unevaluated last token loaded
 * without a word) still load, with the checks a header allows. */
#define REPL_MAGIC "DS4REPL2"
#define REPL_MAGIC_V1 "DS4REPL1"

static void put32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> 8 * i);
}
static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void cmd_save(repl *r, const char *path) {
    if (!*path) { fprintf(stderr, "ds4: /save needs a file name\n"); return; }
    /* the file is replaced by a rename: never a device, FIFO or directory */
    ds4_err pe = {0};
    if (ds4_output_path_ok(path, &pe)) {
        fprintf(stderr, "ds4: /save %s (nothing written)\n", pe.msg);
        return;
    }
    if (ds4_same_file(path, r->o->model_path) || ds4_same_file(path, r->o->mtp_path)) {
        fprintf(stderr, "ds4: /save %s: that is the model file (nothing written)\n", path);
        return;
    }
    /* the live state holds the transcript (its last EOS is not evaluated) */
    ds4_err err = {0};
    ds4_sync_info info = {0};
    if (r->tr.n > 1 ? ds4_session_sync(r->s, r->tr.v, r->tr.n - 1, &info, NULL, NULL, &err)
                    : ds4_session_rewind(r->s, 0, &err)) { /* after /clear: nothing of the old conversation */
        fprintf(stderr, "ds4: /save: %s\n", err.msg);
        return;
    }
    void *pl = NULL;
    size_t pn = 0;
    if (ds4_session_save(r->s, &pl, &pn, &err)) {
        fprintf(stderr, "ds4: /save: %s\n", err.msg);
        return;
    }
    size_t hn = 8 + 12 + 4 * (size_t)r->tr.n + 8;
    unsigned char *h = malloc(hn);
    if (!h) { free(pl); fprintf(stderr, "ds4: out of memory\n"); return; }
    memcpy(h, REPL_MAGIC, 8);
    put32(h + 8, (uint32_t)r->think);
    put32(h + 12, (uint32_t)r->n_max_prefix);
    put32(h + 16, (uint32_t)r->tr.n);
    for (int i = 0; i < r->tr.n; i++) put32(h + 20 + 4 * (size_t)i, (uint32_t)r->tr.v[i]);
    put32(h + hn - 8, (uint32_t)pn);
    put32(h + hn - 4, (uint32_t)((uint64_t)pn >> 32));
    unsigned char md[32];
    unsigned int mdn = 0;
    if (!EVP_Digest(h, hn, md, &mdn, EVP_sha256(), NULL) || mdn != 32) {
        free(h);
        free(pl);
        fprintf(stderr, "ds4: /save: SHA-256 failed (nothing written)\n");
        return;
    }
    ds4_out out;
    ds4_err we = {0};
    int rc = ds4_out_open(&out, path, "wb", &we);
    if (!rc) {
        fwrite(h, 1, hn, out.f);
        fwrite(md, 1, 32, out.f);
        fwrite(pl, 1, pn, out.f);
        rc = ds4_out_commit(&out, &we);
    }
    if (rc) {
        fprintf(stderr, "ds4: /save: %s\n", we.msg);
    } else {
        printf("saved %d tokens of conversation to %s (%.1f MiB)\n", r->tr.n, path, (double)(hn + 32 + pn) / 1048576.0);
    }
    free(h);
    free(pl);
}

static void cmd_load(repl *r, const char *path) {
    if (!*path) { fprintf(stderr, "ds4: /load needs a file name\n"); return; }
    size_t n = 0;
    unsigned char *b = ds4_cli_read_regular(path, &n);
    if (!b) return; /* the reader said why */
    const char *bad = NULL;
    uint32_t think = 0, nmax = 0, nt = 0;
    uint64_t pn = 0;
    const bool v1 = n >= 8 && !memcmp(b, REPL_MAGIC_V1, 8);
    const size_t dg = v1 ? 0 : 32; /* the digest after the header */
    if (n < 28 + dg || (memcmp(b, REPL_MAGIC, 8) && !v1)) bad = "not a ds4 conversation file";
    if (!bad) {
        think = get32(b + 8), nmax = get32(b + 12), nt = get32(b + 16);
        if (think > 2 || nt < 1 || nt > (n - 28 - dg) / 4 || nmax >= nt) bad = "damaged header";
    }
    size_t at = 0;
    if (!bad) {
        at = 20 + 4 * (size_t)nt;
        pn = (uint64_t)get32(b + at) | (uint64_t)get32(b + at + 4) << 32;
        if (pn != n - at - 8 - dg) bad = "truncated or damaged (sizes disagree)";
    }
    if (!bad && !v1) {
        unsigned char md[32];
        unsigned int mdn = 0;
        if (!EVP_Digest(b, at + 8, md, &mdn, EVP_sha256(), NULL) || mdn != 32 || memcmp(md, b + at + 8, 32))
            bad = "damaged header or transcript (checksum mismatch)";
    }
    for (uint32_t i = 0; !bad && i < nt; i++)
        if (get32(b + 20 + 4 * (size_t)i) >= (uint32_t)ds4_engine_n_vocab(r->e)) bad = "damaged transcript";
    /* a Think-Max prefix is this model's prefix, right after BOS, in that mode only (a flipped count dropped
     * conversation tokens as if they were one) */
    if (!bad && nmax) {
        if (think != 2 || nmax != (uint32_t)r->max_prefix.n) bad = "damaged header (Think-Max prefix)";
        for (uint32_t i = 0; !bad && i < nmax; i++)
            if ((int32_t)get32(b + 24 + 4 * (size_t)i) != r->max_prefix.v[i]) bad = "damaged transcript (Think-Max prefix)";
    }
    if (!bad && (int)nt >= r->n_ctx) {
        fprintf(stderr, "ds4: /load %s: the conversation has %u tokens; the context holds %d (use /ctx N first)\n",
                path, nt, r->n_ctx);
        free(b);
        return;
    }
    ds4_err err = {0};
    if (!bad && ds4_session_load(r->s, b + 28 + dg + 4 * (size_t)nt, (size_t)pn, &err)) {
        fprintf(stderr, "ds4: /load %s: %s (the current conversation is kept)\n", path, err.msg);
        free(b);
        return;
    }
    /* the saved state must be the saved transcript's */
    const int32_t *st = bad ? NULL : ds4_session_tokens(r->s);
    int sn = bad ? 0 : ds4_session_n_tokens(r->s);
    for (int i = 0; !bad && i < sn; i++)
        if (i >= (int)nt || st[i] != (int32_t)get32(b + 20 + 4 * (size_t)i)) bad = "state and transcript disagree";
    if (bad) {
        fprintf(stderr, "ds4: /load %s: %s (the current conversation is kept)\n", path, bad);
        free(b);
        return;
    }
    ds4_cli_toks t = {0};
    for (uint32_t i = 0; i < nt; i++) {
        int32_t v = (int32_t)get32(b + 20 + 4 * (size_t)i);
        if (ds4_cli_toks_push(&t, &v, 1)) {
            ds4_cli_toks_free(&t);
            free(b);
            fprintf(stderr, "ds4: out of memory\n");
            return;
        }
    }
    ds4_cli_toks_free(&r->tr);
    r->tr = t;
    r->think = (int)think;
    r->n_max_prefix = (int)nmax;
    sync_max_prefix(r);
    free(b);
    printf("loaded %u tokens of conversation from %s (thinking: %s)\n", nt, path, mode_name(r));
}

static void cmd_clear(repl *r) {
    if (start_transcript(r)) {
        fprintf(stderr, "ds4: out of memory\n");
        return;
    }
    sync_max_prefix(r);
    printf("new conversation\n");
}

static void cmd_help(void) {
    printf("commands:\n"
           "  /help          this list\n"
           "  /think         thinking mode high (default)\n"
           "  /think-max     thinking mode max (needs ctx >= %d)\n"
           "  /nothink       no thinking\n"
           "  /ctx N         new context size (the conversation is kept and re-processed)\n"
           "  /read FILE     send the content of FILE as the next message\n"
           "  /save FILE     write the conversation and its KV state to FILE\n"
           "  /load FILE     continue a conversation saved with /save (same model)\n"
           "  /clear         start a new conversation\n"
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
    else if (!strcmp(p, "/save")) cmd_save(r, arg);
    else if (!strcmp(p, "/load")) cmd_load(r, arg);
    else if (!strcmp(p, "/clear")) cmd_clear(r);
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

/* One byte of stdin, or -1 at end of input, on a read error, or when Ctrl+C
 * is pending. SIGINT stays blocked except inside pselect(), so the flag test
 * and the wait are atomic: a SIGINT that came earlier is pending and
 * interrupts pselect at once. */
static int repl_read_byte(void) {
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &old);
    sigset_t wait_mask = old;
    sigdelset(&wait_mask, SIGINT);
    int c = -1;
    for (;;) {
        if (ds4_cli_interrupted) break;
        fd_set rd;
        FD_ZERO(&rd);
        FD_SET(STDIN_FILENO, &rd);
        int n = pselect(STDIN_FILENO + 1, &rd, NULL, NULL, NULL, &wait_mask);
        if (n < 0) {
            if (errno == EINTR) continue; /* SIGINT (flag set) or another signal */
            break;
        }
        unsigned char b;
        ssize_t got = read(STDIN_FILENO, &b, 1);
        if (got == 1) { c = b; break; }
        if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        break; /* 0: end of input; <0: error */
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
    return c;
}

/* libedit's key reader (rl_getc_function): one character, decoded from the
 * locale's multibyte encoding as libedit's own reader does (an invalid
 * sequence yields its first byte), or -1 (EOF) at end of input, on an error
 * or on Ctrl+C. The FILE argument is ignored (libedit versions pass stdin or
 * NULL). */
static int repl_getc(FILE *unused) {
    (void)unused;
    char buf[MB_LEN_MAX];
    size_t n = 0;
    for (;;) {
        int b = repl_read_byte();
        if (b < 0) return -1;
        buf[n++] = (char)b;
        mbstate_t st;
        memset(&st, 0, sizeof st);
        wchar_t wc;
        size_t k = mbrtowc(&wc, buf, n, &st);
        if (k == (size_t)-2 && n < sizeof buf) continue; /* incomplete sequence */
        if (k == (size_t)-1 || k == (size_t)-2) return (unsigned char)buf[0];
        return (int)wc; /* k == 0 is a NUL byte: wc == 0 */
    }
}

/* libedit converts keys to wide characters and back with the LC_CTYPE
 * locale; in the default "C" locale every non-ASCII character typed is
 * dropped. Takes the user's locale, and when that is not a UTF-8 one (unset,
 * "C", "POSIX" or not installed) a UTF-8 one, since the model reads UTF-8.
 * Only LC_CTYPE changes; nothing else in ds4 depends on it. */
static void repl_utf8_ctype(void) {
    if (setlocale(LC_CTYPE, "") && !strcmp(nl_langinfo(CODESET), "UTF-8")) return;
    if (setlocale(LC_CTYPE, "C.UTF-8") || setlocale(LC_CTYPE, "UTF-8")) return;
    setlocale(LC_CTYPE, "C");
}

/* Reads one line: libedit on a terminal, getline otherwise. NULL at EOF.
 * *interrupted is set when Ctrl+C ended the read (not an EOF). */
static char *read_line(repl *r, bool *interrupted) {
    *interrupted = false;
    if (r->tty) {
        char *l = readline("ds4> ");
        if (ds4_cli_interrupted) { /* Ctrl+C: the partial line (if any) is dropped */
            free(l);
            ds4_cli_interrupted = 0;
            *interrupted = true;
            return NULL;
        }
        return l;
    }
    char *l = NULL;
    size_t cap = 0;
    for (;;) {
        errno = 0;
        ssize_t n = getline(&l, &cap, stdin);
        if (n >= 0 && memchr(l, 0, (size_t)n)) { /* the text after it would be dropped silently */
            fprintf(stderr, "ds4: a line holds a NUL byte; not sent (use /read FILE for such text)\n");
            continue;
        }
        if (n >= 0) return l;
        if (errno == EINTR && ds4_cli_interrupted) { /* Ctrl+C while waiting: ignored */
            clearerr(stdin);
            ds4_cli_interrupted = 0;
            continue;
        }
        if (ferror(stdin) && errno && errno != EINTR) { /* not an EOF: say so (it left silently with 0) */
            fprintf(stderr, "ds4: reading the input: %s\n", strerror(errno));
            r->input_failed = true;
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
        /* before libedit initializes: it installs the reader only if set */
        rl_getc_function = repl_getc;
        repl_utf8_ctype();
        rl_initialize();
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
    status = r.input_failed ? 1 : 0;
out:
    ds4_cli_toks_free(&r.tr);
    ds4_cli_toks_free(&r.max_prefix);
    if (r.smp) ds4_sampler_free(r.smp);
    if (r.s) ds4_session_free(r.s);
    if (r.e) ds4_engine_close(r.e);
    return status;
}
