/* fuzz_tokenizer.c - libFuzzer target for the tokenizer (pre-tokenizer
 * regexes, BPE, rendered-mode marker scan, streaming detokenizer).
 *
 * Loads the V3 tokenizer.json from tests/data (run from the repo root) with
 * the converter's loader, once. For every input (any bytes) it checks:
 *   - encode never fails and, plain or rendered, the decoded ids give back the
 *     input bytes exactly;
 *   - a second encode with a too-small buffer returns the same count;
 *   - the streaming detokenizer outputs valid UTF-8 only.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"

#include "../../tools/convert/tokenizer_json.c"

static ds4_tokenizer *g_tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    ds4_tokjson tj;
    ds4_err err = {0};
    if (ds4_tokjson_load(&tj, "tests/data/deepseek-v3-tokenizer.json", DS4_CONVERT_V4_N_VOCAB,
                         &err) != 0) {
        fprintf(stderr, "fuzz_tokenizer: run from the repo root (%s)\n", err.msg);
        abort();
    }
    if (ds4_tokenizer_from_arrays(&g_tok, (const char *const *)tj.tokens, tj.token_lens,
                                  tj.n_tokens, (const char *const *)tj.merges, tj.merge_lens,
                                  tj.n_merges, &err) != 0) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", err.msg);
        abort();
    }
    ds4_tokjson_free(&tj);
    return 0;
}

/* Strict UTF-8 check (Unicode Table 3-7: no overlongs, no surrogates). */
static int utf8_ok(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = (unsigned char)s[i];
        int k = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
              : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
        if (!k || i + (size_t)k > n) return 0;
        for (int j = 1; j < k; j++) {
            unsigned b = (unsigned char)s[i + j], lo = 0x80, hi = 0xbf;
            if (j == 1 && c == 0xe0) lo = 0xa0;
            if (j == 1 && c == 0xed) hi = 0x9f;
            if (j == 1 && c == 0xf0) lo = 0x90;
            if (j == 1 && c == 0xf4) hi = 0x8f;
            if (b < lo || b > hi) return 0;
        }
        i += (size_t)k;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    int32_t *ids = malloc(sizeof(int32_t) * (size + 1));
    char *dec = malloc(size + 1);
    char *out = malloc(3 * size + 16);
    ds4_err err = {0};
    for (int rendered = 0; rendered < 2; rendered++) {
        int n = ds4_tokenizer_encode(g_tok, text, size, rendered, ids, (int)size + 1, &err);
        if (n < 0 || n > (int)size) abort(); /* every id covers >= 1 byte */
        if (size > 0 && ds4_tokenizer_encode(g_tok, text, size, rendered, ids + n, 0, &err) != n)
            abort();
        size_t m = 0;
        for (int i = 0; i < n; i++) {
            size_t l;
            const char *b = ds4_tokenizer_token_bytes(g_tok, ids[i], &l);
            if (!b || m + l > size) abort();
            memcpy(dec + m, b, l);
            m += l;
        }
        if (m != size || memcmp(dec, text, size) != 0) abort();
        ds4_detok d;
        if (ds4_detok_init(&d, g_tok, &err) != 0) abort();
        size_t o = 0, l;
        for (int i = 0; i < n; i++) {
            const char *p = ds4_detok_push(&d, ids[i], &l);
            if (!utf8_ok(p, l)) abort();
            memcpy(out + o, p, l);
            o += l;
        }
        const char *p = ds4_detok_flush(&d, &l);
        memcpy(out + o, p, l);
        o += l;
        ds4_detok_free(&d);
        /* valid input comes back unchanged through the detokenizer */
        if (utf8_ok(text, size) && (o != size || memcmp(out, text, size) != 0)) abort();
    }
    free(ids);
    free(dec);
    free(out);
    return 0;
}
