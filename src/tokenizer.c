/* tokenizer.c - byte-level BPE (docs/TEXT.md A.3, A.6, A.7), rendered-mode
 * marker scan (A.2), decoding and the streaming detokenizer.
 *
 * Owns the vocabulary (stored strings and decoded bytes, one arena each), a
 * string -> id hash, the merge table keyed by the ids of the two parts, and
 * the pre-tokenizer (pretok.c). Invariants after construction:
 *   - byte_id[b] is the id of the one-symbol string of byte b (all 256 exist);
 *   - merges map (left id, right id) -> (rank, merged id); the merged id is
 *     the vocabulary entry of left+right, so BPE never builds strings;
 *   - nothing changes after ds4_tokenizer_from_arrays returns, so every
 *     const function is thread-safe. Scratch memory is per call.
 */
#include "tokenizer.h"
#include "util/utf8.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "pretok.h"

/* The seven markers of docs/TEXT.md A.1, in ds4_special_token order. */
static const char *const k_marker[DS4_TOK__COUNT] = {
    "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "<\xef\xbd\x9cUser\xef\xbd\x9c>",
    "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>",
    "<think>",
    "</think>",
    "\xef\xbd\x9c" "DSML\xef\xbd\x9c",
};

typedef struct merge_slot {
    uint64_t key;   /* (left id << 32) | right id; UINT64_MAX = empty */
    int32_t rank;
    int32_t id;
} merge_slot;

struct ds4_tokenizer {
    int n_vocab;
    char *text;            /* stored strings, each NUL-terminated */
    uint32_t *text_off;    /* (n_vocab + 1) offsets into text */
    char *bytes;           /* decoded bytes of every token */
    uint32_t *bytes_off;   /* (n_vocab + 1) offsets into bytes */
    size_t max_bytes;      /* longest decoded token */
    int32_t *str_slot;     /* string hash: ids, -1 = empty; (str_mask + 1) */
    uint32_t str_mask;
    merge_slot *merge;     /* (merge_mask + 1) */
    uint32_t merge_mask;
    int32_t byte_id[256];
    int32_t special[DS4_TOK__COUNT];
    size_t marker_len[DS4_TOK__COUNT];
    ds4_pretok *pretok;
    uint8_t *unused;       /* (n_vocab) 1 = token type UNUSED (the [PADn] gap), or NULL */
};

/* ------------------------------------------------------------ byte map */

/* GPT-2 byte -> code point (A.3). */
static uint32_t byte_to_cp(int b) {
    if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff))
        return (uint32_t)b;
    /* the 68 others, in byte order, get U+0100.. */
    int k = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= 0x21 && x <= 0x7e) || (x >= 0xa1 && x <= 0xac) || (x >= 0xae && x <= 0xff)))
            k++;
    return 0x100u + (uint32_t)k;
}

/* Inverse map: code point (< 0x144) -> byte, or -1. */
#define N_INV 0x144
static void build_inverse(int16_t inv[N_INV]) {
    for (int i = 0; i < N_INV; i++) inv[i] = -1;
    for (int b = 0; b < 256; b++) inv[byte_to_cp(b)] = (int16_t)b;
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Lenient UTF-8 read for decoding token strings: a sequence cut short or
 * with a bad continuation is read as one byte (value = that byte). */
static size_t get_utf8(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (k == 1 || k > n) { *cp = c; return 1; }
    uint32_t v = c & (0x7f >> k);
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) { *cp = c; return 1; }
        v = (v << 6) | (s[i] & 0x3f);
    }
    *cp = v;
    return k;
}

/* Decoded bytes of a stored token string (A.7) into o (>= n bytes). */
static size_t decode_token(const char *s, size_t n, char *o, const int16_t inv[N_INV]) {
    if (n >= 3 && memmem(s, n, "\xef\xbd\x9c", 3)) {
        memcpy(o, s, n);
        return n;
    }
    size_t m = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += get_utf8((const unsigned char *)s + i, n - i, &cp);
        int b = cp < N_INV ? inv[cp] : -1;
        if (b >= 0) o[m++] = (char)b;
    }
    return m;
}

/* ------------------------------------------------------------ hashing */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    uint64_t w = 0;
    memcpy(&w, s + i, n - i);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static uint32_t pow2_at_least(uint64_t n) {
    uint64_t c = 16;
    while (c < n) c <<= 1;
    return (uint32_t)c;
}

static const char *tok_str(const ds4_tokenizer *t, int32_t id, size_t *len) {
    *len = t->text_off[id + 1] - t->text_off[id] - 1;
    return t->text + t->text_off[id];
}

/* Id of the vocabulary string s[0..n), or -1. */
static int32_t str_find(const ds4_tokenizer *t, const char *s, size_t n) {
    for (uint32_t i = (uint32_t)hash_bytes(s, n) & t->str_mask;; i = (i + 1) & t->str_mask) {
        int32_t id = t->str_slot[i];
        if (id < 0) return -1;
        size_t l;
        const char *v = tok_str(t, id, &l);
        if (l == n && memcmp(v, s, n) == 0) return id;
    }
}

static inline const merge_slot *merge_find(const ds4_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (uint32_t i = (uint32_t)hash_u64(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        const merge_slot *m = &t->merge[i];
        if (m->key == key) return m;
        if (m->key == UINT64_MAX) return NULL;
    }
}

/* ------------------------------------------------------------ construction */

void ds4_tokenizer_free(ds4_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->text_off);
    free(t->bytes);
    free(t->bytes_off);
    free(t->str_slot);
    free(t->merge);
    ds4_pretok_free(t->pretok);
    free(t->unused);
    free(t);
}

static int load_vocab(ds4_tokenizer *t, const char *const *tokens, const size_t *lens, int n,
                      ds4_err *err) {
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        if (!tokens[i]) return ds4_err_set(err, DS4_E_ARG, "tokenizer: token %d is NULL", i);
        total += (lens ? lens[i] : strlen(tokens[i])) + 1;
    }
    if (total > UINT32_MAX / 2)
        return ds4_err_set(err, DS4_E_MODEL, "tokenizer: vocabulary strings too large");
    t->text = malloc(total ? total : 1);
    t->bytes = malloc(total ? total : 1);
    t->text_off = malloc(sizeof(uint32_t) * ((size_t)n + 1));
    t->bytes_off = malloc(sizeof(uint32_t) * ((size_t)n + 1));
    uint32_t cap = pow2_at_least((uint64_t)n * 2);
    t->str_slot = malloc(sizeof(int32_t) * cap);
    if (!t->text || !t->bytes || !t->text_off || !t->bytes_off || !t->str_slot)
        return ds4_err_set(err, DS4_E_NOMEM, "tokenizer: out of memory (%d tokens)", n);
    t->str_mask = cap - 1;
    memset(t->str_slot, 0xff, sizeof(int32_t) * cap);
    int16_t inv[N_INV];
    build_inverse(inv);
    uint32_t to = 0, bo = 0;
    for (int i = 0; i < n; i++) {
        size_t l = lens ? lens[i] : strlen(tokens[i]);
        t->text_off[i] = to;
        memcpy(t->text + to, tokens[i], l);
        t->text[to + l] = '\0';
        to += (uint32_t)l + 1;
        t->bytes_off[i] = bo;
        size_t m = decode_token(tokens[i], l, t->bytes + bo, inv);
        bo += (uint32_t)m;
        if (m > t->max_bytes) t->max_bytes = m;
    }
    t->text_off[n] = to;
    t->bytes_off[n] = bo;
    t->n_vocab = n;
    /* insert: the lower id wins on duplicates */
    for (int i = 0; i < n; i++) {
        size_t l;
        const char *s = tok_str(t, i, &l);
        uint32_t h = (uint32_t)hash_bytes(s, l) & t->str_mask;
        for (;; h = (h + 1) & t->str_mask) {
            int32_t id = t->str_slot[h];
            if (id < 0) { t->str_slot[h] = i; break; }
            size_t l2;
            const char *s2 = tok_str(t, id, &l2);
            if (l2 == l && memcmp(s, s2, l) == 0) break;
        }
    }
    return 0;
}

static int load_merges(ds4_tokenizer *t, const char *const *merges, const size_t *lens, int n,
                       ds4_err *err) {
    uint32_t cap = pow2_at_least((uint64_t)n * 2);
    t->merge = malloc(sizeof(merge_slot) * cap);
    if (!t->merge) return ds4_err_set(err, DS4_E_NOMEM, "tokenizer: out of memory (merges)");
    t->merge_mask = cap - 1;
    for (uint32_t i = 0; i < cap; i++) t->merge[i].key = UINT64_MAX;
    char small[512];
    for (int r = 0; r < n; r++) {
        if (!merges[r]) return ds4_err_set(err, DS4_E_ARG, "tokenizer: merge %d is NULL", r);
        const char *s = merges[r];
        size_t l = lens ? lens[r] : strlen(s);
        const char *sp = memchr(s, ' ', l);
        if (!sp || sp == s || sp == s + l - 1 || memchr(sp + 1, ' ', (size_t)(s + l - sp - 1)))
            return ds4_err_set(err, DS4_E_ARG,
                               "tokenizer: merge %d is not \"left right\" (one space)", r);
        size_t la = (size_t)(sp - s), lb = l - la - 1;
        int32_t a = str_find(t, s, la), b = str_find(t, sp + 1, lb);
        if (a < 0 || b < 0) continue;
        /* merged string = left + right, without the space */
        char *cat = la + lb <= sizeof small ? small : malloc(la + lb);
        if (!cat) return ds4_err_set(err, DS4_E_NOMEM, "tokenizer: out of memory");
        memcpy(cat, s, la);
        memcpy(cat + la, sp + 1, lb);
        int32_t id = str_find(t, cat, la + lb);
        if (cat != small) free(cat);
        if (id < 0) continue;
        uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        uint32_t h = (uint32_t)hash_u64(key) & t->merge_mask;
        while (t->merge[h].key != UINT64_MAX && t->merge[h].key != key) h = (h + 1) & t->merge_mask;
        if (t->merge[h].key == key) continue; /* a repeated merge keeps its first rank */
        t->merge[h] = (merge_slot){key, r, id};
    }
    return 0;
}

int ds4_tokenizer_from_arrays(ds4_tokenizer **out, const char *const *tokens,
                              const size_t *token_lens, int n_tokens,
                              const char *const *merges, const size_t *merge_lens,
                              int n_merges, ds4_err *err) {
    if (!out) return ds4_err_set(err, DS4_E_ARG, "tokenizer: out is NULL");
    *out = NULL;
    if (n_tokens <= 0 || !tokens || n_merges < 0 || (n_merges > 0 && !merges))
        return ds4_err_set(err, DS4_E_ARG, "tokenizer: empty vocabulary or bad arrays");
    ds4_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return ds4_err_set(err, DS4_E_NOMEM, "tokenizer: out of memory");
    int rc = load_vocab(t, tokens, token_lens, n_tokens, err);
    if (!rc) rc = load_merges(t, merges, merge_lens, n_merges, err);
    for (int b = 0; !rc && b < 256; b++) {
        char s[4];
        size_t l = put_utf8(s, byte_to_cp(b));
        t->byte_id[b] = str_find(t, s, l);
        if (t->byte_id[b] < 0)
            rc = ds4_err_set(err, DS4_E_MODEL,
                             "tokenizer: the vocabulary lacks the symbol of byte 0x%02x", b);
    }
    for (int k = 0; !rc && k < DS4_TOK__COUNT; k++) {
        t->marker_len[k] = strlen(k_marker[k]);
        t->special[k] = str_find(t, k_marker[k], t->marker_len[k]);
    }
    if (!rc) rc = ds4_pretok_new(&t->pretok, err);
    if (rc) {
        ds4_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

/* ------------------------------------------------------------ GGUF */

/* Fills strs/lens (n entries, pointing into the mapping) from string array kv. */
static int gguf_strings(const ds4_gguf *g, int64_t kv, uint64_t n, const char **strs,
                        size_t *lens, const char *key, ds4_err *err) {
    for (uint64_t i = 0; i < n; i++) {
        ds4_gguf_str s;
        if (ds4_gguf_arr_str(g, kv, i, &s) != 0)
            return ds4_err_set(err, DS4_E_MODEL, "%s[%llu] is not a string", key,
                               (unsigned long long)i);
        strs[i] = s.ptr;
        lens[i] = (size_t)s.len;
    }
    return 0;
}

int ds4_tokenizer_from_gguf(const ds4_gguf *g, ds4_tokenizer **out, ds4_err *err) {
    *out = NULL;
    if (ds4_gguf_find_key(g, "tokenizer.ggml.tokens") < 0) return 0;
    int64_t kv = ds4_gguf_find_key(g, "tokenizer.ggml.model");
    if (kv >= 0) {
        ds4_gguf_str m;
        int rc = ds4_gguf_get_str(g, "tokenizer.ggml.model", &m, err);
        if (rc) return rc;
        if (m.len != 4 || memcmp(m.ptr, "gpt2", 4) != 0) {
            char esc[300];
            return ds4_err_set(err, DS4_E_MODEL,
                               "tokenizer.ggml.model is \"%s\", only \"gpt2\" (byte-level BPE) "
                               "is supported", ds4_escaped(esc, sizeof esc, m.ptr, m.len, 64));
        }
    }
    int64_t kv_tok, kv_merge;
    uint64_t n_tok, n_merge;
    int rc = ds4_gguf_get_arr(g, "tokenizer.ggml.tokens", DS4_GGUF_STR, &kv_tok, &n_tok, err);
    if (rc) return rc;
    rc = ds4_gguf_get_arr(g, "tokenizer.ggml.merges", DS4_GGUF_STR, &kv_merge, &n_merge, err);
    if (rc) return rc;
    if (n_tok == 0 || n_tok > INT32_MAX || n_merge > INT32_MAX)
        return ds4_err_set(err, DS4_E_MODEL, "tokenizer.ggml.tokens has %llu entries",
                           (unsigned long long)n_tok);
    const char **strs = malloc(sizeof(char *) * (n_tok + n_merge));
    size_t *lens = malloc(sizeof(size_t) * (n_tok + n_merge));
    if (!strs || !lens) {
        free(strs);
        free(lens);
        return ds4_err_set(err, DS4_E_NOMEM, "tokenizer: out of memory");
    }
    rc = gguf_strings(g, kv_tok, n_tok, strs, lens, "tokenizer.ggml.tokens", err);
    if (!rc)
        rc = gguf_strings(g, kv_merge, n_merge, strs + n_tok, lens + n_tok,
                          "tokenizer.ggml.merges", err);
    ds4_tokenizer *t = NULL;
    if (!rc)
        rc = ds4_tokenizer_from_arrays(&t, strs, lens, (int)n_tok, strs + n_tok, lens + n_tok,
                                       (int)n_merge, err);
    free(strs);
    free(lens);
    if (rc) {
        if (err && err->code == DS4_E_ARG) err->code = rc = DS4_E_MODEL;
        return rc;
    }
    for (int k = 0; k < DS4_TOK__COUNT; k++) {
        if (t->special[k] < 0) {
            ds4_tokenizer_free(t);
            return ds4_err_set(err, DS4_E_MODEL,
                               "required tokenizer token is missing: \"%s\"", k_marker[k]);
        }
    }
    /* token types (optional): UNUSED (5) marks the vocabulary's padding gap
     * ([PAD129026] ...), never text */
    int64_t kv_type = ds4_gguf_find_key(g, "tokenizer.ggml.token_type");
    if (kv_type >= 0 && ds4_gguf_arr_type(g, kv_type) == DS4_GGUF_I32 && ds4_gguf_arr_n(g, kv_type) == n_tok) {
        const unsigned char *tt = ds4_gguf_arr_data(g, kv_type); /* possibly unaligned */
        t->unused = calloc((size_t)n_tok, 1);
        if (!t->unused) {
            ds4_tokenizer_free(t);
            return ds4_err_set(err, DS4_E_NOMEM, "tokenizer: out of memory");
        }
        for (uint64_t i = 0; i < n_tok; i++) {
            int32_t v;
            memcpy(&v, tt + 4 * i, sizeof v);
            t->unused[i] = v == 5;
        }
    }
    *out = t;
    return 0;
}

/* ------------------------------------------------------------ queries */

int ds4_tokenizer_n_vocab(const ds4_tokenizer *t) { return t->n_vocab; }

int32_t ds4_tokenizer_special(const ds4_tokenizer *t, int which) {
    if (!t || which < 0 || which >= DS4_TOK__COUNT) return -1;
    return t->special[which];
}

const char *ds4_tokenizer_token_bytes(const ds4_tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->n_vocab) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = t->bytes_off[id + 1] - t->bytes_off[id];
    return t->bytes + t->bytes_off[id];
}

const char *ds4_tokenizer_token_text(const ds4_tokenizer *t, int32_t id) {
    if (id < 0 || id >= t->n_vocab) return NULL;
    return t->text + t->text_off[id];
}

size_t ds4_tokenizer_token_text_len(const ds4_tokenizer *t, int32_t id) {
    if (id < 0 || id >= t->n_vocab) return 0;
    return t->text_off[id + 1] - t->text_off[id] - 1;
}

size_t ds4_tokenizer_max_token_bytes(const ds4_tokenizer *t) { return t->max_bytes; }

bool ds4_tokenizer_is_control(const ds4_tokenizer *t, int32_t id) {
    if (id < 0 || id >= t->n_vocab) return false;
    if (t->unused && t->unused[id]) return true;
    for (int k = 0; k < DS4_TOK__COUNT; k++)
        if (t->special[k] == id) return true;
    const char *s = t->text + t->text_off[id];
    size_t n = t->text_off[id + 1] - t->text_off[id] - 1;
    /* a byte-level BPE string never holds EF BD 9C (bytes >= 0x80 are
     * stored as U+00A1..U+0143): only literal added tokens do (A.7) */
    if (memmem(s, n, "\xef\xbd\x9c", 3)) return true;
    return n >= 4 && s[0] == '<' && s[1] == '|' && s[n - 2] == '|' && s[n - 1] == '>';
}

/* ------------------------------------------------------------ BPE */

typedef struct heap_ent {
    int32_t rank;
    int32_t pos;      /* index of the left symbol (its first byte) */
    int32_t left_id;  /* ids at push time, to detect stale entries */
    int32_t right_id;
} heap_ent;

/* Per-call cache of short pieces -> ids, direct-mapped (a colliding piece
 * replaces the entry). BPE is deterministic, so a hit gives exactly what
 * BPE would; it only saves the merge-table lookups of repeated words. */
#define PCACHE_MAX 24 /* longest cached piece, bytes (so at most 24 ids) */
typedef struct pcache_ent {
    uint8_t len;      /* piece bytes; 0 = empty */
    uint8_t n_ids;
    char bytes[PCACHE_MAX];
    int32_t ids[PCACHE_MAX];
} pcache_ent;

/* Per-call encoder state (never shared). */
typedef struct enc_ctx {
    const ds4_tokenizer *t;
    int32_t *out;
    int cap;
    int64_t n;
    /* BPE scratch, (scratch_cap) symbols each; heap (3 * scratch_cap) */
    int32_t *sym;
    int32_t *aux;   /* short path: pair ranks; long path: next index */
    int32_t *prv;
    heap_ent *heap;
    size_t scratch_cap;
    pcache_ent *cache; /* (cache_mask + 1), NULL for short texts */
    uint32_t cache_mask;
    ds4_err *err;
} enc_ctx;

static inline void emit(enc_ctx *c, int32_t id) {
    if (c->n < c->cap) c->out[c->n] = id;
    c->n++;
}

static int grow_scratch(enc_ctx *c, size_t n) {
    if (n <= c->scratch_cap) return 0;
    size_t cap = c->scratch_cap ? c->scratch_cap : 256;
    while (cap < n) cap *= 2;
    int32_t *a = realloc(c->sym, cap * sizeof *a);
    if (a) c->sym = a;
    int32_t *b = realloc(c->aux, cap * sizeof *b);
    if (b) c->aux = b;
    int32_t *p = realloc(c->prv, cap * sizeof *p);
    if (p) c->prv = p;
    heap_ent *h = realloc(c->heap, 3 * cap * sizeof *h);
    if (h) c->heap = h;
    if (!a || !b || !p || !h) return ds4_err_set(c->err, DS4_E_NOMEM, "tokenizer: out of memory");
    c->scratch_cap = cap;
    return 0;
}

static inline int32_t pair_rank(const ds4_tokenizer *t, int32_t a, int32_t b) {
    const merge_slot *m = merge_find(t, a, b);
    return m ? m->rank : INT32_MAX;
}

/* Short pieces: arrays with cached pair ranks; each step scans for the
 * lowest rank (leftmost on ties), merges, and re-ranks the two new pairs.
 * Leaves the ids in c->sym and returns their count. */
static int bpe_short(enc_ctx *c, const unsigned char *p, int n) {
    const ds4_tokenizer *t = c->t;
    int32_t *sym = c->sym, *rank = c->aux;
    for (int i = 0; i < n; i++) sym[i] = t->byte_id[p[i]];
    for (int i = 0; i + 1 < n; i++) rank[i] = pair_rank(t, sym[i], sym[i + 1]);
    for (;;) {
        int best = -1;
        int32_t br = INT32_MAX;
        for (int i = 0; i + 1 < n; i++)
            if (rank[i] < br) { br = rank[i]; best = i; }
        if (best < 0) break;
        sym[best] = merge_find(t, sym[best], sym[best + 1])->id;
        memmove(sym + best + 1, sym + best + 2, sizeof *sym * (size_t)(n - best - 2));
        memmove(rank + best, rank + best + 1, sizeof *rank * (size_t)(n - best - 2));
        n--;
        if (best > 0) rank[best - 1] = pair_rank(t, sym[best - 1], sym[best]);
        if (best + 1 < n) rank[best] = pair_rank(t, sym[best], sym[best + 1]);
    }
    return n;
}

static inline int heap_less(const heap_ent *a, const heap_ent *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(heap_ent *h, int *n, heap_ent e) {
    int i = (*n)++;
    while (i > 0) {
        int up = (i - 1) / 2;
        if (!heap_less(&e, &h[up])) break;
        h[i] = h[up];
        i = up;
    }
    h[i] = e;
}

static heap_ent heap_pop(heap_ent *h, int *n) {
    heap_ent top = h[0], last = h[--(*n)];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1;
        if (l >= *n) break;
        if (l + 1 < *n && heap_less(&h[l + 1], &h[l])) l++;
        if (!heap_less(&h[l], &last)) break;
        h[i] = h[l];
        i = l;
    }
    h[i] = last;
    return top;
}

static void push_pair(const ds4_tokenizer *t, heap_ent *h, int *nh, const int32_t *sym, int l,
                      int r) {
    const merge_slot *m = merge_find(t, sym[l], sym[r]);
    if (m) heap_push(h, nh, (heap_ent){m->rank, l, sym[l], sym[r]});
}

/* Long pieces: linked list of symbols and a heap of candidate pairs ordered
 * by (rank, position), so the same merge order as bpe_short in O(n log n).
 * An entry is stale when either symbol has changed since it was pushed
 * (symbols only grow, so an id never comes back at the same place). */
static int bpe_long(enc_ctx *c, const unsigned char *p, int n) {
    const ds4_tokenizer *t = c->t;
    int32_t *sym = c->sym, *nxt = c->aux, *prv = c->prv;
    heap_ent *h = c->heap;
    int nh = 0;
    for (int i = 0; i < n; i++) {
        sym[i] = t->byte_id[p[i]];
        nxt[i] = i + 1 < n ? i + 1 : -1;
        prv[i] = i - 1;
    }
    for (int i = 0; i + 1 < n; i++) push_pair(t, h, &nh, sym, i, i + 1);
    while (nh > 0) {
        heap_ent e = heap_pop(h, &nh);
        int l = e.pos, r = nxt[l];
        if (sym[l] != e.left_id || r < 0 || sym[r] != e.right_id) continue;
        sym[l] = merge_find(t, sym[l], sym[r])->id;
        sym[r] = -1;
        nxt[l] = nxt[r];
        if (nxt[r] >= 0) prv[nxt[r]] = l;
        if (prv[l] >= 0) push_pair(t, h, &nh, sym, prv[l], l);
        if (nxt[l] >= 0) push_pair(t, h, &nh, sym, l, nxt[l]);
    }
    /* compact the surviving symbols to sym[0..m) (i only moves forward) */
    int m = 0;
    for (int i = 0; i >= 0; i = nxt[i]) sym[m++] = sym[i];
    return m;
}

#define BPE_SHORT_MAX 48

static int bpe_piece(void *user, const char *s, size_t n) {
    enc_ctx *c = user;
    const unsigned char *p = (const unsigned char *)s;
    pcache_ent *ce = NULL;
    if (n == 1) {
        emit(c, c->t->byte_id[p[0]]);
    } else if (c->cache && n <= PCACHE_MAX &&
               (ce = &c->cache[hash_bytes(s, n) & c->cache_mask])->len == n &&
               memcmp(ce->bytes, s, n) == 0) {
        for (int i = 0; i < ce->n_ids; i++) emit(c, ce->ids[i]);
    } else {

        if (n > INT32_MAX / 4)
            return ds4_err_set(c->err, DS4_E_ARG, "tokenizer: piece of %zu bytes too long", n);
        int rc = grow_scratch(c, n);
        if (rc) return rc;
        int m = n <= BPE_SHORT_MAX ? bpe_short(c, p, (int)n) : bpe_long(c, p, (int)n);
        for (int i = 0; i < m; i++) emit(c, c->sym[i]);
        if (ce) {
            ce->len = (uint8_t)n;
            ce->n_ids = (uint8_t)m;
            memcpy(ce->bytes, s, n);
            memcpy(ce->ids, c->sym, sizeof(int32_t) * (size_t)m);
        }
    }
    if (c->n > INT_MAX)
        return ds4_err_set(c->err, DS4_E_RANGE, "tokenizer: more than INT_MAX tokens");
    return 0;
}

static int encode_plain(enc_ctx *c, const char *s, size_t n) {
    return ds4_pretok_split(c->t->pretok, s, n, bpe_piece, c, c->err);
}

/* Which marker starts at s[0..n), or -1. */
static int marker_at(const ds4_tokenizer *t, const char *s, size_t n) {
    for (int k = 0; k < DS4_TOK__COUNT; k++) {
        size_t l = t->marker_len[k];
        if (t->special[k] >= 0 && l <= n && memcmp(s, k_marker[k], l) == 0) return k;
    }
    return -1;
}

static int encode_rendered(enc_ctx *c, const char *s, size_t n) {
    const ds4_tokenizer *t = c->t;
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        /* every marker starts with '<' or with the lead byte of U+FF5C */
        if (s[i] != '<' && s[i] != '\xef') continue;
        int k = marker_at(t, s + i, n - i);
        if (k < 0) continue;
        int rc = encode_plain(c, s + start, i - start);
        if (rc) return rc;
        emit(c, t->special[k]);
        i += t->marker_len[k] - 1;
        start = i + 1;
    }
    return encode_plain(c, s + start, n - start);
}

int ds4_tokenizer_encode(const ds4_tokenizer *t, const char *text, size_t len, bool rendered,
                         int32_t *out, int cap, ds4_err *err) {
    if (!t || (!text && len) || cap < 0 || (cap > 0 && !out))
        return ds4_err_set(err, DS4_E_ARG, "tokenizer: bad arguments");
    if (len > (size_t)INT32_MAX)
        return ds4_err_set(err, DS4_E_ARG, "tokenizer: text of %zu bytes is over 2 GiB", len);
    enc_ctx c = {.t = t, .out = out, .cap = cap, .err = err};
    /* the cache pays for itself on longer texts (one slot per 32 bytes, 128
     * bytes each, 1K..32K slots; zero pages until touched); results are the
     * same without it */
    if (len >= 4096) {
        uint32_t slots = pow2_at_least(len / 32);
        if (slots > 32768) slots = 32768;
        c.cache = calloc(slots, sizeof(pcache_ent));
        c.cache_mask = slots - 1;
    }
    int rc = rendered ? encode_rendered(&c, text, len) : encode_plain(&c, text, len);
    free(c.sym);
    free(c.aux);
    free(c.prv);
    free(c.heap);
    free(c.cache);
    return rc ? rc : (int)c.n;
}

/* ------------------------------------------------------------ detokenizer */

int ds4_detok_init(ds4_detok *d, const ds4_tokenizer *t, ds4_err *err) {
    memset(d, 0, sizeof *d);
    d->tok = t;
    d->cap = 3 * (t->max_bytes + 4) + 16;
    d->buf = malloc(d->cap);
    if (!d->buf) return ds4_err_set(err, DS4_E_NOMEM, "detokenizer: out of memory");
    return 0;
}

void ds4_detok_free(ds4_detok *d) {
    free(d->buf);
    memset(d, 0, sizeof *d);
}

void ds4_detok_reset(ds4_detok *d) { d->n_pend = 0; }

/* Total length of the UTF-8 sequence led by c, 0 if c cannot lead one. */
static int utf8_len(unsigned c) {
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) return 2;
    if (c >= 0xe0 && c <= 0xef) return 3;
    if (c >= 0xf0 && c <= 0xf4) return 4;
    return 0;
}

/* Whether b may be byte number i (1..3) after lead (Unicode Table 3-7). */
static int utf8_cont_ok(unsigned lead, int i, unsigned b) {
    if (i == 1) {
        if (lead == 0xe0) return b >= 0xa0 && b <= 0xbf;
        if (lead == 0xed) return b >= 0x80 && b <= 0x9f;
        if (lead == 0xf0) return b >= 0x90 && b <= 0xbf;
        if (lead == 0xf4) return b >= 0x80 && b <= 0x8f;
    }
    return b >= 0x80 && b <= 0xbf;
}

static size_t put_fffd(char *o) {
    memcpy(o, "\xef\xbf\xbd", 3);
    return 3;
}

const char *ds4_detok_push(ds4_detok *d, int32_t id, size_t *len) {
    size_t n;
    const char *s = ds4_tokenizer_token_bytes(d->tok, id, &n);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned b = (unsigned char)s[i];
        if (d->n_pend > 0) {
            if (utf8_cont_ok(d->pend[0], d->n_pend, b)) {
                d->pend[d->n_pend++] = (uint8_t)b;
                if (d->n_pend == utf8_len(d->pend[0])) {
                    memcpy(d->buf + m, d->pend, (size_t)d->n_pend);
                    m += (size_t)d->n_pend;
                    d->n_pend = 0;
                }
                continue;
            }
            /* the held-back prefix can never complete: one U+FFFD for it,
             * then b starts afresh */
            m += put_fffd(d->buf + m);
            d->n_pend = 0;
        }
        int k = utf8_len(b);
        if (k == 1)
            d->buf[m++] = (char)b;
        else if (k == 0)
            m += put_fffd(d->buf + m);
        else
            d->pend[d->n_pend++] = (uint8_t)b;
    }
    *len = m;
    return d->buf;
}

const char *ds4_detok_flush(ds4_detok *d, size_t *len) {
    size_t m = 0;
    if (d->n_pend > 0) m = put_fffd(d->buf);
    d->n_pend = 0;
    *len = m;
    return d->buf;
}
