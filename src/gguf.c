/* gguf.c - GGUF v3 reader (strict validation over a mapping) and writer.
 *
 * Reader invariants: after ds4_gguf_open* succeeds, every kv record and
 * tensor-info record has been walked with a bounds-checked cursor, every
 * recorded offset plus length lies inside [0, size), every tensor's data lies
 * inside the data section and no two tensors overlap. Accessors therefore
 * never re-check bounds. Nothing is copied from the mapping except keys and
 * tensor names (NUL-terminated copies) and the element offsets of string
 * arrays (so element i is O(1)).
 *
 * Writer invariants: kv values are serialized at add time into one growing
 * byte buffer; tensors keep a pointer or a producer callback. The layout
 * (offsets, data_offset, file size) is computed once, at write time, from
 * the same sizes the bytes are written with.
 */
#include "gguf.h"
#include "util/utf8.h"

#include <openssl/evp.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/file.h"
#include "util/xalloc.h"

#define GGUF_MAGIC "GGUF"
#define GGUF_VERSION 3
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_KEY 65535
#define GGUF_MAX_NAME 64 /* names are < 64 bytes (ggml GGML_MAX_NAME) */
#define GGUF_MIN_KV_BYTES 14 /* 8 len + 1 key byte + 4 type + 1 value byte */
#define GGUF_MIN_TI_BYTES 33 /* 8 len + 1 name byte + 4 n_dims + 8 ne + 4 type + 8 offset */

_Static_assert(sizeof(float) == 4 && sizeof(double) == 8, "IEEE binary32/64 expected");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "GGUF is little-endian; host must be too");

/* Programmer mistakes (bad index from a caller): cheap, always on. */
#define GGUF_CHECK_IDX(cond)                                                     \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: %s: bad index (%s)\n", __FILE__, __LINE__,   \
                    __func__, #cond);                                            \
            abort();                                                             \
        }                                                                        \
    } while (0)

/* ---------------------------------------------------------------- tables */

static const ds4_ggml_type_info type_table[] = {
    [DS4_GGML_F32] = {"F32", 1, 4},
    [DS4_GGML_F16] = {"F16", 1, 2},
    [DS4_GGML_Q4_0] = {"Q4_0", 32, 18},
    [DS4_GGML_Q4_1] = {"Q4_1", 32, 20},
    [DS4_GGML_Q5_0] = {"Q5_0", 32, 22},
    [DS4_GGML_Q5_1] = {"Q5_1", 32, 24},
    [DS4_GGML_Q8_0] = {"Q8_0", 32, 34},
    [DS4_GGML_Q8_1] = {"Q8_1", 32, 36},
    [DS4_GGML_Q2_K] = {"Q2_K", 256, 84},
    [DS4_GGML_Q3_K] = {"Q3_K", 256, 110},
    [DS4_GGML_Q4_K] = {"Q4_K", 256, 144},
    [DS4_GGML_Q5_K] = {"Q5_K", 256, 176},
    [DS4_GGML_Q6_K] = {"Q6_K", 256, 210},
    [DS4_GGML_Q8_K] = {"Q8_K", 256, 292},
    [DS4_GGML_IQ2_XXS] = {"IQ2_XXS", 256, 66},
    [DS4_GGML_IQ2_XS] = {"IQ2_XS", 256, 74},
    [DS4_GGML_IQ3_XXS] = {"IQ3_XXS", 256, 98},
    [DS4_GGML_IQ1_S] = {"IQ1_S", 256, 50},
    [DS4_GGML_IQ4_NL] = {"IQ4_NL", 32, 18},
    [DS4_GGML_IQ3_S] = {"IQ3_S", 256, 110},
    [DS4_GGML_IQ2_S] = {"IQ2_S", 256, 82},
    [DS4_GGML_IQ4_XS] = {"IQ4_XS", 256, 136},
    [DS4_GGML_I8] = {"I8", 1, 1},
    [DS4_GGML_I16] = {"I16", 1, 2},
    [DS4_GGML_I32] = {"I32", 1, 4},
    [DS4_GGML_I64] = {"I64", 1, 8},
    [DS4_GGML_F64] = {"F64", 1, 8},
    [DS4_GGML_IQ1_M] = {"IQ1_M", 256, 56},
    [DS4_GGML_BF16] = {"BF16", 1, 2},
    [DS4_GGML_TQ1_0] = {"TQ1_0", 256, 54},
    [DS4_GGML_TQ2_0] = {"TQ2_0", 256, 66},
    [DS4_GGML_MXFP4] = {"MXFP4", 32, 17},
    [DS4_GGML_NVFP4] = {"NVFP4", 64, 36},
    [DS4_GGML_Q1_0] = {"Q1_0", 128, 18},
};

const ds4_ggml_type_info *ds4_ggml_type_get(uint32_t type) {
    if (type >= sizeof type_table / sizeof type_table[0]) return NULL;
    if (!type_table[type].name) return NULL; /* retired id */
    return &type_table[type];
}

const char *ds4_ggml_type_name(uint32_t type) {
    const ds4_ggml_type_info *ti = ds4_ggml_type_get(type);
    return ti ? ti->name : "?";
}

static const char *const vtype_names[DS4_GGUF_N_VTYPES] = {
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
    "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64",
};
static const uint8_t vtype_sizes[DS4_GGUF_N_VTYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

const char *ds4_gguf_vtype_name(uint32_t vtype) {
    return vtype < DS4_GGUF_N_VTYPES ? vtype_names[vtype] : "?";
}

size_t ds4_gguf_vtype_size(uint32_t vtype) {
    return vtype < DS4_GGUF_N_VTYPES ? vtype_sizes[vtype] : 0;
}

char *ds4_gguf_str_dup(ds4_gguf_str s) {
    if (s.len >= SIZE_MAX) return NULL;
    char *p = malloc((size_t)s.len + 1);
    if (!p) return NULL;
    if (s.len) memcpy(p, s.ptr, (size_t)s.len);
    p[s.len] = '\0';
    return p;
}

/* ---------------------------------------------------------------- reader */

typedef struct kv_rec {
    char *key;         /* NUL-terminated copy (malloc) */
    uint64_t rec_off;  /* file offset of the record */
    uint64_t val_off;  /* file offset of the value; for ARR, of the first element */
    uint32_t type;     /* vtype */
    uint32_t arr_type; /* element vtype when type == ARR */
    uint64_t arr_n;    /* element count when type == ARR */
    uint64_t *str_off; /* (arr_n) file offsets of each string element, STR arrays only */
} kv_rec;

typedef struct tensor_rec {
    ds4_gguf_tensor pub;
    char name[GGUF_MAX_NAME];
    uint64_t rec_off; /* file offset of the tensor-info record */
} tensor_rec;

struct ds4_gguf {
    const uint8_t *base;
    uint64_t size;
    void *map;       /* mmap base (files only) */
    size_t map_size;
    int64_t n_kv;
    kv_rec *kv;      /* (n_kv) file order */
    int64_t *kv_sorted; /* (n_kv) indices sorted by key */
    int64_t n_t;
    tensor_rec *t;   /* (n_t) file order */
    int64_t *t_sorted;  /* (n_t) indices sorted by name */
    uint32_t alignment;
    uint64_t data_offset;
    bool packed;
};

/* Bounds-checked cursor over the mapping. */
typedef struct cursor {
    const uint8_t *base;
    uint64_t size;
    uint64_t pos;
    ds4_err *err;
} cursor;

static int truncated(cursor *c, uint64_t need, const char *what) {
    return ds4_err_set(c->err, DS4_E_FORMAT,
                       "truncated GGUF file at byte %llu: need %llu bytes for %s, %llu left",
                       (unsigned long long)c->pos, (unsigned long long)need, what,
                       (unsigned long long)(c->size - c->pos));
}

/* Checks that n bytes are available at pos (overflow-free form). */
static int need(cursor *c, uint64_t n, const char *what) {
    if (n > c->size || c->pos > c->size - n) return truncated(c, n, what);
    return 0;
}

static int rd(cursor *c, void *dst, uint64_t n, const char *what) {
    int rc = need(c, n, what);
    if (rc) return rc;
    memcpy(dst, c->base + c->pos, (size_t)n);
    c->pos += n;
    return 0;
}

static int rd_u32(cursor *c, uint32_t *v, const char *what) { return rd(c, v, 4, what); }
static int rd_u64(cursor *c, uint64_t *v, const char *what) { return rd(c, v, 8, what); }

/* Reads a string header; on success ptr and len describe bytes inside the
 * mapping and the cursor is past the string. */
static int rd_str(cursor *c, const char **ptr, uint64_t *len, const char *what) {
    uint64_t at = c->pos;
    int rc = rd_u64(c, len, what);
    if (rc) return rc;
    if (*len > c->size - c->pos) {
        return ds4_err_set(c->err, DS4_E_FORMAT,
                           "%s at byte %llu: string length %llu exceeds the %llu bytes left in the file",
                           what, (unsigned long long)at, (unsigned long long)*len,
                           (unsigned long long)(c->size - c->pos));
    }
    *ptr = (const char *)c->base + c->pos;
    c->pos += *len;
    return 0;
}

/* Strict UTF-8 (ds4_utf8_char), no NUL. */
static bool utf8_valid(const unsigned char *s, uint64_t n) {
    for (uint64_t i = 0; i < n;) {
        const int len = s[i] ? ds4_utf8_char(s + i, n - i) : 0;
        if (!len) return false;
        i += (uint64_t)len;
    }
    return true;
}

/* Prints at most 48 bytes of a name for error messages, escaping
 * non-printables, into buf. */
static const char *printable(char *buf, size_t cap, const char *s, uint64_t n) {
    size_t o = 0;
    uint64_t lim = n < 48 ? n : 48;
    for (uint64_t i = 0; i < lim && o + 5 < cap; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch < 0x7f && ch != '\\') buf[o++] = (char)ch;
        else o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", ch);
    }
    if (lim < n && o + 4 < cap) { memcpy(buf + o, "...", 3); o += 3; }
    buf[o] = '\0';
    return buf;
}

/* Skips (validating) one value of a fixed-size or string type. */
static int skip_scalar(cursor *c, uint32_t type, const char *key) {
    char what[128];
    snprintf(what, sizeof what, "the value of key '%.64s'", key);
    if (type == DS4_GGUF_STR) {
        const char *p;
        uint64_t n;
        return rd_str(c, &p, &n, what);
    }
    uint64_t at = c->pos;
    int rc = need(c, vtype_sizes[type], what);
    if (rc) return rc;
    if (type == DS4_GGUF_BOOL && c->base[c->pos] > 1) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "key '%.64s' at byte %llu: BOOL byte is %u, must be 0 or 1",
                           key, (unsigned long long)at, c->base[c->pos]);
    }
    c->pos += vtype_sizes[type];
    return 0;
}

static int parse_array(cursor *c, kv_rec *r) {
    uint64_t at = c->pos;
    int rc = rd_u32(c, &r->arr_type, "an array element type");
    if (!rc) rc = rd_u64(c, &r->arr_n, "an array element count");
    if (rc) return ds4_err_prefix(c->err, "key '%.64s'", r->key);
    if (r->arr_type == DS4_GGUF_ARR) {
        return ds4_err_set(c->err, DS4_E_FORMAT,
                           "key '%.64s' at byte %llu: nested arrays (array of ARRAY) are not supported",
                           r->key, (unsigned long long)at);
    }
    if (r->arr_type >= DS4_GGUF_N_VTYPES) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "key '%.64s' at byte %llu: unknown array element type %u",
                           r->key, (unsigned long long)at, r->arr_type);
    }
    r->val_off = c->pos;
    uint64_t left = c->size - c->pos;
    if (r->arr_type == DS4_GGUF_STR) {
        /* each string needs at least its 8-byte length */
        if (r->arr_n > left / 8) {
            return ds4_err_set(c->err, DS4_E_FORMAT,
                               "key '%.64s' at byte %llu: array of %llu strings cannot fit in the %llu bytes left",
                               r->key, (unsigned long long)at, (unsigned long long)r->arr_n,
                               (unsigned long long)left);
        }
        if (r->arr_n) {
            r->str_off = malloc((size_t)r->arr_n * sizeof *r->str_off);
            if (!r->str_off) {
                return ds4_err_set(c->err, DS4_E_NOMEM, "key '%.64s': out of memory for %llu string offsets",
                                   r->key, (unsigned long long)r->arr_n);
            }
        }
        for (uint64_t i = 0; i < r->arr_n; i++) {
            r->str_off[i] = c->pos;
            uint64_t n;
            /* fast path without formatting; the message is built on failure */
            if (c->size - c->pos >= 8) {
                memcpy(&n, c->base + c->pos, 8);
                if (n <= c->size - c->pos - 8) {
                    c->pos += 8 + n;
                    continue;
                }
            }
            const char *p;
            char what[128];
            snprintf(what, sizeof what, "element %llu of array '%.64s'", (unsigned long long)i, r->key);
            rc = rd_str(c, &p, &n, what);
            if (rc) return rc;
            return ds4_err_set(c->err, DS4_E_INTERNAL, "string element check disagrees"); /* unreachable */
        }
        return 0;
    }
    uint64_t es = vtype_sizes[r->arr_type];
    if (r->arr_n > left / es) {
        return ds4_err_set(c->err, DS4_E_FORMAT,
                           "key '%.64s' at byte %llu: array of %llu %s elements (%llu bytes each) exceeds the %llu bytes left",
                           r->key, (unsigned long long)at, (unsigned long long)r->arr_n,
                           vtype_names[r->arr_type], (unsigned long long)es, (unsigned long long)left);
    }
    if (r->arr_type == DS4_GGUF_BOOL) {
        for (uint64_t i = 0; i < r->arr_n; i++) {
            uint8_t b = c->base[c->pos + i];
            if (b > 1) {
                return ds4_err_set(c->err, DS4_E_FORMAT,
                                   "key '%.64s': BOOL array element %llu at byte %llu is %u, must be 0 or 1",
                                   r->key, (unsigned long long)i, (unsigned long long)(c->pos + i), b);
            }
        }
    }
    c->pos += r->arr_n * es;
    return 0;
}

static int parse_kv(cursor *c, kv_rec *r, int64_t idx) {
    r->rec_off = c->pos;
    const char *kp;
    uint64_t klen;
    char what[64];
    snprintf(what, sizeof what, "key %lld", (long long)idx);
    int rc = rd_str(c, &kp, &klen, what);
    if (rc) return rc;
    char pbuf[256];
    if (klen == 0) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "key %lld at byte %llu: empty key", (long long)idx,
                           (unsigned long long)r->rec_off);
    }
    if (klen > GGUF_MAX_KEY) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "key %lld at byte %llu: key length %llu exceeds %d",
                           (long long)idx, (unsigned long long)r->rec_off, (unsigned long long)klen,
                           GGUF_MAX_KEY);
    }
    for (uint64_t i = 0; i < klen; i++) {
        unsigned char ch = (unsigned char)kp[i];
        if (ch < 0x21 || ch > 0x7e) {
            return ds4_err_set(c->err, DS4_E_FORMAT,
                               "key %lld at byte %llu: key '%s' has byte 0x%02x at position %llu (keys are printable ASCII)",
                               (long long)idx, (unsigned long long)r->rec_off,
                               printable(pbuf, sizeof pbuf, kp, klen), ch, (unsigned long long)i);
        }
    }
    r->key = malloc((size_t)klen + 1);
    if (!r->key) return ds4_err_set(c->err, DS4_E_NOMEM, "out of memory for key %lld", (long long)idx);
    memcpy(r->key, kp, (size_t)klen);
    r->key[klen] = '\0';

    uint64_t tat = c->pos;
    rc = rd_u32(c, &r->type, "a value type");
    if (rc) return ds4_err_prefix(c->err, "key '%.64s'", r->key);
    if (r->type >= DS4_GGUF_N_VTYPES) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "key '%.64s' at byte %llu: unknown value type %u",
                           r->key, (unsigned long long)tat, r->type);
    }
    r->val_off = c->pos;
    if (r->type == DS4_GGUF_ARR) return parse_array(c, r);
    return skip_scalar(c, r->type, r->key);
}

/* qsort has no context argument in C11: sort (name pointer, index) pairs. */
typedef struct name_idx {
    const char *name;
    int64_t idx;
} name_idx;

static int cmp_name_idx(const void *a, const void *b) {
    const name_idx *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    if (c) return c;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

/* Sorts indices 0..n-1 by name (names[i]); returns the index array (malloc)
 * or NULL on allocation failure. *dup gets the first duplicated pair. */
static int64_t *sort_names(const char *const *names, int64_t n, int64_t *dup_a, int64_t *dup_b) {
    *dup_a = *dup_b = -1;
    name_idx *tmp = malloc((size_t)(n ? n : 1) * sizeof *tmp);
    int64_t *out = malloc((size_t)(n ? n : 1) * sizeof *out);
    if (!tmp || !out) {
        free(tmp);
        free(out);
        return NULL;
    }
    for (int64_t i = 0; i < n; i++) tmp[i] = (name_idx){names[i], i};
    qsort(tmp, (size_t)n, sizeof *tmp, cmp_name_idx);
    for (int64_t i = 0; i < n; i++) {
        out[i] = tmp[i].idx;
        if (i > 0 && *dup_a < 0 && strcmp(tmp[i - 1].name, tmp[i].name) == 0) {
            *dup_a = tmp[i - 1].idx;
            *dup_b = tmp[i].idx;
        }
    }
    free(tmp);
    return out;
}

static int parse_tensor(cursor *c, tensor_rec *t, int64_t idx, uint32_t alignment) {
    t->rec_off = c->pos;
    const char *np;
    uint64_t nlen;
    char what[64], pbuf[256];
    snprintf(what, sizeof what, "the name of tensor %lld", (long long)idx);
    int rc = rd_str(c, &np, &nlen, what);
    if (rc) return rc;
    unsigned long long at = (unsigned long long)t->rec_off;
    if (nlen == 0) return ds4_err_set(c->err, DS4_E_FORMAT, "tensor %lld at byte %llu: empty name", (long long)idx, at);
    if (nlen >= GGUF_MAX_NAME) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "tensor %lld at byte %llu: name '%s' is %llu bytes, must be < %d",
                           (long long)idx, at, printable(pbuf, sizeof pbuf, np, nlen),
                           (unsigned long long)nlen, GGUF_MAX_NAME);
    }
    if (!utf8_valid((const unsigned char *)np, nlen)) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "tensor %lld at byte %llu: name '%s' is not valid UTF-8 (or has a NUL)",
                           (long long)idx, at, printable(pbuf, sizeof pbuf, np, nlen));
    }
    memcpy(t->name, np, (size_t)nlen);
    t->name[nlen] = '\0';
    ds4_gguf_tensor *p = &t->pub;
    p->name = t->name;

    uint64_t dat = c->pos;
    rc = rd_u32(c, &p->n_dims, "n_dims");
    if (rc) return ds4_err_prefix(c->err, "tensor '%s'", t->name);
    if (p->n_dims < 1 || p->n_dims > 4) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "tensor '%s' at byte %llu: n_dims is %u, must be 1..4",
                           t->name, (unsigned long long)dat, p->n_dims);
    }
    for (int d = 0; d < 4; d++) p->ne[d] = 1;
    int64_t n_elems = 1;
    for (uint32_t d = 0; d < p->n_dims; d++) {
        uint64_t v, vat = c->pos;
        rc = rd_u64(c, &v, "a dimension");
        if (rc) return ds4_err_prefix(c->err, "tensor '%s'", t->name);
        if (v < 1 || v > (uint64_t)INT64_MAX) {
            return ds4_err_set(c->err, DS4_E_FORMAT, "tensor '%s' at byte %llu: ne[%u] = %llu is out of range (1..2^63-1)",
                               t->name, (unsigned long long)vat, d, (unsigned long long)v);
        }
        p->ne[d] = (int64_t)v;
        if (__builtin_mul_overflow(n_elems, (int64_t)v, &n_elems)) {
            return ds4_err_set(c->err, DS4_E_FORMAT, "tensor '%s' at byte %llu: element count overflows 64 bits",
                               t->name, (unsigned long long)vat);
        }
    }
    p->n_elems = n_elems;
    uint64_t tat = c->pos;
    rc = rd_u32(c, &p->type, "the tensor type");
    if (rc) return ds4_err_prefix(c->err, "tensor '%s'", t->name);
    const ds4_ggml_type_info *ti = ds4_ggml_type_get(p->type);
    if (!ti) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "tensor '%s' at byte %llu: unknown ggml type id %u",
                           t->name, (unsigned long long)tat, p->type);
    }
    if (p->ne[0] % ti->block_elems) {
        return ds4_err_set(c->err, DS4_E_FORMAT,
                           "tensor '%s' (info at byte %llu): ne[0] = %lld is not a multiple of the %s block size %u",
                           t->name, at, (long long)p->ne[0], ti->name, ti->block_elems);
    }
    uint64_t nb = (uint64_t)(p->ne[0] / ti->block_elems) * ti->block_bytes; /* ne0 < 2^63, bytes <= 292 */
    bool ovf = __builtin_mul_overflow(nb, (uint64_t)p->ne[1], &nb);
    ovf = ovf || __builtin_mul_overflow(nb, (uint64_t)p->ne[2], &nb);
    ovf = ovf || __builtin_mul_overflow(nb, (uint64_t)p->ne[3], &nb);
    if ((uint64_t)(p->ne[0] / ti->block_elems) > UINT64_MAX / ti->block_bytes || ovf) {
        return ds4_err_set(c->err, DS4_E_FORMAT, "tensor '%s' (info at byte %llu): byte size overflows 64 bits", t->name, at);
    }
    p->n_bytes = nb;
    uint64_t oat = c->pos;
    rc = rd_u64(c, &p->offset, "the tensor offset");
    if (rc) return ds4_err_prefix(c->err, "tensor '%s'", t->name);
    if (p->offset % alignment) {
        return ds4_err_set(c->err, DS4_E_FORMAT,
                           "tensor '%s' at byte %llu: offset %llu is not a multiple of the alignment %u",
                           t->name, (unsigned long long)oat, (unsigned long long)p->offset, alignment);
    }
    return 0;
}

static int cmp_offset(const void *a, const void *b) {
    const tensor_rec *x = *(const tensor_rec *const *)a, *y = *(const tensor_rec *const *)b;
    if (x->pub.offset != y->pub.offset) return x->pub.offset < y->pub.offset ? -1 : 1;
    return (x > y) - (x < y);
}

/* Data section bounds, overlap and packing (A.7 items 8, 9). */
static int check_layout(ds4_gguf *g, ds4_err *err) {
    uint64_t avail = g->size - g->data_offset;
    for (int64_t i = 0; i < g->n_t; i++) {
        const ds4_gguf_tensor *p = &g->t[i].pub;
        if (p->offset > avail || p->n_bytes > avail - p->offset) {
            return ds4_err_set(err, DS4_E_FORMAT,
                               "tensor '%s' (info at byte %llu): data [%llu, +%llu) relative to the data section at byte %llu "
                               "runs past the end of the file (%llu bytes)",
                               p->name, (unsigned long long)g->t[i].rec_off, (unsigned long long)p->offset,
                               (unsigned long long)p->n_bytes, (unsigned long long)g->data_offset,
                               (unsigned long long)g->size);
        }
        g->t[i].pub.data = g->base + g->data_offset + p->offset;
    }
    g->packed = true;
    uint64_t expect = 0;
    for (int64_t i = 0; i < g->n_t; i++) {
        const ds4_gguf_tensor *p = &g->t[i].pub;
        if (p->offset != expect) g->packed = false;
        uint64_t pad = (g->alignment - p->n_bytes % g->alignment) % g->alignment;
        expect = p->offset + p->n_bytes + pad; /* both inside the file: no overflow */
    }
    if (g->n_t < 2) return 0;
    const tensor_rec **by_off = malloc((size_t)g->n_t * sizeof *by_off);
    if (!by_off) return ds4_err_set(err, DS4_E_NOMEM, "out of memory sorting %lld tensors", (long long)g->n_t);
    for (int64_t i = 0; i < g->n_t; i++) by_off[i] = &g->t[i];
    qsort(by_off, (size_t)g->n_t, sizeof *by_off, cmp_offset);
    int rc = 0;
    for (int64_t i = 1; i < g->n_t; i++) {
        const ds4_gguf_tensor *a = &by_off[i - 1]->pub, *b = &by_off[i]->pub;
        if (a->offset + a->n_bytes > b->offset) {
            rc = ds4_err_set(err, DS4_E_FORMAT,
                             "tensors '%s' (offset %llu, %llu bytes) and '%s' (offset %llu) overlap",
                             a->name, (unsigned long long)a->offset, (unsigned long long)a->n_bytes, b->name,
                             (unsigned long long)b->offset);
            break;
        }
    }
    free(by_off);
    return rc;
}

static int parse_header(cursor *c, uint64_t *n_t, uint64_t *n_kv) {
    ds4_err *err = c->err;
    if (c->size < 24) {
        return ds4_err_set(err, DS4_E_FORMAT, "file is %llu bytes, smaller than the 24-byte GGUF header",
                           (unsigned long long)c->size);
    }
    if (memcmp(c->base, GGUF_MAGIC, 4) != 0) {
        char pbuf[32];
        return ds4_err_set(err, DS4_E_FORMAT, "bad magic at byte 0: '%s', expected 'GGUF' (not a GGUF file)",
                           printable(pbuf, sizeof pbuf, (const char *)c->base, 4));
    }
    uint32_t version;
    memcpy(&version, c->base + 4, 4);
    if (version != GGUF_VERSION) {
        if (version == 1 || version == 2) {
            return ds4_err_set(err, DS4_E_FORMAT, "GGUF v%u not supported (byte 4): only version 3", version);
        }
        if ((version & 0xffff) == 0) {
            return ds4_err_set(err, DS4_E_FORMAT,
                               "unsupported GGUF version 0x%08x at byte 4: byte-swapped/big-endian file? only little-endian v3 is supported",
                               version);
        }
        return ds4_err_set(err, DS4_E_FORMAT, "unsupported GGUF version %u at byte 4: only version 3", version);
    }
    memcpy(n_t, c->base + 8, 8);
    memcpy(n_kv, c->base + 16, 8);
    c->pos = 24;
    uint64_t left = c->size - 24;
    if (*n_kv > left / GGUF_MIN_KV_BYTES) {
        return ds4_err_set(err, DS4_E_FORMAT,
                           "n_kv = %llu at byte 16 is implausible: %llu bytes left hold at most %llu records",
                           (unsigned long long)*n_kv, (unsigned long long)left,
                           (unsigned long long)(left / GGUF_MIN_KV_BYTES));
    }
    if (*n_t > left / GGUF_MIN_TI_BYTES) {
        return ds4_err_set(err, DS4_E_FORMAT,
                           "n_tensors = %llu at byte 8 is implausible: %llu bytes left hold at most %llu tensor infos",
                           (unsigned long long)*n_t, (unsigned long long)left,
                           (unsigned long long)(left / GGUF_MIN_TI_BYTES));
    }
    return 0;
}

/* Reads general.alignment if present (A.7 item 6). */
static int read_alignment(ds4_gguf *g, ds4_err *err) {
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t k = ds4_gguf_find_key(g, "general.alignment");
    if (k < 0) return 0;
    const kv_rec *r = &g->kv[k];
    if (r->type != DS4_GGUF_U32) {
        return ds4_err_set(err, DS4_E_FORMAT, "key 'general.alignment' at byte %llu has type %s, must be UINT32",
                           (unsigned long long)r->rec_off, vtype_names[r->type]);
    }
    uint32_t a;
    memcpy(&a, g->base + r->val_off, 4);
    if (a == 0 || (a & (a - 1)) != 0) {
        return ds4_err_set(err, DS4_E_FORMAT, "key 'general.alignment' at byte %llu: %u is not a power of two",
                           (unsigned long long)r->val_off, a);
    }
    g->alignment = a;
    return 0;
}

static int parse_all(ds4_gguf *g, ds4_err *err) {
    cursor c = {g->base, g->size, 0, err};
    uint64_t n_t = 0, n_kv = 0;
    int rc = parse_header(&c, &n_t, &n_kv);
    if (rc) return rc;
    /* counts bounded by size/14 resp. size/33 above, so these fit in size_t */
    g->kv = calloc((size_t)(n_kv ? n_kv : 1), sizeof *g->kv);
    g->t = calloc((size_t)(n_t ? n_t : 1), sizeof *g->t);
    if (!g->kv || !g->t) {
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory for %llu keys and %llu tensors",
                           (unsigned long long)n_kv, (unsigned long long)n_t);
    }
    for (uint64_t i = 0; i < n_kv; i++) {
        g->n_kv = (int64_t)i + 1; /* so close() frees what this record allocated */
        rc = parse_kv(&c, &g->kv[i], (int64_t)i);
        if (rc) return rc;
    }
    const char **names = malloc((size_t)((n_kv > n_t ? n_kv : n_t) + 1) * sizeof *names);
    if (!names) return ds4_err_set(err, DS4_E_NOMEM, "out of memory for the key index");
    for (uint64_t i = 0; i < n_kv; i++) names[i] = g->kv[i].key;
    int64_t da, db;
    g->kv_sorted = sort_names(names, g->n_kv, &da, &db);
    if (!g->kv_sorted) {
        free(names);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory for the key index");
    }
    if (da >= 0) {
        free(names);
        return ds4_err_set(err, DS4_E_FORMAT, "duplicate key '%.200s' (records at bytes %llu and %llu)",
                           g->kv[da].key, (unsigned long long)g->kv[da].rec_off,
                           (unsigned long long)g->kv[db].rec_off);
    }
    rc = read_alignment(g, err);
    if (rc) {
        free(names);
        return rc;
    }
    for (uint64_t i = 0; i < n_t; i++) {
        g->n_t = (int64_t)i + 1;
        rc = parse_tensor(&c, &g->t[i], (int64_t)i, g->alignment);
        if (rc) {
            free(names);
            return rc;
        }
    }
    for (uint64_t i = 0; i < n_t; i++) names[i] = g->t[i].name;
    g->t_sorted = sort_names(names, g->n_t, &da, &db);
    free(names);
    if (!g->t_sorted) return ds4_err_set(err, DS4_E_NOMEM, "out of memory for the tensor index");
    if (da >= 0) {
        return ds4_err_set(err, DS4_E_FORMAT, "duplicate tensor name '%s' (infos at bytes %llu and %llu)",
                           g->t[da].name, (unsigned long long)g->t[da].rec_off,
                           (unsigned long long)g->t[db].rec_off);
    }
    uint64_t end = c.pos;
    g->data_offset = end + (g->alignment - end % g->alignment) % g->alignment;
    if (g->data_offset > g->size) {
        /* A file without tensors needs no data section (gguf-py may omit the
         * final padding then); with tensors the padding must be there. */
        if (g->n_t == 0) {
            g->data_offset = g->size;
        } else {
            return ds4_err_set(err, DS4_E_FORMAT,
                               "truncated GGUF file: tensor infos end at byte %llu, data section would start at byte %llu "
                               "but the file has %llu bytes",
                               (unsigned long long)end, (unsigned long long)g->data_offset,
                               (unsigned long long)g->size);
        }
    }
    return check_layout(g, err);
}

static int open_common(ds4_gguf **out, ds4_gguf *g, ds4_err *err) {
    int rc = parse_all(g, err);
    if (rc) {
        ds4_gguf_close(g);
        *out = NULL;
        return rc;
    }
    *out = g;
    return 0;
}

int ds4_gguf_open_memory(ds4_gguf **out, const void *data, size_t n, ds4_err *err) {
    *out = NULL;
    ds4_gguf *g = xcalloc(1, sizeof *g);
    static const uint8_t empty[1];
    g->base = data ? data : empty;
    g->size = data ? n : 0;
    return open_common(out, g, err);
}

int ds4_gguf_open(ds4_gguf **out, const char *path, ds4_err *err) {
    *out = NULL;
    struct stat st;
    int fd = ds4_open_regular(path, O_RDONLY, &st, err); /* a FIFO must not block the open */
    if (fd < 0) return fd;
    if ((uint64_t)st.st_size > SIZE_MAX) {
        close(fd);
        return ds4_err_set(err, DS4_E_IO, "%s: too large to map", path);
    }
    ds4_gguf *g = xcalloc(1, sizeof *g);
    static const uint8_t empty[1];
    g->base = empty;
    g->size = (uint64_t)st.st_size;
    if (st.st_size > 0) {
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            free(g);
            return ds4_err_set(err, DS4_E_IO, "%s: cannot mmap: %s", path, strerror(e));
        }
        g->map = m;
        g->map_size = (size_t)st.st_size;
        g->base = m;
    }
    close(fd); /* the mapping keeps the file */
    int rc = open_common(out, g, err);
    if (rc) ds4_err_prefix(err, "%s", path);
    return rc;
}

void ds4_gguf_close(ds4_gguf *g) {
    if (!g) return;
    for (int64_t i = 0; g->kv && i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].str_off);
    }
    free(g->kv);
    free(g->kv_sorted);
    free(g->t);
    free(g->t_sorted);
    if (g->map) munmap(g->map, g->map_size);
    free(g);
}

uint32_t ds4_gguf_alignment(const ds4_gguf *g) { return g->alignment; }
uint64_t ds4_gguf_data_offset(const ds4_gguf *g) { return g->data_offset; }
uint64_t ds4_gguf_file_bytes(const ds4_gguf *g) { return g->size; }
const void *ds4_gguf_base(const ds4_gguf *g) { return g->base; }
bool ds4_gguf_is_packed(const ds4_gguf *g) { return g->packed; }

int64_t ds4_gguf_n_kv(const ds4_gguf *g) { return g->n_kv; }

int64_t ds4_gguf_find_key(const ds4_gguf *g, const char *key) {
    int64_t lo = 0, hi = g->n_kv - 1;
    while (lo <= hi) {
        int64_t mid = lo + (hi - lo) / 2, k = g->kv_sorted[mid];
        int c = strcmp(g->kv[k].key, key);
        if (c == 0) return k;
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

const char *ds4_gguf_kv_key(const ds4_gguf *g, int64_t kv) {
    GGUF_CHECK_IDX(kv >= 0 && kv < g->n_kv);
    return g->kv[kv].key;
}

uint32_t ds4_gguf_kv_type(const ds4_gguf *g, int64_t kv) {
    GGUF_CHECK_IDX(kv >= 0 && kv < g->n_kv);
    return g->kv[kv].type;
}

uint64_t ds4_gguf_kv_file_offset(const ds4_gguf *g, int64_t kv) {
    GGUF_CHECK_IDX(kv >= 0 && kv < g->n_kv);
    return g->kv[kv].rec_off;
}

/* Decodes one value of type `type` at file offset `off` (validated at open). */
static void decode(const ds4_gguf *g, uint32_t type, uint64_t off, ds4_gguf_value *out) {
    const uint8_t *p = g->base + off;
    out->type = type;
    switch (type) {
    case DS4_GGUF_U8: out->v.u64 = p[0]; break;
    case DS4_GGUF_BOOL: out->v.u64 = p[0]; break;
    case DS4_GGUF_I8: { int8_t v; memcpy(&v, p, 1); out->v.i64 = v; break; }
    case DS4_GGUF_U16: { uint16_t v; memcpy(&v, p, 2); out->v.u64 = v; break; }
    case DS4_GGUF_I16: { int16_t v; memcpy(&v, p, 2); out->v.i64 = v; break; }
    case DS4_GGUF_U32: { uint32_t v; memcpy(&v, p, 4); out->v.u64 = v; break; }
    case DS4_GGUF_I32: { int32_t v; memcpy(&v, p, 4); out->v.i64 = v; break; }
    case DS4_GGUF_F32: { float v; memcpy(&v, p, 4); out->v.f64 = v; break; }
    case DS4_GGUF_U64: { uint64_t v; memcpy(&v, p, 8); out->v.u64 = v; break; }
    case DS4_GGUF_I64: { int64_t v; memcpy(&v, p, 8); out->v.i64 = v; break; }
    case DS4_GGUF_F64: { double v; memcpy(&v, p, 8); out->v.f64 = v; break; }
    case DS4_GGUF_STR: {
        uint64_t n;
        memcpy(&n, p, 8);
        out->v.str.ptr = (const char *)p + 8;
        out->v.str.len = n;
        break;
    }
    default: memset(&out->v, 0, sizeof out->v); break;
    }
}

int ds4_gguf_kv_value(const ds4_gguf *g, int64_t kv, ds4_gguf_value *out) {
    GGUF_CHECK_IDX(kv >= 0 && kv < g->n_kv);
    const kv_rec *r = &g->kv[kv];
    if (r->type == DS4_GGUF_ARR) return DS4_E_ARG;
    decode(g, r->type, r->val_off, out);
    return 0;
}

uint32_t ds4_gguf_arr_type(const ds4_gguf *g, int64_t kv) {
    GGUF_CHECK_IDX(kv >= 0 && kv < g->n_kv);
    return g->kv[kv].type == DS4_GGUF_ARR ? g->kv[kv].arr_type : 0;
}

uint64_t ds4_gguf_arr_n(const ds4_gguf *g, int64_t kv) {
    GGUF_CHECK_IDX(kv >= 0 && kv < g->n_kv);
    return g->kv[kv].type == DS4_GGUF_ARR ? g->kv[kv].arr_n : 0;
}

int ds4_gguf_arr_value(const ds4_gguf *g, int64_t kv, uint64_t i, ds4_gguf_value *out) {
    GGUF_CHECK_IDX(kv >= 0 && kv < g->n_kv);
    const kv_rec *r = &g->kv[kv];
    if (r->type != DS4_GGUF_ARR || i >= r->arr_n) return DS4_E_ARG;
    uint64_t off = r->arr_type == DS4_GGUF_STR ? r->str_off[i] : r->val_off + i * vtype_sizes[r->arr_type];
    decode(g, r->arr_type, off, out);
    return 0;
}

const void *ds4_gguf_arr_data(const ds4_gguf *g, int64_t kv) {
    GGUF_CHECK_IDX(kv >= 0 && kv < g->n_kv);
    const kv_rec *r = &g->kv[kv];
    if (r->type != DS4_GGUF_ARR || r->arr_type == DS4_GGUF_STR) return NULL;
    return g->base + r->val_off;
}

int ds4_gguf_arr_i64(const ds4_gguf *g, int64_t kv, uint64_t i, int64_t *out) {
    ds4_gguf_value v;
    int rc = ds4_gguf_arr_value(g, kv, i, &v);
    if (rc) return rc;
    switch (v.type) {
    case DS4_GGUF_I8: case DS4_GGUF_I16: case DS4_GGUF_I32: case DS4_GGUF_I64: *out = v.v.i64; return 0;
    case DS4_GGUF_U8: case DS4_GGUF_U16: case DS4_GGUF_U32: case DS4_GGUF_U64: case DS4_GGUF_BOOL:
        if (v.v.u64 > (uint64_t)INT64_MAX) return DS4_E_ARG;
        *out = (int64_t)v.v.u64;
        return 0;
    default: return DS4_E_ARG;
    }
}

int ds4_gguf_arr_f64(const ds4_gguf *g, int64_t kv, uint64_t i, double *out) {
    ds4_gguf_value v;
    int rc = ds4_gguf_arr_value(g, kv, i, &v);
    if (rc) return rc;
    switch (v.type) {
    case DS4_GGUF_I8: case DS4_GGUF_I16: case DS4_GGUF_I32: case DS4_GGUF_I64: *out = (double)v.v.i64; return 0;
    case DS4_GGUF_U8: case DS4_GGUF_U16: case DS4_GGUF_U32: case DS4_GGUF_U64: case DS4_GGUF_BOOL:
        *out = (double)v.v.u64;
        return 0;
    case DS4_GGUF_F32: case DS4_GGUF_F64: *out = v.v.f64; return 0;
    default: return DS4_E_ARG;
    }
}

int ds4_gguf_arr_str(const ds4_gguf *g, int64_t kv, uint64_t i, ds4_gguf_str *out) {
    ds4_gguf_value v;
    int rc = ds4_gguf_arr_value(g, kv, i, &v);
    if (rc) return rc;
    if (v.type != DS4_GGUF_STR) return DS4_E_ARG;
    *out = v.v.str;
    return 0;
}

/* Looks key up and checks its type; fills *v for scalars. */
static int get_typed(const ds4_gguf *g, const char *key, uint32_t type, ds4_gguf_value *v, ds4_err *err) {
    int64_t k = ds4_gguf_find_key(g, key);
    if (k < 0) return ds4_err_set(err, DS4_E_MODEL, "missing key '%s' (expected type %s)", key, vtype_names[type]);
    if (g->kv[k].type != type) {
        return ds4_err_set(err, DS4_E_MODEL, "key '%s' has type %s, expected %s", key,
                           vtype_names[g->kv[k].type], vtype_names[type]);
    }
    decode(g, type, g->kv[k].val_off, v);
    return 0;
}

int ds4_gguf_get_u32(const ds4_gguf *g, const char *key, uint32_t *out, ds4_err *err) {
    ds4_gguf_value v;
    int rc = get_typed(g, key, DS4_GGUF_U32, &v, err);
    if (!rc) *out = (uint32_t)v.v.u64;
    return rc;
}

int ds4_gguf_get_i32(const ds4_gguf *g, const char *key, int32_t *out, ds4_err *err) {
    ds4_gguf_value v;
    int rc = get_typed(g, key, DS4_GGUF_I32, &v, err);
    if (!rc) *out = (int32_t)v.v.i64;
    return rc;
}

int ds4_gguf_get_u64(const ds4_gguf *g, const char *key, uint64_t *out, ds4_err *err) {
    ds4_gguf_value v;
    int rc = get_typed(g, key, DS4_GGUF_U64, &v, err);
    if (!rc) *out = v.v.u64;
    return rc;
}

int ds4_gguf_get_f32(const ds4_gguf *g, const char *key, float *out, ds4_err *err) {
    ds4_gguf_value v;
    int rc = get_typed(g, key, DS4_GGUF_F32, &v, err);
    if (!rc) *out = (float)v.v.f64; /* exact: it was a float */
    return rc;
}

int ds4_gguf_get_bool(const ds4_gguf *g, const char *key, bool *out, ds4_err *err) {
    ds4_gguf_value v;
    int rc = get_typed(g, key, DS4_GGUF_BOOL, &v, err);
    if (!rc) *out = v.v.u64 != 0;
    return rc;
}

int ds4_gguf_get_str(const ds4_gguf *g, const char *key, ds4_gguf_str *out, ds4_err *err) {
    ds4_gguf_value v;
    int rc = get_typed(g, key, DS4_GGUF_STR, &v, err);
    if (!rc) *out = v.v.str;
    return rc;
}

int ds4_gguf_get_arr(const ds4_gguf *g, const char *key, uint32_t elem_type, int64_t *kv_out,
                     uint64_t *n_out, ds4_err *err) {
    int64_t k = ds4_gguf_find_key(g, key);
    if (k < 0) {
        return ds4_err_set(err, DS4_E_MODEL, "missing key '%s' (expected ARRAY of %s)", key,
                           ds4_gguf_vtype_name(elem_type));
    }
    const kv_rec *r = &g->kv[k];
    if (r->type != DS4_GGUF_ARR) {
        return ds4_err_set(err, DS4_E_MODEL, "key '%s' has type %s, expected ARRAY of %s", key,
                           vtype_names[r->type], ds4_gguf_vtype_name(elem_type));
    }
    if (r->arr_type != elem_type) {
        return ds4_err_set(err, DS4_E_MODEL, "key '%s' has type ARRAY of %s, expected ARRAY of %s", key,
                           vtype_names[r->arr_type], ds4_gguf_vtype_name(elem_type));
    }
    if (kv_out) *kv_out = k;
    if (n_out) *n_out = r->arr_n;
    return 0;
}

int64_t ds4_gguf_n_tensors(const ds4_gguf *g) { return g->n_t; }

const ds4_gguf_tensor *ds4_gguf_tensor_at(const ds4_gguf *g, int64_t i) {
    GGUF_CHECK_IDX(i >= 0 && i < g->n_t);
    return &g->t[i].pub;
}

int64_t ds4_gguf_find_tensor(const ds4_gguf *g, const char *name) {
    int64_t lo = 0, hi = g->n_t - 1;
    while (lo <= hi) {
        int64_t mid = lo + (hi - lo) / 2, k = g->t_sorted[mid];
        int c = strcmp(g->t[k].name, name);
        if (c == 0) return k;
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

/* ---------------------------------------------------------------- writer */

typedef struct wtensor {
    char name[GGUF_MAX_NAME];
    uint32_t type;
    uint32_t n_dims;
    int64_t ne[4];
    uint64_t n_bytes;
    const void *data;            /* referenced, or NULL when produce is set */
    ds4_gguf_produce_fn produce;
    void *user;
} wtensor;

struct ds4_gguf_writer {
    uint8_t *kvbuf;   /* serialized kv records, in insertion order */
    size_t kv_len, kv_cap;
    char **keys;      /* (n_kv) copies, for the duplicate check */
    int64_t n_kv, keys_cap;
    wtensor *t;
    int64_t n_t, t_cap;
    uint32_t alignment;
    ds4_err first;    /* first add error, returned by the write calls */
};

ds4_gguf_writer *ds4_gguf_writer_new(void) {
    ds4_gguf_writer *w = xcalloc(1, sizeof *w);
    w->alignment = GGUF_DEFAULT_ALIGNMENT;
    return w;
}

void ds4_gguf_writer_free(ds4_gguf_writer *w) {
    if (!w) return;
    for (int64_t i = 0; i < w->n_kv; i++) free(w->keys[i]);
    free(w->keys);
    free(w->kvbuf);
    free(w->t);
    free(w);
}

/* Records the first add error and returns its code. */
static int wfail(ds4_gguf_writer *w, const char *fmt, const char *arg) {
    if (!w->first.code) ds4_err_set(&w->first, DS4_E_ARG, fmt, arg);
    return DS4_E_ARG;
}

static int kv_put(ds4_gguf_writer *w, const void *p, size_t n) {
    if (n > SIZE_MAX - w->kv_len) return wfail(w, "%s: metadata too large", "writer");
    if (w->kv_len + n > w->kv_cap) {
        size_t cap = w->kv_cap ? w->kv_cap : 4096;
        while (cap < w->kv_len + n) cap = cap > SIZE_MAX / 2 ? w->kv_len + n : cap * 2;
        uint8_t *nb = realloc(w->kvbuf, cap);
        if (!nb) {
            if (!w->first.code) ds4_err_set(&w->first, DS4_E_NOMEM, "out of memory for %zu bytes of metadata", cap);
            return DS4_E_NOMEM;
        }
        w->kvbuf = nb;
        w->kv_cap = cap;
    }
    if (n) memcpy(w->kvbuf + w->kv_len, p, n);
    w->kv_len += n;
    return 0;
}

static int kv_put_u32(ds4_gguf_writer *w, uint32_t v) { return kv_put(w, &v, 4); }
static int kv_put_u64(ds4_gguf_writer *w, uint64_t v) { return kv_put(w, &v, 8); }
static int kv_put_str(ds4_gguf_writer *w, const char *s, size_t n) {
    int rc = kv_put_u64(w, n);
    return rc ? rc : kv_put(w, s, n);
}

/* Validates key and writes the record head (key, type). */
static int kv_begin(ds4_gguf_writer *w, const char *key, uint32_t type) {
    if (!key) return wfail(w, "%s: NULL key", "writer");
    size_t n = strlen(key);
    if (n == 0 || n > GGUF_MAX_KEY) return wfail(w, "key '%.200s': must be 1..65535 bytes", key);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)key[i];
        if (ch < 0x21 || ch > 0x7e) return wfail(w, "key '%.200s': keys are printable ASCII without spaces", key);
    }
    if (type != DS4_GGUF_U32 && strcmp(key, "general.alignment") == 0) {
        return wfail(w, "key '%s' must be UINT32 (add it with ds4_gguf_writer_add_u32)", key);
    }
    for (int64_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->keys[i], key) == 0) return wfail(w, "duplicate key '%.200s'", key);
    }
    if (w->n_kv == w->keys_cap) {
        w->keys_cap = w->keys_cap ? w->keys_cap * 2 : 32;
        w->keys = xrealloc(w->keys, (size_t)w->keys_cap * sizeof *w->keys);
    }
    w->keys[w->n_kv++] = xstrdup(key);
    int rc = kv_put_str(w, key, n);
    return rc ? rc : kv_put_u32(w, type);
}

static int add_fixed(ds4_gguf_writer *w, const char *key, uint32_t type, const void *v) {
    int rc = kv_begin(w, key, type);
    return rc ? rc : kv_put(w, v, vtype_sizes[type]);
}

int ds4_gguf_writer_add_u8(ds4_gguf_writer *w, const char *key, uint8_t v) { return add_fixed(w, key, DS4_GGUF_U8, &v); }
int ds4_gguf_writer_add_i8(ds4_gguf_writer *w, const char *key, int8_t v) { return add_fixed(w, key, DS4_GGUF_I8, &v); }
int ds4_gguf_writer_add_u16(ds4_gguf_writer *w, const char *key, uint16_t v) { return add_fixed(w, key, DS4_GGUF_U16, &v); }
int ds4_gguf_writer_add_i16(ds4_gguf_writer *w, const char *key, int16_t v) { return add_fixed(w, key, DS4_GGUF_I16, &v); }
int ds4_gguf_writer_add_i32(ds4_gguf_writer *w, const char *key, int32_t v) { return add_fixed(w, key, DS4_GGUF_I32, &v); }
int ds4_gguf_writer_add_u64(ds4_gguf_writer *w, const char *key, uint64_t v) { return add_fixed(w, key, DS4_GGUF_U64, &v); }
int ds4_gguf_writer_add_i64(ds4_gguf_writer *w, const char *key, int64_t v) { return add_fixed(w, key, DS4_GGUF_I64, &v); }
int ds4_gguf_writer_add_f32(ds4_gguf_writer *w, const char *key, float v) { return add_fixed(w, key, DS4_GGUF_F32, &v); }
int ds4_gguf_writer_add_f64(ds4_gguf_writer *w, const char *key, double v) { return add_fixed(w, key, DS4_GGUF_F64, &v); }

int ds4_gguf_writer_add_u32(ds4_gguf_writer *w, const char *key, uint32_t v) {
    if (key && strcmp(key, "general.alignment") == 0) {
        if (v == 0 || (v & (v - 1)) != 0) return wfail(w, "key '%s': alignment must be a power of two", key);
    }
    int rc = add_fixed(w, key, DS4_GGUF_U32, &v);
    if (!rc && strcmp(key, "general.alignment") == 0) w->alignment = v;
    return rc;
}

int ds4_gguf_writer_add_bool(ds4_gguf_writer *w, const char *key, bool v) {
    uint8_t b = v ? 1 : 0;
    return add_fixed(w, key, DS4_GGUF_BOOL, &b);
}

int ds4_gguf_writer_add_str(ds4_gguf_writer *w, const char *key, const char *s, size_t len) {
    if (!s && len) return wfail(w, "key '%.200s': NULL string", key ? key : "(null)");
    int rc = kv_begin(w, key, DS4_GGUF_STR);
    return rc ? rc : kv_put_str(w, s, len);
}

int ds4_gguf_writer_add_arr(ds4_gguf_writer *w, const char *key, uint32_t elem_type, const void *elems,
                            uint64_t n) {
    if (elem_type >= DS4_GGUF_N_VTYPES || elem_type == DS4_GGUF_STR || elem_type == DS4_GGUF_ARR) {
        return wfail(w, "key '%.200s': array element type must be numeric or BOOL (strings: add_arr_str)",
                     key ? key : "(null)");
    }
    size_t es = vtype_sizes[elem_type];
    if (n > SIZE_MAX / es || (n && !elems)) return wfail(w, "key '%.200s': bad array", key ? key : "(null)");
    if (elem_type == DS4_GGUF_BOOL) {
        for (uint64_t i = 0; i < n; i++) {
            if (((const uint8_t *)elems)[i] > 1) return wfail(w, "key '%.200s': BOOL elements must be 0 or 1", key);
        }
    }
    int rc = kv_begin(w, key, DS4_GGUF_ARR);
    if (!rc) rc = kv_put_u32(w, elem_type);
    if (!rc) rc = kv_put_u64(w, n);
    if (!rc) rc = kv_put(w, elems, (size_t)n * es);
    return rc;
}

int ds4_gguf_writer_add_arr_str(ds4_gguf_writer *w, const char *key, const char *const *strs,
                                const size_t *lens, uint64_t n) {
    if (n && !strs) return wfail(w, "key '%.200s': NULL string array", key ? key : "(null)");
    for (uint64_t i = 0; i < n; i++) {
        if (!strs[i] && (!lens || lens[i])) return wfail(w, "key '%.200s': NULL string element", key ? key : "(null)");
    }
    int rc = kv_begin(w, key, DS4_GGUF_ARR);
    if (!rc) rc = kv_put_u32(w, DS4_GGUF_STR);
    if (!rc) rc = kv_put_u64(w, n);
    for (uint64_t i = 0; !rc && i < n; i++) rc = kv_put_str(w, strs[i], lens ? lens[i] : strlen(strs[i]));
    return rc;
}

/* Validates a tensor description and computes its byte size. */
static int64_t add_tensor_common(ds4_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                                 const int64_t *ne, wtensor *t) {
    memset(t, 0, sizeof *t);
    if (!name) return wfail(w, "%s: NULL tensor name", "writer");
    size_t n = strlen(name);
    if (n == 0 || n >= GGUF_MAX_NAME || !utf8_valid((const unsigned char *)name, n)) {
        return wfail(w, "tensor '%.200s': name must be 1..63 bytes of valid UTF-8", name);
    }
    for (int64_t i = 0; i < w->n_t; i++) {
        if (strcmp(w->t[i].name, name) == 0) return wfail(w, "duplicate tensor name '%s'", name);
    }
    const ds4_ggml_type_info *ti = ds4_ggml_type_get(type);
    if (!ti) return wfail(w, "tensor '%s': unknown ggml type", name);
    if (n_dims < 1 || n_dims > 4 || !ne) return wfail(w, "tensor '%s': n_dims must be 1..4", name);
    memcpy(t->name, name, n + 1);
    t->type = type;
    t->n_dims = n_dims;
    for (int d = 0; d < 4; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] < 1) return wfail(w, "tensor '%s': every ne[i] must be >= 1", name);
        t->ne[d] = ne[d];
    }
    if (t->ne[0] % ti->block_elems) return wfail(w, "tensor '%s': ne[0] is not a multiple of the block size", name);
    uint64_t nb = (uint64_t)(t->ne[0] / ti->block_elems);
    bool ovf = __builtin_mul_overflow(nb, (uint64_t)ti->block_bytes, &nb);
    for (int d = 1; d < 4; d++) ovf = ovf || __builtin_mul_overflow(nb, (uint64_t)t->ne[d], &nb);
    int64_t ne_prod = 1;
    for (int d = 0; d < 4; d++) ovf = ovf || __builtin_mul_overflow(ne_prod, t->ne[d], &ne_prod);
    if (ovf) return wfail(w, "tensor '%s': size overflows 64 bits", name);
    t->n_bytes = nb;
    return 0;
}

static int64_t push_tensor(ds4_gguf_writer *w, const wtensor *t) {
    if (w->n_t == w->t_cap) {
        w->t_cap = w->t_cap ? w->t_cap * 2 : 64;
        w->t = xrealloc(w->t, (size_t)w->t_cap * sizeof *w->t);
    }
    w->t[w->n_t] = *t;
    return w->n_t++;
}

int64_t ds4_gguf_writer_add_tensor(ds4_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                                   const int64_t *ne, const void *data, uint64_t n_bytes) {
    wtensor t;
    int64_t rc = add_tensor_common(w, name, type, n_dims, ne, &t);
    if (rc) return rc;
    if (n_bytes != t.n_bytes) return wfail(w, "tensor '%s': n_bytes does not match type and dims", name);
    if (!data) return wfail(w, "tensor '%s': NULL data", name);
    t.data = data;
    return push_tensor(w, &t);
}

int64_t ds4_gguf_writer_add_tensor_cb(ds4_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                                      const int64_t *ne, ds4_gguf_produce_fn produce, void *user) {
    wtensor t;
    int64_t rc = add_tensor_common(w, name, type, n_dims, ne, &t);
    if (rc) return rc;
    if (!produce) return wfail(w, "tensor '%s': NULL producer", name);
    t.produce = produce;
    t.user = user;
    return push_tensor(w, &t);
}

static uint64_t align_up(uint64_t x, uint32_t a) { return x + (a - x % a) % a; }

/* Computes the layout. Returns the data offset; *total gets the file size.
 * Sizes were overflow-checked per tensor; the sums are checked here. */
static int layout(const ds4_gguf_writer *w, uint64_t *data_offset, uint64_t *total) {
    uint64_t meta = 24 + (uint64_t)w->kv_len;
    for (int64_t i = 0; i < w->n_t; i++) meta += 8 + strlen(w->t[i].name) + 4 + 8ull * w->t[i].n_dims + 4 + 8;
    uint64_t off = align_up(meta, w->alignment);
    *data_offset = off;
    for (int64_t i = 0; i < w->n_t; i++) {
        uint64_t sz = align_up(w->t[i].n_bytes, w->alignment);
        if (sz < w->t[i].n_bytes || __builtin_add_overflow(off, sz, &off)) return DS4_E_ARG;
    }
    *total = off;
    return 0;
}

uint64_t ds4_gguf_writer_file_bytes(const ds4_gguf_writer *w) {
    uint64_t d, t;
    if (w->first.code || layout(w, &d, &t)) return 0;
    return t;
}

/* Output: a file descriptor (buffered) or a growing memory buffer. */
typedef struct wout {
    int fd;              /* -1 for memory */
    const char *path;    /* for messages */
    uint8_t *mem;        /* memory mode: (cap) */
    size_t cap;
    uint8_t *buf;        /* fd mode: (OUT_BUF) staging buffer */
    size_t buf_n;
    uint64_t pos;        /* bytes accepted so far = offset in the output */
} wout;

#define OUT_BUF (1u << 20)

static int fd_write_all(wout *o, const uint8_t *p, size_t n, uint64_t at, ds4_err *err) {
    while (n) {
        ssize_t k = write(o->fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            if (e == ENOSPC || e == EDQUOT) {
                return ds4_err_set(err, DS4_E_IO, "disk full writing %s at byte %llu (%s)", o->path,
                                   (unsigned long long)at, strerror(e));
            }
            if (e == EFBIG) {   /* RLIMIT_FSIZE (with SIGXFSZ ignored) or the filesystem's largest file */
                return ds4_err_set(err, DS4_E_IO, "file too large writing %s at byte %llu (%s: a file-size limit, "
                                   "ulimit -f, or the filesystem's maximum)", o->path, (unsigned long long)at,
                                   strerror(e));
            }
            return ds4_err_set(err, DS4_E_IO, "write error on %s at byte %llu: %s", o->path,
                               (unsigned long long)at, strerror(e));
        }
        p += k;
        n -= (size_t)k;
        at += (uint64_t)k;
    }
    return 0;
}

static int out_flush(wout *o, ds4_err *err) {
    if (o->fd < 0 || o->buf_n == 0) return 0;
    int rc = fd_write_all(o, o->buf, o->buf_n, o->pos - o->buf_n, err);
    o->buf_n = 0;
    return rc;
}

static int out_write(wout *o, const void *p, size_t n, ds4_err *err) {
    if (o->fd < 0) {
        if (n > o->cap - o->pos) {
            return ds4_err_set(err, DS4_E_INTERNAL, "gguf writer: output larger than its computed size");
        }
        memcpy(o->mem + o->pos, p, n);
        o->pos += n;
        return 0;
    }
    if (o->buf_n + n > OUT_BUF) {
        int rc = out_flush(o, err);
        if (rc) return rc;
    }
    if (n >= OUT_BUF) {
        o->pos += n;
        return fd_write_all(o, p, n, o->pos - n, err);
    }
    memcpy(o->buf + o->buf_n, p, n);
    o->buf_n += n;
    o->pos += n;
    return 0;
}

static int out_zeros(wout *o, uint64_t n, ds4_err *err) {
    static const uint8_t z[256];
    while (n) {
        size_t k = n < sizeof z ? (size_t)n : sizeof z;
        int rc = out_write(o, z, k, err);
        if (rc) return rc;
        n -= k;
    }
    return 0;
}

struct ds4_gguf_sink {
    wout *o;
    uint64_t left;       /* bytes the tensor still needs */
    const char *name;
};

int ds4_gguf_sink_write(ds4_gguf_sink *s, const void *data, size_t n, ds4_err *err) {
    if (n > s->left) {
        return ds4_err_set(err, DS4_E_ARG, "tensor '%s': producer wrote %llu bytes more than its size",
                           s->name, (unsigned long long)(n - s->left));
    }
    s->left -= n;
    return out_write(s->o, data, n, err);
}

static int emit(ds4_gguf_writer *w, wout *o, uint64_t data_offset, ds4_err *err) {
    uint32_t version = GGUF_VERSION;
    uint64_t n_t = (uint64_t)w->n_t, n_kv = (uint64_t)w->n_kv;
    int rc = out_write(o, GGUF_MAGIC, 4, err);
    if (!rc) rc = out_write(o, &version, 4, err);
    if (!rc) rc = out_write(o, &n_t, 8, err);
    if (!rc) rc = out_write(o, &n_kv, 8, err);
    if (!rc) rc = out_write(o, w->kvbuf ? (const void *)w->kvbuf : "", w->kv_len, err);
    uint64_t off = 0;
    for (int64_t i = 0; !rc && i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        uint64_t nlen = strlen(t->name), ne;
        rc = out_write(o, &nlen, 8, err);
        if (!rc) rc = out_write(o, t->name, (size_t)nlen, err);
        if (!rc) rc = out_write(o, &t->n_dims, 4, err);
        for (uint32_t d = 0; !rc && d < t->n_dims; d++) {
            ne = (uint64_t)t->ne[d];
            rc = out_write(o, &ne, 8, err);
        }
        if (!rc) rc = out_write(o, &t->type, 4, err);
        if (!rc) rc = out_write(o, &off, 8, err);
        off += align_up(t->n_bytes, w->alignment);
    }
    if (!rc) rc = out_zeros(o, data_offset - o->pos, err);
    for (int64_t i = 0; !rc && i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        if (t->produce) {
            ds4_gguf_sink s = {o, t->n_bytes, t->name};
            rc = t->produce(t->user, i, &s, err);
            if (!rc && s.left) {
                rc = ds4_err_set(err, DS4_E_ARG, "tensor '%s': producer wrote %llu of %llu bytes", t->name,
                                 (unsigned long long)(t->n_bytes - s.left), (unsigned long long)t->n_bytes);
            }
        } else {
            /* write in pieces so size_t never truncates a huge tensor */
            const uint8_t *p = t->data;
            for (uint64_t left = t->n_bytes; !rc && left;) {
                size_t k = left > (1u << 30) ? (1u << 30) : (size_t)left;
                rc = out_write(o, p, k, err);
                p += k;
                left -= k;
            }
        }
        if (!rc) rc = out_zeros(o, align_up(t->n_bytes, w->alignment) - t->n_bytes, err);
    }
    if (!rc) rc = out_flush(o, err);
    return rc;
}

int ds4_gguf_writer_write_mem(ds4_gguf_writer *w, void **out, size_t *n_out, ds4_err *err) {
    *out = NULL;
    *n_out = 0;
    if (w->first.code) return ds4_err_set(err, w->first.code, "%s", w->first.msg);
    uint64_t data_offset, total;
    if (layout(w, &data_offset, &total) || total > SIZE_MAX) {
        return ds4_err_set(err, DS4_E_ARG, "gguf writer: file size overflows");
    }
    wout o = {.fd = -1, .path = "(memory)"};
    o.mem = malloc(total ? (size_t)total : 1);
    if (!o.mem) return ds4_err_set(err, DS4_E_NOMEM, "out of memory for a %llu-byte GGUF", (unsigned long long)total);
    o.cap = (size_t)total;
    int rc = emit(w, &o, data_offset, err);
    if (!rc && o.pos != total) rc = ds4_err_set(err, DS4_E_INTERNAL, "gguf writer: wrote %llu of %llu bytes",
                                                (unsigned long long)o.pos, (unsigned long long)total);
    if (rc) {
        free(o.mem);
        return rc;
    }
    *out = o.mem;
    *n_out = o.cap;
    return 0;
}

/* fsyncs the directory holding path so the rename is durable. */
static int sync_dir(const char *path, ds4_err *err) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, (size_t)(slash - path + (slash == path))) : strdup(".");
    if (!dir) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;
    if (fd < 0 || fsync(fd) != 0) rc = ds4_err_set(err, DS4_E_IO, "cannot sync directory %s: %s", dir, strerror(errno));
    if (fd >= 0) close(fd);
    free(dir);
    return rc;
}

int ds4_gguf_writer_write_file(ds4_gguf_writer *w, const char *path, ds4_err *err) {
    if (w->first.code) return ds4_err_set(err, w->first.code, "%s", w->first.msg);
    int pc = ds4_output_path_ok(path, err);
    if (pc) return pc;
    uint64_t data_offset, total;
    if (layout(w, &data_offset, &total)) return ds4_err_set(err, DS4_E_ARG, "gguf writer: file size overflows");
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 16);
    uint8_t *buf = malloc(OUT_BUF);
    if (!tmp || !buf) {
        free(tmp);
        free(buf);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    snprintf(tmp, plen + 16, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        int e = errno;
        free(buf);
        int rc = ds4_err_set(err, DS4_E_IO, "cannot create a temporary file next to %s: %s", path, strerror(e));
        free(tmp);
        return rc;
    }
    fchmod(fd, 0644);
    ds4_tmp_track(tmp); /* removed if a fatal signal ends the process mid-write */
    wout o = {.fd = fd, .path = path, .buf = buf};
    int rc = emit(w, &o, data_offset, err);
    if (!rc && o.pos != total) {
        rc = ds4_err_set(err, DS4_E_INTERNAL, "gguf writer: wrote %llu of %llu bytes", (unsigned long long)o.pos,
                         (unsigned long long)total);
    }
    if (!rc && fsync(fd) != 0) {
        int e = errno;
        rc = ds4_err_set(err, DS4_E_IO, "%s writing %s (fsync): %s", e == ENOSPC ? "disk full" : "I/O error", path,
                         strerror(e));
    }
    if (close(fd) != 0 && !rc) rc = ds4_err_set(err, DS4_E_IO, "closing %s: %s", path, strerror(errno));
    if (!rc && rename(tmp, path) != 0) rc = ds4_err_set(err, DS4_E_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (rc) unlink(tmp);
    ds4_tmp_untrack();
    if (!rc) rc = sync_dir(path, err);
    free(tmp);
    free(buf);
    return rc;
}

int ds4_gguf_identity(const ds4_gguf *g, uint8_t out[32]) {
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    unsigned int len = 0;
    int ok = c && EVP_DigestInit_ex(c, EVP_sha256(), NULL) &&
             EVP_DigestUpdate(c, ds4_gguf_base(g), (size_t)ds4_gguf_data_offset(g));
    for (int64_t i = 0; ok && i < ds4_gguf_n_tensors(g); i++) {
        const ds4_gguf_tensor *t = ds4_gguf_tensor_at(g, i);
        const uint64_t k = t->n_bytes < 4096 ? t->n_bytes : 4096;
        const uint64_t at[3] = {0, (t->n_bytes - k) / 2, t->n_bytes - k};
        for (int j = 0; ok && j < 3; j++) ok = EVP_DigestUpdate(c, (const unsigned char *)t->data + at[j], (size_t)k);
    }
    ok = ok && EVP_DigestFinal_ex(c, out, &len) && len == 32;
    EVP_MD_CTX_free(c);
    return ok ? 0 : DS4_E_INTERNAL;
}
