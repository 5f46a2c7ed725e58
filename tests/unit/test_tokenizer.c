/* test_tokenizer.c - unit tests of src/tokenizer.c, src/pretok.c and the
 * converter's tokenizer.json loader.
 *
 * Expected ids come from docs/TEXT.md (A.4/A.5 tables and A.9 rendered vectors,
 * which the spec derived with Hugging Face tokenizers on the V3
 * tokenizer.json) or from a naive string-based BPE written here. The full
 * comparison with Hugging Face on a large corpus is tests/py/test_tokenizer_hf.py.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "test.h"
#include "tokenizer.h"

/* the converter's loader (tools/convert), tested here as well */
#include "../../tools/convert/tokenizer_json.c"

/* ------------------------------------------------------------ helpers */

static ds4_tokenizer *load_v3(ds4_err *err) {
    ds4_tokjson tj;
    if (ds4_tokjson_load(&tj, ds4_test_path("deepseek-v3-tokenizer.json"),
                         DS4_CONVERT_V4_N_VOCAB, err))
        return NULL;
    ds4_tokenizer *t = NULL;
    ds4_tokenizer_from_arrays(&t, (const char *const *)tj.tokens, tj.token_lens, tj.n_tokens,
                              (const char *const *)tj.merges, tj.merge_lens, tj.n_merges, err);
    ds4_tokjson_free(&tj);
    return t;
}

/* Encodes s and compares with want[0..n_want). Returns 1 when equal. */
static int ids_equal(const ds4_tokenizer *t, const char *s, size_t len, bool rendered,
                     const int32_t *want, int n_want, char *why, size_t why_cap) {
    int32_t got[256];
    ds4_err err = {0};
    int n = ds4_tokenizer_encode(t, s, len, rendered, got, 256, &err);
    if (n != n_want) {
        snprintf(why, why_cap, "\"%.100s\": %d ids, expected %d (%.200s)", s, n, n_want, err.msg);
        return 0;
    }
    for (int i = 0; i < n; i++)
        if (got[i] != want[i]) {
            snprintf(why, why_cap, "\"%s\": id[%d] = %d, expected %d", s, i, got[i], want[i]);
            return 0;
        }
    return 1;
}

/* Concatenated decoded bytes of ids into a malloc'ed buffer. */
static char *decode_all(const ds4_tokenizer *t, const int32_t *ids, int n, size_t *len) {
    size_t cap = 16, m = 0;
    char *o = malloc(cap);
    for (int i = 0; i < n; i++) {
        size_t l;
        const char *b = ds4_tokenizer_token_bytes(t, ids[i], &l);
        while (m + l + 1 > cap) o = realloc(o, cap *= 2);
        memcpy(o + m, b, l);
        m += l;
    }
    *len = m;
    return o;
}

/* ------------------------------------------------------------ real vocab */

DS4_TEST(tokenizer_v3_spec_vectors) {
    ds4_err err = {0};
    ds4_tokenizer *tk = load_v3(&err);
    CHECK_MSG(tk, "load: %s", err.msg);
    char why[512] = "";
    struct { const char *s; int32_t ids[8]; int n; } v[] = {
        /* docs/TEXT.md A.4 (cases where ds4 and the official regex agree) */
        {"Hello, world!", {19923, 14, 2058, 3}, 4},
        {"    int x = 10;\n", {361, 688, 1527, 438, 223, 553, 510}, 7},
        {"x  \n  y", {90, 2143, 223, 383}, 4},
        {"12345", {6895, 1883}, 2},
        {" ?!\n\nfoo", {4054, 2596, 40897}, 3},
        {"don't stop", {20385, 1664, 6409}, 3},
        {">;\n}", {49962, 95}, 2},
        /* docs/TEXT.md A.5 official values of the divergence table */
        {"\xe2\x80\xa6\n", {20947}, 1},                 /* "…\n" */
        {"a\xc2\xa0\xc2\xa0" "b", {67, 2162, 2162, 68}, 4}, /* NBSPs */
        {"   \xe4\xb8\xad\xe6\x96\x87", {361, 21134}, 2},   /* "   中文" */
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        if (!ids_equal(tk, v[i].s, strlen(v[i].s), false, v[i].ids, v[i].n, why, sizeof why)) {
            ds4_tokenizer_free(tk);
            TEST_FAIL("%s", why);
        }
    }
    ds4_tokenizer_free(tk);
}

DS4_TEST(tokenizer_v3_rendered_vectors) {
    ds4_err err = {0};
    ds4_tokenizer *tk = load_v3(&err);
    CHECK_MSG(tk, "load: %s", err.msg);
    /* markers found by string, with the V4 ids the converter assigns */
    CHECK_EQ_INT(ds4_tokenizer_special(tk, DS4_TOK_BOS), 0);
    CHECK_EQ_INT(ds4_tokenizer_special(tk, DS4_TOK_EOS), 1);
    CHECK_EQ_INT(ds4_tokenizer_special(tk, DS4_TOK_USER), 128803);
    CHECK_EQ_INT(ds4_tokenizer_special(tk, DS4_TOK_ASSISTANT), 128804);
    CHECK_EQ_INT(ds4_tokenizer_special(tk, DS4_TOK_THINK_OPEN), 128821);
    CHECK_EQ_INT(ds4_tokenizer_special(tk, DS4_TOK_THINK_CLOSE), 128822);
    CHECK_EQ_INT(ds4_tokenizer_special(tk, DS4_TOK_DSML), 128825);
    CHECK_EQ_INT(ds4_tokenizer_n_vocab(tk), 129280);
    char why[512] = "";
#define BOS "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"
#define USR "<\xef\xbd\x9cUser\xef\xbd\x9c>"
#define AST "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>"
#define DSML "\xef\xbd\x9c" "DSML\xef\xbd\x9c"
    struct { const char *s; int32_t ids[16]; int n; } v[] = {
        {BOS USR "Hello" AST "</think>", {0, 128803, 19923, 128804, 128822}, 5},
        {BOS "You are a helpful assistant" USR "Hi" AST "<think>",
         {0, 3476, 477, 260, 11502, 22896, 128803, 23166, 128804, 128821}, 10},
        {USR "<tool_result>ok</tool_result>" AST "<think>",
         {128803, 30, 72461, 46148, 32, 633, 1718, 72461, 46148, 32, 128804, 128821}, 12},
        {"\n\n<" DSML "tool_calls>\n<" DSML "invoke name=\"bash\">\n",
         {271, 30, 128825, 72461, 4941, 12548, 1018, 30, 128825, 40148, 5406, 2329, 1281, 61159,
          3816}, 15},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        if (!ids_equal(tk, v[i].s, strlen(v[i].s), true, v[i].ids, v[i].n, why, sizeof why)) {
            ds4_tokenizer_free(tk);
            TEST_FAIL("%s", why);
        }
    }
    /* plain mode: markers are ordinary text, never their ids */
    int32_t ids[64];
    int n = ds4_tokenizer_encode(tk, BOS USR "<think>", strlen(BOS USR "<think>"), false, ids, 64,
                                 &err);
    CHECK(n > 3);
    for (int i = 0; i < n; i++) CHECK(ids[i] != 0 && ids[i] < 128000);
    ds4_tokenizer_free(tk);
}

/* Control tokens (issue 12 item 7): every added token of the V3 table and
 * the V4 markers, never a BPE token -- counted over the whole vocabulary. */
DS4_TEST(tokenizer_control_tokens) {
    ds4_err err = {0};
    ds4_tokenizer *tk = load_v3(&err);
    CHECK_MSG(tk, "load: %s", err.msg);
    CHECK(ds4_tokenizer_is_control(tk, 0));      /* BOS */
    CHECK(ds4_tokenizer_is_control(tk, 128000)); /* <｜place▁holder▁no▁0｜> */
    CHECK(ds4_tokenizer_is_control(tk, 128805)); /* <|EOT|> */
    CHECK(ds4_tokenizer_is_control(tk, 128806)); /* <｜tool▁calls▁begin｜> */
    CHECK(ds4_tokenizer_is_control(tk, 128821)); /* <think> */
    CHECK(ds4_tokenizer_is_control(tk, 128825)); /* ｜DSML｜ */
    CHECK(!ds4_tokenizer_is_control(tk, 19923)); /* Hello */
    CHECK(!ds4_tokenizer_is_control(tk, -1) && !ds4_tokenizer_is_control(tk, 1 << 20));
    int n_bpe = 0;
    for (int32_t id = 0; id < 128000; id++) n_bpe += ds4_tokenizer_is_control(tk, id);
    CHECK_EQ_INT(n_bpe, 3); /* BOS, EOS and <｜▁pad▁｜> sit at ids 0..2 */
    ds4_tokenizer_free(tk);
}

/* decode(encode(x)) == x for random byte strings, valid UTF-8 or not. */
DS4_TEST(tokenizer_v3_roundtrip_random_bytes) {
    ds4_err err = {0};
    ds4_tokenizer *tk = load_v3(&err);
    CHECK_MSG(tk, "load: %s", err.msg);
    uint64_t rng = 12345;
    static const char *alphabet[] = {"a", "Z", " ", "\n", "\r", "\tk", "1", "\xd9\xa3", "\xe4\xb8\xad",
                                     "\xf0\x9f\x98\x80", "\xc2\xa0", "<", "\xef\xbd\x9c", ".",
                                     "\x80", "\xff", "\xe4\xb8", "\xc3", "\x00", "\xcc\x81"};
    char buf[2048];
    int32_t ids[4096];
    for (int it = 0; it < 300; it++) {
        size_t len = 0;
        int parts = (int)((rng >> 33) % 200);
        for (int k = 0; k < parts; k++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            const char *a = (rng >> 40) % 3 == 0
                                ? NULL
                                : alphabet[(rng >> 20) % (sizeof alphabet / sizeof alphabet[0])];
            if (a) {
                size_t l = a[0] ? strlen(a) : 1;
                memcpy(buf + len, a, l);
                len += l;
            } else {
                buf[len++] = (char)(rng >> 52); /* any byte */
            }
        }
        for (int rendered = 0; rendered < 2; rendered++) {
            int n = ds4_tokenizer_encode(tk, buf, len, rendered, ids, 4096, &err);
            CHECK_MSG(n >= 0 && n <= 4096, "encode: %d %s", n, err.msg);
            size_t dl;
            char *d = decode_all(tk, ids, n, &dl);
            int same = dl == len && memcmp(d, buf, len) == 0;
            free(d);
            CHECK_MSG(same, "round trip differs (iteration %d, %zu bytes)", it, len);
        }
    }
    ds4_tokenizer_free(tk);
}

DS4_TEST(tokenizer_v3_count_and_cap) {
    ds4_err err = {0};
    ds4_tokenizer *tk = load_v3(&err);
    CHECK_MSG(tk, "load: %s", err.msg);
    const char *s = "Hello, world! 12345";
    int n = ds4_tokenizer_encode(tk, s, strlen(s), false, NULL, 0, &err);
    CHECK_EQ_INT(n, 7);
    int32_t ids[3] = {-1, -1, -1};
    CHECK_EQ_INT(ds4_tokenizer_encode(tk, s, strlen(s), false, ids, 2, &err), 7);
    CHECK_EQ_INT(ids[0], 19923);
    CHECK_EQ_INT(ids[2], -1); /* nothing written past cap */
    CHECK_EQ_INT(ds4_tokenizer_encode(tk, "", 0, true, NULL, 0, &err), 0);
    CHECK(ds4_tokenizer_encode(tk, s, 5, false, NULL, -1, &err) == DS4_E_ARG);
    CHECK(ds4_tokenizer_token_bytes(tk, -1, NULL) == NULL);
    CHECK(ds4_tokenizer_token_text(tk, 129280) == NULL);
    CHECK_STR(ds4_tokenizer_token_text(tk, 2058), "\xc4\xa0world"); /* "Ġworld" */
    size_t l;
    const char *b = ds4_tokenizer_token_bytes(tk, 2058, &l);
    CHECK(l == 6 && memcmp(b, " world", 6) == 0);
    b = ds4_tokenizer_token_bytes(tk, 128803, &l); /* markers decode verbatim */
    CHECK(l == strlen(USR) && memcmp(b, USR, l) == 0);
    ds4_tokenizer_free(tk);
}

/* Huge runs take the heap BPE path and the big JIT stack; they must agree
 * with the same text tokenized in pieces the pre-tokenizer would make. */
DS4_TEST(tokenizer_v3_long_runs) {
    ds4_err err = {0};
    ds4_tokenizer *tk = load_v3(&err);
    CHECK_MSG(tk, "load: %s", err.msg);
    size_t len = 1 << 20;
    char *s = malloc(len + 1);
    int32_t *ids = malloc(sizeof *ids * len);
    const char fill[] = {' ', 'a', '\n', '\xe4'};
    for (int f = 0; f < 4; f++) {
        memset(s, fill[f], len);
        int n = ds4_tokenizer_encode(tk, s, len, false, ids, (int)len, &err);
        CHECK_MSG(n > 0, "encode of 1 MiB of 0x%02x: %s", (unsigned char)fill[f], err.msg);
        size_t dl;
        char *d = decode_all(tk, ids, n, &dl);
        int same = dl == len && memcmp(d, s, len) == 0;
        free(d);
        CHECK(same);
    }
    free(s);
    free(ids);
    ds4_tokenizer_free(tk);
}

typedef struct thr_arg {
    const ds4_tokenizer *t;
    const char *text;
    size_t len;
    int32_t *ids;
    int n;
} thr_arg;

static void *thr_encode(void *p) {
    thr_arg *a = p;
    for (int r = 0; r < 3; r++) a->n = ds4_tokenizer_encode(a->t, a->text, a->len, true, a->ids, 1 << 16, NULL);
    return NULL;
}

DS4_TEST(tokenizer_v3_threads_agree) {
    ds4_err err = {0};
    ds4_tokenizer *tk = load_v3(&err);
    CHECK_MSG(tk, "load: %s", err.msg);
    const char *text = "Quel ramo del lago di Como, che volge a mezzogiorno, \xc2\xab" "Addio\xc2\xbb\n"
                       "    for (int i = 0; i < 10; i++) {}\n\xe4\xbd\xa0\xe5\xa5\xbd 12345 " USR "x";
    thr_arg a[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        a[i] = (thr_arg){tk, text, strlen(text), malloc(sizeof(int32_t) << 16), 0};
        pthread_create(&th[i], NULL, thr_encode, &a[i]);
    }
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    int ok = a[0].n > 0;
    for (int i = 1; i < 4; i++)
        ok = ok && a[i].n == a[0].n && !memcmp(a[i].ids, a[0].ids, sizeof(int32_t) * (size_t)a[0].n);
    for (int i = 0; i < 4; i++) free(a[i].ids);
    ds4_tokenizer_free(tk);
    CHECK(ok);
}

/* ------------------------------------------------------------ detokenizer */

static int valid_utf8(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = (unsigned char)s[i];
        int k = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
              : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
        if (!k || i + (size_t)k > n) return 0;
        for (int j = 1; j < k; j++)
            if (((unsigned char)s[i + j] & 0xc0) != 0x80) return 0;
        i += (size_t)k;
    }
    return 1;
}

DS4_TEST(tokenizer_detok_streams_whole_characters) {
    ds4_err err = {0};
    ds4_tokenizer *tk = load_v3(&err);
    CHECK_MSG(tk, "load: %s", err.msg);
    /* emoji, ZWJ sequence, CJK, accents: several tokens split characters */
    const char *text = "caf\xc3\xa9 \xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x91\xa7 "
                       "\xe8\xa1\x8c\xe6\x94\xbf\xe9\x99\xa2 \xf0\x9f\xa6\x84\xf0\x9f\xa6\x84 done";
    int32_t ids[256];
    int n = ds4_tokenizer_encode(tk, text, strlen(text), false, ids, 256, &err);
    CHECK(n > 0 && n <= 256);
    ds4_detok d;
    CHECK(ds4_detok_init(&d, tk, &err) == 0);
    char out[1024];
    size_t m = 0;
    for (int i = 0; i < n; i++) {
        size_t l;
        const char *p = ds4_detok_push(&d, ids[i], &l);
        CHECK(valid_utf8(p, l));
        memcpy(out + m, p, l);
        m += l;
    }
    size_t l;
    ds4_detok_flush(&d, &l);
    CHECK_EQ_INT(l, 0);
    CHECK(m == strlen(text) && memcmp(out, text, m) == 0);

    /* invalid bytes: a lone continuation, a cut-short sequence followed by
     * ASCII, and a trailing incomplete sequence flushed at the end */
    const char *bad = "x\x80y\xe4\xb8z\xf0\x9f";
    n = ds4_tokenizer_encode(tk, bad, strlen(bad), false, ids, 256, &err);
    ds4_detok_reset(&d);
    m = 0;
    for (int i = 0; i < n; i++) {
        const char *p = ds4_detok_push(&d, ids[i], &l);
        memcpy(out + m, p, l);
        m += l;
    }
    const char *p = ds4_detok_flush(&d, &l);
    memcpy(out + m, p, l);
    m += l;
    const char *want = "x\xef\xbf\xbdy\xef\xbf\xbdz\xef\xbf\xbd";
    CHECK(m == strlen(want) && memcmp(out, want, m) == 0);
    /* ids out of range decode to nothing */
    ds4_detok_push(&d, -5, &l);
    CHECK_EQ_INT(l, 0);
    ds4_detok_free(&d);
    ds4_tokenizer_free(tk);
}

/* ------------------------------------------------------------ tiny vocab */

/* A vocabulary of the 256 byte symbols plus merge results. */
typedef struct tiny {
    char *tok[600];
    int n_tok;
    char *merge[300];
    int n_merge;
} tiny;

static void tiny_byte_symbols(tiny *v) {
    for (int b = 0; b < 256; b++) {
        int ok = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
        int k = 0;
        for (int x = 0; x < b; x++)
            if (!((x >= 0x21 && x <= 0x7e) || (x >= 0xa1 && x <= 0xac) || (x >= 0xae))) k++;
        unsigned cp = ok ? (unsigned)b : 0x100u + (unsigned)k;
        char s[4] = {0};
        if (cp < 0x80) s[0] = (char)cp;
        else { s[0] = (char)(0xc0 | (cp >> 6)); s[1] = (char)(0x80 | (cp & 0x3f)); }
        v->tok[v->n_tok++] = strdup(s);
    }
}

static void tiny_add_merge(tiny *v, const char *a, const char *b) {
    char m[64], r[64];
    snprintf(m, sizeof m, "%s %s", a, b);
    snprintf(r, sizeof r, "%s%s", a, b);
    v->merge[v->n_merge++] = strdup(m);
    for (int i = 0; i < v->n_tok; i++)
        if (!strcmp(v->tok[i], r)) return;
    v->tok[v->n_tok++] = strdup(r);
}

static void tiny_free(tiny *v) {
    for (int i = 0; i < v->n_tok; i++) free(v->tok[i]);
    for (int i = 0; i < v->n_merge; i++) free(v->merge[i]);
}

/* Naive reference BPE on ASCII letters (byte symbols are the letters):
 * strings, lowest rank, leftmost. Returns the number of symbols. */
static int naive_bpe(const tiny *v, const char *w, char sym[][64]) {
    int n = 0;
    for (; w[n]; n++) { sym[n][0] = w[n]; sym[n][1] = 0; }
    for (;;) {
        int best = -1, br = 1 << 30;
        for (int i = 0; i + 1 < n; i++) {
            char key[160];
            snprintf(key, sizeof key, "%.63s %.63s", sym[i], sym[i + 1]);
            for (int r = 0; r < v->n_merge && r < br; r++)
                if (!strcmp(v->merge[r], key)) { br = r; best = i; }
        }
        if (best < 0) return n;
        size_t la = strlen(sym[best]), lb = strlen(sym[best + 1]);
        if (la + lb >= sizeof sym[0]) return -1;
        memcpy(sym[best] + la, sym[best + 1], lb + 1);
        memmove(sym[best + 1], sym[best + 2], sizeof sym[0] * (size_t)(n - best - 2));
        n--;
    }
}

static int tiny_id(const tiny *v, const char *s) {
    for (int i = 0; i < v->n_tok; i++)
        if (!strcmp(v->tok[i], s)) return i;
    return -1;
}

DS4_TEST(tokenizer_bpe_matches_naive_reference) {
    tiny v = {0};
    tiny_byte_symbols(&v);
    /* overlapping merges with ties: "aa" twice in a row, chains */
    tiny_add_merge(&v, "a", "b");
    tiny_add_merge(&v, "a", "a");
    tiny_add_merge(&v, "b", "a");
    tiny_add_merge(&v, "ab", "a");
    tiny_add_merge(&v, "aa", "aa");
    tiny_add_merge(&v, "ab", "ab");
    tiny_add_merge(&v, "b", "b");
    tiny_add_merge(&v, "aba", "bb");
    tiny_add_merge(&v, "aaaa", "a");
    tiny_add_merge(&v, "ba", "ab");
    ds4_tokenizer *tk = NULL;
    ds4_err err = {0};
    CHECK_MSG(ds4_tokenizer_from_arrays(&tk, (const char *const *)v.tok, NULL, v.n_tok,
                                        (const char *const *)v.merge, NULL, v.n_merge, &err) == 0,
              "%s", err.msg);
    /* the markers are absent: rendered mode = plain mode */
    CHECK_EQ_INT(ds4_tokenizer_special(tk, DS4_TOK_BOS), -1);
    uint64_t rng = 7;
    char w[200];
    static char sym[200][64];
    int32_t ids[200];
    for (int it = 0; it < 2000; it++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        /* lengths on both sides of the short/long BPE threshold (48) */
        int len = 1 + (int)((rng >> 33) % 120);
        for (int i = 0; i < len; i++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            w[i] = (rng >> 61) & 1 ? 'a' : 'b';
        }
        w[len] = 0;
        int n_ref = naive_bpe(&v, w, sym);
        int n = ds4_tokenizer_encode(tk, w, (size_t)len, it & 1, ids, 200, &err);
        CHECK_MSG(n == n_ref, "\"%s\": %d ids, naive %d", w, n, n_ref);
        for (int i = 0; i < n; i++)
            CHECK_MSG(ids[i] == tiny_id(&v, sym[i]), "\"%s\": symbol %d differs", w, i);
    }
    ds4_tokenizer_free(tk);
    tiny_free(&v);
}

DS4_TEST(tokenizer_from_arrays_rejects_bad_input) {
    tiny v = {0};
    tiny_byte_symbols(&v);
    ds4_tokenizer *tk = (ds4_tokenizer *)&v; /* must be reset to NULL on failure */
    ds4_err err = {0};
    const char *bad_merge[] = {"ab"};
    CHECK(ds4_tokenizer_from_arrays(&tk, (const char *const *)v.tok, NULL, v.n_tok, bad_merge,
                                    NULL, 1, &err) == DS4_E_ARG);
    CHECK(tk == NULL);
    const char *bad_merge2[] = {"a b c"};
    CHECK(ds4_tokenizer_from_arrays(&tk, (const char *const *)v.tok, NULL, v.n_tok, bad_merge2,
                                    NULL, 1, &err) == DS4_E_ARG);
    /* a vocabulary without the symbol of byte 0x41 */
    CHECK(ds4_tokenizer_from_arrays(&tk, (const char *const *)v.tok + 0x42, NULL, v.n_tok - 0x42,
                                    NULL, NULL, 0, &err) == DS4_E_MODEL);
    CHECK(strstr(err.msg, "byte 0x") != NULL);
    CHECK(ds4_tokenizer_from_arrays(&tk, NULL, NULL, 0, NULL, NULL, 0, &err) == DS4_E_ARG);
    /* merges naming unknown tokens are skipped, not fatal */
    const char *odd[] = {"zz qq", "a b"};
    CHECK(ds4_tokenizer_from_arrays(&tk, (const char *const *)v.tok, NULL, v.n_tok, odd, NULL, 2,
                                    &err) == 0);
    int32_t id;
    CHECK_EQ_INT(ds4_tokenizer_encode(tk, "ab", 2, false, &id, 1, &err), 2);
    ds4_tokenizer_free(tk);
    tiny_free(&v);
}

/* ------------------------------------------------------------ GGUF */

static ds4_gguf *tok_gguf(const tiny *v, int n_tok, int with_merges, void **mem) {
    ds4_gguf_writer *w = ds4_gguf_writer_new();
    ds4_gguf_writer_add_str(w, "general.architecture", "deepseek4", 9);
    if (n_tok > 0) {
        ds4_gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2", 4);
        ds4_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v->tok, NULL,
                                    (uint64_t)n_tok);
    }
    if (with_merges)
        ds4_gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v->merge,
                                    NULL, (uint64_t)v->n_merge);
    size_t n;
    ds4_err err = {0};
    ds4_gguf *g = NULL;
    if (ds4_gguf_writer_write_mem(w, mem, &n, &err) == 0) ds4_gguf_open_memory(&g, *mem, n, &err);
    ds4_gguf_writer_free(w);
    return g;
}

DS4_TEST(tokenizer_from_gguf) {
    tiny v = {0};
    tiny_byte_symbols(&v);
    tiny_add_merge(&v, "a", "b");
    static const char *markers[] = {
        BOS, "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", USR, AST,
        "<think>", "</think>", DSML};
    for (int k = 0; k < 7; k++) v.tok[v.n_tok++] = strdup(markers[k]);
    void *mem = NULL;
    ds4_err err = {0};
    ds4_tokenizer *tk = NULL;

    /* complete: the markers resolve by string */
    ds4_gguf *g = tok_gguf(&v, v.n_tok, 1, &mem);
    CHECK(g);
    CHECK_MSG(ds4_tokenizer_from_gguf(g, &tk, &err) == 0, "%s", err.msg);
    CHECK(tk != NULL);
    CHECK_EQ_INT(ds4_tokenizer_special(tk, DS4_TOK_THINK_OPEN), v.n_tok - 3);
    int32_t ids[8];
    CHECK_EQ_INT(ds4_tokenizer_encode(tk, "ab<think>", 9, true, ids, 8, &err), 2);
    CHECK_EQ_INT(ids[0], tiny_id(&v, "ab"));
    CHECK_EQ_INT(ids[1], v.n_tok - 3);
    ds4_tokenizer_free(tk);
    ds4_gguf_close(g);
    free(mem);

    /* a marker missing (the last one, DSML): DS4_E_MODEL naming it */
    g = tok_gguf(&v, v.n_tok - 1, 1, &mem);
    CHECK(ds4_tokenizer_from_gguf(g, &tk, &err) == DS4_E_MODEL);
    CHECK(tk == NULL && strstr(err.msg, "missing") && strstr(err.msg, "DSML"));
    ds4_gguf_close(g);
    free(mem);

    /* no merges key: a model error */
    g = tok_gguf(&v, v.n_tok, 0, &mem);
    CHECK(ds4_tokenizer_from_gguf(g, &tk, &err) == DS4_E_MODEL);
    ds4_gguf_close(g);
    free(mem);

    /* no tokenizer at all: fine, *out = NULL */
    g = tok_gguf(&v, 0, 0, &mem);
    tk = (ds4_tokenizer *)&v;
    CHECK(ds4_tokenizer_from_gguf(g, &tk, &err) == 0 && tk == NULL);
    ds4_gguf_close(g);
    free(mem);
    tiny_free(&v);
}

DS4_TEST(tokenizer_json_loader_errors) {
    ds4_tokjson tj;
    ds4_err err = {0};
    CHECK(ds4_tokjson_load(&tj, "/nonexistent/tokenizer.json", 0, &err) == DS4_E_IO);
    char path[512];
    snprintf(path, sizeof path, "%s/tk.json", ds4_test_tmpdir());
    const char *bad[] = {
        "{",                                                     /* syntax */
        "{\"model\":{\"type\":\"Unigram\",\"vocab\":{},\"merges\":[]}}", /* not BPE */
        "{\"model\":{\"vocab\":{\"a\":-1},\"merges\":[]}}",       /* bad id */
        "{\"model\":{\"vocab\":{\"a\":0},\"merges\":[3]}}",       /* bad merge */
        "{\"model\":{\"vocab\":{\"a\":0},\"merges\":[]},\"added_tokens\":[{\"id\":0,\"content\":\"b\"}]}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        FILE *f = fopen(path, "w");
        fputs(bad[i], f);
        fclose(f);
        CHECK_MSG(ds4_tokjson_load(&tj, path, 0, &err) == DS4_E_FORMAT, "case %zu: %s", i, err.msg);
    }
}

/* Texts of 4 KiB and more use a per-call piece cache: the ids must equal
 * those of short texts (no cache). Segments of the novel joined by BOS are
 * tokenized independently in rendered mode, so whole == concatenation. */
DS4_TEST(tokenizer_v3_piece_cache_exact) {
    ds4_err err = {0};
    ds4_tokenizer *tk = load_v3(&err);
    CHECK_MSG(tk, "load: %s", err.msg);
    FILE *f = fopen(ds4_test_path("promessi_sposi.txt"), "rb");
    CHECK(f);
    static char novel[200000];
    size_t n_novel = fread(novel, 1, sizeof novel, f);
    fclose(f);
    CHECK(n_novel == sizeof novel);
    size_t bl = strlen(BOS);
    char *joined = malloc(sizeof novel * 2);
    int32_t *whole = malloc(sizeof(int32_t) * sizeof novel), *parts = malloc(sizeof(int32_t) * sizeof novel);
    size_t jl = 0, pos = 0;
    int np = 0;
    uint64_t rng = 99;
    while (pos < n_novel) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        size_t seg = 1 + (rng >> 33) % 3000; /* < 4096: no cache */
        if (seg > n_novel - pos) seg = n_novel - pos;
        /* cut at a character boundary */
        while (pos + seg < n_novel && ((unsigned char)novel[pos + seg] & 0xc0) == 0x80) seg++;
        memcpy(joined + jl, novel + pos, seg);
        jl += seg;
        memcpy(joined + jl, BOS, bl);
        jl += bl;
        int k = ds4_tokenizer_encode(tk, novel + pos, seg, false, parts + np, (int)(sizeof novel) - np, &err);
        CHECK(k >= 0);
        np += k;
        parts[np++] = 0; /* BOS */
        pos += seg;
    }
    int nw = ds4_tokenizer_encode(tk, joined, jl, true, whole, (int)sizeof novel, &err);
    int same = nw == np && memcmp(whole, parts, sizeof(int32_t) * (size_t)np) == 0;
    free(joined);
    free(whole);
    free(parts);
    ds4_tokenizer_free(tk);
    CHECK_MSG(same, "whole %d ids, parts %d ids", nw, np);
}
