/* gguf_dump.c - ds4-gguf: print a GGUF file's metadata and tensor table.
 *
 *   ds4-gguf FILE [--json] [--hash]
 *
 * Text output follows gguf-py's gguf-dump (one line per key/value with its
 * type and element count; long arrays abbreviated; strings escaped), then a
 * tensor table with index, name, type, dims, offset and bytes. --json prints
 * one machine-readable object with every value in full (arrays not
 * abbreviated). --hash adds the SHA-256 of each tensor's bytes (reads the
 * whole file). A damaged file prints one line "ds4-gguf: FILE: <error>" on
 * stderr and exits 1; a usage error exits 2.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "util/file.h"
#include "util/utf8.h"

#define ARRAY_SHOW 8 /* array elements shown in text mode */

static void usage(FILE *f) {
    fprintf(f, "usage: ds4-gguf FILE [--json] [--hash]\n"
               "  prints the metadata and tensor table of a GGUF v3 file\n"
               "  --json   one JSON object with every value in full\n"
               "  --hash   add the SHA-256 of each tensor's data\n");
}

/* Prints s escaped as a double-quoted string: \" \\ \n \r \t, other control
 * bytes and invalid UTF-8 (overlongs and surrogates included, as --json
 * reads them) as \xNN; valid multi-byte UTF-8 as is. At most
 * max_bytes source bytes are shown (0 = all). */
static void print_escaped(FILE *f, ds4_gguf_str s, uint64_t max_bytes) {
    fputc('"', f);
    uint64_t lim = (max_bytes && s.len > max_bytes) ? max_bytes : s.len;
    const unsigned char *p = (const unsigned char *)s.ptr;
    for (uint64_t i = 0; i < lim;) {
        unsigned char c = p[i];
        if (c == '"' || c == '\\') { fprintf(f, "\\%c", c); i++; continue; }
        if (c == '\n') { fputs("\\n", f); i++; continue; }
        if (c == '\r') { fputs("\\r", f); i++; continue; }
        if (c == '\t') { fputs("\\t", f); i++; continue; }
        if (c >= 0x20 && c < 0x7f) { fputc(c, f); i++; continue; }
        const int len = c >= 0x80 ? ds4_utf8_char(p + i, (size_t)(lim - i)) : 0; /* strict: no overlongs, surrogates */
        if (len) {
            fwrite(p + i, 1, (size_t)len, f);
            i += (uint64_t)len;
        } else {
            fprintf(f, "\\x%02x", c);
            i++;
        }
    }
    fputc('"', f);
    if (lim < s.len) fprintf(f, "...(%" PRIu64 " bytes)", s.len);
}

static void print_value(FILE *f, const ds4_gguf_value *v, uint64_t max_str) {
    switch (v->type) {
    case DS4_GGUF_U8: case DS4_GGUF_U16: case DS4_GGUF_U32: case DS4_GGUF_U64:
        fprintf(f, "%" PRIu64, v->v.u64);
        break;
    case DS4_GGUF_I8: case DS4_GGUF_I16: case DS4_GGUF_I32: case DS4_GGUF_I64:
        fprintf(f, "%" PRId64, v->v.i64);
        break;
    case DS4_GGUF_F32: fprintf(f, "%.9g", v->v.f64); break;
    case DS4_GGUF_F64: fprintf(f, "%.17g", v->v.f64); break;
    case DS4_GGUF_BOOL: fputs(v->v.u64 ? "True" : "False", f); break;
    case DS4_GGUF_STR: print_escaped(f, v->v.str, max_str); break;
    default: fputs("?", f); break;
    }
}

static void dump_text(const char *path, const ds4_gguf *g) {
    int64_t n_kv = ds4_gguf_n_kv(g), n_t = ds4_gguf_n_tensors(g);
    printf("* File: %s\n", path);
    printf("* GGUF v3, %" PRIu64 " bytes, alignment %u, data section at byte %" PRIu64 "%s\n",
           ds4_gguf_file_bytes(g), ds4_gguf_alignment(g), ds4_gguf_data_offset(g),
           ds4_gguf_is_packed(g) ? "" : " (tensors not packed in directory order)");
    printf("* Dumping %" PRId64 " key/value pair(s)\n", n_kv);
    for (int64_t i = 0; i < n_kv; i++) {
        uint32_t t = ds4_gguf_kv_type(g, i);
        char tname[32];
        uint64_t n = 1;
        if (t == DS4_GGUF_ARR) {
            snprintf(tname, sizeof tname, "[%s]", ds4_gguf_vtype_name(ds4_gguf_arr_type(g, i)));
            n = ds4_gguf_arr_n(g, i);
        } else {
            snprintf(tname, sizeof tname, "%s", ds4_gguf_vtype_name(t));
        }
        printf("%7" PRId64 ": %-10s | %8" PRIu64 " | %s = ", i + 1, tname, n, ds4_gguf_kv_key(g, i));
        ds4_gguf_value v;
        if (t != DS4_GGUF_ARR) {
            ds4_gguf_kv_value(g, i, &v);
            print_value(stdout, &v, 0);
        } else {
            fputc('[', stdout);
            for (uint64_t k = 0; k < n && k < ARRAY_SHOW; k++) {
                ds4_gguf_arr_value(g, i, k, &v);
                if (k) fputs(", ", stdout);
                print_value(stdout, &v, 60);
            }
            if (n > ARRAY_SHOW) fputs(", ...", stdout);
            fputc(']', stdout);
        }
        fputc('\n', stdout);
    }
    printf("* Dumping %" PRId64 " tensor(s)\n", n_t);
    printf("%7s  %-40s %-8s %-32s %14s %14s\n", "idx", "name", "type", "dims (ne0, ne1, ...)", "offset", "bytes");
    for (int64_t i = 0; i < n_t; i++) {
        const ds4_gguf_tensor *t = ds4_gguf_tensor_at(g, i);
        char dims[96];
        int o = 0;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            o += snprintf(dims + o, sizeof dims - (size_t)o, "%s%" PRId64, d ? ", " : "", t->ne[d]);
        }
        printf("%7" PRId64 ": %-40s %-8s %-32s %14" PRIu64 " %14" PRIu64 "\n", i + 1, t->name,
               ds4_ggml_type_name(t->type), dims, t->offset, t->n_bytes);
    }
}

/* JSON for a string: a JSON string when valid UTF-8, else {"hex": "..."}. */
static json_t *json_str(ds4_gguf_str s) {
    json_t *j = json_stringn(s.ptr, (size_t)s.len); /* NULL when not UTF-8 */
    if (j) return j;
    char *hex = malloc((size_t)s.len * 2 + 1);
    if (!hex) return json_null();
    for (uint64_t i = 0; i < s.len; i++) snprintf(hex + 2 * i, 3, "%02x", (unsigned char)s.ptr[i]);
    json_t *o = json_pack("{s:s}", "hex", hex);
    free(hex);
    return o;
}

static json_t *json_value(const ds4_gguf_value *v) {
    switch (v->type) {
    case DS4_GGUF_U8: case DS4_GGUF_U16: case DS4_GGUF_U32: case DS4_GGUF_U64: case DS4_GGUF_BOOL:
        if (v->type == DS4_GGUF_BOOL) return json_boolean(v->v.u64);
        if (v->v.u64 > (uint64_t)INT64_MAX) {
            /* beyond json_int_t: the decimal digits as a string */
            char buf[32];
            snprintf(buf, sizeof buf, "%" PRIu64, v->v.u64);
            return json_string(buf);
        }
        return json_integer((json_int_t)v->v.u64);
    case DS4_GGUF_I8: case DS4_GGUF_I16: case DS4_GGUF_I32: case DS4_GGUF_I64:
        return json_integer((json_int_t)v->v.i64);
    case DS4_GGUF_F32: case DS4_GGUF_F64:
        if (isnan(v->v.f64)) return json_string("nan");
        if (isinf(v->v.f64)) return json_string(v->v.f64 > 0 ? "inf" : "-inf");
        return json_real(v->v.f64);
    case DS4_GGUF_STR: return json_str(v->v.str);
    default: return json_null();
    }
}

static int sha256_hex(const void *data, uint64_t n, char out[65]) {
    unsigned char md[32];
    unsigned int md_len = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    const unsigned char *p = data;
    while (ok && n) {
        size_t k = n > (1u << 30) ? (1u << 30) : (size_t)n;
        ok = EVP_DigestUpdate(ctx, p, k);
        p += k;
        n -= k;
    }
    ok = ok && EVP_DigestFinal_ex(ctx, md, &md_len);
    EVP_MD_CTX_free(ctx);
    if (!ok) return -1;
    for (unsigned i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
    return 0;
}

static json_t *dump_json(const char *path, const ds4_gguf *g, bool hash) {
    json_t *root = json_object(), *kvs = json_array(), *ts = json_array();
    json_object_set_new(root, "file", json_string(path));
    json_object_set_new(root, "version", json_integer(3));
    json_object_set_new(root, "file_bytes", json_integer((json_int_t)ds4_gguf_file_bytes(g)));
    json_object_set_new(root, "alignment", json_integer(ds4_gguf_alignment(g)));
    json_object_set_new(root, "data_offset", json_integer((json_int_t)ds4_gguf_data_offset(g)));
    json_object_set_new(root, "packed", json_boolean(ds4_gguf_is_packed(g)));
    for (int64_t i = 0; i < ds4_gguf_n_kv(g); i++) {
        json_t *o = json_object();
        uint32_t t = ds4_gguf_kv_type(g, i);
        json_object_set_new(o, "key", json_string(ds4_gguf_kv_key(g, i)));
        json_object_set_new(o, "type", json_string(ds4_gguf_vtype_name(t)));
        ds4_gguf_value v;
        if (t == DS4_GGUF_ARR) {
            uint64_t n = ds4_gguf_arr_n(g, i);
            json_t *a = json_array();
            json_object_set_new(o, "elem_type", json_string(ds4_gguf_vtype_name(ds4_gguf_arr_type(g, i))));
            json_object_set_new(o, "n", json_integer((json_int_t)n));
            for (uint64_t k = 0; k < n; k++) {
                ds4_gguf_arr_value(g, i, k, &v);
                json_array_append_new(a, json_value(&v));
            }
            json_object_set_new(o, "value", a);
        } else {
            ds4_gguf_kv_value(g, i, &v);
            json_object_set_new(o, "value", json_value(&v));
        }
        json_array_append_new(kvs, o);
    }
    for (int64_t i = 0; i < ds4_gguf_n_tensors(g); i++) {
        const ds4_gguf_tensor *t = ds4_gguf_tensor_at(g, i);
        json_t *ne = json_array();
        for (uint32_t d = 0; d < t->n_dims; d++) json_array_append_new(ne, json_integer(t->ne[d]));
        json_t *o = json_pack("{s:s, s:s, s:i, s:i, s:o, s:I, s:I, s:I}", "name", t->name, "type",
                              ds4_ggml_type_name(t->type), "type_id", (int)t->type, "n_dims", (int)t->n_dims,
                              "ne", ne, "n_elems", (json_int_t)t->n_elems, "offset", (json_int_t)t->offset,
                              "n_bytes", (json_int_t)t->n_bytes);
        if (hash) {
            char hex[65];
            if (sha256_hex(t->data, t->n_bytes, hex) == 0) json_object_set_new(o, "sha256", json_string(hex));
        }
        json_array_append_new(ts, o);
    }
    json_object_set_new(root, "kv", kvs);
    json_object_set_new(root, "tensors", ts);
    return root;
}

int main(int argc, char **argv) {
    ds4_sigbus_message("ds4-gguf"); /* the file truncated while mapped: say so */
    signal(SIGXFSZ, SIG_IGN);        /* a file-size limit on stdout fails the writes (said at the end) */
    const char *path = NULL;
    bool json = false, hash = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) json = true;
        else if (strcmp(argv[i], "--hash") == 0) hash = true;
        else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return fflush(stdout) == 0 && !ferror(stdout) ? 0 : 1; /* > /dev/full: the help was lost */
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "ds4-gguf: unknown option %s\n", argv[i]);
            usage(stderr);
            return 2;
        } else if (path) {
            fprintf(stderr, "ds4-gguf: only one FILE\n");
            usage(stderr);
            return 2;
        } else {
            path = argv[i];
        }
    }
    if (!path) {
        usage(stderr);
        return 2;
    }
    ds4_err err = {0};
    ds4_gguf *g;
    if (ds4_gguf_open(&g, path, &err) != 0) {
        fprintf(stderr, "ds4-gguf: %s\n", err.msg); /* the message starts with "FILE: " */
        return 1;
    }
    if (json) {
        json_t *root = dump_json(path, g, hash);
        int rc = json_dumpf(root, stdout, JSON_COMPACT | JSON_REAL_PRECISION(17));
        json_decref(root);
        fputc('\n', stdout);
        if (rc != 0) {
            fprintf(stderr, "ds4-gguf: %s: cannot write JSON\n", path);
            ds4_gguf_close(g);
            return 1;
        }
    } else {
        dump_text(path, g);
        if (hash) {
            printf("* SHA-256 of tensor data\n");
            for (int64_t i = 0; i < ds4_gguf_n_tensors(g); i++) {
                const ds4_gguf_tensor *t = ds4_gguf_tensor_at(g, i);
                char hex[65];
                if (sha256_hex(t->data, t->n_bytes, hex) == 0) printf("%7" PRId64 ": %s %s\n", i + 1, hex, t->name);
            }
        }
    }
    ds4_gguf_close(g);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "ds4-gguf: %s: cannot write output: %s\n", path, strerror(errno ? errno : EIO));
        return 1;
    }
    return 0;
}
