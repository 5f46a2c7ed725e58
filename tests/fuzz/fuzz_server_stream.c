/* fuzz_server_stream.c - libFuzzer target over ds4-server's output path:
 * arbitrary "generated text" (any bytes: broken UTF-8, partial DSML, stray
 * markers) fed in arbitrary chunks through the worker's DSML event pipeline
 * into each API's SSE emitter and non-streaming body. Property checked:
 * every SSE "data:" payload and every body is valid JSON (what the official
 * clients require), and nothing crashes. No engine, no socket.
 *
 * Input: byte 0 = API (bits 0-1), thinking (bit 2), tools (bit 3), Responses
 * reasoning opt-in (bit 4); byte 1 = chunk-size seed; the rest = the text.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../server/api_anthropic.c"
#include "../../server/api_openai.c"
#include "../../server/api_responses.c"
#include "../../server/cache_policy.c"
#include "../../server/common.c"
#include "../../server/forced.c"
#include "../../server/jsonc.c"
#include "../../server/request.c"
#include "../../server/worker.c"

static void check_sse(const char *s, size_t n) {
    const char *p = s, *end = s + n;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
        if (len > 6 && !memcmp(p, "data: ", 6) && !(len == 12 && !memcmp(p + 6, "[DONE]", 6))) {
            json_error_t je;
            json_t *v = json_loadb(p + 6, len - 6, 0, &je);
            if (!v) abort();
            json_decref(v);
        }
        p += len + 1;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    srv_api api = (srv_api)(data[0] & 3);
    bool thinking = data[0] & 4, tools = data[0] & 8;
    srv_job *j = srv_job_new(api);
    srv_request_init(&j->rq, api);
    j->rq.model = strdup("m");
    j->rq.stream = true;
    j->rq.include_usage = true;
    j->rq.reasoning_summary = data[0] & 16;
    snprintf(j->id, sizeof j->id, "chatcmpl-1");
    gen_ctx g = {0};
    g.j = j;
    g.em = srv_emitter_for(api);
    g.streaming = true;
    g.thinking = api != SRV_API_COMPLETIONS && thinking;
    ds4_dsml_stream_opts so = {0};
    so.thinking = g.thinking;
    so.tools = api != SRV_API_COMPLETIONS && tools;
    so.id_prefix = api == SRV_API_ANTHROPIC ? "toolu_" : "call_";
    so.id_seed = 1;
    g.ds = ds4_dsml_stream_new(&so);
    if (!g.ds) abort();
    if (g.em->begin) g.em->begin(j);
    const char *text = (const char *)data + 2;
    size_t n = size - 2, off = 0;
    uint32_t rng = data[1] * 2654435761u + 1;
    while (off < n) {
        rng = rng * 1103515245u + 12345u;
        size_t k = 1 + (rng >> 16) % 9;
        if (k > n - off) k = n - off;
        ds4_buf_append(&g.gen, text + off, k);
        off += k;
        feed_to(&g, g.gen.len);
    }
    srv_result r = {0};
    ds4_dsml_stream_finish(g.ds, on_event, &g, &r.parsed, NULL);
    if (g.in_reasoning && g.em->reasoning_end) g.em->reasoning_end(j);
    r.finish = r.parsed.n_calls ? SRV_FINISH_TOOL_CALLS : SRV_FINISH_STOP;
    if (api == SRV_API_COMPLETIONS) {
        r.text = ds4_buf_detach(&g.gen, &r.text_len);
        ds4_dsml_result_free(&r.parsed);
        memset(&r.parsed, 0, sizeof r.parsed);
    }
    r.usage.prompt = 10;
    r.usage.cached = 3;
    r.usage.completion = (int)n;
    g.em->finish(j, &r);
    check_sse(j->st.pending.data ? j->st.pending.data : "", j->st.pending.len);
    char *body = g.em->body(j, &r);
    json_t *v = json_loads(body, 0, NULL);
    if (!v) abort();
    json_decref(v);
    free(body);
    srv_result_free(&r);
    gen_free(&g);
    srv_job_free(j);
    return 0;
}
