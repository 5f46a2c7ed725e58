/* imatrix.c - importance matrices for ds4-convert --imatrix FILE: read whole
 * into memory (a full-model file is ~0.7 GB at most: 129 expert entries of
 * 256 x 4096 floats), bound to the planned tensors that use one (C.6: Q4_K,
 * Q2_K and IQ2_XXS), and the quantize.imatrix.* metadata of C.8.
 *
 * Two file formats, told apart by the first four bytes:
 *  - llama.cpp's legacy .dat (docs/FORMATS.md C.7; ds4 --imatrix-out and
 *    llama-imatrix --output-format dat): int32 n_entries; per entry int32
 *    name_len, name bytes, int32 ncall, int32 nval, float values[nval];
 *    optional trailer int32 chunks, int32 dataset_len, dataset bytes. Values
 *    are divided by ncall when ncall > 0.
 *  - llama.cpp's GGUF imatrix (llama-imatrix's default): per entry NAME two
 *    F32 tensors NAME.in_sum2 (ne = [ncols, n_mat]) and NAME.counts ([1,
 *    n_mat]); value = in_sum2 / count per matrix, 1.0 where the count is 0
 *    (as llama-quantize does); NAME.in_sum is ignored; imatrix.chunk_count
 *    and the last of imatrix.datasets fill the C.8 keys.
 *
 * Entry names: the GGUF tensor names llama.cpp's collector records
 * ("blk.N.ffn_down_exps.weight"; a scheduler decoration "CUDA0#NAME#0" is
 * removed as llama.cpp does), and the forms of ds4's quantizer (C.6):
 * per-expert "G.expert.E" / "G.expert_E", and the checkpoint's own names
 * (the bound safetensors tensor, e.g. "layers.N.ffn.experts.E.w2.weight").
 * Entries are kept sorted by name (binary search; a name twice is an error).
 */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "util/file.h"
#include "util/utf8.h"

void ds4_conv_imatrix_free(ds4_conv_imatrix *im) {
    for (int i = 0; i < im->n; i++) {
        free(im->e[i].name);
        free(im->e[i].val);
    }
    free(im->e);
    for (int i = 0; i < im->n_bufs; i++) free(im->bufs[i]);
    free(im->bufs);
    free(im->dataset);
    free(im->path);
    memset(im, 0, sizeof *im);
}

/* Reads exactly n bytes; 0, or 1 at a clean end of file before any byte, or
 * -1 on a short read. */
static int rd(FILE *f, void *p, size_t n) {
    size_t got = fread(p, 1, n, f);
    if (got == n) return 0;
    return got == 0 && feof(f) ? 1 : -1;
}

/* The legacy .dat format (file comment); f is positioned at its start. */
static int load_dat(ds4_conv_imatrix *im, const char *path, FILE *f, ds4_err *err) {
    int rc = 0;
    int32_t n;
    if (rd(f, &n, 4) || n < 0 || n > (1 << 20)) {
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: not a legacy imatrix .dat file (bad entry count)", path);
        goto done;
    }
    im->e = calloc((size_t)n + 1, sizeof *im->e);
    if (!im->e) {
        rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        struct ds4_conv_imat_entry *e = &im->e[i];
        int32_t len, ncall, nval;
        if (rd(f, &len, 4) || len < 1 || len > 4096) {
            rc = ds4_err_set(err, DS4_E_FORMAT, "%s: entry %d: bad or missing name length", path, i);
            goto done;
        }
        e->name = calloc((size_t)len + 1, 1);
        if (!e->name) {
            rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
            goto done;
        }
        im->n = i + 1;
        if (rd(f, e->name, (size_t)len) || memchr(e->name, 0, (size_t)len)) {
            rc = ds4_err_set(err, DS4_E_FORMAT, "%s: entry %d: truncated or bad name", path, i);
            goto done;
        }
        if (rd(f, &ncall, 4) || rd(f, &nval, 4) || ncall < 0 || nval < 1 || nval > (1 << 28)) {
            rc = ds4_err_set(err, DS4_E_FORMAT, "%s: entry %d '%s': bad ncall/nval", path, i, e->name);
            goto done;
        }
        e->ncall = ncall;
        e->n_val = nval;
        e->val = malloc((size_t)nval * sizeof(float));
        if (!e->val) {
            rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory for imatrix entry '%s'", e->name);
            goto done;
        }
        if (rd(f, e->val, (size_t)nval * sizeof(float))) {
            rc = ds4_err_set(err, DS4_E_FORMAT, "%s: entry %d '%s': truncated values (%d expected)", path, i,
                             e->name, nval);
            goto done;
        }
        for (int32_t k = 0; k < nval; k++) {
            if (ncall > 0) e->val[k] /= (float)ncall;
            if (!isfinite(e->val[k]) || e->val[k] < 0) {
                rc = ds4_err_set(err, DS4_E_FORMAT, "%s: entry '%s': value %d is %g (finite and >= 0 expected)",
                                 path, e->name, k, (double)e->val[k]);
                goto done;
            }
        }
    }
    int32_t chunks, dlen;                   /* optional trailer */
    int r = rd(f, &chunks, 4);
    if (r < 0) {
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: truncated trailer", path);
        goto done;
    }
    if (r == 0) {
        im->chunks = chunks;
        if (rd(f, &dlen, 4) == 0) {
            if (dlen < 0 || dlen > (1 << 20) || !(im->dataset = calloc((size_t)dlen + 1, 1)) ||
                rd(f, im->dataset, (size_t)dlen)) {
                rc = ds4_err_set(err, DS4_E_FORMAT, "%s: bad dataset name in the trailer", path);
                goto done;
            }
        }
    }
done:
    return rc;
}

/* NAME of a tensor "NAME<suffix>", or 0 when t's name does not end in suffix. */
static size_t stem_len(const char *name, const char *suffix) {
    size_t n = strlen(name), k = strlen(suffix);
    return n > k && !strcmp(name + n - k, suffix) ? n - k : 0;
}

/* llama.cpp's GGUF imatrix (file comment). */
static int load_gguf(ds4_conv_imatrix *im, const char *path, ds4_err *err) {
    ds4_gguf *g = NULL;
    int rc = ds4_gguf_open(&g, path, err);
    if (rc) return ds4_err_prefix(err, "imatrix");
    const int64_t n_t = ds4_gguf_n_tensors(g);
    im->e = calloc((size_t)n_t + 1, sizeof *im->e);
    if (!im->e) {
        rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        goto done;
    }
    for (int64_t i = 0; i < n_t; i++) {
        const ds4_gguf_tensor *sums = ds4_gguf_tensor_at(g, i);
        size_t len = stem_len(sums->name, ".in_sum2");
        if (!len) {
            size_t lc = stem_len(sums->name, ".counts");
            char nm[80];
            snprintf(nm, sizeof nm, "%.*s.in_sum2", (int)lc, sums->name);
            if (lc && ds4_gguf_find_tensor(g, nm) < 0) {
                rc = ds4_err_set(err, DS4_E_FORMAT, "%s: '%s' has no '%s'", path, sums->name, nm);
                goto done;
            }
            continue;                                   /* .counts (read with its .in_sum2), .in_sum, others */
        }
        char nm[80];
        snprintf(nm, sizeof nm, "%.*s.counts", (int)len, sums->name);
        int64_t ic = ds4_gguf_find_tensor(g, nm);
        const ds4_gguf_tensor *cnt = ic >= 0 ? ds4_gguf_tensor_at(g, ic) : NULL;
        const int64_t ncols = sums->ne[0], n_mat = sums->n_elems / sums->ne[0];
        if (!cnt || sums->type != DS4_GGML_F32 || cnt->type != DS4_GGML_F32 || cnt->n_elems != n_mat ||
            sums->n_elems > (1 << 28)) {
            rc = ds4_err_set(err, DS4_E_FORMAT, "%s: '%s' needs an F32 '%s' with one count per matrix (%lld)", path,
                             sums->name, nm, (long long)n_mat);
            goto done;
        }
        struct ds4_conv_imat_entry *e = &im->e[im->n++];
        e->name = strndup(sums->name, len);
        e->val = malloc((size_t)sums->n_elems * sizeof(float));
        if (!e->name || !e->val) {
            rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory for imatrix entry '%s'", sums->name);
            goto done;
        }
        e->n_val = sums->n_elems;
        for (int64_t m = 0; m < n_mat; m++) {
            float c;
            memcpy(&c, (const uint8_t *)cnt->data + 4 * m, 4);
            if (!isfinite(c) || c < 0) {
                rc = ds4_err_set(err, DS4_E_FORMAT, "%s: '%s' count %lld is %g", path, nm, (long long)m, (double)c);
                goto done;
            }
            for (int64_t k = 0; k < ncols; k++) {
                float v;
                memcpy(&v, (const uint8_t *)sums->data + 4 * (m * ncols + k), 4);
                e->val[m * ncols + k] = c > 0 ? v / c : 1.0f;   /* never-seen matrix: neutral, as llama-quantize */
                if (!isfinite(e->val[m * ncols + k]) || e->val[m * ncols + k] < 0) {
                    rc = ds4_err_set(err, DS4_E_FORMAT, "%s: entry '%s': value %lld is %g (finite and >= 0 "
                                     "expected)", path, e->name, (long long)(m * ncols + k),
                                     (double)e->val[m * ncols + k]);
                    goto done;
                }
            }
        }
    }
    int64_t kv = ds4_gguf_find_key(g, "imatrix.chunk_count");
    ds4_gguf_value v;
    if (kv >= 0 && ds4_gguf_kv_value(g, kv, &v) == 0 && v.type == DS4_GGUF_U32) im->chunks = (int32_t)v.v.u64;
    kv = ds4_gguf_find_key(g, "imatrix.datasets");
    ds4_gguf_str ds;
    if (kv >= 0 && ds4_gguf_arr_n(g, kv) > 0 && ds4_gguf_arr_str(g, kv, ds4_gguf_arr_n(g, kv) - 1, &ds) == 0 &&
        !(im->dataset = ds4_gguf_str_dup(ds)))
        rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
done:
    ds4_gguf_close(g);
    return rc;
}

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const struct ds4_conv_imat_entry *)a)->name, ((const struct ds4_conv_imat_entry *)b)->name);
}

/* "CUDA0#blk.0.attn_k.weight#0" -> "blk.0.attn_k.weight" (llama.cpp's filter_tensor_name), in place. */
static void strip_decoration(char *name) {
    char *p = strchr(name, '#');
    if (!p) return;
    char *q = strchr(p + 1, '#');
    size_t n = q ? (size_t)(q - p - 1) : strlen(p + 1);
    memmove(name, p + 1, n);
    name[n] = 0;
}

int ds4_conv_imatrix_load(ds4_conv_imatrix *im, const char *path, ds4_err *err) {
    memset(im, 0, sizeof *im);
    im->chunks = -1;
    if (!(im->path = strdup(path))) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    FILE *f = fopen(path, "rb");
    if (!f) {
        free(im->path);
        im->path = NULL;
        return ds4_err_set(err, DS4_E_IO, "%s: cannot open the imatrix file", path);
    }
    char magic[4] = {0};
    bool gguf = fread(magic, 1, 4, f) == 4 && !memcmp(magic, "GGUF", 4);
    rewind(f);
    int rc = gguf ? load_gguf(im, path, err) : load_dat(im, path, f, err);
    fclose(f);
    if (!rc && im->n == 0) rc = ds4_err_set(err, DS4_E_FORMAT, "%s: the imatrix has no entries", path);
    if (!rc) {
        for (int i = 0; i < im->n; i++) strip_decoration(im->e[i].name);
        qsort(im->e, (size_t)im->n, sizeof *im->e, cmp_entry);
        for (int i = 1; i < im->n && !rc; i++)
            if (!strcmp(im->e[i - 1].name, im->e[i].name))
                rc = ds4_err_set(err, DS4_E_FORMAT, "%s: entry '%s' appears twice", path, im->e[i].name);
    }
    if (rc) ds4_conv_imatrix_free(im);
    return rc;
}

static struct ds4_conv_imat_entry *find(ds4_conv_imatrix *im, const char *name) {
    struct ds4_conv_imat_entry key = {.name = (char *)name};
    return bsearch(&key, im->e, (size_t)im->n, sizeof *im->e, cmp_entry);
}

/* The first present of fmt formatted with (a, e), (b, e) for the names a,
 * b (either may be NULL). */
static struct ds4_conv_imat_entry *find2(ds4_conv_imatrix *im, const char *fmt, const char *a, const char *b,
                                         int64_t e) {
    char nm[600];
    const char *names[2] = {a, b};
    for (int k = 0; k < 2; k++) {
        if (!names[k]) continue;
        snprintf(nm, sizeof nm, fmt, names[k], (long long)e);
        struct ds4_conv_imat_entry *x = find(im, nm);
        if (x) return x;
    }
    return NULL;
}

/* The entry of matrix e of stack t in one of the per-expert forms of C.6:
 * G.expert.E, H.expert.E, G.expert_E, H.expert_E (H: the stacked source
 * tensor), or the per-expert source tensor's own name. */
static struct ds4_conv_imat_entry *find_expert(ds4_conv_imatrix *im, const ds4_conv_tensor *t, int64_t e) {
    const char *h = t->st ? t->st->name : NULL;
    struct ds4_conv_imat_entry *x = find2(im, "%s.expert.%lld", t->name, h, e);
    if (!x) x = find2(im, "%s.expert_%lld", t->name, h, e);
    if (!x && t->src == DS4_SRC_EXPERTS && t->experts[e]) x = find(im, t->experts[e]->name);
    return x;
}

/* Points t->imatrix at its importance, if the file has one (lookup order of
 * C.6: per-expert forms, then G, then the source tensor's name H). Per-expert
 * entries are gathered into one array owned by im. Returns 0 (also when
 * none: *found false) or DS4_E_MODEL for a length or an expert missing. */
static int bind_one(ds4_conv_imatrix *im, ds4_conv_tensor *t, bool *found, ds4_err *err) {
    const int64_t n_in = t->ne[0], n_mat = t->ne[2];
    *found = false;
    if (n_mat > 1) {
        struct ds4_conv_imat_entry *x0 = find_expert(im, t, 0);
        int64_t e = 1;
        if (x0) {
            float *buf = malloc((size_t)(n_in * n_mat) * sizeof(float));
            float **bufs = realloc(im->bufs, (size_t)(im->n_bufs + 1) * sizeof *bufs);
            if (!buf || !bufs) {
                free(buf);
                if (bufs) im->bufs = bufs;
                return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
            }
            im->bufs = bufs;
            im->bufs[im->n_bufs++] = buf;
            for (e = 0; e < n_mat; e++) {
                struct ds4_conv_imat_entry *x = find_expert(im, t, e);
                if (!x)
                    return ds4_err_set(err, DS4_E_MODEL, "%s: '%s' has a per-expert entry for expert 0 ('%s') but "
                                       "none for expert %lld", im->path, t->name, x0->name, (long long)e);
                if (x->n_val != n_in)
                    return ds4_err_set(err, DS4_E_MODEL, "%s: entry '%s' has %lld values, expected %lld (one "
                                       "expert of '%s')", im->path, x->name, (long long)x->n_val, (long long)n_in,
                                       t->name);
                memcpy(buf + e * n_in, x->val, (size_t)n_in * sizeof(float));
                x->used = true;
            }
            t->imatrix = buf;
            t->imatrix_per_matrix = true;
            *found = true;
            return 0;
        }
    }
    struct ds4_conv_imat_entry *x = find(im, t->name);
    if (!x && t->st) x = find(im, t->st->name);
    if (!x) return 0;
    if (x->n_val == n_in) {
        t->imatrix_per_matrix = false;
    } else if (n_mat > 1 && x->n_val == n_in * n_mat) {
        t->imatrix_per_matrix = true;
    } else {
        return ds4_err_set(err, DS4_E_MODEL, "%s: entry '%s' has %lld values, expected %lld%s", im->path, x->name,
                           (long long)x->n_val, (long long)n_in, n_mat > 1 ? " or that times the expert count" : "");
    }
    t->imatrix = x->val;
    x->used = true;
    *found = true;
    return 0;
}

/* Marks the entries that name a tensor of p (any accepted form) without
 * being used, so that only the truly unknown names are reported. */
static void mark_known(ds4_conv_imatrix *im, const ds4_conv_plan *p) {
    for (int i = 0; i < p->n; i++) {
        const ds4_conv_tensor *t = &p->t[i];
        struct ds4_conv_imat_entry *x = find(im, t->name);
        if (x) x->known = true;
        if (t->st && (x = find(im, t->st->name))) x->known = true;
        for (int64_t e = 0; t->ne[2] > 1 && e < t->ne[2]; e++)
            if ((x = find_expert(im, t, e))) x->known = true;
    }
}

int ds4_conv_imatrix_apply(ds4_conv_imatrix *im, ds4_conv_plan *const *plans, int n_plans, bool strict,
                           int *n_used, ds4_err *err) {
    *n_used = 0;
    for (int k = 0; k < n_plans; k++) {
        for (int i = 0; i < plans[k]->n; i++) {
            ds4_conv_tensor *t = &plans[k]->t[i];
            if (t->type != DS4_GGML_Q4_K && t->type != DS4_GGML_Q2_K && t->type != DS4_GGML_IQ2_XXS) continue;
            if (t->src == DS4_SRC_NONE) continue;
            bool found;
            int rc = bind_one(im, t, &found, err);
            if (rc) return rc;
            if (!found && strict && k == 0)
                return ds4_err_set(err, DS4_E_MODEL, "%s: no entry for '%s' (%s) and --imatrix-strict is set",
                                   im->path, t->name, ds4_ggml_type_name(t->type));
            *n_used += found;
        }
        mark_known(im, plans[k]);
    }
    /* entries that name nothing of this model: listed; all of them unknown is an error (another model's
     * file, or another naming scheme) */
    int n_unknown = 0, n_mtp = 0;
    char list[400] = "";
    for (int i = 0; i < im->n; i++) {
        const struct ds4_conv_imat_entry *x = &im->e[i];
        if (x->used || x->known) continue;
        if (n_plans < 2 && !strncmp(x->name, "mtp.", 4)) {
            n_mtp++;
            continue;
        }
        if (n_unknown++ < 4)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s'%.80s'", n_unknown > 1 ? ", " : "",
                     x->name);
    }
    if (n_unknown && n_unknown + n_mtp == im->n)
        return ds4_err_set(err, DS4_E_MODEL, "%s: none of its %d entries names a tensor of this model (%s%s); "
                           "expected GGUF tensor names such as 'blk.3.ffn_down_exps.weight'", im->path, im->n, list,
                           n_unknown > 4 ? ", ..." : "");
    if (n_unknown)
        fprintf(stderr, "ds4-convert: %s: %d of %d entries name no tensor of this model and are ignored: %s%s\n",
                im->path, n_unknown, im->n, list, n_unknown > 4 ? ", ..." : "");
    if (n_mtp)
        fprintf(stderr, "ds4-convert: %s: %d entries for the MTP block are ignored (no --mtp-out)\n", im->path,
                n_mtp);
    return 0;
}

/* A GGUF string is UTF-8 (FORMATS A.1): a path or dataset name with other
 * bytes (or control characters) goes in escaped, \xNN for each such byte. */
static int add_text(ds4_gguf_writer *w, const char *key, const char *s) {
    const size_t n = strlen(s), cap = 4 * n + 8;
    if (ds4_utf8_text(s, n)) return ds4_gguf_writer_add_str(w, key, s, n);
    char *esc = malloc(cap);
    if (!esc) return DS4_E_NOMEM;
    ds4_escaped(esc, cap, s, n, 0);
    int rc = ds4_gguf_writer_add_str(w, key, esc, strlen(esc));
    free(esc);
    return rc;
}

int ds4_conv_imatrix_add_metadata(ds4_gguf_writer *w, const ds4_conv_imatrix *im, ds4_err *err) {
    int rc = add_text(w, "quantize.imatrix.file", im->path);
    if (!rc) rc = ds4_gguf_writer_add_u64(w, "quantize.imatrix.entries_count", (uint64_t)im->n);
    if (!rc && im->dataset) rc = add_text(w, "quantize.imatrix.dataset", im->dataset);
    if (!rc && im->chunks > 0) rc = ds4_gguf_writer_add_u64(w, "quantize.imatrix.chunks_count", (uint64_t)im->chunks);
    if (rc) return ds4_err_set(err, rc, "adding the quantize.imatrix.* keys failed");
    return 0;
}
