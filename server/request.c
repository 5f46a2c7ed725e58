/* request.c - the wire-independent request record, the request prologue
 * and JSON field readers shared by the four API parsers, and the response
 * pieces they share (usage, finish reasons, error bodies).
 *
 * Invariants: after a successful parse every srv_msg has a non-NULL content;
 * strings are NUL-terminated copies owned by the request (jansson rejects
 * invalid UTF-8 and NUL bytes, so they hold valid UTF-8 without NULs);
 * stops holds only non-empty strings. A recognized field with the wrong JSON
 * type makes the request invalid (400 "invalid JSON request", docs/SERVING.md B.4);
 * unknown fields are ignored. Nothing here touches the engine or a socket.
 */
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"
#include "util/xalloc.h"

void srv_request_init(srv_request *rq, srv_api api) {
    memset(rq, 0, sizeof *rq);
    rq->api = api;
    rq->max_tokens = SRV_MAX_TOKENS_DEFAULT;
    /* API defaults of TEXT D.1 */
    rq->temperature = 1.0f;
    rq->top_p = 1.0f;
    rq->min_p = 0.05f;
    rq->think = DS4_THINK_HIGH;
}

void srv_request_free(srv_request *rq) {
    free(rq->model);
    for (int i = 0; i < rq->n_stops; i++) free(rq->stops[i]);
    free(rq->stops);
    for (int i = 0; i < rq->n_live_ids; i++) free(rq->live_ids[i]);
    free(rq->live_ids);
    free(rq->tail_text);
    for (int i = 0; i < rq->n_tail_ids; i++) free(rq->tail_ids[i]);
    free(rq->tail_ids);
    free(rq->msg_off);
    for (int i = 0; i < rq->n_more_result_ids; i++) free(rq->more_result_ids[i]);
    free(rq->more_result_ids);
    free(rq->more_result_msg);
    ds4_chat_free(rq->chat);
    free(rq->prompt);
    free(rq->tools_text);
    json_decref(rq->tools_json);
    json_decref(rq->json_schema);
    free(rq->bias_ids);
    free(rq->bias_vals);
    free(rq->tool_choice_name);
    for (int i = 0; i < rq->n_aliases; i++) {
        free(rq->aliases[i].rendered);
        free(rq->aliases[i].name);
        free(rq->aliases[i].ns);
    }
    free(rq->aliases);
    free(rq->text);
    free(rq->tokens);
    free(rq->raw_body);
    json_decref(rq->echo);
    memset(rq, 0, sizeof *rq);
}

void srv_logprob_free(srv_logprob *lp, int n) {
    for (int i = 0; i < n; i++) {
        free(lp[i].tok.bytes);
        for (int k = 0; k < lp[i].n_top; k++) free(lp[i].top[k].bytes);
        free(lp[i].top);
    }
    free(lp);
}

void srv_result_free(srv_result *r) {
    ds4_dsml_result_free(&r->parsed);
    free(r->text);
    srv_logprob_free(r->lp, r->n_lp);
    memset(r, 0, sizeof *r);
}

bool srv_tools_active(const srv_request *rq) {
    return rq->tools_text && rq->tools_text[0] && rq->tool_choice != SRV_TOOL_NONE;
}

int srv_fail(srv_error *e, int status, const char *fmt, ...) {
    if (!e) return -1;
    e->status = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

/* A copy of JSON text whose integer literals beyond 64 bits get ".0" (read
 * as reals then), or NULL when it has none. Strings are skipped. */
static char *widen_big_ints(const char *s, size_t n, size_t *out_n) {
    ds4_buf b = DS4_BUF_INIT;
    bool changed = false;
    size_t i = 0;
    while (i < n) {
        const char c = s[i];
        if (c == '"') { /* a string, escapes included */
            size_t j = i + 1;
            while (j < n && s[j] != '"') j += s[j] == '\\' ? 2 : 1;
            j = j < n ? j + 1 : n;
            ds4_buf_append(&b, s + i, j - i);
            i = j;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            size_t j = i + (c == '-'), d0 = j;
            while (j < n && s[j] >= '0' && s[j] <= '9') j++;
            const size_t nd = j - d0;
            bool frac = j < n && (s[j] == '.' || s[j] == 'e' || s[j] == 'E');
            while (j < n && ((s[j] >= '0' && s[j] <= '9') || s[j] == '.' || s[j] == 'e' || s[j] == 'E' ||
                             s[j] == '+' || s[j] == '-'))
                j++;
            ds4_buf_append(&b, s + i, j - i);
            if (!frac && nd >= 19) { /* 19 digits may still fit: compare with INT64_MAX / -INT64_MIN */
                const char *lim = c == '-' ? "9223372036854775808" : "9223372036854775807";
                if (nd > 19 || memcmp(s + d0, lim, 19) > 0) {
                    ds4_buf_puts(&b, ".0");
                    changed = true;
                }
            }
            i = j;
        } else {
            size_t j = i + 1;
            while (j < n && s[j] != '"' && s[j] != '-' && !(s[j] >= '0' && s[j] <= '9')) j++;
            ds4_buf_append(&b, s + i, j - i);
            i = j;
        }
    }
    if (!changed || !ds4_buf_ok(&b)) {
        ds4_buf_free(&b);
        return NULL;
    }
    return ds4_buf_detach(&b, out_n);
}

/* srv_json_loadb with jansson's error of a failed parse in *je */
static json_t *json_loadb_e(const char *buf, size_t n, size_t flags, bool *widened, json_error_t *je) {
    if (widened) *widened = false;
    json_t *v = json_loadb(buf, n, flags, je);
    if (v || !strstr(je->text, "too big")) return v;
    size_t wn = 0;
    char *w = widen_big_ints(buf, n, &wn);
    if (!w) return NULL;
    v = json_loadb(w, wn, flags, je);
    free(w);
    if (v && widened) *widened = true;
    return v;
}

json_t *srv_json_loadb(const char *buf, size_t n, size_t flags, bool *widened) {
    json_error_t je;
    return json_loadb_e(buf, n, flags, widened, &je);
}

/* The values a body may hold, counted as its brackets and commas outside
 * strings (an upper bound of arrays, objects and their members): jansson
 * spends ~50-100 bytes on each, so a 45 MB body of nested empty arrays took
 * 2 GB of memory to parse. 2^21 leaves room for a 1M-token prompt sent as
 * token ids. */
#define SRV_MAX_JSON_VALUES ((size_t)1 << 21)

static size_t json_value_count(const char *s, size_t n, size_t cap) {
    size_t k = 0;
    for (size_t i = 0; i < n && k <= cap; i++) {
        const char c = s[i];
        if (c == '"') { /* the string, escapes included; the loop steps over its closing quote */
            i++;
            while (i < n && s[i] != '"') i += s[i] == '\\' ? 2 : 1;
        } else if (c == '[' || c == '{' || c == ',') {
            k++;
        }
    }
    return k;
}

/* The body as one JSON object; else a 400 "invalid JSON request: why" (why
 * and where it failed: a client that sent valid JSON with a string jansson
 * cannot hold, \u0000 or an unpaired surrogate, learns which). */
json_t *srv_load_object(const char *body, size_t n, srv_error *e) {
    json_error_t je;
    /* a raw NUL is never JSON (outside strings only whitespace, inside only
     * escaped); jansson passes over one right after a number, so a body
     * such as {"a":5<NUL>,"b":true} was read as if it were not there */
    const char *nul = memchr(body, '\0', n);
    if (nul) {
        srv_fail(e, 400, "invalid JSON request: a NUL byte at offset %zu (JSON text holds none)", (size_t)(nul - body));
        return NULL;
    }
    if (json_value_count(body, n, SRV_MAX_JSON_VALUES) > SRV_MAX_JSON_VALUES) {
        srv_fail(e, 413, "request too large: the JSON body holds more than %zu values (arrays, objects and their "
                 "members)", SRV_MAX_JSON_VALUES);
        return NULL;
    }
    json_t *root = json_loadb_e(body, n, 0, NULL, &je);
    if (root && !json_is_object(root)) {
        json_decref(root);
        srv_fail(e, 400, "invalid JSON request: the body is not a JSON object");
        return NULL;
    }
    if (!root) {
        if (strstr(je.text, "\\u0000"))
            srv_fail(e, 400, "invalid JSON request: a string holds \\u0000 (NUL), which is not supported (line %d, "
                     "column %d)", je.line, je.column);
        else if (strstr(je.text, "invalid Unicode"))
            srv_fail(e, 400, "invalid JSON request: a string holds an unpaired UTF-16 surrogate escape, which is not "
                     "valid Unicode (line %d, column %d)", je.line, je.column);
        else
            srv_fail(e, 400, "invalid JSON request: %s (line %d, column %d)", je.text, je.line, je.column);
    }
    return root;
}

static int bad_type(srv_error *e) { return srv_fail(e, 400, "invalid JSON request"); }

int srv_fail_param(srv_error *e, const char *param, const char *code, const char *fmt, ...) {
    if (!e) return -1;
    e->status = 400;
    e->param = param;
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int srv_invalid(srv_error *e) { return bad_type(e); }

void srv_note_live_id(srv_request *rq, const char *id) {
    rq->live_ids = xrealloc(rq->live_ids, sizeof *rq->live_ids * (size_t)(rq->n_live_ids + 1));
    rq->live_ids[rq->n_live_ids++] = xstrdup(id);
}

bool srv_chat_call_known(const ds4_chat *c, const char *id) {
    for (int i = 0; i < c->n_msgs; i++)
        for (int k = 0; k < c->msgs[i].n_calls; k++)
            if (c->msgs[i].calls[k].id && !strcmp(c->msgs[i].calls[k].id, id)) return true;
    return false;
}

/* a member of the wrong type, named (key: a string literal of the caller) */
static int bad_member(srv_error *e, const char *key, const char *want) {
    return srv_fail_param(e, key, "invalid_type", "invalid JSON request: %s must be %s", key, want);
}

int srv_get_string(json_t *obj, const char *key, char **out, srv_error *e) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return bad_member(e, key, "a string");
    free(*out);
    *out = xstrdup(json_string_value(v));
    return 0;
}

int srv_get_bool(json_t *obj, const char *key, bool *out, srv_error *e) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) return bad_member(e, key, "true or false");
    *out = json_is_true(v);
    return 0;
}

/* Integers are read as doubles and truncated; negatives become 0 (B.4). */
int srv_get_int(json_t *obj, const char *key, int *out, srv_error *e) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) return bad_member(e, key, "a number");
    double d = json_number_value(v);
    if (!(d > 0)) d = 0; /* also NaN */
    if (d > 2147483647.0) d = 2147483647.0;
    *out = (int)d;
    return 0;
}

/* A count given as an integer or a whole-number real (2.0: JSON does not
 * tell them apart, and n / max_tokens / top_k take both); false for anything
 * else, fractions and values past 2^53 included. */
static bool whole_number(json_t *v, json_int_t *out) {
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return true;
    }
    if (!json_is_real(v)) return false;
    const double d = json_real_value(v);
    if (!(d == floor(d)) || fabs(d) > 9007199254740992.0) return false;
    *out = (json_int_t)d;
    return true;
}

int srv_get_float(json_t *obj, const char *key, float *out, srv_error *e) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) return bad_member(e, key, "a number");
    double d = json_number_value(v);
    if (!isfinite(d)) return bad_member(e, key, "a finite number");
    *out = (float)d;
    return 0;
}

const char *srv_media_placeholder(const char *type) {
    static const char *kinds[][2] = {
        {"image_url", "image"}, {"image", "image"}, {"input_image", "image"}, {"input_audio", "audio"},
        {"audio", "audio"}, {"file", "file"}, {"input_file", "file"}, {"document", "document"}};
    static const char *text[] = {"[image omitted: this model reads text only]",
                                 "[audio omitted: this model reads text only]",
                                 "[file omitted: this model reads text only]",
                                 "[document omitted: this model reads text only]"};
    if (!type) return NULL;
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (!strcmp(type, kinds[i][0]))
            return text[!strcmp(kinds[i][1], "image") ? 0 : !strcmp(kinds[i][1], "audio") ? 1
                        : !strcmp(kinds[i][1], "file") ? 2 : 3];
    return NULL;
}

const char *srv_media_text(json_t *part, const char *type) {
    json_t *src = type && !strcmp(type, "document") ? json_object_get(part, "source") : NULL;
    const char *st = json_string_value(json_object_get(src, "type"));
    const char *data = json_string_value(json_object_get(src, "data"));
    if (st && data && !strcmp(st, "text")) return data; /* an Anthropic plain-text document: its text */
    return srv_media_placeholder(type);
}

int srv_text_of(json_t *v, const char *sep, char **out, srv_error *e) {
    ds4_buf b = DS4_BUF_INIT;
    if (!v || json_is_null(v)) {
        *out = xstrdup("");
        return 0;
    }
    if (json_is_string(v)) {
        *out = xstrdup(json_string_value(v));
        return 0;
    }
    if (!json_is_array(v)) return bad_type(e);
    size_t i;
    json_t *p;
    int n = 0;
    json_array_foreach(v, i, p) {
        const char *s = NULL;
        json_t *tx = json_is_object(p) ? json_object_get(p, "text") : NULL;
        const char *ty = json_is_object(p) ? json_string_value(json_object_get(p, "type")) : NULL;
        /* a part of the wrong type (a number; a text that is not a string; a text part without text) is a 400:
         * it was dropped, and the user's text lost without a word */
        if (!json_is_string(p) && (!json_is_object(p) || (tx && !json_is_string(tx)) ||
                                   (!tx && ty && !strcmp(ty, "text")))) {
            ds4_buf_free(&b);
            return srv_fail(e, 400, "content part %zu: expected a string or an object with a string \"text\" "
                                    "(or a media part)", i);
        }
        if (json_is_string(p))
            s = json_string_value(p);
        else if (tx)
            s = json_string_value(tx);
        else /* media: the model is told what it cannot see */
            s = srv_media_text(p, ty);
        if (!s) continue; /* other parts carry no text */
        if (sep && n > 0) ds4_buf_puts(&b, sep);
        ds4_buf_puts(&b, s);
        n++;
    }
    if (!ds4_buf_ok(&b)) {
        ds4_buf_free(&b);
        return srv_fail(e, 500, "out of memory");
    }
    *out = ds4_buf_detach(&b, NULL);
    return 0;
}

#define DUMP_FLAGS (JSON_COMPACT | JSON_ENCODE_ANY | JSON_PRESERVE_ORDER)

static bool has_real(json_t *v, int depth) {
    if (depth > 4096) return false;
    const char *k;
    json_t *x;
    size_t i;
    switch (json_typeof(v)) {
    case JSON_REAL: return true;
    case JSON_OBJECT:
        json_object_foreach(v, k, x) if (has_real(x, depth + 1)) return true;
        return false;
    case JSON_ARRAY:
        json_array_foreach(v, i, x) if (has_real(x, depth + 1)) return true;
        return false;
    default: return false;
    }
}

/* v as compact JSON with each real in its shortest form that reads back as
 * the same double ("0.1", not json_dumps's 17 digits "0.10000000000000001":
 * tool schemas and arguments reach the prompt as the client wrote them);
 * strings, integers and literals exactly as json_dumps writes them. */
static void dump_shortest(ds4_buf *b, json_t *v) {
    const char *k;
    json_t *x;
    size_t i;
    char num[40];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        ds4_buf_puts(b, "{");
        bool first = true;
        json_object_foreach(v, k, x) {
            if (!first) ds4_buf_puts(b, ",");
            first = false;
            json_t *ks = json_string(k);
            char *kt = ks ? json_dumps(ks, DUMP_FLAGS) : NULL;
            ds4_buf_puts(b, kt ? kt : "\"\"");
            free(kt);
            json_decref(ks);
            ds4_buf_puts(b, ":");
            dump_shortest(b, x);
        }
        ds4_buf_puts(b, "}");
        break;
    }
    case JSON_ARRAY:
        ds4_buf_puts(b, "[");
        json_array_foreach(v, i, x) {
            if (i) ds4_buf_puts(b, ",");
            dump_shortest(b, x);
        }
        ds4_buf_puts(b, "]");
        break;
    case JSON_REAL: {
        /* the fewest significant digits that read back as d, laid out as
         * json_dumps's "%.17g" lays it out: plain digits for exponents
         * -4..16 (100.0, not 1e+02), else an exponent (1e-07) */
        const double d = json_real_value(v);
        int p = 1;
        for (; p <= 17; p++) {
            snprintf(num, sizeof num, "%.*e", p - 1, d);
            if (strtod(num, NULL) == d) break;
        }
        if (p > 17) p = 17;
        const char *ex = strchr(num, 'e');
        const int x = ex ? atoi(ex + 1) : 0;
        if (x >= -4 && x < 17) snprintf(num, sizeof num, "%.*f", p - 1 - x > 0 ? p - 1 - x : 0, d);
        else snprintf(num, sizeof num, "%.*g", p, d);
        ds4_buf_puts(b, num);
        if (!strpbrk(num, ".eEnN")) ds4_buf_puts(b, ".0"); /* still a real, as json_dumps writes one */
        break;
    }
    default: {
        char *t = json_dumps(v, DUMP_FLAGS);
        ds4_buf_puts(b, t ? t : "null");
        free(t);
    }
    }
}

char *srv_json_text(json_t *v) {
    if (v && has_real(v, 0)) {
        ds4_buf b = DS4_BUF_INIT;
        dump_shortest(&b, v);
        if (ds4_buf_ok(&b)) return ds4_buf_detach(&b, NULL);
        ds4_buf_free(&b);
    }
    char *s = json_dumps(v, DUMP_FLAGS);
    return s ? s : xstrdup("{}");
}

int srv_chat_add(srv_request *rq, ds4_role role, const char *content, srv_error *e) {
    ds4_err err;
    int i = ds4_chat_add(rq->chat, role, content, strlen(content), &err);
    if (i < 0) srv_fail(e, 500, "%s", err.msg);
    return i;
}

int srv_effort(const char *s, bool *think_off, bool *max) {
    *think_off = *max = false;
    if (!strcmp(s, "max")) *max = true;
    else if (!strcmp(s, "none")) *think_off = true;
    else if (strcmp(s, "xhigh") && strcmp(s, "high") && strcmp(s, "medium") && strcmp(s, "low") &&
             strcmp(s, "minimal"))
        return -1;
    return 0;
}

/* docs/SERVING.md B.5: thinking / think / effort / model aliases. effort is the
 * API's effort string (NULL when absent or null). A request that says
 * nothing keeps rq->think, the server default the prologue put there
 * (--default-thinking). */
int srv_parse_thinking(json_t *root, srv_request *rq, const char *effort, bool effort_set,
                       srv_error *e) {
    bool enabled = rq->think != DS4_THINK_NONE, explicit_ctl = false;
    bool max = rq->think == DS4_THINK_MAX;
    /* Responses has no thinking/think fields (B.4): only reasoning.effort */
    json_t *t = rq->api == SRV_API_RESPONSES ? NULL : json_object_get(root, "thinking");
    if (t && !json_is_null(t)) {
        if (json_is_boolean(t)) {
            enabled = json_is_true(t);
            explicit_ctl = true;
        } else if (json_is_object(t)) {
            json_t *ty = json_object_get(t, "type");
            if (ty && !json_is_null(ty) && !json_is_string(ty)) return bad_type(e);
            const char *s = json_string_value(ty);
            if (s && (!strcmp(s, "enabled") || !strcmp(s, "adaptive"))) enabled = true, explicit_ctl = true;
            else if (s && !strcmp(s, "disabled")) enabled = false, explicit_ctl = true;
            else if (s) /* a typo must not pick a mode silently */
                return srv_fail_param(e, "thinking.type", "invalid_value",
                                      "thinking.type must be 'enabled', 'adaptive' or 'disabled', not '%.64s'", s);
            /* Anthropic's budget_tokens: the reasoning is closed once it has
             * written that many tokens (a target, as Anthropic says) */
            json_t *bt = json_object_get(t, "budget_tokens");
            json_int_t btv;
            if (bt && !json_is_null(bt)) {
                if (!whole_number(bt, &btv)) return bad_type(e);
                if (btv < 1)
                    return srv_fail_param(e, "thinking.budget_tokens", "invalid_value",
                                          "thinking.budget_tokens must be at least 1");
                rq->think_budget = btv > INT32_MAX ? INT32_MAX : (int)btv;
            }
        } else {
            return bad_type(e);
        }
    }
    if (rq->api != SRV_API_RESPONSES) {
        json_t *k = json_object_get(root, "think");
        if (k && !json_is_null(k)) {
            if (!json_is_boolean(k)) return bad_type(e);
            enabled = json_is_true(k);
            explicit_ctl = true;
        }
    }
    if (effort) {
        bool off, mx;
        if (srv_effort(effort, &off, &mx) < 0) return srv_fail(e, 400, "invalid JSON request");
        /* an effort asks for reasoning unless thinking was turned off */
        if (off) enabled = false;
        else if (!explicit_ctl) enabled = true;
        max = mx;
        if (rq->api == SRV_API_RESPONSES) explicit_ctl = true;
    }
    (void)effort_set;
    if (!explicit_ctl && rq->model) {
        if (!strcmp(rq->model, "deepseek-chat")) enabled = false;
        else if (!strcmp(rq->model, "deepseek-reasoner")) enabled = true;
    }
    rq->think = !enabled ? DS4_THINK_NONE : max ? DS4_THINK_MAX : DS4_THINK_HIGH;
    return 0;
}

/* Stop strings: at most SRV_MAX_STOPS (OpenAI allows 4; every one is
 * matched after every token), each kept once. */
#define SRV_MAX_STOPS 256
static int push_stop(srv_request *rq, const char *s, srv_error *e) {
    if (!s[0]) return 0; /* empty strings are ignored */
    if (rq->n_stops >= SRV_MAX_STOPS) return srv_fail(e, 400, "too many stop sequences (at most %d)", SRV_MAX_STOPS);
    if ((rq->n_stops & (rq->n_stops - 1)) == 0) /* 0, 1, 2, 4, ...: capacity doubles */
        rq->stops = xrealloc(rq->stops, sizeof *rq->stops * (size_t)(rq->n_stops ? 2 * rq->n_stops : 1));
    rq->stops[rq->n_stops++] = xstrdup(s);
    return 0;
}

static int parse_stops(json_t *v, srv_request *rq, srv_error *e) {
    if (!v || json_is_null(v)) return 0;
    if (json_is_string(v)) return push_stop(rq, json_string_value(v), e);
    if (!json_is_array(v)) return bad_type(e);
    size_t i;
    json_t *p;
    json_array_foreach(v, i, p) {
        if (!json_is_string(p)) return bad_type(e); /* a stop the client meant must not be dropped */
        if (push_stop(rq, json_string_value(p), e)) return -1;
    }
    return 0;
}

/* A token limit: a whole number >= 0, or -1 for no limit but the context
 * (llama.cpp's convention, which some clients send); absent or null keeps
 * *out. Anything else is a 400 naming the field (a negative limit used to
 * become 0: an empty reply). */
static int get_limit(json_t *root, const char *key, int *out, srv_error *e) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) return bad_member(e, key, "a number");
    double d = json_number_value(v);
    if (d != floor(d)) return srv_fail_param(e, key, "invalid_value", "%s must be a whole number", key);
    if (d == -1) {
        *out = -1;
        return 0;
    }
    if (d < 0) return srv_fail_param(e, key, "invalid_value", "%s must be >= 0 (or -1: no limit)", key);
    *out = d > 2147483647.0 ? 2147483647 : (int)d;
    return 0;
}

/* A sampling knob inside [lo, hi] (absent or null keeps *out). */
static int get_ranged(json_t *root, const char *key, float lo, float hi, float *out, srv_error *e) {
    float v = *out;
    if (srv_get_float(root, key, &v, e)) return -1;
    if (!(v >= lo && v <= hi))
        return srv_fail_param(e, key, "invalid_value", "%s must be between %g and %g", key, (double)lo, (double)hi);
    *out = v;
    return 0;
}

/* logit_bias: {"TOKEN_ID": bias in [-100, 100], ...} (OpenAI), at most
 * SRV_MAX_BIAS entries; ids are checked against the vocabulary later. */
#define SRV_MAX_BIAS 1024
static int parse_logit_bias(json_t *v, srv_request *rq, srv_error *e) {
    if (!v || json_is_null(v)) return 0;
    if (!json_is_object(v))
        return srv_fail_param(e, "logit_bias", "invalid_value", "logit_bias must be an object of token ids to biases");
    if (json_object_size(v) > SRV_MAX_BIAS)
        return srv_fail_param(e, "logit_bias", "invalid_value", "logit_bias: at most %d tokens", SRV_MAX_BIAS);
    rq->bias_ids = xcalloc(json_object_size(v) + 1, sizeof *rq->bias_ids);
    rq->bias_vals = xcalloc(json_object_size(v) + 1, sizeof *rq->bias_vals);
    const char *k;
    json_t *b;
    json_object_foreach(v, k, b) {
        size_t n = strlen(k);
        /* decimal, no leading zero ("05" would bias token 5 a second time) */
        bool digits = n > 0 && n <= 10 && strspn(k, "0123456789") == n && (k[0] != '0' || n == 1);
        long long id = digits ? strtoll(k, NULL, 10) : -1;
        if (id < 0 || id > INT32_MAX)
            return srv_fail_param(e, "logit_bias", "invalid_value", "logit_bias: '%.40s' is not a token id", k);
        if (!json_is_number(b) || !(json_number_value(b) >= -100.0 && json_number_value(b) <= 100.0))
            return srv_fail_param(e, "logit_bias", "invalid_value",
                                  "logit_bias: the bias of token %lld must be a number between -100 and 100", id);
        rq->bias_ids[rq->n_bias] = (int32_t)id;
        rq->bias_vals[rq->n_bias++] = (float)json_number_value(b);
    }
    return 0;
}

/* n / best_of (one choice is all we generate: anything else is a 400
 * naming the field, never one silent choice) and logprobs: chat has
 * logprobs (bool) + top_logprobs (0..20), completions logprobs (0..5). */
static int parse_choices_and_logprobs(json_t *root, srv_request *rq, srv_error *e) {
    static const char *const one[] = {"n", "best_of"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(root, one[i]);
        if (!v || json_is_null(v)) continue;
        if (!json_is_number(v)) return bad_type(e);
        if (json_number_value(v) != 1)
            return srv_fail_param(e, one[i], "unsupported_value",
                                  "%s must be 1: ds4-server generates one choice per request "
                                  "(send several requests instead)", one[i]);
    }
    json_t *lp = json_object_get(root, "logprobs");
    json_t *tl = json_object_get(root, "top_logprobs");
    if (rq->api == SRV_API_CHAT) {
        if (lp && !json_is_null(lp)) {
            if (!json_is_boolean(lp)) return bad_type(e);
            rq->logprobs = json_is_true(lp);
        }
        if (tl && !json_is_null(tl)) {
            json_int_t k;
            if (!whole_number(tl, &k)) return bad_type(e);
            if (k < 0 || k > 20)
                return srv_fail_param(e, "top_logprobs", "invalid_value",
                                      "top_logprobs must be between 0 and 20");
            if (!rq->logprobs)
                return srv_fail_param(e, "top_logprobs", "invalid_value",
                                      "top_logprobs requires logprobs to be true");
            rq->top_logprobs = (int)k;
        }
    } else if (lp && !json_is_null(lp)) {
        json_int_t k;
        if (!whole_number(lp, &k)) return bad_type(e);
        if (k < 0 || k > 5)
            return srv_fail_param(e, "logprobs", "invalid_value", "logprobs must be between 0 and 5");
        rq->logprobs = true;
        rq->top_logprobs = (int)k;
    }
    return 0;
}

/* model, stream, max tokens, sampling knobs and stops (per the B.4 table). */
int srv_parse_sampling(json_t *root, srv_request *rq, srv_error *e) {
    srv_api api = rq->api;
    if (srv_get_string(root, "model", &rq->model, e)) return -1;
    if (!rq->model) rq->model = xstrdup(SRV_MODEL_ID);
    if (strlen(rq->model) > 256) /* echoed in every stream chunk */
        return srv_fail_param(e, "model", "invalid_value", "model: at most 256 bytes");
    if (srv_get_bool(root, "stream", &rq->stream, e)) return -1;
    /* ignore_eos: every API (the extension vLLM and llama.cpp take; load
     * generators send it to get replies of exactly max_tokens) */
    if (srv_get_bool(root, "ignore_eos", &rq->ignore_eos, e)) return -1;
    if (get_limit(root, "max_tokens", &rq->max_tokens, e)) return -1;
    rq->max_tokens_set = json_object_get(root, "max_tokens") && !json_is_null(json_object_get(root, "max_tokens"));
    if (api == SRV_API_CHAT && get_limit(root, "max_completion_tokens", &rq->max_tokens, e)) return -1;
    if (api == SRV_API_RESPONSES && get_limit(root, "max_output_tokens", &rq->max_tokens, e)) return -1;
    /* the knobs' ranges: temperature 0 (greedy) up to a generous 100 (the
     * APIs stop at 1 or 2), probabilities in [0, 1], top_k >= 0 (0: off) */
    if (get_ranged(root, "temperature", 0.0f, 100.0f, &rq->temperature, e)) return -1;
    if (get_ranged(root, "top_p", 0.0f, 1.0f, &rq->top_p, e)) return -1;
    /* top_p 0 asks for the smallest nucleus (the OpenAI and Anthropic
     * meaning: the top token); the sampler reads p <= 0 as "no top-p"
     * (TEXT D.3), so it gets the smallest positive p instead */
    if (rq->top_p == 0.0f) rq->top_p = FLT_MIN;
    if (api != SRV_API_RESPONSES) {
        json_t *k = json_object_get(root, "top_k");
        if (k && json_is_number(k) && json_number_value(k) < 0)
            return srv_fail_param(e, "top_k", "invalid_value", "top_k must be >= 0 (0: no top-k)");
        json_int_t kv;
        if (k && json_is_real(k) && !whole_number(k, &kv))
            return srv_fail_param(e, "top_k", "invalid_value", "top_k must be a whole number (a count of tokens)");
        if (srv_get_int(root, "top_k", &rq->top_k, e)) return -1;
    }
    /* seed: every API (an extension for Anthropic and Responses, whose
     * clients send it as an extra member): seeded replies are reproducible */
    /* every integer is its own stream (0 too: evaluation harnesses send
     * seed 0 and expect the same reply twice; a client's random 32/64-bit
     * seeds must not collapse onto one value: negatives are their 64-bit
     * two's complement), except -1, llama.cpp's "random"; reals (integers
     * past 64 bits) are cut to an integer and clamped to the 64-bit range */
    json_t *sv = json_object_get(root, "seed");
    if (sv && !json_is_null(sv)) {
        if (json_is_integer(sv)) {
            json_int_t v = json_integer_value(sv);
            rq->seeded = v != -1;
            rq->seed = (uint64_t)v;
        } else if (json_is_real(sv)) {
            double d = json_real_value(sv);
            rq->seeded = d != -1.0;
            rq->seed = d >= 0.0 ? (d < 18446744073709551615.0 ? (uint64_t)d : UINT64_MAX)
                                : (uint64_t)(d > -9223372036854775808.0 ? (int64_t)d : INT64_MIN);
        } else {
            return bad_type(e);
        }
    }
    if (api == SRV_API_CHAT || api == SRV_API_COMPLETIONS) {
        if (get_ranged(root, "min_p", 0.0f, 1.0f, &rq->min_p, e)) return -1;
        json_t *so = json_object_get(root, "stream_options");
        if (so && !json_is_null(so)) {
            if (!json_is_object(so)) return bad_type(e);
            if (srv_get_bool(so, "include_usage", &rq->include_usage, e)) return -1;
        }
        if (parse_stops(json_object_get(root, "stop"), rq, e)) return -1;
        if (parse_choices_and_logprobs(root, rq, e)) return -1;
        if (get_ranged(root, "presence_penalty", -2.0f, 2.0f, &rq->presence_penalty, e)) return -1;
        if (get_ranged(root, "frequency_penalty", -2.0f, 2.0f, &rq->frequency_penalty, e)) return -1;
        if (parse_logit_bias(json_object_get(root, "logit_bias"), rq, e)) return -1;
    }
    if (api == SRV_API_ANTHROPIC && parse_stops(json_object_get(root, "stop_sequences"), rq, e))
        return -1;
    if (rq->top_k > 1024) rq->top_k = 1024;
    return 0;
}

static void add_alias(srv_request *rq, const char *rendered, const char *name, const char *ns) {
    rq->aliases = xrealloc(rq->aliases, sizeof *rq->aliases * (size_t)(rq->n_aliases + 1));
    srv_tool_alias *a = &rq->aliases[rq->n_aliases++];
    a->rendered = xstrdup(rendered);
    a->name = xstrdup(name);
    a->ns = xstrdup(ns);
}

/* Appends one schema line (TEXT C.1) and records the schema object. The line
 * is the compact re-serialization of the client's JSON (jansson keeps member
 * order; whitespace of the original bytes is not kept). */
static void add_schema(srv_request *rq, ds4_buf *lines, json_t *schema) {
    /* an Anthropic cache breakpoint is transport, not the tool: clients move
     * it between requests (Claude Code marks the last tool), which changed
     * the system block and re-prefilled the whole conversation */
    json_t *shown = schema;
    if (json_is_object(schema) && json_object_get(schema, "cache_control")) {
        shown = json_copy(schema);
        if (shown) json_object_del(shown, "cache_control");
        else shown = schema;
    }
    char *s = srv_json_text(shown);
    if (shown != schema) json_decref(shown);
    if (lines->len) ds4_buf_putc(lines, '\n');
    ds4_buf_puts(lines, s);
    free(s);
    json_array_append(rq->tools_json, schema);
}

static json_t *empty_params(void) {
    return json_pack("{s:s, s:{}}", "type", "object", "properties");
}

/* A tool name the model can write and the DSML parser can read back:
 * non-empty, no control characters, no '"', '<', '>' (the invoke header's
 * syntax) and no U+FF5C (the markers' bar). Long names are fine (forced
 * calls write them whole). */
static bool tool_name_ok(const char *s) {
    if (!s || !s[0] || strstr(s, "\xef\xbd\x9c")) return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p < 0x20 || *p == 0x7f || *p == '"' || *p == '<' || *p == '>' || *p == '&') return false;
    return true;
}

static int bad_tool_name(srv_error *e, size_t i, json_t *name) {
    const char *s = json_string_value(name);
    return srv_fail(e, 400,
                    "tools[%zu]: %s (a tool needs a non-empty name without control characters, "
                    "'\"', '<', '>', '&' or '\xef\xbd\x9c')",
                    i, !name ? "the function has no name" : !s ? "the name is not a string" : "the name is not usable");
}

/* A freeform tool (Responses {"type":"custom","name","description","format"})
 * as the function the model can call: one string parameter `input` holding
 * the whole raw input, the format's grammar in the description. The schema
 * object in tools_json carries "x-ds4-custom" (after it was rendered) so the
 * call goes back to the client as a custom tool call with that input. */
static json_t *custom_tool_schema(json_t *t) {
    const char *name = json_string_value(json_object_get(t, "name"));
    const char *desc = json_string_value(json_object_get(t, "description"));
    json_t *fmt = json_object_get(t, "format");
    const char *ftype = json_string_value(json_object_get(fmt, "type"));
    const char *syntax = json_string_value(json_object_get(fmt, "syntax"));
    const char *def = json_string_value(json_object_get(fmt, "definition"));
    ds4_buf d = DS4_BUF_INIT;
    if (desc && desc[0]) ds4_buf_puts(&d, desc), ds4_buf_puts(&d, "\n\n");
    ds4_buf_puts(&d, "Freeform tool: put its whole input, as raw text (not JSON), in the string parameter `input`.");
    if (ftype && !strcmp(ftype, "grammar") && def) {
        ds4_buf_puts(&d, " The input must match this ");
        ds4_buf_puts(&d, syntax ? syntax : "");
        ds4_buf_puts(&d, " grammar:\n");
        ds4_buf_puts(&d, def);
    }
    if (!ds4_buf_ok(&d)) {
        ds4_buf_free(&d);
        return NULL;
    }
    char *dt = ds4_buf_detach(&d, NULL);
    json_t *syn = json_pack("{s:s, s:s, s:{s:s, s:{s:{s:s, s:s}}, s:[s]}}", "name", name, "description", dt,
                            "parameters", "type", "object", "properties", "input", "type", "string",
                            "description", "the tool's whole input, raw text", "required", "input");
    free(dt);
    return syn;
}

bool srv_tool_is_custom(const srv_request *rq, const char *name) {
    size_t i;
    json_t *t;
    json_array_foreach(rq->tools_json, i, t) {
        const char *n = json_string_value(json_object_get(t, "name"));
        if (n && name && !strcmp(n, name) && json_is_true(json_object_get(t, "x-ds4-custom"))) return true;
    }
    return false;
}

/* The name a tools[] entry or an allowed_tools entry refers to: function.name
 * (chat), custom.name (chat custom) or name; NULL for hosted tools. */
static const char *tool_ref_name(json_t *t) {
    const char *n = json_string_value(json_object_get(json_object_get(t, "function"), "name"));
    if (!n) n = json_string_value(json_object_get(json_object_get(t, "custom"), "name"));
    if (!n) n = json_string_value(json_object_get(t, "name"));
    return n;
}

static bool tool_allowed(json_t *allowed, const char *name, const char *type, const char *ns) {
    size_t i;
    json_t *a;
    json_array_foreach(allowed, i, a) {
        const char *an = tool_ref_name(a), *at = json_string_value(json_object_get(a, "type"));
        const char *ans = json_string_value(json_object_get(a, "namespace"));
        if (name && an && !strcmp(name, an) && (!ans || (ns && !strcmp(ns, ans)))) return true;
        if (!name && !an && type && at && !strcmp(type, at)) return true; /* a hosted tool by its type */
    }
    return false;
}

json_t *srv_filter_tools(json_t *tools, json_t *allowed) {
    json_t *out = json_array();
    size_t i;
    json_t *t;
    json_array_foreach(tools, i, t) {
        const char *type = json_string_value(json_object_get(t, "type"));
        if (type && !strcmp(type, "namespace") && json_is_array(json_object_get(t, "tools"))) {
            const char *ns = json_string_value(json_object_get(t, "name"));
            json_t *inner = json_array(), *keep = json_deep_copy(t);
            size_t k;
            json_t *it;
            json_array_foreach(json_object_get(t, "tools"), k, it)
                if (tool_allowed(allowed, json_string_value(json_object_get(it, "name")), NULL, ns))
                    json_array_append(inner, it);
            if (json_array_size(inner)) {
                json_object_set_new(keep, "tools", inner);
                json_array_append_new(out, keep);
            } else {
                json_decref(inner);
                json_decref(keep);
            }
        } else if (json_is_object(t) && tool_allowed(allowed, tool_ref_name(t), type, NULL)) {
            json_array_append(out, t);
        }
    }
    return out;
}

int srv_parse_tools(json_t *tools, srv_request *rq, srv_error *e) {
    if (!tools || json_is_null(tools)) return 0;
    if (!json_is_array(tools)) return bad_type(e);
    if (!rq->tools_json) rq->tools_json = json_array();
    ds4_buf lines = DS4_BUF_INIT;
    if (rq->tools_text) ds4_buf_puts(&lines, rq->tools_text);
    size_t i;
    json_t *t;
    json_array_foreach(tools, i, t) {
        if (!json_is_object(t)) {
            ds4_buf_free(&lines);
            return bad_type(e);
        }
        json_t *fn = json_object_get(t, "function");
        const char *type = json_string_value(json_object_get(t, "type"));
        if (rq->api == SRV_API_ANTHROPIC && type) {
            /* "custom" is Anthropic's name for a client tool with an input_schema;
             * every other type is a server tool (web search, code execution:
             * run by Anthropic) or a client tool whose schema only Claude knows
             * (bash_*, text_editor_*, computer_*): shown to the model as a plain
             * tool it would be called as one, which no client expects */
            if (strcmp(type, "custom")) {
                ds4_buf_free(&lines);
                return srv_fail_param(e, "tools", "unsupported_value",
                                      "tools[%zu]: tools of type '%.64s' are not supported (ds4 runs no server tools "
                                      "and has no built-in tool schemas); declare a tool with an input_schema", i,
                                      type);
            }
            type = NULL;
        }
        if (type && !strcmp(type, "custom")) {
            if (rq->api != SRV_API_RESPONSES) {
                ds4_buf_free(&lines);
                return srv_fail_param(e, "tools", "unsupported_value",
                                      "tools[%zu]: custom (freeform) tools are supported on /v1/responses; here "
                                      "declare a function tool", i);
            }
            if (!tool_name_ok(json_string_value(json_object_get(t, "name")))) {
                ds4_buf_free(&lines);
                return bad_tool_name(e, i, json_object_get(t, "name"));
            }
            json_t *syn = custom_tool_schema(t);
            if (!syn) {
                ds4_buf_free(&lines);
                return srv_fail(e, 500, "out of memory");
            }
            add_schema(rq, &lines, syn);
            json_object_set_new(syn, "x-ds4-custom", json_true()); /* after rendering: not shown to the model */
            json_decref(syn);
            continue;
        }
        /* the function's own name (OpenAI chat: function.name; Anthropic and
         * Responses: name); hosted tools without a name stay as they are */
        json_t *own = fn && json_is_object(fn) ? fn : t;
        json_t *nmv = json_object_get(own, "name");
        /* a function by its fields, or by its type (none means a function: {} and {"type":"function"} were
         * shown to the model as schemas named by nothing) */
        bool is_fn = own == fn || json_object_get(t, "input_schema") || json_object_get(t, "parameters") || !type ||
                     !strcmp(type, "function");
        if ((nmv || is_fn) && !(type && !strcmp(type, "namespace")) && !tool_name_ok(json_string_value(nmv))) {
            ds4_buf_free(&lines);
            return bad_tool_name(e, i, nmv);
        }
        json_t *params = json_object_get(own, "parameters");
        if (!params) params = json_object_get(t, "input_schema");
        if (params && !json_is_object(params) && !json_is_null(params)) {
            ds4_buf_free(&lines);
            return srv_fail_param(e, "tools", "invalid_type", "tools[%zu]: the parameters schema must be a JSON object",
                                  i);
        }
        if (fn && json_is_object(fn)) {
            add_schema(rq, &lines, fn);
        } else if (type && !strcmp(type, "namespace")) {
            const char *ns = json_string_value(json_object_get(t, "name"));
            json_t *inner = json_object_get(t, "tools");
            if (!ns || !json_is_array(inner)) {
                ds4_buf_free(&lines);
                return bad_type(e);
            }
            size_t k0;
            json_t *it0;
            json_array_foreach(inner, k0, it0) {
                const char *ity = json_string_value(json_object_get(it0, "type"));
                if (ity && !strcmp(ity, "custom")) {
                    ds4_buf_free(&lines);
                    return srv_fail_param(e, "tools", "unsupported_value",
                                          "tools[%zu]: a custom tool inside a namespace is not supported (declare "
                                          "it at the top level)", i);
                }
            }
            size_t k;
            json_t *it;
            json_array_foreach(inner, k, it) {
                const char *nm = json_string_value(json_object_get(it, "name"));
                if (!json_is_object(it) || !nm) continue;
                if (!tool_name_ok(nm) || !tool_name_ok(ns)) {
                    ds4_buf_free(&lines);
                    return bad_tool_name(e, i, json_object_get(it, "name"));
                }
                json_t *desc = json_object_get(it, "description");
                json_t *par = json_object_get(it, "parameters");
                if (!par) par = json_object_get(it, "input_schema");
                char *full = malloc(strlen(ns) + strlen(nm) + 1);
                if (!full) {
                    ds4_buf_free(&lines);
                    return srv_fail(e, 500, "out of memory");
                }
                strcpy(full, ns);
                strcat(full, nm);
                json_t *syn = json_pack("{s:s, s:o, s:o}", "name", full, "description",
                                        json_is_string(desc) ? json_incref(desc) : json_string(""),
                                        "parameters", par ? json_incref(par) : empty_params());
                if (syn) add_schema(rq, &lines, syn);
                json_decref(syn);
                add_alias(rq, full, nm, ns);
                free(full);
            }
        } else if (type && !strcmp(type, "tool_search")) {
            json_t *desc = json_object_get(t, "description");
            json_t *par = json_object_get(t, "parameters");
            json_t *syn = json_pack(
                "{s:s, s:o, s:o}", "name", "tool_search", "description",
                json_is_string(desc) ? json_incref(desc) : json_string("Search available tools."),
                "parameters", par ? json_incref(par) : empty_params());
            if (syn) add_schema(rq, &lines, syn);
            json_decref(syn);
        } else {
            add_schema(rq, &lines, t);
        }
    }
    free(rq->tools_text);
    rq->tools_text = lines.len ? ds4_buf_detach(&lines, NULL) : NULL;
    ds4_buf_free(&lines);
    /* a custom tool's name is its own: its calls go back as custom calls by name */
    size_t a, b;
    json_t *ta, *tb;
    json_array_foreach(rq->tools_json, a, ta) {
        const char *na = json_string_value(json_object_get(ta, "name"));
        if (!na || !json_is_true(json_object_get(ta, "x-ds4-custom"))) continue;
        json_array_foreach(rq->tools_json, b, tb) {
            const char *nb = json_string_value(json_object_get(tb, "name"));
            if (b != a && nb && !strcmp(na, nb))
                return srv_fail_param(e, "tools", "invalid_value",
                                      "tools: the custom tool '%.100s' shares its name with another tool", na);
        }
    }
    return 0;
}

/* Two JSON values as a client may send the same arguments back: numbers
 * equal by value (a client may write the model's 2.0 as 2, or read an
 * integer beyond 64 bits as a real, B.4), objects whatever their member
 * order, everything else as json_equal. */
static bool json_same(json_t *a, json_t *b) {
    if (json_is_number(a) && json_is_number(b)) {
        if (json_is_integer(a) && json_is_integer(b)) return json_integer_value(a) == json_integer_value(b);
        return json_number_value(a) == json_number_value(b);
    }
    if (json_is_object(a) && json_is_object(b)) {
        if (json_object_size(a) != json_object_size(b)) return false;
        const char *k;
        json_t *v;
        json_object_foreach(a, k, v) {
            json_t *w = json_object_get(b, k);
            if (!w || !json_same(v, w)) return false;
        }
        return true;
    }
    if (json_is_array(a) && json_is_array(b)) {
        if (json_array_size(a) != json_array_size(b)) return false;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!json_same(json_array_get(a, i), json_array_get(b, i))) return false;
        return true;
    }
    return json_equal(a, b);
}

/* (the parser entity-decoding string values would turn a patch's literal
 * "&amp;" into "&") */
char *srv_raw_param(const char *raw, size_t n, int k, const char *param) {
    if (!raw) return NULL;
    static const char inv[] = "<" DS4_DSML_MARK "invoke name=\"";
    static const char close[] = "</" DS4_DSML_MARK "parameter>";
    const char *end = raw + n, *p = raw;
    for (int i = 0; p && i <= k; i++) {
        p = memmem(p, (size_t)(end - p), inv, sizeof inv - 1);
        if (p && i < k) p += sizeof inv - 1;
    }
    if (!p) return NULL;
    const char *next = memmem(p + 1, (size_t)(end - p - 1), inv, sizeof inv - 1);
    const char *lim = next ? next : end;
    char want[300];
    int w = snprintf(want, sizeof want, "<" DS4_DSML_MARK "parameter name=\"%s\"", param);
    if (w < 0 || (size_t)w >= sizeof want) return NULL;
    const char *q = memmem(p, (size_t)(lim - p), want, (size_t)w);
    if (!q || !(q = memchr(q, '>', (size_t)(lim - q)))) return NULL;
    q++;
    const char *e = memmem(q, (size_t)(lim - q), close, sizeof close - 1);
    if (!e) return NULL;
    char *out = xmalloc((size_t)(e - q) + 1);
    memcpy(out, q, (size_t)(e - q));
    out[e - q] = 0;
    return out;
}

/* JSON text the server produced from model output, read as the client
 * received it: invalid UTF-8 as U+FFFD (srv_jstr), NUL escapes allowed;
 * *widened: an integer beyond 64 bits read as a real. NULL if not JSON. */
static json_t *model_json(const char *text, size_t n, bool *widened) {
    json_t *fixed = srv_jstr(text, n);
    json_t *v = srv_json_loadb(json_string_value(fixed), json_string_length(fixed), JSON_DECODE_ANY | JSON_ALLOW_NUL,
                               widened);
    json_decref(fixed);
    return v;
}

/* Whether a client's call (name, arguments text) is the sampled call blk:
 * the same name and the same arguments as JSON values (json_same). An
 * integer beyond 64 bits in the client's text (chat and Responses keep its
 * digits) is compared by its digits: the compact texts must be equal. */
static bool same_call(const ds4_tool_call *sent, const ds4_tool_call *blk) {
    if (strcmp(sent->name, blk->name)) return false;
    bool wa = false, wb = false;
    json_t *a = srv_json_loadb(sent->arguments, sent->arguments_len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &wa);
    json_t *b = model_json(blk->arguments, blk->arguments_len, &wb);
    bool same = a && b && json_same(a, b);
    json_decref(a);
    json_decref(b);
    if (same && wa) {
        ds4_buf x = DS4_BUF_INIT, y = DS4_BUF_INIT;
        same = !ds4_dsml_args_compact(&x, sent->arguments, sent->arguments_len) &&
               !ds4_dsml_args_compact(&y, blk->arguments, blk->arguments_len) && ds4_buf_ok(&x) &&
               ds4_buf_ok(&y) && x.len == y.len && !memcmp(x.data, y.data, x.len);
        ds4_buf_free(&x);
        ds4_buf_free(&y);
    }
    return same;
}

/* A custom tool's call as Responses sends it: {"input": the model's
 * undecoded text of parameter `input`} (api_responses.c custom_input). */
static bool same_custom_input(const ds4_tool_call *sent, const ds4_tool_call *blk, const char *raw, size_t raw_len,
                              int k) {
    if (strcmp(sent->name, blk->name)) return false;
    json_t *a = srv_json_loadb(sent->arguments, sent->arguments_len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
    json_t *in = json_object_get(a, "input");
    char *rp = json_is_object(a) && json_object_size(a) == 1 && json_is_string(in)
                   ? srv_raw_param(raw, raw_len, k, "input")
                   : NULL;
    bool same = false;
    if (rp) {
        json_t *fixed = srv_jstr(rp, strlen(rp));
        same = json_string_length(fixed) == json_string_length(in) &&
               !memcmp(json_string_value(fixed), json_string_value(in), json_string_length(in));
        json_decref(fixed);
        free(rp);
    }
    json_decref(a);
    return same;
}

bool srv_calls_match(const ds4_chat_msg *m, const ds4_tool_call *calls, int n, const char *raw, size_t raw_len) {
    if (m->n_calls != n) return false;
    for (int j = 0; j < n; j++)
        if (!same_call(&m->calls[j], &calls[j]) && !same_custom_input(&m->calls[j], &calls[j], raw, raw_len, j))
            return false;
    return true;
}

/* Exact replay (TEXT C.8) emits the remembered block for a message whose
 * call ids name it; a client that edited a call's arguments or name before
 * sending it back would have the model read the calls it sampled, not the
 * ones the client says were made. Such a message is rendered canonically
 * (C.4) from what the client sent. */
static int mark_edited_calls(srv_request *rq, ds4_dsml_replay *replay, ds4_err *err) {
    ds4_chat *c = rq->chat;
    for (int i = 0; i < c->n_msgs; i++) {
        const ds4_chat_msg *m = &c->msgs[i];
        if (m->role != DS4_ROLE_ASSISTANT || m->n_calls == 0) continue;
        const char **ids = malloc((size_t)m->n_calls * sizeof *ids);
        if (!ids) return ds4_err_set(err, DS4_E_NOMEM, "tool calls");
        for (int j = 0; j < m->n_calls; j++) ids[j] = m->calls[j].id;
        size_t len = 0;
        const char *blk = ds4_dsml_replay_lookup(replay, ids, m->n_calls, &len);
        free(ids);
        if (!blk) continue;
        ds4_dsml_result r;
        int rc = ds4_dsml_parse(blk, len, 0, &r, err);
        if (rc) return rc;
        const bool same = !r.parse_failed && srv_calls_match(m, r.calls, r.n_calls, blk, len);
        ds4_dsml_result_free(&r);
        if (!same && (rc = ds4_chat_set_canonical_calls(c, i, err))) return rc;
    }
    return 0;
}

int srv_render(srv_request *rq, int n_ctx, ds4_dsml_replay *replay, srv_error *e) {
    ds4_buf out = DS4_BUF_INIT;
    ds4_err err = {0};
    int rc;
    if (rq->api == SRV_API_COMPLETIONS) {
        rc = ds4_chat_render_completion(&out, rq->prompt, strlen(rq->prompt),
                                        ds4_chat_effective_think(rq->think, n_ctx));
    } else {
        ds4_chat_set_think(rq->chat, rq->think, n_ctx);
        rc = 0;
        if (srv_tools_active(rq))
            rc = ds4_chat_set_tools(rq->chat, rq->tools_text, strlen(rq->tools_text), &err);
        if (!rc && replay) rc = mark_edited_calls(rq, replay, &err);
        if (!rc) {
            free(rq->msg_off);
            rq->msg_off = xcalloc((size_t)rq->chat->n_msgs + 1, sizeof *rq->msg_off);
            rc = ds4_chat_render_at(rq->chat, replay, &out, rq->msg_off, &err);
        }
    }
    if (rc || !ds4_buf_ok(&out)) {
        ds4_buf_free(&out);
        return srv_fail(e, 500, "rendering failed: %s", err.msg[0] ? err.msg : "out of memory");
    }
    rq->text = ds4_buf_detach(&out, &rq->text_len);
    return 0;
}

/* A tool output of the request's API: Responses tool/function messages,
 * Anthropic user messages carrying a tool_result id. */
static bool is_tool_output(srv_api api, const ds4_chat_msg *m) {
    if (!m->tool_call_id) return false;
    if (api == SRV_API_RESPONSES) return m->role == DS4_ROLE_TOOL || m->role == DS4_ROLE_FUNCTION;
    return m->role == DS4_ROLE_USER;
}

int srv_render_tail(srv_request *rq, int n_ctx, srv_error *e) {
    if ((rq->api != SRV_API_RESPONSES && rq->api != SRV_API_ANTHROPIC) || !rq->chat) return 0;
    const ds4_chat *c = rq->chat;
    /* the last tool output, with no assistant message after it (system
     * messages are rendered in the system block, not in the tail) */
    int last = -1;
    for (int i = c->n_msgs - 1; i >= 0; i--) {
        if (is_tool_output(rq->api, &c->msgs[i])) {
            last = i;
            break;
        }
        if (c->msgs[i].role == DS4_ROLE_ASSISTANT) return 0;
    }
    if (last < 0) return 0;
    int first = last;
    while (first > 0 && is_tool_output(rq->api, &c->msgs[first - 1])) first--;
    /* the tail rendered alone: BOS [+ Think-Max prefix] + USER ... + prefix */
    ds4_chat *sub = ds4_chat_new();
    ds4_buf out = DS4_BUF_INIT;
    ds4_err err = {0};
    int rc = sub ? 0 : DS4_E_NOMEM;
    if (!rc) ds4_chat_set_think(sub, c->think, n_ctx);
    for (int i = first; !rc && i < c->n_msgs; i++) {
        const ds4_chat_msg *m = &c->msgs[i];
        if (m->role == DS4_ROLE_SYSTEM || m->role == DS4_ROLE_DEVELOPER) continue;
        int k = ds4_chat_add(sub, m->role, m->content, m->content_len, &err);
        if (k < 0) rc = k;
        else if (m->tool_call_id) rc = ds4_chat_set_tool_call_id(sub, k, m->tool_call_id, &err);
    }
    if (!rc) rc = ds4_chat_render(sub, NULL, &out, &err);
    ds4_chat_free(sub);
    const char *body = NULL;
    if (!rc && ds4_buf_ok(&out) && out.len) body = memmem(out.data, out.len, DS4_USER, strlen(DS4_USER));
    if (!body) {
        ds4_buf_free(&out);
        return srv_fail(e, 500, "rendering failed: %s", err.msg[0] ? err.msg : "no tool-output tail");
    }
    ds4_buf t = DS4_BUF_INIT;
    ds4_buf_puts(&t, DS4_EOS);
    ds4_buf_append(&t, body, out.len - (size_t)(body - out.data));
    ds4_buf_free(&out);
    if (!ds4_buf_ok(&t)) {
        ds4_buf_free(&t);
        return srv_fail(e, 500, "out of memory");
    }
    rq->tail_text = ds4_buf_detach(&t, &rq->tail_len);
    rq->tail_first = first;
    rq->tail_ids = xcalloc((size_t)(last - first + 1) + (size_t)rq->n_more_result_ids, sizeof *rq->tail_ids);
    for (int i = first; i <= last; i++) {
        /* an Anthropic user message answers every call of its tool_result blocks (parallel calls) */
        for (int k = 0; k < rq->n_more_result_ids; k++)
            if (rq->more_result_msg[k] == i) rq->tail_ids[rq->n_tail_ids++] = xstrdup(rq->more_result_ids[k]);
        rq->tail_ids[rq->n_tail_ids++] = xstrdup(c->msgs[i].tool_call_id);
    }
    return 0;
}

/* The reply format (B.13): fmt is chat response_format or Responses
 * text.format, field its name for errors; def the object holding name,
 * description and schema (chat: fmt.json_schema; Responses: fmt). A JSON
 * format adds one system line saying what the reply must be (the
 * constraint makes it so; the line lets the model plan for it). */
int srv_parse_json_format(json_t *fmt, bool nested, srv_request *rq, const char *field, srv_error *e) {
    if (!fmt || json_is_null(fmt)) return 0;
    const char *t = json_string_value(json_object_get(fmt, "type"));
    if (!json_is_object(fmt) || !t)
        return srv_fail_param(e, field, "invalid_value", "%s must be an object with a type", field);
    if (!strcmp(t, "text")) return 0;
    if (strcmp(t, "json_object") && strcmp(t, "json_schema"))
        return srv_fail_param(e, field, "invalid_value",
                              "%s.type '%.60s' is not supported (text, json_object or json_schema)", field, t);
    if (!rq->chat) return srv_fail_param(e, field, "unsupported_value", "%s needs a chat request", field);
    if (rq->api == SRV_API_ANTHROPIC && strcmp(t, "json_schema"))
        return srv_fail_param(e, field, "invalid_value", "%s.type must be json_schema", field);
    rq->json_format = true;
    ds4_buf line = DS4_BUF_INIT;
    if (!strcmp(t, "json_object")) {
        ds4_buf_puts(&line, "Reply with one JSON object and nothing else.");
    } else {
        json_t *def = nested ? json_object_get(fmt, "json_schema") : fmt;
        if (!json_is_object(def))
            return srv_fail_param(e, field, "invalid_value", "%s.json_schema must be an object", field);
        json_t *sc = json_object_get(def, "schema"), *name = json_object_get(def, "name");
        json_t *desc = json_object_get(def, "description"), *strict = json_object_get(def, "strict");
        if ((name && !json_is_string(name)) || (desc && !json_is_null(desc) && !json_is_string(desc)) ||
            (strict && !json_is_null(strict) && !json_is_boolean(strict)) || (sc && !json_is_object(sc)))
            return srv_fail_param(e, field, "invalid_value",
                                  "%s: name and description must be strings, strict a boolean, schema an object",
                                  field);
        /* no schema: any JSON value, as the system line says */
        rq->json_schema = sc ? json_incref(sc) : json_true();
        ds4_buf_puts(&line, "Reply with one JSON value and nothing else");
        if (json_string_value(name)) ds4_buf_printf(&line, " (\"%s\")", json_string_value(name));
        if (json_string_value(desc) && json_string_length(desc))
            ds4_buf_printf(&line, ": %s", json_string_value(desc));
        if (sc) {
            char *st = srv_json_text(sc);
            ds4_buf_printf(&line, "%sIt must follow this JSON schema:\n%s", json_string_value(desc) ? "\n" : ". ", st);
            free(st);
        } else {
            ds4_buf_puts(&line, ".");
        }
    }
    /* the schema must compile; a prefill (the conversation ends in an
     * assistant message) is the start of the reply: it must be the start of
     * a value of the format, and the system line goes before it so that it
     * is still continued */
    char msg[256];
    srv_jsonc_schema *c = srv_jsonc_compile(rq->json_schema, msg, sizeof msg);
    const bool prefill = ds4_chat_continues(rq->chat);
    const ds4_chat_msg *m = prefill ? &rq->chat->msgs[rq->chat->n_msgs - 1] : NULL;
    const bool prefix_ok = !c || !m || srv_jsonc_schema_prefix(c, m->content, m->content_len);
    srv_jsonc_schema_free(c);
    if (!c || !prefix_ok) {
        ds4_buf_free(&line);
        return !c ? srv_fail_param(e, field, "invalid_value", "%s schema: %s", field, msg)
                  : srv_fail_param(e, field, "invalid_value",
                                   "%s: the assistant message to continue is not the start of a JSON value of the "
                                   "format", field);
    }
    int rc = !ds4_buf_ok(&line) ? srv_fail(e, 500, "out of memory")
             : srv_chat_add(rq, DS4_ROLE_SYSTEM, line.data, e) < 0 ? -1 : 0;
    ds4_buf_free(&line);
    if (!rc && prefill) ds4_chat_move_last(rq->chat, rq->chat->n_msgs - 2);
    return rc;
}

/* A tool_choice that names a function must name one of the request's tools
 * (otherwise a call to a tool the client does not have would be forced),
 * and the name must fit the DSML attribute it is written into. */
static int check_forced_name(const srv_request *rq, srv_error *e) {
    if (rq->tool_choice != SRV_TOOL_NAMED) return 0;
    const char *want = rq->tool_choice_name ? rq->tool_choice_name : "";
    if (strchr(want, '"') || strchr(want, '\n'))
        return srv_fail(e, 400, "tool_choice names an invalid function name");
    size_t i;
    json_t *t;
    json_array_foreach(rq->tools_json, i, t) {
        const char *name = json_string_value(json_object_get(t, "name"));
        if (name && !strcmp(name, want)) return 0;
    }
    return srv_fail(e, 400, "tool_choice names function '%.200s%s', which is not in tools", want,
                    strlen(want) > 200 ? "..." : "");
}

/* A forced call (tool_choice required or named) is built from the tool's
 * parameter schema (forced.c): that schema must compile as a response_format
 * schema does, or a call could come without a required property or with a
 * value of the wrong type and still be reported as finished (an adversarial
 * pass got {"x":1} for a string enum [1,2], and no "y" for required ["x",
 * "y"] with no property y). Tools that cannot be forced are not checked:
 * under tool_choice auto the model reads their schemas, nothing enforces
 * them. */
static int check_forced_schemas(const srv_request *rq, srv_error *e) {
    if (rq->api == SRV_API_COMPLETIONS || !srv_tools_active(rq) ||
        (rq->tool_choice != SRV_TOOL_REQUIRED && rq->tool_choice != SRV_TOOL_NAMED))
        return 0;
    size_t i;
    json_t *t;
    json_array_foreach(rq->tools_json, i, t) {
        const char *name = json_string_value(json_object_get(t, "name"));
        if (rq->tool_choice == SRV_TOOL_NAMED && (!name || !rq->tool_choice_name || strcmp(name, rq->tool_choice_name)))
            continue;
        json_t *p = json_object_get(t, "parameters");
        if (!p) p = json_object_get(t, "input_schema");
        if (!json_is_object(p)) continue;
        char msg[256];
        srv_jsonc_schema *c = srv_jsonc_compile(p, msg, sizeof msg);
        if (!c)
            return srv_fail_param(e, "tools", "invalid_value",
                                  "tool '%.100s' cannot be forced (tool_choice): its parameter schema: %s",
                                  name ? name : "", msg);
        srv_jsonc_schema_free(c);
    }
    return 0;
}

/* The prologue every API shares: one JSON object, the request record, the
 * conversation (chat-type APIs), model/stream/limits/sampling/stops. */
static json_t *prologue(srv_api api, const char *body, size_t n, ds4_think think_default,
                        srv_request *rq, srv_error *e) {
    srv_request_init(rq, api);
    rq->think = think_default;
    json_t *root = srv_load_object(body, n, e);
    if (!root) return NULL;
    if (api != SRV_API_COMPLETIONS && !(rq->chat = ds4_chat_new())) {
        srv_fail(e, 500, "out of memory");
        json_decref(root);
        return NULL;
    }
    if (srv_parse_sampling(root, rq, e)) {
        json_decref(root);
        return NULL;
    }
    return root;
}

int srv_parse_request(srv_api api, const char *body, size_t n, ds4_think think_default,
                      srv_request *rq, srv_error *e) {
    static int (*const parse[SRV_N_API])(json_t *, srv_request *, srv_error *) = {
        [SRV_API_CHAT] = srv_parse_chat,
        [SRV_API_COMPLETIONS] = srv_parse_completions,
        [SRV_API_RESPONSES] = srv_parse_responses,
        [SRV_API_ANTHROPIC] = srv_parse_anthropic,
    };
    if ((unsigned)api >= SRV_N_API) {
        srv_request_init(rq, SRV_API_CHAT);
        return srv_fail(e, 500, "unknown api");
    }
    json_t *root = prologue(api, body, n, think_default, rq, e);
    if (!root) return -1;
    int rc = parse[api](root, rq, e);
    json_decref(root);
    return rc ? rc : check_forced_name(rq, e) ? -1 : check_forced_schemas(rq, e);
}

/* ---- shared response pieces ---------------------------------------------- */

srv_usage srv_usage_clamp(srv_usage u) {
    if (u.prompt < 0) u.prompt = 0;
    if (u.cached < 0) u.cached = 0;
    if (u.cached > u.prompt) u.cached = u.prompt;
    if (u.completion < 0) u.completion = 0;
    if (u.reasoning < 0) u.reasoning = 0;
    if (u.reasoning > u.completion) u.reasoning = u.completion;
    return u;
}

json_t *srv_usage_openai(const srv_usage *raw) {
    srv_usage u = srv_usage_clamp(*raw);
    return json_pack("{s:i, s:i, s:i, s:{s:i, s:i}, s:{s:i}}", "prompt_tokens", u.prompt,
                     "completion_tokens", u.completion, "total_tokens", u.prompt + u.completion,
                     "prompt_tokens_details", "cached_tokens", u.cached, "cache_write_tokens",
                     u.prompt - u.cached, "completion_tokens_details", "reasoning_tokens", u.reasoning);
}

json_t *srv_lp_bytes(const srv_token_lp *t) {
    json_t *a = json_array();
    for (size_t i = 0; i < t->n; i++) json_array_append_new(a, json_integer((unsigned char)t->bytes[i]));
    return a;
}

const char *srv_finish_openai(srv_finish f) {
    switch (f) {
    case SRV_FINISH_STOP: return "stop";
    case SRV_FINISH_LENGTH: return "length";
    case SRV_FINISH_TOOL_CALLS: return "tool_calls";
    case SRV_FINISH_ERROR: return "error";
    }
    return "stop";
}

/* Anthropic's error type for a status (their documented set). */
static const char *anthropic_type(int status) {
    switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 413: return "request_too_large";
    case 429: return "rate_limit_error";
    case 503: return "overloaded_error";
    default: return status >= 500 ? "api_error" : "invalid_request_error";
    }
}

char *srv_error_body(srv_api api, const srv_error *e) {
    json_t *err;
    if (api == SRV_API_ANTHROPIC) {
        /* messages quote request text cut to a length (maybe inside a UTF-8
         * sequence, or bytes that are not UTF-8): repaired, never a {} body */
        err = json_pack("{s:s, s:o}", "type", anthropic_type(e->status), "message", srv_jstr(e->msg, strlen(e->msg)));
        if (e->context) {
            json_object_set_new(err, "n_prompt_tokens", json_integer(e->n_prompt));
            json_object_set_new(err, "n_ctx", json_integer(e->n_ctx));
        }
        json_t *root = json_pack("{s:s, s:o}", "type", "error", "error", err);
        char *s = srv_json_text(root);
        json_decref(root);
        return s;
    }
    /* OpenAI: message, type, param, code are always there (null when unknown) */
    const char *code = e->context ? "context_length_exceeded" : e->code;
    const char *param = e->context && !e->param ? "messages" : e->param;
    err = json_pack("{s:o, s:s, s:o, s:o}", "message", srv_jstr(e->msg, strlen(e->msg)), "type",
                    e->status >= 500 ? "server_error" : "invalid_request_error", "param",
                    param ? srv_jstr(param, strlen(param)) : json_null(), "code",
                    code ? json_string(code) : json_null());
    if (e->context) {
        json_object_set_new(err, "n_prompt_tokens", json_integer(e->n_prompt));
        json_object_set_new(err, "n_ctx", json_integer(e->n_ctx));
    }
    json_t *root = json_pack("{s:o}", "error", err);
    char *s = srv_json_text(root);
    json_decref(root);
    return s;
}

/* Length of a valid UTF-8 sequence at s[0..n), or 0 when invalid (overlongs,
 * surrogates and code points above U+10FFFF are invalid, as in jansson). */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned cp;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
    else return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;
    return len;
}

json_t *srv_json_value_w(const char *text, bool *widened) {
    /* model output may hold invalid UTF-8 inside string values, which
     * jansson refuses: parse the U+FFFD-repaired text (what srv_jstr sends
     * wherever the same text goes out as a string) */
    json_t *fixed = srv_jstr(text, strlen(text));
    json_t *v = srv_json_loadb(json_string_value(fixed), json_string_length(fixed), JSON_DECODE_ANY, widened);
    json_decref(fixed);
    return v;
}

json_t *srv_json_value(const char *text) { return srv_json_value_w(text, NULL); }

size_t srv_utf8_unit(const unsigned char *u, size_t n, bool *cut) {
    *cut = false;
    size_t k = u[0] ? utf8_seq(u, n) : 0; /* NUL is not allowed by jansson */
    if (k) return k;
    /* one U+FFFD per maximal subpart (Unicode 3.9): a lead byte and the
     * continuation bytes that still fit it, e.g. a sequence cut by the end
     * of the reply */
    unsigned c0 = u[0];
    size_t want = c0 >= 0xC2 && c0 <= 0xDF ? 2 : c0 >= 0xE0 && c0 <= 0xEF ? 3 : c0 >= 0xF0 && c0 <= 0xF4 ? 4 : 1;
    unsigned lo = c0 == 0xE0 ? 0xA0 : c0 == 0xF0 ? 0x90 : 0x80;
    unsigned hi = c0 == 0xED ? 0x9F : c0 == 0xF4 ? 0x8F : 0xBF;
    k = 1;
    while (k < want && k < n && u[k] >= (k == 1 ? lo : 0x80) && u[k] <= (k == 1 ? hi : 0xBF)) k++;
    *cut = k < want && k == n;
    return k;
}

json_t *srv_jstr(const char *s, size_t n) {
    if (!s) return json_string("");
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    bool clean = true;
    while (i < n) {
        size_t k = u[i] ? utf8_seq(u + i, n - i) : 0; /* NUL is not allowed by jansson */
        if (!k) {
            clean = false;
            break;
        }
        i += k;
    }
    if (clean) return json_stringn(s, n);
    ds4_buf b = DS4_BUF_INIT;
    for (i = 0; i < n;) {
        bool cut;
        const size_t k = srv_utf8_unit(u + i, n - i, &cut);
        if (u[i] && utf8_seq(u + i, n - i)) ds4_buf_append(&b, s + i, k);
        else ds4_buf_puts(&b, "\xEF\xBF\xBD");
        i += k;
    }
    json_t *v = b.data ? json_stringn(b.data, b.len) : json_string("");
    ds4_buf_free(&b);
    return v ? v : json_string("");
}
