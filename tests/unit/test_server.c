/* test_server.c - ds4-server request parsers, error bodies, rendering of
 * parsed requests and the SSE shapes of every API, without a model or a
 * socket. The server sources are compiled into this test directly (they are
 * a program, not part of libds4): only the files without engine or HTTP
 * state are included (not http.c and main.c).
 */
#include "../../server/api_anthropic.c"
#include "../../server/api_openai.c"
#include "../../server/api_responses.c"
#include "../../server/cache_policy.c"
#include "../../server/common.c"
#include "../../server/forced.c"
#include "../../server/request.c"
#include "../../server/worker.c"
#include "test.h"

/* ---- helpers ----------------------------------------------------------- */

static int parse(srv_api api, const char *body, srv_request *rq, srv_error *e) {
    memset(e, 0, sizeof *e);
    return srv_parse_request(api, body, strlen(body), DS4_THINK_HIGH, rq, e);
}

/* Expects a parse failure with status and message. */
/* the parse of body fails with status and message msg (whole, or its start when prefix) */
static int fails_as(srv_api api, const char *body, int status, const char *msg, bool prefix) {
    srv_request rq;
    srv_error e;
    int rc = parse(api, body, &rq, &e);
    srv_request_free(&rq);
    if (rc == 0) return 0;
    return e.status == status && (prefix ? !strncmp(e.msg, msg, strlen(msg)) : !strcmp(e.msg, msg));
}
static int fails_with(srv_api api, const char *body, int status, const char *msg) {
    return fails_as(api, body, status, msg, false);
}
/* (parse errors add why and where to their message) */
static int fails_starting(srv_api api, const char *body, int status, const char *msg) {
    return fails_as(api, body, status, msg, true);
}

static char *render(srv_api api, const char *body, int n_ctx) {
    srv_request rq;
    srv_error e;
    if (parse(api, body, &rq, &e)) {
        srv_request_free(&rq);
        return NULL;
    }
    char *t = NULL;
    if (!srv_render(&rq, n_ctx, NULL, &e)) {
        t = rq.text;
        rq.text = NULL;
    }
    srv_request_free(&rq);
    return t;
}

#define BOS DS4_BOS
#define USER DS4_USER
#define ASST DS4_ASSISTANT

/* ---- parsing ------------------------------------------------------------ */

DS4_TEST(server_parse_chat_fields) {
    srv_request rq;
    srv_error e;
    const char *b = "{\"model\":\"m1\",\"stream\":true,\"max_tokens\":7.0,\"temperature\":0,"
                    "\"top_k\":5000,\"stop\":[\"\",\"END\"],\"stream_options\":{\"include_usage\":true},"
                    "\"unknown_field\":{\"deep\":[1,2]},"
                    "\"messages\":[{\"role\":\"system\",\"content\":\"S\"},"
                    "{\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"image_url\"},\"b\"]},"
                    "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"call_1\","
                    "\"function\":{\"name\":\"f\",\"arguments\":{\"x\":1}}},{\"function\":{}}]},"
                    "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"ok\"}]}";
    CHECK_EQ_INT(parse(SRV_API_CHAT, b, &rq, &e), 0);
    CHECK_STR(rq.model, "m1");
    CHECK(rq.stream && rq.include_usage);
    CHECK_EQ_INT(rq.max_tokens, 7);
    CHECK_EQ_INT(rq.top_k, 1024);
    CHECK_EQ_INT(rq.n_stops, 1);
    CHECK_STR(rq.stops[0], "END");
    CHECK_EQ_INT(rq.chat->n_msgs, 4);
    CHECK_STR(rq.chat->msgs[1].content, "a[image omitted: this model reads text only]b"); /* said, not dropped */
    CHECK_EQ_INT(rq.chat->msgs[2].n_calls, 1);
    CHECK_STR(rq.chat->msgs[2].calls[0].arguments, "{\"x\":1}");
    CHECK_STR(rq.chat->msgs[3].tool_call_id, "call_1");
    CHECK_EQ_INT(rq.think, DS4_THINK_HIGH);
    srv_request_free(&rq);
}

DS4_TEST(server_parse_errors_documented) {
    const char *inv = "invalid JSON request";
    CHECK(fails_starting(SRV_API_CHAT, "{\"messages\":[", 400, "invalid JSON request: "));
    CHECK(fails_with(SRV_API_CHAT, "[1,2]", 400, "invalid JSON request: the body is not a JSON object"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream\":\"true\"}", 400,
                     "invalid JSON request: stream must be true or false"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":\"5\"}", 400,
                     "invalid JSON request: max_tokens must be a number"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":{}}", 400, inv));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[\"hi\"]}", 400, inv));
    CHECK(fails_starting(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}", 400,
                         "invalid JSON request: unable to decode byte 0xff"));
    /* valid JSON whose strings jansson cannot hold: named (an outside pass met a bare "invalid JSON request") */
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}", 400,
                     "invalid JSON request: a string holds \\u0000 (NUL), which is not supported (line 1, column 48)"));
    { /* a raw NUL byte: jansson skipped it after a number and took the body */
        const char b[] = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":5\0,\"stream\":true}";
        srv_request rq;
        srv_error e;
        CHECK(srv_parse_request(SRV_API_CHAT, b, sizeof b - 1, DS4_THINK_HIGH, &rq, &e) != 0);
        CHECK_EQ_INT(e.status, 400);
        CHECK_STR(e.msg, "invalid JSON request: a NUL byte at offset 58 (JSON text holds none)");
    }
    CHECK(fails_starting(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\\ud800y\"}]}", 400,
                         "invalid JSON request: a string holds an unpaired UTF-16 surrogate escape"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"reasoning_effort\":\"bogus\"}", 400, inv));
    CHECK(fails_with(SRV_API_CHAT, "{\"model\":\"x\"}", 400, "missing messages"));
    CHECK(fails_with(SRV_API_COMPLETIONS, "{}", 400, "missing prompt"));
    CHECK(fails_with(SRV_API_RESPONSES, "{}", 400, "missing input"));
    CHECK(fails_with(SRV_API_ANTHROPIC, "{\"max_tokens\":5}", 400, "missing messages"));
    /* Anthropic content and system parts of the wrong type are the documented 400, not dropped */
    CHECK(fails_with(SRV_API_ANTHROPIC, "{\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":[5]}]}", 400, inv));
    CHECK(fails_with(SRV_API_ANTHROPIC, "{\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":[\"a\",[1]]}]}", 400,
                     inv));
    CHECK(fails_with(SRV_API_ANTHROPIC, "{\"max_tokens\":5,\"system\":[{\"type\":\"text\",\"text\":\"s\"},7],"
                     "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 400, inv));
    /* out-of-range knobs and limits name their field (they used to be clamped or dropped) */
#define M1 "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]"
    CHECK(fails_with(SRV_API_CHAT, "{" M1 ",\"max_tokens\":-5}", 400, "max_tokens must be >= 0 (or -1: no limit)"));
    CHECK(fails_with(SRV_API_CHAT, "{" M1 ",\"max_completion_tokens\":1.5}", 400,
                     "max_completion_tokens must be a whole number"));
    CHECK(fails_with(SRV_API_CHAT, "{" M1 ",\"temperature\":-1}", 400, "temperature must be between 0 and 100"));
    CHECK(fails_with(SRV_API_CHAT, "{" M1 ",\"top_p\":5}", 400, "top_p must be between 0 and 1"));
    CHECK(fails_with(SRV_API_CHAT, "{" M1 ",\"min_p\":2}", 400, "min_p must be between 0 and 1"));
    CHECK(fails_with(SRV_API_CHAT, "{" M1 ",\"top_k\":-5}", 400, "top_k must be >= 0 (0: no top-k)"));
    CHECK(fails_with(SRV_API_CHAT, "{" M1 ",\"stop\":[\"a\",5]}", 400, "invalid JSON request"));
    CHECK(fails_with(SRV_API_ANTHROPIC, "{" M1 ",\"max_tokens\":-3}", 400, "max_tokens must be >= 0 (or -1: no limit)"));
    CHECK(fails_with(SRV_API_COMPLETIONS, "{\"prompt\":[1,2,3]}", 400,
                     "prompt must be a string (token-id prompts are not supported)"));
    CHECK(fails_with(SRV_API_COMPLETIONS, "{\"prompt\":[]}", 400,
                     "prompt must be a string (token-id prompts are not supported)"));
    CHECK(fails_with(SRV_API_COMPLETIONS, "{\"prompt\":[\"a\",\"b\"]}", 400,
                     "one prompt per request (send several requests instead)"));
    {
        srv_request r2;
        srv_error e2;
        CHECK_EQ_INT(parse(SRV_API_CHAT, "{" M1 ",\"max_tokens\":-1}", &r2, &e2), 0);
        CHECK_EQ_INT(r2.max_tokens, -1); /* -1: no limit but the context */
        srv_request_free(&r2);
        CHECK_EQ_INT(parse(SRV_API_COMPLETIONS, "{\"prompt\":[\"hi\"]}", &r2, &e2), 0);
        CHECK_STR(r2.prompt, "hi");
        srv_request_free(&r2);
    }
#undef M1
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[]}", 400, "messages must contain at least one message"));
    CHECK(fails_with(SRV_API_ANTHROPIC, "{\"max_tokens\":5,\"messages\":[]}", 400,
                     "messages must contain at least one message"));
    CHECK(fails_with(SRV_API_RESPONSES, "{\"input\":\"x\",\"previous_response_id\":\"r\"}", 400,
                     "previous_response_id is not supported; replay full input instead"));
    CHECK(fails_with(SRV_API_RESPONSES, "{\"input\":\"x\",\"tool_choice\":\"sometimes\"}", 400,
                     "tool_choice=sometimes not supported"));
    CHECK(fails_with(SRV_API_RESPONSES, "{\"input\":\"x\",\"tool_choice\":{\"type\":\"function\"}}",
                     400, "tool_choice function needs a name"));
    CHECK(fails_with(SRV_API_RESPONSES, "{\"input\":\"x\",\"tool_choice\":{\"type\":\"web_search\"}}",
                     400, "tool_choice type web_search not supported"));
    /* n > 1 is refused naming the field, never answered with one choice */
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":2}", 400,
                     "n must be 1: ds4-server generates one choice per request (send several "
                     "requests instead)"));
    CHECK(fails_with(SRV_API_COMPLETIONS, "{\"prompt\":\"x\",\"best_of\":3}", 400,
                     "best_of must be 1: ds4-server generates one choice per request (send several "
                     "requests instead)"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,\"top_logprobs\":21}", 400,
                     "top_logprobs must be between 0 and 20"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":2}", 400,
                     "top_logprobs requires logprobs to be true"));
    CHECK(fails_with(SRV_API_COMPLETIONS, "{\"prompt\":\"x\",\"logprobs\":6}", 400,
                     "logprobs must be between 0 and 5"));
    /* B.4 asks for a 400 without a text: the item is named */
    CHECK(fails_with(SRV_API_RESPONSES, "{\"input\":[{\"type\":\"mystery\"}]}", 400,
                     "input: items of type 'mystery' are not supported"));
    CHECK(fails_with(SRV_API_RESPONSES, "{\"input\":[{\"type\":\"message\",\"status\":\"cut\"}]}",
                     400, "input: a 'message' item with status 'cut' cannot be replayed (completed, incomplete "
                          "or in_progress; drop the status or the item)"));
    CHECK(fails_with(SRV_API_RESPONSES, "{\"input\":[{\"type\":\"message\",\"status\":7}]}", 400, inv));
    /* a tool output whose call is not in the request parses; its id is
     * recorded for the live-binding check before queueing (the 400 of B.4
     * then comes from srv_submit, tested in tests/py/test_server.py) */
    srv_request rq;
    srv_error e;
    CHECK_EQ_INT(parse(SRV_API_RESPONSES,
                       "{\"input\":[{\"type\":\"function_call_output\",\"call_id\":\"call_9\",\"output\":\"x\"}]}",
                       &rq, &e), 0);
    CHECK(rq.n_live_ids == 1 && !strcmp(rq.live_ids[0], "call_9"));
    srv_request_free(&rq);
    CHECK_EQ_INT(parse(SRV_API_ANTHROPIC,
                       "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\","
                       "\"tool_use_id\":\"toolu_1\",\"content\":\"x\"}]}]}",
                       &rq, &e), 0);
    CHECK(rq.n_live_ids == 1 && !strcmp(rq.live_ids[0], "toolu_1"));
    srv_request_free(&rq);
}

DS4_TEST(server_parse_thinking_controls) {
    srv_request rq;
    srv_error e;
    CHECK_EQ_INT(parse(SRV_API_CHAT, "{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &rq, &e), 0);
    CHECK_EQ_INT(rq.think, DS4_THINK_NONE);
    srv_request_free(&rq);
    /* an explicit control beats the alias */
    CHECK_EQ_INT(parse(SRV_API_CHAT, "{\"model\":\"deepseek-chat\",\"think\":true,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &rq, &e), 0);
    CHECK_EQ_INT(rq.think, DS4_THINK_HIGH);
    srv_request_free(&rq);
    CHECK_EQ_INT(parse(SRV_API_CHAT, "{\"reasoning_effort\":\"max\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &rq, &e), 0);
    CHECK_EQ_INT(rq.think, DS4_THINK_MAX);
    srv_request_free(&rq);
    CHECK_EQ_INT(parse(SRV_API_ANTHROPIC, "{\"thinking\":{\"type\":\"disabled\"},\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &rq, &e), 0);
    CHECK_EQ_INT(rq.think, DS4_THINK_NONE);
    srv_request_free(&rq);
    CHECK_EQ_INT(parse(SRV_API_ANTHROPIC, "{\"output_config\":{\"effort\":\"none\"},\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &rq, &e), 0);
    CHECK_EQ_INT(rq.think, DS4_THINK_NONE);
    srv_request_free(&rq);
    CHECK_EQ_INT(parse(SRV_API_RESPONSES, "{\"input\":\"x\",\"reasoning\":{\"effort\":\"low\",\"summary\":\"auto\"}}", &rq, &e), 0);
    CHECK_EQ_INT(rq.think, DS4_THINK_HIGH);
    CHECK(rq.reasoning_summary);
    srv_request_free(&rq);
    /* Responses: "thinking" is not a field there; the alias applies unless
     * reasoning.effort is given */
    CHECK_EQ_INT(parse(SRV_API_RESPONSES, "{\"input\":\"x\",\"thinking\":false}", &rq, &e), 0);
    CHECK_EQ_INT(rq.think, DS4_THINK_HIGH);
    srv_request_free(&rq);
    CHECK_EQ_INT(parse(SRV_API_RESPONSES, "{\"input\":\"x\",\"model\":\"deepseek-chat\"}", &rq, &e), 0);
    CHECK_EQ_INT(rq.think, DS4_THINK_NONE);
    srv_request_free(&rq);
    CHECK_EQ_INT(parse(SRV_API_RESPONSES, "{\"input\":\"x\",\"model\":\"deepseek-chat\",\"reasoning\":{\"effort\":\"high\"}}", &rq, &e), 0);
    CHECK_EQ_INT(rq.think, DS4_THINK_HIGH);
    srv_request_free(&rq);
}

DS4_TEST(server_parse_tool_choice) {
    srv_request rq;
    srv_error e;
    const char *b = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":\"function\","
                    "\"function\":{\"name\":\"bash\",\"parameters\":{\"type\":\"object\"}}}],"
                    "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"bash\"}}}";
    CHECK_EQ_INT(parse(SRV_API_CHAT, b, &rq, &e), 0);
    CHECK_EQ_INT(rq.tool_choice, SRV_TOOL_NAMED);
    CHECK_STR(rq.tool_choice_name, "bash");
    CHECK_STR(rq.tools_text, "{\"name\":\"bash\",\"parameters\":{\"type\":\"object\"}}");
    CHECK(srv_tools_active(&rq));
    srv_request_free(&rq);
    CHECK_EQ_INT(parse(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"name\":\"a\"}],\"tool_choice\":\"none\"}", &rq, &e), 0);
    CHECK(!srv_tools_active(&rq));
    srv_request_free(&rq);
    CHECK_EQ_INT(parse(SRV_API_ANTHROPIC, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"name\":\"a\",\"input_schema\":{}}],"
                                          "\"tool_choice\":{\"type\":\"any\"}}", &rq, &e), 0);
    CHECK_EQ_INT(rq.tool_choice, SRV_TOOL_REQUIRED);
    srv_request_free(&rq);
    /* Responses namespace tools: rendered name = namespace + name */
    CHECK_EQ_INT(parse(SRV_API_RESPONSES, "{\"input\":\"x\",\"tools\":[{\"type\":\"namespace\",\"name\":\"fs.\","
                                          "\"tools\":[{\"name\":\"read\",\"description\":\"d\"}]}]}", &rq, &e), 0);
    CHECK_EQ_INT(rq.n_aliases, 1);
    CHECK_STR(rq.aliases[0].rendered, "fs.read");
    CHECK_STR(rq.tools_text, "{\"name\":\"fs.read\",\"description\":\"d\",\"parameters\":{\"type\":\"object\",\"properties\":{}}}");
    srv_request_free(&rq);
}

DS4_TEST(server_forced_tool_choice_must_name_a_tool) {
    const char *msg = "tool_choice names function 'rm', which is not in tools";
    CHECK(fails_with(SRV_API_CHAT,
                     "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"bash\"}}],"
                     "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"rm\"}}}",
                     400, msg));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tool_choice\":{\"type\":\"function\",\"function\":"
                                   "{\"name\":\"rm\"}}}", 400, msg));
    CHECK(fails_with(SRV_API_ANTHROPIC, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"name\":\"Bash\",\"input_schema\":{}}],"
                                        "\"tool_choice\":{\"type\":\"tool\",\"name\":\"rm\"}}", 400, msg));
    CHECK(fails_with(SRV_API_CHAT,
                     "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"a\\\"b\"}}],"
                     "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"a\\\"b\"}}}",
                     400, "tools[0]: the name is not usable (a tool needs a non-empty name without control "
                          "characters, '\"', '<', '>', '&' or '\xef\xbd\x9c')"));
    /* a long unknown name: the message is cut, not the request's memory */
    ds4_buf b = DS4_BUF_INIT;
    ds4_buf_puts(&b, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tool_choice\":{\"type\":\"tool\",\"name\":\"");
    for (int i = 0; i < 5000; i++) ds4_buf_putc(&b, 'n');
    ds4_buf_puts(&b, "\"}}");
    srv_request rq;
    srv_error e;
    CHECK(parse(SRV_API_ANTHROPIC, b.data, &rq, &e) != 0 && e.status == 400);
    CHECK(strstr(e.msg, "which is not in tools") != NULL);
    srv_request_free(&rq);
    ds4_buf_free(&b);
}

/* Forced-call candidates are sized from the name: a name or key longer than
 * any fixed buffer still yields the whole, well-formed tag. */
DS4_TEST(server_forced_long_names_are_not_truncated) {
    size_t n = 3000;
    char *name = xmalloc(n + 1);
    memset(name, 'x', n);
    name[n] = 0;
    srv_forced f;
    memset(&f, 0, sizeof f);
    f.forced_name = name;
    name_cands(&f);
    CHECK_EQ_INT(f.n_cands, 1);
    CHECK(strlen(f.cands[0].text) == n + 3 && !strncmp(f.cands[0].text, name, n) &&
          !strcmp(f.cands[0].text + n, "\">\n"));
    cands_clear(&f);
    /* tool_choice "required": the choice among the tools keeps long names */
    f.forced_name = NULL;
    f.tools = json_pack("[{s:s}, {s:s}]", "name", name, "name", "a\"b");
    name_cands(&f);
    CHECK_EQ_INT(f.n_cands, 1); /* the quoted name cannot be written */
    CHECK(strlen(f.cands[0].text) == n + 3 && f.cands[0].action == 0);
    cands_clear(&f);
    json_decref(f.tools);
    /* a long property key */
    f.props = json_object();
    json_object_set_new(f.props, name, json_pack("{s:s}", "type", "integer"));
    param_cands(&f);
    CHECK_EQ_INT(f.n_cands, 2); /* the key, and the close (nothing required) */
    const char *want_head = "<" DSML "parameter name=\"";
    const char *tag = f.cands[0].text;
    CHECK(!strncmp(tag, want_head, strlen(want_head)));
    CHECK(!strncmp(tag + strlen(want_head), name, n));
    CHECK_STR(tag + strlen(want_head) + n, "\" string=\"false\">");
    cands_clear(&f);
    json_decref(f.props);
    free(name);
}

/* ---- rendering (docs/TEXT.md B.5 examples) ---------------------------------- */

DS4_TEST(server_render_matches_text_b5) {
    char *txt = render(SRV_API_CHAT, "{\"think\":false,\"messages\":[{\"role\":\"system\",\"content\":\"You are terse.\"},"
                                   "{\"role\":\"user\",\"content\":\"Hello\"}]}", 32768);
    CHECK_STR(txt, BOS "You are terse." USER "Hello" ASST "</think>");
    free(txt);
    txt = render(SRV_API_CHAT, "{\"messages\":[{\"role\":\"system\",\"content\":\"You are terse.\"},"
                             "{\"role\":\"user\",\"content\":\"Hello\"}]}", 32768);
    CHECK_STR(txt, BOS "You are terse." USER "Hello" ASST "<think>");
    free(txt);
    /* max gated to high below 393216 tokens of context */
    txt = render(SRV_API_CHAT, "{\"reasoning_effort\":\"max\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}", 32768);
    CHECK_STR(txt, BOS USER "Hello" ASST "<think>");
    free(txt);
    txt = render(SRV_API_ANTHROPIC, "{\"system\":[{\"text\":\"A\"},{\"text\":\"x-anthropic-billing\"},\"B\"],"
                                  "\"thinking\":{\"type\":\"disabled\"},"
                                  "\"messages\":[{\"content\":\"first\",\"role\":\"user\"},"
                                  "{\"role\":\"assistant\",\"content\":[{\"type\":\"text\",\"text\":\"ans\"}]},"
                                  "{\"role\":\"user\",\"content\":\"second\"}]}", 32768);
    CHECK_STR(txt, BOS "A\nB" USER "first" ASST "</think>ans" DS4_EOS USER "second" ASST "</think>");
    free(txt);
    txt = render(SRV_API_COMPLETIONS, "{\"prompt\":[\"Hi\"],\"think\":false}", 32768);
    CHECK_STR(txt, BOS "You are a helpful assistant" USER "Hi" ASST "</think>");
    free(txt);
    txt = render(SRV_API_RESPONSES, "{\"instructions\":\"I\",\"input\":[{\"role\":\"user\",\"content\":"
                                  "[{\"type\":\"input_text\",\"text\":\"Q\"}]}],\"reasoning\":{\"effort\":\"none\"}}", 32768);
    CHECK_STR(txt, BOS "I" USER "Q" ASST "</think>");
    free(txt);
}

/* ---- error bodies -------------------------------------------------------- */

DS4_TEST(server_error_bodies) {
    srv_error e = {0};
    srv_fail(&e, 400, "missing messages");
    char *s = srv_error_body(SRV_API_CHAT, &e);
    CHECK_STR(s, "{\"error\":{\"message\":\"missing messages\",\"type\":\"invalid_request_error\","
                 "\"param\":null,\"code\":null}}");
    free(s);
    s = srv_error_body(SRV_API_ANTHROPIC, &e);
    CHECK_STR(s, "{\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"missing messages\"}}");
    free(s);
    /* the Anthropic type follows the status; OpenAI names param and code */
    srv_error e2 = {0};
    srv_fail(&e2, 401, "invalid API key");
    e2.code = "invalid_api_key";
    s = srv_error_body(SRV_API_ANTHROPIC, &e2);
    CHECK_STR(s, "{\"type\":\"error\",\"error\":{\"type\":\"authentication_error\",\"message\":\"invalid API key\"}}");
    free(s);
    s = srv_error_body(SRV_API_CHAT, &e2);
    CHECK_STR(s, "{\"error\":{\"message\":\"invalid API key\",\"type\":\"invalid_request_error\","
                 "\"param\":null,\"code\":\"invalid_api_key\"}}");
    free(s);
    srv_request rq;
    CHECK(parse(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":3}", &rq, &e2) != 0);
    srv_request_free(&rq);
    s = srv_error_body(SRV_API_CHAT, &e2);
    CHECK(strstr(s, "\"param\":\"n\",\"code\":\"unsupported_value\"") != NULL);
    free(s);
    srv_fail(&e, 400, "Prompt has 40000 tokens, but the configured context size is 32768 tokens");
    e.context = true;
    e.n_prompt = 40000;
    e.n_ctx = 32768;
    e.param = "messages";
    s = srv_error_body(SRV_API_CHAT, &e);
    CHECK_STR(s, "{\"error\":{\"message\":\"Prompt has 40000 tokens, but the configured context size is 32768 tokens\","
                 "\"type\":\"invalid_request_error\",\"param\":\"messages\",\"code\":\"context_length_exceeded\","
                 "\"n_prompt_tokens\":40000,\"n_ctx\":32768}}");
    free(s);
}

DS4_TEST(server_jstr_replaces_invalid_utf8) {
    /* one U+FFFD per maximal subpart (Unicode 3.9): a cut 3-byte sequence is
     * one, each byte that can start nothing is one */
    json_t *v = srv_jstr("a\xff" "b\xe2\x82", 5);
    CHECK(v != NULL);
    CHECK_STR(json_string_value(v), "a\xEF\xBF\xBD" "b\xEF\xBF\xBD");
    json_decref(v);
    v = srv_jstr("\xe0\x80x\xed\xa0\x80\xf4\x90\xf0\x9f\x98", 11); /* overlong, surrogate, > U+10FFFF, cut 4-byte */
    CHECK_STR(json_string_value(v), "\xEF\xBF\xBD\xEF\xBF\xBDx\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"
                                    "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
    json_decref(v);
    v = srv_jstr("\xe2\x82\xac", 3); /* the euro sign is kept */
    CHECK_STR(json_string_value(v), "\xe2\x82\xac");
    json_decref(v);
}

/* ---- SSE shapes ------------------------------------------------------------ */

static srv_job *fake_job(srv_api api, bool summary) {
    srv_job *j = srv_job_new(api);
    srv_request_init(&j->rq, api);
    j->rq.model = strdup("deepseek-v4-flash");
    j->rq.include_usage = true;
    j->rq.reasoning_summary = summary;
    j->created = 1767225600;
    snprintf(j->id, sizeof j->id, api == SRV_API_RESPONSES ? "resp_x" : "chatcmpl-7");
    return j;
}

static void fake_free(srv_job *j) { srv_job_free(j); }

/* A result with one call bash {"command":"ls"}. */
static void fake_result(srv_result *r, srv_finish f) {
    memset(r, 0, sizeof *r);
    r->finish = f;
    r->parsed.content = strdup("Let me check.");
    r->parsed.content_len = strlen(r->parsed.content);
    r->parsed.reasoning = strdup("Need a tool.");
    r->parsed.reasoning_len = strlen(r->parsed.reasoning);
    r->parsed.n_calls = 1;
    r->parsed.calls = calloc(1, sizeof *r->parsed.calls);
    r->parsed.calls[0].id = strdup("call_0123456789abcdef0123456789abcdef");
    r->parsed.calls[0].name = strdup("bash");
    r->parsed.calls[0].arguments = strdup("{\"command\": \"ls\"}");
    r->parsed.calls[0].arguments_len = strlen(r->parsed.calls[0].arguments);
    r->think_closed = true;
    r->usage.prompt = 42;
    r->usage.cached = 40;
    r->usage.completion = 9;
}

/* Splits "data: …" lines of an SSE body into parsed JSON values. */
static int sse_events(const char *s, json_t **out, int cap, char names[][48]) {
    int n = 0;
    const char *p = s;
    char pending_name[48] = "";
    while (*p && n < cap) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len > 7 && !strncmp(p, "event: ", 7)) {
            snprintf(pending_name, sizeof pending_name, "%.*s", (int)(len - 7), p + 7);
        } else if (len > 6 && !strncmp(p, "data: ", 6)) {
            if (len == 12 && !strncmp(p + 6, "[DONE]", 6)) {
                out[n] = json_string("[DONE]");
            } else {
                out[n] = json_loadb(p + 6, len - 6, 0, NULL);
            }
            if (names) snprintf(names[n], 48, "%s", pending_name);
            pending_name[0] = 0;
            n++;
        }
        p = e ? e + 1 : p + len;
    }
    return n;
}

DS4_TEST(server_sse_openai_chat_tool_stream) {
    srv_job *j = fake_job(SRV_API_CHAT, false);
    const srv_emitter *em = srv_emitter_for(SRV_API_CHAT);
    em->begin(j);
    em->reasoning(j, "Need", 4);
    em->content(j, "Let me check.", 13, NULL, 0);
    em->tool_begin(j, 0, "call_0123456789abcdef0123456789abcdef", "bash");
    j->n_tool_started = 1;
    em->tool_args(j, 0, "{", 1);
    em->tool_args(j, 0, "\"command\":\"", 11);
    em->tool_args(j, 0, "ls", 2);
    em->tool_args(j, 0, "\"}", 2);
    srv_result r;
    fake_result(&r, SRV_FINISH_TOOL_CALLS);
    em->finish(j, &r);
    json_t *ev[32];
    int n = sse_events(j->st.pending.data, ev, 32, NULL);
    CHECK_EQ_INT(n, 11);
    CHECK_STR(json_string_value(json_object_get(ev[0], "object")), "chat.completion.chunk");
    json_t *d0 = json_object_get(json_array_get(json_object_get(ev[0], "choices"), 0), "delta");
    CHECK_STR(json_string_value(json_object_get(d0, "role")), "assistant");
    /* concatenated argument fragments form the arguments JSON */
    char args[128] = "";
    for (int i = 0; i < n; i++) {
        json_t *d = json_object_get(json_array_get(json_object_get(ev[i], "choices"), 0), "delta");
        json_t *tc = json_array_get(json_object_get(d, "tool_calls"), 0);
        const char *a = json_string_value(json_object_get(json_object_get(tc, "function"), "arguments"));
        if (a) strcat(args, a);
    }
    CHECK_STR(args, "{\"command\":\"ls\"}");
    json_t *fin = json_array_get(json_object_get(ev[8], "choices"), 0);
    CHECK_STR(json_string_value(json_object_get(fin, "finish_reason")), "tool_calls");
    json_t *u = json_object_get(ev[9], "usage");
    CHECK_EQ_INT(json_integer_value(json_object_get(json_object_get(u, "prompt_tokens_details"), "cached_tokens")), 40);
    CHECK_EQ_INT(json_integer_value(json_object_get(u, "total_tokens")), 51);
    CHECK_STR(json_string_value(ev[10]), "[DONE]");
    for (int i = 0; i < n; i++) json_decref(ev[i]);
    srv_result_free(&r);
    fake_free(j);
}

DS4_TEST(server_sse_anthropic_blocks) {
    srv_job *j = fake_job(SRV_API_ANTHROPIC, false);
    const srv_emitter *em = srv_emitter_for(SRV_API_ANTHROPIC);
    j->usage.prompt = 42;
    j->usage.cached = 40;
    em->begin(j);
    em->reasoning(j, "Need a tool.", 12);
    em->content(j, "Before.", 7, NULL, 0);
    em->tool_begin(j, 0, "toolu_01", "bash");
    j->n_tool_started = 1;
    em->tool_args(j, 0, "{\"command\":\"ls\"}", 16);
    em->tool_end(j, 0);
    srv_result r;
    fake_result(&r, SRV_FINISH_TOOL_CALLS);
    em->finish(j, &r);
    json_t *ev[32];
    char names[32][48];
    int n = sse_events(j->st.pending.data, ev, 32, names);
    static const char *const want[] = {"message_start", "content_block_start", "content_block_delta",
                                       "content_block_delta", "content_block_stop", "content_block_start",
                                       "content_block_delta", "content_block_stop", "content_block_start",
                                       "content_block_delta", "content_block_stop", "message_delta",
                                       "message_stop"};
    CHECK_EQ_INT(n, 13);
    for (int i = 0; i < n; i++) {
        CHECK_STR(names[i], want[i]);
        CHECK_STR(json_string_value(json_object_get(ev[i], "type")), want[i]);
    }
    /* no cache_control in the request: the 2 new prompt tokens are input
     * (message_start and message_delta both say so); 40 were read */
    for (int k = 0; k < 2; k++) {
        json_t *usage = k == 0 ? json_object_get(json_object_get(ev[0], "message"), "usage")
                               : json_object_get(ev[11], "usage");
        CHECK_EQ_INT(json_integer_value(json_object_get(usage, "input_tokens")), 2);
        CHECK_EQ_INT(json_integer_value(json_object_get(usage, "cache_read_input_tokens")), 40);
        CHECK_EQ_INT(json_integer_value(json_object_get(usage, "cache_creation_input_tokens")), 0);
        CHECK_EQ_INT(json_integer_value(json_object_get(usage, "output_tokens")), k == 0 ? 0 : 9);
    }
    CHECK(json_is_null(json_object_get(json_object_get(ev[11], "delta"), "stop_sequence")));
    CHECK_STR(json_string_value(json_object_get(json_object_get(ev[3], "delta"), "type")), "signature_delta");
    CHECK_EQ_INT(json_integer_value(json_object_get(ev[8], "index")), 2);
    CHECK_STR(json_string_value(json_object_get(json_object_get(ev[9], "delta"), "type")), "input_json_delta");
    CHECK_STR(json_string_value(json_object_get(json_object_get(ev[11], "delta"), "stop_reason")), "tool_use");
    for (int i = 0; i < n; i++) json_decref(ev[i]);
    /* the non-streaming message carries the compact input object */
    char *body = em->body(j, &r);
    json_t *m = json_loads(body, 0, NULL);
    json_t *c = json_object_get(m, "content");
    CHECK_EQ_INT(json_array_size(c), 3);
    CHECK_STR(json_string_value(json_object_get(json_object_get(json_array_get(c, 2), "input"), "command")), "ls");
    json_decref(m);
    free(body);
    /* asked for caching: the new tokens are cache writes; a stop sequence */
    j->rq.cache_control = true;
    r.finish = SRV_FINISH_STOP;
    r.parsed.n_calls = 0;
    r.stop = "END";
    body = em->body(j, &r);
    m = json_loads(body, 0, NULL);
    json_t *u = json_object_get(m, "usage");
    CHECK_EQ_INT(json_integer_value(json_object_get(u, "input_tokens")), 0);
    CHECK_EQ_INT(json_integer_value(json_object_get(u, "cache_creation_input_tokens")), 2);
    CHECK_STR(json_string_value(json_object_get(m, "stop_reason")), "stop_sequence");
    CHECK_STR(json_string_value(json_object_get(m, "stop_sequence")), "END");
    json_decref(m);
    free(body);
    r.parsed.n_calls = 1;
    srv_result_free(&r);
    fake_free(j);
}

/* A tool argument holding invalid UTF-8 (random or cut model output) still
 * reaches the client: as a U+FFFD-repaired string, never as an empty input
 * object (the Anthropic input is a parsed object, unlike OpenAI's string). */
DS4_TEST(server_anthropic_tool_input_with_invalid_utf8) {
    srv_job *j = fake_job(SRV_API_ANTHROPIC, false);
    srv_result r;
    fake_result(&r, SRV_FINISH_TOOL_CALLS);
    free(r.parsed.calls[0].arguments);
    r.parsed.calls[0].arguments = strdup("{\"command\": \"ls \xe4\xb8\"}");
    r.parsed.calls[0].arguments_len = strlen(r.parsed.calls[0].arguments);
    char *body = srv_emitter_for(SRV_API_ANTHROPIC)->body(j, &r);
    json_t *m = json_loads(body, 0, NULL);
    json_t *c = json_object_get(m, "content");
    json_t *in = json_object_get(json_array_get(c, json_array_size(c) - 1), "input");
    CHECK_STR(json_string_value(json_object_get(in, "command")), "ls \xef\xbf\xbd"); /* one per maximal subpart */
    json_decref(m);
    free(body);
    srv_result_free(&r);
    fake_free(j);
}

DS4_TEST(server_sse_responses_sequence) {
    srv_job *j = fake_job(SRV_API_RESPONSES, true);
    const srv_emitter *em = srv_emitter_for(SRV_API_RESPONSES);
    em->begin(j);
    em->reasoning(j, "Need a tool.", 12);
    em->content(j, "Let me check.", 13, NULL, 0);
    srv_result r;
    fake_result(&r, SRV_FINISH_TOOL_CALLS);
    em->finish(j, &r);
    json_t *ev[64];
    int n = sse_events(j->st.pending.data, ev, 64, NULL);
    CHECK(n >= 14);
    for (int i = 0; i < n; i++) {
        /* "type" first, then "sequence_number" = i */
        void *it = json_object_iter(ev[i]);
        CHECK_STR(json_object_iter_key(it), "type");
        CHECK_STR(json_object_iter_key(json_object_iter_next(ev[i], it)), "sequence_number");
        CHECK_EQ_INT(json_integer_value(json_object_get(ev[i], "sequence_number")), i);
    }
    CHECK_STR(json_string_value(json_object_get(ev[0], "type")), "response.created");
    CHECK_STR(json_string_value(json_object_get(ev[n - 1], "type")), "response.completed");
    json_t *out = json_object_get(json_object_get(ev[n - 1], "response"), "output");
    CHECK_EQ_INT(json_array_size(out), 3);
    CHECK_STR(json_string_value(json_object_get(json_array_get(out, 2), "arguments")), "{\"command\":\"ls\"}");
    for (int i = 0; i < n; i++) json_decref(ev[i]);
    srv_result_free(&r);
    fake_free(j);
}

/* ---- live bindings (docs/SERVING.md C.3): the visible text of a turn must be a
 * prefix of what the renderer produces for the client's next request ------ */

static char *render_rq(srv_api api, const char *body, ds4_dsml_replay *replay, srv_request *rq) {
    srv_error e;
    if (parse(api, body, rq, &e) || srv_render(rq, 32768, replay, &e)) return NULL;
    return rq->text;
}

DS4_TEST(server_thinking_binding_visible_text_prefixes_next_turn) {
    srv_request rq1, rq2;
    CHECK(render_rq(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"first\"}]}", NULL, &rq1));
    srv_result r = {0};
    r.finish = SRV_FINISH_STOP;
    r.think_closed = true;
    r.parsed.content = strdup("answer");
    r.parsed.content_len = 6;
    r.parsed.reasoning = strdup("thought");
    r.parsed.reasoning_len = 7;
    CHECK_EQ_INT(srv_binding_kind(&rq1, &r, 32768, false), SRV_BIND_THINKING);
    CHECK_EQ_INT(srv_binding_kind(&rq1, &r, 32768, true), SRV_BIND_NONE); /* stop-sequence cut */
    size_t vl = 0;
    char *vis = srv_visible_text(&rq1, &r, SRV_BIND_THINKING, 32768, &vl);
    CHECK_STR(vis, BOS USER "first" ASST "</think>answer" DS4_EOS);
    const char *t2 = render_rq(SRV_API_CHAT,
                               "{\"messages\":[{\"role\":\"user\",\"content\":\"first\"},"
                               "{\"role\":\"assistant\",\"content\":\"answer\",\"reasoning_content\":\"thought\"},"
                               "{\"role\":\"user\",\"content\":\"second\"}]}", NULL, &rq2);
    CHECK(t2 && strlen(t2) > vl && !memcmp(t2, vis, vl));
    /* a turn cut by length, or with tools, sets no thinking binding */
    r.finish = SRV_FINISH_LENGTH;
    CHECK_EQ_INT(srv_binding_kind(&rq1, &r, 32768, false), SRV_BIND_NONE);
    free(vis);
    srv_result_free(&r);
    srv_request_free(&rq1);
    srv_request_free(&rq2);
}

DS4_TEST(server_responses_binding_visible_text_prefixes_tool_output_turn) {
    static const char *const efforts[] = {"none", "high"};
    for (int k = 0; k < 2; k++) {
        char b1[512], b2[1024];
        const char *tools = "[{\"type\":\"function\",\"name\":\"bash\",\"parameters\":{\"type\":\"object\"}}]";
        snprintf(b1, sizeof b1, "{\"input\":\"list\",\"tools\":%s,\"reasoning\":{\"effort\":\"%s\"}}", tools, efforts[k]);
        srv_request rq1, rq2;
        CHECK(render_rq(SRV_API_RESPONSES, b1, NULL, &rq1));
        srv_result r = {0};
        r.finish = SRV_FINISH_TOOL_CALLS;
        r.parsed.content = strdup("");
        r.parsed.n_calls = 1;
        r.parsed.calls = calloc(1, sizeof *r.parsed.calls);
        r.parsed.calls[0].id = strdup("call_00000000000000000000000000000001");
        r.parsed.calls[0].name = strdup("bash");
        r.parsed.calls[0].arguments = strdup("{\"command\": \"ls\"}");
        r.parsed.calls[0].arguments_len = strlen(r.parsed.calls[0].arguments);
        ds4_buf blk = DS4_BUF_INIT;
        CHECK_EQ_INT(ds4_dsml_render_calls(&blk, r.parsed.calls, 1), 0);
        r.parsed.raw_dsml = ds4_buf_detach(&blk, &r.parsed.raw_dsml_len);
        CHECK_EQ_INT(srv_binding_kind(&rq1, &r, 32768, false), SRV_BIND_RESPONSES);
        size_t vl = 0;
        char *vis = srv_visible_text(&rq1, &r, SRV_BIND_RESPONSES, 32768, &vl);
        ds4_dsml_replay *rp = ds4_dsml_replay_new(0, 0);
        const char *ids[1] = {r.parsed.calls[0].id};
        CHECK_EQ_INT(ds4_dsml_replay_put(rp, ids, 1, r.parsed.raw_dsml, r.parsed.raw_dsml_len, NULL), 0);
        snprintf(b2, sizeof b2,
                 "{\"input\":[{\"role\":\"user\",\"content\":\"list\"},"
                 "{\"type\":\"function_call\",\"call_id\":\"%s\",\"name\":\"bash\",\"arguments\":\"{\\\"command\\\":\\\"ls\\\"}\"},"
                 "{\"type\":\"function_call_output\",\"call_id\":\"%s\",\"output\":\"a.txt\"}],"
                 "\"tools\":%s,\"reasoning\":{\"effort\":\"%s\"}}",
                 ids[0], ids[0], tools, efforts[k]);
        const char *t2 = render_rq(SRV_API_RESPONSES, b2, rp, &rq2);
        CHECK_MSG(t2 && strlen(t2) > vl && !memcmp(t2, vis, vl), "effort %s:\nvisible %s\nnext    %s",
                  efforts[k], vis, t2 ? t2 : "(null)");
        free(vis);
        ds4_dsml_replay_free(rp);
        srv_result_free(&r);
        srv_request_free(&rq1);
        srv_request_free(&rq2);
    }
}

/* Exact replay (TEXT C.8) brings the remembered block only for the calls it
 * holds: a client that re-serializes the arguments (member order, spaces,
 * escapes, 2 as 2.0) still gets it, one that edited an argument or the name gets the
 * canonical rendering of what it sent (the model reads the calls the client
 * says were made). */
DS4_TEST(server_exact_replay_only_for_the_calls_the_block_holds) {
    ds4_tool_call blk_calls[1] = {{NULL, "bash", "{\"n\": 2, \"command\": \"ls\"}", 0}};
    blk_calls[0].arguments_len = strlen(blk_calls[0].arguments);
    ds4_buf blk = DS4_BUF_INIT;
    CHECK_EQ_INT(ds4_dsml_render_calls(&blk, blk_calls, 1), 0);
    CHECK(ds4_buf_ok(&blk));
    ds4_dsml_replay *rp = ds4_dsml_replay_new(0, 0);
    const char *id = "call_00000000000000000000000000000007";
    CHECK_EQ_INT(ds4_dsml_replay_put(rp, &id, 1, blk.data, blk.len, NULL), 0);
    static const struct {
        const char *name, *args; /* the args as a JSON string literal's body */
        int replayed;
    } cases[] = {
        {"bash", "{\\\"n\\\":2,\\\"command\\\":\\\"ls\\\"}", 1},           /* as sent to the client */
        {"bash", "{\\\"command\\\": \\\"ls\\\", \\\"n\\\": 2}", 1},        /* members reordered, spaced */
        {"bash", "{\\\"n\\\":2,\\\"command\\\":\\\"\\\\u006cs\\\"}", 1},    /* an escape for l */
        {"bash", "{\\\"n\\\":2.0,\\\"command\\\":\\\"ls\\\"}", 1},          /* 2 written as a real */
        {"bash", "{\\\"n\\\":2e0,\\\"command\\\":\\\"ls\\\"}", 1},
        {"bash", "{\\\"n\\\":2,\\\"command\\\":\\\"rm -rf /\\\"}", 0},     /* an edited argument */
        {"bash", "{\\\"n\\\":3,\\\"command\\\":\\\"ls\\\"}", 0},
        {"bash", "{\\\"n\\\":2,\\\"command\\\":\\\"ls\\\",\\\"x\\\":1}", 0}, /* one more */
        {"bash", "{\\\"n\\\":2}", 0},                                       /* one fewer */
        {"sh", "{\\\"n\\\":2,\\\"command\\\":\\\"ls\\\"}", 0},             /* another tool */
        {"bash", "not json", 0},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char body[1024];
        snprintf(body, sizeof body,
                 "{\"messages\":[{\"role\":\"user\",\"content\":\"list\"},"
                 "{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"id\":\"%s\",\"type\":\"function\","
                 "\"function\":{\"name\":\"%s\",\"arguments\":\"%s\"}}]},"
                 "{\"role\":\"tool\",\"tool_call_id\":\"%s\",\"content\":\"a.txt\"}],"
                 "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"bash\",\"parameters\":{\"type\":\"object\"}}}]}",
                 id, cases[k].name, cases[k].args, id);
        srv_request rq;
        const char *txt = render_rq(SRV_API_CHAT, body, rp, &rq);
        CHECK_MSG(txt, "case %zu", k);
        if (!txt) continue;
        const bool has_blk = strstr(txt, blk.data) != NULL;
        CHECK_MSG(has_blk == (cases[k].replayed != 0), "case %zu (%s): block %s in\n%s", k, cases[k].args,
                  has_blk ? "replayed" : "not replayed", txt);
        if (!cases[k].replayed) { /* the canonical rendering of what the client sent */
            srv_request rq0;
            const char *canon = render_rq(SRV_API_CHAT, body, NULL, &rq0);
            CHECK_MSG(canon && !strcmp(canon, txt), "case %zu:\n%s\nvs\n%s", k, txt, canon ? canon : "(null)");
            srv_request_free(&rq0);
        }
        srv_request_free(&rq);
    }
    ds4_dsml_replay_free(rp);
    ds4_buf_free(&blk);
}

/* The same rule for arguments the comparison must read as the client got
 * them: a custom tool's input is the model's undecoded text (Responses
 * custom_tool_call), a NUL escape, integers beyond 64 bits by their digits. */
DS4_TEST(server_exact_replay_reads_arguments_as_sent) {
    static const char custom_blk[] = "\n\n<" DS4_DSML_MARK "tool_calls>\n<" DS4_DSML_MARK "invoke name=\"apply_patch\">\n<"
                                     DS4_DSML_MARK "parameter name=\"input\" string=\"true\">a &amp; b</" DS4_DSML_MARK
                                     "parameter>\n</" DS4_DSML_MARK "invoke>\n</" DS4_DSML_MARK "tool_calls>";
    static const struct {
        srv_api api;
        const char *blk_args; /* NULL: custom_blk */
        const char *call;     /* the request's call (Responses, %s = id) or arguments (chat, escaped) */
        int replayed;
    } cases[] = {
        {SRV_API_RESPONSES, NULL, "{\"type\":\"custom_tool_call\",\"call_id\":\"%s\",\"name\":\"apply_patch\",\"input\":\"a &amp; b\"}", 1},
        {SRV_API_RESPONSES, NULL, "{\"type\":\"custom_tool_call\",\"call_id\":\"%s\",\"name\":\"apply_patch\",\"input\":\"a &amp; c\"}", 0},
        {SRV_API_CHAT, "{\"x\": \"a\\u0000b\"}", "{\\\"x\\\":\\\"a\\\\u0000b\\\"}", 1},
        {SRV_API_CHAT, "{\"x\": \"a\\u0000b\"}", "{\\\"x\\\":\\\"a\\\\u0000c\\\"}", 0},
        {SRV_API_CHAT, "{\"n\": 12345678901234567890}", "{\\\"n\\\":12345678901234567890}", 1},
        {SRV_API_CHAT, "{\"n\": 12345678901234567890}", "{\\\"n\\\":12345678901234567891}", 0},
        {SRV_API_CHAT, "{\"n\": 9007199254740993}", "{\\\"n\\\":9007199254740992}", 0},
    };
    const char *id = "call_00000000000000000000000000000009";
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        ds4_buf blk = DS4_BUF_INIT;
        if (cases[k].blk_args) {
            ds4_tool_call bc = {NULL, "f", (char *)cases[k].blk_args, strlen(cases[k].blk_args)};
            CHECK_EQ_INT(ds4_dsml_render_calls(&blk, &bc, 1), 0);
        } else {
            ds4_buf_append(&blk, custom_blk, sizeof custom_blk - 1);
        }
        CHECK(ds4_buf_ok(&blk));
        ds4_dsml_replay *rp = ds4_dsml_replay_new(0, 0);
        CHECK_EQ_INT(ds4_dsml_replay_put(rp, &id, 1, blk.data, blk.len, NULL), 0);
        char call[512], body[2048];
        if (cases[k].api == SRV_API_RESPONSES) {
            snprintf(call, sizeof call, cases[k].call, id);
            snprintf(body, sizeof body,
                     "{\"input\":[{\"role\":\"user\",\"content\":\"patch\"},%s,"
                     "{\"type\":\"custom_tool_call_output\",\"call_id\":\"%s\",\"output\":\"ok\"}],"
                     "\"tools\":[{\"type\":\"custom\",\"name\":\"apply_patch\"}]}", call, id);
        } else {
            snprintf(body, sizeof body,
                     "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},"
                     "{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"id\":\"%s\",\"type\":\"function\","
                     "\"function\":{\"name\":\"f\",\"arguments\":\"%s\"}}]},"
                     "{\"role\":\"tool\",\"tool_call_id\":\"%s\",\"content\":\"ok\"}],"
                     "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{\"type\":\"object\"}}}]}",
                     id, cases[k].call, id);
        }
        srv_request rq;
        srv_error e;
        const int prc = parse(cases[k].api, body, &rq, &e);
        CHECK_MSG(!prc && !srv_render(&rq, 32768, rp, &e), "case %zu: %s", k, e.msg);
        const char *txt = rq.text;
        const bool has_blk = txt && memmem(txt, rq.text_len, blk.data, blk.len) != NULL; /* may hold a NUL */
        CHECK_MSG(has_blk == (cases[k].replayed != 0), "case %zu: block %s in\n%s", k,
                  has_blk ? "replayed" : "not replayed", txt);
        srv_request_free(&rq);
        ds4_dsml_replay_free(rp);
        ds4_buf_free(&blk);
    }
}

/* Claude Code answers parallel calls with one user message of several
 * tool_result blocks: the tail (C.2 rules 2-3) answers all of their ids, not
 * only the last block's, so the live binding of the turn's calls matches. */
DS4_TEST(server_anthropic_tail_answers_every_tool_result_of_a_message) {
    const char *body =
        "{\"max_tokens\":8,\"messages\":[{\"role\":\"user\",\"content\":\"go\"},"
        "{\"role\":\"assistant\",\"content\":[{\"type\":\"tool_use\",\"id\":\"toolu_a\",\"name\":\"f\",\"input\":{}},"
        "{\"type\":\"tool_use\",\"id\":\"toolu_b\",\"name\":\"f\",\"input\":{\"x\":1}}]},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\",\"tool_use_id\":\"toolu_a\",\"content\":\"A\"},"
        "{\"type\":\"tool_result\",\"tool_use_id\":\"toolu_b\",\"content\":\"B\"}]}],"
        "\"tools\":[{\"name\":\"f\",\"input_schema\":{\"type\":\"object\"}}]}";
    srv_request rq;
    srv_error e;
    CHECK_MSG(!parse(SRV_API_ANTHROPIC, body, &rq, &e) && !srv_render(&rq, 32768, NULL, &e) &&
                  !srv_render_tail(&rq, 32768, &e), "%s", e.msg);
    CHECK_EQ_INT(rq.n_tail_ids, 2);
    CHECK(!strcmp(rq.tail_ids[0], "toolu_a") && !strcmp(rq.tail_ids[1], "toolu_b"));
    CHECK(strstr(rq.tail_text, DS4_TOOL_RESULT_OPEN "A" DS4_TOOL_RESULT_CLOSE DS4_TOOL_RESULT_OPEN "B"));
    srv_request_free(&rq);
}

/* ---- logit_bias and penalties ------------------------------------------- */

DS4_TEST(server_logit_bias_and_penalties) {
    srv_request rq;
    srv_error e;
    CHECK(!parse(SRV_API_CHAT,
                 "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logit_bias\":{\"2\":-100,\"0\":5.5},"
                 "\"presence_penalty\":0.5,\"frequency_penalty\":-1.25}",
                 &rq, &e));
    CHECK_EQ_INT(rq.n_bias, 2);
    float logits[4] = {1.0f, 2.0f, 3.0f, 4.0f}, out[4];
    int32_t counts[4] = {0, 2, 1, 0};
    const float *a = adjust_logits(out, 4, &rq, logits, counts, 3);
    /* l + bias - count * frequency - (count > 0) * presence, in float */
    CHECK(a[0] == 1.0f + 5.5f);
    CHECK(a[1] == 2.0f - (2.0f * -1.25f + 0.5f));
    CHECK(a[2] == (3.0f - 100.0f) - (1.0f * -1.25f + 0.5f));
    CHECK(a[3] == 4.0f);
    a = adjust_logits(out, 4, &rq, logits, NULL, 3); /* no penalties: the bias only */
    CHECK(a[1] == 2.0f && a[2] == 3.0f - 100.0f);
    CHECK(a[3] == 4.0f); /* EOS (3) kept without ignore_eos */
    srv_request_free(&rq);
    /* ignore_eos: the end token is never sampled, whatever its bias */
    CHECK(!parse(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logit_bias\":{\"3\":100},"
                 "\"ignore_eos\":true}", &rq, &e));
    CHECK(rq.ignore_eos);
    a = adjust_logits(out, 4, &rq, logits, NULL, 3);
    CHECK(a[3] == -INFINITY && a[0] == 1.0f && a[2] == 3.0f);
    srv_request_free(&rq);
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[],\"ignore_eos\":1}", 400,
                     "invalid JSON request: ignore_eos must be true or false"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[],\"logit_bias\":{\"-1\":1}}", 400, "logit_bias: '-1' is not a token id"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[],\"logit_bias\":{\"05\":1}}", 400, "logit_bias: '05' is not a token id"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[],\"logit_bias\":{\"12345678901\":1}}", 400,
                     "logit_bias: '12345678901' is not a token id"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[],\"logit_bias\":{\"7\":\"5\"}}", 400,
                     "logit_bias: the bias of token 7 must be a number between -100 and 100"));
    CHECK(fails_with(SRV_API_CHAT, "{\"messages\":[],\"logit_bias\":[1]}", 400,
                     "logit_bias must be an object of token ids to biases"));
    CHECK(fails_with(SRV_API_COMPLETIONS, "{\"prompt\":\"x\",\"presence_penalty\":2.5}", 400,
                     "presence_penalty must be between -2 and 2"));
}

DS4_TEST(server_think_tag_as_text_keeps_its_tail) {
    /* a "</think>" completed inside a token: the bytes after it are content */
    ds4_buf g = DS4_BUF_INIT;
    ds4_buf_puts(&g, "reasoning </think");
    const char *tail = NULL;
    size_t n = 0;
    CHECK(think_tail_bytes(&g, ">\"", 2, &tail, &n));
    CHECK(n == 1 && tail[0] == '"');
    CHECK(!think_tail_bytes(&g, ">", 1, &tail, &n)); /* the tag ends the token: no tail */
    CHECK(!think_tail_bytes(&g, "x>", 2, &tail, &n));
    ds4_buf_truncate(&g, 0);
    ds4_buf_puts(&g, "abc");
    CHECK(think_tail_bytes(&g, "</think>{true", 13, &tail, &n));
    CHECK(n == 5 && !memcmp(tail, "{true", 5));
    ds4_buf_truncate(&g, 0);
    CHECK(think_tail_bytes(&g, "</think> ", 9, &tail, &n) && n == 1);
    ds4_buf_free(&g);
}
