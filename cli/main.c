/* main.c - ds4 command line: option parsing and mode dispatch.
 *
 * Usage errors exit 2, runtime errors 1 (docs/SERVING.md §A.1). Every mode is a
 * function of cli.h in its own file; this file only parses and dispatches.
 */
#include "cli.h"
#include "util/file.h"
#include "util/num.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void usage(FILE *f) {
    fprintf(f,
        "usage: ds4 [options]\n"
        "  -m, --model FILE        main GGUF (default ds4flash.gguf)\n"
        "  --mtp FILE              optional MTP draft GGUF (speculative decoding)\n"
        "  --mtp-draft N           MTP drafts per cycle, 1..4 (default 3)\n"
        "  --mtp-gate P            stop drafting below this MTP probability (default 0.3; 0 = never)\n"
        "  --cpu | --cuda          backend (default: CUDA if built and present, else CPU)\n"
        "  --gpus N|LIST           split the layers over N GPUs (or the devices listed, e.g. 0,1)\n"
        "  --split LIST            blocks per part, e.g. 22,21 (default: parts of equal bytes)\n"
        "  --ranks N --rendezvous HOST:PORT   part r in worker process r (docs/ARCHITECTURE.md 6b)\n"
        "  --worker HOST:PORT --rank R        be worker R of the rank 0 listening there\n"
        "  --rank-timeout S        seconds rank 0 waits for its workers / a worker for rank 0 (300)\n"
        "  -t, --threads N         CPU threads (default: all cores)\n"
        "  -c, --ctx N             context size (default 32768)\n"
        "  -p, --prompt TEXT       one-shot prompt\n"
        "  --prompt-file FILE      one-shot prompt read from FILE\n"
        "  --prompt-tokens-file F  token ids (whitespace-separated) instead of text\n"
        "  -sys, --system TEXT     system prompt (\"\" disables)\n"
        "  -n, --tokens N          max generated tokens (default 50000)\n"
        "  --temp F --top-p F --top-k N --min-p F --seed N   sampling\n"
        "  --think | --think-max | --nothink   thinking mode (default --think)\n"
        "  --dump-tokens           print the tokenization of the prompt and exit\n"
        "  --dump-logits OUT.f32   write float32 logits after every prompt position\n"
        "  --imatrix-out FILE.dat  collect the routed experts' importance matrix (llama.cpp legacy .dat)\n"
        "                          over --prompt-file CALIB.txt (blocks split by lines starting\n"
        "                          '===== DS4_IMATRIX_PROMPT') or --prompt-tokens-file; CPU backend\n"
        "  --eval prefill|decode|chunk:N   how --dump-logits evaluates the prompt\n"
        "  --dump-logprobs FILE    greedy continuation with top-k logprobs as JSON\n"
        "  --logprobs-top-k N      (default 20, max 128)\n"
        "  --perplexity-file FILE  teacher-forced scoring of raw text\n"
        "  --inspect               load the model, print a summary, exit\n"
        "  -h, --help              this help;  --help-debug: diagnostic switches\n");
}

static void usage_debug(void) {
    printf("diagnostic switches (not user modes):\n"
           "  --plain-numerics   turn off every rounding of docs/MODEL.md §E (FP8 KV, FP4 indexer,\n"
           "                     cache storage precision) to compare with transformers\n"
           "  --strict-backend   CPU math behind the backend-contract checker (every stage\n"
           "                     pointer must be backend memory; tests)\n"
           "  --cuda-sync-debug  CUDA: synchronise and check after every kernel launch\n"
           "  --no-graphs        CUDA: never capture decode steps into CUDA graphs\n"
           "  --ignore-eos       never sample the end token: a reply runs to -n, the context or\n"
           "                     Ctrl+C (throughput runs, tests; not with --mtp)\n"
           "  --dump-greedy N    with --dump-logits: then N greedy decode steps, ids on stdout\n"
           "                     (speculative cycles when --mtp is given; MTP counters on stderr)\n"
           "  --layers N         evaluate only the first N blocks, then the head (compare backends)\n"
           "  --numerics-off L   turn off single roundings of the release path: L = fp8,fp4,f16,act\n"
           "  --imatrix-dump F   with --imatrix-out: also write every expert observation raw to F (tests)\n");
}

static int parse_int(const char *opt, const char *s, long lo, long hi, long *out) {
    if (ds4_parse_long(s, lo, hi, out)) {
        fprintf(stderr, "ds4: %s: expected an integer in %ld..%ld, got '%s'\n", opt, lo, hi, s);
        return -1;
    }
    return 0;
}

static int parse_float(const char *opt, const char *s, double lo, double hi, float *out) {
    double v;
    if (ds4_parse_double(s, lo, hi, &v)) {
        fprintf(stderr, "ds4: %s: expected a number in %g..%g, got '%s'\n", opt, lo, hi, s);
        return -1;
    }
    *out = (float)v;
    return 0;
}

/* Prompt, token and text files larger than this are refused: a million-token
 * context holds far less text, and an endless input (/dev/zero, a stream
 * that never ends) would otherwise grow until the system kills ds4. */
#define CLI_MAX_INPUT ((size_t)256 << 20)

char *ds4_cli_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "ds4: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) break;
        n += fread(buf + n, 1, cap - n - 1, f);
        if (n < cap - 1) break;
        /* full: past the limit is refused, exactly at it (one more byte
         * read into the grown buffer) */
        if (n > CLI_MAX_INPUT) {
            fclose(f);
            free(buf);
            fprintf(stderr, "ds4: %s: more than %zu MiB (no context holds that much text; an endless stream?)\n",
                    path, CLI_MAX_INPUT >> 20);
            return NULL;
        }
        const size_t ncap = cap * 2 > CLI_MAX_INPUT + 2 ? CLI_MAX_INPUT + 2 : cap * 2;
        char *nb = realloc(buf, ncap);
        if (!nb) { free(buf); buf = NULL; break; }
        buf = nb;
        cap = ncap;
    }
    int bad = ferror(f), e = errno;
    fclose(f);
    if (!buf || bad) {
        fprintf(stderr, "ds4: cannot read %s: %s\n", path, !buf ? "out of memory" : strerror(e ? e : EIO));
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    if (len) *len = n;
    return buf;
}

/* Reads a whole regular file (a saved conversation: its size is that of the
 * state, no text limit applies); anything else (a FIFO, a device, a
 * directory) is refused without blocking. */
unsigned char *ds4_cli_read_regular(const char *path, size_t *len) {
    struct stat st;
    ds4_err err = {0};
    int fd = ds4_open_regular(path, O_RDONLY, &st, &err);
    if (fd < 0) {
        fprintf(stderr, "ds4: /load %s\n", err.msg);
        return NULL;
    }
    const size_t n = (size_t)st.st_size;
    unsigned char *buf = malloc(n ? n : 1);
    if (!buf) {
        fprintf(stderr, "ds4: %s: out of memory (%zu bytes)\n", path, n);
        close(fd);
        return NULL;
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            fprintf(stderr, "ds4: cannot read %s: %s\n", path, r < 0 ? strerror(errno) : "it became shorter");
            free(buf);
            close(fd);
            return NULL;
        }
        got += (size_t)r;
    }
    close(fd);
    *len = n;
    return buf;
}

/* Weight upload progress: a bar on a TTY, nothing otherwise (the final
 * line with time and GB/s is printed after the open). */
typedef struct load_bar {
    bool tty, shown;
    double t0;
    int64_t total;
    int last_pct;
} load_bar;

static int load_progress(void *user, const char *what, int64_t done, int64_t total) {
    load_bar *lb = user;
    (void)what;
    lb->total = total;
    if (!lb->tty || total <= 0) return 0;
    int pct = (int)(100 * done / total);
    if (lb->shown && pct == lb->last_pct && done != total) return 0;
    double dt = ds4_cli_now() - lb->t0;
    fprintf(stderr, "\rloading weights %3d%%  %.1f / %.1f GiB  %.1f GB/s  ", pct, (double)done / (1 << 30),
            (double)total / (1 << 30), dt > 0 ? (double)done / dt / 1e9 : 0.0);
    fflush(stderr);
    lb->shown = true;
    lb->last_pct = pct;
    return 0;
}

ds4_engine *ds4_cli_open_engine(const ds4_cli_opts *o, bool vocab_only) {
    /* A clear message for the commonest mistake before the loader's own. */
    if (access(o->model_path, R_OK) != 0) {
        fprintf(stderr, "ds4: cannot open model file %s: %s (give one with -m FILE)\n",
                o->model_path, strerror(errno));
        return NULL;
    }
    load_bar lb = {.tty = isatty(STDERR_FILENO), .t0 = ds4_cli_now()};
    ds4_engine_opts eo = {
        .model_path = o->model_path,
        .mtp_path = o->mtp_path,
        .backend = o->backend,
        .n_threads = o->n_threads,
        .plain_numerics = o->plain_numerics,
        .vocab_only = vocab_only,
        .progress = load_progress,
        .progress_user = &lb,
        .cuda_sync_debug = o->cuda_sync_debug,
        .cuda_no_graphs = o->no_graphs,
        .layer_limit = o->layers,
        .numerics_off = o->numerics_off,
    };
    ds4_opts_copy_split(&eo, &o->split);
    ds4_engine *e = NULL;
    ds4_err err = {0};
    int rc = ds4_engine_open(&e, &eo, &err);
    if (lb.tty && lb.shown) fputc('\n', stderr);
    if (rc != 0) {
        fprintf(stderr, "ds4: %s\n", err.msg);
        return NULL;
    }
    if (lb.total > 0) {
        double dt = ds4_cli_now() - lb.t0;
        fprintf(stderr, "ds4: weights uploaded to %s: %.2f GiB in %.1f s (%.1f GB/s)\n", ds4_engine_backend_name(e),
                (double)lb.total / (1 << 30), dt, dt > 0 ? (double)lb.total / dt / 1e9 : 0.0);
    }
    return e;
}

int ds4_cli_inspect(const ds4_cli_opts *o) {
    ds4_engine *e = ds4_cli_open_engine(o, false);
    if (!e) return 1;
    printf("%s\n", ds4_engine_describe(e));
    ds4_engine_close(e);
    return 0;
}

int main(int argc, char **argv) {
    ds4_cli_opts o = {
        .model_path = "ds4flash.gguf",
        .n_ctx = 32768,
        .system = "You are a helpful assistant",
        .n_predict = 50000,
        .temp = 1.0f,
        .top_p = 1.0f,
        .min_p = 0.05f,
        .think = 1,
        .logprobs_top_k = 20,
        .mtp_draft = 3,
        .mtp_gate = 0.3f,
    };
    long v;
    bool mtp_opts_given = false, eval_given = false, topk_given = false;
    /* a file-size limit (ulimit -f) fails a write with EFBIG, reported, instead of killing ds4 */
    signal(SIGXFSZ, SIG_IGN);
    ds4_sigbus_message("ds4"); /* the model file truncated while mapped: say so, not a bare "Bus error" */
#define NEED_ARG()                                                              \
    do { if (i + 1 >= argc) {                                                   \
        fprintf(stderr, "ds4: %s needs an argument\n", a); return 2; } } while (0)
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help") || !strcmp(a, "--help-debug")) {
            if (!strcmp(a, "--help-debug")) usage_debug();
            else usage(stdout);
            if (fflush(stdout) != 0 || ferror(stdout)) { /* > /dev/full: the help was lost */
                fprintf(stderr, "ds4: writing the help failed: %s\n", strerror(errno ? errno : EIO));
                return 1;
            }
            return 0;
        }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { NEED_ARG(); o.model_path = argv[++i]; o.model_given = true; }
        else if (!strcmp(a, "--mtp")) { NEED_ARG(); o.mtp_path = argv[++i]; }
        else if (!strcmp(a, "--mtp-draft")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 1, 4, &v)) return 2; o.mtp_draft = (int)v; mtp_opts_given = true;
        } else if (!strcmp(a, "--mtp-gate")) {
            NEED_ARG(); if (parse_float(a, argv[++i], 0, 1, &o.mtp_gate)) return 2; mtp_opts_given = true;
        }
        else if (!strcmp(a, "--cpu")) o.backend = DS4_BACKEND_CPU;
        else if (!strcmp(a, "--cuda")) o.backend = DS4_BACKEND_CUDA;
        else if (!strcmp(a, "--strict-backend")) o.backend = DS4_BACKEND_STRICT;
        else if (!strcmp(a, "--cuda-sync-debug")) o.cuda_sync_debug = true;
        else if (!strcmp(a, "--no-graphs")) o.no_graphs = true;
        else if (!strcmp(a, "--ignore-eos")) o.ignore_eos = true;
        else if (!strcmp(a, "--worker")) { NEED_ARG(); o.worker = argv[++i]; }
        else if (!strcmp(a, "--rank")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 1, 7, &v)) return 2; o.rank = (int)v;
        }
        else if (!strcmp(a, "--gpus") || !strcmp(a, "--split") || !strcmp(a, "--ranks") || !strcmp(a, "--rendezvous") ||
                 !strcmp(a, "--rank-timeout")) {
            NEED_ARG();
            ds4_err e = {0};
            if (ds4_opts_parse_flag(&o.split, a, argv[++i], &e)) {
                fprintf(stderr, "ds4: %s\n", e.msg);
                return 2;
            }
        }
        else if (!strcmp(a, "--numerics-off")) {
            NEED_ARG();
            /* a comma-separated list of exact names ("fp8,bogus" or "xfp8x" was read as fp8) */
            const char *l = argv[++i];
            static const char *const names[] = {"fp8", "fp4", "f16", "act"};
            o.numerics_off = 0;
            for (const char *p = l;;) {
                const size_t n = strcspn(p, ",");
                unsigned bit = 0;
                for (unsigned k = 0; k < 4; k++)
                    if (n == strlen(names[k]) && !strncmp(p, names[k], n)) bit = 1u << k;
                if (!bit) {
                    fprintf(stderr, "ds4: --numerics-off: '%.*s' is not one of fp8, fp4, f16, act (a comma-separated "
                                    "list)\n", (int)n, p);
                    return 2;
                }
                o.numerics_off |= bit;
                if (!p[n]) break;
                p += n + 1;
            }
        } else if (!strcmp(a, "--layers")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 0, 1 << 20, &v)) return 2; o.layers = (int)v;
        } else if (!strcmp(a, "--dump-greedy")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 0, 1 << 20, &v)) return 2; o.dump_greedy = (int)v;
        }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 1, 1024, &v)) return 2; o.n_threads = (int)v;
        } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 1, 1 << 20, &v)) return 2; o.n_ctx = (int)v;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) { NEED_ARG(); o.prompt = argv[++i]; }
        else if (!strcmp(a, "--prompt-file")) { NEED_ARG(); o.prompt_file = argv[++i]; }
        else if (!strcmp(a, "--prompt-tokens-file")) { NEED_ARG(); o.prompt_tokens_file = argv[++i]; }
        else if (!strcmp(a, "-sys") || !strcmp(a, "--system")) { NEED_ARG(); o.system = argv[++i]; }
        else if (!strcmp(a, "-n") || !strcmp(a, "--tokens")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 0, 1 << 30, &v)) return 2; o.n_predict = (int)v;
        } else if (!strcmp(a, "--temp")) { NEED_ARG(); if (parse_float(a, argv[++i], 0, 100, &o.temp)) return 2; }
        else if (!strcmp(a, "--top-p")) {
            NEED_ARG(); if (parse_float(a, argv[++i], 0, 1, &o.top_p)) return 2;
            /* 0: the smallest nucleus, the top token, as the server reads it (the sampler takes p <= 0 as
             * "no top-p", TEXT D.3) */
            if (o.top_p == 0.0f) o.top_p = FLT_MIN;
        }
        else if (!strcmp(a, "--min-p")) { NEED_ARG(); if (parse_float(a, argv[++i], 0, 1, &o.min_p)) return 2; }
        else if (!strcmp(a, "--top-k")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 0, 1 << 20, &v)) return 2; o.top_k = (int)v;
        } else if (!strcmp(a, "--seed")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 1, 0x7fffffffL, &v)) return 2; o.seed = (uint64_t)v;
        } else if (!strcmp(a, "--think")) o.think = 1;
        else if (!strcmp(a, "--think-max")) o.think = 2;
        else if (!strcmp(a, "--nothink")) o.think = 0;
        else if (!strcmp(a, "--dump-tokens")) o.dump_tokens = true;
        else if (!strcmp(a, "--dump-logits")) { NEED_ARG(); o.dump_logits = argv[++i]; }
        else if (!strcmp(a, "--eval")) {
            eval_given = true;
            NEED_ARG();
            const char *m = argv[++i];
            if (!strcmp(m, "prefill")) o.eval_mode = DS4_EVAL_PREFILL;
            else if (!strcmp(m, "decode")) o.eval_mode = DS4_EVAL_DECODE;
            else if (!strncmp(m, "chunk:", 6)) {
                if (parse_int(a, m + 6, 1, 1 << 20, &v)) return 2;
                o.eval_mode = DS4_EVAL_CHUNKED;
                o.eval_chunk = (int)v;
            } else {
                fprintf(stderr, "ds4: --eval: expected prefill, decode or chunk:N, got '%s'\n", m);
                return 2;
            }
        } else if (!strcmp(a, "--plain-numerics")) o.plain_numerics = true;
        else if (!strcmp(a, "--dump-logprobs")) { NEED_ARG(); o.dump_logprobs = argv[++i]; }
        else if (!strcmp(a, "--logprobs-top-k")) {
            NEED_ARG(); if (parse_int(a, argv[++i], 1, 128, &v)) return 2; o.logprobs_top_k = (int)v;
            topk_given = true;
        } else if (!strcmp(a, "--perplexity-file")) { NEED_ARG(); o.perplexity_file = argv[++i]; }
        else if (!strcmp(a, "--inspect")) o.inspect = true;
        else if (!strcmp(a, "--imatrix-out")) { NEED_ARG(); o.imatrix_out = argv[++i]; }
        else if (!strcmp(a, "--imatrix-dump")) { NEED_ARG(); o.imatrix_dump = argv[++i]; }
        else if (!strcmp(a, "--server")) {
            fprintf(stderr, "ds4: the server is a separate program: use ds4-server\n");
            return 2;
        } else {
            fprintf(stderr, "ds4: unknown option '%s' (see --help)\n", a);
            return 2;
        }
    }
#undef NEED_ARG
    if ((o.prompt != NULL) + (o.prompt_file != NULL) + (o.prompt_tokens_file != NULL) > 1) {
        fprintf(stderr, "ds4: give only one of -p, --prompt-file and --prompt-tokens-file\n");
        return 2;
    }
    {
        const char *modes[] = {o.dump_logits ? "--dump-logits" : NULL, o.dump_logprobs ? "--dump-logprobs" : NULL,
                               o.perplexity_file ? "--perplexity-file" : NULL, o.inspect ? "--inspect" : NULL,
                               o.imatrix_out ? "--imatrix-out" : NULL, o.dump_tokens ? "--dump-tokens" : NULL,
                               o.worker ? "--worker" : NULL};
        const char *first = NULL;
        for (size_t k = 0; k < sizeof modes / sizeof modes[0]; k++) {
            if (!modes[k]) continue;
            if (first) {
                fprintf(stderr, "ds4: %s and %s are two modes: give one\n", first, modes[k]);
                return 2;
            }
            first = modes[k];
        }
    }
    /* an output that is an input (the model, the MTP file, a prompt) would destroy it; two outputs on one
     * path would lose one of them */
    {
        const char *outs[][2] = {{"--dump-logits", o.dump_logits}, {"--dump-logprobs", o.dump_logprobs},
                                 {"--imatrix-out", o.imatrix_out}, {"--imatrix-dump", o.imatrix_dump}};
        const char *ins[][2] = {{"-m", o.model_path}, {"--mtp", o.mtp_path}, {"--prompt-file", o.prompt_file},
                                {"--prompt-tokens-file", o.prompt_tokens_file},
                                {"--perplexity-file", o.perplexity_file}};
        const size_t n_outs = sizeof outs / sizeof outs[0], n_ins = sizeof ins / sizeof ins[0];
        for (size_t k = 0; k < n_outs; k++) {
            if (!outs[k][1]) continue;
            for (size_t i = 0; i < n_ins; i++)
                if (ins[i][1] && ds4_same_file(outs[k][1], ins[i][1])) {
                    if (i < 2)
                        fprintf(stderr, "ds4: %s %s is the model file: it would be overwritten\n", outs[k][0],
                                outs[k][1]);
                    else
                        fprintf(stderr, "ds4: %s %s is the %s input: it would be overwritten\n", outs[k][0],
                                outs[k][1], ins[i][0]);
                    return 2;
                }
            for (size_t j = k + 1; j < n_outs; j++)
                if (outs[j][1] && (!strcmp(outs[k][1], outs[j][1]) || ds4_same_file(outs[k][1], outs[j][1]))) {
                    fprintf(stderr, "ds4: %s and %s name one file (%s): one would be lost\n", outs[k][0],
                            outs[j][0], outs[k][1]);
                    return 2;
                }
        }
    }
    if (o.perplexity_file && (o.prompt || o.prompt_file || o.prompt_tokens_file)) {
        fprintf(stderr, "ds4: --perplexity-file cannot be combined with a prompt\n");
        return 2;
    }
    if (o.dump_logprobs && !(o.prompt || o.prompt_file || o.prompt_tokens_file)) {
        fprintf(stderr, "ds4: --dump-logprobs needs a prompt (-p or --prompt-file)\n");
        return 2;
    }
    /* switches that mean nothing without their partner: a usage error, not silence */
    if (o.dump_greedy && !o.dump_logits) {
        fprintf(stderr, "ds4: --dump-greedy needs --dump-logits OUT.f32\n");
        return 2;
    }
    if (o.ignore_eos && o.mtp_path) {
        fprintf(stderr, "ds4: --ignore-eos cannot be combined with --mtp (drafts are verified against the model's own picks)\n");
        return 2;
    }
    if (eval_given && !o.dump_logits) {
        fprintf(stderr, "ds4: --eval needs --dump-logits OUT.f32\n");
        return 2;
    }
    if (topk_given && !o.dump_logprobs) {
        fprintf(stderr, "ds4: --logprobs-top-k needs --dump-logprobs FILE\n");
        return 2;
    }
    if (mtp_opts_given && !o.mtp_path) {
        fprintf(stderr, "ds4: --mtp-draft and --mtp-gate need --mtp FILE\n");
        return 2;
    }
    if (o.imatrix_dump && !o.imatrix_out) {
        fprintf(stderr, "ds4: --imatrix-dump needs --imatrix-out FILE.dat\n");
        return 2;
    }
    {
        ds4_err se = {0};
        if (ds4_opts_check_split(&o.split, &se)) {
            fprintf(stderr, "ds4: %s\n", se.msg);
            return 2;
        }
    }
    /* the prompt's files before the model: a typo must not cost a load of tens of GB */
    {
        const char *ins[][2] = {{"--prompt-file", o.prompt_file}, {"--prompt-tokens-file", o.prompt_tokens_file},
                                {"--perplexity-file", o.perplexity_file}};
        for (size_t k = 0; k < sizeof ins / sizeof ins[0]; k++) {
            struct stat st;
            if (!ins[k][1]) continue;
            if (stat(ins[k][1], &st) != 0 || access(ins[k][1], R_OK) != 0) {
                fprintf(stderr, "ds4: %s %s: %s\n", ins[k][0], ins[k][1], strerror(errno));
                return 1;
            }
            if (S_ISDIR(st.st_mode)) {
                fprintf(stderr, "ds4: %s %s: is a directory\n", ins[k][0], ins[k][1]);
                return 1;
            }
        }
    }
    if (o.imatrix_out) return ds4_cli_imatrix(&o);
    if (o.dump_tokens) return ds4_cli_stdout_status(ds4_cli_dump_tokens(&o));
    if (o.worker) {
        if (!o.rank) {
            fprintf(stderr, "ds4: --worker needs --rank R (1..7)\n");
            return 2;
        }
        const char *colon = strrchr(o.worker, ':');
        long port;
        if (!colon || colon == o.worker || ds4_parse_long(colon + 1, 1, 65535, &port)) {
            fprintf(stderr, "ds4: --worker '%s': expected HOST:PORT (port 1..65535), rank 0's --rendezvous\n",
                    o.worker);
            return 2;
        }
        ds4_engine_opts wo = {.model_path = o.model_given ? o.model_path : NULL, .backend = o.backend,
                              .n_threads = o.n_threads, .cuda_sync_debug = o.cuda_sync_debug,
                              .cuda_no_graphs = o.no_graphs, .rank_timeout_s = o.split.rank_timeout_s};
        ds4_err e = {0};
        fprintf(stderr, "ds4: worker rank %d: connecting to %s\n", o.rank, o.worker);
        if (ds4_worker_run(&wo, o.worker, o.rank, &e)) {
            fprintf(stderr, "ds4: worker rank %d: %s\n", o.rank, e.msg);
            return 1;
        }
        fprintf(stderr, "ds4: worker rank %d: rank 0 finished\n", o.rank);
        return 0;
    }
    int rc = o.inspect                                              ? ds4_cli_inspect(&o)
             : o.dump_logits                                        ? ds4_cli_dump_logits(&o)
             : o.dump_logprobs                                      ? ds4_cli_dump_logprobs(&o)
             : o.perplexity_file                                    ? ds4_cli_perplexity(&o)
             : o.prompt || o.prompt_file || o.prompt_tokens_file ? ds4_cli_generate(&o)
                                                                    : ds4_cli_repl(&o);
    return ds4_cli_stdout_status(rc);
}
