/* kvstore.h - disk checkpoints of opaque session payloads.
 *
 * The engine serializes a session (ds4_session_save); the server's cache
 * policy decides when to store and restore; kvstore only keeps the bytes on
 * disk, keyed by the token prefix they represent (plus an optional key text,
 * e.g. the rendered prompt text or a visible transcript, docs/SERVING.md C.3/C.4),
 * and guarantees that what it hands back is exactly what was stored.
 *
 * Files live flat in one directory, named "<40 hex>.kv" (the hex is the first
 * 20 bytes of SHA-256 over fingerprint, tokens and key text). The layout is
 * docs/SERVING.md C.5 extended to version 2 (tokens, model fingerprint and SHA-256
 * digests added; see kvstore.c). Guarantees:
 *   - a file that is truncated, corrupted anywhere, renamed, or written by a
 *     crashed process is never loaded: it is rejected, removed, and the reason
 *     is returned/logged;
 *   - writes are crash-safe: temp file in the same directory, fsync, rename,
 *     fsync of the directory; a kill at any moment leaves either the old state
 *     or the complete new file; leftover temp files are removed at open;
 *   - files of another model (other fingerprint) are ignored, never touched;
 *   - the total size of this model's files stays within the byte budget
 *     (eviction by score, C.4).
 *
 * Thread-safety: one ds4_kvstore may be used by one writer thread and any
 * number of reader threads at once (an internal mutex guards the index).
 */
#ifndef DS4_KVSTORE_H
#define DS4_KVSTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

typedef struct ds4_kvstore ds4_kvstore;

/* Save reasons (docs/SERVING.md C.5 byte 5). */
enum {
    DS4_KV_REASON_UNKNOWN = 0,
    DS4_KV_REASON_COLD = 1,
    DS4_KV_REASON_CONTINUED = 2,
    DS4_KV_REASON_EVICT = 3,
    DS4_KV_REASON_SHUTDOWN = 4,
};

/* Ext flags (C.5 byte 6). */
enum {
    DS4_KV_EXT_TOOL_MAP = 1 << 0,      /* trailer holds a tool-id map (C.6) */
    DS4_KV_EXT_RESPONSES_KEY = 1 << 1, /* key text is a Responses visible transcript */
    DS4_KV_EXT_THINKING_KEY = 1 << 2,  /* key text is a thinking visible transcript */
};

#define DS4_KV_NAME_MAX 48 /* "<40 hex>.kv" + NUL fits */

/* Log sink for events not tied to a call's result (files removed at open,
 * evictions). line has no trailing newline. May be called with the store's
 * mutex held: it must not call back into the store. */
typedef void (*ds4_kvstore_log_fn)(void *user, const char *line);

typedef struct ds4_kvstore_opts {
    const char *dir;          /* created (one level) when missing */
    uint64_t budget_bytes;    /* total size of this model's files; 0 = unlimited */
    uint8_t fingerprint[32];  /* whose files these are (the server: ds4_engine_state_id) */
    ds4_kvstore_log_fn log;   /* may be NULL */
    void *log_user;
} ds4_kvstore_opts;

/* What the index knows about one stored file (no payload). */
typedef struct ds4_kvstore_entry {
    char name[DS4_KV_NAME_MAX]; /* file name inside dir */
    uint32_t n_tokens;          /* length of the stored token prefix */
    uint32_t hits;              /* times loaded */
    uint32_t ctx_size;          /* context size the payload was written with */
    uint8_t quant_bits;         /* routed-expert quant bits (informative) */
    uint8_t reason;             /* DS4_KV_REASON_* */
    uint8_t ext_flags;          /* DS4_KV_EXT_* */
    uint64_t created;           /* unix seconds */
    uint64_t last_used;         /* unix seconds */
    uint64_t payload_bytes;
    uint64_t trailer_bytes;
    uint64_t key_text_bytes;
    uint64_t file_bytes;
} ds4_kvstore_entry;

/* A fully loaded and validated file. Every pointer is malloc'ed and owned by
 * the item; free with ds4_kvstore_item_free. */
typedef struct ds4_kvstore_item {
    ds4_kvstore_entry meta;
    int32_t *tokens;   /* (meta.n_tokens) */
    char *key_text;    /* (meta.key_text_bytes) + a NUL for convenience */
    void *payload;     /* (meta.payload_bytes) */
    void *trailer;     /* (meta.trailer_bytes), NULL when empty */
} ds4_kvstore_item;

/* What ds4_kvstore_put stores. tokens must be non-empty; key_text, payload
 * and trailer may be empty (NULL with 0 bytes). The store copies nothing it
 * keeps beyond the call except the tokens and key text (for the index). */
typedef struct ds4_kvstore_put_args {
    const int32_t *tokens;
    uint32_t n_tokens;
    const char *key_text;
    size_t key_text_bytes;
    const void *payload;
    size_t payload_bytes;
    const void *trailer;
    size_t trailer_bytes;
    uint32_t ctx_size;
    uint8_t quant_bits;
    uint8_t reason;
    uint8_t ext_flags;
} ds4_kvstore_put_args;

/* Lookup filters: entries failing them are skipped. */
typedef struct ds4_kvstore_filter {
    uint32_t max_ctx;    /* skip ctx_size > max_ctx or n_tokens >= max_ctx; 0 = any */
    uint32_t min_tokens; /* skip shorter entries; 0 = any */
    uint8_t quant_bits;  /* skip other quant; 0 = any */
} ds4_kvstore_filter;

/* Opens (creating the directory if needed) and scans it: leftover temp files
 * of dead processes are deleted, every "<hex>.kv" file is validated (header,
 * sizes, tokens, key, digests of the header region) and invalid ones are
 * removed with a log line; then eviction runs to meet the budget. Payloads
 * are not read here (their digest is checked at load).
 * Fails with DS4_E_IO when the directory cannot be created or read. */
int ds4_kvstore_open(ds4_kvstore **out, const ds4_kvstore_opts *opts, ds4_err *err);
void ds4_kvstore_close(ds4_kvstore *kv);

/* Stores a checkpoint crash-safely; replaces a file with the same name (same
 * tokens and key text). Afterwards eviction runs with the new file protected.
 * If name_out is non-NULL it receives the file name. Fails with DS4_E_RANGE
 * when the file alone exceeds the budget, DS4_E_IO on a write error (ENOSPC
 * included; no partial file is left), DS4_E_ARG on bad arguments. */
int ds4_kvstore_put(ds4_kvstore *kv, const ds4_kvstore_put_args *a,
                    char name_out[DS4_KV_NAME_MAX], ds4_err *err);

/* Whether the store already holds the entry a put of these tokens and key
 * text would write (same file name: same model, tokens and text). Returns 1
 * and fills *out (may be NULL) when it does, 0 otherwise. */
int ds4_kvstore_has(ds4_kvstore *kv, const int32_t *tokens, uint32_t n, const char *key_text, size_t key_text_bytes,
                    ds4_kvstore_entry *out);

/* Longest stored token prefix of tokens[0..n) (entry length <= n; ties: the
 * most recently used). Returns 1 and fills *out when found, 0 when none. */
int ds4_kvstore_find_tokens(ds4_kvstore *kv, const int32_t *tokens, size_t n,
                            const ds4_kvstore_filter *f, ds4_kvstore_entry *out);

/* Longest stored key text that is a byte prefix of text[0..len) (non-empty
 * keys only; ties: more tokens). Returns 1 and fills *out, or 0. */
int ds4_kvstore_find_text(ds4_kvstore *kv, const char *text, size_t len,
                          const ds4_kvstore_filter *f, ds4_kvstore_entry *out);

/* Reads and validates the whole file `name` (magic, version, sizes, every
 * digest, fingerprint, name). On success fills *item, bumps hits and
 * last_used in the file header, and returns 0. A file that fails validation
 * is removed and the call fails with DS4_E_FORMAT and a message naming the
 * file and the problem (for the caller's log line). A name not in the index
 * gives DS4_E_ARG. */
int ds4_kvstore_load(ds4_kvstore *kv, const char *name, ds4_kvstore_item *item, ds4_err *err);
void ds4_kvstore_item_free(ds4_kvstore_item *item);

/* Reads only the trailer of `name` (validated by its digest); for restoring
 * tool memory without reading payloads. *out is malloc'ed (NULL when the
 * trailer is empty). Same failure handling as ds4_kvstore_load. */
int ds4_kvstore_read_trailer(ds4_kvstore *kv, const char *name, void **out, size_t *out_bytes,
                             ds4_err *err);

/* Deletes a stored file (no error if it is already gone) and drops it from
 * the index. A file that cannot be deleted is dropped too, and the call
 * returns DS4_E_IO with err naming it and the reason. */
int ds4_kvstore_remove(ds4_kvstore *kv, const char *name, ds4_err *err);

/* Copy of the index, sorted by name. *out is malloc'ed (caller frees); returns
 * the count or DS4_E_NOMEM. */
int ds4_kvstore_list(ds4_kvstore *kv, ds4_kvstore_entry **out);

/* Sum of the sizes of this model's files. */
uint64_t ds4_kvstore_total_bytes(ds4_kvstore *kv);

#endif
