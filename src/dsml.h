/* dsml.h - DSML, the model's tool-call markup (docs/TEXT.md §C): pure text, no model.
 *
 * What lives here:
 *   - the tools prompt that goes into the system block (C.2, exact bytes);
 *   - canonical JSON -> DSML rendering of an assistant's tool calls (C.4);
 *   - tool results inside the prompt (C.5);
 *   - the final parser of one generated assistant turn into reasoning,
 *     content, tool calls and the raw DSML block (C.6);
 *   - an incremental (streaming) parser that turns decoded bytes, in chunks
 *     of any size, into reasoning/content/tool-call events (B.8, C.10);
 *   - the DSML-aware sampling tracker (C.9);
 *   - the exact-replay map tool-call id -> sampled DSML bytes (C.8) with its
 *     KV-cache trailer encoding (docs/SERVING.md C.6);
 *   - helpers: JSON minify (C.4), compact re-serialization of arguments
 *     (docs/SERVING.md B.6), call ids, and the opt-in repair of unterminated
 *     blocks (C.7).
 *
 * All text is bytes with explicit lengths (embedded NULs are allowed in
 * contents); returned strings are also NUL-terminated. No function here
 * keeps global state; every object is single-owner (not thread-safe), and
 * distinct objects may be used from distinct threads.
 */
#ifndef DS4_DSML_H
#define DS4_DSML_H

#include <stddef.h>
#include <stdint.h>

#include "util/buf.h"
#include "util/err.h"

/* Marker strings (UTF-8 bytes, docs/TEXT.md §A/§C). */
#define DS4_DSML_MARK "\xef\xbd\x9c" "DSML" "\xef\xbd\x9c"  /* "｜DSML｜" */
#define DS4_THINK_OPEN "<think>"
#define DS4_THINK_CLOSE "</think>"
#define DS4_TOOL_RESULT_OPEN "<tool_result>"
#define DS4_TOOL_RESULT_CLOSE "</tool_result>"

/* One tool call. Strings are owned by whatever holds the struct (a ds4_chat,
 * a ds4_dsml_result); all are NUL-terminated. */
typedef struct ds4_tool_call {
    char *id;         /* "call_<32 hex>", "toolu_<32 hex>", or NULL if unknown */
    char *name;       /* tool name, decoded */
    char *arguments;  /* JSON text of the arguments object (see each producer) */
    size_t arguments_len;
} ds4_tool_call;

/* ---------------------------------------------------------------- prompt */

/* Appends HEAD + schema_lines + TAIL (C.2) to out. schema_lines is the
 * joined text of C.1 (lines separated by '\n'), inserted verbatim.
 * Returns 0 or DS4_E_NOMEM. */
int ds4_dsml_tools_prompt(ds4_buf *out, const char *schema_lines, size_t len);

/* Appends the canonical DSML block for calls[0..n) (C.4), starting with
 * "\n\n<｜DSML｜tool_calls>\n" and ending with "</｜DSML｜tool_calls>".
 * n == 0 appends nothing. Arguments that are not a JSON object are rendered
 * as one string parameter "arguments". Returns 0 or DS4_E_NOMEM. */
int ds4_dsml_render_calls(ds4_buf *out, const ds4_tool_call *calls, int n);

/* Appends "<tool_result>" + content (each "</tool_result>" inside written
 * as "&lt;/tool_result>") + "</tool_result>" (C.5). 0 or DS4_E_NOMEM. */
int ds4_dsml_tool_result(ds4_buf *out, const char *content, size_t len);

/* ------------------------------------------------------------- JSON bits */

/* Appends json[0..len) minified (C.4): whitespace outside string literals
 * removed, string literals copied verbatim. The text must be exactly one
 * valid JSON value (RFC 8259; nesting at most 256 levels); otherwise
 * returns DS4_E_FORMAT and out is left as it was. */
int ds4_dsml_json_minify(ds4_buf *out, const char *json, size_t len, ds4_err *err);

/* Appends the JSON string literal (with quotes) for s[0..len): escapes '"',
 * '\\', and control bytes (\b \f \n \r \t, others \u00XX); other bytes,
 * including non-ASCII, are copied. */
int ds4_dsml_json_quote(ds4_buf *out, const char *s, size_t len);

/* Compact re-serialization of an arguments object for clients (docs/SERVING.md
 * B.6): {"k":"v","n":10} with member order kept, string values decoded and
 * re-quoted, other values minified. Text that is not a JSON object gives
 * "{}". Returns 0 or DS4_E_NOMEM. */
int ds4_dsml_args_compact(ds4_buf *out, const char *args, size_t len);

/* Fresh call id: prefix + 32 lowercase hex digits of 16 random bytes
 * (getrandom). out must hold strlen(prefix) + 33 bytes. 0 or DS4_E_IO. */
int ds4_dsml_call_id(char *out, size_t cap, const char *prefix);

/* ----------------------------------------------------------- final parse */

/* The parse of one assistant turn. There is one parser: the streaming
 * parser below; this is what it emitted over the whole turn (so a streamed
 * and a non-streamed reply agree byte for byte), plus the calls of the
 * block it closed. Rules (docs/server.md "One parser"):
 *   - thinking: an optional leading "<think>" is skipped; everything before
 *     the first "</think>" is reasoning -- all of it when the turn was cut
 *     before "</think>" (ds4 returned that as content; we do not);
 *   - not thinking: no reasoning; "<think>" text is content;
 *   - with tools, the earliest tool_calls open tag after the reasoning
 *     starts the block (C.3 families); content is the text before it with
 *     trailing whitespace removed; text after the closed block is ignored;
 *   - a block that is malformed or never closed: no calls, and its bytes
 *     (from the whitespace before it) follow the content. */
typedef struct ds4_dsml_result {
    char *reasoning;         /* NULL when there is none */
    size_t reasoning_len;
    char *content;           /* never NULL (may be "") */
    size_t content_len;
    ds4_tool_call *calls;    /* (n_calls); ids are NULL from ds4_dsml_parse */
    int n_calls;             /* arguments: internal form {"k": v, "k2": v2} */
    char *raw_dsml;          /* exact block incl. a blank line before it; NULL unless parsed */
    size_t raw_dsml_len;
    int block_seen;          /* a block open tag was found */
    int parse_failed;        /* block seen but malformed or open: its text is content */
    int block_dropped;       /* an open block dropped at finish (ds4_dsml_stream_drop_open_block) */
} ds4_dsml_result;

/* Parses one generated assistant turn (decoded bytes without EOS) with the
 * streaming parser, tools on. thinking: the turn was generated in thinking
 * mode. Never fails on bad DSML (that is the parse_failed fallback);
 * returns 0 or DS4_E_NOMEM. *out is overwritten; release with
 * ds4_dsml_result_free. */
int ds4_dsml_parse(const char *text, size_t len, int thinking, ds4_dsml_result *out,
                   ds4_err *err);
void ds4_dsml_result_free(ds4_dsml_result *r);

/* Repair (C.7 says ds4 does not repair; this is opt-in). If text (a turn
 * as given to ds4_dsml_parse) ends inside a DSML block at a point where the
 * completion is unambiguous -- every parameter value closed, only the
 * closing </…invoke> and/or </…tool_calls> tags missing, at least one
 * invoke seen -- appends those closing tags to suffix and returns 1.
 * Returns 0 when there is nothing to repair or the repair would be a guess
 * (inside a value, a tag, or before any invoke). Negative on no memory. */
int ds4_dsml_repair_suffix(const char *text, size_t len, int thinking, ds4_buf *suffix);

/* ----------------------------------------------------- sampling tracker */

/* C.9 classes of the next token position. */
typedef enum {
    DS4_DSML_OUTSIDE = 0,     /* request/thinking sampling settings */
    DS4_DSML_STRUCTURAL,      /* temperature 0 */
    DS4_DSML_STRING_BODY,     /* normal settings */
    DS4_DSML_JSON_STRUCTURAL, /* temperature 0 */
    DS4_DSML_JSON_STRING,     /* normal settings */
} ds4_dsml_class;

/* Byte-at-a-time tracker over the whole decoded text of a turn (reasoning
 * included, quirk of C.9). Fixed size, no allocation: safe on the decode
 * path. Zero-initialize or call ds4_dsml_tracker_init. */
typedef struct ds4_dsml_tracker {
    int state;            /* internal */
    int family;           /* tag family of the open block, -1 none */
    int in_tag;           /* collecting a tag "<…>" */
    int json_escape;      /* previous byte was a backslash in a JSON string */
    size_t tag_len;       /* bytes collected in tag[] (may exceed sizeof tag) */
    char tag[256];        /* start of the current tag */
    size_t win_len;       /* bytes in win[] */
    char win[32];         /* last bytes seen (for marker suffix tests) */
} ds4_dsml_tracker;

void ds4_dsml_tracker_init(ds4_dsml_tracker *t);
void ds4_dsml_tracker_feed(ds4_dsml_tracker *t, const char *bytes, size_t n);
/* The class of the next token position. */
ds4_dsml_class ds4_dsml_tracker_class(const ds4_dsml_tracker *t);
/* Where a tool-call block may be starting at the end of text[0..n): the
 * offset of the trailing run of whitespace and/or a proper prefix of a
 * block's opening tag (any family) that ends the text, or -1 when the end
 * of the text cannot be the start of a block. (A stop string that matches
 * there waits until the block opens or the text turns out to be plain.) */
long ds4_dsml_open_prefix(const char *text, size_t n);
/* 1 if the class forces temperature 0 (STRUCTURAL, JSON_STRUCTURAL). */
int ds4_dsml_class_is_greedy(ds4_dsml_class c);

/* ------------------------------------------------------ streaming parser */

typedef enum {
    DS4_DSML_EV_REASONING = 1, /* text: reasoning bytes (complete UTF-8) */
    DS4_DSML_EV_CONTENT,       /* text: content bytes (complete UTF-8) */
    DS4_DSML_EV_BLOCK_START,   /* a tool_calls start tag was recognized */
    DS4_DSML_EV_CALL_START,    /* index, id, name: an invoke header is complete */
    DS4_DSML_EV_CALL_ARGS,     /* index, text: a JSON fragment of the arguments */
    DS4_DSML_EV_CALL_END,      /* index: </…invoke> seen */
    DS4_DSML_EV_BLOCK_END,     /* </…tool_calls> seen: stop generating (C.7) */
    DS4_DSML_EV_ERROR,         /* text: message; tool projection stopped */
} ds4_dsml_event_type;

typedef struct ds4_dsml_event {
    ds4_dsml_event_type type;
    int index;          /* tool call index within the turn (calls events) */
    const char *id;     /* CALL_START: call id (valid until the stream is freed) */
    const char *name;   /* CALL_START: decoded tool name (same lifetime) */
    const char *text;   /* delta bytes or message; valid during the callback only */
    size_t len;
} ds4_dsml_event;

/* Called for every event; return 0 to go on, non-zero to abort the feed
 * (the feed then returns DS4_E_CANCEL). */
typedef int (*ds4_dsml_event_fn)(void *ud, const ds4_dsml_event *ev);

typedef struct ds4_dsml_stream_opts {
    int thinking;          /* the turn starts inside reasoning */
    int tools;             /* tools active: recognize DSML in content */
    const char *id_prefix; /* "call_" (default when NULL) or "toolu_" */
    uint64_t id_seed;      /* 0: ids from getrandom; else a deterministic stream (tests) */
    int repair;            /* at finish, close an unterminated block when unambiguous */
} ds4_dsml_stream_opts;

typedef struct ds4_dsml_stream ds4_dsml_stream;

/* Creates a stream. NULL on allocation failure. */
ds4_dsml_stream *ds4_dsml_stream_new(const ds4_dsml_stream_opts *opts);
void ds4_dsml_stream_free(ds4_dsml_stream *s);

/* Feeds the next decoded bytes (any split, even inside a UTF-8 character or
 * a marker). Events are emitted as soon as they are certain: a partial
 * marker, partial entity, partial UTF-8 character or trailing whitespace
 * before a possible block is held back, never emitted as text. The event
 * sequence, with consecutive deltas of one kind merged, is the same for
 * every split of the same text. Work is linear in the bytes fed. The
 * projection stops (one ERROR event; the bytes are then held for finish)
 * on markup it cannot stream: a malformed block or a tag with no '>' within
 * 4 KiB. (Nested parameter objects, the C.6 recovery form, are streamed.)
 * Returns 0, DS4_E_NOMEM or DS4_E_CANCEL. */
int ds4_dsml_stream_feed(ds4_dsml_stream *s, const char *bytes, size_t n,
                         ds4_dsml_event_fn fn, void *ud);

/* Ends the turn: flushes held bytes; an unterminated block gives an ERROR
 * event "unterminated tool call" (or, with opts.repair and an unambiguous
 * end, the missing CALL_END/BLOCK_END events), and its bytes from the block
 * start on (including the whitespace dropped before it) are then emitted
 * as CONTENT, as is anything held after a projection error. If out is
 * non-NULL it receives the turn's result (see ds4_dsml_result): exactly
 * the reasoning and content emitted, and the calls of the closed block
 * (of text + repair suffix when repaired) with the announced ids. Returns 0 or a
 * negative code. The stream accepts no more bytes afterwards. */
int ds4_dsml_stream_finish(ds4_dsml_stream *s, ds4_dsml_event_fn fn, void *ud,
                           ds4_dsml_result *out, ds4_err *err);

/* The C.9 class of the next token (tracker over all bytes fed so far;
 * meaningful only with opts.tools). */
ds4_dsml_class ds4_dsml_stream_class(const ds4_dsml_stream *s);
/* State flags for the server's stop logic (C.7). */
int ds4_dsml_stream_block_started(const ds4_dsml_stream *s);
/* Before ds4_dsml_stream_finish (the turn was cut by its token limit): a
 * block still open then is dropped instead of failing (no ERROR event, its
 * bytes are not emitted as content), and so is a held, partly written
 * opening tag (at least 2 bytes of it, or a '<' after a blank line) with
 * the whitespace before it; the
 * result then has block_dropped set. */
void ds4_dsml_stream_drop_open_block(ds4_dsml_stream *s);
int ds4_dsml_stream_block_ended(const ds4_dsml_stream *s);
/* The block broke the grammar (C.6 rule 6: no calls, its bytes are content;
 * not an unterminated block). */
int ds4_dsml_stream_block_failed(const ds4_dsml_stream *s);
/* Whole text fed so far (owned by the stream). */
const char *ds4_dsml_stream_text(const ds4_dsml_stream *s, size_t *len);

/* ------------------------------------------------------ exact replay map */

typedef struct ds4_dsml_replay ds4_dsml_replay;

/* max_ids: capacity in ids (ds4 default 100000); max_bytes: accounted bytes
 * (default 512 MiB). 0 for either means the default. NULL on no memory. */
ds4_dsml_replay *ds4_dsml_replay_new(size_t max_ids, size_t max_bytes);
void ds4_dsml_replay_free(ds4_dsml_replay *m);

/* Maps every ids[i] to one shared copy of block[0..len) (an id already
 * present is replaced). Evicts least recently used ids beyond capacity.
 * Ids are 1..256 bytes, blocks 1 byte..512 MiB: others give DS4_E_ARG. */
int ds4_dsml_replay_put(ds4_dsml_replay *m, const char *const *ids, int n_ids,
                        const char *block, size_t len, ds4_err *err);

/* Block for id (refreshes its recency), or NULL. *len gets its length.
 * The pointer is valid until the next put/load/eviction. */
const char *ds4_dsml_replay_get(ds4_dsml_replay *m, const char *id, size_t *len);

/* C.8 rule for one assistant message: returns the block if all n ids are
 * known, distinct, map to the same block and are all of its ids (a turn's
 * calls split over several messages are rendered canonically), else NULL
 * (n == 0 gives NULL). */
const char *ds4_dsml_replay_lookup(ds4_dsml_replay *m, const char *const *ids, int n,
                                   size_t *len);

size_t ds4_dsml_replay_count(const ds4_dsml_replay *m);   /* ids held */
size_t ds4_dsml_replay_bytes(const ds4_dsml_replay *m);   /* accounted bytes */

/* Appends the "KTM" trailer (docs/SERVING.md C.6) holding the entries whose block
 * occurs verbatim in key_text, most recent first. 0 or DS4_E_NOMEM. */
int ds4_dsml_replay_save(const ds4_dsml_replay *m, const char *key_text, size_t key_len,
                         ds4_buf *out);

/* Loads a trailer from bytes[0..n). If only_ids is non-NULL, just the
 * entries whose id is among only_ids[0..n_only) are inserted. Entries are
 * marked as coming from disk. *consumed (if non-NULL) gets the bytes of
 * the well-formed prefix. A bad magic/version or a count above 4 x max_ids
 * loads nothing; a malformed entry stops the load there (earlier entries
 * stay). Both return DS4_E_FORMAT with a message; otherwise 0. */
int ds4_dsml_replay_load(ds4_dsml_replay *m, const uint8_t *bytes, size_t n,
                         const char *const *only_ids, int n_only, size_t *consumed,
                         ds4_err *err);

/* 1 if id's entry came from a trailer, 0 if from put, -1 if unknown. Does
 * not touch recency, so it also serves as a membership test (e.g. to
 * regenerate a fresh call id that collides with a remembered one, C.8). */
int ds4_dsml_replay_from_disk(const ds4_dsml_replay *m, const char *id);

#endif
