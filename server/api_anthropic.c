/* api_anthropic.c - Anthropic Messages (/v1/messages): request parsing
 * (docs/SERVING.md B.4), the message object (B.6) and the message event stream
 * (B.8) with thinking, text and tool_use blocks (input_json_delta).
 *
 * Stream invariant: at most one content block is open at a time (tracked in
 * the job's anthropic_state); every block that was started is stopped
 * exactly once, and block indexes are consecutive from 0.
 *
 * Usage (docs/server.md "Usage"): cache_read_input_tokens = prompt tokens
 * reused from the KV cache; cache_creation_input_tokens = the new prompt
 * tokens when the client asked for caching (a cache_control anywhere in the
 * request), else 0; input_tokens = the rest. message_start and the final
 * message_delta both carry all three. A matched stop_sequences entry gives
 * stop_reason "stop_sequence" and the string in stop_sequence.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"
#include "util/xalloc.h"

enum { BLOCK_NONE = 0, BLOCK_THINKING, BLOCK_TEXT, BLOCK_TOOL };

/* Stream state of one job (srv_job.api_state). */
typedef struct anthropic_state {
    int block_index;  /* index of the open (or next) content block */
    int open_block;   /* BLOCK_* of the open block */
    bool sent_reasoning, sent_text;
} anthropic_state;

static anthropic_state *anth_st(srv_job *j) { return j->api_state; }

/* A cache_control member anywhere in v (depth-limited walk). */
static bool has_cache_control(json_t *v, int depth) {
    if (depth > 64 || !v) return false;
    if (json_is_object(v)) {
        json_t *cc = json_object_get(v, "cache_control");
        if (cc && !json_is_null(cc)) return true;
        const char *k;
        json_t *x;
        json_object_foreach(v, k, x) if (has_cache_control(x, depth + 1)) return true;
    } else if (json_is_array(v)) {
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) if (has_cache_control(x, depth + 1)) return true;
    }
    return false;
}

/* system: string, or array of strings / {"text":…}; joined with '\n' unless
 * the previous part already ends with one; "x-anthropic-" parts dropped. */
static int parse_system(json_t *v, srv_request *rq, srv_error *e) {
    if (!v || json_is_null(v)) return 0;
    if (json_is_string(v)) return srv_chat_add(rq, DS4_ROLE_SYSTEM, json_string_value(v), e) < 0;
    if (!json_is_array(v)) return srv_invalid(e);
    ds4_buf b = DS4_BUF_INIT;
    size_t i;
    json_t *p;
    json_array_foreach(v, i, p) {
        if (!json_is_string(p) && !json_is_object(p)) { /* a part of the wrong type (an outside pass sent 7) */
            ds4_buf_free(&b);
            return srv_invalid(e);
        }
        const char *s = json_is_string(p) ? json_string_value(p)
                                          : json_string_value(json_object_get(p, "text"));
        if (!s || !strncmp(s, "x-anthropic-", 12)) continue;
        if (b.len && b.data[b.len - 1] != '\n') ds4_buf_putc(&b, '\n');
        ds4_buf_puts(&b, s);
    }
    int rc = srv_chat_add(rq, DS4_ROLE_SYSTEM, b.data ? b.data : "", e) < 0 ? -1 : 0;
    ds4_buf_free(&b);
    return rc;
}


static int parse_message(json_t *m, srv_request *rq, srv_error *e) {
    if (!json_is_object(m)) return srv_invalid(e);
    char *role = NULL;
    if (srv_get_string(m, "role", &role, e)) return -1;
    ds4_role r = ds4_chat_role_from_name(role ? role : "user"); /* role defaults to user (SERVING B.4) */
    if (r != DS4_ROLE_USER && r != DS4_ROLE_ASSISTANT) {
        srv_fail(e, 400, "messages: role must be 'user' or 'assistant', not '%.64s'", role);
        free(role);
        return -1;
    }
    free(role);
    json_t *content = json_object_get(m, "content");
    if (content && !json_is_null(content) && !json_is_string(content) && !json_is_array(content))
        return srv_invalid(e);
    ds4_buf text = DS4_BUF_INIT, reasoning = DS4_BUF_INIT;
    int rc = -1;
    int idx = -1;
    char *result_id = NULL;
    if (json_is_string(content)) ds4_buf_puts(&text, json_string_value(content));
    /* calls are attached after the message exists; collect them first */
    json_t *calls = json_array(), *more_ids = json_array();
    if (json_is_array(content)) {
        size_t i;
        json_t *bl;
        json_array_foreach(content, i, bl) {
            if (json_is_string(bl)) {
                ds4_buf_puts(&text, json_string_value(bl));
                continue;
            }
            if (!json_is_object(bl)) { /* a block of the wrong type (a number, an array): not silently dropped */
                srv_invalid(e);
                goto out;
            }
            const char *type = json_string_value(json_object_get(bl, "type"));
            const char *t = json_string_value(json_object_get(bl, "text"));
            const char *th = json_string_value(json_object_get(bl, "thinking"));
            /* a text or thinking of the wrong type, or a text block without its text: a 400 (the block was
             * dropped, the user's text lost without a word) */
            json_t *tv = json_object_get(bl, "text"), *hv = json_object_get(bl, "thinking");
            if ((tv && !t) || (hv && !th) || (!tv && type && !strcmp(type, "text"))) {
                srv_fail(e, 400, "messages: content block %zu: \"text\" and \"thinking\" must be strings", i);
                goto out;
            }
            if (type && !strcmp(type, "tool_use")) {
                json_array_append(calls, bl);
            } else if (type && !strcmp(type, "tool_result")) {
                const char *id = json_string_value(json_object_get(bl, "tool_use_id"));
                if (!id) {
                    srv_invalid(e);
                    goto out;
                }
                /* no call in the request: must answer the live binding
                 * (checked before queueing, srv_submit) */
                if (!srv_chat_call_known(rq->chat, id)) srv_note_live_id(rq, id);
                char *rt = NULL;
                if (srv_text_of(json_object_get(bl, "content"), NULL, &rt, e)) goto out;
                ds4_dsml_tool_result(&text, rt, strlen(rt));
                free(rt);
                if (result_id) { /* an earlier result of the message (parallel calls), after it is added */
                    json_array_append_new(more_ids, json_string(result_id));
                    free(result_id);
                }
                result_id = xstrdup(id);
            } else {
                if (t) ds4_buf_puts(&text, t); /* text and unknown blocks with text */
                else if (srv_media_text(bl, type)) ds4_buf_puts(&text, srv_media_text(bl, type));
                if (th) ds4_buf_puts(&reasoning, th);
            }
        }
    }
    if (!ds4_buf_ok(&text) || !ds4_buf_ok(&reasoning)) {
        srv_fail(e, 500, "out of memory");
        goto out;
    }
    idx = srv_chat_add(rq, r, text.data ? text.data : "", e);
    if (idx < 0) goto out;
    ds4_err err;
    if (reasoning.len && ds4_chat_add_reasoning(rq->chat, idx, reasoning.data, reasoning.len, &err)) {
        srv_fail(e, 500, "%s", err.msg);
        goto out;
    }
    if (result_id && ds4_chat_set_tool_call_id(rq->chat, idx, result_id, &err)) {
        srv_fail(e, 500, "%s", err.msg);
        goto out;
    }
    size_t mi;
    json_t *mv;
    json_array_foreach(more_ids, mi, mv) {
        const int n = rq->n_more_result_ids;
        rq->more_result_ids = xrealloc(rq->more_result_ids, sizeof *rq->more_result_ids * (size_t)(n + 1));
        rq->more_result_msg = xrealloc(rq->more_result_msg, sizeof *rq->more_result_msg * (size_t)(n + 1));
        rq->more_result_ids[n] = xstrdup(json_string_value(mv));
        rq->more_result_msg[n] = idx;
        rq->n_more_result_ids = n + 1;
    }
    size_t i;
    json_t *c;
    json_array_foreach(calls, i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        const char *id = json_string_value(json_object_get(c, "id"));
        json_t *in = json_object_get(c, "input");
        if (!name) continue;
        char *args = in ? srv_json_text(in) : xstrdup("{}");
        int k = ds4_chat_add_call(rq->chat, idx, id, name, args, strlen(args), &err);
        free(args);
        if (k < 0) {
            srv_fail(e, 500, "%s", err.msg);
            goto out;
        }
    }
    rc = 0;
out:
    json_decref(calls);
    json_decref(more_ids);
    free(result_id);
    ds4_buf_free(&text);
    ds4_buf_free(&reasoning);
    return rc;
}

static int parse_tool_choice_anthropic(json_t *tc, srv_request *rq, srv_error *e) {
    if (!tc || json_is_null(tc)) return 0;
    if (!json_is_object(tc)) return srv_invalid(e);
    const char *type = json_string_value(json_object_get(tc, "type"));
    json_t *dp = json_object_get(tc, "disable_parallel_tool_use");
    if (dp && !json_is_null(dp) && !json_is_boolean(dp)) return srv_invalid(e);
    rq->single_call = json_is_true(dp);
    if (!type) return 0;
    if (!strcmp(type, "none")) rq->tool_choice = SRV_TOOL_NONE;
    else if (!strcmp(type, "any")) rq->tool_choice = SRV_TOOL_REQUIRED;
    else if (!strcmp(type, "tool")) {
        const char *name = json_string_value(json_object_get(tc, "name"));
        if (!name) return srv_invalid(e);
        rq->tool_choice = SRV_TOOL_NAMED;
        rq->tool_choice_name = xstrdup(name);
    } else if (strcmp(type, "auto")) {
        return srv_fail_param(e, "tool_choice.type", "invalid_value",
                              "tool_choice.type must be auto, any, tool or none, not '%.64s'", type);
    }
    if (rq->tool_choice == SRV_TOOL_REQUIRED && !(rq->tools_text && rq->tools_text[0]))
        return srv_fail_param(e, "tool_choice", "invalid_value", "tool_choice '%s' needs tools", type);
    return 0;
}

int srv_parse_anthropic(json_t *root, srv_request *rq, srv_error *e) {
    const char *effort = NULL;
    json_t *oc = json_object_get(root, "output_config");
    json_t *ev = json_object_get(root, "reasoning_effort");
    if (oc && !json_is_null(oc)) {
        if (!json_is_object(oc)) return srv_invalid(e);
        json_t *v = json_object_get(oc, "effort");
        if (v && !json_is_null(v) && !json_is_string(v)) return srv_invalid(e);
        if (v) effort = json_string_value(v);
    }
    if (ev && !json_is_null(ev)) {
        if (!json_is_string(ev)) return srv_invalid(e);
        effort = json_string_value(ev);
    }
    if (srv_parse_thinking(root, rq, effort, effort != NULL, e)) return -1;
    if (parse_system(json_object_get(root, "system"), rq, e)) return -1;
    if (srv_parse_messages(root, rq, e, parse_message)) return -1;
    if (srv_parse_tools(json_object_get(root, "tools"), rq, e)) return -1;
    if (parse_tool_choice_anthropic(json_object_get(root, "tool_choice"), rq, e)) return -1;
    /* structured outputs (B.13): output_config.format, or the beta's output_format */
    json_t *fmt = json_object_get(oc, "format");
    const char *field = "output_config.format";
    if (!fmt || json_is_null(fmt)) {
        fmt = json_object_get(root, "output_format");
        field = "output_format";
    }
    if (srv_parse_json_format(fmt, false, rq, field, e)) return -1;
    rq->cache_control = has_cache_control(root, 0);
    return 0;
}

/* ---- responses ------------------------------------------------------------ */

static json_t *usage_anthropic(const srv_request *rq, const srv_usage *raw, bool start) {
    srv_usage u = srv_usage_clamp(*raw);
    int fresh = u.prompt - u.cached;
    int created = rq->cache_control ? fresh : 0;
    return json_pack("{s:i, s:i, s:i, s:i}", "input_tokens", fresh - created, "output_tokens",
                     start ? 0 : u.completion, "cache_read_input_tokens", u.cached,
                     "cache_creation_input_tokens", created);
}

static const char *stop_reason(const srv_result *r) {
    if (r->stop) return "stop_sequence";
    return r->finish == SRV_FINISH_TOOL_CALLS ? "tool_use"
           : r->finish == SRV_FINISH_LENGTH   ? "max_tokens"
                                              : "end_turn";
}

static json_t *stop_sequence(const srv_result *r) {
    return r->stop ? srv_jstr(r->stop, strlen(r->stop)) : json_null();
}

/* A call's input object. An integer beyond 64 bits (JSON sets no limit;
 * the stream sends the model's digits) cannot live in a jansson value
 * without rounding: *raw then gets the arguments' text (UTF-8 repaired) to
 * splice into the reply in place of the returned placeholder, so the reply
 * carries the streamed digits. */
static json_t *tool_input(const ds4_tool_call *c, int i, char **raw) {
    char *args = srv_args_compact(c);
    bool wide = false;
    json_t *v = srv_json_value_w(args, &wide);
    if (v && json_is_object(v) && wide) {
        json_t *fixed = srv_jstr(args, strlen(args));
        *raw = xstrdup(json_string_value(fixed));
        json_decref(fixed);
        json_decref(v);
        free(args);
        char ph[48];
        snprintf(ph, sizeof ph, "\001ds4-raw-input-%d\001", i);
        return json_string(ph);
    }
    free(args);
    return v && json_is_object(v) ? v : (json_decref(v), json_object());
}

/* Replaces each placeholder string of tool_input by its raw text. */
static char *splice_raw(char *s, char **raw, int n) {
    for (int i = 0; i < n; i++) {
        if (!raw[i]) continue;
        char ph[48];
        snprintf(ph, sizeof ph, "\"\\u0001ds4-raw-input-%d\\u0001\"", i);
        char *at = strstr(s, ph);
        if (!at) continue;
        const size_t pre = (size_t)(at - s), pl = strlen(ph), rl = strlen(raw[i]), tail = strlen(at + pl);
        char *o = xmalloc(pre + rl + tail + 1);
        memcpy(o, s, pre);
        memcpy(o + pre, raw[i], rl);
        memcpy(o + pre + rl, at + pl, tail + 1);
        free(s);
        s = o;
    }
    return s;
}

static char *messages_body(srv_job *j, const srv_result *r) {
    json_t *content = json_array();
    const ds4_dsml_result *p = &r->parsed;
    if (p->reasoning && p->reasoning_len)
        json_array_append_new(content, json_pack("{s:s, s:o, s:s}", "type", "thinking", "thinking",
                                                 srv_jstr(p->reasoning, p->reasoning_len),
                                                 "signature", j->id));
    if (p->content_len)
        json_array_append_new(content, json_pack("{s:s, s:o}", "type", "text", "text",
                                                 srv_jstr(p->content, p->content_len)));
    char **raw = xcalloc(p->n_calls ? (size_t)p->n_calls : 1, sizeof *raw);
    for (int i = 0; i < p->n_calls; i++)
        json_array_append_new(content,
                              json_pack("{s:s, s:s, s:o, s:o}", "type", "tool_use", "id",
                                        p->calls[i].id ? p->calls[i].id : "", "name",
                                        srv_jstr(p->calls[i].name, strlen(p->calls[i].name)),
                                        "input", tool_input(&p->calls[i], i, &raw[i])));
    if (!p->content_len && !p->n_calls) /* a text block, even an empty one */
        json_array_append_new(content, json_pack("{s:s, s:s}", "type", "text", "text", ""));
    json_t *root = json_pack("{s:s, s:s, s:s, s:s, s:o, s:s, s:o, s:o}", "id", j->id, "type",
                             "message", "role", "assistant", "model", j->rq.model, "content",
                             content, "stop_reason", stop_reason(r), "stop_sequence",
                             stop_sequence(r), "usage", usage_anthropic(&j->rq, &r->usage, false));
    char *s = splice_raw(srv_json_text(root), raw, p->n_calls);
    json_decref(root);
    for (int i = 0; i < p->n_calls; i++) free(raw[i]);
    free(raw);
    return s;
}

static void event(srv_job *j, const char *name, json_t *v) { srv_sse_json(j, name, v); }

static void block_stop(srv_job *j) {
    anthropic_state *st = anth_st(j);
    if (st->open_block == BLOCK_NONE) return;
    if (st->open_block == BLOCK_THINKING)
        event(j, "content_block_delta",
              json_pack("{s:s, s:i, s:{s:s, s:s}}", "type", "content_block_delta", "index",
                        st->block_index, "delta", "type", "signature_delta", "signature", j->id));
    event(j, "content_block_stop",
          json_pack("{s:s, s:i}", "type", "content_block_stop", "index", st->block_index));
    st->open_block = BLOCK_NONE;
    st->block_index++;
}

static void block_start(srv_job *j, int kind, json_t *cb) {
    anthropic_state *st = anth_st(j);
    block_stop(j);
    st->open_block = kind;
    event(j, "content_block_start",
          json_pack("{s:s, s:i, s:o}", "type", "content_block_start", "index", st->block_index,
                    "content_block", cb));
}

static void msg_begin(srv_job *j) {
    event(j, "message_start",
          json_pack("{s:s, s:{s:s, s:s, s:s, s:s, s:[], s:n, s:n, s:o}}", "type", "message_start",
                    "message", "id", j->id, "type", "message", "role", "assistant", "model",
                    j->rq.model, "content", "stop_reason", "stop_sequence", "usage",
                    usage_anthropic(&j->rq, &j->usage, true)));
}

static void msg_reasoning(srv_job *j, const char *s, size_t n) {
    anthropic_state *st = anth_st(j);
    if (st->open_block != BLOCK_THINKING)
        block_start(j, BLOCK_THINKING,
                    json_pack("{s:s, s:s, s:s}", "type", "thinking", "thinking", "", "signature", ""));
    st->sent_reasoning = true;
    event(j, "content_block_delta",
          json_pack("{s:s, s:i, s:{s:s, s:o}}", "type", "content_block_delta", "index",
                    st->block_index, "delta", "type", "thinking_delta", "thinking", srv_jstr(s, n)));
}

static void msg_content(srv_job *j, const char *s, size_t n, const srv_logprob *lp, int n_lp) {
    anthropic_state *st = anth_st(j);
    (void)lp, (void)n_lp;
    if (st->open_block != BLOCK_TEXT)
        block_start(j, BLOCK_TEXT, json_pack("{s:s, s:s}", "type", "text", "text", ""));
    st->sent_text = true;
    event(j, "content_block_delta",
          json_pack("{s:s, s:i, s:{s:s, s:o}}", "type", "content_block_delta", "index",
                    st->block_index, "delta", "type", "text_delta", "text", srv_jstr(s, n)));
}

static void msg_tool_begin(srv_job *j, int index, const char *id, const char *name) {
    (void)index;
    block_start(j, BLOCK_TOOL,
                json_pack("{s:s, s:s, s:o, s:{}}", "type", "tool_use", "id", id, "name",
                          srv_jstr(name, strlen(name)), "input"));
}

static void msg_tool_args(srv_job *j, int index, const char *s, size_t n) {
    anthropic_state *st = anth_st(j);
    (void)index;
    if (st->open_block != BLOCK_TOOL) return;
    event(j, "content_block_delta",
          json_pack("{s:s, s:i, s:{s:s, s:o}}", "type", "content_block_delta", "index",
                    st->block_index, "delta", "type", "input_json_delta", "partial_json",
                    srv_jstr(s, n)));
}

static void msg_tool_end(srv_job *j, int index) {
    (void)index;
    if (anth_st(j)->open_block == BLOCK_TOOL) block_stop(j);
}

static void msg_finish(srv_job *j, const srv_result *r) {
    block_stop(j);
    if (r->finish == SRV_FINISH_ERROR) {
        /* Anthropic has no error stop_reason: a turn that failed after the
         * headers (shutdown, an evaluation failure, a tool call the model
         * left open) ends with an error event, never a normal end_turn
         * (SERVING.md B.8); the non-streamed form is an error response */
        bool shutdown = !strcmp(r->error_msg, "shutdown requested");
        event(j, "error", json_pack("{s:s, s:{s:s, s:s}}", "type", "error", "error", "type",
                                    shutdown ? "overloaded_error" : "api_error", "message",
                                    r->error_msg[0] ? r->error_msg : "generation failed"));
        return;
    }
    const ds4_dsml_result *p = &r->parsed;
    /* calls not streamed live: start + one full delta + stop */
    for (int i = j->n_tool_started; i < p->n_calls; i++) {
        const ds4_tool_call *c = &p->calls[i];
        msg_tool_begin(j, i, c->id ? c->id : "", c->name);
        char *args = srv_args_compact(c);
        msg_tool_args(j, i, args, strlen(args));
        free(args);
        block_stop(j);
    }
    anthropic_state *st = anth_st(j);
    if (!st->sent_text && p->n_calls == 0) {
        /* the body's rule: a message always has a text block after thinking */
        block_start(j, BLOCK_TEXT, json_pack("{s:s, s:s}", "type", "text", "text", ""));
        block_stop(j);
    }
    event(j, "message_delta",
          json_pack("{s:s, s:{s:s, s:o}, s:o}", "type", "message_delta", "delta", "stop_reason",
                    stop_reason(r), "stop_sequence", stop_sequence(r), "usage",
                    usage_anthropic(&j->rq, &r->usage, false)));
    event(j, "message_stop", json_pack("{s:s}", "type", "message_stop"));
}

const srv_emitter srv_emitter_anthropic = {
    .state_size = sizeof(anthropic_state),
    .begin = msg_begin,
    .reasoning = msg_reasoning,
    .content = msg_content,
    .tool_begin = msg_tool_begin,
    .tool_args = msg_tool_args,
    .tool_end = msg_tool_end,
    .finish = msg_finish,
    .body = messages_body,
};
