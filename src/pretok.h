/* pretok.h - the DeepSeek V3/V4 pre-tokenizer (docs/TEXT.md A.5), internal to
 * the tokenizer.
 *
 * It reproduces the tokenizer.json pre_tokenizer exactly: a Sequence of three
 * Split steps with behaviour "Isolated" (every match is a piece, every
 * non-empty unmatched gap between matches is a piece too, and each step
 * re-splits every piece produced by the step before, seeing only that
 * piece), followed by ByteLevel with use_regex=false (a byte map, done by
 * the BPE stage). The regexes run in PCRE2 with UTF, UCP and
 * MATCH_INVALID_UTF: an invalid UTF-8 byte matches nothing and so always
 * lands in a gap piece.
 *
 * A ds4_pretok is immutable after ds4_pretok_new; ds4_pretok_split is
 * thread-safe (match data is per call).
 */
#ifndef DS4_PRETOK_H
#define DS4_PRETOK_H

#include <stddef.h>

#include "util/err.h"

typedef struct ds4_pretok ds4_pretok;

/* Called once per piece, in text order; p points into the caller's text.
 * n >= 1. A non-zero return stops the split and is returned by it. */
typedef int (*ds4_pretok_piece_fn)(void *user, const char *p, size_t n);

/* Compiles the three regexes (JIT when available). Returns 0, or
 * DS4_E_INTERNAL with PCRE2's message, or DS4_E_NOMEM. */
int ds4_pretok_new(ds4_pretok **out, ds4_err *err);
void ds4_pretok_free(ds4_pretok *pt);

/* Splits text[0..len) into pieces, calling fn for each. Returns 0, the
 * callback's non-zero value, DS4_E_NOMEM, or DS4_E_INTERNAL (a PCRE2 match
 * error, e.g. a resource limit) with a message. */
int ds4_pretok_split(const ds4_pretok *pt, const char *text, size_t len,
                     ds4_pretok_piece_fn fn, void *user, ds4_err *err);

#endif
