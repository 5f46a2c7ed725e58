/* main.c - ds4-convert: writes DeepSeek V4 GGUF files in the published ds4
 * layout from a Hugging Face model directory (--hf), as a random-weight demo
 * model (--demo), or as a tokenizer-only file (--vocab-only).
 *
 * Exit status: 0 ok, 1 conversion error (the message names the file, key or
 * tensor), 2 usage error, 128 + N when signal N (SIGINT, SIGTERM) stopped it.
 *
 * Signals: the first SIGINT or SIGTERM only sets a flag. The tensor producer
 * checks it before every chunk of rows (stream.c) and fails the write, so
 * the GGUF writer removes its temporary file and the output is never
 * created (a file already complete and renamed is kept); main checks it
 * between the steps. The handler does nothing else, being async-signal-safe
 * by construction. A second signal ends the process at once (the temporary
 * file may then remain).
 */
#include <dirent.h>
#include <signal.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "convert.h"
#include "util/file.h"
#include "util/utf8.h"

static volatile sig_atomic_t g_signal;  /* the first SIGINT / SIGTERM received, 0 while none */

static void on_signal(int sig) {
    if (g_signal) {                     /* the second one: stop now */
        static const char msg[] = "\nds4-convert: second signal, exiting at once (an OUT.tmp.* file may remain)\n";
        ssize_t n = write(2, msg, sizeof msg - 1);
        (void)n;
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    g_signal = sig;
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;           /* file writes and joins carry on; the flag is polled */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL); /* a closed terminal or SSH session: the same clean stop */
}

/* DS4_E_CANCEL when a signal arrived (checked between the steps of main). */
static int interrupted(ds4_err *err) {
    return g_signal ? ds4_err_set(err, DS4_E_CANCEL, "interrupted") : 0;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: ds4-convert --hf DIR -o OUT.gguf [--recipe q2|q4|q8_0|f16|f32] [--type-map RULES]\n"
            "                   [--mtp-out MTP.gguf] [--imatrix FILE [--imatrix-strict]] [--threads N]\n"
            "                   [--progress] [--skip-unknown] [--tokenizer FILE.json] [--name NAME] [--dry-run]\n"
            "       ds4-convert --demo -o OUT.gguf [--tokenizer FILE.json] [--seed N] [--recipe ...]\n"
            "       ds4-convert --vocab-only --tokenizer FILE.json -o OUT.gguf\n"
            "\n"
            "  --hf DIR          DeepSeek V4 checkpoint: config.json and *.safetensors (sharded through\n"
            "                    model.safetensors.index.json). The official checkpoint's FP8 E4M3 weights\n"
            "                    (128x128 ue8m0 tiles) and FP4 E2M1 experts (I8, ue8m0 per 32 values) with\n"
            "                    their .scale tensors, or F32 / BF16 / F16 (transformers' save_pretrained)\n"
            "  -o, --out FILE    output GGUF (written through a temporary file, then renamed)\n"
            "  --recipe R        (alias --outtype) the published layout with routed experts as:\n"
            "                    q2: IQ2_XXS gate/up + Q2_K down (the published q2 file); q4: Q4_K (the\n"
            "                    published q4 file); q8_0 (default): Q8_0. All three: Q8_0 attention\n"
            "                    projections, shared experts and output head; F16 embedding, HC, router,\n"
            "                    compressor, indexer; F32 vectors; I32 tid2eid. f16: every matrix F16;\n"
            "                    f32: everything F32 (oracle tests). A row that is not whole blocks of the\n"
            "                    recipe's type falls back to Q8_0, then F16\n"
            "  --type-map RULES  per-tensor types after the recipe: 'PATTERN=TYPE,...' (fnmatch globs on\n"
            "                    GGUF names, e.g. 'blk.4[0-2].ffn_*_exps.weight=q4_K') or a file with one\n"
            "                    rule per line; types f32 f16 bf16 q8_0 q4_K q2_K iq2_xxs. The rules apply to\n"
            "                    the main file and the --mtp-out file alike ('mtp.0.ffn_*_exps.weight=q2_K');\n"
            "                    each must match a tensor of one of them\n"
            "  --mtp-out FILE    also write the MTP file (mtp.0.* tensors: Q4_K experts, Q8_0\n"
            "                    projections, F32 rest)\n"
            "  --imatrix FILE    importance matrix, used for the Q4_K, Q2_K and IQ2_XXS tensors (main and\n"
            "                    MTP file) it has entries for: llama.cpp's legacy .dat (ds4 -m MODEL\n"
            "                    --imatrix-out writes one) or its GGUF imatrix (llama-imatrix's default).\n"
            "                    Entries named as the GGUF tensors (blk.N.ffn_down_exps.weight; per expert\n"
            "                    NAME.expert.E or NAME.expert_E) or as the checkpoint's tensors; entries that\n"
            "                    name no tensor are listed and ignored\n"
            "  --imatrix-strict  a Q4_K/Q2_K/IQ2_XXS tensor of the main file without an entry is an error\n"
            "  --threads N       quantization threads (default: every CPU)\n"
            "  --progress        progress line on stderr (default when stderr is a terminal)\n"
            "  --dry-run         read the checkpoint's headers, apply the recipe, --type-map and --imatrix,\n"
            "                    print the tensor table(s) to be written (name, type, GGUF dims, in file\n"
            "                    order) on stdout; no tensor data is read or written. With -o, OUT gets the\n"
            "                    metadata alone (a GGUF without tensors, for ds4-gguf)\n"
            "  --skip-unknown    list and skip tensors the engine has no use for (else an error)\n"
            "  --tokenizer FILE  add the tokenizer of a tokenizer.json (DeepSeek V3/V4, padded to 129280\n"
            "                    entries, V4 tokens added); default DIR/tokenizer.json when present;\n"
            "                    without one the GGUF has no tokenizer and the engine runs on token ids\n"
            "  --vocab-only      write only the tokenizer (needs --tokenizer)\n"
            "  --demo            write a small random-weight model of DeepSeek V4's structure (hidden 256,\n"
            "                    6 layers: sliding, CSA, HCA, hash MoE) with the full 129280-token vocabulary,\n"
            "                    for trying the text path on a CPU in seconds. ITS WEIGHTS ARE RANDOM: the\n"
            "                    text it generates is meaningless.\n"
            "  --seed N          seed of the demo weights (default 1)\n"
            "  --name NAME       general.name (default: the directory name, or ds4-demo)\n"
            "  -h, --help        this help;  --help-debug: diagnostic switches\n"
            "\n"
            "Ctrl+C (SIGINT) or SIGTERM stops within one chunk of rows: the temporary file is removed, OUT\n"
            "is not created (exit status 130 / 143).\n");
}

static void usage_debug(void) {
    printf("diagnostic switches (not user modes):\n"
           "  --debug-chunk-delay-ms N  sleep N ms before every chunk of rows (tests: a conversion slow\n"
           "                            enough to interrupt)\n");
}

static const char *basename_of(const char *path) {
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--;
    static char buf[256];
    size_t b = n;
    while (b > 0 && path[b - 1] != '/') b--;
    snprintf(buf, sizeof buf, "%.*s", (int)(n - b), path + b);
    return buf;
}

/* Tokenizer size (after padding) must equal the model's vocabulary. */
static int check_tokenizer(const char *path, int n_vocab, ds4_err *err) {
    ds4_tokjson tj;
    int rc = ds4_tokjson_load(&tj, path, DS4_CONVERT_V4_N_VOCAB, err);
    if (rc) return rc;
    int n = tj.n_tokens;
    ds4_tokjson_free(&tj);
    if (n != n_vocab)
        return ds4_err_set(err, DS4_E_MODEL, "%s has %d tokens (padded), but the model's vocab_size is %d", path, n,
                           n_vocab);
    return 0;
}

static int n_written(const ds4_conv_plan *p) {
    int n = 0;
    for (int i = 0; i < p->n; i++) n += p->t[i].src != DS4_SRC_NONE;
    return n;
}

static int parse_recipe(const char *t, ds4_conv_outtype *ot) {
    static const struct { const char *name; ds4_conv_outtype ot; } r[] = {
        {"f32", DS4_OUT_F32}, {"f16", DS4_OUT_F16}, {"q8_0", DS4_OUT_Q8_0}, {"q4", DS4_OUT_Q4}, {"q2", DS4_OUT_Q2},
    };
    for (size_t i = 0; i < sizeof r / sizeof r[0]; i++)
        if (!strcmp(t, r[i].name)) {
            *ot = r[i].ot;
            return 0;
        }
    return -1;
}

/* Everything of a --hf conversion beyond the tensor plan. */
typedef struct {
    const char *type_map, *mtp_out, *imatrix;
    bool imatrix_strict;
    ds4_conv_bind_opts bind;
    ds4_conv_stream_opts stream;
} hf_opts;

static void summary(const char *out, const ds4_conv_plan *plan, const ds4_gguf_writer *w) {
    double sec;
    uint64_t in;
    int nt;
    ds4_conv_stream_totals(&sec, &in, &nt);
    fprintf(stderr, "ds4-convert: wrote %s (%d tensors, %.1f MiB) from %.3f GB of input in %.1f s (%.3f GB/s, %d "
            "threads)\n", out, n_written(plan), (double)ds4_gguf_writer_file_bytes(w) / (1 << 20), (double)in / 1e9,
            sec, sec > 0 ? (double)in / 1e9 / sec : 0.0, nt);
}

/* Binds the MTP file's plan to the mtp.N.* tensors of the checkpoint
 * (docs/FORMATS.md D.3); done before the main file is written, so a
 * checkpoint without a usable MTP block fails before any output. */
static int bind_mtp(const hf_opts *o, const ds4_conv_hparams *hp, const ds4_st *st, ds4_conv_plan *plan,
                    ds4_err *err) {
    ds4_conv_bind_opts b = o->bind;
    b.mtp = true;
    int rc = ds4_conv_bind_hf_opts(plan, hp, st, &b, err);
    if (rc) ds4_err_prefix(err, "--mtp-out %s", o->mtp_out);
    return rc;
}

/* stdout took everything written to it (a full disk or /dev/full: not) */
static bool stdout_ok(void) {
    errno = 0;
    return fflush(stdout) == 0 && !ferror(stdout);
}

/* --dry-run: the tensor table a conversion would write, in file order, one
 * line per tensor: NAME, type, dims (GGUF ne, comma-separated). */
static void print_plan(const ds4_conv_plan *p) {
    for (int i = 0; i < p->n; i++) {
        const ds4_conv_tensor *t = &p->t[i];
        if (t->src == DS4_SRC_NONE) continue;      /* not written: same rule as ds4_conv_add_tensors_opts */
        printf("%s\t%s\t%lld", t->name, ds4_ggml_type_name(t->type), (long long)t->ne[0]);
        for (int d = 1; d < t->n_dims; d++) printf(",%lld", (long long)t->ne[d]);
        putchar('\n');
    }
}

/* Writes the MTP file of a bound plan. */
static int write_mtp(const hf_opts *o, const ds4_conv_hparams *hp, ds4_conv_plan *plan, const char *name,
                     ds4_err *err) {
    ds4_gguf_writer *w = ds4_gguf_writer_new();
    char nm[300];
    snprintf(nm, sizeof nm, "%s MTP", name);
    int rc = 0;
    {
        ds4_gguf_writer_add_str(w, "general.architecture", "deepseek4", 9);
        ds4_gguf_writer_add_str(w, "general.type", "mtp", 3);
        ds4_gguf_writer_add_str(w, "general.name", nm, strlen(nm));
        ds4_gguf_writer_add_u32(w, "deepseek4.nextn_predict_layers", (uint32_t)hp->nextn);
        rc = ds4_conv_add_tensors_opts(w, plan, &o->stream, err);
    }
    if (!rc) rc = ds4_gguf_writer_write_file(w, o->mtp_out, err);
    if (!rc) summary(o->mtp_out, plan, w);
    else ds4_err_prefix(err, "--mtp-out %s", o->mtp_out);
    ds4_gguf_writer_free(w);
    return rc;
}

int main(int argc, char **argv) {
    const char *hf = NULL, *out = NULL, *tok = NULL, *name = NULL;
    bool demo = false, vocab_only = false, dry_run = false;
    ds4_conv_outtype ot = DS4_OUT_Q8_0;
    unsigned long long seed = 1;
    hf_opts ho = {0};
    ho.stream.progress = isatty(2);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return stdout_ok() ? 0 : 1;
        } else if (!strcmp(a, "--help-debug")) {
            usage_debug();
            return stdout_ok() ? 0 : 1;
        } else if (has_val && !strcmp(a, "--debug-chunk-delay-ms")) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end || !(argv[i][0] >= '0' && argv[i][0] <= '9') || n < 0 || n > 60000) {
                fprintf(stderr, "ds4-convert: --debug-chunk-delay-ms wants 0..60000, got '%s'\n", argv[i]);
                return 2;
            }
            ho.stream.delay_ms = (int)n;
        } else if (!strcmp(a, "--demo")) {
            demo = true;
        } else if (!strcmp(a, "--dry-run")) {
            dry_run = true;
        } else if (!strcmp(a, "--vocab-only")) {
            vocab_only = true;
        } else if (has_val && !strcmp(a, "--hf")) {
            hf = argv[++i];
        } else if (has_val && (!strcmp(a, "-o") || !strcmp(a, "--out"))) {
            out = argv[++i];
        } else if (has_val && !strcmp(a, "--tokenizer")) {
            tok = argv[++i];
        } else if (has_val && !strcmp(a, "--name")) {
            name = argv[++i];
            if (!*name) {
                fprintf(stderr, "ds4-convert: --name must not be empty\n");
                return 2;
            }
        } else if (has_val && !strcmp(a, "--seed")) {
            char *end;
            errno = 0;
            seed = strtoull(argv[++i], &end, 10);
            /* strtoull takes "-5" as 2^64 - 5, and saturates past 2^64 - 1 (ERANGE) */
            /* and skips leading blanks and a '+': digits only, as every other number */
            if (*end || !(argv[i][0] >= '0' && argv[i][0] <= '9') || errno == ERANGE) {
                fprintf(stderr, "ds4-convert: --seed wants an integer in 0..18446744073709551615, got '%s'\n",
                        argv[i]);
                return 2;
            }
        } else if (has_val && (!strcmp(a, "--outtype") || !strcmp(a, "--recipe"))) {
            if (parse_recipe(argv[++i], &ot)) {
                fprintf(stderr, "ds4-convert: %s must be q2, q4, q8_0, f16 or f32, got '%s'\n", a, argv[i]);
                return 2;
            }
        } else if (has_val && !strcmp(a, "--type-map")) {
            ho.type_map = argv[++i];
        } else if (has_val && !strcmp(a, "--mtp-out")) {
            ho.mtp_out = argv[++i];
        } else if (has_val && !strcmp(a, "--imatrix")) {
            ho.imatrix = argv[++i];
        } else if (!strcmp(a, "--imatrix-strict")) {
            ho.imatrix_strict = true;
        } else if (!strcmp(a, "--skip-unknown")) {
            ho.bind.skip_unknown = true;
        } else if (!strcmp(a, "--progress")) {
            ho.stream.progress = true;
        } else if (has_val && !strcmp(a, "--threads")) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end || !(argv[i][0] >= '0' && argv[i][0] <= '9') || n < 1 || n > 256) {
                fprintf(stderr, "ds4-convert: --threads wants 1..256, got '%s'\n", argv[i]);
                return 2;
            }
            ho.stream.n_threads = (int)n;
        } else {
            fprintf(stderr, "ds4-convert: unknown or incomplete option '%s' (see --help)\n", a);
            return 2;
        }
    }
    if ((!out && !dry_run) || (!!hf + demo + vocab_only) != 1 || (vocab_only && !tok)) {
        fprintf(stderr, "ds4-convert: need -o (or --dry-run) and exactly one of --hf DIR, --demo, --vocab-only "
                "--tokenizer FILE\n");
        usage(stderr);
        return 2;
    }
    if (!hf && (ho.type_map || ho.mtp_out || ho.imatrix)) {
        fprintf(stderr, "ds4-convert: --type-map, --mtp-out and --imatrix need --hf DIR\n");
        return 2;
    }
    if (ho.imatrix_strict && !ho.imatrix) {
        fprintf(stderr, "ds4-convert: --imatrix-strict needs --imatrix FILE\n");
        return 2;
    }
    /* general.name is a GGUF string: valid UTF-8 without control characters (the loader refuses a file whose
     * strings are not UTF-8); the default is the checkpoint directory's name */
    {
        const char *nm = name ? name : hf ? basename_of(hf) : NULL;
        const size_t n = nm ? strlen(nm) : 0;
        if (!ds4_utf8_text(nm ? nm : "", n)) {
            char esc[200];
            fprintf(stderr, "ds4-convert: %s '%s' is not valid UTF-8 text (general.name)%s\n",
                    name ? "--name" : "the checkpoint directory's name", ds4_escaped(esc, sizeof esc, nm, n, 64),
                    name ? "" : ": give --name NAME");
            return 2;
        }
    }

    /* the outputs before any work: a path a rename may replace (not a device, FIFO or directory, in a directory
     * that exists), two different files, and none of them an input (it would be replaced by the output) */
    {
        ds4_err pe = {0};
        const char *outs[2] = {out, ho.mtp_out};
        for (int k = 0; k < 2; k++)
            if (outs[k] && ds4_output_path_ok(outs[k], &pe)) {
                fprintf(stderr, "ds4-convert: %s%s\n", k ? "--mtp-out " : "-o ", pe.msg);
                return 2;
            }
        if (out && ho.mtp_out && ds4_same_path(out, ho.mtp_out)) {
            fprintf(stderr, "ds4-convert: -o and --mtp-out name the same file (%s)\n", out);
            return 2;
        }
        const char *ins[4] = {tok, ho.imatrix, ho.type_map, NULL};
        for (int k = 0; k < 2; k++) {
            if (!outs[k]) continue;
            for (int q = 0; q < 3; q++)
                if (ins[q] && ds4_same_file(outs[k], ins[q])) {
                    fprintf(stderr, "ds4-convert: %s %s is an input of this conversion\n", k ? "--mtp-out" : "-o",
                            outs[k]);
                    return 2;
                }
            DIR *d = hf ? opendir(hf) : NULL;
            struct dirent *de;
            while (d && (de = readdir(d))) {
                char in[4600];
                snprintf(in, sizeof in, "%s/%s", hf, de->d_name);
                if (de->d_name[0] != '.' && ds4_same_file(outs[k], in)) {
                    fprintf(stderr, "ds4-convert: %s %s is a file of the checkpoint %s\n", k ? "--mtp-out" : "-o",
                            outs[k], hf);
                    closedir(d);
                    return 2;
                }
            }
            if (d) closedir(d);
        }
    }
    /* a file-size limit (ulimit -f) must fail the write with EFBIG, which removes the temporary file, instead of
     * killing the process with SIGXFSZ and leaving a partial one */
    signal(SIGXFSZ, SIG_IGN);
    ds4_tmp_fatal_signals("ds4-convert"); /* SIGBUS (an input truncated under us) etc.: no OUT.tmp.* left */
    install_signals();
    ho.stream.cancel = &g_signal;
    ds4_err err = {0};
    ds4_gguf_writer *w = ds4_gguf_writer_new();
    ds4_conv_hparams hp = {0};
    ds4_conv_plan plan = {0}, mplan = {0};
    ds4_st st = {0};
    ds4_conv_imatrix im = {0};
    char tok_default[4096];
    int rc = 0;
    if (hf && !tok) {                       /* the checkpoint's own tokenizer.json, when it has one */
        snprintf(tok_default, sizeof tok_default, "%s/tokenizer.json", hf);
        /* present but unreadable (a dangling link, no permission): an error, not a file without a tokenizer */
        struct stat tst;
        if (access(tok_default, R_OK) == 0) tok = tok_default;
        else if (lstat(tok_default, &tst) == 0) {
            fprintf(stderr, "ds4-convert: %s: %s (give --tokenizer FILE, or fix it)\n", tok_default,
                    errno == ENOENT ? "a link to nothing" : strerror(errno));
            ds4_gguf_writer_free(w);
            return 1;
        }
    }
    if (vocab_only) {
        ds4_gguf_writer_add_str(w, "general.architecture", "deepseek4", 9);
        ds4_gguf_writer_add_str(w, "general.type", "vocab", 5);
        const char *nm = name ? name : "ds4-vocab";
        ds4_gguf_writer_add_str(w, "general.name", nm, strlen(nm));
        rc = ds4_convert_add_tokenizer(w, tok, &err);
    } else {
        if (demo) {
            ds4_conv_demo_hparams(&hp, DS4_CONVERT_V4_N_VOCAB);
        } else {
            char cfg[4096];
            snprintf(cfg, sizeof cfg, "%s/config.json", hf);
            if (!(rc = ds4_conv_read_config(&hp, cfg, &err))) rc = ds4_st_open_dir(&st, hf, &err);
        }
        if (!rc && tok) rc = check_tokenizer(tok, hp.n_vocab, &err);
        if (!rc) rc = ds4_conv_plan_layout(&plan, &hp, ot, &err);
        if (!rc && ho.mtp_out && (rc = ds4_conv_plan_mtp(&mplan, &hp, ot, &err)))
            ds4_err_prefix(&err, "--mtp-out %s", ho.mtp_out);
        if (!rc && ho.type_map) {                   /* one rule set for both files */
            ds4_conv_plan *plans[2] = {&plan, &mplan};
            rc = ds4_conv_plan_type_map(plans, ho.mtp_out ? 2 : 1, ho.type_map, &err);
        }
        ho.bind.mtp_elsewhere = ho.mtp_out != NULL;
        if (!rc) {
            if (demo) ds4_conv_demo_bind(&plan, &hp, seed);
            else rc = ds4_conv_bind_hf_opts(&plan, &hp, &st, &ho.bind, &err);
        }
        if (!rc && ho.mtp_out) rc = bind_mtp(&ho, &hp, &st, &mplan, &err);
        int n_imat = 0;
        if (!rc && ho.imatrix && !(rc = ds4_conv_imatrix_load(&im, ho.imatrix, &err))) {
            ds4_conv_plan *plans[2] = {&plan, &mplan};
            rc = ds4_conv_imatrix_apply(&im, plans, ho.mtp_out ? 2 : 1, ho.imatrix_strict, &n_imat, &err);
            if (!rc)
                fprintf(stderr, "ds4-convert: %s: importance for %d of the Q4_K/Q2_K/IQ2_XXS tensors\n", ho.imatrix,
                        n_imat);
        }
        const char *nm = name ? name : demo ? "ds4-demo (random weights, meaningless text)" : basename_of(hf);
        if (!rc) rc = ds4_conv_add_metadata(w, &hp, nm, ot, &err);
        if (!rc && tok) rc = ds4_convert_add_tokenizer(w, tok, &err);
        if (!rc && ho.imatrix) rc = ds4_conv_imatrix_add_metadata(w, &im, &err);
        if (!rc && !dry_run) rc = ds4_conv_add_tensors_opts(w, &plan, &ho.stream, &err);
    }
    bool out_done = false;          /* OUT complete under its name (kept whatever follows) */
    if (!rc) rc = interrupted(&err);
    if (dry_run) {                  /* the tables; with -o, the metadata alone (a GGUF without tensors) */
        if (!rc) print_plan(&plan);
        if (!rc) print_plan(&mplan);
        if (!rc && !stdout_ok()) /* > /dev/full: the table, the dry run's whole result, was lost */
            rc = ds4_err_set(&err, DS4_E_IO, "--dry-run: cannot write the table to stdout: %s",
                             strerror(errno ? errno : EIO));
        if (!rc && out) out_done = !(rc = ds4_gguf_writer_write_file(w, out, &err));
    } else {
        if (!rc) out_done = !(rc = ds4_gguf_writer_write_file(w, out, &err));
        if (!rc) summary(out, &plan, w);
        if (!rc && ho.mtp_out && !(rc = interrupted(&err)))
            rc = write_mtp(&ho, &hp, &mplan, name ? name : basename_of(hf), &err);
    }
    if (g_signal) {                 /* whatever failed after the signal, say what is left on disk */
        const char *sn = g_signal == SIGINT    ? "SIGINT"
                         : g_signal == SIGTERM ? "SIGTERM"
                         : g_signal == SIGHUP  ? "SIGHUP"
                                               : "a signal";
        if (!out_done)
            fprintf(stderr, "ds4-convert: interrupted by %s: %s not written (no temporary file left)\n", sn,
                    out ? out : "the output");
        else if (ho.mtp_out && !dry_run)
            fprintf(stderr, "ds4-convert: interrupted by %s: %s is complete; --mtp-out %s not written (no temporary "
                    "file left)\n", sn, out, ho.mtp_out);
        else
            fprintf(stderr, "ds4-convert: interrupted by %s after %s was complete (kept)\n", sn, out);
        rc = 128 + g_signal;
    } else if (rc) {
        fprintf(stderr, "ds4-convert: %s\n", err.msg[0] ? err.msg : "failed");
        rc = 1;
    }
    ds4_conv_imatrix_free(&im);
    ds4_gguf_writer_free(w);
    ds4_conv_plan_free(&plan);
    ds4_conv_plan_free(&mplan);
    ds4_st_close(&st);
    ds4_conv_hparams_free(&hp);
    return rc;
}
