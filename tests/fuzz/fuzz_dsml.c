/* fuzz_dsml.c - libFuzzer target for src/dsml.c.
 *
 * Input: byte 0 = flags (bit 0 thinking, bit 1 tools, bit 2 repair, bit 3
 * prefix a valid trailer header for the replay loader), byte 1 = seed of
 * the chunking, the rest = the text. Beyond "no crash, no sanitizer
 * report", it checks properties and aborts when one fails:
 *   - the streaming parser's merged events are the same for the whole text
 *     fed at once and for a random chunking of it;
 *   - the C.9 tracker gives the same class fed whole or byte by byte;
 *   - parsed calls re-rendered canonically parse back to as many calls;
 *   - JSON minify is idempotent;
 *   - any text used as arguments renders to a block that parses back.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsml.h"

typedef struct evlog {
    ds4_buf b;
    int last_type, last_index;
} evlog;

static int log_ev(void *ud, const ds4_dsml_event *ev) {
    evlog *l = ud;
    int delta = ev->type == DS4_DSML_EV_REASONING || ev->type == DS4_DSML_EV_CONTENT ||
                ev->type == DS4_DSML_EV_CALL_ARGS;
    if (!(delta && (int)ev->type == l->last_type && ev->index == l->last_index))
        ds4_buf_printf(&l->b, "\x01%d/%d:", (int)ev->type, ev->index);
    if (ev->type == DS4_DSML_EV_CALL_START) ds4_buf_printf(&l->b, "%s|%s", ev->name, ev->id);
    if (ev->text) ds4_buf_append(&l->b, ev->text, ev->len);
    l->last_type = ev->type;
    l->last_index = ev->index;
    return 0;
}

static void run(const char *t, size_t n, const ds4_dsml_stream_opts *o, uint32_t seed,
                evlog *l) {
    memset(l, 0, sizeof *l);
    l->last_type = -1;
    ds4_dsml_stream *s = ds4_dsml_stream_new(o);
    size_t at = 0;
    while (at < n) {
        size_t k = n - at;
        if (seed) {
            seed = seed * 1103515245u + 12345u;
            k = 1 + (seed >> 16) % 9;
            if (k > n - at) k = n - at;
        }
        ds4_dsml_stream_feed(s, t + at, k, log_ev, l);
        at += k;
    }
    ds4_dsml_result r;
    if (ds4_dsml_stream_finish(s, log_ev, l, &r, NULL) == 0) ds4_dsml_result_free(&r);
    ds4_dsml_stream_free(s);
}

static void check(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "property failed: %s\n", what);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    int flags = data[0];
    uint32_t seed = data[1] + 1;
    const char *t = (const char *)data + 2;
    size_t n = size - 2;
    int thinking = flags & 1;

    /* streaming: whole vs chunked */
    ds4_dsml_stream_opts o = {0};
    o.thinking = thinking;
    o.tools = (flags >> 1) & 1;
    o.repair = (flags >> 2) & 1;
    o.id_seed = 11;
    evlog a, b;
    run(t, n, &o, 0, &a);
    run(t, n, &o, seed, &b);
    check(a.b.len == b.b.len && (a.b.len == 0 || memcmp(a.b.data, b.b.data, a.b.len) == 0),
          "stream events depend on chunking");
    ds4_buf_free(&a.b);
    ds4_buf_free(&b.b);

    /* tracker */
    ds4_dsml_tracker t1, t2;
    ds4_dsml_tracker_init(&t1);
    ds4_dsml_tracker_init(&t2);
    ds4_dsml_tracker_feed(&t1, t, n);
    for (size_t i = 0; i < n; i++) ds4_dsml_tracker_feed(&t2, t + i, 1);
    check(ds4_dsml_tracker_class(&t1) == ds4_dsml_tracker_class(&t2), "tracker split");

    /* final parse, and canonical re-rendering of what it found */
    ds4_dsml_result r;
    if (ds4_dsml_parse(t, n, thinking, &r, NULL) == 0) {
        for (int i = 0; i < r.n_calls; i++) {
            ds4_buf c = DS4_BUF_INIT;
            ds4_dsml_args_compact(&c, r.calls[i].arguments, r.calls[i].arguments_len);
            ds4_buf_free(&c);
        }
        if (r.n_calls > 0) {
            check(r.raw_dsml != NULL, "calls without raw block");
            ds4_buf re = DS4_BUF_INIT;
            ds4_dsml_render_calls(&re, r.calls, r.n_calls);
            ds4_dsml_result r2;
            if (ds4_dsml_parse(re.data, re.len, 0, &r2, NULL) == 0) {
                check(!r2.parse_failed && r2.n_calls == r.n_calls, "re-rendered calls reparse");
                ds4_dsml_result_free(&r2);
            }
            ds4_buf_free(&re);
        }
        ds4_dsml_result_free(&r);
    }

    /* JSON helpers */
    ds4_buf m1 = DS4_BUF_INIT, m2 = DS4_BUF_INIT;
    if (ds4_dsml_json_minify(&m1, t, n, NULL) == 0) {
        check(ds4_dsml_json_minify(&m2, m1.data, m1.len, NULL) == 0 && m1.len == m2.len &&
                  memcmp(m1.data, m2.data, m1.len) == 0,
              "minify idempotent");
    }
    ds4_buf_free(&m1);
    ds4_buf_free(&m2);
    ds4_buf c = DS4_BUF_INIT;
    ds4_dsml_args_compact(&c, t, n);
    ds4_buf_free(&c);

    /* the text as arguments of a call */
    char *args = malloc(n + 1);
    if (args) {
        memcpy(args, t, n);
        args[n] = '\0';
        ds4_tool_call tc = {NULL, "f", args, n};
        ds4_buf blk = DS4_BUF_INIT;
        ds4_dsml_render_calls(&blk, &tc, 1);
        ds4_dsml_result r3;
        if (ds4_dsml_parse(blk.data, blk.len, 0, &r3, NULL) == 0) {
            check(!r3.parse_failed && r3.n_calls == 1, "rendered arguments reparse");
            ds4_dsml_result_free(&r3);
        }
        ds4_buf_free(&blk);
        free(args);
    }

    /* repair */
    ds4_buf suf = DS4_BUF_INIT;
    ds4_dsml_repair_suffix(t, n, thinking, &suf);
    ds4_buf_free(&suf);

    /* replay trailer loader, then save/load of what it kept */
    ds4_dsml_replay *map = ds4_dsml_replay_new(64, 1 << 20);
    if (map) {
        ds4_buf in = DS4_BUF_INIT;
        if (flags & 8) {
            ds4_buf_append(&in, "KTM\x01", 4);
            ds4_buf_put_u32le(&in, (uint32_t)(flags >> 4) + 1);
        }
        ds4_buf_append(&in, t, n);
        size_t used = 0;
        ds4_dsml_replay_load(map, (const uint8_t *)in.data, in.len, NULL, 0, &used, NULL);
        check(used <= in.len, "consumed beyond input");
        ds4_buf out = DS4_BUF_INIT;
        ds4_dsml_replay_save(map, in.data, in.len, &out);
        ds4_dsml_replay *m3 = ds4_dsml_replay_new(64, 1 << 20);
        if (m3) {
            check(ds4_dsml_replay_load(m3, (const uint8_t *)out.data, out.len, NULL, 0, NULL,
                                       NULL) == 0,
                  "saved trailer reloads");
            ds4_dsml_replay_free(m3);
        }
        ds4_buf_free(&out);
        ds4_buf_free(&in);
        ds4_dsml_replay_free(map);
    }
    return 0;
}
