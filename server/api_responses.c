/* api_responses.c - OpenAI Responses (/v1/responses): input items -> chat
 * (SERVING.md B.4), the response object (B.6) and its event stream (B.8).
 *
 * Stream invariants: every event starts with "type" then "sequence_number"
 * (0, 1, 2, … per response, job->seq); reasoning is streamed only when the
 * client opted in with reasoning.summary; the reasoning and message items
 * are closed at the end of generation, then tool-call items are emitted
 * whole, then exactly one terminal event (completed / incomplete / failed).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"
#include "util/xalloc.h"

/* Parse state: the reasoning buffer waiting for the next assistant turn. */
typedef struct items_ctx {
    srv_request *rq;
    ds4_buf pending;     /* reasoning text not yet attached */
    bool has_pending;
    int last_assistant;  /* index of the last message if it is assistant, else -1 */
} items_ctx;

static int flush_pending(items_ctx *x, srv_error *e) {
    if (!x->has_pending) return 0;
    int i = srv_chat_add(x->rq, DS4_ROLE_ASSISTANT, "", e);
    if (i < 0) return -1;
    ds4_err err;
    if (x->pending.len &&
        ds4_chat_add_reasoning(x->rq->chat, i, x->pending.data, x->pending.len, &err) < 0)
        return srv_fail(e, 500, "%s", err.msg);
    ds4_buf_reset(&x->pending);
    x->has_pending = false;
    x->last_assistant = -1; /* reasoning-only message closes the turn */
    return 0;
}

static int attach_pending(items_ctx *x, int i, srv_error *e) {
    if (!x->has_pending) return 0;
    ds4_err err;
    if (x->pending.len &&
        ds4_chat_add_reasoning(x->rq->chat, i, x->pending.data, x->pending.len, &err) < 0)
        return srv_fail(e, 500, "%s", err.msg);
    ds4_buf_reset(&x->pending);
    x->has_pending = false;
    return 0;
}

/* content: string, null, or array of text blocks of the allowed types. */
static int item_text(json_t *v, char **out, srv_error *e) {
    if (!v || json_is_null(v)) {
        *out = xstrdup("");
        return 0;
    }
    if (json_is_string(v)) {
        *out = xstrdup(json_string_value(v));
        return 0;
    }
    if (!json_is_array(v)) return srv_invalid(e);
    ds4_buf b = DS4_BUF_INIT;
    size_t i;
    json_t *p;
    json_array_foreach(v, i, p) {
        const char *type = json_string_value(json_object_get(p, "type"));
        json_t *t = json_object_get(p, "text");
        if (!type || (strcmp(type, "input_text") && strcmp(type, "output_text") &&
                      strcmp(type, "text") && strcmp(type, "summary_text") &&
                      strcmp(type, "reasoning_text")) ||
            (t && !json_is_null(t) && !json_is_string(t))) {
            ds4_buf_free(&b);
            return srv_invalid(e);
        }
        if (json_is_string(t)) ds4_buf_puts(&b, json_string_value(t));
    }
    *out = ds4_buf_detach(&b, NULL);
    return 0;
}

/* output of a tool-output item: string, text-block array, or raw JSON. */
static char *output_text(json_t *v) {
    if (!v || json_is_null(v)) return xstrdup("");
    if (json_is_string(v)) return xstrdup(json_string_value(v));
    if (json_is_array(v)) {
        char *s = NULL;
        if (!item_text(v, &s, NULL)) return s;
    }
    return srv_json_text(v);
}


static int add_call_item(items_ctx *x, const char *id, const char *name, json_t *args_v,
                         srv_error *e) {
    int i = x->last_assistant;
    if (i < 0) {
        i = srv_chat_add(x->rq, DS4_ROLE_ASSISTANT, "", e);
        if (i < 0) return -1;
        x->last_assistant = i;
    }
    if (attach_pending(x, i, e)) return -1;
    char *args = !args_v || json_is_null(args_v) ? xstrdup("{}")
                 : json_is_string(args_v)        ? xstrdup(json_string_value(args_v))
                                                 : srv_json_text(args_v);
    ds4_err err;
    int r = ds4_chat_add_call(x->rq->chat, i, id, name, args, strlen(args), &err);
    free(args);
    return r < 0 ? srv_fail(e, 500, "%s", err.msg) : 0;
}

static int add_output_item(items_ctx *x, const char *id, char *text, srv_error *e) {
    if (flush_pending(x, e)) return -1;
    /* no call in the request: it must answer the live binding (checked
     * before queueing, srv_submit) */
    if (id && !srv_chat_call_known(x->rq->chat, id)) srv_note_live_id(x->rq, id);
    int i = srv_chat_add(x->rq, DS4_ROLE_TOOL, text, e);
    if (i < 0) return -1;
    x->last_assistant = -1;
    ds4_err err;
    if (id && ds4_chat_set_tool_call_id(x->rq->chat, i, id, &err) < 0)
        return srv_fail(e, 500, "%s", err.msg);
    return 0;
}

static const char *str_of(json_t *it, const char *k) { return json_string_value(json_object_get(it, k)); }

static int parse_item(items_ctx *x, json_t *it, srv_error *e) {
    if (!json_is_object(it)) return srv_invalid(e);
    const char *type = str_of(it, "type");
    json_t *tv = json_object_get(it, "type");
    if (tv && !json_is_string(tv)) return srv_invalid(e);
    if (!type) type = "message";
    const char *status = str_of(it, "status");
    if (json_object_get(it, "status") && !json_is_null(json_object_get(it, "status")) &&
        (!status || strcmp(status, "completed")))
        return srv_invalid(e);
    const char *call_id = str_of(it, "call_id");
    if (!call_id) call_id = str_of(it, "id");

    if (!strcmp(type, "message")) {
        char *role = NULL, *text = NULL;
        if (srv_get_string(it, "role", &role, e)) return -1;
        if (item_text(json_object_get(it, "content"), &text, e)) {
            free(role);
            return -1;
        }
        ds4_role r = ds4_chat_role_from_name(role ? role : "user");
        free(role);
        int rc = 0;
        if (r != DS4_ROLE_ASSISTANT && flush_pending(x, e)) rc = -1;
        int i = rc ? -1 : srv_chat_add(x->rq, r, text, e);
        free(text);
        if (i < 0) return -1;
        if (r == DS4_ROLE_ASSISTANT) {
            x->last_assistant = i;
            return attach_pending(x, i, e);
        }
        if (r != DS4_ROLE_SYSTEM && r != DS4_ROLE_DEVELOPER) x->last_assistant = -1;
        return 0;
    }
    if (!strcmp(type, "reasoning")) {
        char *a = NULL, *b = NULL;
        if (item_text(json_object_get(it, "summary"), &a, e)) return -1;
        if (item_text(json_object_get(it, "content"), &b, e)) {
            free(a);
            return -1;
        }
        const char *parts[2] = {a, b};
        for (int k = 0; k < 2; k++) {
            if (!parts[k][0]) continue;
            if (x->pending.len) ds4_buf_putc(&x->pending, '\n');
            ds4_buf_puts(&x->pending, parts[k]);
        }
        x->has_pending = true;
        free(a);
        free(b);
        return 0;
    }
    if (!strcmp(type, "function_call") || !strcmp(type, "custom_tool_call")) {
        const char *name = str_of(it, "name");
        if (!name) return srv_invalid(e);
        const char *ns = str_of(it, "namespace");
        char *full = NULL;
        if (ns && !strcmp(type, "function_call")) {
            full = xmalloc(strlen(ns) + strlen(name) + 1);
            strcpy(full, ns);
            strcat(full, name);
        }
        json_t *args = json_object_get(it, "arguments");
        if (!args || json_is_null(args)) args = json_object_get(it, "input");
        int rc = add_call_item(x, call_id, full ? full : name, args, e);
        free(full);
        return rc;
    }
    static const char *const hosted[][2] = {{"local_shell_call", "local_shell"},
                                            {"web_search_call", "web_search_call"},
                                            {"tool_search_call", "tool_search"},
                                            {"image_generation_call", "image_generation_call"}};
    for (size_t k = 0; k < sizeof hosted / sizeof hosted[0]; k++) {
        if (strcmp(type, hosted[k][0])) continue;
        json_t *args = json_object_get(it, "action");
        if (!args || json_is_null(args)) args = json_object_get(it, "arguments");
        if (!args || json_is_null(args)) args = json_object_get(it, "input");
        return add_call_item(x, call_id, hosted[k][1], args, e);
    }
    if (!strcmp(type, "function_call_output") || !strcmp(type, "custom_tool_call_output") ||
        !strcmp(type, "local_shell_call_output") || !strcmp(type, "web_search_call_output") ||
        !strcmp(type, "tool_search_output") || !strcmp(type, "tool_search_call_output") ||
        !strcmp(type, "image_generation_call_output")) {
        json_t *out = json_object_get(it, "output");
        if (!out || json_is_null(out)) out = json_object_get(it, "result");
        if ((!out || json_is_null(out)) && json_object_get(it, "tools"))
            out = json_object_get(it, "tools");
        if (!strcmp(type, "tool_search_output") &&
            srv_parse_tools(json_object_get(it, "tools"), x->rq, e))
            return -1;
        char *text = output_text(out);
        int rc = add_output_item(x, call_id, text, e);
        free(text);
        return rc;
    }
    if (!strcmp(type, "compaction") || !strcmp(type, "context_compaction")) return 0;
    return srv_invalid(e);
}

int srv_parse_responses(const char *body, size_t n, srv_request *rq, srv_error *e) {
    srv_request_init(rq, SRV_API_RESPONSES);
    json_t *root = srv_load_object(body, n, e);
    if (!root) return -1;
    int rc = -1;
    items_ctx x = {rq, DS4_BUF_INIT, false, -1};
    rq->chat = ds4_chat_new();
    if (!rq->chat) {
        srv_fail(e, 500, "out of memory");
        goto out;
    }
    static const char *const unsupported[] = {"previous_response_id", "conversation"};
    for (int k = 0; k < 2; k++) {
        json_t *v = json_object_get(root, unsupported[k]);
        if (v && !json_is_null(v)) {
            srv_fail(e, 400, "%s is not supported; replay full input instead", unsupported[k]);
            goto out;
        }
    }
    if (srv_parse_sampling(root, rq, e)) goto out;
    const char *effort = NULL;
    json_t *rs = json_object_get(root, "reasoning");
    if (rs && !json_is_null(rs)) {
        if (!json_is_object(rs)) {
            srv_invalid(e);
            goto out;
        }
        json_t *ef = json_object_get(rs, "effort"), *sm = json_object_get(rs, "summary");
        if ((ef && !json_is_null(ef) && !json_is_string(ef)) ||
            (sm && !json_is_null(sm) && !json_is_string(sm))) {
            srv_invalid(e);
            goto out;
        }
        effort = json_string_value(ef);
        const char *s = json_string_value(sm);
        rq->reasoning_summary =
            s && (!strcmp(s, "auto") || !strcmp(s, "concise") || !strcmp(s, "detailed"));
    }
    if (srv_parse_thinking(root, rq, effort, effort != NULL, e)) goto out;
    json_t *ins = json_object_get(root, "instructions");
    if (ins && !json_is_null(ins)) {
        if (!json_is_string(ins)) {
            srv_invalid(e);
            goto out;
        }
        if (srv_chat_add(rq, DS4_ROLE_SYSTEM, json_string_value(ins), e) < 0) goto out;
    }
    /* tools before items: tool_search_output items append to them */
    if (srv_parse_tools(json_object_get(root, "tools"), rq, e)) goto out;
    json_t *input = json_object_get(root, "input");
    if (!input || json_is_null(input)) {
        srv_fail(e, 400, "missing input");
        goto out;
    }
    if (json_is_string(input)) {
        if (srv_chat_add(rq, DS4_ROLE_USER, json_string_value(input), e) < 0) goto out;
    } else if (json_is_array(input)) {
        size_t i;
        json_t *it;
        json_array_foreach(input, i, it) {
            if (parse_item(&x, it, e)) goto out;
        }
        if (flush_pending(&x, e)) goto out;
    } else {
        srv_invalid(e);
        goto out;
    }
    json_t *tc = json_object_get(root, "tool_choice");
    if (tc && !json_is_null(tc)) {
        if (json_is_string(tc)) {
            const char *s = json_string_value(tc);
            if (!strcmp(s, "none")) rq->tool_choice = SRV_TOOL_NONE;
            else if (strcmp(s, "auto")) {
                srv_fail(e, 400, "tool_choice=%s not supported", s);
                goto out;
            }
        } else if (json_is_object(tc)) {
            srv_fail(e, 400, "forced tool_choice not supported");
            goto out;
        } else {
            srv_invalid(e);
            goto out;
        }
    }
    rc = 0;
out:
    ds4_buf_free(&x.pending);
    json_decref(root);
    return rc;
}

/* ---- responses ------------------------------------------------------------ */

static const char *item_status(const srv_result *r) {
    return r->finish == SRV_FINISH_LENGTH || r->finish == SRV_FINISH_ERROR ? "incomplete"
                                                                           : "completed";
}

static const srv_tool_alias *alias_of(const srv_request *rq, const char *name) {
    for (int i = 0; i < rq->n_aliases; i++)
        if (!strcmp(rq->aliases[i].rendered, name)) return &rq->aliases[i];
    return NULL;
}

static bool is_hosted_search(const srv_request *rq, const char *name) {
    if (strcmp(name, "tool_search")) return false;
    size_t i;
    json_t *t;
    json_array_foreach(rq->tools_json, i, t) {
        const char *n = json_string_value(json_object_get(t, "name"));
        const char *d = json_string_value(json_object_get(t, "description"));
        (void)d;
        if (n && !strcmp(n, "tool_search")) return true;
    }
    return false;
}

static json_t *reasoning_item(srv_job *j, const srv_result *r, const char *text, size_t n) {
    return json_pack("{s:s, s:s, s:s, s:[{s:s, s:o}]}", "id", j->item_reason_id, "type",
                     "reasoning", "status", r->think_closed ? "completed" : "incomplete",
                     "summary", "type", "summary_text", "text", srv_jstr(text, n));
}

static json_t *message_item(srv_job *j, const char *status, const char *text, size_t n) {
    return json_pack("{s:s, s:s, s:s, s:s, s:[{s:s, s:o, s:[]}]}", "id", j->item_msg_id, "type",
                     "message", "status", status, "role", "assistant", "content", "type",
                     "output_text", "text", srv_jstr(text, n), "annotations");
}

static json_t *call_item(srv_job *j, const srv_result *r, int i, const char *status) {
    const ds4_tool_call *c = &r->parsed.calls[i];
    char *args = srv_args_compact(c);
    json_t *it;
    if (is_hosted_search(&j->rq, c->name)) {
        json_t *a = json_loads(args, 0, NULL);
        it = json_pack("{s:s, s:s, s:s, s:s, s:s, s:o}", "id", j->fc_ids[i], "type",
                       "tool_search_call", "status", status, "call_id", c->id ? c->id : "",
                       "execution", "client", "arguments", a ? a : json_object());
    } else {
        const srv_tool_alias *al = alias_of(&j->rq, c->name);
        it = json_pack("{s:s, s:s, s:s, s:o}", "id", j->fc_ids[i], "type", "function_call",
                       "status", status, "name",
                       al ? json_string(al->name) : srv_jstr(c->name, strlen(c->name)));
        if (al) json_object_set_new(it, "namespace", json_string(al->ns));
        json_object_set_new(it, "call_id", json_string(c->id ? c->id : ""));
        json_object_set_new(it, "arguments", srv_jstr(args, strlen(args)));
    }
    free(args);
    return it;
}

static void ensure_ids(srv_job *j, const srv_result *r) {
    if (!j->item_reason_id[0]) srv_random_id(j->item_reason_id, sizeof j->item_reason_id, "rs_", 12);
    if (!j->item_msg_id[0]) srv_random_id(j->item_msg_id, sizeof j->item_msg_id, "msg_", 12);
    if (r && r->parsed.n_calls && !j->fc_ids) {
        j->fc_ids = xcalloc((size_t)r->parsed.n_calls, sizeof *j->fc_ids);
        j->n_fc_ids = r->parsed.n_calls;
        for (int i = 0; i < r->parsed.n_calls; i++) {
            j->fc_ids[i] = xmalloc(32);
            srv_random_id(j->fc_ids[i], 32, "fc_", 12);
        }
    }
}

static json_t *usage_responses(const srv_usage *u) {
    int p = u->prompt < 0 ? 0 : u->prompt;
    int k = u->cached < 0 ? 0 : u->cached > p ? p : u->cached;
    return json_pack("{s:i, s:{s:i, s:i}, s:i, s:{s:i}, s:i}", "input_tokens", p,
                     "input_tokens_details", "cached_tokens", k, "cache_write_tokens", p - k,
                     "output_tokens", u->completion, "output_tokens_details", "reasoning_tokens",
                     0, "total_tokens", p + u->completion);
}

/* Members the SDK's Response type requires (tools echoed as sent). */
static void add_required_fields(srv_job *j, json_t *root) {
    json_object_set_new(root, "parallel_tool_calls", json_true());
    json_object_set_new(root, "tool_choice",
                        json_string(j->rq.tool_choice == SRV_TOOL_NONE ? "none" : "auto"));
    json_object_set_new(root, "tools", json_array());
}

/* Output items of the final object, from the texts that were streamed (or
 * the parsed ones when not streaming). */
static json_t *response_object(srv_job *j, const srv_result *r, const char *reasoning,
                               size_t reasoning_len, const char *content, size_t content_len) {
    ensure_ids(j, r);
    json_t *out = json_array();
    const char *st = item_status(r);
    if (reasoning_len && j->rq.reasoning_summary)
        json_array_append_new(out, reasoning_item(j, r, reasoning, reasoning_len));
    if (content_len) json_array_append_new(out, message_item(j, st, content, content_len));
    for (int i = 0; i < r->parsed.n_calls; i++) json_array_append_new(out, call_item(j, r, i, st));
    const char *status = r->finish == SRV_FINISH_LENGTH  ? "incomplete"
                         : r->finish == SRV_FINISH_ERROR ? "failed"
                                                         : "completed";
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:s, s:o, s:o}", "id", j->id, "object",
                             "response", "created_at", (json_int_t)j->created, "status", status,
                             "model", j->rq.model, "output", out, "usage", usage_responses(&r->usage));
    add_required_fields(j, root);
    if (r->finish == SRV_FINISH_LENGTH)
        json_object_set_new(root, "incomplete_details", json_pack("{s:s}", "reason", "max_output_tokens"));
    if (r->finish == SRV_FINISH_ERROR)
        json_object_set_new(root, "error", json_pack("{s:s, s:s}", "code", "server_error",
                                                     "message", "generation failed"));
    return root;
}

static char *responses_body(srv_job *j, const srv_result *r) {
    const ds4_dsml_result *p = &r->parsed;
    json_t *root = response_object(j, r, p->reasoning, p->reasoning ? p->reasoning_len : 0,
                                   p->content, p->content_len);
    char *s = srv_json_text(root);
    json_decref(root);
    return s;
}

/* Event with "type" then "sequence_number" first, then the members of rest
 * (stolen). */
static void ev(srv_job *j, const char *type, json_t *rest) {
    json_t *v = json_pack("{s:s, s:i}", "type", type, "sequence_number", j->seq++);
    json_object_update(v, rest);
    json_decref(rest);
    srv_sse_json(j, NULL, v);
}

static void resp_begin(srv_job *j) {
    ensure_ids(j, NULL);
    j->out_index = 0;
    j->rs_index = j->msg_index = -1;
    json_t *resp = json_pack("{s:s, s:s, s:I, s:s, s:s, s:[]}", "id", j->id, "object", "response",
                             "created_at", (json_int_t)j->created, "status", "in_progress", "model",
                             j->rq.model, "output");
    add_required_fields(j, resp);
    ev(j, "response.created", json_pack("{s:o}", "response", resp));
}

static void resp_reasoning(srv_job *j, const char *s, size_t n) {
    ds4_buf_append(&j->acc_reasoning, s, n);
    if (!j->rq.reasoning_summary) return;
    if (j->rs_index < 0) {
        j->rs_index = j->out_index++;
        ev(j, "response.output_item.added",
           json_pack("{s:i, s:{s:s, s:s, s:s, s:[]}}", "output_index", j->rs_index, "item", "id",
                     j->item_reason_id, "type", "reasoning", "status", "in_progress", "summary"));
        ev(j, "response.reasoning_summary_part.added",
           json_pack("{s:s, s:i, s:i, s:{s:s, s:s}}", "item_id", j->item_reason_id,
                     "output_index", j->rs_index, "summary_index", 0, "part", "type",
                     "summary_text", "text", ""));
    }
    ev(j, "response.reasoning_summary_text.delta",
       json_pack("{s:s, s:i, s:i, s:o}", "item_id", j->item_reason_id, "output_index",
                 j->rs_index, "summary_index", 0, "delta", srv_jstr(s, n)));
}

static void resp_content(srv_job *j, const char *s, size_t n) {
    ds4_buf_append(&j->acc_content, s, n);
    if (j->msg_index < 0) {
        j->msg_index = j->out_index++;
        ev(j, "response.output_item.added",
           json_pack("{s:i, s:{s:s, s:s, s:s, s:s, s:[]}}", "output_index", j->msg_index, "item",
                     "id", j->item_msg_id, "type", "message", "status", "in_progress", "role",
                     "assistant", "content"));
        ev(j, "response.content_part.added",
           json_pack("{s:s, s:i, s:i, s:{s:s, s:s, s:[]}}", "item_id", j->item_msg_id,
                     "output_index", j->msg_index, "content_index", 0, "part", "type",
                     "output_text", "text", "", "annotations"));
    }
    ev(j, "response.output_text.delta",
       json_pack("{s:s, s:i, s:i, s:o, s:[]}", "item_id", j->item_msg_id, "output_index",
                 j->msg_index, "content_index", 0, "delta", srv_jstr(s, n), "logprobs"));
}

static void resp_finish(srv_job *j, const srv_result *r) {
    ensure_ids(j, r);
    const char *st = item_status(r);
    const char *rt = j->acc_reasoning.data ? j->acc_reasoning.data : "";
    size_t rn = j->acc_reasoning.len;
    const char *ct = j->acc_content.data ? j->acc_content.data : "";
    size_t cn = j->acc_content.len;
    if (j->rs_index >= 0) {
        ev(j, "response.reasoning_summary_text.done",
           json_pack("{s:s, s:i, s:i, s:o}", "item_id", j->item_reason_id, "output_index",
                     j->rs_index, "summary_index", 0, "text", srv_jstr(rt, rn)));
        ev(j, "response.reasoning_summary_part.done",
           json_pack("{s:s, s:i, s:i, s:{s:s, s:o}}", "item_id", j->item_reason_id,
                     "output_index", j->rs_index, "summary_index", 0, "part", "type",
                     "summary_text", "text", srv_jstr(rt, rn)));
        ev(j, "response.output_item.done",
           json_pack("{s:i, s:o}", "output_index", j->rs_index, "item",
                     reasoning_item(j, r, rt, rn)));
    }
    if (j->msg_index >= 0) {
        ev(j, "response.output_text.done",
           json_pack("{s:s, s:i, s:i, s:o, s:[]}", "item_id", j->item_msg_id, "output_index",
                     j->msg_index, "content_index", 0, "text", srv_jstr(ct, cn), "logprobs"));
        ev(j, "response.content_part.done",
           json_pack("{s:s, s:i, s:i, s:{s:s, s:o, s:[]}}", "item_id", j->item_msg_id,
                     "output_index", j->msg_index, "content_index", 0, "part", "type",
                     "output_text", "text", srv_jstr(ct, cn), "annotations"));
        ev(j, "response.output_item.done",
           json_pack("{s:i, s:o}", "output_index", j->msg_index, "item",
                     message_item(j, st, ct, cn)));
    }
    for (int i = 0; i < r->parsed.n_calls; i++) {
        int oi = j->out_index++;
        json_t *added = call_item(j, r, i, "in_progress");
        bool search = !strcmp(json_string_value(json_object_get(added, "type")), "tool_search_call");
        if (!search) json_object_set_new(added, "arguments", json_string(""));
        ev(j, "response.output_item.added", json_pack("{s:i, s:o}", "output_index", oi, "item", added));
        json_t *done = call_item(j, r, i, "completed");
        if (!search) {
            json_t *args = json_object_get(done, "arguments");
            ev(j, "response.function_call_arguments.delta",
               json_pack("{s:s, s:i, s:O}", "item_id", j->fc_ids[i], "output_index", oi, "delta",
                         args));
            json_t *d = json_pack("{s:s, s:i, s:O}", "item_id", j->fc_ids[i], "output_index", oi,
                                  "name", json_object_get(done, "name"));
            if (json_object_get(done, "namespace"))
                json_object_set(d, "namespace", json_object_get(done, "namespace"));
            json_object_set(d, "arguments", args);
            ev(j, "response.function_call_arguments.done", d);
        }
        ev(j, "response.output_item.done", json_pack("{s:i, s:o}", "output_index", oi, "item", done));
    }
    const char *type = r->finish == SRV_FINISH_LENGTH  ? "response.incomplete"
                       : r->finish == SRV_FINISH_ERROR ? "response.failed"
                                                       : "response.completed";
    ev(j, type, json_pack("{s:o}", "response", response_object(j, r, rt, rn, ct, cn)));
}

const srv_emitter srv_emitter_responses = {
    .begin = resp_begin,
    .reasoning = resp_reasoning,
    .content = resp_content,
    .finish = resp_finish,
    .body = responses_body,
};
