/* imatrix.c - `ds4 -m MODEL --imatrix-out FILE.dat --prompt-file CALIB.txt`
 * (or --prompt-tokens-file F): collects the importance matrix of the routed
 * experts over a calibration set and writes it in llama.cpp's legacy .dat
 * format (docs/FORMATS.md C.7), which ds4-convert --imatrix reads.
 *
 * Calibration text: blocks separated by lines that begin with
 * "===== DS4_IMATRIX_PROMPT" (a file without such lines is one block); each
 * block is whitespace-trimmed, tokenized as a rendered chat (marker strings
 * recognised), truncated to -c tokens and prefilled in a fresh session.
 *
 * What is collected (through the engine's expert observer, CPU backend):
 * per layer and expert, over every (token, slot) routed to it, the mean of
 * x[c]^2 of the FFN input (entries blk.N.ffn_gate_exps.weight and
 * ffn_up_exps.weight, identical) and the mean of a[f]^2 of the
 * down-projection input, SwiGLU times the route weight (ffn_down_exps).
 * Values are expert-major (values[e * ncols + c]), ncall = 1; an expert
 * never routed gets 1.0 everywhere. The trailer holds the number of
 * prefill batches and the calibration file's path. Sums are double.
 *
 * The .dat goes through a temporary file renamed over FILE once complete and
 * fsync'ed: a full disk, a file-size limit or any other failed write leaves
 * FILE as it was and no temporary file, and says why ("disk full ...").
 *
 * --imatrix-dump FILE (tests): also appends every observer call as raw
 * records: int32 il, n, k, D, F; x (n, D) f32; ids (n, k) i32; w (n, k) f32;
 * act (n, k, F) f32.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "util/file.h"
#include "ds4_debug.h"

#define SEPARATOR "===== DS4_IMATRIX_PROMPT"

typedef struct collector {
    ds4_debug_moe_shape sh;
    double *sx;        /* (n_layer, n_expert, n_embd) sums of x^2 */
    double *sa;        /* (n_layer, n_expert, n_ff) sums of act^2 */
    int64_t *cnt;      /* (n_layer, n_expert) routed (token, slot) pairs */
    int64_t batches;   /* prefill batches (layer-0 observer calls) */
    FILE *dump;        /* --imatrix-dump, or NULL */
    bool dump_failed;
} collector;

static void observe(void *user, int il, int n, const float *x, const int32_t *ids, const float *w,
                    const float *act) {
    collector *c = user;
    const int D = c->sh.n_embd, F = c->sh.n_ff, K = c->sh.n_used, E = c->sh.n_expert;
    if (il == 0) c->batches++;
    for (int t = 0; t < n; t++)
        for (int k = 0; k < K; k++) {
            int e = ids[t * K + k];
            if (e < 0 || e >= E) continue;   /* the backend checked the ids already */
            size_t le = (size_t)il * E + (size_t)e;
            c->cnt[le]++;
            double *sx = c->sx + le * D, *sa = c->sa + le * F;
            const float *xr = x + (size_t)t * D, *ar = act + ((size_t)t * K + k) * F;
            for (int i = 0; i < D; i++) sx[i] += (double)xr[i] * xr[i];
            for (int i = 0; i < F; i++) sa[i] += (double)ar[i] * ar[i];
        }
    if (c->dump && !c->dump_failed) {
        int32_t hdr[5] = {il, n, K, D, F};
        bool ok = fwrite(hdr, 4, 5, c->dump) == 5 && fwrite(x, 4, (size_t)n * D, c->dump) == (size_t)n * D &&
                  fwrite(ids, 4, (size_t)n * K, c->dump) == (size_t)n * K &&
                  fwrite(w, 4, (size_t)n * K, c->dump) == (size_t)n * K &&
                  fwrite(act, 4, (size_t)n * K * F, c->dump) == (size_t)n * K * F;
        if (!ok) c->dump_failed = true;
    }
}

/* One entry: name, ncall 1, the per-expert means of sums (ncols per expert). */
static bool put_entry(FILE *f, const collector *c, int il, const char *which, const double *sums, int ncols) {
    char name[96];
    int len = snprintf(name, sizeof name, "blk.%d.%s.weight", il, which);
    const int E = c->sh.n_expert;
    int32_t hdr[3] = {1, (int32_t)((int64_t)E * ncols), 0};
    bool ok = fwrite(&len, 4, 1, f) == 1 && fwrite(name, 1, (size_t)len, f) == (size_t)len &&
              fwrite(hdr, 4, 2, f) == 2;
    float *row = malloc((size_t)ncols * sizeof(float));
    if (!row) return false;
    for (int e = 0; ok && e < E; e++) {
        int64_t n = c->cnt[(size_t)il * E + e];
        const double *s = sums + ((size_t)il * E + e) * ncols;
        for (int i = 0; i < ncols; i++) row[i] = n ? (float)(s[i] / (double)n) : 1.0f;
        ok = fwrite(row, sizeof(float), (size_t)ncols, f) == (size_t)ncols;
    }
    free(row);
    return ok;
}

/* The entries and the trailer into f; false on a failed write (errno set). */
static bool put_dat(FILE *f, const collector *c, const char *dataset) {
    int32_t n_entries = 3 * c->sh.n_layer;
    bool ok = fwrite(&n_entries, 4, 1, f) == 1;
    for (int il = 0; ok && il < c->sh.n_layer; il++)
        ok = put_entry(f, c, il, "ffn_gate_exps", c->sx, c->sh.n_embd) &&
             put_entry(f, c, il, "ffn_up_exps", c->sx, c->sh.n_embd) &&
             put_entry(f, c, il, "ffn_down_exps", c->sa, c->sh.n_ff);
    int32_t chunks = (int32_t)c->batches, dlen = (int32_t)strlen(dataset);
    return ok && fwrite(&chunks, 4, 1, f) == 1 && fwrite(&dlen, 4, 1, f) == 1 &&
           fwrite(dataset, 1, (size_t)dlen, f) == (size_t)dlen;
}

/* Writes path whole or not at all (ds4_out: a fresh temporary file beside
 * it, renamed over it once flushed and fsync'ed): a failed run leaves path
 * untouched and no temporary file; "disk full" for ENOSPC, "file too large"
 * for EFBIG (SIGXFSZ is ignored, so a file-size limit fails the write). */
static int write_dat(const collector *c, const char *path, const char *dataset) {
    ds4_out out;
    ds4_err err = {0};
    if (ds4_out_open(&out, path, "wb", &err) || (put_dat(out.f, c, dataset), ds4_out_commit(&out, &err))) {
        fprintf(stderr, "ds4: %s\n", err.msg);
        return 1;
    }
    return 0;
}

/* Tokenizes one block (rendered chat) onto the list. */
static int add_block(ds4_engine *e, const char *path, const char *b, size_t len, ds4_cli_toks **blocks,
                     int *n_blocks, int *cap) {
    if (*n_blocks == *cap) {
        *cap = *cap ? *cap * 2 : 16;
        ds4_cli_toks *nb = realloc(*blocks, (size_t)*cap * sizeof *nb);
        if (!nb) return -1;
        *blocks = nb;
    }
    ds4_cli_toks *t = &(*blocks)[(*n_blocks)++];
    memset(t, 0, sizeof *t);
    ds4_err err = {0};
    int cap_ids = len < (1u << 30) ? (int)len + 1 : 1 << 30;   /* never more ids than bytes */
    int n = -1;
    if ((t->v = malloc((size_t)cap_ids * sizeof(int32_t)))) n = ds4_tokenize(e, b, len, true, t->v, cap_ids, &err);
    if (n < 0 || n > cap_ids) {
        fprintf(stderr, "ds4: %s: cannot tokenize block %d: %s\n", path, *n_blocks,
                err.msg[0] ? err.msg : "out of memory");
        return -1;
    }
    t->n = t->cap = n;
    return 0;
}

/* Calibration blocks as token lists (appended to *blocks, n_blocks). */
static int read_blocks(ds4_engine *e, const ds4_cli_opts *o, ds4_cli_toks **blocks, int *n_blocks) {
    if (o->prompt_tokens_file) {
        *blocks = calloc(1, sizeof **blocks);
        if (!*blocks) return -1;
        *n_blocks = 1;
        return ds4_cli_read_token_file(o->prompt_tokens_file, ds4_engine_n_vocab(e), &(*blocks)[0]);
    }
    if (!ds4_has_tokenizer(e)) {
        fprintf(stderr, "ds4: the model has no tokenizer; give token ids with --prompt-tokens-file\n");
        return -1;
    }
    size_t len;
    char *text = ds4_cli_read_file(o->prompt_file, &len);
    if (!text) return -1;
    int cap = 0, rc = 0;
    char *start = text, *line = text;
    for (;;) {
        bool eof = !*line, sep = !eof && !strncmp(line, SEPARATOR, strlen(SEPARATOR));
        if (eof || sep) {                   /* the block [start, line) ends here */
            char *b = start, *z = line;
            while (b < z && (*b == ' ' || *b == '\n' || *b == '\t' || *b == '\r')) b++;
            while (z > b && (z[-1] == ' ' || z[-1] == '\n' || z[-1] == '\t' || z[-1] == '\r')) z--;
            if (z > b && (rc = add_block(e, o->prompt_file, b, (size_t)(z - b), blocks, n_blocks, &cap))) break;
        }
        if (eof) break;
        char *nl = strchr(line, '\n');
        line = nl ? nl + 1 : line + strlen(line);
        if (sep) start = line;
    }
    free(text);
    return rc;
}

int ds4_cli_imatrix(const ds4_cli_opts *o) {
    if (!o->prompt_file && !o->prompt_tokens_file) {
        fprintf(stderr, "ds4: --imatrix-out needs --prompt-file CALIB.txt or --prompt-tokens-file F\n");
        return 2;
    }
    ds4_err pe = {0};
    if (ds4_output_path_ok(o->imatrix_out, &pe)) { /* before the long run; the file is renamed over it */
        fprintf(stderr, "ds4: --imatrix-out %s\n", pe.msg);
        return 2;
    }
    ds4_engine *e = ds4_cli_open_engine(o, false);
    if (!e) return 1;
    collector c = {0};
    ds4_cli_toks *blocks = NULL;
    int n_blocks = 0, rc = 1;
    ds4_err err = {0};
    if (ds4_debug_moe_dims(e, &c.sh) != 0) goto out;
    const size_t le = (size_t)c.sh.n_layer * c.sh.n_expert;
    c.sx = calloc(le * c.sh.n_embd, sizeof(double));
    c.sa = calloc(le * c.sh.n_ff, sizeof(double));
    c.cnt = calloc(le, sizeof(int64_t));
    if (!c.sx || !c.sa || !c.cnt) {
        fprintf(stderr, "ds4: out of memory for the imatrix sums\n");
        goto out;
    }
    if (o->imatrix_dump && !(c.dump = fopen(o->imatrix_dump, "wb"))) {
        fprintf(stderr, "ds4: cannot create %s: %s\n", o->imatrix_dump, strerror(errno));
        goto out;
    }
    if (ds4_debug_set_moe_observer(e, observe, &c, &err) != 0) {
        fprintf(stderr, "ds4: --imatrix-out: %s\n", err.msg);
        goto out;
    }
    if (read_blocks(e, o, &blocks, &n_blocks) != 0) goto out;
    int64_t n_tok = 0, n_cut = 0;
    double t0 = ds4_cli_now();
    for (int b = 0; b < n_blocks; b++) {
        int n = blocks[b].n < o->n_ctx ? blocks[b].n : o->n_ctx;
        if (n < 1) continue;
        if (n < blocks[b].n) n_cut += blocks[b].n - n;
        ds4_session_opts so = {.n_ctx = n};
        ds4_session *s = NULL;
        if (ds4_session_new(e, &so, &s, &err) != 0 ||
            ds4_session_extend(s, blocks[b].v, n, DS4_EVAL_PREFILL, 0, NULL, &err) != 0) {
            fprintf(stderr, "ds4: block %d: %s\n", b + 1, err.msg);
            ds4_session_free(s);
            goto out;
        }
        ds4_session_free(s);
        n_tok += n;
        fprintf(stderr, "\rds4: imatrix: block %d/%d, %lld tokens, %.1f s", b + 1, n_blocks, (long long)n_tok,
                ds4_cli_now() - t0);
    }
    fputc('\n', stderr);
    if (n_cut)
        fprintf(stderr, "ds4: imatrix: %lld calibration tokens past --ctx %d were not used (blocks longer than the "
                "context are cut; raise --ctx or split the blocks)\n", (long long)n_cut, o->n_ctx);
    if (n_tok == 0) {
        fprintf(stderr, "ds4: --imatrix-out: the calibration input has no tokens: nothing written\n");
        goto out;
    }
    if (c.dump && (fclose(c.dump) != 0 || c.dump_failed)) {
        c.dump = NULL;
        fprintf(stderr, "ds4: cannot write %s\n", o->imatrix_dump);
        goto out;
    }
    c.dump = NULL;
    const char *dataset = o->prompt_file ? o->prompt_file : o->prompt_tokens_file;
    if (write_dat(&c, o->imatrix_out, dataset) != 0) goto out;
    fprintf(stderr, "ds4: wrote %s (%d entries, %lld tokens in %lld batches)\n", o->imatrix_out, 3 * c.sh.n_layer,
            (long long)n_tok, (long long)c.batches);
    rc = 0;
out:
    if (c.dump) fclose(c.dump);
    for (int b = 0; b < n_blocks; b++) free(blocks[b].v);
    free(blocks);
    free(c.sx);
    free(c.sa);
    free(c.cnt);
    ds4_engine_close(e);
    return rc;
}
