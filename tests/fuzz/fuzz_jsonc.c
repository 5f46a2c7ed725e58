/* fuzz_jsonc.c - libFuzzer target for server/jsonc.c (JSON replies by
 * constrained decoding, docs/SERVING.md B.13).
 *
 * Input: the schema's JSON text up to the first NUL byte (no NUL: the
 * json_object mode), then byte M and the rest R. M even: R is a document,
 * fed byte by byte up to the first byte the matcher refuses. M odd: R is a
 * list of choices: each byte picks one of the bytes the matcher allows next
 * (so the walk goes deep into valid documents). Checks, aborting when one
 * fails:
 *   - whenever the matcher says the value is closed or may end there, the
 *     text so far is JSON that jansson reads (an object in json_object mode);
 *   - after a closed value no byte is allowed;
 *   - feeding the accepted text at once ends in the same verdict as byte by
 *     byte.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../server/jsonc.c"

static void check_json(const unsigned char *t, size_t n, bool object) {
    json_error_t je;
    json_t *v = json_loadb((const char *)t, n, JSON_DECODE_ANY | JSON_DECODE_INT_AS_REAL, &je);
    if (!v || (object && !json_is_object(v))) {
        fprintf(stderr, "accepted text is not %s: '%.*s' (%s)\n", object ? "a JSON object" : "JSON", (int)n,
                (const char *)t, v ? "not an object" : je.text);
        abort();
    }
    json_decref(v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = memchr(data, 0, size);
    json_t *sj = NULL;
    if (nul) {
        sj = json_loadb((const char *)data, (size_t)(nul - data), JSON_DECODE_ANY, NULL);
        if (!sj) return 0;
        size -= (size_t)(nul - data) + 1;
        data = nul + 1;
    }
    char msg[256];
    srv_jsonc_schema *s = srv_jsonc_compile(sj, msg, sizeof msg);
    json_decref(sj);
    if (!s) return 0;
    const bool object = !nul;
    int mode = size ? data[0] & 1 : 0;
    if (size) {
        data++;
        size--;
    }
    static jc_set set, tmp, probe;
    set.n = 1;
    memset(&set.t[0], 0, sizeof set.t[0]);
    push(&set.t[0], s->root);
    unsigned char doc[4096];
    size_t n = 0;
    for (size_t i = 0; i < size && n < sizeof doc; i++) {
        unsigned char c = data[i];
        if (mode) { /* the (c mod k)-th allowed byte */
            unsigned char ok[256];
            int k = 0;
            for (int b = 0; b < 256; b++) {
                set_copy(&probe, &set);
                unsigned char bb = (unsigned char)b;
                if (set_feed(s, &probe, &bb, 1, &tmp)) ok[k++] = bb;
            }
            if (!k) break;
            c = ok[c % k];
        }
        set_copy(&probe, &set);
        if (!set_feed(s, &probe, &c, 1, &tmp)) break;
        set_copy(&set, &probe);
        doc[n++] = c;
        if (set_done(&set)) {
            check_json(doc, n, object);
            for (int b = 0; b < 256; b++) { /* nothing after a closed value */
                set_copy(&probe, &set);
                unsigned char bb = (unsigned char)b;
                if (set_feed(s, &probe, &bb, 1, &tmp)) abort();
            }
            break;
        }
    }
    if (set_can_end(&set)) check_json(doc, n, object);
    /* all at once: the same verdict */
    static jc_set whole;
    whole.n = 1;
    memset(&whole.t[0], 0, sizeof whole.t[0]);
    push(&whole.t[0], s->root);
    if (n && (!set_feed(s, &whole, doc, n, &tmp) || set_done(&whole) != set_done(&set) ||
              set_can_end(&whole) != set_can_end(&set)))
        abort();
    srv_jsonc_schema_free(s);
    return 0;
}
