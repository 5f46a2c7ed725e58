/* dsml.c - DSML tool-call markup (docs/TEXT.md §C; see dsml.h).
 *
 * Sections: tag families and small text helpers; JSON scanning (validate,
 * minify, decode, quote); prompt rendering (C.2, C.4, C.5); the block
 * grammar (C.6 step 4); the sampling tracker (C.9); the streaming parser
 * (B.8, C.10), which is also the final parser; the exact-replay map (C.8).
 *
 * One parser: a turn's reasoning, content and tool calls are decided by the
 * streaming parser alone, and ds4_dsml_parse runs it over the whole text,
 * so a streamed reply and a non-streamed one are the same reply
 * (docs/server.md "One parser").
 *
 * Invariants of the streaming parser: it keeps the whole turn text and a
 * cursor `pos`; everything before pos has been emitted (or consumed as
 * markup) and every decision is taken only when the bytes that decide it
 * are present, so the merged event sequence does not depend on how the text
 * was split into chunks.
 */
#include "dsml.h"
#include "util/num.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define BAR "\xef\xbd\x9c" /* U+FF5C, the marker bar */
#define FULL BAR "DSML" BAR
#define SHORT "DSML" BAR

/* ------------------------------------------------------ tag families */

/* The three tag families of C.3, in the needle order of C.6 step 2. */
typedef struct family {
    const char *open;       /* <F tool_calls> */
    const char *close;      /* </F tool_calls> */
    const char *invoke;     /* <F invoke   (attributes up to '>') */
    const char *invoke_end; /* </F invoke> */
    const char *param;      /* <F parameter */
    const char *param_end;  /* </F parameter> */
} family;

static const family FAMS[3] = {
    {"<" FULL "tool_calls>", "</" FULL "tool_calls>", "<" FULL "invoke", "</" FULL "invoke>",
     "<" FULL "parameter", "</" FULL "parameter>"},
    {"<" SHORT "tool_calls>", "</" SHORT "tool_calls>", "<" SHORT "invoke",
     "</" SHORT "invoke>", "<" SHORT "parameter", "</" SHORT "parameter>"},
    {"<tool_calls>", "</tool_calls>", "<invoke", "</invoke>", "<parameter", "</parameter>"},
};

static int is_ws(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static int has_prefix(const char *p, size_t n, const char *lit) {
    size_t k = strlen(lit);
    return n >= k && memcmp(p, lit, k) == 0;
}

/* p[0..n) is a proper prefix of lit (shorter than lit, bytes equal). */
static int is_partial(const char *p, size_t n, const char *lit) {
    size_t k = strlen(lit);
    return n < k && memcmp(p, lit, n) == 0;
}

/* Longest k < strlen(lit) such that the last k bytes of p[0..n) are the
 * first k bytes of lit. */
static size_t partial_suffix(const char *p, size_t n, const char *lit) {
    size_t k = strlen(lit);
    size_t best = k - 1 < n ? k - 1 : n;
    for (size_t m = best; m > 0; m--)
        if (memcmp(p + n - m, lit, m) == 0) return m;
    return 0;
}

static size_t find(const char *p, size_t n, size_t from, const char *lit) {
    size_t k = strlen(lit);
    if (from > n) return SIZE_MAX;
    const char *q = memmem(p + from, n - from, lit, k);
    return q ? (size_t)(q - p) : SIZE_MAX;
}

/* Length of p[0..n) without a trailing incomplete UTF-8 sequence. */
static size_t utf8_complete(const char *p, size_t n) {
    for (size_t back = 1; back <= 4 && back <= n; back++) {
        unsigned char c = (unsigned char)p[n - back];
        if ((c & 0xC0) == 0x80) continue; /* continuation byte */
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > back ? n - back : n;
    }
    return n;
}

/* Five XML entities decoded by the parser (C.6). */
static const struct { const char *ent; char ch; } ENTS[] = {
    {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''},
};

/* Appends p[0..n) entity-decoded. If `hold` is set, stops before an '&'
 * whose remaining bytes are a proper prefix of an entity (more input may
 * complete it) and returns the bytes consumed. */
static size_t entity_decode(ds4_buf *out, const char *p, size_t n, int hold) {
    size_t i = 0, run = 0;
    while (i < n) {
        if (p[i] != '&') {
            i++;
            continue;
        }
        ds4_buf_append(out, p + run, i - run);
        int done = 0;
        for (size_t e = 0; e < 5 && !done; e++) {
            if (has_prefix(p + i, n - i, ENTS[e].ent)) {
                ds4_buf_putc(out, ENTS[e].ch);
                i += strlen(ENTS[e].ent);
                done = 1;
            } else if (hold && is_partial(p + i, n - i, ENTS[e].ent)) {
                return i;
            }
        }
        if (!done) ds4_buf_putc(out, p[i++]);
        run = i;
    }
    ds4_buf_append(out, p + run, n - run);
    return n;
}

/* Appends p[0..n) with every occurrence of `tag` written with its leading
 * '<' replaced by `lt` (the escapes of C.4/C.5). */
static void escape_tag(ds4_buf *out, const char *p, size_t n, const char *tag, const char *lt) {
    size_t i = 0;
    for (;;) {
        size_t j = find(p, n, i, tag);
        if (j == SIZE_MAX) break;
        ds4_buf_append(out, p + i, j - i);
        ds4_buf_puts(out, lt);
        i = j + 1;
    }
    ds4_buf_append(out, p + i, n - i);
}

/* ------------------------------------------------------------- JSON */

#define JSON_MAX_DEPTH 256

static void skip_ws_json(const char *p, size_t n, size_t *i) {
    while (*i < n && (p[*i] == ' ' || p[*i] == '\t' || p[*i] == '\n' || p[*i] == '\r')) (*i)++;
}

/* Scans a string literal starting at p[*i] == '"'; *i ends after it. */
static int scan_string(const char *p, size_t n, size_t *i) {
    size_t k = *i + 1;
    while (k < n) {
        unsigned char c = (unsigned char)p[k];
        if (c == '"') {
            *i = k + 1;
            return 0;
        }
        if (c < 0x20) return -1;
        if (c == '\\') {
            if (k + 1 >= n) return -1;
            char e = p[k + 1];
            if (e == 'u') {
                if (k + 6 > n) return -1;
                for (int h = 2; h < 6; h++)
                    if (ds4_hex_digit(p[k + h]) < 0) return -1;
                k += 6;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == '\0') return -1;
            k += 2;
            continue;
        }
        k++;
    }
    return -1;
}

static int scan_number(const char *p, size_t n, size_t *i) {
    size_t k = *i;
    if (k < n && p[k] == '-') k++;
    if (k >= n) return -1;
    if (p[k] == '0') k++;
    else if (p[k] >= '1' && p[k] <= '9')
        while (k < n && p[k] >= '0' && p[k] <= '9') k++;
    else
        return -1;
    if (k < n && p[k] == '.') {
        k++;
        if (k >= n || p[k] < '0' || p[k] > '9') return -1;
        while (k < n && p[k] >= '0' && p[k] <= '9') k++;
    }
    if (k < n && (p[k] == 'e' || p[k] == 'E')) {
        k++;
        if (k < n && (p[k] == '+' || p[k] == '-')) k++;
        if (k >= n || p[k] < '0' || p[k] > '9') return -1;
        while (k < n && p[k] >= '0' && p[k] <= '9') k++;
    }
    *i = k;
    return 0;
}

/* Scans one JSON value at p[*i] (no leading whitespace), appending its
 * minified text to min (if non-NULL). 0 or -1 (invalid). */
static int scan_value(const char *p, size_t n, size_t *i, int depth, ds4_buf *min) {
    if (*i >= n || depth > JSON_MAX_DEPTH) return -1;
    size_t s = *i;
    char c = p[s];
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        if (min) ds4_buf_putc(min, c);
        size_t k = s + 1;
        skip_ws_json(p, n, &k);
        if (k < n && p[k] == close) {
            if (min) ds4_buf_putc(min, close);
            *i = k + 1;
            return 0;
        }
        for (;;) {
            if (c == '{') {
                size_t ks = k;
                if (k >= n || p[k] != '"' || scan_string(p, n, &k)) return -1;
                if (min) ds4_buf_append(min, p + ks, k - ks);
                skip_ws_json(p, n, &k);
                if (k >= n || p[k] != ':') return -1;
                if (min) ds4_buf_putc(min, ':');
                k++;
                skip_ws_json(p, n, &k);
            }
            if (scan_value(p, n, &k, depth + 1, min)) return -1;
            skip_ws_json(p, n, &k);
            if (k >= n) return -1;
            if (p[k] == close) {
                if (min) ds4_buf_putc(min, close);
                *i = k + 1;
                return 0;
            }
            if (p[k] != ',') return -1;
            if (min) ds4_buf_putc(min, ',');
            k++;
            skip_ws_json(p, n, &k);
        }
    }
    size_t k = s;
    if (c == '"') {
        if (scan_string(p, n, &k)) return -1;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        if (scan_number(p, n, &k)) return -1;
    } else if (has_prefix(p + s, n - s, "true")) {
        k += 4;
    } else if (has_prefix(p + s, n - s, "false")) {
        k += 5;
    } else if (has_prefix(p + s, n - s, "null")) {
        k += 4;
    } else {
        return -1;
    }
    if (min) ds4_buf_append(min, p + s, k - s);
    *i = k;
    return 0;
}

/* The whole of p[0..n) is one JSON value (whitespace around allowed). */
static int json_minify(ds4_buf *out, const char *p, size_t n) {
    size_t i = 0, mark = out->len;
    skip_ws_json(p, n, &i);
    if (scan_value(p, n, &i, 0, out) == 0) {
        skip_ws_json(p, n, &i);
        if (i == n) return 0;
    }
    ds4_buf_truncate(out, mark);
    return -1;
}

int ds4_dsml_json_minify(ds4_buf *out, const char *json, size_t len, ds4_err *err) {
    if (json_minify(out, json, len))
        return ds4_err_set(err, DS4_E_FORMAT, "dsml: not a single valid JSON value");
    return ds4_buf_ok(out) ? 0 : ds4_err_set(err, DS4_E_NOMEM, "dsml: no memory");
}

static void put_utf8(ds4_buf *out, uint32_t cp) {
    char b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        b[0] = (char)(0xC0 | (cp >> 6));
        b[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        b[0] = (char)(0xE0 | (cp >> 12));
        b[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        b[0] = (char)(0xF0 | (cp >> 18));
        b[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    ds4_buf_append(out, b, n);
}

static uint32_t hex4(const char *p) {
    return (uint32_t)(ds4_hex_digit(p[0]) << 12 | ds4_hex_digit(p[1]) << 8 | ds4_hex_digit(p[2]) << 4 | ds4_hex_digit(p[3]));
}

/* Decodes a validated string literal p[0..n) (quotes included). Surrogate
 * pairs combine; a lone surrogate is encoded as-is (docs/SERVING.md B.4). */
static void json_unquote(ds4_buf *out, const char *p, size_t n) {
    size_t i = 1, end = n - 1;
    while (i < end) {
        if (p[i] != '\\') {
            size_t j = i;
            while (j < end && p[j] != '\\') j++;
            ds4_buf_append(out, p + i, j - i);
            i = j;
            continue;
        }
        char e = p[i + 1];
        i += 2;
        switch (e) {
        case 'b': ds4_buf_putc(out, '\b'); break;
        case 'f': ds4_buf_putc(out, '\f'); break;
        case 'n': ds4_buf_putc(out, '\n'); break;
        case 'r': ds4_buf_putc(out, '\r'); break;
        case 't': ds4_buf_putc(out, '\t'); break;
        case 'u': {
            uint32_t cp = hex4(p + i);
            i += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && i + 6 <= end && p[i] == '\\' && p[i + 1] == 'u') {
                uint32_t lo = hex4(p + i + 2);
                if (lo >= 0xDC00 && lo < 0xE000) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    i += 6;
                }
            }
            put_utf8(out, cp);
            break;
        }
        default: ds4_buf_putc(out, e); break; /* " \ / */
        }
    }
}

/* JSON-escapes s[0..n) without the surrounding quotes. */
static void json_escape_body(ds4_buf *out, const char *s, size_t n) {
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char tmp[8];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        default:
            if (c < 0x20) {
                static const char hx[] = "0123456789abcdef";
                tmp[0] = '\\', tmp[1] = 'u', tmp[2] = '0', tmp[3] = '0';
                tmp[4] = hx[c >> 4], tmp[5] = hx[c & 15], tmp[6] = '\0';
                esc = tmp;
            }
        }
        if (!esc) continue;
        ds4_buf_append(out, s + run, i - run);
        ds4_buf_puts(out, esc);
        run = i + 1;
    }
    ds4_buf_append(out, s + run, n - run);
}

int ds4_dsml_json_quote(ds4_buf *out, const char *s, size_t len) {
    ds4_buf_putc(out, '"');
    json_escape_body(out, s, len);
    ds4_buf_putc(out, '"');
    return ds4_buf_ok(out) ? 0 : DS4_E_NOMEM;
}

/* One member of a JSON object: raw spans of the key literal and value. */
typedef struct member {
    size_t key, key_len, val, val_len;
} member;

/* Calls fn for every member of the object p[0..n) in order, after checking
 * that the whole text is one valid object. Returns -1 when it is not. */
static int for_members(const char *p, size_t n, void (*fn)(void *, const char *, member),
                       void *ud) {
    size_t i = 0;
    skip_ws_json(p, n, &i);
    size_t s = i;
    if (i >= n || p[i] != '{' || scan_value(p, n, &i, 0, NULL)) return -1;
    skip_ws_json(p, n, &i);
    if (i != n) return -1;
    size_t k = s + 1;
    skip_ws_json(p, n, &k);
    if (p[k] == '}') return 0;
    for (;;) {
        member m;
        m.key = k;
        scan_string(p, n, &k);
        m.key_len = k - m.key;
        skip_ws_json(p, n, &k);
        k++; /* ':' */
        skip_ws_json(p, n, &k);
        m.val = k;
        scan_value(p, n, &k, 1, NULL);
        m.val_len = k - m.val;
        fn(ud, p, m);
        skip_ws_json(p, n, &k);
        if (p[k] == '}') return 0;
        k++; /* ',' */
        skip_ws_json(p, n, &k);
    }
}

typedef struct compact_ctx {
    ds4_buf *out;
    int n;
} compact_ctx;

static void compact_member(void *ud, const char *p, member m) {
    compact_ctx *c = ud;
    ds4_buf tmp = DS4_BUF_INIT;
    if (c->n++) ds4_buf_putc(c->out, ',');
    json_unquote(&tmp, p + m.key, m.key_len);
    ds4_dsml_json_quote(c->out, tmp.data ? tmp.data : "", tmp.len);
    ds4_buf_putc(c->out, ':');
    if (p[m.val] == '"') {
        ds4_buf_reset(&tmp);
        json_unquote(&tmp, p + m.val, m.val_len);
        ds4_dsml_json_quote(c->out, tmp.data ? tmp.data : "", tmp.len);
    } else {
        json_minify(c->out, p + m.val, m.val_len);
    }
    if (!ds4_buf_ok(&tmp)) c->out->oom = 1;
    ds4_buf_free(&tmp);
}

int ds4_dsml_args_compact(ds4_buf *out, const char *args, size_t len) {
    size_t mark = out->len;
    compact_ctx c = {out, 0};
    ds4_buf_putc(out, '{');
    if (for_members(args, len, compact_member, &c)) {
        ds4_buf_truncate(out, mark);
        ds4_buf_puts(out, "{}");
        return ds4_buf_ok(out) ? 0 : DS4_E_NOMEM;
    }
    ds4_buf_putc(out, '}');
    return ds4_buf_ok(out) ? 0 : DS4_E_NOMEM;
}

/* ------------------------------------------------------ call ids */

static void hex_id(char *out, size_t cap, const char *prefix, const uint8_t r[16]) {
    static const char hx[] = "0123456789abcdef";
    size_t k = strlen(prefix);
    if (cap < k + 33) {
        if (cap) out[0] = '\0';
        return;
    }
    memcpy(out, prefix, k);
    for (int i = 0; i < 16; i++) {
        out[k + 2 * i] = hx[r[i] >> 4];
        out[k + 2 * i + 1] = hx[r[i] & 15];
    }
    out[k + 32] = '\0';
}

int ds4_dsml_call_id(char *out, size_t cap, const char *prefix) {
    uint8_t r[16];
    if (!prefix) prefix = "call_";
    if (cap < strlen(prefix) + 33) return DS4_E_ARG;
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) return DS4_E_IO;
    hex_id(out, cap, prefix, r);
    return 0;
}

/* ----------------------------------------------------- prompt pieces */

static const char TOOLS_HEAD[] =
    "## Tools\n"
    "\n"
    "You have access to a set of tools to help answer the user question. You can invoke "
    "tools by writing a \"<" FULL "tool_calls>\" block like the following:\n"
    "\n"
    "<" FULL "tool_calls>\n"
    "<" FULL "invoke name=\"$TOOL_NAME\">\n"
    "<" FULL "parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</" FULL
    "parameter>\n"
    "...\n"
    "</" FULL "invoke>\n"
    "<" FULL "invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</" FULL "invoke>\n"
    "</" FULL "tool_calls>\n"
    "\n"
    "String parameters should be specified as raw text and set `string=\"true\"`. Preserve "
    "characters such as `>`, `&`, and `&&` exactly; never replace normal string characters "
    "with XML or HTML entity escapes. Only if a string value itself contains the exact "
    "closing parameter tag `</" FULL "parameter>`, write that tag as `&lt;/" FULL
    "parameter>` inside the value. For all other types (numbers, booleans, arrays, objects), "
    "pass the value in JSON format and set `string=\"false\"`.\n"
    "\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete "
    "reasoning inside <think>...</think> BEFORE any tool calls or final response.\n"
    "\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n"
    "\n"
    "### Available Tool Schemas\n"
    "\n";

static const char TOOLS_TAIL[] =
    "\n"
    "\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls. Use the exact parameter names from the schemas.";

int ds4_dsml_tools_prompt(ds4_buf *out, const char *lines, size_t len) {
    ds4_buf_append(out, TOOLS_HEAD, sizeof TOOLS_HEAD - 1);
    ds4_buf_append(out, lines, len);
    ds4_buf_append(out, TOOLS_TAIL, sizeof TOOLS_TAIL - 1);
    return ds4_buf_ok(out) ? 0 : DS4_E_NOMEM;
}

int ds4_dsml_tool_result(ds4_buf *out, const char *content, size_t len) {
    ds4_buf_puts(out, DS4_TOOL_RESULT_OPEN);
    escape_tag(out, content, len, DS4_TOOL_RESULT_CLOSE, "&lt;");
    ds4_buf_puts(out, DS4_TOOL_RESULT_CLOSE);
    return ds4_buf_ok(out) ? 0 : DS4_E_NOMEM;
}

/* attr() of C.4: & < > " as entities. */
static void put_attr(ds4_buf *out, const char *s, size_t n) {
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        const char *e = s[i] == '&' ? "&amp;" : s[i] == '<' ? "&lt;" : s[i] == '>' ? "&gt;"
                      : s[i] == '"' ? "&quot;" : NULL;
        if (!e) continue;
        ds4_buf_append(out, s + run, i - run);
        ds4_buf_puts(out, e);
        run = i + 1;
    }
    ds4_buf_append(out, s + run, n - run);
}

#define PARAM_END "</" FULL "parameter>"

static void put_param(ds4_buf *out, const char *key, size_t key_len, int is_string,
                      const char *val, size_t val_len) {
    ds4_buf_puts(out, "<" FULL "parameter name=\"");
    put_attr(out, key, key_len);
    ds4_buf_puts(out, is_string ? "\" string=\"true\">" : "\" string=\"false\">");
    escape_tag(out, val, val_len, PARAM_END, is_string ? "&lt;" : "\\u003c");
    ds4_buf_puts(out, PARAM_END "\n");
}

static void render_member(void *ud, const char *p, member m) {
    ds4_buf *out = ud;
    ds4_buf key = DS4_BUF_INIT, val = DS4_BUF_INIT;
    json_unquote(&key, p + m.key, m.key_len);
    int is_string = p[m.val] == '"';
    if (is_string) json_unquote(&val, p + m.val, m.val_len);
    else json_minify(&val, p + m.val, m.val_len);
    put_param(out, key.data ? key.data : "", key.len, is_string, val.data ? val.data : "",
              val.len);
    if (!ds4_buf_ok(&key) || !ds4_buf_ok(&val)) out->oom = 1;
    ds4_buf_free(&key);
    ds4_buf_free(&val);
}

int ds4_dsml_render_calls(ds4_buf *out, const ds4_tool_call *calls, int n) {
    if (n <= 0) return 0;
    ds4_buf_puts(out, "\n\n<" FULL "tool_calls>\n");
    for (int i = 0; i < n; i++) {
        const ds4_tool_call *c = &calls[i];
        const char *name = c->name ? c->name : "";
        const char *args = c->arguments ? c->arguments : "";
        size_t args_len = c->arguments ? c->arguments_len : 0;
        ds4_buf_puts(out, "<" FULL "invoke name=\"");
        put_attr(out, name, strlen(name));
        ds4_buf_puts(out, "\">\n");
        size_t mark = out->len;
        if (for_members(args, args_len, render_member, out)) {
            ds4_buf_truncate(out, mark);
            put_param(out, "arguments", 9, 1, args, args_len);
        }
        ds4_buf_puts(out, "</" FULL "invoke>\n");
    }
    ds4_buf_puts(out, "</" FULL "tool_calls>");
    return ds4_buf_ok(out) ? 0 : DS4_E_NOMEM;
}

/* -------------------------------------------------------- final parse */

typedef struct call_vec {
    ds4_tool_call *v;
    int n, cap;
} call_vec;

static void calls_free(ds4_tool_call *v, int n) {
    for (int i = 0; i < n; i++) {
        free(v[i].id);
        free(v[i].name);
        free(v[i].arguments);
    }
    free(v);
}

static int calls_push(call_vec *cv, ds4_buf *name, ds4_buf *args) {
    if (cv->n == cv->cap) {
        int cap = cv->cap ? 2 * cv->cap : 4;
        ds4_tool_call *v = realloc(cv->v, (size_t)cap * sizeof *v);
        if (!v) return DS4_E_NOMEM;
        cv->v = v;
        cv->cap = cap;
    }
    ds4_tool_call *c = &cv->v[cv->n];
    c->id = NULL;
    c->name = ds4_buf_detach(name, NULL);
    c->arguments = ds4_buf_detach(args, &c->arguments_len);
    if (!c->name || !c->arguments) {
        free(c->name);
        free(c->arguments);
        return DS4_E_NOMEM;
    }
    cv->n++;
    return 0;
}

/* Finds attribute `key="` inside tag bytes t[a..gt) and gives the span of
 * its value (up to the next '"', which must be inside the tag). */
static int tag_attr(const char *t, size_t a, size_t gt, const char *key, size_t *vs,
                    size_t *vn) {
    size_t k = find(t, gt, a, key);
    if (k == SIZE_MAX) return 0;
    size_t s = k + strlen(key);
    size_t q = find(t, gt, s, "\"");
    if (q == SIZE_MAX) return 0;
    *vs = s;
    *vn = q - s;
    return 1;
}

/* Parsed parameter/invoke tag: name span and string attribute. */
typedef struct tag_info {
    size_t name, name_len;
    int has_str, str_true;
    size_t end; /* index after '>' */
} tag_info;

/* Reads a tag whose fixed head (e.g. "<F parameter") starts at i. Returns 0
 * and fills ti, or -1 (no '>' or no name). */
static int read_tag(const char *t, size_t n, size_t i, const char *head, tag_info *ti) {
    size_t a = i + strlen(head);
    size_t gt = find(t, n, a, ">");
    if (gt == SIZE_MAX) return -1;
    if (!tag_attr(t, a, gt, "name=\"", &ti->name, &ti->name_len)) return -1;
    size_t vs, vn;
    ti->has_str = tag_attr(t, a, gt, "string=\"", &vs, &vn);
    ti->str_true = ti->has_str && vn == 4 && memcmp(t + vs, "true", 4) == 0;
    ti->end = gt + 1;
    return 0;
}

static void skip_ws(const char *t, size_t n, size_t *i) {
    while (*i < n && is_ws((unsigned char)t[*i])) (*i)++;
}

/* Appends `"key": ` (the internal member form of C.6 step 5). */
static void put_key(ds4_buf *args, const char *t, const tag_info *ti) {
    ds4_buf key = DS4_BUF_INIT;
    entity_decode(&key, t + ti->name, ti->name_len, 0);
    ds4_dsml_json_quote(args, key.data ? key.data : "", key.len);
    ds4_buf_puts(args, ": ");
    if (!ds4_buf_ok(&key)) args->oom = 1;
    ds4_buf_free(&key);
}

/* Appends a leaf value: a decoded string, or minified JSON. A JSON-typed
 * value that does not parse (`string="false"` over `{notjson`, `007`, an
 * empty value) becomes a JSON string of its raw text: the arguments stay
 * one valid object, so no client gets invalid JSON and no other argument is
 * lost (the spec leaves it raw, which broke the whole object when sent).
 * The streaming parser emits this same function's output for such values. */
static void put_leaf(ds4_buf *args, const char *v, size_t n, int is_string) {
    if (is_string) {
        ds4_buf dec = DS4_BUF_INIT;
        entity_decode(&dec, v, n, 0);
        ds4_dsml_json_quote(args, dec.data ? dec.data : "", dec.len);
        if (!ds4_buf_ok(&dec)) args->oom = 1;
        ds4_buf_free(&dec);
    } else {
        const size_t mark = args->len;
        if (json_minify(args, v, n)) {
            ds4_dsml_json_quote(args, v, n);
        } else if (args->len > mark && args->data[mark] == '"') {
            /* a string: re-escaped as the client form re-escapes member
             * strings (B.6), so that the stream sends the final bytes */
            ds4_buf dec = DS4_BUF_INIT;
            json_unquote(&dec, args->data + mark, args->len - mark);
            ds4_buf_truncate(args, mark);
            ds4_dsml_json_quote(args, dec.data ? dec.data : "", dec.len);
            if (!ds4_buf_ok(&dec)) args->oom = 1;
            ds4_buf_free(&dec);
        }
    }
}

/* Whether the entity-decoded name t[0..n) is in keys (names, each followed
 * by a NUL); adds it when not. 1 seen, 0 added, -1 no memory. */
static int key_seen(ds4_buf *keys, const char *t, size_t n) {
    ds4_buf k = DS4_BUF_INIT;
    entity_decode(&k, t, n, 0);
    ds4_buf_putc(&k, '\0');
    if (!ds4_buf_ok(&k)) {
        ds4_buf_free(&k);
        return -1;
    }
    for (size_t i = 0; i < keys->len;) {
        const size_t l = strlen(keys->data + i) + 1;
        if (l == k.len && !memcmp(keys->data + i, k.data, l)) {
            ds4_buf_free(&k);
            return 1;
        }
        i += l;
    }
    ds4_buf_append(keys, k.data, k.len);
    ds4_buf_free(&k);
    return ds4_buf_ok(keys) ? 0 : -1;
}

/* One parameter at t[i] (its head already matched); appends the member to
 * args; *i ends after it. -1 on a violation. */
static int parse_param(const char *t, size_t n, size_t *i, const family *f, ds4_buf *args) {
    tag_info ti;
    if (read_tag(t, n, *i, f->param, &ti)) return -1;
    put_key(args, t, &ti);
    size_t k = ti.end;
    if (!ti.has_str) {
        size_t w = k;
        skip_ws(t, n, &w);
        if (has_prefix(t + w, n - w, f->param)) { /* nested object (recovery) */
            ds4_buf_putc(args, '{');
            int m = 0;
            while (has_prefix(t + w, n - w, f->param)) {
                tag_info li;
                if (read_tag(t, n, w, f->param, &li)) return -1;
                size_t e = find(t, n, li.end, f->param_end);
                if (e == SIZE_MAX) return -1;
                if (m++) ds4_buf_puts(args, ", ");
                put_key(args, t, &li);
                put_leaf(args, t + li.end, e - li.end, !li.has_str || li.str_true);
                w = e + strlen(f->param_end);
                skip_ws(t, n, &w);
            }
            ds4_buf_putc(args, '}');
            if (has_prefix(t + w, n - w, f->param_end)) w += strlen(f->param_end);
            *i = w;
            return 0;
        }
    }
    size_t e = find(t, n, k, f->param_end);
    if (e == SIZE_MAX) return -1;
    put_leaf(args, t + k, e - k, !ti.has_str || ti.str_true);
    *i = e + strlen(f->param_end);
    return 0;
}

/* C.6 step 4 from just after the open tag. On success *end is the index
 * after the closing tag. -1 on a violation, DS4_E_NOMEM on no memory. */
static int parse_block(const char *t, size_t n, size_t i, const family *f, call_vec *cv,
                       size_t *end) {
    for (;;) {
        skip_ws(t, n, &i);
        if (has_prefix(t + i, n - i, f->close)) {
            *end = i + strlen(f->close);
            return 0;
        }
        if (!has_prefix(t + i, n - i, f->invoke)) return -1;
        tag_info ti;
        if (read_tag(t, n, i, f->invoke, &ti)) return -1;
        ds4_buf name = DS4_BUF_INIT, args = DS4_BUF_INIT;
        entity_decode(&name, t + ti.name, ti.name_len, 0);
        ds4_buf_putc(&args, '{');
        i = ti.end;
        int m = 0, bad = 0;
        ds4_buf keys = DS4_BUF_INIT;
        for (;;) {
            skip_ws(t, n, &i);
            if (has_prefix(t + i, n - i, f->invoke_end)) {
                i += strlen(f->invoke_end);
                break;
            }
            if (!has_prefix(t + i, n - i, f->param)) {
                bad = 1;
                break;
            }
            /* a repeated name: parsed (the grammar holds) and dropped, the first one wins (as the stream) */
            tag_info pt;
            const int seen = read_tag(t, n, i, f->param, &pt) ? 0 : key_seen(&keys, t + pt.name, pt.name_len);
            if (seen < 0) args.oom = 1;
            ds4_buf drop = DS4_BUF_INIT;
            if (!seen && m++) ds4_buf_puts(&args, ", ");
            const int pr = parse_param(t, n, &i, f, seen ? &drop : &args);
            ds4_buf_free(&drop);
            if (pr) {
                bad = 1;
                break;
            }
        }
        ds4_buf_free(&keys);
        ds4_buf_putc(&args, '}');
        int oom = !ds4_buf_ok(&name) || !ds4_buf_ok(&args);
        if (bad || oom) {
            ds4_buf_free(&name);
            ds4_buf_free(&args);
            return oom ? DS4_E_NOMEM : -1;
        }
        if (calls_push(cv, &name, &args)) {
            ds4_buf_free(&name);
            ds4_buf_free(&args);
            return DS4_E_NOMEM;
        }
    }
}

void ds4_dsml_result_free(ds4_dsml_result *r) {
    if (!r) return;
    free(r->reasoning);
    free(r->content);
    calls_free(r->calls, r->n_calls);
    free(r->raw_dsml);
    memset(r, 0, sizeof *r);
}

/* ds4_dsml_parse is defined with the streaming parser below: there is one
 * parser, and the final result of a turn is what its projection emitted. */

/* --------------------------------------------------- sampling tracker */

enum { TR_OUT = 0, TR_BLOCK, TR_VAL_STR, TR_VAL_JSON, TR_VAL_JSON_STR };

void ds4_dsml_tracker_init(ds4_dsml_tracker *t) {
    memset(t, 0, sizeof *t);
    t->family = -1;
}

static int win_ends(const ds4_dsml_tracker *t, const char *lit) {
    size_t k = strlen(lit);
    return t->win_len >= k && memcmp(t->win + t->win_len - k, lit, k) == 0;
}

static void tracker_byte(ds4_dsml_tracker *t, char c) {
    if (t->win_len == sizeof t->win) {
        memmove(t->win, t->win + 1, sizeof t->win - 1);
        t->win_len--;
    }
    t->win[t->win_len++] = c;
    const family *f = t->family >= 0 ? &FAMS[t->family] : NULL;
    switch (t->state) {
    case TR_OUT:
        for (int j = 0; j < 3; j++)
            if (win_ends(t, FAMS[j].open)) {
                t->state = TR_BLOCK;
                t->family = j;
                t->in_tag = 0;
            }
        break;
    case TR_BLOCK:
        if (!t->in_tag) {
            if (c == '<') {
                t->in_tag = 1;
                t->tag_len = 0;
            } else {
                break;
            }
        }
        if (t->tag_len < sizeof t->tag) t->tag[t->tag_len] = c;
        t->tag_len++;
        if (c != '>') break;
        t->in_tag = 0;
        {
            size_t n = t->tag_len < sizeof t->tag ? t->tag_len : sizeof t->tag;
            if (has_prefix(t->tag, n, f->param)) {
                size_t vs, vn;
                int str = tag_attr(t->tag, 0, n, "string=\"", &vs, &vn) && vn == 4 &&
                          memcmp(t->tag + vs, "true", 4) == 0;
                t->state = str ? TR_VAL_STR : TR_VAL_JSON;
                t->json_escape = 0;
            } else if (has_prefix(t->tag, n, f->close)) {
                t->state = TR_OUT;
                t->family = -1;
            }
        }
        break;
    case TR_VAL_STR:
    case TR_VAL_JSON:
    case TR_VAL_JSON_STR:
        if (win_ends(t, f->param_end)) {
            t->state = TR_BLOCK;
            break;
        }
        if (t->state == TR_VAL_JSON) {
            if (c == '"') t->state = TR_VAL_JSON_STR;
        } else if (t->state == TR_VAL_JSON_STR) {
            if (t->json_escape) t->json_escape = 0;
            else if (c == '\\') t->json_escape = 1;
            else if (c == '"') t->state = TR_VAL_JSON;
        }
        break;
    }
}

void ds4_dsml_tracker_feed(ds4_dsml_tracker *t, const char *bytes, size_t n) {
    for (size_t i = 0; i < n; i++) tracker_byte(t, bytes[i]);
}

ds4_dsml_class ds4_dsml_tracker_class(const ds4_dsml_tracker *t) {
    switch (t->state) {
    case TR_OUT: return DS4_DSML_OUTSIDE;
    case TR_BLOCK: return DS4_DSML_STRUCTURAL;
    default: break;
    }
    /* Inside a value: a started closing tag ("</" at least) is decoded
     * greedily (C.9). */
    if (partial_suffix(t->win, t->win_len, FAMS[t->family].param_end) >= 2)
        return DS4_DSML_STRUCTURAL;
    if (t->state == TR_VAL_STR) return DS4_DSML_STRING_BODY;
    if (t->state == TR_VAL_JSON) return DS4_DSML_JSON_STRUCTURAL;
    return DS4_DSML_JSON_STRING;
}

long ds4_dsml_open_prefix(const char *text, size_t n) {
    size_t q = n;
    /* a '<' that begins a proper prefix of an opening tag, ending the text */
    for (size_t back = 1; back <= 40 && back <= n; back++) {
        size_t at = n - back;
        if (text[at] != '<') continue;
        for (int j = 0; j < 3; j++) {
            size_t ol = strlen(FAMS[j].open);
            if (back < ol && !memcmp(text + at, FAMS[j].open, back)) q = at;
        }
        if (q != n) break;
    }
    size_t p = q;
    while (p > 0 && (text[p - 1] == ' ' || text[p - 1] == '\n' || text[p - 1] == '\t' || text[p - 1] == '\r')) p--;
    return p < n ? (long)p : -1;
}

int ds4_dsml_class_is_greedy(ds4_dsml_class c) {
    return c == DS4_DSML_STRUCTURAL || c == DS4_DSML_JSON_STRUCTURAL;
}

/* ---------------------------------------------------- streaming parser */

enum {
    ST_THINK_START = 0, /* thinking: an optional literal <think> may come */
    ST_REASONING,       /* before the first </think> */
    ST_CONTENT,         /* answer text; DSML start tags recognized with tools */
    ST_BLOCK,           /* inside the block, between invokes */
    ST_CALL,            /* inside an invoke, between parameters */
    ST_PARAM_UNTYPED,   /* after a parameter tag without string= */
    ST_VALUE_STR,       /* string value: decoded and JSON-escaped */
    ST_VALUE_JSON,      /* JSON value: minified on the fly */
    ST_NESTED,          /* inside a nested parameter object (C.6 recovery form) */
    ST_AFTER,           /* block closed: the rest is ignored */
    ST_FAILED,          /* projection failed: hold everything */
};

struct ds4_dsml_stream {
    ds4_dsml_stream_opts o;
    char id_prefix[32];
    ds4_buf text;        /* every byte fed */
    size_t pos;          /* bytes before pos are emitted or consumed */
    int st;
    const family *f;     /* family of the open block */
    size_t flush_from;   /* content resumes here if the block fails */
    size_t scan;         /* ST_CONTENT / ST_PARAM_UNTYPED: bytes before scan are examined */
    size_t ws_start;     /* ST_CONTENT: start of the trailing whitespace run of [pos, scan), or SIZE_MAX */
    int n_calls, cap_calls;
    char **ids, **names; /* (n_calls) announced calls */
    int n_params;        /* parameters emitted in the current call */
    ds4_buf keys;        /* the current call's parameter names, each decoded + NUL (a repeat is muted) */
    int mute;            /* a repeated parameter: its argument deltas are not sent (the first one wins) */
    int nested, n_nested; /* inside a nested object; its members emitted */
    size_t block_at;     /* offset of the block's open tag (block_started) */
    ds4_buf acc_r, acc_c; /* every REASONING / CONTENT byte emitted: the result */
    ds4_buf ev;          /* scratch for event text */
    ds4_dsml_tracker trk;
    uint64_t id_rng;
    int finished, block_started, block_ended;
    int drop_open;       /* finish drops a block still open (ds4_dsml_stream_drop_open_block) */
    int assign_ids;      /* finish gives the calls ids (not for ds4_dsml_parse) */
    /* event sink for the current feed/finish */
    ds4_dsml_event_fn fn;
    void *ud;
    int cancelled;
};

ds4_dsml_stream *ds4_dsml_stream_new(const ds4_dsml_stream_opts *opts) {
    ds4_dsml_stream *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    if (opts) s->o = *opts;
    const char *pre = s->o.id_prefix ? s->o.id_prefix : "call_";
    snprintf(s->id_prefix, sizeof s->id_prefix, "%s", pre);
    s->o.id_prefix = s->id_prefix;
    s->st = s->o.thinking ? ST_THINK_START : ST_CONTENT;
    s->id_rng = s->o.id_seed;
    s->ws_start = SIZE_MAX;
    s->assign_ids = 1;
    ds4_dsml_tracker_init(&s->trk);
    return s;
}

void ds4_dsml_stream_free(ds4_dsml_stream *s) {
    if (!s) return;
    for (int i = 0; i < s->n_calls; i++) {
        free(s->ids[i]);
        free(s->names[i]);
    }
    free(s->ids);
    free(s->names);
    ds4_buf_free(&s->text);
    ds4_buf_free(&s->ev);
    ds4_buf_free(&s->keys);
    ds4_buf_free(&s->acc_r);
    ds4_buf_free(&s->acc_c);
    free(s);
}

static void emit(ds4_dsml_stream *s, ds4_dsml_event_type type, int index, const char *text,
                 size_t len) {
    if ((type == DS4_DSML_EV_REASONING || type == DS4_DSML_EV_CONTENT ||
         type == DS4_DSML_EV_CALL_ARGS) && len == 0)
        return;
    if (type == DS4_DSML_EV_CALL_ARGS && s->mute) return;
    /* the turn's result is exactly what was emitted, with or without a sink */
    if (type == DS4_DSML_EV_REASONING) ds4_buf_append(&s->acc_r, text, len);
    if (type == DS4_DSML_EV_CONTENT) ds4_buf_append(&s->acc_c, text, len);
    if (s->cancelled || !s->fn) return;
    ds4_dsml_event ev = {type, index, NULL, NULL, text, len};
    if (type == DS4_DSML_EV_CALL_START) {
        ev.id = s->ids[index];
        ev.name = s->names[index];
    }
    if (s->fn(s->ud, &ev)) s->cancelled = 1;
}

static void emit_args(ds4_dsml_stream *s, const char *lit) {
    emit(s, DS4_DSML_EV_CALL_ARGS, s->n_calls - 1, lit, strlen(lit));
}

/* Emits `,"key":` (the comma unless *count was 0; the key entity-decoded
 * and JSON-quoted) and an opening quote for a string value; counts the
 * member. Nonzero when out of memory. */
static int emit_key(ds4_dsml_stream *s, int *count, const char *name, size_t name_len, int quote) {
    ds4_buf_reset(&s->ev);
    if ((*count)++) ds4_buf_putc(&s->ev, ',');
    ds4_buf key = DS4_BUF_INIT;
    entity_decode(&key, name, name_len, 0);
    ds4_dsml_json_quote(&s->ev, key.data ? key.data : "", key.len);
    int oom = !ds4_buf_ok(&key);
    ds4_buf_free(&key);
    ds4_buf_putc(&s->ev, ':');
    if (quote) ds4_buf_putc(&s->ev, '"');
    if (oom || !ds4_buf_ok(&s->ev)) return 1;
    emit(s, DS4_DSML_EV_CALL_ARGS, s->n_calls - 1, s->ev.data, s->ev.len);
    return 0;
}

static void fail(ds4_dsml_stream *s, const char *msg) {
    emit(s, DS4_DSML_EV_ERROR, s->n_calls - 1, msg, strlen(msg));
    s->st = ST_FAILED;
}

/* Next call id: getrandom, or a deterministic xorshift stream for tests;
 * never equal to an id already announced in this turn. */
static void next_id(ds4_dsml_stream *s, char *out, size_t cap) {
    for (;;) {
        uint8_t r[16];
        if (s->id_rng) {
            for (int i = 0; i < 16; i++) {
                uint64_t x = s->id_rng;
                x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
                s->id_rng = x;
                r[i] = (uint8_t)((x * 0x2545F4914F6CDD1Dull) >> 56);
            }
        } else if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) {
            for (int i = 0; i < 16; i++) r[i] = (uint8_t)(rand() >> 3);
        }
        hex_id(out, cap, s->id_prefix, r);
        int dup = 0;
        for (int i = 0; i < s->n_calls; i++) dup |= strcmp(s->ids[i], out) == 0;
        if (!dup) return;
    }
}

static int start_call(ds4_dsml_stream *s, const char *t, const tag_info *ti) {
    if (s->n_calls == s->cap_calls) {
        int cap = s->cap_calls ? 2 * s->cap_calls : 4;
        char **a = realloc(s->ids, (size_t)cap * sizeof *a);
        if (!a) return DS4_E_NOMEM;
        s->ids = a;
        char **b = realloc(s->names, (size_t)cap * sizeof *b);
        if (!b) return DS4_E_NOMEM;
        s->names = b;
        s->cap_calls = cap;
    }
    char id[80];
    next_id(s, id, sizeof id);
    ds4_buf name = DS4_BUF_INIT;
    entity_decode(&name, t + ti->name, ti->name_len, 0);
    char *nm = ds4_buf_detach(&name, NULL);
    char *idc = strdup(id);
    if (!nm || !idc) {
        free(nm);
        free(idc);
        return DS4_E_NOMEM;
    }
    s->ids[s->n_calls] = idc;
    s->names[s->n_calls] = nm;
    s->n_calls++;
    s->n_params = 0;
    ds4_buf_reset(&s->keys);
    s->mute = 0;
    emit(s, DS4_DSML_EV_CALL_START, s->n_calls - 1, NULL, 0);
    emit_args(s, "{");
    return 0;
}

/* Emits a text delta of kind `type` from rem[0..n), holding a trailing
 * partial UTF-8 sequence unless final. Returns bytes emitted. */
static size_t emit_text(ds4_dsml_stream *s, int type, const char *rem, size_t n, int final) {
    size_t k = final ? n : utf8_complete(rem, n);
    emit(s, type, 0, rem, k);
    return k;
}

/* A tag is complete when its '>' shows within its first TAG_MAX bytes:
 * returns 0 (complete), 1 (wait for more bytes) or -1 (too long: the
 * projection stops; the final parse still decides). Bounding the wait keeps
 * the rescans linear, and depends only on the bytes, not on the chunking. */
#define TAG_MAX 4096
static int tag_wait(const char *rem, size_t rn) {
    size_t lim = rn < TAG_MAX ? rn : TAG_MAX;
    if (memchr(rem, '>', lim)) return 0;
    return rn >= TAG_MAX ? -1 : 1;
}

/* One step of the state machine. Returns 1 if it made progress, 0 if it
 * needs more bytes, negative on no memory. */
static int step(ds4_dsml_stream *s, int final) {
    const char *t = s->text.data ? s->text.data : "";
    size_t n = s->text.len;
    const char *rem = t + s->pos;
    size_t rn = n - s->pos;
    switch (s->st) {
    case ST_THINK_START:
        if (!final && is_partial(rem, rn, DS4_THINK_OPEN)) return 0;
        if (has_prefix(rem, rn, DS4_THINK_OPEN)) s->pos += strlen(DS4_THINK_OPEN);
        s->st = ST_REASONING;
        return 1;
    case ST_REASONING: {
        size_t k = find(rem, rn, 0, DS4_THINK_CLOSE);
        if (k != SIZE_MAX) {
            emit(s, DS4_DSML_EV_REASONING, 0, rem, k);
            s->pos += k + strlen(DS4_THINK_CLOSE);
            s->st = ST_CONTENT;
            s->scan = s->pos;
            return 1;
        }
        size_t hold = final ? 0 : partial_suffix(rem, rn, DS4_THINK_CLOSE);
        s->pos += emit_text(s, DS4_DSML_EV_REASONING, rem, rn - hold, final);
        return 0;
    }
    case ST_CONTENT: {
        if (!s->o.tools) {
            s->pos += emit_text(s, DS4_DSML_EV_CONTENT, rem, rn, final);
            return 0;
        }
        /* Work is linear in the input: a start tag can only begin at or
         * after `scan` (earlier bytes were not a partial tag when seen),
         * and the trailing whitespace run is tracked incrementally. */
        size_t from = s->scan > s->pos ? s->scan : s->pos;
        size_t best = SIZE_MAX;
        int fam = -1;
        for (int j = 0; j < 3; j++) {
            size_t k = find(t, n, from, FAMS[j].open);
            if (k < best) best = k, fam = j;
        }
        if (fam >= 0) {
            size_t ce = best;
            while (ce > s->pos && is_ws((unsigned char)t[ce - 1])) ce--;
            emit(s, DS4_DSML_EV_CONTENT, 0, rem, ce - s->pos);
            s->flush_from = ce;
            s->block_at = best;
            s->f = &FAMS[fam];
            s->pos = best + strlen(s->f->open);
            s->st = ST_BLOCK;
            s->block_started = 1;
            emit(s, DS4_DSML_EV_BLOCK_START, 0, NULL, 0);
            return 1;
        }
        /* hold a possible start tag and the whitespace before it */
        size_t hold = n;
        for (size_t j = n - from > 24 ? n - 24 : from; j < n; j++) {
            if (t[j] != '<') continue;
            int part = 0;
            for (int q = 0; q < 3; q++) part |= is_partial(t + j, n - j, FAMS[q].open);
            if (part) {
                hold = j;
                break;
            }
        }
        for (size_t i = from; i < hold; i++) {
            if (!is_ws((unsigned char)t[i])) s->ws_start = SIZE_MAX;
            else if (s->ws_start == SIZE_MAX || s->ws_start < s->pos) s->ws_start = i;
        }
        s->scan = hold;
        size_t ce = s->ws_start != SIZE_MAX && s->ws_start >= s->pos ? s->ws_start : hold;
        if (final) ce = n;
        s->pos += emit_text(s, DS4_DSML_EV_CONTENT, rem, ce - s->pos, final);
        return 0;
    }
    case ST_BLOCK:
    case ST_CALL: {
        size_t w = 0;
        while (w < rn && is_ws((unsigned char)rem[w])) w++;
        s->pos += w;
        rem += w, rn -= w;
        if (rn == 0) return 0;
        const family *f = s->f;
        if (s->st == ST_BLOCK) {
            if (has_prefix(rem, rn, f->close)) {
                s->pos += strlen(f->close);
                s->st = ST_AFTER;
                s->block_ended = 1;
                emit(s, DS4_DSML_EV_BLOCK_END, 0, NULL, 0);
                return 1;
            }
            if (has_prefix(rem, rn, f->invoke)) {
                tag_info ti;
                int w = tag_wait(rem, rn);
                if (w) return w > 0 ? 0 : (fail(s, "tool call tag too long"), 1);
                if (read_tag(rem, rn, 0, f->invoke, &ti)) {
                    fail(s, "tool call without a name");
                    return 1;
                }
                if (start_call(s, rem, &ti)) return DS4_E_NOMEM;
                s->pos += ti.end;
                s->st = ST_CALL;
                return 1;
            }
            if (is_partial(rem, rn, f->close) || is_partial(rem, rn, f->invoke)) return 0;
            fail(s, "expected an invoke tag or the end of the tool_calls block");
            return 1;
        }
        s->mute = 0; /* between parameters: a repeated one has ended */
        if (has_prefix(rem, rn, f->invoke_end)) {
            emit_args(s, "}");
            emit(s, DS4_DSML_EV_CALL_END, s->n_calls - 1, NULL, 0);
            s->pos += strlen(f->invoke_end);
            s->st = ST_BLOCK;
            return 1;
        }
        if (has_prefix(rem, rn, f->param)) {
            tag_info ti;
            int w = tag_wait(rem, rn);
            if (w) return w > 0 ? 0 : (fail(s, "parameter tag too long"), 1);
            if (read_tag(rem, rn, 0, f->param, &ti)) {
                fail(s, "parameter without a name");
                return 1;
            }
            /* a name this call already has: its value is consumed and not sent (parse_block drops it
             * too), so the arguments are one JSON object without a repeated member on every API */
            int seen = key_seen(&s->keys, rem + ti.name, ti.name_len);
            if (seen < 0) return DS4_E_NOMEM;
            s->mute = seen;
            if (!seen && emit_key(s, &s->n_params, rem + ti.name, ti.name_len, ti.str_true)) return DS4_E_NOMEM;
            s->pos += ti.end;
            s->scan = s->pos;
            s->st = ti.str_true ? ST_VALUE_STR : ti.has_str ? ST_VALUE_JSON : ST_PARAM_UNTYPED;
            return 1;
        }
        if (is_partial(rem, rn, f->invoke_end) || is_partial(rem, rn, f->param)) return 0;
        fail(s, "expected a parameter tag or the end of the invoke");
        return 1;
    }
    case ST_PARAM_UNTYPED: {
        /* The final parser reads a nested object when another parameter tag
         * follows, else a string: decide once the first non-space shows. */
        size_t w = s->scan > s->pos ? s->scan - s->pos : 0;
        while (w < rn && is_ws((unsigned char)rem[w])) w++;
        s->scan = s->pos + w;
        if (w == rn && !final) return 0;
        const family *f = s->f;
        if (w < rn && rem[w] == '<') {
            if (has_prefix(rem + w, rn - w, f->param)) { /* nested object */
                emit_args(s, "{");
                s->pos += w;
                s->nested = 1;
                s->n_nested = 0;
                s->st = ST_NESTED;
                return 1;
            }
            if (!final && (is_partial(rem + w, rn - w, f->param) ||
                           is_partial(rem + w, rn - w, f->param_end)))
                return 0;
        }
        emit_args(s, "\"");
        s->st = ST_VALUE_STR;
        return 1;
    }
    case ST_VALUE_JSON: {
        /* held until the parameter closes: whether the value parses as JSON
         * decides its form (put_leaf), which the reply must share */
        const family *f = s->f;
        size_t k = find(rem, rn, 0, f->param_end);
        if (k == SIZE_MAX && !final) return 0;
        const size_t lim = k == SIZE_MAX ? rn : k;
        ds4_buf_reset(&s->ev);
        put_leaf(&s->ev, rem, lim, 0);
        if (!ds4_buf_ok(&s->ev)) return DS4_E_NOMEM;
        emit(s, DS4_DSML_EV_CALL_ARGS, s->n_calls - 1, s->ev.data, s->ev.len);
        s->pos += lim;
        if (k == SIZE_MAX) return 0;
        s->pos += strlen(f->param_end);
        s->st = s->nested ? ST_NESTED : ST_CALL;
        return 1;
    }
    case ST_VALUE_STR: {
        const family *f = s->f;
        size_t k = find(rem, rn, 0, f->param_end);
        int closed = k != SIZE_MAX;
        size_t lim = closed ? k : rn - (final ? 0 : partial_suffix(rem, rn, f->param_end));
        if (!closed && !final) lim = utf8_complete(rem, lim);
        ds4_buf_reset(&s->ev);
        ds4_buf dec = DS4_BUF_INIT;
        const size_t used = entity_decode(&dec, rem, lim, !closed && !final);
        json_escape_body(&s->ev, dec.data ? dec.data : "", dec.len);
        if (!ds4_buf_ok(&dec)) s->ev.oom = 1;
        ds4_buf_free(&dec);
        if (!ds4_buf_ok(&s->ev)) return DS4_E_NOMEM;
        emit(s, DS4_DSML_EV_CALL_ARGS, s->n_calls - 1, s->ev.data, s->ev.len);
        s->pos += used;
        if (!closed || used < lim) return 0;
        emit_args(s, "\"");
        s->pos += strlen(f->param_end);
        s->st = s->nested ? ST_NESTED : ST_CALL;
        return 1;
    }
    case ST_NESTED: {
        /* Leaf parameters of a nested object, then an optional closing
         * parameter tag (the grammar of parse_param). */
        size_t w = 0;
        while (w < rn && is_ws((unsigned char)rem[w])) w++;
        s->pos += w;
        rem += w, rn -= w;
        if (rn == 0 && !final) return 0;
        const family *f = s->f;
        if (has_prefix(rem, rn, f->param)) {
            tag_info ti;
            int tw = tag_wait(rem, rn);
            if (tw) return tw > 0 ? 0 : (fail(s, "parameter tag too long"), 1);
            if (read_tag(rem, rn, 0, f->param, &ti)) {
                fail(s, "parameter without a name");
                return 1;
            }
            int str = !ti.has_str || ti.str_true;
            if (emit_key(s, &s->n_nested, rem + ti.name, ti.name_len, str)) return DS4_E_NOMEM;
            s->pos += ti.end;
            s->st = str ? ST_VALUE_STR : ST_VALUE_JSON;
            return 1;
        }
        if (!final && (is_partial(rem, rn, f->param) || is_partial(rem, rn, f->param_end)))
            return 0;
        emit_args(s, "}");
        s->nested = 0;
        if (has_prefix(rem, rn, f->param_end)) s->pos += strlen(f->param_end);
        s->st = ST_CALL;
        return 1;
    }
    case ST_AFTER:
        s->pos = n;
        return 0;
    default: /* ST_FAILED: everything is held for the finish */
        return 0;
    }
}

static int advance(ds4_dsml_stream *s, int final) {
    for (;;) {
        int r = step(s, final);
        if (r < 0) return r;
        if (s->cancelled) return DS4_E_CANCEL;
        if (r == 0) return 0;
    }
}

int ds4_dsml_stream_feed(ds4_dsml_stream *s, const char *bytes, size_t n,
                         ds4_dsml_event_fn fn, void *ud) {
    if (s->finished) return DS4_E_ARG;
    if (ds4_buf_append(&s->text, bytes, n)) return DS4_E_NOMEM;
    ds4_dsml_tracker_feed(&s->trk, bytes, n);
    s->fn = fn;
    s->ud = ud;
    int rc = advance(s, 0);
    s->fn = NULL;
    return rc;
}

/* The repair suffix for the current state (C.7 opt-in): only when every
 * value is closed and nothing partial is pending. */
static const char *repair_needed(const ds4_dsml_stream *s, int *in_call) {
    if (s->pos != s->text.len) return NULL;
    if (s->st == ST_CALL) {
        *in_call = 1;
        return s->f->close;
    }
    if (s->st == ST_BLOCK && s->n_calls > 0) {
        *in_call = 0;
        return s->f->close;
    }
    return NULL;
}

/* The final result of the turn (C.6 as this engine defines it, see
 * docs/server.md): reasoning and content are the bytes the projection
 * emitted; the calls are the grammar parse of the block the projection
 * found, when it closed it. A block that failed or stayed open has been
 * flushed as content already: parse_failed, no calls. */
static int stream_result(ds4_dsml_stream *s, const ds4_buf *suffix, ds4_dsml_result *out) {
    if (!ds4_buf_ok(&s->acc_r) || !ds4_buf_ok(&s->acc_c)) return DS4_E_NOMEM;
    if (s->acc_r.len) {
        out->reasoning = ds4_buf_detach(&s->acc_r, &out->reasoning_len);
        if (!out->reasoning) return DS4_E_NOMEM;
    }
    out->content = ds4_buf_detach(&s->acc_c, &out->content_len);
    if (!out->content) return DS4_E_NOMEM;
    out->block_seen = s->block_started;
    if (!s->block_started) return 0;
    if (s->st != ST_AFTER) {
        out->parse_failed = 1;
        return 0;
    }
    ds4_buf all = DS4_BUF_INIT;
    ds4_buf_append(&all, s->text.data ? s->text.data : "", s->text.len);
    ds4_buf_append(&all, suffix->data ? suffix->data : "", suffix->len);
    if (!ds4_buf_ok(&all)) {
        ds4_buf_free(&all);
        return DS4_E_NOMEM;
    }
    call_vec cv = {0};
    size_t end = 0;
    int rc = parse_block(all.data, all.len, s->block_at + strlen(s->f->open), s->f, &cv, &end);
    if (rc == 0) {
        /* the raw block starts where the content ends: the whitespace held
         * back before the tag (a blank line, the C.6 needle, or any other:
         * "\n", "  \n\n\n") is the block's, so content + block re-renders
         * the sampled bytes (with only "\n\n" kept, "Sure.\n<tag>" came back
         * as "Sure.<tag>" and the turn's KV was not reused) */
        size_t bs = s->block_at;
        int ws = s->flush_from <= bs;
        for (size_t i = s->flush_from; ws && i < bs; i++)
            ws = all.data[i] == ' ' || all.data[i] == '\t' || all.data[i] == '\n' || all.data[i] == '\r';
        if (ws) bs = s->flush_from;
        else if (bs - s->flush_from >= 2 && all.data[bs - 1] == '\n' && all.data[bs - 2] == '\n') bs -= 2;
        out->calls = cv.v;
        out->n_calls = cv.n;
        ds4_buf raw = DS4_BUF_INIT;
        ds4_buf_append(&raw, all.data + bs, end - bs);
        out->raw_dsml = ds4_buf_detach(&raw, &out->raw_dsml_len);
        if (!out->raw_dsml) rc = DS4_E_NOMEM;
    } else {
        /* cannot happen (the projection closed the block with the same
         * grammar); keep the text rather than lose it */
        calls_free(cv.v, cv.n);
        if (rc != DS4_E_NOMEM) {
            out->parse_failed = 1;
            ds4_buf t = DS4_BUF_INIT;
            ds4_buf_append(&t, out->content, out->content_len);
            ds4_buf_append(&t, all.data + s->flush_from, s->text.len - s->flush_from);
            free(out->content);
            out->content = ds4_buf_detach(&t, &out->content_len);
            rc = out->content ? 0 : DS4_E_NOMEM;
        }
    }
    ds4_buf_free(&all);
    return rc;
}

int ds4_dsml_stream_finish(ds4_dsml_stream *s, ds4_dsml_event_fn fn, void *ud,
                           ds4_dsml_result *out, ds4_err *err) {
    if (out) memset(out, 0, sizeof *out);
    if (s->finished) return ds4_err_set(err, DS4_E_ARG, "dsml: stream already finished");
    s->finished = 1;
    s->fn = fn;
    s->ud = ud;
    int dropped = 0;
    if (s->drop_open && s->o.tools && s->st == ST_CONTENT && s->text.len > s->pos) {
        /* cut while the opening tag was being written (held, not emitted):
         * that tag and the whitespace before it are dropped too (a lone '<'
         * stays unless a blank line precedes it: it may be text) */
        long p = ds4_dsml_open_prefix(s->text.data, s->text.len);
        if (p >= (long)s->pos) {
            const char *lt = memchr(s->text.data + p, '<', s->text.len - (size_t)p);
            /* at least 2 bytes of the tag, or a lone '<' after a blank line (the block's own opening) */
            if (lt && (s->text.len - (size_t)(lt - s->text.data) >= 2 ||
                       memmem(s->text.data + p, (size_t)(lt - (s->text.data + p)), "\n\n", 2))) {
                s->text.len = (size_t)p;
                dropped = 1;
            }
        }
    }
    int rc = advance(s, 1);
    ds4_buf suffix = DS4_BUF_INIT;
    if (!rc && s->st >= ST_BLOCK && s->st <= ST_NESTED) {
        int in_call = 0;
        if (s->o.repair && repair_needed(s, &in_call)) {
            if (in_call) {
                emit_args(s, "}");
                emit(s, DS4_DSML_EV_CALL_END, s->n_calls - 1, NULL, 0);
                ds4_buf_puts(&suffix, s->f->invoke_end);
                ds4_buf_putc(&suffix, '\n');
            }
            ds4_buf_puts(&suffix, s->f->close);
            s->block_ended = 1;
            s->st = ST_AFTER;
            emit(s, DS4_DSML_EV_BLOCK_END, 0, NULL, 0);
        } else if (s->drop_open) {
            /* the turn was cut inside the block: its bytes are not content */
            s->st = ST_FAILED;
            s->pos = s->text.len;
            s->flush_from = s->text.len;
            dropped = 1;
        } else {
            fail(s, "unterminated tool call");
        }
    }
    if (!rc && s->st == ST_FAILED && !dropped) {
        emit(s, DS4_DSML_EV_CONTENT, 0, s->text.data + s->flush_from,
             s->text.len - s->flush_from);
        s->pos = s->text.len;
    }
    if (!rc && s->cancelled) rc = DS4_E_CANCEL;
    s->fn = NULL;
    if (!rc && out) rc = stream_result(s, &suffix, out);
    if (!rc && out && dropped) out->parse_failed = 0, out->block_dropped = 1;
    for (int i = 0; !rc && out && s->assign_ids && i < out->n_calls; i++) {
        char id[80];
        if (i < s->n_calls) snprintf(id, sizeof id, "%s", s->ids[i]);
        else next_id(s, id, sizeof id);
        out->calls[i].id = strdup(id);
        if (!out->calls[i].id) rc = DS4_E_NOMEM;
    }
    if (!ds4_buf_ok(&suffix) && !rc) rc = DS4_E_NOMEM;
    ds4_buf_free(&suffix);
    if (rc == DS4_E_NOMEM) {
        if (out) ds4_dsml_result_free(out);
        return ds4_err_set(err, rc, "dsml: no memory finishing the stream");
    }
    if (rc == DS4_E_CANCEL) return ds4_err_set(err, rc, "dsml: cancelled by the event sink");
    return rc;
}

int ds4_dsml_parse(const char *text, size_t len, int thinking, ds4_dsml_result *out,
                   ds4_err *err) {
    memset(out, 0, sizeof *out);
    ds4_dsml_stream_opts o = {0};
    o.thinking = thinking;
    o.tools = 1;
    o.id_seed = 1; /* ids are not needed: no getrandom */
    ds4_dsml_stream *s = ds4_dsml_stream_new(&o);
    if (!s) return ds4_err_set(err, DS4_E_NOMEM, "dsml: no memory parsing %zu bytes", len);
    s->assign_ids = 0;
    int rc = ds4_dsml_stream_feed(s, text, len, NULL, NULL);
    if (!rc) rc = ds4_dsml_stream_finish(s, NULL, NULL, out, err);
    else ds4_err_set(err, rc, "dsml: no memory parsing %zu bytes", len);
    ds4_dsml_stream_free(s);
    return rc;
}

int ds4_dsml_repair_suffix(const char *text, size_t len, int thinking, ds4_buf *suffix) {
    ds4_dsml_stream_opts o = {0};
    o.thinking = thinking;
    o.tools = 1;
    o.id_seed = 1;
    ds4_dsml_stream *s = ds4_dsml_stream_new(&o);
    if (!s) return DS4_E_NOMEM;
    int rc = ds4_buf_append(&s->text, text, len);
    if (!rc) rc = advance(s, 1);
    int in_call = 0;
    if (!rc && s->st >= ST_BLOCK && s->st <= ST_NESTED && repair_needed(s, &in_call)) {
        if (in_call) {
            ds4_buf_puts(suffix, s->f->invoke_end);
            ds4_buf_putc(suffix, '\n');
        }
        ds4_buf_puts(suffix, s->f->close);
        rc = ds4_buf_ok(suffix) ? 1 : DS4_E_NOMEM;
    }
    ds4_dsml_stream_free(s);
    return rc;
}

ds4_dsml_class ds4_dsml_stream_class(const ds4_dsml_stream *s) {
    return ds4_dsml_tracker_class(&s->trk);
}

int ds4_dsml_stream_block_started(const ds4_dsml_stream *s) { return s->block_started; }
void ds4_dsml_stream_drop_open_block(ds4_dsml_stream *s) { s->drop_open = 1; }
int ds4_dsml_stream_block_ended(const ds4_dsml_stream *s) { return s->block_ended; }

int ds4_dsml_stream_block_failed(const ds4_dsml_stream *s) { return s->block_started && s->st == ST_FAILED; }

const char *ds4_dsml_stream_text(const ds4_dsml_stream *s, size_t *len) {
    if (len) *len = s->text.len;
    return s->text.data ? s->text.data : "";
}

/* ---------------------------------------------------- exact replay map */

/* A block is shared by every id of its turn (reference counted). Entries
 * live in a chained hash table by id and in an LRU list (head = most
 * recent). Accounting follows C.8: id bytes + 1 + entry overhead per id,
 * block bytes + 1 + block overhead per distinct block. */
typedef struct rblock {
    size_t refs;
    int n_calls; /* calls in the block (parsed at its first lookup), -1 until then */
    size_t len;
    char data[]; /* (len + 1), NUL-terminated */
} rblock;

typedef struct rentry {
    char *id;
    rblock *blk;
    int from_disk;
    struct rentry *hnext;       /* hash chain */
    struct rentry *prev, *next; /* LRU list */
} rentry;

struct ds4_dsml_replay {
    size_t max_ids, max_bytes;
    size_t n, bytes;
    rentry **tab; /* (tab_cap) chains, tab_cap a power of two */
    size_t tab_cap;
    rentry *head, *tail;
};

#define REPLAY_DEFAULT_IDS 100000
#define REPLAY_DEFAULT_BYTES ((size_t)512 << 20)
#define REPLAY_MAX_ID 256
#define REPLAY_MAX_BLOCK ((size_t)512 << 20)

static uint64_t hash_id(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

ds4_dsml_replay *ds4_dsml_replay_new(size_t max_ids, size_t max_bytes) {
    ds4_dsml_replay *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->max_ids = max_ids ? max_ids : REPLAY_DEFAULT_IDS;
    m->max_bytes = max_bytes ? max_bytes : REPLAY_DEFAULT_BYTES;
    m->tab_cap = 64;
    m->tab = calloc(m->tab_cap, sizeof *m->tab);
    if (!m->tab) {
        free(m);
        return NULL;
    }
    return m;
}

static void block_unref(ds4_dsml_replay *m, rblock *b) {
    if (--b->refs == 0) {
        m->bytes -= b->len + 1 + sizeof(rblock);
        free(b);
    }
}

static rentry **slot_of(const ds4_dsml_replay *m, const char *id) {
    rentry **p = &m->tab[hash_id(id) & (m->tab_cap - 1)];
    while (*p && strcmp((*p)->id, id) != 0) p = &(*p)->hnext;
    return p;
}

static void lru_unlink(ds4_dsml_replay *m, rentry *e) {
    if (e->prev) e->prev->next = e->next;
    else m->head = e->next;
    if (e->next) e->next->prev = e->prev;
    else m->tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_push_front(ds4_dsml_replay *m, rentry *e) {
    e->prev = NULL;
    e->next = m->head;
    if (m->head) m->head->prev = e;
    m->head = e;
    if (!m->tail) m->tail = e;
}

static void entry_remove(ds4_dsml_replay *m, rentry *e) {
    rentry **p = slot_of(m, e->id);
    *p = e->hnext;
    lru_unlink(m, e);
    m->bytes -= strlen(e->id) + 1 + sizeof(rentry);
    m->n--;
    block_unref(m, e->blk);
    free(e->id);
    free(e);
}

void ds4_dsml_replay_free(ds4_dsml_replay *m) {
    if (!m) return;
    while (m->head) entry_remove(m, m->head);
    free(m->tab);
    free(m);
}

static void grow_table(ds4_dsml_replay *m) {
    size_t cap = m->tab_cap * 2;
    rentry **tab = calloc(cap, sizeof *tab);
    if (!tab) return; /* chains just get longer */
    for (size_t i = 0; i < m->tab_cap; i++) {
        for (rentry *e = m->tab[i], *nx; e; e = nx) {
            nx = e->hnext;
            size_t h = hash_id(e->id) & (cap - 1);
            e->hnext = tab[h];
            tab[h] = e;
        }
    }
    free(m->tab);
    m->tab = tab;
    m->tab_cap = cap;
}

static void evict(ds4_dsml_replay *m) {
    while (m->tail && (m->n > m->max_ids || m->bytes > m->max_bytes)) entry_remove(m, m->tail);
}

/* Inserts ids[0..n) -> blk (which gains one reference per id). */
static int put_block(ds4_dsml_replay *m, const char *const *ids, int n, rblock *blk,
                     int from_disk) {
    for (int i = 0; i < n; i++) {
        rentry **p = slot_of(m, ids[i]);
        if (*p) entry_remove(m, *p);
        rentry *e = calloc(1, sizeof *e);
        char *id = e ? strdup(ids[i]) : NULL;
        if (!id) {
            free(e);
            return DS4_E_NOMEM;
        }
        e->id = id;
        e->blk = blk;
        e->from_disk = from_disk;
        blk->refs++;
        p = slot_of(m, ids[i]);
        *p = e;
        lru_push_front(m, e);
        m->n++;
        m->bytes += strlen(id) + 1 + sizeof(rentry);
        if (m->n > m->tab_cap) grow_table(m);
    }
    return 0;
}

static rblock *block_new(ds4_dsml_replay *m, const char *p, size_t len) {
    rblock *b = malloc(sizeof *b + len + 1);
    if (!b) return NULL;
    b->refs = 1; /* held by the caller until put_block is done */
    b->n_calls = -1;
    b->len = len;
    memcpy(b->data, p, len);
    b->data[len] = '\0';
    m->bytes += len + 1 + sizeof(rblock);
    return b;
}

static int check_id(const char *id) {
    size_t k = id ? strlen(id) : 0;
    return k >= 1 && k <= REPLAY_MAX_ID;
}

int ds4_dsml_replay_put(ds4_dsml_replay *m, const char *const *ids, int n_ids,
                        const char *block, size_t len, ds4_err *err) {
    if (len < 1 || len > REPLAY_MAX_BLOCK)
        return ds4_err_set(err, DS4_E_ARG, "tool memory: block of %zu bytes", len);
    for (int i = 0; i < n_ids; i++)
        if (!check_id(ids[i]))
            return ds4_err_set(err, DS4_E_ARG, "tool memory: id %d must be 1..256 bytes", i);
    rblock *b = block_new(m, block, len);
    if (!b) return ds4_err_set(err, DS4_E_NOMEM, "tool memory: no memory for %zu bytes", len);
    int rc = put_block(m, ids, n_ids, b, 0);
    block_unref(m, b);
    evict(m);
    if (rc) return ds4_err_set(err, rc, "tool memory: no memory");
    return 0;
}

const char *ds4_dsml_replay_get(ds4_dsml_replay *m, const char *id, size_t *len) {
    if (!id) return NULL;
    rentry *e = *slot_of(m, id);
    if (!e) return NULL;
    lru_unlink(m, e);
    lru_push_front(m, e);
    if (len) *len = e->blk->len;
    return e->blk->data;
}

const char *ds4_dsml_replay_lookup(ds4_dsml_replay *m, const char *const *ids, int n,
                                   size_t *len) {
    if (n <= 0) return NULL;
    const rblock *first = NULL;
    for (int i = 0; i < n; i++) {
        if (!ids[i]) return NULL;
        rentry *e = *slot_of(m, ids[i]);
        if (!e || (first && e->blk != first)) return NULL;
        first = e->blk;
        for (int k = 0; k < i; k++)
            if (!strcmp(ids[k], ids[i])) return NULL; /* an id twice: not the turn's set */
    }
    /* the message carries all of the block's calls: a turn's parallel calls
     * replayed one per message would each bring the whole block (every call
     * twice). Counted from the block itself, not its live ids (one may have
     * been evicted, or not loaded from disk) */
    rblock *fb = (rblock *)first;
    if (fb->n_calls < 0) {
        ds4_dsml_result r;
        fb->n_calls = ds4_dsml_parse(fb->data, fb->len, 0, &r, NULL) == 0 && !r.parse_failed ? r.n_calls : 0;
        ds4_dsml_result_free(&r);
    }
    if (fb->n_calls != n) return NULL;
    for (int i = 0; i < n; i++) ds4_dsml_replay_get(m, ids[i], NULL);
    if (len) *len = first->len;
    return first->data;
}

size_t ds4_dsml_replay_count(const ds4_dsml_replay *m) { return m->n; }
size_t ds4_dsml_replay_bytes(const ds4_dsml_replay *m) { return m->bytes; }

int ds4_dsml_replay_from_disk(const ds4_dsml_replay *m, const char *id) {
    if (!id) return -1;
    const rentry *e = *slot_of(m, id);
    return e ? e->from_disk : -1;
}

int ds4_dsml_replay_save(const ds4_dsml_replay *m, const char *key_text, size_t key_len,
                         ds4_buf *out) {
    size_t mark = out->len;
    ds4_buf_append(out, "KTM\x01", 4);
    size_t count_at = out->len;
    ds4_buf_put_u32le(out, 0);
    uint32_t count = 0;
    const rblock *last_in = NULL, *last_out = NULL; /* memmem results of the previous block */
    for (const rentry *e = m->head; e; e = e->next) {
        int in;
        if (e->blk == last_in) in = 1;
        else if (e->blk == last_out) in = 0;
        else {
            in = memmem(key_text, key_len, e->blk->data, e->blk->len) != NULL;
            if (in) last_in = e->blk;
            else last_out = e->blk;
        }
        if (!in) continue;
        size_t idl = strlen(e->id);
        ds4_buf_put_u32le(out, (uint32_t)idl);
        ds4_buf_put_u32le(out, (uint32_t)e->blk->len);
        ds4_buf_append(out, e->id, idl);
        ds4_buf_append(out, e->blk->data, e->blk->len);
        count++;
    }
    if (!ds4_buf_ok(out)) {
        ds4_buf_truncate(out, mark);
        return DS4_E_NOMEM;
    }
    for (int i = 0; i < 4; i++) out->data[count_at + i] = (char)(count >> (8 * i));
    return 0;
}

static uint32_t rd_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int ds4_dsml_replay_load(ds4_dsml_replay *m, const uint8_t *b, size_t n,
                         const char *const *only_ids, int n_only, size_t *consumed,
                         ds4_err *err) {
    if (consumed) *consumed = 0;
    if (n < 8 || memcmp(b, "KTM", 3) != 0)
        return ds4_err_set(err, DS4_E_FORMAT, "tool map: bad magic");
    if (b[3] != 1) return ds4_err_set(err, DS4_E_FORMAT, "tool map: version %u unsupported", b[3]);
    uint32_t count = rd_u32(b + 4);
    if ((uint64_t)count > 4 * (uint64_t)m->max_ids)
        return ds4_err_set(err, DS4_E_FORMAT, "tool map: %u entries exceed 4 x %zu", count,
                           m->max_ids);
    size_t off = 8;
    rblock *prev = NULL;
    int rc = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (n - off < 8) {
            rc = ds4_err_set(err, DS4_E_FORMAT, "tool map: entry %u truncated at %zu", i, off);
            break;
        }
        uint32_t idl = rd_u32(b + off), bl = rd_u32(b + off + 4);
        if (idl < 1 || idl > REPLAY_MAX_ID || bl < 1 || bl > REPLAY_MAX_BLOCK ||
            n - off - 8 < (size_t)idl + bl) {
            rc = ds4_err_set(err, DS4_E_FORMAT, "tool map: entry %u malformed at offset %zu", i,
                             off);
            break;
        }
        char id[REPLAY_MAX_ID + 1];
        memcpy(id, b + off + 8, idl);
        id[idl] = '\0';
        const char *blk = (const char *)b + off + 8 + idl;
        if (strlen(id) != idl) {
            rc = ds4_err_set(err, DS4_E_FORMAT, "tool map: entry %u id holds a NUL", i);
            break;
        }
        off += 8 + (size_t)idl + bl;
        int want = !only_ids;
        for (int j = 0; !want && j < n_only; j++) want = only_ids[j] && !strcmp(only_ids[j], id);
        if (!want) continue;
        rblock *use = prev && prev->len == bl && !memcmp(prev->data, blk, bl) ? prev : NULL;
        if (!use) {
            use = block_new(m, blk, bl);
            if (!use) {
                rc = ds4_err_set(err, DS4_E_NOMEM, "tool map: no memory");
                break;
            }
        } else {
            use->refs++;
        }
        const char *one[1] = {id};
        int r = put_block(m, one, 1, use, 1);
        /* keep `prev` alive across the loop: drop the old hold, keep this one */
        if (prev && prev != use) block_unref(m, prev);
        else if (prev == use) block_unref(m, use);
        prev = use;
        if (r) {
            rc = ds4_err_set(err, r, "tool map: no memory");
            break;
        }
    }
    if (prev) block_unref(m, prev);
    evict(m);
    if (consumed) *consumed = off;
    return rc;
}
