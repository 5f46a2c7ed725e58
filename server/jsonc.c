/* jsonc.c - JSON replies by constrained decoding: chat response_format
 * {"type":"json_object"} / {"type":"json_schema"}, Responses text.format
 * (docs/SERVING.md B.13).
 *
 * The schema compiles into nodes (jc_node). The reply's bytes run through a
 * matcher: a set of pushdown threads (one per live anyOf / type-list
 * branch, at most JC_MAX_THREADS), each a stack of frames (an object
 * between its braces, an array, a string, a number, a literal choice). A
 * token is allowed when its bytes keep at least one thread alive; the
 * sampled (or greedy) token is checked first and the whole vocabulary is
 * masked only when it does not fit, then the sampler runs on the masked
 * logits (the grammar rule llama.cpp's server follows). Once a thread has
 * closed the top-level value the reply ends (EOS is forced).
 *
 * What the output keeps to: JSON (RFC 8259) with whitespace runs of at most
 * JC_MAX_WS bytes and JC_MAX_NL newlines between tokens, strings of valid
 * UTF-8 without lone surrogate escapes, numbers of at most 15 integer, 16
 * fraction and 2 exponent digits (JSON parsers differ past doubles); and
 * the schema's keywords listed in B.13. At compile time alternatives are
 * flattened through $refs and nested anyOfs (each value offers at most
 * JC_MAX_THREADS) and every node learns the frames its shallowest value
 * needs (mindepth): a schema with no value within JC_MAX_DEPTH is refused,
 * and at run time a member, item or alternative is offered only when its
 * value fits below, so no reply can reach a dead end.
 *
 * With tools and tool_choice auto the reply may instead open a tool-call
 * block: while only whitespace has been written, tokens that continue a
 * block's opening tag are allowed too, and once the tag is complete the
 * constraint is off for the rest of the turn.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sampler.h"
#include "server.h"
#include "util/num.h"
#include "util/xalloc.h"

#define JC_MAX_DEPTH 24
#define JC_MAX_THREADS 32 /* live matchers; also the most alternatives one value may offer */
#define JC_MAX_PROPS 64
#define JC_MAX_WS 32 /* whitespace bytes between two tokens of the JSON text */
#define JC_MAX_NL 2  /* newlines among them */
#define JC_MAX_INT_DIGITS 15  /* integers exact in a double (JavaScript clients) */
#define JC_MAX_FRAC_DIGITS 16
#define JC_MAX_EXP_DIGITS 2   /* no overflow to infinity (parsers refuse it) */
#define JC_MAX_NODES 20000  /* compile budget (schemas are request input) */
#define JC_MAX_LITS 1024    /* values of one enum */
#define JC_MAX_LIT_BYTES 16384 /* one enum / const value, compact */
#define JC_MAX_KEY_BYTES 1024
#define JC_INF 1000000      /* no value within the nesting limit */
#define JC_MAX_SCHEMA_DEPTH 256 /* compile recursion, $ref hops included */

typedef enum { JN_ANY, JN_OBJECT, JN_ARRAY, JN_STRING, JN_NUMBER, JN_INTEGER, JN_LITS, JN_ALT, JN_PENDING, JN_NEVER } jn_kind;

typedef struct jc_node jc_node;
struct jc_node {
    jn_kind kind;
    /* JN_OBJECT */
    int n_props;
    char **keys;        /* JSON-escaped, without quotes */
    size_t *key_len;
    jc_node **vals;
    uint64_t req;       /* required properties */
    bool free_keys;     /* any key (no declared properties) */
    jc_node *extra;     /* value schema of free keys */
    /* JN_ARRAY */
    jc_node *items;
    long min_items, max_items;
    /* JN_LITS: the allowed values as compact JSON texts */
    int n_lits;
    char **lits;
    size_t *lit_len;
    /* JN_ALT */
    int n_alts;
    jc_node **alts;
    /* JN_ALT after compiling: the alternatives that are not alternatives
     * themselves, through $refs and nested anyOfs, each once */
    int n_leaves;
    jc_node **leaves;
    /* frames the shallowest value of this node needs (JC_INF: none fits) */
    int mindepth;
    unsigned stamp;
};

struct srv_jsonc_schema {
    jc_node **nodes;
    int n_nodes, cap;
    jc_node *root, *any, *lit_bool, *lit_null, *lit_any, *keystr;
    json_t *doc;
    struct {
        json_t *target; /* what a $ref resolved to: every spelling of it shares one node */
        jc_node *n;
    } *refs;
    int n_refs;
    struct {
        jc_node *lits;  /* enum / const values ... */
        jc_node *rest;  /* ... kept to those the schema beside them admits (after finish) */
    } *filters;
    int n_filters;
    jc_node *never;
    bool filtering; /* apply_filters runs: numbers of any length */
    char err[200];
};

/* ---------------------------------------------------------------- schema */

static jc_node *node_new(srv_jsonc_schema *s, jn_kind k) {
    if (s->n_nodes >= JC_MAX_NODES) {
        if (!s->err[0]) snprintf(s->err, sizeof s->err, "the schema is too large (more than %d nodes)", JC_MAX_NODES);
        return NULL;
    }
    if (s->n_nodes == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 32;
        s->nodes = xrealloc(s->nodes, sizeof *s->nodes * (size_t)s->cap);
    }
    jc_node *n = xcalloc(1, sizeof *n);
    n->kind = k;
    n->max_items = -1;
    s->nodes[s->n_nodes++] = n;
    return n;
}

static void node_free(jc_node *n) {
    for (int i = 0; i < n->n_props; i++) free(n->keys[i]);
    free(n->keys);
    free(n->key_len);
    free(n->vals);
    for (int i = 0; i < n->n_lits; i++) free(n->lits[i]);
    free(n->lits);
    free(n->lit_len);
    free(n->alts);
    free(n->leaves);
    free(n);
}

void srv_jsonc_schema_free(srv_jsonc_schema *s) {
    if (!s) return;
    for (int i = 0; i < s->n_nodes; i++) node_free(s->nodes[i]);
    free(s->nodes);
    free(s->refs);
    free(s->filters);
    free(s);
}

static void *fail(srv_jsonc_schema *s, const char *fmt, const char *arg) {
    if (!s->err[0]) snprintf(s->err, sizeof s->err, fmt, arg);
    return NULL;
}

/* Compact JSON text (UTF-8 kept, keys in order); malloc'ed. */
static char *compact(json_t *v, size_t *len) {
    char *t = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_PRESERVE_ORDER);
    if (!t) t = xstrdup("null");
    *len = strlen(t);
    return t;
}

/* A copy of v with integral reals as integers (1.0 is written 1, which a
 * schema's integer type admits and JSON Schema holds equal). */
static json_t *ints_of(json_t *v) {
    if (json_is_real(v)) {
        const double d = json_real_value(v);
        return d == floor(d) && fabs(d) < 9007199254740992.0 ? json_integer((json_int_t)d) : json_real(d);
    }
    json_t *c = NULL;
    if (json_is_array(v)) {
        c = json_array();
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) json_array_append_new(c, ints_of(e));
    } else if (json_is_object(v)) {
        c = json_object();
        const char *k;
        json_t *e;
        json_object_foreach(v, k, e) json_object_set_new(c, k, ints_of(e));
    } else {
        c = json_incref(v);
    }
    return c;
}

/* An enum / const value as the model writes it: compact, integral reals as
 * integers, other reals with the fewest digits (15 to 17) that read back
 * as the same double (jansson writes 17: 0.1 was 0.10000000000000001). */
static char *lit_text(json_t *v, size_t *len) {
    json_t *c = ints_of(v);
    char *t = NULL;
    for (int prec = 15; prec <= 17 && !t; prec++) {
        char *u = json_dumps(c, JSON_COMPACT | JSON_ENCODE_ANY | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(prec));
        json_t *back = u ? json_loads(u, JSON_DECODE_ANY, NULL) : NULL;
        if (u && (prec == 17 || (back && json_equal(back, c)))) t = u;
        else free(u);
        json_decref(back);
    }
    json_decref(c);
    if (!t) t = xstrdup("null");
    *len = strlen(t);
    return t;
}

static void lit_add(jc_node *n, char *text, size_t len) {
    for (int i = 0; i < n->n_lits; i++) /* at most JC_MAX_LITS: checked by the callers */
        if (n->lit_len[i] == len && !memcmp(n->lits[i], text, len)) {
            free(text);
            return;
        }
    n->lits = xrealloc(n->lits, sizeof *n->lits * (size_t)(n->n_lits + 1));
    n->lit_len = xrealloc(n->lit_len, sizeof *n->lit_len * (size_t)(n->n_lits + 1));
    n->lits[n->n_lits] = text;
    n->lit_len[n->n_lits++] = len;
}

static jc_node *lits_of(srv_jsonc_schema *s, const char *const *texts, int n) {
    jc_node *l = node_new(s, JN_LITS);
    if (!l) return NULL;
    for (int i = 0; i < n; i++) lit_add(l, xstrdup(texts[i]), strlen(texts[i]));
    return l;
}

static void alt_add(jc_node *a, jc_node *n) {
    a->alts = xrealloc(a->alts, sizeof *a->alts * (size_t)(a->n_alts + 1));
    a->alts[a->n_alts++] = n;
}

/* JSON pointer "#/a/b~1c" inside the document, in its URI fragment form
 * (RFC 6901 section 6): the fragment is percent-decoded first ("#/$defs/a%20b"
 * is the member "a b"; "%2F" is a separator), then split at '/', then ~1 and
 * ~0 unescaped in each token. */
static json_t *resolve_pointer(json_t *doc, const char *p, size_t n) {
    json_t *cur = doc;
    size_t at = 0;
    while (at < n) {
        if (p[at] != '/') return NULL;
        at++;
        const char *end = memchr(p + at, '/', n - at);
        const size_t len = end ? (size_t)(end - (p + at)) : n - at;
        char *tok = xmalloc(len + 1);
        size_t k = 0;
        for (size_t i = at; i < at + len; i++) {
            if (p[i] == '~' && i + 1 < at + len && (p[i + 1] == '0' || p[i + 1] == '1')) {
                tok[k++] = p[i + 1] == '0' ? '~' : '/';
                i++;
            } else {
                tok[k++] = p[i];
            }
        }
        tok[k] = 0;
        if (json_is_object(cur)) {
            cur = json_object_get(cur, tok);
        } else if (json_is_array(cur)) {
            char *e;
            long ix = strtol(tok, &e, 10);
            cur = *e || !k ? NULL : json_array_get(cur, (size_t)ix);
        } else {
            cur = NULL;
        }
        free(tok);
        if (!cur) return NULL;
        at += len;
    }
    return cur;
}

static json_t *resolve(json_t *doc, const char *ref) {
    if (ref[0] != '#') return NULL;
    const char *p = ref + 1;
    const size_t n = strlen(p);
    char *dec = xmalloc(n + 1);
    const size_t m = ds4_percent_decode(dec, p, n, 0);
    json_t *r = memchr(dec, 0, m) ? NULL : resolve_pointer(doc, dec, m); /* %00: no member name holds a NUL */
    free(dec);
    return r;
}

static jc_node *compile(srv_jsonc_schema *s, json_t *v, int depth);
static const char *constraining_sibling(json_t *v, const char *self);
static int apply_filters(srv_jsonc_schema *s);

static jc_node *compile_type(srv_jsonc_schema *s, json_t *v, const char *type, int depth) {
    if (!strcmp(type, "string")) return node_new(s, JN_STRING);
    if (!strcmp(type, "number")) return node_new(s, JN_NUMBER);
    if (!strcmp(type, "integer")) return node_new(s, JN_INTEGER);
    if (!strcmp(type, "boolean")) return s->lit_bool;
    if (!strcmp(type, "null")) return s->lit_null;
    if (!strcmp(type, "array")) {
        jc_node *n = node_new(s, JN_ARRAY);
        if (!n) return NULL;
        json_t *it = json_object_get(v, "items");
        n->items = it ? compile(s, it, depth + 1) : s->any;
        if (!n->items) return NULL;
        json_t *mn = json_object_get(v, "minItems"), *mx = json_object_get(v, "maxItems");
        if (mn && (!json_is_integer(mn) || json_integer_value(mn) < 0))
            return fail(s, "minItems must be a non-negative integer%s", "");
        if (mx && (!json_is_integer(mx) || json_integer_value(mx) < 0))
            return fail(s, "maxItems must be a non-negative integer%s", "");
        if ((mn && json_integer_value(mn) > 1000000) || (mx && json_integer_value(mx) > 1000000))
            return fail(s, "minItems and maxItems must be at most 1000000%s", "");
        n->min_items = mn ? (long)json_integer_value(mn) : 0;
        n->max_items = mx ? (long)json_integer_value(mx) : -1;
        if (n->max_items >= 0 && n->min_items > n->max_items) return fail(s, "minItems is larger than maxItems%s", "");
        return n;
    }
    if (!strcmp(type, "object")) {
        jc_node *n = node_new(s, JN_OBJECT);
        if (!n) return NULL;
        json_t *props = json_object_get(v, "properties"), *req = json_object_get(v, "required");
        json_t *ap = json_object_get(v, "additionalProperties");
        if (props && !json_is_object(props)) return fail(s, "properties must be an object%s", "");
        if (req && !json_is_array(req)) return fail(s, "required must be an array of names%s", "");
        const char *k;
        json_t *pv;
        json_object_foreach(props, k, pv) {
            if (n->n_props >= JC_MAX_PROPS) return fail(s, "an object has more than 64 properties%s", "");
            n->keys = xrealloc(n->keys, sizeof *n->keys * (size_t)(n->n_props + 1));
            n->key_len = xrealloc(n->key_len, sizeof *n->key_len * (size_t)(n->n_props + 1));
            n->vals = xrealloc(n->vals, sizeof *n->vals * (size_t)(n->n_props + 1));
            if (strlen(k) > JC_MAX_KEY_BYTES) return fail(s, "a property name is longer than 1024 bytes%s", "");
            json_t *ks = json_string(k);
            size_t kl;
            char *kt = compact(ks, &kl);
            json_decref(ks);
            memmove(kt, kt + 1, kl - 2); /* strip the quotes */
            kt[kl - 2] = 0;
            n->keys[n->n_props] = kt;
            n->key_len[n->n_props] = kl - 2;
            n->vals[n->n_props] = NULL;
            n->n_props++;
            jc_node *c = compile(s, pv, depth + 1);
            if (!c) return NULL;
            n->vals[n->n_props - 1] = c;
        }
        size_t i;
        json_t *r;
        json_array_foreach(req, i, r) {
            const char *name = json_string_value(r);
            if (!name) return fail(s, "required must be an array of names%s", "");
            int f = -1, ix = 0;
            const char *k2;
            json_t *v2;
            json_object_foreach(props, k2, v2) {
                if (!strcmp(k2, name)) {
                    f = ix;
                    break;
                }
                ix++;
            }
            if (f < 0) return fail(s, "required property '%.80s' is not in properties", name);
            n->req |= 1ull << f;
        }
        if (ap && !json_is_boolean(ap) && !json_is_object(ap))
            return fail(s, "additionalProperties must be a boolean or a schema%s", "");
        if (!n->n_props && !json_is_false(ap)) {
            n->free_keys = true;
            n->extra = json_is_object(ap) ? compile(s, ap, depth + 1) : s->any;
            if (!n->extra) return NULL;
        }
        return n;
    }
    return fail(s, "unknown type '%.60s'", type);
}

/* Keywords that constrain a value beside $ref, anyOf/oneOf or allOf: the
 * intersection is not implemented, so they are refused rather than ignored
 * (title, description, default and the like are fine). */
static const char *constraining_sibling(json_t *v, const char *self) {
    static const char *const keys[] = {"$ref", "anyOf", "oneOf", "allOf", "type", "enum", "const", "properties",
                                       "required", "additionalProperties", "items", "minItems", "maxItems",
                                       "nullable"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        if (strcmp(keys[i], self) && json_object_get(v, keys[i]) &&
            (!json_is_null(json_object_get(v, keys[i])) || !strcmp(keys[i], "const")))
            return keys[i];
    return NULL;
}

/* enum / const: the values as texts; when the schema says more beside them
 * (type, properties, items, ...), that schema is compiled too and finish()
 * keeps the values it admits. */
static jc_node *compile_lits(srv_jsonc_schema *s, json_t *v, json_t *vals, const char *what, int depth) {
    jc_node *n = node_new(s, JN_LITS);
    if (!n) return NULL;
    size_t i;
    json_t *e;
    json_array_foreach(vals, i, e) {
        size_t len;
        char *text = lit_text(e, &len);
        if (len > JC_MAX_LIT_BYTES) {
            free(text);
            return fail(s, "%s: a value is longer than 16384 bytes", what);
        }
        lit_add(n, text, len);
    }
    json_t *rest = json_copy(v);
    json_object_del(rest, "enum");
    json_object_del(rest, "const");
    jc_node *r = constraining_sibling(rest, "") ? compile(s, rest, depth + 1) : NULL;
    json_decref(rest);
    if (s->err[0]) return NULL;
    if (r == s->any) r = NULL;
    if (r) {
        s->filters = xrealloc(s->filters, sizeof *s->filters * (size_t)(s->n_filters + 1));
        s->filters[s->n_filters].lits = n;
        s->filters[s->n_filters++].rest = r;
    }
    return n;
}

static jc_node *compile(srv_jsonc_schema *s, json_t *v, int depth) {
    if (s->err[0]) return NULL;
    if (depth > JC_MAX_SCHEMA_DEPTH) return fail(s, "the schema nests too deeply%s", "");
    if (json_is_true(v)) return s->any;
    if (json_is_false(v)) return s->never; /* never offered (a value of it cannot be written) */
    if (!json_is_object(v)) return fail(s, "a schema must be an object or a boolean%s", "");
    json_t *x;
    const char *sib;
    if ((x = json_object_get(v, "$ref"))) {
        const char *ref = json_string_value(x);
        if (!ref) return fail(s, "$ref must be a string%s", "");
        if ((sib = constraining_sibling(v, "$ref"))) return fail(s, "'%s' beside $ref is not supported", sib);
        json_t *target = resolve(s->doc, ref);
        if (!target) return fail(s, "$ref '%.100s' does not resolve inside the schema", ref);
        for (int i = 0; i < s->n_refs; i++)
            if (s->refs[i].target == target) return s->refs[i].n;
        /* a placeholder first: the target may refer back to it */
        jc_node *ph = node_new(s, JN_PENDING);
        if (!ph) return NULL;
        s->refs = xrealloc(s->refs, sizeof *s->refs * (size_t)(s->n_refs + 1));
        s->refs[s->n_refs].target = target;
        s->refs[s->n_refs++].n = ph;
        jc_node *t = compile(s, target, depth + 1);
        if (!t) return NULL;
        /* the placeholder becomes an alternative of one: the target */
        ph->kind = JN_ALT;
        alt_add(ph, t);
        return ph;
    }
    const char *alts_key = json_object_get(v, "anyOf") ? "anyOf" : json_object_get(v, "oneOf") ? "oneOf" : NULL;
    if (alts_key) {
        x = json_object_get(v, alts_key);
        if (!json_is_array(x) || !json_array_size(x)) return fail(s, "%s must be a non-empty array", alts_key);
        if ((sib = constraining_sibling(v, alts_key)))
            return fail(s, sib[0] == 'a' || sib[0] == 'o' ? "anyOf, oneOf and allOf together are not supported%s"
                                                          : "'%s' beside anyOf/oneOf is not supported (put it in "
                                                            "each alternative)",
                        sib[0] == 'a' || sib[0] == 'o' ? "" : sib);
        if (json_array_size(x) == 1) return compile(s, json_array_get(x, 0), depth + 1);
        jc_node *a = node_new(s, JN_ALT);
        if (!a) return NULL;
        size_t i;
        json_t *e;
        json_array_foreach(x, i, e) {
            jc_node *c = compile(s, e, depth + 1);
            if (!c) return NULL;
            alt_add(a, c);
        }
        return a;
    }
    if ((x = json_object_get(v, "allOf"))) {
        if (!json_is_array(x) || json_array_size(x) != 1)
            return fail(s, "allOf is supported with one schema only%s", "");
        if ((sib = constraining_sibling(v, "allOf"))) return fail(s, "'%s' beside allOf is not supported", sib);
        return compile(s, json_array_get(x, 0), depth + 1);
    }
    if ((x = json_object_get(v, "const"))) {
        json_t *one = json_pack("[O]", x);
        jc_node *n = compile_lits(s, v, one, "const", depth);
        json_decref(one);
        return n;
    }
    if ((x = json_object_get(v, "enum"))) {
        if (!json_is_array(x) || !json_array_size(x)) return fail(s, "enum must be a non-empty array%s", "");
        if (json_array_size(x) > JC_MAX_LITS) return fail(s, "enum has more than 1024 values%s", "");
        return compile_lits(s, v, x, "enum", depth);
    }
    x = json_object_get(v, "type");
    bool nullable = json_is_true(json_object_get(v, "nullable"));
    const char *one = json_string_value(x);
    if (x && !one && !json_is_array(x)) return fail(s, "type must be a string or an array of strings%s", "");
    if (!x) { /* no type: what the keywords imply, else any value */
        if (json_object_get(v, "properties") || json_object_get(v, "required") ||
            json_object_get(v, "additionalProperties"))
            one = "object";
        else if (json_object_get(v, "items") || json_object_get(v, "minItems") || json_object_get(v, "maxItems"))
            one = "array";
    }
    jc_node *n = NULL;
    if (one) {
        n = compile_type(s, v, one, depth);
    } else if (json_is_array(x)) {
        if (!json_array_size(x)) return fail(s, "type must not be an empty list%s", "");
        n = json_array_size(x) > 1 ? node_new(s, JN_ALT) : NULL;
        size_t i;
        json_t *e;
        json_array_foreach(x, i, e) {
            if (!json_is_string(e)) return fail(s, "type must be a string or an array of strings%s", "");
            jc_node *c = compile_type(s, v, json_string_value(e), depth);
            if (!c) return NULL;
            if (n) alt_add(n, c);
            else n = c;
        }
    } else {
        n = s->any;
    }
    if (!n) return NULL;
    if (nullable && n != s->any) {
        jc_node *a = node_new(s, JN_ALT);
        if (!a) return NULL;
        alt_add(a, n);
        alt_add(a, s->lit_null);
        n = a;
    }
    return n;
}

/* Literals in byte order, a prefix before its extensions: the texts that
 * share a prefix are then a range, narrowed by binary search (lit_narrow). */
typedef struct lit_ref {
    char *text;
    size_t len;
} lit_ref;

static int lit_cmp(const void *a, const void *b) {
    const lit_ref *x = a, *y = b;
    const size_t n = x->len < y->len ? x->len : y->len;
    const int c = memcmp(x->text, y->text, n);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

static void sort_lits(jc_node *n) {
    lit_ref *r = xmalloc(sizeof *r * (size_t)(n->n_lits ? n->n_lits : 1));
    for (int i = 0; i < n->n_lits; i++) r[i] = (lit_ref){n->lits[i], n->lit_len[i]};
    qsort(r, (size_t)n->n_lits, sizeof *r, lit_cmp);
    for (int i = 0; i < n->n_lits; i++) n->lits[i] = r[i].text, n->lit_len[i] = r[i].len;
    free(r);
}

/* The leaves of alternative node a (DFS through nested alternatives and
 * $ref placeholders, each leaf once, cycles cut). */
static void leaves_of(jc_node *a, jc_node *n, unsigned stamp, long *work) {
    if (n->stamp == stamp || ++*work > 4000000) return;
    n->stamp = stamp;
    if (n->kind != JN_ALT) {
        a->leaves = xrealloc(a->leaves, sizeof *a->leaves * (size_t)(a->n_leaves + 1));
        a->leaves[a->n_leaves++] = n;
        return;
    }
    for (int i = 0; i < n->n_alts && a->n_leaves <= JC_MAX_THREADS; i++) leaves_of(a, n->alts[i], stamp, work);
}

/* After compiling: each alternative node's leaves, then each node's
 * mindepth (the frames its shallowest value needs) by relaxation: a
 * value nesting m levels is found in m rounds, and nothing deeper than
 * JC_MAX_DEPTH is of use. 0, or -1 with s->err set. */
static int finish(srv_jsonc_schema *s) {
    unsigned stamp = 0;
    long work = 0;
    for (int i = 0; i < s->n_nodes; i++) {
        jc_node *n = s->nodes[i];
        if (n->kind != JN_ALT) continue;
        n->stamp = ++stamp; /* not a leaf of itself */
        for (int k = 0; k < n->n_alts && n->n_leaves <= JC_MAX_THREADS; k++) leaves_of(n, n->alts[k], stamp, &work);
        if (work > 4000000) {
            snprintf(s->err, sizeof s->err, "the schema's alternatives are too many to serve");
            return -1;
        }
        if (n->n_leaves > JC_MAX_THREADS) {
            snprintf(s->err, sizeof s->err, "more than %d alternatives (anyOf, type lists) for one value",
                     JC_MAX_THREADS);
            return -1;
        }
    }
    for (int i = 0; i < s->n_nodes; i++) {
        jc_node *n = s->nodes[i];
        n->mindepth = n->kind == JN_OBJECT || n->kind == JN_ARRAY || n->kind == JN_ALT || n->kind == JN_PENDING ||
                              n->kind == JN_NEVER
                          ? JC_INF
                          : 1;
    }
    /* relaxation until nothing changes: nodes are visited children first
     * (compile makes a parent before its children), so a tree settles in
     * one round; values only fall, each node's at most JC_MAX_DEPTH + 1
     * times, so cycles settle too */
    for (bool changed = true; changed;) {
        changed = false;
        for (int i = s->n_nodes - 1; i >= 0; i--) {
            jc_node *n = s->nodes[i];
            int m = n->mindepth;
            if (n->kind == JN_OBJECT) {
                m = 1;
                for (int k = 0; k < n->n_props; k++)
                    if (n->req >> k & 1 && n->vals[k]->mindepth + 1 > m) m = n->vals[k]->mindepth + 1;
            } else if (n->kind == JN_ARRAY) {
                m = n->min_items == 0 ? 1 : n->items->mindepth + 1;
            } else if (n->kind == JN_ALT) {
                for (int k = 0; k < n->n_leaves; k++)
                    if (n->leaves[k]->mindepth < m) m = n->leaves[k]->mindepth;
            }
            if (m > JC_MAX_DEPTH) m = JC_INF; /* of no use */
            if (m < n->mindepth) {
                n->mindepth = m;
                changed = true;
            }
        }
    }
    if (s->root->mindepth > JC_MAX_DEPTH) {
        snprintf(s->err, sizeof s->err, "the schema admits no value nested at most %d levels deep (a $ref cycle "
                 "without a way out, or required values nested too deeply)", JC_MAX_DEPTH);
        return -1;
    }
    for (int i = 0; i < s->n_nodes; i++)
        if (s->nodes[i]->kind == JN_LITS) sort_lits(s->nodes[i]);
    return apply_filters(s);
}

srv_jsonc_schema *srv_jsonc_compile(json_t *schema, char *msg, size_t cap) {
    srv_jsonc_schema *s = xcalloc(1, sizeof *s);
    static const char *const tf[] = {"true", "false"}, *const nl[] = {"null"}, *const all[] = {"true", "false", "null"};
    s->any = node_new(s, JN_ANY);
    s->lit_bool = lits_of(s, tf, 2);
    s->lit_null = lits_of(s, nl, 1);
    s->lit_any = lits_of(s, all, 3);
    s->keystr = node_new(s, JN_STRING);
    s->never = node_new(s, JN_NEVER);
    if (!schema) { /* json_object: an object with any members */
        s->root = node_new(s, JN_OBJECT);
        s->root->free_keys = true;
        s->root->extra = s->any;
    } else {
        s->doc = schema;
        s->root = compile(s, schema, 0);
        s->doc = NULL;
    }
    if (s->root && finish(s)) s->root = NULL;
    if (!s->root) {
        snprintf(msg, cap, "%s", s->err[0] ? s->err : "invalid schema");
        srv_jsonc_schema_free(s);
        return NULL;
    }
    return s;
}

/* --------------------------------------------------------------- matcher */

enum {
    S_VAL,      /* a value of f->n may start (whitespace first) */
    S_STR,      /* inside a string */
    S_NUM,      /* inside a number */
    S_LIT,      /* inside one of f->n's literal texts */
    S_OBJ_OPEN, /* after '{' */
    S_OBJ_KEY,  /* inside a declared key (cand, pos) */
    S_OBJ_COLON,/* after a key */
    S_OBJ_AFTER,/* after a member's value */
    S_OBJ_NEXT, /* after ',' */
    S_ARR_OPEN, /* after '[' */
    S_ARR_AFTER,/* after an item */
    S_ARR_NEXT, /* after ',' */
};

typedef struct jc_frame {
    const jc_node *n; /* the value's node (JN_ANY: any value; literal nodes for true/false/null) */
    uint8_t st;
    uint8_t a;        /* S_STR: 0, 1 after '\', 2..5 hex digits read + 2; S_NUM: grammar state */
    uint8_t u8n;      /* S_STR: UTF-8 continuation bytes left */
    uint8_t u8lo, u8hi;
    uint8_t hexd;     /* S_STR: the first hex digit was d/D */
    uint8_t frac;     /* S_NUM: fraction and exponent allowed */
    int32_t cand;     /* S_OBJ_*: the property; S_LIT: the first literal consistent with the bytes so far */
    int32_t hi;       /* S_LIT: ... and one past the last (a range: sort_lits) */
    uint32_t pos;     /* S_OBJ_KEY / S_LIT: bytes matched */
    int32_t cnt;      /* arrays: items so far; S_NUM: digits of the current part */
    uint64_t used;    /* objects: properties written */
} jc_frame;

typedef struct jc_thread {
    uint8_t depth, ws, nl, done; /* ws, nl: whitespace bytes and newlines in the current run */
    jc_frame f[JC_MAX_DEPTH];
} jc_thread;

typedef struct jc_set {
    int n;
    jc_thread t[JC_MAX_THREADS];
} jc_set;

static void thread_copy(jc_thread *d, const jc_thread *s) {
    d->depth = s->depth;
    d->ws = s->ws;
    d->nl = s->nl;
    d->done = s->done;
    memcpy(d->f, s->f, sizeof *s->f * s->depth);
}

static void set_copy(jc_set *d, const jc_set *s) {
    d->n = s->n;
    for (int i = 0; i < s->n; i++) thread_copy(&d->t[i], &s->t[i]);
}

/* A new frame for a value of n, if its shallowest value fits below. */
static bool push(jc_thread *t, const jc_node *n) {
    if (t->depth + n->mindepth > JC_MAX_DEPTH) return false;
    jc_frame *f = &t->f[t->depth++];
    memset(f, 0, sizeof *f);
    f->n = n;
    f->st = S_VAL;
    return true;
}

static void pop(jc_thread *t) {
    if (--t->depth == 0) t->done = 1;
}

static bool is_ws(unsigned c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }
static bool is_digit(unsigned c) { return c >= '0' && c <= '9'; }
static bool is_hex(unsigned c) { return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

static bool obj_free(const jc_node *n) { return n->kind == JN_ANY || n->free_keys; }
static const jc_node *free_val(const jc_node *n, const jc_node *any) { return n->kind == JN_ANY ? any : n->extra; }
/* Whether the object (frame f at depth) can take one more member: a free
 * key, or an unused property whose value fits below. */
static bool obj_can_add(const jc_frame *f, int depth, const jc_node *any) {
    if (obj_free(f->n)) return depth + free_val(f->n, any)->mindepth <= JC_MAX_DEPTH;
    for (int k = 0; k < f->n->n_props; k++)
        if (!(f->used >> k & 1) && depth + f->n->vals[k]->mindepth <= JC_MAX_DEPTH) return true;
    return false;
}
static bool obj_complete(const jc_frame *f) { return f->n->kind == JN_ANY || (f->used & f->n->req) == f->n->req; }
static const jc_node *arr_items(const jc_node *n, const jc_node *any) {
    return n->kind == JN_ANY ? any : n->items;
}

/* number grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static int num_next(int st, unsigned c, bool frac) {
    switch (st) {
    case 0: return c == '-' ? 1 : c == '0' ? 2 : is_digit(c) ? 3 : -1;
    case 1: return c == '0' ? 2 : is_digit(c) ? 3 : -1;
    case 2: return frac && c == '.' ? 4 : frac && (c == 'e' || c == 'E') ? 6 : -1;
    case 3: return is_digit(c) ? 3 : frac && c == '.' ? 4 : frac && (c == 'e' || c == 'E') ? 6 : -1;
    case 4: return is_digit(c) ? 5 : -1;
    case 5: return is_digit(c) ? 5 : c == 'e' || c == 'E' ? 6 : -1;
    case 6: return c == '+' || c == '-' ? 7 : is_digit(c) ? 8 : -1;
    case 7: return is_digit(c) ? 8 : -1;
    case 8: return is_digit(c) ? 8 : -1;
    }
    return -1;
}
static bool num_final(int st) { return st == 2 || st == 3 || st == 5 || st == 8; }

/* The literals of n in [*lo, *hi) share their first pos bytes: narrows the
 * range to those whose byte pos is c (false when none is). */
static bool lit_narrow(const jc_node *n, int *lo, int *hi, size_t pos, unsigned c) {
    int a = *lo, b = *hi;
    if (a < b && n->lit_len[a] == pos) a++; /* the one that ends here sorts first */
    int l = a, r = b;
    while (l < r) {
        const int m = (l + r) / 2;
        if ((unsigned char)n->lits[m][pos] < c) l = m + 1;
        else r = m;
    }
    const int first = l;
    r = b;
    while (l < r) {
        const int m = (l + r) / 2;
        if ((unsigned char)n->lits[m][pos] <= c) l = m + 1;
        else r = m;
    }
    if (first == l) return false;
    *lo = first;
    *hi = l;
    return true;
}

/* A literal of the range ends after pos bytes. */
static bool lit_whole(const jc_node *n, int lo, int hi, size_t pos) { return lo < hi && n->lit_len[lo] == pos; }

/* The same for an unused declared key of an object (frame f at depth)
 * whose value fits below. */
static int key_find(const jc_frame *f, int depth, size_t pos, int c, bool want_end) {
    const jc_node *n = f->n;
    for (int k = 0; k < n->n_props; k++) {
        if (f->used >> k & 1 || depth + n->vals[k]->mindepth > JC_MAX_DEPTH) continue;
        if (want_end ? n->key_len[k] != pos : n->key_len[k] <= pos || (unsigned char)n->keys[k][pos] != c) continue;
        if (f->cand >= 0 && pos && memcmp(n->keys[k], n->keys[f->cand], pos)) continue;
        return k;
    }
    return -1;
}

typedef struct jc_ctx {
    const srv_jsonc_schema *s;
    jc_set *out;
} jc_ctx;

/* Adds t to the output set unless an identical thread is there (frames are
 * zeroed when pushed, so whole frames compare); past JC_MAX_THREADS distinct
 * threads the rest are dropped (the schema compiler refuses values with
 * more alternatives; nested ones could still multiply). */
static void emit(jc_ctx *x, const jc_thread *t) {
    for (int i = 0; i < x->out->n; i++) {
        const jc_thread *u = &x->out->t[i];
        if (u->depth == t->depth && u->ws == t->ws && u->nl == t->nl && u->done == t->done &&
            !memcmp(u->f, t->f, sizeof *t->f * t->depth))
            return;
    }
    if (x->out->n < JC_MAX_THREADS) thread_copy(&x->out->t[x->out->n++], t);
}

/* Runs byte c through thread t (modified); the surviving threads (several
 * when an anyOf forks) go to x->out. */
static void run(jc_ctx *x, jc_thread *t, unsigned c) {
    for (;;) { /* until c is consumed (a value that ends on c hands it to its parent) */
        if (t->depth == 0) return; /* the value is complete: nothing may follow */
        jc_frame *f = &t->f[t->depth - 1];
        const jc_node *n = f->n;
        if (is_ws(c) && f->st != S_STR && f->st != S_NUM && f->st != S_LIT && f->st != S_OBJ_KEY) {
            if (++t->ws > JC_MAX_WS || (c == '\n' && ++t->nl > JC_MAX_NL)) return;
            emit(x, t);
            return;
        }
        switch (f->st) {
        case S_VAL:
            if (n->kind == JN_ALT || n->kind == JN_PENDING) { /* one thread per alternative that fits */
                for (int i = 0; i < n->n_leaves; i++) {
                    if (t->depth - 1 + n->leaves[i]->mindepth > JC_MAX_DEPTH) continue;
                    jc_thread u;
                    thread_copy(&u, t);
                    u.f[u.depth - 1].n = n->leaves[i];
                    run(x, &u, c);
                }
                return;
            }
            t->ws = t->nl = 0;
            switch (n->kind) {
            case JN_ANY:
                if (c == '{') f->st = S_OBJ_OPEN;
                else if (c == '[') f->st = S_ARR_OPEN;
                else if (c == '"') f->st = S_STR;
                else if (c == '-' || is_digit(c)) {
                    f->st = S_NUM;
                    f->frac = 1;
                    continue;
                } else if (c == 't' || c == 'f' || c == 'n') {
                    f->n = x->s->lit_any;
                    f->st = S_LIT;
                    f->cand = 0;
                    f->hi = f->n->n_lits;
                    continue;
                } else return;
                break;
            case JN_OBJECT:
                if (c != '{') return;
                f->st = S_OBJ_OPEN;
                break;
            case JN_ARRAY:
                if (c != '[') return;
                f->st = S_ARR_OPEN;
                break;
            case JN_STRING:
                if (c != '"') return;
                f->st = S_STR;
                break;
            case JN_NUMBER:
            case JN_INTEGER:
                if (c != '-' && !is_digit(c)) return;
                f->st = S_NUM;
                f->frac = n->kind == JN_NUMBER;
                continue;
            case JN_LITS:
                f->st = S_LIT;
                f->cand = 0;
                f->hi = n->n_lits;
                continue;
            default:
                return;
            }
            emit(x, t);
            return;
        case S_STR:
            t->ws = t->nl = 0;
            if (f->u8n) {
                if (c < f->u8lo || c > f->u8hi) return;
                f->u8n--;
                f->u8lo = 0x80;
                f->u8hi = 0xBF;
            } else if (f->a == 1) {
                if (c == 'u') f->a = 2;
                else if (strchr("\"\\/bfnrt", (int)c) && c) f->a = 0;
                else return;
            } else if (f->a >= 2) {
                if (!is_hex(c)) return;
                if (f->a == 2) f->hexd = c == 'd' || c == 'D';
                /* \uD800-\uDFFF: no lone surrogates (clients' parsers differ) */
                if (f->a == 3 && f->hexd && ((c >= '8' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
                    return;
                if (++f->a == 6) f->a = 0;
            } else if (c == '"') {
                pop(t);
            } else if (c == '\\') {
                f->a = 1;
            } else if (c < 0x20) {
                return;
            } else if (c >= 0x80) {
                if (c >= 0xC2 && c <= 0xDF) f->u8n = 1, f->u8lo = 0x80, f->u8hi = 0xBF;
                else if (c == 0xE0) f->u8n = 2, f->u8lo = 0xA0, f->u8hi = 0xBF;
                else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) f->u8n = 2, f->u8lo = 0x80, f->u8hi = 0xBF;
                else if (c == 0xED) f->u8n = 2, f->u8lo = 0x80, f->u8hi = 0x9F;
                else if (c == 0xF0) f->u8n = 3, f->u8lo = 0x90, f->u8hi = 0xBF;
                else if (c >= 0xF1 && c <= 0xF3) f->u8n = 3, f->u8lo = 0x80, f->u8hi = 0xBF;
                else if (c == 0xF4) f->u8n = 3, f->u8lo = 0x80, f->u8hi = 0x8F;
                else return;
            }
            emit(x, t);
            return;
        case S_NUM: {
            int nx = num_next(f->a, c, f->frac);
            if (nx >= 0 && is_digit(c)) { /* digits per part: what every parser reads (doubles, exact integers) */
                f->cnt = nx == f->a ? f->cnt + 1 : 1;
                if (f->cnt > (nx == 3 ? JC_MAX_INT_DIGITS : nx == 5 ? JC_MAX_FRAC_DIGITS : nx == 8 ? JC_MAX_EXP_DIGITS : 1) &&
                    !x->s->filtering) /* enum values are the client's: their digits are not bounded */
                    nx = -1;
            }
            if (nx >= 0) {
                f->a = (uint8_t)nx;
                f->pos++;
                t->ws = t->nl = 0;
                emit(x, t);
                return;
            }
            if (!num_final(f->a)) return;
            pop(t); /* the number ended: c belongs to the parent */
            continue;
        }
        case S_LIT: {
            int lo = f->cand, hi = f->hi;
            if (lit_narrow(n, &lo, &hi, f->pos, c)) {
                f->cand = lo;
                f->hi = hi;
                f->pos++;
                t->ws = t->nl = 0;
                /* a literal that is whole and that no other one extends ends here */
                if (hi - lo == 1 && n->lit_len[lo] == f->pos) pop(t);
                emit(x, t);
                return;
            }
            if (f->pos == 0 || !lit_whole(n, f->cand, f->hi, f->pos)) return;
            pop(t);
            continue;
        }
        case S_OBJ_OPEN:
        case S_OBJ_NEXT:
            t->ws = t->nl = 0;
            if (c == '}' && f->st == S_OBJ_OPEN) {
                if (!obj_complete(f)) return;
                pop(t);
                emit(x, t);
                return;
            }
            if (c != '"' || !obj_can_add(f, t->depth, x->s->any)) return;
            if (obj_free(n)) {
                f->st = S_OBJ_COLON;
                f->cand = -1;
                if (!push(t, x->s->keystr)) return;
                t->f[t->depth - 1].st = S_STR;
            } else {
                f->st = S_OBJ_KEY;
                f->pos = 0;
                f->cand = -1;
            }
            emit(x, t);
            return;
        case S_OBJ_KEY: {
            int k = key_find(f, t->depth, f->pos, (int)c, false);
            if (k < 0 && c == '"' && (k = key_find(f, t->depth, f->pos, 0, true)) >= 0) {
                f->cand = k;
                f->st = S_OBJ_COLON;
                emit(x, t);
                return;
            }
            if (k < 0) return;
            f->cand = k;
            f->pos++;
            emit(x, t);
            return;
        }
        case S_OBJ_COLON: {
            t->ws = t->nl = 0;
            if (c != ':') return;
            f->st = S_OBJ_AFTER;
            const jc_node *v;
            if (f->cand >= 0) {
                f->used |= 1ull << f->cand;
                v = n->vals[f->cand];
            } else {
                v = free_val(n, x->s->any);
            }
            if (!push(t, v)) return;
            emit(x, t);
            return;
        }
        case S_OBJ_AFTER:
            t->ws = t->nl = 0;
            if (c == ',') {
                if (!obj_can_add(f, t->depth, x->s->any)) return;
                f->st = S_OBJ_NEXT;
            } else if (c == '}') {
                if (!obj_complete(f)) return;
                pop(t);
            } else {
                return;
            }
            emit(x, t);
            return;
        case S_ARR_OPEN:
        case S_ARR_NEXT:
            t->ws = t->nl = 0;
            if (c == ']' && f->st == S_ARR_OPEN) {
                if (f->cnt < n->min_items) return;
                pop(t);
                emit(x, t);
                return;
            }
            if (n->kind != JN_ANY && n->max_items >= 0 && f->cnt >= n->max_items) return;
            f->cnt++;
            f->st = S_ARR_AFTER;
            if (!push(t, arr_items(n, x->s->any))) return;
            continue; /* c starts the item */
        case S_ARR_AFTER:
            t->ws = t->nl = 0;
            if (c == ',') {
                if (n->kind != JN_ANY && n->max_items >= 0 && f->cnt >= n->max_items) return;
                if (t->depth + arr_items(n, x->s->any)->mindepth > JC_MAX_DEPTH) return;
                f->st = S_ARR_NEXT;
            } else if (c == ']') {
                if (n->kind != JN_ANY && f->cnt < n->min_items) return;
                pop(t);
            } else {
                return;
            }
            emit(x, t);
            return;
        }
        return;
    }
}

/* Feeds bytes to the set in place; false when no thread survives (the set
 * is then left in an unspecified state). */
static bool set_feed(const srv_jsonc_schema *s, jc_set *set, const unsigned char *b, size_t n, jc_set *tmp) {
    jc_set *cur = set, *nxt = tmp;
    for (size_t i = 0; i < n; i++) {
        nxt->n = 0;
        jc_ctx x = {s, nxt};
        for (int k = 0; k < cur->n; k++) {
            jc_thread u;
            thread_copy(&u, &cur->t[k]);
            run(&x, &u, b[i]);
        }
        if (!nxt->n) return false;
        jc_set *sw = cur;
        cur = nxt;
        nxt = sw;
    }
    if (cur != set) set_copy(set, cur);
    return true;
}

/* The value is closed in some thread: nothing may follow. */
static bool set_done(const jc_set *set) {
    for (int i = 0; i < set->n; i++)
        if (set->t[i].done) return true;
    return false;
}

/* The input may end here: some thread is done or ends in a complete
 * top-level number or literal. */
static bool set_can_end(const jc_set *set) {
    for (int i = 0; i < set->n; i++) {
        const jc_thread *t = &set->t[i];
        if (t->done) return true;
        if (t->depth != 1) continue;
        const jc_frame *f = &t->f[0];
        if (f->st == S_NUM && num_final(f->a)) return true;
        if (f->st == S_LIT && f->pos > 0 && lit_whole(f->n, f->cand, f->hi, f->pos)) return true;
    }
    return false;
}

/* enum / const values the schema beside them does not admit are dropped
 * (compile_lits); none left is a 400. */
static int apply_filters(srv_jsonc_schema *s) {
    if (!s->n_filters) return 0;
    jc_set *set = xmalloc(sizeof *set), *tmp = xmalloc(sizeof *tmp);
    s->filtering = true;
    int rc = 0;
    /* until nothing changes: a value's schema may lead back to its own enum
     * (or another filtered one), which must hold only kept values; a node is
     * compacted only after all its values were checked against it as it was */
    for (bool changed = true; changed && !rc;) {
        changed = false;
        for (int i = 0; i < s->n_filters && !rc; i++) {
            jc_node *l = s->filters[i].lits;
            bool *ok = xcalloc((size_t)l->n_lits + 1, sizeof *ok);
            for (int k = 0; k < l->n_lits; k++) {
                set->n = 1;
                memset(&set->t[0], 0, sizeof set->t[0]);
                ok[k] = push(&set->t[0], s->filters[i].rest) &&
                        set_feed(s, set, (const unsigned char *)l->lits[k], l->lit_len[k], tmp) && set_can_end(set);
            }
            int keep = 0;
            for (int k = 0; k < l->n_lits; k++) {
                if (ok[k]) {
                    l->lits[keep] = l->lits[k];
                    l->lit_len[keep++] = l->lit_len[k];
                } else {
                    free(l->lits[k]);
                    changed = true;
                }
            }
            free(ok);
            l->n_lits = keep;
            if (!keep) {
                snprintf(s->err, sizeof s->err, "enum/const: no value fits the rest of its schema (type, properties, ...)");
                rc = -1;
            }
        }
    }
    s->filtering = false;
    free(set);
    free(tmp);
    return rc;
}

/* ------------------------------------------------------------ the tokens */

struct srv_jsonc {
    srv_jsonc_schema *schema;
    jc_set set, tmp, probe, probe_tmp;
    bool json_alive;      /* the reply so far is a prefix of a schema value */
    bool dsml_alt;        /* ... or of a tool-call block's opening */
    bool off;             /* a tool-call block opened: no constraint */
    char dsml_buf[JC_MAX_WS + 32];
    size_t dsml_len;
    srv_jsonc_vocab v;
    float *scratch;       /* (n_vocab) masked logits */
};

srv_jsonc *srv_jsonc_new(srv_jsonc_schema *schema, bool tool_alt, const srv_jsonc_vocab *v) {
    srv_jsonc *j = xcalloc(1, sizeof *j);
    j->schema = schema;
    j->v = *v;
    j->scratch = malloc((size_t)v->n_vocab * sizeof *j->scratch);
    if (!j->scratch) {
        srv_jsonc_free(j);
        return NULL;
    }
    j->set.n = 1;
    j->set.t[0].depth = 0;
    push(&j->set.t[0], schema->root);
    j->json_alive = true;
    j->dsml_alt = tool_alt;
    return j;
}

void srv_jsonc_free(srv_jsonc *j) {
    if (!j) return;
    srv_jsonc_schema_free(j->schema);
    free(j->scratch);
    free(j);
}

bool srv_jsonc_active(const srv_jsonc *j) { return j && !j->off; }

bool srv_jsonc_must_end(const srv_jsonc *j) { return j && !j->off && j->json_alive && set_done(&j->set); }

/* The opening tags of a tool-call block (the three families of TEXT C.3). */
static const char *const OPEN_TAGS[] = {"<" DS4_DSML_MARK "tool_calls>", "<DSML\xef\xbd\x9ctool_calls>", "<tool_calls>"};

/* 0: buf + b is not the start of a block; 1: a prefix of its opening (after
 * whitespace); 2: the opening is complete. */
static int dsml_state(const srv_jsonc *j, const char *b, size_t n) {
    char t[sizeof j->dsml_buf + 64];
    if (j->dsml_len + n > sizeof t) n = sizeof t - j->dsml_len; /* enough to decide */
    memcpy(t, j->dsml_buf, j->dsml_len);
    memcpy(t + j->dsml_len, b, n);
    size_t len = j->dsml_len + n, i = 0;
    int nl = 0;
    while (i < len && is_ws((unsigned char)t[i])) nl += t[i++] == '\n';
    if (i > JC_MAX_WS || nl > JC_MAX_NL) return 0; /* the whitespace JSON allows there, no more */
    const char *r = t + i;
    size_t rl = len - i;
    for (size_t k = 0; k < sizeof OPEN_TAGS / sizeof *OPEN_TAGS; k++) {
        size_t ol = strlen(OPEN_TAGS[k]);
        if (rl <= ol && !memcmp(r, OPEN_TAGS[k], rl)) return rl == ol ? 2 : 1;
        if (rl > ol && !memcmp(r, OPEN_TAGS[k], ol)) return 2;
    }
    return 0;
}

static bool json_allows(srv_jsonc *j, const char *b, size_t n) {
    if (!j->json_alive || !n) return false;
    set_copy(&j->probe, &j->set);
    return set_feed(j->schema, &j->probe, (const unsigned char *)b, n, &j->probe_tmp);
}

bool srv_jsonc_allows(srv_jsonc *j, int32_t tok) {
    if (!j || j->off) return true;
    if (tok == j->v.eos) return j->json_alive && set_can_end(&j->set);
    size_t n = 0;
    const char *b = j->v.bytes(j->v.user, tok, &n);
    if (!b) return false;
    const bool dsml = j->dsml_alt && n && dsml_state(j, b, n) > 0;
    if (j->v.control(j->v.user, tok)) return tok == j->v.dsml && dsml;
    return dsml || json_allows(j, b, n);
}

void srv_jsonc_feed(srv_jsonc *j, int32_t tok) {
    if (!j || j->off || tok == j->v.eos) return;
    size_t n = 0;
    const char *b = j->v.bytes(j->v.user, tok, &n);
    if (!b) n = 0;
    const bool control = j->v.control(j->v.user, tok);
    if (j->json_alive)
        j->json_alive = !control && n && set_feed(j->schema, &j->set, (const unsigned char *)b, n, &j->tmp);
    if (j->dsml_alt) {
        int st = n && (!control || tok == j->v.dsml) ? dsml_state(j, b, n) : 0;
        if (st == 2) {
            j->off = true;
        } else if (st == 1) {
            memcpy(j->dsml_buf + j->dsml_len, b, n); /* st == 1: still within an opening tag's length */
            j->dsml_len += n;
        } else {
            j->dsml_alt = false;
        }
    }
}

bool srv_jsonc_allows_text(srv_jsonc *j, const char *b, size_t n) {
    return !j || j->off || !n || json_allows(j, b, n);
}

bool srv_jsonc_feed_text(srv_jsonc *j, const char *b, size_t n) {
    if (!j || j->off || !n) return true;
    j->dsml_alt = false; /* text before a tool-call block: the block cannot open any more */
    if (!j->json_alive) return false;
    j->json_alive = set_feed(j->schema, &j->set, (const unsigned char *)b, n, &j->tmp);
    return j->json_alive;
}

bool srv_jsonc_schema_prefix(const srv_jsonc_schema *s, const char *b, size_t n) {
    jc_set *set = xmalloc(sizeof *set), *tmp = xmalloc(sizeof *tmp);
    set->n = 1;
    memset(&set->t[0], 0, sizeof set->t[0]);
    const bool ok = push(&set->t[0], s->root) && set_feed(s, set, (const unsigned char *)b, n, tmp);
    free(set);
    free(tmp);
    return ok;
}

int32_t srv_jsonc_pick(srv_jsonc *j, ds4_sampler *smp, const float *logits, const ds4_sampler_params *p,
                       ds4_rng *rng, bool refused) {
    if (srv_jsonc_must_end(j)) return j->v.eos;
    const bool sample = p->temperature > 0.0f;
    int32_t tok;
    if (!refused) { /* the plain draw first (refused: the caller drew it already) */
        tok = sample ? ds4_sampler_sample(smp, logits, p, rng) : ds4_argmax(logits, j->v.n_vocab);
        if (tok >= 0 && srv_jsonc_allows(j, tok)) return tok;
    }
    /* mask the vocabulary: first the bytes a token may start with */
    bool first[256];
    for (int c = 0; c < 256; c++) {
        unsigned char b = (unsigned char)c;
        first[c] = json_allows(j, (const char *)&b, 1);
    }
    for (int t = 0; t < j->v.n_vocab; t++) {
        size_t n = 0;
        const char *b = t == j->v.eos ? NULL : j->v.bytes(j->v.user, t, &n);
        bool ok;
        if (t == j->v.eos) ok = srv_jsonc_allows(j, t);
        else if (!b || !n) ok = false;
        else if (j->dsml_alt && dsml_state(j, b, n) > 0) ok = !j->v.control(j->v.user, t) || t == j->v.dsml;
        else ok = first[(unsigned char)b[0]] && !j->v.control(j->v.user, t) && json_allows(j, b, n);
        j->scratch[t] = ok ? logits[t] : -INFINITY;
    }
    tok = sample ? ds4_sampler_sample(smp, j->scratch, p, rng) : ds4_argmax(j->scratch, j->v.n_vocab);
    return tok >= 0 && isfinite(j->scratch[tok]) ? tok : -1;
}
