/* fuzz_server_request.c - libFuzzer target over ds4-server's request
 * parsers (JSON body -> request record), the prompt rendering of the parsed
 * request and the error-body serializer: the code every HTTP client reaches
 * before anything touches the model. No socket, no engine.
 *
 * Input: byte 0 selects the API (mod 4: chat, completions, responses,
 * anthropic); the rest is the request body. Seeds live in
 * tests/fuzz/corpus/fuzz_server_request/ (same layout).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../server/api_anthropic.c"
#include "../../server/api_openai.c"
#include "../../server/api_responses.c"
#include "../../server/common.c"
#include "../../server/jsonc.c"
#include "../../server/request.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    srv_api api = (srv_api)(data[0] % 4);
    srv_request rq;
    srv_error e;
    memset(&e, 0, sizeof e);
    if (srv_parse_request(api, (const char *)data + 1, size - 1,
                          data[0] & 8 ? DS4_THINK_NONE : DS4_THINK_HIGH, &rq, &e) == 0) {
        /* both sides of the Think-Max gate */
        srv_error e2 = {0};
        if (srv_render(&rq, (data[0] & 4) ? 400000 : 4096, NULL, &e2) == 0) {
            if (!rq.text || rq.text_len != strlen(rq.text)) abort();
        }
    } else {
        if (e.status < 400 || e.status > 599 || !e.msg[0]) abort();
        char *b = srv_error_body(api, &e);
        if (!b) abort();
        free(b);
    }
    srv_request_free(&rq);
    return 0;
}
