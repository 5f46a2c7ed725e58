/* test_chat.c - byte-exact golden tests of the chat template (docs/TEXT.md §B)
 * and of the prompt pieces from §C it embeds.
 *
 * Expected strings are written here as literal UTF-8 text copied from the
 * spec's examples (the markers typed as characters, not built from the
 * library's macros), and the long fixed texts are checked by the length and
 * SHA-1 the spec states, so nothing expected is derived from the code under
 * test.
 */
#include "test.h"

#include <openssl/evp.h>
#include <stdlib.h>

#include "chat.h"
#include "dsml.h"

static void sha1_hex(const void *p, size_t n, char out[41]) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_Digest(p, n, md, &len, EVP_sha1(), NULL);
    for (unsigned i = 0; i < len && i < 20; i++) sprintf(out + 2 * i, "%02x", md[i]);
    out[40] = '\0';
}

/* Renders c and compares with want; on mismatch reports the first
 * differing offset. */
#define CHECK_RENDER(c, replay, want)                                              \
    do {                                                                           \
        ds4_buf o_ = DS4_BUF_INIT;                                                 \
        ds4_err e_ = {0};                                                          \
        CHECK_EQ_INT(ds4_chat_render((c), (replay), &o_, &e_), 0);                 \
        const char *w_ = (want);                                                   \
        size_t wl_ = strlen(w_), k_ = 0;                                           \
        while (k_ < wl_ && k_ < o_.len && o_.data[k_] == w_[k_]) k_++;             \
        if (o_.len != wl_ || k_ != wl_) {                                          \
            TEST_FAIL("render differs at byte %zu (got %zu bytes, want %zu): got "  \
                      "\"%.60s\" want \"%.60s\"", k_, o_.len, wl_,                 \
                      o_.data ? o_.data + k_ : "", w_ + k_);                       \
        }                                                                          \
        ds4_buf_free(&o_);                                                         \
    } while (0)

#define BOS "<｜begin▁of▁sentence｜>"
#define EOS "<｜end▁of▁sentence｜>"
#define USER "<｜User｜>"
#define ASSIST "<｜Assistant｜>"

DS4_TEST(chat_markers_are_the_spec_bytes) {
    CHECK_STR(DS4_BOS, BOS);
    CHECK_STR(DS4_EOS, EOS);
    CHECK_STR(DS4_USER, USER);
    CHECK_STR(DS4_ASSISTANT, ASSIST);
    CHECK_STR(DS4_DSML_MARK, "｜DSML｜");
    /* U+FF5C is EF BD 9C, U+2581 is E2 96 81 (docs/TEXT.md conventions) */
    CHECK(memcmp(DS4_BOS, "<\xef\xbd\x9c" "begin\xe2\x96\x81", 10) == 0);
}

DS4_TEST(chat_think_max_prefix_sha1) {
    char h[41];
    CHECK_EQ_INT(ds4_chat_max_prefix_len, 476);
    sha1_hex(ds4_chat_max_prefix, ds4_chat_max_prefix_len, h);
    CHECK_STR(h, "bed6f7c6d90743ed442f3da80117db88a8fc16a6");
    CHECK(memcmp(ds4_chat_max_prefix + 476 - 2, "\n\n", 2) == 0);
}

DS4_TEST(chat_tools_prompt_head_tail_sha1) {
    ds4_buf o = DS4_BUF_INIT;
    CHECK_EQ_INT(ds4_dsml_tools_prompt(&o, "", 0), 0);
    CHECK_EQ_INT(o.len, 1183 + 146);
    char h[41];
    sha1_hex(o.data, 1183, h);
    CHECK_STR(h, "a1799c665cc488953159d077e5aa5cc7f4ee1218");
    sha1_hex(o.data + 1183, 146, h);
    CHECK_STR(h, "ebfe73f1c2b10a58c2e5ef37bbd4bc5d21f770b0");
    /* schema lines go verbatim between head and tail */
    ds4_buf_reset(&o);
    const char *lines = "{\"name\":\"a\"}\n{ \"name\" : \"b\" }";
    ds4_dsml_tools_prompt(&o, lines, strlen(lines));
    CHECK(memcmp(o.data + 1183, lines, strlen(lines)) == 0);
    CHECK(o.data[o.len - 1] == '.');
    ds4_buf_free(&o);
}

static ds4_chat *mk(ds4_think mode, int64_t ctx) {
    ds4_chat *c = ds4_chat_new();
    ds4_chat_set_think(c, mode, ctx);
    return c;
}

static int add(ds4_chat *c, ds4_role r, const char *s) { return ds4_chat_add(c, r, s, strlen(s), NULL); }

DS4_TEST(chat_b5_non_thinking_system_user) {
    ds4_chat *c = mk(DS4_THINK_NONE, 4096);
    add(c, DS4_ROLE_SYSTEM, "You are terse.");
    add(c, DS4_ROLE_USER, "Hello");
    CHECK_RENDER(c, NULL, BOS "You are terse." USER "Hello" ASSIST "</think>");
    ds4_chat_free(c);
}

DS4_TEST(chat_b5_thinking_default) {
    ds4_chat *c = ds4_chat_new(); /* default mode is high */
    add(c, DS4_ROLE_SYSTEM, "You are terse.");
    add(c, DS4_ROLE_USER, "Hello");
    CHECK_RENDER(c, NULL, BOS "You are terse." USER "Hello" ASSIST "<think>");
    ds4_chat_free(c);
}

static char *with_max(const char *after_bos) {
    size_t n = strlen(BOS) + ds4_chat_max_prefix_len + strlen(after_bos) + 1;
    char *s = malloc(n);
    snprintf(s, n, "%s%s%s", BOS, ds4_chat_max_prefix, after_bos);
    return s;
}

DS4_TEST(chat_b5_think_max_only_with_large_context) {
    ds4_chat *c = mk(DS4_THINK_MAX, 393216);
    add(c, DS4_ROLE_SYSTEM, "You are terse.");
    add(c, DS4_ROLE_USER, "Hello");
    char *want = with_max("You are terse." USER "Hello" ASSIST "<think>");
    CHECK_RENDER(c, NULL, want);
    free(want);
    /* one token short of 384 Ki: max silently becomes high */
    ds4_chat_set_think(c, DS4_THINK_MAX, 393215);
    CHECK_RENDER(c, NULL, BOS "You are terse." USER "Hello" ASSIST "<think>");
    ds4_chat_set_think(c, DS4_THINK_MAX, 0);
    CHECK_RENDER(c, NULL, BOS "You are terse." USER "Hello" ASSIST "<think>");
    CHECK_EQ_INT(ds4_chat_effective_think(DS4_THINK_MAX, 393216), DS4_THINK_MAX);
    CHECK_EQ_INT(ds4_chat_effective_think(DS4_THINK_MAX, 393215), DS4_THINK_HIGH);
    CHECK_EQ_INT(ds4_chat_effective_think(DS4_THINK_NONE, 1 << 20), DS4_THINK_NONE);
    ds4_chat_free(c);
}

DS4_TEST(chat_b5_multiturn_old_reasoning_dropped) {
    ds4_chat *c = mk(DS4_THINK_HIGH, 4096);
    add(c, DS4_ROLE_USER, "first");
    int a = add(c, DS4_ROLE_ASSISTANT, "first answer");
    ds4_chat_add_reasoning(c, a, "old thoughts", 12, NULL);
    add(c, DS4_ROLE_USER, "second");
    CHECK_RENDER(c, NULL,
                 BOS USER "first" ASSIST "</think>first answer" EOS USER "second" ASSIST "<think>");
    ds4_chat_free(c);
}

DS4_TEST(chat_last_assistant_keeps_reasoning_and_is_left_open) {
    /* the assistant after the last user message keeps its reasoning; a final
     * assistant message without calls is a prefill: no EOS, no generation
     * prefix, the reply continues it (ds4_chat_continues) */
    ds4_chat *c = mk(DS4_THINK_HIGH, 4096);
    add(c, DS4_ROLE_USER, "q");
    int a = add(c, DS4_ROLE_ASSISTANT, "ans");
    ds4_chat_add_reasoning(c, a, "why", 3, NULL);
    CHECK(ds4_chat_continues(c));
    CHECK_RENDER(c, NULL, BOS USER "q" ASSIST "<think>why</think>ans");
    /* empty reasoning still opens and closes the block */
    ds4_chat *d = mk(DS4_THINK_HIGH, 4096);
    add(d, DS4_ROLE_USER, "q");
    add(d, DS4_ROLE_ASSISTANT, "ans");
    CHECK_RENDER(d, NULL, BOS USER "q" ASSIST "<think></think>ans");
    /* mode none: never a reasoning block */
    ds4_chat_set_think(c, DS4_THINK_NONE, 4096);
    CHECK_RENDER(c, NULL, BOS USER "q" ASSIST "</think>ans");
    /* with a tool call the turn is complete: EOS, not a prefill */
    ds4_chat_add_call(d, 1, "call_1", "f", "{}", 2, NULL);
    CHECK(!ds4_chat_continues(d));
    ds4_chat_free(c);
    ds4_chat_free(d);
    /* only system text: an empty user turn and the generation prefix */
    ds4_chat *e = mk(DS4_THINK_NONE, 4096);
    add(e, DS4_ROLE_SYSTEM, "S");
    CHECK(!ds4_chat_continues(e));
    CHECK_RENDER(e, NULL, BOS "S" USER ASSIST "</think>");
    ds4_chat_free(e);
}

DS4_TEST(chat_system_and_developer_merged_wherever_they_appear) {
    ds4_chat *c = mk(DS4_THINK_NONE, 4096);
    add(c, DS4_ROLE_USER, "u1");
    add(c, DS4_ROLE_SYSTEM, "S1");
    add(c, DS4_ROLE_DEVELOPER, "");
    add(c, DS4_ROLE_DEVELOPER, "D2");
    add(c, DS4_ROLE_OTHER, "dropped");
    CHECK_RENDER(c, NULL, BOS "S1\n\n\n\nD2" USER "u1" ASSIST "</think>");
    ds4_chat_free(c);
    /* an empty first system text does not produce a separator */
    c = mk(DS4_THINK_NONE, 4096);
    add(c, DS4_ROLE_SYSTEM, "");
    add(c, DS4_ROLE_SYSTEM, "x");
    add(c, DS4_ROLE_USER, "u");
    CHECK_RENDER(c, NULL, BOS "x" USER "u" ASSIST "</think>");
    ds4_chat_free(c);
}

DS4_TEST(chat_assistant_without_pending_user_gets_no_prefix) {
    ds4_chat *c = mk(DS4_THINK_HIGH, 4096);
    add(c, DS4_ROLE_ASSISTANT, "A0");
    add(c, DS4_ROLE_USER, "u");
    add(c, DS4_ROLE_ASSISTANT, "A1");
    add(c, DS4_ROLE_ASSISTANT, "A2");
    CHECK_RENDER(c, NULL, BOS "A0" EOS USER "u" ASSIST "<think></think>A1" EOS "A2"); /* A2: a prefill */
    ds4_chat_free(c);
}

#define TOOLS_TAIL_TXT                                                                 \
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to " \
    "invoke tool calls. Use the exact parameter names from the schemas."

DS4_TEST(chat_b5_tool_loop_thinking) {
    const char *schema = "{\"name\":\"bash\",\"parameters\":{\"type\":\"object\"}}";
    ds4_chat *c = mk(DS4_THINK_HIGH, 4096);
    ds4_chat_set_tools(c, schema, strlen(schema), NULL);
    add(c, DS4_ROLE_SYSTEM, "Be brief.");
    add(c, DS4_ROLE_USER, "List files");
    int a = add(c, DS4_ROLE_ASSISTANT, "");
    ds4_chat_add_reasoning(c, a, "need a tool", 11, NULL);
    ds4_chat_add_call(c, a, "call_1", "bash", "{\"command\":\"ls\"}", 16, NULL);
    int tm = add(c, DS4_ROLE_TOOL, "a.txt\n");
    ds4_chat_set_tool_call_id(c, tm, "call_1", NULL);

    /* expected: BOS + head (SHA-checked above) + schema + tail + ... */
    ds4_buf head = DS4_BUF_INIT;
    ds4_dsml_tools_prompt(&head, "", 0);
    ds4_buf want = DS4_BUF_INIT;
    ds4_buf_puts(&want, BOS);
    ds4_buf_append(&want, head.data, 1183);
    ds4_buf_puts(&want, schema);
    ds4_buf_puts(&want,
                 TOOLS_TAIL_TXT "\n\nBe brief." USER "List files" ASSIST
                 "<think>need a tool</think>\n\n<｜DSML｜tool_calls>\n"
                 "<｜DSML｜invoke name=\"bash\">\n"
                 "<｜DSML｜parameter name=\"command\" string=\"true\">ls</｜DSML｜parameter>\n"
                 "</｜DSML｜invoke>\n"
                 "</｜DSML｜tool_calls>" EOS USER "<tool_result>a.txt\n</tool_result>" ASSIST
                 "<think>");
    CHECK_RENDER(c, NULL, want.data);
    ds4_buf_free(&head);
    ds4_buf_free(&want);
    ds4_chat_free(c);
}

DS4_TEST(chat_tool_context_from_history_keeps_old_reasoning) {
    /* no tools active, but the history holds a call and a result: every
     * assistant turn keeps its reasoning */
    ds4_chat *c = mk(DS4_THINK_HIGH, 4096);
    add(c, DS4_ROLE_USER, "u1");
    int a = add(c, DS4_ROLE_ASSISTANT, "");
    ds4_chat_add_reasoning(c, a, "r1", 2, NULL);
    ds4_chat_add_call(c, a, NULL, "f", "{}", 2, NULL);
    add(c, DS4_ROLE_TOOL, "R1");
    add(c, DS4_ROLE_FUNCTION, "R2</tool_result>x");
    int b = add(c, DS4_ROLE_ASSISTANT, "done");
    ds4_chat_add_reasoning(c, b, "r2", 2, NULL);
    add(c, DS4_ROLE_USER, "u2");
    CHECK(ds4_chat_tool_context(c));
    CHECK_RENDER(c, NULL,
                 BOS USER "u1" ASSIST "<think>r1</think>\n\n<｜DSML｜tool_calls>\n"
                 "<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" EOS
                 USER "<tool_result>R1</tool_result><tool_result>R2&lt;/tool_result>x</tool_result>"
                 ASSIST "<think>r2</think>done" EOS USER "u2" ASSIST "<think>");
    ds4_chat_free(c);
}

DS4_TEST(chat_user_after_tool_result_opens_new_turn) {
    ds4_chat *c = mk(DS4_THINK_NONE, 4096);
    add(c, DS4_ROLE_USER, "u");
    add(c, DS4_ROLE_TOOL, "r");
    add(c, DS4_ROLE_USER, "more");
    add(c, DS4_ROLE_TOOL, "r2");
    CHECK_RENDER(c, NULL,
                 BOS USER "u" USER "<tool_result>r</tool_result>" USER "more" USER
                 "<tool_result>r2</tool_result>" ASSIST "</think>");
    ds4_chat_free(c);
}

DS4_TEST(chat_exact_replay_only_when_all_ids_share_a_block) {
    const char *raw = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
                      "<｜DSML｜parameter name=\"x\" string=\"false\">1</｜DSML｜parameter>\n"
                      "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n</｜DSML｜invoke>\n"
                      "</｜DSML｜tool_calls>";
    ds4_dsml_replay *m = ds4_dsml_replay_new(0, 0);
    const char *ids[] = {"call_a", "call_b"};
    CHECK_EQ_INT(ds4_dsml_replay_put(m, ids, 2, raw, strlen(raw), NULL), 0);
    ds4_chat *c = mk(DS4_THINK_NONE, 4096);
    add(c, DS4_ROLE_USER, "u");
    int a = add(c, DS4_ROLE_ASSISTANT, "t");
    /* arguments as a client would send them back: whitespace changed */
    ds4_chat_add_call(c, a, "call_a", "f", "{ \"x\" : 1.0 }", 13, NULL);
    ds4_chat_add_call(c, a, "call_b", "g", "{}", 2, NULL);
    ds4_buf want = DS4_BUF_INIT;
    ds4_buf_puts(&want, BOS USER "u" ASSIST "</think>t");
    ds4_buf_puts(&want, raw);
    ds4_buf_puts(&want, EOS);
    CHECK_RENDER(c, m, want.data);
    /* without the map: canonical rendering */
    CHECK_RENDER(c, NULL,
                 BOS USER "u" ASSIST "</think>t\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
                 "<｜DSML｜parameter name=\"x\" string=\"false\">1.0</｜DSML｜parameter>\n"
                 "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n</｜DSML｜invoke>\n"
                 "</｜DSML｜tool_calls>" EOS);
    /* one id unknown: canonical for the whole message */
    ds4_chat *d = mk(DS4_THINK_NONE, 4096);
    add(d, DS4_ROLE_USER, "u");
    a = add(d, DS4_ROLE_ASSISTANT, "t");
    ds4_chat_add_call(d, a, "call_a", "f", "{\"x\":1}", 7, NULL);
    ds4_chat_add_call(d, a, "call_zzz", "g", "{}", 2, NULL);
    ds4_buf o = DS4_BUF_INIT;
    ds4_chat_render(d, m, &o, NULL);
    CHECK(strstr(o.data, "string=\"false\">1</") != NULL);
    CHECK(strstr(o.data, "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter") != NULL);
    ds4_buf_free(&o);
    ds4_buf_free(&want);
    ds4_chat_free(c);
    ds4_chat_free(d);
    ds4_dsml_replay_free(m);
}

DS4_TEST(chat_completion_prompt) {
    ds4_buf o = DS4_BUF_INIT;
    ds4_chat_render_completion(&o, "Hi", 2, DS4_THINK_HIGH);
    CHECK_STR(o.data, BOS "You are a helpful assistant" USER "Hi" ASSIST "<think>");
    ds4_buf_reset(&o);
    ds4_chat_render_completion(&o, "Hi", 2, DS4_THINK_NONE);
    CHECK_STR(o.data, BOS "You are a helpful assistant" USER "Hi" ASSIST "</think>");
    ds4_buf_reset(&o);
    ds4_chat_render_completion(&o, "Hi", 2, DS4_THINK_MAX);
    char *want = with_max("You are a helpful assistant" USER "Hi" ASSIST "<think>");
    CHECK_STR(o.data, want);
    free(want);
    ds4_buf_free(&o);
}

/* Checks one segment. */
#define CHECK_SEG(s, i, k, txt)                                                      \
    do {                                                                             \
        CHECK((i) < (s).n);                                                          \
        CHECK_EQ_INT((s).v[i].kind, k);                                              \
        CHECK_STR((s).v[i].text, txt);                                               \
    } while (0)

DS4_TEST(chat_cli_oneshot_segments) {
    ds4_segs s;
    ds4_segs_init(&s);
    ds4_chat_oneshot_segs(&s, DS4_CHAT_DEFAULT_SYSTEM, "Hello <｜User｜>", strlen("Hello <｜User｜>"),
                          DS4_THINK_HIGH);
    CHECK_EQ_INT(s.n, 6);
    CHECK_SEG(s, 0, DS4_SEG_SPECIAL, BOS);
    CHECK_SEG(s, 1, DS4_SEG_PLAIN, "You are a helpful assistant");
    CHECK_SEG(s, 2, DS4_SEG_SPECIAL, USER);
    CHECK_SEG(s, 3, DS4_SEG_PLAIN, "Hello <｜User｜>"); /* not scanned for markers */
    CHECK_SEG(s, 4, DS4_SEG_SPECIAL, ASSIST);
    CHECK_SEG(s, 5, DS4_SEG_SPECIAL, "<think>");
    ds4_segs_free(&s);
    /* test-vector form: empty system, mode none */
    ds4_chat_oneshot_segs(&s, "", "p", 1, DS4_THINK_NONE);
    CHECK_EQ_INT(s.n, 5);
    CHECK_SEG(s, 0, DS4_SEG_SPECIAL, BOS);
    CHECK_SEG(s, 1, DS4_SEG_SPECIAL, USER);
    CHECK_SEG(s, 2, DS4_SEG_PLAIN, "p");
    CHECK_SEG(s, 4, DS4_SEG_SPECIAL, "</think>");
    ds4_segs_free(&s);
    /* think max: the prefix, plain-tokenized, right after BOS */
    ds4_chat_oneshot_segs(&s, "You are a helpful assistant.", "p", 1, DS4_THINK_MAX);
    CHECK_EQ_INT(s.n, 7);
    CHECK_SEG(s, 1, DS4_SEG_PLAIN, ds4_chat_max_prefix);
    CHECK_SEG(s, 2, DS4_SEG_PLAIN, "You are a helpful assistant.");
    ds4_segs_free(&s);
    /* an already rendered prompt is taken whole */
    const char *r = BOS "x" USER "y" ASSIST "</think>";
    ds4_chat_oneshot_segs(&s, "sys", r, strlen(r), DS4_THINK_HIGH);
    CHECK_EQ_INT(s.n, 1);
    CHECK_SEG(s, 0, DS4_SEG_RENDERED, r);
    ds4_segs_free(&s);
}

DS4_TEST(chat_repl_and_message_segments) {
    ds4_segs s;
    ds4_segs_init(&s);
    ds4_chat_repl_start_segs(&s, NULL, DS4_THINK_HIGH);
    ds4_chat_repl_turn_segs(&s, "hi", 2, DS4_THINK_HIGH);
    CHECK_EQ_INT(s.n, 5);
    CHECK_SEG(s, 0, DS4_SEG_SPECIAL, BOS);
    CHECK_SEG(s, 1, DS4_SEG_SPECIAL, USER);
    CHECK_SEG(s, 2, DS4_SEG_PLAIN, "hi");
    CHECK_SEG(s, 4, DS4_SEG_SPECIAL, "<think>");
    ds4_segs_free(&s);

    ds4_chat_message_segs(&s, DS4_ROLE_SYSTEM, "sys", 3);
    ds4_chat_message_segs(&s, DS4_ROLE_ASSISTANT, "ans", 3);
    ds4_chat_message_segs(&s, DS4_ROLE_ASSISTANT, "<think>r</think>a", 17);
    ds4_chat_message_segs(&s, DS4_ROLE_TOOL, "Tool result 1 (bash):\nok", 24);
    ds4_chat_message_segs(&s, DS4_ROLE_USER, "u", 1);
    CHECK_EQ_INT(s.n, 11);
    CHECK_SEG(s, 0, DS4_SEG_PLAIN, "sys");
    CHECK_SEG(s, 1, DS4_SEG_SPECIAL, ASSIST);
    CHECK_SEG(s, 2, DS4_SEG_SPECIAL, "</think>");
    CHECK_SEG(s, 3, DS4_SEG_PLAIN, "ans");
    CHECK_SEG(s, 4, DS4_SEG_SPECIAL, ASSIST);
    CHECK_SEG(s, 5, DS4_SEG_PLAIN, "<think>r</think>a");
    CHECK_SEG(s, 6, DS4_SEG_SPECIAL, USER);
    CHECK_SEG(s, 7, DS4_SEG_PLAIN, "Tool: ");
    CHECK_SEG(s, 8, DS4_SEG_PLAIN, "Tool result 1 (bash):\nok");
    CHECK_SEG(s, 9, DS4_SEG_SPECIAL, USER);
    CHECK_SEG(s, 10, DS4_SEG_PLAIN, "u");
    ds4_segs_free(&s);
}

DS4_TEST(chat_roles_from_names) {
    CHECK_EQ_INT(ds4_chat_role_from_name("developer"), DS4_ROLE_DEVELOPER);
    CHECK_EQ_INT(ds4_chat_role_from_name("function"), DS4_ROLE_FUNCTION);
    CHECK_EQ_INT(ds4_chat_role_from_name("critic"), DS4_ROLE_OTHER);
    CHECK_EQ_INT(ds4_chat_role_from_name(NULL), DS4_ROLE_OTHER);
}

DS4_TEST(chat_content_with_nul_bytes_and_bad_index) {
    ds4_chat *c = mk(DS4_THINK_NONE, 0);
    CHECK_EQ_INT(ds4_chat_add(c, DS4_ROLE_USER, "a\0b", 3, NULL), 0);
    ds4_buf o = DS4_BUF_INIT;
    ds4_chat_render(c, NULL, &o, NULL);
    const char want[] = BOS USER "a\0b" ASSIST "</think>";
    CHECK_EQ_INT(o.len, sizeof want - 1);
    CHECK(memcmp(o.data, want, sizeof want - 1) == 0);
    ds4_err e = {0};
    CHECK_EQ_INT(ds4_chat_add_reasoning(c, 5, "x", 1, &e), DS4_E_ARG);
    CHECK(strstr(e.msg, "out of range") != NULL);
    ds4_buf_free(&o);
    ds4_chat_free(c);
}
