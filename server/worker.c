/* worker.c - request preparation (client threads), the bounded FIFO queue,
 * and the single inference worker: prefill through the cache policy, the
 * sampling loop, stop sequences, the DSML event pipeline into the API
 * emitters, and cancellation.
 *
 * Ownership: a srv_job is reference counted (the connection thread and the
 * queue/worker); the last srv_job_release frees it. Only the worker thread
 * touches the engine session, the sampler and the cache policy. Client
 * threads use the engine read-only (tokenizer) and the replay map under
 * replay_mu.
 *
 * Text pipeline of one generation (docs/SERVING.md B.7/B.8):
 *   sampled token -> bytes -> gen (whole text) -> stop-sequence holdback
 *   -> ds4_dsml_stream (thinking split, UTF-8/marker holdback, tool events)
 *   -> srv_emitter callbacks (SSE bytes into the job's stream)
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sampler.h"
#include "server.h"
#include "util/xalloc.h"

/* ---- job lifetime ---------------------------------------------------------- */

srv_job *srv_job_new(srv_api api) {
    srv_job *j = xcalloc(1, sizeof *j);
    pthread_mutex_init(&j->st.mu, NULL);
    pthread_cond_init(&j->st.cv, NULL);
    j->st.last_drain = srv_now_mono();
    j->refs = 1;
    j->status = 200;
    j->rq.api = api;
    const srv_emitter *em = srv_emitter_for(api);
    if (em->state_size) j->api_state = xcalloc(1, em->state_size);
    return j;
}

void srv_job_free(srv_job *j) {
    const srv_emitter *em = srv_emitter_for(j->rq.api);
    if (j->api_state && em->state_free) em->state_free(j->api_state);
    free(j->api_state);
    srv_request_free(&j->rq);
    ds4_buf_free(&j->st.pending);
    pthread_mutex_destroy(&j->st.mu);
    pthread_cond_destroy(&j->st.cv);
    free(j->body);
    free(j);
}

void srv_job_release(srv_server *s, srv_job *j) {
    pthread_mutex_lock(&s->mu);
    int left = --j->refs;
    pthread_mutex_unlock(&s->mu);
    if (left == 0) srv_job_free(j);
}

void srv_job_cancel(srv_job *j) {
    pthread_mutex_lock(&j->st.mu);
    j->st.client_gone = true;
    pthread_cond_broadcast(&j->st.cv);
    pthread_mutex_unlock(&j->st.mu);
}

static bool job_gone(srv_job *j) {
    pthread_mutex_lock(&j->st.mu);
    /* A client that has not drained pending bytes for 10 s is stalled: its
     * generation is abandoned so it never holds the worker (B.2 uses 2 s;
     * 10 s leaves room for a loaded 2-core machine). */
    if (!j->st.client_gone && j->st.pending.len && srv_now_mono() - j->st.last_drain > 10.0)
        j->st.client_gone = true;
    bool g = j->st.client_gone;
    pthread_mutex_unlock(&j->st.mu);
    return g;
}

/* ---- preparation in the client thread -------------------------------------- */

/* Tokenizes text with the rendered-chat tokenizer into a malloc'ed array. */
/* Texts from this size tokenize one at a time: the BPE of one long piece
 * (a run of letters) holds ~60 bytes of scratch per byte, so concurrent
 * tens-of-MB prompts (an outside pass sent six 60 MiB ones: 11.5 GiB at
 * once) would otherwise add up to the machine's memory. */
#define SRV_BIG_TEXT ((size_t)1 << 20)
static pthread_mutex_t g_big_tok_mu = PTHREAD_MUTEX_INITIALIZER;

int srv_tokenize(ds4_engine *e, const char *text, size_t len, int32_t **out, int *n,
                 ds4_err *err) {
    size_t cap = len + 16;
    if (cap > (size_t)1 << 30) return ds4_err_set(err, DS4_E_RANGE, "prompt too large");
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    const bool big = len >= SRV_BIG_TEXT;
    if (big) pthread_mutex_lock(&g_big_tok_mu);
    int r = ds4_tokenize(e, text, len, true, ids, (int)cap, err);
    if (big) pthread_mutex_unlock(&g_big_tok_mu);
    if (r > (int)cap) { /* cannot happen (a token covers >= 1 byte), but be safe */
        int32_t *big = realloc(ids, (size_t)r * sizeof *ids);
        if (!big) {
            free(ids);
            return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        }
        ids = big;
        r = ds4_tokenize(e, text, len, true, ids, r, err);
    }
    if (r < 0) {
        free(ids);
        return r;
    }
    *out = ids;
    *n = r;
    return 0;
}

/* Response id prefixes (random, so ids differ across restarts). */
static const char *const g_id_prefix[SRV_N_API] = {
    [SRV_API_CHAT] = "chatcmpl-",
    [SRV_API_COMPLETIONS] = "cmpl-",
    [SRV_API_RESPONSES] = "resp_",
    [SRV_API_ANTHROPIC] = "msg_",
};

/* Renders and tokenizes a parsed request into rq->text / rq->tokens and
 * checks it fits the context. Client thread. 0 or -1 with e set. */
static int prepare(srv_server *s, srv_request *rq, srv_error *e) {
    int n_ctx = s->cfg.n_ctx;
    srv_cache_restore_tool_memory(s, rq);
    pthread_mutex_lock(&s->replay_mu);
    int rc = srv_render(rq, n_ctx, s->cfg.disable_exact_dsml_replay ? NULL : s->replay, e);
    pthread_mutex_unlock(&s->replay_mu);
    if (rc || srv_render_tail(rq, n_ctx, e)) return -1;
    ds4_err err = {0};
    const int n_vocab = ds4_engine_n_vocab(s->engine);
    for (int i = 0; i < rq->n_bias; i++)
        if (rq->bias_ids[i] >= n_vocab)
            return srv_fail_param(e, "logit_bias", "invalid_value",
                                  "logit_bias: token %d is not in the vocabulary (ids 0..%d)", (int)rq->bias_ids[i],
                                  n_vocab - 1);
    /* a text that cannot fit whatever its tokens is refused before the
     * tokenizer runs (every token covers at most max_bytes bytes) */
    const size_t maxb = ds4_token_max_bytes(s->engine);
    const size_t at_least = maxb ? rq->text_len / maxb : 0;
    if (at_least >= (size_t)n_ctx) {
        rq->n_tokens = at_least > INT_MAX ? INT_MAX : (int)at_least;
    } else if (srv_tokenize(s->engine, rq->text, rq->text_len, &rq->tokens, &rq->n_tokens, &err)) {
        return srv_fail(e, 500, "tokenization failed: %s", err.msg);
    }
    if (rq->n_tokens >= n_ctx) {
        /* Anthropic's own wording: Claude Code compacts the conversation on it */
        const char *bound = rq->tokens ? "" : "at least "; /* refused before tokenizing */
        if (rq->api == SRV_API_ANTHROPIC) /* (the exact wording clients parse; the count may be the lower bound) */
            srv_fail(e, 400, "prompt is too long: %d tokens > %d maximum", rq->n_tokens, n_ctx - 1);
        else
            srv_fail(e, 400, "Prompt has %s%d tokens, but the configured context size is %d tokens", bound,
                     rq->n_tokens, n_ctx);
        e->context = true;
        e->n_prompt = rq->n_tokens;
        e->n_ctx = n_ctx;
        e->param = rq->api == SRV_API_COMPLETIONS ? "prompt"
                   : rq->api == SRV_API_RESPONSES ? "input"
                                                  : "messages";
        return -1;
    }
    return 0;
}

char *srv_count_tokens(srv_server *s, const char *body, size_t n, srv_error *e) {
    srv_request rq;
    char *out = NULL;
    if (!srv_parse_request(SRV_API_ANTHROPIC, body, n, s->cfg.default_think[SRV_API_ANTHROPIC],
                           &rq, e)) {
        /* counting needs no continuation state: tool outputs are rendered
         * as sent, whatever the live binding; the calls as the request will
         * render them (tool memory from the disk cache too, as prepare) */
        int n_ctx = s->cfg.n_ctx;
        srv_cache_restore_tool_memory(s, &rq);
        pthread_mutex_lock(&s->replay_mu);
        int rc = srv_render(&rq, n_ctx, s->cfg.disable_exact_dsml_replay ? NULL : s->replay, e);
        pthread_mutex_unlock(&s->replay_mu);
        ds4_err err = {0};
        if (!rc && srv_tokenize(s->engine, rq.text, rq.text_len, &rq.tokens, &rq.n_tokens, &err))
            rc = srv_fail(e, 500, "tokenization failed: %s", err.msg);
        if (!rc) {
            json_t *v = json_pack("{s:i}", "input_tokens", rq.n_tokens);
            out = srv_json_text(v);
            json_decref(v);
        }
    }
    srv_request_free(&rq);
    return out;
}

srv_job *srv_submit(srv_server *s, srv_api api, const char *body, size_t n, srv_error *e) {
    srv_job *j = srv_job_new(api);
    if (srv_parse_request(api, body, n, s->cfg.default_think[api], &j->rq, e)) goto fail;
    if (api == SRV_API_ANTHROPIC && !j->rq.max_tokens_set) {
        /* required by the Messages API; without it a request would generate
         * to the end of the context, holding the worker for minutes */
        srv_fail(e, 400, "max_tokens: Field required");
        goto fail;
    }
    if (s->trace) {
        j->rq.raw_body = malloc(n + 1);
        if (j->rq.raw_body) {
            memcpy(j->rq.raw_body, body, n);
            j->rq.raw_body[n] = 0;
        }
    }
    /* B.4 tool-output validation: an output whose call is not in the request
     * must answer the live tool binding; such a request requires live state
     * (C.2 rule 4: 409 if the binding is gone when the worker runs it) */
    for (int i = 0; i < j->rq.n_live_ids; i++) {
        if (srv_cache_live_call(s, api, j->rq.live_ids[i])) continue;
        if (api == SRV_API_ANTHROPIC)
            srv_fail(e, 400,
                     "Anthropic continuation state is not available for tool_use_id %s; retry by "
                     "replaying the full messages history",
                     j->rq.live_ids[i]);
        else
            srv_fail_param(e, "input", NULL,
                           "Responses continuation state is not available for call_id %s; retry "
                           "by replaying the full input history",
                           j->rq.live_ids[i]);
        goto fail;
    }
    j->rq.requires_live = j->rq.n_live_ids > 0;
    if (prepare(s, &j->rq, e)) goto fail;
    j->created = (int64_t)time(NULL);
    pthread_mutex_lock(&s->mu);
    if (s->stopping) {
        pthread_mutex_unlock(&s->mu);
        srv_fail(e, 503, "server shutting down");
        goto fail;
    }
    if (s->n_queued >= s->cfg.queue_max) { /* queued jobs whose clients left do not count */
        srv_job *gone = NULL, *prev = NULL;
        for (srv_job *q = s->head, *next; q; q = next) {
            next = q->next;
            pthread_mutex_lock(&q->st.mu);
            bool left = q->st.client_gone;
            pthread_mutex_unlock(&q->st.mu);
            if (!left) {
                prev = q;
                continue;
            }
            if (prev) prev->next = next;
            else s->head = next;
            if (s->tail == q) s->tail = prev;
            s->n_queued--;
            q->next = gone;
            gone = q;
        }
        for (srv_job *q = gone, *next; q; q = next) { /* drop the queue's reference */
            next = q->next;
            srv_log("request %s: client gone before it ran; dropped from the queue", q->id);
            if (--q->refs == 0) {
                pthread_mutex_unlock(&s->mu);
                srv_job_free(q);
                pthread_mutex_lock(&s->mu);
            }
        }
    }
    if (s->n_queued >= s->cfg.queue_max) {
        pthread_mutex_unlock(&s->mu);
        srv_fail(e, 429, "server busy: %d requests already queued; retry later", s->cfg.queue_max);
        goto fail;
    }
    j->serial = ++s->serial;
    srv_random_id(j->id, sizeof j->id, g_id_prefix[api], 12);
    j->refs = 2; /* the caller and the queue */
    if (s->tail) s->tail->next = j;
    else s->head = j;
    s->tail = j;
    s->n_queued++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return j;
fail:
    srv_job_free(j);
    return NULL;
}

/* ---- generation ------------------------------------------------------------- */

typedef struct tool_ev {
    int type, index;
    char *id, *name, *text;
    size_t len;
} tool_ev;

typedef struct gen_ctx {
    srv_server *s;
    srv_job *j;
    const srv_emitter *em;
    bool streaming;
    bool thinking;
    ds4_dsml_stream *ds;
    ds4_buf gen;         /* whole generated text (cut at a stop) */
    size_t fed;          /* bytes of gen handed to ds */
    size_t max_stop;     /* longest stop string */
    bool in_reasoning;   /* last text event was reasoning */
    double last_keepalive;
    /* logprobs (rq->logprobs): every generated token with text, in order;
     * lp_next is the first one not yet given to a content event */
    srv_logprob *lp;
    int n_lp, cap_lp, lp_next;
    size_t cc_at, cc_n;      /* gen[0, cc_at) holds cc_n characters (as srv_jstr sends them) */
    srv_logprob *lp_content; /* (n_content) the content tokens, in order */
    int n_content, cap_content;
    /* tool-call events of the open block, sent when it closes: a block that
     * never closes gives no calls (TEXT C.6), so a stream must not have
     * announced them (B.8: streamed == not streamed) */
    tool_ev *held;
    int n_held, cap_held;
} gen_ctx;

/* Tokens whose bytes start in gen[from, to) move to the content list;
 * earlier ones (reasoning, held whitespace, markup) are skipped. Returns
 * the index of the first moved entry in lp_content. */
static int take_content_lp(gen_ctx *g, size_t from, size_t to) {
    int first = g->n_content;
    while (g->lp_next < g->n_lp && g->lp[g->lp_next].at < to) {
        srv_logprob *t = &g->lp[g->lp_next++];
        if (t->at < from) continue;
        if (g->n_content == g->cap_content) {
            g->cap_content = g->cap_content ? 2 * g->cap_content : 64;
            g->lp_content = xrealloc(g->lp_content, (size_t)g->cap_content * sizeof *g->lp_content);
        }
        g->lp_content[g->n_content++] = *t; /* moved: the content list owns it now */
        memset(t, 0, sizeof *t);
    }
    return first;
}

static void held_free(gen_ctx *g) {
    for (int i = 0; i < g->n_held; i++) {
        free(g->held[i].id);
        free(g->held[i].name);
        free(g->held[i].text);
    }
    g->n_held = 0;
}

/* DSML stream events -> emitter callbacks. Runs for every request, so the
 * logprob bookkeeping is the same streamed or not; emitters only when
 * streaming. */
static int on_event(void *ud, const ds4_dsml_event *ev) {
    gen_ctx *g = ud;
    srv_job *j = g->j;
    const srv_emitter *em = g->em;
    int lp_first = 0, lp_n = 0;
    if (ev->type == DS4_DSML_EV_CONTENT && g->j->rq.logprobs && ev->len) {
        /* event text points into the stream's copy of gen: same offsets */
        size_t from = (size_t)(ev->text - ds4_dsml_stream_text(g->ds, NULL));
        lp_first = take_content_lp(g, from, from + ev->len);
        lp_n = g->n_content - lp_first;
    }
    if (!g->streaming) return 0;
    if (ev->type != DS4_DSML_EV_REASONING && g->in_reasoning) {
        g->in_reasoning = false;
        if (em->reasoning_end) em->reasoning_end(j);
    }
    switch (ev->type) {
    case DS4_DSML_EV_REASONING:
        g->in_reasoning = true;
        if (em->reasoning && ev->len) em->reasoning(j, ev->text, ev->len);
        break;
    case DS4_DSML_EV_CONTENT:
        if (em->content && ev->len)
            em->content(j, ev->text, ev->len, g->lp_content ? g->lp_content + lp_first : NULL, lp_n);
        break;
    case DS4_DSML_EV_CALL_START:
    case DS4_DSML_EV_CALL_ARGS:
    case DS4_DSML_EV_CALL_END: {
        if (g->n_held == g->cap_held) {
            g->cap_held = g->cap_held ? 2 * g->cap_held : 16;
            g->held = xrealloc(g->held, (size_t)g->cap_held * sizeof *g->held);
        }
        tool_ev *t = &g->held[g->n_held++];
        *t = (tool_ev){.type = ev->type, .index = ev->index, .id = ev->id ? xstrdup(ev->id) : NULL,
                       .name = ev->name ? xstrdup(ev->name) : NULL, .len = ev->len};
        if (ev->len) {
            t->text = xmalloc(ev->len);
            memcpy(t->text, ev->text, ev->len);
        }
        break;
    }
    case DS4_DSML_EV_BLOCK_END: /* the calls are certain now */
        for (int i = 0; i < g->n_held; i++) {
            const tool_ev *t = &g->held[i];
            if (j->rq.single_call && t->index > 0) continue; /* parallel calls off: the first only */
            if (t->type == DS4_DSML_EV_CALL_START && em->tool_begin) {
                em->tool_begin(j, t->index, t->id ? t->id : "", t->name ? t->name : "");
                j->n_tool_started = t->index + 1;
            } else if (t->type == DS4_DSML_EV_CALL_ARGS && em->tool_args && t->len) {
                em->tool_args(j, t->index, t->text, t->len);
            } else if (t->type == DS4_DSML_EV_CALL_END && em->tool_end) {
                em->tool_end(j, t->index);
            }
        }
        held_free(g);
        break;
    case DS4_DSML_EV_ERROR:
        srv_log("tool: stream projection stopped: %.*s", (int)ev->len, ev->text ? ev->text : "");
        break;
    default: break;
    }
    return 0;
}

/* Feeds gen[fed..upto) to the DSML stream. */
static int feed_to(gen_ctx *g, size_t upto) {
    if (upto <= g->fed) return 0;
    int rc = ds4_dsml_stream_feed(g->ds, g->gen.data + g->fed, upto - g->fed, on_event, g);
    g->fed = upto;
    return rc;
}

/* Searches the stop strings in gen from the bytes that may contain a new
 * match; returns the earliest match start or -1, and in *which the index
 * of the stop string (the first listed among those matching there). */
static long find_stop(gen_ctx *g, size_t from, int *which) {
    srv_request *rq = &g->j->rq;
    long best = -1;
    for (int i = 0; i < rq->n_stops; i++) {
        const char *hit = memmem(g->gen.data + from, g->gen.len - from, rq->stops[i],
                                 strlen(rq->stops[i]));
        if (hit && (best < 0 || hit - g->gen.data < best)) {
            best = hit - g->gen.data;
            *which = i;
        }
    }
    return best;
}

static void gen_free(gen_ctx *g) {
    held_free(g);
    free(g->held);
    srv_logprob_free(g->lp, g->n_lp);
    srv_logprob_free(g->lp_content, g->n_content);
    ds4_dsml_stream_free(g->ds);
    ds4_buf_free(&g->gen);
}

static char *dup_bytes(const char *p, size_t n) {
    char *d = xmalloc(n + 1);
    memcpy(d, p, n);
    d[n] = 0;
    return d;
}

/* Records the logprob of token tok (whose bytes start at gen offset at) and
 * its top alternatives from the logits it was picked from (TEXT D.5). */
static void record_logprob(gen_ctx *g, const float *logits, int32_t tok, size_t at) {
    srv_server *s = g->s;
    int k = g->j->rq.top_logprobs;
    int32_t ids[21];
    double lps[21];
    double *all = g->s->lp_scratch;
    int n = ds4_sampler_logprobs(s->sampler, logits, k, ids, lps, all);
    if (n < 0) return;
    if (g->n_lp == g->cap_lp) {
        g->cap_lp = g->cap_lp ? 2 * g->cap_lp : 64;
        g->lp = xrealloc(g->lp, (size_t)g->cap_lp * sizeof *g->lp);
    }
    srv_logprob *t = &g->lp[g->n_lp++];
    memset(t, 0, sizeof *t);
    size_t blen = 0;
    const char *b = ds4_token_bytes(s->engine, tok, &blen);
    t->tok.bytes = dup_bytes(b ? b : "", b ? blen : 0);
    t->tok.n = b ? blen : 0;
    t->tok.logprob = (float)all[tok];
    t->at = at;
    /* characters of the text as sent (srv_jstr: each invalid subpart one
     * U+FFFD) before this token's bytes; a character cut at the end of the
     * text so far is decided by the token's first bytes: one the token
     * completes is not counted before it, one it does not is a U+FFFD */
    const size_t lim = at < g->gen.len ? at : g->gen.len;
    while (g->cc_at < lim) {
        bool cut;
        const unsigned char *u = (const unsigned char *)g->gen.data + g->cc_at;
        size_t k = srv_utf8_unit(u, lim - g->cc_at, &cut);
        if (cut) {
            unsigned char tmp[8];
            const size_t m = lim - g->cc_at, e = t->tok.n < 4 ? t->tok.n : 4; /* m <= 3: a cut character */
            memcpy(tmp, u, m);
            if (e) memcpy(tmp + m, t->tok.bytes, e);
            k = srv_utf8_unit(tmp, m + e, &cut);
            if (k > m) break; /* the token continues it */
        }
        g->cc_at += k;
        g->cc_n++;
    }
    t->at_char = g->cc_n;
    t->n_top = n;
    t->top = n ? xcalloc((size_t)n, sizeof *t->top) : NULL;
    for (int i = 0; i < n; i++) {
        b = ds4_token_bytes(s->engine, ids[i], &blen);
        t->top[i].bytes = dup_bytes(b ? b : "", b ? blen : 0);
        t->top[i].n = b ? blen : 0;
        t->top[i].logprob = (float)lps[i];
    }
}

/* The text a generated token adds to the reply. Control tokens (ds4.h
 * ds4_token_is_control) add nothing, so they never reach content: the
 * three markers the parser reads are kept only where they are markup --
 * "<think>" as the first token and "</think>" closing the reasoning of a
 * thinking turn, "｜DSML｜" when tools are active. Issue 12 item 7. */
static const char *reply_bytes(gen_ctx *g, int32_t tok, bool tools, int n_gen, size_t *len) {
    ds4_engine *e = g->s->engine;
    const char *bytes = ds4_token_bytes(e, tok, len);
    if (!bytes) {
        *len = 0;
        return "";
    }
    if (!ds4_token_is_control(e, tok)) return bytes;
    bool keep = false;
    if (tok == ds4_token_special(e, DS4_TOK_THINK_OPEN)) keep = g->thinking && n_gen == 0;
    else if (tok == ds4_token_special(e, DS4_TOK_THINK_CLOSE))
        keep = g->thinking && !memmem(g->gen.data ? g->gen.data : "", g->gen.len, DS4_THINK_CLOSE, 8);
    else if (tok == ds4_token_special(e, DS4_TOK_DSML)) keep = tools;
    if (!keep) *len = 0;
    return bytes;
}

typedef struct prefill_cb {
    gen_ctx *g;
} prefill_cb;

/* Prefill progress (after each prefill chunk): continued disk saves, SSE
 * headers at the first event, then ": prefill" keepalives every >= 5 s;
 * cancels when the client is gone. */
static int on_progress(void *user, const char *what, int64_t done, int64_t total) {
    gen_ctx *g = user;
    (void)what;
    (void)done;
    (void)total;
    if (job_gone(g->j) || g->s->shutdown_flag) return 1;
    /* continued saves also happen mid-prefill (C.4): the session holds the
     * prefix evaluated so far, with the logits of its last row */
    srv_cache_step(g->s, false);
    if (!g->streaming) return 0;
    double now = srv_now_mono();
    if (!g->j->st.headers) {
        srv_stream_headers(g->j);
        g->last_keepalive = now;
    } else if (now - g->last_keepalive >= 5.0) {
        srv_stream_write(g->j, ": prefill\n\n", 11);
        g->last_keepalive = now;
    }
    return 0;
}

static void trace_job(srv_server *s, srv_job *j, const srv_result *r) {
    if (!s->trace) return;
    pthread_mutex_lock(&s->trace_mu);
    FILE *f = s->trace;
    fprintf(f, "=== request %s api=%d model=%s stream=%d tools=%d think=%d prompt=%d cached=%d\n",
            j->id, (int)j->rq.api, j->rq.model, j->rq.stream, srv_tools_active(&j->rq),
            (int)j->rq.think, r->usage.prompt, r->usage.cached);
    fprintf(f, "--- raw request\n%s\n--- rendered prompt\n%.*s\n", j->rq.raw_body ? j->rq.raw_body : "",
            (int)j->rq.text_len, j->rq.text);
    fprintf(f, "--- finish=%s completion_tokens=%d\n", srv_finish_openai(r->finish),
            r->usage.completion);
    if (r->parsed.reasoning) fprintf(f, "--- reasoning\n%s\n", r->parsed.reasoning);
    if (r->parsed.content) fprintf(f, "--- content\n%s\n", r->parsed.content);
    if (r->text) fprintf(f, "--- text\n%s\n", r->text);
    for (int i = 0; i < r->parsed.n_calls; i++)
        fprintf(f, "--- tool call %s %s %s\n", r->parsed.calls[i].id ? r->parsed.calls[i].id : "",
                r->parsed.calls[i].name, r->parsed.calls[i].arguments);
    errno = 0;
    const bool ok = fflush(f) == 0 && !ferror(f);
    if (!ok && !s->trace_failing) /* a full disk: said once, not per request; the requests go on */
        srv_log("--trace %s: writing failed (%s); requests are served, their traces lost until writes succeed",
                s->cfg.trace_path, strerror(errno ? errno : EIO));
    else if (ok && s->trace_failing)
        srv_log("--trace %s: writing again", s->cfg.trace_path);
    s->trace_failing = !ok;
    clearerr(f);
    pthread_mutex_unlock(&s->trace_mu);
}

/* Fails a job before any SSE bytes: HTTP status + error body. */
static void fail_job(srv_job *j, int status, const char *msg) {
    srv_error e = {0};
    srv_fail(&e, status, "%s", msg);
    j->status = status;
    j->err = e;
}

/* Step 1: brings the session to the effective prompt (cache policy) and
 * fills r->usage. On failure answers the job (error event or status) and
 * returns false. */
static bool run_prefill(gen_ctx *g, srv_result *r) {
    srv_server *s = g->s;
    srv_job *j = g->j;
    ds4_err err = {0};
    double t0 = srv_now_mono();
    int cached = 0, n_prompt = 0;
    int prc = srv_cache_prepare(s, j, &cached, &n_prompt, on_progress, g, &err);
    if (prc == SRV_CACHE_CONFLICT) { /* decided before any prefill or SSE byte */
        fail_job(j, 409,
                 j->rq.api == SRV_API_ANTHROPIC
                     ? "Anthropic continuation state is not available; retry by replaying the full "
                       "messages history"
                     : "Responses continuation state is not available; retry by replaying the full "
                       "input history");
        return false;
    }
    if (prc) {
        if (job_gone(j)) {
            srv_log("request %s: client went away during prefill", j->id);
            return false;
        }
        /* the prefill cancelled by a shutdown says so, as a generation's end does */
        if (prc == DS4_E_CANCEL && s->shutdown_flag) ds4_err_set(&err, DS4_E_CANCEL, "shutdown requested");
        srv_log("request %s: prefill failed: %s", j->id, err.msg);
        if (g->streaming && j->st.headers) {
            /* headers are out: the failure travels as an SSE error event */
            json_t *ev = j->rq.api == SRV_API_ANTHROPIC
                             ? json_pack("{s:s, s:{s:s, s:s}}", "type", "error", "error", "type",
                                         "api_error", "message", err.msg)
                             : json_pack("{s:{s:s, s:s}}", "error", "message", err.msg, "type",
                                         "server_error");
            srv_sse_json(j, "error", ev);
        } else {
            /* the device failing (out of device memory, a kernel fault) is the
             * server being unable to serve now, not a bad request: 503 */
            bool unavailable = s->shutdown_flag || prc == DS4_E_BACKEND || prc == DS4_E_NOMEM;
            fail_job(j, unavailable ? 503 : 500, s->shutdown_flag ? "server shutting down" : err.msg);
        }
        return false;
    }
    r->usage.prompt = n_prompt;
    r->usage.cached = cached;
    j->usage = r->usage;
    srv_log("prefill %s: prompt=%d cached=%d (%.2f s)", j->id, n_prompt, cached,
            srv_now_mono() - t0);
    return true;
}

/* The logits a step samples from under logit_bias and the OpenAI
 * penalties: l[j] + bias[j] - count[j] * frequency - (count[j] > 0) *
 * presence, counts over the tokens generated so far (reasoning included). */
static const float *adjust_logits(float *a, int nv, const srv_request *rq, const float *logits,
                                  const int32_t *counts, int32_t eos) {
    memcpy(a, logits, (size_t)nv * sizeof *a);
    for (int i = 0; i < rq->n_bias; i++) a[rq->bias_ids[i]] += rq->bias_vals[i];
    if (counts)
        for (int j = 0; j < nv; j++)
            if (counts[j]) a[j] -= (float)counts[j] * rq->frequency_penalty + rq->presence_penalty;
    if (rq->ignore_eos && eos >= 0 && eos < nv) a[eos] = -INFINITY;
    return a;
}

/* Whether bytes b[0..n), appended to the reply so far (gen), complete
 * "</think>" as text with bytes after it: *tail and *n_tail are those bytes
 * (the start of the content, which a JSON constraint must see). */
static bool think_tail_bytes(const ds4_buf *gen, const char *b, size_t n, const char **tail, size_t *n_tail) {
    if (!b || !n) return false;
    char w[7 + 64];
    const size_t keep = gen->len < 7 ? gen->len : 7, take = n < 64 ? n : 64;
    if (keep) memcpy(w, gen->data + gen->len - keep, keep);
    memcpy(w + keep, b, take);
    const char *m = memmem(w, keep + take, DS4_THINK_CLOSE, 8);
    if (!m) return false;
    const size_t end = (size_t)(m - w) + 8; /* > keep: the reply so far holds no "</think>" */
    if (end >= keep + n) return false;      /* the tag ends the token */
    *tail = b + (end - keep);
    *n_tail = n - (end - keep);
    return true;
}

static bool think_tail(const gen_ctx *g, const ds4_engine *e, int32_t tok, const char **tail, size_t *n_tail) {
    size_t n = 0;
    const char *b = ds4_token_bytes(e, tok, &n);
    return b && !ds4_token_is_control(e, tok) && think_tail_bytes(&g->gen, b, n, tail, n_tail);
}

static const char *jc_bytes(void *user, int32_t id, size_t *n) {
    return ds4_token_bytes((const ds4_engine *)user, id, n);
}

static bool jc_control(void *user, int32_t id) { return ds4_token_is_control((const ds4_engine *)user, id); }

/* The JSON constraint of a request with response_format / text.format
 * (B.13), NULL for other requests (and when out of memory). */
static srv_jsonc *jsonc_for(srv_server *s, const srv_request *rq, bool tools) {
    if (!rq->json_format) return NULL;
    char msg[256];
    srv_jsonc_schema *sc = srv_jsonc_compile(rq->json_schema, msg, sizeof msg); /* checked by the parser */
    if (!sc) return NULL;
    srv_jsonc_vocab v = {ds4_engine_n_vocab(s->engine), ds4_token_special(s->engine, DS4_TOK_EOS),
                         tools ? ds4_token_special(s->engine, DS4_TOK_DSML) : -1, jc_bytes, jc_control,
                         s->engine};
    srv_jsonc *j = srv_jsonc_new(sc, tools && rq->tool_choice == SRV_TOOL_AUTO, &v);
    /* a prefill is the reply's start (checked by the parser) */
    if (j && rq->chat && ds4_chat_continues(rq->chat)) {
        const ds4_chat_msg *m = &rq->chat->msgs[rq->chat->n_msgs - 1];
        if (!srv_jsonc_feed_text(j, m->content, m->content_len)) {
            srv_jsonc_free(j);
            return NULL;
        }
    }
    return j;
}

/* Step 2: the sampling loop (docs/SERVING.md B.7). Returns the finish reason and
 * sets r->usage.completion and r->stop. */
static srv_finish run_generation(gen_ctx *g, srv_result *r, bool tools) {
    srv_server *s = g->s;
    srv_job *j = g->j;
    srv_request *rq = &j->rq;
    ds4_err err = {0};
    ds4_dsml_tracker trk; /* C.9 class over every generated byte */
    ds4_dsml_tracker_init(&trk);
    /* absent: the server's -n; -1: no limit but the context (docs/SERVING.md B.4; it fell back to -n) */
    int max_tokens = rq->max_tokens >= 0 ? rq->max_tokens : rq->max_tokens == -1 ? INT_MAX : s->cfg.default_tokens;
    int room = s->cfg.n_ctx - ds4_session_n_tokens(s->session);
    if (max_tokens > room) max_tokens = room;
    ds4_sampler_params cp = ds4_sampler_defaults();
    cp.temperature = rq->temperature;
    cp.top_k = rq->top_k;
    cp.top_p = rq->top_p;
    cp.min_p = rq->min_p;
    cp.seed = rq->seed;
    ds4_rng rng;
    ds4_rng_seed(&rng, rq->seeded ? rq->seed : ds4_rng_entropy_seed() ^ (j->serial << 1));
    int32_t eos = ds4_token_special(s->engine, DS4_TOK_EOS);
    const int32_t think_close = ds4_token_special(s->engine, DS4_TOK_THINK_CLOSE);
    srv_forced *fz = srv_forced_new(s->engine, rq, g->thinking);
    srv_jsonc *jc = fz ? NULL : jsonc_for(s, rq, tools);
    if (rq->json_format && !fz && !jc) {
        snprintf(r->error_msg, sizeof r->error_msg, "out of memory for the JSON constraint");
        return SRV_FINISH_ERROR;
    }
    srv_finish finish = SRV_FINISH_LENGTH;
    int n_gen = 0;
    /* MTP speculative cycles (ds4.h ds4_session_spec_step) whenever the
     * sampling rule cannot change between the tokens of a cycle: no forced
     * tool call, no logprobs, and no greedy-structure switching (no tools,
     * or greedy anyway). A cycle appends the chosen token and the accepted
     * drafts; those are then taken from the queue without evaluation. */
    /* logit_bias / penalties / ignore_eos: the logits of every step are adjusted (no
     * backend argmax, no MTP) */
    const bool penal = rq->presence_penalty != 0.0f || rq->frequency_penalty != 0.0f;
    const bool adjust = penal || rq->n_bias > 0 || rq->ignore_eos;
    int32_t *counts = penal ? calloc((size_t)ds4_engine_n_vocab(s->engine), sizeof *counts) : NULL;
    if (penal && !counts) {
        srv_forced_free(fz);
        srv_jsonc_free(jc);
        snprintf(r->error_msg, sizeof r->error_msg, "out of memory for the penalties");
        return SRV_FINISH_ERROR;
    }
    /* (with a JSON format MTP runs through the reasoning only, see below) */
    const bool mtp = ds4_engine_has_mtp(s->engine) && !rq->logprobs && !s->debug_tokens && !adjust &&
                     (!tools || !(ds4_sampler_effective(&cp, g->thinking, 0).temperature > 0.0f));
    ds4_spec_stats st0 = {0};
    if (mtp) ds4_session_spec_stats(s->session, &st0);
    int32_t queue[8], next = -1;
    ds4_rng rng_cycle = rng; /* the generator before the last MTP cycle (its draws: one per verified row) */
    bool cycle_sampled = false;
    long pend = -1, pend_at = -1; /* a stop match waiting on a possible block opening (gen offsets) */
    int pend_which = -1;
    int nq = 0, qi = 0, n_reason = 0;
    bool reason_done = false;
#define FAIL(...)                                                  \
    {                                                              \
        finish = SRV_FINISH_ERROR;                                 \
        snprintf(r->error_msg, sizeof r->error_msg, __VA_ARGS__);  \
        break;                                                     \
    }
    while (n_gen < max_tokens) {
        if (job_gone(j)) FAIL("client stream write failed")
        if (s->shutdown_flag) FAIL("shutdown requested")
        /* hidden reasoning or a tool call being held can keep a stream
         * silent for minutes: a comment every 10 s keeps proxies from
         * timing it out (clients ignore SSE comments) */
        if (g->streaming && j->st.headers && srv_now_mono() - j->st.last_write >= 10.0)
            srv_stream_write(j, ": keepalive\n\n", 13);
        srv_cache_step(s, tools && ds4_dsml_stream_block_started(g->ds) &&
                              !ds4_dsml_stream_block_ended(g->ds));
        int greedy = tools && ds4_dsml_class_is_greedy(ds4_dsml_tracker_class(&trk));
        ds4_sampler_params p = ds4_sampler_effective(&cp, g->thinking, greedy);
        bool forced = fz && !srv_forced_done(fz);
        /* the JSON constraint holds after the reasoning, until a tool-call block opens */
        const bool jsonc = srv_jsonc_active(jc) && (!g->thinking || reason_done);
        /* MTP cycles of the reasoning may have run past its end: a queued
         * token (already evaluated) the JSON constraint refuses, or an EOS
         * inside the reasoning (it becomes </think>), is rewound with all
         * queued after it; a refused `next` is dropped */
        bool refused = false; /* the plain draw of this step was made and refused */
        int32_t forced_tok = -1;
        const char *tl = NULL;
        size_t ntl = 0;
        if (jc && qi < nq &&
            (jsonc ? !srv_jsonc_allows(jc, queue[qi])
                   : g->thinking && !reason_done &&
                         (queue[qi] == eos || (think_tail(g, s->engine, queue[qi], &tl, &ntl) &&
                                               !srv_jsonc_allows_text(jc, tl, ntl))))) {
            const bool was_eos = !jsonc;
            if (ds4_session_rewind(s->session, ds4_session_n_tokens(s->session) - (nq - qi), &err))
                FAIL("%s", err.msg)
            srv_log("mtp %s: %d drafted tokens past the reasoning rewound (JSON format)", j->id, nq - qi);
            /* the generator as plain sampling leaves it after drawing queue[qi]
             * (the cycle's draw qi + 1), so the stream stays that of plain sampling */
            if (cycle_sampled) {
                rng = rng_cycle;
                for (int k = 0; k <= qi; k++) ds4_rng_next(&rng);
            }
            qi = nq = 0;
            next = -1;
            refused = true;
            if (was_eos) forced_tok = think_close; /* as plain decoding turns that EOS (or tag) into </think> */
        }
        if (jsonc && next >= 0 && !srv_jsonc_allows(jc, next)) {
            next = -1;
            refused = true;
        }
        int32_t tok;
        const float *logits = NULL;
        bool evaluated = false;
        if (s->debug_tokens && !forced) { /* --debug-reply: the given output, then EOS */
            tok = n_gen < s->n_debug_tokens ? s->debug_tokens[n_gen] : eos;
        } else if (forced_tok >= 0) {
            tok = forced_tok;
        } else if (qi < nq) {
            tok = queue[qi++];
            evaluated = true;
        } else if (g->thinking && !reason_done && !fz && rq->think_budget > 0 && n_reason >= rq->think_budget &&
                   think_close >= 0) {
            /* the thinking budget is spent: the reasoning is closed here (an
             * MTP cycle's `next` is dropped undrawn: plain decoding draws
             * nothing at this step, so the generator goes back before it) */
            tok = think_close;
            if (next >= 0 && cycle_sampled) {
                rng = rng_cycle;
                for (int k = 0; k < nq; k++) ds4_rng_next(&rng);
            }
            next = -1;
        } else if (next >= 0 && !forced) {
            tok = next;
            next = -1;
        } else if (jsonc && srv_jsonc_must_end(jc)) {
            tok = eos; /* the JSON value is complete */
        } else if (!forced && !(p.temperature > 0.0f) && !rq->logprobs && !adjust && !refused) {
            /* greedy: the backend picks the id (no logits copy from a GPU);
             * under the JSON constraint the logits come only when it does not fit */
            if (ds4_session_argmax(s->session, &tok, &err)) FAIL("%s", err.msg)
            if (jsonc && !srv_jsonc_allows(jc, tok)) {
                logits = ds4_session_logits_err(s->session, &err);
                if (!logits) FAIL("%s", err.msg[0] ? err.msg : "no logits")
                tok = srv_jsonc_pick(jc, s->sampler, logits, &p, &rng, false);
                if (tok < 0) FAIL("JSON reply: no token fits the schema here")
            }
        } else if (s->debug_tokens) {
            /* --debug-reply under a forced call: the given text is what the
             * model prefers (the longest token that continues it from the
             * bytes written so far, far above the rest; EOS once written or
             * left), and the forced call's rules still decide (tests of
             * forced.c; by bytes, as the forced literals tokenize alone) */
            const int nv = ds4_engine_n_vocab(s->engine);
            for (int t = 0; t < nv; t++) s->adj_scratch[t] = 0.0f;
            const char *dr = s->cfg.debug_reply;
            const size_t dl = strlen(dr), at = g->gen.len;
            int32_t want = eos;
            if (at < dl && (at == 0 || !memcmp(g->gen.data, dr, at))) {
                size_t best = 0;
                for (int t = 0; t < nv; t++) {
                    size_t nb = 0;
                    const char *b = ds4_token_bytes(s->engine, t, &nb);
                    if (b && nb > best && nb <= dl - at && !memcmp(b, dr + at, nb)) want = t, best = nb;
                }
            }
            if (want >= 0 && want < nv) s->adj_scratch[want] = 100.0f;
            tok = srv_forced_pick(fz, s->sampler, s->adj_scratch, &p, &rng, max_tokens - n_gen);
        } else {
            logits = ds4_session_logits_err(s->session, &err);
            if (!logits) FAIL("%s", err.msg[0] ? err.msg : "no logits")
            if (adjust) logits = adjust_logits(s->adj_scratch, ds4_engine_n_vocab(s->engine), rq, logits, counts, eos);
            tok = forced  ? srv_forced_pick(fz, s->sampler, logits, &p, &rng, max_tokens - n_gen)
                  : jsonc ? srv_jsonc_pick(jc, s->sampler, logits, &p, &rng, refused)
                  : p.temperature > 0.0f ? ds4_sampler_sample(s->sampler, logits, &p, &rng)
                                         : ds4_argmax(logits, ds4_engine_n_vocab(s->engine));
            if (tok < 0 && jsonc) FAIL("JSON reply: no token fits the schema here")
        }
        /* a JSON reply after the reasoning: EOS inside it closes the reasoning instead */
        if (jc && g->thinking && !reason_done && tok == eos && think_close >= 0 && !s->debug_tokens) tok = think_close;
        /* a "</think>" written as text inside a token: the bytes after it
         * are content the constraint must see; refused, the special token
         * closes the reasoning instead */
        const char *tail = NULL;
        size_t n_tail = 0;
        if (jc && g->thinking && !reason_done && tok >= 0 && think_close >= 0 && !s->debug_tokens &&
            think_tail(g, s->engine, tok, &tail, &n_tail)) {
            if (evaluated || srv_jsonc_allows_text(jc, tail, n_tail)) {
                /* evaluated (MTP): allowed, or rewound above */
            } else {
                tok = think_close;
                tail = NULL;
                n_tail = 0;
            }
        }
        if (tok < 0) FAIL("forced tool call: no token fits")
        if (tok == eos) { /* EOS is neither evaluated nor output */
            finish = SRV_FINISH_STOP;
            break;
        }
        size_t blen = 0;
        const char *bytes = reply_bytes(g, tok, tools, n_gen, &blen);
        if (logits && rq->logprobs && blen) record_logprob(g, logits, tok, g->gen.len);
        if (!evaluated && mtp && !forced && !jsonc) {
            rng_cycle = rng;
            cycle_sampled = p.temperature > 0.0f;
            int32_t out[8];
            int no = 0;
            if (ds4_session_spec_step(s->session, tok, max_tokens - n_gen, &p, &rng, out, &no, &next, &err))
                FAIL("%s", err.msg)
            for (int k = 1; k < no; k++) queue[k - 1] = out[k];
            nq = no - 1;
            qi = 0;
        } else if (!evaluated && ds4_session_eval(s->session, tok, &err)) FAIL("%s", err.msg)
        n_gen++;
        if (counts && tok >= 0 && tok < ds4_engine_n_vocab(s->engine)) counts[tok]++;
        size_t old = g->gen.len;
        ds4_buf_append(&g->gen, bytes, blen);
        if (g->thinking && !reason_done) { /* a reasoning token, up to the one that closes it */
            n_reason++;
            size_t from = old > 7 ? old - 7 : 0;
            reason_done = memmem(g->gen.data + from, g->gen.len - from, DS4_THINK_CLOSE, 8) != NULL;
            if (reason_done && jc && tail && n_tail) srv_jsonc_feed_text(jc, tail, n_tail); /* checked above */
        }
        const int fam_before = trk.family;
        ds4_dsml_tracker_feed(&trk, bytes, blen);
        srv_forced_feed(fz, bytes, blen);
        if (jsonc) srv_jsonc_feed(jc, tok);
        size_t safe = g->gen.len;
        /* stop strings end the reply's text; a tool-call block is markup
         * (its tags, names and arguments), so they are not searched inside
         * one: a stop there would only break the call */
        const bool in_block = tools && (fam_before >= 0 || trk.family >= 0); /* also its closing tag */
        if (pend >= 0) { /* a stop that touched what may be a block's opening */
            if (trk.family >= 0) {
                pend = -1; /* the block opened: that stop was markup */
            } else {
                long op = ds4_dsml_open_prefix(g->gen.data, g->gen.len);
                if (op < 0 || op > pend_at) { /* plain text after all: the stop holds */
                    ds4_buf_truncate(&g->gen, (size_t)pend);
                    finish = SRV_FINISH_STOP;
                    r->stop = rq->stops[pend_which];
                    break;
                }
            }
        }
        if (rq->n_stops && !in_block && pend < 0) {
            /* a new match can only start in the last (longest stop - 1) old
             * bytes or later; those bytes are also held back from clients */
            size_t from = old > g->max_stop - 1 ? old - (g->max_stop - 1) : 0;
            int which = -1;
            long hit = find_stop(g, from, &which);
            long op = hit >= 0 && tools ? ds4_dsml_open_prefix(g->gen.data, g->gen.len) : -1;
            if (hit >= 0 && op >= 0 && hit + (long)strlen(rq->stops[which]) > op) {
                pend = hit; /* wait: the text there may be the opening of a call */
                pend_at = op;
                pend_which = which;
            } else if (hit >= 0) {
                ds4_buf_truncate(&g->gen, (size_t)hit);
                finish = SRV_FINISH_STOP;
                r->stop = rq->stops[which];
                break;
            }
            safe = g->gen.len > g->max_stop - 1 ? g->gen.len - (g->max_stop - 1) : 0;
        }
        if (pend >= 0 && safe > (size_t)pend) safe = (size_t)pend; /* nothing past a waiting stop goes out */
        feed_to(g, safe);
        if (tools && ds4_dsml_stream_block_ended(g->ds)) {
            finish = SRV_FINISH_TOOL_CALLS;
            break;
        }
    }
#undef FAIL
    if (pend >= 0 && finish != SRV_FINISH_ERROR) { /* the turn ended before a block opened: the stop holds */
        ds4_buf_truncate(&g->gen, (size_t)pend);
        finish = SRV_FINISH_STOP;
        r->stop = rq->stops[pend_which];
    }
    if (mtp) {
        ds4_spec_stats st;
        ds4_session_spec_stats(s->session, &st);
        long long cy = st.cycles - st0.cycles, dr = st.drafted - st0.drafted, ac = st.accepted - st0.accepted;
        if (cy > 0)
            srv_log("mtp %s: %lld cycles, %.2f tokens/cycle, drafts %lld, accepted %lld (%.1f%%), gated %lld", j->id,
                    cy, (double)(st.tokens - st0.tokens) / (double)cy, dr, ac, dr ? 100.0 * (double)ac / (double)dr : 0.0,
                    (long long)(st.gated - st0.gated));
    }
    feed_to(g, g->gen.len);
    r->forced_cut = srv_forced_cut(fz);
    srv_forced_free(fz);
    srv_jsonc_free(jc);
    free(counts);
    r->usage.completion = n_gen;
    r->usage.reasoning = n_reason;
    return finish;
}

static void run_job(srv_server *s, srv_job *j) {
    srv_request *rq = &j->rq;
    gen_ctx g = {0};
    g.s = s;
    g.j = j;
    g.em = srv_emitter_for(rq->api);
    g.streaming = rq->stream;
    ds4_think eff = ds4_chat_effective_think(rq->think, s->cfg.n_ctx);
    /* a prefill (the conversation ends in an assistant message) continues
     * that message's content: no reasoning comes first. Legacy completions
     * think too (TEXT B.6): the sampling override, the reasoning count and
     * the closing </think> apply, but their text is returned raw (the
     * stream does not split it) */
    g.thinking = eff != DS4_THINK_NONE && !(rq->chat && ds4_chat_continues(rq->chat));
    bool tools = rq->api != SRV_API_COMPLETIONS && srv_tools_active(rq);
    srv_result r = {0};
    double t0 = srv_now_mono();

    if (!run_prefill(&g, &r)) return;
    double t_gen0 = srv_now_mono();
    ds4_dsml_stream_opts so = {0};
    so.thinking = g.thinking && rq->api != SRV_API_COMPLETIONS;
    so.tools = tools;
    so.id_prefix = rq->api == SRV_API_ANTHROPIC ? "toolu_" : "call_";
    g.ds = ds4_dsml_stream_new(&so);
    if (!g.ds) {
        fail_job(j, 500, "out of memory");
        return;
    }
    for (int i = 0; i < rq->n_stops; i++)
        if (strlen(rq->stops[i]) > g.max_stop) g.max_stop = strlen(rq->stops[i]);
    if (g.streaming) {
        srv_stream_headers(j);
        if (g.em->begin) g.em->begin(j);
    }
    srv_finish finish = run_generation(&g, &r, tools);
    bool stop_hit = r.stop != NULL;
    if (stop_hit) srv_cache_invalidate(s); /* tokens past the stop are not trusted */

    /* Step 3: the one parse (dsml.h): what the stream emitted is the reply */
    /* a block that broke the grammar is not open: its bytes are content and
     * the turn ends as it ended (TEXT C.6 rule 6; was a 500 'unterminated') */
    const bool block_failed = tools && ds4_dsml_stream_block_failed(g.ds);
    bool block_open = tools && ds4_dsml_stream_block_started(g.ds) && !ds4_dsml_stream_block_ended(g.ds) &&
                      !block_failed;
    if (block_failed) srv_log("tool: malformed tool-call block: no call, its text is content");
    /* cut by the token limit inside a call or its opening tag: the partial
     * call is dropped (no DSML markup in the reply for the client to show and
     * send back) */
    if (tools && finish == SRV_FINISH_LENGTH) ds4_dsml_stream_drop_open_block(g.ds);
    ds4_dsml_stream_finish(g.ds, on_event, &g, &r.parsed, NULL);
    r.think_closed = g.gen.data && memmem(g.gen.data, g.gen.len, DS4_THINK_CLOSE, 8) != NULL;
    if (rq->api == SRV_API_COMPLETIONS) { /* raw text, not parsed */
        r.text = ds4_buf_detach(&g.gen, &r.text_len);
        ds4_dsml_result_free(&r.parsed);
        memset(&r.parsed, 0, sizeof r.parsed);
    }
    r.lp = g.lp_content;
    r.n_lp = g.n_content;
    g.lp_content = NULL;
    g.n_content = 0;
    if (block_open && finish != SRV_FINISH_ERROR) {
        /* cut by the token limit: length (OpenAI "length", Anthropic
         * "max_tokens", Responses "incomplete"), what clients of every API
         * expect of a cut-off call and retry with more room, the call dropped;
         * ended by EOS: error, the block's bytes follow the content (TEXT C.6). */
        if (finish != SRV_FINISH_LENGTH) finish = SRV_FINISH_ERROR;
        snprintf(r.error_msg, sizeof r.error_msg, "unterminated tool call");
    }
    if (rq->single_call && r.parsed.n_calls > 1) {
        /* parallel calls off: the first call only (as streamed); the block's
         * exact bytes hold the others, so it is not kept for replay (the call
         * re-renders from its JSON) */
        srv_log("tool: parallel calls off: %d calls after the first dropped", r.parsed.n_calls - 1);
        for (int i = 1; i < r.parsed.n_calls; i++) {
            free(r.parsed.calls[i].id);
            free(r.parsed.calls[i].name);
            free(r.parsed.calls[i].arguments);
        }
        r.parsed.n_calls = 1;
        r.calls_dropped = true;
        free(r.parsed.raw_dsml);
        r.parsed.raw_dsml = NULL;
        r.parsed.raw_dsml_len = 0;
    }
    /* a forced call the budget cut short (forced.c) is whole markup but not
     * what the model would have written: the limit's finish, as any cut call */
    if (r.parsed.n_calls && finish != SRV_FINISH_ERROR)
        finish = r.forced_cut ? SRV_FINISH_LENGTH : SRV_FINISH_TOOL_CALLS;
    if (finish == SRV_FINISH_TOOL_CALLS && !r.parsed.n_calls) finish = SRV_FINISH_STOP;
    if (finish != SRV_FINISH_STOP) r.stop = NULL; /* the reply did not end at the stop */
    if (r.parsed.parse_failed) srv_log("tool: DSML block did not parse; returned as text");
    r.finish = finish;

    /* exact replay memory (TEXT C.8): every id of the turn -> the raw block */
    if (r.parsed.n_calls && r.parsed.raw_dsml && !s->cfg.disable_exact_dsml_replay) {
        const char *ids[64];
        int n_ids = 0;
        for (int i = 0; i < r.parsed.n_calls && n_ids < 64; i++)
            if (r.parsed.calls[i].id) ids[n_ids++] = r.parsed.calls[i].id;
        pthread_mutex_lock(&s->replay_mu);
        ds4_dsml_replay_put(s->replay, ids, n_ids, r.parsed.raw_dsml, r.parsed.raw_dsml_len, NULL);
        pthread_mutex_unlock(&s->replay_mu);
    }
    double t_gen = srv_now_mono() - t_gen0;
    srv_log("generated %s: %d tokens (%.2f tok/s, %.2f s total) finish=%s%s%s", j->id,
            r.usage.completion, t_gen > 0 ? r.usage.completion / t_gen : 0.0,
            srv_now_mono() - t0, srv_finish_openai(finish), r.error_msg[0] ? " " : "", r.error_msg);
    if (g.streaming) {
        if (g.em->finish) g.em->finish(j, &r);
    } else if (finish == SRV_FINISH_ERROR && rq->api != SRV_API_RESPONSES) {
        /* no Anthropic stop_reason and no OpenAI finish_reason says "failed"
         * (the SDKs reject "error"): an error response; Responses has its
         * "failed" status */
        bool shutdown = !strcmp(r.error_msg, "shutdown requested");
        fail_job(j, shutdown ? 503 : 500, r.error_msg[0] ? r.error_msg : "generation failed");
    } else {
        j->body = g.em->body(j, &r);
        j->status = 200;
    }
    srv_cache_bind(s, j, &r, stop_hit);
    trace_job(s, j, &r);
    srv_result_free(&r);
    gen_free(&g);
}

static void *worker_main(void *arg) {
    srv_server *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->head && !s->stopping) pthread_cond_wait(&s->cv, &s->mu);
        srv_job *j = s->head;
        if (!j) { /* stopping and drained */
            pthread_mutex_unlock(&s->mu);
            break;
        }
        s->head = j->next;
        if (!s->head) s->tail = NULL;
        s->n_queued--;
        j->state = SRV_JOB_RUNNING;
        pthread_mutex_unlock(&s->mu);
        if (job_gone(j)) {
            srv_log("request %s: client gone before it ran; skipped", j->id);
        } else if (s->shutdown_flag) {
            fail_job(j, 503, "server shutting down");
        } else {
            run_job(s, j);
        }
        srv_stream_close(j);
        srv_job_release(s, j);
        if (!s->exit_code && ds4_engine_lost_rank(s->engine)) {
            /* a rank's blocks are gone for good (the rendezvous is over):
             * exit non-zero so that a supervisor restarts every rank, rather
             * than answer 503 forever while looking healthy */
            srv_log("ds4-server: a worker rank was lost; shutting down with status 1 (restart every rank)");
            s->exit_code = 1;
            kill(getpid(), SIGTERM);
        }
    }
    return NULL;
}

int srv_worker_start(srv_server *s, ds4_err *err) {
    if (s->cfg.debug_reply &&
        srv_tokenize(s->engine, s->cfg.debug_reply, strlen(s->cfg.debug_reply), &s->debug_tokens,
                     &s->n_debug_tokens, err))
        return err ? err->code : DS4_E_NOMEM;
    s->sampler = ds4_sampler_new(ds4_engine_n_vocab(s->engine), err);
    if (!s->sampler) return err ? err->code : DS4_E_NOMEM;
    s->lp_scratch = malloc((size_t)ds4_engine_n_vocab(s->engine) * sizeof *s->lp_scratch);
    s->adj_scratch = malloc((size_t)ds4_engine_n_vocab(s->engine) * sizeof *s->adj_scratch);
    if (!s->lp_scratch || !s->adj_scratch) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    if (pthread_create(&s->worker, NULL, worker_main, s))
        return ds4_err_set(err, DS4_E_INTERNAL, "cannot start the worker thread");
    s->worker_started = true;
    return 0;
}

void srv_worker_stop(srv_server *s) {
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->worker_started) pthread_join(s->worker, NULL);
    s->worker_started = false;
    ds4_sampler_free(s->sampler);
    free(s->debug_tokens);
    s->sampler = NULL;
    free(s->lp_scratch);
    s->lp_scratch = NULL;
    free(s->adj_scratch);
    s->adj_scratch = NULL;
}
