/* test_jsonc.c - JSON replies by constrained decoding (server/jsonc.c,
 * docs/SERVING.md B.13): schemas that compile or are refused with a reason,
 * the byte matcher on valid and invalid documents, and whole replies drawn
 * from random logits over a small vocabulary, which must always be JSON
 * that follows the schema (checked with jansson and by hand).
 */
#include "../../server/jsonc.c"
#include <ctype.h>

#include "test.h"

/* ---- helpers ----------------------------------------------------------- */

static srv_jsonc_schema *schema_of(const char *text, char *msg, size_t cap) {
    if (!text) return srv_jsonc_compile(NULL, msg, cap);
    json_error_t je;
    json_t *v = json_loads(text, JSON_DECODE_ANY, &je);
    if (!v) {
        snprintf(msg, cap, "test schema does not parse: %s", je.text);
        return NULL;
    }
    srv_jsonc_schema *s = srv_jsonc_compile(v, msg, cap);
    json_decref(v);
    return s;
}

/* 1: text is a whole value of the schema; 0: a proper prefix of one (it may
 * go on but not end); -1: no value starts so. */
static int match(const char *schema, const char *text) {
    char msg[256];
    srv_jsonc_schema *s = schema_of(schema, msg, sizeof msg);
    if (!s) return -2;
    static jc_set set, tmp;
    set.n = 1;
    set.t[0].depth = 0;
    set.t[0].ws = set.t[0].nl = set.t[0].done = 0;
    push(&set.t[0], s->root);
    int r = set_feed(s, &set, (const unsigned char *)text, strlen(text), &tmp) ? (set_can_end(&set) ? 1 : 0) : -1;
    srv_jsonc_schema_free(s);
    return r;
}

static const char *refused(const char *schema) {
    static char msg[256];
    srv_jsonc_schema *s = schema_of(schema, msg, sizeof msg);
    if (s) {
        srv_jsonc_schema_free(s);
        return NULL;
    }
    return msg;
}

/* ---- schemas ------------------------------------------------------------ */

DS4_TEST(jsonc_schemas_refused_with_a_reason) {
    CHECK_STR(refused("{\"type\":\"strnig\"}"), "unknown type 'strnig'");
    CHECK_STR(refused("{\"$ref\":\"#/$defs/x\"}"), "$ref '#/$defs/x' does not resolve inside the schema");
    CHECK_STR(refused("{\"type\":\"object\",\"properties\":{\"a\":{}},\"required\":[\"b\"]}"),
              "required property 'b' is not in properties");
    CHECK_STR(refused("{\"enum\":[]}"), "enum must be a non-empty array");
    CHECK_STR(refused("false"), "the schema admits no value nested at most 24 levels deep (a $ref cycle without a way "
                                "out, or required values nested too deeply)");
    CHECK_STR(refused("{\"allOf\":[{},{}]}"), "allOf is supported with one schema only");
    CHECK_STR(refused("{\"type\":\"array\",\"minItems\":3,\"maxItems\":2}"), "minItems is larger than maxItems");
    CHECK_STR(refused("{\"type\":[]}"), "type must not be an empty list");
    CHECK_STR(refused("{\"type\":7}"), "type must be a string or an array of strings");
    /* 65 properties */
    char big[4096] = "{\"type\":\"object\",\"properties\":{";
    for (int i = 0; i < 65; i++) snprintf(big + strlen(big), sizeof big - strlen(big), "%s\"p%d\":{}", i ? "," : "", i);
    strcat(big, "}}");
    CHECK_STR(refused(big), "an object has more than 64 properties");
    /* a schema nested past the limit */
    static char deep[16384] = "";
    for (int i = 0; i < 300; i++) strcat(deep, "{\"type\":\"array\",\"items\":");
    strcat(deep, "{}");
    for (int i = 0; i < 300; i++) strcat(deep, "}");
    CHECK_STR(refused(deep), "the schema nests too deeply");
    /* accepted: recursion through $ref, $defs, type lists, nullable, const */
    CHECK(!refused("{\"$defs\":{\"n\":{\"type\":\"object\",\"properties\":{\"k\":{\"type\":\"array\",\"items\":{\"$ref\":"
                   "\"#/$defs/n\"}}}}},\"$ref\":\"#/$defs/n\"}"));
    CHECK(!refused("{\"type\":[\"string\",\"null\"]}"));
    CHECK(!refused("{\"type\":\"integer\",\"nullable\":true}"));
    CHECK(!refused("{\"const\":{\"a\":[1,2]}}"));
    CHECK(!refused("true"));
    CHECK(!refused("{}"));
}

/* ---- the matcher -------------------------------------------------------- */

DS4_TEST(jsonc_any_object_is_json) {
    /* json_object mode: an object with any members */
    CHECK_EQ_INT(match(NULL, "{\"a\":[1,-2.5e+3,{\"b\":null},true,false,\"x\\u00e9\\n\"],\"\":{}}"), 1);
    CHECK_EQ_INT(match(NULL, "{ \"a\" : 0 , \"b\":[ ] }"), 1);
    CHECK_EQ_INT(match(NULL, "{\"a\":1"), 0);
    CHECK_EQ_INT(match(NULL, "[1]"), -1);           /* the top level is an object */
    CHECK_EQ_INT(match(NULL, "{\"a\":1,}"), -1);
    CHECK_EQ_INT(match(NULL, "{\"a\":01}"), -1);
    CHECK_EQ_INT(match(NULL, "{\"a\":1.}"), -1);
    CHECK_EQ_INT(match(NULL, "{\"a\":-}"), -1);
    CHECK_EQ_INT(match(NULL, "{\"a\":tru}"), -1);
    CHECK_EQ_INT(match(NULL, "{\"a\":nul"), 0);
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\\x\"}"), -1);   /* unknown escape */
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\\ud800\"}"), -1); /* lone surrogate */
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\\uDFFF\"}"), -1);
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\\ud7ff\\uE000\"}"), 1);
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\x01\"}"), -1);    /* control character */
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"}"), 1);
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\xc0\xaf\"}"), -1); /* overlong */
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\xed\xa0\x80\"}"), -1); /* UTF-8 surrogate */
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\xf4\x90\x80\x80\"}"), -1); /* past U+10FFFF */
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\xe2\x82\"}"), -1);  /* cut character */
    CHECK_EQ_INT(match(NULL, "{} "), -1);             /* nothing after the value */
    CHECK_EQ_INT(match(NULL, "{}}"), -1);
}

DS4_TEST(jsonc_whitespace_and_depth_are_bounded) {
    char buf[256];
    snprintf(buf, sizeof buf, "{%32s\"a\":1}", "");
    CHECK_EQ_INT(match(NULL, buf), 1);
    snprintf(buf, sizeof buf, "{%33s\"a\":1}", "");
    CHECK_EQ_INT(match(NULL, buf), -1);
    CHECK_EQ_INT(match(NULL, "{\n\n  \"a\": 1\n}"), 1);
    CHECK_EQ_INT(match(NULL, "{\n\n\n\"a\":1}"), -1);
    snprintf(buf, sizeof buf, "{\"a\":\"%40s\"}", "");
    CHECK_EQ_INT(match(NULL, buf), 1);                      /* inside strings: text */
    CHECK_EQ_INT(match(NULL, "{\"a\":\"\n\"}"), -1);       /* a raw newline is not JSON */
    /* 24 levels fit, 25 do not */
    char deep[128] = "{\"a\":";
    for (int i = 0; i < 22; i++) strcat(deep, "[");
    strcat(deep, "1");
    for (int i = 0; i < 22; i++) strcat(deep, "]");
    strcat(deep, "}");
    CHECK_EQ_INT(match(NULL, deep), 1); /* object + 22 arrays + the number: 24 frames */
    char deeper[128] = "{\"a\":";
    for (int i = 0; i < 23; i++) strcat(deeper, "[");
    CHECK_EQ_INT(match(NULL, deeper), 0);
    strcat(deeper, "1");
    CHECK_EQ_INT(match(NULL, deeper), -1);
    /* numbers: 15 integer digits, 16 fraction digits, 2 exponent digits */
    CHECK_EQ_INT(match("{\"type\":\"integer\"}", "-123456789012345"), 1);
    CHECK_EQ_INT(match("{\"type\":\"integer\"}", "1234567890123456"), -1);
    CHECK_EQ_INT(match("{\"type\":\"number\"}", "123456789012345.1234567890123456e-99"), 1);
    CHECK_EQ_INT(match("{\"type\":\"number\"}", "1.12345678901234567"), -1);
    CHECK_EQ_INT(match("{\"type\":\"number\"}", "1e100"), -1);
    CHECK_EQ_INT(match("{\"type\":\"number\"}", "0.5E+12"), 1);
}

DS4_TEST(jsonc_objects_follow_properties_and_required) {
    const char *s = "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"age\":{\"type\":\"integer\"},"
                    "\"nick\":{\"type\":\"string\"}},\"required\":[\"name\",\"age\"]}";
    CHECK_EQ_INT(match(s, "{\"name\":\"Ada\",\"age\":36}"), 1);
    CHECK_EQ_INT(match(s, "{\"age\":36,\"nick\":\"a\",\"name\":\"Ada\"}"), 1); /* any order */
    CHECK_EQ_INT(match(s, "{\"name\":\"Ada\"}"), -1);                         /* age missing */
    CHECK_EQ_INT(match(s, "{\"name\":\"Ada\",\"name\":\"B\""), -1);          /* twice */
    CHECK_EQ_INT(match(s, "{\"other\":1"), -1);                               /* not declared */
    CHECK_EQ_INT(match(s, "{\"na"), 0);
    CHECK_EQ_INT(match(s, "{\"nam\""), -1);
    CHECK_EQ_INT(match(s, "{\"age\":3.5"), -1);                               /* integer */
    CHECK_EQ_INT(match(s, "{\"age\":-0,\"name\":\"\"}"), 1);
    /* a comma needs a property left to write */
    const char *one = "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"boolean\"}},\"additionalProperties\":false}";
    CHECK_EQ_INT(match(one, "{\"a\":true}"), 1);
    CHECK_EQ_INT(match(one, "{\"a\":true,"), -1);
    CHECK_EQ_INT(match(one, "{}"), 1);
    CHECK_EQ_INT(match(one, "{\"a\":1}"), -1);
    /* keys with escapes are written in their JSON form */
    CHECK_EQ_INT(match("{\"properties\":{\"a\\\"b\":{\"type\":\"null\"}},\"required\":[\"a\\\"b\"]}",
                       "{\"a\\\"b\":null}"), 1);
    /* additionalProperties as a schema: a map */
    const char *map = "{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\"}}";
    CHECK_EQ_INT(match(map, "{\"x\":1,\"y\":2}"), 1);
    CHECK_EQ_INT(match(map, "{\"x\":\"1\"}"), -1);
    /* additionalProperties false and nothing declared: only {} */
    CHECK_EQ_INT(match("{\"type\":\"object\",\"additionalProperties\":false}", "{}"), 1);
    CHECK_EQ_INT(match("{\"type\":\"object\",\"additionalProperties\":false}", "{\""), -1);
}

DS4_TEST(jsonc_enums_alternatives_arrays_refs) {
    const char *e = "{\"enum\":[1,12,\"a\",null,{\"k\":[true]}]}";
    CHECK_EQ_INT(match(e, "1"), 1);
    CHECK_EQ_INT(match(e, "12"), 1);
    CHECK_EQ_INT(match(e, "13"), -1);
    CHECK_EQ_INT(match(e, "\"a\""), 1);
    CHECK_EQ_INT(match(e, "\"b\""), -1);
    CHECK_EQ_INT(match(e, "{\"k\":[true]}"), 1);
    CHECK_EQ_INT(match(e, "{\"k\": [true]}"), -1); /* enum texts are compact */
    const char *sn = "{\"type\":[\"string\",\"null\"]}";
    CHECK_EQ_INT(match(sn, "\"x\""), 1);
    CHECK_EQ_INT(match(sn, "null"), 1);
    CHECK_EQ_INT(match(sn, "0"), -1);
    const char *two = "{\"anyOf\":[{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}},\"required\":[\"a\"]},"
                      "{\"type\":\"object\",\"properties\":{\"b\":{\"type\":\"string\"}},\"required\":[\"b\"]}]}";
    CHECK_EQ_INT(match(two, "{\"a\":1}"), 1);
    CHECK_EQ_INT(match(two, "{\"b\":\"x\"}"), 1);
    CHECK_EQ_INT(match(two, "{\"a\":\"x\"}"), -1);
    CHECK_EQ_INT(match(two, "{\"c\""), -1);
    const char *arr = "{\"type\":\"array\",\"items\":{\"type\":\"number\"},\"minItems\":1,\"maxItems\":2}";
    CHECK_EQ_INT(match(arr, "[]"), -1);
    CHECK_EQ_INT(match(arr, "[1]"), 1);
    CHECK_EQ_INT(match(arr, "[1, 2.5]"), 1);
    CHECK_EQ_INT(match(arr, "[1,2,"), -1);
    const char *tree = "{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},\"kids\":{\"type\":\"array\","
                       "\"items\":{\"$ref\":\"#\"}}},\"required\":[\"v\"],\"additionalProperties\":false}";
    CHECK_EQ_INT(match(tree, "{\"v\":1,\"kids\":[{\"v\":2},{\"v\":3,\"kids\":[{\"v\":4}]}]}"), 1);
    CHECK_EQ_INT(match(tree, "{\"v\":1,\"kids\":[{\"w\":2}]}"), -1);
    /* an anyOf that refers to itself forks a bounded number of times */
    const char *loop = "{\"$defs\":{\"a\":{\"anyOf\":[{\"$ref\":\"#/$defs/a\"},{\"type\":\"string\"}]}},\"$ref\":\"#/$defs/a\"}";
    CHECK(!refused(loop));
    CHECK_EQ_INT(match(loop, "\"x\""), 1);
    CHECK_EQ_INT(match(loop, "1"), -1);
    /* no type: what the keywords say, else any value */
    CHECK_EQ_INT(match("{}", "[1,\"a\",{\"b\":null}]"), 1);
    CHECK_EQ_INT(match("{\"items\":{\"type\":\"boolean\"}}", "[true]"), 1);
    CHECK_EQ_INT(match("{\"items\":{\"type\":\"boolean\"}}", "[1]"), -1);
    CHECK_EQ_INT(match("{\"type\":\"number\",\"nullable\":true}", "null"), 1);
    CHECK_EQ_INT(match("{\"const\":\"on\"}", "\"on\""), 1);
    CHECK_EQ_INT(match("{\"const\":\"on\"}", "\"off\""), -1);
}

/* ---- whole replies from random logits ------------------------------------ */

/* A small vocabulary: 0 EOS, 1 the DSML marker, 2 another control token,
 * then text pieces that can write (and break) JSON. */
static const char *const VOCAB[] = {
    "<eos>", "\xef\xbd\x9c" "DSML" "\xef\xbd\x9c", "<ctl>", "{", "}", "[", "]", "\"", ":", ",", " ", "\n", "\n\n",
    "  ", "\t", "a", "b", "name", "age", "\"name\"", "\":", "\":\"", "\",\"", "1", "0", "-", ".", "5", "e", "12",
    "true", "false", "null", "tr", "ue", "\\", "n", "u", "00e9", "\xc3", "\xa9", "\xc3\xa9", "red", "\"red\"",
    "green", "\"}", "\"]", "}]", "x", "co", "lor", "color\":", "c", "d", "f", "g", "h", "i", "j", "k",
    "l", "m", "o", "p", "q", "r", "s", "t", "v", "w", "y", "z", "<", "tool_calls>", "tags", "\"tags\":[", "ok", "\"ok\":", "{\"", "\x01",
};
#define NV ((int)(sizeof VOCAB / sizeof *VOCAB))

static const char *v_bytes(void *u, int32_t id, size_t *n) {
    (void)u;
    if (id < 0 || id >= NV) return NULL;
    *n = strlen(VOCAB[id]);
    return VOCAB[id];
}
static bool v_control(void *u, int32_t id) {
    (void)u;
    return id <= 2;
}

/* Draws a reply under the constraint with random logits; returns the text
 * (malloc'ed) and whether it ended with EOS. */
static char *draw(const char *schema, bool tool_alt, uint64_t seed, float temp, bool *ended, bool *freed) {
    char msg[256];
    srv_jsonc_schema *s = schema_of(schema, msg, sizeof msg);
    if (!s) return NULL;
    srv_jsonc_vocab v = {NV, 0, 1, v_bytes, v_control, NULL};
    srv_jsonc *j = srv_jsonc_new(s, tool_alt, &v);
    ds4_err err = {0};
    ds4_sampler *smp = ds4_sampler_new(NV, &err);
    ds4_rng rng, lr;
    ds4_rng_seed(&rng, seed);
    ds4_rng_seed(&lr, seed * 7919 + 1);
    ds4_sampler_params p = ds4_sampler_defaults();
    p.temperature = temp;
    p.top_p = 1.0f;
    p.top_k = 0;
    p.min_p = 0.0f;
    ds4_buf out = DS4_BUF_INIT;
    float logits[NV];
    *ended = false;
    *freed = false;
    for (int step = 0; step < 400; step++) {
        if (!srv_jsonc_active(j)) {
            *freed = true;
            break;
        }
        for (int k = 0; k < NV; k++) logits[k] = 6.0f * (float)ds4_rng_uniform(&lr);
        int32_t tok = srv_jsonc_pick(j, smp, logits, &p, &rng, false);
        if (tok < 0) break;
        if (tok == 0) {
            *ended = true;
            break;
        }
        ds4_buf_puts(&out, VOCAB[tok]);
        srv_jsonc_feed(j, tok);
    }
    srv_jsonc_free(j);
    ds4_sampler_free(smp);
    return ds4_buf_detach(&out, NULL);
}

/* n seeded random replies (schema, or the tool-call alternative) that end
 * are JSON objects; with the alternative, one that left the JSON opened a
 * tool-call block */
static void random_replies_are_objects(ds4_test_ctx *t, const char *schema, bool tool_alt, int n) {
    for (int seed = 1; seed <= n; seed++) {
        bool ended, freed;
        char *text = draw(schema, tool_alt, (uint64_t)seed, 1.0f, &ended, &freed);
        CHECK(text);
        if (tool_alt && freed) CHECK_MSG(strstr(text, "tool_calls>"), "seed %d: %s", seed, text);
        if (ended) {
            json_t *jv = json_loads(text, 0, NULL);
            CHECK_MSG(json_is_object(jv), "seed %d: %s", seed, text);
            json_decref(jv);
        }
        free(text);
    }
}

DS4_TEST(jsonc_random_replies_are_schema_values) {
    const char *s = "{\"type\":\"object\",\"properties\":{\"color\":{\"enum\":[\"red\",\"green\"]},\"ok\":{\"type\":"
                    "\"boolean\"},\"age\":{\"type\":\"integer\"},\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"a\","
                    "\"b\"]},\"maxItems\":3}},\"required\":[\"color\",\"ok\",\"age\",\"tags\"],\"additionalProperties\":false}";
    int n_ended = 0;
    for (int seed = 1; seed <= 60; seed++) {
        bool ended, freed;
        char *text = draw(s, false, (uint64_t)seed, seed % 2 ? 1.0f : 0.0f, &ended, &freed);
        CHECK(text);
        /* every property is required and finite, numbers and whitespace are bounded: the reply ends */
        CHECK_MSG(ended, "seed %d: no EOS after %s", seed, text);
        n_ended++;
        json_error_t je;
        json_t *v = json_loads(text, 0, &je);
        CHECK_MSG(v, "seed %d: %s: %s", seed, text, je.text);
        CHECK_EQ_INT(json_object_size(v), 4);
        const char *c = json_string_value(json_object_get(v, "color"));
        CHECK_MSG(c && (!strcmp(c, "red") || !strcmp(c, "green")), "seed %d: %s", seed, text);
        CHECK(json_is_boolean(json_object_get(v, "ok")));
        CHECK(json_is_integer(json_object_get(v, "age")) || json_is_real(json_object_get(v, "age")));
        json_t *tags = json_object_get(v, "tags");
        CHECK(json_is_array(tags) && json_array_size(tags) <= 3);
        json_decref(v);
        free(text);
    }
    CHECK_EQ_INT(n_ended, 60);
}

DS4_TEST(jsonc_random_replies_any_object) {
    /* json_object: no bound on the length, so some replies run out of
     * steps; every reply that ended is an object */
    int n_ended = 0;
    for (int seed = 1; seed <= 60; seed++) {
        bool ended, freed;
        char *text = draw(NULL, false, (uint64_t)seed, 1.0f, &ended, &freed);
        CHECK(text);
        CHECK(text[0] == '{' || isspace((unsigned char)text[0]) || !text[0]);
        if (ended) {
            n_ended++;
            json_error_t je;
            json_t *v = json_loads(text, 0, &je);
            CHECK_MSG(json_is_object(v), "seed %d: %s: %s", seed, text, je.text);
            json_decref(v);
        }
        free(text);
    }
    CHECK_MSG(n_ended >= 5, "only %d of 60 replies ended", n_ended);
}

DS4_TEST(jsonc_tool_block_may_open_instead) {
    char msg[256];
    srv_jsonc_vocab v = {NV, 0, 1, v_bytes, v_control, NULL};
    int ids_ws = 12, ids_lt = -1, ids_tc = -1, ids_brace = 3;
    for (int i = 0; i < NV; i++) {
        if (!strcmp(VOCAB[i], "<")) ids_lt = i;
        if (!strcmp(VOCAB[i], "tool_calls>")) ids_tc = i;
    }
    /* with the tool alternative: "\n\n" "<" DSML "tool_calls>" opens a block and frees the reply */
    srv_jsonc *j = srv_jsonc_new(srv_jsonc_compile(NULL, msg, sizeof msg), true, &v);
    CHECK(srv_jsonc_allows(j, ids_ws) && srv_jsonc_allows(j, ids_lt) && srv_jsonc_allows(j, ids_brace));
    CHECK(!srv_jsonc_allows(j, 1)); /* the marker only after '<' */
    srv_jsonc_feed(j, ids_ws);
    srv_jsonc_feed(j, ids_lt);
    CHECK(srv_jsonc_active(j));
    CHECK(srv_jsonc_allows(j, 1));
    CHECK(!srv_jsonc_allows(j, ids_brace)); /* JSON is out once '<' was written */
    CHECK(!srv_jsonc_allows(j, 2));
    srv_jsonc_feed(j, 1);
    srv_jsonc_feed(j, ids_tc);
    CHECK(!srv_jsonc_active(j));
    srv_jsonc_free(j);
    /* without it, '<' never fits */
    j = srv_jsonc_new(srv_jsonc_compile(NULL, msg, sizeof msg), false, &v);
    CHECK(!srv_jsonc_allows(j, ids_lt) && !srv_jsonc_allows(j, 1));
    /* once JSON started, the block cannot open */
    srv_jsonc_free(j);
    j = srv_jsonc_new(srv_jsonc_compile(NULL, msg, sizeof msg), true, &v);
    srv_jsonc_feed(j, ids_brace);
    CHECK(!srv_jsonc_allows(j, ids_lt));
    srv_jsonc_free(j);
    /* random replies with the alternative: JSON, or a block that opened */
    random_replies_are_objects(t, NULL, true, 40);
}

DS4_TEST(jsonc_end_is_forced_and_nothing_fits_is_reported) {
    char msg[256];
    srv_jsonc_vocab v = {NV, 0, 1, v_bytes, v_control, NULL};
    srv_jsonc *j = srv_jsonc_new(schema_of("{\"type\":\"boolean\"}", msg, sizeof msg), false, &v);
    int tr = -1;
    for (int i = 0; i < NV; i++)
        if (!strcmp(VOCAB[i], "true")) tr = i;
    CHECK(!srv_jsonc_allows(j, 0)); /* EOS before a value */
    CHECK(!srv_jsonc_must_end(j));
    srv_jsonc_feed(j, tr);
    CHECK(srv_jsonc_must_end(j));
    CHECK(srv_jsonc_allows(j, 0));
    float logits[NV];
    for (int i = 0; i < NV; i++) logits[i] = (float)i;
    ds4_err err = {0};
    ds4_sampler *smp = ds4_sampler_new(NV, &err);
    ds4_rng rng;
    ds4_rng_seed(&rng, 1);
    ds4_sampler_params p = ds4_sampler_defaults();
    p.temperature = 0.0f;
    CHECK_EQ_INT(srv_jsonc_pick(j, smp, logits, &p, &rng, false), 0);
    srv_jsonc_free(j);
    /* a schema no token of this vocabulary can start: whitespace until its
     * bound, then -1 */
    j = srv_jsonc_new(schema_of("{\"const\":7}", msg, sizeof msg), false, &v);
    int32_t tok = -1;
    for (int k = 0; k < 64; k++) {
        tok = srv_jsonc_pick(j, smp, logits, &p, &rng, false);
        if (tok < 0) break;
        CHECK_MSG(strspn(VOCAB[tok], " \t\n") == strlen(VOCAB[tok]), "picked '%s'", VOCAB[tok]);
        srv_jsonc_feed(j, tok);
    }
    CHECK_EQ_INT(tok, -1);
    srv_jsonc_free(j);
    ds4_sampler_free(smp);
}

/* ---- from an adversarial review ------------------------------------------ */

static char *props_schema(int n, const char *required) {
    static char buf[8192];
    strcpy(buf, "{\"type\":\"object\",\"properties\":{");
    for (int i = 0; i < n; i++) snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%s\"p%d\":{}", i ? "," : "", i);
    snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "},\"required\":%s,\"additionalProperties\":false}",
             required);
    return buf;
}

DS4_TEST(jsonc_review_limits_hold_exactly) {
    /* 64 properties (the documented limit) work: the unused-property mask
     * shifted by 64 (undefined; no key could be written) */
    CHECK_EQ_INT(match(props_schema(64, "[\"p0\",\"p63\"]"), "{\"p63\":1,\"p0\":2}"), 1);
    CHECK_EQ_INT(match(props_schema(64, "[]"), "{\"p40\":null}"), 1);
    /* a chain of 9 $refs is one alternative, not 9 nested forks */
    char chain[1024] = "{\"$defs\":{";
    for (int i = 0; i < 9; i++)
        snprintf(chain + strlen(chain), sizeof chain - strlen(chain), "%s\"a%d\":{\"$ref\":\"#/$defs/a%d\"}",
                 i ? "," : "", i, i + 1);
    strcat(chain, ",\"a9\":{\"type\":\"string\"}},\"$ref\":\"#/$defs/a0\"}");
    CHECK_EQ_INT(match(chain, "\"x\""), 1);
    /* an anyOf that refers to itself N times costs one alternative */
    char loop[1024] = "{\"anyOf\":[";
    for (int i = 0; i < 12; i++) strcat(loop, "{\"$ref\":\"#\"},");
    strcat(loop, "{\"type\":\"string\"}]}");
    CHECK_EQ_INT(match(loop, "\"abc\""), 1);
    CHECK_EQ_INT(match(loop, "[\"abc\"]"), -1);
    /* ten object variants: each reachable (threads past 8 were dropped) */
    char ten[2048] = "{\"anyOf\":[";
    for (int i = 0; i < 10; i++)
        snprintf(ten + strlen(ten), sizeof ten - strlen(ten),
                 "%s{\"type\":\"object\",\"properties\":{\"k%d\":{\"type\":\"integer\"}},\"required\":[\"k%d\"]}",
                 i ? "," : "", i, i);
    strcat(ten, "]}");
    CHECK_EQ_INT(match(ten, "{\"k9\":1}"), 1);
    CHECK_EQ_INT(match(ten, "{\"k8\":1}"), 1);
    /* identical threads are merged: a longer array keeps both variants */
    const char *dup = "{\"anyOf\":[{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"array\",\"items\":{\"anyOf\":"
                      "[{\"type\":\"number\"},{\"type\":\"integer\"}]}},\"b\":{\"type\":\"string\"}},\"required\":[\"a\","
                      "\"b\"],\"additionalProperties\":false},{\"type\":\"object\",\"properties\":{\"a\":{\"type\":"
                      "\"array\",\"items\":{\"anyOf\":[{\"type\":\"number\"},{\"type\":\"integer\"}]}},\"c\":{\"type\":"
                      "\"boolean\"}},\"required\":[\"a\",\"c\"],\"additionalProperties\":false}]}";
    CHECK_EQ_INT(match(dup, "{\"a\":[1,2,3,4,5,6],\"c\":true}"), 1);
    /* more alternatives for one value than matchers: refused */
    char many[4096] = "{\"anyOf\":[";
    for (int i = 0; i < 33; i++) snprintf(many + strlen(many), sizeof many - strlen(many), "%s{\"const\":%d}", i ? "," : "", i);
    strcat(many, "]}");
    CHECK_STR(refused(many), "more than 32 alternatives (anyOf, type lists) for one value");
}

DS4_TEST(jsonc_review_schemas_without_a_value_are_refused) {
    const char *msg = "the schema admits no value nested at most 24 levels deep (a $ref cycle without a way out, or "
                      "required values nested too deeply)";
    CHECK_STR(refused("{\"$ref\":\"#\"}"), msg);
    CHECK_STR(refused("{\"anyOf\":[{\"$ref\":\"#\"},{\"$ref\":\"#\"}]}"), msg);
    CHECK_STR(refused("{\"type\":\"array\",\"items\":{\"$ref\":\"#\"},\"minItems\":1}"), msg);
    CHECK_STR(refused("{\"$defs\":{\"a\":{\"$ref\":\"#/$defs/b\"},\"b\":{\"$ref\":\"#/$defs/a\"}},\"$ref\":\"#/$defs/a\"}"),
              msg);
    /* 24 nested required objects around an integer need 25 frames; 23 fit */
    char deep[4096] = "";
    for (int i = 0; i < 24; i++) strcat(deep, "{\"type\":\"object\",\"properties\":{\"x\":");
    strcat(deep, "{\"type\":\"integer\"}");
    for (int i = 0; i < 24; i++) strcat(deep, "},\"required\":[\"x\"]}");
    CHECK_STR(refused(deep), msg);
    char ok[4096] = "";
    for (int i = 0; i < 23; i++) strcat(ok, "{\"type\":\"object\",\"properties\":{\"x\":");
    strcat(ok, "{\"type\":\"integer\"}");
    for (int i = 0; i < 23; i++) strcat(ok, "},\"required\":[\"x\"]}");
    CHECK(!refused(ok));
    /* an array that may be empty gets out of a cycle */
    CHECK(!refused("{\"type\":\"array\",\"items\":{\"$ref\":\"#\"}}"));
}

DS4_TEST(jsonc_review_recursion_never_dead_ends) {
    /* an optional recursive member: at the depth limit only what fits is
     * offered (an integer key was accepted whose value could not be pushed) */
    const char *s = "{\"type\":\"object\",\"properties\":{\"a\":{\"$ref\":\"#\"},\"b\":{\"type\":\"integer\"}},"
                    "\"additionalProperties\":false}";
    char pre[512] = "";
    for (int i = 0; i < 23; i++) strcat(pre, "{\"a\":");
    char t2[600];
    snprintf(t2, sizeof t2, "%s{\"b\":1}", pre);
    CHECK_EQ_INT(match(s, t2), -1); /* 24 objects + the integer: 25 frames */
    snprintf(t2, sizeof t2, "%s{\"", pre);
    CHECK_EQ_INT(match(s, t2), -1);
    snprintf(t2, sizeof t2, "%s{}", pre);
    for (int i = 0; i < 23; i++) strcat(t2, "}");
    CHECK_EQ_INT(match(s, t2), 1);
    snprintf(t2, sizeof t2, "%s", pre);
    t2[strlen(t2) - 5] = 0; /* 22 levels: {"b":1} fits */
    strcat(t2, "{\"b\":1}");
    CHECK_EQ_INT(match(s, t2), 0);
    /* whole random replies on it always end */
    random_replies_are_objects(t, s, false, 30);
}

DS4_TEST(jsonc_review_sizes_and_siblings) {
    /* enum and const values are those of the type beside them */
    CHECK_EQ_INT(match("{\"type\":\"string\",\"enum\":[\"a\",1,null]}", "\"a\""), 1);
    CHECK_EQ_INT(match("{\"type\":\"string\",\"enum\":[\"a\",1,null]}", "1"), -1);
    CHECK_EQ_INT(match("{\"type\":\"string\",\"nullable\":true,\"enum\":[\"a\",null]}", "null"), 1);
    CHECK_EQ_INT(match("{\"type\":\"integer\",\"enum\":[1,2.5]}", "1"), 1);
    CHECK_EQ_INT(match("{\"type\":\"integer\",\"enum\":[1,2.5]}", "2.5"), -1);
    const char *none = "enum/const: no value fits the rest of its schema (type, properties, ...)";
    CHECK_STR(refused("{\"type\":\"integer\",\"enum\":[\"a\"]}"), none);
    CHECK_STR(refused("{\"type\":\"boolean\",\"const\":1}"), none);
    /* constraints beside anyOf / $ref / allOf: refused, not ignored */
    CHECK_STR(refused("{\"type\":\"object\",\"anyOf\":[{\"type\":\"object\"},{\"type\":\"array\"}]}"),
              "'type' beside anyOf/oneOf is not supported (put it in each alternative)");
    CHECK_STR(refused("{\"$defs\":{\"i\":{\"type\":\"integer\"}},\"$ref\":\"#/$defs/i\",\"enum\":[1,2]}"),
              "'enum' beside $ref is not supported");
    CHECK_STR(refused("{\"allOf\":[{}],\"required\":[\"a\"]}"), "'required' beside allOf is not supported");
    CHECK(!refused("{\"anyOf\":[{\"type\":\"string\"},{\"type\":\"null\"}],\"title\":\"T\",\"default\":null}"));
    CHECK(!refused("{\"$defs\":{\"i\":{\"type\":\"integer\"}},\"$ref\":\"#/$defs/i\",\"description\":\"d\"}"));
    /* sizes */
    static char big[40000];
    strcpy(big, "{\"enum\":[");
    for (int i = 0; i < 1025; i++) snprintf(big + strlen(big), sizeof big - strlen(big), "%s%d", i ? "," : "", i);
    strcat(big, "]}");
    CHECK_STR(refused(big), "enum has more than 1024 values");
    strcpy(big, "{\"const\":\"");
    memset(big + strlen(big), 'a', 16400);
    big[10 + 16400] = 0;
    strcat(big, "\"}");
    CHECK_STR(refused(big), "const: a value is longer than 16384 bytes");
    strcpy(big, "{\"properties\":{\"");
    size_t at = strlen(big);
    memset(big + at, 'k', 1100);
    big[at + 1100] = 0;
    strcat(big, "\":{}}}");
    CHECK_STR(refused(big), "a property name is longer than 1024 bytes");
    /* a const of 16 KiB matches exactly (positions were 16-bit) */
    strcpy(big, "{\"const\":\"");
    memset(big + strlen(big), 'b', 16000);
    big[10 + 16000] = 0;
    strcat(big, "\"}");
    char *doc = malloc(16010);
    doc[0] = '"';
    memset(doc + 1, 'b', 16000);
    strcpy(doc + 16001, "\"");
    CHECK_EQ_INT(match(big, doc), 1);
    doc[16000] = 'c';
    CHECK_EQ_INT(match(big, doc), -1);
    free(doc);
}

DS4_TEST(jsonc_review_tool_alternative_whitespace) {
    /* whitespace JSON refuses does not push the reply into a tool call:
     * "\n\n" then "\n\n" is refused by both */
    char msg[256];
    srv_jsonc_vocab v = {NV, 0, 1, v_bytes, v_control, NULL};
    int nn = -1;
    for (int i = 0; i < NV; i++)
        if (!strcmp(VOCAB[i], "\n\n")) nn = i;
    srv_jsonc *j = srv_jsonc_new(srv_jsonc_compile(NULL, msg, sizeof msg), true, &v);
    CHECK(srv_jsonc_allows(j, nn));
    srv_jsonc_feed(j, nn);
    CHECK(!srv_jsonc_allows(j, nn));
    srv_jsonc_free(j);
}

DS4_TEST(jsonc_review2_values_fit_their_whole_schema) {
    const char *none = "enum/const: no value fits the rest of its schema (type, properties, ...)";
    /* enum / const beside anyOf, allOf or $ref: refused (the enum won) */
    CHECK_STR(refused("{\"anyOf\":[{\"type\":\"string\"}],\"enum\":[1,2]}"),
              "'enum' beside anyOf/oneOf is not supported (put it in each alternative)");
    CHECK_STR(refused("{\"allOf\":[{\"type\":\"string\"}],\"const\":3}"), "'const' beside allOf is not supported");
    CHECK_STR(refused("{\"$ref\":\"#/$defs/A\",\"const\":null,\"$defs\":{\"A\":{\"type\":\"boolean\"}}}"),
              "'const' beside $ref is not supported");
    /* the values are kept to what the rest of the schema admits */
    const char *arr = "{\"type\":\"array\",\"minItems\":2,\"enum\":[[1],[1,2]]}";
    CHECK_EQ_INT(match(arr, "[1]"), -1);
    CHECK_EQ_INT(match(arr, "[1,2]"), 1);
    const char *obj = "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}},\"required\":[\"a\"],"
                      "\"enum\":[{},{\"a\":\"x\"},{\"a\":1}]}";
    CHECK_EQ_INT(match(obj, "{}"), -1);
    CHECK_EQ_INT(match(obj, "{\"a\":\"x\"}"), -1);
    CHECK_EQ_INT(match(obj, "{\"a\":1}"), 1);
    CHECK_STR(refused("{\"type\":\"array\",\"items\":{\"type\":\"string\"},\"const\":[1]}"), none);
    /* nullable keeps null, not every type */
    CHECK_STR(refused("{\"type\":\"string\",\"nullable\":true,\"enum\":[1,2]}"), none);
    const char *sn = "{\"type\":\"string\",\"nullable\":true,\"enum\":[1,\"a\",null]}";
    CHECK_EQ_INT(match(sn, "\"a\""), 1);
    CHECK_EQ_INT(match(sn, "null"), 1);
    CHECK_EQ_INT(match(sn, "1"), -1);
    /* minItems / maxItems alone make an array */
    CHECK_EQ_INT(match("{\"minItems\":3}", "[[1]]"), -1);
    CHECK_EQ_INT(match("{\"minItems\":3}", "[1,[],{}]"), 1);
    CHECK_EQ_INT(match("{\"maxItems\":1}", "[1,2]"), -1);
    /* false: never offered (an optional member, items of an empty array) */
    const char *fo = "{\"type\":\"object\",\"properties\":{\"a\":false,\"b\":{\"type\":\"integer\"}}}";
    CHECK_EQ_INT(match(fo, "{\"b\":1}"), 1);
    CHECK_EQ_INT(match(fo, "{\"a\""), -1);
    CHECK_EQ_INT(match("{\"type\":\"array\",\"items\":false}", "[]"), 1);
    CHECK_EQ_INT(match("{\"type\":\"array\",\"items\":false}", "[1"), -1);
    CHECK(refused("{\"type\":\"object\",\"properties\":{\"a\":false},\"required\":[\"a\"]}"));
}

DS4_TEST(jsonc_review2_depth_and_alternatives) {
    /* a $defs chain of 20 required objects (value depth 21) converges (the
     * relaxation stopped after 26 rounds: 14 levels were refused) */
    char chain[8192] = "{\"$defs\":{";
    for (int i = 0; i < 20; i++)
        snprintf(chain + strlen(chain), sizeof chain - strlen(chain),
                 "%s\"L%d\":{\"type\":\"object\",\"properties\":{\"c\":{\"$ref\":\"#/$defs/L%d\"}},\"required\":[\"c\"]}",
                 i ? "," : "", i, i + 1);
    strcat(chain, ",\"L20\":{\"type\":\"integer\"}},\"$ref\":\"#/$defs/L0\"}");
    CHECK_MSG(!refused(chain), "%s", refused(chain));
    char doc[512] = "";
    for (int i = 0; i < 20; i++) strcat(doc, "{\"c\":");
    strcat(doc, "7");
    for (int i = 0; i < 20; i++) strcat(doc, "}");
    CHECK_EQ_INT(match(chain, doc), 1);
    /* one target under several spellings is one alternative */
    CHECK_EQ_INT(match("{\"$defs\":{\"L\":[{\"enum\":[\"x\",\"y\"]}]},\"anyOf\":[{\"$ref\":\"#/$defs/L/0\"},{\"$ref\":"
                       "\"#/$defs/L/00\"},{\"type\":\"null\"}]}", "\"y\""), 1);
    /* a large enum: each value and nothing else (binary search over sorted texts) */
    static char big[40000];
    strcpy(big, "{\"enum\":[");
    for (int i = 0; i < 1000; i++) snprintf(big + strlen(big), sizeof big - strlen(big), "%s\"v%d\"", i ? "," : "", i * 7);
    strcat(big, ",\"v\",12,1]}");
    CHECK_EQ_INT(match(big, "\"v0\""), 1);
    CHECK_EQ_INT(match(big, "\"v6993\""), 1);
    CHECK_EQ_INT(match(big, "\"v\""), 1);
    CHECK_EQ_INT(match(big, "\"v1\""), -1);
    CHECK_EQ_INT(match(big, "\"v7"), 0);
    CHECK_EQ_INT(match(big, "1"), 1);
    CHECK_EQ_INT(match(big, "12"), 1);
    CHECK_EQ_INT(match(big, "13"), -1);
}

DS4_TEST(jsonc_review3_enum_filters) {
    /* an enum whose own schema leads back to it (the filter freed values
     * while the matcher still searched them: use after free under ASan) */
    const char *rec = "{\"$defs\":{\"A\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/A\"},\"enum\":[[],[[]],[[[1]]]]}},"
                      "\"$ref\":\"#/$defs/A\"}";
    CHECK_EQ_INT(match(rec, "[]"), 1);
    CHECK_EQ_INT(match(rec, "[[]]"), 1);
    CHECK_EQ_INT(match(rec, "[[[1]]]"), -1);
    const char *rec2 = "{\"type\":\"object\",\"properties\":{\"a\":{\"$ref\":\"#\"}},\"enum\":[{\"a\":{}},{},{\"a\":{\"a\":5}}]}";
    CHECK_EQ_INT(match(rec2, "{}"), 1);
    CHECK_EQ_INT(match(rec2, "{\"a\":{}}"), 1);
    CHECK_EQ_INT(match(rec2, "{\"a\":{\"a\":5}}"), -1);
    /* numbers beside a type: written with the digits they need (jansson's
     * 17 made 0.1 "0.10000000000000001", then dropped), integral reals as
     * integers, any length (the client's values) */
    CHECK_EQ_INT(match("{\"type\":\"number\",\"enum\":[0.1,0.2]}", "0.1"), 1);
    CHECK_EQ_INT(match("{\"type\":\"number\",\"enum\":[0.1,0.2]}", "0.2"), 1);
    CHECK_EQ_INT(match("{\"enum\":[0.30000000000000004]}", "0.30000000000000004"), 1);
    CHECK_EQ_INT(match("{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"number\"}},\"const\":{\"x\":0.3}}",
                       "{\"x\":0.3}"), 1);
    CHECK_EQ_INT(match("{\"type\":\"integer\",\"const\":1.0}", "1"), 1);
    CHECK_EQ_INT(match("{\"type\":\"integer\",\"enum\":[12345678901234567]}", "12345678901234567"), 1);
    CHECK_EQ_INT(match("{\"type\":\"number\",\"enum\":[1e300]}", "1e300"), 1);
}
