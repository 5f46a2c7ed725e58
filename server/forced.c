/* forced.c - constrained decoding for a forced tool call (OpenAI
 * tool_choice "required" or a named function, Anthropic "any" or "tool").
 *
 * ds4 treats every tool_choice as auto; clients that force a call rely on
 * getting one, so the server constrains the DSML structure while the model
 * still picks the tool (among the allowed ones), the parameters (among the
 * schema's properties) and writes the string values itself:
 *
 *   [reasoning ... </think>]          free; </think> forced on EOS or budget
 *   \n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="      literal
 *   NAME">\n                          choice among the allowed tool names
 *   ( <｜DSML｜parameter name="P" string="true|false">   choice among unused
 *       VALUE                         properties, or the close once every
 *     </｜DSML｜parameter>\n )*        required property is present
 *   </｜DSML｜invoke>\n</｜DSML｜tool_calls>               literal
 *
 * String values are sampled freely (any text, '<' included: DSML string
 * values are raw); the value ends where the model writes the closing tag
 * `</｜DSML｜parameter>` itself (a token that holds the tag and more is not
 * taken: the tag's rest is written as the tokenizer writes it), on EOS, or
 * when the budget left only fits the rest of the call. The budget is
 * counted in the tokens the tokenizer writes for the markup still to come
 * (need): the closing tags, and each required property not written yet with
 * its tag, its shortest value and VALUE_ROOM tokens of room. Every step
 * keeps the call finishable in the tokens left: a property, name or value
 * whose shortest completion does not fit is withheld (an optional property
 * is offered only if the required ones keep their room), and a pick that
 * would leave too few tokens is replaced by the cheapest candidate's next
 * token. So a call is always whole and has every required property when
 * max_tokens holds the shortest call at all (about 30 tokens for a small
 * tool; below that no call comes, and the reply says "length"), and a long
 * optional value cannot crowd a required one out. There is no other length
 * limit: a value was once cut at 64
 * tokens or at its first '<', and a forced write_file call lost most of its
 * content without a word. A call the budget shaped (a value, a number or
 * the choice of properties cut short) is reported as cut by the token limit
 * (srv_forced_cut: OpenAI "length", Anthropic "max_tokens", Responses
 * "incomplete"), the call still well formed. Integers and numbers are
 * sampled the same way among tokens that keep them valid JSON numbers (up
 * to 12 tokens); enums (also string enums) are a choice among their values;
 * other non-string values a choice among JSON literals of the property's
 * type (a list of types or anyOf/oneOf: the first that is not null). A "choice" step masks the
 * logits to tokens whose bytes continue some candidate string and samples
 * greedily (structure is greedy, TEXT C.9); once one candidate is left its
 * rest is written as the tokenizer writes that text (the next turn's prompt
 * holds the same tokens, so KV reuse meets the tokens a fresh server would
 * read; the longest fitting tokens only when it cannot tokenize). The output is therefore always a
 * well-formed block that the normal DSML parser reads as one call, provided
 * max_tokens leaves room for the shortest call.
 *
 * Worker thread only; one srv_forced per generation.
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sampler.h"
#include "server.h"
#include "util/xalloc.h"

#define DSML DS4_DSML_MARK
#define MAX_NUM_TOKENS 12
#define VALUE_ROOM 8   /* tokens kept for the value of each required string property not written yet */
#define THINK_ROOM 48  /* reasoning closes this many tokens before the shortest call would no longer fit */
#define HEADER "\n\n<" DSML "tool_calls>\n<" DSML "invoke name=\""

enum { PH_THINK, PH_HEADER, PH_NAME, PH_PARAMS, PH_VALUE_STR, PH_VALUE_LIT, PH_VALUE_NUM, PH_CLOSE_VALUE, PH_DONE };

typedef struct cand {
    char *text;
    int action; /* what completing it means (phase-specific) */
    int after;  /* tokens the call needs once this candidate is written (need) */
} cand;

struct srv_forced {
    ds4_engine *e;
    int n_vocab;
    int32_t eos;
    float *scratch;          /* (n_vocab) masked logits */
    int phase;
    /* choice state */
    cand *cands;             /* (n_cands) */
    int n_cands;
    size_t pos;              /* bytes of the current choice already emitted */
    bool think_literal;      /* forcing "</think>" inside PH_THINK */
    char win[16];            /* last bytes (for "</think>" detection) */
    size_t win_len;
    /* tool schema */
    json_t *tools;           /* borrowed: array of schema objects */
    const char *forced_name; /* named tool or NULL */
    json_t *params;          /* the chosen tool's parameters schema ($defs for $ref; borrowed) */
    json_t *props;           /* properties of the chosen tool (borrowed) */
    json_t *required;        /* required array (borrowed) */
    char **used;             /* (n_used) property names already written */
    int n_used;
    int value_tokens;
    char vtail[32];          /* PH_VALUE_STR: the value's last bytes (a closing tag begun) */
    size_t vtail_len;
    bool cut;                /* the budget shaped the call (srv_forced_cut) */
    cand *off;               /* (n_off) candidates the budget no longer offers, watched: the model's */
    int n_off;               /* greedy choice of one of them is what sets cut (pick_choice) */
    int think_budget;        /* thinking.budget_tokens (0: none) */
    int think_tokens;        /* reasoning tokens sampled so far */
    int num_state;           /* PH_VALUE_NUM: position in -?(0|[1-9][0-9]*)(.[0-9]+)? (num_step) */
    bool num_frac;           /* the number may have a fraction (type number) */
    int think_need;          /* tokens the call needs once the reasoning is closed (with room) */
    int names_bare, names_room; /* names_need(f, 0), names_need(f, VALUE_ROOM) once known (-1 before):
                                 * they depend on the tools alone, as nothing is used before a name */
    uint8_t *ctl;            /* (n_vocab, made at the first string value) 1: a control token */
    int n_close_param, n_close_call, n_header; /* tokens of CLOSE_PARAM, CLOSE_CALL and HEADER */
    /* the chosen tool's required properties not in props or not key_ok are
     * left out; per property: its tag's tokens + its shortest value's */
    int n_req;
    char **req_key;
    int *req_cost;
    bool *req_str;
    /* the rest of the one candidate left, as the tokenizer writes it (pick_choice) */
    int32_t *lit;
    int lit_n, lit_i;
    size_t lit_pos;          /* f->pos where lit[lit_i] starts */
};

static void watch_clear(srv_forced *f) {
    for (int i = 0; i < f->n_off; i++) free(f->off[i].text);
    free(f->off);
    f->off = NULL;
    f->n_off = 0;
}

/* candidate c is no longer offered (the budget): watched instead of freed */
static void watch(srv_forced *f, cand c) {
    f->off = xrealloc(f->off, sizeof *f->off * (size_t)(f->n_off + 1));
    f->off[f->n_off++] = c;
}

static void cands_clear(srv_forced *f) {
    watch_clear(f);
    for (int i = 0; i < f->n_cands; i++) free(f->cands[i].text);
    free(f->cands);
    f->cands = NULL;
    f->n_cands = 0;
    f->pos = 0;
    f->lit_n = f->lit_i = 0;
}

/* appends a candidate (owning text) to the list cs of n */
static void list_take(cand **cs, int *n, char *text, int action) {
    *cs = xrealloc(*cs, sizeof **cs * (size_t)(*n + 1));
    (*cs)[*n].text = text;
    (*cs)[*n].action = action;
    (*cs)[*n].after = 0; /* (price) */
    (*n)++;
}

static void cand_take(srv_forced *f, char *text, int action) { list_take(&f->cands, &f->n_cands, text, action); }

static void cand_add(srv_forced *f, const char *text, int action) {
    cand_take(f, xstrdup(text), action);
}

/* a + b + c in a buffer sized from them: tool names and property keys come
 * from the request and have no length limit, and a truncated candidate
 * would be malformed markup. */
static char *cat3(const char *a, const char *b, const char *c) {
    size_t na = strlen(a), nb = strlen(b), nc = strlen(c);
    char *t = xmalloc(na + nb + nc + 1);
    memcpy(t, a, na);
    memcpy(t + na, b, nb);
    memcpy(t + na + nb, c, nc + 1);
    return t;
}

static const char *schema_name(json_t *t) {
    const char *n = json_string_value(json_object_get(t, "name"));
    return n;
}

static json_t *schema_params(json_t *t) {
    json_t *p = json_object_get(t, "parameters");
    if (!p) p = json_object_get(t, "input_schema");
    return json_is_object(p) ? p : NULL;
}

static int tok_count(const srv_forced *f, const char *text);
static int names_need(srv_forced *f, int room);
static void price(srv_forced *f);
static void req_free(srv_forced *f);

#define CLOSE_CALL "</" DSML "invoke>\n</" DSML "tool_calls>"
#define CLOSE_PARAM "</" DSML "parameter>\n"

srv_forced *srv_forced_new(ds4_engine *e, const srv_request *rq, bool thinking) {
    if (rq->api == SRV_API_COMPLETIONS || !srv_tools_active(rq)) return NULL;
    if (rq->tool_choice != SRV_TOOL_REQUIRED && rq->tool_choice != SRV_TOOL_NAMED) return NULL;
    srv_forced *f = xcalloc(1, sizeof *f);
    f->e = e;
    f->n_vocab = ds4_engine_n_vocab(e);
    f->eos = ds4_token_special(e, DS4_TOK_EOS);
    f->scratch = malloc((size_t)f->n_vocab * sizeof *f->scratch);
    if (!f->scratch) {
        free(f);
        return NULL;
    }
    f->tools = rq->tools_json;
    f->names_bare = f->names_room = -1;
    f->think_budget = rq->think_budget;
    f->forced_name = rq->tool_choice == SRV_TOOL_NAMED ? rq->tool_choice_name : NULL;
    f->n_close_param = tok_count(f, CLOSE_PARAM);
    f->n_close_call = tok_count(f, CLOSE_CALL);
    f->n_header = tok_count(f, HEADER);
    f->phase = thinking ? PH_THINK : PH_HEADER;
    if (thinking) {
        f->think_need = tok_count(f, "</think>") + f->n_header + names_need(f, VALUE_ROOM);
    } else {
        cand_add(f, HEADER, 0);
        price(f);
    }
    return f;
}

void srv_forced_free(srv_forced *f) {
    if (!f) return;
    cands_clear(f);
    req_free(f);
    free(f->lit);
    for (int i = 0; i < f->n_used; i++) free(f->used[i]);
    free(f->used);
    free(f->scratch);
    free(f->ctl);
    free(f);
}

bool srv_forced_done(const srv_forced *f) { return f && f->phase == PH_DONE; }

bool srv_forced_cut(const srv_forced *f) { return f && f->cut; }

/* Candidates for the tool name. */
static void name_cands(srv_forced *f) {
    if (f->forced_name) { /* in tools and free of '"' (checked by the parser) */
        cand_take(f, cat3("", f->forced_name, "\">\n"), 0);
        return;
    }
    size_t i;
    json_t *t;
    json_array_foreach(f->tools, i, t) {
        const char *n = schema_name(t);
        if (!n || strchr(n, '"')) continue; /* cannot be written as the attribute */
        cand_take(f, cat3("", n, "\">\n"), (int)i);
    }
    if (!f->n_cands) cand_add(f, "tool\">\n", -1);
}

static bool used(const srv_forced *f, const char *name) {
    for (int i = 0; i < f->n_used; i++)
        if (!strcmp(f->used[i], name)) return true;
    return false;
}

/* A property name the block can carry in its parameter tag (as tool names,
 * request.c tool_name_ok): no control characters, '"', '<', '>', '&' (the
 * parser decodes entities) or the DSML bar. Others are never offered, and a
 * required one cannot be written: it does not hold the call open. */
static bool key_ok(const char *k) {
    if (!k || !k[0] || strstr(k, "\xef\xbd\x9c")) return false;
    for (const unsigned char *p = (const unsigned char *)k; *p; p++)
        if (*p < 0x20 || *p == 0x7f || *p == '"' || *p == '<' || *p == '>' || *p == '&') return false;
    return true;
}

static bool is_required(const srv_forced *f, const char *name) {
    size_t i;
    json_t *r;
    json_array_foreach(f->required, i, r) {
        if (json_is_string(r) && !strcmp(json_string_value(r), name)) return true;
    }
    return false;
}

/* Required properties of the chosen tool not written yet (those it can
 * carry: in properties, key_ok). */
static int missing_required(const srv_forced *f) {
    int k = 0;
    for (int i = 0; i < f->n_req; i++) k += !used(f, f->req_key[i]);
    return k;
}

/* Tokens the tokenizer writes for text: what the literal writer spends on
 * it (a byte each when it cannot tokenize, as pick_offered then writes). */
static int tok_count(const srv_forced *f, const char *text) {
    const size_t n = strlen(text);
    if (!n) return 0;
    ds4_err err = {0};
    const int k = ds4_tokenize(f->e, text, n, true, NULL, 0, &err);
    return k > 0 ? k : (int)n;
}

/* Tokens the chosen tool's call still needs after the property being
 * written (or excl, about to be): each required one missing (its tag and
 * shortest value, plus `room` for a string's value) and the closing tags. */
static int params_need(const srv_forced *f, const char *excl, int room) {
    int k = f->n_close_call;
    for (int i = 0; i < f->n_req; i++)
        if (!used(f, f->req_key[i]) && (!excl || strcmp(excl, f->req_key[i])))
            k += f->req_cost[i] + (f->req_str[i] ? room : 0);
    return k;
}

/* A property's schema with "$ref" (to "#/$defs/NAME" or
 * "#/definitions/NAME" of the tool's parameters) and a one-member "allOf"
 * followed: pydantic puts every Enum and nested model behind a $ref. */
static json_t *resolve(const srv_forced *f, json_t *pv) {
    for (int depth = 0; pv && depth < 8; depth++) {
        json_t *all = json_object_get(pv, "allOf");
        if (json_is_array(all) && json_array_size(all) == 1 && !json_object_get(pv, "type")) {
            pv = json_array_get(all, 0);
            continue;
        }
        const char *ref = json_string_value(json_object_get(pv, "$ref"));
        if (!ref) return pv;
        const char *pre[] = {"#/$defs/", "#/definitions/"};
        json_t *target = NULL;
        for (int k = 0; k < 2 && !target; k++)
            if (!strncmp(ref, pre[k], strlen(pre[k])))
                target = json_object_get(json_object_get(f->params, k ? "definitions" : "$defs"), ref + strlen(pre[k]));
        pv = target;
    }
    return pv;
}

/* anyOf/oneOf members visited per question: a $ref cycle through them (or a
 * wide tree of them) ends there instead of recursing without bound */
#define PROP_VISITS 256

/* The JSON type a property's value takes: "type" (the first one other than
 * "null" when it is a list), else that of the first anyOf/oneOf member that
 * has one (Optional[int] is anyOf [integer, null]); NULL when unknown. */
static const char *prop_type_d(const srv_forced *f, json_t *pv, int *visits) {
    if (--*visits < 0) return NULL;
    pv = resolve(f, pv);
    json_t *t = json_object_get(pv, "type");
    if (json_is_string(t)) return json_string_value(t);
    if (json_is_array(t)) {
        size_t i;
        json_t *x;
        json_array_foreach(t, i, x)
            if (json_is_string(x) && strcmp(json_string_value(x), "null")) return json_string_value(x);
    }
    const char *alts[] = {"anyOf", "oneOf"};
    for (int k = 0; k < 2; k++) {
        size_t i;
        json_t *x;
        json_array_foreach(json_object_get(pv, alts[k]), i, x) {
            const char *ty = prop_type_d(f, x, visits);
            if (ty && strcmp(ty, "null")) return ty;
        }
    }
    return NULL;
}
static const char *prop_type(const srv_forced *f, json_t *pv) {
    int visits = PROP_VISITS;
    return prop_type_d(f, pv, &visits);
}

/* The property's schema that lists its values (enum or const; also inside
 * anyOf/oneOf, as Optional[Enum] is), or NULL. */
static json_t *prop_enum_d(const srv_forced *f, json_t *pv, int *visits) {
    if (--*visits < 0) return NULL;
    pv = resolve(f, pv);
    json_t *en = json_object_get(pv, "enum");
    if ((json_is_array(en) && json_array_size(en)) || json_object_get(pv, "const")) return pv;
    const char *alts[] = {"anyOf", "oneOf"};
    for (int k = 0; k < 2; k++) {
        size_t i;
        json_t *x;
        json_array_foreach(json_object_get(pv, alts[k]), i, x) {
            json_t *r = prop_enum_d(f, x, visits);
            if (r) return r;
        }
    }
    return NULL;
}
static json_t *prop_enum(const srv_forced *f, json_t *pv) {
    int visits = PROP_VISITS;
    return prop_enum_d(f, pv, &visits);
}

/* JSON text as a string="false" value carries it: every '<' and '&' as the
 * escapes \u003c and \u0026 (JSON has them only inside strings, where the
 * escapes mean the same characters), so no value can close the parameter
 * tag or look like markup, and the client's arguments get the characters
 * back ("R&D" was never offered: values with '<' or '&' were left out, and
 * a one-value enum of such a value came out null). Takes and frees j. */
static char *block_json(char *j) {
    size_t extra = 0;
    for (const char *p = j; *p; p++) extra += *p == '<' || *p == '&' ? 5 : 0;
    if (!extra) return j;
    char *o = xmalloc(strlen(j) + extra + 1), *q = o;
    for (const char *p = j; *p; p++) {
        if (*p == '<' || *p == '&') {
            memcpy(q, *p == '<' ? "\\u003c" : "\\u0026", 6);
            q += 6;
        } else {
            *q++ = *p;
        }
    }
    *q = 0;
    free(j);
    return o;
}

/* The parameter tag of property `key`: string="true" for strings (written
 * freely), "false" for JSON values (enums as a choice among their values). */
static bool prop_is_str(const srv_forced *f, json_t *pv) {
    if (prop_enum(f, pv)) return false;
    const char *type = prop_type(f, pv);
    return !type || !strcmp(type, "string");
}

/* Candidates after the invoke header or a parameter: another property, or
 * the close once every required property is present (the budget withholds
 * what does not fit: cands_fit). */
static void param_cands(srv_forced *f) {
    const char *key;
    json_t *v;
    json_object_foreach(f->props, key, v) {
        if (used(f, key) || !key_ok(key)) continue;
        bool is_str = prop_is_str(f, v);
        cand_take(f, cat3("<" DSML "parameter name=\"", key,
                          is_str ? "\" string=\"true\">" : "\" string=\"false\">"), 1);
    }
    if (!missing_required(f) || f->n_cands == 0) cand_add(f, CLOSE_CALL, 2);
}

/* Candidates for the values an enum or const schema lists, as JSON
 * (string="false", block_json). */
static void enum_cands(cand **cs, int *n, json_t *es) {
    json_t *en = json_object_get(es, "enum"), *cv = json_object_get(es, "const");
    json_t *one = cv ? json_pack("[O]", cv) : NULL;
    size_t i;
    json_t *v;
    json_array_foreach(one ? one : en, i, v) {
        char *j = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!j) continue;
        j = block_json(j);
        list_take(cs, n, cat3("", j, CLOSE_PARAM), 0);
        free(j);
    }
    json_decref(one);
    if (!*n) list_take(cs, n, xstrdup("null" CLOSE_PARAM), 0);
}

/* A number's bytes one at a time through -?(0|[1-9][0-9]*)(.[0-9]+)?:
 * states 0 start, 1 after '-', 2 after a leading 0, 3 integer digits,
 * 4 after '.', 5 fraction digits; -1 when c cannot follow. Accepting: 2, 3, 5. */
static int num_step(int st, char c, bool frac) {
    bool d = c >= '0' && c <= '9';
    switch (st) {
    case 0: return c == '-' ? 1 : c == '0' ? 2 : d ? 3 : -1;
    case 1: return c == '0' ? 2 : d ? 3 : -1;
    case 2: return c == '.' && frac ? 4 : -1;
    case 3: return d ? 3 : c == '.' && frac ? 4 : -1;
    case 4: case 5: return d ? 5 : -1;
    default: return -1;
    }
}

static bool num_accepting(int st) { return st == 2 || st == 3 || st == 5; }

/* The number state after token t, or -1 if t cannot continue the number */
static int num_after(srv_forced *f, int32_t t) {
    size_t n = 0;
    const char *b = ds4_token_bytes(f->e, t, &n);
    if (!b || n == 0 || t == f->eos) return -1;
    int st = f->num_state;
    for (size_t i = 0; i < n && st >= 0; i++) st = num_step(st, b[i], f->num_frac);
    return st;
}

/* Candidates for a non-string value of the property's type. */
static void literal_cands(cand **cs, int *n, const char *type) {
    if (type && !strcmp(type, "boolean")) {
        list_take(cs, n, xstrdup("true" CLOSE_PARAM), 0);
        list_take(cs, n, xstrdup("false" CLOSE_PARAM), 0);
    } else if (type && (!strcmp(type, "integer") || !strcmp(type, "number"))) {
        for (char d = '0'; d <= '9'; d++) {
            char b[64];
            snprintf(b, sizeof b, "%c" CLOSE_PARAM, d);
            list_take(cs, n, xstrdup(b), 0);
        }
    } else if (type && !strcmp(type, "array")) {
        list_take(cs, n, xstrdup("[]" CLOSE_PARAM), 0);
    } else if (type && !strcmp(type, "object")) {
        list_take(cs, n, xstrdup("{}" CLOSE_PARAM), 0);
    } else {
        list_take(cs, n, xstrdup("null" CLOSE_PARAM), 0);
    }
}

/* Tokens of property pv's shortest value with its CLOSE_PARAM: a string
 * may be empty, a number is one digit, an enum or literal its shortest
 * candidate. */
static int value_min(srv_forced *f, json_t *pv) {
    if (prop_is_str(f, pv)) return f->n_close_param;
    json_t *es = prop_enum(f, pv);
    const char *type = prop_type(f, pv);
    if (!es && type && (!strcmp(type, "integer") || !strcmp(type, "number"))) return 1 + f->n_close_param;
    cand *cs = NULL;
    int n = 0;
    if (es) enum_cands(&cs, &n, es);
    else literal_cands(&cs, &n, type);
    int best = INT_MAX;
    for (int i = 0; i < n; i++) {
        const int k = tok_count(f, cs[i].text);
        if (k < best) best = k;
        free(cs[i].text);
    }
    free(cs);
    return best == INT_MAX ? f->n_close_param : best;
}

static void req_free(srv_forced *f) {
    for (int i = 0; i < f->n_req; i++) free(f->req_key[i]);
    free(f->req_key);
    free(f->req_cost);
    free(f->req_str);
    f->req_key = NULL;
    f->req_cost = NULL;
    f->req_str = NULL;
    f->n_req = 0;
}

/* The required properties of the tool in f->params/props/required that a
 * call can write (in properties, key_ok; each once), with their costs. */
static void req_build(srv_forced *f) {
    req_free(f);
    const size_t n = json_array_size(f->required);
    if (!n || !f->props) return;
    f->req_key = xmalloc(n * sizeof *f->req_key);
    f->req_cost = xmalloc(n * sizeof *f->req_cost);
    f->req_str = xmalloc(n * sizeof *f->req_str);
    size_t i;
    json_t *r;
    json_array_foreach(f->required, i, r) {
        const char *key = json_string_value(r);
        json_t *pv = key ? json_object_get(f->props, key) : NULL;
        if (!pv || !key_ok(key)) continue;
        bool dup = false;
        for (int j = 0; j < f->n_req; j++) dup = dup || !strcmp(f->req_key[j], key);
        if (dup) continue;
        const bool is_str = prop_is_str(f, pv);
        char *tag = cat3("<" DSML "parameter name=\"", key, is_str ? "\" string=\"true\">" : "\" string=\"false\">");
        f->req_key[f->n_req] = xstrdup(key);
        f->req_cost[f->n_req] = tok_count(f, tag) + value_min(f, pv);
        f->req_str[f->n_req] = is_str;
        f->n_req++;
        free(tag);
    }
}

/* Sets the chosen tool's schema (NULL: none) and its required costs. */
static void tool_set(srv_forced *f, json_t *schema) {
    json_t *params = schema ? schema_params(schema) : NULL;
    f->params = params;
    f->props = params ? json_object_get(params, "properties") : NULL;
    if (!json_is_object(f->props)) f->props = NULL;
    f->required = params ? json_object_get(params, "required") : NULL;
    if (!json_is_array(f->required)) f->required = NULL;
    req_build(f);
}

/* Tokens a call of tool `schema` needs after its name (used: none yet). */
static int tool_need(srv_forced *f, json_t *schema, int room) {
    json_t *params = f->params, *props = f->props, *required = f->required;
    char **key = f->req_key;
    int *cost = f->req_cost, n = f->n_req;
    bool *str = f->req_str;
    f->n_req = 0;
    f->req_key = NULL, f->req_cost = NULL, f->req_str = NULL;
    tool_set(f, schema);
    const int k = params_need(f, NULL, room);
    req_free(f);
    f->params = params, f->props = props, f->required = required;
    f->req_key = key, f->req_cost = cost, f->req_str = str, f->n_req = n;
    return k;
}

/* The tool a name candidate stands for (NULL: no schema). */
static json_t *cand_tool(const srv_forced *f, const cand *c) {
    json_t *schema = c->action >= 0 && !f->forced_name ? json_array_get(f->tools, (size_t)c->action) : NULL;
    if (f->forced_name) {
        size_t i;
        json_t *t;
        json_array_foreach(f->tools, i, t) {
            const char *n = schema_name(t);
            if (n && !strcmp(n, f->forced_name)) schema = t;
        }
    }
    return schema;
}

/* Tokens of the shortest call from the tool name on. */
static int names_need(srv_forced *f, int room) {
    int *memo = room ? &f->names_room : &f->names_bare;
    if (*memo >= 0) return *memo;
    int best = INT_MAX;
    size_t i;
    json_t *t;
    json_array_foreach(f->tools, i, t) {
        const char *n = schema_name(t);
        if (!n || strchr(n, '"') || (f->forced_name && strcmp(n, f->forced_name))) continue;
        char *text = cat3("", n, "\">\n");
        const int k = tok_count(f, text) + tool_need(f, t, room);
        free(text);
        if (k < best) best = k;
    }
    *memo = best == INT_MAX ? tok_count(f, "tool\">\n") + f->n_close_call : best;
    return *memo;
}

/* Fills in what each candidate of the choice just made leaves to write
 * (cand.after): an optional property is priced with VALUE_ROOM kept for
 * each required one, so that it is offered only when they keep theirs. */
static void price(srv_forced *f) {
    for (int i = 0; i < f->n_cands; i++) {
        cand *c = &f->cands[i];
        switch (f->phase) {
        case PH_THINK: c->after = f->n_header + names_need(f, 0); break;
        case PH_HEADER: c->after = names_need(f, 0); break;
        case PH_NAME: c->after = tool_need(f, cand_tool(f, c), 0); break;
        case PH_PARAMS:
            if (c->action == 2) {
                c->after = 0;
            } else {
                const char *k = strstr(c->text, "name=\"") + 6, *q = strchr(k, '"');
                char *key = xmalloc((size_t)(q - k) + 1);
                memcpy(key, k, (size_t)(q - k));
                key[q - k] = 0;
                const bool req = is_required(f, key);
                c->after = value_min(f, json_object_get(f->props, key)) + params_need(f, key, req ? 0 : VALUE_ROOM);
                free(key);
            }
            break;
        default: c->after = params_need(f, NULL, 0); break;
        }
    }
}

/* Token t continues one of the n candidates cs from f->pos. */
static bool fits_in(const srv_forced *f, const cand *cs, int n_cs, int32_t t) {
    size_t n = 0;
    const char *b = ds4_token_bytes(f->e, t, &n);
    if (!b || n == 0 || t == f->eos) return false;
    for (int i = 0; i < n_cs; i++) {
        const char *c = cs[i].text + f->pos;
        size_t rem = strlen(c);
        if (n <= rem && !memcmp(c, b, n)) return true;
    }
    return false;
}

/* Token t continues some candidate from f->pos. */
static bool token_fits(srv_forced *f, int32_t t) { return fits_in(f, f->cands, f->n_cands, t); }

/* The next token of the one candidate left: its rest (from f->pos) as the
 * tokenizer writes it (rendered, as the prompt of the next turn will be),
 * tokenized once and emitted in turn, so that a conversation continued on
 * this server holds the tokens a fresh server reads from the same text (the
 * KV reuse rules compare tokens). -1 when it cannot (no tokenizer, a first
 * token that does not fit). */
static int32_t literal_next(srv_forced *f) {
    if (f->lit_i >= f->lit_n || f->lit_pos != f->pos) {
        const char *rest = f->cands[0].text + f->pos;
        const size_t len = strlen(rest);
        free(f->lit);
        f->lit = NULL;
        f->lit_n = f->lit_i = 0;
        ds4_err err = {0};
        const int n = len ? ds4_tokenize(f->e, rest, len, true, NULL, 0, &err) : 0;
        if (n <= 0) return -1;
        f->lit = malloc((size_t)n * sizeof *f->lit);
        if (!f->lit || ds4_tokenize(f->e, rest, len, true, f->lit, n, &err) != n) return -1;
        f->lit_n = n;
        f->lit_pos = f->pos;
    }
    const int32_t t = f->lit[f->lit_i];
    if (!token_fits(f, t)) return -1;
    size_t nb = 0;
    ds4_token_bytes(f->e, t, &nb);
    f->lit_i++;
    f->lit_pos += nb;
    return t;
}

static int32_t pick_offered(srv_forced *f, const float *logits, ds4_sampler *smp, ds4_rng *rng);

/* The choice's next token; while the budget withholds candidates (f->off),
 * the model's own greedy pick among all of them is compared: a pick that
 * continues a withheld candidate and is not the token written means the
 * budget changed the model's choice (cut). A pick the offered ones share
 * with a withheld one ("<" begins a parameter tag and the close alike) is
 * told apart by the token written ("</" for the close): the model's choice
 * of the close writes that token itself. */
static int32_t pick_choice(srv_forced *f, const float *logits, ds4_sampler *smp, ds4_rng *rng) {
    const int32_t tok = pick_offered(f, logits, smp, rng);
    if (f->n_off && tok >= 0) {
        int32_t best = -1;
        float bv = -INFINITY;
        for (int t = 0; t < f->n_vocab; t++)
            if (logits[t] > bv && (token_fits(f, t) || fits_in(f, f->off, f->n_off, t))) best = t, bv = logits[t];
        if (best >= 0 && best != tok && fits_in(f, f->off, f->n_off, best)) {
            f->cut = true;
            watch_clear(f);
        }
    }
    return tok;
}

static int32_t pick_offered(srv_forced *f, const float *logits, ds4_sampler *smp, ds4_rng *rng) {
    if (f->n_cands == 1) {
        const int32_t t = literal_next(f);
        if (t >= 0) return t;
        /* (cannot tokenize it: the longest token that continues the literal) */
        int32_t best = -1;
        size_t best_len = 0;
        for (int t = 0; t < f->n_vocab; t++) {
            size_t n = 0;
            if (!token_fits(f, t)) continue;
            ds4_token_bytes(f->e, t, &n);
            if (n > best_len) best = t, best_len = n;
        }
        return best;
    }
    for (int t = 0; t < f->n_vocab; t++) f->scratch[t] = token_fits(f, t) ? logits[t] : -INFINITY;
    ds4_sampler_params p = ds4_sampler_defaults();
    p.temperature = 0; /* structure is greedy (TEXT C.9) */
    int32_t tok = ds4_sampler_sample(smp, f->scratch, &p, rng);
    if (!isfinite(f->scratch[tok])) return -1; /* no token fits: cannot happen with a byte vocab */
    return tok;
}

static bool has_lt(srv_forced *f, int32_t t) {
    size_t n = 0;
    const char *b = ds4_token_bytes(f->e, t, &n);
    return !b || n == 0 || memchr(b, '<', n) != NULL;
}

#define PARAM_TAG "</" DSML "parameter>"

/* The longest k < strlen(tag) such that b[0..n) ends with the first k bytes
 * of tag: the part of a closing tag already written. */
static size_t held_prefix(const char *b, size_t n, const char *tag) {
    const size_t tl = strlen(tag);
    for (size_t k = n < tl - 1 ? n : tl - 1; k > 0; k--)
        if (!memcmp(b + n - k, tag, k)) return k;
    return 0;
}
enum { TAG_NONE, TAG_CLOSES, TAG_SPLIT };

/* The value's held bytes + a token's bytes in buf (at most the held tail and
 * the token); the length, or 0 when the token has no bytes. */
static size_t value_join(const srv_forced *f, int32_t t, char **buf) {
    size_t n = 0;
    const char *b = ds4_token_bytes(f->e, t, &n);
    if (!b) n = 0;
    *buf = xmalloc(f->vtail_len + n + 1);
    memcpy(*buf, f->vtail, f->vtail_len);
    if (n) memcpy(*buf + f->vtail_len, b, n);
    return f->vtail_len + n;
}

/* Whether token t, appended to the string value, writes the closing tag:
 * TAG_NONE (value text), TAG_CLOSES (the tag ends in it, at most the "\n"
 * of CLOSE_PARAM after), TAG_SPLIT (more follows the tag inside the token:
 * not taken; *held = the tag's bytes already written before it). */
static int value_tag(const srv_forced *f, int32_t t, size_t *held) {
    char *buf;
    const size_t n = value_join(f, t, &buf);
    const size_t tl = strlen(PARAM_TAG);
    const char *at = n >= tl ? memmem(buf, n, PARAM_TAG, tl) : NULL;
    int r = TAG_NONE;
    if (at) {
        const size_t p = (size_t)(at - buf), rest = n - p - tl;
        if (rest == 0 || (rest == 1 && buf[p + tl] == '\n')) {
            r = TAG_CLOSES;
        } else {
            r = TAG_SPLIT;
            *held = p < f->vtail_len ? f->vtail_len - p : 0;
        }
    }
    free(buf);
    return r;
}

/* A reasoning token that ends "</think>" (with the bytes before it) may hold
 * only the start of the call's header after the tag (">\n\n" is one token):
 * the header is then continued from there; other text after the tag is not
 * taken (the reasoning is closed by the literal instead). */
static bool think_tag_ok(const srv_forced *f, int32_t t) {
    size_t n = 0;
    const char *b = ds4_token_bytes(f->e, t, &n);
    if (!b || !n) return true;
    char buf[sizeof f->win + 256];
    if (n > 256) return memmem(b, n, "</think>", 8) == NULL; /* (no token is this long) */
    memcpy(buf, f->win, f->win_len);
    memcpy(buf + f->win_len, b, n);
    const size_t m = f->win_len + n;
    const char *at = memmem(buf, m, "</think>", 8);
    if (!at) return true;
    const size_t rest = m - (size_t)(at - buf) - 8;
    return rest <= strlen(HEADER) && !memcmp(at + 8, HEADER, rest);
}

/* The budget closes a string value: whether the model was closing it too
 * (its greedy pick EOS or a token that writes the closing tag, or the tag
 * already begun) -- else the value is cut. */
static bool value_closing(srv_forced *f, const float *logits) {
    const int32_t g = ds4_argmax(logits, f->n_vocab);
    size_t h = 0;
    if (g == f->eos || value_tag(f, g, &h) != TAG_NONE) return true;
    /* its pick continues a tag begun (or begins one): all of its bytes are
     * the tag's ("</" of "x </b>" then is not: its pick is "b") */
    char *buf;
    const size_t n = value_join(f, g, &buf);
    const size_t k = held_prefix(buf, n, PARAM_TAG);
    free(buf);
    return k > 0 && k >= n - f->vtail_len;
}

/* Tokens the call needs after candidate c is chosen from f->pos (its rest
 * as the literal writer spends it, then c.after); skip: bytes of a token
 * about to be written. */
static int cand_cost(srv_forced *f, const cand *c, size_t skip) {
    const char *rest = c->text + f->pos + skip;
    if (!skip && f->n_cands == 1 && c == f->cands && f->lit_i < f->lit_n && f->lit_pos == f->pos)
        return f->lit_n - f->lit_i + c->after;
    return tok_count(f, rest) + c->after;
}

/* Withholds (watches) the candidates that cannot be finished in the
 * `remaining` tokens; when none can (max_tokens below the shortest call)
 * the cheapest is kept, and the call will be cut short. Returns the kept
 * candidates' costs (the caller frees them; NULL when fewer than two). */
static int *cands_fit(srv_forced *f, int remaining) {
    if (f->n_cands < 2) return NULL;
    int *cost = xmalloc((size_t)f->n_cands * sizeof *cost), best = 0, fit = 0;
    for (int i = 0; i < f->n_cands; i++) {
        cost[i] = cand_cost(f, &f->cands[i], 0);
        if (cost[i] < cost[best]) best = i;
        fit += cost[i] <= remaining;
    }
    int keep = 0;
    for (int i = 0; i < f->n_cands; i++) {
        if (fit ? cost[i] <= remaining : i == best) cost[keep] = cost[i], f->cands[keep++] = f->cands[i];
        else watch(f, f->cands[i]);
    }
    f->n_cands = keep;
    return cost;
}

/* The cheapest finish of the call after token t is written, among the
 * candidates t continues (INT_MAX: none). */
static int need_after(srv_forced *f, int32_t t) {
    size_t n = 0;
    const char *b = ds4_token_bytes(f->e, t, &n);
    int best = INT_MAX;
    for (int i = 0; b && i < f->n_cands; i++) {
        const char *c = f->cands[i].text + f->pos;
        if (strlen(c) < n || memcmp(c, b, n)) continue;
        const int k = cand_cost(f, &f->cands[i], n);
        if (k < best) best = k;
    }
    return best;
}

/* A choice step within the budget: the model's pick among the candidates
 * that fit; a pick that would leave too few tokens for any candidate it
 * continues (a short token where the tokenizer writes a long one) gives
 * way to the cheapest candidate, written as the tokenizer writes it. */
static int32_t pick_budget(srv_forced *f, const float *logits, ds4_sampler *smp, ds4_rng *rng, int remaining) {
    int *cost = cands_fit(f, remaining); /* (pick_choice leaves two or more candidates as they are) */
    int32_t tok = pick_choice(f, logits, smp, rng);
    if (tok < 0 || f->n_cands < 2 || need_after(f, tok) <= remaining - 1) {
        free(cost);
        return tok;
    }
    int best = 0;
    for (int i = 1; i < f->n_cands; i++)
        if (cost[i] < cost[best]) best = i;
    free(cost);
    const cand keep = f->cands[best];
    for (int i = 0; i < f->n_cands; i++)
        if (i != best) watch(f, f->cands[i]);
    f->cands[0] = keep;
    f->n_cands = 1;
    return pick_choice(f, logits, smp, rng);
}

int32_t srv_forced_pick(srv_forced *f, ds4_sampler *smp, const float *logits,
                        const ds4_sampler_params *p, ds4_rng *rng, int remaining) {
    if (f->phase == PH_THINK && !f->think_literal) {
        /* close the reasoning while the shortest call, with room for its
         * values, still fits; the thinking budget closes it too */
        bool spent = f->think_budget > 0 && f->think_tokens >= f->think_budget;
        const bool tight = remaining <= f->think_need + THINK_ROOM;
        int32_t tok = tight || spent ? f->eos : ds4_sampler_sample(smp, logits, p, rng);
        if (tok != f->eos && !think_tag_ok(f, tok)) tok = f->eos; /* "</think>" with other text after it */
        if (tok != f->eos) {
            f->think_tokens++;
            return tok;
        }
        f->think_literal = true; /* close the reasoning instead of ending */
        cand_add(f, "</think>", 0);
        price(f);
        f->pos = held_prefix(f->win, f->win_len, "</think>"); /* a tag begun is finished, not begun again */
    }
    if (f->phase == PH_VALUE_STR) {
        /* one more value token only if the close and the required properties still fit after it */
        const bool tight = remaining <= f->n_close_param + params_need(f, NULL, VALUE_ROOM);
        int32_t tok = f->eos;
        if (!tight) {
            /* text tokens only: a control token (a placeholder, a chat
             * marker) is no text, so the reply would lose it while the KV
             * and the call's raw block kept it; the DSML bar writes the
             * closing tag */
            if (!f->ctl) {
                const int32_t bar = ds4_token_special(f->e, DS4_TOK_DSML);
                f->ctl = xmalloc((size_t)f->n_vocab);
                for (int t = 0; t < f->n_vocab; t++)
                    f->ctl[t] = t != f->eos && t != bar && ds4_token_is_control(f->e, t);
            }
            for (int t = 0; t < f->n_vocab; t++) f->scratch[t] = f->ctl[t] ? -INFINITY : logits[t];
            tok = ds4_sampler_sample(smp, f->scratch, p, rng);
        }
        size_t held = 0; /* bytes of a closing tag the value already holds */
        if (tok != f->eos) {
            const int v = value_tag(f, tok, &held);
            if (v != TAG_SPLIT) {
                f->value_tokens++;
                return tok; /* value text, or the model's own close (srv_forced_feed) */
            }
        }
        /* closed by the budget or EOS: a tag the value ends with the start
         * of is finished, not left in the value, when the model was closing
         * it (by the budget: its own pick continues the tag; by EOS: at least
         * "</" and the DSML bar written); else the bytes stay value text
         * ("x </" of "x </b>") */
        if (tight) {
            const bool closing = value_closing(f, logits);
            if (!closing) f->cut = true;
            else held = held_prefix(f->vtail, f->vtail_len, PARAM_TAG);
        } else if (tok == f->eos) {
            held = held_prefix(f->vtail, f->vtail_len, PARAM_TAG);
            if (held < 5) held = 0; /* strlen("</｜") */
        }
        f->phase = PH_CLOSE_VALUE;
        cand_add(f, CLOSE_PARAM, 0);
        price(f);
        f->pos = held;
    }
    if (f->phase == PH_VALUE_NUM) {
        /* digits sampled by the model within the number grammar; the value
         * closes when the model picks a '<' or EOS (once the number is
         * whole), at MAX_NUM_TOKENS or when the budget is short */
        bool whole = num_accepting(f->num_state);
        /* (a token after which one more digit may be needed: 1) */
        const bool tight = remaining <= 1 + f->n_close_param + params_need(f, NULL, VALUE_ROOM);
        bool must_close = whole && (tight || f->value_tokens >= MAX_NUM_TOKENS);
        int32_t tok = -1;
        if (!must_close) {
            for (int t = 0; t < f->n_vocab; t++) {
                int st = num_after(f, t);
                bool close = whole && (t == f->eos || has_lt(f, t));
                f->scratch[t] = st >= 0 || close ? logits[t] : -INFINITY;
            }
            if (!whole && (tight || f->value_tokens >= MAX_NUM_TOKENS)) {
                /* finish the number with a digit at once */
                for (int t = 0; t < f->n_vocab; t++)
                    if (!num_accepting(num_after(f, t))) f->scratch[t] = -INFINITY;
            }
            tok = ds4_sampler_sample(smp, f->scratch, p, rng);
            if (!isfinite(f->scratch[tok])) tok = -1;
        }
        if (tok >= 0 && tok != f->eos && !has_lt(f, tok)) {
            f->num_state = num_after(f, tok);
            f->value_tokens++;
            return tok;
        }
        if (tight) { /* closed by the budget: cut unless the model's own pick closes it too */
            const int32_t g = ds4_argmax(logits, f->n_vocab);
            if (g != f->eos && !has_lt(f, g)) f->cut = true;
        }
        f->phase = PH_CLOSE_VALUE;
        cand_add(f, CLOSE_PARAM, 0);
        price(f);
    }
    return pick_budget(f, logits, smp, rng, remaining);
}

/* Called when the only remaining candidate text is complete. */
static void choice_done(srv_forced *f, const cand *c) {
    int action = c->action;
    char *text = xstrdup(c->text);
    cands_clear(f);
    switch (f->phase) {
    case PH_THINK:
        f->phase = PH_HEADER;
        cand_add(f, HEADER, 0);
        break;
    case PH_HEADER:
        f->phase = PH_NAME;
        name_cands(f);
        break;
    case PH_NAME: {
        const cand chosen = {text, action, 0};
        tool_set(f, cand_tool(f, &chosen));
        f->phase = PH_PARAMS;
        param_cands(f);
        break;
    }
    case PH_PARAMS:
        if (action == 2) {
            f->phase = PH_DONE;
            break;
        }
        {
            /* text = <｜DSML｜parameter name="KEY" string="X"> */
            const char *k = strstr(text, "name=\"") + 6;
            const char *q = strchr(k, '"');
            char *key = xmalloc((size_t)(q - k) + 1);
            memcpy(key, k, (size_t)(q - k));
            key[q - k] = 0;
            f->used = xrealloc(f->used, sizeof *f->used * (size_t)(f->n_used + 1));
            f->used[f->n_used++] = key;
            bool is_str = strstr(text, "string=\"true\"") != NULL;
            f->value_tokens = 0;
            json_t *pv = f->props ? json_object_get(f->props, key) : NULL;
            const char *type = prop_type(f, pv);
            if (is_str) {
                f->phase = PH_VALUE_STR;
                f->vtail_len = 0;
            } else if (prop_enum(f, pv)) {
                f->phase = PH_VALUE_LIT;
                enum_cands(&f->cands, &f->n_cands, prop_enum(f, pv));
            } else if (type && (!strcmp(type, "integer") || !strcmp(type, "number"))) {
                f->phase = PH_VALUE_NUM;
                f->num_state = 0;
                f->num_frac = !strcmp(type, "number");
            } else {
                f->phase = PH_VALUE_LIT;
                literal_cands(&f->cands, &f->n_cands, type);
            }
        }
        break;
    case PH_VALUE_LIT:
    case PH_CLOSE_VALUE:
        f->phase = PH_PARAMS;
        param_cands(f);
        break;
    default: break;
    }
    price(f);
    free(text);
}

/* Keeps the candidates whose text continues with bytes at pos (frees the
 * others); the count kept. */
static int cands_matching(cand *cs, int n_cs, size_t pos, const char *bytes, size_t n) {
    int keep = 0;
    for (int i = 0; i < n_cs; i++) {
        const char *c = cs[i].text + pos;
        if (strlen(c) >= n && !memcmp(c, bytes, n)) cs[keep++] = cs[i];
        else free(cs[i].text);
    }
    return keep;
}

void srv_forced_feed(srv_forced *f, const char *bytes, size_t n) {
    if (!f || f->phase == PH_DONE) return;
    if (f->phase == PH_THINK && !f->think_literal) {
        /* free reasoning: watch for the model's own </think> */
        for (size_t i = 0; i < n; i++) {
            if (f->win_len == sizeof f->win) {
                memmove(f->win, f->win + 1, sizeof f->win - 1);
                f->win_len--;
            }
            f->win[f->win_len++] = bytes[i];
            if (f->win_len >= 8 && !memcmp(f->win + f->win_len - 8, "</think>", 8)) {
                cand t = {(char *)"</think>", 0, 0};
                choice_done(f, &t);
                /* what the token holds after the tag begins the header (think_tag_ok) */
                if (i + 1 < n) srv_forced_feed(f, bytes + i + 1, n - i - 1);
                return;
            }
        }
        return;
    }
    if (f->phase == PH_VALUE_STR) {
        /* the value's text until the model writes the closing tag; what the
         * token holds after it (at most "\n", value_tag) goes to the close */
        const size_t m = f->vtail_len + n;
        char *buf = xmalloc(m + 1);
        memcpy(buf, f->vtail, f->vtail_len);
        memcpy(buf + f->vtail_len, bytes, n);
        const size_t tl = strlen(PARAM_TAG);
        const char *at = m >= tl ? memmem(buf, m, PARAM_TAG, tl) : NULL;
        if (at) {
            const size_t rest = m - (size_t)(at - buf) - tl;
            char *after = xmalloc(rest + 1);
            memcpy(after, at + tl, rest);
            free(buf);
            f->phase = PH_CLOSE_VALUE;
            cand_add(f, CLOSE_PARAM, 0);
            f->pos = tl;
            if (rest) srv_forced_feed(f, after, rest);
            free(after);
            return;
        }
        const size_t keep = m < tl - 1 ? m : tl - 1; /* a tag begun fits */
        memcpy(f->vtail, buf + m - keep, keep);
        f->vtail_len = keep;
        free(buf);
        return;
    }
    if (f->phase == PH_VALUE_NUM) return;
    if (!f->n_cands) return;
    /* advance the choice and drop candidates that no longer match (the watched ones too) */
    f->n_off = cands_matching(f->off, f->n_off, f->pos, bytes, n);
    f->n_cands = cands_matching(f->cands, f->n_cands, f->pos, bytes, n);
    f->pos += n;
    for (int i = 0; i < f->n_cands; i++) {
        if (strlen(f->cands[i].text) == f->pos) {
            cand c = f->cands[i];
            choice_done(f, &c);
            return;
        }
    }
}
