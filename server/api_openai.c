/* api_openai.c - OpenAI Chat Completions and legacy Completions: request
 * parsing (SERVING.md B.4) and response/stream shapes (B.6, B.8).
 *
 * Parsing maps the wire JSON to a ds4_chat (chat) or a prompt string
 * (completions) and nothing else; rendering and generation are elsewhere.
 * The emitters run on the worker thread and only append SSE bytes to the
 * job's stream; key order of every object follows the spec examples.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"
#include "util/xalloc.h"

/* Loads the body as one JSON object. */
json_t *srv_load_object(const char *body, size_t n, srv_error *e) {
    json_error_t je;
    json_t *root = json_loadb(body, n, 0, &je);
    if (!root) {
        srv_invalid(e);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        srv_invalid(e);
        return NULL;
    }
    return root;
}

/* OpenAI tool_choice: "none" disables tools, "required" or a named function
 * forces a call; anything else (auto, unknown) is auto. */
static int parse_tool_choice_openai(json_t *tc, srv_request *rq, srv_error *e) {
    if (!tc || json_is_null(tc)) return 0;
    if (json_is_string(tc)) {
        const char *s = json_string_value(tc);
        if (!strcmp(s, "none")) rq->tool_choice = SRV_TOOL_NONE;
        else if (!strcmp(s, "required")) rq->tool_choice = SRV_TOOL_REQUIRED;
        return 0;
    }
    if (!json_is_object(tc)) return srv_invalid(e);
    json_t *fn = json_object_get(tc, "function");
    const char *name = json_string_value(json_object_get(fn, "name"));
    if (!name) name = json_string_value(json_object_get(tc, "name"));
    if (name) {
        rq->tool_choice = SRV_TOOL_NAMED;
        rq->tool_choice_name = xstrdup(name);
    }
    return 0;
}

/* One OpenAI message (B.4 "OpenAI chat messages"). */
static int parse_chat_message(json_t *m, srv_request *rq, srv_error *e) {
    if (!json_is_object(m)) return srv_invalid(e);
    char *role = NULL, *content = NULL, *reasoning = NULL, *tcid = NULL;
    int rc = -1;
    if (srv_get_string(m, "role", &role, e)) goto out;
    if (srv_text_of(json_object_get(m, "content"), NULL, &content, e)) goto out;
    json_t *rc_v = json_object_get(m, "reasoning_content");
    if (rc_v && !json_is_null(rc_v) && srv_text_of(rc_v, NULL, &reasoning, e)) goto out;
    if (srv_get_string(m, "tool_call_id", &tcid, e)) goto out;
    int i = srv_chat_add(rq, ds4_chat_role_from_name(role ? role : "user"), content, e);
    if (i < 0) goto out;
    ds4_err err;
    if (reasoning && reasoning[0] &&
        ds4_chat_add_reasoning(rq->chat, i, reasoning, strlen(reasoning), &err) < 0) {
        srv_fail(e, 500, "%s", err.msg);
        goto out;
    }
    if (tcid && ds4_chat_set_tool_call_id(rq->chat, i, tcid, &err) < 0) {
        srv_fail(e, 500, "%s", err.msg);
        goto out;
    }
    json_t *calls = json_object_get(m, "tool_calls");
    if (calls && !json_is_null(calls)) {
        if (!json_is_array(calls)) {
            srv_invalid(e);
            goto out;
        }
        size_t k;
        json_t *c;
        json_array_foreach(calls, k, c) {
            json_t *fn = json_object_get(c, "function");
            const char *name = json_string_value(json_object_get(fn, "name"));
            json_t *args = json_object_get(fn, "arguments");
            if (!name || !args) continue; /* dropped (B.4) */
            char *atext = json_is_string(args) ? xstrdup(json_string_value(args)) : srv_json_text(args);
            const char *id = json_string_value(json_object_get(c, "id"));
            int r = ds4_chat_add_call(rq->chat, i, id, name, atext, strlen(atext), &err);
            free(atext);
            if (r < 0) {
                srv_fail(e, 500, "%s", err.msg);
                goto out;
            }
        }
    }
    rc = 0;
out:
    free(role);
    free(content);
    free(reasoning);
    free(tcid);
    return rc;
}

static int parse_effort_field(json_t *root, const char *key, const char **out, srv_error *e) {
    json_t *v = json_object_get(root, key);
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return srv_invalid(e);
    *out = json_string_value(v);
    return 0;
}

int srv_parse_chat(const char *body, size_t n, srv_request *rq, srv_error *e) {
    srv_request_init(rq, SRV_API_CHAT);
    json_t *root = srv_load_object(body, n, e);
    if (!root) return -1;
    int rc = -1;
    const char *effort;
    rq->chat = ds4_chat_new();
    if (!rq->chat) {
        srv_fail(e, 500, "out of memory");
        goto out;
    }
    if (srv_parse_sampling(root, rq, e)) goto out;
    if (parse_effort_field(root, "reasoning_effort", &effort, e)) goto out;
    if (srv_parse_thinking(root, rq, effort, effort != NULL, e)) goto out;
    if (srv_parse_messages(root, rq, e, parse_chat_message)) goto out;
    if (srv_parse_tools(json_object_get(root, "tools"), rq, e)) goto out;
    if (parse_tool_choice_openai(json_object_get(root, "tool_choice"), rq, e)) goto out;
    rc = 0;
out:
    json_decref(root);
    return rc;
}

int srv_parse_completions(const char *body, size_t n, srv_request *rq, srv_error *e) {
    srv_request_init(rq, SRV_API_COMPLETIONS);
    json_t *root = srv_load_object(body, n, e);
    if (!root) return -1;
    int rc = -1;
    const char *effort;
    if (srv_parse_sampling(root, rq, e)) goto out;
    if (parse_effort_field(root, "reasoning_effort", &effort, e)) goto out;
    if (srv_parse_thinking(root, rq, effort, effort != NULL, e)) goto out;
    json_t *p = json_object_get(root, "prompt");
    if (!p || json_is_null(p)) {
        srv_fail(e, 400, "missing prompt");
        goto out;
    }
    /* a string; an array whose first element is a string; else empty */
    if (json_is_string(p)) rq->prompt = xstrdup(json_string_value(p));
    else if (json_is_array(p) && json_is_string(json_array_get(p, 0)))
        rq->prompt = xstrdup(json_string_value(json_array_get(p, 0)));
    else rq->prompt = xstrdup("");
    rc = 0;
out:
    json_decref(root);
    return rc;
}

/* ---- responses ------------------------------------------------------------ */

/* Compact client form of internal arguments (B.6). */
char *srv_args_compact(const ds4_tool_call *c) {
    ds4_buf b = DS4_BUF_INIT;
    ds4_dsml_args_compact(&b, c->arguments ? c->arguments : "{}",
                          c->arguments ? c->arguments_len : 2);
    char *s = ds4_buf_detach(&b, NULL);
    return s ? s : xstrdup("{}");
}

static json_t *chat_calls_json(const srv_result *r) {
    json_t *arr = json_array();
    for (int i = 0; i < r->parsed.n_calls; i++) {
        const ds4_tool_call *c = &r->parsed.calls[i];
        char *args = srv_args_compact(c);
        json_array_append_new(arr, json_pack("{s:s, s:s, s:{s:o, s:o}}", "id", c->id ? c->id : "",
                                             "type", "function", "function", "name",
                                             srv_jstr(c->name, strlen(c->name)), "arguments",
                                             srv_jstr(args, strlen(args))));
        free(args);
    }
    return arr;
}

static char *chat_body(srv_job *j, const srv_result *r) {
    json_t *msg = json_pack("{s:s, s:o}", "role", "assistant", "content",
                            srv_jstr(r->parsed.content, r->parsed.content_len));
    if (r->parsed.reasoning && r->parsed.reasoning_len)
        json_object_set_new(msg, "reasoning_content",
                            srv_jstr(r->parsed.reasoning, r->parsed.reasoning_len));
    if (r->parsed.n_calls) json_object_set_new(msg, "tool_calls", chat_calls_json(r));
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[{s:i, s:o, s:s}], s:o}", "id", j->id,
                             "object", "chat.completion", "created", (json_int_t)j->created,
                             "model", j->rq.model, "choices", "index", 0, "message", msg,
                             "finish_reason", srv_finish_openai(r->finish), "usage",
                             srv_usage_openai(&r->usage));
    char *s = srv_json_text(root);
    json_decref(root);
    return s;
}

/* One chat.completion.chunk with the given delta (stolen) and finish. */
static void chat_chunk(srv_job *j, json_t *delta, const char *finish) {
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[{s:i, s:o, s:o}]}", "id", j->id, "object",
                             "chat.completion.chunk", "created", (json_int_t)j->created, "model",
                             j->rq.model, "choices", "index", 0, "delta", delta, "finish_reason",
                             finish ? json_string(finish) : json_null());
    srv_sse_json(j, NULL, root);
}

static void chat_begin(srv_job *j) { chat_chunk(j, json_pack("{s:s}", "role", "assistant"), NULL); }

static void chat_reasoning(srv_job *j, const char *s, size_t n) {
    chat_chunk(j, json_pack("{s:o}", "reasoning_content", srv_jstr(s, n)), NULL);
}

static void chat_content(srv_job *j, const char *s, size_t n) {
    chat_chunk(j, json_pack("{s:o}", "content", srv_jstr(s, n)), NULL);
}

static void chat_tool_begin(srv_job *j, int index, const char *id, const char *name) {
    chat_chunk(j,
               json_pack("{s:[{s:i, s:s, s:s, s:{s:o, s:s}}]}", "tool_calls", "index", index, "id",
                         id, "type", "function", "function", "name", srv_jstr(name, strlen(name)),
                         "arguments", ""),
               NULL);
}

static void chat_tool_args(srv_job *j, int index, const char *s, size_t n) {
    chat_chunk(j,
               json_pack("{s:[{s:i, s:{s:o}}]}", "tool_calls", "index", index, "function",
                         "arguments", srv_jstr(s, n)),
               NULL);
}

static void chat_finish(srv_job *j, const srv_result *r) {
    /* Calls that were never streamed live go out in one delta (B.8). */
    if (j->n_tool_started == 0 && r->parsed.n_calls) {
        json_t *calls = chat_calls_json(r);
        size_t i;
        json_t *c;
        json_array_foreach(calls, i, c) json_object_set_new(c, "index", json_integer((json_int_t)i));
        chat_chunk(j, json_pack("{s:o}", "tool_calls", calls), NULL);
    }
    chat_chunk(j, json_object(), srv_finish_openai(r->finish));
    if (j->rq.include_usage) {
        json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[], s:o}", "id", j->id, "object",
                                 "chat.completion.chunk", "created", (json_int_t)j->created,
                                 "model", j->rq.model, "choices", "usage",
                                 srv_usage_openai(&r->usage));
        srv_sse_json(j, NULL, root);
    }
    srv_stream_write(j, "data: [DONE]\n\n", 14);
}

static char *completion_body(srv_job *j, const srv_result *r) {
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[{s:o, s:i, s:s}], s:o}", "id", j->id,
                             "object", "text_completion", "created", (json_int_t)j->created,
                             "model", j->rq.model, "choices", "text", srv_jstr(r->text, r->text_len),
                             "index", 0, "finish_reason",
                             srv_finish_openai(r->finish), "usage", srv_usage_openai(&r->usage));
    char *s = srv_json_text(root);
    json_decref(root);
    return s;
}

static void completion_chunk(srv_job *j, const char *s, size_t n, const char *finish) {
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[{s:o, s:i, s:o}]}", "id", j->id, "object",
                             "text_completion", "created", (json_int_t)j->created, "model",
                             j->rq.model, "choices", "text", srv_jstr(s, n), "index", 0, "finish_reason",
                             finish ? json_string(finish) : json_null());
    srv_sse_json(j, NULL, root);
}

static void completion_text(srv_job *j, const char *s, size_t n) { completion_chunk(j, s, n, NULL); }

static void completion_finish(srv_job *j, const srv_result *r) {
    completion_chunk(j, "", 0, srv_finish_openai(r->finish));
    if (j->rq.include_usage) {
        json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[], s:o}", "id", j->id, "object",
                                 "text_completion", "created", (json_int_t)j->created, "model",
                                 j->rq.model, "choices", "usage", srv_usage_openai(&r->usage));
        srv_sse_json(j, NULL, root);
    }
    srv_stream_write(j, "data: [DONE]\n\n", 14);
}

const srv_emitter srv_emitter_chat = {
    .begin = chat_begin,
    .reasoning = chat_reasoning,
    .content = chat_content,
    .tool_begin = chat_tool_begin,
    .tool_args = chat_tool_args,
    .finish = chat_finish,
    .body = chat_body,
};

const srv_emitter srv_emitter_completions = {
    .content = completion_text,
    .finish = completion_finish,
    .body = completion_body,
};
