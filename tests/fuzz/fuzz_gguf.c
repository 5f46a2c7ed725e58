/* fuzz_gguf.c - libFuzzer target for the GGUF reader.
 *
 * Opens the input with ds4_gguf_open_memory (over an exact-size copy, so
 * ASan sees any read past the end) and, when it opens, walks every
 * accessor: each kv (scalar value or every array element, through every
 * typed helper), the typed getters by key, and every tensor (lookup by
 * name, first and last data byte). Seeds (tests/fuzz/corpus/fuzz_gguf/):
 * files written by gguf-py and by our writer (tests/py/test_gguf_py.py
 * helpers) and a few of tests/data/gguf-bad.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"

static void walk_kv(const ds4_gguf *g, int64_t k) {
    const char *key = ds4_gguf_kv_key(g, k);
    if (ds4_gguf_find_key(g, key) != k) abort(); /* keys are unique */
    ds4_err err;
    uint32_t u32;
    int32_t i32;
    uint64_t u64;
    float f;
    bool b;
    ds4_gguf_str s;
    ds4_gguf_get_u32(g, key, &u32, &err);
    ds4_gguf_get_i32(g, key, &i32, &err);
    ds4_gguf_get_u64(g, key, &u64, &err);
    ds4_gguf_get_f32(g, key, &f, &err);
    ds4_gguf_get_bool(g, key, &b, &err);
    if (ds4_gguf_get_str(g, key, &s, &err) == 0) {
        char *d = ds4_gguf_str_dup(s);
        free(d);
    }
    ds4_gguf_value v;
    if (ds4_gguf_kv_type(g, k) != DS4_GGUF_ARR) {
        if (ds4_gguf_kv_value(g, k, &v) != 0) abort();
        return;
    }
    uint32_t et = ds4_gguf_arr_type(g, k);
    uint64_t n = ds4_gguf_arr_n(g, k);
    int64_t kv;
    uint64_t n2;
    if (ds4_gguf_get_arr(g, key, et, &kv, &n2, &err) != 0 || kv != k || n2 != n) abort();
    volatile uint8_t sink = 0;
    const uint8_t *raw = ds4_gguf_arr_data(g, k);
    if (raw && n) sink ^= raw[0] ^ raw[n * ds4_gguf_vtype_size(et) - 1];
    for (uint64_t i = 0; i < n; i++) {
        if (ds4_gguf_arr_value(g, k, i, &v) != 0) abort();
        int64_t iv;
        double dv;
        ds4_gguf_arr_i64(g, k, i, &iv);
        ds4_gguf_arr_f64(g, k, i, &dv);
        if (ds4_gguf_arr_str(g, k, i, &s) == 0 && s.len) sink ^= (uint8_t)s.ptr[0] ^ (uint8_t)s.ptr[s.len - 1];
    }
    if (ds4_gguf_arr_value(g, k, n, &v) == 0) abort();
    (void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    if (size) memcpy(copy, data, size);
    ds4_gguf *g = NULL;
    ds4_err err;
    if (ds4_gguf_open_memory(&g, copy, size, &err) == 0) {
        for (int64_t k = 0; k < ds4_gguf_n_kv(g); k++) walk_kv(g, k);
        volatile uint8_t sink = 0;
        for (int64_t i = 0; i < ds4_gguf_n_tensors(g); i++) {
            const ds4_gguf_tensor *t = ds4_gguf_tensor_at(g, i);
            if (ds4_gguf_find_tensor(g, t->name) != i) abort(); /* names are unique */
            const uint8_t *p = t->data;
            if (t->n_bytes) sink ^= p[0] ^ p[t->n_bytes - 1];
        }
        (void)sink;
        ds4_gguf_close(g);
    } else if (err.code >= 0 || !err.msg[0]) {
        abort(); /* every failure carries a code and a message */
    }
    free(copy);
    return 0;
}
