/* imatrix.c - importance matrices for ds4-convert --imatrix FILE.dat: the
 * llama.cpp legacy format (docs/FORMATS.md C.7) read whole into memory
 * (a full-model file is ~0.7 GB at most: 129 expert entries of 256 x 4096
 * floats), bound to the planned tensors that use one (C.6: Q4_K, Q2_K and
 * IQ2_XXS), and the quantize.imatrix.* metadata of C.8.
 *
 * File: int32 n_entries; per entry int32 name_len, name bytes, int32 ncall,
 * int32 nval, float values[nval]; optional trailer int32 chunks, int32
 * dataset_len, dataset bytes. Values are divided by ncall when ncall > 0.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "util/file.h"

void ds4_conv_imatrix_free(ds4_conv_imatrix *im) {
    for (int i = 0; i < im->n; i++) {
        free(im->e[i].name);
        free(im->e[i].val);
    }
    free(im->e);
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

int ds4_conv_imatrix_load(ds4_conv_imatrix *im, const char *path, ds4_err *err) {
    memset(im, 0, sizeof *im);
    im->chunks = -1;
    FILE *f = fopen(path, "rb");
    if (!f) return ds4_err_set(err, DS4_E_IO, "%s: cannot open the imatrix file", path);
    int rc = 0;
    int32_t n;
    if (rd(f, &n, 4) || n < 0 || n > (1 << 20)) {
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: not a legacy imatrix .dat file (bad entry count)", path);
        goto done;
    }
    im->e = calloc((size_t)n + 1, sizeof *im->e);
    im->path = strdup(path);
    if (!im->e || !im->path) {
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
    fclose(f);
    if (rc) ds4_conv_imatrix_free(im);
    return rc;
}

static const struct ds4_conv_imat_entry *find(const ds4_conv_imatrix *im, const char *name) {
    for (int i = 0; i < im->n; i++)
        if (!strcmp(im->e[i].name, name)) return &im->e[i];
    return NULL;
}

int ds4_conv_imatrix_apply(ds4_conv_imatrix *im, ds4_conv_plan *p, bool strict, int *n_used, ds4_err *err) {
    *n_used = 0;
    for (int i = 0; i < p->n; i++) {
        ds4_conv_tensor *t = &p->t[i];
        if (t->type != DS4_GGML_Q4_K && t->type != DS4_GGML_Q2_K && t->type != DS4_GGML_IQ2_XXS) continue;
        if (t->src == DS4_SRC_NONE) continue;
        const struct ds4_conv_imat_entry *e = find(im, t->name);
        if (!e) {
            if (strict)
                return ds4_err_set(err, DS4_E_MODEL, "%s: no entry for '%s' (%s) and --imatrix-strict is set",
                                   im->path, t->name, ds4_ggml_type_name(t->type));
            continue;
        }
        if (e->n_val == t->ne[0]) {
            t->imatrix_per_matrix = false;
        } else if (t->ne[2] > 1 && e->n_val == t->ne[0] * t->ne[2]) {
            t->imatrix_per_matrix = true;
        } else {
            return ds4_err_set(err, DS4_E_MODEL, "%s: entry '%s' has %lld values, expected %lld%s", im->path,
                               e->name, (long long)e->n_val, (long long)t->ne[0],
                               t->ne[2] > 1 ? " or that times the expert count" : "");
        }
        t->imatrix = e->val;
        ++*n_used;
    }
    return 0;
}

int ds4_conv_imatrix_add_metadata(ds4_gguf_writer *w, const ds4_conv_imatrix *im, ds4_err *err) {
    int rc = ds4_gguf_writer_add_str(w, "quantize.imatrix.file", im->path, strlen(im->path));
    if (!rc) rc = ds4_gguf_writer_add_u64(w, "quantize.imatrix.entries_count", (uint64_t)im->n);
    if (!rc && im->dataset) rc = ds4_gguf_writer_add_str(w, "quantize.imatrix.dataset", im->dataset, strlen(im->dataset));
    if (!rc && im->chunks > 0) rc = ds4_gguf_writer_add_u64(w, "quantize.imatrix.chunks_count", (uint64_t)im->chunks);
    if (rc) return ds4_err_set(err, rc, "adding the quantize.imatrix.* keys failed");
    return 0;
}
