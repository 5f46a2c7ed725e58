/* tokenizer.h - byte-level BPE tokenizer of DeepSeek V3/V4 (docs/TEXT.md §A).
 *
 * A ds4_tokenizer is built once from plain arrays (the GGUF keys
 * tokenizer.ggml.tokens / tokenizer.ggml.merges) and is read-only after
 * that: every function taking a const ds4_tokenizer* is thread-safe.
 *
 * Encoding = the official pre-tokenizer of the tokenizer.json (three Split
 * regexes with behaviour "Isolated", evaluated with PCRE2 in UTF+UCP mode,
 * docs/TEXT.md A.5; see pretok.h) followed by GPT-2 BPE over byte symbols (A.3,
 * A.6). The ids are those Hugging Face `tokenizers` gives for the same
 * tokenizer.json on any valid UTF-8 text (tests/py/test_tokenizer_hf.py).
 *
 * Invalid UTF-8 input (which HF cannot take) is accepted: an invalid byte
 * never matches any split regex, so it lands in an "unmatched gap" piece and
 * is BPE-encoded through its byte symbol like any other byte. Decoding the
 * ids therefore gives back the exact input bytes in every case.
 */
#ifndef DS4_TOKENIZER_H
#define DS4_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ds4.h"
#include "gguf.h"
#include "util/err.h"

typedef struct ds4_tokenizer ds4_tokenizer;

/* Builds a tokenizer from n_tokens vocabulary strings (index = id, byte-level
 * form as stored in GGUF, e.g. "Ġworld"; markers stored literally) and
 * n_merges merge strings "left right" (index = rank). token_lens /
 * merge_lens give the byte lengths (NULL: strlen of each). Strings are
 * copied. If a string occurs twice in tokens the lower id wins.
 *
 * The seven markers of docs/TEXT.md A.1 are looked up by string; a missing one
 * gets id -1 (ds4_tokenizer_special) and is not recognized in rendered mode
 * (ds4_tokenizer_from_gguf is stricter). Every one of the 256 byte symbols
 * must be in the vocabulary (else DS4_E_MODEL: some input could not be
 * encoded). A merge whose parts or result are not vocabulary strings is
 * ignored (Hugging Face refuses such a file; we only skip the merge).
 *
 * Returns 0 and *out, or DS4_E_ARG (bad arguments, malformed merge string),
 * DS4_E_MODEL, DS4_E_NOMEM, DS4_E_INTERNAL (PCRE2 failed to compile); *out
 * is NULL on failure. */
int ds4_tokenizer_from_arrays(ds4_tokenizer **out, const char *const *tokens,
                              const size_t *token_lens, int n_tokens,
                              const char *const *merges, const size_t *merge_lens,
                              int n_merges, ds4_err *err);

/* Reads tokenizer.ggml.tokens and tokenizer.ggml.merges from g. The strings
 * are copied: g may be closed right after. A GGUF without tokenizer.ggml.tokens
 * has no tokenizer: *out = NULL and 0 is returned. Fails with DS4_E_MODEL
 * when the keys have the wrong types, tokenizer.ggml.model is present and
 * not "gpt2", or one of the seven marker strings is missing. */
int ds4_tokenizer_from_gguf(const ds4_gguf *g, ds4_tokenizer **out, ds4_err *err);

/* Frees t (NULL is fine). */
void ds4_tokenizer_free(ds4_tokenizer *t);

/* Number of vocabulary entries (ids are 0 .. n_vocab-1). */
int ds4_tokenizer_n_vocab(const ds4_tokenizer *t);

/* Tokenizes text[0..len) (any bytes; need not be NUL-terminated).
 * rendered=false: plain BPE, marker strings are ordinary text.
 * rendered=true: the seven marker strings of docs/TEXT.md A.1 become their ids
 * and the spans between them are tokenized independently (A.2).
 * Writes at most cap ids to out (out may be NULL when cap is 0) and returns
 * the total number of ids, which may exceed cap: call again with a bigger
 * buffer. Negative on error: DS4_E_ARG (bad args, text over 2 GiB),
 * DS4_E_NOMEM, DS4_E_INTERNAL (regex engine failure). Thread-safe. */
int ds4_tokenizer_encode(const ds4_tokenizer *t, const char *text, size_t len, bool rendered,
                         int32_t *out, int cap, ds4_err *err);

/* Id of a marker (which = ds4_special_token), or -1 if absent / which out
 * of range. */
int32_t ds4_tokenizer_special(const ds4_tokenizer *t, int which);

/* Raw bytes token id decodes to (docs/TEXT.md A.7): *len set, pointer owned by
 * t, not NUL-terminated. NULL (and *len = 0) for an id out of range. */
const char *ds4_tokenizer_token_bytes(const ds4_tokenizer *t, int32_t id, size_t *len);

/* The vocabulary string as stored (NUL-terminated, owned by t), or NULL for
 * an id out of range. Its byte length: ds4_tokenizer_token_text_len. */
const char *ds4_tokenizer_token_text(const ds4_tokenizer *t, int32_t id);
size_t ds4_tokenizer_token_text_len(const ds4_tokenizer *t, int32_t id);

/* True for a control (added, non-text) token: one of the seven markers of
 * A.1, any token whose stored string holds the marker bar U+FF5C
 * ("<｜place▁holder▁no▁3｜>", "<｜tool▁calls▁begin｜>", ...), or an ASCII
 * "<|...|>" token ("<|EOT|>"). False for an id out of range. */
bool ds4_tokenizer_is_control(const ds4_tokenizer *t, int32_t id);

/* Largest decoded byte length of any token. */
size_t ds4_tokenizer_max_token_bytes(const ds4_tokenizer *t);

/* ---- Streaming detokenizer ----------------------------------------------
 *
 * Turns a stream of token ids into text that never ends in the middle of a
 * UTF-8 character: bytes of an incomplete trailing character are held back
 * until the next token completes them. Policy for bytes that can never form
 * a valid character (a stray continuation byte, an overlong form, a
 * surrogate, a sequence cut short by the next token or by the end): each
 * maximal invalid subpart becomes U+FFFD (EF BF BD), as WHATWG/Unicode
 * recommend, so the output is always valid UTF-8 (safe for JSON and
 * terminals). Callers that need the exact bytes (KV keys) use
 * ds4_tokenizer_token_bytes instead.
 *
 * One ds4_detok is used by one thread; it holds a pointer to t, which must
 * outlive it. Feeding allocates nothing. */
typedef struct ds4_detok {
    const ds4_tokenizer *tok;
    char *buf;            /* output of the last call, (cap) bytes */
    size_t cap;           /* max token bytes * 3 + 16: worst case all U+FFFD */
    uint8_t pend[4];      /* held-back bytes of an incomplete character */
    int n_pend;
} ds4_detok;

/* Prepares d for t. Returns 0 or DS4_E_NOMEM. */
int ds4_detok_init(ds4_detok *d, const ds4_tokenizer *t, ds4_err *err);
void ds4_detok_free(ds4_detok *d);
/* Forgets held-back bytes (start of a new stream). */
void ds4_detok_reset(ds4_detok *d);
/* Feeds one id; returns the text that became complete (*len bytes, valid
 * UTF-8, possibly empty), valid until the next call on d. An id out of range
 * decodes to nothing. */
const char *ds4_detok_push(ds4_detok *d, int32_t id, size_t *len);
/* End of stream: returns U+FFFD for held-back bytes (or nothing) and resets. */
const char *ds4_detok_flush(ds4_detok *d, size_t *len);

#endif
