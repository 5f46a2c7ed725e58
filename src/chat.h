/* chat.h - conversation -> prompt text for DeepSeek V4 (docs/TEXT.md §B).
 *
 * A ds4_chat is a wire-format-independent conversation: messages with a
 * role, content, reasoning (assistant), tool calls (assistant) and the call
 * id of a tool result; the joined tool-schema text (C.1); the thinking mode
 * and the context size that gates Think Max. ds4_chat_render turns it into
 * the exact prompt text of B.4, marker strings inline (the rendered-chat
 * tokenizer maps them to ids). The server maps its wire JSON to a ds4_chat
 * and nothing else.
 *
 * The CLI builders of B.6 are token-level: they produce a list of segments,
 * each saying how it must be tokenized (one special token, plain BPE with no
 * marker scan, or the rendered-chat tokenizer).
 *
 * Ownership: a ds4_chat copies every string it is given and frees them in
 * ds4_chat_free. Not thread-safe; distinct chats are independent.
 */
#ifndef DS4_CHAT_H
#define DS4_CHAT_H

#include <stddef.h>
#include <stdint.h>

#include "dsml.h"
#include "util/buf.h"
#include "util/err.h"

/* Building blocks (B.1), exact UTF-8 bytes. */
#define DS4_BOS "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence" "\xef\xbd\x9c>"
#define DS4_EOS "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence" "\xef\xbd\x9c>"
#define DS4_USER "<\xef\xbd\x9c" "User" "\xef\xbd\x9c>"
#define DS4_ASSISTANT "<\xef\xbd\x9c" "Assistant" "\xef\xbd\x9c>"
/* DS4_THINK_OPEN / DS4_THINK_CLOSE / DS4_TOOL_RESULT_* come from dsml.h. */

/* Context size from which Think Max is honoured (B.2): 384 Ki tokens. */
#define DS4_THINK_MAX_MIN_CTX 393216
/* Default system text of the CLI and /v1/completions (no final period). */
#define DS4_CHAT_DEFAULT_SYSTEM "You are a helpful assistant"

/* The Think-Max prefix (B.3): 476 bytes ending in "\n\n". */
extern const char ds4_chat_max_prefix[];
extern const size_t ds4_chat_max_prefix_len;

typedef enum {
    DS4_THINK_NONE = 0,
    DS4_THINK_HIGH,
    DS4_THINK_MAX,
} ds4_think;

typedef enum {
    DS4_ROLE_SYSTEM = 0,
    DS4_ROLE_DEVELOPER,
    DS4_ROLE_USER,
    DS4_ROLE_ASSISTANT,
    DS4_ROLE_TOOL,
    DS4_ROLE_FUNCTION,
    DS4_ROLE_OTHER, /* unknown roles: kept, dropped at rendering (B.4) */
} ds4_role;

/* Role from its wire name ("system", "developer", "user", "assistant",
 * "tool", "function"; anything else DS4_ROLE_OTHER). */
ds4_role ds4_chat_role_from_name(const char *name);

/* The Think-Max context gate (B.2): max becomes high when n_ctx < 393216. */
ds4_think ds4_chat_effective_think(ds4_think mode, int64_t n_ctx);

typedef struct ds4_chat_msg {
    ds4_role role;
    char *content;          /* NUL-terminated, may hold NULs */
    size_t content_len;
    char *reasoning;        /* assistant reasoning, NULL when none */
    size_t reasoning_len;
    ds4_tool_call *calls;   /* (n_calls), assistant only */
    int n_calls;
    char *tool_call_id;     /* tool result: the call it answers, or NULL */
    int canonical_calls;    /* render the calls canonically even where the replay map knows
                               their ids (ds4_chat_set_canonical_calls) */
} ds4_chat_msg;

typedef struct ds4_chat {
    ds4_chat_msg *msgs;     /* (n_msgs), read-only for callers */
    int n_msgs;
    int cap_msgs;
    char *tools;            /* joined schema lines (C.1), NULL when none */
    size_t tools_len;
    ds4_think think;        /* requested mode (before the context gate) */
    int64_t n_ctx;          /* allocated context size for the gate (0: unknown = gate closed) */
} ds4_chat;

/* Creates an empty chat: no messages, no tools, mode high, n_ctx 0.
 * NULL on allocation failure. ds4_chat_free(NULL) is a no-op. */
ds4_chat *ds4_chat_new(void);
void ds4_chat_free(ds4_chat *c);

void ds4_chat_set_think(ds4_chat *c, ds4_think mode, int64_t n_ctx);

/* Tools active (B.4): set the joined schema text; the server passes it only
 * when tools are present and tool_choice is not "none". len 0 clears.
 * Returns 0 or DS4_E_NOMEM. */
int ds4_chat_set_tools(ds4_chat *c, const char *schema_lines, size_t len, ds4_err *err);
/* Appends one schema line (joined with '\n' to those before). */
int ds4_chat_add_tool_schema(ds4_chat *c, const char *line, size_t len, ds4_err *err);

/* Appends a message; returns its index (>= 0) or a negative code. */
int ds4_chat_add(ds4_chat *c, ds4_role role, const char *content, size_t len, ds4_err *err);
/* Moves the last message to index `to` (0 <= to < n_msgs), the ones from
 * `to` on one place later: a system text added after a conversation that
 * ends in a prefill goes before that assistant message. */
void ds4_chat_move_last(ds4_chat *c, int to);
/* Appends to the reasoning of message i (creates it if absent). */
int ds4_chat_add_reasoning(ds4_chat *c, int i, const char *text, size_t len, ds4_err *err);
/* Appends a tool call to message i. id may be NULL; arguments is JSON text
 * (an object normally; anything else renders as a string parameter, C.4). */
int ds4_chat_add_call(ds4_chat *c, int i, const char *id, const char *name,
                      const char *arguments, size_t args_len, ds4_err *err);
/* Message i's calls are rendered canonically (C.4), never from the replay
 * map: the server sets it when the calls a client sent back differ from the
 * block their ids name (edited arguments or names). */
int ds4_chat_set_canonical_calls(ds4_chat *c, int i, ds4_err *err);
/* Sets the call id answered by tool message i. */
int ds4_chat_set_tool_call_id(ds4_chat *c, int i, const char *id, ds4_err *err);

/* "Tool context" of B.4: tools active, or an assistant message with calls,
 * or any tool/function message. */
int ds4_chat_tool_context(const ds4_chat *c);

/* Renders the prompt text of B.4 (appended to out). replay, if non-NULL,
 * supplies exact DSML blocks for assistant messages whose call ids are all
 * known and share one block (C.8; lookups refresh recency) and which are not
 * marked canonical_calls; otherwise the
 * canonical rendering (C.4) is used. Returns 0 or DS4_E_NOMEM. */
int ds4_chat_render(const ds4_chat *c, ds4_dsml_replay *replay, ds4_buf *out, ds4_err *err);
/* The same; offs (n_msgs + 1 entries, may be NULL) gets where each message's
 * rendering starts in out (system texts, rendered in the system block, and
 * dropped roles render nothing there) and, last, where the generation prefix
 * would start. */
int ds4_chat_render_at(const ds4_chat *c, ds4_dsml_replay *replay, ds4_buf *out, size_t *offs, ds4_err *err);
/* 1 when the conversation ends with an assistant message without tool calls
 * (a prefill): ds4_chat_render then leaves that turn open (no end-of-sentence,
 * no generation prefix) so the reply continues its content, as Anthropic's
 * prefill and DeepSeek's prefix completion do. The continuation is content,
 * not reasoning. */
int ds4_chat_continues(const ds4_chat *c);

/* /v1/completions prompt text (B.6): BOS [+ MAX prefix] + "You are a
 * helpful assistant" + USER + prompt + generation prefix. mode is used as
 * given (apply ds4_chat_effective_think first). */
int ds4_chat_render_completion(ds4_buf *out, const char *prompt, size_t len, ds4_think mode);

/* ------------------------------------------------- token-level builders */

typedef enum {
    DS4_SEG_SPECIAL = 0, /* exactly one special token, looked up by its string */
    DS4_SEG_PLAIN,       /* plain BPE, no marker scan, no context across segments */
    DS4_SEG_RENDERED,    /* rendered-chat tokenizer (markers recognized) */
} ds4_seg_kind;

typedef struct ds4_seg {
    ds4_seg_kind kind;
    char *text;   /* owned by the ds4_segs, NUL-terminated */
    size_t len;
} ds4_seg;

typedef struct ds4_segs {
    ds4_seg *v;   /* (n) */
    int n;
    int cap;
} ds4_segs;

void ds4_segs_init(ds4_segs *s);
void ds4_segs_free(ds4_segs *s);
/* Appends a segment (text copied). Empty PLAIN text is skipped. */
int ds4_segs_push(ds4_segs *s, ds4_seg_kind kind, const char *text, size_t len);

/* CLI one-shot prompt (B.6): BOS; [MAX prefix, plain]; [system, plain, if
 * non-empty]; USER; prompt (plain); ASSISTANT; THINK_OPEN or THINK_CLOSE.
 * If prompt starts with the BOS string, one RENDERED segment holding the
 * whole prompt instead. system may be NULL (= none). mode as given. */
int ds4_chat_oneshot_segs(ds4_segs *out, const char *system, const char *prompt,
                          size_t prompt_len, ds4_think mode);

/* REPL transcript start (B.6): BOS, [MAX prefix], [system]. */
int ds4_chat_repl_start_segs(ds4_segs *out, const char *system, ds4_think mode);
/* One REPL user turn: USER + plain(user text) + generation prefix. The
 * sampled tokens follow, then the caller appends the EOS token. */
int ds4_chat_repl_turn_segs(ds4_segs *out, const char *user, size_t len, ds4_think mode);

/* Per-message appender of the REPL and agent (B.6): system/developer ->
 * plain(content); assistant -> ASSISTANT, THINK_CLOSE unless the content
 * starts with "<think>" or "</think>", plain(content); anything else ->
 * USER, plain("Tool: ") for tool/function, plain(content). */
int ds4_chat_message_segs(ds4_segs *out, ds4_role role, const char *content, size_t len);

#endif
