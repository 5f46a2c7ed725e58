/* main.c - ds4-convert: writes DeepSeek V4 GGUF files in the published ds4
 * layout from a Hugging Face model directory (--hf), as a random-weight demo
 * model (--demo), or as a tokenizer-only file (--vocab-only).
 *
 * Exit status: 0 ok, 1 conversion error (the message names the file, key or
 * tensor), 2 usage error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: ds4-convert --hf DIR -o OUT.gguf [--outtype f32|f16|q8_0] [--tokenizer FILE.json]\n"
            "       ds4-convert --demo -o OUT.gguf [--tokenizer FILE.json] [--seed N] [--outtype ...]\n"
            "       ds4-convert --vocab-only --tokenizer FILE.json -o OUT.gguf\n"
            "\n"
            "  --hf DIR          Hugging Face DeepSeek V4 directory: config.json and *.safetensors\n"
            "                    (F32, BF16 or F16; sharded through model.safetensors.index.json)\n"
            "  -o, --out FILE    output GGUF (written through a temporary file, then renamed)\n"
            "  --outtype T       f32: every tensor F32 (oracle tests); f16: matrices F16;\n"
            "                    q8_0 (default): the published recipe's types with Q8_0 for the\n"
            "                    attention projections, shared and routed experts and the output head,\n"
            "                    F16 for embedding, HC, router, compressor and indexer; vectors F32,\n"
            "                    tid2eid I32\n"
            "  --tokenizer FILE  add the tokenizer of a tokenizer.json (DeepSeek V3/V4, padded to 129280\n"
            "                    entries, V4 tokens added); without it the GGUF has no tokenizer and the\n"
            "                    engine runs on token ids\n"
            "  --vocab-only      write only the tokenizer (needs --tokenizer)\n"
            "  --demo            write a small random-weight model of DeepSeek V4's structure (hidden 256,\n"
            "                    6 layers: sliding, CSA, HCA, hash MoE) with the full 129280-token vocabulary,\n"
            "                    for trying the text path on a CPU in seconds. ITS WEIGHTS ARE RANDOM: the\n"
            "                    text it generates is meaningless.\n"
            "  --seed N          seed of the demo weights (default 1)\n"
            "  --name NAME       general.name (default: the directory name, or ds4-demo)\n");
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

int main(int argc, char **argv) {
    const char *hf = NULL, *out = NULL, *tok = NULL, *name = NULL;
    bool demo = false, vocab_only = false;
    ds4_conv_outtype ot = DS4_OUT_Q8_0;
    unsigned long long seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--demo")) {
            demo = true;
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
        } else if (has_val && !strcmp(a, "--seed")) {
            char *end;
            seed = strtoull(argv[++i], &end, 10);
            if (*end || !*argv[i]) {
                fprintf(stderr, "ds4-convert: --seed wants a non-negative integer, got '%s'\n", argv[i]);
                return 2;
            }
        } else if (has_val && !strcmp(a, "--outtype")) {
            const char *t = argv[++i];
            if (!strcmp(t, "f32")) ot = DS4_OUT_F32;
            else if (!strcmp(t, "f16")) ot = DS4_OUT_F16;
            else if (!strcmp(t, "q8_0")) ot = DS4_OUT_Q8_0;
            else {
                fprintf(stderr, "ds4-convert: --outtype must be f32, f16 or q8_0, got '%s'\n", t);
                return 2;
            }
        } else {
            fprintf(stderr, "ds4-convert: unknown or incomplete option '%s' (see --help)\n", a);
            return 2;
        }
    }
    if (!out || (!!hf + demo + vocab_only) != 1 || (vocab_only && !tok)) {
        fprintf(stderr, "ds4-convert: need -o and exactly one of --hf DIR, --demo, --vocab-only --tokenizer FILE\n");
        usage(stderr);
        return 2;
    }

    ds4_err err = {0};
    ds4_gguf_writer *w = ds4_gguf_writer_new();
    ds4_conv_hparams hp = {0};
    ds4_conv_plan plan = {0};
    ds4_st st = {0};
    int rc = 0;
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
        if (!rc) {
            if (demo) ds4_conv_demo_bind(&plan, &hp, seed);
            else rc = ds4_conv_bind_hf(&plan, &hp, &st, &err);
        }
        const char *nm = name ? name : demo ? "ds4-demo (random weights, meaningless text)" : basename_of(hf);
        if (!rc) rc = ds4_conv_add_metadata(w, &hp, nm, ot, &err);
        if (!rc && tok) rc = ds4_convert_add_tokenizer(w, tok, &err);
        if (!rc) rc = ds4_conv_add_tensors(w, &plan, &err);
    }
    if (!rc) rc = ds4_gguf_writer_write_file(w, out, &err);
    if (!rc)
        fprintf(stderr, "ds4-convert: wrote %s (%d tensors, %.1f MiB)\n", out, n_written(&plan),
                (double)ds4_gguf_writer_file_bytes(w) / (1 << 20));
    else
        fprintf(stderr, "ds4-convert: %s\n", err.msg[0] ? err.msg : "failed");
    ds4_gguf_writer_free(w);
    ds4_conv_plan_free(&plan);
    ds4_st_close(&st);
    ds4_conv_hparams_free(&hp);
    return rc ? 1 : 0;
}
