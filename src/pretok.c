/* pretok.c - the official DeepSeek V3/V4 pre-tokenizer with PCRE2.
 *
 * Owns the three compiled Split regexes of the tokenizer.json (TEXT.md A.5)
 * and the "Isolated" splitting loop. Invariants:
 *   - every regex is applied to one piece of the previous step at a time, with
 *     the piece as the whole subject, so look-arounds ((?!\S)) never see past
 *     the piece, exactly as Hugging Face's Split does;
 *   - no regex can match the empty string, so every match advances;
 *   - the pieces passed to the callback tile the input, in order.
 *
 * Differences in spelling from the tokenizer.json (not in meaning): the CJK
 * ranges are written as \x{...}, and `\s` / `\S` are written as the explicit
 * class of Oniguruma's Unicode \s (the engine Hugging Face uses): the
 * White_Space property, i.e. \t \n \v \f \r, U+0085 and every Z character.
 * PCRE2's own UCP \s leaves out U+0085 (and, before 10.43, \v), which would
 * split texts with NEL differently.
 */
#include "pretok.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdint.h>
#include <stdlib.h>

#include "util/err.h"

#define WS "\\t\\n\\x{0B}\\f\\r\\x{85}\\p{Z}"

/* The three Split patterns, in the order of the pre_tokenizer Sequence. */
static const char *const k_patterns[3] = {
    /* 1: Unicode numbers, 1 to 3 at a time */
    "\\p{N}{1,3}",
    /* 2: CJK ideographs U+4E00-U+9FA5, Hiragana, Katakana */
    "[\\x{4E00}-\\x{9FA5}\\x{3040}-\\x{309F}\\x{30A0}-\\x{30FF}]+",
    /* 3: words, punctuation runs, whitespace (alternatives tried in order) */
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    "|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\\r\\n]*"
    "|[" WS "]*[\\r\\n]+"
    "|[" WS "]+(?![^" WS "])"
    "|[" WS "]+",
};

struct ds4_pretok {
    pcre2_code *re[3];
};

int ds4_pretok_new(ds4_pretok **out, ds4_err *err) {
    *out = NULL;
    ds4_pretok *pt = calloc(1, sizeof *pt);
    if (!pt) return ds4_err_set(err, DS4_E_NOMEM, "pre-tokenizer: out of memory");
    for (int i = 0; i < 3; i++) {
        int ec;
        PCRE2_SIZE eo;
        pt->re[i] = pcre2_compile((PCRE2_SPTR)k_patterns[i], PCRE2_ZERO_TERMINATED,
                                  PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &ec, &eo,
                                  NULL);
        if (!pt->re[i]) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(ec, msg, sizeof msg);
            ds4_pretok_free(pt);
            return ds4_err_set(err, DS4_E_INTERNAL, "pre-tokenizer regex %d at %zu: %s", i + 1,
                               (size_t)eo, (const char *)msg);
        }
        /* JIT is an optimisation only: pcre2_match falls back to the
         * interpreter with identical results when it is unavailable. */
        (void)pcre2_jit_compile(pt->re[i], PCRE2_JIT_COMPLETE);
    }
    *out = pt;
    return 0;
}

void ds4_pretok_free(ds4_pretok *pt) {
    if (!pt) return;
    for (int i = 0; i < 3; i++) pcre2_code_free(pt->re[i]);
    free(pt);
}

/* Per-call matching state (never shared between threads). */
typedef struct split_ctx {
    const ds4_pretok *pt;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *big_stack; /* made on the first JIT stack overflow */
    ds4_pretok_piece_fn fn;
    void *user;
    ds4_err *err;
} split_ctx;

/* Finds the first match of regex `level` in s[from..n). Returns 1 and
 * [*ms, *me), 0 when there is none, or a negative DS4_E*. */
static int find_match(split_ctx *c, int level, const char *s, size_t n, size_t from,
                      size_t *ms, size_t *me) {
    for (;;) {
        int rc = pcre2_match(c->pt->re[level], (PCRE2_SPTR)s, n, from, 0, c->md, c->mctx);
        if (rc == PCRE2_ERROR_NOMATCH) return 0;
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !c->big_stack) {
            /* Long backtracking runs (huge whitespace runs) need more than
             * the 32 KiB default JIT stack; retry once with 64 MiB. */
            c->big_stack = pcre2_jit_stack_create(1 << 16, 64 << 20, NULL);
            if (!c->big_stack)
                return ds4_err_set(c->err, DS4_E_NOMEM, "pre-tokenizer: out of memory");
            pcre2_jit_stack_assign(c->mctx, NULL, c->big_stack);
            continue;
        }
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return ds4_err_set(c->err, DS4_E_INTERNAL, "pre-tokenizer regex %d at byte %zu: %s",
                               level + 1, from, (const char *)msg);
        }
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
        if (ov[1] <= ov[0] || ov[0] < from)
            return ds4_err_set(c->err, DS4_E_INTERNAL, "pre-tokenizer regex %d: empty match",
                               level + 1);
        *ms = ov[0];
        *me = ov[1];
        return 1;
    }
}

/* Applies step `level` (0..2) to the piece s[0..n) and hands the resulting
 * pieces to the next step; after step 3 pieces go to the callback. */
static int split_level(split_ctx *c, int level, const char *s, size_t n) {
    if (level == 3) return c->fn(c->user, s, n);
    size_t pos = 0;
    while (pos < n) {
        size_t ms, me;
        int rc = find_match(c, level, s, n, pos, &ms, &me);
        if (rc < 0) return rc;
        if (rc == 0) break;
        if (ms > pos && (rc = split_level(c, level + 1, s + pos, ms - pos)) != 0) return rc;
        if ((rc = split_level(c, level + 1, s + ms, me - ms)) != 0) return rc;
        pos = me;
    }
    if (pos < n) return split_level(c, level + 1, s + pos, n - pos);
    return 0;
}

int ds4_pretok_split(const ds4_pretok *pt, const char *text, size_t len,
                     ds4_pretok_piece_fn fn, void *user, ds4_err *err) {
    if (len == 0) return 0;
    split_ctx c = {.pt = pt, .fn = fn, .user = user, .err = err};
    /* One ovector pair is all we read; match data from pattern 3 fits all. */
    c.md = pcre2_match_data_create(1, NULL);
    c.mctx = pcre2_match_context_create(NULL);
    int rc;
    if (!c.md || !c.mctx) {
        rc = ds4_err_set(err, DS4_E_NOMEM, "pre-tokenizer: out of memory");
        goto done;
    }
    /* Backtracking work of one match grows with the length of a whitespace
     * run; the default limit (10M) could refuse a legal, very long run. */
    pcre2_set_match_limit(c.mctx, UINT32_MAX);
    pcre2_set_depth_limit(c.mctx, UINT32_MAX);
    rc = split_level(&c, 0, text, len);
done:
    pcre2_match_data_free(c.md);
    pcre2_match_context_free(c.mctx);
    if (c.big_stack) pcre2_jit_stack_free(c.big_stack);
    return rc;
}
