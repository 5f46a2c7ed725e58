/* test_dsml.c - DSML (docs/TEXT.md §C): canonical rendering, final parse, JSON
 * helpers, streaming parser (split invariance), tracker (C.9), repair,
 * exact-replay map and its trailer encoding.
 *
 * Expected texts are written by hand from the spec's rules; round trips
 * compare JSON semantically with jansson (an independent parser).
 */
#include "test.h"

#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>

#include "dsml.h"

#define M "｜DSML｜"

/* ------------------------------------------------------------ helpers */

static int json_same(const char *a, size_t an, const char *b, size_t bn) {
    json_t *x = json_loadb(a, an, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
    json_t *y = json_loadb(b, bn, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
    int eq = x && y && json_equal(x, y);
    json_decref(x);
    json_decref(y);
    return eq;
}

/* Event log with consecutive deltas of one (type, index) merged. */
typedef struct evlog {
    ds4_buf b;
    int last_type, last_index;
    int n_errors;
    char ids[8][64];
} evlog;

static int log_ev(void *ud, const ds4_dsml_event *ev) {
    evlog *l = ud;
    int delta = ev->type == DS4_DSML_EV_REASONING || ev->type == DS4_DSML_EV_CONTENT ||
                ev->type == DS4_DSML_EV_CALL_ARGS;
    if (!(delta && (int)ev->type == l->last_type && ev->index == l->last_index))
        ds4_buf_printf(&l->b, "\n%d/%d:", (int)ev->type, ev->index);
    if (ev->type == DS4_DSML_EV_CALL_START) {
        ds4_buf_printf(&l->b, "%s|%s", ev->name, ev->id);
        if (ev->index >= 0 && ev->index < 8) snprintf(l->ids[ev->index], 64, "%s", ev->id);
    }
    if (ev->type == DS4_DSML_EV_ERROR) l->n_errors++;
    if (ev->text) ds4_buf_append(&l->b, ev->text, ev->len);
    l->last_type = ev->type;
    l->last_index = ev->index;
    return 0;
}

/* Text of the merged delta of `type` for `index` (first occurrence). */
static const char *log_field(evlog *l, int type, int index, char *out, size_t cap) {
    char key[32];
    snprintf(key, sizeof key, "\n%d/%d:", type, index);
    const char *p = l->b.data ? strstr(l->b.data, key) : NULL;
    out[0] = '\0';
    if (!p) return NULL;
    p += strlen(key);
    const char *e = strchr(p, '\n');
    size_t n = e ? (size_t)(e - p) : strlen(p);
    if (n >= cap) n = cap - 1;
    memcpy(out, p, n);
    out[n] = '\0';
    return out;
}

/* Feeds text in pieces cut at cuts[0..n_cuts) (increasing). */
static void run_stream(const char *text, size_t len, const ds4_dsml_stream_opts *o,
                       const size_t *cuts, int n_cuts, evlog *l, ds4_dsml_result *res) {
    memset(l, 0, sizeof *l);
    l->last_type = -1;
    ds4_dsml_stream *s = ds4_dsml_stream_new(o);
    size_t at = 0;
    for (int i = 0; i <= n_cuts; i++) {
        size_t end = i < n_cuts ? cuts[i] : len;
        ds4_dsml_stream_feed(s, text + at, end - at, log_ev, l);
        at = end;
    }
    ds4_dsml_stream_finish(s, log_ev, l, res, NULL);
    ds4_dsml_stream_free(s);
}

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* Every split must give the log of the whole feed: all single cut points,
 * byte-by-byte, every pair of cuts when the text is short, random cuts. */
static int split_invariant(const char *text, size_t len, const ds4_dsml_stream_opts *o,
                           char *why, size_t why_cap) {
    evlog ref, got;
    run_stream(text, len, o, NULL, 0, &ref, NULL);
    size_t *cuts = malloc((len + 1) * sizeof *cuts);
    int bad = 0;
    for (size_t k = 0; k <= len && !bad; k++) {
        cuts[0] = k;
        run_stream(text, len, o, cuts, 1, &got, NULL);
        if (got.b.len != ref.b.len || memcmp(got.b.data, ref.b.data, ref.b.len)) {
            snprintf(why, why_cap, "split at %zu: got [%s] want [%s]", k, got.b.data, ref.b.data);
            bad = 1;
        }
        ds4_buf_free(&got.b);
    }
    for (size_t k = 0; k < len; k++) cuts[k] = k + 1;
    if (!bad && len) {
        run_stream(text, len, o, cuts, (int)len - 1, &got, NULL);
        if (got.b.len != ref.b.len || memcmp(got.b.data, ref.b.data, ref.b.len)) {
            snprintf(why, why_cap, "byte by byte: got [%s] want [%s]", got.b.data, ref.b.data);
            bad = 1;
        }
        ds4_buf_free(&got.b);
    }
    for (size_t a = 1; len <= 200 && a < len && !bad; a++) {
        for (size_t b = a + 1; b < len && !bad; b++) {
            cuts[0] = a, cuts[1] = b;
            run_stream(text, len, o, cuts, 2, &got, NULL);
            if (got.b.len != ref.b.len || memcmp(got.b.data, ref.b.data, ref.b.len)) {
                snprintf(why, why_cap, "cuts %zu,%zu differ", a, b);
                bad = 1;
            }
            ds4_buf_free(&got.b);
        }
    }
    for (int r = 0; r < 200 && !bad && len > 2; r++) {
        int n = 0;
        for (size_t k = 1; k < len; k++)
            if (rnd() % 7 == 0) cuts[n++] = k;
        run_stream(text, len, o, cuts, n, &got, NULL);
        if (got.b.len != ref.b.len || memcmp(got.b.data, ref.b.data, ref.b.len)) {
            snprintf(why, why_cap, "random split %d differs", r);
            bad = 1;
        }
        ds4_buf_free(&got.b);
    }
    free(cuts);
    ds4_buf_free(&ref.b);
    return !bad;
}

/* ---------------------------------------------------------- rendering */

static ds4_tool_call call(const char *name, const char *args) {
    ds4_tool_call c = {NULL, (char *)name, (char *)args, strlen(args)};
    return c;
}

DS4_TEST(dsml_render_canonical_exact_bytes) {
    ds4_tool_call c[2] = {
        call("a&b\"<>", "{\"command\":\"ls -la && echo <x> \\\"q\\\"\\n\", \"n\" : 3 ,"
                        "\"opt\":{ \"a\" : [1, 2.5e3, \"s p\"] },\"t\":true,\"z\":null}"),
        call("empty", " {} "),
    };
    ds4_buf o = DS4_BUF_INIT;
    CHECK_EQ_INT(ds4_dsml_render_calls(&o, c, 2), 0);
    CHECK_STR(o.data,
              "\n\n<" M "tool_calls>\n"
              "<" M "invoke name=\"a&amp;b&quot;&lt;&gt;\">\n"
              "<" M "parameter name=\"command\" string=\"true\">ls -la && echo <x> \"q\"\n</" M "parameter>\n"
              "<" M "parameter name=\"n\" string=\"false\">3</" M "parameter>\n"
              "<" M "parameter name=\"opt\" string=\"false\">{\"a\":[1,2.5e3,\"s p\"]}</" M "parameter>\n"
              "<" M "parameter name=\"t\" string=\"false\">true</" M "parameter>\n"
              "<" M "parameter name=\"z\" string=\"false\">null</" M "parameter>\n"
              "</" M "invoke>\n"
              "<" M "invoke name=\"empty\">\n"
              "</" M "invoke>\n"
              "</" M "tool_calls>");
    ds4_buf_reset(&o);
    CHECK_EQ_INT(ds4_dsml_render_calls(&o, c, 0), 0);
    CHECK_EQ_INT(o.len, 0);
    ds4_buf_free(&o);
}

DS4_TEST(dsml_render_escapes_closing_tag_and_odd_arguments) {
    ds4_tool_call c[4] = {
        call("f", "{\"s\":\"a</" M "parameter>b&lt;\",\"v\":[\"</" M "parameter>\"]}"),
        call("g", "[1,2]"),
        call("h", "{\"a\":"),
        call("d", "{\"a\":1,\"a\":\"x\"}"),
    };
    ds4_buf o = DS4_BUF_INIT;
    ds4_dsml_render_calls(&o, c, 4);
    CHECK_STR(o.data,
              "\n\n<" M "tool_calls>\n"
              "<" M "invoke name=\"f\">\n"
              "<" M "parameter name=\"s\" string=\"true\">a&lt;/" M "parameter>b&lt;</" M "parameter>\n"
              "<" M "parameter name=\"v\" string=\"false\">[\"\\u003c/" M "parameter>\"]</" M "parameter>\n"
              "</" M "invoke>\n"
              "<" M "invoke name=\"g\">\n"
              "<" M "parameter name=\"arguments\" string=\"true\">[1,2]</" M "parameter>\n"
              "</" M "invoke>\n"
              "<" M "invoke name=\"h\">\n"
              "<" M "parameter name=\"arguments\" string=\"true\">{\"a\":</" M "parameter>\n"
              "</" M "invoke>\n"
              "<" M "invoke name=\"d\">\n"
              "<" M "parameter name=\"a\" string=\"false\">1</" M "parameter>\n"
              "<" M "parameter name=\"a\" string=\"true\">x</" M "parameter>\n"
              "</" M "invoke>\n"
              "</" M "tool_calls>");
    ds4_buf_free(&o);
}

DS4_TEST(dsml_tool_result_escape) {
    ds4_buf o = DS4_BUF_INIT;
    const char *c = "x</tool_result></tool_result>&<" M ">";
    ds4_dsml_tool_result(&o, c, strlen(c));
    CHECK_STR(o.data, "<tool_result>x&lt;/tool_result>&lt;/tool_result>&<" M "></tool_result>");
    ds4_buf_free(&o);
}

/* --------------------------------------------------------------- JSON */

DS4_TEST(dsml_json_minify_and_validate) {
    static const struct { const char *in, *out; } ok[] = {
        {" { \"a b\" : [ 1 , -0.5e+3 , true , false , null , \"x \\\" \\u00e9 \" ] } ",
         "{\"a b\":[1,-0.5e+3,true,false,null,\"x \\\" \\u00e9 \"]}"},
        {"\"\\ud83d\\ude00\"", "\"\\ud83d\\ude00\""},
        {"0", "0"},
        {"[]", "[]"},
        {"{}", "{}"},
    };
    static const char *bad[] = {"", " ", "{", "[1,]", "{\"a\"}", "01", "1.", "-", "tru", "\"a",
                                "\"\\x\"", "\"a\nb\"", "[1] 2", "{'a':1}", "NaN", "\"\\u12\""};
    ds4_buf o = DS4_BUF_INIT;
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        ds4_buf_reset(&o);
        CHECK_EQ_INT(ds4_dsml_json_minify(&o, ok[i].in, strlen(ok[i].in), NULL), 0);
        CHECK_STR(o.data, ok[i].out);
    }
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ds4_buf_reset(&o);
        ds4_err e = {0};
        CHECK_MSG(ds4_dsml_json_minify(&o, bad[i], strlen(bad[i]), &e) == DS4_E_FORMAT,
                  "accepted invalid JSON [%s]", bad[i]);
        CHECK_EQ_INT(o.len, 0);
    }
    /* nesting limit: 256 ok, 300 refused */
    char deep[700];
    memset(deep, '[', 300);
    memset(deep + 300, ']', 300);
    CHECK_EQ_INT(ds4_dsml_json_minify(&o, deep, 600, NULL), DS4_E_FORMAT);
    ds4_buf_reset(&o);
    memmove(deep + 256, deep + 300, 256);
    CHECK_EQ_INT(ds4_dsml_json_minify(&o, deep, 512, NULL), 0);
    ds4_buf_free(&o);
}

DS4_TEST(dsml_args_compact) {
    static const struct { const char *in, *out; } v[] = {
        {"{\"command\": \"ls\", \"n\": 10}", "{\"command\":\"ls\",\"n\":10}"},
        {"{ \"s\" : \"a\\/b\\u00e9\\ud83d\\ude00\\t\\u0001\" }",
         "{\"s\":\"a/b\xc3\xa9\xf0\x9f\x98\x80\\t\\u0001\"}"},
        {"{\"o\": {\"x\": [1, 2]}}", "{\"o\":{\"x\":[1,2]}}"},
        {"{\"lone\":\"\\ud800x\"}", "{\"lone\":\"\xed\xa0\x80x\"}"},
        {"not json", "{}"},
        {"[1]", "{}"},
        {"{\"a\": 1,}", "{}"},
        {"{}", "{}"},
    };
    ds4_buf o = DS4_BUF_INIT;
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        ds4_buf_reset(&o);
        CHECK_EQ_INT(ds4_dsml_args_compact(&o, v[i].in, strlen(v[i].in)), 0);
        CHECK_STR(o.data, v[i].out);
    }
    ds4_buf_free(&o);
}

DS4_TEST(dsml_call_ids) {
    char a[64], b[64];
    CHECK_EQ_INT(ds4_dsml_call_id(a, sizeof a, "toolu_"), 0);
    CHECK_EQ_INT(ds4_dsml_call_id(b, sizeof b, NULL), 0);
    CHECK_EQ_INT(strlen(a), 6 + 32);
    CHECK(strncmp(a, "toolu_", 6) == 0 && strncmp(b, "call_", 5) == 0);
    for (int i = 6; i < 38; i++) CHECK(strchr("0123456789abcdef", a[i]) != NULL);
    CHECK_EQ_INT(ds4_dsml_call_id(a, 10, "call_"), DS4_E_ARG);
}

/* -------------------------------------------------------- final parse */

static const char TURN[] =
    "The user wants files.</think>Let me check. \n\n<" M "tool_calls>\n"
    "<" M "invoke name=\"bash\">\n"
    "<" M "parameter name=\"command\" string=\"true\">ls -la &amp;&amp; echo &lt;/x&gt; &foo;</" M "parameter>\n"
    "<" M "parameter name=\"n\" string=\"false\">{ \"a\" : [1, 2] }</" M "parameter>\n"
    "</" M "invoke>\n"
    "<" M "invoke name=\"read\">\n"
    "<" M "parameter name=\"path\" string=\"true\">a.txt</" M "parameter>\n"
    "</" M "invoke>\n"
    "</" M "tool_calls>trailing ignored";

DS4_TEST(dsml_parse_thinking_turn_with_two_calls) {
    ds4_dsml_result r;
    CHECK_EQ_INT(ds4_dsml_parse(TURN, strlen(TURN), 1, &r, NULL), 0);
    CHECK(r.block_seen && !r.parse_failed);
    CHECK_STR(r.reasoning, "The user wants files.");
    CHECK_STR(r.content, "Let me check.");
    CHECK_EQ_INT(r.n_calls, 2);
    CHECK_STR(r.calls[0].name, "bash");
    CHECK_STR(r.calls[0].arguments,
              "{\"command\": \"ls -la && echo </x> &foo;\", \"n\": {\"a\":[1,2]}}");
    CHECK_STR(r.calls[1].name, "read");
    CHECK_STR(r.calls[1].arguments, "{\"path\": \"a.txt\"}");
    /* the raw block starts where the trimmed content ends: content + block = the sampled bytes */
    const char *bs = strstr(TURN, " \n\n<" M "tool_calls>");
    const char *be = strstr(TURN, "trailing");
    CHECK_EQ_INT(r.raw_dsml_len, (size_t)(be - bs));
    CHECK(memcmp(r.raw_dsml, bs, r.raw_dsml_len) == 0);
    CHECK(r.calls[0].id == NULL);
    ds4_dsml_result_free(&r);
}

static void parse_s(const char *tx, int thinking, ds4_dsml_result *r) {
    ds4_dsml_parse(tx, strlen(tx), thinking, r, NULL);
}

DS4_TEST(dsml_parse_dsml_inside_reasoning_is_not_executable) {
    ds4_dsml_result r;
    const char *tx = "<think>x <" M "tool_calls>\n<" M "invoke name=\"f\">\n</" M "invoke>\n</" M
                    "tool_calls></think>answer";
    parse_s(tx, 1, &r);
    CHECK(!r.block_seen && r.n_calls == 0);
    CHECK_STR(r.content, "answer");
    CHECK(r.reasoning && strstr(r.reasoning, "tool_calls") != NULL);
    ds4_dsml_result_free(&r);
    /* thinking cut before </think> (a length cut): all of it is reasoning,
     * as the stream sent it (ds4 returned it as content: issue 12) */
    parse_s("still thinking <" M "tool_calls>", 1, &r);
    CHECK(!r.block_seen && r.n_calls == 0);
    CHECK_STR(r.reasoning, "still thinking <" M "tool_calls>");
    CHECK_STR(r.content, "");
    ds4_dsml_result_free(&r);
    /* non-thinking: no reasoning at all; think tags are text */
    parse_s("<think>r</think>c", 0, &r);
    CHECK(r.reasoning == NULL);
    CHECK_STR(r.content, "<think>r</think>c");
    ds4_dsml_result_free(&r);
}

DS4_TEST(dsml_parse_families_and_needle_order) {
    ds4_dsml_result r;
    parse_s("a\n<DSML｜tool_calls><DSML｜invoke name=\"f\"><DSML｜parameter name=\"k\">v"
            "</DSML｜parameter></DSML｜invoke></DSML｜tool_calls>", 0, &r);
    CHECK_EQ_INT(r.n_calls, 1);
    CHECK_STR(r.content, "a");
    CHECK_STR(r.calls[0].arguments, "{\"k\": \"v\"}");
    CHECK(r.raw_dsml[0] == '\n' && r.raw_dsml[1] == '<'); /* the newline the content lost is the block's */
    ds4_dsml_result_free(&r);
    parse_s("x\n\n<tool_calls>\n<invoke name=\"p\">\n<parameter name=\"n\" string=\"false\">5"
            "</parameter>\n</invoke>\n</tool_calls>", 0, &r);
    CHECK_EQ_INT(r.n_calls, 1);
    CHECK_STR(r.calls[0].arguments, "{\"n\": 5}");
    CHECK(strncmp(r.raw_dsml, "\n\n<tool_calls>", 14) == 0);
    ds4_dsml_result_free(&r);
    /* the earliest block wins, whatever its family (ds4's needle order took
     * a later one; generation stops at the first block's end anyway) */
    parse_s("<tool_calls><invoke name=\"a\"></invoke></tool_calls> then <" M "tool_calls><" M
            "invoke name=\"b\"></" M "invoke></" M "tool_calls>", 0, &r);
    CHECK_EQ_INT(r.n_calls, 1);
    CHECK_STR(r.calls[0].name, "a");
    ds4_dsml_result_free(&r);
    parse_s("A<" M "tool_calls></" M "tool_calls>B\n\n<" M "tool_calls><" M "invoke name=\"z\"></" M
            "invoke></" M "tool_calls>", 0, &r);
    CHECK_EQ_INT(r.n_calls, 0);
    CHECK(r.block_seen && !r.parse_failed);
    CHECK_STR(r.content, "A");
    ds4_dsml_result_free(&r);
}

DS4_TEST(dsml_parse_missing_string_attr_and_nested_objects) {
    ds4_dsml_result r;
    parse_s("<" M "tool_calls><" M "invoke name=\"f\">"
            "<" M "parameter name=\"plain\"> raw &quot;x&quot; </" M "parameter>"
            "<" M "parameter name=\"obj\">\n <" M "parameter name=\"a\" string=\"false\">1</" M "parameter>"
            "<" M "parameter name=\"b\">two</" M "parameter>\n</" M "parameter>"
            "<" M "parameter name=\"bad\" string=\"false\">{oops</" M "parameter>"
            "<" M "parameter name=\"num\" string=\"yes\"> 7 </" M "parameter>"
            "</" M "invoke></" M "tool_calls>", 0, &r);
    CHECK_EQ_INT(r.n_calls, 1);
    /* a JSON-typed value that does not parse becomes a string of its raw
     * text (the spec leaves it raw: invalid arguments that clients could not
     * parse, and the client form dropped every argument to {}) */
    CHECK_STR(r.calls[0].arguments,
              "{\"plain\": \" raw \\\"x\\\" \", \"obj\": {\"a\": 1, \"b\": \"two\"}, "
              "\"bad\": \"{oops\", \"num\": 7}");
    ds4_dsml_result_free(&r);
}

DS4_TEST(dsml_parse_failures_fall_back_to_raw_text) {
    static const char *bad[] = {
        "c <" M "tool_calls>",                                              /* end of text */
        "c <" M "tool_calls> junk </" M "tool_calls>",                      /* no invoke */
        "c <" M "tool_calls><" M "invoke>\n</" M "invoke></" M "tool_calls>", /* no name */
        "c <" M "tool_calls><" M "invoke name=\"f\"><" M "parameter string=\"true\">v</" M
        "parameter></" M "invoke></" M "tool_calls>",                       /* param no name */
        "c <" M "tool_calls><" M "invoke name=\"f\"><" M "parameter name=\"k\">v</" M "invoke></" M
        "tool_calls>",                                                      /* unclosed value */
        "c <" M "tool_calls><" M "invoke name=\"f\">text</" M "invoke></" M "tool_calls>",
        "c <" M "tool_calls><" M "invoke name=\"f\"",                       /* unclosed tag */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ds4_dsml_result r;
        CHECK_EQ_INT(ds4_dsml_parse(bad[i], strlen(bad[i]), 0, &r, NULL), 0);
        CHECK_MSG(r.block_seen && r.parse_failed && r.n_calls == 0 && !r.reasoning,
                  "case %zu", i);
        CHECK_STR(r.content, bad[i]);
        ds4_dsml_result_free(&r);
    }
}

/* ---------------------------------------------------------- round trip */

static void rand_string(ds4_buf *o) {
    static const char *pieces[] = {"a", "Z", " ", "\\\"", "\\\\", "\\n", "\\t", "\\u0001", "<",
                                   ">", "&", "&&", "\xc3\xa9", "\xf0\x9f\x98\x80", "\\u00e9",
                                   "\\ud83d\\ude00", "</" M "parameter>", "<" M "invoke", "/",
                                   "\\/", "\\u003c", "0", "\xe4\xb8\xad"};
    ds4_buf_putc(o, '"');
    int n = (int)(rnd() % 8);
    for (int i = 0; i < n; i++) ds4_buf_puts(o, pieces[rnd() % (sizeof pieces / sizeof pieces[0])]);
    ds4_buf_putc(o, '"');
}

static void ws(ds4_buf *o) {
    static const char *w[] = {"", "", " ", "\n  ", "\t"};
    ds4_buf_puts(o, w[rnd() % 5]);
}

static void rand_value(ds4_buf *o, int depth) {
    static const char *nums[] = {"0", "-1", "3.25", "1e10", "-0.5E-3", "123456789012345678"};
    int k = (int)(rnd() % (depth > 3 ? 5 : 7));
    switch (k) {
    case 0: rand_string(o); break;
    case 1: ds4_buf_puts(o, nums[rnd() % 6]); break;
    case 2: ds4_buf_puts(o, "true"); break;
    case 3: ds4_buf_puts(o, "null"); break;
    case 4: ds4_buf_puts(o, "false"); break;
    case 5: {
        ds4_buf_putc(o, '[');
        int n = (int)(rnd() % 4);
        for (int i = 0; i < n; i++) {
            if (i) ds4_buf_putc(o, ',');
            ws(o);
            rand_value(o, depth + 1);
            ws(o);
        }
        ds4_buf_putc(o, ']');
        break;
    }
    default: {
        ds4_buf_putc(o, '{');
        int n = (int)(rnd() % 4);
        for (int i = 0; i < n; i++) {
            if (i) ds4_buf_putc(o, ',');
            ws(o);
            ds4_buf_printf(o, "\"k%d\"", i); /* unique keys: jansson keeps one */
            ws(o);
            ds4_buf_putc(o, ':');
            ws(o);
            rand_value(o, depth + 1);
        }
        ds4_buf_putc(o, '}');
        break;
    }
    }
}

/* A random arguments object with unique keys (some with markup chars). */
static void rand_args(ds4_buf *o) {
    static const char *keys[] = {"command", "a&b", "q\"uote", "<k>", "&amp;", "\xc3\xa9t\xc3\xa9",
                                 "string=\"true", "x y"};
    ds4_buf_putc(o, '{');
    int n = (int)(rnd() % 5), used = 0;
    for (int i = 0; i < n; i++) {
        int k = (int)(rnd() % 8);
        if (used & (1 << k)) continue;
        if (used) ds4_buf_putc(o, ',');
        used |= 1 << k;
        ws(o);
        ds4_dsml_json_quote(o, keys[k], strlen(keys[k]));
        ws(o);
        ds4_buf_putc(o, ':');
        ws(o);
        rand_value(o, 0);
        ws(o);
    }
    ds4_buf_putc(o, '}');
}

DS4_TEST(dsml_round_trip_json_dsml_json_random) {
    rng_state = 12345;
    for (int it = 0; it < 400; it++) {
        ds4_buf args[3] = {DS4_BUF_INIT, DS4_BUF_INIT, DS4_BUF_INIT};
        ds4_tool_call c[3];
        int n = 1 + (int)(rnd() % 3);
        for (int i = 0; i < n; i++) {
            rand_args(&args[i]);
            CHECK_MSG(json_same(args[i].data, args[i].len, args[i].data, args[i].len),
                      "generator made invalid JSON: %s", args[i].data);
            c[i] = call(i == 1 ? "na&me\"<x>" : "f", args[i].data);
        }
        ds4_buf text = DS4_BUF_INIT;
        ds4_buf_puts(&text, "r</think>answer");
        ds4_dsml_render_calls(&text, c, n);
        ds4_dsml_result r;
        CHECK_EQ_INT(ds4_dsml_parse(text.data, text.len, 1, &r, NULL), 0);
        CHECK_MSG(r.n_calls == n && !r.parse_failed, "it %d: parse failed on %s", it, text.data);
        CHECK_STR(r.content, "answer");
        CHECK_STR(r.calls[n > 1 ? 1 : 0].name, n > 1 ? "na&me\"<x>" : "f");
        for (int i = 0; i < n; i++) {
            CHECK_MSG(json_same(r.calls[i].arguments, r.calls[i].arguments_len, args[i].data,
                                args[i].len),
                      "it %d call %d: %s != %s", it, i, r.calls[i].arguments, args[i].data);
            ds4_buf cmp = DS4_BUF_INIT;
            ds4_dsml_args_compact(&cmp, r.calls[i].arguments, r.calls[i].arguments_len);
            CHECK(json_same(cmp.data, cmp.len, args[i].data, args[i].len));
            ds4_buf_free(&cmp);
        }
        /* raw block re-renders byte-exactly from the parsed arguments? The
         * canonical form is a fixed point: render(parse(render(x))) == render(x) */
        ds4_buf again = DS4_BUF_INIT;
        ds4_dsml_render_calls(&again, r.calls, r.n_calls);
        CHECK_EQ_INT(again.len, r.raw_dsml_len);
        CHECK(memcmp(again.data, r.raw_dsml, again.len) == 0);
        ds4_buf_free(&again);

        /* the stream, on random chunks, gives the same arguments */
        ds4_dsml_stream_opts o = {.thinking = 1, .tools = 1, .id_seed = 7};
        size_t cuts[64];
        int nc = 0;
        for (size_t k = 1; k < text.len && nc < 64; k++)
            if (rnd() % 11 == 0) cuts[nc++] = k;
        evlog l;
        ds4_dsml_result sr;
        run_stream(text.data, text.len, &o, cuts, nc, &l, &sr);
        CHECK_EQ_INT(l.n_errors, 0);
        for (int i = 0; i < n; i++) {
            static char got[1 << 16];
            CHECK(log_field(&l, DS4_DSML_EV_CALL_ARGS, i, got, sizeof got) != NULL);
            CHECK_MSG(json_same(got, strlen(got), args[i].data, args[i].len),
                      "stream it %d call %d: %s != %s", it, i, got, args[i].data);
            CHECK_STR(sr.calls[i].id, l.ids[i]);
        }
        ds4_dsml_result_free(&sr);
        ds4_buf_free(&l.b);
        ds4_dsml_result_free(&r);
        ds4_buf_free(&text);
        for (int i = 0; i < 3; i++) ds4_buf_free(&args[i]);
    }
}

DS4_TEST(dsml_entity_text_in_strings_is_lossy_by_spec) {
    /* C.4 writes string values raw and C.6 decodes the five entities, so a
     * value that literally contains "&lt;" comes back as "<" */
    ds4_tool_call c = call("f", "{\"s\":\"a &lt; b\"}");
    ds4_buf tx = DS4_BUF_INIT;
    ds4_dsml_render_calls(&tx, &c, 1);
    ds4_dsml_result r;
    ds4_dsml_parse(tx.data, tx.len, 0, &r, NULL);
    CHECK_STR(r.calls[0].arguments, "{\"s\": \"a < b\"}");
    ds4_dsml_result_free(&r);
    ds4_buf_free(&tx);
}

/* ------------------------------------------------------------ stream */

DS4_TEST(dsml_stream_events_of_a_turn) {
    ds4_dsml_stream_opts o = {.thinking = 1, .tools = 1, .id_seed = 42};
    evlog l;
    ds4_dsml_result r;
    run_stream(TURN, strlen(TURN), &o, NULL, 0, &l, &r);
    char f[512];
    CHECK_STR(log_field(&l, DS4_DSML_EV_REASONING, 0, f, sizeof f), "The user wants files.");
    CHECK_STR(log_field(&l, DS4_DSML_EV_CONTENT, 0, f, sizeof f), "Let me check.");
    CHECK_STR(log_field(&l, DS4_DSML_EV_CALL_ARGS, 0, f, sizeof f),
              "{\"command\":\"ls -la && echo </x> &foo;\",\"n\":{\"a\":[1,2]}}");
    CHECK_STR(log_field(&l, DS4_DSML_EV_CALL_ARGS, 1, f, sizeof f), "{\"path\":\"a.txt\"}");
    CHECK(strstr(l.b.data, "bash|call_") != NULL && strstr(l.b.data, "read|call_") != NULL);
    /* event order */
    const char *order[] = {"\n1/0:", "\n2/0:", "\n3/0:", "\n4/0:", "\n5/0:", "\n6/0:",
                           "\n4/1:", "\n5/1:", "\n6/1:", "\n7/0:"};
    const char *p = l.b.data;
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        const char *q = strstr(p, order[i]);
        CHECK_MSG(q != NULL, "event %s missing or out of order in %s", order[i], l.b.data);
        p = q + 1;
    }
    CHECK_EQ_INT(l.n_errors, 0);
    /* final result: same as ds4_dsml_parse, ids from the stream */
    CHECK_EQ_INT(r.n_calls, 2);
    CHECK_STR(r.calls[0].id, l.ids[0]);
    CHECK_STR(r.calls[1].id, l.ids[1]);
    CHECK(strcmp(l.ids[0], l.ids[1]) != 0);
    CHECK_STR(r.content, "Let me check.");
    ds4_dsml_result_free(&r);
    ds4_buf_free(&l.b);
}

/* What a streaming client assembles from the events of a turn. */
typedef struct assembled {
    ds4_buf reasoning, content, args[4];
    int n_calls, n_errors;
} assembled;

static int assemble_ev(void *ud, const ds4_dsml_event *ev) {
    assembled *a = ud;
    if (ev->type == DS4_DSML_EV_REASONING) ds4_buf_append(&a->reasoning, ev->text, ev->len);
    if (ev->type == DS4_DSML_EV_CONTENT) ds4_buf_append(&a->content, ev->text, ev->len);
    if (ev->type == DS4_DSML_EV_CALL_START && ev->index + 1 > a->n_calls) a->n_calls = ev->index + 1;
    if (ev->type == DS4_DSML_EV_CALL_ARGS && ev->index < 4) ds4_buf_append(&a->args[ev->index], ev->text, ev->len);
    if (ev->type == DS4_DSML_EV_ERROR) a->n_errors++;
    return 0;
}

static int same_bytes(const char *a, size_t an, const char *b, size_t bn) {
    return an == bn && (an == 0 || memcmp(a, b, an) == 0);
}

/* One parser (issue 12): for every text and mode, the streamed events
 * assemble to exactly the final result, and ds4_dsml_parse (tools on)
 * gives that same result. A thinking turn cut before </think> is all
 * reasoning in both forms. */
DS4_TEST(dsml_stream_and_final_result_are_one_reply) {
    static const char *texts[] = {
        "cut inside the reasoning <" M "tool_calls> x",
        "<think>cut too",
        "r</think>answer\n\n<" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M
        "parameter name=\"a\" string=\"true\">x &amp; y</" M "parameter>\n</" M "invoke>\n</" M
        "tool_calls>after",
        "r</think>ok <" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M "parameter name=\"o\">\n<" M
        "parameter name=\"a\" string=\"false\">1</" M "parameter><" M "parameter name=\"b\">two</" M
        "parameter>\n</" M "parameter><" M "parameter name=\"n\" string=\"false\">[1, 2]</" M
        "parameter></" M "invoke></" M "tool_calls>",
        "r</think>open <" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M "parameter name=\"a\">v",
        "r</think>bad <" M "tool_calls>\n<" M "invoke>oops</" M "invoke></" M "tool_calls>",
        "<think>r</think>two </think> closes",
        "plain text, no markup \xe4\xb8\xad",
        /* repeated parameter names (a string, then JSON; a nested object): the first one wins in both */
        "r</think>dup <" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M "parameter name=\"a\" string=\"true\">1</" M
        "parameter>\n<" M "parameter name=\"b\" string=\"false\">2</" M "parameter>\n<" M
        "parameter name=\"a\" string=\"false\">{\"x\": 3}</" M "parameter>\n<" M "parameter name=\"o\">\n<" M
        "parameter name=\"k\">v</" M "parameter></" M "parameter>\n<" M "parameter name=\"o\">\n<" M
        "parameter name=\"k\">w</" M "parameter></" M "parameter>\n</" M "invoke></" M "tool_calls>",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        for (int mode = 0; mode < 4; mode++) {
            ds4_dsml_stream_opts o = {.thinking = mode & 1, .tools = (mode & 2) != 0, .id_seed = 9};
            assembled a = {0};
            ds4_dsml_result r;
            ds4_dsml_stream *st = ds4_dsml_stream_new(&o);
            size_t n = strlen(texts[i]);
            for (size_t k = 0; k < n; k += 3)
                ds4_dsml_stream_feed(st, texts[i] + k, n - k < 3 ? n - k : 3, assemble_ev, &a);
            CHECK_EQ_INT(ds4_dsml_stream_finish(st, assemble_ev, &a, &r, NULL), 0);
            ds4_dsml_stream_free(st);
            CHECK_MSG(same_bytes(a.reasoning.data, a.reasoning.len, r.reasoning, r.reasoning_len),
                      "text %zu mode %d: reasoning differs", i, mode);
            CHECK_MSG(same_bytes(a.content.data, a.content.len, r.content, r.content_len),
                      "text %zu mode %d: content [%s] vs [%s]", i, mode,
                      a.content.data ? a.content.data : "", r.content);
            if (a.n_errors == 0) {
                CHECK_EQ_INT(a.n_calls, r.n_calls);
                for (int c = 0; c < r.n_calls && c < 4; c++) {
                    ds4_buf want = DS4_BUF_INIT;
                    ds4_dsml_args_compact(&want, r.calls[c].arguments, r.calls[c].arguments_len);
                    CHECK_MSG(json_same(a.args[c].data, a.args[c].len, want.data, want.len),
                              "text %zu mode %d call %d: %s vs %s", i, mode, c, a.args[c].data, want.data);
                    ds4_buf_free(&want);
                }
            } else {
                CHECK_EQ_INT(r.n_calls, 0);
            }
            if ((mode & 1) && strstr(texts[i], "</think>") == NULL) {
                CHECK(r.content_len == 0 && r.reasoning_len > 0);
            }
            if (o.tools) { /* ds4_dsml_parse is the same parser */
                ds4_dsml_result p;
                CHECK_EQ_INT(ds4_dsml_parse(texts[i], n, o.thinking, &p, NULL), 0);
                CHECK(same_bytes(p.content, p.content_len, r.content, r.content_len));
                CHECK(same_bytes(p.reasoning, p.reasoning_len, r.reasoning, r.reasoning_len));
                CHECK_EQ_INT(p.n_calls, r.n_calls);
                CHECK(p.n_calls == 0 || p.calls[0].id == NULL);
                ds4_dsml_result_free(&p);
            }
            ds4_dsml_result_free(&r);
            ds4_buf_free(&a.reasoning);
            ds4_buf_free(&a.content);
            for (int c = 0; c < 4; c++) ds4_buf_free(&a.args[c]);
        }
    }
}

/* A parameter name repeated in one call: the arguments were {"a":"1","a":{...}} on chat and Responses (both
 * members) and the last one on Anthropic (its JSON parse); now the first one wins in the final result and in
 * the stream, one JSON object without repeated members. Names are compared entity-decoded. */
DS4_TEST(dsml_repeated_parameter_keeps_the_first) {
    const char *txt = "</think><" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M "parameter name=\"a\" string=\"true\">1</" M
                    "parameter>\n<" M "parameter name=\"a&amp;\" string=\"true\">x</" M "parameter>\n<" M
                    "parameter name=\"a\" string=\"true\">2</" M "parameter>\n<" M "parameter name=\"a&\" "
                    "string=\"true\">y</" M "parameter>\n</" M "invoke>\n</" M "tool_calls>";
    ds4_dsml_result r;
    CHECK_EQ_INT(ds4_dsml_parse(txt, strlen(txt), 1, &r, NULL), 0);
    CHECK_EQ_INT(r.n_calls, 1);
    if (r.n_calls == 1) {
        ds4_buf c = DS4_BUF_INIT;
        ds4_dsml_args_compact(&c, r.calls[0].arguments, r.calls[0].arguments_len);
        CHECK_MSG(c.data && !strcmp(c.data, "{\"a\":\"1\",\"a&\":\"x\"}"), "got %s", c.data ? c.data : "");
        ds4_buf_free(&c);
    }
    ds4_dsml_result_free(&r);
    char why[800];
    ds4_dsml_stream_opts o = {.thinking = 1, .tools = 1, .id_seed = 3};
    CHECK_MSG(split_invariant(txt, strlen(txt), &o, why, sizeof why), "%s", why);
}

DS4_TEST(dsml_stream_same_events_for_every_split) {
    static const char *texts[] = {
        "<think>abc</think>x \n <" M "tool_calls>\n<" M "invoke name=\"f&amp;\">\n<" M
        "parameter name=\"s\" string=\"true\">a&amp;b&lt;\xc3\xa9&am</" M "parameter>\n<" M
        "parameter name=\"j\" string=\"false\">[ \"x y\\\"\" , 1 ]</" M "parameter>\n</" M
        "invoke>\n</" M "tool_calls>",
        "r</think>\xe4\xb8\xad\xe6\x96\x87 <DSML｜tool_calls><DSML｜invoke name=\"g\"><DSML｜"
        "parameter name=\"u\"> v </DSML｜parameter></DSML｜invoke></DSML｜tool_calls>tail",
        "</think>a <tool_calls x<tool_calls>\n<invoke name=\"h\">\n</invoke>\n<invoke",
        "</think>ok <" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M "parameter name=\"o\">\n<" M
        "parameter name=\"a\">1</" M "parameter></" M "parameter></" M "invoke></" M "tool_calls>",
        "think </thin</think>c <" M "tool_c <" M "tool_calls> bad",
        "</think>trailing spaces stay at the end  \n",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        for (int mode = 0; mode < 3; mode++) {
            ds4_dsml_stream_opts o = {.thinking = mode != 1, .tools = mode != 2, .id_seed = 3};
            char why[800];
            CHECK_MSG(split_invariant(texts[i], strlen(texts[i]), &o, why, sizeof why),
                      "text %zu mode %d: %s", i, mode, why);
        }
    }
    /* a long text: random splits only */
    ds4_buf big = DS4_BUF_INIT;
    ds4_buf_puts(&big, "reasoning </thin k> more</think>Answer.\n\n<" M "tool_calls>\n");
    for (int i = 0; i < 20; i++) {
        ds4_buf_printf(&big, "<" M "invoke name=\"t%d\">\n<" M "parameter name=\"p\" string=\"true\">", i);
        for (int k = 0; k < 30; k++) ds4_buf_puts(&big, "line &amp; <b> \xc3\xa9 &lt;/" M "parameter>\n");
        ds4_buf_puts(&big, "</" M "parameter>\n<" M "parameter name=\"q\" string=\"false\">{\"a\": [1, \"</\"]}</" M
                           "parameter>\n</" M "invoke>\n");
    }
    ds4_buf_puts(&big, "</" M "tool_calls>");
    ds4_dsml_stream_opts o = {.thinking = 1, .tools = 1, .id_seed = 3};
    evlog ref, got;
    run_stream(big.data, big.len, &o, NULL, 0, &ref, NULL);
    CHECK_EQ_INT(ref.n_errors, 0);
    size_t cuts[4096];
    for (int r = 0; r < 50; r++) {
        int n = 0;
        for (size_t k = 1; k < big.len && n < 4096; k++)
            if (rnd() % (r % 5 * 20 + 2) == 0) cuts[n++] = k;
        run_stream(big.data, big.len, &o, cuts, n, &got, NULL);
        CHECK_MSG(got.b.len == ref.b.len && !memcmp(got.b.data, ref.b.data, ref.b.len),
                  "long text: random split %d differs", r);
        ds4_buf_free(&got.b);
    }
    ds4_buf_free(&ref.b);
    ds4_buf_free(&big);
}

#define FEED(str) ds4_dsml_stream_feed(s, str, strlen(str), log_ev, &l)
#define FEED_S(st, str) ds4_dsml_stream_feed(st, str, strlen(str), log_ev, &l)

DS4_TEST(dsml_stream_never_emits_partial_markers) {
    /* a chunk ending inside a marker must not leak it as text */
    ds4_dsml_stream_opts o = {.thinking = 1, .tools = 1, .id_seed = 1};
    ds4_dsml_stream *s = ds4_dsml_stream_new(&o);
    evlog l;
    memset(&l, 0, sizeof l);
    l.last_type = -1;
    FEED("<thi");
    CHECK_EQ_INT(l.b.len, 0);
    FEED("nk>abc</thi");
    CHECK_STR(l.b.data, "\n1/0:abc");
    FEED("nk>hi \xc3"); /* half a character held */
    CHECK_STR(l.b.data, "\n1/0:abc\n2/0:hi ");
    FEED("\xa9");
    CHECK_STR(l.b.data, "\n1/0:abc\n2/0:hi \xc3\xa9");
    FEED("\n"); /* trailing whitespace held */
    CHECK_STR(l.b.data, "\n1/0:abc\n2/0:hi \xc3\xa9");
    FEED("\n<" M "tool");
    CHECK_STR(l.b.data, "\n1/0:abc\n2/0:hi \xc3\xa9");
    CHECK(!ds4_dsml_stream_block_started(s));
    FEED("_calls>");
    CHECK(ds4_dsml_stream_block_started(s));
    CHECK_STR(l.b.data, "\n1/0:abc\n2/0:hi \xc3\xa9\n3/0:");
    FEED("<" M "invoke name=\"f\"");
    CHECK(strstr(l.b.data, "\n4/0") == NULL); /* header not complete yet */
    FEED("><" M "parameter name=\"k\" string=\"true\">a&am");
    CHECK(strstr(l.b.data, "\n4/0:f|call_") != NULL);
    CHECK(strstr(l.b.data, "\n5/0:{\"k\":\"a") != NULL);
    CHECK(strstr(l.b.data, "a&") == NULL); /* partial entity held */
    FEED("p;</" M "para");
    CHECK(strstr(l.b.data, "{\"k\":\"a&") != NULL && strstr(l.b.data, "</") == NULL);
    FEED("meter></" M "invoke></" M "tool_calls>ignored");
    CHECK(ds4_dsml_stream_block_ended(s));
    char f[256];
    CHECK_STR(log_field(&l, DS4_DSML_EV_CALL_ARGS, 0, f, sizeof f), "{\"k\":\"a&\"}");
    CHECK(strstr(l.b.data, "ignored") == NULL);
    ds4_dsml_result r;
    CHECK_EQ_INT(ds4_dsml_stream_finish(s, log_ev, &l, &r, NULL), 0);
    CHECK_EQ_INT(r.n_calls, 1);
    CHECK_STR(r.calls[0].arguments, "{\"k\": \"a&\"}");
    CHECK_EQ_INT(FEED("x"), DS4_E_ARG);
    ds4_dsml_result_free(&r);
    ds4_dsml_stream_free(s);
    ds4_buf_free(&l.b);
}

DS4_TEST(dsml_stream_without_tools_is_plain_text) {
    ds4_dsml_stream_opts o = {.thinking = 0, .tools = 0};
    const char *tx = "a \n\n<" M "tool_calls>\n</" M "tool_calls>  ";
    evlog l;
    run_stream(tx, strlen(tx), &o, NULL, 0, &l, NULL);
    char want[256];
    snprintf(want, sizeof want, "\n2/0:%s", tx);
    CHECK_STR(l.b.data, want);
    ds4_buf_free(&l.b);
}

DS4_TEST(dsml_stream_unterminated_and_failed_blocks) {
    const char *tx = "</think>Text.\n\n<" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M
                    "parameter name=\"a\" string=\"true\">x</" M "parameter>\n";
    ds4_dsml_stream_opts o = {.thinking = 1, .tools = 1, .id_seed = 5};
    evlog l;
    ds4_dsml_result r;
    run_stream(tx, strlen(tx), &o, NULL, 0, &l, &r);
    CHECK_EQ_INT(l.n_errors, 1);
    CHECK(strstr(l.b.data, "unterminated tool call") != NULL);
    /* the block text comes back as content, including the blank line */
    char f[512];
    /* content "Text." first, then after the error the held block text
     * (from the blank line on) as a second content delta */
    CHECK(strstr(l.b.data, "\n2/0:Text.\n") != NULL);
    const char *err_at = strstr(l.b.data, "\n8/");
    CHECK(err_at != NULL);
    CHECK(strstr(err_at, "\n2/0:\n\n<" M "tool_calls>\n<" M "invoke") != NULL);
    CHECK(r.parse_failed && r.n_calls == 0);
    ds4_dsml_result_free(&r);
    ds4_buf_free(&l.b);

    /* with repair: closed with the missing CALL_END and BLOCK_END */
    o.repair = 1;
    run_stream(tx, strlen(tx), &o, NULL, 0, &l, &r);
    CHECK_EQ_INT(l.n_errors, 0);
    CHECK(strstr(l.b.data, "\n6/0:") != NULL && strstr(l.b.data, "\n7/0:") != NULL);
    CHECK_STR(log_field(&l, DS4_DSML_EV_CALL_ARGS, 0, f, sizeof f), "{\"a\":\"x\"}");
    CHECK_EQ_INT(r.n_calls, 1);
    CHECK_STR(r.calls[0].arguments, "{\"a\": \"x\"}");
    CHECK_STR(r.calls[0].id, l.ids[0]);
    ds4_dsml_result_free(&r);
    ds4_buf_free(&l.b);

    /* a malformed block: one error, then the held text as content */
    const char *b = "</think>T <" M "tool_calls>\n<" M "invoke name=\"f\">garbage here";
    o.repair = 1;
    run_stream(b, strlen(b), &o, NULL, 0, &l, &r);
    CHECK_EQ_INT(l.n_errors, 1);
    CHECK(strstr(l.b.data, "garbage here") != NULL);
    CHECK(r.parse_failed);
    CHECK_STR(r.content, b + 8); /* after </think>: the reasoning stays reasoning */
    CHECK(r.reasoning == NULL);
    ds4_dsml_result_free(&r);
    ds4_buf_free(&l.b);
}

DS4_TEST(dsml_repair_only_when_unambiguous) {
    static const struct { const char *text; const char *suffix; } v[] = {
        {"<" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M "parameter name=\"a\" string=\"true\">x</" M
         "parameter>\n", "</" M "invoke>\n</" M "tool_calls>"},
        {"<" M "tool_calls>\n<" M "invoke name=\"f\">\n</" M "invoke>\n  ", "</" M "tool_calls>"},
        {"<tool_calls><invoke name=\"f\">", "</invoke>\n</tool_calls>"},
        {"<" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M "parameter name=\"a\" string=\"true\">x", NULL},
        {"<" M "tool_calls>\n<" M "invoke name=\"f\">\n<" M "parameter name=\"a\"", NULL},
        {"<" M "tool_calls>\n<" M "invoke name=\"f\">\n</" M "inv", NULL},
        {"<" M "tool_calls>\n", NULL},
        {"no block at all", NULL},
        {"<" M "tool_calls><" M "invoke name=\"f\"></" M "invoke></" M "tool_calls>", NULL},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        ds4_buf s = DS4_BUF_INIT;
        int rc = ds4_dsml_repair_suffix(v[i].text, strlen(v[i].text), 0, &s);
        CHECK_MSG(rc == (v[i].suffix ? 1 : 0), "case %zu: rc %d", i, rc);
        if (v[i].suffix) {
            CHECK_STR(s.data, v[i].suffix);
            ds4_buf tx = DS4_BUF_INIT;
            ds4_buf_puts(&tx, v[i].text);
            ds4_buf_append(&tx, s.data, s.len);
            ds4_dsml_result r;
            ds4_dsml_parse(tx.data, tx.len, 0, &r, NULL);
            CHECK_MSG(r.n_calls == 1 && !r.parse_failed, "case %zu: repaired text fails", i);
            ds4_dsml_result_free(&r);
            ds4_buf_free(&tx);
        }
        ds4_buf_free(&s);
    }
}

/* ------------------------------------------------------------ tracker */

DS4_TEST(dsml_tracker_classes) {
    static const struct { const char *piece; ds4_dsml_class want; } steps[] = {
        {"", DS4_DSML_OUTSIDE},
        {"<think>plan <" M "tool_cal", DS4_DSML_OUTSIDE},
        {"ls>", DS4_DSML_STRUCTURAL}, /* markers inside reasoning count (quirk) */
        {"\n<" M "invoke name=\"f\">\n<" M "parameter name=\"a\" string=\"true\">", DS4_DSML_STRING_BODY},
        {"text \"q\" {", DS4_DSML_STRING_BODY},
        {"<", DS4_DSML_STRING_BODY},
        {"/", DS4_DSML_STRUCTURAL},
        {"x", DS4_DSML_STRING_BODY},
        {"</" M "param", DS4_DSML_STRUCTURAL},
        {"eter>", DS4_DSML_STRUCTURAL},
        {"\n<" M "parameter name=\"j\" string=\"false\">", DS4_DSML_JSON_STRUCTURAL},
        {"{\"k", DS4_DSML_JSON_STRING},
        {"\\\"", DS4_DSML_JSON_STRING},
        {"\"", DS4_DSML_JSON_STRUCTURAL},
        {": [1, ", DS4_DSML_JSON_STRUCTURAL},
        {"\"a\\\\", DS4_DSML_JSON_STRING},
        {"\"", DS4_DSML_JSON_STRUCTURAL},
        {"]}</", DS4_DSML_STRUCTURAL},
        {M "parameter>\n<" M "parameter name=\"m\">", DS4_DSML_JSON_STRUCTURAL}, /* no string= */
        {"5</" M "parameter>\n</" M "invoke>", DS4_DSML_STRUCTURAL},
        {"\n</" M "tool_calls>", DS4_DSML_OUTSIDE},
        {" after <tool_calls>", DS4_DSML_STRUCTURAL},
        {"<parameter name=\"x\" string=\"true\">", DS4_DSML_STRING_BODY},
    };
    ds4_dsml_tracker tx;
    ds4_dsml_tracker_init(&tx);
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        ds4_dsml_tracker_feed(&tx, steps[i].piece, strlen(steps[i].piece));
        CHECK_MSG(ds4_dsml_tracker_class(&tx) == steps[i].want, "after step %zu (%s): class %d, want %d",
                  i, steps[i].piece, ds4_dsml_tracker_class(&tx), steps[i].want);
    }
    CHECK(ds4_dsml_class_is_greedy(DS4_DSML_STRUCTURAL));
    CHECK(ds4_dsml_class_is_greedy(DS4_DSML_JSON_STRUCTURAL));
    CHECK(!ds4_dsml_class_is_greedy(DS4_DSML_STRING_BODY));
    CHECK(!ds4_dsml_class_is_greedy(DS4_DSML_JSON_STRING));
    CHECK(!ds4_dsml_class_is_greedy(DS4_DSML_OUTSIDE));
}

DS4_TEST(dsml_tracker_is_split_invariant_and_in_stream) {
    ds4_dsml_tracker a, b;
    size_t n = strlen(TURN);
    ds4_dsml_tracker_init(&a);
    ds4_dsml_stream_opts o = {.thinking = 1, .tools = 1, .id_seed = 1};
    ds4_dsml_stream *s = ds4_dsml_stream_new(&o);
    for (size_t k = 0; k < n; k++) {
        ds4_dsml_tracker_init(&b);
        ds4_dsml_tracker_feed(&b, TURN, k + 1);
        ds4_dsml_tracker_feed(&a, TURN + k, 1);
        ds4_dsml_stream_feed(s, TURN + k, 1, NULL, NULL);
        CHECK_EQ_INT(ds4_dsml_tracker_class(&a), ds4_dsml_tracker_class(&b));
        CHECK_EQ_INT(ds4_dsml_stream_class(s), ds4_dsml_tracker_class(&b));
    }
    ds4_dsml_stream_free(s);
}

/* -------------------------------------------------------- replay map */

/* replayed blocks of two calls and of one (lookup counts a block's calls) */
#define RB_CALL(fn) "<" M "invoke name=\"" fn "\">\n<" M "parameter name=\"k\" string=\"true\">v</" M "parameter>\n</" M "invoke>\n"
#define RB_TWO "\n\n<" M "tool_calls>\n" RB_CALL("f") RB_CALL("g") "</" M "tool_calls>"
#define RB_ONE "\n\n<" M "tool_calls>\n" RB_CALL("h") "</" M "tool_calls>"

DS4_TEST(dsml_replay_put_get_lookup) {
    ds4_dsml_replay *m = ds4_dsml_replay_new(0, 0);
    const char *ab[] = {"call_a", "call_b"}, *c[] = {"call_c"};
    CHECK_EQ_INT(ds4_dsml_replay_put(m, ab, 2, RB_TWO, strlen(RB_TWO), NULL), 0);
    CHECK_EQ_INT(ds4_dsml_replay_put(m, c, 1, RB_ONE, strlen(RB_ONE), NULL), 0);
    CHECK_EQ_INT(ds4_dsml_replay_count(m), 3);
    size_t len = 0;
    const char *p = ds4_dsml_replay_lookup(m, ab, 2, &len);
    CHECK(p && len == strlen(RB_TWO) && memcmp(p, RB_TWO, len) == 0);
    const char *ac[] = {"call_a", "call_c"}, *ax[] = {"call_a", "nope"};
    CHECK(ds4_dsml_replay_lookup(m, ac, 2, &len) == NULL);
    CHECK(ds4_dsml_replay_lookup(m, ax, 2, &len) == NULL);
    CHECK(ds4_dsml_replay_lookup(m, ab, 0, &len) == NULL);
    /* part of a turn's calls (replayed one per message) or an id twice: not the block (each message
     * brought the whole block, so every call twice) */
    const char *a1[] = {"call_a"}, *aa[] = {"call_a", "call_a"};
    CHECK(ds4_dsml_replay_lookup(m, a1, 1, &len) == NULL);
    CHECK(ds4_dsml_replay_lookup(m, aa, 2, &len) == NULL);
    CHECK(ds4_dsml_replay_lookup(m, c, 1, &len) != NULL);
    /* one of a block's ids gone (evicted, re-put, not loaded): the other alone still is not the block */
    ds4_dsml_replay *m2 = ds4_dsml_replay_new(0, 0);
    const char *b1[] = {"call_b"};
    CHECK_EQ_INT(ds4_dsml_replay_put(m2, ab, 2, RB_TWO, strlen(RB_TWO), NULL), 0);
    CHECK_EQ_INT(ds4_dsml_replay_put(m2, a1, 1, RB_ONE, strlen(RB_ONE), NULL), 0);
    CHECK(ds4_dsml_replay_lookup(m2, b1, 1, &len) == NULL);
    CHECK(ds4_dsml_replay_lookup(m2, a1, 1, &len) != NULL);
    ds4_dsml_replay_free(m2);
    CHECK_STR(ds4_dsml_replay_get(m, "call_c", NULL), RB_ONE);
    CHECK_EQ_INT(ds4_dsml_replay_from_disk(m, "call_c"), 0);
    CHECK_EQ_INT(ds4_dsml_replay_from_disk(m, "zz"), -1);
    /* re-putting an id moves it */
    CHECK_EQ_INT(ds4_dsml_replay_put(m, c, 1, "BLOCK3", 6, NULL), 0);
    CHECK_EQ_INT(ds4_dsml_replay_count(m), 3);
    CHECK_STR(ds4_dsml_replay_get(m, "call_c", NULL), "BLOCK3");
    /* bad arguments */
    char longid[300];
    memset(longid, 'x', 299);
    longid[299] = '\0';
    const char *bad[] = {longid}, *empty[] = {""};
    ds4_err e = {0};
    CHECK_EQ_INT(ds4_dsml_replay_put(m, bad, 1, "B", 1, &e), DS4_E_ARG);
    CHECK_EQ_INT(ds4_dsml_replay_put(m, empty, 1, "B", 1, &e), DS4_E_ARG);
    CHECK_EQ_INT(ds4_dsml_replay_put(m, c, 1, "", 0, &e), DS4_E_ARG);
    ds4_dsml_replay_free(m);
}

DS4_TEST(dsml_replay_lru_eviction_by_ids_and_bytes) {
    ds4_dsml_replay *m = ds4_dsml_replay_new(3, 0);
    const char *a[] = {"a"}, *b[] = {"b"}, *c[] = {"c"}, *d[] = {"d"};
    ds4_dsml_replay_put(m, a, 1, "A", 1, NULL);
    ds4_dsml_replay_put(m, b, 1, "B", 1, NULL);
    ds4_dsml_replay_put(m, c, 1, "C", 1, NULL);
    CHECK(ds4_dsml_replay_get(m, "a", NULL) != NULL); /* refresh a: b is now oldest */
    ds4_dsml_replay_put(m, d, 1, "D", 1, NULL);
    CHECK_EQ_INT(ds4_dsml_replay_count(m), 3);
    CHECK(ds4_dsml_replay_get(m, "b", NULL) == NULL);
    CHECK(ds4_dsml_replay_get(m, "a", NULL) && ds4_dsml_replay_get(m, "c", NULL) &&
          ds4_dsml_replay_get(m, "d", NULL));
    ds4_dsml_replay_free(m);

    m = ds4_dsml_replay_new(0, 1500);
    char big[700];
    memset(big, 'x', sizeof big);
    ds4_dsml_replay_put(m, a, 1, big, sizeof big, NULL);
    size_t one = ds4_dsml_replay_bytes(m);
    CHECK(one > sizeof big + 2);
    ds4_dsml_replay_put(m, b, 1, big, sizeof big, NULL);
    CHECK_EQ_INT(ds4_dsml_replay_count(m), 1);
    CHECK(ds4_dsml_replay_get(m, "a", NULL) == NULL && ds4_dsml_replay_get(m, "b", NULL));
    CHECK_EQ_INT(ds4_dsml_replay_bytes(m), one);
    ds4_dsml_replay_free(m);
}

static uint32_t le32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

DS4_TEST(dsml_replay_save_load_round_trip_and_layout) {
    ds4_dsml_replay *m = ds4_dsml_replay_new(0, 0);
    const char *ab[] = {"call_a", "call_b"}, *c[] = {"call_c"};
    const char *b1 = RB_TWO, *b2 = "TWO-block";
    ds4_dsml_replay_put(m, ab, 2, b1, strlen(b1), NULL);
    ds4_dsml_replay_put(m, c, 1, b2, strlen(b2), NULL);
    ds4_buf key = DS4_BUF_INIT, tr = DS4_BUF_INIT;
    ds4_buf_puts(&key, "prompt text");
    ds4_buf_puts(&key, b1);
    ds4_buf_puts(&key, "<｜end▁of▁sentence｜>");
    CHECK_EQ_INT(ds4_dsml_replay_save(m, key.data, key.len, &tr), 0);
    /* layout: "KTM", 1, u32 count, then (u32 id len, u32 block len, id, block) */
    const uint8_t *p = (const uint8_t *)tr.data;
    CHECK(memcmp(p, "KTM\x01", 4) == 0);
    CHECK_EQ_INT(le32(p + 4), 2);
    size_t off = 8;
    for (int i = 0; i < 2; i++) {
        uint32_t il = le32(p + off), bl = le32(p + off + 4);
        CHECK_EQ_INT(il, 6);
        CHECK_EQ_INT(bl, strlen(b1));
        CHECK(memcmp(p + off + 8, "call_", 5) == 0);
        CHECK(memcmp(p + off + 8 + il, b1, bl) == 0);
        off += 8 + il + bl;
    }
    CHECK_EQ_INT(off, tr.len);

    ds4_dsml_replay *n = ds4_dsml_replay_new(0, 0);
    size_t used = 0;
    CHECK_EQ_INT(ds4_dsml_replay_load(n, p, tr.len, NULL, 0, &used, NULL), 0);
    CHECK_EQ_INT(used, tr.len);
    CHECK_EQ_INT(ds4_dsml_replay_count(n), 2);
    size_t len;
    const char *got = ds4_dsml_replay_lookup(n, ab, 2, &len); /* still one shared block */
    CHECK(got && len == strlen(b1) && memcmp(got, b1, len) == 0);
    CHECK_EQ_INT(ds4_dsml_replay_from_disk(n, "call_a"), 1);
    CHECK(ds4_dsml_replay_get(n, "call_c", NULL) == NULL);
    ds4_dsml_replay_free(n);

    /* only the ids a request mentions */
    n = ds4_dsml_replay_new(0, 0);
    const char *want[] = {"call_b", "other"};
    CHECK_EQ_INT(ds4_dsml_replay_load(n, p, tr.len, want, 2, NULL, NULL), 0);
    CHECK_EQ_INT(ds4_dsml_replay_count(n), 1);
    CHECK(ds4_dsml_replay_get(n, "call_b", NULL) != NULL);
    ds4_dsml_replay_free(n);

    /* empty map, or no block in the text: a trailer with 0 entries */
    ds4_buf_reset(&tr);
    ds4_dsml_replay_save(m, "x", 1, &tr);
    CHECK_EQ_INT(tr.len, 8);
    CHECK_EQ_INT(le32((const uint8_t *)tr.data + 4), 0);
    ds4_buf_free(&tr);
    ds4_buf_free(&key);
    ds4_dsml_replay_free(m);
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

DS4_TEST(dsml_replay_load_rejects_corrupted_bytes) {
    /* a hand-built trailer with 3 entries */
    uint8_t tx[128];
    memcpy(tx, "KTM\x01", 4);
    put_u32(tx + 4, 3);
    size_t off = 8;
    const char *ids[] = {"id1", "id2", "id3"};
    for (int i = 0; i < 3; i++) {
        put_u32(tx + off, 3);
        put_u32(tx + off + 4, 5);
        memcpy(tx + off + 8, ids[i], 3);
        memcpy(tx + off + 11, "BLOCK", 5);
        off += 16;
    }
    size_t full = off, used;
    ds4_err e = {0};
    ds4_dsml_replay *m = ds4_dsml_replay_new(0, 0);
    CHECK_EQ_INT(ds4_dsml_replay_load(m, tx, full, NULL, 0, &used, &e), 0);
    CHECK_EQ_INT(ds4_dsml_replay_count(m), 3);
    ds4_dsml_replay_free(m);

    uint8_t bad[128];
    /* bad magic / version / count too large: nothing loaded */
    struct { size_t at; uint8_t v; } flips[] = {{0, 'X'}, {3, 2}, {7, 0x7f}};
    for (int i = 0; i < 3; i++) {
        memcpy(bad, tx, full);
        bad[flips[i].at] = flips[i].v;
        m = ds4_dsml_replay_new(0, 0);
        CHECK_EQ_INT(ds4_dsml_replay_load(m, bad, full, NULL, 0, &used, &e), DS4_E_FORMAT);
        CHECK_EQ_INT(ds4_dsml_replay_count(m), 0);
        CHECK_EQ_INT(used, 0);
        ds4_dsml_replay_free(m);
    }
    m = ds4_dsml_replay_new(10, 0);
    memcpy(bad, tx, full);
    put_u32(bad + 4, 41); /* > 4 x 10 ids */
    CHECK_EQ_INT(ds4_dsml_replay_load(m, bad, full, NULL, 0, &used, &e), DS4_E_FORMAT);
    CHECK(strstr(e.msg, "exceed") != NULL);
    ds4_dsml_replay_free(m);
    /* malformed second entry: the first stays, the load stops there */
    struct { size_t at; uint32_t v; } ents[] = {{24, 0}, {24, 300}, {28, 0}, {28, 1000}};
    for (int i = 0; i < 4; i++) {
        memcpy(bad, tx, full);
        put_u32(bad + ents[i].at, ents[i].v);
        m = ds4_dsml_replay_new(0, 0);
        CHECK_EQ_INT(ds4_dsml_replay_load(m, bad, full, NULL, 0, &used, &e), DS4_E_FORMAT);
        CHECK_EQ_INT(ds4_dsml_replay_count(m), 1);
        CHECK_EQ_INT(used, 24);
        ds4_dsml_replay_free(m);
    }
    /* truncated at every length: never a crash, never more than fits */
    for (size_t n = 0; n < full; n++) {
        m = ds4_dsml_replay_new(0, 0);
        int rc = ds4_dsml_replay_load(m, tx, n, NULL, 0, &used, &e);
        CHECK(rc == DS4_E_FORMAT);
        CHECK(ds4_dsml_replay_count(m) == (n < 8 ? 0 : (n - 8) / 16));
        ds4_dsml_replay_free(m);
    }
    /* random corruption */
    rng_state = 99;
    for (int r = 0; r < 3000; r++) {
        memcpy(bad, tx, full);
        int k = 1 + (int)(rnd() % 4);
        for (int j = 0; j < k; j++) bad[rnd() % full] = (uint8_t)rnd();
        m = ds4_dsml_replay_new(0, 0);
        ds4_dsml_replay_load(m, bad, full, NULL, 0, &used, &e);
        CHECK(ds4_dsml_replay_count(m) <= 3 && used <= full);
        ds4_dsml_replay_free(m);
    }
}

DS4_TEST(dsml_stream_long_whitespace_runs_stay_linear) {
    /* 1 MiB of spaces fed 3 bytes at a time (a degenerate generation): the
     * held run is tracked incrementally, not rescanned per feed */
    ds4_dsml_stream_opts o = {.thinking = 0, .tools = 1, .id_seed = 1};
    ds4_dsml_stream *s = ds4_dsml_stream_new(&o);
    evlog l;
    memset(&l, 0, sizeof l);
    l.last_type = -1;
    FEED_S(s, "text");
    static const char sp[3] = {' ', '\n', ' '};
    for (int i = 0; i < (1 << 20) / 3; i++) ds4_dsml_stream_feed(s, sp, 3, log_ev, &l);
    CHECK_STR(l.b.data, "\n2/0:text");
    FEED_S(s, "<" M "tool_calls><" M "invoke name=\"f\"></" M "invoke></" M "tool_calls>");
    CHECK(ds4_dsml_stream_block_ended(s));
    ds4_dsml_result r;
    CHECK_EQ_INT(ds4_dsml_stream_finish(s, log_ev, &l, &r, NULL), 0);
    CHECK_STR(r.content, "text");
    CHECK_EQ_INT(r.n_calls, 1);
    ds4_dsml_result_free(&r);
    ds4_dsml_stream_free(s);
    ds4_buf_free(&l.b);

    /* a huge tag: projection stops after 4 KiB without '>' */
    s = ds4_dsml_stream_new(&o);
    memset(&l, 0, sizeof l);
    FEED_S(s, "<" M "tool_calls><" M "invoke name=\"");
    for (int i = 0; i < 3000; i++) FEED_S(s, "aa");
    CHECK_EQ_INT(l.n_errors, 1);
    CHECK(strstr(l.b.data, "too long") != NULL);
    ds4_dsml_stream_free(s);
    ds4_buf_free(&l.b);
}
