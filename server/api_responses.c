/* api_responses.c - OpenAI Responses (/v1/responses): input items -> chat
 * (docs/SERVING.md B.4), the response object (B.6) and its event stream (B.8).
 *
 * Stream invariants: every event is "event: TYPE" + "data: {...}" whose
 * body starts with "type" then "sequence_number" (0, 1, 2, … per
 * response); reasoning is streamed only when the client opted in with
 * reasoning.summary; the reasoning and message items are closed at the end
 * of generation, then tool-call items are emitted whole, then exactly one
 * terminal event (completed / incomplete / failed).
 *
 * The response object carries every member the OpenAI reference marks
 * required: the request's tools, tool_choice, instructions, metadata,
 * temperature and top_p echoed back (defaults when absent), and error
 * (null unless failed). tool_choice "required" and a named function are
 * served by the forced decoding of forced.c, as for chat completions.
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
        if (srv_media_placeholder(type)) { /* the model is told what it cannot see */
            ds4_buf_puts(&b, srv_media_placeholder(type));
            continue;
        }
        if (!type || (strcmp(type, "input_text") && strcmp(type, "output_text") &&
                      strcmp(type, "text") && strcmp(type, "summary_text") &&
                      strcmp(type, "reasoning_text")) ||
            (t && !json_is_null(t) && !json_is_string(t))) {
            ds4_buf_free(&b);
            if (type && (!t || json_is_null(t) || json_is_string(t)))
                return srv_fail_param(e, "input", "invalid_value",
                                      "input: content parts of type '%.64s' are not supported (text parts only)", type);
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
    /* an output answers a call: without its id it was rendered as a result of nothing (B.4) */
    if (!id)
        return srv_fail_param(e, "input", "missing_required_parameter",
                              "input: a tool output item needs the call_id of the call it answers");
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
    /* the statuses an output item carries (the OpenAI schema allows them on
     * input): an item cut by max_output_tokens ("incomplete") is sent back
     * as it is, as the SDKs' to_input_list() does; the text is what it is */
    const char *status = str_of(it, "status");
    if (json_object_get(it, "status") && !json_is_null(json_object_get(it, "status")) &&
        (!status || (strcmp(status, "completed") && strcmp(status, "incomplete") && strcmp(status, "in_progress")))) {
        if (!status) return srv_invalid(e);
        return srv_fail_param(e, "input", "invalid_value",
                              "input: a '%.64s' item with status '%.32s' cannot be replayed (completed, incomplete "
                              "or in_progress; drop the status or the item)", type, status);
    }
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
        if (r != DS4_ROLE_USER && r != DS4_ROLE_ASSISTANT && r != DS4_ROLE_SYSTEM && r != DS4_ROLE_DEVELOPER) {
            srv_fail_param(e, "input", "invalid_value", "input: unknown role '%.64s'", role);
            free(role);
            free(text);
            return -1;
        }
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
        if (!call_id)
            return srv_fail_param(e, "input", "missing_required_parameter",
                                  "input: a '%s' item needs a call_id (its output names it)", type);
        const char *ns = str_of(it, "namespace");
        char *full = NULL;
        if (ns && !strcmp(type, "function_call")) {
            full = xmalloc(strlen(ns) + strlen(name) + 1);
            strcpy(full, ns);
            strcat(full, name);
        }
        json_t *args = json_object_get(it, "arguments");
        json_t *wrapped = NULL;
        if (!strcmp(type, "custom_tool_call")) {
            /* the raw input, as the model wrote it: the `input` parameter (custom_tool_schema) */
            json_t *in = json_object_get(it, "input");
            if (in && !json_is_string(in)) return srv_invalid(e);
            args = wrapped = json_pack("{s:s}", "input", in ? json_string_value(in) : "");
        } else if (!args || json_is_null(args)) {
            args = json_object_get(it, "input");
        }
        int rc = add_call_item(x, call_id, full ? full : name, args, e);
        json_decref(wrapped);
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
    return srv_fail_param(e, "input", "invalid_value", "input: items of type '%.64s' are not supported", type);
}

/* tool_choice: "none" / "auto" / "required", {"type":"function","name":N}
 * (a namespaced tool by its client-facing name, with or without its
 * namespace), {"type":"custom","name":N}, {"type":"allowed_tools",
 * "mode":"auto"|"required","tools":[...]} (the model sees only those tools:
 * srv_parse_responses filters them). Anything else is a 400 naming
 * tool_choice. Call after the tools are parsed. */
static int parse_tool_choice_responses(json_t *tc, srv_request *rq, srv_error *e) {
    if (!tc || json_is_null(tc)) return 0;
    if (json_is_string(tc)) {
        const char *s = json_string_value(tc);
        if (!strcmp(s, "none")) rq->tool_choice = SRV_TOOL_NONE;
        else if (!strcmp(s, "required")) rq->tool_choice = SRV_TOOL_REQUIRED;
        else if (strcmp(s, "auto"))
            return srv_fail_param(e, "tool_choice", "unsupported_value",
                                  "tool_choice=%.100s not supported", s);
        if (rq->tool_choice == SRV_TOOL_REQUIRED && !(rq->tools_text && rq->tools_text[0]))
            return srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice 'required' needs tools");
        return 0;
    }
    if (!json_is_object(tc)) return srv_invalid(e);
    const char *type = str_of(tc, "type");
    if (type && !strcmp(type, "function")) {
        const char *name = str_of(tc, "name");
        if (!name) return srv_fail_param(e, "tool_choice", NULL, "tool_choice function needs a name");
        if (srv_tool_is_custom(rq, name))
            return srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice names function '%.100s', which is "
                                  "a custom tool (use {\"type\": \"custom\"})", name);
        const char *ns = str_of(tc, "namespace");
        rq->tool_choice = SRV_TOOL_NAMED;
        for (int i = 0; i < rq->n_aliases; i++) {
            const srv_tool_alias *a = &rq->aliases[i];
            if (!strcmp(a->name, name) && (!ns || !strcmp(a->ns, ns))) {
                rq->tool_choice_name = xstrdup(a->rendered);
                return 0;
            }
        }
        rq->tool_choice_name = xstrdup(name);
        return 0;
    }
    if (type && !strcmp(type, "custom")) {
        const char *name = str_of(tc, "name");
        if (!name) return srv_fail_param(e, "tool_choice", NULL, "tool_choice custom needs a name");
        if (!srv_tool_is_custom(rq, name))
            return srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice names custom tool '%.100s', which "
                                  "is not a custom tool of tools", name);
        rq->tool_choice = SRV_TOOL_NAMED;
        rq->tool_choice_name = xstrdup(name);
        return 0;
    }
    if (type && !strcmp(type, "allowed_tools")) { /* the tools were filtered (srv_parse_responses) */
        const char *mode = str_of(tc, "mode");
        if (mode && !strcmp(mode, "required")) rq->tool_choice = SRV_TOOL_REQUIRED;
        else if (mode && strcmp(mode, "auto"))
            return srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice allowed_tools mode must be auto "
                                  "or required");
        return 0;
    }
    return srv_fail_param(e, "tool_choice", "unsupported_value",
                          "tool_choice type %.100s not supported", type ? type : "(none)");
}

/* The request members the response object echoes (OpenAI reference:
 * required members of Response), with the API's defaults when absent. */
static int collect_echo(json_t *root, srv_request *rq, srv_error *e) {
    static const char *const num[] = {"temperature", "top_p"};
    json_t *echo = json_object();
    rq->echo = echo;
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(root, num[i]);
        json_object_set_new(echo, num[i], v && json_is_number(v) ? json_incref(v) : json_real(1.0));
    }
    json_t *md = json_object_get(root, "metadata");
    if (md && !json_is_null(md) && !json_is_object(md)) return srv_invalid(e);
    json_object_set_new(echo, "metadata", md && json_is_object(md) ? json_incref(md) : json_object());
    json_t *ins = json_object_get(root, "instructions");
    json_object_set_new(echo, "instructions", ins && json_is_string(ins) ? json_incref(ins) : json_null());
    json_t *tools = json_object_get(root, "tools");
    json_object_set_new(echo, "tools", json_is_array(tools) ? json_incref(tools) : json_array());
    json_t *tc = json_object_get(root, "tool_choice");
    json_object_set_new(echo, "tool_choice", tc && !json_is_null(tc) ? json_incref(tc) : json_string("auto"));
    json_t *mo = json_object_get(root, "max_output_tokens");
    json_object_set_new(echo, "max_output_tokens", mo && json_is_number(mo) ? json_incref(mo) : json_null());
    json_t *ptc = json_object_get(root, "parallel_tool_calls");
    json_object_set_new(echo, "parallel_tool_calls", json_is_boolean(ptc) ? json_incref(ptc) : json_true());
    json_t *rs = json_object_get(root, "reasoning");
    json_object_set_new(echo, "reasoning",
                        json_pack("{s:o, s:o}", "effort",
                                  json_is_string(json_object_get(rs, "effort"))
                                      ? json_incref(json_object_get(rs, "effort")) : json_null(),
                                  "summary",
                                  json_is_string(json_object_get(rs, "summary"))
                                      ? json_incref(json_object_get(rs, "summary")) : json_null()));
    /* text: the format served (B.13) and the verbosity asked for, if any */
    json_t *tfmt = json_object_get(json_object_get(root, "text"), "format");
    json_t *text = json_is_object(tfmt) ? json_pack("{s:O}", "format", tfmt) : json_pack("{s:{s:s}}", "format", "type", "text");
    json_t *vb = json_object_get(json_object_get(root, "text"), "verbosity");
    if (json_is_string(vb)) json_object_set(text, "verbosity", vb);
    json_object_set_new(echo, "text", text);
    return 0;
}

int srv_parse_responses(json_t *root, srv_request *rq, srv_error *e) {
    items_ctx x = {rq, DS4_BUF_INIT, false, -1};
    int rc = -1;
    static const char *const unsupported[] = {"previous_response_id", "conversation"};
    for (int k = 0; k < 2; k++) {
        json_t *v = json_object_get(root, unsupported[k]);
        if (v && !json_is_null(v)) {
            srv_fail_param(e, unsupported[k], "unsupported_parameter",
                           "%s is not supported; replay full input instead", unsupported[k]);
            goto out;
        }
    }
    /* members that would change the reply if they were ignored */
    json_t *pv = json_object_get(root, "prompt"), *bg = json_object_get(root, "background");
    json_t *tl = json_object_get(root, "top_logprobs");
    if (pv && !json_is_null(pv)) {
        srv_fail_param(e, "prompt", "unsupported_parameter",
                       "prompt (a stored prompt template) is not supported; send instructions and input");
        goto out;
    }
    if (bg && json_is_true(bg)) {
        srv_fail_param(e, "background", "unsupported_parameter", "background mode is not supported");
        goto out;
    }
    if (tl && !json_is_null(tl) && !(json_is_integer(tl) && json_integer_value(tl) == 0)) {
        srv_fail_param(e, "top_logprobs", "unsupported_parameter",
                       "logprobs are not supported on /v1/responses (use /v1/chat/completions)");
        goto out;
    }
    json_t *inc = json_object_get(root, "include");
    size_t ii;
    json_t *iv;
    json_array_foreach(inc, ii, iv) {
        const char *s_ = json_string_value(iv);
        if (s_ && strstr(s_, "logprobs")) {
            srv_fail_param(e, "include", "unsupported_value",
                           "include %.64s: logprobs are not supported on /v1/responses (use /v1/chat/completions)", s_);
            goto out;
        }
    }
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
        if (s && !rq->reasoning_summary) {
            /* (an unknown value was read as no summary: the reasoning silently left out) */
            srv_fail_param(e, "reasoning.summary", "invalid_value",
                           "reasoning.summary must be auto, concise or detailed (got '%.32s')", s);
            goto out;
        }
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
    json_t *tools = json_object_get(root, "tools"), *tc = json_object_get(root, "tool_choice");
    if (json_is_object(tc) && json_is_string(json_object_get(tc, "type")) &&
        !strcmp(str_of(tc, "type"), "allowed_tools")) {
        json_t *allowed = json_object_get(tc, "tools");
        if (!json_is_array(tools) || !json_is_array(allowed)) {
            if (!json_is_array(tools))
                srv_fail_param(e, "tools", "invalid_value", "tool_choice allowed_tools needs tools in the request");
            else
                srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice allowed_tools needs a tools list");
            goto out;
        }
        json_t *kept = srv_filter_tools(tools, allowed);
        int bad = !json_array_size(kept);
        if (bad)
            srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice allowed_tools names none of the tools");
        else
            bad = srv_parse_tools(kept, rq, e);
        json_decref(kept);
        if (bad) goto out;
    } else if (srv_parse_tools(tools, rq, e)) {
        goto out;
    }
    json_t *input = json_object_get(root, "input");
    if (!input || json_is_null(input)) {
        srv_fail_param(e, "input", NULL, "missing input");
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
    json_t *txt = json_object_get(root, "text");
    if (txt && !json_is_null(txt) && !json_is_object(txt)) {
        /* (a string here was read as no text options: the format asked for was lost) */
        srv_fail_param(e, "text", "invalid_type", "text must be an object ({\"format\": ..., \"verbosity\": ...})");
        goto out;
    }
    if (srv_parse_json_format(json_object_get(txt, "format"), false, rq, "text.format", e))
        goto out;
    json_t *ptc = json_object_get(root, "parallel_tool_calls");
    if (ptc && !json_is_null(ptc) && !json_is_boolean(ptc)) {
        srv_invalid(e);
        goto out;
    }
    rq->single_call = json_is_false(ptc);
    if (parse_tool_choice_responses(json_object_get(root, "tool_choice"), rq, e)) goto out;
    rc = collect_echo(root, rq, e);
out:
    ds4_buf_free(&x.pending);
    return rc;
}

/* ---- responses ------------------------------------------------------------ */

/* Stream state of one job (srv_job.api_state). */
typedef struct responses_state {
    int seq;                           /* next sequence_number */
    char reason_id[40], msg_id[40];    /* item ids, made once */
    char **fc_ids;                     /* (n_fc_ids) function_call item ids */
    int n_fc_ids;
    int out_index;                     /* next output_index */
    int msg_index, rs_index;           /* -1 until the item is added */
    ds4_buf rs_text;                   /* the reasoning streamed so far */
    bool rs_done;                      /* its item is done (the reply went on past it) */
} responses_state;

static responses_state *resp_st(srv_job *j) { return j->api_state; }

static void resp_state_free(void *p) {
    responses_state *st = p;
    for (int i = 0; i < st->n_fc_ids; i++) free(st->fc_ids[i]);
    free(st->fc_ids);
    ds4_buf_free(&st->rs_text);
}

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
        if (n && !strcmp(n, "tool_search")) return true;
    }
    return false;
}

static void ensure_ids(srv_job *j, const srv_result *r) {
    responses_state *st = resp_st(j);
    if (!st->reason_id[0]) srv_random_id(st->reason_id, sizeof st->reason_id, "rs_", 12);
    if (!st->msg_id[0]) srv_random_id(st->msg_id, sizeof st->msg_id, "msg_", 12);
    if (r && r->parsed.n_calls && !st->fc_ids) {
        st->fc_ids = xcalloc((size_t)r->parsed.n_calls, sizeof *st->fc_ids);
        st->n_fc_ids = r->parsed.n_calls;
        for (int i = 0; i < r->parsed.n_calls; i++) {
            st->fc_ids[i] = xmalloc(32);
            srv_random_id(st->fc_ids[i], 32, "fc_", 12);
        }
    }
}

static json_t *reasoning_item(srv_job *j, const srv_result *r) {
    const ds4_dsml_result *p = &r->parsed;
    return json_pack("{s:s, s:s, s:s, s:[{s:s, s:o}]}", "id", resp_st(j)->reason_id, "type",
                     "reasoning", "status", r->think_closed ? "completed" : "incomplete",
                     "summary", "type", "summary_text", "text",
                     srv_jstr(p->reasoning, p->reasoning_len));
}

static json_t *message_item(srv_job *j, const char *status, const char *text, size_t n) {
    return json_pack("{s:s, s:s, s:s, s:s, s:[{s:s, s:o, s:[]}]}", "id", resp_st(j)->msg_id, "type",
                     "message", "status", status, "role", "assistant", "content", "type",
                     "output_text", "text", srv_jstr(text, n), "annotations");
}

/* A custom tool's input from the call's arguments (JSON text): the string
 * parameter `input`, else the one string parameter, else the arguments. */
/* A custom tool's input: the raw text of its `input` parameter in the
 * block; else from the call's arguments (JSON text): `input` as a string,
 * or the JSON text of a non-string `input`, else the one member, else the
 * arguments. */
static char *custom_input(const srv_result *r, int i, const char *args) {
    char *raw = srv_raw_param(r->parsed.raw_dsml, r->parsed.raw_dsml_len, i, "input");
    json_t *a = srv_json_value(args);
    json_t *iv = json_object_get(a, "input");
    if (raw && json_is_string(iv)) { /* a string value: the model's bytes, not entity-decoded */
        json_decref(a);
        return raw;
    }
    free(raw);
    char *out;
    if (json_is_string(iv)) out = xstrdup(json_string_value(iv));
    else if (iv) out = srv_json_text(iv);
    else if (json_is_object(a) && json_object_size(a) == 1) {
        json_t *only = json_object_iter_value(json_object_iter(a));
        out = json_is_string(only) ? xstrdup(json_string_value(only)) : srv_json_text(only);
    } else out = xstrdup(json_is_object(a) && !json_object_size(a) ? "" : args);
    json_decref(a);
    return out;
}

static json_t *call_item(srv_job *j, const srv_result *r, int i, const char *status) {
    const ds4_tool_call *c = &r->parsed.calls[i];
    const char *item_id = resp_st(j)->fc_ids[i];
    char *args = srv_args_compact(c);
    json_t *it;
    if (is_hosted_search(&j->rq, c->name)) {
        json_t *a = srv_json_value(args);
        it = json_pack("{s:s, s:s, s:s, s:s, s:s, s:o}", "id", item_id, "type",
                       "tool_search_call", "status", status, "call_id", c->id ? c->id : "",
                       "execution", "client", "arguments", a ? a : json_object());
    } else if (srv_tool_is_custom(&j->rq, c->name)) {
        char *in = custom_input(r, i, args);
        it = json_pack("{s:s, s:s, s:s, s:s, s:o}", "id", item_id, "type", "custom_tool_call", "call_id",
                       c->id ? c->id : "", "name", c->name, "input", srv_jstr(in, strlen(in)));
        free(in);
    } else {
        const srv_tool_alias *al = alias_of(&j->rq, c->name);
        it = json_pack("{s:s, s:s, s:s, s:o}", "id", item_id, "type", "function_call", "status",
                       status, "name",
                       al ? json_string(al->name) : srv_jstr(c->name, strlen(c->name)));
        if (al) json_object_set_new(it, "namespace", json_string(al->ns));
        json_object_set_new(it, "call_id", json_string(c->id ? c->id : ""));
        json_object_set_new(it, "arguments", srv_jstr(args, strlen(args)));
    }
    free(args);
    return it;
}

static json_t *usage_responses(const srv_usage *raw) {
    srv_usage u = srv_usage_clamp(*raw);
    return json_pack("{s:i, s:{s:i, s:i}, s:i, s:{s:i}, s:i}", "input_tokens", u.prompt,
                     "input_tokens_details", "cached_tokens", u.cached, "cache_write_tokens",
                     u.prompt - u.cached, "output_tokens", u.completion, "output_tokens_details",
                     "reasoning_tokens", u.reasoning, "total_tokens", u.prompt + u.completion);
}

/* An echoed request member (collect_echo always sets them). */
static json_t *echo(const srv_job *j, const char *key) {
    json_t *v = j->rq.echo ? json_object_get(j->rq.echo, key) : NULL;
    return v ? json_incref(v) : json_null();
}

/* The response object, in the member order of the OpenAI reference. r is
 * NULL while in progress (response.created). */
static json_t *response_object(srv_job *j, const srv_result *r) {
    json_t *out = json_array();
    const char *status = "in_progress";
    if (r) {
        ensure_ids(j, r);
        const ds4_dsml_result *p = &r->parsed;
        const char *st = item_status(r);
        if (p->reasoning_len && j->rq.reasoning_summary)
            json_array_append_new(out, reasoning_item(j, r));
        if (p->content_len) json_array_append_new(out, message_item(j, st, p->content, p->content_len));
        /* a call in a reply cut by the limit is one the budget shaped (forced.c:
         * whole markup, the others are dropped): completed, as the stream's
         * output_item.done says, so the client can send it back with its output */
        const char *cst = r->finish == SRV_FINISH_LENGTH ? "completed" : st;
        for (int i = 0; i < p->n_calls; i++) json_array_append_new(out, call_item(j, r, i, cst));
        status = r->finish == SRV_FINISH_LENGTH  ? "incomplete"
                 : r->finish == SRV_FINISH_ERROR ? "failed"
                                                 : "completed";
    }
    json_t *root = json_pack("{s:s, s:s, s:I, s:s}", "id", j->id, "object", "response",
                             "created_at", (json_int_t)j->created, "status", status);
    json_object_set_new(root, "error",
                        r && r->finish == SRV_FINISH_ERROR
                            ? json_pack("{s:s, s:s}", "code", "server_error", "message",
                                        r->error_msg[0] ? r->error_msg : "generation failed")
                            : json_null());
    json_object_set_new(root, "incomplete_details",
                        r && r->finish == SRV_FINISH_LENGTH
                            ? json_pack("{s:s}", "reason", "max_output_tokens")
                            : json_null());
    json_object_set_new(root, "instructions", echo(j, "instructions"));
    json_object_set_new(root, "max_output_tokens", echo(j, "max_output_tokens"));
    json_object_set_new(root, "model", json_string(j->rq.model));
    json_object_set_new(root, "output", out);
    json_object_set_new(root, "parallel_tool_calls", echo(j, "parallel_tool_calls"));
    json_object_set_new(root, "previous_response_id", json_null());
    json_object_set_new(root, "reasoning", echo(j, "reasoning"));
    json_object_set_new(root, "store", json_false()); /* no durable store (B.4) */
    json_object_set_new(root, "temperature", echo(j, "temperature"));
    json_t *tx = echo(j, "text");
    json_object_set_new(root, "text", json_is_object(tx) ? tx : (json_decref(tx), json_pack("{s:{s:s}}", "format",
                                                                                            "type", "text")));
    json_object_set_new(root, "tool_choice", echo(j, "tool_choice"));
    json_object_set_new(root, "tools", echo(j, "tools"));
    json_object_set_new(root, "top_p", echo(j, "top_p"));
    json_object_set_new(root, "truncation", json_string("disabled"));
    json_object_set_new(root, "usage", r ? usage_responses(&r->usage) : json_null());
    json_object_set_new(root, "metadata", echo(j, "metadata"));
    return root;
}

static char *responses_body(srv_job *j, const srv_result *r) {
    json_t *root = response_object(j, r);
    char *s = srv_json_text(root);
    json_decref(root);
    return s;
}

/* Event "event: TYPE" + data with "type" then "sequence_number" first, then
 * the members of rest (stolen). */
static void ev(srv_job *j, const char *type, json_t *rest) {
    json_t *v = json_pack("{s:s, s:i}", "type", type, "sequence_number", resp_st(j)->seq++);
    json_object_update(v, rest);
    json_decref(rest);
    srv_sse_json(j, type, v);
}

static void resp_begin(srv_job *j) {
    responses_state *st = resp_st(j);
    ensure_ids(j, NULL);
    st->out_index = 0;
    st->rs_index = st->msg_index = -1;
    ev(j, "response.created", json_pack("{s:o}", "response", response_object(j, NULL)));
    ev(j, "response.in_progress", json_pack("{s:o}", "response", response_object(j, NULL)));
}

static void resp_reasoning(srv_job *j, const char *s, size_t n) {
    responses_state *st = resp_st(j);
    if (!j->rq.reasoning_summary) return;
    if (st->rs_index < 0) {
        st->rs_index = st->out_index++;
        ev(j, "response.output_item.added",
           json_pack("{s:i, s:{s:s, s:s, s:s, s:[]}}", "output_index", st->rs_index, "item", "id",
                     st->reason_id, "type", "reasoning", "status", "in_progress", "summary"));
        ev(j, "response.reasoning_summary_part.added",
           json_pack("{s:s, s:i, s:i, s:{s:s, s:s}}", "item_id", st->reason_id, "output_index",
                     st->rs_index, "summary_index", 0, "part", "type", "summary_text", "text", ""));
    }
    ev(j, "response.reasoning_summary_text.delta",
       json_pack("{s:s, s:i, s:i, s:o}", "item_id", st->reason_id, "output_index", st->rs_index,
                 "summary_index", 0, "delta", srv_jstr(s, n)));
    ds4_buf_append(&st->rs_text, s, n);
}

/* The reasoning item's done events: text, part, item (status completed, or
 * incomplete when the reply ended inside the reasoning). */
static void reasoning_done(srv_job *j, const char *text, size_t n, bool closed) {
    responses_state *st = resp_st(j);
    json_t *rt = srv_jstr(text, n);
    ev(j, "response.reasoning_summary_text.done",
       json_pack("{s:s, s:i, s:i, s:O}", "item_id", st->reason_id, "output_index", st->rs_index, "summary_index", 0,
                 "text", rt));
    ev(j, "response.reasoning_summary_part.done",
       json_pack("{s:s, s:i, s:i, s:{s:s, s:O}}", "item_id", st->reason_id, "output_index", st->rs_index,
                 "summary_index", 0, "part", "type", "summary_text", "text", rt));
    ev(j, "response.output_item.done",
       json_pack("{s:i, s:{s:s, s:s, s:s, s:[{s:s, s:O}]}}", "output_index", st->rs_index, "item", "id",
                 st->reason_id, "type", "reasoning", "status", closed ? "completed" : "incomplete", "summary",
                 "type", "summary_text", "text", rt));
    json_decref(rt);
    st->rs_done = true;
}

/* The reasoning ended and the reply goes on: its item is done before the
 * next item is added (output items one after another, as OpenAI streams
 * them; it stayed open until the end of the reply) */
static void resp_reasoning_end(srv_job *j) {
    responses_state *st = resp_st(j);
    if (st->rs_index >= 0 && !st->rs_done) reasoning_done(j, st->rs_text.data, st->rs_text.len, true);
}

static void resp_content(srv_job *j, const char *s, size_t n, const srv_logprob *lp, int n_lp) {
    responses_state *st = resp_st(j);
    (void)lp, (void)n_lp;
    if (st->msg_index < 0) {
        st->msg_index = st->out_index++;
        ev(j, "response.output_item.added",
           json_pack("{s:i, s:{s:s, s:s, s:s, s:s, s:[]}}", "output_index", st->msg_index, "item",
                     "id", st->msg_id, "type", "message", "status", "in_progress", "role",
                     "assistant", "content"));
        ev(j, "response.content_part.added",
           json_pack("{s:s, s:i, s:i, s:{s:s, s:s, s:[]}}", "item_id", st->msg_id, "output_index",
                     st->msg_index, "content_index", 0, "part", "type", "output_text", "text", "",
                     "annotations"));
    }
    ev(j, "response.output_text.delta",
       json_pack("{s:s, s:i, s:i, s:o, s:[]}", "item_id", st->msg_id, "output_index",
                 st->msg_index, "content_index", 0, "delta", srv_jstr(s, n), "logprobs"));
}

static void resp_finish(srv_job *j, const srv_result *r) {
    responses_state *st = resp_st(j);
    ensure_ids(j, r);
    const char *is = item_status(r);
    const ds4_dsml_result *p = &r->parsed;
    if (st->rs_index >= 0 && !st->rs_done) reasoning_done(j, p->reasoning, p->reasoning_len, r->think_closed);
    if (st->msg_index >= 0) {
        json_t *ct = srv_jstr(p->content, p->content_len);
        ev(j, "response.output_text.done",
           json_pack("{s:s, s:i, s:i, s:O, s:[]}", "item_id", st->msg_id, "output_index",
                     st->msg_index, "content_index", 0, "text", ct, "logprobs"));
        ev(j, "response.content_part.done",
           json_pack("{s:s, s:i, s:i, s:{s:s, s:O, s:[]}}", "item_id", st->msg_id,
                     "output_index", st->msg_index, "content_index", 0, "part", "type",
                     "output_text", "text", ct, "annotations"));
        ev(j, "response.output_item.done",
           json_pack("{s:i, s:o}", "output_index", st->msg_index, "item",
                     message_item(j, is, p->content, p->content_len)));
        json_decref(ct);
    }
    for (int i = 0; i < p->n_calls; i++) {
        int oi = st->out_index++;
        json_t *added = call_item(j, r, i, "in_progress");
        const char *it_type = json_string_value(json_object_get(added, "type"));
        bool search = !strcmp(it_type, "tool_search_call"), custom = !strcmp(it_type, "custom_tool_call");
        if (custom) json_object_set_new(added, "input", json_string(""));
        else if (!search) json_object_set_new(added, "arguments", json_string(""));
        ev(j, "response.output_item.added", json_pack("{s:i, s:o}", "output_index", oi, "item", added));
        json_t *done = call_item(j, r, i, "completed");
        if (custom) {
            json_t *in = json_object_get(done, "input");
            ev(j, "response.custom_tool_call_input.delta",
               json_pack("{s:s, s:i, s:O}", "item_id", st->fc_ids[i], "output_index", oi, "delta", in));
            ev(j, "response.custom_tool_call_input.done",
               json_pack("{s:s, s:i, s:O}", "item_id", st->fc_ids[i], "output_index", oi, "input", in));
        } else if (!search) {
            json_t *args = json_object_get(done, "arguments");
            ev(j, "response.function_call_arguments.delta",
               json_pack("{s:s, s:i, s:O}", "item_id", st->fc_ids[i], "output_index", oi, "delta",
                         args));
            json_t *d = json_pack("{s:s, s:i, s:O}", "item_id", st->fc_ids[i], "output_index", oi,
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
    ev(j, type, json_pack("{s:o}", "response", response_object(j, r)));
}

const srv_emitter srv_emitter_responses = {
    .state_size = sizeof(responses_state),
    .state_free = resp_state_free,
    .begin = resp_begin,
    .reasoning = resp_reasoning,
    .reasoning_end = resp_reasoning_end,
    .content = resp_content,
    .finish = resp_finish,
    .body = responses_body,
};
