/* bench.c - ds4-bench: prefill and decode speed at context frontiers, each
 * next to the roofline of the device it ran on (PERFORMANCE.md §E).
 *
 * For every frontier (ctx-start, then x step-mul or + step-incr, up to
 * ctx-max) it prefills the interval since the previous frontier (timed),
 * then decodes gen-tokens tokens one at a time (greedy argmax on the
 * backend each step, then the next token of the text fed in: teacher
 * forcing keeps the embedding rows and hash routing realistic with random
 * weights), then rewinds to the frontier. --fast-forward reaches each
 * frontier without computing it (synthetic caches; long contexts in
 * seconds) and times a prefill of prefill-chunk tokens there. One CSV row
 * per frontier with antirez/ds4-bench's columns first, then ours (bytes per
 * token, achieved GB/s, roofline fractions, FLOPs); a table on stdout;
 * --profile adds a per-stage time breakdown of one decode step and of one
 * prefill chunk. --mtp FILE
 * adds, per frontier, greedy speculative decoding (tokens per cycle,
 * acceptance by place) and the costs of one MTP draft step and of verify
 * passes of 2..N+1 rows relative to one decode step, with the speed-up
 * they model at 100% acceptance and at 2.26 tokens per cycle (PERFORMANCE.md
 * A.9); extra CSV columns then.
 *
 * Only the public API (ds4.h) and the debug hooks (ds4_debug.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ds4.h"
#include "ds4_debug.h"
#include "util/num.h"
#include "util/file.h"

typedef struct opts {
    const char *model, *synthetic, *prompt_file, *csv, *mtp;
    int mtp_draft, n_accept;
    bool mtp_draft_set;
    float accept[4];
    uint64_t seed;
    ds4_backend_kind backend;
    int threads, ctx_start, ctx_max, step_incr, gen, chunk, repeat;
    bool ctx_max_set;
    double step_mul;
    bool fast_forward, profile, no_graphs, plain;
    ds4_engine_opts split; /* --gpus / --split: only the layer-split fields */
} opts;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage(void) {
    printf("usage: ds4-bench (-m MODEL.gguf | --synthetic q2|q4[:N] [--seed N]) [options]\n"
           "  --synthetic q2:N        only the first N of the 43 blocks (same shapes; fits a smaller GPU)\n"
           "  --cpu | --cuda          backend (default: CUDA when built with it and present)\n"
           "  --gpus N|LIST           split the layers over N GPUs (or the devices listed, e.g. 0,1 or 0,0)\n"
           "  --split LIST            blocks per part, e.g. 22,21 (default: parts of equal bytes)\n"
           "  --ranks N --rendezvous HOST:PORT   part r in `ds4 --worker` process r\n"
           "  -t N                    CPU threads\n"
           "  --ctx-start N           first frontier (default 2048)\n"
           "  --ctx-max N             last frontier (default 8192)\n"
           "  --step-mul X            next frontier = frontier * X (default 2)\n"
           "  --step-incr N           next frontier = frontier + N (instead of --step-mul)\n"
           "  --gen-tokens N          decode steps per frontier (default 128)\n"
           "  --prefill-chunk N       tokens per prefill batch (default 2048)\n"
           "  --prompt-file F         text to tokenize (default: tests/data/promessi_sposi.txt when the model\n"
           "                          has a tokenizer, else seeded random token ids)\n"
           "  --fast-forward          reach each frontier with synthetic caches instead of prefill\n"
           "  --profile               per-stage time of one decode step and of one prefill chunk at each\n"
           "                          frontier (with --mtp also of one verify cycle of N+1 rows)\n"
           "  --repeat N              decode measurements per frontier; the median is reported (default 1)\n"
           "  --no-graphs             CUDA: eager decode (no CUDA graphs)\n"
           "  --plain-numerics        diagnostic numerics (no FP8/FP4/f16/int8 rounding)\n"
           "  --csv FILE              write the CSV rows there (default: stdout after the table)\n"
           "  --mtp FILE              MTP GGUF: also measure speculative decoding (see the file header);\n"
           "                          with --synthetic: --mtp synthetic (a block of the published recipe)\n"
           "  --mtp-draft N           drafts per cycle, 1..4 (default 3)\n"
           "  --mtp-accept P1,P2,..   force the acceptance of draft i with probability Pi (seeded; the output is\n"
           "                          then not the model's): decode speed at given acceptance rates\n");
}

static int parse(int argc, char **argv, opts *o) {
    *o = (opts){.ctx_start = 2048, .ctx_max = 8192, .step_mul = 2.0, .gen = 128, .chunk = 2048, .repeat = 1,
                .backend = DS4_BACKEND_AUTO, .mtp_draft = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define NEED()                                                            \
    if (i + 1 >= argc) {                                                  \
        fprintf(stderr, "ds4-bench: %s needs a value\n", a);              \
        return 2;                                                         \
    }
#define INT(dst, lo, hi)                                                                   \
    do {                                                                                   \
        NEED();                                                                            \
        long v_;                                                                           \
        if (ds4_parse_long(argv[++i], (lo), (hi), &v_)) {                                  \
            fprintf(stderr, "ds4-bench: %s: expected an integer in %ld..%ld\n", a, (long)(lo), (long)(hi)); \
            return 2;                                                                      \
        }                                                                                  \
        dst = (int)v_;                                                                     \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            exit(fflush(stdout) == 0 && !ferror(stdout) ? 0 : 1); /* > /dev/full: the help was lost */
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            NEED();
            o->model = argv[++i];
        } else if (!strcmp(a, "--synthetic")) {
            NEED();
            o->synthetic = argv[++i];
        } else if (!strcmp(a, "--seed")) {
            int s;
            INT(s, 0, 0x7fffffff);
            o->seed = (uint64_t)s;
        } else if (!strcmp(a, "--cpu")) o->backend = DS4_BACKEND_CPU;
        else if (!strcmp(a, "--cuda")) o->backend = DS4_BACKEND_CUDA;
        else if (!strcmp(a, "--gpus") || !strcmp(a, "--split") || !strcmp(a, "--ranks") ||
                 !strcmp(a, "--rendezvous") || !strcmp(a, "--rank-timeout")) {
            NEED();
            ds4_err e = {0};
            if (ds4_opts_parse_flag(&o->split, a, argv[++i], &e)) {
                fprintf(stderr, "ds4-bench: %s\n", e.msg);
                return 2;
            }
        }
        else if (!strcmp(a, "-t")) INT(o->threads, 1, 1024);
        else if (!strcmp(a, "--ctx-start")) INT(o->ctx_start, 1, 1 << 20); /* the model's context, as ds4 -c */
        else if (!strcmp(a, "--ctx-max")) {
            INT(o->ctx_max, 1, 1 << 20);
            o->ctx_max_set = true;
        }
        else if (!strcmp(a, "--step-incr")) INT(o->step_incr, 1, 1 << 22);
        else if (!strcmp(a, "--step-mul")) {
            NEED();
            if (ds4_parse_double(argv[++i], 1.0, 1e6, &o->step_mul) || !(o->step_mul > 1.0)) {
                fprintf(stderr, "ds4-bench: --step-mul must be > 1\n");
                return 2;
            }
        } else if (!strcmp(a, "--gen-tokens")) INT(o->gen, 1, 1 << 20);
        else if (!strcmp(a, "--prefill-chunk")) INT(o->chunk, 1, 1 << 16);
        else if (!strcmp(a, "--repeat")) INT(o->repeat, 1, 100);
        else if (!strcmp(a, "--prompt-file")) {
            NEED();
            o->prompt_file = argv[++i];
        } else if (!strcmp(a, "--csv")) {
            NEED();
            o->csv = argv[++i];
        } else if (!strcmp(a, "--mtp")) {
            NEED();
            o->mtp = argv[++i];
        } else if (!strcmp(a, "--mtp-draft")) {
            INT(o->mtp_draft, 1, 4);
            o->mtp_draft_set = true;
        }
        else if (!strcmp(a, "--mtp-accept")) {
            NEED();
            const char *p = argv[++i];
            for (o->n_accept = 0;;) {
                const char *c = strchr(p, ',');
                char item[64];
                size_t n = c ? (size_t)(c - p) : strlen(p);
                double v;
                if (o->n_accept == 4 || n >= sizeof item ||
                    (memcpy(item, p, n), item[n] = 0, ds4_parse_double(item, 0.0, 1.0, &v))) {
                    fprintf(stderr, "ds4-bench: --mtp-accept: expected up to 4 probabilities P1,P2,...\n");
                    return 2;
                }
                o->accept[o->n_accept++] = (float)v;
                if (!c) break;
                p = c + 1;
            }
        }
        else if (!strcmp(a, "--fast-forward")) o->fast_forward = true;
        else if (!strcmp(a, "--profile")) o->profile = true;
        else if (!strcmp(a, "--no-graphs")) o->no_graphs = true;
        else if (!strcmp(a, "--plain-numerics")) o->plain = true;
        else {
            fprintf(stderr, "ds4-bench: unknown option %s (see --help)\n", a);
            return 2;
        }
    }
    if (!o->model == !o->synthetic) {
        fprintf(stderr, "ds4-bench: give exactly one of -m MODEL and --synthetic q2|q4\n");
        return 2;
    }
    if (o->ctx_max_set && o->ctx_max < o->ctx_start) {
        fprintf(stderr, "ds4-bench: --ctx-max %d is below --ctx-start %d\n", o->ctx_max, o->ctx_start);
        return 2;
    }
    if ((o->n_accept || o->mtp_draft_set) && !o->mtp) {
        fprintf(stderr, "ds4-bench: %s needs --mtp FILE|synthetic\n", o->n_accept ? "--mtp-accept" : "--mtp-draft");
        return 2;
    }
    if (o->ctx_max < o->ctx_start) o->ctx_max = o->ctx_start; /* --ctx-start alone above the default --ctx-max */
    ds4_err pe = {0};
    if (ds4_opts_check_split(&o->split, &pe)) {
        fprintf(stderr, "ds4-bench: %s\n", pe.msg);
        return 2;
    }
    /* the files, before the model loads: --csv is replaced whole at the end (ds4_out), so never a device,
     * FIFO or directory; --prompt-file a readable regular file */
    if (o->csv && ds4_output_path_ok(o->csv, &pe)) {
        fprintf(stderr, "ds4-bench: --csv %s\n", pe.msg);
        return 2;
    }
    /* --csv naming the model or the prompt replaced it with the CSV (an 81 GB download gone with a typo) */
    if (o->csv) {
        const char *ins[][2] = {{"-m", o->model}, {"--mtp", o->mtp}, {"--prompt-file", o->prompt_file}};
        for (size_t k = 0; k < sizeof ins / sizeof ins[0]; k++)
            if (ins[k][1] && ds4_same_file(o->csv, ins[k][1])) {
                fprintf(stderr, "ds4-bench: --csv %s is the %s file: it would be overwritten\n", o->csv, ins[k][0]);
                return 2;
            }
    }
    if (o->prompt_file) {
        const int fd = ds4_open_regular(o->prompt_file, O_RDONLY, NULL, &pe);
        if (fd < 0) {
            fprintf(stderr, "ds4-bench: --prompt-file %s\n", pe.msg);
            return 2;
        }
        close(fd);
    }
    return 0;
}

typedef struct load_clock {
    double t0;
    int64_t total;
} load_clock;

static int on_load(void *user, const char *what, int64_t done, int64_t total) {
    load_clock *lc = user;
    (void)what;
    (void)done;
    lc->total = total;
    return 0;
}

/* The benchmark's token stream: the prompt text's tokens, repeated as
 * needed, or seeded random ids. */
static int32_t *make_tokens(ds4_engine *e, const opts *o, int n) {
    int32_t *t = malloc((size_t)n * sizeof(int32_t));
    if (!t) {
        fprintf(stderr, "ds4-bench: out of memory\n");
        return NULL;
    }
    /* the default text: beside the program's repo checkout, wherever it runs from (from another directory it
     * fell back to random ids without a word, and random ids route the experts otherwise) */
    char def[4096] = "tests/data/promessi_sposi.txt";
    if (!o->prompt_file && access(def, R_OK) != 0) {
        char exe[4000];
        ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (k > 0) {
            exe[k] = 0;
            char *slash = strrchr(exe, '/');
            if (slash) {
                *slash = 0;
                snprintf(def, sizeof def, "%s/tests/data/promessi_sposi.txt", exe);
            }
        }
    }
    const char *pf = o->prompt_file ? o->prompt_file : def;
    int m = 0;
    if (ds4_has_tokenizer(e)) {
        struct stat sb;
        if (o->prompt_file && stat(pf, &sb) == 0 && !S_ISREG(sb.st_mode)) { /* /dev/zero, a directory: say so */
            fprintf(stderr, "ds4-bench: --prompt-file %s: not a regular file\n", pf);
            free(t);
            return NULL;
        }
        FILE *f = fopen(pf, "rb");
        if (f) {
            fseek(f, 0, SEEK_END);
            long len = ftell(f);
            fseek(f, 0, SEEK_SET);
            char *text = malloc((size_t)len + 1);
            if (text && fread(text, 1, (size_t)len, f) == (size_t)len) {
                ds4_err err = {0};
                int k = ds4_tokenize(e, text, (size_t)len, false, t, n, &err);
                m = k < 0 ? 0 : (k < n ? k : n);
            }
            free(text);
            fclose(f);
        } else if (o->prompt_file) {
            fprintf(stderr, "ds4-bench: cannot open %s: %s\n", pf, strerror(errno));
            free(t);
            return NULL;
        }
        if (o->prompt_file && m == 0) {
            fprintf(stderr, "ds4-bench: --prompt-file %s: no tokens (empty or unreadable)\n", pf);
            free(t);
            return NULL;
        }
    }
    if (m > 0) {
        for (int i = m; i < n; i++) t[i] = t[i % m];
    } else {
        fprintf(stderr, "ds4-bench: %s: random token ids (seed %llu) as the prompt\n",
                ds4_has_tokenizer(e) ? "no tests/data/promessi_sposi.txt here or beside the program"
                                     : "the model has no tokenizer",
                (unsigned long long)o->seed);
        uint64_t x = 0x2545F4914F6CDD1Dull ^ o->seed;
        int V = ds4_engine_n_vocab(e);
        for (int i = 0; i < n; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            t[i] = (int32_t)(x % (uint64_t)V);
        }
    }
    return t;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Datasheet memory bandwidth (bytes/s) from the device name, 0 if unknown. */
static double datasheet_bw(const char *dev) {
    if (strstr(dev, "H200")) return 4.8e12;
    if (strstr(dev, "H100")) return 3.35e12;
    if (strstr(dev, "B200")) return 8.0e12;
    if (strstr(dev, "GB10")) return 273e9;
    return 0;
}

/* Datasheet dense BF16 tensor rate (FLOP/s), 0 if unknown. */
/* ---- MTP (--mtp) */

typedef struct text_drafter {
    const int32_t *tok; /* the text: drafts are its next tokens */
    int n;              /* drafts per cycle */
} text_drafter;

static int draft_text(void *user, const int32_t *toks, int n, int32_t next, int32_t *drafts, int max) {
    (void)toks;
    (void)next;
    const text_drafter *d = user;
    int k = d->n < max ? d->n : max;
    for (int i = 0; i < k; i++) drafts[i] = d->tok[n + 1 + i];
    return k;
}

/* Speculative decoding at frontier f (the session holds tok[0..f)):
 * greedy cycles for gen tokens, then the cost of verify passes of 2..N+1
 * rows (text drafts, whatever is accepted) and of one MTP draft step.
 * Appends the CSV columns to row. Leaves the session at f. */
static int bench_mtp(ds4_engine *e, ds4_session *s, const opts *o, const int32_t *tok, int f, double t_dec,
                     char *row, size_t cap, ds4_err *err) {
    int rc;
    ds4_spec_stats a, b;
    ds4_session_spec_stats(s, &a);
    int32_t next, out[8];
    int no;
    /* the last prompt token evaluated on its own, so that the MTP has the
     * state to draft the first cycle from (a restored prefix keeps none) */
    if (f > 1 && ((rc = ds4_session_rewind(s, f - 1, err)) || (rc = ds4_session_eval(s, tok[f - 1], err))))
        return rc;
    if ((rc = ds4_session_argmax(s, &next, err))) return rc;
    if (o->n_accept) ds4_debug_session_force_accept(s, o->accept, o->n_accept, o->seed + (uint64_t)f);
    double t0 = now();
    for (int g = 0; g < o->gen;) {
        if ((rc = ds4_session_spec_step(s, next, o->gen - g, NULL, NULL, out, &no,
                                        &next, err)))
            return rc;
        g += no;
    }
    double t_spec = now() - t0;
    ds4_debug_session_force_accept(s, NULL, 0, 0);
    ds4_session_spec_stats(s, &b);
    if ((rc = ds4_session_rewind(s, f, err))) return rc;
    double tpc = b.cycles > a.cycles ? (double)(b.tokens - a.tokens) / (double)(b.cycles - a.cycles) : 0;
    double acc[4] = {0};
    for (int k = 0; k < 4; k++) {
        int64_t d = b.pos_drafted[k] - a.pos_drafted[k];
        acc[k] = d ? (double)(b.pos_accepted[k] - a.pos_accepted[k]) / (double)d : 0;
    }
    /* verify passes of n = 2..N+1 rows (a cycle without MTP drafting) */
    double t_ver[6] = {0}; /* by rows, 2..N+1 <= 5 */
    const int reps = 4;
    for (int n = 2; n <= o->mtp_draft + 1; n++) {
        text_drafter td = {tok, n - 1};
        ds4_debug_session_drafter(s, draft_text, &td);
        double tv = 0;
        for (int r = -1; r < reps; r++) { /* r = -1: untimed (a backend may capture the step then) */
            int32_t id;
            if ((rc = ds4_session_argmax(s, &id, err))) break;
            double ts = now();
            rc = ds4_session_spec_step(s, tok[f], n, NULL, NULL, out, &no, &id, err);
            if (r >= 0) tv += now() - ts;
            if (rc || (rc = ds4_session_rewind(s, f, err))) break;
        }
        ds4_debug_session_drafter(s, NULL, NULL);
        if (rc) return rc;
        t_ver[n] = tv / reps;
    }
    /* one MTP draft step: the block on the last state (the MTP window is
     * then restarted at the next evaluation) */
    size_t nf = ds4_debug_state_floats(e);
    float *hc = malloc(nf * sizeof(float)), *lg = malloc((size_t)ds4_engine_n_vocab(e) * sizeof(float));
    double t_draft = 0;
    if (!hc || !lg) rc = DS4_E_NOMEM;
    if (!rc) rc = ds4_session_eval(s, tok[f], err);
    if (!rc) rc = ds4_debug_session_state(s, hc, err);
    for (int r = 0; !rc && r < reps; r++) {
        double ts = now();
        rc = ds4_debug_mtp_eval(s, hc, &tok[f], 1, lg, NULL, err);
        t_draft += now() - ts;
    }
    free(hc);
    free(lg);
    if (!rc) rc = ds4_session_rewind(s, f, err);
    if (rc) return rc;
    t_draft /= reps;
    const int N = o->mtp_draft;
    double cycle = N * t_draft + t_ver[N + 1];
    double up_full = (N + 1) * t_dec / cycle, up_cited = N >= 2 ? 2.26 * t_dec / (2 * t_draft + t_ver[3]) : 0;
    printf("  mtp at %d (N=%d%s): %.2f tokens/cycle, accepted by place %.2f %.2f %.2f %.2f; %.2f tok/s speculative\n"
           "    draft step %.3f ms (%.3f x decode), verify", f, N, o->n_accept ? ", forced acceptance" : "", tpc, acc[0], acc[1], acc[2], acc[3],
           o->gen / t_spec, t_draft * 1e3, t_draft / t_dec);
    for (int n = 2; n <= N + 1; n++) printf(" %d rows %.3f ms (%.2f x)", n, t_ver[n] * 1e3, t_ver[n] / t_dec);
    if (N >= 2) printf("; modelled speed-up %.2f x at 100%%, %.2f x at 2.26 tokens/cycle (N=2)\n", up_full, up_cited);
    else printf("; modelled speed-up %.2f x at 100%% (the 2.26 tokens/cycle figure needs --mtp-draft >= 2)\n", up_full);
    snprintf(row, cap, ",%.3f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%.3f,%.3f", tpc, acc[0], acc[1], acc[2],
             t_draft / t_dec, t_ver[2] / t_dec, t_ver[3] / t_dec, t_ver[4] / t_dec, up_full, up_cited);
    return 0;
}

/* --profile with --mtp: the per-stage time of one verify cycle of N+1 rows
 * (eager; the main model's pass over the rows, then the MTP window's update
 * by the accepted row: the drafts are the prompt's next tokens, which a
 * synthetic model rejects) next to one decode step's, stage by stage: where
 * the cost of verifying rows beyond the first goes. dec: the decode step's
 * per-stage ms summed over np_dec steps. */
static void profile_verify(ds4_engine *e, ds4_session *s, const opts *o, const int32_t *tok, int f,
                           const double *dec, int nk_dec, int np_dec) {
    const int n = o->mtp_draft + 1, reps = 4;
    double ms[64];
    int32_t out[8], id;
    int no, rc = 0;
    ds4_err err = {0};
    text_drafter td = {tok, n - 1};
    ds4_debug_session_drafter(s, draft_text, &td);
    /* one untimed cycle first: a backend may capture the step then */
    if (!(rc = ds4_session_argmax(s, &id, &err)) && !(rc = ds4_session_spec_step(s, tok[f], n, NULL, NULL, out, &no, &id, &err)))
        rc = ds4_session_rewind(s, f, &err);
    ds4_debug_profile_read(e, ms, 64); /* reset */
    double wall = 0;
    for (int r = 0; r < reps && !rc; r++) {
        if ((rc = ds4_session_argmax(s, &id, &err))) break;
        ds4_debug_session_profile(s, true);
        double t0 = now();
        rc = ds4_session_spec_step(s, tok[f], n, NULL, NULL, out, &no, &id, &err);
        wall += now() - t0;
        ds4_debug_session_profile(s, false);
        if (!rc) rc = ds4_session_rewind(s, f, &err);
    }
    ds4_debug_session_drafter(s, NULL, NULL);
    int nk = ds4_debug_profile_read(e, ms, 64);
    if (rc) {
        fprintf(stderr, "ds4-bench: verify profile at %d: %s\n", f, err.msg);
        return;
    }
    double tot = 0, tot_dec = 0;
    for (int k = 0; k < nk; k++) tot += ms[k];
    for (int k = 0; k < nk_dec; k++) tot_dec += dec[k];
    printf("  per-stage time of one verify cycle of %d rows at %d (eager, %.3f ms wall; stages sum %.3f ms = %.2f x "
           "the decode step's): verify ms, decode ms, ratio, share of the extra time\n",
           n, f, wall / reps * 1e3, tot / reps, tot_dec > 0 ? (tot / reps) / (tot_dec / np_dec) : 0.0);
    const double extra = tot / reps - tot_dec / np_dec;
    for (int k = 0; k < nk; k++) {
        const double v = ms[k] / reps, d = k < nk_dec ? dec[k] / np_dec : 0;
        if (v > 0 || d > 0)
            printf("    %-14s %8.3f ms %8.3f ms %6.2f x %6.1f%%\n", ds4_debug_profile_name(k), v, d, d > 0 ? v / d : 0.0,
                   extra > 0 ? 100.0 * (v - d) / extra : 0.0);
    }
}

static double datasheet_flops(const char *dev) {
    if (strstr(dev, "H200") || strstr(dev, "H100")) return 989e12;
    return 0;
}

/* --profile, prefill: the per-stage time of one prefill chunk (--prefill-chunk
 * tokens, at most f) ending at frontier f, on a second session whose earlier
 * positions are filled synthetically (fast-forward), so the measured
 * session keeps its state. Diagnostic only: profiling marks add waits, so
 * the wall figure is below the timed prefill's. */
static void profile_prefill(ds4_engine *e, const opts *o, const int32_t *tok, int f, double fl_sheet) {
    const int k = o->chunk < f ? o->chunk : f;
    ds4_session_opts so = {.n_ctx = f + 8, .prefill_chunk = o->chunk};
    ds4_session *s = NULL;
    ds4_err err = {0};
    double ms[64];
    if (ds4_session_new(e, &so, &s, &err)) {
        fprintf(stderr, "ds4-bench: prefill profile at %d: %s\n", f, err.msg);
        return;
    }
    int rc = f - k > 0 ? ds4_debug_session_fast_forward(s, f - k, o->seed + (uint64_t)f, &err) : 0;
    ds4_debug_profile_read(e, ms, 64); /* reset */
    double t1 = now(), wall = 0;
    if (!rc) {
        ds4_debug_session_profile(s, true);
        rc = ds4_session_extend(s, tok + (f - k), k, DS4_EVAL_PREFILL, 0, NULL, &err);
        wall = now() - t1;
        ds4_debug_session_profile(s, false);
    }
    int nk = ds4_debug_profile_read(e, ms, 64);
    ds4_session_free(s);
    if (rc) {
        fprintf(stderr, "ds4-bench: prefill profile at %d: %s\n", f, err.msg);
        return;
    }
    if (nk <= 0) return;
    /* each stage's matmul and attention FLOPs over the chunk, and their rate */
    double tot = 0, fl[64] = {0}, ft[64];
    for (int i = 0; i < nk; i++) tot += ms[i];
    for (int p = f - k; p < f; p++) {
        ds4_debug_stage_flops(e, p, ft, 64);
        for (int i = 0; i < nk && i < 64; i++) fl[i] += ft[i];
    }
    printf("  per-stage time of a %d-token prefill chunk ending at %d (eager with marks, %.1f tok/s wall; "
           "stages sum %.3f ms); GFLOP per token, TFLOP/s achieved%s:\n", k, f, wall > 0 ? k / wall : 0.0, tot,
           fl_sheet > 0 ? ", as % of the datasheet peak" : "");
    for (int i = 0; i < nk; i++)
        if (ms[i] > 0) {
            const double r = fl[i] / (ms[i] / 1e3);
            printf("    %-14s %9.3f ms  %5.1f%%  %8.4f ms/token %9.4f GFLOP %8.2f TFLOP/s", ds4_debug_profile_name(i), ms[i],
                   100.0 * ms[i] / tot, ms[i] / k, fl[i] / k / 1e9, r / 1e12);
            if (fl_sheet > 0) printf(" %5.1f%%", 100.0 * r / fl_sheet);
            printf("\n");
        }
}

int main(int argc, char **argv) {
    ds4_sigbus_message("ds4-bench"); /* the model file truncated while mapped: say so */
    signal(SIGXFSZ, SIG_IGN);         /* a file-size limit fails the write (said below), not the process */
    opts o;
    int rc = parse(argc, argv, &o);
    if (rc) return rc;
    load_clock lc = {.t0 = now()};
    ds4_engine_opts eo = {.model_path = o.model, .synthetic = o.synthetic, .synthetic_seed = o.seed,
                          .backend = o.backend, .n_threads = o.threads, .plain_numerics = o.plain,
                          .progress = on_load, .progress_user = &lc, .cuda_no_graphs = o.no_graphs,
                          .mtp_path = o.mtp};
    ds4_opts_copy_split(&eo, &o.split);
    ds4_engine *e = NULL;
    ds4_err err = {0};
    if (ds4_engine_open(&e, &eo, &err)) {
        fprintf(stderr, "ds4-bench: %s\n", err.msg);
        return 1;
    }
    double load_s = now() - lc.t0;
    const char *dev = ds4_debug_device(e);
    printf("ds4-bench: %s model, backend %s: %s\n", o.synthetic ? o.synthetic : o.model, ds4_engine_backend_name(e),
           dev);
    printf("ds4-bench: weights %.2f GiB bound in %.1f s (%.1f GB/s)%s\n", (double)lc.total / (1 << 30), load_s,
           load_s > 0 ? (double)lc.total / load_s / 1e9 : 0.0, o.synthetic ? " (synthetic fill)" : "");
    double bw_meas = 0;
    ds4_err berr = {0};
    if (ds4_debug_bandwidth(e, &bw_meas, &berr) == 0) bw_meas *= 1e9;
    const double bw_sheet = datasheet_bw(dev), fl_sheet = datasheet_flops(dev);
    printf("ds4-bench: streaming read %.1f GB/s measured, %.0f GB/s datasheet\n", bw_meas / 1e9, bw_sheet / 1e9);

    const int n_total = o.ctx_max + o.gen + 8;
    ds4_session_opts so = {.n_ctx = n_total, .prefill_chunk = o.chunk};
    ds4_session *s = NULL;
    if (ds4_session_new(e, &so, &s, &err)) {
        fprintf(stderr, "ds4-bench: %s\n", err.msg);
        ds4_engine_close(e);
        return 1;
    }
    /* the device after the session's state is reserved (caches for n_total
     * positions): its free memory against the line above gives what the
     * context costs beside the weights */
    printf("ds4-bench: session of %d positions reserved: %s\n", n_total, ds4_debug_device(e));
    if (o.mtp) {
        ds4_spec_opts sop = {.n_draft = o.mtp_draft, .gate = 0};
        if (ds4_session_spec_enable(s, &sop, &err)) {
            fprintf(stderr, "ds4-bench: --mtp: %s\n", err.msg);
            ds4_session_free(s);
            ds4_engine_close(e);
            return 1;
        }
    }
    int32_t *tok = make_tokens(e, &o, n_total); /* says why when it fails */
    if (!tok) {
        ds4_session_free(s);
        ds4_engine_close(e);
        return 1;
    }
    char *rows = calloc(64, 1024);
    size_t rows_len = 0;
    const char *hdr = "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,gen_tps_ss,first_token_sec,"
                      "kvcache_bytes,weight_bytes_per_token,kv_bytes_per_token,achieved_GBps,"
                      "roofline_tps_datasheet,roofline_tps_measured,frac_roofline,frac_roofline_measured,"
                      "prefill_flops_per_token,prefill_tflops,frac_compute_roof,graphs,weights,backend\n";
    const char *hdr_mtp = "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,gen_tps_ss,first_token_sec,"
                          "kvcache_bytes,weight_bytes_per_token,kv_bytes_per_token,achieved_GBps,"
                          "roofline_tps_datasheet,roofline_tps_measured,frac_roofline,frac_roofline_measured,"
                          "prefill_flops_per_token,prefill_tflops,frac_compute_roof,graphs,weights,backend,"
                          "mtp_tokens_per_cycle,mtp_accept_pos1,mtp_accept_pos2,mtp_accept_pos3,mtp_draft_rel,"
                          "mtp_verify2_rel,mtp_verify3_rel,mtp_verify4_rel,mtp_speedup_full,mtp_speedup_2_26\n";
    if (o.mtp) hdr = hdr_mtp;
    /* frac: decode (steady state) as a fraction of the roofline of the
     * measured streaming read (else the datasheet); pf/gen: prefill tok/s
     * over decode tok/s */
    printf("\n%8s %8s %10s %9s %9s %8s %9s %8s %8s %9s %7s\n", "ctx", "prefill", "pf_tok/s", "gen_tok/s", "gen_ss",
           "GB/s", "roof_tok/s", "frac", "TFLOP/s", "first_s", "pf/gen");
    int prev = 0;
    double *step_s = malloc((size_t)o.gen * sizeof(double));
    double *reps = malloc((size_t)o.repeat * sizeof(double));
    int frontier = o.ctx_start;
    for (int fi = 0; frontier <= o.ctx_max && fi < 64; fi++) {
        int f = frontier;
        /* ---- reach the frontier, timing the prefill */
        int pf_n;
        double t0, pf_s;
        if (o.fast_forward) {
            pf_n = o.chunk < f ? o.chunk : f;
            if (f - pf_n > 0 && ds4_debug_session_fast_forward(s, f - pf_n, o.seed + (uint64_t)f, &err)) break;
            if (f - pf_n == 0) ds4_session_rewind(s, 0, &err);
            t0 = now();
            rc = ds4_session_extend(s, tok + (f - pf_n), pf_n, DS4_EVAL_PREFILL, 0, NULL, &err);
            pf_s = now() - t0;
        } else {
            pf_n = f - prev;
            t0 = now();
            ds4_sync_info info;
            rc = ds4_session_sync(s, tok, f, &info, NULL, NULL, &err);
            pf_s = now() - t0;
        }
        if (rc) {
            fprintf(stderr, "ds4-bench: prefill to %d failed: %s\n", f, err.msg);
            break;
        }
        /* ---- decode gen tokens (argmax, then the text's next token) */
        double first = 0, total = 0;
        for (int r = 0; r < o.repeat && !rc; r++) {
            double td = now();
            for (int i = 0; i < o.gen; i++) {
                double ts = now();
                int32_t id;
                if ((rc = ds4_session_argmax(s, &id, &err)) || (rc = ds4_session_eval(s, tok[f + i], &err))) break;
                step_s[i] = now() - ts;
            }
            if (rc) break;
            reps[r] = now() - td;
            if (r == 0) first = step_s[0];
            if ((rc = ds4_session_rewind(s, f, &err))) break;
        }
        if (rc) {
            fprintf(stderr, "ds4-bench: decode at %d failed: %s\n", f, err.msg);
            break;
        }
        qsort(reps, (size_t)o.repeat, sizeof(double), cmp_d);
        total = reps[o.repeat / 2];
        double gen_tps = o.gen / total;
        double gen_ss = o.gen > 1 ? (o.gen - 1) / (total - first) : gen_tps;
        double wb = 0, kb = 0;
        ds4_debug_decode_bytes(e, f, &wb, &kb);
        double per_tok = wb + kb;
        double ach = per_tok * gen_ss;
        double roof_sheet = bw_sheet > 0 ? bw_sheet / per_tok : 0, roof_meas = bw_meas > 0 ? bw_meas / per_tok : 0;
        double pf_tps = pf_n / pf_s;
        double flops = 0;
        for (int p = f - pf_n; p < f; p++) flops += ds4_debug_token_flops(e, p);
        double fl_tok = pf_n ? flops / pf_n : 0, tflops = flops / pf_s / 1e12;
        size_t kvb = ds4_debug_session_state_bytes(s);
        double roof = roof_meas > 0 ? roof_meas : roof_sheet;
        char frac[16] = "        -";
        if (roof > 0) snprintf(frac, sizeof frac, "%7.1f%%", 100.0 * gen_ss / roof);
        printf("%8d %8d %10.1f %9.2f %9.2f %8.1f %9.1f %s %8.2f %9.4f %7.2f\n", f, pf_n, pf_tps, gen_tps, gen_ss,
               ach / 1e9, roof, frac, tflops, first, gen_ss > 0 ? pf_tps / gen_ss : 0);
        fflush(stdout);
        rows_len += (size_t)snprintf(rows + rows_len, 64 * 1024 - rows_len,
                                     "%d,%d,%.2f,%d,%.3f,%.3f,%.5f,%zu,%.0f,%.0f,%.1f,%.1f,%.1f,%.4f,%.4f,%.4g,%.3f,%.4f,%d,%s,%s\n",
                                     f, pf_n, pf_tps, o.gen, gen_tps, gen_ss, first, kvb, wb, kb, ach / 1e9, roof_sheet,
                                     roof_meas, roof_sheet > 0 ? gen_ss / roof_sheet : 0,
                                     roof_meas > 0 ? gen_ss / roof_meas : 0, fl_tok, tflops,
                                     fl_sheet > 0 ? flops / pf_s / fl_sheet : 0, o.no_graphs ? 0 : 1,
                                     o.synthetic ? "synthetic" : "real", ds4_engine_backend_name(e));
        if (o.mtp) {
            double t_dec = gen_ss > 0 ? 1.0 / gen_ss : 0;
            char extra[256];
            if ((rc = bench_mtp(e, s, &o, tok, f, t_dec, extra, sizeof extra, &err))) {
                fprintf(stderr, "ds4-bench: MTP at %d failed: %s\n", f, err.msg);
                break;
            }
            rows_len--; /* before the row's newline */
            rows_len += (size_t)snprintf(rows + rows_len, 64 * 1024 - rows_len, "%s\n", extra);
        }
        /* ---- per-stage breakdown of decode steps (eager) */
        if (o.profile) {
            double ms[64];
            ds4_debug_profile_read(e, ms, 64); /* reset */
            ds4_debug_session_profile(s, true);
            const int np = 8;
            double t1 = now();
            for (int i = 0; i < np && !rc; i++) {
                int32_t id;
                if ((rc = ds4_session_argmax(s, &id, &err)) == 0) rc = ds4_session_eval(s, tok[f + i], &err);
            }
            double eager = (now() - t1) / np * 1e3;
            ds4_debug_session_profile(s, false);
            int nk = ds4_debug_profile_read(e, ms, 64);
            ds4_session_rewind(s, f, &err);
            if (nk > 0) {
                /* each stage next to its own floor: the bytes it reads over the measured streaming read */
                double tot = 0, by[64] = {0};
                for (int k = 0; k < nk; k++) tot += ms[k];
                ds4_debug_stage_bytes(e, f, by, 64);
                const double bw = bw_meas > 0 ? bw_meas : bw_sheet;
                printf("  per-stage time of one decode step at %d (eager, %.3f ms/token wall; stages sum %.3f ms); MB read "
                       "per token, GB/s achieved, floor = MB / %.0f GB/s, floor as %% of the time:\n",
                       f, eager, tot / np, bw / 1e9);
                for (int k = 0; k < nk; k++)
                    if (ms[k] > 0) {
                        const double t = ms[k] / np / 1e3, fl = bw > 0 ? by[k] / bw : 0;
                        printf("    %-14s %8.3f ms  %5.1f%%  %9.1f MB %8.1f GB/s  floor %7.3f ms %5.1f%%\n",
                               ds4_debug_profile_name(k), t * 1e3, 100.0 * ms[k] / tot, by[k] / 1e6, by[k] / t / 1e9,
                               fl * 1e3, t > 0 ? 100.0 * fl / t : 0.0);
                    }
            }
            if (o.mtp && nk > 0) profile_verify(e, s, &o, tok, f, ms, nk, np);
            profile_prefill(e, &o, tok, f, fl_sheet);
        }
        prev = f;
        int next = o.step_incr ? f + o.step_incr : (int)(f * o.step_mul);
        if (next <= f) next = f + 1;
        if (f < o.ctx_max && next > o.ctx_max) next = o.ctx_max;
        frontier = next;
        if (f == o.ctx_max) break;
    }
    if (o.csv) { /* replaced whole: a failed write leaves an earlier file as it was */
        ds4_out out;
        ds4_err we = {0};
        if (ds4_out_open(&out, o.csv, "w", &we) || (fputs(hdr, out.f), fputs(rows, out.f), ds4_out_commit(&out, &we))) {
            fprintf(stderr, "ds4-bench: --csv: %s\n", we.msg);
            rc = 1;
        }
    } else {
        printf("\n%s%s", hdr, rows);
    }
    if (ferror(stdout) | (fclose(stdout) != 0)) { /* a full disk or /dev/full: the table is lost */
        fprintf(stderr, "ds4-bench: writing the output failed\n");
        rc = 1;
    }
    free(rows);
    free(step_s);
    free(reps);
    free(tok);
    ds4_session_free(s);
    ds4_engine_close(e);
    return rc ? 1 : 0;
}
