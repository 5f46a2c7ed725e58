/* server.h - internal interfaces of ds4-server (not installed, not a library
 * API). The server is split by concern:
 *
 *   main.c          options, engine open, signals, startup/shutdown
 *   http.c          libmicrohttpd glue: routing, body limits, CORS, API key,
 *                   JSON error replies, SSE byte streams, client-gone checks
 *   request.c       wire-independent request record, the shared request
 *                   prologue and JSON field readers, usage clamping
 *   api_openai.c    /v1/chat/completions, /v1/completions: parse + responses
 *   api_responses.c /v1/responses: parse + responses/events
 *   api_anthropic.c /v1/messages (+ count_tokens): parse + responses/events
 *   worker.c        the single inference thread, bounded FIFO queue,
 *                   generation loop, stop sequences, logprobs, the DSML
 *                   event pipeline into the API emitters, cancellation
 *   cache_policy.c  when to reuse/save/restore KV (docs/SERVING.md C.2-C.4)
 *
 * Each API module owns its parsing, its stream state (srv_job.api_state,
 * allocated from its emitter's state_size) and its rendering; the worker
 * knows no API. docs/server.md describes the flow and the API mapping.
 *
 * Threads: libmicrohttpd runs one thread per connection; those threads parse,
 * render and tokenize (read-only engine calls) and enqueue a srv_job. One
 * worker thread owns the engine session, the disk cache and the live bindings.
 * A job's output travels through its srv_stream (mutex + condvar), which the
 * connection thread drains; the worker never blocks on a client.
 */
#ifndef DS4_SERVER_H
#define DS4_SERVER_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "chat.h"
#include "ds4.h"
#include "dsml.h"
#include "util/buf.h"
#include "util/err.h"

#define SRV_MODEL_ID "deepseek-v4-flash"
#define SRV_MODEL_CREATED 1767225600
#define SRV_MAX_BODY_BYTES (64u << 20) /* 64 MiB (docs/SERVING.md B.2) */

/* ---- request record (request.c) ----------------------------------------- */

typedef enum { SRV_API_CHAT = 0, SRV_API_COMPLETIONS, SRV_API_RESPONSES, SRV_API_ANTHROPIC } srv_api;
#define SRV_N_API 4

/* An error for the client: HTTP status and message; param and code are the
 * OpenAI error object's members (static strings or NULL -> JSON null). */
typedef struct srv_error {
    int status;
    char msg[512];
    const char *param;
    const char *code;
    int n_prompt;   /* context errors: prompt tokens */
    int n_ctx;      /* context errors: configured context */
    bool context;   /* context_length_exceeded shape */
} srv_error;

/* Tool choice as given by the client. */
typedef enum { SRV_TOOL_AUTO = 0, SRV_TOOL_NONE, SRV_TOOL_REQUIRED, SRV_TOOL_NAMED } srv_tool_choice;

/* Client-facing name of a namespaced Responses tool (TEXT C.1). */
typedef struct srv_tool_alias {
    char *rendered;  /* namespace + name as the model sees it */
    char *name;      /* client-facing name */
    char *ns;        /* namespace */
} srv_tool_alias;

#define SRV_MAX_TOKENS_DEFAULT (-2) /* srv_request.max_tokens when the request names none */

typedef struct srv_request {
    srv_api api;
    char *model;           /* echoed back (default SRV_MODEL_ID) */
    bool stream;
    bool include_usage;    /* stream_options.include_usage */
    int max_tokens;        /* SRV_MAX_TOKENS_DEFAULT (absent): the server's -n; -1: no limit but the context */
    bool max_tokens_set;   /* the request carried max_tokens */
    bool logprobs;         /* chat logprobs:true, completions logprobs:N */
    int top_logprobs;      /* alternatives per token (0..20) */
    bool cache_control;    /* Anthropic: the client marked cache breakpoints */
    json_t *echo;          /* members the API's response echoes (Responses) */
    float temperature, top_p, min_p;
    int top_k;
    /* OpenAI penalties on the counts of generated tokens and logit_bias
     * (ids checked against the vocabulary in prepare) */
    float presence_penalty, frequency_penalty;
    int32_t *bias_ids;     /* (n_bias) */
    float *bias_vals;
    int n_bias;
    bool ignore_eos;       /* ignore_eos (vLLM, llama.cpp): the end token is never sampled */
    uint64_t seed;         /* the request's seed (when seeded) */
    bool seeded;           /* a seed was given (any integer but -1): reproducible */
    char **stops;          /* (n_stops) non-empty stop strings */
    int n_stops;
    ds4_think think;       /* requested mode after aliases (gate applied at render) */
    int think_budget;      /* thinking.budget_tokens: reasoning tokens before </think> is written (0: none) */
    bool reasoning_summary; /* Responses: client opted in to reasoning */
    bool requires_live;    /* a tool output relies only on the live binding (B.4) */
    char **live_ids;       /* (n_live_ids) tool-output ids with no call in the
                            * request (must answer the live binding, B.4) */
    int n_live_ids;
    /* Trailing tool outputs (docs/SERVING.md C.2 rules 2-3), set by srv_render_tail:
     * tail_text = EOS + the outputs and anything after them rendered alone
     * (TEXT B.4) + generation prefix; NULL when the request has none. */
    char *tail_text;
    size_t tail_len;
    char **tail_ids;       /* (n_tail_ids) ids those outputs answer */
    int n_tail_ids;
    int tail_first;        /* message index of the first of those outputs */
    char **more_result_ids; /* (n_more_result_ids) Anthropic: the ids of a user message's tool_result */
    int *more_result_msg;  /* blocks before its last (whose id is the message's tool_call_id), and */
    int n_more_result_ids; /* the message index of each */
    size_t *msg_off;       /* (chat n_msgs + 1) where each message starts in text (srv_render) */

    ds4_chat *chat;        /* chat-type conversation (NULL for completions) */
    char *prompt;          /* completions prompt text */

    char *tools_text;      /* joined schema lines (TEXT C.1), NULL if none */
    json_t *tools_json;    /* array of tool schema objects (names, properties) */
    srv_tool_choice tool_choice;
    char *tool_choice_name; /* SRV_TOOL_NAMED */
    bool single_call;      /* parallel_tool_calls false / disable_parallel_tool_use: the first call only */
    srv_tool_alias *aliases; /* (n_aliases) Responses namespaced tools */
    /* JSON replies (B.13): json_format set for json_object (json_schema
     * NULL) or json_schema (the schema, owned) */
    bool json_format;
    json_t *json_schema;
    int n_aliases;

    /* Produced after parsing (worker.c srv_prepare): */
    char *text;            /* rendered prompt text */
    size_t text_len;
    int32_t *tokens;       /* (n_tokens) rendered-chat tokenization */
    int n_tokens;
    char *raw_body;        /* request JSON (for --trace) */
} srv_request;

void srv_request_init(srv_request *rq, srv_api api);
void srv_request_free(srv_request *rq);
bool srv_tools_active(const srv_request *rq);

/* 400 "invalid JSON request"; returns -1. */
int srv_invalid(srv_error *e);
/* Records a tool-output id whose call is not in the request (parsers; the
 * client thread validates it against the live binding before queueing). */
void srv_note_live_id(srv_request *rq, const char *id);
/* True if an assistant message of c already has a call with this id. */
bool srv_chat_call_known(const ds4_chat *c, const char *id);
/* Sets e and returns -1 (for `return srv_fail(e, 400, "...")`). */
int srv_fail(srv_error *e, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Shared field readers: each returns 0 when the field is absent or valid,
 * -1 (with e set to 400 "invalid JSON request") on a wrong type. */
int srv_get_string(json_t *obj, const char *key, char **out, srv_error *e);
int srv_get_bool(json_t *obj, const char *key, bool *out, srv_error *e);
int srv_get_int(json_t *obj, const char *key, int *out, srv_error *e);
int srv_get_float(json_t *obj, const char *key, float *out, srv_error *e);
/* String, or array of strings/{"text":..} concatenated with sep (NULL: none);
 * null -> "". Anything else -> error. */
/* The text that stands for a media part (image, audio, file, document) of
 * type `type`, or NULL for other types: ds4 reads text only and says so to
 * the model instead of dropping the part silently. */
const char *srv_media_placeholder(const char *type);
/* A media part's text: an Anthropic document with a plain-text source gives
 * that text, other media srv_media_placeholder's line (NULL: not media). */
const char *srv_media_text(json_t *part, const char *type);
int srv_text_of(json_t *v, const char *sep, char **out, srv_error *e);
/* Thinking controls (docs/SERVING.md B.5) common to chat/completions/anthropic. */
int srv_parse_sampling(json_t *root, srv_request *rq, srv_error *e);
int srv_parse_thinking(json_t *root, srv_request *rq, const char *effort, bool effort_set,
                       srv_error *e);
/* Maps an effort string; returns -1 for unknown values. *think_off set for
 * "none"; *max set for "max". */
int srv_effort(const char *s, bool *think_off, bool *max);
/* Collects tool schemas (TEXT C.1) from a "tools" array into rq. Responses
 * custom (freeform) tools become a function with one string parameter
 * `input` (srv_tool_is_custom); chat custom tools are a 400. */
int srv_parse_tools(json_t *tools, srv_request *rq, srv_error *e);
/* name is a custom tool of rq (its calls go back as custom tool calls) */
bool srv_tool_is_custom(const srv_request *rq, const char *name);
/* The tools of `tools` that `allowed` (tool_choice allowed_tools' list)
 * names: by name (function.name, custom.name or name; namespaced tools one
 * by one) or, for hosted tools, by type. A new array. */
json_t *srv_filter_tools(json_t *tools, json_t *allowed);
/* Parses root.messages (required array) with one call of parse_one per
 * element; 400 "missing messages" or invalid_request on a wrong type. */
int srv_parse_messages(json_t *root, srv_request *rq, srv_error *e,
                       int (*parse_one)(json_t *m, srv_request *rq, srv_error *e));
/* ds4_chat_add that turns an allocation failure into e (500). */
int srv_chat_add(srv_request *rq, ds4_role role, const char *content, srv_error *e);
/* response_format / text.format (B.13) into rq (nested: the chat shape,
 * whose schema sits in fmt.json_schema); 0, or -1 with e (400 naming field). */
int srv_parse_json_format(json_t *fmt, bool nested, srv_request *rq, const char *field, srv_error *e);
/* Compact JSON text of v (object keys in order); malloc'ed. */
char *srv_json_text(json_t *v);

/* Parses a JSON body into rq: the shared prologue (request.c: the body is
 * one object; model, stream, token limits, sampling, stops, logprobs, n),
 * then the API's own parser, then the checks every API shares.
 * think_default is the thinking mode of a request that says nothing
 * (--default-thinking; docs/SERVING.md B.5 says high). 0 or -1 with e filled.
 * Pure (no engine, no socket): fuzz targets call it directly. */
int srv_parse_request(srv_api api, const char *body, size_t n, ds4_think think_default,
                      srv_request *rq, srv_error *e);
/* The API parsers behind it: root is the body object, rq holds what the
 * prologue read (and rq->chat, except for completions). */
int srv_parse_chat(json_t *root, srv_request *rq, srv_error *e);
int srv_parse_completions(json_t *root, srv_request *rq, srv_error *e);
int srv_parse_responses(json_t *root, srv_request *rq, srv_error *e);
int srv_parse_anthropic(json_t *root, srv_request *rq, srv_error *e);

/* Renders the request into rq->text (TEXT B.4 / B.6). replay may be NULL
 * (the caller holds its lock). Pure text. */
int srv_render(srv_request *rq, int n_ctx, ds4_dsml_replay *replay, srv_error *e);
/* Responses/Anthropic: locates the trailing tool outputs (C.2 rules 2-3) and
 * renders rq->tail_text / rq->tail_ids; no-op when there are none. Call after
 * srv_render. 0 or -1 with e set (500). Pure text. */
int srv_render_tail(srv_request *rq, int n_ctx, srv_error *e);

/* ---- generation result and emitters ------------------------------------- */

typedef enum { SRV_FINISH_STOP = 0, SRV_FINISH_LENGTH, SRV_FINISH_TOOL_CALLS, SRV_FINISH_ERROR } srv_finish;

typedef struct srv_usage {
    int prompt;     /* P: effective prompt tokens */
    int cached;     /* K: reused tokens */
    int completion; /* G: generated tokens */
    int reasoning;  /* of those, the reasoning's (up to and with the one that closes it) */
} srv_usage;

/* u made consistent, the one place this is done: every count >= 0,
 * cached <= prompt, reasoning <= completion (docs/SERVING.md B.9). */
srv_usage srv_usage_clamp(srv_usage u);

/* A token and its log-probability (TEXT D.5): bytes as decoded (may be a
 * partial UTF-8 character). */
typedef struct srv_token_lp {
    char *bytes;
    size_t n;
    float logprob;
} srv_token_lp;

/* One generated token with its top alternatives (logprobs requests). */
typedef struct srv_logprob {
    srv_token_lp tok;
    srv_token_lp *top;      /* (n_top) most likely, descending */
    int n_top;
    size_t at;              /* offset of its bytes in the generated text */
    size_t at_char;         /* the same offset in characters (code points: completions' text_offset) */
} srv_logprob;

/* Final result of one generation. */
typedef struct srv_result {
    srv_finish finish;
    ds4_dsml_result parsed; /* the one parse (dsml.h): stream and body render it */
    char *text;             /* completions: raw generated text (else NULL) */
    size_t text_len;
    bool think_closed;      /* </think> was generated */
    bool forced_cut;        /* a forced call the budget cut short (srv_forced_cut): finish length */
    bool calls_dropped;     /* parallel calls off: calls after the first were dropped (the live state holds them) */
    const char *stop;       /* the rq->stops string that ended the turn, or NULL */
    srv_logprob *lp;        /* (n_lp) logprobs of the content tokens, if asked */
    int n_lp;
    srv_usage usage;
    char error_msg[512];    /* finish error reason */
} srv_result;

void srv_result_free(srv_result *r);
void srv_logprob_free(srv_logprob *lp, int n);

/* Streaming event sink implemented by each API (api_*.c). The worker calls
 * these from its thread; implementations append SSE bytes to the job's
 * stream and keep their own state in j->api_state (state_size bytes,
 * zeroed, released with state_free). Every callback may be absent (NULL). */
typedef struct srv_job srv_job;
typedef struct srv_emitter {
    size_t state_size;
    void (*state_free)(void *st);
    void (*begin)(srv_job *j);                              /* after prefill */
    void (*reasoning)(srv_job *j, const char *s, size_t n);
    /* content text; lp: logprobs of the tokens that start in it (if asked) */
    void (*content)(srv_job *j, const char *s, size_t n, const srv_logprob *lp, int n_lp);
    void (*tool_begin)(srv_job *j, int index, const char *id, const char *name);
    void (*tool_args)(srv_job *j, int index, const char *s, size_t n);
    void (*tool_end)(srv_job *j, int index);
    /* the reasoning ended and other output follows (before its first event);
     * not called when the reply ends inside the reasoning (finish has it) */
    void (*reasoning_end)(srv_job *j);
    void (*finish)(srv_job *j, const srv_result *r);        /* last event */
    /* Non-streaming body (NUL-terminated, malloc'ed). */
    char *(*body)(srv_job *j, const srv_result *r);
} srv_emitter;

const srv_emitter *srv_emitter_for(srv_api api);

/* ---- SSE byte stream between worker and connection thread (http.c) ------ */

typedef struct srv_stream {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ds4_buf pending;       /* bytes produced, not yet handed to the socket */
    bool headers;          /* worker decided: send SSE headers now */
    bool done;             /* no more bytes will come */
    bool client_gone;      /* connection closed or stalled */
    double last_drain;     /* monotonic seconds of the last drain */
    double last_write;     /* monotonic seconds of the last bytes queued (keepalives) */
} srv_stream;

/* ---- jobs and the worker (worker.c) ------------------------------------- */

typedef enum { SRV_JOB_QUEUED = 0, SRV_JOB_RUNNING, SRV_JOB_DONE } srv_job_state;

struct srv_job {
    srv_request rq;
    uint64_t serial;       /* per-process counter (rng seeding) */
    char id[64];           /* response id: prefix + random hex (restart-unique) */
    int64_t created;       /* unix seconds */
    srv_stream st;
    srv_job_state state;
    /* Set by the worker when done (non-streaming and errors before headers): */
    int status;            /* HTTP status; 200 when the body is a result */
    char *body;            /* malloc'ed response body */
    srv_error err;
    srv_usage usage;       /* known after prefill (Anthropic message_start) */
    int n_tool_started;    /* tool calls announced while streaming */
    void *api_state;       /* the API emitter's stream state */
    srv_job *next;
    int refs;              /* connection thread + worker */
};

/* A job for api with its emitter state allocated (refs 1); freed by
 * srv_job_free (or the last srv_job_release). */
srv_job *srv_job_new(srv_api api);
void srv_job_free(srv_job *j);

typedef struct srv_config {
    const char *model_path;
    const char *mtp_path;
    int mtp_draft;              /* --mtp-draft N (1..4) */
    float mtp_gate;             /* --mtp-gate P */
    ds4_backend_kind backend;
    ds4_engine_opts split;      /* --gpus / --split: only the layer-split fields are used */
    int n_threads;
    int n_ctx;
    int default_tokens;
    const char *host;
    int port;
    bool cors;
    const char *api_key;        /* NULL: no key; never "" (refused at startup) */
    const char **allow_hosts;   /* (n_allow_hosts) --allow-host names beyond the defaults */
    int n_allow_hosts;
    int max_conn_per_client;    /* open connections per client address (0: no cap) */
    int request_timeout_s;      /* headers + body must arrive within this (0: no deadline) */
    const char *trace_path;
    int queue_max;              /* jobs waiting (not counting the running one) */
    const char *kv_disk_dir;
    uint64_t kv_disk_space_mb;
    int kv_min_tokens;
    int kv_cold_max_tokens;
    int kv_continued_interval;
    int kv_boundary_trim;
    int kv_boundary_align;
    bool kv_reject_different_quant;
    bool disable_exact_dsml_replay;
    ds4_think default_think[SRV_N_API]; /* --default-thinking, per API */
    int tool_memory_max_ids;
    int debug_slow_conn_ms;     /* --debug-slow-connection-ms (tests only) */
    const char *debug_reply;    /* --debug-reply TEXT (tests only): every reply is TEXT's tokens */
    float debug_mtp_accept;     /* --debug-mtp-accept P (tests only): MTP drafts accepted with probability P */
} srv_config;

typedef struct srv_server srv_server;
typedef struct srv_http srv_http;

/* Worker lifecycle. srv_worker_start opens nothing itself: the engine is
 * opened by main.c and owned by the server. */
int srv_worker_start(srv_server *s, ds4_err *err);
void srv_worker_stop(srv_server *s);   /* drains, joins */

/* Rendered-chat tokenization into a malloc'ed array (*out, *n). */
int srv_tokenize(ds4_engine *e, const char *text, size_t len, int32_t **out, int *n, ds4_err *err);

/* Parses, renders, tokenizes and enqueues. Returns the job (with one
 * reference for the caller) or NULL with e filled (status 4xx/429/503). */
srv_job *srv_submit(srv_server *s, srv_api api, const char *body, size_t n, srv_error *e);
/* POST /v1/messages/count_tokens (client thread): the prompt tokens the
 * request would have, as {"input_tokens":N}; malloc'ed body, or NULL with
 * e filled. */
char *srv_count_tokens(srv_server *s, const char *body, size_t n, srv_error *e);
void srv_job_release(srv_server *s, srv_job *j);
/* Connection thread: marks the job's client as gone (cancels it). */
void srv_job_cancel(srv_job *j);

/* Stream helpers used by emitters (worker thread). */
void srv_stream_write(srv_job *j, const char *s, size_t n);
void srv_stream_printf(srv_job *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Writes "data: <compact json>\n\n" (and "event: NAME\n" first when name is
 * non-NULL); steals the reference to v. */
void srv_sse_json(srv_job *j, const char *event, json_t *v);
void srv_stream_headers(srv_job *j);
void srv_stream_close(srv_job *j);
double srv_now_mono(void);

/* Error body for status/error (OpenAI or Anthropic shape); malloc'ed. */
char *srv_error_body(srv_api api, const srv_error *e);
/* 400 naming the offending member (OpenAI param); returns -1. */
int srv_fail_param(srv_error *e, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Response JSON helpers shared by the emitters. */
/* JSON string from bytes; invalid UTF-8 sequences become U+FFFD, so model
 * output of any kind serializes (NULL s gives ""). New reference. */
json_t *srv_jstr(const char *s, size_t n);
/* The next character of u[0..n) as srv_jstr sends it: the length of a valid
 * UTF-8 character, or of the maximal invalid subpart it sends as one U+FFFD
 * (*cut: that subpart is a character cut short by n, which more bytes may
 * complete). n >= 1. */
size_t srv_utf8_unit(const unsigned char *u, size_t n, bool *cut);
/* The undecoded text of parameter `param` of call k of a raw DSML block (the
 * model's bytes; the parser entity-decodes string values), or NULL when not
 * found. malloc'ed. */
char *srv_raw_param(const char *raw, size_t n, int k, const char *param);
/* Whether assistant message m carries the calls calls[0..n) of a sampled
 * turn (raw: its DSML block, may be NULL) as the client received them: the
 * same names in order and the same arguments as JSON values (member order,
 * spacing, escapes and the spelling of numbers aside; the block's text read
 * with invalid UTF-8 as U+FFFD), or for a custom tool's `input` the model's
 * undecoded text (the Responses custom_tool_call input). */
bool srv_calls_match(const ds4_chat_msg *m, const ds4_tool_call *calls, int n, const char *raw, size_t raw_len);
/* Parses JSON text produced by the server from model output (compact tool
 * arguments), repairing invalid UTF-8 to U+FFFD first; NULL if it is not
 * JSON. New reference. */
json_t *srv_json_value(const char *text);
/* The same; *widened (may be NULL) says whether an integer beyond 64 bits
 * had to be read as a real (srv_json_loadb). */
json_t *srv_json_value_w(const char *text, bool *widened);
/* json_loadb for text whose integers may exceed 64 bits (JSON sets no
 * range; jansson refuses them): such integers are read as reals, as B.4
 * reads every number, and *widened (may be NULL) says so. */
json_t *srv_json_loadb(const char *buf, size_t n, size_t flags, bool *widened);
/* Loads body as one JSON object, or NULL with e = 400 invalid JSON request. */
json_t *srv_load_object(const char *body, size_t n, srv_error *e);
/* Client form of a call's internal arguments (B.6); malloc'ed. */
char *srv_args_compact(const ds4_tool_call *c);
extern const srv_emitter srv_emitter_chat, srv_emitter_completions, srv_emitter_responses,
    srv_emitter_anthropic;
json_t *srv_usage_openai(const srv_usage *u);
const char *srv_finish_openai(srv_finish f);
/* JSON string of logprob bytes (invalid UTF-8 replaced), and the byte list. */
json_t *srv_lp_bytes(const srv_token_lp *t);
/* Fresh random hex id: prefix + 2*n_bytes hex chars. */
void srv_random_id(char *out, size_t cap, const char *prefix, int n_bytes);

/* ---- the server object -------------------------------------------------- */

struct srv_server {
    srv_config cfg;
    ds4_engine *engine;
    ds4_session *session;
    struct srv_http *http;  /* HTTP daemon and connection accounting (http.c) */
    /* queue */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    srv_job *head, *tail;
    int n_queued;
    bool stopping;
    pthread_t worker;
    bool worker_started;
    uint64_t serial;
    /* cache policy state (worker thread only) */
    struct srv_cache *cache;
    struct ds4_sampler *sampler;  /* worker thread only */
    int32_t *debug_tokens;        /* (n_debug_tokens) --debug-reply's tokens, else NULL */
    int n_debug_tokens;
    double *lp_scratch;           /* (n_vocab) logprobs of a step; worker thread only */
    float *adj_scratch;           /* (n_vocab) logits after logit_bias and penalties; worker thread only */
    ds4_dsml_replay *replay;      /* exact DSML replay map (TEXT C.8), under replay_mu */
    pthread_mutex_t replay_mu;
    FILE *trace;
    pthread_mutex_t trace_mu;
    bool trace_failing;    /* the last --trace write failed (logged once per failing run) */
    _Atomic int shutdown_flag;    /* set by the main thread, read by the worker */
    volatile int exit_code;     /* the process's status after shutdown (1: a worker rank was lost) */
};

/* HTTP (http.c), main thread only. srv_http_listen binds the listening
 * socket (before the model loads, so a busy port fails at once: "address in
 * use"); srv_http_start starts the daemon on it. Both return 0 or a negative
 * code with err set. srv_http_stop closes the listener, lets the open
 * requests finish writing (bounded, see http.c), then stops the daemon; a
 * no-op when nothing was started. */
int srv_http_listen(srv_server *s, ds4_err *err);
int srv_http_start(srv_server *s, ds4_err *err);
void srv_http_stop(srv_server *s);

/* Logging to stderr with the "MMDD HH:MM:SS" prefix (thread-safe). */
void srv_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Forced tool calls (forced.c), worker thread only. srv_forced_new returns
 * NULL when the request does not force a call. */
typedef struct srv_forced srv_forced;
struct ds4_sampler_params;
struct ds4_rng;
srv_forced *srv_forced_new(ds4_engine *e, const srv_request *rq, bool thinking);
void srv_forced_free(srv_forced *f);
bool srv_forced_done(const srv_forced *f);
/* the budget shaped the call: a value, a number or the choice of properties cut short */
bool srv_forced_cut(const srv_forced *f);
/* Next token under the constraint (remaining = tokens left in the budget);
 * -1 when no token fits. */
int32_t srv_forced_pick(srv_forced *f, struct ds4_sampler *smp, const float *logits,
                        const struct ds4_sampler_params *p, struct ds4_rng *rng, int remaining);
/* Bytes of the token just evaluated. */
void srv_forced_feed(srv_forced *f, const char *bytes, size_t n);

/* JSON replies by constrained decoding (jsonc.c, docs/SERVING.md B.13).
 * srv_jsonc_compile checks and compiles a JSON schema (NULL: any object,
 * json_object mode); NULL with msg set when the schema cannot be served. */
typedef struct srv_jsonc_schema srv_jsonc_schema;
srv_jsonc_schema *srv_jsonc_compile(json_t *schema, char *msg, size_t cap);
void srv_jsonc_schema_free(srv_jsonc_schema *s);
/* What the matcher needs of the vocabulary: the bytes a token adds to the
 * reply and whether it is a control token (never JSON text). */
typedef struct srv_jsonc_vocab {
    int n_vocab;
    int32_t eos, dsml;     /* EOS; the DSML marker token (-1: none) */
    const char *(*bytes)(void *user, int32_t id, size_t *n);
    bool (*control)(void *user, int32_t id);
    void *user;
} srv_jsonc_vocab;
/* One reply's constraint (takes the schema); tool_alt: the reply may open
 * a tool-call block instead (tools with tool_choice auto). NULL: no memory. */
typedef struct srv_jsonc srv_jsonc;
srv_jsonc *srv_jsonc_new(srv_jsonc_schema *schema, bool tool_alt, const srv_jsonc_vocab *v);
void srv_jsonc_free(srv_jsonc *j);
/* False once a tool-call block opened (the rest of the turn is free). */
bool srv_jsonc_active(const srv_jsonc *j);
/* The value is complete: the reply must end (EOS). */
bool srv_jsonc_must_end(const srv_jsonc *j);
/* Whether tok may come next. */
bool srv_jsonc_allows(srv_jsonc *j, int32_t tok);
/* Next token: the sampler's (or the argmax) if allowed, else the sampler on
 * the allowed tokens' logits; -1 when none is allowed. refused: the plain
 * draw was made with rng already and refused (MTP), so only the second. */
int32_t srv_jsonc_pick(srv_jsonc *j, struct ds4_sampler *smp, const float *logits,
                       const struct ds4_sampler_params *p, struct ds4_rng *rng, bool refused);
/* The token that was appended. */
void srv_jsonc_feed(srv_jsonc *j, int32_t tok);
/* The same for text that is not a whole token (an assistant prefill, the
 * bytes after a "</think>" written as text): whether it may come next, and
 * feeding it (false when refused). */
bool srv_jsonc_allows_text(srv_jsonc *j, const char *b, size_t n);
bool srv_jsonc_feed_text(srv_jsonc *j, const char *b, size_t n);
/* Whether text is the start of a value of the schema. */
bool srv_jsonc_schema_prefix(const srv_jsonc_schema *s, const char *b, size_t n);

/* Cache policy (cache_policy.c), worker thread only. */
struct srv_cache;
int srv_cache_open(srv_server *s, ds4_err *err);
void srv_cache_close(srv_server *s);
/* Decides the effective prompt for rq and brings the session to it.
 * Returns 0 with *cached = K and *n_prompt = P, a negative code, or
 * SRV_CACHE_CONFLICT when the request requires the live tool binding and it
 * no longer matches (C.2 rule 4: the caller answers 409). */
#define SRV_CACHE_CONFLICT 1
int srv_cache_prepare(srv_server *s, srv_job *j, int *cached, int *n_prompt,
                      ds4_progress_fn progress, void *pu, ds4_err *err);
/* Called before each decode step (continued saves). */
void srv_cache_step(srv_server *s, bool in_tool_call);
/* Live protocol bindings (docs/SERVING.md C.3): after a turn, the text a client
 * replaying only what it saw will render next, bound to the live position.
 * Kinds: */
enum { SRV_BIND_NONE = 0, SRV_BIND_THINKING, SRV_BIND_RESPONSES };
/* Which binding a finished turn sets (SRV_BIND_NONE when none applies). */
int srv_binding_kind(const srv_request *rq, const srv_result *r, int n_ctx, bool stop_hit);
/* The visible text of that binding (malloc'ed, *len set); pure:
 *   thinking:  prompt text without its final "<think>" + "</think>" +
 *              content + EOS (old reasoning is dropped by the renderer);
 *   responses: prompt text + [reasoning if the client opted in and the turn
 *              had calls] + ["</think>" in thinking mode] + content +
 *              exact DSML block + EOS. */
char *srv_visible_text(const srv_request *rq, const srv_result *r, int kind, int n_ctx,
                       size_t *len);
/* Client thread, before rendering: loads from the disk cache's tool-map
 * trailers the exact DSML of replayed call ids the memory map lacks
 * (docs/SERVING.md C.4 "Tool-memory restore from disk"). */
void srv_cache_restore_tool_memory(srv_server *s, const srv_request *rq);
/* Client thread: true if id is a call id of the live tool binding of api
 * (Responses or Anthropic turn with tool calls, C.3). Thread-safe. */
bool srv_cache_live_call(srv_server *s, srv_api api, const char *id);
/* Records the binding of a finished turn (worker thread). */
void srv_cache_bind(srv_server *s, srv_job *j, const srv_result *r, bool stop_hit);
/* Stop-sequence cut etc.: the live session is no longer trusted. */
void srv_cache_invalidate(srv_server *s);
/* Clean shutdown save. */
void srv_cache_shutdown(srv_server *s);

#endif
