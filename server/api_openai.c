/* api_openai.c - OpenAI Chat Completions and legacy Completions: request
 * parsing (docs/SERVING.md B.4) and response/stream shapes (B.6, B.8).
 *
 * Parsing maps the wire JSON to a ds4_chat (chat) or a prompt string
 * (completions) and nothing else; rendering and generation are elsewhere.
 * The emitters run on the worker thread and only append SSE bytes to the
 * job's stream; key order of every object follows the spec examples.
 *
 * Members the OpenAI API reference marks required are always written:
 * choices[].logprobs (null unless asked), message.refusal (null), and in
 * chunks delta/logprobs/finish_reason. Logprobs are real when asked: chat
 * logprobs/top_logprobs, completions logprobs N (the tokens whose bytes
 * start in the content, docs/server.md "Logprobs").
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"
#include "util/xalloc.h"

/* OpenAI tool_choice: "none" disables tools, "required" or a named function
 * forces a call; anything else (auto, unknown) is auto. */
static int parse_tool_choice_openai(json_t *tc, srv_request *rq, srv_error *e) {
    if (!tc || json_is_null(tc)) return 0;
    if (json_is_string(tc)) {
        const char *s = json_string_value(tc);
        if (!strcmp(s, "none")) rq->tool_choice = SRV_TOOL_NONE;
        else if (!strcmp(s, "required")) rq->tool_choice = SRV_TOOL_REQUIRED;
        else if (strcmp(s, "auto"))
            return srv_fail_param(e, "tool_choice", "invalid_value",
                                  "tool_choice: '%.64s' is not none, auto, required or a named function", s);
        if (rq->tool_choice == SRV_TOOL_REQUIRED && !(rq->tools_text && rq->tools_text[0]))
            return srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice 'required' needs tools");
        return 0;
    }
    if (!json_is_object(tc)) return srv_invalid(e);
    const char *type = json_string_value(json_object_get(tc, "type"));
    if (type && !strcmp(type, "allowed_tools")) { /* the tools were filtered (srv_parse_chat) */
        const char *mode = json_string_value(json_object_get(json_object_get(tc, "allowed_tools"), "mode"));
        if (mode && !strcmp(mode, "required")) rq->tool_choice = SRV_TOOL_REQUIRED;
        else if (mode && strcmp(mode, "auto"))
            return srv_fail_param(e, "tool_choice", "invalid_value",
                                  "tool_choice allowed_tools mode must be auto or required");
        return 0;
    }
    if (type && strcmp(type, "function"))
        return srv_fail_param(e, "tool_choice", "invalid_value",
                              "tool_choice type '%.64s' is not supported here (function or allowed_tools)", type);
    json_t *fn = json_object_get(tc, "function");
    const char *name = json_string_value(json_object_get(fn, "name"));
    if (!name) name = json_string_value(json_object_get(tc, "name"));
    if (!name) /* it silently became auto */
        return srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice function needs a name");
    rq->tool_choice = SRV_TOOL_NAMED;
    rq->tool_choice_name = xstrdup(name);
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
    if (role && ds4_chat_role_from_name(role) == DS4_ROLE_OTHER) {
        srv_fail_param(e, "messages", "invalid_value",
                       "messages: unknown role '%.64s' (system, developer, user, assistant, tool or function)", role);
        goto out;
    }
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

/* reasoning_effort and the thinking controls (B.5). */
static int parse_effort_and_thinking(json_t *root, srv_request *rq, srv_error *e) {
    json_t *v = json_object_get(root, "reasoning_effort");
    const char *effort = NULL;
    if (v && !json_is_null(v)) {
        if (!json_is_string(v)) return srv_invalid(e);
        effort = json_string_value(v);
    }
    return srv_parse_thinking(root, rq, effort, effort != NULL, e);
}

/* OpenAI options ds4 does not implement: a clear 400 rather than a reply
 * that silently ignores them (defaults and no-op values pass). */
static int refuse_unsupported(json_t *root, srv_api api, srv_error *e) {
    json_t *v;
    /* the legacy function-calling fields: the model would see no tools */
    const char *legacy[] = {"functions", "function_call"};
    for (int i = 0; i < 2; i++)
        if ((v = json_object_get(root, legacy[i])) && !json_is_null(v))
            return srv_fail_param(e, legacy[i], "unsupported_parameter",
                                  "%s is not supported: use tools and tool_choice", legacy[i]);
    if (api != SRV_API_CHAT && (v = json_object_get(root, "response_format")) && !json_is_null(v)) {
        const char *t = json_string_value(json_object_get(v, "type"));
        if (!json_is_object(v) || !t || strcmp(t, "text"))
            return srv_fail_param(e, "response_format", "unsupported_value",
                                  "response_format: only {\"type\": \"text\"} is supported on /v1/completions");
    }
    if (api == SRV_API_COMPLETIONS) {
        if ((v = json_object_get(root, "echo")) && json_is_true(v))
            return srv_fail_param(e, "echo", "unsupported_value", "echo is not supported");
        if ((v = json_object_get(root, "suffix")) && !json_is_null(v) &&
            !(json_is_string(v) && !json_string_length(v)))
            return srv_fail_param(e, "suffix", "unsupported_value", "suffix is not supported");
        if ((v = json_object_get(root, "best_of")) && !json_is_null(v) &&
            !(json_is_integer(v) && json_integer_value(v) == 1))
            return srv_fail_param(e, "best_of", "unsupported_value", "best_of is not supported (only 1)");
    }
    return 0;
}

int srv_parse_chat(json_t *root, srv_request *rq, srv_error *e) {
    if (refuse_unsupported(root, SRV_API_CHAT, e)) return -1;
    if (parse_effort_and_thinking(root, rq, e)) return -1;
    if (srv_parse_messages(root, rq, e, parse_chat_message)) return -1;
    /* a tool message answers a call of an earlier assistant message (as
     * OpenAI checks); an unanswerable one is a client bug, not text */
    for (int i = 0; i < rq->chat->n_msgs; i++) {
        const ds4_chat_msg *m = &rq->chat->msgs[i];
        if (m->role != DS4_ROLE_TOOL) continue;
        bool found = false;
        for (int k = 0; k < i && !found && m->tool_call_id; k++) {
            const ds4_chat_msg *a = &rq->chat->msgs[k];
            for (int c = 0; a->role == DS4_ROLE_ASSISTANT && c < a->n_calls && !found; c++)
                found = a->calls[c].id && !strcmp(a->calls[c].id, m->tool_call_id);
        }
        if (!found)
            return srv_fail_param(e, "messages", "invalid_value",
                                  "messages[%d]: a 'tool' message must answer a tool call of an earlier assistant "
                                  "message (tool_call_id '%.64s' matches none)", i,
                                  m->tool_call_id ? m->tool_call_id : "");
    }
    json_t *tools = json_object_get(root, "tools"), *tc = json_object_get(root, "tool_choice");
    const char *tct = json_string_value(json_object_get(tc, "type"));
    if (tct && !strcmp(tct, "allowed_tools")) {
        /* the model sees only the allowed tools */
        json_t *allowed = json_object_get(json_object_get(tc, "allowed_tools"), "tools");
        if (!json_is_array(tools))
            return srv_fail_param(e, "tools", "invalid_value", "tool_choice allowed_tools needs tools in the request");
        if (!json_is_array(allowed))
            return srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice allowed_tools needs a tools list");
        json_t *kept = srv_filter_tools(tools, allowed);
        int bad = !json_array_size(kept)
                      ? srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice allowed_tools names none of the tools")
                      : srv_parse_tools(kept, rq, e);
        json_decref(kept);
        if (bad) return -1;
    } else if (srv_parse_tools(tools, rq, e)) {
        return -1;
    }
    json_t *ptc = json_object_get(root, "parallel_tool_calls");
    if (ptc && !json_is_null(ptc) && !json_is_boolean(ptc)) return srv_invalid(e);
    rq->single_call = json_is_false(ptc);
    if (parse_tool_choice_openai(tc, rq, e)) return -1;
    return srv_parse_json_format(json_object_get(root, "response_format"), true, rq, "response_format", e);
}

int srv_parse_completions(json_t *root, srv_request *rq, srv_error *e) {
    if (refuse_unsupported(root, SRV_API_COMPLETIONS, e)) return -1;
    if (parse_effort_and_thinking(root, rq, e)) return -1;
    json_t *p = json_object_get(root, "prompt");
    if (!p || json_is_null(p)) return srv_fail_param(e, "prompt", NULL, "missing prompt");
    /* a string, or an array of one string; token-id prompts and several
     * prompts (one choice each) are a 400, never a silently dropped input */
    if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0))) p = json_array_get(p, 0);
    if (json_is_string(p)) {
        rq->prompt = xstrdup(json_string_value(p));
        return 0;
    }
    if (json_is_array(p) && json_array_size(p) > 1 && json_is_string(json_array_get(p, 0)))
        return srv_fail_param(e, "prompt", "unsupported_value",
                              "one prompt per request (send several requests instead)");
    return srv_fail_param(e, "prompt", "unsupported_value", "prompt must be a string (token-id prompts are not supported)");
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

/* Chat logprobs object {"content":[...],"refusal":null} for lp[0..n). */
static json_t *chat_logprobs(const srv_logprob *lp, int n) {
    json_t *content = json_array();
    for (int i = 0; i < n; i++) {
        json_t *top = json_array();
        for (int k = 0; k < lp[i].n_top; k++)
            json_array_append_new(top, json_pack("{s:o, s:f, s:o}", "token",
                                                 srv_jstr(lp[i].top[k].bytes, lp[i].top[k].n),
                                                 "logprob", (double)lp[i].top[k].logprob, "bytes",
                                                 srv_lp_bytes(&lp[i].top[k])));
        json_array_append_new(content, json_pack("{s:o, s:f, s:o, s:o}", "token",
                                                 srv_jstr(lp[i].tok.bytes, lp[i].tok.n), "logprob",
                                                 (double)lp[i].tok.logprob, "bytes",
                                                 srv_lp_bytes(&lp[i].tok), "top_logprobs", top));
    }
    return json_pack("{s:o, s:n}", "content", content, "refusal");
}

/* Completions logprobs object over lp[0..n): parallel arrays, top
 * alternatives as {token: logprob} maps, offsets into the text in
 * characters (as OpenAI's, which clients use to slice their strings). */
static json_t *completion_logprobs(const srv_logprob *lp, int n, size_t base) {
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    for (int i = 0; i < n; i++) {
        json_array_append_new(tokens, srv_jstr(lp[i].tok.bytes, lp[i].tok.n));
        json_array_append_new(lps, json_real(lp[i].tok.logprob));
        json_t *m = json_object();
        for (int k = 0; k < lp[i].n_top; k++) {
            json_t *key = srv_jstr(lp[i].top[k].bytes, lp[i].top[k].n);
            json_object_set_new(m, json_string_value(key), json_real(lp[i].top[k].logprob));
            json_decref(key);
        }
        json_array_append_new(tops, m);
        json_array_append_new(offs, json_integer((json_int_t)(lp[i].at_char - base)));
    }
    return json_pack("{s:o, s:o, s:o, s:o}", "tokens", tokens, "token_logprobs", lps,
                     "top_logprobs", tops, "text_offset", offs);
}

static char *chat_body(srv_job *j, const srv_result *r) {
    /* a reply of calls only has no content (null, as OpenAI answers) */
    json_t *msg = json_pack("{s:s, s:o, s:n}", "role", "assistant", "content",
                            r->parsed.n_calls && !r->parsed.content_len
                                ? json_null()
                                : srv_jstr(r->parsed.content, r->parsed.content_len),
                            "refusal");
    if (r->parsed.reasoning && r->parsed.reasoning_len)
        json_object_set_new(msg, "reasoning_content",
                            srv_jstr(r->parsed.reasoning, r->parsed.reasoning_len));
    if (r->parsed.n_calls) json_object_set_new(msg, "tool_calls", chat_calls_json(r));
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[{s:i, s:o, s:o, s:s}], s:o}", "id", j->id,
                             "object", "chat.completion", "created", (json_int_t)j->created,
                             "model", j->rq.model, "choices", "index", 0, "message", msg,
                             "logprobs", j->rq.logprobs ? chat_logprobs(r->lp, r->n_lp) : json_null(),
                             "finish_reason", srv_finish_openai(r->finish), "usage",
                             srv_usage_openai(&r->usage));
    char *s = srv_json_text(root);
    json_decref(root);
    return s;
}

/* One chat.completion.chunk with the given delta and logprobs (stolen; NULL
 * logprobs is written as null) and finish. */
static void chat_chunk(srv_job *j, json_t *delta, json_t *logprobs, const char *finish) {
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[{s:i, s:o, s:o, s:o}]}", "id", j->id,
                             "object", "chat.completion.chunk", "created", (json_int_t)j->created,
                             "model", j->rq.model, "choices", "index", 0, "delta", delta,
                             "logprobs", logprobs ? logprobs : json_null(), "finish_reason",
                             finish ? json_string(finish) : json_null());
    srv_sse_json(j, NULL, root);
}

static void chat_begin(srv_job *j) {
    chat_chunk(j, json_pack("{s:s, s:s, s:n}", "role", "assistant", "content", "", "refusal"), NULL,
               NULL);
}

static void chat_reasoning(srv_job *j, const char *s, size_t n) {
    chat_chunk(j, json_pack("{s:o}", "reasoning_content", srv_jstr(s, n)), NULL, NULL);
}

static void chat_content(srv_job *j, const char *s, size_t n, const srv_logprob *lp, int n_lp) {
    chat_chunk(j, json_pack("{s:o}", "content", srv_jstr(s, n)),
               j->rq.logprobs ? chat_logprobs(lp, n_lp) : NULL, NULL);
}

static void chat_tool_begin(srv_job *j, int index, const char *id, const char *name) {
    chat_chunk(j,
               json_pack("{s:[{s:i, s:s, s:s, s:{s:o, s:s}}]}", "tool_calls", "index", index, "id",
                         id, "type", "function", "function", "name", srv_jstr(name, strlen(name)),
                         "arguments", ""),
               NULL, NULL);
}

static void chat_tool_args(srv_job *j, int index, const char *s, size_t n) {
    chat_chunk(j,
               json_pack("{s:[{s:i, s:{s:o}}]}", "tool_calls", "index", index, "function",
                         "arguments", srv_jstr(s, n)),
               NULL, NULL);
}

static void usage_chunk(srv_job *j, const char *object, const srv_result *r) {
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[], s:o}", "id", j->id, "object", object,
                             "created", (json_int_t)j->created, "model", j->rq.model, "choices",
                             "usage", srv_usage_openai(&r->usage));
    srv_sse_json(j, NULL, root);
}

static void chat_finish(srv_job *j, const srv_result *r) {
    /* Calls that were never streamed live go out in one delta (B.8). */
    if (j->n_tool_started == 0 && r->parsed.n_calls) {
        json_t *calls = chat_calls_json(r);
        size_t i;
        json_t *c;
        json_array_foreach(calls, i, c) json_object_set_new(c, "index", json_integer((json_int_t)i));
        chat_chunk(j, json_pack("{s:o}", "tool_calls", calls), NULL, NULL);
    }
    chat_chunk(j, json_object(), NULL, srv_finish_openai(r->finish));
    if (j->rq.include_usage) usage_chunk(j, "chat.completion.chunk", r);
    srv_stream_write(j, "data: [DONE]\n\n", 14);
}

static char *completion_body(srv_job *j, const srv_result *r) {
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[{s:o, s:i, s:o, s:s}], s:o}", "id", j->id,
                             "object", "text_completion", "created", (json_int_t)j->created,
                             "model", j->rq.model, "choices", "text", srv_jstr(r->text, r->text_len),
                             "index", 0, "logprobs",
                             j->rq.logprobs ? completion_logprobs(r->lp, r->n_lp, 0) : json_null(),
                             "finish_reason", srv_finish_openai(r->finish), "usage",
                             srv_usage_openai(&r->usage));
    char *s = srv_json_text(root);
    json_decref(root);
    return s;
}

static void completion_chunk(srv_job *j, const char *s, size_t n, json_t *logprobs,
                             const char *finish) {
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[{s:o, s:i, s:o, s:o}]}", "id", j->id,
                             "object", "text_completion", "created", (json_int_t)j->created,
                             "model", j->rq.model, "choices", "text", srv_jstr(s, n), "index", 0,
                             "logprobs", logprobs ? logprobs : json_null(), "finish_reason",
                             finish ? json_string(finish) : json_null());
    srv_sse_json(j, NULL, root);
}

static void completion_text(srv_job *j, const char *s, size_t n, const srv_logprob *lp, int n_lp) {
    completion_chunk(j, s, n, j->rq.logprobs ? completion_logprobs(lp, n_lp, 0) : NULL, NULL);
}

static void completion_finish(srv_job *j, const srv_result *r) {
    completion_chunk(j, "", 0, NULL, srv_finish_openai(r->finish));
    if (j->rq.include_usage) usage_chunk(j, "text_completion", r);
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
